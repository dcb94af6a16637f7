//! Device memory for a byte table's arena segments ([`Slabs`]): segments are carved out of
//! a few large allocations instead of one allocation each.
//!
//! A device allocation costs tens to hundreds of microseconds (and a zeroing pass), so a
//! batch that opens thousands of 1 MiB segments spent most of its time allocating. Here
//! segment `id` lives at a fixed place: slab `k` holds `min(2^k, per_slab)` segments, so
//! the first slabs grow geometrically (a small table holds little memory) and the rest
//! hold [`SLAB_BYTES`] each. A slab is allocated when the first of its segments is given
//! memory and freed when the last of them is given back, so the memory held stays within
//! one slab of what the arena's segments hold at the end of a batch. When the device
//! cannot give a whole slab, the segment gets an allocation of its own, so that a table
//! near its device's memory can still use every segment's worth of it.

use kv_core::Result;

use crate::bytes::Dev;

/// The size of a full slab (or one segment, if that is larger).
pub(crate) const SLAB_BYTES: usize = 256 << 20;

/// The slabs of one table, generic over its device's buffers.
pub(crate) struct Slabs<B> {
    /// Bytes per segment (a power of two).
    seg: usize,
    /// Segments per full slab (a power of two).
    per_slab: usize,
    /// Each slab's memory (`None`: none of its segments has memory).
    slabs: Vec<Option<B>>,
    /// Each slab's segments that have memory.
    live: Vec<usize>,
    /// Whether each segment id has memory.
    has: Vec<bool>,
    /// Segments with an allocation of their own (their slab could not be allocated).
    own: Vec<Option<B>>,
}

impl<B> Slabs<B> {
    /// No memory yet, for segments of `seg` bytes (a power of two).
    pub(crate) fn new(seg: usize) -> Self {
        Slabs {
            seg,
            per_slab: (SLAB_BYTES / seg).max(1).next_power_of_two(),
            slabs: Vec::new(),
            live: Vec::new(),
            has: Vec::new(),
            own: Vec::new(),
        }
    }

    /// Segment `id`'s slab, its index in that slab, and the slab's segment count.
    fn locate(&self, id: u32) -> (usize, usize, usize) {
        let g = id as usize + 1;
        let full = self.per_slab;
        if g < full {
            let k = g.ilog2() as usize;
            (k, g - (1 << k), 1 << k)
        } else {
            let k0 = full.ilog2() as usize;
            (k0 + (g - full) / full, (g - full) % full, full)
        }
    }

    /// Whether segment `id` has memory.
    pub(crate) fn has(&self, id: u32) -> bool {
        self.has.get(id as usize).copied().unwrap_or(false)
    }

    /// Segment `id`'s buffer and its byte offset there, when it has memory.
    pub(crate) fn place(&self, id: u32) -> Option<(&B, usize)> {
        if !self.has(id) {
            return None;
        }
        if let Some(Some(b)) = self.own.get(id as usize) {
            return Some((b, 0));
        }
        let (k, i, _) = self.locate(id);
        self.slabs[k].as_ref().map(|b| (b, i * self.seg))
    }

    /// Segment `id`'s device address, when it has memory.
    pub(crate) fn addr<D: Dev<Buf = B>>(&self, id: u32) -> Option<u64> {
        self.place(id).map(|(b, at)| D::addr(b) + at as u64)
    }

    /// Gives segment `id` memory, allocating its slab if it has none; `false` when it had
    /// memory already.
    pub(crate) fn provide<D: Dev<Buf = B>>(&mut self, dev: &D, id: u32) -> Result<bool> {
        if self.has(id) {
            return Ok(false);
        }
        let (k, _, count) = self.locate(id);
        if self.slabs.len() <= k {
            self.slabs.resize_with(k + 1, || None);
            self.live.resize(k + 1, 0);
        }
        if self.has.len() <= id as usize {
            self.has.resize(id as usize + 1, false);
        }
        if self.slabs[k].is_none() {
            match dev.alloc(count * self.seg) {
                Ok(b) => self.slabs[k] = Some(b),
                Err(kv_core::Error::OutOfDeviceMemory { .. }) if count > 1 => {
                    let b = dev.alloc(self.seg)?;
                    if self.own.len() <= id as usize {
                        self.own.resize_with(id as usize + 1, || None);
                    }
                    self.own[id as usize] = Some(b);
                    self.has[id as usize] = true;
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
        self.has[id as usize] = true;
        self.live[k] += 1;
        Ok(true)
    }

    /// Takes segment `id`'s memory back, freeing its slab when no segment there has any.
    pub(crate) fn release(&mut self, id: u32) {
        if !self.has(id) {
            return;
        }
        self.has[id as usize] = false;
        if let Some(own) = self.own.get_mut(id as usize)
            && own.take().is_some()
        {
            return;
        }
        let (k, _, _) = self.locate(id);
        self.live[k] -= 1;
        if self.live[k] == 0 {
            self.slabs[k] = None;
        }
    }

    /// Frees every slab.
    pub(crate) fn clear(&mut self) {
        self.slabs.clear();
        self.live.clear();
        self.has.clear();
        self.own.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id maps to a distinct place, slabs grow 1, 2, 4, ... up to `per_slab`.
    #[test]
    fn locate_tiles_the_ids() {
        let s: Slabs<()> = Slabs::new(SLAB_BYTES / 8);
        assert_eq!(s.per_slab, 8);
        let places: Vec<_> = (0..40u32).map(|id| s.locate(id)).collect();
        assert_eq!(places[0], (0, 0, 1));
        assert_eq!(places[1], (1, 0, 2));
        assert_eq!(places[2], (1, 1, 2));
        assert_eq!(places[3], (2, 0, 4));
        assert_eq!(places[7], (3, 0, 8));
        assert_eq!(places[14], (3, 7, 8));
        assert_eq!(places[15], (4, 0, 8));
        assert_eq!(places[23], (5, 0, 8));
        let mut seen = std::collections::HashSet::new();
        for &(k, i, count) in &places {
            assert!(i < count);
            assert!(seen.insert((k, i)), "two ids at slab {k} index {i}");
        }
    }

    #[test]
    fn segments_larger_than_a_slab_get_one_each() {
        let s: Slabs<()> = Slabs::new(SLAB_BYTES * 2);
        assert_eq!(s.per_slab, 1);
        assert_eq!(s.locate(0), (0, 0, 1));
        assert_eq!(s.locate(5), (5, 0, 1));
    }
}
