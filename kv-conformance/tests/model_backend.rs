//! The suite run against its own reference backend: proves that the cases are
//! satisfiable and that the macro works.
kv_conformance::conformance_main! {
    backend: "model",
    open: |cfg| Ok(Box::new(kv_conformance::doc_backend(cfg)?) as Box<dyn kv_core::KvBackend>),
    availability: || kv_conformance::Availability::Available,
}
