//! Byte tables on wgpu ([`WgpuBytes`]): byte-string keys and values (docs/arena.md) in GPU
//! memory, with the kernels of `bytes_shader`.
//!
//! # Who does what
//!
//! The device holds the index (open addressing: per slot the key's length, the value's,
//! the key's hash, the record's address and its expiry time) and the arena (one storage
//! buffer of u32 words), and runs every probe (comparing the key's bytes with the key in
//! the arena, as keys that share a hash are distinct keys), every change of the index, the
//! gathers of a get's values and compaction's moves. The host hashes the keys
//! (`kv_kernels::layout::byte_hash`), deduplicates a batch (`kv_core::last_occurrences`),
//! admits it (`kv_core::plan_put`) and plans the arena (`kv_arena::ArenaPlan`, the plan
//! every backend uses); a put's records go to their planned addresses with queue writes.
//!
//! # A put, step by step
//!
//! Entries expired now are deleted first (a scan of the index, run only when a timer the
//! host keeps is due); `kb_find` looks the batch's distinct keys up; the host counts the
//! new ones, admits the batch, places its records on a copy of the arena's plan (a full
//! arena is compacted once and the placement tried again), makes the arena buffer large
//! enough, and rebuilds the index when it grows or when its deleted slots would leave too
//! few empty ones. Up to there nothing the table holds has changed, and any error leaves
//! the table as it was. Then the records are written, `kb_set` overwrites the entries of
//! present keys and `kb_claim` inserts the new ones, the old records are freed in the plan
//! and compaction moves at most `kv_arena::ArenaPlan::compaction_allowance` live bytes. A
//! device error in that second part leaves the index and the plan out of step: the table
//! then answers every call with [`Error::Device`] until [`ByteTable::clear`] empties it.
//!
//! # Limits
//!
//! The arena is one storage binding, so it holds at most the adapter's largest binding
//! (128 MiB on lavapipe, near 2 GiB on Vulkan drivers); a put that needs more is refused
//! with [`Error::OutOfDeviceMemory`] and changes nothing. The buffer spans the highest
//! segment in use and grows by doubling; [`ArenaStats::held_bytes`](kv_core::ArenaStats)
//! counts the segments in use. The index's slot array is one binding too (32 bytes a
//! slot). Growth and purges of deleted slots rebuild the index on the host (it is read
//! back, reinserted and written again), which is simple and correct but not fast.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex, MutexGuard};

use kv_arena::{ArenaPlan, RECORD_ALIGN, default_segment_bytes, padded, record_lens};
use kv_core::{
    Binary, BinaryBuf, ByteConfig, ByteDescription, ByteImage, ByteLimits, ByteTable, Error,
    Result, capacity_of, check_byte_lookup, check_byte_put, check_per_key, last_occurrences,
    remaining_ttl,
};
use kv_kernels::layout::{byte_hash, expired, expiry_time};
use rayon::prelude::*;

use crate::WgpuOptions;
use crate::bytes_shader::{
    self as bs, COPY_WORDS, Found, Item, KL_EMPTY, KL_TOMB, Params, Piece, Slot, counter, join,
    split,
};
use crate::gpu::{BACKEND, Fixed, Gpu, device_error, oom};
use crate::mapping::{MAP_PENDING, bytes, expect_mapped, map_range, read_back};

/// Items per piece of a batch at most, by default (one upload, dispatch and readback).
const DEFAULT_PIECE: usize = 1 << 16;

/// Dispatches per submission when items are resumed.
const RESUME_ROUNDS: usize = 8;

/// The most bytes of values one gather collects before they are read back.
const GATHER_BYTES: u64 = 64 << 20;

/// Batches at least this long hash their keys on every core.
const PARALLEL_HASH: usize = 4096;

/// Bytes of the counters.
const CTL_BYTES: u64 = (counter::LEN * 4) as u64;

/// Bytes of one slot of the index: its key length and its [`Slot`].
const SLOT_BYTES: u64 = 4 + std::mem::size_of::<Slot>() as u64;

/// An entry of the index as the host sees it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    slot: u32,
    key_len: u32,
    value_len: u32,
    addr: u64,
    expires: u64,
}

impl Entry {
    fn of(f: &Found) -> Option<Entry> {
        Some(Entry {
            slot: f.slot()?,
            key_len: f.klen,
            value_len: f.vlen,
            addr: f.addr(),
            expires: f.expires(),
        })
    }

    fn record_len(&self) -> u64 {
        u64::from(self.key_len) + u64::from(self.value_len)
    }
}

/// The index's device arrays.
struct Index {
    slots: usize,
    /// Key length per slot (the slot's state).
    kl: wgpu::Buffer,
    /// [`Slot`] per slot.
    words: wgpu::Buffer,
}

/// A host copy of the index and of the arena's bytes in use ([`WgpuBytes::copy_out`]):
/// what a rebuild reinserts and an export decodes.
struct IndexCopy {
    slots: usize,
    /// Key length per slot, as u32 words in u64s.
    kl: Vec<u64>,
    /// [`Slot`] per slot, in u64s.
    words: Vec<u64>,
    /// The arena's first `arena_bytes` bytes, in u64s.
    arena: Vec<u64>,
    arena_bytes: u64,
}

impl IndexCopy {
    /// Each occupied slot's key length and [`Slot`], in slot order.
    fn occupied(&self) -> impl Iterator<Item = (u32, &Slot)> + '_ {
        let kl: &[u32] = bytemuck::cast_slice(&self.kl);
        let words: &[Slot] = bytemuck::cast_slice(&self.words);
        kl.iter()
            .zip(words)
            .take(self.slots)
            .filter(|(k, _)| **k != KL_EMPTY && **k != KL_TOMB)
            .map(|(k, w)| (*k, w))
    }

    /// The entries live at `now`, with their key and value bytes out of the arena and their
    /// absolute expiry times.
    fn decode(&self, now: u64) -> Result<ByteImage> {
        let arena = bytes(&self.arena, self.arena_bytes);
        let mut img = ByteImage::default();
        for (klen, w) in self.occupied() {
            let expires = join(w.exp_lo, w.exp_hi);
            if expired(expires, now) {
                continue;
            }
            let at = join(w.addr_lo, w.addr_hi);
            let (k_end, v_end) = (
                at + u64::from(klen),
                at + u64::from(klen) + u64::from(w.vlen),
            );
            let (Some(key), Some(value)) = (
                arena.get(at as usize..k_end as usize),
                arena.get(k_end as usize..v_end as usize),
            ) else {
                return Err(device_error(format!(
                    "an index entry's record ({} bytes at byte {at}) lies past the arena's {} bytes",
                    v_end - at,
                    arena.len()
                )));
            };
            img.push(key, value, expires);
        }
        Ok(img)
    }
}

/// The batch buffers, grown as batches need and never shrunk.
struct Scratch {
    q: wgpu::Buffer,
    items: wgpu::Buffer,
    out: wgpu::Buffer,
    pieces: wgpu::Buffer,
    readback: wgpu::Buffer,
    rb_state: Arc<AtomicU8>,
}

/// What a kernel run reads back besides the counters.
#[derive(Clone, Copy)]
enum Read {
    Nothing,
    /// The first `n` [`Found`] of `bout`.
    Found(usize),
    /// The first `n` words of `bq`.
    Words(usize),
}

struct State {
    index: Index,
    arena: wgpu::Buffer,
    plan: ArenaPlan,
    /// Occupied slots (live entries, and expired ones not yet deleted).
    occupied: usize,
    /// Deleted slots.
    tombs: usize,
    /// Expiry times given to entries, with how many: a time that is due means a scan.
    /// An entry whose expiry changed since leaves a stale time behind, which costs one
    /// scan that finds nothing.
    timers: BTreeMap<u64, usize>,
    params: wgpu::Buffer,
    ctl: wgpu::Buffer,
    scratch: Option<Scratch>,
    /// Items per piece at most.
    piece: usize,
    /// Units of probe work per item per dispatch.
    budget: u32,
    /// Submissions that resumed items a dispatch left undecided.
    resumed: u64,
    /// Set when a device error left the index and the plan out of step.
    broken: Option<String>,
}

/// A byte table in the memory of a GPU driven through wgpu (see the module docs).
///
/// ```no_run
/// use kv_backend_wgpu::WgpuBytes;
/// use kv_core::{ByteConfig, ByteTable};
/// let t = WgpuBytes::open(ByteConfig::new(1000))?;
/// t.put_slices(&[b"user:1", b"user:2"], &[b"alice", b""])?;
/// assert_eq!(
///     t.get_slices(&[b"user:2", b"user:3"])?,
///     [Some(vec![]), None]
/// );
/// # Ok::<(), kv_core::Error>(())
/// ```
pub struct WgpuBytes {
    gpu: Arc<Gpu>,
    cfg: ByteConfig,
    seed: u64,
    mask: u64,
    segment: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for WgpuBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBytes")
            .field("adapter", &self.gpu.name)
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn storage_buffer(gpu: &Gpu, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
    use wgpu::BufferUsages as U;
    gpu.buffer(label, bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC, false)
}

fn new_index(gpu: &Gpu, slots: usize) -> Result<Index> {
    let bytes = slots as u64 * std::mem::size_of::<Slot>() as u64;
    if bytes > gpu.max_binding {
        return Err(oom(slots as u64 * SLOT_BYTES));
    }
    // Fresh wgpu buffers read as zeros: every slot is empty.
    Ok(Index {
        slots,
        kl: storage_buffer(gpu, "vramkv bytes index lengths", slots as u64 * 4)?,
        words: storage_buffer(gpu, "vramkv bytes index slots", bytes)?,
    })
}

/// The scratch, which `WgpuBytes::ensure_scratch` made.
fn scratch(st: &State) -> Result<&Scratch> {
    st.scratch
        .as_ref()
        .ok_or_else(|| device_error("byte table scratch missing"))
}

/// Copies `key` into `words` from a word boundary, zero-padded.
fn push_key(words: &mut Vec<u32>, key: &[u8]) {
    words.extend(key.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_le_bytes(w)
    }));
}

impl WgpuBytes {
    /// Opens a byte table on adapter `cfg.table.device` (default: as
    /// [`crate::WgpuBackend::open`] chooses), with the default [`WgpuOptions`].
    pub fn open(cfg: ByteConfig) -> Result<Self> {
        Self::open_with(cfg, &WgpuOptions::default())
    }

    /// [`open`](Self::open) with `options` (checked; a byte table uses their probe budget).
    ///
    /// Fails with [`Error::InvalidConfig`] for a config [`ByteConfig::validate`] refuses,
    /// [`Error::BackendUnavailable`] when no adapter (or not the chosen one) offers the
    /// needed features, and [`Error::OutOfDeviceMemory`] when an arena segment or the
    /// index passes the adapter's largest storage binding, or an allocation fails.
    pub fn open_with(cfg: ByteConfig, options: &WgpuOptions) -> Result<Self> {
        cfg.validate()?;
        options.validate()?;
        let gpu = crate::gpu::gpu(&cfg.table)?;
        let segment = cfg
            .segment_bytes
            .unwrap_or_else(|| default_segment_bytes(cfg.max_record_bytes()));
        if segment > gpu.max_binding {
            return Err(oom(segment));
        }
        let index = new_index(&gpu, cfg.table.initial_slots())?;
        let state = State {
            index,
            arena: storage_buffer(&gpu, "vramkv bytes arena", 4)?,
            plan: ArenaPlan::new(segment, cfg.arena_budget),
            occupied: 0,
            tombs: 0,
            timers: BTreeMap::new(),
            params: gpu.buffer(
                "vramkv bytes params",
                std::mem::size_of::<Params>() as u64,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                false,
            )?,
            ctl: storage_buffer(&gpu, "vramkv bytes counters", CTL_BYTES)?,
            scratch: None,
            piece: DEFAULT_PIECE,
            budget: options.probe_budget.unwrap_or(gpu.probe_budget).max(1),
            resumed: 0,
            broken: None,
        };
        // Compile the kernels now, so that a table that opens can run.
        for e in bs::ENTRIES {
            gpu.fixed_pipeline(Fixed::Bytes, e)?;
        }
        gpu.check()?;
        Ok(WgpuBytes {
            seed: cfg.table.table_seed(),
            mask: cfg.hash_mask(),
            segment,
            gpu,
            cfg,
            state: Mutex::new(state),
        })
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
    /// holds, at least 1. Tests set a small one to run their batches in several pieces.
    pub fn set_piece_items(&self, items: usize) {
        self.raw_lock().piece = items.max(1);
    }

    /// Sets the units of probe work (a slot, or a word of a key compared) one item does per
    /// dispatch, at least 1; an item that has not decided is resumed by the next dispatch.
    /// Tests set a small one to run the resume path.
    pub fn set_probe_budget(&self, budget: u32) {
        self.raw_lock().budget = budget.max(1);
    }

    /// Submissions so far that resumed items a dispatch left undecided.
    pub fn resume_rounds(&self) -> u64 {
        self.raw_lock().resumed
    }

    fn raw_lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, for a batch: an error if the device or the table is broken.
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.gpu.check()?;
        let st = self.raw_lock();
        if let Some(why) = &st.broken {
            return Err(device_error(format!(
                "the byte table is unusable after a device error ({why}); clear() empties it"
            )));
        }
        Ok(st)
    }

    fn now(&self) -> u64 {
        self.cfg.clock.now_ms()
    }

    fn hashes(&self, keys: Binary<'_>) -> Vec<u64> {
        let h = |i: usize| byte_hash(keys.get(i), self.seed) & self.mask;
        if keys.len() >= PARALLEL_HASH {
            (0..keys.len()).into_par_iter().map(h).collect()
        } else {
            (0..keys.len()).map(h).collect()
        }
    }

    fn upload<T: bytemuck::Pod>(&self, buffer: &wgpu::Buffer, data: &[T]) {
        if !data.is_empty() {
            self.gpu
                .queue
                .write_buffer(buffer, 0, bytemuck::cast_slice(data));
        }
    }

    /// Makes sure the scratch holds `q` words, `items` items, `out` found entries and
    /// `pieces` copies.
    fn ensure_scratch(
        &self,
        st: &mut State,
        q: usize,
        items: usize,
        out: usize,
        pieces: usize,
    ) -> Result<()> {
        use wgpu::BufferUsages as U;
        let want = [
            q as u64 * 4,
            (items * std::mem::size_of::<Item>()) as u64,
            (out * std::mem::size_of::<Found>()) as u64,
            (pieces * std::mem::size_of::<Piece>()) as u64,
        ]
        .map(|b| b.max(4).next_multiple_of(4));
        let have = st.scratch.as_ref().map_or([0; 4], |s| {
            [s.q.size(), s.items.size(), s.out.size(), s.pieces.size()]
        });
        if want.iter().zip(&have).all(|(w, h)| w <= h) {
            return Ok(());
        }
        let size = |k: usize| want[k].max(have[k]).next_power_of_two();
        st.scratch = None;
        let (q, items, out, pieces) = (size(0), size(1), size(2), size(3));
        st.scratch = Some(Scratch {
            q: storage_buffer(&self.gpu, "vramkv bytes words", q)?,
            items: storage_buffer(&self.gpu, "vramkv bytes items", items)?,
            out: storage_buffer(&self.gpu, "vramkv bytes found", out)?,
            pieces: storage_buffer(&self.gpu, "vramkv bytes pieces", pieces)?,
            readback: self.gpu.buffer(
                "vramkv bytes readback",
                CTL_BYTES + q.max(out),
                U::MAP_READ | U::COPY_DST,
                false,
            )?,
            rb_state: Arc::new(AtomicU8::new(MAP_PENDING)),
        });
        Ok(())
    }

    fn params(&self, st: &State, n: usize, mode: u32) -> Params {
        let (now_lo, now_hi) = split(self.now());
        Params {
            n: n as u32,
            smask: (st.index.slots - 1) as u32,
            budget: st.budget,
            mode,
            seg_shift: self.segment.trailing_zeros(),
            now_lo,
            now_hi,
            ..Params::default()
        }
    }

    /// Runs `entry` over `threads` invocations `rounds` times in one submission, waits,
    /// and returns the counters and what `read` asks for.
    fn run(
        &self,
        st: &State,
        entry: &'static str,
        p: &Params,
        rounds: usize,
        read: Read,
    ) -> Result<([u32; counter::LEN], Vec<u8>)> {
        let s = scratch(st)?;
        self.upload(&st.params, std::slice::from_ref(p));
        let layout = self.gpu.fixed_layout(Fixed::Bytes)?;
        let bind = self.gpu.bind_buffers(
            "vramkv bytes",
            &layout.bgl,
            [
                &st.params,
                &st.ctl,
                &st.index.kl,
                &st.index.words,
                &st.arena,
                &s.q,
                &s.items,
                &s.out,
                &s.pieces,
            ]
            .map(|b| b.as_entire_binding()),
        )?;
        let pipe = self.gpu.fixed_pipeline(Fixed::Bytes, entry)?;
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&st.ctl, 0, None);
        if p.n > 0 {
            let (x, y) = self.gpu.groups(u64::from(p.n));
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bind, &[]);
            for _ in 0..rounds {
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        enc.copy_buffer_to_buffer(&st.ctl, 0, &s.readback, 0, CTL_BYTES);
        let bytes = match read {
            Read::Nothing => 0,
            Read::Found(n) => {
                let b = (n * std::mem::size_of::<Found>()) as u64;
                if b > 0 {
                    enc.copy_buffer_to_buffer(&s.out, 0, &s.readback, CTL_BYTES, b);
                }
                b
            }
            Read::Words(n) => {
                let b = n as u64 * 4;
                if b > 0 {
                    enc.copy_buffer_to_buffer(&s.q, 0, &s.readback, CTL_BYTES, b);
                }
                b
            }
        };
        let idx = self.gpu.queue.submit([enc.finish()]);
        let end = CTL_BYTES + bytes;
        map_range(&s.readback, wgpu::MapMode::Read, &s.rb_state, Some(end));
        self.gpu.wait(idx)?;
        expect_mapped(&self.gpu, &s.rb_state, "byte table readback")?;
        let r = {
            let view = s
                .readback
                .get_mapped_range(..end)
                .map_err(|e| device_error(format!("byte table readback: {e}")))?;
            let mut ctl = [0u32; counter::LEN];
            ctl.copy_from_slice(bytemuck::cast_slice(&view[..CTL_BYTES as usize]));
            (ctl, view[CTL_BYTES as usize..].to_vec())
        };
        s.readback.unmap();
        Ok(r)
    }

    /// Runs a probing kernel (`kb_find`, `kb_claim`) over the `n` items uploaded, resuming
    /// until every item has decided. Returns the counters summed over the submissions and
    /// the found entries (`kb_find`).
    fn run_probes(
        &self,
        st: &mut State,
        entry: &'static str,
        n: usize,
    ) -> Result<([u32; counter::LEN], Vec<Found>)> {
        let p = self.params(st, n, 0);
        let read = if entry == bs::FIND {
            Read::Found(n)
        } else {
            Read::Nothing
        };
        let mut total = [0u32; counter::LEN];
        let mut rounds = 1;
        loop {
            let (ctl, out) = self.run(st, entry, &p, rounds, read)?;
            for (t, c) in total.iter_mut().zip(ctl) {
                *t += c;
            }
            let done = total[counter::FINISHED] as usize;
            if done >= n {
                if total[counter::ERRORS] != 0 {
                    return Err(device_error(format!(
                        "{entry}: {} keys found no free slot in the index",
                        total[counter::ERRORS]
                    )));
                }
                let found = bytemuck::pod_collect_to_vec::<u8, Found>(&out);
                return Ok((total, found));
            }
            if ctl[counter::FINISHED] == 0 && ctl[counter::PROGRESS] == 0 {
                return Err(device_error(format!(
                    "{entry}: {done} of {n} items decided and a submission made no progress"
                )));
            }
            st.resumed += 1;
            rounds = RESUME_ROUNDS;
        }
    }

    /// The entry of each listed item's key (`None`: absent), expired or not.
    fn find(
        &self,
        st: &mut State,
        keys: Binary<'_>,
        hashes: &[u64],
        which: &[usize],
    ) -> Result<Vec<Option<Entry>>> {
        let smask = (st.index.slots - 1) as u64;
        let mut out = Vec::with_capacity(which.len());
        for piece in which.chunks(st.piece) {
            let mut words = Vec::new();
            let items: Vec<Item> = piece
                .iter()
                .map(|&i| {
                    let key = keys.get(i);
                    let koff = words.len() as u32;
                    push_key(&mut words, key);
                    let (hash_lo, hash_hi) = split(hashes[i]);
                    Item {
                        home: (hashes[i] & smask) as u32,
                        koff,
                        klen: key.len() as u32,
                        hash_lo,
                        hash_hi,
                        ..Item::default()
                    }
                })
                .collect();
            self.ensure_scratch(st, words.len(), items.len(), items.len(), 0)?;
            let s = scratch(st)?;
            self.upload(&s.q, &words);
            self.upload(&s.items, &items);
            let (_, found) = self.run_probes(st, bs::FIND, items.len())?;
            out.extend(found.iter().map(Entry::of));
        }
        Ok(out)
    }

    /// Writes `items` with `kb_set` in `mode`.
    fn set(&self, st: &mut State, mode: u32, items: &[Item]) -> Result<()> {
        for piece in items.chunks(st.piece) {
            self.ensure_scratch(st, 0, piece.len(), 0, 0)?;
            let s = scratch(st)?;
            self.upload(&s.items, piece);
            let p = self.params(st, piece.len(), mode);
            let (ctl, _) = self.run(st, bs::SET, &p, 1, Read::Nothing)?;
            if ctl[counter::FINISHED] as usize != piece.len() {
                return Err(device_error(format!(
                    "kb_set wrote {} of {} slots",
                    ctl[counter::FINISHED],
                    piece.len()
                )));
            }
        }
        Ok(())
    }

    /// Inserts new keys (`items`: home, lengths, hash, address, expiry); returns how many
    /// deleted slots they reused.
    fn claim(&self, st: &mut State, items: &[Item]) -> Result<usize> {
        let mut reused = 0;
        for piece in items.chunks(st.piece) {
            self.ensure_scratch(st, 0, piece.len(), 0, 0)?;
            let s = scratch(st)?;
            self.upload(&s.items, piece);
            let (ctl, _) = self.run_probes(st, bs::CLAIM, piece.len())?;
            reused += ctl[counter::REUSED] as usize;
        }
        Ok(reused)
    }

    /// The entries of the whole index that `kb_scan` takes in `mode` (for segments: those
    /// whose segment is set in `bitmap`), sorted by slot.
    fn scan(&self, st: &mut State, mode: u32, bitmap: &[u32]) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let slots = st.index.slots;
        let step = st.piece.max(256);
        for base in (0..slots).step_by(step) {
            let n = step.min(slots - base);
            self.ensure_scratch(st, bitmap.len(), 0, n, 0)?;
            if !bitmap.is_empty() {
                let s = st
                    .scratch
                    .as_ref()
                    .ok_or_else(|| device_error("byte table scratch missing"))?;
                self.upload(&s.q, bitmap);
            }
            let p = Params {
                base: base as u32,
                cap: n as u32,
                ..self.params(st, n, mode)
            };
            let (ctl, bytes) = self.run(st, bs::SCAN, &p, 1, Read::Found(n))?;
            let got = ctl[counter::APPENDED] as usize;
            if got > n {
                return Err(device_error(format!(
                    "kb_scan appended {got} entries from {n} slots"
                )));
            }
            let found = bytemuck::pod_collect_to_vec::<u8, Found>(&bytes);
            out.extend(found[..got].iter().filter_map(Entry::of));
        }
        out.sort_unstable_by_key(|e| e.slot);
        Ok(out)
    }

    /// Runs copies of the arena with `kb_copy` in `mode`; for a gather, returns the first
    /// `read_words` words of `bq`.
    fn copy(
        &self,
        st: &mut State,
        mode: u32,
        pieces: &[Piece],
        read_words: usize,
    ) -> Result<Vec<u8>> {
        self.ensure_scratch(st, read_words, 0, 0, pieces.len())?;
        let s = scratch(st)?;
        self.upload(&s.pieces, pieces);
        let p = self.params(st, pieces.len(), mode);
        let (ctl, bytes) = self.run(st, bs::COPY, &p, 1, Read::Words(read_words))?;
        if ctl[counter::FINISHED] as usize != pieces.len() {
            return Err(device_error(format!(
                "kb_copy finished {} of {} pieces",
                ctl[counter::FINISHED],
                pieces.len()
            )));
        }
        Ok(bytes)
    }

    /// Makes the arena buffer hold `segments` segments (doubling), keeping its contents;
    /// [`Error::OutOfDeviceMemory`] past the adapter's largest binding.
    fn ensure_arena(&self, st: &mut State, segments: usize) -> Result<()> {
        let need = segments as u64 * self.segment;
        if need <= st.arena.size() {
            return Ok(());
        }
        let most = self.gpu.max_binding / self.segment * self.segment;
        if need > most {
            return Err(oom(need));
        }
        let size = ((segments as u64).next_power_of_two() * self.segment).min(most);
        let arena = storage_buffer(&self.gpu, "vramkv bytes arena", size)?;
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&st.arena, 0, &arena, 0, st.arena.size());
        let idx = self.gpu.queue.submit([enc.finish()]);
        self.gpu.wait(idx)?;
        st.arena = arena;
        Ok(())
    }

    /// Copies the index, and the first `arena_bytes` of the arena, to the host as they
    /// are now (the caller holds the table's lock).
    fn copy_out(&self, st: &State, arena_bytes: u64) -> Result<IndexCopy> {
        let slots = st.index.slots;
        let words = read_back(
            &self.gpu,
            &[
                (&st.index.kl, 0, slots as u64 * 4),
                (
                    &st.index.words,
                    0,
                    (slots * std::mem::size_of::<Slot>()) as u64,
                ),
                (&st.arena, 0, arena_bytes),
            ],
        )?;
        let [kl, words, arena] = <[Vec<u64>; 3]>::try_from(words)
            .map_err(|_| device_error("the index copy read back the wrong arrays"))?;
        Ok(IndexCopy {
            slots,
            kl,
            words,
            arena,
            arena_bytes,
        })
    }

    /// Rebuilds the index with `slots` slots on the host: reads it back, reinserts every
    /// occupied slot by the probe rule of the kernels, and writes it to new buffers. The
    /// old index stays until the new one is written.
    fn rebuild(&self, st: &mut State, slots: usize) -> Result<()> {
        let copy = self.copy_out(st, 0)?;
        let mask = slots - 1;
        let mut new_kl = vec![KL_EMPTY; slots];
        let mut new_words = vec![Slot::default(); slots];
        let mut occupied = 0;
        for (k, w) in copy.occupied() {
            let mut s = (join(w.hash_lo, w.hash_hi) as usize) & mask;
            while new_kl[s] != KL_EMPTY {
                s = (s + 1) & mask;
            }
            new_kl[s] = k;
            new_words[s] = *w;
            occupied += 1;
        }
        if occupied != st.occupied {
            return Err(device_error(format!(
                "the index holds {occupied} entries where the table counts {}",
                st.occupied
            )));
        }
        let index = new_index(&self.gpu, slots)?;
        self.upload(&index.kl, &new_kl);
        self.upload(&index.words, &new_words);
        st.index = index;
        st.tombs = 0;
        Ok(())
    }

    /// Deletes every entry expired at `now` (when a timer is due) and frees its record.
    fn purge(&self, st: &mut State, now: u64) -> Result<()> {
        if st.timers.range(..=now).next().is_none() {
            return Ok(());
        }
        let gone = self.scan(st, bs::scan::EXPIRED, &[]);
        let gone = self.guard(st, gone)?;
        for e in &gone {
            st.plan.free(e.addr, e.record_len());
        }
        st.plan.take_released();
        st.occupied -= gone.len();
        st.tombs += gone.len();
        st.timers = match now.checked_add(1) {
            Some(after) => st.timers.split_off(&after),
            None => BTreeMap::new(),
        };
        Ok(())
    }

    /// Marks the table broken when `r` is an error: what a failure in the middle of a
    /// change does.
    fn guard<T>(&self, st: &mut State, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            st.broken = Some(e.to_string());
        }
        r
    }

    /// Moves the live records of the emptiest sealed segments, about `max_live_bytes` of
    /// them (`force`: even when the arena is not fragmented). Best effort: when the moved
    /// records find no room, nothing moves.
    fn compact(&self, st: &mut State, max_live_bytes: u64, force: bool) -> Result<()> {
        let victims = st.plan.victims(max_live_bytes, force);
        if victims.is_empty() {
            return Ok(());
        }
        let mut bitmap = vec![0u32; st.plan.segment_count().div_ceil(32)];
        for &v in &victims {
            bitmap[v as usize / 32] |= 1 << (v % 32);
        }
        let moving = self.scan(st, bs::scan::SEGMENTS, &bitmap)?;
        let lens: Vec<u64> = moving.iter().map(Entry::record_len).collect();
        let mut plan = st.plan.clone();
        let Ok(placed) = plan.place(&lens) else {
            return Ok(());
        };
        match self.ensure_arena(st, plan.segment_count()) {
            Ok(()) => {}
            Err(Error::OutOfDeviceMemory { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut pieces = Vec::new();
        for (e, &to) in moving.iter().zip(&placed.addrs) {
            let words = (padded(e.record_len()) / 4) as u32;
            let (src, dst) = ((e.addr / 4) as u32, (to / 4) as u32);
            Piece::cut(src, dst, words, &mut pieces);
        }
        // The copies go to places no entry uses yet: an error leaves the table as it was.
        for chunk in pieces.chunks(st.piece.max(COPY_WORDS as usize)) {
            self.copy(st, bs::copy::MOVE, chunk, 0)?;
        }
        let items: Vec<Item> = moving
            .iter()
            .zip(&placed.addrs)
            .map(|(e, &to)| Item::at(e.slot).addr(to))
            .collect();
        let r = self.set(st, bs::set::MOVE, &items);
        self.guard(st, r)?;
        st.plan = plan;
        for e in &moving {
            st.plan.free(e.addr, e.record_len());
        }
        st.plan.count_compacted(lens.iter().sum());
        st.plan.take_released();
        Ok(())
    }

    fn put_inner(
        &self,
        keys: Binary<'_>,
        values: Binary<'_>,
        ttl_ms: Option<&[u64]>,
    ) -> Result<()> {
        check_byte_put(&self.limits(), keys, values)?;
        if let Some(t) = ttl_ms {
            check_per_key(keys, "ttl_ms", t)?;
        }
        if keys.is_empty() {
            return Ok(());
        }
        let hashes = self.hashes(keys);
        let winners = last_occurrences(keys, &hashes);
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let now = self.now();
        self.purge(st, now)?;
        let mut found = self.find(st, keys, &hashes, &winners)?;
        let fresh = found.iter().filter(|f| f.is_none()).count();
        let t = &self.cfg.table;
        let slots = self.cfg.admit(st.occupied, fresh, st.index.slots)?;
        let lens = record_lens(keys, values, &winners);
        let written: u64 = lens.iter().sum();
        let mut plan = st.plan.clone();
        let placed = match plan.place(&lens) {
            Ok(p) => p,
            Err(Error::BudgetExceeded { .. }) => {
                self.compact(st, u64::MAX, true)?;
                // Compaction moved records: the entries are looked up again.
                found = self.find(st, keys, &hashes, &winners)?;
                plan = st.plan.clone();
                plan.place(&lens)?
            }
            Err(e) => return Err(e),
        };
        self.ensure_arena(st, plan.segment_count())?;
        if slots != st.index.slots
            || st.occupied + st.tombs + fresh > capacity_of(slots, t.max_load_factor)
        {
            self.rebuild(st, slots)?;
            found = self.find(st, keys, &hashes, &winners)?;
        }
        // Nothing has changed so far; from here on the index changes.
        let mut overwrite = Vec::new();
        let mut insert = Vec::new();
        let smask = (st.index.slots - 1) as u64;
        for ((&i, &addr), f) in winners.iter().zip(&placed.addrs).zip(&found) {
            let expires = expiry_time(now, ttl_ms.map_or(0, |t| t[i]));
            let (hash_lo, hash_hi) = split(hashes[i]);
            let item = Item {
                klen: keys.item_len(i) as u32,
                vlen: values.item_len(i) as u32,
                hash_lo,
                hash_hi,
                ..Item::at(f.map_or((hashes[i] & smask) as u32, |e| e.slot))
            }
            .addr(addr)
            .expires(expires);
            if f.is_some() {
                overwrite.push(item);
            } else {
                insert.push(item);
            }
            if expires != 0 {
                *st.timers.entry(expires).or_default() += 1;
            }
        }
        let r = self.apply_put(
            st,
            keys,
            values,
            &winners,
            &placed.addrs,
            &overwrite,
            &insert,
        );
        let reused = self.guard(st, r)?;
        st.plan = plan;
        for e in found.iter().flatten() {
            st.plan.free(e.addr, e.record_len());
        }
        st.plan.take_released();
        st.occupied += insert.len();
        st.tombs -= reused.min(st.tombs);
        let bound = st.plan.compaction_allowance(written);
        let r = self.compact(st, bound, false);
        self.guard(st, r)
    }

    /// Writes a put's records and its entries; returns how many deleted slots the new
    /// entries reused.
    #[allow(clippy::too_many_arguments)]
    fn apply_put(
        &self,
        st: &mut State,
        keys: Binary<'_>,
        values: Binary<'_>,
        winners: &[usize],
        addrs: &[u64],
        overwrite: &[Item],
        insert: &[Item],
    ) -> Result<usize> {
        // Records are consecutive within a segment: one write per run of them.
        let mut run: Vec<u8> = Vec::new();
        let mut start = 0u64;
        for (&i, &addr) in winners.iter().zip(addrs) {
            if !run.is_empty() && start + run.len() as u64 != addr {
                self.gpu.queue.write_buffer(&st.arena, start, &run);
                run.clear();
            }
            if run.is_empty() {
                start = addr;
            }
            run.extend_from_slice(keys.get(i));
            run.extend_from_slice(values.get(i));
            run.resize(run.len().next_multiple_of(RECORD_ALIGN as usize), 0);
        }
        if !run.is_empty() {
            self.gpu.queue.write_buffer(&st.arena, start, &run);
        }
        self.set(st, bs::set::PUT, overwrite)?;
        self.claim(st, insert)
    }

    /// The live entry of each key at `now`.
    fn lookup(&self, st: &mut State, keys: Binary<'_>, now: u64) -> Result<Vec<Option<Entry>>> {
        let hashes = self.hashes(keys);
        let all: Vec<usize> = (0..keys.len()).collect();
        let found = self.find(st, keys, &hashes, &all)?;
        Ok(found
            .into_iter()
            .map(|f| f.filter(|e| !expired(e.expires, now)))
            .collect())
    }

    /// A lookup batch: the state, the live entry of each key now, and now.
    #[allow(clippy::type_complexity)]
    fn lookup_now(
        &self,
        keys: Binary<'_>,
    ) -> Result<(MutexGuard<'_, State>, Vec<Option<Entry>>, u64)> {
        let mut st = self.lock()?;
        let now = self.now();
        let hits = if keys.is_empty() {
            Vec::new()
        } else {
            self.lookup(&mut st, keys, now)?
        };
        Ok((st, hits, now))
    }

    /// Gathers the values of `hits` into `data` (laid out as `reset_with_lens` did).
    fn gather(&self, st: &mut State, hits: &[Option<Entry>], data: &mut [u8]) -> Result<()> {
        // (entry, offset in data) of each non-empty value, in groups of at most
        // GATHER_BYTES of words (at least one value).
        let mut at = 0usize;
        let mut group: Vec<(Entry, usize)> = Vec::new();
        let mut group_words = 0u64;
        let words_of = |e: &Entry| {
            let lo = e.addr + u64::from(e.key_len);
            let hi = lo + u64::from(e.value_len);
            hi.div_ceil(4) - lo / 4
        };
        let mut flush = |st: &mut State, group: &mut Vec<(Entry, usize)>| -> Result<()> {
            if group.is_empty() {
                return Ok(());
            }
            let mut pieces = Vec::new();
            let mut offs = Vec::with_capacity(group.len());
            let mut dst = 0u32;
            for (e, _) in group.iter() {
                let lo = e.addr + u64::from(e.key_len);
                let src = (lo / 4) as u32;
                let words = words_of(e) as u32;
                offs.push(dst as usize * 4 + (lo % 4) as usize);
                Piece::cut(src, dst, words, &mut pieces);
                dst += words;
            }
            let bytes = self.copy(st, bs::copy::GATHER, &pieces, dst as usize)?;
            for ((e, out), off) in group.iter().zip(offs) {
                let len = e.value_len as usize;
                data[*out..*out + len].copy_from_slice(&bytes[off..off + len]);
            }
            group.clear();
            Ok(())
        };
        for e in hits.iter().flatten() {
            let len = e.value_len as usize;
            if len > 0 {
                let w = words_of(e);
                if !group.is_empty() && (group_words + w) * 4 > GATHER_BYTES {
                    flush(st, &mut group)?;
                    group_words = 0;
                }
                group.push((*e, at));
                group_words += w;
            }
            at += len;
        }
        flush(st, &mut group)
    }

    /// Empties the table: a zeroed index of the same size, a new arena plan (keeping the
    /// count of compacted bytes), no arena memory.
    fn reset(&self, st: &mut State) -> Result<()> {
        let index = new_index(&self.gpu, st.index.slots)?;
        let arena = storage_buffer(&self.gpu, "vramkv bytes arena", 4)?;
        let compacted = st.plan.stats().compacted_bytes;
        st.index = index;
        st.arena = arena;
        st.plan = ArenaPlan::new(self.segment, self.cfg.arena_budget);
        st.plan.count_compacted(compacted);
        st.occupied = 0;
        st.tombs = 0;
        st.timers.clear();
        st.broken = None;
        Ok(())
    }
}

impl ByteTable for WgpuBytes {
    fn put(&self, keys: Binary<'_>, values: Binary<'_>) -> Result<()> {
        self.put_inner(keys, values, None)
    }

    fn put_ttl(&self, keys: Binary<'_>, values: Binary<'_>, ttl_ms: &[u64]) -> Result<()> {
        self.put_inner(keys, values, Some(ttl_ms))
    }

    fn expire(&self, keys: Binary<'_>, ttl_ms: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_byte_lookup(&self.limits(), keys, found_out)?;
        check_per_key(keys, "ttl_ms", ttl_ms)?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let now = self.now();
        self.purge(st, now)?;
        let found = self.lookup(st, keys, now)?;
        // The last occurrence of a key sets its expiry.
        let mut last: HashMap<u32, usize> = HashMap::new();
        for (i, (f, out)) in found.iter().zip(found_out.iter_mut()).enumerate() {
            *out = f.is_some();
            if let Some(e) = f {
                last.insert(e.slot, i);
            }
        }
        let mut order: Vec<(u32, usize)> = last.into_iter().collect();
        order.sort_unstable();
        let items: Vec<Item> = order
            .iter()
            .map(|&(slot, i)| Item::at(slot).expires(expiry_time(now, ttl_ms[i])))
            .collect();
        let r = self.set(st, bs::set::EXPIRE, &items);
        self.guard(st, r)?;
        for it in &items {
            let expires = join(it.exp_lo, it.exp_hi);
            if expires != 0 {
                *st.timers.entry(expires).or_default() += 1;
            }
        }
        Ok(())
    }

    fn ttl(&self, keys: Binary<'_>, ttl_out: &mut [i64]) -> Result<()> {
        self.limits().check_keys(keys)?;
        check_per_key(keys, "ttl_out", ttl_out)?;
        let (_st, hits, now) = self.lookup_now(keys)?;
        for (hit, out) in hits.iter().zip(ttl_out) {
            *out = remaining_ttl(hit.map(|e| e.expires), now);
        }
        Ok(())
    }

    fn get(
        &self,
        keys: Binary<'_>,
        values_out: &mut BinaryBuf,
        found_out: &mut [bool],
    ) -> Result<()> {
        check_byte_lookup(&self.limits(), keys, found_out)?;
        let (mut st, hits, _) = self.lookup_now(keys)?;
        let mut data = Vec::new();
        {
            let total: usize = hits.iter().flatten().map(|e| e.value_len as usize).sum();
            data.resize(total, 0);
            self.gather(&mut st, &hits, &mut data)?;
        }
        let out =
            values_out.reset_with_lens(keys.len(), |i| hits[i].map_or(0, |e| e.value_len as usize));
        out.copy_from_slice(&data);
        for (hit, found) in hits.iter().zip(found_out.iter_mut()) {
            *found = hit.is_some();
        }
        Ok(())
    }

    fn delete(&self, keys: Binary<'_>) -> Result<usize> {
        self.limits().check_keys(keys)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let hashes = self.hashes(keys);
        let distinct = last_occurrences(keys, &hashes);
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let now = self.now();
        self.purge(st, now)?;
        let found: Vec<Entry> = self
            .find(st, keys, &hashes, &distinct)?
            .into_iter()
            .flatten()
            .collect();
        if found.is_empty() {
            return Ok(0);
        }
        let items: Vec<Item> = found.iter().map(|e| Item::at(e.slot)).collect();
        let r = self.set(st, bs::set::DELETE, &items);
        self.guard(st, r)?;
        let mut freed = 0;
        for e in &found {
            st.plan.free(e.addr, e.record_len());
            freed += e.record_len();
        }
        st.plan.take_released();
        st.occupied -= found.len();
        st.tombs += found.len();
        let bound = st.plan.compaction_allowance(freed);
        let r = self.compact(st, bound, false);
        self.guard(st, r)?;
        Ok(found.len())
    }

    fn contains(&self, keys: Binary<'_>, found_out: &mut [bool]) -> Result<()> {
        check_byte_lookup(&self.limits(), keys, found_out)?;
        let (_st, hits, _) = self.lookup_now(keys)?;
        for (hit, found) in hits.iter().zip(found_out) {
            *found = hit.is_some();
        }
        Ok(())
    }

    /// Live entries (expired ones are deleted first). When the device fails, the entries
    /// counted before (`len` cannot return an error).
    fn len(&self) -> usize {
        let mut st = self.raw_lock();
        if st.broken.is_none() {
            let now = self.now();
            let _ = self.purge(&mut st, now);
        }
        st.occupied
    }

    fn capacity(&self) -> usize {
        capacity_of(self.raw_lock().index.slots, self.cfg.table.max_load_factor)
    }

    fn clear(&self) -> Result<()> {
        self.gpu.check()?;
        let mut st = self.raw_lock();
        self.reset(&mut st)
    }

    fn limits(&self) -> ByteLimits {
        self.cfg.limits()
    }

    /// Copies the index and the arena's segments in use to the host under the table's lock
    /// (in chunks through a mapped staging buffer), then decodes the live entries with the
    /// lock let go.
    fn export(&self) -> Result<ByteImage> {
        let (copy, now) = {
            let st = self.lock()?;
            let arena_bytes = (st.plan.segment_count() as u64 * self.segment).min(st.arena.size());
            (self.copy_out(&st, arena_bytes)?, self.now())
        };
        copy.decode(now)
    }

    fn describe(&self) -> ByteDescription {
        let mut st = self.raw_lock();
        if st.broken.is_none() {
            let now = self.now();
            let _ = self.purge(&mut st, now);
        }
        ByteDescription {
            backend: BACKEND,
            device: self.gpu.name.clone(),
            entries: st.occupied,
            capacity: capacity_of(st.index.slots, self.cfg.table.max_load_factor),
            index_bytes: st.index.slots as u64 * SLOT_BYTES,
            arena: st.plan.stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_padded_to_whole_words() {
        let mut w = Vec::new();
        push_key(&mut w, b"abcde");
        push_key(&mut w, b"\0");
        assert_eq!(w, [u32::from_le_bytes(*b"abcd"), u32::from(b'e'), 0]);
    }
}
