//! The dashboard's traffic figures, read from the process's metrics text (the counters the SMTP
//! server, the POP3 server and the outbound queue keep for `/metrics`), so the console and a
//! Prometheus scrape can never disagree.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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

    /// What grew from `base` to `self`, per minute over `minutes`.
    fn per_minute_since(&self, base: &Totals, minutes: f64) -> Totals {
        let rate = |now: f64, then: f64| ((now - then).max(0.0) / minutes * 10.0).round() / 10.0;
        Totals {
            received: rate(self.received, base.received),
            accepted: rate(self.accepted, base.accepted),
            refused: rate(self.refused, base.refused),
            delivered: rate(self.delivered, base.delivered),
            failed: rate(self.failed, base.failed),
            retried: rate(self.retried, base.retried),
        }
    }
}

/// The totals sampled over the last few minutes, for the dashboard's rates per minute.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<(Instant, Totals)>,
}

impl History {
    /// The rates are averaged over up to this long.
    pub const WINDOW: Duration = Duration::from_secs(300);
    /// How often the console samples the totals.
    pub const EVERY: Duration = Duration::from_secs(15);
    /// Less history than this gives no rate (a rate over a few seconds says little).
    const SHORTEST: Duration = Duration::from_secs(10);

    /// Keep the totals of `now`; samples older than the window go, but for the newest of them,
    /// which stays as the window's base.
    pub fn record(&mut self, now: Instant, totals: Totals) {
        self.samples.push_back((now, totals));
        while self.samples.len() > 1 && self.samples.get(1).is_some_and(|(at, _)| now.duration_since(*at) >= Self::WINDOW) {
            self.samples.pop_front();
        }
    }

    /// The rates per minute from the oldest sample to `current` at `now`, and the minutes they
    /// span; `None` until there are ten seconds of history.
    pub fn per_minute(&self, now: Instant, current: &Totals) -> Option<(Totals, f64)> {
        let (at, base) = self.samples.front()?;
        let span = now.duration_since(*at);
        (span >= Self::SHORTEST).then(|| {
            let minutes = span.as_secs_f64() / 60.0;
            (current.per_minute_since(base, minutes), (minutes * 10.0).round() / 10.0)
        })
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
    fn rates_are_per_minute_over_the_window_and_need_ten_seconds() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let total = |received: f64| Totals { received, ..Totals::default() };
        let mut history = History::default();
        history.record(t0, total(0.0));
        assert_eq!(history.per_minute(at(5), &total(10.0)), None, "five seconds say little");
        assert_eq!(history.per_minute(at(30), &total(10.0)).unwrap(), (total(20.0), 0.5));
        // Ten minutes of samples every 15 s: the base is the newest sample at least 5 min old.
        for s in (15..=600).step_by(15) {
            history.record(at(s), total(s as f64));
        }
        let (rates, minutes) = history.per_minute(at(600), &total(600.0)).unwrap();
        assert_eq!((rates.received, minutes), (60.0, 5.0));
        assert!(history.samples.len() <= 22, "bounded: {}", history.samples.len());
    }

    #[test]
    fn the_real_encoding_is_understood() {
        metrics::message_received();
        assert!(Totals::of(&metrics::global().encode()).received >= 1.0);
    }
}
