//! The table's device buffers and the host pipeline that feeds batches through them.
//!
//! # Pipeline
//!
//! A batch is cut into chunks; each chunk goes through one of a few staging *lanes*
//! (round robin). A lane owns an upload buffer (host-visible, mapped for writing), the
//! chunk's device buffers, a uniform with the chunk's parameters and a readback buffer
//! (mapped for reading). One chunk is one submission: copy in, the kernels, copy out. After
//! submitting, the lane asks for its upload buffer to be mapped again and, when the chunk
//! has output, for its readback buffer; the host only waits (on that submission index) when
//! it reuses the lane or at the end of the batch, so filling chunk `c + 1` overlaps the
//! device work of chunk `c`. Submissions on the one queue run in order, so the chunks of a
//! put apply in batch order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use bytemuck::{Pod, Zeroable};
use kv_core::Result;
use rayon::prelude::*;

use crate::gpu::{Gpu, device_error, oom};
use crate::gpu_trace::{self, BatchTimes, LaneTimer};
use crate::shader::{ORDER_ITEMS, PROBE_HDR, PROBE_WORDS, REGIONS};
use kv_kernels::layout::{self, counter};

/// Staging lanes used by one host batch.
pub(crate) const LANES: usize = 3;
/// Bytes of keys + values per chunk at most (the chunk size for large batches).
const CHUNK_BYTES: usize = 64 << 20;
/// Environment variable overriding the staging chunk size (default 64 MiB), in MiB: a
/// development knob for tuning the staging pipeline on a real GPU.
pub const CHUNK_MIB_ENV: &str = "VRAMKV_WGPU_CHUNK_MIB";
/// Environment variable that makes every host batch print, on stderr, where its time went
/// (waiting for the GPU, host copies in and out, encoding and submitting), per phase; and,
/// where the adapter offers timestamp queries, a second line with the device time of each
/// step of the batch's chunks (`gpu_trace` module).
pub const TRACE_ENV: &str = "VRAMKV_WGPU_TRACE";

/// Environment variable forcing region-order probing off (`0`) or on (`1`) for every
/// table, read once per process; unset (or anything else), it is on for tables whose key
/// array passes 2 GiB ([`REGION_ORDER_MIN_SLOTS`]). In region order each chunk's items are
/// first grouped by table region (256 regions, or one per slot below 256 slots) and the
/// probing kernels take them in that order (crate docs, "Table layout").
pub const REGION_ORDER_ENV: &str = "VRAMKV_WGPU_REGION_ORDER";

/// Tables of more slots than this (key arrays beyond 2 GiB) probe in region order by
/// default: on the H100 through Vulkan, random probes into larger tables run about 5x
/// slower (docs/PERF.md, "The wgpu slow mode").
pub const REGION_ORDER_MIN_SLOTS: usize = 1 << 28;

/// [`REGION_ORDER_ENV`] as read once per process: `Some(false)` for `0`, `Some(true)` for
/// `1`, else `None` (the default by table size).
fn region_order_forced() -> Option<bool> {
    static ON: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var(REGION_ORDER_ENV).ok()?.trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    })
}

/// Whether chunks probe a table of `slots` slots in region order, and if so its regions
/// as `(rshift, nreg)`: `nreg` regions (`REGIONS`, 256, or one per slot for a smaller
/// table) of `1 << rshift` slots each, the region of a key being its home slot shifted
/// right by `rshift`. Where it is on by default (more than 2^28 slots) a region holds at
/// least 2^21 slots, 16 MiB of keys.
///
/// In region order, each chunk first sorts its item indices by region (counting sort:
/// histogram, scan, scatter; the `kv_region_*` kernels) and the probing kernels then take
/// the items in that order, so that the threads running at any moment probe a few regions
/// of the table instead of pages all over it.
pub(crate) fn region_order(slots: usize) -> Option<(u32, u32)> {
    let on = region_order_forced().unwrap_or(slots > REGION_ORDER_MIN_SLOTS);
    if !on || slots < 2 {
        return None;
    }
    let nreg = slots.min(REGIONS as usize);
    let rshift = slots.trailing_zeros() - nreg.trailing_zeros();
    Some((rshift, nreg as u32))
}

/// Whether [`TRACE_ENV`] is set (to anything but `0`), read once per process.
pub(crate) fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(TRACE_ENV).is_some_and(|v| v != "0"))
}

/// Seconds spent per phase of a host batch (see [`TRACE_ENV`]).
#[derive(Default)]
struct Trace {
    wait: f64,
    copy_out: f64,
    copy_in: f64,
    submit: f64,
}

impl Trace {
    fn settle(&mut self, lane: &Lane, total: std::time::Duration) {
        let w = lane.waited.as_secs_f64();
        self.wait += w;
        self.copy_out += total.as_secs_f64() - w;
    }
}

fn chunk_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var(CHUNK_MIB_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&m| (1..=4096).contains(&m))
            .map_or(CHUNK_BYTES, |m| m << 20)
    })
}
/// Smallest lane (items); lanes are sized in powers of two so that they are reused.
pub(crate) const MIN_LANE: usize = 4096;
/// Lanes kept in a table's pool between batches.
pub(crate) const POOL_MAX: usize = 2 * LANES;
/// Bytes at the start of an upload buffer reserved for the chunk's parameters.
const UP_HDR: u64 = 256;
/// Bytes at the start of a readback buffer that take the table's control words.
const RB_CTL: u64 = (counter::LEN * 8) as u64;
/// Bytes at the start of a readback buffer reserved for the control words, then the
/// lane's probe header (the count of unfinished items).
const RB_HDR: u64 = RB_CTL + PROBE_HDR as u64 * 4;
/// Slots counted per dispatch at most (keeps thread indices in u32).
const PIECE: usize = 1 << 30;
/// Old slots per rehash dispatch at most: each has a probe state word (16 MiB for these).
const REHASH_PIECE: usize = 1 << 22;
/// Bytes of a kernel parameter block.
const PARAMS_BYTES: u64 = std::mem::size_of::<Params>() as u64;

/// A uniform buffer for one [`Params`] block.
fn params_buffer(gpu: &Gpu) -> Result<wgpu::Buffer> {
    use wgpu::BufferUsages as U;
    gpu.buffer(
        "vramkv params",
        PARAMS_BYTES,
        U::UNIFORM | U::COPY_DST,
        false,
    )
}

/// Kernel parameters, as the WGSL `Params` struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct Params {
    pub n: u32,
    pub width: u32,
    pub mask: u32,
    pub seg_shift: u32,
    pub base: u32,
    /// Slots of the chunk's local table less one (put).
    pub lmask: u32,
    /// Region order: a key's region is its home slot shifted right by `rshift`.
    pub rshift: u32,
    /// Region order: the table's regions, or 0 for probing in item order.
    pub nreg: u32,
    /// The table's hash seed, low and high half.
    pub seed_lo: u32,
    pub seed_hi: u32,
    /// The most slots one invocation probes per dispatch.
    pub budget: u32,
    /// The code of the dispatch's first pass (shader module docs, "Bounded probes").
    pub code: u32,
    /// 1 in a resume round: only unfinished items run, from their saved state.
    pub resume: u32,
    pub pad: [u32; 3],
}

/// Slots of the local table of a put chunk of `n` items ([`layout::local_slots`]).
pub(crate) fn local_slots(n: usize) -> usize {
    layout::local_slots(n as u64) as usize
}

/// Bytes of the local table of a chunk of `n` items and the chunk's flags after it
/// ([`layout::flag`]: DUP, the last index of each special key, one spare word).
fn local_bytes(n: usize) -> u64 {
    (local_slots(n) + layout::flag::LEN) as u64 * 4
}

const MAPPED: u8 = 1;
pub(crate) const MAP_PENDING: u8 = 0;
const MAP_FAILED: u8 = 2;

/// Asks for `buffer` to be mapped; `state` becomes `MAPPED` or `MAP_FAILED` when it is done.
pub(crate) fn map(buffer: &wgpu::Buffer, mode: wgpu::MapMode, state: &Arc<AtomicU8>) {
    map_range(buffer, mode, state, None);
}

/// [`map`] for the bytes before `end` (all of them for `None`).
fn map_range(buffer: &wgpu::Buffer, mode: wgpu::MapMode, state: &Arc<AtomicU8>, end: Option<u64>) {
    state.store(MAP_PENDING, Ordering::Release);
    let s = state.clone();
    let done = move |r: std::result::Result<(), wgpu::BufferAsyncError>| {
        s.store(
            if r.is_ok() { MAPPED } else { MAP_FAILED },
            Ordering::Release,
        )
    };
    match end {
        Some(end) => buffer.map_async(mode, ..end, done),
        None => buffer.map_async(mode, .., done),
    }
}

/// Returns once a buffer whose mapping was requested before submission `idx`, which has
/// completed, is mapped. The callback normally ran inside our wait; when another thread's
/// poll collected it, that thread runs it in a moment, so we only yield until it has.
pub(crate) fn expect_mapped(gpu: &Gpu, state: &AtomicU8, what: &str) -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        match state.load(Ordering::Acquire) {
            MAPPED => return Ok(()),
            MAP_FAILED => return Err(device_error(format!("mapping the {what} buffer failed"))),
            _ if t0.elapsed() > std::time::Duration::from_secs(30) => {
                return Err(device_error(format!(
                    "the {what} buffer was not mapped 30 s after its submission completed"
                )));
            }
            _ => {
                let _ = gpu.device.poll(wgpu::PollType::Poll);
                std::thread::yield_now();
            }
        }
    }
}

/// Items per chunk for a batch of `n` keys of `width` words, bindings of at most
/// `max_binding` bytes.
pub(crate) fn lane_cap(n: usize, width: usize, max_binding: u64) -> usize {
    let by_bytes = chunk_bytes() / (8 * (width + 1));
    // The values of a chunk, its local table (8 bytes an item, plus the flags) and its probe
    // states (PROBE_WORDS words an item, after a header) each fit one binding.
    let probe_words = u64::from(PROBE_WORDS);
    let by_binding = (max_binding / (8 * width as u64))
        .min(max_binding.saturating_sub(64) / 8)
        .min(max_binding.saturating_sub(u64::from(PROBE_HDR) * 4) / (4 * probe_words))
        .min(u32::MAX as u64 / 2) as usize;
    let max = by_bytes.min(by_binding).max(MIN_LANE);
    let max = 1usize << (usize::BITS - 1 - max.leading_zeros());
    n.div_ceil(LANES)
        .max(1)
        .next_power_of_two()
        .clamp(MIN_LANE, max)
}

/// A process-unique number for each version of a table's buffers (lanes cache their bind
/// group against it).
fn next_gen() -> u64 {
    static GEN: AtomicU64 = AtomicU64::new(1);
    GEN.fetch_add(1, Ordering::Relaxed)
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
    Contains {
        found: &'a mut [bool],
    },
    Delete,
}

impl Op<'_> {
    fn counts(&self) -> bool {
        matches!(self, Op::Put { .. } | Op::Delete)
    }
}

/// A submitted chunk whose lane has not been waited for.
struct Pending {
    sub: wgpu::SubmissionIndex,
    /// The chunk's index in the batch.
    chunk: usize,
    start: usize,
    m: usize,
    /// The chunk's kernel parameters.
    params: Params,
    /// The chunk has output (get, contains): the whole readback buffer was asked to map,
    /// else only its header.
    output: bool,
}

/// The kernels of the batch being run, and whether it is a put.
pub(crate) struct Passes {
    pipes: Vec<(&'static str, Arc<wgpu::ComputePipeline>)>,
    put: bool,
}

/// The most rounds a probe over `slots` slots with `budget` slots per round can need: each
/// round takes every unfinished probe `budget` slots further, except one that loses the
/// EMPTY slot it was claiming (it then goes on as usual, at most once per slot of the
/// chain), so twice the rounds of a whole table plus a margin. More means a broken table.
fn round_limit(slots: usize, budget: u32) -> usize {
    4 + 2 * slots.div_ceil(budget.max(1) as usize)
}

/// Runs `round` (one resume round, `Ok(true)` once no probe is left unfinished) until it is
/// done, counting each in `resumed`; past `limit` rounds (see [`round_limit`]) an
/// `Error::Device` saying what did not finish, as a broken table would.
fn resume_rounds(
    limit: usize,
    resumed: &AtomicU64,
    what: impl FnOnce() -> String,
    mut round: impl FnMut() -> Result<bool>,
) -> Result<()> {
    for _ in 0..limit {
        resumed.fetch_add(1, Ordering::Relaxed);
        if round()? {
            return Ok(());
        }
    }
    Err(device_error(format!(
        "{}: probes still unfinished after {limit} rounds (a table invariant is broken)",
        what()
    )))
}

/// Folds a snapshot of the control words into `counters`: every count only grows during a
/// batch, so the word-wise maximum of the snapshots is the latest.
fn merge(counters: &mut Option<[u64; counter::LEN]>, snap: [u64; counter::LEN]) {
    let c = counters.get_or_insert([0; counter::LEN]);
    for (a, b) in c.iter_mut().zip(snap) {
        *a = (*a).max(b);
    }
}

/// One staging lane: buffers for one chunk in flight.
pub(crate) struct Lane {
    pub cap: usize,
    width: usize,
    upload: wgpu::Buffer,
    up_state: Arc<AtomicU8>,
    params: wgpu::Buffer,
    keys_in: wgpu::Buffer,
    vals_io: wgpu::Buffer,
    slot_of: wgpu::Buffer,
    flags8: wgpu::Buffer,
    /// The put chunk's local table and flags (`shader` module docs), cleared per chunk.
    local: wgpu::Buffer,
    /// Region order: the chunk's item indices grouped by table region (`u32[cap]`).
    perm: wgpu::Buffer,
    /// Region order: items per region, then each region's next position in `perm`
    /// (`u32[2 * REGIONS]`), cleared per chunk.
    regions: wgpu::Buffer,
    /// The count of unfinished items (word 0 of a `PROBE_HDR`-word header, cleared per
    /// dispatch), then `PROBE_WORDS` words of probe state per item (shader module docs, "Bounded
    /// probes").
    probe: wgpu::Buffer,
    readback: wgpu::Buffer,
    rb_state: Arc<AtomicU8>,
    bind: Option<(u64, wgpu::BindGroup)>,
    pending: Option<Pending>,
    /// Time the last `settle` spent waiting for the GPU (for [`TRACE_ENV`]).
    waited: std::time::Duration,
    /// Timestamp queries of the chunk in flight (tracing on an adapter that has them).
    timer: Option<LaneTimer>,
}

fn flags_bytes(cap: usize) -> u64 {
    (cap as u64).next_multiple_of(8)
}

impl Lane {
    pub fn new(gpu: &Gpu, cap: usize, width: usize) -> Result<Lane> {
        use wgpu::BufferUsages as U;
        let (c, w) = (cap as u64, width as u64);
        Ok(Lane {
            cap,
            width,
            upload: gpu.buffer(
                "vramkv upload",
                UP_HDR + c * 8 + c * w * 8,
                U::MAP_WRITE | U::COPY_SRC,
                true,
            )?,
            up_state: Arc::new(AtomicU8::new(MAPPED)),
            params: params_buffer(gpu)?,
            keys_in: gpu.buffer("vramkv keys in", c * 8, U::STORAGE | U::COPY_DST, false)?,
            vals_io: gpu.buffer(
                "vramkv values",
                c * w * 8,
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            slot_of: gpu.buffer("vramkv slots", c * 4, U::STORAGE, false)?,
            flags8: gpu.buffer(
                "vramkv flags",
                flags_bytes(cap),
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            local: gpu.buffer(
                "vramkv local table",
                local_bytes(cap),
                U::STORAGE | U::COPY_DST,
                false,
            )?,
            perm: gpu.buffer("vramkv region order", c * 4, U::STORAGE, false)?,
            regions: gpu.buffer(
                "vramkv region counts",
                2 * u64::from(REGIONS) * 4,
                U::STORAGE | U::COPY_DST,
                false,
            )?,
            probe: gpu.buffer(
                "vramkv probe states",
                (u64::from(PROBE_HDR) + u64::from(PROBE_WORDS) * c) * 4,
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            readback: gpu.buffer(
                "vramkv readback",
                RB_HDR + flags_bytes(cap) + c * w * 8,
                U::MAP_READ | U::COPY_DST,
                false,
            )?,
            rb_state: Arc::new(AtomicU8::new(MAP_PENDING)),
            bind: None,
            pending: None,
            waited: std::time::Duration::ZERO,
            timer: LaneTimer::new(gpu),
        })
    }

    /// Device bytes of the lane (staging included).
    pub fn bytes(&self) -> u64 {
        self.upload.size()
            + self.params.size()
            + self.keys_in.size()
            + self.vals_io.size()
            + self.slot_of.size()
            + self.flags8.size()
            + self.local.size()
            + self.perm.size()
            + self.regions.size()
            + self.probe.size()
            + self.readback.size()
    }

    /// The lane's bind group for the table's current buffers.
    fn bind_group(&mut self, gpu: &Gpu, st: &State) -> Result<&wgpu::BindGroup> {
        if self.bind.as_ref().is_none_or(|(g, _)| *g != st.version) {
            let layout = gpu.batch_layout(st.segs.len())?;
            let whole = [
                &self.params,
                &st.ctl,
                &st.special,
                &self.keys_in,
                &self.vals_io,
                &self.slot_of,
                &self.flags8,
                &self.local,
                &self.perm,
                &self.regions,
                &self.probe,
            ]
            .map(|b| b.as_entire_binding());
            let bindings = whole
                .into_iter()
                .chain(st.segs.iter().map(|s| s.keys.binding()))
                .chain(st.segs.iter().map(|s| s.vals.binding()));
            let bg = gpu.bind_buffers("vramkv batch", &layout.bgl, bindings)?;
            self.bind = Some((st.version, bg));
        }
        match &self.bind {
            Some((_, bg)) => Ok(bg),
            None => Err(device_error("bind group missing")),
        }
    }

    /// Waits for the lane's submitted chunk, finishes it in resume rounds if it left items
    /// unfinished, hands its output to `op`, its control words to `counters` and its
    /// timestamps (if timed) to `times`, and leaves the upload buffer mapped for the next
    /// chunk. Returns the chunk's index when it was a put chunk that had to be finished so:
    /// the put chunks after it did nothing and must run again. With `discard`, only waits
    /// and drops what the chunk produced.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        gpu: &Gpu,
        st: &State,
        passes: &Passes,
        op: &mut Op<'_>,
        counters: &mut Option<[u64; counter::LEN]>,
        times: &mut BatchTimes,
        discard: bool,
    ) -> Result<Option<usize>> {
        self.waited = std::time::Duration::ZERO;
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        let t0 = std::time::Instant::now();
        gpu.wait(p.sub.clone())?;
        expect_mapped(gpu, &self.up_state, "upload")?;
        self.waited = t0.elapsed();
        if let Some(timer) = self.timer.as_mut() {
            match timer.read(gpu) {
                Ok(t) if !discard => times.add(p.chunk, t),
                Ok(_) => {}
                Err(e) => {
                    gpu_trace::note_once(&e.to_string());
                    self.timer = None;
                }
            }
        }
        expect_mapped(gpu, &self.rb_state, "readback")?;
        if discard {
            self.unmap_readback();
            return Ok(None);
        }
        let (snap, unfinished) = self.read_header()?;
        if op.counts() {
            merge(counters, snap);
        }
        let mut rewind = None;
        if unfinished != 0 {
            self.unmap_readback();
            let first = if passes.put {
                (snap[counter::STALL] as u32).saturating_sub(p.params.code) as usize
            } else {
                0
            };
            self.finish(gpu, st, passes, op.counts(), &p, first, counters)?;
            if passes.put {
                rewind = Some(p.chunk);
            }
            if !p.output {
                return Ok(rewind);
            }
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            self.copy_output(&mut enc, op, p.m);
            self.submit_and_map(gpu, enc, None)?;
        }
        if p.output {
            let view = self
                .readback
                .get_mapped_range(..)
                .map_err(|e| device_error(format!("readback: {e}")))?;
            let bytes: &[u8] = &view;
            let w = self.width;
            let (start, m) = (p.start, p.m);
            let flags = &bytes[RB_HDR as usize..RB_HDR as usize + m];
            let vals_at = (RB_HDR + flags_bytes(self.cap)) as usize;
            match op {
                Op::Get { values, found } => {
                    copy_bools(&mut found[start..start + m], flags);
                    copy_words(
                        &mut values[start * w..(start + m) * w],
                        &bytes[vals_at..vals_at + m * w * 8],
                    );
                }
                Op::Contains { found } => copy_bools(&mut found[start..start + m], flags),
                Op::Put { .. } | Op::Delete => {}
            }
        }
        self.unmap_readback();
        Ok(rewind)
    }

    /// Runs the chunk of `p` (still in this lane) to the end in resume rounds, from pass
    /// `first` of `passes` on: every round runs one pass for the items it left unfinished
    /// (a pass not run yet: for all items), then waits and reads how many are left.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        gpu: &Gpu,
        st: &State,
        passes: &Passes,
        counts: bool,
        p: &Pending,
        first: usize,
        counters: &mut Option<[u64; counter::LEN]>,
    ) -> Result<()> {
        let (x, y) = gpu.groups(p.m as u64);
        let mut params = p.params;
        let limit = round_limit(st.slots.max(local_slots(p.m)), params.budget);
        for (k, (name, pipe)) in passes.pipes.iter().enumerate().skip(first) {
            params.resume = u32::from(k == first);
            let budget = params.budget;
            let what = || format!("{name}, {budget} slots a round");
            resume_rounds(limit, &st.resumed, what, || {
                gpu.queue
                    .write_buffer(&self.params, 0, bytemuck::bytes_of(&params));
                let bg = self.bind_group(gpu, st)?.clone();
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                enc.clear_buffer(&self.probe, 0, Some(u64::from(PROBE_HDR) * 4));
                if passes.put {
                    enc.clear_buffer(&st.ctl, counter::STALL as u64 * 8, Some(8));
                }
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_bind_group(0, &bg, &[]);
                    pass.set_pipeline(pipe);
                    pass.dispatch_workgroups(x, y, 1);
                }
                self.copy_header(&mut enc, st);
                self.submit_and_map(gpu, enc, Some(RB_HDR))?;
                let (snap, left) = self.read_header()?;
                self.unmap_readback();
                if counts {
                    merge(counters, snap);
                }
                params.resume = 1;
                Ok(left == 0)
            })?;
        }
        Ok(())
    }

    /// Encodes the copies of the table's control words and the lane's probe header into
    /// the readback buffer's header.
    fn copy_header(&self, enc: &mut wgpu::CommandEncoder, st: &State) {
        enc.copy_buffer_to_buffer(&st.ctl, 0, &self.readback, 0, RB_CTL);
        enc.copy_buffer_to_buffer(&self.probe, 0, &self.readback, RB_CTL, RB_HDR - RB_CTL);
    }

    /// Encodes the copies of a get's or contains' output for `m` items into the readback
    /// buffer, after its header.
    fn copy_output(&self, enc: &mut wgpu::CommandEncoder, op: &Op<'_>, m: usize) {
        enc.copy_buffer_to_buffer(&self.flags8, 0, &self.readback, RB_HDR, flags_bytes(m));
        if let Op::Get { .. } = op {
            enc.copy_buffer_to_buffer(
                &self.vals_io,
                0,
                &self.readback,
                RB_HDR + flags_bytes(self.cap),
                (m * self.width * 8) as u64,
            );
        }
    }

    /// Submits `enc`, maps the readback buffer (up to byte `end`, or all of it) and waits
    /// until it is mapped.
    fn submit_and_map(&self, gpu: &Gpu, enc: wgpu::CommandEncoder, end: Option<u64>) -> Result<()> {
        let idx = gpu.queue.submit([enc.finish()]);
        map_range(&self.readback, wgpu::MapMode::Read, &self.rb_state, end);
        gpu.wait(idx)?;
        expect_mapped(gpu, &self.rb_state, "readback")
    }

    /// The control words and the count of unfinished items from the mapped readback header.
    fn read_header(&self) -> Result<([u64; counter::LEN], u32)> {
        let view = self
            .readback
            .get_mapped_range(..RB_HDR)
            .map_err(|e| device_error(format!("readback: {e}")))?;
        let mut c = [0u64; counter::LEN];
        copy_words(&mut c, &view[..RB_CTL as usize]);
        let left: u32 = bytemuck::pod_read_unaligned(&view[RB_CTL as usize..RB_CTL as usize + 4]);
        Ok((c, left))
    }

    fn unmap_readback(&self) {
        self.readback.unmap();
        self.rb_state.store(MAP_PENDING, Ordering::Release);
    }

    /// Writes a chunk's parameters, keys and (for a put) values into the upload buffer.
    fn fill(
        &mut self,
        gpu: &Gpu,
        params: &Params,
        keys: &[u64],
        values: Option<&[u64]>,
    ) -> Result<()> {
        expect_mapped(gpu, &self.up_state, "upload")?;
        let p = bytemuck::bytes_of(params);
        self.upload
            .get_mapped_range_mut(..p.len() as u64)
            .map_err(|e| device_error(format!("upload: {e}")))?
            .copy_from_slice(p);
        let k0 = UP_HDR as usize;
        write_mapped(&self.upload, k0, bytemuck::cast_slice(keys))?;
        if let Some(v) = values {
            write_mapped(&self.upload, k0 + self.cap * 8, bytemuck::cast_slice(v))?;
        }
        self.upload.unmap();
        self.up_state.store(MAP_PENDING, Ordering::Release);
        Ok(())
    }

    /// Writes the timestamp that ends `step` of the chunk being encoded, if the lane is timed.
    fn mark(&mut self, enc: &mut wgpu::CommandEncoder, step: &'static str) {
        if let Some(t) = self.timer.as_mut() {
            t.end(enc, step);
        }
    }

    /// Waits for whatever the lane has in flight, discarding its output (error paths).
    pub fn drain(&mut self, gpu: &Gpu) {
        if let Some(p) = self.pending.take() {
            let _ = gpu.wait(p.sub);
        }
    }
}

impl kv_staging::Staged for Lane {
    fn cap(&self) -> usize {
        self.cap
    }

    /// Ready for reuse: nothing in flight and its upload buffer mapped.
    fn reusable(&self) -> bool {
        self.pending.is_none() && self.up_state.load(Ordering::Acquire) == MAPPED
    }
}

/// Copies of at least this many bytes are split over the rayon pool.
const PAR_MIN: usize = 1 << 20;
/// Bytes per piece of a parallel copy.
const PAR_PIECE: usize = 1 << 18;

fn copy_bools(dst: &mut [bool], src: &[u8]) {
    let f = |(d, s): (&mut [bool], &[u8])| d.iter_mut().zip(s).for_each(|(d, s)| *d = *s != 0);
    if dst.len() < PAR_MIN {
        f((dst, src));
    } else {
        dst.par_chunks_mut(PAR_PIECE)
            .zip(src.par_chunks(PAR_PIECE))
            .for_each(f);
    }
}

fn copy_words(dst: &mut [u64], src: &[u8]) {
    let dst = bytemuck::cast_slice_mut::<u64, u8>(dst);
    if dst.len() < PAR_MIN {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(PAR_PIECE)
            .zip(src.par_chunks(PAR_PIECE))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// Copies `src` into the mapped `buffer` at byte `offset`, on all cores when it is large
/// (one mapped view per piece: views of disjoint ranges may be written concurrently).
fn write_mapped(buffer: &wgpu::Buffer, offset: usize, src: &[u8]) -> Result<()> {
    let view = |at: usize, len: usize| {
        buffer
            .get_mapped_range_mut(at as u64..(at + len) as u64)
            .map_err(|e| device_error(format!("upload: {e}")))
    };
    if src.len() < PAR_MIN {
        view(offset, src.len())?.copy_from_slice(src);
        return Ok(());
    }
    let views = src
        .chunks(PAR_PIECE)
        .enumerate()
        .map(|(i, s)| view(offset + i * PAR_PIECE, s.len()))
        .collect::<Result<Vec<_>>>()?;
    views
        .into_par_iter()
        .zip(src.par_chunks(PAR_PIECE))
        .for_each(|(mut d, s)| d.copy_from_slice(s));
    Ok(())
}

/// A range of one of the table's buffers: one segment of the key or the value array.
pub(crate) struct Part {
    /// The buffer (shared with the other segments it holds).
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl Part {
    /// The segment as a storage binding.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.size),
        })
    }

    /// Zeroes the segment.
    fn clear(&self, enc: &mut wgpu::CommandEncoder) {
        enc.clear_buffer(&self.buffer, self.offset, Some(self.size));
    }
}

/// One segment of the table: `slots` keys and their value rows.
pub(crate) struct Seg {
    pub keys: Part,
    pub vals: Part,
    pub slots: usize,
}

/// How the segments of one array (keys or values) lie in buffers: `count` segments of
/// `seg_bytes` each, `per_buffer` of them one after another in each buffer (the last buffer
/// may hold fewer). Segment `s` is at byte `(s % per_buffer) * seg_bytes` of buffer
/// `s / per_buffer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Packing {
    pub seg_bytes: u64,
    pub count: usize,
    pub per_buffer: usize,
}

impl Packing {
    /// `count` segments of `seg_bytes` in as few buffers of at most `max_buffer` bytes as
    /// possible, a whole number of segments per buffer, each segment's offset a multiple of
    /// `align` (when `seg_bytes` is not one, every segment gets its own buffer; a segment
    /// larger than `max_buffer` too).
    pub fn new(seg_bytes: u64, count: usize, max_buffer: u64, align: u64) -> Packing {
        let aligned = align <= 1 || seg_bytes.is_multiple_of(align);
        let fit = if aligned && seg_bytes > 0 {
            (max_buffer / seg_bytes).clamp(1, count.max(1) as u64) as usize
        } else {
            1
        };
        Packing {
            seg_bytes,
            count,
            per_buffer: fit,
        }
    }

    /// How many buffers the array takes.
    pub fn buffers(&self) -> usize {
        self.count.div_ceil(self.per_buffer)
    }

    /// The bytes of buffer `b`.
    pub fn buffer_bytes(&self, b: usize) -> u64 {
        let first = b * self.per_buffer;
        self.per_buffer.min(self.count.saturating_sub(first)) as u64 * self.seg_bytes
    }

    /// The buffer of segment `s` and the segment's offset in it.
    pub fn place(&self, s: usize) -> (usize, u64) {
        (
            s / self.per_buffer,
            (s % self.per_buffer) as u64 * self.seg_bytes,
        )
    }

    /// The segments of the array in order, as ranges of `buffers` (one per
    /// [`buffers`](Self::buffers)).
    fn parts(&self, buffers: &[wgpu::Buffer]) -> Vec<Part> {
        (0..self.count)
            .map(|s| {
                let (b, offset) = self.place(s);
                Part {
                    buffer: buffers[b].clone(),
                    offset,
                    size: self.seg_bytes,
                }
            })
            .collect()
    }
}

/// The table's key and value arrays: their segments and the buffers that hold them.
pub(crate) struct Arrays {
    pub segs: Vec<Seg>,
    /// The key array's buffers, then the value array's (each buffer once).
    pub buffers: Vec<wgpu::Buffer>,
}

/// The table's device state (behind the backend's RwLock).
pub(crate) struct State {
    pub slots: usize,
    pub width: usize,
    /// Slots per segment is `1 << seg_shift` (a lone segment may hold fewer).
    pub seg_shift: u32,
    pub segs: Vec<Seg>,
    /// The buffers holding the segments: the key array's, then the value array's.
    pub buffers: Vec<wgpu::Buffer>,
    /// The most bytes per table buffer (besides the device's limit).
    max_buffer: u64,
    /// `present[2]` then the value rows of the user keys 0 and 1.
    pub special: wgpu::Buffer,
    /// Control words (`kv_kernels::layout::counter`).
    pub ctl: wgpu::Buffer,
    /// Parameters of table-wide kernels (rehash).
    params: wgpu::Buffer,
    /// Readback of the control words for table-wide work.
    readback: wgpu::Buffer,
    rb_state: Arc<AtomicU8>,
    /// Changes whenever the buffers do.
    pub version: u64,
    /// Entries, special keys included.
    pub len: usize,
    /// Tombstones in the key array.
    pub tombs: usize,
    /// Special keys present (0..=2).
    pub spec_len: usize,
    /// The table's hash seed.
    pub seed: u64,
    /// The most slots one invocation probes per dispatch (shader module docs, "Bounded
    /// probes").
    pub budget: u32,
    /// Resume rounds run so far (batches and rehashes), a diagnostic.
    pub resumed: AtomicU64,
}

/// Segment shift for a table of `width`-word rows whose bindings hold `max_bytes`.
pub(crate) fn seg_shift_for(width: usize, max_bytes: u64) -> u32 {
    let slots = (max_bytes / (8 * width as u64)).max(1);
    (63 - slots.leading_zeros()).min(31)
}

/// The key and value arrays of a table of `slots` slots (a power of two) of `width`-word
/// rows in segments of `1 << seg_shift` slots, each array in as few zeroed buffers of at
/// most `max_buffer` bytes (and the device's limit) as possible. Fails with
/// `OutOfDeviceMemory` (dropping whatever it allocated) when a buffer cannot be allocated
/// or the device cannot bind that many segments.
fn alloc_arrays(
    gpu: &Gpu,
    slots: usize,
    width: usize,
    seg_shift: u32,
    max_buffer: u64,
) -> Result<Arrays> {
    let per = (1usize << seg_shift).min(slots);
    let n = slots.div_ceil(per);
    let total = (slots as u64).saturating_mul(8 * (width as u64 + 1));
    if n > gpu.max_segments() {
        // More storage bindings than one shader may have on this device.
        return Err(oom(total));
    }
    let max_buffer = max_buffer.min(gpu.max_buffer);
    let pack = |row: u64| Packing::new(per as u64 * row, n, max_buffer, gpu.storage_align);
    let (keys, vals) = (pack(8), pack(8 * width as u64));
    let mut buffers = Vec::with_capacity(keys.buffers() + vals.buffers());
    for (p, label) in [(keys, "vramkv keys"), (vals, "vramkv values")] {
        for b in 0..p.buffers() {
            buffers.push(gpu.table_buffer(label, p.buffer_bytes(b))?);
        }
    }
    let key_buffers = keys.buffers();
    let segs = keys
        .parts(&buffers[..key_buffers])
        .into_iter()
        .zip(vals.parts(&buffers[key_buffers..]))
        .map(|(keys, vals)| Seg {
            keys,
            vals,
            slots: per,
        })
        .collect();
    Ok(Arrays { segs, buffers })
}

impl State {
    pub fn new(
        gpu: &Gpu,
        slots: usize,
        width: usize,
        max_seg_bytes: u64,
        max_buffer: u64,
        seed: u64,
    ) -> Result<State> {
        use wgpu::BufferUsages as U;
        let seg_shift = seg_shift_for(width, max_seg_bytes);
        // Fresh wgpu buffers read as zeros: every key slot starts EMPTY.
        let a = alloc_arrays(gpu, slots, width, seg_shift, max_buffer)?;
        Ok(State {
            slots,
            width,
            seg_shift,
            segs: a.segs,
            buffers: a.buffers,
            max_buffer,
            special: gpu.buffer(
                "vramkv special",
                (2 + 2 * width as u64) * 8,
                U::STORAGE | U::COPY_DST,
                false,
            )?,
            ctl: gpu.buffer(
                "vramkv control",
                RB_CTL,
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            params: params_buffer(gpu)?,
            readback: gpu.buffer("vramkv readback", RB_CTL, U::MAP_READ | U::COPY_DST, false)?,
            rb_state: Arc::new(AtomicU8::new(MAP_PENDING)),
            version: next_gen(),
            len: 0,
            tombs: 0,
            spec_len: 0,
            seed,
            budget: gpu.probe_budget,
            resumed: AtomicU64::new(0),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(wgpu::Buffer::size).sum::<u64>()
            + self.special.size()
            + self.ctl.size()
            + self.params.size()
            + self.readback.size()
    }

    /// Keys in the key array (entries less the special keys).
    pub fn table_len(&self) -> usize {
        self.len.saturating_sub(self.spec_len)
    }

    fn params(&self, n: usize) -> Params {
        Params {
            n: n as u32,
            width: self.width as u32,
            mask: (self.slots - 1) as u32,
            seg_shift: self.seg_shift,
            seed_lo: self.seed as u32,
            seed_hi: (self.seed >> 32) as u32,
            budget: self.budget,
            ..Params::default()
        }
    }

    /// Submits `enc` (which ends by copying the control words into the readback buffer)
    /// and returns the control words.
    fn submit_for_counters(
        &self,
        gpu: &Gpu,
        mut enc: wgpu::CommandEncoder,
    ) -> Result<[u64; counter::LEN]> {
        enc.copy_buffer_to_buffer(&self.ctl, 0, &self.readback, 0, RB_CTL);
        let idx = gpu.queue.submit([enc.finish()]);
        map(&self.readback, wgpu::MapMode::Read, &self.rb_state);
        gpu.wait(idx)?;
        expect_mapped(gpu, &self.rb_state, "readback")?;
        let mut c = [0u64; counter::LEN];
        {
            let view = self
                .readback
                .get_mapped_range(..)
                .map_err(|e| device_error(format!("readback: {e}")))?;
            copy_words(&mut c, &view);
        }
        self.readback.unmap();
        Ok(c)
    }

    /// Empties the table: keys EMPTY, special keys absent. Waits for the device.
    pub fn clear(&mut self, gpu: &Gpu) -> Result<()> {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for s in &self.segs {
            s.keys.clear(&mut enc);
        }
        enc.clear_buffer(&self.special, 0, None);
        enc.clear_buffer(&self.ctl, 0, None);
        self.submit_for_counters(gpu, enc)?;
        self.len = 0;
        self.tombs = 0;
        self.spec_len = 0;
        Ok(())
    }

    /// Moves every entry into fresh segments of `slots` slots (growth, or a tombstone purge
    /// when `slots` is unchanged). The new buffers are allocated first and swapped in only
    /// once every key has moved: on any error the table is left as it was.
    ///
    /// The old segments are moved in pieces of at most [`REHASH_PIECE`] slots, one
    /// submission each, with the probes bounded as a batch's are (`rehash_module`): a piece
    /// that leaves keys unfinished raises STALL, the pieces after it do nothing, and the
    /// piece is finished in resume rounds before the rest is sent again.
    pub fn rehash(&mut self, gpu: &Gpu, slots: usize) -> Result<()> {
        use wgpu::BufferUsages as U;
        let new = alloc_arrays(gpu, slots, self.width, self.seg_shift, self.max_buffer)?;
        let segs = &new.segs;
        let layout = gpu.rehash_layout(segs.len())?;
        let pipeline = gpu.rehash_pipeline(segs.len())?;
        let per_old = (1usize << self.seg_shift).min(self.slots);
        let piece = REHASH_PIECE.min(per_old);
        let rprobe = gpu.buffer("vramkv rehash probe", piece as u64 * 4, U::STORAGE, false)?;
        let groups: Vec<wgpu::BindGroup> = self
            .segs
            .iter()
            .map(|old| {
                let bindings = [
                    self.params.as_entire_binding(),
                    self.ctl.as_entire_binding(),
                    old.keys.binding(),
                    old.vals.binding(),
                    rprobe.as_entire_binding(),
                ]
                .into_iter()
                .chain(segs.iter().map(|s| s.keys.binding()))
                .chain(segs.iter().map(|s| s.vals.binding()));
                gpu.bind_buffers("vramkv rehash", &layout.bgl, bindings)
            })
            .collect::<Result<_>>()?;
        // (old segment, first slot, slots) of each piece, in order.
        let pieces: Vec<(usize, usize, usize)> = self
            .segs
            .iter()
            .enumerate()
            .flat_map(|(s, old)| {
                (0..old.slots)
                    .step_by(piece)
                    .map(move |b| (s, b, piece.min(old.slots - b)))
            })
            .collect();
        let params = Params {
            mask: (slots - 1) as u32,
            ..self.params(0)
        };
        let run = |k: usize, resume: bool| {
            let (s, base, n) = pieces[k];
            let p = Params {
                n: n as u32,
                base: base as u32,
                code: k as u32 + 1,
                resume: u32::from(resume),
                ..params
            };
            gpu.queue
                .write_buffer(&self.params, 0, bytemuck::bytes_of(&p));
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            if resume {
                enc.clear_buffer(&self.ctl, counter::STALL as u64 * 8, Some(8));
            }
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &groups[s], &[]);
                let (x, y) = gpu.groups(n as u64);
                pass.dispatch_workgroups(x, y, 1);
            }
            enc
        };
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&self.ctl, 0, None);
        gpu.queue.submit([enc.finish()]);
        let limit = round_limit(slots, params.budget);
        let mut from = 0;
        let c = loop {
            for k in from..pieces.len() {
                gpu.queue.submit([run(k, false).finish()]);
            }
            let empty = gpu.device.create_command_encoder(&Default::default());
            let c = self.submit_for_counters(gpu, empty)?;
            let Some(k) = (c[counter::STALL] as usize).checked_sub(1) else {
                break c;
            };
            let mut c = [0; counter::LEN];
            let what = || format!("rehash into {slots} slots (table left as it was)");
            resume_rounds(limit, &self.resumed, what, || {
                c = self.submit_for_counters(gpu, run(k, true))?;
                Ok(c[counter::STALL] == 0)
            })?;
            from = k + 1;
            if from == pieces.len() {
                break c;
            }
        };
        let want = self.table_len() as u64;
        if c[counter::ERRORS] != 0 || c[counter::MOVED] != want {
            return Err(device_error(format!(
                "rehash into {slots} slots moved {} of {want} keys ({} probe overflows); table left as it was",
                c[counter::MOVED],
                c[counter::ERRORS]
            )));
        }
        self.segs = new.segs;
        self.buffers = new.buffers;
        self.slots = slots;
        self.tombs = 0;
        self.version = next_gen();
        Ok(())
    }

    /// Live keys and tombstones in the key array as the device counts them.
    pub fn count(&mut self, gpu: &Gpu, lane: &mut Lane) -> Result<(u64, u64)> {
        let pipeline = gpu.batch_pipeline(self.segs.len(), "kv_count")?;
        let (mut live, mut tombs) = (0, 0);
        let mut base = 0;
        while base < self.slots {
            let n = PIECE.min(self.slots - base);
            let params = Params {
                base: base as u32,
                ..self.params(n)
            };
            gpu.queue
                .write_buffer(&lane.params, 0, bytemuck::bytes_of(&params));
            let bg = lane.bind_group(gpu, self)?.clone();
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            enc.clear_buffer(&self.ctl, 0, None);
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bg, &[]);
                let (x, y) = gpu.groups(n as u64);
                pass.dispatch_workgroups(x, y, 1);
            }
            let c = self.submit_for_counters(gpu, enc)?;
            live += c[counter::LIVE];
            tombs += c[counter::TOMBS];
            base += n;
        }
        Ok((live, tombs))
    }
}

/// The kernels of an op, in order.
fn entries(op: &Op<'_>) -> &'static [&'static str] {
    match op {
        Op::Put { .. } => &["kv_put_dedup", "kv_put_place"],
        Op::Get { .. } => &["kv_get"],
        Op::Contains { .. } => &["kv_contains"],
        Op::Delete => &["kv_delete"],
    }
}

/// The region-order kernels (see [`region_order`]), one step ("order") in the GPU trace.
const ORDER_ENTRIES: [&str; 3] = ["kv_region_hist", "kv_region_scan", "kv_region_scatter"];

/// A kernel's step name in the GPU trace: `kv_put_dedup` is `dedup`, `kv_get` is `get`.
fn step_name(entry: &'static str) -> &'static str {
    entry.rsplit('_').next().unwrap_or(entry)
}

/// Runs a host batch through `lanes` (all of capacity `cap`); see the module docs. Returns
/// the control words after the batch for a put or delete.
///
/// A chunk that leaves items unfinished (shader module docs, "Bounded probes") is finished
/// in resume rounds when its lane is settled; after a put chunk so finished, the chunks
/// already submitted behind it did nothing (their kernels saw the stall), and the batch
/// goes on from the chunk after it.
pub(crate) fn run_host_batch(
    gpu: &Gpu,
    st: &State,
    lanes: &mut [Lane],
    cap: usize,
    keys: &[u64],
    op: &mut Op<'_>,
) -> Result<Option<[u64; counter::LEN]>> {
    let n = keys.len();
    let w = st.width;
    let chunks = n.div_ceil(cap);
    let nl = lanes.len();
    let put = matches!(op, Op::Put { .. });
    let output = matches!(op, Op::Get { .. } | Op::Contains { .. });
    let passes = Passes {
        pipes: entries(op)
            .iter()
            .map(|e| Ok((*e, gpu.batch_pipeline(st.segs.len(), e)?)))
            .collect::<Result<Vec<_>>>()?,
        put,
    };
    let order = region_order(st.slots);
    let order_pipes = match order {
        Some(_) => ORDER_ENTRIES
            .iter()
            .map(|e| gpu.batch_pipeline(st.segs.len(), e))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let (rshift, nreg) = order.unwrap_or((0, 0));
    let mut counters = None;
    let mut trace = Trace::default();
    let mut times = BatchTimes::default();
    let mut next = 0;
    loop {
        // Settle the oldest chunk in flight when its lane is wanted for the next chunk, and
        // every chunk at the end. Lanes are used round robin, so the lane of chunk `next`
        // holds the oldest one.
        let oldest = lanes
            .iter()
            .enumerate()
            .filter_map(|(l, lane)| lane.pending.as_ref().map(|p| (p.chunk, l)))
            .min();
        if let Some((_, l)) =
            oldest.filter(|_| next >= chunks || lanes[next % nl].pending.is_some())
        {
            let t0 = std::time::Instant::now();
            let rewind = lanes[l].settle(gpu, st, &passes, op, &mut counters, &mut times, false)?;
            trace.settle(&lanes[l], t0.elapsed());
            if let Some(c) = rewind {
                for lane in lanes.iter_mut() {
                    lane.settle(gpu, st, &passes, op, &mut counters, &mut times, true)?;
                }
                next = c + 1;
            }
            continue;
        }
        if next >= chunks {
            break;
        }
        let c = next;
        next += 1;
        let start = c * cap;
        let m = cap.min(n - start);
        let lane = &mut lanes[c % nl];
        let values = match op {
            Op::Put { values } => Some(&values[start * w..(start + m) * w]),
            _ => None,
        };
        let (x, y) = gpu.groups(m as u64);
        let params = Params {
            lmask: if put { (local_slots(m) - 1) as u32 } else { 0 },
            rshift,
            nreg,
            code: 1 + 2 * c as u32,
            ..st.params(m)
        };
        let t0 = std::time::Instant::now();
        lane.fill(gpu, &params, &keys[start..start + m], values)?;
        trace.copy_in += t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        let bg = lane.bind_group(gpu, st)?.clone();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        if let Some(t) = lane.timer.as_mut() {
            t.start(&mut enc);
        }
        enc.copy_buffer_to_buffer(&lane.upload, 0, &lane.params, 0, PARAMS_BYTES);
        enc.copy_buffer_to_buffer(&lane.upload, UP_HDR, &lane.keys_in, 0, m as u64 * 8);
        if values.is_some() {
            enc.copy_buffer_to_buffer(
                &lane.upload,
                UP_HDR + lane.cap as u64 * 8,
                &lane.vals_io,
                0,
                (m * w * 8) as u64,
            );
        }
        lane.mark(&mut enc, "upload copy");
        if c == 0 && op.counts() {
            enc.clear_buffer(&st.ctl, 0, None);
        }
        enc.clear_buffer(&lane.probe, 0, Some(u64::from(PROBE_HDR) * 4));
        if put {
            enc.clear_buffer(&lane.local, 0, Some(local_bytes(m)));
        }
        if output {
            enc.clear_buffer(&lane.flags8, 0, Some(flags_bytes(m)));
        }
        if order.is_some() {
            enc.clear_buffer(&lane.regions, 0, None);
        }
        lane.mark(&mut enc, "clear");
        if !order_pipes.is_empty() {
            // The chunk's items grouped by region: histogram, scan (one workgroup), scatter.
            let (ox, oy) = gpu.groups((m as u64).div_ceil(u64::from(ORDER_ITEMS)));
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_bind_group(0, &bg, &[]);
                for (p, (x, y)) in order_pipes.iter().zip([(ox, oy), (1, 1), (ox, oy)]) {
                    pass.set_pipeline(p);
                    pass.dispatch_workgroups(x, y, 1);
                }
            }
            lane.mark(&mut enc, "order");
        }
        if let Some(t) = lane.timer.as_mut() {
            // Timed: one pass per kernel, a timestamp after each.
            for (e, p) in &passes.pipes {
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_bind_group(0, &bg, &[]);
                    pass.set_pipeline(p);
                    pass.dispatch_workgroups(x, y, 1);
                }
                t.end(&mut enc, step_name(e));
            }
        } else {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, &bg, &[]);
            for (_, p) in &passes.pipes {
                pass.set_pipeline(p);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        lane.copy_header(&mut enc, st);
        if output {
            lane.copy_output(&mut enc, op, m);
        }
        lane.mark(&mut enc, "readback copy");
        if let Some(t) = lane.timer.as_mut() {
            t.finish(&mut enc);
        }
        let sub = gpu.queue.submit([enc.finish()]);
        map(&lane.upload, wgpu::MapMode::Write, &lane.up_state);
        map_range(
            &lane.readback,
            wgpu::MapMode::Read,
            &lane.rb_state,
            (!output).then_some(RB_HDR),
        );
        if let Some(t) = lane.timer.as_mut() {
            t.submitted();
        }
        trace.submit += t0.elapsed().as_secs_f64();
        lane.pending = Some(Pending {
            sub,
            chunk: c,
            start,
            m,
            params,
            output,
        });
    }
    if tracing() {
        let ms = |s: f64| s * 1e3;
        eprintln!(
            "vramkv wgpu trace: {} of {n} keys in {chunks} chunks of {cap}: wait for GPU {:.1} ms, copy in {:.1} ms, copy out {:.1} ms, encode+submit {:.1} ms",
            entries(op).first().copied().unwrap_or("batch"),
            ms(trace.wait),
            ms(trace.copy_in),
            ms(trace.copy_out),
            ms(trace.submit)
        );
        if let Some(line) = times.line(chunks, gpu.queue.get_timestamp_period()) {
            eprintln!("{line}");
        }
    }
    if op.counts() && counters.is_none() {
        return Err(device_error("the batch's counters were not read back"));
    }
    Ok(counters)
}

#[cfg(test)]
mod tests {
    use super::{Packing, resume_rounds, round_limit};
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn resume_rounds_stop_when_done_and_fail_past_the_limit() {
        let resumed = AtomicU64::new(0);
        let mut left = 3;
        let r = resume_rounds(
            10,
            &resumed,
            || "never".into(),
            || {
                left -= 1;
                Ok(left == 0)
            },
        );
        assert!(r.is_ok());
        assert_eq!(resumed.load(Ordering::Relaxed), 3);
        // A probe that never finishes (a broken table) is an error, not a hang.
        let limit = round_limit(64, 8);
        assert_eq!(limit, 4 + 2 * 8);
        let r = resume_rounds(limit, &resumed, || "kv_get".into(), || Ok(false));
        let e = r.expect_err("no end").to_string();
        assert!(e.contains("kv_get") && e.contains("20 rounds"), "{e}");
        assert_eq!(resumed.load(Ordering::Relaxed), 3 + 20);
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Every segment's buffer and offset, and every buffer's size, checked against each
    /// other: the segments tile their buffers in order, each offset aligned.
    fn layout(p: &Packing, align: u64) -> (Vec<(usize, u64)>, Vec<u64>) {
        let places: Vec<(usize, u64)> = (0..p.count).map(|s| p.place(s)).collect();
        let sizes: Vec<u64> = (0..p.buffers()).map(|b| p.buffer_bytes(b)).collect();
        for (b, &size) in sizes.iter().enumerate() {
            let offsets: Vec<u64> = places
                .iter()
                .filter(|(pb, _)| *pb == b)
                .map(|(_, o)| *o)
                .collect();
            let want: Vec<u64> = (0..offsets.len() as u64).map(|i| i * p.seg_bytes).collect();
            assert_eq!(offsets, want, "buffer {b} of {p:?}");
            assert_eq!(size, offsets.len() as u64 * p.seg_bytes, "{p:?}");
        }
        assert!(places.iter().all(|&(b, _)| b < sizes.len()), "{p:?}");
        assert!(places.iter().all(|(_, o)| o % align == 0), "{p:?}");
        (places, sizes)
    }

    #[test]
    fn one_buffer_per_array_when_it_fits() {
        // NVIDIA: 4 GiB of keys in 1 GiB segments, buffers of up to 2^52 bytes.
        let p = Packing::new(GIB, 4, 1 << 52, 64);
        assert_eq!((p.per_buffer, p.buffers()), (4, 1));
        let (places, sizes) = layout(&p, 64);
        assert_eq!(places, [(0, 0), (0, GIB), (0, 2 * GIB), (0, 3 * GIB)]);
        assert_eq!(sizes, [4 * GIB]);
        // A lone segment smaller than a full one.
        let p = Packing::new(512, 1, 1 << 52, 256);
        assert_eq!(
            (p.buffers(), p.buffer_bytes(0), p.place(0)),
            (1, 512, (0, 0))
        );
    }

    #[test]
    fn several_buffers_of_whole_segments() {
        // lavapipe: 128 MiB segments, buffers below 2 GiB (i32::MAX) hold 15 of them.
        let p = Packing::new(128 * MIB, 32, i32::MAX as u64, 16);
        assert_eq!((p.per_buffer, p.buffers()), (15, 3));
        let (places, sizes) = layout(&p, 16);
        assert_eq!(sizes, [15 * 128 * MIB, 15 * 128 * MIB, 2 * 128 * MIB]);
        assert_eq!(places[14], (0, 14 * 128 * MIB));
        assert_eq!(places[15], (1, 0));
        assert_eq!(places[31], (2, 128 * MIB));
        // The test knob: 4 MiB segments in 16 MiB buffers.
        let p = Packing::new(4 * MIB, 10, 16 * MIB, 256);
        let (places, sizes) = layout(&p, 256);
        assert_eq!(sizes, [16 * MIB, 16 * MIB, 8 * MIB]);
        assert_eq!(places[5], (1, 4 * MIB));
        // A cap below one segment still gives each segment a buffer of its own.
        let p = Packing::new(GIB, 3, 16 * MIB, 256);
        assert_eq!((p.per_buffer, p.buffers()), (1, 3));
        assert_eq!(layout(&p, 256).1, [GIB; 3]);
    }

    #[test]
    fn unaligned_segments_get_a_buffer_each() {
        // 3 slots of 8 bytes: 24 B segments cannot start at multiples of 256.
        let p = Packing::new(24, 4, 1 << 20, 256);
        assert_eq!((p.per_buffer, p.buffers()), (1, 4));
        assert_eq!(layout(&p, 256).0, [(0, 0), (1, 0), (2, 0), (3, 0)]);
        // Width 3 at 64 slots: 1536 B segments are multiples of 256.
        let p = Packing::new(64 * 24, 4, 1 << 20, 256);
        assert_eq!((p.per_buffer, p.buffers()), (4, 1));
        layout(&p, 256);
    }
}
