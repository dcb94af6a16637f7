//! The test bodies. Each takes a way to open a table and panics on the first violation.

use crate::{Model, SplitMix64};
use kv_core::{Error, KvBackend, TableConfig, capacity_of};
use std::sync::atomic::{AtomicBool, Ordering};

/// How a suite opens a table of the backend under test.
pub type Open = dyn Fn(TableConfig) -> kv_core::Result<Box<dyn KvBackend>> + Send + Sync;

/// One named conformance case.
#[derive(Clone, Copy)]
pub struct Case {
    /// The trial's name.
    pub name: &'static str,
    /// The body; it panics on a violation.
    pub run: fn(&Open),
}

/// Every case of the suite, in a stable order.
pub fn all() -> Vec<Case> {
    macro_rules! cases { ($($f:ident),* $(,)?) => { vec![$(Case { name: stringify!($f), run: $f }),*] } }
    cases![
        put_get_roundtrip,
        missing_keys_read_as_zero,
        edge_keys,
        last_duplicate_wins,
        repeated_delete_counts_once,
        delete_reinsert_cycles,
        tombstones_never_hide_live_keys,
        widths_1_2_16,
        growth_keeps_every_entry,
        growth_off_refuses_whole_batch,
        admission_counts_new_keys_only,
        bad_lengths_change_nothing,
        empty_batches_are_noops,
        clear_keeps_capacity,
        invalid_configs_are_refused,
        million_key_batches_match_model,
        random_sequence_matches_model,
        threads_see_whole_batches,
        threads_on_disjoint_keys,
        describe_is_sane,
        export_matches_the_table,
        restore_rebuilds_the_table,
        export_is_a_point_in_time,
    ]
}

fn open(open: &Open, cfg: TableConfig) -> Box<dyn KvBackend> {
    match open(cfg.clone()) {
        Ok(t) => t,
        Err(e) => panic!("opening a table with {cfg:?} failed: {e}"),
    }
}

/// Asserts that `t` holds exactly what `m` holds for `probe` keys and has the same length.
pub fn assert_same(t: &dyn KvBackend, m: &Model, probe: &[u64], ctx: &str) {
    let w = t.width();
    assert_eq!(t.len(), m.len(), "{ctx}: len differs from the model");
    let mut values = vec![0xDEAD_BEEF_u64; probe.len() * w];
    let mut found = vec![true; probe.len()];
    t.get(probe, &mut values, &mut found)
        .unwrap_or_else(|e| panic!("{ctx}: get failed: {e}"));
    let (mv, mf) = m.get(probe);
    for i in 0..probe.len() {
        assert_eq!(found[i], mf[i], "{ctx}: found[{i}] for key {:#x}", probe[i]);
        assert_eq!(
            &values[i * w..(i + 1) * w],
            &mv[i * w..(i + 1) * w],
            "{ctx}: value of key {:#x}",
            probe[i]
        );
    }
    let mut present = vec![!mf.first().copied().unwrap_or(false); probe.len()];
    t.contains(probe, &mut present)
        .unwrap_or_else(|e| panic!("{ctx}: contains failed: {e}"));
    assert_eq!(present, mf, "{ctx}: contains differs from the model");
}

fn values_for(keys: &[u64], w: usize, salt: u64) -> Vec<u64> {
    keys.iter()
        .enumerate()
        .flat_map(|(i, k)| {
            (0..w as u64).map(move |j| k.rotate_left(17) ^ salt ^ (i as u64) << 8 ^ j)
        })
        .collect()
}

fn edge_key_set() -> Vec<u64> {
    vec![
        0,
        1,
        2,
        u64::MAX,
        u64::MAX - 1,
        u64::MAX - 2,
        1 << 63,
        (1 << 63) - 1,
        0xFFFF_FFFF,
        1 << 32,
    ]
}

/// Basic put then get.
pub fn put_get_roundtrip(o: &Open) {
    let t = open(o, TableConfig::new(1024));
    let keys: Vec<u64> = (0..500).map(|i| i * 7919 + 3).collect();
    let vals = values_for(&keys, 1, 1);
    t.put(&keys, &vals).expect("put");
    let mut m = Model::new(1);
    m.put(&keys, &vals);
    assert_same(&*t, &m, &keys, "roundtrip");
}

/// Missing keys: found = false and zeros, whatever was in the output buffer.
pub fn missing_keys_read_as_zero(o: &Open) {
    let t = open(o, TableConfig::new(64).width(2));
    t.put(&[10], &[1, 2]).expect("put");
    let mut v = vec![u64::MAX; 6];
    let mut f = vec![true; 3];
    t.get(&[11, 10, 12], &mut v, &mut f).expect("get");
    assert_eq!(v, [0, 0, 1, 2, 0, 0]);
    assert_eq!(f, [false, true, false]);
}

/// 0, u64::MAX and neighbours are ordinary keys.
pub fn edge_keys(o: &Open) {
    for w in [1, 2] {
        let t = open(o, TableConfig::new(64).width(w));
        let mut m = Model::new(w);
        let keys = edge_key_set();
        let vals = values_for(&keys, w, 9);
        t.put(&keys, &vals).expect("put");
        m.put(&keys, &vals);
        assert_same(&*t, &m, &keys, "edge keys after put");
        let del = [u64::MAX, 0, u64::MAX - 1, u64::MAX];
        assert_eq!(t.delete(&del).expect("delete"), m.delete(&del));
        assert_same(&*t, &m, &keys, "edge keys after delete");
        let again = [u64::MAX - 1, u64::MAX];
        let vals = values_for(&again, w, 77);
        t.put(&again, &vals).expect("put");
        m.put(&again, &vals);
        assert_same(&*t, &m, &keys, "edge keys after reinsert");
    }
}

/// Within one batch the last occurrence of a key wins.
pub fn last_duplicate_wins(o: &Open) {
    for w in [1, 16] {
        let t = open(o, TableConfig::new(4096).width(w));
        let mut m = Model::new(w);
        let mut rng = SplitMix64(42);
        let mut keys: Vec<u64> = (0..3000).map(|_| rng.below(300)).collect();
        keys.extend([u64::MAX, u64::MAX - 1, 0, u64::MAX, u64::MAX - 1, 0]);
        let vals = values_for(&keys, w, 5);
        t.put(&keys, &vals).expect("put");
        m.put(&keys, &vals);
        let probe: Vec<u64> = (0..300).chain([u64::MAX, u64::MAX - 1]).collect();
        assert_same(&*t, &m, &probe, "duplicate-heavy put");
        // Overwrite again, so that keys already present are duplicated too.
        let vals = values_for(&keys, w, 6);
        t.put(&keys, &vals).expect("put");
        m.put(&keys, &vals);
        assert_same(&*t, &m, &probe, "duplicate-heavy overwrite");
    }
}

/// A key repeated in a delete batch is removed and counted once.
pub fn repeated_delete_counts_once(o: &Open) {
    let t = open(o, TableConfig::new(64));
    t.put(&[1, 2, 3, u64::MAX], &[1, 2, 3, 4]).expect("put");
    assert_eq!(
        t.delete(&[2, 2, 2, 9, u64::MAX, u64::MAX]).expect("delete"),
        2
    );
    assert_eq!(t.len(), 2);
    assert_eq!(t.delete(&[2, u64::MAX]).expect("delete"), 0);
}

/// Insert–delete–insert never leaves two copies nor loses one.
pub fn delete_reinsert_cycles(o: &Open) {
    let t = open(o, TableConfig::new(2048));
    let mut m = Model::new(1);
    let keys: Vec<u64> = (0..1000)
        .map(|i| i * 0x9E37_79B9)
        .chain(edge_key_set())
        .collect();
    for round in 0..20u64 {
        let vals = values_for(&keys, 1, round);
        t.put(&keys, &vals).expect("put");
        m.put(&keys, &vals);
        let half: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|k| (k ^ round) % 2 == 0)
            .collect();
        assert_eq!(
            t.delete(&half).expect("delete"),
            m.delete(&half),
            "round {round}"
        );
        assert_same(&*t, &m, &keys, "cycle");
    }
    assert_eq!(t.delete(&keys).expect("delete"), m.delete(&keys));
    assert!(t.is_empty());
}

/// Keys placed behind tombstones are still found, and re-inserting them does not
/// create a second copy in front of the old one.
pub fn tombstones_never_hide_live_keys(o: &Open) {
    // A full-ish small table forces long probe runs through deleted slots.
    let cfg = TableConfig::new(256).max_load_factor(0.9).growth(false);
    let cap = open(o, cfg.clone()).capacity();
    let t = open(o, cfg);
    let mut m = Model::new(1);
    let keys: Vec<u64> = (0..cap as u64)
        .map(|i| i.wrapping_mul(0x1000_0000_0001))
        .collect();
    let vals = values_for(&keys, 1, 1);
    t.put(&keys, &vals).expect("fill");
    m.put(&keys, &vals);
    for round in 0..30u64 {
        let del: Vec<u64> = keys
            .iter()
            .copied()
            .skip(round as usize % 3)
            .step_by(3)
            .collect();
        assert_eq!(t.delete(&del).expect("delete"), m.delete(&del));
        assert_same(&*t, &m, &keys, "after delete");
        // Re-put every key: live ones must be overwritten in place, not duplicated.
        let vals: Vec<u64> = del.iter().map(|k| k ^ round).collect();
        t.put(&del, &vals).expect("reinsert");
        m.put(&del, &vals);
        assert_same(&*t, &m, &keys, "after reinsert");
    }
    assert_eq!(t.delete(&keys).expect("delete all"), keys.len());
    assert_eq!(t.len(), 0);
}

/// Values of 1, 2 and 16 words.
pub fn widths_1_2_16(o: &Open) {
    for w in [1, 2, 16] {
        let t = open(o, TableConfig::new(10_000).width(w));
        assert_eq!(t.width(), w);
        let mut m = Model::new(w);
        let keys: Vec<u64> = (0..5000u64)
            .map(|i| i.wrapping_mul(0xA24B_AED4_963E_E407))
            .collect();
        let vals = values_for(&keys, w, w as u64);
        t.put(&keys, &vals).expect("put");
        m.put(&keys, &vals);
        assert_same(&*t, &m, &keys, "width");
    }
}

/// Growth rehashes into a larger table and keeps everything, with the shared sizing rule.
pub fn growth_keeps_every_entry(o: &Open) {
    let cfg = TableConfig::new(16).width(2).max_load_factor(0.75);
    let t = open(o, cfg.clone());
    assert_eq!(t.capacity(), cfg.initial_capacity());
    let mut m = Model::new(2);
    let mut all = Vec::new();
    let mut rng = SplitMix64(7);
    for step in 0..12 {
        let n = 1usize << step;
        let keys: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
        let vals = values_for(&keys, 2, step);
        let (len, cap, slots) = (t.len(), t.capacity(), t.describe().slots);
        t.put(&keys, &vals).expect("put with growth");
        m.put(&keys, &vals);
        all.extend_from_slice(&keys);
        if let kv_core::PutPlan::Grow { slots } =
            kv_core::plan_put(len, n, slots, 0.75, true).expect("plan")
        {
            assert_eq!(
                t.capacity(),
                capacity_of(slots, 0.75),
                "capacity after growth at step {step}"
            );
        } else {
            assert_eq!(
                t.capacity(),
                cap,
                "capacity changed without growth at step {step}"
            );
        }
    }
    assert_same(&*t, &m, &all, "after growth");
}

/// With growth off, a batch that would pass capacity is refused whole.
pub fn growth_off_refuses_whole_batch(o: &Open) {
    let t = open(o, TableConfig::new(100).growth(false));
    let cap = t.capacity();
    let keys: Vec<u64> = (0..cap as u64 - 3).collect();
    t.put(&keys, &keys).expect("fill below capacity");
    let mut m = Model::new(1);
    m.put(&keys, &keys);
    let extra: Vec<u64> = (1000..1010).collect();
    match t.put(&extra, &extra) {
        Err(Error::CapacityExceeded {
            requested,
            capacity,
        }) => {
            assert_eq!((requested, capacity), (cap - 3 + 10, cap));
        }
        other => panic!("expected CapacityExceeded, got {other:?}"),
    }
    assert_eq!(t.capacity(), cap);
    let probe: Vec<u64> = keys.iter().copied().chain(extra.iter().copied()).collect();
    assert_same(&*t, &m, &probe, "after refused put");
    t.put(&extra[..3], &extra[..3])
        .expect("an exact fit is admitted");
}

/// Admission counts only a batch's new keys (item f): overwrites fit a full table and never
/// grow it, repeats of a new key count once, and one key past the capacity is refused.
pub fn admission_counts_new_keys_only(o: &Open) {
    for growth in [false, true] {
        let t = open(o, TableConfig::new(100).growth(growth));
        let cap = t.capacity();
        let keys: Vec<u64> = (0..cap as u64).collect();
        let mut m = Model::new(1);
        t.put(&keys, &keys).expect("an exact fit is admitted");
        m.put(&keys, &keys);
        // Overwrites only, twice each, on a full table.
        let again: Vec<u64> = keys.iter().chain(&keys).copied().collect();
        let vals: Vec<u64> = (0..again.len() as u64).map(|v| v + 7).collect();
        t.put(&again, &vals)
            .unwrap_or_else(|e| panic!("growth {growth}: overwrites refused: {e}"));
        m.put(&again, &vals);
        assert_eq!(
            t.capacity(),
            cap,
            "growth {growth}: overwrites grew the table"
        );
        // Room for three: three new keys, four times each, among overwrites.
        assert_eq!(t.delete(&keys[..3]).expect("delete"), 3);
        m.delete(&keys[..3]);
        let fresh = [cap as u64 + 10, cap as u64 + 11, cap as u64 + 12];
        let mixed: Vec<u64> = fresh
            .iter()
            .cycle()
            .take(12)
            .chain(&keys[3..50])
            .copied()
            .collect();
        t.put(&mixed, &mixed)
            .unwrap_or_else(|e| panic!("growth {growth}: an exact fit refused: {e}"));
        m.put(&mixed, &mixed);
        assert_eq!((t.len(), t.capacity()), (cap, cap), "growth {growth}");
        // One new key more.
        let one = [cap as u64 + 100];
        match (growth, t.put(&one, &one)) {
            (
                false,
                Err(Error::CapacityExceeded {
                    requested,
                    capacity,
                }),
            ) => {
                assert_eq!((requested, capacity), (cap + 1, cap))
            }
            (true, Ok(())) => {
                assert!(t.capacity() > cap);
                m.put(&one, &one);
            }
            (g, other) => panic!("growth {g}: one key past the capacity gave {other:?}"),
        }
        let probe: Vec<u64> = (0..cap as u64 + 110).collect();
        assert_same(&*t, &m, &probe, &format!("growth {growth}"));
    }
}

/// Length and width mismatches are errors that change nothing.
pub fn bad_lengths_change_nothing(o: &Open) {
    let t = open(o, TableConfig::new(64).width(2));
    let mut m = Model::new(2);
    t.put(&[1, 2], &[1, 1, 2, 2]).expect("put");
    m.put(&[1, 2], &[1, 1, 2, 2]);
    assert!(matches!(
        t.put(&[3, 4], &[3, 3, 4]),
        Err(Error::WidthMismatch { .. })
    ));
    assert!(matches!(
        t.put(&[3, 4], &[3, 3]),
        Err(Error::LengthMismatch { what: "values", .. })
    ));
    assert!(matches!(
        t.put(&[], &[3, 3]),
        Err(Error::LengthMismatch { .. })
    ));
    let mut v = vec![7; 2];
    let mut f = vec![true; 2];
    assert!(matches!(
        t.get(&[1, 2], &mut v, &mut f),
        Err(Error::LengthMismatch {
            what: "values_out",
            ..
        })
    ));
    let mut v = vec![7; 4];
    let mut f1 = vec![true; 1];
    assert!(matches!(
        t.get(&[1, 2], &mut v, &mut f1),
        Err(Error::LengthMismatch {
            what: "found_out",
            ..
        })
    ));
    assert_eq!(v, [7; 4], "a refused get writes nothing");
    assert!(matches!(
        t.contains(&[1, 2], &mut f1),
        Err(Error::LengthMismatch { .. })
    ));
    assert_same(&*t, &m, &[1, 2, 3, 4], "after bad input");
}

/// Empty batches do nothing.
pub fn empty_batches_are_noops(o: &Open) {
    let t = open(o, TableConfig::new(16).growth(false));
    t.put(&[5], &[6]).expect("put");
    t.put(&[], &[]).expect("empty put");
    t.get(&[], &mut [], &mut []).expect("empty get");
    t.contains(&[], &mut []).expect("empty contains");
    assert_eq!(t.delete(&[]).expect("empty delete"), 0);
    let mut m = Model::new(1);
    m.put(&[5], &[6]);
    assert_same(&*t, &m, &[5, 6], "after empty batches");
}

/// clear removes everything and keeps capacity; the table stays usable.
pub fn clear_keeps_capacity(o: &Open) {
    let t = open(o, TableConfig::new(1000));
    let keys: Vec<u64> = (0..900).chain([u64::MAX, u64::MAX - 1]).collect();
    t.put(&keys, &keys).expect("put");
    let cap = t.capacity();
    t.clear().expect("clear");
    assert_eq!((t.len(), t.capacity()), (0, cap));
    let m = Model::new(1);
    assert_same(&*t, &m, &keys, "after clear");
    let mut m = Model::new(1);
    t.put(&keys[..10], &keys[..10]).expect("put after clear");
    m.put(&keys[..10], &keys[..10]);
    assert_same(&*t, &m, &keys, "after clear and put");
}

/// Bad configs are InvalidConfig.
pub fn invalid_configs_are_refused(o: &Open) {
    for cfg in [
        TableConfig::new(16).width(0),
        TableConfig::new(16).width(17),
        TableConfig::new(16).max_load_factor(0.0),
        TableConfig::new(16).max_load_factor(0.99),
        TableConfig::new(16).max_load_factor(f64::NAN),
        TableConfig::new(16).device(usize::MAX),
    ] {
        assert!(
            matches!(o(cfg.clone()), Err(Error::InvalidConfig(_))),
            "{cfg:?} was not refused"
        );
    }
}

/// Batches of a million keys and more, with duplicates, against the model.
pub fn million_key_batches_match_model(o: &Open) {
    let t = open(o, TableConfig::new(1 << 20));
    let mut m = Model::new(1);
    let mut rng = SplitMix64(2024);
    let n = 1 << 20;
    for round in 0..2u64 {
        let keys: Vec<u64> = (0..n).map(|_| rng.below(3 << 19)).collect();
        let vals = values_for(&keys, 1, round);
        t.put(&keys, &vals).expect("1M put");
        m.put(&keys, &vals);
        let probe: Vec<u64> = (0..n as u64).map(|i| i * 2).collect();
        assert_same(&*t, &m, &probe, "1M batch");
        let del: Vec<u64> = keys[..n / 2].to_vec();
        assert_eq!(t.delete(&del).expect("1M delete"), m.delete(&del));
    }
    assert_same(&*t, &m, &(0..(3u64 << 19)).collect::<Vec<_>>(), "1M final");
}

/// A seeded random sequence of every operation against the model.
pub fn random_sequence_matches_model(o: &Open) {
    for (seed, w) in [(1u64, 1usize), (2, 3), (3, 16)] {
        let t = open(o, TableConfig::new(32).width(w));
        let mut m = Model::new(w);
        let mut rng = SplitMix64(seed);
        let universe = 2000;
        let key = |rng: &mut SplitMix64| match rng.below(20) {
            0 => u64::MAX - rng.below(3),
            1 => rng.below(3),
            _ => rng.below(universe).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        for step in 0..200 {
            let n = rng.below(300) as usize;
            let keys: Vec<u64> = (0..n).map(|_| key(&mut rng)).collect();
            match rng.below(10) {
                0..=3 => {
                    let vals = values_for(&keys, w, step);
                    t.put(&keys, &vals).expect("put");
                    m.put(&keys, &vals);
                }
                4..=5 => assert_eq!(
                    t.delete(&keys).expect("delete"),
                    m.delete(&keys),
                    "step {step}"
                ),
                6 if step % 50 == 0 => {
                    t.clear().expect("clear");
                    m.clear();
                }
                _ => assert_same(&*t, &m, &keys, "random step"),
            }
        }
        assert_same(&*t, &m, &m.keys(), "random end");
    }
}

/// Readers on other threads see whole batches: every key of a batch carries the same batch id.
pub fn threads_see_whole_batches(o: &Open) {
    let t = open(o, TableConfig::new(1 << 14));
    let keys: Vec<u64> = (0..4096).map(|i| i * 31 + u64::MAX / 2).collect();
    t.put(&keys, &vec![0; keys.len()]).expect("seed");
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for b in 1..=60u64 {
                t.put(&keys, &vec![b; keys.len()]).expect("writer put");
            }
            done.store(true, Ordering::Release);
        });
        for _ in 0..2 {
            s.spawn(|| {
                let mut v = vec![0; keys.len()];
                let mut f = vec![false; keys.len()];
                let mut last = 0;
                while !done.load(Ordering::Acquire) {
                    t.get(&keys, &mut v, &mut f).expect("reader get");
                    assert!(f.iter().all(|&x| x), "a key vanished mid-batch");
                    assert!(
                        v.iter().all(|&x| x == v[0]),
                        "a reader saw a half-applied batch"
                    );
                    assert!(v[0] >= last, "batches went backwards");
                    last = v[0];
                }
            });
        }
    });
}

/// Several writers on disjoint keys all land.
pub fn threads_on_disjoint_keys(o: &Open) {
    let t = open(o, TableConfig::new(64));
    std::thread::scope(|s| {
        for th in 0..4u64 {
            let t = &t;
            s.spawn(move || {
                for round in 0..20u64 {
                    let keys: Vec<u64> = (0..500).map(|i| (i << 8) | th).collect();
                    t.put(&keys, &vec![round; 500]).expect("put");
                    if round % 3 == 0 {
                        assert_eq!(t.delete(&keys[..100]).expect("delete"), 100);
                    }
                }
            });
        }
    });
    let mut m = Model::new(1);
    for th in 0..4u64 {
        let keys: Vec<u64> = (0..500).map(|i| (i << 8) | th).collect();
        m.put(&keys, &[19; 500]);
    }
    assert_same(&*t, &m, &m.keys(), "disjoint writers");
}

/// describe() names the backend and a slot count consistent with capacity.
pub fn describe_is_sane(o: &Open) {
    let t = open(o, TableConfig::new(1000).width(4));
    let d = t.describe();
    assert!(!d.backend.is_empty() && !d.device.is_empty());
    assert_eq!(t.capacity(), capacity_of(d.slots, 0.75));
    assert!(
        d.bytes_in_use >= (d.slots * (1 + 4) * 8) as u64,
        "bytes_in_use must count keys and values"
    );
}

/// `export` copies out exactly the live entries (edge keys, overwrites and deletes
/// included), and an empty table exports an empty image.
pub fn export_matches_the_table(o: &Open) {
    for w in [1, 3] {
        let t = open(o, TableConfig::new(64).width(w).seed(11));
        let empty = t.export().expect("export of an empty table");
        assert!(empty.is_empty() && !empty.is_cache() && empty.width == w);
        let mut m = Model::new(w);
        let keys: Vec<u64> = edge_key_set()
            .into_iter()
            .chain((0..3000u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        let vals = values_for(&keys, w, 5);
        t.put(&keys, &vals).expect("put");
        m.put(&keys, &vals);
        let gone: Vec<u64> = keys.iter().step_by(3).copied().collect();
        assert_eq!(t.delete(&gone).expect("delete"), m.delete(&gone));
        let again: Vec<u64> = keys.iter().step_by(7).copied().collect();
        let again_vals = values_for(&again, w, 9);
        t.put(&again, &again_vals).expect("overwrite");
        m.put(&again, &again_vals);
        let mut img = t.export().expect("export");
        img.check().expect("the image's columns agree");
        assert_eq!((img.width, img.is_cache()), (w, false));
        img.sort();
        assert_eq!(img.keys, m.keys(), "exported keys");
        assert_eq!(img.values, m.get(&img.keys).0, "exported rows");
        assert_same(&*t, &m, &keys, "after export");
    }
}

/// An image restored into a new table (another seed, a smaller start, so that it grows)
/// gives back the same table, and exports the same image.
pub fn restore_rebuilds_the_table(o: &Open) {
    let w = 2;
    let t = open(o, TableConfig::new(5000).width(w).seed(1));
    let mut m = Model::new(w);
    let keys: Vec<u64> = (0..4000u64)
        .map(|i| i.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x55)
        .chain(edge_key_set())
        .collect();
    let vals = values_for(&keys, w, 3);
    t.put(&keys, &vals).expect("put");
    m.put(&keys, &vals);
    let mut img = t.export().expect("export");
    let u = open(o, TableConfig::new(16).width(w).seed(2));
    for part in img.parts(999) {
        u.restore(part).expect("restore");
    }
    assert_same(&*u, &m, &keys, "restored table");
    let mut back = u.export().expect("export of the restored table");
    img.sort();
    back.sort();
    assert_eq!(back, img, "the restored table's image");
    // A part with a bad length changes nothing; scores on an ordinary table are refused.
    let bad = kv_core::ImagePart {
        keys: &[1, 2],
        values: &[1, 2, 3],
        scores: None,
        expires: None,
        clock: 0,
    };
    assert!(matches!(u.restore(bad), Err(Error::WidthMismatch { .. })));
    let scored = kv_core::ImagePart {
        keys: &[1],
        values: &[1, 2],
        scores: Some(&[4]),
        expires: Some(&[0]),
        clock: 0,
    };
    assert!(
        u.restore(scored).is_err(),
        "scores restored into an ordinary table"
    );
    assert_same(&*u, &m, &[1, 2], "after refused restores");
}

/// An export taken while another thread writes holds each batch whole or not at all.
pub fn export_is_a_point_in_time(o: &Open) {
    let t = open(o, TableConfig::new(1 << 13));
    let keys: Vec<u64> = (0..3000).map(|i| i * 97 + 5).collect();
    t.put(&keys, &vec![0; keys.len()]).expect("seed");
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for b in 1..=40u64 {
                t.put(&keys, &vec![b; keys.len()]).expect("writer put");
            }
            done.store(true, Ordering::Release);
        });
        let mut last = 0;
        let mut images = 0;
        while !done.load(Ordering::Acquire) || images < 2 {
            let img = t.export().expect("export");
            images += 1;
            assert_eq!(img.len(), keys.len(), "an export lost or added keys");
            let v0 = img.values[0];
            assert!(
                img.values.iter().all(|&v| v == v0),
                "an export saw a half-applied batch"
            );
            assert!(v0 >= last, "exports went backwards");
            last = v0;
        }
    });
}
