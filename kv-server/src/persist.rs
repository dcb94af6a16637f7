//! Persistence, as Redis users know it (docs/server.md, "Persistence"): a dump file written
//! by `SAVE` and `BGSAVE` and loaded at start, or, with `appendonly yes`, a directory in
//! which every write batch is logged ([`kv_durable::DurableBytes`]).
//!
//! [`Store::open`] builds the server's table from what is on disk; the server then answers
//! `SAVE`, `BGSAVE`, `LASTSAVE` and `BGREWRITEAOF` through the executor, so that they are
//! ordered with the table commands around them, and reports their state in `INFO
//! persistence`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kv_core::{ByteConfig, ByteTable, Error, Result};
use kv_durable::snapshot::{self, Contents, Header};
use kv_durable::{DurableBytes, Fsync, LogConfig, OpenReport};

use crate::exec::Stats;
use crate::reply::Reply;

/// Where and how the server keeps its keys on disk: Redis's `dir`, `dbfilename`,
/// `appendonly`, `appendfsync` and `appenddirname`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persistence {
    /// The directory of the dump file and of the append-only directory (`.` by default).
    pub dir: PathBuf,
    /// The dump file's name in `dir` (`dump.vkv` by default): what `SAVE` and `BGSAVE`
    /// write, and what the server loads at start when the append-only log is off.
    pub dbfilename: String,
    /// Whether every write batch is logged (`false` by default).
    pub appendonly: bool,
    /// When the log's appends reach the disk (`everysec` by default).
    pub appendfsync: Fsync,
    /// The append-only directory's name in `dir` (`appendonlydir` by default).
    pub appenddirname: String,
}

impl Default for Persistence {
    fn default() -> Self {
        Persistence {
            dir: PathBuf::from("."),
            dbfilename: "dump.vkv".into(),
            appendonly: false,
            appendfsync: Fsync::EverySec,
            appenddirname: "appendonlydir".into(),
        }
    }
}

/// Loads the dump file at `path` into `table`; returns the entries the file held (those
/// expired since are left out). A damaged file is an error that stops the start.
fn load_dump(path: &Path, table: &dyn ByteTable, cfg: &ByteConfig) -> Result<u64> {
    let hint = "the server does not start on a damaged dump file; move it away to start \
                with no keys";
    let snap = snapshot::read(path).map_err(|e| damaged(e, hint))?;
    let Contents::Bytes(image) = &snap.contents else {
        return Err(Error::Corrupt {
            file: path.display().to_string(),
            detail: format!("it holds a fixed-width table's snapshot, not a byte table's; {hint}"),
        });
    };
    snapshot::restore_bytes(table, image, cfg.clock.now_ms()).map_err(|e| {
        Error::InvalidConfig(format!(
            "loading {} into the table: {e} (a larger --maxmemory may be needed)",
            path.display()
        ))
    })?;
    Ok(image.len() as u64)
}

/// The name of an `Fsync` policy, as `CONFIG GET appendfsync` answers it.
pub fn fsync_name(f: Fsync) -> &'static str {
    match f {
        Fsync::Always => "always",
        Fsync::EverySec => "everysec",
        Fsync::No => "no",
    }
}

/// Checks a file name that must name an entry of `dir`, not a path.
fn plain_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
        return Err(Error::InvalidConfig(format!(
            "{what} must be a file name in --dir, not {name:?}"
        )));
    }
    Ok(())
}

impl Persistence {
    /// The dump file: `dir/dbfilename`.
    pub fn dump_path(&self) -> PathBuf {
        self.dir.join(&self.dbfilename)
    }

    /// The append-only directory: `dir/appenddirname`.
    pub fn aof_dir(&self) -> PathBuf {
        self.dir.join(&self.appenddirname)
    }

    /// Checks the settings: `dir` must be an existing directory (Redis refuses to start
    /// otherwise) and the two names plain file names.
    pub fn check(&self) -> Result<()> {
        plain_name("dbfilename", &self.dbfilename)?;
        plain_name("appenddirname", &self.appenddirname)?;
        match std::fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Error::InvalidConfig(format!(
                "dir {}: not a directory",
                self.dir.display()
            ))),
            Err(e) => Err(Error::InvalidConfig(format!(
                "dir {}: {e}",
                self.dir.display()
            ))),
        }
    }
}

/// The server's table and what saving it needs: the config it was opened with, and the
/// durable table behind it when the append-only log is on.
pub struct Store {
    table: Arc<dyn ByteTable>,
    cfg: ByteConfig,
    durable: Option<Arc<DurableBytes>>,
}

/// What [`Store::open`] loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded {
    /// Nothing: there was no dump file (append-only log off).
    Empty {
        /// The dump file looked for.
        path: PathBuf,
    },
    /// The dump file.
    Dump {
        /// Its path.
        path: PathBuf,
        /// The keys loaded.
        keys: u64,
        /// The entries left out because they had expired since the save.
        expired: u64,
        /// Seconds the read and the load took.
        secs: f64,
    },
    /// The append-only directory (append-only log on).
    Log {
        /// Its path.
        dir: PathBuf,
        /// What opening it found: the snapshot, the records replayed, a torn record.
        report: OpenReport,
        /// Keys in the table after the load.
        keys: u64,
        /// The dump file the new append-only directory was started from: when the log is
        /// turned on for the first time (the directory does not exist yet) and a dump file
        /// exists, its keys are loaded into the new log, so that turning the log on loses
        /// nothing. Once the directory exists, it alone is loaded.
        from_dump: Option<PathBuf>,
    },
}

impl Loaded {
    /// What the server prints about the load, one line each; warnings start `warning:`.
    pub fn messages(&self) -> Vec<String> {
        match self {
            Loaded::Empty { path } => {
                vec![format!(
                    "no dump file at {}: starting empty",
                    path.display()
                )]
            }
            Loaded::Dump {
                path,
                keys,
                expired,
                secs,
            } => vec![format!(
                "loaded {keys} keys from {} in {secs:.3} s ({expired} had expired)",
                path.display()
            )],
            Loaded::Log {
                dir,
                report,
                keys,
                from_dump,
            } => {
                let mut out = Vec::new();
                if let Some(p) = from_dump {
                    out.push(format!(
                        "append-only log on: created {} from the dump file {} ({keys} keys)",
                        dir.display(),
                        p.display()
                    ));
                } else if report.created {
                    out.push(format!(
                        "append-only log on: created {} (no keys yet)",
                        dir.display()
                    ));
                } else {
                    out.push(format!(
                        "append-only log on: loaded {keys} keys from {} in {:.3} s \
                         (snapshot generation {} with {} entries, then {} logged batches)",
                        dir.display(),
                        report.secs,
                        report.generation,
                        report.snapshot_entries,
                        report.records
                    ));
                }
                if let Some((path, at, bytes)) = &report.torn {
                    out.push(format!(
                        "warning: {}: dropped a torn final record at byte {at} ({bytes} bytes): \
                         the batch being logged when the server last stopped; the log is cut \
                         there",
                        path.display()
                    ));
                }
                out
            }
        }
    }
}

/// Adds what the user can do to an error about a damaged file.
fn damaged(e: Error, hint: &str) -> Error {
    match e {
        Error::Corrupt { file, detail } => Error::Corrupt {
            file,
            detail: format!("{detail}; {hint}"),
        },
        other => other,
    }
}

impl Store {
    /// A store for `table`, opened with `cfg`, that loaded nothing: `SAVE` and `BGSAVE`
    /// write its snapshots with `cfg` in their header.
    pub fn new(table: Arc<dyn ByteTable>, cfg: ByteConfig) -> Store {
        Store {
            table,
            cfg,
            durable: None,
        }
    }

    /// Opens the server's table as `p` says, with `open(cfg)` making the table itself:
    ///
    /// - `appendonly` on: a [`DurableBytes`] in [`Persistence::aof_dir`], which loads its
    ///   own snapshot and log; the dump file is not read (Redis's rule: the log wins).
    /// - off: a new table, into which the dump file, where there is one, is loaded whole;
    ///   a damaged dump file is an error (the server does not start, as Redis refuses a
    ///   bad RDB file), and so is one holding more than the table takes.
    pub fn open(
        p: &Persistence,
        cfg: ByteConfig,
        open: &dyn Fn(ByteConfig) -> Result<Box<dyn ByteTable>>,
    ) -> Result<(Store, Loaded)> {
        p.check()?;
        if p.appendonly {
            let dir = p.aof_dir();
            let log = LogConfig::new(p.appendfsync);
            let (durable, report) =
                DurableBytes::open(&dir, cfg.clone(), log, open).map_err(|e| {
                    damaged(
                        e,
                        "the server does not start on a damaged append-only directory; \
                         move it away to start without it",
                    )
                })?;
            let dump = p.dump_path();
            let from_dump = (report.created && dump.exists()).then_some(dump);
            if let Some(path) = &from_dump {
                // The dump's keys go through the durable table, so they are logged, then a
                // rewrite makes them the new directory's snapshot.
                load_dump(path, &durable, &cfg)?;
                durable.rewrite().and_then(|()| durable.wait_rewrite())?;
            }
            let durable = Arc::new(durable);
            let loaded = Loaded::Log {
                dir,
                keys: durable.len() as u64,
                report,
                from_dump,
            };
            let table: Arc<dyn ByteTable> = durable.clone();
            return Ok((
                Store {
                    table,
                    cfg,
                    durable: Some(durable),
                },
                loaded,
            ));
        }
        let table: Arc<dyn ByteTable> = Arc::from(open(cfg.clone())?);
        let path = p.dump_path();
        if !path.exists() {
            return Ok((Store::new(table, cfg), Loaded::Empty { path }));
        }
        let t0 = Instant::now();
        let entries = load_dump(&path, &*table, &cfg)?;
        let keys = table.len() as u64;
        let loaded = Loaded::Dump {
            path,
            keys,
            expired: entries.saturating_sub(keys),
            secs: t0.elapsed().as_secs_f64(),
        };
        Ok((Store::new(table, cfg), loaded))
    }

    /// The table the server serves.
    pub fn table(&self) -> &Arc<dyn ByteTable> {
        &self.table
    }

    /// The config the table was opened with.
    pub fn config(&self) -> &ByteConfig {
        &self.cfg
    }

    /// The durable table behind [`Store::table`], when the append-only log is on.
    pub fn durable(&self) -> Option<&Arc<DurableBytes>> {
        self.durable.as_ref()
    }
}

/// Seconds since the Unix epoch.
fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A background job's thread and whether it still runs.
struct Background {
    running: AtomicBool,
    ok: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Background {
    fn new() -> Self {
        Background {
            running: AtomicBool::new(false),
            ok: AtomicBool::new(true),
            thread: Mutex::new(None),
        }
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Waits for the job's thread, if there is one.
    fn join(&self) {
        let t = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// Runs `job` on a thread named `name`, recording how it ended. The caller has checked
    /// that none runs; the executor, the only caller, runs one command at a time.
    fn spawn(
        self: &Arc<Self>,
        name: &str,
        job: impl FnOnce() -> Result<()> + Send + 'static,
    ) -> Result<()> {
        self.join();
        self.running.store(true, Ordering::Release);
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let ok = job().is_ok();
                me.ok.store(ok, Ordering::Release);
                me.running.store(false, Ordering::Release);
            });
        match t {
            Ok(t) => {
                *self.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(t);
                Ok(())
            }
            Err(e) => {
                self.running.store(false, Ordering::Release);
                Err(Error::io(format!("starting the {name} thread"), e))
            }
        }
    }
}

/// The server's persistence state: what `SAVE`, `BGSAVE`, `LASTSAVE`, `BGREWRITEAOF` and
/// `INFO persistence` read and change.
pub(crate) struct Persist {
    pub(crate) settings: Persistence,
    table: Arc<dyn ByteTable>,
    cfg: ByteConfig,
    durable: Option<Arc<DurableBytes>>,
    stats: Arc<Stats>,
    /// When the last save succeeded (at start: the start), in seconds since the epoch.
    last_save: AtomicU64,
    /// [`Stats::changes`] at the export of the last successful save.
    saved_changes: AtomicU64,
    /// Successful saves.
    saves: AtomicU64,
    /// How long the last background save took, in seconds (-1: none yet).
    last_bgsave_secs: AtomicI64,
    bgsave: Arc<Background>,
    rewrite: Arc<Background>,
    /// Whether every logged write so far succeeded.
    aof_write_ok: AtomicBool,
}

impl Persist {
    pub(crate) fn new(settings: Persistence, store: Store, stats: Arc<Stats>) -> Self {
        Persist {
            settings,
            table: store.table,
            cfg: store.cfg,
            durable: store.durable,
            saved_changes: AtomicU64::new(stats.changes.load(Ordering::Relaxed)),
            stats,
            last_save: AtomicU64::new(unix_secs()),
            saves: AtomicU64::new(0),
            last_bgsave_secs: AtomicI64::new(-1),
            bgsave: Arc::new(Background::new()),
            rewrite: Arc::new(Background::new()),
            aof_write_ok: AtomicBool::new(true),
        }
    }

    /// Whether the append-only log is on.
    pub(crate) fn aof(&self) -> bool {
        self.durable.is_some()
    }

    fn saved(&self, changes: u64) {
        self.last_save.store(unix_secs(), Ordering::Release);
        self.saved_changes.store(changes, Ordering::Release);
        self.saves.fetch_add(1, Ordering::Relaxed);
    }

    /// The table's image now, with its header: the one moment a save holds the table.
    fn image(&self) -> Result<(Header, Contents, u64)> {
        let changes = self.stats.changes.load(Ordering::Acquire);
        let image = self.table.export()?;
        let header = Header::for_bytes(&self.cfg, self.table.describe().backend, &image);
        Ok((header, Contents::Bytes(image), changes))
    }

    /// Writes a snapshot to the dump file; a failure removes the temporary file and leaves
    /// the old dump as it was.
    fn write(path: &Path, header: &Header, contents: &Contents) -> Result<()> {
        snapshot::write(path, header, contents)
            .map(|_| ())
            .inspect_err(|_| {
                let _ = std::fs::remove_file(snapshot::temp_path(path));
            })
    }

    /// `SAVE`: a snapshot to the dump file now, the executor waiting for it.
    pub(crate) fn save(&self) -> Reply {
        if self.bgsave.running() {
            return Reply::err("Background save already in progress");
        }
        let path = self.settings.dump_path();
        let r = self
            .image()
            .and_then(|(h, c, n)| Self::write(&path, &h, &c).map(|()| n));
        match r {
            Ok(n) => {
                self.saved(n);
                Reply::Ok
            }
            Err(e) => Reply::err(format!("saving {}: {e}", path.display())),
        }
    }

    /// `BGSAVE`: the table's export now, the file written by a background thread.
    pub(crate) fn bgsave(self: &Arc<Self>) -> Reply {
        if self.bgsave.running() {
            return Reply::err("Background save already in progress");
        }
        let (header, contents, changes) = match self.image() {
            Ok(x) => x,
            Err(e) => {
                self.bgsave.ok.store(false, Ordering::Release);
                return Reply::err(format!("Background save failed: {e}"));
            }
        };
        let me = self.clone();
        let t0 = Instant::now();
        let started = self.bgsave.spawn("vramkv-bgsave", move || {
            let path = me.settings.dump_path();
            let r = Self::write(&path, &header, &contents);
            me.last_bgsave_secs
                .store(t0.elapsed().as_secs() as i64, Ordering::Release);
            match &r {
                Ok(()) => me.saved(changes),
                Err(e) => eprintln!("vramkv serve: background save failed: {e}"),
            }
            r
        });
        match started {
            Ok(()) => Reply::Simple("Background saving started"),
            Err(e) => Reply::err(format!("Background save failed: {e}")),
        }
    }

    /// `LASTSAVE`.
    pub(crate) fn lastsave(&self) -> Reply {
        Reply::Int(self.last_save.load(Ordering::Acquire) as i64)
    }

    /// `BGREWRITEAOF`: the log rewritten from a fresh snapshot, in the background.
    pub(crate) fn bgrewriteaof(self: &Arc<Self>) -> Reply {
        let Some(durable) = &self.durable else {
            return Reply::err(
                "the append-only log is off; start the server with appendonly yes to use it",
            );
        };
        if self.rewrite.running() {
            return Reply::err("Background append only file rewriting already in progress");
        }
        // The export happens here, holding writers back; the snapshot is written by the
        // durable table's own thread, which the watcher below waits for.
        if let Err(e) = durable.rewrite() {
            self.rewrite.ok.store(false, Ordering::Release);
            return Reply::err(format!("Background append only file rewriting failed: {e}"));
        }
        let d = durable.clone();
        let started = self.rewrite.spawn("vramkv-aof-rewrite", move || {
            d.wait_rewrite().inspect_err(|e| {
                eprintln!("vramkv serve: background append only file rewriting failed: {e}");
            })
        });
        match started {
            Ok(()) => Reply::Simple("Background append only file rewriting started"),
            Err(e) => Reply::err(format!("Background append only file rewriting failed: {e}")),
        }
    }

    /// Notes a table error: one that the log caused means its writes failed.
    pub(crate) fn note_error(&self, e: &Error) {
        let broke = match e {
            Error::Io { .. } | Error::Device { .. } => true,
            Error::InvalidArgument(m) => m.contains("log failed"),
            _ => false,
        };
        if self.durable.is_some() && broke {
            self.aof_write_ok.store(false, Ordering::Release);
        }
    }

    /// The lines of `INFO persistence`.
    pub(crate) fn info(&self) -> Vec<(&'static str, String)> {
        let status = |ok: bool| if ok { "ok" } else { "err" }.to_string();
        let changes = self
            .stats
            .changes
            .load(Ordering::Acquire)
            .saturating_sub(self.saved_changes.load(Ordering::Acquire));
        vec![
            ("loading", "0".into()),
            ("rdb_changes_since_last_save", changes.to_string()),
            (
                "rdb_bgsave_in_progress",
                u8::from(self.bgsave.running()).to_string(),
            ),
            (
                "rdb_last_save_time",
                self.last_save.load(Ordering::Acquire).to_string(),
            ),
            (
                "rdb_last_bgsave_status",
                status(self.bgsave.ok.load(Ordering::Acquire)),
            ),
            (
                "rdb_last_bgsave_time_sec",
                self.last_bgsave_secs.load(Ordering::Acquire).to_string(),
            ),
            ("rdb_saves", self.saves.load(Ordering::Relaxed).to_string()),
            ("aof_enabled", u8::from(self.aof()).to_string()),
            (
                "aof_rewrite_in_progress",
                u8::from(
                    self.rewrite.running()
                        || self
                            .durable
                            .as_ref()
                            .is_some_and(|d| d.rewrite_in_progress()),
                )
                .to_string(),
            ),
            (
                "aof_last_bgrewrite_status",
                status(self.rewrite.ok.load(Ordering::Acquire)),
            ),
            (
                "aof_last_write_status",
                status(
                    self.aof_write_ok.load(Ordering::Acquire)
                        && self
                            .durable
                            .as_ref()
                            .is_none_or(|d| d.log_failure().is_none()),
                ),
            ),
        ]
    }

    /// At shutdown: waits for a background save and a log rewrite to end, then makes every
    /// logged write durable. The error of that last sync, if any.
    pub(crate) fn shutdown(&self) -> Result<()> {
        self.bgsave.join();
        self.rewrite.join();
        match &self.durable {
            Some(d) => d.sync(),
            None => Ok(()),
        }
    }
}
