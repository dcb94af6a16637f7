//! Snapshots and logs as files: round trips on every kind of table, and damaged files
//! (truncated anywhere, a bit flipped anywhere, foreign, newer) refused by name with
//! nothing loaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kv_backend_cpu::{CpuBackend, CpuBytes, CpuCache};
use kv_conformance::SplitMix64;
use kv_core::{
    BinaryBuf, ByteConfig, ByteTable, CacheConfig, CachePolicy, CachePut, Error, KvBackend,
    ManualClock, TableConfig,
};
use kv_durable::log::{self, LogKind, LogWriter, Record};
use kv_durable::snapshot::{self, Contents, FORMAT_VERSION};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vramkv-files-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn fixed_table(n: u64) -> (CpuBackend, TableConfig) {
    let cfg = TableConfig::new(4096).width(3).seed(9);
    let t = CpuBackend::open(cfg.clone()).expect("open");
    let keys: Vec<u64> = (0..n)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let vals: Vec<u64> = keys.iter().flat_map(|&k| [k, !k, k ^ 7]).collect();
    t.put(&keys, &vals).expect("put");
    (t, cfg)
}

#[test]
fn fixed_snapshot_round_trip() {
    let dir = scratch("fixed");
    let path = dir.join("t.vkv");
    let (t, cfg) = fixed_table(3000);
    let r = snapshot::save_table(&path, &t, &cfg).expect("save");
    assert_eq!(r.entries, 3000);
    assert_eq!(r.bytes, std::fs::metadata(&path).expect("meta").len());
    assert!(
        !snapshot::temp_path(&path).exists(),
        "the temporary file was renamed"
    );
    let snap = snapshot::read(&path).expect("read");
    assert_eq!(snap.header.entries, 3000);
    assert_eq!(snap.header.backend, "cpu");
    let again = CpuBackend::open(snap.header.table_config().expect("config")).expect("open");
    let Contents::Table(img) = &snap.contents else {
        panic!("a fixed-width snapshot read back as bytes")
    };
    snapshot::restore_table(&again, img, 1000).expect("restore");
    let (mut a, mut b) = (t.export().expect("export"), again.export().expect("export"));
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let ins = snapshot::inspect(&path);
    assert!(ins.complete && ins.error.is_none(), "{ins:?}");
    assert_eq!((ins.entries_ok, ins.version), (3000, Some(FORMAT_VERSION)));
}

#[test]
fn cache_snapshot_keeps_scores_and_expiry() {
    let dir = scratch("cache");
    let path = dir.join("c.vkv");
    let clock = Arc::new(ManualClock::new(5000));
    let cfg = TableConfig::new(1024)
        .width(2)
        .seed(3)
        .cache(CacheConfig::new(CachePolicy::Custom).clock(clock.clone()));
    let t = CpuCache::open(cfg.clone()).expect("open");
    let keys: Vec<u64> = (0..500).collect();
    let vals: Vec<u64> = keys.iter().flat_map(|&k| [k, k + 1]).collect();
    let scores: Vec<u64> = keys.iter().map(|k| k * 11).collect();
    let ttl: Vec<u64> = keys.iter().map(|k| k % 4 * 1000).collect();
    t.put_cached(CachePut::new(&keys, &vals).scores(&scores).ttl_ms(&ttl))
        .expect("put");
    snapshot::save_table(&path, &t, &cfg).expect("save");
    let snap = snapshot::read(&path).expect("read");
    assert_eq!(snap.header.cache.as_deref(), Some("custom"));
    let mut cfg2 = snap.header.table_config().expect("config");
    cfg2.cache = Some(CacheConfig::new(CachePolicy::Custom).clock(clock.clone()));
    let u = CpuCache::open(cfg2).expect("open");
    let Contents::Table(img) = &snap.contents else {
        panic!("wrong kind")
    };
    snapshot::restore_table(&u, img, 100).expect("restore");
    let (mut a, mut b) = (t.export().expect("export"), u.export().expect("export"));
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // Time passes between the save and the load: what expired stays out.
    clock.advance(1500);
    let v = CpuCache::open(cfg.clone()).expect("open");
    snapshot::restore_table(&v, img, 100).expect("restore");
    assert_eq!(v.len(), t.len(), "the same entries expired in both");
    assert_eq!(v.len(), 500 - 125);
}

#[test]
fn byte_snapshot_round_trip() {
    let dir = scratch("bytes");
    let path = dir.join("b.vkv");
    let clock = Arc::new(ManualClock::new(100));
    let cfg = ByteConfig::new(1000)
        .max_value_bytes(1 << 20)
        .clock(clock.clone());
    let t = CpuBytes::open(cfg.clone()).expect("open");
    let keys: Vec<Vec<u8>> = (0..700u32)
        .map(|i| format!("key:{i}").into_bytes())
        .collect();
    let vals: Vec<Vec<u8>> = (0..700usize)
        .map(|i| vec![(i % 251) as u8; if i == 3 { 1 << 20 } else { i % 97 }])
        .collect();
    let ttl: Vec<u64> = (0..700u64).map(|i| i % 2 * 10_000).collect();
    let (kb, vb) = (BinaryBuf::from_slices(&keys), BinaryBuf::from_slices(&vals));
    t.put_ttl(kb.as_binary(), vb.as_binary(), &ttl)
        .expect("put");
    let r = snapshot::save_bytes(&path, &t, &cfg).expect("save");
    assert_eq!(r.entries, 700);
    let snap = snapshot::read(&path).expect("read");
    let u = CpuBytes::open(snap.header.byte_config().clock(clock.clone())).expect("open");
    let Contents::Bytes(img) = &snap.contents else {
        panic!("wrong kind")
    };
    snapshot::restore_bytes(&u, img, clock.now_ms()).expect("restore");
    let (mut a, mut b) = (t.export().expect("export"), u.export().expect("export"));
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

use kv_core::Clock;

/// Every prefix of the file, and a flipped bit at many places, is refused by name; the
/// untouched file still loads.
#[test]
fn damaged_snapshots_are_refused_and_load_nothing() {
    let dir = scratch("damage");
    for kind in ["fixed", "bytes"] {
        let path = dir.join(format!("{kind}.vkv"));
        if kind == "fixed" {
            let (t, cfg) = fixed_table(2500);
            snapshot::save_table(&path, &t, &cfg).expect("save");
        } else {
            let t = CpuBytes::open(ByteConfig::new(100)).expect("open");
            let keys: Vec<Vec<u8>> = (0..300u32).map(|i| format!("k{i}").into_bytes()).collect();
            let kb = BinaryBuf::from_slices(&keys);
            t.put(kb.as_binary(), kb.as_binary()).expect("put");
            snapshot::save_bytes(&path, &t, &ByteConfig::new(100)).expect("save");
        }
        let good = std::fs::read(&path).expect("read");
        let bad = dir.join("bad.vkv");
        let mut rng = SplitMix64(7);
        // Truncations: every length near the structure's edges and a spread in between.
        let mut cuts: Vec<usize> = (0..64).chain(good.len() - 64..good.len()).collect();
        cuts.extend((0..200).map(|_| rng.below(good.len() as u64) as usize));
        for cut in cuts {
            std::fs::write(&bad, &good[..cut]).expect("write");
            expect_corrupt(&bad, &format!("{kind} cut at {cut} of {}", good.len()));
        }
        // Bit flips anywhere.
        for _ in 0..300 {
            let mut d = good.clone();
            let at = rng.below(d.len() as u64) as usize;
            d[at] ^= 1 << rng.below(8);
            std::fs::write(&bad, &d).expect("write");
            match snapshot::read(&bad) {
                Err(Error::Corrupt { file, .. }) => assert!(file.ends_with("bad.vkv")),
                Err(Error::NewerFormat { .. }) => assert!((8..12).contains(&at)),
                Err(e) => panic!("{kind}: bit flip at {at}: unexpected error {e}"),
                Ok(_) => panic!("{kind}: a bit flip at byte {at} loaded"),
            }
        }
        // A byte appended after the end record.
        let mut d = good.clone();
        d.push(0);
        std::fs::write(&bad, &d).expect("write");
        expect_corrupt(&bad, "trailing byte");
        assert!(snapshot::read(&path).is_ok());
    }
}

fn expect_corrupt(path: &Path, ctx: &str) {
    match snapshot::read(path) {
        Err(Error::Corrupt { detail, .. }) => assert!(!detail.is_empty()),
        Err(e) => panic!("{ctx}: expected a corrupt-file error, got {e}"),
        Ok(_) => panic!("{ctx}: a damaged snapshot loaded"),
    }
    let ins = snapshot::inspect(path);
    assert!(
        !ins.complete && ins.error.is_some(),
        "{ctx}: inspect said {ins:?}"
    );
}

#[test]
fn foreign_and_newer_files_are_refused_by_name() {
    let dir = scratch("foreign");
    let p = dir.join("x.vkv");
    for (what, bytes) in [
        ("empty", Vec::new()),
        ("png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10".to_vec()),
        ("redis rdb", b"REDIS0011\xfa\x09redis-ver\x057.0.0".to_vec()),
        ("text", b"hello, world\n".repeat(100)),
    ] {
        std::fs::write(&p, &bytes).expect("write");
        match snapshot::read(&p) {
            Err(Error::Corrupt { detail, .. }) => {
                if bytes.len() >= 16 {
                    assert!(detail.contains("not a vramkv snapshot"), "{what}: {detail}");
                }
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    match snapshot::read(&dir.join("missing.vkv")) {
        Err(Error::Io { kind, .. }) => assert_eq!(kind, std::io::ErrorKind::NotFound),
        other => panic!("a missing file: {other:?}"),
    }
    let (t, cfg) = fixed_table(10);
    snapshot::save_table(&p, &t, &cfg).expect("save");
    let mut d = std::fs::read(&p).expect("read");
    d[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&p, &d).expect("write");
    match snapshot::read(&p) {
        Err(Error::NewerFormat {
            found, supported, ..
        }) => {
            assert_eq!((found, supported), (FORMAT_VERSION + 1, FORMAT_VERSION));
        }
        other => panic!("a newer version: {other:?}"),
    }
    let e = snapshot::read(&p).expect_err("newer");
    assert!(
        e.to_string().contains("newer than this vramkv reads"),
        "{e}"
    );
}

fn write_log(path: &Path, records: usize) -> Vec<u64> {
    let mut w = LogWriter::create(path, LogKind::Fixed(2), 0).expect("create");
    let mut ends = vec![w.bytes()];
    for i in 0..records as u64 {
        let keys = [i, i + 100];
        let vals = [i, i, i + 1, i + 1];
        let rec = if i % 3 == 2 {
            Record::Delete { keys: &keys[..1] }
        } else {
            Record::Put {
                keys: &keys,
                values: &vals,
            }
        };
        w.append(i, &rec).expect("append");
        ends.push(w.bytes());
    }
    w.sync().expect("sync");
    ends
}

#[test]
fn log_round_trip_torn_tails_and_damage() {
    let dir = scratch("log");
    let path = dir.join("a.vkl");
    let ends = write_log(&path, 20);
    let good = std::fs::read(&path).expect("read");
    assert_eq!(*ends.last().expect("end") as usize, good.len());
    let count = |p: &Path| {
        let mut n = 0;
        let r = log::replay(p, LogKind::Fixed(2), |_, _| {
            n += 1;
            Ok(())
        });
        r.map(|r| (n, r))
    };
    let (n, r) = count(&path).expect("replay");
    assert_eq!((n, r.records, r.torn), (20, 20, None));
    // A cut anywhere inside the last record is a torn tail: dropped and reported.
    let bad = dir.join("b.vkl");
    let last = ends[19] as usize;
    for cut in last + 1..good.len() {
        std::fs::write(&bad, &good[..cut]).expect("write");
        let (n, r) = count(&bad).expect("a torn tail still loads");
        assert_eq!(n, 19);
        assert_eq!(r.torn, Some((last as u64, (cut - last) as u64)));
        assert_eq!(r.valid_bytes, last as u64);
        // Appending after it first cuts the torn record off.
        let mut w = LogWriter::append_to(&bad, r.valid_bytes).expect("append_to");
        w.append(0, &Record::Clear).expect("append");
        let (n, r) = count(&bad).expect("replay");
        assert_eq!((n, r.torn), (20, None));
    }
    // A flipped bit in the last record's payload (or its checksum) with nothing after it
    // reads as torn; in its length, or in any earlier record, it is damage.
    let mut rng = SplitMix64(3);
    for _ in 0..200 {
        let mut d = good.clone();
        let at = 32 + rng.below((good.len() - 32) as u64) as usize;
        d[at] ^= 1 << rng.below(8);
        std::fs::write(&bad, &d).expect("write");
        match count(&bad) {
            Ok((n, r)) => {
                assert!(at >= last + 12, "damage at {at} read as a torn tail");
                assert_eq!((n, r.torn.map(|t| t.0)), (19, Some(last as u64)));
            }
            Err(Error::Corrupt { .. }) => assert!(at < last + 12, "the last payload at {at}"),
            Err(e) => panic!("flip at {at}: {e}"),
        }
    }
    // The wrong kind of table, and a foreign file.
    assert!(matches!(
        log::replay(&path, LogKind::Bytes, |_, _| Ok(())),
        Err(Error::InvalidConfig(_))
    ));
    std::fs::write(&bad, b"REDIS0011 and more bytes than a header has").expect("write");
    assert!(matches!(
        log::replay(&bad, LogKind::Fixed(2), |_, _| Ok(())),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn byte_records_round_trip_with_arrow_offsets() {
    let dir = scratch("bytelog");
    let path = dir.join("b.vkl");
    let mut w = LogWriter::create(&path, LogKind::Bytes, 4).expect("create");
    // Offsets that do not start at zero (a slice of an Arrow array) and i32 offsets.
    let data = b"xxhelloworld!";
    let offs = [2i32, 7, 12, 12];
    let keys = kv_core::Binary::new_i32(&offs, data).expect("binary");
    let vals = BinaryBuf::from_slices([b"1".as_slice(), b"", b"333"]);
    w.append(
        1,
        &Record::BytePut {
            keys,
            values: vals.as_binary(),
            expires: Some(&[0, 5, 6]),
        },
    )
    .expect("append");
    w.append(
        2,
        &Record::ByteExpire {
            keys,
            expires: &[1, 2, 3],
        },
    )
    .expect("append");
    w.append(3, &Record::ByteClear).expect("append");
    let mut seen = Vec::new();
    let mut times = Vec::new();
    let r = log::replay(&path, LogKind::Bytes, |time, rec| {
        times.push(time);
        seen.push(match rec {
            Record::BytePut {
                keys,
                values,
                expires,
            } => format!(
                "put {:?} {:?} {:?}",
                keys.iter().collect::<Vec<_>>(),
                values.iter().collect::<Vec<_>>(),
                expires
            ),
            Record::ByteExpire { keys, expires } => {
                format!("expire {} {:?}", keys.len(), expires)
            }
            other => format!("{other:?}"),
        });
        Ok(())
    })
    .expect("replay");
    assert_eq!(r.generation, 4);
    assert_eq!(times, [1, 2, 3]);
    assert_eq!(
        seen,
        [
            format!(
                "put {:?} {:?} {:?}",
                vec![&b"hello"[..], b"world", b""],
                vec![&b"1"[..], b"", b"333"],
                Some(&[0u64, 5, 6][..])
            ),
            "expire 3 [1, 2, 3]".to_string(),
            "ByteClear".to_string()
        ]
    );
}
