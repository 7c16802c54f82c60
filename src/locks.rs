//! Distributed locks with fencing tokens, and serial numbers: `LOCK.ACQUIRE`, `LOCK.RELEASE`,
//! `LOCK.EXTEND`, `LOCK.INFO` and `SERIAL.NEXT` (SPEC §6), answered by sidecache on top of Redis.
//!
//! Owns: argument parsing and errors for these commands, the Lua scripts that make every step
//! atomic in Redis, waiting for a lock (FIFO per instance, woken by a release published on
//! pub/sub, with a timed re-check as fallback), leases tied to the client connection
//! (`SessionLocks`: release on close, `KEEPALIVE` renewal, lost leases reported on the next
//! `LOCK.*` call), fence and serial regression repair. Does not own: reply ordering (the session
//! places the futures returned here in its reply stream) or connection handling (it reuses
//! `upstream`: a private `Upstream` registry for one multiplexed connection, `conn::open` for the
//! subscriber).
//!
//! Data in Redis, all in the upstream URL's database:
//! - `lock:<name>`: a hash `{token, fence}` with the lease as its TTL. Acquiring checks that the
//!   key does not exist, so a legacy client's `SET lock:<name> … NX` excludes and is excluded.
//! - `sidecache:lock:fence`: one counter; each acquisition takes the next value in the same
//!   script, so fences are strictly increasing across locks and instances.
//! - `serial:<name>`: a counter, `INCRBY` by the `COUNT`.
//!
//! Regressions (Redis restarted without persistence, or failed over to a replica that missed
//! writes): this instance remembers the highest fence and the highest serial per name it handed
//! out and passes them to the scripts, which move a counter found behind them past them. That
//! keeps this instance's own numbers increasing; numbers other instances handed out after this
//! instance's last call can still be repeated once, which is why fences, not locks alone, are
//! what protects a resource.
//!
//! Cancellation: a reply future is dropped when its client disconnects. Every token is
//! registered with the session *before* its acquire script is sent, and the session's release
//! at close covers registered tokens, acquired or not; the release goes over the same pipelined
//! connection, after any acquire already queued there.
//!
//! All local timing (deadlines, renewal, lost-lease detection) uses monotonic clocks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::command::Command;
use crate::config::LocksConfig;
use crate::metrics::{LockMetrics, LockOutcome};
use crate::protocol::encode::{self, Proto};
use crate::protocol::reply;
use crate::protocol::request::parse_i64;
use crate::upstream::{Batch, Creds, Handshake, PoolKey, Upstream, UpstreamError, Waiter, conn};

/// Lua helpers for counters. Lua numbers are doubles, exact only up to 2^53, while Redis
/// counters go to 2^63: so the scripts never do arithmetic on a counter. They compare decimal
/// strings (`below`), let Redis count (`INCRBY`), and return what `GET` then reads, a string.
/// Errors of Redis commands are returned as they are (`redis.pcall`), without the script's name.
macro_rules! counter_lua {
    () => {
        r#"
local function int(s)
  return s == '0' or string.find(s, '^%-?[1-9]%d*$') ~= nil
end
local function below(a, b)
  local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if na ~= nb then return na end
  if #a ~= #b then return (#a < #b) ~= na end
  if a == b then return false end
  return (a < b) ~= na
end
"#
    };
}

/// Takes the lock if free: `{1, fence, repaired}` (the fence as a string); else `{0, pttl of the
/// holder}`. A fence counter found behind the highest fence this instance handed out (Redis lost
/// data) is moved to it first. KEYS: lock, fence counter. ARGV: token, lease ms, that fence.
const ACQUIRE: &str = concat!(
    counter_lua!(),
    r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('PTTL', KEYS[1])}
end
local prev = redis.pcall('GET', KEYS[2])
if type(prev) == 'table' then return prev end
prev = prev or '0'
local repaired = 0
if int(prev) and below(prev, ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[3])
  repaired = 1
end
local r = redis.pcall('INCR', KEYS[2])
if type(r) == 'table' then return r end
local fence = redis.call('GET', KEYS[2])
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'fence', fence)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, fence, repaired}
"#
);

/// Deletes the lock if it holds the token and announces it: 1, else 0 (also for a legacy
/// client's lock, which holds no token). KEYS: lock. ARGV: token, channel, lock name (the message).
const RELEASE: &str = r#"
if redis.call('TYPE', KEYS[1]).ok == 'hash' and redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

/// Sets a new lease if the lock holds the token: 1, else 0 (also for a legacy client's lock).
/// KEYS: lock. ARGV: token, lease ms.
const EXTEND: &str = r#"
if redis.call('TYPE', KEYS[1]).ok == 'hash' and redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// `{fence, pttl}` of a held lock (the fence as a string), else nil. A lock a legacy client
/// took with `SET … NX` (any other type of key) has no fence: 0. KEYS: lock.
const INFO: &str = r#"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then
  return false
end
local fence = '0'
if kind == 'hash' then
  fence = redis.call('HGET', KEYS[1], 'fence') or '0'
end
return {fence, redis.call('PTTL', KEYS[1])}
"#;

/// Reserves `n` numbers: `{last, repaired}` (`last` as a string). A counter found behind what
/// this instance handed out is moved past it. KEYS: counter. ARGV: n, highest number handed out
/// here (empty: none yet, nothing to compare), TTL ms (0: none, and an existing TTL is never
/// changed).
const SERIAL: &str = concat!(
    counter_lua!(),
    r#"
local prev = redis.pcall('GET', KEYS[1])
if type(prev) == 'table' then return prev end
prev = prev or '0'
local repaired = 0
if ARGV[2] ~= '' and int(prev) and below(prev, ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  repaired = 1
end
local r = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(r) == 'table' then return r end
local last = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[3])
if ttl > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {last, repaired}
"#
);

/// Gives the TTL policy's default TTL for a counter key (`None`: no rule, the key keeps none).
pub type TtlLookup = Box<dyn Fn(&[u8]) -> Option<Duration> + Send + Sync>;

/// How long `LOCK.ACQUIRE` waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// No `WAIT`: one attempt.
    No,
    /// `WAIT <ms>` with ms > 0.
    For(Duration),
    /// `WAIT 0`: until acquired or the client disconnects (like `BLPOP … 0`).
    Forever,
}

/// A parsed lock or serial command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockCommand {
    /// `LOCK.ACQUIRE <name> <lease-ms> [WAIT <timeout-ms>] [KEEPALIVE]`.
    Acquire {
        /// Lock name.
        name: Bytes,
        /// Lease in milliseconds (1..=max_lease).
        lease_ms: i64,
        /// How long to wait.
        wait: Wait,
        /// Renew the lease while the connection lives.
        keepalive: bool,
    },
    /// `LOCK.RELEASE <name> <token>`.
    Release {
        /// Lock name.
        name: Bytes,
        /// The holder's token.
        token: Bytes,
    },
    /// `LOCK.EXTEND <name> <token> <lease-ms>`.
    Extend {
        /// Lock name.
        name: Bytes,
        /// The holder's token.
        token: Bytes,
        /// New lease in milliseconds, from now.
        lease_ms: i64,
    },
    /// `LOCK.INFO <name>`.
    Info {
        /// Lock name.
        name: Bytes,
    },
    /// `SERIAL.NEXT <name> [COUNT <n>]`.
    SerialNext {
        /// Counter name.
        name: Bytes,
        /// How many numbers to reserve (≥ 1).
        count: i64,
    },
}

fn err(msg: &str) -> Bytes {
    encode::error(msg)
}

fn arity(cmd: &str) -> Bytes {
    err(&format!("ERR wrong number of arguments for '{cmd}' command"))
}

fn int(arg: &[u8]) -> Result<i64, Bytes> {
    parse_i64(arg).ok_or_else(|| err("ERR value is not an integer or out of range"))
}

fn lease(arg: &[u8], cmd: &str, max_lease_ms: i64) -> Result<i64, Bytes> {
    let ms = int(arg)?;
    if ms <= 0 {
        return Err(err(&format!("ERR invalid lease in '{cmd}' command: it must be at least 1 ms")));
    }
    if ms > max_lease_ms {
        return Err(err(&format!(
            "ERR invalid lease in '{cmd}' command: it must be at most {max_lease_ms} ms (locks.max_lease)"
        )));
    }
    Ok(ms)
}

/// A copy of an argument a lock command keeps (names live in the lock tables, and a waiting
/// acquire holds its command for as long as it waits): arguments share the client's read
/// buffer, which must not stay alive with them.
fn kept(arg: &Bytes) -> Bytes {
    Bytes::copy_from_slice(arg)
}

impl LockCommand {
    /// Parses a command whose upper-case name is `name`; `Err` holds the error reply, worded as
    /// Redis words its own (`wrong number of arguments`, `value is not an integer…`, `syntax error`).
    pub fn parse(name: &[u8], args: &[Bytes], max_lease_ms: i64) -> Result<LockCommand, Bytes> {
        let p = &args[1..];
        match name {
            b"LOCK.ACQUIRE" => {
                const CMD: &str = "lock.acquire";
                if p.len() < 2 {
                    return Err(arity(CMD));
                }
                let lease_ms = lease(&p[1], CMD, max_lease_ms)?;
                let mut wait = Wait::No;
                let mut keepalive = false;
                let mut waits = false;
                let mut i = 2;
                // As in Redis's SET: a flag may repeat (`NX NX`), an option with a value may not.
                while i < p.len() {
                    if p[i].eq_ignore_ascii_case(b"KEEPALIVE") {
                        keepalive = true;
                        i += 1;
                    } else if p[i].eq_ignore_ascii_case(b"WAIT") && i + 1 < p.len() && !waits {
                        waits = true;
                        wait = match int(&p[i + 1])? {
                            t if t < 0 => return Err(err("ERR timeout is negative")),
                            0 => Wait::Forever,
                            t => Wait::For(Duration::from_millis(t as u64)),
                        };
                        i += 2;
                    } else {
                        return Err(err("ERR syntax error"));
                    }
                }
                Ok(LockCommand::Acquire { name: kept(&p[0]), lease_ms, wait, keepalive })
            }
            b"LOCK.RELEASE" => match p {
                [name, token] => Ok(LockCommand::Release { name: kept(name), token: kept(token) }),
                _ => Err(arity("lock.release")),
            },
            b"LOCK.EXTEND" => match p {
                [name, token, ms] => Ok(LockCommand::Extend {
                    name: kept(name),
                    token: kept(token),
                    lease_ms: lease(ms, "lock.extend", max_lease_ms)?,
                }),
                _ => Err(arity("lock.extend")),
            },
            b"LOCK.INFO" => match p {
                [name] => Ok(LockCommand::Info { name: kept(name) }),
                _ => Err(arity("lock.info")),
            },
            b"SERIAL.NEXT" => match p {
                [name] => Ok(LockCommand::SerialNext { name: kept(name), count: 1 }),
                [name, opt, n] if opt.eq_ignore_ascii_case(b"COUNT") => match int(n)? {
                    n if n < 1 => Err(err("ERR value is out of range, must be positive")),
                    n => Ok(LockCommand::SerialNext { name: kept(name), count: n }),
                },
                [] => Err(arity("serial.next")),
                _ => Err(err("ERR syntax error")),
            },
            _ => Err(err("ERR unknown lock command")),
        }
    }
}

/// Why a lock operation could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LockError {
    /// Redis could not be reached or the connection failed.
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// Redis answered with an error (passed to the client as is).
    #[error("Redis answered {}", String::from_utf8_lossy(.0).trim_end())]
    Redis(Bytes),
    /// Redis answered something the script cannot return.
    #[error("unexpected reply from Redis")]
    Unexpected,
    /// sidecache is shutting down; waiting stopped.
    #[error("sidecache is shutting down")]
    ShuttingDown,
}

impl LockError {
    /// The error reply for the client.
    pub fn to_reply(&self) -> Bytes {
        match self {
            LockError::Upstream(e) => e.to_reply(),
            LockError::Redis(r) => r.clone(),
            LockError::Unexpected => err("ERR sidecache: unexpected reply from Redis to a lock script"),
            LockError::ShuttingDown => err("ERR sidecache is shutting down; the lock was not acquired"),
        }
    }
}

/// A script's reply, in the shapes the scripts above return.
#[derive(Debug, PartialEq, Eq)]
enum Val {
    Nil,
    Int(i64),
    Ints(Vec<i64>),
}

/// One line after a type byte, and the rest.
fn line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nl = memchr::memchr(b'\n', buf)?;
    (nl > 0 && buf[nl - 1] == b'\r').then(|| (&buf[..nl - 1], &buf[nl + 1..]))
}

fn parse_val(frame: &Bytes) -> Result<Val, LockError> {
    if reply::is_error(frame) {
        return Err(LockError::Redis(frame.clone()));
    }
    let (kind, rest) = frame.split_first().ok_or(LockError::Unexpected)?;
    let (head, mut rest) = line(rest).ok_or(LockError::Unexpected)?;
    match kind {
        b'_' => Ok(Val::Nil),
        b'$' | b'*' if head == b"-1" => Ok(Val::Nil),
        b':' => parse_i64(head).map(Val::Int).ok_or(LockError::Unexpected),
        b'*' => {
            let n = parse_i64(head).ok_or(LockError::Unexpected)?;
            let mut out = Vec::with_capacity(n.clamp(0, 8) as usize);
            // Integers, or bulk strings holding one (counters, kept exact past 2^53).
            for _ in 0..n {
                let (k, r) = rest.split_first().ok_or(LockError::Unexpected)?;
                let (v, r) = line(r).ok_or(LockError::Unexpected)?;
                let (v, r) = match *k {
                    b':' => (v, r),
                    b'$' => {
                        let len = parse_i64(v).and_then(|l| usize::try_from(l).ok()).ok_or(LockError::Unexpected)?;
                        let body = r.get(..len).ok_or(LockError::Unexpected)?;
                        (body, r.get(len + 2..).ok_or(LockError::Unexpected)?)
                    }
                    _ => return Err(LockError::Unexpected),
                };
                out.push(parse_i64(v).ok_or(LockError::Unexpected)?);
                rest = r;
            }
            Ok(Val::Ints(out))
        }
        _ => Err(LockError::Unexpected),
    }
}

/// The payload of a pub/sub `message` frame on a RESP2 connection.
fn message_payload(frame: &[u8]) -> Option<Bytes> {
    let head = reply::head(frame)?;
    if head.len != 3 || head.first != Some(b"message") {
        return None;
    }
    let mut rest = line(frame.get(1..)?)?.1;
    let mut last = None;
    for _ in 0..3 {
        let (len, r) = line(rest.strip_prefix(b"$")?)?;
        let len = usize::try_from(parse_i64(len)?).ok()?;
        last = Some(r.get(..len)?);
        rest = r.get(len + 2..)?;
    }
    last.map(Bytes::copy_from_slice)
}

/// A 128-bit random token in hex. Unique per acquisition; not a secret.
fn new_token() -> Bytes {
    let mut out = BytesMut::with_capacity(32);
    for word in [fastrand::u64(..), fastrand::u64(..)] {
        out.put_slice(format!("{word:016x}").as_bytes());
    }
    out.freeze()
}

fn concat(prefix: &[u8], name: &[u8]) -> Bytes {
    let mut key = BytesMut::with_capacity(prefix.len() + name.len());
    key.put_slice(prefix);
    key.put_slice(name);
    key.freeze()
}

fn num(n: i64) -> Bytes {
    Bytes::copy_from_slice(itoa::Buffer::new().format(n).as_bytes())
}

fn eval(script: &'static str, keys: &[Bytes], args: &[Bytes]) -> Vec<Bytes> {
    let mut cmd = Vec::with_capacity(3 + keys.len() + args.len());
    cmd.push(Bytes::from_static(b"EVAL"));
    cmd.push(Bytes::from_static(script.as_bytes()));
    cmd.push(num(keys.len() as i64));
    cmd.extend_from_slice(keys);
    cmd.extend_from_slice(args);
    cmd
}

/// One waiter in a lock's local queue.
struct Queued {
    wake: Notify,
}

/// A place in a lock's queue; leaving it (done, timed out, or the client gone) hands the head
/// position to the next waiter.
struct QueueGuard<'a> {
    locks: &'a Locks,
    name: Bytes,
    me: Arc<Queued>,
}

impl QueueGuard<'_> {
    fn is_head(&self) -> bool {
        let queues = self.locks.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.get(&self.name).and_then(|q| q.front()).is_some_and(|f| Arc::ptr_eq(f, &self.me))
    }
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.locks.metrics.waiters.decrement(1.0);
        let mut queues = self.locks.queues.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = queues.get_mut(&self.name) else { return };
        let was_head = queue.front().is_some_and(|f| Arc::ptr_eq(f, &self.me));
        queue.retain(|q| !Arc::ptr_eq(q, &self.me));
        match queue.front() {
            None => {
                queues.remove(&self.name);
            }
            Some(next) if was_head => next.wake.notify_one(),
            Some(_) => {}
        }
    }
}

/// The lock service every session shares.
pub struct Locks {
    /// A private registry: lock traffic has its own multiplexed connection.
    upstream: Upstream,
    key: PoolKey,
    key_prefix: Bytes,
    serial_prefix: Bytes,
    fence_key: Bytes,
    channel: Bytes,
    max_lease_ms: i64,
    recheck: Duration,
    /// Local waiters per lock name, FIFO. Bounded by the clients waiting (each holds one place).
    queues: Mutex<HashMap<Bytes, VecDeque<Arc<Queued>>>>,
    /// Highest fence this instance handed out.
    fence_high: AtomicI64,
    /// Highest serial this instance handed out, per counter name: one entry per counter name
    /// the applications use (a small, application-defined set).
    serial_high: Mutex<HashMap<Bytes, i64>>,
    stopping: CancellationToken,
    /// Set by the first waiter: the release subscription is opened then, so an instance whose
    /// clients never wait costs Redis no connection for it.
    subscribe_wanted: AtomicBool,
    subscribe_now: Notify,
    ttl_for: OnceLock<TtlLookup>,
    metrics: &'static LockMetrics,
}

impl Locks {
    /// The service, with `upstream` as its own registry (a pool of one connection with the
    /// configured credentials and database).
    pub fn new(config: &LocksConfig, upstream: Upstream) -> Locks {
        let key = upstream.initial_key();
        Locks {
            upstream,
            key,
            key_prefix: Bytes::from(config.key_prefix.clone()),
            serial_prefix: Bytes::from(config.serial_prefix.clone()),
            fence_key: Bytes::from(config.fence_key.clone()),
            channel: Bytes::from(config.channel.clone()),
            max_lease_ms: i64::try_from(config.max_lease.as_millis()).unwrap_or(i64::MAX),
            recheck: config.recheck,
            queues: Mutex::new(HashMap::new()),
            fence_high: AtomicI64::new(0),
            serial_high: Mutex::new(HashMap::new()),
            stopping: CancellationToken::new(),
            subscribe_wanted: AtomicBool::new(false),
            subscribe_now: Notify::new(),
            ttl_for: OnceLock::new(),
            metrics: LockMetrics::get(),
        }
    }

    /// Installs the TTL policy's lookup for serial counter keys (once; later calls are ignored).
    pub fn set_counter_ttl(&self, lookup: TtlLookup) {
        let _ = self.ttl_for.set(lookup);
    }

    /// Ends every wait with an error (shutdown); holders keep their locks until they close.
    pub fn stop_waiting(&self) {
        self.stopping.cancel();
    }

    /// Runs commands on the lock connection, in order, in one write.
    async fn call_many(&self, cmds: &[Vec<Bytes>]) -> Vec<Result<Bytes, UpstreamError>> {
        let handle = async {
            let pool = self.upstream.pool(&self.key).await?;
            self.upstream.connection(&pool, 0).await
        };
        let handle = match handle.await {
            Ok(h) => h,
            Err(e) => return cmds.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut batch = Batch::default();
        let mut replies = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let (tx, rx) = oneshot::channel();
            encode::command(&mut batch.payload, cmd);
            batch.waiters.push(Waiter::one(tx, None));
            replies.push(rx);
        }
        if handle.send(batch).await.is_err() {
            return cmds.iter().map(|_| Err(UpstreamError::Lost)).collect();
        }
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            out.push(rx.await.unwrap_or(Err(UpstreamError::Lost)));
        }
        out
    }

    async fn call(&self, cmd: Vec<Bytes>) -> Result<Val, LockError> {
        let reply = self.call_many(std::slice::from_ref(&cmd)).await.pop().unwrap_or(Err(UpstreamError::Lost))?;
        parse_val(&reply)
    }

    fn lock_key(&self, name: &[u8]) -> Bytes {
        concat(&self.key_prefix, name)
    }

    /// One attempt: `Ok(fence)`, or `Err(pttl)` of the current holder.
    async fn try_acquire(&self, name: &[u8], token: &Bytes, lease_ms: i64) -> Result<Result<i64, i64>, LockError> {
        let floor = self.fence_high.load(Ordering::Relaxed);
        let keys = [self.lock_key(name), self.fence_key.clone()];
        match self.call(eval(ACQUIRE, &keys, &[token.clone(), num(lease_ms), num(floor)])).await? {
            Val::Ints(v) if v.len() == 3 && v[0] == 1 => {
                let fence = v[1];
                self.fence_high.fetch_max(fence, Ordering::Relaxed);
                if v[2] == 1 {
                    self.metrics.fence_regressions.increment(1);
                    tracing::warn!(
                        fence,
                        "The fence counter was behind this instance's fences (Redis lost data); moved it past them."
                    );
                }
                Ok(Ok(fence))
            }
            Val::Ints(v) if v.len() == 2 && v[0] == 0 => Ok(Err(v[1])),
            _ => Err(LockError::Unexpected),
        }
    }

    fn has_waiters(&self, name: &[u8]) -> bool {
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).contains_key(name)
    }

    fn enqueue(&self, name: &Bytes) -> QueueGuard<'_> {
        let me = Arc::new(Queued { wake: Notify::new() });
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.entry(name.clone()).or_default().push_back(me.clone());
        self.metrics.waiters.increment(1.0);
        if !self.subscribe_wanted.swap(true, Ordering::Relaxed) {
            self.subscribe_now.notify_one();
        }
        QueueGuard { locks: self, name: name.clone(), me }
    }

    /// Wakes the first local waiter of `name` (a release was announced).
    fn on_released(&self, name: &[u8]) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(head) = queues.get(name).and_then(|q| q.front()) {
            head.wake.notify_one();
        }
    }

    /// Wakes the first waiter of every lock (announcements may have been missed).
    fn wake_all(&self) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for head in queues.values().filter_map(|q| q.front()) {
            head.wake.notify_one();
        }
    }

    /// Acquires `name` with `token`: `Some(fence)`, or `None` when the wait ran out.
    ///
    /// Only the first local waiter of a lock asks Redis; the others wait for their turn, so
    /// waiters on this instance are served in arrival order. An attempt without `WAIT` while
    /// others wait here fails at once rather than overtake them. The wait ends on time even
    /// while Redis is slow to answer an attempt (see `attempt_until`).
    async fn acquire(
        self: &Arc<Self>,
        name: &Bytes,
        token: &Bytes,
        lease_ms: i64,
        wait: Wait,
    ) -> Result<Option<i64>, LockError> {
        let deadline = match wait {
            Wait::No => {
                if self.has_waiters(name) {
                    return Ok(None);
                }
                return Ok(self.try_acquire(name, token, lease_ms).await?.ok());
            }
            Wait::For(d) => Some(Instant::now() + d),
            Wait::Forever => None,
        };
        let me = self.enqueue(name);
        loop {
            // None: only a wake-up (our turn) or the deadline ends this wait.
            let mut nap = None;
            if me.is_head() {
                let Some(attempt) = self.attempt_until(name, token, lease_ms, deadline).await? else {
                    return Ok(None);
                };
                match attempt {
                    Ok(fence) => return Ok(Some(fence)),
                    // The holder's lease ends in `pttl` ms, at the latest: check then.
                    Err(pttl) if pttl > 0 => nap = Some(self.recheck.min(Duration::from_millis(pttl as u64 + 1))),
                    Err(_) => nap = Some(self.recheck),
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            let napping = async {
                match nap {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = me.me.wake.notified() => {}
                _ = napping => {}
                _ = until_deadline => return Ok(None),
                _ = self.stopping.cancelled() => return Err(LockError::ShuttingDown),
            }
        }
    }

    /// One attempt that gives up at `deadline`: `None` then. Whether an attempt Redis has not
    /// answered took the lock is unknown, so it is finished in the background and the lock
    /// given back if it did.
    async fn attempt_until(
        self: &Arc<Self>,
        name: &Bytes,
        token: &Bytes,
        lease_ms: i64,
        deadline: Option<Instant>,
    ) -> Result<Option<Result<i64, i64>>, LockError> {
        let Some(deadline) = deadline else {
            return self.try_acquire(name, token, lease_ms).await.map(Some);
        };
        let (this, name, token) = (self.clone(), name.clone(), token.clone());
        let mut attempt = Box::pin(async move {
            let result = this.try_acquire(&name, &token, lease_ms).await;
            (this, name, token, result)
        });
        tokio::select! {
            (_, _, _, result) = &mut attempt => result.map(Some),
            _ = tokio::time::sleep_until(deadline.into()) => {
                tokio::spawn(async move {
                    if let (this, name, token, Ok(Ok(_))) = attempt.await {
                        let _ = this.release(&name, &token).await;
                    }
                });
                Ok(None)
            }
        }
    }

    async fn release(&self, name: &Bytes, token: &Bytes) -> Result<bool, LockError> {
        let args = [token.clone(), self.channel.clone(), name.clone()];
        match self.call(eval(RELEASE, &[self.lock_key(name)], &args)).await? {
            Val::Int(n) => Ok(n == 1),
            _ => Err(LockError::Unexpected),
        }
    }

    async fn extend(&self, name: &[u8], token: &Bytes, lease_ms: i64) -> Result<bool, LockError> {
        match self.call(eval(EXTEND, &[self.lock_key(name)], &[token.clone(), num(lease_ms)])).await? {
            Val::Int(n) => Ok(n == 1),
            _ => Err(LockError::Unexpected),
        }
    }

    async fn info(&self, name: &[u8]) -> Result<Option<(i64, i64)>, LockError> {
        match self.call(eval(INFO, &[self.lock_key(name)], &[])).await? {
            Val::Nil => Ok(None),
            Val::Ints(v) if v.len() == 2 => Ok(Some((v[0], v[1]))),
            _ => Err(LockError::Unexpected),
        }
    }

    async fn serial_next(&self, name: &Bytes, count: i64) -> Result<i64, LockError> {
        let key = concat(&self.serial_prefix, name);
        // Only numbers this instance handed out say a counter went backwards.
        let floor = self.serial_high.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied();
        let floor_arg = floor.map_or_else(Bytes::new, num);
        let ttl = self.ttl_for.get().and_then(|f| f(&key)).map_or(0, |d| d.as_millis().max(1) as i64);
        match self.call(eval(SERIAL, &[key], &[num(count), floor_arg, num(ttl)])).await? {
            Val::Ints(v) if v.len() == 2 => {
                let last = v[0];
                if v[1] == 1 {
                    self.metrics.serial_regressions.increment(1);
                    tracing::warn!(counter = %String::from_utf8_lossy(name), floor, last, "A serial counter was behind numbers this instance handed out (Redis lost data); moved it past them.");
                }
                let mut high = self.serial_high.lock().unwrap_or_else(|p| p.into_inner());
                let entry = high.entry(name.clone()).or_insert(last);
                *entry = (*entry).max(last);
                drop(high);
                self.metrics.serial_issued.increment(count as u64);
                Ok(last)
            }
            _ => Err(LockError::Unexpected),
        }
    }

    /// Listens for release announcements until `stop` fires, from the first wait on, and
    /// reconnects with backoff. Each time the subscription is (re)established, every first
    /// waiter re-checks its lock, since announcements made meanwhile were not heard.
    pub async fn listen(self: Arc<Self>, stop: CancellationToken) {
        if !self.subscribe_wanted.load(Ordering::Relaxed) {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.subscribe_now.notified() => {}
            }
        }
        let mut failures = 0u32;
        loop {
            let mut subscribed = false;
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.subscribe(&mut subscribed) => r,
            };
            self.wake_all();
            if subscribed {
                failures = 0;
                tracing::warn!(error = %result, "Lock release subscription lost; reconnecting (waiters re-check meanwhile).");
            } else {
                tracing::debug!(error = %result, "Lock release subscription failed; retrying.");
            }
            failures += 1;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.upstream.backoff(failures)) => {}
            }
        }
    }

    async fn subscribe(&self, subscribed: &mut bool) -> UpstreamError {
        let hs = Handshake { creds: self.key.creds.clone(), db: 0, proto: Proto::Resp2, name: None };
        let (mut stream, mut reader) = match conn::open(self.upstream.endpoint(), &hs).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let cmd = encode::command_bytes(&[&b"SUBSCRIBE"[..], &self.channel]);
        if let Err(e) = stream.write_all(&cmd).await {
            return UpstreamError::Io(e.to_string());
        }
        match reader.next(&mut stream).await {
            Ok(r) if reply::is_error(&r) => return UpstreamError::Rejected(r),
            Ok(_) => {}
            Err(e) => return e,
        }
        *subscribed = true;
        self.wake_all();
        loop {
            match reader.next(&mut stream).await {
                Ok(frame) => {
                    if let Some(name) = message_payload(&frame) {
                        self.on_released(&name);
                    }
                }
                Err(e) => return e,
            }
        }
    }
}

/// One token a session registered: acquired (`held`) or being acquired.
struct Entry {
    name: Bytes,
    held: bool,
    keepalive: Option<AbortHandle>,
}

#[derive(Default)]
struct SessionState {
    closed: bool,
    tokens: HashMap<Bytes, Entry>,
    /// Locks whose `KEEPALIVE` renewal failed, with why; reported on the next `LOCK.*` call.
    lost: Vec<(Bytes, String)>,
}

struct SessionInner {
    locks: Arc<Locks>,
    state: Mutex<SessionState>,
}

/// The locks of one client connection: released when it closes, renewed while it lives.
#[derive(Clone)]
pub struct SessionLocks {
    inner: Arc<SessionInner>,
}

/// A reply computed later, as the session places it: the bytes and the budget they were charged.
pub type Reply = crate::session::Later;

impl SessionLocks {
    /// A connection's lock state.
    pub fn new(locks: Arc<Locks>) -> SessionLocks {
        SessionLocks { inner: Arc::new(SessionInner { locks, state: Mutex::new(SessionState::default()) }) }
    }

    /// Parses a lock or serial command: an error reply at once, or the future of its reply.
    pub fn command(&self, cmd: &Command, proto: Proto) -> Result<Reply, Bytes> {
        let parsed = LockCommand::parse(cmd.name(), &cmd.args, self.inner.locks.max_lease_ms)?;
        let this = self.clone();
        Ok(Box::pin(async move { (this.run(parsed, proto).await, 0) }))
    }

    /// The Redis keys a parsed `cmd` uses: the lock (and the fence counter, for an acquire),
    /// or the serial counter.
    pub fn keys(&self, cmd: &Command) -> Vec<Bytes> {
        let locks = &self.inner.locks;
        let Some(name) = cmd.args.get(1) else { return Vec::new() };
        match cmd.name() {
            b"LOCK.ACQUIRE" => vec![locks.lock_key(name), locks.fence_key.clone()],
            b"SERIAL.NEXT" => vec![concat(&locks.serial_prefix, name)],
            _ => vec![locks.lock_key(name)],
        }
    }

    /// For a client logged in as another user than the scripts run as (the upstream URL's):
    /// a no-op `EVAL` that declares `keys`, for Redis to judge that user by (the session sends
    /// it on its own shared connection). `None` when the users are the same.
    pub fn acl_probe(&self, keys: &[Bytes], creds: Option<&Creds>) -> Option<Vec<Bytes>> {
        if creds == self.inner.locks.key.creds.as_ref() {
            return None;
        }
        Some(eval("return 0", keys, &[]))
    }

    async fn run(&self, cmd: LockCommand, proto: Proto) -> Bytes {
        let locks = &self.inner.locks;
        if !matches!(cmd, LockCommand::SerialNext { .. })
            && let Some(report) = self.take_lost()
        {
            return report;
        }
        match cmd {
            LockCommand::Acquire { name, lease_ms, wait, keepalive } => {
                self.acquire(name, lease_ms, wait, keepalive, proto).await
            }
            LockCommand::Release { name, token } => match locks.release(&name, &token).await {
                Ok(released) => {
                    self.forget_of(&name, &token);
                    encode::integer(i64::from(released))
                }
                Err(e) => e.to_reply(),
            },
            LockCommand::Extend { name, token, lease_ms } => match locks.extend(&name, &token, lease_ms).await {
                Ok(extended) => {
                    if !extended {
                        self.forget_of(&name, &token);
                    }
                    encode::integer(i64::from(extended))
                }
                Err(e) => e.to_reply(),
            },
            LockCommand::Info { name } => match locks.info(&name).await {
                Ok(Some((fence, remaining))) => {
                    encode::int_fields(proto, &[("fence", fence), ("remaining_ms", remaining)])
                }
                Ok(None) => encode::null_array(proto),
                Err(e) => e.to_reply(),
            },
            LockCommand::SerialNext { name, count } => match locks.serial_next(&name, count).await {
                Ok(last) => encode::integer(last),
                Err(e) => e.to_reply(),
            },
        }
    }

    async fn acquire(&self, name: Bytes, lease_ms: i64, wait: Wait, keepalive: bool, proto: Proto) -> Bytes {
        let locks = &self.inner.locks;
        let start = Instant::now();
        let token = new_token();
        {
            let mut st = self.state();
            if st.closed {
                return err("ERR sidecache: the connection is closing");
            }
            st.tokens.insert(token.clone(), Entry { name: name.clone(), held: false, keepalive: None });
        }
        let result = locks.acquire(&name, &token, lease_ms, wait).await;
        let outcome = match &result {
            Ok(Some(_)) => LockOutcome::Acquired,
            Ok(None) => LockOutcome::Timeout,
            Err(_) => LockOutcome::Error,
        };
        locks.metrics.acquire(outcome);
        if outcome != LockOutcome::Error {
            locks.metrics.wait.record(start.elapsed().as_secs_f64());
        }
        match result {
            Ok(Some(fence)) => {
                if !self.confirm(&token, keepalive, lease_ms) {
                    // The connection closed while this was in flight: give the lock back.
                    let _ = locks.release(&name, &token).await;
                }
                encode::array(&[encode::bulk(&token), encode::integer(fence)])
            }
            Ok(None) => {
                self.forget(&token);
                encode::null_array(proto)
            }
            Err(e) => {
                // Whether an interrupted attempt ran is unknown: the token stays registered,
                // so the release at close covers it.
                if !matches!(e, LockError::Upstream(UpstreamError::Lost | UpstreamError::Timeout(_))) {
                    self.forget(&token);
                }
                e.to_reply()
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a token as held (and starts its renewal); false when the connection closed meanwhile.
    fn confirm(&self, token: &Bytes, keepalive: bool, lease_ms: i64) -> bool {
        let mut st = self.state();
        if st.closed {
            return false;
        }
        let Some(entry) = st.tokens.get_mut(token) else { return false };
        entry.held = true;
        self.inner.locks.metrics.held.increment(1.0);
        if keepalive {
            let task = renew(
                self.inner.locks.clone(),
                Arc::downgrade(&self.inner),
                entry.name.clone(),
                token.clone(),
                lease_ms,
            );
            entry.keepalive = Some(tokio::spawn(task).abort_handle());
        }
        true
    }

    /// Stops tracking a token of lock `name` (released, or no longer held). The same token
    /// named with another lock says nothing about the lock it belongs to.
    fn forget_of(&self, name: &[u8], token: &Bytes) {
        let entry = {
            let mut st = self.state();
            match st.tokens.get(token) {
                Some(e) if e.name == name => st.tokens.remove(token),
                _ => None,
            }
        };
        if let Some(entry) = entry {
            self.inner.dropped(entry);
        }
    }

    /// Stops tracking a token (its acquire failed or timed out).
    fn forget(&self, token: &Bytes) {
        let entry = self.state().tokens.remove(token);
        if let Some(entry) = entry {
            self.inner.dropped(entry);
        }
    }

    fn take_lost(&self) -> Option<Bytes> {
        let lost = std::mem::take(&mut self.state().lost);
        if lost.is_empty() {
            return None;
        }
        let list: Vec<String> = lost
            .iter()
            .map(|(name, why)| format!("'{}' ({why})", String::from_utf8_lossy(name).replace(['\r', '\n'], " ")))
            .collect();
        Some(err(&format!(
            "LOCKLOST the lease of lock {} was lost; fences handed out with it are stale; this command was not run",
            list.join(", ")
        )))
    }

    /// Releases every lock of the connection now (it closed, or sidecache is shutting down).
    pub async fn close(&self) {
        let entries: Vec<(Bytes, Entry)> = {
            let mut st = self.state();
            st.closed = true;
            st.tokens.drain().collect()
        };
        if entries.is_empty() {
            return;
        }
        let locks = self.inner.locks.clone();
        let cmds: Vec<Vec<Bytes>> = entries
            .into_iter()
            .map(|(token, entry)| {
                let cmd =
                    eval(RELEASE, &[locks.lock_key(&entry.name)], &[token, locks.channel.clone(), entry.name.clone()]);
                self.inner.dropped(entry);
                cmd
            })
            .collect();
        let patience = locks.upstream.endpoint().connect_timeout * 2;
        if tokio::time::timeout(patience, locks.call_many(&cmds)).await.is_err() {
            tracing::warn!(
                locks = cmds.len(),
                "Could not release a closed connection's locks in time; their leases will end them."
            );
        }
    }
}

impl SessionInner {
    /// Bookkeeping for a token that is no longer tracked.
    fn dropped(&self, entry: Entry) {
        if let Some(task) = entry.keepalive {
            task.abort();
        }
        if entry.held {
            self.locks.metrics.held.decrement(1.0);
        }
    }

    /// A renewal failed for good: the lock is no longer held; tell the client next time (unless
    /// the client released it meanwhile).
    fn lost(&self, token: &Bytes, name: Bytes, why: String) {
        let entry = self.state.lock().unwrap_or_else(|p| p.into_inner()).tokens.remove(token);
        let Some(mut entry) = entry else { return };
        entry.keepalive = None; // this is that task: it ends by itself
        self.dropped(entry);
        tracing::warn!(lock = %String::from_utf8_lossy(&name), reason = %why, "A KEEPALIVE lease was lost.");
        self.locks.metrics.leases_lost.increment(1);
        self.state.lock().unwrap_or_else(|p| p.into_inner()).lost.push((name, why));
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        // `close` normally ran; this covers a session that ended without it (a panic).
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.closed || st.tokens.is_empty() {
            return;
        }
        let entries: Vec<(Bytes, Entry)> = st.tokens.drain().collect();
        let locks = self.locks.clone();
        let cmds: Vec<Vec<Bytes>> = entries
            .into_iter()
            .map(|(token, entry)| {
                if let Some(task) = &entry.keepalive {
                    task.abort();
                }
                if entry.held {
                    locks.metrics.held.decrement(1.0);
                }
                eval(RELEASE, &[locks.lock_key(&entry.name)], &[token, locks.channel.clone(), entry.name])
            })
            .collect();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = locks.call_many(&cmds).await;
            });
        }
    }
}

/// Renews a `KEEPALIVE` lease every third of it while the connection lives (the session aborts
/// this task when the lock is released or the connection closes). A renewal refused by Redis
/// (the lock expired or changed hands) loses the lease at once; failures to reach Redis are
/// retried until a whole lease has passed since the last renewal, after which the lock has
/// expired in Redis for sure.
async fn renew(locks: Arc<Locks>, session: Weak<SessionInner>, name: Bytes, token: Bytes, lease_ms: i64) {
    let lease = Duration::from_millis(lease_ms as u64);
    let period = (lease / 3).max(Duration::from_millis(1));
    let mut renewed = Instant::now();
    let mut next = period;
    let why = loop {
        tokio::time::sleep(next).await;
        match locks.extend(&name, &token, lease_ms).await {
            Ok(true) => {
                renewed = Instant::now();
                next = period;
            }
            Ok(false) => break "the lock expired or another holder took it before it was renewed".to_string(),
            Err(e) if renewed.elapsed() < lease => {
                tracing::debug!(error = %e, "Lease renewal failed; retrying.");
                next = (period / 3).max(Duration::from_millis(1));
            }
            Err(e) => break format!("no renewal succeeded for a whole lease: {e}"),
        }
    };
    if let Some(session) = session.upgrade() {
        session.lost(&token, name, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect()
    }

    fn parse(list: &[&str]) -> Result<LockCommand, Bytes> {
        let a = args(list);
        LockCommand::parse(a[0].to_ascii_uppercase().as_slice(), &a, 600_000)
    }

    fn error(list: &[&str]) -> String {
        String::from_utf8(parse(list).unwrap_err().to_vec()).unwrap()
    }

    #[test]
    fn parsed_names_and_tokens_do_not_share_the_read_buffer() {
        // As the session parses them: every argument a slice of one read buffer.
        let buf = Bytes::from_static(b"LOCK.EXTENDnametoken100");
        let a = [buf.slice(0..11), buf.slice(11..15), buf.slice(15..20), buf.slice(20..23)];
        let outside = |b: &Bytes| !buf.as_ptr_range().contains(&b.as_ptr());
        match LockCommand::parse(b"LOCK.EXTEND", &a, 600_000).unwrap() {
            LockCommand::Extend { name, token, .. } => {
                assert_eq!((&name[..], &token[..]), (&b"name"[..], &b"token"[..]));
                assert!(outside(&name) && outside(&token), "a kept argument points into the read buffer");
            }
            other => panic!("parsed as {other:?}"),
        }
        let a = [buf.slice(0..11), buf.slice(11..15), buf.slice(20..23)];
        match LockCommand::parse(b"LOCK.ACQUIRE", &a, 600_000).unwrap() {
            LockCommand::Acquire { name, .. } => assert!(outside(&name), "the name points into the read buffer"),
            other => panic!("parsed as {other:?}"),
        }
        match LockCommand::parse(b"SERIAL.NEXT", &a[..2], 600_000).unwrap() {
            LockCommand::SerialNext { name, .. } => assert!(outside(&name), "the name points into the read buffer"),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn acquire_options_parse() {
        assert_eq!(
            parse(&["lock.acquire", "a", "100", "wait", "0", "KEEPALIVE"]).unwrap(),
            LockCommand::Acquire { name: "a".into(), lease_ms: 100, wait: Wait::Forever, keepalive: true }
        );
        assert_eq!(
            parse(&["LOCK.ACQUIRE", "a", "100", "WAIT", "250"]).unwrap(),
            LockCommand::Acquire {
                name: "a".into(),
                lease_ms: 100,
                wait: Wait::For(Duration::from_millis(250)),
                keepalive: false
            }
        );
        assert_eq!(
            parse(&["serial.next", "s", "count", "5"]).unwrap(),
            LockCommand::SerialNext { name: "s".into(), count: 5 }
        );
    }

    #[test]
    fn bad_arguments_get_redis_style_errors() {
        assert_eq!(error(&["lock.acquire", "a"]), "-ERR wrong number of arguments for 'lock.acquire' command\r\n");
        assert_eq!(error(&["lock.acquire", "a", "x"]), "-ERR value is not an integer or out of range\r\n");
        assert!(error(&["lock.acquire", "a", "0"]).starts_with("-ERR invalid lease in 'lock.acquire' command"));
        assert!(error(&["lock.acquire", "a", "-5"]).starts_with("-ERR invalid lease"));
        assert!(error(&["lock.acquire", "a", "600001"]).contains("at most 600000 ms"));
        assert_eq!(error(&["lock.acquire", "a", "10", "WAIT"]), "-ERR syntax error\r\n");
        assert_eq!(error(&["lock.acquire", "a", "10", "FOREVER"]), "-ERR syntax error\r\n");
        assert_eq!(error(&["lock.acquire", "a", "10", "WAIT", "-1"]), "-ERR timeout is negative\r\n");
        assert_eq!(error(&["lock.release", "a"]), "-ERR wrong number of arguments for 'lock.release' command\r\n");
        assert_eq!(error(&["lock.extend", "a", "t"]), "-ERR wrong number of arguments for 'lock.extend' command\r\n");
        assert!(error(&["lock.extend", "a", "t", "0"]).starts_with("-ERR invalid lease in 'lock.extend'"));
        assert_eq!(error(&["lock.info"]), "-ERR wrong number of arguments for 'lock.info' command\r\n");
        assert_eq!(error(&["serial.next"]), "-ERR wrong number of arguments for 'serial.next' command\r\n");
        assert_eq!(error(&["serial.next", "s", "COUNT"]), "-ERR syntax error\r\n");
        assert_eq!(error(&["serial.next", "s", "COUNT", "0"]), "-ERR value is out of range, must be positive\r\n");
        assert_eq!(error(&["serial.next", "s", "COUNT", "x"]), "-ERR value is not an integer or out of range\r\n");
    }

    #[test]
    fn script_replies_parse() {
        assert_eq!(parse_val(&Bytes::from_static(b"*3\r\n:1\r\n:42\r\n:0\r\n")).unwrap(), Val::Ints(vec![1, 42, 0]));
        assert_eq!(parse_val(&Bytes::from_static(b"$-1\r\n")).unwrap(), Val::Nil);
        assert_eq!(parse_val(&Bytes::from_static(b":0\r\n")).unwrap(), Val::Int(0));
        assert!(matches!(parse_val(&Bytes::from_static(b"-WRONGTYPE x\r\n")), Err(LockError::Redis(_))));
        assert!(matches!(parse_val(&Bytes::from_static(b"*1\r\n$1\r\nx\r\n")), Err(LockError::Unexpected)));
        // Counters come back as strings, exact past 2^53.
        assert_eq!(
            parse_val(&Bytes::from_static(b"*3\r\n:1\r\n$16\r\n9007199254740993\r\n:0\r\n")).unwrap(),
            Val::Ints(vec![1, 9007199254740993, 0])
        );
        assert!(matches!(parse_val(&Bytes::from_static(b"*1\r\n$5\r\n12\r\n")), Err(LockError::Unexpected)));
    }

    #[test]
    fn release_messages_are_recognised() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n$4\r\na\r\nb\r\n";
        assert_eq!(message_payload(msg), Some(Bytes::from_static(b"a\r\nb")));
        assert_eq!(message_payload(b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n"), None);
    }

    #[test]
    fn tokens_are_128_bit_hex_and_unique() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert!(a.iter().all(u8::is_ascii_hexdigit));
        assert_ne!(a, b);
    }

    #[test]
    fn lock_config_problems_are_listed() {
        let mut c = crate::Config::default();
        c.locks.max_lease = Duration::ZERO;
        c.locks.serial_prefix = c.locks.key_prefix.clone();
        c.locks.channel.clear();
        let problems = c.validate().unwrap_err().problems;
        for key in ["locks.max_lease", "locks.serial_prefix", "locks.channel"] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} not reported: {problems:?}");
        }
    }
}
