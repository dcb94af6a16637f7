//! One table over several: [`Sharded`] is a [`KvBackend`] whose keys live in `n` shard
//! tables (one per GPU, or any mix of CUDA, wgpu and CPU tables), with the contract of a
//! single table.
//!
//! # Where a key goes
//!
//! Shard `⌊h·n / 2⁶⁴⌋` of `h = fmix64(key ^ shard_seed)` (`kv_kernels::layout::hash`, the
//! table's own hash function), MurmurHash3's finaliser
//! with a seed drawn apart from every shard's own probe seed: the shard choice uses the
//! high bits of a hash independent of the one each shard probes with (which uses the low
//! bits of `fmix64(key ^ seed)` under the shard's own seed), so the keys of one shard do not
//! cluster in its slots. Shards are sized equally: each gets the power of two of slots at or
//! above its share of the whole table's, so together they have at least the whole table's.
//!
//! # One batch, every shard at once
//!
//! A batch is split in one pass on every core (each run of the batch cut by shard, the runs
//! then joined per shard, in batch order), each shard's part runs on its own table at the
//! same time, and lookups' results are scattered back in the caller's order. Keys keep their
//! batch order within a shard, so a key repeated in a batch keeps "last occurrence wins".
//!
//! # The contract across shards
//!
//! - **Atomicity (item d)**: one lock over the whole table. A write batch holds it alone,
//!   lookups share it, so callers on several threads see the result of some sequential
//!   order of whole batches, across every shard.
//! - **Admission and growth (item f)** are the single table's, decided once for the whole
//!   table by the shared sizing rules (`kv_core::Books`, `kv_core::prepare_put`) before any
//!   shard changes: `capacity()` is that of one table of the configured size, and a put with
//!   growth off that would pass it is refused whole. The shards themselves are opened with
//!   growth on, so none refuses a batch the whole table admitted.
//! - **A shard that fails** (an error from its device or driver) gives that error; the
//!   shards that ran their parts keep them (item g, per shard: a put or delete that fails
//!   with [`Error::Device`] may have been applied in part). Bad input is refused before any
//!   shard is touched.
//!
//! ```
//! use kv_core::{KvBackend, TableConfig};
//! use kv_shard::Sharded;
//! let open = |_: usize, cfg: TableConfig| -> kv_core::Result<Box<dyn KvBackend>> {
//!     Ok(Box::new(kv_backend_cpu::CpuBackend::open(cfg)?))
//! };
//! let t = Sharded::open(TableConfig::new(1000).width(2), 3, &open)?;
//! t.put(&[1, 2, 3, 1], &[10, 11, 20, 21, 30, 31, 12, 13])?;
//! let (mut v, mut f) = ([0; 4], [false; 2]);
//! t.get(&[1, 9], &mut v, &mut f)?;
//! assert_eq!((v, f), ([12, 13, 0, 0], [true, false]));
//! assert_eq!(t.len(), 3);
//! # Ok::<(), kv_core::Error>(())
//! ```

use std::borrow::Cow;
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kv_core::par::Scatter;
use kv_core::{
    Applied, Books, Description, Error, Housekeeping, ImagePart, KvBackend, Result, TableConfig,
    TableImage, check_contains, check_get, check_put, count_distinct, prepare_put,
};
use kv_kernels::layout::hash;
use rayon::prelude::*;

/// The most shards a table has.
pub const MAX_SHARDS: usize = 256;

/// Mixed into the shard seed, so that a table whose config fixes a seed still chooses
/// shards with a hash apart from the shards' probe hashes.
const SALT: u64 = 0x5348_4152_4453_4545;

/// Keys per run of the split (each run is cut by shard on one core).
const RUN: usize = 1 << 16;

/// A table over several shard tables (see the crate docs).
pub struct Sharded {
    shards: Vec<Box<dyn KvBackend>>,
    cfg: TableConfig,
    seed: u64,
    /// The whole table's books (its slot count decides capacity and growth), behind the
    /// lock that makes each batch atomic across shards.
    books: RwLock<Books>,
    /// Buffers of earlier batches' splits and answers, kept so that a steady stream of
    /// batches allocates (and faults in) no new memory.
    pool: Mutex<Vec<Bufs>>,
}

/// The buffers of one batch's split and answers, one of each per shard.
#[derive(Default)]
struct Bufs {
    keys: Vec<Vec<u64>>,
    values: Vec<Vec<u64>>,
    index: Vec<Vec<usize>>,
    rows: Vec<Vec<u64>>,
    flags: Vec<Vec<bool>>,
}

/// Buffers kept for later batches (one per concurrent batch, up to this many).
const POOLED: usize = 4;

/// A batch's keys (and rows), split by shard: each shard's part in batch order, with the
/// place in the batch of each of its keys. A table of one shard borrows the batch as it is
/// (`index` is then empty: the identity).
struct Split<'a> {
    keys: Vec<Cow<'a, [u64]>>,
    values: Vec<Cow<'a, [u64]>>,
    index: Vec<Vec<usize>>,
    /// The rest of the pooled buffers (the answers').
    rest: Bufs,
}

impl Sharded {
    /// A sharded table of config `cfg` over `n` shards, shard `i` opened by `open(i, its
    /// config)`: `cfg` with the capacity split equally, growth on, and a seed of its own
    /// derived from `cfg`'s. A cache config is refused ([`Error::Unsupported`]): cache
    /// tables evict per bucket, and a sharded one is not written yet.
    pub fn open(
        cfg: TableConfig,
        n: usize,
        open: &dyn Fn(usize, TableConfig) -> Result<Box<dyn KvBackend>>,
    ) -> Result<Self> {
        cfg.validate()?;
        if cfg.cache.is_some() {
            return Err(Error::Unsupported {
                backend: "sharded",
                what: "cache tables",
            });
        }
        if !(1..=MAX_SHARDS).contains(&n) {
            return Err(Error::InvalidConfig(format!(
                "a sharded table has 1 to {MAX_SHARDS} shards, not {n}"
            )));
        }
        let seed = cfg.table_seed();
        // Each shard gets a power-of-two share of the whole table's slots, rounded up, so
        // that the shards together hold at least the slots the whole table counts.
        let share = cfg.initial_slots().div_ceil(n).next_power_of_two();
        let per = kv_core::capacity_of(share, cfg.max_load_factor).max(1);
        let shards = (0..n)
            .map(|i| {
                let mut c = cfg.clone().growth(true);
                c.capacity = per;
                c.seed = Some(hash(
                    seed,
                    (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ));
                open(i, c)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::over(cfg, shards)
    }

    /// A sharded table of config `cfg` over tables already open (each with `cfg`'s width
    /// and no cache config, and empty).
    pub fn over(cfg: TableConfig, shards: Vec<Box<dyn KvBackend>>) -> Result<Self> {
        cfg.validate()?;
        if shards.is_empty() || shards.len() > MAX_SHARDS {
            return Err(Error::InvalidConfig(format!(
                "a sharded table has 1 to {MAX_SHARDS} shards, not {}",
                shards.len()
            )));
        }
        if let Some(s) = shards
            .iter()
            .find(|s| s.width() != cfg.width || !s.is_empty() || s.cache_policy().is_ok())
        {
            return Err(Error::InvalidConfig(format!(
                "every shard must be an empty table of width {} without a cache policy; {} is \
                 not",
                cfg.width,
                s.describe().backend
            )));
        }
        let seed = hash(cfg.table_seed(), SALT);
        Ok(Self {
            books: RwLock::new(Books::purging_itself(&cfg)),
            shards,
            cfg,
            seed,
            pool: Mutex::new(Vec::new()),
        })
    }

    /// The shards, in order.
    pub fn shards(&self) -> &[Box<dyn KvBackend>] {
        &self.shards
    }

    /// The shard `key` lives in.
    #[inline]
    pub fn shard_of(&self, key: u64) -> usize {
        ((u128::from(hash(key, self.seed)) * self.shards.len() as u128) >> 64) as usize
    }

    fn read(&self) -> RwLockReadGuard<'_, Books> {
        self.books.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Books> {
        self.books.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Splits `keys` (and their `width`-word rows, when given) by shard, on every core: a
    /// count per run of the batch and shard, then each run writes its keys straight into
    /// its own part of each shard's arrays (a counting sort, stable within a shard).
    fn split<'a>(&self, keys: &'a [u64], values: Option<&'a [u64]>, width: usize) -> Split<'a> {
        let n = self.shards.len();
        if n == 1 {
            return Split {
                keys: vec![Cow::Borrowed(keys)],
                values: vec![Cow::Borrowed(values.unwrap_or_default())],
                index: Vec::new(),
                rest: Bufs::default(),
            };
        }
        let w = if values.is_some() { width } else { 0 };
        let counts: Vec<Vec<usize>> = keys
            .par_chunks(RUN)
            .map(|run| {
                let mut c = vec![0usize; n];
                for &k in run {
                    c[self.shard_of(k)] += 1;
                }
                c
            })
            .collect();
        let runs = counts.len();
        let totals: Vec<usize> = (0..n).map(|d| counts.iter().map(|c| c[d]).sum()).collect();
        // starts[r][d]: where run r's keys of shard d begin in shard d's arrays.
        let mut starts = vec![vec![0usize; n]; runs];
        for d in 0..n {
            let mut at = 0;
            for r in 0..runs {
                starts[r][d] = at;
                at += counts[r][d];
            }
        }
        let mut bufs = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        let fresh = |v: &mut Vec<Vec<u64>>, per: usize| {
            let mut v = std::mem::take(v);
            v.resize_with(n, Vec::new);
            for (d, x) in v.iter_mut().enumerate() {
                x.clear();
                x.reserve(totals[d] * per);
            }
            v
        };
        let mut out_keys = fresh(&mut bufs.keys, 1);
        let mut out_values = fresh(&mut bufs.values, w);
        let mut out_index = std::mem::take(&mut bufs.index);
        out_index.resize_with(n, Vec::new);
        for (d, x) in out_index.iter_mut().enumerate() {
            x.clear();
            x.reserve(totals[d]);
        }
        let kp: Vec<Scatter<'_, u64>> = out_keys.iter_mut().map(Scatter::spare).collect();
        let vp: Vec<Scatter<'_, u64>> = out_values.iter_mut().map(Scatter::spare).collect();
        let ip: Vec<Scatter<'_, usize>> = out_index.iter_mut().map(Scatter::spare).collect();
        keys.par_chunks(RUN)
            .zip(starts)
            .enumerate()
            .for_each(|(r, (run, mut next))| {
                for (j, &k) in run.iter().enumerate() {
                    let i = r * RUN + j;
                    let d = self.shard_of(k);
                    let at = next[d];
                    next[d] += 1;
                    // SAFETY: `at` walks run r's own range of shard d's arrays, computed
                    // from the counts above (each key counted once), so it is below the
                    // reserved capacity and no other run writes it.
                    unsafe {
                        kp[d].write(at, k);
                        ip[d].write(at, i);
                        if let Some(v) = values {
                            vp[d].write_slice(at * w, &v[i * w..(i + 1) * w]);
                        }
                    }
                }
            });
        for d in 0..n {
            // SAFETY: the runs above wrote every one of shard d's `totals[d]` keys and
            // indices and `totals[d] * w` row words, within the reserved capacity.
            unsafe {
                out_keys[d].set_len(totals[d]);
                out_index[d].set_len(totals[d]);
                out_values[d].set_len(totals[d] * w);
            }
        }
        Split {
            keys: out_keys.into_iter().map(Cow::Owned).collect(),
            values: out_values.into_iter().map(Cow::Owned).collect(),
            index: out_index,
            rest: bufs,
        }
    }

    /// Keeps a split's buffers for a later batch.
    fn recycle(&self, split: Split<'_>) {
        if split.index.is_empty() {
            return;
        }
        let mut b = split.rest;
        b.keys = split.keys.into_iter().map(Cow::into_owned).collect();
        b.values = split.values.into_iter().map(Cow::into_owned).collect();
        b.index = split.index;
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOLED {
            pool.push(b);
        }
    }

    /// Runs `f` on every shard with its index at the same time, each on a thread of its
    /// own (a shard's call blocks while its device works, and may itself run on every
    /// core: in a task of the shared thread pool it would hold a worker and stall the
    /// others); the first error, if any.
    fn each<T: Send>(
        &self,
        f: impl Fn(usize, &dyn KvBackend) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        if self.shards.len() == 1 {
            return Ok(vec![f(0, &*self.shards[0])?]);
        }
        let f = &f;
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| scope.spawn(move || f(i, &**s)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::InvalidArgument("a shard's thread panicked".into()))
                    })
                })
                .collect()
        })
    }

    /// Entries in the shards, as they count them.
    fn shard_len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Looks `keys` up on every shard at once and scatters the answers back: each row into
    /// `values_out` (when given) and each flag into `found_out`.
    fn lookup(
        &self,
        keys: &[u64],
        values_out: Option<&mut [u64]>,
        found_out: &mut [bool],
    ) -> Result<()> {
        let w = self.cfg.width;
        if self.shards.len() == 1 {
            return match values_out {
                Some(v) => self.shards[0].get(keys, v, found_out),
                None => self.shards[0].contains(keys, found_out),
            };
        }
        let mut split = self.split(keys, None, 0);
        let want_rows = values_out.is_some();
        let n = self.shards.len();
        let mut rows = std::mem::take(&mut split.rest.rows);
        let mut flags = std::mem::take(&mut split.rest.flags);
        rows.resize_with(n, Vec::new);
        flags.resize_with(n, Vec::new);
        let slots: Vec<Mutex<(Vec<u64>, Vec<bool>)>> = rows
            .into_iter()
            .zip(flags)
            .map(|(mut v, mut f)| {
                v.clear();
                f.clear();
                Mutex::new((v, f))
            })
            .collect();
        self.each(|d, s| {
            let k = &split.keys[d];
            let mut g = slots[d].lock().unwrap_or_else(PoisonError::into_inner);
            let (v, f) = &mut *g;
            f.resize(k.len(), false);
            if want_rows {
                v.resize(k.len() * w, 0);
                s.get(k, v, f)
            } else {
                s.contains(k, f)
            }
        })?;
        let answers: Vec<(Vec<u64>, Vec<bool>)> = slots
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
            .collect();
        let fo = Scatter::new(found_out);
        let vo = values_out.map(Scatter::new);
        answers.par_iter().enumerate().for_each(|(d, (v, f))| {
            split.index[d]
                .par_chunks(RUN)
                .enumerate()
                .for_each(|(c, idx)| {
                    for (jj, &i) in idx.iter().enumerate() {
                        let j = c * RUN + jj;
                        // SAFETY: `i` is the batch position of shard d's j-th key; the
                        // shards' positions are a permutation of the batch's, so each is
                        // written by this one task, inside the caller's slices (checked
                        // lengths: `keys.len()` flags and `keys.len() * w` words).
                        unsafe {
                            fo.write(i, f[j]);
                            if let Some(vo) = vo {
                                vo.write_slice(i * w, &v[j * w..(j + 1) * w]);
                            }
                        }
                    }
                });
        });
        (split.rest.rows, split.rest.flags) = answers.into_iter().unzip();
        self.recycle(split);
        Ok(())
    }
}

/// What [`prepare_put`] sees of a sharded table: the whole table's books; a "rehash" only
/// moves the books (each shard grows by itself); the new keys counted on every shard.
struct Prep<'a> {
    t: &'a Sharded,
    books: &'a mut Books,
    split: &'a Split<'a>,
    found: Option<Vec<Vec<bool>>>,
}

impl Prep<'_> {
    fn found(&mut self) -> Result<&[Vec<bool>]> {
        if self.found.is_none() {
            let split = self.split;
            self.found = Some(self.t.each(|d, s| {
                let mut f = vec![false; split.keys[d].len()];
                s.contains(&split.keys[d], &mut f)?;
                Ok(f)
            })?);
        }
        Ok(self.found.as_deref().unwrap_or_default())
    }
}

impl Housekeeping for Prep<'_> {
    fn books(&mut self) -> &mut Books {
        self.books
    }
    fn rehash(&mut self, _slots: usize) -> Result<()> {
        Ok(())
    }
    fn count_missing(&mut self) -> Result<usize> {
        Ok(self
            .found()?
            .iter()
            .map(|f| f.iter().filter(|x| !**x).count())
            .sum())
    }
    fn count_new(&mut self) -> Result<usize> {
        let split = self.split;
        let found = self.found()?;
        // Keys of one shard are never keys of another: the distinct new keys add up.
        Ok(found
            .par_iter()
            .enumerate()
            .map(|(d, f)| count_distinct(&split.keys[d], f))
            .sum())
    }
}

impl KvBackend for Sharded {
    fn width(&self) -> usize {
        self.cfg.width
    }

    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        check_put(self.cfg.width, keys, values)?;
        if keys.is_empty() {
            return Ok(());
        }
        let split = self.split(keys, Some(values), self.cfg.width);
        let mut books = self.write();
        let before = self.shard_len();
        let mut prep = Prep {
            t: self,
            books: &mut books,
            split: &split,
            found: None,
        };
        prepare_put(&mut prep, keys.len())?;
        let r = self.each(|d, s| s.put(&split.keys[d], &split.values[d]));
        self.recycle(split);
        let inserted = self.shard_len().saturating_sub(before) as u64;
        books.apply_put(
            Applied {
                inserted,
                from_empty: inserted,
                ..Applied::default()
            },
            "sharded",
        )?;
        r.map(|_| ())
    }

    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.cfg.width, keys, values_out, found_out)?;
        let _g = self.read();
        self.lookup(keys, Some(values_out), found_out)
    }

    fn delete(&self, keys: &[u64]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        let split = self.split(keys, None, 0);
        let mut books = self.write();
        let r = self.each(|d, s| s.delete(&split.keys[d]));
        self.recycle(split);
        // The books follow what the shards hold, a failed shard's partial work included.
        let removed = books.len().saturating_sub(self.shard_len());
        books.apply_delete(removed as u64, 0);
        Ok(r?.into_iter().sum())
    }

    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_contains(keys, found_out)?;
        let _g = self.read();
        self.lookup(keys, None, found_out)
    }

    fn len(&self) -> usize {
        self.read().len()
    }

    fn capacity(&self) -> usize {
        self.read().capacity()
    }

    fn clear(&self) -> Result<()> {
        let mut books = self.write();
        let r = self.each(|_, s| s.clear());
        let left = self.shard_len();
        books.cleared();
        if left > 0 {
            books.apply_put(
                Applied {
                    inserted: left as u64,
                    from_empty: left as u64,
                    ..Applied::default()
                },
                "sharded",
            )?;
        }
        r.map(|_| ())
    }

    fn describe(&self) -> Description {
        let books = self.read();
        let parts: Vec<Description> = self.shards.iter().map(|s| s.describe()).collect();
        Description {
            backend: "sharded",
            device: format!(
                "{} shards: {}",
                parts.len(),
                parts
                    .iter()
                    .map(|d| format!("{} ({})", d.backend, d.device))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            bytes_in_use: parts.iter().map(|d| d.bytes_in_use).sum(),
            slots: books.slots(),
        }
    }

    fn export(&self) -> Result<TableImage> {
        // The write lock: no batch runs on any shard while they are copied out.
        let _g = self.write();
        let images = self.each(|_, s| s.export())?;
        let mut img = TableImage::new(self.cfg.width);
        let n: usize = images.iter().map(TableImage::len).sum();
        img.keys.reserve(n);
        img.values.reserve(n * self.cfg.width);
        for i in images {
            img.keys.extend_from_slice(&i.keys);
            img.values.extend_from_slice(&i.values);
        }
        Ok(img)
    }

    fn restore(&self, part: ImagePart<'_>) -> Result<()> {
        part.check(self.cfg.width)?;
        if part.scores.is_some() || part.expires.is_some() {
            return Err(Error::Unsupported {
                backend: "sharded",
                what: "restoring a cache table's image",
            });
        }
        self.put(part.keys, part.values)
    }
}
