//! O6: what SIGHUP does to a running `serve`, and the service manager's notifications.
//!
//! A reload re-reads the configuration file the server was started with (the same `--config`,
//! `--data-dir` and `--log-format`), checks it as `config check` does, and splits what changed:
//! settings the servers take for their next session ([`LIVE`]: relay rules, limits, timeouts,
//! delivery, reports, filters, TLS) are applied; the others (listen addresses, data_dir, domains,
//! DNS, journal, log, …) keep their running values and are named in the log as needing a restart.
//! A file that fails the check changes nothing. The applying itself is in `serve.rs`.
//!
//! [`notify`] speaks systemd's sd_notify protocol (READY=1, RELOADING=1, STOPPING=1) by hand:
//! one datagram to the socket named by `$NOTIFY_SOCKET`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

use postroom::config::{Config, LogFormat};

/// Where the configuration of `serve` comes from, so a reload reads it the same way.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// `--config` / `POSTROOM_CONFIG`; None = the embedded default (a reload then changes nothing).
    pub config: Option<PathBuf>,
    /// `--data-dir` / `POSTROOM_DATA`.
    pub data_dir: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
}

impl Source {
    /// Read and check the configuration as the command line at start did.
    pub fn load(&self) -> Result<Config, postroom::config::ConfigError> {
        let mut config = Config::load(self.config.as_deref(), self.data_dir.as_deref())?;
        if let Some(format) = self.log_format {
            config.log.format = format;
        }
        Ok(config)
    }
}

/// The keys a reload applies ("section.*" is a whole section). Every other key, including one
/// added later and not listed here, keeps its running value until a restart.
pub const LIVE: &[&str] = &[
    "hostname",
    "smtp.max_message_size",
    "smtp.max_recipients",
    "smtp.max_sessions",
    "smtp.max_sessions_per_ip",
    "smtp.submission_max_sessions",
    "smtp.submission_max_sessions_per_ip",
    "smtp.local_max_sessions",
    "smtp.local_sender_domain",
    "smtp.greeting_timeout_secs",
    "smtp.command_timeout_secs",
    "smtp.data_timeout_secs",
    "smtp.max_session_secs",
    "smtp.max_errors",
    "smtp.vrfy",
    "smtp.allow_bare_lf",
    "smtp.percent_routing",
    "smtp.max_hops",
    "smtp.helo_verify",
    "smtp.auth",
    "smtp.verify_from_user",
    "smtp.dsn",
    "tls.cert",
    "tls.key",
    "tls.allow_plaintext_auth",
    "tls.handshake_timeout_secs",
    // Not `tls.acme`: the ACME task, its account and its HTTP-01 listeners are set up at start
    // (O6); a changed [tls.acme] waits for a restart.
    "pop3.inactivity_timeout_secs",
    "pop3.max_sessions",
    "pop3.max_sessions_per_ip",
    // O5: not the listen addresses, which wait for a restart as every listener's do.
    "ldap.anonymous_networks",
    "ldap.size_limit",
    "ldap.max_sessions",
    "ldap.inactivity_timeout_secs",
    "relay.*",
    "delivery.mail_router",
    "delivery.remote_port",
    "delivery.host_table",
    "delivery.bind_address",
    "delivery.queue_lifetime_hours",
    "delivery.etrn_domains",
    "delivery.etrn_clients",
    "delivery.first_retry_count",
    "delivery.first_retry_interval_secs",
    "delivery.second_retry_count",
    "delivery.second_retry_interval_secs",
    "delivery.starttls",
    "delivery.dsn_responsible_person",
    "delivery.delay_warning_secs",
    "storage.filter_max_bytes",
    "storage.filter_unscannable",
    // E1: the settings; the resolver they use is `[dns]`'s, which waits for a restart.
    "auth.*",
    // Issue 21: sessions and the hourly expiry take the new values.
    "greylist.*",
    // Issue 21: sessions accepted after the reload run the new milters.
    "milter.*",
];

/// Does a reload apply `key`?
pub fn is_live(key: &str) -> bool {
    LIVE.iter().any(|p| p.strip_suffix('*').map_or(*p == key, |section| key.starts_with(section)))
}

/// A key whose new value waits for a restart.
#[derive(Debug, PartialEq)]
pub struct Waiting {
    pub key: String,
    /// The value in use (TOML syntax).
    pub running: String,
    /// The value in the file.
    pub file: String,
}

/// What a reload does with a checked configuration file.
#[derive(Debug)]
pub struct Reload {
    /// The configuration to run with from now on: the file's values for the [`LIVE`] keys, the
    /// running values for the others.
    pub effective: Config,
    /// The keys whose new values are applied.
    pub applied: Vec<String>,
    /// The keys whose new values need a restart.
    pub waiting: Vec<Waiting>,
}

impl Reload {
    /// One line for the log: what changed, and what waits for a restart.
    pub fn waiting_text(&self) -> String {
        let mut text = String::new();
        for (i, w) in self.waiting.iter().enumerate() {
            let sep = if i == 0 { "" } else { "; " };
            let _ = write!(text, "{sep}{} = {} (running: {})", w.key, w.file, w.running);
        }
        text
    }
}

/// Split the change from `running` to `file` (both checked) into what is applied and what
/// waits for a restart. The mixture is checked again: it fails if it breaks a rule that relates
/// a key that is applied to one that waits.
pub fn prepare(running: &Config, file: Config) -> Result<Reload, String> {
    let old = flatten(running)?;
    let mut new = flatten(&file)?;
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let (mut applied, mut waiting) = (Vec::new(), Vec::new());
    let mut keep = Vec::new();
    for key in keys {
        let (was, now) = (old.get(key.as_str()), new.get(key.as_str()));
        if was == now {
            continue;
        }
        if is_live(key) {
            applied.push(key.clone());
        } else {
            let show = |v: Option<&toml::Value>| v.map_or_else(|| "(unset)".to_string(), ToString::to_string);
            waiting.push(Waiting { key: key.clone(), running: show(was), file: show(now) });
            keep.push((key.clone(), was.cloned()));
        }
    }
    for (key, value) in keep {
        match value {
            Some(v) => new.insert(key, v),
            None => new.remove(&key),
        };
    }
    let mut effective = unflatten(new)?;
    effective.origin = file.origin.clone();
    effective.validate().map_err(|e| e.to_string())?;
    Ok(Reload { effective, applied, waiting })
}

/// "section.key" (or "key" at the top) → value.
fn flatten(config: &Config) -> Result<std::collections::BTreeMap<String, toml::Value>, String> {
    let toml::Value::Table(top) = toml::Value::try_from(config).map_err(|e| e.to_string())? else {
        return Err("the configuration is not a table".into());
    };
    let mut out = std::collections::BTreeMap::new();
    for (key, value) in top {
        match value {
            toml::Value::Table(section) => out.extend(section.into_iter().map(|(k, v)| (format!("{key}.{k}"), v))),
            value => {
                out.insert(key, value);
            }
        }
    }
    Ok(out)
}

fn unflatten(flat: std::collections::BTreeMap<String, toml::Value>) -> Result<Config, String> {
    let mut top = toml::Table::new();
    for (key, value) in flat {
        match key.split_once('.') {
            Some((section, k)) => {
                let entry = top.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = entry {
                    t.insert(k.to_string(), value);
                }
            }
            None => {
                top.insert(key, value);
            }
        }
    }
    toml::Value::Table(top).try_into().map_err(|e: toml::de::Error| e.to_string())
}

/// sd_notify(3): send `state` ("READY=1", …) to the service manager, when there is one
/// (`$NOTIFY_SOCKET`: a path, or an abstract socket name after '@'). Failures are logged and
/// otherwise ignored: the server runs the same without a manager.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = send_notify(&socket, state) {
        tracing::warn!(socket = %socket.to_string_lossy(), error = %e, "cannot notify the service manager");
    }
}

fn send_notify(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let bytes = socket.as_bytes();
    let datagram = UnixDatagram::unbound()?;
    let sent = match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            datagram.send_to_addr(state.as_bytes(), &addr)?
        }
        Some(b'/') => datagram.send_to(state.as_bytes(), socket)?,
        _ => return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is neither a path nor an abstract name")),
    };
    if sent != state.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "short datagram"));
    }
    Ok(())
}

/// "RELOADING=1" with the CLOCK_MONOTONIC time in microseconds, which systemd 253 and later
/// want with it (Type=notify-reload).
pub fn reloading() -> String {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        let c = Config::parse(text, "t.toml").unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn live_keys_are_applied_the_others_wait() {
        let running = parse("");
        let file = parse(
            r#"relay = { mode = "list" }
               smtp = { max_message_size = 2048, listen = ["127.0.0.1:2600"] }
               data_dir = "elsewhere"
               delivery = { mail_router = "relay.test:25", max_connections = 3 }"#,
        );
        let r = prepare(&running, file).unwrap();
        assert_eq!(r.applied, ["delivery.mail_router", "relay.mode", "smtp.max_message_size"]);
        let waiting: Vec<&str> = r.waiting.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(waiting, ["data_dir", "delivery.max_connections", "smtp.listen"]);
        assert_eq!(r.effective.relay.mode, postroom::config::RelayMode::List);
        assert_eq!(r.effective.smtp.max_message_size, 2048);
        assert_eq!(r.effective.delivery.mail_router, "relay.test:25");
        // What waits keeps its running value.
        assert_eq!(r.effective.smtp.listen, running.smtp.listen);
        assert_eq!(r.effective.data_dir, running.data_dir);
        assert_eq!(r.effective.delivery.max_connections, running.delivery.max_connections);
        let text = r.waiting_text();
        assert!(text.contains(r#"smtp.listen = ["127.0.0.1:2600"] (running: ["127.0.0.1:2525"])"#), "{text}");
        assert_eq!(r.effective.origin, "t.toml");
    }

    #[test]
    fn production_example_is_valid_and_quiet() {
        let text = include_str!("../../../etc/postroom-production.toml");
        let c = Config::parse(text, "etc/postroom-production.toml").unwrap();
        c.validate().unwrap();
        assert_eq!(c.warnings(), Vec::<String>::new());
        assert_eq!(c.data_dir, std::path::Path::new("/var/lib/postroom"));
        let ports: Vec<u16> = c.listeners().iter().map(|l| l.addr.port()).collect();
        assert_eq!(ports, [25, 587, 465, 110, 995]);
        assert!(c.listeners().iter().all(|l| l.addr.ip().is_unspecified()));
        // The directory systemd makes for the service (RuntimeDirectory=postroom).
        assert_eq!(c.local_socket(), std::path::Path::new("/run/postroom/sendmail.sock"));
    }

    #[test]
    fn nothing_changed_is_nothing_to_do() {
        let r = prepare(&parse(""), parse("")).unwrap();
        assert!(r.applied.is_empty() && r.waiting.is_empty());
        assert_eq!(r.effective, parse(""));
    }

    #[test]
    fn whole_sections_and_unknown_keys() {
        assert!(is_live("tls.cert") && is_live("relay.pop_minutes") && is_live("hostname"));
        assert!(!is_live("smtp.listen") && !is_live("data_dir") && !is_live("domains") && !is_live("log.level"));
        assert!(!is_live("smtp.some_key_added_later"), "an unknown key waits for a restart");
        assert!(!is_live("relay"), "a section name alone is no key");
        assert!(is_live("tls.key") && is_live("tls.handshake_timeout_secs"));
        assert!(is_live("greylist.enabled") && is_live("greylist.delay_secs"), "issue 21: greylisting reloads");
        assert!(is_live("milter.servers") && is_live("milter.mx") && is_live("milter.submission"), "issue 21: milters reload");
    }

    #[test]
    fn acme_waits_for_a_restart() {
        // O6: [tls.acme] is set up at start; a reload names it and keeps the running values.
        let running = parse("");
        let file = parse("tls.acme = { directory = \"https://acme.test/dir\", http_listen = [\"127.0.0.1:8080\"] }");
        let r = prepare(&running, file).unwrap();
        assert_eq!(r.waiting.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(), ["tls.acme"]);
        assert!(!r.effective.tls.acme.enabled());
        assert!(r.waiting_text().starts_with("tls.acme = "), "{}", r.waiting_text());
    }

    #[test]
    fn notify_reaches_a_path_and_an_abstract_socket() {
        use std::os::unix::net::UnixDatagram;
        let dir = std::env::temp_dir().join(format!("postroom-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        send_notify(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("postroom-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        send_notify(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(send_notify(std::ffi::OsStr::new("vsock:2:1"), "READY=1").is_err());
        assert!(reloading().starts_with("RELOADING=1\nMONOTONIC_USEC="));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
