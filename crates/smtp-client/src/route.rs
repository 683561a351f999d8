//! Where a domain's mail goes (SPEC C1, C2): the mail router if one is set, else the MX hosts
//! in preference order (RFC 5321 §5.1), else the domain's own address; the host table wins
//! over DNS. What DNS says decides between trying, deferring and failing.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use dns::{AddressAnswer, Dns, MxAnswer};

/// One host to try, with its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Host {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
}

/// The routing decision for one destination domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Hosts(Vec<Host>),
    /// Try again later (SERVFAIL, timeout, an unresolvable router).
    Defer(String),
    /// Fail the recipients: a full reply text with enhanced status ("5.1.2 …").
    Fail(String),
}

/// What routing needs to know.
#[derive(Clone, Debug, Default)]
pub struct RouteSettings {
    /// `[delivery] mail_router` as host and port: everything goes there (C2).
    pub mail_router: Option<(String, u16)>,
    pub remote_port: u16,
    /// Host name → address, consulted before DNS.
    pub host_table: BTreeMap<String, IpAddr>,
    /// This server's own SMTP addresses and name: an MX that is us is a loop (5.4.6).
    pub own_addresses: Vec<SocketAddr>,
    pub own_hostname: String,
}

impl RouteSettings {
    fn is_self(&self, host: &Host) -> bool {
        host.name.eq_ignore_ascii_case(&self.own_hostname)
            || host.addrs.iter().any(|a| {
                self.own_addresses.iter().any(|own| own.port() == a.port() && (own.ip() == a.ip() || (own.ip().is_unspecified() && is_local(a.ip()))))
            })
    }
}

fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified()
}

/// Resolve `name` to addresses on `port`: host table first, then A/AAAA.
async fn host(settings: &RouteSettings, dns: Option<&Dns>, name: &str, port: u16) -> Result<Host, AddressAnswer> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if let Some(ip) = settings.host_table.get(&name) {
        return Ok(Host { addrs: vec![SocketAddr::new(*ip, port)], name });
    }
    if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(Host { addrs: vec![SocketAddr::new(ip, port)], name });
    }
    let Some(dns) = dns else { return Err(AddressAnswer::Error("no DNS resolver".into())) };
    match dns.addresses(&name).await {
        AddressAnswer::Found(ips) => Ok(Host { addrs: ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(), name }),
        other => Err(other),
    }
}

pub async fn route(settings: &RouteSettings, dns: Option<&Dns>, domain: &str) -> Route {
    // C2: through the router or not at all: if it cannot be resolved, mail waits.
    if let Some((router, port)) = &settings.mail_router {
        return match host(settings, dns, router, *port).await {
            Ok(h) if settings.is_self(&h) => Route::Fail(format!("5.4.6 mail router {router} is this server: mail loops back to myself")),
            Ok(h) => Route::Hosts(vec![h]),
            Err(e) => Route::Defer(format!("4.4.3 mail router {router} cannot be resolved: {e:?}")),
        };
    }
    let port = settings.remote_port;
    if settings.host_table.contains_key(domain) {
        return finish(settings, domain, vec![host(settings, dns, domain, port).await.expect("in the host table")]);
    }
    let Some(dns) = dns else { return Route::Defer("4.4.3 no DNS resolver".into()) };
    match dns.mx(domain).await {
        MxAnswer::NullMx => Route::Fail(format!("5.1.10 {domain} accepts no mail (null MX, RFC 7505)")),
        MxAnswer::NoSuchDomain => Route::Fail(format!("5.1.2 {domain}: no such domain")),
        MxAnswer::Error(e) => Route::Defer(format!("4.4.3 MX lookup for {domain} failed: {e}")),
        MxAnswer::Implicit => match host(settings, Some(dns), domain, port).await {
            Ok(h) => finish(settings, domain, vec![h]),
            Err(AddressAnswer::Error(e)) => Route::Defer(format!("4.4.3 address lookup for {domain} failed: {e}")),
            Err(_) => Route::Fail(format!("5.1.2 {domain}: no MX and no address")),
        },
        MxAnswer::Hosts(names) => {
            let mut hosts = Vec::new();
            let mut errors = Vec::new();
            for name in names {
                match host(settings, Some(dns), &name, port).await {
                    Ok(h) => hosts.push(h),
                    Err(AddressAnswer::Error(e)) => errors.push(e),
                    Err(_) => {}
                }
            }
            if hosts.is_empty() {
                return if errors.is_empty() {
                    Route::Fail(format!("5.4.4 no MX host of {domain} has an address"))
                } else {
                    Route::Defer(format!("4.4.3 MX hosts of {domain} cannot be resolved: {}", errors.join("; ")))
                };
            }
            finish(settings, domain, hosts)
        }
    }
}

/// RFC 5321 §5.1: when this server is one of the MX hosts, only more preferred hosts may be
/// tried; when it is the best one, the mail loops (5.4.6).
fn finish(settings: &RouteSettings, domain: &str, hosts: Vec<Host>) -> Route {
    let better: Vec<Host> = hosts.into_iter().take_while(|h| !settings.is_self(h)).collect();
    if better.is_empty() {
        return Route::Fail(format!("5.4.6 mail for {domain} loops back to myself"));
    }
    Route::Hosts(better)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RouteSettings {
        let mut host_table = BTreeMap::new();
        host_table.insert("mx.remote.example".to_string(), "127.0.0.50".parse().unwrap());
        host_table.insert("loop.example".to_string(), "127.0.0.1".parse().unwrap());
        RouteSettings {
            mail_router: None,
            remote_port: 2525,
            host_table,
            own_addresses: vec!["127.0.0.1:2525".parse().unwrap()],
            own_hostname: "mail.example.test".into(),
        }
    }

    #[tokio::test]
    async fn host_table_routes_and_self_is_a_loop() {
        let s = settings();
        assert_eq!(
            route(&s, None, "mx.remote.example").await,
            Route::Hosts(vec![Host { name: "mx.remote.example".into(), addrs: vec!["127.0.0.50:2525".parse().unwrap()] }])
        );
        assert!(matches!(route(&s, None, "loop.example").await, Route::Fail(r) if r.starts_with("5.4.6")));
        assert!(matches!(route(&s, None, "other.example").await, Route::Defer(_)), "no DNS: wait");
    }

    #[tokio::test]
    async fn router_takes_everything_and_waits_when_unresolvable() {
        let s = RouteSettings { mail_router: Some(("mx.remote.example".into(), 2600)), ..settings() };
        assert!(matches!(route(&s, None, "anything.example").await, Route::Hosts(h) if h[0].addrs[0].port() == 2600));
        let s = RouteSettings { mail_router: Some(("unknown.router".into(), 25)), ..settings() };
        assert!(matches!(route(&s, None, "anything.example").await, Route::Defer(_)), "never direct");
    }
}
