//! One table over several: [`Sharded`] is a [`KvBackend`] whose keys live in `n` shard
//! tables (one per GPU, or any mix of CUDA, wgpu and CPU tables), with the contract of a
//! single table.
//!
//! # Where a key goes
//!
//! Shard `⌊h·n / 2⁶⁴⌋` of `h = fmix64(key ^ shard_seed ^ SALT)`, MurmurHash3's finaliser
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

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kv_core::{
    Applied, Books, Description, Error, Housekeeping, ImagePart, KvBackend, Result, TableConfig,
    TableImage, check_contains, check_get, check_put, count_distinct, prepare_put,
};
use rayon::prelude::*;

/// The most shards a table has.
pub const MAX_SHARDS: usize = 256;

/// Mixed into the shard seed, so that a table whose config fixes a seed still chooses
/// shards with a hash apart from the shards' probe hashes.
const SALT: u64 = 0x5348_4152_4453_4545;

/// Keys per run of the split (each run is cut by shard on one core).
const RUN: usize = 1 << 16;

#[inline]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A table over several shard tables (see the crate docs).
pub struct Sharded {
    shards: Vec<Box<dyn KvBackend>>,
    cfg: TableConfig,
    seed: u64,
    /// The whole table's books (its slot count decides capacity and growth), behind the
    /// lock that makes each batch atomic across shards.
    books: RwLock<Books>,
}

/// A batch's keys (and rows), split by shard: each shard's part in batch order, with the
/// place in the batch of each of its keys.
struct Split {
    keys: Vec<Vec<u64>>,
    values: Vec<Vec<u64>>,
    index: Vec<Vec<usize>>,
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
                c.seed = Some(fmix64(
                    seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
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
        let seed = fmix64(cfg.table_seed() ^ SALT);
        Ok(Self {
            books: RwLock::new(Books::purging_itself(&cfg)),
            shards,
            cfg,
            seed,
        })
    }

    /// The shards, in order.
    pub fn shards(&self) -> &[Box<dyn KvBackend>] {
        &self.shards
    }

    /// The shard `key` lives in.
    #[inline]
    pub fn shard_of(&self, key: u64) -> usize {
        ((u128::from(fmix64(key ^ self.seed)) * self.shards.len() as u128) >> 64) as usize
    }

    fn read(&self) -> RwLockReadGuard<'_, Books> {
        self.books.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Books> {
        self.books.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Splits `keys` (and their `width`-word rows, when given) by shard, on every core.
    fn split(&self, keys: &[u64], values: Option<&[u64]>, width: usize) -> Split {
        let n = self.shards.len();
        let runs: Vec<Split> = keys
            .par_chunks(RUN)
            .enumerate()
            .map(|(r, run)| {
                let mut s = Split {
                    keys: vec![Vec::new(); n],
                    values: vec![Vec::new(); n],
                    index: vec![Vec::new(); n],
                };
                for (j, &k) in run.iter().enumerate() {
                    let i = r * RUN + j;
                    let d = self.shard_of(k);
                    s.keys[d].push(k);
                    s.index[d].push(i);
                    if let Some(v) = values {
                        s.values[d].extend_from_slice(&v[i * width..(i + 1) * width]);
                    }
                }
                s
            })
            .collect();
        let join = |pick: &(dyn Fn(&Split, usize) -> &[u64] + Sync)| -> Vec<Vec<u64>> {
            (0..n)
                .into_par_iter()
                .map(|d| {
                    let mut out = Vec::with_capacity(runs.iter().map(|s| pick(s, d).len()).sum());
                    for s in &runs {
                        out.extend_from_slice(pick(s, d));
                    }
                    out
                })
                .collect()
        };
        let keys = join(&|s, d| &s.keys[d]);
        let values = join(&|s, d| &s.values[d]);
        let index = (0..n)
            .into_par_iter()
            .map(|d| {
                let mut out = Vec::with_capacity(runs.iter().map(|s| s.index[d].len()).sum());
                for s in &runs {
                    out.extend_from_slice(&s.index[d]);
                }
                out
            })
            .collect();
        Split {
            keys,
            values,
            index,
        }
    }

    /// Runs `f` on every shard with its index at the same time; the first error, if any.
    fn each<T: Send>(
        &self,
        f: impl Fn(usize, &dyn KvBackend) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        self.shards
            .par_iter()
            .enumerate()
            .map(|(i, s)| f(i, &**s))
            .collect()
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
        mut values_out: Option<&mut [u64]>,
        found_out: &mut [bool],
    ) -> Result<()> {
        let w = self.cfg.width;
        let split = self.split(keys, None, 0);
        let want_rows = values_out.is_some();
        let answers = self.each(|d, s| {
            let k = &split.keys[d];
            let mut f = vec![false; k.len()];
            let mut v = Vec::new();
            if want_rows {
                v = vec![0; k.len() * w];
                s.get(k, &mut v, &mut f)?;
            } else {
                s.contains(k, &mut f)?;
            }
            Ok((v, f))
        })?;
        for (d, (v, f)) in answers.iter().enumerate() {
            for (j, &i) in split.index[d].iter().enumerate() {
                found_out[i] = f[j];
                if let Some(out) = values_out.as_deref_mut() {
                    out[i * w..(i + 1) * w].copy_from_slice(&v[j * w..(j + 1) * w]);
                }
            }
        }
        Ok(())
    }
}

/// What [`prepare_put`] sees of a sharded table: the whole table's books; a "rehash" only
/// moves the books (each shard grows by itself); the new keys counted on every shard.
struct Prep<'a> {
    t: &'a Sharded,
    books: &'a mut Books,
    split: &'a Split,
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
