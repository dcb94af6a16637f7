//! The chunk plan of a host batch: how many items per chunk and where each chunk starts.
//! Pure functions of the batch's size, the table's width and the pipeline's [`Shape`],
//! unit-tested here.
//!
//! A batch from host memory is cut into chunks ([`copy_cap`]: few and large, since each
//! chunk's host copy is a fork-join over all cores with a fixed cost; [`chunk_plan`] cuts
//! the tail of a large batch finer, so that what is left after the last host copy is
//! short). A batch in lent page-locked memory ([`crate::PinnedBatch`]) has no host copy to
//! amortise: its chunks are smaller and more numerous ([`spread_cap`], 8 to 16 per batch)
//! and it uses four lanes.

use crate::options::CudaOptions;

/// Staging lanes of a batch copied through the lanes' pinned buffers (default).
const COPY_LANES: usize = 3;
/// Largest chunk of such a batch, bytes of keys + values (default).
const COPY_CHUNK_BYTES: usize = 32 << 20;
/// Staging lanes of a batch in lent page-locked memory (default).
const PINNED_LANES: usize = 4;
/// Largest chunk of such a batch (default).
const PINNED_CHUNK_BYTES: usize = 16 << 20;
/// Chunks a lent batch is cut into at least, when the chunk size bounds allow it.
const TARGET_CHUNKS: usize = 8;
/// Bytes of keys + values per chunk of a lent batch at least.
const MIN_CHUNK_BYTES: usize = 1 << 20;
/// Smallest lane (items); lanes are sized in powers of two so that they are reused.
const MIN_LANE: usize = 4096;

/// The pipeline's shape for one kind of host batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub lanes: usize,
    pub max_chunk_bytes: usize,
}

/// The pipeline's shapes of a table: for batches copied through the lanes and for lent
/// page-locked batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shapes {
    pub copy: Shape,
    pub pinned: Shape,
}

impl Shapes {
    /// The defaults, with the options' lanes and chunk size over them.
    pub fn new(o: &CudaOptions) -> Shapes {
        let shape = |lanes, bytes| Shape {
            lanes: o.lanes.unwrap_or(lanes),
            max_chunk_bytes: o.chunk_mib.map_or(bytes, |m| m << 20),
        };
        Shapes {
            copy: shape(COPY_LANES, COPY_CHUNK_BYTES),
            pinned: shape(PINNED_LANES, PINNED_CHUNK_BYTES),
        }
    }

    /// The shape of a batch copied through the lanes (`pinned == false`) or of a lent
    /// page-locked batch.
    pub fn of(&self, pinned: bool) -> Shape {
        if pinned { self.pinned } else { self.copy }
    }

    /// Lanes kept in a table's pool between batches.
    pub fn pool_max(&self) -> usize {
        2 * self.copy.lanes.max(self.pinned.lanes)
    }

    /// Items per chunk of a host batch of `n` keys of `width` words.
    pub fn lane_cap(&self, n: usize, width: usize, pinned: bool) -> usize {
        let sh = self.of(pinned);
        if pinned {
            spread_cap(n, width, sh.max_chunk_bytes)
        } else {
            copy_cap(n, width, sh.max_chunk_bytes)
        }
    }
}

fn pow2_floor(x: usize) -> usize {
    1usize << (usize::BITS - 1 - x.max(1).leading_zeros())
}

/// Items per chunk of a device-resident put, at most `max_chunk_bytes` of keys and values
/// (the chunk only bounds the lane's scratch).
pub(crate) fn device_cap(n: usize, width: usize, max_chunk_bytes: usize) -> usize {
    copy_cap(n, width, max_chunk_bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_set_the_shapes() {
        let d = Shapes::new(&CudaOptions::default());
        assert_eq!(
            (d.copy, d.pinned, d.pool_max()),
            (
                Shape {
                    lanes: COPY_LANES,
                    max_chunk_bytes: COPY_CHUNK_BYTES
                },
                Shape {
                    lanes: PINNED_LANES,
                    max_chunk_bytes: PINNED_CHUNK_BYTES
                },
                8
            )
        );
        let o = Shapes::new(&CudaOptions::default().lanes(6).chunk_mib(8));
        let want = Shape {
            lanes: 6,
            max_chunk_bytes: 8 << 20,
        };
        assert_eq!((o.of(false), o.of(true), o.pool_max()), (want, want, 12));
        assert_eq!(o.lane_cap(100_000_000, 1, false), 1 << 19);
    }

    #[test]
    fn copy_cap_is_mains_rule() {
        let max = COPY_CHUNK_BYTES;
        assert_eq!(copy_cap(1, 1, max), MIN_LANE);
        assert_eq!(copy_cap(10_000, 1, max), MIN_LANE);
        assert_eq!(copy_cap(3 * 8192, 1, max), 8192);
        assert_eq!(copy_cap(2_000_000, 1, max), 1 << 20);
        assert_eq!(copy_cap(100_000_000, 1, max), 1 << 21); // 32 MiB / 16 B
        assert_eq!(copy_cap(100_000_000, 16, max), 1 << 17);
        assert_eq!(device_cap(100_000_000, 1, COPY_CHUNK_BYTES), 1 << 21);
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
