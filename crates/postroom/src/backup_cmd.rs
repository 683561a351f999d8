//! `postroom backup FILE` and `postroom restore FILE` (issue 15, "Backup").
//!
//! A backup is one tar archive: `MANIFEST` (format, version, time, what it holds), the database
//! as SQLite's online backup API copied it while the server ran (every message answered 250
//! before the backup started is in it), the self-signed certificate and key the server
//! generated into the data directory, the ACME account, certificate and key (`data_dir/acme`),
//! and the configured `[tls] cert`/`key` files, if any. The
//! archive and every file restored from it are created 0600, as new files (O_EXCL, O_NOFOLLOW):
//! it holds every message and the private key.
//!
//! `restore` writes into the data directory of the configuration (or `--data-dir`), created
//! 0700. It refuses while a server runs there (it takes the lock `serve` holds, and keeps it, so
//! no server can start halfway through), and refuses a directory that already holds a database
//! unless `--force`. Everything is unpacked and the database checked before anything is
//! replaced.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use postroom::config::Config;
use store::DB_FILE;

use crate::out::outln;

/// The first line of a backup's MANIFEST.
const FORMAT: &str = "postroom-backup 1";
const MANIFEST: &str = "MANIFEST";
/// Where the configured `[tls] cert` and `key` are kept in the archive, and restored to.
const CONFIGURED_CERT: &str = "configured-tls-cert.pem";
const CONFIGURED_KEY: &str = "configured-tls-key.pem";
/// What ACME keeps in `data_dir/acme` (acme::files), as named in the archive and below the data
/// directory: a restored server presents its certificate at once instead of ordering a new one
/// (and keeps its account, which ACME servers rate-limit by).
const ACME_MEMBERS: [&str; 3] = ["acme/account.json", "acme/cert.pem", "acme/key.pem"];
/// Every file an archive may hold besides the manifest, as named in it and in the data directory.
const MEMBERS: [&str; 8] =
    [DB_FILE, tls::GENERATED_CERT, tls::GENERATED_KEY, CONFIGURED_CERT, CONFIGURED_KEY, ACME_MEMBERS[0], ACME_MEMBERS[1], ACME_MEMBERS[2]];
/// The longest manifest read (it is a few lines).
const MANIFEST_MAX: u64 = 64 * 1024;

#[derive(Args)]
pub struct BackupArgs {
    /// The archive to write: a new file (created 0600), never an existing file or a link.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// An archive made by `postroom backup`.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Replace the database (and the certificate files) already in the data directory.
    #[arg(long)]
    force: bool,
}

/// `postroom backup FILE`.
pub fn backup(args: BackupArgs, config: &Config) -> anyhow::Result<()> {
    let file = &args.file;
    if std::fs::symlink_metadata(file).is_ok() {
        bail!("{} already exists: a backup is always written to a new file", file.display());
    }
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // The database copy is made in a private directory beside the archive, then archived.
    let work = PrivateDir::create(&parent)?;
    let snapshot_path = work.0.join(DB_FILE);
    let taken_at = store::now();
    let snapshot = store::backup::snapshot(&config.data_dir, &snapshot_path)
        .with_context(|| format!("copying the database of {}", config.data_dir.display()))?;

    let mut members: Vec<(&str, PathBuf)> = vec![(DB_FILE, snapshot_path)];
    for name in [tls::GENERATED_CERT, tls::GENERATED_KEY].into_iter().chain(ACME_MEMBERS) {
        let path = config.data_dir.join(name);
        if path.exists() {
            members.push((name, path));
        }
    }
    if !config.tls.cert.as_os_str().is_empty() {
        members.push((CONFIGURED_CERT, config.tls.cert.clone()));
        members.push((CONFIGURED_KEY, config.tls.key.clone()));
    }
    let mut manifest = format!(
        "{FORMAT}\npostroom-version {}\ncreated {taken_at} {}\nschema {}\nhostname {}\ndata-dir {}\n",
        env!("CARGO_PKG_VERSION"),
        mail_proto::date::rfc5322(taken_at),
        snapshot.schema_version,
        config.hostname,
        config.data_dir.display(),
    );
    let mut opened = Vec::new();
    for (name, path) in &members {
        let f = open_regular(path)?;
        let len = f.metadata().with_context(|| path.display().to_string())?.len();
        manifest.push_str(&format!("file {name} {len}\n"));
        opened.push((*name, f, len));
    }
    if !config.tls.cert.as_os_str().is_empty() {
        manifest.push_str(&format!("configured-cert {}\nconfigured-key {}\n", config.tls.cert.display(), config.tls.key.display()));
    }

    let out = create_private(file)?;
    let written = write_archive(out, &manifest, opened).and_then(|f| f.sync_all().map_err(anyhow::Error::from));
    if let Err(e) = written {
        let _ = std::fs::remove_file(file);
        return Err(e.context(format!("writing {}", file.display())));
    }
    sync_dir(&parent);
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let names: Vec<&str> = members.iter().map(|(n, _)| *n).collect();
    outln!(
        "backup: {} ({size} bytes, 0600): {} as of {} (schema {}, {} bytes of database)",
        file.display(),
        names.join(", "),
        mail_proto::date::rfc5322(taken_at),
        snapshot.schema_version,
        snapshot.bytes
    );
    Ok(())
}

/// `postroom restore FILE [--force]`.
pub fn restore(args: RestoreArgs, config: &Config) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    let archive_file = open_regular(&args.file)?;
    let _lock = store::backup::lock_data_dir(dir).with_context(|| format!("the data directory {}", dir.display()))?.ok_or_else(|| {
        anyhow::anyhow!(
            "a server is running on {} (or a restore is writing it): stop it first (SIGTERM to `postroom serve`), then restore",
            dir.display()
        )
    })?;
    if std::fs::symlink_metadata(dir.join(DB_FILE)).is_ok() && !args.force {
        bail!(
            "{} already holds a database ({}): restore into an empty data directory, or add --force to replace it",
            dir.display(),
            dir.join(DB_FILE).display()
        );
    }
    // Unpack everything beside its final name first; nothing is replaced until all is read
    // and the database passed its check.
    let mut unpacked = Unpacked { dir: dir.clone(), files: Vec::new() };
    let manifest = unpack(archive_file, &args.file, &mut unpacked)?;
    let Some((_, db_tmp)) = unpacked.files.iter().find(|(n, _)| *n == DB_FILE) else {
        bail!("{}: holds no database", args.file.display());
    };
    let snapshot = store::backup::check(db_tmp).with_context(|| format!("{}: the database in it", args.file.display()))?;
    // The old database's WAL and shared memory must not be applied to the restored one.
    for suffix in ["-wal", "-shm", "-journal"] {
        let side = dir.join(format!("{DB_FILE}{suffix}"));
        if let Err(e) = std::fs::remove_file(&side)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(anyhow::Error::new(e).context(format!("removing {}", side.display())));
        }
    }
    // The database last: until it is in place the directory has its old one, or none.
    unpacked.files.sort_by_key(|(name, _)| *name == DB_FILE);
    if unpacked.files.iter().any(|(name, _)| ACME_MEMBERS.contains(name)) {
        acme::files::AcmeDir::open(dir).with_context(|| format!("the ACME directory {}", dir.join(acme::files::DIR).display()))?;
    }
    let mut restored = Vec::new();
    for (name, tmp) in std::mem::take(&mut unpacked.files) {
        std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming {} into place", tmp.display()))?;
        restored.push(name);
    }
    sync_dir(dir);
    // "created UNIX DATE": the date is for people.
    let created = manifest.lines().find_map(|l| l.strip_prefix("created ")).map_or("(unknown)", |c| c.split_once(' ').map_or(c, |(_, date)| date));
    outln!(
        "restored {} into {}: {} (backup of {created}; schema {}, {} bytes of database)",
        args.file.display(),
        dir.display(),
        restored.join(", "),
        snapshot.schema_version,
        snapshot.bytes
    );
    let configured: Vec<&str> = manifest.lines().filter_map(|l| l.strip_prefix("configured-cert ").or(l.strip_prefix("configured-key "))).collect();
    if !configured.is_empty() && restored.contains(&CONFIGURED_CERT) {
        outln!(
            "note: the configured [tls] cert and key of the backup ({}) are restored as {} and {}: \
             point [tls] cert and key at them, or copy them back",
            configured.join(", "),
            dir.join(CONFIGURED_CERT).display(),
            dir.join(CONFIGURED_KEY).display()
        );
    }
    Ok(())
}

fn write_archive(out: File, manifest: &str, members: Vec<(&str, File, u64)>) -> anyhow::Result<File> {
    let now = store::now().max(0) as u64;
    let mut builder = tar::Builder::new(out);
    let header = |len: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_size(len);
        h.set_mode(0o600);
        h.set_mtime(now);
        h.set_entry_type(tar::EntryType::Regular);
        h
    };
    builder.append_data(&mut header(manifest.len() as u64), MANIFEST, manifest.as_bytes())?;
    for (name, file, len) in members {
        // Exactly the length the manifest names, even if the file grew since.
        builder.append_data(&mut header(len), name, file.take(len))?;
    }
    Ok(builder.into_inner()?)
}

/// Files unpacked beside their final names; removed if they were never renamed into place.
struct Unpacked {
    dir: PathBuf,
    files: Vec<(&'static str, PathBuf)>,
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        for (_, tmp) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Read the archive: the manifest first, then only the files it names, each of the size it
/// names, each into a new 0600 file in the data directory. Returns the manifest.
fn unpack(file: File, path: &Path, into: &mut Unpacked) -> anyhow::Result<String> {
    let bad = |why: String| anyhow::anyhow!("{}: not a postroom backup: {why}", path.display());
    let mut archive = tar::Archive::new(file);
    let mut entries = archive.entries().map_err(|e| bad(e.to_string()))?;
    let mut manifest = String::new();
    {
        let first = entries.next().ok_or_else(|| bad("the archive is empty".into()))?.map_err(|e| bad(e.to_string()))?;
        if first.path().ok().as_deref() != Some(Path::new(MANIFEST)) || !first.header().entry_type().is_file() {
            return Err(bad(format!("its first member is not {MANIFEST}")));
        }
        first.take(MANIFEST_MAX).read_to_string(&mut manifest).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
    }
    if manifest.lines().next() != Some(FORMAT) {
        return Err(bad(format!("{MANIFEST} does not start with {FORMAT:?}")));
    }
    let expected: Vec<(&'static str, u64)> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("file "))
        .map(|l| {
            let (name, len) = l.rsplit_once(' ').ok_or_else(|| bad(format!("manifest line {l:?}")))?;
            let member = MEMBERS.iter().find(|m| **m == name).ok_or_else(|| bad(format!("unknown member {name:?}")))?;
            Ok((*member, len.parse::<u64>().map_err(|_| bad(format!("manifest line {l:?}")))?))
        })
        .collect::<anyhow::Result<_>>()?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let name = entry.path().map_err(|e| bad(e.to_string()))?.to_string_lossy().into_owned();
        let Some(&(member, len)) = expected.iter().find(|(m, _)| *m == name) else {
            return Err(bad(format!("member {name:?} is not in its manifest")));
        };
        if !entry.header().entry_type().is_file() || entry.size() != len || into.files.iter().any(|(m, _)| *m == member) {
            return Err(bad(format!("member {name} is not the file its manifest names")));
        }
        // Beside the data directory's own files, also for members below it (acme/…).
        let tmp = into.dir.join(format!(".{}.restore.{}.tmp", member.replace('/', "-"), std::process::id()));
        let mut out = create_private(&tmp)?;
        into.files.push((member, tmp.clone()));
        let copied = std::io::copy(&mut entry, &mut out).map_err(|e| bad(format!("member {name}: {e}")))?;
        if copied != len {
            return Err(bad(format!("member {name} is cut short ({copied} of {len} bytes)")));
        }
        out.sync_all().with_context(|| tmp.display().to_string())?;
    }
    if let Some((missing, _)) = expected.iter().find(|(m, _)| !into.files.iter().any(|(f, _)| f == m)) {
        return Err(bad(format!("member {missing} named in its manifest is missing (the archive is cut short?)")));
    }
    Ok(manifest)
}

/// A new 0600 file, never through a link, never an existing one.
fn create_private(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Open a regular file for reading, not through a link.
fn open_regular(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).with_context(|| format!("opening {}", path.display()))?;
    if !f.metadata().with_context(|| path.display().to_string())?.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    Ok(f)
}

/// The renames and new names in `dir` reach the disk.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A 0700 directory of our own for the database copy, removed with what is in it.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create(parent: &Path) -> anyhow::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let mut n = 0;
        loop {
            let path = parent.join(format!(".postroom-backup.{}.{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                Err(e) => return Err(anyhow::Error::new(e).context(format!("creating a working directory in {}", parent.display()))),
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path) -> Config {
        Config { data_dir: dir.to_path_buf(), ..Config::default() }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn backup_then_restore_round_trips_and_refuses_what_it_must() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let store = store::Store::open(&data, store::StoreOptions::default()).unwrap();
        store.write_blocking(store::Durability::Full, |c| Ok(c.execute_batch("CREATE TABLE kept (v TEXT); INSERT INTO kept VALUES ('x')")?)).unwrap();
        store::write_private_atomic(&data, tls::GENERATED_KEY, b"KEY").unwrap();
        store::write_private_atomic(&data, tls::GENERATED_CERT, b"CERT").unwrap();
        let archive = tmp.path().join("b.tar");
        backup(BackupArgs { file: archive.clone() }, &config(&data)).unwrap();
        assert_eq!(mode(&archive), 0o600);
        assert!(backup(BackupArgs { file: archive.clone() }, &config(&data)).is_err(), "never over an existing file");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 2, "no working directory left: {leftovers:?}");

        let target = tmp.path().join("restored");
        restore(RestoreArgs { file: archive.clone(), force: false }, &config(&target)).unwrap();
        assert_eq!(mode(&target), 0o700);
        for name in [DB_FILE, tls::GENERATED_KEY, tls::GENERATED_CERT] {
            assert_eq!(mode(&target.join(name)), 0o600, "{name}");
        }
        assert_eq!(std::fs::read(target.join(tls::GENERATED_KEY)).unwrap(), b"KEY");
        let copy = store::rusqlite::Connection::open(target.join(DB_FILE)).unwrap();
        assert_eq!(copy.query_row("SELECT v FROM kept", [], |r| r.get::<_, String>(0)).unwrap(), "x");
        drop(copy);

        // A database is there now: only --force replaces it.
        let e = restore(RestoreArgs { file: archive.clone(), force: false }, &config(&target)).unwrap_err().to_string();
        assert!(e.contains("already holds a database") && e.contains("--force"), "{e}");
        restore(RestoreArgs { file: archive.clone(), force: true }, &config(&target)).unwrap();
        // Refused while a server (anything holding the lock) runs there.
        let held = store::backup::lock_data_dir(&target).unwrap().unwrap();
        let e = restore(RestoreArgs { file: archive.clone(), force: true }, &config(&target)).unwrap_err().to_string();
        assert!(e.contains("a server is running on"), "{e}");
        drop(held);
        let names: Vec<String> = std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn the_acme_account_certificate_and_key_are_backed_up_and_restored_private() {
        use std::os::unix::fs::DirBuilderExt;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        drop(store::Store::open(&data, store::StoreOptions::default()).unwrap());
        std::fs::DirBuilder::new().mode(0o700).create(data.join(acme::files::DIR)).unwrap();
        for member in ACME_MEMBERS {
            let (dir, name) = member.split_once('/').unwrap();
            assert_eq!(dir, acme::files::DIR);
            assert!([acme::files::ACCOUNT, acme::files::CERT, acme::files::KEY].contains(&name), "{member} is a file acme keeps");
            store::write_private_atomic(&data.join(dir), name, member.as_bytes()).unwrap();
        }
        let archive = tmp.path().join("b.tar");
        backup(BackupArgs { file: archive.clone() }, &config(&data)).unwrap();
        let target = tmp.path().join("restored");
        restore(RestoreArgs { file: archive, force: false }, &config(&target)).unwrap();
        assert_eq!(mode(&target.join(acme::files::DIR)), 0o700);
        for member in ACME_MEMBERS {
            assert_eq!(std::fs::read(target.join(member)).unwrap(), member.as_bytes());
            assert_eq!(mode(&target.join(member)), 0o600, "{member}");
        }
    }

    #[test]
    fn a_damaged_or_foreign_archive_is_refused_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        drop(store::Store::open(&data, store::StoreOptions::default()).unwrap());
        let archive = tmp.path().join("b.tar");
        backup(BackupArgs { file: archive.clone() }, &config(&data)).unwrap();
        let bytes = std::fs::read(&archive).unwrap();
        let cut = tmp.path().join("cut.tar");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let foreign = tmp.path().join("foreign.tar");
        {
            let mut b = tar::Builder::new(File::create(&foreign).unwrap());
            // The tar crate refuses to write such a name: set the header's bytes directly.
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.as_gnu_mut().unwrap().name[..16].copy_from_slice(b"../../etc/passwd");
            h.set_cksum();
            b.append(&h, &b"abc"[..]).unwrap();
            b.finish().unwrap();
        }
        for bad in [&cut, &foreign] {
            let target = tmp.path().join("t");
            let e = restore(RestoreArgs { file: bad.clone(), force: false }, &config(&target)).unwrap_err();
            assert!(format!("{e:#}").contains("not a postroom backup"), "{e:#}");
            let names: Vec<_> = std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, [store::backup::LOCK_FILE], "nothing unpacked is left");
        }
    }
}
