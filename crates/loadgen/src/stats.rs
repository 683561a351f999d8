//! Counters, latency samples, error samples and the one-line JSON report.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How many unexpected replies are printed on stderr.
const MAX_SAMPLES: usize = 5;

#[derive(Default)]
pub struct Stats {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub bytes: AtomicU64,
    /// Units of work begun (messages, users, sessions); those neither ok nor failed were cut
    /// off by --max-seconds.
    pub started: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    samples: Mutex<Vec<String>>,
    /// Set when a task stopped taking work because --max-seconds was reached.
    pub timed_out: AtomicBool,
    /// Errors beyond the printed samples.
    pub unsampled: AtomicU64,
}

impl Stats {
    pub fn add_ok(&self, bytes: u64) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_latency(&self, d: Duration) {
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        self.latencies_us.lock().unwrap().push(us);
    }

    pub fn add_error(&self, what: impl FnOnce() -> String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.sample(what);
    }

    /// Records an unexpected reply without counting an error (e.g. one refused recipient).
    pub fn sample(&self, what: impl FnOnce() -> String) {
        let mut s = self.samples.lock().unwrap();
        if s.len() < MAX_SAMPLES {
            let msg = what();
            eprintln!("postroom-loadgen: unexpected: {msg}");
            s.push(msg);
        } else {
            self.unsampled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// True (and remembered) once `deadline` has passed: the task should stop taking work.
    pub fn past(&self, deadline: tokio::time::Instant) -> bool {
        let past = tokio::time::Instant::now() >= deadline;
        if past {
            self.timed_out.store(true, Ordering::Relaxed);
        }
        past
    }

    pub fn start(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// Work begun but neither finished nor failed (cut off by the time bound).
    pub fn unfinished(&self) -> u64 {
        let done = self.get(&self.ok) + self.get(&self.errors);
        self.get(&self.started).saturating_sub(done)
    }

    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// (p50, p99) in milliseconds; zeros without samples.
    pub fn percentiles_ms(&self) -> (f64, f64) {
        let mut v = std::mem::take(&mut *self.latencies_us.lock().unwrap());
        v.sort_unstable();
        let p50 = percentile(&v, 50.0);
        let p99 = percentile(&v, 99.0);
        *self.latencies_us.lock().unwrap() = v;
        (p50, p99)
    }

    pub fn report_unsampled(&self) {
        let n = self.get(&self.unsampled);
        if n > 0 {
            eprintln!("postroom-loadgen: ... and {n} more unexpected replies or failures");
        }
    }
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds.
pub fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[idx] as f64 / 1000.0
}

/// A value in the JSON line.
pub enum J {
    U(u64),
    F(f64, usize),
}

/// Formats `{"k":v,...}` on one line (keys are plain identifiers; no escaping needed).
pub fn json_line(fields: &[(&str, J)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('"');
        s.push_str(k);
        s.push_str("\":");
        match v {
            J::U(u) => s.push_str(&u.to_string()),
            J::F(f, prec) if f.is_finite() => s.push_str(&format!("{f:.prec$}")),
            J::F(..) => s.push('0'),
        }
    }
    s.push('}');
    s
}

/// `n / secs`, zero when no time elapsed.
pub fn rate(n: f64, secs: f64) -> f64 {
    if secs > 0.0 { n / secs } else { 0.0 }
}

/// Wait for the worker tasks. They stop taking work at `deadline`; anything still in flight
/// two seconds later is cut, and the run says so.
pub async fn join_workers<T: 'static>(mut tasks: tokio::task::JoinSet<T>, deadline: tokio::time::Instant, stats: &Stats) {
    let hard_stop = deadline + Duration::from_secs(2);
    let cut = tokio::time::timeout_at(hard_stop, async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    })
    .await
    .is_err();
    if cut {
        tasks.abort_all();
    }
    if cut || stats.timed_out.load(Ordering::Relaxed) {
        eprintln!("postroom-loadgen: --max-seconds reached, stopped taking work (in flight then: cut after 2 s)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[1500], 99.0), 1.5);
    }

    #[test]
    fn json() {
        let s = json_line(&[("a", J::U(3)), ("b", J::F(1.23456, 2)), ("c", J::F(f64::NAN, 1))]);
        assert_eq!(s, r#"{"a":3,"b":1.23,"c":0}"#);
    }
}
