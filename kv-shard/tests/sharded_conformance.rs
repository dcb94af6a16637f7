//! The conformance suite on sharded tables of 1, 2 and 3 CPU shards (the root crate's
//! `tests/sharded.rs` runs it over GPU shards and mixes of backends).

use std::sync::Arc;

use kv_backend_cpu::CpuBackend;
use kv_conformance::{Availability, cases::Open};
use kv_core::{KvBackend, TableConfig};
use kv_shard::Sharded;

fn open_cpu(_: usize, cfg: TableConfig) -> kv_core::Result<Box<dyn KvBackend>> {
    Ok(Box::new(CpuBackend::open(cfg)?))
}

fn main() {
    let args = kv_conformance::libtest_mimic::Arguments::from_args();
    let mut trials = Vec::new();
    for (name, n) in [("sharded1", 1), ("sharded2", 2), ("sharded3", 3)] {
        let open: Arc<Open> = Arc::new(move |cfg: TableConfig| {
            Ok(Box::new(Sharded::open(cfg, n, &open_cpu)?) as Box<dyn KvBackend>)
        });
        trials.extend(kv_conformance::trials(
            name,
            open,
            Availability::Available,
            false,
        ));
    }
    kv_conformance::libtest_mimic::run(&args, trials).exit();
}
