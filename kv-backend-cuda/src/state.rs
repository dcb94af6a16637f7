//! The table's device state: its key and value arrays, the special area and the counters
//! in VRAM, with the host's [`Books`] of them; and the table-wide work on them (clear,
//! rehash, count, the copy an export takes).

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};
use kv_core::{Books, Error, Result, TableConfig, TableImage};
use kv_kernels::layout::{
    RehashArgs, TableArgs, bucket_shift, counter, is_sentinel, key_word, row_word, special_row,
    special_words,
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

    /// Copies the slot array and the special area to the host as they are now, on the main
    /// stream (the caller holds the write lock: no batch is running, so the copy is one
    /// point in time).
    pub fn copy_out(&self, width: usize) -> Result<RawTable> {
        let slots = self.books.slots();
        let mut array = vec![0u64; array_bytes(slots, width + 1)? / 8];
        self.slots.read_to_host(&mut array, &self.main)?;
        let mut special = vec![0u64; special_words(width as u32) as usize];
        self.special.read_to_host(&mut special, &self.main)?;
        Ok(RawTable {
            width,
            slots,
            shift: self.bucket_shift(slots, width),
            array,
            special,
        })
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

/// A host copy of a table's slot array and special area ([`State::copy_out`]), decoded
/// into an image once the table's lock is let go.
pub(crate) struct RawTable {
    width: usize,
    slots: usize,
    /// The slot array's bucket shift.
    shift: u32,
    array: Vec<u64>,
    /// `present[2]`, then the rows of the user keys 0 and 1.
    special: Vec<u64>,
}

impl RawTable {
    /// The live entries: every slot whose key is neither EMPTY nor TOMBSTONE with its row
    /// (`kv_kernels::layout::{key_word, row_word}`), then the present special keys.
    pub fn decode(&self) -> TableImage {
        let (w, shift) = (self.width, self.shift);
        let mut img = TableImage::new(w);
        for slot in 0..self.slots as u64 {
            let k = self.array.get(key_word(slot, w as u32, shift) as usize);
            let at = row_word(slot, w as u32, shift) as usize;
            if let Some(&k) = k
                && !is_sentinel(k)
                && let Some(row) = self.array.get(at..at + w)
            {
                img.push(k, row, None);
            }
        }
        for k in 0..2u64 {
            let at = special_row(k, w as u32) as usize;
            if self.special.get(k as usize).is_some_and(|&p| p != 0)
                && let Some(row) = self.special.get(at..at + w)
            {
                img.push(k, row, None);
            }
        }
        img
    }
}
