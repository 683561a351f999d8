//! One LDAP connection as a state machine without I/O (SPEC O5, issue 18): bytes in, [`Action`]s
//! out. BER comes from ldap3_proto's codec, used on the session's own buffer. Requests are taken
//! one at a time: while a password is checked or the book read, later requests wait in the
//! buffer, so answers go out in request order (RFC 4511 allows that; clients expect it).

use bytes::BytesMut;
use directory::address_book::AddressBook;
use ldap3_proto::LdapCodec;
use ldap3_proto::proto::{
    LdapBindCred, LdapBindResponse, LdapExtendedResponse, LdapMsg, LdapOp, LdapPartialAttribute, LdapResult, LdapResultCode, LdapSearchRequest,
    LdapSearchResultEntry, LdapSearchScope,
};
use tokio_util::codec::{Decoder, Encoder};

use crate::access::{self, BindDecision, BindName};
use crate::dn::Dn;
use crate::entries::{Entry, START_TLS_OID, Tree};
use crate::filter;

/// The OID of the notice of disconnection (RFC 4511 §4.4.1).
const NOTICE_OF_DISCONNECTION: &str = "1.3.6.1.4.1.1466.20036";

/// A request is at most this long: a search of a small office's book needs a few hundred bytes.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub tree: Tree,
    /// The connection is TLS from the start (LDAPS).
    pub tls_active: bool,
    /// StartTLS can be offered (a certificate is loaded and TLS is not up yet).
    pub starttls_available: bool,
    /// The client's address is in `[ldap] anonymous_networks`.
    pub anonymous_search: bool,
    /// `[ldap] size_limit`: entries per search at most.
    pub size_limit: usize,
}

/// What the driver must do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Write what is pending, then start TLS and call [`Session::tls_up`].
    StartTls,
    /// Check the password (throttled, A5) and call [`Session::bind_done`].
    CheckBind { name: BindName, password: String },
    /// Read the address book and call [`Session::search_done`].
    ReadBook,
    /// Write what is pending and close the connection.
    Close,
}

/// How a password check ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindOutcome {
    /// The user, by name.
    Ok(String),
    /// Wrong password, unknown or disabled user: all alike (49).
    Invalid,
    /// Too many failures lately (A5): refused without a check (51).
    Throttled,
    /// The check could not be made (store or password service trouble) (52).
    Unavailable,
}

#[derive(Debug)]
enum Waiting {
    Nothing,
    Bind(i32),
    Search(i32, Box<LdapSearchRequest>),
    Tls,
    Closed,
}

pub struct Session {
    config: SessionConfig,
    buf: BytesMut,
    codec: LdapCodec,
    waiting: Waiting,
    /// The user this connection is bound as; None while anonymous.
    bound: Option<String>,
    tls: bool,
}

impl Session {
    pub fn new(config: SessionConfig) -> Session {
        let tls = config.tls_active;
        Session { config, buf: BytesMut::new(), codec: LdapCodec::new(Some(MAX_REQUEST), None), waiting: Waiting::Nothing, bound: None, tls }
    }

    /// The user bound now, if any.
    pub fn bound(&self) -> Option<&str> {
        self.bound.as_deref()
    }

    /// Bytes from the client.
    pub fn received(&mut self, bytes: &[u8]) -> Vec<Action> {
        if matches!(self.waiting, Waiting::Closed) {
            return Vec::new();
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        self.process(&mut out);
        out
    }

    /// TLS is up after StartTLS. Bytes the client sent before the handshake were not protected
    /// and are dropped (a client must wait for the StartTLS response, RFC 4511 §4.14.2).
    pub fn tls_up(&mut self) -> Vec<Action> {
        self.tls = true;
        self.buf.clear();
        self.waiting = Waiting::Nothing;
        Vec::new()
    }

    /// The password check of the bind in progress ended.
    pub fn bind_done(&mut self, outcome: BindOutcome) -> Vec<Action> {
        let Waiting::Bind(msgid) = std::mem::replace(&mut self.waiting, Waiting::Nothing) else { return Vec::new() };
        let (code, message) = match outcome {
            BindOutcome::Ok(user) => {
                self.bound = Some(user);
                (LdapResultCode::Success, "")
            }
            BindOutcome::Invalid => (LdapResultCode::InvalidCredentials, "invalid credentials"),
            BindOutcome::Throttled => (LdapResultCode::Busy, "too many failed logins: try again later"),
            BindOutcome::Unavailable => (LdapResultCode::Unavailable, "the password cannot be checked now: try again later"),
        };
        let mut out = vec![send(msgid, LdapOp::BindResponse(LdapBindResponse { res: result(code, message), saslcreds: None }))];
        self.process(&mut out);
        out
    }

    /// The book was read for the search in progress (or could not be: None).
    pub fn search_done(&mut self, book: Option<&AddressBook>) -> Vec<Action> {
        let Waiting::Search(msgid, request) = std::mem::replace(&mut self.waiting, Waiting::Nothing) else { return Vec::new() };
        let mut out = Vec::new();
        match book {
            Some(book) => self.answer_search(msgid, &request, &self.config.tree.entries(book), &mut out),
            None => out.push(done(msgid, LdapResultCode::Unavailable, "the directory cannot be read now: try again later")),
        }
        self.process(&mut out);
        out
    }

    /// Take requests from the buffer until one needs the driver.
    fn process(&mut self, out: &mut Vec<Action>) {
        while matches!(self.waiting, Waiting::Nothing) {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(msg)) => self.request(msg, out),
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "undecodable LDAP request");
                    out.push(disconnect("the request is not LDAPv3 this server understands"));
                    out.push(Action::Close);
                    self.waiting = Waiting::Closed;
                }
            }
        }
    }

    fn request(&mut self, msg: LdapMsg, out: &mut Vec<Action>) {
        let id = msg.msgid;
        match msg.op {
            LdapOp::BindRequest(bind) => {
                // RFC 4511 §4.2.1: a bind, even a failed one, first ends the identity before it.
                self.bound = None;
                let refuse = |code, message: &str| send(id, LdapOp::BindResponse(LdapBindResponse { res: result(code, message), saslcreds: None }));
                if bind.version != 3 {
                    return out.push(refuse(LdapResultCode::ProtocolError, "only LDAPv3 is supported"));
                }
                let LdapBindCred::Simple(password) = bind.cred else {
                    return out.push(refuse(LdapResultCode::AuthMethodNotSupported, "only simple bind is supported"));
                };
                match access::decide_bind(&self.config.tree, &bind.dn, password.is_empty(), self.tls) {
                    BindDecision::Anonymous => out.push(refuse(LdapResultCode::Success, "")),
                    BindDecision::Refuse(why) => {
                        let code = match why {
                            access::BindRefusal::NeedsTls => LdapResultCode::ConfidentialityRequired,
                            access::BindRefusal::Unauthenticated => LdapResultCode::UnwillingToPerform,
                        };
                        out.push(refuse(code, why.message()));
                    }
                    BindDecision::Check(name) => {
                        self.waiting = Waiting::Bind(id);
                        out.push(Action::CheckBind { name, password });
                    }
                }
            }
            LdapOp::SearchRequest(request) => self.search(id, request, out),
            LdapOp::ExtendedRequest(ext) if ext.name == START_TLS_OID => {
                let refusal = if self.tls {
                    Some("TLS is already up")
                } else if !self.config.starttls_available {
                    Some("StartTLS is not available: no certificate")
                } else {
                    None
                };
                match refusal {
                    Some(why) => out.push(extended(id, LdapResultCode::OperationsError, why, None)),
                    None => {
                        out.push(extended(id, LdapResultCode::Success, "", Some(START_TLS_OID)));
                        out.push(Action::StartTls);
                        self.waiting = Waiting::Tls;
                    }
                }
            }
            LdapOp::ExtendedRequest(ext) => {
                out.push(extended(id, LdapResultCode::ProtocolError, &format!("extended operation {} is not supported", ext.name), None))
            }
            LdapOp::UnbindRequest => {
                out.push(Action::Close);
                self.waiting = Waiting::Closed;
            }
            // Requests run one at a time: there is never one to abandon.
            LdapOp::AbandonRequest(_) => {}
            LdapOp::AddRequest(_) => out.push(read_only(id, LdapOp::AddResponse)),
            LdapOp::ModifyRequest(_) => out.push(read_only(id, LdapOp::ModifyResponse)),
            LdapOp::DelRequest(_) => out.push(read_only(id, LdapOp::DelResponse)),
            LdapOp::ModifyDNRequest(_) => out.push(read_only(id, LdapOp::ModifyDNResponse)),
            LdapOp::CompareRequest(_) => out.push(read_only(id, LdapOp::CompareResult)),
            _ => {
                out.push(disconnect("a response is not a request"));
                out.push(Action::Close);
                self.waiting = Waiting::Closed;
            }
        }
    }

    fn search(&mut self, id: i32, request: LdapSearchRequest, out: &mut Vec<Action>) {
        let Some(base) = Dn::parse(&request.base) else {
            return out.push(done(id, LdapResultCode::InvalidDNSyntax, "the base is not a DN"));
        };
        // The root DSE is for everyone: clients read it to find the book and StartTLS.
        if base.is_root() && request.scope == LdapSearchScope::Base {
            return self.answer_search(id, &request, &[], out);
        }
        if self.bound.is_none() && !self.config.anonymous_search {
            let why = "anonymous search is not allowed from this address ([ldap] anonymous_networks): bind with your address and password";
            return out.push(done(id, LdapResultCode::InsufficentAccessRights, why));
        }
        self.waiting = Waiting::Search(id, Box::new(request));
        out.push(Action::ReadBook);
    }

    /// Send the entries of `tree` the request selects, then its result.
    fn answer_search(&self, id: i32, request: &LdapSearchRequest, tree: &[Entry], out: &mut Vec<Action>) {
        let base = Dn::parse(&request.base).unwrap_or(Dn(Vec::new()));
        let root_dse;
        let candidates: Vec<&Entry> = if base.is_root() && request.scope == LdapSearchScope::Base {
            root_dse = self.config.tree.root_dse();
            vec![&root_dse]
        } else {
            let parsed: Vec<(Dn, &Entry)> = tree.iter().filter_map(|e| Some((Dn::parse(&e.dn)?, e))).collect();
            if !base.is_root() && !parsed.iter().any(|(dn, _)| *dn == base) {
                let tree_base = self.config.tree.base_dn();
                let matched = if base.is_within(&tree_base) { self.config.tree.base.clone() } else { String::new() };
                let res = LdapResult { code: LdapResultCode::NoSuchObject, matcheddn: matched, message: "no such entry".into(), referral: vec![] };
                return out.push(send(id, LdapOp::SearchResultDone(res)));
            }
            parsed
                .into_iter()
                .filter(|(dn, _)| match request.scope {
                    LdapSearchScope::Base => *dn == base,
                    LdapSearchScope::OneLevel => dn.parent().as_ref() == Some(&base),
                    LdapSearchScope::Subtree => dn.is_within(&base),
                    LdapSearchScope::Children => dn.is_within(&base) && *dn != base,
                })
                .map(|(_, e)| e)
                .collect()
        };
        let limit = match usize::try_from(request.sizelimit) {
            Ok(asked) if asked > 0 => asked.min(self.config.size_limit),
            _ => self.config.size_limit,
        };
        let matching = candidates.into_iter().filter(|e| filter::matches(&request.filter, e) == Some(true));
        for (sent, entry) in matching.enumerate() {
            if sent == limit {
                let why = format!("more than {limit} entries match: narrow the search");
                return out.push(done(id, LdapResultCode::SizeLimitExceeded, &why));
            }
            out.push(send(id, LdapOp::SearchResultEntry(selected(entry, &request.attrs, request.typesonly))));
        }
        out.push(done(id, LdapResultCode::Success, ""));
    }
}

/// The attributes of `entry` the request asks for (RFC 4511 §4.5.1.8): none listed or `*` is
/// all, `1.1` alone is none; other names pick (any case, RFC 4519's long names too).
fn selected(entry: &Entry, wanted: &[String], types_only: bool) -> LdapSearchResultEntry {
    let wanted: Vec<String> = wanted.iter().map(|w| w.to_ascii_lowercase()).collect();
    let all = wanted.is_empty() || wanted.iter().any(|w| w == "*") || (entry.dn.is_empty() && wanted.iter().any(|w| w == "+"));
    let alias = |w: &str| match w {
        "commonname" => "cn".to_string(),
        "surname" => "sn".to_string(),
        "gn" => "givenname".to_string(),
        other => other.to_string(),
    };
    let wanted: Vec<String> = wanted.iter().map(|w| alias(w)).collect();
    let attributes = entry
        .attrs
        .iter()
        .filter(|(name, _)| all || wanted.iter().any(|w| name.eq_ignore_ascii_case(w)))
        .map(|(name, values)| LdapPartialAttribute {
            atype: name.to_string(),
            vals: if types_only { Vec::new() } else { values.iter().map(|v| v.as_bytes().to_vec()).collect() },
        })
        .collect();
    LdapSearchResultEntry { dn: entry.dn.clone(), attributes }
}

fn result(code: LdapResultCode, message: &str) -> LdapResult {
    LdapResult { code, matcheddn: String::new(), message: message.to_string(), referral: vec![] }
}

fn done(id: i32, code: LdapResultCode, message: &str) -> Action {
    send(id, LdapOp::SearchResultDone(result(code, message)))
}

fn read_only(id: i32, response: fn(LdapResult) -> LdapOp) -> Action {
    send(id, response(result(LdapResultCode::UnwillingToPerform, "the address book is read-only")))
}

fn extended(id: i32, code: LdapResultCode, message: &str, name: Option<&str>) -> Action {
    send(id, LdapOp::ExtendedResponse(LdapExtendedResponse { res: result(code, message), name: name.map(Into::into), value: None }))
}

fn disconnect(message: &str) -> Action {
    extended(0, LdapResultCode::ProtocolError, message, Some(NOTICE_OF_DISCONNECTION))
}

fn send(msgid: i32, op: LdapOp) -> Action {
    let mut buf = BytesMut::new();
    match LdapCodec::default().encode(LdapMsg { msgid, op, ctrl: vec![] }, &mut buf) {
        Ok(()) => Action::Send(buf.to_vec()),
        // Only an I/O error of the buffer could end here; a BytesMut has none.
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an LDAP response");
            Action::Close
        }
    }
}

/// The bytes of a notice of disconnection (RFC 4511 §4.4.1): what a client reads when the
/// server closes on it (full session pool, shutdown, idle).
pub fn notice_of_disconnection(message: &str) -> Vec<u8> {
    match extended(0, LdapResultCode::Unavailable, message, Some(NOTICE_OF_DISCONNECTION)) {
        Action::Send(bytes) => bytes,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use directory::address_book::{Group, Person};
    use ldap3_proto::parse_ldap_filter_str;
    use ldap3_proto::proto::{LdapBindRequest, LdapDerefAliases, LdapExtendedRequest};

    fn config(tls: bool, anonymous_search: bool) -> SessionConfig {
        SessionConfig { tree: Tree::new("example.test"), tls_active: tls, starttls_available: true, anonymous_search, size_limit: 500 }
    }

    fn book() -> AddressBook {
        let person = |name: &str, display: &str, addresses: &[&str]| Person {
            name: name.into(),
            display_name: Some(display.into()),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
        };
        AddressBook {
            people: vec![
                person("ann", "Ann Smithers", &["ann@example.test"]),
                person("bob", "Bob Jones", &["bob@example.test"]),
                person("sam", "Sam Smith", &["sam@example.test", "s.smith@example.test"]),
            ],
            groups: vec![Group { address: "staff@example.test".into(), targets: vec!["sam@example.test".into(), "bob@example.test".into()] }],
        }
    }

    /// The bytes a client sends for `op`.
    fn wire(msgid: i32, op: LdapOp) -> Vec<u8> {
        let mut buf = BytesMut::new();
        LdapCodec::default().encode(LdapMsg { msgid, op, ctrl: vec![] }, &mut buf).unwrap();
        buf.to_vec()
    }

    fn bind(msgid: i32, dn: &str, password: &str) -> Vec<u8> {
        wire(msgid, LdapOp::BindRequest(LdapBindRequest { version: 3, dn: dn.into(), cred: LdapBindCred::Simple(password.into()) }))
    }

    fn search(msgid: i32, base: &str, scope: LdapSearchScope, filter: &str, attrs: &[&str], sizelimit: i32) -> Vec<u8> {
        wire(
            msgid,
            LdapOp::SearchRequest(LdapSearchRequest {
                base: base.into(),
                scope,
                aliases: LdapDerefAliases::Never,
                sizelimit,
                timelimit: 0,
                typesonly: false,
                filter: parse_ldap_filter_str(filter).unwrap(),
                attrs: attrs.iter().map(|a| a.to_string()).collect(),
            }),
        )
    }

    /// The responses in `actions`, decoded as a client would.
    fn responses(actions: &[Action]) -> Vec<LdapOp> {
        let mut buf = BytesMut::new();
        for a in actions {
            if let Action::Send(bytes) = a {
                buf.extend_from_slice(bytes);
            }
        }
        let mut codec = LdapCodec::default();
        let mut out = Vec::new();
        while let Some(msg) = codec.decode(&mut buf).unwrap() {
            out.push(msg.op);
        }
        out
    }

    fn code_of(op: &LdapOp) -> LdapResultCode {
        match op {
            LdapOp::BindResponse(r) => r.res.code.clone(),
            LdapOp::SearchResultDone(r) | LdapOp::AddResponse(r) | LdapOp::CompareResult(r) => r.code.clone(),
            LdapOp::ExtendedResponse(r) => r.res.code.clone(),
            other => panic!("not a result: {other:?}"),
        }
    }

    /// A received entry: its DN and its (attribute, values) pairs.
    type Received = (String, Vec<(String, Vec<String>)>);

    fn entries(ops: &[LdapOp]) -> Vec<Received> {
        ops.iter()
            .filter_map(|op| match op {
                LdapOp::SearchResultEntry(e) => Some((
                    e.dn.clone(),
                    e.attributes
                        .iter()
                        .map(|a| (a.atype.clone(), a.vals.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect()))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Bind as sam over TLS, the driver saying yes.
    fn bound_session() -> Session {
        let mut s = Session::new(config(true, false));
        let actions = s.received(&bind(1, "uid=sam,ou=people,dc=example,dc=test", "secret"));
        assert_eq!(actions, [Action::CheckBind { name: BindName::User("sam".into()), password: "secret".into() }]);
        let ops = responses(&s.bind_done(BindOutcome::Ok("sam".into())));
        assert_eq!(code_of(&ops[0]), LdapResultCode::Success);
        assert_eq!(s.bound(), Some("sam"));
        s
    }

    #[test]
    fn thunderbird_search_after_bind() {
        let mut s = bound_session();
        let filter = "(|(cn=*smi*)(mail=*smi*)(sn=*smi*)(givenName=*smi*))";
        let actions = s.received(&search(2, "dc=example,dc=test", LdapSearchScope::Subtree, filter, &["cn", "mail"], 0));
        assert_eq!(actions, [Action::ReadBook]);
        let ops = responses(&s.search_done(Some(&book())));
        let found = entries(&ops);
        assert_eq!(
            found.iter().map(|(dn, _)| dn.as_str()).collect::<Vec<_>>(),
            ["uid=ann,ou=people,dc=example,dc=test", "uid=sam,ou=people,dc=example,dc=test"]
        );
        assert_eq!(
            found[1].1,
            [
                ("cn".to_string(), vec!["Sam Smith".to_string()]),
                ("mail".to_string(), vec!["sam@example.test".to_string(), "s.smith@example.test".to_string()])
            ]
        );
        assert_eq!(code_of(ops.last().unwrap()), LdapResultCode::Success);
    }

    #[test]
    fn a_password_without_tls_is_refused_before_any_check() {
        let mut s = Session::new(config(false, false));
        let ops = responses(&s.received(&bind(1, "sam@example.test", "secret")));
        assert_eq!(code_of(&ops[0]), LdapResultCode::ConfidentialityRequired);
        assert_eq!(s.bound(), None);
    }

    #[test]
    fn starttls_then_bind() {
        let mut s = Session::new(config(false, false));
        let ext = wire(1, LdapOp::ExtendedRequest(LdapExtendedRequest { name: START_TLS_OID.into(), value: None }));
        let actions = s.received(&ext);
        assert_eq!(actions.last(), Some(&Action::StartTls));
        assert_eq!(code_of(&responses(&actions)[0]), LdapResultCode::Success);
        // Nothing is read until TLS is up.
        assert!(s.received(&bind(2, "sam@example.test", "secret")).is_empty());
        s.tls_up();
        let actions = s.received(&bind(3, "sam@example.test", "secret"));
        assert_eq!(actions, [Action::CheckBind { name: BindName::Address("sam@example.test".into()), password: "secret".into() }]);
        let ops = responses(&s.bind_done(BindOutcome::Invalid));
        assert_eq!(code_of(&ops[0]), LdapResultCode::InvalidCredentials);
        let ops = responses(&s.received(&wire(4, LdapOp::ExtendedRequest(LdapExtendedRequest { name: START_TLS_OID.into(), value: None }))));
        assert_eq!(code_of(&ops[0]), LdapResultCode::OperationsError, "TLS twice");
    }

    #[test]
    fn anonymous_search_needs_a_listed_network_but_the_root_dse_does_not() {
        let mut s = Session::new(config(false, false));
        assert_eq!(code_of(&responses(&s.received(&bind(1, "", "")))[0]), LdapResultCode::Success);
        let ops = responses(&s.received(&search(2, "dc=example,dc=test", LdapSearchScope::Subtree, "(objectClass=*)", &[], 0)));
        assert_eq!(code_of(&ops[0]), LdapResultCode::InsufficentAccessRights);
        let ops = responses(&s.received(&search(3, "", LdapSearchScope::Base, "(objectClass=*)", &["+"], 0)));
        let root = entries(&ops);
        assert_eq!(root[0].0, "");
        assert!(root[0].1.contains(&("namingContexts".into(), vec!["dc=example,dc=test".into()])));
        assert!(root[0].1.contains(&("supportedExtension".into(), vec![START_TLS_OID.into()])));
        assert!(root[0].1.contains(&("supportedLDAPVersion".into(), vec!["3".into()])));

        let mut listed = Session::new(config(false, true));
        assert_eq!(listed.received(&search(1, "ou=people,dc=example,dc=test", LdapSearchScope::OneLevel, "(uid=bob)", &[], 0)), [Action::ReadBook]);
        let ops = responses(&listed.search_done(Some(&book())));
        assert_eq!(entries(&ops).len(), 1);
    }

    #[test]
    fn size_limit_sends_that_many_then_says_so() {
        let mut s = bound_session();
        s.config.size_limit = 2;
        s.received(&search(2, "ou=people,dc=example,dc=test", LdapSearchScope::OneLevel, "(objectClass=*)", &["1.1"], 0));
        let ops = responses(&s.search_done(Some(&book())));
        assert_eq!(entries(&ops).len(), 2);
        assert!(entries(&ops).iter().all(|(_, attrs)| attrs.is_empty()), "1.1 asks for no attributes");
        assert_eq!(code_of(ops.last().unwrap()), LdapResultCode::SizeLimitExceeded);
        // The client's own smaller limit counts too; exactly the limit is no excess.
        s.received(&search(3, "dc=example,dc=test", LdapSearchScope::Subtree, "(uid=*)", &[], 1));
        let ops = responses(&s.search_done(Some(&book())));
        assert_eq!(code_of(ops.last().unwrap()), LdapResultCode::SizeLimitExceeded);
        s.received(&search(4, "dc=example,dc=test", LdapSearchScope::Subtree, "(uid=sam)", &[], 1));
        assert_eq!(code_of(responses(&s.search_done(Some(&book()))).last().unwrap()), LdapResultCode::Success);
    }

    #[test]
    fn scopes_and_missing_bases() {
        let mut s = bound_session();
        s.received(&search(2, "cn=staff,ou=groups,dc=example,dc=test", LdapSearchScope::Base, "(objectClass=groupOfNames)", &[], 0));
        let group = entries(&responses(&s.search_done(Some(&book()))));
        assert_eq!(
            group[0].1.iter().find(|(a, _)| a == "member").unwrap().1,
            ["uid=sam,ou=people,dc=example,dc=test", "uid=bob,ou=people,dc=example,dc=test"]
        );
        s.received(&search(3, "uid=nobody,ou=people,dc=example,dc=test", LdapSearchScope::Base, "(objectClass=*)", &[], 0));
        let ops = responses(&s.search_done(Some(&book())));
        assert!(matches!(&ops[0], LdapOp::SearchResultDone(r) if r.code == LdapResultCode::NoSuchObject && r.matcheddn == "dc=example,dc=test"));
        let ops = responses(&s.received(&search(4, "not a dn", LdapSearchScope::Base, "(objectClass=*)", &[], 0)));
        assert_eq!(code_of(&ops[0]), LdapResultCode::InvalidDNSyntax);
        s.received(&search(5, "dc=example,dc=test", LdapSearchScope::OneLevel, "(objectClass=*)", &["ou"], 0));
        let units = entries(&responses(&s.search_done(Some(&book()))));
        assert_eq!(units.iter().map(|(dn, _)| dn.as_str()).collect::<Vec<_>>(), ["ou=people,dc=example,dc=test", "ou=groups,dc=example,dc=test"]);
    }

    #[test]
    fn requests_wait_while_a_bind_is_checked_and_writes_are_refused() {
        let mut s = Session::new(config(true, false));
        let mut bytes = bind(1, "uid=sam,ou=people,dc=example,dc=test", "secret");
        bytes.extend(wire(2, LdapOp::DelRequest("uid=bob,ou=people,dc=example,dc=test".into())));
        bytes.extend(wire(3, LdapOp::UnbindRequest));
        assert_eq!(s.received(&bytes).len(), 1, "only the bind so far");
        let actions = s.bind_done(BindOutcome::Throttled);
        let ops = responses(&actions);
        assert_eq!(code_of(&ops[0]), LdapResultCode::Busy);
        assert!(matches!(&ops[1], LdapOp::DelResponse(r) if r.code == LdapResultCode::UnwillingToPerform));
        assert_eq!(actions.last(), Some(&Action::Close));
    }

    #[test]
    fn garbage_gets_a_notice_and_the_door() {
        let mut s = Session::new(config(false, false));
        let mut http = b"GET / HTTP/1.1\r\nHost: example.test\r\n".to_vec();
        http.resize(200, b'x');
        let actions = s.received(&http);
        assert_eq!(actions.last(), Some(&Action::Close));
        assert!(matches!(&responses(&actions)[0], LdapOp::ExtendedResponse(r) if r.name.as_deref() == Some(NOTICE_OF_DISCONNECTION)));
        assert!(s.received(&bind(1, "", "")).is_empty());
    }

    #[test]
    fn unauthenticated_and_sasl_binds_are_refused() {
        let mut s = Session::new(config(true, false));
        let ops = responses(&s.received(&bind(1, "uid=sam,ou=people,dc=example,dc=test", "")));
        assert_eq!(code_of(&ops[0]), LdapResultCode::UnwillingToPerform);
        let sasl = LdapBindCred::SASL(ldap3_proto::proto::SaslCredentials { mechanism: "EXTERNAL".into(), credentials: vec![] });
        let ops = responses(&s.received(&wire(2, LdapOp::BindRequest(LdapBindRequest { version: 3, dn: String::new(), cred: sasl }))));
        assert_eq!(code_of(&ops[0]), LdapResultCode::AuthMethodNotSupported);
    }
}
