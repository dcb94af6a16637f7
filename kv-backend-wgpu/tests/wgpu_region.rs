//! Region order (`WgpuOptions::region_order`): with region-order probing forced on (it is on
//! by default only for tables beyond 2^28 slots, which the tests cannot allocate), puts with
//! repeats within and across chunks, the special keys, gets, contains and deletes must
//! match a `HashMap`, and the GPU trace (where the adapter has timestamp queries) must show
//! the `order` step. Without an adapter the test is reported as ignored (after
//! `skipped: ...`), unless `VRAMKV_REQUIRE_WGPU=1`.

mod common;

use std::collections::HashMap;

use kv_backend_wgpu::{WgpuBackend, WgpuOptions};
use kv_conformance::libtest_mimic::Failed;
use kv_core::{KvBackend, TableConfig};
use kv_staging::trace::Tracer;

/// Words per value row.
const W: usize = 2;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Checks every key of `probe` against the model with a get and a contains.
fn check(t: &WgpuBackend, m: &HashMap<u64, [u64; W]>, probe: &[u64]) -> Result<(), String> {
    let mut out = vec![0u64; W * probe.len()];
    let mut found = vec![false; probe.len()];
    t.get(probe, &mut out, &mut found)
        .map_err(|e| format!("get: {e}"))?;
    let mut has = vec![false; probe.len()];
    t.contains(probe, &mut has)
        .map_err(|e| format!("contains: {e}"))?;
    for (i, k) in probe.iter().enumerate() {
        let want = m.get(k).map(|v| &v[..]);
        let got = found[i].then(|| &out[i * W..(i + 1) * W]);
        if got != want || has[i] != want.is_some() {
            return Err(format!(
                "key {k}: get {got:?}, contains {}, want {want:?}",
                has[i]
            ));
        }
    }
    if t.len() != m.len() {
        return Err(format!("len {}, want {}", t.len(), m.len()));
    }
    Ok(())
}

/// Batches of several chunks (of 1 MiB) in region order against a `HashMap`, traced to
/// `tracer`.
fn batches(tracer: &Tracer) -> Result<(), String> {
    let options = WgpuOptions::default()
        .region_order(true)
        .chunk_mib(1)
        .trace(tracer.clone());
    let t = WgpuBackend::open_with(TableConfig::new(1 << 16).width(W), &options)
        .map_err(|e| format!("open: {e}"))?;
    let mut m: HashMap<u64, [u64; W]> = HashMap::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let range = 150_000u64;
    for round in 0..4u64 {
        if round == 2 {
            // From here on probes stop after 3 slots per dispatch: resume rounds in region
            // order (items reach the probing kernels through the `perm` indirection).
            t.set_probe_budget(3);
        }
        // Repeats within and across chunks, the special keys 0 and 1 among them.
        let n = 120_000usize;
        let mut keys: Vec<u64> = (0..n).map(|_| rng.next() % range).collect();
        keys[7] = 0;
        keys[n / 2] = 1;
        keys[n - 3] = 0;
        let values: Vec<u64> = (0..n * W).map(|i| round << 32 | i as u64).collect();
        t.put(&keys, &values).map_err(|e| format!("put: {e}"))?;
        for (i, &k) in keys.iter().enumerate() {
            m.insert(k, [values[i * W], values[i * W + 1]]);
        }
        let probe: Vec<u64> = (0..range + 10).collect();
        check(&t, &m, &probe).map_err(|e| format!("round {round} after put: {e}"))?;
        let del: Vec<u64> = (0..30_000).map(|_| rng.next() % range).chain([1]).collect();
        t.delete(&del).map_err(|e| format!("delete: {e}"))?;
        for k in &del {
            m.remove(k);
        }
        check(&t, &m, &probe).map_err(|e| format!("round {round} after delete: {e}"))?;
    }
    if t.resume_rounds() == 0 {
        return Err("a probe budget of 3 slots needed no resume round".into());
    }
    Ok(())
}

fn region_order_matches_model() -> Result<(), Failed> {
    let tracer = Tracer::kept();
    batches(&tracer)?;
    let lines = tracer.lines();
    let gpu: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("vramkv wgpu gpu: "))
        .collect();
    if gpu.is_empty() {
        if !lines.iter().any(|l| l.contains("GPU step times left out")) {
            return Err(format!("no GPU trace lines and no note: {lines:?}").into());
        }
        println!("no GPU timestamps on this adapter");
    } else if let Some(l) = gpu.iter().find(|l| !l.contains(", order ")) {
        return Err(format!("`order` missing from: {l}").into());
    } else {
        println!("{}", gpu[0]);
    }
    Ok(())
}

fn main() {
    common::main(
        "wgpu::region_order_matches_model",
        "wgpu region-order test",
        region_order_matches_model,
    );
}
