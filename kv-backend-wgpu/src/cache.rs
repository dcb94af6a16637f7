//! Cache tables on wgpu ([`WgpuCache`]): the contract of docs/cache.md, with the WGSL
//! kernels of `shader::cache_module`.
//!
//! # Layout
//!
//! `buckets = kv_core::cache_buckets(capacity)` buckets of [`CACHE_BUCKET_SLOTS`] slots, each
//! key only in its home bucket, `kv_kernels::layout::cache_bucket(key, seed, buckets)`: the
//! function the CPU and CUDA backends use, so that [`KvBackend::eviction_scope`] means the
//! same on every backend. One storage buffer each: keys, scores, expiry times (0: never)
//! and value rows per slot, and a `used` word per bucket (bit `j`: slot `j` holds an entry,
//! perhaps an expired one), all zeroed when the table opens. Each array is one storage
//! binding: a table whose largest array (its rows) passes the adapter's largest binding
//! (128 MiB on lavapipe, near 2 GiB on Vulkan drivers) is refused with
//! [`Error::OutOfDeviceMemory`]; the hash table's segments are not used here.
//!
//! # Batches
//!
//! One batch at a time (a mutex), so that each batch is atomic for other callers. A batch
//! is checked first (bad input changes nothing), then prepared on the host, uploaded into
//! per-table scratch (grown as batches grow, by the rule the CUDA backend uses, never
//! shrunk), run, and its results read back; the host waits for the device before it
//! returns. Batches larger than the scratch a binding can hold run in pieces, in order.
//!
//! - **put**: the host (rayon) finds each distinct key's last occurrence and how often it
//!   occurs, computes what the kernel stores for it (the LRU score
//!   `kv_kernels::ops::cache::lru_score(clock, i)`, the LFU count, or the caller's score;
//!   its expiry time with `ops::cache::expiry`), and groups the keys by home bucket in batch
//!   order (a sort). `kc_put` then runs one invocation per touched bucket, which applies its
//!   keys in order with the CPU backend's rule: no locks, no spinning (lanes of one subgroup
//!   need not make progress independently; lavapipe runs them in lockstep) and the same
//!   result whatever the order in which buckets run. An eviction is written at its item's
//!   place in the outputs, so no counter hands out places either.
//! - **get, peek, contains**: one invocation per item scans its 32-slot bucket; a get
//!   changes the entry's score with one 64-bit atomic (an LRU max of
//!   `lru_score(clock, i)`, an LFU add of one, per occurrence).
//! - **take, delete**: the host keeps each key's first occurrence (a take returns the row
//!   there), one invocation per distinct key clears its used bit with an atomic and.
//! - **export**: the table's arrays are read back (one copy under the mutex) and decoded on
//!   the host (`kv_staging::image::CacheArrays`). **restore**: `kc_put` with the custom
//!   policy, so that each entry's score (`kv_staging::image::stored_score`) and absolute
//!   expiry time are stored as they are given; the logical clock moves to at least the
//!   image's.
//!
//! Bounded work: every kernel loop is bounded (32 slots, `width` words), and a bucket's
//! invocation applies at most [`ROUND_ITEMS`] keys per dispatch, keeping how far it got;
//! the host dispatches as many rounds as the fullest bucket needs and checks the APPLIED
//! counter, so that a dispatch a driver cut short is resumed, never taken as done.

use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex, MutexGuard};

use kv_core::{
    CACHE_BUCKET_SLOTS, CacheConfig, CachePolicy, CachePut, CacheStats, Description, Error,
    Evicted, ImagePart, KvBackend, Result, TableConfig, TableImage, cache_buckets,
    cache_scratch_items, check_cache_batch, check_contains, check_get, check_put, check_take,
};
use kv_kernels::layout::{cache_bucket, cache_counter, cache_policy};
use kv_kernels::ops::cache::{expiry, lru_score, visible_score};
use kv_staging::image::{CacheArrays, CacheRestore, policy_word};
use rayon::prelude::*;

use crate::WgpuOptions;
use crate::gpu::{BACKEND, Fixed, Gpu, device_error, oom};
use crate::mapping::{MAP_PENDING, copy_words, expect_mapped, map_range, read_back};
use crate::shader::CacheParams;

const B: usize = CACHE_BUCKET_SLOTS;
const _: () = assert!(B as u64 == kv_kernels::layout::CACHE_BUCKET);

/// Keys one bucket's invocation of `kc_put` applies per dispatch at most: each costs a scan
/// of 32 slots and a row copy, so a dispatch stays far below the loop limits of software
/// adapters (llvmpipe ends an invocation's loops after about 65,535 iterations).
pub const ROUND_ITEMS: u32 = 64;

/// Items per piece of a batch at most (and per scratch buffer section).
const MAX_PIECE: usize = 1 << 20;

/// Bytes of the counters at the start of the readback buffer.
const RB_CTL: u64 = (cache_counter::LEN * 8) as u64;

/// The kernels of the cache module.
const PUT: &str = "kc_put";
const LOOKUP: &str = "kc_lookup";
const TAKE: &str = "kc_take";
const COUNT: &str = "kc_count";

/// The table's device arrays.
struct Table {
    keys: wgpu::Buffer,
    scores: wgpu::Buffer,
    expires: wgpu::Buffer,
    rows: wgpu::Buffer,
    used: wgpu::Buffer,
    ctl: wgpu::Buffer,
    params: wgpu::Buffer,
}

impl Table {
    fn bytes(&self) -> u64 {
        [
            &self.keys,
            &self.scores,
            &self.expires,
            &self.rows,
            &self.used,
            &self.ctl,
            &self.params,
        ]
        .iter()
        .map(|b| b.size())
        .sum()
    }
}

/// The buffers of a batch piece of up to `cap` items, and their bind group with the table.
///
/// `bin` (u64): keys, scores, expiry times, rows, each section `cap` items from the last;
/// `bout` (u64): evicted keys, scores, expiry times, rows (a put) or rows and expiry times
/// out (lookups, takes), the same sections; `b32` (u32): a flag per item, a bucket per
/// item (or per touched bucket), `cap + 1` offsets, a progress word per touched bucket.
/// The readback buffer holds the counters, the flags, then `bout`'s sections.
struct Scratch {
    cap: usize,
    bin: wgpu::Buffer,
    bout: wgpu::Buffer,
    b32: wgpu::Buffer,
    readback: wgpu::Buffer,
    rb_state: Arc<AtomicU8>,
    bind: wgpu::BindGroup,
}

impl Scratch {
    fn new(gpu: &Gpu, t: &Table, cap: usize, width: usize) -> Result<Scratch> {
        use wgpu::BufferUsages as U;
        let words = cap as u64 * (3 + width as u64) * 8;
        let bin = gpu.buffer("vramkv cache in", words, U::STORAGE | U::COPY_DST, false)?;
        let bout = gpu.buffer("vramkv cache out", words, U::STORAGE | U::COPY_SRC, false)?;
        let b32 = gpu.buffer(
            "vramkv cache words",
            (4 * cap as u64 + 1) * 4,
            U::STORAGE | U::COPY_DST | U::COPY_SRC,
            false,
        )?;
        let readback = gpu.buffer(
            "vramkv cache readback",
            rb_out(cap) + words,
            U::MAP_READ | U::COPY_DST,
            false,
        )?;
        let layout = gpu.fixed_layout(Fixed::Cache)?;
        let bind = gpu.bind_buffers(
            "vramkv cache",
            &layout.bgl,
            [
                &t.params, &t.ctl, &t.keys, &t.scores, &t.expires, &t.rows, &t.used, &bin, &bout,
                &b32,
            ]
            .map(|b| b.as_entire_binding()),
        )?;
        Ok(Scratch {
            cap,
            bin,
            bout,
            b32,
            readback,
            rb_state: Arc::new(AtomicU8::new(MAP_PENDING)),
            bind,
        })
    }

    fn bytes(&self) -> u64 {
        self.bin.size() + self.bout.size() + self.b32.size() + self.readback.size()
    }

    /// Byte offset of u64 word `k` of section `sec` of `bin` or `bout`.
    fn word(&self, sec: usize, k: usize) -> u64 {
        ((sec * self.cap + k) * 8) as u64
    }
}

/// Byte offset in the readback buffer of `bout`'s first word, for scratch of `cap` items.
fn rb_out(cap: usize) -> u64 {
    RB_CTL + cap as u64 * 4
}

/// Sections of the u64 batch buffers.
const KEYS: usize = 0;
const SCORES: usize = 1;
const EXPIRES: usize = 2;
const ROWS: usize = 3;

/// The table's device arrays, scratch and the host's counts (behind the table's mutex).
struct State {
    t: Table,
    scratch: Option<Scratch>,
    /// The logical clock: put and get batches so far.
    clock: u64,
    stats: CacheStats,
    /// Items per piece of a batch at most (a power of two, at least 256).
    piece: usize,
    /// Put rounds sent before the host reads back how far the buckets got (`None`: as many
    /// as the fullest bucket needs).
    put_rounds: Option<usize>,
    /// Put submissions that resumed buckets left unfinished, a diagnostic.
    resumed: u64,
}

/// What [`WgpuCache::store`] stores for each key of its batch.
#[derive(Clone, Copy)]
enum Stored<'a> {
    /// A put: scores by the table's policy (the caller's under [`CachePolicy::Custom`], 0
    /// when absent), expiry times from times to live at now; the logical clock advances.
    Put {
        scores: Option<&'a [u64]>,
        ttl: Option<&'a [u64]>,
    },
    /// A restore: the scores to store (`kv_staging::image::stored_score`) and the absolute
    /// expiry times, none of them past, stored as they are; the logical clock is left as
    /// it is.
    Restore {
        scores: &'a [u64],
        expires: &'a [u64],
    },
}

/// An item of a batch as the device takes it: its index in the batch, its home bucket, and
/// how many times its key occurs in the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    idx: u32,
    home: u32,
    occurs: u32,
}

/// Each distinct key of `keys` once, as the occurrence that acts for it (the last when
/// `last_wins`, else the first) with its count of occurrences, sorted by home bucket
/// (`homes[i]` is key `i`'s) and then batch order.
fn distinct(keys: &[u64], homes: &[u32], last_wins: bool) -> Vec<Item> {
    let mut all: Vec<(u32, u64, u32)> = keys
        .par_iter()
        .zip(homes.par_iter())
        .enumerate()
        .map(|(i, (&k, &h))| (h, k, i as u32))
        .collect();
    all.par_sort_unstable();
    let mut out = Vec::with_capacity(all.len());
    let mut a = 0;
    while a < all.len() {
        let (h, k, _) = all[a];
        let mut b = a + 1;
        while b < all.len() && all[b].0 == h && all[b].1 == k {
            b += 1;
        }
        out.push(Item {
            idx: if last_wins { all[b - 1].2 } else { all[a].2 },
            home: h,
            occurs: (b - a) as u32,
        });
        a = b;
    }
    out.par_sort_unstable_by_key(|it| (it.home, it.idx));
    out
}

/// Items per piece for a wish of `items`: a power of two, at least 256 (the smallest
/// scratch, `kv_core::cache_scratch_items`).
fn piece_items(items: usize) -> usize {
    1 << items.max(256).ilog2()
}

/// The touched buckets of a piece of items grouped by bucket: their ids, the offset of
/// each one's first item (and the piece's length last), and the most items of one.
fn runs(items: &[Item]) -> (Vec<u32>, Vec<u32>, usize) {
    let (mut ids, mut offs, mut most) = (Vec::new(), Vec::new(), 0);
    let mut a = 0;
    while a < items.len() {
        let h = items[a].home;
        let b = a + items[a..].partition_point(|it| it.home == h);
        ids.push(h);
        offs.push(a as u32);
        most = most.max(b - a);
        a = b;
    }
    offs.push(items.len() as u32);
    (ids, offs, most)
}

/// A cache table in the memory of a GPU driven through wgpu: a fixed number of buckets, an
/// eviction policy, expiry (docs/cache.md). `vramkv::open` opens one on the wgpu backend
/// for a [`TableConfig::cache`] config; [`crate::WgpuBackend`] itself refuses such a
/// config.
///
/// ```no_run
/// use std::sync::Arc;
/// use kv_backend_wgpu::WgpuCache;
/// use kv_core::{CacheConfig, CachePolicy, CachePut, KvBackend, ManualClock, TableConfig};
///
/// let clock = Arc::new(ManualClock::new(0));
/// let cfg = TableConfig::new(1 << 16)
///     .cache(CacheConfig::new(CachePolicy::Lru).clock(clock.clone()));
/// let t = WgpuCache::open(cfg)?;
/// t.put_cached(CachePut::new(&[7, 8], &[70, 80]).ttl_ms(&[100, 0]))?;
/// clock.advance(100);
/// let (mut v, mut f) = ([0u64; 2], [false; 2]);
/// t.get(&[7, 8], &mut v, &mut f)?;
/// assert_eq!((v, f), ([0, 80], [false, true]));
/// # Ok::<(), kv_core::Error>(())
/// ```
pub struct WgpuCache {
    gpu: Arc<Gpu>,
    width: usize,
    seed: u64,
    buckets: usize,
    /// The most items per piece: what one binding of the batch's inputs holds.
    max_piece: usize,
    cache: CacheConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for WgpuCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuCache")
            .field("adapter", &self.gpu.name)
            .field("width", &self.width)
            .field("buckets", &self.buckets)
            .field("cache", &self.cache)
            .finish()
    }
}

impl WgpuCache {
    /// Opens a cache table (`cfg.cache` must be set) on adapter `cfg.device` (default: as
    /// [`crate::WgpuBackend::open`] chooses), with the default [`WgpuOptions`].
    pub fn open(cfg: TableConfig) -> Result<Self> {
        Self::open_with(cfg, &WgpuOptions::default())
    }

    /// [`open`](Self::open) with `options` (checked; a cache table uses none of them yet).
    ///
    /// Fails with [`Error::InvalidConfig`] for a bad config or one without a cache config,
    /// [`Error::BackendUnavailable`] when no adapter (or not the chosen one) offers the
    /// needed features, and [`Error::OutOfDeviceMemory`] when the table does not fit: an
    /// allocation fails, or an array of it (its rows, `slots * width * 8` bytes) passes the
    /// adapter's largest storage binding.
    pub fn open_with(cfg: TableConfig, options: &WgpuOptions) -> Result<Self> {
        use wgpu::BufferUsages as U;
        cfg.validate()?;
        options.validate()?;
        let Some(cache) = cfg.cache.clone() else {
            return Err(Error::InvalidConfig(
                "WgpuCache::open needs a cache config (TableConfig::cache)".into(),
            ));
        };
        let gpu = crate::gpu::gpu(&cfg)?;
        let (width, buckets) = (cfg.width, cache_buckets(cfg.capacity));
        let slots = buckets as u64 * B as u64;
        let row_bytes = slots.saturating_mul(8 * width as u64);
        let total = slots
            .saturating_mul(8 * (3 + width as u64))
            .saturating_add(buckets as u64 * 4);
        // One binding per array: the rows are the largest. Slot and row indices are u32
        // words in the kernels, which a binding of at most 2 GiB keeps them.
        if row_bytes > gpu.max_binding {
            return Err(oom(total));
        }
        // Copied from by an export.
        let storage = U::STORAGE | U::COPY_DST | U::COPY_SRC;
        let words = slots * 8;
        // Fresh wgpu buffers read as zeros: every bucket starts empty.
        let t = Table {
            keys: gpu.buffer("vramkv cache keys", words, storage, false)?,
            scores: gpu.buffer("vramkv cache scores", words, storage, false)?,
            expires: gpu.buffer("vramkv cache expiry", words, storage, false)?,
            rows: gpu.buffer("vramkv cache rows", row_bytes, storage, false)?,
            used: gpu.buffer("vramkv cache used", buckets as u64 * 4, storage, false)?,
            ctl: gpu.buffer("vramkv cache counters", RB_CTL, storage, false)?,
            params: crate::state::params_buffer(&gpu)?,
        };
        // Compile the kernels now, so that a table that opens can run.
        for e in [PUT, LOOKUP, TAKE, COUNT] {
            gpu.fixed_pipeline(Fixed::Cache, e)?;
        }
        gpu.check()?;
        let piece_bytes = gpu.max_binding / ((3 + width as u64) * 8);
        let piece = piece_items(piece_bytes.min(MAX_PIECE as u64) as usize);
        Ok(WgpuCache {
            gpu,
            width,
            seed: cfg.table_seed(),
            buckets,
            max_piece: piece,
            cache,
            state: Mutex::new(State {
                t,
                scratch: None,
                clock: 0,
                stats: CacheStats::default(),
                piece,
                put_rounds: None,
                resumed: 0,
            }),
        })
    }

    /// The table's eviction policy.
    pub fn policy(&self) -> CachePolicy {
        self.cache.policy
    }

    /// The adapter's name.
    pub fn adapter_name(&self) -> &str {
        &self.gpu.name
    }

    /// Whether the table lives on a discrete GPU (vramkv's automatic choice uses only those).
    pub fn is_discrete_gpu(&self) -> bool {
        self.gpu.discrete
    }

    /// Sets the most items of a batch that one piece (one upload, dispatch and readback)
    /// holds: rounded down to a power of two, at least 256, and never more than the
    /// default, which is what one storage binding of the batch's inputs holds (at most
    /// 2^20). Larger batches run in pieces, in order. Tests set a small one to run their
    /// batches in several pieces.
    pub fn set_piece_items(&self, items: usize) {
        let mut st = self.lock();
        st.piece = piece_items(items).min(self.max_piece);
        // The next batch allocates scratch of at most a piece.
        st.scratch = None;
    }

    /// Sets how many rounds of the put kernel are sent before the host reads back how far
    /// each bucket got (at least 1; `None`: as many as the fullest bucket of the piece
    /// needs, [`ROUND_ITEMS`] keys a round). The host resumes unfinished buckets one round
    /// a submission, as it does after a dispatch that a driver cut short: tests set 1 to
    /// run that path.
    pub fn set_put_rounds(&self, rounds: Option<usize>) {
        self.lock().put_rounds = rounds.map(|r| r.max(1));
    }

    /// Put submissions so far that resumed buckets a previous one left unfinished: zero
    /// unless a bucket got more than [`ROUND_ITEMS`] keys of one batch with
    /// [`set_put_rounds`](Self::set_put_rounds) set, or a driver cut a dispatch short.
    pub fn resume_rounds(&self) -> u64 {
        self.lock().resumed
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn home(&self, key: u64) -> u32 {
        cache_bucket(key, self.seed, self.buckets as u64) as u32
    }

    fn homes(&self, keys: &[u64]) -> Vec<u32> {
        keys.par_iter().map(|&k| self.home(k)).collect()
    }

    fn policy_word(&self) -> u32 {
        policy_word(self.cache.policy)
    }

    /// Parameters of a dispatch over `n` items.
    fn params(&self, s: &Scratch, n: usize, now: u64) -> CacheParams {
        CacheParams {
            n: n as u32,
            cap: s.cap as u32,
            width: self.width as u32,
            policy: self.policy_word(),
            round_items: ROUND_ITEMS,
            now_lo: now as u32,
            now_hi: (now >> 32) as u32,
            ..CacheParams::default()
        }
    }

    /// Makes sure the scratch holds pieces of `n` items (at most a piece), growing it by
    /// the rule the CUDA backend uses. The old scratch is dropped first.
    fn ensure_scratch(&self, st: &mut State, n: usize) -> Result<()> {
        let want = n.min(st.piece);
        if st.scratch.as_ref().is_none_or(|s| s.cap < want) {
            let cap = cache_scratch_items(want).min(st.piece);
            st.scratch = None;
            st.scratch = Some(Scratch::new(&self.gpu, &st.t, cap, self.width)?);
        }
        Ok(())
    }

    /// Runs `f` on the state with scratch for `n` items; after an error the scratch is
    /// dropped (its readback buffer may still be waiting for a mapping).
    fn with_scratch<R>(
        &self,
        n: usize,
        f: impl FnOnce(&mut State, &Scratch) -> Result<R>,
    ) -> Result<R> {
        self.gpu.check()?;
        let mut st = self.lock();
        self.ensure_scratch(&mut st, n)?;
        let st = &mut *st;
        let Some(s) = st.scratch.take() else {
            return Err(device_error("cache scratch missing after allocation"));
        };
        let r = f(st, &s);
        if r.is_ok() {
            st.scratch = Some(s);
        }
        r
    }

    fn upload<T: bytemuck::Pod>(&self, buffer: &wgpu::Buffer, offset: u64, data: &[T]) {
        if !data.is_empty() {
            self.gpu
                .queue
                .write_buffer(buffer, offset, bytemuck::cast_slice(data));
        }
    }

    /// Encodes a dispatch of `entry` over `n` invocations, `times` times in one pass.
    fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        s: &Scratch,
        entry: &'static str,
        n: usize,
        times: usize,
    ) -> Result<()> {
        let pipe = self.gpu.fixed_pipeline(Fixed::Cache, entry)?;
        let (x, y) = self.gpu.groups(n as u64);
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipe);
        pass.set_bind_group(0, &s.bind, &[]);
        for _ in 0..times {
            pass.dispatch_workgroups(x, y, 1);
        }
        Ok(())
    }

    /// Encodes the copies of the counters, the first `m` flags and, of each `bout` section
    /// in `secs`, the first `m` items into the readback buffer.
    fn copy_out(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: &Table,
        s: &Scratch,
        m: usize,
        secs: &[usize],
    ) {
        enc.copy_buffer_to_buffer(&t.ctl, 0, &s.readback, 0, RB_CTL);
        if m == 0 {
            return;
        }
        enc.copy_buffer_to_buffer(&s.b32, 0, &s.readback, RB_CTL, m as u64 * 4);
        for &sec in secs {
            let len = if sec == ROWS { m * self.width } else { m };
            let at = s.word(sec, 0);
            enc.copy_buffer_to_buffer(&s.bout, at, &s.readback, rb_out(s.cap) + at, len as u64 * 8);
        }
    }

    /// Submits `enc`, maps the whole readback buffer, waits, and hands `f` a view of it.
    fn submit_read<R>(
        &self,
        s: &Scratch,
        enc: wgpu::CommandEncoder,
        f: impl FnOnce(&Readback<'_>) -> R,
    ) -> Result<R> {
        let idx = self.gpu.queue.submit([enc.finish()]);
        map_range(&s.readback, wgpu::MapMode::Read, &s.rb_state, None);
        self.gpu.wait(idx)?;
        expect_mapped(&self.gpu, &s.rb_state, "cache readback")?;
        let r = {
            let view = s
                .readback
                .get_mapped_range(..)
                .map_err(|e| device_error(format!("cache readback: {e}")))?;
            f(&Readback {
                bytes: &view,
                s,
                width: self.width,
            })
        };
        s.readback.unmap();
        Ok(r)
    }

    /// The put of every cache put, on a checked batch (`scores` may be absent under
    /// [`CachePolicy::Custom`] for a plain put: every score is then 0). Writes what it
    /// evicted into `evicted` when given; returns how many entries it evicted.
    fn apply_put(
        &self,
        keys: &[u64],
        values: &[u64],
        scores: Option<&[u64]>,
        ttl: Option<&[u64]>,
        evicted: Option<&mut Evicted<'_>>,
    ) -> Result<usize> {
        self.store(keys, values, Stored::Put { scores, ttl }, 0, evicted)
    }

    /// Writes a checked batch of keys and rows with what `stored` says each key stores
    /// (a put's or a restore's scores and expiry times), evicting where a bucket is full,
    /// then moves the logical clock to at least `floor` (in the same hold of the lock).
    /// Writes what it evicted into `evicted` when given; returns how many entries it
    /// evicted.
    fn store(
        &self,
        keys: &[u64],
        values: &[u64],
        stored: Stored<'_>,
        floor: u64,
        mut evicted: Option<&mut Evicted<'_>>,
    ) -> Result<usize> {
        let n = keys.len();
        check_cache_batch(n)?;
        if n == 0 {
            let mut st = self.lock();
            st.clock = st.clock.max(floor);
            st.stats.clock = st.clock;
            return Ok(0);
        }
        let w = self.width;
        let items = distinct(keys, &self.homes(keys), true);
        self.with_scratch(items.len(), |st, s| {
            let now = self.cache.clock.now_ms();
            let policy_word = match stored {
                Stored::Put { .. } => {
                    st.clock += 1;
                    st.stats.clock = st.clock;
                    self.policy_word()
                }
                // The scores given are the ones to store, whatever the policy.
                Stored::Restore { .. } => cache_policy::CUSTOM,
            };
            let clock = st.clock;
            let policy = self.cache.policy;
            let mut out = 0usize;
            for piece in items.chunks(s.cap) {
                let m = piece.len();
                let (ids, offs, most) = runs(piece);
                // What each key stores: its score, its expiry time, its row.
                let in_keys: Vec<u64> = piece.par_iter().map(|it| keys[it.idx as usize]).collect();
                let in_scores: Vec<u64> = piece
                    .par_iter()
                    .map(|it| {
                        let i = it.idx as usize;
                        match (stored, policy) {
                            (Stored::Restore { scores, .. }, _) => scores[i],
                            (Stored::Put { .. }, CachePolicy::Lru) => {
                                lru_score(clock, u64::from(it.idx))
                            }
                            (Stored::Put { .. }, CachePolicy::Lfu) => u64::from(it.occurs),
                            (Stored::Put { scores, .. }, CachePolicy::Custom) => {
                                scores.map_or(0, |x| x[i])
                            }
                        }
                    })
                    .collect();
                let in_exp: Vec<u64> = piece
                    .par_iter()
                    .map(|it| {
                        let i = it.idx as usize;
                        match stored {
                            Stored::Put { ttl, .. } => expiry(now, ttl.map_or(0, |x| x[i])),
                            Stored::Restore { expires, .. } => expires[i],
                        }
                    })
                    .collect();
                let mut in_rows = vec![0u64; m * w];
                in_rows
                    .par_chunks_mut(w)
                    .zip(piece.par_iter())
                    .for_each(|(r, it)| {
                        let i = it.idx as usize;
                        r.copy_from_slice(&values[i * w..(i + 1) * w]);
                    });
                self.upload(&s.bin, s.word(KEYS, 0), &in_keys);
                self.upload(&s.bin, s.word(SCORES, 0), &in_scores);
                self.upload(&s.bin, s.word(EXPIRES, 0), &in_exp);
                self.upload(&s.bin, s.word(ROWS, 0), &in_rows);
                let t = ids.len();
                self.upload(&s.b32, s.cap as u64 * 4, &ids);
                self.upload(&s.b32, 2 * s.cap as u64 * 4, &offs);
                self.upload(&s.b32, (3 * s.cap as u64 + 1) * 4, &vec![0u32; t]);
                let p = CacheParams {
                    touched: t as u32,
                    policy: policy_word,
                    ..self.params(s, m, now)
                };
                self.upload(&st.t.params, 0, std::slice::from_ref(&p));
                let report = evicted.is_some();
                let secs: &[usize] = if report {
                    &[KEYS, SCORES, EXPIRES, ROWS]
                } else {
                    &[]
                };
                let need = most.div_ceil(ROUND_ITEMS as usize);
                let mut rounds = st.put_rounds.map_or(need, |r| r.min(need));
                let mut first = true;
                let mut applied_before = 0u64;
                loop {
                    let mut enc = self.gpu.device.create_command_encoder(&Default::default());
                    if first {
                        enc.clear_buffer(&st.t.ctl, 0, None);
                    }
                    self.dispatch(&mut enc, s, PUT, t, rounds)?;
                    self.copy_out(&mut enc, &st.t, s, m, secs);
                    let done = self.submit_read(s, enc, |rb| {
                        let c = rb.counters();
                        let applied = c[cache_counter::APPLIED];
                        if applied < m as u64 {
                            return Err(applied);
                        }
                        let flags = rb.flags(m);
                        let mut e = 0usize;
                        for (j, &f) in flags.iter().enumerate() {
                            if f == 0 {
                                continue;
                            }
                            if let Some(ev) = evicted.as_deref_mut() {
                                let at = out + e;
                                ev.keys[at] = rb.word(KEYS, j);
                                ev.scores[at] =
                                    visible_score(self.policy_word(), rb.word(SCORES, j));
                                if let Some(x) = ev.expires_ms.as_deref_mut() {
                                    x[at] = rb.word(EXPIRES, j);
                                }
                                rb.row(j, &mut ev.values[at * w..(at + 1) * w]);
                            }
                            e += 1;
                        }
                        Ok((e, c[cache_counter::EXPIRED_REUSED]))
                    })?;
                    match done {
                        Ok((e, expired)) => {
                            out += e;
                            st.stats.evicted += e as u64;
                            st.stats.expired_reused += expired;
                            break;
                        }
                        Err(applied) if first || applied > applied_before => {
                            // A dispatch was cut short: resume where each bucket got to.
                            applied_before = applied;
                            first = false;
                            rounds = 1;
                            st.resumed += 1;
                        }
                        Err(applied) => {
                            return Err(device_error(format!(
                                "the cache put applied {applied} of {m} keys and a round made no progress"
                            )));
                        }
                    }
                }
            }
            if out > n {
                return Err(device_error(format!(
                    "the cache put reported {out} evictions for {n} keys"
                )));
            }
            st.clock = st.clock.max(floor);
            st.stats.clock = st.clock;
            Ok(out)
        })
    }

    /// Get (`access`), peek, or contains (`values_out` is `None`).
    fn lookup(
        &self,
        keys: &[u64],
        mut values_out: Option<&mut [u64]>,
        found_out: &mut [bool],
        access: bool,
    ) -> Result<()> {
        let n = keys.len();
        check_cache_batch(n)?;
        if n == 0 {
            return Ok(());
        }
        let w = self.width;
        self.with_scratch(n, |st, s| {
            let now = self.cache.clock.now_ms();
            if access {
                st.clock += 1;
                st.stats.clock = st.clock;
            }
            let lru0 = lru_score(st.clock, 0);
            let mut hits = 0u64;
            for start in (0..n).step_by(s.cap) {
                let m = s.cap.min(n - start);
                let piece = &keys[start..start + m];
                self.upload(&s.bin, s.word(KEYS, 0), piece);
                self.upload(&s.b32, s.cap as u64 * 4, &self.homes(piece));
                let p = CacheParams {
                    access: u32::from(access),
                    want_rows: u32::from(values_out.is_some()),
                    base: start as u32,
                    lru0_lo: lru0 as u32,
                    lru0_hi: (lru0 >> 32) as u32,
                    ..self.params(s, m, now)
                };
                self.upload(&st.t.params, 0, std::slice::from_ref(&p));
                let mut enc = self.gpu.device.create_command_encoder(&Default::default());
                self.dispatch(&mut enc, s, LOOKUP, m, 1)?;
                let secs: &[usize] = if values_out.is_some() { &[ROWS] } else { &[] };
                self.copy_out(&mut enc, &st.t, s, m, secs);
                hits += self.submit_read(s, enc, |rb| {
                    let flags = rb.flags(m);
                    let mut h = 0;
                    for (f, &x) in found_out[start..start + m].iter_mut().zip(&flags) {
                        *f = x != 0;
                        h += u64::from(x != 0);
                    }
                    if let Some(v) = values_out.as_deref_mut() {
                        rb.rows(m, &mut v[start * w..(start + m) * w]);
                    }
                    h
                })?;
            }
            if access {
                st.stats.hits += hits;
                st.stats.misses += n as u64 - hits;
            }
            Ok(())
        })
    }

    /// Take (outputs given) or delete (none): removes each key's live entry once, the
    /// first occurrence of a repeated key returning it.
    fn remove(
        &self,
        keys: &[u64],
        mut outputs: Option<(&mut [u64], &mut [bool], &mut [u64])>,
    ) -> Result<usize> {
        let n = keys.len();
        check_cache_batch(n)?;
        if n == 0 {
            return Ok(0);
        }
        let w = self.width;
        if let Some((v, f, x)) = outputs.as_mut() {
            v.fill(0);
            f.fill(false);
            x.fill(0);
        }
        let items = distinct(keys, &self.homes(keys), false);
        self.with_scratch(items.len(), |st, s| {
            let now = self.cache.clock.now_ms();
            let mut removed = 0usize;
            for piece in items.chunks(s.cap) {
                let m = piece.len();
                let in_keys: Vec<u64> = piece.iter().map(|it| keys[it.idx as usize]).collect();
                let homes: Vec<u32> = piece.iter().map(|it| it.home).collect();
                self.upload(&s.bin, s.word(KEYS, 0), &in_keys);
                self.upload(&s.b32, s.cap as u64 * 4, &homes);
                let p = CacheParams {
                    want_rows: u32::from(outputs.is_some()),
                    ..self.params(s, m, now)
                };
                self.upload(&st.t.params, 0, std::slice::from_ref(&p));
                let mut enc = self.gpu.device.create_command_encoder(&Default::default());
                self.dispatch(&mut enc, s, TAKE, m, 1)?;
                let secs: &[usize] = if outputs.is_some() {
                    &[EXPIRES, ROWS]
                } else {
                    &[]
                };
                self.copy_out(&mut enc, &st.t, s, m, secs);
                removed += self.submit_read(s, enc, |rb| {
                    let flags = rb.flags(m);
                    let mut r = 0;
                    for (j, it) in piece.iter().enumerate() {
                        if flags[j] == 0 {
                            continue;
                        }
                        r += 1;
                        if let Some((v, f, x)) = outputs.as_mut() {
                            let i = it.idx as usize;
                            f[i] = true;
                            x[i] = rb.word(EXPIRES, j);
                            rb.row(j, &mut v[i * w..(i + 1) * w]);
                        }
                    }
                    r
                })?;
            }
            Ok(removed)
        })
    }

    /// Puts a part of an image back: the entries not expired now, through the put kernel
    /// with the scores stored as given (the custom policy; a part without scores is put as
    /// a put would) and their absolute expiry times; then the logical clock moves to at
    /// least the image's. A part with bad lengths changes nothing.
    fn restore_part(&self, part: ImagePart<'_>) -> Result<()> {
        part.check(self.width)?;
        check_cache_batch(part.keys.len())?;
        let now = self.cache.clock.now_ms();
        let r = CacheRestore::new(&part, self.width, self.cache.policy, now)?;
        let ttl = r.ttl(now);
        let stored = match &r.scores {
            Some(scores) => Stored::Restore {
                scores,
                expires: &r.expires,
            },
            None => Stored::Put {
                scores: None,
                ttl: Some(&ttl),
            },
        };
        self.store(&r.keys, &r.values, stored, r.clock, None)
            .map(|_| ())
    }

    /// Copies the table's arrays to the host under its lock (in chunks through a mapped
    /// staging buffer), then decodes them with the lock let go: each live entry with its
    /// score as the contract states it and its expiry time.
    fn export_image(&self) -> Result<TableImage> {
        self.gpu.check()?;
        let w = self.width as u64;
        let slots = (self.buckets * B) as u64;
        let (words, clock, now) = {
            let st = self.lock();
            let t = &st.t;
            let words = read_back(
                &self.gpu,
                &[
                    (&t.keys, 0, slots * 8),
                    (&t.scores, 0, slots * 8),
                    (&t.expires, 0, slots * 8),
                    (&t.rows, 0, slots * 8 * w),
                    (&t.used, 0, self.buckets as u64 * 4),
                ],
            )?;
            (words, st.clock, self.cache.clock.now_ms())
        };
        let [keys, scores, expires, rows, used] = &words[..] else {
            return Err(device_error("cache export read back the wrong arrays"));
        };
        let arrays = CacheArrays {
            keys,
            scores,
            expires,
            rows,
            used: &bytemuck::cast_slice(used)[..self.buckets],
        };
        Ok(arrays.image(self.width, self.cache.policy, clock, now))
    }

    /// Live entries, counted on the device.
    fn count_live(&self) -> Result<usize> {
        self.with_scratch(1, |st, s| {
            let p = self.params(s, self.buckets, self.cache.clock.now_ms());
            self.upload(&st.t.params, 0, std::slice::from_ref(&p));
            let mut enc = self.gpu.device.create_command_encoder(&Default::default());
            enc.clear_buffer(&st.t.ctl, 0, None);
            self.dispatch(&mut enc, s, COUNT, self.buckets, 1)?;
            self.copy_out(&mut enc, &st.t, s, 0, &[]);
            self.submit_read(s, enc, |rb| rb.counters()[cache_counter::LIVE] as usize)
        })
    }
}

/// A mapped readback buffer of a piece.
struct Readback<'a> {
    bytes: &'a [u8],
    s: &'a Scratch,
    width: usize,
}

impl Readback<'_> {
    fn counters(&self) -> [u64; cache_counter::LEN] {
        let mut c = [0u64; cache_counter::LEN];
        copy_words(&mut c, &self.bytes[..RB_CTL as usize]);
        c
    }

    /// The first `m` flags.
    fn flags(&self, m: usize) -> Vec<u32> {
        let at = RB_CTL as usize;
        self.bytes[at..at + 4 * m]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Word `k` of `bout`'s section `sec`.
    fn word(&self, sec: usize, k: usize) -> u64 {
        let at = (rb_out(self.s.cap) + self.s.word(sec, k)) as usize;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap_or([0; 8]))
    }

    /// Row `k` of `bout`'s rows into `dst`.
    fn row(&self, k: usize, dst: &mut [u64]) {
        self.rows_from(k, dst);
    }

    /// The first `m` rows of `bout` into `dst`.
    fn rows(&self, m: usize, dst: &mut [u64]) {
        self.rows_from(0, &mut dst[..m * self.width]);
    }

    fn rows_from(&self, k: usize, dst: &mut [u64]) {
        let at = (rb_out(self.s.cap) + self.s.word(ROWS, 0)) as usize + k * self.width * 8;
        copy_words(dst, &self.bytes[at..at + dst.len() * 8]);
    }
}

impl KvBackend for WgpuCache {
    fn width(&self) -> usize {
        self.width
    }

    /// A put with no scores (0 under [`CachePolicy::Custom`]) and no expiry, evicting
    /// silently.
    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        check_put(self.width, keys, values)?;
        self.apply_put(keys, values, None, None, None).map(|_| ())
    }

    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.width, keys, values_out, found_out)?;
        self.lookup(keys, Some(values_out), found_out, true)
    }

    fn delete(&self, keys: &[u64]) -> Result<usize> {
        self.remove(keys, None)
    }

    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_contains(keys, found_out)?;
        self.lookup(keys, None, found_out, false)
    }

    /// Live entries: a count over every bucket on the device (expired entries leave it as
    /// time passes). 0 when the device fails (`len` cannot return an error).
    fn len(&self) -> usize {
        self.count_live().unwrap_or(0)
    }

    fn capacity(&self) -> usize {
        self.buckets * B
    }

    fn clear(&self) -> Result<()> {
        self.gpu.check()?;
        let st = self.lock();
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&st.t.used, 0, None);
        let idx = self.gpu.queue.submit([enc.finish()]);
        self.gpu.wait(idx)
    }

    fn describe(&self) -> Description {
        let st = self.lock();
        let scratch = st.scratch.as_ref().map_or(0, Scratch::bytes);
        Description {
            backend: BACKEND,
            device: self.gpu.name.clone(),
            bytes_in_use: st.t.bytes() + scratch,
            slots: self.buckets * B,
        }
    }

    fn put_and_evict(&self, batch: CachePut<'_>, evicted: &mut Evicted<'_>) -> Result<usize> {
        batch.check(self.width, self.cache.policy)?;
        evicted.check(batch.keys.len(), self.width)?;
        self.apply_put(
            batch.keys,
            batch.values,
            batch.scores,
            batch.ttl_ms,
            Some(evicted),
        )
    }

    fn put_cached(&self, batch: CachePut<'_>) -> Result<usize> {
        batch.check(self.width, self.cache.policy)?;
        self.apply_put(batch.keys, batch.values, batch.scores, batch.ttl_ms, None)
    }

    fn peek(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.width, keys, values_out, found_out)?;
        self.lookup(keys, Some(values_out), found_out, false)
    }

    fn take(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
        expires_out: &mut [u64],
    ) -> Result<usize> {
        check_take(self.width, keys, values_out, found_out, expires_out)?;
        self.remove(keys, Some((values_out, found_out, expires_out)))
    }

    fn eviction_scope(&self, key: u64) -> Result<u64> {
        Ok(u64::from(self.home(key)))
    }

    fn cache_policy(&self) -> Result<CachePolicy> {
        Ok(self.cache.policy)
    }

    fn cache_stats(&self) -> Result<CacheStats> {
        Ok(self.lock().stats)
    }

    fn export(&self) -> Result<TableImage> {
        self.export_image()
    }

    /// Puts the entries back with their scores and absolute expiry times (through the put
    /// kernel, with the scores stored as given), leaving out those expired now, and moves
    /// the logical clock to at least the image's. A part with bad lengths changes nothing.
    fn restore(&self, part: ImagePart<'_>) -> Result<()> {
        self.restore_part(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keeps_one_occurrence_per_key_in_bucket_then_batch_order() {
        let keys = [5, 7, 5, 9, 7, 5];
        let homes = [1, 0, 1, 1, 0, 1];
        let last = distinct(&keys, &homes, true);
        let got: Vec<(u32, u32, u32)> = last.iter().map(|i| (i.home, i.idx, i.occurs)).collect();
        assert_eq!(got, [(0, 4, 2), (1, 3, 1), (1, 5, 3)]);
        let first = distinct(&keys, &homes, false);
        let got: Vec<(u32, u32)> = first.iter().map(|i| (i.home, i.idx)).collect();
        assert_eq!(got, [(0, 1), (1, 0), (1, 3)]);
        let (ids, offs, most) = runs(&last);
        assert_eq!((ids, offs, most), (vec![0, 1], vec![0, 1, 3], 2));
    }
}
