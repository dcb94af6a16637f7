//! The per-item algorithms of every kernel, generic over the memory operations ([`Mem`]).
//!
//! The device instantiates them with PTX inline assembly (device-scope atomics on global
//! memory); the host tests instantiate them with `core::sync::atomic` and run them over
//! host memory, sequentially and on several threads, against a `HashMap` model. The kernel
//! entry points are thin grid-stride loops over these functions.
//!
//! # The put protocol (per chunk; chunks of a batch run one after the other)
//!
//! docs/protocol.md states it next to the wgpu backend's, with the invariants the audit
//! checks.
//!
//! Every item first places its key in the table directly. Only a chunk in which some item
//! found its key already there (an overwrite, or a key that repeats in the chunk) then
//! resolves its repeats, in a small chunk-local table (lane scratch, `u32[local_slots(n)]`:
//! 4 bytes a slot, at most 16 MiB for the largest chunks, so it mostly stays in L2), so
//! that the last occurrence of each repeated key writes the row last. A chunk of fresh
//! keys costs one pass over the table; the three later passes read a flag and exit.
//!
//! 1. [`put_place`] (every key): a sentinel key records `1 + i` with an atomic max in its
//!    chunk flag. Any other key probes linearly from the first slot of its home window
//!    ([`probe_start`]), reading a window's keys at once ([`window_slots`]): a slot holding
//!    the key is taken as is ("found": the FOUND flag is raised); on EMPTY, the key is
//!    claimed with a CAS, at the first tombstone met on the way if there was one, else at
//!    the EMPTY slot. A tombstone lost to another key sends the probe on from the slot after
//!    it, claiming the next tombstone or that EMPTY slot (never back to the start); a failed
//!    CAS on EMPTY reads the winner's key. Items of a chunk that share a key therefore agree
//!    on one slot: exactly one claims it (so INSERTED counts each new key once) and the
//!    others find it. A window's keys are loaded before the CAS: probing with the CAS
//!    itself made this pass 0.9x as fast on the H100 (a failed atomic on an occupied slot
//!    costs more than a load; PERF.md, "Host copies and CAS-first probes"). A key loaded
//!    there may since have been claimed; slots only go from EMPTY or TOMBSTONE to a key
//!    during a put, and the CAS sees the slot as it is. The caller then writes the item's
//!    row ([`put_row`]); items that share a key race on it, which pass 4 repairs.
//! 2. [`put_specials`] (thread 0 of the settle pass): the last occurrence of each sentinel
//!    key writes its row and sets its presence word. When FOUND is raised, the same pass
//!    zeroes the chunk-local table ([`clear_local`]).
//! 3. [`put_dedup`] (every key, when FOUND is raised): the key probes the local table
//!    linearly from its home slot, with a CAS of `1 + i` on each slot (which claims a free
//!    slot, 0, and otherwise returns what the slot holds, as a load would): a slot holding
//!    `1 + j` (with or without [`REPEAT`]) belongs to the key `keys_in[j]` (slots never
//!    change owner), so when that is our key, `REPEAT | max(1 + i, 1 + j)` is maxed into it
//!    and the chunk's DUP flag is raised. The local slot is stored in `slot_of[i]`. When the
//!    pass ends, the slot of a repeated key holds `REPEAT | 1 + ` the index of its last
//!    occurrence (the claimer's own index is folded in by every later occurrence, which read
//!    it), and the slot of a key that occurs once holds its `1 + i` without the bit.
//! 4. [`put_rewrite`] (every key, when DUP is raised): the last occurrence of each repeated
//!    key finds its slot in the table and writes its row again, after every racing write of
//!    pass 1.

pub mod bytes;
pub mod cache;

use crate::layout::{
    BatchArgs, EMPTY, REPEAT, RehashArgs, TOMBSTONE, TableArgs, counter, flag, home_slot,
    is_sentinel, key_word, next_slot, probe_start, row_word, special_index, special_row,
    window_slots,
};

/// The memory operations the algorithms need. Addresses are device (or host) addresses as u64.
///
/// # Safety
///
/// Implementations must perform exactly the named operation on the given address;
/// callers guarantee the address is valid and aligned for its type (this covers every
/// method below).
#[allow(clippy::missing_safety_doc)]
pub unsafe trait Mem {
    /// A plain load (data not written concurrently by the running kernel).
    unsafe fn load(addr: u64) -> u64;
    /// Two adjacent words (16-byte aligned) in one load that observes the latest values at
    /// device scope.
    unsafe fn load2_sync(addr: u64) -> [u64; 2];
    /// Two adjacent words (16-byte aligned) in one load, of data not written concurrently by
    /// the running kernel.
    unsafe fn load2(addr: u64) -> [u64; 2];
    /// A plain store.
    unsafe fn store(addr: u64, v: u64);
    /// A plain u32 load.
    unsafe fn load_u32(addr: u64) -> u32;
    /// A plain u32 store.
    unsafe fn store_u32(addr: u64, v: u32);
    /// A plain u8 load.
    unsafe fn load_u8(addr: u64) -> u8;
    /// A plain u8 store.
    unsafe fn store_u8(addr: u64, v: u8);
    /// Atomic compare-and-swap; returns the old value.
    unsafe fn cas(addr: u64, current: u64, new: u64) -> u64;
    /// Atomic compare-and-swap (u32); returns the old value.
    unsafe fn cas_u32(addr: u64, current: u32, new: u32) -> u32;
    /// Atomic exchange; returns the old value.
    unsafe fn exch(addr: u64, v: u64) -> u64;
    /// Atomic unsigned max (u64).
    unsafe fn max_u64(addr: u64, v: u64);
    /// Atomic unsigned max (u32).
    unsafe fn max_u32(addr: u64, v: u32);
    /// Atomic add (u64).
    unsafe fn add(addr: u64, v: u64);
    /// A load that observes the latest value at device scope (of data other threads write
    /// while the kernel runs).
    unsafe fn load_sync(addr: u64) -> u64;
    /// A u32 load that observes the latest value at device scope.
    unsafe fn load_u32_sync(addr: u64) -> u32;
    /// Atomic add (u64); returns the old value.
    unsafe fn fetch_add(addr: u64, v: u64) -> u64;
    /// Atomic add (u32).
    unsafe fn add_u32(addr: u64, v: u32);
    /// Atomic and (u32); returns the old value.
    unsafe fn and_u32(addr: u64, v: u32) -> u32;
    /// A device-scope fence that orders this thread's memory operations before it against
    /// those after it (acquire and release): with an atomic on a lock word, it makes what
    /// the lock's previous holder wrote visible to the next.
    unsafe fn fence();
}

/// The warp-level operations of the warp-cooperative kernels (a warp per item: the cache
/// kernels of [`cache`]), so that their algorithms are written once for the device and the
/// host.
///
/// Code generic over `Warp` is the code of one warp. A value that differs between lanes is a
/// [`Lanes`](Warp::Lanes): made by [`lanes`](Warp::lanes) (each lane computes its own, e.g.
/// loads the key of the bucket slot it stands for) or [`map`](Warp::map), and combined by
/// the collectives ([`ballot`](Warp::ballot), [`shfl`](Warp::shfl), [`min`](Warp::min),
/// [`one`](Warp::one)), whose results every lane shares. Everything else is the same in every
/// lane. On the device each of the 32 lanes runs the code, and a `Lanes` is its own value;
/// on the host one thread runs a whole warp: a `Lanes` holds all 32 values, and
/// [`lanes`](Warp::lanes) runs its closure for lane 0, 1, ..., 31 in turn.
///
/// # Safety
///
/// Implementations must give the results documented on each method. On the device, the
/// collectives (every `unsafe` method) need all 32 lanes of the warp to call them together:
/// callers keep control flow warp-uniform around them (branches only on shared values).
pub unsafe trait Warp: Mem {
    /// One `T` per lane.
    type Lanes<T: Copy>: Copy;
    /// Each lane's `f(lane)` (on the host: for lanes 0 to 31 in order).
    fn lanes<T: Copy>(f: impl FnMut(u32) -> T) -> Self::Lanes<T>;
    /// Each lane's `f(lane, v)` of its value `v`.
    fn map<T: Copy, U: Copy>(v: Self::Lanes<T>, f: impl FnMut(u32, T) -> U) -> Self::Lanes<U>;
    /// Bit `l` set where lane `l`'s value is `true`.
    ///
    /// # Safety
    /// A collective (see the trait).
    unsafe fn ballot(v: Self::Lanes<bool>) -> u32;
    /// Lane `src`'s value (`src < 32`), in every lane.
    ///
    /// # Safety
    /// A collective.
    unsafe fn shfl(v: Self::Lanes<u64>, src: u32) -> u64;
    /// The lowest of the lanes' values, in every lane.
    ///
    /// # Safety
    /// A collective.
    unsafe fn min(v: Self::Lanes<u64>) -> u64;
    /// Lane 0 runs `f` (its atomics and stores happen once for the warp); every lane gets
    /// what it returned.
    ///
    /// # Safety
    /// A collective.
    unsafe fn one(f: impl FnOnce() -> u64) -> u64;
    /// A barrier of the warp's lanes that also orders memory between them
    /// (`bar.warp.sync`): what a lane wrote or acquired before it is visible to the other
    /// lanes after it. A lock taken by lane 0 and followed by `sync` covers the warp.
    ///
    /// # Safety
    /// A collective.
    unsafe fn sync();
}

/// The lane-group operations of the kernels that give each item a group of
/// [`GROUP_LANES`](crate::layout::GROUP_LANES) lanes instead of a whole warp (the cache
/// lookups of [`cache`]), so that four items of a warp wait on memory at once: a lookup
/// does little work between its dependent loads, and a warp per item left the SMs waiting.
///
/// Code generic over `Group` is the code of one group, as code generic over [`Warp`] is the
/// code of one warp: a value that differs between its lanes is a
/// [`GroupLanes`](Group::GroupLanes), made by [`group_lanes`](Group::group_lanes) and
/// combined by [`group_or`](Group::group_or) (or mapped by [`group_map`](Group::group_map)). On the device each lane runs the code (the
/// group is lanes `8g .. 8g + 7` of a warp); on the host one thread plays the group's lanes
/// in turn.
///
/// # Safety
///
/// Implementations must give the results documented on each method. On the device, the
/// collectives (every `unsafe` method) need all lanes of the group to call them together;
/// the groups of one warp may be at different places of the code.
pub unsafe trait Group: Mem {
    /// One `T` per lane of the group.
    type GroupLanes<T: Copy>: Copy;
    /// Each lane's `f(lane)`, `lane` counted within the group (on the host: lanes 0 to
    /// `GROUP_LANES - 1` in order).
    fn group_lanes<T: Copy>(f: impl FnMut(u32) -> T) -> Self::GroupLanes<T>;
    /// Each lane's `f(lane, v)` of its value `v`.
    fn group_map<T: Copy, U: Copy>(
        v: Self::GroupLanes<T>,
        f: impl FnMut(u32, T) -> U,
    ) -> Self::GroupLanes<U>;
    /// The bitwise or of the lanes' values, in every lane of the group.
    ///
    /// # Safety
    /// A collective of the group.
    unsafe fn group_or(v: Self::GroupLanes<u32>) -> u32;
    /// The lowest of the lanes' values, in every lane of the group.
    ///
    /// # Safety
    /// A collective of the group.
    unsafe fn group_min(v: Self::GroupLanes<u64>) -> u64;
    /// Lane `src`'s value (`src < GROUP_LANES`), in every lane of the group.
    ///
    /// # Safety
    /// A collective of the group.
    unsafe fn group_shfl(v: Self::GroupLanes<u64>, src: u32) -> u64;
    /// The group's first lane runs `f` (its atomics and stores happen once for the group);
    /// every lane gets what it returned.
    ///
    /// # Safety
    /// A collective of the group.
    unsafe fn group_one(f: impl FnOnce() -> u64) -> u64;
    /// A barrier of the group's lanes that also orders memory between them
    /// (`bar.warp.sync` on the group's lanes), as [`Warp::sync`] for a warp.
    ///
    /// # Safety
    /// A collective of the group.
    unsafe fn group_sync();
}

/// The group's first lane's work: `f` runs once per group, and nothing is shared.
///
/// # Safety
/// A collective of `M` (see [`Group`]).
#[inline(always)]
pub unsafe fn group_lane0<M: Group>(f: impl FnOnce()) {
    // SAFETY: forwarded.
    unsafe {
        M::group_one(|| {
            f();
            0
        })
    };
}

/// Lane 0's work for the warp: `f` runs once per warp, and nothing is shared.
///
/// # Safety
/// A collective of `M` (see [`Warp`]).
#[inline(always)]
pub unsafe fn lane0<M: Warp>(f: impl FnOnce()) {
    // SAFETY: forwarded.
    unsafe {
        M::one(|| {
            f();
            0
        })
    };
}

/// Copies a row of `width` words from `src` to `dst` (word addresses) with the warp's lanes:
/// lane `l` copies words `l`, `l + 32`, ..., so that each load and store of the warp is one
/// coalesced run. `src == 0` writes zeros; `sync` reads at device scope (a row that other
/// threads write while the kernel runs).
///
/// # Safety
/// Both rows are valid for `width` words and do not overlap.
#[inline(always)]
pub unsafe fn warp_copy_row<M: Warp>(dst: u64, src: u64, width: u32, sync: bool) {
    let w = width as u64;
    M::lanes(|l| {
        let mut j = l as u64;
        while j < w {
            // SAFETY: the caller guarantees both rows are valid for `width` words; j < w.
            unsafe { M::store(w64(dst, j), row_word_of::<M>(src, j, sync)) };
            j += 32;
        }
    });
}

/// Word `j` of the row at `row` (a word address): 0 when `row` is 0 (a row of zeros), read
/// at device scope when `sync` (a row that other threads write while the kernel runs). The
/// one read of a row word of the copies above and of the cache kernels' group copies.
///
/// # Safety
/// Unless `row` is 0, it holds more than `j` words.
#[inline(always)]
pub unsafe fn row_word_of<M: Mem>(row: u64, j: u64, sync: bool) -> u64 {
    // SAFETY: forwarded.
    unsafe {
        if row == 0 {
            0
        } else if sync {
            M::load_sync(w64(row, j))
        } else {
            M::load(w64(row, j))
        }
    }
}

/// The address of `slot`'s key in the table's slot array.
#[inline(always)]
const fn key_at(t: &TableArgs, slot: u64) -> u64 {
    w64(t.slots, key_word(slot, t.width, t.bucket_shift))
}

/// The address of `slot`'s value row in the table's slot array.
#[inline(always)]
const fn row_at(t: &TableArgs, slot: u64) -> u64 {
    w64(t.slots, row_word(slot, t.width, t.bucket_shift))
}

#[inline(always)]
const fn w64(base: u64, index: u64) -> u64 {
    base + index * 8
}

#[inline(always)]
const fn w32(base: u64, index: u64) -> u64 {
    base + index * 4
}

/// Copies `width` words from `src` to `dst` (word addresses), four loads in flight at a
/// time (a load, then its store, then the next load would wait for memory once a word).
///
/// # Safety
/// Both rows are valid for `width` words and do not overlap.
#[inline(always)]
pub unsafe fn copy_row<M: Mem>(dst: u64, src: u64, width: u32) {
    let w = width as u64;
    let mut j = 0u64;
    while j + 4 <= w {
        // SAFETY: the caller guarantees both rows are valid for `width` words; j + 3 < w.
        let v = unsafe {
            [
                M::load(w64(src, j)),
                M::load(w64(src, j + 1)),
                M::load(w64(src, j + 2)),
                M::load(w64(src, j + 3)),
            ]
        };
        let mut k = 0;
        while k < 4 {
            // SAFETY: as above.
            unsafe { M::store(w64(dst, j + k as u64), v[k]) };
            k += 1;
        }
        j += 4;
    }
    while j < w {
        // SAFETY: as above; j < w.
        unsafe { M::store(w64(dst, j), M::load(w64(src, j))) };
        j += 1;
    }
}

/// Writes `width` zero words at `dst`.
///
/// # Safety
/// The row is valid for `width` words.
#[inline(always)]
pub unsafe fn zero_row<M: Mem>(dst: u64, width: u32) {
    let mut j = 0u64;
    while j < width as u64 {
        // SAFETY: the caller guarantees the row is valid for `width` words.
        unsafe { M::store(w64(dst, j), 0) };
        j += 1;
    }
}

/// The keys of the window of slots `start .. start + W` (`start` a multiple of `W`, the
/// table's [`window_slots`]), read with 16-byte loads issued together. `sync` reads at
/// device scope (for passes in which other threads write keys).
///
/// # Safety
/// `start + W <= slots` and `W` is the table's window.
#[inline(always)]
unsafe fn window<M: Mem, const W: usize>(t: &TableArgs, start: u64, sync: bool) -> [u64; W] {
    // SAFETY: forwarded; a window's keys are contiguous and 16-byte aligned.
    unsafe { pairs::<M, W>(key_at(t, start), sync) }
}

/// `W` (even) words at `at` (16-byte aligned), read as pairs.
///
/// # Safety
/// The words are valid.
#[inline(always)]
unsafe fn pairs<M: Mem, const W: usize>(at: u64, sync: bool) -> [u64; W] {
    let mut out = [0u64; W];
    let mut j = 0;
    while j < W {
        // SAFETY: the caller guarantees W valid words at `at`.
        let p = unsafe {
            if sync {
                M::load2_sync(at + 8 * j as u64)
            } else {
                M::load2(at + 8 * j as u64)
            }
        };
        out[j] = p[0];
        out[j + 1] = p[1];
        j += 2;
    }
    out
}

/// `w[j]` for `j < W`, as selects rather than an indexed access (which would put the
/// window in local memory on the device).
#[inline(always)]
fn pick<const W: usize>(w: &[u64; W], j: u64) -> u64 {
    let mut v = w[0];
    let mut k = 1;
    while k < W {
        if j == k as u64 {
            v = w[k];
        }
        k += 1;
    }
    v
}

/// The slot of `key` in the window `w` (starting at slot `start`), then whether the window
/// holds an EMPTY slot.
#[inline(always)]
fn scan<const W: usize>(w: &[u64; W], start: u64, key: u64) -> (Option<u64>, bool) {
    let (mut hit, mut empty) = (None, false);
    let mut k = 0;
    while k < W {
        if w[k] == key {
            hit = Some(start + k as u64);
        }
        empty |= w[k] == EMPTY;
        k += 1;
    }
    (hit, empty)
}

/// What [`put_dedup`] found for one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deduped {
    /// The key occurred earlier in the chunk's local table (the chunk repeats it).
    pub repeat: bool,
    /// The local table had no room (broken invariant: it has at least twice the chunk's slots).
    pub overflow: bool,
}

/// Put pass 3 for item `i`: record key `i` in the chunk-local table (see the module docs).
///
/// # Safety
/// `a` describes valid device buffers (the local table zeroed, of `local_mask + 1` slots)
/// and `i < a.n`.
#[inline(always)]
pub unsafe fn put_dedup<M: Mem>(a: &BatchArgs, i: u64) -> Deduped {
    // SAFETY: i < n, keys_in holds n words.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let mut out = Deduped::default();
    if is_sentinel(key) {
        // Recorded by the place pass.
        return out;
    }
    // i + 1 < REPEAT: the host keeps n < 2^31 - 1.
    let me = (i + 1) as u32;
    let mask = a.local_mask;
    let mut pos = home_slot(key, a.table.seed, mask);
    let mut steps = 0u64;
    loop {
        let at = w32(a.local, pos);
        // Claim outright (one atomic rather than a load and then an atomic): a CAS that
        // fails returns what the slot holds, which is all a load would have said.
        // SAFETY: pos <= local_mask: inside the local table.
        let cur = unsafe { M::cas_u32(at, 0, me) };
        if cur == 0 {
            break;
        }
        let their = cur & !REPEAT;
        // SAFETY: their = 1 + j with j < n (only such values are stored).
        if unsafe { M::load(w64(a.keys_in, their as u64 - 1)) } == key {
            // The claimer's index is in `their`: fold it in, so that the slot ends at the
            // highest index of every occurrence even when the claimer came last.
            // SAFETY: as above.
            unsafe { M::max_u32(at, me.max(their) | REPEAT) };
            out.repeat = true;
            break;
        }
        pos = next_slot(pos, mask);
        steps += 1;
        if steps > mask {
            out.overflow = true;
            break;
        }
    }
    // SAFETY: slot_of holds n u32 words; pos <= local_mask < 2^32 (the host keeps it so).
    unsafe { M::store_u32(w32(a.slot_of, i), pos as u32) };
    out
}

/// What [`put_place`] did with one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// The key is a sentinel: its index was recorded for the settle pass.
    pub skipped: bool,
    /// The key took a free slot (EMPTY or TOMBSTONE).
    pub inserted: bool,
    /// ... and that slot was EMPTY.
    pub from_empty: bool,
    /// The key was already in the table (placed by an earlier chunk or batch, or by another
    /// item of this chunk).
    pub found: bool,
    /// The probe went round the whole table without finding room (broken invariant).
    pub overflow: bool,
    /// The slot the key took or found: the caller writes the item's value row there
    /// ([`put_row`]).
    pub slot: Option<u64>,
}

/// Put pass 1 for item `i`: place its key (see the module docs). The caller then writes
/// its value row into [`Placed::slot`] ([`put_row`]), by itself or with its warp.
///
/// # Safety
/// `a` describes valid device buffers, `i < a.n`, and the chunk's flags were zeroed.
#[inline(always)]
pub unsafe fn put_place<M: Mem>(a: &BatchArgs, i: u64) -> Placed {
    // SAFETY: forwarded.
    unsafe {
        match window_slots(a.table.bucket_shift) {
            2 => place::<M, 2>(a, i),
            _ => place::<M, 4>(a, i),
        }
    }
}

/// [`put_place`] with windows of `W` slots.
#[inline(always)]
unsafe fn place<M: Mem, const W: usize>(a: &BatchArgs, i: u64) -> Placed {
    let t = &a.table;
    // SAFETY: i < n, keys_in holds n words.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let mut out = Placed::default();
    if is_sentinel(key) {
        // SAFETY: flags holds flag::LEN words; i + 1 fits u32 (the host keeps n < 2^31 - 1).
        unsafe {
            M::max_u32(
                w32(a.flags, flag::SPEC_WIN as u64 + special_index(key)),
                (i + 1) as u32,
            )
        };
        out.skipped = true;
        return out;
    }
    let win_n = W as u64;
    let home = probe_start(key, t.seed, t.mask, win_n);
    let mut pos = home;
    let mut first_tomb = u64::MAX;
    // Once set, the EMPTY slot that ended the probe: the key was not in any slot before it.
    let mut end = u64::MAX;
    let mut steps = 0u64;
    // The keys of the window holding `pos`, read when the probe enters it. A key read
    // there may since have been claimed: slots only go from EMPTY or TOMBSTONE to a key
    // during a put, and every claim is a CAS that sees the slot as it is.
    let (mut win_at, mut win) = (u64::MAX, [0u64; W]);
    let slot = loop {
        let start = pos & !(win_n - 1);
        if start != win_at {
            // SAFETY: start + W <= slots.
            win = unsafe { window::<M, W>(t, start, true) };
            win_at = start;
        }
        let mut cur = pick(&win, pos & (win_n - 1));
        if end != u64::MAX {
            // Claiming: a tombstone lost to another key sent us on from the slot after it.
            // During a put, slots only go from EMPTY or TOMBSTONE to a key, so the key is
            // still in no slot before `end` but where another item of the chunk with the
            // same key claims one; that item tries the same free slots in the same order,
            // so both meet on one. Take the next tombstone, else `end` itself.
            let want = if pos == end { EMPTY } else { TOMBSTONE };
            if cur == want {
                // SAFETY: pos < slots.
                let old = unsafe { M::cas(key_at(t, pos), want, key) };
                if old == want {
                    out.inserted = true;
                    out.from_empty = want == EMPTY;
                    break pos;
                }
                cur = old;
            }
            if cur == key {
                out.found = true;
                break pos;
            }
            if pos == end {
                // `end` went to another key: probe on as usual from the next slot.
                end = u64::MAX;
            }
        } else {
            if cur == EMPTY {
                if first_tomb != u64::MAX {
                    // SAFETY: first_tomb < slots.
                    let old = unsafe { M::cas(key_at(t, first_tomb), TOMBSTONE, key) };
                    if old == TOMBSTONE {
                        out.inserted = true;
                        break first_tomb;
                    }
                    if old == key {
                        // Another item of the chunk claimed it for the same key.
                        out.found = true;
                        break first_tomb;
                    }
                    // Another key took the tombstone: claim from the slot after it up to
                    // this EMPTY one, never walking the chain again (a walk per lost race
                    // would be quadratic in the chain's length under contention).
                    end = pos;
                    steps = first_tomb.wrapping_sub(home) & t.mask;
                    pos = first_tomb;
                    first_tomb = u64::MAX;
                    pos = next_slot(pos, t.mask);
                    steps += 1;
                    continue;
                }
                // SAFETY: pos < slots.
                let old = unsafe { M::cas(key_at(t, pos), EMPTY, key) };
                if old == EMPTY {
                    out.inserted = true;
                    out.from_empty = true;
                    break pos;
                }
                // Someone claimed this slot first: look at what they put there.
                cur = old;
            }
            if cur == key {
                out.found = true;
                break pos;
            }
            if cur == TOMBSTONE && first_tomb == u64::MAX {
                first_tomb = pos;
            }
        }
        pos = next_slot(pos, t.mask);
        steps += 1;
        if steps > t.mask {
            out.overflow = true;
            return out;
        }
    };
    out.slot = Some(slot);
    out
}

/// The row copy of put pass 1 and 4: (destination, source) word addresses of item `i`'s
/// value row when its key is in `slot`.
#[inline(always)]
pub fn put_row(a: &BatchArgs, i: u64, slot: u64) -> (u64, u64) {
    let t = &a.table;
    (row_at(t, slot), w64(a.values, i * t.width as u64))
}

/// Reads one of the chunk's u32 flags ([`flag::DUP`] or [`flag::FOUND`]).
///
/// # Safety
/// `a.flags` is a valid flag buffer and `index < flag::LEN`.
#[inline(always)]
pub unsafe fn flag_raised<M: Mem>(a: &BatchArgs, index: usize) -> bool {
    // SAFETY: flags holds flag::LEN words.
    unsafe { M::load_u32(w32(a.flags, index as u64)) != 0 }
}

/// Raises one of the chunk's u32 flags.
///
/// # Safety
/// `a.flags` is a valid flag buffer and `index < flag::LEN`.
#[inline(always)]
pub unsafe fn raise_flag<M: Mem>(a: &BatchArgs, index: usize) {
    // SAFETY: flags holds flag::LEN words.
    unsafe { M::store_u32(w32(a.flags, index as u64), 1) }
}

/// Settle pass: zeroes slot `s` of the chunk-local table (before [`put_dedup`]).
///
/// # Safety
/// `s <= a.local_mask`.
#[inline(always)]
pub unsafe fn clear_local<M: Mem>(a: &BatchArgs, s: u64) {
    // SAFETY: the local table holds local_mask + 1 words.
    unsafe { M::store_u32(w32(a.local, s), 0) }
}

/// The sentinel keys of a put (run by one thread of the settle pass): the last occurrence of
/// each writes its row and makes it present. Counts newly present ones.
///
/// # Safety
/// As [`put_place`], after it ran for the whole chunk.
#[inline(always)]
pub unsafe fn put_specials<M: Mem>(a: &BatchArgs) {
    let t = &a.table;
    let mut sp = 0u64;
    while sp < 2 {
        // SAFETY: flags holds flag::LEN words.
        let winner = unsafe { M::load_u32(w32(a.flags, flag::SPEC_WIN as u64 + sp)) } as u64;
        if winner != 0 {
            let i = winner - 1;
            // SAFETY: i < n; the special area holds special_words(width) words.
            unsafe {
                copy_row::<M>(
                    w64(t.special, special_row(sp, t.width)),
                    w64(a.values, i * t.width as u64),
                    t.width,
                );
                if M::exch(w64(t.special, sp), 1) == 0 {
                    M::add(w64(t.counters, counter::SPEC_INSERTED as u64), 1);
                }
            }
        }
        sp += 1;
    }
}

/// What [`put_rewrite`] did with one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// The item is the last occurrence of a repeated key: the caller writes its row again
    /// into this slot ([`put_row`]).
    pub slot: Option<u64>,
    /// ... but its key was not in the table (broken invariant: pass 1 placed it).
    pub missing: bool,
}

/// Put pass 4 for item `i`: if it is the last occurrence of a key that repeats in the
/// chunk, find the slot where its row is written again (see the module docs).
///
/// # Safety
/// `a` describes valid device buffers, `i < a.n`, and [`put_dedup`] ran for the whole chunk.
#[inline(always)]
pub unsafe fn put_rewrite<M: Mem>(a: &BatchArgs, i: u64) -> Rewritten {
    let t = &a.table;
    // SAFETY: i < n, keys_in holds n words.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let mut out = Rewritten::default();
    if is_sentinel(key) {
        return out;
    }
    // SAFETY: i < n; slot_of[i] <= local_mask (written by put_dedup).
    let local = unsafe { M::load_u32(w32(a.local, M::load_u32(w32(a.slot_of, i)) as u64)) };
    if local != (i + 1) as u32 | REPEAT {
        return out;
    }
    // SAFETY: forwarded.
    out.slot = unsafe { find::<M>(t, key) };
    out.missing = out.slot.is_none();
    out
}

/// Finds `key` in the table: its slot, or `None` (sentinel keys are not looked for here).
/// Reads a window of keys at a time; a key is never placed past an EMPTY slot of its probe,
/// so the probe ends at the first window holding one.
///
/// # Safety
/// `t` describes a valid table whose keys no thread writes during the call.
#[inline(always)]
unsafe fn find<M: Mem>(t: &TableArgs, key: u64) -> Option<u64> {
    // SAFETY: forwarded.
    unsafe {
        match window_slots(t.bucket_shift) {
            2 => find_in::<M, 2>(t, key),
            _ => find_in::<M, 4>(t, key),
        }
    }
}

/// [`find`] with windows of `W` slots.
#[inline(always)]
unsafe fn find_in<M: Mem, const W: usize>(t: &TableArgs, key: u64) -> Option<u64> {
    let win_n = W as u64;
    let mut pos = probe_start(key, t.seed, t.mask, win_n);
    let mut steps = 0u64;
    loop {
        // SAFETY: pos is a multiple of W below slots.
        let (hit, empty) = scan(&unsafe { window::<M, W>(t, pos, false) }, pos, key);
        if hit.is_some() {
            return hit;
        }
        steps += win_n;
        if empty || steps > t.mask {
            return None;
        }
        pos = (pos + win_n) & t.mask;
    }
}

/// [`find`] at width 1 with each window's values read together with its keys, so that a
/// key found in the first window costs one trip to memory rather than two (its key and its
/// value share the bucket's 64 bytes). Returns the key's value.
///
/// # Safety
/// As [`find`], and the table's width is 1.
#[inline(always)]
unsafe fn find_value<M: Mem>(t: &TableArgs, key: u64) -> Option<u64> {
    // SAFETY: forwarded.
    unsafe {
        match window_slots(t.bucket_shift) {
            2 => find_value_in::<M, 2>(t, key),
            _ => find_value_in::<M, 4>(t, key),
        }
    }
}

/// [`find_value`] with windows of `W` slots.
#[inline(always)]
unsafe fn find_value_in<M: Mem, const W: usize>(t: &TableArgs, key: u64) -> Option<u64> {
    let win_n = W as u64;
    let mut pos = probe_start(key, t.seed, t.mask, win_n);
    let mut steps = 0u64;
    loop {
        // SAFETY: pos is a multiple of W below slots; at width 1 the window's rows are
        // W contiguous words after the bucket's keys, 16-byte aligned.
        let (keys, vals) = unsafe {
            (
                window::<M, W>(t, pos, false),
                pairs::<M, W>(row_at(t, pos), false),
            )
        };
        let (hit, empty) = scan(&keys, pos, key);
        if let Some(slot) = hit {
            return Some(pick(&vals, slot - pos));
        }
        steps += win_n;
        if empty || steps > t.mask {
            return None;
        }
        pos = (pos + win_n) & t.mask;
    }
}

/// What a get found for one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Not in the table: the caller writes a row of zeros.
    Missing,
    /// The word address of its value row: the caller copies it.
    Row(u64),
    /// Its value (width 1), read with its key.
    Value(u64),
}

/// Get/contains for item `i`: writes `found_out[i]` and returns where its value is; the
/// caller writes the output row at [`get_row_out`] when `a.values != 0` ([`write_found`],
/// or with its warp).
///
/// # Safety
/// `a` describes valid device buffers and `i < a.n`.
#[inline(always)]
pub unsafe fn get_item<M: Mem>(a: &BatchArgs, i: u64) -> Found {
    let t = &a.table;
    // SAFETY: i < n.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let found = if is_sentinel(key) {
        let sp = special_index(key);
        // SAFETY: the special area holds special_words(width) words.
        if unsafe { M::load(w64(t.special, sp)) } != 0 {
            Found::Row(w64(t.special, special_row(sp, t.width)))
        } else {
            Found::Missing
        }
    } else if t.width == 1 && a.values != 0 {
        // SAFETY: forwarded.
        match unsafe { find_value::<M>(t, key) } {
            Some(v) => Found::Value(v),
            None => Found::Missing,
        }
    } else {
        // SAFETY: forwarded.
        match unsafe { find::<M>(t, key) } {
            Some(slot) => Found::Row(row_at(t, slot)),
            None => Found::Missing,
        }
    };
    // SAFETY: found_out holds n bytes.
    unsafe { M::store_u8(a.found_out + i, (found != Found::Missing) as u8) };
    found
}

/// The word address of item `i`'s output row of a get.
#[inline(always)]
pub fn get_row_out(a: &BatchArgs, i: u64) -> u64 {
    w64(a.values, i * a.table.width as u64)
}

/// Writes item `i`'s output row of a get from what [`get_item`] found.
///
/// # Safety
/// `a.values` holds n rows, `i < n`, and a found row is valid for the table's width.
#[inline(always)]
pub unsafe fn write_found<M: Mem>(a: &BatchArgs, i: u64, found: Found) {
    let (dst, w) = (get_row_out(a, i), a.table.width);
    // SAFETY: forwarded.
    unsafe {
        match found {
            Found::Missing => zero_row::<M>(dst, w),
            Found::Row(src) => copy_row::<M>(dst, src, w),
            Found::Value(v) => M::store(dst, v),
        }
    }
}

/// Count-missing for item `i`: whether its key is not in the table (the special area
/// included). A key that repeats in the batch is counted at each occurrence, so the sum is
/// an upper bound of the batch's new keys: the first step of exact admission
/// (docs/protocol.md, "The books and admission").
///
/// # Safety
/// `a` describes valid device buffers and `i < a.n`.
#[inline(always)]
pub unsafe fn missing_item<M: Mem>(a: &BatchArgs, i: u64) -> bool {
    let t = &a.table;
    // SAFETY: i < n.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    if is_sentinel(key) {
        // SAFETY: the special area holds special_words(width) words.
        unsafe { M::load(w64(t.special, special_index(key))) == 0 }
    } else {
        // SAFETY: forwarded.
        unsafe { find::<M>(t, key) }.is_none()
    }
}

/// What [`delete_item`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// A key of the key array became a tombstone.
    pub table: bool,
    /// A sentinel key left the special area.
    pub special: bool,
}

/// Delete for item `i`. A key repeated in the batch is removed (and counted) once: the
/// second CAS finds a tombstone.
///
/// # Safety
/// `a` describes valid device buffers and `i < a.n`.
#[inline(always)]
pub unsafe fn delete_item<M: Mem>(a: &BatchArgs, i: u64) -> Removed {
    // SAFETY: forwarded.
    unsafe {
        match window_slots(a.table.bucket_shift) {
            2 => delete_in::<M, 2>(a, i),
            _ => delete_in::<M, 4>(a, i),
        }
    }
}

/// [`delete_item`] with windows of `W` slots.
#[inline(always)]
unsafe fn delete_in<M: Mem, const W: usize>(a: &BatchArgs, i: u64) -> Removed {
    let t = &a.table;
    // SAFETY: i < n.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let mut out = Removed::default();
    if is_sentinel(key) {
        // SAFETY: the special area holds special_words(width) words.
        out.special = unsafe { M::exch(w64(t.special, special_index(key)), 0) } != 0;
        return out;
    }
    let win_n = W as u64;
    let mut pos = probe_start(key, t.seed, t.mask, win_n);
    let mut steps = 0u64;
    loop {
        // SAFETY: pos is a multiple of W below slots. Other items only turn keys into
        // tombstones, so a window read here holds the key if the table does.
        let (hit, empty) = scan(&unsafe { window::<M, W>(t, pos, true) }, pos, key);
        if let Some(slot) = hit {
            // SAFETY: slot < slots.
            out.table = unsafe { M::cas(key_at(t, slot), key, TOMBSTONE) } == key;
            return out;
        }
        steps += win_n;
        if empty || steps > t.mask {
            return out;
        }
        pos = (pos + win_n) & t.mask;
    }
}

/// Rehash for old slot `s`: moves its key (if live) and value row into `a.table`.
/// Returns whether a key moved, or `None` if the new table had no room (broken invariant).
///
/// # Safety
/// `a` describes valid device buffers, `s < a.old_slots`, and the new table has fewer live
/// keys than slots.
#[inline(always)]
pub unsafe fn rehash_item<M: Mem>(a: &RehashArgs, s: u64) -> Option<bool> {
    // SAFETY: forwarded.
    unsafe {
        match window_slots(a.table.bucket_shift) {
            2 => rehash_in::<M, 2>(a, s),
            _ => rehash_in::<M, 4>(a, s),
        }
    }
}

/// [`rehash_item`] with windows of `W` slots.
#[inline(always)]
unsafe fn rehash_in<M: Mem, const W: usize>(a: &RehashArgs, s: u64) -> Option<bool> {
    let t = &a.table;
    let shift = a.old_bucket_shift as u32;
    // SAFETY: s < old_slots.
    let key = unsafe { M::load(w64(a.old, key_word(s, t.width, shift))) };
    if is_sentinel(key) {
        return Some(false);
    }
    let win_n = W as u64;
    let mut pos = probe_start(key, t.seed, t.mask, win_n);
    let mut steps = 0u64;
    let (mut win_at, mut win) = (u64::MAX, [0u64; W]);
    loop {
        let start = pos & !(win_n - 1);
        if start != win_at {
            // SAFETY: start + W <= slots.
            win = unsafe { window::<M, W>(t, start, true) };
            win_at = start;
        }
        let cur = pick(&win, pos & (win_n - 1));
        // SAFETY: pos < slots.
        if cur == EMPTY && unsafe { M::cas(key_at(t, pos), EMPTY, key) } == EMPTY {
            // SAFETY: rows in bounds of both tables.
            unsafe {
                copy_row::<M>(
                    row_at(t, pos),
                    w64(a.old, row_word(s, t.width, shift)),
                    t.width,
                )
            };
            return Some(true);
        }
        if steps >= t.mask {
            return None;
        }
        pos = next_slot(pos, t.mask);
        steps += 1;
    }
}

/// Classifies slot `s` for `kv_count`: (live, tombstone).
///
/// # Safety
/// `s` is below the table's slot count.
#[inline(always)]
pub unsafe fn count_item<M: Mem>(t: &TableArgs, s: u64) -> (bool, bool) {
    // SAFETY: s < slots.
    let k = unsafe { M::load(key_at(t, s)) };
    (!is_sentinel(k), k == TOMBSTONE)
}
