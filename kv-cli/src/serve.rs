//! `vramkv serve`: the Redis-protocol server (`kv_server`) over a byte table.
//!
//! Settings come from the command line, or from a file (`--config FILE`) of `name value`
//! lines in redis.conf's style (`port 6380`, `maxmemory 1073741824`, `# comments`); the
//! command line wins where both set one.

use std::collections::HashMap;
use std::sync::Arc;

use clap::Args;
use kv_server::{ServeConfig, Server};
use vramkv::{BackendKind, ByteConfig, Error, Options, Result, TableConfig};

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
    /// A file of `name value` lines with any of the settings above.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
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

/// Runs the server until Ctrl-C.
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
        ) {
            return Err(Error::InvalidConfig(format!(
                "unknown setting {k:?} in the config file"
            )));
        }
    }
    let f = |k: &str| file.get(k).map(String::as_str);
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
    let table = vramkv::open_bytes_with(cfg, &options)?;
    for (kind, why) in table.skipped() {
        eprintln!("vramkv serve: skipped {kind}: {why}");
    }
    let kind = table.kind();
    let config = ServeConfig {
        bind,
        port,
        requirepass: a.requirepass.clone().or(f("requirepass").map(String::from)),
        max_batch: 1 << 20,
        workers,
        max_value_bytes: usize::try_from(max_value).unwrap_or(usize::MAX),
        maxmemory,
        direct_reads: kind == BackendKind::Cpu,
        persistence: kv_server::Persistence::default(),
    };
    let server = Server::start(config, Arc::new(table), kind.name())
        .map_err(|e| Error::InvalidConfig(format!("cannot listen: {e}")))?;
    println!(
        "vramkv serve: listening on {} ({} byte table); Ctrl-C stops",
        server.local_addr(),
        kind
    );
    server
        .run_until_ctrl_c()
        .map_err(|e| Error::InvalidConfig(format!("waiting for Ctrl-C: {e}")))
}
