//! The shared stress suite (`kv_conformance::stress`) on the CPU backend, at the small
//! sizes. The CPU backend keeps no separate tombstone books, so `audit` is unsupported
//! and the trials check values, found flags, `contains` and `len` only.
kv_conformance::stress_main! {
    backend: "cpu",
    open: |cfg| Ok(Box::new(kv_backend_cpu::CpuBackend::open(cfg)?) as Box<dyn kv_core::KvBackend>),
    availability: || kv_conformance::Availability::Available,
    sizes: kv_conformance::stress::StressSizes::SMALL,
    extra: [("audit_is_unsupported", audit_is_unsupported)],
}

fn audit_is_unsupported() -> kv_conformance::stress::R {
    use kv_core::KvBackend;
    let t = kv_backend_cpu::CpuBackend::open(kv_core::TableConfig::new(16))?;
    match t.audit() {
        Err(kv_core::Error::Unsupported {
            backend: "cpu",
            what: "audit",
        }) => Ok(()),
        other => Err(format!("expected Unsupported, got {other:?}").into()),
    }
}
