//! Byte tables in GPU memory ([`CudaBytes`]): byte-string keys and values (docs/arena.md),
//! with the kernels of `kv_kernels::ops::bytes`.
//!
//! # Layout
//!
//! The index is one device array of slots of four words (the key's hash, the record's
//! arena address, the key and value lengths, the expiry time: `kv_kernels::layout::
//! bytes_slot`), open addressing with linear probing, twice as many slots as the shared
//! sizing rule's slot count (so that probes stay short at any load factor; `capacity()` is
//! the rule's, as on the CPU backend). The arena is the segments of `kv_arena::ArenaPlan`,
//! the host's plan that every backend shares, carved out of a few large device allocations
//! (`bytes_slabs`), and a device directory of the segments' addresses, through which the
//! kernels turn an arena address into a pointer. Copies between the host and the device go
//! through a ring of page-locked chunks (`bytes_gpu`), and the reads after each step go out
//! behind one wait. With `VRAMKV_CUDA_TRACE=1` each put and get prints the time of its
//! steps (`kv_staging::trace::Laps`).
//!
//! # Batches: the CPU plans where each batch's bytes go, the GPU moves them
//!
//! One batch at a time (a mutex), so that each batch is atomic for other callers, and
//! checked on the host first (bad input changes nothing). A batch's Arrow buffers (offsets,
//! rebased to 0, and data) are copied to device scratch, and the device hashes every key.
//! A put then deduplicates on the device (a batch-local table; a key's last occurrence
//! wins; keys whose hashes tie are compared byte for byte) and finds each key in the index;
//! the host counts the winners the index lacks (admission by `kv_core::plan_put`, exactly
//! as `CpuBytes` counts), grows or rebuilds the index if it must, places the winners'
//! records with `ArenaPlan::place`, and a kernel (a warp per record) copies the key and
//! value bytes into the arena and updates or claims each key's slot, reporting each
//! replaced record, which the host frees. A get finds each key (its value length), the host
//! sums the lengths into the output's offsets, and a kernel (a warp per key) copies the
//! values out. A delete turns slots into tombstones and reports their records.
//!
//! After every put and delete, compaction moves a bounded number of live bytes
//! (`kv_arena::ArenaPlan::compaction_allowance`) out of the emptiest sealed segments: a
//! kernel lists the victims' live records, the host places them, and a kernel moves them
//! and their slots' addresses. Expired entries (the table's clock) are never returned; a
//! write batch, `len` and `describe` first purge them on the device (only when the
//! earliest expiry time the host knows of has passed), and their records are freed.
//!
//! The driver is generic over the device ([`Dev`]): [`CudaBytes`] runs it on the GPU, and
//! [`HostMirrorBytes`] runs the same driver and the same per-item kernel code over host
//! memory, so that the tests exercise both without a GPU.

use std::borrow::Cow;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytemuck::Pod;
use kv_arena::{ArenaPlan, default_segment_bytes};
use kv_core::{
    Binary, BinaryBuf, ByteConfig, ByteDescription, ByteImage, ByteLimits, Error, Offsets, Result,
    TTL_MISSING, TTL_NEVER, capacity_of, check_byte_lookup, check_byte_put, check_per_key,
};
use kv_kernels::layout::{
    BytesArgs, byte_key_len, byte_live, byte_value_len, bytes_counter as bc, bytes_slot as bs,
    expired, expiry_time, local_slots,
};
use kv_staging::image::EXPORT_CHUNK_BYTES;
use kv_staging::trace::{Laps, Tracer};

use rayon::prelude::*;

use crate::bytes_slabs::Slabs;

/// Batches from this many items count their fresh keys on all cores.
const PAR_ITEMS: usize = 1 << 16;

/// The byte-table kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum K {
    Hash,
    Dedup,
    Lookup,
    Write,
    Get,
    Delete,
    SetExpiry,
    Purge,
    Gather,
    Move,
    Rehash,
}

impl K {
    /// Whether the kernel runs a warp per item.
    pub(crate) fn warp(self) -> bool {
        matches!(self, K::Write | K::Get | K::Move)
    }
}

/// What the driver needs of a device: zeroed allocations, copies in and out, launches.
pub(crate) trait Dev: Send + Sync {
    type Buf: Send + Sync;
    fn backend(&self) -> &'static str;
    fn device_name(&self) -> String;
    /// `bytes` (at least 8) of zeroed memory; [`Error::OutOfDeviceMemory`] when there is none.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf>;
    fn addr(b: &Self::Buf) -> u64;
    fn size(b: &Self::Buf) -> usize;
    /// Copies `src` to byte `at` of `dst` (in order with the launches).
    fn upload(&self, dst: &Self::Buf, at: usize, src: &[u8]) -> Result<()>;
    /// Waits for the device, then copies byte `at..` of `src` into `dst`.
    fn download(&self, dst: &mut [u8], src: &Self::Buf, at: usize) -> Result<()>;
    /// [`download`](Self::download)s of several parts `(dst, src, at)`, with one wait.
    fn download_many(&self, parts: &mut [(&mut [u8], &Self::Buf, usize)]) -> Result<()> {
        for (dst, src, at) in parts.iter_mut() {
            self.download(dst, src, *at)?;
        }
        Ok(())
    }
    /// Where the batches' laps are written (none: not traced).
    fn tracer(&self) -> Option<&Tracer> {
        None
    }
    /// Zeroes the first `bytes` bytes.
    fn zero(&self, b: &Self::Buf, bytes: usize) -> Result<()>;
    /// Runs kernel `k` over `n` items (a thread, or a warp, per item).
    fn launch(&self, k: K, a: &BytesArgs, n: u64) -> Result<()>;
}

/// Scratch buffers, by use.
#[derive(Debug, Clone, Copy)]
enum S {
    KeyOff,
    KeyData,
    ValOff,
    ValData,
    Ttl,
    Hashes,
    Local,
    Pick,
    SlotOf,
    FoundSlot,
    Win,
    Addrs,
    OldAddr,
    OldLen,
    VLen,
    Exp,
    OutOff,
    OutData,
    Victims,
    ListSlot,
    ListAddr,
    ListLen,
    MoveTo,
}
const SCRATCH: usize = S::MoveTo as usize + 1;

struct State<D: Dev> {
    index: D::Buf,
    /// Index slots (a power of two).
    phys: usize,
    /// The slot count the shared sizing rule sees (capacity = slots * max load).
    slots: usize,
    entries: usize,
    tombs: usize,
    arena: ArenaPlan,
    /// The segments' memory.
    mem: Slabs<D::Buf>,
    /// `u64[dir_cap]`: each segment's device address.
    dir: D::Buf,
    dir_cap: usize,
    counters: D::Buf,
    /// No entry expires before this time (u64::MAX: none expires).
    earliest: u64,
    scratch: Vec<Option<D::Buf>>,
    /// A batch's host-side arrays, kept between batches (a fresh one would be
    /// page-faulted in on every batch).
    host: HostArrays,
}

/// A batch's host-side arrays (see [`State::host`]).
#[derive(Default)]
struct HostArrays {
    /// A get's value lengths.
    vlen: Vec<u64>,
    win: Vec<u8>,
    found: Vec<u64>,
    addrs: Vec<u64>,
    old_addr: Vec<u64>,
    old_len: Vec<u64>,
}

/// The first `n` elements of `v`, grown if it is shorter (what they hold is stale: the
/// caller overwrites them).
fn sized<T: Pod + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Places the records of the batch's winners (`win[i] != 0`: key and value bytes) in
/// `arena`, writing each winner's address to `addrs[i]`; returns the segments opened and
/// the bytes placed.
fn place_winners(
    arena: &mut ArenaPlan,
    keys: Binary<'_>,
    values: Binary<'_>,
    win: &[u8],
    addrs: &mut [u64],
) -> Result<(Vec<u32>, u64)> {
    let mut written = 0;
    let opened = arena.place_each(
        win.len(),
        |i| {
            if win[i] == 0 {
                return None;
            }
            let len = (keys.item_len(i) + values.item_len(i)) as u64;
            written += len;
            Some(len)
        },
        |i, a| addrs[i] = a,
    )?;
    Ok((opened, written))
}

/// The index slots for `slots` slots of the sizing rule.
fn phys_for(slots: usize) -> usize {
    (slots.saturating_mul(2)).max(64).next_power_of_two()
}

fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// The table, generic over its device.
pub(crate) struct Table<D: Dev> {
    dev: D,
    cfg: ByteConfig,
    seed: u64,
    hash_mask: u64,
    st: Mutex<State<D>>,
}

/// A batch's device copy: what the kernels' batch fields point at.
struct Batch {
    a: BytesArgs,
    n: usize,
}

impl<D: Dev> Table<D> {
    pub(crate) fn open(dev: D, cfg: ByteConfig) -> Result<Self> {
        cfg.validate()?;
        let segment = cfg
            .segment_bytes
            .unwrap_or_else(|| default_segment_bytes(cfg.max_record_bytes()));
        let slots = cfg.table.initial_slots();
        let phys = phys_for(slots);
        let index = dev.alloc(phys * 32)?;
        let dir_cap = 16;
        let st = State {
            index,
            phys,
            slots,
            entries: 0,
            tombs: 0,
            arena: ArenaPlan::new(segment, cfg.arena_budget),
            mem: Slabs::new(segment as usize),
            dir: dev.alloc(dir_cap * 8)?,
            dir_cap,
            counters: dev.alloc(bc::LEN * 8)?,
            earliest: u64::MAX,
            scratch: (0..SCRATCH).map(|_| None).collect(),
            host: HostArrays::default(),
        };
        Ok(Table {
            seed: cfg.table.table_seed(),
            hash_mask: cfg.hash_mask(),
            dev,
            cfg,
            st: Mutex::new(st),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<D>> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        self.cfg.clock.now_ms()
    }

    fn backend(&self) -> &'static str {
        self.dev.backend()
    }

    fn broken(&self, what: impl Into<String>) -> Error {
        Error::device(self.backend(), what.into())
    }

    /// The address of scratch buffer `s`, grown to at least `bytes` (its contents are lost
    /// when it grows).
    fn scratch(&self, st: &mut State<D>, s: S, bytes: usize) -> Result<u64> {
        let slot = &mut st.scratch[s as usize];
        if slot.as_ref().is_none_or(|b| D::size(b) < bytes) {
            *slot = None;
            let want = bytes.max(256).checked_next_power_of_two().unwrap_or(bytes);
            *slot = Some(self.dev.alloc(want)?);
        }
        Ok(slot.as_ref().map_or(0, D::addr))
    }

    fn buf<'s>(&self, st: &'s State<D>, s: S) -> Result<&'s D::Buf> {
        st.scratch[s as usize]
            .as_ref()
            .ok_or_else(|| self.broken("byte-table scratch missing"))
    }

    fn upload_to<T: Pod>(&self, st: &mut State<D>, s: S, v: &[T]) -> Result<u64> {
        let bytes = as_bytes(v);
        let addr = self.scratch(st, s, bytes.len())?;
        if !bytes.is_empty() {
            self.dev.upload(self.buf(st, s)?, 0, bytes)?;
        }
        Ok(addr)
    }

    fn download_from<T: Pod + Default>(&self, st: &State<D>, s: S, n: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); n];
        self.dev
            .download(bytemuck::cast_slice_mut(&mut v), self.buf(st, s)?, 0)?;
        Ok(v)
    }

    /// Waits for the device once, then reads the counters (an error when the kernels
    /// counted a probe that found no room) and the start of each scratch buffer `(s, dst)`
    /// into `dst`.
    fn read_after(
        &self,
        st: &State<D>,
        what: &str,
        outs: &mut [(S, &mut [u8])],
    ) -> Result<[u64; bc::LEN]> {
        let mut c = [0u64; bc::LEN];
        let mut parts: Vec<(&mut [u8], &D::Buf, usize)> = Vec::with_capacity(outs.len() + 1);
        parts.push((bytemuck::cast_slice_mut(&mut c), &st.counters, 0));
        for (s, dst) in outs.iter_mut() {
            parts.push((&mut **dst, self.buf(st, *s)?, 0));
        }
        self.dev.download_many(&mut parts)?;
        drop(parts);
        if c[bc::ERRORS] != 0 {
            return Err(self.broken(format!(
                "the byte-table {what} found no room for {} probes (a broken invariant)",
                c[bc::ERRORS]
            )));
        }
        Ok(c)
    }

    fn reset_counters(&self, st: &State<D>) -> Result<()> {
        self.dev.zero(&st.counters, bc::LEN * 8)
    }

    fn read_counters(&self, st: &State<D>) -> Result<[u64; bc::LEN]> {
        let mut c = [0u64; bc::LEN];
        self.dev
            .download(bytemuck::cast_slice_mut(&mut c), &st.counters, 0)?;
        Ok(c)
    }

    /// `batch`'s fields with the table's (index, directory, counters) as they are now.
    fn args(&self, st: &State<D>, batch: &BytesArgs) -> BytesArgs {
        BytesArgs {
            slots: D::addr(&st.index),
            mask: st.phys as u64 - 1,
            seed: self.seed,
            hash_mask: self.hash_mask,
            segs: D::addr(&st.dir),
            seg_shift: st.arena.segment_bytes().trailing_zeros() as u64,
            counters: D::addr(&st.counters),
            ..*batch
        }
    }

    fn launch(&self, st: &State<D>, k: K, batch: &BytesArgs, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        // The kernels loop over `a.n` items: the launch's count.
        let a = BytesArgs {
            n,
            ..self.args(st, batch)
        };
        self.dev.launch(k, &a, n)
    }

    /// Copies a batch's Arrow buffers (`values` too, and the times to live, if given) to
    /// scratch and hashes its keys on the device.
    fn load_batch(
        &self,
        st: &mut State<D>,
        keys: Binary<'_>,
        values: Option<Binary<'_>>,
        ttl: Option<&[u64]>,
        now: u64,
    ) -> Result<Batch> {
        let n = keys.len();
        let mut a = BytesArgs {
            now,
            n: n as u64,
            ..BytesArgs::default()
        };
        let (off, data) = rebased(keys);
        a.key_offsets = self.upload_to(st, S::KeyOff, &off)?;
        a.key_data = self.upload_to(st, S::KeyData, data)?;
        if let Some(v) = values {
            let (off, data) = rebased(v);
            a.value_offsets = self.upload_to(st, S::ValOff, &off)?;
            a.value_data = self.upload_to(st, S::ValData, data)?;
        }
        if let Some(t) = ttl {
            a.ttl = self.upload_to(st, S::Ttl, t)?;
        }
        a.hashes = self.scratch(st, S::Hashes, n * 8)?;
        self.launch(st, K::Hash, &a, n as u64)?;
        Ok(Batch { a, n })
    }

    /// The batch-local dedup: `win[i]` (after the lookup pass) says whether item `i` is its
    /// key's last occurrence.
    fn dedup(&self, st: &mut State<D>, b: &mut Batch) -> Result<()> {
        let ls = local_slots(b.n as u64) as usize;
        b.a.local = self.scratch(st, S::Local, ls * 4)?;
        b.a.pick = self.scratch(st, S::Pick, ls * 4)?;
        b.a.slot_of = self.scratch(st, S::SlotOf, b.n * 4)?;
        b.a.local_mask = ls as u64 - 1;
        b.a.win = self.scratch(st, S::Win, b.n)?;
        self.dev.zero(self.buf(st, S::Local)?, ls * 4)?;
        self.dev.zero(self.buf(st, S::Pick)?, ls * 4)?;
        self.launch(st, K::Dedup, &b.a, b.n as u64)
    }

    /// Gives memory to the segments a placement opened and records their addresses in the
    /// directory. A failed allocation undoes this call's and answers the error.
    fn provide(&self, st: &mut State<D>, opened: &[u32]) -> Result<()> {
        if opened.is_empty() {
            return Ok(());
        }
        let count = st.arena.segment_count();
        let mut done: Vec<u32> = Vec::new();
        let r = (|| {
            for &id in opened {
                // A head emptied and reopened has its memory already: not this call's.
                if st.mem.provide(&self.dev, id)? {
                    done.push(id);
                }
            }
            if count > st.dir_cap {
                let cap = count.next_power_of_two();
                st.dir = self.dev.alloc(cap * 8)?;
                st.dir_cap = cap;
            }
            let dir: Vec<u64> = (0..count as u32)
                .map(|i| st.mem.addr::<D>(i).unwrap_or(0))
                .collect();
            self.dev.upload(&st.dir, 0, as_bytes(&dir))
        })();
        if r.is_err() {
            for id in done {
                st.mem.release(id);
            }
        }
        r
    }

    /// Takes back the memory of the segments the arena gave back.
    fn drop_released(&self, st: &mut State<D>) {
        for id in st.arena.take_released() {
            st.mem.release(id);
        }
    }

    /// Undoes a placement whose records were never written: the plan as it was before
    /// (`saved`), and no memory for the segments the placement opened. (Freeing the placed
    /// records would not do: the plan would keep a head segment that has no memory.)
    fn unplace(&self, st: &mut State<D>, saved: ArenaPlan, opened: &[u32]) {
        st.arena = saved;
        for &id in opened {
            // A head emptied and reopened by the placement is the head again, with its
            // memory.
            if !st.arena.in_use(id) {
                st.mem.release(id);
            }
        }
    }

    /// Moves every entry into a new index of `phys` slots (tombstones dropped); on failure
    /// the table is as it was.
    fn rebuild(&self, st: &mut State<D>, phys: usize) -> Result<()> {
        let new = self
            .dev
            .alloc(phys.checked_mul(32).ok_or(Error::OutOfDeviceMemory {
                backend: self.backend(),
                requested_bytes: u64::MAX,
            })?)?;
        self.reset_counters(st)?;
        let a = BytesArgs {
            old_slots: D::addr(&st.index),
            ..BytesArgs::default()
        };
        let mut full = self.args(st, &a);
        full.slots = D::addr(&new);
        full.mask = phys as u64 - 1;
        full.n = st.phys as u64;
        self.dev.launch(K::Rehash, &full, st.phys as u64)?;
        let c = self.read_after(st, "rehash", &mut [])?;
        if c[bc::MOVED] as usize != st.entries {
            return Err(self.broken(format!(
                "the byte-table rehash moved {} entries of {}",
                c[bc::MOVED],
                st.entries
            )));
        }
        st.index = new;
        st.phys = phys;
        st.tombs = 0;
        Ok(())
    }

    /// Removes every entry expired at `now` (when one may have) and frees its record.
    fn purge(&self, st: &mut State<D>, now: u64) -> Result<()> {
        if now < st.earliest || st.entries == 0 {
            if st.entries == 0 {
                st.earliest = u64::MAX;
            }
            return Ok(());
        }
        let cap = st.entries;
        let mut a = BytesArgs {
            now,
            ..BytesArgs::default()
        };
        a.list_addr = self.scratch(st, S::ListAddr, cap * 8)?;
        a.list_len = self.scratch(st, S::ListLen, cap * 8)?;
        self.reset_counters(st)?;
        self.launch(st, K::Purge, &a, st.phys as u64)?;
        let c = self.read_counters(st)?;
        let k = c[bc::LISTED] as usize;
        if k > cap {
            return Err(self.broken(format!("the purge listed {k} of {cap} entries")));
        }
        let addrs: Vec<u64> = self.download_from(st, S::ListAddr, k)?;
        let lens: Vec<u64> = self.download_from(st, S::ListLen, k)?;
        for (&addr, &len) in addrs.iter().zip(&lens) {
            st.arena.free(addr, len);
        }
        st.entries -= k;
        st.tombs += k;
        st.earliest = match c[bc::NEXT_EXPIRY] {
            0 => u64::MAX,
            v => !v,
        };
        self.drop_released(st);
        Ok(())
    }

    /// Moves the live records of the emptiest sealed segments, about `max_live_bytes` of
    /// them (`force`: even when the arena is not fragmented). Best effort: when the moved
    /// records find no room, nothing moves.
    fn compact(&self, st: &mut State<D>, max_live_bytes: u64, force: bool) -> Result<()> {
        let victims = st.arena.victims(max_live_bytes, force);
        if victims.is_empty() || st.entries == 0 {
            return Ok(());
        }
        let mut flags = vec![0u8; st.arena.segment_count()];
        for &v in &victims {
            flags[v as usize] = 1;
        }
        let cap = st.entries;
        let mut a = BytesArgs {
            victims: self.upload_to(st, S::Victims, &flags)?,
            list_slot: self.scratch(st, S::ListSlot, cap * 8)?,
            list_addr: self.scratch(st, S::ListAddr, cap * 8)?,
            list_len: self.scratch(st, S::ListLen, cap * 8)?,
            addrs: self.scratch(st, S::MoveTo, cap * 8)?,
            ..BytesArgs::default()
        };
        self.reset_counters(st)?;
        self.launch(st, K::Gather, &a, st.phys as u64)?;
        let k = self.read_counters(st)?[bc::LISTED] as usize;
        if k > cap {
            return Err(self.broken(format!("compaction listed {k} of {cap} entries")));
        }
        if k == 0 {
            return Ok(());
        }
        let olds: Vec<u64> = self.download_from(st, S::ListAddr, k)?;
        let lens: Vec<u64> = self.download_from(st, S::ListLen, k)?;
        let saved = st.arena.clone();
        let Ok(placed) = st.arena.place(&lens) else {
            return Ok(());
        };
        if self.provide(st, &placed.opened).is_err() {
            self.unplace(st, saved.clone(), &placed.opened);
            return Ok(());
        }
        if let Err(e) = self
            .dev
            .upload(self.buf(st, S::MoveTo)?, 0, as_bytes(&placed.addrs))
        {
            self.unplace(st, saved.clone(), &placed.opened);
            return Err(e);
        }
        a.n = k as u64;
        self.launch(st, K::Move, &a, k as u64)?;
        // Wait for the moves before the old places can be given back (and reused).
        self.read_counters(st)?;
        for (&old, &len) in olds.iter().zip(&lens) {
            st.arena.free(old, len);
        }
        st.arena.count_compacted(lens.iter().sum());
        self.drop_released(st);
        Ok(())
    }

    fn put_inner(&self, keys: Binary<'_>, values: Binary<'_>, ttl: Option<&[u64]>) -> Result<()> {
        check_byte_put(&self.cfg.limits(), keys, values)?;
        if let Some(t) = ttl {
            check_per_key(keys, "ttl_ms", t)?;
        }
        if keys.is_empty() {
            return Ok(());
        }
        let n = keys.len();
        let now = self.now();
        let mut laps = Laps::new(self.dev.tracer());
        let mut guard = self.lock();
        let st = &mut *guard;
        self.purge(st, now)?;
        let mut b = self.load_batch(st, keys, Some(values), ttl, now)?;
        laps.lap("upload");
        self.dedup(st, &mut b)?;
        b.a.found_slot = self.scratch(st, S::FoundSlot, n * 8)?;
        b.a.addrs = self.scratch(st, S::Addrs, n * 8)?;
        b.a.old_addr = self.scratch(st, S::OldAddr, n * 8)?;
        b.a.old_len = self.scratch(st, S::OldLen, n * 8)?;
        self.reset_counters(st)?;
        self.launch(st, K::Lookup, &b.a, n as u64)?;
        let mut h = std::mem::take(&mut st.host);
        let win = sized(&mut h.win, n);
        let found = sized(&mut h.found, n);
        self.read_after(
            st,
            "dedup",
            &mut [
                (S::Win, &mut *win),
                (S::FoundSlot, bytemuck::cast_slice_mut(&mut *found)),
            ],
        )?;
        laps.lap("lookup");
        let is_fresh = |i: usize| win[i] != 0 && found[i] == bs::NONE;
        let fresh = if n < PAR_ITEMS {
            (0..n).filter(|&i| is_fresh(i)).count()
        } else {
            (0..n).into_par_iter().filter(|&i| is_fresh(i)).count()
        };
        let slots = self.cfg.admit(st.entries, fresh, st.slots)?;
        let addrs = sized(&mut h.addrs, n);
        let mut saved = st.arena.clone();
        let (opened, written) = match place_winners(&mut st.arena, keys, values, win, addrs) {
            Err(Error::BudgetExceeded { .. }) => {
                self.compact(st, u64::MAX, true)?;
                saved = st.arena.clone();
                place_winners(&mut st.arena, keys, values, win, addrs)?
            }
            r => r?,
        };
        // Until the write kernel is launched nothing of the batch is in the table: a
        // failure gives the placement back. (A rebuilt index holds the same entries.)
        let staged = (|| {
            self.provide(st, &opened)?;
            let phys = phys_for(slots).max(st.phys);
            if phys > st.phys || st.entries + st.tombs + fresh > st.phys / 4 * 3 {
                self.rebuild(st, phys)?;
                // The slots moved: find the keys again.
                self.launch(st, K::Lookup, &b.a, n as u64)?;
            }
            laps.lap("plan");
            // Only the winners' addresses are read (the write kernel skips the others).
            self.dev
                .upload(self.buf(st, S::Addrs)?, 0, as_bytes(&*addrs))?;
            self.reset_counters(st)?;
            self.launch(st, K::Write, &b.a, n as u64)
        })();
        if let Err(e) = staged {
            self.unplace(st, saved, &opened);
            return Err(e);
        }
        st.slots = slots;
        let old_addr = sized(&mut h.old_addr, n);
        let old_len = sized(&mut h.old_len, n);
        let c = self.read_after(
            st,
            "put",
            &mut [
                (S::OldAddr, bytemuck::cast_slice_mut(&mut *old_addr)),
                (S::OldLen, bytemuck::cast_slice_mut(&mut *old_len)),
            ],
        )?;
        laps.lap("write");
        // The replaced records, found on all cores (a batch of new keys replaces none).
        let replaced = |i: &usize| win[*i] != 0 && old_len[*i] != 0;
        let replaced: Vec<usize> = if n < PAR_ITEMS {
            (0..n).filter(replaced).collect()
        } else {
            (0..n).into_par_iter().filter(replaced).collect()
        };
        for i in replaced {
            st.arena.free(old_addr[i], old_len[i]);
        }
        st.entries += c[bc::INSERTED] as usize;
        st.tombs = st.tombs.saturating_sub(c[bc::REUSED] as usize);
        if let Some(t) = ttl {
            for i in 0..n {
                if win[i] != 0 && t[i] != 0 {
                    st.earliest = st.earliest.min(expiry_time(now, t[i]));
                }
            }
        }
        st.host = h;
        self.drop_released(st);
        laps.lap("free");
        let bound = st.arena.compaction_allowance(written);
        let r = tolerant(self.compact(st, bound, false));
        laps.lap("compact");
        laps.report("cuda bytes put", n);
        r
    }

    /// Hashes and finds `keys` (checked, not empty): the batch with `found_slot` (and the
    /// value lengths, expiry times, if asked) written.
    fn find_keys(
        &self,
        st: &mut State<D>,
        keys: Binary<'_>,
        now: u64,
        value_lens: bool,
        expires: bool,
    ) -> Result<Batch> {
        let n = keys.len();
        let mut b = self.load_batch(st, keys, None, None, now)?;
        b.a.found_slot = self.scratch(st, S::FoundSlot, n * 8)?;
        if value_lens {
            b.a.value_len_out = self.scratch(st, S::VLen, n * 8)?;
        }
        if expires {
            b.a.expires_out = self.scratch(st, S::Exp, n * 8)?;
        }
        // The lookup's reads check the error counter: not one a failed batch left set.
        self.reset_counters(st)?;
        self.launch(st, K::Lookup, &b.a, n as u64)?;
        Ok(b)
    }

    pub(crate) fn put(&self, keys: Binary<'_>, values: Binary<'_>) -> Result<()> {
        self.put_inner(keys, values, None)
    }

    pub(crate) fn put_ttl(&self, keys: Binary<'_>, values: Binary<'_>, ttl: &[u64]) -> Result<()> {
        self.put_inner(keys, values, Some(ttl))
    }

    pub(crate) fn get(
        &self,
        keys: Binary<'_>,
        values_out: &mut BinaryBuf,
        found_out: &mut [bool],
    ) -> Result<()> {
        check_byte_lookup(&self.cfg.limits(), keys, found_out)?;
        let n = keys.len();
        if n == 0 {
            values_out.clear();
            return Ok(());
        }
        let now = self.now();
        let mut laps = Laps::new(self.dev.tracer());
        let mut guard = self.lock();
        let st = &mut *guard;
        let r = self.get_locked(st, keys, now, values_out, found_out, &mut laps);
        if r.is_err() {
            values_out.clear();
        }
        laps.report("cuda bytes get", n);
        r
    }

    fn get_locked(
        &self,
        st: &mut State<D>,
        keys: Binary<'_>,
        now: u64,
        values_out: &mut BinaryBuf,
        found_out: &mut [bool],
        laps: &mut Laps,
    ) -> Result<()> {
        let n = keys.len();
        let mut b = self.find_keys(st, keys, now, true, false)?;
        laps.lap("upload");
        let mut h = std::mem::take(&mut st.host);
        let vlen = sized(&mut h.vlen, n);
        self.read_after(
            st,
            "lookup",
            &mut [(S::VLen, bytemuck::cast_slice_mut(&mut *vlen))],
        )?;
        laps.lap("lookup");
        let vlen: &[u64] = vlen;
        let (offsets, data) = values_out.reset_for_overwrite(n, |i| match vlen[i] {
            bs::NONE => 0,
            l => l as usize,
        });
        laps.lap("offsets");
        if !data.is_empty() {
            // The output's offsets start at 0, so their i64 bits are the kernel's u64s.
            b.a.out_offsets = self.upload_to(st, S::OutOff, offsets)?;
            b.a.out_data = self.scratch(st, S::OutData, data.len())?;
            self.launch(st, K::Get, &b.a, n as u64)?;
            self.dev.download(data, self.buf(st, S::OutData)?, 0)?;
        }
        laps.lap("values");
        for (f, &l) in found_out.iter_mut().zip(vlen.iter()) {
            *f = l != bs::NONE;
        }
        st.host = h;
        Ok(())
    }

    pub(crate) fn contains(&self, keys: Binary<'_>, found_out: &mut [bool]) -> Result<()> {
        check_byte_lookup(&self.cfg.limits(), keys, found_out)?;
        let n = keys.len();
        if n == 0 {
            return Ok(());
        }
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        self.find_keys(st, keys, now, false, false)?;
        let found: Vec<u64> = self.download_from(st, S::FoundSlot, n)?;
        for (f, &s) in found_out.iter_mut().zip(&found) {
            *f = s != bs::NONE;
        }
        Ok(())
    }

    pub(crate) fn ttl(&self, keys: Binary<'_>, ttl_out: &mut [i64]) -> Result<()> {
        self.cfg.limits().check_keys(keys)?;
        check_per_key(keys, "ttl_out", ttl_out)?;
        let n = keys.len();
        if n == 0 {
            return Ok(());
        }
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        self.find_keys(st, keys, now, false, true)?;
        let mut found = vec![0u64; n];
        let mut exp = vec![0u64; n];
        self.read_after(
            st,
            "lookup",
            &mut [
                (S::FoundSlot, bytemuck::cast_slice_mut(&mut found)),
                (S::Exp, bytemuck::cast_slice_mut(&mut exp)),
            ],
        )?;
        for i in 0..n {
            ttl_out[i] = if found[i] == bs::NONE {
                TTL_MISSING
            } else if exp[i] == 0 {
                TTL_NEVER
            } else {
                i64::try_from(exp[i].saturating_sub(now)).unwrap_or(i64::MAX)
            };
        }
        Ok(())
    }

    pub(crate) fn expire(
        &self,
        keys: Binary<'_>,
        ttl_ms: &[u64],
        found_out: &mut [bool],
    ) -> Result<()> {
        check_byte_lookup(&self.cfg.limits(), keys, found_out)?;
        check_per_key(keys, "ttl_ms", ttl_ms)?;
        let n = keys.len();
        if n == 0 {
            return Ok(());
        }
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        self.purge(st, now)?;
        let mut b = self.load_batch(st, keys, None, Some(ttl_ms), now)?;
        self.dedup(st, &mut b)?;
        b.a.found_slot = self.scratch(st, S::FoundSlot, n * 8)?;
        self.reset_counters(st)?;
        self.launch(st, K::Lookup, &b.a, n as u64)?;
        self.launch(st, K::SetExpiry, &b.a, n as u64)?;
        let mut found = vec![0u64; n];
        self.read_after(
            st,
            "dedup",
            &mut [(S::FoundSlot, bytemuck::cast_slice_mut(&mut found))],
        )?;
        for i in 0..n {
            found_out[i] = found[i] != bs::NONE;
            if found_out[i] && ttl_ms[i] != 0 {
                st.earliest = st.earliest.min(expiry_time(now, ttl_ms[i]));
            }
        }
        Ok(())
    }

    pub(crate) fn delete(&self, keys: Binary<'_>) -> Result<usize> {
        self.cfg.limits().check_keys(keys)?;
        let n = keys.len();
        if n == 0 {
            return Ok(0);
        }
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        self.purge(st, now)?;
        let mut b = self.load_batch(st, keys, None, None, now)?;
        b.a.old_addr = self.scratch(st, S::OldAddr, n * 8)?;
        b.a.old_len = self.scratch(st, S::OldLen, n * 8)?;
        self.reset_counters(st)?;
        self.launch(st, K::Delete, &b.a, n as u64)?;
        let mut old_addr = vec![0u64; n];
        let mut old_len = vec![0u64; n];
        let c = self.read_after(
            st,
            "delete",
            &mut [
                (S::OldAddr, bytemuck::cast_slice_mut(&mut old_addr)),
                (S::OldLen, bytemuck::cast_slice_mut(&mut old_len)),
            ],
        )?;
        let removed = c[bc::REMOVED] as usize;
        let mut freed = 0;
        for (&addr, &len) in old_addr.iter().zip(&old_len) {
            if len != 0 {
                st.arena.free(addr, len);
                freed += len;
            }
        }
        st.entries -= removed;
        st.tombs += removed;
        self.drop_released(st);
        if removed > 0 {
            let bound = st.arena.compaction_allowance(freed);
            tolerant(self.compact(st, bound, false))?;
        }
        Ok(removed)
    }

    pub(crate) fn len(&self) -> usize {
        let mut st = self.lock();
        let _ = self.purge(&mut st, self.now());
        st.entries
    }

    pub(crate) fn capacity(&self) -> usize {
        capacity_of(self.lock().slots, self.cfg.table.max_load_factor)
    }

    pub(crate) fn clear(&self) -> Result<()> {
        let mut guard = self.lock();
        let st = &mut *guard;
        self.dev.zero(&st.index, st.phys * 32)?;
        st.entries = 0;
        st.tombs = 0;
        st.earliest = u64::MAX;
        st.arena.clear();
        st.arena.take_released();
        st.mem.clear();
        Ok(())
    }

    pub(crate) fn limits(&self) -> ByteLimits {
        self.cfg.limits()
    }

    /// Copies the first `dst.len()` bytes of `src` to the host in pieces of at most
    /// [`EXPORT_CHUNK_BYTES`] (each a plain copy on the table's stream, waited for).
    fn read_chunked(&self, dst: &mut [u8], src: &D::Buf, at: usize) -> Result<()> {
        for (k, piece) in dst.chunks_mut(EXPORT_CHUNK_BYTES).enumerate() {
            self.dev.download(piece, src, at + k * EXPORT_CHUNK_BYTES)?;
        }
        Ok(())
    }

    /// Copies the index and the arena's segments to the host under the table's lock, then
    /// decodes the entries live at the time read under it with the lock let go.
    pub(crate) fn export(&self) -> Result<ByteImage> {
        let copy = {
            let st = self.lock();
            let now = self.now();
            let mut index = vec![0u64; st.phys * bs::WORDS as usize];
            self.read_chunked(bytemuck::cast_slice_mut(&mut index), &st.index, 0)?;
            let seg = st.arena.segment_bytes() as usize;
            let segments = (0..st.arena.segment_count() as u32)
                .map(|id| {
                    st.mem
                        .place(id)
                        .map(|(b, at)| {
                            let mut v = vec![0u8; seg];
                            self.read_chunked(&mut v, b, at).map(|()| v)
                        })
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            IndexCopy {
                index,
                segments,
                seg_shift: seg.trailing_zeros(),
                now,
            }
        };
        copy.decode(self.backend())
    }

    pub(crate) fn describe(&self) -> ByteDescription {
        let mut st = self.lock();
        let _ = self.purge(&mut st, self.now());
        ByteDescription {
            backend: self.backend(),
            device: self.dev.device_name(),
            entries: st.entries,
            capacity: capacity_of(st.slots, self.cfg.table.max_load_factor),
            index_bytes: (st.phys * 32) as u64,
            arena: st.arena.stats(),
        }
    }
}

/// A host copy of a byte table's index and arena segments ([`Table::export`]), decoded
/// once the table's lock is let go.
struct IndexCopy {
    /// The index's slots, [`bs::WORDS`] words each.
    index: Vec<u64>,
    /// Each segment's bytes (`None`: a segment without memory).
    segments: Vec<Option<Vec<u8>>>,
    /// log2 of the segment size: an arena address is `segment << seg_shift | offset`.
    seg_shift: u32,
    /// The table's time when it was copied.
    now: u64,
}

impl IndexCopy {
    /// The entries live at `now`: each occupied slot's key and value bytes out of its
    /// record, and its absolute expiry time.
    fn decode(&self, backend: &'static str) -> Result<ByteImage> {
        let mut img = ByteImage::default();
        let offset_mask = (1u64 << self.seg_shift) - 1;
        for slot in self.index.chunks_exact(bs::WORDS as usize) {
            let meta = slot[bs::META as usize];
            let expires = slot[bs::EXPIRES as usize];
            if !byte_live(meta) || expired(expires, self.now) {
                continue;
            }
            let addr = slot[bs::ADDR as usize];
            let (kl, vl) = (byte_key_len(meta) as usize, byte_value_len(meta) as usize);
            let at = (addr & offset_mask) as usize;
            let record = self
                .segments
                .get((addr >> self.seg_shift) as usize)
                .and_then(Option::as_ref)
                .and_then(|seg| seg.get(at..at + kl + vl));
            let Some(record) = record else {
                return Err(Error::device(
                    backend,
                    format!(
                        "an index entry's record ({} bytes at arena address {addr}) lies outside the arena",
                        kl + vl
                    ),
                ));
            };
            img.push(&record[..kl], &record[kl..], expires);
        }
        Ok(img)
    }
}

/// The result of a compaction after a batch that went through: best effort, so running
/// out of device memory for its scratch only leaves the arena as fragmented as it was.
fn tolerant(r: Result<()>) -> Result<()> {
    match r {
        Err(Error::OutOfDeviceMemory { .. }) => Ok(()),
        r => r,
    }
}

/// A batch's offsets from 0 (as u64) and its bytes. Offsets that are already i64 from 0
/// (a [`BinaryBuf`]'s) are the u64 ones bit for bit, and are not copied.
fn rebased<'a>(b: Binary<'a>) -> (Cow<'a, [u64]>, &'a [u8]) {
    let n = b.len();
    let (first, last, off): (usize, usize, Cow<'a, [u64]>) = match b.offsets() {
        Offsets::I32(o) => {
            let f = o[0] as u64;
            (
                o[0] as usize,
                o[n] as usize,
                o.iter().map(|&x| x as u64 - f).collect(),
            )
        }
        // Offsets are checked to be non-negative and non-decreasing (`Binary::new`).
        Offsets::I64(o) if o[0] == 0 => (0, o[n] as usize, Cow::Borrowed(bytemuck::cast_slice(o))),
        Offsets::I64(o) => {
            let f = o[0] as u64;
            (
                o[0] as usize,
                o[n] as usize,
                o.iter().map(|&x| x as u64 - f).collect(),
            )
        }
    };
    (off, &b.data()[first..last])
}

/// Implements [`kv_core::ByteTable`] for a wrapper of a [`Table`] in field `t`.
macro_rules! byte_table_impl {
    ($ty:ty) => {
        impl kv_core::ByteTable for $ty {
            fn put(&self, keys: Binary<'_>, values: Binary<'_>) -> Result<()> {
                self.t.put(keys, values)
            }
            fn get(
                &self,
                keys: Binary<'_>,
                values_out: &mut BinaryBuf,
                found_out: &mut [bool],
            ) -> Result<()> {
                self.t.get(keys, values_out, found_out)
            }
            fn delete(&self, keys: Binary<'_>) -> Result<usize> {
                self.t.delete(keys)
            }
            fn contains(&self, keys: Binary<'_>, found_out: &mut [bool]) -> Result<()> {
                self.t.contains(keys, found_out)
            }
            fn len(&self) -> usize {
                self.t.len()
            }
            fn capacity(&self) -> usize {
                self.t.capacity()
            }
            fn clear(&self) -> Result<()> {
                self.t.clear()
            }
            fn limits(&self) -> ByteLimits {
                self.t.limits()
            }
            fn describe(&self) -> ByteDescription {
                self.t.describe()
            }
            fn put_ttl(&self, keys: Binary<'_>, values: Binary<'_>, ttl_ms: &[u64]) -> Result<()> {
                self.t.put_ttl(keys, values, ttl_ms)
            }
            fn expire(
                &self,
                keys: Binary<'_>,
                ttl_ms: &[u64],
                found_out: &mut [bool],
            ) -> Result<()> {
                self.t.expire(keys, ttl_ms, found_out)
            }
            fn ttl(&self, keys: Binary<'_>, ttl_out: &mut [i64]) -> Result<()> {
                self.t.ttl(keys, ttl_out)
            }
            fn export(&self) -> Result<ByteImage> {
                self.t.export()
            }
        }
    };
}

/// A byte table in the memory of one NVIDIA GPU (see the module docs): the index and the
/// arena in VRAM, the arena planned on the host by `kv_arena`.
///
/// ```no_run
/// use kv_backend_cuda::CudaBytes;
/// use kv_core::{ByteConfig, ByteTable};
/// let t = CudaBytes::open(ByteConfig::new(1000))?;
/// t.put_slices(&[b"user:1", b"user:2"], &[b"alice", b""])?;
/// assert_eq!(t.get_slices(&[b"user:2", b"user:3"])?, [Some(vec![]), None]);
/// # Ok::<(), kv_core::Error>(())
/// ```
pub struct CudaBytes {
    t: Table<crate::bytes_gpu::GpuDev>,
}

impl std::fmt::Debug for CudaBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBytes")
            .field("device", &self.t.dev.device_name())
            .field("cfg", &self.t.cfg)
            .finish()
    }
}

impl CudaBytes {
    /// Opens a byte table on the GPU `cfg.table.device` (default: the one with the most
    /// free memory), with the default [`CudaOptions`](crate::CudaOptions).
    ///
    /// Fails with [`Error::InvalidConfig`] for a bad config, [`Error::BackendUnavailable`]
    /// when there is no driver or no usable GPU, [`Error::Unsupported`] when the kernels
    /// (loaded through [`CudaOptions::ptx`](crate::CudaOptions::ptx)) lack the byte-table
    /// ones, and [`Error::OutOfDeviceMemory`] when the index does not fit.
    pub fn open(cfg: ByteConfig) -> Result<Self> {
        Self::open_with(cfg, &crate::CudaOptions::default())
    }

    /// [`open`](Self::open) with `options` (the device's kernels and grid).
    pub fn open_with(cfg: ByteConfig, options: &crate::CudaOptions) -> Result<Self> {
        cfg.validate()?;
        options.validate()?;
        let dev = crate::bytes_gpu::GpuDev::new(&cfg, options)?;
        Ok(CudaBytes {
            t: Table::open(dev, cfg)?,
        })
    }
}

byte_table_impl!(CudaBytes);

/// [`CudaBytes`]'s driver and kernel code run over host memory (the kernels' per-item
/// functions on host threads): for tests without a GPU. Not a table to use.
#[doc(hidden)]
pub struct HostMirrorBytes {
    t: Table<crate::bytes_host::HostDev>,
}

impl HostMirrorBytes {
    /// Opens a host mirror; `memory_limit` bytes of "device memory" at most.
    pub fn open(cfg: ByteConfig, memory_limit: usize) -> Result<Self> {
        Ok(HostMirrorBytes {
            t: Table::open(crate::bytes_host::HostDev::new(memory_limit), cfg)?,
        })
    }
}

byte_table_impl!(HostMirrorBytes);
