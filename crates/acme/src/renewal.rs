//! When to order a certificate, and how long to wait after a failure (SPEC O6): plain decisions
//! over the certificate served, the configured names and the clock; no I/O.

use std::fmt;
use std::time::Duration;

use tls::CertInfo;

/// Why a certificate must be ordered now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// No ACME certificate yet (or none that loads): the self-signed or configured one is served
    /// until the first issuance.
    First,
    /// Fewer than `renew_days` days of validity are left.
    Expiring { days_left: i64 },
    /// The configured names are not all on the certificate (`names` or `hostname` changed).
    NamesChanged { missing: Vec<String> },
}

impl fmt::Display for Due {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Due::First => f.write_str("no certificate from the ACME server yet"),
            Due::Expiring { days_left } => write!(f, "the certificate expires in {days_left} days"),
            Due::NamesChanged { missing } => write!(f, "the certificate does not name {}", missing.join(", ")),
        }
    }
}

/// Whether the ACME certificate `served` (None: none yet) must be replaced at `now` (Unix
/// seconds): when it lacks one of `names`, or when fewer than `renew_days` days remain — well
/// before expiry, so failures have weeks of retries before clients see an expired certificate.
pub fn due(served: Option<&CertInfo>, names: &[String], now: i64, renew_days: u32) -> Option<Due> {
    let Some(info) = served else { return Some(Due::First) };
    let missing = missing_names(info, names);
    if !missing.is_empty() {
        return Some(Due::NamesChanged { missing });
    }
    let left = info.not_after - now;
    (left < i64::from(renew_days) * 86_400).then_some(Due::Expiring { days_left: left.div_euclid(86_400) })
}

/// The names of `names` the certificate does not carry as DNS names (case does not matter).
pub fn missing_names(info: &CertInfo, names: &[String]) -> Vec<String> {
    names.iter().filter(|n| !info.dns_names.iter().any(|d| d.eq_ignore_ascii_case(n))).cloned().collect()
}

/// The first retry waits a minute.
const FIRST_RETRY: Duration = Duration::from_secs(60);

/// How long to wait after `failures` failed orders in a row (1 for the first): a minute,
/// doubling with each failure, never longer than `ceiling` (`check_secs`). A server that is down
/// for a while is asked again soon after it is back, without hammering it meanwhile.
pub fn retry_delay(failures: u32, ceiling: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    FIRST_RETRY.saturating_mul(1 << doublings).min(ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn cert(names: &[&str], not_after: i64) -> CertInfo {
        CertInfo {
            subject: String::new(),
            common_name: None,
            dns_names: names.iter().map(|n| n.to_string()).collect(),
            ip_addresses: vec![],
            not_before: 0,
            not_after,
            fingerprints: tls::Fingerprints::of(b""),
        }
    }

    #[test]
    fn orders_first_then_only_when_expiring_or_names_change() {
        let names = vec!["mail.example.test".to_string()];
        let now = 1_000 * DAY;
        assert_eq!(due(None, &names, now, 30), Some(Due::First));
        let fresh = cert(&["MAIL.example.test"], now + 90 * DAY);
        assert_eq!(due(Some(&fresh), &names, now, 30), None, "60 days before the renewal window");
        assert_eq!(due(Some(&fresh), &names, now + 61 * DAY, 30), Some(Due::Expiring { days_left: 29 }));
        assert_eq!(due(Some(&fresh), &names, now + 91 * DAY, 30), Some(Due::Expiring { days_left: -1 }), "expired");
        // renew_days past the lifetime: every check renews (how the e2e test renews quickly).
        assert_eq!(due(Some(&fresh), &names, now, 3650), Some(Due::Expiring { days_left: 90 }));
        let more = vec!["mail.example.test".to_string(), "pop.example.test".to_string()];
        let want = Due::NamesChanged { missing: vec!["pop.example.test".to_string()] };
        assert_eq!(due(Some(&fresh), &more, now, 30), Some(want.clone()));
        assert_eq!(want.to_string(), "the certificate does not name pop.example.test");
    }

    #[test]
    fn retries_double_from_a_minute_up_to_the_check_interval() {
        let ceiling = Duration::from_secs(43_200);
        let delays: Vec<u64> = (1..=12).map(|n| retry_delay(n, ceiling).as_secs()).collect();
        assert_eq!(delays, [60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 30720, 43200, 43200]);
        assert_eq!(retry_delay(u32::MAX, ceiling), ceiling);
        assert_eq!(retry_delay(1, Duration::from_secs(2)), Duration::from_secs(2), "tests check every 2 s");
    }
}
