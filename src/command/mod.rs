//! Client commands in typed form: the name, what the session must do with it, and its family.
//!
//! Owns: recognising the commands whose meaning reaches beyond "send it to Redis and return the
//! reply" (connection state, transactions, pub/sub, blocking, sidecache's own commands) and the
//! closed set of command families used as metric labels. Does not own: executing anything (the
//! session does) or argument validation that Redis does itself: a malformed state command is
//! forwarded so that Redis answers it in its own words.

use bytes::Bytes;

/// Longest command name that is classified; longer names are forwarded as plain commands.
const MAX_NAME: usize = 32;

/// Which subscription namespace a pub/sub command acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubKind {
    /// `SUBSCRIBE` / `UNSUBSCRIBE`.
    Channel,
    /// `PSUBSCRIBE` / `PUNSUBSCRIBE`.
    Pattern,
    /// `SSUBSCRIBE` / `SUNSUBSCRIBE`.
    Shard,
}

/// What the session does with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stateless: any connection with the session's (user, db, protocol) can run it.
    Plain,
    /// `QUIT`: answered `+OK`, then the connection closes.
    Quit,
    /// `RESET`: drops connection state.
    Reset,
    /// `AUTH`.
    Auth,
    /// `SELECT`.
    Select,
    /// `HELLO`.
    Hello,
    /// `CLIENT SETNAME`.
    ClientSetName,
    /// `CLIENT GETNAME`.
    ClientGetName,
    /// `CLIENT REPLY ON|OFF|SKIP`.
    ClientReply,
    /// Any other command whose effect or answer belongs to the connection (`CLIENT ID`,
    /// `CLIENT TRACKING`, `CLIENT KILL`, `READONLY`…): the session keeps a dedicated connection
    /// for good.
    Sticky,
    /// `MULTI`.
    Multi,
    /// `EXEC`.
    Exec,
    /// `DISCARD`.
    Discard,
    /// `WATCH`.
    Watch,
    /// `UNWATCH`.
    Unwatch,
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`.
    Subscribe(SubKind),
    /// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE`.
    Unsubscribe(SubKind),
    /// `MONITOR`.
    Monitor,
    /// A command that may block the connection (`BLPOP`, `XREAD … BLOCK`…).
    Blocking,
    /// `WAIT` / `WAITAOF`: blocking, and about this client's earlier writes.
    Wait,
    /// sidecache's own commands (`SIDECACHE …`, `LOCK.*`, `SERIAL.*`): never sent to Redis.
    Own,
    /// `POST` or `Host:`: an HTTP request sent to the Redis port. Redis closes such a
    /// connection without a reply (cross-protocol scripting), and so does sidecache.
    Attack,
    /// `SYNC`, `PSYNC`: replication would turn a shared connection into a replica link, whose
    /// RDB transfer and command stream are not replies. Refused.
    Replication,
}

/// Command families: the closed label set of `sidecache_commands_total{family}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Family {
    String,
    Hash,
    List,
    Set,
    SortedSet,
    Stream,
    Key,
    PubSub,
    Transaction,
    Scripting,
    Connection,
    Server,
    Geo,
    HyperLogLog,
    Bitmap,
    Sidecache,
    Other,
}

impl Family {
    /// Every family, in `repr` order.
    pub const ALL: [Family; 17] = [
        Family::String,
        Family::Hash,
        Family::List,
        Family::Set,
        Family::SortedSet,
        Family::Stream,
        Family::Key,
        Family::PubSub,
        Family::Transaction,
        Family::Scripting,
        Family::Connection,
        Family::Server,
        Family::Geo,
        Family::HyperLogLog,
        Family::Bitmap,
        Family::Sidecache,
        Family::Other,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::String => "string",
            Family::Hash => "hash",
            Family::List => "list",
            Family::Set => "set",
            Family::SortedSet => "sorted_set",
            Family::Stream => "stream",
            Family::Key => "key",
            Family::PubSub => "pubsub",
            Family::Transaction => "transaction",
            Family::Scripting => "scripting",
            Family::Connection => "connection",
            Family::Server => "server",
            Family::Geo => "geo",
            Family::HyperLogLog => "hyperloglog",
            Family::Bitmap => "bitmap",
            Family::Sidecache => "sidecache",
            Family::Other => "other",
        }
    }
}

/// A parsed client command.
#[derive(Debug, Clone)]
pub struct Command {
    /// All arguments, the name first, exactly as the client sent them.
    pub args: Vec<Bytes>,
    name: [u8; MAX_NAME],
    name_len: usize,
    /// What the session must do with it.
    pub kind: Kind,
    /// Its family, for metrics.
    pub family: Family,
}

fn upper(arg: &[u8], buf: &mut [u8; MAX_NAME]) -> usize {
    if arg.len() > MAX_NAME {
        return 0;
    }
    for (d, s) in buf.iter_mut().zip(arg) {
        *d = s.to_ascii_uppercase();
    }
    arg.len()
}

impl Command {
    /// Classifies a non-empty argument vector.
    pub fn new(args: Vec<Bytes>) -> Command {
        let mut name = [0u8; MAX_NAME];
        let name_len = args.first().map_or(0, |a| upper(a, &mut name));
        let (kind, family) = classify(&name[..name_len], &args);
        Command { args, name, name_len, kind, family }
    }

    /// The command name in upper case (empty when longer than any known command).
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    /// The name as the client typed it, lower-cased, for error messages.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.args[0]).to_lowercase()
    }

    /// The arguments after the name.
    pub fn params(&self) -> &[Bytes] {
        &self.args[1..]
    }
}

fn eq_upper(arg: Option<&Bytes>, word: &[u8]) -> bool {
    arg.is_some_and(|a| a.eq_ignore_ascii_case(word))
}

fn classify(name: &[u8], args: &[Bytes]) -> (Kind, Family) {
    use Family as F;
    use Kind as K;
    let sub = args.get(1);
    match name {
        b"QUIT" => (K::Quit, F::Connection),
        b"POST" | b"HOST:" => (K::Attack, F::Other),
        b"SYNC" | b"PSYNC" => (K::Replication, F::Server),
        // The Lua debugger holds the connection that asked for it for the next scripts.
        b"SCRIPT" if eq_upper(sub, b"DEBUG") => (K::Sticky, F::Scripting),
        b"RESET" => (K::Reset, F::Connection),
        b"AUTH" => (K::Auth, F::Connection),
        b"SELECT" => (K::Select, F::Connection),
        b"HELLO" => (K::Hello, F::Connection),
        b"CLIENT" => {
            let kind = if eq_upper(sub, b"SETNAME") {
                K::ClientSetName
            } else if eq_upper(sub, b"GETNAME") {
                K::ClientGetName
            } else if eq_upper(sub, b"REPLY") {
                K::ClientReply
            } else if eq_upper(sub, b"SETINFO") || eq_upper(sub, b"HELP") {
                K::Plain
            } else {
                K::Sticky
            };
            (kind, F::Connection)
        }
        b"READONLY" | b"READWRITE" | b"ASKING" => (K::Sticky, F::Connection),
        b"MULTI" => (K::Multi, F::Transaction),
        b"EXEC" => (K::Exec, F::Transaction),
        b"DISCARD" => (K::Discard, F::Transaction),
        b"WATCH" => (K::Watch, F::Transaction),
        b"UNWATCH" => (K::Unwatch, F::Transaction),
        b"SUBSCRIBE" => (K::Subscribe(SubKind::Channel), F::PubSub),
        b"PSUBSCRIBE" => (K::Subscribe(SubKind::Pattern), F::PubSub),
        b"SSUBSCRIBE" => (K::Subscribe(SubKind::Shard), F::PubSub),
        b"UNSUBSCRIBE" => (K::Unsubscribe(SubKind::Channel), F::PubSub),
        b"PUNSUBSCRIBE" => (K::Unsubscribe(SubKind::Pattern), F::PubSub),
        b"SUNSUBSCRIBE" => (K::Unsubscribe(SubKind::Shard), F::PubSub),
        b"PUBLISH" | b"SPUBLISH" | b"PUBSUB" => (K::Plain, F::PubSub),
        b"MONITOR" => (K::Monitor, F::Server),
        b"SIDECACHE" | b"LOCK.ACQUIRE" | b"LOCK.RELEASE" | b"LOCK.EXTEND" | b"LOCK.INFO" | b"SERIAL.NEXT" => {
            (K::Own, F::Sidecache)
        }
        b"WAIT" | b"WAITAOF" => (K::Wait, F::Server),
        b"BLPOP" | b"BRPOP" | b"BLMOVE" | b"BRPOPLPUSH" | b"BLMPOP" => (K::Blocking, F::List),
        b"BZPOPMIN" | b"BZPOPMAX" | b"BZMPOP" => (K::Blocking, F::SortedSet),
        b"XREAD" | b"XREADGROUP" => {
            // Only the options before STREAMS can be BLOCK; key names after it cannot.
            let blocking = args[1..]
                .iter()
                .take_while(|a| !a.eq_ignore_ascii_case(b"STREAMS"))
                .any(|a| a.eq_ignore_ascii_case(b"BLOCK"));
            (if blocking { K::Blocking } else { K::Plain }, F::Stream)
        }
        _ => (K::Plain, family_of(name)),
    }
}

fn family_of(name: &[u8]) -> Family {
    use Family as F;
    match name {
        b"GET" | b"SET" | b"MGET" | b"MSET" | b"MSETNX" | b"SETNX" | b"SETEX" | b"PSETEX" | b"GETSET" | b"GETDEL"
        | b"GETEX" | b"GETRANGE" | b"SETRANGE" | b"APPEND" | b"STRLEN" | b"INCR" | b"INCRBY" | b"INCRBYFLOAT"
        | b"DECR" | b"DECRBY" | b"LCS" | b"SUBSTR" => F::String,
        b"SETBIT" | b"GETBIT" | b"BITCOUNT" | b"BITPOS" | b"BITOP" | b"BITFIELD" | b"BITFIELD_RO" => F::Bitmap,
        b"PFADD" | b"PFCOUNT" | b"PFMERGE" => F::HyperLogLog,
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"SCRIPT" | b"FCALL" | b"FCALL_RO" | b"FUNCTION" => {
            F::Scripting
        }
        b"DEL" | b"UNLINK" | b"EXISTS" | b"EXPIRE" | b"PEXPIRE" | b"EXPIREAT" | b"PEXPIREAT" | b"EXPIRETIME"
        | b"PEXPIRETIME" | b"TTL" | b"PTTL" | b"PERSIST" | b"TYPE" | b"KEYS" | b"SCAN" | b"RENAME" | b"RENAMENX"
        | b"COPY" | b"MOVE" | b"DUMP" | b"RESTORE" | b"OBJECT" | b"TOUCH" | b"RANDOMKEY" | b"SORT" | b"SORT_RO" => {
            F::Key
        }
        b"PING" | b"ECHO" => F::Connection,
        b"INFO" | b"DBSIZE" | b"FLUSHDB" | b"FLUSHALL" | b"CONFIG" | b"TIME" | b"COMMAND" | b"LASTSAVE" | b"SAVE"
        | b"BGSAVE" | b"BGREWRITEAOF" | b"SLOWLOG" | b"LATENCY" | b"MEMORY" | b"ACL" | b"DEBUG" | b"SHUTDOWN"
        | b"SWAPDB" | b"ROLE" | b"REPLICAOF" | b"SLAVEOF" | b"LOLWUT" | b"MODULE" => F::Server,
        b"HSET" | b"HSETNX" | b"HMSET" | b"HGET" | b"HMGET" | b"HGETALL" | b"HDEL" | b"HEXISTS" | b"HKEYS"
        | b"HVALS" | b"HLEN" | b"HSTRLEN" | b"HINCRBY" | b"HINCRBYFLOAT" | b"HSCAN" | b"HRANDFIELD" => F::Hash,
        b"LPUSH" | b"RPUSH" | b"LPUSHX" | b"RPUSHX" | b"LPOP" | b"RPOP" | b"LRANGE" | b"LLEN" | b"LINDEX" | b"LSET"
        | b"LINSERT" | b"LREM" | b"LTRIM" | b"LPOS" | b"LMOVE" | b"RPOPLPUSH" | b"LMPOP" | b"BLPOP" | b"BRPOP"
        | b"BLMOVE" | b"BRPOPLPUSH" | b"BLMPOP" => F::List,
        b"SADD" | b"SREM" | b"SMEMBERS" | b"SISMEMBER" | b"SMISMEMBER" | b"SCARD" | b"SPOP" | b"SRANDMEMBER"
        | b"SMOVE" | b"SINTER" | b"SINTERSTORE" | b"SINTERCARD" | b"SUNION" | b"SUNIONSTORE" | b"SDIFF"
        | b"SDIFFSTORE" | b"SSCAN" => F::Set,
        b"ZADD" | b"ZREM" | b"ZCARD" | b"ZCOUNT" | b"ZLEXCOUNT" | b"ZSCORE" | b"ZMSCORE" | b"ZRANK" | b"ZREVRANK"
        | b"ZINCRBY" | b"ZRANGE" | b"ZRANGESTORE" | b"ZREVRANGE" | b"ZRANGEBYSCORE" | b"ZREVRANGEBYSCORE"
        | b"ZRANGEBYLEX" | b"ZREVRANGEBYLEX" | b"ZPOPMIN" | b"ZPOPMAX" | b"ZMPOP" | b"BZPOPMIN" | b"BZPOPMAX"
        | b"BZMPOP" | b"ZUNION" | b"ZUNIONSTORE" | b"ZINTER" | b"ZINTERSTORE" | b"ZINTERCARD" | b"ZDIFF"
        | b"ZDIFFSTORE" | b"ZREMRANGEBYSCORE" | b"ZREMRANGEBYRANK" | b"ZREMRANGEBYLEX" | b"ZRANDMEMBER" | b"ZSCAN" => {
            F::SortedSet
        }
        b"XADD" | b"XRANGE" | b"XREVRANGE" | b"XLEN" | b"XREAD" | b"XREADGROUP" | b"XGROUP" | b"XACK" | b"XPENDING"
        | b"XCLAIM" | b"XAUTOCLAIM" | b"XDEL" | b"XTRIM" | b"XINFO" | b"XSETID" => F::Stream,
        b"GEOADD"
        | b"GEODIST"
        | b"GEOHASH"
        | b"GEOPOS"
        | b"GEORADIUS"
        | b"GEORADIUS_RO"
        | b"GEORADIUSBYMEMBER"
        | b"GEORADIUSBYMEMBER_RO"
        | b"GEOSEARCH"
        | b"GEOSEARCHSTORE" => F::Geo,
        // Anything else, unknown commands included: a client's made-up name is no family's.
        _ => F::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Command {
        Command::new(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect())
    }

    #[test]
    fn families_are_named_by_command_not_by_first_letter() {
        for (name, family) in [
            ("HSET", Family::Hash),
            ("BLPOP", Family::List),
            ("RPOPLPUSH", Family::List),
            ("SINTERCARD", Family::Set),
            ("BZPOPMIN", Family::SortedSet),
            ("XREADGROUP", Family::Stream),
            ("GEOSEARCH", Family::Geo),
            ("HBOGUSX", Family::Other),
            ("ZQQQ", Family::Other),
            ("SNOPE", Family::Other),
            ("RESTORE-ASKING", Family::Other),
        ] {
            assert_eq!(family_of(name.as_bytes()), family, "{name}");
        }
    }

    #[test]
    fn classifies_state_and_blocking_commands() {
        assert_eq!(cmd(&["get", "k"]).kind, Kind::Plain);
        assert_eq!(cmd(&["get", "k"]).family, Family::String);
        assert_eq!(cmd(&["client", "setname", "x"]).kind, Kind::ClientSetName);
        assert_eq!(cmd(&["CLIENT", "id"]).kind, Kind::Sticky);
        assert_eq!(cmd(&["blpop", "q", "0"]).kind, Kind::Blocking);
        assert_eq!(cmd(&["xread", "count", "1", "streams", "block", "0"]).kind, Kind::Plain);
        assert_eq!(cmd(&["xread", "block", "0", "streams", "s", "$"]).kind, Kind::Blocking);
        assert_eq!(cmd(&["psubscribe", "a*"]).kind, Kind::Subscribe(SubKind::Pattern));
        assert_eq!(cmd(&["hset", "h", "f", "v"]).family, Family::Hash);
        assert_eq!(cmd(&["lpush", "l", "v"]).family, Family::List);
        assert_eq!(cmd(&["geoadd", "g", "1", "2", "m"]).family, Family::Geo);
        assert_eq!(cmd(&["lock.acquire", "x", "100"]).kind, Kind::Own);
        assert_eq!(cmd(&["Sidecache", "cache", "stats"]).family, Family::Sidecache);
    }
}
