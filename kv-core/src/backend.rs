//! The [`KvBackend`] trait: the contract every vramkv backend meets exactly.

use crate::{CachePut, CacheStats, Error, Evicted, ImagePart, Result, TableImage};

/// What a backend says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The backend's short name: `"cpu"`, `"cuda"`, `"wgpu"` or a custom backend's.
    pub backend: &'static str,
    /// The device the table lives on, as its driver names it.
    pub device: String,
    /// Bytes the table holds on that device (slots, values, metadata, staging).
    pub bytes_in_use: u64,
    /// Slots in the table.
    pub slots: usize,
}

/// A backend's self-check of its table: what the device counts in the key array next to
/// what the host's books say. See [`KvBackend::audit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    /// Live keys in the key array, as the device counts them.
    pub device_live: u64,
    /// Tombstones (deleted slots not yet reused or purged) in the key array, as the device
    /// counts them.
    pub device_tombstones: u64,
    /// Live keys by the host's bookkeeping (what `len()` answers).
    pub host_live: usize,
    /// Tombstones by the host's bookkeeping (what decides the next purge or rehash).
    pub host_tombstones: usize,
}

impl Audit {
    /// Whether the device's counts agree with the host's books.
    pub fn agrees(&self) -> bool {
        self.device_live == self.host_live as u64
            && self.device_tombstones == self.host_tombstones as u64
    }
}

/// A batched u64 → `[u64; width]` table.
///
/// Keys and values are passed as structure-of-arrays slices: `keys[i]` goes with
/// `values[i * width .. (i + 1) * width]`.
///
/// # Semantics every backend meets exactly
///
/// a. **Every u64 is a valid key**, `0` and `u64::MAX` included. Sentinels a backend
///    uses internally are its own business.
///
/// b. **`put` inserts or overwrites.** If a key repeats within one batch, the last
///    occurrence wins, exactly as if the pairs were applied one at a time in order.
///    `delete` of a key repeated in the batch removes it once (and counts it once).
///    Insert–delete–insert cycles never leave two copies of a key and never lose one.
///
/// c. **Missing keys** in `get`/`contains` give `found = false`, and their value words
///    are written as `0`.
///
/// d. **Each batch is atomic with respect to other batches**: callers on several
///    threads see the result of some sequential order of whole batches.
///
/// e. **Bad input changes nothing.** A length or width mismatch, or a put that cannot
///    fit, returns an error and leaves the table exactly as it was. An empty batch is a
///    no-op.
///
/// f. **Growth.** A put is admitted when `len()` plus its new keys (distinct keys not yet
///    in the table) is at most `capacity()`, decided before anything changes: a batch of
///    overwrites always fits. Otherwise, with growth on, the table first rehashes into a
///    larger one (see [`plan_put`](crate::plan_put)); with growth off the put is refused
///    whole with [`Error::CapacityExceeded`]. Counting the new keys costs a lookup pass over
///    the batch, so it is only done for a batch that would not fit with every key counted
///    as new ([`prepare_put`](crate::prepare_put)).
///
/// g. **Device faults.** A put or delete that fails with [`Error::Device`] part-way (the
///    device or its driver failed while the batch ran) may have been applied in part:
///    some of its keys written or removed, and a key that repeats in the batch holding
///    value words of any of its occurrences. Nothing outside the batch changes, and
///    `len()` counts what was applied when the device can still report it.
///
/// h. **The hash seed.** A table hashes keys with a seed ([`TableConfig::seed`](crate::TableConfig::seed)): random per
///    table unless the config fixes one. Every backend uses the same seeded function, so
///    a fixed seed places every key in the same slot on every backend. No result depends
///    on the seed; only where keys sit, and so how long probes are, does. Keys chosen to
///    share one slot (for a known seed) cost time, never correctness: every operation
///    stays exact whatever the chains' length, on drivers that bound a shader's loops too.
///
/// Errors never come as panics.
///
/// Optional capabilities are methods with a default that answers
/// [`Error::Unsupported`]; a backend overrides the ones it offers.
///
/// # Example
///
/// Any backend is used the same way; here a tiny in-crate model stands in for one:
///
/// ```
/// use kv_core::{KvBackend, TableConfig};
/// # use kv_core::{Description, Result, check_put, check_get, check_contains};
/// # use std::{collections::HashMap, sync::Mutex};
/// # struct Model(Mutex<HashMap<u64, u64>>);
/// # impl KvBackend for Model {
/// #   fn width(&self) -> usize { 1 }
/// #   fn put(&self, k: &[u64], v: &[u64]) -> Result<()> { check_put(1, k, v)?; let mut m = self.0.lock().unwrap(); for (k, v) in k.iter().zip(v) { m.insert(*k, *v); } Ok(()) }
/// #   fn get(&self, k: &[u64], v: &mut [u64], f: &mut [bool]) -> Result<()> { check_get(1, k, v, f)?; let m = self.0.lock().unwrap(); for i in 0..k.len() { let r = m.get(&k[i]); f[i] = r.is_some(); v[i] = r.copied().unwrap_or(0); } Ok(()) }
/// #   fn delete(&self, k: &[u64]) -> Result<usize> { let mut m = self.0.lock().unwrap(); Ok(k.iter().filter(|k| m.remove(k).is_some()).count()) }
/// #   fn contains(&self, k: &[u64], f: &mut [bool]) -> Result<()> { check_contains(k, f)?; let m = self.0.lock().unwrap(); for i in 0..k.len() { f[i] = m.contains_key(&k[i]); } Ok(()) }
/// #   fn len(&self) -> usize { self.0.lock().unwrap().len() }
/// #   fn capacity(&self) -> usize { usize::MAX }
/// #   fn clear(&self) -> Result<()> { self.0.lock().unwrap().clear(); Ok(()) }
/// #   fn describe(&self) -> Description { Description { backend: "model", device: "host".into(), bytes_in_use: 0, slots: 0 } }
/// # }
/// # let table = Model(Mutex::new(HashMap::new()));
/// table.put(&[1, 2, u64::MAX, 2], &[10, 20, 30, 21])?;
/// let mut values = [0; 3];
/// let mut found = [false; 3];
/// table.get(&[2, 7, u64::MAX], &mut values, &mut found)?;
/// assert_eq!(values, [21, 0, 30]);
/// assert_eq!(found, [true, false, true]);
/// assert_eq!(table.delete(&[1, 1, 9])?, 1);
/// assert_eq!(table.len(), 2);
/// # Ok::<(), kv_core::Error>(())
/// ```
pub trait KvBackend: Send + Sync {
    /// Value width in u64 words, fixed when the table was created.
    fn width(&self) -> usize;

    /// Inserts or overwrites `keys.len()` pairs; `values.len()` must be `keys.len() * width()`.
    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()>;

    /// Looks `keys` up. Writes each key's value row into `values_out` (zeros when missing)
    /// and whether it was found into `found_out`.
    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()>;

    /// Removes `keys`; returns how many entries were removed (a repeated key counts once).
    fn delete(&self, keys: &[u64]) -> Result<usize>;

    /// Writes whether each key is present into `found_out`.
    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()>;

    /// Entries in the table, between whole batches (item d): never a count taken while a
    /// batch runs.
    fn len(&self) -> usize;

    /// Whether the table holds no entry.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries the table holds before it must grow (see semantics f).
    fn capacity(&self) -> usize;

    /// Removes every entry; capacity is kept. A batch of its own for item d: other threads
    /// see the table before or after it, never half cleared.
    fn clear(&self) -> Result<()>;

    /// Backend, device and memory use.
    fn describe(&self) -> Description;

    /// Optional: counts the live keys and tombstones in the table's key array (on the
    /// device, for a GPU backend) and returns them next to the host's bookkeeping of the
    /// same two numbers. A consistent table has [`Audit::agrees`]; a mismatch means the
    /// host's `len()` or its purge/growth decisions no longer describe the real table.
    ///
    /// It is a check for tests (the stress suite calls it after every step), not a fast
    /// path: it takes the table's write lock and reads the whole key array. The default
    /// answers [`Error::Unsupported`], for backends without such books.
    fn audit(&self) -> Result<Audit> {
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "audit",
        })
    }

    /// Optional (cache tables, [`crate::CacheConfig`]): puts `batch`, with its scores and
    /// times to live, and writes every entry it evicted into `evicted` (its first `m`
    /// entries, where `m` is the count returned). A put evicts an entry when a new key finds
    /// its bucket full, or turns the new key itself away when its score is the lowest;
    /// either way the entry is reported here. `evicted` must have room for one entry per
    /// key of the batch; bad input changes nothing. The default answers
    /// [`Error::Unsupported`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use kv_core::{CacheConfig, CachePolicy, CachePut, Evicted, KvBackend, ManualClock, TableConfig};
    /// # fn demo(open: impl Fn(TableConfig) -> kv_core::Result<Box<dyn KvBackend>>) -> kv_core::Result<()> {
    /// let t = open(TableConfig::new(32).cache(CacheConfig::new(CachePolicy::Custom)))?;
    /// let (mut k, mut v, mut s) = ([0u64; 2], [0u64; 2], [0u64; 2]);
    /// let mut ev = Evicted::new(&mut k, &mut v, &mut s);
    /// let n = t.put_and_evict(CachePut::new(&[1, 2], &[10, 20]).scores(&[5, 9]), &mut ev)?;
    /// assert_eq!(n, 0);
    /// # Ok(()) }
    /// ```
    fn put_and_evict(&self, batch: CachePut<'_>, evicted: &mut Evicted<'_>) -> Result<usize> {
        let _ = (batch, evicted);
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "cache tables (put_and_evict)",
        })
    }

    /// Optional (cache tables): [`put_and_evict`](Self::put_and_evict) without the report;
    /// returns how many entries it evicted. A plain [`put`](Self::put) on a cache table is
    /// this with no scores and no expiry.
    fn put_cached(&self, batch: CachePut<'_>) -> Result<usize> {
        let _ = batch;
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "cache tables (put_cached)",
        })
    }

    /// Optional (cache tables): [`get`](Self::get) without counting as an access, so that
    /// no score changes.
    fn peek(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        let _ = (keys, values_out, found_out);
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "cache tables (peek)",
        })
    }

    /// Optional (cache tables): removes `keys` and returns what they held: each row (zeros
    /// when missing), whether it was there, and when it expires (0: never). A get and a
    /// delete in one batch that counts no access: what a tiered store moves entries between
    /// tiers with. Returns how many entries it removed (a repeated key counts once; its
    /// later occurrences find nothing).
    fn take(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
        expires_out: &mut [u64],
    ) -> Result<usize> {
        let _ = (keys, values_out, found_out, expires_out);
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "cache tables (take)",
        })
    }

    /// Optional (cache tables): the bucket `key` lives in, the place an eviction of it was
    /// chosen from (contract: an evicted entry had a score no higher than every entry that
    /// stayed in its bucket).
    fn eviction_scope(&self, key: u64) -> Result<u64> {
        let _ = key;
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "cache tables (eviction_scope)",
        })
    }

    /// Optional (cache tables): the table's eviction policy.
    fn cache_policy(&self) -> Result<crate::CachePolicy> {
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "cache tables (cache_policy)",
        })
    }

    /// Optional (cache tables): the table's running counts.
    fn cache_stats(&self) -> Result<CacheStats> {
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "cache tables (cache_stats)",
        })
    }

    /// Optional (snapshots): every live entry, copied out at one point in time.
    ///
    /// The backend copies its table out under one hold of its lock (for a GPU backend, a
    /// device-to-host copy of the table in chunks) and lets the lock go before it decodes
    /// the copy: other batches wait no longer than the copy, and the image holds each
    /// batch whole or not at all (item d). A cache table's image holds each entry's score
    /// and expiry time, and leaves out entries that have expired. The default answers
    /// [`Error::Unsupported`].
    ///
    /// ```
    /// use kv_core::{KvBackend, TableConfig};
    /// # fn demo(open: impl Fn(TableConfig) -> kv_core::Result<Box<dyn KvBackend>>) -> kv_core::Result<()> {
    /// let a = open(TableConfig::new(100))?;
    /// a.put(&[1, 2], &[10, 20])?;
    /// let image = a.export()?;
    /// let b = open(TableConfig::new(100))?;
    /// for part in image.parts(1 << 20) {
    ///     b.restore(part)?;
    /// }
    /// assert_eq!(b.len(), 2);
    /// # Ok(()) }
    /// ```
    fn export(&self) -> Result<TableImage> {
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "export (snapshots)",
        })
    }

    /// Puts the entries of an image back (snapshots): keys and rows, and on a cache table
    /// each entry's score and expiry time as they were (an entry whose expiry time has
    /// passed is left out), with an LRU table's clock moved to at least the image's. On a
    /// table that is not a cache table this is a [`put`](Self::put) of the keys and rows,
    /// which is what the default does; it refuses scores and expiry times there.
    fn restore(&self, part: ImagePart<'_>) -> Result<()> {
        part.check(self.width())?;
        if part.scores.is_some() || part.expires.is_some() {
            return Err(Error::Unsupported {
                backend: self.describe().backend,
                what: "restoring a cache table's image",
            });
        }
        self.put(part.keys, part.values)
    }
}

/// Checks the argument lengths of a put; every backend calls it first.
pub fn check_put(width: usize, keys: &[u64], values: &[u64]) -> Result<()> {
    check_put_len(width, keys.len(), values.len())
}

/// Checks the argument lengths of a get.
pub fn check_get(width: usize, keys: &[u64], values_out: &[u64], found_out: &[bool]) -> Result<()> {
    check_get_len(width, keys.len(), values_out.len(), found_out.len())
}

/// Checks the argument lengths of a take ([`KvBackend::take`]): those of a get, and one
/// expiry time per key.
///
/// ```
/// use kv_core::{Error, check_take};
/// assert!(check_take(2, &[1], &mut [0, 0], &mut [false], &mut [0]).is_ok());
/// assert!(matches!(
///     check_take(2, &[1], &mut [0, 0], &mut [false], &mut []),
///     Err(Error::LengthMismatch { what: "expires_out", .. })
/// ));
/// ```
pub fn check_take(
    width: usize,
    keys: &[u64],
    values_out: &[u64],
    found_out: &[bool],
    expires_out: &[u64],
) -> Result<()> {
    check_get(width, keys, values_out, found_out)?;
    if expires_out.len() != keys.len() {
        return Err(Error::LengthMismatch {
            what: "expires_out",
            expected: keys.len(),
            got: expires_out.len(),
        });
    }
    Ok(())
}

/// Checks the argument lengths of a contains.
pub fn check_contains(keys: &[u64], found_out: &[bool]) -> Result<()> {
    check_found("found_out", keys.len(), found_out.len())
}

/// [`check_put`] by lengths: `keys` keys and `values` value words, for batches a backend
/// knows only by their lengths (device-resident ones, say).
///
/// ```
/// use kv_core::{Error, check_put_len};
/// assert!(check_put_len(2, 3, 6).is_ok());
/// assert!(matches!(check_put_len(2, 3, 4), Err(Error::LengthMismatch { .. })));
/// assert!(matches!(check_put_len(2, 3, 5), Err(Error::WidthMismatch { .. })));
/// ```
pub fn check_put_len(width: usize, keys: usize, values: usize) -> Result<()> {
    check_rows("values", width, keys, values)
}

/// [`check_get`] by lengths: `keys` keys, `values_out` value words and `found_out` flags.
pub fn check_get_len(width: usize, keys: usize, values_out: usize, found_out: usize) -> Result<()> {
    check_rows("values_out", width, keys, values_out)?;
    check_found("found_out", keys, found_out)
}

fn check_found(what: &'static str, keys: usize, found: usize) -> Result<()> {
    if found != keys {
        return Err(Error::LengthMismatch {
            what,
            expected: keys,
            got: found,
        });
    }
    Ok(())
}

fn check_rows(what: &'static str, width: usize, keys: usize, len: usize) -> Result<()> {
    if !len.is_multiple_of(width) {
        return Err(Error::WidthMismatch { what, width, len });
    }
    let expected = keys.saturating_mul(width);
    if len != expected {
        return Err(Error::LengthMismatch {
            what,
            expected,
            got: len,
        });
    }
    Ok(())
}
