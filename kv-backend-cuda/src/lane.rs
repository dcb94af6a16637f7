//! A staging lane: one stream with the device buffers of one chunk, and the pinned host
//! buffers its batches stage through; and the enqueueing of a put chunk's passes on it.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};
use kv_core::Result;
use kv_kernels::layout::{BatchArgs, TableArgs, flag, local_slots};

use crate::gpu::{Device, Gpu, device_error};
use crate::memory::{DevBuf, Pinned, event, stream};
use crate::trace::Marks;

/// Which pinned staging buffers a host batch needs in its lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HostNeeds {
    pub keys: bool,
    pub vals_in: bool,
    pub vals_out: bool,
    pub found: bool,
}

/// One staging lane: a stream with its own device buffers for one chunk, and the pinned
/// host buffers that the batches it served needed (allocated on first need, then kept).
pub(crate) struct Lane {
    pub stream: Arc<CudaStream>,
    pub cap: usize,
    pub width: usize,
    /// Keys in (host writes only: write-combined).
    pub h_keys: Option<Pinned<u64>>,
    /// Put values in (host writes only: write-combined).
    pub h_vals_in: Option<Pinned<u64>>,
    /// Get values out: read on the host, so not write-combined.
    pub h_vals_out: Option<Pinned<u64>>,
    /// Found flags out (not write-combined).
    pub h_found: Option<Pinned<u8>>,
    pub d_keys: DevBuf,
    pub d_vals: DevBuf,
    /// Found flags (get/contains): u8[cap].
    pub d_found: DevBuf,
    /// u32[cap] slot of each key in the chunk-local table (put).
    pub d_slot: DevBuf,
    /// u32[local_slots(cap)] chunk-local dedup table (put; zeroed by the settle pass, the
    /// part the chunk uses only, in chunks that found a key already in the table).
    pub d_local: DevBuf,
    /// u32[flag::LEN] per-chunk put flags.
    pub d_flags: DevBuf,
    /// Recorded after the chunk's last operation on this lane.
    pub done: CudaEvent,
    /// Recorded after the chunk's last put kernel.
    pub kdone: CudaEvent,
    /// A chunk (start, len) whose output waits in the pinned buffers.
    pub pending: Option<(usize, usize)>,
}

fn host_buf<T: Copy>(
    slot: &mut Option<Pinned<T>>,
    gpu: &Gpu,
    len: usize,
    write_combined: bool,
) -> Result<()> {
    if slot.is_none() {
        *slot = Some(Pinned::new(gpu, len, write_combined)?);
    }
    Ok(())
}

impl kv_staging::Staged for Lane {
    fn cap(&self) -> usize {
        self.cap
    }
}

/// A lane's staging buffer (allocated by [`Lane::ensure_host`] before the batch).
pub(crate) fn staged<T: Copy>(b: &mut Option<Pinned<T>>) -> Result<&mut Pinned<T>> {
    b.as_mut().ok_or_else(lacks_buffer)
}

/// [`staged`], read-only.
pub(crate) fn staged_ref<T: Copy>(b: &Option<Pinned<T>>) -> Result<&Pinned<T>> {
    b.as_ref().ok_or_else(lacks_buffer)
}

fn lacks_buffer() -> kv_core::Error {
    device_error("internal: a staging lane lacks its pinned buffer")
}

impl Lane {
    pub fn new(gpu: &Gpu, cap: usize, width: usize) -> Result<Lane> {
        Ok(Lane {
            stream: stream(gpu)?,
            cap,
            width,
            h_keys: None,
            h_vals_in: None,
            h_vals_out: None,
            h_found: None,
            d_keys: DevBuf::new(gpu, cap * 8)?,
            d_vals: DevBuf::new(gpu, cap * width * 8)?,
            d_found: DevBuf::new(gpu, cap)?,
            d_slot: DevBuf::new(gpu, cap * 4)?,
            d_local: DevBuf::new(gpu, local_slots(cap as u64) as usize * 4)?,
            d_flags: DevBuf::new(gpu, flag::LEN * 4)?,
            done: event(gpu)?,
            kdone: event(gpu)?,
            pending: None,
        })
    }

    /// Allocates the pinned buffers `needs` asks for that the lane lacks (before a batch
    /// starts, so that a failed allocation leaves the table untouched).
    pub fn ensure_host(&mut self, gpu: &Gpu, needs: HostNeeds) -> Result<()> {
        let (cap, w) = (self.cap, self.width);
        if needs.keys {
            host_buf(&mut self.h_keys, gpu, cap, true)?;
        }
        if needs.vals_in {
            host_buf(&mut self.h_vals_in, gpu, cap * w, true)?;
        }
        if needs.vals_out {
            host_buf(&mut self.h_vals_out, gpu, cap * w, false)?;
        }
        if needs.found {
            host_buf(&mut self.h_found, gpu, cap, false)?;
        }
        Ok(())
    }

    pub fn device_bytes(&self) -> usize {
        self.d_keys.bytes()
            + self.d_vals.bytes()
            + self.d_found.bytes()
            + self.d_slot.bytes()
            + self.d_local.bytes()
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
            local: self.d_local.ptr(),
            local_mask: local_slots(n as u64) - 1,
            flags: self.d_flags.ptr(),
            n: n as u64,
        }
    }

    /// Enqueues a put chunk (`a` from [`Lane::args`]): flags zeroed, then the place, settle,
    /// dedup and rewrite passes (see `kv_kernels::ops`).
    /// With `marks` (the trace), the end of each step is marked on the lane's stream.
    pub fn enqueue_put(
        &self,
        dev: &Device,
        a: &BatchArgs,
        mut marks: Option<&mut Marks>,
    ) -> Result<()> {
        debug_assert!(a.n as usize <= self.cap && a.local_mask < local_slots(self.cap as u64));
        self.d_flags.memset(0, flag::LEN * 4, &self.stream)?;
        let n = a.n;
        // Fresh keys need only the first pass; the other three read a flag and exit unless
        // the chunk found keys in the table (kv_kernels::ops, "The put protocol").
        let place = if a.table.width >= kv_kernels::layout::COOP_WIDTH {
            &dev.k.put_place_wide
        } else {
            &dev.k.put_place
        };
        let passes = [
            (place, "place"),
            (&dev.k.put_settle, "settle"),
            (&dev.k.put_dedup, "dedup"),
            (&dev.k.put_rewrite, "rewrite"),
        ];
        for (k, name) in passes {
            dev.launch(k, a, n, &self.stream)?;
            if let Some(m) = marks.as_deref_mut() {
                m.mark(dev, name, &self.stream)?;
            }
        }
        Ok(())
    }
}
