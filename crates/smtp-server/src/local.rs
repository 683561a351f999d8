//! Who is on the other end of the local submission socket (SPEC F6, A4): the kernel gives the
//! peer's uid; the user name comes from the system's passwd database.

use directory::{LocalDomains, Resolution};
use mail_proto::Address;
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

/// The addresses `user` may send as: `user@hostname`; `user@sender_domain` (the local sender
/// domain, `sendmail`'s default envelope sender) unless that address belongs to another Postroom
/// user or is an alias; plus the addresses of the Postroom user of the same name, if there is one
/// (and it is not removed). `policy::local_sender` decides.
pub async fn identities(store: &Store, user: &str, hostname: &str, sender_domain: &str) -> Vec<String> {
    let user = user.to_ascii_lowercase();
    let mut owned = vec![format!("{user}@{}", hostname.to_ascii_lowercase())];
    let name = user.clone();
    let found = store.read(move |c| Ok(directory::mailbox::addresses_of(c, &name)?)).await.ok().flatten().unwrap_or_default();
    let in_domain = format!("{user}@{}", sender_domain.to_ascii_lowercase());
    // postmaster@ is the configured postmaster's, never a local login's.
    if !sender_domain.is_empty() && user != "postmaster" && !owned.contains(&in_domain) && !found.iter().any(|a| a.eq_ignore_ascii_case(&in_domain)) {
        let domains = LocalDomains::new(&[sender_domain.to_string()], "");
        let whose = match Address::parse(&in_domain) {
            Ok(address) => domains.resolve_async(store, &address).await.ok(),
            Err(_) => None,
        };
        // Unknown: nobody's yet, so the local user's. A failed lookup grants nothing.
        if matches!(whose, Some(Resolution::Unknown)) {
            owned.push(in_domain);
        }
    }
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
