//! Batches in page-locked host memory that the table lends to the caller.

use std::sync::Arc;

use cudarc::driver::CudaContext;
use kv_core::{Error, Result};

use crate::gpu::Gpu;
use crate::memory::Pinned;

/// A batch of keys, value rows and found flags in page-locked ("pinned") host memory owned
/// by the library, made by [`CudaBackend::pinned_batch`](crate::CudaBackend::pinned_batch).
///
/// The caller writes keys (and, for a put, values) straight into it;
/// [`put_pinned`](crate::CudaBackend::put_pinned) and
/// [`get_pinned`](crate::CudaBackend::get_pinned) then stream it to and from the GPU in
/// chunks with no host-side copy, so a batch moves at the speed of the PCIe link rather
/// than that of the host's memory copies. The buffers are ordinary cached memory: reading
/// and writing them from the host is as fast as for a `Vec`.
///
/// ```no_run
/// use kv_backend_cuda::CudaBackend;
/// use kv_core::TableConfig;
///
/// let table = CudaBackend::open(TableConfig::new(1 << 20))?;
/// let mut batch = table.pinned_batch(1000)?; // allocate once, reuse for every batch
/// let (keys, values) = batch.keys_values_mut();
/// for (i, (k, v)) in keys.iter_mut().zip(values.iter_mut()).enumerate() {
///     (*k, *v) = (i as u64, 10 * i as u64);
/// }
/// table.put_pinned(&batch)?;
/// batch.set_len(2)?; // look up the first two keys only
/// table.get_pinned(&mut batch)?;
/// assert_eq!(batch.values(), &[0, 10]);
/// assert_eq!(batch.found(), &[1, 1]);
/// # Ok::<(), kv_core::Error>(())
/// ```
pub struct PinnedBatch {
    keys: Pinned<u64>,
    values: Pinned<u64>,
    found: Pinned<u8>,
    len: usize,
    capacity: usize,
    width: usize,
}

impl std::fmt::Debug for PinnedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBatch")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("width", &self.width)
            .finish()
    }
}

impl PinnedBatch {
    pub(crate) fn new(gpu: &Gpu, capacity: usize, width: usize) -> Result<Self> {
        let words = capacity.checked_mul(width).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "a pinned batch of {capacity} rows of {width} words"
            ))
        })?;
        // Not write-combined: the caller reads keys and results back on the host.
        Ok(PinnedBatch {
            keys: Pinned::new(gpu, capacity, false)?,
            values: Pinned::new(gpu, words, false)?,
            found: Pinned::new(gpu, capacity, false)?,
            len: capacity,
            capacity,
            width,
        })
    }

    /// Items in the batch (what a put or get processes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch has no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items the batch can hold (its size at allocation).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Words per value row (the table's width).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Sets the number of items, up to [`capacity`](Self::capacity); the contents of the
    /// first `len` items are kept. Fails with [`Error::LengthMismatch`] past the capacity.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity {
            return Err(Error::LengthMismatch {
                what: "pinned batch length (at most its capacity)",
                expected: self.capacity,
                got: len,
            });
        }
        self.len = len;
        Ok(())
    }

    /// The keys, `u64[len]`.
    pub fn keys(&self) -> &[u64] {
        // SAFETY: no copy into or out of the batch is in flight: the calls that take it
        // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
        unsafe { &self.keys.as_slice()[..self.len] }
    }

    /// The keys, to fill in.
    pub fn keys_mut(&mut self) -> &mut [u64] {
        // SAFETY: no copy into or out of the batch is in flight: the calls that take it
        // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
        unsafe { &mut self.keys.as_mut_slice()[..self.len] }
    }

    /// The value rows, `u64[len * width]`: a put's input, a get's output (zeros for a
    /// missing key).
    pub fn values(&self) -> &[u64] {
        // SAFETY: no copy into or out of the batch is in flight: the calls that take it
        // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
        unsafe { &self.values.as_slice()[..self.len * self.width] }
    }

    /// The value rows, to fill in.
    pub fn values_mut(&mut self) -> &mut [u64] {
        // SAFETY: no copy into or out of the batch is in flight: the calls that take it
        // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
        unsafe { &mut self.values.as_mut_slice()[..self.len * self.width] }
    }

    /// Keys and value rows together, to fill both at once.
    pub fn keys_values_mut(&mut self) -> (&mut [u64], &mut [u64]) {
        let (n, w) = (self.len, self.width);
        (
            // SAFETY: no copy into or out of the batch is in flight: the calls that take it
            // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
            unsafe { &mut self.keys.as_mut_slice()[..n] },
            // SAFETY: no copy into or out of the batch is in flight: the calls that take it
            // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
            unsafe { &mut self.values.as_mut_slice()[..n * w] },
        )
    }

    /// A get's found flags, `u8[len]`: 1 where the key was found, 0 where not.
    pub fn found(&self) -> &[u8] {
        // SAFETY: no copy into or out of the batch is in flight: the calls that take it
        // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
        unsafe { &self.found.as_slice()[..self.len] }
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        self.keys.context()
    }

    pub(crate) fn parts_for_get(&mut self) -> (&[u64], &mut [u64], &mut [u8]) {
        let (n, w) = (self.len, self.width);
        (
            // SAFETY: no copy into or out of the batch is in flight: the calls that take it
            // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
            unsafe { &self.keys.as_slice()[..n] },
            // SAFETY: no copy into or out of the batch is in flight: the calls that take it
            // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
            unsafe { &mut self.values.as_mut_slice()[..n * w] },
            // SAFETY: no copy into or out of the batch is in flight: the calls that take it
            // (`put_pinned`, `get_pinned`) wait for all of theirs before they return.
            unsafe { &mut self.found.as_mut_slice()[..n] },
        )
    }
}
