//! What the server's integration tests share: a Redis client on a test server, and
//! commands sent through it.

use kv_server::Server;
use redis::Value;

/// A connection of the `redis` crate's client to `s`.
pub fn client(s: &Server) -> redis::Connection {
    redis::Client::open(format!("redis://{}/", s.local_addr()))
        .and_then(|c| c.get_connection())
        .expect("a connection")
}

/// Sends the command `args` on `c` and returns its reply as a `T`; panics on an error.
pub fn q<T: redis::FromRedisValue>(c: &mut redis::Connection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Sends the command `args` on `c`, which must answer an error, and returns its text.
pub fn q_err(c: &mut redis::Connection, args: &[&str]) -> String {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query::<Value>(c) {
        Err(e) => e.to_string(),
        Ok(v) => panic!("{args:?} answered {v:?}, not an error"),
    }
}
