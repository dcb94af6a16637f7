//! Stress tests of the CUDA backend against a `std::collections::HashMap`: the shared
//! stress suite (`kv_conformance::stress`: random operations at widths 1, 2 and 16,
//! last-wins across chunks, tombstone churn, concurrent readers and writers) at GPU sizes,
//! plus the CUDA-only trials below: batches of a million keys and more, device-resident
//! and pinned batches, out-of-memory, and a throughput report. Trials run one at a time.
//! Without a CUDA device every trial is reported as ignored (after
//! `skipped: no CUDA device ...`), unless `VRAMKV_REQUIRE_CUDA=1`.

use std::time::Instant;

use kv_backend_cuda::CudaBackend;
use kv_conformance::libtest_mimic::Failed;
use kv_conformance::stress::{
    self, Adversarial, Churn, Concurrent, LastWins, Map, R, RandomOps, Rng, StressSizes, check, e,
};
use kv_core::{Error, KvBackend, TableConfig};

/// Batches of tens of thousands to millions of keys: seconds on a data-centre GPU.
const SIZES: StressSizes = StressSizes {
    widths: &[1, 2, 16],
    random_ops: &[
        // Small range: heavy duplication and overwrites; larger batches: growth and purges.
        RandomOps {
            rounds: 150,
            max_batch: 3000,
            range: 2000,
        },
        RandomOps {
            rounds: 40,
            max_batch: 50_000,
            range: 1 << 20,
        },
    ],
    last_wins: LastWins {
        n: 6_000_000,
        distinct: 1_000_003,
        initial_capacity: 1 << 16,
    },
    churn: Churn {
        capacity: 100_000,
        batch: 60_000,
        rounds: 40,
    },
    concurrent: Concurrent {
        threads: 4,
        rounds: 20,
        keys: 20_000,
        initial_capacity: 1 << 16,
    },
    adversarial: Adversarial {
        one_home: 100_000,
        capacity: 300_000,
        churn: 20_000,
        batch: 30_000,
    },
};

fn open(cfg: TableConfig) -> Result<CudaBackend, Failed> {
    CudaBackend::open(cfg).map_err(|x| e("open", x))
}

fn open_boxed(cfg: TableConfig) -> kv_core::Result<Box<dyn KvBackend>> {
    Ok(Box::new(CudaBackend::open(cfg)?))
}

fn million_key_batches() -> R {
    for w in [1usize, 2, 16] {
        let n: usize = if w == 16 { 1 << 20 } else { 4 << 20 };
        let t = open(TableConfig::new(1000).width(w))?; // many growths
        let mut m: Map = Map::new();
        let mut rng = Rng::new(77 + w as u64);
        for round in 0..3 {
            let keys: Vec<u64> = (0..n).map(|_| rng.key(3 * n as u64)).collect();
            let vals: Vec<u64> = (0..n * w).map(|_| rng.next_u64()).collect();
            t.put(&keys, &vals).map_err(|x| e("put", x))?;
            for (i, k) in keys.iter().enumerate() {
                m.insert(*k, vals[i * w..(i + 1) * w].to_vec());
            }
            let del: Vec<u64> = keys[..n / 3].to_vec();
            let got = t.delete(&del).map_err(|x| e("delete", x))?;
            let want = del.iter().filter(|k| m.remove(k).is_some()).count();
            if got != want {
                return Err(
                    format!("w{w} round {round}: delete removed {got}, expected {want}").into(),
                );
            }
            let probe: Vec<u64> = (0..n as u64)
                .map(|i| i * 3 % (3 * n as u64))
                .chain([u64::MAX, u64::MAX - 1])
                .collect();
            check(&t, &m, &probe, &format!("w{w} 1M+ round {round}"))?;
        }
        let all: Vec<u64> = m.keys().copied().collect();
        check(&t, &m, &all, &format!("w{w} 1M+ final"))?;
    }
    Ok(())
}

fn device_resident() -> R {
    let w = 2;
    let t = open(TableConfig::new(1 << 20).width(w))?;
    let stream = t.new_stream().map_err(|x| e("stream", x))?;
    let n = 3_000_000usize;
    let mut rng = Rng::new(9);
    let keys: Vec<u64> = (0..n).map(|_| rng.key(1 << 21)).collect();
    let vals: Vec<u64> = (0..n * w).map(|_| rng.next_u64()).collect();
    let d_keys = stream.clone_htod(&keys).map_err(|x| format!("htod {x}"))?;
    let d_vals = stream.clone_htod(&vals).map_err(|x| format!("htod {x}"))?;
    t.put_device(&d_keys, &d_vals)
        .map_err(|x| e("put_device", x))?;
    let mut m: Map = Map::new();
    for (i, k) in keys.iter().enumerate() {
        m.insert(*k, vals[i * w..(i + 1) * w].to_vec());
    }
    let probe: Vec<u64> = (0..(1u64 << 21)).chain([u64::MAX, u64::MAX - 1]).collect();
    check(&t, &m, &probe, "after put_device")?;
    let d_probe = stream.clone_htod(&probe).map_err(|x| format!("htod {x}"))?;
    let mut d_out = stream
        .alloc_zeros::<u64>(probe.len() * w)
        .map_err(|x| format!("alloc {x}"))?;
    let mut d_found = stream
        .alloc_zeros::<u8>(probe.len())
        .map_err(|x| format!("alloc {x}"))?;
    t.get_device(&d_probe, &mut d_out, &mut d_found)
        .map_err(|x| e("get_device", x))?;
    let out = stream.clone_dtoh(&d_out).map_err(|x| format!("dtoh {x}"))?;
    let found = stream
        .clone_dtoh(&d_found)
        .map_err(|x| format!("dtoh {x}"))?;
    for (i, k) in probe.iter().enumerate() {
        let want = m.get(k);
        let row = &out[i * w..(i + 1) * w];
        if (found[i] == 1) != want.is_some()
            || want.is_some_and(|v| row != &v[..])
            || (want.is_none() && row != [0, 0])
        {
            return Err(format!(
                "get_device key {k:#x}: {} {row:?}, expected {want:?}",
                found[i]
            )
            .into());
        }
    }
    Ok(())
}

fn pinned_batches() -> R {
    // Lent page-locked batches: many chunks, repeats across chunk boundaries, sentinel keys,
    // a shorter length, and the plain API reading what the pinned one wrote (and back).
    let w = 2;
    let t = open(TableConfig::new(1 << 16).width(w))?; // grows on the way
    let n = 3_000_000usize;
    let mut b = t.pinned_batch(n).map_err(|x| e("pinned_batch", x))?;
    let mut m: Map = Map::new();
    let mut rng = Rng::new(4242);
    for round in 0..2 {
        let (keys, vals) = b.keys_values_mut();
        for k in keys.iter_mut() {
            *k = rng.key(1 << 21);
        }
        for v in vals.iter_mut() {
            *v = rng.next_u64();
        }
        t.put_pinned(&b).map_err(|x| e("put_pinned", x))?;
        for (i, k) in b.keys().iter().enumerate() {
            m.insert(*k, b.values()[i * w..(i + 1) * w].to_vec());
        }
        let probe: Vec<u64> = (0..(1u64 << 21)).chain([u64::MAX, u64::MAX - 1]).collect();
        check(&t, &m, &probe, &format!("after put_pinned round {round}"))?;
        b.set_len(probe.len()).map_err(|x| e("set_len", x))?;
        b.keys_mut().copy_from_slice(&probe);
        t.get_pinned(&mut b).map_err(|x| e("get_pinned", x))?;
        for (i, k) in probe.iter().enumerate() {
            let row = &b.values()[i * w..(i + 1) * w];
            let want = m.get(k);
            if (b.found()[i] == 1) != want.is_some()
                || want.is_some_and(|v| row != &v[..])
                || (want.is_none() && row != [0, 0])
            {
                return Err(format!(
                    "get_pinned key {k:#x}: {} {row:?}, expected {want:?}",
                    b.found()[i]
                )
                .into());
            }
        }
        b.set_len(n).map_err(|x| e("set_len", x))?;
    }
    if b.set_len(n + 1).is_ok() {
        return Err("set_len past the capacity succeeded".into());
    }
    // A batch of another width is refused and changes nothing.
    let other = open(TableConfig::new(16).width(1))?;
    let mut b1 = other.pinned_batch(10).map_err(|x| e("pinned_batch", x))?;
    b1.keys_mut()
        .copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    match t.put_pinned(&b1) {
        Err(Error::LengthMismatch { .. }) => {}
        other => return Err(format!("width mismatch: {other:?}").into()),
    }
    if t.get_pinned(&mut b1).is_ok() {
        return Err("get_pinned of a batch of another width succeeded".into());
    }
    let mut empty = t.pinned_batch(0).map_err(|x| e("pinned_batch", x))?;
    t.put_pinned(&empty).map_err(|x| e("empty put_pinned", x))?;
    t.get_pinned(&mut empty)
        .map_err(|x| e("empty get_pinned", x))?;
    check(
        &t,
        &m,
        &[1, 2, 3, u64::MAX, u64::MAX - 1],
        "after refused batches",
    )
}

fn out_of_memory_is_an_error() -> R {
    // 2^32 slots of 16-word values: far past any GPU. Must be an error, not a panic.
    stress::huge_table_is_out_of_memory(&open_boxed)?;
    // Growth that cannot be allocated leaves the table as it was: fill the device up with a
    // blocker allocation, then ask for a growth bigger than what is left.
    let t = open(TableConfig::new(16))?;
    t.put(&[1, 2, u64::MAX], &[7, 8, 9])
        .map_err(|x| e("put", x))?;
    let stream = t.new_stream().map_err(|x| e("stream", x))?;
    let free = t
        .context()
        .mem_get_info()
        .map_err(|x| format!("mem_get_info {x}"))?
        .0;
    let blocker = stream
        .alloc_zeros::<u8>(free.saturating_sub(256 << 20))
        .map_err(|x| format!("blocker {x}"))?;
    stream.synchronize().map_err(|x| format!("sync {x}"))?;
    let n = 40_000_000usize; // growth to 2^26 slots = 1 GiB of keys and values
    let keys: Vec<u64> = (10..10 + n as u64).collect();
    let r = t.put(&keys, &keys);
    drop(blocker);
    stream.synchronize().map_err(|x| format!("sync {x}"))?;
    match r {
        Err(Error::OutOfDeviceMemory { .. }) => {}
        Err(other) => return Err(format!("expected OutOfDeviceMemory, got {other}").into()),
        Ok(()) => return Err("a growth past the free memory succeeded".into()),
    }
    let mut m = Map::new();
    m.insert(1, vec![7]);
    m.insert(2, vec![8]);
    m.insert(u64::MAX, vec![9]);
    check(
        &t,
        &m,
        &[1, 2, 3, u64::MAX, u64::MAX - 1],
        "after refused growth",
    )?;
    if t.describe().slots != 32 {
        return Err(format!("slots changed to {}", t.describe().slots).into());
    }
    // And the same put works once the memory is back.
    t.put(&keys, &keys).map_err(|x| e("put after OOM", x))?;
    Ok(())
}

fn throughput_report() -> R {
    let dev = kv_backend_cuda::devices().map_err(|x| e("devices", x))?;
    println!(
        "\n  device: {} ({:.1} GiB free)",
        dev[0].name,
        dev[0].free_bytes as f64 / (1u64 << 30) as f64
    );
    for n in [2_000_000usize, 20_000_000, 100_000_000] {
        let t = open(TableConfig::new(n))?;
        let keys: Vec<u64> = (0..n as u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let (put, get) = stress::timed_put_get(&t, &keys)?;
        // Device-resident, same keys (updates) and lookups.
        let stream = t.new_stream().map_err(|x| e("stream", x))?;
        let d_keys = stream.clone_htod(&keys).map_err(|x| format!("htod {x}"))?;
        let mut d_out = stream
            .alloc_zeros::<u64>(n)
            .map_err(|x| format!("alloc {x}"))?;
        let mut d_found = stream
            .alloc_zeros::<u8>(n)
            .map_err(|x| format!("alloc {x}"))?;
        stream.synchronize().map_err(|x| format!("sync {x}"))?;
        let s = Instant::now();
        t.put_device(&d_keys, &d_keys)
            .map_err(|x| e("put_device", x))?;
        let dput = s.elapsed().as_secs_f64();
        let s = Instant::now();
        t.get_device(&d_keys, &mut d_out, &mut d_found)
            .map_err(|x| e("get_device", x))?;
        let dget = s.elapsed().as_secs_f64();
        let g = |secs: f64| n as f64 / secs / 1e9;
        println!(
            "  u64->u64 n={n:>11}: host put {:6.3} G/s, host get {:6.3} G/s | device-resident update {:6.3} G/s, find {:6.3} G/s (load {:.2})",
            g(put),
            g(get),
            g(dput),
            g(dget),
            t.len() as f64 / t.describe().slots as f64
        );
    }
    Ok(())
}

// One trial at a time (the macro's default; scripts pass --test-threads=1 too): the OOM
// trial fills the GPU, and the throughput report wants it alone.
kv_conformance::stress_main! {
    backend: "cuda",
    open: open_boxed,
    availability: || kv_conformance::Availability::unless_missing(
        kv_backend_cuda::unavailable_reason(),
        kv_backend_cuda::REQUIRE_ENV,
        "no CUDA device",
    ),
    sizes: SIZES,
    extra: [
        ("million_key_batches", million_key_batches),
        ("device_resident", device_resident),
        ("pinned_batches", pinned_batches),
        ("out_of_memory_is_an_error", out_of_memory_is_an_error),
        ("throughput_report", throughput_report),
    ],
}
