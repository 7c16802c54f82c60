//! Which keys a command may write, so the near-cache can invalidate them locally before the
//! command is forwarded and again when its reply arrives (read-your-writes).
//!
//! Owns: the command table, read from the server's own `COMMAND` reply (so every command of
//! this Redis version, modules included, is known with its `write` flag and key positions), and
//! `written`, which names the keys of one command. Commands with keys that only their arguments
//! locate (`EVAL`, `FCALL`, `*MPOP`, `SORT … STORE`…) are read explicitly; a write whose keys
//! cannot be known, or that acts on whole databases (`FLUSHALL`, `SWAPDB`), invalidates
//! everything.

use std::collections::HashMap;

use bytes::Bytes;

use crate::command::Command;
use crate::protocol::value::{Agg, Value};

/// Where a command keeps its keys.
#[derive(Debug, Clone, Copy)]
struct Spec {
    write: bool,
    movable: bool,
    /// A container (`XGROUP`, `CLIENT`…): its subcommands have specs of their own, named
    /// `CONTAINER|SUBCOMMAND`.
    container: bool,
    first: i64,
    last: i64,
    step: i64,
}

/// The server's command table (names upper case).
#[derive(Debug, Default)]
pub struct CommandTable {
    specs: HashMap<Vec<u8>, Spec>,
}

/// What a command writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Nothing the cache holds.
    Nothing,
    /// These keys (in every database).
    Keys(Vec<Bytes>),
    /// Anything: invalidate everything.
    All,
}

impl CommandTable {
    /// Reads a `COMMAND` reply; `None` if it is not one.
    pub fn from_reply(reply: &Value) -> Option<CommandTable> {
        let Value::Agg(_, entries) = reply else { return None };
        let mut specs = HashMap::with_capacity(entries.len());
        add_entries(&mut specs, entries);
        (!specs.is_empty()).then_some(CommandTable { specs })
    }

    /// Number of commands known.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// True when no command is known.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The keys `cmd` may write.
    pub fn written(&self, cmd: &Command) -> Written {
        let args = &cmd.args;
        let name = cmd.name();
        // Scripts and functions are not flagged `write`, but may write their declared keys.
        match name {
            b"EVAL" | b"EVALSHA" | b"FCALL" => return numkeys(args, 2),
            b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL_RO" => return Written::Nothing,
            // Flagged read-only, but rewrites the cardinality cached in the value's header.
            b"PFCOUNT" => return Written::Keys(args[1..].to_vec()),
            _ => {}
        }
        let Some(mut spec) = self.specs.get(name) else { return Written::Nothing };
        if spec.container {
            // `XGROUP CREATE … MKSTREAM` writes, `XGROUP` itself has no flags: the subcommand's
            // spec decides.
            let Some(sub) = args.get(1) else { return Written::Nothing };
            let mut full = Vec::with_capacity(name.len() + 1 + sub.len());
            full.extend_from_slice(name);
            full.push(b'|');
            full.extend(sub.iter().map(u8::to_ascii_uppercase));
            match self.specs.get(&full) {
                Some(s) => spec = s,
                None => return Written::Nothing,
            }
        }
        if !spec.write {
            return Written::Nothing;
        }
        if spec.movable {
            return match name {
                b"LMPOP" | b"ZMPOP" => numkeys(args, 1),
                b"BLMPOP" | b"BZMPOP" => numkeys(args, 2),
                b"ZUNIONSTORE" | b"ZINTERSTORE" | b"ZDIFFSTORE" => {
                    args.get(1).map_or(Written::Nothing, |k| Written::Keys(vec![k.clone()]))
                }
                b"SORT" | b"GEORADIUS" | b"GEORADIUSBYMEMBER" => {
                    let mut keys = Vec::new();
                    let mut i = 2;
                    while i + 1 < args.len() {
                        if args[i].eq_ignore_ascii_case(b"STORE") || args[i].eq_ignore_ascii_case(b"STOREDIST") {
                            keys.push(args[i + 1].clone());
                        }
                        i += 1;
                    }
                    Written::Keys(keys)
                }
                // XREADGROUP only changes streams, which are never cached.
                b"XREADGROUP" => Written::Nothing,
                _ => Written::All,
            };
        }
        if spec.first <= 0 {
            // A write with no keys acts on a whole database (FLUSHALL, FLUSHDB, SWAPDB…).
            return Written::All;
        }
        let n = args.len() as i64;
        let last = if spec.last < 0 { n + spec.last } else { spec.last.min(n - 1) };
        let step = spec.step.max(1);
        let mut keys = Vec::new();
        let mut i = spec.first;
        while i <= last && i < n {
            keys.push(args[i as usize].clone());
            i += step;
        }
        Written::Keys(keys)
    }
}

/// Adds the specs of `COMMAND` reply entries, and of their subcommands.
fn add_entries(specs: &mut HashMap<Vec<u8>, Spec>, entries: &[Value]) {
    for entry in entries {
        let Value::Agg(_, fields) = entry else { continue };
        let (Some(name), Some(first), Some(last), Some(step)) = (
            fields.first().and_then(Value::as_bytes),
            fields.get(3).and_then(Value::as_int),
            fields.get(4).and_then(Value::as_int),
            fields.get(5).and_then(Value::as_int),
        ) else {
            continue;
        };
        let flags: Vec<&[u8]> = match fields.get(2) {
            Some(Value::Agg(Agg::Array | Agg::Set, f)) => {
                f.iter().filter_map(|v| v.as_bytes().map(|b| b.as_ref())).collect()
            }
            _ => Vec::new(),
        };
        // Redis 7 lists a container's subcommands, in the same shape, as the tenth field.
        let subcommands = match fields.get(9) {
            Some(Value::Agg(_, subs)) if !subs.is_empty() => Some(subs),
            _ => None,
        };
        let spec = Spec {
            write: flags.iter().any(|f| f.eq_ignore_ascii_case(b"write")),
            movable: flags.iter().any(|f| f.eq_ignore_ascii_case(b"movablekeys")),
            container: subcommands.is_some(),
            first,
            last,
            step,
        };
        specs.insert(name.to_ascii_uppercase(), spec);
        if let Some(subs) = subcommands {
            add_entries(specs, subs);
        }
    }
}

fn numkeys(args: &[Bytes], at: usize) -> Written {
    let Some(n) = args.get(at).and_then(|a| std::str::from_utf8(a).ok()).and_then(|s| s.parse::<usize>().ok()) else {
        return Written::Nothing;
    };
    match args.get(at + 1..at + 1 + n) {
        Some(keys) => Written::Keys(keys.to_vec()),
        None => Written::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: &[&str], first: i64, last: i64, step: i64) -> Value {
        Value::Agg(
            Agg::Array,
            vec![
                Value::Bulk(Bytes::copy_from_slice(name.as_bytes())),
                Value::Int(-1),
                Value::Agg(
                    Agg::Set,
                    flags.iter().map(|f| Value::Simple(Bytes::copy_from_slice(f.as_bytes()))).collect(),
                ),
                Value::Int(first),
                Value::Int(last),
                Value::Int(step),
            ],
        )
    }

    /// A container entry: no flags, no keys, its subcommands in the tenth field.
    fn container(name: &str, subs: Vec<Value>) -> Value {
        let Value::Agg(kind, mut fields) = entry(name, &[], 0, 0, 0) else { unreachable!() };
        fields.extend([Value::Agg(Agg::Array, vec![]), Value::Agg(Agg::Array, vec![]), Value::Agg(Agg::Array, vec![])]);
        fields.push(Value::Agg(Agg::Array, subs));
        Value::Agg(kind, fields)
    }

    fn cmd(args: &[&str]) -> Command {
        Command::new(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect())
    }

    fn keys(list: &[&str]) -> Written {
        Written::Keys(list.iter().map(|k| Bytes::copy_from_slice(k.as_bytes())).collect())
    }

    #[test]
    fn names_the_keys_a_command_writes() {
        let table = CommandTable::from_reply(&Value::Agg(
            Agg::Array,
            vec![
                entry("set", &["write"], 1, 1, 1),
                entry("mset", &["write"], 1, -1, 2),
                entry("get", &["readonly"], 1, 1, 1),
                entry("flushall", &["write"], 0, 0, 0),
                entry("sort", &["write", "movablekeys"], 1, 0, 1),
                entry("migrate", &["write", "movablekeys"], 3, 3, 1),
                container("xgroup", vec![entry("xgroup|create", &["write"], 2, 2, 1)]),
                container("object", vec![entry("object|freq", &["readonly"], 2, 2, 1)]),
                entry("pfcount", &["readonly"], 1, -1, 1),
            ],
        ))
        .unwrap();
        assert_eq!(table.written(&cmd(&["set", "a", "1"])), keys(&["a"]));
        assert_eq!(table.written(&cmd(&["MSET", "a", "1", "b", "2"])), keys(&["a", "b"]));
        assert_eq!(table.written(&cmd(&["get", "a"])), Written::Nothing);
        assert_eq!(table.written(&cmd(&["flushall"])), Written::All);
        assert_eq!(table.written(&cmd(&["sort", "l", "store", "dst"])), keys(&["dst"]));
        assert_eq!(table.written(&cmd(&["migrate", "h", "1", "", "0", "5", "keys", "a"])), Written::All);
        assert_eq!(table.written(&cmd(&["eval", "return 1", "2", "x", "y", "arg"])), keys(&["x", "y"]));
        assert_eq!(table.written(&cmd(&["eval", "return 1", "5", "x"])), Written::Nothing);
        assert_eq!(table.written(&cmd(&["xgroup", "create", "s", "g", "$", "mkstream"])), keys(&["s"]));
        assert_eq!(table.written(&cmd(&["XGROUP", "nosuch", "s"])), Written::Nothing);
        assert_eq!(table.written(&cmd(&["xgroup"])), Written::Nothing);
        assert_eq!(table.written(&cmd(&["object", "freq", "s"])), Written::Nothing);
        assert_eq!(table.written(&cmd(&["pfcount", "h1", "h2"])), keys(&["h1", "h2"]));
    }
}
