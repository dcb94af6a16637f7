//! Cache tables on the CPU ([`CpuCache`]): buckets of [`CACHE_BUCKET_SLOTS`] slots, each
//! key only in its home bucket (`kv_kernels::layout::cache_bucket`), the lowest score
//! evicted when a new key finds its bucket full (docs/cache.md).
//!
//! A batch is applied shard by shard: the buckets are cut into shards, the batch's items
//! are partitioned (stably) by the shard of their home bucket, and the shards run on all
//! cores, each applying its items in batch order. Every bucket therefore sees its keys
//! exactly as a sequential loop over the batch would, so the last occurrence of a key wins
//! and every eviction is the one the sequential rule picks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use kv_core::{
    CACHE_BUCKET_SLOTS, CacheConfig, CachePolicy, CachePut, CacheStats, Description, Error,
    Evicted, ImagePart, KvBackend, Result, TableConfig, TableImage, cache_buckets,
    cache_slot_bytes, check_contains, check_get, check_take,
};
use kv_kernels::layout::cache_bucket;
use rayon::prelude::*;

const B: usize = CACHE_BUCKET_SLOTS;

/// One bucket's keys, scores and expiry times; its rows live in the table's row array.
#[derive(Clone)]
struct Bucket {
    /// Bit `j` set: slot `j` holds an entry (perhaps an expired one).
    used: u32,
    keys: [u64; B],
    scores: [u64; B],
    /// When the entry expires, in the clock's milliseconds; 0: never.
    expires: [u64; B],
}

impl Default for Bucket {
    fn default() -> Self {
        Self {
            used: 0,
            keys: [0; B],
            scores: [0; B],
            expires: [0; B],
        }
    }
}

const _: () = assert!(B == 32, "the used mask is a u32");

impl Bucket {
    fn expired(&self, j: usize, now: u64) -> bool {
        self.expires[j] != 0 && self.expires[j] <= now
    }
    fn live(&self, j: usize, now: u64) -> bool {
        self.used & (1 << j) != 0 && !self.expired(j, now)
    }
    /// The slot of `key` if it holds a live entry.
    fn find(&self, key: u64, now: u64) -> Option<usize> {
        (0..B).find(|&j| self.keys[j] == key && self.live(j, now))
    }
    fn live_count(&self, now: u64) -> usize {
        (0..B).filter(|&j| self.live(j, now)).count()
    }
    /// The slot a full bucket evicts: the lowest score, ties to the lowest slot (the
    /// contract's rule, for puts and restores alike).
    fn victim(&self) -> usize {
        (0..B)
            .min_by_key(|&j| (self.scores[j], j))
            .expect("a bucket has slots")
    }
}

/// Refuses batches whose item indices do not fit the u32 the bucket sort keeps them in.
fn check_batch_len(n: usize) -> Result<()> {
    if n > u32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "a cache-table batch holds at most {} keys, this one {n}",
            u32::MAX
        )));
    }
    Ok(())
}

/// The memory the host can still give, where the system says (`MemAvailable` of
/// `/proc/meminfo` on Linux); `None` elsewhere.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What one shard of a batch changed, summed over shards afterwards.
#[derive(Default)]
struct Delta {
    /// (key, score, offset of its row in `evicted_rows`, expiry time).
    evicted: Vec<(u64, u64, usize, u64)>,
    evicted_rows: Vec<u64>,
    evicted_count: u64,
    expired_reused: u64,
    hits: u64,
    misses: u64,
    removed: usize,
}

struct State {
    buckets: Vec<Bucket>,
    rows: Vec<u64>,
    /// The logical clock: put and get batches so far.
    clock: u64,
    stats: CacheStats,
}

/// A cache table in host memory: a fixed number of buckets, an eviction policy, expiry.
/// Opened through `vramkv::open` with a [`TableConfig::cache`] config, or directly.
///
/// ```
/// use std::sync::Arc;
/// use kv_backend_cpu::CpuCache;
/// use kv_core::{CacheConfig, CachePolicy, CachePut, KvBackend, ManualClock, TableConfig};
///
/// let clock = Arc::new(ManualClock::new(0));
/// let cfg = TableConfig::new(64).cache(CacheConfig::new(CachePolicy::Lru).clock(clock.clone()));
/// let t = CpuCache::open(cfg)?;
/// // Key 7 lives for 100 ms; key 8 until it is evicted or deleted.
/// t.put_cached(CachePut::new(&[7, 8], &[70, 80]).ttl_ms(&[100, 0]))?;
/// assert_eq!(t.len(), 2);
/// clock.advance(100);
/// let (mut v, mut f) = ([0u64; 2], [false; 2]);
/// t.get(&[7, 8], &mut v, &mut f)?;
/// assert_eq!((v, f), ([0, 80], [false, true]));
/// assert_eq!(t.len(), 1);
/// # Ok::<(), kv_core::Error>(())
/// ```
pub struct CpuCache {
    width: usize,
    seed: u64,
    cache: CacheConfig,
    state: RwLock<State>,
}

impl CpuCache {
    /// Opens a cache table; `cfg.cache` must be set.
    pub fn open(cfg: TableConfig) -> Result<Self> {
        cfg.validate()?;
        cfg.device_among(1, "cpu")?;
        let Some(cache) = cfg.cache.clone() else {
            return Err(Error::InvalidConfig(
                "CpuCache::open needs a cache config (TableConfig::cache)".into(),
            ));
        };
        let nb = cache_buckets(cfg.capacity);
        let bytes = (nb * B * cache_slot_bytes(cfg.width)) as u64;
        // A budget past the memory the host has is refused here, not found out by the
        // kernel's out-of-memory killer when the pages are first touched.
        if let Some(avail) = available_memory()
            && bytes > avail
        {
            return Err(Error::OutOfDeviceMemory {
                backend: "cpu",
                requested_bytes: bytes,
            });
        }
        let mut buckets = Vec::new();
        let mut rows = Vec::new();
        let oom = |_| Error::OutOfDeviceMemory {
            backend: "cpu",
            requested_bytes: bytes,
        };
        buckets.try_reserve_exact(nb).map_err(oom)?;
        rows.try_reserve_exact(nb * B * cfg.width).map_err(oom)?;
        crate::part::advise_huge_pages(&buckets);
        crate::part::advise_huge_pages(&rows);
        buckets.resize(nb, Bucket::default());
        rows.resize(nb * B * cfg.width, 0);
        Ok(Self {
            width: cfg.width,
            seed: cfg.table_seed(),
            cache,
            state: RwLock::new(State {
                buckets,
                rows,
                clock: 0,
                stats: CacheStats::default(),
            }),
        })
    }

    /// The table's eviction policy.
    pub fn policy(&self) -> CachePolicy {
        self.cache.policy
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bucket_of(&self, key: u64, buckets: usize) -> usize {
        cache_bucket(key, self.seed, buckets as u64) as usize
    }

    /// Runs `f` over the batch's items, `f(bucket index, bucket, rows of the bucket, item,
    /// delta)`: the buckets are cut into shards, each shard on a core of its
    /// own, and a shard's items (a stable counting partition of the batch) run in batch
    /// order, so that each bucket sees its items in batch order.
    fn by_bucket<F>(&self, st: &mut State, keys: &[u64], f: F) -> Delta
    where
        F: Fn(usize, &mut Bucket, &mut [u64], u32, &mut Delta) + Sync,
    {
        /// Items ahead whose buckets are fetched while an item runs.
        const AHEAD: usize = 8;
        let nb = st.buckets.len();
        let w = self.width;
        let home: Vec<u32> = keys
            .par_iter()
            .map(|&k| self.bucket_of(k, nb) as u32)
            .collect();
        let shards = (rayon::current_num_threads() * 8).clamp(1, nb);
        let per = nb.div_ceil(shards);
        let (order, bounds) =
            kv_core::par::partition(keys.len(), nb.div_ceil(per), |i| home[i] as usize / per);
        let (order, bounds, home, f) = (&order, &bounds, &home, &f);
        st.buckets
            .par_chunks_mut(per)
            .zip(st.rows.par_chunks_mut(per * B * w))
            .enumerate()
            .map(|(s, (buckets, rows))| {
                let lo = s * per;
                let items = &order[bounds[s]..bounds[s + 1]];
                let mut d = Delta::default();
                for (j, &i) in items.iter().enumerate() {
                    if let Some(&next) = items.get(j + AHEAD) {
                        let bucket = &buckets[home[next as usize] as usize - lo];
                        for line in 0..B / 8 {
                            crate::part::prefetch(&bucket.keys[line * 8]);
                        }
                    }
                    let local = home[i as usize] as usize - lo;
                    f(
                        lo + local,
                        &mut buckets[local],
                        &mut rows[local * B * w..(local + 1) * B * w],
                        i,
                        &mut d,
                    );
                }
                d
            })
            .reduce(Delta::default, |mut a, b| {
                // b's row offsets count from the start of b's rows.
                let base = a.evicted_rows.len();
                a.evicted.extend(
                    b.evicted
                        .into_iter()
                        .map(|(k, s, r, e)| (k, s, r + base, e)),
                );
                a.evicted_rows.extend(b.evicted_rows);
                a.evicted_count += b.evicted_count;
                a.expired_reused += b.expired_reused;
                a.hits += b.hits;
                a.misses += b.misses;
                a.removed += b.removed;
                a
            })
    }

    /// The put of every cache put: applies `batch`, returns what it evicted (collected only
    /// when `report`).
    fn apply_put(&self, batch: CachePut<'_>, report: bool) -> Result<Delta> {
        batch.check(self.width, self.cache.policy)?;
        let n = batch.keys.len();
        check_batch_len(n)?;
        let mut st = self.write();
        if n == 0 {
            return Ok(Delta::default());
        }
        let now = self.cache.clock.now_ms();
        st.clock += 1;
        let clock = st.clock;
        let (w, policy) = (self.width, self.cache.policy);
        let d = self.by_bucket(&mut st, batch.keys, |_, bucket, rows, i, d| {
            let i = i as usize;
            let key = batch.keys[i];
            let row = &batch.values[i * w..(i + 1) * w];
            let ttl = batch.ttl_ms.map_or(0, |t| t[i]);
            let expires = if ttl == 0 {
                0
            } else {
                now.saturating_add(ttl).max(1)
            };
            let given = batch.scores.map_or(0, |s| s[i]);
            // Expired entries leave their bucket as soon as a put touches it, so that
            // no old copy of a key outlives a newer one.
            for j in 0..B {
                if bucket.used & (1 << j) != 0 && bucket.expired(j, now) {
                    bucket.used &= !(1 << j);
                    d.expired_reused += 1;
                }
            }
            if let Some(j) = bucket.find(key, now) {
                bucket.scores[j] = match policy {
                    CachePolicy::Lru => clock,
                    CachePolicy::Lfu => bucket.scores[j].saturating_add(1),
                    CachePolicy::Custom => given,
                };
                bucket.expires[j] = expires;
                rows[j * w..(j + 1) * w].copy_from_slice(row);
                return;
            }
            let score = match policy {
                CachePolicy::Lru => clock,
                CachePolicy::Lfu => 1,
                CachePolicy::Custom => given,
            };
            let free = (0..B).find(|&j| bucket.used & (1 << j) == 0);
            let j = match free {
                Some(j) => j,
                None => {
                    // Full: the lowest score leaves, the new key itself if its score is
                    // lower still (ties go against the entry already there).
                    let v = bucket.victim();
                    d.evicted_count += 1;
                    if score < bucket.scores[v] {
                        if report {
                            d.evicted.push((key, score, d.evicted_rows.len(), expires));
                            d.evicted_rows.extend_from_slice(row);
                        }
                        return;
                    }
                    if report {
                        d.evicted.push((
                            bucket.keys[v],
                            bucket.scores[v],
                            d.evicted_rows.len(),
                            bucket.expires[v],
                        ));
                        d.evicted_rows.extend_from_slice(&rows[v * w..(v + 1) * w]);
                    }
                    v
                }
            };
            bucket.used |= 1 << j;
            bucket.keys[j] = key;
            bucket.scores[j] = score;
            bucket.expires[j] = expires;
            rows[j * w..(j + 1) * w].copy_from_slice(row);
        });
        st.stats.evicted += d.evicted_count;
        st.stats.expired_reused += d.expired_reused;
        st.stats.clock = st.clock;
        Ok(d)
    }

    fn lookup(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
        access: bool,
    ) -> Result<()> {
        check_get(self.width, keys, values_out, found_out)?;
        check_batch_len(keys.len())?;
        let w = self.width;
        if !access {
            let st = self.read();
            let now = self.cache.clock.now_ms();
            let nb = st.buckets.len();
            values_out
                .par_chunks_mut(w)
                .zip(found_out.par_iter_mut())
                .zip(keys.par_iter())
                .for_each(|((v, f), &k)| {
                    let b = self.bucket_of(k, nb);
                    match st.buckets[b].find(k, now) {
                        Some(j) => {
                            let at = (b * B + j) * w;
                            v.copy_from_slice(&st.rows[at..at + w]);
                            *f = true;
                        }
                        None => {
                            v.fill(0);
                            *f = false;
                        }
                    }
                });
            return Ok(());
        }
        let mut st = self.write();
        if keys.is_empty() {
            return Ok(());
        }
        let now = self.cache.clock.now_ms();
        st.clock += 1;
        let (clock, policy) = (st.clock, self.cache.policy);
        // Each item's slot, found by its bucket's shard (u64::MAX: a miss).
        let slot_of: Vec<AtomicU64> = (0..keys.len()).map(|_| AtomicU64::new(u64::MAX)).collect();
        let d = self.by_bucket(&mut st, keys, |b, bucket, _rows, i, d| {
            match bucket.find(keys[i as usize], now) {
                Some(j) => {
                    match policy {
                        CachePolicy::Lru => bucket.scores[j] = clock,
                        CachePolicy::Lfu => bucket.scores[j] = bucket.scores[j].saturating_add(1),
                        CachePolicy::Custom => {}
                    }
                    d.hits += 1;
                    slot_of[i as usize].store((b * B + j) as u64, Ordering::Relaxed);
                }
                None => d.misses += 1,
            }
        });
        st.stats.hits += d.hits;
        st.stats.misses += d.misses;
        st.stats.clock = st.clock;
        let rows = &st.rows;
        values_out
            .par_chunks_mut(w)
            .zip(found_out.par_iter_mut())
            .zip(slot_of.par_iter())
            .for_each(|((v, f), slot)| match slot.load(Ordering::Relaxed) {
                u64::MAX => {
                    v.fill(0);
                    *f = false;
                }
                s => {
                    let at = s as usize * w;
                    v.copy_from_slice(&rows[at..at + w]);
                    *f = true;
                }
            });
        Ok(())
    }
}

impl KvBackend for CpuCache {
    fn width(&self) -> usize {
        self.width
    }

    /// A put with no scores (0 under [`CachePolicy::Custom`]) and no expiry, evicting
    /// silently.
    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        let scores;
        let mut batch = CachePut::new(keys, values);
        if self.cache.policy == CachePolicy::Custom {
            scores = vec![0u64; keys.len()];
            batch = batch.scores(&scores);
        }
        self.apply_put(batch, false).map(|_| ())
    }

    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        self.lookup(keys, values_out, found_out, true)
    }

    fn delete(&self, keys: &[u64]) -> Result<usize> {
        check_batch_len(keys.len())?;
        let mut st = self.write();
        if keys.is_empty() {
            return Ok(0);
        }
        let now = self.cache.clock.now_ms();
        let d = self.by_bucket(&mut st, keys, |_, bucket, _rows, i, d| {
            if let Some(j) = bucket.find(keys[i as usize], now) {
                bucket.used &= !(1 << j);
                d.removed += 1;
            }
        });
        Ok(d.removed)
    }

    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_contains(keys, found_out)?;
        let st = self.read();
        let now = self.cache.clock.now_ms();
        let nb = st.buckets.len();
        found_out
            .par_iter_mut()
            .zip(keys.par_iter())
            .for_each(|(f, &k)| *f = st.buckets[self.bucket_of(k, nb)].find(k, now).is_some());
        Ok(())
    }

    /// Live entries: a count over every bucket (expired entries leave it as time passes).
    fn len(&self) -> usize {
        let now = self.cache.clock.now_ms();
        self.read()
            .buckets
            .par_iter()
            .map(|b| b.live_count(now))
            .sum()
    }

    fn capacity(&self) -> usize {
        self.read().buckets.len() * B
    }

    fn clear(&self) -> Result<()> {
        let mut st = self.write();
        st.buckets.par_iter_mut().for_each(|b| b.used = 0);
        Ok(())
    }

    fn describe(&self) -> Description {
        let slots = self.read().buckets.len() * B;
        Description {
            backend: "cpu",
            device: "host CPU".into(),
            bytes_in_use: (slots * cache_slot_bytes(self.width)) as u64,
            slots,
        }
    }

    fn put_and_evict(&self, batch: CachePut<'_>, evicted: &mut Evicted<'_>) -> Result<usize> {
        evicted.check(batch.keys.len(), self.width)?;
        let d = self.apply_put(batch, true)?;
        let w = self.width;
        for (e, &(key, score, row, expires)) in d.evicted.iter().enumerate() {
            evicted.keys[e] = key;
            evicted.scores[e] = score;
            if let Some(x) = evicted.expires_ms.as_deref_mut() {
                x[e] = expires;
            }
            evicted.values[e * w..(e + 1) * w].copy_from_slice(&d.evicted_rows[row..row + w]);
        }
        Ok(d.evicted.len())
    }

    fn put_cached(&self, batch: CachePut<'_>) -> Result<usize> {
        self.apply_put(batch, false)
            .map(|d| d.evicted_count as usize)
    }

    fn peek(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        self.lookup(keys, values_out, found_out, false)
    }

    fn take(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
        expires_out: &mut [u64],
    ) -> Result<usize> {
        check_take(self.width, keys, values_out, found_out, expires_out)?;
        check_batch_len(keys.len())?;
        let w = self.width;
        let mut st = self.write();
        if keys.is_empty() {
            return Ok(0);
        }
        let now = self.cache.clock.now_ms();
        let slot_of: Vec<AtomicU64> = (0..keys.len()).map(|_| AtomicU64::new(u64::MAX)).collect();
        let expires: Vec<AtomicU64> = (0..keys.len()).map(|_| AtomicU64::new(0)).collect();
        let d = self.by_bucket(&mut st, keys, |b, bucket, _rows, i, d| {
            if let Some(j) = bucket.find(keys[i as usize], now) {
                // The row stays in place until a later batch reuses the slot.
                bucket.used &= !(1 << j);
                slot_of[i as usize].store((b * B + j) as u64, Ordering::Relaxed);
                expires[i as usize].store(bucket.expires[j], Ordering::Relaxed);
                d.removed += 1;
            }
        });
        let rows = &st.rows;
        values_out
            .par_chunks_mut(w)
            .zip(found_out.par_iter_mut())
            .zip(expires_out.par_iter_mut())
            .zip(slot_of.par_iter().zip(expires.par_iter()))
            .for_each(
                |(((v, f), x), (slot, e))| match slot.load(Ordering::Relaxed) {
                    u64::MAX => {
                        v.fill(0);
                        *f = false;
                        *x = 0;
                    }
                    s => {
                        let at = s as usize * w;
                        v.copy_from_slice(&rows[at..at + w]);
                        *f = true;
                        *x = e.load(Ordering::Relaxed);
                    }
                },
            );
        Ok(d.removed)
    }

    fn eviction_scope(&self, key: u64) -> Result<u64> {
        Ok(self.bucket_of(key, self.read().buckets.len()) as u64)
    }

    fn cache_policy(&self) -> Result<CachePolicy> {
        Ok(self.cache.policy)
    }

    fn export(&self) -> Result<TableImage> {
        let w = self.width;
        let now = self.cache.clock.now_ms();
        let st = self.read();
        let mut img = TableImage::new_cache(w, st.clock);
        for (b, bucket) in st.buckets.iter().enumerate() {
            for j in (0..B).filter(|&j| bucket.live(j, now)) {
                let at = (b * B + j) * w;
                img.push(
                    bucket.keys[j],
                    &st.rows[at..at + w],
                    Some((bucket.scores[j], bucket.expires[j])),
                );
            }
        }
        Ok(img)
    }

    fn restore(&self, part: ImagePart<'_>) -> Result<()> {
        part.check(self.width)?;
        check_batch_len(part.keys.len())?;
        let now = self.cache.clock.now_ms();
        let w = self.width;
        let mut st = self.write();
        // Restored entries keep their scores whatever the policy, and their absolute expiry
        // times; one whose time has passed stays out. A bucket that is full (an image
        // restored into a smaller table) evicts its lowest score, as a put does.
        let d = self.by_bucket(&mut st, part.keys, |_, bucket, rows, i, d| {
            let i = i as usize;
            let key = part.keys[i];
            let score = part.scores.map_or(0, |s| s[i]);
            let expires = part.expires.map_or(0, |e| e[i]);
            if expires != 0 && expires <= now {
                return;
            }
            let row = &part.values[i * w..(i + 1) * w];
            let j = match bucket.find(key, now) {
                Some(j) => j,
                None => match (0..B).find(|&j| !bucket.live(j, now)) {
                    Some(j) => j,
                    None => {
                        let v = bucket.victim();
                        d.evicted_count += 1;
                        if score < bucket.scores[v] {
                            return;
                        }
                        v
                    }
                },
            };
            bucket.used |= 1 << j;
            bucket.keys[j] = key;
            bucket.scores[j] = score;
            bucket.expires[j] = expires;
            rows[j * w..(j + 1) * w].copy_from_slice(row);
        });
        st.stats.evicted += d.evicted_count;
        st.clock = st.clock.max(part.clock);
        st.stats.clock = st.clock;
        Ok(())
    }

    fn cache_stats(&self) -> Result<CacheStats> {
        Ok(self.read().stats)
    }
}
