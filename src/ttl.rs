//! TTL policy by key prefix: every write that could leave a key without a TTL gives it the
//! default TTL of its prefix's rule; explicit TTLs above a rule's `max` are lowered.
//!
//! Owns: the `[ttl]` configuration section (its shape and validation: this module is the only
//! reader of it, so the section lives here and `config` only embeds it), the compiled rules
//! (longest prefix wins, an optional database restricts a rule), the table of key-creating
//! commands and where their written keys are, the plan for each command (forward unchanged,
//! rewrite its arguments, or guard it with `PEXPIRE key ms NX`), the counters
//! `sidecache_ttl_applied_total{rule}`, `sidecache_ttl_missing_total{db}` and
//! `sidecache_ttl_unenforced_total{reason}`, and the reply of a guarded command (the first
//! element of the `EXEC` array). Does not own: where commands are sent (`session`) or when rules
//! are swapped (`server::Policy`, reloaded on SIGHUP or a change of the config file).
//!
//! How a TTL is applied, so that the client sees exactly Redis's reply:
//! - `SET` without an expiry option gets `PX <default>` appended: one command, atomic.
//! - Every other key-creating write (and `SET … KEEPTTL`) is *guarded*: `MULTI`, the command,
//!   `PEXPIRE <key> <default> NX` per ruled key, `EXEC`, queued back to back in one batch on the
//!   shared connection; the client gets the command's own reply. `NX` (Redis 7.0) sets the TTL
//!   only where the key has none, so an existing TTL is never shortened, extended or removed.
//! - A write into a database named in the command (`COPY … DB n`, `MOVE key n`) is guarded the
//!   same way, with a script in place of the `PEXPIRE`: `EVAL` of `PEXPIRE_NX_IN_DB`, which
//!   `SELECT`s database n and runs `PEXPIRE <key> <default> NX` there. A `SELECT` inside a script
//!   does not change the connection's database, and when n is not a database the script fails
//!   before its `PEXPIRE` (as the write itself does), so no key of another database is touched.
//!   A plain `SELECT n` … `SELECT <current>` in the transaction would not be safe: a refused
//!   `SELECT n` (out of range) leaves the `PEXPIRE` running in the current database.
//! - Inside the client's own `MULTI`, the `PEXPIRE`s are queued after the command and their
//!   `+QUEUED` and `EXEC` elements are removed before the client sees them (see `strip_exec`).
//! - On a dedicated connection outside a transaction (the client `WATCH`es keys, or uses
//!   connection-scoped state) and after blocking moves (`BLMOVE`, `BRPOPLPUSH`), the `PEXPIRE`
//!   follows the command on the same connection without a transaction: a `MULTI` would end the
//!   client's `WATCH`, and a blocking command inside `MULTI` does not block.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use metrics::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::command::Command;
use crate::metrics::{TTL_APPLIED, TTL_MISSING, TTL_UNENFORCED};
use crate::protocol::reply::{self, ReplyLimits, ReplyScanner};
use crate::upstream::UpstreamError;

/// Longest TTL a rule may set: 100 years, far inside what Redis accepts for `PX`.
pub const MAX_RULE_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Databases whose `sidecache_ttl_missing_total{db}` series exist from the start (Redis's
/// default `databases 16`); higher numbers get their series on first use.
const EAGER_DBS: u32 = 16;
/// The closed set of `reason` labels of `sidecache_ttl_unenforced_total`.
pub const UNENFORCED_REASONS: [&str; 1] = ["script"];
/// Sets the TTL of `KEYS[1]` in database `ARGV[1]` to `ARGV[2]` ms where it has none. The
/// script's `SELECT` does not change the caller's database (Redis 2.8.12 and later); an invalid
/// database fails the script before the `PEXPIRE`.
const PEXPIRE_NX_IN_DB: &str = "redis.call('SELECT', ARGV[1]) return redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX')";

/// What the policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TtlMode {
    /// Apply default TTLs and clamps.
    #[default]
    Enforce,
    /// Change nothing; count what enforce would do.
    Audit,
    /// Do nothing, count nothing.
    Off,
}

/// `[ttl]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtlConfig {
    /// `enforce`, `audit` or `off`.
    pub mode: TtlMode,
    /// `[[ttl.rules]]`: the longest matching prefix wins.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<TtlRuleConfig>,
}

/// One `[[ttl.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlRuleConfig {
    /// The metric label (`sidecache_ttl_applied_total{rule}`); the prefix when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Keys starting with this; `""` matches every key.
    pub prefix: String,
    /// Only keys in this database; every database when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<u32>,
    /// TTL given to written keys that would otherwise have none.
    #[serde(with = "crate::config::duration")]
    pub default: Duration,
    /// Explicit TTLs longer than this are lowered to it.
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub max: Option<Duration>,
}

impl TtlRuleConfig {
    /// The metric label of this rule.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None if self.prefix.is_empty() => "*".into(),
            None => self.prefix.clone(),
        }
    }
}

impl TtlConfig {
    /// Every problem in the section, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let key = format!("ttl.rules[{i}]");
            if r.default < Duration::from_millis(1) {
                problems.push(format!("{key}.default: must be at least 1ms"));
            }
            if r.default > MAX_RULE_TTL {
                problems.push(format!("{key}.default: must be at most 36500d"));
            }
            if let Some(max) = r.max {
                if max < r.default {
                    problems.push(format!(
                        "{key}.max: {} is shorter than default {}",
                        humantime::format_duration(max),
                        humantime::format_duration(r.default)
                    ));
                }
                if max > MAX_RULE_TTL {
                    problems.push(format!("{key}.max: must be at most 36500d"));
                }
            }
            if let Some(name) = &r.name
                && (name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b)))
            {
                problems.push(format!("{key}.name: {name:?} must be non-empty letters, digits, '_', '-', '.' or ':'"));
            }
            for (j, other) in self.rules.iter().enumerate().take(i) {
                if other.prefix == r.prefix && other.db == r.db {
                    let db = r.db.map_or("every database".to_string(), |d| format!("db {d}"));
                    problems.push(format!("{key}: prefix {:?} for {db} is also ttl.rules[{j}]", r.prefix));
                }
                if other.label() == r.label() && !(other.prefix == r.prefix && other.db == r.db) {
                    problems.push(format!(
                        "{key}.name: metric label {:?} is also used by ttl.rules[{j}]; give the rules distinct names",
                        r.label()
                    ));
                }
            }
        }
        problems
    }
}

/// Serde for an optional duration with a unit.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => crate::config::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let raw = String::deserialize(d)?;
        crate::config::duration::parse(&raw).map(Some).map_err(serde::de::Error::custom)
    }
}

/// One compiled rule.
struct Rule {
    prefix: Vec<u8>,
    db: Option<u32>,
    default_ms: u64,
    max_ms: Option<u64>,
    applied: Counter,
}

/// The compiled `[ttl]` section; a reload swaps the whole value, so every command sees one
/// consistent set of rules.
pub struct TtlPolicy {
    mode: TtlMode,
    /// Longest prefix first; at equal length a database-specific rule before an unrestricted one.
    rules: Vec<Rule>,
    missing: Vec<Counter>,
    unenforced: [Counter; UNENFORCED_REASONS.len()],
}

impl std::fmt::Debug for TtlPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlPolicy").field("mode", &self.mode).field("rules", &self.rules.len()).finish()
    }
}

/// What the session does with one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Send it as the client wrote it.
    Forward,
    /// Send these arguments instead (an appended `PX`, or a clamped TTL); same reply.
    Rewrite(Vec<Bytes>),
    /// Send it unchanged, followed by these `PEXPIRE key ms NX` commands (or their script form
    /// for another database), atomically where the connection allows it.
    Guard(Vec<Vec<Bytes>>),
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn num(n: u64) -> Bytes {
    Bytes::from(itoa::Buffer::new().format(n).to_string())
}

fn parse_i64(a: &[u8]) -> Option<i64> {
    crate::protocol::request::parse_i64(a)
}

/// How an explicit expiry argument is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Relative seconds (`EX`, `EXPIRE`, `SETEX`).
    Secs,
    /// Relative milliseconds (`PX`, `PEXPIRE`, `PSETEX`).
    Millis,
    /// Absolute Unix seconds (`EXAT`, `EXPIREAT`).
    AtSecs,
    /// Absolute Unix milliseconds (`PXAT`, `PEXPIREAT`).
    AtMillis,
}

impl Unit {
    /// The TTL in milliseconds from now, when the argument is one Redis would accept.
    /// `None` also where Redis answers "invalid expire time": a relative TTL whose deadline
    /// (now plus it, in milliseconds) is past `i64::MAX`. Such a write is left for Redis to refuse.
    fn ttl_ms(self, arg: &[u8]) -> Option<i64> {
        let n = parse_i64(arg)?;
        let relative = |ms: i64| ms.checked_add(now_ms()).map(|_| ms);
        match self {
            Unit::Secs => n.checked_mul(1000).and_then(relative),
            Unit::Millis => relative(n),
            Unit::AtSecs => n.checked_mul(1000).map(|at| at.saturating_sub(now_ms())),
            Unit::AtMillis => Some(n.saturating_sub(now_ms())),
        }
    }

    fn of_option(opt: &[u8]) -> Option<Unit> {
        if opt.eq_ignore_ascii_case(b"EX") {
            Some(Unit::Secs)
        } else if opt.eq_ignore_ascii_case(b"PX") {
            Some(Unit::Millis)
        } else if opt.eq_ignore_ascii_case(b"EXAT") {
            Some(Unit::AtSecs)
        } else if opt.eq_ignore_ascii_case(b"PXAT") {
            Some(Unit::AtMillis)
        } else {
            None
        }
    }
}

/// The parsed options of `SET key value [NX|XX] [GET] [EX|PX|EXAT|PXAT n|KEEPTTL]`.
struct SetOptions {
    /// Index of the expiry option word and its unit.
    expiry: Option<(usize, Unit)>,
    keepttl: bool,
}

/// `None` when Redis would refuse the options: then the command is forwarded untouched and
/// Redis answers its own error.
fn set_options(args: &[Bytes]) -> Option<SetOptions> {
    let mut o = SetOptions { expiry: None, keepttl: false };
    let (mut nx, mut xx, mut get) = (false, false, false);
    let mut i = 3;
    while i < args.len() {
        let a = &args[i];
        if a.eq_ignore_ascii_case(b"NX") && !nx && !xx {
            nx = true;
        } else if a.eq_ignore_ascii_case(b"XX") && !nx && !xx {
            xx = true;
        } else if a.eq_ignore_ascii_case(b"GET") && !get {
            get = true;
        } else if a.eq_ignore_ascii_case(b"KEEPTTL") && !o.keepttl && o.expiry.is_none() {
            o.keepttl = true;
        } else if let Some(unit) = Unit::of_option(a) {
            if o.keepttl || o.expiry.is_some() || i + 1 >= args.len() {
                return None;
            }
            o.expiry = Some((i, unit));
            i += 1;
        } else {
            return None;
        }
        i += 1;
    }
    Some(o)
}

/// Keys a key-creating write may leave without a TTL; `None` for every other command.
fn written_keys<'a>(name: &[u8], args: &'a [Bytes]) -> Option<Written<'a>> {
    let at = |i: usize| Some(Written::Keys(args.get(i).into_iter().collect()));
    match name {
        b"SETNX" | b"GETSET" | b"HSET" | b"HSETNX" | b"HMSET" | b"HINCRBY" | b"HINCRBYFLOAT" | b"SADD" | b"LPUSH"
        | b"RPUSH" | b"ZADD" | b"ZINCRBY" | b"INCR" | b"INCRBY" | b"INCRBYFLOAT" | b"DECR" | b"DECRBY" | b"APPEND"
        | b"SETRANGE" | b"SETBIT" | b"BITFIELD" | b"PFADD" | b"PFMERGE" | b"XADD" | b"GEOADD" | b"RESTORE"
        | b"SUNIONSTORE" | b"SINTERSTORE" | b"SDIFFSTORE" | b"ZUNIONSTORE" | b"ZINTERSTORE" | b"ZDIFFSTORE"
        | b"ZRANGESTORE" | b"GEOSEARCHSTORE" => at(1),
        b"SMOVE" | b"LMOVE" | b"RPOPLPUSH" | b"BLMOVE" | b"BRPOPLPUSH" | b"RENAME" | b"RENAMENX" | b"BITOP" => at(2),
        b"COPY" => match copy_db(args)? {
            Some(n) => Some(Written::InDb(args.get(2).into_iter().collect(), n)),
            None => at(2),
        },
        // MOVE key db: the key keeps its TTL, or has none, in database `db`.
        b"MOVE" if args.len() == 3 => Some(Written::InDb(vec![&args[1]], db_index(&args[2])?)),
        // XGROUP CREATE key group id MKSTREAM [ENTRIESREAD n]: creates the stream.
        b"XGROUP"
            if args.len() > 5
                && args[1].eq_ignore_ascii_case(b"CREATE")
                && args[5..].iter().any(|a| a.eq_ignore_ascii_case(b"MKSTREAM")) =>
        {
            at(2)
        }
        b"MSET" | b"MSETNX" => Some(Written::Keys(args.iter().skip(1).step_by(2).collect())),
        b"SORT" => sort_store(args).map(|k| Written::Keys(vec![k])),
        b"GEORADIUS" | b"GEORADIUSBYMEMBER" => {
            let from = if name == b"GEORADIUS" { 6 } else { 5 };
            georadius_store(args, from).map(|k| Written::Keys(vec![k]))
        }
        b"EVAL" | b"EVALSHA" | b"FCALL" => {
            let n = usize::try_from(parse_i64(args.get(2)?)?).ok()?;
            Some(Written::Script(args.get(3..3usize.checked_add(n)?)?.iter().collect()))
        }
        _ => None,
    }
}

/// The options of an `EXPIRE`-family command: `Some(true)` with `GT` or `LT`, `Some(false)`
/// with neither, `None` when Redis refuses them (an unknown option, `NX` with another, `GT`
/// with `LT`): such a command changes nothing, so it is forwarded as it is.
fn expire_compares(options: &[Bytes]) -> Option<bool> {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for o in options {
        match o.to_ascii_uppercase().as_slice() {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"GT" => gt = true,
            b"LT" => lt = true,
            _ => return None,
        }
    }
    if (nx && (xx || gt || lt)) || (gt && lt) {
        return None;
    }
    Some(gt || lt)
}

enum Written<'a> {
    /// Guard these keys, in the session's database.
    Keys(Vec<&'a Bytes>),
    /// Guard these keys in the database the command names (whichever the session is in).
    InDb(Vec<&'a Bytes>, u32),
    /// Declared keys of a script: counted, not guarded (scripts are not rewritten).
    Script(Vec<&'a Bytes>),
}

/// A database number as Redis accepts it (`SELECT`, `COPY … DB`, `MOVE`): a non-negative 32-bit
/// integer. Anything else Redis refuses, and the command writes nothing.
fn db_index(arg: &[u8]) -> Option<u32> {
    u32::try_from(i32::try_from(parse_i64(arg)?).ok()?).ok()
}

/// `COPY source destination [DB n] [REPLACE]`, options in any order, the last `DB` wins (as in
/// Redis): `Some(Some(n))` with a `DB` option, `Some(None)` without, `None` when Redis would
/// refuse the options (then nothing is written).
fn copy_db(args: &[Bytes]) -> Option<Option<u32>> {
    let mut db = None;
    let mut i = 3;
    while i < args.len() {
        if args[i].eq_ignore_ascii_case(b"REPLACE") {
            i += 1;
        } else if args[i].eq_ignore_ascii_case(b"DB") {
            db = Some(db_index(args.get(i + 1)?)?);
            i += 2;
        } else {
            return None;
        }
    }
    Some(db)
}

/// `SORT key [BY p] [LIMIT o c] [GET p …] [ASC|DESC] [ALPHA] [STORE dest]`: the destination.
fn sort_store(args: &[Bytes]) -> Option<&Bytes> {
    let mut i = 2;
    while i < args.len() {
        let a = &args[i];
        if a.eq_ignore_ascii_case(b"BY") || a.eq_ignore_ascii_case(b"GET") {
            i += 2;
        } else if a.eq_ignore_ascii_case(b"LIMIT") {
            i += 3;
        } else if a.eq_ignore_ascii_case(b"STORE") {
            return args.get(i + 1);
        } else {
            i += 1;
        }
    }
    None
}

/// `GEORADIUS… [COUNT n [ANY]] … [STORE key] [STOREDIST key]`: the destination.
fn georadius_store(args: &[Bytes], from: usize) -> Option<&Bytes> {
    let mut i = from;
    while i < args.len() {
        let a = &args[i];
        if a.eq_ignore_ascii_case(b"COUNT") {
            i += 2;
        } else if a.eq_ignore_ascii_case(b"STORE") || a.eq_ignore_ascii_case(b"STOREDIST") {
            return args.get(i + 1);
        } else {
            i += 1;
        }
    }
    None
}

fn pexpire_nx(key: &Bytes, ms: u64) -> Vec<Bytes> {
    vec![Bytes::from_static(b"PEXPIRE"), key.clone(), num(ms), Bytes::from_static(b"NX")]
}

/// `PEXPIRE key ms NX` in database `db`, whichever database the connection is in.
fn pexpire_nx_in(key: &Bytes, db: u32, ms: u64) -> Vec<Bytes> {
    vec![
        Bytes::from_static(b"EVAL"),
        Bytes::from_static(PEXPIRE_NX_IN_DB.as_bytes()),
        Bytes::from_static(b"1"),
        key.clone(),
        num(u64::from(db)),
        num(ms),
    ]
}

impl TtlPolicy {
    /// Compiles a validated `[ttl]` section (and creates its metric series).
    pub fn from_config(c: &TtlConfig) -> TtlPolicy {
        // Handles made before the recorder exists would count nowhere.
        crate::metrics::Metrics::get();
        let mut rules: Vec<Rule> = c
            .rules
            .iter()
            .map(|r| {
                let applied = metrics::counter!(TTL_APPLIED, "rule" => r.label());
                applied.increment(0);
                Rule {
                    prefix: r.prefix.clone().into_bytes(),
                    db: r.db,
                    default_ms: millis(r.default).max(1),
                    max_ms: r.max.map(millis),
                    applied,
                }
            })
            .collect();
        rules.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(b.db.is_some().cmp(&a.db.is_some())));
        let active = c.mode != TtlMode::Off && !rules.is_empty();
        let missing: Vec<Counter> = (0..EAGER_DBS)
            .map(|db| {
                let c = metrics::counter!(TTL_MISSING, "db" => db.to_string());
                if active {
                    c.increment(0);
                }
                c
            })
            .collect();
        let unenforced = UNENFORCED_REASONS.map(|r| metrics::counter!(TTL_UNENFORCED, "reason" => r));
        if active {
            for u in &unenforced {
                u.increment(0);
            }
        }
        TtlPolicy { mode: c.mode, rules, missing, unenforced }
    }

    /// True when the policy looks at commands at all.
    pub fn is_active(&self) -> bool {
        self.mode != TtlMode::Off && !self.rules.is_empty()
    }

    /// The TTL a key created now would get in `enforce` mode (for keys sidecache creates
    /// itself, such as serial counters); `None` when no rule applies or the policy is not
    /// enforced.
    pub fn default_for(&self, key: &[u8], db: u32) -> Option<std::time::Duration> {
        if self.mode != TtlMode::Enforce {
            return None;
        }
        self.rule(key, db).map(|r| std::time::Duration::from_millis(r.default_ms))
    }

    fn rule(&self, key: &[u8], db: u32) -> Option<&Rule> {
        self.rules.iter().find(|r| key.starts_with(&r.prefix) && r.db.is_none_or(|d| d == db))
    }

    fn count_missing(&self, db: u32) {
        match self.missing.get(db as usize) {
            Some(c) => c.increment(1),
            None => metrics::counter!(TTL_MISSING, "db" => db.to_string()).increment(1),
        }
    }

    /// Counts a key written in a database the command names: that number is the client's and
    /// Redis has not checked it yet, so only databases with eager series are counted (a label
    /// per number a client makes up would not be a closed set).
    fn count_missing_in_named(&self, db: u32) {
        if let Some(c) = self.missing.get(db as usize) {
            c.increment(1);
        }
    }

    fn count_unenforced(&self, reason: usize) {
        self.unenforced[reason].increment(1);
    }

    /// Decides what to do with one command of a session in database `db`, and counts it.
    pub fn plan(&self, cmd: &Command, db: u32) -> Plan {
        if !self.is_active() {
            return Plan::Forward;
        }
        let plan = self.decide(cmd, db);
        if self.mode == TtlMode::Audit { Plan::Forward } else { plan }
    }

    fn decide(&self, cmd: &Command, db: u32) -> Plan {
        let args = &cmd.args;
        let name = cmd.name();
        match name {
            b"SET" => return self.plan_set(args, db),
            b"SETEX" | b"PSETEX" => {
                let unit = if name == b"SETEX" { Unit::Secs } else { Unit::Millis };
                let Some(key) = args.get(1) else { return Plan::Forward };
                let Some(rule) = self.rule(key, db) else {
                    self.count_missing(db);
                    return Plan::Forward;
                };
                return match (args.len(), self.clamped(rule, args.get(2), unit)) {
                    (4, Some(max)) => {
                        rule.applied.increment(1);
                        Plan::Rewrite(vec![Bytes::from_static(b"PSETEX"), key.clone(), num(max), args[3].clone()])
                    }
                    _ => Plan::Forward,
                };
            }
            b"GETEX" => {
                let (Some(key), Some(opt)) = (args.get(1), args.get(2)) else { return Plan::Forward };
                let Some(unit) = Unit::of_option(opt) else { return Plan::Forward };
                return match (args.len(), self.rule(key, db)) {
                    (4, Some(rule)) => self.clamp_at(rule, args, 2, unit),
                    _ => Plan::Forward,
                };
            }
            b"EXPIRE" | b"PEXPIRE" | b"EXPIREAT" | b"PEXPIREAT" => {
                let unit = match name {
                    b"EXPIRE" => Unit::Secs,
                    b"PEXPIRE" => Unit::Millis,
                    b"EXPIREAT" => Unit::AtSecs,
                    _ => Unit::AtMillis,
                };
                let Some(rule) = args.get(1).and_then(|k| self.rule(k, db)) else { return Plan::Forward };
                let Some(max) = self.clamped(rule, args.get(2), unit) else { return Plan::Forward };
                let Some(compares) = expire_compares(&args[3..]) else { return Plan::Forward };
                rule.applied.increment(1);
                if compares {
                    // GT and LT compare the TTL the client named with the key's: lowering it
                    // first could change Redis's answer. The command runs as sent, then the
                    // TTL it may have set is lowered to max.
                    let lower = vec![
                        Bytes::from_static(b"PEXPIRE"),
                        args[1].clone(),
                        num(max),
                        Bytes::from_static(b"XX"),
                        Bytes::from_static(b"LT"),
                    ];
                    return Plan::Guard(vec![lower]);
                }
                let mut out = Vec::with_capacity(args.len());
                out.extend([Bytes::from_static(b"PEXPIRE"), args[1].clone(), num(max)]);
                out.extend(args[3..].iter().cloned());
                return Plan::Rewrite(out);
            }
            _ => {}
        }
        let Some(written) = written_keys(name, args) else { return Plan::Forward };
        let (keys, named_db) = match written {
            Written::Keys(keys) => (keys, None),
            Written::InDb(keys, n) => (keys, Some(n)),
            Written::Script(keys) => {
                for key in keys {
                    match self.rule(key, db) {
                        Some(_) => self.count_unenforced(0),
                        None => self.count_missing(db),
                    }
                }
                return Plan::Forward;
            }
        };
        let mut guards = Vec::new();
        for key in keys {
            match (self.rule(key, named_db.unwrap_or(db)), named_db) {
                (Some(rule), None) => {
                    rule.applied.increment(1);
                    guards.push(pexpire_nx(key, rule.default_ms));
                }
                (Some(rule), Some(n)) => {
                    rule.applied.increment(1);
                    guards.push(pexpire_nx_in(key, n, rule.default_ms));
                }
                (None, None) => self.count_missing(db),
                (None, Some(n)) => self.count_missing_in_named(n),
            }
        }
        if guards.is_empty() { Plan::Forward } else { Plan::Guard(guards) }
    }

    fn plan_set(&self, args: &[Bytes], db: u32) -> Plan {
        if args.len() < 3 {
            return Plan::Forward;
        }
        let Some(opts) = set_options(args) else { return Plan::Forward };
        let key = &args[1];
        let Some(rule) = self.rule(key, db) else {
            self.count_missing(db);
            return Plan::Forward;
        };
        if opts.keepttl {
            rule.applied.increment(1);
            return Plan::Guard(vec![pexpire_nx(key, rule.default_ms)]);
        }
        if let Some((at, unit)) = opts.expiry {
            return self.clamp_at(rule, args, at, unit);
        }
        rule.applied.increment(1);
        let mut out = Vec::with_capacity(args.len() + 2);
        out.extend(args.iter().cloned());
        out.extend([Bytes::from_static(b"PX"), num(rule.default_ms)]);
        Plan::Rewrite(out)
    }

    /// The rule's `max` when `arg` is a valid positive TTL longer than it.
    fn clamped(&self, rule: &Rule, arg: Option<&Bytes>, unit: Unit) -> Option<u64> {
        let max = rule.max_ms?;
        let ttl = unit.ttl_ms(arg?)?;
        // Redis refuses non-positive relative TTLs, and absolute ones in the past delete the
        // key: neither is clamped.
        (ttl > 0 && ttl as u64 > max).then_some(max)
    }

    /// Replaces the expiry option at `at` (`EX n`, `PXAT n`…) with `PX <max>` when it is longer.
    fn clamp_at(&self, rule: &Rule, args: &[Bytes], at: usize, unit: Unit) -> Plan {
        let Some(max) = self.clamped(rule, args.get(at + 1), unit) else { return Plan::Forward };
        rule.applied.increment(1);
        let mut out = args.to_vec();
        out[at] = Bytes::from_static(b"PX");
        out[at + 1] = num(max);
        Plan::Rewrite(out)
    }
}

/// The commands a guarded write is sent as on a shared connection: `MULTI`, the command, the
/// `PEXPIRE`s, `EXEC`.
pub fn guarded_batch(args: &[Bytes], guards: Vec<Vec<Bytes>>) -> Vec<Vec<Bytes>> {
    let mut cmds = Vec::with_capacity(guards.len() + 3);
    cmds.push(vec![Bytes::from_static(b"MULTI")]);
    cmds.push(args.to_vec());
    cmds.extend(guards);
    cmds.push(vec![Bytes::from_static(b"EXEC")]);
    cmds
}

/// The reply the client sees for a guarded write, from the replies to `guarded_batch`; with
/// the bytes charged to the session's budget for them.
pub fn guarded_reply(rxs: Vec<oneshot::Receiver<crate::upstream::mux::Reply>>) -> crate::session::Later {
    Box::pin(async move {
        let mut replies = Vec::with_capacity(rxs.len());
        let mut charged = 0;
        let mut failure = None;
        for rx in rxs {
            match rx.await {
                Ok(Ok(r)) => {
                    charged += r.len();
                    replies.push(r);
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert(UpstreamError::Lost);
                }
            }
        }
        if let Some(e) = failure {
            return (e.to_reply(), charged);
        }
        (pick_reply(&replies), charged)
    })
}

/// `replies` = [MULTI's, the command's `+QUEUED`, the PEXPIREs' `+QUEUED`…, EXEC's].
fn pick_reply(replies: &[Bytes]) -> Bytes {
    let (Some(multi), Some(queued), Some(exec)) = (replies.first(), replies.get(1), replies.last()) else {
        return crate::protocol::encode::error("ERR sidecache: incomplete transaction reply");
    };
    if reply::is_error(multi) {
        // MULTI was refused (an ACL without it): the command ran on its own; its reply is Redis's.
        return queued.clone();
    }
    if reply::is_error(queued) {
        // Refused while queuing (arity, unknown command, ACL, OOM): Redis's own error.
        return queued.clone();
    }
    first_element(exec).unwrap_or_else(|| exec.clone())
}

/// Limits for re-scanning a reply that was already framed within the real limits.
const RESCAN: ReplyLimits = ReplyLimits { max_depth: usize::MAX, max_reply_bytes: usize::MAX };

/// Splits an array reply into its header length and element ranges; `None` if not an array.
fn elements(frame: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    if frame.first() != Some(&b'*') {
        return None;
    }
    let nl = memchr::memchr(b'\n', frame)?;
    let n = usize::try_from(parse_i64(frame.get(1..nl.checked_sub(1)?)?)?).ok()?;
    let mut at = nl + 1;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = ReplyScanner::new().scan(&frame[at..], &RESCAN).ok()??;
        out.push(at..at + len);
        at += len;
    }
    Some(out)
}

fn first_element(frame: &Bytes) -> Option<Bytes> {
    elements(frame)?.first().map(|r| frame.slice(r.clone()))
}

/// Removes the elements at `hidden` (sorted indexes of sidecache's own `PEXPIRE`s) from the
/// client's `EXEC` reply. Anything that is not an array (an `EXECABORT` error, the null of an
/// aborted `WATCH`) is returned as it is.
pub fn strip_exec(frame: &Bytes, hidden: &[usize]) -> Bytes {
    let Some(elems) = elements(frame) else { return frame.clone() };
    let kept: Vec<_> = elems.into_iter().enumerate().filter(|(i, _)| !hidden.contains(i)).map(|(_, r)| r).collect();
    let mut out = bytes::BytesMut::with_capacity(frame.len());
    out.extend_from_slice(b"*");
    out.extend_from_slice(itoa::Buffer::new().format(kept.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for r in kept {
        out.extend_from_slice(&frame[r]);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Command {
        Command::new(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect())
    }

    fn rule(prefix: &str, db: Option<u32>, default: u64, max: Option<u64>) -> TtlRuleConfig {
        TtlRuleConfig {
            name: None,
            prefix: prefix.into(),
            db,
            default: Duration::from_secs(default),
            max: max.map(Duration::from_secs),
        }
    }

    fn policy(rules: Vec<TtlRuleConfig>) -> TtlPolicy {
        TtlPolicy::from_config(&TtlConfig { mode: TtlMode::Enforce, rules })
    }

    fn strs(args: &[Bytes]) -> Vec<String> {
        args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect()
    }

    #[test]
    fn longest_prefix_wins_and_db_restricts() {
        let p = policy(vec![
            rule("stats:", None, 43200, None),
            rule("stats:serial_count:", None, 86400, None),
            rule("session:", Some(0), 86400, None),
            rule("temp:", Some(2), 1800, None),
            rule("temp:", None, 60, None),
        ]);
        assert_eq!(p.rule(b"stats:daily", 1).unwrap().default_ms, 43_200_000);
        assert_eq!(p.rule(b"stats:serial_count:REAN", 1).unwrap().default_ms, 86_400_000);
        assert!(p.rule(b"session:user:1", 1).is_none());
        assert!(p.rule(b"session:user:1", 0).is_some());
        assert_eq!(p.rule(b"temp:x", 2).unwrap().default_ms, 1_800_000);
        assert_eq!(p.rule(b"temp:x", 5).unwrap().default_ms, 60_000);
        assert!(p.rule(b"other", 0).is_none());
    }

    #[test]
    fn set_is_rewritten_unless_it_has_a_ttl_or_is_malformed() {
        let p = policy(vec![rule("s:", None, 10, Some(100))]);
        let Plan::Rewrite(a) = p.plan(&cmd(&["set", "s:1", "v", "nx", "get"]), 0) else { panic!() };
        assert_eq!(strs(&a), ["set", "s:1", "v", "nx", "get", "PX", "10000"]);
        assert_eq!(p.plan(&cmd(&["set", "s:1", "v", "EX", "50"]), 0), Plan::Forward);
        let Plan::Rewrite(a) = p.plan(&cmd(&["set", "s:1", "v", "EX", "500", "XX"]), 0) else { panic!() };
        assert_eq!(strs(&a), ["set", "s:1", "v", "PX", "100000", "XX"]);
        assert_eq!(p.plan(&cmd(&["set", "s:1", "v", "EX"]), 0), Plan::Forward);
        assert_eq!(p.plan(&cmd(&["set", "s:1", "v", "nx", "xx"]), 0), Plan::Forward);
        assert_eq!(p.plan(&cmd(&["set", "s:1", "v", "ex", "5", "px", "5"]), 0), Plan::Forward);
        assert_eq!(p.plan(&cmd(&["set", "s:1", "v", "ex", "-5"]), 0), Plan::Forward);
        assert_eq!(p.plan(&cmd(&["set", "other", "v"]), 0), Plan::Forward);
        let Plan::Guard(g) = p.plan(&cmd(&["set", "s:1", "v", "KEEPTTL"]), 0) else { panic!() };
        assert_eq!(strs(&g[0]), ["PEXPIRE", "s:1", "10000", "NX"]);
    }

    #[test]
    fn written_keys_are_found_where_each_command_puts_them() {
        let p = policy(vec![rule("k:", None, 1, None)]);
        let guarded = |args: &[&str]| match p.plan(&cmd(args), 0) {
            Plan::Guard(g) => g.iter().map(|c| String::from_utf8_lossy(&c[1]).into_owned()).collect::<Vec<_>>(),
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(guarded(&["mset", "k:1", "a", "x", "b", "k:2", "c"]), ["k:1", "k:2"]);
        assert_eq!(guarded(&["smove", "x", "k:d", "m"]), ["k:d"]);
        assert_eq!(guarded(&["bitop", "and", "k:d", "x", "y"]), ["k:d"]);
        assert_eq!(guarded(&["sort", "x", "by", "store", "get", "#", "limit", "0", "1", "store", "k:d"]), ["k:d"]);
        assert_eq!(guarded(&["georadius", "g", "1", "2", "3", "km", "count", "5", "any", "storedist", "k:d"]), ["k:d"]);
        assert_eq!(guarded(&["copy", "x", "k:d", "replace"]), ["k:d"]);
        assert_eq!(p.plan(&cmd(&["eval", "return 1", "1", "k:1"]), 0), Plan::Forward);
        assert_eq!(p.plan(&cmd(&["get", "k:1"]), 0), Plan::Forward);
    }

    #[test]
    fn writes_into_a_named_database_are_guarded_there_by_the_rule_of_that_database() {
        let p = policy(vec![rule("k:", None, 1, Some(5)), rule("d3:", Some(3), 7, None)]);
        let script = |args: &[&str], db| match p.plan(&cmd(args), db) {
            Plan::Guard(g) => g.iter().map(|c| strs(c)).collect::<Vec<_>>(),
            other => panic!("{args:?}: {other:?}"),
        };
        let eval =
            |key: &str, db: &str, ms: &str| ["EVAL", PEXPIRE_NX_IN_DB, "1", key, db, ms].map(String::from).to_vec();
        assert_eq!(script(&["copy", "x", "k:d", "db", "3"], 0), [eval("k:d", "3", "1000")]);
        assert_eq!(script(&["COPY", "x", "d3:d", "REPLACE", "DB", "3"], 0), [eval("d3:d", "3", "7000")]);
        // The named database decides, also when it is the session's.
        assert_eq!(script(&["copy", "x", "k:d", "db", "0"], 0), [eval("k:d", "0", "1000")]);
        assert_eq!(p.plan(&cmd(&["copy", "x", "d3:d", "db", "1"]), 3), Plan::Forward);
        // The last DB wins, as in Redis.
        assert_eq!(script(&["copy", "x", "d3:d", "db", "1", "db", "3"], 0), [eval("d3:d", "3", "7000")]);
        assert_eq!(script(&["move", "d3:k", "3"], 0), [eval("d3:k", "3", "7000")]);
        assert_eq!(p.plan(&cmd(&["move", "d3:k", "1"]), 3), Plan::Forward);
        // Options Redis refuses: nothing is written, nothing is sent but the command.
        for bad in [
            &["copy", "x", "k:d", "db"][..],
            &["copy", "x", "k:d", "db", "-1"],
            &["copy", "x", "k:d", "db", "2147483648"],
            &["copy", "x", "k:d", "db", "x"],
            &["copy", "x", "k:d", "replace", "nope"],
            &["move", "k:k", "-1"],
            &["move", "k:k"],
            &["move", "k:k", "1", "2"],
        ] {
            assert_eq!(p.plan(&cmd(bad), 0), Plan::Forward, "{bad:?}");
        }
    }

    #[test]
    fn clamps_lower_explicit_ttls_above_max_only() {
        let p = policy(vec![rule("k:", None, 10, Some(60))]);
        let Plan::Rewrite(a) = p.plan(&cmd(&["expire", "k:1", "3600", "NX"]), 0) else { panic!() };
        assert_eq!(strs(&a), ["PEXPIRE", "k:1", "60000", "NX"]);
        assert_eq!(p.plan(&cmd(&["expire", "k:1", "30"]), 0), Plan::Forward);
        let at = (now_ms() / 1000 + 7200).to_string();
        let Plan::Rewrite(a) = p.plan(&cmd(&["expireat", "k:1", &at]), 0) else { panic!() };
        assert_eq!(strs(&a), ["PEXPIRE", "k:1", "60000"]);
        let Plan::Rewrite(a) = p.plan(&cmd(&["setex", "k:1", "120", "v"]), 0) else { panic!() };
        assert_eq!(strs(&a), ["PSETEX", "k:1", "60000", "v"]);
        let Plan::Rewrite(a) = p.plan(&cmd(&["getex", "k:1", "pxat", &(now_ms() + 600_000).to_string()]), 0) else {
            panic!()
        };
        assert_eq!(strs(&a), ["getex", "k:1", "PX", "60000"]);
        // Past i64::MAX milliseconds from now: Redis's "invalid expire time", left to Redis.
        for args in [
            &["set", "k:1", "v", "PX", "9223372036854775807"][..],
            &["set", "k:1", "v", "EX", "9223372036854775"],
            &["psetex", "k:1", "9223372036854775807", "v"],
            &["pexpire", "k:1", "9223372036854775807"],
            &["expire", "k:1", "9223372036854775"],
            &["getex", "k:1", "PX", "9223372036854775000"],
        ] {
            assert_eq!(p.plan(&cmd(args), 0), Plan::Forward, "{args:?}");
        }
    }

    #[test]
    fn audit_and_off_change_nothing() {
        for mode in [TtlMode::Audit, TtlMode::Off] {
            let p = TtlPolicy::from_config(&TtlConfig { mode, rules: vec![rule("k:", None, 1, Some(2))] });
            assert_eq!(p.plan(&cmd(&["set", "k:1", "v"]), 0), Plan::Forward);
            assert_eq!(p.plan(&cmd(&["hset", "k:1", "f", "v"]), 0), Plan::Forward);
            assert_eq!(p.plan(&cmd(&["expire", "k:1", "100"]), 0), Plan::Forward);
        }
    }

    #[test]
    fn validation_lists_overlaps_and_bad_values() {
        let mut bad = rule("a:", Some(1), 10, Some(5));
        bad.name = Some("bad name".into());
        let c = TtlConfig {
            mode: TtlMode::Enforce,
            rules: vec![rule("a:", Some(1), 10, None), bad, rule("a:", None, 0, None), rule("b:", None, 1, None)],
        };
        let problems = c.problems();
        assert!(problems.iter().any(|p| p.contains("ttl.rules[1]: prefix \"a:\" for db 1 is also ttl.rules[0]")));
        assert!(problems.iter().any(|p| p.starts_with("ttl.rules[1].max")));
        assert!(problems.iter().any(|p| p.starts_with("ttl.rules[1].name")));
        assert!(problems.iter().any(|p| p.starts_with("ttl.rules[2].default")));
        assert!(!problems.iter().any(|p| p.starts_with("ttl.rules[3]")), "{problems:?}");
    }

    #[test]
    fn exec_replies_lose_only_the_hidden_elements() {
        let exec = Bytes::from_static(b"*4\r\n:1\r\n:1\r\n*2\r\n$1\r\na\r\n_\r\n:0\r\n");
        assert_eq!(strip_exec(&exec, &[1, 3]), Bytes::from_static(b"*2\r\n:1\r\n*2\r\n$1\r\na\r\n_\r\n"));
        let abort = Bytes::from_static(b"-EXECABORT Transaction discarded because of previous errors.\r\n");
        assert_eq!(strip_exec(&abort, &[0]), abort);
        assert_eq!(strip_exec(&Bytes::from_static(b"*-1\r\n"), &[0]), Bytes::from_static(b"*-1\r\n"));
        let replies = [b("+OK\r\n"), b("+QUEUED\r\n"), b("+QUEUED\r\n"), b("*2\r\n%1\r\n+a\r\n:1\r\n:1\r\n")];
        assert_eq!(pick_reply(&replies), b("%1\r\n+a\r\n:1\r\n"));
        let refused = [b("+OK\r\n"), b("-ERR wrong number of arguments for 'hset' command\r\n"), b("+QUEUED\r\n")];
        assert_eq!(pick_reply(&refused), refused[1]);
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }
}
