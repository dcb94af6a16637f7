//! The conformance suite on the wgpu backend. Without an adapter offering 64-bit atomics
//! every case is reported as ignored (after `skipped: ...`), unless `VRAMKV_REQUIRE_WGPU=1`.
kv_conformance::conformance_main! {
    backend: "wgpu",
    open: |cfg| Ok(Box::new(kv_backend_wgpu::WgpuBackend::open(cfg)?) as Box<dyn kv_core::KvBackend>),
    availability: || match kv_backend_wgpu::unavailable_reason() {
        None => kv_conformance::Availability::Available,
        Some(r) if std::env::var_os(kv_backend_wgpu::REQUIRE_ENV).is_some_and(|v| v != "0") => {
            kv_conformance::Availability::Fail(format!("no wgpu adapter: {r}"))
        }
        Some(r) => kv_conformance::Availability::Skip(format!("no wgpu adapter: {r}")),
    },
}
