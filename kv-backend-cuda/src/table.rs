//! The table in VRAM and the host pipeline that feeds it.
//!
//! # Pipeline
//!
//! A batch from host memory is cut into chunks. Each chunk goes through one of a few
//! staging *lanes* (a stream, pinned host buffers, device buffers, two events), round
//! robin, so that while the GPU runs chunk `c`'s kernels, chunk `c + 1` is being copied in
//! and chunk `c - 1`'s results copied out, and the host copies (user slice ↔ pinned, in
//! parallel with rayon) overlap both. The host only waits for a lane when it needs to reuse
//! it, and once at the end of the batch.
//!
//! A put's kernels must apply in batch order (a later chunk overwrites an earlier one):
//! each chunk's first kernel waits (`cuStreamWaitEvent`, on the device) for the previous
//! chunk's last kernel, while its copies do not wait. Get, contains and delete chunks are
//! independent and run concurrently.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};
use kv_core::{Error, Result};
use kv_kernels::layout::{
    BatchArgs, FillArgs, RehashArgs, TableArgs, counter, flag, special_words,
};
use rayon::prelude::*;

use crate::gpu::{BACKEND, DevBuf, Drv, Gpu, Pinned, event, stream};

/// Staging lanes used by one host batch.
pub(crate) const LANES: usize = 3;
/// Bytes of keys + values per chunk at most (the chunk size for large batches).
const CHUNK_BYTES: usize = 32 << 20;
/// Smallest lane (items); lanes are sized in powers of two so that they are reused.
const MIN_LANE: usize = 4096;
/// Lanes kept in a table's pool between batches.
pub(crate) const POOL_MAX: usize = 2 * LANES;

/// Items per chunk for a batch of `n` keys of `width` words.
pub(crate) fn lane_cap(n: usize, width: usize) -> usize {
    let max = (CHUNK_BYTES / (8 * (width + 1))).max(MIN_LANE);
    let max = 1usize << (usize::BITS - 1 - max.leading_zeros()); // round down to a power of two
    n.div_ceil(LANES)
        .max(1)
        .next_power_of_two()
        .clamp(MIN_LANE, max)
}

/// Copies `src` into `dst` (same length), on all cores when it is large.
pub(crate) fn par_copy<T: Copy + Send + Sync>(dst: &mut [T], src: &[T]) {
    const PAR_MIN: usize = 1 << 17;
    const PIECE: usize = 1 << 15;
    if dst.len() < PAR_MIN {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(PIECE)
            .zip(src.par_chunks(PIECE))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

fn par_bools(dst: &mut [bool], src: &[u8]) {
    const PAR_MIN: usize = 1 << 17;
    if dst.len() < PAR_MIN {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s != 0);
    } else {
        dst.par_chunks_mut(1 << 15)
            .zip(src.par_chunks(1 << 15))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d = *s != 0));
    }
}

/// One staging lane: a stream with its own pinned and device buffers for one chunk.
pub(crate) struct Lane {
    pub stream: Arc<CudaStream>,
    pub cap: usize,
    width: usize,
    /// Keys in (host writes only: write-combined).
    h_keys: Pinned<u64>,
    /// Values in (put) or out (get): read back on the host, so not write-combined.
    h_vals: Pinned<u64>,
    /// Found flags out.
    h_found: Pinned<u8>,
    d_keys: DevBuf,
    d_vals: DevBuf,
    /// Found flags (get/contains) or winner flags (put): u8[cap].
    d_found: DevBuf,
    /// u32[cap] slot of each key (put).
    d_slot: DevBuf,
    /// u32[flag::LEN] per-chunk put flags.
    d_flags: DevBuf,
    /// Recorded after the chunk's last operation on this lane.
    done: CudaEvent,
    /// Recorded after the chunk's last put kernel.
    kdone: CudaEvent,
    /// A chunk (start, len) whose output waits in the pinned buffers.
    pending: Option<(usize, usize)>,
}

impl Lane {
    pub fn new(gpu: &Gpu, cap: usize, width: usize) -> Result<Lane> {
        Ok(Lane {
            stream: stream(gpu)?,
            cap,
            width,
            h_keys: Pinned::new(gpu, cap, true)?,
            h_vals: Pinned::new(gpu, cap * width, false)?,
            h_found: Pinned::new(gpu, cap, false)?,
            d_keys: DevBuf::new(gpu, cap * 8)?,
            d_vals: DevBuf::new(gpu, cap * width * 8)?,
            d_found: DevBuf::new(gpu, cap)?,
            d_slot: DevBuf::new(gpu, cap * 4)?,
            d_flags: DevBuf::new(gpu, flag::LEN * 4)?,
            done: event(gpu)?,
            kdone: event(gpu)?,
            pending: None,
        })
    }

    pub fn device_bytes(&self) -> usize {
        self.d_keys.bytes()
            + self.d_vals.bytes()
            + self.d_found.bytes()
            + self.d_slot.bytes()
            + self.d_flags.bytes()
    }

    /// Batch arguments for a chunk of `n` items whose keys/values are at the given device
    /// addresses, with this lane's scratch.
    pub fn args(
        &self,
        table: TableArgs,
        keys: u64,
        values: u64,
        found: u64,
        n: usize,
    ) -> BatchArgs {
        BatchArgs {
            table,
            keys_in: keys,
            values,
            found_out: found,
            slot_of: self.d_slot.ptr(),
            win: self.d_found.ptr(),
            flags: self.d_flags.ptr(),
            n: n as u64,
        }
    }

    /// Enqueues the five put passes for `a` (flags reset first).
    pub fn enqueue_put(&self, gpu: &Gpu, a: &BatchArgs) -> Result<()> {
        self.d_flags.memset(0, flag::LEN * 4, &self.stream)?;
        let n = a.n;
        gpu.launch(&gpu.k.put_place, a, n, &self.stream)?;
        gpu.launch(&gpu.k.put_zero, a, n, &self.stream)?;
        gpu.launch(&gpu.k.put_max, a, n, &self.stream)?;
        gpu.launch(&gpu.k.put_win, a, n, &self.stream)?;
        gpu.launch(&gpu.k.put_finish, a, n, &self.stream)
    }
}

/// What a host batch does, with its output slices.
pub(crate) enum Op<'a> {
    Put {
        values: &'a [u64],
    },
    Get {
        values: &'a mut [u64],
        found: &'a mut [bool],
    },
    Contains {
        found: &'a mut [bool],
    },
    Delete,
}

/// The table's device state (behind the backend's RwLock).
pub(crate) struct State {
    pub slots: usize,
    pub keys: DevBuf,
    pub values: DevBuf,
    pub special: DevBuf,
    pub counters: DevBuf,
    h_counters: Pinned<u64>,
    /// Stream for table-wide work (clear, rehash, counters); lanes wait on `ready`.
    pub main: Arc<CudaStream>,
    pub ready: CudaEvent,
    /// Entries, sentinel keys included.
    pub len: usize,
    /// Tombstones in the key array.
    pub tombs: usize,
    /// Sentinel keys present (0..=2).
    pub spec_len: usize,
}

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
    pub fn new(gpu: &Gpu, slots: usize, width: usize) -> Result<State> {
        let keys = DevBuf::new(gpu, array_bytes(slots, 1)?)?;
        let values = DevBuf::new(gpu, array_bytes(slots, width)?)?;
        let special = DevBuf::new(gpu, special_words(width as u32) as usize * 8)?;
        let counters = DevBuf::new(gpu, counter::LEN * 8)?;
        let st = State {
            slots,
            keys,
            values,
            special,
            counters,
            h_counters: Pinned::new(gpu, counter::LEN, false)?,
            main: stream(gpu)?,
            ready: event(gpu)?,
            len: 0,
            tombs: 0,
            spec_len: 0,
        };
        st.clear(gpu)?;
        Ok(st)
    }

    pub fn table_args(&self, width: usize) -> TableArgs {
        TableArgs {
            keys: self.keys.ptr(),
            values: self.values.ptr(),
            special: self.special.ptr(),
            counters: self.counters.ptr(),
            mask: self.slots as u64 - 1,
            width: width as u32,
            pad: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.keys.bytes() + self.values.bytes() + self.special.bytes() + self.counters.bytes()
    }

    /// Keys in the key array (entries less the sentinel keys).
    pub fn table_len(&self) -> usize {
        self.len.saturating_sub(self.spec_len)
    }

    /// Empties the table: keys to EMPTY, sentinel keys absent. Synchronous.
    pub fn clear(&self, gpu: &Gpu) -> Result<()> {
        fill_empty(gpu, &self.keys, self.slots, &self.main)?;
        self.special.memset(0, self.special.bytes(), &self.main)?;
        self.counters.memset(0, self.counters.bytes(), &self.main)?;
        self.main.synchronize().drv("cuStreamSynchronize")
    }

    pub fn reset_counters(&self) -> Result<()> {
        self.counters.memset(0, counter::LEN * 8, &self.main)
    }

    /// Reads the counters back (waits for the main stream; callers have already waited
    /// for the lanes).
    pub fn read_counters(&mut self) -> Result<[u64; counter::LEN]> {
        self.h_counters
            .dtoh(self.counters.ptr(), counter::LEN, &self.main)?;
        self.main.synchronize().drv("cuStreamSynchronize")?;
        let mut out = [0u64; counter::LEN];
        out.copy_from_slice(&self.h_counters.as_slice()[..counter::LEN]);
        Ok(out)
    }

    /// Moves every entry into fresh arrays of `slots` slots (growth, or a tombstone purge
    /// when `slots` is unchanged). The new arrays are allocated first: on any error the
    /// table is left as it was.
    pub fn rehash(&mut self, gpu: &Gpu, slots: usize, width: usize) -> Result<()> {
        let keys = DevBuf::new(gpu, array_bytes(slots, 1)?)?;
        let values = DevBuf::new(gpu, array_bytes(slots, width)?)?;
        fill_empty(gpu, &keys, slots, &self.main)?;
        self.reset_counters()?;
        let a = RehashArgs {
            table: TableArgs {
                keys: keys.ptr(),
                values: values.ptr(),
                mask: slots as u64 - 1,
                ..self.table_args(width)
            },
            old_keys: self.keys.ptr(),
            old_values: self.values.ptr(),
            old_slots: self.slots as u64,
        };
        gpu.launch(&gpu.k.rehash, &a, self.slots as u64, &self.main)?;
        let c = self.read_counters()?;
        if c[counter::ERRORS] != 0 || c[counter::MOVED] != self.table_len() as u64 {
            return Err(Error::Device {
                backend: BACKEND,
                message: format!(
                    "rehash into {slots} slots moved {} of {} keys ({} probe overflows); table left as it was",
                    c[counter::MOVED],
                    self.table_len(),
                    c[counter::ERRORS]
                ),
            });
        }
        self.keys = keys;
        self.values = values;
        self.slots = slots;
        self.tombs = 0;
        Ok(())
    }

    /// Live keys and tombstones as the device counts them (checks and diagnostics).
    pub fn count(&mut self, gpu: &Gpu, width: usize) -> Result<(u64, u64)> {
        self.reset_counters()?;
        gpu.launch(
            &gpu.k.count,
            &self.table_args(width),
            self.slots as u64,
            &self.main,
        )?;
        let c = self.read_counters()?;
        Ok((c[counter::LIVE], c[counter::TOMBS]))
    }
}

fn fill_empty(gpu: &Gpu, keys: &DevBuf, slots: usize, stream: &CudaStream) -> Result<()> {
    let a = FillArgs {
        dst: keys.ptr(),
        value: kv_kernels::layout::EMPTY,
        n: slots as u64,
    };
    gpu.launch(&gpu.k.fill, &a, slots as u64, stream)
}

/// Runs a host batch through `lanes` (all of capacity `cap`): see the module docs.
/// On return (Ok or Err after a successful drain) no work of the batch is in flight.
pub(crate) fn run_host_batch(
    gpu: &Gpu,
    table: TableArgs,
    lanes: &mut [Lane],
    cap: usize,
    keys: &[u64],
    op: &mut Op<'_>,
    after: Option<&CudaEvent>,
) -> Result<()> {
    let n = keys.len();
    let chunks = n.div_ceil(cap);
    let nl = lanes.len();
    debug_assert!(nl >= 1 && lanes.iter().all(|l| l.cap >= cap));
    if let Some(ev) = after {
        for l in lanes.iter() {
            l.stream.wait(ev).drv("cuStreamWaitEvent")?;
        }
    }
    let w = lanes[0].width;
    let is_put = matches!(op, Op::Put { .. });
    let mut prev: Option<usize> = None;
    for c in 0..chunks {
        let start = c * cap;
        let m = cap.min(n - start);
        let li = c % nl;
        // Reuse the lane: wait for its previous chunk and hand that chunk's output over.
        lanes[li].done.synchronize().drv("cuEventSynchronize")?;
        drain_output(&mut lanes[li], op);
        {
            let lane = &mut lanes[li];
            par_copy(
                &mut lane.h_keys.as_mut_slice()[..m],
                &keys[start..start + m],
            );
            lane.h_keys.htod(lane.d_keys.ptr(), m, &lane.stream)?;
            if let Op::Put { values } = op {
                par_copy(
                    &mut lane.h_vals.as_mut_slice()[..m * w],
                    &values[start * w..(start + m) * w],
                );
                lane.h_vals.htod(lane.d_vals.ptr(), m * w, &lane.stream)?;
            }
        }
        if is_put && let Some(p) = prev {
            // Kernels in batch order; this lane's copies above do not wait.
            lanes[li]
                .stream
                .wait(&lanes[p].kdone)
                .drv("cuStreamWaitEvent")?;
        }
        let lane = &mut lanes[li];
        let a = lane.args(
            table,
            lane.d_keys.ptr(),
            lane.d_vals.ptr(),
            lane.d_found.ptr(),
            m,
        );
        match op {
            Op::Put { .. } => {
                lane.enqueue_put(gpu, &a)?;
                lane.kdone.record(&lane.stream).drv("cuEventRecord")?;
            }
            Op::Get { .. } => {
                gpu.launch(&gpu.k.get, &a, m as u64, &lane.stream)?;
                lane.h_vals.dtoh(lane.d_vals.ptr(), m * w, &lane.stream)?;
                lane.h_found.dtoh(lane.d_found.ptr(), m, &lane.stream)?;
                lane.pending = Some((start, m));
            }
            Op::Contains { .. } => {
                let a = BatchArgs { values: 0, ..a };
                gpu.launch(&gpu.k.contains, &a, m as u64, &lane.stream)?;
                lane.h_found.dtoh(lane.d_found.ptr(), m, &lane.stream)?;
                lane.pending = Some((start, m));
            }
            Op::Delete => gpu.launch(&gpu.k.delete, &a, m as u64, &lane.stream)?,
        }
        lane.done.record(&lane.stream).drv("cuEventRecord")?;
        prev = Some(li);
    }
    for lane in lanes.iter_mut() {
        lane.done.synchronize().drv("cuEventSynchronize")?;
        drain_output(lane, op);
    }
    Ok(())
}

/// Copies a finished chunk's output from the lane's pinned buffers to the caller's slices.
fn drain_output(lane: &mut Lane, op: &mut Op<'_>) {
    let Some((start, m)) = lane.pending.take() else {
        return;
    };
    let w = lane.width;
    match op {
        Op::Get { values, found } => {
            par_copy(
                &mut values[start * w..(start + m) * w],
                &lane.h_vals.as_slice()[..m * w],
            );
            par_bools(&mut found[start..start + m], &lane.h_found.as_slice()[..m]);
        }
        Op::Contains { found } => {
            par_bools(&mut found[start..start + m], &lane.h_found.as_slice()[..m])
        }
        Op::Put { .. } | Op::Delete => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_cap_is_a_bounded_power_of_two() {
        assert_eq!(lane_cap(1, 1), MIN_LANE);
        assert_eq!(lane_cap(10_000, 1), MIN_LANE);
        assert_eq!(lane_cap(3 * 8192, 1), 8192);
        assert_eq!(lane_cap(100_000_000, 1), 1 << 21); // 32 MiB / 16 B
        assert_eq!(lane_cap(100_000_000, 16), 1 << 17);
        for w in 1..=16 {
            for n in [1, 5000, 1 << 20, 123_456_789] {
                let c = lane_cap(n, w);
                assert!(c.is_power_of_two() && c >= MIN_LANE);
                assert!(c * 8 * (w + 1) <= CHUNK_BYTES.max(MIN_LANE * 8 * 17));
                assert!((c as u64) < u32::MAX as u64);
            }
        }
    }

    #[test]
    fn par_copy_and_bools() {
        let src: Vec<u64> = (0..300_000).collect();
        let mut dst = vec![0; src.len()];
        par_copy(&mut dst, &src);
        assert_eq!(dst, src);
        let bytes: Vec<u8> = (0..300_000).map(|i| (i % 3 == 0) as u8).collect();
        let mut b = vec![false; bytes.len()];
        par_bools(&mut b, &bytes);
        assert!(b.iter().enumerate().all(|(i, x)| *x == (i % 3 == 0)));
    }
}
