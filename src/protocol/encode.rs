//! Encoders for the bytes sidecache writes itself: commands it forwards upstream (re-encoded from
//! their parsed form, never the client's raw bytes) and replies it answers locally.
//!
//! Local replies go through `redis-protocol`'s borrowed-frame encoders for the client's protocol
//! version (RESP2 or RESP3), so a null is `$-1` for one and `_` for the other. Command encoding
//! is the hot path and is written directly (`*N`, then `$len` + payload per argument).

use bytes::{BufMut, Bytes, BytesMut};
use redis_protocol::resp2::{encode as resp2_encode, types::BorrowedFrame as Frame2};
use redis_protocol::resp3::{encode::complete as resp3_encode, types::BorrowedFrame as Frame3};

/// The RESP version a client or connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Proto {
    /// RESP2, the default of every new connection.
    #[default]
    Resp2,
    /// RESP3, after `HELLO 3`.
    Resp3,
}

impl Proto {
    /// The number `HELLO` takes.
    pub fn version(self) -> u8 {
        match self {
            Proto::Resp2 => 2,
            Proto::Resp3 => 3,
        }
    }
}

fn put_len(out: &mut BytesMut, prefix: u8, n: usize) {
    let mut digits = itoa::Buffer::new();
    out.put_u8(prefix);
    out.put_slice(digits.format(n).as_bytes());
    out.put_slice(b"\r\n");
}

/// Appends a command as a RESP array of bulk strings.
pub fn command<A: AsRef<[u8]>>(out: &mut BytesMut, args: &[A]) {
    let payload: usize = args.iter().map(|a| a.as_ref().len() + 16).sum();
    out.reserve(payload + 16);
    put_len(out, b'*', args.len());
    for arg in args {
        let arg = arg.as_ref();
        put_len(out, b'$', arg.len());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
}

/// A command as one owned buffer.
pub fn command_bytes<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let mut out = BytesMut::new();
    command(&mut out, args);
    out.freeze()
}

fn encode2(frame: &Frame2<'_>) -> Bytes {
    let mut out = BytesMut::new();
    // Encoding into a growable buffer cannot fail for these frame kinds.
    let _ = resp2_encode::extend_encode_borrowed(&mut out, frame, false);
    out.freeze()
}

fn encode3(frame: &Frame3<'_>) -> Bytes {
    let mut out = BytesMut::new();
    let _ = resp3_encode::extend_encode_borrowed(&mut out, frame, false);
    out.freeze()
}

/// `+<text>` (identical in RESP2 and RESP3).
pub fn simple(text: &str) -> Bytes {
    encode2(&Frame2::SimpleString(text.as_bytes()))
}

/// `-<message>`: `message` starts with the error code (`ERR …`, `NOPERM …`).
pub fn error(message: &str) -> Bytes {
    encode2(&Frame2::Error(message))
}

/// A bulk string.
pub fn bulk(data: &[u8]) -> Bytes {
    encode2(&Frame2::BulkString(data))
}

/// An integer.
pub fn integer(n: i64) -> Bytes {
    encode2(&Frame2::Integer(n))
}

/// The null reply of the given protocol: `$-1` in RESP2, `_` in RESP3.
pub fn null(proto: Proto) -> Bytes {
    match proto {
        Proto::Resp2 => encode2(&Frame2::Null),
        Proto::Resp3 => encode3(&Frame3::Null),
    }
}

/// The null of an array-shaped reply: `*-1` in RESP2 (what `BLPOP` answers on timeout), `_` in RESP3.
pub fn null_array(proto: Proto) -> Bytes {
    match proto {
        Proto::Resp2 => Bytes::from_static(b"*-1\r\n"),
        Proto::Resp3 => encode3(&Frame3::Null),
    }
}

/// An array of already encoded replies.
pub fn array(items: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + items.iter().map(Bytes::len).sum::<usize>());
    put_len(&mut out, b'*', items.len());
    for item in items {
        out.put_slice(item);
    }
    out.freeze()
}

/// Named integers: a map in RESP3, a flat `[name, value, …]` array in RESP2 (as Redis answers
/// `HELLO` or `XINFO` for each protocol).
pub fn int_fields(proto: Proto, fields: &[(&str, i64)]) -> Bytes {
    let mut out = BytesMut::new();
    match proto {
        Proto::Resp2 => put_len(&mut out, b'*', fields.len() * 2),
        Proto::Resp3 => put_len(&mut out, b'%', fields.len()),
    }
    for (name, value) in fields {
        out.put_slice(&bulk(name.as_bytes()));
        out.put_slice(&integer(*value));
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_and_local_replies() {
        assert_eq!(command_bytes(&["GET", "k"]), Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"));
        assert_eq!(error("ERR x"), Bytes::from_static(b"-ERR x\r\n"));
        assert_eq!(null(Proto::Resp2), Bytes::from_static(b"$-1\r\n"));
        assert_eq!(null(Proto::Resp3), Bytes::from_static(b"_\r\n"));
        assert_eq!(bulk(b"ab"), Bytes::from_static(b"$2\r\nab\r\n"));
        assert_eq!(integer(-3), Bytes::from_static(b":-3\r\n"));
        assert_eq!(simple("OK"), Bytes::from_static(b"+OK\r\n"));
        assert_eq!(null_array(Proto::Resp2), Bytes::from_static(b"*-1\r\n"));
        assert_eq!(array(&[bulk(b"t"), integer(7)]), Bytes::from_static(b"*2\r\n$1\r\nt\r\n:7\r\n"));
        assert_eq!(int_fields(Proto::Resp2, &[("a", 1)]), Bytes::from_static(b"*2\r\n$1\r\na\r\n:1\r\n"));
        assert_eq!(int_fields(Proto::Resp3, &[("a", 1)]), Bytes::from_static(b"%1\r\n$1\r\na\r\n:1\r\n"));
    }
}
