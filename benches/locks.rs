//! Lock benchmarks, end to end over loopback: a real `redis-server` and sidecache instances
//! in-process, talked to with raw RESP.
//!
//! * `uncontended`: one client runs `LOCK.ACQUIRE` + `LOCK.RELEASE` on distinct names back to
//!   back; reports pairs per second and the p50/p99 of one pair. For scale, the same loop
//!   straight to Redis with `SET … NX PX` + `DEL` (what a minimal, unsafe lock library does).
//! * `handoff`: a holder on instance A, a waiter (`WAIT`) on instance B; the time from sending
//!   `LOCK.RELEASE` on A until B's `LOCK.ACQUIRE` reply arrives, p50/p99. The waiter is known to
//!   wait (its first attempt is seen in Redis's `INFO commandstats`) before the clock starts.
//!   Polling lock libraries wait their retry interval instead, typically 50–200 ms.
//!
//! Each is run in `ROUNDS` rounds (default 5); the figures are the medians over rounds.
//! Run: `cargo bench --bench locks` (`ROUNDS=3 PAIRS=1000 HANDOFFS=50` to shorten).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

fn token(reply: &[u8]) -> String {
    let text = std::str::from_utf8(reply).expect("utf-8");
    assert!(text.starts_with("*2\r\n$32\r\n"), "not acquired: {text:?}");
    text.split("\r\n").nth(2).expect("token").to_string()
}

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

struct Round {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn round(mut samples: Vec<Duration>, total: Duration) -> Round {
    samples.sort();
    Round {
        per_second: samples.len() as f64 / total.as_secs_f64(),
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
    }
}

fn report(name: &str, rounds: Vec<Round>) {
    let rate = median(rounds.iter().map(|r| r.per_second).collect());
    let p50 = median(rounds.iter().map(|r| r.p50).collect());
    let p99 = median(rounds.iter().map(|r| r.p99).collect());
    println!(
        "{name:<48} {rate:>9.0}/s   p50 {:>8.1} µs   p99 {:>8.1} µs",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
}

async fn uncontended(client: &mut Client, pairs: usize, round_no: usize) -> Round {
    let mut samples = Vec::with_capacity(pairs);
    let start = Instant::now();
    for i in 0..pairs {
        let name = format!("bench:{round_no}:{i}");
        let t = Instant::now();
        let reply = client.cmd(&["LOCK.ACQUIRE", &name, "10000"]).await;
        let released = client.cmd(&["LOCK.RELEASE", &name, &token(&reply)]).await;
        samples.push(t.elapsed());
        assert_eq!(released.as_ref(), b":1\r\n");
    }
    round(samples, start.elapsed())
}

async fn direct_set_del(client: &mut Client, pairs: usize, round_no: usize) -> Round {
    let mut samples = Vec::with_capacity(pairs);
    let start = Instant::now();
    for i in 0..pairs {
        let name = format!("lock:direct:{round_no}:{i}");
        let t = Instant::now();
        assert_eq!(client.cmd(&["SET", &name, "x", "NX", "PX", "10000"]).await.as_ref(), b"+OK\r\n");
        assert_eq!(client.cmd(&["DEL", &name]).await.as_ref(), b":1\r\n");
        samples.push(t.elapsed());
    }
    round(samples, start.elapsed())
}

async fn handoff(redis: &RedisServer, holder: &mut Client, waiter: &mut Client, n: usize) -> Round {
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let held = token(&holder.cmd(&["LOCK.ACQUIRE", "handoff", "60000"]).await);
        let before = evals(redis).await;
        waiter.send(&[b"LOCK.ACQUIRE", b"handoff", b"60000", b"WAIT", b"60000"]).await;
        while evals(redis).await <= before {
            tokio::task::yield_now().await;
        }
        let t = Instant::now();
        holder.send(&[b"LOCK.RELEASE", b"handoff", held.as_bytes()]).await;
        let got = waiter.read().await;
        samples.push(t.elapsed());
        assert_eq!(holder.read().await.as_ref(), b":1\r\n");
        let next = token(&got);
        assert_eq!(waiter.cmd(&["LOCK.RELEASE", "handoff", &next]).await.as_ref(), b":1\r\n");
    }
    // The rate here includes the setup of every hand-off; only the latencies are meaningful.
    round(samples, start.elapsed())
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench`-less arguments: only build then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rounds = env("ROUNDS", 5);
    let pairs = env("PAIRS", 2000);
    let handoffs = env("HANDOFFS", 100);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let redis = RedisServer::start();
        // Re-checks once a minute: every hand-off below is the pub/sub wake-up.
        let edit = |c: &mut sidecache::Config| c.locks.recheck = Duration::from_secs(60);
        let a = Proxy::start_with(&redis, edit).await;
        let b = Proxy::start_with(&redis, edit).await;
        let mut client = a.client().await;
        let mut direct = Client::connect(&redis.addr()).await;
        let mut holder = a.client().await;
        let mut waiter = b.client().await;
        // Warm-up: connections, script cache.
        uncontended(&mut client, 200, usize::MAX).await;
        handoff(&redis, &mut holder, &mut waiter, 10).await;

        let (mut sc, mut dr, mut ho) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            sc.push(uncontended(&mut client, pairs, r).await);
            dr.push(direct_set_del(&mut direct, pairs, r).await);
            ho.push(handoff(&redis, &mut holder, &mut waiter, handoffs).await);
        }
        println!("medians of {rounds} rounds ({pairs} pairs, {handoffs} hand-offs per round), loopback:");
        report("uncontended LOCK.ACQUIRE+LOCK.RELEASE (sidecache)", sc);
        report("uncontended SET NX PX + DEL (direct Redis)", dr);
        let rates = ho.iter().map(|r| (r.p50, r.p99)).collect::<Vec<_>>();
        let p50 = median(rates.iter().map(|r| r.0).collect());
        let p99 = median(rates.iter().map(|r| r.1).collect());
        println!(
            "{:<48}            p50 {:>8.1} µs   p99 {:>8.1} µs",
            "hand-off: release on A → waiter on B acquires",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    });
}
