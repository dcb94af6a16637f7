//! The trace (`WgpuOptions::trace`): a put and a get over several chunks with a tracer must
//! work and write the host trace line, plus either the GPU line (adapters with timestamp
//! queries) or the note saying why the GPU step times are left out. Without an adapter the
//! test is reported as ignored (after `skipped: ...`), unless `VRAMKV_REQUIRE_WGPU=1`.

mod common;

use kv_backend_wgpu::{WgpuBackend, WgpuOptions};
use kv_conformance::libtest_mimic::Failed;
use kv_core::{KvBackend, TableConfig};
use kv_staging::trace::Tracer;

/// Keys per put: with [`W`]-word rows and 1 MiB chunks, 4 chunks of 16,384 keys (the last
/// one partly full), so that a lane is reused within the batch; the get of twice as many
/// keys takes 7 chunks.
const N: usize = 50_000;
/// Words per value row.
const W: usize = 4;

/// A put of `N` keys, then a get of them and of as many absent keys, in chunks of 1 MiB,
/// traced to `tracer`.
fn batches(tracer: &Tracer) -> Result<(), String> {
    let options = WgpuOptions::default().chunk_mib(1).trace(tracer.clone());
    let t = WgpuBackend::open_with(TableConfig::new(N).width(W), &options)
        .map_err(|e| format!("open: {e}"))?;
    let keys: Vec<u64> = (0..N as u64).map(|i| i * 3 + 5).collect();
    let values: Vec<u64> = (0..(W * N) as u64).map(|i| i ^ 0x5555).collect();
    t.put(&keys, &values).map_err(|e| format!("put: {e}"))?;
    let probe: Vec<u64> = keys.iter().flat_map(|&k| [k, k + 1]).collect();
    let mut out = vec![0u64; W * probe.len()];
    let mut found = vec![false; probe.len()];
    t.get(&probe, &mut out, &mut found)
        .map_err(|e| format!("get: {e}"))?;
    for (i, &k) in probe.iter().enumerate() {
        let j = i / 2;
        let want = (i % 2 == 0).then(|| &values[j * W..(j + 1) * W]);
        let got = found[i].then(|| &out[i * W..(i + 1) * W]);
        if got != want {
            return Err(format!("key {k}: got {got:?}, want {want:?}"));
        }
    }
    if t.len() != N {
        return Err(format!("len {} after the put, want {N}", t.len()));
    }
    Ok(())
}

fn trace_put_get() -> Result<(), Failed> {
    let tracer = Tracer::kept();
    batches(&tracer)?;
    let lines = tracer.lines();
    for l in &lines {
        println!("{l}");
    }
    let host = lines
        .iter()
        .filter(|l| l.starts_with("vramkv wgpu trace: kv_"))
        .count();
    if host != 2 {
        return Err(format!("{host} host trace lines, want 2 (put, get)").into());
    }
    let gpu: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("vramkv wgpu gpu: "))
        .collect();
    let note = lines.iter().any(|l| l.contains("GPU step times left out"));
    match (gpu.len(), note) {
        (0, true) => println!("no GPU timestamps on this adapter"),
        (2, false) => {
            let (put, get) = (gpu[0], gpu[1]);
            for (line, steps) in [
                (
                    put,
                    &["upload copy", "clear", "dedup", "place", "readback copy"][..],
                ),
                (get, &["upload copy", "clear", "get", "readback copy"][..]),
            ] {
                for s in steps.iter().chain(&["chunk span", "idle between chunks"]) {
                    if !line.contains(&format!("{s} ")) {
                        return Err(format!("`{s}` missing from: {line}").into());
                    }
                }
                if line.contains("chunks timed") {
                    return Err(format!("a chunk was not timed: {line}").into());
                }
            }
        }
        (g, n) => {
            return Err(
                format!("{g} GPU trace lines and note {n}: want 2 lines or the note").into(),
            );
        }
    }
    Ok(())
}

fn main() {
    common::main("wgpu::trace_put_get", "wgpu trace test", trace_put_get);
}
