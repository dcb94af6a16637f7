//! The driver layer: finding the driver and the devices, the per-device context and
//! kernels, and a table's view of its device ([`Device`]: its kernels, launch shape and
//! options).
//!
//! Everything here talks to the driver through cudarc's `result`/`sys` layers (plain
//! `CUresult`s, no panics) and turns every failure into a [`kv_core::Error`].

use std::ffi::{CString, c_void};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction, CUresult};
use cudarc::driver::{CudaContext, CudaStream, DriverError, result};
use kv_core::{Error, Result};
use kv_kernels::layout::{BatchArgs, BytesArgs, CacheArgs, RehashArgs, TableArgs};
use kv_staging::copy::CopyMode;
use kv_staging::trace::Tracer;

use crate::options::CudaOptions;
use crate::plan::Shapes;

pub(crate) const BACKEND: &str = "cuda";

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
    Error::driver(BACKEND, format!("{what}: {name} ({text})"), e)
}

/// An [`Error::Device`] for a broken invariant or misuse the backend found itself.
pub(crate) fn device_error(message: impl Into<String>) -> Error {
    Error::device(BACKEND, message)
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
    device_error("a CUDA backend lock was poisoned by a panic")
}

/// A kernel whose single parameter is an `A` (the `#[repr(C)]` struct shared with the device).
pub(crate) struct Kernel<A> {
    f: CUfunction,
    /// Blocks of [`WORKGROUP`](kv_kernels::layout::WORKGROUP) threads that one
    /// multiprocessor holds at once (asked of the driver at the first warp launch).
    resident: OnceLock<u32>,
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
    /// Put pass 1 for rows of `COOP_WIDTH` words or more (each written by a warp).
    pub put_place_wide: Kernel<BatchArgs>,
    pub put_settle: Kernel<BatchArgs>,
    pub put_dedup: Kernel<BatchArgs>,
    pub put_rewrite: Kernel<BatchArgs>,
    pub get: Kernel<BatchArgs>,
    pub contains: Kernel<BatchArgs>,
    pub count_missing: Kernel<BatchArgs>,
    pub delete: Kernel<BatchArgs>,
    pub rehash: Kernel<RehashArgs>,
    pub count: Kernel<TableArgs>,
    /// The cache-table kernels; `None` for PTX loaded through
    /// [`CudaOptions::ptx`](crate::CudaOptions::ptx) that lacks them.
    pub cache: Option<CacheKernels>,
    /// The byte-table kernels; `None` for PTX that lacks them.
    pub bytes: Option<BytesKernels>,
}

/// The kernels of byte tables (`kv_kernels::ops::bytes`).
pub(crate) struct BytesKernels {
    pub hash: Kernel<BytesArgs>,
    pub dedup: Kernel<BytesArgs>,
    pub lookup: Kernel<BytesArgs>,
    pub write: Kernel<BytesArgs>,
    pub get: Kernel<BytesArgs>,
    pub delete: Kernel<BytesArgs>,
    pub set_expiry: Kernel<BytesArgs>,
    pub purge: Kernel<BytesArgs>,
    pub gather: Kernel<BytesArgs>,
    pub moves: Kernel<BytesArgs>,
    pub rehash: Kernel<BytesArgs>,
}

/// The kernels of cache tables (`kv_kernels::ops::cache`).
pub(crate) struct CacheKernels {
    pub dedup: Kernel<CacheArgs>,
    pub put: Kernel<CacheArgs>,
    pub compact: Kernel<CacheArgs>,
    pub get: Kernel<CacheArgs>,
    pub take: Kernel<CacheArgs>,
    pub count: Kernel<CacheArgs>,
}

/// An open device: its (primary) context, the built-in kernels and what launches need.
pub(crate) struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub ordinal: usize,
    pub name: String,
    pub sm_count: u32,
    /// The kernels of kv-kernels' PTX.
    builtin: Arc<Kernels>,
    /// Kernels loaded from other PTX ([`CudaOptions::ptx`](crate::CudaOptions::ptx)), by source.
    loaded: Mutex<Vec<(Arc<str>, Arc<Kernels>)>>,
}

impl Gpu {
    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().drv("cuCtxSetCurrent")
    }

    /// The built-in kernels, or those of `ptx` (loaded once per device and source).
    pub fn kernels(&self, ptx: Option<&Arc<str>>) -> Result<Arc<Kernels>> {
        let Some(ptx) = ptx else {
            return Ok(self.builtin.clone());
        };
        let mut loaded = self.loaded.lock().map_err(|_| poisoned())?;
        if let Some((_, k)) = loaded.iter().find(|(src, _)| **src == **ptx) {
            return Ok(k.clone());
        }
        self.bind()?;
        let k = Arc::new(load_kernels(ptx)?);
        loaded.push((ptx.clone(), k.clone()));
        Ok(k)
    }

    /// Fails unless `stream` (that of a device-resident batch's buffer) belongs to this
    /// device's context.
    pub fn check_context(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            Err(device_error(
                "the device buffers belong to another CUDA context",
            ))
        } else {
            Ok(())
        }
    }

    /// Sets the context's L2 fetch granularity limit (context-wide).
    pub fn set_l2_fetch(&self, bytes: u32) -> Result<()> {
        self.bind()?;
        // SAFETY: the device's context is current on this thread; a limit is a plain value.
        unsafe {
            sys::cuCtxSetLimit(
                sys::CUlimit::CU_LIMIT_MAX_L2_FETCH_GRANULARITY,
                bytes as usize,
            )
        }
        .result()
        .map_err(|e| drv("cuCtxSetLimit(MAX_L2_FETCH_GRANULARITY)", e))
    }
}

/// A table's view of its device, from its options: the device, the kernels it launches,
/// its grid cap, its pipeline's shapes, its host copies' mode and its tracer.
pub(crate) struct Device {
    pub gpu: Arc<Gpu>,
    pub k: Arc<Kernels>,
    /// Grid cap in blocks per multiprocessor.
    pub blocks_per_sm: u32,
    pub shapes: Shapes,
    pub copy: CopyMode,
    pub trace: Option<Tracer>,
}

impl std::ops::Deref for Device {
    type Target = Gpu;
    fn deref(&self) -> &Gpu {
        &self.gpu
    }
}

impl Device {
    /// The device `gpu` as a table with `options` sees it (loading its kernels if they are
    /// not the built-in ones, and setting the context's L2 fetch limit if they ask).
    pub fn new(gpu: Arc<Gpu>, o: &CudaOptions) -> Result<Device> {
        if let Some(bytes) = o.l2_fetch_bytes {
            gpu.set_l2_fetch(bytes)?;
        }
        Ok(Device {
            k: gpu.kernels(o.ptx.as_ref())?,
            gpu,
            blocks_per_sm: o.blocks_per_sm.unwrap_or(kv_kernels::BLOCKS_PER_SM),
            shapes: Shapes::new(o),
            copy: o.host_copy,
            trace: o.trace.clone(),
        })
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
        self.launch_grid(k, args, grid, stream)
    }

    /// Launches a warp-cooperative kernel `k` (a warp per item: the cache puts and takes of
    /// `kv_kernels::ops::cache`) over `items` items on `stream`: `32 * items` threads, at
    /// most as many blocks as the multiprocessors hold at once (one wave: the kernels are
    /// grid-stride loops, and a warp per item wants every warp the GPU can keep in flight).
    pub fn launch_warps<A: Copy>(
        &self,
        k: &Kernel<A>,
        args: &A,
        items: u64,
        stream: &CudaStream,
    ) -> Result<()> {
        self.launch_lanes(k, args, items, 32, stream)
    }

    /// Launches a group-cooperative kernel `k` (`GROUP_LANES` lanes per item: the cache
    /// lookups) over `items` items on `stream`, in one wave as [`Device::launch_warps`].
    pub fn launch_groups<A: Copy>(
        &self,
        k: &Kernel<A>,
        args: &A,
        items: u64,
        stream: &CudaStream,
    ) -> Result<()> {
        let lanes = u64::from(kv_kernels::layout::GROUP_LANES);
        self.launch_lanes(k, args, items, lanes, stream)
    }

    /// `lanes` threads per item, in one wave of the blocks the GPU holds at once.
    fn launch_lanes<A: Copy>(
        &self,
        k: &Kernel<A>,
        args: &A,
        items: u64,
        lanes: u64,
        stream: &CudaStream,
    ) -> Result<()> {
        let per_sm = match k.resident.get() {
            Some(b) => *b,
            None => {
                let mut blocks = 0i32;
                // SAFETY: `k.f` is a function of a loaded module of this context; `blocks`
                // receives the count.
                unsafe {
                    sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                        &mut blocks,
                        k.f,
                        kv_kernels::layout::WORKGROUP as i32,
                        0,
                    )
                }
                .result()
                .map_err(|e| drv("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?;
                *k.resident.get_or_init(|| blocks.max(1) as u32)
            }
        };
        let grid = kv_kernels::grid_size_per_sm(items.saturating_mul(lanes), self.sm_count, per_sm);
        self.launch_grid(k, args, grid, stream)
    }

    /// Launches `k` with `args` on `grid` blocks on `stream`.
    fn launch_grid<A: Copy>(
        &self,
        k: &Kernel<A>,
        args: &A,
        grid: u32,
        stream: &CudaStream,
    ) -> Result<()> {
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

/// The open device for `cfg`'s device (or the default: the supported GPU with the most free
/// memory, chosen once per process).
pub(crate) fn gpu(cfg: &kv_core::TableConfig) -> Result<Arc<Gpu>> {
    let reg = registry()?;
    let ordinal = match cfg.device_among(reg.count, "CUDA")? {
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
    let builtin = Arc::new(load_kernels(kv_kernels::PTX)?);
    Ok(Gpu {
        ctx,
        ordinal,
        name: info.name,
        sm_count,
        builtin,
        loaded: Mutex::new(Vec::new()),
    })
}

/// Loads `ptx` in the current context and looks every kernel up.
fn load_kernels(ptx: &str) -> Result<Kernels> {
    let module = load_module(ptx)?;
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
            resident: OnceLock::new(),
            _args: PhantomData,
        }
    }
    let kernels = Kernels {
        put_place: k(f(n::PUT_PLACE)?),
        put_place_wide: k(f(n::PUT_PLACE_WIDE)?),
        put_settle: k(f(n::PUT_SETTLE)?),
        put_dedup: k(f(n::PUT_DEDUP)?),
        put_rewrite: k(f(n::PUT_REWRITE)?),
        get: k(f(n::GET)?),
        contains: k(f(n::CONTAINS)?),
        count_missing: k(f(n::COUNT_MISSING)?),
        delete: k(f(n::DELETE)?),
        rehash: k(f(n::REHASH)?),
        count: k(f(n::COUNT)?),
        cache: (|| {
            Ok::<_, Error>(CacheKernels {
                dedup: k(f(n::CACHE_DEDUP)?),
                put: k(f(n::CACHE_PUT)?),
                compact: k(f(n::CACHE_COMPACT)?),
                get: k(f(n::CACHE_GET)?),
                take: k(f(n::CACHE_TAKE)?),
                count: k(f(n::CACHE_COUNT)?),
            })
        })()
        .ok(),
        bytes: (|| {
            Ok::<_, Error>(BytesKernels {
                hash: k(f(n::BYTES_HASH)?),
                dedup: k(f(n::BYTES_DEDUP)?),
                lookup: k(f(n::BYTES_LOOKUP)?),
                write: k(f(n::BYTES_WRITE)?),
                get: k(f(n::BYTES_GET)?),
                delete: k(f(n::BYTES_DELETE)?),
                set_expiry: k(f(n::BYTES_SET_EXPIRY)?),
                purge: k(f(n::BYTES_PURGE)?),
                gather: k(f(n::BYTES_GATHER)?),
                moves: k(f(n::BYTES_MOVE)?),
                rehash: k(f(n::BYTES_REHASH)?),
            })
        })()
        .ok(),
    };
    Ok(kernels)
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
                Error::Device {
                    backend,
                    message,
                    source,
                } => Error::Device {
                    backend,
                    message: format!("{message}: {text}"),
                    source,
                },
                other => other,
            })
        }
    }
}
