//! Every metric sidecache exports: names, descriptions, label sets, buckets, and cached handles.
//!
//! Owns: installing the Prometheus recorder (once per process), histogram buckets (so histograms
//! are exported as histograms, not summaries), and `Metrics`, a set of handles resolved once so
//! the hot path increments without allocating or formatting. Does not own: serving `/metrics`
//! (see `admin`) or deciding when to count (callers do).
//!
//! Labels come only from closed sets (`Family::as_str`, `PROTOCOL_ERROR_KINDS`), never from
//! keys or client addresses.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::command::Family;

/// Commands handled, by family.
pub const COMMANDS_TOTAL: &str = "sidecache_commands_total";
/// Time from a command's arrival to its reply being ready, by family.
pub const COMMAND_DURATION: &str = "sidecache_command_duration_seconds";
/// Open client connections.
pub const CLIENT_CONNECTIONS: &str = "sidecache_client_connections";
/// Client connections refused because `max_clients` was reached.
pub const CLIENTS_REJECTED: &str = "sidecache_client_rejected_total";
/// 1 when the upstream Redis answers health checks.
pub const UPSTREAM_UP: &str = "sidecache_upstream_up";
/// Open upstream connections (pooled and dedicated).
pub const UPSTREAM_CONNECTIONS: &str = "sidecache_upstream_connections";
/// Upstream connection attempts that failed.
pub const UPSTREAM_CONNECT_FAILURES: &str = "sidecache_upstream_connect_failures_total";
/// Malformed input, by kind.
pub const PROTOCOL_ERRORS: &str = "sidecache_protocol_errors_total";
/// Writes to ruled keys the TTL policy sent with their rule's TTL (or would have, in audit
/// mode), by rule: counted when sent, not from what Redis then did.
pub const TTL_APPLIED: &str = "sidecache_ttl_applied_total";
/// Key-creating writes to keys that match no TTL rule (the key-naming lint), by database.
pub const TTL_MISSING: &str = "sidecache_ttl_missing_total";
/// Writes to ruled keys the TTL policy cannot reach, by reason (`ttl::UNENFORCED_REASONS`).
pub const TTL_UNENFORCED: &str = "sidecache_ttl_unenforced_total";

/// Reads answered from the near-cache, by rule.
pub const CACHE_HITS: &str = "sidecache_cache_hits_total";
/// Cacheable reads that went to Redis, by rule.
pub const CACHE_MISSES: &str = "sidecache_cache_misses_total";
/// Entries removed, by rule and reason.
pub const CACHE_EVICTIONS: &str = "sidecache_cache_evictions_total";
/// Key invalidations received or made, by source.
pub const CACHE_INVALIDATIONS: &str = "sidecache_cache_invalidations_total";
/// Cached replies, by rule.
pub const CACHE_ENTRIES: &str = "sidecache_cache_entries";
/// Bytes held by cached replies, by rule.
pub const CACHE_BYTES: &str = "sidecache_cache_bytes";
/// Time from a probe write's acknowledgement to its invalidation arriving.
pub const CACHE_INVALIDATION_LAG: &str = "sidecache_cache_invalidation_lag_seconds";
/// Sampled hits that differed from Redis with no invalidation in sight.
pub const CACHE_STALE_DETECTED: &str = "sidecache_cache_stale_detected_total";
/// Replies not cached because they exceed `max_value_bytes`.
pub const CACHE_TOO_BIG: &str = "sidecache_cache_skipped_too_big_total";
/// 1 while the near-cache is coherent (and used), else 0.
pub const COHERENCE_UP: &str = "sidecache_coherence_up";
/// 1 for the coherence mode in use, by mode.
pub const COHERENCE_MODE: &str = "sidecache_coherence_mode";

/// The closed set of `reason` labels of `sidecache_cache_evictions_total`.
pub const EVICTION_REASONS: [&str; 4] = ["capacity", "expired", "invalidated", "flushed"];
/// The closed set of `source` labels of `sidecache_cache_invalidations_total`.
pub const INVALIDATION_SOURCES: [&str; 4] = ["tracking", "pubsub", "local", "flush"];
/// The closed set of `mode` labels of `sidecache_coherence_mode`.
pub const COHERENCE_MODES: [&str; 2] = ["tracking", "pubsub"];

/// The closed set of `kind` labels of `sidecache_protocol_errors_total`.
pub const PROTOCOL_ERROR_KINDS: [&str; 9] = [
    "invalid_multibulk_length",
    "expected_bulk",
    "invalid_bulk_length",
    "inline_too_big",
    "unbalanced_quotes",
    "frame_deadline",
    "idle_timeout",
    "output_buffer",
    "upstream_reply",
];

/// Latency buckets in seconds: 25 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] =
    [0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (idempotent) and returns its render handle.
/// The caller must run `handle.run_upkeep()` periodically (the admin server does).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .expect("bucket list is not empty");
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (only possible when embedded); render an empty
                // private one rather than fail.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(COMMANDS_TOTAL, "Commands handled, by command family.");
    describe_histogram!(
        COMMAND_DURATION,
        metrics::Unit::Seconds,
        "Time from a command's arrival to its reply, by family."
    );
    describe_gauge!(CLIENT_CONNECTIONS, "Open client connections.");
    describe_counter!(CLIENTS_REJECTED, "Client connections refused because max_clients was reached.");
    describe_gauge!(UPSTREAM_UP, "1 when the upstream Redis answers health checks, else 0.");
    describe_gauge!(UPSTREAM_CONNECTIONS, "Open connections to the upstream Redis.");
    describe_counter!(UPSTREAM_CONNECT_FAILURES, "Failed connection attempts to the upstream Redis.");
    describe_counter!(PROTOCOL_ERRORS, "Malformed input from clients or Redis, by kind.");
    describe_counter!(CACHE_HITS, "Reads answered from the near-cache, by rule.");
    describe_counter!(CACHE_MISSES, "Cacheable reads that went to Redis, by rule.");
    describe_counter!(
        CACHE_EVICTIONS,
        "Cached replies removed, by rule and reason (capacity, expired, invalidated, flushed)."
    );
    describe_counter!(CACHE_INVALIDATIONS, "Key invalidations, by source (tracking, pubsub, local, flush).");
    describe_gauge!(CACHE_ENTRIES, "Cached replies, by rule.");
    describe_gauge!(CACHE_BYTES, metrics::Unit::Bytes, "Bytes held by cached replies, by rule.");
    describe_histogram!(
        CACHE_INVALIDATION_LAG,
        metrics::Unit::Seconds,
        "Time from the heartbeat probe write's acknowledgement to its invalidation arriving."
    );
    describe_counter!(CACHE_STALE_DETECTED, "Sampled hits that differed from Redis without an invalidation.");
    describe_counter!(CACHE_TOO_BIG, "Replies not cached because they exceed near_cache.max_value_bytes.");
    describe_gauge!(COHERENCE_UP, "1 while the near-cache is coherent and used, else 0.");
    describe_gauge!(COHERENCE_MODE, "1 for the coherence mode in use (tracking or pubsub).");
    describe_counter!(
        TTL_APPLIED,
        "Writes to ruled keys sent with their TTL rule's default TTL (set by Redis where the key has none) or with an explicit TTL lowered to the rule's max (in audit mode: that would have been), by rule."
    );
    describe_counter!(TTL_MISSING, "Key-creating writes to keys that match no TTL rule, by database.");
    describe_counter!(TTL_UNENFORCED, "Writes to ruled keys the TTL policy cannot reach (scripts).");
}

/// Handles of one near-cache rule.
pub struct RuleMetrics {
    /// `sidecache_cache_hits_total{rule}`.
    pub hits: Counter,
    /// `sidecache_cache_misses_total{rule}`.
    pub misses: Counter,
    /// `sidecache_cache_evictions_total{rule,reason}`, in `EVICTION_REASONS` order.
    pub evictions: [Counter; 4],
    /// `sidecache_cache_entries{rule}`.
    pub entries: Gauge,
    /// `sidecache_cache_bytes{rule}`.
    pub bytes: Gauge,
}

impl RuleMetrics {
    /// Handles for the rule named `rule`.
    pub fn new(rule: &str) -> RuleMetrics {
        Metrics::get();
        let rule = rule.to_string();
        let m = RuleMetrics {
            hits: counter!(CACHE_HITS, "rule" => rule.clone()),
            misses: counter!(CACHE_MISSES, "rule" => rule.clone()),
            evictions: EVICTION_REASONS.map(|r| counter!(CACHE_EVICTIONS, "rule" => rule.clone(), "reason" => r)),
            entries: gauge!(CACHE_ENTRIES, "rule" => rule.clone()),
            bytes: gauge!(CACHE_BYTES, "rule" => rule),
        };
        for c in m.evictions.iter().chain([&m.hits, &m.misses]) {
            c.increment(0);
        }
        m
    }
}

/// Handles of the near-cache as a whole.
pub struct CacheMetrics {
    /// `sidecache_cache_invalidations_total{source}`, in `INVALIDATION_SOURCES` order.
    pub invalidations: [Counter; 4],
    /// `sidecache_cache_invalidation_lag_seconds`.
    pub lag: Histogram,
    /// `sidecache_cache_stale_detected_total`.
    pub stale: Counter,
    /// `sidecache_cache_skipped_too_big_total`.
    pub too_big: Counter,
    /// `sidecache_coherence_up`.
    pub up: Gauge,
    /// `sidecache_coherence_mode{mode}`, in `COHERENCE_MODES` order.
    pub mode: [Gauge; 2],
}

impl CacheMetrics {
    /// Resolves the handles.
    pub fn new() -> CacheMetrics {
        Metrics::get();
        let m = CacheMetrics {
            invalidations: INVALIDATION_SOURCES.map(|s| counter!(CACHE_INVALIDATIONS, "source" => s)),
            lag: histogram!(CACHE_INVALIDATION_LAG),
            stale: counter!(CACHE_STALE_DETECTED),
            too_big: counter!(CACHE_TOO_BIG),
            up: gauge!(COHERENCE_UP),
            mode: COHERENCE_MODES.map(|m| gauge!(COHERENCE_MODE, "mode" => m)),
        };
        for c in m.invalidations.iter().chain([&m.stale, &m.too_big]) {
            c.increment(0);
        }
        m.up.set(0.0);
        m
    }
}

impl Default for CacheMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles resolved once; cheap to use on every command.
pub struct Metrics {
    commands: Vec<Counter>,
    durations: Vec<Histogram>,
    protocol_errors: Vec<Counter>,
    /// `sidecache_client_connections`.
    pub clients: Gauge,
    /// `sidecache_client_rejected_total`.
    pub clients_rejected: Counter,
    /// `sidecache_upstream_up`.
    pub upstream_up: Gauge,
    /// `sidecache_upstream_connections`.
    pub upstream_connections: Gauge,
    /// `sidecache_upstream_connect_failures_total`.
    pub upstream_connect_failures: Counter,
}

impl Metrics {
    /// The process-wide handles (installs the recorder on first use).
    pub fn get() -> &'static Metrics {
        METRICS.get_or_init(|| {
            install();
            let families = Family::ALL;
            let metrics = Metrics {
                commands: families.iter().map(|f| counter!(COMMANDS_TOTAL, "family" => f.as_str())).collect(),
                durations: families.iter().map(|f| histogram!(COMMAND_DURATION, "family" => f.as_str())).collect(),
                protocol_errors: PROTOCOL_ERROR_KINDS.iter().map(|k| counter!(PROTOCOL_ERRORS, "kind" => *k)).collect(),
                clients: gauge!(CLIENT_CONNECTIONS),
                clients_rejected: counter!(CLIENTS_REJECTED),
                upstream_up: gauge!(UPSTREAM_UP),
                upstream_connections: gauge!(UPSTREAM_CONNECTIONS),
                upstream_connect_failures: counter!(UPSTREAM_CONNECT_FAILURES),
            };
            // Make every series visible from the start, so rate() and alerts see zeros.
            for c in metrics.commands.iter().chain(&metrics.protocol_errors) {
                c.increment(0);
            }
            metrics
        })
    }

    /// Counts one command of `family` that took `seconds`.
    pub fn command(&self, family: Family, seconds: f64) {
        let i = family as usize;
        self.commands[i].increment(1);
        self.durations[i].record(seconds);
    }

    /// Counts one protocol error; `kind` must be one of `PROTOCOL_ERROR_KINDS`.
    pub fn protocol_error(&self, kind: &str) {
        if let Some(i) = PROTOCOL_ERROR_KINDS.iter().position(|k| *k == kind) {
            self.protocol_errors[i].increment(1);
        }
    }
}

/// `LOCK.ACQUIRE` outcomes, by outcome (`LockOutcome`).
pub const LOCK_ACQUIRE_TOTAL: &str = "sidecache_lock_acquire_total";
/// Time from a `LOCK.ACQUIRE`'s arrival to its outcome (acquired or timed out).
pub const LOCK_WAIT: &str = "sidecache_lock_wait_seconds";
/// Clients of this instance waiting for a lock (`LOCK.ACQUIRE … WAIT`).
pub const LOCK_WAITERS: &str = "sidecache_lock_waiters";
/// Locks held by this instance's clients.
pub const LOCKS_HELD: &str = "sidecache_locks_held";
/// `KEEPALIVE` leases whose renewal failed (reported to the holder on its next `LOCK.*` call).
pub const LOCK_LEASES_LOST: &str = "sidecache_lock_leases_lost_total";
/// Fence counters found below a fence this instance already handed out, and repaired.
pub const LOCK_FENCE_REGRESSIONS: &str = "sidecache_lock_fence_regressions_total";
/// Serial numbers handed out by `SERIAL.NEXT` (a `COUNT n` call counts n).
pub const SERIAL_ISSUED: &str = "sidecache_serial_numbers_issued_total";
/// Serial counters found below a number this instance already handed out, and repaired.
pub const SERIAL_REGRESSIONS: &str = "sidecache_serial_regressions_total";

/// How a `LOCK.ACQUIRE` ended: the closed label set of `sidecache_lock_acquire_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// The client got the lock.
    Acquired,
    /// The lock stayed held until the `WAIT` ran out (or at once, without `WAIT`).
    Timeout,
    /// Redis could not be asked, or answered with an error.
    Error,
}

impl LockOutcome {
    /// Every outcome, in label order.
    pub const ALL: [LockOutcome; 3] = [LockOutcome::Acquired, LockOutcome::Timeout, LockOutcome::Error];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            LockOutcome::Acquired => "acquired",
            LockOutcome::Timeout => "timeout",
            LockOutcome::Error => "error",
        }
    }
}

static LOCK_METRICS: OnceLock<LockMetrics> = OnceLock::new();

/// Handles of the lock and serial metrics, resolved once.
pub struct LockMetrics {
    acquire: [Counter; 3],
    /// `sidecache_lock_wait_seconds`.
    pub wait: Histogram,
    /// `sidecache_lock_waiters`.
    pub waiters: Gauge,
    /// `sidecache_locks_held`.
    pub held: Gauge,
    /// `sidecache_lock_leases_lost_total`.
    pub leases_lost: Counter,
    /// `sidecache_lock_fence_regressions_total`.
    pub fence_regressions: Counter,
    /// `sidecache_serial_numbers_issued_total`.
    pub serial_issued: Counter,
    /// `sidecache_serial_regressions_total`.
    pub serial_regressions: Counter,
}

impl LockMetrics {
    /// The process-wide handles (installs the recorder and describes the metrics on first use).
    pub fn get() -> &'static LockMetrics {
        LOCK_METRICS.get_or_init(|| {
            install();
            describe_counter!(LOCK_ACQUIRE_TOTAL, "LOCK.ACQUIRE calls by outcome: acquired, timeout, error.");
            describe_histogram!(
                LOCK_WAIT,
                metrics::Unit::Seconds,
                "Time from a LOCK.ACQUIRE's arrival to the lock being acquired or the wait running out."
            );
            describe_gauge!(LOCK_WAITERS, "Clients of this instance waiting for a lock.");
            describe_gauge!(LOCKS_HELD, "Locks held by clients of this instance.");
            describe_counter!(LOCK_LEASES_LOST, "KEEPALIVE leases whose renewal failed.");
            describe_counter!(LOCK_FENCE_REGRESSIONS, "Fence counters found behind this instance's fences, repaired.");
            describe_counter!(SERIAL_ISSUED, "Serial numbers handed out by SERIAL.NEXT.");
            describe_counter!(SERIAL_REGRESSIONS, "Serial counters found behind this instance's numbers, repaired.");
            let m = LockMetrics {
                acquire: LockOutcome::ALL.map(|o| counter!(LOCK_ACQUIRE_TOTAL, "outcome" => o.as_str())),
                wait: histogram!(LOCK_WAIT),
                waiters: gauge!(LOCK_WAITERS),
                held: gauge!(LOCKS_HELD),
                leases_lost: counter!(LOCK_LEASES_LOST),
                fence_regressions: counter!(LOCK_FENCE_REGRESSIONS),
                serial_issued: counter!(SERIAL_ISSUED),
                serial_regressions: counter!(SERIAL_REGRESSIONS),
            };
            // Visible from the start, so rate() and alerts see zeros.
            for c in m.acquire.iter().chain([&m.leases_lost, &m.fence_regressions, &m.serial_issued]) {
                c.increment(0);
            }
            m.serial_regressions.increment(0);
            m.held.increment(0.0);
            m.waiters.increment(0.0);
            m
        })
    }

    /// Counts one `LOCK.ACQUIRE` outcome.
    pub fn acquire(&self, outcome: LockOutcome) {
        self.acquire[outcome as usize].increment(1);
    }
}

#[cfg(test)]
mod tests {
    /// Every metric family this module names, and every family the README's "Metrics
    /// reference" lists, are the same set.
    #[test]
    fn the_readme_lists_every_family() {
        let source = include_str!("metrics.rs");
        let mut defined: Vec<&str> = source
            .lines()
            .filter(|l| l.starts_with("pub const ") && l.contains("&str = \"sidecache_"))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        let readme = include_str!("../README.md");
        let reference = readme.split("## Metrics reference").nth(1).and_then(|r| r.split("\n## ").next()).unwrap();
        let mut listed: Vec<&str> =
            reference.lines().filter_map(|l| l.strip_prefix("| `")?.split('`').next()).collect();
        defined.sort_unstable();
        listed.sort_unstable();
        assert_eq!(listed, defined, "README's Metrics reference and src/metrics.rs name different families");
    }
}
