//! The tiered store (a cache table over a cache table) against a model: nothing is lost
//! while the lower tier has room, everything that leaves is reported or counted, and
//! times to live move with entries between tiers.
//!
//! Each test runs with the upper tier on every backend of this build whose cache tables
//! open here (the CPU always; CUDA with a device; wgpu with an adapter, lavapipe included,
//! as a forced backend need not be a discrete GPU). A backend that cannot run prints
//! `skipped: ...`, unless `VRAMKV_REQUIRE_CUDA=1` or `VRAMKV_REQUIRE_WGPU=1` requires it.

use std::collections::HashMap;
use std::sync::Arc;

use kv_conformance::SplitMix64;

use vramkv::{
    BackendKind, CacheConfig, CachePolicy, CachePut, Clock, Error, Evicted, KvBackend, ManualClock,
    Options, TableConfig, Tiered, TieredConfig,
};

/// The backends the upper tier runs on in these tests; see the module docs.
fn uppers() -> Vec<BackendKind> {
    let mut out = Vec::new();
    for kind in BackendKind::ALL.into_iter().filter(|k| k.compiled_in()) {
        let probe = TableConfig::new(32).cache(CacheConfig::new(CachePolicy::Lru));
        match vramkv::open_backend(kind, probe) {
            Ok(_) => out.push(kind),
            Err(e) => {
                let var = match kind {
                    BackendKind::Cuda => "VRAMKV_REQUIRE_CUDA",
                    BackendKind::Wgpu => "VRAMKV_REQUIRE_WGPU",
                    _ => "",
                };
                assert!(
                    !std::env::var(var).is_ok_and(|v| v == "1"),
                    "{var}=1 but {kind} cache tables cannot run: {e}"
                );
                println!("skipped: an upper tier on {kind}: {e}");
            }
        }
    }
    out
}

fn store(
    upper: BackendKind,
    policy: CachePolicy,
    upper_slots: u64,
    lower_slots: u64,
) -> (Tiered, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(10));
    let cfg = TieredConfig {
        width: 2,
        cache: CacheConfig::new(policy).clock(clock.clone()),
        upper_bytes: upper_slots * vramkv::cache_slot_bytes(2) as u64,
        lower_bytes: lower_slots * vramkv::cache_slot_bytes(2) as u64,
        seed: Some(3),
    };
    let t = Tiered::open(cfg, &Options::default().backend(upper)).expect("open");
    assert_eq!(t.upper().describe().backend, upper.name());
    (t, clock)
}

/// The model: key -> (row, expiry or 0).
type Model = HashMap<u64, (Vec<u64>, u64)>;

fn live(m: &mut Model, now: u64) {
    m.retain(|_, (_, e)| *e == 0 || *e > now);
}

/// Every key of the model is in the store with its row; returns the keys that are not
/// (the caller decides whether they may be gone).
fn missing(t: &Tiered, m: &Model) -> Vec<u64> {
    let keys: Vec<u64> = m.keys().copied().collect();
    let (mut v, mut f) = (vec![0; keys.len() * 2], vec![false; keys.len()]);
    t.peek(&keys, &mut v, &mut f).expect("peek");
    let mut gone = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        if f[i] {
            assert_eq!(v[i * 2..i * 2 + 2], m[k].0[..], "key {k}: stale row");
        } else {
            gone.push(*k);
        }
    }
    gone
}

fn run(upper: BackendKind, policy: CachePolicy, lower_slots: u64, seed: u64) {
    let (t, clock) = store(upper, policy, 64, lower_slots);
    let mut m = Model::new();
    let mut rng = SplitMix64(seed);
    let mut reported_or_counted = 0u64;
    for step in 0..400u64 {
        let now = clock.now_ms();
        live(&mut m, now);
        // Keys that may leave the store in this step without a report: what a get's
        // promotions push out of a full lower tier, which the store counts.
        let mut may_vanish = 0u64;
        match rng.below(10) {
            0..=4 => {
                let n = 1 + rng.below(40) as usize;
                let keys: Vec<u64> = (0..n).map(|_| rng.below(600)).collect();
                let vals: Vec<u64> = keys.iter().flat_map(|&k| [k, step]).collect();
                let ttl: Vec<u64> = (0..n)
                    .map(|_| {
                        if rng.below(5) == 0 {
                            1 + rng.below(20)
                        } else {
                            0
                        }
                    })
                    .collect();
                let (mut ek, mut ev, mut es) = (vec![0; n], vec![0; n * 2], vec![0; n]);
                let mut out = Evicted::new(&mut ek, &mut ev, &mut es);
                let e = t
                    .put_and_evict(CachePut::new(&keys, &vals).ttl_ms(&ttl), &mut out)
                    .expect("put");
                for (i, &k) in keys.iter().enumerate() {
                    let exp = if ttl[i] == 0 { 0 } else { now + ttl[i] };
                    m.insert(k, (vals[i * 2..i * 2 + 2].to_vec(), exp));
                }
                for j in 0..e {
                    let k = ek[j];
                    let (row, _) = m
                        .remove(&k)
                        .unwrap_or_else(|| panic!("evicted {k}, not held"));
                    assert_eq!(
                        ev[j * 2..j * 2 + 2],
                        row[..],
                        "evicted {k} with a stale row"
                    );
                    reported_or_counted += 1;
                }
            }
            5 | 6 => {
                let n = rng.below(60) as usize;
                let keys: Vec<u64> = (0..n).map(|_| rng.below(600)).collect();
                let (mut v, mut f) = (vec![0; n * 2], vec![false; n]);
                let before = t.stats().evictions;
                t.get(&keys, &mut v, &mut f).expect("get");
                for (i, k) in keys.iter().enumerate() {
                    match m.get(k) {
                        Some((row, _)) => {
                            assert!(f[i], "key {k} lost");
                            assert_eq!(v[i * 2..i * 2 + 2], row[..]);
                        }
                        None => assert!(!f[i], "get found {k}, which is not held"),
                    }
                }
                // Promotions may push entries out of a full lower tier: counted, and
                // exactly that many keys may be missing below.
                may_vanish = t.stats().evictions - before;
                reported_or_counted += may_vanish;
            }
            7 => {
                let keys: Vec<u64> = (0..rng.below(6)).map(|_| rng.below(600)).collect();
                let mut distinct = keys.clone();
                distinct.sort_unstable();
                distinct.dedup();
                let expect = distinct.iter().filter(|k| m.remove(k).is_some()).count();
                assert_eq!(t.delete(&keys).expect("delete"), expect);
            }
            8 => clock.advance(rng.below(8)),
            _ => {}
        }
        live(&mut m, clock.now_ms());
        let gone = missing(&t, &m);
        if lower_slots >= 1024 {
            assert!(
                gone.is_empty(),
                "step {step}: {gone:?} lost with room below"
            );
        }
        assert_eq!(
            gone.len() as u64,
            may_vanish,
            "step {step}: {gone:?} left the store, {may_vanish} counted"
        );
        for k in gone {
            m.remove(&k);
        }
        assert_eq!(t.len(), m.len(), "step {step}: len");
        assert_eq!(
            t.stats().evictions,
            reported_or_counted,
            "step {step}: every exit counted"
        );
    }
    let s = t.stats();
    assert!(s.promotions > 0 && s.demotions > 0, "{s:?}");
}

#[test]
fn nothing_is_lost_while_host_ram_has_room() {
    for upper in uppers() {
        run(upper, CachePolicy::Lru, 2048, 1);
        run(upper, CachePolicy::Lfu, 2048, 2);
    }
}

#[test]
fn what_leaves_a_full_store_is_reported_or_counted() {
    for upper in uppers() {
        run(upper, CachePolicy::Lru, 128, 3);
        run(upper, CachePolicy::Lfu, 128, 4);
    }
}

#[test]
fn times_to_live_move_with_entries() {
    for upper in uppers() {
        times_to_live_move_with_entries_on(upper);
    }
}

fn times_to_live_move_with_entries_on(upper: BackendKind) {
    let (t, clock) = store(upper, CachePolicy::Lru, 32, 4096);
    // Key 1 expires in 50 ms; a flood of other keys pushes it down to host RAM.
    t.put_cached(CachePut::new(&[1], &[1, 1]).ttl_ms(&[50]))
        .expect("put");
    let flood: Vec<u64> = (100..400).collect();
    let vals: Vec<u64> = flood.iter().flat_map(|&k| [k, k]).collect();
    t.put(&flood, &vals).expect("put");
    let mut f = [false];
    t.upper().contains(&[1], &mut f).expect("contains");
    assert!(!f[0], "key 1 moved down");
    t.lower().contains(&[1], &mut f).expect("contains");
    assert!(f[0]);
    clock.advance(30);
    // A get promotes it with the 20 ms it has left.
    let (mut v, mut f) = ([0u64; 2], [false]);
    t.get(&[1], &mut v, &mut f).expect("get");
    assert_eq!((v, f), ([1, 1], [true]));
    let mut up = [false];
    t.upper().contains(&[1], &mut up).expect("contains");
    assert!(up[0], "promoted");
    clock.advance(20);
    t.get(&[1], &mut v, &mut f).expect("get");
    assert_eq!((v, f), ([0, 0], [false]), "expired on time after the move");
}

#[test]
fn bad_tier_configs_are_refused() {
    let cpu = |cfg: TableConfig| -> Box<dyn KvBackend> {
        Box::new(
            vramkv::open_with(cfg, &Options::default().backend(vramkv::BackendKind::Cpu))
                .expect("cpu"),
        )
    };
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
    let cache = |w| {
        TableConfig::new(64)
            .width(w)
            .cache(CacheConfig::new(CachePolicy::Lru))
    };
    let r = Tiered::new(
        cpu(cache(1)),
        cpu(cache(2)),
        CachePolicy::Lru,
        clock.clone(),
    );
    assert!(matches!(r, Err(Error::InvalidConfig(_))));
    let r = Tiered::new(
        cpu(cache(1)),
        cpu(TableConfig::new(64)),
        CachePolicy::Lru,
        clock.clone(),
    );
    assert!(matches!(r, Err(Error::InvalidConfig(msg)) if msg.contains("lower")));
    let r = Tiered::new(cpu(cache(1)), cpu(cache(1)), CachePolicy::Custom, clock);
    assert!(matches!(r, Err(Error::InvalidConfig(_))));
}

#[test]
fn batches_count_their_time_in_each_tier() {
    for upper in uppers() {
        let (t, _clock) = store(upper, CachePolicy::Lru, 64, 4096);
        assert_eq!(
            t.stats().upper_time + t.stats().lower_time,
            Default::default()
        );
        let keys: Vec<u64> = (0..2000).collect();
        let rows: Vec<u64> = keys.iter().flat_map(|&k| [k, !k]).collect();
        t.put(&keys, &rows).expect("put");
        let (mut v, mut f) = (vec![0; 4000], vec![false; 2000]);
        t.get(&keys, &mut v, &mut f).expect("get");
        assert!(
            f.iter().all(|&f| f) && v == rows,
            "{upper}: every key served"
        );
        let s = t.stats();
        assert!(
            !s.upper_time.is_zero() && !s.lower_time.is_zero() && !s.manager_time.is_zero(),
            "{upper}: {s:?}"
        );
        let before = t.stats();
        let _ = t.len();
        assert_eq!(t.stats(), before, "{upper}: len is not a batch");
    }
}
