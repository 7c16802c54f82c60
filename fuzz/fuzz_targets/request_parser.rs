//! Fuzzes the client request parser (`sidecache::protocol::request`).
//!
//! Input layout: the first byte chooses how the rest is cut into chunks (see [`Chunks`]); the rest
//! is what a client sends. Invariants checked:
//!
//! 1. the parser never panics;
//! 2. feeding the bytes in chunks (calling `next` until `Ok(None)` after each chunk, as a session
//!    does) gives exactly the commands, the error (if any), the leftover bytes and the
//!    `in_frame` answer of parsing the whole input at once — except that, as in Redis, a line
//!    longer than `max_inline_bytes` is refused only if it arrives in pieces (then the chunked
//!    parse ends earlier with a "too big" error, after a prefix of the same commands);
//! 3. every command returned is non-empty (empty ones are skipped, as Redis skips them);
//! 4. re-encoding the parsed commands as RESP multibulk (`protocol::encode::command`, what the
//!    proxy forwards upstream) and parsing that again gives back the same commands, with no error
//!    and nothing left over, whole and byte by byte chunked;
//! 5. the error reply of any error is one line (`-ERR …\r\n`, no other CR or LF).

#![no_main]

use bytes::{Bytes, BytesMut};
#[path = "chunks.rs"]
mod chunks;

use chunks::Chunks;
use libfuzzer_sys::fuzz_target;
use sidecache::protocol::encode;
use sidecache::protocol::request::{RequestError, RequestLimits, RequestParser};

const LIMITS: RequestLimits = RequestLimits { max_bulk_bytes: 4096, max_args: 64, max_inline_bytes: 1024 };

/// Limits for parsing the re-encoded commands: the same, except bulk arguments up to any input
/// size. An inline argument is not bounded by `max_bulk_bytes`, and its line is bounded by
/// `max_inline_bytes` only while the line is incomplete (as in Redis), so an inline line that
/// arrives at once can hold an argument longer than `max_bulk_bytes`.
const REENCODED_LIMITS: RequestLimits = RequestLimits { max_bulk_bytes: 1 << 20, ..LIMITS };

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    commands: Vec<Vec<Bytes>>,
    error: Option<RequestError>,
    rest: Vec<u8>,
    in_frame: bool,
}

/// Feeds `input` to a fresh parser in the chunks `sizes` yields (`None`: all at once).
fn parse(input: &[u8], mut sizes: Option<&mut Chunks>, limits: &RequestLimits) -> Outcome {
    let mut parser = RequestParser::new();
    let mut buf = BytesMut::new();
    let mut commands = Vec::new();
    let mut fed = 0;
    while fed < input.len() {
        let n = match sizes.as_mut() {
            Some(s) => s.next_size().min(input.len() - fed),
            None => input.len(),
        };
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            match parser.next(&mut buf, limits) {
                Ok(Some(cmd)) => commands.push(cmd),
                Ok(None) => break,
                Err(e) => {
                    // After an error the session replies and closes: nothing more is parsed.
                    return Outcome { commands, error: Some(e), rest: Vec::new(), in_frame: false };
                }
            }
        }
    }
    let in_frame = parser.in_frame(&buf);
    Outcome { commands, error: None, rest: buf.to_vec(), in_frame }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };

    let whole = parse(input, None, &LIMITS);
    let chunked = parse(input, Some(&mut Chunks::new(control, input.len())), &LIMITS);
    if chunked != whole {
        // The one allowed difference: like Redis, the line length limit (`max_inline_bytes`, for
        // inline lines and `*`/`$` headers) applies only while the line's end has not arrived.
        // A long line that arrives at once is accepted; the same line arriving in pieces is
        // refused as soon as the buffered part exceeds the limit. So the chunked parse may stop
        // earlier with a "too big" error, after a prefix of the same commands; never otherwise.
        let too_big = matches!(
            chunked.error,
            Some(RequestError::TooBigInline | RequestError::TooBigMultibulkCount | RequestError::TooBigBulkCount)
        );
        assert!(
            too_big && whole.commands.starts_with(&chunked.commands),
            "chunked parse differs from whole parse (control byte {control:#04x}):\n whole: {whole:?}\n chunked: {chunked:?}"
        );
    }

    for cmd in &whole.commands {
        assert!(!cmd.is_empty(), "an empty command was returned");
    }

    if let Some(e) = &whole.error {
        let reply = e.to_reply();
        assert!(reply.starts_with(b"-ERR ") && reply.ends_with(b"\r\n"), "bad error reply {reply:?}");
        let body = &reply[..reply.len() - 2];
        assert!(!body.contains(&b'\r') && !body.contains(&b'\n'), "error reply with a line break: {reply:?}");
    }

    // Everything parsed is a valid command: its canonical encoding parses back to itself.
    if !whole.commands.is_empty() {
        let mut encoded = BytesMut::new();
        for cmd in &whole.commands {
            encode::command(&mut encoded, cmd);
        }
        let again = parse(&encoded, None, &REENCODED_LIMITS);
        let expected = Outcome { commands: whole.commands.clone(), error: None, rest: Vec::new(), in_frame: false };
        assert_eq!(again, expected, "re-encoded commands do not parse back to themselves");
        let byte_by_byte = parse(&encoded, Some(&mut Chunks::new(0x80, encoded.len())), &REENCODED_LIMITS);
        assert_eq!(byte_by_byte, expected, "re-encoded commands, fed in small chunks, differ");
    }
});
