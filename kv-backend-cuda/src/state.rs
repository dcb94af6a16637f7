//! The table's device state: its key and value arrays, the special area and the counters
//! in VRAM, with the host's [`Books`] of them; and the table-wide work on them (clear,
//! rehash, count, the copy an export takes).

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};
use kv_core::{Books, Error, Result, TableConfig, TableImage};
use kv_kernels::layout::{
    RehashArgs, TableArgs, bucket_shift, counter, is_sentinel, special_row, special_words,
};
use kv_staging::counts;

use crate::gpu::{BACKEND, Device, Drv, Gpu, device_error};
use crate::memory::{DevBuf, Pinned, event, stream};

/// The table's device state (behind the backend's RwLock).
pub(crate) struct State {
    /// The slot array: buckets of keys, then their value rows (`kv_kernels::layout`).
    pub slots: DevBuf,
    pub special: DevBuf,
    pub counters: DevBuf,
    h_counters: Pinned<u64>,
    /// Stream for table-wide work (clear, rehash, counters); lanes wait on `ready`.
    pub main: Arc<CudaStream>,
    pub ready: CudaEvent,
    /// The host's books: slots, entries, tombstones, special keys.
    pub books: Books,
    /// The table's hash seed (`TableConfig::seed`).
    pub seed: u64,
}

/// Bytes of `slots` slots of `words` words each (a key and its row: `width + 1`).
fn array_bytes(slots: usize, words: usize) -> Result<usize> {
    slots
        .checked_mul(words)
        .and_then(|w| w.checked_mul(8))
        .ok_or(Error::OutOfDeviceMemory {
            backend: BACKEND,
            requested_bytes: u64::MAX,
        })
}

impl State {
    pub fn new(gpu: &Gpu, cfg: &TableConfig, seed: u64) -> Result<State> {
        let books = Books::new(cfg);
        let (slots, width) = (books.slots(), cfg.width);
        let array = DevBuf::new(gpu, array_bytes(slots, width + 1)?)?;
        let special = DevBuf::new(gpu, special_words(width as u32) as usize * 8)?;
        let counters = DevBuf::new(gpu, counter::LEN * 8)?;
        let mut st = State {
            slots: array,
            special,
            counters,
            h_counters: Pinned::new(gpu, counter::LEN, false)?,
            main: stream(gpu)?,
            ready: event(gpu)?,
            books,
            seed,
        };
        st.clear()?;
        Ok(st)
    }

    pub fn table_args(&self, width: usize) -> TableArgs {
        TableArgs {
            slots: self.slots.ptr(),
            special: self.special.ptr(),
            counters: self.counters.ptr(),
            mask: self.books.slots() as u64 - 1,
            width: width as u32,
            bucket_shift: self.bucket_shift(self.books.slots(), width),
            seed: self.seed,
        }
    }

    /// The bucket shift of this table's slot array at `slots` slots.
    fn bucket_shift(&self, slots: usize, width: usize) -> u32 {
        bucket_shift(slots as u64, width as u32)
    }

    pub fn bytes(&self) -> usize {
        self.slots.bytes() + self.special.bytes() + self.counters.bytes()
    }

    /// Empties the table: keys to EMPTY, sentinel keys absent. Synchronous.
    pub fn clear(&mut self) -> Result<()> {
        fill_empty(&self.slots, &self.main)?;
        self.special.memset(0, self.special.bytes(), &self.main)?;
        self.counters.memset(0, self.counters.bytes(), &self.main)?;
        self.main.synchronize().drv("cuStreamSynchronize")?;
        self.books.cleared();
        Ok(())
    }

    pub fn reset_counters(&self) -> Result<()> {
        self.counters.memset(0, counter::LEN * 8, &self.main)
    }

    /// Reads the counters back (waits for the main stream; callers have already waited
    /// for the lanes).
    pub fn read_counters(&mut self) -> Result<[u64; counter::LEN]> {
        // SAFETY: the counter buffer holds counter::LEN words; h_counters is read only after
        // the stream synchronized below.
        unsafe {
            self.h_counters
                .dtoh(self.counters.ptr(), counter::LEN, &self.main)?;
        }
        self.main.synchronize().drv("cuStreamSynchronize")?;
        let mut out = [0u64; counter::LEN];
        // SAFETY: the copy into h_counters is done (synchronized above).
        out.copy_from_slice(unsafe { &self.h_counters.as_slice()[..counter::LEN] });
        Ok(out)
    }

    /// Hands the counts of the put that ran (whole or, after a fault, in part) to the books.
    pub fn count_put(&mut self) -> Result<()> {
        let c = self.read_counters()?;
        counts::apply_put(&mut self.books, &c, BACKEND)
    }

    /// Hands the counts of the delete that ran to the books; returns the entries removed.
    pub fn count_delete(&mut self) -> Result<usize> {
        let c = self.read_counters()?;
        Ok(counts::apply_delete(&mut self.books, &c))
    }

    /// Moves every entry into fresh arrays of `slots` slots (growth, or a tombstone purge
    /// when `slots` is unchanged). The new arrays are allocated first: on any error the
    /// table is left as it was. The books are updated by `kv_core::prepare_put`.
    pub fn rehash(&mut self, dev: &Device, slots: usize, width: usize) -> Result<()> {
        let array = DevBuf::new(dev, array_bytes(slots, width + 1)?)?;
        fill_empty(&array, &self.main)?;
        self.reset_counters()?;
        let a = RehashArgs {
            table: TableArgs {
                slots: array.ptr(),
                mask: slots as u64 - 1,
                bucket_shift: self.bucket_shift(slots, width),
                ..self.table_args(width)
            },
            old: self.slots.ptr(),
            old_bucket_shift: u64::from(self.bucket_shift(self.books.slots(), width)),
            old_slots: self.books.slots() as u64,
        };
        dev.launch(&dev.k.rehash, &a, self.books.slots() as u64, &self.main)?;
        let c = self.read_counters()?;
        let want = self.books.table_len() as u64;
        if c[counter::ERRORS] != 0 || c[counter::MOVED] != want {
            return Err(device_error(format!(
                "rehash into {slots} slots moved {} of {want} keys ({} probe overflows); table left as it was",
                c[counter::MOVED],
                c[counter::ERRORS]
            )));
        }
        self.slots = array;
        Ok(())
    }

    /// Every live entry, copied out as the table is now (the caller holds the write lock:
    /// no batch is running, so the image is one point in time).
    ///
    /// The slot array streams through two page-locked buffers of whole buckets: while one
    /// piece copies on the main stream, the previous one is decoded on every core straight
    /// into the image, so the table is held for about the device-to-host copy of its slot
    /// array, and no host copy of the whole array is ever made.
    pub fn export(&self, gpu: &Gpu, width: usize) -> Result<TableImage> {
        let slots = self.books.slots();
        let shift = self.bucket_shift(slots, width);
        let bucket_slots = 1usize << shift;
        let bucket_words = bucket_slots * (width + 1);
        let buckets = slots / bucket_slots;
        let per_piece = (EXPORT_PIECE_BYTES / 8 / bucket_words).clamp(1, buckets.max(1));
        let pieces = buckets.div_ceil(per_piece);
        let mut img = TableImage::new(width);
        let expect = self.books.len();
        let oom = |_| Error::OutOfDeviceMemory {
            backend: BACKEND,
            requested_bytes: (expect * (width + 1) * 8) as u64,
        };
        img.keys.try_reserve_exact(expect).map_err(oom)?;
        img.values.try_reserve_exact(expect * width).map_err(oom)?;
        let mut bufs = [
            Pinned::<u64>::new(gpu, per_piece * bucket_words, false)?,
            Pinned::<u64>::new(gpu, per_piece * bucket_words, false)?,
        ];
        let done = [event(gpu)?, event(gpu)?];
        let piece_buckets = |p: usize| per_piece.min(buckets - p * per_piece);
        let enqueue = |p: usize, buf: &mut Pinned<u64>, ev: &CudaEvent| -> Result<()> {
            let src = self.slots.ptr() + (p * per_piece * bucket_words * 8) as u64;
            // SAFETY: the piece lies inside the slot array (`pieces` whole pieces of at most
            // `per_piece` buckets); this buffer is read again only after `ev`, recorded after
            // the copy, has been waited for, and no earlier copy into it is in flight (its
            // previous piece was waited for and decoded before this call).
            unsafe { buf.dtoh(src, piece_buckets(p) * bucket_words, &self.main)? };
            ev.record(&self.main).drv("cuEventRecord")
        };
        if pieces > 0 {
            enqueue(0, &mut bufs[0], &done[0])?;
        }
        for p in 0..pieces {
            if p + 1 < pieces {
                enqueue(p + 1, &mut bufs[(p + 1) % 2], &done[(p + 1) % 2])?;
            }
            done[p % 2].synchronize().drv("cuEventSynchronize")?;
            // SAFETY: the copy into this buffer has completed (its event was waited for) and
            // the next copy into it is enqueued only after this decode.
            let words = unsafe { bufs[p % 2].as_slice() };
            decode_buckets(
                &words[..piece_buckets(p) * bucket_words],
                width,
                bucket_slots,
                &mut img,
            );
        }
        let mut special = vec![0u64; special_words(width as u32) as usize];
        self.special.read_to_host(&mut special, &self.main)?;
        for k in 0..2u64 {
            let at = special_row(k, width as u32) as usize;
            if special.get(k as usize).is_some_and(|&p| p != 0)
                && let Some(row) = special.get(at..at + width)
            {
                img.push(k, row, None);
            }
        }
        Ok(img)
    }

    /// Live keys and tombstones as the device counts them (checks and diagnostics).
    pub fn count(&mut self, dev: &Device, width: usize) -> Result<(u64, u64)> {
        self.reset_counters()?;
        dev.launch(
            &dev.k.count,
            &self.table_args(width),
            self.books.slots() as u64,
            &self.main,
        )?;
        let c = self.read_counters()?;
        Ok((c[counter::LIVE], c[counter::TOMBS]))
    }
}

/// Enqueues the fill of a slot array with zeros: every key EMPTY (one byte fill).
fn fill_empty(array: &DevBuf, stream: &CudaStream) -> Result<()> {
    const _: () = assert!(kv_kernels::layout::EMPTY == 0);
    array.memset(0, array.bytes(), stream)
}

/// Bytes of each of the two page-locked buffers an export streams the slot array through.
const EXPORT_PIECE_BYTES: usize = 64 << 20;

/// Buckets a task of [`decode_buckets`] takes.
const DECODE_TASK: usize = 4096;

/// Appends the live entries of `words` (whole buckets of `bucket_slots` keys, then their
/// rows: `kv_kernels::layout::{key_word, row_word}`) to `img`, on every core: a count per
/// run of buckets, then each run written into its own part of the image's arrays.
fn decode_buckets(words: &[u64], width: usize, bucket_slots: usize, img: &mut TableImage) {
    use rayon::prelude::*;
    let bw = bucket_slots * (width + 1);
    let nb = words.len() / bw;
    let tasks = nb.div_ceil(DECODE_TASK);
    let range = |t: usize| t * DECODE_TASK..((t + 1) * DECODE_TASK).min(nb);
    let counts: Vec<usize> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            range(t)
                .map(|b| {
                    words[b * bw..b * bw + bucket_slots]
                        .iter()
                        .filter(|&&k| !is_sentinel(k))
                        .count()
                })
                .sum()
        })
        .collect();
    let total: usize = counts.iter().sum();
    img.keys.reserve(total);
    img.values.reserve(total * width);
    let (k0, v0) = (img.keys.len(), img.values.len());
    {
        let mut kr = &mut img.keys.spare_capacity_mut()[..total];
        let mut vr = &mut img.values.spare_capacity_mut()[..total * width];
        let mut parts = Vec::with_capacity(tasks);
        for (t, &c) in counts.iter().enumerate() {
            let (ka, kb) = std::mem::take(&mut kr).split_at_mut(c);
            let (va, vb) = std::mem::take(&mut vr).split_at_mut(c * width);
            parts.push((t, ka, va));
            (kr, vr) = (kb, vb);
        }
        parts.into_par_iter().for_each(|(t, ks, vs)| {
            let mut j = 0;
            for b in range(t) {
                let base = b * bw;
                for s in 0..bucket_slots {
                    let k = words[base + s];
                    if is_sentinel(k) {
                        continue;
                    }
                    ks[j].write(k);
                    let row = base + bucket_slots + s * width;
                    for (d, &v) in vs[j * width..(j + 1) * width]
                        .iter_mut()
                        .zip(&words[row..row + width])
                    {
                        d.write(v);
                    }
                    j += 1;
                }
            }
        });
    }
    // SAFETY: the parts above cover the first `total` spare elements of each array exactly
    // (one count per run, computed from the same words), and each run wrote every element
    // of its part: `counts[t]` keys and `counts[t] * width` row words.
    unsafe {
        img.keys.set_len(k0 + total);
        img.values.set_len(v0 + total * width);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_kernels::layout::{TOMBSTONE, key_word, row_word};

    /// The parallel decode finds exactly the entries the layout's own addressing does, in
    /// slot order, across runs of buckets and pieces.
    #[test]
    fn decode_buckets_matches_the_layout() {
        for (width, slots) in [(1usize, 1usize << 15), (3, 1 << 14), (16, 1 << 12)] {
            let shift = bucket_shift(slots as u64, width as u32);
            let mut words = vec![0u64; slots * (width + 1)];
            let mut want = TableImage::new(width);
            for slot in 0..slots as u64 {
                let k = match slot % 5 {
                    0 => 0,
                    1 => TOMBSTONE,
                    _ => slot.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 2,
                };
                words[key_word(slot, width as u32, shift) as usize] = k;
                let at = row_word(slot, width as u32, shift) as usize;
                for j in 0..width {
                    words[at + j] = k ^ j as u64;
                }
                if !is_sentinel(k) {
                    want.push(k, &words[at..at + width], None);
                }
            }
            let bs = 1usize << shift;
            let mut got = TableImage::new(width);
            // Two pieces, as an export streams them.
            let half = (slots / bs / 2) * bs * (width + 1);
            decode_buckets(&words[..half], width, bs, &mut got);
            decode_buckets(&words[half..], width, bs, &mut got);
            assert_eq!(got, want, "width {width}");
        }
    }
}
