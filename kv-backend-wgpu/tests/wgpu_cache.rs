//! Cache tables on wgpu beyond the conformance cases: batches cut into several pieces, and
//! buckets that need several rounds of the put kernel, resumed one submission at a time
//! (as after a dispatch a driver cut short). With distinct keys in each put, an LFU or
//! custom-score wgpu cache table must end exactly as the CPU backend's does (both apply a
//! bucket's keys in batch order with one rule; under LRU the GPU backends break ties
//! between the entries of one batch by batch order, `kv_kernels::ops::cache::lru_score`,
//! where the CPU takes the lowest slot, as docs/cache.md item 8 allows); with repeated
//! keys, on every policy, `kv_conformance::cache::CacheModel` checks the
//! contract after every batch. Without an adapter the test is reported as ignored (after
//! `skipped: ...`), unless `VRAMKV_REQUIRE_WGPU=1`.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use kv_backend_cpu::CpuCache;
use kv_backend_wgpu::{ROUND_ITEMS, WgpuCache};
use kv_conformance::SplitMix64;
use kv_conformance::cache::CacheModel;
use kv_conformance::libtest_mimic::Failed;
use kv_core::{
    CacheConfig, CachePolicy, CachePut, Clock, Evicted, KvBackend, ManualClock, TableConfig,
};

fn config(
    policy: CachePolicy,
    capacity: usize,
    width: usize,
    clock: Arc<ManualClock>,
) -> TableConfig {
    TableConfig::new(capacity)
        .width(width)
        .seed(0x5eed)
        .cache(CacheConfig::new(policy).clock(clock))
}

/// A put and what it evicted: (key, row, score, expiry time), sorted.
type Evictions = Vec<(u64, Vec<u64>, u64, u64)>;

fn put(t: &dyn KvBackend, batch: CachePut<'_>) -> Result<Evictions, String> {
    let (n, w) = (batch.keys.len(), t.width());
    let (mut k, mut v, mut s, mut x) = (vec![0; n], vec![0; n * w], vec![0; n], vec![0; n]);
    let m = t
        .put_and_evict(
            batch,
            &mut Evicted::new(&mut k, &mut v, &mut s).expires(&mut x),
        )
        .map_err(|e| format!("put_and_evict: {e}"))?;
    let mut out: Evictions = (0..m)
        .map(|e| (k[e], v[e * w..(e + 1) * w].to_vec(), s[e], x[e]))
        .collect();
    out.sort();
    Ok(out)
}

fn peek(t: &dyn KvBackend, keys: &[u64]) -> Result<(Vec<u64>, Vec<bool>), String> {
    let mut v = vec![7; keys.len() * t.width()];
    let mut f = vec![false; keys.len()];
    t.peek(keys, &mut v, &mut f)
        .map_err(|e| format!("peek: {e}"))?;
    Ok((v, f))
}

/// Distinct keys, in the order drawn.
fn distinct_keys(rng: &mut SplitMix64, n: usize, space: u64) -> Vec<u64> {
    let mut seen = HashSet::new();
    (0..n)
        .map(|_| rng.below(space))
        .filter(|k| seen.insert(*k))
        .collect()
}

/// Custom scores, times to live and a moving clock, batches of distinct keys that fill each
/// bucket several times over, in pieces of 256 items and one put round a submission: the
/// wgpu table ends every batch exactly as the CPU one does.
fn same_as_cpu(policy: CachePolicy) -> Result<(), String> {
    for small in [false, true] {
        let clock = Arc::new(ManualClock::new(5));
        let cfg = config(policy, 128, 3, clock.clone());
        let g = WgpuCache::open(cfg.clone()).map_err(|e| format!("open: {e}"))?;
        let cpu = CpuCache::open(cfg).map_err(|e| format!("open: {e}"))?;
        if small {
            g.set_piece_items(256);
            g.set_put_rounds(Some(1));
        }
        let mut rng = SplitMix64(7 + small as u64);
        let w = 3;
        let universe: Vec<u64> = (0..3000).chain([0, 1, u64::MAX]).collect();
        for step in 0..8u64 {
            // About 1000 distinct keys over 4 buckets: each takes several rounds.
            let mut keys = distinct_keys(&mut rng, 1100, 3000);
            for k in [0, u64::MAX] {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            let vals: Vec<u64> = keys.iter().flat_map(|&k| [k, step, k ^ step]).collect();
            let scores: Vec<u64> = keys.iter().map(|_| rng.below(1000)).collect();
            let ttl: Vec<u64> = keys
                .iter()
                .map(|_| {
                    if rng.below(4) == 0 {
                        1 + rng.below(20)
                    } else {
                        0
                    }
                })
                .collect();
            let mut batch = CachePut::new(&keys, &vals).ttl_ms(&ttl);
            if policy == CachePolicy::Custom {
                batch = batch.scores(&scores);
            }
            let (a, b) = (put(&g, batch)?, put(&cpu, batch)?);
            if a != b {
                return Err(format!(
                    "{policy:?} step {step}: wgpu evicted {} entries, the cpu {}; first differences: {:?}",
                    a.len(),
                    b.len(),
                    a.iter().zip(&b).find(|(x, y)| x != y)
                ));
            }
            // Gets with repeats (scores change under LRU and LFU), then a take.
            let gets: Vec<u64> = (0..700)
                .map(|_| universe[rng.below(3003) as usize])
                .collect();
            let (mut v1, mut f1) = (vec![0; gets.len() * w], vec![false; gets.len()]);
            let (mut v2, mut f2) = (v1.clone(), f1.clone());
            g.get(&gets, &mut v1, &mut f1).map_err(|e| e.to_string())?;
            cpu.get(&gets, &mut v2, &mut f2)
                .map_err(|e| e.to_string())?;
            if (v1, f1) != (v2, f2) {
                return Err(format!("{policy:?} step {step}: gets differ"));
            }
            let takes: Vec<u64> = (0..300)
                .map(|_| universe[rng.below(3003) as usize])
                .collect();
            let n = takes.len();
            let mut outs = [(); 2].map(|_| (vec![0; n * w], vec![false; n], vec![0; n], 0));
            for (t, o) in [&g as &dyn KvBackend, &cpu].into_iter().zip(&mut outs) {
                o.3 = t
                    .take(&takes, &mut o.0, &mut o.1, &mut o.2)
                    .map_err(|e| e.to_string())?;
            }
            if outs[0] != outs[1] {
                return Err(format!("{policy:?} step {step}: takes differ"));
            }
            clock.advance(rng.below(12));
            if peek(&g, &universe)? != peek(&cpu, &universe)? || g.len() != cpu.len() {
                return Err(format!("{policy:?} step {step}: the tables differ"));
            }
            let (sg, sc) = (g.cache_stats(), cpu.cache_stats());
            if sg != sc {
                return Err(format!("{policy:?} step {step}: stats {sg:?} and {sc:?}"));
            }
        }
        if small && g.resume_rounds() == 0 {
            return Err(format!(
                "no put was resumed, though buckets took more than {ROUND_ITEMS} keys"
            ));
        }
    }
    Ok(())
}

/// Batches with repeated keys in pieces of 256 items, one put round a submission, checked
/// by the contract's model after every batch.
fn pieces_keep_the_contract(policy: CachePolicy) -> Result<(), String> {
    let clock = Arc::new(ManualClock::new(1000));
    let w = 2;
    let t = WgpuCache::open(config(policy, 160, w, clock.clone())).map_err(|e| e.to_string())?;
    t.set_piece_items(256);
    t.set_put_rounds(Some(1));
    let mut m = CacheModel::new(w, policy);
    let mut rng = SplitMix64(policy as u64 + 11);
    for step in 0..12u64 {
        let now = clock.now_ms();
        let keys: Vec<u64> = (0..900).map(|_| rng.below(1500)).collect();
        let vals: Vec<u64> = keys.iter().flat_map(|&k| [k, step]).collect();
        let scores: Vec<u64> = keys.iter().map(|_| rng.below(100)).collect();
        let ttl: Vec<u64> = keys
            .iter()
            .map(|_| {
                if rng.below(5) == 0 {
                    1 + rng.below(30)
                } else {
                    0
                }
            })
            .collect();
        let mut batch = CachePut::new(&keys, &vals).ttl_ms(&ttl);
        if policy == CachePolicy::Custom {
            batch = batch.scores(&scores);
        }
        let ev = put(&t, batch)?;
        let reported: Vec<(u64, Vec<u64>, u64)> =
            ev.iter().map(|(k, r, s, _)| (*k, r.clone(), *s)).collect();
        let expires: Vec<u64> = ev.iter().map(|e| e.3).collect();
        m.put(&t, batch, &reported, Some(&expires), now);
        let gets: Vec<u64> = (0..600).map(|_| rng.below(1500)).collect();
        m.get(&t, &gets, now);
        let takes: Vec<u64> = (0..300).map(|_| rng.below(1500)).collect();
        m.take(&t, &takes, now);
        clock.advance(rng.below(10));
        m.check(&t, clock.now_ms());
    }
    Ok(())
}

/// A table whose rows pass one storage binding (at most 2 GiB on any adapter) is refused
/// as out of memory when it opens, before anything is allocated.
fn larger_than_a_binding_is_refused() -> Result<(), String> {
    let cfg = TableConfig::new(1 << 25)
        .width(16)
        .cache(CacheConfig::new(CachePolicy::Lru));
    match WgpuCache::open(cfg) {
        Err(kv_core::Error::OutOfDeviceMemory {
            backend,
            requested_bytes,
        }) => {
            if backend != "wgpu" || requested_bytes < (1 << 25) * 16 * 8 {
                return Err(format!("refused as {backend}, {requested_bytes} bytes"));
            }
            Ok(())
        }
        Err(e) => Err(format!("a 4 GiB row array gave {e}")),
        Ok(_) => Err("a 4 GiB row array opened".into()),
    }
}

fn cache_in_pieces_and_rounds() -> Result<(), Failed> {
    larger_than_a_binding_is_refused()?;
    for policy in [CachePolicy::Lfu, CachePolicy::Custom] {
        same_as_cpu(policy)?;
    }
    for policy in [CachePolicy::Lru, CachePolicy::Lfu, CachePolicy::Custom] {
        pieces_keep_the_contract(policy)?;
    }
    Ok(())
}

fn main() {
    common::main(
        "wgpu::cache_in_pieces_and_rounds",
        "wgpu cache test",
        cache_in_pieces_and_rounds,
    );
}
