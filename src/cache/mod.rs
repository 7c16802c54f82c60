//! The near-cache: hot keys' read replies held in memory and kept coherent with Redis.
//!
//! Owns: the store (a byte-bounded `quick_cache` with lazy expiry), the rules that select keys,
//! the partition by user and database, and the coherence rules of ARCHITECTURE.md:
//!
//! 1. **Fill tokens.** Before a miss is sent to Redis, `lookup` notes the generation of the key's
//!    stripe; every invalidation of a key in that stripe bumps it, and a flush bumps the global
//!    epoch. A reply is stored only if neither moved, checked under the stripe's lock, so a
//!    reply that raced an invalidation is dropped.
//! 2. **Writes through this instance** (`begin_write`) invalidate their keys before they are
//!    forwarded and again when their reply arrives, before the client sees it; while a write is
//!    in flight, its keys are neither answered from memory nor filled. So a client, its
//!    pipeline and every other client of this instance read their writes.
//! 3. **Coherence down** (link lost, heartbeat missed, reconnect, flush-all): everything is
//!    flushed and reads bypass the cache until the link is back (`link`).
//! 4. Invalidations name keys, not databases: a key is dropped for every database and user.
//! 5. Every entry expires at the earliest of the rule's max TTL and the key's own TTL in Redis
//!    (`PTTL`, read with the fill), both counted from the lookup, which comes before Redis read
//!    the TTL, less a millisecond for `PTTL`'s rounding; a key in its last millisecond is not
//!    stored.
//!
//! Concurrent misses of one (user, database, protocol, key, view) share one upstream read: the
//! first is the *leader* and later ones wait for its reply. Does not own: the invalidation link
//! (`link`), command shapes (`reads`) or the keys a write touches (`writes`).

pub mod command;
pub mod link;
pub mod reads;
pub mod writes;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{BufMut, Bytes, BytesMut};
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};
use tokio::sync::{mpsc, oneshot};

use crate::config::{CoherenceMode, NearCacheConfig};
use crate::metrics::{CacheMetrics, RuleMetrics};
use crate::protocol::encode::Proto;
use crate::protocol::reply;
pub use reads::{Plan, Read, Shape, Stored};
pub use writes::{CommandTable, Written};

/// Stripes of fill generations and in-flight reads.
const STRIPES: usize = 1024;
/// Bytes counted per entry and per reply beyond their payload (bookkeeping).
const ENTRY_OVERHEAD: usize = 96;
const ITEM_OVERHEAD: usize = 64;

/// Index into `EVICTION_REASONS`.
#[derive(Debug, Clone, Copy)]
enum Eviction {
    Capacity = 0,
    Expired = 1,
    Invalidated = 2,
    Flushed = 3,
}

/// Index into `INVALIDATION_SOURCES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Redis's tracking invalidation.
    Tracking = 0,
    /// Another instance's pub/sub message.
    Pubsub = 1,
    /// A write through this instance.
    Local = 2,
    /// A flush of everything.
    Flush = 3,
}

/// Who is reading: cached replies are never shared across users, databases are separate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Who {
    /// The ACL identity (empty: the upstream URL's own credentials).
    pub user: Bytes,
    /// Selected database.
    pub db: u32,
    /// The client's protocol.
    pub proto: Proto,
}

struct Rule {
    name: String,
    prefix: Bytes,
    db: Option<u32>,
    max_ttl: Duration,
    metrics: RuleMetrics,
    entries: AtomicI64,
    bytes: AtomicI64,
}

/// One cached reply of one key.
#[derive(Clone)]
struct Item {
    user: Bytes,
    db: u32,
    view: Bytes,
    rule: u16,
    stored: Stored,
    expires: Instant,
}

impl Item {
    fn weight(&self) -> usize {
        self.user.len() + self.view.len() + self.stored.weight() + ITEM_OVERHEAD
    }
}

/// Everything cached of one key: the replies of each view for each (user, db).
struct Entry {
    items: Vec<Item>,
}

#[derive(Clone)]
struct Weigh;

impl Weighter<Bytes, Arc<Entry>> for Weigh {
    fn weight(&self, key: &Bytes, entry: &Arc<Entry>) -> u64 {
        (key.len() + ENTRY_OVERHEAD + entry.items.iter().map(Item::weight).sum::<usize>()) as u64
    }
}

/// Counts what the store evicts on its own (capacity).
#[derive(Clone)]
struct Evictions {
    rules: Arc<[Rule]>,
}

impl Lifecycle<Bytes, Arc<Entry>> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), key: Bytes, entry: Arc<Entry>) {
        account(&self.rules, &key, &entry, -1, Some(Eviction::Capacity));
    }
}

/// Adds (`sign` 1) or removes (`sign` -1) an entry's items from the per-rule gauges.
fn account(rules: &[Rule], key: &Bytes, entry: &Entry, sign: i64, why: Option<Eviction>) {
    for (i, item) in entry.items.iter().enumerate() {
        let Some(rule) = rules.get(item.rule as usize) else { continue };
        let mut bytes = item.weight() as i64;
        if i == 0 {
            bytes += (key.len() + ENTRY_OVERHEAD) as i64;
        }
        rule.entries.fetch_add(sign, Ordering::Relaxed);
        rule.bytes.fetch_add(sign * bytes, Ordering::Relaxed);
        rule.metrics.entries.increment(sign as f64);
        rule.metrics.bytes.increment((sign * bytes) as f64);
        if let Some(why) = why {
            rule.metrics.evictions[why as usize].increment(1);
        }
    }
}

type Store = quick_cache::sync::Cache<Bytes, Arc<Entry>, Weigh, DefaultHashBuilder, Evictions>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    who: Who,
    key: Bytes,
    view: Bytes,
}

/// Readers waiting for one upstream read.
#[derive(Default)]
struct Flight {
    waiters: Mutex<Vec<oneshot::Sender<Bytes>>>,
}

#[derive(Default)]
struct Stripe {
    /// Bumped by every invalidation of a key of this stripe.
    generation: AtomicU64,
    /// Writes through this instance in flight on keys of this stripe.
    writing: AtomicU32,
    flights: Mutex<HashMap<FlightKey, Arc<Flight>>>,
}

/// Counters behind `SIDECACHE CACHE STATS`.
#[derive(Default)]
struct Totals {
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    stale: AtomicU64,
}

/// A key write announced to other instances (pub/sub coherence).
#[derive(Debug, Clone)]
pub enum Announce {
    /// These keys changed.
    Keys(Vec<Bytes>),
    /// Everything may have changed.
    All,
}

/// Announcements kept while the link is down, at most this many keys (then: flush everything).
const MAX_PENDING_KEYS: usize = 10_000;

/// Where announcements go: the link's queue, or, while it is down, a list it sends first when
/// it is back (writes through this instance go on while its link reconnects).
#[derive(Default)]
struct Announcer {
    link: Option<mpsc::UnboundedSender<Announce>>,
    pending: Vec<Announce>,
    pending_keys: usize,
}

/// The near-cache shared by every session.
pub struct NearCache {
    rules: Arc<[Rule]>,
    store: Store,
    stripes: Box<[Stripe]>,
    hasher: DefaultHashBuilder,
    epoch: AtomicU64,
    up: AtomicBool,
    writing_all: AtomicU32,
    table: ArcSwap<CommandTable>,
    /// The mode in use: 0 none, 1 tracking, 2 pubsub.
    mode: AtomicU8,
    down_reason: Mutex<String>,
    max_value: usize,
    verify_rate: f64,
    pubsub_max_ttl: Duration,
    metrics: CacheMetrics,
    totals: Totals,
    announce: Mutex<Announcer>,
    /// Whether written keys are announced: in pub/sub mode, the last one established (and,
    /// before any, unless tracking is configured), so that writes while the link is down
    /// are announced once it is back.
    announce_keys: AtomicBool,
    /// The configuration it was built from (the link reads its settings).
    pub config: NearCacheConfig,
}

/// The result of looking a read up.
pub enum Lookup {
    /// Not cacheable now: forward the command as usual.
    Skip,
    /// The reply, from memory.
    Hit(Bytes),
    /// Not in memory, and nobody is reading it: this caller is the leader and must send the
    /// read (and `PTTL`) and complete the fill.
    Lead(Fill),
    /// Not in memory; another reader's read is in flight and its reply will arrive here.
    Join(oneshot::Receiver<Bytes>),
}

/// The leader's right to store the reply of one read.
pub struct Fill {
    cache: Arc<NearCache>,
    stripe: usize,
    generation: u64,
    epoch: u64,
    fkey: FlightKey,
    flight: Arc<Flight>,
    rule: u16,
    shape: Shape,
    /// When the miss was looked up: before Redis read the key's TTL.
    looked_up: Instant,
    done: bool,
}

impl NearCache {
    /// A cache for `config` (which must be `active()` to be useful).
    pub fn new(config: &NearCacheConfig) -> Arc<NearCache> {
        let mut rules: Vec<&crate::config::CacheRuleConfig> = config.rules.iter().collect();
        // The longest prefix wins; among equal prefixes, a rule for one database first.
        rules.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(b.db.is_some().cmp(&a.db.is_some())));
        let rules: Arc<[Rule]> = rules
            .into_iter()
            .map(|r| Rule {
                name: r.name.clone(),
                prefix: Bytes::copy_from_slice(r.prefix.as_bytes()),
                db: r.db,
                max_ttl: r.max_ttl.map_or(config.max_ttl, |t| t.min(config.max_ttl)),
                metrics: RuleMetrics::new(&r.name),
                entries: AtomicI64::new(0),
                bytes: AtomicI64::new(0),
            })
            .collect();
        let max_bytes = config.max_bytes.max(1);
        let items = usize::try_from(max_bytes / 512).unwrap_or(1 << 20).clamp(64, 1 << 22);
        let store =
            Store::with(items, max_bytes, Weigh, DefaultHashBuilder::default(), Evictions { rules: rules.clone() });
        Arc::new(NearCache {
            rules,
            store,
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            hasher: DefaultHashBuilder::default(),
            epoch: AtomicU64::new(0),
            up: AtomicBool::new(false),
            writing_all: AtomicU32::new(0),
            table: ArcSwap::from_pointee(CommandTable::default()),
            mode: AtomicU8::new(0),
            down_reason: Mutex::new("the invalidation link is not established yet".into()),
            max_value: usize::try_from(config.max_value_bytes).unwrap_or(usize::MAX),
            verify_rate: config.verify_sample_rate,
            pubsub_max_ttl: config.pubsub_max_ttl,
            metrics: CacheMetrics::new(),
            totals: Totals::default(),
            announce: Mutex::new(Announcer::default()),
            announce_keys: AtomicBool::new(config.coherence != CoherenceMode::Tracking),
            config: config.clone(),
        })
    }

    /// True while reads may be answered from memory.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Why the cache is not used right now.
    pub fn down_reason(&self) -> String {
        self.down_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The coherence mode in use (`None` while down).
    pub fn mode(&self) -> Option<CoherenceMode> {
        match self.mode.load(Ordering::Relaxed) {
            1 => Some(CoherenceMode::Tracking),
            2 => Some(CoherenceMode::Pubsub),
            _ => None,
        }
    }

    /// The key prefixes to track: the smallest set covering every rule and the link's probe
    /// keys (Redis refuses overlapping prefixes in one `CLIENT TRACKING` call, so a rule for
    /// `_` covers the probe's `__sidecache:probe:`, and the probe's covers a rule under it).
    pub fn tracked_prefixes(&self) -> Vec<Bytes> {
        let mut all: Vec<Bytes> = self.rules.iter().map(|r| r.prefix.clone()).collect();
        all.push(Bytes::from_static(link::PROBE_PREFIX.as_bytes()));
        all.sort_by_key(|p| p.len());
        let mut out: Vec<Bytes> = Vec::new();
        for p in all {
            if !out.iter().any(|q| p.starts_with(q)) {
                out.push(p);
            }
        }
        out
    }

    fn rule_for(&self, db: u32, key: &[u8]) -> Option<u16> {
        self.rules.iter().position(|r| key.starts_with(&r.prefix) && r.db.is_none_or(|d| d == db)).map(|i| i as u16)
    }

    fn covered(&self, key: &[u8]) -> bool {
        self.rules.iter().any(|r| key.starts_with(&r.prefix))
    }

    fn stripe_of(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    /// Looks a read up for `who`.
    pub fn lookup(self: &Arc<Self>, who: &Who, read: &Read) -> Lookup {
        if !self.is_up() || self.writing_all.load(Ordering::Acquire) > 0 {
            return Lookup::Skip;
        }
        let Some(rule) = self.rule_for(who.db, &read.key) else { return Lookup::Skip };
        let s = self.stripe_of(&read.key);
        let stripe = &self.stripes[s];
        if stripe.writing.load(Ordering::Acquire) > 0 {
            return Lookup::Skip;
        }
        if let Some(entry) = self.store.get(&read.key[..])
            && let Some(item) = entry.items.iter().find(|i| {
                i.db == who.db && i.user == who.user && (i.view == read.view || read.hit_also.as_ref() == Some(&i.view))
            })
        {
            if item.expires > Instant::now() {
                self.rules[rule as usize].metrics.hits.increment(1);
                self.totals.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(item.stored.reply(who.proto).clone());
            }
            let _guard = stripe.flights.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((k, e)) = self.store.remove_if(&read.key[..], |e| Arc::ptr_eq(e, &entry)) {
                account(&self.rules, &k, &e, -1, Some(Eviction::Expired));
            }
        }
        self.rules[rule as usize].metrics.misses.increment(1);
        self.totals.misses.fetch_add(1, Ordering::Relaxed);
        let fkey = FlightKey { who: who.clone(), key: read.key.clone(), view: read.view.clone() };
        let mut flights = stripe.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = flights.get(&fkey) {
            let (tx, rx) = oneshot::channel();
            flight.waiters.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
            return Lookup::Join(rx);
        }
        let flight = Arc::new(Flight::default());
        flights.insert(fkey.clone(), flight.clone());
        let generation = stripe.generation.load(Ordering::Acquire);
        drop(flights);
        let fill = Fill {
            cache: self.clone(),
            stripe: s,
            generation,
            epoch: self.epoch.load(Ordering::Acquire),
            fkey,
            flight,
            rule,
            shape: read.shape,
            looked_up: Instant::now(),
            done: false,
        };
        Lookup::Lead(fill)
    }

    /// Drops every cached reply of `key` (all users and databases) and voids its fills.
    pub fn invalidate(&self, key: &[u8], source: Source) {
        self.metrics.invalidations[source as usize].increment(1);
        self.totals.invalidations.fetch_add(1, Ordering::Relaxed);
        self.drop_key(key);
    }

    fn drop_key(&self, key: &[u8]) {
        let stripe = &self.stripes[self.stripe_of(key)];
        let mut flights = stripe.flights.lock().unwrap_or_else(|p| p.into_inner());
        stripe.generation.fetch_add(1, Ordering::AcqRel);
        if !flights.is_empty() {
            flights.retain(|f, _| f.key != key);
        }
        if let Some((k, e)) = self.store.remove(key) {
            account(&self.rules, &k, &e, -1, Some(Eviction::Invalidated));
        }
    }

    /// Drops everything and voids every fill in flight.
    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.metrics.invalidations[Source::Flush as usize].increment(1);
        self.totals.flushes.fetch_add(1, Ordering::Relaxed);
        for stripe in self.stripes.iter() {
            let mut flights = stripe.flights.lock().unwrap_or_else(|p| p.into_inner());
            stripe.generation.fetch_add(1, Ordering::AcqRel);
            flights.clear();
        }
        for (k, e) in self.store.drain() {
            account(&self.rules, &k, &e, -1, Some(Eviction::Flushed));
        }
    }

    /// Marks coherence established in `mode` with the server's command table; starts from empty.
    pub fn set_up(&self, mode: CoherenceMode, table: CommandTable) {
        self.table.store(Arc::new(table));
        self.flush();
        let m = match mode {
            CoherenceMode::Tracking => 1,
            _ => 2,
        };
        self.mode.store(m, Ordering::Relaxed);
        self.announce_keys.store(m == 2, Ordering::Relaxed);
        self.metrics.mode[0].set(if m == 1 { 1.0 } else { 0.0 });
        self.metrics.mode[1].set(if m == 2 { 1.0 } else { 0.0 });
        self.up.store(true, Ordering::Release);
        self.metrics.up.set(1.0);
    }

    /// Marks coherence lost: flush and bypass until `set_up`.
    pub fn set_down(&self, reason: &str) {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        *self.down_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_string();
        self.metrics.up.set(0.0);
        self.mode.store(0, Ordering::Relaxed);
        for g in &self.metrics.mode {
            g.set(0.0);
        }
        self.flush();
        if was_up {
            tracing::warn!(reason, "Near-cache coherence lost; the cache is flushed and bypassed until it is back.");
        }
    }

    /// Records the invalidation lag measured by the link's probe.
    pub fn record_lag(&self, lag: Duration) {
        self.metrics.lag.record(lag.as_secs_f64());
    }

    /// Where writes are announced to other instances, or `None` while the link is down: they
    /// are kept until it is back, then sent first.
    pub fn set_announcer(&self, tx: Option<mpsc::UnboundedSender<Announce>>) {
        let mut a = self.announce.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = &tx {
            for what in a.pending.drain(..) {
                let _ = tx.send(what);
            }
            a.pending_keys = 0;
        }
        a.link = tx;
    }

    fn announce(&self, what: Announce) {
        let mut a = self.announce.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = &a.link
            && tx.send(what.clone()).is_ok()
        {
            return;
        }
        a.pending_keys += match &what {
            Announce::Keys(keys) => keys.len(),
            Announce::All => 0,
        };
        if matches!(what, Announce::All) || a.pending_keys > MAX_PENDING_KEYS {
            a.pending = vec![Announce::All];
            a.pending_keys = 0;
        } else if !matches!(a.pending.first(), Some(Announce::All)) {
            a.pending.push(what);
        }
    }

    /// Announces a write before it is forwarded: its keys are invalidated now and again when
    /// the returned guard is dropped (when the write's reply has arrived). `None` when the write
    /// touches nothing cacheable.
    pub fn begin_write(self: &Arc<Self>, cmd: &crate::command::Command) -> Option<WriteGuard> {
        let written = self.table.load().written(cmd);
        self.begin(written)
    }

    /// `begin_write` for a write sidecache makes itself (locks, serial counters) on `keys`.
    pub fn begin_keys(self: &Arc<Self>, keys: Vec<Bytes>) -> Option<WriteGuard> {
        self.begin(Written::Keys(keys))
    }

    fn begin(self: &Arc<Self>, written: Written) -> Option<WriteGuard> {
        match written {
            Written::Nothing => None,
            Written::Keys(mut keys) => {
                keys.retain(|k| self.covered(k));
                if keys.is_empty() {
                    return None;
                }
                for k in &keys {
                    self.stripes[self.stripe_of(k)].writing.fetch_add(1, Ordering::AcqRel);
                    self.invalidate(k, Source::Local);
                }
                Some(WriteGuard { cache: self.clone(), keys, all: false })
            }
            Written::All => {
                self.writing_all.fetch_add(1, Ordering::AcqRel);
                self.flush();
                Some(WriteGuard { cache: self.clone(), keys: Vec::new(), all: true })
            }
        }
    }

    /// How long an entry of `rule` may live, from its lookup, for a key whose `PTTL` was
    /// `key_ttl` (-1: none; -2: no key, and the reply says so); `None`: not worth storing.
    /// `PTTL` rounds down, so the key may end up to a millisecond before `key_ttl`.
    fn entry_ttl(&self, rule: u16, key_ttl: i64) -> Option<Duration> {
        let mut ttl = self.rules[rule as usize].max_ttl;
        if self.mode() == Some(CoherenceMode::Pubsub) {
            ttl = ttl.min(self.pubsub_max_ttl);
        }
        match key_ttl {
            0 | 1 => None,
            t if t > 1 => Some(ttl.min(Duration::from_millis(t as u64 - 1))),
            _ => Some(ttl),
        }
    }

    /// Whether this hit should be re-read from Redis (shadow verify).
    pub fn sample_verify(&self) -> bool {
        self.verify_rate > 0.0 && fastrand::f64() < self.verify_rate
    }

    /// A token to check later that `key` was not invalidated meanwhile.
    pub fn token(&self, key: &[u8]) -> (usize, u64, u64) {
        let s = self.stripe_of(key);
        (s, self.stripes[s].generation.load(Ordering::Acquire), self.epoch.load(Ordering::Acquire))
    }

    /// True when nothing invalidated the token's stripe or flushed since it was taken.
    pub fn token_valid(&self, token: (usize, u64, u64)) -> bool {
        self.stripes[token.0].generation.load(Ordering::Acquire) == token.1
            && self.epoch.load(Ordering::Acquire) == token.2
    }

    /// Counts a hit that differed from Redis with no invalidation, and drops the entry.
    pub fn stale_detected(&self, key: &[u8]) {
        self.metrics.stale.increment(1);
        self.totals.stale.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("Shadow verify: a cached reply differed from Redis; dropping it.");
        self.drop_key(key);
    }

    /// `SIDECACHE CACHE STATS` as field/value pairs.
    pub fn stats(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("coherence".into(), self.mode().map_or("down", |m| m.as_str()).to_string()),
            ("configured_coherence".into(), self.config.coherence.as_str().to_string()),
            ("entries".into(), self.rules.iter().map(|r| r.entries.load(Ordering::Relaxed)).sum::<i64>().to_string()),
            ("bytes".into(), self.store.weight().to_string()),
            ("max_bytes".into(), self.store.capacity().to_string()),
            ("hits".into(), self.totals.hits.load(Ordering::Relaxed).to_string()),
            ("misses".into(), self.totals.misses.load(Ordering::Relaxed).to_string()),
            ("invalidations".into(), self.totals.invalidations.load(Ordering::Relaxed).to_string()),
            ("flushes".into(), self.totals.flushes.load(Ordering::Relaxed).to_string()),
            ("stale_detected".into(), self.totals.stale.load(Ordering::Relaxed).to_string()),
        ];
        if !self.is_up() {
            out.push(("down_reason".into(), self.down_reason()));
        }
        for r in self.rules.iter() {
            out.push((format!("rule:{}:entries", r.name), r.entries.load(Ordering::Relaxed).to_string()));
            out.push((format!("rule:{}:bytes", r.name), r.bytes.load(Ordering::Relaxed).to_string()));
        }
        out
    }

    /// `SIDECACHE CACHE INFO <key>` for `who`: each cached view with its rule and time left.
    pub fn info(&self, who: &Who, key: &[u8]) -> Vec<(Bytes, String, u64)> {
        let Some(entry) = self.store.peek(key) else { return Vec::new() };
        let now = Instant::now();
        entry
            .items
            .iter()
            .filter(|i| i.db == who.db && i.user == who.user && i.expires > now)
            .map(|i| {
                let name = self.rules.get(i.rule as usize).map_or("", |r| r.name.as_str()).to_string();
                (i.view.clone(), name, (i.expires - now).as_millis() as u64)
            })
            .collect()
    }
}

/// Keys being written through this instance; dropping it invalidates them again.
pub struct WriteGuard {
    cache: Arc<NearCache>,
    keys: Vec<Bytes>,
    all: bool,
}

impl WriteGuard {
    /// Adds another write's keys (a transaction's commands end together at `EXEC`).
    pub fn merge(&mut self, mut other: WriteGuard) {
        self.keys.append(&mut other.keys);
        if other.all {
            other.all = false;
            if self.all {
                // Both counted one flush in flight; the merged guard releases one.
                self.cache.writing_all.fetch_sub(1, Ordering::AcqRel);
            } else {
                self.all = true;
            }
        }
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let cache = &self.cache;
        for k in &self.keys {
            cache.drop_key(k);
            cache.stripes[cache.stripe_of(k)].writing.fetch_sub(1, Ordering::AcqRel);
        }
        if self.all {
            cache.flush();
            cache.writing_all.fetch_sub(1, Ordering::AcqRel);
            cache.announce(Announce::All);
        } else if !self.keys.is_empty() && cache.announce_keys.load(Ordering::Relaxed) {
            // Redis's tracking invalidates written keys itself.
            cache.announce(Announce::Keys(std::mem::take(&mut self.keys)));
        }
    }
}

impl Fill {
    /// The key read.
    pub fn key(&self) -> &Bytes {
        &self.fkey.key
    }

    /// Stores `reply` (if cacheable and no invalidation raced it) and hands it to every reader
    /// waiting for it. `pttl` is the reply to `PTTL key` sent right after the read.
    pub fn complete(mut self, reply: &Bytes, pttl: Option<&Bytes>) {
        self.done = true;
        let cache = self.cache.clone();
        let key_ttl = pttl.and_then(crate::protocol::value::parse).and_then(|v| v.as_int());
        let stored = if reply::is_error(reply) || key_ttl.is_none() {
            None
        } else if reply.len() > cache.max_value {
            cache.metrics.too_big.increment(1);
            None
        } else {
            reads::store(reply, self.shape)
        };
        let stripe = &cache.stripes[self.stripe];
        {
            let mut flights = stripe.flights.lock().unwrap_or_else(|p| p.into_inner());
            if flights.get(&self.fkey).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
                flights.remove(&self.fkey);
            }
            let valid = stripe.generation.load(Ordering::Acquire) == self.generation
                && cache.epoch.load(Ordering::Acquire) == self.epoch
                && cache.is_up();
            let expires = key_ttl.and_then(|t| cache.entry_ttl(self.rule, t)).map(|ttl| self.looked_up + ttl);
            let now = Instant::now();
            if let (true, Some(stored), Some(expires)) = (valid, stored, expires)
                && expires > now
            {
                let item = Item {
                    user: self.fkey.who.user.clone(),
                    db: self.fkey.who.db,
                    // Copies: the request's arguments share the client's read buffer, which a
                    // cached entry must not keep alive (nor be charged for).
                    view: Bytes::copy_from_slice(&self.fkey.view),
                    rule: self.rule,
                    stored,
                    expires,
                };
                let key = Bytes::copy_from_slice(&self.fkey.key);
                let mut items = Vec::new();
                if let Some((k, old)) = cache.store.remove(&key[..]) {
                    account(&cache.rules, &k, &old, -1, None);
                    items.extend(
                        old.items
                            .iter()
                            .filter(|i| {
                                i.expires > now && !(i.db == item.db && i.user == item.user && i.view == item.view)
                            })
                            .cloned(),
                    );
                }
                items.push(item);
                let entry = Arc::new(Entry { items });
                account(&cache.rules, &key, &entry, 1, None);
                cache.store.insert(key.clone(), entry);
                // A flush that ran meanwhile may have missed this insert.
                if cache.epoch.load(Ordering::Acquire) != self.epoch
                    && let Some((k, e)) = cache.store.remove(&key[..])
                {
                    account(&cache.rules, &k, &e, -1, Some(Eviction::Flushed));
                }
            }
        }
        let waiters = std::mem::take(&mut *self.flight.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for w in waiters {
            let _ = w.send(reply.clone());
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Never completed: new readers must not join this read any more.
        let stripe = &self.cache.stripes[self.stripe];
        let mut flights = stripe.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.get(&self.fkey).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
            flights.remove(&self.fkey);
        }
    }
}

/// Encodes `SIDECACHE CACHE STATS`-like pairs as a map (RESP3) or flat array (RESP2).
pub fn encode_pairs(pairs: &[(String, String)], proto: Proto) -> Bytes {
    let mut out = BytesMut::new();
    let head = match proto {
        Proto::Resp3 => format!("%{}\r\n", pairs.len()),
        Proto::Resp2 => format!("*{}\r\n", pairs.len() * 2),
    };
    out.put_slice(head.as_bytes());
    for (k, v) in pairs {
        for s in [k, v] {
            out.put_slice(format!("${}\r\n", s.len()).as_bytes());
            out.put_slice(s.as_bytes());
            out.put_slice(b"\r\n");
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Arc<NearCache> {
        let mut config = NearCacheConfig::default();
        config.rules =
            vec![crate::config::CacheRuleConfig { name: "m".into(), prefix: "m:".into(), db: None, max_ttl: None }];
        let cache = NearCache::new(&config);
        cache.set_up(CoherenceMode::Tracking, CommandTable::default());
        cache
    }

    fn who() -> Who {
        Who { user: Bytes::new(), db: 0, proto: Proto::Resp2 }
    }

    fn read(key: &str) -> Read {
        Read {
            key: Bytes::copy_from_slice(key.as_bytes()),
            view: Bytes::from_static(b"GET"),
            shape: Shape::Scalar,
            hit_also: None,
        }
    }

    /// Fills `key` with a reply whose `PTTL` was `pttl`; returns the time left of the entry.
    fn fill(cache: &Arc<NearCache>, key: &str, pttl: &str) -> Option<u64> {
        let Lookup::Lead(f) = cache.lookup(&who(), &read(key)) else { panic!("{key}: not a miss") };
        f.complete(&Bytes::from_static(b"$1\r\nv\r\n"), Some(&Bytes::copy_from_slice(pttl.as_bytes())));
        cache.info(&who(), key.as_bytes()).first().map(|(_, _, left)| *left)
    }

    #[test]
    fn an_entry_never_outlives_the_keys_ttl_in_redis() {
        let cache = cache();
        // In its last millisecond (PTTL rounds down), a key is not worth storing.
        assert_eq!(fill(&cache, "m:last", ":0\r\n"), None);
        assert_eq!(fill(&cache, "m:one", ":1\r\n"), None);
        // Else the entry ends a millisecond before the TTL, counted from the lookup.
        let left = fill(&cache, "m:short", ":150\r\n").expect("stored");
        assert!(left <= 149, "{left} ms left of a key with 150 ms");
        let left = fill(&cache, "m:none", ":-1\r\n").expect("stored");
        assert!(left > 149 && left <= cache.config.max_ttl.as_millis() as u64, "{left} ms");
        // A slow reply: its TTL was read when it was sent, not when it arrived.
        let Lookup::Lead(f) = cache.lookup(&who(), &read("m:slow")) else { panic!("not a miss") };
        std::thread::sleep(Duration::from_millis(60));
        f.complete(&Bytes::from_static(b"$1\r\nv\r\n"), Some(&Bytes::from_static(b":100\r\n")));
        let left = cache.info(&who(), b"m:slow").first().map(|(_, _, left)| *left).expect("stored");
        assert!(left <= 40, "{left} ms left after a 60 ms wait for a 100 ms TTL");
    }
}
