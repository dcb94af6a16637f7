//! Differential property tests: random sequences of put, get, delete, contains and clear
//! batches (duplicates, edge keys, widths 1..=16, growth on and off, bad input) applied to
//! the sequential model and, in lockstep, to every backend this build has. Any divergence
//! fails with proptest's shrunk sequence.
//!
//! Keys include crafted ones: three families of 64 keys whose hashes under the tables' fixed
//! seed ([`CRAFT_SEED`]) share their low 32 bits, so that each family is one chain on the
//! first slot, about a third of the way, or on the last slot of every table (wrapping around
//! its end). With the wgpu
//! backend compiled in, `differential::wgpu_probe_budget_2` runs the same property on wgpu
//! tables whose probes stop after 2 slots per dispatch, so that nearly every probe of those
//! chains is finished in resume rounds.
//!
//! `differential_sharded_<n>::<backend>` runs the property on tables of `n` shards of that
//! backend (`vramkv::Sharded`), which must answer exactly as one table does.
//!
//! `PROPTEST_CASES` sets the sequences per backend (default 1000; a quarter of that for the
//! small-budget run). A backend that cannot run here (no GPU, no adapter) prints
//! `skipped: <reason>` and its trial is reported as ignored; with `VRAMKV_REQUIRE_WGPU=1` or
//! `VRAMKV_REQUIRE_CUDA=1`, as in the other suites, a missing wgpu adapter or CUDA device
//! fails instead.

use std::sync::LazyLock;

mod common;

use kv_conformance::Model;
use kv_conformance::stress::{CRAFT_SEED, crafted_keys};
use libtest_mimic::{Arguments, Failed};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use vramkv::{BackendKind, Error, KvBackend, PutPlan, TableConfig};

#[derive(Debug, Clone)]
enum Op {
    Put(Vec<u64>, u64),
    Get(Vec<u64>),
    Delete(Vec<u64>),
    Contains(Vec<u64>),
    Clear,
    /// A put whose values slice is `short` words too short: must change nothing.
    BadPut(Vec<u64>, usize),
}

#[derive(Debug, Clone)]
struct Scenario {
    width: usize,
    capacity: usize,
    load: f64,
    growth: bool,
    ops: Vec<Op>,
}

/// Three chains of 64 crafted keys (see the module docs).
static CRAFTED: LazyLock<Vec<u64>> = LazyLock::new(|| {
    [0, 0x5555_5555, u32::MAX]
        .iter()
        .flat_map(|&low| crafted_keys(low, 64, CRAFT_SEED))
        .collect()
});

fn key() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => prop::sample::select(vec![0, 1, 2, u64::MAX, u64::MAX - 1, u64::MAX - 2, 1 << 63]),
        5 => 0..48u64,
        2 => any::<u64>(),
        3 => prop::sample::select(CRAFTED.clone()),
    ]
}

fn keys() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        6 => prop::collection::vec(key(), 0..40),
        1 => prop::collection::vec(key(), 200..600),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (keys(), any::<u64>()).prop_map(|(k, s)| Op::Put(k, s)),
        3 => keys().prop_map(Op::Get),
        3 => keys().prop_map(Op::Delete),
        2 => keys().prop_map(Op::Contains),
        1 => Just(Op::Clear),
        1 => (prop::collection::vec(key(), 1..8), 1..3usize).prop_map(|(k, s)| Op::BadPut(k, s)),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![3 => Just(1usize), 1 => 2..=16usize],
        0..300usize,
        prop::sample::select(vec![0.5, 0.75, 0.9]),
        prop::bool::weighted(0.7),
        prop::collection::vec(op(), 1..25),
    )
        .prop_map(|(width, capacity, load, growth, ops)| Scenario {
            width,
            capacity,
            load,
            growth,
            ops,
        })
}

fn values(keys: &[u64], width: usize, salt: u64) -> Vec<u64> {
    (0..keys.len() * width)
        .map(|i| keys[i / width] ^ salt.rotate_left(i as u32) ^ i as u64)
        .collect()
}

/// The model plus the shared sizing rules: what every backend must answer.
struct Expected {
    model: Model,
    slots: usize,
    cfg: TableConfig,
}

impl Expected {
    fn put(&mut self, keys: &[u64], vals: &[u64]) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        // Admission counts the batch's distinct new keys (contract item f).
        let found = self.model.contains(keys);
        let new: std::collections::HashSet<u64> = keys
            .iter()
            .zip(&found)
            .filter(|(_, f)| !**f)
            .map(|(k, _)| *k)
            .collect();
        let plan = vramkv::plan_put(
            self.model.len(),
            new.len(),
            self.slots,
            self.cfg.max_load_factor,
            self.cfg.growth,
        )?;
        if let PutPlan::Grow { slots } = plan {
            self.slots = slots;
        }
        self.model.put(keys, vals);
        Ok(())
    }
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(msg()))
    }
}

fn run_scenario(
    s: &Scenario,
    backends: &[(BackendKind, Box<dyn KvBackend>)],
) -> Result<(), TestCaseError> {
    let w = s.width;
    let mut exp = Expected {
        model: Model::new(w),
        slots: 0,
        cfg: backends_cfg(s),
    };
    exp.slots = exp.cfg.initial_slots();
    for (step, op) in s.ops.iter().enumerate() {
        for (kind, t) in backends {
            let at = || format!("{kind}, step {step}, op {op:?}");
            match op {
                Op::Put(k, salt) => {
                    let r = t.put(k, &values(k, w, *salt));
                    // Compare with what the model will do (computed on a clone so each backend sees the same).
                    let mut e2 = Expected {
                        model: exp.model.clone(),
                        slots: exp.slots,
                        cfg: exp.cfg.clone(),
                    };
                    let want = e2.put(k, &values(k, w, *salt));
                    check(r == want, || {
                        format!("{}: put returned {r:?}, expected {want:?}", at())
                    })?;
                }
                Op::BadPut(k, short) => {
                    let v = values(k, w, 1);
                    let r = t.put(k, &v[..v.len().saturating_sub(*short)]);
                    check(
                        matches!(
                            r,
                            Err(Error::LengthMismatch { .. } | Error::WidthMismatch { .. })
                        ),
                        || format!("{}: bad put returned {r:?}", at()),
                    )?;
                }
                Op::Get(k) => {
                    let mut v = vec![0xBAD; k.len() * w];
                    let mut f = vec![true; k.len()];
                    t.get(k, &mut v, &mut f)
                        .map_err(|e| TestCaseError::fail(format!("{}: {e}", at())))?;
                    let (mv, mf) = exp.model.get(k);
                    check(f == mf, || {
                        format!("{}: found {f:?}, expected {mf:?}", at())
                    })?;
                    check(v == mv, || {
                        format!("{}: values {v:?}, expected {mv:?}", at())
                    })?;
                }
                Op::Contains(k) => {
                    let mut f = vec![false; k.len()];
                    t.contains(k, &mut f)
                        .map_err(|e| TestCaseError::fail(format!("{}: {e}", at())))?;
                    let mf = exp.model.contains(k);
                    check(f == mf, || {
                        format!("{}: contains {f:?}, expected {mf:?}", at())
                    })?;
                }
                Op::Delete(k) => {
                    let n = t
                        .delete(k)
                        .map_err(|e| TestCaseError::fail(format!("{}: {e}", at())))?;
                    let want = exp.model.clone().delete(k);
                    check(n == want, || {
                        format!("{}: deleted {n}, expected {want}", at())
                    })?;
                }
                Op::Clear => t
                    .clear()
                    .map_err(|e| TestCaseError::fail(format!("{}: {e}", at())))?,
            }
        }
        match op {
            Op::Put(k, salt) => {
                let _ = exp.put(k, &values(k, w, *salt));
            }
            Op::Delete(k) => {
                exp.model.delete(k);
            }
            Op::Clear => exp.model.clear(),
            _ => {}
        }
        let cap = vramkv::capacity_of(exp.slots, s.load);
        for (kind, t) in backends {
            check(t.len() == exp.model.len(), || {
                format!(
                    "{kind}, step {step}: len {} vs {}",
                    t.len(),
                    exp.model.len()
                )
            })?;
            check(t.capacity() == cap, || {
                format!("{kind}, step {step}: capacity {} vs {cap}", t.capacity())
            })?;
        }
    }
    // Finally every key the model holds, and some it does not, read back identically.
    let mut probe = exp.model.keys();
    probe.extend([0, 1, u64::MAX, u64::MAX - 1, 47]);
    let (mv, mf) = exp.model.get(&probe);
    for (kind, t) in backends {
        let mut v = vec![0; probe.len() * w];
        let mut f = vec![false; probe.len()];
        t.get(&probe, &mut v, &mut f)
            .map_err(|e| TestCaseError::fail(format!("{kind}: final get: {e}")))?;
        check(v == mv && f == mf, || {
            format!("{kind}: final contents differ from the model")
        })?;
    }
    Ok(())
}

fn backends_cfg(s: &Scenario) -> TableConfig {
    TableConfig::new(s.capacity)
        .width(s.width)
        .max_load_factor(s.load)
        .growth(s.growth)
        .seed(CRAFT_SEED)
}

/// Opens a table of one backend.
type Opener = fn(BackendKind, TableConfig) -> Result<Box<dyn KvBackend>, TestCaseError>;

/// Runs the property for `kind`, with the CPU backend alongside as a second reference.
fn differential(kind: BackendKind, cases: u32) -> Result<(), Failed> {
    differential_with(kind, cases, open)
}

/// [`differential`], with `kind`'s tables opened by `open_kind`.
fn differential_with(kind: BackendKind, cases: u32, open_kind: Opener) -> Result<(), Failed> {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&scenario(), |s| {
            let cfg = backends_cfg(&s);
            let mut backends = vec![(kind, open_kind(kind, cfg.clone())?)];
            if kind != BackendKind::Cpu && BackendKind::Cpu.compiled_in() {
                backends.push((BackendKind::Cpu, open(BackendKind::Cpu, cfg)?));
            }
            run_scenario(&s, &backends)
        })
        .map_err(|e| Failed::from(format!("{kind}: {e}")))
}

fn open(kind: BackendKind, cfg: TableConfig) -> Result<Box<dyn KvBackend>, TestCaseError> {
    vramkv::open_backend(kind, cfg)
        .map(|t| Box::new(t) as Box<dyn KvBackend>)
        .map_err(|e| TestCaseError::fail(format!("opening {kind}: {e}")))
}

/// A table of `n` shards of `kind` (`vramkv::Sharded`).
fn open_shards(
    n: usize,
    kind: BackendKind,
    cfg: TableConfig,
) -> Result<Box<dyn KvBackend>, TestCaseError> {
    let specs = vec![vramkv::ShardSpec::on(kind); n];
    vramkv::open_sharded(cfg, &specs, &vramkv::Options::default())
        .map(|t| Box::new(t) as Box<dyn KvBackend>)
        .map_err(|e| TestCaseError::fail(format!("opening {n} {kind} shards: {e}")))
}

fn open_shards1(kind: BackendKind, cfg: TableConfig) -> Result<Box<dyn KvBackend>, TestCaseError> {
    open_shards(1, kind, cfg)
}

fn open_shards2(kind: BackendKind, cfg: TableConfig) -> Result<Box<dyn KvBackend>, TestCaseError> {
    open_shards(2, kind, cfg)
}

fn open_shards3(kind: BackendKind, cfg: TableConfig) -> Result<Box<dyn KvBackend>, TestCaseError> {
    open_shards(3, kind, cfg)
}

/// A wgpu table whose probes stop after 2 slots per dispatch.
#[cfg(feature = "wgpu")]
fn open_wgpu_budget_2(
    _: BackendKind,
    cfg: TableConfig,
) -> Result<Box<dyn KvBackend>, TestCaseError> {
    let t = kv_backend_wgpu::WgpuBackend::open(cfg)
        .map_err(|e| TestCaseError::fail(format!("opening wgpu: {e}")))?;
    t.set_probe_budget(2);
    Ok(Box::new(t))
}

/// The budget reaches the shaders: the crafted chains need resume rounds at 2 slots.
#[cfg(feature = "wgpu")]
fn budget_2_resumes() -> Result<(), Failed> {
    let t = kv_backend_wgpu::WgpuBackend::open(TableConfig::new(1000).seed(CRAFT_SEED))
        .map_err(|e| Failed::from(format!("opening wgpu: {e}")))?;
    t.set_probe_budget(2);
    let keys: &[u64] = &CRAFTED;
    t.put(keys, keys)
        .map_err(|e| Failed::from(format!("put: {e}")))?;
    let (mut v, mut f) = (vec![0; keys.len()], vec![false; keys.len()]);
    t.get(keys, &mut v, &mut f)
        .map_err(|e| Failed::from(format!("get: {e}")))?;
    if v != keys || f.iter().any(|f| !f) {
        return Err("crafted chains read back wrong at a budget of 2".into());
    }
    if t.resume_rounds() == 0 {
        return Err("crafted chains at a budget of 2 ran no resume round".into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let cases = common::cases(1000);
    let probe = |kind| vramkv::open_backend(kind, TableConfig::new(16)).map(drop);
    #[allow(unused_mut)]
    let mut trials = common::per_backend("differential", "table", probe, move |kind| {
        differential(kind, cases)
    });
    // Sharded tables of 1, 2 and 3 shards of each backend, a quarter of the sequences each:
    // the same answers, admission and growth as one table.
    for (n, opener) in [
        (1, open_shards1 as Opener),
        (2, open_shards2),
        (3, open_shards3),
    ] {
        trials.extend(common::per_backend(
            &format!("differential_sharded_{n}"),
            "table",
            probe,
            move |kind| differential_with(kind, cases.div_ceil(4), opener),
        ));
    }
    #[cfg(feature = "wgpu")]
    {
        let name = "differential::wgpu_probe_budget_2";
        let availability = kv_conformance::Availability::unless_missing(
            kv_backend_wgpu::unavailable_reason(),
            kv_backend_wgpu::REQUIRE_ENV,
            "wgpu",
        );
        availability.announce(name);
        trials.push(availability.trial(name, move || {
            differential_with(BackendKind::Wgpu, cases.div_ceil(4), open_wgpu_budget_2)?;
            budget_2_resumes()
        }));
    }
    libtest_mimic::run(&args, trials).exit();
}
