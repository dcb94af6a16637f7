//! Durable tables across reopenings: every write batch replayed, rewrites that move to a
//! new generation and delete the old one, expiry times kept absolute, and configs that do
//! not fit the stored table refused.

use std::path::PathBuf;
use std::sync::Arc;

use kv_backend_cpu::{CpuBackend, CpuBytes, CpuCache};
use kv_conformance::SplitMix64;
use kv_conformance::bytes::ByteModel;
use kv_core::{
    BinaryBuf, ByteConfig, ByteTable, CacheConfig, CachePolicy, CachePut, Clock, Error, KvBackend,
    ManualClock, TableConfig,
};
use kv_durable::journal::{log_path, snapshot_path};
use kv_durable::{DurableBytes, DurableTable, Fsync, LogConfig};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vramkv-durable-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn open_cpu(cfg: TableConfig) -> kv_core::Result<Box<dyn KvBackend>> {
    if cfg.cache.is_some() {
        Ok(Box::new(CpuCache::open(cfg)?))
    } else {
        Ok(Box::new(CpuBackend::open(cfg)?))
    }
}

fn open_bytes(cfg: ByteConfig) -> kv_core::Result<Box<dyn ByteTable>> {
    Ok(Box::new(CpuBytes::open(cfg)?))
}

fn sorted(t: &dyn KvBackend) -> kv_core::TableImage {
    let mut i = t.export().expect("export");
    i.sort();
    i
}

#[test]
fn fixed_table_reopens_with_every_batch_and_rewrites() {
    let dir = scratch("fixed");
    let cfg = TableConfig::new(64).width(2).seed(5);
    let log = LogConfig::new(Fsync::No).rewrite_bytes(16 << 10);
    let model = CpuBackend::open(cfg.clone()).expect("model");
    let mut rng = SplitMix64(1);
    for round in 0..4 {
        let (t, report) =
            DurableTable::open(&dir, cfg.clone(), log.clone(), &open_cpu).expect("open");
        assert_eq!(report.created, round == 0);
        assert_eq!(sorted(&t), sorted(&model), "round {round}: reopened table");
        for b in 0..60 {
            let keys: Vec<u64> = (0..40).map(|_| rng.below(500)).collect();
            let vals: Vec<u64> = keys.iter().flat_map(|&k| [k, b]).collect();
            t.put(&keys, &vals).expect("put");
            model.put(&keys, &vals).expect("put");
            let gone: Vec<u64> = (0..10).map(|_| rng.below(500)).collect();
            assert_eq!(
                t.delete(&gone).expect("delete"),
                model.delete(&gone).expect("delete")
            );
            if b == 30 && round == 2 {
                t.clear().expect("clear");
                model.clear().expect("clear");
            }
            // Bad input is refused and not logged.
            assert!(t.put(&[1], &[1]).is_err());
        }
        t.wait_rewrite().expect("rewrite");
        let (g, _) = t.log_position();
        assert!(g > 0, "round {round}: the log never rewrote");
        // Only the current generation's files are left.
        assert!(snapshot_path(&dir, g).exists());
        assert!(!snapshot_path(&dir, g - 1).exists());
        assert!(!log_path(&dir, g - 1).exists());
    }
    let (t, r) = DurableTable::open(&dir, cfg.clone(), log, &open_cpu).expect("open");
    assert_eq!(sorted(&t), sorted(&model));
    assert!(r.generation > 0 && r.torn.is_none());
    // A forced rewrite, then a reopen from its snapshot alone.
    t.rewrite().expect("rewrite");
    t.wait_rewrite().expect("rewrite");
    drop(t);
    let (t, r) = DurableTable::open(&dir, cfg, LogConfig::default(), &open_cpu).expect("open");
    assert_eq!(r.records, 0);
    assert_eq!(sorted(&t), sorted(&model));
    drop(t);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_config_that_does_not_fit_the_stored_table_is_refused() {
    let dir = scratch("mismatch");
    let cfg = TableConfig::new(64).width(2);
    {
        let (t, _) =
            DurableTable::open(&dir, cfg.clone(), LogConfig::default(), &open_cpu).expect("open");
        t.put(&[1], &[1, 2]).expect("put");
    }
    let wider = TableConfig::new(64).width(3);
    assert!(matches!(
        DurableTable::open(&dir, wider, LogConfig::default(), &open_cpu),
        Err(Error::InvalidConfig(_))
    ));
    let cache = TableConfig::new(64)
        .width(2)
        .cache(CacheConfig::new(CachePolicy::Lru));
    assert!(matches!(
        DurableTable::open(&dir, cache, LogConfig::default(), &open_cpu),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        DurableBytes::open(&dir, ByteConfig::new(10), LogConfig::default(), &open_bytes),
        Err(Error::InvalidConfig(_))
    ));
    // The refusals changed nothing.
    let (t, _) = DurableTable::open(&dir, cfg, LogConfig::default(), &open_cpu).expect("open");
    assert_eq!(t.len(), 1);
    drop(t);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn cache_table_replays_scores_and_expiry() {
    let dir = scratch("cache");
    let clock = Arc::new(ManualClock::new(10_000));
    let cfg = TableConfig::new(512)
        .width(1)
        .seed(2)
        .cache(CacheConfig::new(CachePolicy::Custom).clock(clock.clone()));
    let keys: Vec<u64> = (0..200).collect();
    let scores: Vec<u64> = keys.iter().map(|k| k * 7).collect();
    let ttl: Vec<u64> = keys
        .iter()
        .map(|k| [0, 100, 1000][(k % 3) as usize])
        .collect();
    let before = {
        let (t, _) =
            DurableTable::open(&dir, cfg.clone(), LogConfig::new(Fsync::Always), &open_cpu)
                .expect("open");
        t.put_cached(CachePut::new(&keys, &keys).scores(&scores).ttl_ms(&ttl))
            .expect("put");
        let (mut v, mut f) = (vec![0; 10], vec![false; 10]);
        t.take(&keys[..10], &mut v, &mut f, &mut [0; 10])
            .expect("take");
        sorted(&t)
    };
    let (t, r) = DurableTable::open(&dir, cfg.clone(), LogConfig::new(Fsync::Always), &open_cpu)
        .expect("open");
    assert_eq!(r.records, 2);
    assert_eq!(
        sorted(&t),
        before,
        "scores and absolute expiry times came back"
    );
    drop(t);
    // Reopened after some keys expired: they stay gone.
    clock.advance(500);
    let (t, _) =
        DurableTable::open(&dir, cfg, LogConfig::new(Fsync::Always), &open_cpu).expect("open");
    let img = sorted(&t);
    assert_eq!(
        img.len(),
        before.len() - keys[10..].iter().filter(|k| *k % 3 == 1).count()
    );
    drop(t);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn byte_table_replays_puts_deletes_and_expiry_against_the_model() {
    let dir = scratch("bytes");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let cfg = ByteConfig::new(64)
        .max_value_bytes(2048)
        .clock(clock.clone());
    let log = LogConfig::new(Fsync::EverySec).rewrite_bytes(32 << 10);
    let mut m = ByteModel::new();
    m.advance(clock.now_ms());
    let mut rng = SplitMix64(9);
    let key = |i: u64| format!("user:{i}").into_bytes();
    for round in 0..5 {
        let (t, _) = DurableBytes::open(&dir, cfg.clone(), log.clone(), &open_bytes).expect("open");
        m.check(&t, &[b"user:x".to_vec()]);
        for _ in 0..40 {
            let n = 1 + rng.below(30) as usize;
            let keys: Vec<Vec<u8>> = (0..n).map(|_| key(rng.below(300))).collect();
            let vals: Vec<Vec<u8>> = (0..n)
                .map(|_| vec![rng.below(256) as u8; rng.below(1500) as usize])
                .collect();
            let (kb, vb) = (BinaryBuf::from_slices(&keys), BinaryBuf::from_slices(&vals));
            match rng.below(5) {
                0 => {
                    t.put(kb.as_binary(), vb.as_binary()).expect("put");
                    m.put(kb.as_binary(), vb.as_binary());
                }
                1 | 2 => {
                    let ttl: Vec<u64> = (0..n).map(|_| rng.below(3) * 400).collect();
                    t.put_ttl(kb.as_binary(), vb.as_binary(), &ttl)
                        .expect("put_ttl");
                    m.put_ttl(kb.as_binary(), vb.as_binary(), &ttl);
                }
                3 => {
                    assert_eq!(
                        t.delete(kb.as_binary()).expect("delete"),
                        m.delete(kb.as_binary())
                    );
                }
                _ => {
                    let ttl: Vec<u64> = (0..n).map(|_| rng.below(3) * 300).collect();
                    let mut found = vec![false; n];
                    t.expire(kb.as_binary(), &ttl, &mut found).expect("expire");
                    assert_eq!(found, m.expire(kb.as_binary(), &ttl));
                }
            }
            clock.advance(rng.below(60));
            m.advance(clock.now_ms());
        }
        m.check(&t, &[]);
        if round == 3 {
            t.clear().expect("clear");
            m.clear();
        }
        drop(t);
        // Time passes while the table is closed: entries expire meanwhile.
        clock.advance(150);
        m.advance(clock.now_ms());
    }
    let (t, r) = DurableBytes::open(&dir, cfg, log, &open_bytes).expect("open");
    m.check(&t, &[]);
    assert!(r.generation > 0, "the byte log never rewrote");
    drop(t);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn logs_without_their_snapshot_are_refused() {
    let dir = scratch("orphan");
    {
        let (t, _) = DurableTable::open(&dir, TableConfig::new(8), LogConfig::default(), &open_cpu)
            .expect("open");
        t.put(&[1], &[1]).expect("put");
    }
    std::fs::remove_file(snapshot_path(&dir, 0)).expect("remove");
    assert!(matches!(
        DurableTable::open(&dir, TableConfig::new(8), LogConfig::default(), &open_cpu),
        Err(Error::Corrupt { .. })
    ));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
