//! Tables that survive a restart and a crash: a table in front of a journal
//! ([`crate::journal`]) of snapshots and logs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kv_core::{
    Audit, Binary, BinaryBuf, ByteConfig, ByteDescription, ByteImage, ByteLimits, ByteTable,
    CachePolicy, CachePut, CacheStats, Clock, Description, Error, Evicted, ImagePart, KvBackend,
    Result, TableConfig, TableImage,
};

use kv_kernels::layout::expiry_time;

use crate::journal::{Journal, LogConfig, OpenReport, Target};
use crate::log::{LogKind, Record};
use crate::snapshot::{self, Contents, Header, SaveReport, Snapshot, TableKind};

/// Absolute expiry times for times to live given at `now` (0 stays 0: never).
fn expiry_times(now: u64, ttl_ms: &[u64]) -> Vec<u64> {
    ttl_ms.iter().map(|&t| expiry_time(now, t)).collect()
}

/// Times to live at `time` for absolute expiry times (0 stays 0). A logged expiry time is
/// always after the time its batch applied at; 1 ms guards a clock that went back.
fn times_to_live(time: u64, expires: &[u64]) -> Vec<u64> {
    expires
        .iter()
        .map(|&e| {
            if e == 0 {
                0
            } else {
                e.saturating_sub(time).max(1)
            }
        })
        .collect()
}

/// The clock a durable table's table reads: the user's clock, except while the table is
/// being loaded, when it reads the time each snapshot was taken and each logged batch
/// applied. Replayed batches then set the very expiry times they set the first time, and
/// entries that expired since are simply expired when the load ends.
struct ReplayClock {
    inner: Arc<dyn Clock>,
    /// The time a load is at; `u64::MAX` once the table is live.
    pinned: AtomicU64,
}

impl ReplayClock {
    fn wrap(inner: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            pinned: AtomicU64::new(0),
        })
    }
    /// Moves a load's time forward to `t` (never back).
    fn pin(&self, t: u64) {
        let _ = self
            .pinned
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                (p != u64::MAX && t > p).then_some(t)
            });
    }
    fn go_live(&self) {
        self.pinned.store(u64::MAX, Ordering::SeqCst);
    }
}

impl Clock for ReplayClock {
    fn now_ms(&self) -> u64 {
        match self.pinned.load(Ordering::SeqCst) {
            u64::MAX => self.inner.now_ms(),
            p => p,
        }
    }
}

fn wrong_kind(kind: &str) -> Error {
    Error::InvalidConfig(format!(
        "the directory holds a {kind} table's snapshot; open it as that kind of table"
    ))
}

/// The methods both durable tables have, each handed to the journal.
macro_rules! journal_methods {
    () => {
        /// Starts a rewrite of the log from a fresh snapshot now (see [`crate::journal`]).
        pub fn rewrite(&self) -> Result<()> {
            self.journal.rewrite(&self.front())
        }

        /// Waits for a running rewrite and returns how it ended.
        pub fn wait_rewrite(&self) -> Result<()> {
            self.journal.finish_rewrite()
        }

        /// The current generation and its log's size in bytes.
        pub fn log_position(&self) -> (u64, u64) {
            self.journal.position()
        }

        /// Whether a rewrite (started by [`rewrite`](Self::rewrite) or by the log's size)
        /// is writing its snapshot now.
        pub fn rewrite_in_progress(&self) -> bool {
            self.journal.rewriting()
        }

        /// The failure (a failed append or fsync, a device fault part-way through a batch)
        /// that made the log refuse writes until the table is reopened; `None` while it
        /// accepts them.
        pub fn log_failure(&self) -> Option<Error> {
            self.journal.failure()
        }

        /// Makes every logged batch durable now, whatever the fsync policy.
        pub fn sync(&self) -> Result<()> {
            self.journal.sync()
        }
    };
}

/// A fixed-width table (plain or cache) whose write batches are logged and whose state is
/// snapshotted, in a directory of its own.
///
/// ```
/// use kv_core::{KvBackend, TableConfig};
/// use kv_durable::{DurableTable, Fsync, LogConfig};
/// let dir = std::env::temp_dir().join(format!("vramkv-doc-{}", std::process::id()));
/// # let _ = std::fs::remove_dir_all(&dir);
/// let open = |cfg: TableConfig| -> kv_core::Result<Box<dyn KvBackend>> {
///     Ok(Box::new(kv_backend_cpu::CpuBackend::open(cfg)?))
/// };
/// {
///     let (t, _) = DurableTable::open(&dir, TableConfig::new(100), LogConfig::new(Fsync::Always), &open)?;
///     t.put(&[1, 2], &[10, 20])?;
/// }
/// // After a restart (or a crash), the table is back.
/// let (t, report) = DurableTable::open(&dir, TableConfig::new(100), LogConfig::new(Fsync::Always), &open)?;
/// assert_eq!(report.records, 1);
/// assert_eq!(t.len(), 2);
/// # drop(t); std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), kv_core::Error>(())
/// ```
pub struct DurableTable {
    table: Box<dyn KvBackend>,
    cfg: TableConfig,
    clock: Option<Arc<ReplayClock>>,
    journal: Journal,
}

struct FixedFront<'a> {
    table: &'a dyn KvBackend,
    cfg: &'a TableConfig,
    clock: Option<&'a ReplayClock>,
}

impl Target for FixedFront<'_> {
    fn load(&self, snap: Snapshot) -> Result<()> {
        let Contents::Table(image) = snap.contents else {
            return Err(wrong_kind("byte"));
        };
        check_fixed(&snap.header, self.cfg)?;
        if let Some(c) = self.clock {
            c.pin(snap.header.now_ms);
        }
        snapshot::restore_table(self.table, &image, 1 << 20)
    }

    fn now(&self) -> u64 {
        self.clock.map_or(0, |c| c.now_ms())
    }

    fn replay(&self, time: u64, record: Record<'_>) -> Result<()> {
        if let Some(c) = self.clock {
            c.pin(time);
        }
        match record {
            Record::Put { keys, values } => self.table.put(keys, values),
            Record::Delete { keys } => self.table.delete(keys).map(|_| ()),
            Record::Clear => self.table.clear(),
            Record::CachePut {
                keys,
                values,
                scores,
                expires,
            } => {
                let mut put = CachePut::new(keys, values);
                put.scores = scores;
                let ttl = expires.map(|e| times_to_live(time, e));
                put.ttl_ms = ttl.as_deref();
                self.table.put_cached(put).map(|_| ())
            }
            Record::Restore {
                keys,
                values,
                scores,
                expires,
                clock,
            } => self.table.restore(ImagePart {
                keys,
                values,
                scores,
                expires,
                clock,
            }),
            _ => Err(Error::InvalidArgument(
                "a byte table's record in a fixed-width table's log".into(),
            )),
        }
    }

    fn image(&self) -> Result<(Header, Contents)> {
        let image = self.table.export()?;
        let header = Header::for_table(self.cfg, self.table.describe().backend, &image);
        Ok((header, Contents::Table(image)))
    }
}

/// Checks that a snapshot's table can be loaded into a table of config `cfg`.
fn check_fixed(h: &Header, cfg: &TableConfig) -> Result<()> {
    if h.kind != TableKind::Fixed {
        return Err(wrong_kind("byte"));
    }
    let want = cfg.cache.as_ref().map(|c| c.policy);
    if h.width != cfg.width || h.cache_policy()? != want {
        return Err(Error::InvalidConfig(format!(
            "the snapshot holds a table of width {} and cache policy {:?}; the config asks for \
             width {} and {:?}",
            h.width, h.cache, cfg.width, want
        )));
    }
    Ok(())
}

impl DurableTable {
    /// Opens the durable table in `dir` (creating it if the directory holds none): a new
    /// table from `open(cfg)`, then the newest snapshot and the logs after it. `cfg` must
    /// agree with the stored table's width and cache policy.
    pub fn open(
        dir: &Path,
        cfg: TableConfig,
        log: LogConfig,
        open: &dyn Fn(TableConfig) -> Result<Box<dyn KvBackend>>,
    ) -> Result<(Self, OpenReport)> {
        let mut cfg = cfg;
        let clock = cfg.cache.as_mut().map(|c| {
            let r = ReplayClock::wrap(c.clock.clone());
            c.clock = r.clone();
            r
        });
        let table = open(cfg.clone())?;
        let front = FixedFront {
            table: &*table,
            cfg: &cfg,
            clock: clock.as_deref(),
        };
        let (journal, report) = Journal::open(dir, LogKind::Fixed(cfg.width), log, &front)?;
        if let Some(c) = &clock {
            c.go_live();
        }
        Ok((
            Self {
                table,
                cfg,
                clock,
                journal,
            },
            report,
        ))
    }

    fn front(&self) -> FixedFront<'_> {
        FixedFront {
            table: &*self.table,
            cfg: &self.cfg,
            clock: self.clock.as_deref(),
        }
    }

    fn now(&self) -> u64 {
        self.front().now()
    }

    /// The table behind the log.
    pub fn table(&self) -> &dyn KvBackend {
        &*self.table
    }

    /// The table's config.
    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    /// Writes a snapshot of the table to `path` (outside the table's directory: a backup, or
    /// Redis's `SAVE`).
    pub fn save(&self, path: &Path) -> Result<SaveReport> {
        snapshot::save_table(path, &*self.table, &self.cfg)
    }

    journal_methods!();
}

impl KvBackend for DurableTable {
    fn width(&self) -> usize {
        self.table.width()
    }
    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        kv_core::check_put(self.cfg.width, keys, values)?;
        let rec = Record::Put { keys, values };
        self.journal
            .commit(rec, || self.table.put(keys, values), &self.front())
    }
    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        self.table.get(keys, values_out, found_out)
    }
    fn delete(&self, keys: &[u64]) -> Result<usize> {
        self.journal.commit(
            Record::Delete { keys },
            || self.table.delete(keys),
            &self.front(),
        )
    }
    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        self.table.contains(keys, found_out)
    }
    fn len(&self) -> usize {
        self.table.len()
    }
    fn capacity(&self) -> usize {
        self.table.capacity()
    }
    fn clear(&self) -> Result<()> {
        self.journal
            .commit(Record::Clear, || self.table.clear(), &self.front())
    }
    fn describe(&self) -> Description {
        self.table.describe()
    }
    fn audit(&self) -> Result<Audit> {
        self.table.audit()
    }
    fn put_and_evict(&self, batch: CachePut<'_>, evicted: &mut Evicted<'_>) -> Result<usize> {
        let expires = batch.ttl_ms.map(|t| expiry_times(self.now(), t));
        let rec = Record::CachePut {
            keys: batch.keys,
            values: batch.values,
            scores: batch.scores,
            expires: expires.as_deref(),
        };
        self.journal.commit(
            rec,
            || self.table.put_and_evict(batch, evicted),
            &self.front(),
        )
    }
    fn put_cached(&self, batch: CachePut<'_>) -> Result<usize> {
        let expires = batch.ttl_ms.map(|t| expiry_times(self.now(), t));
        let rec = Record::CachePut {
            keys: batch.keys,
            values: batch.values,
            scores: batch.scores,
            expires: expires.as_deref(),
        };
        self.journal
            .commit(rec, || self.table.put_cached(batch), &self.front())
    }
    fn peek(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        self.table.peek(keys, values_out, found_out)
    }
    fn take(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
        expires_out: &mut [u64],
    ) -> Result<usize> {
        self.journal.commit(
            Record::Delete { keys },
            || self.table.take(keys, values_out, found_out, expires_out),
            &self.front(),
        )
    }
    fn eviction_scope(&self, key: u64) -> Result<u64> {
        self.table.eviction_scope(key)
    }
    fn cache_policy(&self) -> Result<CachePolicy> {
        self.table.cache_policy()
    }
    fn cache_stats(&self) -> Result<CacheStats> {
        self.table.cache_stats()
    }
    fn export(&self) -> Result<TableImage> {
        self.table.export()
    }
    fn restore(&self, part: ImagePart<'_>) -> Result<()> {
        let rec = Record::Restore {
            keys: part.keys,
            values: part.values,
            scores: part.scores,
            expires: part.expires,
            clock: part.clock,
        };
        self.journal
            .commit(rec, || self.table.restore(part), &self.front())
    }
}

/// A byte table whose write batches are logged and whose state is snapshotted, in a
/// directory of its own: what `vramkv serve --appendonly yes` keeps its keys in.
///
/// ```
/// use kv_core::{ByteConfig, ByteTable};
/// use kv_durable::{DurableBytes, Fsync, LogConfig};
/// let dir = std::env::temp_dir().join(format!("vramkv-doc-bytes-{}", std::process::id()));
/// # let _ = std::fs::remove_dir_all(&dir);
/// let open = |cfg: ByteConfig| -> kv_core::Result<Box<dyn ByteTable>> {
///     Ok(Box::new(kv_backend_cpu::CpuBytes::open(cfg)?))
/// };
/// {
///     let (t, _) = DurableBytes::open(&dir, ByteConfig::new(100), LogConfig::new(Fsync::Always), &open)?;
///     t.put_slices(&[b"user:1"], &[b"alice"])?;
/// }
/// let (t, _) = DurableBytes::open(&dir, ByteConfig::new(100), LogConfig::new(Fsync::Always), &open)?;
/// assert_eq!(t.get_slices(&[b"user:1"])?, [Some(b"alice".to_vec())]);
/// # drop(t); std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), kv_core::Error>(())
/// ```
pub struct DurableBytes {
    table: Box<dyn ByteTable>,
    cfg: ByteConfig,
    clock: Arc<ReplayClock>,
    journal: Journal,
}

struct BytesFront<'a> {
    table: &'a dyn ByteTable,
    cfg: &'a ByteConfig,
    clock: &'a ReplayClock,
}

impl Target for BytesFront<'_> {
    fn load(&self, snap: Snapshot) -> Result<()> {
        let Contents::Bytes(image) = snap.contents else {
            return Err(wrong_kind("fixed-width"));
        };
        self.clock.pin(snap.header.now_ms);
        snapshot::restore_bytes(self.table, &image, self.clock.now_ms())
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn replay(&self, time: u64, record: Record<'_>) -> Result<()> {
        self.clock.pin(time);
        match record {
            Record::BytePut {
                keys,
                values,
                expires: None,
            } => self.table.put(keys, values),
            Record::BytePut {
                keys,
                values,
                expires: Some(e),
            } => self.table.put_ttl(keys, values, &times_to_live(time, e)),
            Record::ByteDelete { keys } => self.table.delete(keys).map(|_| ()),
            Record::ByteExpire { keys, expires } => {
                let mut found = vec![false; keys.len()];
                self.table
                    .expire(keys, &times_to_live(time, expires), &mut found)
            }
            Record::ByteClear => self.table.clear(),
            _ => Err(Error::InvalidArgument(
                "a fixed-width table's record in a byte table's log".into(),
            )),
        }
    }

    fn image(&self) -> Result<(Header, Contents)> {
        let image = self.table.export()?;
        let header = Header::for_bytes(self.cfg, self.table.describe().backend, &image);
        Ok((header, Contents::Bytes(image)))
    }
}

impl DurableBytes {
    /// Opens the durable byte table in `dir` (creating it if the directory holds none), as
    /// [`DurableTable::open`] does.
    pub fn open(
        dir: &Path,
        cfg: ByteConfig,
        log: LogConfig,
        open: &dyn Fn(ByteConfig) -> Result<Box<dyn ByteTable>>,
    ) -> Result<(Self, OpenReport)> {
        let clock = ReplayClock::wrap(cfg.clock.clone());
        let cfg = cfg.clock(clock.clone());
        let table = open(cfg.clone())?;
        let front = BytesFront {
            table: &*table,
            cfg: &cfg,
            clock: &clock,
        };
        let (journal, report) = Journal::open(dir, LogKind::Bytes, log, &front)?;
        clock.go_live();
        Ok((
            Self {
                table,
                cfg,
                clock,
                journal,
            },
            report,
        ))
    }

    fn front(&self) -> BytesFront<'_> {
        BytesFront {
            table: &*self.table,
            cfg: &self.cfg,
            clock: &self.clock,
        }
    }

    /// The table behind the log.
    pub fn table(&self) -> &dyn ByteTable {
        &*self.table
    }

    /// Writes a snapshot of the table to `path` (Redis's `SAVE`).
    pub fn save(&self, path: &Path) -> Result<SaveReport> {
        snapshot::save_bytes(path, &*self.table, &self.cfg)
    }

    journal_methods!();
}

impl ByteTable for DurableBytes {
    fn put(&self, keys: Binary<'_>, values: Binary<'_>) -> Result<()> {
        let rec = Record::BytePut {
            keys,
            values,
            expires: None,
        };
        self.journal
            .commit(rec, || self.table.put(keys, values), &self.front())
    }
    fn get(
        &self,
        keys: Binary<'_>,
        values_out: &mut BinaryBuf,
        found_out: &mut [bool],
    ) -> Result<()> {
        self.table.get(keys, values_out, found_out)
    }
    fn delete(&self, keys: Binary<'_>) -> Result<usize> {
        self.journal.commit(
            Record::ByteDelete { keys },
            || self.table.delete(keys),
            &self.front(),
        )
    }
    fn contains(&self, keys: Binary<'_>, found_out: &mut [bool]) -> Result<()> {
        self.table.contains(keys, found_out)
    }
    fn len(&self) -> usize {
        self.table.len()
    }
    fn capacity(&self) -> usize {
        self.table.capacity()
    }
    fn clear(&self) -> Result<()> {
        self.journal
            .commit(Record::ByteClear, || self.table.clear(), &self.front())
    }
    fn limits(&self) -> ByteLimits {
        self.table.limits()
    }
    fn describe(&self) -> ByteDescription {
        self.table.describe()
    }
    fn put_ttl(&self, keys: Binary<'_>, values: Binary<'_>, ttl_ms: &[u64]) -> Result<()> {
        kv_core::check_per_key(keys, "ttl_ms", ttl_ms)?;
        let expires = expiry_times(self.clock.now_ms(), ttl_ms);
        let rec = Record::BytePut {
            keys,
            values,
            expires: Some(&expires),
        };
        self.journal.commit(
            rec,
            || self.table.put_ttl(keys, values, ttl_ms),
            &self.front(),
        )
    }
    fn expire(&self, keys: Binary<'_>, ttl_ms: &[u64], found_out: &mut [bool]) -> Result<()> {
        kv_core::check_per_key(keys, "ttl_ms", ttl_ms)?;
        let expires = expiry_times(self.clock.now_ms(), ttl_ms);
        let rec = Record::ByteExpire {
            keys,
            expires: &expires,
        };
        self.journal.commit(
            rec,
            || self.table.expire(keys, ttl_ms, found_out),
            &self.front(),
        )
    }
    fn ttl(&self, keys: Binary<'_>, ttl_out: &mut [i64]) -> Result<()> {
        self.table.ttl(keys, ttl_out)
    }
    fn export(&self) -> Result<ByteImage> {
        self.table.export()
    }
}
