//! `postroom`: the one binary — SMTP server, POP3 server and mail framework (`serve`), and the
//! administrator's commands. See README.md for the i5/OS command map.
#![forbid(unsafe_code)]

mod backup_cmd;
mod cert_cmd;
mod commands;
mod dkim_cmd;
mod filter_cmd;
mod lists;
mod metrics;
mod out;
mod queue_cmd;
mod reload;
mod sendmail;
mod serve;
mod smime_cmd;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postroom::config;

use crate::out::errln;

/// A complete mail suite for a small office: SMTP in, POP3 out, one durable queue between.
#[derive(Parser)]
#[command(name = "postroom", version, about, long_about = None, after_help = AFTER_HELP)]
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
    /// Is each listener, the framework worker and the outbound client running; the storage
    /// threshold; queue depths. Exit status 1 when something is down or new mail is refused for
    /// lack of space.
    Status {
        /// One JSON object for scripts: listeners, workers, storage, queue depths.
        #[arg(long)]
        json: bool,
    },
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
    /// Read a message on standard input and submit it, like /usr/sbin/sendmail (F6), as the
    /// calling local user (any user may; the socket is `[smtp] local_socket`): -t, -f FROM,
    /// -F NAME; -i -oi -oem -odi -B8BITMIME are accepted and ignored. Without -f the sender is
    /// USER@<local_sender_domain>; a bare recipient NAME means NAME@<local_sender_domain>. Exit
    /// codes per sysexits: 0 accepted for at least one recipient (the refused ones are named on
    /// stderr), 64 usage, 67 no recipient accepted, 75 server not running, 77 no permission.
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
    /// The TLS certificate: the file to give mail programs, its names and fingerprints.
    #[command(subcommand)]
    Cert(cert_cmd::CertCommand),
    /// DKIM signing keys of the local domains (RFC 6376): keygen, list, remove, check the
    /// published record. Every message that leaves for a remote host is signed.
    #[command(subcommand)]
    Dkim(dkim_cmd::DkimCommand),
    /// S/MIME certificates for `send --sign/--encrypt` (F8): users' own with their keys
    /// (import), their correspondents' (add-recipient), list, remove.
    #[command(subcommand)]
    Smime(smime_cmd::SmimeCommand),
    /// A consistent copy of the running server's database, certificates and keys into one new
    /// archive FILE (0600).
    Backup(backup_cmd::BackupArgs),
    /// Restore an archive of `backup` into the data directory; refused while a server runs there,
    /// and over an existing database unless --force.
    Restore(backup_cmd::RestoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut loaded = config::Config::load(cli.config.as_deref(), cli.data_dir.as_deref());
    if let (Ok(cfg), Some(format)) = (loaded.as_mut(), cli.log_format.as_deref()) {
        cfg.log.format = if format == "json" { config::LogFormat::Json } else { config::LogFormat::Human };
    }
    // A command that only reads, or changes what is already there, needs the server's database:
    // in a data directory without one (no --config, a mistyped --data-dir) it would make an
    // empty one and answer "queue is empty".
    if let (Ok(cfg), false) = (&loaded, creates_database(&cli.command))
        && let Err(e) = commands::require_database(cfg, &data_dir_origin(&cli, cfg))
    {
        errln!("postroom: {}", out::chain(&e));
        // `explain` as grep: 2 when the question cannot be answered.
        return ExitCode::from(if matches!(cli.command, Command::Explain(_)) { 2 } else { 1 });
    }
    let result = match (cli.command, loaded) {
        (Command::Sendmail { args }, Ok(cfg)) => return ExitCode::from(sendmail::sendmail(&args, &cfg)),
        (Command::Send(a), Ok(cfg)) => return ExitCode::from(sendmail::send(a, &cfg)),
        (Command::Sendmail { .. } | Command::Send(_), Err(e)) => {
            errln!("postroom: {e}");
            return ExitCode::from(sendmail::config_unusable(cli.config.as_deref()));
        }
        (Command::Config(c), loaded) => commands::config(c, loaded),
        (_, Err(e)) => Err(anyhow::anyhow!("{e}")),
        (Command::Serve, Ok(cfg)) => {
            // O6: SIGHUP reads the configuration again, from where it came from now.
            let log_format = cli.log_format.as_deref().map(|f| if f == "json" { config::LogFormat::Json } else { config::LogFormat::Human });
            serve::serve(cfg, reload::Source { config: cli.config.clone(), data_dir: cli.data_dir.clone(), log_format })
        }
        (Command::Status { json }, Ok(cfg)) => match if json { status::status_json(&cfg) } else { status::status(&cfg) } {
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
                errln!("postroom: {}", out::chain(&e));
                return ExitCode::from(2);
            }
        },
        (Command::Filter(c), Ok(cfg)) => filter_cmd::filter(c, &cfg),
        (Command::Quarantine(c), Ok(cfg)) => filter_cmd::quarantine(c, &cfg),
        (Command::Cert(c), Ok(cfg)) => cert_cmd::cert(c, &cfg),
        (Command::Dkim(c), Ok(cfg)) => dkim_cmd::dkim(c, &cfg),
        (Command::Smime(c), Ok(cfg)) => smime_cmd::smime(c, &cfg),
        (Command::Backup(a), Ok(cfg)) => backup_cmd::backup(a, &cfg),
        (Command::Restore(a), Ok(cfg)) => backup_cmd::restore(a, &cfg),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("postroom: {}", out::chain(&e));
            ExitCode::from(1)
        }
    }
}

/// After the command list in `postroom --help`.
const AFTER_HELP: &str = "\
Exit status: 0 done, 1 an error (named on standard error), 2 a usage error; `status` 1 when
something is down or storage is low, `explain` 1 when a decision refuses (2 when it cannot
answer); 141 when standard output was closed early (`postroom journal | head -1`), as for a
program SIGPIPE ends.

Commands that only read (list, show, status, journal, explain) or change what exists (remove,
disable, hold, ...) refuse a data directory without a database: use the server's --config FILE
or --data-dir DIR. `serve`, `restore` and the commands that add (user add, list add, ...) create
it.";

/// Where the data directory of `config` came from, for messages.
fn data_dir_origin(cli: &Cli, config: &config::Config) -> String {
    match (&cli.data_dir, &cli.config) {
        (Some(_), _) => "--data-dir or POSTROOM_DATA".into(),
        (None, Some(_)) => format!("data_dir in {}", config.origin),
        (None, None) => "the built-in default configuration: no --config or POSTROOM_CONFIG was given".into(),
    }
}

/// Commands that may run on a data directory without a database: `serve`, the ones that add
/// something (how a first setup starts, before the first `serve`) and `restore`, which create it;
/// `config check`, `cert` (they open no database) and `send`/`sendmail` (they talk to the running
/// server). Every other command needs the database a server or an earlier command made: a new
/// command is refused there until it is listed here.
fn creates_database(command: &Command) -> bool {
    use commands::{AliasCommand, DomainCommand, UserCommand};
    matches!(
        command,
        Command::Serve
            | Command::Config(_)
            | Command::Cert(_)
            | Command::Restore(_)
            | Command::Send(_)
            | Command::Sendmail { .. }
            | Command::User(UserCommand::Add { .. })
            | Command::Alias(AliasCommand::Add { .. })
            | Command::Domain(DomainCommand::Add { .. })
            | Command::List(lists::ListCommand::Add { .. } | lists::ListCommand::ImportLegacy { .. })
            | Command::Filter(filter_cmd::FilterCommand::Add(_))
            | Command::Dkim(dkim_cmd::DkimCommand::Keygen { .. })
            | Command::Smime(smime_cmd::SmimeCommand::AddRecipient { .. })
    )
}
