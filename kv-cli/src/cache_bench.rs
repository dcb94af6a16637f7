//! `vramkv bench --cache`: a tiered store (a cache table over host RAM) under a skewed
//! workload, next to the hit rate an exact LRU cache of the upper tier's size would have
//! had on the same key stream.
//!
//! Each configuration draws keys from a Zipf distribution (exponents of `--zipf`; 0 is
//! uniform) over a key space `--space` times the upper tier's capacity (its budget,
//! `--upper-mib`). A batch of `--items` operations is 90 % gets and 10 % puts: the gets
//! run first, in one batch; their misses are then put (the cache fills as a cache-aside
//! client would fill it), then the puts. The lower tier holds the whole key space, so what
//! the upper tier misses is served from host RAM and promoted. The exact LRU replays the
//! same accesses in the same order on the CPU (`lru` crate). Batches warm the cache,
//! uncounted, until the upper tier holds 90 % of its capacity (at most
//! [`MAX_WARM`] of them); then `--batches` batches are counted.

use std::time::Instant;

use lru::LruCache;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Zipf};
use rayon::prelude::*;
use vramkv::{
    CacheConfig, CachePolicy, Error, KvBackend, Options, Result, Tiered, TieredConfig,
    cache_capacity_for_budget, cache_slot_bytes,
};

use crate::workload::mix;

/// The most warm-up batches a configuration runs before its counted ones.
pub const MAX_WARM: usize = 256;

/// One configuration's figures.
pub struct Row {
    pub zipf: f64,
    pub space: usize,
    pub upper_slots: usize,
    pub keys: usize,
    pub mops: f64,
    pub upper_hit: f64,
    pub total_hit: f64,
    pub lru_hit: f64,
    pub promotions: u64,
    pub demotions: u64,
    pub evictions: u64,
    pub upper: String,
    /// Nanoseconds an operation spent in the upper tier's calls, the lower tier's, and the
    /// store's own work between them (the counted batches' [`vramkv::TierStats`] times).
    pub ns_upper: f64,
    pub ns_lower: f64,
    pub ns_manager: f64,
    /// Uncounted batches that warmed the cache.
    pub warm: usize,
}

/// The keys of one batch: `n` ranks drawn from Zipf(`keys`, `s`) (uniform when `s` is 0),
/// mixed so that hot keys scatter over the table, on all cores with one stream per chunk.
fn draw(keys: usize, s: f64, n: usize, seed: u64) -> Result<Vec<u64>> {
    let zipf = Zipf::new(keys as f64, s)
        .map_err(|e| Error::InvalidArgument(format!("zipf exponent {s}: {e}")))?;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0u64; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = StdRng::seed_from_u64(mix(seed ^ (c as u64) << 20));
            for k in chunk {
                *k = mix(zipf.sample(&mut rng) as u64);
            }
        });
    Ok(out)
}

/// Runs one configuration.
#[allow(clippy::too_many_arguments)]
pub fn run_one(
    zipf: f64,
    space: usize,
    width: usize,
    upper_bytes: u64,
    items: usize,
    batches: usize,
    seed: u64,
    options: &Options,
) -> Result<Row> {
    let upper_slots = cache_capacity_for_budget(upper_bytes, width);
    let keys = upper_slots * space;
    // Room below for the whole key space with a margin for full buckets.
    let lower_bytes = (keys as u64 * 3 / 2 + 1024) * cache_slot_bytes(width) as u64;
    let store = Tiered::open(
        TieredConfig {
            width,
            cache: CacheConfig::new(CachePolicy::Lru),
            upper_bytes,
            lower_bytes,
            seed: Some(seed),
        },
        options,
    )?;
    let mut lru: LruCache<u64, ()> = LruCache::unbounded();
    let (mut lru_hits, mut lru_gets) = (0u64, 0u64);
    let (mut secs, mut ops) = (0.0f64, 0u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counted = store.stats();
    let (mut warm, mut b) = (0usize, 0usize);
    let full = upper_slots * 9 / 10;
    while b < batches {
        let warming = warm < MAX_WARM && (warm == 0 || store.upper().len() < full);
        let stream = draw(keys, zipf, items, seed ^ mix((warm + b) as u64 + 1))?;
        let is_get: Vec<bool> = (0..items).map(|_| rng.random_range(0..10) != 0).collect();
        let gets: Vec<u64> = stream
            .iter()
            .zip(&is_get)
            .filter(|(_, g)| **g)
            .map(|(k, _)| *k)
            .collect();
        let puts: Vec<u64> = stream
            .iter()
            .zip(&is_get)
            .filter(|(_, g)| !**g)
            .map(|(k, _)| *k)
            .collect();
        let (mut v, mut f) = (vec![0u64; gets.len() * width], vec![false; gets.len()]);
        // The client's own work between the store's batches, on all cores as a
        // multi-threaded client would do it.
        let put_vals = |ks: &[u64]| -> Vec<u64> {
            let mut out = vec![0u64; ks.len() * width];
            out.par_chunks_mut(width)
                .zip(ks)
                .for_each(|(row, &k)| row.fill(k));
            out
        };
        let pv = put_vals(&puts);
        let t0 = Instant::now();
        store.get(&gets, &mut v, &mut f)?;
        let fills: Vec<u64> = gets
            .par_iter()
            .zip(&f)
            .filter(|(_, f)| !**f)
            .map(|(k, _)| *k)
            .collect();
        let fv = put_vals(&fills);
        store.put(&fills, &fv)?;
        store.put(&puts, &pv)?;
        let dt = t0.elapsed().as_secs_f64();
        // A found key holds what was put with it (its own value, in every word).
        if let Some(i) = (0..gets.len()).find(|&i| f[i] && v[i * width] != gets[i]) {
            return Err(Error::device(
                "bench",
                format!("key {} returned {}", gets[i], v[i * width]),
            ));
        }
        // The exact LRU, replaying the same order: gets, then the fills, then the puts.
        let mut misses = Vec::new();
        for &k in &gets {
            if lru.get(&k).is_some() {
                if !warming {
                    lru_hits += 1;
                }
            } else {
                misses.push(k);
            }
        }
        for &k in misses.iter().chain(&puts) {
            lru.put(k, ());
            if lru.len() > upper_slots {
                lru.pop_lru();
            }
        }
        if warming {
            warm += 1;
            counted = store.stats();
            continue;
        }
        b += 1;
        lru_gets += gets.len() as u64;
        secs += dt;
        ops += items as u64;
    }
    let s = store.stats();
    let gets = (s.upper_hits + s.lower_hits + s.misses)
        - (counted.upper_hits + counted.lower_hits + counted.misses);
    let gets = gets.max(1) as f64;
    let per_op = |now: std::time::Duration, then: std::time::Duration| {
        (now - then).as_secs_f64() * 1e9 / ops.max(1) as f64
    };
    Ok(Row {
        ns_upper: per_op(s.upper_time, counted.upper_time),
        ns_lower: per_op(s.lower_time, counted.lower_time),
        ns_manager: per_op(s.manager_time, counted.manager_time),
        zipf,
        space,
        upper_slots,
        keys,
        mops: ops as f64 / secs.max(1e-9) / 1e6,
        upper_hit: (s.upper_hits - counted.upper_hits) as f64 / gets,
        total_hit: (s.upper_hits + s.lower_hits - counted.upper_hits - counted.lower_hits) as f64
            / gets,
        lru_hit: lru_hits as f64 / lru_gets.max(1) as f64,
        promotions: s.promotions - counted.promotions,
        demotions: s.demotions - counted.demotions,
        evictions: s.evictions - counted.evictions,
        upper: store.upper().describe().backend.to_string(),
        warm,
    })
}

/// Prints the table of rows.
pub fn print(width: usize, items: usize, rows: &[Row]) {
    println!(
        "tiered store, LRU, width {width} ({} B values), batches of {items} ops (90 % get, misses filled, 10 % put)",
        8 * width
    );
    println!(
        "{:>6} {:>6} {:>6} {:>11} {:>11} {:>5} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>24}",
        "zipf",
        "space",
        "upper",
        "upper slots",
        "keys",
        "warm",
        "M ops/s",
        "upper %",
        "total %",
        "LRU %",
        "promoted",
        "demoted",
        "evicted",
        "ns/op upper/lower/mgr"
    );
    for r in rows {
        println!(
            "{:>6} {:>6} {:>6} {:>11} {:>11} {:>5} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>10} {:>9} {:>24}",
            if r.zipf == 0.0 {
                "unif".to_string()
            } else {
                format!("{:.2}", r.zipf)
            },
            format!("{}x", r.space),
            r.upper,
            r.upper_slots,
            r.keys,
            r.warm,
            r.mops,
            100.0 * r.upper_hit,
            100.0 * r.total_hit,
            100.0 * r.lru_hit,
            r.promotions,
            r.demotions,
            r.evictions,
            format!(
                "{:.1} / {:.1} / {:.1}",
                r.ns_upper, r.ns_lower, r.ns_manager
            )
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_is_close_to_exact_lru_and_serves_everything() {
        let opts = Options::default().backend(vramkv::BackendKind::Cpu);
        let r = run_one(0.99, 4, 1, 64 << 10, 20_000, 4, 1, &opts).expect("run");
        assert!(r.total_hit > 0.0 && r.upper_hit <= r.total_hit);
        assert_eq!(r.evictions, 0, "the lower tier holds the whole key space");
        assert!(
            (r.upper_hit - r.lru_hit).abs() < 0.05,
            "upper {} against exact LRU {}",
            r.upper_hit,
            r.lru_hit
        );
    }
}
