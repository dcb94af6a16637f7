//! Stress tests of the wgpu backend against a `std::collections::HashMap`: duplicates,
//! keys around the sentinels, widths 1 to 16, growth across several rehashes, tombstone
//! purges, tables split over many segments (storage bindings), a table larger than one
//! real binding, batches over several chunks, and several threads at once, plus a short
//! throughput report. Sizes are kept for lavapipe on two cores. Without an adapter every
//! trial is reported as ignored (after `skipped: no wgpu adapter ...`), unless
//! `VRAMKV_REQUIRE_WGPU=1`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kv_backend_wgpu::WgpuBackend;
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
    /// A key from `0..range`, with the keys around both ends of the u64 range mixed in.
    fn key(&mut self, range: u64) -> u64 {
        match self.next() % 32 {
            0 => u64::MAX - self.next() % 3,
            1 => self.next() % 3,
            _ => self.next() % range,
        }
    }
}

fn open(cfg: TableConfig) -> Result<WgpuBackend, Failed> {
    WgpuBackend::open(cfg).map_err(|e| format!("open: {e}").into())
}

fn e(what: &str, err: Error) -> Failed {
    format!("{what}: {err}").into()
}

/// The table agrees with the model on `probe` (values, found flags, contains) and on len,
/// and the device's count of live keys and tombstones agrees with the host's books.
fn check(t: &WgpuBackend, m: &HashMap<u64, Vec<u64>>, probe: &[u64], ctx: &str) -> R {
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

/// Random puts (two thirds) and deletes against the model; `seg_bytes` caps the segments.
fn random_ops(
    width: usize,
    rounds: usize,
    max_batch: usize,
    range: u64,
    seed: u64,
    seg_bytes: u64,
) -> R {
    let t = WgpuBackend::open_with_max_segment_bytes(TableConfig::new(64).width(width), seg_bytes)
        .map_err(|x| e("open", x))?;
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
    check(&t, &m, &all, &format!("w{width} final"))?;
    println!(
        "  w{width}: {} entries, {} slots in {} segments",
        t.len(),
        t.describe().slots,
        t.segments()
    );
    Ok(())
}

fn widths_1_to_16() -> R {
    for w in 1..=16usize {
        // Small key range: heavy duplication and overwrites, growth from 64 entries.
        random_ops(w, 12, 3000, 4000, w as u64, u64::MAX)?;
    }
    Ok(())
}

fn many_segments() -> R {
    // Segments of 4 KiB: a few thousand slots already span many bindings, so growth moves
    // keys across segments and lookups cross segment boundaries.
    let t = WgpuBackend::open(TableConfig::new(16)).map_err(|x| e("open", x))?;
    let max = t.max_segments();
    drop(t);
    for (w, seed) in [(1usize, 11u64), (3, 12), (16, 13)] {
        // The largest table reached must stay within the adapter's binding limit.
        let seg_bytes = 4096u64.max((w as u64 * 8 * 16_384).div_ceil(max as u64));
        random_ops(w, 25, 2000, 6000, seed, seg_bytes)?;
    }
    Ok(())
}

fn last_wins_across_chunks() -> R {
    // Several chunks (and lanes), every key repeated across chunk boundaries: the batch's
    // last occurrence must win.
    let n = 1_500_000usize;
    let t = open(TableConfig::new(1 << 12))?; // grows on the way
    let keys: Vec<u64> = (0..n as u64).map(|i| i % 300_007).collect();
    let vals: Vec<u64> = (0..n as u64).collect();
    t.put(&keys, &vals).map_err(|x| e("put", x))?;
    let mut m = HashMap::new();
    for (k, v) in keys.iter().zip(&vals) {
        m.insert(*k, vec![*v]);
    }
    let probe: Vec<u64> = (0..300_010u64).collect();
    check(&t, &m, &probe, "1.5M put over 300k keys")
}

/// Puts `keys` (rows from `val`) into the table and the model.
fn put_both(
    t: &WgpuBackend,
    m: &mut HashMap<u64, Vec<u64>>,
    keys: &[u64],
    val: impl Fn(usize, usize) -> u64,
) -> R {
    let w = t.width();
    let vals: Vec<u64> = (0..keys.len() * w).map(|x| val(x / w, x % w)).collect();
    t.put(keys, &vals).map_err(|x| e("put", x))?;
    for (i, k) in keys.iter().enumerate() {
        m.insert(*k, vals[i * w..(i + 1) * w].to_vec());
    }
    Ok(())
}

fn overwrite_only_chunks() -> R {
    // Batches of several chunks whose keys are all distinct and all already present: no
    // chunk repeats a key, every item overwrites an earlier batch.
    let n = 600_000usize;
    let t = open(TableConfig::new(n).width(2))?;
    let mut m = HashMap::new();
    let keys: Vec<u64> = (0..n as u64).map(|i| i * 7 + 2).collect();
    put_both(&t, &mut m, &keys, |i, j| (i * 2 + j) as u64)?;
    for round in 1..4u64 {
        // A different order each round (a stride coprime to n, a shift).
        let perm: Vec<u64> = (0..n)
            .map(|i| keys[(i * 7919 + round as usize * 1000) % n])
            .collect();
        put_both(&t, &mut m, &perm, |i, j| round << 40 | (i * 2 + j) as u64)?;
        if t.len() != n {
            return Err(format!(
                "round {round}: len {} after overwrites of {n} keys",
                t.len()
            )
            .into());
        }
    }
    // Half overwrites, half new keys.
    let mixed: Vec<u64> = (0..n as u64)
        .map(|i| if i % 2 == 0 { i * 7 + 2 } else { i * 7 + 3 })
        .collect();
    put_both(&t, &mut m, &mixed, |i, j| (i * 3 + j) as u64)?;
    let probe: Vec<u64> = (0..n as u64 * 7 + 4).step_by(3).collect();
    check(&t, &m, &probe, "overwrite-only chunks")
}

fn heavy_in_chunk_repeats() -> R {
    // One key repeated thousands of times, the sentinel-valued keys and the keys at the top
    // of the u64 range repeated, amid a small key range: the last occurrence wins, each
    // key counts once.
    for w in [1usize, 3] {
        let t = open(TableConfig::new(64).width(w))?;
        let mut m = HashMap::new();
        let mut rng = Rng(900 + w as u64);
        for round in 0..4 {
            let n = [5_000usize, 50_000, 200_000, 9_000][round];
            let keys: Vec<u64> = (0..n)
                .map(|i| match i % 11 {
                    0 | 5 => 7,
                    1 => rng.next() % 3,
                    2 => u64::MAX - rng.next() % 2,
                    _ => rng.key(2_000),
                })
                .collect();
            put_both(&t, &mut m, &keys, |i, j| {
                (round as u64) << 48 | (i * w + j) as u64
            })?;
            let probe: Vec<u64> = (0..2_010u64).chain([u64::MAX, u64::MAX - 1]).collect();
            check(&t, &m, &probe, &format!("w{w} repeats round {round}"))?;
        }
        // A batch of one key only.
        let keys = vec![123_456u64; 70_000];
        put_both(&t, &mut m, &keys, |i, j| (i * w + j) as u64)?;
        let keys = vec![1u64; 70_000];
        put_both(&t, &mut m, &keys, |i, j| (i * w + j) as u64 + 5)?;
        check(
            &t,
            &m,
            &[123_456, 1, 0, 7],
            &format!("w{w} single-key batches"),
        )?;
    }
    Ok(())
}

fn repeats_across_chunk_boundaries() -> R {
    // Keys repeated within chunks and across them (and batches), sentinels included.
    let n = 700_000usize;
    let t = open(TableConfig::new(1 << 10))?;
    let mut m = HashMap::new();
    for round in 0..3u64 {
        let keys: Vec<u64> = (0..n as u64)
            .map(|i| match i % 97 {
                0 => i % 2,
                _ => (i * 31 + round) % 70_001 + 2,
            })
            .collect();
        put_both(&t, &mut m, &keys, |i, _| round << 40 | i as u64)?;
        let probe: Vec<u64> = (0..70_010u64).collect();
        check(&t, &m, &probe, &format!("round {round}"))?;
    }
    Ok(())
}

fn tombstone_reuse_with_repeats() -> R {
    // Keys deleted (tombstones on their probe paths), then put again several times within
    // one batch: each is placed once (a tombstone reused, no ghost copy further on).
    for w in [1usize, 2] {
        let t = open(TableConfig::new(50_000).width(w).growth(false))?;
        let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
        let keys: Vec<u64> = (2..30_002u64).collect();
        put_both(&t, &mut m, &keys, |i, j| (i + j) as u64)?;
        for round in 0..4u64 {
            let del: Vec<u64> = keys
                .iter()
                .copied()
                .filter(|k| k % 3 != round % 3)
                .collect();
            let got = t.delete(&del).map_err(|x| e("delete", x))?;
            let want = del.iter().filter(|k| m.remove(k).is_some()).count();
            if got != want {
                return Err(format!("w{w} round {round}: removed {got}, expected {want}").into());
            }
            // Every deleted key three times, in an order that spreads the repeats.
            let again: Vec<u64> = (0..del.len() * 3)
                .map(|i| del[(i * 7 + i / del.len()) % del.len()])
                .collect();
            put_both(&t, &mut m, &again, |i, j| round << 40 | (i * w + j) as u64)?;
            check(&t, &m, &keys, &format!("w{w} reuse round {round}"))?;
        }
    }
    Ok(())
}

fn growth_across_rehashes() -> R {
    for w in [1usize, 4] {
        let t = open(TableConfig::new(16).width(w))?;
        let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut rng = Rng(50 + w as u64);
        let mut grown = 0;
        let mut slots = t.describe().slots;
        for round in 0..6 {
            let n = 20_000 << round;
            let keys: Vec<u64> = (0..n).map(|_| rng.key(1 << 40)).collect();
            let vals: Vec<u64> = (0..n * w).map(|_| rng.next()).collect();
            t.put(&keys, &vals).map_err(|x| e("put", x))?;
            for (i, k) in keys.iter().enumerate() {
                m.insert(*k, vals[i * w..(i + 1) * w].to_vec());
            }
            let del: Vec<u64> = keys.iter().step_by(3).copied().collect();
            let got = t.delete(&del).map_err(|x| e("delete", x))?;
            let want = del.iter().filter(|k| m.remove(k).is_some()).count();
            if got != want {
                return Err(format!("w{w} round {round}: removed {got}, expected {want}").into());
            }
            if t.describe().slots != slots {
                grown += 1;
                slots = t.describe().slots;
            }
            let probe: Vec<u64> = keys.iter().step_by(7).copied().chain([0, 1, 2]).collect();
            check(&t, &m, &probe, &format!("w{w} growth round {round}"))?;
        }
        if grown < 3 {
            return Err(format!("w{w}: only {grown} growths").into());
        }
        let all: Vec<u64> = m.keys().copied().collect();
        check(&t, &m, &all, &format!("w{w} growth final"))?;
    }
    Ok(())
}

fn tombstone_churn() -> R {
    // Insert/delete cycles at a fixed capacity without growth: only purges keep it going.
    let t = open(TableConfig::new(20_000).growth(false))?;
    let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut next = 2u64;
    for round in 0..30 {
        let keys: Vec<u64> = (next..next + 12_000).collect();
        next += 12_000;
        t.put(&keys, &keys).map_err(|x| e("put", x))?;
        let got = t.delete(&keys).map_err(|x| e("delete", x))?;
        if got != keys.len() {
            return Err(format!("round {round}: removed {got}").into());
        }
    }
    t.put(&[5, u64::MAX, 0, 1], &[6, 7, 8, 9])
        .map_err(|x| e("put", x))?;
    for (k, v) in [(5, 6), (u64::MAX, 7), (0, 8), (1, 9)] {
        m.insert(k, vec![v]);
    }
    check(&t, &m, &[5, u64::MAX, u64::MAX - 1, 0, 1, 2], "after churn")
}

fn larger_than_one_binding() -> R {
    // Width 16 (128 B per slot) and 2^21 slots: 256 MiB of values, two segments on lavapipe
    // (128 MiB bindings), one on adapters with larger bindings.
    let w = 16usize;
    let n = 1_500_000usize;
    let t = open(TableConfig::new(n).width(w))?;
    let row = |k: u64, j: usize| k.rotate_left(j as u32 * 4) ^ j as u64;
    let keys: Vec<u64> = (0..n as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    for part in keys.chunks(500_000) {
        let vals: Vec<u64> = part
            .iter()
            .flat_map(|&k| (0..w).map(move |j| row(k, j)))
            .collect();
        t.put(part, &vals).map_err(|x| e("put", x))?;
    }
    let del: Vec<u64> = keys.iter().step_by(5).copied().collect();
    let removed = t.delete(&del).map_err(|x| e("delete", x))?;
    if removed != del.len() || t.len() != n - del.len() {
        return Err(format!("removed {removed}, len {}", t.len()).into());
    }
    let mut vals = vec![0u64; 400_000 * w];
    let mut found = vec![false; 400_000];
    for (c, part) in keys.chunks(400_000).enumerate() {
        let (v, f) = (&mut vals[..part.len() * w], &mut found[..part.len()]);
        t.get(part, v, f).map_err(|x| e("get", x))?;
        for (i, &k) in part.iter().enumerate() {
            let live = (c * 400_000 + i) % 5 != 0;
            let want: Vec<u64> = if live {
                (0..w).map(|j| row(k, j)).collect()
            } else {
                vec![0; w]
            };
            if f[i] != live || v[i * w..(i + 1) * w] != want[..] {
                return Err(
                    format!("key {k:#x}: found {} {:?}", f[i], &v[i * w..i * w + 2]).into(),
                );
            }
        }
    }
    let a = t.audit().map_err(|x| e("audit", x))?;
    if !a.agrees() {
        return Err(format!("device {a:?}").into());
    }
    println!(
        "  {} slots of {w} words in {} segments, {:.0} MiB on {}",
        t.describe().slots,
        t.segments(),
        t.describe().bytes_in_use as f64 / (1 << 20) as f64,
        t.adapter_name()
    );
    Ok(())
}

fn concurrent_readers_and_writers() -> R {
    let t = Arc::new(open(TableConfig::new(1 << 12))?);
    let writers: Vec<_> = (0..4u64)
        .map(|th| {
            let t = t.clone();
            std::thread::spawn(move || -> Result<(), String> {
                for round in 0..10u64 {
                    let keys: Vec<u64> = (0..5_000).map(|i| (i << 8) | th).collect();
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
                    if round % 3 == 2 {
                        let gone = t.delete(&keys[..100]).map_err(|x| x.to_string())?;
                        if gone != 100 {
                            return Err(format!("thread {th}: deleted {gone}"));
                        }
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
    if t.len() != 20_000 {
        return Err(format!("len {}", t.len()).into());
    }
    let a = t.audit().map_err(|x| e("audit", x))?;
    if a.device_live != a.host_live as u64 {
        return Err(format!("device {a:?}").into());
    }
    Ok(())
}

fn out_of_memory_is_an_error() -> R {
    // 2^32 slots of 16-word values: past any adapter. Must be an error, not a panic.
    match WgpuBackend::open(TableConfig::new(3 << 30).width(16).max_load_factor(0.95)) {
        Err(Error::OutOfDeviceMemory { .. }) => Ok(()),
        Err(other) => Err(format!("expected OutOfDeviceMemory, got {other}").into()),
        Ok(_) => Err("a 600 GB table opened".into()),
    }
}

fn throughput_report() -> R {
    let n = 1_000_000usize;
    let t = open(TableConfig::new(n))?;
    let keys: Vec<u64> = (0..n as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let mut vals = vec![0u64; n];
    let mut found = vec![false; n];
    t.put(&keys[..n / 10], &keys[..n / 10])
        .map_err(|x| e("put", x))?;
    let s = Instant::now();
    t.put(&keys, &keys).map_err(|x| e("put", x))?;
    let put = s.elapsed().as_secs_f64();
    let s = Instant::now();
    t.get(&keys, &mut vals, &mut found)
        .map_err(|x| e("get", x))?;
    let get = s.elapsed().as_secs_f64();
    if vals != keys || !found.iter().all(|f| *f) {
        return Err("wrong values in the throughput run".into());
    }
    println!(
        "  {}: u64->u64 n={n}: put {:.1} M/s, get {:.1} M/s",
        t.adapter_name(),
        n as f64 / put / 1e6,
        n as f64 / get / 1e6
    );
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // One trial at a time: lavapipe already uses every core for each dispatch.
    args.test_threads.get_or_insert(1);
    let reason = kv_backend_wgpu::unavailable_reason();
    let required = std::env::var_os(kv_backend_wgpu::REQUIRE_ENV).is_some_and(|v| v != "0");
    if let Some(r) = &reason {
        println!("skipped: no wgpu adapter: {r}");
    }
    type Test = (&'static str, fn() -> R);
    let tests: Vec<Test> = vec![
        ("widths_1_to_16", widths_1_to_16),
        ("many_segments", many_segments),
        ("last_wins_across_chunks", last_wins_across_chunks),
        ("overwrite_only_chunks", overwrite_only_chunks),
        ("heavy_in_chunk_repeats", heavy_in_chunk_repeats),
        (
            "repeats_across_chunk_boundaries",
            repeats_across_chunk_boundaries,
        ),
        ("tombstone_reuse_with_repeats", tombstone_reuse_with_repeats),
        ("growth_across_rehashes", growth_across_rehashes),
        ("tombstone_churn", tombstone_churn),
        ("larger_than_one_binding", larger_than_one_binding),
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
                Trial::test(name, move || Err(format!("no wgpu adapter: {r}").into()))
            }
            (Some(_), false) => Trial::test(name, || Ok(())).with_ignored_flag(true),
        })
        .collect();
    kv_conformance::libtest_mimic::run(&args, trials).exit();
}
