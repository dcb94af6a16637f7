//! Commands: what a request's arguments mean, checked before anything runs.

use bytes::Bytes;

use crate::reply::Reply;

/// A command that the connection answers itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Local {
    /// `PING [message]`.
    Ping(Option<Bytes>),
    /// `ECHO message`.
    Echo(Bytes),
    /// `QUIT`.
    Quit,
    /// `SELECT index`.
    Select(i64),
    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    Hello {
        /// The protocol asked for.
        version: Option<i64>,
        /// `AUTH username password`.
        auth: Option<(Bytes, Bytes)>,
        /// `SETNAME name`.
        setname: Option<Bytes>,
    },
    /// `AUTH [username] password`.
    Auth(Option<Bytes>, Bytes),
    /// `CLIENT SETNAME name`.
    ClientSetName(Bytes),
    /// `CLIENT GETNAME`.
    ClientGetName,
    /// `CLIENT ID`.
    ClientId,
    /// `COMMAND` (and `COMMAND DOCS`, `COMMAND COUNT`, `COMMAND INFO`).
    Command(Option<Bytes>),
    /// `CONFIG GET pattern...`.
    ConfigGet(Vec<Bytes>),
    /// `INFO [section...]`.
    Info(Vec<String>),
}

/// A command that reads or changes the table: the executor runs it in a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Table {
    /// `GET key`.
    Get(Bytes),
    /// `SET key value [EX s | PX ms] [NX | XX] [GET]`.
    Set {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// Time to live in ms (0: none).
        ttl_ms: u64,
        /// Only if absent.
        nx: bool,
        /// Only if present.
        xx: bool,
        /// Reply with the old value.
        get: bool,
    },
    /// `MGET key...`.
    MGet(Vec<Bytes>),
    /// `MSET key value...`.
    MSet(Vec<(Bytes, Bytes)>),
    /// `DEL key...`.
    Del(Vec<Bytes>),
    /// `EXISTS key...`.
    Exists(Vec<Bytes>),
    /// `EXPIRE` / `PEXPIRE`: the time to live in ms (at most 0: delete the key).
    Expire(Bytes, i64),
    /// `TTL` (false) / `PTTL` (true).
    Ttl(Bytes, bool),
    /// `PERSIST key`.
    Persist(Bytes),
    /// `INCR`, `INCRBY`, `DECR`, `DECRBY`: the amount to add.
    Incr(Bytes, i64),
    /// `APPEND key value`.
    Append(Bytes, Bytes),
    /// `STRLEN key`.
    Strlen(Bytes),
    /// `GETDEL key`.
    GetDel(Bytes),
    /// `DBSIZE`.
    DbSize,
    /// `FLUSHDB` / `FLUSHALL`.
    Flush,
    /// `SAVE`: a snapshot to the dump file, answered when it is written.
    Save,
    /// `BGSAVE`: a snapshot to the dump file, written in the background.
    BgSave,
    /// `LASTSAVE`: when the last save succeeded.
    LastSave,
    /// `BGREWRITEAOF`: the append-only log rewritten from a fresh snapshot.
    BgRewriteAof,
}

impl Table {
    /// Whether the command only reads the table.
    pub fn reads_only(&self) -> bool {
        matches!(
            self,
            Table::Get(_)
                | Table::MGet(_)
                | Table::Exists(_)
                | Table::Ttl(..)
                | Table::Strlen(_)
                | Table::DbSize
                | Table::LastSave
        )
    }

    /// Whether the command is one of persistence's (`SAVE`, `BGSAVE`, `LASTSAVE`,
    /// `BGREWRITEAOF`): it runs between table batches and reads or writes no key.
    pub fn persistence(&self) -> bool {
        matches!(
            self,
            Table::Save | Table::BgSave | Table::LastSave | Table::BgRewriteAof
        )
    }

    /// The keys the command names (to check their sizes before the batch).
    pub fn keys(&self) -> Vec<&Bytes> {
        match self {
            Table::Get(k)
            | Table::Set { key: k, .. }
            | Table::Expire(k, _)
            | Table::Ttl(k, _)
            | Table::Persist(k)
            | Table::Incr(k, _)
            | Table::Append(k, _)
            | Table::Strlen(k)
            | Table::GetDel(k) => vec![k],
            Table::MGet(ks) | Table::Del(ks) | Table::Exists(ks) => ks.iter().collect(),
            Table::MSet(kv) => kv.iter().map(|(k, _)| k).collect(),
            Table::DbSize
            | Table::Flush
            | Table::Save
            | Table::BgSave
            | Table::LastSave
            | Table::BgRewriteAof => Vec::new(),
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmd {
    /// Answered by the connection.
    Local(Local),
    /// Run by the executor.
    Table(Table),
    /// Answered at once with this reply (a syntax error, an unknown command).
    Refused(Reply),
}

/// The next argument (empty past the end; the arity was checked first).
fn take(a: &mut impl Iterator<Item = Bytes>) -> Bytes {
    a.next().unwrap_or_default()
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

fn int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn arity(name: &str) -> Cmd {
    Cmd::Refused(Reply::err(format!(
        "wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    )))
}

fn not_int() -> Cmd {
    Cmd::Refused(Reply::err("value is not an integer or out of range"))
}

fn syntax() -> Cmd {
    Cmd::Refused(Reply::err("syntax error"))
}

/// Parses one request's arguments.
pub fn parse(args: Vec<Bytes>) -> Cmd {
    let Some(first) = args.first().cloned() else {
        return Cmd::Refused(Reply::err("empty command"));
    };
    let name = upper(&first);
    let n = args.len();
    let mut a = args.into_iter().skip(1);
    use Local as L;
    use Table as T;
    match (name.as_str(), n) {
        ("PING", 1) => Cmd::Local(L::Ping(None)),
        ("PING", 2) => Cmd::Local(L::Ping(Some(take(&mut a)))),
        ("ECHO", 2) => Cmd::Local(L::Echo(take(&mut a))),
        ("QUIT", _) => Cmd::Local(L::Quit),
        ("SELECT", 2) => match int(&take(&mut a)) {
            Some(i) => Cmd::Local(L::Select(i)),
            None => not_int(),
        },
        ("HELLO", _) => parse_hello(a.collect()),
        ("AUTH", 2) => Cmd::Local(L::Auth(None, take(&mut a))),
        ("AUTH", 3) => {
            let user = take(&mut a);
            Cmd::Local(L::Auth(Some(user), take(&mut a)))
        }
        ("CLIENT", _) if n >= 2 => {
            let sub = upper(&take(&mut a));
            match (sub.as_str(), n) {
                ("SETNAME", 3) => Cmd::Local(L::ClientSetName(take(&mut a))),
                ("GETNAME", 2) => Cmd::Local(L::ClientGetName),
                ("ID", 2) => Cmd::Local(L::ClientId),
                ("SETINFO", 4) => Cmd::Refused(Reply::Ok),
                _ => Cmd::Refused(Reply::err(format!(
                    "unknown subcommand '{}'",
                    sub.to_ascii_lowercase()
                ))),
            }
        }
        ("COMMAND", 1) => Cmd::Local(L::Command(None)),
        ("COMMAND", _) => Cmd::Local(L::Command(Some(take(&mut a)))),
        ("CONFIG", _) if n >= 3 && upper(&take(&mut a)) == "GET" => {
            Cmd::Local(L::ConfigGet(a.collect()))
        }
        ("INFO", _) => Cmd::Local(L::Info(a.map(|s| upper(&s).to_ascii_lowercase()).collect())),
        ("GET", 2) => Cmd::Table(T::Get(take(&mut a))),
        ("SET", _) if n >= 3 => {
            let (key, value) = (take(&mut a), take(&mut a));
            parse_set(key, value, a.collect())
        }
        ("MGET", _) if n >= 2 => Cmd::Table(T::MGet(a.collect())),
        ("MSET", _) if n >= 3 && n % 2 == 1 => {
            let rest: Vec<Bytes> = a.collect();
            Cmd::Table(T::MSet(
                rest.chunks(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect(),
            ))
        }
        ("DEL", _) if n >= 2 => Cmd::Table(T::Del(a.collect())),
        ("EXISTS", _) if n >= 2 => Cmd::Table(T::Exists(a.collect())),
        ("EXPIRE" | "PEXPIRE", 3) => {
            let key = take(&mut a);
            match int(&take(&mut a)) {
                Some(t) if name == "EXPIRE" => match t.checked_mul(1000) {
                    Some(ms) => Cmd::Table(T::Expire(key, ms)),
                    None => Cmd::Refused(Reply::err("invalid expire time in 'expire' command")),
                },
                Some(ms) => Cmd::Table(T::Expire(key, ms)),
                None => not_int(),
            }
        }
        ("TTL", 2) => Cmd::Table(T::Ttl(take(&mut a), false)),
        ("PTTL", 2) => Cmd::Table(T::Ttl(take(&mut a), true)),
        ("PERSIST", 2) => Cmd::Table(T::Persist(take(&mut a))),
        ("INCR", 2) => Cmd::Table(T::Incr(take(&mut a), 1)),
        ("DECR", 2) => Cmd::Table(T::Incr(take(&mut a), -1)),
        ("INCRBY" | "DECRBY", 3) => {
            let key = take(&mut a);
            match int(&take(&mut a)) {
                Some(by) if name == "INCRBY" => Cmd::Table(T::Incr(key, by)),
                Some(by) => match by.checked_neg() {
                    Some(by) => Cmd::Table(T::Incr(key, by)),
                    None => Cmd::Refused(Reply::err("decrement would overflow")),
                },
                None => not_int(),
            }
        }
        ("APPEND", 3) => {
            let key = take(&mut a);
            Cmd::Table(T::Append(key, take(&mut a)))
        }
        ("STRLEN", 2) => Cmd::Table(T::Strlen(take(&mut a))),
        ("GETDEL", 2) => Cmd::Table(T::GetDel(take(&mut a))),
        ("DBSIZE", 1) => Cmd::Table(T::DbSize),
        ("FLUSHDB" | "FLUSHALL", _) if n <= 2 => Cmd::Table(T::Flush),
        ("SAVE", 1) => Cmd::Table(T::Save),
        // `BGSAVE SCHEDULE` is Redis's way to wait for a running AOF rewrite; here a save
        // never waits for one, so it starts at once.
        ("BGSAVE", 1) => Cmd::Table(T::BgSave),
        ("BGSAVE", 2) if upper(&take(&mut a)) == "SCHEDULE" => Cmd::Table(T::BgSave),
        ("LASTSAVE", 1) => Cmd::Table(T::LastSave),
        ("BGREWRITEAOF", 1) => Cmd::Table(T::BgRewriteAof),
        (
            "PING" | "ECHO" | "SELECT" | "AUTH" | "CLIENT" | "CONFIG" | "GET" | "SET" | "MGET"
            | "MSET" | "DEL" | "EXISTS" | "EXPIRE" | "PEXPIRE" | "TTL" | "PTTL" | "PERSIST"
            | "INCR" | "DECR" | "INCRBY" | "DECRBY" | "APPEND" | "STRLEN" | "GETDEL" | "DBSIZE"
            | "FLUSHDB" | "FLUSHALL" | "SAVE" | "LASTSAVE" | "BGREWRITEAOF",
            _,
        ) => arity(&name),
        ("BGSAVE", _) => syntax(),
        _ => {
            let shown: Vec<String> = a
                .take(4)
                .map(|s| format!("'{}'", String::from_utf8_lossy(&s)))
                .collect();
            Cmd::Refused(Reply::err(format!(
                "unknown command '{}', with args beginning with: {}",
                String::from_utf8_lossy(&first),
                shown.join(" ")
            )))
        }
    }
}

fn parse_set(key: Bytes, value: Bytes, opts: Vec<Bytes>) -> Cmd {
    let (mut ttl_ms, mut nx, mut xx, mut get) = (None, false, false, false);
    let mut i = 0;
    while i < opts.len() {
        match upper(&opts[i]).as_str() {
            "NX" if !xx => nx = true,
            "XX" if !nx => xx = true,
            "GET" => get = true,
            unit @ ("EX" | "PX") if ttl_ms.is_none() && i + 1 < opts.len() => {
                i += 1;
                let Some(t) = int(&opts[i]) else {
                    return not_int();
                };
                let ms = if unit == "EX" {
                    t.checked_mul(1000)
                } else {
                    Some(t)
                };
                match ms {
                    Some(ms) if ms > 0 => ttl_ms = Some(ms as u64),
                    _ => return Cmd::Refused(Reply::err("invalid expire time in 'set' command")),
                }
            }
            _ => return syntax(),
        }
        i += 1;
    }
    Cmd::Table(Table::Set {
        key,
        value,
        ttl_ms: ttl_ms.unwrap_or(0),
        nx,
        xx,
        get,
    })
}

fn parse_hello(args: Vec<Bytes>) -> Cmd {
    let mut it = args.into_iter();
    let version = match it.next() {
        None => None,
        Some(v) => match int(&v) {
            Some(v) => Some(v),
            None => {
                return Cmd::Refused(Reply::Error("NOPROTO unsupported protocol version".into()));
            }
        },
    };
    let (mut auth, mut setname) = (None, None);
    while let Some(opt) = it.next() {
        match upper(&opt).as_str() {
            "AUTH" => match (it.next(), it.next()) {
                (Some(u), Some(p)) => auth = Some((u, p)),
                _ => return syntax(),
            },
            "SETNAME" => match it.next() {
                Some(n) => setname = Some(n),
                None => return syntax(),
            },
            _ => return syntax(),
        }
    }
    Cmd::Local(Local::Hello {
        version,
        auth,
        setname,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(words: &[&str]) -> Cmd {
        parse(
            words
                .iter()
                .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                .collect(),
        )
    }

    #[test]
    fn parses_set_options() {
        assert!(matches!(
            p(&["set", "k", "v", "EX", "2", "NX", "GET"]),
            Cmd::Table(Table::Set {
                ttl_ms: 2000,
                nx: true,
                xx: false,
                get: true,
                ..
            })
        ));
        assert!(matches!(p(&["SET", "k", "v", "NX", "XX"]), Cmd::Refused(_)));
        assert!(matches!(p(&["SET", "k", "v", "PX", "0"]), Cmd::Refused(_)));
        assert!(matches!(p(&["SET", "k", "v", "EX"]), Cmd::Refused(_)));
        assert!(
            matches!(p(&["SET", "k"]), Cmd::Refused(Reply::Error(e)) if e.contains("wrong number"))
        );
    }

    #[test]
    fn unknown_commands_are_named() {
        match p(&["FOO", "a"]) {
            Cmd::Refused(Reply::Error(e)) => assert!(e.starts_with("ERR unknown command 'FOO'")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(p(&["MSET", "a", "1", "b"]), Cmd::Refused(_)));
        assert!(matches!(p(&["INCRBY", "a", "x"]), Cmd::Refused(_)));
    }
}
