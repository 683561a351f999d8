//! The cost of DKIM signing (issue 16): CPU µs per message for 1 KiB and 100 KiB messages with
//! each algorithm — hashing the body, canonicalising the header and the signature itself, as
//! the outbound client does for every message. One thread, nothing else running, so the elapsed
//! time is the CPU time.
//!
//!     cargo run --release -p sender-auth --example sign_cost [N]

use std::time::Instant;

use sender_auth::keys::{Algorithm, KeyPair};
use sender_auth::sign::{KeyRing, SigningKey, sign};

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: Sam Jones <sam@example.test>\r\nTo: friend@remote.example\r\nSubject: the cost of a signature\r\n\
Date: Mon, 6 Jul 2026 12:00:00 +0000\r\nMessage-ID: <cost@example.test>\r\nMIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\r\n"
        .to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, and the office mail goes out signed.\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m.truncate(size - 2);
    m.extend_from_slice(b"\r\n");
    m
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    println!("{:<16} {:>9} {:>8} {:>14}", "algorithm", "message", "N", "µs/message");
    for algorithm in [Algorithm::RsaSha256, Algorithm::Ed25519Sha256] {
        let pair = KeyPair::generate(algorithm).expect("key");
        let key = SigningKey::new("example.test", "cost", algorithm, pair.signing_key().expect("signing key"));
        let ring = KeyRing::new(vec![key], vec![]);
        for size in [1024, 100 * 1024] {
            let m = message(size);
            let rounds = if size > 10_000 { n / 4 } else { n }.max(1);
            sign(&m, &ring, "sam@example.test", 1).expect("signs"); // warm up
            let started = Instant::now();
            for _ in 0..rounds {
                std::hint::black_box(sign(std::hint::black_box(&m), &ring, "sam@example.test", 1).expect("signs"));
            }
            let per = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
            println!("{:<16} {:>6} KiB {:>8} {:>14.1}", algorithm.name(), size / 1024, rounds, per);
        }
    }
}
