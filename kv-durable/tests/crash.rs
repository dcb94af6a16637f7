//! Crash tests: a writer in a child process is killed with SIGKILL at random moments and at
//! named points (half a log record written, a snapshot half written, a rewrite between its
//! steps), then the table is reopened and checked:
//!
//! - under `always`, every batch the writer was answered for is there;
//! - under `everysec`, at most the last second's batches are missing;
//! - with snapshots alone, the last complete snapshot is there, whole;
//! - always: the table is exactly the state after some whole batch, never half of one.
//!
//! The writer is this test binary again, started with `VRAMKV_CRASH_CHILD` set; it runs
//! the `crash_child` test, which does nothing otherwise. Each batch is a function of its
//! step number, so the parent knows the table after every step; key `MARK` holds the last
//! put step, so the parent knows which step a recovered table claims to be at.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kv_backend_cpu::CpuBackend;
use kv_backend_cpu::CpuBytes;
use kv_conformance::SplitMix64;
use kv_core::{BinaryBuf, ByteConfig, ByteTable, KvBackend, TableConfig};
use kv_durable::snapshot::{self, Contents};
use kv_durable::{DurableBytes, DurableTable, Fsync, LogConfig};

const WIDTH: usize = 2;
const KEYS: u64 = 3000;
const MARK: u64 = u64::MAX;
const KILLS: usize = 350;
const TIME_LIMIT: Duration = Duration::from_secs(240);

fn cfg() -> TableConfig {
    TableConfig::new(8192).width(WIDTH).seed(1)
}

fn open_cpu(cfg: TableConfig) -> kv_core::Result<Box<dyn KvBackend>> {
    Ok(Box::new(CpuBackend::open(cfg)?))
}

/// Step `s`: a delete of 24 keys when `s % 4 == 0`, else a put of 48 keys and `MARK`.
enum Step {
    Put(Vec<u64>, Vec<u64>),
    Delete(Vec<u64>),
}

fn step(s: u64) -> Step {
    let mut rng = SplitMix64(s.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    if s.is_multiple_of(4) {
        Step::Delete((0..24).map(|_| rng.below(KEYS)).collect())
    } else {
        let mut keys: Vec<u64> = (0..48).map(|_| rng.below(KEYS)).collect();
        keys.push(MARK);
        let vals = keys.iter().flat_map(|&k| [s, k ^ s]).collect();
        Step::Put(keys, vals)
    }
}

/// The entries of a state, as bytes: a fixed-width table's keys and rows in
/// little-endian, or a byte table's keys and values.
type State = HashMap<Vec<u8>, Vec<u8>>;

/// How a step's entries look in a byte table: key `k` is `"k<k>"`, its value the first
/// `(k ^ s) % 17` bytes of its row (the mark's value whole).
fn byte_entry(key: u64, row: [u64; WIDTH]) -> (Vec<u8>, Vec<u8>) {
    let mut v: Vec<u8> = row.iter().flat_map(|w| w.to_le_bytes()).collect();
    if key != MARK {
        v.truncate((row[1] % 17) as usize);
    }
    (format!("k{key}").into_bytes(), v)
}

fn fixed_entry(key: u64, row: [u64; WIDTH]) -> (Vec<u8>, Vec<u8>) {
    (
        key.to_le_bytes().to_vec(),
        row.iter().flat_map(|w| w.to_le_bytes()).collect(),
    )
}

fn apply_model(m: &mut State, s: u64, bytes: bool) {
    let entry = if bytes { byte_entry } else { fixed_entry };
    match step(s) {
        Step::Put(k, v) => {
            for (i, key) in k.iter().enumerate() {
                let (k, v) = entry(*key, [v[i * 2], v[i * 2 + 1]]);
                m.insert(k, v);
            }
        }
        Step::Delete(k) => {
            for key in k {
                m.remove(&entry(key, [0; WIDTH]).0);
            }
        }
    }
}

/// The table under test: a fixed-width table or a byte table.
#[derive(Clone, Copy)]
enum Subject<'a> {
    Fixed(&'a dyn KvBackend),
    Bytes(&'a dyn ByteTable),
}

impl Subject<'_> {
    fn apply(self, s: u64) -> kv_core::Result<()> {
        match (self, step(s)) {
            (Subject::Fixed(t), Step::Put(k, v)) => t.put(&k, &v),
            (Subject::Fixed(t), Step::Delete(k)) => t.delete(&k).map(|_| ()),
            (Subject::Bytes(t), Step::Put(k, v)) => {
                let e: Vec<_> = k
                    .iter()
                    .enumerate()
                    .map(|(i, &key)| byte_entry(key, [v[i * 2], v[i * 2 + 1]]))
                    .collect();
                let keys = BinaryBuf::from_slices(e.iter().map(|x| &x.0));
                let vals = BinaryBuf::from_slices(e.iter().map(|x| &x.1));
                t.put(keys.as_binary(), vals.as_binary())
            }
            (Subject::Bytes(t), Step::Delete(k)) => {
                let keys = BinaryBuf::from_slices(k.iter().map(|&key| byte_entry(key, [0; 2]).0));
                t.delete(keys.as_binary()).map(|_| ())
            }
        }
    }

    /// The last put step the table holds (0: none yet).
    fn mark(self) -> u64 {
        let state = self.contents();
        let key = match self {
            Subject::Fixed(_) => fixed_entry(MARK, [0; WIDTH]).0,
            Subject::Bytes(_) => byte_entry(MARK, [0; WIDTH]).0,
        };
        state.get(&key).map_or(0, |v| {
            u64::from_le_bytes(v[..8].try_into().expect("a mark of 16 bytes"))
        })
    }

    fn contents(self) -> State {
        match self {
            Subject::Fixed(t) => {
                let img = t.export().expect("export");
                img.keys
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| fixed_entry(k, [img.values[i * 2], img.values[i * 2 + 1]]))
                    .collect()
            }
            Subject::Bytes(t) => {
                let img = t.export().expect("export");
                (0..img.len())
                    .map(|i| {
                        (
                            img.keys.get(i).unwrap_or_default().to_vec(),
                            img.values.get(i).unwrap_or_default().to_vec(),
                        )
                    })
                    .collect()
            }
        }
    }
}

/// The fsync policy of a mode, and whether it runs a byte table (`bytes-<policy>`).
fn fsync_of(mode: &str) -> (Fsync, bool) {
    let (policy, bytes) = match mode.strip_prefix("bytes-") {
        Some(p) => (p, true),
        None => (mode, false),
    };
    (policy.parse().expect("a mode names an fsync policy"), bytes)
}

fn byte_cfg() -> ByteConfig {
    ByteConfig::new(8192).max_key_bytes(32).max_value_bytes(64)
}

fn open_bytes(cfg: ByteConfig) -> kv_core::Result<Box<dyn ByteTable>> {
    Ok(Box::new(CpuBytes::open(cfg)?))
}

/// The child: opens the table in the directory and writes steps until it is killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("VRAMKV_CRASH_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mode = std::env::var("VRAMKV_CRASH_MODE").unwrap_or_default();
    let say = |line: String| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    if mode == "snapshot" {
        let path = dir.join("dump.vkv");
        let t = CpuBackend::open(cfg()).expect("open");
        if path.exists() {
            let snap = snapshot::read(&path).expect("the last snapshot loads");
            let Contents::Table(img) = &snap.contents else {
                panic!("kind")
            };
            snapshot::restore_table(&t, img, 1 << 20).expect("restore");
        }
        let mut s = Subject::Fixed(&t).mark() + 1;
        say("ready".into());
        loop {
            Subject::Fixed(&t).apply(s).expect("step");
            say(format!("ack {s}"));
            if s % 10 == 1 {
                snapshot::save_table(&path, &t, &cfg()).expect("save");
                say(format!("saved {s}"));
            }
            s += 1;
        }
    }
    let (fsync, bytes) = fsync_of(&mode);
    let log = LogConfig::new(fsync).rewrite_bytes(48 << 10);
    let (fixed, byte);
    let t = if bytes {
        byte = DurableBytes::open(&dir, byte_cfg(), log, &open_bytes)
            .expect("open")
            .0;
        Subject::Bytes(&byte)
    } else {
        fixed = DurableTable::open(&dir, cfg(), log, &open_cpu)
            .expect("open")
            .0;
        Subject::Fixed(&fixed)
    };
    let mut s = t.mark() + 1;
    say("ready".into());
    loop {
        t.apply(s).expect("step");
        say(format!("ack {s}"));
        s += 1;
    }
}

struct Kill {
    /// The last step acknowledged, and the last acknowledged at least a second before the
    /// kill.
    acked: u64,
    acked_1s_before: u64,
    /// The last snapshot completed (snapshot mode).
    saved: u64,
    /// Whether the child stopped at its pause point.
    paused: bool,
}

fn run_child(dir: &Path, mode: &str, pause: Option<(&str, u64)>, delay_us: u64) -> Kill {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "crash_child",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("VRAMKV_CRASH_CHILD", dir)
    .env("VRAMKV_CRASH_MODE", mode)
    .env_remove("VRAMKV_PAUSE_AT")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some((p, k)) = pause {
        cmd.env("VRAMKV_PAUSE_AT", format!("{p}:{k}"));
    }
    let mut child = cmd.spawn().expect("spawn the writer");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut kill = Kill {
        acked: 0,
        acked_1s_before: 0,
        saved: 0,
        paused: false,
    };
    let mut acks: Vec<(Instant, u64)> = Vec::new();
    let mut ready_at = None;
    let start = Instant::now();
    loop {
        let waited = match ready_at {
            Some(r) => Instant::now().duration_since(r),
            None => Duration::ZERO,
        };
        let due = pause.is_none() && ready_at.is_some() && waited.as_micros() as u64 >= delay_us;
        if due || start.elapsed() > Duration::from_secs(20) {
            break;
        }
        match rx.recv_timeout(Duration::from_micros(200)) {
            Ok((at, line)) => {
                // libtest prints "test crash_child ... " before the child's first line.
                if line.ends_with("ready") {
                    ready_at = Some(at);
                } else if let Some(s) = line.strip_prefix("ack ") {
                    acks.push((at, s.parse().expect("step")));
                } else if let Some(s) = line.strip_prefix("saved ") {
                    kill.saved = s.parse().expect("step");
                } else if line.starts_with("pause-point ") {
                    kill.paused = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // SIGKILL: no destructor, no flush, no fsync runs in the child.
    child.kill().expect("SIGKILL");
    let at = Instant::now();
    child.wait().expect("reap");
    // Lines the child wrote before it died count as acknowledged too.
    let _ = reader.join();
    for (t, line) in rx.try_iter() {
        if let Some(s) = line.strip_prefix("ack ") {
            acks.push((t, s.parse().expect("step")));
        } else if let Some(s) = line.strip_prefix("saved ") {
            kill.saved = s.parse().expect("step");
        }
    }
    kill.acked = acks.last().map_or(0, |a| a.1);
    kill.acked_1s_before = acks
        .iter()
        .filter(|a| at.duration_since(a.0) >= Duration::from_secs(1))
        .map(|a| a.1)
        .max()
        .unwrap_or(0);
    kill
}

/// The model after step `p`, kept moving forward.
struct Models {
    at: u64,
    state: State,
    bytes: bool,
}

impl Models {
    fn advance_to(&mut self, p: u64) {
        assert!(
            p >= self.at,
            "the table went back from step {} to {p}",
            self.at
        );
        while self.at < p {
            self.at += 1;
            apply_model(&mut self.state, self.at, self.bytes);
        }
    }
}

/// Checks a recovered table: it is exactly the model after a whole step, at or past the
/// least step the mode promises. Returns that step.
fn check(t: Subject<'_>, models: &mut Models, least: u64, ctx: &str) -> u64 {
    let p = t.mark();
    let got = t.contents();
    let r = if models.at == p + 1 {
        // The delete after put `p` was recovered before: it must still be there.
        assert!(
            got == models.state,
            "{ctx}: a recovered delete step was lost"
        );
        p + 1
    } else {
        models.advance_to(p);
        if got == models.state {
            p
        } else {
            // A delete step after the last put may have been applied whole.
            let mut next = models.state.clone();
            apply_model(&mut next, p + 1, models.bytes);
            assert!(
                (p + 1).is_multiple_of(4) && got == next,
                "{ctx}: the table is not the state after any whole step (mark {p}): a batch \
                 was half applied or lost"
            );
            models.advance_to(p + 1);
            p + 1
        }
    };
    assert!(
        r >= least,
        "{ctx}: the table is at step {r}, but step {least} was promised"
    );
    r
}

#[test]
fn sigkill_at_random_points_loses_nothing_acknowledged() {
    if std::env::var("VRAMKV_CRASH_CHILD").is_ok() {
        return;
    }
    let root = std::env::temp_dir().join(format!("vramkv-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let modes = ["always", "everysec", "no", "snapshot", "bytes-always"];
    let log_points = [
        "log.torn",
        "log.appended",
        "rewrite.switched",
        "rewrite.renamed",
        "snapshot.chunk",
        "snapshot.rename",
    ];
    let snap_points = ["snapshot.chunk", "snapshot.rename"];
    let mut models: HashMap<&str, Models> = HashMap::new();
    let mut tally: HashMap<String, usize> = HashMap::new();
    let mut torn_seen = 0;
    let mut rng = SplitMix64(0xC0FFEE);
    let start = Instant::now();
    let mut kills = 0;
    while kills < KILLS && start.elapsed() < TIME_LIMIT {
        let mode = modes[kills % modes.len()];
        let dir = root.join(mode);
        std::fs::create_dir_all(&dir).expect("dir");
        let points: &[&str] = if mode == "snapshot" {
            &snap_points
        } else {
            &log_points
        };
        // Half the kills at a named point, half after a random delay.
        let pause = (rng.below(2) == 0).then(|| {
            let p = points[rng.below(points.len() as u64) as usize];
            (p, 1 + rng.below(4))
        });
        let delay = rng.below(40_000);
        let k = run_child(&dir, mode, pause, delay);
        kills += 1;
        let what = match pause {
            Some((p, _)) if k.paused => p.to_string(),
            Some((p, _)) => format!("{p} (not reached)"),
            None => "random".to_string(),
        };
        *tally.entry(format!("{mode} {what}")).or_default() += 1;
        let ctx = format!("kill {kills}, {mode}, {what}, acked {}", k.acked);
        let m = models.entry(mode).or_insert(Models {
            at: 0,
            state: HashMap::new(),
            bytes: mode.starts_with("bytes"),
        });
        // The child started at the step after the last recovered one.
        let attempted = m.at.max(k.acked) + 1;
        if mode == "snapshot" {
            let path = dir.join("dump.vkv");
            if !path.exists() {
                assert_eq!(k.saved, 0, "{ctx}: a completed snapshot is missing");
                continue;
            }
            let snap = snapshot::read(&path)
                .unwrap_or_else(|e| panic!("{ctx}: the last snapshot does not load: {e}"));
            let t = CpuBackend::open(cfg()).expect("open");
            let Contents::Table(img) = &snap.contents else {
                panic!("kind")
            };
            snapshot::restore_table(&t, img, 1 << 20).expect("restore");
            let p = check(Subject::Fixed(&t), m, k.saved, &ctx);
            assert_eq!(p % 10, 1, "{ctx}: a snapshot of step {p}, between saves");
            assert!(
                p <= attempted,
                "{ctx}: a snapshot of step {p}, never attempted"
            );
            continue;
        }
        let (fsync, bytes) = fsync_of(mode);
        let least = match fsync {
            Fsync::Always => k.acked,
            Fsync::EverySec => k.acked_1s_before,
            Fsync::No => 0,
        };
        let reopen_failed = |e: kv_core::Error| -> ! { panic!("{ctx}: reopening failed: {e}") };
        let (fixed, byte);
        let (t, report) = if bytes {
            let r = DurableBytes::open(&dir, byte_cfg(), LogConfig::new(fsync), &open_bytes)
                .unwrap_or_else(|e| reopen_failed(e));
            byte = r.0;
            (Subject::Bytes(&byte), r.1)
        } else {
            let r = DurableTable::open(&dir, cfg(), LogConfig::new(fsync), &open_cpu)
                .unwrap_or_else(|e| reopen_failed(e));
            fixed = r.0;
            (Subject::Fixed(&fixed), r.1)
        };
        if report.torn.is_some() {
            torn_seen += 1;
        }
        if what == "log.torn" {
            assert!(
                report.torn.is_some(),
                "{ctx}: the torn record was not reported"
            );
        }
        check(t, m, least, &ctx);
        assert!(
            m.at <= attempted,
            "{ctx}: the table holds step {} that was never attempted",
            m.at
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    let mut lines: Vec<_> = tally.iter().collect();
    lines.sort();
    for (what, n) in &lines {
        println!("{n:4}  {what}");
    }
    println!(
        "{kills} kills in {:.1} s; {torn_seen} torn log records dropped on reopen",
        start.elapsed().as_secs_f64()
    );
    assert!(kills >= 200, "only {kills} kills fitted in the time limit");
    assert!(torn_seen > 0, "no kill left a torn record");
    for p in log_points {
        let hit: usize = lines
            .iter()
            .filter(|(w, _)| w.ends_with(p) && !w.starts_with("snapshot"))
            .map(|(_, n)| **n)
            .sum();
        assert!(hit > 0, "no kill at {p}");
    }
}
