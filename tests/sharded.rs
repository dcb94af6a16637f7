//! The conformance suite on sharded tables: 1, 2 and 3 shards of every backend this build
//! has, one table whose shards are one of each backend, and one of wgpu and CPU shards. A shard backend that cannot run
//! here prints `skipped: ...` (the trial is ignored), or fails where it is required
//! (`VRAMKV_REQUIRE_CUDA`, `VRAMKV_REQUIRE_WGPU`).

use std::sync::Arc;

use kv_conformance::{Availability, cases::Open};
use vramkv::{BackendKind, Error, KvBackend, Options, ShardSpec, TableConfig};

/// Whether every backend of `shards` runs here.
fn availability(shards: &[BackendKind]) -> Availability {
    for &k in shards {
        match vramkv::open_with(TableConfig::new(16), &Options::default().backend(k)) {
            Ok(_) => {}
            Err(e @ (Error::BackendUnavailable { .. } | Error::Unsupported { .. })) => {
                let env = format!("VRAMKV_REQUIRE_{}", k.name().to_uppercase());
                return Availability::unless_missing(
                    Some(e.to_string()),
                    &env,
                    &format!("{k} shard"),
                );
            }
            Err(e) => return Availability::Fail(format!("opening a {k} shard: {e}")),
        }
    }
    Availability::Available
}

fn main() {
    let args = kv_conformance::libtest_mimic::Arguments::from_args();
    let kinds: Vec<BackendKind> = BackendKind::ALL
        .into_iter()
        .filter(|k| k.compiled_in())
        .collect();
    let mut layouts: Vec<(String, Vec<BackendKind>)> = Vec::new();
    for &k in &kinds {
        for n in 1..=3 {
            layouts.push((format!("{k}x{n}"), vec![k; n]));
        }
    }
    if kinds.len() > 1 {
        let name = kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join("+");
        layouts.push((name, kinds.clone()));
    }
    // A mix that runs without a GPU where lavapipe is installed (CI): wgpu and CPU shards.
    if kinds.contains(&BackendKind::Wgpu) && kinds.contains(&BackendKind::Cpu) {
        let mix = vec![BackendKind::Wgpu, BackendKind::Cpu, BackendKind::Wgpu];
        layouts.push(("wgpu+cpu+wgpu".into(), mix));
    }
    let mut trials = Vec::new();
    for (name, shards) in layouts {
        let specs: Vec<ShardSpec> = shards.iter().map(|&k| ShardSpec::on(k)).collect();
        let open: Arc<Open> = Arc::new(move |cfg: TableConfig| {
            Ok(
                Box::new(vramkv::open_sharded(cfg, &specs, &Options::default())?)
                    as Box<dyn KvBackend>,
            )
        });
        // The suite names trials by a static backend name.
        let name: &'static str = Box::leak(format!("sharded_{name}").into_boxed_str());
        trials.extend(kv_conformance::trials(
            name,
            open,
            availability(&shards),
            false,
        ));
    }
    kv_conformance::libtest_mimic::run(&args, trials).exit();
}
