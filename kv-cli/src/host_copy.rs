//! `vramkv bench --host-copy`: the host's parallel copy rate, which bounds PUT and GET from a
//! `Vec` on the CUDA backend: every key and value crosses the host once more than the link,
//! between the caller's slices and page-locked staging buffers (`kv_staging::copy`), a put
//! 16 bytes a key (width 1) and a get 17 (the key in; the value and found flag out).
//!
//! It copies `--items` u64 words with both copy modes, from one ordinary `Vec` into another
//! and, when the CUDA backend is built in and a device is there, into page-locked memory
//! lent by the backend; it reports the median of `--reps` copies after a warm-up, checks
//! every copy, and prints the rates that the copies alone would allow.

use std::time::Instant;

use kv_staging::copy::{CopyMode, par_copy};
use rayon::prelude::*;
use vramkv::{Error, Result};

use crate::BenchArgs;

/// Bytes a key of width 1 is copied on the host: a put's key and value in.
const PUT_BYTES: f64 = 16.0;
/// A get's key in, value and found flag out.
const GET_BYTES: f64 = 17.0;

/// Median GB/s of `reps` copies (after one warm-up) of `src` into `dst` in `mode`.
fn rate(mode: CopyMode, dst: &mut [u64], src: &[u64], reps: usize) -> Result<f64> {
    let bytes = std::mem::size_of_val(src) as f64;
    let mut rates = Vec::with_capacity(reps);
    for r in 0..=reps {
        dst.par_iter_mut().for_each(|d| *d = !0);
        let t0 = Instant::now();
        par_copy(mode, dst, src);
        let secs = t0.elapsed().as_secs_f64();
        if dst != src {
            return Err(Error::device(
                "host",
                format!(
                    "the {mode} copy of {} words differs from its source",
                    src.len()
                ),
            ));
        }
        if r > 0 {
            rates.push(bytes / secs / 1e9);
        }
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// Prints one destination's rates in both modes.
fn report(what: &str, dst: &mut [u64], src: &[u64], reps: usize) -> Result<()> {
    for mode in [CopyMode::Streaming, CopyMode::Cached] {
        let gbs = rate(mode, dst, src, reps)?;
        println!(
            "{what:<34} {:<7} {gbs:>8.1} GB/s   PUT <= {:>5.2} G/s, GET <= {:>5.2} G/s",
            mode.name(),
            gbs / PUT_BYTES,
            gbs / GET_BYTES,
        );
    }
    Ok(())
}

/// Runs the measurement (see the module docs).
pub fn run(a: &BenchArgs) -> Result<()> {
    let n = a.items;
    let reps = a.reps.max(1);
    println!(
        "host copies of {n} u64 words ({:.0} MB) on {} threads, median of {reps} after a warm-up",
        n as f64 * 8e-6,
        rayon::current_num_threads()
    );
    println!("(the rates the copies alone allow: width 1, nothing else sharing the memory)");
    let src: Vec<u64> = (0..n as u64)
        .into_par_iter()
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let mut dst = vec![0u64; n];
    report("Vec -> Vec", &mut dst, &src, reps)?;
    drop(dst);
    pinned(n, &src, reps)
}

#[cfg(feature = "cuda")]
fn pinned(n: usize, src: &[u64], reps: usize) -> Result<()> {
    use vramkv::cuda::CudaBackend;
    match CudaBackend::open(vramkv::TableConfig::new(1024)) {
        Ok(table) => {
            let mut batch = table.pinned_batch(n)?;
            report("Vec -> page-locked (CUDA)", batch.keys_mut(), src, reps)
        }
        Err(e) => {
            println!("skipped: page-locked memory needs the CUDA backend: {e}");
            Ok(())
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn pinned(_: usize, _: &[u64], _: usize) -> Result<()> {
    println!("skipped: page-locked memory needs the CUDA backend (build with --features cuda)");
    Ok(())
}
