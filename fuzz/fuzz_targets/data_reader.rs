//! The DATA decoder, in both line-ending modes, fed the input in two pieces split at a
//! position taken from the first byte. Checked on every input:
//! - the decoded output never holds a bare CR or a bare LF (every CR is followed by LF and
//!   every LF preceded by CR);
//! - `End` is reported only right after `CRLF . CRLF` in the input, counting the CRLF that
//!   ended the DATA command itself (a message may be just `.CRLF`), and at the first such
//!   sequence; conversely, an input that holds one ends the message (or was refused first);
//! - `BareLineEnding` only in strict mode; `consumed` never exceeds what was fed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_proto::{DataDecoder, DataEvent, LineEndings};

/// Where the first `CRLF.CRLF` ends in `CRLF + input`, as an offset into `input`.
fn first_terminator_end(input: &[u8]) -> Option<usize> {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(input);
    framed.windows(5).position(|w| w == b"\r\n.\r\n").map(|p| p + 5 - 2)
}

fn check_output(out: &[u8], input: &[u8], mode: LineEndings) {
    for (i, &b) in out.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "{mode:?}: bare CR at {i} of output {out:?} from input {input:?}"),
            b'\n' => assert!(i > 0 && out[i - 1] == b'\r', "{mode:?}: bare LF at {i} of output {out:?} from input {input:?}"),
            _ => {}
        }
    }
}

fn run(input: &[u8], split: usize, mode: LineEndings) {
    let mut decoder = DataDecoder::new(mode);
    let mut out = Vec::new();
    let (a, b) = input.split_at(split);
    let mut outcome = None;
    for (offset, piece) in [(0, a), (a.len(), b)] {
        let event = decoder.feed(piece, &mut out);
        match event {
            DataEvent::NeedMore => {}
            DataEvent::End { consumed } | DataEvent::BareLineEnding { consumed } => {
                assert!(consumed <= piece.len(), "{mode:?}: {event:?} for a piece of {}", piece.len());
                outcome = Some((event, offset + consumed));
                break;
            }
        }
    }
    check_output(&out, input, mode);
    let terminator = first_terminator_end(input);
    match outcome {
        Some((DataEvent::End { .. }, at)) => {
            let mut framed = b"\r\n".to_vec();
            framed.extend_from_slice(input);
            let end = at + 2;
            assert!(
                end >= 5 && &framed[end - 5..end] == b"\r\n.\r\n",
                "{mode:?}: End at {at} not right after CRLF.CRLF in {input:?}"
            );
            assert_eq!(Some(at), terminator, "{mode:?}: End at {at}, but the first CRLF.CRLF ends at {terminator:?} in {input:?}");
        }
        Some((DataEvent::BareLineEnding { .. }, at)) => {
            assert_eq!(mode, LineEndings::Strict, "BareLineEnding in normalise mode for {input:?}");
            assert!(at <= input.len());
            // Refused before reaching the terminator (or the refusal is at it).
            if let Some(t) = terminator {
                assert!(at <= t, "{mode:?}: refusal at {at} after the terminator at {t} in {input:?}");
            }
        }
        Some((DataEvent::NeedMore, _)) => unreachable!(),
        None => assert_eq!(terminator, None, "{mode:?}: CRLF.CRLF in the input but no End: {input:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else { return };
    let split = first as usize % (input.len() + 1);
    run(input, split, LineEndings::Strict);
    run(input, split, LineEndings::NormaliseBareLf);
});
