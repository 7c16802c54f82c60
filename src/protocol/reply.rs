//! Upstream reply framing: finds where one RESP2/RESP3 reply ends, without recursion.
//!
//! Owns: the bounded, resumable scan of reply bytes from Redis (nesting depth, bulk size and
//! line length limits), and small readers of a scanned frame's shape (is it an error, a push, a
//! pub/sub message). Does not own: decoding replies into values (the `redis-protocol` crate does
//! that where sidecache needs a value, after this scan has bounded the input) or re-encoding
//! them: replies are forwarded as the exact bytes Redis sent.
//!
//! The scanner keeps its position and a stack of "elements still expected" counters between
//! calls, so a reply that arrives in many reads is scanned once (no quadratic re-parse), and a
//! deeply nested reply costs one counter per level instead of a stack frame.

/// Limits applied to replies from Redis.
#[derive(Debug, Clone, Copy)]
pub struct ReplyLimits {
    /// Deepest aggregate nesting accepted (hiredis caps at 1024 too).
    pub max_depth: usize,
    /// Largest single reply, in bytes.
    pub max_reply_bytes: usize,
}

impl Default for ReplyLimits {
    fn default() -> Self {
        Self { max_depth: 1024, max_reply_bytes: 1024 * 1024 * 1024 }
    }
}

/// A reply that cannot be framed: the upstream connection is unusable after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply nesting deeper than {0} levels")]
    TooDeep(usize),
    #[error("reply larger than {0} bytes")]
    TooLarge(usize),
    #[error("invalid reply type byte 0x{0:02x}")]
    InvalidType(u8),
    #[error("invalid length in reply header")]
    InvalidLength,
    #[error("streamed RESP3 aggregates are not supported")]
    Streamed,
    #[error("bulk reply not followed by CRLF")]
    UnterminatedBulk,
    #[error("invalid {0} reply")]
    InvalidValue(&'static str),
}

/// Resumable scanner for one reply at the front of a buffer.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    /// Where scanning resumes: the start of the first element not yet fully seen.
    pos: usize,
    /// Elements still expected by each open aggregate, innermost last.
    open: Vec<u64>,
}

impl ReplyScanner {
    /// Creates a scanner positioned at the start of a reply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns `Some(n)` when `buf[..n]` is one complete reply, `None` when more bytes are
    /// needed. `buf` must be the same buffer as before, possibly with bytes appended; after
    /// `Some(n)` the caller removes those `n` bytes and the scanner starts afresh.
    pub fn scan(&mut self, buf: &[u8], limits: &ReplyLimits) -> Result<Option<usize>, ReplyError> {
        loop {
            let start = self.pos;
            let Some(&kind) = buf.get(start) else { return self.incomplete(buf, limits) };
            let Some(rel) = memchr::memchr(b'\n', &buf[start..]) else { return self.incomplete(buf, limits) };
            let nl = start + rel;
            // A header is a type byte, then its text, then `\r\n`: at least two bytes before `\n`.
            if nl < start + 2 {
                return Err(ReplyError::InvalidType(kind));
            }
            if buf[nl - 1] != b'\r' {
                return Err(ReplyError::InvalidLength);
            }
            let header = &buf[start + 1..nl - 1];
            let after = nl + 1;
            match kind {
                b'+' | b'-' | b',' => self.pos = after,
                b':' | b'_' | b'#' | b'(' => {
                    check_line(kind, header)?;
                    self.pos = after;
                }
                b'$' | b'=' | b'!' => {
                    if header == b"-1" && kind == b'$' {
                        self.pos = after;
                    } else {
                        let len = length(header)?;
                        if len > limits.max_reply_bytes as u64 {
                            return Err(ReplyError::TooLarge(limits.max_reply_bytes));
                        }
                        let end = after + len as usize + 2;
                        if buf.len() < end {
                            return self.incomplete(buf, limits);
                        }
                        if &buf[end - 2..end] != b"\r\n" {
                            return Err(ReplyError::UnterminatedBulk);
                        }
                        self.pos = end;
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    if header == b"-1" && kind == b'*' {
                        self.pos = after;
                    } else {
                        let n = length(header)?;
                        let n = match kind {
                            b'%' => n * 2,
                            // An attribute map is followed by the value it annotates; together
                            // they count as one element of the enclosing aggregate.
                            b'|' => n * 2 + 1,
                            _ => n,
                        };
                        self.pos = after;
                        if n > 0 {
                            if self.open.len() >= limits.max_depth {
                                return Err(ReplyError::TooDeep(limits.max_depth));
                            }
                            self.open.push(n);
                            continue;
                        }
                    }
                }
                other => return Err(ReplyError::InvalidType(other)),
            }
            // One element is complete: close every aggregate it completes.
            loop {
                match self.open.last_mut() {
                    None => {
                        let n = self.pos;
                        self.pos = 0;
                        // The same bound whether the reply arrived whole or in pieces.
                        if n > limits.max_reply_bytes {
                            return Err(ReplyError::TooLarge(limits.max_reply_bytes));
                        }
                        return Ok(Some(n));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }

    fn incomplete(&self, buf: &[u8], limits: &ReplyLimits) -> Result<Option<usize>, ReplyError> {
        if buf.len() > limits.max_reply_bytes {
            return Err(ReplyError::TooLarge(limits.max_reply_bytes));
        }
        Ok(None)
    }
}

/// Checks the text of a reply line whose type says what it holds (a client library parsing a
/// malformed one would fail or, worse, read the stream out of step).
fn check_line(kind: u8, text: &[u8]) -> Result<(), ReplyError> {
    let (ok, what) = match kind {
        b':' => (crate::protocol::request::parse_i64(text).is_some(), "integer"),
        b'_' => (text.is_empty(), "null"),
        b'#' => (text == b"t" || text == b"f", "boolean"),
        _ => {
            let digits = text.strip_prefix(b"-").unwrap_or(text);
            (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit), "big number")
        }
    };
    if ok { Ok(()) } else { Err(ReplyError::InvalidValue(what)) }
}

fn length(header: &[u8]) -> Result<u64, ReplyError> {
    if header == b"?" {
        return Err(ReplyError::Streamed);
    }
    match crate::protocol::request::parse_i64(header) {
        Some(n) if n >= 0 => Ok(n as u64),
        _ => Err(ReplyError::InvalidLength),
    }
}

/// True when a complete reply is an error (`-…` or RESP3 blob error `!…`).
pub fn is_error(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(b'-' | b'!'))
}

/// The shape of an aggregate reply's first elements, enough to route pub/sub traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head<'a> {
    /// True for a RESP3 push (`>`), false for an array (`*`).
    pub push: bool,
    /// Number of elements.
    pub len: u64,
    /// The first element when it is a bulk or simple string.
    pub first: Option<&'a [u8]>,
    /// The second element when it is a bulk or simple string (a channel, in pub/sub).
    pub second: Option<&'a [u8]>,
    /// The third element when the first two are strings (or null) and it is an integer.
    pub third_int: Option<i64>,
}

/// Reads the head of a complete array or push reply; `None` for any other reply.
pub fn head(frame: &[u8]) -> Option<Head<'_>> {
    let push = match frame.first()? {
        b'>' => true,
        b'*' => false,
        _ => return None,
    };
    let (len_line, mut rest) = line(&frame[1..])?;
    let len = u64::try_from(crate::protocol::request::parse_i64(len_line)?).ok()?;
    let mut strings = Vec::with_capacity(2);
    for _ in 0..2.min(len) {
        let (value, tail) = string_element(rest)?;
        strings.push(value);
        rest = tail;
    }
    let third_int = if len >= 3 && strings.len() == 2 && rest.first() == Some(&b':') {
        line(&rest[1..]).and_then(|(l, _)| crate::protocol::request::parse_i64(l))
    } else {
        None
    };
    Some(Head {
        push,
        len,
        first: strings.first().copied().flatten(),
        second: strings.get(1).copied().flatten(),
        third_int,
    })
}

/// The elements of a complete array or push reply, each as its bytes (none for other replies).
pub fn elements(frame: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let Some((len_line, _)) = frame.get(1..).and_then(line).filter(|_| matches!(frame[0], b'*' | b'>')) else {
        return out;
    };
    let Some(len) = crate::protocol::request::parse_i64(len_line) else { return out };
    let mut pos = len_line.len() + 3;
    for _ in 0..len.max(0) {
        match ReplyScanner::new().scan(&frame[pos..], &ReplyLimits::default()) {
            Ok(Some(n)) => {
                out.push(&frame[pos..pos + n]);
                pos += n;
            }
            _ => break,
        }
    }
    out
}

fn line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nl = memchr::memchr(b'\n', buf)?;
    if nl == 0 || buf[nl - 1] != b'\r' {
        return None;
    }
    Some((&buf[..nl - 1], &buf[nl + 1..]))
}

/// Reads one bulk/simple string (or null) element; `Some((None, rest))` for null.
fn string_element(buf: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    match buf.first()? {
        b'+' => line(&buf[1..]).map(|(l, r)| (Some(l), r)),
        b'_' => line(&buf[1..]).map(|(_, r)| (None, r)),
        b'$' => {
            let (len_line, rest) = line(&buf[1..])?;
            if len_line == b"-1" {
                return Some((None, rest));
            }
            let len = usize::try_from(crate::protocol::request::parse_i64(len_line)?).ok()?;
            if rest.len() < len + 2 {
                return None;
            }
            Some((Some(&rest[..len]), &rest[len + 2..]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_whole(buf: &[u8]) -> Result<Option<usize>, ReplyError> {
        ReplyScanner::new().scan(buf, &ReplyLimits::default())
    }

    #[test]
    fn scalars_and_aggregates_are_framed() {
        assert_eq!(scan_whole(b"+OK\r\n"), Ok(Some(5)));
        assert_eq!(scan_whole(b"$-1\r\n+x"), Ok(Some(5)));
        assert_eq!(scan_whole(b"*2\r\n$1\r\na\r\n:5\r\n"), Ok(Some(15)));
        assert_eq!(scan_whole(b"%1\r\n+a\r\n*0\r\n"), Ok(Some(12)));
        assert_eq!(scan_whole(b"|1\r\n+k\r\n+v\r\n:1\r\n"), Ok(Some(16)));
        assert_eq!(scan_whole(b"*2\r\n$1\r\na\r\n"), Ok(None));
        assert_eq!(scan_whole(b"?x\r\n"), Err(ReplyError::InvalidType(b'?')));
        // Found by fuzzing: an element that is only a line break used to panic.
        assert_eq!(scan_whole(b"\r\n"), Err(ReplyError::InvalidType(b'\r')));
        assert_eq!(scan_whole(b"*1\r\n\r\n"), Err(ReplyError::InvalidType(b'\r')));
    }

    #[test]
    fn malformed_scalars_are_refused() {
        assert_eq!(scan_whole(b"$3\r\nabcXY"), Err(ReplyError::UnterminatedBulk));
        assert_eq!(scan_whole(b"*2\r\n=3\r\nabc\n\r:1\r\n"), Err(ReplyError::UnterminatedBulk));
        assert_eq!(scan_whole(b":abc\r\n"), Err(ReplyError::InvalidValue("integer")));
        assert_eq!(scan_whole(b":\r\n"), Err(ReplyError::InvalidValue("integer")));
        assert_eq!(scan_whole(b"_x\r\n"), Err(ReplyError::InvalidValue("null")));
        assert_eq!(scan_whole(b"#y\r\n"), Err(ReplyError::InvalidValue("boolean")));
        assert_eq!(scan_whole(b"(12a\r\n"), Err(ReplyError::InvalidValue("big number")));
        // What Redis sends is accepted.
        for ok in [
            &b":-9223372036854775808\r\n"[..],
            b":0\r\n",
            b"_\r\n",
            b"#t\r\n",
            b"#f\r\n",
            b"(-123456789012345678901234567890\r\n",
            b",-inf\r\n",
            b",1.5e+300\r\n",
            b"$0\r\n\r\n",
        ] {
            assert_eq!(scan_whole(ok), Ok(Some(ok.len())), "{}", String::from_utf8_lossy(ok));
        }
    }

    #[test]
    fn size_limit_does_not_depend_on_how_bytes_arrive() {
        let limits = ReplyLimits { max_depth: 8, max_reply_bytes: 100 };
        let mut reply = b"+".to_vec();
        reply.extend([b'a'; 150]);
        reply.extend(b"\r\n");
        assert_eq!(ReplyScanner::new().scan(&reply, &limits), Err(ReplyError::TooLarge(100)));
        let mut s = ReplyScanner::new();
        let mut result = Ok(None);
        for n in (12..=reply.len()).step_by(12).chain([reply.len()]) {
            result = s.scan(&reply[..n], &limits);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ReplyError::TooLarge(100)));
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let deep = b"*1\r\n".repeat(200_000);
        assert_eq!(scan_whole(&deep), Err(ReplyError::TooDeep(1024)));
    }

    #[test]
    fn resumes_across_partial_reads() {
        let full = b"*3\r\n$5\r\nhello\r\n*1\r\n:1\r\n_\r\n";
        let mut s = ReplyScanner::new();
        for n in 0..full.len() {
            assert_eq!(s.scan(&full[..n], &ReplyLimits::default()), Ok(None), "prefix {n}");
        }
        assert_eq!(s.scan(full, &ReplyLimits::default()), Ok(Some(full.len())));
    }

    #[test]
    fn head_reads_pubsub_shapes() {
        let h = head(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n").unwrap();
        assert_eq!((h.push, h.len, h.first, h.third_int), (false, 3, Some(&b"subscribe"[..]), Some(1)));
        assert_eq!(h.second, Some(&b"ch"[..]));
        let h = head(b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n").unwrap();
        assert_eq!((h.second, h.third_int), (None, Some(0)));
        let h = head(b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n").unwrap();
        assert_eq!((h.push, h.first, h.third_int), (true, Some(&b"message"[..]), None));
        assert!(head(b"+OK\r\n").is_none());
    }

    #[test]
    fn elements_splits_an_aggregate() {
        let exec = b"*2\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n+OK\r\n";
        assert_eq!(elements(exec), vec![&b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"[..], &b"+OK\r\n"[..]]);
        assert!(elements(b"+OK\r\n").is_empty());
        assert!(elements(b"*-1\r\n").is_empty());
        assert!(elements(b"*0\r\n").is_empty());
    }
}
