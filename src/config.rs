//! Typed configuration: defaults, layering (built-in < file < environment < CLI), validation.
//!
//! Owns: every configuration key, its default (as a named const), how durations (`"500ms"`) and
//! sizes (`"64MiB"`) are written, the `SIDECACHE_*` environment mapping, `validate()` (which
//! lists every problem, not just the first), and the redacted rendering for `--print-config`.
//! Does not own: what the settings do once loaded.
//!
//! The environment is read through a caller-supplied list of `(name, value)` pairs, so tests
//! never touch the process environment.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Default client listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6380";
/// Default admin HTTP listen address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";
/// Default upstream URL.
pub const DEFAULT_UPSTREAM: &str = "redis://127.0.0.1:6379";
/// Default time in-flight commands get to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Runtime worker threads by default: one, like Redis's own event loop. Measured on 2 cores
/// (README "Benchmarks"), a second thread mostly adds wake-ups between the two.
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// Most worker threads accepted.
pub const MAX_WORKER_THREADS: usize = 64;
/// Default pipelined connections per (user, database, protocol).
pub const DEFAULT_POOL_SIZE: usize = 2;
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default longest wait for a reply on a shared connection.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on reconnect backoff.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Default maximum of client connections (Redis `maxclients` default).
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// Default longest bulk argument (Redis `proto-max-bulk-len`).
pub const DEFAULT_MAX_BULK: u64 = 512 * 1024 * 1024;
/// Default most arguments per command.
pub const DEFAULT_MAX_ARGS: usize = 1024 * 1024;
/// Default longest inline command (Redis `PROTO_INLINE_MAX_SIZE`).
pub const DEFAULT_MAX_INLINE: u64 = 64 * 1024;
/// Default deepest reply nesting accepted from Redis.
pub const DEFAULT_MAX_REPLY_DEPTH: usize = 1024;
/// Default largest single reply accepted from Redis.
pub const DEFAULT_MAX_REPLY: u64 = 1024 * 1024 * 1024;
/// Default time a started request frame may take to complete.
pub const DEFAULT_FRAME_DEADLINE: Duration = Duration::from_secs(30);
/// Default cap of reply bytes waiting to be written to one client.
pub const DEFAULT_MAX_OUTPUT: u64 = 256 * 1024 * 1024;
/// Default commands in flight per client before sidecache stops reading it.
pub const DEFAULT_MAX_PIPELINE: usize = 1024;
/// Default byte budget of the near-cache.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Default largest cached reply.
pub const DEFAULT_CACHE_VALUE_BYTES: u64 = 1024 * 1024;
/// Default longest life of a cached entry.
pub const DEFAULT_CACHE_MAX_TTL: Duration = Duration::from_secs(300);
/// Default interval of the coherence link's heartbeat.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
/// Default time without a heartbeat answer after which the cache is flushed and bypassed.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default channel of the `pubsub` coherence mode.
pub const DEFAULT_INVALIDATE_CHANNEL: &str = "sidecache:invalidate";
/// Default longest life of an entry in `pubsub` mode, where writes that bypass sidecache are
/// not seen.
pub const DEFAULT_PUBSUB_MAX_TTL: Duration = Duration::from_secs(1);
/// Default prefix of lock keys (`lock:<name>`).
pub const DEFAULT_LOCK_PREFIX: &str = "lock:";
/// Default longest lease a client may ask for.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(600);
/// Default prefix of serial counters (`serial:<name>`).
pub const DEFAULT_SERIAL_PREFIX: &str = "serial:";
/// Default key of the fence counter shared by every lock.
pub const DEFAULT_FENCE_KEY: &str = "sidecache:lock:fence";
/// Default pub/sub channel on which releases are announced.
pub const DEFAULT_LOCK_CHANNEL: &str = "sidecache:lock:released";
/// Default longest time a waiter goes without re-checking its lock when no release is heard.
pub const DEFAULT_LOCK_RECHECK: Duration = Duration::from_secs(1);
/// Commands denied by default.
pub const DEFAULT_DENY: [&str; 3] = ["DEBUG", "SHUTDOWN", "MONITOR"];

/// Exit code for configuration problems (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address clients connect to.
    pub listen: String,
    /// Address of the admin HTTP server (`/metrics`, `/livez`, `/readyz`).
    pub admin_listen: String,
    /// Time in-flight commands get to finish after SIGTERM/SIGINT.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Threads that run client sessions and upstream connections.
    pub worker_threads: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `sidecache=debug,info`…).
    pub log_level: String,
    /// The Redis server.
    pub upstream: UpstreamConfig,
    /// Protective limits.
    pub limits: LimitsConfig,
    /// The near-cache.
    pub near_cache: NearCacheConfig,
    /// Commands refused by policy.
    pub security: SecurityConfig,
    /// TTL policy by key prefix (`crate::ttl` owns the section).
    pub ttl: crate::ttl::TtlConfig,
    /// Distributed locks and serial numbers.
    pub locks: LocksConfig,
}

/// How the near-cache learns about writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CoherenceMode {
    /// The strongest mode the server supports (`tracking`, else `pubsub`).
    #[default]
    Auto,
    /// Redis server-assisted client-side caching, broadcast mode.
    Tracking,
    /// sidecache instances publish the keys they write; short entry lifetime.
    Pubsub,
    /// No coherence: the near-cache is not used.
    Off,
}

impl CoherenceMode {
    /// The name used in config, metrics and `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            CoherenceMode::Auto => "auto",
            CoherenceMode::Tracking => "tracking",
            CoherenceMode::Pubsub => "pubsub",
            CoherenceMode::Off => "off",
        }
    }
}

/// `[near_cache]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NearCacheConfig {
    /// Whether any read is answered from memory.
    pub enabled: bool,
    /// Memory budget of cached replies (keys, replies and bookkeeping).
    #[serde(with = "size")]
    pub max_bytes: u64,
    /// Replies larger than this are not cached.
    #[serde(with = "size")]
    pub max_value_bytes: u64,
    /// Longest life of an entry (a rule may lower it).
    #[serde(with = "duration")]
    pub max_ttl: Duration,
    /// How invalidations arrive.
    pub coherence: CoherenceMode,
    /// Share of hits re-read from Redis to detect stale entries (0.0 to 1.0).
    pub verify_sample_rate: f64,
    /// Heartbeat interval of the invalidation link.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// A heartbeat unanswered this long takes the cache down (flushed and bypassed).
    #[serde(with = "duration")]
    pub heartbeat_timeout: Duration,
    /// Channel of the `pubsub` mode.
    pub pubsub_channel: String,
    /// Longest life of an entry in `pubsub` mode.
    #[serde(with = "duration")]
    pub pubsub_max_ttl: Duration,
    /// Which keys are cached.
    pub rules: Vec<CacheRuleConfig>,
}

/// `[[near_cache.rules]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRuleConfig {
    /// The metric label.
    pub name: String,
    /// Key prefix (`""` caches every key).
    pub prefix: String,
    /// Only this database, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<u32>,
    /// Longest life of this rule's entries, if lower than the global one.
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<Duration>,
}

impl Default for NearCacheConfig {
    fn default() -> Self {
        NearCacheConfig {
            enabled: true,
            max_bytes: DEFAULT_CACHE_BYTES,
            max_value_bytes: DEFAULT_CACHE_VALUE_BYTES,
            max_ttl: DEFAULT_CACHE_MAX_TTL,
            coherence: CoherenceMode::Auto,
            verify_sample_rate: 0.0,
            heartbeat: DEFAULT_HEARTBEAT,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            pubsub_channel: DEFAULT_INVALIDATE_CHANNEL.into(),
            pubsub_max_ttl: DEFAULT_PUBSUB_MAX_TTL,
            rules: Vec::new(),
        }
    }
}

impl NearCacheConfig {
    /// True when some reads may be answered from memory.
    pub fn active(&self) -> bool {
        self.enabled && self.coherence != CoherenceMode::Off && !self.rules.is_empty()
    }

    fn check(&self, problems: &mut Vec<String>) {
        if self.max_bytes == 0 {
            problems.push("near_cache.max_bytes: must be greater than 0".into());
        }
        if self.max_value_bytes == 0 || self.max_value_bytes > self.max_bytes {
            problems.push("near_cache.max_value_bytes: must be between 1 byte and near_cache.max_bytes".into());
        }
        if self.max_ttl.is_zero() {
            problems.push("near_cache.max_ttl: must be greater than 0".into());
        }
        if !(0.0..=1.0).contains(&self.verify_sample_rate) {
            problems.push("near_cache.verify_sample_rate: must be between 0.0 and 1.0".into());
        }
        if self.heartbeat.is_zero() || self.heartbeat_timeout <= self.heartbeat {
            problems.push("near_cache.heartbeat_timeout: must be longer than near_cache.heartbeat (> 0)".into());
        }
        if self.pubsub_channel.is_empty() {
            problems.push("near_cache.pubsub_channel: must not be empty".into());
        }
        if self.pubsub_max_ttl.is_zero() {
            problems.push("near_cache.pubsub_max_ttl: must be greater than 0".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("near_cache.rules[{i}]");
            if rule.name.is_empty() || !rule.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                problems.push(format!("{at}.name: {:?} must be a non-empty metric label ([A-Za-z0-9_-])", rule.name));
            }
            if !seen.insert((rule.prefix.clone(), rule.db)) {
                problems.push(format!("{at}: another rule has the same prefix {:?} and db", rule.prefix));
            }
            // The name is the `rule` label of the cache metrics: two rules would share series.
            if let Some(j) = self.rules[..i].iter().position(|r| r.name == rule.name) {
                problems.push(format!("{at}.name: {:?} is also near_cache.rules[{j}]'s name", rule.name));
            }
            if rule.max_ttl.is_some_and(|t| t.is_zero()) {
                problems.push(format!("{at}.max_ttl: must be greater than 0"));
            }
        }
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `redis://[user:pass@]host:port[/db]`.
    pub url: String,
    /// A file holding the password (a mounted Kubernetes Secret); overrides the URL's password.
    pub password_file: Option<PathBuf>,
    /// Pipelined connections per (user, database, protocol).
    pub pool_size: usize,
    /// Connect (and handshake) timeout.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Commands on a shared connection that get no reply at all for this long make sidecache
    /// drop that connection and answer them with `-ERR` (`0s`: wait forever). Blocking
    /// commands run on dedicated connections and are not subject to it.
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// Cap of the reconnect backoff.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most client connections; more are refused with Redis's error.
    pub max_clients: usize,
    /// Longest bulk argument in a request.
    #[serde(with = "size")]
    pub max_bulk_bytes: u64,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command or length header.
    #[serde(with = "size")]
    pub max_inline_bytes: u64,
    /// Deepest nesting accepted in a reply from Redis.
    pub max_reply_depth: usize,
    /// Largest single reply accepted from Redis.
    #[serde(with = "size")]
    pub max_reply_bytes: u64,
    /// Time a started request may take to arrive completely (`0s` = no deadline).
    #[serde(with = "duration")]
    pub frame_deadline: Duration,
    /// Idle client connections are closed after this (`0s` = never, like Redis `timeout 0`).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Reply bytes waiting for one client beyond which it is disconnected (Redis's
    /// client-output-buffer-limit behaviour).
    #[serde(with = "size")]
    pub max_output_bytes: u64,
    /// Commands in flight per client; beyond it sidecache stops reading that client.
    pub max_pipeline: usize,
}

/// `[security]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Command names answered with `-NOPERM` instead of being forwarded.
    pub deny: Vec<String>,
}

/// `[locks]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocksConfig {
    /// Prefix of the Redis key holding a lock (`lock:<name>`).
    pub key_prefix: String,
    /// Longest lease `LOCK.ACQUIRE`/`LOCK.EXTEND` accept.
    #[serde(with = "duration")]
    pub max_lease: Duration,
    /// Prefix of the Redis key holding a serial counter (`serial:<name>`).
    pub serial_prefix: String,
    /// Key of the one fence counter shared by every lock and every sidecache instance.
    pub fence_key: String,
    /// Pub/sub channel on which releases are announced to waiters on every instance.
    pub channel: String,
    /// Longest time a waiter goes without re-checking its lock when no release is heard (a lost
    /// pub/sub message then costs this much latency, never correctness).
    #[serde(with = "duration")]
    pub recheck: Duration,
}

impl Default for LocksConfig {
    fn default() -> Self {
        LocksConfig {
            key_prefix: DEFAULT_LOCK_PREFIX.into(),
            max_lease: DEFAULT_MAX_LEASE,
            serial_prefix: DEFAULT_SERIAL_PREFIX.into(),
            fence_key: DEFAULT_FENCE_KEY.into(),
            channel: DEFAULT_LOCK_CHANNEL.into(),
            recheck: DEFAULT_LOCK_RECHECK,
        }
    }
}

impl LocksConfig {
    /// Adds every problem with `[locks]` to `problems`.
    fn check(&self, problems: &mut Vec<String>) {
        if self.max_lease < Duration::from_millis(1) {
            problems.push("locks.max_lease: must be at least 1ms".into());
        }
        if self.recheck < Duration::from_millis(1) {
            problems.push("locks.recheck: must be at least 1ms".into());
        }
        if self.fence_key.is_empty() {
            problems.push("locks.fence_key: must not be empty".into());
        }
        if self.channel.is_empty() {
            problems.push("locks.channel: must not be empty".into());
        }
        if self.key_prefix == self.serial_prefix {
            problems.push("locks.serial_prefix: must differ from locks.key_prefix".into());
        }
        if !self.key_prefix.is_empty() && self.fence_key.starts_with(&self.key_prefix) {
            problems.push("locks.fence_key: must not start with locks.key_prefix (it would be a lock)".into());
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.into(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            worker_threads: DEFAULT_WORKER_THREADS,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            upstream: UpstreamConfig::default(),
            limits: LimitsConfig::default(),
            near_cache: NearCacheConfig::default(),
            security: SecurityConfig::default(),
            ttl: crate::ttl::TtlConfig::default(),
            locks: LocksConfig::default(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: DEFAULT_UPSTREAM.into(),
            password_file: None,
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_clients: DEFAULT_MAX_CLIENTS,
            max_bulk_bytes: DEFAULT_MAX_BULK,
            max_args: DEFAULT_MAX_ARGS,
            max_inline_bytes: DEFAULT_MAX_INLINE,
            max_reply_depth: DEFAULT_MAX_REPLY_DEPTH,
            max_reply_bytes: DEFAULT_MAX_REPLY,
            frame_deadline: DEFAULT_FRAME_DEADLINE,
            idle_timeout: Duration::ZERO,
            max_output_bytes: DEFAULT_MAX_OUTPUT,
            max_pipeline: DEFAULT_MAX_PIPELINE,
        }
    }
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig { deny: DEFAULT_DENY.iter().map(|s| s.to_string()).collect() }
    }
}

/// Values given on the command line; each overrides every other source.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--log-level`.
    pub log_level: Option<String>,
}

/// Everything wrong with a configuration, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// The problems, each naming its key.
    pub problems: Vec<String>,
}

/// The keys read only at start; every other key applies on reload (the README's "Reload"
/// column says when).
pub const RESTART_ONLY: &[&str] = &[
    "listen",
    "admin_listen",
    "shutdown_grace",
    "worker_threads",
    "log_format",
    "log_level",
    "upstream.url",
    "upstream.password_file",
    "upstream.pool_size",
    "upstream.connect_timeout",
    "upstream.command_timeout",
    "upstream.max_backoff",
    "limits.max_clients",
    "limits.max_reply_depth",
    "limits.max_reply_bytes",
    "near_cache.enabled",
    "near_cache.max_bytes",
    "near_cache.max_value_bytes",
    "near_cache.max_ttl",
    "near_cache.coherence",
    "near_cache.verify_sample_rate",
    "near_cache.heartbeat",
    "near_cache.heartbeat_timeout",
    "near_cache.pubsub_channel",
    "near_cache.pubsub_max_ttl",
    "near_cache.rules",
    "locks.key_prefix",
    "locks.max_lease",
    "locks.serial_prefix",
    "locks.fence_key",
    "locks.channel",
    "locks.recheck",
];

/// Top-level keys, and the `SIDECACHE_<KEY>` names that map onto them.
const ENV_KEYS: [(&str, &str); 13] = [
    ("LISTEN", "listen"),
    ("ADMIN_LISTEN", "admin_listen"),
    ("SHUTDOWN_GRACE", "shutdown_grace"),
    ("WORKER_THREADS", "worker_threads"),
    ("LOG_FORMAT", "log_format"),
    ("LOG_LEVEL", "log_level"),
    ("UPSTREAM", "upstream.url"),
    ("UPSTREAM__", "upstream."),
    ("LIMITS__", "limits."),
    ("SECURITY__", "security."),
    ("NEAR_CACHE__", "near_cache."),
    ("TTL__", "ttl."),
    ("LOCKS__", "locks."),
];

/// Maps `SIDECACHE_FOO__BAR` to `foo.bar`; `None` for names that are not configuration (for
/// example the `SIDECACHE_PORT` variables Kubernetes injects for a Service named sidecache).
fn env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("SIDECACHE_")?;
    for (env, key) in ENV_KEYS {
        if let Some(tail) = env.strip_suffix("__") {
            if let Some(field) = rest.strip_prefix(env) {
                if !field.is_empty() && !field.contains("__") {
                    return Some(format!("{}{}", key, field.to_ascii_lowercase()));
                }
                let _ = tail;
            }
        } else if rest == env {
            return Some(key.to_string());
        }
    }
    None
}

/// Parses an environment value the way a TOML value would be written, falling back to a string.
fn env_value(raw: &str) -> figment::value::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(t) => match t.get("v").cloned() {
            Some(v) => figment::value::Value::serialize(v).unwrap_or_else(|_| raw.into()),
            None => raw.into(),
        },
        Err(_) => raw.into(),
    }
}

impl Config {
    /// Loads the configuration from the built-in defaults, `file` (if any), the environment
    /// pairs and the CLI overrides, then validates it.
    pub fn load(file: Option<&Path>, env: &[(String, String)], cli: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError { problems: vec![format!("config file {} does not exist", path.display())] });
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        // Keys set from the environment, with the variable that set them (to name it in problems).
        let mut from_env: Vec<(String, &str)> = Vec::new();
        for (name, value) in env {
            if let Some(key) = env_key(name) {
                fig = fig.merge(Serialized::default(&key, env_value(value)));
                from_env.retain(|(k, _)| *k != key);
                from_env.push((key, name));
            }
        }
        let pairs = [
            ("listen", cli.listen.clone()),
            ("upstream.url", cli.upstream.clone()),
            ("admin_listen", cli.admin_listen.clone()),
            ("log_level", cli.log_level.clone()),
            ("log_format", cli.log_format.map(|f| if f == LogFormat::Json { "json".into() } else { "text".into() })),
        ];
        for (key, value) in pairs {
            if let Some(value) = value {
                fig = fig.merge(Serialized::default(key, value));
                from_env.retain(|(k, _)| k != key);
            }
        }
        // The layers merged as one tree first (a file that is not TOML fails here), then typed.
        let tree: figment::value::Value = fig.extract().map_err(|err| ConfigError {
            problems: err.into_iter().map(|e| e.to_string().replace("default.", "")).collect(),
        })?;
        let (config, mut problems) = typed(tree);
        if let Some(config) = &config
            && let Err(e) = config.validate()
        {
            problems.extend(e.problems);
        }
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError { problems: problems.into_iter().map(|p| name_env_source(p, &from_env)).collect() }),
        }
    }

    /// Checks every value; lists every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bound = Vec::new();
        for (key, addr) in [("listen", &self.listen), ("admin_listen", &self.admin_listen)] {
            match resolve(addr) {
                Ok(a) => bound.push(a),
                Err(e) => problems.push(format!("{key}: {e}")),
            }
        }
        if let [a, b] = bound[..]
            && a == b
            && a.port() != 0
        {
            problems.push(format!("admin_listen: {a} is also the client address (listen)"));
        }
        if !(1..=MAX_WORKER_THREADS).contains(&self.worker_threads) {
            problems.push(format!("worker_threads: must be between 1 and {MAX_WORKER_THREADS}"));
        }
        match UpstreamTarget::parse(&self.upstream.url) {
            Ok(_) => {}
            Err(e) => problems.push(format!("upstream.url: {e}")),
        }
        if let Some(path) = &self.upstream.password_file
            && let Err(e) = std::fs::read(path)
        {
            problems.push(format!("upstream.password_file: cannot read {}: {e}", path.display()));
        }
        if self.upstream.pool_size == 0 || self.upstream.pool_size > 64 {
            problems.push("upstream.pool_size: must be between 1 and 64".into());
        }
        if self.upstream.connect_timeout.is_zero() {
            problems.push("upstream.connect_timeout: must be greater than 0".into());
        }
        let l = &self.limits;
        let positive = [
            ("limits.max_clients", l.max_clients as u64),
            ("limits.max_bulk_bytes", l.max_bulk_bytes),
            ("limits.max_args", l.max_args as u64),
            ("limits.max_inline_bytes", l.max_inline_bytes),
            ("limits.max_reply_depth", l.max_reply_depth as u64),
            ("limits.max_reply_bytes", l.max_reply_bytes),
            ("limits.max_output_bytes", l.max_output_bytes),
            ("limits.max_pipeline", l.max_pipeline as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        if l.max_args > i32::MAX as usize {
            problems.push("limits.max_args: must be at most 2147483647".into());
        }
        if l.max_bulk_bytes > DEFAULT_MAX_BULK * 4 {
            problems.push("limits.max_bulk_bytes: must be at most 2GiB".into());
        }
        for name in &self.security.deny {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push(format!("security.deny: {name:?} is not a command name"));
            }
        }
        self.near_cache.check(&mut problems);
        problems.extend(self.ttl.problems());
        self.locks.check(&mut problems);
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            problems.push(format!("log_level: {:?} is not a valid log filter", self.log_level));
        }
        if problems.is_empty() { Ok(()) } else { Err(ConfigError { problems }) }
    }

    /// The effective configuration as TOML, with secrets replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.upstream.url = redact_url(&shown.upstream.url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    /// The keys read only at start (the README's `restart` keys) whose value differs in `new`:
    /// a reload accepts them but does not apply them.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let (Ok(old), Ok(new)) = (toml::Table::try_from(self), toml::Table::try_from(new)) else {
            return Vec::new();
        };
        let get = |table: &toml::Table, key: &str| {
            let mut parts = key.split('.');
            let mut value = table.get(parts.next()?)?;
            for part in parts {
                value = value.get(part)?;
            }
            Some(value.clone())
        };
        RESTART_ONLY.iter().copied().filter(|key| get(&old, key) != get(&new, key)).collect()
    }

    /// The upstream target, with the password file applied.
    pub fn upstream_target(&self) -> Result<UpstreamTarget, String> {
        let mut target = UpstreamTarget::parse(&self.upstream.url)?;
        if let Some(path) = &self.upstream.password_file {
            let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let trimmed = raw.strip_suffix(b"\n").unwrap_or(&raw);
            let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
            target.password = Some(trimmed.to_vec());
        }
        Ok(target)
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr:?} is not a host:port address ({e})"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// Resolves a configured `host:port` to one socket address.
pub fn resolve_addr(addr: &str) -> Result<SocketAddr, String> {
    resolve(addr)
}

/// A problem about a key that an environment variable set, with the variable named:
/// `limits.max_clients: … (from SIDECACHE_LIMITS__MAX_CLIENTS)`. An unknown key is reported at
/// its table (`limits: unknown field: found `max_clientz` …`), so that form is matched as well.
fn name_env_source(problem: String, from_env: &[(String, &str)]) -> String {
    let source = from_env.iter().find(|(key, _)| {
        problem.strip_prefix(key.as_str()).is_some_and(|rest| rest.starts_with(':'))
            || key
                .rsplit_once('.')
                .is_some_and(|(table, field)| problem.starts_with(&format!("{table}: unknown field: found `{field}`")))
    });
    match source {
        Some((_, var)) => format!("{problem} (from {var})"),
        None => problem,
    }
}

/// Types the merged configuration tree, listing every key that does not fit rather than the
/// first: each such key is reported, then set back to its default (or, if unknown, dropped)
/// and the rest typed again. The configuration is `None` when a problem could not be set aside.
fn typed(mut tree: figment::value::Value) -> (Option<Config>, Vec<String>) {
    use figment::error::Kind;
    use figment::value::Value;
    /// The dictionary at `path`.
    fn dict<'a>(tree: &'a mut Value, path: &[String]) -> Option<&'a mut figment::value::Dict> {
        let mut node = tree;
        for key in path {
            let Value::Dict(_, d) = node else { return None };
            node = d.get_mut(key)?;
        }
        match node {
            Value::Dict(_, d) => Some(d),
            _ => None,
        }
    }
    let defaults = Value::serialize(Config::default()).ok();
    let mut problems = Vec::new();
    // Each round sets at least one key aside, and there are only so many keys.
    for _ in 0..256 {
        let errors = match tree.deserialize::<Config>() {
            Ok(config) => return (Some(config), problems),
            Err(errors) => errors,
        };
        let mut set_aside = false;
        for e in errors {
            // A path may start with figment's profile name ("default", which is also the name
            // of a TTL rule's key, so only a leading one is dropped).
            let skip = usize::from(e.path.first().is_some_and(|k| k == "default") && e.path.len() > 1);
            let path: Vec<String> = e.path[skip..].to_vec();
            let shown = path.join(".");
            let place = match &e.kind {
                Kind::UnknownField(field, _) => {
                    show_path(path.strip_suffix(std::slice::from_ref(field)).unwrap_or(&path))
                }
                _ => show_path(&path),
            };
            problems.push(if place.is_empty() { e.kind.to_string() } else { format!("{place}: {}", e.kind) });
            // A problem inside a rule sets the whole rule aside: it becomes a placeholder that
            // passes every check, so the other rules keep their numbers in later problems.
            if let Some(at) = (1..path.len()).find(|&i| path[i].parse::<usize>().is_ok())
                && let Some(Value::Array(_, rules)) =
                    dict(&mut tree, &path[..at - 1]).and_then(|d| d.get_mut(&path[at - 1]))
                && let Ok(i) = path[at].parse::<usize>()
                && let Some(placeholder) = set_aside_rule(&path[..at], i)
                && let Some(rule) = rules.get_mut(i)
            {
                set_aside |= *rule != placeholder;
                *rule = placeholder;
                continue;
            }
            set_aside |= match (&e.kind, path.split_last()) {
                (Kind::UnknownField(field, _), _) => {
                    let parent = path.strip_suffix(std::slice::from_ref(field)).unwrap_or(&path);
                    dict(&mut tree, parent).is_some_and(|d| d.remove(field).is_some())
                }
                (_, Some((last, parent))) => {
                    let default = defaults.clone().and_then(|d| d.find(&shown));
                    match (dict(&mut tree, parent), default) {
                        (Some(d), Some(v)) => d.insert(last.clone(), v).is_some_and(|old| old != d[last]),
                        (Some(d), None) => d.remove(last).is_some(),
                        (None, _) => false,
                    }
                }
                _ => false,
            };
        }
        if !set_aside {
            break;
        }
    }
    (None, problems)
}

/// A key path as problems name it: `ttl.rules[1].default`.
fn show_path(path: &[String]) -> String {
    let mut out = String::new();
    for key in path {
        if key.parse::<usize>().is_ok() {
            out.push_str(&format!("[{key}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
    }
    out
}

/// A rule that passes every check and matches no key, standing in for a rule that does not
/// parse while the rest of the configuration is checked.
fn set_aside_rule(array: &[String], index: usize) -> Option<figment::value::Value> {
    use figment::value::Value;
    let prefix = format!("\0rule {index}, set aside");
    match (array.first()?.as_str(), array.get(1)?.as_str()) {
        ("ttl", "rules") => Value::serialize(crate::ttl::TtlRuleConfig {
            name: None,
            prefix,
            db: None,
            default: Duration::from_secs(1),
            max: None,
        })
        .ok(),
        ("near_cache", "rules") => {
            Value::serialize(CacheRuleConfig { name: "set_aside".into(), prefix, db: None, max_ttl: None }).ok()
        }
        _ => None,
    }
}

/// The URL with its password replaced by `***` (for logs and `--print-config`).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => url.to_string(),
        // Not a URL (a `/` or `@` left unencoded in the password, a bad port): everything
        // between the scheme and the last `@` after the user name may be a secret.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s + 3 => {
                let user = url[s + 3..at].split(':').next().unwrap_or("");
                format!("{}{user}:***{}", &url[..s + 3], &url[at..])
            }
            _ => url.to_string(),
        },
    }
}

/// Where and as whom sidecache connects to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// ACL user, if any.
    pub username: Option<Vec<u8>>,
    /// Password, if any.
    pub password: Option<Vec<u8>>,
    /// Database selected for clients that never send `SELECT`.
    pub db: u32,
}

impl UpstreamTarget {
    /// Parses `redis://[user:pass@]host:port[/db]`.
    pub fn parse(raw: &str) -> Result<UpstreamTarget, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("{:?} is not a URL ({e})", redact_url(raw)))?;
        match url.scheme() {
            "redis" => {}
            "rediss" => return Err("TLS upstreams (rediss://) are not supported yet".into()),
            other => return Err(format!("scheme {other:?} is not supported (use redis://)")),
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("the URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = url.port().unwrap_or(6379);
        let decode = |s: &str| -> Vec<u8> { percent_encoding::percent_decode_str(s).collect() };
        let username = Some(url.username()).filter(|u| !u.is_empty()).map(decode);
        let password = url.password().map(decode);
        let path = url.path().trim_start_matches('/');
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<u32>().map_err(|_| format!("database {path:?} is not a number"))?
        };
        Ok(UpstreamTarget { host, port, username, password, db })
    }
}

/// Serde for durations written with a unit: `"500ms"`, `"30s"`, `"5m"`, `"6h"`, `"1d"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the duration back in the same notation.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string().replace(' ', ""))
    }

    /// Reads a duration string with a unit.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = String::deserialize(d)?;
        parse(&raw).map_err(serde::de::Error::custom)
    }

    /// Parses `"500ms"`, `"1d"`, `"0s"`; a bare number is refused because its unit is unclear.
    pub fn parse(raw: &str) -> Result<Duration, String> {
        humantime::parse_duration(raw.trim())
            .map_err(|e| format!("{raw:?} is not a duration with a unit such as 500ms, 30s, 5m, 6h or 1d ({e})"))
    }
}

/// Serde for optional durations (`max_ttl = "1h"` or absent).
pub mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the duration like `duration` does.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Reads an optional duration string with a unit.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let raw = Option::<String>::deserialize(d)?;
        raw.map(|r| super::duration::parse(&r).map_err(serde::de::Error::custom)).transpose()
    }
}

/// Serde for sizes written with a unit: `"64MiB"`, `"512KiB"`, `"1GiB"`.
pub mod size {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the size with the largest exact binary unit.
    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&render(*n))
    }

    /// Reads a size string with a unit (or a plain number of bytes).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(n),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }

    /// Parses `"64MiB"`, `"1 GiB"`, `"4096"`.
    pub fn parse(raw: &str) -> Result<u64, String> {
        raw.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| format!("{raw:?} is not a size such as 64MiB ({e})"))
    }

    /// `67108864` → `"64MiB"`.
    pub fn render(n: u64) -> String {
        for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= scale && n.is_multiple_of(scale) {
                return format!("{}{unit}", n / scale);
            }
        }
        format!("{n}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_changes_names_the_changed_keys() {
        let running = Config::default();
        assert!(running.restart_only_changes(&running.clone()).is_empty());
        let mut new = running.clone();
        new.upstream.pool_size += 1;
        new.listen = "127.0.0.1:7000".into();
        new.near_cache.rules.push(CacheRuleConfig { name: "r".into(), prefix: "k:".into(), db: None, max_ttl: None });
        // A live key is not reported.
        new.limits.max_args += 1;
        assert_eq!(running.restart_only_changes(&new), ["listen", "upstream.pool_size", "near_cache.rules"]);
    }

    #[test]
    fn restart_only_keys_are_the_readmes_restart_keys() {
        let readme = include_str!("../README.md");
        let documented: Vec<&str> = readme
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                (cells.len() > 5 && cells[4] == "restart").then(|| cells[1].trim_matches('`'))
            })
            // A rule's fields change with `near_cache.rules`.
            .filter(|key| !key.contains("[]"))
            .collect();
        assert_eq!(documented, RESTART_ONLY, "the README's Reload column and RESTART_ONLY disagree");
    }

    #[test]
    fn restart_only_keys_exist() {
        let table = toml::Table::try_from(Config::default()).unwrap();
        for key in RESTART_ONLY {
            let mut parts = key.split('.');
            let top = parts.next().unwrap();
            let section = table.get(top);
            let found = match parts.next() {
                None => section.is_some(),
                // An empty list (near_cache.rules) or an unset option is left out of the table.
                Some(k) => {
                    section.and_then(|s| s.get(k)).is_some()
                        || ["near_cache.rules", "upstream.password_file"].contains(key)
                }
            };
            assert!(found, "{key} is not a configuration key");
        }
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn precedence_is_cli_then_env_then_file() {
        let dir = std::env::temp_dir().join(format!("sidecache-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7000\"\nadmin_listen = \"127.0.0.1:7001\"\n[limits]\nmax_clients = 5\n",
        )
        .unwrap();
        let env = vec![
            ("SIDECACHE_ADMIN_LISTEN".to_string(), "127.0.0.1:7002".to_string()),
            ("SIDECACHE_LIMITS__MAX_OUTPUT_BYTES".to_string(), "1MiB".to_string()),
            ("SIDECACHE_UPSTREAM".to_string(), "redis://10.0.0.1:6390/2".to_string()),
            ("SIDECACHE_PORT_6380_TCP".to_string(), "tcp://10.0.0.9:6380".to_string()),
        ];
        let cli = Overrides { listen: Some("127.0.0.1:7003".into()), ..Default::default() };
        let c = Config::load(Some(&file), &env, &cli).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7003");
        assert_eq!(c.admin_listen, "127.0.0.1:7002");
        assert_eq!(c.limits.max_clients, 5);
        assert_eq!(c.limits.max_output_bytes, 1 << 20);
        assert_eq!(c.upstream_target().unwrap().db, 2);
    }

    #[test]
    fn problems_with_values_from_the_environment_name_the_variable() {
        let env = [
            ("SIDECACHE_LIMITS__MAX_CLIENTS".to_string(), "lots".to_string()),
            ("SIDECACHE_LIMITS__MAX_ARGS".to_string(), "0".to_string()),
            ("SIDECACHE_LIMITS__MAX_CLIENTZ".to_string(), "3".to_string()),
            ("SIDECACHE_LOG_LEVEL".to_string(), "[[".to_string()),
            ("SIDECACHE_LISTEN".to_string(), "nowhere".to_string()),
        ];
        // The command line's --listen wins over the environment, so its problem is not the variable's.
        let cli = Overrides { listen: Some("nowhere either".into()), ..Default::default() };
        let problems = Config::load(None, &env, &cli).unwrap_err().problems;
        let line = |start: &str| problems.iter().find(|p| p.starts_with(start)).cloned().unwrap_or_default();
        assert!(line("limits.max_clients:").ends_with("(from SIDECACHE_LIMITS__MAX_CLIENTS)"), "{problems:?}");
        assert!(line("limits.max_args:").ends_with("(from SIDECACHE_LIMITS__MAX_ARGS)"), "{problems:?}");
        assert!(
            line("limits: unknown field: found `max_clientz`").ends_with("(from SIDECACHE_LIMITS__MAX_CLIENTZ)"),
            "{problems:?}"
        );
        assert!(line("log_level:").ends_with("(from SIDECACHE_LOG_LEVEL)"), "{problems:?}");
        let listen = line("listen:");
        assert!(listen.contains("nowhere either") && !listen.contains("SIDECACHE_"), "{problems:?}");
        assert_eq!(problems.len(), 5, "{problems:?}");
    }

    #[test]
    fn a_rule_that_does_not_parse_hides_no_other_problem() {
        let dir = std::env::temp_dir().join(format!("sidecache-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rules.toml");
        std::fs::write(
            &file,
            "worker_threads = 100\n\
             [[ttl.rules]]\nprefix = \"a:\"\ndefault = \"10m\"\nmax = \"1m\"\n\
             [[ttl.rules]]\nprefix = \"b:\"\ndefault = \"10x\"\n\
             [[ttl.rules]]\nprefix = \"c:\"\ndefault = \"1m\"\nmax = \"zz\"\n\
             [[near_cache.rules]]\nname = \"n\"\nprefix = \"n:\"\nmax_ttl = \"5q\"\n",
        )
        .unwrap();
        let problems = Config::load(Some(&file), &[], &Overrides::default()).unwrap_err().problems;
        for start in [
            "worker_threads:",
            "ttl.rules[0].max: 1m is shorter than default 10m",
            "ttl.rules[1].default: \"10x\" is not a duration",
            "ttl.rules[2].max: \"zz\" is not a duration",
            "near_cache.rules[0].max_ttl: \"5q\" is not a duration",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(start)), "{start} missing from {problems:?}");
        }
        assert_eq!(problems.len(), 5, "{problems:?}");
        // Two near-cache rules with one name would share their metric series.
        std::fs::write(
            &file,
            "[[near_cache.rules]]\nname = \"n\"\nprefix = \"a:\"\n[[near_cache.rules]]\nname = \"n\"\nprefix = \"b:\"\n",
        )
        .unwrap();
        let problems = Config::load(Some(&file), &[], &Overrides::default()).unwrap_err().problems;
        assert_eq!(problems, ["near_cache.rules[1].name: \"n\" is also near_cache.rules[0]'s name"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_problem_is_listed() {
        let mut c = Config { listen: "nowhere".into(), ..Default::default() };
        c.upstream.url = "http://x".into();
        c.limits.max_clients = 0;
        let problems = c.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn units_round_trip() {
        assert_eq!(size::parse("64MiB").unwrap(), 64 << 20);
        assert_eq!(size::render(64 << 20), "64MiB");
        assert_eq!(duration::parse("1d").unwrap(), Duration::from_secs(86400));
        assert!(duration::parse("10").is_err());
    }

    #[test]
    fn urls_parse_with_credentials_and_db() {
        let t = UpstreamTarget::parse("redis://app:s%40cret@localhost:6390/3").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("localhost", 6390, 3));
        assert_eq!(t.username.as_deref(), Some(&b"app"[..]));
        assert_eq!(t.password.as_deref(), Some(&b"s@cret"[..]));
        let mut c = Config::default();
        c.upstream.url = "redis://app:secret@localhost:6390".into();
        assert!(!c.to_redacted_toml().contains("secret"));
    }
}
