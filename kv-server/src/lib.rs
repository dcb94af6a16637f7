//! `vramkv serve`: a Redis-protocol server over a byte table (docs/server.md).
//!
//! Connections run on a tokio runtime; one executor thread owns the table and runs the
//! commands of every connection in batches ([`exec`] states the order it keeps). Requests
//! are framed by [`request`] (RESP arrays of bulk strings, and inline commands), replies
//! encoded by `redis-protocol` in RESP2, or RESP3 after `HELLO 3`. The table is kept on
//! disk as [`persist`] says: a dump file (`SAVE`, `BGSAVE`), or a log of every write
//! (`appendonly yes`).
//!
//! ```
//! use std::sync::Arc;
//! use kv_server::{ServeConfig, Server};
//! let table = kv_backend_cpu::CpuBytes::open(kv_core::ByteConfig::new(1000))?;
//! let server = Server::start(ServeConfig::local(0), Arc::new(table), "cpu")?;
//! let addr = server.local_addr();
//! let mut conn = std::net::TcpStream::connect(addr)?;
//! use std::io::{Read, Write};
//! conn.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\nGET k\r\n")?;
//! let mut buf = [0u8; 12];
//! conn.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"+OK\r\n$1\r\nv\r\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod command;
mod conn;
pub mod exec;
pub mod persist;
pub mod reply;
pub mod request;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use kv_core::{ByteConfig, ByteTable};
/// The fsync policies of the append-only log (`appendfsync`).
pub use kv_durable::Fsync;

use crate::exec::{Executor, Job, Stats};
use crate::persist::Persist;
pub use crate::persist::{Loaded, Persistence, Store};

/// The Redis version the server reports (`INFO server`, `HELLO`): the command set it
/// follows.
pub const REDIS_VERSION: &str = "7.0.0";

/// The commands the server knows (`COMMAND COUNT`, docs/server.md).
pub const COMMANDS: &[&str] = &[
    "PING",
    "ECHO",
    "QUIT",
    "SELECT",
    "HELLO",
    "AUTH",
    "CLIENT",
    "COMMAND",
    "CONFIG",
    "INFO",
    "GET",
    "SET",
    "MGET",
    "MSET",
    "DEL",
    "EXISTS",
    "EXPIRE",
    "PEXPIRE",
    "TTL",
    "PTTL",
    "PERSIST",
    "INCR",
    "INCRBY",
    "DECR",
    "DECRBY",
    "APPEND",
    "STRLEN",
    "GETDEL",
    "DBSIZE",
    "FLUSHDB",
    "FLUSHALL",
    "SAVE",
    "BGSAVE",
    "LASTSAVE",
    "BGREWRITEAOF",
];

/// How the server listens and limits its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// The address to bind (`127.0.0.1` by default).
    pub bind: String,
    /// The port (`6379` by default; 0 picks a free one).
    pub port: u16,
    /// The password clients must give with `AUTH` (none by default).
    pub requirepass: Option<String>,
    /// The most table commands one executor round takes.
    pub max_batch: usize,
    /// Runtime worker threads (`None`: one per core).
    pub workers: Option<usize>,
    /// The longest argument a request may carry, in bytes: the table's value limit.
    pub max_value_bytes: usize,
    /// `maxmemory`, as configured (reported by `CONFIG GET maxmemory`).
    pub maxmemory: u64,
    /// Whether a connection runs a pipeline of reads only (`GET`, `MGET`, `EXISTS`, `TTL`,
    /// `PTTL`, `STRLEN`, `DBSIZE`) itself, on its own thread, instead of handing it to the
    /// executor. Right for tables whose small batches are cheap (the CPU backend): reads of
    /// many connections then run on every core. A GPU table wants few large batches and
    /// leaves it off. Either way the order guarantee holds (docs/server.md).
    pub direct_reads: bool,
    /// Where `SAVE` and `BGSAVE` write, and what `CONFIG GET` reports of persistence. The
    /// table itself is opened from disk by [`Store::open`] with the same settings.
    pub persistence: Persistence,
}

impl ServeConfig {
    /// Loopback on `port`, no password, the default limits.
    pub fn local(port: u16) -> Self {
        ServeConfig {
            bind: "127.0.0.1".into(),
            port,
            requirepass: None,
            max_batch: 1 << 20,
            workers: None,
            max_value_bytes: kv_core::DEFAULT_MAX_VALUE_BYTES as usize,
            maxmemory: 0,
            direct_reads: true,
            persistence: Persistence::default(),
        }
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) config: ServeConfig,
    pub(crate) stats: Arc<Stats>,
    pub(crate) jobs: mpsc::Sender<Job>,
    pub(crate) exec: Arc<Executor>,
    pub(crate) next_client: AtomicU64,
    persist: Arc<Persist>,
    table: Arc<dyn ByteTable>,
    backend: String,
    started: Instant,
    port: u16,
}

impl Shared {
    /// The parameters `CONFIG GET` answers.
    pub(crate) fn config_pairs(&self) -> Vec<(&'static str, String)> {
        let p = &self.persist.settings;
        // Redis answers the directory it changed into: an absolute path.
        let dir = std::fs::canonicalize(&p.dir).unwrap_or_else(|_| p.dir.clone());
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        vec![
            ("bind", self.config.bind.clone()),
            ("port", self.port.to_string()),
            ("save", String::new()),
            ("dir", dir.display().to_string()),
            ("dbfilename", p.dbfilename.clone()),
            ("appendonly", yes_no(self.persist.aof())),
            (
                "appendfsync",
                persist::fsync_name(p.appendfsync).to_string(),
            ),
            ("appenddirname", p.appenddirname.clone()),
            ("databases", "1".into()),
            ("maxmemory", self.config.maxmemory.to_string()),
            ("maxmemory-policy", "noeviction".into()),
            (
                "proto-max-bulk-len",
                self.config.max_value_bytes.to_string(),
            ),
        ]
    }

    /// The text of `INFO` for `sections` (empty, `default`, `all`: every one).
    pub(crate) fn info(&self, sections: &[String]) -> String {
        let all = sections.is_empty()
            || sections
                .iter()
                .any(|s| matches!(s.as_str(), "all" | "default" | "everything"));
        let want = |s: &str| all || sections.iter().any(|x| x == s);
        let st = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let d = self.table.describe();
        let mut out = String::new();
        let mut section = |name: &str, lines: Vec<(&str, String)>| {
            if want(name) {
                out.push_str(&format!("# {}{}\r\n", name[..1].to_uppercase(), &name[1..]));
                for (k, v) in lines {
                    out.push_str(&format!("{k}:{v}\r\n"));
                }
                out.push_str("\r\n");
            }
        };
        section(
            "server",
            vec![
                ("redis_version", REDIS_VERSION.into()),
                ("vramkv_version", env!("CARGO_PKG_VERSION").into()),
                ("redis_mode", "standalone".into()),
                ("process_id", std::process::id().to_string()),
                ("tcp_port", self.port.to_string()),
                (
                    "uptime_in_seconds",
                    self.started.elapsed().as_secs().to_string(),
                ),
            ],
        );
        section(
            "clients",
            vec![("connected_clients", get(&st.connected).to_string())],
        );
        let used = d.index_bytes + d.arena.held_bytes;
        section(
            "memory",
            vec![
                ("used_memory", used.to_string()),
                ("maxmemory", self.config.maxmemory.to_string()),
                ("maxmemory_policy", "noeviction".into()),
                (
                    "mem_fragmentation_ratio",
                    format!("{:.2}", d.arena.fragmentation()),
                ),
            ],
        );
        section("persistence", self.persist.info());
        section(
            "stats",
            vec![
                (
                    "total_connections_received",
                    get(&st.connections).to_string(),
                ),
                ("total_commands_processed", get(&st.commands).to_string()),
                ("keyspace_hits", get(&st.hits).to_string()),
                ("keyspace_misses", get(&st.misses).to_string()),
            ],
        );
        let keyspace = if d.entries > 0 {
            vec![("db0", format!("keys={},expires=0,avg_ttl=0", d.entries))]
        } else {
            Vec::new()
        };
        section("keyspace", keyspace);
        let batches = get(&st.batches);
        section(
            "vramkv",
            vec![
                ("backend", self.backend.clone()),
                ("device", d.device.clone()),
                ("entries", d.entries.to_string()),
                ("index_bytes", d.index_bytes.to_string()),
                ("arena_held_bytes", d.arena.held_bytes.to_string()),
                ("arena_live_bytes", d.arena.live_bytes.to_string()),
                ("arena_compacted_bytes", d.arena.compacted_bytes.to_string()),
                ("executor_rounds", get(&st.rounds).to_string()),
                ("table_batches", batches.to_string()),
                (
                    "avg_batch_keys",
                    format!("{:.1}", get(&st.batch_keys) as f64 / batches.max(1) as f64),
                ),
                ("max_batch_keys", get(&st.max_batch).to_string()),
            ],
        );
        out
    }
}

/// A running server: it stops when dropped.
pub struct Server {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    executor: Option<std::thread::JoinHandle<()>>,
    stats: Arc<Stats>,
    persist: Arc<Persist>,
}

impl Server {
    /// Binds `config.bind:config.port` and starts serving `table`; `backend` names the
    /// table's backend for `INFO`. Errors when the address cannot be bound.
    ///
    /// Nothing is loaded from disk; `SAVE` and `BGSAVE` write `config.persistence`'s dump
    /// file with a header that knows the table's capacity and limits only. A server that
    /// loads its keys at start, or logs them, is started by [`Server::start_store`].
    pub fn start(
        config: ServeConfig,
        table: Arc<dyn ByteTable>,
        backend: &str,
    ) -> std::io::Result<Server> {
        let limits = table.limits();
        let cfg = ByteConfig::new(table.capacity().max(1))
            .max_key_bytes(limits.max_key_bytes)
            .max_value_bytes(limits.max_value_bytes);
        Self::start_store(config, Store::new(table, cfg), backend)
    }

    /// Binds `config.bind:config.port` and starts serving `store`'s table (see
    /// [`Store::open`]); `backend` names the table's backend for `INFO`. Errors when the
    /// address cannot be bound.
    pub fn start_store(
        config: ServeConfig,
        store: Store,
        backend: &str,
    ) -> std::io::Result<Server> {
        let table = store.table().clone();
        let listener = TcpListener::bind((config.bind.as_str(), config.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.enable_all().thread_name("vramkv-conn");
        if let Some(w) = config.workers {
            rt.worker_threads(w.max(1));
        }
        let runtime = rt.build()?;
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel();
        let persist = Arc::new(Persist::new(
            config.persistence.clone(),
            store,
            stats.clone(),
        ));
        let exec =
            Arc::new(Executor::new(table.clone(), stats.clone()).with_persist(persist.clone()));
        let max_batch = config.max_batch.max(1);
        let serving = exec.clone();
        let executor = std::thread::Builder::new()
            .name("vramkv-executor".into())
            .spawn(move || serving.serve(&rx, max_batch))?;
        let shared = Arc::new(Shared {
            config,
            stats: stats.clone(),
            jobs: tx,
            exec,
            next_client: AtomicU64::new(0),
            persist: persist.clone(),
            table,
            backend: backend.to_string(),
            started: Instant::now(),
            port: addr.port(),
        });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((sock, _)) => {
                        tokio::spawn(conn::serve(sock, shared.clone()));
                    }
                    // Out of descriptors, say: wait a moment rather than spin.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        });
        Ok(Server {
            addr,
            runtime: Some(runtime),
            executor: Some(executor),
            stats,
            persist,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Serves until the process gets Ctrl-C (SIGINT) or, on Unix, SIGTERM, then stops as
    /// [`Server::shutdown`] does.
    pub fn run_until_ctrl_c(mut self) -> std::io::Result<()> {
        if let Some(rt) = &self.runtime {
            rt.block_on(async {
                #[cfg(unix)]
                {
                    use tokio::signal::unix::{SignalKind, signal};
                    let mut term = signal(SignalKind::terminate())?;
                    tokio::select! {
                        r = tokio::signal::ctrl_c() => r,
                        _ = term.recv() => Ok(()),
                    }
                }
                #[cfg(not(unix))]
                tokio::signal::ctrl_c().await
            })?;
        }
        self.stop()
    }

    /// Stops serving: closes every connection, lets the executor finish the commands it
    /// took, waits for a background save or log rewrite, and makes every logged write
    /// durable (append-only log on). No save is made (docs/server.md). The error of that
    /// last sync, if any. Dropping the server does the same and prints the error.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> std::io::Result<()> {
        // Dropping the runtime's tasks drops every job sender, which ends the executor.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
        match self.executor.take() {
            Some(h) => {
                let _ = h.join();
                self.persist
                    .shutdown()
                    .map_err(|e| std::io::Error::other(format!("syncing the log: {e}")))
            }
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("vramkv serve: at shutdown: {e}");
        }
    }
}
