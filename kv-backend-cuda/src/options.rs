//! [`CudaOptions`]: the tuning of a CUDA table, typed and checked.

use std::sync::Arc;

use kv_core::{Error, Result, check_option, env_flag, env_value};
use kv_staging::copy::{CopyMode, HOST_COPY_ENV};
use kv_staging::trace::Tracer;

/// How a CUDA table runs: the shape of its host pipeline, its launches, its host copies and
/// its trace. The defaults are what docs/PERF.md measured best; the other values exist to
/// measure against them. [`CudaBackend::open_with`](crate::CudaBackend::open_with) takes
/// them; [`from_env`](Self::from_env) reads them from `VRAMKV_*` variables, for tools (the
/// library itself never reads the environment for them).
///
/// ```
/// use kv_backend_cuda::CudaOptions;
/// use kv_staging::copy::CopyMode;
///
/// let o = CudaOptions::default().lanes(4).chunk_mib(16).host_copy(CopyMode::Cached);
/// o.validate()?;
/// assert!(CudaOptions::default().lanes(0).validate().is_err());
/// # Ok::<(), kv_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CudaOptions {
    /// Staging lanes per host batch, `1..=16` (default: 3 for a batch copied through the
    /// lanes, 4 for a lent page-locked batch). `VRAMKV_CUDA_LANES`.
    pub lanes: Option<usize>,
    /// The largest chunk of a batch in MiB of keys and values, `1..=256` (default: 32 for a
    /// batch copied through the lanes and for a device-resident put, 16 for a lent batch).
    /// `VRAMKV_CUDA_CHUNK_MIB`.
    pub chunk_mib: Option<usize>,
    /// The grid cap of every launch in blocks per multiprocessor, `1..=64` (default:
    /// [`kv_kernels::BLOCKS_PER_SM`]). `VRAMKV_BLOCKS_PER_SM`.
    pub blocks_per_sm: Option<u32>,
    /// The context's L2 fetch granularity limit in bytes (`CU_LIMIT_MAX_L2_FETCH_GRANULARITY`:
    /// 0, 32, 64 or 128; default: the driver's). It applies to the whole context, so to
    /// every table on the device, from the table that sets it on. `VRAMKV_L2_FETCH_BYTES`.
    pub l2_fetch_bytes: Option<u32>,
    /// How the host copies write the staging buffers. `VRAMKV_HOST_COPY=stream|cached`.
    pub host_copy: CopyMode,
    /// Where each batch reports where its time went (host phases for a host batch, device
    /// time per kernel for a device-resident one); none by default. `VRAMKV_CUDA_TRACE=1`
    /// traces to stderr.
    pub trace: Option<Tracer>,
    /// Kernel code to load instead of the built-in PTX, with the same entry points and
    /// argument layout: a development switch for comparing kernel variants with one binary
    /// (the `vramkv` CLI reads it from a file named by `VRAMKV_PTX`; `from_env` does not).
    /// It must be built from kv-kernels sources with this version's table layout
    /// (`kv_kernels::layout`: EMPTY = 0, TOMBSTONE = 1); only the entry points are checked.
    pub ptx: Option<Arc<str>>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            lanes: None,
            chunk_mib: None,
            blocks_per_sm: None,
            l2_fetch_bytes: None,
            host_copy: CopyMode::DEFAULT,
            trace: None,
            ptx: None,
        }
    }
}

/// Environment variable of [`CudaOptions::lanes`].
pub const LANES_ENV: &str = "VRAMKV_CUDA_LANES";
/// Environment variable of [`CudaOptions::chunk_mib`].
pub const CHUNK_ENV: &str = "VRAMKV_CUDA_CHUNK_MIB";
/// Environment variable of [`CudaOptions::blocks_per_sm`].
pub const BLOCKS_PER_SM_ENV: &str = "VRAMKV_BLOCKS_PER_SM";
/// Environment variable of [`CudaOptions::l2_fetch_bytes`].
pub const L2_FETCH_ENV: &str = "VRAMKV_L2_FETCH_BYTES";
/// Environment variable of [`CudaOptions::trace`] (`1`: to stderr).
pub const TRACE_ENV: &str = "VRAMKV_CUDA_TRACE";

fn invalid(what: impl std::fmt::Display) -> Error {
    Error::InvalidConfig(what.to_string())
}

impl CudaOptions {
    /// Sets [`lanes`](Self::lanes).
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = Some(lanes);
        self
    }
    /// Sets [`chunk_mib`](Self::chunk_mib).
    pub fn chunk_mib(mut self, mib: usize) -> Self {
        self.chunk_mib = Some(mib);
        self
    }
    /// Sets [`blocks_per_sm`](Self::blocks_per_sm).
    pub fn blocks_per_sm(mut self, blocks: u32) -> Self {
        self.blocks_per_sm = Some(blocks);
        self
    }
    /// Sets [`l2_fetch_bytes`](Self::l2_fetch_bytes).
    pub fn l2_fetch_bytes(mut self, bytes: u32) -> Self {
        self.l2_fetch_bytes = Some(bytes);
        self
    }
    /// Sets [`host_copy`](Self::host_copy).
    pub fn host_copy(mut self, mode: CopyMode) -> Self {
        self.host_copy = mode;
        self
    }
    /// Sets [`trace`](Self::trace).
    pub fn trace(mut self, tracer: Tracer) -> Self {
        self.trace = Some(tracer);
        self
    }
    /// Sets [`ptx`](Self::ptx).
    pub fn ptx(mut self, ptx: impl Into<Arc<str>>) -> Self {
        self.ptx = Some(ptx.into());
        self
    }

    /// Checks every value; a bad one is [`Error::InvalidConfig`] naming it.
    pub fn validate(&self) -> Result<()> {
        check_option("lanes", self.lanes, 1, 16)?;
        check_option("chunk_mib", self.chunk_mib, 1, 256)?;
        check_option("blocks_per_sm", self.blocks_per_sm, 1, 64)?;
        if let Some(b) = self.l2_fetch_bytes
            && ![0, 32, 64, 128].contains(&b)
        {
            return Err(invalid(format_args!(
                "l2_fetch_bytes {b} is not one of 0, 32, 64, 128"
            )));
        }
        Ok(())
    }

    /// The defaults, with each `VRAMKV_*` variable that is set read over them:
    /// `VRAMKV_CUDA_LANES`, `VRAMKV_CUDA_CHUNK_MIB`, `VRAMKV_BLOCKS_PER_SM`,
    /// `VRAMKV_L2_FETCH_BYTES`, `VRAMKV_HOST_COPY` (`stream` or `cached`) and
    /// `VRAMKV_CUDA_TRACE` (anything but `0`: trace to stderr). A value that does not parse
    /// or is out of range is [`Error::InvalidConfig`] naming the variable.
    pub fn from_env() -> Result<Self> {
        let mut o = CudaOptions {
            lanes: env_value(LANES_ENV)?,
            chunk_mib: env_value(CHUNK_ENV)?,
            blocks_per_sm: env_value(BLOCKS_PER_SM_ENV)?,
            l2_fetch_bytes: env_value(L2_FETCH_ENV)?,
            ..CudaOptions::default()
        };
        if let Ok(v) = std::env::var(HOST_COPY_ENV) {
            o.host_copy = CopyMode::parse(&v).ok_or_else(|| {
                invalid(format_args!(
                    "{HOST_COPY_ENV}={v:?}: expected `stream` or `cached`"
                ))
            })?;
        }
        if env_flag(TRACE_ENV) {
            o.trace = Some(Tracer::stderr());
        }
        o.validate()
            .map_err(|e| invalid(format_args!("{e} (from the environment)")))?;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_invalid_config() {
        let bad = [
            CudaOptions::default().lanes(17),
            CudaOptions::default().chunk_mib(0),
            CudaOptions::default().chunk_mib(257),
            CudaOptions::default().blocks_per_sm(0),
            CudaOptions::default().l2_fetch_bytes(48),
        ];
        for o in bad {
            assert!(
                matches!(o.validate(), Err(Error::InvalidConfig(_))),
                "{o:?}"
            );
        }
        CudaOptions::default()
            .lanes(16)
            .chunk_mib(256)
            .blocks_per_sm(64)
            .l2_fetch_bytes(128)
            .validate()
            .expect("valid");
    }
}
