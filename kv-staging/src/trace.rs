//! The trace of a host batch: where its time went, phase by phase.
//!
//! A backend is handed a [`Tracer`] in its options (none: no trace, and no clock read).
//! For each batch it makes one [`Recorder`] and brackets the phases of its pipeline with
//! [`Recorder::phase`], a guard that adds the time until it drops to the phase; at the end
//! of the batch it [`report`](Recorder::report)s one line. The tracer writes lines to
//! stderr, or keeps them for the caller to read (tests and tools).
//!
//! ```
//! use kv_staging::trace::{Phase, Recorder, Tracer};
//!
//! let tracer = Tracer::kept();
//! let rec = Recorder::new(Some(&tracer));
//! {
//!     let _wait = rec.phase(Phase::Wait);
//!     std::thread::sleep(std::time::Duration::from_millis(2));
//! }
//! assert!(rec.secs(Phase::Wait) >= 0.002);
//! rec.report(|r| format!("put: wait {:.0} ms", r.secs(Phase::Wait) * 1e3));
//! assert!(tracer.lines()[0].starts_with("put: wait"));
//!
//! // Without a tracer nothing is timed or written.
//! let off = Recorder::new(None);
//! drop(off.phase(Phase::Wait));
//! assert_eq!(off.secs(Phase::Wait), 0.0);
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Where trace lines go: stderr, or a list the caller reads. Cheap to clone (shared).
#[derive(Clone)]
pub struct Tracer {
    inner: Arc<Inner>,
}

struct Inner {
    keep: bool,
    lines: Mutex<Vec<String>>,
    noted: Mutex<HashSet<&'static str>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.inner.keep {
            "Tracer(kept)"
        } else {
            "Tracer(stderr)"
        })
    }
}

impl PartialEq for Tracer {
    /// Two tracers are equal when they are the same tracer (clones of one).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Tracer {}

impl Tracer {
    fn with(keep: bool) -> Tracer {
        Tracer {
            inner: Arc::new(Inner {
                keep,
                lines: Mutex::new(Vec::new()),
                noted: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// A tracer that prints each line on stderr.
    pub fn stderr() -> Tracer {
        Tracer::with(false)
    }

    /// A tracer that keeps its lines for [`lines`](Self::lines).
    pub fn kept() -> Tracer {
        Tracer::with(true)
    }

    /// Writes one line.
    pub fn line(&self, text: impl fmt::Display) {
        if self.inner.keep {
            lock(&self.inner.lines).push(text.to_string());
        } else {
            eprintln!("{text}");
        }
    }

    /// Writes `text` the first time this tracer is given `key` (a note that would otherwise
    /// repeat for every batch or lane).
    pub fn once(&self, key: &'static str, text: impl fmt::Display) {
        if lock(&self.inner.noted).insert(key) {
            self.line(text);
        }
    }

    /// The lines written so far (a [`kept`](Self::kept) tracer; empty for stderr).
    pub fn lines(&self) -> Vec<String> {
        lock(&self.inner.lines).clone()
    }
}

/// The host-side phases of a batch's pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the device (to reuse a lane, or at the end of the batch).
    Wait,
    /// Copying the caller's keys and values into staging buffers.
    CopyIn,
    /// Copying results out of staging buffers into the caller's slices.
    CopyOut,
    /// Both at once, in one fork-join: a chunk's keys in and the previous chunk's results out.
    CopyBoth,
    /// Encoding and submitting device work.
    Submit,
}

const PHASES: usize = 5;

/// The trace of one batch: seconds per [`Phase`], and the time since it was made. It may
/// be shared with the threads of a fork-join (`Sync`).
pub struct Recorder {
    tracer: Option<Tracer>,
    start: Option<Instant>,
    /// Seconds per phase, as `f64` bits.
    secs: [AtomicU64; PHASES],
}

/// Adds the time from its making to its drop to one phase of a [`Recorder`].
#[must_use = "the phase is timed until the guard drops"]
pub struct Span<'a> {
    at: Option<(&'a AtomicU64, Instant)>,
}

fn add_secs(word: &AtomicU64, secs: f64) {
    let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
        Some((f64::from_bits(b) + secs).to_bits())
    });
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if let Some((word, t0)) = self.at {
            add_secs(word, t0.elapsed().as_secs_f64());
        }
    }
}

impl Recorder {
    /// A recorder for one batch, writing to `tracer` (none: it records nothing).
    pub fn new(tracer: Option<&Tracer>) -> Recorder {
        Recorder {
            tracer: tracer.cloned(),
            start: tracer.map(|_| Instant::now()),
            secs: Default::default(),
        }
    }

    /// Whether the batch is traced.
    pub fn on(&self) -> bool {
        self.tracer.is_some()
    }

    /// The tracer the batch writes to.
    pub fn tracer(&self) -> Option<&Tracer> {
        self.tracer.as_ref()
    }

    /// Times `phase` until the returned guard drops.
    pub fn phase(&self, phase: Phase) -> Span<'_> {
        Span {
            at: self
                .on()
                .then(|| (&self.secs[phase as usize], Instant::now())),
        }
    }

    /// Adds `secs` seconds to `phase` (time measured elsewhere).
    pub fn add(&self, phase: Phase, secs: f64) {
        add_secs(&self.secs[phase as usize], secs);
    }

    /// Seconds recorded for `phase`.
    pub fn secs(&self, phase: Phase) -> f64 {
        f64::from_bits(self.secs[phase as usize].load(Ordering::Relaxed))
    }

    /// Seconds since the recorder was made (0 when off).
    pub fn elapsed(&self) -> f64 {
        self.start.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    /// Writes the line `line` makes of the record, when the batch is traced.
    pub fn report(&self, line: impl FnOnce(&Recorder) -> String) {
        if let Some(t) = &self.tracer {
            t.line(line(self));
        }
    }
}

/// The trace of a batch whose steps run one after another on the calling thread: the wall
/// time of each labelled step, from the previous [`lap`](Laps::lap) (or the start) to
/// this one, summed by label. For drivers that wait for the device between their steps
/// (the byte tables), the laps split a batch into its copies, waits and host work.
///
/// ```
/// use kv_staging::trace::{Laps, Tracer};
///
/// let tracer = Tracer::kept();
/// let mut laps = Laps::new(Some(&tracer));
/// std::thread::sleep(std::time::Duration::from_millis(2));
/// laps.lap("upload");
/// laps.lap("plan");
/// laps.lap("upload");
/// laps.report("put", 10);
/// let line = &tracer.lines()[0];
/// assert!(line.starts_with("put of 10 keys: "), "{line}");
/// assert!(line.contains("upload") && line.contains("(2x)"), "{line}");
///
/// // Without a tracer nothing is timed or written.
/// let mut off = Laps::new(None);
/// off.lap("upload");
/// off.report("put", 10);
/// ```
pub struct Laps {
    tracer: Option<Tracer>,
    start: Option<Instant>,
    last: Option<Instant>,
    /// Seconds and count per label, in the order first seen.
    sums: Vec<(&'static str, f64, usize)>,
}

impl Laps {
    /// Laps of one batch, written to `tracer` (none: nothing is timed).
    pub fn new(tracer: Option<&Tracer>) -> Laps {
        let now = tracer.map(|_| Instant::now());
        Laps {
            tracer: tracer.cloned(),
            start: now,
            last: now,
            sums: Vec::new(),
        }
    }

    /// Ends the step `label`, begun at the previous lap.
    pub fn lap(&mut self, label: &'static str) {
        let Some(last) = self.last else {
            return;
        };
        let now = Instant::now();
        let secs = (now - last).as_secs_f64();
        self.last = Some(now);
        match self.sums.iter_mut().find(|s| s.0 == label) {
            Some(s) => {
                s.1 += secs;
                s.2 += 1;
            }
            None => self.sums.push((label, secs, 1)),
        }
    }

    /// Writes one line: the batch's total time and each label's.
    pub fn report(&self, what: &str, n: usize) {
        let (Some(t), Some(start)) = (&self.tracer, self.start) else {
            return;
        };
        let steps: Vec<String> = self
            .sums
            .iter()
            .map(|(l, s, c)| format!("{l} {:.3} ms ({c}x)", s * 1e3))
            .collect();
        t.line(format_args!(
            "{what} of {n} keys: {:.3} ms = {}",
            start.elapsed().as_secs_f64() * 1e3,
            steps.join(" + ")
        ));
    }
}
