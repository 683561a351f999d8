//! Liveness of the long-running workers, for `postroom status` (SPEC O2): each worker stamps
//! its loop; `serve` writes the stamps to a small file the status command reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Clone, Debug, Default)]
pub struct Heartbeat(Arc<AtomicI64>);

impl Heartbeat {
    /// The worker is alive now.
    pub fn beat(&self) {
        self.0.store(store::now(), Ordering::Relaxed);
    }

    /// Unix seconds of the last beat (0 = never).
    pub fn last(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}
