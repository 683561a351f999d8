//! The entries of the address book (SPEC O5, issue 18), built from the directory's
//! [`AddressBook`]: the base, `ou=people` with one inetOrgPerson per enabled user, `ou=groups`
//! with one groupOfNames per alias, and the root DSE clients read before anything else.

use directory::address_book::{AddressBook, Person};

use crate::dn::{self, Dn};

/// One entry: its DN as sent, and its attributes (type as sent, values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub dn: String,
    pub attrs: Vec<(&'static str, Vec<String>)>,
}

impl Entry {
    /// The values of `attr` (any case); empty when the entry has none.
    pub fn values(&self, attr: &str) -> &[String] {
        self.attrs.iter().find(|(name, _)| name.eq_ignore_ascii_case(attr)).map_or(&[], |(_, v)| v.as_slice())
    }
}

/// The OID of the StartTLS extended operation (RFC 4511 §4.14.1).
pub const START_TLS_OID: &str = "1.3.6.1.4.1.1466.20037";

/// The address book's tree for one base DN.
#[derive(Clone, Debug)]
pub struct Tree {
    /// As sent: `dc=example,dc=test`.
    pub base: String,
    /// The first local domain: a group of it is named by its local part alone.
    pub domain: String,
}

impl Tree {
    /// The tree of the first local domain.
    pub fn new(domain: &str) -> Tree {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        Tree { base: dn::base_of_domain(&domain), domain }
    }

    pub fn base_dn(&self) -> Dn {
        Dn::parse(&self.base).expect("a base built from a domain is a DN")
    }

    pub fn people_dn(&self) -> Dn {
        Dn::parse(&format!("ou=people,{}", self.base)).expect("a DN")
    }

    /// `uid=NAME,ou=people,<base>`.
    pub fn person_dn(&self, user: &str) -> String {
        format!("uid={},ou=people,{}", dn::escape(user), self.base)
    }

    /// `cn=GROUP,ou=groups,<base>`: an alias of the first local domain is named by its local
    /// part (`staff`), one of another local domain by the whole address (`staff@second.test`),
    /// so two domains' `staff` never share a name.
    pub fn group_cn(&self, alias: &str) -> String {
        match alias.rsplit_once('@') {
            Some((local, domain)) if domain.eq_ignore_ascii_case(&self.domain) => local.to_string(),
            _ => alias.to_string(),
        }
    }

    pub fn group_dn(&self, alias: &str) -> String {
        format!("cn={},ou=groups,{}", dn::escape(&self.group_cn(alias)), self.base)
    }

    /// Every entry below and including the base, in tree order (parents first).
    pub fn entries(&self, book: &AddressBook) -> Vec<Entry> {
        let label = self.domain.split('.').next().unwrap_or_default().to_string();
        let mut out = vec![
            Entry {
                dn: self.base.clone(),
                attrs: vec![("objectClass", strings(&["top", "dcObject", "organization"])), ("dc", vec![label]), ("o", vec![self.domain.clone()])],
            },
            unit(&format!("ou=people,{}", self.base), "people"),
            unit(&format!("ou=groups,{}", self.base), "groups"),
        ];
        out.extend(book.people.iter().map(|p| self.person(p)));
        // A target that is a listed user's address or another group is a member by DN;
        // outside addresses have no entry to point to and are left out.
        let owner = |target: &str| {
            let t = target.to_ascii_lowercase();
            book.people.iter().find(|p| p.addresses.contains(&t)).map(|p| self.person_dn(&p.name))
        };
        for group in &book.groups {
            let mut members: Vec<String> = Vec::new();
            for target in &group.targets {
                let member = owner(target).or_else(|| {
                    let t = target.to_ascii_lowercase();
                    book.groups.iter().any(|g| g.address == t).then(|| self.group_dn(&t))
                });
                if let Some(m) = member.filter(|m| !members.contains(m)) {
                    members.push(m);
                }
            }
            let mut attrs = vec![
                ("objectClass", strings(&["top", "groupOfNames"])),
                ("cn", vec![self.group_cn(&group.address)]),
                ("mail", vec![group.address.clone()]),
            ];
            if !members.is_empty() {
                attrs.push(("member", members));
            }
            out.push(Entry { dn: self.group_dn(&group.address), attrs });
        }
        out
    }

    /// A user's inetOrgPerson entry. cn and displayName are the full name (the user name when
    /// none is set); sn is its last word and givenName the words before it, which is right for
    /// most Western names and harmless for others, as the full name is searched too.
    fn person(&self, p: &Person) -> Entry {
        let full = p.display_name.clone().unwrap_or_else(|| p.name.clone());
        let (given, surname) = match full.trim().rsplit_once(char::is_whitespace) {
            Some((given, last)) => (Some(given.trim().to_string()), last.to_string()),
            None => (None, full.clone()),
        };
        let mut attrs = vec![
            ("objectClass", strings(&["top", "person", "organizationalPerson", "inetOrgPerson"])),
            ("uid", vec![p.name.clone()]),
            ("cn", vec![full.clone()]),
            ("sn", vec![surname]),
        ];
        if let Some(given) = given {
            attrs.push(("givenName", vec![given]));
        }
        attrs.push(("displayName", vec![full]));
        if !p.addresses.is_empty() {
            attrs.push(("mail", p.addresses.clone()));
        }
        Entry { dn: self.person_dn(&p.name), attrs }
    }

    /// The root DSE (RFC 4512 §5.1): what clients ask before binding — where the book is, and
    /// that StartTLS is there.
    pub fn root_dse(&self) -> Entry {
        Entry {
            dn: String::new(),
            attrs: vec![
                ("objectClass", strings(&["top"])),
                ("namingContexts", vec![self.base.clone()]),
                ("supportedLDAPVersion", strings(&["3"])),
                ("supportedExtension", strings(&[START_TLS_OID])),
                ("supportedSASLMechanisms", Vec::new()),
                ("vendorName", strings(&["Postroom"])),
            ],
        }
    }
}

fn unit(dn: &str, ou: &str) -> Entry {
    Entry { dn: dn.to_string(), attrs: vec![("objectClass", strings(&["top", "organizationalUnit"])), ("ou", vec![ou.to_string()])] }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use directory::address_book::Group;

    pub(crate) fn book() -> AddressBook {
        let person = |name: &str, display: Option<&str>, addresses: &[&str]| Person {
            name: name.into(),
            display_name: display.map(Into::into),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
        };
        AddressBook {
            people: vec![
                person("bob", None, &["bob@example.test"]),
                person("sam", Some("Sam van der Smith"), &["sam@example.test", "s.smith@second.test"]),
            ],
            groups: vec![
                Group { address: "all@second.test".into(), targets: vec!["staff@example.test".into(), "bob@example.test".into()] },
                Group { address: "staff@example.test".into(), targets: vec!["Sam@Example.Test".into(), "far@remote.example".into()] },
            ],
        }
    }

    #[test]
    fn people_have_names_and_every_address() {
        let tree = Tree::new("Example.Test.");
        let entries = tree.entries(&book());
        let sam = entries.iter().find(|e| e.dn == "uid=sam,ou=people,dc=example,dc=test").expect("sam");
        assert_eq!(sam.values("CN"), ["Sam van der Smith"]);
        assert_eq!(sam.values("sn"), ["Smith"]);
        assert_eq!(sam.values("givenname"), ["Sam van der"]);
        assert_eq!(sam.values("mail"), ["sam@example.test", "s.smith@second.test"]);
        let bob = entries.iter().find(|e| e.dn.starts_with("uid=bob,")).expect("bob");
        assert_eq!((bob.values("cn"), bob.values("sn"), bob.values("givenName")), (&["bob".to_string()][..], &["bob".to_string()][..], &[][..]));
    }

    #[test]
    fn groups_name_local_members_by_dn() {
        let tree = Tree::new("example.test");
        let entries = tree.entries(&book());
        let staff = entries.iter().find(|e| e.dn == "cn=staff,ou=groups,dc=example,dc=test").expect("staff");
        assert_eq!(staff.values("member"), ["uid=sam,ou=people,dc=example,dc=test"]);
        assert_eq!(staff.values("mail"), ["staff@example.test"]);
        let all = entries.iter().find(|e| e.values("mail") == ["all@second.test"]).expect("all");
        assert_eq!(all.dn, "cn=all@second.test,ou=groups,dc=example,dc=test");
        assert_eq!(all.values("member"), ["cn=staff,ou=groups,dc=example,dc=test", "uid=bob,ou=people,dc=example,dc=test"]);
        // Every DN we send parses back and sits under the base.
        for e in &entries {
            assert!(Dn::parse(&e.dn).unwrap().is_within(&tree.base_dn()), "{}", e.dn);
        }
    }
}
