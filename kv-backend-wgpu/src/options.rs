//! [`WgpuOptions`]: the tuning of a wgpu table, typed and checked.

use kv_core::{Error, Result, check_option, env_flag, env_value};
use kv_staging::trace::Tracer;

/// How a wgpu table runs: the size of its staging chunks, how its arrays are split into
/// segments and buffers, whether it probes in region order, its probe budget and its trace.
/// The defaults are what docs/PERF.md measured best; the other values exist to measure
/// against them and to exercise rare layouts in tests.
/// [`WgpuBackend::open_with`](crate::WgpuBackend::open_with) takes them;
/// [`from_env`](Self::from_env) reads them from `VRAMKV_*` variables, for tools (the library
/// itself never reads the environment for them).
///
/// ```
/// use kv_backend_wgpu::WgpuOptions;
///
/// let o = WgpuOptions::default().chunk_mib(16).region_order(true);
/// o.validate()?;
/// assert!(WgpuOptions::default().chunk_mib(0).validate().is_err());
/// # Ok::<(), kv_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WgpuOptions {
    /// The largest staging chunk in MiB of keys and values, `1..=4096` (default 64).
    /// `VRAMKV_WGPU_CHUNK_MIB`.
    pub chunk_mib: Option<usize>,
    /// The largest table segment (storage binding) in bytes, at least 8 words of a row
    /// (default: what the adapter allows). `VRAMKV_WGPU_SEGMENT_MIB` (in MiB).
    pub segment_bytes: Option<u64>,
    /// The largest buffer holding table segments in bytes, rounded down to a whole number
    /// of segments and at least one (default: [`DEFAULT_TABLE_BUFFER_BYTES`](crate::DEFAULT_TABLE_BUFFER_BYTES),
    /// or the adapter's largest buffer if smaller). Set to the segment size, every value
    /// segment is its own buffer. `VRAMKV_WGPU_TABLE_BUFFER_MIB` (in MiB).
    pub table_buffer_bytes: Option<u64>,
    /// Region-order probing forced on or off (default: on for tables of more than
    /// [`REGION_ORDER_MIN_SLOTS`](crate::REGION_ORDER_MIN_SLOTS) slots).
    /// `VRAMKV_WGPU_REGION_ORDER=0|1`.
    pub region_order: Option<bool>,
    /// The most slots one shader invocation probes per dispatch, at least 1 (default:
    /// [`CPU_PROBE_BUDGET`](crate::CPU_PROBE_BUDGET) on a software adapter,
    /// [`GPU_PROBE_BUDGET`](crate::GPU_PROBE_BUDGET) on a GPU; see
    /// [`WgpuBackend::set_probe_budget`](crate::WgpuBackend::set_probe_budget)).
    /// `VRAMKV_WGPU_PROBE_BUDGET`.
    pub probe_budget: Option<u32>,
    /// Where each batch reports where its time went (host phases, and the device time of
    /// each step where the adapter has timestamp queries); none by default.
    /// `VRAMKV_WGPU_TRACE=1` traces to stderr.
    pub trace: Option<Tracer>,
}

/// Environment variable of [`WgpuOptions::chunk_mib`].
pub const CHUNK_MIB_ENV: &str = "VRAMKV_WGPU_CHUNK_MIB";
/// Environment variable of [`WgpuOptions::segment_bytes`], in MiB.
pub const SEGMENT_MIB_ENV: &str = "VRAMKV_WGPU_SEGMENT_MIB";
/// Environment variable of [`WgpuOptions::table_buffer_bytes`], in MiB.
pub const TABLE_BUFFER_MIB_ENV: &str = "VRAMKV_WGPU_TABLE_BUFFER_MIB";
/// Environment variable of [`WgpuOptions::region_order`] (`0` or `1`).
pub const REGION_ORDER_ENV: &str = "VRAMKV_WGPU_REGION_ORDER";
/// Environment variable of [`WgpuOptions::probe_budget`].
pub const PROBE_BUDGET_ENV: &str = "VRAMKV_WGPU_PROBE_BUDGET";
/// Environment variable of [`WgpuOptions::trace`] (`1`: to stderr).
pub const TRACE_ENV: &str = "VRAMKV_WGPU_TRACE";

impl WgpuOptions {
    /// Sets [`chunk_mib`](Self::chunk_mib).
    pub fn chunk_mib(mut self, mib: usize) -> Self {
        self.chunk_mib = Some(mib);
        self
    }
    /// Sets [`segment_bytes`](Self::segment_bytes).
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = Some(bytes);
        self
    }
    /// Sets [`table_buffer_bytes`](Self::table_buffer_bytes).
    pub fn table_buffer_bytes(mut self, bytes: u64) -> Self {
        self.table_buffer_bytes = Some(bytes);
        self
    }
    /// Sets [`region_order`](Self::region_order).
    pub fn region_order(mut self, on: bool) -> Self {
        self.region_order = Some(on);
        self
    }
    /// Sets [`probe_budget`](Self::probe_budget).
    pub fn probe_budget(mut self, steps: u32) -> Self {
        self.probe_budget = Some(steps);
        self
    }
    /// Sets [`trace`](Self::trace).
    pub fn trace(mut self, tracer: Tracer) -> Self {
        self.trace = Some(tracer);
        self
    }

    /// Checks every value; a bad one is [`Error::InvalidConfig`] naming it.
    pub fn validate(&self) -> Result<()> {
        check_option("chunk_mib", self.chunk_mib, 1, 4096)?;
        check_option("segment_bytes", self.segment_bytes, 8, u64::MAX)?;
        check_option("table_buffer_bytes", self.table_buffer_bytes, 1, u64::MAX)?;
        check_option("probe_budget", self.probe_budget, 1, u32::MAX)?;
        Ok(())
    }

    /// The defaults, with each `VRAMKV_WGPU_*` variable that is set read over them:
    /// `VRAMKV_WGPU_CHUNK_MIB`, `VRAMKV_WGPU_SEGMENT_MIB`, `VRAMKV_WGPU_TABLE_BUFFER_MIB`,
    /// `VRAMKV_WGPU_REGION_ORDER` (`0` or `1`), `VRAMKV_WGPU_PROBE_BUDGET` and
    /// `VRAMKV_WGPU_TRACE` (anything but `0`: trace to stderr). A value that does not parse
    /// or is out of range is [`Error::InvalidConfig`] naming the variable.
    pub fn from_env() -> Result<Self> {
        let mib = |name| -> Result<Option<u64>> {
            match env_value::<u64>(name)? {
                Some(0) => Err(Error::InvalidConfig(format!("{name}=0: at least 1 MiB"))),
                m => Ok(m.map(|m| m.saturating_mul(1 << 20))),
            }
        };
        let region_order = match env_value::<u8>(REGION_ORDER_ENV)? {
            None => None,
            Some(0) => Some(false),
            Some(1) => Some(true),
            Some(v) => {
                return Err(Error::InvalidConfig(format!(
                    "{REGION_ORDER_ENV}={v}: expected 0 or 1"
                )));
            }
        };
        let o = WgpuOptions {
            chunk_mib: env_value(CHUNK_MIB_ENV)?,
            segment_bytes: mib(SEGMENT_MIB_ENV)?,
            table_buffer_bytes: mib(TABLE_BUFFER_MIB_ENV)?,
            region_order,
            probe_budget: env_value(PROBE_BUDGET_ENV)?,
            trace: env_flag(TRACE_ENV).then(Tracer::stderr),
        };
        o.validate()
            .map_err(|e| Error::InvalidConfig(format!("{e} (from the environment)")))?;
        Ok(o)
    }
}
