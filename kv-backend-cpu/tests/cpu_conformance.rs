//! The conformance suite on the CPU backend, cache contract included: a cache config opens
//! a `CpuCache`, anything else a `CpuBackend`.
kv_conformance::conformance_main! {
    backend: "cpu",
    open: |cfg: kv_core::TableConfig| -> kv_core::Result<Box<dyn kv_core::KvBackend>> {
        if cfg.cache.is_some() {
            Ok(Box::new(kv_backend_cpu::CpuCache::open(cfg)?))
        } else {
            Ok(Box::new(kv_backend_cpu::CpuBackend::open(cfg)?))
        }
    },
    availability: || kv_conformance::Availability::Available,
    cache: true,
}
