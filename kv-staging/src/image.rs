//! The parts of table exports and restores (snapshots) that both GPU backends share: how
//! large a piece of a device-to-host copy is, the decoding of a cache table's arrays into
//! a [`TableImage`], and the entries a restore puts back into a cache table.
//!
//! An export copies a table's device arrays to the host under one hold of the table's
//! lock and decodes them after the lock is let go; a cache table's arrays are laid out
//! alike on CUDA and wgpu (docs/cache.md: per slot a key, a stored score, an expiry time
//! and a row; per bucket of [`CACHE_BUCKET_SLOTS`] slots a `used` word), so one decoder
//! serves both. A cache restore runs the backend's put kernel with the scores stored as
//! given (the custom policy, whatever the table's) and the entries' own expiry times.

use kv_core::{CACHE_BUCKET_SLOTS, CachePolicy, ImagePart, Result, TableImage};
use kv_kernels::layout::{cache_policy, expired};
use kv_kernels::ops::cache::{lru_score, visible_score};

/// Bytes of one device-to-host copy of an export at most: a large array is copied in
/// pieces of this size.
pub const EXPORT_CHUNK_BYTES: usize = 256 << 20;

/// A cache table's policy as the kernels' policy word (`kv_kernels::layout::cache_policy`).
pub fn policy_word(policy: CachePolicy) -> u32 {
    match policy {
        CachePolicy::Lru => cache_policy::LRU,
        CachePolicy::Lfu => cache_policy::LFU,
        CachePolicy::Custom => cache_policy::CUSTOM,
    }
}

/// What a table under `policy` stores for an entry whose score, as the contract states it,
/// is `score`: under LRU the clock above the order bits (`lru_score(score, 0)`, the clock
/// clamped to the 32 bits it has there), so that `visible_score` gives `score` back; under
/// LFU and custom scores the score itself.
///
/// ```
/// use kv_core::CachePolicy;
/// use kv_kernels::ops::cache::visible_score;
/// use kv_staging::image::{policy_word, stored_score};
/// let s = stored_score(CachePolicy::Lru, 41);
/// assert_eq!(visible_score(policy_word(CachePolicy::Lru), s), 41);
/// assert_eq!(stored_score(CachePolicy::Lfu, 41), 41);
/// ```
pub fn stored_score(policy: CachePolicy, score: u64) -> u64 {
    match policy {
        CachePolicy::Lru => lru_score(score.min(u64::from(u32::MAX)), 0),
        CachePolicy::Lfu | CachePolicy::Custom => score,
    }
}

/// A cache table's arrays, copied to the host: `keys`, `scores` (as stored), `expires` and
/// `rows` (`width` words each) per slot, `used` per bucket (bit `j`: slot `j` of the bucket
/// holds an entry, perhaps an expired one).
#[derive(Debug, Clone, Copy)]
pub struct CacheArrays<'a> {
    /// Each slot's key.
    pub keys: &'a [u64],
    /// Each slot's score as the table stores it.
    pub scores: &'a [u64],
    /// Each slot's expiry time (0: never).
    pub expires: &'a [u64],
    /// Each slot's row.
    pub rows: &'a [u64],
    /// Each bucket's used bits.
    pub used: &'a [u32],
}

impl CacheArrays<'_> {
    /// The image of the table these arrays are a copy of: every entry live at `now`, with
    /// its row, its score as the contract states it under `policy`, and its expiry time;
    /// `clock` is the table's logical clock, kept in the image under LRU (0 otherwise).
    /// Slots past the shortest array are left out.
    ///
    /// ```
    /// use kv_core::CachePolicy;
    /// use kv_kernels::ops::cache::lru_score;
    /// use kv_staging::image::CacheArrays;
    /// let mut keys = vec![0u64; 32];
    /// let (mut scores, mut expires) = (keys.clone(), keys.clone());
    /// let mut rows = vec![0u64; 32];
    /// (keys[0], scores[0], expires[0], rows[0]) = (7, lru_score(5, 3), 0, 70);
    /// (keys[1], scores[1], expires[1], rows[1]) = (8, lru_score(4, 0), 900, 80);
    /// (keys[2], rows[2]) = (9, 90); // not in use
    /// let a = CacheArrays { keys: &keys, scores: &scores, expires: &expires, rows: &rows, used: &[0b11] };
    /// let img = a.image(1, CachePolicy::Lru, 6, 1000); // key 8 expired at 900
    /// assert_eq!((img.keys, img.values, img.clock), (vec![7], vec![70], 6));
    /// assert_eq!((img.scores, img.expires), (Some(vec![5]), Some(vec![0])));
    /// ```
    pub fn image(&self, width: usize, policy: CachePolicy, clock: u64, now: u64) -> TableImage {
        const B: usize = CACHE_BUCKET_SLOTS;
        let word = policy_word(policy);
        let lru = policy == CachePolicy::Lru;
        let mut img = TableImage::new_cache(width, if lru { clock } else { 0 });
        let slots = self
            .keys
            .len()
            .min(self.scores.len())
            .min(self.expires.len())
            .min(self.rows.len() / width.max(1));
        for (b, &bits) in self.used.iter().enumerate() {
            for j in 0..B {
                let s = b * B + j;
                if bits & (1 << j) == 0 || s >= slots || expired(self.expires[s], now) {
                    continue;
                }
                img.push(
                    self.keys[s],
                    &self.rows[s * width..(s + 1) * width],
                    Some((visible_score(word, self.scores[s]), self.expires[s])),
                );
            }
        }
        img
    }
}

/// The entries of an image part that a restore puts back into a cache table: those not
/// expired at the restore's `now`, each with the score the table stores for it and its
/// absolute expiry time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheRestore {
    /// The keys.
    pub keys: Vec<u64>,
    /// Their rows.
    pub values: Vec<u64>,
    /// The scores to store ([`stored_score`]), or `None` when the part has none (then each
    /// entry gets what a put would give it).
    pub scores: Option<Vec<u64>>,
    /// Their expiry times (0: never), none of them past.
    pub expires: Vec<u64>,
    /// The logical clock the table moves to at least.
    pub clock: u64,
}

impl CacheRestore {
    /// The entries of `part` live at `now`, for a table of `width` words under `policy`;
    /// a part whose lengths disagree ([`ImagePart::check`]) is an error.
    ///
    /// ```
    /// use kv_core::{CachePolicy, ImagePart};
    /// use kv_staging::image::CacheRestore;
    /// let part = ImagePart {
    ///     keys: &[1, 2, 3],
    ///     values: &[10, 20, 30],
    ///     scores: Some(&[4, 5, 6]),
    ///     expires: Some(&[0, 100, 300]),
    ///     clock: 9,
    /// };
    /// let r = CacheRestore::new(&part, 1, CachePolicy::Lfu, 100)?;
    /// assert_eq!((r.keys, r.values, r.expires), (vec![1, 3], vec![10, 30], vec![0, 300]));
    /// assert_eq!((r.scores, r.clock), (Some(vec![4, 6]), 9));
    /// # Ok::<(), kv_core::Error>(())
    /// ```
    pub fn new(part: &ImagePart<'_>, width: usize, policy: CachePolicy, now: u64) -> Result<Self> {
        part.check(width)?;
        let live: Vec<usize> = (0..part.keys.len())
            .filter(|&i| {
                part.expires
                    .and_then(|e| e.get(i))
                    .is_none_or(|&e| !expired(e, now))
            })
            .collect();
        Ok(CacheRestore {
            keys: live.iter().map(|&i| part.keys[i]).collect(),
            values: live
                .iter()
                .flat_map(|&i| part.values[i * width..(i + 1) * width].iter().copied())
                .collect(),
            scores: part.scores.map(|s| {
                live.iter()
                    .map(|&i| stored_score(policy, s.get(i).copied().unwrap_or(0)))
                    .collect()
            }),
            expires: live
                .iter()
                .map(|&i| part.expires.and_then(|e| e.get(i)).copied().unwrap_or(0))
                .collect(),
            clock: part.clock,
        })
    }

    /// Each entry's time to live at `now` (the restore's), for a put kernel that takes
    /// times to live: `expires - now`, 0 for never, so that the kernel's `now + ttl` is the
    /// expiry time again.
    pub fn ttl(&self, now: u64) -> Vec<u64> {
        self.expires
            .iter()
            .map(|&e| {
                if e == 0 {
                    0
                } else {
                    e.saturating_sub(now).max(1)
                }
            })
            .collect()
    }
}
