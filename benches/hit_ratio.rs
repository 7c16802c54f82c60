//! Hit ratio of the near-cache's store against the alternatives, on a skewed workload with a scan.
//!
//! The workload: Zipf (exponent 0.99) over 1,000,000 keys; every request is a `get`, and a miss
//! is followed by an `insert` (what a read-through cache does). All entries weigh the same, so
//! the caches are bounded by entry count and the comparison is about the admission and eviction
//! policy only. Capacities: 1% and 10% of the keys.
//!
//! Each trace is 1,000,000 warm-up requests (not counted) and 4,000,000 measured Zipf requests.
//! The scan variants add a one-pass scan of 10× capacity never-seen keys in the middle of the
//! measured part: `block` as one run (a batch job that reads everything once), `mixed`
//! interleaved one scan key after each Zipf request. Hit ratios count Zipf requests only (scan
//! keys cannot hit), so "steady" compares the same requests with and without the scan. "window"
//! is the hit ratio over the 10× capacity Zipf requests from the scan's start, where a scan does
//! its damage; the whole-trace figure dilutes it.
//!
//! Crates: `quick_cache` (the product's store, `sync::Cache` as used), `moka` (the fallback,
//! `sync::Cache`), and `lru` as the plain-LRU baseline. Keys are scrambled ranks; the Zipf sampler
//! is an inverse CDF over a seeded `fastrand` generator, so every run sees the same trace.
//!
//! Run: `cargo bench --bench hit_ratio` (prints a Markdown table; about a minute). It is a plain
//! `main`, not a criterion bench: it measures ratios, not time, though ops/s are shown too.

use std::num::NonZeroUsize;
use std::time::Instant;

const KEYS: usize = 1_000_000;
const EXPONENT: f64 = 0.99;
const WARMUP: usize = 1_000_000;
const MEASURED: usize = 4_000_000;
const SEED: u64 = 0x5eed_cace;
/// The scan is this many times the cache capacity.
const SCAN_FACTOR: usize = 10;

/// The read-through operations the bench needs from a cache.
trait Policy {
    fn name(&self) -> &'static str;
    /// Looks `key` up; on a miss inserts it. Returns whether it was a hit.
    fn access(&mut self, key: u64) -> bool;
}

struct QuickCache(quick_cache::sync::Cache<u64, u64>);

impl Policy for QuickCache {
    fn name(&self) -> &'static str {
        "quick_cache 0.7 (sync)"
    }
    fn access(&mut self, key: u64) -> bool {
        if self.0.get(&key).is_some() {
            return true;
        }
        self.0.insert(key, key);
        false
    }
}

struct Moka(moka::sync::Cache<u64, u64>);

impl Policy for Moka {
    fn name(&self) -> &'static str {
        "moka 0.12 (sync)"
    }
    fn access(&mut self, key: u64) -> bool {
        if self.0.get(&key).is_some() {
            return true;
        }
        self.0.insert(key, key);
        false
    }
}

struct Lru(lru::LruCache<u64, u64>);

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru 0.16 (plain LRU)"
    }
    fn access(&mut self, key: u64) -> bool {
        if self.0.get(&key).is_some() {
            return true;
        }
        self.0.put(key, key);
        false
    }
}

fn caches(capacity: usize) -> Vec<Box<dyn Policy>> {
    vec![
        Box::new(QuickCache(quick_cache::sync::Cache::new(capacity))),
        Box::new(Moka(moka::sync::Cache::new(capacity as u64))),
        Box::new(Lru(lru::LruCache::new(NonZeroUsize::new(capacity).expect("capacity > 0")))),
    ]
}

/// A bijection on u64 (odd multiplier, xor-shift), so hot keys are not small adjacent integers.
fn scramble(rank: u64) -> u64 {
    let x = rank.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// Zipf ranks by inverse CDF: `cdf[k]` is P(rank <= k).
fn zipf_trace(len: usize) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(KEYS);
    let mut sum = 0.0;
    for k in 1..=KEYS {
        sum += 1.0 / (k as f64).powf(EXPONENT);
        cdf.push(sum);
    }
    for c in &mut cdf {
        *c /= sum;
    }
    let mut rng = fastrand::Rng::with_seed(SEED);
    (0..len)
        .map(|_| {
            let u = rng.f64();
            let rank = cdf.partition_point(|&c| c < u).min(KEYS - 1);
            scramble(rank as u64)
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Scan {
    None,
    Block,
    Mixed,
}

impl Scan {
    fn as_str(self) -> &'static str {
        match self {
            Scan::None => "none",
            Scan::Block => "block",
            Scan::Mixed => "mixed",
        }
    }
}

struct Outcome {
    /// Hit ratio over all measured Zipf requests.
    steady: f64,
    /// Hit ratio over the Zipf requests of the scan window.
    window: f64,
    /// Cache operations (get, plus insert on a miss) per second, scan keys included.
    ops_per_sec: f64,
}

/// Replays `trace` through `cache` with the given scan.
fn run(cache: &mut dyn Policy, trace: &[u64], capacity: usize, scan: Scan) -> Outcome {
    let scan_len = SCAN_FACTOR * capacity;
    let mid = MEASURED / 2;
    let window = mid..mid + scan_len;
    // Never-seen keys: scrambled ranks beyond the Zipf key space.
    let scan_key = |i: usize| scramble((KEYS + i) as u64);
    let (mut hits, mut window_hits, mut accesses) = (0u64, 0u64, 0u64);
    let mut scanned = 0usize;
    let started = Instant::now();
    for (i, &key) in trace.iter().enumerate() {
        let measured = i.checked_sub(WARMUP);
        if scan == Scan::Block && measured == Some(mid) {
            for s in 0..scan_len {
                cache.access(scan_key(s));
            }
            accesses += scan_len as u64;
        }
        let hit = cache.access(key);
        accesses += 1;
        if let Some(m) = measured {
            hits += hit as u64;
            if window.contains(&m) {
                window_hits += hit as u64;
                if scan == Scan::Mixed && scanned < scan_len {
                    cache.access(scan_key(scanned));
                    scanned += 1;
                    accesses += 1;
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Outcome {
        steady: hits as f64 / MEASURED as f64,
        window: window_hits as f64 / scan_len as f64,
        ops_per_sec: accesses as f64 / elapsed,
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn points(x: f64) -> String {
    format!("{:+.1}", 100.0 * x)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass other flags. Only run
    // the (long) measurement when invoked as a bench.
    if !std::env::args().any(|a| a == "--bench") {
        println!("hit_ratio: run with `cargo bench --bench hit_ratio`");
        return;
    }
    let trace = zipf_trace(WARMUP + MEASURED);
    println!(
        "Zipf {EXPONENT} over {KEYS} keys, {WARMUP} warm-up + {MEASURED} measured requests, \
         scan = {SCAN_FACTOR}x capacity never-seen keys in the middle\n"
    );
    println!(
        "| capacity | cache | hit ratio, no scan | with block scan (cost) | with mixed scan (cost) | \
         scan window, no scan | window with block scan (cost) | window with mixed scan (cost) | Mops/s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut verdicts = Vec::new();
    for percent in [1usize, 10] {
        let capacity = KEYS * percent / 100;
        let mut steady = Vec::new();
        for make in 0..3 {
            let mut outcomes = Vec::new();
            for scan in [Scan::None, Scan::Block, Scan::Mixed] {
                let mut cache = caches(capacity).swap_remove(make);
                let o = run(cache.as_mut(), &trace, capacity, scan);
                eprintln!(
                    "{percent}% {:<24} scan={:<5} steady={} window={} {:.2} Mops/s",
                    cache.name(),
                    scan.as_str(),
                    pct(o.steady),
                    pct(o.window),
                    o.ops_per_sec / 1e6
                );
                outcomes.push((cache.name(), o));
            }
            let (name, none) = &outcomes[0];
            let (block, mixed) = (&outcomes[1].1, &outcomes[2].1);
            let ops = outcomes.iter().map(|(_, o)| o.ops_per_sec).sum::<f64>() / 3.0;
            println!(
                "| {percent}% ({capacity}) | {name} | {} | {} ({}) | {} ({}) | {} | {} ({}) | {} ({}) | {:.2} |",
                pct(none.steady),
                pct(block.steady),
                points(block.steady - none.steady),
                pct(mixed.steady),
                points(mixed.steady - none.steady),
                pct(none.window),
                pct(block.window),
                points(block.window - none.window),
                pct(mixed.window),
                points(mixed.window - none.window),
                ops / 1e6
            );
            let worst_scan_cost = [block.steady, mixed.steady, block.window, mixed.window]
                .iter()
                .zip([none.steady, none.steady, none.window, none.window])
                .map(|(with, without)| without - with)
                .fold(0.0f64, f64::max);
            steady.push((none.steady, worst_scan_cost));
        }
        let (quick, quick_scan_cost) = steady[0];
        let (lru, _) = steady[2];
        verdicts.push(format!(
            "{percent}%: quick_cache − LRU = {} points{}; quick_cache's worst scan cost = {:.1} points (target ≤ 5)",
            points(quick - lru),
            if percent == 1 { " (target ≥ +5)" } else { "" },
            100.0 * quick_scan_cost
        ));
    }
    println!();
    for v in verdicts {
        println!("{v}");
    }
}
