//! # vramkv
//!
//! A batched key-value store whose table lives in GPU memory: VRAM used as a cache
//! tier below host RAM, fed by large batches. Keys are u64; values are rows of
//! 1 to 16 u64 words. One contract, [`KvBackend`], sits over three backends:
//!
//! | feature | backend | where the table lives |
//! |---|---|---|
//! | `cpu` (default) | [`BackendKind::Cpu`] | host RAM, all cores |
//! | `cuda` | [`BackendKind::Cuda`] | NVIDIA GPU memory, kernels written in Rust |
//! | `wgpu` | [`BackendKind::Wgpu`] | any Vulkan/Metal/DX12 GPU, WGSL shaders |
//!
//! [`open`] picks the best backend available: CUDA, then wgpu on a discrete GPU, then
//! CPU, and records why each better one was skipped ([`Table::skipped`]). The
//! environment variable `VRAMKV_BACKEND=cpu|cuda|wgpu` forces one; a forced backend
//! that cannot be used is an error, never a silent fallback. [`open_with`] takes
//! [`Options`] instead: the backend to force, and each GPU backend's tuning
//! ([`Options::from_env`] reads them all from `VRAMKV_*` variables, as the `vramkv` CLI
//! does; the library reads no tuning from the environment on its own).
//!
//! ```
//! use vramkv::{KvBackend, TableConfig};
//!
//! let table = vramkv::open(TableConfig::new(1_000_000))?;
//! table.put(&[1, 2, 3, 2], &[10, 20, 30, 21])?; // the last duplicate wins
//! let mut values = vec![0; 3];
//! let mut found = vec![false; 3];
//! table.get(&[2, 3, 4], &mut values, &mut found)?;
//! assert_eq!(values, [21, 30, 0]);
//! assert_eq!(found, [true, true, false]);
//! assert_eq!(table.delete(&[1, 1])?, 1);
//! println!("{} entries on {}", table.len(), table.describe().backend);
//! # Ok::<(), vramkv::Error>(())
//! ```
// A library reports through its results and its trace, never by printing.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub use kv_core::{
    ArenaStats, Audit, Binary, BinaryBuf, ByteConfig, ByteDescription, ByteImage, ByteLimits,
    ByteTable, CACHE_BUCKET_SLOTS, CacheConfig, CachePolicy, CachePut, CacheStats, Clock,
    DEFAULT_MAX_VALUE_BYTES, Description, DriverError, Error, Evicted, ImagePart, KvBackend,
    MAX_KEY_BYTES, MAX_LOAD_FACTOR, MAX_SLOTS, MAX_WIDTH, ManualClock, PutPlan, Result,
    SystemClock, TableConfig, TableImage, cache_capacity_for_budget, cache_slot_bytes, capacity_of,
    check_contains, check_get, check_put, check_take, plan_put, slots_for,
};
pub use kv_staging::trace::Tracer;

mod bytes;
mod persist;
mod sharded;
mod tiered;
pub use bytes::{BytesTable, open_bytes, open_bytes_with};
pub use kv_durable as durable;
pub use persist::{open_bytes_snapshot, open_snapshot, open_snapshot_as, save, save_bytes};
pub use sharded::{
    MAX_SHARDS, ShardSpec, Sharded, device_ranking, open_sharded, open_sharded_gpus,
};
pub use tiered::{TierStats, Tiered, TieredConfig};

#[cfg(feature = "cpu")]
pub use kv_backend_cpu as cpu;
#[cfg(feature = "cuda")]
pub use kv_backend_cuda as cuda;
#[cfg(feature = "wgpu")]
pub use kv_backend_wgpu as wgpu;

use std::fmt;

/// The environment variable that forces a backend.
pub const BACKEND_ENV: &str = "VRAMKV_BACKEND";

/// The backends vramkv knows, whether or not this build has them. More may come, so a
/// `match` on it needs a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// The parallel CPU table.
    Cpu,
    /// NVIDIA GPUs through the CUDA driver.
    Cuda,
    /// Any GPU through wgpu (Vulkan, Metal, DX12).
    Wgpu,
}

impl BackendKind {
    /// Every backend, best first: the order [`open`] tries them in.
    pub const ALL: [BackendKind; 3] = [BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu];

    /// The backend's short name.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// Whether this build was compiled with the backend's feature.
    pub fn compiled_in(self) -> bool {
        match self {
            BackendKind::Cpu => cfg!(feature = "cpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "wgpu" => Ok(BackendKind::Wgpu),
            other => Err(Error::InvalidConfig(format!(
                "unknown backend {other:?}; expected cpu, cuda or wgpu"
            ))),
        }
    }
}

/// A table on the backend [`open`] chose, with the record of that choice.
///
/// It implements [`KvBackend`] by handing every call to the chosen backend, optional ones
/// ([`KvBackend::audit`]) included.
pub struct Table {
    inner: Box<dyn KvBackend>,
    kind: BackendKind,
    skipped: Vec<(BackendKind, String)>,
}

impl Table {
    /// The backend in use.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }
    /// Each better backend that was not used, and why.
    pub fn skipped(&self) -> &[(BackendKind, String)] {
        &self.skipped
    }
    /// The backend itself, for its own inherent methods.
    pub fn backend(&self) -> &dyn KvBackend {
        &*self.inner
    }
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("kind", &self.kind)
            .field("description", &self.inner.describe())
            .finish()
    }
}

kv_core::forward_kv_backend!(Table, inner);

/// How [`open_with`] opens a table: the backend to force (none: the best available), and
/// the options of each GPU backend compiled in.
///
/// ```
/// use vramkv::{BackendKind, Options, TableConfig};
/// let options = Options::default().backend(BackendKind::Cpu);
/// let t = vramkv::open_with(TableConfig::new(16), &options)?;
/// assert_eq!(t.kind(), BackendKind::Cpu);
/// # Ok::<(), vramkv::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// The backend to use, with no fallback; `None` chooses the best available.
    pub backend: Option<BackendKind>,
    /// The CUDA backend's options.
    #[cfg(feature = "cuda")]
    pub cuda: kv_backend_cuda::CudaOptions,
    /// The wgpu backend's options.
    #[cfg(feature = "wgpu")]
    pub wgpu: kv_backend_wgpu::WgpuOptions,
}

impl Options {
    /// Forces `kind`.
    pub fn backend(mut self, kind: BackendKind) -> Self {
        self.backend = Some(kind);
        self
    }

    /// Sets the CUDA backend's options.
    #[cfg(feature = "cuda")]
    pub fn with_cuda(mut self, cuda: kv_backend_cuda::CudaOptions) -> Self {
        self.cuda = cuda;
        self
    }

    /// Sets the wgpu backend's options.
    #[cfg(feature = "wgpu")]
    pub fn with_wgpu(mut self, wgpu: kv_backend_wgpu::WgpuOptions) -> Self {
        self.wgpu = wgpu;
        self
    }

    /// The options the environment asks for: `VRAMKV_BACKEND` (`cpu`, `cuda`, `wgpu`, or
    /// `auto` / unset for the best available) and every compiled-in GPU backend's
    /// `from_env` (`VRAMKV_CUDA_*`, `VRAMKV_WGPU_*`, `VRAMKV_HOST_COPY`, ...). A value that
    /// does not parse is [`Error::InvalidConfig`] naming its variable.
    pub fn from_env() -> Result<Options> {
        Ok(Options {
            backend: parse_choice(std::env::var(BACKEND_ENV).ok().as_deref())?,
            #[cfg(feature = "cuda")]
            cuda: kv_backend_cuda::CudaOptions::from_env()?,
            #[cfg(feature = "wgpu")]
            wgpu: kv_backend_wgpu::WgpuOptions::from_env()?,
        })
    }
}

/// A `VRAMKV_BACKEND` value: `None`, `""` or `"auto"` choose automatically.
fn parse_choice(choice: Option<&str>) -> Result<Option<BackendKind>> {
    match choice.map(str::trim) {
        Some(v) if !v.is_empty() && !v.eq_ignore_ascii_case("auto") => Ok(Some(v.parse()?)),
        _ => Ok(None),
    }
}

/// Opens a table on the best available backend, or on the one `VRAMKV_BACKEND` forces,
/// with every backend's default options.
///
/// Automatic choice tries CUDA, then wgpu on a discrete GPU, then CPU, and keeps the
/// reason each better backend was skipped. A forced backend that cannot be used is an
/// error ([`Error::BackendUnavailable`]); it never falls back.
pub fn open(cfg: TableConfig) -> Result<Table> {
    open_with_choice(std::env::var(BACKEND_ENV).ok().as_deref(), cfg)
}

/// Opens a table as `options` say: on their backend (no fallback), or on the best
/// available one, with each backend's options.
pub fn open_with(cfg: TableConfig, options: &Options) -> Result<Table> {
    cfg.validate()?;
    let (inner, kind, skipped) = choose(options, |kind, auto| {
        open_kind(kind, cfg.clone(), auto, options)
    })?;
    Ok(Table {
        inner,
        kind,
        skipped,
    })
}

/// Each better backend that was not used, and why.
pub(crate) type Skipped = Vec<(BackendKind, String)>;

/// The rule every kind of table is opened by: `options`' backend when it names one (no
/// fallback), else the first of [`BackendKind::ALL`] that opens, with the reason each
/// better one was skipped. `open(kind, auto)` opens on `kind`; `auto` says the choice is
/// automatic (a backend may then decline, say a wgpu adapter that is not a discrete GPU).
/// Only a backend that cannot run or cannot open this kind of table is skipped; any other
/// error (a bad config) is the answer.
pub(crate) fn choose<T>(
    options: &Options,
    mut open: impl FnMut(BackendKind, bool) -> Result<T>,
) -> Result<(T, BackendKind, Skipped)> {
    if let Some(kind) = options.backend {
        return Ok((open(kind, false)?, kind, Vec::new()));
    }
    let mut skipped = Vec::new();
    for kind in BackendKind::ALL {
        match open(kind, true) {
            Ok(t) => return Ok((t, kind, skipped)),
            Err(
                e @ (Error::BackendUnavailable { .. }
                | Error::Device { .. }
                | Error::Unsupported { .. }),
            ) => skipped.push((kind, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    let reasons: Vec<String> = skipped.iter().map(|(k, r)| format!("{k}: {r}")).collect();
    Err(Error::BackendUnavailable {
        backend: "auto",
        reason: reasons.join("; "),
    })
}

/// [`open`] with the value of `VRAMKV_BACKEND` passed in: `None`, `""` or `"auto"` choose
/// automatically; a backend name forces that backend.
///
/// ```
/// use vramkv::{BackendKind, Error, TableConfig};
/// let t = vramkv::open_with_choice(Some("cpu"), TableConfig::new(16))?;
/// assert_eq!(t.kind(), BackendKind::Cpu);
/// let r = vramkv::open_with_choice(Some("tpu"), TableConfig::new(16));
/// assert!(matches!(r, Err(Error::InvalidConfig(_))));
/// # Ok::<(), Error>(())
/// ```
pub fn open_with_choice(choice: Option<&str>, cfg: TableConfig) -> Result<Table> {
    let options = Options {
        backend: parse_choice(choice)?,
        ..Options::default()
    };
    open_with(cfg, &options)
}

/// Opens a table on exactly this backend, with its default options; no fallback.
pub fn open_backend(kind: BackendKind, cfg: TableConfig) -> Result<Table> {
    open_with(cfg, &Options::default().backend(kind))
}

/// Opens a table on the best available backend, ignoring `VRAMKV_BACKEND`.
pub fn open_auto(cfg: TableConfig) -> Result<Table> {
    open_with(cfg, &Options::default())
}

fn not_compiled(kind: BackendKind) -> Error {
    Error::BackendUnavailable {
        backend: kind.name(),
        reason: format!("vramkv was built without the `{kind}` feature"),
    }
}

#[allow(unused_variables)]
fn open_kind(
    kind: BackendKind,
    cfg: TableConfig,
    auto: bool,
    options: &Options,
) -> Result<Box<dyn KvBackend>> {
    match kind {
        #[cfg(feature = "cpu")]
        BackendKind::Cpu if cfg.cache.is_some() => {
            Ok(Box::new(kv_backend_cpu::CpuCache::open(cfg)?))
        }
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => Ok(Box::new(kv_backend_cpu::CpuBackend::open(cfg)?)),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda if cfg.cache.is_some() => Ok(Box::new(
            kv_backend_cuda::CudaCache::open_with(cfg, &options.cuda)?,
        )),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Box::new(kv_backend_cuda::CudaBackend::open_with(
            cfg,
            &options.cuda,
        )?)),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu if cfg.cache.is_some() => {
            let t = kv_backend_wgpu::WgpuCache::open_with(cfg, &options.wgpu)?;
            if auto && !t.is_discrete_gpu() {
                return Err(Error::BackendUnavailable {
                    backend: "wgpu",
                    reason: format!("adapter {} is not a discrete GPU", t.adapter_name()),
                });
            }
            Ok(Box::new(t))
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            let t = kv_backend_wgpu::WgpuBackend::open_with(cfg, &options.wgpu)?;
            if auto && !t.is_discrete_gpu() {
                return Err(Error::BackendUnavailable {
                    backend: "wgpu",
                    reason: format!("adapter {} is not a discrete GPU", t.describe().device),
                });
            }
            Ok(Box::new(t))
        }
        #[allow(unreachable_patterns)]
        other => Err(not_compiled(other)),
    }
}

/// One line per backend: compiled in or not, and whether it opens here (and why not).
pub fn availability() -> Vec<(BackendKind, std::result::Result<String, String>)> {
    BackendKind::ALL
        .into_iter()
        .map(|kind| {
            let r = open_kind(kind, TableConfig::new(16), true, &Options::default())
                .map(|t| t.describe().device)
                .map_err(|e| e.to_string());
            (kind, r)
        })
        .collect()
}

/// The README's examples, run as doctests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// docs/durability.md's examples, run as doctests so that they stay true.
#[doc = include_str!("../docs/durability.md")]
#[cfg(doctest)]
pub struct DurabilityDoctests;
