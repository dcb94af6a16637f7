//! Differential property tests of cache tables: random sequences of puts (with scores and
//! times to live), gets, peeks, takes, deletes, clears and clock moves, on small tables whose
//! buckets overflow all the time, applied to every backend of this build that has cache
//! tables and checked after every batch by `kv_conformance::cache::CacheModel` (nothing
//! lost silently, nothing stale or invented, every eviction's score no higher than what
//! stayed in its bucket, `len()` exact). Any violation fails with proptest's shrunk
//! sequence.
//!
//! `PROPTEST_CASES` sets the sequences per backend (default 200). A backend without cache
//! tables, or that cannot run here, prints `skipped: <reason>` and its trial is ignored;
//! with `VRAMKV_REQUIRE_CUDA=1` a CUDA device that is missing fails instead, and with
//! `VRAMKV_REQUIRE_WGPU=1` a wgpu adapter (lavapipe will do: a forced backend need not be
//! a discrete GPU).

use std::sync::Arc;

mod common;

use kv_conformance::cache::CacheModel;
use libtest_mimic::{Arguments, Failed};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vramkv::{
    BackendKind, CacheConfig, CachePolicy, CachePut, Clock, Evicted, KvBackend, ManualClock,
    TableConfig,
};

#[derive(Debug, Clone)]
enum Op {
    /// Keys, a time to live per key (0: none), a score per key, a value salt.
    Put(Vec<u64>, Vec<u64>, Vec<u64>, u64),
    Get(Vec<u64>),
    Peek(Vec<u64>),
    Take(Vec<u64>),
    Delete(Vec<u64>),
    Advance(u64),
    Clear,
}

#[derive(Debug, Clone)]
struct Scenario {
    policy: CachePolicy,
    width: usize,
    capacity: usize,
    ops: Vec<Op>,
}

fn key() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => prop::sample::select(vec![0, 1, u64::MAX, u64::MAX - 1]),
        6 => 0..160u64,
        1 => any::<u64>(),
    ]
}

fn keys() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        5 => prop::collection::vec(key(), 0..24),
        1 => prop::collection::vec(key(), 60..200),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => keys().prop_flat_map(|k| {
            let n = k.len();
            (
                Just(k),
                prop::collection::vec(prop_oneof![3 => Just(0u64), 1 => 1..40u64], n),
                prop::collection::vec(0..50u64, n),
                any::<u64>(),
            )
        })
        .prop_map(|(k, t, s, v)| Op::Put(k, t, s, v)),
        3 => keys().prop_map(Op::Get),
        1 => keys().prop_map(Op::Peek),
        1 => keys().prop_map(Op::Take),
        1 => keys().prop_map(Op::Delete),
        2 => (0..30u64).prop_map(Op::Advance),
        1 => Just(Op::Clear),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::sample::select(vec![
            CachePolicy::Lru,
            CachePolicy::Lfu,
            CachePolicy::Custom,
        ]),
        prop::sample::select(vec![1usize, 2, 5]),
        prop::sample::select(vec![32usize, 64, 160]),
        prop::collection::vec(op(), 1..40),
    )
        .prop_map(|(policy, width, capacity, ops)| Scenario {
            policy,
            width,
            capacity,
            ops,
        })
}

fn run(kind: BackendKind, s: &Scenario) {
    let clock = Arc::new(ManualClock::new(100));
    let cfg = TableConfig::new(s.capacity)
        .width(s.width)
        .seed(11)
        .cache(CacheConfig::new(s.policy).clock(clock.clone()));
    let t = vramkv::open_backend(kind, cfg).expect("open a cache table");
    let t: &dyn KvBackend = &t;
    let w = s.width;
    let mut m = CacheModel::new(w, s.policy);
    for op in &s.ops {
        let now = clock.now_ms();
        match op {
            Op::Put(keys, ttl, scores, salt) => {
                let vals: Vec<u64> = keys
                    .iter()
                    .flat_map(|&k| (0..w as u64).map(move |j| k ^ salt ^ j))
                    .collect();
                let mut put = CachePut::new(keys, &vals).ttl_ms(ttl);
                if s.policy == CachePolicy::Custom {
                    put = put.scores(scores);
                }
                let n = keys.len();
                let (mut k, mut v, mut sc, mut x) =
                    (vec![0; n], vec![0; n * w], vec![0; n], vec![0; n]);
                let e = t
                    .put_and_evict(
                        put,
                        &mut Evicted::new(&mut k, &mut v, &mut sc).expires(&mut x),
                    )
                    .expect("put_and_evict");
                let evicted: Vec<(u64, Vec<u64>, u64)> = (0..e)
                    .map(|j| (k[j], v[j * w..(j + 1) * w].to_vec(), sc[j]))
                    .collect();
                m.put(t, put, &evicted, Some(&x[..e]), now);
            }
            Op::Get(keys) => m.get(t, keys, now),
            Op::Peek(keys) => m.peek(t, keys, now),
            Op::Take(keys) => m.take(t, keys, now),
            Op::Delete(keys) => m.delete(t, keys, now),
            Op::Advance(ms) => clock.advance(*ms),
            Op::Clear => m.clear(t),
        }
        m.check(t, clock.now_ms());
    }
}

fn differential(kind: BackendKind, cases: u32) -> Result<(), Failed> {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&scenario(), |s| {
            run(kind, &s);
            Ok(())
        })
        .map_err(|e| Failed::from(format!("{kind}: {e}")))
}

fn main() {
    let args = Arguments::from_args();
    let cases = common::cases(200);
    let probe = |kind| {
        let cfg = TableConfig::new(32).cache(CacheConfig::new(CachePolicy::Lru));
        vramkv::open_backend(kind, cfg).map(drop)
    };
    let trials = common::per_backend("cache_differential", "cache table", probe, move |kind| {
        differential(kind, cases)
    });
    libtest_mimic::run(&args, trials).exit();
}
