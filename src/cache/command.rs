//! `SIDECACHE CACHE STATS | INFO <key> | FLUSH` and `SIDECACHE HELP`: the near-cache's
//! introspection commands, answered by sidecache itself with Redis-style replies and errors.

use bytes::{BufMut, Bytes, BytesMut};

use super::{NearCache, Who, encode_pairs};
use crate::command::Command;
use crate::protocol::encode;
use crate::protocol::value::{self, Value};

const HELP: [&str; 7] = [
    "SIDECACHE <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "CACHE STATS",
    "    Return near-cache counters: coherence mode, entries, bytes, hits, misses, invalidations.",
    "CACHE INFO <key>",
    "    Return what is cached of <key> for this connection's user and database.",
    "CACHE FLUSH",
    "    Drop every cached entry of this instance.",
];

fn wrong_args(name: &str) -> Bytes {
    encode::error(&format!("ERR wrong number of arguments for '{name}' command"))
}

fn unknown(sub: &[u8]) -> Bytes {
    encode::error(&format!("ERR unknown subcommand '{}'. Try SIDECACHE HELP.", String::from_utf8_lossy(sub)))
}

/// Answers one `SIDECACHE …` command. `cache` is `None` when no near-cache is configured.
pub fn run(cache: Option<&NearCache>, who: &Who, cmd: &Command) -> Bytes {
    let args = &cmd.args;
    let Some(sub) = args.get(1) else { return wrong_args("sidecache") };
    if sub.eq_ignore_ascii_case(b"HELP") {
        let mut out = BytesMut::new();
        out.put_slice(format!("*{}\r\n", HELP.len()).as_bytes());
        for line in HELP {
            out.put_slice(format!("+{line}\r\n").as_bytes());
        }
        return out.freeze();
    }
    if !sub.eq_ignore_ascii_case(b"CACHE") {
        return unknown(sub);
    }
    let Some(op) = args.get(2) else { return wrong_args("sidecache|cache") };
    let upper = op.to_ascii_uppercase();
    match (upper.as_slice(), args.len()) {
        (b"STATS", 3) => match cache {
            Some(c) => encode_pairs(&c.stats(), who.proto),
            None => encode_pairs(&[("coherence".into(), "off".into()), ("entries".into(), "0".into())], who.proto),
        },
        (b"FLUSH", 3) => {
            if let Some(c) = cache {
                c.flush();
            }
            encode::simple("OK")
        }
        (b"INFO", 4) => {
            let items = cache.map(|c| c.info(who, &args[3])).unwrap_or_default();
            if items.is_empty() {
                return encode::null(who.proto);
            }
            let mut out = BytesMut::new();
            out.put_slice(format!("*{}\r\n", items.len()).as_bytes());
            for (view, rule, ttl) in items {
                let pairs =
                    [("read".to_string(), readable(&view)), ("rule".into(), rule), ("ttl_ms".into(), ttl.to_string())];
                out.put_slice(&encode_pairs(&pairs, who.proto));
            }
            out.freeze()
        }
        (b"STATS" | b"FLUSH" | b"INFO", _) => {
            wrong_args(&format!("sidecache|cache|{}", String::from_utf8_lossy(op).to_lowercase()))
        }
        _ => unknown(op),
    }
}

/// A view (an encoded command) as `GET` or `HGET field`.
fn readable(view: &Bytes) -> String {
    match value::parse(view) {
        Some(Value::Agg(_, parts)) => parts
            .iter()
            .filter_map(Value::as_bytes)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode::Proto;

    fn cmd(args: &[&str]) -> Command {
        Command::new(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect())
    }

    #[test]
    fn errors_are_in_redis_words() {
        let who = Who { user: Bytes::new(), db: 0, proto: Proto::Resp2 };
        assert_eq!(
            &run(None, &who, &cmd(&["sidecache"]))[..],
            b"-ERR wrong number of arguments for 'sidecache' command\r\n"
        );
        assert_eq!(
            &run(None, &who, &cmd(&["sidecache", "nope"]))[..],
            b"-ERR unknown subcommand 'nope'. Try SIDECACHE HELP.\r\n"
        );
        assert_eq!(
            &run(None, &who, &cmd(&["sidecache", "cache", "info"]))[..],
            b"-ERR wrong number of arguments for 'sidecache|cache|info' command\r\n"
        );
        assert_eq!(&run(None, &who, &cmd(&["sidecache", "cache", "flush"]))[..], b"+OK\r\n");
        assert_eq!(&run(None, &who, &cmd(&["sidecache", "cache", "info", "k"]))[..], b"$-1\r\n");
    }
}
