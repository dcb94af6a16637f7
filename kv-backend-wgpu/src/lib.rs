//! vramkv's wgpu backend: the hash table lives in the memory of any GPU that wgpu reaches
//! through Vulkan, Metal or DX12, and WGSL compute shaders run every operation on it.
//!
//! ```no_run
//! use kv_backend_wgpu::WgpuBackend;
//! use kv_core::{KvBackend, TableConfig};
//!
//! let table = WgpuBackend::open(TableConfig::new(1 << 20).width(2))?;
//! table.put(&[1, 2, u64::MAX], &[10, 11, 20, 21, 30, 31])?;
//! let (mut values, mut found) = (vec![0; 4], vec![false; 2]);
//! table.get(&[2, 3], &mut values, &mut found)?;
//! assert_eq!((values, found), (vec![20, 21, 0, 0], vec![true, false]));
//! println!("{:?}", table.describe());
//! # Ok::<(), kv_core::Error>(())
//! ```
//!
//! # Adapters
//!
//! The shaders need u64 arithmetic and 64-bit atomics (compare-exchange, max):
//! `wgpu::Features::SHADER_INT64 | SHADER_INT64_ATOMIC_ALL_OPS`. NVIDIA's, AMD's and
//! Intel's Vulkan drivers offer them, and so does Mesa's lavapipe (Vulkan on the CPU, which
//! the tests use on machines without a GPU). An adapter without them is refused with
//! [`Error::BackendUnavailable`] naming the missing feature; there is no 32-bit fallback.
//! [`adapters`] lists what wgpu sees. A table opens on adapter [`TableConfig::device`] if
//! set, else on the first discrete GPU with the features, else on the first adapter with
//! them. One device per adapter per process, shared by every table and thread; its limits
//! are the adapter's own (largest buffers and bindings).
//!
//! # Table layout
//!
//! Structure of arrays in storage buffers: keys (`0` = EMPTY, `1` = TOMBSTONE, so that a
//! zeroed buffer is an empty table), value rows of `width` words, a special area for the
//! user keys `0` and `1`, and a block of control words (counters, per-chunk flags). Linear
//! probing from a murmur3-`fmix64` home slot. One storage binding is limited (near 2 GiB
//! on Vulkan drivers whatever they report, 128 MiB on lavapipe), so the key and value
//! arrays are split into *segments* of a power-of-two number of slots, each bound as its
//! own binding; the shaders are generated for the number of segments. The segments are
//! ranges of buffers of at most [`DEFAULT_TABLE_BUFFER_BYTES`] (2 GiB): on NVIDIA's Vulkan
//! driver, random probes into an array made of many small allocations miss the address
//! translation caches far more often (a 2 GiB array in 256 MiB buffers probes 5× slower
//! than in one buffer), while one buffer beyond 2 GiB is slower again.
//!
//! Large tables: on the H100 through Vulkan, random probes into a table whose arrays pass
//! 2 GiB each (2^28 slots of u64 keys and values) run about 5× slower than into a smaller
//! one, in any buffer layout, where CUDA on the same card is not affected: the threads of
//! a chunk touch pages all over the table at once (docs/PERF.md, "The wgpu slow mode").
//! Such tables (more than [`REGION_ORDER_MIN_SLOTS`] slots) therefore probe in *region
//! order*: each chunk first sorts its items by table region (256 regions, a counting sort
//! on the device) and the probing kernels take them in that order, so that the threads
//! running at once touch a few regions of the table. On the H100 this took the place pass
//! of a 100M-key put from 193 to 19 ms and the lookup from 130 to 19 ms (a 2^29-slot
//! table). [`WgpuOptions::region_order`] forces it off or on, to compare both with one
//! binary.
//!
//! Admission, growth and tombstone purges follow [`kv_core::prepare_put`] like every
//! backend, and the counts of every batch go to the table's [`kv_core::Books`]
//! (docs/protocol.md); a rehash runs on the device into buffers allocated before the old
//! ones are released (a failed allocation leaves the table as it was).
//!
//! # Batches
//!
//! A batch is cut into chunks that go through a few pooled staging lanes (mapped upload
//! and readback buffers plus the chunk's device buffers): one submission per chunk, the
//! host filling the next chunk while the device works on the previous one, and waiting on
//! a submission index (never busy-polling) only to reuse a lane or to finish the batch.
//! A put resolves repeats per chunk in a small lane-local table first (the last occurrence
//! of each key wins there), then only those winners place their keys with compare-exchange
//! and write their rows; overwrites of keys from earlier chunks cost nothing extra. Counters
//! read back at the end of each put and delete keep [`KvBackend::len`] exact. Every batch
//! holds the table's lock for its whole run, so batches are atomic with respect to each
//! other (lookups share the lock).
//!
//! Errors never panic: device loss, out-of-memory and validation errors come back as
//! [`Error::Device`] or [`Error::OutOfDeviceMemory`]. A put or delete that fails part-way
//! still counts what it applied when the device can report it (contract item g).
//!
//! # Cache tables
//!
//! [`WgpuCache`] is a cache table (a [`TableConfig::cache`] config: a fixed budget, an
//! eviction policy, expiry, docs/cache.md) on the same devices, with kernels of its own:
//! a put applies its keys one invocation per touched bucket, in batch order, with no
//! locks. [`WgpuBackend`] refuses a cache config with [`Error::Unsupported`].
//!
//! # Byte tables
//!
//! [`WgpuBytes`] is a byte table ([`kv_core::ByteTable`], docs/arena.md: byte-string keys
//! and values, expiry, an arena planned by `kv_arena`): the index and the arena live in
//! storage buffers and WGSL kernels probe, compare keys byte for byte, write entries,
//! gather values and move records; the host hashes, deduplicates and plans.
//!
//! # Exports
//!
//! [`KvBackend::export`] (and [`kv_core::ByteTable::export`]) copies the table's buffers
//! (the key and value segments and the special area; a cache table's keys, scores, expiry
//! times, rows and used words; a byte table's index and arena) into a mapped staging
//! buffer, in chunks of at most [`kv_staging::image::EXPORT_CHUNK_BYTES`], under one hold
//! of the table's lock, lets the lock go, and only then decodes the copy on the host: no
//! shader runs, and other batches wait no longer than the copy. [`WgpuCache`]'s restore
//! runs its put kernel with the image's scores stored as given and their expiry times.
//!
//! # Options
//!
//! [`WgpuOptions`], passed to [`WgpuBackend::open_with`], set the staging chunk size, the
//! segment and buffer sizes of the table's arrays, region order, the probe budget, and turn
//! on a trace of where each batch's time went. [`WgpuOptions::from_env`] reads them from
//! `VRAMKV_WGPU_*` variables, for tools; the library never reads the environment itself.

mod bytes;
mod bytes_shader;
mod cache;
mod gpu;
mod gpu_trace;
mod lane;
mod mapping;
mod op;
mod options;
mod pipeline;
mod plan;
mod shader;
mod state;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kv_core::{
    Audit, Books, Description, Error, Housekeeping, KvBackend, Result, TableConfig, TableImage,
    check_contains, check_get, check_put, count_distinct, prepare_put,
};
use kv_kernels::layout::counter;
use kv_staging::LanePool;
use kv_staging::trace::Recorder;

pub use bytes::WgpuBytes;
pub use cache::{ROUND_ITEMS, WgpuCache};
pub use gpu::{AdapterInfo, CPU_PROBE_BUDGET, GPU_PROBE_BUDGET};
use gpu::{BACKEND, Gpu};
use lane::Lane;
use op::Op;
pub use options::{
    CHUNK_MIB_ENV, PROBE_BUDGET_ENV, REGION_ORDER_ENV, SEGMENT_MIB_ENV, TABLE_BUFFER_MIB_ENV,
    TRACE_ENV, WgpuOptions,
};
use plan::Plan;
pub use plan::REGION_ORDER_MIN_SLOTS;
use state::State;

/// The environment variable that makes a missing wgpu adapter a test failure instead of a
/// skip (CI sets it, with lavapipe installed).
pub const REQUIRE_ENV: &str = "VRAMKV_REQUIRE_WGPU";

/// Every adapter wgpu offers here (Vulkan, Metal, DX12), usable or not.
///
/// ```no_run
/// for a in kv_backend_wgpu::adapters() {
///     println!("{a}"); // "#0 NVIDIA H100 (vulkan, DiscreteGpu), 64-bit atomics: yes"
/// }
/// ```
pub fn adapters() -> Vec<AdapterInfo> {
    gpu::adapter_infos()
}

/// Why the wgpu backend cannot run here, or `None` if it can (some adapter offers 64-bit
/// atomics and a device opens on it). Used by the tests to skip on machines without one.
pub fn unavailable_reason() -> Option<String> {
    match gpu::gpu(&TableConfig::default()) {
        Ok(_) => None,
        Err(Error::BackendUnavailable { reason, .. }) => Some(reason),
        Err(e) => Some(e.to_string()),
    }
}

/// Bytes of each buffer holding table segments at most, by default. Measured on an H100
/// through Vulkan (docs/PERF.md, "The wgpu slow mode"): random probes into a table whose
/// arrays are one 2 GiB buffer each run at full speed, into 256 MiB buffers (eight per 2 GiB
/// array) 5x slower, and into one 4 GiB buffer per array 2.5x slower than into 1 GiB ones.
pub const DEFAULT_TABLE_BUFFER_BYTES: u64 = 2 << 30;

/// A vramkv table in the memory of a GPU driven through wgpu.
pub struct WgpuBackend {
    gpu: Arc<Gpu>,
    cfg: TableConfig,
    options: WgpuOptions,
    plan: Plan,
    max_seg_bytes: u64,
    state: RwLock<State>,
    /// Staging lanes between batches (taken out by a batch, put back after).
    pool: LanePool<Lane>,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("adapter", &self.gpu.name)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// What [`prepare_put`] needs from a wgpu table while a put of `keys` is being prepared.
struct Prep<'a> {
    table: &'a WgpuBackend,
    st: &'a mut State,
    keys: &'a [u64],
}

impl Housekeeping for Prep<'_> {
    fn books(&mut self) -> &mut Books {
        &mut self.st.books
    }
    fn rehash(&mut self, slots: usize) -> Result<()> {
        self.st.rehash(&self.table.gpu, slots)
    }
    fn count_missing(&mut self) -> Result<usize> {
        let (r, counters) = self
            .table
            .counted_batch(self.st, self.keys, Op::CountMissing);
        r?;
        let c = counters.ok_or_else(|| gpu::device_error("count-missing read no counters"))?;
        Ok(c[counter::MISSING] as usize)
    }
    fn count_new(&mut self) -> Result<usize> {
        let mut found = vec![false; self.keys.len()];
        let op = Op::Contains { found: &mut found };
        self.table.host_batch(self.st, self.keys, op, &mut None)?;
        Ok(count_distinct(self.keys, &found))
    }
}

impl WgpuBackend {
    /// Creates a table on adapter `cfg.device` (default: the first discrete GPU with 64-bit
    /// atomics, else the first adapter with them), with the default [`WgpuOptions`].
    ///
    /// Fails with [`Error::InvalidConfig`] for a bad config, [`Error::BackendUnavailable`]
    /// when no adapter (or not the chosen one) offers the needed features,
    /// [`Error::OutOfDeviceMemory`] when the table does not fit.
    pub fn open(cfg: TableConfig) -> Result<Self> {
        Self::open_with(cfg, &WgpuOptions::default())
    }

    /// [`open`](Self::open) with `options`; a bad option is [`Error::InvalidConfig`].
    ///
    /// ```no_run
    /// use kv_backend_wgpu::{WgpuBackend, WgpuOptions};
    /// use kv_core::TableConfig;
    ///
    /// // Segments of 1 MiB in buffers of 4 MiB, to exercise a many-segment table.
    /// let options = WgpuOptions::default()
    ///     .segment_bytes(1 << 20)
    ///     .table_buffer_bytes(4 << 20);
    /// let table = WgpuBackend::open_with(TableConfig::new(1 << 20), &options)?;
    /// assert!(table.segments() > 1);
    /// # Ok::<(), kv_core::Error>(())
    /// ```
    pub fn open_with(cfg: TableConfig, options: &WgpuOptions) -> Result<Self> {
        cfg.validate()?;
        options.validate()?;
        if cfg.cache.is_some() {
            return Err(Error::Unsupported {
                backend: "wgpu",
                what: "cache tables (TableConfig::cache) in a WgpuBackend; open them with WgpuCache",
            });
        }
        let gpu = gpu::gpu(&cfg)?;
        let max_seg_bytes = options
            .segment_bytes
            .unwrap_or(u64::MAX)
            .min(gpu.max_binding)
            .max(8 * cfg.width as u64);
        let buffer_bytes = options
            .table_buffer_bytes
            .unwrap_or(DEFAULT_TABLE_BUFFER_BYTES);
        let mut state = State::new(&gpu, &cfg, max_seg_bytes, buffer_bytes, cfg.table_seed())?;
        if let Some(b) = options.probe_budget {
            state.budget = b.max(1);
        }
        gpu.check()?;
        Ok(WgpuBackend {
            gpu,
            cfg,
            plan: Plan::new(options),
            options: options.clone(),
            max_seg_bytes,
            state: RwLock::new(state),
            pool: LanePool::new(plan::POOL_MAX),
        })
    }

    /// Whether the table lives on a discrete GPU (vramkv's automatic choice uses only those).
    pub fn is_discrete_gpu(&self) -> bool {
        self.gpu.discrete
    }

    /// The adapter's name.
    pub fn adapter_name(&self) -> &str {
        &self.gpu.name
    }

    /// How many segments (storage bindings) the key array is split into.
    pub fn segments(&self) -> usize {
        self.read().segs.len()
    }

    /// How many buffers hold the key and value arrays' segments, together (2 when each
    /// array is one buffer).
    pub fn table_buffers(&self) -> usize {
        self.read().buffers.len()
    }

    /// The most slots one shader invocation probes per dispatch (see
    /// [`set_probe_budget`](Self::set_probe_budget)).
    pub fn probe_budget(&self) -> u32 {
        self.read().budget
    }

    /// Sets the most slots one shader invocation probes per dispatch (at least 1).
    ///
    /// Every probe (put, get, contains, delete, the dedup of a put chunk, a rehash) stops
    /// after this many slots in one dispatch, saves where it is, and is resumed in another
    /// dispatch; a result is only taken from a probe that finished. This keeps each shader
    /// invocation below the loop limits some drivers enforce (Mesa's llvmpipe ends an
    /// invocation's loops after about 65,535 iterations) and each dispatch short under a
    /// watchdog. The default is [`CPU_PROBE_BUDGET`] on a software adapter and
    /// [`GPU_PROBE_BUDGET`] on a GPU: random keys never need a second round there, and only
    /// chains longer than the budget (keys crafted against a known seed) pay a round, a
    /// submission and a wait, per budget's worth of slots. Tests set a small budget to
    /// exercise the resumed probes with short chains.
    ///
    /// ```no_run
    /// use kv_backend_wgpu::WgpuBackend;
    /// use kv_core::{KvBackend, TableConfig};
    /// let table = WgpuBackend::open(TableConfig::new(1000))?;
    /// table.set_probe_budget(4);
    /// table.put(&[1, 2, 3], &[10, 20, 30])?; // correct whatever the budget
    /// # Ok::<(), kv_core::Error>(())
    /// ```
    pub fn set_probe_budget(&self, steps: u32) {
        self.write().budget = steps.max(1);
    }

    /// How many resume rounds this table has run: dispatches that finished probes which had
    /// used up their [budget](Self::set_probe_budget) (in batches and in rehashes). Zero
    /// unless some chain is longer than the budget; a diagnostic, and the tests' proof that
    /// they reached the resumed probes.
    pub fn resume_rounds(&self) -> u64 {
        self.read()
            .resumed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most segments a table may have on this adapter (its storage-binding limit).
    pub fn max_segments(&self) -> usize {
        self.gpu.max_segments()
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `count` lanes of at least `cap` items from the pool, allocating what is missing.
    fn take_lanes(&self, count: usize, cap: usize) -> Result<Vec<Lane>> {
        self.pool.take(count, cap, || {
            Lane::new(&self.gpu, cap, self.cfg.width, self.options.trace.as_ref())
        })
    }

    /// Runs a host batch on the current state with pooled lanes. A put's or delete's
    /// control words go to `counters`, as far as the batch got.
    fn host_batch(
        &self,
        st: &State,
        keys: &[u64],
        mut op: Op<'_>,
        counters: &mut Option<[u64; counter::LEN]>,
    ) -> Result<()> {
        self.gpu.check()?;
        let cap = self
            .plan
            .lane_cap(keys.len(), self.cfg.width, self.max_seg_bytes);
        let count = keys.len().div_ceil(cap).min(plan::LANES);
        let mut lanes = self.take_lanes(count, cap)?;
        let rec = Recorder::new(self.options.trace.as_ref());
        let r = pipeline::run_host_batch(
            &self.gpu, st, &self.plan, &rec, &mut lanes, cap, keys, &mut op, counters,
        );
        if r.is_err() {
            // Leave nothing in flight; the lanes are dropped, not pooled.
            for l in &mut lanes {
                l.drain(&self.gpu);
            }
        } else {
            self.pool.give_back(lanes);
        }
        r
    }

    /// Runs a put or delete, then reads the control words it left: after a failure
    /// part-way too, where the device can still report them (contract item g).
    fn counted_batch(
        &self,
        st: &State,
        keys: &[u64],
        op: Op<'_>,
    ) -> (Result<()>, Option<[u64; counter::LEN]>) {
        let mut counters = None;
        let r = self.host_batch(st, keys, op, &mut counters);
        if r.is_err() && counters.is_some() {
            // Some chunk was submitted: the control words hold what the batch applied.
            if let Ok(c) = st.read_counters(&self.gpu) {
                lane::merge(&mut counters, c);
            }
        }
        // Leave the control words zeroed, so that a batch whose first chunk never runs
        // reads no counts of this one.
        st.zero_counters(&self.gpu);
        (r, counters)
    }
}

impl KvBackend for WgpuBackend {
    fn width(&self) -> usize {
        self.cfg.width
    }

    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        check_put(self.cfg.width, keys, values)?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut st = self.write();
        prepare_put(
            &mut Prep {
                table: self,
                st: &mut st,
                keys,
            },
            keys.len(),
        )?;
        let (r, counters) = self.counted_batch(&st, keys, Op::Put { values });
        let counted = match counters {
            Some(c) => st.count_put(&c),
            None => Ok(()),
        };
        r.and(counted)
    }

    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.cfg.width, keys, values_out, found_out)?;
        if keys.is_empty() {
            return Ok(());
        }
        let st = self.read();
        let op = Op::Get {
            values: values_out,
            found: found_out,
        };
        self.host_batch(&st, keys, op, &mut None)
    }

    fn delete(&self, keys: &[u64]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut st = self.write();
        let (r, counters) = self.counted_batch(&st, keys, Op::Delete);
        let removed = counters.map_or(0, |c| st.count_delete(&c));
        r.map(|()| removed)
    }

    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_contains(keys, found_out)?;
        if keys.is_empty() {
            return Ok(());
        }
        let st = self.read();
        self.host_batch(&st, keys, Op::Contains { found: found_out }, &mut None)
    }

    fn len(&self) -> usize {
        self.read().books.len()
    }

    fn capacity(&self) -> usize {
        self.read().books.capacity()
    }

    fn clear(&self) -> Result<()> {
        self.gpu.check()?;
        self.write().clear(&self.gpu)
    }

    /// Counts live keys and tombstones in the key array with a compute pass and returns
    /// them next to the host's books.
    fn audit(&self) -> Result<Audit> {
        // The write lock: a count between whole batches (item d).
        let st = self.write();
        let mut lanes = self.take_lanes(1, plan::MIN_LANE)?;
        let dev = lanes[0].count(&self.gpu, &st);
        self.pool.give_back(lanes);
        let (live, tombs) = dev?;
        Ok(st.books.audit(live, tombs))
    }

    /// Copies the key and value arrays and the special area to the host under the write
    /// lock (in chunks through a mapped staging buffer), then decodes them with the lock
    /// let go.
    fn export(&self) -> Result<TableImage> {
        self.gpu.check()?;
        let raw = self.write().copy_out(&self.gpu)?;
        Ok(raw.decode())
    }

    fn describe(&self) -> Description {
        let st = self.read();
        let lanes: u64 = self.pool.with_idle(|l| l.iter().map(Lane::bytes).sum());
        Description {
            backend: BACKEND,
            device: self.gpu.name.clone(),
            bytes_in_use: st.bytes() + lanes,
            slots: st.books.slots(),
        }
    }
}
