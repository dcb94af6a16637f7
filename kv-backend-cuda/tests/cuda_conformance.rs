//! The conformance suite on the CUDA backend. Without a driver or device every case is
//! reported as ignored (after `skipped: ...`), unless `VRAMKV_REQUIRE_CUDA=1`.
kv_conformance::conformance_main! {
    backend: "cuda",
    open: |cfg| Ok(Box::new(kv_backend_cuda::CudaBackend::open(cfg)?) as Box<dyn kv_core::KvBackend>),
    availability: || kv_conformance::Availability::unless_missing(
        kv_backend_cuda::unavailable_reason(),
        kv_backend_cuda::REQUIRE_ENV,
        "no CUDA device",
    ),
}
