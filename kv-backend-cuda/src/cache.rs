//! Cache tables in GPU memory ([`CudaCache`]): the contract of docs/cache.md, with the
//! kernels of `kv_kernels::ops::cache`.
//!
//! # Layout
//!
//! `buckets = kv_core::cache_buckets(capacity)` buckets of [`CACHE_BUCKET_SLOTS`] slots,
//! each key only in its home bucket, `kv_kernels::layout::cache_bucket(key, seed, buckets)`
//! (the function the CPU backend's `CpuCache` uses, so that
//! [`KvBackend::eviction_scope`] means the same on both). One device array each: keys,
//! scores, expiry times (0: never) and value rows per slot, and a `used` word (bit `j`:
//! slot `j` holds an entry, perhaps an expired one) and a lock word per bucket. Every array
//! is allocated and zeroed when the table opens; a failed allocation frees what was
//! allocated and answers [`Error::OutOfDeviceMemory`].
//!
//! # Batches
//!
//! One batch at a time (a mutex), so that each batch is atomic for other callers. A batch
//! from host slices is checked first (bad input changes nothing), then copied into
//! per-table device scratch (grown as batches grow, never shrunk), run, and its results
//! copied back; the host waits for the device before it returns. A put runs two kernels:
//! the dedup pass (each key's last occurrence and its count), then the put pass, in which
//! each key's last occurrence applies it under its bucket's lock. The logical clock (the
//! LRU score) is kept on the host and advances by one at every put or get batch that has
//! keys; the time (for expiry) is read from the table's [`Clock`](kv_core::Clock) once per
//! batch and handed to the kernels.
//!
//! This first version favours being simple: a thread per item, a lock per bucket taken by
//! one thread, and pageable host copies. It is not yet tuned for speed.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaStream, result};
use kv_core::{
    CACHE_BUCKET_SLOTS, CacheConfig, CachePolicy, CachePut, CacheStats, Description, Error,
    Evicted, KvBackend, Result, TableConfig, cache_buckets, cache_scratch_items, check_cache_batch,
    check_contains, check_get, check_put, check_take,
};
use kv_kernels::layout::{
    CacheArgs, CacheTableArgs, cache_bucket, cache_counter, cache_policy, local_slots,
};

use crate::gpu::{BACKEND, CacheKernels, Device, Drv, device_error};
use crate::memory::{DevBuf, stream};
use crate::options::CudaOptions;

const B: usize = CACHE_BUCKET_SLOTS;
const _: () = assert!(B as u64 == kv_kernels::layout::CACHE_BUCKET);

/// `count * size` bytes, or [`Error::OutOfDeviceMemory`] when that overflows.
fn bytes_of(count: usize, size: usize) -> Result<usize> {
    count.checked_mul(size).ok_or(Error::OutOfDeviceMemory {
        backend: BACKEND,
        requested_bytes: u64::MAX,
    })
}

/// Device buffers of a batch of up to `cap` items, grown as batches grow.
struct Scratch {
    cap: usize,
    keys: DevBuf,
    values: DevBuf,
    scores: DevBuf,
    ttl: DevBuf,
    found: DevBuf,
    expires: DevBuf,
    ev_keys: DevBuf,
    ev_rows: DevBuf,
    ev_scores: DevBuf,
    ev_expires: DevBuf,
    local: DevBuf,
    pick: DevBuf,
    occurs: DevBuf,
    slot_of: DevBuf,
}

impl Scratch {
    fn new(dev: &Device, cap: usize, width: usize) -> Result<Scratch> {
        let words = bytes_of(cap, 8)?;
        let rows = bytes_of(bytes_of(cap, width)?, 8)?;
        let local = bytes_of(local_slots(cap as u64) as usize, 4)?;
        Ok(Scratch {
            cap,
            keys: DevBuf::new(dev, words)?,
            values: DevBuf::new(dev, rows)?,
            scores: DevBuf::new(dev, words)?,
            ttl: DevBuf::new(dev, words)?,
            found: DevBuf::new(dev, cap)?,
            expires: DevBuf::new(dev, words)?,
            ev_keys: DevBuf::new(dev, words)?,
            ev_rows: DevBuf::new(dev, rows)?,
            ev_scores: DevBuf::new(dev, words)?,
            ev_expires: DevBuf::new(dev, words)?,
            local: DevBuf::new(dev, local)?,
            pick: DevBuf::new(dev, local)?,
            occurs: DevBuf::new(dev, local)?,
            slot_of: DevBuf::new(dev, bytes_of(cap, 4)?)?,
        })
    }

    fn bytes(&self) -> usize {
        [
            &self.keys,
            &self.values,
            &self.scores,
            &self.ttl,
            &self.found,
            &self.expires,
            &self.ev_keys,
            &self.ev_rows,
            &self.ev_scores,
            &self.ev_expires,
            &self.local,
            &self.pick,
            &self.occurs,
            &self.slot_of,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum()
    }
}

/// The table's device arrays and the host's counts (behind the table's mutex).
struct State {
    keys: DevBuf,
    scores: DevBuf,
    expires: DevBuf,
    rows: DevBuf,
    used: DevBuf,
    locks: DevBuf,
    counters: DevBuf,
    stream: Arc<CudaStream>,
    scratch: Option<Scratch>,
    /// The logical clock: put and get batches so far.
    clock: u64,
    stats: CacheStats,
}

impl State {
    fn table_bytes(&self) -> usize {
        [
            &self.keys,
            &self.scores,
            &self.expires,
            &self.rows,
            &self.used,
            &self.locks,
            &self.counters,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum()
    }

    /// Scratch for a batch of `n` items, grown (to the next power of two) when it is
    /// smaller. The old scratch is freed first; after a failed allocation the table has
    /// none (the next batch allocates it again).
    fn scratch(&mut self, dev: &Device, n: usize, width: usize) -> Result<&Scratch> {
        if self.scratch.as_ref().is_none_or(|s| s.cap < n) {
            let cap = cache_scratch_items(n);
            // Free the old buffers first, so that growth needs no room for both.
            self.scratch = None;
            self.scratch = Some(Scratch::new(dev, cap, width)?);
        }
        self.scratch
            .as_ref()
            .ok_or_else(|| device_error("cache scratch missing after allocation"))
    }

    /// Zeroes the counters (on the table's stream).
    fn reset_counters(&self) -> Result<()> {
        self.counters
            .memset(0, cache_counter::LEN * 8, &self.stream)
    }

    /// Waits for the table's stream, then reads the counters back.
    fn read_counters(&self) -> Result<[u64; cache_counter::LEN]> {
        let mut out = [0u64; cache_counter::LEN];
        download(&mut out, &self.counters, &self.stream)?;
        Ok(out)
    }
}

/// Enqueues a copy of `src` into the start of `dst` on `stream` (nothing for an empty
/// slice).
fn upload<T: Copy>(dst: &DevBuf, src: &[T], stream: &CudaStream) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    if std::mem::size_of_val(src) > dst.bytes() {
        return Err(device_error("a cache batch does not fit its device buffer"));
    }
    // SAFETY: `dst` holds at least `src`'s bytes (checked above). `src` is pageable host
    // memory: the driver copies it out before this call returns, and it outlives the batch
    // anyway, whose stream is synchronized before the batch returns.
    unsafe { result::memcpy_htod_async(dst.ptr(), src, stream.cu_stream()) }
        .drv("cuMemcpyHtoDAsync")
}

/// Copies the start of `src` into `dst` and waits for `stream` (nothing to copy for an
/// empty slice, but the wait still happens).
fn download<T: Copy>(dst: &mut [T], src: &DevBuf, stream: &CudaStream) -> Result<()> {
    if !dst.is_empty() {
        if std::mem::size_of_val(dst) > src.bytes() {
            return Err(device_error(
                "a cache result does not fit its device buffer",
            ));
        }
        // SAFETY: `src` holds at least `dst`'s bytes (checked above); `dst` is pageable
        // host memory, which the driver fills before this call returns, and the stream is
        // synchronized below before `dst` is read.
        unsafe { result::memcpy_dtoh_async(dst, src.ptr(), stream.cu_stream()) }
            .drv("cuMemcpyDtoHAsync")?;
    }
    stream.synchronize().drv("cuStreamSynchronize")
}

/// What a put evicted, as the host reads it back.
#[derive(Default)]
struct PutDone {
    /// Entries evicted or turned away.
    evicted: usize,
}

/// A cache table in the memory of one NVIDIA GPU: a fixed number of buckets, an eviction
/// policy, expiry (docs/cache.md). `vramkv::open` opens one on the CUDA backend for a
/// [`TableConfig::cache`] config; [`crate::CudaBackend`] itself refuses such a config.
///
/// ```no_run
/// use std::sync::Arc;
/// use kv_backend_cuda::CudaCache;
/// use kv_core::{CacheConfig, CachePolicy, CachePut, KvBackend, ManualClock, TableConfig};
///
/// let clock = Arc::new(ManualClock::new(0));
/// let cfg = TableConfig::new(1 << 20)
///     .cache(CacheConfig::new(CachePolicy::Lru).clock(clock.clone()));
/// let t = CudaCache::open(cfg)?;
/// t.put_cached(CachePut::new(&[7, 8], &[70, 80]).ttl_ms(&[100, 0]))?;
/// clock.advance(100);
/// let (mut v, mut f) = ([0u64; 2], [false; 2]);
/// t.get(&[7, 8], &mut v, &mut f)?;
/// assert_eq!((v, f), ([0, 80], [false, true]));
/// # Ok::<(), kv_core::Error>(())
/// ```
pub struct CudaCache {
    dev: Device,
    width: usize,
    seed: u64,
    buckets: usize,
    cache: CacheConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for CudaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaCache")
            .field("device", &self.dev.name)
            .field("width", &self.width)
            .field("buckets", &self.buckets)
            .field("cache", &self.cache)
            .finish()
    }
}

impl CudaCache {
    /// Opens a cache table (`cfg.cache` must be set) on the GPU `cfg.device` (default: the
    /// one with the most free memory), with the default [`CudaOptions`].
    pub fn open(cfg: TableConfig) -> Result<Self> {
        Self::open_with(cfg, &CudaOptions::default())
    }

    /// [`open`](Self::open) with `options` (the device's kernels, grid and copies).
    ///
    /// Fails with [`Error::InvalidConfig`] for a bad config or one without a cache config,
    /// [`Error::BackendUnavailable`] when there is no driver or no usable GPU,
    /// [`Error::Unsupported`] when the kernels loaded through [`CudaOptions::ptx`] lack the
    /// cache kernels, and [`Error::OutOfDeviceMemory`] when the table does not fit.
    pub fn open_with(cfg: TableConfig, options: &CudaOptions) -> Result<Self> {
        cfg.validate()?;
        options.validate()?;
        let Some(cache) = cfg.cache.clone() else {
            return Err(Error::InvalidConfig(
                "CudaCache::open needs a cache config (TableConfig::cache)".into(),
            ));
        };
        let gpu = crate::gpu::gpu(&cfg)?;
        gpu.bind()?;
        let dev = Device::new(gpu, options)?;
        if dev.k.cache.is_none() {
            return Err(Error::Unsupported {
                backend: BACKEND,
                what: "cache tables with kernels (CudaOptions::ptx) that lack the cache kernels",
            });
        }
        let (width, buckets) = (cfg.width, cache_buckets(cfg.capacity));
        let slots = bytes_of(buckets, B)?;
        let words = bytes_of(slots, 8)?;
        // Each array is freed on drop, so an allocation that fails leaks nothing.
        let st = State {
            keys: DevBuf::new(&dev, words)?,
            scores: DevBuf::new(&dev, words)?,
            expires: DevBuf::new(&dev, words)?,
            rows: DevBuf::new(&dev, bytes_of(words, width)?)?,
            used: DevBuf::new(&dev, bytes_of(buckets, 4)?)?,
            locks: DevBuf::new(&dev, bytes_of(buckets, 4)?)?,
            counters: DevBuf::new(&dev, cache_counter::LEN * 8)?,
            stream: stream(&dev)?,
            scratch: None,
            clock: 0,
            stats: CacheStats::default(),
        };
        for b in [
            &st.keys,
            &st.scores,
            &st.expires,
            &st.rows,
            &st.used,
            &st.locks,
            &st.counters,
        ] {
            b.memset(0, b.bytes(), &st.stream)?;
        }
        st.stream.synchronize().drv("cuStreamSynchronize")?;
        Ok(CudaCache {
            dev,
            width,
            seed: cfg.table_seed(),
            buckets,
            cache,
            state: Mutex::new(st),
        })
    }

    /// The table's eviction policy.
    pub fn policy(&self) -> CachePolicy {
        self.cache.policy
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kernels(&self) -> Result<&CacheKernels> {
        self.dev
            .k
            .cache
            .as_ref()
            .ok_or_else(|| device_error("the cache kernels are not loaded"))
    }

    /// The table as the kernels see it.
    fn table_args(&self, st: &State) -> CacheTableArgs {
        CacheTableArgs {
            keys: st.keys.ptr(),
            scores: st.scores.ptr(),
            expires: st.expires.ptr(),
            rows: st.rows.ptr(),
            used: st.used.ptr(),
            locks: st.locks.ptr(),
            counters: st.counters.ptr(),
            buckets: self.buckets as u64,
            seed: self.seed,
            width: self.width as u32,
            policy: match self.cache.policy {
                CachePolicy::Lru => cache_policy::LRU,
                CachePolicy::Lfu => cache_policy::LFU,
                CachePolicy::Custom => cache_policy::CUSTOM,
            },
        }
    }

    /// The put of every cache put, on a checked batch (`scores` may be absent under
    /// [`CachePolicy::Custom`] for a plain put: every score is then 0). Writes what it
    /// evicted into `evicted` when given.
    fn apply_put(
        &self,
        keys: &[u64],
        values: &[u64],
        scores: Option<&[u64]>,
        ttl: Option<&[u64]>,
        evicted: Option<&mut Evicted<'_>>,
    ) -> Result<PutDone> {
        let n = keys.len();
        check_cache_batch(n)?;
        if n == 0 {
            return Ok(PutDone::default());
        }
        let k = self.kernels()?;
        self.dev.bind()?;
        let mut st = self.lock();
        let now = self.cache.clock.now_ms();
        let w = self.width;
        let table = self.table_args(&st);
        st.scratch(&self.dev, n, w)?;
        let st = &mut *st;
        let s = st
            .scratch
            .as_ref()
            .ok_or_else(|| device_error("cache scratch missing"))?;
        let stream = &st.stream;
        upload(&s.keys, keys, stream)?;
        upload(&s.values, values, stream)?;
        if let Some(x) = scores {
            upload(&s.scores, x, stream)?;
        }
        if let Some(x) = ttl {
            upload(&s.ttl, x, stream)?;
        }
        let ls = local_slots(n as u64) as usize;
        for b in [&s.local, &s.pick, &s.occurs] {
            b.memset(0, ls * 4, stream)?;
        }
        st.reset_counters()?;
        st.clock += 1;
        let report = evicted.is_some();
        let a = CacheArgs {
            table,
            clock: st.clock,
            now,
            n: n as u64,
            keys_in: s.keys.ptr(),
            values: s.values.ptr(),
            scores_in: scores.map_or(0, |_| s.scores.ptr()),
            ttl_in: ttl.map_or(0, |_| s.ttl.ptr()),
            ev_keys: if report { s.ev_keys.ptr() } else { 0 },
            ev_rows: s.ev_rows.ptr(),
            ev_scores: s.ev_scores.ptr(),
            ev_expires: s.ev_expires.ptr(),
            local: s.local.ptr(),
            pick: s.pick.ptr(),
            occurs: s.occurs.ptr(),
            slot_of: s.slot_of.ptr(),
            local_mask: ls as u64 - 1,
            first_wins: 0,
            ..CacheArgs::default()
        };
        self.dev.launch(&k.dedup, &a, n as u64, stream)?;
        self.dev.launch(&k.put, &a, n as u64, stream)?;
        let c = st.read_counters()?;
        if c[cache_counter::ERRORS] != 0 {
            return Err(device_error(format!(
                "the cache put lost {} keys in its batch-local table (a broken invariant)",
                c[cache_counter::ERRORS]
            )));
        }
        let m = c[cache_counter::EVICTED] as usize;
        if m > n {
            return Err(device_error(format!(
                "the cache put reported {m} evictions for {n} keys"
            )));
        }
        st.stats.evicted += m as u64;
        st.stats.expired_reused += c[cache_counter::EXPIRED_REUSED];
        st.stats.clock = st.clock;
        if let Some(ev) = evicted {
            download(&mut ev.keys[..m], &s.ev_keys, stream)?;
            download(&mut ev.values[..m * w], &s.ev_rows, stream)?;
            download(&mut ev.scores[..m], &s.ev_scores, stream)?;
            if let Some(x) = ev.expires_ms.as_deref_mut() {
                download(&mut x[..m], &s.ev_expires, stream)?;
            }
        }
        Ok(PutDone { evicted: m })
    }

    /// Get (`access`), peek, or contains (`values_out` is `None`).
    fn lookup(
        &self,
        keys: &[u64],
        values_out: Option<&mut [u64]>,
        found_out: &mut [bool],
        access: bool,
    ) -> Result<()> {
        let n = keys.len();
        check_cache_batch(n)?;
        if n == 0 {
            return Ok(());
        }
        let k = self.kernels()?;
        self.dev.bind()?;
        let mut st = self.lock();
        let now = self.cache.clock.now_ms();
        let w = self.width;
        let table = self.table_args(&st);
        st.scratch(&self.dev, n, w)?;
        let st = &mut *st;
        let s = st
            .scratch
            .as_ref()
            .ok_or_else(|| device_error("cache scratch missing"))?;
        let stream = &st.stream;
        upload(&s.keys, keys, stream)?;
        st.reset_counters()?;
        if access {
            st.clock += 1;
        }
        let a = CacheArgs {
            table,
            clock: st.clock,
            now,
            n: n as u64,
            keys_in: s.keys.ptr(),
            values: if values_out.is_some() {
                s.values.ptr()
            } else {
                0
            },
            found_out: s.found.ptr(),
            access: access as u32,
            ..CacheArgs::default()
        };
        self.dev.launch(&k.get, &a, n as u64, stream)?;
        let c = st.read_counters()?;
        if access {
            st.stats.hits += c[cache_counter::HITS];
            st.stats.misses += c[cache_counter::MISSES];
            st.stats.clock = st.clock;
        }
        if let Some(v) = values_out {
            download(&mut v[..n * w], &s.values, stream)?;
        }
        let mut found = vec![0u8; n];
        download(&mut found, &s.found, stream)?;
        for (f, b) in found_out.iter_mut().zip(found) {
            *f = b != 0;
        }
        Ok(())
    }

    /// Take (outputs given) or delete (none): removes each key's live entry once.
    fn remove(
        &self,
        keys: &[u64],
        outputs: Option<(&mut [u64], &mut [bool], &mut [u64])>,
    ) -> Result<usize> {
        let n = keys.len();
        check_cache_batch(n)?;
        if n == 0 {
            return Ok(0);
        }
        let k = self.kernels()?;
        self.dev.bind()?;
        let mut st = self.lock();
        let now = self.cache.clock.now_ms();
        let w = self.width;
        let table = self.table_args(&st);
        st.scratch(&self.dev, n, w)?;
        let st = &mut *st;
        let s = st
            .scratch
            .as_ref()
            .ok_or_else(|| device_error("cache scratch missing"))?;
        let stream = &st.stream;
        upload(&s.keys, keys, stream)?;
        st.reset_counters()?;
        let take = outputs.is_some();
        let ls = local_slots(n as u64) as usize;
        let a = CacheArgs {
            table,
            clock: st.clock,
            now,
            n: n as u64,
            keys_in: s.keys.ptr(),
            values: if take { s.values.ptr() } else { 0 },
            found_out: if take { s.found.ptr() } else { 0 },
            expires_out: if take { s.expires.ptr() } else { 0 },
            local: s.local.ptr(),
            // A take has the first occurrence of each key return it; a delete needs no
            // dedup (the atomic and counts a repeated key once).
            pick: if take { s.pick.ptr() } else { 0 },
            slot_of: s.slot_of.ptr(),
            local_mask: ls as u64 - 1,
            first_wins: 1,
            ..CacheArgs::default()
        };
        if take {
            for b in [&s.local, &s.pick] {
                b.memset(0, ls * 4, stream)?;
            }
            self.dev.launch(&k.dedup, &a, n as u64, stream)?;
        }
        self.dev.launch(&k.take, &a, n as u64, stream)?;
        let c = st.read_counters()?;
        if c[cache_counter::ERRORS] != 0 {
            return Err(device_error(format!(
                "the cache take lost {} keys in its batch-local table (a broken invariant)",
                c[cache_counter::ERRORS]
            )));
        }
        if let Some((values_out, found_out, expires_out)) = outputs {
            download(&mut values_out[..n * w], &s.values, stream)?;
            download(&mut expires_out[..n], &s.expires, stream)?;
            let mut found = vec![0u8; n];
            download(&mut found, &s.found, stream)?;
            for (f, b) in found_out.iter_mut().zip(found) {
                *f = b != 0;
            }
        }
        Ok(c[cache_counter::REMOVED] as usize)
    }

    /// Live entries, counted on the device.
    fn count_live(&self) -> Result<usize> {
        let k = self.kernels()?;
        self.dev.bind()?;
        let st = self.lock();
        let a = CacheArgs {
            table: self.table_args(&st),
            clock: st.clock,
            now: self.cache.clock.now_ms(),
            ..CacheArgs::default()
        };
        st.reset_counters()?;
        self.dev
            .launch(&k.count, &a, self.buckets as u64, &st.stream)?;
        Ok(st.read_counters()?[cache_counter::LIVE] as usize)
    }
}

impl KvBackend for CudaCache {
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
        self.dev.bind()?;
        let st = self.lock();
        st.used.memset(0, st.used.bytes(), &st.stream)?;
        st.locks.memset(0, st.locks.bytes(), &st.stream)?;
        st.stream.synchronize().drv("cuStreamSynchronize")
    }

    fn describe(&self) -> Description {
        let st = self.lock();
        let scratch = st.scratch.as_ref().map_or(0, Scratch::bytes);
        Description {
            backend: BACKEND,
            device: self.dev.name.clone(),
            bytes_in_use: (st.table_bytes() + scratch) as u64,
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
        .map(|d| d.evicted)
    }

    fn put_cached(&self, batch: CachePut<'_>) -> Result<usize> {
        batch.check(self.width, self.cache.policy)?;
        self.apply_put(batch.keys, batch.values, batch.scores, batch.ttl_ms, None)
            .map(|d| d.evicted)
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
        Ok(cache_bucket(key, self.seed, self.buckets as u64))
    }

    fn cache_policy(&self) -> Result<CachePolicy> {
        Ok(self.cache.policy)
    }

    fn cache_stats(&self) -> Result<CacheStats> {
        Ok(self.lock().stats)
    }
}
