//! SMTP replies as the client reads them: `reply_parser::parse_reply`. Besides "no panic": a
//! complete reply uses a prefix of the buffer ending in LF, has a code 200..=599, and its text
//! holds no control character but TAB (nothing a remote server says may add a line to what
//! we write).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_proto::reply_parser::{parse_reply, MAX_REPLY_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((reply, used))) = parse_reply(data) {
        assert!(used > 0 && used <= data.len() && used <= MAX_REPLY_BYTES, "used {used} of {}", data.len());
        assert_eq!(data[used - 1], b'\n');
        assert!((200..600).contains(&reply.code), "code {}", reply.code);
        assert!(!reply.lines.is_empty());
        for line in &reply.lines {
            assert!(!line.chars().any(|c| c.is_control() && c != '\t'), "control character in {line:?}");
        }
        let _ = reply.enhanced();
        let _ = reply.to_bytes();
        // Whatever follows the reply parses on its own, without panicking.
        let _ = parse_reply(&data[used..]);
    }
});
