//! The GPU as a byte table's device ([`GpuDev`]): device allocations, copies on the
//! table's stream through a ring of page-locked chunks, and the byte-table kernels of
//! kv-kernels' PTX.
//!
//! # Copies
//!
//! Every copy goes through [`Ring`]: a few chunks of page-locked memory, each with an event
//! recorded after the last DMA that used it. An upload copies a piece of the caller's
//! bytes into the next chunk (on all cores for large pieces) and enqueues its DMA, so the
//! host fills one chunk while the link drains the one before; a download enqueues the DMAs
//! of as many pieces as there are chunks, then copies each out as its event passes and
//! enqueues the next piece in its place. A pageable copy would instead go through the
//! driver's own staging, one piece at a time with the host waiting on each.

use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaEvent, CudaStream};
use kv_core::{ByteConfig, Error, Result};
use kv_kernels::layout::BytesArgs;
use kv_staging::copy::{CopyMode, par_copy};
use kv_staging::trace::Tracer;

use crate::bytes::{Dev, K};
use crate::gpu::{BACKEND, BytesKernels, Device, Drv, Kernel, device_error};
use crate::memory::{DevBuf, Pinned, event, stream};
use crate::options::CudaOptions;

/// Bytes per chunk of the copy ring.
const CHUNK_BYTES: usize = 8 << 20;
/// Chunks in the copy ring: enough in flight to keep the link busy while the host copies.
const CHUNKS: usize = 4;

/// One page-locked chunk of the copy ring and the event after its last DMA.
struct Chunk {
    buf: Pinned<u8>,
    done: CudaEvent,
    /// Whether `done` was recorded since the chunk was made (a DMA may use it).
    used: bool,
}

/// The copy ring: chunks made on first use (a table that copies little pins little).
struct Ring {
    chunks: Vec<Chunk>,
    next: usize,
}

/// One GPU and a stream: every copy and launch of a table runs on it, in order.
pub(crate) struct GpuDev {
    dev: Device,
    stream: Arc<CudaStream>,
    ring: Mutex<Ring>,
}

impl Drop for GpuDev {
    fn drop(&mut self) {
        // The ring's chunks are freed after this: no DMA may still use them.
        let _ = self.stream.synchronize();
    }
}

impl Ring {
    /// The next chunk, once its last DMA has passed.
    fn take(&mut self, dev: &Device) -> Result<&mut Chunk> {
        let i = self.next;
        // Made in order (a failure leaves the ring as it was, to try again).
        while self.chunks.len() <= i {
            self.chunks.push(Chunk {
                buf: Pinned::new(dev, CHUNK_BYTES, false)?,
                done: event(dev)?,
                used: false,
            });
        }
        let c = &mut self.chunks[i];
        if c.used {
            c.done.synchronize().drv("cuEventSynchronize")?;
        }
        self.next = (i + 1) % CHUNKS;
        Ok(c)
    }

    /// Records chunk `c`'s event after the DMA just queued on `stream`. When the event
    /// cannot be recorded, waits for the stream instead, so that the chunk is free again
    /// before the error is answered.
    fn recorded(c: &mut Chunk, stream: &CudaStream) -> Result<()> {
        if let Err(e) = c.done.record(stream).drv("cuEventRecord") {
            let _ = stream.synchronize();
            return Err(e);
        }
        c.used = true;
        Ok(())
    }
}

impl GpuDev {
    pub(crate) fn new(cfg: &ByteConfig, options: &CudaOptions) -> Result<Self> {
        let gpu = crate::gpu::gpu(&cfg.table)?;
        gpu.bind()?;
        let dev = Device::new(gpu, options)?;
        if dev.k.bytes.is_none() {
            return Err(Error::Unsupported {
                backend: BACKEND,
                what: "byte tables with kernels (CudaOptions::ptx) that lack the byte-table kernels",
            });
        }
        let stream = stream(&dev)?;
        Ok(GpuDev {
            dev,
            stream,
            ring: Mutex::new(Ring {
                chunks: Vec::new(),
                next: 0,
            }),
        })
    }

    fn copy_mode(&self) -> CopyMode {
        self.dev.copy
    }

    fn kernels(&self) -> Result<&BytesKernels> {
        self.dev
            .k
            .bytes
            .as_ref()
            .ok_or_else(|| device_error("the byte-table kernels are not loaded"))
    }
}

impl Dev for GpuDev {
    type Buf = DevBuf;

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn device_name(&self) -> String {
        self.dev.name.clone()
    }

    fn tracer(&self) -> Option<&Tracer> {
        self.dev.trace.as_ref()
    }

    fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let b = DevBuf::new(&self.dev, bytes)?;
        b.memset(0, b.bytes(), &self.stream)?;
        Ok(b)
    }

    fn addr(b: &DevBuf) -> u64 {
        b.ptr()
    }

    fn size(b: &DevBuf) -> usize {
        b.bytes()
    }

    fn upload(&self, dst: &DevBuf, at: usize, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        if at + src.len() > dst.bytes() {
            return Err(device_error("a byte-table upload does not fit its buffer"));
        }
        self.dev.bind()?;
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        for (k, piece) in src.chunks(CHUNK_BYTES).enumerate() {
            let c = ring.take(&self.dev)?;
            // SAFETY: the chunk's last DMA has passed (`take` waited for its event).
            let buf = unsafe { &mut c.buf.as_mut_slice()[..piece.len()] };
            par_copy(self.copy_mode(), buf, piece);
            // SAFETY: the range lies inside `dst` (checked); the chunk is page-locked and
            // is neither written nor freed before its event, recorded next, has passed
            // (`Ring::take` and `GpuDev`'s drop wait for it).
            unsafe {
                c.buf.htod(
                    dst.ptr() + (at + k * CHUNK_BYTES) as u64,
                    piece.len(),
                    &self.stream,
                )
            }?;
            Ring::recorded(c, &self.stream)?;
        }
        Ok(())
    }

    fn download(&self, dst: &mut [u8], src: &DevBuf, at: usize) -> Result<()> {
        self.download_many(&mut [(dst, src, at)])
    }

    fn download_many(&self, parts: &mut [(&mut [u8], &DevBuf, usize)]) -> Result<()> {
        self.dev.bind()?;
        for (dst, src, at) in parts.iter() {
            if *at + dst.len() > src.bytes() {
                return Err(device_error(
                    "a byte-table download does not fit its buffer",
                ));
            }
        }
        // Pieces of at most a chunk: (part, offset in it, bytes).
        let pieces: Vec<(usize, usize, usize)> = parts
            .iter()
            .enumerate()
            .flat_map(|(p, (dst, _, _))| {
                (0..dst.len())
                    .step_by(CHUNK_BYTES)
                    .map(move |o| (p, o, CHUNK_BYTES.min(dst.len() - o)))
            })
            .collect();
        if pieces.is_empty() {
            return self.stream.synchronize().drv("cuStreamSynchronize");
        }
        // Each piece's device address.
        let srcs: Vec<u64> = pieces
            .iter()
            .map(|&(p, o, _)| parts[p].1.ptr() + (parts[p].2 + o) as u64)
            .collect();
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        // Piece j goes through chunk `slots[j % CHUNKS]`.
        let mut slots = [0usize; CHUNKS];
        let enqueue = |ring: &mut Ring, j: usize| -> Result<usize> {
            let slot = ring.next;
            let c = ring.take(&self.dev)?;
            // SAFETY: the source range lies inside its buffer (checked above); the chunk is
            // page-locked, its last DMA has passed, and it is read only after its event,
            // recorded next.
            unsafe { c.buf.dtoh(srcs[j], pieces[j].2, &self.stream) }?;
            Ring::recorded(c, &self.stream)?;
            Ok(slot)
        };
        for j in 0..pieces.len().min(CHUNKS) {
            slots[j % CHUNKS] = enqueue(&mut ring, j)?;
        }
        for j in 0..pieces.len() {
            let (p, o, len) = pieces[j];
            let c = &mut ring.chunks[slots[j % CHUNKS]];
            c.done.synchronize().drv("cuEventSynchronize")?;
            // SAFETY: the DMA into the chunk has passed (its event).
            let buf = unsafe { &c.buf.as_slice()[..len] };
            par_copy(CopyMode::Cached, &mut parts[p].0[o..o + len], buf);
            if j + CHUNKS < pieces.len() {
                slots[(j + CHUNKS) % CHUNKS] = enqueue(&mut ring, j + CHUNKS)?;
            }
        }
        Ok(())
    }

    fn zero(&self, b: &DevBuf, bytes: usize) -> Result<()> {
        self.dev.bind()?;
        b.memset(0, bytes.min(b.bytes()), &self.stream)
    }

    fn launch(&self, k: K, a: &BytesArgs, n: u64) -> Result<()> {
        let ks = self.kernels()?;
        let f: &Kernel<BytesArgs> = match k {
            K::Hash => &ks.hash,
            K::Dedup => &ks.dedup,
            K::Lookup => &ks.lookup,
            K::Write => &ks.write,
            K::Get => &ks.get,
            K::Delete => &ks.delete,
            K::SetExpiry => &ks.set_expiry,
            K::Purge => &ks.purge,
            K::Gather => &ks.gather,
            K::Move => &ks.moves,
            K::Rehash => &ks.rehash,
        };
        self.dev.bind()?;
        if k.warp() {
            self.dev.launch_warps(f, a, n, &self.stream)
        } else {
            self.dev.launch(f, a, n, &self.stream)
        }
    }
}
