//! Who may bind and who may search (SPEC O5, issue 18; RFC 4513). Pure decisions; the driver
//! checks passwords and reads the store.
//!
//! - A simple bind with a password needs TLS (LDAPS or StartTLS): over a plain connection it is
//!   refused with confidentialityRequired (13), before the password is looked at (RFC 4513 §6.3.1).
//! - The bind name is the user's DN (`uid=NAME,ou=people,<base>`) or one of their addresses.
//! - A name with an empty password is the "unauthenticated" bind of RFC 4513 §5.1.2, which a
//!   careless client sends for a forgotten password: refused with unwillingToPerform (53), never
//!   taken as a login. An empty name with an empty password is the anonymous bind (§5.1.1).
//! - Anonymous clients may read the root DSE (RFC 4512 §5.1: clients discover StartTLS there
//!   before binding); they search the book only from `[ldap] anonymous_networks`. Elsewhere the
//!   search is refused with insufficientAccessRights (50) rather than answered with nothing: an
//!   empty result would look like an empty office, while 50 tells the user to bind.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::dn::Dn;
use crate::entries::Tree;

/// Who a bind names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindName {
    /// `uid=NAME,ou=people,<base>`.
    User(String),
    /// One of a user's addresses; the driver finds whose.
    Address(String),
    /// Neither (another tree, another kind of entry): it fails like a wrong password, after the
    /// same throttling, so names cannot be probed faster than passwords.
    Unknown(String),
}

/// What to do with a simple bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindDecision {
    /// Anonymous: the session becomes (or stays) anonymous.
    Anonymous,
    /// Check this password for this name (throttled, A5).
    Check(BindName),
    /// Refused without checking: the result code and the message for the client.
    Refuse(BindRefusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindRefusal {
    /// 13: a password over a connection without TLS.
    NeedsTls,
    /// 53: a name without a password (RFC 4513 §5.1.2).
    Unauthenticated,
}

impl BindRefusal {
    pub fn message(self) -> &'static str {
        match self {
            BindRefusal::NeedsTls => "a password needs TLS: use ldaps:// or StartTLS (ldapsearch -ZZ)",
            BindRefusal::Unauthenticated => "a bind name without a password is refused (RFC 4513 5.1.2): give the password",
        }
    }
}

/// Decide a simple bind of `name` with a password that is empty or not.
pub fn decide_bind(tree: &Tree, name: &str, password_empty: bool, tls: bool) -> BindDecision {
    let name = name.trim();
    match (name.is_empty(), password_empty) {
        (true, true) => return BindDecision::Anonymous,
        (false, true) => return BindDecision::Refuse(BindRefusal::Unauthenticated),
        _ if !tls => return BindDecision::Refuse(BindRefusal::NeedsTls),
        _ => {}
    }
    if !name.contains('=') && name.contains('@') {
        return BindDecision::Check(BindName::Address(name.to_string()));
    }
    match Dn::parse(name).as_ref().and_then(|dn| dn.leaf_under("uid", &tree.people_dn())) {
        Some(user) => BindDecision::Check(BindName::User(user.to_string())),
        None => BindDecision::Check(BindName::Unknown(name.to_string())),
    }
}

/// May a client that is not bound search the book from `ip`?
pub fn anonymous_may_search(ip: IpAddr, networks: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    networks.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Tree {
        Tree::new("example.test")
    }

    #[test]
    fn binds_by_dn_or_address_over_tls_only() {
        let t = tree();
        let user = |n: &str| BindDecision::Check(BindName::User(n.into()));
        assert_eq!(decide_bind(&t, "uid=sam,ou=people,dc=example,dc=test", false, true), user("sam"));
        assert_eq!(decide_bind(&t, "UID=Sam, OU=People, DC=Example, DC=Test", false, true), user("sam"));
        assert_eq!(decide_bind(&t, "Sam@Example.test", false, true), BindDecision::Check(BindName::Address("Sam@Example.test".into())));
        assert_eq!(decide_bind(&t, "uid=sam,ou=people,dc=example,dc=test", false, false), BindDecision::Refuse(BindRefusal::NeedsTls));
        assert_eq!(decide_bind(&t, "sam@example.test", false, false), BindDecision::Refuse(BindRefusal::NeedsTls));
    }

    #[test]
    fn anonymous_and_unauthenticated_binds() {
        let t = tree();
        assert_eq!(decide_bind(&t, "", true, false), BindDecision::Anonymous);
        assert_eq!(decide_bind(&t, "uid=sam,ou=people,dc=example,dc=test", true, true), BindDecision::Refuse(BindRefusal::Unauthenticated));
        // An empty name with a password is neither: no user has the empty name.
        assert_eq!(decide_bind(&t, "", false, true), BindDecision::Check(BindName::Unknown(String::new())));
    }

    #[test]
    fn other_names_fail_like_a_wrong_password() {
        let t = tree();
        for name in ["cn=admin,dc=example,dc=test", "uid=sam,ou=people,dc=other,dc=test", "uid=sam,dc=example,dc=test", "sam"] {
            assert_eq!(decide_bind(&t, name, false, true), BindDecision::Check(BindName::Unknown(name.into())), "{name}");
        }
    }

    #[test]
    fn anonymous_search_only_from_listed_networks() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
        assert!(anonymous_may_search("127.0.0.1".parse().unwrap(), &nets));
        assert!(anonymous_may_search("::ffff:127.0.0.1".parse().unwrap(), &nets));
        assert!(anonymous_may_search("2001:db8::5".parse().unwrap(), &nets));
        assert!(!anonymous_may_search("192.0.2.1".parse().unwrap(), &nets));
        assert!(!anonymous_may_search("127.0.0.1".parse().unwrap(), &[]));
    }
}
