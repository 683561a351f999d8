//! Files only the server's user may touch (SPEC D4): written as new files, never through a link
//! someone planted, and trusted only when they are regular files of the user that runs postroom.
//! Shared by the store (status, listening, the database) and tls (the generated key).
#![forbid(unsafe_code)]

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The user id that owns the files this process creates: its effective uid (on Linux the
/// filesystem uid, which follows the effective one). Read as the owner of a new pipe, because
/// no crate here makes foreign calls (`geteuid` would need `unsafe`).
pub fn effective_uid() -> io::Result<u32> {
    let (reader, _writer) = io::pipe()?;
    Ok(std::fs::File::from(std::os::fd::OwnedFd::from(reader)).metadata()?.uid())
}

/// Is `path` there as a regular file of `euid`? Ok(false) when it does not exist; Err(why) in
/// words ("a symbolic link", "owned by uid 7, …") when it is there but must not be trusted.
pub fn own_regular_file(path: &Path, euid: u32) -> io::Result<Result<bool, String>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Ok(false)),
        Err(e) => return Err(e),
    };
    Ok(if meta.file_type().is_symlink() {
        Err("a symbolic link".to_string())
    } else if !meta.is_file() {
        Err("not a regular file".to_string())
    } else if meta.uid() != euid {
        Err(format!("owned by uid {}, not by uid {euid} that runs postroom", meta.uid()))
    } else {
        Ok(true)
    })
}

/// Write `bytes` to `dir/name` as a new 0600 file, atomically: a uniquely named temporary file
/// (created with O_EXCL and O_NOFOLLOW, so never through a link someone left there), fsynced, then
/// renamed over `name` (a link already at `name` is replaced, not followed). `dir` must be a
/// directory only we can write, as the data directory is.
pub fn write_private_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp) {
            Ok(f) => break (tmp, f),
            // Left by an earlier process with the same pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => attempts += 1,
            Err(e) => return Err(e),
        }
    };
    let written = file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_files_links_and_atomic_writes() {
        let dir = tempfile::tempdir().unwrap();
        let euid = effective_uid().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "untouched").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("key")).unwrap();
        assert_eq!(own_regular_file(&dir.path().join("key"), euid).unwrap(), Err("a symbolic link".into()));
        assert_eq!(own_regular_file(&dir.path().join("none"), euid).unwrap(), Ok(false));
        assert!(own_regular_file(&target, euid + 1).unwrap().unwrap_err().starts_with("owned by uid"));
        write_private_atomic(dir.path(), "key", b"secret").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched", "the link is replaced, not followed");
        assert_eq!(own_regular_file(&dir.path().join("key"), euid).unwrap(), Ok(true));
        assert_eq!(std::fs::metadata(dir.path().join("key")).unwrap().mode() & 0o777, 0o600);
    }
}
