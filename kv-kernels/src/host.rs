//! Running the kernels' per-item algorithms on the CPU: [`Host`], the memory operations
//! ([`Mem`]) over host memory and a warp's collectives ([`Warp`]) played by one thread. This crate's tests use it, and so does the CUDA backend's
//! host mirror of its cache kernels, which runs the conformance suite without a GPU.

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering, Ordering::Relaxed};

use crate::layout::GROUP_LANES;
use crate::ops::{Group, Mem, Warp};

/// [`Mem`] over host memory: relaxed atomics stand in for the device's plain and atomic
/// accesses, so that the algorithms of [`crate::ops`] run on the CPU, sequentially or on
/// several threads racing as a kernel's would, with no undefined behaviour. As [`Warp`], one
/// host thread plays a whole warp: its 32 lanes in turn at each step.
pub struct Host;

fn a64(addr: u64) -> &'static AtomicU64 {
    // SAFETY: `Mem`'s callers pass addresses of live, aligned buffers of the type.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}
fn a32(addr: u64) -> &'static AtomicU32 {
    // SAFETY: as above, for u32 buffers.
    unsafe { AtomicU32::from_ptr(addr as *mut u32) }
}
fn a8(addr: u64) -> &'static AtomicU8 {
    // SAFETY: as above, for u8 buffers.
    unsafe { AtomicU8::from_ptr(addr as *mut u8) }
}

// SAFETY: every method performs the named operation (relaxed atomics stand in for plain
// accesses, so that racing threads are not undefined behaviour on the host).
unsafe impl Mem for Host {
    unsafe fn load(addr: u64) -> u64 {
        a64(addr).load(Relaxed)
    }
    unsafe fn load2_sync(addr: u64) -> [u64; 2] {
        assert_eq!(addr % 16, 0, "pair loads are 16-byte aligned");
        [a64(addr).load(Relaxed), a64(addr + 8).load(Relaxed)]
    }
    unsafe fn load2(addr: u64) -> [u64; 2] {
        assert_eq!(addr % 16, 0, "pair loads are 16-byte aligned");
        [a64(addr).load(Relaxed), a64(addr + 8).load(Relaxed)]
    }
    unsafe fn store(addr: u64, v: u64) {
        a64(addr).store(v, Relaxed)
    }
    unsafe fn load_u32(addr: u64) -> u32 {
        a32(addr).load(Relaxed)
    }
    unsafe fn store_u32(addr: u64, v: u32) {
        a32(addr).store(v, Relaxed)
    }
    unsafe fn load_u8(addr: u64) -> u8 {
        a8(addr).load(Relaxed)
    }
    unsafe fn store_u8(addr: u64, v: u8) {
        a8(addr).store(v, Relaxed)
    }
    unsafe fn cas(addr: u64, current: u64, new: u64) -> u64 {
        match a64(addr).compare_exchange(current, new, Relaxed, Relaxed) {
            Ok(v) | Err(v) => v,
        }
    }
    unsafe fn cas_u32(addr: u64, current: u32, new: u32) -> u32 {
        match a32(addr).compare_exchange(current, new, Relaxed, Relaxed) {
            Ok(v) | Err(v) => v,
        }
    }
    unsafe fn exch(addr: u64, v: u64) -> u64 {
        a64(addr).swap(v, Relaxed)
    }
    unsafe fn max_u64(addr: u64, v: u64) {
        a64(addr).fetch_max(v, Relaxed);
    }
    unsafe fn max_u32(addr: u64, v: u32) {
        a32(addr).fetch_max(v, Relaxed);
    }
    unsafe fn add(addr: u64, v: u64) {
        a64(addr).fetch_add(v, Relaxed);
    }
    unsafe fn load_sync(addr: u64) -> u64 {
        a64(addr).load(Relaxed)
    }
    unsafe fn load_u32_sync(addr: u64) -> u32 {
        a32(addr).load(Relaxed)
    }
    unsafe fn fetch_add(addr: u64, v: u64) -> u64 {
        a64(addr).fetch_add(v, Relaxed)
    }
    unsafe fn add_u32(addr: u64, v: u32) {
        a32(addr).fetch_add(v, Relaxed);
    }
    unsafe fn and_u32(addr: u64, v: u32) -> u32 {
        a32(addr).fetch_and(v, Relaxed)
    }
    unsafe fn fence() {
        core::sync::atomic::fence(Ordering::SeqCst);
    }
}

// SAFETY: one host thread is one warp: a `Lanes` holds the 32 lanes' values, `lanes` runs
// lane 0 to 31 in turn, and each collective computes from all 32 values what the device's
// instruction gives every lane. A barrier between lanes of one thread needs nothing.
unsafe impl Warp for Host {
    type Lanes<T: Copy> = [T; 32];
    fn lanes<T: Copy>(mut f: impl FnMut(u32) -> T) -> [T; 32] {
        core::array::from_fn(|l| f(l as u32))
    }
    fn map<T: Copy, U: Copy>(v: [T; 32], mut f: impl FnMut(u32, T) -> U) -> [U; 32] {
        core::array::from_fn(|l| f(l as u32, v[l]))
    }
    unsafe fn ballot(v: [bool; 32]) -> u32 {
        v.iter()
            .enumerate()
            .fold(0, |m, (l, &b)| m | (u32::from(b) << l))
    }
    unsafe fn shfl(v: [u64; 32], src: u32) -> u64 {
        v[(src & 31) as usize]
    }
    unsafe fn min(v: [u64; 32]) -> u64 {
        v.into_iter().fold(u64::MAX, u64::min)
    }
    unsafe fn one(f: impl FnOnce() -> u64) -> u64 {
        f()
    }
    unsafe fn sync() {}
}

const G: usize = GROUP_LANES as usize;

// SAFETY: one host thread is one group of lanes: a `GroupLanes` holds every lane's value,
// `group_lanes` runs lane 0, 1, ... in turn, and `group_or` combines all of them.
unsafe impl Group for Host {
    type GroupLanes<T: Copy> = [T; G];
    fn group_lanes<T: Copy>(mut f: impl FnMut(u32) -> T) -> [T; G] {
        core::array::from_fn(|l| f(l as u32))
    }
    fn group_map<T: Copy, U: Copy>(v: [T; G], mut f: impl FnMut(u32, T) -> U) -> [U; G] {
        core::array::from_fn(|l| f(l as u32, v[l]))
    }
    unsafe fn group_or(v: [u32; G]) -> u32 {
        v.into_iter().fold(0, |m, x| m | x)
    }
    unsafe fn group_min(v: [u64; G]) -> u64 {
        v.into_iter().fold(u64::MAX, u64::min)
    }
    unsafe fn group_shfl(v: [u64; G], src: u32) -> u64 {
        v[src as usize % G]
    }
    unsafe fn group_one(f: impl FnOnce() -> u64) -> u64 {
        f()
    }
    unsafe fn group_sync() {}
}
