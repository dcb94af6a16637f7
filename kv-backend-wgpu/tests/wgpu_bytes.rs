//! The byte-table suite (`kv_conformance::bytes`) on the wgpu backend's `WgpuBytes`.
//! Without an adapter offering 64-bit atomics every case is reported as ignored (after
//! `skipped: ...`), unless `VRAMKV_REQUIRE_WGPU=1`.
kv_conformance::bytes_main! {
    backend: "wgpu",
    open: |cfg| Ok(Box::new(kv_backend_wgpu::WgpuBytes::open(cfg)?) as Box<dyn kv_core::ByteTable>),
    availability: || kv_conformance::Availability::unless_missing(
        kv_backend_wgpu::unavailable_reason(),
        kv_backend_wgpu::REQUIRE_ENV,
        "no wgpu adapter",
    ),
}
