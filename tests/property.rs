//! Property: however a client's pipeline is cut into TCP writes, sidecache answers it exactly as
//! Redis does — one reply per command, in order, byte for byte.
//!
//! One Redis and one in-process sidecache serve every case. A case is a random pipeline of
//! string and connection commands over a few shared keys (so they interact: `INCR` on a binary
//! value fails, `APPEND` grows what `GET` and `STRLEN` see), in RESP multibulk and inline form,
//! written through the proxy in random chunks with flushes, yields and tiny sleeps between them.
//! The same bytes are sent on a direct connection to Redis (database 5; the proxy side uses
//! database 6; both flushed first), and the two reply streams must be identical.

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::io::AsyncWriteExt;

/// Keys shared by every command, so that commands see each other's effects.
const KEYS: [&str; 5] = ["k:0", "k:1", "k:2", "counter:0", "counter:1"];

/// One command of a pipeline. Keys are indexes into `KEYS`.
#[derive(Debug, Clone)]
enum Cmd {
    Set(usize, Vec<u8>),
    Get(usize),
    Incr(usize),
    Append(usize, Vec<u8>),
    Echo(Vec<u8>),
    Strlen(usize),
    Del(usize),
    /// `PING\r\n`, inline.
    InlinePing,
    /// `GET <key>\n` or `GET <key>\r\n`, inline.
    InlineGet(usize, bool),
    /// `ECHO "<text>"\r\n`, inline with quoting; the text avoids bytes that need escapes.
    InlineEcho(String),
}

impl Cmd {
    fn encode(&self, out: &mut Vec<u8>) {
        let key = |k: &usize| KEYS[*k].as_bytes();
        match self {
            Cmd::Set(k, v) => out.extend(encode(&[b"SET", key(k), v])),
            Cmd::Get(k) => out.extend(encode(&[b"GET", key(k)])),
            Cmd::Incr(k) => out.extend(encode(&[b"INCR", key(k)])),
            Cmd::Append(k, v) => out.extend(encode(&[b"APPEND", key(k), v])),
            Cmd::Echo(v) => out.extend(encode(&[b"ECHO", v])),
            Cmd::Strlen(k) => out.extend(encode(&[b"STRLEN", key(k)])),
            Cmd::Del(k) => out.extend(encode(&[b"DEL", key(k)])),
            Cmd::InlinePing => out.extend_from_slice(b"PING\r\n"),
            Cmd::InlineGet(k, crlf) => {
                out.extend_from_slice(b"GET ");
                out.extend_from_slice(key(k));
                out.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
            }
            Cmd::InlineEcho(text) => out.extend_from_slice(format!("ECHO \"{text}\"\r\n").as_bytes()),
        }
    }
}

/// Binary values, 0..300 bytes, often full of CR, LF and NUL; sometimes a small number, so that
/// `INCR` and `APPEND` have something to work on.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..300),
        2 => prop::collection::vec(prop::sample::select(vec![b'\r', b'\n', 0u8, b'a', b'$', b'*']), 0..40),
        2 => (0i64..1000).prop_map(|n| n.to_string().into_bytes()),
    ]
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let key = 0..KEYS.len();
    prop_oneof![
        3 => (key.clone(), value()).prop_map(|(k, v)| Cmd::Set(k, v)),
        3 => key.clone().prop_map(Cmd::Get),
        2 => key.clone().prop_map(Cmd::Incr),
        2 => (key.clone(), value()).prop_map(|(k, v)| Cmd::Append(k, v)),
        1 => value().prop_map(Cmd::Echo),
        1 => key.clone().prop_map(Cmd::Strlen),
        1 => key.clone().prop_map(Cmd::Del),
        1 => Just(Cmd::InlinePing),
        1 => (key, any::<bool>()).prop_map(|(k, crlf)| Cmd::InlineGet(k, crlf)),
        1 => "[a-zA-Z0-9 :.,_-]{0,20}".prop_map(Cmd::InlineEcho),
    ]
}

/// What to do after writing a chunk.
#[derive(Debug, Clone, Copy)]
enum Pause {
    None,
    Yield,
    Sleep,
}

#[derive(Debug, Clone)]
struct Case {
    cmds: Vec<Cmd>,
    /// Where the encoded pipeline is cut (indexes into its bytes; sorted and deduplicated later).
    cuts: Vec<Index>,
    /// The pause after each chunk, cycled.
    pauses: Vec<Pause>,
}

fn case() -> impl Strategy<Value = Case> {
    let pause = prop_oneof![6 => Just(Pause::None), 2 => Just(Pause::Yield), 1 => Just(Pause::Sleep)];
    (
        prop::collection::vec(cmd(), 1..40),
        prop::collection::vec(any::<Index>(), 0..24),
        prop::collection::vec(pause, 1..8),
    )
        .prop_map(|(cmds, cuts, pauses)| Case { cmds, cuts, pauses })
}

/// A connection on `db`, emptied.
async fn connect(addr: &str, db: &str) -> Client {
    let mut c = Client::connect(addr).await;
    assert_eq!(c.cmd(&["SELECT", db]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["FLUSHDB"]).await, b("+OK\r\n"));
    c
}

async fn run_case(redis: &RedisServer, proxy: &Proxy, case: &Case) -> Result<(), TestCaseError> {
    let mut bytes = Vec::new();
    for c in &case.cmds {
        c.encode(&mut bytes);
    }
    let mut cuts: Vec<usize> = case.cuts.iter().map(|i| i.index(bytes.len())).filter(|&i| i > 0).collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.push(bytes.len());

    // Reference: Redis itself, all bytes in one write.
    let mut direct = connect(&redis.addr(), "5").await;
    direct.send_raw(&bytes).await;
    let mut want = Vec::with_capacity(case.cmds.len());
    for _ in &case.cmds {
        want.push(direct.read().await);
    }

    let mut via = connect(&proxy.addr.to_string(), "6").await;
    let mut from = 0;
    for (i, &to) in cuts.iter().enumerate() {
        via.send_raw(&bytes[from..to]).await;
        via.stream.flush().await.expect("flush");
        match case.pauses[i % case.pauses.len()] {
            Pause::None => {}
            Pause::Yield => tokio::task::yield_now().await,
            Pause::Sleep => tokio::time::sleep(Duration::from_millis(1)).await,
        }
        from = to;
    }
    for (i, want) in want.iter().enumerate() {
        let got = via.read().await;
        prop_assert_eq!(&got, want, "reply {} (to {:?}) differs from Redis's", i, case.cmds[i]);
    }
    // Exactly one reply per command: the next reply is the answer to this PING.
    prop_assert_eq!(via.cmd(&["PING", "end"]).await, b("$3\r\nend\r\n"), "extra reply after the pipeline");
    Ok(())
}

#[test]
fn pipelines_split_at_random_boundaries_answer_in_order() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let redis = RedisServer::start();
    let proxy = rt.block_on(Proxy::start(&redis));

    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let result = runner.run(&case(), |case| rt.block_on(run_case(&redis, &proxy, &case)));
    if let Err(e) = result {
        panic!("{e}");
    }

    rt.block_on(proxy.shutdown());
}
