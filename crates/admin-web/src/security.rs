//! Sessions, CSRF tokens, the session cookie and the headers every answer carries (E6). No I/O:
//! the clock is passed in where expiry is decided, so the rules are tested without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The session cookie's name. The `__Host-` prefix makes the browser refuse it unless it is
/// Secure, has Path=/ and no Domain: no other host or path can plant or shadow it.
pub const COOKIE: &str = "__Host-postroom";

/// Nothing but our own stylesheet and our own forms: no script, no inline style, no frames.
/// A message's text shown in a page can therefore not run anything, whatever it contains.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Sent with every answer, pages and errors alike.
pub const HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    // Pages show mail and users: nothing is kept by the browser or a proxy.
    ("cache-control", "no-store"),
];

/// Sessions at once; past it the longest idle one ends (one office has few administrators,
/// and a flood of logins must not grow the table).
const MAX_SESSIONS: usize = 64;

/// 256 random bits as 64 hex digits: a session token or a CSRF token.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random number generator");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compare two tokens in time that does not depend on where they differ.
pub fn tokens_match(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    if a.len() != b.len() || a.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a request with a live session knows about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionView {
    /// The administrator's user name (journaled with every change).
    pub user: String,
    /// The token every form of this session carries.
    pub csrf: String,
    /// What the last change did, shown once on the next page.
    pub note: Option<String>,
}

struct Session {
    view: SessionView,
    last_used: Instant,
}

/// The console's sessions, in memory: a restart logs everyone out, which is what a restart of
/// the mail server should do anyway.
#[derive(Clone)]
pub struct Sessions {
    idle: Duration,
    inner: Arc<Mutex<HashMap<String, Session>>>,
}

impl Sessions {
    /// Sessions that end after `idle` without a request.
    pub fn new(idle: Duration) -> Sessions {
        Sessions { idle, inner: Arc::default() }
    }

    /// A new session for `user`: (session token, CSRF token).
    pub fn start(&self, user: &str, now: Instant) -> (String, String) {
        let (token, csrf) = (random_token(), random_token());
        let mut inner = self.inner.lock().expect("sessions");
        inner.retain(|_, s| now.saturating_duration_since(s.last_used) < self.idle);
        if inner.len() >= MAX_SESSIONS
            && let Some(oldest) = inner.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| k.clone())
        {
            inner.remove(&oldest);
        }
        let view = SessionView { user: user.to_string(), csrf: csrf.clone(), note: None };
        inner.insert(token.clone(), Session { view, last_used: now });
        (token, csrf)
    }

    /// The session of `token`, which counts as used now; None when unknown or idle too long.
    pub fn touch(&self, token: &str, now: Instant) -> Option<SessionView> {
        let mut inner = self.inner.lock().expect("sessions");
        let session = inner.get_mut(token)?;
        if now.saturating_duration_since(session.last_used) >= self.idle {
            inner.remove(token);
            return None;
        }
        session.last_used = now;
        let view = session.view.clone();
        session.view.note = None;
        Some(view)
    }

    /// The session of `token` for a live refresh: valid, but not used by a person, so it does
    /// not keep the session from idling out and leaves the next page's note alone.
    pub fn peek(&self, token: &str, now: Instant) -> Option<SessionView> {
        let inner = self.inner.lock().expect("sessions");
        let session = inner.get(token)?;
        (now.saturating_duration_since(session.last_used) < self.idle).then(|| SessionView { note: None, ..session.view.clone() })
    }

    /// Tell the session's next page what a change did (post, redirect, get).
    pub fn note(&self, token: &str, text: String) {
        if let Some(s) = self.inner.lock().expect("sessions").get_mut(token) {
            s.view.note = Some(text);
        }
    }

    /// Log out.
    pub fn end(&self, token: &str) {
        self.inner.lock().expect("sessions").remove(token);
    }

    /// End every session of `user` (their administrator flag was taken, or they were disabled).
    pub fn end_user(&self, user: &str) {
        self.inner.lock().expect("sessions").retain(|_, s| s.view.user != user);
    }

    pub fn idle(&self) -> Duration {
        self.idle
    }
}

/// The Set-Cookie value that starts a session: sent only over HTTPS (Secure), never to scripts
/// (HttpOnly), never with a request another site starts (SameSite=Strict).
pub fn session_cookie(token: &str, idle: Duration) -> String {
    format!("{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}", idle.as_secs())
}

/// The Set-Cookie value that removes it.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// The value of cookie `name` in a Cookie header.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').filter_map(|pair| pair.trim().split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compared_exactly() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(tokens_match(&a, &a.clone()));
        assert!(!tokens_match(&a, &b));
        assert!(!tokens_match(&a, &a[..63]));
        assert!(!tokens_match("", ""), "an empty token never matches");
    }

    #[test]
    fn the_cookie_is_secure_httponly_and_strict() {
        let c = session_cookie("abc", Duration::from_secs(1800));
        for part in ["__Host-postroom=abc", "Path=/", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=1800"] {
            assert!(c.split("; ").any(|p| p == part), "{c} lacks {part}");
        }
        assert!(!c.contains("Domain"), "a __Host- cookie has no Domain");
        assert!(cleared_cookie().contains("Max-Age=0"));
        assert_eq!(cookie_value("a=1; __Host-postroom=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie_value("postroom=xyz", COOKIE), None);
    }

    #[test]
    fn sessions_expire_when_idle_and_end_on_logout() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let (token, csrf) = sessions.start("admin", t0);
        assert_eq!(sessions.touch(&token, t0 + Duration::from_secs(59)), Some(SessionView { user: "admin".into(), csrf, note: None }));
        // Used at 59 s: alive until 119 s.
        assert!(sessions.touch(&token, t0 + Duration::from_secs(118)).is_some());
        assert!(sessions.touch(&token, t0 + Duration::from_secs(178)).is_none(), "idle 60 s");
        assert!(sessions.touch(&token, t0).is_none(), "gone for good");
        let (token, _) = sessions.start("admin", t0);
        sessions.end(&token);
        assert!(sessions.touch(&token, t0).is_none());
        assert!(sessions.touch("not-a-token", t0).is_none());
    }

    #[test]
    fn the_table_is_bounded() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let (first, _) = sessions.start("a", t0);
        for i in 1..=MAX_SESSIONS {
            sessions.start("a", t0 + Duration::from_millis(i as u64));
        }
        assert!(sessions.touch(&first, t0 + Duration::from_secs(1)).is_none(), "the longest idle one went");
        assert_eq!(sessions.inner.lock().unwrap().len(), MAX_SESSIONS);
    }

    #[test]
    fn the_policy_allows_only_the_consoles_own_script() {
        assert!(CONTENT_SECURITY_POLICY.starts_with("default-src 'none'"));
        assert!(CONTENT_SECURITY_POLICY.contains("script-src 'self';"), "no inline script, nothing from elsewhere");
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    }

    #[test]
    fn a_refresh_peeks_without_keeping_the_session_alive() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let (token, _) = sessions.start("admin", t0);
        sessions.note(&token, "done".into());
        assert_eq!(sessions.peek(&token, t0 + Duration::from_secs(50)).map(|v| v.note), Some(None), "a refresh takes no note");
        assert_eq!(sessions.touch(&token, t0 + Duration::from_secs(55)).and_then(|v| v.note).as_deref(), Some("done"));
        assert!(sessions.peek(&token, t0 + Duration::from_secs(100)).is_some(), "touched at 55 s");
        assert!(sessions.peek(&token, t0 + Duration::from_secs(116)).is_none(), "peeks at 100 s did not extend it");
    }
}
