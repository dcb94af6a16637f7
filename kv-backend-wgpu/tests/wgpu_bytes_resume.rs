//! `WgpuBytes` with tiny pieces and probe budgets: the byte-table suite
//! (`kv_conformance::bytes`) again with every batch cut into pieces of a few items and
//! every probe stopped after a few units of work and resumed, plus cases that check the
//! resume path ran and found what the model holds. Skipped without an adapter, unless
//! `VRAMKV_REQUIRE_WGPU=1`.

use std::collections::BTreeMap;
use std::sync::Arc;

use kv_backend_wgpu::WgpuBytes;
use kv_conformance::Availability;
use kv_conformance::libtest_mimic::{self, Arguments, Failed};
use kv_core::{BinaryBuf, ByteConfig, ByteTable, TableConfig};

/// Items per piece: odd, so that pieces end mid-run of colliding keys.
const PIECE: usize = 61;
/// Units of probe work per dispatch: a few slots and words of key, far less than the
/// chains of the suite's colliding keys.
const BUDGET: u32 = 64;

fn availability() -> Availability {
    Availability::unless_missing(
        kv_backend_wgpu::unavailable_reason(),
        kv_backend_wgpu::REQUIRE_ENV,
        "no wgpu adapter",
    )
}

fn open_tiny(cfg: ByteConfig, piece: usize, budget: u32) -> kv_core::Result<WgpuBytes> {
    let t = WgpuBytes::open(cfg)?;
    t.set_piece_items(piece);
    t.set_probe_budget(budget);
    Ok(t)
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(what().into()) }
}

/// 400 keys that share one of two hashes, with the smallest budget: every probe walks a
/// chain of hundreds of slots one unit of work per dispatch, resumed. Overwrites, deletes
/// and lookups must answer as a map does, and the resume path must have run.
fn colliding_chains_resume(budget: u32) -> Result<(), Failed> {
    let cfg = ByteConfig::new(512)
        .max_key_bytes(32)
        .max_value_bytes(256)
        .segment_bytes(1 << 14)
        .hash_bits(1)
        .table(TableConfig::new(512).seed(9));
    let t = open_tiny(cfg, 97, budget)?;
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let keys: Vec<Vec<u8>> = (0..400u32)
        .map(|i| format!("chain-{i}").into_bytes())
        .collect();
    let values: Vec<Vec<u8>> = (0..400u32)
        .map(|i| vec![(i % 251) as u8; (i % 37) as usize])
        .collect();
    t.put(
        BinaryBuf::from_slices(&keys).as_binary(),
        BinaryBuf::from_slices(&values).as_binary(),
    )?;
    model.extend(keys.iter().cloned().zip(values.iter().cloned()));
    let dels: Vec<&Vec<u8>> = keys.iter().step_by(4).collect();
    let removed = t.delete(BinaryBuf::from_slices(&dels).as_binary())?;
    check(removed == dels.len(), || {
        format!("deleted {removed} of {}", dels.len())
    })?;
    for k in &dels {
        model.remove(*k);
    }
    let over: Vec<&Vec<u8>> = keys.iter().skip(1).step_by(3).collect();
    let over_values: Vec<Vec<u8>> = over.iter().map(|k| [&k[..], b"!"].concat()).collect();
    t.put(
        BinaryBuf::from_slices(&over).as_binary(),
        BinaryBuf::from_slices(&over_values).as_binary(),
    )?;
    for (k, v) in over.iter().zip(&over_values) {
        model.insert(k.to_vec(), v.clone());
    }
    let mut probes = keys.clone();
    probes.push(b"chain-400".to_vec());
    probes.push(b"chain-".to_vec());
    let kb = BinaryBuf::from_slices(&probes);
    let mut out = BinaryBuf::new();
    let mut found = vec![false; probes.len()];
    t.get(kb.as_binary(), &mut out, &mut found)?;
    for (i, k) in probes.iter().enumerate() {
        let want = model.get(k);
        check(found[i] == want.is_some(), || {
            format!("found flag of {k:?}")
        })?;
        let got = out.get(i).unwrap_or_default();
        check(got == want.map_or(&[][..], Vec::as_slice), || {
            format!("value of {k:?}: {got:?}, want {want:?}")
        })?;
    }
    check(t.len() == model.len(), || {
        format!("len {} against {}", t.len(), model.len())
    })?;
    let live: u64 = model.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    let d = t.describe();
    check(d.arena.live_bytes == live, || format!("live bytes: {d:?}"))?;
    check(t.resume_rounds() > 0, || "no probe was resumed".into())
}

fn main() {
    let args = Arguments::from_args();
    let open = |cfg| Ok(Box::new(open_tiny(cfg, PIECE, BUDGET)?) as Box<dyn ByteTable>);
    let mut trials = kv_conformance::bytes::trials("wgpu-tiny", Arc::new(open), availability());
    for budget in [1, 3] {
        trials.push(availability().trial(
            format!("wgpu-tiny::colliding_chains_resume_budget_{budget}"),
            move || colliding_chains_resume(budget),
        ));
    }
    libtest_mimic::run(&args, trials).exit();
}
