//! vramkv's CPU backend against a single-threaded `hashbrown::HashMap<u64, u64>` doing the
//! same batch of inserts into an empty, pre-sized table and the same lookups, side by side
//! in one run. `VRAMKV_BENCH_SIZES=2000000,20000000` (the default) picks the batch sizes.

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kv_conformance::SplitMix64;
use std::hint::black_box;
use std::time::Duration;
use vramkv::{KvBackend, TableConfig};

fn sizes() -> Vec<usize> {
    std::env::var("VRAMKV_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2_000_000, 20_000_000])
}

fn keys(n: usize) -> Vec<u64> {
    let mut rng = SplitMix64(n as u64);
    (0..n).map(|_| rng.next_u64()).collect()
}

fn bench(c: &mut Criterion) {
    for n in sizes() {
        let ks = keys(n);
        let vs: Vec<u64> = ks.iter().map(|k| k ^ 0x5555).collect();
        let mut g = c.benchmark_group(format!("put_{n}"));
        g.throughput(Throughput::Elements(n as u64))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1));
        g.bench_function(BenchmarkId::new("vramkv_cpu", n), |b| {
            b.iter_batched(
                || vramkv::cpu::CpuBackend::open(TableConfig::new(n)).expect("open"),
                |t| {
                    t.put(&ks, &vs).expect("put");
                    t
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function(BenchmarkId::new("hashbrown_1thread", n), |b| {
            b.iter_batched(
                || hashbrown::HashMap::<u64, u64>::with_capacity(n),
                |mut m| {
                    for (k, v) in ks.iter().zip(&vs) {
                        m.insert(*k, *v);
                    }
                    m
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();

        let t = vramkv::cpu::CpuBackend::open(TableConfig::new(n)).expect("open");
        t.put(&ks, &vs).expect("put");
        let mut m = hashbrown::HashMap::<u64, u64>::with_capacity(n);
        m.extend(ks.iter().copied().zip(vs.iter().copied()));
        let mut g = c.benchmark_group(format!("get_{n}"));
        g.throughput(Throughput::Elements(n as u64))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1));
        let mut out = vec![0u64; n];
        let mut found = vec![false; n];
        g.bench_function(BenchmarkId::new("vramkv_cpu", n), |b| {
            b.iter(|| t.get(black_box(&ks), &mut out, &mut found).expect("get"))
        });
        g.bench_function(BenchmarkId::new("hashbrown_1thread", n), |b| {
            b.iter(|| {
                for (k, o) in ks.iter().zip(out.iter_mut()) {
                    *o = m.get(k).copied().unwrap_or(0);
                }
                black_box(&out);
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
