//! Writes generated messages straight into a Maildir (`new/`), for filling a peer server's
//! mailboxes (Dovecot) with the same messages the SMTP load sends, without an MTA in between.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::msggen::{MessageFactory, dot_unstuff};
use crate::stats::{J, json_line};

pub struct MaildirOpts {
    pub dir: PathBuf,
    pub messages: u64,
    pub size: usize,
    pub from: String,
    pub to: Vec<String>,
}

pub fn run(opts: MaildirOpts) -> Result<()> {
    for sub in ["cur", "new", "tmp"] {
        let d = opts.dir.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {d:?}"))?;
    }
    let factory = MessageFactory::new(opts.size, &opts.from, &opts.to);
    let host = "loadgen.example.test";
    let pid = std::process::id();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut wire = Vec::new();
    let mut bytes = 0u64;
    for seq in 0..opts.messages {
        factory.write_wire(seq, &mut wire);
        let Some(mut raw) = dot_unstuff(&wire) else {
            bail!("generated message {seq} is not valid dot-stuffed data");
        };
        // Maildir files use the local line ending (LF).
        raw.retain(|&c| c != b'\r');
        let name = format!("{now}.P{pid}Q{seq}.{host},S={}", raw.len());
        let tmp = opts.dir.join("tmp").join(&name);
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{tmp:?}"))?;
        f.write_all(&raw)?;
        drop(f);
        std::fs::rename(&tmp, opts.dir.join("new").join(&name))?;
        bytes += raw.len() as u64;
    }
    println!("{}", json_line(&[("written", J::U(opts.messages)), ("bytes", J::U(bytes))]));
    Ok(())
}
