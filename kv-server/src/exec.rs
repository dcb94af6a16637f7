//! The executor: one thread that owns the table's batches. Connections hand it their
//! table commands as jobs; it takes every job waiting (up to a cap), runs their commands in
//! arrival order as few table batches as it can, and answers each job.
//!
//! # Batches, and the order they keep
//!
//! Jobs are taken in the order they arrived, and a job's commands in the order its
//! connection sent them, so the commands form one sequence. The executor walks it and
//! cuts it into *runs* of consecutive commands of one kind (gets, plain sets, deletes,
//! exists), each one table batch; any other command (read-modify-write ones such as
//! `INCR`, `SET NX`, `APPEND`) runs alone, between the runs. Every command therefore sees
//! the effects of every command before it in the sequence and none after: each
//! connection's commands apply in the order it sent them (a `SET` then a `GET` on one
//! connection, pipelined or not, returns the new value), and each command is atomic,
//! because nothing else touches the table while the executor works.
//!
//! A connection may also run a pipeline of reads only itself, through
//! [`Executor::execute`], when the server is configured so
//! ([`ServeConfig::direct_reads`](crate::ServeConfig::direct_reads)): reads take the
//! table's read lock, so they run beside each other and never see half a batch.
//!
//! Batching adapts to load without a timer: while a batch runs, the next jobs queue, and
//! the executor takes all of them at once. An idle server runs each job as soon as it
//! arrives; a loaded one runs batches as large as the load.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;

use bytes::Bytes;
use kv_core::{BinaryBuf, ByteTable, Error, TTL_MISSING, TTL_NEVER};
use tokio::sync::oneshot;

use crate::command::Table;
use crate::persist::Persist;
use crate::reply::Reply;

/// One connection's table commands, and where their replies go.
pub struct Job {
    /// The commands, in the order the connection sent them.
    pub cmds: Vec<Table>,
    /// One reply per command, in the same order.
    pub reply: oneshot::Sender<Vec<Reply>>,
}

/// The server's counters (INFO's `stats` and `vramkv` sections).
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands answered, every kind.
    pub commands: AtomicU64,
    /// Table commands run by the executor.
    pub table_commands: AtomicU64,
    /// Executor rounds (each takes every waiting job).
    pub rounds: AtomicU64,
    /// Table batches run.
    pub batches: AtomicU64,
    /// Keys over every table batch.
    pub batch_keys: AtomicU64,
    /// The most keys in one table batch.
    pub max_batch: AtomicU64,
    /// Keys found by GET and MGET.
    pub hits: AtomicU64,
    /// Keys GET and MGET did not find.
    pub misses: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now.
    pub connected: AtomicU64,
    /// Changes to the keyspace since the server started: one per write command that
    /// changed something (`MSET`: one per key; `DEL`, `EXPIRE`: one per key changed).
    /// `INFO`'s `rdb_changes_since_last_save` counts from the last save.
    pub changes: AtomicU64,
}

impl Stats {
    fn batch(&self, keys: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_keys.fetch_add(keys as u64, Ordering::Relaxed);
        self.max_batch.fetch_max(keys as u64, Ordering::Relaxed);
    }
}

/// Runs table commands against one table (see the module docs).
pub struct Executor {
    table: Arc<dyn ByteTable>,
    stats: Arc<Stats>,
    persist: Option<Arc<Persist>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Get,
    Set,
    Del,
    Exists,
    Single,
}

fn kind(c: &Table) -> Kind {
    match c {
        Table::Get(_) | Table::MGet(_) => Kind::Get,
        Table::Set {
            nx: false,
            xx: false,
            get: false,
            ..
        }
        | Table::MSet(_) => Kind::Set,
        Table::Del(_) => Kind::Del,
        Table::Exists(_) => Kind::Exists,
        _ => Kind::Single,
    }
}

/// The reply for a table error, in Redis's words where Redis has them.
fn error_reply(e: &Error) -> Reply {
    match e {
        Error::BudgetExceeded { .. }
        | Error::CapacityExceeded { .. }
        | Error::OutOfDeviceMemory { .. } => {
            Reply::Error("OOM command not allowed when used memory > 'maxmemory'.".into())
        }
        other => Reply::err(other.to_string()),
    }
}

/// The changes to the keyspace a command made, by its reply (see [`Stats::changes`]).
fn changes(c: &Table, r: &Reply) -> u64 {
    match (c, r) {
        (_, Reply::Error(_)) => 0,
        // SET NX / XX that did not write.
        (Table::Set { get: false, .. }, Reply::Null) => 0,
        (Table::Set { .. } | Table::Incr(..) | Table::Append(..) | Table::Flush, _) => 1,
        (Table::MSet(kv), _) => kv.len() as u64,
        (Table::Del(_) | Table::Expire(..) | Table::Persist(_), Reply::Int(n)) => *n as u64,
        (Table::GetDel(_), Reply::Bulk(_)) => 1,
        _ => 0,
    }
}

fn bin<'a>(items: impl IntoIterator<Item = &'a Bytes>) -> BinaryBuf {
    BinaryBuf::from_slices(items.into_iter().map(|b| b.as_ref()))
}

impl Executor {
    /// An executor for `table`, counting into `stats`.
    ///
    /// Alone it has no persistence: `SAVE`, `BGSAVE`, `LASTSAVE` and `BGREWRITEAOF`
    /// answer that persistence is not configured (a [`crate::Server`]'s executor has it).
    pub fn new(table: Arc<dyn ByteTable>, stats: Arc<Stats>) -> Self {
        Executor {
            table,
            stats,
            persist: None,
        }
    }

    /// The executor of a server with persistence (the same table as `persist`'s).
    pub(crate) fn with_persist(mut self, persist: Arc<Persist>) -> Self {
        self.persist = Some(persist);
        self
    }

    /// The reply for a table error, noting an error of the append-only log.
    fn fail(&self, e: &Error) -> Reply {
        if let Some(p) = &self.persist {
            p.note_error(e);
        }
        error_reply(e)
    }

    /// Serves jobs until every sender is gone. Each round takes every waiting job, up to
    /// `max_batch` commands (at least one job).
    pub fn serve(&self, rx: &Receiver<Job>, max_batch: usize) {
        while let Ok(first) = rx.recv() {
            let mut count = first.cmds.len();
            let mut jobs = vec![first];
            while count < max_batch {
                match rx.try_recv() {
                    Ok(j) => {
                        count += j.cmds.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            self.stats.rounds.fetch_add(1, Ordering::Relaxed);
            let all: Vec<&Table> = jobs.iter().flat_map(|j| j.cmds.iter()).collect();
            let replies = self.execute(&all);
            let mut it = replies.into_iter();
            for j in jobs {
                let mine: Vec<Reply> = it.by_ref().take(j.cmds.len()).collect();
                // A connection that closed meanwhile no longer wants its replies.
                let _ = j.reply.send(mine);
            }
        }
    }

    /// Runs `cmds` in order and returns one reply per command.
    pub fn execute(&self, cmds: &[&Table]) -> Vec<Reply> {
        self.stats
            .table_commands
            .fetch_add(cmds.len() as u64, Ordering::Relaxed);
        let mut out = vec![Reply::Null; cmds.len()];
        let limits = self.table.limits();
        // Commands with a key or value the table cannot take are answered now and left
        // out of their run.
        let mut valid = vec![true; cmds.len()];
        for (i, c) in cmds.iter().enumerate() {
            let bad_key = c
                .keys()
                .into_iter()
                .find(|k| k.is_empty() || k.len() > limits.max_key_bytes);
            if let Some(k) = bad_key {
                out[i] = Reply::err(format!(
                    "keys of {} bytes are not supported (1 to {} bytes)",
                    k.len(),
                    limits.max_key_bytes
                ));
                valid[i] = false;
                continue;
            }
            let too_long = match c {
                Table::Set { value, .. } => value.len() as u64 > limits.max_value_bytes,
                Table::MSet(kv) => kv
                    .iter()
                    .any(|(_, v)| v.len() as u64 > limits.max_value_bytes),
                _ => false,
            };
            if too_long {
                out[i] = Reply::err(format!(
                    "string exceeds maximum allowed size ({} bytes)",
                    limits.max_value_bytes
                ));
                valid[i] = false;
            }
        }
        let mut i = 0;
        while i < cmds.len() {
            if !valid[i] {
                i += 1;
                continue;
            }
            let k = kind(cmds[i]);
            let mut j = i + 1;
            if k != Kind::Single {
                while j < cmds.len() && (!valid[j] || kind(cmds[j]) == k) {
                    j += 1;
                }
            }
            let run: Vec<usize> = (i..j).filter(|&x| valid[x]).collect();
            match k {
                Kind::Get => self.gets(cmds, &run, &mut out),
                Kind::Set => self.sets(cmds, &run, &mut out),
                Kind::Del => self.dels(cmds, &run, &mut out),
                Kind::Exists => self.exists(cmds, &run, &mut out),
                Kind::Single => out[i] = self.single(cmds[i]),
            }
            // Counted before the next command runs, so that a save among them knows
            // exactly which changes it holds.
            let changed: u64 = run.iter().map(|&x| changes(cmds[x], &out[x])).sum();
            if changed > 0 {
                self.stats.changes.fetch_add(changed, Ordering::AcqRel);
            }
            i = j;
        }
        out
    }

    fn gets(&self, cmds: &[&Table], run: &[usize], out: &mut [Reply]) {
        let keys: Vec<&Bytes> = run.iter().flat_map(|&i| cmds[i].keys()).collect();
        let kb = bin(keys.iter().copied());
        let mut values = BinaryBuf::new();
        let mut found = vec![false; keys.len()];
        self.stats.batch(keys.len());
        if let Err(e) = self.table.get(kb.as_binary(), &mut values, &mut found) {
            let r = self.fail(&e);
            run.iter().for_each(|&i| out[i] = r.clone());
            return;
        }
        let hits = found.iter().filter(|f| **f).count() as u64;
        self.stats.hits.fetch_add(hits, Ordering::Relaxed);
        self.stats
            .misses
            .fetch_add(found.len() as u64 - hits, Ordering::Relaxed);
        let (offsets, data) = values.into_parts();
        let data = Bytes::from(data);
        let value = |k: usize| {
            if found[k] {
                Reply::Bulk(data.slice(offsets[k] as usize..offsets[k + 1] as usize))
            } else {
                Reply::Null
            }
        };
        let mut at = 0;
        for &i in run {
            out[i] = match cmds[i] {
                Table::MGet(ks) => {
                    let r = Reply::Array((at..at + ks.len()).map(value).collect());
                    at += ks.len();
                    r
                }
                _ => {
                    at += 1;
                    value(at - 1)
                }
            };
        }
    }

    fn sets(&self, cmds: &[&Table], run: &[usize], out: &mut [Reply]) {
        let (mut keys, mut values, mut ttl) = (BinaryBuf::new(), BinaryBuf::new(), Vec::new());
        for &i in run {
            match cmds[i] {
                Table::Set {
                    key, value, ttl_ms, ..
                } => {
                    keys.push(key);
                    values.push(value);
                    ttl.push(*ttl_ms);
                }
                Table::MSet(kv) => {
                    for (k, v) in kv {
                        keys.push(k);
                        values.push(v);
                        ttl.push(0);
                    }
                }
                _ => {}
            }
        }
        self.stats.batch(keys.len());
        let r = match self.put(&keys, &values, &ttl) {
            Ok(()) => Reply::Ok,
            Err(e) => self.fail(&e),
        };
        run.iter().for_each(|&i| out[i] = r.clone());
    }

    /// A put with times to live (0: none); a table without expiry takes those without.
    fn put(&self, keys: &BinaryBuf, values: &BinaryBuf, ttl: &[u64]) -> kv_core::Result<()> {
        match self
            .table
            .put_ttl(keys.as_binary(), values.as_binary(), ttl)
        {
            Err(Error::Unsupported { .. }) if ttl.iter().all(|t| *t == 0) => {
                self.table.put(keys.as_binary(), values.as_binary())
            }
            r => r,
        }
    }

    fn dels(&self, cmds: &[&Table], run: &[usize], out: &mut [Reply]) {
        let keys: Vec<&Bytes> = run.iter().flat_map(|&i| cmds[i].keys()).collect();
        let kb = bin(keys.iter().copied());
        let mut found = vec![false; keys.len()];
        self.stats.batch(keys.len());
        let r = self
            .table
            .contains(kb.as_binary(), &mut found)
            .and_then(|()| self.table.delete(kb.as_binary()));
        if let Err(e) = r {
            let r = self.fail(&e);
            run.iter().for_each(|&i| out[i] = r.clone());
            return;
        }
        // A key counts for the first command that deletes it.
        let mut gone: HashSet<&[u8]> = HashSet::new();
        let mut at = 0;
        for &i in run {
            let n = cmds[i].keys().len();
            let mut count = 0;
            for k in at..at + n {
                if found[k] && gone.insert(keys[k].as_ref()) {
                    count += 1;
                }
            }
            at += n;
            out[i] = Reply::Int(count);
        }
    }

    fn exists(&self, cmds: &[&Table], run: &[usize], out: &mut [Reply]) {
        let keys: Vec<&Bytes> = run.iter().flat_map(|&i| cmds[i].keys()).collect();
        let kb = bin(keys.iter().copied());
        let mut found = vec![false; keys.len()];
        self.stats.batch(keys.len());
        if let Err(e) = self.table.contains(kb.as_binary(), &mut found) {
            let r = self.fail(&e);
            run.iter().for_each(|&i| out[i] = r.clone());
            return;
        }
        let mut at = 0;
        for &i in run {
            let n = cmds[i].keys().len();
            out[i] = Reply::Int(found[at..at + n].iter().filter(|f| **f).count() as i64);
            at += n;
        }
    }

    fn get1(&self, key: &Bytes) -> kv_core::Result<Option<Bytes>> {
        let mut values = BinaryBuf::new();
        let mut found = [false];
        self.table
            .get(bin([key]).as_binary(), &mut values, &mut found)?;
        Ok(found[0].then(|| Bytes::copy_from_slice(values.get(0).unwrap_or_default())))
    }

    fn ttl1(&self, key: &Bytes) -> kv_core::Result<i64> {
        let mut t = [0i64];
        match self.table.ttl(bin([key]).as_binary(), &mut t) {
            Ok(()) => Ok(t[0]),
            // A table without expiry: every present key lives for ever.
            Err(Error::Unsupported { .. }) => Ok(if self.get1(key)?.is_some() {
                TTL_NEVER
            } else {
                TTL_MISSING
            }),
            Err(e) => Err(e),
        }
    }

    fn put1(&self, key: &Bytes, value: &[u8], ttl_ms: u64) -> kv_core::Result<()> {
        let values = BinaryBuf::from_slices([value]);
        self.put(&bin([key]), &values, &[ttl_ms])
    }

    fn del1(&self, key: &Bytes) -> kv_core::Result<usize> {
        self.table.delete(bin([key]).as_binary())
    }

    /// The time to live a rewrite of `key` keeps (Redis's INCR and APPEND keep it).
    fn kept_ttl(&self, key: &Bytes) -> kv_core::Result<u64> {
        Ok(self.ttl1(key)?.max(0) as u64)
    }

    fn single(&self, c: &Table) -> Reply {
        if c.persistence() {
            return self.persistence(c);
        }
        self.stats.batch(c.keys().len().max(1));
        self.single_inner(c).unwrap_or_else(|e| self.fail(&e))
    }

    /// `SAVE`, `BGSAVE`, `LASTSAVE`, `BGREWRITEAOF`: between the table commands before and
    /// after them, so that a save holds exactly the commands sent before it.
    fn persistence(&self, c: &Table) -> Reply {
        let Some(p) = &self.persist else {
            return Reply::err("persistence is not configured on this server");
        };
        match c {
            Table::Save => p.save(),
            Table::BgSave => p.bgsave(),
            Table::BgRewriteAof => p.bgrewriteaof(),
            _ => p.lastsave(),
        }
    }

    fn single_inner(&self, c: &Table) -> kv_core::Result<Reply> {
        let limits = self.table.limits();
        Ok(match c {
            Table::Set {
                key,
                value,
                ttl_ms,
                nx,
                xx,
                get,
            } => {
                let old = self.get1(key)?;
                let write = !(*nx && old.is_some() || *xx && old.is_none());
                if write {
                    self.put1(key, value, *ttl_ms)?;
                }
                match (get, write) {
                    (true, _) => old.map_or(Reply::Null, Reply::Bulk),
                    (false, true) => Reply::Ok,
                    (false, false) => Reply::Null,
                }
            }
            Table::Expire(key, ms) if *ms <= 0 => Reply::Int(self.del1(key)? as i64),
            Table::Expire(key, ms) => {
                let mut found = [false];
                match self
                    .table
                    .expire(bin([key]).as_binary(), &[*ms as u64], &mut found)
                {
                    Ok(()) => Reply::Int(found[0] as i64),
                    Err(Error::Unsupported { .. }) => {
                        Reply::err("this table's backend has no expiry")
                    }
                    Err(e) => return Err(e),
                }
            }
            Table::Ttl(key, ms) => {
                let t = self.ttl1(key)?;
                Reply::Int(if t < 0 || *ms { t } else { (t + 500) / 1000 })
            }
            Table::Persist(key) => {
                if self.ttl1(key)? >= 0 {
                    let mut found = [false];
                    self.table
                        .expire(bin([key]).as_binary(), &[0], &mut found)?;
                    Reply::Int(found[0] as i64)
                } else {
                    Reply::Int(0)
                }
            }
            Table::Incr(key, by) => {
                let old = self.get1(key)?;
                let current = match &old {
                    None => 0,
                    Some(v) => match std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                    {
                        Some(n) => n,
                        None => return Ok(Reply::err("value is not an integer or out of range")),
                    },
                };
                let Some(new) = current.checked_add(*by) else {
                    return Ok(Reply::err("increment or decrement would overflow"));
                };
                let ttl = if old.is_some() {
                    self.kept_ttl(key)?
                } else {
                    0
                };
                self.put1(key, new.to_string().as_bytes(), ttl)?;
                Reply::Int(new)
            }
            Table::Append(key, value) => {
                let old = self.get1(key)?;
                let mut v = old.as_deref().unwrap_or_default().to_vec();
                v.extend_from_slice(value);
                if v.len() as u64 > limits.max_value_bytes {
                    return Ok(Reply::err(format!(
                        "string exceeds maximum allowed size ({} bytes)",
                        limits.max_value_bytes
                    )));
                }
                let ttl = if old.is_some() {
                    self.kept_ttl(key)?
                } else {
                    0
                };
                self.put1(key, &v, ttl)?;
                Reply::Int(v.len() as i64)
            }
            Table::Strlen(key) => Reply::Int(self.get1(key)?.map_or(0, |v| v.len() as i64)),
            Table::GetDel(key) => {
                let old = self.get1(key)?;
                if old.is_some() {
                    self.del1(key)?;
                }
                old.map_or(Reply::Null, Reply::Bulk)
            }
            Table::DbSize => Reply::Int(self.table.len() as i64),
            Table::Flush => {
                self.table.clear()?;
                Reply::Ok
            }
            Table::Save | Table::BgSave | Table::LastSave | Table::BgRewriteAof => {
                self.persistence(c)
            }
            // The batched kinds reach here only when they are alone; run them as a run.
            Table::Get(_) | Table::MGet(_) | Table::MSet(_) | Table::Del(_) | Table::Exists(_) => {
                let mut out = vec![Reply::Null];
                let cmds = [c];
                match kind(c) {
                    Kind::Get => self.gets(&cmds, &[0], &mut out),
                    Kind::Set => self.sets(&cmds, &[0], &mut out),
                    Kind::Del => self.dels(&cmds, &[0], &mut out),
                    _ => self.exists(&cmds, &[0], &mut out),
                }
                out.swap_remove(0)
            }
        })
    }
}
