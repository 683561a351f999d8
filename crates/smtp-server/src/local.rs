//! Who is on the other end of the local submission socket (SPEC F6, A4): the kernel gives the
//! peer's uid; the user name comes from the system's passwd database.

use store::Store;

use mail_proto::{Address, Reply};

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
/// of the same name, if there is one.
pub async fn identities(store: &Store, user: &str, hostname: &str) -> Vec<String> {
    let mut owned = vec![format!("{}@{}", user.to_ascii_lowercase(), hostname.to_ascii_lowercase())];
    let name = user.to_string();
    let found = store
        .read(move |c| {
            let mut stmt = c.prepare_cached("SELECT a.address FROM addresses a JOIN users u ON u.id = a.user_id WHERE u.name = ?1")?;
            let rows = stmt.query_map([name], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
        .await
        .unwrap_or_default();
    owned.extend(found);
    owned
}

/// A4: a local user other than root may send only as one of their identities.
pub fn originator_check(root: bool, owned: Vec<String>) -> crate::session::SenderCheck {
    Box::new(move |from: Option<&Address>, _user: Option<&str>| {
        let from = from?;
        if root || owned.iter().any(|o| o.eq_ignore_ascii_case(&from.key())) {
            None
        } else {
            Some(Reply::new(553, (7, 1), "Sender address rejected: a local user sends only as themself"))
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_is_uid_zero() {
        assert_eq!(super::user_name(0).as_deref(), Some("root"));
    }
}
