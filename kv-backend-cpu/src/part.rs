//! One partition: an SoA open-addressing table with linear probing and control bytes.

/// Control byte of a slot that never held an entry: probing stops here.
pub(crate) const EMPTY: u8 = 0x80;
/// Control byte of a slot whose entry was deleted: probing goes on past it.
pub(crate) const DELETED: u8 = 0xFE;

/// The 7-bit tag kept in the control byte of a full slot; it filters out most key reads.
#[inline]
pub(crate) fn tag(h: u64) -> u8 {
    ((h >> 32) & 0x7F) as u8
}

/// The table's seeded hash, as every backend computes it ([`kv_kernels::layout::hash`]).
#[inline]
pub(crate) fn hash(key: u64, seed: u64) -> u64 {
    kv_kernels::layout::hash(key, seed)
}

#[inline]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks the kernel to back `v`'s reserved capacity with transparent huge pages, where it
/// can (Linux's `madvise(MADV_HUGEPAGE)`; a no-op elsewhere, or where the advice is refused).
/// A table's random probes then miss the TLB far less: one 2 MiB entry covers what 512
/// small pages did. Called before the pages are first touched, so that they are faulted in
/// huge.
pub(crate) fn advise_huge_pages<T>(v: &Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let end = start + v.capacity() * std::mem::size_of::<T>();
        let (lo, hi) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if hi > lo {
            // SAFETY: the range lies inside `v`'s own allocation (rounded inwards to whole
            // huge pages); MADV_HUGEPAGE only changes how the kernel backs it, never its
            // contents, and a failure leaves it as it was.
            let _ = unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// A zeroed vector whose pages are touched now, when the table is sized, rather than on
/// the first put into each page (`vec![0; n]` maps zero pages lazily).
fn committed(n: usize) -> Vec<u64> {
    let mut v = Vec::with_capacity(n);
    advise_huge_pages(&v);
    v.resize(n, 0);
    v
}

pub(crate) struct Part {
    pub(crate) ctrl: Vec<u8>,
    pub(crate) keys: Vec<u64>,
    pub(crate) values: Vec<u64>,
    pub(crate) width: usize,
    pub(crate) live: usize,
    /// Live plus deleted slots: what probing has to walk past.
    pub(crate) used: usize,
    pub(crate) max_used: usize,
    /// The table's hash seed.
    pub(crate) seed: u64,
}

impl Part {
    pub(crate) fn new(slots: usize, width: usize, max_load: f64, seed: u64) -> Self {
        Self {
            ctrl: vec![EMPTY; slots],
            keys: committed(slots),
            values: committed(slots * width),
            width,
            live: 0,
            used: 0,
            max_used: kv_core::capacity_of(slots, max_load).min(slots - 1),
            seed,
        }
    }

    #[inline]
    pub(crate) fn mask(&self) -> usize {
        self.ctrl.len() - 1
    }

    pub(crate) fn bytes(&self) -> u64 {
        (self.ctrl.len() + self.keys.len() * 8 + self.values.len() * 8) as u64
    }

    pub(crate) fn clear(&mut self) {
        self.ctrl.fill(EMPTY);
        self.live = 0;
        self.used = 0;
    }

    /// Hints the home slot of hash `h` into cache.
    #[inline]
    pub(crate) fn prefetch_home(&self, h: u64) {
        let i = h as usize & self.mask();
        prefetch(self.ctrl.as_ptr().wrapping_add(i));
        prefetch(self.keys.as_ptr().wrapping_add(i));
    }

    /// The slot holding `key`, if any.
    #[inline]
    pub(crate) fn find(&self, h: u64, key: u64) -> Option<usize> {
        let t = tag(h);
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            // SAFETY: i is masked to the table size, and ctrl and keys have that many elements.
            let c = unsafe { *self.ctrl.get_unchecked(i) };
            if c == EMPTY {
                return None;
            }
            // SAFETY: as above.
            if c == t && unsafe { *self.keys.get_unchecked(i) } == key {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Inserts or overwrites; true when the key is new. The caller makes sure that
    /// `used < slots` holds afterwards (see [`Part::reserve`]).
    #[inline]
    pub(crate) fn upsert(&mut self, h: u64, key: u64, row: &[u64]) -> bool {
        let t = tag(h);
        let mask = self.mask();
        let mut i = h as usize & mask;
        let mut first_deleted = None;
        let at = loop {
            let c = self.ctrl[i];
            if c == EMPTY {
                break match first_deleted {
                    Some(d) => d,
                    None => {
                        self.used += 1;
                        i
                    }
                };
            }
            if c == DELETED {
                first_deleted.get_or_insert(i);
            } else if c == t && self.keys[i] == key {
                self.set_row(i, row);
                return false;
            }
            i = (i + 1) & mask;
        };
        self.ctrl[at] = t;
        self.keys[at] = key;
        self.set_row(at, row);
        self.live += 1;
        true
    }

    /// Removes `key`; true when it was there.
    #[inline]
    pub(crate) fn remove(&mut self, h: u64, key: u64) -> bool {
        match self.find(h, key) {
            Some(i) => {
                self.ctrl[i] = DELETED;
                self.live -= 1;
                true
            }
            None => false,
        }
    }

    #[inline]
    pub(crate) fn row(&self, i: usize) -> &[u64] {
        &self.values[i * self.width..(i + 1) * self.width]
    }

    #[inline]
    fn row_mut(&mut self, i: usize) -> &mut [u64] {
        &mut self.values[i * self.width..(i + 1) * self.width]
    }

    /// Writes a value row; one-word rows skip the general copy.
    #[inline]
    fn set_row(&mut self, i: usize, row: &[u64]) {
        if self.width == 1 {
            self.values[i] = row[0];
        } else {
            self.row_mut(i).copy_from_slice(row);
        }
    }

    /// Makes room for `incoming` more entries: rehashes away tombstones, or doubles
    /// when live entries alone would pass the partition's load limit.
    pub(crate) fn reserve(&mut self, incoming: usize, max_load: f64) {
        if self.used + incoming <= self.max_used {
            return;
        }
        let mut slots = self.ctrl.len();
        while kv_core::capacity_of(slots, max_load).min(slots - 1) < self.live + incoming {
            slots *= 2;
        }
        let mut fresh = Part::new(slots, self.width, max_load, self.seed);
        self.drain_into(&mut fresh);
        *self = fresh;
    }

    /// Moves every live entry into `dst`.
    pub(crate) fn drain_into(&self, dst: &mut Part) {
        for i in 0..self.ctrl.len() {
            if self.ctrl[i] & 0x80 == 0 {
                dst.upsert(hash(self.keys[i], self.seed), self.keys[i], self.row(i));
            }
        }
    }

    /// Every live (key, row) pair, for rebuilding into a larger table.
    pub(crate) fn live_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.ctrl.len()).filter(|&i| self.ctrl[i] & 0x80 == 0)
    }
}
