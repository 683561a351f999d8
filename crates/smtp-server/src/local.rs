//! Who is on the other end of the local submission socket (SPEC F6, A4): the kernel gives the
//! peer's uid; the user name comes from the system's passwd database.

use store::Store;

/// The login name of `uid`, from /etc/passwd.
pub fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

/// The addresses `user` may send as: `user@hostname`, plus the addresses of the Postroom user
/// of the same name, if there is one (and it is not removed). `policy::local_sender` decides.
pub async fn identities(store: &Store, user: &str, hostname: &str) -> Vec<String> {
    let mut owned = vec![format!("{}@{}", user.to_ascii_lowercase(), hostname.to_ascii_lowercase())];
    let name = user.to_string();
    let found = store.read(move |c| Ok(directory::mailbox::addresses_of(c, &name)?)).await.ok().flatten().unwrap_or_default();
    owned.extend(found);
    owned
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_is_uid_zero() {
        assert_eq!(super::user_name(0).as_deref(), Some("root"));
    }
}
