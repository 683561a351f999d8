//! The certificate store (migrations/0012_smime.sql): users' own certificates and keys, and
//! their correspondents' certificates, as `postroom smime` manages them and `postroom send
//! --sign/--encrypt` reads them (SPEC F8, issue 18).

use rusqlite::{Connection, OptionalExtension, params};

use crate::SmimeError;
use crate::cert::{Certificate, Identity, Purpose};

/// One row of `smime list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The user (own certificate and key) or the address (a recipient's certificate).
    pub owner: String,
    pub has_key: bool,
    pub subject: String,
    pub emails: Vec<String>,
    pub not_after: i64,
}

/// Keep `identity` as `user`'s own. The user must exist, and the certificate must name one of
/// their addresses: that is how a receiver's mail program ties the signature to the From.
/// True when it replaced one.
pub fn import_identity(c: &Connection, user: &str, identity: &Identity, now: i64) -> Result<bool, SmimeError> {
    let (user_id, name): (i64, String) = c
        .query_row("SELECT id, name FROM users WHERE name = ?1 AND removed = 0", [user], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .ok_or_else(|| SmimeError::NoUser(user.to_string()))?;
    let addresses = user_addresses(c, user_id)?;
    if !identity.cert.emails.iter().any(|e| addresses.contains(e)) {
        return Err(SmimeError::Unusable(format!(
            "the certificate is for {}, which is no address of user {name} ({}): mail programs would not match it to \
             the sender",
            identity.cert.emails.join(", "),
            addresses.join(", ")
        )));
    }
    let replaced = c.query_row("SELECT count(*) FROM smime_identities WHERE user_id = ?1", [user_id], |r| r.get::<_, i64>(0))? > 0;
    c.execute(
        "INSERT OR REPLACE INTO smime_identities (user_id, certificate, private_key, subject, emails, not_after, imported)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            user_id,
            identity.cert.to_pem()?,
            identity.pkcs8()?,
            identity.cert.subject,
            identity.cert.emails.join(" "),
            identity.cert.not_after,
            now
        ],
    )?;
    Ok(replaced)
}

/// Keep `cert` as the certificate of `address`, which it must name. True when it replaced one.
pub fn add_recipient(c: &Connection, address: &str, cert: &Certificate, now: i64) -> Result<bool, SmimeError> {
    let address = address.trim().to_ascii_lowercase();
    if !address.contains('@') {
        return Err(SmimeError::Unusable(format!("{address:?} is not an e-mail address (local@domain)")));
    }
    if !cert.names(&address) {
        return Err(SmimeError::Unusable(format!(
            "the certificate is for {}, not {address}: mail encrypted to it could be read only by its holder",
            cert.emails.join(", ")
        )));
    }
    let replaced = c.query_row("SELECT count(*) FROM smime_recipients WHERE address = ?1", [&address], |r| r.get::<_, i64>(0))? > 0;
    c.execute(
        "INSERT OR REPLACE INTO smime_recipients (address, certificate, subject, not_after, imported) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![address, cert.to_pem()?, cert.subject, cert.not_after, now],
    )?;
    Ok(replaced)
}

/// Users' own certificates (by user), then recipients' (by address).
pub fn list(c: &Connection) -> Result<Vec<Listed>, SmimeError> {
    let mut out = Vec::new();
    let mut stmt =
        c.prepare("SELECT u.name, i.subject, i.emails, i.not_after FROM smime_identities i JOIN users u ON u.id = i.user_id ORDER BY u.name")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?)))?;
    for row in rows {
        let (owner, subject, emails, not_after) = row?;
        out.push(Listed { owner, has_key: true, subject, emails: emails.split(' ').map(str::to_string).collect(), not_after });
    }
    let mut stmt = c.prepare("SELECT address, subject, not_after FROM smime_recipients ORDER BY address")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
    for row in rows {
        let (owner, subject, not_after) = row?;
        out.push(Listed { emails: vec![owner.clone()], owner, has_key: false, subject, not_after });
    }
    Ok(out)
}

/// Remove the recipient certificate of an address (with an @), or a user's own certificate and
/// key (without). How many went.
pub fn remove(c: &Connection, user_or_address: &str) -> Result<usize, SmimeError> {
    let key = user_or_address.trim();
    Ok(if key.contains('@') {
        c.execute("DELETE FROM smime_recipients WHERE address = ?1", [key.to_ascii_lowercase()])?
    } else {
        c.execute("DELETE FROM smime_identities WHERE user_id = (SELECT id FROM users WHERE name = ?1)", [key])?
    })
}

/// The identity that signs mail from `from`: the one of the user who owns that address, with a
/// certificate that names it and is usable `now`.
pub fn signer(c: &Connection, from: &str, now: i64) -> Result<Identity, SmimeError> {
    let from = from.trim().to_ascii_lowercase();
    let row: Option<(Vec<u8>, Vec<u8>, String)> = c
        .query_row(
            "SELECT i.certificate, i.private_key, u.name FROM addresses a JOIN smime_identities i ON i.user_id = a.user_id
               JOIN users u ON u.id = a.user_id WHERE a.address = ?1",
            [&from],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (pem, key, user) = row.ok_or_else(|| SmimeError::NoSigner(from.clone()))?;
    let identity = Identity::from_stored(&pem, &key).map_err(|e| e.about(&format!("the S/MIME certificate of user {user}")))?;
    if !identity.cert.names(&from) {
        return Err(SmimeError::Unusable(format!(
            "the S/MIME certificate of user {user} is for {}, not the From address {from}: send from that address, or \
             import a certificate for {from}",
            identity.cert.emails.join(", ")
        )));
    }
    identity.check(now).map_err(|e| e.about(&format!("the S/MIME certificate of user {user}")))?;
    Ok(identity)
}

/// The certificate to encrypt to `address`: one added for it, else that of the local user who
/// owns it; usable `now`.
pub fn recipient(c: &Connection, address: &str, now: i64) -> Result<Certificate, SmimeError> {
    let address = address.trim().to_ascii_lowercase();
    let pem: Option<Vec<u8>> = c.query_row("SELECT certificate FROM smime_recipients WHERE address = ?1", [&address], |r| r.get(0)).optional()?;
    let pem = match pem {
        Some(p) => Some(p),
        None => c
            .query_row(
                "SELECT i.certificate FROM addresses a JOIN smime_identities i ON i.user_id = a.user_id WHERE a.address = ?1",
                [&address],
                |r| r.get(0),
            )
            .optional()?,
    };
    let pem = pem.ok_or_else(|| SmimeError::NoCertificate(address.clone()))?;
    let cert = Certificate::parse(&pem).map_err(|e| e.about(&format!("the S/MIME certificate of {address}")))?;
    cert.check(Purpose::Encrypt, now).map_err(|e| e.about(&format!("the S/MIME certificate of {address}")))?;
    Ok(cert)
}

fn user_addresses(c: &Connection, user_id: i64) -> Result<Vec<String>, SmimeError> {
    let mut stmt = c.prepare("SELECT lower(address) FROM addresses WHERE user_id = ?1 ORDER BY address")?;
    let rows = stmt.query_map([user_id], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, now};
    use store::{Durability, Store, StoreOptions};

    fn with_db<T: Send + 'static>(f: impl FnOnce(&Connection) -> T + Send + 'static) -> T {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        store
            .write_blocking(Durability::Normal, move |c| {
                c.execute_batch(
                    "INSERT INTO users (id, name, created_at) VALUES (1, 'sam', 0), (2, 'bob', 0);
                     INSERT INTO addresses (address, user_id) VALUES ('samjones@example.test', 1), ('sam2@example.test', 1),
                                                                     ('bob@example.test', 2);",
                )?;
                Ok(f(c))
            })
            .unwrap()
    }

    #[test]
    fn import_sign_encrypt_lookups_and_remove() {
        with_db(|c| {
            let ca = testkit::ca();
            let sam = testkit::user(&ca, Some("SamJones@example.test"), (-60, 86_400), None);
            let id = Identity::parse(&sam.cert_pem, &sam.key_pem, now()).unwrap();
            let e = import_identity(c, "nobody", &id, now()).unwrap_err().to_string();
            assert!(e.contains("no user nobody"), "{e}");
            let e = import_identity(c, "bob", &id, now()).unwrap_err().to_string();
            assert!(e.contains("no address of user bob"), "{e}");
            assert!(!import_identity(c, "SAM", &id, now()).unwrap());
            assert!(import_identity(c, "sam", &id, now()).unwrap(), "a second import replaces");

            assert!(signer(c, "samjones@EXAMPLE.test", now()).is_ok());
            let e = signer(c, "sam2@example.test", now()).err().unwrap().to_string();
            assert!(e.contains("not the From address sam2@example.test"), "{e}");
            let e = signer(c, "bob@example.test", now()).err().unwrap().to_string();
            assert!(e.contains("bob@example.test") && e.contains("smime import"), "{e}");

            // The local user's own certificate serves as a recipient's; others must be added.
            assert!(recipient(c, "SamJones@example.test", now()).is_ok());
            let e = recipient(c, "carol@remote.example", now()).unwrap_err().to_string();
            assert!(e.contains("no S/MIME certificate for recipient carol@remote.example"), "{e}");
            let carol = Certificate::parse(&testkit::user(&ca, Some("carol@remote.example"), (-60, 86_400), None).cert_pem).unwrap();
            let e = add_recipient(c, "dave@remote.example", &carol, now()).unwrap_err().to_string();
            assert!(e.contains("not dave@remote.example"), "{e}");
            assert!(!add_recipient(c, "Carol@Remote.example", &carol, now()).unwrap());
            assert!(recipient(c, "carol@remote.example", now()).is_ok());

            let listed = list(c).unwrap();
            assert_eq!(listed.iter().map(|l| (l.owner.as_str(), l.has_key)).collect::<Vec<_>>(), [("sam", true), ("carol@remote.example", false)]);
            assert_eq!(listed[0].emails, ["samjones@example.test"]);

            assert_eq!(remove(c, "CAROL@remote.example").unwrap(), 1);
            assert_eq!(remove(c, "sam").unwrap(), 1);
            assert_eq!(remove(c, "sam").unwrap(), 0);
            assert!(list(c).unwrap().is_empty());
        });
    }
}
