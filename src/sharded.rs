//! Sharded tables through the facade: one table over several devices or backends
//! ([`kv_shard::Sharded`], re-exported as [`Sharded`]).

use crate::{BackendKind, Error, KvBackend, Options, Result, TableConfig};
pub use kv_shard::{MAX_SHARDS, Sharded};

/// One shard of a sharded table: the backend it runs on and, for a GPU backend, the
/// device (`None`: the backend's own choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// The backend.
    pub kind: BackendKind,
    /// The device ordinal on that backend.
    pub device: Option<usize>,
}

impl ShardSpec {
    /// A shard on `kind`, on the device it chooses.
    pub fn on(kind: BackendKind) -> Self {
        Self { kind, device: None }
    }

    /// A shard on device `ordinal` of `kind`.
    pub fn on_device(kind: BackendKind, ordinal: usize) -> Self {
        Self {
            kind,
            device: Some(ordinal),
        }
    }
}

/// Opens a table of config `cfg` sharded over `shards` (see [`kv_shard`] for how keys are
/// placed and what holds across shards). Each shard is forced onto its backend, with no
/// fallback: a shard that cannot open is the error.
///
/// ```
/// use vramkv::{BackendKind, KvBackend, Options, ShardSpec, TableConfig};
/// let shards = [ShardSpec::on(BackendKind::Cpu); 3];
/// let t = vramkv::open_sharded(TableConfig::new(10_000), &shards, &Options::default())?;
/// t.put(&[1, 2, 3], &[10, 20, 30])?;
/// assert_eq!(t.len(), 3);
/// assert_eq!(t.shards().len(), 3);
/// # Ok::<(), vramkv::Error>(())
/// ```
pub fn open_sharded(cfg: TableConfig, shards: &[ShardSpec], options: &Options) -> Result<Sharded> {
    let open = |i: usize, mut c: TableConfig| -> Result<Box<dyn KvBackend>> {
        let s = shards[i];
        c.device = s.device.or(c.device);
        let t = crate::open_with(c, &options.clone().backend(s.kind))?;
        Ok(Box::new(t))
    };
    Sharded::open(cfg, shards.len(), &open)
}

/// The device ranking: every CUDA device vramkv's kernels run on, the one with the most
/// free memory first (what a table spread over every GPU uses, and what a larger batch
/// would move to). Empty without CUDA.
pub fn device_ranking() -> Vec<(usize, String, u64)> {
    #[cfg(feature = "cuda")]
    if let Ok(mut devs) = kv_backend_cuda::devices() {
        devs.retain(|d| d.supported());
        devs.sort_by(|a, b| {
            b.free_bytes
                .cmp(&a.free_bytes)
                .then(a.ordinal.cmp(&b.ordinal))
        });
        return devs
            .into_iter()
            .map(|d| (d.ordinal, d.name, d.free_bytes))
            .collect();
    }
    Vec::new()
}

/// Opens a table sharded over every CUDA device, in the order of [`device_ranking`]
/// (shards sized equally). No CUDA device is [`Error::BackendUnavailable`].
pub fn open_sharded_gpus(cfg: TableConfig, options: &Options) -> Result<Sharded> {
    let shards: Vec<ShardSpec> = device_ranking()
        .into_iter()
        .map(|(ordinal, _, _)| ShardSpec::on_device(BackendKind::Cuda, ordinal))
        .collect();
    if shards.is_empty() {
        return Err(Error::BackendUnavailable {
            backend: "cuda",
            reason: "no CUDA device to shard over".into(),
        });
    }
    open_sharded(cfg, &shards, options)
}
