//! The table's layout and protocol constants, once for every backend: the slot encoding
//! (sentinels and the special area), the hash and the probe sequence, the value-row layout,
//! the counter numbering, the workgroup size, and the `#[repr(C)]` kernel argument structs.
//!
//! Everything here is plain `const fn`/`#[repr(C)]` data, compiled for the host and for
//! `nvptx64`, so the host and the device cannot disagree about where a key lives or how
//! arguments are laid out. The CPU backend calls [`hash`]; the CUDA kernels are compiled
//! from this module; the wgpu backend generates its WGSL constants from it
//! (`kv-backend-wgpu/src/shader.rs`, `constants()`). docs/protocol.md states the put
//! protocols built on it.

/// Key-slot marker of a slot that never held a key. Probes stop here. Zero, so that zeroed
/// memory (a fresh wgpu buffer, a `cuMemsetD8`) is an empty key array.
pub const EMPTY: u64 = 0;
/// Key-slot marker of a slot whose key was deleted. Probes go past it; puts may reuse it.
pub const TOMBSTONE: u64 = 1;

/// Whether a user key equals one of the two sentinels (it then lives in the special area).
#[inline(always)]
pub const fn is_sentinel(key: u64) -> bool {
    key <= TOMBSTONE
}

/// Index in the special area of a sentinel-valued user key: `0` → 0, `1` → 1.
#[inline(always)]
pub const fn special_index(key: u64) -> u64 {
    key
}

/// Threads per block (CUDA) or workgroup (WGSL) of every kernel: a multiple of 32, since
/// the kernels reduce their counters per warp or per workgroup.
pub const WORKGROUP: u32 = 256;

/// First multiplier of MurmurHash3's 64-bit finaliser (`fmix64`).
pub const FMIX_C1: u64 = 0xff51_afd7_ed55_8ccd;
/// Second multiplier of MurmurHash3's 64-bit finaliser (`fmix64`).
pub const FMIX_C2: u64 = 0xc4ce_b9fe_1a85_ec53;

/// The table's hash: the 64-bit finaliser of MurmurHash3 (`fmix64`) of `key ^ seed`.
///
/// This is the one definition every backend uses (the CPU backend calls it, the CUDA kernels
/// are compiled from it, and the wgpu backend's WGSL is generated from [`FMIX_C1`] and
/// [`FMIX_C2`]), so that the backends place keys alike.
///
/// For a fixed seed it is a bijection (distinct keys never share a full hash) with full
/// avalanche, so `hash & mask` spreads sequential keys. It is also invertible, so keys that
/// share a home slot are easy to compute *for a known seed*: that is what the seed is for.
/// A table draws a random seed unless its config fixes one, and keys computed against one
/// seed scatter under another. It is a keyed mix, not a cryptographic PRF: it defeats keys
/// precomputed against the fixed function or against another table, not an attacker who can
/// probe one table's timings at length.
#[inline(always)]
pub const fn hash(key: u64, seed: u64) -> u64 {
    let mut h = key ^ seed;
    h ^= h >> 33;
    h = h.wrapping_mul(FMIX_C1);
    h ^= h >> 33;
    h = h.wrapping_mul(FMIX_C2);
    h ^= h >> 33;
    h
}

/// The multiplicative inverse of an odd `c` modulo 2^64 (Newton's iteration: each step
/// doubles the correct low bits, from 3).
const fn inverse(c: u64) -> u64 {
    let mut inv = c;
    let mut i = 0;
    while i < 5 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(c.wrapping_mul(inv)));
        i += 1;
    }
    inv
}

/// The key whose [`hash`] under `seed` is `h`: the inverse of [`hash`].
///
/// Tests use it to build adversarial keys (many keys sharing one home slot, chains that
/// wrap around the end of the table) for a table whose seed they fixed.
///
/// ```
/// use kv_kernels::layout::{hash, unhash};
/// let seed = 0x5eed;
/// for h in [0, 1, 42, u64::MAX] {
///     assert_eq!(hash(unhash(h, seed), seed), h);
/// }
/// ```
#[inline(always)]
pub const fn unhash(h: u64, seed: u64) -> u64 {
    let mut x = h;
    // x ^= x >> 33 is its own inverse (33 > 64 / 2).
    x ^= x >> 33;
    x = x.wrapping_mul(inverse(FMIX_C2));
    x ^= x >> 33;
    x = x.wrapping_mul(inverse(FMIX_C1));
    x ^= x >> 33;
    x ^ seed
}

/// Whether an entry with expiry time `expires` (in a table clock's milliseconds; 0: never)
/// has expired at `now`: the one expiry rule of cache tables and byte tables.
///
/// ```
/// use kv_kernels::layout::{expired, expiry_time};
/// assert!(!expired(0, u64::MAX));
/// assert!(expired(expiry_time(1000, 5), 1005));
/// assert!(!expired(expiry_time(1000, 5), 1004));
/// ```
#[inline(always)]
pub const fn expired(expires: u64, now: u64) -> bool {
    expires != 0 && expires <= now
}

/// The expiry time of an entry written at `now` with a time to live of `ttl_ms` (0: never
/// expires). Never 0 for a positive time to live, even at the clock's origin.
#[inline(always)]
pub const fn expiry_time(now: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        let e = now.saturating_add(ttl_ms);
        if e == 0 { 1 } else { e }
    }
}

/// The hash of a byte-string key (a byte table's key, docs/arena.md) of `len` bytes under
/// `seed`, given its 8-byte little-endian words: `word(j)` is bytes `8j .. 8j + 8` of the
/// key, the last word zero-padded. It chains [`hash`] over the words, starting from the
/// seed mixed with the length, so keys of different lengths differ even when one is the
/// other padded with zero bytes.
///
/// Every backend hashes byte keys with this one function: the CPU over a slice
/// ([`byte_hash`]), the GPU kernels over words they assemble from device memory.
///
/// ```
/// use kv_kernels::layout::{byte_hash, byte_hash_words};
/// let key = b"user:1234:profile";
/// let word = |j: u64| {
///     let mut w = [0u8; 8];
///     let lo = (8 * j) as usize;
///     let hi = key.len().min(lo + 8);
///     w[..hi - lo].copy_from_slice(&key[lo..hi]);
///     u64::from_le_bytes(w)
/// };
/// assert_eq!(byte_hash_words(key.len() as u64, 7, word), byte_hash(key, 7));
/// ```
#[inline(always)]
pub fn byte_hash_words(len: u64, seed: u64, mut word: impl FnMut(u64) -> u64) -> u64 {
    let mut h = hash(len, seed);
    let words = len.div_ceil(8);
    let mut j = 0;
    while j < words {
        h = hash(word(j) ^ h, seed);
        j += 1;
    }
    h
}

/// [`byte_hash_words`] over a slice: the hash of the byte-string key `key` under `seed`.
///
/// ```
/// use kv_kernels::layout::byte_hash;
/// assert_ne!(byte_hash(b"a", 1), byte_hash(b"a\0", 1));
/// assert_ne!(byte_hash(b"a", 1), byte_hash(b"a", 2));
/// ```
#[inline(always)]
pub fn byte_hash(key: &[u8], seed: u64) -> u64 {
    byte_hash_words(key.len() as u64, seed, |j| {
        let lo = (8 * j) as usize;
        match key.get(lo..lo + 8) {
            Some(w) => u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]),
            None => {
                let mut w = [0u8; 8];
                let tail = &key[lo..];
                let mut k = 0;
                while k < tail.len() {
                    w[k] = tail[k];
                    k += 1;
                }
                u64::from_le_bytes(w)
            }
        }
    })
}

/// The first slot probed for `key` in a table of `mask + 1` slots (a power of two) whose
/// hash seed is `seed`.
#[inline(always)]
pub const fn home_slot(key: u64, seed: u64, mask: u64) -> u64 {
    hash(key, seed) & mask
}

/// The first slot a table probe reads for `key` (a table of `mask + 1` slots whose probes
/// read windows of `window` slots, [`window_slots`]): the first slot of the window holding
/// its home slot. The probe reads the window's keys at once and goes on window by window,
/// so a key may take any free slot of its home window. That is linear probing over slot
/// numbers from a window-aligned start (bucketized linear probing), whose probes at high
/// load are a few windows long where probing slot by slot from the home slot runs through
/// whole clusters.
///
/// ```
/// use kv_kernels::layout::{home_slot, probe_start};
/// let (seed, mask) = (7, 1023);
/// for key in 2..100u64 {
///     let start = probe_start(key, seed, mask, 4);
///     assert_eq!(start % 4, 0);
///     assert!(start <= home_slot(key, seed, mask) && home_slot(key, seed, mask) < start + 4);
/// }
/// ```
#[inline(always)]
pub const fn probe_start(key: u64, seed: u64, mask: u64, window: u64) -> u64 {
    home_slot(key, seed, mask) & !(window - 1)
}

/// The home bucket of `key` in a cache table of `buckets` buckets whose hash seed is
/// `seed`: the hash scaled to the bucket count (multiply-shift on its 64 bits), so that any
/// count of buckets works. A cache table's key lives only in this bucket.
///
/// ```
/// use kv_kernels::layout::cache_bucket;
/// assert!((0..1000u64).all(|k| cache_bucket(k, 9, 7) < 7));
/// ```
#[inline(always)]
pub const fn cache_bucket(key: u64, seed: u64, buckets: u64) -> u64 {
    ((hash(key, seed) as u128 * buckets as u128) >> 64) as u64
}

/// A cache table's digest of `key` under `seed`: a byte of its hash that the bucket choice
/// ([`cache_bucket`], which scales the hash's high bits) hardly depends on, so that two keys
/// of one bucket share a digest about once in 256. A lookup compares the bucket's 32
/// digests (32 bytes, one DRAM sector) and reads the key of a slot only where its digest
/// matches, instead of the bucket's 256 bytes of keys.
///
/// ```
/// use kv_kernels::layout::cache_digest;
/// let same = (0..10_000u64).filter(|&k| cache_digest(k, 7) == cache_digest(k + 1, 7)).count();
/// assert!(same < 100);
/// ```
#[inline(always)]
pub const fn cache_digest(key: u64, seed: u64) -> u8 {
    hash(key, seed) as u8
}

/// The slot probed after `slot` (linear probing, wrapping).
#[inline(always)]
pub const fn next_slot(slot: u64, mask: u64) -> u64 {
    slot.wrapping_add(1) & mask
}

/// Slots of the chunk-local dedup table of a put chunk of `n` items: a power of two of at
/// least `2n` (load factor at most one half) and at least 64.
#[inline(always)]
pub const fn local_slots(n: u64) -> u64 {
    let s = (2 * n).next_power_of_two();
    if s < 64 { 64 } else { s }
}

/// log2 of the slots per bucket of a table of one-word values: two keys then their two
/// values, 32 bytes, one DRAM sector. A probe that finds its key in its home bucket reads
/// one sector, value included, and an insert writes its key and value into that sector.
pub const NARROW_BUCKET_SHIFT: u32 = 1;

/// log2 of the slots per bucket of a table of wider values: four keys (one 32-byte sector),
/// then their four rows. A probe reads the four keys at once, then the one row it wants.
pub const BUCKET_SHIFT: u32 = 2;

/// The bucket shift of a table of `slots` slots (a power of two, at least 4) and `width`-word
/// values: [`NARROW_BUCKET_SHIFT`] at width 1, else [`BUCKET_SHIFT`]. The kernels take it
/// as a parameter (`TableArgs::bucket_shift`), so that other layouts can be measured with
/// the same kernels: `log2(slots)` gives one bucket of every slot, a key array followed by a
/// value array.
///
/// Measured on the H200 (docs/perf-log/2026-12-h200.md): at width 1, buckets of two made
/// find 1.35x as fast as buckets of four at occupancy 0.5 and insert 1.09x; at widths 4 and
/// 16 buckets of four were faster.
pub const fn bucket_shift(slots: u64, width: u32) -> u32 {
    let log2 = slots.trailing_zeros();
    let want = if width == 1 {
        NARROW_BUCKET_SHIFT
    } else {
        BUCKET_SHIFT
    };
    if want < log2 { want } else { log2 }
}

/// Slots whose keys a probe reads at once in buckets of `1 << shift` slots: one bucket's
/// keys when it holds two or four, else four (16 or 32 bytes, read with 16-byte loads
/// issued together). Windows never cross a bucket of four or more slots, so their keys are
/// contiguous.
#[inline(always)]
pub const fn window_slots(shift: u32) -> u64 {
    if shift == 1 { 2 } else { 4 }
}

/// Value width (u64 words) from which the kernels copy value rows with a whole warp, a
/// group of lanes per row and a lane per word, where narrower rows are copied by the
/// thread that found their slot. A warp's 32 threads each copying their own scattered
/// 128-byte row touch each row's sectors again and again; copied by the warp, each load
/// and store is one coalesced run of a row.
pub const COOP_WIDTH: u32 = 4;

/// Words of the slot array of `slots` slots: a key and a row each.
#[inline(always)]
pub const fn slot_array_words(slots: u64, width: u32) -> u64 {
    slots * (1 + width as u64)
}

/// Offset in u64 words, in a slot array of buckets of `1 << shift` slots, of the key of
/// `slot`.
#[inline(always)]
pub const fn key_word(slot: u64, width: u32, shift: u32) -> u64 {
    (slot >> shift) * ((1 + width as u64) << shift) + (slot & ((1u64 << shift) - 1))
}

/// Offset in u64 words, in a slot array of buckets of `1 << shift` slots, of the value row
/// of `slot`.
#[inline(always)]
pub const fn row_word(slot: u64, width: u32, shift: u32) -> u64 {
    (slot >> shift) * ((1 + width as u64) << shift)
        + (1u64 << shift)
        + (slot & ((1u64 << shift) - 1)) * width as u64
}

/// Words of the special area: `present[2]` then `values[2][width]`.
#[inline(always)]
pub const fn special_words(width: u32) -> u64 {
    2 + 2 * width as u64
}

/// Offset in u64 words, inside the special area, of the value row of special key `index` (0 or 1).
#[inline(always)]
pub const fn special_row(index: u64, width: u32) -> u64 {
    2 + index * width as u64
}

/// Indices of the u64 words of a table's counter buffer, the same on every GPU backend.
/// Kernels add to them with device-scope atomics (warp- or workgroup-aggregated); the host
/// zeroes them before a batch and reads them back after it, and turns them into the counts
/// that `kv_core::Books` takes.
pub mod counter {
    /// Keys newly placed in the key array by a put (claimed from EMPTY or TOMBSTONE).
    pub const INSERTED: usize = 0;
    /// Of those, the ones that took an EMPTY slot (the rest reused a tombstone).
    pub const FROM_EMPTY: usize = 1;
    /// Keys turned into tombstones by a delete.
    pub const REMOVED: usize = 2;
    /// Sentinel-valued keys that became present in the special area.
    pub const SPEC_INSERTED: usize = 3;
    /// Sentinel-valued keys removed from the special area.
    pub const SPEC_REMOVED: usize = 4;
    /// Probes that ran through the whole table (a broken invariant; reported as a device error).
    pub const ERRORS: usize = 5;
    /// Keys moved by a rehash.
    pub const MOVED: usize = 6;
    /// Live keys counted by `kv_count`.
    pub const LIVE: usize = 7;
    /// Tombstones counted by `kv_count`.
    pub const TOMBS: usize = 8;
    /// wgpu only: the code of a put pass (or rehash piece) that left probes unfinished, 0
    /// for none (docs/protocol.md, "Bounded probes").
    pub const STALL: usize = 9;
    /// Keys of a batch not in the table, each occurrence counted, by `kv_count_missing`.
    pub const MISSING: usize = 10;
    /// A word no one reads: where a kernel adds the counts it does not keep, so that one
    /// reduction routine serves every kernel.
    pub const DISCARD: usize = 15;
    /// Length of the counter buffer in u64 words.
    pub const LEN: usize = 16;
}

/// Indices of the u32 per-chunk flags of a put (one flag buffer per staging lane on CUDA;
/// on wgpu the words after the chunk-local table).
pub mod flag {
    /// Set by the dedup pass when some key occurs more than once in the chunk: the rewrite
    /// pass then has the last occurrence of each repeated key write its row again.
    pub const DUP: usize = 0;
    /// `SPEC_WIN + i` holds 1 + the highest batch index of special key `i` in the chunk (0: none).
    pub const SPEC_WIN: usize = 1;
    /// Set by the place pass when some item found its key already in the table (placed by
    /// an earlier chunk or batch, or by another item of the chunk): only then can the chunk
    /// repeat a key, and only then do the dedup and rewrite passes do any work.
    pub const FOUND: usize = 3;
    /// Length of a flag buffer in u32 words.
    pub const LEN: usize = 4;
}

/// Bit of a chunk-local table slot that the dedup pass sets when the slot's key occurs
/// more than once in the chunk; the other 31 bits hold `1 + ` the index of its last
/// occurrence. Chunks therefore hold fewer than `2^31 - 1` items (the host keeps them at a
/// few million).
pub const REPEAT: u32 = 1 << 31;

/// A table as the kernels see it: device addresses and shape.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableArgs {
    /// `u64[slot_array_words(slots, width)]`: the buckets of `1 << bucket_shift` slots, each
    /// its keys (or EMPTY / TOMBSTONE) then their value rows ([`key_word`], [`row_word`]).
    pub slots: u64,
    /// `u64[special_words(width)]`: presence words then value rows of the two sentinel keys.
    pub special: u64,
    /// `u64[counter::LEN]` counters.
    pub counters: u64,
    /// `slots - 1`; slots is a power of two.
    pub mask: u64,
    /// Value width in u64 words.
    pub width: u32,
    /// log2 of the slots per bucket ([`bucket_shift`]).
    pub bucket_shift: u32,
    /// The table's hash seed ([`hash`]).
    pub seed: u64,
}

/// Arguments of the batch kernels (put passes, get, contains, delete). One struct, passed
/// by value as the single kernel parameter, so that host and device agree on the layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchArgs {
    /// The table.
    pub table: TableArgs,
    /// `u64[n]` keys of the chunk.
    pub keys_in: u64,
    /// `u64[n * width]`: the chunk's values (put: input; get: output; contains/delete: unused, 0).
    pub values: u64,
    /// `u8[n]` found flags written by get/contains (0/1); unused elsewhere.
    pub found_out: u64,
    /// `u32[n]` slot of each key in the chunk-local table, written by the dedup pass of a put.
    pub slot_of: u64,
    /// `u32[local_mask + 1]` chunk-local table of a put (zeroed by the settle pass when the
    /// chunk needs it): a slot holds 0 (free) or `1 + i` of the last occurrence in the chunk
    /// of item `i`'s key, with [`REPEAT`] set when the key occurs more than once.
    pub local: u64,
    /// Slots of the chunk-local table minus one (a power of two minus one, at least `2n - 1`).
    pub local_mask: u64,
    /// `u32[flag::LEN]` per-chunk flags of a put.
    pub flags: u64,
    /// Keys in the chunk.
    pub n: u64,
}

/// Arguments of `kv_rehash`: move every live key of an old slot array into `table`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RehashArgs {
    /// The destination table (zeroed: every key EMPTY).
    pub table: TableArgs,
    /// The old slot array, of the table's width.
    pub old: u64,
    /// Slots of the old array.
    pub old_slots: u64,
    /// log2 of the slots per bucket of the old array.
    pub old_bucket_shift: u64,
}

const _: () = assert!(core::mem::size_of::<TableArgs>() == 48);
const _: () = assert!(core::mem::size_of::<BatchArgs>() == 48 + 8 * 8);
const _: () = assert!(core::mem::size_of::<RehashArgs>() == 48 + 3 * 8);

/// Slots per bucket of a cache table (`kv_core::CACHE_BUCKET_SLOTS`): one bit each in the
/// bucket's `used` word.
pub const CACHE_BUCKET: u64 = 32;

/// Lanes per item of the group-cooperative kernels (`ops::Group`: the cache lookups): a
/// quarter warp, each lane standing for `CACHE_BUCKET / GROUP_LANES` slots of the bucket.
pub const GROUP_LANES: u32 = 8;

const _: () =
    assert!(32u32.is_multiple_of(GROUP_LANES) && CACHE_BUCKET.is_multiple_of(GROUP_LANES as u64));

/// A cache table's eviction policy as the kernels take it ([`CacheTableArgs::policy`]).
pub mod cache_policy {
    /// Least recently used: the score is the table's logical clock at the last access.
    pub const LRU: u32 = 0;
    /// Least frequently used: the score counts accesses.
    pub const LFU: u32 = 1;
    /// The caller's score, given with each key of a put.
    pub const CUSTOM: u32 = 2;
}

/// Indices of the u64 words of a cache table's counter buffer. The host zeroes them before
/// a batch and reads them back after it.
pub mod cache_counter {
    /// Entries a put evicted or turned away; each took the next index of the evicted
    /// output arrays.
    pub const EVICTED: usize = 0;
    /// Expired entries whose slots a put reused.
    pub const EXPIRED_REUSED: usize = 1;
    /// Gets that found their key.
    pub const HITS: usize = 2;
    /// Gets that did not.
    pub const MISSES: usize = 3;
    /// Entries removed by a delete or a take.
    pub const REMOVED: usize = 4;
    /// Live entries counted by `kv_cache_count`.
    pub const LIVE: usize = 5;
    /// Probes of the batch-local table that found no room (a broken invariant).
    pub const ERRORS: usize = 6;
    /// wgpu only: items the per-bucket put pass applied, so that the host sees a dispatch
    /// that a driver cut short (kv-backend-wgpu's `cache` module).
    pub const APPLIED: usize = 7;
    /// CUDA only: reports the compaction pass moved to the evicted outputs (each warp
    /// takes its places from it with one atomic).
    pub const COMPACTED: usize = 8;
    /// Length of the counter buffer in u64 words.
    pub const LEN: usize = 9;
}

/// A cache table as the kernels see it: device addresses and shape. Slot `s` of bucket `b`
/// is `b * CACHE_BUCKET + s`; its key, score and expiry time are word `s` of their arrays
/// and its row is words `s * width ..` of the row array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheTableArgs {
    /// `u64[slots]` keys.
    pub keys: u64,
    /// `u64[slots]` scores.
    pub scores: u64,
    /// `u64[slots]` expiry times in the clock's milliseconds (0: never).
    pub expires: u64,
    /// `u64[slots * width]` value rows.
    pub rows: u64,
    /// `u32[buckets]`: bit `j` set when slot `j` of the bucket holds an entry (perhaps an
    /// expired one).
    pub used: u64,
    /// `u32[buckets]` bucket locks of the put (0: free, 1: held).
    pub locks: u64,
    /// `u64[cache_counter::LEN]` counters.
    pub counters: u64,
    /// `u8[slots]`: each slot's digest ([`cache_digest`] of its key), written with the key
    /// and meaningful only where the slot's used bit is set (4-byte aligned, so that a lane
    /// reads four in one load).
    pub digests: u64,
    /// Buckets in the table ([`cache_bucket`] scales the hash to it).
    pub buckets: u64,
    /// The table's hash seed.
    pub seed: u64,
    /// Value width in u64 words.
    pub width: u32,
    /// The eviction policy ([`cache_policy`]).
    pub policy: u32,
}

/// Arguments of the cache kernels: the table, the batch, its outputs and its scratch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheArgs {
    /// The table.
    pub table: CacheTableArgs,
    /// The table's logical clock for this batch (the score of an LRU access).
    pub clock: u64,
    /// Now, in the table clock's milliseconds (expiry).
    pub now: u64,
    /// Items in the batch.
    pub n: u64,
    /// `u64[n]` keys.
    pub keys_in: u64,
    /// `u64[n * width]`: put: the rows in; get, peek, take: the rows out (0: none wanted).
    pub values: u64,
    /// `u64[n]` scores of a custom put (0: none; every score 0).
    pub scores_in: u64,
    /// `u64[n]` times to live of a put in milliseconds (0: none; 0 in it: no expiry).
    pub ttl_in: u64,
    /// `u8[n]` found flags (0/1) of get, peek, contains and take (0: none wanted).
    pub found_out: u64,
    /// `u64[n]` expiry times of the entries a take removed (0: none wanted).
    pub expires_out: u64,
    /// `u64[n]` keys of the entries a put evicted or turned away (0: count them only).
    /// The put pass writes its reports to `ev_scratch`, and the compaction pass moves them
    /// here, to the first `m` places.
    pub ev_keys: u64,
    /// `u64[n * width]` their rows.
    pub ev_rows: u64,
    /// `u64[n]` their scores.
    pub ev_scores: u64,
    /// `u64[n]` their expiry times.
    pub ev_expires: u64,
    /// A put that wants its evicted entries: the put pass writes item `i`'s report at
    /// place `i` of this scratch ([`EvScratch`]) and its flag, with no atomic; the
    /// compaction pass gathers them into the outputs above. 0: reports are only counted.
    pub ev_scratch: u64,
    /// `u32[local_mask + 1]` batch-local table of the dedup pass (zeroed by the host): 0 or
    /// `1 + i` of the item that claimed the slot for its key.
    pub local: u64,
    /// `u32[local_mask + 1]` per local slot: the highest [`dedup_rank`] of its key's
    /// occurrences (zeroed by the host). 0 in a take or delete: every item acts.
    pub pick: u64,
    /// `u32[local_mask + 1]` per local slot: how many times its key occurs (zeroed).
    pub occurs: u64,
    /// `u32[n]`: the local slot of each item, written by the dedup pass.
    pub slot_of: u64,
    /// Slots of the local table minus one ([`local_slots`] of `n`, minus one).
    pub local_mask: u64,
    /// What a get does: 1 counts it as an access (scores change, hits and misses are
    /// counted), 0 is a peek or contains.
    pub access: u32,
    /// Which occurrence of a repeated key acts ([`dedup_rank`]): 0 the last (a put), 1 the
    /// first (a take).
    pub first_wins: u32,
}

/// The parts of a put's eviction scratch ([`CacheArgs::ev_scratch`]) for `n` items of
/// `width` words, one after the other from its start: `u64[n]` keys, `u64[n]` scores,
/// `u64[n]` expiry times, `u64[n * width]` rows, then `u8[n]` flags (1: the item reported an
/// entry). Addresses in bytes; [`EvScratch::bytes`] is the whole size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvScratch {
    /// The keys.
    pub keys: u64,
    /// The scores.
    pub scores: u64,
    /// The expiry times.
    pub expires: u64,
    /// The rows.
    pub rows: u64,
    /// The flags.
    pub flags: u64,
}

impl EvScratch {
    /// The parts of the scratch at `base` for `n` items of `width` words.
    #[inline(always)]
    pub const fn at(base: u64, n: u64, width: u32) -> Self {
        let keys = base;
        let scores = keys + 8 * n;
        let expires = scores + 8 * n;
        let rows = expires + 8 * n;
        let flags = rows + 8 * n * width as u64;
        EvScratch {
            keys,
            scores,
            expires,
            rows,
            flags,
        }
    }

    /// Bytes of the scratch for `n` items of `width` words.
    ///
    /// ```
    /// use kv_kernels::layout::EvScratch;
    /// assert_eq!(EvScratch::bytes(10, 4), 10 * (3 * 8 + 4 * 8 + 1));
    /// ```
    pub const fn bytes(n: u64, width: u32) -> u64 {
        EvScratch::at(0, n, width).flags + n
    }
}

/// The rank the dedup pass maxes into its key's local slot for item `i` of `n`: the
/// occurrence with the highest rank acts for its key. `1 + i` when the last occurrence wins
/// (a put), `n - i` when the first does (a take). Never 0 (a zeroed slot).
#[inline(always)]
pub const fn dedup_rank(i: u64, n: u64, first_wins: bool) -> u32 {
    if first_wins {
        (n - i) as u32
    } else {
        (i + 1) as u32
    }
}

const _: () = assert!(core::mem::size_of::<CacheTableArgs>() == 11 * 8);
const _: () = assert!(core::mem::size_of::<CacheArgs>() == 11 * 8 + 19 * 8 + 8);

/// A byte table's index slot (docs/arena.md): four u64 words, [`bytes_slot::HASH`],
/// [`bytes_slot::ADDR`], [`bytes_slot::META`] and [`bytes_slot::EXPIRES`]. The meta word
/// says what the slot holds: [`bytes_slot::EMPTY`], [`bytes_slot::TOMBSTONE`], or a live
/// entry's key length (low 32 bits, never 0) and value length (high 32 bits).
pub mod bytes_slot {
    /// Words per slot.
    pub const WORDS: u64 = 4;
    /// The key's hash (masked by the table's hash bits).
    pub const HASH: u64 = 0;
    /// The record's arena address (key bytes, then value bytes).
    pub const ADDR: u64 = 1;
    /// The lengths, or EMPTY / TOMBSTONE.
    pub const META: u64 = 2;
    /// The expiry time (0: never).
    pub const EXPIRES: u64 = 3;
    /// Meta of a slot that never held an entry: probes stop here.
    pub const EMPTY: u64 = 0;
    /// Meta of a slot whose entry was removed: probes go past it, inserts reuse it.
    pub const TOMBSTONE: u64 = u64::MAX;
    /// "No slot" (a key not found) in the kernels' per-item slot outputs.
    pub const NONE: u64 = u64::MAX;
    /// The local slot of an item whose dedup probe found no room (a broken invariant).
    pub const NO_LOCAL: u32 = u32::MAX;
}

/// The meta word of a live byte-table entry ([`bytes_slot::META`]).
#[inline(always)]
pub const fn byte_meta(key_len: u64, value_len: u64) -> u64 {
    key_len | (value_len << 32)
}

/// Whether a byte-table meta word is a live entry's.
#[inline(always)]
pub const fn byte_live(meta: u64) -> bool {
    meta != bytes_slot::EMPTY && meta != bytes_slot::TOMBSTONE
}

/// The key length of a live meta word.
#[inline(always)]
pub const fn byte_key_len(meta: u64) -> u64 {
    meta & 0xffff_ffff
}

/// The value length of a live meta word.
#[inline(always)]
pub const fn byte_value_len(meta: u64) -> u64 {
    meta >> 32
}

/// Indices of the u64 words of a byte table's counter buffer.
pub mod bytes_counter {
    /// Entries a put inserted (claimed from EMPTY or TOMBSTONE).
    pub const INSERTED: usize = 0;
    /// Of those, the ones that reused a tombstone.
    pub const REUSED: usize = 1;
    /// Entries a delete removed.
    pub const REMOVED: usize = 2;
    /// Entries appended to the list outputs (purge, gather).
    pub const LISTED: usize = 3;
    /// The largest `!expires` of the live entries a purge kept (so `!` of it is the
    /// earliest expiry time left; 0: none).
    pub const NEXT_EXPIRY: usize = 4;
    /// Probes that found no room (a broken invariant).
    pub const ERRORS: usize = 5;
    /// Entries a rehash moved.
    pub const MOVED: usize = 6;
    /// Length of the counter buffer in u64 words.
    pub const LEN: usize = 8;
}

/// Arguments of every byte-table kernel (`kv_kernels::ops::bytes`): the index, the arena's
/// segment directory, the batch and its scratch and outputs. Pointers are device
/// addresses; 0 where a kernel takes none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BytesArgs {
    /// `u64[(mask + 1) * bytes_slot::WORDS]` the index's slots.
    pub slots: u64,
    /// Index slots minus one (a power of two minus one).
    pub mask: u64,
    /// The hash seed.
    pub seed: u64,
    /// The mask of the table's hash bits.
    pub hash_mask: u64,
    /// `u64[segments]`: the device address of each arena segment.
    pub segs: u64,
    /// log2 of the segment size.
    pub seg_shift: u64,
    /// `u64[bytes_counter::LEN]` counters.
    pub counters: u64,
    /// Now on the table's clock (ms).
    pub now: u64,
    /// Items of the batch (slots, for the passes over the index).
    pub n: u64,
    /// `u64[n + 1]` offsets of the keys in `key_data` (from 0).
    pub key_offsets: u64,
    /// The keys' bytes.
    pub key_data: u64,
    /// `u64[n + 1]` offsets of the values in `value_data` (from 0).
    pub value_offsets: u64,
    /// The values' bytes.
    pub value_data: u64,
    /// `u64[n]` each key's hash.
    pub hashes: u64,
    /// `u32[local_mask + 1]` batch-local dedup table (zeroed): 0 or `1 + i` of its claimer.
    pub local: u64,
    /// `u32[local_mask + 1]` per local slot: `1 + ` the last occurrence of its key (zeroed).
    pub pick: u64,
    /// `u32[n]` each item's local slot.
    pub slot_of: u64,
    /// Local slots minus one.
    pub local_mask: u64,
    /// `u64[n]` each key's index slot, or `bytes_slot::NONE`.
    pub found_slot: u64,
    /// `u8[n]` whether item `i` is its key's last occurrence.
    pub win: u64,
    /// `u64[n]` each winner's new arena address (put), or each listed record's (move).
    pub addrs: u64,
    /// `u64[n]` times to live in ms (0 pointer: none).
    pub ttl: u64,
    /// `u64[n]` out: the arena address of the record an item replaced or removed.
    pub old_addr: u64,
    /// `u64[n]` out: its length (0: none).
    pub old_len: u64,
    /// `u64[n]` out: each found key's value length, `bytes_slot::NONE` for a miss.
    pub value_len_out: u64,
    /// `u64[n]` out: each found key's expiry time.
    pub expires_out: u64,
    /// `u64[n + 1]` offsets of a get's values in `out_data`.
    pub out_offsets: u64,
    /// A get's value bytes.
    pub out_data: u64,
    /// `u8[segments]`: 1 for a segment compaction empties.
    pub victims: u64,
    /// `u64[..]` out: listed slots (gather).
    pub list_slot: u64,
    /// `u64[..]` out: listed records' addresses (purge, gather).
    pub list_addr: u64,
    /// `u64[..]` out: listed records' lengths (purge, gather).
    pub list_len: u64,
    /// The old slot array of a rehash (`n` slots).
    pub old_slots: u64,
}

const _: () = assert!(core::mem::size_of::<BytesArgs>() == 33 * 8);
