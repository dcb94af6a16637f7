//! The byte-table suite (`kv_conformance::bytes`) on the CPU backend's `CpuBytes`.
kv_conformance::bytes_main! {
    backend: "cpu",
    open: |cfg| Ok(Box::new(kv_backend_cpu::CpuBytes::open(cfg)?) as Box<dyn kv_core::ByteTable>),
    availability: || kv_conformance::Availability::Available,
}
