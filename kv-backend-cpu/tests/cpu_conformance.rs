//! The conformance suite on the CPU backend.
kv_conformance::conformance_main! {
    backend: "cpu",
    open: |cfg| Ok(Box::new(kv_backend_cpu::CpuBackend::open(cfg)?) as Box<dyn kv_core::KvBackend>),
    availability: || kv_conformance::Availability::Available,
}
