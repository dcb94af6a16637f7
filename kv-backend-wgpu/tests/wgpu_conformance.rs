//! The conformance suite on the wgpu backend, cache contract included (`WgpuCache` for a
//! cache config). Without an adapter offering 64-bit atomics every case is reported as
//! ignored (after `skipped: ...`), unless `VRAMKV_REQUIRE_WGPU=1`.
kv_conformance::conformance_main! {
    backend: "wgpu",
    open: |cfg: kv_core::TableConfig| -> kv_core::Result<Box<dyn kv_core::KvBackend>> {
        if cfg.cache.is_some() {
            Ok(Box::new(kv_backend_wgpu::WgpuCache::open(cfg)?))
        } else {
            Ok(Box::new(kv_backend_wgpu::WgpuBackend::open(cfg)?))
        }
    },
    availability: || kv_conformance::Availability::unless_missing(
        kv_backend_wgpu::unavailable_reason(),
        kv_backend_wgpu::REQUIRE_ENV,
        "no wgpu adapter",
    ),
    cache: true,
}
