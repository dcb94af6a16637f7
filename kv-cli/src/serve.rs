//! `vramkv serve`: the Redis-protocol server (`kv_server`) over a byte table.
//!
//! Settings come from the command line, or from a file (`--config FILE`) of `name value`
//! lines in redis.conf's style (`port 6380`, `maxmemory 1073741824`, `# comments`); the
//! command line wins where both set one.
//!
//! Persistence follows Redis's settings (`dir`, `dbfilename`, `appendonly`, `appendfsync`,
//! `appenddirname`): the table is loaded at start from the dump file, or from the
//! append-only directory when the log is on (docs/server.md, "Persistence").

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;
use kv_server::{Fsync, Persistence, ServeConfig, Server, Store};
use vramkv::{BackendKind, ByteConfig, ByteTable, Error, Options, Result, TableConfig};

/// The arguments of `vramkv serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The address to listen on.
    #[arg(long)]
    bind: Option<String>,
    /// The port (0: any free one, printed at start).
    #[arg(long)]
    port: Option<u16>,
    /// The backend of the byte table: auto (CUDA, then wgpu on a discrete GPU, then the
    /// CPU), cpu, cuda or wgpu.
    #[arg(long)]
    backend: Option<String>,
    /// The most bytes the table's arena may hold (0: no limit). Writes past it answer
    /// `-OOM`, as Redis's `noeviction` does.
    #[arg(long)]
    maxmemory: Option<u64>,
    /// Host memory for a tier below the GPU (0: none; byte tables have no tiers yet).
    #[arg(long)]
    host_memory: Option<u64>,
    /// Eviction policy: none (Redis's noeviction); lru and lfu need cache byte tables,
    /// which do not exist yet, and are refused.
    #[arg(long)]
    policy: Option<String>,
    /// The password clients must give with AUTH.
    #[arg(long)]
    requirepass: Option<String>,
    /// The longest value, in bytes.
    #[arg(long)]
    max_value: Option<u64>,
    /// Connection worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// The directory of the dump file and of the append-only directory (default `.`); it
    /// must exist.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The dump file's name in --dir (default `dump.vkv`): SAVE and BGSAVE write it, and it
    /// is loaded at start when the append-only log is off.
    #[arg(long)]
    dbfilename: Option<String>,
    /// yes: log every write in --appenddirname and load the keys from there at start (the
    /// dump file is then not loaded, as in Redis); no (default): the dump file only.
    #[arg(long)]
    appendonly: Option<String>,
    /// When logged writes reach the disk: always (before each reply), everysec (default;
    /// a power loss loses at most about a second) or no (when the system likes).
    #[arg(long)]
    appendfsync: Option<String>,
    /// The append-only directory's name in --dir (default `appendonlydir`).
    #[arg(long)]
    appenddirname: Option<String>,
    /// A file of `name value` lines with any of the settings above.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn yes_no(name: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(Error::InvalidConfig(format!(
            "{name} must be yes or no, not {v:?}"
        ))),
    }
}

/// The persistence settings from the command line and the config file.
fn persistence(a: &ServeArgs, f: &dyn Fn(&str) -> Option<String>) -> Result<Persistence> {
    let d = Persistence::default();
    let pick = |arg: &Option<String>, key: &str| arg.clone().or_else(|| f(key));
    let appendonly = match pick(&a.appendonly, "appendonly") {
        Some(v) => yes_no("appendonly", &v)?,
        None => d.appendonly,
    };
    let appendfsync = match pick(&a.appendfsync, "appendfsync") {
        Some(v) => v.parse::<Fsync>()?,
        None => d.appendfsync,
    };
    let p = Persistence {
        dir: a
            .dir
            .clone()
            .or_else(|| f("dir").map(PathBuf::from))
            .unwrap_or(d.dir),
        dbfilename: pick(&a.dbfilename, "dbfilename").unwrap_or(d.dbfilename),
        appendonly,
        appendfsync,
        appenddirname: pick(&a.appenddirname, "appenddirname").unwrap_or(d.appenddirname),
    };
    p.check()?;
    Ok(p)
}

fn read_file(path: &std::path::Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidConfig(format!("{}: {e}", path.display())))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once(char::is_whitespace).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{}:{}: expected `name value`",
                path.display(),
                n + 1
            ))
        })?;
        out.insert(
            k.trim().replace('_', "-"),
            v.trim().trim_matches('"').to_string(),
        );
    }
    Ok(out)
}

fn parse<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| Error::InvalidConfig(format!("{name}: cannot read {v:?}")))
}

/// Runs the server until Ctrl-C or SIGTERM.
pub fn run(a: &ServeArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => read_file(p)?,
        None => HashMap::new(),
    };
    for k in file.keys() {
        if !matches!(
            k.as_str(),
            "bind"
                | "port"
                | "backend"
                | "maxmemory"
                | "host-memory"
                | "policy"
                | "maxmemory-policy"
                | "requirepass"
                | "max-value"
                | "workers"
                | "dir"
                | "dbfilename"
                | "appendonly"
                | "appendfsync"
                | "appenddirname"
        ) {
            return Err(Error::InvalidConfig(format!(
                "unknown setting {k:?} in the config file"
            )));
        }
    }
    let f = |k: &str| file.get(k).map(String::as_str);
    let persistence = persistence(a, &|k: &str| file.get(k).cloned())?;
    let bind = a
        .bind
        .clone()
        .or(f("bind").map(String::from))
        .unwrap_or("127.0.0.1".into());
    let port = match (a.port, f("port")) {
        (Some(p), _) => p,
        (None, Some(p)) => parse("port", p)?,
        (None, None) => 6379,
    };
    let maxmemory = match (a.maxmemory, f("maxmemory")) {
        (Some(m), _) => m,
        (None, Some(m)) => parse("maxmemory", m)?,
        (None, None) => 0,
    };
    let host_memory = match (a.host_memory, f("host-memory")) {
        (Some(m), _) => m,
        (None, Some(m)) => parse("host-memory", m)?,
        (None, None) => 0,
    };
    let policy = a
        .policy
        .clone()
        .or(f("policy").or(f("maxmemory-policy")).map(String::from))
        .unwrap_or("none".into());
    if !matches!(policy.as_str(), "none" | "noeviction") {
        return Err(Error::InvalidConfig(format!(
            "--policy {policy}: byte tables do not evict yet; use none (Redis's noeviction)"
        )));
    }
    if host_memory != 0 {
        return Err(Error::InvalidConfig(
            "--host-memory: byte tables have no host tier yet".into(),
        ));
    }
    let max_value = match (a.max_value, f("max-value")) {
        (Some(m), _) => m,
        (None, Some(m)) => parse("max-value", m)?,
        (None, None) => vramkv::DEFAULT_MAX_VALUE_BYTES,
    };
    let workers = match (a.workers, f("workers")) {
        (Some(w), _) => Some(w),
        (None, Some(w)) => Some(parse("workers", w)?),
        (None, None) => None,
    };
    let backend = a.backend.clone().or(f("backend").map(String::from));
    let options = match backend.as_deref() {
        None | Some("auto") | Some("") => Options::default(),
        Some(b) => Options::default().backend(b.parse::<BackendKind>()?),
    };
    let mut cfg = ByteConfig::new(1 << 20)
        .max_value_bytes(max_value)
        .table(TableConfig::new(1 << 20));
    if maxmemory > 0 {
        cfg = cfg.arena_budget(maxmemory);
    }
    // The table is opened by the store (inside the append-only directory's loader when the
    // log is on); this records the backend it chose.
    let chosen = RefCell::new(None);
    let open = |cfg: ByteConfig| -> Result<Box<dyn ByteTable>> {
        let table = vramkv::open_bytes_with(cfg, &options)?;
        for (kind, why) in table.skipped() {
            eprintln!("vramkv serve: skipped {kind}: {why}");
        }
        *chosen.borrow_mut() = Some(table.kind());
        Ok(Box::new(table))
    };
    let (store, loaded) = Store::open(&persistence, cfg, &open)?;
    for line in loaded.messages() {
        eprintln!("vramkv serve: {line}");
    }
    let kind = chosen
        .into_inner()
        .ok_or_else(|| Error::InvalidConfig("the table was not opened (internal)".into()))?;
    let config = ServeConfig {
        bind,
        port,
        requirepass: a.requirepass.clone().or(f("requirepass").map(String::from)),
        max_batch: 1 << 20,
        workers,
        max_value_bytes: usize::try_from(max_value).unwrap_or(usize::MAX),
        maxmemory,
        direct_reads: kind == BackendKind::Cpu,
        persistence,
    };
    let server = Server::start_store(config, store, kind.name())
        .map_err(|e| Error::InvalidConfig(format!("cannot listen: {e}")))?;
    println!(
        "vramkv serve: listening on {} ({} byte table); Ctrl-C stops",
        server.local_addr(),
        kind
    );
    server
        .run_until_ctrl_c()
        .map_err(|e| Error::io("stopping the server", e))
}
