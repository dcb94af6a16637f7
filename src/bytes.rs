//! Byte tables through the facade: [`open_bytes`] picks a backend as [`crate::open`] does.

use std::fmt;

use crate::{BackendKind, Options, Result};
use kv_core::{ByteConfig, ByteTable};

/// A byte table on the backend [`open_bytes`] chose, with the record of that choice. It
/// implements [`ByteTable`] by handing every call to that backend.
pub struct BytesTable {
    inner: Box<dyn ByteTable>,
    kind: BackendKind,
    skipped: Vec<(BackendKind, String)>,
}

impl BytesTable {
    /// The backend in use.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Each better backend that was not used, and why.
    pub fn skipped(&self) -> &[(BackendKind, String)] {
        &self.skipped
    }
}

impl fmt::Debug for BytesTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BytesTable")
            .field("kind", &self.kind)
            .field("description", &self.inner.describe())
            .finish()
    }
}

kv_core::forward_byte_table!(BytesTable, inner);

/// Opens a byte table on the backend `VRAMKV_BACKEND` forces (no fallback), or on the best
/// one that has byte tables, recording why each better one was skipped.
///
/// ```
/// use vramkv::{ByteConfig, ByteTable};
/// let t = vramkv::open_bytes(ByteConfig::new(1000))?;
/// t.put_slices(&[b"user:1", b"user:2", b"user:1"], &[b"ada", b"bob", b"alan"])?;
/// assert_eq!(
///     t.get_slices(&[b"user:1", b"user:3"])?,
///     [Some(b"alan".to_vec()), None]
/// );
/// # Ok::<(), vramkv::Error>(())
/// ```
pub fn open_bytes(cfg: ByteConfig) -> Result<BytesTable> {
    let options = Options {
        backend: crate::parse_choice(std::env::var(crate::BACKEND_ENV).ok().as_deref())?,
        ..Options::default()
    };
    open_bytes_with(cfg, &options)
}

/// Opens a byte table as `options` say: on their backend (no fallback), or on the best
/// available one that has byte tables.
pub fn open_bytes_with(cfg: ByteConfig, options: &Options) -> Result<BytesTable> {
    cfg.validate()?;
    let (inner, kind, skipped) = crate::choose(options, |kind, auto| {
        open_bytes_kind(kind, cfg.clone(), auto, options)
    })?;
    Ok(BytesTable {
        inner,
        kind,
        skipped,
    })
}

#[allow(unused_variables)]
fn open_bytes_kind(
    kind: BackendKind,
    cfg: ByteConfig,
    auto: bool,
    options: &Options,
) -> Result<Box<dyn ByteTable>> {
    match kind {
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => Ok(Box::new(kv_backend_cpu::CpuBytes::open(cfg)?)),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            let t = match kv_backend_wgpu::WgpuBytes::open_with(cfg, &options.wgpu) {
                Ok(t) => t,
                // A table that does not fit this adapter leaves the choice to the next
                // backend.
                Err(e @ crate::Error::OutOfDeviceMemory { .. }) if auto => {
                    return Err(crate::Error::BackendUnavailable {
                        backend: "wgpu",
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            };
            if auto && !t.is_discrete_gpu() {
                return Err(crate::Error::BackendUnavailable {
                    backend: "wgpu",
                    reason: format!("adapter {} is not a discrete GPU", t.adapter_name()),
                });
            }
            Ok(Box::new(t))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Box::new(kv_backend_cuda::CudaBytes::open_with(
            cfg,
            &options.cuda,
        )?)),
        #[allow(unreachable_patterns)]
        other => Err(crate::not_compiled(other)),
    }
}
