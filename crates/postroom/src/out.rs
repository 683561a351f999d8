//! Output of the administrator's commands. Every line they print goes through [`outln!`] /
//! [`out!`] (standard output) or [`errln!`] (standard error), never `println!`/`eprintln!`,
//! which panic when the reader has gone away (`postroom user list | head -1`: exit 101 and a
//! backtrace). The crate forbids `unsafe`, so SIGPIPE cannot be set back to its default action;
//! instead a write that fails with EPIPE ends the process quietly with status 141, the status a
//! shell reports for a program SIGPIPE ended (128 + 13), as `cat` or `yes` end under `| head`:
//! under `set -o pipefail` the pipeline says the output was cut short. `serve` and `sendmail`
//! write to standard error through their own paths and are not concerned.

use std::io::Write;

/// Exit status when the reader of standard output went away: 128 + SIGPIPE.
pub const BROKEN_PIPE: i32 = 141;

/// Write to standard output (locked for the whole line); see the module documentation.
pub fn stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        drop(out);
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE);
        }
        // A full disk behind a redirection, an I/O error: said once, no panic.
        stderr(format_args!("postroom: cannot write to standard output: {e}\n"));
        std::process::exit(1);
    }
}

/// Write to standard error. When that fails too there is nobody left to tell: ignored (the
/// exit status still says how the command ended).
pub fn stderr(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `println!` for the command-line commands: standard output, quiet exit 141 on a broken pipe.
macro_rules! outln {
    () => {
        $crate::out::stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the command-line commands.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::stdout(format_args!($($arg)*))
    };
}

/// `eprintln!` for the command-line commands: never panics.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {errln, out, outln};

/// An error with its causes, each once: `{:#}` of anyhow prints every cause after its context,
/// but many errors already end with their cause's text (`path: {source}` with `source` also
/// as the error's source), which then came out twice: "No such file or directory (os error 2):
/// No such file or directory (os error 2)". A cause the text so far already ends with is left
/// out.
pub fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !part.is_empty() && !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As thiserror's `#[error("{path}: {source}")]` with a `source` field makes it.
    #[derive(Debug)]
    struct WithPath {
        path: String,
        source: std::io::Error,
    }

    impl std::fmt::Display for WithPath {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for WithPath {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn chain_names_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let io_text = io.to_string();
        let e = anyhow::Error::new(WithPath { path: "/etc/cert.pem".into(), source: io }).context("[tls] cert/key: cannot load the certificate");
        assert_eq!(format!("{e:#}"), format!("[tls] cert/key: cannot load the certificate: /etc/cert.pem: {io_text}: {io_text}"));
        assert_eq!(chain(&e), format!("[tls] cert/key: cannot load the certificate: /etc/cert.pem: {io_text}"));
        // Causes that add something are all kept, in order.
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(chain(&e), "outer: middle: inner");
        assert_eq!(chain(&anyhow::anyhow!("alone")), "alone");
    }

    /// The command modules print only through the macros above (a `println!` there panics on a
    /// closed pipe): every module of the binary but the server's and `sendmail`'s, which write
    /// to standard error through their own paths (tracing, sysexits messages).
    #[test]
    fn command_modules_print_through_out() {
        const NOT_CLI: [&str; 6] = ["out.rs", "serve.rs", "sendmail.rs", "reload.rs", "metrics.rs", "config.rs"];
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut modules = Vec::new();
        for entry in std::fs::read_dir(&src).expect("src directory") {
            let path = entry.expect("src entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(".rs") && !NOT_CLI.contains(&name.as_str()) {
                modules.push((name, std::fs::read_to_string(&path).expect("module source")));
            }
        }
        assert!(modules.iter().any(|(name, _)| name == "commands.rs"), "no command modules found in {}", src.display());
        let banned = ["println!", "print!", "eprintln!", "eprint!", "dbg!"];
        let mut found = Vec::new();
        for (file, text) in &modules {
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for word in banned {
                    let hit =
                        code.match_indices(word).any(|(at, _)| !code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_'));
                    if hit {
                        found.push(format!("{file}:{}: {}", n + 1, line.trim()));
                        break;
                    }
                }
            }
        }
        assert!(found.is_empty(), "use outln!/out!/errln! (crate::out) instead:\n{}", found.join("\n"));
    }
}
