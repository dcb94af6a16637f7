//! The table in VRAM and the host pipeline that feeds it.
//!
//! # Pipeline
//!
//! A batch from host memory is cut into chunks ([`copy_cap`]: few and large, since each
//! chunk's host copy is a fork-join over all cores with a fixed cost; [`chunk_plan`] cuts
//! the tail of a large batch finer, so that what is left after the last host copy is
//! short). Each chunk goes
//! through one of a few staging *lanes* (a stream, pinned host buffers, device buffers, two
//! events), round robin, so that while the GPU runs chunk `c`'s kernels, chunk `c + 1` is
//! being copied in and chunk `c - 1`'s results copied out, and the host copies (user slice
//! ↔ pinned, in parallel with rayon) overlap both; a get or contains copies a chunk's keys
//! in and the previous chunk's results out of the same lane in one fork-join. The host only
//! waits for a lane when it needs to reuse it, and once at the end of the batch.
//!
//! A put's kernels must apply in batch order (a later chunk overwrites an earlier one):
//! each chunk's first kernel waits (`cuStreamWaitEvent`, on the device) for the previous
//! chunk's last kernel, while its copies do not wait. Get, contains and delete chunks are
//! independent and run concurrently.
//!
//! A batch in lent page-locked memory ([`crate::PinnedBatch`]) takes the same path without
//! the host copies: each chunk is copied between the batch's own buffers and the lane's
//! device buffers. With no host copy to amortise, its chunks are smaller and more
//! numerous ([`spread_cap`], 8 to 16 per batch) and it uses four lanes.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaEvent, CudaStream};
use kv_core::{Error, Result};
use kv_kernels::layout::{
    BatchArgs, RehashArgs, TableArgs, counter, flag, local_slots, special_words,
};
use kv_staging::copy::{PAR_MIN, par_bools, par_copy};

use crate::gpu::{BACKEND, DevBuf, Drv, Gpu, Pinned, dtoh_slice, event, htod_slice, stream};
use crate::trace::{HostTrace, Marks};

/// Staging lanes of a batch copied through the lanes' pinned buffers (default;
/// `VRAMKV_CUDA_LANES` overrides).
const COPY_LANES: usize = 3;
/// Largest chunk of such a batch, bytes of keys + values (default; `VRAMKV_CUDA_CHUNK_MIB`
/// overrides).
const COPY_CHUNK_BYTES: usize = 32 << 20;
/// Staging lanes of a batch in lent page-locked memory (default; `VRAMKV_CUDA_LANES`
/// overrides).
const PINNED_LANES: usize = 4;
/// Largest chunk of such a batch (default; `VRAMKV_CUDA_CHUNK_MIB` overrides).
const PINNED_CHUNK_BYTES: usize = 16 << 20;
/// Chunks a lent batch is cut into at least, when the chunk size bounds allow it.
const TARGET_CHUNKS: usize = 8;
/// Bytes of keys + values per chunk of a lent batch at least.
const MIN_CHUNK_BYTES: usize = 1 << 20;
/// Smallest lane (items); lanes are sized in powers of two so that they are reused.
const MIN_LANE: usize = 4096;

/// Environment variable: staging lanes per host batch (1..=16), for measurements.
pub const LANES_ENV: &str = "VRAMKV_CUDA_LANES";
/// Environment variable: largest chunk in MiB of keys + values (1..=256), for measurements.
pub const CHUNK_ENV: &str = "VRAMKV_CUDA_CHUNK_MIB";

/// The pipeline's shape for one kind of host batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub lanes: usize,
    pub max_chunk_bytes: usize,
}

/// The environment's overrides of the host pipeline, read once per process.
#[derive(Clone, Copy, Debug)]
struct Overrides {
    lanes: Option<usize>,
    chunk_bytes: Option<usize>,
}

fn overrides() -> Overrides {
    static T: OnceLock<Overrides> = OnceLock::new();
    *T.get_or_init(|| {
        let var = |name: &str, lo: usize, hi: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .map(|v| v.clamp(lo, hi))
        };
        Overrides {
            lanes: var(LANES_ENV, 1, 16),
            chunk_bytes: var(CHUNK_ENV, 1, 256).map(|m| m << 20),
        }
    })
}

/// The shape of a batch copied through the lanes (`pinned == false`) or of a lent
/// page-locked batch.
pub(crate) fn shape(pinned: bool) -> Shape {
    let o = overrides();
    let (lanes, chunk) = (o.lanes, o.chunk_bytes);
    let (l, c) = if pinned {
        (PINNED_LANES, PINNED_CHUNK_BYTES)
    } else {
        (COPY_LANES, COPY_CHUNK_BYTES)
    };
    Shape {
        lanes: lanes.unwrap_or(l),
        max_chunk_bytes: chunk.unwrap_or(c),
    }
}

/// Lanes kept in a table's pool between batches.
pub(crate) fn pool_max() -> usize {
    2 * shape(false).lanes.max(shape(true).lanes)
}

fn pow2_floor(x: usize) -> usize {
    1usize << (usize::BITS - 1 - x.max(1).leading_zeros())
}

/// Items per chunk of a host batch of `n` keys of `width` words.
pub(crate) fn lane_cap(n: usize, width: usize, pinned: bool) -> usize {
    let sh = shape(pinned);
    if pinned {
        spread_cap(n, width, sh.max_chunk_bytes)
    } else {
        copy_cap(n, width, sh.max_chunk_bytes)
    }
}

/// Items per chunk of a device-resident put (the chunk only bounds the lane's scratch).
pub(crate) fn device_cap(n: usize, width: usize) -> usize {
    copy_cap(n, width, COPY_CHUNK_BYTES)
}

/// Items per chunk of a batch copied through the lanes: `n / 3` rounded up to a power of
/// two, at most `max_chunk_bytes` of keys and values. Few, large chunks: each chunk's host
/// copy is a fork-join over all cores, whose fixed cost (waking the workers) measured on the
/// H100 host (PERF.md) outweighs the overlap that more, smaller chunks would give.
pub(crate) fn copy_cap(n: usize, width: usize, max_chunk_bytes: usize) -> usize {
    let max = pow2_floor((max_chunk_bytes / (8 * (width + 1))).max(MIN_LANE));
    n.div_ceil(3)
        .max(1)
        .next_power_of_two()
        .clamp(MIN_LANE, max)
}

/// Items per chunk of a lent page-locked batch (no host copies, so chunks are cheap): a
/// power of two, so that a batch is cut into `TARGET_CHUNKS` to `2 * TARGET_CHUNKS` chunks
/// where the bounds of 1 MiB .. `max_chunk_bytes` of keys and values per chunk allow it; a
/// batch smaller than the smallest chunk is one chunk.
pub(crate) fn spread_cap(n: usize, width: usize, max_chunk_bytes: usize) -> usize {
    let row = 8 * (width + 1);
    let hi = pow2_floor((max_chunk_bytes / row).max(MIN_LANE));
    let lo = pow2_floor((MIN_CHUNK_BYTES / row).max(MIN_LANE)).min(hi);
    if n <= lo {
        return n.max(1).next_power_of_two().clamp(MIN_LANE, lo);
    }
    pow2_floor(n / TARGET_CHUNKS).clamp(lo, hi)
}

/// Full chunks a batch copied through the lanes needs before its tail is cut finer.
const TAIL_FROM_CHUNKS: usize = 4;

/// The chunks `(start, len)` of a host batch of `n` items in lanes of `cap` items.
///
/// A lent page-locked batch and a batch of fewer than [`TAIL_FROM_CHUNKS`] full chunks are
/// cut into full chunks. A larger batch copied through the lanes keeps full chunks until
/// less than two are left, then halves what is left chunk by chunk down to `cap / 8`: what
/// follows the last host copy (that chunk's transfer, kernels and, for a get, its copy
/// out) is then an eighth of a chunk's, for three or four more chunks.
pub(crate) fn chunk_plan(n: usize, cap: usize, pinned: bool) -> Vec<(usize, usize)> {
    let cap = cap.max(1);
    let mut plan = Vec::with_capacity(n.div_ceil(cap) + 4);
    let graduated = !pinned && n >= TAIL_FROM_CHUNKS * cap;
    let tail_min = (cap / 8).max(1);
    let mut start = 0;
    while start < n {
        let left = n - start;
        let m = if !graduated || left >= 2 * cap {
            cap.min(left)
        } else {
            left.div_ceil(2).max(tail_min).min(left)
        };
        plan.push((start, m));
        start += m;
    }
    plan
}

/// Which pinned staging buffers a host batch needs in its lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HostNeeds {
    keys: bool,
    vals_in: bool,
    vals_out: bool,
    found: bool,
}

/// One staging lane: a stream with its own device buffers for one chunk, and the pinned
/// host buffers that the batches it served needed (allocated on first need, then kept).
pub(crate) struct Lane {
    pub stream: Arc<CudaStream>,
    pub cap: usize,
    width: usize,
    /// Keys in (host writes only: write-combined).
    h_keys: Option<Pinned<u64>>,
    /// Put values in (host writes only: write-combined).
    h_vals_in: Option<Pinned<u64>>,
    /// Get values out: read on the host, so not write-combined.
    h_vals_out: Option<Pinned<u64>>,
    /// Found flags out (not write-combined).
    h_found: Option<Pinned<u8>>,
    d_keys: DevBuf,
    d_vals: DevBuf,
    /// Found flags (get/contains): u8[cap].
    d_found: DevBuf,
    /// u32[cap] slot of each key in the chunk-local table (put).
    d_slot: DevBuf,
    /// u32[local_slots(cap)] chunk-local dedup table (put; zeroed by the settle pass, the
    /// part the chunk uses only, in chunks that found a key already in the table).
    d_local: DevBuf,
    /// u32[flag::LEN] per-chunk put flags.
    d_flags: DevBuf,
    /// Recorded after the chunk's last operation on this lane.
    done: CudaEvent,
    /// Recorded after the chunk's last put kernel.
    kdone: CudaEvent,
    /// A chunk (start, len) whose output waits in the pinned buffers.
    pending: Option<(usize, usize)>,
}

fn host_buf<T: Copy>(
    slot: &mut Option<Pinned<T>>,
    gpu: &Gpu,
    len: usize,
    write_combined: bool,
) -> Result<()> {
    if slot.is_none() {
        *slot = Some(Pinned::new(gpu, len, write_combined)?);
    }
    Ok(())
}

impl kv_staging::Staged for Lane {
    fn cap(&self) -> usize {
        self.cap
    }
}

/// A lane's staging buffer (allocated by [`Lane::ensure_host`] before the batch).
fn staged<T: Copy>(b: &mut Option<Pinned<T>>) -> Result<&mut Pinned<T>> {
    b.as_mut().ok_or_else(lacks_buffer)
}

/// [`staged`], read-only.
fn staged_ref<T: Copy>(b: &Option<Pinned<T>>) -> Result<&Pinned<T>> {
    b.as_ref().ok_or_else(lacks_buffer)
}

fn lacks_buffer() -> Error {
    Error::Device {
        backend: BACKEND,
        message: "internal: a staging lane lacks its pinned buffer".into(),
    }
}

impl Lane {
    pub fn new(gpu: &Gpu, cap: usize, width: usize) -> Result<Lane> {
        Ok(Lane {
            stream: stream(gpu)?,
            cap,
            width,
            h_keys: None,
            h_vals_in: None,
            h_vals_out: None,
            h_found: None,
            d_keys: DevBuf::new(gpu, cap * 8)?,
            d_vals: DevBuf::new(gpu, cap * width * 8)?,
            d_found: DevBuf::new(gpu, cap)?,
            d_slot: DevBuf::new(gpu, cap * 4)?,
            d_local: DevBuf::new(gpu, local_slots(cap as u64) as usize * 4)?,
            d_flags: DevBuf::new(gpu, flag::LEN * 4)?,
            done: event(gpu)?,
            kdone: event(gpu)?,
            pending: None,
        })
    }

    /// Allocates the pinned buffers `needs` asks for that the lane lacks (before a batch
    /// starts, so that a failed allocation leaves the table untouched).
    pub fn ensure_host(&mut self, gpu: &Gpu, needs: HostNeeds) -> Result<()> {
        let (cap, w) = (self.cap, self.width);
        if needs.keys {
            host_buf(&mut self.h_keys, gpu, cap, true)?;
        }
        if needs.vals_in {
            host_buf(&mut self.h_vals_in, gpu, cap * w, true)?;
        }
        if needs.vals_out {
            host_buf(&mut self.h_vals_out, gpu, cap * w, false)?;
        }
        if needs.found {
            host_buf(&mut self.h_found, gpu, cap, false)?;
        }
        Ok(())
    }

    pub fn device_bytes(&self) -> usize {
        self.d_keys.bytes()
            + self.d_vals.bytes()
            + self.d_found.bytes()
            + self.d_slot.bytes()
            + self.d_local.bytes()
            + self.d_flags.bytes()
    }

    /// Batch arguments for a chunk of `n` items whose keys/values are at the given device
    /// addresses, with this lane's scratch.
    pub fn args(
        &self,
        table: TableArgs,
        keys: u64,
        values: u64,
        found: u64,
        n: usize,
    ) -> BatchArgs {
        BatchArgs {
            table,
            keys_in: keys,
            values,
            found_out: found,
            slot_of: self.d_slot.ptr(),
            local: self.d_local.ptr(),
            local_mask: local_slots(n as u64) - 1,
            flags: self.d_flags.ptr(),
            n: n as u64,
        }
    }

    /// Enqueues a put chunk (`a` from [`Lane::args`]): flags zeroed, then the place, settle,
    /// dedup and rewrite passes (see `kv_kernels::ops`).
    /// With `marks` (the trace), the end of each step is marked on the lane's stream.
    pub fn enqueue_put(
        &self,
        gpu: &Gpu,
        a: &BatchArgs,
        mut marks: Option<&mut Marks>,
    ) -> Result<()> {
        debug_assert!(a.n as usize <= self.cap && a.local_mask < local_slots(self.cap as u64));
        self.d_flags.memset(0, flag::LEN * 4, &self.stream)?;
        let n = a.n;
        // Fresh keys need only the first pass; the other three read a flag and exit unless
        // the chunk found keys in the table (kv_kernels::ops, "The put protocol").
        let passes = [
            (&gpu.k.put_place, "place"),
            (&gpu.k.put_settle, "settle"),
            (&gpu.k.put_dedup, "dedup"),
            (&gpu.k.put_rewrite, "rewrite"),
        ];
        for (k, name) in passes {
            gpu.launch(k, a, n, &self.stream)?;
            if let Some(m) = marks.as_deref_mut() {
                m.mark(gpu, name, &self.stream)?;
            }
        }
        Ok(())
    }
}

/// What a host batch does, with its output slices.
pub(crate) enum Op<'a> {
    Put {
        values: &'a [u64],
    },
    Get {
        values: &'a mut [u64],
        found: &'a mut [bool],
    },
    /// A get whose keys and outputs are page-locked ([`crate::PinnedBatch`]): copied
    /// straight between them and the device.
    GetPinned {
        values: &'a mut [u64],
        found: &'a mut [u8],
    },
    Contains {
        found: &'a mut [bool],
    },
    Delete,
}

impl Op<'_> {
    /// The same operation without the caller's slices (all empty), for the enqueueing of a
    /// staged chunk, which never touches them.
    pub fn shape(&self) -> Op<'static> {
        match self {
            Op::Put { .. } => Op::Put { values: &[] },
            Op::Get { .. } => Op::Get {
                values: Default::default(),
                found: Default::default(),
            },
            Op::GetPinned { .. } => Op::GetPinned {
                values: Default::default(),
                found: Default::default(),
            },
            Op::Contains { .. } => Op::Contains {
                found: Default::default(),
            },
            Op::Delete => Op::Delete,
        }
    }

    /// The operation's name, for the trace.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Put { .. } => "put",
            Op::Get { .. } => "get",
            Op::GetPinned { .. } => "get (lent)",
            Op::Contains { .. } => "contains",
            Op::Delete => "delete",
        }
    }
}

/// A host batch: its keys, what to do with them, and whether the keys (and a put's
/// values) are page-locked memory that the device copies from directly.
pub(crate) struct HostBatch<'a> {
    pub keys: &'a [u64],
    pub op: Op<'a>,
    pub pinned: bool,
}

impl HostBatch<'_> {
    /// The lane buffers this batch stages through.
    pub fn needs(&self) -> HostNeeds {
        let staged_in = !self.pinned;
        HostNeeds {
            keys: staged_in,
            vals_in: staged_in && matches!(self.op, Op::Put { .. }),
            vals_out: matches!(self.op, Op::Get { .. }),
            found: matches!(self.op, Op::Get { .. } | Op::Contains { .. }),
        }
    }
}

/// The table's device state (behind the backend's RwLock).
pub(crate) struct State {
    pub slots: usize,
    pub keys: DevBuf,
    pub values: DevBuf,
    pub special: DevBuf,
    pub counters: DevBuf,
    h_counters: Pinned<u64>,
    /// Stream for table-wide work (clear, rehash, counters); lanes wait on `ready`.
    pub main: Arc<CudaStream>,
    pub ready: CudaEvent,
    /// Entries, sentinel keys included.
    pub len: usize,
    /// Tombstones in the key array.
    pub tombs: usize,
    /// Sentinel keys present (0..=2).
    pub spec_len: usize,
    /// The table's hash seed (`TableConfig::seed`).
    pub seed: u64,
}

fn array_bytes(slots: usize, words: usize) -> Result<usize> {
    slots
        .checked_mul(words)
        .and_then(|w| w.checked_mul(8))
        .ok_or(Error::OutOfDeviceMemory {
            backend: BACKEND,
            requested_bytes: u64::MAX,
        })
}

impl State {
    pub fn new(gpu: &Gpu, slots: usize, width: usize, seed: u64) -> Result<State> {
        let keys = DevBuf::new(gpu, array_bytes(slots, 1)?)?;
        let values = DevBuf::new(gpu, array_bytes(slots, width)?)?;
        let special = DevBuf::new(gpu, special_words(width as u32) as usize * 8)?;
        let counters = DevBuf::new(gpu, counter::LEN * 8)?;
        let st = State {
            slots,
            keys,
            values,
            special,
            counters,
            h_counters: Pinned::new(gpu, counter::LEN, false)?,
            main: stream(gpu)?,
            ready: event(gpu)?,
            len: 0,
            tombs: 0,
            spec_len: 0,
            seed,
        };
        st.clear()?;
        Ok(st)
    }

    pub fn table_args(&self, width: usize) -> TableArgs {
        TableArgs {
            keys: self.keys.ptr(),
            values: self.values.ptr(),
            special: self.special.ptr(),
            counters: self.counters.ptr(),
            mask: self.slots as u64 - 1,
            width: width as u32,
            pad: 0,
            seed: self.seed,
        }
    }

    pub fn bytes(&self) -> usize {
        self.keys.bytes() + self.values.bytes() + self.special.bytes() + self.counters.bytes()
    }

    /// Keys in the key array (entries less the sentinel keys).
    pub fn table_len(&self) -> usize {
        self.len.saturating_sub(self.spec_len)
    }

    /// Empties the table: keys to EMPTY, sentinel keys absent. Synchronous.
    pub fn clear(&self) -> Result<()> {
        fill_empty(&self.keys, self.slots, &self.main)?;
        self.special.memset(0, self.special.bytes(), &self.main)?;
        self.counters.memset(0, self.counters.bytes(), &self.main)?;
        self.main.synchronize().drv("cuStreamSynchronize")
    }

    pub fn reset_counters(&self) -> Result<()> {
        self.counters.memset(0, counter::LEN * 8, &self.main)
    }

    /// Reads the counters back (waits for the main stream; callers have already waited
    /// for the lanes).
    pub fn read_counters(&mut self) -> Result<[u64; counter::LEN]> {
        self.h_counters
            .dtoh(self.counters.ptr(), counter::LEN, &self.main)?;
        self.main.synchronize().drv("cuStreamSynchronize")?;
        let mut out = [0u64; counter::LEN];
        out.copy_from_slice(&self.h_counters.as_slice()[..counter::LEN]);
        Ok(out)
    }

    /// Moves every entry into fresh arrays of `slots` slots (growth, or a tombstone purge
    /// when `slots` is unchanged). The new arrays are allocated first: on any error the
    /// table is left as it was.
    pub fn rehash(&mut self, gpu: &Gpu, slots: usize, width: usize) -> Result<()> {
        let keys = DevBuf::new(gpu, array_bytes(slots, 1)?)?;
        let values = DevBuf::new(gpu, array_bytes(slots, width)?)?;
        fill_empty(&keys, slots, &self.main)?;
        self.reset_counters()?;
        let a = RehashArgs {
            table: TableArgs {
                keys: keys.ptr(),
                values: values.ptr(),
                mask: slots as u64 - 1,
                ..self.table_args(width)
            },
            old_keys: self.keys.ptr(),
            old_values: self.values.ptr(),
            old_slots: self.slots as u64,
        };
        gpu.launch(&gpu.k.rehash, &a, self.slots as u64, &self.main)?;
        let c = self.read_counters()?;
        if c[counter::ERRORS] != 0 || c[counter::MOVED] != self.table_len() as u64 {
            return Err(Error::Device {
                backend: BACKEND,
                message: format!(
                    "rehash into {slots} slots moved {} of {} keys ({} probe overflows); table left as it was",
                    c[counter::MOVED],
                    self.table_len(),
                    c[counter::ERRORS]
                ),
            });
        }
        self.keys = keys;
        self.values = values;
        self.slots = slots;
        self.tombs = 0;
        Ok(())
    }

    /// Live keys and tombstones as the device counts them (checks and diagnostics).
    pub fn count(&mut self, gpu: &Gpu, width: usize) -> Result<(u64, u64)> {
        self.reset_counters()?;
        gpu.launch(
            &gpu.k.count,
            &self.table_args(width),
            self.slots as u64,
            &self.main,
        )?;
        let c = self.read_counters()?;
        Ok((c[counter::LIVE], c[counter::TOMBS]))
    }
}

/// Enqueues the fill of a key array with EMPTY (zero: one byte fill).
fn fill_empty(keys: &DevBuf, slots: usize, stream: &CudaStream) -> Result<()> {
    const _: () = assert!(kv_kernels::layout::EMPTY == 0);
    keys.memset(0, slots * 8, stream)
}

/// Runs a host batch through `lanes` (all of capacity `cap`, with the host buffers of
/// `batch.needs()`): see the module docs. On return (Ok or Err after a successful drain) no
/// work of the batch is in flight.
///
/// A batch copied through two or more lanes runs as a two-stage pipeline on the host: while
/// the pool copies chunk `c` into its lane, one thread enqueues chunk `c - 1`'s kernels and
/// result transfers (about ten driver calls, some 40 µs a chunk, that would otherwise sit
/// between the copies). Chunk `c - 1`'s transfers in are enqueued before, right after its
/// copy, and its stream's wait for the previous put chunk's kernels just before the join.
pub(crate) fn run_host_batch(
    gpu: &Gpu,
    table: TableArgs,
    lanes: &mut [Lane],
    cap: usize,
    batch: &mut HostBatch<'_>,
    after: Option<&CudaEvent>,
) -> Result<()> {
    let keys = batch.keys;
    let pinned = batch.pinned;
    let op = &mut batch.op;
    let n = keys.len();
    let plan = chunk_plan(n, cap, pinned);
    let chunks = plan.len();
    let nl = lanes.len();
    debug_assert!(nl >= 1 && lanes.iter().all(|l| l.cap >= cap));
    if let Some(ev) = after {
        for l in lanes.iter() {
            l.stream.wait(ev).drv("cuStreamWaitEvent")?;
        }
    }
    let is_put = matches!(op, Op::Put { .. });
    // Only chunks big enough for parallel copies: a fork-join from outside the pool costs
    // a wake-up (tens of µs), more than a small chunk's enqueueing.
    let pipelined = !pinned && nl >= 2 && cap >= join_min(op);
    // The lane of the last put chunk whose kernels are enqueued, and the chunk (lane, start,
    // len) copied in but whose kernels are not.
    let mut prev: Option<usize> = None;
    let mut queued: Option<(usize, usize, usize)> = None;
    let mut tr = HostTrace::new();
    for (c, &(start, m)) in plan.iter().enumerate() {
        let li = c % nl;
        // Reuse the lane: wait for its previous chunk (whose kernels are enqueued: it is at
        // least two chunks back when there are two lanes or more).
        tr.time(|t| &mut t.wait, || lanes[li].done.synchronize())
            .drv("cuEventSynchronize")?;
        if pinned {
            tr.time(|t| &mut t.copy_out, || drain_output(&mut lanes[li], op))?;
            let lane = &lanes[li];
            htod_slice(lane.d_keys.ptr(), &keys[start..start + m], &lane.stream)?;
            if let Op::Put { values } = op {
                let w = lane.width;
                htod_slice(
                    lane.d_vals.ptr(),
                    &values[start * w..(start + m) * w],
                    &lane.stream,
                )?;
            }
        } else {
            match queued.take() {
                // Pipelined: the queued chunk's kernels alongside this chunk's copies.
                Some((q, qs, qm)) => {
                    order_after(lanes, q, is_put, prev)?;
                    prev = Some(q);
                    let mut shape = op.shape();
                    let [ql, cl] = lanes.get_disjoint_mut([q, li]).map_err(|_| Error::Device {
                        backend: BACKEND,
                        message: "internal: a pipelined chunk reuses the lane being enqueued"
                            .into(),
                    })?;
                    let (launched, copied) = rayon::join(
                        || {
                            gpu.bind()
                                .and_then(|()| launch_chunk(gpu, table, ql, &mut shape, qs, qm))
                        },
                        || copy_chunk(cl, op, keys, start, m, &mut tr),
                    );
                    launched?;
                    copied?;
                }
                None => copy_chunk(&mut lanes[li], op, keys, start, m, &mut tr)?,
            }
            transfer_in(&mut lanes[li], op, m)?;
        }
        if pipelined {
            queued = Some((li, start, m));
        } else {
            order_after(lanes, li, is_put, prev)?;
            launch_chunk(gpu, table, &mut lanes[li], op, start, m)?;
            prev = Some(li);
        }
    }
    if let Some((q, qs, qm)) = queued {
        order_after(lanes, q, is_put, prev)?;
        launch_chunk(gpu, table, &mut lanes[q], op, qs, qm)?;
    }
    for lane in lanes.iter_mut() {
        tr.time(|t| &mut t.wait, || lane.done.synchronize())
            .drv("cuEventSynchronize")?;
        tr.time(|t| &mut t.copy_out, || drain_output(lane, op))?;
    }
    tr.report(op.name(), n, chunks, cap, nl);
    Ok(())
}

/// A put chunk's kernels on lane `li` wait (on the device) for the previous put chunk's,
/// on lane `prev`: kernels apply in batch order, while the copies enqueued before do not
/// wait. Nothing for other operations.
fn order_after(lanes: &[Lane], li: usize, is_put: bool, prev: Option<usize>) -> Result<()> {
    match prev {
        Some(p) if is_put && p != li => lanes[li]
            .stream
            .wait(&lanes[p].kdone)
            .drv("cuStreamWaitEvent"),
        // The same lane's stream runs its chunks in order anyway.
        _ => Ok(()),
    }
}

/// The host copies of a chunk going through the lane's pinned staging buffers: the lane's
/// previous output out (get, contains) and this chunk's keys (and a put's values) in.
fn copy_chunk(
    lane: &mut Lane,
    op: &mut Op<'_>,
    keys: &[u64],
    start: usize,
    m: usize,
    tr: &mut HostTrace,
) -> Result<()> {
    let w = lane.width;
    let keys = &keys[start..start + m];
    let large = m >= join_min(op);
    match op {
        Op::Get { .. } | Op::Contains { .. } => {
            // The previous chunk's output out and this chunk's keys in, in one fork-join:
            // one wake-up of the pool instead of two, and the two copies share the cores.
            let hk = staged(&mut lane.h_keys)?;
            let out = (&lane.h_vals_out, &lane.h_found);
            let pending = lane.pending.take();
            let (drained, ()) = tr.time(
                |t| &mut t.copy_both,
                || {
                    join_if(
                        large,
                        || drain_from(pending, w, out.0, out.1, op),
                        || par_copy(&mut hk.as_mut_slice()[..m], keys),
                    )
                },
            );
            drained
        }
        Op::Put { values } => {
            // Keys and values in one fork-join: twice the work per wake-up of the pool,
            // which at a few MiB per chunk costs as much as the copy.
            let hk = staged(&mut lane.h_keys)?;
            let hv = staged(&mut lane.h_vals_in)?;
            let values = &values[start * w..(start + m) * w];
            tr.time(
                |t| &mut t.copy_in,
                || {
                    join_if(
                        large,
                        || par_copy(&mut hk.as_mut_slice()[..m], keys),
                        || par_copy(&mut hv.as_mut_slice()[..m * w], values),
                    )
                },
            );
            Ok(())
        }
        Op::Delete => {
            let hk = staged(&mut lane.h_keys)?;
            tr.time(
                |t| &mut t.copy_in,
                || par_copy(&mut hk.as_mut_slice()[..m], keys),
            );
            Ok(())
        }
        // Lent batches have no staging copies.
        Op::GetPinned { .. } => Ok(()),
    }
}

/// Items of a chunk from which its two host copies (a put's keys and values in; a get's
/// results out and keys in) run as a fork-join, and from which the batch overlaps
/// enqueueing with copies: below it, a wake-up of the pool from outside (tens of µs) costs
/// more than it saves. Measured on the H100 host (PERF.md): a put gains from 32K items
/// (0.5 MiB of keys and values per chunk), a get only from [`PAR_MIN`].
fn join_min(op: &Op<'_>) -> usize {
    match op {
        Op::Put { .. } => 1 << 15,
        _ => PAR_MIN,
    }
}

/// `rayon::join(a, b)` when `parallel`, else `a` then `b` on this thread (see [`join_min`]).
fn join_if<A, B, RA, RB>(parallel: bool, a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    if parallel {
        rayon::join(a, b)
    } else {
        (a(), b())
    }
}

/// Enqueues a chunk's transfers from the lane's staging buffers to its device buffers.
fn transfer_in(lane: &mut Lane, op: &Op<'_>, m: usize) -> Result<()> {
    staged(&mut lane.h_keys)?.htod(lane.d_keys.ptr(), m, &lane.stream)?;
    if let Op::Put { .. } = op {
        let w = lane.width;
        staged(&mut lane.h_vals_in)?.htod(lane.d_vals.ptr(), m * w, &lane.stream)?;
    }
    Ok(())
}

/// Enqueues a chunk's kernels and result transfers on its lane, whose device buffers hold
/// the chunk's inputs (or will, in stream order), and records the lane's events. Only a
/// lent get touches `op`'s slices (its results go straight to them); staged operations
/// may pass [`Op::shape`].
fn launch_chunk(
    gpu: &Gpu,
    table: TableArgs,
    lane: &mut Lane,
    op: &mut Op<'_>,
    start: usize,
    m: usize,
) -> Result<()> {
    let w = lane.width;
    let a = lane.args(
        table,
        lane.d_keys.ptr(),
        lane.d_vals.ptr(),
        lane.d_found.ptr(),
        m,
    );
    match op {
        Op::Put { .. } => {
            lane.enqueue_put(gpu, &a, None)?;
            lane.kdone.record(&lane.stream).drv("cuEventRecord")?;
        }
        Op::Get { .. } => {
            gpu.launch(&gpu.k.get, &a, m as u64, &lane.stream)?;
            staged(&mut lane.h_vals_out)?.dtoh(lane.d_vals.ptr(), m * w, &lane.stream)?;
            staged(&mut lane.h_found)?.dtoh(lane.d_found.ptr(), m, &lane.stream)?;
            lane.pending = Some((start, m));
        }
        Op::GetPinned { values, found } => {
            gpu.launch(&gpu.k.get, &a, m as u64, &lane.stream)?;
            let rows = start * w..(start + m) * w;
            dtoh_slice(&mut values[rows], lane.d_vals.ptr(), &lane.stream)?;
            dtoh_slice(
                &mut found[start..start + m],
                lane.d_found.ptr(),
                &lane.stream,
            )?;
        }
        Op::Contains { .. } => {
            let a = BatchArgs { values: 0, ..a };
            gpu.launch(&gpu.k.contains, &a, m as u64, &lane.stream)?;
            staged(&mut lane.h_found)?.dtoh(lane.d_found.ptr(), m, &lane.stream)?;
            lane.pending = Some((start, m));
        }
        Op::Delete => gpu.launch(&gpu.k.delete, &a, m as u64, &lane.stream)?,
    }
    lane.done.record(&lane.stream).drv("cuEventRecord")
}

/// Copies a finished chunk's output from the lane's pinned buffers to the caller's slices.
fn drain_output(lane: &mut Lane, op: &mut Op<'_>) -> Result<()> {
    let pending = lane.pending.take();
    drain_from(pending, lane.width, &lane.h_vals_out, &lane.h_found, op)
}

/// [`drain_output`] from a lane's parts: the chunk `pending` (start, len) whose output waits
/// in `h_vals` / `h_found`.
fn drain_from(
    pending: Option<(usize, usize)>,
    w: usize,
    h_vals: &Option<Pinned<u64>>,
    h_found: &Option<Pinned<u8>>,
    op: &mut Op<'_>,
) -> Result<()> {
    let Some((start, m)) = pending else {
        return Ok(());
    };
    match op {
        Op::Get { values, found } => {
            // One fork-join for both outputs, as for a put's inputs.
            let hv = &staged_ref(h_vals)?.as_slice()[..m * w];
            let hf = &staged_ref(h_found)?.as_slice()[..m];
            join_if(
                m >= PAR_MIN,
                || par_copy(&mut values[start * w..(start + m) * w], hv),
                || par_bools(&mut found[start..start + m], hf),
            );
        }
        Op::Contains { found } => par_bools(
            &mut found[start..start + m],
            &staged_ref(h_found)?.as_slice()[..m],
        ),
        Op::Put { .. } | Op::GetPinned { .. } | Op::Delete => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_cap_is_mains_rule() {
        let max = COPY_CHUNK_BYTES;
        assert_eq!(copy_cap(1, 1, max), MIN_LANE);
        assert_eq!(copy_cap(10_000, 1, max), MIN_LANE);
        assert_eq!(copy_cap(3 * 8192, 1, max), 8192);
        assert_eq!(copy_cap(2_000_000, 1, max), 1 << 20);
        assert_eq!(copy_cap(100_000_000, 1, max), 1 << 21); // 32 MiB / 16 B
        assert_eq!(copy_cap(100_000_000, 16, max), 1 << 17);
        assert_eq!(device_cap(100_000_000, 1), 1 << 21);
        for w in 1..=16 {
            for n in [1, 5000, 1 << 20, 123_456_789] {
                let c = copy_cap(n, w, max);
                assert!(c.is_power_of_two() && c >= MIN_LANE);
                assert!(c * 8 * (w + 1) <= max.max(MIN_LANE * 8 * 17));
                assert!((c as u64) < kv_kernels::layout::REPEAT as u64 - 1);
            }
        }
    }

    #[test]
    fn chunk_plan_covers_the_batch_and_cuts_large_tails_finer() {
        let cap = 1 << 21;
        let lens =
            |n, pinned| -> Vec<usize> { chunk_plan(n, cap, pinned).iter().map(|c| c.1).collect() };
        // Small batches and lent batches: full chunks only.
        assert_eq!(lens(0, false), Vec::<usize>::new());
        assert_eq!(lens(5, false), [5]);
        assert_eq!(lens(2 * cap + 1, false), [cap, cap, 1]);
        assert_eq!(lens(4 * cap + 3, true), [cap, cap, cap, cap, 3]);
        // From four full chunks on, what is left under two chunks is halved down to cap / 8.
        assert_eq!(
            lens(4 * cap, false),
            [cap, cap, cap, cap / 2, cap / 4, cap / 8, cap / 8]
        );
        assert_eq!(lens(20_000_000, false).len(), 13);
        for n in [4 * cap, 4 * cap + 1, 20_000_000, 100_000_000, 123_456_789] {
            for pinned in [false, true] {
                let plan = chunk_plan(n, cap, pinned);
                let mut next = 0;
                for &(start, m) in &plan {
                    assert_eq!(start, next);
                    assert!(m >= 1 && m <= cap);
                    next += m;
                }
                assert_eq!(next, n);
                if !pinned {
                    // The last chunk is at most an eighth of a chunk (plus rounding).
                    assert!(plan.last().expect("chunks").1 <= cap / 8 + 1, "{n}");
                    assert!(plan.len() <= n.div_ceil(cap) + 4, "{n}");
                }
            }
        }
    }

    #[test]
    fn spread_cap_is_a_bounded_power_of_two() {
        let max = PINNED_CHUNK_BYTES;
        assert_eq!(spread_cap(1, 1, max), MIN_LANE);
        assert_eq!(spread_cap(10_000, 1, max), 16_384); // one chunk
        assert_eq!(spread_cap(65_536, 1, max), 65_536); // 1 MiB: one chunk
        assert_eq!(spread_cap(65_537, 1, max), 65_536); // two chunks of the smallest size
        assert_eq!(spread_cap(2_000_000, 1, max), 1 << 17); // 16 chunks of 2 MiB
        assert_eq!(spread_cap(20_000_000, 1, max), 1 << 20); // 16 MiB chunks
        assert_eq!(spread_cap(100_000_000, 1, max), 1 << 20);
        assert_eq!(spread_cap(100_000_000, 1, 32 << 20), 1 << 21);
        assert_eq!(spread_cap(100_000_000, 16, max), 1 << 16);
        for w in 1..=16 {
            let row = 8 * (w + 1);
            for n in [1, 5000, 70_000, 1 << 20, 2_000_000, 123_456_789] {
                for max in [1 << 20, PINNED_CHUNK_BYTES, 256 << 20] {
                    let c = spread_cap(n, w, max);
                    assert!(c.is_power_of_two() && c >= MIN_LANE, "{n} {w} {c}");
                    assert!(c * row <= max.max(MIN_LANE * row), "{n} {w} {c}");
                    assert!((c as u64) < kv_kernels::layout::REPEAT as u64 - 1);
                    let chunks = n.div_ceil(c);
                    // Enough chunks to overlap, unless the chunk size bounds forbid it.
                    assert!(
                        chunks >= TARGET_CHUNKS || c * row <= 2 * MIN_CHUNK_BYTES || n <= c,
                        "{n} {w} {c}"
                    );
                    assert!(
                        chunks <= 2 * TARGET_CHUNKS || c * 2 * row > max,
                        "{n} {w} {c}"
                    );
                }
            }
        }
    }
}
