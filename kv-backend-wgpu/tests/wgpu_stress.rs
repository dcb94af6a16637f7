//! Stress tests of the wgpu backend against a `std::collections::HashMap`: the shared
//! stress suite (`kv_conformance::stress`: random operations at widths 1 to 16, last-wins
//! across chunks, tombstone churn, several threads at once) plus the wgpu-only trials
//! below: growth across several rehashes, tables split over many segments (storage
//! bindings), a table larger than one real binding (both exported and checked),
//! overwrite-only and repeat-heavy batches over several chunks, tombstone reuse,
//! out-of-memory and a short throughput report. Sizes are kept for lavapipe on two cores. Without an adapter every trial is
//! reported as ignored (after `skipped: no wgpu adapter ...`), unless
//! `VRAMKV_REQUIRE_WGPU=1`.

use kv_backend_wgpu::{WgpuBackend, WgpuOptions};
use kv_conformance::stress::{
    self, Map, R, RandomOps, Rng, StressSizes, check, check_audit, e, put_both,
};
use kv_core::{KvBackend, TableConfig};

fn open(cfg: TableConfig) -> Result<WgpuBackend, kv_conformance::libtest_mimic::Failed> {
    WgpuBackend::open(cfg).map_err(|x| e("open", x))
}

fn open_boxed(cfg: TableConfig) -> kv_core::Result<Box<dyn KvBackend>> {
    Ok(Box::new(WgpuBackend::open(cfg)?))
}

/// The table's export holds each live key once (as many as `len`), with the row a get
/// returns for it.
fn export_agrees(t: &WgpuBackend, ctx: &str) -> R {
    let w = t.width();
    let mut img = t.export().map_err(|x| e("export", x))?;
    img.sort();
    if img.keys.windows(2).any(|p| p[0] == p[1]) || img.len() != t.len() {
        return Err(format!("{ctx}: export of {} keys, len {}", img.len(), t.len()).into());
    }
    let mut vals = vec![0u64; img.len() * w];
    let mut found = vec![false; img.len()];
    t.get(&img.keys, &mut vals, &mut found)
        .map_err(|x| e("get", x))?;
    if found.iter().any(|f| !f) || vals != img.values {
        return Err(format!("{ctx}: exported rows differ from the table's").into());
    }
    Ok(())
}

fn many_segments() -> R {
    // Segments of 4 KiB: a few thousand slots already span many bindings, so growth moves
    // keys across segments and lookups cross segment boundaries. The segments are ranges of
    // one buffer per array (w1), of buffers of up to 3 value segments (w3, up to 9 key
    // segments), or each its own buffer (w16, buffers capped below any segment).
    let t = WgpuBackend::open(TableConfig::new(16)).map_err(|x| e("open", x))?;
    let max = t.max_segments();
    drop(t);
    for (w, seed, segs_per_buffer) in [(1usize, 11u64, u64::MAX), (3, 12, 3), (16, 13, 0)] {
        // The largest table reached must stay within the adapter's binding limit.
        let seg_bytes = 4096u64.max((w as u64 * 8 * 16_384).div_ceil(max as u64));
        let options = WgpuOptions::default()
            .segment_bytes(seg_bytes)
            .table_buffer_bytes(seg_bytes.saturating_mul(segs_per_buffer).max(1));
        let t = WgpuBackend::open_with(TableConfig::new(64).width(w), &options)
            .map_err(|x| e("open", x))?;
        let phase = RandomOps {
            rounds: 25,
            max_batch: 2000,
            range: 6000,
        };
        stress::random_ops(&t, phase, seed)?;
        export_agrees(&t, &format!("w{w}"))?;
        let (segs, bufs) = (t.segments(), t.table_buffers());
        let layout_ok = match segs_per_buffer {
            u64::MAX => bufs == 2,
            0 => bufs == 2 * segs,
            _ => 2 < bufs && bufs < 2 * segs,
        };
        if segs < 4 || !layout_ok {
            return Err(format!("w{w}: {segs} segments in {bufs} buffers").into());
        }
        println!("  w{w}: {segs} segments in {bufs} buffers");
    }
    Ok(())
}

fn overwrite_only_chunks() -> R {
    // Batches of several chunks whose keys are all distinct and all already present: no
    // chunk repeats a key, every item overwrites an earlier batch.
    let n = 600_000usize;
    let t = open(TableConfig::new(n).width(2))?;
    let mut m = Map::new();
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
        let mut m = Map::new();
        let mut rng = Rng::new(900 + w as u64);
        for round in 0..4 {
            let n = [5_000usize, 50_000, 200_000, 9_000][round];
            let keys: Vec<u64> = (0..n)
                .map(|i| match i % 11 {
                    0 | 5 => 7,
                    1 => rng.next_u64() % 3,
                    2 => u64::MAX - rng.next_u64() % 2,
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
    let mut m = Map::new();
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
        let mut m: Map = Map::new();
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
        let mut m: Map = Map::new();
        let mut rng = Rng::new(50 + w as u64);
        let mut grown = 0;
        let mut slots = t.describe().slots;
        for round in 0..6 {
            let n = 20_000 << round;
            let keys: Vec<u64> = (0..n).map(|_| rng.key(1 << 40)).collect();
            let vals: Vec<u64> = (0..n * w).map(|_| rng.next_u64()).collect();
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
    check_audit(&t, "after the deletes")?;
    // An export reads the whole table back, more than one staging chunk of it.
    let img = t.export().map_err(|x| e("export", x))?;
    if img.len() != n - del.len() {
        return Err(format!("export of {} keys, {} live", img.len(), n - del.len()).into());
    }
    for (i, &k) in img.keys.iter().enumerate() {
        if (0..w).any(|j| img.values[i * w + j] != row(k, j)) {
            return Err(format!("exported row of key {k:#x}").into());
        }
    }
    println!(
        "  {} slots of {w} words in {} segments of {} buffers, {:.0} MiB on {}",
        t.describe().slots,
        t.segments(),
        t.table_buffers(),
        t.describe().bytes_in_use as f64 / (1 << 20) as f64,
        t.adapter_name()
    );
    Ok(())
}

fn out_of_memory_is_an_error() -> R {
    stress::huge_table_is_out_of_memory(&open_boxed)
}

fn throughput_report() -> R {
    let n = 1_000_000usize;
    let t = open(TableConfig::new(n))?;
    let keys: Vec<u64> = (0..n as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let (put, get) = stress::timed_put_get(&t, &keys)?;
    println!(
        "  {}: u64->u64 n={n}: put {:.1} M/s, get {:.1} M/s",
        t.adapter_name(),
        n as f64 / put / 1e6,
        n as f64 / get / 1e6
    );
    Ok(())
}

/// The adversarial-key trials, and random operations, on tables whose probes stop after 32
/// slots per dispatch (so any chain past 32 slots goes through resume rounds: the dedup and
/// place passes of a put, lookups, deletes and rehashes) and whose arrays are split into
/// segments of a few hundred slots in buffers of three segments, so that the chains cross
/// segment and buffer boundaries and wrap around the end of the table.
fn crafted_keys_small_budget_many_segments() -> R {
    let t = open(TableConfig::new(16))?;
    let max = t.max_segments() as u64;
    drop(t);
    // Room for the largest table below (2^15 slots of 3 words) within the binding limit,
    // with segments rounded down to a power of two of slots.
    let seg = 4096u64.max(2 * ((3 * 8u64) << 15).div_ceil(max));
    let small = move |cfg: TableConfig| -> kv_core::Result<Box<dyn KvBackend>> {
        let options = WgpuOptions::default()
            .segment_bytes(seg)
            .table_buffer_bytes(3 * seg)
            .probe_budget(32);
        Ok(Box::new(WgpuBackend::open_with(cfg, &options)?))
    };
    let s = stress::Adversarial {
        one_home: 1_500,
        capacity: 4_000,
        churn: 800,
        batch: 1_500,
    };
    stress::crafted_one_home(&small, s)?;
    stress::crafted_churn(&small, s)?;
    stress::crafted_growth_and_full_load(&small, s)?;
    let phase = RandomOps {
        rounds: 20,
        max_batch: 3000,
        range: 4000,
    };
    let t = small(TableConfig::new(64).width(2)).map_err(|x| e("open", x))?;
    stress::random_ops(&*t, phase, 31)?;
    // The budget reaches the shaders: a chain of 1,500 keys needs resume rounds.
    let options = WgpuOptions::default()
        .segment_bytes(seg)
        .table_buffer_bytes(3 * seg)
        .probe_budget(32);
    let t = WgpuBackend::open_with(
        TableConfig::new(s.capacity).seed(stress::CRAFT_SEED),
        &options,
    )
    .map_err(|x| e("open", x))?;
    let keys = stress::crafted_keys(7, s.one_home, stress::CRAFT_SEED);
    let mut m = Map::new();
    put_both(&t, &mut m, &keys, |i, _| i as u64)?;
    check(&t, &m, &keys, "one chain at a budget of 32")?;
    match t.resume_rounds() {
        0 => Err("a chain of 1,500 keys at a budget of 32 ran no resume round".into()),
        r => {
            println!("  {r} resume rounds for a chain of {} keys", keys.len());
            Ok(())
        }
    }
}

kv_conformance::stress_main! {
    backend: "wgpu",
    open: open_boxed,
    availability: || kv_conformance::Availability::unless_missing(
        kv_backend_wgpu::unavailable_reason(),
        kv_backend_wgpu::REQUIRE_ENV,
        "no wgpu adapter",
    ),
    sizes: StressSizes::SMALL,
    extra: [
        ("growth_across_rehashes", growth_across_rehashes),
        ("many_segments", many_segments),
        ("larger_than_one_binding", larger_than_one_binding),
        ("overwrite_only_chunks", overwrite_only_chunks),
        ("heavy_in_chunk_repeats", heavy_in_chunk_repeats),
        ("repeats_across_chunk_boundaries", repeats_across_chunk_boundaries),
        ("tombstone_reuse_with_repeats", tombstone_reuse_with_repeats),
        ("out_of_memory_is_an_error", out_of_memory_is_an_error),
        ("throughput_report", throughput_report),
        (
            "crafted_keys_small_budget_many_segments",
            crafted_keys_small_budget_many_segments
        ),
    ],
}
