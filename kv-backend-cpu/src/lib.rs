//! vramkv's CPU backend: the fallback when no GPU is usable, and the reference the
//! GPU backends are compared with.
//!
//! The table is split by the top bits of each key's hash into up to 1024 partitions,
//! each a structure-of-arrays open-addressing table (control bytes, keys, values) with
//! linear probing. A batch is hashed in parallel, counting-sorted by partition, and
//! each partition then applies its share *in batch order* on one core. That gives the
//! contract's "last duplicate wins" and "a repeated delete counts once" without any
//! atomics, and lets every core work on its own part of memory. Lookups run straight
//! over the batch in parallel, with the home slots of the next keys prefetched.
//!
//! ```
//! use kv_backend_cpu::CpuBackend;
//! use kv_core::{KvBackend, TableConfig};
//!
//! let table = CpuBackend::open(TableConfig::new(1000).width(2))?;
//! table.put(&[7, u64::MAX], &[1, 2, 3, 4])?;
//! let (mut values, mut found) = (vec![0; 4], vec![false; 2]);
//! table.get(&[u64::MAX, 8], &mut values, &mut found)?;
//! assert_eq!((values, found), (vec![3, 4, 0, 0], vec![true, false]));
//! # Ok::<(), kv_core::Error>(())
//! ```
// A library reports through its results and its trace, never by printing.
#![deny(clippy::print_stdout, clippy::print_stderr)]

mod bytes;
mod cache;
mod part;

pub use bytes::CpuBytes;
pub use cache::CpuCache;

use kv_core::par::Scatter;
use kv_core::{
    Applied, Books, Description, Error, Housekeeping, KvBackend, Result, TableConfig, TableImage,
    check_contains, check_get, check_put, count_distinct, prepare_put,
};
use part::{Part, hash};
use rayon::prelude::*;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Keys per lookup task (one rayon job runs one software-pipelined run).
const RUN: usize = 4096;
/// How far ahead a partition prefetches while it applies a batch.
const PREFETCH_AHEAD: usize = 8;
/// Slots per partition below which the table is not split further.
const PART_SLOTS: usize = 1 << 14;
/// The most partitions a table is split into.
const MAX_PARTS: usize = 1 << 8;
/// Batches longer than this are applied as consecutive sub-batches (indices are u32).
const MAX_SUB_BATCH: usize = u32::MAX as usize;

/// The CPU backend. Cheap to share across threads: batches take a read or write lock.
pub struct CpuBackend {
    cfg: TableConfig,
    state: RwLock<State>,
}

struct State {
    /// The books: the slot count the shared sizing rules see (capacity = slots * max load)
    /// and the entries. The partitions reuse and purge their deleted slots themselves.
    books: Books,
    bits: u32,
    parts: Vec<Part>,
    /// The table's hash seed (`TableConfig::seed`).
    seed: u64,
    /// Regrouping buffers, kept between batches so that steady-state batches allocate nothing.
    scratch: (Vec<u64>, Vec<u64>),
}

fn part_bits(slots: usize) -> u32 {
    (slots / PART_SLOTS).clamp(1, MAX_PARTS).trailing_zeros()
}

#[inline]
fn part_of(h: u64, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (h >> (64 - bits)) as usize
    }
}

impl State {
    fn new(cfg: &TableConfig, seed: u64) -> Result<Self> {
        let books = Books::purging_itself(cfg);
        let bits = part_bits(books.slots());
        let per = books.slots() >> bits;
        let parts = try_parts(1 << bits, per, cfg, seed)?;
        Ok(Self {
            books,
            bits,
            parts,
            seed,
            scratch: Default::default(),
        })
    }

    /// Rebuilds into `slots` slots; the new partitions are allocated before the old go,
    /// so a failed allocation leaves the table as it was. The books are updated by
    /// [`prepare_put`].
    fn grow_to(&mut self, slots: usize, cfg: &TableConfig) -> Result<()> {
        let bits = part_bits(slots);
        let per = slots >> bits;
        let ratio = 1usize << (bits - self.bits);
        let groups: Vec<Result<Vec<Part>>> = self
            .parts
            .par_iter()
            .map(|old| {
                let mut group = try_parts(ratio, per, cfg, self.seed)?;
                for i in old.live_slots() {
                    let (k, h) = (old.keys[i], hash(old.keys[i], old.seed));
                    let dst = &mut group[part_of(h, bits) & (ratio - 1)];
                    dst.reserve(1, cfg.max_load_factor);
                    dst.upsert(h, k, old.row(i));
                }
                Ok(group)
            })
            .collect();
        let mut parts = Vec::with_capacity(1 << bits);
        for g in groups {
            parts.extend(g?);
        }
        self.bits = bits;
        self.parts = parts;
        Ok(())
    }

    fn apply_put(&mut self, keys: &[u64], values: &[u64], cfg: &TableConfig) -> Result<()> {
        let w = cfg.width;
        let load = cfg.max_load_factor;
        let mut scratch = std::mem::take(&mut self.scratch);
        let sorted = Sorted::new(keys, Some((values, w)), self.bits, self.seed, &mut scratch);
        let added: usize = self
            .parts
            .par_iter_mut()
            .enumerate()
            .map(|(p, part)| {
                let (keys, values) = sorted.share(p, w);
                let mut added = 0;
                for_each_prefetched(part, keys, |part, j, h| {
                    // Only a new key claims a slot, so growing here (and not for the whole
                    // share up front) keeps overwrite-heavy batches from doubling partitions.
                    if part.used >= part.max_used {
                        part.reserve(1, load);
                    }
                    added += part.upsert(h, keys[j], &values[j * w..(j + 1) * w]) as usize;
                });
                added
            })
            .sum();
        drop(sorted);
        self.scratch = scratch;
        let added = added as u64;
        let applied = Applied {
            inserted: added,
            from_empty: added,
            ..Applied::default()
        };
        self.books.apply_put(applied, "cpu")
    }

    fn apply_delete(&mut self, keys: &[u64]) -> usize {
        let mut scratch = std::mem::take(&mut self.scratch);
        let sorted = Sorted::new(keys, None, self.bits, self.seed, &mut scratch);
        let removed: usize = self
            .parts
            .par_iter_mut()
            .enumerate()
            .map(|(p, part)| {
                let (keys, _) = sorted.share(p, 0);
                let mut removed = 0;
                for_each_prefetched(part, keys, |part, j, h| {
                    removed += part.remove(h, keys[j]) as usize
                });
                removed
            })
            .sum();
        drop(sorted);
        self.scratch = scratch;
        self.books.apply_delete(removed as u64, 0)
    }

    /// Writes whether each key is present into `found_out`.
    fn contains_into(&self, keys: &[u64], found_out: &mut [bool]) {
        keys.par_chunks(RUN)
            .zip(found_out.par_chunks_mut(RUN))
            .for_each(|(k, f)| self.lookup_run(k, |j, row| f[j] = row.is_some()));
    }

    /// Looks up a run of keys as a software pipeline: the home slot of key `j + HOME_AHEAD`
    /// is prefetched while key `j` is probed, and the value row of a found key is prefetched
    /// `ROW_AHEAD` keys before it is emitted, so DRAM latency overlaps with work.
    fn lookup_run(&self, keys: &[u64], mut emit: impl FnMut(usize, Option<&[u64]>)) {
        const HOME_AHEAD: usize = 16;
        const ROW_AHEAD: usize = 8;
        const RING: usize = 32;
        let n = keys.len();
        let mut hs = [0u64; RING];
        let mut found: [Option<(usize, usize)>; RING] = [None; RING];
        for j in 0..n + HOME_AHEAD + ROW_AHEAD {
            if j < n {
                let h = hash(keys[j], self.seed);
                hs[j % RING] = h;
                self.parts[part_of(h, self.bits)].prefetch_home(h);
            }
            if let Some(k) = j.checked_sub(HOME_AHEAD).filter(|&k| k < n) {
                let h = hs[k % RING];
                let p = part_of(h, self.bits);
                let part = &self.parts[p];
                found[k % RING] = part.find(h, keys[k]).map(|s| {
                    part::prefetch(part.values.as_ptr().wrapping_add(s * part.width));
                    (p, s)
                });
            }
            if let Some(k) = j.checked_sub(HOME_AHEAD + ROW_AHEAD).filter(|&k| k < n) {
                emit(k, found[k % RING].map(|(p, s)| self.parts[p].row(s)));
            }
        }
    }

    fn bytes(&self) -> u64 {
        self.parts.iter().map(Part::bytes).sum()
    }
}

fn try_parts(n: usize, slots: usize, cfg: &TableConfig, seed: u64) -> Result<Vec<Part>> {
    let bytes = (slots * (9 + 8 * cfg.width)) as u64;
    let mut parts = Vec::new();
    parts
        .try_reserve_exact(n)
        .map_err(|_| oom(bytes * n as u64))?;
    for _ in 0..n {
        // Probe the allocator first: Vec::new on a failed allocation aborts the process.
        let mut probe: Vec<u64> = Vec::new();
        probe
            .try_reserve_exact(slots * (cfg.width + 1))
            .map_err(|_| oom(bytes))?;
        drop(probe);
        parts.push(Part::new(slots, cfg.width, cfg.max_load_factor, seed));
    }
    Ok(parts)
}

fn oom(requested_bytes: u64) -> Error {
    Error::OutOfDeviceMemory {
        backend: "cpu",
        requested_bytes,
    }
}

/// Walks `keys` in order with the home slots of keys a little ahead prefetched, calling
/// `f(part, index, hash)`.
#[inline]
fn for_each_prefetched(part: &mut Part, keys: &[u64], mut f: impl FnMut(&mut Part, usize, u64)) {
    const RING: usize = 16;
    let mut ring = [0u64; RING];
    for (j, &k) in keys.iter().enumerate().take(PREFETCH_AHEAD) {
        ring[j % RING] = hash(k, part.seed);
        part.prefetch_home(ring[j % RING]);
    }
    for j in 0..keys.len() {
        if let Some(&k) = keys.get(j + PREFETCH_AHEAD) {
            let h = hash(k, part.seed);
            ring[(j + PREFETCH_AHEAD) % RING] = h;
            part.prefetch_home(h);
        }
        f(part, j, ring[j % RING]);
    }
}

/// A batch's keys (and value rows) regrouped by partition, stable within each partition,
/// so that every partition reads its share sequentially.
enum Sorted<'a> {
    /// One partition: the batch as it is.
    Whole(&'a [u64], &'a [u64]),
    /// Counting-sorted copies (in the table's scratch buffers) and each partition's bounds.
    Split {
        keys: &'a [u64],
        values: &'a [u64],
        bounds: Vec<usize>,
    },
}

impl<'a> Sorted<'a> {
    fn new(
        keys: &'a [u64],
        values: Option<(&'a [u64], usize)>,
        bits: u32,
        seed: u64,
        scratch: &'a mut (Vec<u64>, Vec<u64>),
    ) -> Self {
        if bits == 0 {
            return Sorted::Whole(keys, values.map_or(&[], |v| v.0));
        }
        let n = keys.len();
        let kv_core::par::PartitionPlan {
            chunk,
            bounds,
            starts,
        } = kv_core::par::partition_plan(n, 1 << bits, |i| part_of(hash(keys[i], seed), bits));
        let (vals, w) = values.unwrap_or((&[], 0));
        let (sorted_keys, sorted_vals) = scratch;
        for (buf, len) in [(&mut *sorted_keys, n), (&mut *sorted_vals, n * w)] {
            buf.clear();
            buf.reserve(len);
        }
        let (ko, vo) = (Scatter::spare(sorted_keys), Scatter::spare(sorted_vals));
        keys.par_chunks(chunk)
            .zip(starts)
            .enumerate()
            .for_each(|(c, (ks, mut next))| {
                for (j, k) in ks.iter().enumerate() {
                    let p = part_of(hash(*k, seed), bits);
                    let (dst, src) = (next[p], c * chunk + j);
                    // SAFETY: next[p] walks this chunk's own disjoint range of the outputs,
                    // computed from the histograms above, so it is in bounds and no other task
                    // writes it; rows are `w` words at `w` times the same index.
                    unsafe {
                        ko.write(dst, *k);
                        if w == 1 {
                            vo.write(dst, vals[src]);
                        } else if w > 1 {
                            vo.write_slice(dst * w, &vals[src * w..(src + 1) * w]);
                        }
                    }
                    next[p] += 1;
                }
            });
        // SAFETY: the scatter above wrote every one of the n keys and n * w value words
        // (the histograms count each key exactly once), within the reserved capacity.
        unsafe {
            sorted_keys.set_len(n);
            sorted_vals.set_len(n * w);
        }
        Sorted::Split {
            keys: sorted_keys,
            values: sorted_vals,
            bounds,
        }
    }

    /// Partition `p`'s keys and value rows.
    fn share(&self, p: usize, w: usize) -> (&[u64], &[u64]) {
        match self {
            Sorted::Whole(k, v) => (k, v),
            Sorted::Split {
                keys,
                values,
                bounds,
            } => {
                let (a, b) = (bounds[p], bounds[p + 1]);
                (&keys[a..b], &values[a * w..b * w])
            }
        }
    }
}

/// What [`prepare_put`] needs from the CPU table while a put of `keys` is being prepared.
struct Prep<'a> {
    st: &'a mut State,
    cfg: &'a TableConfig,
    keys: &'a [u64],
    /// The lookup of `keys`, once made: `count_new` follows `count_missing` with the table
    /// unchanged in between.
    found: Option<Vec<bool>>,
}

impl Prep<'_> {
    fn found(&mut self) -> &[bool] {
        let (st, keys) = (&*self.st, self.keys);
        self.found.get_or_insert_with(|| {
            let mut found = vec![false; keys.len()];
            st.contains_into(keys, &mut found);
            found
        })
    }
}

impl Housekeeping for Prep<'_> {
    fn books(&mut self) -> &mut Books {
        &mut self.st.books
    }
    fn rehash(&mut self, slots: usize) -> Result<()> {
        self.st.grow_to(slots, self.cfg)
    }
    fn count_missing(&mut self) -> Result<usize> {
        Ok(self.found().par_iter().filter(|f| !**f).count())
    }
    fn count_new(&mut self) -> Result<usize> {
        let keys = self.keys;
        Ok(count_distinct(keys, self.found()))
    }
}

impl CpuBackend {
    /// Opens an empty table.
    ///
    /// The host is the CPU backend's one device: [`TableConfig::device`] may be unset or
    /// `0`; another ordinal is [`Error::InvalidConfig`], as on every backend.
    pub fn open(cfg: TableConfig) -> Result<Self> {
        cfg.validate()?;
        cfg.device_among(1, "cpu")?;
        if cfg.cache.is_some() {
            return Err(kv_core::Error::InvalidConfig(
                "a cache config opens a cache table: use CpuCache::open (vramkv::open picks it)"
                    .into(),
            ));
        }
        let seed = cfg.table_seed();
        let state = State::new(&cfg, seed)?;
        Ok(Self {
            cfg,
            state: RwLock::new(state),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl KvBackend for CpuBackend {
    fn width(&self) -> usize {
        self.cfg.width
    }

    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        check_put(self.cfg.width, keys, values)?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut st = self.write();
        let mut prep = Prep {
            st: &mut st,
            cfg: &self.cfg,
            keys,
            found: None,
        };
        prepare_put(&mut prep, keys.len())?;
        let w = self.cfg.width;
        for (k, v) in keys
            .chunks(MAX_SUB_BATCH)
            .zip(values.chunks(MAX_SUB_BATCH * w))
        {
            st.apply_put(k, v, &self.cfg)?;
        }
        Ok(())
    }

    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.cfg.width, keys, values_out, found_out)?;
        let w = self.cfg.width;
        let st = self.read();
        keys.par_chunks(RUN)
            .zip(values_out.par_chunks_mut(RUN * w))
            .zip(found_out.par_chunks_mut(RUN))
            .for_each(|((k, v), f)| {
                st.lookup_run(k, |j, row| {
                    let out = &mut v[j * w..(j + 1) * w];
                    match row {
                        Some(r) => out.copy_from_slice(r),
                        None => out.fill(0),
                    }
                    f[j] = row.is_some();
                });
            });
        Ok(())
    }

    fn delete(&self, keys: &[u64]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut st = self.write();
        Ok(keys.chunks(MAX_SUB_BATCH).map(|k| st.apply_delete(k)).sum())
    }

    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_contains(keys, found_out)?;
        self.read().contains_into(keys, found_out);
        Ok(())
    }

    fn len(&self) -> usize {
        self.read().books.len()
    }

    fn capacity(&self) -> usize {
        self.read().books.capacity()
    }

    fn clear(&self) -> Result<()> {
        let mut st = self.write();
        st.parts.par_iter_mut().for_each(Part::clear);
        st.books.cleared();
        Ok(())
    }

    fn export(&self) -> Result<TableImage> {
        let w = self.cfg.width;
        // The read lock holds writers back while the live entries are copied: the image is
        // one point in time, and the copy is all the time the lock is held.
        let st = self.read();
        let n = st.books.len();
        let mut img = TableImage::new(w);
        let oom = |_| oom((n * (w + 1) * 8) as u64);
        img.keys.try_reserve_exact(n).map_err(oom)?;
        img.values.try_reserve_exact(n * w).map_err(oom)?;
        for part in &st.parts {
            for i in part.live_slots() {
                img.push(part.keys[i], part.row(i), None);
            }
        }
        Ok(img)
    }

    fn describe(&self) -> Description {
        let st = self.read();
        Description {
            backend: "cpu",
            device: format!("host CPU ({} threads)", rayon::current_num_threads()),
            bytes_in_use: st.bytes(),
            slots: st.books.slots(),
        }
    }
}
