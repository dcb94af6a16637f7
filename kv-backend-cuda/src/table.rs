//! The table in VRAM and the host pipeline that feeds it.
//!
//! # Pipeline
//!
//! A batch from host memory is cut into chunks (see [`lane_cap_with`]). Chunk `c` goes
//! through lane `c % lanes` (a stream, pinned host buffers, device buffers, two events),
//! driven by that lane's host thread for the length of the batch: it waits for the lane's
//! previous chunk, hands that chunk's output over to the caller's slices, copies its next
//! chunk's input into the pinned buffers and enqueues the copies and kernels. The lanes'
//! threads run side by side, so host copies of several chunks proceed in parallel (one
//! memcpy per thread, no fork-join per chunk) while the device copies and computes others.
//!
//! A put's kernels must apply in batch order (a later chunk overwrites an earlier one):
//! the lanes' threads enqueue them in chunk order (a turn passed from chunk to chunk), and
//! each chunk's first kernel waits (`cuStreamWaitEvent`, on the device) for the previous
//! chunk's last kernel, while its copies do not wait. Get, contains and delete chunks are
//! independent and run concurrently.
//!
//! A batch in lent page-locked memory ([`crate::PinnedBatch`]) takes the same path without
//! the host copies: each chunk is copied between the batch's own buffers and the lane's
//! device buffers.

use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::gpu::{BACKEND, DevBuf, Drv, Gpu, Pinned, dtoh_slice, event, htod_slice, stream};
use cudarc::driver::{CudaEvent, CudaStream};
use kv_core::{Error, Result};
use kv_kernels::layout::{
    BatchArgs, FillArgs, RehashArgs, TableArgs, counter, flag, special_words,
};

/// Staging lanes (each with its host thread) used by one host batch (default;
/// `VRAMKV_CUDA_LANES` overrides).
const LANES: usize = 8;
/// Chunks a batch is cut into at least, when the chunk size bounds allow it.
const TARGET_CHUNKS: usize = 8;
/// Bytes of keys + values per chunk at least (below this, per-chunk costs dominate).
const MIN_CHUNK_BYTES: usize = 1 << 20;
/// Bytes of keys + values per chunk at most (default; `VRAMKV_CUDA_CHUNK_MIB` overrides).
const MAX_CHUNK_BYTES: usize = 16 << 20;
/// Smallest lane (items); lanes are sized in powers of two so that they are reused.
const MIN_LANE: usize = 4096;

/// Environment variable: staging lanes per host batch (1..=16), for measurements.
pub const LANES_ENV: &str = "VRAMKV_CUDA_LANES";
/// Environment variable: largest chunk in MiB of keys + values (1..=256), for measurements.
pub const CHUNK_ENV: &str = "VRAMKV_CUDA_CHUNK_MIB";

/// The pipeline's shape: lanes per batch and the largest chunk (read once per process).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    pub lanes: usize,
    pub max_chunk_bytes: usize,
}

pub(crate) fn tuning() -> Tuning {
    static T: OnceLock<Tuning> = OnceLock::new();
    *T.get_or_init(|| {
        let var = |name: &str, lo: usize, hi: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .map(|v| v.clamp(lo, hi))
        };
        Tuning {
            lanes: var(LANES_ENV, 1, 16).unwrap_or(LANES),
            max_chunk_bytes: var(CHUNK_ENV, 1, 256).map_or(MAX_CHUNK_BYTES, |m| m << 20),
        }
    })
}

/// Lanes kept in a table's pool between batches.
pub(crate) fn pool_max() -> usize {
    2 * tuning().lanes
}

fn pow2_floor(x: usize) -> usize {
    1usize << (usize::BITS - 1 - x.max(1).leading_zeros())
}

/// Items per chunk for a batch of `n` keys of `width` words, with the default tuning.
pub(crate) fn lane_cap(n: usize, width: usize) -> usize {
    lane_cap_with(n, width, tuning().max_chunk_bytes)
}

/// Items per chunk of a device-resident put (no host copies to overlap: few, large chunks;
/// the chunk only bounds the lane's scratch).
pub(crate) fn device_cap(n: usize, width: usize) -> usize {
    let hi = pow2_floor(((32 << 20) / (8 * (width + 1))).max(MIN_LANE));
    n.div_ceil(3).max(1).next_power_of_two().clamp(MIN_LANE, hi)
}

/// Items per chunk: a power of two, so that a batch is cut into `TARGET_CHUNKS` to
/// `2 * TARGET_CHUNKS` chunks where the bounds of 1 MiB .. `max_chunk_bytes` of keys and
/// values per chunk allow it; a batch smaller than the smallest chunk is one chunk.
pub(crate) fn lane_cap_with(n: usize, width: usize, max_chunk_bytes: usize) -> usize {
    let row = 8 * (width + 1);
    let hi = pow2_floor((max_chunk_bytes / row).max(MIN_LANE));
    let lo = pow2_floor((MIN_CHUNK_BYTES / row).max(MIN_LANE)).min(hi);
    if n <= lo {
        return n.max(1).next_power_of_two().clamp(MIN_LANE, lo);
    }
    pow2_floor(n / TARGET_CHUNKS).clamp(lo, hi)
}

fn bools(dst: &mut [bool], src: &[u8]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s != 0);
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
    /// Found flags (get/contains) or winner flags (put): u8[cap].
    d_found: DevBuf,
    /// u32[cap] slot of each key (put).
    d_slot: DevBuf,
    /// u32[flag::LEN] per-chunk put flags.
    d_flags: DevBuf,
    /// Recorded after the chunk's last operation on this lane.
    done: CudaEvent,
    /// Recorded after the chunk's last put kernel.
    kdone: Arc<CudaEvent>,
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

/// A lane's staging buffer (allocated by [`Lane::ensure_host`] before the batch).
fn staged<T: Copy>(b: &mut Option<Pinned<T>>) -> Result<&mut Pinned<T>> {
    b.as_mut().ok_or_else(|| Error::Device {
        backend: BACKEND,
        message: "internal: a staging lane lacks its pinned buffer".into(),
    })
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
            d_flags: DevBuf::new(gpu, flag::LEN * 4)?,
            done: event(gpu)?,
            kdone: Arc::new(event(gpu)?),
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
            win: self.d_found.ptr(),
            flags: self.d_flags.ptr(),
            n: n as u64,
        }
    }

    /// Enqueues the five put passes for `a` (flags reset first).
    pub fn enqueue_put(&self, gpu: &Gpu, a: &BatchArgs) -> Result<()> {
        self.d_flags.memset(0, flag::LEN * 4, &self.stream)?;
        let n = a.n;
        gpu.launch(&gpu.k.put_place, a, n, &self.stream)?;
        gpu.launch(&gpu.k.put_zero, a, n, &self.stream)?;
        gpu.launch(&gpu.k.put_max, a, n, &self.stream)?;
        gpu.launch(&gpu.k.put_win, a, n, &self.stream)?;
        gpu.launch(&gpu.k.put_finish, a, n, &self.stream)
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
    pub fn new(gpu: &Gpu, slots: usize, width: usize) -> Result<State> {
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
        };
        st.clear(gpu)?;
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
    pub fn clear(&self, gpu: &Gpu) -> Result<()> {
        fill_empty(gpu, &self.keys, self.slots, &self.main)?;
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
        fill_empty(gpu, &keys, slots, &self.main)?;
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

fn fill_empty(gpu: &Gpu, keys: &DevBuf, slots: usize, stream: &CudaStream) -> Result<()> {
    let a = FillArgs {
        dst: keys.ptr(),
        value: kv_kernels::layout::EMPTY,
        n: slots as u64,
    };
    gpu.launch(&gpu.k.fill, &a, slots as u64, stream)
}

/// The order in which a put's chunks enqueue their kernels: chunk `c` waits for its turn,
/// which chunk `c - 1` passes on once its kernels (and the event after them) are enqueued.
/// A failing lane aborts the batch, so that no lane waits forever.
struct Turn {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

fn aborted() -> Error {
    Error::Device {
        backend: BACKEND,
        message: "batch aborted: another staging lane failed".into(),
    }
}

impl Turn {
    fn new() -> Self {
        Turn {
            state: Mutex::new((0, false)),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until it is chunk `c`'s turn (or the batch was aborted).
    fn wait(&self, c: usize) -> Result<()> {
        let mut g = self.lock();
        while g.0 != c && !g.1 {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.1 { Err(aborted()) } else { Ok(()) }
    }

    /// Passes the turn to the next chunk.
    fn pass(&self) {
        self.lock().0 += 1;
        self.cv.notify_all();
    }

    fn abort(&self) {
        self.lock().1 = true;
        self.cv.notify_all();
    }

    fn aborted(&self) -> bool {
        self.lock().1
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Put,
    Get,
    Contains,
    Delete,
}

/// One chunk's output slices (the caller's, or a pinned batch's).
enum Out<'a> {
    None,
    Get {
        values: &'a mut [u64],
        found: &'a mut [bool],
    },
    GetPinned {
        values: &'a mut [u64],
        found: &'a mut [u8],
    },
    Contains {
        found: &'a mut [bool],
    },
}

/// One chunk of a host batch.
struct Chunk<'a> {
    index: usize,
    keys: &'a [u64],
    /// A put's value rows (empty otherwise).
    values: &'a [u64],
    out: Out<'a>,
}

/// What every lane of a batch shares.
struct Shared<'a> {
    gpu: &'a Gpu,
    table: TableArgs,
    kind: Kind,
    pinned: bool,
    /// Each lane's kernels-done event, by lane index.
    kdone: Vec<Arc<CudaEvent>>,
    turn: Turn,
}

/// Runs a host batch through `lanes` (all of capacity `cap`, with the host buffers of
/// `batch.needs()`): see the module docs. Chunk `c` goes to lane `c % lanes`, and each lane
/// is driven by its own host thread (the caller's for lane 0), which copies its chunks
/// between the caller's slices and its pinned buffers, so that the host copies of several
/// chunks run in parallel with each other and with the device. On return (Ok or Err after
/// the caller's drain) no work of the batch is in flight.
pub(crate) fn run_host_batch(
    gpu: &Gpu,
    table: TableArgs,
    lanes: &mut [Lane],
    cap: usize,
    batch: &mut HostBatch<'_>,
    after: Option<&CudaEvent>,
) -> Result<()> {
    let keys = batch.keys;
    let n = keys.len();
    let chunks = n.div_ceil(cap);
    let nl = lanes.len().min(chunks).max(1);
    let lanes = &mut lanes[..nl];
    debug_assert!(lanes.iter().all(|l| l.cap >= cap));
    if let Some(ev) = after {
        for l in lanes.iter() {
            l.stream.wait(ev).drv("cuStreamWaitEvent")?;
        }
    }
    let w = lanes[0].width;
    let (kind, put_values): (Kind, &[u64]) = match &batch.op {
        Op::Put { values } => (Kind::Put, values),
        Op::Get { .. } | Op::GetPinned { .. } => (Kind::Get, &[]),
        Op::Contains { .. } => (Kind::Contains, &[]),
        Op::Delete => (Kind::Delete, &[]),
    };
    let mut outs: Vec<Out<'_>> = match &mut batch.op {
        Op::Get { values, found } => values
            .chunks_mut(cap * w)
            .zip(found.chunks_mut(cap))
            .map(|(values, found)| Out::Get { values, found })
            .collect(),
        Op::GetPinned { values, found } => values
            .chunks_mut(cap * w)
            .zip(found.chunks_mut(cap))
            .map(|(values, found)| Out::GetPinned { values, found })
            .collect(),
        Op::Contains { found } => found
            .chunks_mut(cap)
            .map(|found| Out::Contains { found })
            .collect(),
        Op::Put { .. } | Op::Delete => Vec::new(),
    };
    outs.resize_with(chunks, || Out::None);
    let mut work: Vec<Vec<Chunk<'_>>> = (0..nl)
        .map(|_| Vec::with_capacity(chunks.div_ceil(nl)))
        .collect();
    for (index, out) in outs.into_iter().enumerate() {
        let start = index * cap;
        let m = cap.min(n - start);
        let values = if kind == Kind::Put {
            &put_values[start * w..(start + m) * w]
        } else {
            &[]
        };
        work[index % nl].push(Chunk {
            index,
            keys: &keys[start..start + m],
            values,
            out,
        });
    }
    let shared = Shared {
        gpu,
        table,
        kind,
        pinned: batch.pinned,
        kdone: lanes.iter().map(|l| l.kdone.clone()).collect(),
        turn: Turn::new(),
    };
    let run = |lane: &mut Lane, chunks: Vec<Chunk<'_>>| {
        let r = gpu.bind().and_then(|()| run_lane(&shared, lane, chunks));
        if r.is_err() {
            shared.turn.abort();
        }
        r
    };
    let mut work = work.into_iter();
    let first = work.next().unwrap_or_default();
    let (lane0, rest) = lanes.split_first_mut().ok_or_else(aborted)?;
    if rest.is_empty() {
        return run(lane0, first);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = rest
            .iter_mut()
            .zip(work)
            .map(|(lane, chunks)| s.spawn(|| run(lane, chunks)))
            .collect();
        let mut r = run(lane0, first);
        for h in handles {
            let hr = h.join().unwrap_or_else(|_| {
                Err(Error::Device {
                    backend: BACKEND,
                    message: "a staging lane thread panicked".into(),
                })
            });
            if r.is_ok() {
                r = hr;
            }
        }
        r
    })
}

/// Drives one lane through its chunks (in batch order).
fn run_lane(sh: &Shared<'_>, lane: &mut Lane, chunks: Vec<Chunk<'_>>) -> Result<()> {
    let w = lane.width;
    let gpu = sh.gpu;
    let nl = sh.kdone.len();
    let mut pending = Out::None;
    for ch in chunks {
        if sh.turn.aborted() {
            return Err(aborted());
        }
        // Reuse the lane: wait for its previous chunk and hand that chunk's output over.
        lane.done.synchronize().drv("cuEventSynchronize")?;
        drain_output(lane, std::mem::replace(&mut pending, Out::None))?;
        let m = ch.keys.len();
        if sh.pinned {
            htod_slice(lane.d_keys.ptr(), ch.keys, &lane.stream)?;
            htod_slice(lane.d_vals.ptr(), ch.values, &lane.stream)?;
        } else {
            let hk = staged(&mut lane.h_keys)?;
            hk.as_mut_slice()[..m].copy_from_slice(ch.keys);
            hk.htod(lane.d_keys.ptr(), m, &lane.stream)?;
            if sh.kind == Kind::Put {
                let hv = staged(&mut lane.h_vals_in)?;
                hv.as_mut_slice()[..m * w].copy_from_slice(ch.values);
                hv.htod(lane.d_vals.ptr(), m * w, &lane.stream)?;
            }
        }
        let a = lane.args(
            sh.table,
            lane.d_keys.ptr(),
            lane.d_vals.ptr(),
            lane.d_found.ptr(),
            m,
        );
        match sh.kind {
            Kind::Put => {
                // Kernels in batch order; this lane's copies above do not wait.
                sh.turn.wait(ch.index)?;
                if ch.index > 0 {
                    let prev = &sh.kdone[(ch.index - 1) % nl];
                    lane.stream.wait(prev).drv("cuStreamWaitEvent")?;
                }
                lane.enqueue_put(gpu, &a)?;
                lane.kdone.record(&lane.stream).drv("cuEventRecord")?;
                sh.turn.pass();
            }
            Kind::Get => {
                gpu.launch(&gpu.k.get, &a, m as u64, &lane.stream)?;
                let mut out = ch.out;
                match &mut out {
                    Out::GetPinned { values, found } => {
                        dtoh_slice(values, lane.d_vals.ptr(), &lane.stream)?;
                        dtoh_slice(found, lane.d_found.ptr(), &lane.stream)?;
                    }
                    _ => {
                        staged(&mut lane.h_vals_out)?.dtoh(
                            lane.d_vals.ptr(),
                            m * w,
                            &lane.stream,
                        )?;
                        staged(&mut lane.h_found)?.dtoh(lane.d_found.ptr(), m, &lane.stream)?;
                    }
                }
                pending = out;
            }
            Kind::Contains => {
                let a = BatchArgs { values: 0, ..a };
                gpu.launch(&gpu.k.contains, &a, m as u64, &lane.stream)?;
                staged(&mut lane.h_found)?.dtoh(lane.d_found.ptr(), m, &lane.stream)?;
                pending = ch.out;
            }
            Kind::Delete => gpu.launch(&gpu.k.delete, &a, m as u64, &lane.stream)?,
        }
        lane.done.record(&lane.stream).drv("cuEventRecord")?;
    }
    lane.done.synchronize().drv("cuEventSynchronize")?;
    drain_output(lane, pending)
}

/// Copies a finished chunk's output from the lane's pinned buffers to the caller's slices
/// (nothing to do for a pinned batch: the device wrote into it directly).
fn drain_output(lane: &mut Lane, out: Out<'_>) -> Result<()> {
    match out {
        Out::Get { values, found } => {
            values.copy_from_slice(&staged(&mut lane.h_vals_out)?.as_slice()[..values.len()]);
            bools(found, &staged(&mut lane.h_found)?.as_slice()[..found.len()]);
        }
        Out::Contains { found } => {
            bools(found, &staged(&mut lane.h_found)?.as_slice()[..found.len()])
        }
        Out::None | Out::GetPinned { .. } => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_cap_is_a_bounded_power_of_two() {
        let max = MAX_CHUNK_BYTES;
        assert_eq!(lane_cap_with(1, 1, max), MIN_LANE);
        assert_eq!(lane_cap_with(10_000, 1, max), 16_384); // one chunk
        assert_eq!(lane_cap_with(65_536, 1, max), 65_536); // 1 MiB: one chunk
        assert_eq!(lane_cap_with(65_537, 1, max), 65_536); // two chunks of the smallest size
        assert_eq!(lane_cap_with(2_000_000, 1, max), 1 << 17); // 16 chunks of 2 MiB
        assert_eq!(lane_cap_with(20_000_000, 1, max), 1 << 20); // 16 MiB chunks
        assert_eq!(lane_cap_with(100_000_000, 1, max), 1 << 20);
        assert_eq!(lane_cap_with(100_000_000, 1, 32 << 20), 1 << 21);
        assert_eq!(lane_cap_with(100_000_000, 16, max), 1 << 16);
        for w in 1..=16 {
            let row = 8 * (w + 1);
            for n in [1, 5000, 70_000, 1 << 20, 2_000_000, 123_456_789] {
                for max in [1 << 20, MAX_CHUNK_BYTES, 256 << 20] {
                    let c = lane_cap_with(n, w, max);
                    assert!(c.is_power_of_two() && c >= MIN_LANE, "{n} {w} {c}");
                    assert!(c * row <= max.max(MIN_LANE * row), "{n} {w} {c}");
                    assert!((c as u64) < u32::MAX as u64);
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

    #[test]
    fn turns_go_in_order_and_abort_wakes_waiters() {
        let t = Turn::new();
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for c in (0..8).rev() {
                let (t, order) = (&t, &order);
                s.spawn(move || {
                    t.wait(c).map_err(|e| e.to_string())?;
                    order.lock().map_err(|e| e.to_string())?.push(c);
                    t.pass();
                    Ok::<(), String>(())
                });
            }
        });
        assert_eq!(order.into_inner().ok(), Some((0..8).collect::<Vec<_>>()));
        let t = Turn::new();
        std::thread::scope(|s| {
            let h = s.spawn(|| t.wait(5));
            t.abort();
            assert!(h.join().ok().is_some_and(|r| r.is_err()));
        });
        assert!(t.aborted());
    }

    #[test]
    fn bools_convert() {
        let bytes: Vec<u8> = (0..1000).map(|i| (i % 3 == 0) as u8).collect();
        let mut b = vec![false; bytes.len()];
        bools(&mut b, &bytes);
        assert!(b.iter().enumerate().all(|(i, x)| *x == (i % 3 == 0)));
    }
}
