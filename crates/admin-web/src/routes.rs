//! The console's pages and the changes they make. Every change goes through the library function
//! the CLI calls for it, checks the form's CSRF token first, and is journaled (WC) with the
//! administrator's name; every store access is the store's async read/write, except the
//! directory's administration functions, which block and so run on tokio's blocking threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::{Form, FromRequestParts, Path, Query, State as Extract};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use directory::LocalDomains;
use directory::admin::Admin as Directory;
use directory::mailbox::{self as login, LoginFor};
use directory::penalty::PenaltyBox;
use mail_framework::journal::{self, code};
use mail_framework::message::admin::{self as queue, QueueCommand};
use mail_framework::message::quarantine;
use serde::Deserialize;
use store::Durability;

use crate::pages::{self, Nav};
use crate::security::{self, SessionView};
use crate::server::{ClientIp, State};

type Shared = Arc<State>;

mod settings;

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/login", get(login_form).post(login_submit))
        .route("/logout", post(logout))
        .route("/queue", get(queue_list))
        .route("/queue/{qid}", get(queue_show))
        .route("/queue/{qid}/{action}", post(queue_change))
        .route("/trace", get(trace_search))
        .route("/trace/{qid}", get(trace_message))
        .route("/quarantine", get(quarantine_list))
        .route("/quarantine/{id}", get(quarantine_show))
        .route("/quarantine/{id}/{action}", post(quarantine_change))
        .route("/users", get(users_list).post(user_add))
        .route("/users/{name}", get(user_show))
        .route("/users/{name}/{action}", post(user_change))
        .route("/domains", get(settings::domains_list).post(settings::domain_add))
        .route("/domains/remove", post(settings::domain_remove))
        .route("/aliases", get(settings::aliases_list).post(settings::alias_add))
        .route("/aliases/remove", post(settings::alias_remove))
        .route("/lists", get(settings::lists_show))
        .route("/lists/{kind}/{action}", post(settings::list_change))
        .route("/explain", get(settings::explain))
        .route("/dkim", get(settings::dkim_list).post(settings::dkim_keygen))
        .route("/filters", get(settings::filters_list).post(settings::filter_add))
        .route("/filters/remove", post(settings::filter_remove))
        .route("/static/console.css", get(stylesheet))
        .route("/static/refresh.js", get(refresh_script))
        .fallback(not_found)
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(state)
}

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in security::HEADERS {
        headers.insert(*name, HeaderValue::from_static(value));
    }
    response
}

async fn stylesheet() -> Response {
    let mut r = ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("../static/console.css")).into_response();
    // The one answer a browser may keep: it holds nothing about the server.
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
    r
}

/// The header static/refresh.js sends with its requests.
const REFRESH_HEADER: &str = "x-postroom-refresh";

async fn refresh_script() -> Response {
    let mut r = ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("../static/refresh.js")).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
    r
}

/// Why a request was not served, as a page.
pub(crate) enum Failure {
    Forbidden(String),
    NotFound(String),
    Refused(String),
    Internal(String),
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Failure::Forbidden(t) => (StatusCode::FORBIDDEN, t),
            Failure::NotFound(t) => (StatusCode::NOT_FOUND, t),
            Failure::Refused(t) => (StatusCode::UNPROCESSABLE_ENTITY, t),
            Failure::Internal(t) => {
                tracing::warn!(error = %t, "admin console: request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, t)
            }
        };
        let page = pages::ErrorPage { title: status.canonical_reason().unwrap_or("Error").to_string(), text };
        (status, render(&page)).into_response()
    }
}

impl From<store::StoreError> for Failure {
    fn from(e: store::StoreError) -> Self {
        Failure::Internal(e.to_string())
    }
}

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "admin console: a page could not be rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered").into_response()
        }
    }
}

async fn not_found() -> Failure {
    Failure::NotFound("There is no such page.".into())
}

/// A request with a live session: who it is, and the token its forms carry.
pub(crate) struct Admin {
    token: String,
    view: SessionView,
}

impl FromRequestParts<Shared> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        let cookie = parts.headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok());
        let token = cookie.filter_map(|h| security::cookie_value(h, security::COOKIE)).next().map(str::to_string);
        // The dashboard's live refresh (static/refresh.js) is not a person using the console.
        let refresh = parts.headers.get(REFRESH_HEADER).is_some();
        let session = |t: &str| if refresh { state.sessions.peek(t, Instant::now()) } else { state.sessions.touch(t, Instant::now()) };
        match token.and_then(|t| Some((session(&t)?, t))) {
            Some((view, token)) => Ok(Admin { token, view }),
            None => Err(Redirect::to("/login").into_response()),
        }
    }
}

impl Admin {
    fn nav(&self, section: &'static str) -> Nav {
        Nav { user: self.view.user.clone(), csrf: self.view.csrf.clone(), section, note: self.view.note.clone() }
    }

    /// Every change checks the form's token first: a page of another site cannot post here in
    /// the administrator's name (SameSite=Strict already keeps the cookie away; this is the lock).
    fn check(&self, given: &str) -> Result<(), Failure> {
        if security::tokens_match(&self.view.csrf, given) {
            Ok(())
        } else {
            Err(Failure::Forbidden("The form's security token is missing or wrong: nothing was changed. Reload the page and try again.".into()))
        }
    }
}

/// Journal a change (WC) in its own transaction, for changes made by the directory's functions.
async fn journal_change(state: &State, admin: &Admin, ip: ClientIp, qid: &str, what: String) {
    let (user, ip, qid) = (admin.view.user.clone(), ip.0.to_string(), qid.to_string());
    let written = state
        .store
        .write(Durability::Full, move |c| {
            Ok(journal::append(
                c,
                &journal::Entry { code: code::CONSOLE_CHANGE, qid: &qid, originator: &user, ip: &ip, detail: &what, ..Default::default() },
            )?)
        })
        .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "admin console: cannot journal a change");
    }
}

/// The WC row of a change made inside the caller's transaction.
fn change_row(c: &store::rusqlite::Connection, user: &str, ip: &str, qid: &str, what: &str) -> store::rusqlite::Result<()> {
    journal::append(c, &journal::Entry { code: code::CONSOLE_CHANGE, qid, originator: user, ip, detail: what, ..Default::default() })
}

// ---------------------------------------------------------------------------------------------
// Login

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login_form() -> Response {
    render(&pages::Login { message: None })
}

async fn login_submit(Extract(state): Extract<Shared>, Extension(ip): Extension<ClientIp>, Form(form): Form<LoginForm>) -> Response {
    let refused = |message: &str, status: StatusCode| (status, render(&pages::Login { message: Some(message.to_string()) })).into_response();
    let name = form.user.trim().to_string();
    // A5, as POP3 and LDAP: failures count per address, or per user for relay-listed clients.
    let relay_listed = state.lists.client(&state.store, ip.0).await.map(|r| r.lists.relay_match(ip.0).is_some()).unwrap_or(false);
    let attempt = match state.penalty.reserve_login(PenaltyBox::offender(ip.0, &name, relay_listed)).await {
        Ok(a) => a,
        Err(throttled) => {
            login_journal(&state, ip, &name, code::CONSOLE_LOGIN_FAILED, throttled.describe()).await;
            return refused("Too many failed logins: logins from here are refused for a while. Try again later.", StatusCode::TOO_MANY_REQUESTS);
        }
    };
    let passwords = state.passwords.for_client(attempt.offender().clone());
    match login::authenticate(&state.store, &passwords, &name, &form.password, LoginFor::Administer).await {
        Ok(Some(user)) => {
            attempt.succeeded();
            login_journal(&state, ip, &user.name, code::CONSOLE_LOGIN, "web console login").await;
            let (token, _) = state.sessions.start(&user.name, Instant::now());
            let cookie = security::session_cookie(&token, state.sessions.idle());
            let mut r = Redirect::to("/").into_response();
            r.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("a token is ASCII"));
            r
        }
        Ok(None) => {
            let locked = attempt.failed();
            let note = if locked { "failed web console login; cool-down started (A5)" } else { "failed web console login (A5)" };
            login_journal(&state, ip, &name, code::CONSOLE_LOGIN_FAILED, note).await;
            refused("Wrong user name or password, or the user is not an administrator.", StatusCode::UNAUTHORIZED)
        }
        Err(e) => {
            attempt.not_checked();
            tracing::warn!(error = %e, "admin console login could not be checked");
            refused("The login could not be checked now (the password service is busy). Try again.", StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

async fn login_journal(state: &State, ip: ClientIp, user: &str, code: &'static str, detail: &str) {
    let (ip, user, detail) = (ip.0.to_string(), user.to_string(), detail.to_string());
    let _ = state
        .store
        .write(Durability::Normal, move |c| {
            Ok(journal::append(c, &journal::Entry { code, originator: &user, recipient: &user, ip: &ip, detail: &detail, ..Default::default() })?)
        })
        .await;
}

#[derive(Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn logout(Extract(state): Extract<Shared>, admin: Admin, Form(form): Form<CsrfOnly>) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    state.sessions.end(&admin.token);
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&security::cleared_cookie()).expect("ASCII"));
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Dashboard

async fn dashboard(Extract(state): Extract<Shared>, admin: Admin) -> Result<Response, Failure> {
    let health = state.health.read().expect("health").clone();
    let mut listeners = Vec::new();
    for line in &health.listeners {
        let Some((name, addr)) = line.split_once(' ') else { continue };
        let up = match addr.parse::<std::net::SocketAddr>() {
            Ok(a) => matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(a)).await, Ok(Ok(_))),
            Err(_) => false,
        };
        listeners.push(pages::ListenerRow { name: name.to_string(), address: addr.to_string(), up });
    }
    let now = store::now();
    let worker = |last: i64| if now - last <= 15 { format!("up (last active {} s ago)", now - last) } else { "DOWN (no sign of life)".to_string() };
    let depths = state.store.read(queue::depths).await?;
    let counters = crate::counters::Totals::of(&metrics::global().encode());
    let rates = state.history.lock().expect("history").per_minute(std::time::Instant::now(), &counters);
    let free = fs2::available_space(&state.settings.data_dir).map(pages::bytes).unwrap_or_else(|e| format!("unknown ({e})"));
    let certificate = match &state.tls {
        Some(tls) => match tls::describe(&tls.certificate()) {
            Ok(info) => format!(
                "{} — valid until {} ({} days left)",
                info.subject,
                mail_proto::date::rfc5322(info.not_after),
                (info.not_after - now) / 86_400
            ),
            Err(e) => e,
        },
        None => "none".to_string(),
    };
    let page = pages::Dashboard {
        nav: admin.nav("dashboard"),
        hostname: state.settings.hostname.clone(),
        listeners,
        framework: worker(health.framework.last()),
        outbound: worker(health.outbound.last()),
        storage_low: health.storage.is_low(),
        depths,
        counters,
        rates,
        free,
        certificate,
    };
    Ok(render(&page))
}

// ---------------------------------------------------------------------------------------------
// Queue

#[derive(Deserialize, Default)]
struct QueueFilter {
    #[serde(default)]
    state: String,
    #[serde(default)]
    q: String,
}

async fn queue_list(Extract(state): Extract<Shared>, admin: Admin, Query(filter): Query<QueueFilter>) -> Result<Response, Failure> {
    let rows = state.store.read(queue::pending).await?;
    let text = filter.q.trim().to_ascii_lowercase();
    let rows = rows
        .into_iter()
        .filter(|r| match filter.state.as_str() {
            "" => true,
            "held" => r.held != mail_framework::message::Hold::None,
            s => r.state.to_string() == s,
        })
        .filter(|r| text.is_empty() || [&r.qid, &r.mail_from, &r.address].iter().any(|f| f.to_ascii_lowercase().contains(&text)))
        .map(pages::QueueRow::from)
        .collect();
    Ok(render(&pages::Queue { nav: admin.nav("queue"), rows, state: filter.state, q: filter.q }))
}

async fn queue_show(Extract(state): Extract<Shared>, admin: Admin, Path(qid): Path<String>) -> Result<Response, Failure> {
    let id = qid.clone();
    let rows = state.store.read(move |c| queue::message_recipients(c, &id)).await?;
    if rows.is_empty() {
        return Err(Failure::NotFound(format!("No message with queue id {qid}.")));
    }
    Ok(render(&pages::QueueMessage { nav: admin.nav("queue"), qid, rows: rows.into_iter().map(pages::QueueRow::from).collect() }))
}

async fn queue_change(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Path((qid, action)): Path<(String, String)>,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let (op, done) = match action.as_str() {
        "retry" => (QueueCommand::Retry, "will be attempted now"),
        "hold" => (QueueCommand::Hold, "held"),
        "release" => (QueueCommand::Release, "released"),
        "delete" => (QueueCommand::Delete, "deleted"),
        _ => return Err(Failure::NotFound("No such queue action.".into())),
    };
    let (id, user, from) = (qid.clone(), admin.view.user.clone(), ip.0.to_string());
    let n = state
        .store
        .write(Durability::Full, move |c| {
            let n = queue::command(c, &id, op)?;
            if n > 0 {
                change_row(c, &user, &from, &id, &format!("queue {action}: {n} recipient(s) {done} by {user} in the web console"))?;
            }
            Ok(n)
        })
        .await?;
    if n == 0 {
        return Err(Failure::Refused(format!("No waiting recipients of {qid} to change.")));
    }
    state.sessions.note(&admin.token, format!("{qid}: {n} recipient(s) {done}."));
    let back = if op == QueueCommand::Delete { "/queue".to_string() } else { format!("/queue/{qid}") };
    Ok(Redirect::to(&back).into_response())
}

// ---------------------------------------------------------------------------------------------
// Message trace

#[derive(Deserialize, Default)]
struct TraceQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    until: String,
}

/// Rows a search shows at most.
const TRACE_LIMIT: usize = 500;

async fn trace_search(Extract(state): Extract<Shared>, admin: Admin, Query(query): Query<TraceQuery>) -> Result<Response, Failure> {
    let from = crate::time::parse_local(&query.from).unwrap_or(0);
    let until = crate::time::parse_local(&query.until).map(|t| t + 59).unwrap_or(i64::MAX);
    let searched = !(query.q.is_empty() && query.from.is_empty() && query.until.is_empty());
    let rows = if searched {
        let text = query.q.trim().to_string();
        state.store.read(move |c| Ok(journal::search(c, &text, from, until, TRACE_LIMIT)?)).await?
    } else {
        Vec::new()
    };
    let rows = rows.into_iter().map(pages::JournalRow::from).collect();
    Ok(render(&pages::Trace { nav: admin.nav("trace"), q: query.q, from: query.from, until: query.until, searched, rows }))
}

async fn trace_message(Extract(state): Extract<Shared>, admin: Admin, Path(qid): Path<String>) -> Result<Response, Failure> {
    let id = qid.clone();
    let (rows, recipients) = state
        .store
        .read(move |c| {
            let mut rows = journal::of_message(c, &id)?;
            // Delivered to a mailbox (B8): the owner's POP3 retrievals since then belong to the story.
            let delivered: Vec<(String, i64)> =
                rows.iter().filter(|r| r.code == code::DELIVERED_LOCAL).map(|r| (r.recipient.clone(), r.at)).collect();
            for (address, at) in delivered {
                if let Some(user) = directory::address_book::user_of_address(c, &address.to_ascii_lowercase())? {
                    rows.extend(journal::retrievals_by(c, &user, at, 20)?);
                }
            }
            rows.sort_by_key(|r| (r.at, r.id));
            rows.dedup_by_key(|r| r.id);
            Ok((rows, queue::message_recipients(c, &id)?))
        })
        .await?;
    if rows.is_empty() && recipients.is_empty() {
        return Err(Failure::NotFound(format!("The journal has nothing about {qid}.")));
    }
    let page = pages::TraceMessage {
        nav: admin.nav("trace"),
        qid,
        rows: rows.into_iter().map(pages::JournalRow::from).collect(),
        recipients: recipients.into_iter().map(pages::QueueRow::from).collect(),
    };
    Ok(render(&page))
}

// ---------------------------------------------------------------------------------------------
// Quarantine

/// Octets of a quarantined message the preview reads.
const PREVIEW_BYTES: usize = 256 * 1024;

async fn quarantine_list(Extract(state): Extract<Shared>, admin: Admin) -> Result<Response, Failure> {
    let rows = state.store.read(|c| Ok(quarantine::list(c)?)).await?;
    Ok(render(&pages::Quarantine { nav: admin.nav("quarantine"), rows: rows.into_iter().map(pages::QuarantineRow::from).collect() }))
}

async fn quarantine_show(Extract(state): Extract<Shared>, admin: Admin, Path(id): Path<String>) -> Result<Response, Failure> {
    let key = id.clone();
    let found = state
        .store
        .read(move |c| match quarantine::find(c, &key) {
            Ok(q) => {
                let head = mail_framework::message::body::head(c, q.message_id, PREVIEW_BYTES)?;
                Ok(Some((q, head)))
            }
            Err(quarantine::QuarantineError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        })
        .await?;
    let Some((q, raw)) = found else { return Err(Failure::NotFound(format!("No quarantined message {id}."))) };
    let preview = crate::preview::Preview::of(&raw);
    Ok(render(&pages::QuarantineMessage { nav: admin.nav("quarantine"), q: pages::QuarantineRow::from(q), preview }))
}

async fn quarantine_change(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let release = match action.as_str() {
        "release" => true,
        "delete" => false,
        _ => return Err(Failure::NotFound("No such quarantine action.".into())),
    };
    let (key, user, from) = (id.clone(), admin.view.user.clone(), ip.0.to_string());
    let done = state
        .store
        .write(Durability::Full, move |c| {
            let result = if release { quarantine::release(c, &key) } else { quarantine::delete(c, &key) };
            match result {
                Ok((q, n)) => {
                    let what = if release { format!("released, {n} recipient(s) queued") } else { "deleted".to_string() };
                    change_row(c, &user, &from, &q.qid, &format!("quarantine {}: {what} by {user} in the web console", q.id))?;
                    Ok(Ok(format!("Quarantined message {} ({}) {what}.", q.id, q.qid)))
                }
                Err(quarantine::QuarantineError::Store(e)) => Err(e),
                Err(refused) => Ok(Err(refused.to_string())),
            }
        })
        .await?
        .map_err(Failure::Refused)?;
    state.sessions.note(&admin.token, done);
    Ok(Redirect::to("/quarantine").into_response())
}

// ---------------------------------------------------------------------------------------------
// Users

/// Run one of the directory's blocking administration functions off the async workers.
async fn directory<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&Directory<'_>) -> directory::Result<T> + Send + 'static,
) -> Result<Result<T, String>, Failure> {
    let (store, settings) = (state.store.clone(), state.settings.clone());
    tokio::task::spawn_blocking(move || {
        let domains = LocalDomains::new(&settings.domains, &settings.postmaster);
        let d = Directory { store: &store, domains: &domains };
        match f(&d) {
            Ok(v) => Ok(Ok(v)),
            Err(directory::DirectoryError::Store(e)) => Err(Failure::from(e)),
            Err(refused) => Ok(Err(refused.to_string())),
        }
    })
    .await
    .map_err(|e| Failure::Internal(e.to_string()))?
}

async fn users_list(Extract(state): Extract<Shared>, admin: Admin) -> Result<Response, Failure> {
    let users = directory(&state, |d| d.list_users()).await?.map_err(Failure::Internal)?;
    Ok(render(&pages::Users { nav: admin.nav("users"), users: users.into_iter().map(pages::UserRow::from).collect() }))
}

async fn user_show(Extract(state): Extract<Shared>, admin: Admin, Path(name): Path<String>) -> Result<Response, Failure> {
    let user = directory(&state, move |d| d.show_user(&name)).await?.map_err(Failure::NotFound)?;
    Ok(render(&pages::User { nav: admin.nav("users"), user: pages::UserRow::from(user) }))
}

#[derive(Deserialize)]
struct NewUser {
    #[serde(default)]
    csrf: String,
    name: String,
    address: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    admin: Option<String>,
}

async fn user_add(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Form(form): Form<NewUser>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let hash = match form.password.as_str() {
        "" => None,
        p => Some(state.passwords.hash(p.to_string()).await.map_err(|e| Failure::Internal(e.to_string()))?),
    };
    let (name, address, make_admin) = (form.name.trim().to_string(), form.address.trim().to_string(), form.admin.is_some());
    let (n, a) = (name.clone(), address.clone());
    directory(&state, move |d| {
        d.add_user(&n, &[a], hash)?;
        if make_admin { d.set_admin(&n, true) } else { Ok(()) }
    })
    .await?
    .map_err(Failure::Refused)?;
    let what = format!("user {name} added with {address}{}", if make_admin { " (administrator)" } else { "" });
    journal_change(&state, &admin, ip, "", format!("{what} by {} in the web console", admin.view.user)).await;
    state.sessions.note(&admin.token, format!("User {name} added."));
    Ok(Redirect::to(&format!("/users/{name}")).into_response())
}

#[derive(Deserialize)]
struct UserChange {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    value: String,
    /// The forwarding form's "keep a copy" box.
    #[serde(default)]
    keep: Option<String>,
}

async fn user_change(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Path((name, action)): Path<(String, String)>,
    Form(form): Form<UserChange>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let value = form.value.trim().to_string();
    let n = name.clone();
    let (what, ends_sessions) = match action.as_str() {
        "enable" => (directory(&state, move |d| d.set_enabled(&n, true)).await?.map(|_| "enabled".to_string()), false),
        "disable" => (directory(&state, move |d| d.set_enabled(&n, false)).await?.map(|_| "disabled".to_string()), true),
        "admin-on" => (directory(&state, move |d| d.set_admin(&n, true)).await?.map(|_| "made an administrator".to_string()), false),
        "admin-off" => {
            if name == admin.view.user {
                return Err(Failure::Refused("You cannot take your own administrator flag: another administrator must.".into()));
            }
            (directory(&state, move |d| d.set_admin(&n, false)).await?.map(|_| "no longer an administrator".to_string()), true)
        }
        "password" => {
            if form.value.is_empty() {
                return Err(Failure::Refused("The new password is empty.".into()));
            }
            let hash = state.passwords.hash(form.value.clone()).await.map_err(|e| Failure::Internal(e.to_string()))?;
            (directory(&state, move |d| d.set_password(&n, hash)).await?.map(|_| "password reset".to_string()), false)
        }
        "quota" => {
            let quota = match value.as_str() {
                "" | "none" => None,
                v => Some(
                    v.parse::<i64>().ok().filter(|q| *q > 0).ok_or_else(|| Failure::Refused(format!("Quota {v:?}: a number of bytes, or none.")))?,
                ),
            };
            let text = quota.map_or("quota lifted".to_string(), |q| format!("quota {q} bytes"));
            (directory(&state, move |d| d.set_quota(&n, quota)).await?.map(|_| text), false)
        }
        "address" => (directory(&state, move |d| d.add_user_address(&n, &value)).await?.map(|key| format!("address {key} added")), false),
        // Never forced: an address that aliases or forwards point to stays, and the page says why.
        "address-remove" => {
            let removed = directory(&state, move |d| d.remove_user_address(&n, &value, false)).await?;
            let text = removed.map(|r| match r.new_preferred {
                Some(p) => format!("address {} removed; {p} is the preferred address now", r.address),
                None => format!("address {} removed", r.address),
            });
            (text, false)
        }
        "prefer" => {
            (directory(&state, move |d| d.prefer_user_address(&n, &value)).await?.map(|key| format!("{key} is the preferred address")), false)
        }
        "name" => (directory(&state, move |d| d.set_display_name(&n, &value)).await?.map(|_| "full name changed".to_string()), false),
        "forward" => {
            let keep = form.keep.is_some();
            let forward = (!value.is_empty()).then(|| (value.clone(), keep));
            let text = if value.is_empty() {
                "forwarding off".to_string()
            } else {
                format!("mail forwarded to {value}{}", if keep { ", a copy kept" } else { "" })
            };
            (directory(&state, move |d| d.set_forward(&n, forward)).await?.map(|_| text), false)
        }
        _ => return Err(Failure::NotFound("No such user action.".into())),
    };
    let what = what.map_err(Failure::Refused)?;
    if ends_sessions {
        state.sessions.end_user(&name);
    }
    journal_change(&state, &admin, ip, "", format!("user {name}: {what} by {} in the web console", admin.view.user)).await;
    state.sessions.note(&admin.token, format!("User {name}: {what}."));
    Ok(Redirect::to(&format!("/users/{name}")).into_response())
}
