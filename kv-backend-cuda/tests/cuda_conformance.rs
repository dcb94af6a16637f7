//! The conformance suite on the CUDA backend, cache contract included: a cache config
//! opens a `CudaCache`, anything else a `CudaBackend`. Without a driver or device every
//! case is reported as ignored (after `skipped: ...`), unless `VRAMKV_REQUIRE_CUDA=1`.
kv_conformance::conformance_main! {
    backend: "cuda",
    open: |cfg: kv_core::TableConfig| -> kv_core::Result<Box<dyn kv_core::KvBackend>> {
        if cfg.cache.is_some() {
            Ok(Box::new(kv_backend_cuda::CudaCache::open(cfg)?))
        } else {
            Ok(Box::new(kv_backend_cuda::CudaBackend::open(cfg)?))
        }
    },
    availability: || kv_conformance::Availability::unless_missing(
        kv_backend_cuda::unavailable_reason(),
        kv_backend_cuda::REQUIRE_ENV,
        "no CUDA device",
    ),
    cache: true,
}
