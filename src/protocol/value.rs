//! A small reader of complete reply frames into values, for the few replies sidecache looks
//! inside: cached read replies (to store them for both protocols), invalidation pushes, and the
//! `COMMAND` table. Everything else is forwarded as the bytes Redis sent and never parsed.
//!
//! Owns: `Value` and `parse`, which reads one whole frame (already bounded by the reply
//! scanner) and gives up beyond `MAX_DEPTH` levels of nesting instead of recursing further.

use bytes::Bytes;

/// Deepest nesting `parse` follows; deeper frames are not understood (`None`).
pub const MAX_DEPTH: usize = 16;

/// The kind of an aggregate reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    /// `*` array.
    Array,
    /// `%` map (RESP3), elements are key, value, key, value…
    Map,
    /// `~` set (RESP3).
    Set,
    /// `>` push (RESP3).
    Push,
    /// `|` attribute (RESP3).
    Attribute,
}

/// One reply, as far as sidecache needs to understand it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `+` simple string.
    Simple(Bytes),
    /// `-` or `!` error.
    Error(Bytes),
    /// `:` integer.
    Int(i64),
    /// `$` bulk string (also `=` verbatim, with its format prefix kept).
    Bulk(Bytes),
    /// `$-1`, `*-1` or `_`.
    Null,
    /// `,` double, `(` big number, `#` boolean: kept as their text.
    Other(u8, Bytes),
    /// An aggregate of values (a map's pairs flattened).
    Agg(Agg, Vec<Value>),
}

impl Value {
    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Bulk(b) | Value::Simple(b) => Some(b),
            _ => None,
        }
    }

    /// The integer of an integer reply.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }
}

/// Parses one complete frame that fills `frame` exactly; `None` when it is not one.
pub fn parse(frame: &Bytes) -> Option<Value> {
    let mut pos = 0;
    let v = parse_at(frame, &mut pos, 0)?;
    (pos == frame.len()).then_some(v)
}

fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = buf.get(*pos..)?;
    let end = memchr::memchr(b'\r', rest)?;
    if rest.get(end + 1) != Some(&b'\n') {
        return None;
    }
    *pos += end + 2;
    Some(&rest[..end])
}

fn number(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

fn parse_at(buf: &Bytes, pos: &mut usize, depth: usize) -> Option<Value> {
    if depth > MAX_DEPTH {
        return None;
    }
    let kind = *buf.get(*pos)?;
    *pos += 1;
    let start = *pos;
    let head = line(buf, pos)?;
    let text = || buf.slice(start..start + head.len());
    match kind {
        b'+' => Some(Value::Simple(text())),
        b'-' => Some(Value::Error(text())),
        b':' => Some(Value::Int(number(head)?)),
        b'_' => Some(Value::Null),
        b',' | b'(' | b'#' => Some(Value::Other(kind, text())),
        b'$' | b'=' | b'!' => {
            let n = number(head)?;
            if n < 0 {
                return (kind == b'$').then_some(Value::Null);
            }
            let n = usize::try_from(n).ok()?;
            let body = buf.get(*pos..*pos + n)?;
            if buf.get(*pos + n..*pos + n + 2) != Some(b"\r\n") {
                return None;
            }
            let bytes = buf.slice(*pos..*pos + body.len());
            *pos += n + 2;
            Some(if kind == b'!' { Value::Error(bytes) } else { Value::Bulk(bytes) })
        }
        b'*' | b'%' | b'~' | b'>' | b'|' => {
            let n = number(head)?;
            if n < 0 {
                return (kind == b'*').then_some(Value::Null);
            }
            let (agg, count) = match kind {
                b'*' => (Agg::Array, n),
                b'%' => (Agg::Map, n.checked_mul(2)?),
                b'~' => (Agg::Set, n),
                b'>' => (Agg::Push, n),
                _ => (Agg::Attribute, n.checked_mul(2)?),
            };
            // Every element takes at least three bytes: a claimed count beyond that is a lie.
            if usize::try_from(count).ok()? > buf.len().saturating_sub(*pos) / 3 {
                return None;
            }
            let mut items = Vec::with_capacity(count as usize);
            for _ in 0..count {
                items.push(parse_at(buf, pos, depth + 1)?);
            }
            if agg == Agg::Attribute {
                // An attribute annotates the reply that follows it: that reply is the value.
                return parse_at(buf, pos, depth + 1);
            }
            Some(Value::Agg(agg, items))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<Value> {
        parse(&Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn parses_the_reply_shapes_sidecache_reads() {
        assert_eq!(p("$3\r\nabc\r\n"), Some(Value::Bulk(Bytes::from_static(b"abc"))));
        assert_eq!(p("$-1\r\n"), Some(Value::Null));
        assert_eq!(p("_\r\n"), Some(Value::Null));
        assert_eq!(p(":-5\r\n"), Some(Value::Int(-5)));
        assert_eq!(
            p("%1\r\n$1\r\nf\r\n$1\r\nv\r\n"),
            Some(Value::Agg(
                Agg::Map,
                vec![Value::Bulk(Bytes::from_static(b"f")), Value::Bulk(Bytes::from_static(b"v"))]
            ))
        );
        assert_eq!(
            p(">2\r\n$10\r\ninvalidate\r\n_\r\n"),
            Some(Value::Agg(Agg::Push, vec![Value::Bulk(Bytes::from_static(b"invalidate")), Value::Null]))
        );
    }

    #[test]
    fn refuses_partial_trailing_and_too_deep_frames() {
        assert_eq!(p("$3\r\nab"), None);
        assert_eq!(p(":1\r\n:2\r\n"), None);
        assert_eq!(p("*1000000\r\n:1\r\n"), None);
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2) + ":1\r\n";
        assert_eq!(p(&deep), None);
    }
}
