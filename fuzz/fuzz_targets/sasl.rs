//! SASL: `sasl::decode` (a base64 response line) and `sasl::parse_plain` (RFC 4616), on the
//! raw bytes and on what they decode to.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_proto::sasl;

fn plain(message: &[u8]) {
    if let Ok((user, _password)) = sasl::parse_plain(message) {
        assert!(!user.is_empty());
        assert!(!user.contains('\0'));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = sasl::decode(data) {
        assert!(decoded.len() <= data.len());
        plain(&decoded);
    }
    plain(data);
    // encode and decode are inverses.
    assert_eq!(sasl::decode(sasl::encode(data).as_bytes()).as_deref(), Ok(data));
});
