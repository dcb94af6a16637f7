//! The append-only log: one checksummed record per applied write batch.
//!
//! # The file
//!
//! ```text
//! header (32 bytes): "VRAMKVLG"  version (u32)  kind (u32: 0 fixed, 1 bytes)  width (u32)
//!                    generation (u64)  CRC-32 of the 28 bytes before it (u32)
//! record*:           payload length (u64)  CRC-32 of the length (u32)
//!                    CRC-32 of the length and the payload (u32)  payload
//! ```
//!
//! A payload is a run of little-endian u64 words: the operation, the item count, flags,
//! the table's clock when the batch applied (milliseconds), then its columns, each padded to a whole word (see [`Record`]). Keys and rows are
//! written as they are in memory, so appending a batch costs its bytes and a checksum.
//!
//! # Reading it back
//!
//! [`replay`] hands each record to its caller in order. A final record that the file ends
//! inside (its length, checked by its own checksum, runs past the end), one whose payload
//! fails its checksum with nothing after it, or a tail of zeros, is a torn write (the
//! writer died in the middle of it): it is dropped and reported, and the caller truncates
//! the file there. Anything else that fails a checksum is damage, and stops the load with
//! [`Error::Corrupt`]: a damaged length never passes for a torn tail, so no acknowledged
//! record after it is dropped silently.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use kv_core::{Binary, Error, Result};

use crate::file::{corrupt, crc, io_err, pause_point, read_full};

/// The first eight bytes of every log.
pub const MAGIC: &[u8; 8] = b"VRAMKVLG";
/// The newest log format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a log's header.
pub const HEADER_BYTES: u64 = 32;
const RECORD_HEAD: u64 = 16;

/// What kind of table a log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// A fixed-width table of this many words per row.
    Fixed(usize),
    /// A byte table.
    Bytes,
}

/// One applied write batch. Expiry times are absolute (milliseconds of the table's clock),
/// so that replaying a log later does not lengthen anyone's time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A put of keys and rows.
    Put {
        /// The keys.
        keys: &'a [u64],
        /// Their rows.
        values: &'a [u64],
    },
    /// A delete.
    Delete {
        /// The keys.
        keys: &'a [u64],
    },
    /// A clear of a fixed-width table.
    Clear,
    /// A put on a cache table, with the caller's scores and the entries' expiry times.
    CachePut {
        /// The keys.
        keys: &'a [u64],
        /// Their rows.
        values: &'a [u64],
        /// Custom scores, when the put had them.
        scores: Option<&'a [u64]>,
        /// Absolute expiry times (0: never), when the put had times to live.
        expires: Option<&'a [u64]>,
    },
    /// A restore of image entries (scores and expiry times as they were).
    Restore {
        /// The keys.
        keys: &'a [u64],
        /// Their rows.
        values: &'a [u64],
        /// Their scores.
        scores: Option<&'a [u64]>,
        /// Their expiry times.
        expires: Option<&'a [u64]>,
        /// The image's LRU clock.
        clock: u64,
    },
    /// A put on a byte table.
    BytePut {
        /// The keys.
        keys: Binary<'a>,
        /// The values.
        values: Binary<'a>,
        /// Absolute expiry times (0: never), when the put had times to live.
        expires: Option<&'a [u64]>,
    },
    /// A delete on a byte table.
    ByteDelete {
        /// The keys.
        keys: Binary<'a>,
    },
    /// New expiry times for byte keys (0: persist).
    ByteExpire {
        /// The keys.
        keys: Binary<'a>,
        /// Absolute expiry times.
        expires: &'a [u64],
    },
    /// A clear of a byte table.
    ByteClear,
}

const OP_PUT: u64 = 1;
const OP_DELETE: u64 = 2;
const OP_CLEAR: u64 = 3;
const OP_CACHE_PUT: u64 = 4;
const OP_RESTORE: u64 = 5;
const OP_BYTE_PUT: u64 = 11;
const OP_BYTE_DELETE: u64 = 12;
const OP_BYTE_EXPIRE: u64 = 13;
const OP_BYTE_CLEAR: u64 = 14;
const F_SCORES: u64 = 1;
const F_EXPIRES: u64 = 2;

/// A record encoded as the word runs and byte runs it is written from.
struct Encoded<'a> {
    head: Vec<u64>,
    parts: Vec<std::borrow::Cow<'a, [u8]>>,
}

const PAD: [u8; 8] = [0; 8];

fn words(w: &[u64]) -> std::borrow::Cow<'_, [u8]> {
    bytemuck::cast_slice(w).into()
}

/// `b`'s offsets rebased to 0, as i64.
fn offsets(b: Binary<'_>) -> Vec<u64> {
    let o = b.offsets();
    let base = o_at(&o, 0);
    (0..=b.len()).map(|i| (o_at(&o, i) - base) as u64).collect()
}

fn o_at(o: &kv_core::Offsets<'_>, i: usize) -> i64 {
    match o {
        kv_core::Offsets::I32(v) => i64::from(v[i]),
        kv_core::Offsets::I64(v) => v[i],
    }
}

fn bytes_parts<'a>(parts: &mut Vec<std::borrow::Cow<'a, [u8]>>, b: Binary<'a>) {
    let o = b.offsets();
    let (a, z) = (o_at(&o, 0) as usize, o_at(&o, b.len()) as usize);
    let data = &b.data()[a..z];
    parts.push(data.into());
    parts.push(PAD[..(8 - data.len() % 8) % 8].into());
}

impl<'a> Record<'a> {
    fn encode(&self, time: u64) -> Encoded<'a> {
        let mut parts = Vec::new();
        let head = match *self {
            Record::Put { keys, values } => {
                parts.extend([words(keys), words(values)]);
                vec![OP_PUT, keys.len() as u64, 0, time]
            }
            Record::Delete { keys } => {
                parts.push(words(keys));
                vec![OP_DELETE, keys.len() as u64, 0, time]
            }
            Record::Clear => vec![OP_CLEAR, 0, 0, time],
            Record::CachePut {
                keys,
                values,
                scores,
                expires,
            } => {
                parts.extend([words(keys), words(values)]);
                parts.extend(scores.map(words));
                parts.extend(expires.map(words));
                let flags = scores.map_or(0, |_| F_SCORES) | expires.map_or(0, |_| F_EXPIRES);
                vec![OP_CACHE_PUT, keys.len() as u64, flags, time]
            }
            Record::Restore {
                keys,
                values,
                scores,
                expires,
                clock,
            } => {
                parts.extend([words(keys), words(values)]);
                parts.extend(scores.map(words));
                parts.extend(expires.map(words));
                let flags = scores.map_or(0, |_| F_SCORES) | expires.map_or(0, |_| F_EXPIRES);
                vec![OP_RESTORE, keys.len() as u64, flags, time, clock]
            }
            Record::BytePut {
                keys,
                values,
                expires,
            } => {
                parts.push(bytemuck::cast_slice(&offsets(keys)).to_vec().into());
                parts.push(bytemuck::cast_slice(&offsets(values)).to_vec().into());
                parts.extend(expires.map(words));
                bytes_parts(&mut parts, keys);
                bytes_parts(&mut parts, values);
                let flags = expires.map_or(0, |_| F_EXPIRES);
                vec![OP_BYTE_PUT, keys.len() as u64, flags, time]
            }
            Record::ByteDelete { keys } => {
                parts.push(bytemuck::cast_slice(&offsets(keys)).to_vec().into());
                bytes_parts(&mut parts, keys);
                vec![OP_BYTE_DELETE, keys.len() as u64, 0, time]
            }
            Record::ByteExpire { keys, expires } => {
                parts.push(bytemuck::cast_slice(&offsets(keys)).to_vec().into());
                parts.push(words(expires));
                bytes_parts(&mut parts, keys);
                vec![OP_BYTE_EXPIRE, keys.len() as u64, F_EXPIRES, time]
            }
            Record::ByteClear => vec![OP_BYTE_CLEAR, 0, 0, time],
        };
        Encoded { head, parts }
    }
}

/// Reads a record's payload (whole words) back into a [`Record`].
struct Decoder<'a> {
    w: &'a [u64],
    at: usize,
    path: &'a Path,
    offset: u64,
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u64]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.w.len());
        let Some(end) = end else {
            return Err(corrupt(
                self.path,
                format!(
                    "the record at byte {} is shorter than its columns (damaged)",
                    self.offset
                ),
            ));
        };
        let s = &self.w[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn bytes(&mut self, len: u64) -> Result<&'a [u8]> {
        let words = self.take(len.div_ceil(8) as usize)?;
        Ok(&bytemuck::cast_slice(words)[..len as usize])
    }
    fn binary(&mut self, offs: &'a [u64]) -> Result<Binary<'a>> {
        let len = offs.last().copied().unwrap_or(0);
        let data = self.bytes(len)?;
        Binary::new(bytemuck::cast_slice(offs), data).map_err(|e| {
            corrupt(
                self.path,
                format!("the record at byte {}: {e}", self.offset),
            )
        })
    }
}

fn decode<'a>(
    w: &'a [u64],
    kind: LogKind,
    path: &'a Path,
    offset: u64,
) -> Result<(u64, Record<'a>)> {
    let mut d = Decoder {
        w,
        at: 0,
        path,
        offset,
    };
    let head = d.take(4)?;
    let (op, n, flags, time) = (head[0], head[1] as usize, head[2], head[3]);
    let width = match kind {
        LogKind::Fixed(w) => w,
        LogKind::Bytes => 0,
    };
    let fixed_op = matches!(
        op,
        OP_PUT | OP_DELETE | OP_CLEAR | OP_CACHE_PUT | OP_RESTORE
    );
    if fixed_op != matches!(kind, LogKind::Fixed(_)) {
        return Err(corrupt(
            path,
            format!("the record at byte {offset} is of another kind of table"),
        ));
    }
    let rows = n
        .checked_mul(width)
        .ok_or_else(|| corrupt(path, "record too long"))?;
    let r = match op {
        OP_PUT => Record::Put {
            keys: d.take(n)?,
            values: d.take(rows)?,
        },
        OP_DELETE => Record::Delete { keys: d.take(n)? },
        OP_CLEAR => Record::Clear,
        OP_CACHE_PUT | OP_RESTORE => {
            let clock = if op == OP_RESTORE { d.take(1)?[0] } else { 0 };
            let keys = d.take(n)?;
            let values = d.take(rows)?;
            let scores = if flags & F_SCORES != 0 {
                Some(d.take(n)?)
            } else {
                None
            };
            let expires = if flags & F_EXPIRES != 0 {
                Some(d.take(n)?)
            } else {
                None
            };
            if op == OP_RESTORE {
                Record::Restore {
                    keys,
                    values,
                    scores,
                    expires,
                    clock,
                }
            } else {
                Record::CachePut {
                    keys,
                    values,
                    scores,
                    expires,
                }
            }
        }
        OP_BYTE_PUT => {
            let ko = d.take(n + 1)?;
            let vo = d.take(n + 1)?;
            let expires = if flags & F_EXPIRES != 0 {
                Some(d.take(n)?)
            } else {
                None
            };
            Record::BytePut {
                keys: d.binary(ko)?,
                values: d.binary(vo)?,
                expires,
            }
        }
        OP_BYTE_DELETE => {
            let ko = d.take(n + 1)?;
            Record::ByteDelete {
                keys: d.binary(ko)?,
            }
        }
        OP_BYTE_EXPIRE => {
            let ko = d.take(n + 1)?;
            let expires = d.take(n)?;
            Record::ByteExpire {
                keys: d.binary(ko)?,
                expires,
            }
        }
        OP_BYTE_CLEAR => Record::ByteClear,
        other => {
            return Err(corrupt(
                path,
                format!("the record at byte {offset} has unknown operation {other}"),
            ));
        }
    };
    if d.at != w.len() {
        return Err(corrupt(
            path,
            format!("the record at byte {offset} is longer than its columns (damaged)"),
        ));
    }
    Ok((time, r))
}

fn header_bytes(kind: LogKind, generation: u64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let (k, w) = match kind {
        LogKind::Fixed(w) => (0u32, w as u32),
        LogKind::Bytes => (1, 0),
    };
    h[12..16].copy_from_slice(&k.to_le_bytes());
    h[16..20].copy_from_slice(&w.to_le_bytes());
    h[20..28].copy_from_slice(&generation.to_le_bytes());
    let sum = crc(&[&h[..28]]);
    h[28..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Bytes of a record's column below which its checksum is taken on one core.
const PARALLEL_CRC: usize = 8 << 20;

/// Feeds `data` to `h`: a large column in 4 MiB pieces checksummed on every core and
/// combined in order (the same CRC as one pass), so that a batch of millions of items is
/// not held back by one core's checksum.
fn crc_update(h: &mut crc32fast::Hasher, data: &[u8]) {
    use rayon::prelude::*;
    if data.len() < PARALLEL_CRC {
        h.update(data);
        return;
    }
    let pieces: Vec<crc32fast::Hasher> = data
        .par_chunks(4 << 20)
        .map(|p| {
            let mut x = crc32fast::Hasher::new();
            x.update(p);
            x
        })
        .collect();
    for p in &pieces {
        h.combine(p);
    }
}

/// An open log, appending.
#[derive(Debug)]
pub struct LogWriter {
    out: BufWriter<File>,
    path: PathBuf,
    bytes: u64,
}

impl LogWriter {
    /// Creates a new, empty log at `path` (replacing any file there) and makes its header
    /// durable.
    pub fn create(path: &Path, kind: LogKind, generation: u64) -> Result<Self> {
        // The header goes to a temporary file that is renamed into place, so that a log
        // exists only once its header is whole.
        let tmp = crate::snapshot::temp_path(path);
        let mut f = File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
        f.write_all(&header_bytes(kind, generation))
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err("writing", &tmp, e))?;
        crate::file::durable_rename(&tmp, path)?;
        Self::wrap(f, path, HEADER_BYTES)
    }

    /// Opens an existing log to append after its first `valid_bytes` bytes (what
    /// [`replay`] found whole); anything after them (a torn record) is cut off first.
    pub fn append_to(path: &Path, valid_bytes: u64) -> Result<Self> {
        let mut f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io_err("opening", path, e))?;
        let len = f
            .metadata()
            .map_err(|e| io_err("reading the size of", path, e))?
            .len();
        if len != valid_bytes {
            f.set_len(valid_bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| io_err("cutting the torn record off", path, e))?;
        }
        f.seek(std::io::SeekFrom::Start(valid_bytes))
            .map_err(|e| io_err("seeking in", path, e))?;
        Self::wrap(f, path, valid_bytes)
    }

    fn wrap(f: File, path: &Path, bytes: u64) -> Result<Self> {
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, f),
            path: path.to_path_buf(),
            bytes,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A second handle on the file, for a thread that fsyncs it.
    pub fn file_handle(&self) -> Result<File> {
        self.out
            .get_ref()
            .try_clone()
            .map_err(|e| io_err("duplicating the handle of", &self.path, e))
    }

    /// Appends `record`, applied when the table's clock read `time`, and hands it to the
    /// operating system (no fsync: see [`sync`](Self::sync)). On an error the log may end
    /// in a torn record; the caller stops using it.
    pub fn append(&mut self, time: u64, record: &Record<'_>) -> Result<()> {
        let enc = record.encode(time);
        let head: &[u8] = bytemuck::cast_slice(&enc.head);
        let len = head.len() as u64 + enc.parts.iter().map(|p| p.len() as u64).sum::<u64>();
        let len_bytes = len.to_le_bytes();
        let mut h = crc32fast::Hasher::new();
        h.update(&len_bytes);
        h.update(head);
        for p in &enc.parts {
            crc_update(&mut h, p);
        }
        let sum = h.finalize().to_le_bytes();
        let path = &self.path;
        let out = &mut self.out;
        let mut wr = |b: &[u8]| {
            out.write_all(b)
                .map_err(|e| io_err("appending to", path, e))
        };
        wr(&len_bytes)?;
        wr(&crc(&[&len_bytes]).to_le_bytes())?;
        wr(&sum)?;
        wr(head)?;
        let half = enc.parts.len() / 2;
        for (i, p) in enc.parts.iter().enumerate() {
            if i == half && crate::file::pause_armed() {
                self.out
                    .flush()
                    .map_err(|e| io_err("appending to", &self.path, e))?;
                pause_point("log.torn");
            }
            self.out
                .write_all(p)
                .map_err(|e| io_err("appending to", &self.path, e))?;
        }
        self.out
            .flush()
            .map_err(|e| io_err("appending to", &self.path, e))?;
        self.bytes += RECORD_HEAD + len;
        Ok(())
    }

    /// Makes everything appended so far durable (fdatasync).
    pub fn sync(&mut self) -> Result<()> {
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| io_err("syncing", &self.path, e))
    }
}

/// Whether the rest of the file is zeros (the tail a crash can leave on some file systems).
fn zeros_to_end(r: &mut impl std::io::Read, path: &Path) -> Result<bool> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) if buf[..n].iter().all(|&b| b == 0) => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading", path, e)),
        }
    }
}

/// What [`replay`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// The log's generation (from its header).
    pub generation: u64,
    /// Records read and applied.
    pub records: u64,
    /// Bytes of the log up to the end of its last whole record.
    pub valid_bytes: u64,
    /// A torn final record that was dropped: its offset and the bytes it had.
    pub torn: Option<(u64, u64)>,
}

/// Reads the log at `path` of a table of `kind`, calling `apply` on each whole record in
/// order with the clock's reading when it applied (see the module docs for torn and
/// damaged records).
pub fn replay(
    path: &Path,
    kind: LogKind,
    mut apply: impl FnMut(u64, Record<'_>) -> Result<()>,
) -> Result<ReplayReport> {
    let file = File::open(path).map_err(|e| io_err("opening", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| io_err("reading the size of", path, e))?
        .len();
    let mut r = BufReader::with_capacity(8 << 20, file);
    let mut h = [0u8; HEADER_BYTES as usize];
    if !read_full(&mut r, &mut h, path)? {
        if size >= 8 && &h[..8] != MAGIC {
            return Err(corrupt(path, "not a vramkv log (wrong magic bytes)"));
        }
        return Err(corrupt(path, "the file ends inside the log's header"));
    }
    if &h[..8] != MAGIC {
        return Err(corrupt(path, "not a vramkv log (wrong magic bytes)"));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if version > FORMAT_VERSION {
        return Err(Error::NewerFormat {
            file: path.display().to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if crc(&[&h[..28]]) != u32::from_le_bytes(h[28..].try_into().unwrap_or_default()) {
        return Err(corrupt(path, "the log header's checksum does not match"));
    }
    let generation = u64::from_le_bytes(h[20..28].try_into().unwrap_or_default());
    let want = header_bytes(kind, generation);
    if want[12..20] != h[12..20] {
        return Err(Error::InvalidConfig(format!(
            "{} records another kind of table than the one it is loaded into",
            path.display()
        )));
    }
    let mut report = ReplayReport {
        generation,
        records: 0,
        valid_bytes: HEADER_BYTES,
        torn: None,
    };
    let mut buf: Vec<u64> = Vec::new();
    loop {
        let at = report.valid_bytes;
        let left = size - at;
        if left == 0 {
            break;
        }
        let torn = |report: &mut ReplayReport| {
            report.torn = Some((at, left));
        };
        let mut head = [0u8; RECORD_HEAD as usize];
        if left < RECORD_HEAD || !read_full(&mut r, &mut head, path)? {
            torn(&mut report);
            break;
        }
        let len = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let len_sum = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
        let sum = u32::from_le_bytes(head[12..].try_into().unwrap_or_default());
        if crc(&[&head[..8]]) != len_sum {
            if head.iter().all(|&b| b == 0) && zeros_to_end(&mut r, path)? {
                torn(&mut report);
                break;
            }
            return Err(corrupt(
                path,
                format!("the record at byte {at} has a damaged length"),
            ));
        }
        if len > left - RECORD_HEAD {
            torn(&mut report);
            break;
        }
        if len % 8 != 0 || len < 32 {
            return Err(corrupt(
                path,
                format!("the record at byte {at} has an impossible length {len}"),
            ));
        }
        buf.clear();
        buf.resize((len / 8) as usize, 0);
        if !read_full(&mut r, bytemuck::cast_slice_mut(&mut buf), path)? {
            torn(&mut report);
            break;
        }
        if crc(&[&head[..8], bytemuck::cast_slice(&buf)]) != sum {
            if at + RECORD_HEAD + len == size {
                torn(&mut report);
                break;
            }
            return Err(corrupt(
                path,
                format!(
                    "the record at byte {at} fails its checksum and {} bytes follow it (damaged)",
                    size - at - RECORD_HEAD - len
                ),
            ));
        }
        let (time, rec) = decode(&buf, kind, path, at)?;
        apply(time, rec)?;
        report.records += 1;
        report.valid_bytes = at + RECORD_HEAD + len;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    /// The pieced checksum is the one-pass checksum.
    #[test]
    fn pieced_crc_is_the_crc() {
        let data: Vec<u8> = (0..(21u32 << 20) + 7)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut a = crc32fast::Hasher::new();
        a.update(b"head");
        a.update(&data);
        let mut b = crc32fast::Hasher::new();
        b.update(b"head");
        super::crc_update(&mut b, &data);
        assert_eq!(a.finalize(), b.finalize());
    }
}
