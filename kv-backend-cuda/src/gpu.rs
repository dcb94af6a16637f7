//! The driver layer: finding the driver, the per-device context and kernels, and the
//! device and pinned host buffers the table and its staging lanes are made of.
//!
//! Everything here talks to the driver through cudarc's `result`/`sys` layers (plain
//! `CUresult`s, no panics) and turns every failure into a [`kv_core::Error`].

use std::ffi::{CString, c_void};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute, CUdeviceptr, CUfunction, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError, result};
use kv_core::{Error, Result};
use kv_kernels::layout::{BatchArgs, RehashArgs, TableArgs};

pub(crate) const BACKEND: &str = "cuda";

/// Set this environment variable (to anything but `0`) to make the CUDA backend report
/// itself unavailable, e.g. to exercise the CPU fallback on a GPU machine.
pub const DISABLE_ENV: &str = "VRAMKV_CUDA_DISABLE";

/// Kernel development knobs, read once when a device is opened (unset: the defaults).
///
/// - `VRAMKV_PTX=<file>`: load this PTX instead of the built-in kernels (same entry points
///   and argument layout; for comparing kernel variants with one binary).
/// - `VRAMKV_BLOCKS_PER_SM=<n>`: grid cap of every launch in blocks per multiprocessor
///   (default [`kv_kernels::BLOCKS_PER_SM`]).
/// - `VRAMKV_L2_FETCH_BYTES=<n>`: the context's L2 fetch granularity limit
///   (`CU_LIMIT_MAX_L2_FETCH_GRANULARITY`; the driver's default when unset).
pub const PTX_ENV: &str = "VRAMKV_PTX";
/// See [`PTX_ENV`].
pub const BLOCKS_PER_SM_ENV: &str = "VRAMKV_BLOCKS_PER_SM";
/// See [`PTX_ENV`].
pub const L2_FETCH_ENV: &str = "VRAMKV_L2_FETCH_BYTES";

fn env_u32(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Every driver entry point vramkv may call (directly or through cudarc). They are looked
/// up before the first call so that an old driver is reported as unavailable instead of
/// making cudarc panic on a missing symbol.
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemGetInfo_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemsetD8Async",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuModuleLoadDataEx",
    "cuModuleGetFunction",
    "cuLaunchKernel",
    "cuCtxSetLimit",
    "cuGetErrorName",
    "cuGetErrorString",
];

pub(crate) fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// A driver error as a vramkv error.
pub(crate) fn drv(what: &str, e: DriverError) -> Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Error::OutOfDeviceMemory {
            backend: BACKEND,
            requested_bytes: 0,
        };
    }
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::Device {
        backend: BACKEND,
        message: format!("{what}: {name} ({text})"),
    }
}

/// Extension to map driver results with a context string.
pub(crate) trait Drv<T> {
    fn drv(self, what: &str) -> Result<T>;
}
impl<T> Drv<T> for std::result::Result<T, DriverError> {
    fn drv(self, what: &str) -> Result<T> {
        self.map_err(|e| drv(what, e))
    }
}

/// What the process knows about the driver: found once, then shared.
struct Registry {
    count: usize,
    gpus: Mutex<Vec<Option<Arc<Gpu>>>>,
    default: OnceLock<usize>,
}

fn registry() -> Result<&'static Registry> {
    static REG: OnceLock<std::result::Result<Registry, String>> = OnceLock::new();
    if std::env::var_os(DISABLE_ENV).is_some_and(|v| v != "0") {
        return Err(unavailable(format!("disabled by {DISABLE_ENV}")));
    }
    let reg = REG.get_or_init(|| {
        // cudarc panics when the library or a symbol is missing; we check first, and still
        // catch a panic so that no driver oddity can take the process down.
        std::panic::catch_unwind(probe_driver)
            .unwrap_or_else(|_| Err("the CUDA driver library failed to load".into()))
    });
    reg.as_ref().map_err(|r| unavailable(r.clone()))
}

fn probe_driver() -> std::result::Result<Registry, String> {
    // SAFETY: only tries to dlopen the driver library; no driver call is made.
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "the NVIDIA driver library (libcuda.so) was not found; install the NVIDIA driver \
                    or add its directory to LD_LIBRARY_PATH"
                .into(),
        );
    }
    // SAFETY: the library is present (checked above), so culib() loads it without panicking.
    let lib = unsafe { sys::culib() };
    for name in SYMBOLS {
        // SAFETY: looks a symbol up without calling it.
        if unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err() {
            return Err(format!(
                "the NVIDIA driver is too old: it lacks {name} (CUDA 12 driver or newer needed)"
            ));
        }
    }
    result::init().map_err(|e| format!("cuInit failed: {e}"))?;
    let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
    if count <= 0 {
        return Err("no CUDA device".into());
    }
    let count = count as usize;
    Ok(Registry {
        count,
        gpus: Mutex::new(vec![None; count]),
        default: OnceLock::new(),
    })
}

/// Whether a CUDA driver and at least one device are present (no context is created).
pub fn is_available() -> bool {
    registry().is_ok()
}

/// One CUDA device as `vramkv info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The driver's ordinal (what [`kv_core::TableConfig::device`] takes).
    pub ordinal: usize,
    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total device memory in bytes.
    pub total_bytes: u64,
    /// Free device memory in bytes at the time of the call.
    pub free_bytes: u64,
    /// Compute capability (major, minor). vramkv needs 7.0 or newer.
    pub compute_capability: (u32, u32),
}

impl DeviceInfo {
    /// Whether vramkv's kernels run on this device (compute capability 7.0 or newer).
    pub fn supported(&self) -> bool {
        self.compute_capability.0 >= 7
    }
}

fn attribute(dev: sys::CUdevice, a: CUdevice_attribute) -> Result<i32> {
    // SAFETY: dev is a valid device handle from cuDeviceGet.
    unsafe { result::device::get_attribute(dev, a) }.drv("cuDeviceGetAttribute")
}

/// Name, total memory and compute capability: no context needed.
fn device_static_info(ordinal: usize) -> Result<DeviceInfo> {
    let dev = result::device::get(ordinal as i32).drv("cuDeviceGet")?;
    let name = result::device::get_name(dev).drv("cuDeviceGetName")?;
    // SAFETY: dev is a valid device handle.
    let total = unsafe { result::device::total_mem(dev) }.drv("cuDeviceTotalMem")? as u64;
    let major = attribute(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
    )? as u32;
    let minor = attribute(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
    )? as u32;
    Ok(DeviceInfo {
        ordinal,
        name,
        total_bytes: total,
        free_bytes: 0,
        compute_capability: (major, minor),
    })
}

fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    let mut info = device_static_info(ordinal)?;
    // Free memory needs a context: reuse ours if the device is open, else retain the primary
    // context for the query (the driver refcounts it; released when `ctx` drops).
    let reg = registry()?;
    let open = reg.gpus.lock().map_err(|_| poisoned())?[ordinal].clone();
    let ctx = match open {
        Some(g) => g.ctx.clone(),
        None => CudaContext::new(ordinal).drv("cuDevicePrimaryCtxRetain")?,
    };
    info.free_bytes = ctx.mem_get_info().drv("cuMemGetInfo")?.0 as u64;
    Ok(info)
}

/// Every CUDA device with its memory, most free memory first (the order in which the
/// backend would pick them). Fails with [`Error::BackendUnavailable`] when there is no
/// driver or no device.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let reg = registry()?;
    let mut all = (0..reg.count)
        .map(device_info)
        .collect::<Result<Vec<_>>>()?;
    all.sort_by(|a, b| {
        b.free_bytes
            .cmp(&a.free_bytes)
            .then(a.ordinal.cmp(&b.ordinal))
    });
    Ok(all)
}

fn poisoned() -> Error {
    Error::Device {
        backend: BACKEND,
        message: "a CUDA backend lock was poisoned by a panic".into(),
    }
}

/// A kernel whose single parameter is an `A` (the `#[repr(C)]` struct shared with the device).
pub(crate) struct Kernel<A> {
    f: CUfunction,
    _args: PhantomData<fn(A)>,
}

// SAFETY: a CUfunction handle may be used from any thread once its module is loaded; the
// module is never unloaded (the Gpu lives for the process).
unsafe impl<A> Send for Kernel<A> {}
// SAFETY: as above; launching does not mutate the handle.
unsafe impl<A> Sync for Kernel<A> {}

/// The kernels of kv-kernels' PTX, loaded in one context.
pub(crate) struct Kernels {
    pub put_place: Kernel<BatchArgs>,
    pub put_settle: Kernel<BatchArgs>,
    pub put_dedup: Kernel<BatchArgs>,
    pub put_rewrite: Kernel<BatchArgs>,
    pub get: Kernel<BatchArgs>,
    pub contains: Kernel<BatchArgs>,
    pub delete: Kernel<BatchArgs>,
    pub rehash: Kernel<RehashArgs>,
    pub count: Kernel<TableArgs>,
}

/// An open device: its (primary) context, the loaded kernels and what launches need.
pub(crate) struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub ordinal: usize,
    pub name: String,
    pub sm_count: u32,
    /// Grid cap in blocks per multiprocessor.
    pub blocks_per_sm: u32,
    pub k: Kernels,
}

impl Gpu {
    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().drv("cuCtxSetCurrent")
    }

    /// Launches `k` with `args` over `items` items (grid-stride) on `stream`.
    pub fn launch<A: Copy>(
        &self,
        k: &Kernel<A>,
        args: &A,
        items: u64,
        stream: &CudaStream,
    ) -> Result<()> {
        let grid = kv_kernels::grid_size_per_sm(items, self.sm_count, self.blocks_per_sm);
        let mut params = [args as *const A as *mut c_void];
        // SAFETY: `k` takes exactly one parameter of type `A` (the Kernel<A> type ties each
        // handle to its argument struct); the driver copies the parameter at this call;
        // the device addresses inside `args` are valid for the sizes they describe (callers).
        unsafe {
            result::launch_kernel(
                k.f,
                (grid, 1, 1),
                (kv_kernels::layout::WORKGROUP, 1, 1),
                0,
                stream.cu_stream(),
                &mut params,
            )
        }
        .drv("cuLaunchKernel")
    }
}

/// The open device for `cfg_device` (or the default: the supported GPU with the most free
/// memory, chosen once per process).
pub(crate) fn gpu(cfg_device: Option<usize>) -> Result<Arc<Gpu>> {
    let reg = registry()?;
    let ordinal = match cfg_device {
        Some(o) if o >= reg.count => {
            return Err(Error::InvalidConfig(format!(
                "CUDA device {o} does not exist; this machine has {} (ordinals 0..{})",
                reg.count, reg.count
            )));
        }
        Some(o) => o,
        None => match reg.default.get() {
            Some(o) => *o,
            // One GPU: nothing to rank (open_gpu still checks it is supported).
            None if reg.count == 1 => *reg.default.get_or_init(|| 0),
            None => {
                let mut best: Option<(u64, usize)> = None;
                let mut reasons = Vec::new();
                for i in 0..reg.count {
                    match device_info(i) {
                        Ok(d) if d.supported() => {
                            if best.is_none_or(|(f, _)| d.free_bytes > f) {
                                best = Some((d.free_bytes, i));
                            }
                        }
                        Ok(d) => reasons.push(format!(
                            "device {i} ({}) has compute capability {}.{}, vramkv needs 7.0+",
                            d.name, d.compute_capability.0, d.compute_capability.1
                        )),
                        Err(e) => reasons.push(format!("device {i}: {e}")),
                    }
                }
                let Some((_, o)) = best else {
                    return Err(unavailable(format!(
                        "no usable CUDA device: {}",
                        reasons.join("; ")
                    )));
                };
                *reg.default.get_or_init(|| o)
            }
        },
    };
    let mut gpus = reg.gpus.lock().map_err(|_| poisoned())?;
    if let Some(g) = &gpus[ordinal] {
        return Ok(g.clone());
    }
    let g = Arc::new(open_gpu(ordinal)?);
    gpus[ordinal] = Some(g.clone());
    Ok(g)
}

fn open_gpu(ordinal: usize) -> Result<Gpu> {
    let info = device_static_info(ordinal)?;
    if !info.supported() {
        return Err(unavailable(format!(
            "CUDA device {ordinal} ({}) has compute capability {}.{}; vramkv's kernels need 7.0 (Volta) or newer",
            info.name, info.compute_capability.0, info.compute_capability.1
        )));
    }
    let ctx = CudaContext::new(ordinal).drv("cuDevicePrimaryCtxRetain")?;
    ctx.bind_to_thread().drv("cuCtxSetCurrent")?;
    let dev = result::device::get(ordinal as i32).drv("cuDeviceGet")?;
    let sm_count = attribute(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )?
    .max(1) as u32;
    if let Some(bytes) = env_u32(L2_FETCH_ENV) {
        // SAFETY: the device's context is current on this thread; a limit is a plain value.
        unsafe {
            sys::cuCtxSetLimit(
                sys::CUlimit::CU_LIMIT_MAX_L2_FETCH_GRANULARITY,
                bytes as usize,
            )
        }
        .result()
        .map_err(|e| drv("cuCtxSetLimit(MAX_L2_FETCH_GRANULARITY)", e))?;
    }
    let module = match std::env::var_os(PTX_ENV) {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| unavailable(format!("{PTX_ENV}={}: {e}", path.to_string_lossy())))?;
            load_module(&text)?
        }
        None => load_module(kv_kernels::PTX)?,
    };
    let f = |name: &str| -> Result<CUfunction> {
        let c = CString::new(name).map_err(|_| unavailable("bad kernel name"))?;
        // SAFETY: module is a loaded module of the current context.
        unsafe { result::module::get_function(module, c) }
            .drv(&format!("cuModuleGetFunction({name})"))
    };
    use kv_kernels::names as n;
    fn k<A>(f: CUfunction) -> Kernel<A> {
        Kernel {
            f,
            _args: PhantomData,
        }
    }
    let kernels = Kernels {
        put_place: k(f(n::PUT_PLACE)?),
        put_settle: k(f(n::PUT_SETTLE)?),
        put_dedup: k(f(n::PUT_DEDUP)?),
        put_rewrite: k(f(n::PUT_REWRITE)?),
        get: k(f(n::GET)?),
        contains: k(f(n::CONTAINS)?),
        delete: k(f(n::DELETE)?),
        rehash: k(f(n::REHASH)?),
        count: k(f(n::COUNT)?),
    };
    Ok(Gpu {
        ctx,
        ordinal,
        name: info.name,
        sm_count,
        blocks_per_sm: env_u32(BLOCKS_PER_SM_ENV)
            .filter(|b| *b > 0)
            .unwrap_or(kv_kernels::BLOCKS_PER_SM),
        k: kernels,
    })
}

/// Loads the PTX (JIT-compiled by the driver for this GPU), keeping the JIT's error log.
fn load_module(ptx: &str) -> Result<sys::CUmodule> {
    let src = CString::new(ptx).map_err(|_| unavailable("the PTX contains a NUL byte"))?;
    let mut log = vec![0u8; 16 * 1024];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    let mut values = [log.as_mut_ptr() as *mut c_void, log.len() as *mut c_void];
    let mut module = std::mem::MaybeUninit::uninit();
    // SAFETY: src is a NUL-terminated PTX image; options/values are two matching entries
    // (a buffer and its size, passed by value as the driver expects); module receives the handle.
    let r = unsafe {
        sys::cuModuleLoadDataEx(
            module.as_mut_ptr(),
            src.as_ptr() as *const c_void,
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    match r.result() {
        // SAFETY: success means the driver wrote the module handle.
        Ok(()) => Ok(unsafe { module.assume_init() }),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let err = drv("cuModuleLoadDataEx (JIT of kv-kernels' PTX)", e);
            Err(match err {
                Error::Device { backend, message } => Error::Device {
                    backend,
                    message: format!("{message}: {text}"),
                },
                other => other,
            })
        }
    }
}

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
    /// The context the memory is page-locked for.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: ptr holds len initialised elements (zeroed at allocation). Callers only
        // read after the lane's event says the device finished writing.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above; callers only write after the lane's event says the device
        // finished reading.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    /// Enqueues a copy of the first `n` elements to `dst` on `stream`.
    pub fn htod(&self, dst: u64, n: usize, stream: &CudaStream) -> Result<()> {
        let n = n.min(self.len);
        htod_slice(dst, &self.as_slice()[..n], stream)
    }
    /// Enqueues a copy of `n` elements from `src` into the first `n` elements on `stream`.
    pub fn dtoh(&mut self, src: u64, n: usize, stream: &CudaStream) -> Result<()> {
        let n = n.min(self.len);
        dtoh_slice(&mut self.as_mut_slice()[..n], src, stream)
    }
}

/// Enqueues a copy of `src` to the device address `dst` on `stream`.
///
/// Callers (this crate only) pass page-locked memory (a [`Pinned`] buffer's elements) that
/// stays allocated and unwritten until the stream has passed the copy, and a `dst` that
/// holds `src.len()` elements.
pub(crate) fn htod_slice<T: Copy>(dst: u64, src: &[T], stream: &CudaStream) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: see above: the source is page-locked and outlives the copy (callers wait for
    // the stream before releasing or rewriting it); dst holds src.len() elements.
    unsafe { result::memcpy_htod_async(dst, src, stream.cu_stream()) }.drv("cuMemcpyHtoDAsync")
}

/// Enqueues a copy from the device address `src` into `dst` on `stream`.
///
/// As for [`htod_slice`]: `dst` is page-locked and is neither read nor released until the
/// stream has passed the copy; `src` holds `dst.len()` elements.
pub(crate) fn dtoh_slice<T: Copy>(dst: &mut [T], src: u64, stream: &CudaStream) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: see above.
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
