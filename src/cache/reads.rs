//! Which reads the near-cache answers, what part of a key each one reads (its *view*), and how a
//! reply is stored once and rendered for both RESP2 and RESP3 clients.
//!
//! Owns: the list of cached commands (`GET`, `MGET`, `HGET`, `HMGET`, `HGETALL`, `SMEMBERS`,
//! `EXISTS`, `STRLEN`, `LRANGE`, and the `ZRANGE` family without `WITHSCORES`), their reply
//! shapes, and `Stored`: a reply kept in both protocol encodings when they differ (a null, a
//! map, a set), so one entry serves every client. Replies of any other shape (errors included)
//! are never stored.

use bytes::{BufMut, Bytes, BytesMut};

use crate::command::Command;
use crate::protocol::encode::{self, Proto};
use crate::protocol::value::{self, Agg, Value};

/// What a cached reply looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A bulk string, a null or an integer.
    Scalar,
    /// An array of bulk strings and nulls.
    Array,
    /// A map of field to value (`HGETALL`): a flat array in RESP2.
    Map,
    /// A set of members (`SMEMBERS`): an array in RESP2.
    Set,
}

/// A cacheable read of one key.
#[derive(Debug, Clone)]
pub struct Read {
    /// The key read.
    pub key: Bytes,
    /// The command and its arguments after the key: what part of the key is read.
    pub view: Bytes,
    /// The reply's shape.
    pub shape: Shape,
    /// Another view whose cached reply also answers this read (never joined while in flight).
    pub hit_also: Option<Bytes>,
}

/// How a command can use the near-cache.
#[derive(Debug, Clone)]
pub enum Plan {
    /// A read of one key.
    Single(Read),
    /// `MGET`: one `mget_element` read per key.
    Mget(Vec<Bytes>),
}

/// The view of `GET key`.
pub fn get_view() -> Bytes {
    Bytes::from_static(b"*1\r\n$3\r\nGET\r\n")
}

/// What `MGET` reads of each of its keys. Its null means "no string there": the key is missing
/// or holds another type. So an `MGET` fill never answers a `GET`, which must say `WRONGTYPE` for
/// a hash; the other way is safe, and a cached `GET` reply (a string, or the null of a missing
/// key) answers an `MGET` element as a hit (`Read::hit_also`).
pub fn mget_element(key: Bytes) -> Read {
    Read { key, view: Bytes::from_static(b"*1\r\n$4\r\nMGET\r\n"), shape: Shape::Scalar, hit_also: Some(get_view()) }
}

fn view_of(name: &[u8], rest: &[Bytes]) -> Bytes {
    let mut out = BytesMut::new();
    let mut args: Vec<&[u8]> = Vec::with_capacity(rest.len() + 1);
    args.push(name);
    args.extend(rest.iter().map(|a| a.as_ref()));
    encode::command(&mut out, &args);
    out.freeze()
}

/// The cache plan of a command, if it is a cached read with a valid argument count.
pub fn plan(cmd: &Command) -> Option<Plan> {
    let n = cmd.args.len();
    let shape = match cmd.name() {
        b"GET" | b"STRLEN" | b"EXISTS" if n == 2 => Shape::Scalar,
        b"HGET" if n == 3 => Shape::Scalar,
        b"HMGET" if n >= 3 => Shape::Array,
        b"HGETALL" if n == 2 => Shape::Map,
        b"SMEMBERS" if n == 2 => Shape::Set,
        b"LRANGE" if n == 4 => Shape::Array,
        b"ZRANGE" | b"ZRANGEBYSCORE" | b"ZRANGEBYLEX" | b"ZREVRANGE" | b"ZREVRANGEBYSCORE" | b"ZREVRANGEBYLEX"
            if n >= 4 && !cmd.args[4..].iter().any(|a| a.eq_ignore_ascii_case(b"WITHSCORES")) =>
        {
            Shape::Array
        }
        b"MGET" if n >= 2 => return Some(Plan::Mget(cmd.args[1..].to_vec())),
        _ => return None,
    };
    let view = if cmd.name() == b"GET" { get_view() } else { view_of(cmd.name(), &cmd.args[2..]) };
    Some(Plan::Single(Read { key: cmd.args[1].clone(), view, shape, hit_also: None }))
}

/// A reply kept for both protocols.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The RESP2 encoding.
    pub resp2: Bytes,
    /// The RESP3 encoding, when it differs.
    pub resp3: Option<Bytes>,
}

impl Stored {
    /// The reply for a client of `proto`.
    pub fn reply(&self, proto: Proto) -> &Bytes {
        match (proto, &self.resp3) {
            (Proto::Resp3, Some(r3)) => r3,
            _ => &self.resp2,
        }
    }

    /// Bytes this reply holds.
    pub fn weight(&self) -> usize {
        self.resp2.len() + self.resp3.as_ref().map_or(0, |r| r.len())
    }
}

fn put_header(out: &mut BytesMut, kind: u8, n: usize) {
    out.put_u8(kind);
    out.put_slice(itoa::Buffer::new().format(n).as_bytes());
    out.put_slice(b"\r\n");
}

fn put_item(out: &mut BytesMut, item: &Option<Bytes>, proto: Proto) {
    match (item, proto) {
        (Some(b), _) => {
            put_header(out, b'$', b.len());
            out.put_slice(b);
            out.put_slice(b"\r\n");
        }
        (None, Proto::Resp2) => out.put_slice(b"$-1\r\n"),
        (None, Proto::Resp3) => out.put_slice(b"_\r\n"),
    }
}

fn render(items: &[Option<Bytes>], shape: Shape, proto: Proto) -> Bytes {
    let mut out =
        BytesMut::with_capacity(items.iter().map(|i| i.as_ref().map_or(5, |b| b.len() + 16)).sum::<usize>() + 16);
    match (shape, proto) {
        (Shape::Map, Proto::Resp3) => put_header(&mut out, b'%', items.len() / 2),
        (Shape::Set, Proto::Resp3) => put_header(&mut out, b'~', items.len()),
        _ => put_header(&mut out, b'*', items.len()),
    }
    for item in items {
        put_item(&mut out, item, proto);
    }
    out.freeze()
}

/// Converts a reply frame (of either protocol) into a stored reply, if its shape is cacheable.
pub fn store(frame: &Bytes, shape: Shape) -> Option<Stored> {
    let value = value::parse(frame)?;
    match (shape, value) {
        (Shape::Scalar, Value::Bulk(b)) => {
            let mut out = BytesMut::with_capacity(b.len() + 16);
            put_item(&mut out, &Some(b), Proto::Resp2);
            Some(Stored { resp2: out.freeze(), resp3: None })
        }
        (Shape::Scalar, Value::Null) => {
            Some(Stored { resp2: Bytes::from_static(b"$-1\r\n"), resp3: Some(Bytes::from_static(b"_\r\n")) })
        }
        (Shape::Scalar, Value::Int(n)) => {
            let mut out = BytesMut::new();
            out.put_u8(b':');
            out.put_slice(itoa::Buffer::new().format(n).as_bytes());
            out.put_slice(b"\r\n");
            Some(Stored { resp2: out.freeze(), resp3: None })
        }
        (Shape::Array | Shape::Map | Shape::Set, Value::Agg(agg, items)) => {
            let fits = match shape {
                Shape::Map => matches!(agg, Agg::Map | Agg::Array) && items.len() % 2 == 0,
                Shape::Set => matches!(agg, Agg::Set | Agg::Array),
                _ => agg == Agg::Array,
            };
            if !fits {
                return None;
            }
            let items = items
                .into_iter()
                .map(|v| match v {
                    Value::Bulk(b) => Some(Some(b)),
                    Value::Null => Some(None),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            let resp2 = render(&items, shape, Proto::Resp2);
            let resp3 = render(&items, shape, Proto::Resp3);
            let resp3 = (resp3 != resp2).then_some(resp3);
            Some(Stored { resp2, resp3 })
        }
        _ => None,
    }
}

/// Splits an `MGET` reply into one `GET`-shaped frame per key; `None` if it is not an array of
/// `n` bulk strings or nulls (an error, for example).
pub fn split_mget(frame: &Bytes, n: usize, proto: Proto) -> Option<Vec<Bytes>> {
    match value::parse(frame)? {
        Value::Agg(Agg::Array, items) if items.len() == n => items
            .into_iter()
            .map(|v| {
                let item = match v {
                    Value::Bulk(b) => Some(b),
                    Value::Null => None,
                    _ => return None,
                };
                let mut out = BytesMut::new();
                put_item(&mut out, &item, proto);
                Some(out.freeze())
            })
            .collect(),
        _ => None,
    }
}

/// Joins per-key `GET` replies into one `MGET` reply.
pub fn join_mget(parts: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 16);
    put_header(&mut out, b'*', parts.len());
    for p in parts {
        out.put_slice(p);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Command {
        Command::new(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect())
    }

    #[test]
    fn plans_only_side_effect_free_reads_with_valid_arity() {
        assert!(matches!(plan(&cmd(&["get", "k"])), Some(Plan::Single(r)) if r.shape == Shape::Scalar));
        assert!(plan(&cmd(&["get", "k", "x"])).is_none());
        assert!(plan(&cmd(&["zrange", "z", "0", "-1", "withscores"])).is_none());
        assert!(matches!(plan(&cmd(&["zrange", "z", "0", "-1", "rev"])), Some(Plan::Single(_))));
        assert!(matches!(plan(&cmd(&["mget", "a", "b"])), Some(Plan::Mget(k)) if k.len() == 2));
        assert!(plan(&cmd(&["set", "k", "v"])).is_none());
        let a = plan(&cmd(&["hget", "h", "f"]));
        let b = plan(&cmd(&["hget", "h", "g"]));
        match (a, b) {
            (Some(Plan::Single(a)), Some(Plan::Single(b))) => assert_ne!(a.view, b.view),
            _ => panic!("HGET is cached"),
        }
    }

    #[test]
    fn one_entry_serves_both_protocols() {
        let map3 = Bytes::from_static(b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
        let map2 = Bytes::from_static(b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n");
        for frame in [&map2, &map3] {
            let s = store(frame, Shape::Map).expect("a map is cacheable");
            assert_eq!(s.reply(Proto::Resp2), &map2);
            assert_eq!(s.reply(Proto::Resp3), &map3);
        }
        let null = store(&Bytes::from_static(b"_\r\n"), Shape::Scalar).unwrap();
        assert_eq!(null.reply(Proto::Resp2).as_ref(), b"$-1\r\n");
        assert_eq!(null.reply(Proto::Resp3).as_ref(), b"_\r\n");
        assert!(store(&Bytes::from_static(b"-WRONGTYPE x\r\n"), Shape::Scalar).is_none());
        assert!(store(&Bytes::from_static(b"*1\r\n:1\r\n"), Shape::Array).is_none());
    }

    #[test]
    fn mget_replies_split_and_join() {
        let frame = Bytes::from_static(b"*2\r\n$1\r\na\r\n_\r\n");
        let parts = split_mget(&frame, 2, Proto::Resp3).unwrap();
        assert_eq!(join_mget(&parts), frame);
        assert!(split_mget(&Bytes::from_static(b"-ERR x\r\n"), 2, Proto::Resp2).is_none());
    }
}
