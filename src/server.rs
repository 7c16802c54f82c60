//! The listening side: binds the client and admin ports, accepts clients within `max_clients`,
//! runs one session per client, reloads policy, and shuts down with a grace period.
//!
//! Owns: `Context` (what every session shares: the upstream registry and the live `Policy`),
//! the accept loop and its backoff on accept errors, and the shutdown sequence (stop accepting,
//! let sessions finish what they read within `shutdown_grace`, then return). Does not own: the
//! per-client protocol (`session`) or HTTP (`admin`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::NearCache;
use crate::config::{Config, redact_url, resolve_addr};
use crate::metrics::Metrics;
use crate::protocol::RequestLimits;
use crate::protocol::reply::ReplyLimits;
use crate::signal::Signal;
use crate::upstream::{Creds, Endpoint, Upstream};

/// The parts of the configuration that a reload may change while clients stay connected.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Upper-case command names answered with `-NOPERM`.
    pub deny: HashSet<Vec<u8>>,
    /// Request framing limits.
    pub request_limits: RequestLimits,
    /// Time a started request may take.
    pub frame_deadline: Duration,
    /// Idle client timeout (zero: none).
    pub idle_timeout: Duration,
    /// Reply bytes pending per client before it is disconnected.
    pub max_output_bytes: usize,
    /// Commands in flight per client (applies to new connections).
    pub max_pipeline: usize,
    /// TTL rules by key prefix.
    pub ttl: Arc<crate::ttl::TtlPolicy>,
}

impl Policy {
    /// Whether `[security] deny` refuses this command (names of any length, any case).
    pub fn denies(&self, cmd: &crate::command::Command) -> bool {
        if self.deny.is_empty() {
            return false;
        }
        match cmd.name() {
            // Longer than the classifier keeps: compare the name itself.
            [] => cmd.args.first().is_some_and(|a| self.deny.contains(&a.to_ascii_uppercase())),
            name => self.deny.contains(name),
        }
    }

    /// The policy a configuration describes.
    pub fn from_config(c: &Config) -> Policy {
        Policy {
            deny: c.security.deny.iter().map(|d| d.to_ascii_uppercase().into_bytes()).collect(),
            request_limits: RequestLimits {
                max_bulk_bytes: usize::try_from(c.limits.max_bulk_bytes).unwrap_or(usize::MAX),
                max_args: c.limits.max_args,
                max_inline_bytes: usize::try_from(c.limits.max_inline_bytes).unwrap_or(usize::MAX),
            },
            frame_deadline: c.limits.frame_deadline,
            idle_timeout: c.limits.idle_timeout,
            max_output_bytes: usize::try_from(c.limits.max_output_bytes).unwrap_or(usize::MAX),
            max_pipeline: c.limits.max_pipeline,
            ttl: Arc::new(crate::ttl::TtlPolicy::from_config(&c.ttl)),
        }
    }
}

/// What every session shares.
pub struct Context {
    /// Connections to Redis.
    pub upstream: Arc<Upstream>,
    /// The live policy (swapped atomically on reload).
    pub policy: ArcSwap<Policy>,
    /// Metric handles.
    pub metrics: &'static Metrics,
    /// The near-cache, when rules are configured and coherence is not off.
    pub cache: Option<Arc<NearCache>>,
    /// Distributed locks and serial numbers, on connections of their own.
    pub locks: Arc<crate::locks::Locks>,
    /// Set once shutdown begins: `/readyz` then fails, so no new traffic is routed here.
    pub draining: std::sync::atomic::AtomicBool,
}

/// Errors while starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot be used.
    #[error("configuration: {0}")]
    Config(String),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound, not yet running sidecache.
pub struct Server {
    listener: TcpListener,
    admin: TcpListener,
    ctx: Arc<Context>,
    config: Config,
}

/// Lets the owner reload policy while the server runs.
#[derive(Clone)]
pub struct ReloadHandle {
    ctx: Arc<Context>,
}

impl ReloadHandle {
    /// Applies the policy parts of `config` (limits, deny list, TTL rules) to new commands at
    /// once; each command reads one policy, so it sees the old rules or the new, never a mix.
    pub fn apply(&self, config: &Config) {
        self.ctx.policy.store(Arc::new(Policy::from_config(config)));
    }
}

async fn bind(addr: &str) -> Result<TcpListener, StartError> {
    let resolved = resolve_addr(addr).map_err(StartError::Config)?;
    TcpListener::bind(resolved).await.map_err(|source| StartError::Bind { addr: addr.to_string(), source })
}

impl Server {
    /// Binds the client and admin ports (port 0 picks a free one).
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let target = config.upstream_target().map_err(StartError::Config)?;
        let listener = bind(&config.listen).await?;
        let admin = bind(&config.admin_listen).await?;
        let endpoint = Endpoint {
            host: target.host.clone(),
            port: target.port,
            connect_timeout: config.upstream.connect_timeout,
            command_timeout: config.upstream.command_timeout,
            limits: ReplyLimits {
                max_depth: config.limits.max_reply_depth,
                max_reply_bytes: usize::try_from(config.limits.max_reply_bytes).unwrap_or(usize::MAX),
            },
        };
        let creds = target
            .password
            .as_ref()
            .map(|pass| Creds { user: target.username.clone().map(Into::into), pass: pass.clone().into() });
        let lock_upstream = Upstream::new(endpoint.clone(), creds.clone(), target.db, 1, config.upstream.max_backoff);
        let locks = Arc::new(crate::locks::Locks::new(&config.locks, lock_upstream));
        let upstream =
            Arc::new(Upstream::new(endpoint, creds, target.db, config.upstream.pool_size, config.upstream.max_backoff));
        let ctx = Arc::new(Context {
            upstream,
            policy: ArcSwap::from_pointee(Policy::from_config(&config)),
            metrics: Metrics::get(),
            cache: config.near_cache.active().then(|| NearCache::new(&config.near_cache)),
            locks,
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        // Serial counters are keys sidecache creates: the live TTL policy applies to them.
        let weak = Arc::downgrade(&ctx);
        let db = target.db;
        ctx.locks.set_counter_ttl(Box::new(move |key| weak.upgrade()?.policy.load().ttl.default_for(key, db)));
        Ok(Server { listener, admin, ctx, config })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("a bound listener has an address")
    }

    /// A handle to reload policy while running.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle { ctx: self.ctx.clone() }
    }

    /// Serves until `shutdown` fires, then drains within `shutdown_grace`.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server { listener, admin, ctx, config } = self;
        let background = CancellationToken::new();
        let metrics_handle = crate::metrics::install();
        tokio::spawn(crate::admin::serve(admin, ctx.clone(), metrics_handle, background.clone()));
        tokio::spawn(ctx.upstream.clone().health_loop(Duration::from_secs(1), background.clone()));
        let (sweep, recheck) = (crate::upstream::POOL_SWEEP, crate::upstream::POOL_RECHECK);
        tokio::spawn(ctx.upstream.clone().upkeep_loop(sweep, recheck, background.clone()));
        if let Some(cache) = &ctx.cache {
            tokio::spawn(crate::cache::link::run(cache.clone(), ctx.upstream.clone(), background.clone()));
        }
        tokio::spawn(ctx.locks.clone().listen(background.clone()));

        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(fd_bounded_clients(config.limits.max_clients)));
        let ids = AtomicU64::new(1);
        let sessions: Arc<DashMap<u64, Arc<Signal>>> = Arc::new(DashMap::new());
        tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), upstream = %redact_url(&config.upstream.url), "Accepting clients.");
        let mut accept_errors = 0u32;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (mut stream, _peer) = match accepted {
                Ok(a) => {
                    accept_errors = 0;
                    a
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    accept_errors = (accept_errors + 1).min(10);
                    tracing::warn!(error = %e, "Accept failed; backing off.");
                    tokio::time::sleep(Duration::from_millis(5 << accept_errors)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                ctx.metrics.clients_rejected.increment(1);
                tracker.spawn(async move {
                    let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
                    let _ = stream.shutdown().await;
                });
                continue;
            };
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let ctx = ctx.clone();
            // Each session waits on a signal of its own, raised below when the server stops.
            let stop = Arc::new(Signal::new());
            sessions.insert(id, stop.clone());
            let sessions = sessions.clone();
            tracker.spawn(async move {
                ctx.metrics.clients.increment(1.0);
                crate::session::serve(stream, ctx.clone(), id, stop).await;
                ctx.metrics.clients.decrement(1.0);
                sessions.remove(&id);
                drop(permit);
            });
        }
        drop(listener);
        ctx.draining.store(true, Ordering::Relaxed);
        // Accepting has stopped, so no session is added after this.
        for session in sessions.iter() {
            session.value().raise();
        }
        // Waiting for a lock ends now; held locks are released as their clients' sessions end.
        ctx.locks.stop_waiting();
        tracker.close();
        tracing::info!(clients = tracker.len(), grace = ?config.shutdown_grace, "Shutting down; letting clients finish.");
        if tokio::time::timeout(config.shutdown_grace, tracker.wait()).await.is_err() {
            tracing::warn!(clients = tracker.len(), "Grace period over; closing remaining clients.");
        }
        background.cancel();
    }
}

/// File descriptors kept for everything but clients and their upstream connections.
const RESERVED_FDS: u64 = 64;

/// `max_clients`, lowered as Redis lowers `maxclients` when the open-files limit cannot hold
/// that many clients: each client takes a descriptor and may need a dedicated upstream
/// connection. The soft limit is first raised as far as the hard limit allows.
fn fd_bounded_clients(max_clients: usize) -> usize {
    let wanted = (max_clients as u64).saturating_mul(2).saturating_add(RESERVED_FDS);
    let limit = match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the open-files limit; max_clients is not checked against it.");
            return max_clients;
        }
    };
    if limit >= wanted {
        return max_clients;
    }
    let fits = usize::try_from(limit.saturating_sub(RESERVED_FDS) / 2).unwrap_or(usize::MAX).max(1);
    tracing::warn!(
        max_clients,
        open_files_limit = limit,
        lowered_to = fits,
        "The open-files limit cannot hold max_clients clients (each may need two descriptors); \
         clients beyond the lower number get '-ERR max number of clients reached'."
    );
    fits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use bytes::Bytes;

    fn cmd(name: &str) -> Command {
        Command::new(vec![Bytes::copy_from_slice(name.as_bytes()), Bytes::from_static(b"x")])
    }

    #[test]
    fn deny_matches_names_of_any_length_in_any_case() {
        let long = "module.command-with-a-name-longer-than-thirty-two-bytes";
        let mut config = Config::default();
        config.security.deny = vec!["flushall".into(), long.into()];
        let policy = Policy::from_config(&config);
        assert!(policy.denies(&cmd("FLUSHALL")));
        assert!(policy.denies(&cmd("FlushAll")));
        assert!(policy.denies(&cmd(long)));
        assert!(policy.denies(&cmd(&long.to_uppercase())));
        assert!(!policy.denies(&cmd("GET")));
        assert!(!policy.denies(&cmd(&format!("{long}x"))));
        config.security.deny.clear();
        assert!(!Policy::from_config(&config).denies(&cmd("FLUSHALL")));
    }
}
