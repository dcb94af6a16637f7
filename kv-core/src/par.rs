//! Host-side batch plumbing on all cores, shared by the backends and the stores above them:
//! a stable partition of a batch's items, the grouping of repeated keys, and a pointer
//! through which parallel tasks write disjoint places of one output.

use rayon::prelude::*;

/// Items per task of the parallel passes below: large enough that a task's fixed cost
/// (tens of microseconds to wake the pool) stays small next to its work.
const MIN_CHUNK: usize = 1 << 14;

/// A raw pointer into one output that rayon tasks share, each writing only places that no
/// other task writes or reads.
///
/// ```
/// use kv_core::par::Scatter;
/// use rayon::prelude::*;
///
/// let mut out = vec![0u64; 8];
/// let to = Scatter::new(&mut out);
/// // Each index written by exactly one task.
/// (0..8usize).into_par_iter().for_each(|i| {
///     // SAFETY: `7 - i` is in bounds and each index is written once.
///     unsafe { to.write(7 - i, i as u64) }
/// });
/// assert_eq!(out, [7, 6, 5, 4, 3, 2, 1, 0]);
/// ```
#[derive(Debug)]
pub struct Scatter<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for Scatter<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Scatter<T> {}

// SAFETY: a `Scatter` only writes through `write` and `write_slice`, whose callers promise
// that no two tasks touch the same place, and the slice it was made from is borrowed
// mutably for as long as the tasks run (the caller keeps it alive and untouched).
unsafe impl<T: Send> Send for Scatter<T> {}
// SAFETY: as above: shared use never makes two accesses to one place.
unsafe impl<T: Send> Sync for Scatter<T> {}

impl<T: Copy> Scatter<T> {
    /// A scatter into `out`, which must outlive the tasks and be used by nothing else while
    /// they run.
    pub fn new(out: &mut [T]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// A scatter into the spare capacity of `out` (its first `out.capacity()` places),
    /// for a caller that then sets the length once every place is written.
    pub fn spare(out: &mut Vec<T>) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.capacity(),
        }
    }

    /// Writes `v` at `i`.
    ///
    /// # Safety
    /// No other task writes or reads place `i` while the scatter is in use. A place past
    /// the end panics instead of writing.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.len, "scatter index {i} past {}", self.len);
        // SAFETY: `i` is in bounds (checked) and no other task touches it (the caller).
        unsafe { self.ptr.add(i).write(v) }
    }

    /// Writes `src` at `i..i + src.len()`.
    ///
    /// # Safety
    /// As for [`write`](Self::write), for every place of the range.
    #[inline(always)]
    pub unsafe fn write_slice(&self, i: usize, src: &[T]) {
        assert!(
            i <= self.len && src.len() <= self.len - i,
            "scatter range {i}+{} past {}",
            src.len(),
            self.len
        );
        // SAFETY: the range is in bounds (checked), no other task touches it (the caller),
        // and `src` cannot overlap it: the places are borrowed by the scatter alone.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(i), src.len()) }
    }
}

/// The items `0..n` grouped by part, `part(i) < parts`, each part's items in batch order,
/// on all cores (a counting sort): returns the items and the bounds of each part's run,
/// part `p` being `items[bounds[p]..bounds[p + 1]]`.
///
/// ```
/// let (items, bounds) = kv_core::par::partition(6, 3, |i| [2, 0, 2, 1, 0, 2][i]);
/// assert_eq!(items, [1, 4, 3, 0, 2, 5]);
/// assert_eq!(bounds, [0, 2, 3, 6]);
/// ```
///
/// # Panics
/// If `n` does not fit a `u32` or `part` returns `parts` or more.
pub fn partition(
    n: usize,
    parts: usize,
    part: impl Fn(usize) -> usize + Sync,
) -> (Vec<u32>, Vec<usize>) {
    assert!(
        n <= u32::MAX as usize,
        "a partition holds at most 2^32 - 1 items"
    );
    let chunk = (n / (rayon::current_num_threads() * 4)).max(MIN_CHUNK);
    let chunks = n.div_ceil(chunk);
    let hist: Vec<Vec<usize>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut h = vec![0usize; parts];
            (c * chunk..((c + 1) * chunk).min(n)).for_each(|i| h[part(i)] += 1);
            h
        })
        .collect();
    let mut bounds = vec![0usize; parts + 1];
    let mut starts = vec![vec![0usize; parts]; chunks];
    let mut at = 0;
    for p in 0..parts {
        bounds[p] = at;
        for (c, h) in hist.iter().enumerate() {
            starts[c][p] = at;
            at += h[p];
        }
    }
    bounds[parts] = at;
    let mut items = Vec::with_capacity(n);
    let to = Scatter::spare(&mut items);
    starts
        .into_par_iter()
        .enumerate()
        .for_each(|(c, mut next)| {
            for i in c * chunk..((c + 1) * chunk).min(n) {
                let p = part(i);
                // SAFETY: `next[p]` walks this chunk's own range of part `p`'s run, computed
                // from the histograms above, so no other task writes it.
                unsafe { to.write(next[p], i as u32) };
                next[p] += 1;
            }
        });
    // SAFETY: the scatter above wrote each of the n places once (the histograms count every
    // item once), within the capacity reserved.
    unsafe { items.set_len(n) };
    (items, bounds)
}

/// The distinct keys of a selection of a batch's items; see [`distinct`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distinct {
    /// The distinct keys, in the order of their first occurrence.
    pub keys: Vec<u64>,
    /// Where each distinct key first occurs: a position in the selection.
    pub first: Vec<u32>,
    /// For each position of the selection, the index of its key in `keys`.
    pub index: Vec<u32>,
}

/// The distinct keys among `keys[i]` for the items `i` of `items`, where each first occurs,
/// and for each item the index of its key among them. On all cores (a sort of the items by
/// key).
///
/// ```
/// let keys = [5u64, 9, 5, 7, 9];
/// let d = kv_core::par::distinct(&keys, &[0, 1, 2, 4]);
/// assert_eq!(d.keys, [5, 9]);
/// assert_eq!(d.first, [0, 1]);
/// assert_eq!(d.index, [0, 1, 0, 1]);
/// ```
pub fn distinct(keys: &[u64], items: &[u32]) -> Distinct {
    let m = items.len();
    // (key, position in `items`): sorted, each key's run starts with its first occurrence.
    let mut by_key: Vec<(u64, u32)> = items
        .par_iter()
        .enumerate()
        .map(|(j, &i)| (keys[i as usize], j as u32))
        .collect();
    by_key.par_sort_unstable();
    let heads: Vec<u32> = (0..m)
        .into_par_iter()
        .filter(|&r| r == 0 || by_key[r - 1].0 != by_key[r].0)
        .map(|r| r as u32)
        .collect();
    // The runs in the order of their first occurrences.
    let mut order: Vec<(u32, u32)> = heads
        .par_iter()
        .map(|&r| (by_key[r as usize].1, r))
        .collect();
    order.par_sort_unstable();
    let distinct: Vec<u64> = order
        .par_iter()
        .map(|&(_, r)| by_key[r as usize].0)
        .collect();
    let first: Vec<u32> = order.par_iter().map(|&(j, _)| j).collect();
    // Each run's rank among the distinct keys, then each item's.
    let mut rank = vec![0u32; m];
    let run_rank = Scatter::new(&mut rank);
    order.par_iter().enumerate().for_each(|(d, &(_, r))| {
        // SAFETY: each head `r` is one run's start, written once.
        unsafe { run_rank.write(r as usize, d as u32) }
    });
    let mut index = vec![0u32; m];
    let to = Scatter::new(&mut index);
    heads.par_iter().enumerate().for_each(|(h, &r)| {
        let end = heads.get(h + 1).map_or(m, |&e| e as usize);
        let d = rank[r as usize];
        for &(_, j) in &by_key[r as usize..end] {
            // SAFETY: every position `j` of `items` is in exactly one run.
            unsafe { to.write(j as usize, d) }
        }
    });
    Distinct {
        keys: distinct,
        first,
        index,
    }
}

/// For each key of `queries`, the position of its last occurrence in `keys`, if any. On
/// all cores (a sort of `keys`, then a search per query).
///
/// ```
/// let at = kv_core::par::last_positions(&[4, 8, 4, 2], &[4, 3, 2]);
/// assert_eq!(at, [Some(2), None, Some(3)]);
/// ```
pub fn last_positions(keys: &[u64], queries: &[u64]) -> Vec<Option<usize>> {
    let mut by_key: Vec<(u64, usize)> = keys.par_iter().copied().zip(0..keys.len()).collect();
    by_key.par_sort_unstable();
    queries
        .par_iter()
        .map(|&q| {
            let end = by_key.partition_point(|p| p.0 <= q);
            (end > 0 && by_key[end - 1].0 == q).then(|| by_key[end - 1].1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_complete() {
        let n = 100_000;
        let part = |i: usize| (i * 7919) % 13;
        let (items, bounds) = partition(n, 13, part);
        assert_eq!(bounds[13], n);
        for p in 0..13 {
            let run = &items[bounds[p]..bounds[p + 1]];
            assert!(run.iter().all(|&i| part(i as usize) == p));
            assert!(
                run.windows(2).all(|w| w[0] < w[1]),
                "part {p} in batch order"
            );
        }
        let mut all = items.clone();
        all.sort_unstable();
        assert!(all.iter().enumerate().all(|(j, &i)| j == i as usize));
    }

    #[test]
    fn distinct_keys_in_first_occurrence_order() {
        let keys: Vec<u64> = (0..50_000u64).map(|i| (i * 31) % 997).collect();
        let items: Vec<u32> = (0..50_000u32).filter(|i| i % 3 != 0).collect();
        let d = distinct(&keys, &items);
        let mut seen = std::collections::HashMap::new();
        let (mut want, mut first) = (Vec::new(), Vec::new());
        for (j, &i) in items.iter().enumerate() {
            let k = keys[i as usize];
            seen.entry(k).or_insert_with(|| {
                want.push(k);
                first.push(j as u32);
            });
        }
        assert_eq!(d.keys, want);
        assert_eq!(d.first, first);
        for (j, &i) in items.iter().enumerate() {
            assert_eq!(d.keys[d.index[j] as usize], keys[i as usize]);
        }
        assert!(distinct(&keys, &[]).keys.is_empty());
    }

    #[test]
    fn last_positions_find_each_last_occurrence() {
        let keys: Vec<u64> = (0..40_000u64).map(|i| (i * 17) % 5003).collect();
        let queries: Vec<u64> = (0..6000).collect();
        let at = last_positions(&keys, &queries);
        for (q, a) in queries.iter().zip(at) {
            assert_eq!(a, keys.iter().rposition(|k| k == q), "key {q}");
        }
    }
}
