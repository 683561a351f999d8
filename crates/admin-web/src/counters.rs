//! The dashboard's traffic figures, read from the process's metrics text (the counters the SMTP
//! server, the POP3 server and the outbound queue keep for `/metrics`), so the console and a
//! Prometheus scrape can never disagree.

/// Totals since the server started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Messages answered 250 by the SMTP server.
    pub received: f64,
    /// Policy decisions that accepted, and that refused (connections, senders, recipients).
    pub accepted: f64,
    pub refused: f64,
    /// Outbound delivery results per recipient.
    pub delivered: f64,
    pub failed: f64,
    pub retried: f64,
}

impl Totals {
    /// Sum the samples of the OpenMetrics `text` ([`metrics::Metrics::encode`]).
    pub fn of(text: &str) -> Totals {
        let mut t = Totals::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let slot = match name {
                "postroom_messages_received_total" => &mut t.received,
                "postroom_accepts_total" => &mut t.accepted,
                "postroom_refusals_total" => &mut t.refused,
                "postroom_delivery_attempts_total" if labels.contains("outcome=\"delivered\"") => &mut t.delivered,
                "postroom_delivery_attempts_total" if labels.contains("outcome=\"failed\"") => &mut t.failed,
                "postroom_delivery_attempts_total" if labels.contains("outcome=\"retry\"") => &mut t.retried,
                _ => continue,
            };
            *slot += value;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_by_name_and_outcome() {
        let text = "# TYPE postroom_accepts counter\n\
                    postroom_accepts_total{stage=\"rcpt\",rule=\"R1\"} 3\n\
                    postroom_accepts_total{stage=\"connect\",rule=\"-\"} 2\n\
                    postroom_refusals_total{stage=\"rcpt\",rule=\"R4\"} 1\n\
                    postroom_messages_received_total 4\n\
                    postroom_delivery_attempts_total{outcome=\"delivered\"} 5\n\
                    postroom_delivery_attempts_total{outcome=\"retry\"} 1\n\
                    postroom_sessions_total{listener=\"smtp\"} 9\n# EOF\n";
        let t = Totals::of(text);
        assert_eq!((t.received, t.accepted, t.refused, t.delivered, t.retried, t.failed), (4.0, 5.0, 1.0, 5.0, 1.0, 0.0));
    }

    #[test]
    fn the_real_encoding_is_understood() {
        metrics::message_received();
        assert!(Totals::of(&metrics::global().encode()).received >= 1.0);
    }
}
