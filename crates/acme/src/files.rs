//! The ACME state in the data directory (SPEC O6, D4): `data_dir/acme/` (0700) holds the
//! account (`account.json`), the certificate chain (`cert.pem`) and its key (`key.pem`), each a
//! 0600 file written new and renamed into place.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;
use private_files::{effective_uid, own_regular_file, write_private_atomic};
use serde::{Deserialize, Serialize};

/// The directory inside the data directory.
pub const DIR: &str = "acme";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
pub const ACCOUNT: &str = "account.json";

/// `data_dir/acme/cert.pem` when it is there (a regular file of ours): the certificate ACME
/// obtained, for `postroom cert show` and `status`. Reads nothing else.
pub fn certificate_file(data_dir: &Path) -> Option<PathBuf> {
    let path = data_dir.join(DIR).join(CERT);
    let euid = effective_uid().ok()?;
    matches!(own_regular_file(&path, euid), Ok(Ok(true))).then_some(path)
}

/// `account.json`: the account's credentials and the directory that knows them (credentials of
/// another ACME server are useless, so a changed `directory` registers a new account).
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// `data_dir/acme`, created 0700 when missing.
#[derive(Clone, Debug)]
pub struct AcmeDir {
    path: PathBuf,
}

impl AcmeDir {
    /// Open (or create) the directory. Like the data directory, it must be a real directory of
    /// the user that runs postroom that nobody else may enter: it holds private keys.
    pub fn open(data_dir: &Path) -> io::Result<AcmeDir> {
        let path = data_dir.join(DIR);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
        let meta = std::fs::symlink_metadata(&path)?;
        let shown = path.display();
        let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
        if !meta.is_dir() {
            return refuse(format!("{shown} is not a directory (a link or a file): remove it; postroom creates it"));
        }
        if meta.uid() != effective_uid()? {
            return refuse(format!("{shown} is owned by uid {}, not by the user that runs postroom: remove it", meta.uid()));
        }
        if meta.mode() & 0o077 != 0 {
            return refuse(format!("{shown} may be entered by group or others (mode {:04o}): chmod 700 {shown}", meta.mode() & 0o7777));
        }
        Ok(AcmeDir { path })
    }

    pub fn cert_path(&self) -> PathBuf {
        self.path.join(CERT)
    }

    pub fn key_path(&self) -> PathBuf {
        self.path.join(KEY)
    }

    /// Whether both files of a pair are there as regular files of ours; a link or another
    /// user's file is an error (never read: its key could be known to someone else).
    pub fn has_pair(&self) -> io::Result<bool> {
        let euid = effective_uid()?;
        let mut both = true;
        for path in [self.cert_path(), self.key_path()] {
            match own_regular_file(&path, euid)? {
                Ok(present) => both &= present,
                Err(what) => {
                    let why = format!("{} is {what}: remove it (postroom orders a new certificate)", path.display());
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
                }
            }
        }
        Ok(both)
    }

    /// Replace the pair. Two files cannot be renamed at once: the key goes first, so a crash
    /// between the two leaves a certificate that does not fit its key, which the next start
    /// finds (the pair does not load) and orders anew; a half pair is never presented.
    pub fn write_pair(&self, chain_pem: &str, key_pem: &str) -> io::Result<()> {
        write_private_atomic(&self.path, KEY, key_pem.as_bytes())?;
        write_private_atomic(&self.path, CERT, chain_pem.as_bytes())
    }

    /// The stored credentials of the account at `directory`; None when there are none, or only
    /// for another directory.
    pub fn account(&self, directory: &str) -> io::Result<Option<AccountCredentials>> {
        let path = self.path.join(ACCOUNT);
        let text = match std::fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            other => other?,
        };
        let stored: StoredAccount = serde_json::from_slice(&text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: unreadable ({e}): remove it", path.display())))?;
        Ok((stored.directory == directory).then_some(stored.credentials))
    }

    pub fn save_account(&self, directory: &str, credentials: AccountCredentials) -> io::Result<()> {
        let stored = StoredAccount { directory: directory.to_string(), credentials };
        let json = serde_json::to_vec_pretty(&stored).map_err(io::Error::other)?;
        write_private_atomic(&self.path, ACCOUNT, &json)
    }

    /// Forget the account (the server no longer knows it): the next order registers a new one.
    pub fn forget_account(&self) -> io::Result<()> {
        match std::fs::remove_file(self.path.join(ACCOUNT)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_directory_and_files() {
        let data = tempfile::tempdir().unwrap();
        let dir = AcmeDir::open(data.path()).unwrap();
        assert_eq!(mode(&data.path().join(DIR)), 0o700);
        assert!(!dir.has_pair().unwrap());
        assert_eq!(certificate_file(data.path()), None);
        dir.write_pair("chain", "key").unwrap();
        assert!(dir.has_pair().unwrap());
        assert_eq!(certificate_file(data.path()), Some(dir.cert_path()));
        for f in [CERT, KEY] {
            assert_eq!(mode(&data.path().join(DIR).join(f)), 0o600, "{f}");
        }
        AcmeDir::open(data.path()).unwrap();
        std::fs::set_permissions(data.path().join(DIR), std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = AcmeDir::open(data.path()).unwrap_err().to_string();
        assert!(err.contains("chmod 700"), "{err}");
    }

    #[test]
    fn planted_links_are_refused() {
        let data = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), data.path().join(DIR)).unwrap();
        assert!(AcmeDir::open(data.path()).unwrap_err().to_string().contains("not a directory"));
        std::fs::remove_file(data.path().join(DIR)).unwrap();
        let dir = AcmeDir::open(data.path()).unwrap();
        std::fs::write(elsewhere.path().join("k"), "theirs").unwrap();
        std::os::unix::fs::symlink(elsewhere.path().join("k"), dir.key_path()).unwrap();
        assert!(dir.has_pair().unwrap_err().to_string().contains("key.pem is a symbolic link"));
    }

    #[test]
    fn account_belongs_to_its_directory() {
        let data = tempfile::tempdir().unwrap();
        let dir = AcmeDir::open(data.path()).unwrap();
        assert!(dir.account("https://acme.test/dir").unwrap().is_none());
        let json = r#"{"id":"https://acme.test/acct/1","key_pkcs8":"MC4CAQAwBQYDK2VwBCIEIA","directory":"https://acme.test/dir"}"#;
        let credentials: AccountCredentials = serde_json::from_str(json).unwrap();
        dir.save_account("https://acme.test/dir", credentials).unwrap();
        assert_eq!(mode(&data.path().join(DIR).join(ACCOUNT)), 0o600);
        assert!(dir.account("https://acme.test/dir").unwrap().is_some());
        assert!(dir.account("https://other.test/dir").unwrap().is_none(), "another server's account");
        dir.forget_account().unwrap();
        dir.forget_account().unwrap();
        assert!(dir.account("https://acme.test/dir").unwrap().is_none());
    }
}
