//! The server end to end, on a loopback port: a Redis client (the `redis` crate), raw
//! RESP for what clients do not send (inline commands, HELLO 3, garbage), random command
//! sequences over several connections against a model, and `redis-cli` where it is
//! installed (scripts/test-all installs it; `VRAMKV_REQUIRE_REDIS_TOOLS=1` makes its
//! absence a failure).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use kv_core::ByteConfig;
use kv_server::{ServeConfig, Server};
use proptest::prelude::*;
use redis::Value;

mod common;
use common::{client, q, q_err};

fn server_with(cfg: ServeConfig, bytes: ByteConfig) -> Server {
    let table = kv_backend_cpu::CpuBytes::open(bytes).expect("a byte table");
    Server::start(cfg, Arc::new(table), "cpu").expect("the server starts")
}

fn server() -> Server {
    server_with(
        ServeConfig::local(0),
        ByteConfig::new(1000).max_value_bytes(1 << 16),
    )
}

fn raw(s: &Server) -> TcpStream {
    let c = TcpStream::connect(s.local_addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c
}

/// Sends `req` and reads exactly `want.len()` bytes back, which must be `want`.
fn exchange(c: &mut TcpStream, req: &[u8], want: &[u8]) {
    c.write_all(req).expect("write");
    let mut got = vec![0u8; want.len()];
    c.read_exact(&mut got).expect("read the reply");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
}

#[test]
fn strings_through_a_redis_client() {
    let s = server();
    let mut c = client(&s);
    assert_eq!(q::<String>(&mut c, &["PING"]), "PONG");
    assert_eq!(q::<String>(&mut c, &["ECHO", "hi"]), "hi");
    assert_eq!(q::<String>(&mut c, &["SET", "k", "v"]), "OK");
    assert_eq!(
        q::<Option<String>>(&mut c, &["GET", "k"]).as_deref(),
        Some("v")
    );
    assert_eq!(q::<Option<String>>(&mut c, &["GET", "nope"]), None);
    assert_eq!(
        q::<String>(&mut c, &["MSET", "a", "1", "b", "", "a", "3"]),
        "OK"
    );
    assert_eq!(
        q::<Vec<Option<String>>>(&mut c, &["MGET", "a", "b", "zz"]),
        [Some("3".into()), Some(String::new()), None]
    );
    assert_eq!(q::<i64>(&mut c, &["EXISTS", "a", "a", "zz"]), 2);
    assert_eq!(q::<i64>(&mut c, &["DEL", "a", "a", "zz"]), 1);
    assert_eq!(q::<i64>(&mut c, &["INCR", "n"]), 1);
    assert_eq!(q::<i64>(&mut c, &["INCRBY", "n", "41"]), 42);
    assert_eq!(q::<i64>(&mut c, &["DECRBY", "n", "2"]), 40);
    assert_eq!(q::<i64>(&mut c, &["DECR", "n"]), 39);
    assert!(q_err(&mut c, &["INCR", "k"]).contains("not an integer"));
    assert_eq!(
        q::<String>(&mut c, &["SET", "big", "9223372036854775807"]),
        "OK"
    );
    assert!(q_err(&mut c, &["INCR", "big"]).contains("overflow"));
    assert_eq!(q::<i64>(&mut c, &["APPEND", "k", "w"]), 2);
    assert_eq!(q::<i64>(&mut c, &["STRLEN", "k"]), 2);
    assert_eq!(q::<i64>(&mut c, &["STRLEN", "zz"]), 0);
    assert_eq!(
        q::<Option<String>>(&mut c, &["GETDEL", "k"]).as_deref(),
        Some("vw")
    );
    assert_eq!(q::<Option<String>>(&mut c, &["GETDEL", "k"]), None);
    // SET's options.
    assert_eq!(
        q::<Option<String>>(&mut c, &["SET", "x", "1", "NX"]).as_deref(),
        Some("OK")
    );
    assert_eq!(q::<Option<String>>(&mut c, &["SET", "x", "2", "NX"]), None);
    assert_eq!(q::<Option<String>>(&mut c, &["SET", "y", "2", "XX"]), None);
    assert_eq!(
        q::<Option<String>>(&mut c, &["SET", "x", "3", "XX", "GET"]).as_deref(),
        Some("1")
    );
    assert_eq!(
        q::<Option<String>>(&mut c, &["GET", "x"]).as_deref(),
        Some("3")
    );
    assert!(q_err(&mut c, &["SET", "x", "1", "NX", "XX"]).contains("syntax"));
    // Expiry.
    assert_eq!(q::<String>(&mut c, &["SET", "t", "v", "EX", "100"]), "OK");
    assert_eq!(q::<i64>(&mut c, &["TTL", "t"]), 100);
    assert!((99_000..=100_000).contains(&q::<i64>(&mut c, &["PTTL", "t"])));
    assert_eq!(q::<i64>(&mut c, &["INCR", "n"]), 40);
    assert_eq!(q::<i64>(&mut c, &["TTL", "n"]), -1);
    assert_eq!(q::<i64>(&mut c, &["TTL", "zz"]), -2);
    assert_eq!(q::<i64>(&mut c, &["PERSIST", "t"]), 1);
    assert_eq!(q::<i64>(&mut c, &["PERSIST", "t"]), 0);
    assert_eq!(q::<i64>(&mut c, &["EXPIRE", "t", "50"]), 1);
    assert_eq!(q::<i64>(&mut c, &["APPEND", "t", "!"]), 2);
    assert_eq!(
        q::<i64>(&mut c, &["TTL", "t"]),
        50,
        "APPEND keeps the time to live"
    );
    assert_eq!(q::<i64>(&mut c, &["PEXPIRE", "t", "1"]), 1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(q::<Option<String>>(&mut c, &["GET", "t"]), None);
    assert_eq!(
        q::<i64>(&mut c, &["EXPIRE", "x", "0"]),
        1,
        "a time to live of 0 deletes"
    );
    assert_eq!(q::<i64>(&mut c, &["EXPIRE", "x", "10"]), 0);
    // The keyspace.
    assert_eq!(q::<i64>(&mut c, &["DBSIZE"]), 3, "b, n, big");
    assert_eq!(q::<String>(&mut c, &["FLUSHDB"]), "OK");
    assert_eq!(q::<i64>(&mut c, &["DBSIZE"]), 0);
    // Connection commands.
    assert_eq!(q::<String>(&mut c, &["SELECT", "0"]), "OK");
    assert!(q_err(&mut c, &["SELECT", "1"]).contains("out of range"));
    assert_eq!(q::<String>(&mut c, &["CLIENT", "SETNAME", "me"]), "OK");
    assert_eq!(q::<String>(&mut c, &["CLIENT", "GETNAME"]), "me");
    assert!(q::<i64>(&mut c, &["CLIENT", "ID"]) > 0);
    let cfg: Vec<String> = q(&mut c, &["CONFIG", "GET", "save"]);
    assert_eq!(cfg, ["save", ""]);
    let info: String = q(&mut c, &["INFO"]);
    assert!(
        info.contains("redis_version:")
            && info.contains("# Vramkv")
            && info.contains("backend:cpu")
    );
    assert!(q_err(&mut c, &["NOSUCH", "a"]).contains("unknown command"));
    assert!(q_err(&mut c, &["GET"]).contains("wrong number of arguments"));
}

#[test]
fn bad_keys_and_values_are_refused_alone() {
    let s = server();
    let mut c = client(&s);
    let long_key = "k".repeat(600);
    assert!(q_err(&mut c, &["SET", &long_key, "v"]).contains("not supported"));
    assert!(q_err(&mut c, &["GET", ""]).contains("not supported"));
    let big = "v".repeat((1 << 16) + 1);
    assert!(q_err(&mut c, &["SET", "k", &big]).contains("maximum allowed size"));
    // In one pipeline, the bad command fails and the others apply.
    let mut p = redis::pipe();
    p.cmd("SET").arg("a").arg("1");
    p.cmd("SET").arg(&long_key).arg("2");
    p.cmd("GET").arg("a");
    let r: redis::RedisResult<Vec<Value>> = p.query(&mut c);
    assert!(r.is_err(), "the pipeline reports the failed command: {r:?}");
    assert_eq!(
        q::<Option<String>>(&mut c, &["GET", "a"]).as_deref(),
        Some("1")
    );
}

#[test]
fn a_pipeline_sees_its_own_writes_in_order() {
    for direct_reads in [true, false] {
        let s = server_with(
            ServeConfig {
                direct_reads,
                ..ServeConfig::local(0)
            },
            ByteConfig::new(1000),
        );
        pipeline_in_order(&s);
    }
}

fn pipeline_in_order(s: &Server) {
    let mut c = client(s);
    let mut p = redis::pipe();
    for i in 0..500 {
        p.cmd("SET")
            .arg("k")
            .arg(i)
            .cmd("GET")
            .arg("k")
            .cmd("INCR")
            .arg("k");
    }
    let r: Vec<Value> = p.query(&mut c).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..500 {
        assert_eq!(r[3 * i + 1], Value::BulkString(i.to_string().into_bytes()));
        assert_eq!(r[3 * i + 2], Value::Int(i as i64 + 1));
    }
    // Reads alone after the writes (the path direct reads take) see them.
    let mut p = redis::pipe();
    p.cmd("GET")
        .arg("k")
        .cmd("EXISTS")
        .arg("k")
        .arg("nope")
        .cmd("STRLEN")
        .arg("k");
    let r: (String, i64, i64) = p.query(&mut c).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r, ("500".to_string(), 1, 3));
}

#[test]
fn many_connections_each_see_their_own_order() {
    let s = server();
    let addr = s.local_addr();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let url = format!("redis://{addr}/");
                let mut c = redis::Client::open(url)
                    .and_then(|c| c.get_connection())
                    .expect("connect");
                for round in 0..50 {
                    let key = format!("conn{t}");
                    let mut p = redis::pipe();
                    p.cmd("SET").arg(&key).arg(round).cmd("GET").arg(&key);
                    p.cmd("INCR").arg("shared");
                    let r: (String, String, i64) = p.query(&mut c).expect("pipeline");
                    assert_eq!(r.1, round.to_string());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a connection thread");
    }
    let mut c = client(&s);
    assert_eq!(
        q::<i64>(&mut c, &["GET", "shared"]),
        400,
        "every INCR applied once"
    );
}

#[test]
fn inline_commands_hello_3_and_auth() {
    let s = server_with(
        ServeConfig {
            requirepass: Some("sesame".into()),
            ..ServeConfig::local(0)
        },
        ByteConfig::new(100),
    );
    let mut c = raw(&s);
    exchange(&mut c, b"PING\r\n", b"-NOAUTH Authentication required.\r\n");
    exchange(
        &mut c,
        b"GET k\r\n",
        b"-NOAUTH Authentication required.\r\n",
    );
    exchange(
        &mut c,
        b"AUTH nope\r\n",
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
    );
    exchange(
        &mut c,
        b"AUTH sesame\r\nPING\r\nSET k v\r\n",
        b"+OK\r\n+PONG\r\n+OK\r\n",
    );
    // HELLO 3 answers a map, and later nulls are RESP3's.
    c.write_all(b"HELLO 3\r\n").expect("write");
    let mut head = [0u8; 4];
    c.read_exact(&mut head).expect("read");
    assert_eq!(&head, b"%7\r\n");
    std::thread::sleep(Duration::from_millis(50));
    let mut rest = vec![0u8; 4096];
    let _ = c.read(&mut rest).expect("the rest of the map");
    exchange(&mut c, b"GET nope\r\nGET k\r\n", b"_\r\n$1\r\nv\r\n");
    exchange(&mut c, b"HELLO 2\r\n", b"*14\r\n");
}

#[test]
fn garbage_is_answered_and_the_server_lives_on() {
    let s = server();
    let cases: &[&[u8]] = &[
        b"*1\r\n*1\r\n$4\r\nPING\r\n",
        b"*-5\r\n*2\r\n$x\r\n",
        b"*2\r\n$3\r\nGET\r\n$-7\r\n",
        b"*99999999999\r\n",
        b"*1\r\n$3\r\nPINGPONG\r\n",
        b"*2\r\n$3\r\nGET\r\n$999999999\r\n",
        b"\x00\x01\x02\xff\r\n",
        b"*1\r\n$4\r\nPI",
    ];
    for case in cases {
        let mut c = raw(&s);
        c.write_all(case).expect("write");
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
    }
    // A deep nesting attempt is refused at its second level.
    let mut c = raw(&s);
    let deep = b"*1\r\n".repeat(200_000);
    let _ = c.write_all(&deep);
    let mut out = [0u8; 64];
    let n = c.read(&mut out).unwrap_or(0);
    assert!(String::from_utf8_lossy(&out[..n]).starts_with("-ERR Protocol error"));
    let mut c = client(&s);
    assert_eq!(q::<String>(&mut c, &["PING"]), "PONG");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(32, |n: u32| (n / 20).max(8)),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random commands on three connections, issued one at a time in a random
    /// interleaving, each reply checked against a map.
    #[test]
    fn random_commands_match_a_model(
        ops in prop::collection::vec((0usize..3, 0u8..6, 0u8..6, 0u8..4), 1..80)
    ) {
        let s = server();
        let mut conns: Vec<_> = (0..3).map(|_| client(&s)).collect();
        let mut model: HashMap<String, String> = HashMap::new();
        for (conn, op, k, v) in ops {
            let c = &mut conns[conn];
            let key = format!("k{k}");
            let val = format!("{v}");
            match op {
                0 => {
                    prop_assert_eq!(q::<String>(c, &["SET", &key, &val]), "OK");
                    model.insert(key, val);
                }
                1 => prop_assert_eq!(
                    q::<Option<String>>(c, &["GET", &key]),
                    model.get(&key).cloned()
                ),
                2 => {
                    let n = q::<i64>(c, &["DEL", &key]);
                    prop_assert_eq!(n, model.remove(&key).is_some() as i64);
                }
                3 => {
                    let got = q::<i64>(c, &["EXISTS", &key, &key]);
                    prop_assert_eq!(got, 2 * model.contains_key(&key) as i64);
                }
                4 => match model.get(&key).map(|x| x.parse::<i64>()) {
                    Some(Err(_)) => {
                        prop_assert!(q_err(c, &["INCR", &key]).contains("not an integer"));
                    }
                    cur => {
                        let want = cur.map_or(0, |x| x.unwrap_or(0)) + 1;
                        prop_assert_eq!(q::<i64>(c, &["INCR", &key]), want);
                        model.insert(key, want.to_string());
                    }
                },
                _ => {
                    let len = q::<i64>(c, &["APPEND", &key, &val]);
                    let e = model.entry(key).or_default();
                    e.push_str(&val);
                    prop_assert_eq!(len, e.len() as i64);
                }
            }
        }
        prop_assert_eq!(q::<i64>(&mut conns[0], &["DBSIZE"]), model.len() as i64);
    }
}

/// `redis-cli` against the server, where Debian's redis-tools is installed.
#[test]
fn redis_cli_works() {
    let have = std::process::Command::new("redis-cli")
        .arg("--version")
        .output()
        .is_ok();
    if !have {
        if std::env::var("VRAMKV_REQUIRE_REDIS_TOOLS").is_ok_and(|v| v == "1") {
            panic!("VRAMKV_REQUIRE_REDIS_TOOLS=1 but redis-cli is not installed");
        }
        println!("skipped: redis-cli is not installed (apt-get install redis-tools)");
        return;
    }
    let s = server();
    let port = s.local_addr().port().to_string();
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["PING"]), "PONG");
    assert_eq!(cli(&["SET", "greeting", "hello world"]), "OK");
    assert_eq!(cli(&["GET", "greeting"]), "hello world");
    assert_eq!(cli(&["INCRBY", "c", "5"]), "5");
    assert_eq!(cli(&["DBSIZE"]), "2");
    assert!(cli(&["INFO", "keyspace"]).contains("db0:keys=2"));
}
