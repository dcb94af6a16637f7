//! [`Tiered`]: a cache table over a cache table, the upper one in VRAM when a GPU backend
//! (CUDA, or wgpu) runs here, the lower one in host RAM: the CPU as the manager of what stays
//! resident in VRAM (docs/cache.md, "Tiers").
//!
//! - A put writes to the upper tier. What the upper tier evicts moves down to the lower
//!   tier in the same batch; what the lower tier then evicts leaves the store, and
//!   [`KvBackend::put_and_evict`] reports it.
//! - A get looks in the upper tier first, then looks the misses up in the lower tier in one
//!   batch. Hits there are returned and promoted into the upper tier (taken out of the lower
//!   one, with their time to live), and what they displace moves down.
//! - Every key lives in at most one tier, so `len()` and `delete` count each once.
//! - One batch at a time runs across both tiers (contract item d).
//!
//! LFU counts restart when an entry changes tier; times to live move with it.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kv_core::{
    CacheConfig, CachePolicy, CachePut, CacheStats, Clock, Description, Error, Evicted, KvBackend,
    Result, TableConfig, check_cache_batch, check_contains, check_get,
};

use kv_core::par::Scatter;
use rayon::prelude::*;

use crate::{BackendKind, Options};

/// Entries that left the store: keys, rows, scores and expiry times.
type Gone = (Vec<u64>, Vec<u64>, Vec<u64>, Vec<u64>);

/// A tiered store's counts since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Gets answered by the upper tier.
    pub upper_hits: u64,
    /// Gets answered by the lower tier (each then promoted).
    pub lower_hits: u64,
    /// Gets that found their key in neither tier.
    pub misses: u64,
    /// Entries moved up by gets.
    pub promotions: u64,
    /// Entries moved down from the upper tier.
    pub demotions: u64,
    /// Entries that left the store (evicted from the lower tier).
    pub evictions: u64,
    /// Time the store's batches spent in the upper tier's calls.
    pub upper_time: Duration,
    /// Time the store's batches spent in the lower tier's calls.
    pub lower_time: Duration,
    /// Time the store's batches spent between the tiers' calls: finding the misses,
    /// choosing what moves, and copying it.
    pub manager_time: Duration,
}

impl TierStats {
    /// Runs `f`, one call into the upper tier, and adds its time to `upper_time`.
    fn upper<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.upper_time += t.elapsed();
        r
    }

    /// Runs `f`, one call into the lower tier, and adds its time to `lower_time`.
    fn lower<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.lower_time += t.elapsed();
        r
    }
}

/// One batch's hold on the store: the gate's guard, whose drop adds the batch's time outside
/// the tiers' calls to `manager_time`.
struct Batch<'a> {
    stats: MutexGuard<'a, TierStats>,
    start: Instant,
    tiers: Duration,
}

impl Deref for Batch<'_> {
    type Target = TierStats;
    fn deref(&self) -> &TierStats {
        &self.stats
    }
}

impl DerefMut for Batch<'_> {
    fn deref_mut(&mut self) -> &mut TierStats {
        &mut self.stats
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        let tiers = self.stats.upper_time + self.stats.lower_time - self.tiers;
        let manager = self.start.elapsed().saturating_sub(tiers);
        self.stats.manager_time += manager;
    }
}

/// How a tiered store is made: one policy and clock for both tiers, and a budget each.
#[derive(Debug, Clone)]
pub struct TieredConfig {
    /// Value width in u64 words.
    pub width: usize,
    /// The policy of both tiers: [`CachePolicy::Lru`] or [`CachePolicy::Lfu`].
    pub cache: CacheConfig,
    /// Bytes the upper tier's slots may take.
    pub upper_bytes: u64,
    /// Bytes the lower tier's slots may take.
    pub lower_bytes: u64,
    /// The hash seed of both tiers (`None`: a random one each).
    pub seed: Option<u64>,
}

/// A cache table over a cache table; see the module docs.
///
/// ```
/// use std::sync::Arc;
/// use vramkv::{CacheConfig, CachePolicy, KvBackend, ManualClock, Options, Tiered, TieredConfig};
///
/// let cfg = TieredConfig {
///     width: 1,
///     cache: CacheConfig::new(CachePolicy::Lru).clock(Arc::new(ManualClock::new(0))),
///     upper_bytes: 64 * 33, // 64 slots of one word: two buckets
///     lower_bytes: 1 << 20,
///     seed: Some(7),
/// };
/// let store = Tiered::open(cfg, &Options::default())?;
/// let keys: Vec<u64> = (0..1000).collect();
/// store.put(&keys, &keys)?; // most of them move down to host RAM
/// let (mut v, mut f) = (vec![0; 1000], vec![false; 1000]);
/// store.get(&keys, &mut v, &mut f)?;
/// assert!(f.iter().all(|f| *f) && v == keys);
/// let s = store.stats();
/// assert_eq!(s.upper_hits + s.lower_hits, 1000);
/// assert_eq!(store.len(), 1000);
/// # Ok::<(), vramkv::Error>(())
/// ```
pub struct Tiered {
    upper: Box<dyn KvBackend>,
    lower: Box<dyn KvBackend>,
    clock: Arc<dyn Clock>,
    width: usize,
    stats: Mutex<TierStats>,
}

impl Tiered {
    /// Opens a tiered store: the upper tier on the backend `options` pick for a cache table
    /// (CUDA when it runs here, then wgpu on a discrete GPU, else the CPU; a backend that
    /// `options` force, with no fallback; [`upper`](Self::upper)`.describe()` says which),
    /// the lower tier on the CPU.
    pub fn open(cfg: TieredConfig, options: &Options) -> Result<Self> {
        let table = |bytes| {
            let mut t = TableConfig::default()
                .width(cfg.width)
                .cache_budget(bytes, cfg.cache.clone());
            t.seed = cfg.seed;
            t
        };
        let upper = crate::open_with(table(cfg.upper_bytes), options)?;
        let lower = crate::open_with(
            table(cfg.lower_bytes),
            &Options::default().backend(BackendKind::Cpu),
        )?;
        Self::new(
            Box::new(upper),
            Box::new(lower),
            cfg.cache.policy,
            cfg.cache.clock.clone(),
        )
    }

    /// A tiered store over two cache tables of one width, policy `policy` and clock `clock`
    /// (the clock both tables read).
    pub fn new(
        upper: Box<dyn KvBackend>,
        lower: Box<dyn KvBackend>,
        policy: CachePolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        if policy == CachePolicy::Custom {
            return Err(Error::InvalidConfig(
                "a tiered store moves entries between tiers without their scores, so it takes \
                 CachePolicy::Lru or Lfu"
                    .into(),
            ));
        }
        if upper.width() != lower.width() {
            return Err(Error::InvalidConfig(format!(
                "the tiers' widths differ: {} above, {} below",
                upper.width(),
                lower.width()
            )));
        }
        for (t, which) in [(&upper, "upper"), (&lower, "lower")] {
            match t.cache_policy() {
                Ok(p) if p == policy => {}
                Ok(p) => {
                    return Err(Error::InvalidConfig(format!(
                        "the {which} tier's policy is {p:?}, the store's {policy:?}"
                    )));
                }
                Err(_) => {
                    return Err(Error::InvalidConfig(format!(
                        "the {which} tier is not a cache table"
                    )));
                }
            }
        }
        Ok(Self {
            width: upper.width(),
            upper,
            lower,
            clock,
            stats: Mutex::new(TierStats::default()),
        })
    }

    /// The counts and times since the store opened.
    pub fn stats(&self) -> TierStats {
        *self.counts()
    }

    /// The upper tier, for inspection (`describe`, `contains`, `cache_stats`). Writing
    /// through it bypasses the store: its batches would not be whole across the tiers, and
    /// a key could end up in both.
    pub fn upper(&self) -> &dyn KvBackend {
        &*self.upper
    }

    /// The lower tier, for inspection (see [`upper`](Self::upper)).
    pub fn lower(&self) -> &dyn KvBackend {
        &*self.lower
    }

    /// The counts, for reading.
    fn counts(&self) -> MutexGuard<'_, TierStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One batch at a time across both tiers; the guard holds the counts and times the
    /// batch.
    fn gate(&self) -> Batch<'_> {
        let stats = self.counts();
        let tiers = stats.upper_time + stats.lower_time;
        Batch {
            stats,
            start: Instant::now(),
            tiers,
        }
    }

    /// Moves the upper tier's evictions `(keys, rows, expiry times)` down; returns what
    /// the lower tier evicted, in the same form. Entries whose time has come are dropped,
    /// not moved; the others keep their expiry time exactly (the time to live given below
    /// is what is left of it). If the lower tier fails, the entries it could not take are
    /// returned as gone, so that they are reported or counted, never lost silently.
    fn demote(&self, keys: &[u64], rows: &[u64], expires: &[u64], stats: &mut TierStats) -> Gone {
        let w = self.width;
        let now = self.clock.now_ms();
        let live: Vec<u32> = (0..keys.len() as u32)
            .into_par_iter()
            .filter(|&j| expires[j as usize] == 0 || expires[j as usize] > now)
            .collect();
        let dk = gather(keys, &live, 1);
        let dv = gather(rows, &live, w);
        let dt: Vec<u64> = live
            .par_iter()
            .map(|&j| match expires[j as usize] {
                0 => 0,
                e => e - now,
            })
            .collect();
        let n = dk.len();
        if n == 0 {
            return Default::default();
        }
        let (mut k, mut v, mut s, mut x) = (vec![0; n], vec![0; n * w], vec![0; n], vec![0; n]);
        let mut out = Evicted::new(&mut k, &mut v, &mut s).expires(&mut x);
        let gone = match stats.lower(|| {
            self.lower
                .put_and_evict(CachePut::new(&dk, &dv).ttl_ms(&dt), &mut out)
        }) {
            Ok(m) => {
                k.truncate(m);
                v.truncate(m * w);
                s.truncate(m);
                x.truncate(m);
                (k, v, s, x)
            }
            Err(_) => {
                let x = dt
                    .iter()
                    .map(|&t| if t == 0 { 0 } else { now + t })
                    .collect();
                (dk, dv, vec![0; n], x)
            }
        };
        stats.demotions += (n - gone.0.len()) as u64;
        stats.evictions += gone.0.len() as u64;
        gone
    }

    /// Puts into the upper tier and moves what it evicts down; returns what left the store.
    /// A key that the batch puts more than once and that left the upper tier moves down
    /// with the row and time to live of its last occurrence in the batch (its newest), and
    /// once.
    fn put_through(&self, batch: CachePut<'_>, stats: &mut TierStats) -> Result<Gone> {
        let (n, w) = (batch.keys.len(), self.width);
        let (mut k, mut v, mut s, mut x) = (vec![0; n], vec![0; n * w], vec![0; n], vec![0; n]);
        let m = {
            let mut out = Evicted::new(&mut k, &mut v, &mut s).expires(&mut x);
            stats.upper(|| self.upper.put_and_evict(batch, &mut out))?
        };
        if m == 0 {
            return Ok(Default::default());
        }
        // A key evicted and then put again later in the same batch is above already, with
        // its newer row: its evicted copy is stale and goes nowhere. A key evicted twice
        // moves down once.
        let mut above = vec![false; m];
        stats.upper(|| self.upper.contains(&k[..m], &mut above))?;
        let gone: Vec<u32> = (0..m as u32)
            .into_par_iter()
            .filter(|&j| !above[j as usize])
            .collect();
        let once = kv_core::par::distinct(&k, &gone);
        let dk = once.keys;
        // Its row is the batch's last for it, if the batch put it (the newest), else the
        // one evicted.
        let last = kv_core::par::last_positions(batch.keys, &dk);
        let now = self.clock.now_ms();
        let dv = kv_core::par::rows(dk.len(), w, |d| match last[d] {
            Some(i) => &batch.values[i * w..(i + 1) * w],
            None => {
                let j = gone[once.first[d] as usize] as usize;
                &v[j * w..(j + 1) * w]
            }
        });
        let dx: Vec<u64> = once
            .first
            .par_iter()
            .zip(&last)
            .map(|(&f, at)| match *at {
                Some(i) => match batch.ttl_ms.map_or(0, |t| t[i]) {
                    0 => 0,
                    ttl => now.saturating_add(ttl),
                },
                None => x[gone[f as usize] as usize],
            })
            .collect();
        Ok(self.demote(&dk, &dv, &dx, stats))
    }

    /// The put of [`KvBackend::put_and_evict`] and [`KvBackend::put_cached`]: checks the
    /// batch, takes its keys out of the lower tier (each key lives in one tier; taken, not
    /// deleted, so that a failure above can put them back), puts it through, and returns
    /// what left the store.
    fn put_leaving(&self, batch: CachePut<'_>) -> Result<Gone> {
        batch.check(self.width, CachePolicy::Lru)?;
        check_cache_batch(batch.keys.len())?;
        let w = self.width;
        let mut stats = self.gate();
        let n = batch.keys.len();
        let (mut tv, mut tf, mut tx) = (vec![0; n * w], vec![false; n], vec![0; n]);
        stats.lower(|| self.lower.take(batch.keys, &mut tv, &mut tf, &mut tx))?;
        self.put_through(batch, &mut stats).inspect_err(|_| {
            let (rk, rv, rx) = found_parts(batch.keys, &tv, &tf, &tx, w);
            self.restore(&rk, &rv, &rx, &mut stats);
        })
    }

    /// Puts `keys` (rows, expiry times) back into the lower tier after a failed step, as
    /// well as it can: what it cannot take is counted as evicted.
    fn restore(&self, keys: &[u64], rows: &[u64], expires: &[u64], stats: &mut TierStats) {
        let demotions = stats.demotions;
        let _ = self.demote(keys, rows, expires, stats);
        stats.demotions = demotions;
    }
}

impl KvBackend for Tiered {
    fn width(&self) -> usize {
        self.width
    }

    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        self.put_cached(CachePut::new(keys, values)).map(|_| ())
    }

    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.width, keys, values_out, found_out)?;
        // Positions are kept in u32 words on the host as on the devices.
        check_cache_batch(keys.len())?;
        let w = self.width;
        let mut stats = self.gate();
        stats.upper(|| self.upper.get(keys, values_out, found_out))?;
        // The misses, each key once, looked up below in one batch.
        let missed: Vec<u32> = (0..keys.len() as u32)
            .into_par_iter()
            .filter(|&i| !found_out[i as usize])
            .collect();
        stats.upper_hits += (keys.len() - missed.len()) as u64;
        if missed.is_empty() {
            return Ok(());
        }
        let missing = kv_core::par::distinct(keys, &missed);
        let m = missing.keys.len();
        let (mut rows, mut found, mut expires) = (vec![0; m * w], vec![false; m], vec![0; m]);
        stats.lower(|| {
            self.lower
                .take(&missing.keys, &mut rows, &mut found, &mut expires)
        })?;
        let (vo, fo) = (Scatter::new(values_out), Scatter::new(found_out));
        let served = missed
            .par_iter()
            .zip(&missing.index)
            .filter(|&(&i, &d)| {
                let (i, d) = (i as usize, d as usize);
                if found[d] {
                    // SAFETY: `missed` holds each batch position once, so this task alone
                    // writes position `i` (in bounds: checked lengths).
                    unsafe {
                        vo.write_slice(i * w, &rows[d * w..(d + 1) * w]);
                        fo.write(i, true);
                    }
                }
                found[d]
            })
            .count();
        stats.lower_hits += served as u64;
        stats.misses += (missed.len() - served) as u64;
        // Promote the lower tier's hits, with what is left of their times to live; one
        // whose time came while the batch ran was served, but is not moved up.
        let now = self.clock.now_ms();
        let up_at: Vec<u32> = (0..m as u32)
            .into_par_iter()
            .filter(|&d| {
                let (f, e) = (found[d as usize], expires[d as usize]);
                f && (e == 0 || e > now)
            })
            .collect();
        let up = gather(&missing.keys, &up_at, 1);
        let up_rows = gather(&rows, &up_at, w);
        let up_ttl: Vec<u64> = up_at
            .par_iter()
            .map(|&d| match expires[d as usize] {
                0 => 0,
                e => e - now,
            })
            .collect();
        stats.promotions += up.len() as u64;
        if let Err(e) = self.put_through(CachePut::new(&up, &up_rows).ttl_ms(&up_ttl), &mut stats) {
            let up_exp: Vec<u64> = up_ttl
                .iter()
                .map(|&t| if t == 0 { 0 } else { now + t })
                .collect();
            self.restore(&up, &up_rows, &up_exp, &mut stats);
            return Err(e);
        }
        Ok(())
    }

    fn delete(&self, keys: &[u64]) -> Result<usize> {
        let mut stats = self.gate();
        let above = stats.upper(|| self.upper.delete(keys))?;
        Ok(above + stats.lower(|| self.lower.delete(keys))?)
    }

    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_contains(keys, found_out)?;
        let mut stats = self.gate();
        stats.upper(|| self.upper.contains(keys, found_out))?;
        let mut below = vec![false; keys.len()];
        stats.lower(|| self.lower.contains(keys, &mut below))?;
        for (f, b) in found_out.iter_mut().zip(below) {
            *f |= b;
        }
        Ok(())
    }

    fn len(&self) -> usize {
        let _stats = self.counts();
        self.upper.len() + self.lower.len()
    }

    fn capacity(&self) -> usize {
        self.upper.capacity() + self.lower.capacity()
    }

    fn clear(&self) -> Result<()> {
        let _stats = self.counts();
        self.upper.clear()?;
        self.lower.clear()
    }

    /// The upper tier's device, with both tiers' bytes; [`Tiered::upper`] and
    /// [`Tiered::lower`] describe each.
    fn describe(&self) -> Description {
        let (u, l) = (self.upper.describe(), self.lower.describe());
        Description {
            backend: "tiered",
            device: format!(
                "{} ({}) over {} ({})",
                u.backend, u.device, l.backend, l.device
            ),
            bytes_in_use: u.bytes_in_use + l.bytes_in_use,
            slots: u.slots + l.slots,
        }
    }

    fn put_and_evict(&self, batch: CachePut<'_>, evicted: &mut Evicted<'_>) -> Result<usize> {
        batch.check(self.width, CachePolicy::Lru)?;
        evicted.check(batch.keys.len(), self.width)?;
        let (k, v, s, x) = self.put_leaving(batch)?;
        let (m, w) = (k.len(), self.width);
        evicted.keys[..m].copy_from_slice(&k);
        evicted.values[..m * w].copy_from_slice(&v);
        evicted.scores[..m].copy_from_slice(&s);
        if let Some(e) = evicted.expires_ms.as_deref_mut() {
            e[..m].copy_from_slice(&x);
        }
        Ok(m)
    }

    fn put_cached(&self, batch: CachePut<'_>) -> Result<usize> {
        Ok(self.put_leaving(batch)?.0.len())
    }

    fn peek(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.width, keys, values_out, found_out)?;
        let w = self.width;
        let mut stats = self.gate();
        stats.upper(|| self.upper.peek(keys, values_out, found_out))?;
        let (mut v, mut f) = (vec![0; keys.len() * w], vec![false; keys.len()]);
        stats.lower(|| self.lower.peek(keys, &mut v, &mut f))?;
        for i in 0..keys.len() {
            if !found_out[i] && f[i] {
                values_out[i * w..(i + 1) * w].copy_from_slice(&v[i * w..(i + 1) * w]);
                found_out[i] = true;
            }
        }
        Ok(())
    }

    /// Both tiers' counts, summed; [`Tiered::stats`] has the moves between them.
    fn cache_policy(&self) -> Result<CachePolicy> {
        self.upper.cache_policy()
    }

    fn cache_stats(&self) -> Result<CacheStats> {
        let t = self.counts();
        let (u, l) = (self.upper.cache_stats()?, self.lower.cache_stats()?);
        Ok(CacheStats {
            evicted: t.evictions,
            expired_reused: u.expired_reused + l.expired_reused,
            hits: t.upper_hits + t.lower_hits,
            misses: t.misses,
            clock: u.clock,
        })
    }
}

/// The entries a take found: (keys, rows, expiry times).
fn found_parts(
    keys: &[u64],
    rows: &[u64],
    found: &[bool],
    expires: &[u64],
    w: usize,
) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let at: Vec<u32> = (0..keys.len() as u32)
        .into_par_iter()
        .filter(|&i| found[i as usize])
        .collect();
    (
        gather(keys, &at, 1),
        gather(rows, &at, w),
        gather(expires, &at, 1),
    )
}

/// The rows `at` of `src` (rows of `w` words), in that order, on all cores.
fn gather(src: &[u64], at: &[u32], w: usize) -> Vec<u64> {
    kv_core::par::rows(at.len(), w, |r| {
        let i = at[r] as usize;
        &src[i * w..(i + 1) * w]
    })
}
