//! `vramkv bench --pinned`: the plain bench's workload through batches in page-locked
//! memory lent by the CUDA backend (`put_pinned` / `get_pinned`). Each batch is written
//! into the lent buffers before the timed calls (as a caller producing its keys in place
//! would), so the timings show the link and the device, not the host's copies.

use crate::workload::Batch;
use crate::{BatchResult, BenchArgs, print_batch};
use rayon::prelude::*;
use std::time::Instant;
use vramkv::cuda::{CudaBackend, CudaOptions};
use vramkv::{KvBackend, Result, TableConfig};

fn par_fill(dst: &mut [u64], src: &[u64]) {
    dst.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Runs the batches; returns the table's name and one result per batch.
pub fn run(
    a: &BenchArgs,
    cfg: TableConfig,
    options: &CudaOptions,
) -> Result<(String, Vec<BatchResult>)> {
    let table = CudaBackend::open_with(cfg, options)?;
    let d = table.describe();
    if !a.json {
        println!(
            "backend {} (pinned batches) on {} — {} items/batch, width {}",
            d.backend,
            d.device,
            a.items,
            a.width()
        );
    }
    let mut pb = table.pinned_batch(a.items)?;
    let mut results = Vec::new();
    for b in 0..a.batches {
        let batch = Batch::new(b, a.items, a.width(), a.seed);
        let (keys, values) = pb.keys_values_mut();
        par_fill(keys, &batch.keys);
        par_fill(values, &batch.values);
        let t0 = Instant::now();
        table.put_pinned(&pb)?;
        let put = t0.elapsed().as_secs_f64();
        pb.values_mut().par_iter_mut().for_each(|v| *v = u64::MAX);
        let t0 = Instant::now();
        table.get_pinned(&mut pb)?;
        let get = t0.elapsed().as_secs_f64();
        let found: Vec<bool> = pb.found().par_iter().map(|f| *f != 0).collect();
        let valid = batch.count_valid(pb.values(), &found);
        let r = BatchResult::new("cuda-pinned", b, a.items, put, get, valid);
        print_batch(&r, a.json);
        results.push(r);
    }
    Ok((format!("cuda, pinned batches ({})", d.device), results))
}
