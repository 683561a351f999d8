//! The bounded MIME walker: `mime_scan::scan` with small limits taken from the first two
//! bytes, and `mime_scan::summary`. It must not panic, and must stay within its bounds: no
//! part deeper than `max_depth`, no more than `max_parts` parts entered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_framework::mime_scan::{self, Limits};

fuzz_target!(|data: &[u8]| {
    let [a, b, raw @ ..] = data else { return };
    let limits = Limits {
        max_bytes: if b & 0x80 != 0 { usize::from(b & 0x7f) * 64 } else { 1 << 20 },
        max_depth: usize::from(a & 7),
        max_parts: 1 + usize::from(a >> 3) * 4,
    };
    let scan = mime_scan::scan(raw, &limits);
    assert!(!scan.mime_types.is_empty(), "no type for the message itself");
    if raw.len() > limits.max_bytes {
        assert!(scan.truncated);
    }
    for t in &scan.mime_types {
        assert_eq!(t, &t.to_lowercase());
        assert!(t.contains('/'), "type {t:?}");
    }
    let _ = mime_scan::summary(raw);
    let _ = mime_scan::split_parts(raw, b"b");
});
