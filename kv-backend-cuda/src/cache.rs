//! Cache tables in GPU memory ([`CudaCache`]): the contract of docs/cache.md, with the
//! kernels of `kv_kernels::ops::cache`.
//!
//! # Layout
//!
//! `buckets = kv_core::cache_buckets(capacity)` buckets of [`CACHE_BUCKET_SLOTS`] slots,
//! each key only in its home bucket, `kv_kernels::layout::cache_bucket(key, seed, buckets)`
//! (the function the CPU backend's `CpuCache` uses, so that
//! [`KvBackend::eviction_scope`] means the same on both). One device array each: keys,
//! scores, expiry times (0: never), value rows and digests (a byte of the key's hash, which
//! lookups compare before any key) per slot, and a `used` word (bit `j`:
//! slot `j` holds an entry, perhaps an expired one) and a lock word per bucket. Every array
//! is allocated and zeroed when the table opens; a failed allocation frees what was
//! allocated and answers [`Error::OutOfDeviceMemory`].
//!
//! # Batches
//!
//! One batch at a time (a mutex), so that each batch is atomic for other callers. A batch
//! is checked first (bad input changes nothing). A batch from host slices is then copied
//! into per-table device staging (grown as batches grow, never shrunk), run, and its
//! results copied back; a device-resident batch ([`CudaCache::put_and_evict_device`],
//! [`CudaCache::get_device`], ...) runs on the caller's device buffers directly. Both
//! paths launch the same kernels with the same arguments, so they give the same results;
//! the host waits for the device before a batch returns. A put runs two kernels: the dedup
//! pass (each key's last occurrence and its count, a thread per item), then the put pass,
//! in which each key's last occurrence applies it under its bucket's lock, a group of eight
//! lanes per item (four slots a lane; `kv_kernels::ops::cache`); a put that wants its
//! evicted entries has each item write its report at its own place of a scratch
//! ([`EvScratch`]), and a third kernel gathers them into the outputs. Gets are a group of
//! eight lanes per item too, takes a warp per item. The group and warp kernels are launched
//! as one wave of the blocks the GPU holds at once (the driver's occupancy for the kernel). The logical clock (the LRU score) is kept on
//! the host and advances by one at every put or get batch that has keys; the time (for
//! expiry) is read from the table's [`Clock`](kv_core::Clock) once per batch and handed to
//! the kernels. [`CudaCache::last_batch_ms`] reports the device time of the last put or
//! lookup, by CUDA events.
//!
//! A host batch moves through page-locked staging ([`HostStage`]): its inputs are copied on
//! all cores into write-combined pinned memory and sent with asynchronous copies; its
//! outputs come back into cached pinned memory, queued behind the kernels, and are copied
//! out on all cores after the one wait that reads the batch's counters.
//!
//! An export copies the table's arrays to the host under the mutex and decodes them after
//! (`kv_staging::image::CacheArrays`); a restore runs the put kernels with the custom
//! policy (the entries' scores stored as given, `kv_staging::image::stored_score`) and
//! each entry's time to live from the time the batch reads, which gives back its expiry
//! time, then moves the logical clock to at least the image's.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, result};
use kv_core::{
    CACHE_BUCKET_SLOTS, CacheConfig, CachePolicy, CachePut, CacheStats, Description, Error,
    Evicted, ImagePart, KvBackend, Result, TableConfig, TableImage, cache_buckets,
    cache_scratch_items, check_cache_batch, check_cache_put_len, check_contains, check_evicted_len,
    check_get, check_get_len, check_put, check_take,
};
use kv_kernels::layout::{
    CacheArgs, CacheTableArgs, EvScratch, cache_bucket, cache_counter, cache_policy, local_slots,
};
use kv_staging::copy::{CopyMode, par_bools, par_copy};
use kv_staging::image::{CacheArrays, CacheRestore, policy_word};

use crate::gpu::{BACKEND, CacheKernels, Device, Drv, device_error};
use crate::memory::{DevBuf, Pinned, dtoh_slice, htod_slice, stream};
use crate::options::CudaOptions;

const B: usize = CACHE_BUCKET_SLOTS;

/// An event that can time (the default flags), on `dev`'s context.
fn timing_event(dev: &Device) -> Result<CudaEvent> {
    dev.ctx
        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .drv("cuEventCreate")
}
const _: () = assert!(B as u64 == kv_kernels::layout::CACHE_BUCKET);

/// `count * size` bytes, or [`Error::OutOfDeviceMemory`] when that overflows.
fn bytes_of(count: usize, size: usize) -> Result<usize> {
    count.checked_mul(size).ok_or(Error::OutOfDeviceMemory {
        backend: BACKEND,
        requested_bytes: u64::MAX,
    })
}

/// The batch-local tables of the dedup pass, for batches of up to `cap` items.
struct Local {
    cap: usize,
    local: DevBuf,
    pick: DevBuf,
    occurs: DevBuf,
    slot_of: DevBuf,
}

impl Local {
    fn new(dev: &Device, cap: usize) -> Result<Local> {
        let local = bytes_of(local_slots(cap as u64) as usize, 4)?;
        Ok(Local {
            cap,
            local: DevBuf::new(dev, local)?,
            pick: DevBuf::new(dev, local)?,
            occurs: DevBuf::new(dev, local)?,
            slot_of: DevBuf::new(dev, bytes_of(cap, 4)?)?,
        })
    }

    fn bytes(&self) -> usize {
        [&self.local, &self.pick, &self.occurs, &self.slot_of]
            .iter()
            .map(|b| b.bytes())
            .sum()
    }
}

/// A put's eviction scratch (`kv_kernels::layout::EvScratch`), for batches of up to `cap`
/// items: the put pass writes each item's report at the item's place, with no atomic, and
/// the compaction pass gathers them into the evicted outputs.
struct EvBuf {
    cap: usize,
    buf: DevBuf,
}

impl EvBuf {
    fn new(dev: &Device, cap: usize, width: usize) -> Result<EvBuf> {
        let bytes = EvScratch::bytes(cap as u64, width as u32);
        let bytes = usize::try_from(bytes)
            .map_err(|_| Error::InvalidArgument("cache batch too large".into()))?;
        Ok(EvBuf {
            cap,
            buf: DevBuf::new(dev, bytes)?,
        })
    }
}

/// Device copies of a host batch's inputs and outputs, for batches of up to `cap` items.
struct Staging {
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
}

impl Staging {
    fn new(dev: &Device, cap: usize, width: usize) -> Result<Staging> {
        let words = bytes_of(cap, 8)?;
        let rows = bytes_of(bytes_of(cap, width)?, 8)?;
        Ok(Staging {
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
        ]
        .iter()
        .map(|b| b.bytes())
        .sum()
    }
}

/// Page-locked host staging of a host batch: `inp` (write-combined: the host only writes
/// it) holds the inputs on their way to the device, `out` (cached: the host reads it) the
/// outputs on their way back, each several arrays one after another. Grown to the next
/// power of two of what a batch needs, never shrunk. The table's lock and the wait at the
/// end of every batch mean that no copy from or into them is in flight when a batch
/// starts.
#[derive(Default)]
struct HostStage {
    inp: Option<Pinned<u64>>,
    out: Option<Pinned<u64>>,
}

/// An output queued into [`HostStage::out`]: its place there, in bytes.
#[derive(Clone, Copy)]
struct Queued {
    at: usize,
    bytes: usize,
}

impl HostStage {
    /// Copies each input `(src, device address)` into `inp` on all cores, one after
    /// another, then enqueues its copy to the device on `stream`.
    fn send(
        &mut self,
        dev: &Device,
        mode: CopyMode,
        parts: &[(&[u64], u64)],
        stream: &CudaStream,
    ) -> Result<()> {
        let words = parts.iter().map(|(src, _)| src.len()).sum();
        let inp = grown(&mut self.inp, words, Pinned::len, |cap| {
            Pinned::new(dev, cap, true)
        })?;
        // SAFETY: no copy from or into `inp` is in flight (see the type's docs).
        let buf = unsafe { inp.as_mut_slice() };
        let mut at = 0;
        for (src, _) in parts {
            par_copy(mode, &mut buf[at..at + src.len()], src);
            at += src.len();
        }
        let mut at = 0;
        for &(src, dst) in parts {
            // SAFETY: `buf` is page-locked; it is neither written nor freed before the
            // stream passes the copy (the batch waits for its stream before it returns),
            // and `dst` is a staging array of at least `src.len()` words (the caller's).
            unsafe { htod_slice(dst, &buf[at..at + src.len()], stream) }?;
            at += src.len();
        }
        Ok(())
    }

    /// Enqueues the copies of each output `(device address, bytes)` into `out` on
    /// `stream`, each at an 8-byte boundary; returns their places, for
    /// [`received`](Self::received) once the stream has been waited for.
    fn fetch(
        &mut self,
        dev: &Device,
        parts: &[(u64, usize)],
        stream: &CudaStream,
    ) -> Result<Vec<Queued>> {
        let words = parts.iter().map(|(_, b)| b.div_ceil(8)).sum();
        let out = grown(&mut self.out, words, Pinned::len, |cap| {
            Pinned::new(dev, cap, false)
        })?;
        // SAFETY: no copy from or into `out` is in flight (see the type's docs).
        let buf: &mut [u8] = bytemuck::cast_slice_mut(unsafe { out.as_mut_slice() });
        let mut at = 0;
        let mut placed = Vec::with_capacity(parts.len());
        for &(src, bytes) in parts {
            // SAFETY: `buf` is page-locked and is neither read nor freed before the
            // stream has been waited for (`received`'s caller's promise); `src` holds
            // `bytes` bytes (a staging array the caller sized).
            unsafe { dtoh_slice(&mut buf[at..at + bytes], src, stream) }?;
            placed.push(Queued { at, bytes });
            at += bytes.div_ceil(8) * 8;
        }
        Ok(placed)
    }

    /// The bytes of a fetched output.
    ///
    /// # Safety
    /// The stream that [`fetch`](Self::fetch) queued the copy on has been waited for since.
    unsafe fn received(&self, q: Queued) -> Result<&[u8]> {
        let out = self
            .out
            .as_ref()
            .ok_or_else(|| device_error("pinned staging missing"))?;
        // SAFETY: the copies into `out` are done (the caller's promise).
        let buf: &[u8] = bytemuck::cast_slice(unsafe { out.as_slice() });
        Ok(&buf[q.at..q.at + q.bytes])
    }

    /// Copies a fetched output of u64 words into `dst` on all cores.
    ///
    /// # Safety
    /// As for [`received`](Self::received).
    unsafe fn words_into(&self, mode: CopyMode, q: Queued, dst: &mut [u64]) -> Result<()> {
        // SAFETY: the caller's promise, passed on.
        let src: &[u64] = bytemuck::cast_slice(unsafe { self.received(q) }?);
        par_copy(mode, dst, src);
        Ok(())
    }

    /// Writes a fetched output of flag bytes into `dst` as bools, on all cores.
    ///
    /// # Safety
    /// As for [`received`](Self::received).
    unsafe fn flags_into(&self, q: Queued, dst: &mut [bool]) -> Result<()> {
        // SAFETY: the caller's promise, passed on.
        par_bools(dst, unsafe { self.received(q) }?);
        Ok(())
    }
}

/// `slot`'s buffers, grown (to the next power of two of `n`, at least 256 items) by `make`
/// when they hold fewer than `n` items. The old buffers are freed first, so that growth
/// needs no room for both; after a failed allocation there are none (the next batch
/// allocates them again).
fn grown<T>(
    slot: &mut Option<T>,
    n: usize,
    cap: impl Fn(&T) -> usize,
    make: impl FnOnce(usize) -> Result<T>,
) -> Result<&mut T> {
    if slot.as_ref().is_none_or(|s| cap(s) < n) {
        *slot = None;
        *slot = Some(make(cache_scratch_items(n))?);
    }
    slot.as_mut()
        .ok_or_else(|| device_error("cache scratch missing after allocation"))
}

/// The table's device arrays and the host's counts (behind the table's mutex).
struct State {
    keys: DevBuf,
    scores: DevBuf,
    expires: DevBuf,
    rows: DevBuf,
    used: DevBuf,
    /// A byte a slot: its key's digest (`kv_kernels::layout::cache_digest`).
    digests: DevBuf,
    locks: DevBuf,
    counters: DevBuf,
    stream: Arc<CudaStream>,
    /// The dedup pass's tables (every put and take).
    local: Option<Local>,
    /// The eviction scratch (puts that want their evicted entries).
    ev: Option<EvBuf>,
    /// Device copies of host batches (batches from host slices only).
    staging: Option<Staging>,
    /// Page-locked host copies of host batches.
    host: HostStage,
    /// Recorded before and after the kernels of each put and lookup batch
    /// ([`CudaCache::last_batch_ms`]).
    timing: (CudaEvent, CudaEvent),
    /// The timing events hold a finished batch.
    timed: bool,
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
            &self.digests,
            &self.locks,
            &self.counters,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum()
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

    /// Records the start (`end` false) or the end of a batch's device work.
    fn mark(&mut self, end: bool) -> Result<()> {
        self.timed = end;
        let e = if end { &self.timing.1 } else { &self.timing.0 };
        e.record(&self.stream).drv("cuEventRecord")
    }
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

/// The device addresses of a put's inputs and outputs (0: not given). The host path points
/// them at its staging copies, the device-resident path at the caller's buffers.
#[derive(Clone, Copy, Default)]
struct PutIo {
    n: usize,
    keys: u64,
    values: u64,
    scores: u64,
    ttl: u64,
    /// 0: evictions are counted, not written.
    ev_keys: u64,
    ev_rows: u64,
    ev_scores: u64,
    ev_expires: u64,
}

/// A put batch from host slices (checked): keys, rows, and scores and times to live where
/// given.
#[derive(Clone, Copy)]
struct HostPut<'a> {
    keys: &'a [u64],
    values: &'a [u64],
    scores: Option<&'a [u64]>,
    ttl: Option<&'a [u64]>,
}

/// What a put run is: a put (scores by the policy, the logical clock advanced by one), or
/// a restore (the scores stored as given, whatever the policy; the clock left as it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PutKind {
    Put,
    Restore,
}

/// The device addresses of a lookup's (get, peek, contains) keys and outputs.
#[derive(Clone, Copy)]
struct LookupIo {
    n: usize,
    keys: u64,
    /// 0: no rows (contains).
    values: u64,
    found: u64,
    /// A get (an access), rather than a peek or contains.
    access: bool,
}

/// A put whose keys, rows, scores and times to live are in the device memory of a
/// [`CudaCache`]'s context ([`CudaCache::put_and_evict_device`]): [`CachePut`] for
/// device-resident batches, with the same checks and meaning.
pub struct DeviceCachePut<'a> {
    /// `u64[n]` keys.
    pub keys: &'a dyn DevicePtr<u64>,
    /// `u64[n * width]` value rows.
    pub values: &'a dyn DevicePtr<u64>,
    /// `u64[n]` scores: required under [`CachePolicy::Custom`], refused under the others.
    pub scores: Option<&'a dyn DevicePtr<u64>>,
    /// `u64[n]` times to live in milliseconds (0: no expiry).
    pub ttl_ms: Option<&'a dyn DevicePtr<u64>>,
}

impl<'a> DeviceCachePut<'a> {
    /// A put of `keys` and `values` with no scores and no expiry.
    pub fn new(keys: &'a dyn DevicePtr<u64>, values: &'a dyn DevicePtr<u64>) -> Self {
        DeviceCachePut {
            keys,
            values,
            scores: None,
            ttl_ms: None,
        }
    }

    /// Adds a score per key.
    pub fn scores(mut self, scores: &'a dyn DevicePtr<u64>) -> Self {
        self.scores = Some(scores);
        self
    }

    /// Adds a time to live per key, in milliseconds.
    pub fn ttl_ms(mut self, ttl_ms: &'a dyn DevicePtr<u64>) -> Self {
        self.ttl_ms = Some(ttl_ms);
        self
    }
}

/// Where [`CudaCache::put_and_evict_device`] writes what it evicted, in device memory of the
/// table's context: [`Evicted`] for device-resident batches (room for one entry per key of
/// the put; the first `m` entries are written, `m` returned).
pub struct DeviceEvicted<'a> {
    /// `u64[n]` evicted keys.
    pub keys: &'a mut dyn DevicePtrMut<u64>,
    /// `u64[n * width]` their value rows.
    pub values: &'a mut dyn DevicePtrMut<u64>,
    /// `u64[n]` their scores when they left.
    pub scores: &'a mut dyn DevicePtrMut<u64>,
    /// `u64[n]` when each would have expired (0: never), if asked for.
    pub expires_ms: Option<&'a mut dyn DevicePtrMut<u64>>,
}

impl<'a> DeviceEvicted<'a> {
    /// Room for evicted keys, rows and scores.
    pub fn new(
        keys: &'a mut dyn DevicePtrMut<u64>,
        values: &'a mut dyn DevicePtrMut<u64>,
        scores: &'a mut dyn DevicePtrMut<u64>,
    ) -> Self {
        DeviceEvicted {
            keys,
            values,
            scores,
            expires_ms: None,
        }
    }

    /// Asks for each evicted entry's expiry time too.
    pub fn expires(mut self, expires_ms: &'a mut dyn DevicePtrMut<u64>) -> Self {
        self.expires_ms = Some(expires_ms);
        self
    }
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
            digests: DevBuf::new(&dev, slots)?,
            locks: DevBuf::new(&dev, bytes_of(buckets, 4)?)?,
            counters: DevBuf::new(&dev, cache_counter::LEN * 8)?,
            timing: (timing_event(&dev)?, timing_event(&dev)?),
            timed: false,
            stream: stream(&dev)?,
            local: None,
            ev: None,
            staging: None,
            host: HostStage::default(),
            clock: 0,
            stats: CacheStats::default(),
        };
        for b in [
            &st.keys,
            &st.scores,
            &st.expires,
            &st.rows,
            &st.used,
            &st.digests,
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
            digests: st.digests.ptr(),
            buckets: self.buckets as u64,
            seed: self.seed,
            width: self.width as u32,
            policy: policy_word(self.cache.policy),
        }
    }

    /// A new stream on the table's context, e.g. to allocate and fill device-resident
    /// batches.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.dev.bind()?;
        self.dev.ctx.new_stream().drv("cuStreamCreate")
    }

    /// The CUDA context the table lives in (for allocating device-resident batches).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }

    /// The device time of the last put or lookup batch (get, peek, contains), in
    /// milliseconds, measured by CUDA events on the table's stream: from before its first
    /// device operation once its inputs are in device memory (the dedup tables' fill) to
    /// the end of its last kernel. Host copies of a batch from host slices are not in it.
    /// Fails when no such batch has run yet.
    pub fn last_batch_ms(&self) -> Result<f32> {
        let st = self.lock();
        if !st.timed {
            return Err(Error::InvalidArgument(
                "no put or lookup batch has been timed on this cache table yet".into(),
            ));
        }
        st.timing
            .0
            .elapsed_ms(&st.timing.1)
            .drv("cuEventElapsedTime")
    }

    /// Runs a put whose inputs and outputs are at `io`'s device addresses (checked, `n > 0`)
    /// on the table's stream, after whatever that stream holds, and waits for it: the dedup
    /// pass, then the put pass (a group of lanes per item), then, when the evicted entries
    /// are wanted, the compaction pass, at time `now` (when the time to live of each key
    /// starts). Returns how many entries it evicted.
    fn run_put(&self, st: &mut State, io: &PutIo, now: u64, kind: PutKind) -> Result<usize> {
        let k = self.kernels()?;
        let n = io.n;
        let mut table = self.table_args(st);
        let clock = match kind {
            PutKind::Put => st.clock + 1,
            PutKind::Restore => {
                // The scores given are the ones to store, whatever the table's policy.
                table.policy = cache_policy::CUSTOM;
                st.clock
            }
        };
        let ls = local_slots(n as u64) as usize;
        let stream = st.stream.clone();
        st.mark(false)?;
        let ev_scratch = if io.ev_keys == 0 {
            0
        } else {
            let width = self.width;
            grown(
                &mut st.ev,
                n,
                |e| e.cap,
                |cap| EvBuf::new(&self.dev, cap, width),
            )?
            .buf
            .ptr()
        };
        let l = grown(
            &mut st.local,
            n,
            |l| l.cap,
            |cap| Local::new(&self.dev, cap),
        )?;
        let a = CacheArgs {
            table,
            clock,
            now,
            n: n as u64,
            keys_in: io.keys,
            values: io.values,
            scores_in: io.scores,
            ttl_in: io.ttl,
            ev_keys: io.ev_keys,
            ev_rows: io.ev_rows,
            ev_scores: io.ev_scores,
            ev_expires: io.ev_expires,
            ev_scratch,
            local: l.local.ptr(),
            pick: l.pick.ptr(),
            occurs: l.occurs.ptr(),
            slot_of: l.slot_of.ptr(),
            local_mask: ls as u64 - 1,
            first_wins: 0,
            ..CacheArgs::default()
        };
        for b in [&l.local, &l.pick, &l.occurs] {
            b.memset(0, ls * 4, &stream)?;
        }
        st.reset_counters()?;
        st.clock = clock;
        self.dev.launch(&k.dedup, &a, n as u64, &stream)?;
        self.dev.launch_groups(&k.put, &a, n as u64, &stream)?;
        if ev_scratch != 0 {
            self.dev.launch(&k.compact, &a, n as u64, &stream)?;
        }
        st.mark(true)?;
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
        if ev_scratch != 0 && c[cache_counter::COMPACTED] != m as u64 {
            return Err(device_error(format!(
                "the cache put reported {m} evictions but moved {} to the outputs",
                c[cache_counter::COMPACTED]
            )));
        }
        st.stats.evicted += m as u64;
        st.stats.expired_reused += c[cache_counter::EXPIRED_REUSED];
        st.stats.clock = st.clock;
        Ok(m)
    }

    /// Runs a lookup whose keys and outputs are at `io`'s device addresses (`n > 0`) on the
    /// table's stream, and waits for it (a group of `GROUP_LANES` lanes per item).
    fn run_lookup(&self, st: &mut State, io: &LookupIo) -> Result<()> {
        self.enqueue_lookup(st, io)?;
        self.finish_lookup(st, io)
    }

    /// Enqueues the lookup of [`run_lookup`](Self::run_lookup) on the table's stream.
    fn enqueue_lookup(&self, st: &mut State, io: &LookupIo) -> Result<()> {
        let k = self.kernels()?;
        let a = CacheArgs {
            table: self.table_args(st),
            clock: st.clock + io.access as u64,
            now: self.cache.clock.now_ms(),
            n: io.n as u64,
            keys_in: io.keys,
            values: io.values,
            found_out: io.found,
            access: io.access as u32,
            ..CacheArgs::default()
        };
        st.mark(false)?;
        st.reset_counters()?;
        if io.access {
            st.clock += 1;
        }
        self.dev
            .launch_groups(&k.get, &a, io.n as u64, &st.stream)?;
        st.mark(true)
    }

    /// Waits for an enqueued lookup (and whatever the stream holds after it) and counts
    /// its hits and misses.
    fn finish_lookup(&self, st: &mut State, io: &LookupIo) -> Result<()> {
        let c = st.read_counters()?;
        if io.access {
            st.stats.hits += c[cache_counter::HITS];
            st.stats.misses += c[cache_counter::MISSES];
            st.stats.clock = st.clock;
        }
        Ok(())
    }

    /// The table's staging for a host batch of `n` items ([`grown`] as needed).
    fn staging<'s>(&self, slot: &'s mut Option<Staging>, n: usize) -> Result<&'s Staging> {
        grown(
            slot,
            n,
            |s| s.cap,
            |cap| Staging::new(&self.dev, cap, self.width),
        )
        .map(|s| &*s)
    }

    /// The put of every cache put from host slices, on a checked batch (`scores` may be
    /// absent under [`CachePolicy::Custom`] for a plain put: every score is then 0): the
    /// batch is copied into device staging, run by [`run_put`](Self::run_put), and what it
    /// evicted copied into `evicted` when given. Returns how many entries it evicted.
    fn apply_put(
        &self,
        keys: &[u64],
        values: &[u64],
        scores: Option<&[u64]>,
        ttl: Option<&[u64]>,
        evicted: Option<&mut Evicted<'_>>,
    ) -> Result<usize> {
        check_cache_batch(keys.len())?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.dev.bind()?;
        let mut guard = self.lock();
        let now = self.cache.clock.now_ms();
        let batch = HostPut {
            keys,
            values,
            scores,
            ttl,
        };
        self.put_host(&mut guard, &batch, now, PutKind::Put, evicted)
    }

    /// Copies a checked host batch (`n > 0`) into device staging, runs it with
    /// [`run_put`](Self::run_put) at `now`, and copies what it evicted into `evicted` when
    /// given. Returns how many entries it evicted.
    fn put_host(
        &self,
        st: &mut State,
        batch: &HostPut<'_>,
        now: u64,
        kind: PutKind,
        evicted: Option<&mut Evicted<'_>>,
    ) -> Result<usize> {
        let HostPut {
            keys,
            values,
            scores,
            ttl,
        } = *batch;
        let n = keys.len();
        let w = self.width;
        let s = self.staging(&mut st.staging, n)?;
        let mut inputs = vec![(keys, s.keys.ptr()), (values, s.values.ptr())];
        if let Some(x) = scores {
            inputs.push((x, s.scores.ptr()));
        }
        if let Some(x) = ttl {
            inputs.push((x, s.ttl.ptr()));
        }
        st.host
            .send(&self.dev, self.dev.copy, &inputs, &st.stream)?;
        let io = PutIo {
            n,
            keys: s.keys.ptr(),
            values: s.values.ptr(),
            scores: scores.map_or(0, |_| s.scores.ptr()),
            ttl: ttl.map_or(0, |_| s.ttl.ptr()),
            ev_keys: if evicted.is_some() {
                s.ev_keys.ptr()
            } else {
                0
            },
            ev_rows: s.ev_rows.ptr(),
            ev_scores: s.ev_scores.ptr(),
            ev_expires: s.ev_expires.ptr(),
        };
        let m = self.run_put(st, &io, now, kind)?;
        if let Some(ev) = evicted
            && m > 0
        {
            let mut outputs = vec![
                (io.ev_keys, m * 8),
                (io.ev_rows, m * w * 8),
                (io.ev_scores, m * 8),
            ];
            if ev.expires_ms.is_some() {
                outputs.push((io.ev_expires, m * 8));
            }
            let q = st.host.fetch(&self.dev, &outputs, &st.stream)?;
            st.stream.synchronize().drv("cuStreamSynchronize")?;
            let mode = self.dev.copy;
            // SAFETY: the stream was waited for just above.
            unsafe {
                st.host.words_into(mode, q[0], &mut ev.keys[..m])?;
                st.host.words_into(mode, q[1], &mut ev.values[..m * w])?;
                st.host.words_into(mode, q[2], &mut ev.scores[..m])?;
                if let Some(x) = ev.expires_ms.as_deref_mut() {
                    st.host.words_into(mode, q[3], &mut x[..m])?;
                }
            }
        }
        Ok(m)
    }

    /// Get (`access`), peek, or contains (`values_out` is `None`) from host slices.
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
        self.dev.bind()?;
        let mut guard = self.lock();
        let st = &mut *guard;
        let w = self.width;
        let s = self.staging(&mut st.staging, n)?;
        st.host.send(
            &self.dev,
            self.dev.copy,
            &[(keys, s.keys.ptr())],
            &st.stream,
        )?;
        let io = LookupIo {
            n,
            keys: s.keys.ptr(),
            values: if values_out.is_some() {
                s.values.ptr()
            } else {
                0
            },
            found: s.found.ptr(),
            access,
        };
        self.enqueue_lookup(st, &io)?;
        let mut outputs = vec![(io.found, n)];
        if values_out.is_some() {
            outputs.push((io.values, n * w * 8));
        }
        let q = st.host.fetch(&self.dev, &outputs, &st.stream)?;
        self.finish_lookup(st, &io)?;
        // SAFETY: `finish_lookup` waited for the stream, after the copies.
        unsafe {
            st.host.flags_into(q[0], found_out)?;
            if let Some(v) = values_out {
                st.host.words_into(self.dev.copy, q[1], &mut v[..n * w])?;
            }
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
        let mut guard = self.lock();
        let st = &mut *guard;
        let now = self.cache.clock.now_ms();
        let w = self.width;
        let table = self.table_args(st);
        let take = outputs.is_some();
        let ls = local_slots(n as u64) as usize;
        grown(
            &mut st.local,
            n,
            |l| l.cap,
            |cap| Local::new(&self.dev, cap),
        )?;
        self.staging(&mut st.staging, n)?;
        let (Some(l), Some(s)) = (st.local.as_ref(), st.staging.as_ref()) else {
            return Err(device_error("cache scratch missing after allocation"));
        };
        let stream = &st.stream;
        st.host
            .send(&self.dev, self.dev.copy, &[(keys, s.keys.ptr())], stream)?;
        st.reset_counters()?;
        let a = CacheArgs {
            table,
            clock: st.clock,
            now,
            n: n as u64,
            keys_in: s.keys.ptr(),
            values: if take { s.values.ptr() } else { 0 },
            found_out: if take { s.found.ptr() } else { 0 },
            expires_out: if take { s.expires.ptr() } else { 0 },
            local: l.local.ptr(),
            // A take has the first occurrence of each key return it; a delete needs no
            // dedup (the atomic and counts a repeated key once).
            pick: if take { l.pick.ptr() } else { 0 },
            slot_of: l.slot_of.ptr(),
            local_mask: ls as u64 - 1,
            first_wins: 1,
            ..CacheArgs::default()
        };
        if take {
            for b in [&l.local, &l.pick] {
                b.memset(0, ls * 4, stream)?;
            }
            self.dev.launch(&k.dedup, &a, n as u64, stream)?;
        }
        self.dev.launch_warps(&k.take, &a, n as u64, stream)?;
        let q = if take {
            let outputs = [
                (a.found_out, n),
                (a.values, n * w * 8),
                (a.expires_out, n * 8),
            ];
            st.host.fetch(&self.dev, &outputs, stream)?
        } else {
            Vec::new()
        };
        let c = st.read_counters()?;
        if c[cache_counter::ERRORS] != 0 {
            return Err(device_error(format!(
                "the cache take lost {} keys in its batch-local table (a broken invariant)",
                c[cache_counter::ERRORS]
            )));
        }
        if let Some((values_out, found_out, expires_out)) = outputs {
            let mode = self.dev.copy;
            // SAFETY: `read_counters` waited for the stream, after the copies.
            unsafe {
                st.host.flags_into(q[0], found_out)?;
                st.host.words_into(mode, q[1], &mut values_out[..n * w])?;
                st.host.words_into(mode, q[2], &mut expires_out[..n])?;
            }
        }
        Ok(c[cache_counter::REMOVED] as usize)
    }

    /// [`KvBackend::put_and_evict`] of a batch already in device memory of the table's
    /// context ([`context`](Self::context)): the same checks (bad lengths, scores where the
    /// policy refuses or lacks them, evicted outputs too small, buffers of another
    /// context: an error, and the table unchanged), the same contract and the same results
    /// as the put from host slices. The first `m` entries of `evicted` receive what the put
    /// evicted or turned away; returns `m`. Runs on the table's stream, after the writes of
    /// the buffers that cudarc tracks, and returns once the put is done.
    ///
    /// ```no_run
    /// use kv_backend_cuda::{CudaCache, DeviceCachePut, DeviceEvicted};
    /// use kv_core::{CacheConfig, CachePolicy, Error, TableConfig};
    ///
    /// let t = CudaCache::open(TableConfig::new(1 << 20).cache(CacheConfig::new(CachePolicy::Lru)))?;
    /// let s = t.new_stream()?;
    /// let drv = |e: kv_backend_cuda::cudarc::driver::DriverError| Error::device("cuda", e.to_string());
    /// let keys = s.clone_htod(&[1u64, 2, 3]).map_err(drv)?;
    /// let rows = s.clone_htod(&[10u64, 20, 30]).map_err(drv)?;
    /// let mut ek = s.alloc_zeros::<u64>(3).map_err(drv)?;
    /// let mut er = s.alloc_zeros::<u64>(3).map_err(drv)?;
    /// let mut es = s.alloc_zeros::<u64>(3).map_err(drv)?;
    /// let m = t.put_and_evict_device(
    ///     &DeviceCachePut::new(&keys, &rows),
    ///     &mut DeviceEvicted::new(&mut ek, &mut er, &mut es),
    /// )?;
    /// assert_eq!(m, 0);
    /// # Ok::<(), kv_core::Error>(())
    /// ```
    pub fn put_and_evict_device(
        &self,
        batch: &DeviceCachePut<'_>,
        evicted: &mut DeviceEvicted<'_>,
    ) -> Result<usize> {
        self.put_device(batch, Some(evicted))
    }

    /// [`KvBackend::put_cached`] of a batch already in device memory: as
    /// [`put_and_evict_device`](Self::put_and_evict_device), evicting silently (counted).
    pub fn put_cached_device(&self, batch: &DeviceCachePut<'_>) -> Result<usize> {
        self.put_device(batch, None)
    }

    fn put_device(
        &self,
        batch: &DeviceCachePut<'_>,
        evicted: Option<&mut DeviceEvicted<'_>>,
    ) -> Result<usize> {
        let n = batch.keys.len();
        let w = self.width;
        check_cache_put_len(
            w,
            self.cache.policy,
            n,
            batch.values.len(),
            batch.scores.map(|s| s.len()),
            batch.ttl_ms.map(|t| t.len()),
        )?;
        if let Some(ev) = &evicted {
            check_evicted_len(
                n,
                w,
                ev.keys.len(),
                ev.values.len(),
                ev.scores.len(),
                ev.expires_ms.as_ref().map(|e| e.len()),
            )?;
        }
        check_cache_batch(n)?;
        let mut streams = vec![batch.keys.stream(), batch.values.stream()];
        streams.extend(batch.scores.map(|s| s.stream()));
        streams.extend(batch.ttl_ms.map(|t| t.stream()));
        if let Some(ev) = &evicted {
            streams.extend([ev.keys.stream(), ev.values.stream(), ev.scores.stream()]);
            streams.extend(ev.expires_ms.as_ref().map(|e| e.stream()));
        }
        for s in streams {
            self.dev.check_context(s)?;
        }
        if n == 0 {
            return Ok(0);
        }
        self.dev.bind()?;
        let mut guard = self.lock();
        let st = &mut *guard;
        let stream = st.stream.clone();
        // The guards make the table's stream wait for the buffers' last writes, and record
        // its use of them when they drop (after the put is done).
        let (keys, _k) = batch.keys.device_ptr(&stream);
        let (values, _v) = batch.values.device_ptr(&stream);
        let (scores, _s) = match batch.scores {
            Some(x) => {
                let (p, g) = x.device_ptr(&stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (ttl, _t) = match batch.ttl_ms {
            Some(x) => {
                let (p, g) = x.device_ptr(&stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let mut io = PutIo {
            n,
            keys,
            values,
            scores,
            ttl,
            ..PutIo::default()
        };
        let now = self.cache.clock.now_ms();
        let Some(ev) = evicted else {
            return self.run_put(st, &io, now, PutKind::Put);
        };
        let (ek, _ek) = ev.keys.device_ptr_mut(&stream);
        let (er, _er) = ev.values.device_ptr_mut(&stream);
        let (es, _es) = ev.scores.device_ptr_mut(&stream);
        let (ee, _ee) = match ev.expires_ms.as_deref_mut() {
            Some(x) => {
                let (p, g) = x.device_ptr_mut(&stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        (io.ev_keys, io.ev_rows, io.ev_scores, io.ev_expires) = (ek, er, es, ee);
        self.run_put(st, &io, now, PutKind::Put)
    }

    /// [`KvBackend::get`] of keys already in device memory of the table's context: writes
    /// value rows (zeros when missing) to `values_out` (`u64[n * width]`) and 0/1 to
    /// `found_out` (`u8[n]`); an access, as a get from host slices is (same checks, same
    /// results). Returns once the lookup is done.
    pub fn get_device(
        &self,
        keys: &impl DevicePtr<u64>,
        values_out: &mut impl DevicePtrMut<u64>,
        found_out: &mut impl DevicePtrMut<u8>,
    ) -> Result<()> {
        self.lookup_device(keys, values_out, found_out, true)
    }

    /// [`KvBackend::peek`] of keys already in device memory: as
    /// [`get_device`](Self::get_device), but no score changes.
    pub fn peek_device(
        &self,
        keys: &impl DevicePtr<u64>,
        values_out: &mut impl DevicePtrMut<u64>,
        found_out: &mut impl DevicePtrMut<u8>,
    ) -> Result<()> {
        self.lookup_device(keys, values_out, found_out, false)
    }

    fn lookup_device(
        &self,
        keys: &impl DevicePtr<u64>,
        values_out: &mut impl DevicePtrMut<u64>,
        found_out: &mut impl DevicePtrMut<u8>,
        access: bool,
    ) -> Result<()> {
        let n = keys.len();
        check_get_len(self.width, n, values_out.len(), found_out.len())?;
        check_cache_batch(n)?;
        for s in [keys.stream(), values_out.stream(), found_out.stream()] {
            self.dev.check_context(s)?;
        }
        if n == 0 {
            return Ok(());
        }
        self.dev.bind()?;
        let mut guard = self.lock();
        let st = &mut *guard;
        let stream = st.stream.clone();
        let (kp, _k) = keys.device_ptr(&stream);
        let (vp, _v) = values_out.device_ptr_mut(&stream);
        let (fp, _f) = found_out.device_ptr_mut(&stream);
        let io = LookupIo {
            n,
            keys: kp,
            values: vp,
            found: fp,
            access,
        };
        self.run_lookup(st, &io)
    }

    /// Copies the table's arrays to the host under its lock (plain device-to-host copies on
    /// the table's stream, in pieces), then decodes them with the lock let go: each live
    /// entry with its score as the contract states it and its expiry time.
    fn export_image(&self) -> Result<TableImage> {
        self.dev.bind()?;
        let slots = self.buckets * B;
        let mut keys = vec![0u64; slots];
        let mut scores = vec![0u64; slots];
        let mut expires = vec![0u64; slots];
        let mut rows = vec![0u64; slots * self.width];
        let mut used = vec![0u32; self.buckets];
        let (clock, now) = {
            let st = self.lock();
            st.keys.read_to_host(&mut keys, &st.stream)?;
            st.scores.read_to_host(&mut scores, &st.stream)?;
            st.expires.read_to_host(&mut expires, &st.stream)?;
            st.rows.read_to_host(&mut rows, &st.stream)?;
            st.used.read_to_host(&mut used, &st.stream)?;
            (st.clock, self.cache.clock.now_ms())
        };
        let arrays = CacheArrays {
            keys: &keys,
            scores: &scores,
            expires: &expires,
            rows: &rows,
            used: &used,
        };
        Ok(arrays.image(self.width, self.cache.policy, clock, now))
    }

    /// Puts a part of an image back: the entries not expired now, through the put kernels
    /// with the scores stored as given (the custom policy; a part without scores is put as
    /// a put would) and each entry's time to live from now, which gives back its expiry
    /// time; then the logical clock moves to at least the image's. A part with bad lengths
    /// changes nothing.
    fn restore_part(&self, part: ImagePart<'_>) -> Result<()> {
        part.check(self.width)?;
        check_cache_batch(part.keys.len())?;
        self.dev.bind()?;
        let mut guard = self.lock();
        let now = self.cache.clock.now_ms();
        let r = CacheRestore::new(&part, self.width, self.cache.policy, now)?;
        if !r.keys.is_empty() {
            let ttl = r.ttl(now);
            let batch = HostPut {
                keys: &r.keys,
                values: &r.values,
                scores: r.scores.as_deref(),
                ttl: Some(&ttl),
            };
            let kind = match r.scores {
                Some(_) => PutKind::Restore,
                None => PutKind::Put,
            };
            self.put_host(&mut guard, &batch, now, kind, None)?;
        }
        guard.clock = guard.clock.max(r.clock);
        guard.stats.clock = guard.clock;
        Ok(())
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
        let scratch = st.local.as_ref().map_or(0, Local::bytes)
            + st.ev.as_ref().map_or(0, |e| e.buf.bytes())
            + st.staging.as_ref().map_or(0, Staging::bytes);
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
        Ok(cache_bucket(key, self.seed, self.buckets as u64))
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

    /// Puts the entries back with their scores and absolute expiry times, leaving out those
    /// expired now, and moves the logical clock to at least the image's.
    fn restore(&self, part: ImagePart<'_>) -> Result<()> {
        self.restore_part(part)
    }
}
