//! `vramkv`: benchmark the backends (`vramkv bench`), show the devices (`vramkv info`),
//! and serve a byte table over the Redis protocol (`vramkv serve`).

mod bytes_bench;
mod cache_bench;
#[cfg(feature = "cuda")]
mod cache_resident;
mod durability_bench;
mod host_copy;
#[cfg(feature = "cuda")]
mod pinned;
#[cfg(feature = "cuda")]
mod resident;
mod serve;
mod sweep;
mod workload;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::process::ExitCode;
use std::time::Instant;
use vramkv::{BackendKind, KvBackend, Options, TableConfig};
use workload::Batch;

#[derive(Parser)]
#[command(
    name = "vramkv",
    version,
    about = "A batched key-value store whose table lives in GPU memory"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// PUT and GET throughput per batch, validated against the sequential semantics.
    Bench(Box<BenchArgs>),
    /// The backends compiled in, the devices found, and what `auto` would pick.
    Info,
    /// A Redis-protocol server over a byte table (redis-cli and Redis clients connect).
    Serve(Box<serve::ServeArgs>),
    /// Snapshot files: `vramkv snapshot inspect FILE` prints a snapshot's header, its
    /// counts and whether every checksum holds.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// The header, the counts and the checksum status of a snapshot file; exit code 1
    /// when it is damaged.
    Inspect {
        /// The snapshot file.
        file: std::path::PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Choice {
    Auto,
    Cpu,
    Cuda,
    Wgpu,
    All,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Which backend to run; `all` runs every available one side by side.
    #[arg(long, value_enum, default_value = "auto")]
    backend: Choice,
    /// Items per batch.
    #[arg(long, default_value_t = 2_000_000)]
    items: usize,
    /// Batches; the first is reported as warm-up.
    #[arg(long, default_value_t = 5)]
    batches: usize,
    /// Value width in u64 words (1..=16). Default: 1, and 4 (32-byte values, issue 13's
    /// comparison with HierarchicalKV) for --cache --resident.
    #[arg(long)]
    width: Option<usize>,
    /// Seed of the key and value generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object per batch on its own line.
    #[arg(long)]
    json: bool,
    /// Throughput against batch size (1K up to --items) and against table size, printed
    /// as a table and drawn into the SVG file --plot.
    #[arg(long)]
    sweep: bool,
    /// Where --sweep draws its plot (the backend's name is added before the extension).
    #[arg(long, default_value = "vramkv-sweep.svg")]
    plot: std::path::PathBuf,
    /// Device-resident insert and find on the CUDA backend (keys already in VRAM), at the
    /// occupancies of --occupancy, in a table of the largest power-of-two slot count that
    /// holds --items keys at occupancy 0.74.
    #[arg(long)]
    resident: bool,
    /// PUT and GET through batches in page-locked memory lent by the CUDA backend
    /// (`put_pinned` / `get_pinned`): each batch is written into the lent buffers before
    /// the timed calls, so the copy through staging buffers is skipped. Validated like the
    /// plain bench. CUDA only.
    #[arg(long)]
    pinned: bool,
    /// The host's parallel copy rate (the bound of PUT and GET from a `Vec` on the CUDA
    /// backend): --items words copied with streaming and with ordinary stores, into a `Vec`
    /// and, with the CUDA backend, into page-locked memory; median of --reps.
    #[arg(long)]
    host_copy: bool,
    /// Key order of --resident: `random`, or grouped by table region as a partitioned
    /// batch would be (`regions=N`, N a power of two; `slot`: sorted by home slot), to
    /// measure what probing with locality is worth.
    #[cfg(feature = "cuda")]
    #[arg(long, default_value = "random", requires = "resident")]
    key_order: resident::KeyOrder,
    /// Occupancies for --resident (refused without it).
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = [0.5, 0.74, 0.9],
        requires = "resident"
    )]
    occupancy: Vec<f64>,
    /// A tiered store (a cache table over host RAM) under Zipf-distributed keys, 90 % gets
    /// and 10 % puts, next to the hit rate of an exact LRU of the same size on the same
    /// key stream: every exponent of --zipf (0: uniform) over key spaces --space times the
    /// upper tier's capacity (--upper-mib), batches of --items operations.
    #[arg(long)]
    cache: bool,
    /// Zipf exponents for --cache (0: uniform keys).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.99,1.2,0",
        requires = "cache"
    )]
    zipf: Vec<f64>,
    /// Key spaces for --cache, in multiples of the upper tier's capacity.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4,16",
        requires = "cache"
    )]
    space: Vec<usize>,
    /// Slots of the cache table of --cache --resident (rounded to whole buckets of 32).
    #[arg(long, default_value_t = 1 << 26, requires = "cache")]
    cache_slots: usize,
    /// Keys per batch of --cache --resident.
    #[arg(long, default_value_t = 1 << 20, requires = "cache")]
    cache_batch: usize,
    /// The upper tier's budget for --cache, in MiB.
    #[arg(long, default_value_t = 64, requires = "cache")]
    upper_mib: u64,
    /// Byte tables: PUT and GET of --items new keys a batch, 16-byte keys with 64-byte
    /// values and 32-byte keys with values of 100 B to 4 KiB, next to the host copy bound
    /// of the same bytes.
    #[arg(long)]
    bytes: bool,
    /// A byte table's arena under churn: --rounds rounds over --items keys of overwrites
    /// with new random sizes (8 B to 4 KiB) and 30 % deletes, in batches of --chunk keys;
    /// prints the fragmentation after every round and fails past 1.15.
    #[arg(long, conflicts_with = "bytes")]
    churn: bool,
    /// Rounds of --churn.
    #[arg(long, default_value_t = 10, requires = "churn")]
    rounds: usize,
    /// Keys per batch of --churn.
    #[arg(long, default_value_t = 1_000_000, requires = "churn")]
    chunk: usize,
    /// Snapshots and the log: the disk's rates (dd), a snapshot of --items entries saved
    /// and loaded, and PUT throughput under each fsync policy at the batch sizes of
    /// --log-items.
    #[arg(long)]
    durability: bool,
    /// Batch sizes for the log's cost in --durability.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2000000,20000000",
        requires = "durability"
    )]
    log_items: Vec<usize>,
    /// Where --durability writes its files (default: the system's temporary directory).
    #[arg(long, requires = "durability")]
    dir: Option<std::path::PathBuf>,
    /// A table of N shards (`vramkv::Sharded`) instead of one: on CUDA, shard i on the
    /// i-th GPU of the device ranking (cycling when there are fewer GPUs than shards); on
    /// another backend, N tables of it. 0: one plain table.
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// CUDA device ordinal (default: the GPU with the most free memory).
    #[arg(long)]
    device: Option<usize>,
    /// The hash seed of every table the bench opens (`TableConfig::seed`), for runs that
    /// place keys alike. Default: a random seed per table, and a fixed one for --resident.
    #[arg(long)]
    hash_seed: Option<u64>,
    /// Repetitions per sweep point (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

impl BenchArgs {
    /// The value width: `--width`, or its default for the mode.
    fn width(&self) -> usize {
        self.width
            .unwrap_or(if self.cache && self.resident { 4 } else { 1 })
    }
}

#[derive(Serialize)]
struct BatchResult {
    backend: &'static str,
    batch: usize,
    items: usize,
    put_mops: f64,
    get_mops: f64,
    valid: usize,
    warmup: bool,
}

impl BatchResult {
    /// Batch `b` (0-based) of `items` items whose put and get took `put` and `get` seconds;
    /// the first batch is the warm-up.
    fn new(
        backend: &'static str,
        b: usize,
        items: usize,
        put: f64,
        get: f64,
        valid: usize,
    ) -> Self {
        BatchResult {
            backend,
            batch: b + 1,
            items,
            put_mops: round1(items as f64 / put / 1e6),
            get_mops: round1(items as f64 / get / 1e6),
            valid,
            warmup: b == 0,
        }
    }
}

/// Gives Mesa's Vulkan drivers (lavapipe) a runtime directory when the environment has none:
/// its window-system loader otherwise prints `error: XDG_RUNTIME_DIR is invalid or not set`
/// twice, which reads as a failure of vramkv, while this command never opens a window. A
/// private directory under the temporary one (mode 0700, as the XDG spec asks).
fn quiet_window_system() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join("vramkv-runtime");
    let _ = std::fs::create_dir_all(&dir);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    // SAFETY: the first statement of `main`, before any other thread exists, so no thread
    // reads the environment while it changes.
    unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
}

fn main() -> ExitCode {
    quiet_window_system();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Bench(a) => bench(&a),
        Cmd::Info => {
            info();
            Ok(true)
        }
        Cmd::Serve(a) => serve::run(&a).map(|()| true),
        Cmd::Snapshot {
            cmd: SnapshotCmd::Inspect { file, json },
        } => Ok(inspect(&file, json)),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vramkv: {e}");
            ExitCode::from(2)
        }
    }
}

/// `vramkv snapshot inspect`: prints what [`vramkv::durable::snapshot::inspect`] found;
/// `false` (exit code 1) for a damaged file.
fn inspect(file: &std::path::Path, json: bool) -> bool {
    let ins = vramkv::durable::snapshot::inspect(file);
    let ok = ins.complete && ins.error.is_none();
    if json {
        let v = serde_json::json!({
            "file": file.display().to_string(),
            "file_bytes": ins.file_bytes,
            "version": ins.version,
            "header": ins.header,
            "chunks_ok": ins.chunks_ok,
            "entries_ok": ins.entries_ok,
            "complete": ins.complete,
            "error": ins.error.as_ref().map(ToString::to_string),
        });
        println!("{v}");
        return ok;
    }
    println!("file:     {} ({} bytes)", file.display(), ins.file_bytes);
    match ins.version {
        Some(v) => println!("format:   vramkv snapshot, version {v}"),
        None => println!("format:   unknown"),
    }
    if let Some(h) = &ins.header {
        let kind = match (h.kind, &h.cache) {
            (vramkv::durable::snapshot::TableKind::Bytes, _) => "byte table".to_string(),
            (_, Some(p)) => format!("cache table ({p}), width {}", h.width),
            (_, None) => format!("fixed-width table, width {}", h.width),
        };
        println!("table:    {kind}");
        println!("entries:  {} (header)", h.entries);
        println!(
            "written:  by {} at {} ms since the Unix epoch",
            h.backend, h.written_ms
        );
        println!(
            "config:   capacity {}, max load {}, growth {}, seed {}",
            h.capacity,
            h.max_load_factor,
            h.growth,
            h.seed.map_or("random".into(), |s| s.to_string())
        );
        if let (Some(k), Some(v)) = (h.max_key_bytes, h.max_value_bytes) {
            println!("limits:   keys up to {k} bytes, values up to {v} bytes");
        }
    }
    println!(
        "checked:  {} chunks, {} entries, checksums {}",
        ins.chunks_ok,
        ins.entries_ok,
        if ok { "all good" } else { "NOT all good" }
    );
    if let Some(e) = &ins.error {
        println!("damage:   {e}");
    }
    ok
}

/// The options of every table the CLI opens: what the environment asks for
/// ([`Options::from_env`]: `VRAMKV_BACKEND` and each backend's tuning variables), and, for
/// comparing kernel variants with one binary, the CUDA kernels of the PTX file that
/// `VRAMKV_PTX` names (a development switch of this command; the library never reads it).
fn options() -> vramkv::Result<Options> {
    #[allow(unused_mut)]
    let mut o = Options::from_env()?;
    #[cfg(feature = "cuda")]
    if let Some(path) = std::env::var_os(PTX_ENV).filter(|p| !p.is_empty()) {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            vramkv::Error::InvalidConfig(format!("{PTX_ENV}={}: {e}", path.to_string_lossy()))
        })?;
        o.cuda.ptx = Some(text.into());
    }
    Ok(o)
}

/// The environment variable naming a PTX file whose kernels the CUDA tables load instead of
/// the built-in ones (same entry points and argument layout).
#[cfg(feature = "cuda")]
const PTX_ENV: &str = "VRAMKV_PTX";

/// The options to open `kind` with (`None`: as `options` choose).
fn for_kind(options: &Options, kind: Option<BackendKind>) -> Options {
    match kind {
        Some(k) => options.clone().backend(k),
        None => options.clone(),
    }
}

/// The backend `choice` forces (`None`: automatic choice); `all` is refused, `why` saying
/// why one is needed.
fn one_backend(choice: Choice, why: &str) -> vramkv::Result<Option<BackendKind>> {
    match choice {
        Choice::Auto => Ok(None),
        Choice::Cpu => Ok(Some(BackendKind::Cpu)),
        Choice::Cuda => Ok(Some(BackendKind::Cuda)),
        Choice::Wgpu => Ok(Some(BackendKind::Wgpu)),
        Choice::All => Err(vramkv::Error::InvalidConfig(format!("{why}, not all"))),
    }
}

fn backends_for(choice: Choice, options: &Options) -> vramkv::Result<Vec<Option<BackendKind>>> {
    Ok(match choice {
        Choice::Auto => vec![None],
        Choice::Cpu => vec![Some(BackendKind::Cpu)],
        Choice::Cuda => vec![Some(BackendKind::Cuda)],
        Choice::Wgpu => vec![Some(BackendKind::Wgpu)],
        // Every backend that opens when forced: a software adapter (lavapipe) runs too, as
        // with `--backend wgpu`, although automatic choice passes it over.
        Choice::All => BackendKind::ALL
            .into_iter()
            .filter(|k| k.compiled_in())
            .filter_map(|k| {
                match vramkv::open_with(TableConfig::new(16), &for_kind(options, Some(k))) {
                    Ok(_) => Some(Some(k)),
                    Err(why) => {
                        eprintln!("skipped: {k}: {why}");
                        None
                    }
                }
            })
            .collect(),
    })
}

/// Runs the bench; `Ok(false)` when a batch failed validation.
fn bench(a: &BenchArgs) -> vramkv::Result<bool> {
    if a.items == 0 || a.batches == 0 {
        return Err(vramkv::Error::InvalidConfig(
            "--items and --batches must be at least 1".into(),
        ));
    }
    // Room for every distinct key, plus one batch: a put is admitted while
    // len + batch <= capacity (every key of a batch counts as new), so without the extra
    // batch the last one would measure a growth rehash instead of steady-state puts.
    // Saturating: an impossible --items gives a capacity that `validate` refuses, never one
    // that wrapped around.
    let mut cfg =
        TableConfig::new(workload::unique_keys(a.items, a.batches).saturating_add(a.items))
            .width(a.width());
    cfg.device = a.device;
    cfg.seed = a.hash_seed;
    cfg.validate()?;
    let options = options()?;
    if a.resident && a.cache {
        return run_cache_resident(a, &options).map(|()| true);
    }
    if a.resident {
        return run_resident(a, &options).map(|()| true);
    }
    if a.host_copy {
        return host_copy::run(a).map(|()| true);
    }
    if a.durability {
        let kind = one_backend(a.backend, "--durability runs one backend")?;
        return durability_bench::run(a, &for_kind(&options, kind));
    }
    if a.bytes || a.churn {
        let kind = one_backend(a.backend, "--bytes and --churn run one backend")?;
        let opts = for_kind(&options, kind);
        return if a.churn {
            bytes_bench::churn(a.items, a.rounds, a.chunk, a.seed, &opts)
        } else {
            bytes_bench::run(a.items, a.batches, a.seed, &opts)
        };
    }
    if a.cache {
        let kind = one_backend(a.backend, "--cache runs one backend for its upper tier")?;
        let opts = for_kind(&options, kind);
        let mut rows = Vec::new();
        let bar = ProgressBar::new((a.zipf.len() * a.space.len()) as u64);
        for &z in &a.zipf {
            for &sp in &a.space {
                bar.set_message(format!("zipf {z}, space {sp}x"));
                rows.push(cache_bench::run_one(
                    z,
                    sp,
                    a.width(),
                    a.upper_mib << 20,
                    a.items,
                    a.batches,
                    a.seed,
                    &opts,
                )?);
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        cache_bench::print(a.width(), a.items, &rows);
        return Ok(true);
    }
    if a.pinned {
        if !matches!(a.backend, Choice::Auto | Choice::Cuda) {
            return Err(vramkv::Error::InvalidConfig(
                "--pinned runs on the CUDA backend only".into(),
            ));
        }
        return run_pinned(a, cfg, &options);
    }
    let kinds = backends_for(a.backend, &options)?;
    if a.sweep {
        return run_sweep(a, &kinds, &options).map(|()| true);
    }
    let bar = ProgressBar::new((kinds.len() * a.batches) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} batches {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Redrawn on a timer, not only per batch, so that the spinner and the elapsed time move
    // while a long batch runs; the message names the step in progress.
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut all_ok = true;
    let mut table_rows: Vec<(String, Vec<BatchResult>)> = Vec::new();
    for kind in kinds {
        let (table, skipped) = open_bench_table(a, cfg.clone(), kind, &options)?;
        let d = table.describe();
        if !a.json {
            bar.suspend(|| {
                for (k, why) in &skipped {
                    println!("skipped: {k}: {why}");
                }
                println!(
                    "backend {} on {} — {} items/batch, width {}",
                    d.backend,
                    d.device,
                    a.items,
                    a.width()
                );
            });
        }
        let mut results = Vec::new();
        let mut out = vec![0u64; a.items * a.width()];
        let mut found = vec![false; a.items];
        for b in 0..a.batches {
            bar.set_message(format!("{}: batch {}, generating", d.backend, b + 1));
            let batch = Batch::new(b, a.items, a.width(), a.seed);
            bar.set_message(format!("{}: batch {}, put", d.backend, b + 1));
            let t0 = Instant::now();
            table.put(&batch.keys, &batch.values)?;
            let put = t0.elapsed().as_secs_f64();
            out.fill(u64::MAX);
            bar.set_message(format!("{}: batch {}, get", d.backend, b + 1));
            let t0 = Instant::now();
            table.get(&batch.keys, &mut out, &mut found)?;
            let get = t0.elapsed().as_secs_f64();
            let valid = batch.count_valid(&out, &found);
            all_ok &= valid == a.items;
            let r = BatchResult::new(d.backend, b, a.items, put, get, valid);
            bar.suspend(|| print_batch(&r, a.json));
            results.push(r);
            bar.inc(1);
        }
        table_rows.push((format!("{} ({})", d.backend, d.device), results));
    }
    bar.finish_and_clear();
    if !a.json {
        let rows: Vec<(String, Vec<&BatchResult>)> = table_rows
            .iter()
            .map(|(n, rs)| (n.clone(), rs.iter().collect()))
            .collect();
        print_side_by_side(&rows);
    }
    if !all_ok {
        eprintln!(
            "vramkv: validation failed: some batch read back fewer than {} valid items",
            a.items
        );
    }
    Ok(all_ok)
}

/// Each better backend that automatic choice skipped, and why.
type Skipped = Vec<(BackendKind, String)>;

/// The table a plain bench runs on: one table of `kind`, or with `--shards N` a table of
/// N shards (CUDA shards spread over the GPUs in the order of the device ranking), and
/// each better backend that was skipped.
fn open_bench_table(
    a: &BenchArgs,
    cfg: TableConfig,
    kind: Option<BackendKind>,
    options: &Options,
) -> vramkv::Result<(Box<dyn KvBackend>, Skipped)> {
    let opts = for_kind(options, kind);
    if a.shards == 0 {
        let t = vramkv::open_with(cfg, &opts)?;
        let skipped = t.skipped().to_vec();
        return Ok((Box::new(t), skipped));
    }
    let kind = match kind {
        Some(k) => k,
        None => vramkv::open_with(TableConfig::new(16), &opts)?.kind(),
    };
    let ranking = vramkv::device_ranking();
    let specs: Vec<vramkv::ShardSpec> = (0..a.shards)
        .map(|i| match (kind, ranking.is_empty()) {
            (BackendKind::Cuda, false) => {
                vramkv::ShardSpec::on_device(kind, ranking[i % ranking.len()].0)
            }
            _ => vramkv::ShardSpec::on(kind),
        })
        .collect();
    Ok((
        Box::new(vramkv::open_sharded(cfg, &specs, options)?),
        Vec::new(),
    ))
}

/// One batch's line (or JSON object).
fn print_batch(r: &BatchResult, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
    } else {
        println!(
            "  batch {:>2}{}  PUT {:>9.1} M ops/s  GET {:>9.1} M ops/s  valid {}/{}",
            r.batch,
            if r.warmup { " (warm-up)" } else { "          " },
            r.put_mops,
            r.get_mops,
            r.valid,
            r.items
        );
    }
}

#[cfg(feature = "cuda")]
fn run_pinned(a: &BenchArgs, cfg: TableConfig, options: &Options) -> vramkv::Result<bool> {
    let (name, results) = pinned::run(a, cfg, &options.cuda)?;
    if !a.json {
        print_side_by_side(&[(name, results.iter().collect())]);
    }
    let ok = results.iter().all(|r| r.valid == r.items);
    if !ok {
        eprintln!(
            "vramkv: validation failed: some pinned batch read back fewer than {} valid items",
            a.items
        );
    }
    Ok(ok)
}

#[cfg(not(feature = "cuda"))]
fn run_pinned(_: &BenchArgs, _: TableConfig, _: &Options) -> vramkv::Result<bool> {
    Err(vramkv::Error::BackendUnavailable {
        backend: "cuda",
        reason: "--pinned needs the CUDA backend; build with --features cuda".into(),
    })
}

#[cfg(feature = "cuda")]
fn run_resident(a: &BenchArgs, options: &Options) -> vramkv::Result<()> {
    let slots = resident::slots_for_items(a.items);
    let (rows, hbm) = resident::run(
        slots,
        &a.occupancy,
        a.width(),
        a.reps.max(1),
        a.device,
        a.key_order,
        a.hash_seed.unwrap_or(resident::SEED),
        &options.cuda,
    )?;
    // After the run, so that a failure (no CUDA device) prints no half-report.
    println!(
        "device-resident on cuda: {slots} slots, width {}, median of {} after a warm-up",
        a.width(),
        a.reps
    );
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>10} {:>12}",
        "occupancy", "keys", "insert G/s", "find G/s", "B/entry", "found"
    );
    for r in &rows {
        println!(
            "{:>9.2} {:>12} {:>12.2} {:>12.2} {:>10.1} {:>12}",
            r.occupancy, r.keys, r.insert_gops, r.find_gops, r.bytes_per_entry, r.found
        );
    }
    let (ins_b, find_b) = resident::bytes_per_op(a.width());
    let (ins_bound, find_bound) = (hbm / ins_b, hbm / find_b);
    println!(
        "bound: HBM copy {:.0} GB/s (read + write); an insert moves at least {ins_b:.0} B \
         ({ins_bound:.1} G/s), a find {find_b:.0} B ({find_bound:.1} G/s)",
        hbm
    );
    for r in &rows {
        println!(
            "  at occupancy {:.2}: insert {:.2} of its bound, find {:.2}",
            r.occupancy,
            r.insert_gops / ins_bound,
            r.find_gops / find_bound
        );
    }
    Ok(())
}

/// `--cache --resident`: device-resident put_and_evict and find on a full CUDA cache table
/// (`cache_resident`); prints `skipped: ...` where there is no CUDA device.
#[cfg(feature = "cuda")]
fn run_cache_resident(a: &BenchArgs, options: &Options) -> vramkv::Result<()> {
    if !matches!(a.backend, Choice::Auto | Choice::Cuda) {
        return Err(vramkv::Error::InvalidConfig(
            "--cache --resident runs on the CUDA backend only".into(),
        ));
    }
    if let Some(reason) = vramkv::cuda::unavailable_reason() {
        println!("skipped: {reason} (bench --cache --resident needs a CUDA device)");
        return Ok(());
    }
    let r = cache_resident::run(
        a.cache_slots,
        a.cache_batch,
        a.width(),
        a.reps,
        a.device,
        &options.cuda,
    )?;
    cache_resident::print(&r);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cache_resident(_: &BenchArgs, _: &Options) -> vramkv::Result<()> {
    println!(
        "skipped: bench --cache --resident needs the CUDA backend; build with --features cuda"
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_resident(_: &BenchArgs, _: &Options) -> vramkv::Result<()> {
    Err(vramkv::Error::BackendUnavailable {
        backend: "cuda",
        reason: "--resident needs the CUDA backend; build with --features cuda".into(),
    })
}

fn run_sweep(
    a: &BenchArgs,
    kinds: &[Option<BackendKind>],
    options: &Options,
) -> vramkv::Result<()> {
    let sizes = sweep::decades(a.items);
    let batch = a.items.min(1 << 20);
    let reps = a.reps.max(1);
    for kind in kinds {
        // Headroom of two batches over the largest fill, for the same reason as in `bench`.
        let mut cfg = TableConfig::new(a.items + 2 * batch).width(a.width());
        cfg.device = a.device;
        cfg.seed = a.hash_seed;
        let table = vramkv::open_with(cfg, &for_kind(options, *kind))?;
        let d = table.describe();
        println!(
            "sweep on {} ({}), width {}, median of {reps}",
            d.backend,
            d.device,
            a.width()
        );
        let by_batch = sweep::by_batch(&table, &sizes, reps)?;
        sweep::print(
            "throughput against batch size (fresh keys, cleared table)",
            "batch",
            &by_batch,
        );
        let by_table = sweep::by_table(&table, &sizes, batch, reps)?;
        sweep::print(
            &format!("throughput against table size (batches of {batch})"),
            "entries",
            &by_table,
        );
        let svg = sweep::svg(
            &[
                ("against batch size", "batch size", &by_batch),
                (
                    &format!("against table size, batches of {batch}"),
                    "entries in table",
                    &by_table,
                ),
            ],
            &format!("{} on {}", d.backend, d.device),
        );
        let path = plot_path(&a.plot, d.backend, kinds.len() > 1);
        std::fs::write(&path, svg).map_err(|e| {
            vramkv::Error::InvalidConfig(format!("cannot write {}: {e}", path.display()))
        })?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

fn plot_path(base: &std::path::Path, backend: &str, several: bool) -> std::path::PathBuf {
    if !several {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("vramkv-sweep");
    base.with_file_name(format!("{stem}-{backend}.svg"))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Median over the batches after the warm-up (or the only batch).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn print_side_by_side(rows: &[(String, Vec<&BatchResult>)]) {
    // With --batches 1 the only batch is the warm-up: say so rather than call it a median
    // after one.
    let what = if rows.iter().all(|(_, rs)| rs.len() > 1) {
        "backend (median after warm-up)"
    } else {
        "backend (the warm-up batch alone)"
    };
    println!(
        "\n{:<48} {:>14} {:>14} {:>8}",
        what, "PUT M ops/s", "GET M ops/s", "valid"
    );
    for (name, rs) in rows {
        let steady: &[&BatchResult] = if rs.len() > 1 { &rs[1..] } else { rs };
        let put = median(steady.iter().map(|r| r.put_mops).collect());
        let get = median(steady.iter().map(|r| r.get_mops).collect());
        let ok = rs.iter().all(|r| r.valid == r.items);
        println!(
            "{:<48} {:>14.1} {:>14.1} {:>8}",
            name,
            put,
            get,
            if ok { "all" } else { "FAILED" }
        );
    }
}

fn info() {
    println!("vramkv {}", env!("CARGO_PKG_VERSION"));
    println!("backends compiled in:");
    for k in BackendKind::ALL {
        println!(
            "  {:<5} {}",
            k.name(),
            if k.compiled_in() {
                "yes"
            } else {
                "no (feature off)"
            }
        );
    }
    devices();
    let ranking = vramkv::device_ranking();
    if !ranking.is_empty() {
        println!("device ranking (most free memory first; the shards of a table over every GPU):");
        for (i, (ordinal, name, free)) in ranking.iter().enumerate() {
            println!(
                "  shard {i}: CUDA device {ordinal} ({name}), {:.1} GiB free",
                *free as f64 / (1u64 << 30) as f64
            );
        }
    }
    println!("availability, best first:");
    let avail = vramkv::availability();
    for (k, r) in &avail {
        match r {
            Ok(dev) => println!("  {k:<5} usable: {dev}"),
            Err(why) => println!("  {k:<5} skipped: {why}"),
        }
    }
    match avail.iter().find(|(_, r)| r.is_ok()) {
        Some((k, Ok(dev))) => println!(
            "auto picks: {k} ({dev}), the first usable backend in the order cuda, wgpu (discrete GPU), cpu"
        ),
        _ => println!("auto picks: nothing usable"),
    }
    if let Ok(v) = std::env::var(vramkv::BACKEND_ENV) {
        println!(
            "{}={v} forces that backend (no fallback)",
            vramkv::BACKEND_ENV
        );
    }
}

fn devices() {
    #[cfg(feature = "cuda")]
    match vramkv::cuda::devices() {
        Ok(devs) => {
            println!("CUDA devices, most free memory first:");
            for d in devs {
                println!(
                    "  [{}] {} — {:.1} GiB total, {:.1} GiB free",
                    d.ordinal,
                    d.name,
                    gib(d.total_bytes),
                    gib(d.free_bytes)
                );
            }
        }
        Err(e) => println!("CUDA devices: none ({e})"),
    }
    #[cfg(feature = "wgpu")]
    {
        let adapters = vramkv::wgpu::adapters();
        if adapters.is_empty() {
            println!("wgpu adapters: none");
        }
        for a in adapters {
            println!("wgpu adapter: {a}");
        }
    }
}

#[cfg(feature = "cuda")]
fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}
