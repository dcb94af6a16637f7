//! The files of a durable table: snapshots and logs by generation, their opening,
//! appending, fsync policies and rewrites. [`crate::DurableTable`] and
//! [`crate::DurableBytes`] put a table in front of it.
//!
//! # A directory of generations
//!
//! `snapshot.<g>.vkv` is the table at the start of generation `g`; `log.<g>.vkl` holds
//! every write batch applied after that point, until the next generation starts. The
//! table is *the newest snapshot, then every log of its generation or later, in order*.
//!
//! A rewrite starts generation `g + 1`: holding writers back for one export of the
//! table, it creates `log.<g+1>` and sends later batches there; then, with writers free,
//! it writes `snapshot.<g+1>` (temporary file, fsync, rename, directory fsync) and only
//! after the rename deletes generation `g`'s files. A crash anywhere in between leaves
//! either snapshot `g` with logs `g` and `g + 1` or snapshot `g + 1` with its log: the
//! same table either way.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kv_core::{Error, Result};

use crate::file::{corrupt, io_err, pause_point, sync_dir};
use crate::log::{LogKind, LogWriter, Record, replay};
use crate::snapshot::{self, Contents, Header, Snapshot};

/// When a log's appends are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// An fsync after every batch, before the caller is answered: nothing acknowledged is
    /// ever lost.
    Always,
    /// An fsync every second from a background thread: a power loss loses at most about
    /// the last second; a killed process loses nothing (its appends are in the operating
    /// system's hands).
    #[default]
    EverySec,
    /// No fsync: the operating system writes when it likes.
    No,
}

impl std::str::FromStr for Fsync {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "always" => Ok(Fsync::Always),
            "everysec" => Ok(Fsync::EverySec),
            "no" => Ok(Fsync::No),
            _ => Err(Error::InvalidConfig(format!(
                "appendfsync must be always, everysec or no, not {s:?}"
            ))),
        }
    }
}

/// How a durable table keeps its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// The fsync policy.
    pub fsync: Fsync,
    /// A log past this many bytes is rewritten from a fresh snapshot (0: only when asked).
    pub rewrite_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            fsync: Fsync::EverySec,
            rewrite_bytes: 64 << 20,
        }
    }
}

impl LogConfig {
    /// The default config with fsync policy `fsync`.
    pub fn new(fsync: Fsync) -> Self {
        Self {
            fsync,
            ..Self::default()
        }
    }
    /// Sets the size past which the log is rewritten (0: only when asked).
    pub fn rewrite_bytes(mut self, bytes: u64) -> Self {
        self.rewrite_bytes = bytes;
        self
    }
}

/// What opening a durable table found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenReport {
    /// The generation of the snapshot it started from.
    pub generation: u64,
    /// Entries in that snapshot.
    pub snapshot_entries: u64,
    /// Log records replayed after it.
    pub records: u64,
    /// A torn final record that was dropped (the log is cut there): the log, the record's
    /// offset and the bytes it had.
    pub torn: Option<(PathBuf, u64, u64)>,
    /// Whether the directory held no table yet (a new one was created).
    pub created: bool,
    /// Seconds the whole open took.
    pub secs: f64,
}

/// The path of generation `g`'s snapshot in `dir`.
pub fn snapshot_path(dir: &Path, g: u64) -> PathBuf {
    dir.join(format!("snapshot.{g:012}.vkv"))
}

/// The path of generation `g`'s log in `dir`.
pub fn log_path(dir: &Path, g: u64) -> PathBuf {
    dir.join(format!("log.{g:012}.vkl"))
}

fn generation_of(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

/// The generations of the snapshots and logs in `dir`, sorted; left-over temporary files
/// (a snapshot whose writer died) are deleted.
fn list(dir: &Path) -> Result<(Vec<u64>, Vec<u64>)> {
    let (mut snaps, mut logs) = (Vec::new(), Vec::new());
    let entries = std::fs::read_dir(dir).map_err(|e| io_err("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("listing", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| io_err("removing", &p, e))?;
        } else if let Some(g) = generation_of(&name, "snapshot.", ".vkv") {
            snaps.push(g);
        } else if let Some(g) = generation_of(&name, "log.", ".vkl") {
            logs.push(g);
        }
    }
    snaps.sort_unstable();
    logs.sort_unstable();
    Ok((snaps, logs))
}

/// Deletes every snapshot and log of a generation before `g`.
fn delete_before(dir: &Path, g: u64) -> Result<()> {
    let (snaps, logs) = list(dir)?;
    let old = snaps
        .iter()
        .filter(|&&s| s < g)
        .map(|&s| snapshot_path(dir, s))
        .chain(logs.iter().filter(|&&l| l < g).map(|&l| log_path(dir, l)));
    for p in old {
        std::fs::remove_file(&p).map_err(|e| io_err("removing", &p, e))?;
    }
    sync_dir(dir)
}

/// The background fsync of [`Fsync::EverySec`].
struct Syncer {
    shared: Arc<SyncShared>,
    thread: Option<JoinHandle<()>>,
}

struct SyncShared {
    file: Mutex<Option<std::fs::File>>,
    dirty: AtomicBool,
    stop: AtomicBool,
}

impl Syncer {
    fn start(file: std::fs::File) -> Self {
        let shared = Arc::new(SyncShared {
            file: Mutex::new(Some(file)),
            dirty: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vramkv-fsync".into())
            .spawn(move || {
                while !s.stop.load(Ordering::Acquire) {
                    std::thread::park_timeout(Duration::from_secs(1));
                    if s.dirty.swap(false, Ordering::AcqRel)
                        && let Some(f) = &*s.file.lock().unwrap_or_else(PoisonError::into_inner)
                    {
                        // An fsync that fails here is retried a second later; the next
                        // `always`-style guarantee is not promised under everysec.
                        if f.sync_data().is_err() {
                            s.dirty.store(true, Ordering::Release);
                        }
                    }
                }
            })
            .ok();
        Self { shared, thread }
    }

    fn switch(&self, file: std::fs::File) {
        *self
            .shared
            .file
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(file);
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        if let Some(f) = &*self
            .shared
            .file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            let _ = f.sync_data();
        }
    }
}

struct State {
    writer: LogWriter,
    generation: u64,
    /// Set when an append failed or a batch failed on its device part-way: the log no
    /// longer describes the table, so further writes are refused (reopen to recover).
    broken: Option<Error>,
}

/// A rewrite's snapshot writer, running in the background.
struct Rewrite {
    thread: JoinHandle<Result<()>>,
}

/// The log files of one durable table.
pub(crate) struct Journal {
    dir: PathBuf,
    kind: LogKind,
    cfg: LogConfig,
    state: Mutex<State>,
    syncer: Option<Syncer>,
    rewrite: Mutex<Option<Rewrite>>,
    rewriting: Arc<AtomicBool>,
}

/// What a table in front of a journal gives it.
pub(crate) trait Target {
    /// Puts a snapshot's contents into the (empty) table.
    fn load(&self, snapshot: Snapshot) -> Result<()>;
    /// Applies one logged batch again, as it applied when the table's clock read `time`.
    fn replay(&self, time: u64, record: Record<'_>) -> Result<()>;
    /// The table's clock now (0 for a table without expiry).
    fn now(&self) -> u64;
    /// The table's header and contents now (an export): what a rewrite snapshots.
    fn image(&self) -> Result<(Header, Contents)>;
}

impl Journal {
    /// Opens (or creates) the table's files in `dir` and brings `target` (a new, empty
    /// table) up to the state they hold.
    pub(crate) fn open(
        dir: &Path,
        kind: LogKind,
        cfg: LogConfig,
        target: &dyn Target,
    ) -> Result<(Self, OpenReport)> {
        let t0 = Instant::now();
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        let (snaps, logs) = list(dir)?;
        let mut report = OpenReport {
            generation: 0,
            snapshot_entries: 0,
            records: 0,
            torn: None,
            created: false,
            secs: 0.0,
        };
        let (writer, generation) = match snaps.last() {
            None => {
                if let Some(&l) = logs.first() {
                    return Err(corrupt(
                        &log_path(dir, l),
                        "a log with no snapshot to start from (its snapshot was removed)",
                    ));
                }
                let (header, contents) = target.image()?;
                snapshot::write(&snapshot_path(dir, 0), &header, &contents)?;
                report.created = true;
                (LogWriter::create(&log_path(dir, 0), kind, 0)?, 0)
            }
            Some(&g) => {
                let snap = snapshot::read(&snapshot_path(dir, g))?;
                report.generation = g;
                report.snapshot_entries = snap.header.entries;
                target.load(snap)?;
                let mine: Vec<u64> = logs.iter().copied().filter(|&l| l >= g).collect();
                let mut last = None;
                for (i, &l) in mine.iter().enumerate() {
                    let path = log_path(dir, l);
                    let r = replay(&path, kind, |time, rec| target.replay(time, rec))?;
                    if r.generation != l {
                        return Err(corrupt(
                            &path,
                            format!("the header names generation {}", r.generation),
                        ));
                    }
                    report.records += r.records;
                    if let Some((at, bytes)) = r.torn {
                        if i + 1 != mine.len() {
                            return Err(corrupt(
                                &path,
                                format!(
                                    "a torn record at byte {at} with a later log after it \
                                     (damaged)"
                                ),
                            ));
                        }
                        report.torn = Some((path.clone(), at, bytes));
                    }
                    last = Some((path, l, r.valid_bytes));
                }
                delete_before(dir, g)?;
                match last {
                    Some((path, l, valid)) => (LogWriter::append_to(&path, valid)?, l),
                    None => (LogWriter::create(&log_path(dir, g), kind, g)?, g),
                }
            }
        };
        let syncer = match cfg.fsync {
            Fsync::EverySec => Some(Syncer::start(writer.file_handle()?)),
            _ => None,
        };
        report.secs = t0.elapsed().as_secs_f64();
        Ok((
            Self {
                dir: dir.to_path_buf(),
                kind,
                cfg,
                state: Mutex::new(State {
                    writer,
                    generation,
                    broken: None,
                }),
                syncer,
                rewrite: Mutex::new(None),
                rewriting: Arc::new(AtomicBool::new(false)),
            },
            report,
        ))
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &st.broken {
            Some(e) => Err(Error::InvalidArgument(format!(
                "the table's log failed earlier ({e}); writes are refused until it is reopened"
            ))),
            None => Ok(st),
        }
    }

    /// Applies a write batch with `apply` and appends `record` (with the table's clock read
    /// just before) once it has applied, before returning; writers are ordered by the journal's lock, so the log's order is the
    /// order in which batches applied. A batch refused as bad input is not logged; a
    /// device fault part-way ([`Error::Device`]) or a failed append breaks the journal
    /// (see [`State::broken`]).
    pub(crate) fn commit<R>(
        &self,
        record: Record<'_>,
        apply: impl FnOnce() -> Result<R>,
        target: &dyn Target,
    ) -> Result<R> {
        let mut st = self.lock()?;
        let time = target.now();
        let r = match apply() {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, Error::Device { .. }) {
                    st.broken = Some(e.clone());
                }
                return Err(e);
            }
        };
        let appended = st
            .writer
            .append(time, &record)
            .and_then(|()| match self.cfg.fsync {
                Fsync::Always => st.writer.sync(),
                _ => {
                    if let Some(s) = &self.syncer {
                        s.shared.dirty.store(true, Ordering::Release);
                    }
                    Ok(())
                }
            });
        if let Err(e) = appended {
            st.broken = Some(e.clone());
            return Err(e);
        }
        pause_point("log.appended");
        if self.cfg.rewrite_bytes > 0
            && st.writer.bytes() > self.cfg.rewrite_bytes
            && !self.rewriting.load(Ordering::Acquire)
        {
            // A rewrite that cannot start (the disk is full, say) leaves the log growing;
            // the batch itself is applied and logged, so it still succeeds.
            let _ = self.start_rewrite(&mut st, target);
        }
        Ok(r)
    }

    /// Starts a rewrite now (unless one is running): see the module docs.
    pub(crate) fn rewrite(&self, target: &dyn Target) -> Result<()> {
        let mut st = self.lock()?;
        if self.rewriting.load(Ordering::Acquire) {
            return Ok(());
        }
        self.start_rewrite(&mut st, target)
    }

    fn start_rewrite(&self, st: &mut State, target: &dyn Target) -> Result<()> {
        self.finish_rewrite()?;
        let (header, contents) = target.image()?;
        let g = st.generation + 1;
        let new = LogWriter::create(&log_path(&self.dir, g), self.kind, g)?;
        let mut old = std::mem::replace(&mut st.writer, new);
        st.generation = g;
        if let Err(e) = old.sync() {
            st.broken = Some(e.clone());
            return Err(e);
        }
        if let Some(s) = &self.syncer {
            s.switch(st.writer.file_handle()?);
        }
        self.rewriting.store(true, Ordering::Release);
        let (dir, flag) = (self.dir.clone(), self.rewriting.clone());
        let thread = std::thread::Builder::new()
            .name("vramkv-rewrite".into())
            .spawn(move || {
                pause_point("rewrite.switched");
                let r =
                    snapshot::write(&snapshot_path(&dir, g), &header, &contents).and_then(|_| {
                        pause_point("rewrite.renamed");
                        delete_before(&dir, g)
                    });
                flag.store(false, Ordering::Release);
                r
            })
            .map_err(|e| Error::io("starting the rewrite thread", e))?;
        *self.rewrite.lock().unwrap_or_else(PoisonError::into_inner) = Some(Rewrite { thread });
        Ok(())
    }

    /// Waits for a running rewrite to finish and returns its result.
    pub(crate) fn finish_rewrite(&self) -> Result<()> {
        let running = self
            .rewrite
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match running {
            None => Ok(()),
            Some(r) => r.thread.join().unwrap_or_else(|_| {
                Err(Error::InvalidArgument("the rewrite thread panicked".into()))
            }),
        }
    }

    /// The current generation and the log's size in bytes.
    pub(crate) fn position(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (st.generation, st.writer.bytes())
    }

    /// Whether a rewrite's snapshot is being written now.
    pub(crate) fn rewriting(&self) -> bool {
        self.rewriting.load(Ordering::Acquire)
    }

    /// The failure that made the log refuse writes, if one did.
    pub(crate) fn failure(&self) -> Option<Error> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .broken
            .clone()
    }

    /// Makes every append so far durable, whatever the policy.
    pub(crate) fn sync(&self) -> Result<()> {
        self.lock()?.writer.sync()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.finish_rewrite();
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _ = st.writer.sync();
    }
}
