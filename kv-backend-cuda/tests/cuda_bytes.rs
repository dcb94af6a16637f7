//! The byte-table suite (`kv_conformance::bytes`) on `CudaBytes`. Without a driver or device
//! every case is reported as ignored (after `skipped: ...`), unless `VRAMKV_REQUIRE_CUDA=1`.
kv_conformance::bytes_main! {
    backend: "cuda",
    open: |cfg| Ok(Box::new(kv_backend_cuda::CudaBytes::open(cfg)?) as Box<dyn kv_core::ByteTable>),
    availability: || kv_conformance::Availability::unless_missing(
        kv_backend_cuda::unavailable_reason(),
        kv_backend_cuda::REQUIRE_ENV,
        "no CUDA device",
    ),
}
