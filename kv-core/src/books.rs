//! [`Books`]: the host's bookkeeping of an open-addressing table, once for every backend.
//!
//! A backend's table (its key and value arrays, on whatever device) implements
//! [`Housekeeping`]: it can rehash into a given number of slots and count the new keys of
//! the batch at hand. [`prepare_put`] then decides, with the sizing rules of
//! [`plan_put`](crate::plan_put), whether a put is admitted as the table is, after a purge of
//! tombstones, after growth, or refused; and the backend hands the counts its device
//! reported after a put or a delete to [`Books::apply_put`] / [`Books::apply_delete`]. So the
//! rules that decide `len()`, growth and purges are written once, as cuCollections keeps one
//! open-addressing implementation under its map, set and multimap.

use crate::{Audit, Error, PutPlan, Result, TableConfig, capacity_of, plan_put};

/// The host's books of one table: its slot count, its entries (live keys), the tombstones in
/// its key array, and the special keys (user keys equal to a backend's sentinels, kept
/// outside the key array).
///
/// ```
/// use kv_core::{Applied, Books, TableConfig};
///
/// let mut books = Books::new(&TableConfig::new(100).seed(1));
/// assert_eq!((books.len(), books.slots(), books.capacity()), (0, 256, 192));
/// // A put that placed 3 keys (2 in EMPTY slots, 1 on a tombstone) and one special key.
/// books.apply_put(Applied { inserted: 3, from_empty: 2, special: 1, lost: 0 }, "doc")?;
/// assert_eq!(books.len(), 4);
/// // A delete that turned 2 keys into tombstones and removed the special key.
/// assert_eq!(books.apply_delete(2, 1), 3);
/// assert_eq!((books.len(), books.tombstones(), books.table_len()), (1, 2, 1));
/// # Ok::<(), kv_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Books {
    slots: usize,
    len: usize,
    special: usize,
    tombs: usize,
    max_load_factor: f64,
    growth: bool,
    /// Deleted slots are purged by the table itself, not by [`prepare_put`]'s rehash.
    purges_itself: bool,
}

/// What a put applied, as the device counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Keys newly placed in the key array (in an EMPTY slot or on a tombstone).
    pub inserted: u64,
    /// Of those, the ones that took an EMPTY slot.
    pub from_empty: u64,
    /// Special keys that became present.
    pub special: u64,
    /// Keys that found no slot: a broken invariant, reported as [`Error::Device`].
    pub lost: u64,
}

/// What a backend's table offers [`prepare_put`]: its books, a rehash, and a count of the
/// new keys of the put being prepared.
pub trait Housekeeping {
    /// The table's books.
    fn books(&mut self) -> &mut Books;

    /// Moves every live entry into fresh arrays of `slots` slots (the same count: a purge of
    /// tombstones), leaving the table exactly as it was on error. [`prepare_put`] updates
    /// the books after a rehash that succeeded.
    fn rehash(&mut self, slots: usize) -> Result<()>;

    /// How many keys of the batch being prepared are not in the table, each occurrence
    /// counted: an upper bound of its new keys, cheap to compute where the batch is (one
    /// lookup pass on the device that only adds to a counter). Called only when the batch
    /// does not fit with every key counted as new.
    fn count_missing(&mut self) -> Result<usize>;

    /// How many distinct keys of the batch being prepared are not in the table. Called only
    /// when the batch does not fit with [`count_missing`](Self::count_missing)'s bound
    /// either; [`count_distinct`] does the counting part for keys in host memory.
    fn count_new(&mut self) -> Result<usize>;
}

impl Books {
    /// The books of a new, empty table made with `cfg`.
    pub fn new(cfg: &TableConfig) -> Books {
        Books {
            slots: cfg.initial_slots(),
            len: 0,
            special: 0,
            tombs: 0,
            max_load_factor: cfg.max_load_factor,
            growth: cfg.growth,
            purges_itself: false,
        }
    }

    /// The books of a new table whose deleted slots the table reuses and purges itself
    /// (the CPU backend's partitions do): a delete leaves no tombstone in these books, so
    /// [`prepare_put`] never purges, and only admits and grows.
    pub fn purging_itself(cfg: &TableConfig) -> Books {
        Books {
            purges_itself: true,
            ..Books::new(cfg)
        }
    }

    /// Entries, special keys included: what `len()` answers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots in the key array.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Entries the table holds before it must grow.
    pub fn capacity(&self) -> usize {
        capacity_of(self.slots, self.max_load_factor)
    }

    /// Tombstones in the key array.
    pub fn tombstones(&self) -> usize {
        self.tombs
    }

    /// Keys in the key array: entries less the special keys.
    pub fn table_len(&self) -> usize {
        self.len - self.special
    }

    /// Key-array slots that are not EMPTY: live keys and tombstones.
    pub fn used(&self) -> usize {
        self.table_len() + self.tombs
    }

    /// Takes the counts of a put. A put that lost keys (`lost != 0`) is still counted (what
    /// it applied is in the table, item g) and answered with [`Error::Device`].
    pub fn apply_put(&mut self, a: Applied, backend: &'static str) -> Result<()> {
        let inserted = a.inserted as usize;
        let reused = inserted - (a.from_empty as usize).min(inserted);
        self.len += inserted + a.special as usize;
        self.special += a.special as usize;
        self.tombs -= reused.min(self.tombs);
        if a.lost != 0 {
            return Err(Error::device(
                backend,
                format!("{} keys found no slot (table invariant broken)", a.lost),
            ));
        }
        Ok(())
    }

    /// Takes the counts of a delete: `removed` keys turned into tombstones, `special`
    /// special keys removed. Returns the entries removed.
    pub fn apply_delete(&mut self, removed: u64, special: u64) -> usize {
        let (removed, special) = (removed as usize, special as usize);
        let table = removed.min(self.table_len());
        let special = special.min(self.special);
        self.len -= table + special;
        self.special -= special;
        if !self.purges_itself {
            self.tombs += table;
        }
        table + special
    }

    /// The table was emptied.
    pub fn cleared(&mut self) {
        self.len = 0;
        self.special = 0;
        self.tombs = 0;
    }

    /// The table was rehashed into `slots` slots: no tombstone is left.
    pub fn rehashed(&mut self, slots: usize) {
        self.slots = slots;
        self.tombs = 0;
    }

    /// The device's count of live keys and tombstones next to these books.
    pub fn audit(&self, device_live: u64, device_tombstones: u64) -> Audit {
        Audit {
            device_live,
            device_tombstones,
            host_live: self.table_len(),
            host_tombstones: self.tombs,
        }
    }

    /// What a put of `new` new keys needs first (see [`prepare_put`]).
    fn plan(&self, new: usize) -> Result<Step> {
        match plan_put(self.len, new, self.slots, self.max_load_factor, self.growth)? {
            PutPlan::Grow { slots } => Ok(Step::Rehash {
                slots,
                purge: false,
            }),
            PutPlan::Fits if self.used() + new <= self.capacity() => Ok(Step::Nothing),
            PutPlan::Fits => Ok(Step::Rehash {
                slots: self.slots,
                purge: true,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Nothing,
    Rehash { slots: usize, purge: bool },
}

/// Readies `table` for a put of `batch` keys, as every backend does it:
///
/// 1. **Admission.** With every key of the batch counted as new, a put is admitted when
///    `len + batch <= capacity`. When it is not, the table counts the keys of the batch it
///    does not hold, every occurrence ([`Housekeeping::count_missing`], one lookup pass that
///    adds to a counter); when even those do not fit, it counts the distinct ones
///    ([`Housekeeping::count_new`]: a lookup, then a count of the distinct keys it did not
///    find). Admission, growth and refusal are decided on that exact number: a batch of
///    overwrites is never refused and never grows a table.
/// 2. **Growth.** A batch that does not fit grows the table as [`plan_put`](crate::plan_put)
///    decides, or is refused with [`Error::CapacityExceeded`] when growth is off.
/// 3. **Purge.** When the slots in use (live keys and tombstones) and the new keys would
///    pass the capacity, the tombstones are purged by a rehash at the same size; a purge
///    that finds no memory is skipped while every probe still ends on an EMPTY slot
///    (`used + new < slots`).
///
/// Nothing changes when it fails: a refused batch and a rehash that fails leave the table
/// as it was.
///
/// ```
/// use kv_core::{Books, Housekeeping, Result, TableConfig, prepare_put};
///
/// struct Table { books: Books, new_keys: usize, rehashes: Vec<usize> }
/// impl Housekeeping for Table {
///     fn books(&mut self) -> &mut Books { &mut self.books }
///     fn rehash(&mut self, slots: usize) -> Result<()> { self.rehashes.push(slots); Ok(()) }
///     // Say every missing key occurs twice in the batch.
///     fn count_missing(&mut self) -> Result<usize> { Ok(2 * self.new_keys) }
///     fn count_new(&mut self) -> Result<usize> { Ok(self.new_keys) }
/// }
/// let cfg = TableConfig::new(12).max_load_factor(0.75).growth(false);
/// let mut t = Table { books: Books::new(&cfg), new_keys: 0, rehashes: vec![] };
/// assert_eq!(t.books.capacity(), 12);
/// // 10 keys fit an empty table: nothing to count, nothing to rehash.
/// prepare_put(&mut t, 10)?;
/// # t.books.apply_put(kv_core::Applied { inserted: 10, from_empty: 10, ..Default::default() }, "doc")?;
/// // 10 more do not fit if all are new; they are overwrites (0 new keys), so they fit.
/// prepare_put(&mut t, 10)?;
/// // 3 new keys would pass the capacity: refused, with growth off.
/// t.new_keys = 3;
/// assert!(prepare_put(&mut t, 10).is_err());
/// assert!(t.rehashes.is_empty());
/// # Ok::<(), kv_core::Error>(())
/// ```
pub fn prepare_put(table: &mut impl Housekeeping, batch: usize) -> Result<()> {
    let (new, step) = match table.books().plan(batch) {
        Ok(Step::Nothing) => return Ok(()),
        // Every key counted as new does not fit: count the keys the table does not hold.
        _ => {
            let missing = table.count_missing()?.min(batch);
            match table.books().plan(missing) {
                Ok(Step::Nothing) => return Ok(()),
                // A purge leaves the capacity as it is, so the bound decides it as well.
                Ok(step @ Step::Rehash { purge: true, .. }) => (missing, step),
                // Growth and refusal change what the caller sees: decide them exactly.
                _ => {
                    let new = table.count_new()?.min(missing);
                    (new, table.books().plan(new)?)
                }
            }
        }
    };
    let Step::Rehash { slots, purge } = step else {
        return Ok(());
    };
    match table.rehash(slots) {
        Ok(()) => {
            table.books().rehashed(slots);
            Ok(())
        }
        // No memory for a purge: go on if the probes still end on an EMPTY slot.
        Err(Error::OutOfDeviceMemory { .. }) if purge && table.books().used() + new < slots => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// How many distinct keys among those of `keys` whose `found` flag is false: the new keys of
/// a batch, from a lookup of it. Sorts the missing keys (on all cores), so it costs a copy
/// and a sort of them; [`prepare_put`] asks for it only when a batch does not fit with every
/// key counted as new.
///
/// ```
/// assert_eq!(kv_core::count_distinct(&[5, 6, 5, 7, 6], &[false, false, false, true, false]), 2);
/// ```
pub fn count_distinct(keys: &[u64], found: &[bool]) -> usize {
    use rayon::prelude::*;
    let mut missing: Vec<u64> = keys
        .par_iter()
        .zip(found)
        .filter(|(_, f)| !**f)
        .map(|(k, _)| *k)
        .collect();
    missing.par_sort_unstable();
    let repeats = missing.par_windows(2).filter(|w| w[0] == w[1]).count();
    missing.len() - repeats
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        books: Books,
        new: usize,
        /// Occurrences per new key in the batch.
        repeats: usize,
        counted: usize,
        bounded: usize,
        rehashes: Vec<usize>,
        oom: bool,
    }

    impl Housekeeping for Fake {
        fn books(&mut self) -> &mut Books {
            &mut self.books
        }
        fn rehash(&mut self, slots: usize) -> Result<()> {
            if self.oom {
                return Err(Error::OutOfDeviceMemory {
                    backend: "test",
                    requested_bytes: 1,
                });
            }
            self.rehashes.push(slots);
            Ok(())
        }
        fn count_missing(&mut self) -> Result<usize> {
            self.bounded += 1;
            Ok(self.new * self.repeats)
        }
        fn count_new(&mut self) -> Result<usize> {
            self.counted += 1;
            Ok(self.new)
        }
    }

    fn fake(cfg: TableConfig) -> Fake {
        Fake {
            books: Books::new(&cfg),
            new: 0,
            repeats: 1,
            counted: 0,
            bounded: 0,
            rehashes: vec![],
            oom: false,
        }
    }

    fn fill(t: &mut Fake, n: u64) {
        t.books
            .apply_put(
                Applied {
                    inserted: n,
                    from_empty: n,
                    ..Default::default()
                },
                "test",
            )
            .expect("ok");
    }

    #[test]
    fn overwrites_never_grow_or_get_refused() {
        for growth in [false, true] {
            let mut t = fake(TableConfig::new(12).max_load_factor(0.75).growth(growth));
            fill(&mut t, 12);
            // A batch of 12 overwrites on a full table: the bound alone admits it.
            prepare_put(&mut t, 12).expect("ok");
            assert_eq!((t.bounded, t.counted, t.books.slots()), (1, 0, 16));
            assert!(t.rehashes.is_empty());
        }
    }

    #[test]
    fn a_batch_that_fits_as_new_keys_is_not_counted() {
        let mut t = fake(TableConfig::new(12).max_load_factor(0.75));
        prepare_put(&mut t, 12).expect("ok");
        assert_eq!((t.bounded, t.counted), (0, 0));
    }

    #[test]
    fn growth_and_refusal_use_the_exact_count() {
        let mut t = fake(TableConfig::new(12).max_load_factor(0.75).growth(false));
        fill(&mut t, 10);
        t.new = 3;
        let e = prepare_put(&mut t, 100).expect_err("refused");
        assert_eq!(
            e,
            Error::CapacityExceeded {
                requested: 13,
                capacity: 12
            }
        );
        let mut t = fake(TableConfig::new(12).max_load_factor(0.75));
        fill(&mut t, 10);
        t.new = 3;
        prepare_put(&mut t, 100).expect("ok");
        assert_eq!((t.rehashes.clone(), t.books.slots()), (vec![32], 32));
    }

    #[test]
    fn repeated_new_keys_are_counted_exactly_before_growth() {
        // 10 of 12, then 2 new keys 5 times each: the bound (10) does not fit, the exact
        // count (2) does.
        let mut t = fake(TableConfig::new(12).max_load_factor(0.75).growth(false));
        fill(&mut t, 10);
        (t.new, t.repeats) = (2, 5);
        prepare_put(&mut t, 10).expect("fits exactly");
        assert_eq!((t.bounded, t.counted), (1, 1));
        assert!(t.rehashes.is_empty());
    }

    #[test]
    fn purges_count_new_keys_and_skip_without_memory() {
        let mut t = fake(TableConfig::new(12).max_load_factor(0.75));
        fill(&mut t, 10);
        assert_eq!(t.books.apply_delete(8, 0), 8);
        // 2 live + 8 tombstones + 4 new keys pass 12: purge at the same size.
        t.new = 4;
        prepare_put(&mut t, 4).expect("ok");
        assert_eq!(t.rehashes, [16]);
        assert_eq!(t.books.tombstones(), 0);
        // The same without memory: skipped, as 10 + 4 < 16 leaves an EMPTY slot.
        let mut t = fake(TableConfig::new(12).max_load_factor(0.75));
        fill(&mut t, 10);
        t.books.apply_delete(8, 0);
        t.oom = true;
        prepare_put(&mut t, 4).expect("ok");
        assert_eq!(t.books.tombstones(), 8);
        // ... but not when the new keys could fill the last EMPTY slot.
        t.new = 6;
        assert!(matches!(
            prepare_put(&mut t, 6),
            Err(Error::OutOfDeviceMemory { .. })
        ));
    }

    #[test]
    fn a_table_that_purges_itself_keeps_no_tombstones() {
        let mut b = Books::purging_itself(&TableConfig::new(12));
        b.apply_put(
            Applied {
                inserted: 5,
                from_empty: 5,
                ..Default::default()
            },
            "x",
        )
        .expect("ok");
        assert_eq!(b.apply_delete(3, 0), 3);
        assert_eq!((b.len(), b.tombstones(), b.used()), (2, 0, 2));
    }

    #[test]
    fn deletes_never_go_below_zero() {
        let mut b = Books::new(&TableConfig::new(12));
        assert_eq!(b.apply_delete(5, 2), 0);
        assert_eq!((b.len(), b.tombstones()), (0, 0));
    }

    #[test]
    fn lost_keys_are_counted_and_reported() {
        let mut b = Books::new(&TableConfig::new(12));
        let a = Applied {
            inserted: 2,
            from_empty: 2,
            special: 0,
            lost: 1,
        };
        assert!(matches!(b.apply_put(a, "x"), Err(Error::Device { .. })));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn count_distinct_counts_each_missing_key_once() {
        assert_eq!(count_distinct(&[], &[]), 0);
        let keys: Vec<u64> = (0..10_000).map(|i| i % 300).collect();
        let found: Vec<bool> = keys.iter().map(|k| k % 3 == 0).collect();
        assert_eq!(count_distinct(&keys, &found), 200);
    }
}
