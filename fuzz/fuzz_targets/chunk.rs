//! CHUNKING (RFC 3030): the BDAT argument parser and the chunk content decoder, in both
//! line-ending modes, the content fed in two pieces split at a position taken from the first
//! byte. Checked on every input:
//! - `parse_bdat` never panics, and what it accepts reads the same when written back;
//! - the decoded content does not depend on where the input is split (a CRLF may span chunks);
//! - in normalise mode, and in strict mode when no bare line ending was noted, the output holds
//!   no bare CR or LF and, unless empty, ends with CRLF;
//! - in strict mode, content without a bare CR or LF comes out unchanged (plus a final CRLF
//!   when its last line had none), and one with a bare CR or LF is noted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_proto::chunk::parse_bdat;
use mail_proto::{ChunkDecoder, LineEndings};

fn decode(pieces: &[&[u8]], mode: LineEndings) -> (Vec<u8>, bool) {
    let mut decoder = ChunkDecoder::new(mode);
    let mut out = Vec::new();
    for p in pieces {
        decoder.feed(p, &mut out);
    }
    decoder.finish(&mut out);
    (out, decoder.saw_bare_line_ending())
}

fn has_bare_line_ending(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) != Some(&b'\n'),
        b'\n' => i == 0 || bytes[i - 1] != b'\r',
        _ => false,
    })
}

fn run(input: &[u8], split: usize, mode: LineEndings) {
    let (a, b) = input.split_at(split);
    let (out, bare) = decode(&[a, b], mode);
    assert_eq!((out.clone(), bare), decode(&[input], mode), "{mode:?}: split at {split} changes {input:?}");
    if mode == LineEndings::NormaliseBareLf || !bare {
        assert!(!has_bare_line_ending(&out), "{mode:?}: bare line ending in {out:?} from {input:?}");
        assert!(out.is_empty() || out.ends_with(b"\r\n"), "{mode:?}: no final CRLF in {out:?}");
    }
    if mode == LineEndings::Strict {
        assert_eq!(bare, has_bare_line_ending(input), "strict: bare noted {bare} for {input:?}");
        if !bare {
            let mut expected = input.to_vec();
            if !expected.is_empty() && !expected.ends_with(b"\n") {
                expected.extend_from_slice(b"\r\n");
            }
            assert_eq!(out, expected, "strict: content changed");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else { return };
    let line = input.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Some(bdat) = parse_bdat(line) {
        let written = format!("{}{}", bdat.size, if bdat.last { " LAST" } else { "" });
        assert_eq!(parse_bdat(written.as_bytes()), Some(bdat), "{line:?}");
    }
    let split = first as usize % (input.len() + 1);
    run(input, split, LineEndings::Strict);
    run(input, split, LineEndings::NormaliseBareLf);
});
