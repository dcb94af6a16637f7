//! vramkv's CUDA backend: the hash table lives in GPU memory; the kernels are Rust
//! (crate `kv-kernels`, shipped as PTX and JIT-compiled by the driver for the GPU at hand).
//!
//! ```no_run
//! use kv_backend_cuda::CudaBackend;
//! use kv_core::{KvBackend, TableConfig};
//!
//! let table = CudaBackend::open(TableConfig::new(1 << 20))?;
//! table.put(&[1, 2, u64::MAX], &[10, 20, 30])?;
//! let (mut values, mut found) = (vec![0; 2], vec![false; 2]);
//! table.get(&[2, 3], &mut values, &mut found)?;
//! assert_eq!((values, found), (vec![20, 0], vec![true, false]));
//! # Ok::<(), kv_core::Error>(())
//! ```
//!
//! # Driver access: cudarc, loaded at run time
//!
//! The backend talks to the CUDA *driver* API through cudarc with `dynamic-loading`:
//! `libcuda.so` is opened when the first table is created, not linked at build time. So
//! building needs no CUDA toolkit, and a binary with this backend compiled in starts on a
//! machine without an NVIDIA driver, where [`CudaBackend::open`] answers
//! [`Error::BackendUnavailable`] and vramkv falls back to another backend. We check that the
//! library and every entry point we use are present before the first driver call (cudarc
//! would panic otherwise), and turn every driver error into an [`Error`] (out of memory into
//! [`Error::OutOfDeviceMemory`]), never a panic.
//!
//! Why not `cust` (rust-cuda's driver wrapper): it links `libcuda` at build time, so it
//! needs a CUDA installation to compile, and a binary built with it cannot even start on a
//! machine without the driver, which would rule out the CPU fallback.
//!
//! # Devices
//!
//! [`devices`] lists the GPUs (name, total and free memory). A table opens on
//! [`TableConfig::device`] if set, else on the GPU with the most free memory (chosen once
//! per process). One context per device per process (the driver's primary context), shared
//! by every table and thread. GPUs of compute capability 7.0 (Volta) or newer are supported.
//!
//! # Table layout
//!
//! One slot array in device memory, made of buckets: their keys (EMPTY = `0`, TOMBSTONE =
//! `1`, as on every GPU backend), then their value rows (`kv_kernels::layout::{key_word,
//! row_word}`). At width 1 a bucket is two keys and their two values, 32 bytes, one DRAM
//! sector; wider tables use buckets of four keys (one sector) then four rows. Probes read a
//! window of keys at once (a bucket of two, or four keys) and a key found in its home window
//! is read with its value in one trip to memory at width 1. A small special area for the
//! two user keys equal to the sentinels (handled inside the kernels, so device-resident
//! batches need no host help), and a counter block. Linear probing over windows, from the
//! one holding a murmur3-`fmix64` home slot. One allocation per array, made at creation
//! and at each growth; growth
//! rehashes on the device into arrays allocated *before* the old ones are released, so a
//! failed allocation leaves the table as it was. Admission, growth and tombstone purges
//! follow [`kv_core::prepare_put`], and the counts of every batch go to the table's
//! [`kv_core::Books`], as on every backend (docs/protocol.md).
//!
//! # Host batches
//!
//! A batch from host memory is cut into chunks that stream through three staging lanes
//! (device buffers and one stream each, plus pinned host buffers: write-combined for what
//! only goes to the device, cached for what the host reads back), so that the copy in, the
//! kernels and the copy out of consecutive chunks overlap, and the host's copies between the
//! caller's slices and the pinned buffers (on all cores, with rayon) overlap the device
//! work. Chunks are large (a third of the batch, up to 32 MiB of keys and values): each
//! chunk's host copy is a fork-join over all cores whose fixed cost, measured on an H100
//! host, outweighed the extra overlap of 8–16 smaller chunks (docs/PERF.md); only the last
//! two chunks' worth of a large batch is cut finer, so that little work is left once the
//! last host copy is done. A get copies a chunk's keys in and the previous chunk's results
//! out in one fork-join. The chunks of
//! a put apply in batch order (each chunk's kernels wait, on the device, for the previous
//! chunk's); those of get, contains and delete run concurrently. Staging lanes are pooled
//! and reused, so a steady stream of batches allocates no pinned or device memory. The host
//! waits only to reuse a lane and once at the end of the batch (to read the counters that
//! keep `len()` exact).
//!
//! [`CudaOptions`], passed to [`CudaBackend::open_with`], change the pipeline's shape
//! (lanes, largest chunk), the launches' grid, how the host copies write (see
//! [`kv_staging::copy`]: with non-temporal stores, which skip the read for ownership of each
//! destination line, the default on x86-64, or with ordinary ones), and turn on a trace of
//! where each batch's time went: for a host batch the host's waits and copies, for a
//! device-resident one the device time of each step. [`CudaOptions::from_env`] reads them
//! from `VRAMKV_*` variables, for tools; the library never reads the environment itself.
//!
//! To skip the host's copies altogether, borrow a [`PinnedBatch`] from the table
//! ([`CudaBackend::pinned_batch`]), write keys and values into it, and call
//! [`CudaBackend::put_pinned`] / [`CudaBackend::get_pinned`]: its chunks (8 to 16 per batch,
//! up to 16 MiB, over four lanes) are copied straight between the lent page-locked memory and
//! the device. On the H100 this reaches the PCIe link for lookups (5.1 G lookups/s of
//! u64→u64 at 100M keys per batch, against 2.4 from a `Vec`).
//!
//! A put resolves duplicates on the device, per chunk: every item first places its key in
//! the table (CAS) and writes its row; items that share a key agree on one slot. Only a
//! chunk in which some item found its key already in the table (an overwrite, or a key the
//! chunk repeats) then records the last occurrence of every key in a small chunk-local
//! table (lane scratch, 4 bytes a slot, mostly L2-resident), and only when a key repeats
//! does its last occurrence write its row again. A chunk of fresh keys costs one pass over
//! the table (see `kv_kernels::ops` and docs/protocol.md).
//!
//! [`CudaBackend::put_device`] and [`CudaBackend::get_device`] take keys and values already
//! in VRAM (cudarc device slices allocated on [`CudaBackend::context`]), for GPU pipelines.
//!
//! # Byte tables
//!
//! [`CudaBytes`] is a byte table in VRAM (docs/arena.md): byte-string keys and values in
//! Arrow-layout batches, an open-addressing index of (hash, arena address, lengths,
//! expiry) and an arena of device segments that the host plans (`kv_arena`) and the
//! kernels of `kv_kernels::ops::bytes` fill, read, compact and purge. `vramkv::open_bytes`
//! opens one on the CUDA backend.
//!
//! # Cache tables
//!
//! [`CudaCache`] is a cache table in VRAM (docs/cache.md): a fixed budget of buckets, an
//! eviction policy (LRU, LFU or the caller's scores), expiry, and puts that report what
//! they evict. [`CudaBackend`] refuses a cache config; `vramkv::open` opens a
//! [`CudaCache`] for one.
//!
//! # Exports
//!
//! [`KvBackend::export`] (and [`kv_core::ByteTable::export`]) copies the table's device
//! arrays (the slot array and the special area; a cache table's keys, scores, expiry
//! times, rows and used words; a byte table's index and arena segments) to host memory
//! with plain device-to-host copies on the table's stream, at most
//! [`kv_staging::image::EXPORT_CHUNK_BYTES`] at a time, under one hold of the table's
//! lock, lets the lock go, and only then decodes the copy on the host: no kernel runs, and
//! other batches wait no longer than the copy. [`CudaCache`]'s restore runs its put kernels
//! with the custom policy, so that the image's scores are stored as given, and each
//! entry's time to live from now, which gives back its expiry time.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The cudarc this backend is built with: device-resident batches
/// ([`CudaBackend::put_device`]) are its device slices, on [`CudaBackend::context`].
pub use cudarc;

use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut};
use kv_core::{
    Audit, Books, Description, Error, Housekeeping, KvBackend, Result, TableConfig, TableImage,
    check_contains, check_get, check_get_len, check_put, check_put_len, count_distinct,
    prepare_put,
};
use kv_kernels::layout::counter;
use kv_staging::LanePool;

mod bytes;
mod bytes_gpu;
mod bytes_host;
mod bytes_slabs;
mod cache;
mod gpu;
mod lane;
mod memory;
mod options;
mod pinned;
mod pipeline;
mod plan;
mod state;
mod trace;

pub use bytes::{CudaBytes, HostMirrorBytes};
pub use cache::{CudaCache, DeviceCachePut, DeviceEvicted};
use gpu::{BACKEND, Device, Drv, device_error};
pub use gpu::{DeviceInfo, devices, is_available};
use lane::Lane;
pub use options::{BLOCKS_PER_SM_ENV, CHUNK_ENV, CudaOptions, L2_FETCH_ENV, LANES_ENV, TRACE_ENV};
pub use pinned::PinnedBatch;
use pipeline::{HostBatch, Op};
use state::State;
use trace::Marks;

/// A vramkv table in the memory of one NVIDIA GPU.
pub struct CudaBackend {
    dev: Device,
    cfg: TableConfig,
    state: RwLock<State>,
    /// Staging lanes between batches (taken out by a batch, put back after).
    pool: LanePool<Lane>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev.name)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// How a put being prepared counts its keys that the table does not hold.
type Count<'a> = &'a mut dyn FnMut(&CudaBackend, &mut State) -> Result<usize>;

/// What [`prepare_put`] needs from a CUDA table while a put is being prepared: the
/// table, its state under the write lock, and how to count the keys of the batch that the
/// table does not hold (every occurrence, on the device; then the distinct ones).
struct Prep<'a> {
    table: &'a CudaBackend,
    st: &'a mut State,
    missing: Count<'a>,
    new: Count<'a>,
}

impl Housekeeping for Prep<'_> {
    fn books(&mut self) -> &mut Books {
        &mut self.st.books
    }
    fn rehash(&mut self, slots: usize) -> Result<()> {
        self.st.rehash(&self.table.dev, slots, self.table.cfg.width)
    }
    fn count_missing(&mut self) -> Result<usize> {
        (self.missing)(self.table, self.st)
    }
    fn count_new(&mut self) -> Result<usize> {
        (self.new)(self.table, self.st)
    }
}

impl CudaBackend {
    /// Creates a table on the GPU `cfg.device` (default: the one with the most free memory),
    /// with the default [`CudaOptions`].
    ///
    /// Fails with [`Error::InvalidConfig`] for a bad config, [`Error::BackendUnavailable`]
    /// when there is no driver or no usable GPU, [`Error::OutOfDeviceMemory`] when the table
    /// does not fit.
    pub fn open(cfg: TableConfig) -> Result<Self> {
        Self::open_with(cfg, &CudaOptions::default())
    }

    /// [`open`](Self::open) with `options`; a bad option is [`Error::InvalidConfig`].
    ///
    /// ```no_run
    /// use kv_backend_cuda::{CudaBackend, CudaOptions};
    /// use kv_core::TableConfig;
    /// use kv_staging::trace::Tracer;
    ///
    /// let tracer = Tracer::kept();
    /// let options = CudaOptions::default().lanes(4).trace(tracer.clone());
    /// let table = CudaBackend::open_with(TableConfig::new(1 << 20), &options)?;
    /// # Ok::<(), kv_core::Error>(())
    /// ```
    pub fn open_with(cfg: TableConfig, options: &CudaOptions) -> Result<Self> {
        cfg.validate()?;
        options.validate()?;
        if cfg.cache.is_some() {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: "cache tables (TableConfig::cache) in CudaBackend; open a CudaCache",
            });
        }
        let gpu = gpu::gpu(&cfg)?;
        gpu.bind()?;
        let dev = Device::new(gpu, options)?;
        let state = State::new(&dev, &cfg, cfg.table_seed())?;
        Ok(CudaBackend {
            pool: LanePool::new(dev.shapes.pool_max()),
            dev,
            cfg,
            state: RwLock::new(state),
        })
    }

    /// The CUDA context the table lives in (for allocating device-resident batches).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }

    /// A new stream on the table's context, e.g. to allocate and fill device-resident batches.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.dev.bind()?;
        self.dev.ctx.new_stream().drv("cuStreamCreate")
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `count` lanes of at least `cap` items from the pool, allocating what is missing.
    fn take_lanes(&self, count: usize, cap: usize) -> Result<Vec<Lane>> {
        self.pool
            .take(count, cap, || Lane::new(&self.dev, cap, self.cfg.width))
    }

    /// Runs a host batch on the current state, with pooled lanes.
    fn host_batch(&self, st: &State, mut batch: HostBatch<'_>, after_main: bool) -> Result<()> {
        let n = batch.keys.len();
        let shapes = &self.dev.shapes;
        let cap = shapes.lane_cap(n, self.cfg.width, batch.pinned);
        let count = n.div_ceil(cap).min(shapes.of(batch.pinned).lanes);
        let mut lanes = self.take_lanes(count, cap)?;
        // Every buffer is allocated before the first chunk: a failure leaves the table as it was.
        let needs = batch.needs();
        if let Err(e) = lanes
            .iter_mut()
            .try_for_each(|l| l.ensure_host(&self.dev, needs))
        {
            self.pool.give_back(lanes);
            return Err(e);
        }
        let after = if after_main {
            st.ready.record(&st.main).drv("cuEventRecord")?;
            Some(&st.ready)
        } else {
            None
        };
        let r = pipeline::run_host_batch(
            &self.dev,
            st.table_args(self.cfg.width),
            &mut lanes,
            cap,
            &mut batch,
            after,
        );
        match r {
            Ok(()) => self.pool.give_back(lanes),
            Err(_) => {
                // Leave nothing in flight before the pinned buffers are freed.
                for l in &lanes {
                    let _ = l.stream.synchronize();
                }
            }
        }
        r
    }

    /// How many distinct keys of `keys` (in host memory) are not in the table: a lookup of
    /// them, then [`count_distinct`].
    fn count_new_keys(&self, st: &State, keys: &[u64]) -> Result<usize> {
        let mut found = vec![false; keys.len()];
        let batch = HostBatch {
            keys,
            op: Op::Contains { found: &mut found },
            pinned: false,
        };
        self.host_batch(st, batch, false)?;
        Ok(count_distinct(keys, &found))
    }

    /// How many of `keys` (in host memory) are not in the table, every occurrence counted:
    /// a lookup pass on the device that only adds to a counter.
    fn count_missing_keys(&self, st: &mut State, keys: &[u64]) -> Result<usize> {
        st.reset_counters()?;
        let batch = HostBatch {
            keys,
            op: Op::CountMissing,
            pinned: false,
        };
        // After the main stream (the counters' reset).
        self.host_batch(st, batch, true)?;
        Ok(st.read_counters()?[counter::MISSING] as usize)
    }

    /// [`count_missing_keys`](Self::count_missing_keys) of keys in this table's device
    /// memory: one launch over the batch.
    fn count_missing_device(&self, st: &mut State, keys: &impl DevicePtr<u64>) -> Result<usize> {
        let (n, w) = (keys.len(), self.cfg.width);
        st.reset_counters()?;
        let lanes = self.take_lanes(
            1,
            plan::device_cap(1, w, self.dev.shapes.copy.max_chunk_bytes),
        )?;
        let lane = &lanes[0];
        st.ready.record(&st.main).drv("cuEventRecord")?;
        lane.stream.wait(&st.ready).drv("cuStreamWaitEvent")?;
        let r = {
            let (kp, _kg) = keys.device_ptr(&lane.stream);
            let a = lane.args(st.table_args(w), kp, 0, 0, n);
            self.dev
                .launch(&self.dev.k.count_missing, &a, n as u64, &lane.stream)
        };
        let synced = lane.stream.synchronize().drv("cuStreamSynchronize");
        r.and(synced)?;
        self.pool.give_back(lanes);
        Ok(st.read_counters()?[counter::MISSING] as usize)
    }

    /// Readies the table for a put of `n` keys ([`prepare_put`]): admission, growth or a
    /// tombstone purge, the keys the table does not hold counted by `missing` (every
    /// occurrence) and `new` (the distinct ones) where it must.
    fn prepare_put(
        &self,
        st: &mut State,
        n: usize,
        mut missing: impl FnMut(&CudaBackend, &mut State) -> Result<usize>,
        mut new: impl FnMut(&CudaBackend, &mut State) -> Result<usize>,
    ) -> Result<()> {
        prepare_put(
            &mut Prep {
                table: self,
                st,
                missing: &mut missing,
                new: &mut new,
            },
            n,
        )
    }

    /// Puts a batch whose keys (`u64[n]`) and values (`u64[n * width]`) are already in this
    /// table's device memory. Same semantics as [`KvBackend::put`].
    pub fn put_device(
        &self,
        keys: &impl DevicePtr<u64>,
        values: &impl DevicePtr<u64>,
    ) -> Result<()> {
        let (n, w) = (keys.len(), self.cfg.width);
        check_put_len(w, n, values.len())?;
        if n == 0 {
            return Ok(());
        }
        self.check_context(keys.stream())?;
        self.check_context(values.stream())?;
        self.dev.bind()?;
        let mut st = self.write();
        self.prepare_put(
            &mut st,
            n,
            |t, st| t.count_missing_device(st, keys),
            |t, st| {
                // The distinct new keys are counted on the host: copy the keys back (only
                // for a batch whose missing keys, counted on the device, do not fit).
                let host = st.main.clone_dtoh(keys).drv("cuMemcpyDtoH (keys)")?;
                st.main.synchronize().drv("cuStreamSynchronize")?;
                t.count_new_keys(st, &host)
            },
        )?;
        st.reset_counters()?;
        let cap = plan::device_cap(n, w, self.dev.shapes.copy.max_chunk_bytes);
        let mut lanes = self.take_lanes(1, cap)?;
        let lane = &lanes[0];
        st.ready.record(&st.main).drv("cuEventRecord")?;
        lane.stream.wait(&st.ready).drv("cuStreamWaitEvent")?;
        let r = (|| {
            let (kp, _kg) = keys.device_ptr(&lane.stream);
            let (vp, _vg) = values.device_ptr(&lane.stream);
            let table = st.table_args(w);
            let mut marks = Marks::start(&self.dev, self.dev.trace.as_ref(), &lane.stream)?;
            let mut start = 0;
            while start < n {
                let m = cap.min(n - start);
                let a = lane.args(
                    table,
                    kp + 8 * start as u64,
                    vp + 8 * (start * w) as u64,
                    0,
                    m,
                );
                lane.enqueue_put(&self.dev, &a, marks.as_mut())?;
                start += m;
            }
            Ok(marks)
        })();
        let synced = lane.stream.synchronize().drv("cuStreamSynchronize");
        let done = r.and_then(|m| synced.map(|()| m));
        if let Ok(marks) = &done {
            if let Some(m) = marks {
                m.report("put_device", n);
            }
            self.pool.give_back(std::mem::take(&mut lanes));
        }
        // Even after a fault part-way, count what the chunks that ran applied.
        let counted = st.count_put();
        done.and(counted)
    }

    /// Looks up keys already in device memory: writes value rows (zeros when missing) to
    /// `values_out` (`u64[n * width]`) and 0/1 to `found_out` (`u8[n]`). Same semantics as
    /// [`KvBackend::get`].
    pub fn get_device(
        &self,
        keys: &impl DevicePtr<u64>,
        values_out: &mut impl DevicePtrMut<u64>,
        found_out: &mut impl DevicePtrMut<u8>,
    ) -> Result<()> {
        let (n, w) = (keys.len(), self.cfg.width);
        check_get_len(w, n, values_out.len(), found_out.len())?;
        if n == 0 {
            return Ok(());
        }
        self.check_context(keys.stream())?;
        self.check_context(values_out.stream())?;
        self.check_context(found_out.stream())?;
        self.dev.bind()?;
        let st = self.read();
        // A lookup needs no scratch: one launch over the whole batch, on a pooled lane's stream.
        let lanes = self.take_lanes(
            1,
            plan::device_cap(1, w, self.dev.shapes.copy.max_chunk_bytes),
        )?;
        let lane = &lanes[0];
        let r = {
            let (kp, _kg) = keys.device_ptr(&lane.stream);
            let (vp, _vg) = values_out.device_ptr_mut(&lane.stream);
            let (fp, _fg) = found_out.device_ptr_mut(&lane.stream);
            let a = lane.args(st.table_args(w), kp, vp, fp, n);
            Marks::start(&self.dev, self.dev.trace.as_ref(), &lane.stream).and_then(|mut marks| {
                self.dev
                    .launch(&self.dev.k.get, &a, n as u64, &lane.stream)?;
                if let Some(m) = marks.as_mut() {
                    m.mark(&self.dev, "get", &lane.stream)?;
                }
                Ok(marks)
            })
        };
        let synced = lane.stream.synchronize().drv("cuStreamSynchronize");
        if let Some(m) = r.and_then(|m| synced.map(|()| m))? {
            m.report("get_device", n);
        }
        self.pool.give_back(lanes);
        Ok(())
    }

    /// A batch of `n` items (keys, value rows of this table's width, found flags) in
    /// page-locked host memory that the table lends: fill its keys (and values) in place,
    /// then [`put_pinned`](Self::put_pinned) / [`get_pinned`](Self::get_pinned) copy
    /// straight between it and the GPU, without the copy through staging buffers that
    /// [`KvBackend::put`] and [`KvBackend::get`] make. Allocate it once and reuse it:
    /// page-locking memory is slow (milliseconds per hundred MiB).
    ///
    /// Fails with an error (never a panic) when the driver refuses the page-locked allocation.
    pub fn pinned_batch(&self, n: usize) -> Result<PinnedBatch> {
        self.dev.bind()?;
        PinnedBatch::new(&self.dev, n, self.cfg.width)
    }

    fn check_batch(&self, batch: &PinnedBatch) -> Result<()> {
        let w = self.cfg.width;
        if batch.width() != w {
            return Err(Error::LengthMismatch {
                what: "values",
                expected: batch.len() * w,
                got: batch.values().len(),
            });
        }
        if batch.context().cu_ctx() != self.dev.ctx.cu_ctx() {
            return Err(device_error(
                "the pinned batch belongs to another CUDA device",
            ));
        }
        Ok(())
    }

    /// Puts the batch's `len()` keys with their value rows; same semantics as
    /// [`KvBackend::put`] (the last occurrence of a key wins; bad input changes nothing; a
    /// device fault part-way may leave the batch applied in part). The batch is only read.
    pub fn put_pinned(&self, batch: &PinnedBatch) -> Result<()> {
        self.check_batch(batch)?;
        self.put_host(batch.keys(), batch.values(), true)
    }

    /// Looks up the batch's `len()` keys: writes each key's value row (zeros when missing)
    /// into [`PinnedBatch::values`] and 1 or 0 into [`PinnedBatch::found`]; same semantics
    /// as [`KvBackend::get`]. The keys are left as they were.
    pub fn get_pinned(&self, batch: &mut PinnedBatch) -> Result<()> {
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        let st = self.read();
        let (keys, values, found) = batch.parts_for_get();
        let hb = HostBatch {
            keys,
            op: Op::GetPinned { values, found },
            pinned: true,
        };
        self.host_batch(&st, hb, false)
    }

    /// A put of checked host slices (page-locked ones when `pinned`), under the write lock.
    fn put_host(&self, keys: &[u64], values: &[u64], pinned: bool) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        let mut st = self.write();
        self.prepare_put(
            &mut st,
            keys.len(),
            |t, st| t.count_missing_keys(st, keys),
            |t, st| t.count_new_keys(st, keys),
        )?;
        st.reset_counters()?;
        let batch = HostBatch {
            keys,
            op: Op::Put { values },
            pinned,
        };
        let r = self.host_batch(&st, batch, true);
        // Even after a fault part-way, count what the chunks that ran applied.
        let counted = st.count_put();
        r.and(counted)
    }

    fn check_context(&self, stream: &CudaStream) -> Result<()> {
        self.dev.check_context(stream)
    }
}

impl KvBackend for CudaBackend {
    fn width(&self) -> usize {
        self.cfg.width
    }

    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        check_put(self.cfg.width, keys, values)?;
        self.put_host(keys, values, false)
    }

    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.cfg.width, keys, values_out, found_out)?;
        if keys.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        let st = self.read();
        let batch = HostBatch {
            keys,
            op: Op::Get {
                values: values_out,
                found: found_out,
            },
            pinned: false,
        };
        self.host_batch(&st, batch, false)
    }

    fn delete(&self, keys: &[u64]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.dev.bind()?;
        let mut st = self.write();
        st.reset_counters()?;
        let batch = HostBatch {
            keys,
            op: Op::Delete,
            pinned: false,
        };
        let r = self.host_batch(&st, batch, true);
        // Even after a fault part-way, count what the chunks that ran removed.
        let removed = st.count_delete();
        r.and(removed)
    }

    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_contains(keys, found_out)?;
        if keys.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        let st = self.read();
        let batch = HostBatch {
            keys,
            op: Op::Contains { found: found_out },
            pinned: false,
        };
        self.host_batch(&st, batch, false)
    }

    fn len(&self) -> usize {
        self.read().books.len()
    }

    fn capacity(&self) -> usize {
        self.read().books.capacity()
    }

    fn clear(&self) -> Result<()> {
        self.dev.bind()?;
        self.write().clear()
    }

    /// Counts live keys and tombstones in the key array with a kernel and returns them
    /// next to the host's books.
    fn audit(&self) -> Result<Audit> {
        self.dev.bind()?;
        let mut st = self.write();
        let (live, tombs) = st.count(&self.dev, self.cfg.width)?;
        Ok(st.books.audit(live, tombs))
    }

    /// Copies the slot array and the special area to the host under the write lock (plain
    /// device-to-host copies on the table's main stream, in pieces), then decodes them with
    /// the lock let go.
    fn export(&self) -> Result<TableImage> {
        self.dev.bind()?;
        self.write().export(&self.dev, self.cfg.width)
    }

    fn describe(&self) -> Description {
        let st = self.read();
        let lanes: usize = self
            .pool
            .with_idle(|l| l.iter().map(Lane::device_bytes).sum());
        Description {
            backend: BACKEND,
            device: self.dev.name.clone(),
            bytes_in_use: (st.bytes() + lanes) as u64,
            slots: st.books.slots(),
        }
    }
}

/// The environment variable that makes a missing CUDA device a test failure instead of a
/// skip (set it on GPU machines).
pub const REQUIRE_ENV: &str = "VRAMKV_REQUIRE_CUDA";

/// Why the CUDA backend cannot run here, or `None` if it can (a driver and at least one
/// device of compute capability 7.0+). Used by the tests to skip on machines without a GPU.
pub fn unavailable_reason() -> Option<String> {
    match devices() {
        Ok(d) if d.iter().any(DeviceInfo::supported) => None,
        Ok(d) => Some(format!(
            "no CUDA device of compute capability 7.0+ (found: {})",
            d.iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(Error::BackendUnavailable { reason, .. }) => Some(reason),
        Err(e) => Some(e.to_string()),
    }
}
