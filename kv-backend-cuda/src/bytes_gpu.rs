//! The GPU as a byte table's device ([`GpuDev`]): device allocations, copies on the
//! table's stream, and the byte-table kernels of kv-kernels' PTX.

use std::sync::Arc;

use cudarc::driver::{CudaStream, result};
use kv_core::{ByteConfig, Error, Result};
use kv_kernels::layout::BytesArgs;

use crate::bytes::{Dev, K};
use crate::gpu::{BACKEND, BytesKernels, Device, Drv, Kernel, device_error};
use crate::memory::{DevBuf, stream};
use crate::options::CudaOptions;

/// One GPU and a stream: every copy and launch of a table runs on it, in order.
pub(crate) struct GpuDev {
    dev: Device,
    stream: Arc<CudaStream>,
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
        Ok(GpuDev { dev, stream })
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
        // SAFETY: the range lies inside `dst` (checked). `src` is pageable host memory,
        // which the driver has copied out when this call returns.
        unsafe { result::memcpy_htod_async(dst.ptr() + at as u64, src, self.stream.cu_stream()) }
            .drv("cuMemcpyHtoDAsync")
    }

    fn download(&self, dst: &mut [u8], src: &DevBuf, at: usize) -> Result<()> {
        self.dev.bind()?;
        if !dst.is_empty() {
            if at + dst.len() > src.bytes() {
                return Err(device_error(
                    "a byte-table download does not fit its buffer",
                ));
            }
            // SAFETY: the range lies inside `src` (checked); `dst` is pageable host memory,
            // filled before the stream is synchronized below.
            unsafe {
                result::memcpy_dtoh_async(dst, src.ptr() + at as u64, self.stream.cu_stream())
            }
            .drv("cuMemcpyDtoHAsync")?;
        }
        self.stream.synchronize().drv("cuStreamSynchronize")
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
