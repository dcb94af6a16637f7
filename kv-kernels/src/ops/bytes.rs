//! The per-item algorithms of the byte-table kernels (docs/arena.md), generic over
//! [`Mem`] (and [`Warp`] for the kernels that copy a record with a warp), like the rest of
//! [`crate::ops`], so that the host tests run them over host memory.
//!
//! # The index
//!
//! Open addressing with linear probing over slots of four words ([`bytes_slot`](crate::layout::bytes_slot)): the
//! key's hash, the record's arena address, a meta word (EMPTY, TOMBSTONE, or the key and
//! value lengths) and the expiry time. A key is found by its hash, its length and then a
//! comparison of its bytes with the record's key bytes in the arena, so keys whose hashes
//! collide stay distinct. The arena's segments are separate allocations: an address is
//! `segment << seg_shift | offset`, and `segs[segment]` is the segment's device address.
//!
//! # A put (the host plans, the device moves bytes)
//!
//! 1. [`hash_item`]: each key's hash ([`byte_hash_words`] over words assembled from its
//!    bytes), masked by the table's hash bits.
//! 2. [`dedup_item`]: each key into a batch-local table (claim a slot with a CAS of
//!    `1 + i`; a claimed slot belongs to the key of its claimer, compared by hash then
//!    bytes), and `1 + i` maxed into the slot's `pick` word: the last occurrence wins.
//! 3. [`lookup_item`]: each key's index slot (or NONE) and whether it is its key's winner.
//!    The host counts the winners not found (admission), grows the index if it must, and
//!    places the winners' records in the arena.
//! 4. [`write_item`] (a warp per winner): the warp copies the key and value bytes into the
//!    record's place; lane 0 then updates the key's slot (reporting the old record, which
//!    the host frees) or claims the first EMPTY or TOMBSTONE slot of its probe with a CAS
//!    of the meta word (every winner's key is distinct and absent, so no claim needs a
//!    comparison).
//!
//! Lookups hash, [`lookup_item`], then a get's host sums the value lengths into offsets
//! and [`get_item`] (a warp per key) copies the values out. A delete is [`delete_item`]
//! (the CAS to TOMBSTONE counts a repeated key once). [`purge_item`] removes the expired
//! entries and lists their records; [`gather_item`] lists the live records of compaction's
//! victims and [`move_item`] moves them; [`rehash_item`] moves every entry into a new index.

use super::{Mem, Warp, w32, w64};
use crate::layout::{
    BytesArgs, byte_hash_words, byte_key_len, byte_live, byte_meta, byte_value_len,
    bytes_counter as bc, bytes_slot as bs, expired, expiry_time,
};

/// The address of word `word` of index slot `s`.
#[inline(always)]
const fn slot_word(slots: u64, s: u64, word: u64) -> u64 {
    slots + (s * bs::WORDS + word) * 8
}

/// Adds `v` to counter `index`.
#[inline(always)]
unsafe fn count<M: Mem>(a: &BytesArgs, index: usize, v: u64) {
    // SAFETY: the counter buffer holds bytes_counter::LEN words.
    unsafe { M::add(w64(a.counters, index as u64), v) }
}

/// Item `i` of a batch in (offsets, data): its address and length.
#[inline(always)]
unsafe fn item<M: Mem>(offsets: u64, data: u64, i: u64) -> (u64, u64) {
    // SAFETY: the caller's offsets hold n + 1 words and i < n.
    let (lo, hi) = unsafe { (M::load(w64(offsets, i)), M::load(w64(offsets, i + 1))) };
    (data + lo, hi - lo)
}

/// Word `j` (bytes `8j .. 8j + 8`, little-endian, zero past `len`) of the `len` bytes at
/// `p`: one load where the word is whole and aligned, else byte by byte.
#[inline(always)]
unsafe fn word_at<M: Mem>(p: u64, len: u64, j: u64) -> u64 {
    let lo = 8 * j;
    let at = p + lo;
    if lo + 8 <= len && at.is_multiple_of(8) {
        // SAFETY: the 8 bytes lie inside the string; the address is aligned.
        return unsafe { M::load(at) };
    }
    let end = if lo + 8 < len { lo + 8 } else { len };
    let mut w = 0u64;
    let mut k = lo;
    while k < end {
        // SAFETY: k < len: inside the string.
        w |= (unsafe { M::load_u8(p + k) } as u64) << (8 * (k - lo));
        k += 1;
    }
    w
}

/// Whether the `len` bytes at `p` and at `q` are equal.
#[inline(always)]
unsafe fn bytes_eq<M: Mem>(p: u64, q: u64, len: u64) -> bool {
    let words = len.div_ceil(8);
    let mut j = 0;
    while j < words {
        // SAFETY: both strings hold len bytes.
        if unsafe { word_at::<M>(p, len, j) != word_at::<M>(q, len, j) } {
            return false;
        }
        j += 1;
    }
    true
}

/// The device address of arena address `addr`.
#[inline(always)]
unsafe fn arena_ptr<M: Mem>(a: &BytesArgs, addr: u64) -> u64 {
    // SAFETY: addr lies in a held segment, whose directory entry is set.
    let base = unsafe { M::load(w64(a.segs, addr >> a.seg_shift)) };
    base + (addr & ((1u64 << a.seg_shift) - 1))
}

/// The record length of a live meta word.
#[inline(always)]
const fn record_len(meta: u64) -> u64 {
    byte_key_len(meta) + byte_value_len(meta)
}

/// Copies `len` bytes from `src` to `dst` with the warp's lanes (lane `l`: bytes `l`,
/// `l + 32`, ...).
///
/// # Safety
/// Both ranges are valid for `len` bytes and do not overlap; a collective of `W`.
#[inline(always)]
pub unsafe fn warp_copy_bytes<W: Warp>(dst: u64, src: u64, len: u64) {
    W::lanes(|l| {
        let mut j = l as u64;
        while j < len {
            // SAFETY: j < len: inside both ranges.
            unsafe { W::store_u8(dst + j, W::load_u8(src + j)) };
            j += 32;
        }
    });
}

/// Hash pass: `hashes[i]` is key `i`'s hash.
///
/// # Safety
/// `a` describes valid buffers for `n` items and `i < a.n`.
#[inline(always)]
pub unsafe fn hash_item<M: Mem>(a: &BytesArgs, i: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        let (p, len) = item::<M>(a.key_offsets, a.key_data, i);
        let h = byte_hash_words(len, a.seed, |j| word_at::<M>(p, len, j)) & a.hash_mask;
        M::store(w64(a.hashes, i), h);
    }
}

/// Whether batch keys `i` and `j` are equal (hash, length, bytes).
#[inline(always)]
unsafe fn same_key<M: Mem>(a: &BytesArgs, i: u64, j: u64) -> bool {
    // SAFETY: i, j < n.
    unsafe {
        if M::load(w64(a.hashes, i)) != M::load(w64(a.hashes, j)) {
            return false;
        }
        let (p, lp) = item::<M>(a.key_offsets, a.key_data, i);
        let (q, lq) = item::<M>(a.key_offsets, a.key_data, j);
        lp == lq && bytes_eq::<M>(p, q, lp)
    }
}

/// Dedup pass: key `i` into the batch-local table; `1 + i` maxed into its slot's `pick`.
/// Returns `false` (and counts an error) when the probe found no room.
///
/// # Safety
/// `a` describes valid buffers (`local` and `pick` zeroed, of `local_mask + 1` slots,
/// `hashes` written by the hash pass) and `i < a.n`.
#[inline(always)]
pub unsafe fn dedup_item<M: Mem>(a: &BytesArgs, i: u64) -> bool {
    // SAFETY: i < n.
    let h = unsafe { M::load(w64(a.hashes, i)) };
    let me = (i + 1) as u32;
    let mask = a.local_mask;
    // Remix the hash: the index uses its low bits too.
    let mut pos = crate::layout::hash(h, 0x9e37_79b9_7f4a_7c15) & mask;
    let mut steps = 0u64;
    loop {
        // SAFETY: pos <= local_mask.
        let cur = unsafe { M::cas_u32(w32(a.local, pos), 0, me) };
        // SAFETY: a claimed slot holds 1 + j with j < n.
        if cur == 0 || cur == me || unsafe { same_key::<M>(a, i, cur as u64 - 1) } {
            // SAFETY: pos <= local_mask, i < n.
            unsafe {
                M::store_u32(w32(a.slot_of, i), pos as u32);
                M::max_u32(w32(a.pick, pos), me);
            }
            return true;
        }
        pos = (pos + 1) & mask;
        steps += 1;
        if steps > mask {
            // SAFETY: i < n; the counters hold LEN words.
            unsafe {
                M::store_u32(w32(a.slot_of, i), bs::NO_LOCAL);
                count::<M>(a, bc::ERRORS, 1);
            }
            return false;
        }
    }
}

/// The slot of the live (not expired at `a.now`) entry whose key is the `len` bytes at `p`
/// with hash `h`, and its meta word; `(NONE, 0)` when there is none.
///
/// # Safety
/// `a` describes a valid index and arena; `p` holds `len` bytes.
#[inline(always)]
pub unsafe fn find<M: Mem>(a: &BytesArgs, h: u64, p: u64, len: u64) -> (u64, u64) {
    let mut s = h & a.mask;
    let mut steps = 0u64;
    loop {
        // SAFETY: s <= mask: inside the index.
        let meta = unsafe { M::load_sync(slot_word(a.slots, s, bs::META)) };
        if meta == bs::EMPTY {
            return (bs::NONE, 0);
        }
        // SAFETY: s <= mask; a live slot's address is a record of its key's length in a
        // held segment, and `p` holds `len` bytes.
        let hit = meta != bs::TOMBSTONE
            && byte_key_len(meta) == len
            && unsafe {
                M::load(slot_word(a.slots, s, bs::HASH)) == h && {
                    let addr = M::load(slot_word(a.slots, s, bs::ADDR));
                    bytes_eq::<M>(arena_ptr::<M>(a, addr), p, len)
                }
            };
        if hit {
            // SAFETY: s <= mask.
            let e = unsafe { M::load(slot_word(a.slots, s, bs::EXPIRES)) };
            return if expired(e, a.now) {
                (bs::NONE, 0)
            } else {
                (s, meta)
            };
        }
        s = (s + 1) & a.mask;
        steps += 1;
        if steps > a.mask {
            return (bs::NONE, 0);
        }
    }
}

/// Lookup pass: key `i`'s index slot into `found_slot` (if given), its value length
/// (`NONE` for a miss) into `value_len_out` (if given), its expiry time into
/// `expires_out` (if given), and whether it is its key's last occurrence into `win` (if
/// given: the dedup pass ran). Returns whether the key was found.
///
/// # Safety
/// `a` describes valid buffers for `n` items (hashes written) and `i < a.n`.
#[inline(always)]
pub unsafe fn lookup_item<M: Mem>(a: &BytesArgs, i: u64) -> bool {
    // SAFETY: the caller's promise.
    unsafe {
        let h = M::load(w64(a.hashes, i));
        let (p, len) = item::<M>(a.key_offsets, a.key_data, i);
        let (s, meta) = find::<M>(a, h, p, len);
        let hit = s != bs::NONE;
        if a.found_slot != 0 {
            M::store(w64(a.found_slot, i), s);
        }
        if a.value_len_out != 0 {
            let v = if hit { byte_value_len(meta) } else { bs::NONE };
            M::store(w64(a.value_len_out, i), v);
        }
        if a.expires_out != 0 {
            let e = if hit {
                M::load(slot_word(a.slots, s, bs::EXPIRES))
            } else {
                0
            };
            M::store(w64(a.expires_out, i), e);
        }
        if a.win != 0 {
            let l = M::load_u32(w32(a.slot_of, i));
            let w = l != bs::NO_LOCAL && M::load_u32(w32(a.pick, l as u64)) == (i + 1) as u32;
            M::store_u8(a.win + i, w as u8);
        }
        hit
    }
}

/// Write pass (a warp per item): a winner's record is copied to `addrs[i]`, and its key's
/// slot updated (the old record reported in `old_addr` / `old_len`) or claimed.
///
/// # Safety
/// `a` describes valid buffers for `n` items (the lookup pass ran with `win` and
/// `found_slot`; every winner's place is in a held segment); `i < a.n`; the whole warp
/// calls it with the same `i`.
#[inline(always)]
pub unsafe fn write_item<W: Warp>(a: &BytesArgs, i: u64) {
    // SAFETY: the caller's promise; every lane reads the same words (uniform branches).
    unsafe {
        if W::load_u8(a.win + i) == 0 {
            return;
        }
        let (kp, klen) = item::<W>(a.key_offsets, a.key_data, i);
        let (vp, vlen) = item::<W>(a.value_offsets, a.value_data, i);
        let addr = W::load(w64(a.addrs, i));
        let dst = arena_ptr::<W>(a, addr);
        warp_copy_bytes::<W>(dst, kp, klen);
        warp_copy_bytes::<W>(dst + klen, vp, vlen);
        W::one(|| {
            index_update::<W>(a, i, addr, byte_meta(klen, vlen));
            0
        });
    }
}

/// Lane 0's part of [`write_item`].
#[inline(always)]
unsafe fn index_update<M: Mem>(a: &BytesArgs, i: u64, addr: u64, meta: u64) {
    // SAFETY: the caller's promise (see write_item).
    unsafe {
        let h = M::load(w64(a.hashes, i));
        let exp = if a.ttl != 0 {
            expiry_time(a.now, M::load(w64(a.ttl, i)))
        } else {
            0
        };
        let s = M::load(w64(a.found_slot, i));
        if s != bs::NONE {
            let old_addr = M::load(slot_word(a.slots, s, bs::ADDR));
            let old_meta = M::load(slot_word(a.slots, s, bs::META));
            M::store(w64(a.old_addr, i), old_addr);
            M::store(w64(a.old_len, i), record_len(old_meta));
            M::store(slot_word(a.slots, s, bs::ADDR), addr);
            M::store(slot_word(a.slots, s, bs::EXPIRES), exp);
            M::store(slot_word(a.slots, s, bs::META), meta);
            return;
        }
        M::store(w64(a.old_len, i), 0);
        let mut s = h & a.mask;
        let mut steps = 0u64;
        loop {
            let cur = M::load_sync(slot_word(a.slots, s, bs::META));
            if (cur == bs::EMPTY || cur == bs::TOMBSTONE)
                && M::cas(slot_word(a.slots, s, bs::META), cur, meta) == cur
            {
                M::store(slot_word(a.slots, s, bs::HASH), h);
                M::store(slot_word(a.slots, s, bs::ADDR), addr);
                M::store(slot_word(a.slots, s, bs::EXPIRES), exp);
                count::<M>(a, bc::INSERTED, 1);
                if cur == bs::TOMBSTONE {
                    count::<M>(a, bc::REUSED, 1);
                }
                return;
            }
            s = (s + 1) & a.mask;
            steps += 1;
            if steps > a.mask {
                count::<M>(a, bc::ERRORS, 1);
                return;
            }
        }
    }
}

/// Get pass (a warp per key): a found key's value bytes into `out_data` at
/// `out_offsets[i]`.
///
/// # Safety
/// `a` describes valid buffers for `n` items (the lookup pass wrote `found_slot`; the
/// output holds the found values' bytes at their offsets); `i < a.n`; the whole warp calls
/// it with the same `i`.
#[inline(always)]
pub unsafe fn get_item<W: Warp>(a: &BytesArgs, i: u64) {
    // SAFETY: the caller's promise; uniform branches.
    unsafe {
        let s = W::load(w64(a.found_slot, i));
        if s == bs::NONE {
            return;
        }
        let meta = W::load(slot_word(a.slots, s, bs::META));
        let addr = W::load(slot_word(a.slots, s, bs::ADDR));
        let src = arena_ptr::<W>(a, addr) + byte_key_len(meta);
        let dst = a.out_data + W::load(w64(a.out_offsets, i));
        warp_copy_bytes::<W>(dst, src, byte_value_len(meta));
    }
}

/// Delete pass: removes key `i`'s live entry (a CAS of its meta word to TOMBSTONE, so a
/// repeated key is removed once) and reports its record in `old_addr` / `old_len` (0:
/// nothing removed). Returns whether it removed one.
///
/// # Safety
/// `a` describes valid buffers for `n` items (hashes written) and `i < a.n`.
#[inline(always)]
pub unsafe fn delete_item<M: Mem>(a: &BytesArgs, i: u64) -> bool {
    // SAFETY: the caller's promise.
    unsafe {
        let h = M::load(w64(a.hashes, i));
        let (p, len) = item::<M>(a.key_offsets, a.key_data, i);
        let (s, meta) = find::<M>(a, h, p, len);
        if s != bs::NONE && M::cas(slot_word(a.slots, s, bs::META), meta, bs::TOMBSTONE) == meta {
            M::store(w64(a.old_addr, i), M::load(slot_word(a.slots, s, bs::ADDR)));
            M::store(w64(a.old_len, i), record_len(meta));
            count::<M>(a, bc::REMOVED, 1);
            return true;
        }
        M::store(w64(a.old_len, i), 0);
        false
    }
}

/// Expire pass: the last occurrence of key `i`, when found, sets its entry's expiry time.
///
/// # Safety
/// `a` describes valid buffers for `n` items (the lookup pass wrote `win` and
/// `found_slot`; `ttl` holds n words) and `i < a.n`.
#[inline(always)]
pub unsafe fn set_expiry_item<M: Mem>(a: &BytesArgs, i: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        let s = M::load(w64(a.found_slot, i));
        if M::load_u8(a.win + i) != 0 && s != bs::NONE {
            let e = expiry_time(a.now, M::load(w64(a.ttl, i)));
            M::store(slot_word(a.slots, s, bs::EXPIRES), e);
        }
    }
}

/// Purge pass over index slot `s`: an entry expired at `a.now` becomes a tombstone and
/// its record is listed (`list_addr`, `list_len`, at the LISTED counter's next index); a
/// live entry with an expiry time folds it into NEXT_EXPIRY.
///
/// # Safety
/// `s <= a.mask`; the lists hold as many words as the index holds entries.
#[inline(always)]
pub unsafe fn purge_item<M: Mem>(a: &BytesArgs, s: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        let meta = M::load(slot_word(a.slots, s, bs::META));
        if !byte_live(meta) {
            return;
        }
        let e = M::load(slot_word(a.slots, s, bs::EXPIRES));
        if expired(e, a.now) {
            M::store(slot_word(a.slots, s, bs::META), bs::TOMBSTONE);
            let k = M::fetch_add(w64(a.counters, bc::LISTED as u64), 1);
            M::store(
                w64(a.list_addr, k),
                M::load(slot_word(a.slots, s, bs::ADDR)),
            );
            M::store(w64(a.list_len, k), record_len(meta));
        } else if e != 0 {
            M::max_u64(w64(a.counters, bc::NEXT_EXPIRY as u64), !e);
        }
    }
}

/// Gather pass over index slot `s` (compaction): a live entry whose record lies in a
/// victim segment is listed (`list_slot`, `list_addr`, `list_len`).
///
/// # Safety
/// `s <= a.mask`; `victims` holds a byte per segment; the lists hold as many words as the
/// index holds entries.
#[inline(always)]
pub unsafe fn gather_item<M: Mem>(a: &BytesArgs, s: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        let meta = M::load(slot_word(a.slots, s, bs::META));
        if !byte_live(meta) {
            return;
        }
        let addr = M::load(slot_word(a.slots, s, bs::ADDR));
        if M::load_u8(a.victims + (addr >> a.seg_shift)) == 0 {
            return;
        }
        let k = M::fetch_add(w64(a.counters, bc::LISTED as u64), 1);
        M::store(w64(a.list_slot, k), s);
        M::store(w64(a.list_addr, k), addr);
        M::store(w64(a.list_len, k), record_len(meta));
    }
}

/// Move pass (a warp per listed record `k`): the record moves to `addrs[k]`, and its
/// slot's address follows.
///
/// # Safety
/// `k < a.n` listed records; both places are in held segments and do not overlap; the
/// whole warp calls it with the same `k`.
#[inline(always)]
pub unsafe fn move_item<W: Warp>(a: &BytesArgs, k: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        let s = W::load(w64(a.list_slot, k));
        let old = W::load(w64(a.list_addr, k));
        let len = W::load(w64(a.list_len, k));
        let new = W::load(w64(a.addrs, k));
        warp_copy_bytes::<W>(arena_ptr::<W>(a, new), arena_ptr::<W>(a, old), len);
        W::one(|| {
            W::store(slot_word(a.slots, s, bs::ADDR), new);
            0
        });
    }
}

/// Rehash pass over slot `s` of the old index (`old_slots`, `n` slots): a live entry is
/// inserted into the new (zeroed) index.
///
/// # Safety
/// `s < a.n`; the new index has room for every live entry.
#[inline(always)]
pub unsafe fn rehash_item<M: Mem>(a: &BytesArgs, s: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        let meta = M::load(slot_word(a.old_slots, s, bs::META));
        if !byte_live(meta) {
            return;
        }
        let h = M::load(slot_word(a.old_slots, s, bs::HASH));
        let mut t = h & a.mask;
        let mut steps = 0u64;
        loop {
            if M::cas(slot_word(a.slots, t, bs::META), bs::EMPTY, meta) == bs::EMPTY {
                M::store(slot_word(a.slots, t, bs::HASH), h);
                M::store(
                    slot_word(a.slots, t, bs::ADDR),
                    M::load(slot_word(a.old_slots, s, bs::ADDR)),
                );
                M::store(
                    slot_word(a.slots, t, bs::EXPIRES),
                    M::load(slot_word(a.old_slots, s, bs::EXPIRES)),
                );
                count::<M>(a, bc::MOVED, 1);
                return;
            }
            t = (t + 1) & a.mask;
            steps += 1;
            if steps > a.mask {
                count::<M>(a, bc::ERRORS, 1);
                return;
            }
        }
    }
}
