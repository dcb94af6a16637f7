//! The byte-table suite (`kv_conformance::bytes`) on `CudaBytes`'s driver and kernel code
//! run over host memory (`HostMirrorBytes`: the per-item functions of
//! `kv_kernels::ops::bytes` on host threads, driven exactly as `CudaBytes` drives the GPU),
//! so that the algorithms are checked without a GPU. (`cuda_bytes` runs the same cases on
//! `CudaBytes` itself when there is a device.)
kv_conformance::bytes_main! {
    backend: "cuda-host-mirror",
    open: |cfg| Ok(Box::new(kv_backend_cuda::HostMirrorBytes::open(cfg, 4 << 30)?) as Box<dyn kv_core::ByteTable>),
    availability: || kv_conformance::Availability::Available,
}
