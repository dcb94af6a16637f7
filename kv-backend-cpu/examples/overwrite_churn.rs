//! Small batches of overwrites into a full CPU byte table: what a server's SETs of random
//! keys do. Prints the time per overwritten key (median of the repetitions) and the
//! arena's held and live bytes after them.
//!
//! ```text
//! cargo run --release -p kv-backend-cpu --example overwrite_churn -- KEYS VALUE_BYTES SEGMENT_BYTES [BATCH] [REPS]
//! cargo run --release -p kv-backend-cpu --example overwrite_churn -- 1000000 1000 1048576
//! ```

use std::time::Instant;

use kv_backend_cpu::CpuBytes;
use kv_core::{BinaryBuf, ByteConfig, ByteTable, Result, TableConfig};

/// Batches per repetition.
const BATCHES: usize = 500;

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are numbers"))
        .collect();
    let [keys, value_bytes, segment, ..] = args[..] else {
        eprintln!("usage: overwrite_churn KEYS VALUE_BYTES SEGMENT_BYTES [BATCH] [REPS]");
        std::process::exit(2);
    };
    let batch = args.get(3).copied().unwrap_or(240);
    let reps = args.get(4).copied().unwrap_or(7);
    let cfg = ByteConfig::new(keys)
        .max_key_bytes(32)
        .max_value_bytes(value_bytes as u64)
        .segment_bytes(segment as u64)
        .table(TableConfig::new(keys).seed(1));
    let t = CpuBytes::open(cfg)?;
    let key = |i: usize| format!("key:{i:012}").into_bytes();
    for start in (0..keys).step_by(100_000) {
        let items = start..(start + 100_000).min(keys);
        let ks = BinaryBuf::from_slices(items.clone().map(key));
        let vs = BinaryBuf::from_slices(items.map(|i| vec![i as u8; value_bytes]));
        t.put(ks.as_binary(), vs.as_binary())?;
    }
    let mut x = 12345u64;
    let mut times = Vec::new();
    for _ in 0..reps {
        let batches: Vec<(BinaryBuf, BinaryBuf)> = (0..BATCHES)
            .map(|_| {
                let items: Vec<usize> = (0..batch)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (x >> 20) as usize % keys
                    })
                    .collect();
                (
                    BinaryBuf::from_slices(items.iter().map(|&i| key(i))),
                    BinaryBuf::from_slices(items.iter().map(|&i| vec![i as u8 ^ 1; value_bytes])),
                )
            })
            .collect();
        let t0 = Instant::now();
        for (ks, vs) in &batches {
            t.put(ks.as_binary(), vs.as_binary())?;
        }
        times.push(t0.elapsed().as_secs_f64() / (BATCHES * batch) as f64 * 1e9);
    }
    times.sort_by(f64::total_cmp);
    let d = t.describe();
    println!(
        "{keys} keys, {value_bytes} B values, batches of {batch}: {:.0} ns an overwritten key (median of {reps}); \
         held {:.0} MiB, live {:.0} MiB, ratio {:.3}, compacted {:.0} MiB",
        times[times.len() / 2],
        d.arena.held_bytes as f64 / 1048576.0,
        d.arena.live_bytes as f64 / 1048576.0,
        d.arena.fragmentation(),
        d.arena.compacted_bytes as f64 / 1048576.0,
    );
    Ok(())
}
