//! Distributed locks and serial numbers (SPEC §6, issue 5), against a real Redis with several
//! sidecache instances in front of it: argument errors, mutual exclusion and fences checked by
//! a shared oracle, waiting (pub/sub wake-up, fallback re-check, FIFO, disconnects), leases tied
//! to the connection (close, shutdown, KEEPALIVE, lost leases), serial numbers and their repair,
//! metrics, and Redis restarting under held locks.
//!
//! Waiting is observed, never guessed: a waiter's first attempt shows as an `EVAL` in Redis's
//! `INFO commandstats`, and queued waiters as `sidecache_lock_waiters` of a sidecache process.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;

/// `(token, fence)` from a `LOCK.ACQUIRE` reply; `None` for the nil reply; panics otherwise.
fn acquired(reply: &Bytes) -> Option<(String, i64)> {
    if reply.as_ref() == b"*-1\r\n" || reply.as_ref() == b"_\r\n" {
        return None;
    }
    let text = std::str::from_utf8(reply).expect("utf-8 reply");
    let parts: Vec<&str> = text.split("\r\n").collect();
    assert!(parts.len() >= 4 && parts[0] == "*2" && parts[1] == "$32", "not a lock reply: {text:?}");
    let fence = parts[3].strip_prefix(':').and_then(|f| f.parse().ok()).unwrap_or_else(|| panic!("fence in {text:?}"));
    Some((parts[2].to_string(), fence))
}

/// The value of an integer reply.
fn int(reply: &Bytes) -> i64 {
    let text = std::str::from_utf8(reply).unwrap();
    text.strip_prefix(':').and_then(|t| t.trim_end().parse().ok()).unwrap_or_else(|| panic!("not an integer: {text:?}"))
}

/// How many `EVAL`s Redis has run (each lock attempt is one).
async fn evals(redis: &RedisServer) -> u64 {
    let mut c = Client::connect(&redis.addr()).await;
    let stats = String::from_utf8_lossy(&c.cmd(&["INFO", "commandstats"]).await).to_string();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_eval:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits until Redis has run more than `before` `EVAL`s.
async fn evals_above(redis: &RedisServer, before: u64) {
    eventually("the waiter's first attempt reached Redis", || async { evals(redis).await > before }).await;
}

/// Sends `args` until the reply satisfies `done` (or the patience runs out); returns that reply.
async fn until(c: &mut Client, args: &[&str], what: &str, done: impl Fn(&Bytes) -> bool) -> Bytes {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = c.cmd(args).await;
        if done(&reply) {
            return reply;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what} (last reply {reply:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one series in Prometheus text; panics when absent.
fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            if name == series { value.trim().parse().ok() } else { None }
        })
        .unwrap_or_else(|| panic!("series {series} not found in /metrics:\n{metrics}"))
}

async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    metric_value(&body, series)
}

async fn three(redis: &RedisServer, edit: impl Fn(&mut sidecache::Config)) -> Vec<Proxy> {
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Proxy::start_with(redis, &edit).await);
    }
    proxies
}

/// A sidecache process with this `[locks]` section (for tests that read its metrics).
async fn process(redis: &RedisServer, locks_toml: &str) -> ProxyProcess {
    let path = std::env::temp_dir().join(format!("sidecache-locks-{}-{}.toml", std::process::id(), free_port()));
    std::fs::write(&path, format!("[locks]\n{locks_toml}\n")).unwrap();
    let p = ProxyProcess::start(&redis.url(), &["--config", path.to_str().unwrap()]).await;
    let _ = std::fs::remove_file(&path);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_commands_check_arguments_in_redis_words_and_never_reach_redis() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| c.locks.max_lease = Duration::from_secs(60)).await;
    let mut c = proxy.client().await;
    let cases: &[(&[&str], &str)] = &[
        (&["LOCK.ACQUIRE", "a"], "-ERR wrong number of arguments for 'lock.acquire' command\r\n"),
        (&["lock.acquire", "a", "ten"], "-ERR value is not an integer or out of range\r\n"),
        (&["LOCK.ACQUIRE", "a", "0"], "-ERR invalid lease in 'lock.acquire' command: it must be at least 1 ms\r\n"),
        (&["LOCK.ACQUIRE", "a", "-1"], "-ERR invalid lease in 'lock.acquire' command: it must be at least 1 ms\r\n"),
        (
            &["LOCK.ACQUIRE", "a", "60001"],
            "-ERR invalid lease in 'lock.acquire' command: it must be at most 60000 ms (locks.max_lease)\r\n",
        ),
        (&["LOCK.ACQUIRE", "a", "100", "WAIT"], "-ERR syntax error\r\n"),
        (&["LOCK.ACQUIRE", "a", "100", "WAIT", "-1"], "-ERR timeout is negative\r\n"),
        (&["LOCK.ACQUIRE", "a", "100", "NOW"], "-ERR syntax error\r\n"),
        (&["LOCK.ACQUIRE", "a", "100", "WAIT", "5", "WAIT", "6"], "-ERR syntax error\r\n"),
        (&["LOCK.RELEASE", "a"], "-ERR wrong number of arguments for 'lock.release' command\r\n"),
        (&["LOCK.EXTEND", "a", "t"], "-ERR wrong number of arguments for 'lock.extend' command\r\n"),
        (&["LOCK.EXTEND", "a", "t", "0"], "-ERR invalid lease in 'lock.extend' command: it must be at least 1 ms\r\n"),
        (&["LOCK.INFO"], "-ERR wrong number of arguments for 'lock.info' command\r\n"),
        (&["LOCK.INFO", "a", "b"], "-ERR wrong number of arguments for 'lock.info' command\r\n"),
        (&["SERIAL.NEXT"], "-ERR wrong number of arguments for 'serial.next' command\r\n"),
        (&["SERIAL.NEXT", "s", "COUNT", "0"], "-ERR value is out of range, must be positive\r\n"),
        (&["SERIAL.NEXT", "s", "COUNT", "x"], "-ERR value is not an integer or out of range\r\n"),
        (&["SERIAL.NEXT", "s", "BY", "2"], "-ERR syntax error\r\n"),
    ];
    for (args, expected) in cases {
        assert_eq!(c.cmd(args).await, b(expected), "{args:?}");
    }
    // The connection stays usable, and valid commands are answered by sidecache.
    assert!(acquired(&c.cmd(&["LOCK.ACQUIRE", "a", "60000", "KEEPALIVE", "KEEPALIVE"]).await).is_some());
    assert_eq!(c.cmd(&["SERIAL.NEXT", "s"]).await, b(":1\r\n"));
    assert_eq!(c.cmd(&["MULTI"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["LOCK.INFO", "a"]).await, b("-ERR 'lock.info' cannot be used inside MULTI\r\n"));
    assert_eq!(c.cmd(&["EXEC"]).await, b("-EXECABORT Transaction discarded because of previous errors.\r\n"));
    // Had any of these reached Redis as an unknown command, Redis would have counted an error.
    assert_eq!(info_field(&redis.addr(), "total_error_replies").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_gives_token_and_fence_and_the_lock_is_a_redis_key() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxy.client().await;
    let mut other = proxy.client().await;

    let (token, fence) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "report", "10000"]).await).expect("free lock");
    assert!(fence >= 1);
    assert_eq!(direct.cmd(&["HGET", "lock:report", "token"]).await, b(&format!("$32\r\n{token}\r\n")));
    let pttl = int(&direct.cmd(&["PTTL", "lock:report"]).await);
    assert!(pttl > 0 && pttl <= 10_000, "lease as TTL: {pttl}");

    // Held: an attempt without WAIT answers nil at once (RESP2 nil array, RESP3 null).
    assert_eq!(other.cmd(&["LOCK.ACQUIRE", "report", "10000"]).await, b("*-1\r\n"));
    let info = other.cmd(&["LOCK.INFO", "report"]).await;
    let expected = format!("*4\r\n$5\r\nfence\r\n:{fence}\r\n$12\r\nremaining_ms\r\n:");
    assert!(info.starts_with(expected.as_bytes()), "{info:?}");
    let mut resp3 = proxy.client().await;
    resp3.cmd(&["HELLO", "3"]).await;
    let info = resp3.cmd(&["LOCK.INFO", "report"]).await;
    let expected = format!("%2\r\n$5\r\nfence\r\n:{fence}\r\n$12\r\nremaining_ms\r\n:");
    assert!(info.starts_with(expected.as_bytes()), "{info:?}");
    assert_eq!(resp3.cmd(&["LOCK.INFO", "nothing"]).await, b("_\r\n"));
    assert_eq!(resp3.cmd(&["LOCK.ACQUIRE", "report", "100"]).await, b("_\r\n"));
    assert_eq!(other.cmd(&["LOCK.INFO", "nothing"]).await, b("*-1\r\n"));

    assert_eq!(holder.cmd(&["LOCK.RELEASE", "report", &token]).await, b(":1\r\n"));
    assert_eq!(direct.cmd(&["EXISTS", "lock:report"]).await, b(":0\r\n"));
    assert_eq!(holder.cmd(&["LOCK.RELEASE", "report", &token]).await, b(":0\r\n"));
    let (_, next) = acquired(&other.cmd(&["LOCK.ACQUIRE", "report", "10000"]).await).expect("released lock");
    assert!(next > fence);

    // A legacy client's SET NX on the same key excludes, and is excluded.
    assert_eq!(direct.cmd(&["SET", "lock:report", "x", "NX", "PX", "10000"]).await, b("$-1\r\n"));
    assert_eq!(direct.cmd(&["SET", "lock:legacy", "x", "NX", "PX", "10000"]).await, b("+OK\r\n"));
    assert_eq!(holder.cmd(&["LOCK.ACQUIRE", "legacy", "1000"]).await, b("*-1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_extend_with_a_wrong_token_are_refused() {
    let redis = RedisServer::start();
    let proxies = three(&redis, |_| {}).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxies[0].client().await;
    let mut intruder = proxies[1].client().await;
    let (token, _) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "door", "10000"]).await).unwrap();
    let wrong = "0".repeat(32);
    assert_eq!(intruder.cmd(&["LOCK.RELEASE", "door", &wrong]).await, b(":0\r\n"));
    assert_eq!(intruder.cmd(&["LOCK.EXTEND", "door", &wrong, "50000"]).await, b(":0\r\n"));
    assert_eq!(holder.cmd(&["LOCK.RELEASE", "other", &token]).await, b(":0\r\n"));
    assert_eq!(direct.cmd(&["HGET", "lock:door", "token"]).await, b(&format!("$32\r\n{token}\r\n")));
    assert!(int(&direct.cmd(&["PTTL", "lock:door"]).await) <= 10_000, "a refused extend changed the lease");

    assert_eq!(holder.cmd(&["LOCK.EXTEND", "door", &token, "50000"]).await, b(":1\r\n"));
    assert!(int(&direct.cmd(&["PTTL", "lock:door"]).await) > 10_000);
    // The token is the capability: whoever has it may release, on any instance.
    let mut third = proxies[2].client().await;
    assert_eq!(third.cmd(&["LOCK.RELEASE", "door", &token]).await, b(":1\r\n"));
    assert_eq!(direct.cmd(&["EXISTS", "lock:door"]).await, b(":0\r\n"));
}

#[derive(Default)]
struct Oracle {
    holder: Option<usize>,
    last_fence: i64,
    acquisitions: Vec<usize>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_clients_on_three_instances_never_hold_a_lock_together_and_fences_increase() {
    let redis = RedisServer::start();
    let proxies = three(&redis, |_| {}).await;
    let oracle = Arc::new(Mutex::new(Oracle::default()));
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for id in 0..15 {
        let mut c = proxies[id % 3].client().await;
        let oracle = oracle.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let reply = c.cmd(&["LOCK.ACQUIRE", "serial_generation:REAN", "10000", "WAIT", "15000"]).await;
                let (token, fence) = acquired(&reply).expect("acquired within the wait");
                {
                    let mut o = oracle.lock().unwrap();
                    assert_eq!(o.holder, None, "client {id} acquired while client {:?} held the lock", o.holder);
                    assert!(fence > o.last_fence, "fence {fence} after {}", o.last_fence);
                    o.holder = Some(id);
                    o.last_fence = fence;
                    o.acquisitions.push(id);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                // Give it up in the oracle first: the next holder may be told before our reply.
                oracle.lock().unwrap().holder = None;
                assert_eq!(c.cmd(&["LOCK.RELEASE", "serial_generation:REAN", &token]).await, b(":1\r\n"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let o = oracle.lock().unwrap();
    for id in 0..15 {
        assert!(o.acquisitions.contains(&id), "client {id} never got the lock");
    }
    println!("{} acquisitions by 15 clients on 3 instances in 3 s", o.acquisitions.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_holders_connection_releases_its_locks_at_once() {
    let redis = RedisServer::start();
    let proxies = three(&redis, |_| {}).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxies[0].client().await;
    let (_, first) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "job", "60000"]).await).unwrap();
    assert!(acquired(&holder.cmd(&["LOCK.ACQUIRE", "other", "60000"]).await).is_some());
    let mut waiter = proxies[1].client().await;
    waiter.send(&[b"LOCK.ACQUIRE", b"job", b"60000", b"WAIT", b"60000"]).await;
    drop(holder);
    // Well inside the 60 s lease: only the release at close can explain it.
    let (_, next) = acquired(&waiter.read().await).expect("the waiter got the lock");
    assert!(next > first);
    until(&mut direct, &["EXISTS", "lock:other"], "the holder's other lock is gone", |r| r == ":0\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_held_locks_and_ends_waits() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let elsewhere = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxy.client().await;
    assert!(acquired(&holder.cmd(&["LOCK.ACQUIRE", "nightly", "60000"]).await).is_some());
    let mut remote = elsewhere.client().await;
    assert!(acquired(&remote.cmd(&["LOCK.ACQUIRE", "remote", "60000"]).await).is_some());
    // Waits forever for a lock a client of another instance holds.
    let mut waiter = proxy.client().await;
    let before = evals(&redis).await;
    waiter.send(&[b"LOCK.ACQUIRE", b"remote", b"1000", b"WAIT", b"0"]).await;
    evals_above(&redis, before).await;
    proxy.shutdown().await;
    assert_eq!(waiter.read().await, b("-ERR sidecache is shutting down; the lock was not acquired\r\n"));
    assert_eq!(direct.cmd(&["EXISTS", "lock:nightly"]).await, b(":0\r\n"), "released at shutdown");
    assert_eq!(direct.cmd(&["EXISTS", "lock:remote"]).await, b(":1\r\n"), "the other instance's client keeps its lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_holds_a_lock_for_several_lease_lengths() {
    let redis = RedisServer::start();
    let proxies = three(&redis, |_| {}).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxies[0].client().await;
    let (token, fence) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "kept", "300", "KEEPALIVE"]).await).unwrap();
    assert!(acquired(&holder.cmd(&["LOCK.ACQUIRE", "unkept", "300"]).await).is_some());
    // Five leases long.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(direct.cmd(&["EXISTS", "lock:unkept"]).await, b(":0\r\n"), "a lease without KEEPALIVE ends");
    let mut other = proxies[1].client().await;
    assert_eq!(other.cmd(&["LOCK.ACQUIRE", "kept", "300"]).await, b("*-1\r\n"));
    let info = other.cmd(&["LOCK.INFO", "kept"]).await;
    assert!(info.starts_with(format!("*4\r\n$5\r\nfence\r\n:{fence}\r\n").as_bytes()), "{info:?}");
    assert_eq!(holder.cmd(&["LOCK.RELEASE", "kept", &token]).await, b(":1\r\n"));
    assert!(acquired(&other.cmd(&["LOCK.ACQUIRE", "kept", "300"]).await).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_keepalive_lease_is_reported_on_the_next_lock_call() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxy.client().await;
    let (token, _) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "stolen", "300", "KEEPALIVE"]).await).unwrap();
    // Someone rewrites the lock behind sidecache's back: the next renewal is refused.
    assert_eq!(direct.cmd(&["HSET", "lock:stolen", "token", "someone-else"]).await, b(":0\r\n"));
    until(&mut direct, &["EXISTS", "lock:stolen"], "the lease ran out without renewal", |r| r == ":0\r\n").await;
    let report = holder.cmd(&["LOCK.RELEASE", "stolen", &token]).await;
    assert!(report.starts_with(b"-LOCKLOST the lease of lock 'stolen' ("), "{report:?}");
    // Reported once; then the connection's LOCK.* calls run again.
    assert_eq!(holder.cmd(&["LOCK.RELEASE", "stolen", &token]).await, b(":0\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiter_on_another_instance_through_pubsub() {
    let redis = RedisServer::start();
    // A re-check every minute: within the test's patience only the announcement can wake.
    let proxies = three(&redis, |c| c.locks.recheck = Duration::from_secs(60)).await;
    let mut holder = proxies[0].client().await;
    let mut waiter = proxies[1].client().await;
    let mut handoffs = Vec::new();
    for round in 0..5 {
        let (token, fence) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "handoff", "60000"]).await).unwrap();
        let before = evals(&redis).await;
        waiter.send(&[b"LOCK.ACQUIRE", b"handoff", b"60000", b"WAIT", b"60000"]).await;
        evals_above(&redis, before).await;
        let released = Instant::now();
        assert_eq!(holder.cmd(&["LOCK.RELEASE", "handoff", &token]).await, b(":1\r\n"));
        let (next_token, next) = acquired(&waiter.read().await).expect("woken by the release");
        handoffs.push(released.elapsed());
        assert!(next > fence, "round {round}");
        assert_eq!(waiter.cmd(&["LOCK.RELEASE", "handoff", &next_token]).await, b(":1\r\n"));
    }
    handoffs.sort();
    println!("hand-off (release sent on one instance → waiter on another acquires): median {:?}", handoffs[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_release_message_only_costs_latency() {
    let redis = RedisServer::start();
    let proxies = three(&redis, |c| c.locks.recheck = Duration::from_millis(200)).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxies[0].client().await;
    assert!(acquired(&holder.cmd(&["LOCK.ACQUIRE", "quiet", "60000"]).await).is_some());
    let mut waiter = proxies[1].client().await;
    let before = evals(&redis).await;
    waiter.send(&[b"LOCK.ACQUIRE", b"quiet", b"1000", b"WAIT", b"15000"]).await;
    evals_above(&redis, before).await;
    // Gone without an announcement (as if the message were lost): the re-check finds it free.
    assert_eq!(direct.cmd(&["DEL", "lock:quiet"]).await, b(":1\r\n"));
    assert!(acquired(&waiter.read().await).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_gets_the_lock_when_the_holders_lease_runs_out() {
    let redis = RedisServer::start();
    let proxies = three(&redis, |c| c.locks.recheck = Duration::from_secs(60)).await;
    let mut holder = proxies[0].client().await;
    let (_, fence) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "crashed", "500"]).await).unwrap();
    // The holder stays connected and silent; nobody announces anything.
    let mut waiter = proxies[1].client().await;
    let reply = waiter.cmd(&["LOCK.ACQUIRE", "crashed", "1000", "WAIT", "15000"]).await;
    let (_, next) = acquired(&reply).expect("acquired when the lease ended");
    assert!(next > fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_one_instance_are_served_in_arrival_order() {
    let redis = RedisServer::start();
    let holder_proxy = Proxy::start(&redis).await;
    let waiters_proxy = process(&redis, "recheck = \"200ms\"").await;
    let mut holder = holder_proxy.client().await;
    let (token, _) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "queue", "60000"]).await).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let mut c = Client::connect(&waiters_proxy.addr.to_string()).await;
        c.send(&[b"LOCK.ACQUIRE", b"queue", b"60000", b"WAIT", b"15000"]).await;
        let queued = (i + 1) as f64;
        eventually("the waiter is queued", || async {
            metric(waiters_proxy.admin, "sidecache_lock_waiters").await == queued
        })
        .await;
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let (token, _) = acquired(&c.read().await).expect("acquired in turn");
            order.lock().unwrap().push(i);
            assert_eq!(c.cmd(&["LOCK.RELEASE", "queue", &token]).await, b(":1\r\n"));
        }));
    }
    assert_eq!(holder.cmd(&["LOCK.RELEASE", "queue", &token]).await, b(":1\r\n"));
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_client_disconnects_stops_waiting() {
    let redis = RedisServer::start();
    let holder_proxy = Proxy::start(&redis).await;
    let waiters_proxy = process(&redis, "").await;
    let addr = waiters_proxy.addr.to_string();
    let mut holder = holder_proxy.client().await;
    let (token, _) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "leaving", "60000"]).await).unwrap();
    let mut first = Client::connect(&addr).await;
    first.send(&[b"LOCK.ACQUIRE", b"leaving", b"60000", b"WAIT", b"0"]).await;
    eventually("first waiter queued", || async { metric(waiters_proxy.admin, "sidecache_lock_waiters").await == 1.0 })
        .await;
    let mut second = Client::connect(&addr).await;
    second.send(&[b"LOCK.ACQUIRE", b"leaving", b"60000", b"WAIT", b"15000"]).await;
    eventually("second waiter queued", || async { metric(waiters_proxy.admin, "sidecache_lock_waiters").await == 2.0 })
        .await;
    drop(first);
    eventually("the first waiter left the queue", || async {
        metric(waiters_proxy.admin, "sidecache_lock_waiters").await == 1.0
    })
    .await;
    assert_eq!(holder.cmd(&["LOCK.RELEASE", "leaving", &token]).await, b(":1\r\n"));
    // Had the first waiter (WAIT 0: forever) kept its place, the second would time out.
    assert!(acquired(&second.read().await).is_some());
    assert_eq!(metric(waiters_proxy.admin, "sidecache_lock_waiters").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_next_from_fifteen_clients_on_three_instances_gives_exactly_one_to_n() {
    let redis = RedisServer::start();
    let proxies = three(&redis, |_| {}).await;
    let mut tasks = Vec::new();
    for id in 0..15 {
        let mut c = proxies[id % 3].client().await;
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..40 {
                got.push(int(&c.cmd(&["SERIAL.NEXT", "serial_count:REAN:2024-06-01"]).await));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "one client's numbers increase");
        all.extend(got);
    }
    all.sort();
    assert_eq!(all, (1..=600).collect::<Vec<i64>>());
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd(&["GET", "serial:serial_count:REAN:2024-06-01"]).await, b("$3\r\n600\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_next_count_reserves_a_block_and_returns_its_last_number() {
    let redis = RedisServer::start();
    let proxies = three(&redis, |_| {}).await;
    let mut a = proxies[0].client().await;
    let mut b2 = proxies[1].client().await;
    assert_eq!(a.cmd(&["SERIAL.NEXT", "invoice", "COUNT", "10"]).await, b(":10\r\n"));
    assert_eq!(b2.cmd(&["SERIAL.NEXT", "invoice"]).await, b(":11\r\n"));
    assert_eq!(b2.cmd(&["serial.next", "invoice", "count", "5"]).await, b(":16\r\n"));
    assert_eq!(a.cmd(&["SERIAL.NEXT", "other"]).await, b(":1\r\n"));
}

/// Counters past 2^53 (Lua numbers are doubles, exact only below it): every number is still
/// handed out once, and a repair past such a number is exact too. Serial numbers with a date
/// in front have 17 digits and more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_numbers_and_fences_past_two_to_the_53_are_exact() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    let mut direct = Client::connect(&redis.addr()).await;
    let big: i64 = 1 << 53;
    direct.cmd(&["SET", "serial:big", &big.to_string()]).await;
    for i in 1..=4 {
        assert_eq!(int(&c.cmd(&["SERIAL.NEXT", "big"]).await), big + i, "number {i} after 2^53");
    }
    assert_eq!(int(&c.cmd(&["SERIAL.NEXT", "big", "COUNT", "3"]).await), big + 7);
    // Redis loses the counter: the repair continues exactly after the last number handed out.
    direct.cmd(&["SET", "serial:big", "5"]).await;
    assert_eq!(int(&c.cmd(&["SERIAL.NEXT", "big"]).await), big + 8);
    assert_eq!(direct.cmd(&["GET", "serial:big"]).await, b(&format!("$16\r\n{}\r\n", big + 8)));
    // Past i64::MAX: Redis's own error, without the script's name.
    direct.cmd(&["SET", "serial:top", &i64::MAX.to_string()]).await;
    assert_eq!(c.cmd(&["SERIAL.NEXT", "top"]).await, b("-ERR increment or decrement would overflow\r\n"));

    direct.cmd(&["SET", "sidecache:lock:fence", &big.to_string()]).await;
    let mut last = big;
    for i in 1..=4 {
        let (token, fence) = acquired(&c.cmd(&["LOCK.ACQUIRE", "big", "10000"]).await).expect("free lock");
        assert_eq!(fence, big + i, "fence {i} after 2^53");
        let info = c.cmd(&["LOCK.INFO", "big"]).await;
        assert!(info.starts_with(format!("*4\r\n$5\r\nfence\r\n:{fence}\r\n").as_bytes()), "{info:?}");
        assert_eq!(c.cmd(&["LOCK.RELEASE", "big", &token]).await, b(":1\r\n"));
        last = fence;
    }
    direct.cmd(&["DEL", "sidecache:lock:fence"]).await;
    let (_, fence) = acquired(&c.cmd(&["LOCK.ACQUIRE", "big", "10000"]).await).expect("free lock");
    assert_eq!(fence, last + 1, "a lost fence counter continues after the last fence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_counter_that_went_back_is_repaired_and_counted() {
    let redis = RedisServer::start();
    let proxy = process(&redis, "").await;
    let mut c = Client::connect(&proxy.addr.to_string()).await;
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(c.cmd(&["SERIAL.NEXT", "order", "COUNT", "100"]).await, b(":100\r\n"));
    assert_eq!(metric(proxy.admin, "sidecache_serial_regressions_total").await, 0.0);
    // Redis loses the counter (a restart without persistence).
    assert_eq!(direct.cmd(&["DEL", "serial:order"]).await, b(":1\r\n"));
    assert_eq!(c.cmd(&["SERIAL.NEXT", "order"]).await, b(":101\r\n"));
    assert_eq!(direct.cmd(&["GET", "serial:order"]).await, b("$3\r\n101\r\n"));
    assert_eq!(c.cmd(&["SERIAL.NEXT", "order", "COUNT", "2"]).await, b(":103\r\n"));
    assert_eq!(metric(proxy.admin, "sidecache_serial_regressions_total").await, 1.0);
    assert_eq!(metric(proxy.admin, "sidecache_serial_numbers_issued_total").await, 103.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_metrics_count_outcomes_waits_and_held_locks() {
    let redis = RedisServer::start();
    let proxy = process(&redis, "").await;
    let addr = proxy.addr.to_string();
    let mut a = Client::connect(&addr).await;
    let mut b2 = Client::connect(&addr).await;
    let (token, _) = acquired(&a.cmd(&["LOCK.ACQUIRE", "m", "60000"]).await).unwrap();
    assert_eq!(b2.cmd(&["LOCK.ACQUIRE", "m", "60000"]).await, b("*-1\r\n"));
    assert_eq!(b2.cmd(&["LOCK.ACQUIRE", "m", "60000", "WAIT", "50"]).await, b("*-1\r\n"));
    assert_eq!(metric(proxy.admin, "sidecache_locks_held").await, 1.0);
    assert_eq!(a.cmd(&["LOCK.RELEASE", "m", &token]).await, b(":1\r\n"));
    let admin = proxy.admin;
    let series = |o: &str| format!("sidecache_lock_acquire_total{{outcome=\"{o}\"}}");
    assert_eq!(metric(admin, &series("acquired")).await, 1.0);
    assert_eq!(metric(admin, &series("timeout")).await, 2.0);
    assert_eq!(metric(admin, &series("error")).await, 0.0);
    assert_eq!(metric(admin, "sidecache_lock_wait_seconds_count").await, 3.0);
    assert_eq!(metric(admin, "sidecache_locks_held").await, 0.0);
    assert_eq!(metric(admin, "sidecache_lock_leases_lost_total").await, 0.0);
    let (_, body) = http_get(admin, "/metrics").await;
    assert!(body.contains("sidecache_lock_wait_seconds_bucket{le=\"0.001\"}"), "a histogram with buckets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarting_under_held_locks_gives_clear_errors_and_a_correct_state_after() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| c.upstream.max_backoff = Duration::from_millis(200)).await;
    let mut holder = proxy.client().await;
    let mut other = proxy.client().await;
    let (_, fence) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "restart", "1000", "KEEPALIVE"]).await).unwrap();
    assert_eq!(other.cmd(&["SERIAL.NEXT", "restart", "COUNT", "50"]).await, b(":50\r\n"));

    redis.kill();
    for args in [&["LOCK.INFO", "restart"][..], &["SERIAL.NEXT", "restart"], &["LOCK.ACQUIRE", "x", "100"]] {
        let reply = other.cmd(args).await;
        assert!(reply.starts_with(b"-ERR sidecache: upstream"), "{args:?}: {reply:?}");
    }
    redis.restart();

    // Redis came back empty: the holder's renewal fails and the holder is told.
    let lost = "the holder hears its lease was lost";
    until(&mut holder, &["LOCK.INFO", "restart"], lost, |r| r.starts_with(b"-LOCKLOST")).await;
    // Fences and serials keep going up although Redis forgot its counters.
    let reply =
        until(&mut other, &["LOCK.ACQUIRE", "restart", "1000"], "locks work again", |r| !r.starts_with(b"-")).await;
    let (_, next) = acquired(&reply).expect("the lost lock is free");
    assert!(next > fence, "fence {next} after {fence}");
    assert_eq!(other.cmd(&["SERIAL.NEXT", "restart"]).await, b(":51\r\n"));
    until(&mut holder, &["PING"], "the proxy serves again", |r| r == "+PONG\r\n").await;
}

#[tokio::test]
async fn serial_counters_get_the_ttl_policy_default() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| {
        c.ttl.rules = vec![sidecache::ttl::TtlRuleConfig {
            name: Some("serial".into()),
            prefix: "serial:".into(),
            db: None,
            default: std::time::Duration::from_secs(3600),
            max: None,
        }];
    })
    .await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["SERIAL.NEXT", "REAN"]).await, b(":1\r\n"));
    let mut direct = Client::connect(&redis.addr()).await;
    let ttl = direct.cmd(&["PTTL", "serial:REAN"]).await;
    let ms: i64 = std::str::from_utf8(&ttl[1..ttl.len() - 2]).unwrap().parse().unwrap();
    assert!(ms > 3_500_000 && ms <= 3_600_000, "the counter got the serial: rule's 1h default: {ms} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_named_with_another_lock_leaves_its_own_lock_tied_to_the_connection() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    // KEEPALIVE keeps renewing after a release and an extend that name another lock.
    let mut a = proxy.client().await;
    let (token, fence) = acquired(&a.cmd(&["LOCK.ACQUIRE", "kept", "300", "KEEPALIVE"]).await).unwrap();
    assert_eq!(a.cmd(&["LOCK.RELEASE", "elsewhere", &token]).await, b(":0\r\n"));
    assert_eq!(a.cmd(&["LOCK.EXTEND", "elsewhere", &token, "300"]).await, b(":0\r\n"));
    tokio::time::sleep(Duration::from_millis(1000)).await; // more than three leases
    let info = a.cmd(&["LOCK.INFO", "kept"]).await;
    assert!(info.starts_with(format!("*4\r\n$5\r\nfence\r\n:{fence}\r\n").as_bytes()), "renewal stopped: {info:?}");
    // Its connection closing still releases it.
    let mut b_ = proxy.client().await;
    let (token2, _) = acquired(&b_.cmd(&["LOCK.ACQUIRE", "tied", "60000"]).await).unwrap();
    assert_eq!(b_.cmd(&["LOCK.EXTEND", "elsewhere", &token2, "1000"]).await, b(":0\r\n"));
    drop(b_);
    let addr = redis.addr();
    eventually("the closed connection's lock is released", || {
        let addr = addr.clone();
        async move { Client::connect(&addr).await.cmd(&["EXISTS", "lock:tied"]).await == b(":0\r\n") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_after_a_waiting_acquire_run_once_it_is_answered() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxy.client().await;
    let (token, _) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "po", "60000"]).await).unwrap();

    // As a blocking command holds a Redis client's pipeline, a waiting acquire holds the rest.
    let mut c = proxy.client().await;
    let before = evals(&redis).await;
    let mut pipeline = encode(&[b"LOCK.ACQUIRE", b"po", b"10000", b"WAIT", b"10000"]);
    pipeline.extend(encode(&[b"SET", b"po:data", b"written-under-the-lock"]));
    pipeline.extend(encode(&[b"SERIAL.NEXT", b"po"]));
    c.send_raw(&pipeline).await;
    evals_above(&redis, before).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // room for a SET sent too early to run
    assert_eq!(direct.cmd(&["GET", "po:data"]).await, b("$-1\r\n"), "the SET ran before the lock was taken");
    assert_eq!(direct.cmd(&["EXISTS", "serial:po"]).await, b(":0\r\n"));
    assert_eq!(holder.cmd(&["LOCK.RELEASE", "po", &token]).await, b(":1\r\n"));
    let (token, _) = acquired(&c.read().await).expect("the waiter gets the lock");
    assert_eq!(c.read().await, b("+OK\r\n"));
    assert_eq!(c.read().await, b(":1\r\n"));
    assert_eq!(direct.cmd(&["GET", "po:data"]).await, b("$22\r\nwritten-under-the-lock\r\n"));

    // A wait that runs out lets the rest run after its nil, in order.
    let mut late = proxy.client().await;
    let mut pipeline = encode(&[b"LOCK.ACQUIRE", b"po", b"1000", b"WAIT", b"300"]);
    pipeline.extend(encode(&[b"INCR", b"po:after"]));
    late.send_raw(&pipeline).await;
    assert_eq!(late.read().await, b("*-1\r\n"));
    assert_eq!(late.read().await, b(":1\r\n"));

    // A client that leaves while waiting: what it pipelined after never runs.
    let mut gone = proxy.client().await;
    let before = evals(&redis).await;
    let mut pipeline = encode(&[b"LOCK.ACQUIRE", b"po", b"1000", b"WAIT", b"0"]);
    pipeline.extend(encode(&[b"SET", b"po:gone", b"1"]));
    gone.send_raw(&pipeline).await;
    evals_above(&redis, before).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(200)).await; // room for the session to end
    assert_eq!(c.cmd(&["LOCK.RELEASE", "po", &token]).await, b(":1\r\n"));
    tokio::time::sleep(Duration::from_millis(200)).await; // room for a waiter left behind to take it
    assert_eq!(direct.cmd(&["EXISTS", "lock:po", "po:gone"]).await, b(":0\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_a_client_waiting_for_a_lock_and_resp2_subscribers_are_refused_as_redis_refuses() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut holder = proxy.client().await;
    let (token, _) = acquired(&holder.cmd(&["LOCK.ACQUIRE", "sub", "60000"]).await).unwrap();

    // RESP3: a message published while the client waits arrives at once, as for BLPOP.
    let mut c = proxy.client().await;
    c.cmd(&["HELLO", "3"]).await;
    assert_eq!(c.cmd(&["SUBSCRIBE", "news"]).await, b(">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"));
    let before = evals(&redis).await;
    c.send(&[b"LOCK.ACQUIRE", b"sub", b"1000", b"WAIT", b"10000"]).await;
    evals_above(&redis, before).await;
    assert_eq!(direct.cmd(&["PUBLISH", "news", "hello"]).await, b(":1\r\n"));
    assert_eq!(c.read().await, b(">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"));
    assert_eq!(holder.cmd(&["LOCK.RELEASE", "sub", &token]).await, b(":1\r\n"));
    assert!(acquired(&c.read().await).is_some());

    // RESP2 subscribed mode: sidecache's commands are refused in Redis's words for its own.
    let mut d2 = Client::connect(&redis.addr()).await;
    let mut p2 = proxy.client().await;
    for c in [&mut d2, &mut p2] {
        c.cmd(&["SUBSCRIBE", "news"]).await;
    }
    let get = d2.cmd(&["GET", "k"]).await;
    assert_eq!(p2.cmd(&["GET", "k"]).await, get);
    for name in ["lock.acquire", "serial.next"] {
        let args = if name == "serial.next" { vec![name, "s"] } else { vec![name, "s", "1000"] };
        let expected = String::from_utf8_lossy(&get).replace("'get'", &format!("'{name}'"));
        assert_eq!(p2.cmd(&args).await, b(&expected));
    }
    assert_eq!(direct.cmd(&["EXISTS", "serial:s"]).await, b(":0\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_commands_are_judged_by_the_clients_acl_user() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let users = [
        ("noscript", "~* +@all -@scripting"),
        ("appkeys", "~app:* +@all"),
        ("readlocks", "~app:* %R~lock:* %R~serial:* +@all"),
        ("full", "~* +@all"),
    ];
    for (user, rules) in users {
        let mut args = vec!["ACL", "SETUSER", user, "on", ">pw"];
        args.extend(rules.split(' '));
        assert_eq!(direct.cmd(&args).await, b("+OK\r\n"));
    }
    for (user, _) in &users[..3] {
        let mut c = proxy.client().await;
        assert_eq!(c.cmd(&["AUTH", user, "pw"]).await, b("+OK\r\n"));
        for args in [
            &["LOCK.ACQUIRE", "acl", "60000"][..],
            &["LOCK.INFO", "acl"],
            &["LOCK.RELEASE", "acl", "t"],
            &["SERIAL.NEXT", "acl"],
        ] {
            let reply = c.cmd(args).await;
            assert!(reply.starts_with(b"-NOPERM "), "{user}: {args:?} answered {reply:?}");
        }
        // The same user on Redis may not run the scripts either.
        let mut d = Client::connect(&redis.addr()).await;
        d.cmd(&["AUTH", user, "pw"]).await;
        assert!(d.cmd(&["EVAL", "return 0", "1", "lock:acl"]).await.starts_with(b"-NOPERM "));
    }
    assert_eq!(direct.cmd(&["EXISTS", "lock:acl", "serial:acl", "sidecache:lock:fence"]).await, b(":0\r\n"));
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["AUTH", "full", "pw"]).await, b("+OK\r\n"));
    assert!(acquired(&c.cmd(&["LOCK.ACQUIRE", "acl", "60000"]).await).is_some());
    assert_eq!(c.cmd(&["SERIAL.NEXT", "acl"]).await, b(":1\r\n"));
}

#[tokio::test]
async fn legacy_locks_and_counters_set_by_others_answer_as_documented() {
    let redis = RedisServer::start();
    let proxy = process(&redis, "").await;
    let mut c = Client::connect(&proxy.addr.to_string()).await;
    let mut direct = Client::connect(&redis.addr()).await;
    // A lock a legacy client took with SET NX: held, with no fence; no token of ours holds it.
    assert_eq!(direct.cmd(&["SET", "lock:old", "someone", "NX", "PX", "60000"]).await, b("+OK\r\n"));
    let info = c.cmd(&["LOCK.INFO", "old"]).await;
    assert!(info.starts_with(b"*4\r\n$5\r\nfence\r\n:0\r\n$12\r\nremaining_ms\r\n:"), "{info:?}");
    assert_eq!(c.cmd(&["LOCK.RELEASE", "old", "someone"]).await, b(":0\r\n"));
    assert_eq!(c.cmd(&["LOCK.EXTEND", "old", "someone", "1000"]).await, b(":0\r\n"));
    assert_eq!(c.cmd(&["LOCK.ACQUIRE", "old", "1000"]).await, b("*-1\r\n"));
    assert_eq!(direct.cmd(&["GET", "lock:old"]).await, b("$7\r\nsomeone\r\n"));
    // A counter someone set below zero counts on from there, as INCR would: this instance
    // handed out no number of it, so nothing went backwards.
    assert_eq!(direct.cmd(&["SET", "serial:neg", "-5"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["SERIAL.NEXT", "neg"]).await, b(":-4\r\n"));
    assert_eq!(c.cmd(&["SERIAL.NEXT", "neg", "COUNT", "2"]).await, b(":-2\r\n"));
    assert_eq!(metric(proxy.admin, "sidecache_serial_regressions_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_ends_on_time_while_redis_does_not_answer_and_a_late_success_is_given_back() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await; // command_timeout: the default 10 s
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["LOCK.INFO", "stop"]).await, b("*-1\r\n")); // the lock connection is up
    redis.signal(libc::SIGSTOP);
    let start = Instant::now();
    let reply = c.cmd(&["LOCK.ACQUIRE", "stop", "60000", "WAIT", "300"]).await;
    let waited = start.elapsed();
    redis.signal(libc::SIGCONT);
    assert_eq!(reply, b("*-1\r\n"));
    assert!(waited < Duration::from_secs(5), "WAIT 300 answered after {waited:?}, not when it ran out");
    // Redis runs the attempt once it resumes; the lock it took is given back, not left to its lease.
    // Three EVALs: LOCK.INFO, the attempt, and the release of what it took.
    let r = &redis;
    eventually("the late attempt's lock is given back", || async move {
        evals(r).await >= 3 && Client::connect(&r.addr()).await.cmd(&["EXISTS", "lock:stop"]).await == b(":0\r\n")
    })
    .await;
    assert!(acquired(&c.cmd(&["LOCK.ACQUIRE", "stop", "1000"]).await).is_some());
}
