//! Cache tables: a fixed budget, an eviction policy, expiry, and what a put reports.
//!
//! A table created with a [`CacheConfig`] never refuses a put for lack of room and never
//! grows: when a new key finds its bucket full, the entry of lowest *score* in that bucket
//! leaves (or the new key itself, when its score is lower still), and the put reports it.
//! docs/cache.md states the contract; this module holds its types and the checks every
//! backend makes before it touches a table.
//!
//! # The contract, in short
//!
//! - **Buckets.** A cache table's slots are cut into buckets of [`CACHE_BUCKET_SLOTS`]; a
//!   key lives only in its home bucket ([`KvBackend::eviction_scope`] names it). That bucket
//!   is the place a victim is chosen from: *an evicted entry had a score no higher than
//!   every entry that stayed in its bucket*, the batch's own new entries included.
//! - **Scores.** [`CachePolicy::Lru`]: the table's logical clock at the entry's last access;
//!   the clock advances by one at every put or get batch. [`CachePolicy::Lfu`]: how many
//!   times the entry was accessed, each occurrence of its key in a put, or in a get that
//!   finds it, counting one. [`CachePolicy::Custom`]: what the caller passed with the put
//!   (higher stays longer); gets leave it as it is, and a plain [`KvBackend::put`] gives 0.
//! - **Accesses.** `get` counts as an access; [`KvBackend::peek`] and `contains` do not.
//! - **Expiry.** A put may give each key a time to live, in milliseconds of the table's
//!   [`Clock`]. An expired entry is never returned, not counted by `len()`, and its slot is
//!   reused; it is not reported as evicted.
//! - **Nothing is lost silently.** Every entry a put displaces, and every new key a full
//!   bucket turns away, is counted, and reported by [`KvBackend::put_and_evict`].
//!
//! [`KvBackend::eviction_scope`]: crate::KvBackend::eviction_scope
//! [`KvBackend::peek`]: crate::KvBackend::peek
//! [`KvBackend::put`]: crate::KvBackend::put
//! [`KvBackend::put_and_evict`]: crate::KvBackend::put_and_evict

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Slots per bucket of a cache table: the scope an eviction chooses its victim from.
/// Thirty-two, so that on a GPU one warp holds a bucket, a slot a lane, and on the host a
/// bucket's keys are four cache lines.
pub const CACHE_BUCKET_SLOTS: usize = 32;

/// How a cache table scores its entries; the lowest score leaves first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// Least recently used: the score is the table's logical clock at the entry's last put
    /// or get. The clock advances by one at each put or get batch.
    Lru,
    /// Least frequently used: the score counts the entry's accesses (each occurrence in a
    /// put, and in a get that finds it).
    Lfu,
    /// The caller's score, given with each key of a put (higher stays longer). Epoch-based
    /// policies are custom scores with the epoch in the high bits:
    ///
    /// ```
    /// // Epoch-LRU: the epoch (say, the hour) in the high 32 bits, a recency or a
    /// // frequency within the epoch in the low ones. Any entry of an older epoch leaves
    /// // before any entry of a newer one.
    /// fn epoch_score(epoch: u32, within: u32) -> u64 {
    ///     (u64::from(epoch) << 32) | u64::from(within)
    /// }
    /// assert!(epoch_score(7, 0) > epoch_score(6, u32::MAX));
    /// ```
    Custom,
}

/// Where a cache table reads the time, in milliseconds, for expiry. The default is the
/// system's clock; tests pass a [`ManualClock`] so that expiry is exact.
pub trait Clock: Send + Sync {
    /// Milliseconds since any fixed origin; never decreasing.
    fn now_ms(&self) -> u64;
}

/// The system's clock: milliseconds since the Unix epoch, never going back. The wall clock
/// can step backwards (an NTP correction); this one then stays where it was until the wall
/// clock catches up, so that an expired entry never comes back.
#[derive(Debug, Default)]
pub struct SystemClock {
    latest: AtomicU64,
}

impl SystemClock {
    /// A system clock.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.latest.fetch_max(wall, Ordering::SeqCst).max(wall)
    }
}

/// A clock that moves only when told to, for tests.
///
/// ```
/// use kv_core::{Clock, ManualClock};
/// let c = ManualClock::new(1_000);
/// c.advance(250);
/// assert_eq!(c.now_ms(), 1_250);
/// ```
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock that reads `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        Self(AtomicU64::new(start_ms))
    }
    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// What makes a table a cache table: its policy and its clock.
///
/// ```
/// use std::sync::Arc;
/// use kv_core::{CacheConfig, CachePolicy, ManualClock, TableConfig};
/// let clock = Arc::new(ManualClock::new(0));
/// let cfg = TableConfig::new(4096).cache(CacheConfig::new(CachePolicy::Lru).clock(clock));
/// cfg.validate().unwrap();
/// assert_eq!(cfg.initial_capacity(), 4096);
/// ```
#[derive(Clone)]
pub struct CacheConfig {
    /// The eviction policy.
    pub policy: CachePolicy,
    /// The clock that expiry reads.
    pub clock: Arc<dyn Clock>,
}

impl CacheConfig {
    /// A cache config with `policy` and the system clock.
    pub fn new(policy: CachePolicy) -> Self {
        Self {
            policy,
            clock: Arc::new(SystemClock::new()),
        }
    }
    /// Replaces the clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl PartialEq for CacheConfig {
    /// Equal when the policies are and the clock is the same one.
    fn eq(&self, other: &Self) -> bool {
        self.policy == other.policy && Arc::ptr_eq(&self.clock, &other.clock)
    }
}

/// The buckets of a cache table that holds at least `capacity` entries: `capacity` rounded
/// up to whole buckets, at least one.
///
/// ```
/// assert_eq!(kv_core::cache_buckets(1), 1);
/// assert_eq!(kv_core::cache_buckets(33), 2);
/// ```
pub fn cache_buckets(capacity: usize) -> usize {
    capacity.div_ceil(CACHE_BUCKET_SLOTS).max(1)
}

/// The most keys one batch of a cache table on a GPU backend may hold: the kernels index a
/// batch's items (and the CUDA put's batch-local table) with u32 words.
pub const CACHE_MAX_BATCH: usize = 1 << 30;

/// Refuses a batch of `n` keys that a GPU backend's cache table cannot index
/// ([`CACHE_MAX_BATCH`]); every GPU backend calls it before it touches the device.
///
/// ```
/// assert!(kv_core::check_cache_batch(1 << 20).is_ok());
/// assert!(kv_core::check_cache_batch(kv_core::CACHE_MAX_BATCH + 1).is_err());
/// ```
pub fn check_cache_batch(n: usize) -> Result<()> {
    if n > CACHE_MAX_BATCH {
        return Err(Error::InvalidArgument(format!(
            "a cache batch holds at most {CACHE_MAX_BATCH} keys; this one has {n}"
        )));
    }
    Ok(())
}

/// Items of the device scratch a GPU backend's cache table keeps for a batch of `n` items:
/// the next power of two, at least 256, so that scratch grows a few times and is then
/// reused (it is never shrunk).
///
/// ```
/// assert_eq!(kv_core::cache_scratch_items(1), 256);
/// assert_eq!(kv_core::cache_scratch_items(1000), 1024);
/// ```
pub fn cache_scratch_items(n: usize) -> usize {
    n.next_power_of_two().max(256)
}

/// Bytes a cache table spends on one slot of `width` words: the key, its row, its score,
/// its expiry time, a byte of the key's hash (the GPU tables compare these before keys)
/// and one byte of bookkeeping.
pub fn cache_slot_bytes(width: usize) -> usize {
    width.saturating_add(3).saturating_mul(8).saturating_add(2)
}

/// The entries of a cache table whose slots may take at most `budget_bytes`: whole
/// buckets, at least one.
///
/// ```
/// // Width 1: 34 bytes a slot, so a 1 MiB budget holds 30,816 entries (963 buckets).
/// assert_eq!(kv_core::cache_capacity_for_budget(1 << 20, 1), 30_816);
/// ```
pub fn cache_capacity_for_budget(budget_bytes: u64, width: usize) -> usize {
    let slots = budget_bytes / cache_slot_bytes(width) as u64;
    let buckets = (slots / CACHE_BUCKET_SLOTS as u64).max(1);
    usize::try_from(buckets)
        .unwrap_or(usize::MAX)
        .min(usize::MAX / CACHE_BUCKET_SLOTS)
        * CACHE_BUCKET_SLOTS
}

/// A put on a cache table: keys and value rows, and optionally a score and a time to live
/// per key.
#[derive(Debug, Clone, Copy)]
pub struct CachePut<'a> {
    /// The keys.
    pub keys: &'a [u64],
    /// `keys.len() * width` value words.
    pub values: &'a [u64],
    /// One score per key: required under [`CachePolicy::Custom`], refused under the others.
    pub scores: Option<&'a [u64]>,
    /// One time to live per key in milliseconds of the table's clock; `0` is no expiry.
    /// Without it, no key of the batch expires (a put replaces an entry's expiry).
    pub ttl_ms: Option<&'a [u64]>,
}

impl<'a> CachePut<'a> {
    /// A put of `keys` and `values` with no scores and no expiry.
    pub fn new(keys: &'a [u64], values: &'a [u64]) -> Self {
        Self {
            keys,
            values,
            scores: None,
            ttl_ms: None,
        }
    }
    /// Adds a score per key.
    pub fn scores(mut self, scores: &'a [u64]) -> Self {
        self.scores = Some(scores);
        self
    }
    /// Adds a time to live per key, in milliseconds.
    pub fn ttl_ms(mut self, ttl_ms: &'a [u64]) -> Self {
        self.ttl_ms = Some(ttl_ms);
        self
    }

    /// Checks the put against a table of `width` words and `policy`; every backend calls it
    /// before touching the table.
    ///
    /// ```
    /// use kv_core::{CachePolicy, CachePut, Error};
    /// let put = CachePut::new(&[1, 2], &[10, 20]);
    /// assert!(put.check(1, CachePolicy::Lru).is_ok());
    /// // A custom policy needs a score per key.
    /// assert!(matches!(put.check(1, CachePolicy::Custom), Err(Error::LengthMismatch { .. })));
    /// ```
    pub fn check(&self, width: usize, policy: CachePolicy) -> Result<()> {
        check_cache_put_len(
            width,
            policy,
            self.keys.len(),
            self.values.len(),
            self.scores.map(<[u64]>::len),
            self.ttl_ms.map(<[u64]>::len),
        )
    }
}

/// [`CachePut::check`] by lengths: `keys` keys, `values` value words, and the lengths of the
/// scores and times to live when given, for batches a backend knows only by their lengths
/// (device-resident ones, say).
///
/// ```
/// use kv_core::{CachePolicy, Error, check_cache_put_len};
/// assert!(check_cache_put_len(2, CachePolicy::Lru, 3, 6, None, Some(3)).is_ok());
/// assert!(matches!(
///     check_cache_put_len(2, CachePolicy::Custom, 3, 6, Some(2), None),
///     Err(Error::LengthMismatch { what: "scores", .. })
/// ));
/// ```
pub fn check_cache_put_len(
    width: usize,
    policy: CachePolicy,
    keys: usize,
    values: usize,
    scores: Option<usize>,
    ttl_ms: Option<usize>,
) -> Result<()> {
    crate::check_put_len(width, keys, values)?;
    let n = keys;
    match (policy, scores) {
        (CachePolicy::Custom, None) => {
            return Err(Error::LengthMismatch {
                what: "scores",
                expected: n,
                got: 0,
            });
        }
        (CachePolicy::Custom, Some(s)) if s != n => {
            return Err(Error::LengthMismatch {
                what: "scores",
                expected: n,
                got: s,
            });
        }
        (CachePolicy::Lru | CachePolicy::Lfu, Some(_)) => {
            return Err(Error::InvalidArgument(format!(
                "scores are the caller's only under CachePolicy::Custom; this table's policy is {policy:?}"
            )));
        }
        _ => {}
    }
    if let Some(t) = ttl_ms
        && t != n
    {
        return Err(Error::LengthMismatch {
            what: "ttl_ms",
            expected: n,
            got: t,
        });
    }
    Ok(())
}

/// Where [`KvBackend::put_and_evict`](crate::KvBackend::put_and_evict) writes what it
/// evicted: room for as many entries as the put has keys (a put evicts at most one entry
/// per key).
///
/// ```
/// let (mut k, mut v, mut s, mut e) = ([0u64; 4], [0u64; 8], [0u64; 4], [0u64; 4]);
/// let ev = kv_core::Evicted::new(&mut k, &mut v, &mut s).expires(&mut e);
/// assert!(ev.check(4, 2).is_ok());
/// assert!(ev.check(5, 2).is_err());
/// ```
#[derive(Debug)]
pub struct Evicted<'a> {
    /// The evicted keys.
    pub keys: &'a mut [u64],
    /// Their value rows, `width` words each.
    pub values: &'a mut [u64],
    /// Their scores when they left.
    pub scores: &'a mut [u64],
    /// When each would have expired, in the table clock's milliseconds (0: never), if
    /// asked for: what a tier below needs to keep the entry's time to live.
    pub expires_ms: Option<&'a mut [u64]>,
}

impl<'a> Evicted<'a> {
    /// Room for evicted keys, rows and scores.
    pub fn new(keys: &'a mut [u64], values: &'a mut [u64], scores: &'a mut [u64]) -> Self {
        Self {
            keys,
            values,
            scores,
            expires_ms: None,
        }
    }
    /// Asks for each evicted entry's expiry time too.
    pub fn expires(mut self, expires_ms: &'a mut [u64]) -> Self {
        self.expires_ms = Some(expires_ms);
        self
    }

    /// Checks that there is room for a put of `n` keys of `width` words.
    pub fn check(&self, n: usize, width: usize) -> Result<()> {
        check_evicted_len(
            n,
            width,
            self.keys.len(),
            self.values.len(),
            self.scores.len(),
            self.expires_ms.as_ref().map(|e| e.len()),
        )
    }
}

/// [`Evicted::check`] by lengths: room for a put of `n` keys of `width` words in outputs of
/// `keys` keys, `values` value words, `scores` scores and, when asked for, `expires`
/// expiry times (for outputs a backend knows only by their lengths).
///
/// ```
/// use kv_core::{Error, check_evicted_len};
/// assert!(check_evicted_len(4, 2, 4, 8, 4, None).is_ok());
/// assert!(matches!(
///     check_evicted_len(4, 2, 4, 8, 4, Some(3)),
///     Err(Error::LengthMismatch { what: "evicted expiry times", .. })
/// ));
/// ```
pub fn check_evicted_len(
    n: usize,
    width: usize,
    keys: usize,
    values: usize,
    scores: usize,
    expires: Option<usize>,
) -> Result<()> {
    for (what, got, expected) in [
        ("evicted keys", keys, n),
        ("evicted values", values, n * width),
        ("evicted scores", scores, n),
        ("evicted expiry times", expires.unwrap_or(n), n),
    ] {
        if got < expected {
            return Err(Error::LengthMismatch {
                what,
                expected,
                got,
            });
        }
    }
    Ok(())
}

/// A cache table's running counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries evicted by puts (displaced entries and turned-away new keys), since creation.
    pub evicted: u64,
    /// Expired entries whose slots puts have reused, since creation.
    pub expired_reused: u64,
    /// Gets that found their key, since creation.
    pub hits: u64,
    /// Gets that did not.
    pub misses: u64,
    /// The logical clock (batches of puts and gets so far).
    pub clock: u64,
}
