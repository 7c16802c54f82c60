//! TTL policy by key prefix (issue 4): every key-creating write gets its rule's default TTL,
//! explicit TTLs above `max` are clamped, and the client sees exactly what Redis would have
//! answered without the policy.
//!
//! Replies are compared byte for byte with the same commands sent directly to a second,
//! policy-free Redis; TTLs are read directly from the Redis behind sidecache.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use sidecache::Config;
use sidecache::ttl::{TtlConfig, TtlMode, TtlRuleConfig};

/// The default TTL of the `t:` rule in these tests, and its `max`.
const DEFAULT_MS: i64 = 100_000;
const MAX_MS: i64 = 1_000_000;

fn rule(prefix: &str, db: Option<u32>, default: Duration, max: Option<Duration>) -> TtlRuleConfig {
    TtlRuleConfig { name: None, prefix: prefix.into(), db, default, max }
}

fn rules(c: &mut Config) {
    c.ttl = TtlConfig {
        mode: TtlMode::Enforce,
        rules: vec![
            rule("t:", None, Duration::from_millis(DEFAULT_MS as u64), Some(Duration::from_millis(MAX_MS as u64))),
            rule("d2:", Some(2), Duration::from_secs(50), None),
        ],
    };
}

/// A client through sidecache, one straight to the Redis behind it (for setup and TTLs), and one
/// to a policy-free Redis (the reference for replies).
struct Rig {
    redis: RedisServer,
    plain_redis: RedisServer,
    _proxy: Proxy,
    proxied: Client,
    direct: Client,
    plain: Client,
}

impl Rig {
    async fn start() -> Rig {
        let redis = RedisServer::start();
        let plain_redis = RedisServer::start();
        let proxy = Proxy::start_with(&redis, rules).await;
        let proxied = proxy.client().await;
        let direct = Client::connect(&redis.addr()).await;
        let plain = Client::connect(&plain_redis.addr()).await;
        Rig { redis, plain_redis, _proxy: proxy, proxied, direct, plain }
    }

    /// Through sidecache and to the reference: the replies must be identical.
    async fn both(&mut self, args: &[&str]) -> Bytes {
        let got = self.proxied.cmd(args).await;
        let want = self.plain.cmd(args).await;
        assert_eq!(got, want, "{args:?}: sidecache answered {got:?}, Redis {want:?}");
        got
    }

    /// Setup without the policy: straight to both Redis servers.
    async fn setup(&mut self, args: &[&str]) {
        let a = self.direct.cmd(args).await;
        let b = self.plain.cmd(args).await;
        assert_eq!(a, b, "setup {args:?}");
    }

    async fn pttl(&mut self, key: &str) -> i64 {
        pttl(&mut self.direct, key).await
    }

    /// The key's PTTL in database `db` of the Redis behind sidecache, and of the reference.
    async fn pttls_in(&self, db: &str, key: &str) -> (i64, i64) {
        let mut out = [0; 2];
        for (i, server) in [&self.redis, &self.plain_redis].into_iter().enumerate() {
            let mut c = Client::connect(&server.addr()).await;
            assert_eq!(c.cmd(&["SELECT", db]).await, b("+OK\r\n"));
            out[i] = pttl(&mut c, key).await;
        }
        (out[0], out[1])
    }

    /// The key's PTTL in database `db` of the Redis behind sidecache.
    async fn pttl_in(&self, db: &str, key: &str) -> i64 {
        self.pttls_in(db, key).await.0
    }

    /// Setup in database `db` of both Redis servers, without the policy.
    async fn setup_in(&self, db: &str, args: &[&str]) {
        let mut replies = Vec::new();
        for server in [&self.redis, &self.plain_redis] {
            let mut c = Client::connect(&server.addr()).await;
            assert_eq!(c.cmd(&["SELECT", db]).await, b("+OK\r\n"));
            replies.push(c.cmd(args).await);
        }
        assert_eq!(replies[0], replies[1], "setup in db {db}: {args:?}");
    }

    /// Switches every connection to RESP3 (the HELLO replies name different servers).
    async fn resp3(&mut self) {
        for c in [&mut self.proxied, &mut self.direct, &mut self.plain] {
            let r = c.cmd(&["HELLO", "3"]).await;
            assert!(r.starts_with(b"%"), "{r:?}");
        }
    }

    async fn select(&mut self, db: &str) {
        for c in [&mut self.proxied, &mut self.direct, &mut self.plain] {
            assert_eq!(c.cmd(&["SELECT", db]).await, b("+OK\r\n"));
        }
    }
}

async fn pttl(c: &mut Client, key: &str) -> i64 {
    let r = c.cmd(&["PTTL", key]).await;
    let text = String::from_utf8_lossy(&r);
    text.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("PTTL reply {text:?}"))
}

/// The key's TTL once it has one (for the paths where the TTL follows the write).
async fn settled_ttl(c: &mut Client, key: &str) -> i64 {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let ttl = pttl(c, key).await;
        if ttl != -1 || std::time::Instant::now() > deadline {
            return ttl;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fill<'a>(args: &[&'a str], k: &'a str, s: &'a str) -> Vec<&'a str> {
    args.iter()
        .map(|a| {
            if *a == "{k}" {
                k
            } else if *a == "{s}" {
                s
            } else {
                a
            }
        })
        .collect()
}

/// (name, setup, the write): `{k}` is the key under test, `{s}` an unruled source key.
type Case = (&'static str, &'static [&'static [&'static str]], &'static [&'static str]);

const WRITES: &[Case] = &[
    ("set", &[], &["SET", "{k}", "v"]),
    ("set_nx_get", &[], &["SET", "{k}", "v", "NX", "GET"]),
    ("set_get_existing", &[&["SET", "{k}", "old"]], &["SET", "{k}", "v", "GET"]),
    ("setnx", &[], &["SETNX", "{k}", "v"]),
    ("getset", &[&["SET", "{k}", "old"]], &["GETSET", "{k}", "new"]),
    ("mset", &[], &["MSET", "{k}", "a", "{s}", "b"]),
    ("msetnx", &[], &["MSETNX", "{k}", "a"]),
    ("hset", &[], &["HSET", "{k}", "f", "v", "g", "w"]),
    ("hsetnx", &[], &["HSETNX", "{k}", "f", "v"]),
    ("hmset", &[], &["HMSET", "{k}", "f", "v"]),
    ("hincrby", &[], &["HINCRBY", "{k}", "f", "5"]),
    ("hincrbyfloat", &[], &["HINCRBYFLOAT", "{k}", "f", "2.5"]),
    ("sadd", &[], &["SADD", "{k}", "a", "b"]),
    ("smove", &[&["SADD", "{s}", "a", "b"]], &["SMOVE", "{s}", "{k}", "a"]),
    ("sunionstore", &[&["SADD", "{s}", "a", "b"]], &["SUNIONSTORE", "{k}", "{s}"]),
    ("sinterstore", &[&["SADD", "{s}", "a", "b"]], &["SINTERSTORE", "{k}", "{s}"]),
    ("sdiffstore", &[&["SADD", "{s}", "a", "b"]], &["SDIFFSTORE", "{k}", "{s}"]),
    ("lpush", &[], &["LPUSH", "{k}", "a", "b"]),
    ("rpush", &[], &["RPUSH", "{k}", "a"]),
    ("lmove", &[&["RPUSH", "{s}", "a", "b"]], &["LMOVE", "{s}", "{k}", "LEFT", "RIGHT"]),
    ("rpoplpush", &[&["RPUSH", "{s}", "a"]], &["RPOPLPUSH", "{s}", "{k}"]),
    ("blmove", &[&["RPUSH", "{s}", "a"]], &["BLMOVE", "{s}", "{k}", "LEFT", "LEFT", "0"]),
    ("brpoplpush", &[&["RPUSH", "{s}", "a"]], &["BRPOPLPUSH", "{s}", "{k}", "0"]),
    ("zadd", &[], &["ZADD", "{k}", "1", "a", "2.5", "b"]),
    ("zincrby", &[], &["ZINCRBY", "{k}", "1.5", "a"]),
    ("zunionstore", &[&["ZADD", "{s}", "1", "a"]], &["ZUNIONSTORE", "{k}", "1", "{s}"]),
    ("zinterstore", &[&["ZADD", "{s}", "1", "a"]], &["ZINTERSTORE", "{k}", "1", "{s}"]),
    ("zdiffstore", &[&["ZADD", "{s}", "1", "a"]], &["ZDIFFSTORE", "{k}", "1", "{s}"]),
    ("zrangestore", &[&["ZADD", "{s}", "1", "a"]], &["ZRANGESTORE", "{k}", "{s}", "0", "-1"]),
    ("incr", &[], &["INCR", "{k}"]),
    ("incrby", &[], &["INCRBY", "{k}", "7"]),
    ("incrbyfloat", &[], &["INCRBYFLOAT", "{k}", "0.5"]),
    ("decr", &[], &["DECR", "{k}"]),
    ("decrby", &[], &["DECRBY", "{k}", "3"]),
    ("append", &[], &["APPEND", "{k}", "abc"]),
    ("setrange", &[], &["SETRANGE", "{k}", "3", "x"]),
    ("setbit", &[], &["SETBIT", "{k}", "7", "1"]),
    ("bitop", &[&["SET", "{s}", "ab"]], &["BITOP", "OR", "{k}", "{s}"]),
    ("bitfield", &[], &["BITFIELD", "{k}", "SET", "u8", "0", "255"]),
    ("pfadd", &[], &["PFADD", "{k}", "a", "b"]),
    ("pfmerge", &[&["PFADD", "{s}", "a"]], &["PFMERGE", "{k}", "{s}"]),
    ("xadd", &[], &["XADD", "{k}", "1-1", "f", "v"]),
    ("geoadd", &[], &["GEOADD", "{k}", "13.361389", "38.115556", "p"]),
    (
        "geosearchstore",
        &[&["GEOADD", "{s}", "13.361389", "38.115556", "p"]],
        &["GEOSEARCHSTORE", "{k}", "{s}", "FROMLONLAT", "15", "37", "BYRADIUS", "200", "km"],
    ),
    ("copy", &[&["SET", "{s}", "v"]], &["COPY", "{s}", "{k}"]),
    ("rename", &[&["SET", "{s}", "v"]], &["RENAME", "{s}", "{k}"]),
    ("renamenx", &[&["SET", "{s}", "v"]], &["RENAMENX", "{s}", "{k}"]),
    ("sort_store", &[&["RPUSH", "{s}", "3", "1", "2"]], &["SORT", "{s}", "STORE", "{k}"]),
];

/// Runs every write on a ruled key and on an unruled one; returns nothing, asserts everything.
async fn every_write(rig: &mut Rig, tag: &str) {
    for (name, setup, write) in WRITES {
        for (prefix, ruled) in [("t:", true), ("u:", false)] {
            let k = format!("{prefix}{name}:{tag}");
            let s = format!("src:{name}:{tag}:{prefix}");
            for step in setup.iter() {
                rig.setup(&fill(step, &k, &s)).await;
            }
            rig.both(&fill(write, &k, &s)).await;
            let mut ttl = rig.pttl(&k).await;
            if name.starts_with('b') && ruled {
                // Blocking moves run on a dedicated connection; the PEXPIRE follows them there.
                ttl = settled_ttl(&mut rig.direct, &k).await;
            }
            if ruled {
                assert!(ttl > 0 && ttl <= DEFAULT_MS, "{name}: {k} has PTTL {ttl}, expected the default");
            } else {
                assert_eq!(ttl, -1, "{name}: {k} matches no rule and must keep no TTL");
            }
            if *name == "mset" {
                assert_eq!(rig.pttl(&s).await, -1, "the unruled key of MSET keeps no TTL");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_creating_write_replies_as_redis_and_gets_the_default_ttl_resp2() {
    let mut rig = Rig::start().await;
    every_write(&mut rig, "r2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_creating_write_replies_as_redis_and_gets_the_default_ttl_resp3() {
    let mut rig = Rig::start().await;
    rig.resp3().await;
    every_write(&mut rig, "r3").await;
}

/// Every write of the table on a ruled key that already exists with a TTL: where Redis keeps a
/// TTL, sidecache leaves exactly that TTL; where the command itself drops it (`SET`, `GETSET`,
/// `RENAME`, `*STORE`… replace the key), the key gets the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_on_a_key_with_a_ttl_keeps_it_unless_redis_itself_drops_it() {
    let mut rig = Rig::start().await;
    for (name, setup, write) in WRITES {
        let k = format!("t:has_ttl:{name}");
        let s = format!("src:has_ttl:{name}");
        // Create the key with the write itself (so its type fits), without the policy.
        for step in setup.iter() {
            rig.setup(&fill(step, &k, &s)).await;
        }
        rig.setup(&fill(write, &k, &s)).await;
        rig.setup(&["PEXPIRE", &k, "500000"]).await;
        for step in setup.iter() {
            rig.setup(&fill(step, &k, &s)).await;
        }
        rig.both(&fill(write, &k, &s)).await;
        let redis_ttl = pttl(&mut rig.plain, &k).await;
        let ttl = if name.starts_with('b') { settled_ttl(&mut rig.direct, &k).await } else { rig.pttl(&k).await };
        if redis_ttl == -1 {
            assert!(ttl > 0 && ttl <= DEFAULT_MS, "{name}: Redis dropped the TTL; the default applies: {ttl}");
        } else {
            assert!(redis_ttl > 400_000, "{name}: {redis_ttl}");
            assert!(ttl > 400_000 && ttl <= 500_000, "{name}: the existing TTL stays: {ttl} (Redis: {redis_ttl})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_ttl_is_never_shortened_or_extended() {
    let mut rig = Rig::start().await;
    // (setup creating the key, the write); each key gets a long and a short existing TTL.
    let cases: &[(&[&str], &[&str])] = &[
        (&["HSET", "{k}", "f0", "v"], &["HSET", "{k}", "f", "v"]),
        (&["SADD", "{k}", "z"], &["SADD", "{k}", "a"]),
        (&["SET", "{k}", "1"], &["INCR", "{k}"]),
        (&["SET", "{k}", "a"], &["APPEND", "{k}", "b"]),
        (&["RPUSH", "{k}", "a"], &["LPUSH", "{k}", "b"]),
        (&["ZADD", "{k}", "1", "a"], &["ZADD", "{k}", "2", "b"]),
        (&["SET", "{k}", "a"], &["SETNX", "{k}", "b"]),
        (&["SET", "{k}", "a"], &["SET", "{k}", "b", "KEEPTTL"]),
        (&["SET", "{k}", "a"], &["MSETNX", "{k}", "b"]),
        (&["SADD", "{k}", "a"], &["SMOVE", "{s}", "{k}", "x"]),
    ];
    for (i, (create, write)) in cases.iter().enumerate() {
        for (existing, low, high) in [("500000", 400_000, 500_000), ("50000", 1, 50_000)] {
            let k = format!("t:existing:{i}:{existing}");
            let s = format!("src:existing:{i}:{existing}");
            rig.setup(&["SADD", &s, "x"]).await;
            rig.setup(&fill(create, &k, &s)).await;
            rig.setup(&["PEXPIRE", &k, existing]).await;
            rig.both(&fill(write, &k, &s)).await;
            let ttl = rig.pttl(&k).await;
            assert!((low..=high).contains(&ttl), "{write:?}: PTTL {ttl} should have stayed near {existing}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepttl_keeps_an_existing_ttl_and_gives_the_default_where_there_is_none() {
    let mut rig = Rig::start().await;
    rig.setup(&["SET", "t:keep:with", "a", "PX", "500000"]).await;
    rig.both(&["SET", "t:keep:with", "b", "KEEPTTL"]).await;
    assert!(rig.pttl("t:keep:with").await > 400_000, "KEEPTTL kept the existing TTL");
    rig.setup(&["SET", "t:keep:without", "a"]).await;
    rig.both(&["SET", "t:keep:without", "b", "KEEPTTL", "GET"]).await;
    let ttl = rig.pttl("t:keep:without").await;
    assert!(ttl > 0 && ttl <= DEFAULT_MS, "a key that had no TTL got the default: {ttl}");
    rig.both(&["SET", "t:keep:new", "b", "KEEPTTL"]).await;
    let ttl = rig.pttl("t:keep:new").await;
    assert!(ttl > 0 && ttl <= DEFAULT_MS, "a new key got the default: {ttl}");
    assert_eq!(rig.both(&["GET", "t:keep:without"]).await, b("$1\r\nb\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_ttls_are_kept_up_to_max_and_clamped_above() {
    let mut rig = Rig::start().await;
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let far_s = (now_s + 50_000).to_string();
    let far_ms = ((now_s + 50_000) * 1000).to_string();
    // (setup, write, whether the explicit TTL is above max)
    let cases: Vec<(Vec<&str>, Vec<&str>, bool)> = vec![
        (vec![], vec!["SET", "{k}", "v", "EX", "50"], false),
        (vec![], vec!["SET", "{k}", "v", "PX", "200000"], false),
        (vec![], vec!["SET", "{k}", "v", "EX", "5000"], true),
        (vec![], vec!["SET", "{k}", "v", "NX", "PX", "5000000"], true),
        (vec![], vec!["SET", "{k}", "v", "EXAT", &far_s], true),
        (vec![], vec!["SET", "{k}", "v", "PXAT", &far_ms, "GET"], true),
        (vec![], vec!["SETEX", "{k}", "5000", "v"], true),
        (vec![], vec!["SETEX", "{k}", "50", "v"], false),
        (vec![], vec!["PSETEX", "{k}", "5000000", "v"], true),
        (vec!["SET", "{k}", "v"], vec!["GETEX", "{k}", "EX", "5000"], true),
        (vec!["SET", "{k}", "v"], vec!["GETEX", "{k}", "PX", "30000"], false),
        (vec!["SET", "{k}", "v"], vec!["EXPIRE", "{k}", "5000"], true),
        (vec!["SET", "{k}", "v"], vec!["EXPIRE", "{k}", "5000", "NX"], true),
        (vec!["SET", "{k}", "v"], vec!["PEXPIRE", "{k}", "5000000"], true),
        (vec!["SET", "{k}", "v"], vec!["EXPIREAT", "{k}", &far_s], true),
        (vec!["SET", "{k}", "v"], vec!["PEXPIREAT", "{k}", &far_ms], true),
        (vec!["SET", "{k}", "v"], vec!["EXPIRE", "{k}", "40"], false),
    ];
    for (i, (setup, write, above)) in cases.iter().enumerate() {
        for prefix in ["t:", "u:"] {
            let k = format!("{prefix}clamp:{i}");
            if !setup.is_empty() {
                rig.setup(&fill(setup, &k, "")).await;
            }
            rig.both(&fill(write, &k, "")).await;
            let ttl = rig.pttl(&k).await;
            let clamped = *above && prefix == "t:";
            if clamped {
                assert!(ttl > MAX_MS - 60_000 && ttl <= MAX_MS, "{write:?}: PTTL {ttl} should be clamped to max");
            } else {
                assert!(ttl > 0 && ttl != -1, "{write:?} on {k}: PTTL {ttl}");
                if *above {
                    assert!(ttl > MAX_MS, "{write:?} on an unruled key is not clamped: {ttl}");
                } else {
                    assert!(ttl <= 200_000, "{write:?}: the explicit TTL was kept: {ttl}");
                }
            }
        }
    }
    // Invalid explicit TTLs get Redis's own errors.
    rig.both(&["SET", "t:clamp:bad", "v", "EX", "-5"]).await;
    rig.both(&["SET", "t:clamp:bad", "v", "EX"]).await;
    rig.both(&["SETEX", "t:clamp:bad", "0", "v"]).await;
    rig.both(&["EXPIRE", "t:clamp:bad", "x"]).await;
    // Past i64::MAX milliseconds from now: Redis refuses them, so they are never clamped.
    for write in [
        &["SET", "t:clamp:huge", "v", "PX", "9223372036854775807"][..],
        &["SET", "t:clamp:huge", "v", "EX", "9223372036854775"],
        &["PSETEX", "t:clamp:huge", "9223372036854775807", "v"],
        &["GETEX", "t:clamp:1", "PX", "9223372036854775000"],
    ] {
        let reply = rig.both(write).await;
        assert!(reply.starts_with(b"-ERR invalid expire time"), "{write:?}: {reply:?}");
    }
    assert_eq!(rig.pttl("t:clamp:huge").await, -2, "nothing was created");
    rig.setup(&["SET", "t:clamp:huge", "v"]).await;
    for write in
        [&["PEXPIRE", "t:clamp:huge", "9223372036854775807"][..], &["EXPIRE", "t:clamp:huge", "9223372036854775"]]
    {
        let reply = rig.both(write).await;
        assert!(reply.starts_with(b"-ERR invalid expire time"), "{write:?}: {reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mset_mixing_ruled_and_unruled_keys_gives_only_the_ruled_ones_a_ttl() {
    let mut rig = Rig::start().await;
    rig.both(&["MSET", "t:mix:1", "a", "u:mix:2", "b", "t:mix:3", "c", "other", "d"]).await;
    for k in ["t:mix:1", "t:mix:3"] {
        let ttl = rig.pttl(k).await;
        assert!(ttl > 0 && ttl <= DEFAULT_MS, "{k}: {ttl}");
    }
    for k in ["u:mix:2", "other"] {
        assert_eq!(rig.pttl(k).await, -1, "{k}");
    }
    assert_eq!(
        rig.both(&["MGET", "t:mix:1", "u:mix:2", "t:mix:3"]).await,
        b("*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n")
    );
}

async fn transaction(rig: &mut Rig, tag: &str) {
    let k = |n: &str| format!("{n}:{tag}");
    let (m1, m2, m3, m4, m5, m6) = (k("t:tx:1"), k("t:tx:2"), k("u:tx:3"), k("t:tx:4"), k("t:tx:5"), k("t:tx:6"));
    rig.setup(&["SET", &m5, "old"]).await;
    rig.both(&["MULTI"]).await;
    rig.both(&["HSET", &m1, "f", "v"]).await;
    rig.both(&["SET", &m2, "v"]).await;
    rig.both(&["GET", &m2]).await;
    rig.both(&["INCR", &m3]).await;
    rig.both(&["SADD", &m4, "a", "b"]).await;
    rig.both(&["SET", &m5, "new", "KEEPTTL", "GET"]).await;
    rig.both(&["ZINCRBY", &m6, "1.5", "a"]).await;
    let exec = rig.both(&["EXEC"]).await;
    assert!(exec.starts_with(b"*7\r\n"), "the EXEC array has the client's 7 elements only: {exec:?}");
    for key in [&m1, &m2, &m4, &m5, &m6] {
        let ttl = rig.pttl(key).await;
        assert!(ttl > 0 && ttl <= DEFAULT_MS, "{key} in MULTI: {ttl}");
    }
    assert_eq!(rig.pttl(&m3).await, -1);

    // A command refused while queuing aborts the transaction, exactly as Redis does.
    rig.both(&["MULTI"]).await;
    rig.both(&["HSET", &k("t:tx:7"), "f", "v"]).await;
    rig.both(&["HSET", &k("t:tx:8")]).await;
    rig.both(&["EXEC"]).await;
    assert_eq!(rig.pttl(&k("t:tx:7")).await, -2, "nothing ran");

    // DISCARD forgets sidecache's queued commands too; the next transaction is exact.
    rig.both(&["MULTI"]).await;
    rig.both(&["SADD", &k("t:tx:9"), "a"]).await;
    rig.both(&["DISCARD"]).await;
    rig.both(&["MULTI"]).await;
    rig.both(&["SADD", &k("t:tx:10"), "a"]).await;
    rig.both(&["LPUSH", &k("t:tx:10:l"), "a"]).await;
    rig.both(&["EXEC"]).await;

    // A WATCHed key changed by someone else: EXEC answers null on both.
    let w = k("t:tx:w");
    rig.both(&["WATCH", &w]).await;
    rig.setup(&["SET", &w, "x"]).await;
    rig.both(&["MULTI"]).await;
    rig.both(&["HSET", &k("t:tx:11"), "f", "v"]).await;
    rig.both(&["EXEC"]).await;
    assert_eq!(rig.pttl(&k("t:tx:11")).await, -2);

    // Runtime errors stay in place in the EXEC array.
    rig.setup(&["SET", &k("t:tx:str"), "x"]).await;
    rig.both(&["MULTI"]).await;
    rig.both(&["SADD", &k("t:tx:str"), "a"]).await;
    rig.both(&["HSET", &k("t:tx:12"), "f", "v"]).await;
    rig.both(&["EXEC"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_multi_the_exec_reply_has_exactly_the_clients_elements() {
    let mut rig = Rig::start().await;
    transaction(&mut rig, "r2").await;
    rig.resp3().await;
    transaction(&mut rig, "r3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_keep_order_and_exact_replies() {
    let mut rig = Rig::start().await;
    rig.setup(&["SET", "t:pipe:str", "x"]).await;
    let mut cmds: Vec<Vec<String>> = Vec::new();
    for i in 0..40 {
        let s = |a: &str| a.to_string();
        cmds.push(vec![s("SET"), format!("t:pipe:{i}"), s("v")]);
        cmds.push(vec![s("HSET"), format!("t:pipe:h{i}"), s("f"), i.to_string()]);
        cmds.push(vec![s("INCR"), format!("u:pipe:{i}")]);
        cmds.push(vec![s("GET"), format!("t:pipe:{i}")]);
        cmds.push(vec![s("SADD"), s("t:pipe:str"), s("a")]);
        cmds.push(vec![s("HSET"), format!("t:pipe:bad{i}")]);
        cmds.push(vec![s("INCRBYFLOAT"), format!("t:pipe:f{i}"), s("1.5")]);
    }
    let mut wire = Vec::new();
    for c in &cmds {
        let args: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
        wire.extend(encode(&args));
    }
    rig.proxied.send_raw(&wire).await;
    rig.plain.send_raw(&wire).await;
    for c in &cmds {
        let got = rig.proxied.read().await;
        let want = rig.plain.read().await;
        assert_eq!(got, want, "{c:?}");
    }
    for i in [0, 17, 39] {
        for key in [format!("t:pipe:{i}"), format!("t:pipe:h{i}"), format!("t:pipe:f{i}")] {
            let ttl = rig.pttl(&key).await;
            assert!(ttl > 0 && ttl <= DEFAULT_MS, "{key}: {ttl}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_guarded_writes_are_redis_own() {
    let mut rig = Rig::start().await;
    rig.setup(&["SET", "t:err:str", "x"]).await;
    rig.both(&["HSET", "t:err:1"]).await;
    rig.both(&["SADD", "t:err:str", "a"]).await;
    rig.both(&["INCR", "t:err:str"]).await;
    rig.both(&["RENAME", "t:err:none", "t:err:2"]).await;
    rig.both(&["ZADD", "t:err:3", "notanumber", "a"]).await;
    rig.both(&["XADD", "t:err:4", "0-0", "f", "v"]).await;
    rig.both(&["NOSUCHCOMMAND", "t:err:5"]).await;
    for k in ["t:err:1", "t:err:2", "t:err:3", "t:err:4"] {
        assert_eq!(rig.pttl(k).await, -2, "{k}: a refused write creates nothing");
    }
    // The TTL follows the command in the same transaction, so an existing ruled key without a
    // TTL gets one even when the write itself failed (documented in the README).
    let ttl = rig.pttl("t:err:str").await;
    assert!(ttl > 0 && ttl <= DEFAULT_MS, "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watching_client_gets_ttls_without_losing_its_watch() {
    let mut rig = Rig::start().await;
    rig.both(&["WATCH", "t:watch:w"]).await;
    rig.both(&["HSET", "t:watch:1", "f", "v"]).await;
    rig.both(&["SET", "t:watch:2", "v"]).await;
    let ttl = settled_ttl(&mut rig.direct, "t:watch:1").await;
    assert!(ttl > 0 && ttl <= DEFAULT_MS, "the HSET on the dedicated connection got its TTL: {ttl}");
    let ttl = rig.pttl("t:watch:2").await;
    assert!(ttl > 0 && ttl <= DEFAULT_MS);
    // The WATCH still holds: a change by someone else aborts the transaction on both.
    rig.setup(&["SET", "t:watch:w", "x"]).await;
    rig.both(&["MULTI"]).await;
    rig.both(&["SET", "t:watch:3", "v"]).await;
    assert_eq!(rig.both(&["EXEC"]).await, b("*-1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracking_clients_invalidation_push_passes_the_policys_own_reply_and_replies_stay_in_order() {
    // A RESP3 client with client-side caching: its write to a key it read comes back as the
    // write's reply and then an invalidation push, which Redis sends between that reply and
    // the reply to the policy's own expiry command on the dedicated connection.
    let mut rig = Rig::start().await;
    rig.resp3().await;
    rig.setup(&["SET", "t:tracked", "o"]).await;
    rig.both(&["CLIENT", "TRACKING", "ON"]).await;
    assert_eq!(rig.both(&["GET", "t:tracked"]).await, b("$1\r\no\r\n"));
    assert_eq!(rig.both(&["APPEND", "t:tracked", "v"]).await, b(":2\r\n"));
    let push = b(">2\r\n$10\r\ninvalidate\r\n*1\r\n$9\r\nt:tracked\r\n");
    assert_eq!(rig.proxied.read().await, push, "the invalidation push, through sidecache");
    assert_eq!(rig.plain.read().await, push, "the invalidation push, from Redis");
    assert_eq!(rig.both(&["PING"]).await, b("+PONG\r\n"));
    assert_eq!(rig.both(&["GET", "t:tracked"]).await, b("$2\r\nov\r\n"));
    assert_eq!(rig.both(&["ECHO", "hi"]).await, b("$2\r\nhi\r\n"));
    let ttl = rig.pttl("t:tracked").await;
    assert!(ttl > 0 && ttl <= DEFAULT_MS, "the write got the rule's TTL: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_and_skip_hide_exactly_what_redis_hides() {
    let mut rig = Rig::start().await;
    for c in [&mut rig.proxied, &mut rig.plain] {
        c.send(&[b"CLIENT", b"REPLY", b"SKIP"]).await;
        c.send(&[b"HSET", b"t:reply:1", b"f", b"v"]).await;
        c.send(&[b"CLIENT", b"REPLY", b"OFF"]).await;
        c.send(&[b"SADD", b"t:reply:2", b"a"]).await;
        c.send(&[b"SET", b"t:reply:3", b"v", b"KEEPTTL"]).await;
    }
    // The first reply after turning replies back on is that command's own.
    assert_eq!(rig.both(&["CLIENT", "REPLY", "ON"]).await, b("+OK\r\n"));
    assert_eq!(rig.both(&["HGET", "t:reply:1", "f"]).await, b("$1\r\nv\r\n"));
    for k in ["t:reply:1", "t:reply:2", "t:reply:3"] {
        let ttl = settled_ttl(&mut rig.direct, k).await;
        assert!(ttl > 0 && ttl <= DEFAULT_MS, "{k}: {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_restricted_to_a_database_apply_only_there() {
    let mut rig = Rig::start().await;
    rig.select("2").await;
    rig.both(&["SET", "d2:x", "v"]).await;
    rig.both(&["HSET", "d2:h", "f", "v"]).await;
    for k in ["d2:x", "d2:h"] {
        let ttl = rig.pttl(k).await;
        assert!(ttl > 0 && ttl <= 50_000, "{k} in db 2: {ttl}");
    }
    rig.select("1").await;
    rig.both(&["SET", "d2:x", "v"]).await;
    rig.both(&["HSET", "d2:h", "f", "v"]).await;
    assert_eq!(rig.pttl("d2:x").await, -1, "the db 2 rule does not apply in db 1");
    assert_eq!(rig.pttl("d2:h").await, -1);
    // The unrestricted rule applies in every database.
    rig.both(&["SET", "t:db1", "v"]).await;
    assert!(rig.pttl("t:db1").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_select_queued_in_multi_moves_the_rules_to_that_database() {
    let mut rig = Rig::start().await;
    // Commands queued after SELECT 2 run in db 2 at EXEC: they get db 2's rules.
    rig.both(&["MULTI"]).await;
    rig.both(&["SET", "d2:before", "v"]).await;
    rig.both(&["SELECT", "2"]).await;
    rig.both(&["SET", "d2:in", "v"]).await;
    rig.both(&["HSET", "d2:h", "f", "v"]).await;
    let exec = rig.both(&["EXEC"]).await;
    assert_eq!(exec, b("*4\r\n+OK\r\n+OK\r\n+OK\r\n:1\r\n"), "EXEC has exactly the client's elements");
    assert_eq!(rig.pttl_in("0", "d2:before").await, -1, "queued before the SELECT: db 0, no rule");
    assert_db2_rule(&rig, "d2:in", "queued after SELECT 2").await;
    assert_db2_rule(&rig, "d2:h", "queued after SELECT 2").await;
    // After EXEC the connection stays in db 2, and so do the rules.
    rig.both(&["SET", "d2:after", "v"]).await;
    assert_db2_rule(&rig, "d2:after", "after EXEC").await;
    // A queued SELECT that fails at EXEC, or one discarded, changes nothing: still db 2.
    for (select, end, key) in [("99", "EXEC", "d2:still"), ("0", "DISCARD", "d2:kept")] {
        rig.both(&["MULTI"]).await;
        rig.both(&["SELECT", select]).await;
        rig.both(&[end]).await;
        rig.both(&["SET", key, "v"]).await;
        assert_db2_rule(&rig, key, &format!("after SELECT {select} and {end}")).await;
    }
    // A SELECT that took effect in a transaction moves the session back out of db 2.
    rig.both(&["MULTI"]).await;
    rig.both(&["SELECT", "0"]).await;
    rig.both(&["EXEC"]).await;
    rig.both(&["SET", "d2:back", "v"]).await;
    assert_eq!(rig.pttl_in("0", "d2:back").await, -1, "back in db 0, where the db 2 rule does not apply");
}

/// The key is in db 2 with the TTL of the db-2-only rule `d2:` (50 s).
async fn assert_db2_rule(rig: &Rig, key: &str, when: &str) {
    let ttl = rig.pttl_in("2", key).await;
    assert!(ttl > 0 && ttl <= 50_000, "{key} ({when}) should be in db 2 with its rule: PTTL {ttl}");
}

/// A default TTL, as the `t:` rule gives it.
fn is_default(ttl: i64) -> bool {
    ttl > 0 && ttl <= DEFAULT_MS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_another_database_gives_the_destination_the_rule_of_that_database() {
    let mut rig = Rig::start().await;
    rig.setup(&["SET", "src:cdb", "v"]).await;
    assert_eq!(rig.both(&["COPY", "src:cdb", "t:cdb:new", "DB", "2"]).await, b(":1\r\n"));
    let ttl = rig.pttl_in("2", "t:cdb:new").await;
    assert!(is_default(ttl), "the copy in db 2 got the default: {ttl}");
    assert_eq!(rig.pttl_in("0", "t:cdb:new").await, -2, "nothing was written in the session's database");
    assert_eq!(rig.pttl("src:cdb").await, -1, "the unruled source is untouched");
    // The rule is the destination database's: the db 2 rule applies to a copy into db 2 made
    // from db 0, and not to a copy into db 1.
    rig.both(&["COPY", "src:cdb", "d2:cdb", "DB", "2"]).await;
    let ttl = rig.pttl_in("2", "d2:cdb").await;
    assert!(ttl > 0 && ttl <= 50_000, "d2:cdb in db 2 got the db 2 rule's default: {ttl}");
    rig.both(&["COPY", "src:cdb", "d2:cdb", "DB", "1"]).await;
    assert_eq!(rig.pttl_in("1", "d2:cdb").await, -1, "the db 2 rule does not apply in db 1");
    rig.both(&["COPY", "src:cdb", "u:cdb", "REPLACE", "DB", "2"]).await;
    assert_eq!(rig.pttl_in("2", "u:cdb").await, -1, "an unruled destination gets no TTL");
    // From db 2: its rule does not follow the session into db 1; db 0 gets db 0's rule.
    rig.select("2").await;
    rig.setup(&["SET", "src:cdb2", "v"]).await;
    rig.both(&["COPY", "src:cdb2", "d2:from2", "DB", "1"]).await;
    assert_eq!(rig.pttl_in("1", "d2:from2").await, -1, "the session's db 2 rule is not the destination's");
    rig.both(&["COPY", "src:cdb2", "t:from2", "DB", "0"]).await;
    assert!(is_default(rig.pttl_in("0", "t:from2").await));
    // DB naming the session's own database.
    rig.both(&["COPY", "src:cdb2", "d2:same", "DB", "2"]).await;
    let ttl = rig.pttl_in("2", "d2:same").await;
    assert!(ttl > 0 && ttl <= 50_000, "{ttl}");
    // The last DB option wins, as in Redis.
    rig.both(&["COPY", "src:cdb2", "t:last", "DB", "2", "DB", "3"]).await;
    assert_eq!(rig.pttls_in("2", "t:last").await, (-2, -2));
    assert!(is_default(rig.pttl_in("3", "t:last").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_another_database_keeps_every_existing_ttl() {
    let mut rig = Rig::start().await;
    // A source with a TTL: the copy has that TTL, in Redis and through sidecache.
    rig.setup(&["SET", "src:ttl", "v", "PX", "500000"]).await;
    assert_eq!(rig.both(&["COPY", "src:ttl", "t:ttl:c", "DB", "2"]).await, b(":1\r\n"));
    let (ttl, redis_ttl) = rig.pttls_in("2", "t:ttl:c").await;
    assert!(redis_ttl > 400_000, "Redis copies the TTL: {redis_ttl}");
    assert!(ttl > 400_000 && ttl <= 500_000, "the copied TTL stays: {ttl}");
    // A copied TTL above max is not clamped, in another database as in the same one: only
    // explicit TTLs in the client's command are.
    rig.setup(&["SET", "src:long", "v", "PX", "5000000"]).await;
    rig.both(&["COPY", "src:long", "t:long:same"]).await;
    rig.both(&["COPY", "src:long", "t:long:other", "DB", "2"]).await;
    assert!(rig.pttl_in("0", "t:long:same").await > 4_000_000);
    assert!(rig.pttl_in("2", "t:long:other").await > 4_000_000);

    rig.setup(&["SET", "src:plain", "v"]).await;
    // REPLACE of a destination with a TTL by a source without: Redis drops the TTL, the default applies.
    rig.setup_in("2", &["SET", "t:rep:1", "old", "PX", "500000"]).await;
    assert_eq!(rig.both(&["COPY", "src:plain", "t:rep:1", "DB", "2", "REPLACE"]).await, b(":1\r\n"));
    let (ttl, redis_ttl) = rig.pttls_in("2", "t:rep:1").await;
    assert_eq!(redis_ttl, -1);
    assert!(is_default(ttl), "{ttl}");
    // REPLACE by a source with a TTL: the source's TTL.
    rig.setup_in("2", &["SET", "t:rep:2", "old"]).await;
    rig.both(&["COPY", "src:ttl", "t:rep:2", "REPLACE", "DB", "2"]).await;
    let ttl = rig.pttl_in("2", "t:rep:2").await;
    assert!(ttl > 400_000 && ttl <= 500_000, "{ttl}");

    // COPY answering 0 (the destination exists): its TTL stays; one without a TTL gets the
    // default, as after a same-database COPY answering 0 and every other write.
    rig.setup_in("2", &["SET", "t:zero:1", "old", "PX", "500000"]).await;
    assert_eq!(rig.both(&["COPY", "src:plain", "t:zero:1", "DB", "2"]).await, b(":0\r\n"));
    let ttl = rig.pttl_in("2", "t:zero:1").await;
    assert!(ttl > 400_000 && ttl <= 500_000, "not shortened: {ttl}");
    rig.setup_in("2", &["SET", "t:zero:2", "old"]).await;
    assert_eq!(rig.both(&["COPY", "src:plain", "t:zero:2", "DB", "2"]).await, b(":0\r\n"));
    assert!(is_default(rig.pttl_in("2", "t:zero:2").await));
    rig.setup(&["SET", "t:zero:3", "old"]).await;
    assert_eq!(rig.both(&["COPY", "src:plain", "t:zero:3"]).await, b(":0\r\n"));
    assert!(is_default(rig.pttl_in("0", "t:zero:3").await), "same database: the same rule");
    assert_eq!(rig.both(&["COPY", "src:none", "t:zero:4", "DB", "2"]).await, b(":0\r\n"));
    assert_eq!(rig.pttl_in("2", "t:zero:4").await, -2, "no source, nothing created");
    rig.select("2").await;
    assert_eq!(rig.both(&["GET", "t:zero:1"]).await, b("$3\r\nold\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_to_another_database_gives_a_key_without_a_ttl_the_rule_of_that_database() {
    let mut rig = Rig::start().await;
    rig.setup(&["SET", "t:mv:1", "v"]).await;
    assert_eq!(rig.both(&["MOVE", "t:mv:1", "2"]).await, b(":1\r\n"));
    assert!(is_default(rig.pttl_in("2", "t:mv:1").await));
    assert_eq!(rig.pttl_in("0", "t:mv:1").await, -2);
    rig.setup(&["SET", "t:mv:2", "v", "PX", "500000"]).await;
    rig.both(&["MOVE", "t:mv:2", "2"]).await;
    let ttl = rig.pttl_in("2", "t:mv:2").await;
    assert!(ttl > 400_000 && ttl <= 500_000, "MOVE keeps the TTL: {ttl}");
    rig.setup(&["SET", "d2:mv", "v"]).await;
    rig.both(&["MOVE", "d2:mv", "2"]).await;
    let ttl = rig.pttl_in("2", "d2:mv").await;
    assert!(ttl > 0 && ttl <= 50_000, "the db 2 rule: {ttl}");
    rig.setup(&["SET", "d2:mv1", "v"]).await;
    rig.both(&["MOVE", "d2:mv1", "1"]).await;
    assert_eq!(rig.pttl_in("1", "d2:mv1").await, -1, "the db 2 rule does not apply in db 1");
    // MOVE answering 0: the key in the target database keeps its TTL; the source stays as it was.
    rig.setup(&["SET", "t:mv:3", "v"]).await;
    rig.setup_in("2", &["SET", "t:mv:3", "there", "PX", "500000"]).await;
    assert_eq!(rig.both(&["MOVE", "t:mv:3", "2"]).await, b(":0\r\n"));
    let ttl = rig.pttl_in("2", "t:mv:3").await;
    assert!(ttl > 400_000 && ttl <= 500_000, "{ttl}");
    assert_eq!(rig.pttl_in("0", "t:mv:3").await, -1, "the source is not the policy's to change");
    // Errors are Redis's own. A database that does not exist touches nothing.
    rig.both(&["MOVE", "t:mv:3", "99"]).await;
    rig.both(&["MOVE", "t:mv:3", "x"]).await;
    assert_eq!(rig.pttl_in("0", "t:mv:3").await, -1);
    // MOVE into the key's own database fails at run time and the key stays where it was without
    // a TTL: like every write that fails at run time, it gets the default (see the README).
    rig.both(&["MOVE", "t:mv:3", "0"]).await;
    assert!(is_default(rig.pttl_in("0", "t:mv:3").await));
}

/// An out-of-range database fails the write and touches nothing, also not the key of the same
/// name in the session's database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_a_database_that_does_not_exist_is_redis_error_and_changes_nothing() {
    let mut rig = Rig::start().await;
    rig.setup(&["SET", "src:bad", "v"]).await;
    rig.setup(&["SET", "t:bad", "here"]).await;
    for db in ["99", "-1", "2147483648", "x"] {
        rig.both(&["COPY", "src:bad", "t:bad", "DB", db]).await;
    }
    rig.both(&["COPY", "src:bad", "t:bad", "DB"]).await;
    rig.both(&["COPY", "src:bad", "t:bad", "DB", "2", "NOPE"]).await;
    assert_eq!(rig.pttl_in("0", "t:bad").await, -1);
    assert_eq!(rig.pttl_in("2", "t:bad").await, -2);
}

async fn cross_db_transaction(rig: &mut Rig, tag: &str) {
    let k = |n: &str| format!("{n}:{tag}");
    let (src, here, mv) = (k("src:mx"), k("t:mx:here"), k("t:mx:mv"));
    rig.setup(&["SET", &src, "v"]).await;
    rig.setup(&["SET", &here, "v"]).await;
    rig.setup(&["SET", &mv, "v"]).await;
    rig.both(&["MULTI"]).await;
    rig.both(&["COPY", &src, &k("t:mx:1"), "DB", "2"]).await;
    rig.both(&["SET", &k("t:mx:2"), "v"]).await;
    rig.both(&["COPY", &src, &k("d2:mx"), "DB", "2", "REPLACE"]).await;
    rig.both(&["COPY", &src, &here, "DB", "99"]).await;
    rig.both(&["MOVE", &mv, "2"]).await;
    rig.both(&["COPY", &src, &k("t:mx:1"), "DB", "2"]).await;
    rig.both(&["GET", &k("t:mx:1")]).await;
    let exec = rig.both(&["EXEC"]).await;
    assert!(exec.starts_with(b"*7\r\n"), "the EXEC array has the client's 7 elements only: {exec:?}");
    for key in [k("t:mx:1"), mv.clone()] {
        assert!(is_default(rig.pttl_in("2", &key).await), "{key} in db 2");
    }
    let ttl = rig.pttl_in("2", &k("d2:mx")).await;
    assert!(ttl > 0 && ttl <= 50_000, "{ttl}");
    assert_eq!(rig.pttl_in("0", &here).await, -1, "the failed COPY … DB 99 touched nothing in db 0");

    // A command refused while queuing aborts everything, sidecache's commands too.
    rig.both(&["MULTI"]).await;
    rig.both(&["COPY", &src, &k("t:mx:3"), "DB", "2"]).await;
    rig.both(&["COPY", &src]).await;
    rig.both(&["EXEC"]).await;
    assert_eq!(rig.pttl_in("2", &k("t:mx:3")).await, -2, "nothing ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_move_to_another_database_inside_multi_reply_exactly_as_redis() {
    let mut rig = Rig::start().await;
    cross_db_transaction(&mut rig, "r2").await;
    rig.resp3().await;
    cross_db_transaction(&mut rig, "r3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_move_to_another_database_in_a_pipeline_keep_order_and_exact_replies() {
    let mut rig = Rig::start().await;
    let mut cmds: Vec<Vec<String>> = Vec::new();
    let s = |a: &str| a.to_string();
    for i in 0..30 {
        cmds.push(vec![s("SET"), format!("u:pc:{i}"), s("v")]);
        cmds.push(vec![s("COPY"), format!("u:pc:{i}"), format!("t:pc:{i}"), s("DB"), s("2")]);
        cmds.push(vec![s("COPY"), format!("u:pc:{i}"), format!("t:pc:{i}"), s("DB"), s("2")]);
        cmds.push(vec![s("COPY"), format!("u:pc:{i}"), format!("t:pc:{i}"), s("DB"), s("99")]);
        cmds.push(vec![s("COPY"), format!("u:pc:{i}"), format!("t:pc:{i}")]);
        cmds.push(vec![s("MOVE"), format!("u:pc:{i}"), s("3")]);
        cmds.push(vec![s("GET"), format!("u:pc:{i}")]);
    }
    let mut wire = Vec::new();
    for c in &cmds {
        let args: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
        wire.extend(encode(&args));
    }
    rig.proxied.send_raw(&wire).await;
    rig.plain.send_raw(&wire).await;
    for c in &cmds {
        let got = rig.proxied.read().await;
        let want = rig.plain.read().await;
        assert_eq!(got, want, "{c:?}");
    }
    for i in [0, 13, 29] {
        let key = format!("t:pc:{i}");
        assert!(is_default(rig.pttl_in("2", &key).await), "{key} in db 2");
        assert!(is_default(rig.pttl_in("0", &key).await), "{key} in db 0");
        assert_eq!(rig.pttl_in("3", &format!("u:pc:{i}")).await, -1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watching_client_gets_ttls_in_another_database_without_losing_its_watch() {
    let mut rig = Rig::start().await;
    rig.setup(&["SET", "src:wc", "v"]).await;
    rig.setup(&["SET", "t:wc:mv", "v"]).await;
    rig.both(&["WATCH", "t:wc:w"]).await;
    rig.both(&["COPY", "src:wc", "t:wc:c", "DB", "2"]).await;
    rig.both(&["MOVE", "t:wc:mv", "3"]).await;
    let mut db2 = Client::connect(&rig.redis.addr()).await;
    db2.cmd(&["SELECT", "2"]).await;
    assert!(is_default(settled_ttl(&mut db2, "t:wc:c").await));
    db2.cmd(&["SELECT", "3"]).await;
    assert!(is_default(settled_ttl(&mut db2, "t:wc:mv").await));
    rig.setup(&["SET", "t:wc:w", "x"]).await;
    rig.both(&["MULTI"]).await;
    rig.both(&["COPY", "src:wc", "t:wc:c2", "DB", "2"]).await;
    assert_eq!(rig.both(&["EXEC"]).await, b("*-1\r\n"));
    assert_eq!(rig.pttl_in("2", "t:wc:c2").await, -2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_racing_a_reload_sees_the_old_rules_or_the_new_never_a_mix() {
    let redis = RedisServer::start();
    let with = |default_s: u64| {
        let mut c = test_config(&redis.url());
        c.ttl.rules = vec![
            rule("ra:", None, Duration::from_secs(default_s), None),
            rule("rb:", None, Duration::from_secs(default_s), None),
        ];
        c
    };
    let (old, new) = (with(100), with(300));
    let proxy = Proxy::start_config(old.clone()).await;
    let reload = proxy.reload.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut flips = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                reload.apply(if flips.is_multiple_of(2) { &new } else { &old });
                flips += 1;
                tokio::task::yield_now().await;
            }
            flips
        })
    };
    let mut c = proxy.client().await;
    let n = 300;
    for i in 0..n {
        let (a, bk) = (format!("ra:{i}"), format!("rb:{i}"));
        assert_eq!(c.cmd(&["MSET", &a, "1", &bk, "2"]).await, b("+OK\r\n"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.await.unwrap();
    assert!(flips > 1, "the rules were swapped while writing");
    let mut direct = Client::connect(&redis.addr()).await;
    let (mut olds, mut news) = (0, 0);
    for i in 0..n {
        let ta = pttl(&mut direct, &format!("ra:{i}")).await;
        let tb = pttl(&mut direct, &format!("rb:{i}")).await;
        let version = |t: i64| match t {
            1..=100_000 => 1,
            200_001..=300_000 => 2,
            other => panic!("key {i} has PTTL {other}: neither rule set"),
        };
        assert_eq!(version(ta), version(tb), "one MSET saw one set of rules: {ta} vs {tb}");
        if version(ta) == 1 { olds += 1 } else { news += 1 }
    }
    assert_eq!(olds + news, n);
}

// --- The binary: metrics, audit mode, reload by SIGHUP and by file change, check-config. ---

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("series {series} not in metrics:\n{text}"))
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sidecache-ttl-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn session_rule(mode: &str, default: &str) -> String {
    format!(
        "[ttl]\nmode = \"{mode}\"\n[[ttl.rules]]\nname = \"session\"\nprefix = \"session:\"\ndefault = \"{default}\"\n"
    )
}

const SCRIPT: &str = "redis.call('SET', KEYS[1], 'v') return 1";

async fn writes_and_metrics(mode: &str) -> (RedisServer, ProxyProcess, Client) {
    let redis = RedisServer::start();
    let dir = temp_dir(mode);
    let file = dir.join("c.toml");
    std::fs::write(&file, session_rule(mode, "100s")).unwrap();
    let proc = ProxyProcess::start(&redis.url(), &["--config", file.to_str().unwrap()]).await;
    let mut c = Client::connect(&proc.addr.to_string()).await;
    assert_eq!(c.cmd(&["SET", "session:1", "v"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["HSET", "session:2", "f", "v"]).await, b(":1\r\n"));
    assert_eq!(c.cmd(&["SET", "nameless", "v"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["EVAL", SCRIPT, "1", "session:3"]).await, b(":1\r\n"));
    assert_eq!(c.cmd(&["EVAL", SCRIPT, "1", "nameless:2"]).await, b(":1\r\n"));
    assert_eq!(c.cmd(&["SELECT", "3"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["MSET", "a", "1", "b", "2"]).await, b("+OK\r\n"));
    (redis, proc, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_counts_applied_rules_missing_keys_and_scripts_it_cannot_reach() {
    let (redis, proc, _c) = writes_and_metrics("enforce").await;
    let mut direct = Client::connect(&redis.addr()).await;
    for k in ["session:1", "session:2"] {
        let ttl = pttl(&mut direct, k).await;
        assert!(ttl > 0 && ttl <= 100_000, "{k}: {ttl}");
    }
    assert_eq!(pttl(&mut direct, "session:3").await, -1, "scripts are not rewritten");
    assert_eq!(pttl(&mut direct, "nameless").await, -1);
    let (status, text) = http_get(proc.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "sidecache_ttl_applied_total{rule=\"session\"}"), 2.0);
    assert_eq!(metric(&text, "sidecache_ttl_missing_total{db=\"0\"}"), 2.0, "SET nameless and the script's key");
    assert_eq!(metric(&text, "sidecache_ttl_missing_total{db=\"3\"}"), 2.0, "both keys of the MSET in db 3");
    assert_eq!(metric(&text, "sidecache_ttl_unenforced_total{reason=\"script\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_changes_nothing_and_counts_both() {
    let (redis, proc, _c) = writes_and_metrics("audit").await;
    let mut direct = Client::connect(&redis.addr()).await;
    for k in ["session:1", "session:2", "session:3", "nameless"] {
        assert_eq!(pttl(&mut direct, k).await, -1, "audit changed {k}");
    }
    let (_, text) = http_get(proc.admin, "/metrics").await;
    assert_eq!(metric(&text, "sidecache_ttl_applied_total{rule=\"session\"}"), 2.0);
    assert_eq!(metric(&text, "sidecache_ttl_missing_total{db=\"0\"}"), 2.0);
    assert_eq!(metric(&text, "sidecache_ttl_missing_total{db=\"3\"}"), 2.0);
    assert_eq!(metric(&text, "sidecache_ttl_unenforced_total{reason=\"script\"}"), 1.0);
}

/// `COPY … DB n` and `MOVE` into ruled keys of database n count as applied in both modes and
/// change nothing in `audit`; a database number Redis refuses creates no `missing` series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_another_database_are_counted_in_enforce_and_audit_and_changed_only_in_enforce() {
    for mode in ["enforce", "audit"] {
        let redis = RedisServer::start();
        let dir = temp_dir(&format!("cdb-{mode}"));
        let file = dir.join("c.toml");
        let config = format!(
            "{}[[ttl.rules]]\nname = \"d1\"\nprefix = \"d1:\"\ndb = 1\ndefault = \"50s\"\n",
            session_rule(mode, "100s")
        );
        std::fs::write(&file, config).unwrap();
        let proc = ProxyProcess::start(&redis.url(), &["--config", file.to_str().unwrap()]).await;
        let mut c = Client::connect(&proc.addr.to_string()).await;
        let mut direct = Client::connect(&redis.addr()).await;
        for k in ["src", "d1:m"] {
            assert_eq!(direct.cmd(&["SET", k, "v"]).await, b("+OK\r\n"));
        }
        assert_eq!(c.cmd(&["COPY", "src", "session:c", "DB", "1"]).await, b(":1\r\n"));
        assert_eq!(c.cmd(&["COPY", "src", "d1:c", "DB", "1"]).await, b(":1\r\n"));
        assert_eq!(c.cmd(&["COPY", "src", "d1:c", "DB", "2"]).await, b(":1\r\n"));
        assert_eq!(c.cmd(&["MOVE", "d1:m", "1"]).await, b(":1\r\n"));
        assert_eq!(c.cmd(&["COPY", "src", "x", "DB", "40"]).await, b("-ERR DB index is out of range\r\n"));
        assert_eq!(direct.cmd(&["SELECT", "1"]).await, b("+OK\r\n"));
        for (k, max) in [("session:c", 100_000), ("d1:c", 50_000), ("d1:m", 50_000)] {
            let ttl = pttl(&mut direct, k).await;
            match mode {
                "enforce" => assert!(ttl > 0 && ttl <= max, "{k} in db 1: {ttl}"),
                _ => assert_eq!(ttl, -1, "audit changed {k}"),
            }
        }
        assert_eq!(direct.cmd(&["SELECT", "2"]).await, b("+OK\r\n"));
        assert_eq!(pttl(&mut direct, "d1:c").await, -1, "{mode}: the db 1 rule does not apply in db 2");
        let (_, text) = http_get(proc.admin, "/metrics").await;
        assert_eq!(metric(&text, "sidecache_ttl_applied_total{rule=\"session\"}"), 1.0, "{mode}");
        assert_eq!(metric(&text, "sidecache_ttl_applied_total{rule=\"d1\"}"), 2.0, "{mode}");
        assert_eq!(metric(&text, "sidecache_ttl_missing_total{db=\"2\"}"), 1.0, "{mode}: d1:c in db 2");
        assert_eq!(metric(&text, "sidecache_ttl_missing_total{db=\"0\"}"), 0.0, "{mode}");
        assert!(!text.contains("db=\"40\""), "{mode}: a database Redis refuses makes no series");
        assert!(!text.contains("other_db"), "{mode}: writes into other databases are enforced");
    }
}

async fn wait_for_log(proc: &ProxyProcess, what: &'static str, trigger: &'static str, nth: usize) {
    let log = proc.log.clone();
    eventually(what, || {
        let log = log.clone();
        async move {
            let log = log.lock().unwrap();
            log.lines().filter(|l| l.contains(what) && l.contains(trigger)).count() >= nth
        }
    })
    .await;
}

/// Writes `text` as a new file renamed over `file`, as editors and ConfigMap updates do.
fn replace_file(file: &std::path::Path, text: &str) {
    let tmp = file.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

async fn ttl_of_new_key(c: &mut Client, direct: &mut Client, key: &str) -> i64 {
    assert_eq!(c.cmd(&["SET", key, "v"]).await, b("+OK\r\n"));
    pttl(direct, key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_rules_without_dropping_clients_and_rejects_an_invalid_file() {
    let redis = RedisServer::start();
    let dir = temp_dir("hup");
    let file = dir.join("c.toml");
    std::fs::write(&file, session_rule("enforce", "100s")).unwrap();
    let proc = ProxyProcess::start(&redis.url(), &["--config", file.to_str().unwrap()]).await;
    let mut c = Client::connect(&proc.addr.to_string()).await;
    let mut direct = Client::connect(&redis.addr()).await;
    assert!(ttl_of_new_key(&mut c, &mut direct, "session:a").await <= 100_000);
    std::fs::write(&file, session_rule("enforce", "300s")).unwrap();
    proc.signal(libc::SIGHUP);
    wait_for_log(&proc, "Configuration reloaded", "SIGHUP", 1).await;
    assert!(ttl_of_new_key(&mut c, &mut direct, "session:b").await > 200_000, "the same connection sees new rules");
    // Overlapping rules: rejected, logged, and the running rules stay.
    let bad = format!("{}[[ttl.rules]]\nprefix = \"session:\"\ndefault = \"1s\"\n", session_rule("enforce", "5s"));
    std::fs::write(&file, bad).unwrap();
    proc.signal(libc::SIGHUP);
    wait_for_log(&proc, "New configuration rejected", "SIGHUP", 1).await;
    assert!(proc.log.lock().unwrap().contains("is also ttl.rules[0]"), "the log names the problem");
    assert!(ttl_of_new_key(&mut c, &mut direct, "session:c").await > 200_000, "old rules stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_reloads_the_rules_like_a_configmap_update() {
    let redis = RedisServer::start();
    let dir = temp_dir("watch");
    let file = dir.join("sidecache.toml");
    std::fs::write(&file, session_rule("enforce", "100s")).unwrap();
    let proc = ProxyProcess::start(&redis.url(), &["--config", file.to_str().unwrap()]).await;
    let mut c = Client::connect(&proc.addr.to_string()).await;
    let mut direct = Client::connect(&redis.addr()).await;
    assert!(ttl_of_new_key(&mut c, &mut direct, "session:a").await <= 100_000);
    replace_file(&file, &session_rule("enforce", "300s"));
    wait_for_log(&proc, "Configuration reloaded", "file", 1).await;
    assert!(ttl_of_new_key(&mut c, &mut direct, "session:b").await > 200_000);
    replace_file(&file, &session_rule("enforce", "not a duration"));
    wait_for_log(&proc, "New configuration rejected", "file", 1).await;
    assert!(ttl_of_new_key(&mut c, &mut direct, "session:c").await > 200_000, "old rules stay");
    replace_file(&file, &session_rule("off", "100s"));
    wait_for_log(&proc, "Configuration reloaded", "file", 2).await;
    assert_eq!(ttl_of_new_key(&mut c, &mut direct, "session:d").await, -1, "mode off");
}

#[test]
fn check_config_lists_every_ttl_problem_and_exits_64() {
    let dir = temp_dir("check");
    let bad = dir.join("bad.toml");
    let text = "[ttl]\n\
        [[ttl.rules]]\nprefix = \"a:\"\ndb = 1\ndefault = \"1h\"\n\
        [[ttl.rules]]\nprefix = \"a:\"\ndb = 1\ndefault = \"2h\"\nmax = \"1h\"\n\
        [[ttl.rules]]\nprefix = \"b:\"\ndefault = \"0s\"\n";
    std::fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(sidecache_bin())
        .args(["--config", bad.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for problem in
        ["ttl.rules[1]: prefix \"a:\" for db 1 is also ttl.rules[0]", "ttl.rules[1].max", "ttl.rules[2].default"]
    {
        assert!(err.contains(problem), "{problem} not reported: {err}");
    }
    let malformed = dir.join("malformed.toml");
    std::fs::write(&malformed, "[ttl]\nmode = \"sometimes\"\n[[ttl.rules]]\nprefix = \"a:\"\ndefault = \"10\"\n")
        .unwrap();
    let out = std::process::Command::new(sidecache_bin())
        .args(["--config", malformed.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// `config/examples/mis-v2.toml` loads and holds the seed strategy's TTL table and its
/// near-cache rules on `master:` and `permissions:`.
#[test]
fn the_mis_v2_example_is_a_valid_config_with_the_seed_ttl_table() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/mis-v2.toml");
    let c = Config::load(Some(&path), &[], &Default::default()).expect("the example is a valid configuration");
    let cached: Vec<&str> = c.near_cache.rules.iter().map(|r| r.prefix.as_str()).collect();
    assert!(cached.contains(&"master:") && cached.contains(&"permissions:"), "near-cache rules: {cached:?}");
    assert_eq!(c.ttl.mode, TtlMode::Enforce);
    let find = |prefix: &str| {
        c.ttl.rules.iter().find(|r| r.prefix == prefix).unwrap_or_else(|| panic!("no rule for {prefix}"))
    };
    let h = |n: u64| Duration::from_secs(n * 3600);
    assert_eq!((find("session:").default, find("session:").db), (h(24), Some(0)));
    assert_eq!((find("permissions:").default, find("permissions:").db), (h(1), Some(1)));
    assert_eq!((find("master:").default, find("master:").db), (h(6), Some(1)));
    assert_eq!((find("stats:").default, find("stats:").db), (h(12), Some(1)));
    assert_eq!(find("stats:serial_count:").default, h(24));
    assert_eq!((find("temp:").default, find("temp:").db), (Duration::from_secs(1800), Some(2)));
    assert_eq!(find("temp:excel_upload:").default, h(1));
    assert_eq!(find("lock:").default, Duration::from_secs(300));
}

/// `EXPIRE … GT|LT` compares the TTL the client named with the key's, so lowering it first
/// could change Redis's answer: the command runs as sent, and a TTL above max that it set is
/// then lowered. Replies match a policy-free Redis; the TTL ends at or below max.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_gt_and_lt_answer_as_redis_and_end_at_or_below_max() {
    let mut rig = Rig::start().await;
    let above = (3 * MAX_MS).to_string();
    let below = (MAX_MS / 2).to_string();
    // (setup TTL in ms or none, the command's options, Redis's reply)
    let cases: &[(Option<&str>, &[&str], &str)] = &[
        (Some(&above), &["GT"], ":1\r\n"),
        (Some(&above), &["LT"], ":0\r\n"),
        (Some(&below), &["GT"], ":1\r\n"),
        (Some(&below), &["XX", "GT"], ":1\r\n"),
        (Some(&below), &["LT"], ":0\r\n"),
        (None, &["GT"], ":0\r\n"),
        (None, &["LT"], ":1\r\n"),
        (None, &["lt", "xx"], ":0\r\n"),
    ];
    for (i, (ttl, options, reply)) in cases.iter().enumerate() {
        let k = format!("t:cmp:{i}");
        match ttl {
            Some(ms) => rig.setup(&["SET", &k, "v", "PX", ms]).await,
            None => rig.setup(&["SET", &k, "v"]).await,
        }
        let mut write = vec!["EXPIRE", &k, "99999"];
        write.extend_from_slice(options);
        assert_eq!(rig.both(&write).await, b(reply), "{write:?}");
        let ttl_after = rig.pttl(&k).await;
        if ttl.is_none() && *reply == ":0\r\n" {
            assert_eq!(ttl_after, -1, "{write:?} left the key persistent");
        } else {
            assert!(ttl_after > 0 && ttl_after <= MAX_MS, "{write:?}: PTTL {ttl_after} at or below max");
        }
    }
    // Options Redis refuses change nothing.
    rig.setup(&["SET", "t:cmp:bad", "v", "PX", &below]).await;
    for bad in [&["GT", "LT"][..], &["NX", "GT"], &["GT", "SOON"]] {
        let mut write = vec!["EXPIRE", "t:cmp:bad", "99999"];
        write.extend_from_slice(bad);
        assert!(rig.both(&write).await.starts_with(b"-ERR"), "{write:?}");
    }
    let ttl_after = rig.pttl("t:cmp:bad").await;
    assert!(ttl_after > MAX_MS / 2 - 60_000 && ttl_after <= MAX_MS / 2, "refused options kept the TTL: {ttl_after}");
    // Inside a transaction, EXEC's reply is Redis's own.
    rig.setup(&["SET", "t:cmp:tx", "v", "PX", &above]).await;
    for cmd in [&["MULTI"][..], &["EXPIRE", "t:cmp:tx", "99999", "GT"], &["EXEC"]] {
        rig.both(cmd).await;
    }
    let ttl_after = rig.pttl("t:cmp:tx").await;
    assert!(ttl_after > 0 && ttl_after <= MAX_MS, "in MULTI: PTTL {ttl_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_by_xgroup_mkstream_gets_the_default_ttl() {
    let mut rig = Rig::start().await;
    rig.both(&["XGROUP", "CREATE", "t:xg", "g", "$", "MKSTREAM"]).await;
    let ttl = rig.pttl("t:xg").await;
    assert!(ttl > 0 && ttl <= DEFAULT_MS, "the new stream got the default TTL: {ttl}");
    // Without MKSTREAM no key is created, and Redis's error comes back.
    let reply = rig.both(&["XGROUP", "CREATE", "t:xg2", "g", "$"]).await;
    assert!(reply.starts_with(b"-ERR"), "{reply:?}");
}
