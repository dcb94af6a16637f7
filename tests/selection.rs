//! Backend selection: forcing never falls back, unknown names are errors, and automatic
//! choice records why each better backend was skipped.

use vramkv::{BackendKind, Error, KvBackend, TableConfig};

#[test]
fn a_forced_backend_that_cannot_run_is_an_error_not_a_fallback() {
    for kind in [BackendKind::Cuda, BackendKind::Wgpu] {
        match vramkv::open_with_choice(Some(kind.name()), TableConfig::new(16)) {
            Ok(t) => assert_eq!(t.kind(), kind, "forcing {kind} opened {} instead", t.kind()),
            Err(e) => assert!(
                matches!(e, Error::BackendUnavailable { backend, .. } if backend == kind.name()),
                "forcing {kind} gave {e:?}"
            ),
        }
    }
}

#[test]
fn unknown_backend_names_are_refused() {
    let r = vramkv::open_with_choice(Some("tpu"), TableConfig::new(16));
    assert!(matches!(r, Err(Error::InvalidConfig(msg)) if msg.contains("tpu")));
}

#[test]
fn auto_reports_every_better_backend_it_skipped() {
    for choice in [None, Some(""), Some("auto"), Some(" AUTO ")] {
        let t =
            vramkv::open_with_choice(choice, TableConfig::new(16)).expect("cpu is always there");
        let better: Vec<BackendKind> = BackendKind::ALL
            .into_iter()
            .take_while(|k| *k != t.kind())
            .collect();
        let skipped: Vec<BackendKind> = t.skipped().iter().map(|(k, _)| *k).collect();
        assert_eq!(skipped, better, "every better backend is listed, in order");
        assert!(t.skipped().iter().all(|(_, why)| !why.is_empty()));
        t.put(&[1], &[2]).expect("the chosen table works");
        assert_eq!(t.len(), 1);
    }
}

#[test]
fn bad_configs_are_refused_before_any_backend_is_tried() {
    let r = vramkv::open_with_choice(None, TableConfig::new(16).width(0));
    assert!(matches!(r, Err(Error::InvalidConfig(_))));
}

#[test]
fn the_facade_forwards_audit() {
    // The CPU backend keeps no tombstone books: its own answer, naming it.
    let t = vramkv::open_backend(BackendKind::Cpu, TableConfig::new(16)).expect("cpu");
    assert!(matches!(
        t.audit(),
        Err(Error::Unsupported {
            backend: "cpu",
            what: "audit"
        })
    ));
    // A GPU backend answers with its device's counts, through the facade.
    for kind in [BackendKind::Cuda, BackendKind::Wgpu] {
        let Ok(t) = vramkv::open_backend(kind, TableConfig::new(64)) else {
            println!("skipped: {kind} cannot run here");
            continue;
        };
        t.put(&[5, 6, 7], &[1, 2, 3]).expect("put");
        assert_eq!(t.delete(&[6]).expect("delete"), 1);
        let a: vramkv::Audit = t.audit().expect("a GPU backend audits");
        assert!(a.agrees(), "{kind}: {a:?}");
        assert_eq!((a.device_live, a.device_tombstones), (2, 1), "{kind}");
    }
}

#[test]
fn cache_tables_open_on_every_backend_and_a_forced_one_never_falls_back() {
    use vramkv::{CacheConfig, CachePolicy};
    let cfg = TableConfig::new(64).cache(CacheConfig::new(CachePolicy::Lru));
    // Automatic choice lands on a backend that has cache tables (CUDA when it is compiled
    // in and a device is there, then wgpu on a discrete GPU, else the CPU), and says why
    // it skipped the others.
    let t = vramkv::open_with_choice(None, cfg.clone()).expect("the cpu has cache tables");
    assert!(matches!(
        t.kind(),
        BackendKind::Cpu | BackendKind::Cuda | BackendKind::Wgpu
    ));
    assert_eq!(t.describe().backend, t.kind().name());
    assert!(t.skipped().iter().all(|(_, why)| !why.is_empty()));
    t.put(&[1, 2], &[10, 20]).expect("put");
    assert_eq!(t.cache_stats().expect("a cache table").evicted, 0);
    // Forcing a GPU backend opens a cache table there, or says that it cannot run: never
    // a table of another backend, never an ordinary table in its place.
    for kind in [BackendKind::Cuda, BackendKind::Wgpu] {
        match vramkv::open_with_choice(Some(kind.name()), cfg.clone()) {
            Ok(t) => {
                assert_eq!(t.kind(), kind);
                assert_eq!(t.describe().backend, kind.name());
                assert_eq!(t.cache_policy().expect("a cache table"), CachePolicy::Lru);
                t.put(&[1, 2], &[10, 20]).expect("put");
                assert_eq!(t.cache_stats().expect("a cache table").evicted, 0);
                assert_eq!(t.len(), 2);
            }
            Err(Error::BackendUnavailable { backend, .. }) => assert_eq!(backend, kind.name()),
            Err(e) => panic!("forcing {kind} with a cache config gave {e:?}"),
        }
    }
    // An ordinary table has no cache capabilities, and says so.
    let plain = vramkv::open_with_choice(Some("cpu"), TableConfig::new(16)).expect("cpu");
    assert!(matches!(
        plain.cache_stats(),
        Err(Error::Unsupported { .. })
    ));
}
