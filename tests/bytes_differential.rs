//! Differential property tests of byte tables: random sequences of puts, gets, deletes and
//! clears over byte-string keys (short keys from a tiny alphabet so that they repeat and
//! share prefixes, empty values, zero bytes, the longest keys), on tables whose hashes keep
//! only a few bits (so that distinct keys collide) and whose arenas are small (so that
//! compaction runs all the time), applied to every backend of this build that has byte
//! tables and checked after every batch by `kv_conformance::bytes::ByteModel`.
//!
//! `PROPTEST_CASES` sets the sequences per backend (default 200). A backend without byte
//! tables prints `skipped: <reason>` and its trial is ignored, except wgpu when
//! `VRAMKV_REQUIRE_WGPU=1`: then a missing adapter fails the trial.

mod common;

use kv_conformance::bytes::ByteModel;
use libtest_mimic::{Arguments, Failed};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vramkv::{BackendKind, BinaryBuf, ByteConfig, ByteTable, Error, TableConfig};

const MAX_KEY: usize = 24;

#[derive(Debug, Clone)]
enum Op {
    Put(Vec<Vec<u8>>, Vec<Vec<u8>>),
    Get(Vec<Vec<u8>>),
    Delete(Vec<Vec<u8>>),
    Clear,
}

#[derive(Debug, Clone)]
struct Scenario {
    hash_bits: u32,
    growth: bool,
    ops: Vec<Op>,
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::collection::vec(0u8..3, 1..6),
        2 => prop::collection::vec(any::<u8>(), 1..=MAX_KEY),
        1 => Just(vec![0u8; MAX_KEY]),
        1 => Just(vec![0xffu8; MAX_KEY]),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        4 => prop::collection::vec(any::<u8>(), 0..40),
        1 => prop::collection::vec(any::<u8>(), 200..900),
    ]
}

fn keys() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        5 => prop::collection::vec(key(), 0..20),
        1 => prop::collection::vec(key(), 60..150),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => keys().prop_flat_map(|k| {
            let n = k.len();
            (Just(k), prop::collection::vec(value(), n))
        }).prop_map(|(k, v)| Op::Put(k, v)),
        3 => keys().prop_map(Op::Get),
        2 => keys().prop_map(Op::Delete),
        1 => Just(Op::Clear),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::sample::select(vec![2u32, 5, 64]),
        any::<bool>(),
        prop::collection::vec(op(), 1..30),
    )
        .prop_map(|(hash_bits, growth, ops)| Scenario {
            hash_bits,
            growth,
            ops,
        })
}

fn config(s: &Scenario) -> ByteConfig {
    ByteConfig::new(48)
        .max_key_bytes(MAX_KEY)
        .max_value_bytes(1024)
        .segment_bytes(4096)
        .hash_bits(s.hash_bits)
        .table(TableConfig::new(48).growth(s.growth).seed(0xb17e5))
}

fn run(kind: BackendKind, s: &Scenario) -> Result<(), TestCaseError> {
    let t = vramkv::open_bytes_with(config(s), &vramkv::Options::default().backend(kind))
        .map_err(|e| TestCaseError::fail(format!("open: {e}")))?;
    let mut m = ByteModel::new();
    for op in &s.ops {
        let probes: Vec<Vec<u8>> = match op {
            Op::Put(k, v) => {
                let (kb, vb) = (BinaryBuf::from_slices(k), BinaryBuf::from_slices(v));
                let before = t.describe();
                match t.put(kb.as_binary(), vb.as_binary()) {
                    Ok(()) => m.put(kb.as_binary(), vb.as_binary()),
                    Err(Error::CapacityExceeded { .. }) if !s.growth => {
                        prop_assert_eq!(t.describe(), before, "a refused put changed the table");
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("put: {e}"))),
                }
                k.clone()
            }
            Op::Get(k) => k.clone(),
            Op::Delete(k) => {
                let kb = BinaryBuf::from_slices(k);
                let got = t
                    .delete(kb.as_binary())
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(got, m.delete(kb.as_binary()), "delete count");
                k.clone()
            }
            Op::Clear => {
                t.clear().map_err(|e| TestCaseError::fail(format!("{e}")))?;
                m.clear();
                Vec::new()
            }
        };
        let checked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.check(&t, &probes)));
        if let Err(p) = checked {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(TestCaseError::fail(format!("after {op:?}: {msg}")));
        }
    }
    Ok(())
}

fn differential(kind: BackendKind, cases: u32) -> Result<(), Failed> {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&scenario(), |s| run(kind, &s))
        .map_err(|e| Failed::from(format!("{kind}: {e}")))
}

/// Whether a backend must run here: wgpu when `VRAMKV_REQUIRE_WGPU` is set to anything but 0 (CI, with lavapipe).
fn main() {
    let args = Arguments::from_args();
    let cases = common::cases(200);
    let probe = |kind| {
        vramkv::open_bytes_with(
            ByteConfig::new(16),
            &vramkv::Options::default().backend(kind),
        )
        .map(drop)
    };
    let trials = common::per_backend("bytes_differential", "byte table", probe, move |kind| {
        differential(kind, cases)
    });
    libtest_mimic::run(&args, trials).exit();
}
