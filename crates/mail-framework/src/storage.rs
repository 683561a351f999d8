//! The storage threshold (SPEC F5, i5/OS busy queue QTMSBSSQ): when free space in the data
//! directory falls below `[storage] min_free_mb`, new mail gets 452 4.3.1 and the framework
//! stops taking work off the queue; both resume by themselves when space returns. Entering and
//! leaving the low state are journaled (7L, 7M).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::journal::{self, code};
use store::{Durability, Store};
use tokio::sync::Notify;

/// How often free space is measured.
const CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
pub struct StorageGuard {
    low: Arc<AtomicBool>,
}

impl StorageGuard {
    /// Is free space below the threshold now?
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// Measure `dir` now and every few seconds; `wake` is notified when space returns.
    /// A threshold of 0 turns the guard off.
    pub async fn monitor(&self, store: Store, dir: PathBuf, min_free_mb: u64, wake: Arc<Notify>) {
        if min_free_mb == 0 {
            return;
        }
        let min_free = min_free_mb.saturating_mul(1024 * 1024);
        let me = self.clone();
        // The first measurement before any mail is taken.
        me.measure(&store, &dir, min_free, &wake).await;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CHECK_EVERY).await;
                me.measure(&store, &dir, min_free, &wake).await;
            }
        });
    }

    async fn measure(&self, store: &Store, dir: &std::path::Path, min_free: u64, wake: &Notify) {
        let free = match fs2::available_space(dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot measure free space");
                return;
            }
        };
        let low = free < min_free;
        if low == self.low.swap(low, Ordering::Relaxed) {
            return;
        }
        let (code, detail) = if low {
            tracing::warn!(free_mb = free / 1024 / 1024, "free space below [storage] min_free_mb: new mail waits (452 4.3.1)");
            (code::STORAGE_LOW, format!("free space {} MiB below the threshold: new mail refused with 452, framework paused", free / 1024 / 1024))
        } else {
            tracing::info!(free_mb = free / 1024 / 1024, "free space back above the threshold: mail flows again");
            wake.notify_one();
            (code::STORAGE_OK, format!("free space {} MiB: mail flows again", free / 1024 / 1024))
        };
        let _ =
            store.write(Durability::Normal, move |c| Ok(journal::append(c, &journal::Entry { code, detail: &detail, ..Default::default() })?)).await;
    }
}
