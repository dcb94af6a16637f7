//! Table configuration and the sizing rules every backend shares.
//!
//! The rules live here, not in the backends, so that `capacity()` and the
//! decision to grow or to refuse a batch are identical on every backend.

use crate::{CacheConfig, Error, Result, cache_buckets};

/// The widest value a table can hold, in u64 words (128 bytes).
pub const MAX_WIDTH: usize = 16;
/// The smallest slot count a table is created with.
pub const MIN_SLOTS: usize = 16;
/// The largest slot count a table may reach (slot indices fit in 32 bits on the GPU).
pub const MAX_SLOTS: usize = 1 << 32;
/// The highest max load factor accepted.
pub const MAX_LOAD_FACTOR: f64 = 0.95;

/// How a table is created.
///
/// ```
/// use kv_core::TableConfig;
/// let cfg = TableConfig::new(1_000_000).width(2).max_load_factor(0.8).growth(false);
/// cfg.validate().unwrap();
/// assert!(cfg.initial_capacity() >= 1_000_000);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TableConfig {
    /// How many entries the table must hold before its first growth.
    pub capacity: usize,
    /// Value width in u64 words, `1..=16` (8 to 128 bytes).
    pub width: usize,
    /// The highest fraction of slots that may hold entries, in `(0, 0.95]`.
    pub max_load_factor: f64,
    /// Whether a put that would pass the max load factor grows the table (`true`)
    /// or is refused with [`Error::CapacityExceeded`] (`false`).
    pub growth: bool,
    /// Which device to use, by the backend's own ordinal; `None` lets the backend choose
    /// (the GPU with the most free memory). An ordinal the backend does not have is
    /// [`Error::InvalidConfig`] on every backend (the CPU backend has one device, `0`).
    pub device: Option<usize>,
    /// The seed of the table's hash; `None` (the default) draws a random one per table.
    ///
    /// Every backend hashes a key as `fmix64(key ^ seed)` (MurmurHash3's 64-bit finaliser)
    /// and probes linearly from `hash & (slots - 1)`. That function is invertible, so whoever
    /// knows the seed can compute thousands of keys that share one home slot and make every
    /// probe walk one long chain. With a random seed, keys computed against one table (or
    /// against the unseeded function) scatter in another, which is why tables fed by
    /// strangers (a network server) must keep the default, as Rust's `HashMap` seeds itself
    /// for the same reason. Fix the seed for reproducible tests and benchmarks: the same
    /// seed gives the same slot for every key on every backend. Results never depend on the
    /// seed, only the placement of keys (and so the speed) does.
    pub seed: Option<u64>,
    /// Makes the table a cache table (`None`, the default: a table that grows or refuses).
    /// A cache table holds `capacity` entries rounded up to whole buckets, at a load of
    /// up to 1; it never grows and never refuses a put for room: it evicts
    /// ([`crate::CachePolicy`], docs/cache.md). `max_load_factor` and `growth` do not apply.
    pub cache: Option<CacheConfig>,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 16,
            width: 1,
            max_load_factor: 0.75,
            growth: true,
            device: None,
            seed: None,
            cache: None,
        }
    }
}

impl TableConfig {
    /// A config for `capacity` entries of one u64 word, max load 0.75, growth on.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }
    /// Sets the value width in u64 words.
    pub fn width(mut self, width: usize) -> Self {
        self.width = width;
        self
    }
    /// Sets the max load factor.
    pub fn max_load_factor(mut self, f: f64) -> Self {
        self.max_load_factor = f;
        self
    }
    /// Turns growth on or off.
    pub fn growth(mut self, on: bool) -> Self {
        self.growth = on;
        self
    }
    /// Picks a device by ordinal.
    pub fn device(mut self, ordinal: usize) -> Self {
        self.device = Some(ordinal);
        self
    }
    /// Fixes the hash seed (see [`seed`](Self#structfield.seed)), for reproducible tests.
    ///
    /// ```
    /// use kv_core::TableConfig;
    /// let cfg = TableConfig::new(100).seed(42);
    /// assert_eq!(cfg.table_seed(), 42);
    /// // Without one, every table draws its own.
    /// assert_ne!(TableConfig::new(100).table_seed(), TableConfig::new(100).table_seed());
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Makes the table a cache table (see [`cache`](Self#structfield.cache)).
    pub fn cache(mut self, cache: CacheConfig) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Makes the table a cache table whose slots take at most `budget_bytes`: its
    /// capacity is what the budget holds ([`crate::cache_capacity_for_budget`]).
    ///
    /// ```
    /// use kv_core::{CacheConfig, CachePolicy, TableConfig};
    /// let cfg = TableConfig::default().cache_budget(1 << 20, CacheConfig::new(CachePolicy::Lfu));
    /// assert_eq!(cfg.initial_capacity(), 30_816);
    /// ```
    pub fn cache_budget(mut self, budget_bytes: u64, cache: CacheConfig) -> Self {
        self.capacity = crate::cache_capacity_for_budget(budget_bytes, self.width);
        self.cache = Some(cache);
        self
    }

    /// The hash seed for a new table: the configured one, else a fresh random one (from the
    /// operating system's randomness, through `std`'s `RandomState`, so different for every
    /// call). Backends call it once when they open a table.
    pub fn table_seed(&self) -> u64 {
        use std::hash::BuildHasher;
        static DRAWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        self.seed.unwrap_or_else(|| {
            let n = DRAWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::hash::RandomState::new().hash_one(n)
        })
    }

    /// The device ordinal to open on, checked against the `count` devices `backend` has
    /// here: `None` (the backend chooses) or `Some(d)` with `d < count`; an ordinal past them
    /// is [`Error::InvalidConfig`], the one rule for every backend.
    ///
    /// ```
    /// use kv_core::{Error, TableConfig};
    /// assert_eq!(TableConfig::new(8).device(1).device_among(2, "cuda"), Ok(Some(1)));
    /// assert!(matches!(
    ///     TableConfig::new(8).device(1).device_among(1, "cpu"),
    ///     Err(Error::InvalidConfig(_))
    /// ));
    /// ```
    pub fn device_among(&self, count: usize, backend: &str) -> Result<Option<usize>> {
        match self.device {
            Some(d) if d >= count => Err(Error::InvalidConfig(format!(
                "{backend} device {d} does not exist; this machine has {count} (ordinals 0..{count})"
            ))),
            d => Ok(d),
        }
    }

    /// Checks the config; every backend calls this before allocating.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_WIDTH).contains(&self.width) {
            return Err(Error::InvalidConfig(format!(
                "width {} is outside 1..={MAX_WIDTH} u64 words",
                self.width
            )));
        }
        if !(self.max_load_factor > 0.0 && self.max_load_factor <= MAX_LOAD_FACTOR) {
            return Err(Error::InvalidConfig(format!(
                "max_load_factor {} is outside (0, {MAX_LOAD_FACTOR}]",
                self.max_load_factor
            )));
        }
        if self.cache.is_some() {
            if self.capacity == 0 {
                return Err(Error::InvalidConfig(
                    "a cache table needs a capacity of at least one entry".into(),
                ));
            }
            if self.capacity > MAX_SLOTS {
                return Err(Error::InvalidConfig(format!(
                    "cache capacity {} is more than {MAX_SLOTS} slots",
                    self.capacity
                )));
            }
            return Ok(());
        }
        if slots_for(self.capacity, self.max_load_factor).is_none() {
            return Err(Error::InvalidConfig(format!(
                "capacity {} needs more than {MAX_SLOTS} slots",
                self.capacity
            )));
        }
        Ok(())
    }

    /// The slot count a table with this config starts with (a cache table's: whole
    /// buckets of [`crate::CACHE_BUCKET_SLOTS`]).
    pub fn initial_slots(&self) -> usize {
        if self.cache.is_some() {
            return cache_buckets(self.capacity) * crate::CACHE_BUCKET_SLOTS;
        }
        slots_for(self.capacity, self.max_load_factor).unwrap_or(MAX_SLOTS)
    }

    /// The capacity a table with this config starts with (at least `capacity`; a cache
    /// table's is its slot count).
    pub fn initial_capacity(&self) -> usize {
        if self.cache.is_some() {
            return self.initial_slots();
        }
        capacity_of(self.initial_slots(), self.max_load_factor)
    }
}

/// The number of entries `slots` slots hold at `max_load_factor`.
pub fn capacity_of(slots: usize, max_load_factor: f64) -> usize {
    ((slots as f64) * max_load_factor).floor() as usize
}

/// The smallest power-of-two slot count (at least [`MIN_SLOTS`]) that holds `entries`
/// at `max_load_factor`, or `None` past [`MAX_SLOTS`].
pub fn slots_for(entries: usize, max_load_factor: f64) -> Option<usize> {
    let mut slots = ((entries as f64) / max_load_factor).ceil() as usize;
    slots = slots.max(MIN_SLOTS).checked_next_power_of_two()?;
    // Rounding of the float division can leave us one entry short.
    while capacity_of(slots, max_load_factor) < entries {
        slots = slots.checked_mul(2)?;
    }
    (slots <= MAX_SLOTS).then_some(slots)
}

/// What a put of `batch` keys must do first, decided before anything changes.
///
/// The rule, shared by all backends: a put is admitted when `len + batch <= capacity`,
/// counting every key of the batch as new (so that the decision can be made before
/// the batch runs and a refused batch changes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutPlan {
    /// The batch fits as the table is.
    Fits,
    /// Grow to this many slots first.
    Grow {
        /// The new slot count.
        slots: usize,
    },
}

/// Decides whether a put of `batch` keys fits a table of `slots` slots holding `len` entries.
///
/// ```
/// use kv_core::{plan_put, PutPlan, Error};
/// assert_eq!(plan_put(0, 10, 16, 0.75, true), Ok(PutPlan::Fits));
/// assert_eq!(plan_put(10, 10, 16, 0.75, true), Ok(PutPlan::Grow { slots: 32 }));
/// assert!(matches!(plan_put(10, 10, 16, 0.75, false), Err(Error::CapacityExceeded { .. })));
/// ```
pub fn plan_put(
    len: usize,
    batch: usize,
    slots: usize,
    max_load_factor: f64,
    growth: bool,
) -> Result<PutPlan> {
    let capacity = capacity_of(slots, max_load_factor);
    let requested = len.saturating_add(batch);
    if requested <= capacity {
        return Ok(PutPlan::Fits);
    }
    let refuse = Error::CapacityExceeded {
        requested,
        capacity,
    };
    if !growth {
        return Err(refuse);
    }
    match slots_for(requested, max_load_factor) {
        Some(needed) => Ok(PutPlan::Grow {
            slots: needed.max(slots.saturating_mul(2).min(MAX_SLOTS)),
        }),
        None => Err(refuse),
    }
}
