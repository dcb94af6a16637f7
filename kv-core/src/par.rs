//! Host-side batch plumbing on all cores, shared by the backends and the stores above them:
//! a stable partition of a batch's items, the grouping of repeated keys, and a pointer
//! through which parallel tasks write disjoint places of one output.

use std::marker::PhantomData;

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
///
/// The scatter borrows its output mutably for as long as it lives, so nothing else can
/// touch the output meanwhile, nor free it:
///
/// ```compile_fail
/// let to = {
///     let mut out = vec![0u64; 4];
///     kv_core::par::Scatter::new(&mut out) // `out` would be freed under the scatter
/// };
/// ```
#[derive(Debug)]
pub struct Scatter<'a, T> {
    ptr: *mut T,
    len: usize,
    out: PhantomData<&'a mut [T]>,
}

impl<T> Clone for Scatter<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Scatter<'_, T> {}

// SAFETY: a `Scatter` only writes through `write`, `write_slice` and `add`, whose callers
// promise that no two tasks touch the same place, and it borrows its output mutably for
// its whole life, so the output outlives every task and nothing else touches it.
unsafe impl<T: Send> Send for Scatter<'_, T> {}
// SAFETY: as above: shared use never makes two accesses to one place.
unsafe impl<T: Send> Sync for Scatter<'_, T> {}

impl Scatter<'_, u32> {
    /// Adds `v` to the value at `i` (wrapping).
    ///
    /// # Safety
    /// No other task writes or reads place `i` while the scatter is in use, and the place
    /// holds an initialised value. A place past the end panics instead.
    #[inline(always)]
    pub unsafe fn add(&self, i: usize, v: u32) {
        assert!(i < self.len, "scatter index {i} past {}", self.len);
        // SAFETY: in bounds (checked), initialised and touched by this task alone (the
        // caller).
        unsafe { *self.ptr.add(i) = (*self.ptr.add(i)).wrapping_add(v) }
    }
}

impl<'a, T: Copy> Scatter<'a, T> {
    /// A scatter into `out`.
    pub fn new(out: &'a mut [T]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            out: PhantomData,
        }
    }

    /// A scatter into the spare capacity of `out` (its first `out.capacity()` places),
    /// for a caller that then sets the length once every place is written.
    pub fn spare(out: &'a mut Vec<T>) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.capacity(),
            out: PhantomData,
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
    partition_with(n, parts, part, |i| i as u32)
}

/// [`partition`], with `item(i)` in place of each item `i` (a key and its position, say,
/// so that a part's pass reads one contiguous run instead of reaching back into the batch).
///
/// ```
/// let keys = [30u64, 10, 31, 20];
/// let (pairs, bounds) =
///     kv_core::par::partition_with(4, 4, |i| (keys[i] / 10) as usize, |i| (keys[i], i as u32));
/// assert_eq!(pairs, [(10, 1), (20, 3), (30, 0), (31, 2)]);
/// assert_eq!(bounds, [0, 0, 1, 2, 4]);
/// ```
///
/// # Panics
/// As [`partition`].
pub fn partition_with<T: Copy + Send + Sync>(
    n: usize,
    parts: usize,
    part: impl Fn(usize) -> usize + Sync,
    item: impl Fn(usize) -> T + Sync,
) -> (Vec<T>, Vec<usize>) {
    assert!(
        n <= u32::MAX as usize,
        "a partition holds at most 2^32 - 1 items"
    );
    let PartitionPlan {
        chunk,
        bounds,
        starts,
    } = partition_plan(n, parts, &part);
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
                unsafe { to.write(next[p], item(i)) };
                next[p] += 1;
            }
        });
    // SAFETY: the scatter above wrote each of the n places once (the histograms count every
    // item once), within the capacity reserved.
    unsafe { items.set_len(n) };
    (items, bounds)
}

/// Where a stable counting partition of the items `0..n` puts them (see [`partition`]): the
/// items are cut into chunks of `chunk`, and chunk `c` writes its items of part `p`, in
/// order, from `starts[c][p]` on; part `p`'s run is `bounds[p]..bounds[p + 1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPlan {
    /// Items a chunk (the last one may hold fewer).
    pub chunk: usize,
    /// Where each part's run starts, and the end of the last one (`parts + 1` places).
    pub bounds: Vec<usize>,
    /// For each chunk, where its first item of each part goes.
    pub starts: Vec<Vec<usize>>,
}

/// The plan of a stable counting partition of the items `0..n` among `parts` parts: each
/// chunk's items counted per part on all cores, then the counts laid out part by part,
/// chunk by chunk. [`partition`] and [`partition_with`] follow it; a caller that scatters
/// more than one output (keys and their rows, say) follows it itself.
///
/// ```
/// let plan = kv_core::par::partition_plan(6, 3, |i| [2, 0, 2, 1, 0, 2][i]);
/// assert_eq!(plan.bounds, [0, 2, 3, 6]);
/// assert_eq!(plan.starts, [[0, 2, 3]]); // one chunk
/// ```
///
/// # Panics
/// If `part` returns `parts` or more.
pub fn partition_plan(
    n: usize,
    parts: usize,
    part: impl Fn(usize) -> usize + Sync,
) -> PartitionPlan {
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
    PartitionPlan {
        chunk,
        bounds,
        starts,
    }
}

/// `n` rows of `w` words, row `i` copied from `row(i)` (which must be `w` words long), on
/// all cores, with no pass to zero the output first.
///
/// ```
/// let src = [1u64, 2, 3, 4, 5, 6];
/// let rows = kv_core::par::rows(2, 3, |i| &src[(1 - i) * 3..(2 - i) * 3]);
/// assert_eq!(rows, [4, 5, 6, 1, 2, 3]);
/// ```
///
/// # Panics
/// If a row is not `w` words long.
pub fn rows<'a>(n: usize, w: usize, row: impl Fn(usize) -> &'a [u64] + Sync) -> Vec<u64> {
    let mut out = Vec::with_capacity(n * w);
    let to = Scatter::spare(&mut out);
    (0..n).into_par_iter().with_min_len(1024).for_each(|i| {
        let r = row(i);
        assert_eq!(r.len(), w, "row {i} has {} words, not {w}", r.len());
        // SAFETY: row i's places, `i * w..(i + 1) * w`, are written by this task alone,
        // within the capacity reserved.
        unsafe { to.write_slice(i * w, r) }
    });
    // SAFETY: every one of the n rows of w words was written above.
    unsafe { out.set_len(n * w) };
    out
}

/// The part of `key` among `1 << bits` parts (a multiplicative hash's top bits, so that
/// the parts take similar shares of any keys but crafted ones; crafted keys only make one
/// part larger, never a result wrong).
#[inline(always)]
fn part_of(key: u64, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }
}

/// Items a part of a hash-partitioned pass aims at: its hash map then stays in a core's
/// own caches.
const PART_ITEMS: usize = 4096;

/// Bits of the part count of a hash-partitioned pass over `n` items: about
/// [`PART_ITEMS`] a part, at most 4096 parts.
fn part_bits(n: usize) -> u32 {
    (n / PART_ITEMS)
        .clamp(1, 4096)
        .next_power_of_two()
        .trailing_zeros()
}

/// The distinct keys of a selection of a batch's items; see [`distinct`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distinct {
    /// The distinct keys, each once.
    pub keys: Vec<u64>,
    /// Where each distinct key first occurs: a position in the selection.
    pub first: Vec<u32>,
    /// For each position of the selection, the index of its key in `keys`.
    pub index: Vec<u32>,
}

/// The distinct keys among `keys[i]` for the items `i` of `items`, where each first occurs,
/// and for each item the index of its key among them. On all cores: the items are
/// partitioned by a hash of their key, and each part finds its distinct keys in a hash map
/// of its own. The order of the distinct keys depends only on the keys and their order in
/// the selection.
///
/// ```
/// let keys = [5u64, 9, 5, 7, 9];
/// let d = kv_core::par::distinct(&keys, &[0, 1, 2, 4]);
/// let mut k = d.keys.clone();
/// k.sort();
/// assert_eq!(k, [5, 9]);
/// for (j, &i) in [0, 1, 2, 4].iter().enumerate() {
///     assert_eq!(d.keys[d.index[j] as usize], keys[i]);
/// }
/// ```
pub fn distinct(keys: &[u64], items: &[u32]) -> Distinct {
    let m = items.len();
    let bits = part_bits(m);
    // The selected keys, read once in the items' order.
    let sel: Vec<u64> = items.par_iter().map(|&i| keys[i as usize]).collect();
    let (pairs, bounds) = partition_with(
        m,
        1 << bits,
        |j| part_of(sel[j], bits),
        |j| (sel[j], j as u32),
    );
    // Each part: its distinct keys in the order of their first occurrence, where, and each
    // item's index among the part's.
    let mut index = vec![0u32; m];
    let to = Scatter::new(&mut index);
    let local: Vec<(Vec<u64>, Vec<u32>)> = (0..1usize << bits)
        .into_par_iter()
        .map(|p| {
            let run = &pairs[bounds[p]..bounds[p + 1]];
            let mut seen = hashbrown::HashMap::with_capacity(run.len());
            let (mut ks, mut first) = (Vec::new(), Vec::new());
            for &(k, j) in run {
                let d = *seen.entry(k).or_insert_with(|| {
                    ks.push(k);
                    first.push(j);
                    ks.len() as u32 - 1
                });
                // SAFETY: every position `j` of the selection is in exactly one part.
                unsafe { to.write(j as usize, d) }
            }
            (ks, first)
        })
        .collect();
    let mut base = Vec::with_capacity(local.len());
    let mut total = 0u32;
    for (ks, _) in &local {
        base.push(total);
        total += ks.len() as u32;
    }
    (0..1usize << bits).into_par_iter().for_each(|p| {
        for &(_, j) in &pairs[bounds[p]..bounds[p + 1]] {
            // SAFETY: as above; the first pass is over, so this task alone reads and
            // writes `j`.
            unsafe { to.add(j as usize, base[p]) }
        }
    });
    let (keys, first): (Vec<Vec<u64>>, Vec<Vec<u32>>) = local.into_iter().unzip();
    Distinct {
        keys: keys.concat(),
        first: first.concat(),
        index,
    }
}

/// For each key of `queries`, the position of its last occurrence in `keys`, if any. On
/// all cores: both are partitioned by a hash of the key, and each part looks its share of
/// `keys` up in a hash map of its queries.
///
/// ```
/// let at = kv_core::par::last_positions(&[4, 8, 4, 2], &[4, 3, 2]);
/// assert_eq!(at, [Some(2), None, Some(3)]);
/// ```
pub fn last_positions(keys: &[u64], queries: &[u64]) -> Vec<Option<usize>> {
    let bits = part_bits(keys.len().max(queries.len()));
    let (kp, kb) = partition_with(
        keys.len(),
        1 << bits,
        |i| part_of(keys[i], bits),
        |i| (keys[i], i as u32),
    );
    let (qp, qb) = partition_with(
        queries.len(),
        1 << bits,
        |q| part_of(queries[q], bits),
        |q| (queries[q], q as u32),
    );
    let mut out = vec![None; queries.len()];
    let to = Scatter::new(&mut out);
    (0..1usize << bits).into_par_iter().for_each(|p| {
        let qs = &qp[qb[p]..qb[p + 1]];
        let mut last: hashbrown::HashMap<u64, Option<usize>> =
            qs.iter().map(|&(k, _)| (k, None)).collect();
        // In batch order (the partition is stable): the last write is the last occurrence.
        for &(k, i) in &kp[kb[p]..kb[p + 1]] {
            if let Some(at) = last.get_mut(&k) {
                *at = Some(i as usize);
            }
        }
        for &(k, q) in qs {
            // SAFETY: every query position is in exactly one part.
            unsafe { to.write(q as usize, last[&k]) }
        }
    });
    out
}

/// Writes the running totals of `len(0)`, `len(1)`, ... into `out` (`n + 1` places for
/// `n` items): `out[0] = 0` and `out[i + 1] = out[i] + len(i)`. Returns the total. Long
/// batches run on all cores in two passes (each part's total, then each part's running
/// totals from its start), so `len` is called twice for an item there.
///
/// ```
/// let mut out = vec![0i64; 4];
/// assert_eq!(kv_core::par::prefix_sums(&mut out, |i| [3, 0, 5][i]), 8);
/// assert_eq!(out, [0, 3, 3, 8]);
/// assert_eq!(kv_core::par::prefix_sums(&mut [], |_| 1), 0);
/// ```
pub fn prefix_sums(out: &mut [i64], len: impl Fn(usize) -> i64 + Sync) -> i64 {
    let Some((first, rest)) = out.split_first_mut() else {
        return 0;
    };
    *first = 0;
    let n = rest.len();
    if n < 2 * MIN_CHUNK {
        let mut at = 0;
        for (i, o) in rest.iter_mut().enumerate() {
            at += len(i);
            *o = at;
        }
        return at;
    }
    let chunk = MIN_CHUNK.max(n.div_ceil(4 * rayon::current_num_threads()));
    let sums: Vec<i64> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|p| (p * chunk..((p + 1) * chunk).min(n)).map(&len).sum())
        .collect();
    let mut bases = Vec::with_capacity(sums.len());
    let mut total = 0;
    for s in sums {
        bases.push(total);
        total += s;
    }
    rest.par_chunks_mut(chunk)
        .zip(bases)
        .enumerate()
        .for_each(|(p, (o, base))| {
            let mut at = base;
            for (j, slot) in o.iter_mut().enumerate() {
                at += len(p * chunk + j);
                *slot = at;
            }
        });
    total
}

#[cfg(test)]
mod tests {

    /// The parallel passes give the running totals a single pass gives, at lengths that
    /// are not a multiple of a part.
    #[test]
    fn prefix_sums_match_one_pass() {
        for n in [0usize, 1, 5, 2 * MIN_CHUNK - 1, 2 * MIN_CHUNK, 300_001] {
            let len = |i: usize| ((i * 7919) % 13) as i64;
            let mut out = vec![-1i64; n + 1];
            let total = prefix_sums(&mut out, len);
            let mut at = 0;
            assert_eq!(out[0], 0);
            for i in 0..n {
                at += len(i);
                assert_eq!(out[i + 1], at, "n {n}, place {}", i + 1);
            }
            assert_eq!(total, at);
        }
    }
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
    fn distinct_keys_once_with_their_first_occurrence() {
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
        let mut got: Vec<(u64, u32)> = d.keys.iter().copied().zip(d.first.clone()).collect();
        let mut want: Vec<(u64, u32)> = want.into_iter().zip(first).collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "each key once, with its first occurrence");
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
