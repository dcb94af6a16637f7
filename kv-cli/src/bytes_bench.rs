//! `vramkv bench --bytes`: byte tables under two workloads, and `--churn`, the arena's
//! fragmentation under overwrites with new sizes and deletes (docs/arena.md).
//!
//! `--bytes` runs, on one backend, batches of `--items` new keys: PUT, then GET of the same
//! keys (every value checked), for
//! - 16-byte keys with 64-byte values;
//! - 32-byte keys with values of 100 bytes to 4 KiB (uniform).
//!
//! It reports operations and GB/s (key and value bytes) as medians over the batches after
//! the first, next to the bound that the host's copy rate, measured in the same run over
//! the same bytes (a parallel copy of one batch's data), allows: a byte table copies every
//! key and value at least once on the host, into its arena or staging.
//!
//! `--churn` runs `--rounds` rounds over `--items` keys: each round overwrites every key
//! with a value of a new random size (8 bytes to 4 KiB), in batches of `--chunk` keys, and
//! deletes 30 % of each batch. It prints the arena's held and live bytes and their ratio
//! after every round, and fails (exit code 1) when the ratio passes 1.15.

use std::time::Instant;

use indicatif::ProgressBar;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use rayon::prelude::*;
use vramkv::{BinaryBuf, ByteConfig, ByteTable, BytesTable, Error, Options, Result, TableConfig};

/// The fragmentation the churn workload must stay within (issue 14's target).
const CHURN_LIMIT: f64 = 1.15;

/// One workload of `--bytes`.
struct Workload {
    name: &'static str,
    key_bytes: usize,
    value_bytes: (usize, usize),
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "16 B keys, 64 B values",
        key_bytes: 16,
        value_bytes: (64, 64),
    },
    Workload {
        name: "32 B keys, 100 B - 4 KiB values",
        key_bytes: 32,
        value_bytes: (100, 4096),
    },
];

/// Batch `b` of a workload: `n` distinct keys (the batch number and the item's index,
/// padded to the key size) and values whose bytes depend on the key.
fn batch(w: &Workload, n: usize, b: u64, seed: u64) -> (BinaryBuf, BinaryBuf) {
    let mut rng = StdRng::seed_from_u64(seed ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let lens: Vec<usize> = (0..n)
        .map(|_| rng.random_range(w.value_bytes.0..=w.value_bytes.1))
        .collect();
    let mut keys = BinaryBuf::new();
    let mut values = BinaryBuf::new();
    let mut key = vec![0u8; w.key_bytes];
    for (i, &len) in lens.iter().enumerate() {
        key[..8].copy_from_slice(&b.to_le_bytes());
        key[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        keys.push(&key);
        let fill = (i as u8) ^ (b as u8);
        let v: Vec<u8> = (0..len).map(|j| fill.wrapping_add(j as u8)).collect();
        values.push(&v);
    }
    (keys, values)
}

/// Median GB/s of a parallel copy of `bytes` bytes (three copies after a warm-up).
fn host_copy_gbs(bytes: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut dst = vec![0u8; bytes];
    let mut rates = Vec::new();
    for r in 0..4 {
        let t0 = Instant::now();
        dst.par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        let secs = t0.elapsed().as_secs_f64();
        if r > 0 {
            rates.push(bytes as f64 / secs / 1e9);
        }
    }
    median(&mut rates)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn open(cfg: ByteConfig, options: &Options) -> Result<BytesTable> {
    vramkv::open_bytes_with(cfg, options)
}

/// Runs `--bytes`; `Ok(false)` when a value read back differs.
pub fn run(items: usize, batches: usize, seed: u64, options: &Options) -> Result<bool> {
    let mut ok = true;
    println!(
        "{:<32} {:>9} {:>9} {:>8} {:>8} {:>10} {:>11} {:>11}",
        "workload",
        "PUT Mop/s",
        "GET Mop/s",
        "PUT GB/s",
        "GET GB/s",
        "host GB/s",
        "PUT/bound",
        "GET/bound"
    );
    for w in &WORKLOADS {
        let cfg = ByteConfig::new(items.saturating_mul(batches))
            .max_key_bytes(w.key_bytes)
            .max_value_bytes(w.value_bytes.1 as u64)
            .table(TableConfig::new(items.saturating_mul(batches)).seed(seed));
        let t = open(cfg, options)?;
        let bar = ProgressBar::new(batches as u64);
        bar.set_message(w.name);
        let (mut put, mut get, mut bytes_per_op) = (Vec::new(), Vec::new(), 0.0);
        let mut host = f64::NAN;
        // One output buffer for every batch, as a caller that serves many batches keeps.
        let mut out = BinaryBuf::new();
        let mut found = vec![false; items];
        for b in 0..batches {
            let (keys, values) = batch(w, items, b as u64, seed);
            let bytes = (keys.data().len() + values.data().len()) as f64;
            if b == 0 {
                host = host_copy_gbs(bytes as usize);
            }
            bytes_per_op = bytes / items as f64;
            let t0 = Instant::now();
            t.put(keys.as_binary(), values.as_binary())?;
            let tp = t0.elapsed().as_secs_f64();
            found.fill(false);
            let t1 = Instant::now();
            t.get(keys.as_binary(), &mut out, &mut found)?;
            let tg = t1.elapsed().as_secs_f64();
            if !found.iter().all(|f| *f) || out != values {
                eprintln!(
                    "{}: batch {b}: a value read back differs from what was put",
                    w.name
                );
                ok = false;
            }
            if b > 0 || batches == 1 {
                put.push(tp);
                get.push(tg);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let (tp, tg) = (median(&mut put), median(&mut get));
        let (put_ops, get_ops) = (items as f64 / tp, items as f64 / tg);
        let bound = host * 1e9 / bytes_per_op;
        println!(
            "{:<32} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>10.1} {:>11.2} {:>11.2}",
            w.name,
            put_ops / 1e6,
            get_ops / 1e6,
            put_ops * bytes_per_op / 1e9,
            get_ops * bytes_per_op / 1e9,
            host,
            put_ops / bound,
            get_ops / bound,
        );
        let d = t.describe();
        println!(
            "    on {} ({}), {} entries, arena {:.1} MiB held, {:.1} MiB live, fragmentation {:.3}",
            d.backend,
            d.device,
            d.entries,
            d.arena.held_bytes as f64 / (1 << 20) as f64,
            d.arena.live_bytes as f64 / (1 << 20) as f64,
            d.arena.fragmentation()
        );
    }
    Ok(ok)
}

/// Runs `--churn`; `Ok(false)` when the fragmentation passes [`CHURN_LIMIT`] or a value
/// read back at the end differs.
pub fn churn(
    keys: usize,
    rounds: usize,
    chunk: usize,
    seed: u64,
    options: &Options,
) -> Result<bool> {
    if chunk == 0 {
        return Err(Error::InvalidConfig("--chunk must be at least 1".into()));
    }
    let cfg = ByteConfig::new(keys)
        .max_key_bytes(16)
        .max_value_bytes(4096)
        .table(TableConfig::new(keys).seed(seed));
    let t = open(cfg, options)?;
    let names: Vec<[u8; 16]> = (0..keys as u64)
        .map(|i| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(b"churn:::");
            k[8..].copy_from_slice(&i.to_le_bytes());
            k
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    // The model: each key's value length and fill byte (None: deleted).
    let mut model: Vec<Option<(u16, u8)>> = vec![None; keys];
    let mut ok = true;
    let bar = ProgressBar::new((rounds * keys.div_ceil(chunk)) as u64);
    println!(
        "{:>5} {:>12} {:>12} {:>13} {:>10} {:>9}",
        "round", "held MiB", "live MiB", "fragmentation", "moved MiB", "seconds"
    );
    for round in 1..=rounds {
        let t0 = Instant::now();
        for (c, names) in names.chunks(chunk).enumerate() {
            let base = c * chunk;
            let mut kb = BinaryBuf::new();
            let mut vb = BinaryBuf::new();
            let mut dels = BinaryBuf::new();
            for (j, k) in names.iter().enumerate() {
                let len: u16 = rng.random_range(8..=4096);
                let fill: u8 = rng.random();
                kb.push(k);
                vb.push(&vec![fill; len as usize]);
                model[base + j] = Some((len, fill));
                if rng.random_range(0..10) < 3 {
                    dels.push(k);
                    model[base + j] = None;
                }
            }
            t.put(kb.as_binary(), vb.as_binary())?;
            t.delete(dels.as_binary())?;
            bar.inc(1);
        }
        let a = t.describe().arena;
        bar.suspend(|| {
            println!(
                "{round:>5} {:>12.1} {:>12.1} {:>13.3} {:>10.1} {:>9.2}",
                a.held_bytes as f64 / (1 << 20) as f64,
                a.live_bytes as f64 / (1 << 20) as f64,
                a.fragmentation(),
                a.compacted_bytes as f64 / (1 << 20) as f64,
                t0.elapsed().as_secs_f64(),
            )
        });
        if a.fragmentation() > CHURN_LIMIT {
            ok = false;
        }
    }
    bar.finish_and_clear();
    // Every key reads back as the model says.
    for (c, names) in names.chunks(chunk).enumerate() {
        let kb = BinaryBuf::from_slices(names);
        let mut out = BinaryBuf::new();
        let mut found = vec![false; names.len()];
        t.get(kb.as_binary(), &mut out, &mut found)?;
        for j in 0..names.len() {
            let want = model[c * chunk + j];
            let got = out.get(j).unwrap_or_default();
            let good = match want {
                None => !found[j],
                Some((len, fill)) => {
                    found[j] && got.len() == len as usize && got.iter().all(|&x| x == fill)
                }
            };
            if !good {
                eprintln!("churn: key {} reads back wrong", c * chunk + j);
                ok = false;
            }
        }
    }
    let d = t.describe();
    println!(
        "churn on {} ({}): {} keys, {rounds} rounds, final fragmentation {:.3} (limit {CHURN_LIMIT})",
        d.backend,
        d.device,
        d.entries,
        d.arena.fragmentation()
    );
    Ok(ok)
}
