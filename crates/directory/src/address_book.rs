//! What the public address book publishes (SPEC O5, issue 18): the enabled users with their
//! full names and addresses, and the groups of the alias table. Read inside one store read, so a
//! search sees one consistent picture; the LDAP server reads it again for every search.

use rusqlite::{Connection, OptionalExtension};

/// One user as the address book shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Person {
    pub name: String,
    /// `postroom user add/set --name`; None when not set.
    pub display_name: Option<String>,
    /// The preferred address first, as stored (lowercase).
    pub addresses: Vec<String>,
}

/// One alias of the alias table: an address standing for others (F7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The alias, as stored (lowercase).
    pub address: String,
    /// Its targets, as the administrator gave them (any case; local or remote).
    pub targets: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressBook {
    /// Sorted by user name.
    pub people: Vec<Person>,
    /// Sorted by address.
    pub groups: Vec<Group>,
}

/// The whole book. Disabled and removed users are left out (they are not in the office's
/// address book, and cannot bind either); so are catch-alls (`*@domain` is no one's address).
pub fn read(c: &Connection) -> rusqlite::Result<AddressBook> {
    let mut people: Vec<(i64, Person)> = Vec::new();
    let mut stmt = c.prepare_cached("SELECT id, name, display_name FROM users WHERE enabled AND NOT removed ORDER BY name")?;
    for row in stmt.query_map([], |r| Ok((r.get(0)?, Person { name: r.get(1)?, display_name: r.get(2)?, addresses: Vec::new() })))? {
        people.push(row?);
    }
    let mut stmt = c.prepare_cached(
        "SELECT a.user_id, a.address FROM addresses a JOIN users u ON u.id = a.user_id \
         WHERE u.enabled AND NOT u.removed ORDER BY a.user_id, a.preferred DESC, a.address",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
    let index: std::collections::HashMap<i64, usize> = people.iter().enumerate().map(|(i, (id, _))| (*id, i)).collect();
    for row in rows {
        let (id, address) = row?;
        if let Some(&i) = index.get(&id) {
            people[i].1.addresses.push(address);
        }
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut stmt = c.prepare_cached("SELECT address, target FROM aliases WHERE address NOT LIKE '*@%' ORDER BY address, target")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (address, target) = row?;
        match groups.last_mut() {
            Some(g) if g.address == address => g.targets.push(target),
            _ => groups.push(Group { address, targets: vec![target] }),
        }
    }
    Ok(AddressBook { people: people.into_iter().map(|(_, p)| p).collect(), groups })
}

/// The user who owns `address` (any case), for a bind by address; None when no user has it.
pub fn user_of_address(c: &Connection, address: &str) -> rusqlite::Result<Option<String>> {
    c.prepare_cached("SELECT u.name FROM addresses a JOIN users u ON u.id = a.user_id WHERE a.address = ?1")?
        .query_row([address.trim()], |r| r.get(0))
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalDomains;
    use crate::admin::Admin;
    use store::Store;

    #[test]
    fn the_book_lists_enabled_users_and_aliases_but_no_catch_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), store::StoreOptions::default()).unwrap();
        let domains = LocalDomains::new(&["example.test".into()], "admin@example.test");
        let admin = Admin { store: &store, domains: &domains };
        admin.add_named_user("sam", Some("  Sam Smith "), &["sam@example.test".into(), "s.smith@example.test".into()], None).unwrap();
        admin.add_user("bob", &["bob@example.test".into()], None).unwrap();
        admin.add_user("gone", &["gone@example.test".into()], None).unwrap();
        admin.set_enabled("gone", false).unwrap();
        admin.add_alias("staff@example.test", &["sam@example.test".into(), "far@remote.example".into()]).unwrap();
        admin.add_alias("*@example.test", &["bob@example.test".into()]).unwrap();
        assert!(admin.set_display_name("bob", "Bob\nBcc: x").is_err());

        let book = store.read_blocking(|c| Ok(read(c)?)).unwrap();
        let names: Vec<_> = book.people.iter().map(|p| (p.name.as_str(), p.display_name.as_deref())).collect();
        assert_eq!(names, [("bob", None), ("sam", Some("Sam Smith"))]);
        assert_eq!(book.people[1].addresses, ["sam@example.test", "s.smith@example.test"]);
        assert_eq!(
            book.groups,
            [Group { address: "staff@example.test".into(), targets: vec!["far@remote.example".into(), "sam@example.test".into()] }]
        );
        let owner = store.read_blocking(|c| Ok(user_of_address(c, "S.Smith@Example.test")?)).unwrap();
        assert_eq!(owner.as_deref(), Some("sam"));
    }
}
