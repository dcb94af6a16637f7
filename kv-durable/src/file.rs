//! What snapshots and logs share: errors with the path in them, checksums, durable renames,
//! and the pause points the crash tests stop a writer at.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use kv_core::{Error, Result};

/// An [`Error::Io`] for `what` on `path`.
pub(crate) fn io_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

/// An [`Error::Corrupt`] for `path`.
pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        file: path.display().to_string(),
        detail: detail.into(),
    }
}

/// CRC-32 (IEEE) of several slices, as one stream.
pub(crate) fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Makes a rename in `dir` durable: an fsync of the directory itself, as Redis does after
/// it renames a new RDB file into place.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("syncing the directory", d, e))
}

/// Renames `from` to `to` and syncs the directory: after this returns, `to` is the new
/// file even across a power loss.
pub(crate) fn durable_rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| io_err("renaming into place", to, e))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` when the file ends first (a truncated
/// file, which the caller reports by name).
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => return Ok(false),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading", path, e)),
        }
    }
    Ok(true)
}

/// Milliseconds since the Unix epoch, for the "written at" of headers.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn armed() -> &'static Option<(String, u64)> {
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let v = std::env::var("VRAMKV_PAUSE_AT").ok()?;
        let (n, k) = v.rsplit_once(':')?;
        Some((n.to_string(), k.parse().ok()?))
    })
}

/// Whether this process was started with a pause point armed (`VRAMKV_PAUSE_AT`).
pub(crate) fn pause_armed() -> bool {
    armed().is_some()
}

/// A point where a writer can be stopped for a crash test.
///
/// With `VRAMKV_PAUSE_AT=<name>:<n>` in its environment, a process that reaches the point
/// `name` for the `n`-th time (from 1) prints `pause-point <name>` on its standard output
/// and sleeps until it is killed: the crash tests send it SIGKILL there, at a known place
/// (half a log record written, a snapshot renamed but the old one not yet deleted, ...).
/// Without the variable this is one load of a cached value.
#[doc(hidden)]
pub fn pause_point(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    if let Some((n, k)) = armed()
        && n == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *k
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "pause-point {name}");
        let _ = out.flush();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
