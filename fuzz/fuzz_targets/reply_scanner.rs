//! Fuzzes the upstream reply scanner (`sidecache::protocol::reply`).
//!
//! Input layout: the first byte chooses how the rest is cut into chunks (see [`Chunks`]); the rest
//! is what Redis sends on one connection: zero or more replies, then possibly a partial or
//! malformed one. Invariants checked:
//!
//! 1. the scanner never panics;
//! 2. scanning the bytes as they arrive in chunks (resuming the same scanner, and after each
//!    `Some(n)` dropping those `n` bytes and scanning on, as the upstream reader does) gives the
//!    same sequence of frame lengths and the same final result (`None` or the error) as scanning
//!    the whole input at once;
//! 3. every frame the scanner reports, when its nesting is at most 64 (guaranteed: the scanner
//!    runs with `max_depth: 64`), is a frame of exactly that many bytes for `redis-protocol`'s
//!    decoder (RESP2 decoder for frames made only of RESP2 types, RESP3 decoder otherwise), within
//!    the exclusions listed at [`Shape::resp3_comparable`];
//! 4. conversely, when the scanner says the first reply is incomplete (`Ok(None)`), neither
//!    decoder finds a complete frame in the same bytes;
//! 5. `head()` of a complete RESP2 array agrees with the decoded array (length, first element,
//!    third integer), and is `None` for anything that is not an array or push; `is_error` agrees
//!    with the frame's type byte.
//!
//! `redis-protocol`'s decoder recurses once per nesting level, so it is only ever called on bytes
//! the scanner has walked with `max_depth: 64` without error (`Some` or `None`): deeper input
//! fails with `TooDeep` before the decoder sees it.

#![no_main]

#[path = "chunks.rs"]
mod chunks;

use chunks::Chunks;
use libfuzzer_sys::fuzz_target;
use redis_protocol::resp2::decode as resp2;
use redis_protocol::resp2::types::OwnedFrame as Frame2;
use redis_protocol::resp3::decode::complete as resp3;
use sidecache::protocol::reply::{ReplyError, ReplyLimits, ReplyScanner, head, is_error};

/// Inputs are at most 64 KiB (`-max_len=65536`), so with this limit `TooLarge` comes only from a
/// bulk length header; a second pass below uses a limit smaller than the input.
const LIMITS: ReplyLimits = ReplyLimits { max_depth: 64, max_reply_bytes: 1 << 20 };

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// Lengths of the complete replies, in order.
    frames: Vec<usize>,
    /// What the last scan said: `Ok(None)` (waiting for more) or the error.
    end: Result<(), ReplyError>,
}

/// Scans `input` as it arrives in the chunks `sizes` yields (`None`: all at once).
fn scan(input: &[u8], mut sizes: Option<&mut Chunks>, limits: &ReplyLimits) -> Outcome {
    let mut scanner = ReplyScanner::new();
    let mut frames = Vec::new();
    let (mut start, mut received) = (0, 0);
    while received < input.len() {
        received += match sizes.as_mut() {
            Some(s) => s.next_size().min(input.len() - received),
            None => input.len(),
        };
        loop {
            match scanner.scan(&input[start..received], limits) {
                Ok(Some(n)) => {
                    assert!(n > 0 && start + n <= received, "frame length {n} out of range");
                    frames.push(n);
                    start += n;
                }
                Ok(None) => break,
                Err(e) => return Outcome { frames, end: Err(e) },
            }
        }
    }
    Outcome { frames, end: Ok(()) }
}

/// What a scanned frame is made of, found by walking it (the scanner said it is well-formed).
#[derive(Debug, Default)]
struct Shape {
    /// Only `+ - : $ *`.
    resp2_only: bool,
    /// `$-1` or `*-1` somewhere.
    resp2_null: bool,
    /// `|` somewhere.
    attribute: bool,
    /// An aggregate as a map key or set element.
    unhashable_key: bool,
    /// A `:`, `,` or `#` whose text Rust's `i64`/`f64` parsers or `t`/`f` do not accept.
    bad_scalar_text: bool,
    /// A `=` shorter than 4 bytes or whose format is not `txt`/`mkd`.
    bad_verbatim: bool,
}

impl Shape {
    /// Frames for which `redis-protocol`'s RESP3 decoder is expected to agree with the scanner.
    ///
    /// Excluded, where the two differ by design:
    /// * `$-1` / `*-1`: RESP2 nulls; the RESP3 decoder reads length -1 as a streamed aggregate
    ///   and fails (these frames go to the RESP2 decoder when they are RESP2-only);
    /// * attributes (`|`): the scanner counts the attribute and the value it annotates as one
    ///   element; the decoder refuses an attribute followed by an attribute, and some kinds of
    ///   annotated value;
    /// * aggregates as map keys or set elements: the decoder hashes keys and refuses those;
    /// * scalar texts the scanner does not interpret: `:` and `,` that Rust does not parse as
    ///   `i64` / `f64`, `#` other than `t`/`f`, `=` shorter than 4 bytes or with a format other
    ///   than `txt`/`mkd` (the decoder validates these; Redis never sends them).
    ///
    /// Not excluded because both behave alike: neither checks the two bytes after a bulk payload
    /// (both skip them), `_` and `(` with any text, UTF-8 (checked only when building owned
    /// frames, so `decode_range` is used rather than `decode`).
    fn resp3_comparable(&self) -> bool {
        !(self.resp2_null || self.attribute || self.unhashable_key || self.bad_scalar_text || self.bad_verbatim)
    }

    /// Frames for which the RESP2 decoder is expected to agree: only RESP2 types, and integers
    /// Rust parses. Nulls (`$-1`, `*-1`) are RESP2 and agree.
    fn resp2_comparable(&self) -> bool {
        self.resp2_only && !self.bad_scalar_text
    }
}

fn parse_text<T: std::str::FromStr>(text: &[u8]) -> bool {
    std::str::from_utf8(text).is_ok_and(|s| s.parse::<T>().is_ok())
}

fn is_aggregate(kind: u8) -> bool {
    matches!(kind, b'*' | b'~' | b'%' | b'>' | b'|')
}

/// Walks one complete frame (as framed by the scanner) without recursion.
fn shape(frame: &[u8]) -> Shape {
    struct Open {
        kind: u8,
        left: u64,
        seen: u64,
    }
    let mut s = Shape { resp2_only: true, ..Shape::default() };
    let mut stack: Vec<Open> = Vec::new();
    let mut pos = 0;
    loop {
        let kind = frame[pos];
        let nl = pos + frame[pos..].iter().position(|&b| b == b'\n').expect("scanned frame has its lines");
        let header = &frame[pos + 1..nl - 1];
        pos = nl + 1;
        if let Some(top) = stack.last()
            && ((top.kind == b'%' && top.seen % 2 == 0) || top.kind == b'~')
            && is_aggregate(kind)
        {
            s.unhashable_key = true;
        }
        s.resp2_only &= matches!(kind, b'+' | b'-' | b':' | b'$' | b'*');
        let null = header == b"-1" && matches!(kind, b'$' | b'*');
        s.resp2_null |= null;
        match kind {
            b':' => s.bad_scalar_text |= !parse_text::<i64>(header),
            b',' => s.bad_scalar_text |= !parse_text::<f64>(header),
            b'#' => s.bad_scalar_text |= header != b"t" && header != b"f",
            b'|' => s.attribute = true,
            _ => {}
        }
        if matches!(kind, b'$' | b'=' | b'!') && !null {
            let len: usize = std::str::from_utf8(header).unwrap().parse().unwrap();
            if kind == b'=' {
                let payload = &frame[pos..pos + len];
                s.bad_verbatim |= len < 4 || !(payload.starts_with(b"txt") || payload.starts_with(b"mkd"));
            }
            pos += len + 2;
        }
        if is_aggregate(kind) && !null {
            let n: u64 = std::str::from_utf8(header).unwrap().parse().unwrap();
            let n = match kind {
                b'%' => n * 2,
                b'|' => n * 2 + 1,
                _ => n,
            };
            if n > 0 {
                stack.push(Open { kind, left: n, seen: 0 });
                continue;
            }
        }
        loop {
            let Some(top) = stack.last_mut() else {
                assert_eq!(pos, frame.len(), "frame walk ended early");
                return s;
            };
            top.left -= 1;
            top.seen += 1;
            if top.left > 0 {
                break;
            }
            stack.pop();
        }
    }
}

/// Checks the scanner's `n`-byte frame at the start of `buf` against the decoders and `head()`.
fn check_frame(buf: &[u8], n: usize) {
    let frame = &buf[..n];
    let s = shape(frame);
    assert_eq!(is_error(frame), matches!(frame[0], b'-' | b'!'));

    if s.resp2_comparable() {
        match resp2::decode_range(frame) {
            Ok(Some((_, m))) => assert_eq!(m, n, "RESP2 decoder frames {m} bytes, the scanner {n}: {frame:?}"),
            other => panic!("RESP2 decoder disagrees with the scanner's {n}-byte frame {frame:?}: {other:?}"),
        }
        check_head(frame);
    }
    if s.resp3_comparable() {
        match resp3::decode_range(frame) {
            Ok(Some((_, m))) => assert_eq!(m, n, "RESP3 decoder frames {m} bytes, the scanner {n}: {frame:?}"),
            other => panic!("RESP3 decoder disagrees with the scanner's {n}-byte frame {frame:?}: {other:?}"),
        }
    }
    if !matches!(frame[0], b'*' | b'>') {
        assert!(head(frame).is_none(), "head() of a non-aggregate frame");
    }
}

/// `head()` against the RESP2 decoder's reading of an array.
fn check_head(frame: &[u8]) {
    let Ok(Some((Frame2::Array(items), _))) = resp2::decode(frame) else {
        // Not an array (or an error text that is not UTF-8, which `decode` refuses).
        if frame[0] == b'*' && frame.starts_with(b"*-1\r\n") {
            assert!(head(frame).is_none(), "head() of a null array");
        }
        return;
    };
    let string = |f: &Frame2| match f {
        Frame2::BulkString(b) | Frame2::SimpleString(b) => Some(Some(b.clone())),
        Frame2::Null => Some(None),
        _ => None,
    };
    let leading: Vec<Option<Option<Vec<u8>>>> = items.iter().take(2).map(string).collect();
    let h = head(frame);
    if leading.iter().any(Option::is_none) {
        assert!(h.is_none(), "head() of an array whose first elements are not strings: {h:?}");
        return;
    }
    if leading.iter().any(|l| matches!(l, Some(None))) {
        // A null among the first two: `$-1` is a string element for head(), `*-1` is not, and
        // both decode to the same `Null`. Only the length can be compared.
        if let Some(h) = h {
            assert_eq!(h.len, items.len() as u64);
        }
        return;
    }
    let h = h.unwrap_or_else(|| panic!("no head() for array {frame:?}"));
    assert!(!h.push);
    assert_eq!(h.len, items.len() as u64);
    let first = leading.first().cloned().flatten().flatten();
    assert_eq!(h.first.map(<[u8]>::to_vec), first, "head().first");
    if let Some(i) = h.third_int {
        assert!(matches!(items.get(2), Some(Frame2::Integer(j)) if *j == i), "head().third_int {i}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };

    let whole = scan(input, None, &LIMITS);
    let chunked = scan(input, Some(&mut Chunks::new(control, input.len())), &LIMITS);
    assert_eq!(whole, chunked, "chunked scan differs from whole scan (control byte {control:#04x})");

    // The size limit holds whatever the chunking (a limit smaller than many inputs).
    {
        let small = ReplyLimits { max_depth: 64, max_reply_bytes: 1 + usize::from(control) * 16 };
        let whole = scan(input, None, &small);
        let chunked = scan(input, Some(&mut Chunks::new(control, input.len())), &small);
        // Input with several problems may report a different one first (a too-long piece
        // before the malformed byte inside it): the same frames, and an error either way.
        assert_eq!(whole.frames, chunked.frames, "with max_reply_bytes {}", small.max_reply_bytes);
        assert_eq!(whole.end.is_err(), chunked.end.is_err(), "with max_reply_bytes {}", small.max_reply_bytes);
        if whole.end.is_ok() {
            assert_eq!(whole, chunked, "with max_reply_bytes {}", small.max_reply_bytes);
        }
    }

    let mut at = 0;
    for &n in &whole.frames {
        check_frame(&input[at..], n);
        at += n;
    }
    // The first reply not complete: if the scanner waits for more bytes, no decoder may see a
    // complete frame there (the scanner walked these bytes within max_depth, so the decoder's
    // recursion is bounded too).
    if whole.end.is_ok() && at < input.len() {
        let rest = &input[at..];
        assert!(
            !matches!(resp2::decode_range(rest), Ok(Some(_))),
            "RESP2 decoder finds a frame where the scanner waits for more: {rest:?}"
        );
        assert!(
            !matches!(resp3::decode_range(rest), Ok(Some(_))),
            "RESP3 decoder finds a frame where the scanner waits for more: {rest:?}"
        );
    }
});
