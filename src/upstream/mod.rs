//! Connections to the real Redis: pools of multiplexed connections, dedicated connections, and
//! the health check that decides `/readyz` and `sidecache_upstream_up`.
//!
//! Owns: `Upstream`, the registry of pools keyed by (credentials, database, protocol), each
//! pool's fixed number of slots with reconnect backoff and jitter, the sweep that closes pools
//! no session uses any more, the recheck that closes pools whose credentials Redis now refuses,
//! and `ReplyBudget`, the per-session count of reply bytes that
//! arrived but are not yet written to the client. Does not own: what sessions send (see
//! `session`).
//!
//! A pool is created only after a connection with its credentials and database has completed
//! the handshake, so a wrong password or an out-of-range database is answered with Redis's own
//! error and never leaves a pool behind.

pub mod conn;
pub mod mux;
pub mod pinned;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::protocol::encode::{self, Proto};
use crate::protocol::reply::ReplyLimits;
pub use conn::Handshake;
pub use mux::{Batch, MuxHandle, Waiter};
pub use pinned::{Pinned, PinnedFrame};

/// Why the upstream could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect or handshake transport failure.
    #[error("upstream unavailable: {0}")]
    Connect(String),
    /// Redis refused the handshake; holds Redis's error reply, which goes to the client as is.
    #[error("upstream refused the handshake: {}", String::from_utf8_lossy(.0).trim_start_matches('-').trim_end())]
    Rejected(Bytes),
    /// Waiting out the reconnect backoff after a failure.
    /// Holds the failure's own text, which says what was unavailable.
    #[error("{0} (reconnecting)")]
    Backoff(String),
    /// The connection was lost with this command in flight.
    #[error("upstream connection lost")]
    Lost,
    /// The connection was closed by Redis.
    #[error("upstream closed the connection")]
    Closed,
    /// Socket error.
    #[error("upstream I/O error: {0}")]
    Io(String),
    /// Commands waited this long with no reply at all.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis sent bytes that are not a valid reply within limits.
    #[error("upstream protocol error: {0}")]
    Protocol(crate::protocol::ReplyError),
}

impl UpstreamError {
    /// The reply a client gets for a command this error stopped.
    pub fn to_reply(&self) -> Bytes {
        match self {
            UpstreamError::Rejected(reply) => reply.clone(),
            UpstreamError::Lost | UpstreamError::Closed => {
                encode::error("ERR sidecache: upstream connection lost; the command may or may not have run")
            }
            UpstreamError::Timeout(t) => encode::error(&format!(
                "ERR sidecache: upstream did not answer within {t:?}; the command may or may not have run"
            )),
            other => encode::error(&format!("ERR sidecache: {other}")),
        }
    }
}

/// Credentials a session authenticates with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Creds {
    /// ACL user; `None` for the one-argument `AUTH password` form.
    pub user: Option<Bytes>,
    /// Password.
    pub pass: Bytes,
}

/// What a multiplexed connection's state must be to carry a session's commands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Credentials (`None`: no `AUTH`).
    pub creds: Option<Creds>,
    /// Selected database.
    pub db: u32,
    /// Protocol version.
    pub proto: Proto,
}

/// Where Redis is and how replies from it are bounded.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Connect plus handshake timeout.
    pub connect_timeout: Duration,
    /// Longest wait for a reply on a shared connection with commands in flight (zero: none).
    pub command_timeout: Duration,
    /// Reply framing limits.
    pub limits: ReplyLimits,
}

/// Reply bytes delivered to a session but not yet written to its client. Exceeding the cap
/// disconnects the client, as Redis's client-output-buffer-limit does, and from then on replies
/// for it are dropped on arrival, so the cap is a hard bound on what one client can pin.
#[derive(Debug)]
pub struct ReplyBudget {
    pending: AtomicUsize,
    cap: usize,
    over: AtomicBool,
    kill: Arc<crate::signal::Signal>,
}

impl ReplyBudget {
    /// A budget of `cap` bytes; exceeding it raises `kill`.
    pub fn new(cap: usize, kill: Arc<crate::signal::Signal>) -> Self {
        Self { pending: AtomicUsize::new(0), cap, over: AtomicBool::new(false), kill }
    }

    /// Adds `n` arrived bytes. False when the session is over its cap: drop the reply.
    pub fn charge(&self, n: usize) -> bool {
        if self.over.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.pending.fetch_add(n, Ordering::Relaxed) + n;
        if now > self.cap {
            if !self.over.swap(true, Ordering::Relaxed) {
                Metrics::get().protocol_error("output_buffer");
                tracing::debug!(pending = now, cap = self.cap, "Client output buffer limit exceeded; closing.");
            }
            self.kill.raise();
            return false;
        }
        true
    }

    /// Removes `n` bytes handed to the client socket.
    pub fn release(&self, n: usize) {
        self.pending.fetch_sub(n.min(self.pending.load(Ordering::Relaxed)), Ordering::Relaxed);
    }
}

enum SlotState {
    Empty,
    Up(MuxHandle),
    /// Failed `failures` times in a row; no new attempt before `until`.
    Down {
        until: Instant,
        error: UpstreamError,
        failures: u32,
    },
}

/// The multiplexed connections for one `PoolKey`.
pub struct Pool {
    key: PoolKey,
    slots: Vec<Mutex<SlotState>>,
    /// Consecutive sweeps that found no session holding any of its connections.
    unused_sweeps: AtomicU32,
}

impl Pool {
    /// True when no session holds a connection of this pool (the pool's own handle is the
    /// only one left, or there is none).
    fn unused(&self) -> bool {
        self.slots.iter().all(|slot| match slot.try_lock() {
            Ok(state) => match &*state {
                SlotState::Up(h) => h.holders() == 1,
                _ => true,
            },
            // A session is getting a connection right now.
            Err(_) => false,
        })
    }
}

/// How often `upkeep_loop` runs `sweep`, which looks for unused pools.
pub const POOL_SWEEP: Duration = Duration::from_secs(60);
/// How often `upkeep_loop` runs `recheck`, which makes sure Redis still accepts each pool's
/// credentials: the longest a client without the new password can still get in through an
/// existing pool.
pub const POOL_RECHECK: Duration = Duration::from_secs(2);
/// Sweeps in a row that must find a pool unused before it is closed.
pub const POOL_UNUSED_SWEEPS: u32 = 2;

/// The registry of pools and the upstream's health.
pub struct Upstream {
    endpoint: Endpoint,
    default_creds: Option<Creds>,
    default_db: u32,
    pool_size: usize,
    max_backoff: Duration,
    pools: DashMap<PoolKey, Arc<Pool>>,
    up: AtomicBool,
    down_reason: std::sync::Mutex<String>,
    /// One connection attempt at a time per pool being made (waiters then find the pool, or
    /// the failure's backoff).
    opening: DashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>,
    /// The last failure to reach Redis at all while making a pool, with the time until which
    /// new pools are not tried, and how many failures in a row.
    unreachable: std::sync::Mutex<Option<(Instant, UpstreamError, u32)>>,
    /// Whether a health check has completed (the first failure is logged).
    checked: AtomicBool,
    /// Woken when a shared connection is opened again after its predecessor failed: the
    /// address may now lead to another server (a moved DNS name or virtual IP), which the
    /// near-cache's invalidation link must follow.
    reconnected: tokio::sync::Notify,
}

impl Upstream {
    /// A registry for the configured target. Connects lazily.
    pub fn new(
        endpoint: Endpoint,
        default_creds: Option<Creds>,
        default_db: u32,
        pool_size: usize,
        max_backoff: Duration,
    ) -> Upstream {
        Upstream {
            endpoint,
            default_creds,
            default_db,
            pool_size: pool_size.max(1),
            max_backoff,
            pools: DashMap::new(),
            up: AtomicBool::new(false),
            down_reason: std::sync::Mutex::new("no health check has completed yet".into()),
            reconnected: tokio::sync::Notify::new(),
            opening: DashMap::new(),
            unreachable: std::sync::Mutex::new(None),
            checked: AtomicBool::new(false),
        }
    }

    /// Ends when a shared connection is next opened again after a failure.
    pub async fn reconnected(&self) {
        self.reconnected.notified().await
    }

    /// Where Redis is.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Cap of the reconnect backoff.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }

    /// The key a new session starts with: the configured credentials and database, RESP2.
    pub fn initial_key(&self) -> PoolKey {
        PoolKey { creds: self.default_creds.clone(), db: self.default_db, proto: Proto::Resp2 }
    }

    /// The pool for `key`, created (after a successful handshake) when missing. Sessions that
    /// need the same missing pool wait for one attempt; while Redis cannot be reached, new
    /// pools are tried again only after a backoff, and meanwhile the error comes at once.
    pub async fn pool(&self, key: &PoolKey) -> Result<Arc<Pool>, UpstreamError> {
        if let Some(pool) = self.pools.get(key).map(|p| p.value().clone()) {
            return Ok(pool);
        }
        let gate = self.opening.entry(key.clone()).or_default().value().clone();
        let _turn = gate.lock().await;
        if let Some(pool) = self.pools.get(key).map(|p| p.value().clone()) {
            return Ok(pool);
        }
        let failures = match &*self.unreachable.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((until, error, _)) if Instant::now() < *until => {
                return Err(UpstreamError::Backoff(error.to_string()));
            }
            Some((_, _, failures)) => *failures,
            None => 0,
        };
        let hs = Handshake { creds: key.creds.clone(), db: key.db, proto: key.proto, name: None };
        let opened = conn::open(&self.endpoint, &hs).await;
        self.opening.remove(key);
        let (stream, reader) = match opened {
            Ok(ok) => {
                *self.unreachable.lock().unwrap_or_else(|p| p.into_inner()) = None;
                ok
            }
            // Redis answered: its refusal concerns these credentials, not whether it is up.
            Err(e @ UpstreamError::Rejected(_)) => return Err(e),
            Err(e) => {
                Metrics::get().upstream_connect_failures.increment(1);
                let until = Instant::now() + self.backoff(failures + 1);
                *self.unreachable.lock().unwrap_or_else(|p| p.into_inner()) = Some((until, e.clone(), failures + 1));
                return Err(e);
            }
        };
        let first = MuxHandle::spawn(stream, reader, self.endpoint.command_timeout);
        let pool = Arc::new(Pool {
            key: key.clone(),
            slots: (0..self.pool_size)
                .map(|i| Mutex::new(if i == 0 { SlotState::Up(first.clone()) } else { SlotState::Empty }))
                .collect(),
            unused_sweeps: AtomicU32::new(0),
        });
        Ok(self.pools.entry(key.clone()).or_insert(pool).value().clone())
    }

    /// A live connection of `pool` for the session numbered `session`, reconnecting (within
    /// the backoff) when the slot's connection has failed. When the session's own slot has no
    /// connection and cannot get one (Redis at `maxclients`, or the slot waiting out its
    /// backoff), another slot's live connection serves: one slot that cannot connect must not
    /// fail a fixed share of the clients while the pool still has a working connection.
    pub async fn connection(&self, pool: &Pool, session: u64) -> Result<MuxHandle, UpstreamError> {
        let n = pool.slots.len();
        let own = (session % n as u64) as usize;
        let err = match self.slot_connection(pool, own).await {
            Ok(h) => return Ok(h),
            Err(e) => e,
        };
        for i in (1..n).map(|k| (own + k) % n) {
            if let Ok(state) = pool.slots[i].try_lock()
                && let SlotState::Up(h) = &*state
                && h.is_alive()
            {
                return Ok(h.clone());
            }
        }
        Err(err)
    }

    /// The connection of slot `index` of `pool`, opened when it has none (within the backoff).
    async fn slot_connection(&self, pool: &Pool, index: usize) -> Result<MuxHandle, UpstreamError> {
        let mut state = pool.slots[index].lock().await;
        let again = !matches!(&*state, SlotState::Empty);
        let failures = match &*state {
            SlotState::Up(h) if h.is_alive() => return Ok(h.clone()),
            // Redis's own refusal is repeated as is; a transport failure says it is waiting.
            SlotState::Down { until, error, .. } if Instant::now() < *until => {
                return Err(match error {
                    UpstreamError::Rejected(reply) => UpstreamError::Rejected(reply.clone()),
                    other => UpstreamError::Backoff(other.to_string()),
                });
            }
            SlotState::Down { failures, .. } => *failures,
            _ => 0,
        };
        let hs = Handshake { creds: pool.key.creds.clone(), db: pool.key.db, proto: pool.key.proto, name: None };
        match conn::open(&self.endpoint, &hs).await {
            Ok((stream, reader)) => {
                let h = MuxHandle::spawn(stream, reader, self.endpoint.command_timeout);
                *state = SlotState::Up(h.clone());
                if again {
                    self.reconnected.notify_waiters();
                }
                Ok(h)
            }
            Err(e) => {
                if !matches!(e, UpstreamError::Rejected(_)) {
                    Metrics::get().upstream_connect_failures.increment(1);
                }
                let failures = failures + 1;
                *state = SlotState::Down { until: Instant::now() + self.backoff(failures), error: e.clone(), failures };
                Err(e)
            }
        }
    }

    /// Closes the pools that no session has used for `POOL_UNUSED_SWEEPS` sweeps in a row,
    /// except the pool of `initial_key`; returns how many. A pool exists for each (credentials,
    /// database, protocol) some client used, so without this a rotated password or a client
    /// that visited another database would keep its connections open for good. A session that
    /// still holds a connection of a closed pool keeps it until it lets go; the next one to need
    /// the pool makes a new one.
    pub fn sweep(&self) -> usize {
        let initial = self.initial_key();
        let before = self.pools.len();
        self.pools.retain(|key, pool| {
            if *key == initial || !pool.unused() {
                pool.unused_sweeps.store(0, Ordering::Relaxed);
                return true;
            }
            pool.unused_sweeps.fetch_add(1, Ordering::Relaxed) + 1 < POOL_UNUSED_SWEEPS
        });
        let closed = before.saturating_sub(self.pools.len());
        if closed > 0 {
            tracing::debug!(closed, "Closed unused upstream pools.");
        }
        closed
    }

    /// Opens a connection with each pool's handshake, as a new client's connection would be,
    /// and closes the pools whose handshake Redis now refuses; returns how many. Redis judges
    /// credentials when a connection authenticates, so a pool made before a password was set or
    /// changed, or a user disabled, would otherwise keep letting new clients in. Sessions that
    /// hold a connection of a closed pool keep it, as Redis keeps authenticated connections.
    pub async fn recheck(&self) -> usize {
        let keys: Vec<PoolKey> = self.pools.iter().map(|p| p.key().clone()).collect();
        let mut closed = 0;
        for key in keys {
            let hs = Handshake { creds: key.creds.clone(), db: key.db, proto: key.proto, name: None };
            // A transport failure is the health check's concern; only Redis's refusal counts,
            // and its client limit is no refusal of the credentials.
            if let Err(UpstreamError::Rejected(reply)) = conn::open(&self.endpoint, &hs).await
                && !reply.starts_with(b"-ERR max number of clients reached")
                && self.pools.remove(&key).is_some()
            {
                closed += 1;
                let reply = String::from_utf8_lossy(&reply).trim_end().to_string();
                tracing::warn!(db = key.db, %reply, "Redis refuses a pool's credentials now; closed the pool.");
            }
        }
        closed
    }

    /// Until `stop` fires, runs `sweep` every `sweep_every` and `recheck` every
    /// `recheck_every`, each first after one period.
    pub async fn upkeep_loop(self: Arc<Self>, sweep_every: Duration, recheck_every: Duration, stop: CancellationToken) {
        let now = tokio::time::Instant::now();
        let mut sweeps = tokio::time::interval_at(now + sweep_every, sweep_every);
        let mut rechecks = tokio::time::interval_at(now + recheck_every, recheck_every);
        rechecks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sweeps.tick() => {
                    self.sweep();
                }
                _ = rechecks.tick() => {
                    self.recheck().await;
                }
            }
        }
    }

    /// Pools open now.
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// Exponential backoff: 50 ms × 2^`failures` (100 ms after the first failure) up to
    /// `max_backoff`, with jitter in [50%, 100%].
    pub fn backoff(&self, failures: u32) -> Duration {
        let base = Duration::from_millis(50).saturating_mul(1 << failures.min(10)).min(self.max_backoff);
        base.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// True when the last health check succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Why the upstream is considered down.
    pub fn down_reason(&self) -> String {
        self.down_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_health(&self, result: Result<(), String>) {
        let up = result.is_ok();
        if !self.checked.swap(true, Ordering::Relaxed)
            && let Err(reason) = &result
        {
            tracing::warn!(%reason, "Upstream is unreachable.");
        }
        if let Err(reason) = result {
            *self.down_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        }
        let was = self.up.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                tracing::info!(host = %self.endpoint.host, port = self.endpoint.port, "Upstream is reachable.");
            } else {
                tracing::warn!(reason = %self.down_reason(), "Upstream is unreachable.");
            }
        }
        Metrics::get().upstream_up.set(if up { 1.0 } else { 0.0 });
    }

    /// Pings Redis every `interval` on a connection of its own until `stop` fires. Opening that
    /// connection again after a failure counts as a reconnect (`reconnected`), so that a
    /// moved address is noticed even while no client command needs a shared connection.
    pub async fn health_loop(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let ping = encode::command_bytes(&["PING"]);
        let mut conn: Option<(tokio::net::TcpStream, conn::FrameReader)> = None;
        let mut failed = false;
        loop {
            let check = async {
                if conn.is_none() {
                    let hs = Handshake { creds: self.default_creds.clone(), db: 0, proto: Proto::Resp2, name: None };
                    conn = Some(conn::open(&self.endpoint, &hs).await.map_err(|e| e.to_string())?);
                    if std::mem::take(&mut failed) {
                        self.reconnected.notify_waiters();
                    }
                }
                let (stream, reader) = conn.as_mut().ok_or("no connection")?;
                tokio::io::AsyncWriteExt::write_all(stream, &ping).await.map_err(|e| e.to_string())?;
                let reply = reader.next(stream).await.map_err(|e| e.to_string())?;
                // A user that may not run `PING` is still answered: Redis is up. Other errors
                // (`LOADING`, `MASTERDOWN`, `NOAUTH`…) say it cannot serve.
                if crate::protocol::reply::is_error(&reply) && !reply.starts_with(b"-NOPERM ") {
                    return Err(String::from_utf8_lossy(&reply).trim_end().to_string());
                }
                Ok::<(), String>(())
            };
            let result = match tokio::time::timeout(self.endpoint.connect_timeout, check).await {
                Ok(r) => r,
                Err(_) => Err(format!("PING timed out after {:?}", self.endpoint.connect_timeout)),
            };
            if result.is_err() {
                conn = None;
                failed = true;
            }
            self.set_health(result);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
