//! Stress tests of the CUDA backend against a `std::collections::HashMap`: duplicates,
//! sentinel keys, widths 1/2/16, growth, tombstone purges, batches of a million keys and
//! more, device-resident batches, concurrent readers and writers, out-of-memory, plus a
//! throughput report. Without a CUDA device every trial is reported as ignored (after
//! `skipped: no CUDA device ...`), unless `VRAMKV_REQUIRE_CUDA=1`.

use std::collections::HashMap;
use std::time::Instant;

use kv_backend_cuda::CudaBackend;
use kv_conformance::libtest_mimic::{Arguments, Failed, Trial};
use kv_core::{Error, KvBackend, TableConfig};

type R = Result<(), Failed>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A key from `0..range`, with the sentinel-valued keys and 0 mixed in.
    fn key(&mut self, range: u64) -> u64 {
        match self.next() % 64 {
            0 => u64::MAX,
            1 => u64::MAX - 1,
            2 => 0,
            _ => self.next() % range,
        }
    }
}

fn open(cfg: TableConfig) -> Result<CudaBackend, Failed> {
    CudaBackend::open(cfg).map_err(|e| format!("open: {e}").into())
}

fn e(what: &str, err: Error) -> Failed {
    format!("{what}: {err}").into()
}

/// The table agrees with the model on `probe` (values, found flags, contains) and on len,
/// and the device's own count of live keys and tombstones agrees with the host's books.
fn check(t: &CudaBackend, m: &HashMap<u64, Vec<u64>>, probe: &[u64], ctx: &str) -> R {
    let w = t.width();
    let mut vals = vec![u64::MAX; probe.len() * w];
    let mut found = vec![false; probe.len()];
    t.get(probe, &mut vals, &mut found)
        .map_err(|x| e("get", x))?;
    let mut cont = vec![false; probe.len()];
    t.contains(probe, &mut cont).map_err(|x| e("contains", x))?;
    for (i, k) in probe.iter().enumerate() {
        let row = &vals[i * w..(i + 1) * w];
        match m.get(k) {
            Some(v) if !found[i] || row != &v[..] || !cont[i] => {
                return Err(format!(
                    "{ctx}: key {k:#x}: found {} {row:?} contains {}, expected {v:?}",
                    found[i], cont[i]
                )
                .into());
            }
            None if found[i] || cont[i] || row.iter().any(|x| *x != 0) => {
                return Err(format!(
                    "{ctx}: missing key {k:#x} reads found {} {row:?} contains {}",
                    found[i], cont[i]
                )
                .into());
            }
            _ => {}
        }
    }
    if t.len() != m.len() {
        return Err(format!("{ctx}: len {} expected {}", t.len(), m.len()).into());
    }
    let a = t.audit().map_err(|x| e("audit", x))?;
    if !a.agrees() {
        return Err(format!(
            "{ctx}: device counts {} keys {} tombstones, host {} / {}",
            a.device_live, a.device_tombstones, a.host_live, a.host_tombstones
        )
        .into());
    }
    Ok(())
}

fn random_ops(width: usize, rounds: usize, max_batch: usize, range: u64, seed: u64) -> R {
    let t = open(TableConfig::new(64).width(width))?;
    let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut rng = Rng(seed);
    for round in 0..rounds {
        let n = (rng.next() as usize % max_batch) + 1;
        let keys: Vec<u64> = (0..n).map(|_| rng.key(range)).collect();
        if rng.next() % 3 < 2 {
            let vals: Vec<u64> = (0..n * width).map(|_| rng.next()).collect();
            t.put(&keys, &vals).map_err(|x| e("put", x))?;
            for (i, k) in keys.iter().enumerate() {
                m.insert(*k, vals[i * width..(i + 1) * width].to_vec());
            }
        } else {
            let got = t.delete(&keys).map_err(|x| e("delete", x))?;
            let want = keys.iter().filter(|k| m.remove(k).is_some()).count();
            if got != want {
                return Err(format!("round {round}: delete removed {got}, expected {want}").into());
            }
        }
        let probe: Vec<u64> = (0..256).map(|_| rng.key(range)).collect();
        check(&t, &m, &probe, &format!("w{width} round {round}"))?;
    }
    let all: Vec<u64> = m.keys().copied().collect();
    check(&t, &m, &all, &format!("w{width} final"))
}

fn stress_widths() -> R {
    for (w, seed) in [(1, 1), (2, 2), (16, 3)] {
        // Small range: heavy duplication and overwrites; larger batches: growth and purges.
        random_ops(w, 150, 3000, 2000, seed)?;
        random_ops(w, 40, 50_000, 1 << 20, seed + 100)?;
    }
    Ok(())
}

fn last_wins_across_chunks() -> R {
    // Larger than one staging chunk (so several chunks and lanes), every key repeated
    // across chunk boundaries: the batch's last occurrence must win.
    let n = 6_000_000usize;
    let t = open(TableConfig::new(1 << 16))?; // grows on the way
    let keys: Vec<u64> = (0..n as u64).map(|i| i % 1_000_003).collect();
    let vals: Vec<u64> = (0..n as u64).collect();
    t.put(&keys, &vals).map_err(|x| e("put", x))?;
    let mut m = HashMap::new();
    for (k, v) in keys.iter().zip(&vals) {
        m.insert(*k, vec![*v]);
    }
    let probe: Vec<u64> = (0..1_000_010u64).collect();
    check(&t, &m, &probe, "6M put over 1M keys")
}

fn million_key_batches() -> R {
    for w in [1usize, 2, 16] {
        let n: usize = if w == 16 { 1 << 20 } else { 4 << 20 };
        let t = open(TableConfig::new(1000).width(w))?; // many growths
        let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut rng = Rng(77 + w as u64);
        for round in 0..3 {
            let keys: Vec<u64> = (0..n).map(|_| rng.key(3 * n as u64)).collect();
            let vals: Vec<u64> = (0..n * w).map(|_| rng.next()).collect();
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

fn tombstone_churn() -> R {
    // Insert/delete cycles at a fixed capacity without growth: only purges keep it going.
    let t = open(TableConfig::new(100_000).growth(false))?;
    let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut next = 0u64;
    for round in 0..40 {
        let keys: Vec<u64> = (next..next + 60_000).collect();
        next += 60_000;
        t.put(&keys, &keys).map_err(|x| e("put", x))?;
        for k in &keys {
            m.insert(*k, vec![*k]);
        }
        let got = t.delete(&keys).map_err(|x| e("delete", x))?;
        if got != keys.len() {
            return Err(format!("round {round}: removed {got}").into());
        }
        for k in &keys {
            m.remove(k);
        }
    }
    t.put(&[5, u64::MAX], &[6, 7]).map_err(|x| e("put", x))?;
    m.insert(5, vec![6]);
    m.insert(u64::MAX, vec![7]);
    check(&t, &m, &[5, u64::MAX, u64::MAX - 1, 0, 1], "after churn")
}

fn device_resident() -> R {
    let w = 2;
    let t = open(TableConfig::new(1 << 20).width(w))?;
    let stream = t.new_stream().map_err(|x| e("stream", x))?;
    let n = 3_000_000usize;
    let mut rng = Rng(9);
    let keys: Vec<u64> = (0..n).map(|_| rng.key(1 << 21)).collect();
    let vals: Vec<u64> = (0..n * w).map(|_| rng.next()).collect();
    let d_keys = stream.clone_htod(&keys).map_err(|x| format!("htod {x}"))?;
    let d_vals = stream.clone_htod(&vals).map_err(|x| format!("htod {x}"))?;
    t.put_device(&d_keys, &d_vals)
        .map_err(|x| e("put_device", x))?;
    let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
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
    let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut rng = Rng(4242);
    for round in 0..2 {
        let (keys, vals) = b.keys_values_mut();
        for k in keys.iter_mut() {
            *k = rng.key(1 << 21);
        }
        for v in vals.iter_mut() {
            *v = rng.next();
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

fn concurrent_readers_and_writers() -> R {
    let t = std::sync::Arc::new(open(TableConfig::new(1 << 16))?);
    let writers: Vec<_> = (0..4u64)
        .map(|th| {
            let t = t.clone();
            std::thread::spawn(move || -> Result<(), String> {
                for round in 0..20u64 {
                    let keys: Vec<u64> = (0..20_000).map(|i| (i << 8) | th).collect();
                    let vals = vec![round * 10 + th; keys.len()];
                    t.put(&keys, &vals).map_err(|x| x.to_string())?;
                    let mut v = vec![0; keys.len()];
                    let mut f = vec![false; keys.len()];
                    t.get(&keys, &mut v, &mut f).map_err(|x| x.to_string())?;
                    // Batches are atomic: a reader sees a whole put, never a mix.
                    if !f.iter().all(|x| *x)
                        || v.iter().any(|x| *x % 10 != th || *x > round * 10 + th)
                    {
                        return Err(format!("thread {th} round {round}: torn read"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join()
            .map_err(|_| "thread panicked")?
            .map_err(Failed::from)?;
    }
    if t.len() != 80_000 {
        return Err(format!("len {}", t.len()).into());
    }
    Ok(())
}

fn out_of_memory_is_an_error() -> R {
    // 2^32 slots of 16-word values: far past any GPU. Must be an error, not a panic.
    match CudaBackend::open(TableConfig::new(3 << 30).width(16).max_load_factor(0.95)) {
        Err(Error::OutOfDeviceMemory { .. }) => {}
        Err(other) => return Err(format!("expected OutOfDeviceMemory, got {other}").into()),
        Ok(_) => return Err("a 600 GB table opened".into()),
    }
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
    let mut m = HashMap::new();
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
        let mut vals = vec![0u64; n];
        let mut found = vec![false; n];
        // Warm-up (lanes, JIT, page faults of the output buffers).
        t.put(&keys[..n / 10], &keys[..n / 10])
            .map_err(|x| e("put", x))?;
        t.get(&keys[..n / 10], &mut vals[..n / 10], &mut found[..n / 10])
            .map_err(|x| e("get", x))?;
        let s = Instant::now();
        t.put(&keys, &keys).map_err(|x| e("put", x))?;
        let put = s.elapsed().as_secs_f64();
        let s = Instant::now();
        t.get(&keys, &mut vals, &mut found)
            .map_err(|x| e("get", x))?;
        let get = s.elapsed().as_secs_f64();
        if vals != keys || !found.iter().all(|f| *f) {
            return Err(format!("{n}: wrong values in the throughput run").into());
        }
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

fn main() {
    let mut args = Arguments::from_args();
    // One trial at a time: the OOM trial fills the GPU, and the throughput report wants it alone.
    args.test_threads.get_or_insert(1);
    let reason = kv_backend_cuda::unavailable_reason();
    let required = std::env::var_os(kv_backend_cuda::REQUIRE_ENV).is_some_and(|v| v != "0");
    if let Some(r) = &reason {
        println!("skipped: no CUDA device: {r}");
    }
    type Test = (&'static str, fn() -> R);
    let tests: Vec<Test> = vec![
        ("stress_widths_1_2_16", stress_widths),
        ("last_wins_across_chunks", last_wins_across_chunks),
        ("million_key_batches", million_key_batches),
        ("tombstone_churn", tombstone_churn),
        ("device_resident", device_resident),
        ("pinned_batches", pinned_batches),
        (
            "concurrent_readers_and_writers",
            concurrent_readers_and_writers,
        ),
        ("out_of_memory_is_an_error", out_of_memory_is_an_error),
        ("throughput_report", throughput_report),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| match (&reason, required) {
            (None, _) => Trial::test(name, f),
            (Some(r), true) => {
                let r = r.clone();
                Trial::test(name, move || Err(format!("no CUDA device: {r}").into()))
            }
            (Some(_), false) => Trial::test(name, || Ok(())).with_ignored_flag(true),
        })
        .collect();
    kv_conformance::libtest_mimic::run(&args, trials).exit();
}
