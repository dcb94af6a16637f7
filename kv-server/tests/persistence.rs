//! Persistence end to end: `SAVE`, `BGSAVE`, `LASTSAVE` and `BGREWRITEAOF` through a Redis
//! client and raw RESP, then a restart of the server on the same directory: from the dump
//! file, or from the append-only directory (docs/server.md, "Persistence").

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{ByteConfig, ByteTable, ManualClock};
use kv_server::{Fsync, Loaded, Persistence, ServeConfig, Server, Store};

mod common;
use common::{client, q, q_err};

fn cpu(cfg: ByteConfig) -> kv_core::Result<Box<dyn ByteTable>> {
    Ok(Box::new(kv_backend_cpu::CpuBytes::open(cfg)?))
}

/// A directory of its own for one test, removed at its end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("vramkv-persist-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("a test directory");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(dir: &Path, appendonly: bool, fsync: Fsync) -> Persistence {
    Persistence {
        dir: dir.to_path_buf(),
        appendonly,
        appendfsync: fsync,
        ..Persistence::default()
    }
}

fn bytes() -> ByteConfig {
    ByteConfig::new(1000).max_value_bytes(1 << 16)
}

/// Opens the store as `vramkv serve` does and serves it.
fn start(p: &Persistence, cfg: ByteConfig) -> (Server, Loaded) {
    let (store, loaded) = Store::open(p, cfg, &cpu).unwrap_or_else(|e| panic!("open: {e}"));
    let config = ServeConfig {
        persistence: p.clone(),
        ..ServeConfig::local(0)
    };
    let server = Server::start_store(config, store, "cpu").expect("the server starts");
    (server, loaded)
}

/// One field of `INFO persistence`.
fn info(c: &mut redis::Connection, field: &str) -> String {
    let text: String = q(c, &["INFO", "persistence"]);
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("INFO persistence has no {field}: {text}"))
        .to_string()
}

/// Waits until `INFO persistence` reports `field` as `want`.
fn wait_for(c: &mut redis::Connection, field: &str, want: &str) {
    let t0 = Instant::now();
    while info(c, field) != want {
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "{field} never became {want}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Each key's value and PTTL.
fn state(c: &mut redis::Connection, keys: &[&str]) -> Vec<(Option<Vec<u8>>, i64)> {
    keys.iter()
        .map(|k| (q(c, &["GET", k]), q(c, &["PTTL", k])))
        .collect()
}

fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[test]
fn save_then_restart_from_the_dump_file() {
    let dir = Dir::new("save");
    let p = settings(&dir.0, false, Fsync::EverySec);
    let keys = ["a", "b", "t", "big", "m1", "m2", "n", "gone", "late"];
    let before = {
        let (s, loaded) = start(&p, bytes());
        assert!(matches!(loaded, Loaded::Empty { .. }), "{loaded:?}");
        let mut c = client(&s);
        assert_eq!(q::<String>(&mut c, &["SET", "a", "1"]), "OK");
        assert_eq!(q::<String>(&mut c, &["SET", "b", ""]), "OK");
        assert_eq!(q::<String>(&mut c, &["SET", "t", "v", "EX", "100"]), "OK");
        let big = "x".repeat(60_000);
        assert_eq!(q::<String>(&mut c, &["SET", "big", &big]), "OK");
        assert_eq!(q::<String>(&mut c, &["MSET", "m1", "1", "m2", "2"]), "OK");
        assert_eq!(q::<i64>(&mut c, &["INCRBY", "n", "7"]), 7);
        assert_eq!(
            q::<String>(&mut c, &["SET", "gone", "v", "PX", "400"]),
            "OK"
        );
        assert_eq!(info(&mut c, "rdb_changes_since_last_save"), "8");
        assert_eq!(q::<String>(&mut c, &["SAVE"]), "OK");
        assert_eq!(info(&mut c, "rdb_changes_since_last_save"), "0");
        let st = state(&mut c, &keys);
        // Written after the save: not in the dump file.
        assert_eq!(q::<String>(&mut c, &["SET", "late", "1"]), "OK");
        assert_eq!(info(&mut c, "rdb_changes_since_last_save"), "1");
        st
    };
    std::thread::sleep(Duration::from_millis(500));
    let (s, loaded) = start(&p, bytes());
    match &loaded {
        Loaded::Dump {
            path,
            keys,
            expired,
            ..
        } => {
            assert_eq!(path, &p.dump_path());
            assert_eq!((*keys, *expired), (7, 1), "`gone` expired since the save");
        }
        other => panic!("{other:?}"),
    }
    assert!(loaded.messages()[0].contains("loaded 7 keys"));
    let mut c = client(&s);
    let after = state(&mut c, &keys);
    for ((k, (v0, t0)), (v1, t1)) in keys.iter().zip(&before).zip(&after) {
        match *k {
            "gone" | "late" => assert_eq!((v1, *t1), (&None, -2), "{k}"),
            _ => {
                assert_eq!(v0, v1, "{k}");
                if *t0 < 0 {
                    assert_eq!(t0, t1, "{k}");
                } else {
                    assert!(*t1 <= *t0 && *t1 > *t0 - 5000, "{k}: {t0} then {t1}");
                }
            }
        }
    }
    assert_eq!(q::<i64>(&mut c, &["DBSIZE"]), 7);
}

#[test]
fn bgsave_and_lastsave() {
    let dir = Dir::new("bgsave");
    let p = settings(&dir.0, false, Fsync::EverySec);
    let t0 = unix_secs();
    let (s, _) = start(&p, ByteConfig::new(10_000).max_value_bytes(1 << 16));
    let mut c = client(&s);
    let started: i64 = q(&mut c, &["LASTSAVE"]);
    assert!(
        (t0..=t0 + 2).contains(&started),
        "LASTSAVE at start is the start time"
    );
    assert_eq!(info(&mut c, "rdb_last_save_time"), started.to_string());
    // Enough data (16 MB) that the background save is still writing when the next
    // commands of the pipeline arrive.
    let value = "v".repeat(4096);
    for chunk in 0..8 {
        let mut cmd = redis::cmd("MSET");
        for i in 0..500 {
            cmd.arg(format!("k{chunk}:{i}")).arg(&value);
        }
        let _: String = cmd.query(&mut c).expect("MSET");
    }
    assert_eq!(info(&mut c, "rdb_changes_since_last_save"), "4000");
    let mut raw = TcpStream::connect(s.local_addr()).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    raw.write_all(b"BGSAVE\r\nBGSAVE\r\nSAVE\r\n")
        .expect("write");
    let want: &[u8] = b"+Background saving started\r\n\
        -ERR Background save already in progress\r\n\
        -ERR Background save already in progress\r\n";
    let mut got = vec![0u8; want.len()];
    raw.read_exact(&mut got).expect("the replies");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    wait_for(&mut c, "rdb_bgsave_in_progress", "0");
    assert_eq!(info(&mut c, "rdb_last_bgsave_status"), "ok");
    assert_eq!(info(&mut c, "rdb_changes_since_last_save"), "0");
    assert!(q::<i64>(&mut c, &["LASTSAVE"]) >= started);
    let snap = kv_durable::snapshot::read(&p.dump_path()).expect("the dump file reads");
    assert_eq!(snap.header.entries, 4000);
    assert_eq!(
        q::<String>(&mut c, &["BGSAVE", "SCHEDULE"]),
        "Background saving started"
    );
    assert!(q_err(&mut c, &["BGSAVE", "NOW"]).contains("syntax error"));
    assert!(q_err(&mut c, &["LASTSAVE", "x"]).contains("wrong number of arguments"));
}

#[test]
fn a_failed_save_answers_an_error_and_keeps_the_old_file() {
    let dir = Dir::new("failed");
    let p = settings(&dir.0, false, Fsync::EverySec);
    let (s, _) = start(&p, bytes());
    let mut c = client(&s);
    assert_eq!(q::<String>(&mut c, &["SET", "a", "1"]), "OK");
    assert_eq!(q::<String>(&mut c, &["SAVE"]), "OK");
    // A directory where the temporary file goes: every later save fails to create it.
    std::fs::create_dir(dir.0.join("dump.vkv.tmp")).expect("a directory");
    assert_eq!(q::<String>(&mut c, &["SET", "b", "2"]), "OK");
    let e = q_err(&mut c, &["SAVE"]);
    assert!(e.contains("dump.vkv.tmp"), "the reason is named: {e}");
    assert_eq!(
        q::<String>(&mut c, &["BGSAVE"]),
        "Background saving started"
    );
    wait_for(&mut c, "rdb_bgsave_in_progress", "0");
    assert_eq!(info(&mut c, "rdb_last_bgsave_status"), "err");
    assert_eq!(info(&mut c, "rdb_changes_since_last_save"), "1");
    let snap = kv_durable::snapshot::read(&p.dump_path()).expect("the old dump file reads");
    assert_eq!(snap.header.entries, 1, "the old file, intact");
}

/// Every kind of write, logged under `fsync`, then a restart on the same directory.
fn appendonly_round_trip(fsync: Fsync) {
    let dir = Dir::new(&format!("aof-{fsync:?}"));
    let p = settings(&dir.0, true, fsync);
    // A clock that stands still, so that times to live come back to the millisecond.
    let clock = Arc::new(ManualClock::new(1_000_000));
    let cfg = || bytes().clock(clock.clone());
    let keys = [
        "old", "old2", "a", "b", "c", "d", "m1", "m2", "m3", "n", "gd", "e", "nx",
    ];
    let before = {
        let (s, loaded) = start(&p, cfg());
        assert!(
            matches!(&loaded, Loaded::Log { report, .. } if report.created),
            "{loaded:?}"
        );
        let mut c = client(&s);
        assert_eq!(info(&mut c, "aof_enabled"), "1");
        let ok = |c: &mut redis::Connection, args: &[&str]| {
            assert_eq!(q::<String>(c, args), "OK", "{args:?}");
        };
        ok(&mut c, &["SET", "old", "1"]);
        ok(&mut c, &["SET", "old2", "2", "EX", "100"]);
        ok(&mut c, &["FLUSHALL"]);
        ok(&mut c, &["SET", "a", "1"]);
        ok(&mut c, &["SET", "b", "hello", "EX", "100"]);
        ok(&mut c, &["SET", "c", "x", "PX", "50000"]);
        ok(&mut c, &["SET", "d", "y", "EX", "70"]);
        ok(&mut c, &["MSET", "m1", "1", "m2", "2", "m3", "3"]);
        assert_eq!(
            q::<String>(&mut c, &["BGREWRITEAOF"]),
            "Background append only file rewriting started"
        );
        assert_eq!(q::<i64>(&mut c, &["DEL", "m2", "zz"]), 1);
        assert_eq!(q::<i64>(&mut c, &["EXPIRE", "a", "300"]), 1);
        assert_eq!(q::<i64>(&mut c, &["PERSIST", "c"]), 1);
        assert_eq!(q::<i64>(&mut c, &["INCR", "n"]), 1);
        assert_eq!(q::<i64>(&mut c, &["INCRBY", "n", "41"]), 42);
        assert_eq!(q::<i64>(&mut c, &["APPEND", "b", " world"]), 11);
        ok(&mut c, &["SET", "gd", "v"]);
        assert_eq!(
            q::<Option<String>>(&mut c, &["GETDEL", "gd"]).as_deref(),
            Some("v")
        );
        ok(&mut c, &["SET", "e", "v"]);
        assert_eq!(q::<i64>(&mut c, &["EXPIRE", "e", "0"]), 1);
        ok(&mut c, &["SET", "nx", "1", "NX"]);
        assert_eq!(q::<Option<String>>(&mut c, &["SET", "nx", "2", "NX"]), None);
        assert_eq!(q::<i64>(&mut c, &["PEXPIRE", "d", "1234"]), 1);
        wait_for(&mut c, "aof_rewrite_in_progress", "0");
        assert_eq!(info(&mut c, "aof_last_bgrewrite_status"), "ok");
        assert_eq!(info(&mut c, "aof_last_write_status"), "ok");
        state(&mut c, &keys)
    };
    assert_eq!(before[0], (None, -2), "FLUSHALL replays");
    assert_eq!(before[3], (Some(b"hello world".to_vec()), 100_000));
    let (s, loaded) = start(&p, cfg());
    match &loaded {
        Loaded::Log { report, keys, .. } => {
            assert!(!report.created && report.torn.is_none(), "{report:?}");
            assert_eq!(*keys, 8, "a, b, c, d, m1, m3, n, nx");
        }
        other => panic!("{other:?}"),
    }
    let mut c = client(&s);
    assert_eq!(
        state(&mut c, &keys),
        before,
        "{fsync:?}: every key, exactly"
    );
    assert_eq!(q::<i64>(&mut c, &["DBSIZE"]), 8);
}

#[test]
fn appendonly_restores_every_write_exactly() {
    for fsync in [Fsync::Always, Fsync::EverySec, Fsync::No] {
        appendonly_round_trip(fsync);
    }
}

#[test]
fn appendonly_reports_a_torn_record_and_starts_from_the_dump_file() {
    let dir = Dir::new("torn");
    // A dump file, then the log turned on for the first time: the new log starts from the
    // dump's keys, so turning it on loses nothing.
    {
        let (s, _) = start(&settings(&dir.0, false, Fsync::No), bytes());
        let mut c = client(&s);
        assert_eq!(q::<String>(&mut c, &["SET", "dumped", "1"]), "OK");
        assert_eq!(q::<String>(&mut c, &["SAVE"]), "OK");
    }
    let p = settings(&dir.0, true, Fsync::Always);
    {
        let (s, loaded) = start(&p, bytes());
        match &loaded {
            Loaded::Log {
                from_dump: Some(d),
                keys: 1,
                ..
            } => assert_eq!(d, &p.dump_path()),
            other => panic!("{other:?}"),
        }
        assert!(
            loaded
                .messages()
                .iter()
                .any(|m| m.contains("from the dump file"))
        );
        let mut c = client(&s);
        assert_eq!(
            q::<Option<String>>(&mut c, &["GET", "dumped"]).as_deref(),
            Some("1")
        );
        assert_eq!(q::<String>(&mut c, &["SET", "k", "v"]), "OK");
    }
    // Half a record at the end of the log, as a crash in the middle of an append leaves.
    let log = std::fs::read_dir(p.aof_dir())
        .expect("the append-only directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "vkl"))
        .max()
        .expect("a log");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("the log opens");
    f.write_all(&[7, 0, 0, 0, 0]).expect("append");
    drop(f);
    let (s, loaded) = start(&p, bytes());
    match &loaded {
        Loaded::Log { report, keys, .. } => {
            assert_eq!(report.torn.as_ref().map(|t| t.2), Some(5));
            assert_eq!(*keys, 2, "the dump's key and the one set since");
        }
        other => panic!("{other:?}"),
    }
    assert!(loaded.messages().iter().any(|m| m.contains("torn")));
    let mut c = client(&s);
    assert_eq!(
        q::<Option<String>>(&mut c, &["GET", "k"]).as_deref(),
        Some("v")
    );
}

#[test]
fn a_damaged_dump_file_stops_the_start() {
    let dir = Dir::new("damaged");
    let p = settings(&dir.0, false, Fsync::EverySec);
    {
        let (s, _) = start(&p, bytes());
        let mut c = client(&s);
        for i in 0..50 {
            let k = format!("k{i}");
            assert_eq!(q::<String>(&mut c, &["SET", &k, "some value"]), "OK");
        }
        assert_eq!(q::<String>(&mut c, &["SAVE"]), "OK");
    }
    let path = p.dump_path();
    let good = std::fs::read(&path).expect("the dump file");
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let cases: [(&str, &[u8]); 3] = [
        ("checksum", &flipped),
        ("truncated", &good[..good.len() - 10]),
        ("not a vramkv snapshot", b"REDIS0011 is not ours"),
    ];
    for (what, data) in cases {
        std::fs::write(&path, data).expect("write");
        let e = match Store::open(&p, bytes(), &cpu) {
            Err(e) => e.to_string(),
            Ok((_, loaded)) => panic!("{what}: loaded {loaded:?}"),
        };
        assert!(
            e.contains(&path.display().to_string())
                && e.contains(what)
                && e.contains("does not start"),
            "{e}"
        );
    }
}

#[test]
fn config_get_info_and_command_count() {
    let dir = Dir::new("config");
    let p = Persistence {
        dbfilename: "my.vkv".into(),
        appendfsync: Fsync::Always,
        appenddirname: "logs".into(),
        ..settings(&dir.0, false, Fsync::EverySec)
    };
    let (s, _) = start(&p, bytes());
    let mut c = client(&s);
    let get = |c: &mut redis::Connection, k: &str| -> Vec<String> { q(c, &["CONFIG", "GET", k]) };
    let abs = std::fs::canonicalize(&dir.0).expect("canonical");
    assert_eq!(get(&mut c, "dir"), ["dir", &abs.display().to_string()]);
    assert_eq!(get(&mut c, "dbfilename"), ["dbfilename", "my.vkv"]);
    assert_eq!(get(&mut c, "appendonly"), ["appendonly", "no"]);
    assert_eq!(get(&mut c, "appendfsync"), ["appendfsync", "always"]);
    assert_eq!(get(&mut c, "appenddirname"), ["appenddirname", "logs"]);
    assert_eq!(get(&mut c, "append*").len(), 6);
    assert!(q_err(&mut c, &["BGREWRITEAOF"]).contains("append-only log is off"));
    let all: String = q(&mut c, &["INFO"]);
    let persistence: String = q(&mut c, &["INFO", "persistence"]);
    for field in [
        "loading:0",
        "rdb_changes_since_last_save:0",
        "rdb_bgsave_in_progress:0",
        "rdb_last_save_time:",
        "rdb_last_bgsave_status:ok",
        "aof_enabled:0",
        "aof_rewrite_in_progress:0",
        "aof_last_write_status:ok",
    ] {
        assert!(
            all.contains(field) && persistence.contains(field),
            "{field}"
        );
    }
    assert!(persistence.starts_with("# Persistence\r\n") && !persistence.contains("# Stats"));
    assert_eq!(
        q::<i64>(&mut c, &["COMMAND", "COUNT"]),
        kv_server::COMMANDS.len() as i64
    );
    drop(s);
    // The log on: CONFIG GET says so.
    let p = Persistence {
        appendonly: true,
        ..p
    };
    let (s, _) = start(&p, bytes());
    let mut c = client(&s);
    assert_eq!(get(&mut c, "appendonly"), ["appendonly", "yes"]);
    assert_eq!(info(&mut c, "aof_enabled"), "1");
    assert!(p.aof_dir().is_dir());
}

#[test]
fn bad_settings_are_refused() {
    let dir = Dir::new("bad");
    let bad = [
        Persistence {
            dir: dir.0.join("missing"),
            ..Persistence::default()
        },
        Persistence {
            dbfilename: "sub/dump.vkv".into(),
            ..settings(&dir.0, false, Fsync::No)
        },
        Persistence {
            appenddirname: String::new(),
            ..settings(&dir.0, true, Fsync::No)
        },
    ];
    for p in bad {
        assert!(Store::open(&p, bytes(), &cpu).is_err(), "{p:?}");
    }
    assert!("sometimes".parse::<Fsync>().is_err());
}
