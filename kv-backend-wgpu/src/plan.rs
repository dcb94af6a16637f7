//! The chunk plan of a host batch and the other pure sizing rules of the pipeline: items
//! per chunk, region order, the bound on resume rounds, the scratch of a put chunk.
//! Unit-tested here.

use std::sync::atomic::{AtomicU64, Ordering};

use kv_core::Result;
use kv_kernels::layout;

use crate::gpu::device_error;

use crate::options::WgpuOptions;
use crate::shader::{PROBE_HDR, PROBE_WORDS, REGIONS};

/// Staging lanes used by one host batch.
pub(crate) const LANES: usize = 3;
/// Bytes of keys + values per chunk at most (the chunk size for large batches), by default.
const CHUNK_BYTES: usize = 64 << 20;
/// Smallest lane (items); lanes are sized in powers of two so that they are reused.
pub(crate) const MIN_LANE: usize = 4096;
/// Lanes kept in a table's pool between batches.
pub(crate) const POOL_MAX: usize = 2 * LANES;

/// Tables of more slots than this (key arrays beyond 2 GiB) probe in region order by
/// default: on the H100 through Vulkan, random probes into larger tables run about 5x
/// slower (docs/PERF.md, "The wgpu slow mode").
pub const REGION_ORDER_MIN_SLOTS: usize = 1 << 28;

/// The pipeline's settings of one table, from its options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Bytes of keys + values per chunk at most.
    pub chunk_bytes: usize,
    /// Region order forced on or off; `None`: by table size.
    pub region_order: Option<bool>,
}

impl Plan {
    pub fn new(o: &WgpuOptions) -> Plan {
        Plan {
            chunk_bytes: o.chunk_mib.map_or(CHUNK_BYTES, |m| m << 20),
            region_order: o.region_order,
        }
    }

    /// Items per chunk for a batch of `n` keys of `width` words, bindings of at most
    /// `max_binding` bytes.
    pub fn lane_cap(&self, n: usize, width: usize, max_binding: u64) -> usize {
        let by_bytes = self.chunk_bytes / (8 * (width + 1));
        // The values of a chunk, its local table (8 bytes an item, plus the flags) and its
        // probe states (PROBE_WORDS words an item, after a header) each fit one binding.
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

    /// Whether chunks probe a table of `slots` slots in region order, and if so its regions
    /// as `(rshift, nreg)`: `nreg` regions (`REGIONS`, 256, or one per slot for a smaller
    /// table) of `1 << rshift` slots each, the region of a key being its home slot shifted
    /// right by `rshift`. Where it is on by default (more than 2^28 slots) a region holds
    /// at least 2^21 slots, 16 MiB of keys.
    ///
    /// In region order, each chunk first sorts its item indices by region (counting sort:
    /// histogram, scan, scatter; the `kv_region_*` kernels) and the probing kernels then take
    /// the items in that order, so that the threads running at any moment probe a few
    /// regions of the table instead of pages all over it.
    pub fn region_order(&self, slots: usize) -> Option<(u32, u32)> {
        let on = self.region_order.unwrap_or(slots > REGION_ORDER_MIN_SLOTS);
        if !on || slots < 2 {
            return None;
        }
        let nreg = slots.min(REGIONS as usize);
        let rshift = slots.trailing_zeros() - nreg.trailing_zeros();
        Some((rshift, nreg as u32))
    }
}

/// Slots of the local table of a put chunk of `n` items ([`layout::local_slots`]).
pub(crate) fn local_slots(n: usize) -> usize {
    layout::local_slots(n as u64) as usize
}

/// Bytes of the local table of a chunk of `n` items and the chunk's flags after it
/// ([`layout::flag`]: DUP, the last index of each special key, one spare word).
pub(crate) fn local_bytes(n: usize) -> u64 {
    (local_slots(n) + layout::flag::LEN) as u64 * 4
}

/// Bytes of the found flags of `cap` items (one byte each, in whole words).
pub(crate) fn flags_bytes(cap: usize) -> u64 {
    (cap as u64).next_multiple_of(8)
}

/// The most rounds a probe over `slots` slots with `budget` slots per round can need: each
/// round takes every unfinished probe `budget` slots further, except one that loses the
/// EMPTY slot it was claiming (it then goes on as usual, at most once per slot of the
/// chain), so twice the rounds of a whole table plus a margin. More means a broken table.
pub(crate) fn round_limit(slots: usize, budget: u32) -> usize {
    4 + 2 * slots.div_ceil(budget.max(1) as usize)
}

/// Runs `round` (one resume round, `Ok(true)` once no probe is left unfinished) until it is
/// done, counting each in `resumed`; past `limit` rounds (see [`round_limit`]) an
/// `Error::Device` saying what did not finish, as a broken table would.
pub(crate) fn resume_rounds(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn chunks_are_bounded_powers_of_two() {
        let p = Plan::new(&WgpuOptions::default());
        assert_eq!(p.lane_cap(1, 1, 1 << 31), MIN_LANE);
        assert_eq!(p.lane_cap(3 << 20, 1, 1 << 31), 1 << 20);
        // 64 MiB of keys and values at width 1: 4M items.
        assert_eq!(p.lane_cap(100_000_000, 1, 1 << 31), 1 << 22);
        // lavapipe's 128 MiB bindings bound the probe states (12 bytes an item).
        let big = Plan::new(&WgpuOptions::default().chunk_mib(4096));
        assert_eq!(big.lane_cap(100_000_000, 1, 128 << 20), 1 << 23);
        let small = Plan::new(&WgpuOptions::default().chunk_mib(1));
        assert_eq!(small.lane_cap(100_000_000, 4, 1 << 31), 1 << 14);
        for w in 1..=16 {
            for n in [1, 5000, 1 << 20, 123_456_789] {
                let c = p.lane_cap(n, w, 128 << 20);
                assert!(c.is_power_of_two() && c >= MIN_LANE);
                assert!(c as u64 * 8 * w as u64 <= 128 << 20);
            }
        }
    }

    #[test]
    fn region_order_by_size_unless_forced() {
        let p = Plan::new(&WgpuOptions::default());
        assert_eq!(p.region_order(1 << 20), None);
        assert_eq!(p.region_order(1 << 29), Some((21, 256)));
        let on = Plan::new(&WgpuOptions::default().region_order(true));
        assert_eq!(on.region_order(64), Some((0, 64)));
        assert_eq!(on.region_order(1 << 20), Some((12, 256)));
        assert_eq!(on.region_order(1), None);
        let off = Plan::new(&WgpuOptions::default().region_order(false));
        assert_eq!(off.region_order(1 << 29), None);
    }

    #[test]
    fn put_scratch_holds_the_local_table_and_flags() {
        assert_eq!(local_slots(1), 64);
        assert_eq!(local_bytes(1000), (2048 + 4) * 4);
        assert_eq!(flags_bytes(5), 8);
        assert_eq!(round_limit(64, 8), 20);
    }

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
}
