//! The host's plan of a byte table's arena (docs/arena.md).
//!
//! A byte table keeps its keys and values in an *arena*: device memory cut into segments
//! of one power-of-two size. The host plans where every record goes and the device (or
//! the CPU backend's memory) moves the bytes; this crate is the plan, the one every
//! backend uses, so that all of them hold the same bytes for the same batches.
//!
//! # Log-structured segments
//!
//! A record (a key's bytes followed by its value's, padded to 8 bytes) is appended to the
//! *head* segment. When the next record does not fit, the head is sealed and a free
//! segment (or a new one) becomes the head. A record is never changed in place: an
//! overwrite appends the new record and the old one becomes dead, as does a deleted one.
//! Every segment counts its live bytes; a sealed segment whose live bytes reach zero is
//! given back at once.
//!
//! # Compaction
//!
//! Dead bytes in sealed segments are what fragmentation is. When the arena holds more
//! than [`COMPACT_ABOVE`] times its live bytes, [`ArenaPlan::victims`] picks the sealed
//! segments with the fewest live bytes, up to a byte bound per batch (so that compaction
//! never holds the table for longer than about one batch); the backend moves their live
//! records to the head ([`ArenaPlan::place`] then [`ArenaPlan::free`] of the old places)
//! and the emptied segments are given back. Greedy choice by live bytes is the classic
//! log-structured cleaner's (LFS, RAMCloud): the emptiest segments cost the least to
//! move per byte reclaimed.
//!
//! ```
//! use kv_arena::ArenaPlan;
//! let mut arena = ArenaPlan::new(64, None);
//! let placed = arena.place(&[20, 30, 40]).expect("placed"); // 24 + 32 bytes fit segment 0
//! assert_eq!(placed.addrs, [0, 24, 64]); // the 40-byte record opens segment 1
//! assert_eq!(placed.opened, [0, 1]);
//! arena.free(0, 20);
//! arena.free(24, 30); // segment 0 is sealed and empty: given back
//! assert_eq!(arena.take_released(), [0]);
//! assert_eq!(arena.stats().live_bytes, 40);
//! assert_eq!(arena.stats().held_bytes, 64);
//! ```

use kv_core::{ArenaStats, Binary, Error, Result};

/// Records start at multiples of this many bytes.
pub const RECORD_ALIGN: u64 = 8;

/// Compaction starts when the arena holds more than this many times its live bytes.
pub const COMPACT_ABOVE: f64 = 1.08;

/// How many bytes compaction may move after a batch, per byte the batch wrote or freed.
///
/// A batch's own bytes cross PCIe (about 55 GB/s on an H200) while compaction copies
/// within VRAM (about 2 TB/s each way), so moving eight times the batch's bytes costs
/// well under the batch's own copy: compaction never holds the table for longer than a
/// batch. Eight is what keeps a uniform overwrite churn under [`COMPACT_ABOVE`] plus a
/// few points: with dead bytes spread evenly, reclaiming a byte means moving the rest of
/// its segment.
pub const COMPACT_PER_BATCH: u64 = 8;

/// The most live bytes compaction may save up over batches that do not compact, in
/// segments ([`ArenaPlan::compaction_allowance`]).
pub const COMPACT_CREDIT_SEGMENTS: u64 = 32;

/// The live bytes compaction may move after a batch that wrote or freed `batch_bytes`:
/// [`COMPACT_PER_BATCH`] times that, and at least a segment. A batch's share of
/// [`ArenaPlan::compaction_allowance`], which saves these shares up.
pub fn compaction_bound(batch_bytes: u64, segment_bytes: u64) -> u64 {
    batch_bytes
        .saturating_mul(COMPACT_PER_BATCH)
        .max(segment_bytes)
}

/// The smallest default segment.
pub const MIN_SEGMENT_BYTES: u64 = 1 << 20;

/// The bytes a record takes in its segment: its length rounded up to [`RECORD_ALIGN`].
pub const fn padded(len: u64) -> u64 {
    len.next_multiple_of(RECORD_ALIGN)
}

/// The unpadded lengths of the records of `items` of a put: each item's key and value, in
/// the order the arena stores them (what [`ArenaPlan::place`] takes).
///
/// ```
/// use kv_core::BinaryBuf;
/// let keys = BinaryBuf::from_slices(["a", "bb", "a"]);
/// let values = BinaryBuf::from_slices(["123", "", "4"]);
/// assert_eq!(kv_arena::record_lens(keys.as_binary(), values.as_binary(), &[1, 2]), [2, 2]);
/// ```
pub fn record_lens(keys: Binary<'_>, values: Binary<'_>, items: &[usize]) -> Vec<u64> {
    items
        .iter()
        .map(|&i| (keys.item_len(i) + values.item_len(i)) as u64)
        .collect()
}

/// The default segment size for records of at most `max_record` bytes: eight of the
/// largest records, and at least [`MIN_SEGMENT_BYTES`], a power of two. Eight keeps the
/// space a sealed head leaves unused (at most one record less a byte) under an eighth of
/// a segment even for the largest records.
pub fn default_segment_bytes(max_record: u64) -> u64 {
    (padded(max_record).max(1) * 8)
        .next_power_of_two()
        .max(MIN_SEGMENT_BYTES)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Head,
    Sealed,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    state: State,
    /// Bytes appended (padded records).
    fill: u64,
    /// Bytes of live records (unpadded).
    live: u64,
    /// Bytes of dead records (padded).
    dead: u64,
}

/// Where [`ArenaPlan::place`] put a batch of records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// The address of each record: `segment * segment_bytes + offset`.
    pub addrs: Vec<u64>,
    /// Segments that became the head in this placement and were free or new: the backend
    /// gives them memory before it writes.
    pub opened: Vec<u32>,
}

/// The plan of one arena (see the crate docs). Cheap to clone, so a backend can plan a
/// batch on a copy and keep it only when the batch goes through.
#[derive(Debug, Clone)]
pub struct ArenaPlan {
    segment_bytes: u64,
    shift: u32,
    budget: Option<u64>,
    segments: Vec<Segment>,
    free: Vec<u32>,
    head: Option<u32>,
    live: u64,
    held: u64,
    compacted: u64,
    released: Vec<u32>,
    /// Live bytes that compaction may move and has not ([`Self::compaction_allowance`]).
    credit: u64,
}

impl ArenaPlan {
    /// An empty arena of `segment_bytes` segments (a power of two, at least
    /// [`RECORD_ALIGN`]) that may hold at most `budget` bytes.
    ///
    /// # Panics
    /// When `segment_bytes` is not a power of two of at least [`RECORD_ALIGN`]: the
    /// config's validation ([`kv_core::ByteConfig::validate`]) refuses that first.
    pub fn new(segment_bytes: u64, budget: Option<u64>) -> Self {
        assert!(
            segment_bytes.is_power_of_two() && segment_bytes >= RECORD_ALIGN,
            "segment size {segment_bytes} is not a power of two of at least {RECORD_ALIGN}"
        );
        ArenaPlan {
            segment_bytes,
            shift: segment_bytes.trailing_zeros(),
            budget,
            segments: Vec::new(),
            free: Vec::new(),
            head: None,
            live: 0,
            held: 0,
            compacted: 0,
            released: Vec::new(),
            credit: 0,
        }
    }

    /// The segment size.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// The segment an address lies in.
    pub fn segment_of(&self, addr: u64) -> u32 {
        (addr >> self.shift) as u32
    }

    /// The offset of an address in its segment.
    pub fn offset_of(&self, addr: u64) -> u64 {
        addr & (self.segment_bytes - 1)
    }

    /// Whether segment `id` is in use (the head, or sealed with live records).
    pub fn in_use(&self, id: u32) -> bool {
        self.segments
            .get(id as usize)
            .is_some_and(|s| s.state != State::Free)
    }

    /// Segments ever used (the highest segment number plus one): the size of a backend's
    /// segment directory.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// What the arena holds now.
    pub fn stats(&self) -> ArenaStats {
        ArenaStats {
            held_bytes: self.held * self.segment_bytes,
            live_bytes: self.live,
            segments: self.held,
            segment_bytes: self.segment_bytes,
            compacted_bytes: self.compacted,
        }
    }

    /// Places records of `lens` bytes (unpadded), in order, each whole in one segment,
    /// and counts them live. On error (a record larger than a segment, or the budget) the
    /// plan is unchanged.
    pub fn place(&mut self, lens: &[u64]) -> Result<Placement> {
        let mut addrs = Vec::with_capacity(lens.len());
        let opened = self.place_each(lens.len(), |i| Some(lens[i]), |_, a| addrs.push(a))?;
        Ok(Placement { addrs, opened })
    }

    /// [`place`](Self::place) for the records of a batch's items, given one at a time:
    /// item `i` of `0..n` has a record of `len_of(i)` bytes (`None`: no record), and
    /// `out(i, address)` receives each record's address, in order. One pass and no
    /// vectors, for batches of millions. Returns the segments that
    /// [`Placement::opened`] would hold. On error the plan is unchanged (and the
    /// addresses given to `out` are void).
    ///
    /// ```
    /// use kv_arena::ArenaPlan;
    /// let mut plan = ArenaPlan::new(1 << 16, None);
    /// let mut addrs = vec![0u64; 3];
    /// let opened = plan
    ///     .place_each(3, |i| (i != 1).then_some(100), |i, a| addrs[i] = a)
    ///     .unwrap();
    /// assert_eq!(opened.len(), 1);
    /// assert_eq!(addrs[1], 0);
    /// assert_ne!(addrs[0], addrs[2]);
    /// assert_eq!(plan.stats().live_bytes, 200);
    /// ```
    pub fn place_each(
        &mut self,
        n: usize,
        len_of: impl FnMut(usize) -> Option<u64>,
        out: impl FnMut(usize, u64),
    ) -> Result<Vec<u32>> {
        let mut next = self.clone();
        let opened = next.place_in_place(n, len_of, out)?;
        *self = next;
        Ok(opened)
    }

    fn place_in_place(
        &mut self,
        n: usize,
        mut len_of: impl FnMut(usize) -> Option<u64>,
        mut out: impl FnMut(usize, u64),
    ) -> Result<Vec<u32>> {
        let mut opened = Vec::new();
        for i in 0..n {
            let Some(len) = len_of(i) else {
                continue;
            };
            let size = padded(len);
            if size > self.segment_bytes {
                return Err(Error::InvalidArgument(format!(
                    "a record of {len} bytes is larger than an arena segment ({} bytes)",
                    self.segment_bytes
                )));
            }
            let head = match self.head {
                Some(h) if self.segments[h as usize].fill + size <= self.segment_bytes => h,
                _ => {
                    let h = self.open_segment()?;
                    opened.push(h);
                    h
                }
            };
            let seg = &mut self.segments[head as usize];
            out(i, ((head as u64) << self.shift) | seg.fill);
            seg.fill += size;
            seg.live += len;
            self.live += len;
        }
        Ok(opened)
    }

    /// Seals the head (if any) and makes a free or new segment the head.
    fn open_segment(&mut self) -> Result<u32> {
        if let Some(budget) = self.budget {
            let requested = (self.held + 1) * self.segment_bytes;
            if requested > budget {
                return Err(Error::BudgetExceeded {
                    what: "arena",
                    requested_bytes: requested,
                    budget_bytes: budget,
                });
            }
        }
        if let Some(h) = self.head.take() {
            self.seal(h);
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let id = u32::try_from(self.segments.len()).map_err(|_| {
                    Error::InvalidArgument("an arena holds at most 2^32 segments".into())
                })?;
                self.segments.push(Segment {
                    state: State::Free,
                    fill: 0,
                    live: 0,
                    dead: 0,
                });
                id
            }
        };
        self.segments[id as usize] = Segment {
            state: State::Head,
            fill: 0,
            live: 0,
            dead: 0,
        };
        self.held += 1;
        self.head = Some(id);
        Ok(id)
    }

    fn seal(&mut self, id: u32) {
        let seg = &mut self.segments[id as usize];
        seg.state = State::Sealed;
        if seg.live == 0 {
            self.release(id);
        }
    }

    fn release(&mut self, id: u32) {
        self.segments[id as usize] = Segment {
            state: State::Free,
            fill: 0,
            live: 0,
            dead: 0,
        };
        self.held -= 1;
        self.free.push(id);
        self.released.push(id);
    }

    /// The record of `len` bytes at `addr` is dead (overwritten, deleted, or moved). A
    /// sealed segment left with no live bytes is given back ([`ArenaPlan::take_released`]).
    pub fn free(&mut self, addr: u64, len: u64) {
        let id = self.segment_of(addr);
        let seg = &mut self.segments[id as usize];
        debug_assert!(seg.state != State::Free && seg.live >= len);
        seg.live -= len;
        seg.dead += padded(len);
        self.live -= len;
        if seg.live == 0 && seg.state == State::Sealed {
            self.release(id);
        }
    }

    /// Segments given back since the last call and still free: the backend may free their
    /// memory. A segment given back and opened again since (a head emptied before it was
    /// sealed becomes the next head at once) is not among them: it holds new records.
    pub fn take_released(&mut self) -> Vec<u32> {
        let mut out = std::mem::take(&mut self.released);
        out.retain(|&id| self.segments[id as usize].state == State::Free);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Bytes held that compaction could give back: every segment in use but the head's
    /// unwritten tail, which the next records fill anyway.
    fn reclaimable_held(&self) -> u64 {
        let tail = self
            .head
            .map_or(0, |h| self.segment_bytes - self.segments[h as usize].fill);
        self.held * self.segment_bytes - tail
    }

    /// Whether the arena holds more than [`COMPACT_ABOVE`] times its live bytes, not
    /// counting the head's unwritten tail (compaction cannot give that back: a small table
    /// in one large segment is not fragmented).
    pub fn fragmented(&self) -> bool {
        self.reclaimable_held() as f64 > COMPACT_ABOVE * self.live as f64
    }

    /// The sealed segments to compact now, emptiest first, whose live bytes together stay
    /// within `max_live_bytes` (the first one always, if any qualifies): sealed segments
    /// with a dead record, chosen while what stays held is still
    /// [`fragmented`](Self::fragmented), and only when moving them gives back at least a
    /// whole segment. With `force` (room is needed under a budget), the choice stops only
    /// at the byte bound.
    pub fn victims(&self, max_live_bytes: u64, force: bool) -> Vec<u32> {
        if !force && !self.fragmented() {
            return Vec::new();
        }
        let qualifies = |s: &Segment| s.state == State::Sealed && s.dead > 0;
        let mut candidates: Vec<(u64, u32)> = self
            .segments
            .iter()
            .enumerate()
            .filter(|(_, s)| qualifies(s))
            .map(|(i, s)| (s.live, i as u32))
            .collect();
        candidates.sort_unstable();
        let mut out = Vec::new();
        let mut moved = 0u64;
        // Stop once what stays held would no longer be fragmented. Moving a victim gives
        // back its segment and takes its live bytes' worth at the head.
        let mut held = self.reclaimable_held();
        for (live, id) in candidates {
            if !out.is_empty() && moved + live > max_live_bytes {
                break;
            }
            if !force && held as f64 <= COMPACT_ABOVE * self.live as f64 {
                break;
            }
            out.push(id);
            moved += live;
            held -= self.segment_bytes - live;
        }
        // Moving records costs a scan of the index and their bytes: do it only when it
        // gives back at least one whole segment.
        let gained = out.len() as u64 * self.segment_bytes - moved;
        if !force && gained < self.segment_bytes {
            out.clear();
        }
        out
    }

    /// Counts `bytes` of live records as moved by compaction (for [`ArenaStats`]), and
    /// spends them from the allowance.
    pub fn count_compacted(&mut self, bytes: u64) {
        self.compacted += bytes;
        self.credit = self.credit.saturating_sub(bytes);
    }

    /// The live bytes compaction may move after a batch that wrote or freed
    /// `batch_bytes`: the batch's [`compaction_bound`] added to what earlier batches left
    /// unspent, at most [`COMPACT_CREDIT_SEGMENTS`] segments or the batch's own bound,
    /// whichever is larger (and at least one segment).
    ///
    /// A compaction runs only when it gives back a whole segment ([`Self::victims`]).
    /// With dead bytes spread evenly (uniform overwrites), a fraction `f` of each
    /// segment, that means moving `1/f - 1` segments' live bytes: more than a small
    /// batch's own bound, so without saving up, a stream of small batches would never
    /// compact and the arena would drift far past [`COMPACT_ABOVE`]. Saved up, the
    /// moves stay at [`COMPACT_PER_BATCH`] times the bytes written, on average.
    ///
    /// ```
    /// use kv_arena::{ArenaPlan, COMPACT_PER_BATCH};
    /// let seg = 1 << 16;
    /// let mut plan = ArenaPlan::new(seg, None);
    /// assert_eq!(plan.compaction_allowance(100), seg); // at least a segment
    /// let saved = plan.compaction_allowance(seg);
    /// assert_eq!(saved, 100 * COMPACT_PER_BATCH + seg * COMPACT_PER_BATCH);
    /// plan.count_compacted(saved);
    /// assert_eq!(plan.compaction_allowance(0), seg);
    /// // A batch larger than the savings' cap keeps its own bound.
    /// let big = 64 * seg;
    /// assert_eq!(plan.compaction_allowance(big), big * COMPACT_PER_BATCH);
    /// ```
    pub fn compaction_allowance(&mut self, batch_bytes: u64) -> u64 {
        let own = batch_bytes.saturating_mul(COMPACT_PER_BATCH);
        // A large batch keeps its own bound whole; only the savings are capped.
        let cap = self
            .segment_bytes
            .saturating_mul(COMPACT_CREDIT_SEGMENTS)
            .max(own);
        self.credit = self.credit.saturating_add(own).min(cap);
        self.credit.max(self.segment_bytes)
    }

    /// Empties the arena: every segment is given back.
    pub fn clear(&mut self) {
        for id in 0..self.segments.len() as u32 {
            if self.segments[id as usize].state != State::Free {
                self.release(id);
            }
        }
        self.head = None;
        self.live = 0;
        self.credit = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform overwrites in small batches (each a few records, far less than a segment's
    /// worth): with the allowance saved up over batches, compaction keeps what the arena
    /// holds within a few points of `COMPACT_ABOVE`; with each batch's own bound alone
    /// it drifts far past it.
    #[test]
    fn small_batches_save_up_for_compaction() {
        let seg = 1u64 << 16;
        let simulate = |saving: bool| -> f64 {
            let mut plan = ArenaPlan::new(seg, None);
            let len = 1000u64;
            let n = 6000usize;
            let mut addrs = plan.place(&vec![len; n]).expect("place").addrs;
            let mut x = 7u64;
            let mut worst = 0f64;
            for batch in 0..8_000 {
                // Eight records overwritten: the old places die, the new ones are placed.
                let mut picks: Vec<usize> = (0..8)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (x >> 33) as usize % n
                    })
                    .collect();
                picks.sort_unstable();
                picks.dedup();
                for &i in &picks {
                    plan.free(addrs[i], len);
                }
                let placed = plan.place(&vec![len; picks.len()]).expect("place");
                for (&i, &a) in picks.iter().zip(&placed.addrs) {
                    addrs[i] = a;
                }
                let written = len * picks.len() as u64;
                let bound = if saving {
                    plan.compaction_allowance(written)
                } else {
                    compaction_bound(written, seg)
                };
                let victims = plan.victims(bound, false);
                let moving: Vec<usize> = (0..n)
                    .filter(|&i| victims.contains(&plan.segment_of(addrs[i])))
                    .collect();
                let moved = plan.place(&vec![len; moving.len()]).expect("place");
                for (&i, &a) in moving.iter().zip(&moved.addrs) {
                    plan.free(addrs[i], len);
                    addrs[i] = a;
                }
                plan.count_compacted(len * moving.len() as u64);
                plan.take_released();
                if batch > 4_000 {
                    let s = plan.stats();
                    worst = worst.max(s.held_bytes as f64 / s.live_bytes as f64);
                }
            }
            worst
        };
        let saved = simulate(true);
        let alone = simulate(false);
        assert!(
            saved < 1.16,
            "with saving up: held / live reached {saved:.3}"
        );
        assert!(
            alone > 1.25,
            "without: {alone:.3} (the case this test is for)"
        );
    }

    #[test]
    fn records_never_straddle_segments() {
        let mut a = ArenaPlan::new(32, None);
        let p = a.place(&[10, 10, 10, 1]).expect("placed");
        assert_eq!(p.addrs, [0, 16, 32, 48]);
        assert_eq!(p.opened, [0, 1]);
        assert!(a.place(&[33]).is_err());
        assert_eq!(a.stats().live_bytes, 31);
    }

    #[test]
    fn a_failed_placement_changes_nothing() {
        let mut a = ArenaPlan::new(16, Some(32));
        a.place(&[16]).expect("placed");
        let before = a.stats();
        let err = a.place(&[16, 16]).expect_err("refused");
        assert!(matches!(
            err,
            Error::BudgetExceeded {
                requested_bytes: 48,
                budget_bytes: 32,
                ..
            }
        ));
        assert_eq!(a.stats(), before);
        a.place(&[16]).expect("placed");
    }

    #[test]
    fn emptied_segments_come_back_and_are_reused() {
        let mut a = ArenaPlan::new(16, Some(32));
        let p = a.place(&[16, 16]).expect("placed");
        a.free(p.addrs[0], 16);
        assert_eq!(a.take_released(), [0]);
        let q = a.place(&[8]).expect("placed");
        assert_eq!(q.opened, [0]);
        assert_eq!(a.stats().segments, 2);
    }

    #[test]
    fn victims_are_the_emptiest_sealed_segments_within_the_bound() {
        let mut a = ArenaPlan::new(64, None);
        let p = a.place(&[32, 32, 32, 32, 32, 32, 32]).expect("placed");
        // Segments 0, 1, 2 sealed (two records each), 3 is the head.
        a.free(p.addrs[0], 32); // segment 0: 32 live
        a.free(p.addrs[2], 32); // segment 1: 32 live
        assert!(a.fragmented());
        // One victim would give back half a segment only: not worth a scan.
        assert!(a.victims(32, false).is_empty());
        assert_eq!(a.victims(1000, false), [0, 1]);
        assert_eq!(
            a.victims(32, true),
            [0],
            "room under a budget takes what it can"
        );
        a.free(p.addrs[4], 32);
        a.free(p.addrs[5], 32); // segment 2 emptied: released
        assert_eq!(a.take_released(), [2]);
    }

    #[test]
    fn a_segment_given_back_and_reopened_is_not_released() {
        let mut a = ArenaPlan::new(16, None);
        let p = a.place(&[16]).expect("placed");
        a.free(p.addrs[0], 16); // the head is empty but not sealed
        assert!(a.take_released().is_empty());
        // The next record seals the empty head, which is given back and reopened at once.
        let q = a.place(&[8]).expect("placed");
        assert_eq!(q.opened, [0]);
        assert!(
            a.take_released().is_empty(),
            "segment 0 holds the new record"
        );
    }

    #[test]
    fn clear_gives_every_segment_back() {
        let mut a = ArenaPlan::new(64, None);
        a.place(&[40, 40, 40]).expect("placed");
        a.clear();
        assert_eq!(a.stats().held_bytes, 0);
        assert_eq!(a.stats().live_bytes, 0);
        let mut r = a.take_released();
        r.sort();
        assert_eq!(r, [0, 1, 2]);
    }
}
