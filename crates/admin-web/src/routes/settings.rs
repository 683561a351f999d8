//! Domains, aliases and the access lists (issue 19): each change through the function the CLI
//! calls for it (`postroom domain`, `postroom alias`, `postroom list`), behind the form's CSRF
//! token, and journaled (WC) with the administrator's name.

use std::str::FromStr;

use axum::Extension;
use axum::extract::{Form, Path, State as Extract};
use axum::response::{IntoResponse, Redirect, Response};
use directory::access::{self, ListKind};
use directory::deny_list;
use directory::penalty::Offender;
use mail_proto::date::rfc5322;
use serde::Deserialize;
use store::Durability;

use super::{Admin, Failure, Shared, directory, journal_change, render};
use crate::pages;
use crate::server::ClientIp;

/// Journal a change and tell the next page about it.
async fn done(state: &Shared, admin: &Admin, ip: ClientIp, what: String) {
    journal_change(state, admin, ip, "", format!("{what} by {} in the web console", admin.view.user)).await;
    state.sessions.note(&admin.token, format!("{}{}.", what[..1].to_uppercase(), &what[1..]));
}

// ---------------------------------------------------------------------------------------------
// Domains

pub(super) async fn domains_list(Extract(state): Extract<Shared>, admin: Admin) -> Result<Response, Failure> {
    let rows = directory(&state, |d| d.list_domains()).await?.map_err(Failure::Internal)?;
    let domains = rows.into_iter().map(|(name, origin)| pages::DomainRow { removable: origin != "configured", name, origin }).collect();
    Ok(render(&pages::Domains { nav: admin.nav("domains"), domains }))
}

#[derive(Deserialize)]
pub(super) struct DomainForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    domain: String,
}

pub(super) async fn domain_add(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Form(form): Form<DomainForm>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let domain = form.domain.trim().to_string();
    let d = domain.clone();
    let added = directory(&state, move |dir| dir.add_domain(&d)).await?.map_err(Failure::Refused)?;
    if added {
        done(&state, &admin, ip, format!("domain {domain} added")).await;
    } else {
        state.sessions.note(&admin.token, format!("Domain {domain} is already local."));
    }
    Ok(Redirect::to("/domains").into_response())
}

pub(super) async fn domain_remove(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Form(form): Form<DomainForm>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let domain = form.domain.trim().to_string();
    let d = domain.clone();
    directory(&state, move |dir| dir.remove_domain(&d)).await?.map_err(Failure::Refused)?;
    done(&state, &admin, ip, format!("domain {domain} removed")).await;
    Ok(Redirect::to("/domains").into_response())
}

// ---------------------------------------------------------------------------------------------
// Aliases (groups)

pub(super) async fn aliases_list(Extract(state): Extract<Shared>, admin: Admin) -> Result<Response, Failure> {
    let rows = directory(&state, |d| d.list_aliases()).await?.map_err(Failure::Internal)?;
    let aliases =
        rows.into_iter().map(|(alias, targets)| pages::AliasRow { catch_all: directory::resolve::is_catch_all(&alias), alias, targets }).collect();
    Ok(render(&pages::Aliases { nav: admin.nav("aliases"), aliases }))
}

#[derive(Deserialize)]
pub(super) struct AliasForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    alias: String,
    /// Add: members separated by commas, blanks or lines. Remove: one member, or none for all.
    #[serde(default)]
    targets: String,
}

pub(super) async fn alias_add(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Form(form): Form<AliasForm>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let alias = form.alias.trim().to_string();
    let targets: Vec<String> = form.targets.split([',', ' ', '\n', '\r', '\t']).filter(|t| !t.is_empty()).map(str::to_string).collect();
    if targets.is_empty() {
        return Err(Failure::Refused("Give at least one member address.".into()));
    }
    let (a, t) = (alias.clone(), targets.clone());
    let key = directory(&state, move |d| d.add_alias(&a, &t)).await?.map_err(Failure::Refused)?;
    done(&state, &admin, ip, format!("alias {key}: {} added", targets.join(", "))).await;
    Ok(Redirect::to("/aliases").into_response())
}

pub(super) async fn alias_remove(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Form(form): Form<AliasForm>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let (alias, target) = (form.alias.trim().to_string(), form.targets.trim().to_string());
    let (a, t) = (alias.clone(), target.clone());
    // Never --force from a browser: an alias others point to stays, and the page says why.
    let (n, _) = directory(&state, move |d| d.remove_alias(&a, (!t.is_empty()).then_some(t.as_str()), false)).await?.map_err(Failure::Refused)?;
    let what = if target.is_empty() { format!("alias {alias} removed ({n} member(s))") } else { format!("alias {alias}: member {target} removed") };
    done(&state, &admin, ip, what).await;
    Ok(Redirect::to("/aliases").into_response())
}

// ---------------------------------------------------------------------------------------------
// Access lists and the temporary deny list

/// What each list holds, in the words of `postroom list add`.
fn list_help(kind: ListKind) -> (&'static str, &'static str) {
    match kind {
        ListKind::Relay => ("Clients that may relay", "Address, \"address mask\" or CIDR, e.g. 192.168.1.0/24"),
        ListKind::Reject => ("Clients that may not connect", "Address, \"address mask\" or CIDR, e.g. 203.0.113.7"),
        ListKind::Near => ("Recipient domains relayed in near mode", "Domain, e.g. branch.example.org"),
        ListKind::Kill => ("Refused senders", "user@host, @host or @*suffix"),
        ListKind::Rbl => ("DNS blackhole list zones", "Zone, e.g. zen.spamhaus.org"),
    }
}

pub(super) async fn lists_show(Extract(state): Extract<Shared>, admin: Admin) -> Result<Response, Failure> {
    let now = store::now();
    let (lists, hostauth, denied) = state
        .store
        .read(move |c| {
            let mut lists = Vec::new();
            for kind in ListKind::ALL {
                let rows = access::show(c, kind).map_err(directory::into_store)?;
                lists.push((kind, rows));
            }
            let hostauth = access::hostauth::show(c).map_err(directory::into_store)?;
            Ok((lists, hostauth, deny_list::list(c, now)?))
        })
        .await?;
    let lists = lists
        .into_iter()
        .map(|(kind, rows)| {
            let (title, hint) = list_help(kind);
            pages::AccessList {
                kind: kind.as_str(),
                title,
                hint,
                rows: rows.into_iter().map(|(entry, at)| pages::ListEntry { entry, detail: format!("added {}", rfc5322(at)) }).collect(),
            }
        })
        .collect();
    let hostauth =
        hostauth.into_iter().map(|(host, user, at)| pages::ListEntry { entry: host, detail: format!("as {user}, added {}", rfc5322(at)) }).collect();
    let denied = denied
        .into_iter()
        .map(|d| pages::ListEntry { detail: format!("until {} ({})", rfc5322(d.until), d.reason.describe()), entry: d.key })
        .collect();
    Ok(render(&pages::Lists { nav: admin.nav("lists"), lists, hostauth, denied }))
}

#[derive(Deserialize)]
pub(super) struct EntryForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    entry: String,
}

pub(super) async fn list_change(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Path((kind, action)): Path<(String, String)>,
    Form(form): Form<EntryForm>,
) -> Result<Response, Failure> {
    admin.check(&form.csrf)?;
    let text = form.entry.trim().to_string();
    let what = match (kind.as_str(), action.as_str()) {
        ("deny", "remove") => {
            let who = Offender::parse(&text).ok_or_else(|| Failure::Refused(format!("{text:?}: an IP address or \"user NAME\" expected.")))?;
            let key = who.key_text();
            let was = state.store.write(Durability::Full, move |c| Ok(deny_list::request_lift(c, &who)?)).await?;
            if !was {
                return Err(Failure::Refused(format!("{key} is not on the deny list.")));
            }
            format!("deny list: {key} removed (the server lets it in again within a few seconds)")
        }
        ("hostauth", "remove") => {
            let h = text.clone();
            let was = state.store.write(Durability::Full, move |c| access::hostauth::remove(c, &h).map_err(directory::into_store)).await?;
            if !was {
                return Err(Failure::Refused(format!("No hostauth entry for {text}.")));
            }
            format!("hostauth list: removed {text}")
        }
        (k, "add" | "remove") => {
            let k = ListKind::from_str(k).map_err(|_| Failure::NotFound("No such list.".into()))?;
            let add = action == "add";
            let result = state
                .store
                .write(Durability::Full, move |c| {
                    let r = if add { access::add(c, k, &text) } else { access::remove(c, k, &text).map(|e| (e, true)) };
                    match r {
                        Ok(v) => Ok(Ok(v)),
                        Err(directory::DirectoryError::Store(e)) => Err(e),
                        Err(refused) => Ok(Err(refused.to_string())),
                    }
                })
                .await?;
            let (entry, changed) = result.map_err(Failure::Refused)?;
            if !changed {
                state.sessions.note(&admin.token, format!("{} list: {entry} is already there.", k.as_str()));
                return Ok(Redirect::to("/lists").into_response());
            }
            format!("{} list: {} {entry}", k.as_str(), if add { "added" } else { "removed" })
        }
        _ => return Err(Failure::NotFound("No such list action.".into())),
    };
    done(&state, &admin, ip, what).await;
    Ok(Redirect::to("/lists").into_response())
}

// ---------------------------------------------------------------------------------------------
// Explain

#[derive(Deserialize, Default)]
pub(super) struct ExplainForm {
    #[serde(default)]
    ip: String,
    #[serde(default)]
    helo: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

/// `postroom explain` as a form: a question, changes nothing, so a GET like the trace search.
pub(super) async fn explain(
    Extract(state): Extract<Shared>,
    admin: Admin,
    axum::extract::Query(form): axum::extract::Query<ExplainForm>,
) -> Result<Response, Failure> {
    let explainer = state.explainer.read().expect("explainer").clone();
    let asked = !form.ip.trim().is_empty();
    let (mut accepted, mut lines) = (None, Vec::new());
    if let (true, Some(explainer)) = (asked, &explainer) {
        let to: Vec<String> = form.to.split([',', ' ', '\n', '\r', '\t']).filter(|t| !t.is_empty()).map(str::to_string).collect();
        match form.ip.trim().parse::<std::net::IpAddr>() {
            Err(_) => lines.push(format!("{:?} is not an IP address.", form.ip.trim())),
            Ok(_) if to.is_empty() => lines.push("Give at least one recipient.".into()),
            Ok(_) if form.from.trim().is_empty() => lines.push("Give the sender (<> for the null sender).".into()),
            Ok(ip) => {
                let query = admin_query(ip, &form, to);
                let explainer = explainer.clone();
                match tokio::task::spawn_blocking(move || explainer(query)).await.map_err(|e| Failure::Internal(e.to_string()))? {
                    Ok((l, ok)) => (lines, accepted) = (l, Some(ok)),
                    Err(l) => lines = l,
                }
            }
        }
    }
    let page = pages::Explain {
        nav: admin.nav("explain"),
        ip: form.ip,
        helo: form.helo,
        from: form.from,
        to: form.to,
        asked,
        accepted,
        lines,
        available: explainer.is_some(),
    };
    Ok(render(&page))
}

fn admin_query(ip: std::net::IpAddr, form: &ExplainForm, to: Vec<String>) -> crate::ExplainQuery {
    crate::ExplainQuery { ip, helo: form.helo.trim().to_string(), from: form.from.trim().to_string(), to }
}

// ---------------------------------------------------------------------------------------------
// DKIM keys

pub(super) async fn dkim_list(Extract(state): Extract<Shared>, admin: Admin) -> Result<Response, Failure> {
    use sender_auth::key_store;
    let rows = state.store.read(|c| Ok(key_store::list(c)?)).await?;
    let (good, bad): (Vec<_>, Vec<_>) = rows.into_iter().partition(Result::is_ok);
    let keys: Vec<key_store::StoredKey> = good.into_iter().filter_map(Result::ok).collect();
    // As `postroom dkim list`: which key of each domain signs now.
    let ring = key_store::ring_of(keys.clone(), Vec::new());
    let keys = keys
        .into_iter()
        .map(|k| pages::DkimRow {
            signs: ring.choose(Some(&k.domain), None).iter().any(|s| s.selector == k.selector),
            name: sender_auth::keys::record_name(&k.selector, &k.domain),
            value: k.pair.txt_record(),
            algorithm: k.pair.algorithm.name(),
            created: rfc5322(k.created),
            checked: k.checked.map(rfc5322).unwrap_or_else(|| "never".into()),
            domain: k.domain,
            selector: k.selector,
        })
        .collect();
    Ok(render(&pages::Dkim { nav: admin.nav("dkim"), keys, unusable: bad.into_iter().filter_map(Result::err).collect() }))
}

#[derive(Deserialize)]
pub(super) struct KeygenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    algorithm: String,
}

/// `postroom dkim keygen DOMAIN [--algorithm]` without --force: a new key with the default
/// selector; a key already there under that selector is never replaced from a browser.
pub(super) async fn dkim_keygen(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Form(form): Form<KeygenForm>,
) -> Result<Response, Failure> {
    use sender_auth::key_store;
    use sender_auth::keys::{self, Algorithm, KeyPair};
    admin.check(&form.csrf)?;
    let domain = directory::resolve::normalise_domain(form.domain.trim());
    let d = domain.clone();
    let local = directory(&state, move |dir| Ok(dir.list_domains()?.iter().any(|(name, _)| *name == d))).await?.map_err(Failure::Refused)?;
    if !local {
        return Err(Failure::Refused(format!("{domain} is not a local domain: only the office's own domains get DKIM keys.")));
    }
    let algorithm = Algorithm::parse(form.algorithm.trim()).map_err(|e| Failure::Refused(e.to_string()))?;
    let now = store::now();
    let selector = keys::default_selector(algorithm, now);
    // RSA key generation takes a while: off the async workers.
    let pair = tokio::task::spawn_blocking(move || KeyPair::generate(algorithm))
        .await
        .map_err(|e| Failure::Internal(e.to_string()))?
        .map_err(|e| Failure::Internal(e.to_string()))?;
    let (d, s) = (domain.clone(), selector.clone());
    state
        .store
        .write(Durability::Full, move |c| match key_store::insert(c, &d, &s, &pair, now, false) {
            Ok(_) => Ok(Ok(())),
            Err(key_store::KeyStoreError::Sqlite(e)) => Err(e.into()),
            Err(other) => Ok(Err(other.to_string())),
        })
        .await?
        .map_err(Failure::Refused)?;
    done(&state, &admin, ip, format!("DKIM {} key for {domain} made, selector {selector}", algorithm.name())).await;
    Ok(Redirect::to("/dkim").into_response())
}

// ---------------------------------------------------------------------------------------------
// Filters

pub(super) async fn filters_list(Extract(state): Extract<Shared>, admin: Admin) -> Result<Response, Failure> {
    let rules = state.store.read(|c| Ok(directory::filters::list(c)?)).await?;
    let rules = rules
        .into_iter()
        .map(|r| pages::FilterRow { id: r.id, field: r.field.as_str(), pattern: r.pattern, action: r.action.as_str(), added: rfc5322(r.added_at) })
        .collect();
    Ok(render(&pages::Filters { nav: admin.nav("filters"), rules }))
}

#[derive(Deserialize)]
pub(super) struct FilterForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    field: String,
    #[serde(default)]
    pattern: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    id: i64,
}

/// As `postroom filter add --FIELD PATTERN --action ACTION`.
pub(super) async fn filter_add(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Form(form): Form<FilterForm>,
) -> Result<Response, Failure> {
    use directory::filters::{self, Action, Field};
    admin.check(&form.csrf)?;
    let field = Field::from_str(form.field.trim()).map_err(|e| Failure::Refused(e.to_string()))?;
    let action = Action::from_str(form.action.trim()).map_err(|e| Failure::Refused(e.to_string()))?;
    let pattern = form.pattern.trim().to_string();
    let (rule, added) = state
        .store
        .write(Durability::Full, move |c| match filters::add(c, field, &pattern, action) {
            Ok(v) => Ok(Ok(v)),
            Err(filters::FilterError::Sqlite(e)) => Err(e.into()),
            Err(other) => Ok(Err(other.to_string())),
        })
        .await?
        .map_err(Failure::Refused)?;
    if !added {
        state
            .sessions
            .note(&admin.token, format!("Filter {} already matches {} {}; remove it first to change it.", rule.id, rule.field, rule.pattern));
        return Ok(Redirect::to("/filters").into_response());
    }
    done(&state, &admin, ip, format!("filter {} added: {} {} -> {}", rule.id, rule.field, rule.pattern, rule.action)).await;
    Ok(Redirect::to("/filters").into_response())
}

pub(super) async fn filter_remove(
    Extract(state): Extract<Shared>,
    admin: Admin,
    Extension(ip): Extension<ClientIp>,
    Form(form): Form<FilterForm>,
) -> Result<Response, Failure> {
    use directory::filters;
    admin.check(&form.csrf)?;
    let id = form.id;
    let rule = state
        .store
        .write(Durability::Full, move |c| match filters::remove(c, id) {
            Ok(v) => Ok(Ok(v)),
            Err(filters::FilterError::Sqlite(e)) => Err(e.into()),
            Err(other) => Ok(Err(other.to_string())),
        })
        .await?
        .map_err(Failure::Refused)?;
    done(&state, &admin, ip, format!("filter {id} removed ({} {})", rule.field, rule.pattern)).await;
    Ok(Redirect::to("/filters").into_response())
}
