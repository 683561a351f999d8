//! DNS for Postroom: blackhole-list queries (SPEC R4), HELO checks (R10) and MX lookups
//! for the SMTP client (C1). Every query goes to the servers of `[dns] servers` (the system's
//! resolvers only when that list is empty), with a short deadline: a dead DNS server costs a
//! session at most that long and never stops the office's mail.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

/// Longest wait for one answer (R4: timeouts of at most 2 s).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set up the resolver: {0}")]
    Setup(String),
}

/// What a blackhole list said about an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RblAnswer {
    /// An A record inside 127.0.0.0/8 outside 127.255.255.0/24.
    Listed(Ipv4Addr),
    /// NXDOMAIN or no A record.
    NotListed,
    /// Timeout, SERVFAIL, or an answer that is not a listing code (e.g. 127.255.255.254, which
    /// public lists return when they refuse a resolver): fail open.
    Error(String),
}

/// Does a name resolve to addresses? (HELO verification.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressAnswer {
    Found(Vec<IpAddr>),
    /// NXDOMAIN or no A/AAAA records.
    NotFound,
    Error(String),
}

/// Where a domain's mail goes (RFC 5321 §5.1, RFC 7505).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxAnswer {
    /// Exchangers, most preferred first (equal preferences keep the server's order).
    Hosts(Vec<String>),
    /// No MX records: the domain itself is the host (the implicit MX).
    Implicit,
    /// `MX 0 .`: the domain accepts no mail.
    NullMx,
    /// NXDOMAIN: there is no such domain.
    NoSuchDomain,
    /// SERVFAIL, timeout: try again later.
    Error(String),
}

/// The resolver configuration for `servers` (IP:port each, over UDP with TCP fallback): the
/// `[dns] servers` every lookup of the server goes to, here and in sender-auth's resolver.
pub fn servers_config(servers: &[SocketAddr]) -> ResolverConfig {
    let configs = servers
        .iter()
        .map(|s| {
            let mut c = NameServerConfig::udp_and_tcp(s.ip());
            for conn in &mut c.connections {
                conn.port = s.port();
            }
            c
        })
        .collect();
    ResolverConfig::from_name_servers(configs)
}

#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// A resolver for `servers` (IP:port each); the system's configuration when empty.
    /// Reads configuration only: no query is sent until one is asked for.
    pub fn new(servers: &[SocketAddr]) -> Result<Dns, DnsError> {
        let mut builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| DnsError::Setup(e.to_string()))?
        } else {
            TokioResolver::builder_with_config(servers_config(servers), TokioRuntimeProvider::default())
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = QUERY_TIMEOUT;
        opts.attempts = 0;
        opts.cache_size = 1024;
        let resolver = builder.build().map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Dns { resolver })
    }

    /// Query `zone` for `ip` (reversed octets, or nibbles for IPv6).
    pub async fn rbl(&self, ip: IpAddr, zone: &str) -> RblAnswer {
        let name = rbl_query_name(ip, zone);
        let deadline = QUERY_TIMEOUT + Duration::from_millis(200);
        match tokio::time::timeout(deadline, self.resolver.lookup(name.as_str(), RecordType::A)).await {
            Err(_) => RblAnswer::Error(format!("{name}: timeout")),
            Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => RblAnswer::NotListed,
            Ok(Err(e)) => RblAnswer::Error(format!("{name}: {e}")),
            Ok(Ok(lookup)) => {
                let answers: Vec<Ipv4Addr> =
                    lookup.answers().iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.0) } else { None }).collect();
                classify_rbl(&name, &answers)
            }
        }
    }

    /// The A and AAAA records of `name`.
    pub async fn addresses(&self, name: &str) -> AddressAnswer {
        let fqdn = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
        let deadline = QUERY_TIMEOUT + Duration::from_millis(200);
        match tokio::time::timeout(deadline, self.resolver.lookup_ip(fqdn.as_str())).await {
            Err(_) => AddressAnswer::Error(format!("{name}: timeout")),
            Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => AddressAnswer::NotFound,
            Ok(Err(e)) => AddressAnswer::Error(format!("{name}: {e}")),
            Ok(Ok(found)) => {
                let ips: Vec<IpAddr> = found.iter().collect();
                if ips.is_empty() { AddressAnswer::NotFound } else { AddressAnswer::Found(ips) }
            }
        }
    }
}

impl Dns {
    /// The MX records of `domain`, classified.
    pub async fn mx(&self, domain: &str) -> MxAnswer {
        let fqdn = if domain.ends_with('.') { domain.to_string() } else { format!("{domain}.") };
        let deadline = QUERY_TIMEOUT + Duration::from_millis(200);
        let lookup = match tokio::time::timeout(deadline, self.resolver.lookup(fqdn.as_str(), RecordType::MX)).await {
            Err(_) => return MxAnswer::Error(format!("{domain}: DNS timeout")),
            Ok(Err(e)) if e.is_nx_domain() => return MxAnswer::NoSuchDomain,
            Ok(Err(e)) if e.is_no_records_found() => return MxAnswer::Implicit,
            Ok(Err(e)) => return MxAnswer::Error(format!("{domain}: {e}")),
            Ok(Ok(l)) => l,
        };
        let mut records: Vec<(u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|r| if let RData::MX(mx) = &r.data { Some((mx.preference, mx.exchange.to_ascii())) } else { None })
            .collect();
        if records.is_empty() {
            return MxAnswer::Implicit;
        }
        // RFC 7505: a single MX with an empty exchange ".".
        if records.iter().any(|(_, host)| host == "." || host.is_empty()) {
            return MxAnswer::NullMx;
        }
        records.sort_by_key(|(pref, _)| *pref);
        MxAnswer::Hosts(records.into_iter().map(|(_, h)| h.trim_end_matches('.').to_ascii_lowercase()).collect())
    }
}

/// R4: only 127.0.0.0/8 outside 127.255.255.0/24 means listed.
fn classify_rbl(name: &str, answers: &[Ipv4Addr]) -> RblAnswer {
    match answers.iter().find(|a| is_listing_code(**a)) {
        Some(a) => RblAnswer::Listed(*a),
        None if answers.is_empty() => RblAnswer::NotListed,
        None => RblAnswer::Error(format!("{name}: answer {} is not a listing code", answers[0])),
    }
}

fn is_listing_code(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 127 && !(o[1] == 255 && o[2] == 255)
}

/// `1.2.3.4` in `zone` → `4.3.2.1.zone.`; IPv6 as 32 reversed nibbles (RFC 5782 §2.4).
pub fn rbl_query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
            let nibbles: Vec<String> = hex.chars().rev().map(String::from).collect();
            format!("{}.{zone}.", nibbles.join("."))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names() {
        assert_eq!(rbl_query_name("127.0.0.2".parse().unwrap(), "rbl.test"), "2.0.0.127.rbl.test.");
        let v6 = rbl_query_name("2001:db8::1".parse().unwrap(), "rbl.test.");
        assert!(v6.starts_with("1.0.0.0.0.0.0.0") && v6.ends_with("8.b.d.0.1.0.0.2.rbl.test."), "{v6}");
    }

    #[test]
    fn only_loopback_codes_outside_the_error_range_mean_listed() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(classify_rbl("n", &[a("127.0.0.2")]), RblAnswer::Listed(a("127.0.0.2")));
        assert!(matches!(classify_rbl("n", &[a("127.255.255.254")]), RblAnswer::Error(_)));
        assert!(matches!(classify_rbl("n", &[a("10.0.0.1")]), RblAnswer::Error(_)));
        assert_eq!(classify_rbl("n", &[]), RblAnswer::NotListed);
        assert_eq!(classify_rbl("n", &[a("127.255.255.254"), a("127.0.0.4")]), RblAnswer::Listed(a("127.0.0.4")));
    }
}
