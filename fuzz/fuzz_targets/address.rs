//! Paths and mailboxes: `address::parse_path` (forward and reverse) and `Address::parse`.
//! Besides "no panic": an address that was accepted is written back (`Display`) into the
//! envelope and onto the wire to the next hop, so it must parse again to the same key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_proto::address::{parse_path, PathKind};
use mail_proto::Address;

fn reparses(addr: &Address, kind: PathKind, input: &[u8]) {
    let written = format!("<{addr}>");
    match parse_path(written.as_bytes(), kind) {
        Ok((Some(again), rest)) => {
            assert!(rest.is_empty(), "input {input:?}: {written:?} left {rest:?}");
            assert_eq!(again.key(), addr.key(), "input {input:?}: written as {written:?}");
        }
        other => panic!("input {input:?} accepted as {addr:?}, written as {written:?}, re-parsed as {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    for kind in [PathKind::ForwardPath, PathKind::ReversePath] {
        if let Ok((addr, rest)) = parse_path(data, kind) {
            assert!(rest.len() < data.len());
            match addr {
                None => assert_eq!(kind, PathKind::ReversePath, "<> accepted as a forward-path"),
                Some(a) => {
                    assert!(a.local.len() + a.domain.len() < 255);
                    // The round trip only for what arrived as UTF-8: invalid bytes become
                    // U+FFFD (three bytes), which can push a local part over its limit.
                    if std::str::from_utf8(data).is_ok() {
                        reparses(&a, kind, data);
                    }
                }
            }
        }
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(a) = Address::parse(&text) {
        let _ = a.key();
        let _ = a.is_postmaster();
        let _ = a.to_string();
    }
});
