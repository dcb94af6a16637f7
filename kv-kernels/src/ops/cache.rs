//! The per-item algorithms of the cache-table kernels (docs/cache.md), generic over
//! [`Mem`] like the rest of [`crate::ops`].
//!
//! A cache table's slots are cut into buckets of [`CACHE_BUCKET`] slots; a key lives only in
//! its home bucket ([`cache_bucket`]). Each bucket has a `used` word (bit `j`: slot `j`
//! holds an entry, perhaps an expired one) and a lock word.
//!
//! # A put (two kernels)
//!
//! 1. [`dedup`] (every item): the key is recorded in a batch-local table (a slot claimed
//!    with a CAS of `1 + i`; a slot already claimed belongs to the key `keys_in[j]` of its
//!    claimer), and the item's rank ([`dedup_rank`]: `1 + i`) is maxed into the slot's
//!    `pick` word and 1 added to its `occurs` word. When the pass ends, each distinct key's
//!    slot names its last occurrence and counts its occurrences.
//! 2. [`put`] (a warp per item): only the last occurrence of each key acts (so the last
//!    occurrence wins whatever the order in which the warps run, even when an entry put
//!    by the batch is evicted by another key of the batch), with the key's whole count of
//!    occurrences (an LFU score adds one per occurrence). Lane 0 takes the home bucket's
//!    lock (a CAS of the lock word from 0 to 1, then a fence), and a warp barrier
//!    ([`Warp::sync`]) orders the other lanes after it. A bucket's 32 slots are the warp's
//!    32 lanes: lane `j` reads slot `j`'s key, expiry time and score with device-scope
//!    loads (three coalesced 256-byte reads), and ballots apply the rule of the CPU
//!    backend's `CpuCache`: a live entry of the key is updated; else the key takes the
//!    first free or expired slot; else the entry of lowest `(score, slot)` (a shuffle
//!    reduction of the scores, then a ballot of the lanes that hold the lowest) is evicted,
//!    or the new key itself is turned away when its score is lower still. Lane 0 writes the
//!    slot's key, score, expiry time and the used bit, the warp copies the row (lane `l`
//!    word `l`, `l + 32`, ...), then a barrier, and lane 0 fences and releases the lock (an
//!    atomic and with 0). Every eviction takes the next index of the evicted output arrays
//!    from the EVICTED counter (one atomic per eviction, by lane 0) and the warp copies the
//!    evicted row there.
//!
//! The warp-level steps are written once, generic over [`Warp`]: the device runs them on
//! 32 lanes, the host tests on one thread that plays the 32 lanes in turn.
//!
//! *Digests.* HierarchicalKV keeps a byte per slot (a digest of its key) so that a probe of
//! its 128-slot buckets reads 128 bytes before it reads any key. With 32-slot buckets a
//! warp reads the bucket's 32 keys in one coalesced 256-byte load, a digest array would save
//! part of that read at the cost of a second array to keep in step (and a dependent load);
//! it is left out until a measurement shows the key read to bound the lookups.
//!
//! Within a bucket the warps of one batch apply their keys in any order: the contract
//! allows a GPU that (docs/cache.md, item 8). So that ties do not depend on that order
//! under LRU, a stored LRU score carries the item's place in its batch below the clock
//! ([`lru_score`]): of the entries one batch wrote, the one written by the earliest item
//! leaves first, as on the CPU where a batch fills a bucket's slots in order. Evictions
//! report, and the turned-away rule compares, the clock alone ([`visible_score`]).
//!
//! # Lookups and removals
//!
//! [`lookup`] (get, peek, contains; a warp per item) takes no lock: lane `j` compares slot
//! `j`'s key and, where it matches, reads its expiry time; a ballot finds the live entry,
//! and the warp copies its row out. A get's score change is one atomic by lane 0 (an LRU
//! max of the clock, an LFU add of one, per occurrence). [`take`] (take and delete; a warp
//! per item) clears the entry's used bit with an atomic and, and counts a removal only when
//! the bit was set, so a repeated key counts once; a take first runs [`dedup`] with the
//! first occurrence winning, so that the first occurrence is the one that returns the row.
//! [`dedup`] and [`count_live`] stay a thread per item (per bucket).

use super::{Mem, Warp, lane0, w32, w64, warp_copy_row};
use crate::layout::{
    CACHE_BUCKET, CacheArgs, cache_bucket, cache_counter, cache_policy, dedup_rank, home_slot,
    next_slot,
};

/// Bits below the clock in a stored LRU score ([`lru_score`]).
pub const LRU_ORDER_BITS: u32 = 32;

/// The score an LRU table stores for an access at logical clock `clock` by item `i` of its
/// batch: the clock above [`LRU_ORDER_BITS`], the item's place in the batch below it. The
/// score a caller sees ([`visible_score`]) is the clock; the bits below only break ties
/// between entries of one batch, so that the entry written by the earlier item leaves
/// first (warps of one batch take a bucket in any order, and the slot order of its
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
}

/// Writes an evicted (or turned-away) entry at the next index of the evicted outputs:
/// its key, score and expiry time (by lane 0), and the row at `row` (by the warp; read at
/// device scope when `sync`).
///
/// # Safety
/// `a` describes valid buffers; the evicted outputs have room for `n` entries (a put
/// evicts at most one entry per item); `row` holds `width` words; a collective of `M`.
#[inline(always)]
unsafe fn report<M: Warp>(a: &CacheArgs, key: u64, score: u64, expires: u64, row: u64, sync: bool) {
    let t = &a.table;
    // SAFETY: the counter buffer holds cache_counter::LEN words; e < n: every item reports
    // at most once and the outputs hold n entries.
    let e = unsafe {
        M::one(|| {
            let e = M::fetch_add(w64(t.counters, cache_counter::EVICTED as u64), 1);
            if a.ev_keys != 0 {
                M::store(w64(a.ev_keys, e), key);
                M::store(w64(a.ev_scores, e), score);
                if a.ev_expires != 0 {
                    M::store(w64(a.ev_expires, e), expires);
                }
            }
            e
        })
    };
    if a.ev_keys != 0 {
        // SAFETY: as above; the outputs hold n rows.
        unsafe { warp_copy_row::<M>(w64(a.ev_rows, e * u64::from(t.width)), row, t.width, sync) };
    }
}

/// What a warp read of a bucket: per lane (slot `j` of the bucket), its key, expiry time
/// and score, zeros for a slot not in use.
#[derive(Clone, Copy)]
struct Slot {
    key: u64,
    expires: u64,
    score: u64,
}

/// Put pass for item `i`, by a whole warp (see the module docs): lane 0 takes the bucket's
/// lock, lane `j` reads slot `j` (its key, expiry time and score: three coalesced loads),
/// ballots find the key's live entry and the first free or expired slot, a full bucket's
/// victim is the lowest `(score, slot)` (a shuffle reduction, then a ballot), lane 0
/// writes the slot's key, score and expiry time, the warp copies the row, and lane 0
/// releases the lock. Every lane returns the same result.
///
/// # Safety
/// `a` describes valid device buffers for `n` items, the dedup pass ran (or `a.pick` is 0
/// and the batch has no repeated key), every lock word is 0 or held by a running warp of
/// this pass, `i < a.n`, and all 32 lanes call it with the same `i` (a collective of `M`).
#[inline(always)]
pub unsafe fn put<M: Warp>(a: &CacheArgs, i: u64) -> CachePutItem {
    let mut out = CachePutItem::default();
    // SAFETY: the dedup pass ran.
    let occurs = match unsafe { acts::<M>(a, i) } {
        Some(c) => c,
        None => {
            // SAFETY: as above.
            out.lost = a.pick != 0 && unsafe { M::load_u32(w32(a.slot_of, i)) } == NO_SLOT;
            return out;
        }
    };
    out.acted = true;
    let t = &a.table;
    let w = u64::from(t.width);
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
    let expires = expiry(a.now, ttl);
    let row_in = w64(a.values, i * w);
    let b = cache_bucket(key, t.seed, t.buckets);
    let base = b * CACHE_BUCKET;
    let lock = w32(t.locks, b);
    // SAFETY: b < buckets; the lock words are valid. Lane 0 spins alone; the warp's barrier
    // then orders every lane's reads of the bucket after its acquire. A warp holds one lock
    // at a time, and the holder of any lock is a running warp, so the spin ends.
    let used = unsafe {
        lane0::<M>(|| {
            while M::cas_u32(lock, 0, 1) != 0 {}
            M::fence();
        });
        M::sync();
        M::one(|| u64::from(M::load_u32_sync(w32(t.used, b)))) as u32
    };
    let slots = M::lanes(|j| {
        let s = base + u64::from(j);
        if used & (1 << j) == 0 {
            return Slot {
                key: 0,
                expires: 0,
                score: 0,
            };
        }
        // SAFETY: s < slots; other warps write this bucket only under its lock.
        unsafe {
            Slot {
                key: M::load_sync(w64(t.keys, s)),
                expires: M::load_sync(w64(t.expires, s)),
                score: M::load_sync(w64(t.scores, s)),
            }
        }
    });
    let live = |j: u32, s: Slot| used & (1 << j) != 0 && !expired(s.expires, a.now);
    // SAFETY: collectives, reached by the whole warp (every branch above and below is on
    // values every lane shares).
    let (hits, free) = unsafe {
        (
            M::ballot(M::map(slots, |j, s| live(j, s) && s.key == key)),
            M::ballot(M::map(slots, |j, s| !live(j, s))),
        )
    };
    let (hit, free) = (hits.trailing_zeros(), free.trailing_zeros());
    let none = CACHE_BUCKET as u32;
    let put_at = if hit != none {
        let score = match t.policy {
            cache_policy::LRU => lru_score(a.clock, i),
            cache_policy::LFU => {
                // SAFETY: a collective (see above).
                unsafe { M::shfl(M::map(slots, |_, s| s.score), hit) }.saturating_add(occurs)
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
            // SAFETY: collectives (see above).
            let (low, victim) = unsafe {
                let scores = M::map(slots, |_, s| s.score);
                let low = M::min(scores);
                (
                    low,
                    M::ballot(M::map(scores, |_, s| s == low)).trailing_zeros(),
                )
            };
            if visible_score(t.policy, score) < visible_score(t.policy, low) {
                // SAFETY: the outputs have room for n entries; row_in holds width words.
                unsafe {
                    report::<M>(
                        a,
                        key,
                        visible_score(t.policy, score),
                        expires,
                        row_in,
                        false,
                    )
                };
                None
            } else {
                let s = base + u64::from(victim);
                // SAFETY: collectives; s < slots; the victim's row holds width words.
                unsafe {
                    let (k, e) = (
                        M::shfl(M::map(slots, |_, s| s.key), victim),
                        M::shfl(M::map(slots, |_, s| s.expires), victim),
                    );
                    report::<M>(
                        a,
                        k,
                        visible_score(t.policy, low),
                        e,
                        w64(t.rows, s * w),
                        true,
                    );
                }
                Some((victim, score))
            }
        }
    };
    if let Some((j, score)) = put_at {
        let s = base + u64::from(j);
        // SAFETY: s < slots, b < buckets; row_in holds width words and the slot's row too.
        // The lanes that copied the victim's row out read each word before they write it.
        unsafe {
            lane0::<M>(|| {
                if hit == none {
                    M::store_u32(w32(t.used, b), used | (1 << j));
                    M::store(w64(t.keys, s), key);
                }
                M::store(w64(t.scores, s), score);
                M::store(w64(t.expires, s), expires);
            });
            warp_copy_row::<M>(w64(t.rows, s * w), row_in, t.width, false);
        }
    }
    // SAFETY: the lock is held by lane 0 of this warp; the barrier orders every lane's
    // writes before its release.
    unsafe {
        M::sync();
        lane0::<M>(|| {
            M::fence();
            M::and_u32(lock, 0);
        });
    }
    out
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

/// Get, peek or contains for item `i`, by a whole warp: its row and found flag; when
/// `a.access` is set, the entry's score changes as an access says (LRU: the clock; LFU:
/// one more). Returns whether the key was found (in every lane).
///
/// # Safety
/// `a` describes valid device buffers for `n` items, `i < a.n`, and all 32 lanes call it
/// with the same `i` (a collective of `M`).
#[inline(always)]
pub unsafe fn lookup<M: Warp>(a: &CacheArgs, i: u64) -> bool {
    let t = &a.table;
    // SAFETY: i < n.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let b = cache_bucket(key, t.seed, t.buckets);
    // SAFETY: b < buckets; nothing writes the used words during a lookup.
    let slot = unsafe { find::<M>(a, key, b * CACHE_BUCKET, M::load_u32(w32(t.used, b))) };
    if let Some(s) = slot
        && a.access != 0
    {
        // SAFETY: s < slots; a collective.
        unsafe {
            lane0::<M>(|| match t.policy {
                cache_policy::LRU => M::max_u64(w64(t.scores, s), lru_score(a.clock, i)),
                cache_policy::LFU => M::add(w64(t.scores, s), 1),
                _ => {}
            })
        }
    }
    // SAFETY: forwarded.
    unsafe { write_out::<M>(a, i, slot) };
    slot.is_some()
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
