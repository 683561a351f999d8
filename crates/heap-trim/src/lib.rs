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

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).unwrap().parse().unwrap()
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
