//! Device and page-locked host memory, and the asynchronous copies between them.
//!
//! A copy between page-locked host memory and the device is enqueued on a stream and runs
//! later, while the host goes on. Rust's borrows end when the enqueueing call returns, so
//! they cannot say when the device is done with the host memory: the functions that hand
//! such memory to the device, or that read or write it while the device may, are `unsafe
//! fn`s whose callers promise to wait (on the stream, or an event recorded after the copy)
//! first. The pipeline waits on a lane's event before it touches the lane's buffers again,
//! and every batch waits for all its lanes before it returns.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, result};
use kv_core::{Error, Result};

use crate::gpu::{BACKEND, Drv, Gpu, drv};

/// A device allocation (freed on drop).
pub(crate) struct DevBuf {
    ptr: CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DevBuf {
    /// Allocates `bytes` (at least 8) of device memory; OOM becomes [`Error::OutOfDeviceMemory`].
    pub fn new(gpu: &Gpu, bytes: usize) -> Result<Self> {
        let bytes = bytes.max(8);
        gpu.bind()?;
        // SAFETY: plain allocation in the current context.
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => Ok(DevBuf {
                ptr,
                bytes,
                ctx: gpu.ctx.clone(),
            }),
            Err(e) if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(Error::OutOfDeviceMemory {
                backend: BACKEND,
                requested_bytes: bytes as u64,
            }),
            Err(e) => Err(drv("cuMemAlloc", e)),
        }
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Enqueues a byte fill of the first `bytes` bytes.
    pub fn memset(&self, byte: u8, bytes: usize, stream: &CudaStream) -> Result<()> {
        debug_assert!(bytes <= self.bytes);
        // SAFETY: the range lies inside this allocation.
        unsafe {
            result::memset_d8_async(self.ptr, byte, bytes.min(self.bytes), stream.cu_stream())
        }
        .drv("cuMemsetD8Async")
    }
}

impl DevBuf {
    /// Copies the first `dst.len()` elements to `dst` (ordinary host memory) with plain
    /// device-to-host copies on `stream`, in pieces of at most
    /// [`EXPORT_CHUNK_BYTES`](kv_staging::image::EXPORT_CHUNK_BYTES), and waits for them:
    /// how an export copies a table out.
    pub fn read_to_host<T: bytemuck::Pod>(&self, dst: &mut [T], stream: &CudaStream) -> Result<()> {
        let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
        if dst.len() > self.bytes {
            return Err(crate::gpu::device_error(format!(
                "a copy of {} bytes out of a {}-byte device buffer",
                dst.len(),
                self.bytes
            )));
        }
        let chunk = kv_staging::image::EXPORT_CHUNK_BYTES;
        for (k, piece) in dst.chunks_mut(chunk).enumerate() {
            // SAFETY: the piece lies inside this allocation (checked above). `piece` is
            // pageable host memory: the driver has filled it when the call returns, and the
            // stream is synchronized below before `dst` is read or its borrow ends.
            unsafe {
                result::memcpy_dtoh_async(piece, self.ptr + (k * chunk) as u64, stream.cu_stream())
            }
            .drv("cuMemcpyDtoHAsync")?;
        }
        stream.synchronize().drv("cuStreamSynchronize")
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: ptr came from cuMemAlloc and is freed once; no work using it is in flight
        // (every batch synchronizes before returning).
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// Page-locked host memory for staging (freed on drop).
pub(crate) struct Pinned<T: Copy> {
    ptr: *mut T,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is plain memory owned by this value; access is through &/&mut self.
unsafe impl<T: Copy + Send> Send for Pinned<T> {}
// SAFETY: as above.
unsafe impl<T: Copy + Sync> Sync for Pinned<T> {}

impl<T: Copy> Pinned<T> {
    /// `len` elements of page-locked memory; `write_combined` for buffers the host only writes.
    pub fn new(gpu: &Gpu, len: usize, write_combined: bool) -> Result<Self> {
        let len = len.max(1);
        let bytes = len * std::mem::size_of::<T>();
        gpu.bind()?;
        let flags = if write_combined {
            sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        // SAFETY: plain allocation of page-locked host memory.
        let ptr = unsafe { result::malloc_host(bytes, flags) }.map_err(|e| {
            drv(
                &format!("cuMemHostAlloc of {bytes} bytes of pinned host memory"),
                e,
            )
        })?;
        // Zero it so the slices below are always initialised.
        // SAFETY: ptr points to `bytes` writable bytes.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Ok(Pinned {
            ptr: ptr as *mut T,
            len,
            ctx: gpu.ctx.clone(),
        })
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// The context the memory is page-locked for.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The elements.
    ///
    /// # Safety
    ///
    /// No copy into this buffer may be in flight: the caller has waited for the stream (or
    /// an event recorded after the copy) of every [`dtoh`](Self::dtoh) into it.
    pub unsafe fn as_slice(&self) -> &[T] {
        // SAFETY: ptr holds len initialised elements (zeroed at allocation); the device does
        // not write them now (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The elements, to write.
    ///
    /// # Safety
    ///
    /// No copy from or into this buffer may be in flight: the caller has waited for every
    /// [`htod`](Self::htod) from it and [`dtoh`](Self::dtoh) into it.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above; the device neither reads nor writes them now.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Enqueues a copy of the first `n` elements to the device address `dst` on `stream`.
    ///
    /// # Safety
    ///
    /// `dst` holds `n` elements, and the caller neither writes nor frees this buffer until
    /// the stream has passed the copy.
    pub unsafe fn htod(&self, dst: u64, n: usize, stream: &CudaStream) -> Result<()> {
        let n = n.min(self.len);
        // SAFETY: the caller's promises, passed on; the elements are page-locked.
        unsafe { htod_slice(dst, std::slice::from_raw_parts(self.ptr, n), stream) }
    }

    /// Enqueues a copy of `n` elements from the device address `src` into the first `n`
    /// elements on `stream`.
    ///
    /// # Safety
    ///
    /// `src` holds `n` elements, and the caller neither reads, writes nor frees this buffer
    /// until the stream has passed the copy.
    pub unsafe fn dtoh(&mut self, src: u64, n: usize, stream: &CudaStream) -> Result<()> {
        let n = n.min(self.len);
        // SAFETY: the caller's promises, passed on; the elements are page-locked.
        unsafe { dtoh_slice(std::slice::from_raw_parts_mut(self.ptr, n), src, stream) }
    }
}

/// Enqueues a copy of `src` to the device address `dst` on `stream`.
///
/// # Safety
///
/// `src` is page-locked memory (a [`Pinned`] buffer's or a lent batch's elements) that stays
/// allocated and unwritten until the stream has passed the copy, and `dst` holds
/// `src.len()` elements.
pub(crate) unsafe fn htod_slice<T: Copy>(dst: u64, src: &[T], stream: &CudaStream) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: the caller's promises: the source outlives the copy and is not written
    // during it; dst holds src.len() elements.
    unsafe { result::memcpy_htod_async(dst, src, stream.cu_stream()) }.drv("cuMemcpyHtoDAsync")
}

/// Enqueues a copy from the device address `src` into `dst` on `stream`.
///
/// # Safety
///
/// `dst` is page-locked memory that is neither read, written nor released until the
/// stream has passed the copy, and `src` holds `dst.len()` elements.
pub(crate) unsafe fn dtoh_slice<T: Copy>(
    dst: &mut [T],
    src: u64,
    stream: &CudaStream,
) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: the caller's promises, as above.
    unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }.drv("cuMemcpyDtoHAsync")
}

impl<T: Copy> Drop for Pinned<T> {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: ptr came from cuMemHostAlloc and is freed once; no copy is in flight.
        let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
    }
}

/// A new non-blocking stream.
pub(crate) fn stream(gpu: &Gpu) -> Result<Arc<CudaStream>> {
    gpu.ctx.new_stream().drv("cuStreamCreate")
}

/// A new event (timing disabled).
pub(crate) fn event(gpu: &Gpu) -> Result<CudaEvent> {
    gpu.ctx.new_event(None).drv("cuEventCreate")
}
