//! DKIM signatures on what leaves for a remote host (RFC 6376 §5, issue 16): every message the
//! outbound client sends — submitted, from `sendmail`, forwarded by an alias, a bounce or a
//! report — and nothing delivered locally (that never comes here).
//!
//! A signature must cover the octets the next hop receives, so it is made over the message as
//! [`crate::conversation`] sends it: bare line endings made CRLF, then converted as
//! [`crate::encode`] plans it for that host — before dot-stuffing, which the receiver undoes.
//! Whether the host offers 8BITMIME is known only after EHLO, so [`prepare`] reads the body
//! once more before connecting and hashes it both ways when they differ (only a message with
//! 8-bit octets is converted differently for a 7-bit host); the signature is made for the one
//! the host gets, when the DATA starts.
//!
//! Signing never loses or delays mail: a message that cannot be signed (no From field, a header
//! section over 1 MiB, a key the crypto library refuses) goes unsigned and the log says why —
//! for a small office delivery matters more, and DMARC still passes on SPF for mail it sends
//! itself (README "DKIM").

use std::io;
use std::sync::Arc;

use sender_auth::sign::{Hashed, KeyRing, MessageHasher, SignError};

use crate::conversation::{BareEndings, BodySource};
use crate::encode::{Converter, Plan};

/// The message hashed as it will be sent, for a host with 8BITMIME and, when that differs, for
/// one without.
pub(crate) struct Prepared {
    ring: Arc<KeyRing>,
    eight_bit: Result<Hashed, SignError>,
    seven_bit: Option<Result<Hashed, SignError>>,
}

/// One way of sending the message, hashed.
struct Pass {
    converter: Converter,
    hasher: MessageHasher,
    out: Vec<u8>,
}

impl Pass {
    fn new(plan: &Plan, seven_bit: bool) -> Self {
        Pass { converter: Converter::new(plan, seven_bit), hasher: MessageHasher::default(), out: Vec::new() }
    }

    fn feed(&mut self, normalised: &[u8]) {
        self.out.clear();
        self.converter.feed(normalised, &mut self.out);
        self.hasher.write(&self.out);
    }

    fn finish(mut self, normalised: &[u8]) -> Result<Hashed, SignError> {
        self.feed(normalised);
        self.out.clear();
        self.converter.finish(&mut self.out);
        self.hasher.write(&self.out);
        self.hasher.finish()
    }
}

/// Read the body once (then rewind it) and hash it as it will be sent; `None` when no key
/// could sign it.
pub(crate) async fn prepare<B: BodySource>(body: &mut B, plan: &Plan, ring: Arc<KeyRing>) -> io::Result<Option<Prepared>> {
    if ring.is_empty() {
        return Ok(None);
    }
    let mut eight_bit = Pass::new(plan, false);
    // A message that cannot be made 7-bit never goes to a 7-bit host (RFC 6152 §3).
    let mut seven_bit = (plan.eight_bit() && plan.unconvertible().is_none()).then(|| Pass::new(plan, true));
    let mut endings = BareEndings::default();
    let mut normalised = Vec::new();
    while let Some(chunk) = body.next_chunk().await? {
        normalised.clear();
        endings.feed(&chunk, &mut normalised);
        eight_bit.feed(&normalised);
        if let Some(p) = &mut seven_bit {
            p.feed(&normalised);
        }
    }
    normalised.clear();
    endings.finish(&mut normalised);
    let prepared = Prepared { ring, eight_bit: eight_bit.finish(&normalised), seven_bit: seven_bit.map(|p| p.finish(&normalised)) };
    body.rewind();
    Ok(Some(prepared))
}

impl Prepared {
    /// The DKIM-Signature fields to send in front of the message to a host with or without
    /// 8BITMIME (`seven_bit`); empty, and logged, when it cannot be signed.
    pub(crate) fn fields(&self, seven_bit: bool, envelope_sender: &str, host: &str) -> Vec<u8> {
        let hashed = match (seven_bit, &self.seven_bit) {
            (true, Some(h)) => h,
            _ => &self.eight_bit,
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let started = std::time::Instant::now();
        match hashed
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|h| sender_auth::sign::signatures(h, &self.ring, envelope_sender, now).map_err(|e| e.to_string()))
        {
            Ok(fields) => {
                tracing::debug!(host, micros = started.elapsed().as_micros() as u64, signatures = count(&fields), "DKIM-signed");
                fields
            }
            Err(why) => {
                tracing::warn!(host, sender = envelope_sender, error = %why, "sending without a DKIM signature");
                Vec::new()
            }
        }
    }
}

fn count(fields: &[u8]) -> usize {
    fields.windows(15).filter(|w| w == b"DKIM-Signature:").count()
}
