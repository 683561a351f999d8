//! `postroom`: the one binary — SMTP server, POP3 server and mail framework (`serve`), and the
//! administrator's commands. See README.md for the i5/OS command map.
#![forbid(unsafe_code)]

mod commands;
mod filter_cmd;
mod lists;
mod queue_cmd;
mod sendmail;
mod serve;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postroom::config;

/// A complete mail suite for a small office: SMTP in, POP3 out, one durable queue between.
#[derive(Parser)]
#[command(name = "postroom", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML); without it the embedded default configuration is used.
    #[arg(long, global = true, env = "POSTROOM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (database, certificates); overrides `data_dir` of the configuration.
    #[arg(long, global = true, env = "POSTROOM_DATA", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log format of `serve`, overriding `[log] format`: human or json (one object a line).
    #[arg(long, global = true, value_name = "FORMAT", value_parser = ["human", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SMTP server, POP3 server and mail framework (i5/OS STRTCPSVR *SMTP *POP).
    Serve,
    /// Is each listener, the framework worker and the outbound client running; queue depths.
    /// Exit status 1 when something is down.
    Status,
    /// Manage users (i5/OS CRTUSRPRF + WRKDIRE).
    #[command(subcommand)]
    User(commands::UserCommand),
    /// Aliases and groups: the system alias table (F7).
    #[command(subcommand)]
    Alias(commands::AliasCommand),
    /// Manage local domains.
    #[command(subcommand)]
    Domain(commands::DomainCommand),
    /// Inspect the framework queue (i5/OS WRKDSTQ / HLDDSTQ).
    #[command(subcommand)]
    Queue(queue_cmd::QueueCommand),
    /// Access lists: relay, reject, near, kill, rbl, hostauth, and the temporary deny list
    /// (i5/OS ADDSMTPLE / RMVSMTPLE).
    #[command(subcommand)]
    List(lists::ListCommand),
    /// Which rule would accept or refuse a message from this client, and why. Exit status 0
    /// when every decision accepts, 1 when one refuses, 2 when the question cannot be answered.
    Explain(lists::ExplainArgs),
    /// Compose a MIME message (text, HTML, attachments) and submit it (F6, i5/OS QtmmSendMail).
    Send(sendmail::SendArgs),
    /// Read a message on standard input and submit it, like /usr/sbin/sendmail (F6): -t, -f FROM,
    /// -F NAME; -i -oi -oem -odi -B8BITMIME are accepted and ignored. Exit codes per sysexits.
    Sendmail {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0.., value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Filters: keep or discard mail by originator, subject, attachment name or MIME type
    /// (SMTP properties "Filters" page).
    #[command(subcommand)]
    Filter(filter_cmd::FilterCommand),
    /// Messages kept by a filter: list, show, release, delete.
    #[command(subcommand)]
    Quarantine(filter_cmd::QuarantineCommand),
    /// Show the journal (i5/OS DSPJRN QZMF).
    Journal(commands::JournalArgs),
    /// Check the configuration.
    #[command(subcommand)]
    Config(commands::ConfigCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut loaded = config::Config::load(cli.config.as_deref(), cli.data_dir.as_deref());
    if let (Ok(cfg), Some(format)) = (loaded.as_mut(), cli.log_format.as_deref()) {
        cfg.log.format = if format == "json" { config::LogFormat::Json } else { config::LogFormat::Human };
    }
    let result = match (cli.command, loaded) {
        (Command::Sendmail { args }, Ok(cfg)) => return ExitCode::from(sendmail::sendmail(&args, &cfg)),
        (Command::Send(a), Ok(cfg)) => return ExitCode::from(sendmail::send(a, &cfg)),
        (Command::Sendmail { .. } | Command::Send(_), Err(e)) => {
            eprintln!("postroom: {e}");
            return ExitCode::from(sendmail::EX_TEMPFAIL);
        }
        (Command::Config(c), loaded) => commands::config(c, loaded),
        (_, Err(e)) => Err(anyhow::anyhow!("{e}")),
        (Command::Serve, Ok(cfg)) => serve::serve(cfg),
        (Command::Status, Ok(cfg)) => match status::status(&cfg) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        (Command::User(c), Ok(cfg)) => commands::user(c, &cfg),
        (Command::Domain(c), Ok(cfg)) => commands::domain(c, &cfg),
        (Command::Alias(c), Ok(cfg)) => commands::alias(c, &cfg),
        (Command::Queue(c), Ok(cfg)) => queue_cmd::queue(c, &cfg),
        (Command::Journal(a), Ok(cfg)) => commands::journal(a, &cfg),
        (Command::List(c), Ok(cfg)) => lists::list(c, &cfg),
        // As grep: 0 every decision accepts, 1 something is refused, 2 the question was wrong.
        (Command::Explain(a), Ok(cfg)) => match lists::explain(a, &cfg) {
            Ok(accepted) => return ExitCode::from(u8::from(!accepted)),
            Err(e) => {
                eprintln!("postroom: {e:#}");
                return ExitCode::from(2);
            }
        },
        (Command::Filter(c), Ok(cfg)) => filter_cmd::filter(c, &cfg),
        (Command::Quarantine(c), Ok(cfg)) => filter_cmd::quarantine(c, &cfg),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postroom: {e:#}");
            ExitCode::from(1)
        }
    }
}
