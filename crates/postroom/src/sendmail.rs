//! `postroom sendmail` (a /usr/sbin/sendmail for cron jobs and scripts) and `postroom send`
//! (SPEC F6): both hand a message to the running server over its local socket
//! (`Config::local_socket`, which every local user may reach), whose kernel-reported peer
//! credentials tell the server who is calling (A4). Exit codes are the sysexits scripts expect
//! from sendmail.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Args;
use smtp_client::local_submit::{self, SubmitError};

use postroom::config::Config;

/// sysexits.h
pub const EX_OK: u8 = 0;
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOUSER: u8 = 67;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_NOPERM: u8 = 77;

const USAGE: &str = "usage: postroom sendmail [-t] [-f FROM] [-F NAME] [-i] [-oi] [-oem] [-odi] [-B8BITMIME] [RECIPIENT...] < message";

/// The parsed sendmail command line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Sendmail {
    from: Option<String>,
    full_name: Option<String>,
    read_recipients: bool,
    recipients: Vec<String>,
}

/// sendmail's flags: `-fFROM` and `-f FROM` alike; flags scripts pass out of habit are ignored.
fn parse(args: &[String]) -> Result<Sendmail, String> {
    let mut s = Sendmail::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| -> Result<String, String> {
            match a.strip_prefix(flag).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v.to_string()),
                None => it.next().cloned().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match a.as_str() {
            "-t" => s.read_recipients = true,
            "-i" | "-oi" | "-oem" | "-odi" | "-odb" | "-B8BITMIME" | "-B7BIT" | "-U" | "--" => {}
            f if f.starts_with("-f") || f.starts_with("-r") => s.from = Some(value(&f[..2])?),
            f if f.starts_with("-F") => s.full_name = Some(value("-F")?),
            f if f.starts_with("-o") || f.starts_with("-B") => {}
            f if f.starts_with('-') => return Err(format!("unknown option {f}")),
            r => s.recipients.extend(r.split(',').map(str::trim).filter(|r| !r.is_empty()).map(str::to_string)),
        }
    }
    Ok(s)
}

/// Run `postroom sendmail ARGS` and return the exit code.
pub fn sendmail(args: &[String], config: &Config) -> u8 {
    let mut opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sendmail: {e}\n{USAGE}");
            return EX_USAGE;
        }
    };
    let mut message = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut message) {
        eprintln!("sendmail: reading the message: {e}");
        return EX_DATAERR;
    }
    let (headers, body) = split_headers(&message);
    let mut headers = headers.to_vec();
    if opts.read_recipients {
        opts.recipients.extend(header_addresses(&headers, &["to", "cc", "bcc"]));
        headers = remove_header(&headers, "bcc");
    }
    // A bare name is a user of the local domain (as Postfix appends myorigin); each address gets
    // the message once, however often the headers and arguments name it.
    let domain = config.local_sender_domain();
    let mut seen = std::collections::HashSet::new();
    opts.recipients = opts.recipients.iter().map(|r| qualify(r, &domain)).filter(|r| seen.insert(r.to_ascii_lowercase())).collect();
    if opts.recipients.is_empty() {
        eprintln!("sendmail: no recipients (give them as arguments, or -t to read To/Cc/Bcc)\n{USAGE}");
        return EX_USAGE;
    }
    let from = match opts.from.as_deref() {
        // -f '' or -f '<>': the null sender, for messages that must never bounce.
        Some("" | "<>") => String::new(),
        Some(f) => qualify(f, &domain),
        None => default_sender(config),
    };
    if header_addresses(&headers, &["from"]).is_empty() && !from.is_empty() {
        let line = match &opts.full_name {
            Some(name) => format!("From: \"{}\" <{from}>\n", name.replace('"', "")),
            None => format!("From: <{from}>\n"),
        };
        headers.splice(0..0, line.into_bytes());
    }
    let mut full = headers;
    full.extend_from_slice(body);
    submit(config, &from, &opts.recipients, &full)
}

/// Hand `message` to the server; report and map the outcome to a sysexits code.
pub fn submit(config: &Config, from: &str, recipients: &[String], message: &[u8]) -> u8 {
    let socket = socket_path(config);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postroom: {e}");
            return EX_SOFTWARE;
        }
    };
    match runtime.block_on(local_submit::submit(&socket, from, recipients, message)) {
        // The message went to the accepted recipients: exit 0, so a script does not send it
        // again (duplicates to those); the refused ones are named on stderr.
        Ok(report) => {
            for (rcpt, why) in &report.refused {
                eprintln!("postroom: not sent to {rcpt}: {why}");
            }
            EX_OK
        }
        Err(e) => {
            eprintln!("postroom: message not sent: {e}");
            exit_code(&e)
        }
    }
}

/// sysexits for a submission that did not go through.
fn exit_code(e: &SubmitError) -> u8 {
    match e {
        SubmitError::Unavailable(_) | SubmitError::Temporary(_) | SubmitError::Io(_) => EX_TEMPFAIL,
        SubmitError::NoPermission(_) | SubmitError::NotPermitted(_) => EX_NOPERM,
        SubmitError::NoRecipient(_) => EX_NOUSER,
        SubmitError::Refused(_) => EX_DATAERR,
    }
}

/// The exit code when the configuration cannot be loaded: 77 (EX_NOPERM) when this user may
/// not read the file (the administrator must make it readable: `sendmail` finds the socket
/// there), else 75 as before.
pub fn config_unusable(path: Option<&Path>) -> u8 {
    let denied = path.is_some_and(|p| std::fs::File::open(p).is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied));
    if denied { EX_NOPERM } else { EX_TEMPFAIL }
}

pub fn socket_path(config: &Config) -> PathBuf {
    config.local_socket()
}

/// Envelope sender when no -f is given: the calling user in the local sender domain (A4, the
/// first local domain unless `[smtp] local_sender_domain` says otherwise), so a bounce comes
/// back to this host instead of looping through a host name that is no mail domain. The user is
/// named the way the server names the peer of its local socket.
fn default_sender(config: &Config) -> String {
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(0);
    let name = smtp_server::local::user_name(uid).unwrap_or_else(|| format!("uid{uid}"));
    format!("{name}@{}", config.local_sender_domain())
}

/// `carol` → `carol@DOMAIN`; an address with a domain, and `postmaster` (every server takes it
/// bare, RFC 5321 §4.5.1), stay as they are.
fn qualify(address: &str, domain: &str) -> String {
    if is_bare_name(address) && !address.eq_ignore_ascii_case("postmaster") { format!("{address}@{domain}") } else { address.to_string() }
}

/// A local part without a domain: RFC 5322 atext and inner dots, nothing else.
fn is_bare_name(s: &str) -> bool {
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    !s.is_empty() && !s.starts_with('.') && !s.ends_with('.') && !s.contains("..") && s.chars().all(|c| atext(c) || c == '.')
}

/// The header section (with its blank line) and the body; LF or CRLF.
fn split_headers(message: &[u8]) -> (&[u8], &[u8]) {
    let mut i = 0;
    while i < message.len() {
        let line_end = message[i..].iter().position(|&b| b == b'\n').map(|p| i + p + 1).unwrap_or(message.len());
        let line = &message[i..line_end];
        if line == b"\n" || line == b"\r\n" {
            return message.split_at(line_end);
        }
        i = line_end;
    }
    (message, b"")
}

/// Header fields as (lowercase name, unfolded value).
fn fields(headers: &[u8]) -> Vec<(String, String, std::ops::Range<usize>)> {
    let mut out: Vec<(String, String, std::ops::Range<usize>)> = Vec::new();
    let mut i = 0;
    while i < headers.len() {
        let end = headers[i..].iter().position(|&b| b == b'\n').map(|p| i + p + 1).unwrap_or(headers.len());
        let line = String::from_utf8_lossy(&headers[i..end]).to_string();
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
                last.2.end = end;
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_ascii_lowercase(), value.trim().to_string(), i..end));
        }
        i = end;
    }
    out
}

/// Addresses in the named fields: `a@b`, `Name <a@b>`, a bare `name`, comma-separated.
fn header_addresses(headers: &[u8], names: &[&str]) -> Vec<String> {
    fields(headers)
        .into_iter()
        .filter(|(n, _, _)| names.contains(&n.as_str()))
        .flat_map(|(_, v, _)| {
            v.split(',')
                .filter_map(|part| {
                    let part = part.trim();
                    let addr = match (part.find('<'), part.rfind('>')) {
                        (Some(a), Some(b)) if a < b => &part[a + 1..b],
                        _ => part,
                    };
                    let addr = addr.trim();
                    (addr.contains('@') || is_bare_name(addr)).then(|| addr.to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The header section without the named field (and its continuation lines): -t strips Bcc.
fn remove_header(headers: &[u8], name: &str) -> Vec<u8> {
    let mut out = headers.to_vec();
    for (_, _, range) in fields(headers).into_iter().filter(|(n, _, _)| n == name).rev() {
        out.drain(range);
    }
    out
}

/// `postroom send`: compose a MIME message (F6) and submit it like sendmail.
#[derive(Args)]
pub struct SendArgs {
    /// Sender address (From and envelope); a local user other than root may use only their own.
    #[arg(long)]
    from: String,
    /// Recipient (repeatable).
    #[arg(long = "to", required = true)]
    to: Vec<String>,
    #[arg(long)]
    subject: String,
    /// A file to attach (repeatable).
    #[arg(long = "attach", value_name = "FILE")]
    attach: Vec<PathBuf>,
    /// An HTML alternative of the text body (read from FILE).
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// S/MIME-sign (F8): multipart/signed, SHA-256, with the certificate and key `postroom smime
    /// import` kept for the user who owns the From address.
    #[arg(long)]
    sign: bool,
    /// S/MIME-encrypt (F8) for every recipient and the sender (the sent copy stays readable); a
    /// recipient without a certificate (`postroom smime add-recipient`) stops the send. With
    /// --sign: signed, then encrypted.
    #[arg(long)]
    encrypt: bool,
}

/// Build the message with mail-builder; the text body comes from standard input. Unlike
/// `sendmail`, `send` follows the other commands: exit 0, or 1 with the reason on stderr.
pub fn send(args: SendArgs, config: &Config) -> u8 {
    u8::from(compose_and_submit(args, config) != EX_OK)
}

fn compose_and_submit(args: SendArgs, config: &Config) -> u8 {
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("postroom: reading the body: {e}");
        return EX_DATAERR;
    }
    let html = match args.html.as_deref().map(std::fs::read_to_string).transpose() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("postroom: --html: {e}");
            return EX_USAGE;
        }
    };
    let mut attachments = Vec::new();
    for path in &args.attach {
        match std::fs::read(path) {
            Ok(bytes) => attachments.push((path.clone(), bytes)),
            Err(e) => {
                eprintln!("postroom: --attach {}: {e}", path.display());
                return EX_USAGE;
            }
        }
    }
    let domain = config.local_sender_domain();
    let from = qualify(&args.from, &domain);
    let to: Vec<String> = args.to.iter().map(|t| qualify(t, &domain)).collect();
    let message = compose(&config.hostname, &from, &to, &args.subject, &text, html.as_deref(), &attachments);
    // Issue 18: an S/MIME failure sends nothing, rather than the message in plain text.
    let message = match crate::smime_cmd::protect(config, &from, &to, &message, args.sign, args.encrypt) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("postroom: message not sent: {}", crate::out::chain(&e));
            return EX_DATAERR;
        }
    };
    submit(config, &from, &to, &message)
}

/// The send-mail API (F6): a MIME message with a text body, an optional HTML alternative and
/// attachments. Its Message-ID names `hostname`, the configured one (the system's host name may
/// be no mail domain at all).
pub fn compose(
    hostname: &str,
    from: &str,
    to: &[String],
    subject: &str,
    text: &str,
    html: Option<&str>,
    attachments: &[(PathBuf, Vec<u8>)],
) -> Vec<u8> {
    let mut builder = mail_builder::MessageBuilder::new()
        .message_id(message_id(hostname))
        .from(from.to_string())
        .to(to.iter().map(|t| t.to_string()).collect::<Vec<String>>())
        .subject(subject.to_string())
        .text_body(text.to_string());
    if let Some(html) = html {
        builder = builder.html_body(html.to_string());
    }
    for (path, bytes) in attachments {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "attachment".into());
        builder = builder.attachment(content_type(path), name, bytes.clone());
    }
    builder.write_to_vec().unwrap_or_default()
}

/// `<time.pid.random@hostname>`: unique without a shared counter (RFC 5322 §3.6.4).
fn message_id(hostname: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // RandomState is seeded from the OS's random source: 64 random bits without a dependency.
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    format!("{}.{:09}.{}.{random:016x}@{hostname}", now.as_secs(), now.subsec_nanos(), std::process::id())
}

fn content_type(path: &Path) -> &'static str {
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "csv" => "text/plain",
        "html" | "htm" => "text/html",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "zip" => "application/zip",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sendmail_flags() {
        let s = parse(&strings(&[
            "-i",
            "-oi",
            "-oem",
            "-odi",
            "-B8BITMIME",
            "-fcron@example.test",
            "-F",
            "Cron Daemon",
            "a@x.test,b@x.test",
            "c@x.test",
        ]))
        .unwrap();
        assert_eq!(s.from.as_deref(), Some("cron@example.test"));
        assert_eq!(s.full_name.as_deref(), Some("Cron Daemon"));
        assert_eq!(s.recipients, strings(&["a@x.test", "b@x.test", "c@x.test"]));
        assert!(parse(&strings(&["-t", "-f", "x@y.test"])).unwrap().read_recipients);
        assert!(parse(&strings(&["-q"])).is_err());
        assert!(parse(&strings(&["-f"])).is_err());
    }

    #[test]
    fn minus_t_reads_and_strips_bcc() {
        let headers = b"To: A <a@x.test>, b@x.test\nBcc: secret@x.test,\n other@x.test\nSubject: hi\n\n";
        assert_eq!(header_addresses(headers, &["to", "cc", "bcc"]), strings(&["a@x.test", "b@x.test", "secret@x.test", "other@x.test"]));
        assert_eq!(remove_header(headers, "bcc"), b"To: A <a@x.test>, b@x.test\nSubject: hi\n\n");
        let (h, b) = split_headers(b"A: 1\r\n\r\nbody\n");
        assert_eq!((h, b), (&b"A: 1\r\n\r\n"[..], &b"body\n"[..]));
    }

    #[test]
    fn composed_message_has_its_attachment() {
        let msg = compose(
            "mail.x.test",
            "a@x.test",
            &strings(&["b@x.test"]),
            "Report",
            "see attached",
            None,
            &[(PathBuf::from("r.pdf"), b"%PDF-1.4".to_vec())],
        );
        let text = String::from_utf8_lossy(&msg);
        assert!(text.contains("Subject: Report") && text.contains("application/pdf") && text.contains("r.pdf"), "{text}");
        let id = text.lines().find(|l| l.starts_with("Message-ID: ")).unwrap_or_default();
        assert!(id.starts_with("Message-ID: <") && id.ends_with("@mail.x.test>"), "{id}");
    }

    #[test]
    fn bare_names_are_qualified() {
        assert_eq!(qualify("carol", "example.test"), "carol@example.test");
        assert_eq!(qualify("first.last", "example.test"), "first.last@example.test");
        assert_eq!(qualify("Postmaster", "example.test"), "Postmaster");
        assert_eq!(qualify("a@b.test", "example.test"), "a@b.test");
        assert_eq!(qualify("not a name", "example.test"), "not a name");
        assert_eq!(header_addresses(b"To: Carol <carol>, undisclosed-recipients:;\n\n", &["to"]), strings(&["carol"]));
    }
}
