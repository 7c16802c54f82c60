//! The near-cache against real Redis and several sidecache instances: hits, coherence after
//! writes from every route, read-your-writes, protocol shapes, ACL partitioning, faults, the
//! reply/invalidation race (through a fault relay), a staleness bound, and shadow verify against
//! a link that loses invalidations (through the relay).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::relay::Relay;
use common::*;
use sidecache::config::{CacheRuleConfig, CoherenceMode, Config};
use sidecache::protocol::value::{self, Value};

fn rule(name: &str, prefix: &str) -> CacheRuleConfig {
    CacheRuleConfig { name: name.into(), prefix: prefix.into(), db: None, max_ttl: None }
}

fn cached(c: &mut Config, prefix: &str) {
    c.near_cache.rules = vec![rule("master", prefix)];
    c.near_cache.heartbeat = Duration::from_millis(100);
    c.near_cache.heartbeat_timeout = Duration::from_millis(500);
}

async fn wait_coherent(p: &Proxy) {
    eventually("near-cache coherence established", || async { p.http_get("/readyz").await.0 == 200 }).await;
}

async fn start_cached(redis_url: &str, prefix: &str) -> Proxy {
    let mut c = test_config(redis_url);
    cached(&mut c, prefix);
    let p = Proxy::start_config(c).await;
    wait_coherent(&p).await;
    p
}

async fn stats(c: &mut Client) -> HashMap<String, String> {
    let reply = c.cmd(&["SIDECACHE", "CACHE", "STATS"]).await;
    let Some(Value::Agg(_, items)) = value::parse(&reply) else { panic!("STATS reply: {reply:?}") };
    items
        .chunks(2)
        .map(|p| {
            let s = |v: &Value| String::from_utf8_lossy(v.as_bytes().expect("a string")).to_string();
            (s(&p[0]), s(&p[1]))
        })
        .collect()
}

async fn stat(c: &mut Client, name: &str) -> u64 {
    stats(c).await.get(name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("stat {name}"))
}

fn bulk(s: &str) -> Bytes {
    b(&format!("${}\r\n{s}\r\n", s.len()))
}

/// Waits until `GET key` answers `want` (through any errors on the way), at most `within`.
async fn reads_within(c: &mut Client, key: &str, want: &Bytes, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = c.cmd(&["GET", key]).await;
        if got == *want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still served {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// After a write, the instance must converge on the new value and then never return the old.
async fn converges(c: &mut Client, key: &str, want: &Bytes, what: &str) {
    reads_within(c, key, want, what, Duration::from_secs(2)).await;
    for _ in 0..50 {
        assert_eq!(&c.cmd(&["GET", key]).await, want, "{what}: an old value came back");
    }
}

#[tokio::test]
async fn hit_after_first_read_and_metrics_move() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("sidecache-nc-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecache.toml");
    std::fs::write(
        &file,
        "[near_cache]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"500ms\"\n\
         [[near_cache.rules]]\nname = \"master\"\nprefix = \"master:\"\n",
    )
    .unwrap();
    let proxy = ProxyProcess::start(&redis.url(), &["--config", file.to_str().unwrap()]).await;
    eventually("ready", || async { http_get(proxy.admin, "/readyz").await.0 == 200 }).await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:brand:1", "REAN"]).await;
    let mut c = Client::connect(&proxy.addr.to_string()).await;
    assert_eq!(c.cmd(&["GET", "master:brand:1"]).await, bulk("REAN"));
    let before = stat(&mut c, "hits").await;
    for _ in 0..5 {
        assert_eq!(c.cmd(&["GET", "master:brand:1"]).await, bulk("REAN"));
    }
    assert_eq!(stat(&mut c, "hits").await, before + 5, "repeated reads are hits");
    let calls = info_field(&redis.addr(), "cmdstat_get").await;
    assert!(calls.starts_with("calls=1,"), "Redis saw one GET only: {calls}");
    let (_, metrics) = http_get(proxy.admin, "/metrics").await;
    let value_of = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics:\n{metrics}"))
    };
    assert_eq!(value_of("sidecache_cache_hits_total{rule=\"master\"}"), 5.0);
    assert_eq!(value_of("sidecache_cache_misses_total{rule=\"master\"}"), 1.0);
    assert_eq!(value_of("sidecache_cache_entries{rule=\"master\"}"), 1.0);
    assert_eq!(value_of("sidecache_coherence_up"), 1.0);
    assert_eq!(value_of("sidecache_coherence_mode{mode=\"tracking\"}"), 1.0);
    assert!(metrics.contains("sidecache_cache_invalidation_lag_seconds_bucket"), "lag is a histogram");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn writes_by_every_route_are_never_served_stale() {
    let redis = RedisServer::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"]);
    let a = start_cached(&redis.url(), "master:").await;
    let other = start_cached(&redis.url(), "master:").await;
    let mut ca = a.client().await;
    let mut cb = other.client().await;
    let mut direct = Client::connect(&redis.addr()).await;
    let k = "master:k";

    // Direct write to Redis.
    direct.cmd(&["SET", k, "v1"]).await;
    assert_eq!(ca.cmd(&["GET", k]).await, bulk("v1"));
    assert_eq!(ca.cmd(&["GET", k]).await, bulk("v1"));
    direct.cmd(&["SET", k, "v2"]).await;
    converges(&mut ca, k, &bulk("v2"), "direct write").await;

    // Through another instance.
    assert_eq!(cb.cmd(&["GET", k]).await, bulk("v2"));
    cb.cmd(&["SET", k, "v3"]).await;
    assert_eq!(cb.cmd(&["GET", k]).await, bulk("v3"), "read-your-writes on the writing instance");
    converges(&mut ca, k, &bulk("v3"), "write through another instance").await;

    // Through this instance: the very next read sees it.
    ca.cmd(&["SET", k, "v4"]).await;
    assert_eq!(ca.cmd(&["GET", k]).await, bulk("v4"));

    // By a script.
    direct.cmd(&["EVAL", "return redis.call('SET', KEYS[1], 'v5')", "1", k]).await;
    converges(&mut ca, k, &bulk("v5"), "EVAL").await;

    // By expiry.
    direct.cmd(&["PEXPIRE", k, "100"]).await;
    assert_eq!(ca.cmd(&["GET", k]).await, bulk("v5"));
    converges(&mut ca, k, &b("$-1\r\n"), "PEXPIRE expiry").await;

    // By FLUSHALL.
    direct.cmd(&["SET", k, "v6"]).await;
    converges(&mut ca, k, &bulk("v6"), "re-created").await;
    direct.cmd(&["FLUSHALL"]).await;
    converges(&mut ca, k, &b("$-1\r\n"), "FLUSHALL").await;

    // By eviction under maxmemory: fill Redis until the key is evicted.
    direct.cmd(&["SET", k, "v7"]).await;
    converges(&mut ca, k, &bulk("v7"), "before eviction").await;
    let filler = "x".repeat(10_000);
    let mut i = 0;
    while direct.cmd(&["EXISTS", k]).await == b(":1\r\n") {
        for _ in 0..50 {
            direct.cmd(&["SET", &format!("filler:{i}"), &filler]).await;
            i += 1;
        }
        assert!(i < 100_000, "the key was never evicted");
    }
    converges(&mut ca, k, &b("$-1\r\n"), "eviction under maxmemory").await;
}

/// Redis's tracking sends nothing for `SWAPDB`: the instance that runs it announces "flush
/// everything" on the pub/sub channel, which instances in tracking mode also hear. Writes to
/// keys are not announced in tracking mode (Redis invalidates those itself).
#[tokio::test]
async fn swapdb_through_another_instance_is_seen_in_tracking_mode() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let b2 = start_cached(&redis.url(), "master:").await;
    let mut ca = a.client().await;
    let mut cb = b2.client().await;
    assert_eq!(stats(&mut ca).await["coherence"], "tracking");
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SELECT", "3"]).await;
    direct.cmd(&["SET", "master:sw", "db3"]).await;
    direct.cmd(&["SELECT", "0"]).await;
    direct.cmd(&["SET", "master:sw", "db0"]).await;
    let publishes = |stats: String| {
        stats.lines().find_map(|l| l.strip_prefix("cmdstat_publish:calls=")?.split(',').next()?.parse::<u64>().ok())
    };
    let before = publishes(String::from_utf8_lossy(&direct.cmd(&["INFO", "commandstats"]).await).to_string());
    for i in 0..20 {
        cb.cmd(&["SET", &format!("master:w{i}"), "x"]).await;
    }
    let after = publishes(String::from_utf8_lossy(&direct.cmd(&["INFO", "commandstats"]).await).to_string());
    assert_eq!(after, before, "writes to keys are not announced in tracking mode");
    assert_eq!(ca.cmd(&["GET", "master:sw"]).await, bulk("db0"));
    assert_eq!(ca.cmd(&["GET", "master:sw"]).await, bulk("db0"));
    assert_eq!(cb.cmd(&["SWAPDB", "0", "3"]).await, b("+OK\r\n"));
    converges(&mut ca, "master:sw", &bulk("db3"), "SWAPDB through another instance").await;
    assert_eq!(cb.cmd(&["GET", "master:sw"]).await, bulk("db3"), "and on the instance that ran it");
}

/// An ACL user without channel permissions (Redis 7's default for new users) still gets
/// tracking-mode coherence; only the `SWAPDB` announcement is lost.
#[tokio::test]
async fn tracking_works_for_a_user_that_may_not_subscribe() {
    let redis = RedisServer::start();
    let mut admin = Client::connect(&redis.addr()).await;
    admin.cmd(&["ACL", "SETUSER", "app", "on", ">pw", "~*", "resetchannels", "+@all"]).await;
    let mut cfg = test_config(&format!("redis://app:pw@127.0.0.1:{}", redis.port));
    cached(&mut cfg, "master:");
    let p = Proxy::start_config(cfg).await;
    wait_coherent(&p).await;
    let mut c = p.client().await;
    assert_eq!(stats(&mut c).await["coherence"], "tracking");
    admin.cmd(&["SET", "master:a", "1"]).await;
    assert_eq!(c.cmd(&["GET", "master:a"]).await, bulk("1"));
    admin.cmd(&["SET", "master:a", "2"]).await;
    converges(&mut c, "master:a", &bulk("2"), "a direct write").await;
}

#[tokio::test]
async fn read_your_writes_over_1000_pipelined_pairs() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let k = "master:ryw";
    // Another client of the same instance keeps reading the key, so fills race the writes.
    let addr = a.addr.to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let reader = tokio::spawn(async move {
        let mut c = Client::connect(&addr).await;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            c.cmd(&["GET", "master:ryw"]).await;
        }
    });
    let mut c = a.client().await;
    let mut pipeline = Vec::new();
    for i in 0..1000 {
        let v = i.to_string();
        pipeline.extend(encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
        pipeline.extend(encode(&[b"GET", k.as_bytes()]));
    }
    c.send_raw(&pipeline).await;
    for i in 0..1000 {
        assert_eq!(c.read().await, b("+OK\r\n"));
        assert_eq!(c.read().await, bulk(&i.to_string()), "pair {i}: the read must see its write");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.await.unwrap();
    // And a plain write followed by reads from another client of the same instance.
    let mut other = a.client().await;
    for i in 0..200 {
        c.cmd(&["SET", k, &format!("w{i}")]).await;
        assert_eq!(other.cmd(&["GET", k]).await, bulk(&format!("w{i}")), "another client reads the write");
    }
}

#[tokio::test]
async fn mget_answers_partial_hits_in_order() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["MSET", "master:a", "1", "master:b", "2", "other:c", "3"]).await;
    let mut c = a.client().await;
    assert_eq!(c.cmd(&["GET", "master:a"]).await, bulk("1"));
    let hits = stat(&mut c, "hits").await;
    let args = ["MGET", "master:b", "other:c", "master:a", "master:none", "master:a"];
    let want = direct.cmd(&args).await;
    assert_eq!(c.cmd(&args).await, want, "partial hit, in order");
    assert_eq!(stat(&mut c, "hits").await, hits + 2, "master:a twice from memory");
    assert_eq!(c.cmd(&args).await, want, "now all ruled keys are hits");
    assert_eq!(stat(&mut c, "hits").await, hits + 2 + 4);
    // RESP3 client, same entries.
    c.cmd(&["HELLO", "3"]).await;
    let mut d3 = Client::connect(&redis.addr()).await;
    d3.cmd(&["HELLO", "3"]).await;
    assert_eq!(c.cmd(&args).await, d3.cmd(&args).await, "RESP3 nulls");
}

/// `MGET` shows a null for a key of another type; `GET` of that key must still say
/// `WRONGTYPE`, so what `MGET` cached never answers `GET`.
#[tokio::test]
async fn an_mget_null_for_a_hash_never_answers_a_get() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["HSET", "master:w", "f", "1"]).await;
    let mut c = a.client().await;
    let mget = ["MGET", "master:w", "master:none"];
    for _ in 0..2 {
        assert_eq!(c.cmd(&mget).await, b("*2\r\n$-1\r\n$-1\r\n"), "MGET shows nulls, as Redis does");
    }
    let hits = stat(&mut c, "hits").await;
    assert_eq!(c.cmd(&mget).await, b("*2\r\n$-1\r\n$-1\r\n"));
    assert_eq!(stat(&mut c, "hits").await, hits + 2, "MGET's own entries answer MGET");
    let want = direct.cmd(&["GET", "master:w"]).await;
    assert!(want.starts_with(b"-WRONGTYPE"), "{want:?}");
    for _ in 0..2 {
        assert_eq!(c.cmd(&["GET", "master:w"]).await, want, "GET after MGET is Redis's WRONGTYPE");
    }
    assert_eq!(c.cmd(&["GET", "master:none"]).await, b("$-1\r\n"));
    assert_eq!(c.cmd(&mget).await, b("*2\r\n$-1\r\n$-1\r\n"), "and MGET still shows nulls");
}

/// A write queued in `MULTI` keeps its keys out of the cache until `EXEC`; `RESET` discards the
/// transaction, and the keys must be cached again (they were not for as long as the client
/// stayed connected).
#[tokio::test]
async fn reset_inside_multi_lets_its_keys_be_cached_again() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:mx", "1"]).await;
    let mut t = a.client().await;
    for cmd in [&["MULTI"][..], &["SET", "master:mx", "2"], &["FLUSHALL"], &["RESET"]] {
        t.cmd(cmd).await;
    }
    let mut c = a.client().await;
    assert_eq!(c.cmd(&["GET", "master:mx"]).await, bulk("1"), "the discarded SET never ran");
    // A fill may race the invalidation of the setup's SET and not be kept; then the next is.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let hits = stat(&mut c, "hits").await;
        assert_eq!(c.cmd(&["GET", "master:mx"]).await, bulk("1"));
        if stat(&mut c, "hits").await == hits + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the key is never cached again while the client stays");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn one_entry_serves_resp2_and_resp3_clients() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["HSET", "master:h", "f1", "v1", "f2", "v2"]).await;
    direct.cmd(&["SADD", "master:s", "x", "y"]).await;
    direct.cmd(&["RPUSH", "master:l", "a", "b", "c"]).await;
    direct.cmd(&["ZADD", "master:z", "1", "m1", "2", "m2"]).await;
    let mut d3 = Client::connect(&redis.addr()).await;
    d3.cmd(&["HELLO", "3"]).await;
    let mut c2 = a.client().await;
    let mut c3 = a.client().await;
    c3.cmd(&["HELLO", "3"]).await;
    let reads: [&[&str]; 10] = [
        &["HGETALL", "master:h"],
        &["HGET", "master:h", "f1"],
        &["HMGET", "master:h", "f2", "nope"],
        &["SMEMBERS", "master:s"],
        &["EXISTS", "master:h"],
        &["STRLEN", "master:none"],
        &["LRANGE", "master:l", "0", "-1"],
        &["ZRANGE", "master:z", "0", "-1"],
        &["ZRANGEBYSCORE", "master:z", "-inf", "+inf"],
        &["GET", "master:none"],
    ];
    for r in reads {
        // Filled by a RESP2 client, then served to both.
        let want2 = direct.cmd(r).await;
        let want3 = d3.cmd(r).await;
        assert_eq!(c2.cmd(r).await, want2, "{r:?} miss, RESP2");
        let hits = stat(&mut c2, "hits").await;
        assert_eq!(c3.cmd(r).await, want3, "{r:?} hit, RESP3");
        assert_eq!(c2.cmd(r).await, want2, "{r:?} hit, RESP2");
        assert_eq!(stat(&mut c2, "hits").await, hits + 2, "{r:?} answered from one entry");
    }
    // A write to the hash invalidates every view of it.
    c3.cmd(&["HSET", "master:h", "f1", "new"]).await;
    assert_eq!(c2.cmd(&["HGET", "master:h", "f1"]).await, bulk("new"));
    assert_eq!(c2.cmd(&["HGETALL", "master:h"]).await, direct.cmd(&["HGETALL", "master:h"]).await);
    // Errors are never cached.
    let wrong = c2.cmd(&["GET", "master:h"]).await;
    assert!(wrong.starts_with(b"-WRONGTYPE"), "{wrong:?}");
    let hits = stat(&mut c2, "hits").await;
    assert!(c2.cmd(&["GET", "master:h"]).await.starts_with(b"-WRONGTYPE"));
    assert_eq!(stat(&mut c2, "hits").await, hits, "an error is not a hit");
}

#[tokio::test]
async fn transactions_and_watched_keys_never_read_from_memory() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let mut c = a.client().await;
    c.cmd(&["SET", "master:t", "1"]).await;
    assert_eq!(c.cmd(&["GET", "master:t"]).await, bulk("1"));
    let hits = stat(&mut c, "hits").await;
    assert_eq!(c.cmd(&["MULTI"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["GET", "master:t"]).await, b("+QUEUED\r\n"));
    assert_eq!(c.cmd(&["SET", "master:t", "2"]).await, b("+QUEUED\r\n"));
    assert_eq!(c.cmd(&["GET", "master:t"]).await, b("+QUEUED\r\n"));
    assert_eq!(c.cmd(&["EXEC"]).await, b("*3\r\n$1\r\n1\r\n+OK\r\n$1\r\n2\r\n"));
    assert_eq!(stat(&mut c, "hits").await, hits, "nothing inside MULTI came from memory");
    // The transaction's write is read by the next plain read, on this and another client.
    let mut other = a.client().await;
    assert_eq!(other.cmd(&["GET", "master:t"]).await, bulk("2"));
    assert_eq!(c.cmd(&["WATCH", "master:t"]).await, b("+OK\r\n"));
    let hits = stat(&mut c, "hits").await;
    assert_eq!(c.cmd(&["GET", "master:t"]).await, bulk("2"));
    assert_eq!(stat(&mut c, "hits").await, hits, "a watching client reads from Redis");
    c.cmd(&["UNWATCH"]).await;
    // A client with its own CLIENT TRACKING never reads from memory.
    let mut t = a.client().await;
    t.cmd(&["HELLO", "3"]).await;
    assert_eq!(t.cmd(&["CLIENT", "TRACKING", "ON"]).await, b("+OK\r\n"));
    let hits = stat(&mut t, "hits").await;
    assert_eq!(t.cmd(&["GET", "master:t"]).await, bulk("2"));
    assert_eq!(stat(&mut t, "hits").await, hits);
}

#[tokio::test]
async fn acl_users_never_see_each_others_cached_values() {
    let redis = RedisServer::start();
    let mut admin = Client::connect(&redis.addr()).await;
    admin.cmd(&["ACL", "SETUSER", "alice", "on", ">pa", "~alice:*", "~shared:*", "+@all"]).await;
    admin.cmd(&["ACL", "SETUSER", "bob", "on", ">pb", "~bob:*", "+@all"]).await;
    admin.cmd(&["SET", "alice:secret", "a-only"]).await;
    admin.cmd(&["SET", "shared:x", "s"]).await;
    let a = start_cached(&redis.url(), "").await;
    let mut alice = a.client().await;
    let mut bob = a.client().await;
    assert_eq!(alice.cmd(&["AUTH", "alice", "pa"]).await, b("+OK\r\n"));
    assert_eq!(bob.cmd(&["AUTH", "bob", "pb"]).await, b("+OK\r\n"));
    for _ in 0..3 {
        assert_eq!(alice.cmd(&["GET", "alice:secret"]).await, bulk("a-only"));
        assert_eq!(alice.cmd(&["GET", "shared:x"]).await, bulk("s"));
    }
    let denied = bob.cmd(&["GET", "alice:secret"]).await;
    assert!(denied.starts_with(b"-NOPERM"), "bob must not read alice's cached value: {denied:?}");
    let denied = bob.cmd(&["MGET", "shared:x", "bob:none"]).await;
    assert!(denied.starts_with(b"-NOPERM"), "nor through MGET: {denied:?}");
    let info = bob.cmd(&["SIDECACHE", "CACHE", "INFO", "alice:secret"]).await;
    assert_eq!(info, b("$-1\r\n"), "bob sees nothing cached for alice's key");
    let info = alice.cmd(&["SIDECACHE", "CACHE", "INFO", "alice:secret"]).await;
    assert!(info.starts_with(b"*1\r\n"), "alice's entry exists: {info:?}");
}

async fn link_client_id(redis: &RedisServer) -> Vec<String> {
    let mut direct = Client::connect(&redis.addr()).await;
    let list = direct.cmd(&["CLIENT", "LIST"]).await;
    String::from_utf8_lossy(&list)
        .lines()
        .filter(|l| l.contains("name=sidecache-coherence"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_string))
        .collect()
}

#[tokio::test]
async fn killed_invalidation_link_is_followed_by_no_stale_read() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let mut c = a.client().await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:f", "old"]).await;
    assert_eq!(c.cmd(&["GET", "master:f"]).await, bulk("old"));
    assert_eq!(c.cmd(&["GET", "master:f"]).await, bulk("old"));
    let flushes = stat(&mut c, "flushes").await;
    let ids = link_client_id(&redis).await;
    assert_eq!(ids.len(), 1, "one invalidation link");
    direct.cmd(&["CLIENT", "KILL", "ID", &ids[0]]).await;
    direct.cmd(&["SET", "master:f", "new"]).await;
    converges(&mut c, "master:f", &bulk("new"), "after CLIENT KILL of the link").await;
    assert!(stat(&mut c, "flushes").await > flushes, "the cache was flushed on link loss");
    eventually("a new link", || async { link_client_id(&redis).await.len() == 1 }).await;
    wait_coherent(&a).await;
    // Coherent again: hits resume and writes are seen.
    assert_eq!(c.cmd(&["GET", "master:f"]).await, bulk("new"));
    direct.cmd(&["SET", "master:f", "newer"]).await;
    converges(&mut c, "master:f", &bulk("newer"), "after the link is back").await;
}

#[tokio::test]
async fn redis_killed_and_restarted_is_followed_by_no_stale_read() {
    let mut redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let mut c = a.client().await;
    c.cmd(&["SET", "master:r", "before"]).await;
    assert_eq!(c.cmd(&["GET", "master:r"]).await, bulk("before"));
    assert_eq!(c.cmd(&["GET", "master:r"]).await, bulk("before"));
    redis.kill();
    redis.restart();
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:r", "after"]).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = c.cmd(&["GET", "master:r"]).await;
        assert_ne!(got, bulk("before"), "a value from before the restart was served");
        if got == bulk("after") {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    converges(&mut c, "master:r", &bulk("after"), "after restart").await;
}

#[tokio::test]
async fn redis_stopped_beyond_the_heartbeat_is_followed_by_no_stale_read() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let mut c = a.client().await;
    c.cmd(&["SET", "master:s", "before"]).await;
    assert_eq!(c.cmd(&["GET", "master:s"]).await, bulk("before"));
    let flushes = stat(&mut c, "flushes").await;
    redis.signal(libc::SIGSTOP);
    eventually("coherence down after the missed heartbeat", || async {
        let mut c = a.client().await;
        stats(&mut c).await.get("coherence").map(String::as_str) == Some("down")
    })
    .await;
    redis.signal(libc::SIGCONT);
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:s", "after"]).await;
    converges(&mut c, "master:s", &bulk("after"), "after SIGSTOP beyond the heartbeat").await;
    assert!(stat(&mut c, "flushes").await > flushes);
    wait_coherent(&a).await;
}

#[tokio::test]
async fn a_reply_that_raced_an_invalidation_is_not_stored() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let a = start_cached(&relay.url(), "master:").await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:race", "old"]).await;
    let mut c = a.client().await;
    let mut observer = a.client().await;
    // Warm the data connection so the read below only waits on the held reply.
    assert_eq!(c.cmd(&["GET", "master:warm"]).await, b("$-1\r\n"));
    let invalidations = stat(&mut observer, "invalidations").await;
    relay.hold(true);
    c.send(&[b"GET", b"master:race"]).await;
    // Let the read reach Redis (its reply is held), then write directly.
    eventually("the read reached Redis", || async {
        info_field(&redis.addr(), "cmdstat_get").await.contains("calls=2,")
    })
    .await;
    direct.cmd(&["SET", "master:race", "new"]).await;
    eventually("the invalidation overtook the reply", || async {
        let mut o = a.client().await;
        stat(&mut o, "invalidations").await > invalidations
    })
    .await;
    relay.hold(false);
    assert_eq!(c.read().await, bulk("old"), "the raced read itself returns what Redis answered");
    assert_eq!(c.cmd(&["GET", "master:race"]).await, bulk("new"), "the raced reply was not stored");
    assert_eq!(c.cmd(&["GET", "master:race"]).await, bulk("new"));
}

#[tokio::test]
async fn staleness_is_bounded_and_values_converge() {
    const BOUND: Duration = Duration::from_millis(50);
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "master:").await;
    let b2 = start_cached(&redis.url(), "master:").await;
    let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for addr in [a.addr, a.addr, b2.addr] {
        let done = done.clone();
        readers.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr.to_string()).await;
            let mut seen = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let start = Instant::now();
                let r = c.cmd(&["GET", "master:version"]).await;
                let v = std::str::from_utf8(&r).ok().and_then(|s| s.lines().nth(1)).and_then(|s| s.parse::<u64>().ok());
                seen.push((start, v.unwrap_or(0)));
            }
            seen
        }));
    }
    let mut direct = Client::connect(&redis.addr()).await;
    for v in 1..=300u64 {
        direct.cmd(&["SET", "master:version", &v.to_string()]).await;
        acks.lock().unwrap().push((Instant::now(), v));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let acks = acks.lock().unwrap().clone();
    let mut worst = Duration::ZERO;
    let mut reads = 0;
    for r in readers {
        for (start, v) in r.await.unwrap() {
            reads += 1;
            // The newest version acknowledged more than BOUND before this read started.
            if let Some(&(acked, newest)) = acks.iter().rev().find(|(t, _)| *t + BOUND <= start) {
                assert!(
                    v >= newest,
                    "a read started {:?} after version {newest} was acknowledged returned {v}",
                    start - acked
                );
            }
            if let Some(&(acked, _)) = acks.iter().find(|(_, ver)| *ver == v + 1)
                && start > acked
            {
                worst = worst.max(start - acked);
            }
        }
    }
    assert!(reads > 100, "readers made {reads} reads");
    eprintln!("staleness: {reads} reads, worst observed lag {worst:?} (bound {BOUND:?})");
    for p in [&a, &b2] {
        let mut c = p.client().await;
        converges(&mut c, "master:version", &bulk("300"), "eventual equality").await;
    }
}

#[tokio::test]
async fn pubsub_mode_invalidates_across_instances_and_bounds_direct_writes() {
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cached(&mut cfg, "master:");
    cfg.near_cache.coherence = CoherenceMode::Pubsub;
    cfg.near_cache.pubsub_max_ttl = Duration::from_millis(300);
    let a = Proxy::start_config(cfg.clone()).await;
    let b2 = Proxy::start_config(cfg).await;
    wait_coherent(&a).await;
    wait_coherent(&b2).await;
    let mut ca = a.client().await;
    let mut cb = b2.client().await;
    assert_eq!(stats(&mut ca).await["coherence"], "pubsub");
    cb.cmd(&["SET", "master:p", "1"]).await;
    assert_eq!(ca.cmd(&["GET", "master:p"]).await, bulk("1"));
    assert_eq!(ca.cmd(&["GET", "master:p"]).await, bulk("1"));
    cb.cmd(&["SET", "master:p", "2"]).await;
    converges(&mut ca, "master:p", &bulk("2"), "write through another instance (pub/sub)").await;
    // A write that bypasses sidecache is bounded by pubsub_max_ttl.
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:p", "3"]).await;
    converges(&mut ca, "master:p", &bulk("3"), "direct write, bounded by pubsub_max_ttl").await;
}

/// Rule prefixes that cover the link's probe keys (`_`), or that the probe's prefix covers,
/// must not make Redis refuse `CLIENT TRACKING` for overlapping prefixes.
#[tokio::test]
async fn rule_prefixes_overlapping_the_probe_keys_still_track() {
    let redis = RedisServer::start();
    for prefix in ["_", "__sidecache:probe:mine:"] {
        let mut cfg = test_config(&redis.url());
        cached(&mut cfg, prefix);
        cfg.near_cache.coherence = CoherenceMode::Tracking;
        let p = Proxy::start_config(cfg).await;
        wait_coherent(&p).await;
        let mut c = p.client().await;
        assert_eq!(stats(&mut c).await["coherence"], "tracking", "rule {prefix:?}");
        let key = format!("{prefix}k");
        let mut direct = Client::connect(&redis.addr()).await;
        direct.cmd(&["SET", &key, "1"]).await;
        assert_eq!(c.cmd(&["GET", &key]).await, bulk("1"));
        assert_eq!(c.cmd(&["GET", &key]).await, bulk("1"));
        direct.cmd(&["SET", &key, "2"]).await;
        converges(&mut c, &key, &bulk("2"), &format!("a direct write under rule {prefix:?}")).await;
    }
}

#[tokio::test]
async fn refused_tracking_keeps_the_cache_bypassed_and_readyz_says_why() {
    let redis = RedisServer::start();
    let mut admin = Client::connect(&redis.addr()).await;
    admin.cmd(&["ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-client|tracking"]).await;
    let url = format!("redis://app:pw@127.0.0.1:{}", redis.port);
    let mut cfg = test_config(&url);
    cached(&mut cfg, "master:");
    cfg.near_cache.coherence = CoherenceMode::Tracking;
    let strict = Proxy::start_config(cfg.clone()).await;
    eventually("readyz explains the coherence problem", || async {
        let (status, body) = strict.http_get("/readyz").await;
        status == 503 && body.contains("coherence down") && body.contains("CLIENT TRACKING refused")
    })
    .await;
    let mut c = strict.client().await;
    c.cmd(&["SET", "master:x", "1"]).await;
    assert_eq!(c.cmd(&["GET", "master:x"]).await, bulk("1"));
    assert_eq!(c.cmd(&["GET", "master:x"]).await, bulk("1"));
    assert_eq!(stat(&mut c, "hits").await, 0, "bypassed while coherence is down");
    // `auto` falls back to pub/sub on the same server.
    cfg.near_cache.coherence = CoherenceMode::Auto;
    let auto = Proxy::start_config(cfg).await;
    wait_coherent(&auto).await;
    let mut c = auto.client().await;
    assert_eq!(stats(&mut c).await["coherence"], "pubsub");
}

#[tokio::test]
async fn concurrent_misses_on_one_key_make_one_upstream_read() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let a = start_cached(&relay.url(), "master:").await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:hot", "v"]).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = a.client().await;
        assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
        clients.push(c);
    }
    let gets_before = info_field(&redis.addr(), "cmdstat_get").await;
    let mut observer = a.client().await;
    let misses = stat(&mut observer, "misses").await;
    relay.hold(true);
    for c in clients.iter_mut() {
        c.send(&[b"GET", b"master:hot"]).await;
    }
    eventually("all ten reads arrived", || async {
        let mut o = a.client().await;
        stat(&mut o, "misses").await >= misses + 10
    })
    .await;
    relay.hold(false);
    for c in clients.iter_mut() {
        assert_eq!(c.read().await, bulk("v"));
    }
    let gets_after = info_field(&redis.addr(), "cmdstat_get").await;
    let calls = |s: &str| {
        s.split(',').next().and_then(|c| c.strip_prefix("calls=")).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
    };
    assert_eq!(calls(&gets_after) - calls(&gets_before), 1, "ten concurrent misses, one GET reached Redis");
}

#[tokio::test]
async fn writes_rewritten_by_the_ttl_policy_are_still_read_back() {
    let redis = RedisServer::start();
    let mut c = test_config(&redis.url());
    cached(&mut c, "master:");
    c.ttl.rules = vec![sidecache::ttl::TtlRuleConfig {
        name: Some("master".into()),
        prefix: "master:".into(),
        db: None,
        default: Duration::from_secs(3600),
        max: None,
    }];
    let a = Proxy::start_config(c).await;
    wait_coherent(&a).await;
    let mut c = a.client().await;
    for i in 0..50 {
        // SET is rewritten with PX; HSET is wrapped in MULTI … PEXPIRE NX … EXEC.
        c.cmd(&["SET", "master:t", &i.to_string()]).await;
        assert_eq!(c.cmd(&["GET", "master:t"]).await, bulk(&i.to_string()));
        c.cmd(&["HSET", "master:h", "f", &i.to_string()]).await;
        assert_eq!(c.cmd(&["HGET", "master:h", "f"]).await, bulk(&i.to_string()));
    }
    let ttl = c.cmd(&["PTTL", "master:h"]).await;
    assert!(ttl.starts_with(b":") && ttl != b(":-1\r\n"), "the policy gave the hash a TTL: {ttl:?}");
}

/// The heartbeat interval of the shadow-verify tests: also how long verify waits for an
/// invalidation to explain a difference before it counts one.
const VERIFY_GRACE: Duration = Duration::from_secs(1);

/// Redis with `master:v` = `old`, a fault relay in front of it, a client straight to Redis, and
/// a verifying instance behind the relay with a client of its own.
struct VerifyRig {
    redis: RedisServer,
    relay: Relay,
    direct: Client,
    proxy: ProxyProcess,
    dir: std::path::PathBuf,
    c: Client,
}

impl VerifyRig {
    async fn start(rate: f64) -> VerifyRig {
        let redis = RedisServer::start();
        let relay = Relay::start(redis.port).await;
        let mut direct = Client::connect(&redis.addr()).await;
        // Written before the link exists, so no invalidation of it can void the first fill.
        direct.cmd(&["SET", "master:v", "old"]).await;
        let (proxy, dir) = verifying_instance(&relay, rate).await;
        let c = Client::connect(&proxy.addr.to_string()).await;
        VerifyRig { redis, relay, direct, proxy, dir, c }
    }
}

/// An instance (the binary, so that `/metrics` is its own) behind a fault relay, caching
/// `master:`, verifying `rate` of its hits, with a heartbeat timeout far beyond any test's
/// length: a muted link then loses invalidations without the cache being declared down.
async fn verifying_instance(relay: &Relay, rate: f64) -> (ProxyProcess, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("sidecache-verify-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecache.toml");
    std::fs::write(
        &file,
        format!(
            "[near_cache]\nverify_sample_rate = {rate:?}\nheartbeat = \"{}ms\"\nheartbeat_timeout = \"30s\"\n\
             [[near_cache.rules]]\nname = \"master\"\nprefix = \"master:\"\n",
            VERIFY_GRACE.as_millis()
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::start(&relay.url(), &["--config", file.to_str().unwrap()]).await;
    eventually("ready", || async { http_get(proxy.admin, "/readyz").await.0 == 200 }).await;
    (proxy, dir)
}

/// `sidecache_cache_stale_detected_total` from the instance's `/metrics`.
async fn stale_metric(p: &ProxyProcess) -> f64 {
    let (_, metrics) = http_get(p.admin, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("sidecache_cache_stale_detected_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("sidecache_cache_stale_detected_total in /metrics:\n{metrics}"))
}

/// How many GETs Redis has executed (fills and verify re-reads; the heartbeat only writes).
async fn redis_gets(redis: &RedisServer) -> u64 {
    let stat = info_field(&redis.addr(), "cmdstat_get").await;
    stat.split(',').next().and_then(|c| c.strip_prefix("calls=")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn shadow_verify_counts_a_stale_hit_and_drops_the_entry() {
    let VerifyRig { redis, relay, mut direct, proxy, dir, mut c } = VerifyRig::start(1.0).await;
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("old"), "fill");
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("old"), "hit");
    assert_eq!((stat(&mut c, "misses").await, stat(&mut c, "hits").await), (1, 1));
    // The re-read runs beside the reply, so it may reach Redis just after the client has its hit.
    eventually("the fill and the verify re-read of the hit reached Redis", || async { redis_gets(&redis).await == 2 })
        .await;

    // Invalidations are now lost: a direct write leaves the entry genuinely stale.
    relay.mute_link(true);
    direct.cmd(&["SET", "master:v", "new"]).await;
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("old"), "the muted link left the entry stale");
    assert_eq!(stat(&mut c, "hits").await, 2);
    eventually("verify counted the stale hit", || async {
        let mut o = Client::connect(&proxy.addr.to_string()).await;
        stat(&mut o, "stale_detected").await == 1
    })
    .await;
    assert_eq!(stale_metric(&proxy).await, 1.0, "the metric counts it too");
    assert_eq!(stats(&mut c).await["coherence"], "tracking", "the heartbeat has not declared the link down");

    // The stale entry is dropped: the next read is a miss that fetches the current value.
    assert_eq!(c.cmd(&["SIDECACHE", "CACHE", "INFO", "master:v"]).await, b("$-1\r\n"), "entry dropped");
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("new"));
    assert_eq!(stat(&mut c, "misses").await, 2, "refetched from Redis");
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("new"), "a hit again, and it matches Redis");
    tokio::time::sleep(VERIFY_GRACE * 2).await;
    assert_eq!(stat(&mut c, "stale_detected").await, 1, "a matching hit is not counted");
    assert_eq!(stale_metric(&proxy).await, 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shadow_verify_counts_nothing_when_invalidations_arrive() {
    let VerifyRig { redis, relay, mut direct, proxy, dir, mut c } = VerifyRig::start(1.0).await;
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("old"));
    for _ in 0..5 {
        assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("old"));
    }
    assert_eq!(stat(&mut c, "hits").await, 5);
    eventually("every hit was re-read from Redis", || async { redis_gets(&redis).await == 6 }).await;

    // The same sequence as the stale case, with the link working: the write invalidates.
    direct.cmd(&["SET", "master:v", "new"]).await;
    converges(&mut c, "master:v", &bulk("new"), "direct write, link working").await;

    // An invalidation that arrives late, but within one heartbeat, explains the difference the
    // re-read sees: a lagging link is not a stale cache.
    relay.hold_link(true);
    direct.cmd(&["SET", "master:v", "newer"]).await;
    let hits = stat(&mut c, "hits").await;
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("new"), "a hit while the invalidation is held back");
    assert_eq!(stat(&mut c, "hits").await, hits + 1);
    tokio::time::sleep(VERIFY_GRACE / 10).await;
    relay.hold_link(false);
    converges(&mut c, "master:v", &bulk("newer"), "the held invalidation arrived").await;

    tokio::time::sleep(VERIFY_GRACE * 2).await;
    let (hits, misses) = (stat(&mut c, "hits").await, stat(&mut c, "misses").await);
    assert!(hits > 50, "hits after the writes: {hits}");
    assert_eq!(redis_gets(&redis).await, hits + misses, "every hit was re-read, one fill per miss");
    assert_eq!(stat(&mut c, "stale_detected").await, 0, "no false positives");
    assert_eq!(stale_metric(&proxy).await, 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shadow_verify_off_counts_nothing_even_when_stale() {
    let VerifyRig { redis, relay, mut direct, proxy, dir, mut c } = VerifyRig::start(0.0).await;
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("old"));
    relay.mute_link(true);
    direct.cmd(&["SET", "master:v", "new"]).await;
    for _ in 0..5 {
        assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("old"), "stale, and nothing looks");
    }
    assert_eq!(stat(&mut c, "hits").await, 5);
    tokio::time::sleep(VERIFY_GRACE * 2).await;
    assert_eq!(redis_gets(&redis).await, 1, "only the fill reached Redis: no re-reads");
    assert_eq!(stat(&mut c, "stale_detected").await, 0);
    assert_eq!(stale_metric(&proxy).await, 0.0);
    assert_eq!(c.cmd(&["GET", "master:v"]).await, bulk("old"), "the entry is still there");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes the `COMMAND` table's top level does not show: a container's subcommand
/// (`XGROUP CREATE … MKSTREAM`) and `PFCOUNT`, flagged read-only, which rewrites the value's
/// header. Pipelined behind the write, the read must not be answered from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subcommand_writes_and_pfcount_are_seen_by_the_next_pipelined_read() {
    let redis = RedisServer::start();
    let proxy = start_cached(&redis.url(), "master:").await;
    let mut c = proxy.client().await;
    let mut direct = Client::connect(&redis.addr()).await;
    for round in 0..20 {
        let s = format!("master:stream:{round}");
        assert_eq!(c.cmd(&["EXISTS", &s]).await, b(":0\r\n"));
        assert_eq!(c.cmd(&["EXISTS", &s]).await, b(":0\r\n"));
        c.send_raw(
            &[
                encode(&[b"XGROUP", b"CREATE", s.as_bytes(), b"g", b"$", b"MKSTREAM"]),
                encode(&[b"EXISTS", s.as_bytes()]),
            ]
            .concat(),
        )
        .await;
        assert_eq!(c.read().await, b("+OK\r\n"));
        assert_eq!(c.read().await, b(":1\r\n"), "round {round}: EXISTS after XGROUP CREATE … MKSTREAM");

        let h = format!("master:hll:{round}");
        assert_eq!(c.cmd(&["PFADD", &h, "a", "b", "c"]).await, b(":1\r\n"));
        let before = c.cmd(&["GET", &h]).await;
        assert_eq!(c.cmd(&["GET", &h]).await, before);
        c.send_raw(&[encode(&[b"PFCOUNT", h.as_bytes()]), encode(&[b"GET", h.as_bytes()])].concat()).await;
        assert_eq!(c.read().await, b(":3\r\n"));
        let after = c.read().await;
        assert_eq!(after, direct.cmd(&["GET", &h]).await, "round {round}: GET after PFCOUNT reads Redis's bytes");
        assert_ne!(after, before, "PFCOUNT rewrote the cached cardinality");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_address_leads_to_another_redis_the_link_follows_the_data() {
    let first = RedisServer::start();
    let second = RedisServer::start();
    let relay = Relay::start(first.port).await;
    let a = start_cached(&relay.url(), "master:").await;
    let mut d1 = Client::connect(&first.addr()).await;
    let mut d2 = Client::connect(&second.addr()).await;
    d1.cmd(&["SET", "master:k", "on-first"]).await;
    d2.cmd(&["SET", "master:k", "on-second"]).await;
    let mut c = a.client().await;
    assert_eq!(c.cmd(&["GET", "master:k"]).await, bulk("on-first"));
    // A moved virtual IP: new connections reach the second Redis, the link stays on the first.
    relay.redirect(second.port);
    relay.cut_data();
    let what = "after the move, with only cache hits asked";
    reads_within(&mut c, "master:k", &bulk("on-second"), what, PATIENCE).await;
    wait_coherent(&a).await;
    assert_eq!(stats(&mut c).await["coherence"], "tracking");
    // Cached again, from the second Redis, and its writes invalidate.
    assert_eq!(c.cmd(&["GET", "master:k"]).await, bulk("on-second"));
    d2.cmd(&["SET", "master:k", "second-new"]).await;
    converges(&mut c, "master:k", &bulk("second-new"), "a write on the second Redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_while_an_instances_link_is_down_are_announced_when_it_is_back() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let pubsub = |url: &str| {
        let mut cfg = test_config(url);
        cached(&mut cfg, "master:");
        cfg.near_cache.coherence = CoherenceMode::Pubsub;
        // Far beyond the test: only an announcement can end a stale entry.
        cfg.near_cache.pubsub_max_ttl = Duration::from_secs(300);
        cfg
    };
    let a = Proxy::start_config(pubsub(&relay.url())).await;
    let other = Proxy::start_config(pubsub(&redis.url())).await;
    wait_coherent(&a).await;
    wait_coherent(&other).await;
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SET", "master:k", "old"]).await;
    let mut cb = other.client().await;
    assert_eq!(cb.cmd(&["GET", "master:k"]).await, bulk("old"));
    // A's link goes silent: its heartbeat fails and it cannot come back while muted.
    relay.mute_link(true);
    let mut ca = a.client().await;
    eventually("A's coherence down", || {
        let a = &a;
        async move { stats(&mut a.client().await).await["coherence"] == "down" }
    })
    .await;
    assert_eq!(ca.cmd(&["SET", "master:k", "new"]).await, b("+OK\r\n"));
    assert_eq!(cb.cmd(&["GET", "master:k"]).await, bulk("old"), "B heard nothing yet");
    relay.mute_link(false);
    reads_within(&mut cb, "master:k", &bulk("new"), "B, once A's link is back", PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_heartbeat_is_noticed_when_it_is_due_not_at_the_next_tick() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let mut cfg = test_config(&relay.url());
    cached(&mut cfg, "master:");
    cfg.near_cache.heartbeat = Duration::from_millis(400);
    cfg.near_cache.heartbeat_timeout = Duration::from_millis(450);
    let a = Proxy::start_config(cfg).await;
    wait_coherent(&a).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let keys = direct.cmd(&["KEYS", "__sidecache:probe:*"]).await;
    let text = String::from_utf8_lossy(&keys).to_string();
    let probe = text.lines().nth(2).unwrap_or_else(|| panic!("the probe key in {text:?}")).to_string();
    relay.mute_link(true);
    // Each probe resets the key's TTL to 60 s: a rise in PTTL shows when one was sent.
    let mut c = a.client().await;
    let (mut last_pttl, mut last_probe) = (i64::MAX, Instant::now());
    let deadline = Instant::now() + PATIENCE;
    let down = loop {
        let reply = direct.cmd(&["PTTL", &probe]).await;
        let pttl: i64 = String::from_utf8_lossy(&reply[1..reply.len() - 2]).parse().unwrap();
        let now = Instant::now();
        if pttl > last_pttl {
            last_probe = now;
        }
        last_pttl = pttl;
        if stats(&mut c).await["coherence"] == "down" {
            break now;
        }
        assert!(now < deadline, "the muted link was never declared down");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Due 450 ms after the probe; the tick that would notice it otherwise comes 800 ms after.
    let after = down - last_probe;
    assert!(after < Duration::from_millis(650), "down {after:?} after the unanswered probe (timeout 450 ms)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_serial_writes_are_read_back_through_a_rule_that_covers_their_keys() {
    let redis = RedisServer::start();
    let a = start_cached(&redis.url(), "").await;
    let mut c = a.client().await;
    assert_eq!(c.cmd(&["GET", "serial:inv"]).await, b("$-1\r\n"));
    assert_eq!(c.cmd(&["EXISTS", "lock:L"]).await, b(":0\r\n"));
    for round in 1..=3 {
        let mut pipeline = encode(&[b"SERIAL.NEXT", b"inv"]);
        pipeline.extend(encode(&[b"GET", b"serial:inv"]));
        pipeline.extend(encode(&[b"LOCK.ACQUIRE", b"L", b"10000"]));
        pipeline.extend(encode(&[b"EXISTS", b"lock:L"]));
        c.send_raw(&pipeline).await;
        assert_eq!(c.read().await, b(&format!(":{round}\r\n")));
        assert_eq!(c.read().await, bulk(&round.to_string()), "round {round}: the counter's old value");
        let lock = c.read().await;
        assert!(lock.starts_with(b"*2\r\n$32\r\n"), "{lock:?}");
        assert_eq!(c.read().await, b(":1\r\n"), "round {round}: the lock read as free");
        let token = String::from_utf8_lossy(&lock[9..41]).to_string();
        let mut pipeline = encode(&[b"LOCK.RELEASE", b"L", token.as_bytes()]);
        pipeline.extend(encode(&[b"EXISTS", b"lock:L"]));
        c.send_raw(&pipeline).await;
        assert_eq!(c.read().await, b(":1\r\n"));
        assert_eq!(c.read().await, b(":0\r\n"), "round {round}: the released lock read as held");
    }
}
