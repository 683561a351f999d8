//! Runs one message past a real milter and prints the outcome (issue 21): a blocking driver
//! around [`milter::Conversation`], to check the codec against opendkim, spamass-milter, ...
//!
//! ```sh
//! cargo run -p milter --example milter-check -- 127.0.0.1:8891 message.eml [timeout_secs]
//! ```
//!
//! The message file is a whole RFC 5322 message (CRLF or LF line ends); the envelope is
//! `jane@remote.example` → `sam@example.test`, from 192.0.2.7. The server's own driver (async,
//! with per-stage timeouts and the default action) is the next step; this one is for trying.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use milter::{Client, ClientAddress, Conversation, Decoder, Message, Recipient, Step};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(address), Some(file)) = (args.get(1), args.get(2)) else {
        return Err("usage: milter-check HOST:PORT MESSAGE-FILE [TIMEOUT-SECS]".into());
    };
    let timeout = Duration::from_secs(args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10));
    let raw = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
    let message = message(&raw);

    let mut stream = TcpStream::connect(address).map_err(|e| format!("connect to {address}: {e}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut conversation = Conversation::new(message);
    let mut decoder = Decoder::new();
    let mut buf = [0u8; 65536];
    loop {
        match conversation.step() {
            Step::Send(bytes) => stream.write_all(&bytes)?,
            Step::Receive(stage) => {
                let packet = loop {
                    if let Some(packet) = decoder.next_packet()? {
                        break packet;
                    }
                    let n = stream.read(&mut buf).map_err(|e| format!("reading the reply at {stage:?}: {e}"))?;
                    if n == 0 {
                        return Err(format!("the milter closed the connection at {stage:?}").into());
                    }
                    decoder.push(&buf[..n]);
                };
                println!("{stage:?}: {:?}", milter::Reply::decode(&packet)?);
                conversation.receive(&packet)?;
            }
            Step::Done(outcome) => {
                println!("{outcome:#?}");
                return Ok(());
            }
        }
    }
}

/// The message split into header fields and body, with CRLF line ends.
fn message(raw: &[u8]) -> Message {
    let text = String::from_utf8_lossy(raw).replace("\r\n", "\n").replace('\n', "\r\n");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push_str("\r\n");
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.to_string(), value.to_string()));
        }
    }
    Message {
        client: Some(Client {
            hostname: "mail.remote.example".into(),
            address: ClientAddress::Inet { ip: "192.0.2.7".parse().expect("an address"), port: 40000 },
        }),
        helo: "mail.remote.example".into(),
        mail_from: "jane@remote.example".into(),
        mail_params: Vec::new(),
        recipients: vec![Recipient { address: "sam@example.test".into(), params: Vec::new() }],
        headers,
        body: body.as_bytes().to_vec(),
        macros: vec![("j".into(), "mx.example.test".into()), ("i".into(), "CHECK1".into()), ("daemon_name".into(), "mx".into())],
    }
}
