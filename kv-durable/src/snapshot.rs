//! Snapshots: a table's every live entry, its config and the format version in one file,
//! written whole or not at all.
//!
//! # The file
//!
//! ```text
//! "VRAMKVSN"  format version (u32)  header length (u32)  header (JSON)  header CRC-32 (u32)
//! chunk*:  "CHNK"  entries (u64)  payload length (u64)  payload CRC-32 (u32)  payload
//! end:     "END."  entries (u64)  chunks (u64)  CRC-32 of the end record (u32)
//! ```
//!
//! All numbers are little-endian. A fixed-width chunk's payload is its keys, then their
//! rows, then (cache tables) their scores and their expiry times, each a run of u64. A byte
//! chunk's payload is the keys' lengths (u32 each), the values' lengths (u64 each), the
//! expiry times (u64 each), then the key bytes and the value bytes. A chunk holds at most
//! [`CHUNK_ENTRIES`] entries or about [`CHUNK_BYTES`] bytes.
//!
//! # Written whole or not at all
//!
//! [`write()`] writes `<path>.tmp`, fsyncs it, renames it over `path` and fsyncs the
//! directory: after a crash, `path` is the previous snapshot or the new one, each whole.
//!
//! # Read whole or not at all
//!
//! [`read`] checks the magic, the version (a newer one is [`Error::NewerFormat`]), the
//! header's checksum, every chunk's checksum and the end record's counts before it returns
//! anything: a truncated, bit-flipped or foreign file is [`Error::Corrupt`] and nothing of
//! it is loaded.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kv_core::{
    ByteConfig, ByteImage, ByteTable, CacheConfig, CachePolicy, Error, KvBackend, Result,
    TableConfig, TableImage,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::file::{corrupt, crc, durable_rename, io_err, now_ms, pause_point, read_full};

/// The first eight bytes of every snapshot.
pub const MAGIC: &[u8; 8] = b"VRAMKVSN";
/// The newest snapshot format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The most entries in one chunk.
pub const CHUNK_ENTRIES: usize = 1 << 20;
/// The payload bytes after which a byte chunk is cut.
pub const CHUNK_BYTES: u64 = 64 << 20;
const CHUNK_TAG: &[u8; 4] = b"CHNK";
const END_TAG: &[u8; 4] = b"END.";
/// The longest header this build reads (a damaged length is refused, not allocated).
const MAX_HEADER: u32 = 1 << 20;
const IO_BUF: usize = 8 << 20;

/// Which kind of table a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// A fixed-width table (u64 keys, rows of u64 words), perhaps a cache table.
    Fixed,
    /// A byte table.
    Bytes,
}

/// A snapshot's header: the table's config and what the file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The kind of table.
    pub kind: TableKind,
    /// Live entries in the file.
    pub entries: u64,
    /// When it was written, in milliseconds since the Unix epoch.
    pub written_ms: u64,
    /// The backend that wrote it (`"cuda"`, `"cpu"`, ...); any backend loads it.
    pub backend: String,
    /// Value width in u64 words (fixed-width tables; 1 for byte tables).
    pub width: usize,
    /// The table's configured capacity.
    pub capacity: usize,
    /// Its max load factor.
    pub max_load_factor: f64,
    /// Whether it grows.
    pub growth: bool,
    /// Its fixed hash seed, if it had one.
    pub seed: Option<u64>,
    /// The cache policy (`"lru"`, `"lfu"`, `"custom"`), for cache tables.
    pub cache: Option<String>,
    /// An LRU cache table's logical clock.
    pub clock: u64,
    /// The table's clock (milliseconds, what expiry times are read against) when the image
    /// was taken; 0 for tables without expiry.
    #[serde(default)]
    pub now_ms: u64,
    /// Byte tables: the longest key.
    pub max_key_bytes: Option<usize>,
    /// Byte tables: the longest value.
    pub max_value_bytes: Option<u64>,
    /// Byte tables: the arena's budget.
    pub arena_budget: Option<u64>,
    /// Byte tables: the arena's segment size.
    pub segment_bytes: Option<u64>,
}

fn policy_name(p: CachePolicy) -> &'static str {
    match p {
        CachePolicy::Lru => "lru",
        CachePolicy::Lfu => "lfu",
        CachePolicy::Custom => "custom",
    }
}

impl Header {
    /// The header of a fixed-width table of config `cfg` written by `backend`.
    pub fn for_table(cfg: &TableConfig, backend: &str, image: &TableImage) -> Self {
        Header {
            kind: TableKind::Fixed,
            entries: image.len() as u64,
            written_ms: now_ms(),
            backend: backend.to_string(),
            width: cfg.width,
            capacity: cfg.capacity,
            max_load_factor: cfg.max_load_factor,
            growth: cfg.growth,
            seed: cfg.seed,
            cache: cfg
                .cache
                .as_ref()
                .map(|c| policy_name(c.policy).to_string()),
            clock: image.clock,
            now_ms: cfg.cache.as_ref().map_or(0, |c| c.clock.now_ms()),
            max_key_bytes: None,
            max_value_bytes: None,
            arena_budget: None,
            segment_bytes: None,
        }
    }

    /// The header of a byte table of config `cfg` written by `backend`.
    pub fn for_bytes(cfg: &ByteConfig, backend: &str, image: &ByteImage) -> Self {
        let t = &cfg.table;
        Header {
            kind: TableKind::Bytes,
            entries: image.len() as u64,
            written_ms: now_ms(),
            backend: backend.to_string(),
            width: 1,
            capacity: t.capacity,
            max_load_factor: t.max_load_factor,
            growth: t.growth,
            seed: t.seed,
            cache: None,
            clock: 0,
            now_ms: cfg.clock.now_ms(),
            max_key_bytes: Some(cfg.max_key_bytes),
            max_value_bytes: Some(cfg.max_value_bytes),
            arena_budget: cfg.arena_budget,
            segment_bytes: cfg.segment_bytes,
        }
    }

    /// The cache policy, if this is a cache table's snapshot.
    pub fn cache_policy(&self) -> Result<Option<CachePolicy>> {
        Ok(match self.cache.as_deref() {
            None => None,
            Some("lru") => Some(CachePolicy::Lru),
            Some("lfu") => Some(CachePolicy::Lfu),
            Some("custom") => Some(CachePolicy::Custom),
            Some(other) => {
                return Err(Error::InvalidConfig(format!(
                    "the snapshot names cache policy {other:?}, which this vramkv does not know"
                )));
            }
        })
    }

    /// The config of a fixed-width table like the one written: its capacity (at least the
    /// entries in the file), width, load factor, growth, seed and cache policy. A cache
    /// table gets the system clock; set another on the result.
    pub fn table_config(&self) -> Result<TableConfig> {
        let mut cfg = TableConfig::new(self.capacity.max(self.entries as usize))
            .width(self.width)
            .max_load_factor(self.max_load_factor)
            .growth(self.growth);
        cfg.seed = self.seed;
        if let Some(p) = self.cache_policy()? {
            cfg = cfg.cache(CacheConfig::new(p));
        }
        Ok(cfg)
    }

    /// The config of a byte table like the one written (the system clock).
    pub fn byte_config(&self) -> ByteConfig {
        let mut t = TableConfig::new(self.capacity.max(self.entries as usize))
            .max_load_factor(self.max_load_factor)
            .growth(self.growth);
        t.seed = self.seed;
        let mut cfg = ByteConfig::new(t.capacity).table(t);
        if let Some(k) = self.max_key_bytes {
            cfg = cfg.max_key_bytes(k);
        }
        if let Some(v) = self.max_value_bytes {
            cfg = cfg.max_value_bytes(v);
        }
        cfg.arena_budget = self.arena_budget;
        cfg.segment_bytes = self.segment_bytes;
        cfg
    }
}

/// A table's contents, in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// A fixed-width table's image.
    Table(TableImage),
    /// A byte table's image.
    Bytes(ByteImage),
}

impl Contents {
    /// Entries held.
    pub fn len(&self) -> usize {
        match self {
            Contents::Table(t) => t.len(),
            Contents::Bytes(b) => b.len(),
        }
    }
    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A snapshot read and checked whole: its header and contents.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The header.
    pub header: Header,
    /// Every entry.
    pub contents: Contents,
}

/// What a save did and how long each part took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaveReport {
    /// Entries written.
    pub entries: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Seconds the table was held (its export); other batches waited at most this long.
    pub export_secs: f64,
    /// Seconds spent writing, fsyncing and renaming the file, with the table free.
    pub write_secs: f64,
}

/// Saves a fixed-width table of config `cfg` (what it was opened with) to `path`: an export
/// (the one moment the table is held), then [`write()`] with no lock held.
pub fn save_table(path: &Path, table: &dyn KvBackend, cfg: &TableConfig) -> Result<SaveReport> {
    let t0 = Instant::now();
    let image = table.export()?;
    let export_secs = t0.elapsed().as_secs_f64();
    let header = Header::for_table(cfg, table.describe().backend, &image);
    let mut r = write(path, &header, &Contents::Table(image))?;
    r.export_secs = export_secs;
    Ok(r)
}

/// Saves a byte table of config `cfg` to `path`, as [`save_table`] does.
pub fn save_bytes(path: &Path, table: &dyn ByteTable, cfg: &ByteConfig) -> Result<SaveReport> {
    let t0 = Instant::now();
    let image = table.export()?;
    let export_secs = t0.elapsed().as_secs_f64();
    let header = Header::for_bytes(cfg, table.describe().backend, &image);
    let mut r = write(path, &header, &Contents::Bytes(image))?;
    r.export_secs = export_secs;
    Ok(r)
}

/// The temporary file a snapshot of `path` is written to before its rename.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// One chunk's payload as the slices it is made of, and its checksum.
struct Chunk<'a> {
    entries: u64,
    parts: Vec<std::borrow::Cow<'a, [u8]>>,
}

impl Chunk<'_> {
    fn len(&self) -> u64 {
        self.parts.iter().map(|p| p.len() as u64).sum()
    }
    fn crc(&self) -> u32 {
        let parts: Vec<&[u8]> = self.parts.iter().map(|p| &**p).collect();
        crc(&parts)
    }
}

fn table_chunks(img: &TableImage) -> Vec<Chunk<'_>> {
    let w = img.width;
    (0..img.len())
        .step_by(CHUNK_ENTRIES)
        .map(|a| {
            let b = (a + CHUNK_ENTRIES).min(img.len());
            let mut parts = vec![
                bytemuck::cast_slice(&img.keys[a..b]).into(),
                bytemuck::cast_slice(&img.values[a * w..b * w]).into(),
            ];
            if let (Some(s), Some(e)) = (&img.scores, &img.expires) {
                parts.push(bytemuck::cast_slice(&s[a..b]).into());
                parts.push(bytemuck::cast_slice(&e[a..b]).into());
            }
            Chunk {
                entries: (b - a) as u64,
                parts,
            }
        })
        .collect()
}

fn byte_chunks(img: &ByteImage) -> Vec<Chunk<'_>> {
    let (ko, vo) = (img.keys.offsets(), img.values.offsets());
    let mut chunks = Vec::new();
    let mut a = 0;
    while a < img.len() {
        let mut b = a;
        let mut bytes = 0u64;
        while b < img.len() && (b == a || (b - a < CHUNK_ENTRIES && bytes < CHUNK_BYTES)) {
            bytes += (ko[b + 1] - ko[b] + vo[b + 1] - vo[b]) as u64 + 20;
            b += 1;
        }
        let klens: Vec<u32> = (a..b).map(|i| (ko[i + 1] - ko[i]) as u32).collect();
        let vlens: Vec<u64> = (a..b).map(|i| (vo[i + 1] - vo[i]) as u64).collect();
        chunks.push(Chunk {
            entries: (b - a) as u64,
            parts: vec![
                bytemuck::cast_slice(&klens).to_vec().into(),
                bytemuck::cast_slice(&vlens).to_vec().into(),
                bytemuck::cast_slice(&img.expires[a..b]).into(),
                img.keys.data()[ko[a] as usize..ko[b] as usize].into(),
                img.values.data()[vo[a] as usize..vo[b] as usize].into(),
            ],
        });
        a = b;
    }
    chunks
}

/// Writes `contents` under `header` to `path`, whole or not at all (see the module docs).
pub fn write(path: &Path, header: &Header, contents: &Contents) -> Result<SaveReport> {
    let t0 = Instant::now();
    if let Contents::Table(t) = contents {
        t.check()?;
        if t.is_cache() != header.cache.is_some() {
            return Err(Error::InvalidArgument(
                "a cache table's image needs a cache table's header, and only it".into(),
            ));
        }
    }
    let chunks = match contents {
        Contents::Table(t) => table_chunks(t),
        Contents::Bytes(b) => byte_chunks(b),
    };
    let crcs: Vec<u32> = chunks.par_iter().map(Chunk::crc).collect();
    let tmp = temp_path(path);
    let file = File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
    let json = serde_json::to_vec(header)
        .map_err(|e| Error::InvalidArgument(format!("snapshot header: {e}")))?;
    let version = FORMAT_VERSION.to_le_bytes();
    let hlen = (json.len() as u32).to_le_bytes();
    let mut head = Vec::with_capacity(json.len() + 20);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&version);
    head.extend_from_slice(&hlen);
    head.extend_from_slice(&json);
    head.extend_from_slice(&crc(&[&version, &hlen, &json]).to_le_bytes());
    // Chunks go out in order from one thread (a disk takes one sequential stream best),
    // and each 32 MiB written is handed to the disk at once (`sync_file_range` on Linux), so
    // that the disk writes while the next bytes are still being copied into the page cache
    // instead of all at the fsync.
    let mut at = head.len() as u64;
    let end = end_record(contents.len() as u64, chunks.len() as u64);
    let bytes = at + chunks.iter().map(|c| 24 + c.len()).sum::<u64>() + end.len() as u64;
    let put = |off: u64, b: &[u8]| write_at(&file, b, off).map_err(|e| io_err("writing", &tmp, e));
    put(0, &head)?;
    let mut flushed = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        if i == chunks.len() / 2 {
            pause_point("snapshot.chunk");
        }
        let mut h = [0u8; 24];
        h[..4].copy_from_slice(CHUNK_TAG);
        h[4..12].copy_from_slice(&c.entries.to_le_bytes());
        h[12..20].copy_from_slice(&c.len().to_le_bytes());
        h[20..].copy_from_slice(&crcs[i].to_le_bytes());
        put(at, &h)?;
        at += 24;
        for p in &c.parts {
            for piece in p.chunks(WRITEBACK_BYTES as usize) {
                put(at, piece)?;
                at += piece.len() as u64;
                if at - flushed >= WRITEBACK_BYTES {
                    start_writeback(&file, flushed, at - flushed);
                    flushed = at;
                }
            }
        }
    }
    if chunks.is_empty() {
        pause_point("snapshot.chunk");
    }
    put(at, &end)?;
    file.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
    drop(file);
    pause_point("snapshot.rename");
    durable_rename(&tmp, path)?;
    Ok(SaveReport {
        entries: contents.len() as u64,
        bytes,
        export_secs: 0.0,
        write_secs: t0.elapsed().as_secs_f64(),
    })
}

/// Bytes after which a snapshot's writer hands what it wrote to the disk.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// Starts the disk's writeback of `len` bytes at `offset` without waiting for it (Linux's
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`); elsewhere the fsync does it all. A hint: its
/// failure changes nothing, the fsync that follows is what makes the file durable.
fn start_writeback(f: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor of an open file; the call only schedules writeback.
        let _ = unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
}

/// Writes all of `buf` at `offset`.
#[cfg(unix)]
fn write_at(f: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, offset)
}

/// Reads exactly `buf.len()` bytes at `offset`.
#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(windows)]
fn write_at(f: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = f.seek_write(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = f.seek_read(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut std::mem::take(&mut buf)[n..];
        offset += n as u64;
    }
    Ok(())
}

fn end_record(entries: u64, chunks: u64) -> Vec<u8> {
    let mut end = Vec::with_capacity(24);
    end.extend_from_slice(END_TAG);
    end.extend_from_slice(&entries.to_le_bytes());
    end.extend_from_slice(&chunks.to_le_bytes());
    let sum = crc(&[&end]);
    end.extend_from_slice(&sum.to_le_bytes());
    end
}

/// What [`inspect`] found in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    /// The file's size in bytes.
    pub file_bytes: u64,
    /// Its format version, when the magic was right.
    pub version: Option<u32>,
    /// Its header, when it was readable and its checksum right.
    pub header: Option<Header>,
    /// Chunks whose checksum matched, in order, before the first damage.
    pub chunks_ok: u64,
    /// Entries in those chunks.
    pub entries_ok: u64,
    /// Whether the end record was found and agrees with the chunks.
    pub complete: bool,
    /// The first damage found, if any.
    pub error: Option<Error>,
}

/// Reads and checks a snapshot without loading it anywhere: the header, the chunks whose
/// checksums hold, and the first damage if there is one. It never fails; what it could not
/// read is in [`Inspection::error`].
pub fn inspect(path: &Path) -> Inspection {
    let mut ins = Inspection {
        file_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
        version: None,
        header: None,
        chunks_ok: 0,
        entries_ok: 0,
        complete: false,
        error: None,
    };
    if let Err(e) = scan(path, false, &mut ins) {
        ins.error = Some(e);
    }
    ins
}

/// Reads a snapshot whole, checking everything before it returns (see the module docs).
///
/// A fixed-width table's snapshot in the layout [`write()`] gives it (full chunks, then the
/// rest) is read with positioned reads from every core, each chunk checked as it lands in
/// the image; any other file, or any damage, is read again in order by the one reader that
/// names what is wrong.
pub fn read(path: &Path) -> Result<Snapshot> {
    if let Some(snap) = read_fixed_parallel(path) {
        return Ok(snap);
    }
    let mut ins = Inspection {
        file_bytes: 0,
        version: None,
        header: None,
        chunks_ok: 0,
        entries_ok: 0,
        complete: false,
        error: None,
    };
    let contents = scan(path, true, &mut ins)?;
    let header = ins
        .header
        .ok_or_else(|| corrupt(path, "no header was read"))?;
    Ok(Snapshot {
        header,
        contents: contents.ok_or_else(|| corrupt(path, "no contents were read"))?,
    })
}

/// The parallel read of [`read`]: `None` when the file is not a fixed-width table's
/// snapshot in the canonical layout, or anything about it fails to check.
fn read_fixed_parallel(path: &Path) -> Option<Snapshot> {
    let file = File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let mut head = [0u8; 16];
    read_at(&file, &mut head, 0).ok()?;
    let version = u32::from_le_bytes(head[8..12].try_into().ok()?);
    let hlen = u32::from_le_bytes(head[12..16].try_into().ok()?);
    if &head[..8] != MAGIC || version == 0 || version > FORMAT_VERSION || hlen > MAX_HEADER {
        return None;
    }
    let mut json = vec![0u8; hlen as usize + 4];
    read_at(&file, &mut json, 16).ok()?;
    let sum = u32::from_le_bytes(json[hlen as usize..].try_into().ok()?);
    json.truncate(hlen as usize);
    if crc(&[&head[8..16], &json]) != sum {
        return None;
    }
    let header: Header = serde_json::from_slice(&json).ok()?;
    let cache = header.cache_policy().ok()?.is_some();
    let w = header.width;
    let n = usize::try_from(header.entries).ok()?;
    if header.kind != TableKind::Fixed || !(1..=kv_core::MAX_WIDTH).contains(&w) {
        return None;
    }
    let cols_per = (1 + w + 2 * usize::from(cache)) as u64;
    let chunks = n.div_ceil(CHUNK_ENTRIES);
    let start = 16 + u64::from(hlen) + 4;
    if start + chunks as u64 * 24 + n as u64 * 8 * cols_per + 24 != size {
        return None;
    }
    let mut img = if cache {
        TableImage::new_cache(w, header.clock)
    } else {
        TableImage::new(w)
    };
    img.keys = vec![0; n];
    img.values = vec![0; n * w];
    let (mut scores, mut expires) = (
        vec![0u64; n * usize::from(cache)],
        vec![0u64; n * usize::from(cache)],
    );
    let mut parts: Vec<(usize, Vec<&mut [u64]>)> = Vec::with_capacity(chunks);
    {
        let mut kit = img.keys.chunks_mut(CHUNK_ENTRIES);
        let mut vit = img.values.chunks_mut(CHUNK_ENTRIES * w);
        let mut sit = scores.chunks_mut(CHUNK_ENTRIES);
        let mut eit = expires.chunks_mut(CHUNK_ENTRIES);
        for i in 0..chunks {
            let mut cols = vec![kit.next()?, vit.next()?];
            if cache {
                cols.extend([sit.next()?, eit.next()?]);
            }
            parts.push((i, cols));
        }
    }
    let ok = parts.into_par_iter().all(|(i, cols)| {
        let entries = cols[0].len() as u64;
        let at = start + i as u64 * (24 + CHUNK_ENTRIES as u64 * 8 * cols_per);
        let len = entries * 8 * cols_per;
        let mut h = [0u8; 24];
        if read_at(&file, &mut h, at).is_err()
            || &h[..4] != CHUNK_TAG
            || h[4..12] != entries.to_le_bytes()
            || h[12..20] != len.to_le_bytes()
        {
            return false;
        }
        let mut hasher = crc32fast::Hasher::new();
        let mut off = at + 24;
        for c in cols {
            let b: &mut [u8] = bytemuck::cast_slice_mut(c);
            if read_at(&file, b, off).is_err() {
                return false;
            }
            hasher.update(b);
            off += b.len() as u64;
        }
        hasher.finalize().to_le_bytes() == h[20..24]
    });
    let mut end = [0u8; 24];
    if !ok
        || read_at(&file, &mut end, size - 24).is_err()
        || end[..] != end_record(n as u64, chunks as u64)[..]
    {
        return None;
    }
    if cache {
        img.scores = Some(scores);
        img.expires = Some(expires);
    }
    Some(Snapshot {
        header,
        contents: Contents::Table(img),
    })
}

fn scan(path: &Path, keep: bool, ins: &mut Inspection) -> Result<Option<Contents>> {
    let file = File::open(path).map_err(|e| io_err("opening", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| io_err("reading the size of", path, e))?
        .len();
    let mut r = BufReader::with_capacity(IO_BUF, file);
    let short = |what: &str| corrupt(path, format!("the file ends inside {what} (truncated)"));
    let mut head = [0u8; 16];
    if !read_full(&mut r, &mut head, path)? {
        return Err(if size >= 8 && &head[..8] != MAGIC {
            corrupt(path, "not a vramkv snapshot (wrong magic bytes)")
        } else {
            short("the file header")
        });
    }
    if &head[..8] != MAGIC {
        return Err(corrupt(path, "not a vramkv snapshot (wrong magic bytes)"));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
    let hlen = u32::from_le_bytes(head[12..16].try_into().unwrap_or_default());
    ins.version = Some(version);
    if version > FORMAT_VERSION {
        return Err(Error::NewerFormat {
            file: path.display().to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 || hlen > MAX_HEADER || u64::from(hlen) + 20 > size {
        return Err(corrupt(path, "the header's length or version is damaged"));
    }
    let mut json = vec![0u8; hlen as usize + 4];
    if !read_full(&mut r, &mut json, path)? {
        return Err(short("the header"));
    }
    let sum = u32::from_le_bytes(json[hlen as usize..].try_into().unwrap_or_default());
    json.truncate(hlen as usize);
    if crc(&[&head[8..12], &head[12..16], &json]) != sum {
        return Err(corrupt(path, "the header's checksum does not match"));
    }
    let header: Header = serde_json::from_slice(&json)
        .map_err(|e| corrupt(path, format!("the header does not parse: {e}")))?;
    ins.header = Some(header.clone());
    let cache = header.cache_policy()?.is_some();
    let w = header.width;
    if header.kind == TableKind::Fixed && !(1..=kv_core::MAX_WIDTH).contains(&w) {
        return Err(corrupt(
            path,
            format!("the header's width {w} is out of range"),
        ));
    }
    let mut table = TableImage::new(w);
    if cache {
        table = TableImage::new_cache(w, header.clock);
    }
    let mut bytes = ByteImage::default();
    let mut remaining = size - (16 + u64::from(hlen) + 4);
    loop {
        let mut tag = [0u8; 4];
        if !read_full(&mut r, &mut tag, path)? {
            return Err(short("a chunk's tag: the end record is missing"));
        }
        if &tag == END_TAG {
            let mut rest = [0u8; 20];
            if !read_full(&mut r, &mut rest, path)? {
                return Err(short("the end record"));
            }
            let entries = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
            let chunks = u64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
            let sum = u32::from_le_bytes(rest[16..].try_into().unwrap_or_default());
            if crc(&[END_TAG, &rest[..16]]) != sum {
                return Err(corrupt(path, "the end record's checksum does not match"));
            }
            if entries != ins.entries_ok || chunks != ins.chunks_ok || entries != header.entries {
                return Err(corrupt(
                    path,
                    format!(
                        "the end record counts {entries} entries in {chunks} chunks, the file \
                         holds {} in {} (the header says {})",
                        ins.entries_ok, ins.chunks_ok, header.entries
                    ),
                ));
            }
            let mut extra = [0u8; 1];
            if read_full(&mut r, &mut extra, path)? {
                return Err(corrupt(path, "bytes follow the end record"));
            }
            ins.complete = true;
            break;
        }
        if &tag != CHUNK_TAG {
            return Err(corrupt(
                path,
                format!("chunk {} has no chunk tag (damaged)", ins.chunks_ok),
            ));
        }
        let mut ch = [0u8; 20];
        if !read_full(&mut r, &mut ch, path)? {
            return Err(short("a chunk's header"));
        }
        let n = u64::from_le_bytes(ch[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(ch[8..16].try_into().unwrap_or_default());
        let sum = u32::from_le_bytes(ch[16..].try_into().unwrap_or_default());
        remaining = remaining.saturating_sub(24);
        let expected = match header.kind {
            TableKind::Fixed => Some(n.saturating_mul(8 * (1 + w as u64 + 2 * u64::from(cache)))),
            TableKind::Bytes => None,
        };
        if len > remaining || expected.is_some_and(|e| e != len) || n > CHUNK_ENTRIES as u64 {
            return Err(corrupt(
                path,
                format!(
                    "chunk {}'s length {len} does not fit the file (truncated or damaged)",
                    ins.chunks_ok
                ),
            ));
        }
        remaining -= len;
        let n = n as usize;
        let ok = match header.kind {
            TableKind::Fixed => read_fixed_chunk(&mut r, path, &mut table, n, cache, sum, keep)?,
            TableKind::Bytes => read_byte_chunk(&mut r, path, &mut bytes, n, len, sum, keep)?,
        };
        if !ok {
            return Err(corrupt(
                path,
                format!(
                    "chunk {}'s checksum does not match (damaged)",
                    ins.chunks_ok
                ),
            ));
        }
        ins.chunks_ok += 1;
        ins.entries_ok += n as u64;
    }
    if !keep {
        return Ok(None);
    }
    Ok(Some(match header.kind {
        TableKind::Fixed => Contents::Table(table),
        TableKind::Bytes => Contents::Bytes(bytes),
    }))
}

/// Reads `n` more u64 into `v` and feeds them to the checksum.
fn read_words(
    r: &mut impl std::io::Read,
    path: &Path,
    v: &mut Vec<u64>,
    n: usize,
    h: &mut crc32fast::Hasher,
) -> Result<()> {
    let at = v.len();
    v.resize(at + n, 0);
    let dst = bytemuck::cast_slice_mut(&mut v[at..]);
    if !read_full(r, dst, path)? {
        return Err(corrupt(path, "the file ends inside a chunk (truncated)"));
    }
    h.update(dst);
    Ok(())
}

fn read_fixed_chunk(
    r: &mut impl std::io::Read,
    path: &Path,
    t: &mut TableImage,
    n: usize,
    cache: bool,
    sum: u32,
    keep: bool,
) -> Result<bool> {
    let (k0, v0) = (t.keys.len(), t.values.len());
    let mut h = crc32fast::Hasher::new();
    read_words(r, path, &mut t.keys, n, &mut h)?;
    read_words(r, path, &mut t.values, n * t.width, &mut h)?;
    if cache {
        let (s, e) = (
            t.scores.get_or_insert_default(),
            t.expires.get_or_insert_default(),
        );
        read_words(r, path, s, n, &mut h)?;
        read_words(r, path, e, n, &mut h)?;
    }
    let ok = h.finalize() == sum;
    if !keep {
        t.keys.truncate(k0);
        t.values.truncate(v0);
        if let (Some(s), Some(e)) = (&mut t.scores, &mut t.expires) {
            s.truncate(k0);
            e.truncate(k0);
        }
    }
    Ok(ok)
}

fn read_byte_chunk(
    r: &mut impl std::io::Read,
    path: &Path,
    b: &mut ByteImage,
    n: usize,
    len: u64,
    sum: u32,
    keep: bool,
) -> Result<bool> {
    let fixed = n as u64 * 20;
    if len < fixed {
        return Err(corrupt(
            path,
            "a byte chunk is shorter than its lengths (damaged)",
        ));
    }
    let mut meta = vec![0u8; fixed as usize];
    if !read_full(r, &mut meta, path)? {
        return Err(corrupt(path, "the file ends inside a chunk (truncated)"));
    }
    let klens: Vec<u32> = bytemuck::pod_collect_to_vec(&meta[..n * 4]);
    let vlens: Vec<u64> = bytemuck::pod_collect_to_vec(&meta[n * 4..n * 12]);
    let expires: Vec<u64> = bytemuck::pod_collect_to_vec(&meta[n * 12..]);
    let kbytes: u64 = klens.iter().map(|&l| u64::from(l)).sum();
    let vbytes = vlens.iter().try_fold(0u64, |a, &l| a.checked_add(l));
    if vbytes.and_then(|v| v.checked_add(kbytes)) != Some(len - fixed) {
        return Err(corrupt(
            path,
            "a byte chunk's lengths do not add up to its size (damaged)",
        ));
    }
    let mut data = vec![0u8; (len - fixed) as usize];
    if !read_full(r, &mut data, path)? {
        return Err(corrupt(path, "the file ends inside a chunk (truncated)"));
    }
    if crc(&[&meta, &data]) != sum {
        return Ok(false);
    }
    if keep {
        let (mut k, mut v) = (0usize, kbytes as usize);
        for i in 0..n {
            let (kl, vl) = (klens[i] as usize, vlens[i] as usize);
            b.push(&data[k..k + kl], &data[v..v + vl], expires[i]);
            k += kl;
            v += vl;
        }
    }
    Ok(true)
}

/// Puts a fixed-width image into `table`, in parts of at most `batch` entries
/// ([`KvBackend::restore`]).
pub fn restore_table(table: &dyn KvBackend, image: &TableImage, batch: usize) -> Result<()> {
    for part in image.parts(batch) {
        table.restore(part)?;
    }
    Ok(())
}

/// Puts a byte image into `table` at the table's time `now_ms`: entries that expired are
/// left out, the others keep their expiry times ([`ByteImage::live_runs`]).
pub fn restore_bytes(table: &dyn ByteTable, image: &ByteImage, now_ms: u64) -> Result<()> {
    for run in image.live_runs(now_ms, 1 << 20, 256 << 20) {
        let (k, v) = run.batches();
        if run.expires() {
            table.put_ttl(k, v, &run.ttl_ms)?;
        } else {
            table.put(k, v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `write` gives a fixed-width table is read by the parallel reader (several
    /// chunks, a short last one, cache columns), and equals the ordered reader's result.
    #[test]
    fn the_parallel_reader_takes_written_files() {
        let dir = std::env::temp_dir().join(format!("vramkv-snap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for cache in [false, true] {
            let n = CHUNK_ENTRIES * 2 + 77;
            let mut img = if cache {
                TableImage::new_cache(2, 9)
            } else {
                TableImage::new(2)
            };
            for k in 0..n as u64 {
                img.push(k * 3, &[k, !k], Some((k % 7, k % 5)));
            }
            let mut cfg = TableConfig::new(n).width(2);
            if cache {
                cfg = cfg.cache(CacheConfig::new(CachePolicy::Lfu));
            }
            let header = Header::for_table(&cfg, "test", &img);
            let path = dir.join(format!("p{cache}.vkv"));
            write(&path, &header, &Contents::Table(img.clone())).expect("write");
            let fast = read_fixed_parallel(&path)
                .unwrap_or_else(|| panic!("the parallel reader takes {}", path.display()));
            assert_eq!(fast.contents, Contents::Table(img.clone()));
            let mut ins = Inspection {
                file_bytes: 0,
                version: None,
                header: None,
                chunks_ok: 0,
                entries_ok: 0,
                complete: false,
                error: None,
            };
            let slow = scan(&path, true, &mut ins)
                .expect("scan")
                .expect("contents");
            assert_eq!(slow, Contents::Table(img));
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
