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
//! 2. [`put`] (every item): only the last occurrence of each key acts (so the last
//!    occurrence wins whatever the order in which the threads run, even when an entry put
//!    by the batch is evicted by another key of the batch), with the key's whole count of
//!    occurrences (an LFU score adds one per occurrence). It takes its home bucket's lock
//!    (a CAS of the lock word from 0 to 1, then a fence), reads the bucket with device-scope
//!    loads, applies the rule of the CPU backend's `CpuCache` (a live entry of the key is
//!    updated; else the key takes the first free or expired slot; else the entry of lowest
//!    `(score, slot)` is evicted, or the new key itself is turned away when its score is
//!    lower still), writes, fences, and releases the lock (an atomic and with 0). Every
//!    eviction takes the next index of the evicted output arrays from the EVICTED counter.
//!
//! Within a bucket the threads of one batch apply their keys in any order: the contract
//! allows a GPU that (docs/cache.md, item 8). So that ties do not depend on that order
//! under LRU, a stored LRU score carries the item's place in its batch below the clock
//! ([`lru_score`]): of the entries one batch wrote, the one written by the earliest item
//! leaves first, as on the CPU where a batch fills a bucket's slots in order. Evictions
//! report, and the turned-away rule compares, the clock alone ([`visible_score`]).
//!
//! # Lookups and removals
//!
//! [`lookup`] (get, peek, contains) takes no lock: a get's score change is one atomic (an
//! LRU max of the clock, an LFU add of one, per occurrence). [`take`] (take and delete)
//! clears the entry's used bit with an atomic and, and counts a removal only when the bit
//! was set, so a repeated key counts once; a take first runs [`dedup`] with the first
//! occurrence winning, so that the first occurrence is the one that returns the row.

use super::{Mem, copy_row, w32, w64, zero_row};
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
/// first (threads of one batch take a bucket in any order, and the slot order of its
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
/// its key, score, expiry time, and the row at `row` (read at device scope when `sync`).
///
/// # Safety
/// `a` describes valid buffers; the evicted outputs have room for `n` entries (a put
/// evicts at most one entry per item); `row` holds `width` words.
#[inline(always)]
unsafe fn report<M: Mem>(a: &CacheArgs, key: u64, score: u64, expires: u64, row: u64, sync: bool) {
    let t = &a.table;
    // SAFETY: the counter buffer holds cache_counter::LEN words.
    let e = unsafe { M::fetch_add(w64(t.counters, cache_counter::EVICTED as u64), 1) };
    if a.ev_keys == 0 {
        return;
    }
    let w = u64::from(t.width);
    // SAFETY: e < n: every item reports at most once; the outputs hold n entries.
    unsafe {
        M::store(w64(a.ev_keys, e), key);
        M::store(w64(a.ev_scores, e), score);
        if a.ev_expires != 0 {
            M::store(w64(a.ev_expires, e), expires);
        }
        let dst = w64(a.ev_rows, e * w);
        let mut k = 0;
        while k < w {
            let v = if sync {
                M::load_sync(w64(row, k))
            } else {
                M::load(w64(row, k))
            };
            M::store(w64(dst, k), v);
            k += 1;
        }
    }
}

/// Put pass for item `i` (see the module docs).
///
/// # Safety
/// `a` describes valid device buffers for `n` items, the dedup pass ran (or `a.pick` is 0
/// and the batch has no repeated key), every lock word is 0 or held by a running thread
/// of this pass, and `i < a.n`.
#[inline(always)]
pub unsafe fn put<M: Mem>(a: &CacheArgs, i: u64) -> CachePutItem {
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
    // SAFETY: b < buckets; the lock words are valid. Volta's independent thread scheduling
    // lets the holder run while other threads of its warp spin.
    unsafe {
        while M::cas_u32(lock, 0, 1) != 0 {}
        M::fence();
    }
    // SAFETY: b < buckets.
    let used = unsafe { M::load_u32_sync(w32(t.used, b)) };
    let (mut hit, mut free) = (CACHE_BUCKET, CACHE_BUCKET);
    let (mut victim, mut low) = (CACHE_BUCKET, u64::MAX);
    let mut j = 0;
    while j < CACHE_BUCKET {
        let s = base + j;
        // SAFETY: s < slots.
        let live =
            used & (1 << j) != 0 && !expired(unsafe { M::load_sync(w64(t.expires, s)) }, a.now);
        if live {
            // SAFETY: s < slots.
            let (k, score) =
                unsafe { (M::load_sync(w64(t.keys, s)), M::load_sync(w64(t.scores, s))) };
            if k == key && hit == CACHE_BUCKET {
                hit = j;
            }
            if victim == CACHE_BUCKET || score < low {
                victim = j;
                low = score;
            }
        } else if free == CACHE_BUCKET {
            free = j;
        }
        j += 1;
    }
    let put_at = if hit != CACHE_BUCKET {
        let s = base + hit;
        let score = match t.policy {
            cache_policy::LRU => lru_score(a.clock, i),
            cache_policy::LFU => {
                // SAFETY: s < slots.
                unsafe { M::load_sync(w64(t.scores, s)) }.saturating_add(occurs)
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
        if free != CACHE_BUCKET {
            out.expired_reused = used & (1 << free) != 0;
            Some((free, score))
        } else {
            // Full: the lowest score leaves, the new key itself if its score is lower still
            // (ties go against the entry already there).
            out.evicted = true;
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
                let s = base + victim;
                // SAFETY: s < slots; the victim's row holds width words.
                unsafe {
                    let (k, e) = (
                        M::load_sync(w64(t.keys, s)),
                        M::load_sync(w64(t.expires, s)),
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
        let s = base + j;
        // SAFETY: s < slots, b < buckets; row_in holds width words and the slot's row too.
        unsafe {
            if hit == CACHE_BUCKET {
                M::store_u32(w32(t.used, b), used | (1 << j));
                M::store(w64(t.keys, s), key);
            }
            M::store(w64(t.scores, s), score);
            M::store(w64(t.expires, s), expires);
            copy_row::<M>(w64(t.rows, s * w), row_in, t.width);
        }
    }
    // SAFETY: the lock is held by this thread.
    unsafe {
        M::fence();
        M::and_u32(lock, 0);
    }
    out
}

/// The slot (in the table) of `key`'s live entry, if it has one.
///
/// # Safety
/// `a` describes valid device buffers; `used` is the bucket's used word.
#[inline(always)]
unsafe fn find<M: Mem>(a: &CacheArgs, key: u64, base: u64, used: u32) -> Option<u64> {
    let t = &a.table;
    let mut j = 0;
    while j < CACHE_BUCKET {
        let s = base + j;
        if used & (1 << j) != 0 {
            // SAFETY: s < slots.
            let (k, e) = unsafe { (M::load(w64(t.keys, s)), M::load(w64(t.expires, s))) };
            if k == key && !expired(e, a.now) {
                return Some(s);
            }
        }
        j += 1;
    }
    None
}

/// Writes item `i`'s outputs of a lookup: its row (from `slot`, zeros for none) when rows
/// are wanted, and its found flag when flags are.
///
/// # Safety
/// `a` describes valid device buffers for `n` items; `slot < slots`.
#[inline(always)]
unsafe fn write_out<M: Mem>(a: &CacheArgs, i: u64, slot: Option<u64>) {
    let t = &a.table;
    let w = u64::from(t.width);
    // SAFETY: the outputs hold n items; the slot's row width words.
    unsafe {
        if a.values != 0 {
            let dst = w64(a.values, i * w);
            match slot {
                Some(s) => copy_row::<M>(dst, w64(t.rows, s * w), t.width),
                None => zero_row::<M>(dst, t.width),
            }
        }
        if a.found_out != 0 {
            M::store_u8(a.found_out + i, slot.is_some() as u8);
        }
    }
}

/// Get, peek or contains for item `i`: its row and found flag; when `a.access` is set, the
/// entry's score changes as an access says (LRU: the clock; LFU: one more). Returns
/// whether the key was found.
///
/// # Safety
/// `a` describes valid device buffers for `n` items, and `i < a.n`.
#[inline(always)]
pub unsafe fn lookup<M: Mem>(a: &CacheArgs, i: u64) -> bool {
    let t = &a.table;
    // SAFETY: i < n.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let b = cache_bucket(key, t.seed, t.buckets);
    // SAFETY: b < buckets; nothing writes the used words during a lookup.
    let slot = unsafe { find::<M>(a, key, b * CACHE_BUCKET, M::load_u32(w32(t.used, b))) };
    if let Some(s) = slot
        && a.access != 0
    {
        // SAFETY: s < slots.
        unsafe {
            match t.policy {
                cache_policy::LRU => M::max_u64(w64(t.scores, s), lru_score(a.clock, i)),
                cache_policy::LFU => M::add(w64(t.scores, s), 1),
                _ => {}
            }
        }
    }
    // SAFETY: forwarded.
    unsafe { write_out::<M>(a, i, slot) };
    slot.is_some()
}

/// Take or delete for item `i`: removes its key's live entry (when the item acts for its
/// key: the dedup pass ran with the first occurrence winning, or `a.pick` is 0 and every
/// item acts) and writes what it held (row, found flag, expiry time) to the outputs that
/// are wanted. Returns whether this item removed the entry.
///
/// # Safety
/// `a` describes valid device buffers for `n` items, and `i < a.n`.
#[inline(always)]
pub unsafe fn take<M: Mem>(a: &CacheArgs, i: u64) -> bool {
    let t = &a.table;
    // SAFETY: i < n.
    let key = unsafe { M::load(w64(a.keys_in, i)) };
    let b = cache_bucket(key, t.seed, t.buckets);
    let at = w32(t.used, b);
    let mut taken = None;
    // SAFETY: the dedup pass ran when pick is set; b < buckets.
    let found = unsafe {
        match acts::<M>(a, i) {
            Some(_) => find::<M>(a, key, b * CACHE_BUCKET, M::load_u32_sync(at)),
            None => None,
        }
    };
    if let Some(s) = found {
        let bit = 1u32 << (s - b * CACHE_BUCKET);
        // SAFETY: b < buckets.
        if unsafe { M::and_u32(at, !bit) } & bit != 0 {
            taken = Some(s);
        }
    }
    // SAFETY: forwarded; s < slots.
    unsafe {
        write_out::<M>(a, i, taken);
        if a.expires_out != 0 {
            let e = match taken {
                Some(s) => M::load(w64(t.expires, s)),
                None => 0,
            };
            M::store(w64(a.expires_out, i), e);
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
