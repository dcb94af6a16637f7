//! The per-item algorithms of the cache-table kernels (docs/cache.md), generic over
//! [`Mem`] like the rest of [`crate::ops`].
//!
//! A cache table's slots are cut into buckets of [`CACHE_BUCKET`] slots; a key lives only in
//! its home bucket ([`cache_bucket`]). Each bucket has a `used` word (bit `j`: slot `j`
//! holds an entry, perhaps an expired one) and a lock word.
//!
//! # A put (two or three kernels)
//!
//! 1. [`dedup`] (every item): the key is recorded in a batch-local table (a slot claimed
//!    with a CAS of `1 + i`; a slot already claimed belongs to the key `keys_in[j]` of its
//!    claimer), and the item's rank ([`dedup_rank`]: `1 + i`) is maxed into the slot's
//!    `pick` word and 1 added to its `occurs` word. When the pass ends, each distinct key's
//!    slot names its last occurrence and counts its occurrences.
//! 2. [`put`] (a group of [`GROUP_LANES`] lanes per item, four items a warp, each group
//!    walking its items with [`put_items`]): only the
//!    last occurrence of each key acts (so the last occurrence wins whatever the order in
//!    which the groups run, even when an entry put by the batch is evicted by another key
//!    of the batch), with the key's whole count of occurrences (an LFU score adds one per
//!    occurrence). The item's row is read first, into the lanes' registers. The group's
//!    first lane takes the home bucket's lock (a CAS of the lock word from 0 to 1, then a
//!    fence; an item whose bucket is held is put aside while the group goes on with its
//!    next items, since about two in five keys of a large batch share their bucket with
//!    another), and a barrier of the group ([`Group::group_sync`]) orders the other lanes
//!    after it. Lane `l` reads slots `l`, `l + 8`, `l + 16` and `l + 24` (key, expiry time
//!    and score, device-scope loads: each load of the group one 64-byte run) beside the
//!    used word, and ors of the group's bit masks apply the rule of the CPU backend's
//!    `CpuCache`: a live entry of the key is updated; else the key takes the first free or
//!    expired slot; else the entry of lowest `(score, slot)` (a min of the group, then an
//!    or of the slots that hold it) is evicted, or the new key itself is turned away when
//!    its score is lower still. The first lane writes the slot's key, score, expiry time
//!    and the used bit, the group the row (lane `l` words `l`, `l + 8`, ...), then a
//!    barrier, and the first lane fences and releases the lock (an atomic and with 0).
//!    The item's report (the entry it evicted, or itself turned away) is written under the
//!    lock at the item's own place of the eviction scratch ([`EvScratch`]), with a flag per
//!    item: no atomic (run 36 of docs/perf-log/2026-12-h200.md: one shared counter for the
//!    places cost a quarter of the put's time). The kernel counts reports per warp
//!    (EVICTED).
//! 3. [`compact`] (a warp per 32 items, when the put wants its evicted entries): a ballot
//!    of the flags and one atomic a warp (COMPACTED) give the reports their places in the
//!    evicted outputs, first `m` places, in no particular order.
//!
//! A group rather than a warp per item: a put waits on a chain of dependent reads and
//! atomics and does little between them, so the more items a warp has in flight the
//! better (run 30 of docs/perf-log/2026-12-h200.md measured a warp per item). The group
//! steps are written once, generic over [`Group`] (and the take's warp steps over
//! [`Warp`]): the device runs them on its lanes, the host tests on one thread that plays
//! the lanes in turn.
//!
//! *Digests.* As HierarchicalKV does, a byte per slot (a digest of its key) lets a lookup
//! read 32 bytes of a bucket before any key instead of its 256 bytes of keys (run 31 of
//! docs/perf-log/2026-12-h200.md: the lookup's DRAM was half busy, a quarter of it on
//! keys). The put still reads the bucket's keys: it reads the whole bucket anyway, for the
//! expiry times and scores its rule needs.
//!
//! Within a bucket the groups of one batch apply their keys in any order: the contract
//! allows a GPU that (docs/cache.md, item 8). So that ties do not depend on that order
//! under LRU, a stored LRU score carries the item's place in its batch below the clock
//! ([`lru_score`]): of the entries one batch wrote, the one written by the earliest item
//! leaves first, as on the CPU where a batch fills a bucket's slots in order. Evictions
//! report, and the turned-away rule compares, the clock alone ([`visible_score`]).
//!
//! # Lookups and removals
//!
//! [`lookup`] (get, peek, contains) takes no lock and gives each item a group of
//! [`GROUP_LANES`] lanes rather than a warp ([`Group`]): a lookup waits on three dependent
//! loads (the key in, the bucket's digests, the candidate entry) and does little between
//! them, so four items a warp keep four times as many loads in flight. The group reads the
//! bucket's 32 digests ([`cache_digest`], one byte a slot, written by the put with the key)
//! in one 32-byte run; a slot in use whose digest matches is a candidate, whose key, expiry
//! time and row are read together, and the first live candidate holding the key is the
//! answer. A get's score change is one atomic by the group's first lane (an LRU max of the
//! clock, an LFU add of one, per occurrence). [`take`] (take and delete; a warp per item)
//! clears the entry's used bit with an atomic and, and counts a removal only when the bit
//! was set, so a repeated key counts once; a take first runs [`dedup`] with the first
//! occurrence winning, so that the first occurrence is the one that returns the row.
//! [`dedup`] and [`count_live`] stay a thread per item (per bucket).

use super::{Group, Mem, Warp, group_lane0, lane0, row_word_of, w32, w64, warp_copy_row};
use crate::layout::{
    CACHE_BUCKET, CacheArgs, EvScratch, GROUP_LANES, cache_bucket, cache_counter, cache_digest,
    cache_policy, dedup_rank, home_slot, next_slot,
};

/// Bits below the clock in a stored LRU score ([`lru_score`]).
pub const LRU_ORDER_BITS: u32 = 32;

/// The score an LRU table stores for an access at logical clock `clock` by item `i` of its
/// batch: the clock above [`LRU_ORDER_BITS`], the item's place in the batch below it. The
/// score a caller sees ([`visible_score`]) is the clock; the bits below only break ties
/// between entries of one batch, so that the entry written by the earlier item leaves
/// first (groups of one batch take a bucket in any order, and the slot order of its
/// entries says nothing). Clocks stay below 2^32 (four billion batches).
#[inline(always)]
pub const fn lru_score(clock: u64, i: u64) -> u64 {
    (clock << LRU_ORDER_BITS) | ((i + 1) & 0xffff_ffff)
}

/// The score of a stored `score` as the contract states it (what evictions report and
/// what decides whether a new key is turned away): the clock of an LRU score, the stored
/// score itself under the other policies.
#[inline(always)]
pub const fn visible_score(policy: u32, score: u64) -> u64 {
    if policy == cache_policy::LRU {
        score >> LRU_ORDER_BITS
    } else {
        score
    }
}

/// The local slot of an item whose probe of the batch-local table found no room.
pub const NO_SLOT: u32 = u32::MAX;

/// Whether an entry with expiry time `expires` has expired at `now`.
#[inline(always)]
const fn expired(expires: u64, now: u64) -> bool {
    expires != 0 && expires <= now
}

/// The expiry time of an entry put at `now` with a time to live of `ttl` ms (0: never).
#[inline(always)]
pub const fn expiry(now: u64, ttl: u64) -> u64 {
    if ttl == 0 {
        0
    } else {
        let e = now.saturating_add(ttl);
        if e == 0 { 1 } else { e }
    }
}

/// Dedup pass for item `i`: record its key in the batch-local table and its rank and
/// occurrence in the key's slot. Returns `false` when the probe found no room (a broken
/// invariant: the table has at least twice the batch's slots); the item then acts for no
/// one.
///
/// # Safety
/// `a` describes valid device buffers (`local`, `pick` and `occurs` zeroed, of
/// `local_mask + 1` slots; `slot_of` of `n`), and `i < a.n`.
#[inline(always)]
pub unsafe fn dedup<M: Mem>(a: &CacheArgs, i: u64) -> bool {
    // SAFETY: i < n; keys_in holds n words.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let me = (i + 1) as u32;
    let mask = a.local_mask;
    let mut pos = home_slot(key, a.table.seed, mask);
    let mut steps = 0u64;
    let found = loop {
        // SAFETY: pos <= local_mask: inside the local table.
        let cur = unsafe { M::cas_u32(w32(a.local, pos), 0, me) };
        // SAFETY: a claimed slot holds 1 + j with j < n.
        if cur == 0 || unsafe { M::load(w64(a.keys_in, cur as u64 - 1)) } == key {
            break true;
        }
        pos = next_slot(pos, mask);
        steps += 1;
        if steps > mask {
            break false;
        }
    };
    let slot = if found { pos as u32 } else { NO_SLOT };
    // SAFETY: slot_of holds n u32 words; pick and occurs hold local_mask + 1.
    unsafe {
        M::store_u32(w32(a.slot_of, i), slot);
        if found {
            if a.pick != 0 {
                M::max_u32(w32(a.pick, pos), dedup_rank(i, a.n, a.first_wins != 0));
            }
            if a.occurs != 0 {
                M::add_u32(w32(a.occurs, pos), 1);
            }
        }
    }
    found
}

/// Whether item `i` acts for its key (the dedup pass ran, unless `a.pick` is 0: then every
/// item acts), and how many times its key occurs in the batch.
///
/// # Safety
/// As [`dedup`], after it ran.
#[inline(always)]
unsafe fn acts<M: Mem>(a: &CacheArgs, i: u64) -> Option<u64> {
    if a.pick == 0 {
        return Some(1);
    }
    // SAFETY: slot_of holds n u32 words, written by the dedup pass.
    let s = unsafe { M::load_u32(w32(a.slot_of, i)) };
    if s == NO_SLOT {
        return None;
    }
    // SAFETY: s <= local_mask.
    let rank = unsafe { M::load_u32(w32(a.pick, s as u64)) };
    if rank != dedup_rank(i, a.n, a.first_wins != 0) {
        return None;
    }
    if a.occurs == 0 {
        return Some(1);
    }
    // SAFETY: as above.
    Some(u64::from(unsafe { M::load_u32(w32(a.occurs, s as u64)) }))
}

/// What [`put`] did for one item.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachePutItem {
    /// The item was the occurrence of its key that acts (the last one).
    pub acted: bool,
    /// It evicted an entry, or was turned away (either way reported).
    pub evicted: bool,
    /// It took the slot of an expired entry.
    pub expired_reused: bool,
    /// The dedup pass found no room for it (a broken invariant).
    pub lost: bool,
    /// Asked not to wait, it found its bucket's lock held and did nothing: it is to be put
    /// again ([`put_items`]).
    pub busy: bool,
}

/// Words of a row that each lane of a group holds in registers (words `l` and `l + 8` of
/// lane `l`): rows of up to `ROW_HELD * GROUP_LANES` words, every width the tables allow,
/// are read in one step beside other reads; words past them are copied after.
const ROW_HELD: usize = 2;
const _: () = assert!(ROW_HELD == 2, "the held words are read written out");

/// Lane `l`'s held words of the row at `row` (`width` words; zeros past it), read at device
/// scope when `sync`.
///
/// # Safety
/// `row` holds `width` words.
#[inline(always)]
unsafe fn held_words<M: Mem>(row: u64, l: u32, width: u64, sync: bool) -> [u64; ROW_HELD] {
    let g = u64::from(GROUP_LANES);
    let (j0, j1) = (u64::from(l), u64::from(l) + g);
    let load = |j: u64| {
        if j >= width {
            0
        } else if sync {
            // SAFETY: j < width.
            unsafe { M::load_sync(w64(row, j)) }
        } else {
            // SAFETY: j < width.
            unsafe { M::load(w64(row, j)) }
        }
    };
    // Written out, not looped, so that both reads are in flight together.
    [load(j0), load(j1)]
}

/// Lane `l`'s part of writing a row of `width` words at `dst`: its held words, then its
/// words past them copied from `src` (read at device scope when `sync`; 0: zeros).
///
/// # Safety
/// `dst` (and `src` unless 0) hold `width` words and do not overlap.
#[inline(always)]
unsafe fn write_row<M: Mem>(
    dst: u64,
    l: u32,
    width: u64,
    held: [u64; ROW_HELD],
    src: u64,
    sync: bool,
) {
    let g = u64::from(GROUP_LANES);
    let (j0, j1) = (u64::from(l), u64::from(l) + g);
    // The held words are written out, not looped: an array indexed by a value held in a
    // register would be moved to local memory.
    if j0 < width {
        // SAFETY: j0 < width.
        unsafe { M::store(w64(dst, j0), held[0]) };
    }
    if j1 < width {
        // SAFETY: j1 < width.
        unsafe { M::store(w64(dst, j1), held[1]) };
    }
    let mut j = j1 + g;
    while j < width {
        // SAFETY: j < width.
        unsafe { M::store(w64(dst, j), row_word_of::<M>(src, j, sync)) };
        j += g;
    }
}

/// An entry a put evicted or turned away, as its group holds it: key, score, expiry
/// time, the lanes' held words of its row, and where its row is (read at device scope when
/// `sync`: a table row).
#[derive(Clone, Copy)]
struct Gone<H: Copy> {
    key: u64,
    score: u64,
    expires: u64,
    held: H,
    row: u64,
    sync: bool,
}

/// Writes item `i`'s report `g` at place `i` of the put's eviction scratch (key, score and
/// expiry time by the group's first lane, the row by the group; its flag is written by
/// [`put`]); nothing when the put only counts its reports. No atomic: the compaction pass
/// gathers the reports.
///
/// # Safety
/// `a` describes valid buffers (the scratch for `n` items of `width` words); `i < n`; the
/// row holds `width` words, and a table row is as it was (the caller holds the bucket's
/// lock); a collective of `M`.
#[inline(always)]
unsafe fn report<M: Group>(a: &CacheArgs, i: u64, g: Gone<M::GroupLanes<[u64; ROW_HELD]>>) {
    if a.ev_scratch == 0 {
        return;
    }
    let t = &a.table;
    let w = u64::from(t.width);
    let x = EvScratch::at(a.ev_scratch, a.n, t.width);
    // SAFETY: i < n: inside each part of the scratch.
    unsafe {
        group_lane0::<M>(|| {
            M::store(w64(x.keys, i), g.key);
            M::store(w64(x.scores, i), g.score);
            M::store(w64(x.expires, i), g.expires);
        });
        let dst = w64(x.rows, i * w);
        M::group_map(g.held, |l, h| write_row::<M>(dst, l, w, h, g.row, g.sync));
    }
}

/// Moves the reports of items `first .. first + 32` (lane `l`: item `first + l`, if below
/// `n`) from the put's eviction scratch to the evicted outputs: a ballot of their flags,
/// one atomic on the COMPACTED counter for the warp's places, then each reporting lane
/// copies its entry (key, score, expiry time, row) to its place.
///
/// # Safety
/// `a` describes valid buffers: the scratch as the put pass left it, the outputs with room
/// for `n` entries; a collective of `M`.
#[inline(always)]
pub unsafe fn compact<M: Warp>(a: &CacheArgs, first: u64) {
    let t = &a.table;
    let w = u64::from(t.width);
    let x = EvScratch::at(a.ev_scratch, a.n, t.width);
    let flagged = M::lanes(|l| {
        let i = first + u64::from(l);
        // SAFETY: i < n: inside the flags.
        i < a.n && unsafe { M::load_u8(x.flags + i) } != 0
    });
    // SAFETY: collectives of the warp (every lane reaches them).
    let mask = unsafe { M::ballot(flagged) };
    if mask == 0 {
        return;
    }
    // SAFETY: the counter buffer holds cache_counter::LEN words.
    let base = unsafe {
        M::one(|| {
            M::fetch_add(
                w64(t.counters, cache_counter::COMPACTED as u64),
                u64::from(mask.count_ones()),
            )
        })
    };
    M::map(flagged, |l, f| {
        if !f {
            return;
        }
        let i = first + u64::from(l);
        let at = base + u64::from((mask & ((1u32 << l) - 1)).count_ones());
        // SAFETY: i < n; at < n (the put reported at most n entries, each once); the
        // rows hold width words.
        unsafe {
            M::store(w64(a.ev_keys, at), M::load(w64(x.keys, i)));
            M::store(w64(a.ev_scores, at), M::load(w64(x.scores, i)));
            if a.ev_expires != 0 {
                M::store(w64(a.ev_expires, at), M::load(w64(x.expires, i)));
            }
            let mut j = 0;
            while j < w {
                M::store(w64(a.ev_rows, at * w + j), M::load(w64(x.rows, i * w + j)));
                j += 1;
            }
        }
    });
}

/// What a lane read of its slots of a bucket (slots `l`, `l + 8`, `l + 16`, `l + 24` of
/// lane `l`): keys, expiry times and scores.
#[derive(Clone, Copy)]
struct Quad {
    key: [u64; 4],
    expires: [u64; 4],
    score: [u64; 4],
}

/// Slot `j`'s word of what the lanes read (`field` picks keys, expiry times or scores):
/// the lane that read it gives it to the group.
///
/// # Safety
/// A collective of `M`; `j < CACHE_BUCKET`.
#[inline(always)]
unsafe fn slot_word<M: Group>(
    read: M::GroupLanes<Quad>,
    j: u32,
    field: impl Fn(&Quad) -> [u64; 4] + Copy,
) -> u64 {
    let k = j / GROUP_LANES;
    // The word is picked with constant indices: an array indexed by a value held in a
    // register would be moved to local memory.
    let pick = move |q: Quad| {
        let v = field(&q);
        match k {
            0 => v[0],
            1 => v[1],
            2 => v[2],
            _ => v[3],
        }
    };
    // SAFETY: forwarded.
    unsafe { M::group_shfl(M::group_map(read, |_, q| pick(q)), j % GROUP_LANES) }
}

/// Put pass for item `i`, by a group of [`GROUP_LANES`] lanes (see the module docs): the
/// item's row is read first; the group's first lane takes the bucket's lock; lane `l` reads
/// slots `l`, `l + 8`, `l + 16` and `l + 24` (key, expiry time and score) beside the used
/// word; ors of the group find the key's live entry and the first free or expired slot; a
/// full bucket's victim is the lowest `(score, slot)` (a min of the group, then an or of
/// the slots that hold it); the first lane writes the slot's key, score and expiry time,
/// the group the row, and the first lane releases the lock. Every lane returns the same
/// result. When `wait` is false and the bucket's lock is held, it does nothing and says
/// so ([`CachePutItem::busy`]).
///
/// # Safety
/// `a` describes valid device buffers for `n` items, the dedup pass ran (or `a.pick` is 0
/// and the batch has no repeated key), every lock word is 0 or held by a running group of
/// this pass, `i < a.n`, and all lanes of the group call it with the same `i` (a collective
/// of `M`).
#[inline(always)]
pub unsafe fn put<M: Group>(a: &CacheArgs, i: u64, wait: bool) -> CachePutItem {
    const G: u64 = GROUP_LANES as u64;
    const _: () = assert!(CACHE_BUCKET == 4 * G, "a lane reads four slots");
    let mut out = CachePutItem::default();
    let t = &a.table;
    let w = u64::from(t.width);
    // The item's inputs are read before the dedup pass's words (and whether the item acts
    // is known), so that both reads are in flight together.
    // SAFETY: i < n; the inputs hold n items.
    let (key, ttl, given) = unsafe {
        (
            M::load(w64(a.keys_in, i)),
            if a.ttl_in == 0 {
                0
            } else {
                M::load(w64(a.ttl_in, i))
            },
            if a.scores_in == 0 {
                0
            } else {
                M::load(w64(a.scores_in, i))
            },
        )
    };
    let row_in = w64(a.values, i * w);
    // SAFETY: the item's row holds width words.
    let held_in = M::group_lanes(|l| unsafe { held_words::<M>(row_in, l, w, false) });
    // SAFETY: the dedup pass ran.
    let occurs = match unsafe { acts::<M>(a, i) } {
        Some(c) => c,
        None => {
            // SAFETY: as above; i < n (the flag).
            unsafe {
                out.lost = a.pick != 0 && M::load_u32(w32(a.slot_of, i)) == NO_SLOT;
                flag::<M>(a, i, false);
            }
            return out;
        }
    };
    out.acted = true;
    let expires = expiry(a.now, ttl);
    let b = cache_bucket(key, t.seed, t.buckets);
    let base = b * CACHE_BUCKET;
    let lock = w32(t.locks, b);
    // SAFETY: b < buckets; the lock words are valid. The first lane tries (or, when it is
    // to wait, spins) alone; the group's barrier then orders every lane's reads of the
    // bucket after its acquire. A group holds one lock at a time, and the holder of any
    // lock is a running group (lanes of one warp that diverge still each make progress),
    // so the spin ends.
    let got = unsafe {
        M::group_one(|| {
            if wait {
                while M::cas_u32(lock, 0, 1) != 0 {}
            } else if M::cas_u32(lock, 0, 1) != 0 {
                return 0;
            }
            M::fence();
            1
        })
    } != 0;
    if !got {
        return CachePutItem {
            busy: true,
            ..CachePutItem::default()
        };
    }
    // SAFETY: a collective of the group.
    unsafe { M::group_sync() };
    // Every lane reads its four slots, in use or not (a slot not in use is never live, and
    // its stale words are never used), and the first lane the used word after them, so
    // that all the reads are in flight together.
    let read = M::group_lanes(|l| {
        let mut q = Quad {
            key: [0; 4],
            expires: [0; 4],
            score: [0; 4],
        };
        let mut k = 0;
        while k < 4 {
            let s = base + u64::from(l) + k as u64 * G;
            // SAFETY: s < slots; other groups write this bucket only under its lock.
            unsafe {
                q.key[k] = M::load_sync(w64(t.keys, s));
                q.expires[k] = M::load_sync(w64(t.expires, s));
                q.score[k] = M::load_sync(w64(t.scores, s));
            }
            k += 1;
        }
        q
    });
    // SAFETY: b < buckets; a collective (every branch below is on values the group shares).
    let used = unsafe { M::group_one(|| u64::from(M::load_u32_sync(w32(t.used, b)))) } as u32;
    let live = |j: u64, e: u64| used & (1 << j) != 0 && !expired(e, a.now);
    let masks = M::group_map(read, |l, q| {
        let (mut hits, mut free) = (0u32, 0u32);
        let mut k = 0;
        while k < 4 {
            let j = u64::from(l) + k as u64 * G;
            if !live(j, q.expires[k]) {
                free |= 1 << j;
            } else if q.key[k] == key {
                hits |= 1 << j;
            }
            k += 1;
        }
        (hits, free)
    });
    // SAFETY: collectives of the group.
    let (hits, free) = unsafe {
        (
            M::group_or(M::group_map(masks, |_, m| m.0)),
            M::group_or(M::group_map(masks, |_, m| m.1)),
        )
    };
    let (hit, free) = (hits.trailing_zeros(), free.trailing_zeros());
    let none = CACHE_BUCKET as u32;
    let mut gone = None;
    let put_at = if hit != none {
        let score = match t.policy {
            cache_policy::LRU => lru_score(a.clock, i),
            cache_policy::LFU => {
                // SAFETY: a collective; hit < CACHE_BUCKET.
                unsafe { slot_word::<M>(read, hit, |q| q.score) }.saturating_add(occurs)
            }
            _ => given,
        };
        Some((hit, score))
    } else {
        let score = match t.policy {
            cache_policy::LRU => lru_score(a.clock, i),
            cache_policy::LFU => occurs,
            _ => given,
        };
        if free != none {
            out.expired_reused = used & (1 << free) != 0;
            Some((free, score))
        } else {
            // Full (every slot live): the lowest (score, slot) leaves, the new key itself if
            // its score is lower still (ties go against the entry already there).
            out.evicted = true;
            // SAFETY: collectives of the group.
            let (low, victim) = unsafe {
                let low = M::group_min(M::group_map(read, |_, q| {
                    q.score[0].min(q.score[1]).min(q.score[2].min(q.score[3]))
                }));
                let at = M::group_map(read, |l, q| {
                    let mut m = 0u32;
                    let mut k = 0;
                    while k < 4 {
                        if q.score[k] == low {
                            m |= 1 << (u64::from(l) + k as u64 * G);
                        }
                        k += 1;
                    }
                    m
                });
                (low, M::group_or(at).trailing_zeros())
            };
            if visible_score(t.policy, score) < visible_score(t.policy, low) {
                gone = Some(Gone {
                    key,
                    score: visible_score(t.policy, score),
                    expires,
                    held: held_in,
                    row: row_in,
                    sync: false,
                });
                None
            } else {
                let row = w64(t.rows, (base + u64::from(victim)) * w);
                // SAFETY: collectives; victim < CACHE_BUCKET; the victim's row holds width
                // words, read under the lock, before the new row replaces it.
                gone = Some(unsafe {
                    Gone {
                        key: slot_word::<M>(read, victim, |q| q.key),
                        score: visible_score(t.policy, low),
                        expires: slot_word::<M>(read, victim, |q| q.expires),
                        held: M::group_lanes(|l| held_words::<M>(row, l, w, true)),
                        row,
                        sync: true,
                    }
                });
                Some((victim, score))
            }
        }
    };
    // The report is written under the lock, before the slot changes: run 37 of
    // docs/perf-log/2026-12-h200.md wrote it after the lock was let go and the put ran at
    // two thirds of the speed (the lock's release fence then waited for the evicted row's
    // reads, still in flight).
    if let Some(g) = gone {
        // SAFETY: i < n; the lock is held, so the evicted row is as it was.
        unsafe { report::<M>(a, i, g) };
    }
    if let Some((j, score)) = put_at {
        let s = base + u64::from(j);
        // SAFETY: s < slots, b < buckets; row_in holds width words and the slot's row too.
        // A lane that copied the victim's row out read each of its words before it writes
        // them here.
        unsafe {
            group_lane0::<M>(|| {
                if hit == none {
                    M::store_u32(w32(t.used, b), used | (1 << j));
                    M::store(w64(t.keys, s), key);
                    M::store_u8(t.digests + s, cache_digest(key, t.seed));
                }
                M::store(w64(t.scores, s), score);
                M::store(w64(t.expires, s), expires);
            });
            let dst = w64(t.rows, s * w);
            M::group_map(held_in, |l, h| write_row::<M>(dst, l, w, h, row_in, false));
        }
    }
    // SAFETY: the lock is held by this group's first lane; the barrier orders every lane's
    // writes before its release.
    unsafe {
        M::group_sync();
        group_lane0::<M>(|| {
            M::fence();
            M::and_u32(lock, 0);
        });
    }
    // SAFETY: i < n.
    unsafe { flag::<M>(a, i, out.evicted) };
    out
}

/// The put pass over one group's items (`items`, in its order), handing each item's
/// result to `done`: an item whose bucket's lock is held is put aside, and the group goes
/// on with its next items; it is put again, waiting for the lock, when another item finds
/// a lock held (the older one goes, the newer one is put aside) or after the last item. So
/// a group waits on a lock only when two of its items met held locks, and the wait is
/// shorter. Within a bucket, the items of a batch apply in any order (docs/cache.md, item
/// 8); each item applies once.
///
/// # Safety
/// As [`put`], for every item.
#[inline(always)]
pub unsafe fn put_items<M: Group>(
    a: &CacheArgs,
    items: impl Iterator<Item = u64>,
    mut done: impl FnMut(CachePutItem),
) {
    let mut items = items;
    // The item put aside, and one to put next, waiting. One call of `put` below, so that
    // the kernel holds its code once.
    let (mut aside, mut next) = (None, None);
    loop {
        let (i, wait) = if let Some(j) = next.take() {
            (j, true)
        } else if let Some(i) = items.next() {
            (i, false)
        } else if let Some(j) = aside.take() {
            (j, true)
        } else {
            break;
        };
        // SAFETY: forwarded.
        let p = unsafe { put::<M>(a, i, wait) };
        if !p.busy {
            done(p);
        } else {
            next = aside.replace(i);
        }
    }
}

/// Item `i`'s flag in the put's eviction scratch (whether it reported an entry), when the
/// put wants its evicted entries: every item writes its own, so the flags need no zeroing.
///
/// # Safety
/// As [`report`].
#[inline(always)]
unsafe fn flag<M: Group>(a: &CacheArgs, i: u64, reported: bool) {
    if a.ev_scratch != 0 {
        let flags = EvScratch::at(a.ev_scratch, a.n, a.table.width).flags;
        // SAFETY: i < n: inside the flags.
        unsafe { group_lane0::<M>(|| M::store_u8(flags + i, reported as u8)) };
    }
}

/// The slot (in the table) of `key`'s live entry, if it has one: lane `j` compares slot
/// `j`'s key (a coalesced load of the bucket's keys) and, where it matches, reads its
/// expiry time; a ballot picks the first live match.
///
/// # Safety
/// `a` describes valid device buffers; `used` is the bucket's used word; a collective of
/// `M`.
#[inline(always)]
unsafe fn find<M: Warp>(a: &CacheArgs, key: u64, base: u64, used: u32) -> Option<u64> {
    let t = &a.table;
    let live = M::lanes(|j| {
        let s = base + u64::from(j);
        // SAFETY: s < slots.
        used & (1 << j) != 0
            && unsafe { M::load(w64(t.keys, s)) } == key
            && !expired(unsafe { M::load(w64(t.expires, s)) }, a.now)
    });
    // SAFETY: forwarded.
    let m = unsafe { M::ballot(live) };
    (m != 0).then(|| base + u64::from(m.trailing_zeros()))
}

/// Writes item `i`'s outputs of a lookup: its row (from `slot`, zeros for none; copied by
/// the warp) when rows are wanted, and its found flag (by lane 0) when flags are.
///
/// # Safety
/// `a` describes valid device buffers for `n` items; `slot < slots`; a collective of `M`.
#[inline(always)]
unsafe fn write_out<M: Warp>(a: &CacheArgs, i: u64, slot: Option<u64>) {
    let t = &a.table;
    let w = u64::from(t.width);
    // SAFETY: the outputs hold n items; the slot's row width words.
    unsafe {
        if a.values != 0 {
            let src = slot.map_or(0, |s| w64(t.rows, s * w));
            warp_copy_row::<M>(w64(a.values, i * w), src, t.width, false);
        }
        if a.found_out != 0 {
            lane0::<M>(|| M::store_u8(a.found_out + i, slot.is_some() as u8));
        }
    }
}

/// A lookup between its reads: the item, its key, its bucket's first slot, the slots still
/// to try (in use, digest matching), and what the lanes read of the first of them.
#[derive(Clone, Copy)]
struct Probe<H: Copy> {
    i: u64,
    key: u64,
    base: u64,
    cand: u32,
    /// The first candidate's key, expiry time and the lanes' words of its row (zeros when
    /// there is no candidate).
    first: (u64, u64, H),
}

/// What a lookup's second step read: the bucket's used word and, per lane, four digests.
#[derive(Clone, Copy)]
struct BucketRead<D: Copy> {
    base: u64,
    used: u32,
    digests: D,
}

/// A lookup's second step for `key`: the bucket's used word and digests (lane `l` reads
/// those of slots `4l .. 4l + 3`, one 4-byte load; the group's loads are the bucket's 32
/// bytes), issued and not yet waited for.
///
/// # Safety
/// As [`lookup`].
#[inline(always)]
unsafe fn read_bucket<M: Group>(a: &CacheArgs, key: u64) -> BucketRead<M::GroupLanes<u32>> {
    let t = &a.table;
    let b = cache_bucket(key, t.seed, t.buckets);
    let base = b * CACHE_BUCKET;
    const _: () = assert!(
        CACHE_BUCKET == 4 * GROUP_LANES as u64,
        "a lane reads four digests"
    );
    BucketRead {
        base,
        // SAFETY: b < buckets; nothing writes the used words or digests during a lookup.
        used: unsafe { M::load_u32(w32(t.used, b)) },
        // SAFETY: the digests are 4-byte aligned and base + 4l + 3 < slots.
        digests: M::group_lanes(|l| unsafe { M::load_u32(t.digests + base + 4 * u64::from(l)) }),
    }
}

/// The candidates of a bucket read for item `i`'s `key`: the slots in use whose digest is
/// the key's.
///
/// # Safety
/// As [`lookup`]; a collective of the group.
#[inline(always)]
unsafe fn candidates<M: Group>(
    a: &CacheArgs,
    i: u64,
    key: u64,
    r: BucketRead<M::GroupLanes<u32>>,
) -> Probe<M::GroupLanes<[u64; ROW_HELD]>> {
    let want = u32::from(cache_digest(key, a.table.seed));
    let mine = M::group_map(r.digests, |l, d| {
        let mut bits = 0u32;
        let mut k = 0;
        while k < 4 {
            bits |= u32::from((d >> (8 * k)) & 0xff == want) << k;
            k += 1;
        }
        bits << (4 * l)
    });
    Probe {
        i,
        key,
        base: r.base,
        // SAFETY: a collective of the group (every lane calls it).
        cand: unsafe { M::group_or(mine) } & r.used,
        first: (0, 0, M::group_lanes(|_| [0; ROW_HELD])),
    }
}

/// The key, expiry time and (when rows are wanted) the lanes' row words of candidate
/// slot `s`, read together (every lane reads the same key and expiry words).
///
/// # Safety
/// As [`lookup`]; `s < slots`.
#[inline(always)]
unsafe fn read_candidate<M: Group>(
    a: &CacheArgs,
    s: u64,
) -> (u64, u64, M::GroupLanes<[u64; ROW_HELD]>) {
    let t = &a.table;
    let w = u64::from(t.width);
    // SAFETY: s < slots; the slot's row holds width words.
    unsafe {
        (
            M::load(w64(t.keys, s)),
            M::load(w64(t.expires, s)),
            if a.values != 0 {
                M::group_lanes(|l| held_words::<M>(w64(t.rows, s * w), l, w, false))
            } else {
                M::group_lanes(|_| [0; ROW_HELD])
            },
        )
    }
}

/// A lookup's third step: the first candidate's words.
///
/// # Safety
/// As [`lookup`].
#[inline(always)]
unsafe fn read_first<M: Group>(a: &CacheArgs, p: &mut Probe<M::GroupLanes<[u64; ROW_HELD]>>) {
    if p.cand != 0 {
        let s = p.base + u64::from(p.cand.trailing_zeros());
        // SAFETY: forwarded; s < slots.
        p.first = unsafe { read_candidate::<M>(a, s) };
    }
}

/// A lookup's last step: the first live candidate that holds the key (the first one read
/// already; the others, rare, read now) is the answer; its row and found flag are
/// written, and a get changes its score. Returns whether the key was found.
///
/// # Safety
/// As [`lookup`], after [`candidates`] and [`read_first`].
#[inline(always)]
unsafe fn answer<M: Group>(a: &CacheArgs, p: Probe<M::GroupLanes<[u64; ROW_HELD]>>) -> bool {
    let t = &a.table;
    let w = u64::from(t.width);
    let mut cand = p.cand;
    let (mut k, mut e, mut held) = p.first;
    let mut slot = None;
    while cand != 0 {
        let s = p.base + u64::from(cand.trailing_zeros());
        if k == p.key && !expired(e, a.now) {
            slot = Some(s);
            break;
        }
        cand &= cand - 1;
        if cand != 0 {
            let next = p.base + u64::from(cand.trailing_zeros());
            // SAFETY: forwarded; next < slots.
            (k, e, held) = unsafe { read_candidate::<M>(a, next) };
        }
    }
    if a.values != 0 {
        let dst = w64(a.values, p.i * w);
        let src = slot.map_or(0, |s| w64(t.rows, s * w));
        // A miss writes zeros (what the lanes hold may be another entry's row).
        let held = M::group_map(held, |_, h| if slot.is_some() { h } else { [0; ROW_HELD] });
        // SAFETY: the outputs hold n rows of width words; the slot's row width words.
        M::group_map(held, |l, h| unsafe {
            write_row::<M>(dst, l, w, h, src, false)
        });
    }
    // SAFETY: the outputs hold n flags; s < slots; a collective.
    unsafe {
        group_lane0::<M>(|| {
            if a.found_out != 0 {
                M::store_u8(a.found_out + p.i, slot.is_some() as u8);
            }
            if let Some(s) = slot
                && a.access != 0
            {
                match t.policy {
                    cache_policy::LRU => M::max_u64(w64(t.scores, s), lru_score(a.clock, p.i)),
                    cache_policy::LFU => M::add(w64(t.scores, s), 1),
                    _ => {}
                }
            }
        });
    }
    slot.is_some()
}

/// Get, peek or contains for item `i`, by a group of [`GROUP_LANES`] lanes: its row and
/// found flag; when `a.access` is set, the entry's score changes as an access says (LRU:
/// the clock; LFU: one more). Returns whether the key was found (in every lane).
///
/// The group reads the bucket's used word and 32 digests; a slot in use whose
/// digest is the key's is a candidate, whose key, expiry time and row are read together,
/// and the first candidate that holds the key and is live is the answer. A lookup thus
/// waits on three loads in a row (the key in, the bucket's digests, the candidate) and
/// then writes, and reads about a third of the bytes that the bucket's 32 keys would take.
///
/// # Safety
/// `a` describes valid device buffers for `n` items, `i < a.n`, and all lanes of the group
/// call it with the same `i` (a collective of `M`).
#[inline(always)]
pub unsafe fn lookup<M: Group>(a: &CacheArgs, i: u64) -> bool {
    // SAFETY: forwarded, step by step; i < n.
    unsafe {
        let key = M::load(w64(a.keys_in, i));
        let mut p = candidates::<M>(a, i, key, read_bucket::<M>(a, key));
        read_first::<M>(a, &mut p);
        answer::<M>(a, p)
    }
}

/// Two lookups, items `i` and `j`, by one group, their reads interleaved: each step's reads
/// of both items are in flight together, so a group waits on twice as many reads at once
/// as with [`lookup`]. Returns whether each key was found.
///
/// # Safety
/// As [`lookup`], for both `i` and `j` (which may be equal only if the lookup is not an
/// access).
#[inline(always)]
pub unsafe fn lookup_two<M: Group>(a: &CacheArgs, i: u64, j: u64) -> (bool, bool) {
    // SAFETY: forwarded, step by step; i, j < n. Each step issues both items' reads
    // before it uses either's.
    unsafe {
        let (ki, kj) = (M::load(w64(a.keys_in, i)), M::load(w64(a.keys_in, j)));
        let (ri, rj) = (read_bucket::<M>(a, ki), read_bucket::<M>(a, kj));
        let (mut p, mut q) = (candidates::<M>(a, i, ki, ri), candidates::<M>(a, j, kj, rj));
        read_first::<M>(a, &mut p);
        read_first::<M>(a, &mut q);
        (answer::<M>(a, p), answer::<M>(a, q))
    }
}

/// The lookups of pair `p` of a batch, as a group runs them: items `2p` and `2p + 1`
/// together ([`lookup_two`]), or the last item alone when `n` is odd. Returns whether each
/// key was found (`None` for an item past the batch).
///
/// # Safety
/// As [`lookup`], for `2p < a.n`.
#[inline(always)]
pub unsafe fn lookup_pair<M: Group>(a: &CacheArgs, p: u64) -> (bool, Option<bool>) {
    let (i, j) = (2 * p, 2 * p + 1);
    // SAFETY: forwarded; i != j, both below n when j is.
    unsafe {
        if j < a.n {
            let (x, y) = lookup_two::<M>(a, i, j);
            (x, Some(y))
        } else {
            (lookup::<M>(a, i), None)
        }
    }
}

/// Take or delete for item `i`, by a whole warp: removes its key's live entry (when the
/// item acts for its key: the dedup pass ran with the first occurrence winning, or `a.pick`
/// is 0 and every item acts) and writes what it held (row, found flag, expiry time) to the
/// outputs that are wanted. Returns whether this item removed the entry (in every lane).
///
/// # Safety
/// `a` describes valid device buffers for `n` items, `i < a.n`, and all 32 lanes call it
/// with the same `i` (a collective of `M`).
#[inline(always)]
pub unsafe fn take<M: Warp>(a: &CacheArgs, i: u64) -> bool {
    let t = &a.table;
    // SAFETY: i < n.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let b = cache_bucket(key, t.seed, t.buckets);
    let at = w32(t.used, b);
    // SAFETY: the dedup pass ran when pick is set; b < buckets; collectives (the used word
    // is read once, by lane 0, so that every lane agrees on it).
    let found = unsafe {
        match acts::<M>(a, i) {
            Some(_) => {
                let used = M::one(|| u64::from(M::load_u32_sync(at))) as u32;
                find::<M>(a, key, b * CACHE_BUCKET, used)
            }
            None => None,
        }
    };
    let taken = found.filter(|&s| {
        let bit = 1u32 << (s - b * CACHE_BUCKET);
        // SAFETY: b < buckets; a collective (found is the same in every lane).
        unsafe { M::one(|| u64::from(M::and_u32(at, !bit) & bit != 0)) != 0 }
    });
    // SAFETY: forwarded; s < slots.
    unsafe {
        write_out::<M>(a, i, taken);
        if a.expires_out != 0 {
            lane0::<M>(|| {
                let e = match taken {
                    Some(s) => M::load(w64(t.expires, s)),
                    None => 0,
                };
                M::store(w64(a.expires_out, i), e);
            });
        }
    }
    taken.is_some()
}

/// Live entries of bucket `b` at `a.now`.
///
/// # Safety
/// `a` describes valid device buffers and `b < buckets`.
#[inline(always)]
pub unsafe fn count_live<M: Mem>(a: &CacheArgs, b: u64) -> u32 {
    let t = &a.table;
    // SAFETY: b < buckets.
    let used = unsafe { M::load_u32(w32(t.used, b)) };
    let mut live = 0;
    let mut j = 0;
    while j < CACHE_BUCKET {
        if used & (1 << j) != 0 {
            // SAFETY: b * CACHE_BUCKET + j < slots.
            let e = unsafe { M::load(w64(t.expires, b * CACHE_BUCKET + j)) };
            live += !expired(e, a.now) as u32;
        }
        j += 1;
    }
    live
}
