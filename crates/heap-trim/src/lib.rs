//! Gives the allocator's free memory back to the operating system.
//!
//! glibc keeps what a burst of work freed: each thread's arena only shrinks from its top, and the
//! thresholds for that grow with the largest blocks seen (argon2's 19 MiB). A server that served a
//! burst of sessions would sit at several times its idle size for good (measured: 74 MiB after
//! 20,000 messages and 2,000 POP3 logins, 24 MiB after a trim). `malloc_trim(0)` walks every
//! arena and releases the whole free pages; this crate is the one place that calls it, because
//! it is a foreign function (every other crate forbids `unsafe`).

/// Releases free heap pages to the OS; true if any memory was released. A no-op (false) where
/// the C library is not glibc.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and may be called from any thread at any time;
        // it only takes the arena locks the allocator itself uses.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Trims only when the process has gone quiet: under load the pages would be faulted straight
/// back in, so a trim would cost time and save nothing.
#[derive(Debug, Default)]
pub struct QuietTrimmer {
    last_cpu: Option<std::time::Duration>,
    trimmed_since_work: bool,
}

impl QuietTrimmer {
    /// Call at a fixed interval; trims once when the CPU the process used since the previous
    /// call is below `quiet`, and not again until there has been work. True if it trimmed.
    pub fn tick(&mut self, quiet: std::time::Duration) -> bool {
        let Some(now) = process_cpu_time() else { return false };
        let used = self.last_cpu.map(|before| now.saturating_sub(before));
        self.last_cpu = Some(now);
        match used {
            Some(used) if used < quiet => {
                if self.trimmed_since_work {
                    return false;
                }
                self.trimmed_since_work = true;
                release_free_memory()
            }
            _ => {
                self.trimmed_since_work = false;
                false
            }
        }
    }
}

/// User + system CPU time of this process so far, from /proc/self/stat (fields 14 and 15, in
/// clock ticks of 1/100 s on Linux).
fn process_cpu_time() -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(std::time::Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).unwrap().parse().unwrap()
    }

    #[test]
    fn trims_once_per_quiet_spell_and_never_while_busy() {
        let mut t = QuietTrimmer::default();
        let quiet = std::time::Duration::from_millis(100);
        assert!(!t.tick(quiet), "the first tick has nothing to compare with");
        // Busy: burn well over 100 ms of CPU between ticks.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(400) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(!t.tick(quiet), "no trim right after work");
        assert!(!t.trimmed_since_work);
        // Quiet now: the next tick trims (or finds nothing to release), the one after does nothing.
        let _ = t.tick(quiet);
        assert!(t.trimmed_since_work, "a quiet tick marks the spell as trimmed");
        assert!(!t.tick(quiet), "only one trim per quiet spell");
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_memory_leaves_the_process() {
        // Many small blocks (below the mmap threshold, so they live in the heap) touched, then
        // freed except the last one, which pins the top of the heap as a live session would.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 16 * 1024]).collect();
        let pin = vec![1u8; 16 * 1024];
        let before = rss_kib();
        blocks.clear();
        blocks.shrink_to_fit();
        release_free_memory();
        let after = rss_kib();
        assert!(before - after > 32 * 1024, "RSS {before} KiB before, {after} KiB after the trim");
        drop(pin);
    }
}
