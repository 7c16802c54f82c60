//! Client-side request framing: RESP multibulk arrays of bulk strings and inline commands.
//!
//! Owns: turning client bytes into argument vectors, incrementally and within limits, and the
//! exact `Protocol error: …` texts Redis uses for each malformed input. Does not own: what a
//! command means (see `command`) or replies (see `reply`).
//!
//! The parser is resumable: a half-received command keeps its parsed arguments and position, so
//! bytes are looked at once however the input is split (no re-parse from the start of a frame).
//! There is no recursion: a request is a flat array, and a nested aggregate is rejected at its
//! first byte, as Redis rejects it. The rules mirror Redis 7's `processMultibulkBuffer` and
//! `processInlineBuffer`, including what they do not check (the two bytes after a bulk payload
//! are skipped, not verified), so sidecache accepts and rejects exactly what Redis does, within
//! the configured limits.

use bytes::{Buf, Bytes, BytesMut};

/// Redis's `PROTO_INLINE_MAX_SIZE`: the longest line without a newline it waits for.
pub const REDIS_INLINE_MAX: usize = 64 * 1024;

/// Limits applied while framing client requests.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Longest bulk string argument (Redis: `proto-max-bulk-len`).
    pub max_bulk_bytes: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command line, and longest length header line.
    pub max_inline_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { max_bulk_bytes: 512 * 1024 * 1024, max_args: 1024 * 1024, max_inline_bytes: REDIS_INLINE_MAX }
    }
}

/// A malformed request. Each maps to the error text Redis sends before it closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("Protocol error: too big mbulk count string")]
    TooBigMultibulkCount,
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("Protocol error: expected '$', got '{}'", char::from(*.0))]
    ExpectedDollar(u8),
    #[error("Protocol error: too big bulk count string")]
    TooBigBulkCount,
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    #[error("Protocol error: too big inline request")]
    TooBigInline,
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
}

impl RequestError {
    /// The closed label used in `sidecache_protocol_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooBigMultibulkCount | Self::InvalidMultibulkLength => "invalid_multibulk_length",
            Self::ExpectedDollar(_) => "expected_bulk",
            Self::TooBigBulkCount | Self::InvalidBulkLength => "invalid_bulk_length",
            Self::TooBigInline => "inline_too_big",
            Self::UnbalancedQuotes => "unbalanced_quotes",
        }
    }

    /// The full `-ERR …` reply line.
    pub fn to_reply(&self) -> Bytes {
        let mut text = format!("-ERR {self}\r\n").into_bytes();
        // The offending byte of `ExpectedDollar` is echoed like Redis does, but never as a line
        // break, which would corrupt the reply stream.
        let end = text.len() - 2;
        for b in &mut text[..end] {
            if *b == b'\r' || *b == b'\n' {
                *b = b' ';
            }
        }
        Bytes::from(text)
    }
}

#[derive(Debug, Default)]
enum State {
    /// Between commands.
    #[default]
    Idle,
    /// Inside a multibulk: `remaining` arguments still expected; `bulk` is the length of the
    /// argument whose header was read and whose payload is still incomplete.
    Multibulk { remaining: usize, bulk: Option<usize> },
}

/// Incremental request parser. One per client connection.
#[derive(Debug, Default)]
pub struct RequestParser {
    state: State,
    args: Vec<Bytes>,
}

/// Parses a decimal like Redis's `string2ll`: optional `-`, no `+`, no leading zeros, no spaces.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    match s {
        [] => None,
        [b'0'] => Some(0),
        [b'-', rest @ ..] => match rest.first() {
            Some(b'1'..=b'9') => parse_digits(rest).and_then(|v| 0i64.checked_sub_unsigned(v)),
            _ => None,
        },
        [b'1'..=b'9', ..] => parse_digits(s).and_then(|v| i64::try_from(v).ok()),
        _ => None,
    }
}

fn parse_digits(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

impl RequestParser {
    /// Creates a parser in the idle state.
    pub fn new() -> Self {
        Self::default()
    }

    /// True while a command has been started but not completed (used for the frame deadline).
    pub fn in_frame(&self, buf: &BytesMut) -> bool {
        matches!(self.state, State::Multibulk { .. }) || !buf.is_empty()
    }

    /// Takes the next complete command out of `buf`. `Ok(None)` means more bytes are needed;
    /// all bytes of partially received commands stay accounted for in the parser or `buf`.
    /// Empty commands (`*0`, `*-1`, blank inline lines) are skipped as Redis skips them.
    pub fn next(&mut self, buf: &mut BytesMut, limits: &RequestLimits) -> Result<Option<Vec<Bytes>>, RequestError> {
        loop {
            match self.state {
                State::Idle => {
                    let Some(&first) = buf.first() else { return Ok(None) };
                    if first == b'*' {
                        let Some(count) = self.header_line(buf, limits, RequestError::TooBigMultibulkCount)? else {
                            return Ok(None);
                        };
                        let count = count.ok_or(RequestError::InvalidMultibulkLength)?;
                        if count > i64::from(i32::MAX) || count > limits.max_args as i64 {
                            return Err(RequestError::InvalidMultibulkLength);
                        }
                        if count <= 0 {
                            continue;
                        }
                        let count = count as usize;
                        // Like Redis, never trust the count for preallocation.
                        self.args = Vec::with_capacity(count.min(1024));
                        self.state = State::Multibulk { remaining: count, bulk: None };
                    } else {
                        match self.inline(buf, limits)? {
                            None => return Ok(None),
                            Some(args) if args.is_empty() => continue,
                            Some(args) => return Ok(Some(args)),
                        }
                    }
                }
                State::Multibulk { remaining, bulk } => {
                    let len = match bulk {
                        Some(len) => len,
                        None => {
                            let Some(&first) = buf.first() else { return Ok(None) };
                            if first != b'$' {
                                return Err(RequestError::ExpectedDollar(first));
                            }
                            let Some(len) = self.header_line(buf, limits, RequestError::TooBigBulkCount)? else {
                                return Ok(None);
                            };
                            let len = len.ok_or(RequestError::InvalidBulkLength)?;
                            if len < 0 || len as u64 > limits.max_bulk_bytes as u64 {
                                return Err(RequestError::InvalidBulkLength);
                            }
                            let len = len as usize;
                            self.state = State::Multibulk { remaining, bulk: Some(len) };
                            len
                        }
                    };
                    if buf.len() < len + 2 {
                        // Make room for the whole argument at once, as Redis does for big args.
                        buf.reserve(len + 2 - buf.len());
                        return Ok(None);
                    }
                    let arg = buf.split_to(len).freeze();
                    buf.advance(2);
                    self.args.push(arg);
                    if remaining == 1 {
                        self.state = State::Idle;
                        return Ok(Some(std::mem::take(&mut self.args)));
                    }
                    self.state = State::Multibulk { remaining: remaining - 1, bulk: None };
                }
            }
        }
    }

    /// Reads a `*N` or `$N` header line and parses its number (`Some(None)`: not a number).
    /// Like Redis it looks for `\r`, requires one more byte after it, and skips both.
    fn header_line(
        &self,
        buf: &mut BytesMut,
        limits: &RequestLimits,
        too_big: RequestError,
    ) -> Result<Option<Option<i64>>, RequestError> {
        // The limit holds however the bytes arrive (Redis checks it only while no `\r` is found).
        let cr = memchr::memchr(b'\r', buf);
        if cr.unwrap_or(buf.len()) > limits.max_inline_bytes {
            return Err(too_big);
        }
        let Some(cr) = cr else { return Ok(None) };
        if cr + 2 > buf.len() {
            return Ok(None);
        }
        let n = parse_i64(&buf[1..cr]);
        buf.advance(cr + 2);
        Ok(Some(n))
    }

    fn inline(&self, buf: &mut BytesMut, limits: &RequestLimits) -> Result<Option<Vec<Bytes>>, RequestError> {
        // Redis finds the end of an inline line with strchr(), which stops at a NUL byte: a NUL
        // before the newline hides it. Redis applies its length limit only while no newline is
        // found, so a longer line passes when it arrives in one read; here the limit holds
        // however the bytes arrive.
        let searchable = memchr::memchr(0, buf).unwrap_or(buf.len());
        let nl = memchr::memchr(b'\n', &buf[..searchable]);
        let text = match nl {
            Some(nl) if nl > 0 && buf[nl - 1] == b'\r' => nl - 1,
            Some(nl) => nl,
            None => buf.len(),
        };
        if text > limits.max_inline_bytes {
            return Err(RequestError::TooBigInline);
        }
        let Some(nl) = nl else { return Ok(None) };
        let line = buf.split_to(nl + 1);
        let mut end = nl;
        if end > 0 && line[end - 1] == b'\r' {
            end -= 1;
        }
        let args = split_inline(&line[..end]).ok_or(RequestError::UnbalancedQuotes)?;
        if args.len() > limits.max_args {
            return Err(RequestError::InvalidMultibulkLength);
        }
        Ok(Some(args))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// C `isspace` in the "C" locale, as Redis's `sdssplitargs` uses it.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Splits an inline command line exactly like Redis's `sdssplitargs`: whitespace separates
/// arguments, `"…"` understands `\n \r \t \b \a \\ \" \xHH`, `'…'` understands `\'`, a closing
/// quote must be followed by whitespace or the end. The line is a C string there, so a NUL byte
/// ends it. `None` means unbalanced quotes.
pub fn split_inline(line: &[u8]) -> Option<Vec<Bytes>> {
    let line = match memchr::memchr(0, line) {
        Some(nul) => &line[..nul],
        None => line,
    };
    let at = |i: usize| line.get(i).copied();
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while at(p).is_some_and(is_space) {
            p += 1;
        }
        if p >= line.len() {
            return Some(args);
        }
        let mut current = Vec::new();
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let Some(c) = at(p) else {
                if in_double || in_single {
                    return None;
                }
                break;
            };
            if in_double {
                if c == b'\\'
                    && at(p + 1) == Some(b'x')
                    && let (Some(h), Some(l)) = (at(p + 2).and_then(hex_value), at(p + 3).and_then(hex_value))
                {
                    current.push(h * 16 + l);
                    p += 4;
                    continue;
                }
                if c == b'\\' && at(p + 1).is_some() {
                    let e = at(p + 1).unwrap_or_default();
                    current.push(match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    p += 2;
                } else if c == b'"' {
                    if at(p + 1).is_some_and(|n| !is_space(n)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    current.push(c);
                    p += 1;
                }
            } else if in_single {
                if c == b'\\' && at(p + 1) == Some(b'\'') {
                    current.push(b'\'');
                    p += 2;
                } else if c == b'\'' {
                    if at(p + 1).is_some_and(|n| !is_space(n)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    current.push(c);
                    p += 1;
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' => {
                        p += 1;
                        break;
                    }
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    _ => current.push(c),
                }
                p += 1;
            }
        }
        args.push(Bytes::from(current));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Bytes>>, RequestError> {
        let mut p = RequestParser::new();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(cmd) = p.next(&mut buf, &RequestLimits::default())? {
            out.push(cmd);
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_inline_commands_parse() {
        let cmds = parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*0\r\n\r\nset a \"b c\"\r\n").unwrap();
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0], vec![Bytes::from("GET"), Bytes::from("k")]);
        assert_eq!(cmds[1], vec![Bytes::from("PING")]);
        assert_eq!(cmds[2], vec![Bytes::from("set"), Bytes::from("a"), Bytes::from("b c")]);
    }

    #[test]
    fn malformed_headers_get_redis_errors() {
        assert_eq!(parse_all(b"*abc\r\n"), Err(RequestError::InvalidMultibulkLength));
        assert_eq!(parse_all(b"*3000000000\r\n"), Err(RequestError::InvalidMultibulkLength));
        assert_eq!(parse_all(b"*1\r\n$-3\r\n"), Err(RequestError::InvalidBulkLength));
        assert_eq!(parse_all(b"*1\r\n$x\r\n"), Err(RequestError::InvalidBulkLength));
        assert_eq!(parse_all(b"*1\r\n*1\r\n"), Err(RequestError::ExpectedDollar(b'*')));
        assert_eq!(parse_all(b"\"unbalanced\r\n"), Err(RequestError::UnbalancedQuotes));
        assert_eq!(parse_all(b"\"a\"b\r\n"), Err(RequestError::UnbalancedQuotes));
        assert_eq!(
            RequestError::ExpectedDollar(b'*').to_reply(),
            Bytes::from_static(b"-ERR Protocol error: expected '$', got '*'\r\n")
        );
    }

    #[test]
    fn string2ll_rules_match_redis() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"01"), None);
        assert_eq!(parse_i64(b"+1"), None);
        assert_eq!(parse_i64(b"-0"), None);
        assert_eq!(parse_i64(b""), None);
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
    }

    #[test]
    fn inline_quoting_follows_sdssplitargs() {
        let args = split_inline(b"set k \"a\\x41\\n\" 'it\\'s'").unwrap();
        assert_eq!(args, vec![Bytes::from("set"), Bytes::from("k"), Bytes::from("aA\n"), Bytes::from("it's")]);
        assert_eq!(split_inline(b"a\0b c").unwrap(), vec![Bytes::from("a")]);
        assert!(split_inline(b"\0\0\0").unwrap().is_empty());
    }

    #[test]
    fn byte_at_a_time_gives_the_same_commands() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\nGET k\r\n";
        let mut p = RequestParser::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in input {
            buf.extend_from_slice(&[*b]);
            while let Some(cmd) = p.next(&mut buf, &RequestLimits::default()).unwrap() {
                out.push(cmd);
            }
        }
        assert_eq!(out, parse_all(input).unwrap());
    }

    #[test]
    fn limits_apply() {
        let limits = RequestLimits { max_bulk_bytes: 4, max_args: 2, max_inline_bytes: 16 };
        let mut p = RequestParser::new();
        let mut buf = BytesMut::from(&b"*1\r\n$5\r\nhello\r\n"[..]);
        assert_eq!(p.next(&mut buf, &limits), Err(RequestError::InvalidBulkLength));
        let mut buf = BytesMut::from(&b"*3\r\n"[..]);
        assert_eq!(RequestParser::new().next(&mut buf, &limits), Err(RequestError::InvalidMultibulkLength));
        let mut buf = BytesMut::from(&[b'a'; 17][..]);
        assert_eq!(RequestParser::new().next(&mut buf, &limits), Err(RequestError::TooBigInline));
        // A NUL hides the newline from Redis's strchr(): the line never ends.
        let mut buf = BytesMut::from(&b"PING\0x\r\n"[..]);
        assert_eq!(RequestParser::new().next(&mut buf, &limits), Ok(None));
        // The limit holds when the whole line arrives at once, too.
        let mut buf = BytesMut::from(&b"ECHO aaaaaaaaaaaaaaaaaaaa\r\n"[..]);
        assert_eq!(RequestParser::new().next(&mut buf, &limits), Err(RequestError::TooBigInline));
        let mut buf = BytesMut::from(&b"ECHO aaaaaaaaaaa\r\n"[..]);
        assert_eq!(RequestParser::new().next(&mut buf, &limits).unwrap().unwrap().len(), 2);
        let mut buf = BytesMut::from(&b"ECHO aaaaaaaaaaaa\n"[..]);
        assert_eq!(RequestParser::new().next(&mut buf, &limits), Err(RequestError::TooBigInline));
        let mut buf = BytesMut::from(&b"*00000000000000001\r\n$4\r\nPING\r\n"[..]);
        assert_eq!(RequestParser::new().next(&mut buf, &limits), Err(RequestError::TooBigMultibulkCount));
    }
}
