//! The conformance suite on the CUDA backend. Without a driver or device every case is
//! reported as ignored (after `skipped: ...`), unless `VRAMKV_REQUIRE_CUDA=1`.
kv_conformance::conformance_main! {
    backend: "cuda",
    open: |cfg| Ok(Box::new(kv_backend_cuda::CudaBackend::open(cfg)?) as Box<dyn kv_core::KvBackend>),
    availability: || match kv_backend_cuda::unavailable_reason() {
        None => kv_conformance::Availability::Available,
        Some(r) if std::env::var_os(kv_backend_cuda::REQUIRE_ENV).is_some_and(|v| v != "0") => {
            kv_conformance::Availability::Fail(format!("no CUDA device: {r}"))
        }
        Some(r) => kv_conformance::Availability::Skip(format!("no CUDA device: {r}")),
    },
}
