//! The kernel entry points (nvptx64 only) and the PTX implementation of [`Mem`] and
//! [`Warp`].
//!
//! Every kernel is a grid-stride loop over one of the per-item functions of [`crate::ops`]
//! (the cache take: a warp per item, over warps; the cache put and get: a group of
//! `GROUP_LANES` lanes per item),
//! launched with 1-D blocks whose size is a multiple of 32 and no divergent early return
//! before the warp-level counter reduction (which uses full-warp `shfl.sync`): the passes
//! that return early when their chunk flag is down do so in every thread of the grid.
//!
//! Atomics are written as inline PTX with `.gpu` scope on the `.global` state space: the
//! table lives in device memory and is only touched by this GPU, so system scope (what
//! `core::sync::atomic` lowers to) would only cost. Generic addresses are converted with
//! `cvta.to.global` inside each asm block.

use core::arch::asm;
use core::arch::nvptx::{_block_dim_x, _block_idx_x, _grid_dim_x, _thread_idx_x};

use crate::layout::{
    BatchArgs, BytesArgs, COOP_WIDTH, CacheArgs, GROUP_LANES, RehashArgs, TableArgs, cache_counter,
    counter, flag,
};
use crate::ops::{self, Found, Group, Mem, Warp, bytes, cache};

/// PTX memory operations.
struct Ptx;

// SAFETY: each method performs exactly the named PTX operation on the given address.
unsafe impl Mem for Ptx {
    #[inline(always)]
    unsafe fn load(addr: u64) -> u64 {
        // SAFETY: the caller guarantees a valid, aligned address.
        unsafe { core::ptr::read(addr as *const u64) }
    }
    #[inline(always)]
    unsafe fn load2_sync(addr: u64) -> [u64; 2] {
        let (a, b): (u64, u64);
        // SAFETY: the caller guarantees a valid, 16-byte aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {p}; ld.relaxed.gpu.global.v2.u64 {{{a}, {b}}}, [ga]; }}",
                p = in(reg64) addr, a = out(reg64) a, b = out(reg64) b,
                options(nostack, readonly)
            )
        };
        [a, b]
    }
    #[inline(always)]
    unsafe fn load2(addr: u64) -> [u64; 2] {
        let (a, b): (u64, u64);
        // SAFETY: the caller guarantees a valid, 16-byte aligned global address of data that
        // the running kernel does not write.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {p}; ld.global.v2.u64 {{{a}, {b}}}, [ga]; }}",
                p = in(reg64) addr, a = out(reg64) a, b = out(reg64) b,
                options(nostack, readonly)
            )
        };
        [a, b]
    }
    #[inline(always)]
    unsafe fn store(addr: u64, v: u64) {
        // SAFETY: the caller guarantees a valid, aligned address.
        unsafe { core::ptr::write(addr as *mut u64, v) }
    }
    #[inline(always)]
    unsafe fn load_u32(addr: u64) -> u32 {
        // SAFETY: the caller guarantees a valid, aligned address.
        unsafe { core::ptr::read(addr as *const u32) }
    }
    #[inline(always)]
    unsafe fn store_u32(addr: u64, v: u32) {
        // SAFETY: the caller guarantees a valid, aligned address.
        unsafe { core::ptr::write(addr as *mut u32, v) }
    }
    #[inline(always)]
    unsafe fn load_u8(addr: u64) -> u8 {
        // SAFETY: the caller guarantees a valid address.
        unsafe { core::ptr::read(addr as *const u8) }
    }
    #[inline(always)]
    unsafe fn store_u8(addr: u64, v: u8) {
        // SAFETY: the caller guarantees a valid address.
        unsafe { core::ptr::write(addr as *mut u8, v) }
    }
    #[inline(always)]
    unsafe fn cas(addr: u64, current: u64, new: u64) -> u64 {
        let old: u64;
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; atom.relaxed.gpu.global.cas.b64 {o}, [ga], {c}, {n}; }}",
                a = in(reg64) addr, c = in(reg64) current, n = in(reg64) new, o = out(reg64) old,
                options(nostack)
            )
        };
        old
    }
    #[inline(always)]
    unsafe fn cas_u32(addr: u64, current: u32, new: u32) -> u32 {
        let old: u32;
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; atom.relaxed.gpu.global.cas.b32 {o}, [ga], {c}, {n}; }}",
                a = in(reg64) addr, c = in(reg32) current, n = in(reg32) new, o = out(reg32) old,
                options(nostack)
            )
        };
        old
    }
    #[inline(always)]
    unsafe fn exch(addr: u64, v: u64) -> u64 {
        let old: u64;
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; atom.relaxed.gpu.global.exch.b64 {o}, [ga], {v}; }}",
                a = in(reg64) addr, v = in(reg64) v, o = out(reg64) old,
                options(nostack)
            )
        };
        old
    }
    #[inline(always)]
    unsafe fn max_u64(addr: u64, v: u64) {
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; red.relaxed.gpu.global.max.u64 [ga], {v}; }}",
                a = in(reg64) addr, v = in(reg64) v,
                options(nostack)
            )
        }
    }
    #[inline(always)]
    unsafe fn max_u32(addr: u64, v: u32) {
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; red.relaxed.gpu.global.max.u32 [ga], {v}; }}",
                a = in(reg64) addr, v = in(reg32) v,
                options(nostack)
            )
        }
    }
    #[inline(always)]
    unsafe fn add(addr: u64, v: u64) {
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; red.relaxed.gpu.global.add.u64 [ga], {v}; }}",
                a = in(reg64) addr, v = in(reg64) v,
                options(nostack)
            )
        }
    }
    #[inline(always)]
    unsafe fn load_sync(addr: u64) -> u64 {
        let v: u64;
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {p}; ld.relaxed.gpu.global.u64 {v}, [ga]; }}",
                p = in(reg64) addr, v = out(reg64) v,
                options(nostack, readonly)
            )
        };
        v
    }
    #[inline(always)]
    unsafe fn load_u32_sync(addr: u64) -> u32 {
        let v: u32;
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {p}; ld.relaxed.gpu.global.u32 {v}, [ga]; }}",
                p = in(reg64) addr, v = out(reg32) v,
                options(nostack, readonly)
            )
        };
        v
    }
    #[inline(always)]
    unsafe fn fetch_add(addr: u64, v: u64) -> u64 {
        let old: u64;
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; atom.relaxed.gpu.global.add.u64 {o}, [ga], {v}; }}",
                a = in(reg64) addr, v = in(reg64) v, o = out(reg64) old,
                options(nostack)
            )
        };
        old
    }
    #[inline(always)]
    unsafe fn add_u32(addr: u64, v: u32) {
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; red.relaxed.gpu.global.add.u32 [ga], {v}; }}",
                a = in(reg64) addr, v = in(reg32) v,
                options(nostack)
            )
        }
    }
    #[inline(always)]
    unsafe fn and_u32(addr: u64, v: u32) -> u32 {
        let old: u32;
        // SAFETY: the caller guarantees a valid, aligned global address.
        unsafe {
            asm!(
                "{{ .reg .b64 ga; cvta.to.global.u64 ga, {a}; atom.relaxed.gpu.global.and.b32 {o}, [ga], {v}; }}",
                a = in(reg64) addr, v = in(reg32) v, o = out(reg32) old,
                options(nostack)
            )
        };
        old
    }
    #[inline(always)]
    unsafe fn fence() {
        // SAFETY: a fence has no operands; it is a memory clobber (no `nomem`), so the
        // compiler keeps every memory access on its side.
        unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) }
    }
}

// SAFETY: each lane holds its own value; the collectives are full-warp `vote.sync`,
// `shfl.sync` and `bar.warp.sync` with the mask of all 32 lanes, which every caller reaches
// together (the trait's contract).
unsafe impl Warp for Ptx {
    type Lanes<T: Copy> = T;
    #[inline(always)]
    fn lanes<T: Copy>(mut f: impl FnMut(u32) -> T) -> T {
        f(lane())
    }
    #[inline(always)]
    fn map<T: Copy, U: Copy>(v: T, mut f: impl FnMut(u32, T) -> U) -> U {
        f(lane(), v)
    }
    #[inline(always)]
    unsafe fn ballot(v: bool) -> u32 {
        let m: u32;
        // SAFETY: a full-warp vote; all 32 lanes reach it (the caller's guarantee).
        unsafe {
            asm!(
                "{{ .reg .pred p; setp.ne.u32 p, {v}, 0; vote.sync.ballot.b32 {m}, p, -1; }}",
                v = in(reg32) v as u32, m = out(reg32) m,
                options(nostack, nomem)
            )
        };
        m
    }
    #[inline(always)]
    unsafe fn shfl(v: u64, src: u32) -> u64 {
        shfl_u64(v, src)
    }
    #[inline(always)]
    unsafe fn min(mut v: u64) -> u64 {
        let mut off = 16u32;
        while off > 0 {
            v = v.min(shfl_xor_u64(v, off));
            off >>= 1;
        }
        v
    }
    #[inline(always)]
    unsafe fn one(f: impl FnOnce() -> u64) -> u64 {
        let v = if lane() == 0 { f() } else { 0 };
        shfl_u64(v, 0)
    }
    #[inline(always)]
    unsafe fn sync() {
        // SAFETY: a full-warp barrier; all 32 lanes reach it. It has no `nomem`: memory
        // accesses stay on their side of it (it orders memory between the lanes).
        unsafe { asm!("bar.warp.sync -1;", options(nostack)) }
    }
}

/// The lanes of this thread's group: `GROUP_LANES` bits from the group's first lane.
#[inline(always)]
fn group_mask() -> u32 {
    let first = lane() & !(GROUP_LANES - 1);
    (((1u64 << GROUP_LANES) - 1) as u32) << first
}

// SAFETY: a lane's `GroupLanes` value is its own; `group_or` is a butterfly of the group's
// lanes (offsets below GROUP_LANES stay inside an aligned group), synchronised on the
// group's lanes alone, so the other groups of the warp may be elsewhere.
unsafe impl Group for Ptx {
    type GroupLanes<T: Copy> = T;
    #[inline(always)]
    fn group_lanes<T: Copy>(mut f: impl FnMut(u32) -> T) -> T {
        f(lane() & (GROUP_LANES - 1))
    }
    #[inline(always)]
    fn group_map<T: Copy, U: Copy>(v: T, mut f: impl FnMut(u32, T) -> U) -> U {
        f(lane() & (GROUP_LANES - 1), v)
    }
    #[inline(always)]
    unsafe fn group_or(mut v: u32) -> u32 {
        let m = group_mask();
        let mut off = GROUP_LANES / 2;
        while off > 0 {
            let o: u32;
            // SAFETY: every lane of the group reaches it (the caller's guarantee), and the
            // member mask names exactly those lanes.
            unsafe {
                asm!(
                    "shfl.sync.bfly.b32 {o}, {v}, {off}, 31, {m};",
                    o = out(reg32) o, v = in(reg32) v, off = in(reg32) off, m = in(reg32) m,
                    options(nostack, nomem)
                )
            };
            v |= o;
            off >>= 1;
        }
        v
    }
    #[inline(always)]
    unsafe fn group_min(mut v: u64) -> u64 {
        let m = group_mask();
        let mut off = GROUP_LANES / 2;
        while off > 0 {
            let (lo, hi): (u32, u32);
            // SAFETY: as in `group_or`.
            unsafe {
                asm!(
                    "shfl.sync.bfly.b32 {l}, {vl}, {off}, 31, {m};",
                    "shfl.sync.bfly.b32 {h}, {vh}, {off}, 31, {m};",
                    l = out(reg32) lo, h = out(reg32) hi,
                    vl = in(reg32) v as u32, vh = in(reg32) (v >> 32) as u32,
                    off = in(reg32) off, m = in(reg32) m,
                    options(nostack, nomem)
                )
            };
            v = v.min((hi as u64) << 32 | lo as u64);
            off >>= 1;
        }
        v
    }
    #[inline(always)]
    unsafe fn group_shfl(v: u64, src: u32) -> u64 {
        let m = group_mask();
        let from = (lane() & !(GROUP_LANES - 1)) + (src & (GROUP_LANES - 1));
        let (lo, hi): (u32, u32);
        // SAFETY: every lane of the group reaches it, and the member mask names them; the
        // source lane is one of them.
        unsafe {
            asm!(
                "shfl.sync.idx.b32 {l}, {vl}, {s}, 31, {m};",
                "shfl.sync.idx.b32 {h}, {vh}, {s}, 31, {m};",
                l = out(reg32) lo, h = out(reg32) hi,
                vl = in(reg32) v as u32, vh = in(reg32) (v >> 32) as u32,
                s = in(reg32) from, m = in(reg32) m,
                options(nostack, nomem)
            )
        };
        (hi as u64) << 32 | lo as u64
    }
    #[inline(always)]
    unsafe fn group_one(f: impl FnOnce() -> u64) -> u64 {
        let v = if lane() & (GROUP_LANES - 1) == 0 {
            f()
        } else {
            0
        };
        // SAFETY: forwarded: the whole group calls it.
        unsafe { Self::group_shfl(v, 0) }
    }
    #[inline(always)]
    unsafe fn group_sync() {
        let m = group_mask();
        // SAFETY: a barrier of the group's lanes, all of which reach it. It has no `nomem`:
        // memory accesses stay on their side of it (it orders memory between the lanes).
        unsafe { asm!("bar.warp.sync {m};", m = in(reg32) m, options(nostack)) }
    }
}

/// `v` of lane `lane() ^ mask`. All 32 lanes must call it.
#[inline(always)]
fn shfl_xor_u64(v: u64, mask: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: full-warp shuffles; callers run in warp-uniform control flow.
    unsafe {
        asm!(
            "shfl.sync.bfly.b32 {l}, {vl}, {m}, 31, -1;",
            "shfl.sync.bfly.b32 {h}, {vh}, {m}, 31, -1;",
            l = out(reg32) lo, h = out(reg32) hi,
            vl = in(reg32) v as u32, vh = in(reg32) (v >> 32) as u32, m = in(reg32) mask,
            options(nostack, nomem)
        )
    };
    (hi as u64) << 32 | lo as u64
}

/// This thread's first item and the grid stride.
#[inline(always)]
fn grid() -> (u64, u64) {
    // SAFETY: reading special registers has no preconditions.
    unsafe {
        let bd = _block_dim_x() as u64;
        (
            _block_idx_x() as u64 * bd + _thread_idx_x() as u64,
            _grid_dim_x() as u64 * bd,
        )
    }
}

/// Sum of `v` over the warp (every lane gets it). All 32 lanes must call it.
#[inline(always)]
fn warp_sum(mut v: u32) -> u32 {
    let mut off = 16u32;
    while off > 0 {
        let o: u32;
        // SAFETY: full-warp shuffle; every kernel calls this from all 32 lanes (no divergent
        // early return).
        unsafe {
            asm!(
                "shfl.sync.bfly.b32 {o}, {v}, {off}, 31, -1;",
                o = out(reg32) o, v = in(reg32) v, off = in(reg32) off,
                options(nostack, nomem)
            )
        };
        v = v.wrapping_add(o);
        off >>= 1;
    }
    v
}

/// This thread's lane in its warp.
#[inline(always)]
fn lane() -> u32 {
    let l: u32;
    // SAFETY: reading %laneid has no preconditions.
    unsafe { asm!("mov.u32 {l}, %laneid;", l = out(reg32) l, options(nostack, nomem, pure)) };
    l
}

/// `v` of lane `src` (every lane may ask for another). All 32 lanes must call it.
#[inline(always)]
fn shfl_u64(v: u64, src: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: full-warp shuffles; callers run in warp-uniform control flow.
    unsafe {
        asm!(
            "shfl.sync.idx.b32 {l}, {vl}, {s}, 31, -1;",
            "shfl.sync.idx.b32 {h}, {vh}, {s}, 31, -1;",
            l = out(reg32) lo, h = out(reg32) hi,
            vl = in(reg32) v as u32, vh = in(reg32) (v >> 32) as u32, s = in(reg32) src,
            options(nostack, nomem)
        )
    };
    (hi as u64) << 32 | lo as u64
}

/// Runs `f(i, valid)` over this thread's items of a grid-stride loop in turns that are the
/// same for every lane of its warp (lanes past `n` get `valid == false`), so that `f` may
/// use full-warp operations.
#[inline(always)]
fn for_warp_items(n: u64, mut f: impl FnMut(u64, bool)) {
    let (first, stride) = grid();
    let mut base = first - lane() as u64;
    while base < n {
        let i = base + lane() as u64;
        f(i, i < n);
        base += stride;
    }
}

/// Copies every lane's row of `width` words from `src` to `dst` (word addresses; `dst == 0`:
/// no row; `src == 0`: a row of zeros) with the whole warp: `32 / width` rows at a time
/// (one per group of `width` lanes, each lane a word), or one row at a time for rows wider
/// than 32 words, so that each load and store is a coalesced run of a row. All 32 lanes
/// must call it, with the same `width`.
#[inline(always)]
fn warp_copy_rows(dst: u64, src: u64, width: u32) {
    // Rows are at least one word wide (the host refuses width 0); max(1) spares the
    // divisions below a zero check.
    let width = width.max(1);
    let me = lane();
    let (group, word, groups) = if width <= 32 {
        (me / width, (me % width) as u64, 32 / width)
    } else {
        (0, me as u64, 1)
    };
    let mut r = 0u32;
    while r < 32 {
        // Lanes past the last group ask for lane 31's row and copy nothing.
        let owner = (r + group).min(31);
        let (d, s) = (shfl_u64(dst, owner), shfl_u64(src, owner));
        if group < groups && r + group < 32 && d != 0 {
            let mut j = word;
            while j < width as u64 {
                // SAFETY: the owner lane's row is valid for `width` words (its caller's
                // guarantee), and j < width.
                unsafe {
                    let v = if s == 0 { 0 } else { Ptx::load(s + j * 8) };
                    Ptx::store(d + j * 8, v);
                }
                j += if width <= 32 { width as u64 } else { 32 };
            }
        }
        r += groups;
    }
}

/// Adds the warp's total of `v` to counter `index` (one atomic per warp).
#[inline(always)]
fn count(t: &TableArgs, index: usize, v: u32) {
    count_at(t.counters, index, v)
}

/// Adds the warp's total of `v` to word `index` of the counter buffer at `counters` (one
/// atomic per warp). All 32 lanes must call it.
#[inline(always)]
fn count_at(counters: u64, index: usize, v: u32) {
    let s = warp_sum(v);
    if s != 0 && lane() == 0 {
        // SAFETY: callers pass their counter buffer, which holds `index`.
        unsafe { Ptx::add(counters + index as u64 * 8, s as u64) };
    }
}

/// Put pass 1: every key places itself and writes its row (by itself, for rows narrower
/// than [`COOP_WIDTH`] words); sentinel keys record their last index; raise FOUND if some
/// key was already in the table.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_put_place(a: BatchArgs) {
    // SAFETY: forwarded.
    unsafe { place::<false>(a) }
}

/// [`kv_put_place`] for rows of [`COOP_WIDTH`] words or more, written by the whole warp.
/// A kernel of its own, so that the narrow one keeps fewer registers.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_put_place_wide(a: BatchArgs) {
    // SAFETY: forwarded.
    unsafe { place::<true>(a) }
}

/// Put pass 1, rows copied by their thread or (`COOP`) by the warp.
#[inline(always)]
unsafe fn place<const COOP: bool>(a: BatchArgs) {
    let (mut inserted, mut from_empty, mut found, mut overflow) = (0u32, 0u32, 0u32, 0u32);
    let width = a.table.width;
    for_warp_items(a.n, |i, valid| {
        let mut row = (0, 0);
        if valid {
            // SAFETY: the host passes valid buffers for n items and zeroed flags.
            let p = unsafe { ops::put_place::<Ptx>(&a, i) };
            inserted += p.inserted as u32;
            from_empty += p.from_empty as u32;
            found += p.found as u32;
            overflow += p.overflow as u32;
            if let Some(slot) = p.slot {
                row = ops::put_row(&a, i, slot);
            }
        }
        if COOP {
            warp_copy_rows(row.0, row.1, width);
        } else if row.0 != 0 {
            // SAFETY: both rows are in bounds (slot < slots, i < n).
            unsafe { ops::copy_row::<Ptx>(row.0, row.1, width) };
        }
    });
    if warp_sum(found) != 0 && lane() == 0 {
        // SAFETY: the flag buffer holds flag::LEN words.
        unsafe { ops::raise_flag::<Ptx>(&a, flag::FOUND) };
    }
    count(&a.table, counter::INSERTED, inserted);
    count(&a.table, counter::FROM_EMPTY, from_empty);
    count(&a.table, counter::ERRORS, overflow);
}

/// Put pass 2: thread 0 applies the sentinel keys; when FOUND is raised, zero the
/// chunk-local table for pass 3.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_put_settle(a: BatchArgs) {
    let (mut s, stride) = grid();
    if s == 0 {
        // SAFETY: the host passes valid buffers for n items; pass 1 ran.
        unsafe { ops::put_specials::<Ptx>(&a) };
    }
    // SAFETY: the flag buffer holds flag::LEN words.
    if !unsafe { ops::flag_raised::<Ptx>(&a, flag::FOUND) } {
        return;
    }
    while s <= a.local_mask {
        // SAFETY: s <= local_mask.
        unsafe { ops::clear_local::<Ptx>(&a, s) };
        s += stride;
    }
}

/// Put pass 3 (when FOUND is raised): every key into the chunk-local table (last
/// occurrence per key); raise DUP if the chunk repeats a key.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_put_dedup(a: BatchArgs) {
    // SAFETY: the flag buffer holds flag::LEN words.
    if !unsafe { ops::flag_raised::<Ptx>(&a, flag::FOUND) } {
        return;
    }
    let (mut i, stride) = grid();
    let (mut repeats, mut overflow) = (0u32, 0u32);
    while i < a.n {
        // SAFETY: the host passes valid buffers for n items; pass 2 zeroed the local table.
        let d = unsafe { ops::put_dedup::<Ptx>(&a, i) };
        repeats += d.repeat as u32;
        overflow += d.overflow as u32;
        i += stride;
    }
    if warp_sum(repeats) != 0 && lane() == 0 {
        // SAFETY: the flag buffer holds flag::LEN words.
        unsafe { ops::raise_flag::<Ptx>(&a, flag::DUP) };
    }
    count(&a.table, counter::ERRORS, overflow);
}

/// Put pass 4 (when DUP is raised): the last occurrence of every repeated key writes its
/// row again.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_put_rewrite(a: BatchArgs) {
    // SAFETY: the flag buffer holds flag::LEN words.
    if !unsafe { ops::flag_raised::<Ptx>(&a, flag::DUP) } {
        return;
    }
    let (mut i, stride) = grid();
    let mut missing = 0u32;
    while i < a.n {
        // SAFETY: the host passes valid buffers for n items; pass 3 ran.
        let r = unsafe { ops::put_rewrite::<Ptx>(&a, i) };
        missing += r.missing as u32;
        if let Some(slot) = r.slot {
            let (dst, src) = ops::put_row(&a, i, slot);
            // SAFETY: both rows are in bounds (slot < slots, i < n).
            unsafe { ops::copy_row::<Ptx>(dst, src, a.table.width) };
        }
        i += stride;
    }
    count(&a.table, counter::ERRORS, missing);
}

/// Get: value rows (zeros when missing) and found flags.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_get(a: BatchArgs) {
    let width = a.table.width;
    if width < COOP_WIDTH {
        let (mut i, stride) = grid();
        while i < a.n {
            // SAFETY: the host passes valid buffers for n items.
            unsafe {
                let f = ops::get_item::<Ptx>(&a, i);
                ops::write_found::<Ptx>(&a, i, f);
            }
            i += stride;
        }
        return;
    }
    for_warp_items(a.n, |i, valid| {
        let (mut dst, mut src) = (0, 0);
        if valid {
            // SAFETY: the host passes valid buffers for n items.
            if let Found::Row(s) = unsafe { ops::get_item::<Ptx>(&a, i) } {
                src = s;
            }
            dst = ops::get_row_out(&a, i);
        }
        warp_copy_rows(dst, src, width);
    });
}

/// Contains: found flags only (`a.values` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_contains(a: BatchArgs) {
    let a = BatchArgs { values: 0, ..a };
    let (mut i, stride) = grid();
    while i < a.n {
        // SAFETY: the host passes valid buffers for n items.
        let _ = unsafe { ops::get_item::<Ptx>(&a, i) };
        i += stride;
    }
}

/// Count-missing: count the keys not in the table (every occurrence), for admission.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_count_missing(a: BatchArgs) {
    let (mut i, stride) = grid();
    let mut missing = 0u32;
    while i < a.n {
        // SAFETY: the host passes valid buffers for n items.
        missing += unsafe { ops::missing_item::<Ptx>(&a, i) } as u32;
        i += stride;
    }
    count(&a.table, counter::MISSING, missing);
}

/// Delete: tombstone every key found; count removals.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_delete(a: BatchArgs) {
    let (mut i, stride) = grid();
    let (mut removed, mut spec_removed) = (0u32, 0u32);
    while i < a.n {
        // SAFETY: the host passes valid buffers for n items.
        let r = unsafe { ops::delete_item::<Ptx>(&a, i) };
        removed += r.table as u32;
        spec_removed += r.special as u32;
        i += stride;
    }
    count(&a.table, counter::REMOVED, removed);
    count(&a.table, counter::SPEC_REMOVED, spec_removed);
}

/// Rehash: move every live key of the old arrays into the (EMPTY-filled) new table.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_rehash(a: RehashArgs) {
    let (mut s, stride) = grid();
    let (mut moved, mut overflow) = (0u32, 0u32);
    while s < a.old_slots {
        // SAFETY: the host passes valid buffers for old_slots slots.
        match unsafe { ops::rehash_item::<Ptx>(&a, s) } {
            Some(m) => moved += m as u32,
            None => overflow += 1,
        }
        s += stride;
    }
    count(&a.table, counter::MOVED, moved);
    count(&a.table, counter::ERRORS, overflow);
}

/// Count: live keys and tombstones of the key array (for checks and diagnostics).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_count(a: TableArgs) {
    let (mut s, stride) = grid();
    let (mut live, mut tombs) = (0u32, 0u32);
    while s <= a.mask {
        // SAFETY: s < slots.
        let (l, t) = unsafe { ops::count_item::<Ptx>(&a, s) };
        live += l as u32;
        tombs += t as u32;
        s += stride;
    }
    count(&a, counter::LIVE, live);
    count(&a, counter::TOMBS, tombs);
}

/// Cache put, pass 1 (`CacheArgs`): every key into the batch-local table, so that the put
/// pass knows each key's last occurrence and its count (or, for a take, its first).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_cache_dedup(a: CacheArgs) {
    let (mut i, stride) = grid();
    let mut lost = 0u32;
    while i < a.n {
        // SAFETY: the host passes valid buffers for n items and a zeroed local table.
        lost += !unsafe { cache::dedup::<Ptx>(&a, i) } as u32;
        i += stride;
    }
    count_at(a.table.counters, cache_counter::ERRORS, lost);
}

/// Runs `f(i)` for the items of a grid-stride loop over warps: a warp per item, every lane
/// with the same `i` (block sizes are multiples of 32), so that `f` may be a warp-cooperative
/// function of [`cache`].
#[inline(always)]
fn for_each_warp_item(n: u64, mut f: impl FnMut(u64)) {
    let (first, stride) = grid();
    let (mut i, step) = (first / 32, stride / 32);
    while i < n {
        f(i);
        i += step;
    }
}

/// Cache put, pass 2 (`CacheArgs`; a group of `GROUP_LANES` lanes per item, launched with
/// `GROUP_LANES * n` threads; `cache::put_items` over each group's items): the last
/// occurrence of every key applies it under its bucket's lock. Each item's report (an entry it evicted or its own, turned away) is
/// counted in EVICTED (summed per warp) and, when the put wants them, written to place `i`
/// of the eviction scratch with the item's flag (every item writes its flag).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_cache_put(a: CacheArgs) {
    let (mut reused, mut lost, mut reported) = (0u32, 0u32, 0u32);
    let first = lane() & (GROUP_LANES - 1) == 0;
    // SAFETY: the host passes valid buffers for n items; the dedup pass ran; the lock words
    // are zero between kernels; the whole group walks the same items.
    unsafe {
        cache::put_items::<Ptx>(&a, group_items(a.n), |p| {
            reused += (first && p.expired_reused) as u32;
            lost += (first && p.lost) as u32;
            reported += (first && p.evicted) as u32;
        })
    };
    count_at(a.table.counters, cache_counter::EXPIRED_REUSED, reused);
    count_at(a.table.counters, cache_counter::ERRORS, lost);
    count_at(a.table.counters, cache_counter::EVICTED, reported);
}

/// Cache put, pass 3 (`CacheArgs`, when the put wants its evicted entries; a thread per
/// item): each warp moves its 32 items' reports from the eviction scratch to the next
/// places of the evicted outputs.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_cache_compact(a: CacheArgs) {
    for_warp_items(a.n, |i, _| {
        // SAFETY: the host passes the scratch the put pass wrote and outputs for n
        // entries; the whole warp calls it with its first item.
        unsafe { cache::compact::<Ptx>(&a, i - u64::from(lane())) };
    });
}

/// This thread's group's items of a grid-stride loop over lane groups: a group of
/// `GROUP_LANES` lanes per item, every lane of a group with the same items (block sizes are
/// multiples of 32), so that the group may run a group-cooperative function of [`cache`]
/// on each.
#[inline(always)]
fn group_items(n: u64) -> core::iter::StepBy<core::ops::Range<u64>> {
    let (start, stride) = grid();
    let g = u64::from(GROUP_LANES);
    (start / g..n).step_by((stride / g) as usize)
}

/// Cache get, peek and contains (`CacheArgs`; `access` says whether it is a get; a group of
/// `GROUP_LANES` lanes per item, two items at a time, launched with `GROUP_LANES * n`
/// threads at most).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_cache_get(a: CacheArgs) {
    let (mut hits, mut misses) = (0u32, 0u32);
    let first = lane() & (GROUP_LANES - 1) == 0;
    let mut count = |hit: bool| {
        hits += (first && hit) as u32;
        misses += (first && !hit) as u32;
    };
    // Two items a group at a time (their reads interleaved), the last one alone.
    for p in group_items(a.n.div_ceil(2)) {
        // SAFETY: the host passes valid buffers for n items; 2p < n; the whole group calls
        // it with the same p.
        let (x, y) = unsafe { cache::lookup_pair::<Ptx>(&a, p) };
        count(x);
        if let Some(y) = y {
            count(y);
        }
    }
    if a.access != 0 {
        count_at(a.table.counters, cache_counter::HITS, hits);
        count_at(a.table.counters, cache_counter::MISSES, misses);
    }
}

/// Cache take and delete (`CacheArgs`; a warp per item, launched with `32 n` threads):
/// remove each key's live entry, once per key.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_cache_take(a: CacheArgs) {
    let mut removed = 0u32;
    let first = lane() == 0;
    for_each_warp_item(a.n, |i| {
        // SAFETY: the host passes valid buffers for n items; the dedup pass ran if pick is
        // set; the whole warp calls it with the same i (every lane, before the lane test).
        let took = unsafe { cache::take::<Ptx>(&a, i) };
        removed += (first && took) as u32;
    });
    count_at(a.table.counters, cache_counter::REMOVED, removed);
}

/// Cache count (`CacheArgs`, `n` = buckets): live entries at `now`.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_cache_count(a: CacheArgs) {
    let (mut b, stride) = grid();
    let mut live = 0u32;
    while b < a.table.buckets {
        // SAFETY: b < buckets.
        live += unsafe { cache::count_live::<Ptx>(&a, b) };
        b += stride;
    }
    count_at(a.table.counters, cache_counter::LIVE, live);
}

/// Runs `f(i)` for `i < n`, a thread per item (grid-stride).
#[inline(always)]
fn for_items(n: u64, mut f: impl FnMut(u64)) {
    let (mut i, stride) = grid();
    while i < n {
        f(i);
        i += stride;
    }
}

/// Byte tables: each key's hash (`BytesArgs`, a thread per key).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_hash(a: BytesArgs) {
    // SAFETY: the host passes valid buffers for n items.
    for_items(a.n, |i| unsafe { bytes::hash_item::<Ptx>(&a, i) });
}

/// Byte tables: each key into the batch-local dedup table (a thread per key).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_dedup(a: BytesArgs) {
    // SAFETY: the host passes valid buffers for n items and zeroed local tables.
    for_items(a.n, |i| {
        let _ = unsafe { bytes::dedup_item::<Ptx>(&a, i) };
    });
}

/// Byte tables: each key's slot, value length, expiry and winner flag (a thread per key).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_lookup(a: BytesArgs) {
    // SAFETY: the host passes valid buffers for n items.
    for_items(a.n, |i| {
        let _ = unsafe { bytes::lookup_item::<Ptx>(&a, i) };
    });
}

/// Byte tables: each winner's record into the arena and its slot (a warp per key).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_write(a: BytesArgs) {
    // SAFETY: the host passes valid buffers for n items; the whole warp runs each item.
    for_each_warp_item(a.n, |i| unsafe { bytes::write_item::<Ptx>(&a, i) });
}

/// Byte tables: each found key's value bytes out (a warp per key).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_get(a: BytesArgs) {
    // SAFETY: the host passes valid buffers for n items; the whole warp runs each item.
    for_each_warp_item(a.n, |i| unsafe { bytes::get_item::<Ptx>(&a, i) });
}

/// Byte tables: delete (a thread per key).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_delete(a: BytesArgs) {
    // SAFETY: the host passes valid buffers for n items.
    for_items(a.n, |i| {
        let _ = unsafe { bytes::delete_item::<Ptx>(&a, i) };
    });
}

/// Byte tables: set expiry times (a thread per key).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_set_expiry(a: BytesArgs) {
    // SAFETY: the host passes valid buffers for n items.
    for_items(a.n, |i| unsafe { bytes::set_expiry_item::<Ptx>(&a, i) });
}

/// Byte tables: remove expired entries (a thread per index slot, `n` = slots).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_purge(a: BytesArgs) {
    // SAFETY: n = mask + 1; the lists hold room for every entry.
    for_items(a.n, |s| unsafe { bytes::purge_item::<Ptx>(&a, s) });
}

/// Byte tables: list the live records of compaction's victims (a thread per index slot).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_gather(a: BytesArgs) {
    // SAFETY: n = mask + 1; the lists hold room for every entry.
    for_items(a.n, |s| unsafe { bytes::gather_item::<Ptx>(&a, s) });
}

/// Byte tables: move listed records (a warp per record).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_move(a: BytesArgs) {
    // SAFETY: the host passes n listed records with their new places.
    for_each_warp_item(a.n, |k| unsafe { bytes::move_item::<Ptx>(&a, k) });
}

/// Byte tables: rehash the old index (`n` old slots) into the new one.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn kv_bytes_rehash(a: BytesArgs) {
    // SAFETY: the host passes the old array of n slots and a zeroed new one.
    for_items(a.n, |s| unsafe { bytes::rehash_item::<Ptx>(&a, s) });
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: trap aborts the kernel; nothing in the kernels can panic, this is a backstop.
    unsafe { core::arch::nvptx::trap() }
}

// The flag indices used above must match the layout module.
const _: () = assert!(flag::DUP == 0 && flag::SPEC_WIN == 1 && flag::FOUND == 3);
