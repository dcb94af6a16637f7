//! Byte tables: byte-string keys and values (docs/arena.md).
//!
//! A byte table maps keys of 1 to [`MAX_KEY_BYTES`] bytes to values of 0 bytes up to a
//! limit set when the table is created ([`ByteConfig::max_value_bytes`], 1 MiB by
//! default). Batches are structure-of-arrays in Apache Arrow's variable-size binary
//! layout ([`Binary`]: an offsets array and one data buffer), so that a `BinaryArray` or
//! `LargeBinaryArray` is handed over without a copy, and a get fills the same layout
//! ([`BinaryBuf`]) plus a found flag per key.
//!
//! The contract is the fixed-width one ([`KvBackend`](crate::KvBackend)), item for item:
//! the last occurrence of a key in a put wins, bad input is a matchable [`Error`] and
//! changes nothing, every byte string is valid (empty values, zero bytes, keys whose
//! hashes collide), and each batch is atomic for other callers. Two keys are equal only
//! when all of their bytes are.

use std::fmt;
use std::sync::Arc;

use crate::{Clock, Error, PutPlan, Result, SystemClock, TableConfig, plan_put};

/// The longest key a byte table takes, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// The default limit on a value's length, in bytes (1 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 1 << 20;

/// The largest limit on a value's length a table may set (4 GiB - 1: a length is a u32
/// in every backend's index).
pub const MAX_VALUE_LIMIT: u64 = u32::MAX as u64;

/// The offsets of an Arrow variable-size binary array: `i32` for `BinaryArray`, `i64`
/// for `LargeBinaryArray`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offsets<'a> {
    /// 32-bit offsets (Arrow's `Binary`).
    I32(&'a [i32]),
    /// 64-bit offsets (Arrow's `LargeBinary`).
    I64(&'a [i64]),
}

impl Offsets<'_> {
    fn len(&self) -> usize {
        match self {
            Offsets::I32(o) => o.len(),
            Offsets::I64(o) => o.len(),
        }
    }

    #[inline]
    fn at(&self, i: usize) -> usize {
        // Validated by `Binary::new`: every offset is in 0..=data.len().
        match self {
            Offsets::I32(o) => o[i] as usize,
            Offsets::I64(o) => o[i] as usize,
        }
    }

    fn signed(&self, i: usize) -> i64 {
        match self {
            Offsets::I32(o) => i64::from(o[i]),
            Offsets::I64(o) => o[i],
        }
    }
}

/// A batch of byte strings in Arrow's variable-size binary layout: item `i` is
/// `data[offsets[i] .. offsets[i + 1]]`. There are `offsets.len() - 1` items; the first
/// offset need not be 0 (a slice of a larger array).
///
/// A `Binary` is checked when it is made, so a table never sees offsets that run
/// backwards or past the data.
///
/// ```
/// use kv_core::Binary;
/// let data = b"applepear";
/// let b = Binary::new(&[0, 5, 5, 9], data).unwrap();
/// assert_eq!(b.len(), 3);
/// assert_eq!(b.get(0), b"apple");
/// assert_eq!(b.get(1), b"");
/// assert_eq!(b.iter().collect::<Vec<_>>(), [&b"apple"[..], b"", b"pear"]);
/// assert!(Binary::new(&[0, 5, 4], data).is_err()); // runs backwards
/// assert!(Binary::new(&[0, 10], data).is_err()); // past the data
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binary<'a> {
    offsets: Offsets<'a>,
    data: &'a [u8],
}

impl<'a> Binary<'a> {
    /// A batch from 64-bit offsets (Arrow's `LargeBinary`). [`Error::InvalidArgument`]
    /// when `offsets` is empty, holds a negative offset, runs backwards, or passes the end
    /// of `data`.
    pub fn new(offsets: &'a [i64], data: &'a [u8]) -> Result<Self> {
        Self::checked(Offsets::I64(offsets), data)
    }

    /// A batch from 32-bit offsets (Arrow's `Binary`), checked as [`Binary::new`].
    pub fn new_i32(offsets: &'a [i32], data: &'a [u8]) -> Result<Self> {
        Self::checked(Offsets::I32(offsets), data)
    }

    /// The empty batch.
    pub fn empty() -> Binary<'static> {
        Binary {
            offsets: Offsets::I64(&[0]),
            data: &[],
        }
    }

    fn checked(offsets: Offsets<'a>, data: &'a [u8]) -> Result<Self> {
        let n = offsets.len();
        if n == 0 {
            return Err(Error::InvalidArgument(
                "binary offsets are empty: a batch of n items has n + 1 offsets".into(),
            ));
        }
        let mut prev = offsets.signed(0);
        if prev < 0 {
            return Err(Error::InvalidArgument(format!(
                "binary offset 0 is negative ({prev})"
            )));
        }
        for i in 1..n {
            let o = offsets.signed(i);
            if o < prev {
                return Err(Error::InvalidArgument(format!(
                    "binary offsets run backwards at {i}: {o} after {prev}"
                )));
            }
            prev = o;
        }
        if prev as u64 > data.len() as u64 {
            return Err(Error::InvalidArgument(format!(
                "binary offsets end at {prev}, past the {} bytes of data",
                data.len()
            )));
        }
        Ok(Binary { offsets, data })
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether the batch has no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Item `i`. Panics when `i >= self.len()`, as slice indexing does.
    #[inline]
    pub fn get(&self, i: usize) -> &'a [u8] {
        &self.data[self.offsets.at(i)..self.offsets.at(i + 1)]
    }

    /// The length of item `i` in bytes. Panics when `i >= self.len()`.
    #[inline]
    pub fn item_len(&self, i: usize) -> usize {
        self.offsets.at(i + 1) - self.offsets.at(i)
    }

    /// The items in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &'a [u8]> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The bytes of every item together (`data[offsets[0] .. offsets[n]]`).
    pub fn total_bytes(&self) -> u64 {
        (self.offsets.at(self.len()) - self.offsets.at(0)) as u64
    }

    /// The offsets, as passed.
    pub fn offsets(&self) -> Offsets<'a> {
        self.offsets
    }

    /// The data buffer, as passed.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
}

/// An owned batch of byte strings in the layout of [`Binary`] (64-bit offsets from 0):
/// what a get fills, and a convenient way to build a batch.
///
/// ```
/// use kv_core::BinaryBuf;
/// let mut b = BinaryBuf::from_slices(["k1", "k22"]);
/// b.push(b"");
/// assert_eq!(b.len(), 3);
/// assert_eq!(b.offsets(), [0, 2, 5, 5]);
/// assert_eq!(b.as_binary().get(1), b"k22");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryBuf {
    offsets: Vec<i64>,
    data: Vec<u8>,
}

impl Default for BinaryBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl BinaryBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        BinaryBuf {
            offsets: vec![0],
            data: Vec::new(),
        }
    }

    /// A buffer holding `items` in order.
    pub fn from_slices<I>(items: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let mut b = Self::new();
        for item in items {
            b.push(item.as_ref());
        }
        b
    }

    /// Appends an item.
    pub fn push(&mut self, item: &[u8]) {
        self.data.extend_from_slice(item);
        self.offsets.push(self.data.len() as i64);
    }

    /// Removes every item, keeping the allocations.
    pub fn clear(&mut self) {
        self.offsets.clear();
        self.offsets.push(0);
        self.data.clear();
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Item `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let lo = *self.offsets.get(i)? as usize;
        let hi = *self.offsets.get(i + 1)? as usize;
        Some(&self.data[lo..hi])
    }

    /// The items as a [`Binary`] batch.
    pub fn as_binary(&self) -> Binary<'_> {
        Binary {
            offsets: Offsets::I64(&self.offsets),
            data: &self.data,
        }
    }

    /// The offsets (`len() + 1` of them, from 0).
    pub fn offsets(&self) -> &[i64] {
        &self.offsets
    }

    /// The data buffer.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Replaces the contents with `n` items whose lengths are `lens(i)`, all zero bytes,
    /// and returns the data buffer to fill. What a backend's get uses to size its output
    /// once, then fill it in parallel.
    pub fn reset_with_lens(&mut self, n: usize, lens: impl Fn(usize) -> usize + Sync) -> &mut [u8] {
        let total = self.set_offsets(n, lens);
        self.data.clear();
        self.data.resize(total, 0);
        &mut self.data
    }

    /// Replaces the offsets with those of `n` items of lengths `lens(i)` (on all cores
    /// for long batches, [`crate::par::prefix_sums`]); returns the total length.
    fn set_offsets(&mut self, n: usize, lens: impl Fn(usize) -> usize + Sync) -> usize {
        // Every place is written below; `resize` zeroes only places past the old length,
        // so a reused vector is not zeroed first.
        self.offsets.resize(n + 1, 0);
        crate::par::prefix_sums(&mut self.offsets, |i| lens(i) as i64) as usize
    }

    /// Like [`reset_with_lens`](Self::reset_with_lens), for a caller that overwrites every
    /// data byte: the data keeps the bytes the buffer held (zeros only past its old
    /// length), so a reused buffer is not zeroed again. Returns the offsets and the data
    /// to fill.
    ///
    /// ```
    /// use kv_core::BinaryBuf;
    /// let mut b = BinaryBuf::from_slices([b"abc".as_slice(), b"de"]);
    /// let (offsets, data) = b.reset_for_overwrite(2, |i| [1, 3][i]);
    /// assert_eq!(offsets, &[0, 1, 4]);
    /// data.copy_from_slice(b"xyzw");
    /// assert_eq!(b.get(1), Some(b"yzw".as_slice()));
    /// ```
    pub fn reset_for_overwrite(
        &mut self,
        n: usize,
        lens: impl Fn(usize) -> usize + Sync,
    ) -> (&[i64], &mut [u8]) {
        let total = self.set_offsets(n, lens);
        // Zeros only past the old length (a shorter output is truncated).
        self.data.resize(total, 0);
        (&self.offsets, &mut self.data)
    }

    /// The offsets and data, taken apart (to build an Arrow array without a copy).
    pub fn into_parts(self) -> (Vec<i64>, Vec<u8>) {
        (self.offsets, self.data)
    }
}

/// What a byte table is made with: the index's sizing (a [`TableConfig`]: capacity in
/// entries, load factor, growth, seed, device) and the byte limits.
///
/// ```
/// use kv_core::ByteConfig;
/// let cfg = ByteConfig::new(10_000).max_key_bytes(64).max_value_bytes(4096);
/// cfg.validate().unwrap();
/// assert!(ByteConfig::new(10).max_key_bytes(513).validate().is_err());
/// ```
#[derive(Clone)]
pub struct ByteConfig {
    /// The index: entries before the first growth, load factor, growth, seed, device.
    /// Its `width` and `cache` must stay at their defaults.
    pub table: TableConfig,
    /// The longest key, `1..=`[`MAX_KEY_BYTES`] bytes (default [`MAX_KEY_BYTES`]).
    pub max_key_bytes: usize,
    /// The longest value, up to [`MAX_VALUE_LIMIT`] bytes (default
    /// [`DEFAULT_MAX_VALUE_BYTES`]).
    pub max_value_bytes: u64,
    /// The most bytes the arena may hold (`None`: as much as the device gives). A put that
    /// would need more, even after compaction, is refused with
    /// [`Error::BudgetExceeded`] and changes nothing.
    pub arena_budget: Option<u64>,
    /// The arena's segment size in bytes, a power of two (`None`: chosen from the value
    /// limit, docs/arena.md). Every record (key and value) must fit in one segment.
    pub segment_bytes: Option<u64>,
    /// Keeps only the low `bits` bits of every key's hash (`64`, the default, keeps all).
    /// **For tests**: with few bits, distinct keys share hashes, which checks that a
    /// table compares keys byte for byte.
    pub hash_bits: u32,
    /// The clock that expiry reads ([`SystemClock`] by default; a
    /// [`ManualClock`](crate::ManualClock) makes tests exact).
    pub clock: Arc<dyn Clock>,
}

impl fmt::Debug for ByteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByteConfig")
            .field("table", &self.table)
            .field("max_key_bytes", &self.max_key_bytes)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("arena_budget", &self.arena_budget)
            .field("segment_bytes", &self.segment_bytes)
            .field("hash_bits", &self.hash_bits)
            .finish_non_exhaustive()
    }
}

/// Two configs are equal when their settings are and they read the same clock.
impl PartialEq for ByteConfig {
    fn eq(&self, o: &Self) -> bool {
        self.table == o.table
            && self.max_key_bytes == o.max_key_bytes
            && self.max_value_bytes == o.max_value_bytes
            && self.arena_budget == o.arena_budget
            && self.segment_bytes == o.segment_bytes
            && self.hash_bits == o.hash_bits
            && Arc::ptr_eq(&self.clock, &o.clock)
    }
}

impl ByteConfig {
    /// A config for `capacity` entries, with growth on and the default limits.
    pub fn new(capacity: usize) -> Self {
        ByteConfig {
            table: TableConfig::new(capacity),
            max_key_bytes: MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            arena_budget: None,
            segment_bytes: None,
            hash_bits: 64,
            clock: Arc::new(SystemClock::new()),
        }
    }

    /// Replaces the clock that expiry reads.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the index's config (capacity, growth, seed, device).
    pub fn table(mut self, table: TableConfig) -> Self {
        self.table = table;
        self
    }

    /// Sets the longest key.
    pub fn max_key_bytes(mut self, n: usize) -> Self {
        self.max_key_bytes = n;
        self
    }

    /// Sets the longest value.
    pub fn max_value_bytes(mut self, n: u64) -> Self {
        self.max_value_bytes = n;
        self
    }

    /// Sets the arena's budget in bytes.
    pub fn arena_budget(mut self, bytes: u64) -> Self {
        self.arena_budget = Some(bytes);
        self
    }

    /// Sets the arena's segment size.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = Some(bytes);
        self
    }

    /// Keeps only `bits` bits of each key's hash (for tests; see [`ByteConfig::hash_bits`]).
    pub fn hash_bits(mut self, bits: u32) -> Self {
        self.hash_bits = bits;
        self
    }

    /// The limits a batch is checked against.
    pub fn limits(&self) -> ByteLimits {
        ByteLimits {
            max_key_bytes: self.max_key_bytes,
            max_value_bytes: self.max_value_bytes,
        }
    }

    /// The mask applied to every key's hash.
    pub fn hash_mask(&self) -> u64 {
        if self.hash_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.hash_bits) - 1
        }
    }

    /// The largest record (key and value) a table of this config stores.
    pub fn max_record_bytes(&self) -> u64 {
        self.max_key_bytes as u64 + self.max_value_bytes
    }

    /// The admission rule of a byte put ([`plan_put`] with an exact count): the index's slot
    /// count after a put that brings `fresh` distinct new keys to a table of `len` entries
    /// in `slots` slots, or [`Error::CapacityExceeded`] when growth is off and they do not
    /// fit. Every backend's byte table admits by this one rule.
    ///
    /// ```
    /// use kv_core::{ByteConfig, TableConfig};
    /// let cfg = ByteConfig::new(12);
    /// assert_eq!(cfg.admit(0, 12, 16), Ok(16));
    /// assert_eq!(cfg.admit(12, 1, 16), Ok(32));
    /// let fixed = cfg.clone().table(TableConfig::new(12).growth(false));
    /// assert!(fixed.admit(12, 1, 16).is_err());
    /// ```
    pub fn admit(&self, len: usize, fresh: usize, slots: usize) -> Result<usize> {
        let t = &self.table;
        Ok(
            match plan_put(len, fresh, slots, t.max_load_factor, t.growth)? {
                PutPlan::Fits => slots,
                PutPlan::Grow { slots } => slots,
            },
        )
    }

    /// Checks the config: [`Error::InvalidConfig`] says what is wrong.
    pub fn validate(&self) -> Result<()> {
        self.table.validate()?;
        if self.table.width != 1 || self.table.cache.is_some() {
            return Err(Error::InvalidConfig(
                "a byte table's index takes no width and no cache config".into(),
            ));
        }
        if !(1..=MAX_KEY_BYTES).contains(&self.max_key_bytes) {
            return Err(Error::InvalidConfig(format!(
                "max_key_bytes is {}, must be 1..={MAX_KEY_BYTES}",
                self.max_key_bytes
            )));
        }
        if self.max_value_bytes > MAX_VALUE_LIMIT {
            return Err(Error::InvalidConfig(format!(
                "max_value_bytes is {}, must be at most {MAX_VALUE_LIMIT}",
                self.max_value_bytes
            )));
        }
        if let Some(s) = self.segment_bytes
            && (!s.is_power_of_two() || s < self.max_record_bytes().next_multiple_of(8))
        {
            return Err(Error::InvalidConfig(format!(
                "segment_bytes is {s}: it must be a power of two that holds the largest \
                 record ({} bytes)",
                self.max_record_bytes()
            )));
        }
        if !(1..=64).contains(&self.hash_bits) {
            return Err(Error::InvalidConfig(format!(
                "hash_bits is {}, must be 1..=64",
                self.hash_bits
            )));
        }
        Ok(())
    }
}

/// The byte limits of a table: what [`check_byte_put`] checks a batch against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteLimits {
    /// The longest key.
    pub max_key_bytes: usize,
    /// The longest value.
    pub max_value_bytes: u64,
}

impl ByteLimits {
    /// Checks every key of a batch: [`Error::ByteLimit`] names the first that is empty or
    /// too long.
    pub fn check_keys(&self, keys: Binary<'_>) -> Result<()> {
        for i in 0..keys.len() {
            let len = keys.item_len(i);
            if len == 0 || len > self.max_key_bytes {
                return Err(Error::ByteLimit {
                    what: "key",
                    index: i,
                    len: len as u64,
                    min: 1,
                    max: self.max_key_bytes as u64,
                });
            }
        }
        Ok(())
    }

    /// Checks every value of a batch: [`Error::ByteLimit`] names the first that is too
    /// long.
    pub fn check_values(&self, values: Binary<'_>) -> Result<()> {
        for i in 0..values.len() {
            let len = values.item_len(i) as u64;
            if len > self.max_value_bytes {
                return Err(Error::ByteLimit {
                    what: "value",
                    index: i,
                    len,
                    min: 0,
                    max: self.max_value_bytes,
                });
            }
        }
        Ok(())
    }
}

/// Checks a byte put: as many values as keys, and every key and value within the limits.
///
/// ```
/// use kv_core::{BinaryBuf, ByteConfig, Error, check_byte_put};
/// let limits = ByteConfig::new(8).max_key_bytes(4).limits();
/// let keys = BinaryBuf::from_slices(["a", "toolong"]);
/// let values = BinaryBuf::from_slices(["1", "2"]);
/// assert!(matches!(
///     check_byte_put(&limits, keys.as_binary(), values.as_binary()),
///     Err(Error::ByteLimit { what: "key", index: 1, len: 7, .. })
/// ));
/// ```
pub fn check_byte_put(limits: &ByteLimits, keys: Binary<'_>, values: Binary<'_>) -> Result<()> {
    if values.len() != keys.len() {
        return Err(Error::LengthMismatch {
            what: "values",
            expected: keys.len(),
            got: values.len(),
        });
    }
    limits.check_keys(keys)?;
    limits.check_values(values)
}

/// Checks a byte get or contains: one found flag per key, and every key within the limits
/// (a key no put could have stored is bad input, not a miss).
pub fn check_byte_lookup(limits: &ByteLimits, keys: Binary<'_>, found_out: &[bool]) -> Result<()> {
    if found_out.len() != keys.len() {
        return Err(Error::LengthMismatch {
            what: "found_out",
            expected: keys.len(),
            got: found_out.len(),
        });
    }
    limits.check_keys(keys)
}

/// Checks a batch's times to live (or any per-key slice named `what`): one per key.
pub fn check_per_key<T>(keys: Binary<'_>, what: &'static str, per_key: &[T]) -> Result<()> {
    if per_key.len() != keys.len() {
        return Err(Error::LengthMismatch {
            what,
            expected: keys.len(),
            got: per_key.len(),
        });
    }
    Ok(())
}

/// The items of a batch that act: the last occurrence of each distinct key, in batch
/// order (`hashes[i]` is key `i`'s hash under any seed; equal keys must have equal hashes).
/// A put keeps these (the last occurrence wins); a delete or any other batch that acts once
/// per key can use them too, as every occurrence of a key names the same entry.
///
/// ```
/// use kv_core::{BinaryBuf, last_occurrences};
/// let keys = BinaryBuf::from_slices(["x", "y", "x", "z", "y"]);
/// // Colliding hashes: keys are still told apart by their bytes.
/// assert_eq!(last_occurrences(keys.as_binary(), &[7; 5]), [2, 3, 4]);
/// ```
pub fn last_occurrences(keys: Binary<'_>, hashes: &[u64]) -> Vec<usize> {
    use rayon::prelude::*;
    let mut order: Vec<usize> = (0..keys.len()).collect();
    let by_key = |&a: &usize, &b: &usize| {
        hashes[a]
            .cmp(&hashes[b])
            .then_with(|| keys.get(a).cmp(keys.get(b)))
            .then(a.cmp(&b))
    };
    if order.len() >= 4096 {
        order.par_sort_unstable_by(by_key);
    } else {
        order.sort_unstable_by(by_key);
    }
    let mut winners: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|&(at, &i)| {
            order
                .get(at + 1)
                .is_none_or(|&j| hashes[j] != hashes[i] || keys.get(j) != keys.get(i))
        })
        .map(|(_, &i)| i)
        .collect();
    winners.sort_unstable();
    winners
}

/// What [`ByteTable::ttl`] answers for a key that is not in the table (Redis's `PTTL`).
pub const TTL_MISSING: i64 = -2;
/// What [`ByteTable::ttl`] answers for a key that never expires.
pub const TTL_NEVER: i64 = -1;

/// What [`ByteTable::ttl`] answers for an entry that expires at `expires` (0: never;
/// `None`: no live entry) at `now`: Redis's `PTTL`.
///
/// ```
/// use kv_core::{TTL_MISSING, TTL_NEVER, remaining_ttl};
/// assert_eq!(remaining_ttl(None, 5), TTL_MISSING);
/// assert_eq!(remaining_ttl(Some(0), 5), TTL_NEVER);
/// assert_eq!(remaining_ttl(Some(105), 5), 100);
/// ```
pub fn remaining_ttl(expires: Option<u64>, now: u64) -> i64 {
    match expires {
        None => TTL_MISSING,
        Some(0) => TTL_NEVER,
        Some(e) => i64::try_from(e.saturating_sub(now)).unwrap_or(i64::MAX),
    }
}

/// What an arena holds: the bytes it has taken from its device and the bytes of the live
/// records in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArenaStats {
    /// Bytes held: every segment in use, whole.
    pub held_bytes: u64,
    /// Bytes of live records (keys and values, without padding).
    pub live_bytes: u64,
    /// Segments in use.
    pub segments: u64,
    /// The size of a segment.
    pub segment_bytes: u64,
    /// Bytes of live records moved by compaction since the table opened.
    pub compacted_bytes: u64,
}

impl ArenaStats {
    /// Held bytes over live bytes, the arena's fragmentation ratio (Redis's
    /// `mem_fragmentation_ratio`); 1 for an empty arena.
    pub fn fragmentation(&self) -> f64 {
        if self.live_bytes == 0 {
            if self.held_bytes == 0 {
                1.0
            } else {
                f64::INFINITY
            }
        } else {
            self.held_bytes as f64 / self.live_bytes as f64
        }
    }
}

/// What a byte table says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ByteDescription {
    /// The backend's short name.
    pub backend: &'static str,
    /// The device, as its driver names it.
    pub device: String,
    /// Live entries.
    pub entries: usize,
    /// Entries the index holds before it grows (or refuses, with growth off).
    pub capacity: usize,
    /// Bytes of the index (slots and metadata).
    pub index_bytes: u64,
    /// The arena.
    pub arena: ArenaStats,
}

/// A batched table of byte-string keys and values ([`Binary`] batches; see
/// docs/arena.md).
///
/// The semantics are those of [`KvBackend`](crate::KvBackend) item for item: a put's last
/// occurrence of a key wins; a get or contains reports each key; a delete counts the
/// entries it removed (a repeated key once); bad input is an [`Error`] and changes
/// nothing; each batch is atomic for other callers.
pub trait ByteTable: Send + Sync {
    /// Inserts or overwrites `keys[i] → values[i]`.
    fn put(&self, keys: Binary<'_>, values: Binary<'_>) -> Result<()>;

    /// Looks every key up: `values_out` is replaced by one item per key (empty for a miss)
    /// and `found_out[i]` says whether `keys[i]` was found.
    fn get(
        &self,
        keys: Binary<'_>,
        values_out: &mut BinaryBuf,
        found_out: &mut [bool],
    ) -> Result<()>;

    /// Removes the keys; returns how many entries were removed.
    fn delete(&self, keys: Binary<'_>) -> Result<usize>;

    /// Whether each key is present.
    fn contains(&self, keys: Binary<'_>, found_out: &mut [bool]) -> Result<()>;

    /// Live entries.
    fn len(&self) -> usize;

    /// Whether the table holds no entries.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries the index holds before it grows (or refuses).
    fn capacity(&self) -> usize;

    /// Removes every entry and gives the arena's segments back.
    fn clear(&self) -> Result<()>;

    /// The table's limits.
    fn limits(&self) -> ByteLimits;

    /// What the table says about itself, its arena included.
    fn describe(&self) -> ByteDescription;

    /// A put whose entries expire: `ttl_ms[i]` is key `i`'s time to live in milliseconds
    /// on the table's clock (0: never). A plain [`put`](Self::put) gives no time to live,
    /// so it clears an entry's expiry, as Redis's `SET` does. An expired entry is never
    /// returned, is not counted by `len()`, and its bytes are given back to the arena.
    ///
    /// Optional: the default answers [`Error::Unsupported`].
    fn put_ttl(&self, keys: Binary<'_>, values: Binary<'_>, ttl_ms: &[u64]) -> Result<()> {
        let _ = (keys, values, ttl_ms);
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "byte tables with expiry",
        })
    }

    /// Sets the time to live of each present key (`ttl_ms[i]`, 0: never expires, Redis's
    /// `PERSIST`); `found_out[i]` says whether key `i` was present. Optional, as
    /// [`put_ttl`](Self::put_ttl).
    fn expire(&self, keys: Binary<'_>, ttl_ms: &[u64], found_out: &mut [bool]) -> Result<()> {
        let _ = (keys, ttl_ms, found_out);
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "byte tables with expiry",
        })
    }

    /// Each key's remaining time to live in milliseconds, [`TTL_NEVER`] for a key that
    /// does not expire and [`TTL_MISSING`] for a key that is absent (Redis's `PTTL`).
    /// Optional, as [`put_ttl`](Self::put_ttl).
    fn ttl(&self, keys: Binary<'_>, ttl_out: &mut [i64]) -> Result<()> {
        let _ = (keys, ttl_out);
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "byte tables with expiry",
        })
    }

    /// Optional (snapshots): every live entry, copied out at one point in time, as
    /// [`KvBackend::export`](crate::KvBackend::export) does for fixed-width tables: under
    /// one hold of the table's lock, decoded after it is let go. Expired entries are left
    /// out. The default answers [`Error::Unsupported`].
    ///
    /// An image goes back into a table with [`ByteImage::live_runs`](crate::ByteImage::live_runs) and
    /// [`put_ttl`](Self::put_ttl).
    fn export(&self) -> Result<crate::ByteImage> {
        Err(Error::Unsupported {
            backend: self.describe().backend,
            what: "export (snapshots)",
        })
    }

    /// A put from slices, for small batches.
    fn put_slices(&self, keys: &[&[u8]], values: &[&[u8]]) -> Result<()> {
        let k = BinaryBuf::from_slices(keys);
        let v = BinaryBuf::from_slices(values);
        self.put(k.as_binary(), v.as_binary())
    }

    /// A get from slices, for small batches: the value of each key, or `None`.
    fn get_slices(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        let k = BinaryBuf::from_slices(keys);
        let mut out = BinaryBuf::new();
        let mut found = vec![false; keys.len()];
        self.get(k.as_binary(), &mut out, &mut found)?;
        Ok(found
            .iter()
            .enumerate()
            .map(|(i, &f)| f.then(|| out.get(i).unwrap_or_default().to_vec()))
            .collect())
    }
}
