//! `vramkv bench --durability`: what snapshots and the log cost, next to the disk's own
//! rates measured in the same run.
//!
//! 1. **The disk.** `dd` writes a file of the snapshot's size with `conv=fdatasync`, and
//!    reads it back after its pages are dropped from the page cache
//!    (`posix_fadvise(DONTNEED)`): the sequential write and read rates.
//! 2. **Snapshot and load.** A table of `--items` u64 → `[u64; width]` entries is filled,
//!    saved (`vramkv::save`: the export, while the table is held, then the write, fsync
//!    and rename), its file's pages dropped likewise, and loaded into a new table on the
//!    same backend (`vramkv::open_snapshot`: read, checksums, restore). Rates are the
//!    file's bytes over the wall time, and the loaded table is checked against the saved
//!    one.
//! 3. **The log's cost on PUT.** For each batch size of `--log-items`, PUT throughput of
//!    `--batches` batches of new random keys into a plain table and into durable tables
//!    under each fsync policy (`no`, `everysec`, `always`); medians after the first batch.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use vramkv::durable::{DurableTable, Fsync, LogConfig};
use vramkv::{Error, KvBackend, Options, Result, TableConfig};

/// What the bench measured; printed as a table and, with `--json`, as one object.
#[derive(serde::Serialize)]
struct Report {
    backend: String,
    dir: String,
    entries: usize,
    width: usize,
    file_bytes: u64,
    disk_write_gbs: Option<f64>,
    disk_read_gbs: Option<f64>,
    export_s: f64,
    save_s: f64,
    load_s: f64,
    save_gbs: f64,
    load_gbs: f64,
    log: Vec<LogRow>,
}

#[derive(serde::Serialize)]
struct LogRow {
    items: usize,
    policy: &'static str,
    put_mops: f64,
    ratio: f64,
}

fn io(what: &str, p: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", p.display()), e)
}

/// Drops `path`'s pages from the page cache (they are clean after an fsync), so that the
/// next read comes from the disk.
fn drop_cache(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| io("opening", path, e))?;
    f.sync_all().map_err(|e| io("syncing", path, e))?;
    // SAFETY: a valid open descriptor; posix_fadvise only reads its arguments.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io(
            "dropping the cached pages of",
            path,
            std::io::Error::from_raw_os_error(r),
        ));
    }
    Ok(())
}

/// The rate `dd` prints on its last line, in GB/s (`None` when dd is missing or prints
/// something else).
fn dd(args: &[String]) -> Option<f64> {
    let out = Command::new("dd").args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().last()?;
    let rate = line.rsplit(',').next()?.trim();
    let (num, unit) = rate.split_once(' ')?;
    let v: f64 = num.replace(',', ".").parse().ok()?;
    let scale = match unit {
        "GB/s" => 1.0,
        "MB/s" => 1e-3,
        "kB/s" => 1e-6,
        "GiB/s" => 1.073_741_824,
        "MiB/s" => 1.048_576e-3,
        _ => return None,
    };
    Some(v * scale)
}

/// The disk's sequential write and read rates over a file of `bytes` bytes in `dir`.
fn disk_rates(dir: &Path, bytes: u64) -> Result<(Option<f64>, Option<f64>)> {
    let path = dir.join("vramkv-dd.tmp");
    let mib = bytes.div_ceil(1 << 20).max(1);
    let write = dd(&[
        "if=/dev/zero".into(),
        format!("of={}", path.display()),
        "bs=1M".into(),
        format!("count={mib}"),
        "conv=fdatasync".into(),
    ]);
    let read = if path.exists() {
        drop_cache(&path)?;
        dd(&[
            format!("if={}", path.display()),
            "of=/dev/null".into(),
            "bs=1M".into(),
        ])
    } else {
        None
    };
    let _ = std::fs::remove_file(&path);
    Ok((write, read))
}

/// Puts `entries` distinct keys, in batches of 16M.
fn fill(
    table: &dyn KvBackend,
    entries: usize,
    width: usize,
    seed: u64,
    bar: &ProgressBar,
) -> Result<()> {
    let chunk = 1 << 24;
    let mut start = 0;
    while start < entries {
        let n = chunk.min(entries - start);
        // Distinct keys: multiplying by an odd constant is a bijection of u64.
        let keys: Vec<u64> = (0..n as u64)
            .map(|i| (start as u64 + i).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed)
            .collect();
        let values: Vec<u64> = keys
            .iter()
            .flat_map(|&k| (0..width as u64).map(move |j| k ^ j))
            .collect();
        table.put(&keys, &values)?;
        start += n;
        bar.set_message(format!("filling: {start} of {entries}"));
    }
    Ok(())
}

/// Runs the bench of `a` on the backend `options` choose; `false` when the loaded table
/// differs from the saved one.
pub fn run(a: &crate::BenchArgs, options: &Options) -> Result<bool> {
    let (entries, width, batches, seed, json) = (a.items, a.width(), a.batches, a.seed, a.json);
    let log_items = &a.log_items;
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir: PathBuf = dir.join(format!("vramkv-durability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| io("creating", &dir, e))?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));

    let cfg = TableConfig::new(entries).width(width).seed(seed);
    let table = vramkv::open_with(cfg.clone(), options)?;
    let backend = format!(
        "{} on {}",
        table.describe().backend,
        table.describe().device
    );
    fill(&table, entries, width, seed, &bar)?;
    let path = dir.join("bench.vkv");
    bar.set_message("saving");
    let t0 = Instant::now();
    let saved = vramkv::save(&path, &table, &cfg)?;
    let save_s = t0.elapsed().as_secs_f64();
    drop_cache(&path)?;
    bar.set_message("loading");
    let t0 = Instant::now();
    let loaded = vramkv::open_snapshot(&path, options)?;
    let load_s = t0.elapsed().as_secs_f64();
    bar.set_message("checking the loaded table");
    let ok = loaded.len() == table.len() && {
        let probe: Vec<u64> = (0..1_000_000.min(entries) as u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed)
            .collect();
        let (mut a, mut fa) = (vec![0; probe.len() * width], vec![false; probe.len()]);
        let (mut b, mut fb) = (a.clone(), fa.clone());
        table.get(&probe, &mut a, &mut fa)?;
        loaded.get(&probe, &mut b, &mut fb)?;
        a == b && fa == fb && fa.iter().all(|&f| f)
    };
    drop(loaded);
    drop(table);
    let _ = std::fs::remove_file(&path);
    bar.set_message("the disk's rates (dd)");
    let (disk_w, disk_r) = disk_rates(&dir, saved.bytes)?;

    let mut log = Vec::new();
    for &items in log_items.iter() {
        let mut base = None;
        for policy in [
            None,
            Some(Fsync::No),
            Some(Fsync::EverySec),
            Some(Fsync::Always),
        ] {
            let name = match policy {
                None => "no log",
                Some(Fsync::No) => "no",
                Some(Fsync::EverySec) => "everysec",
                Some(Fsync::Always) => "always",
            };
            bar.set_message(format!("PUT with the log: {items} items, {name}"));
            let cfg = TableConfig::new(items * batches + items)
                .width(width)
                .seed(seed);
            let ldir = dir.join(format!("log-{items}-{name}"));
            let open = |c: TableConfig| -> Result<Box<dyn KvBackend>> {
                Ok(Box::new(vramkv::open_with(c, options)?))
            };
            let t: Box<dyn KvBackend> = match policy {
                None => open(cfg)?,
                Some(p) => Box::new(
                    DurableTable::open(&ldir, cfg, LogConfig::new(p).rewrite_bytes(0), &open)?.0,
                ),
            };
            let mut rng = StdRng::seed_from_u64(seed ^ items as u64);
            let mut times = Vec::new();
            for _ in 0..batches {
                let keys: Vec<u64> = (0..items).map(|_| rng.random()).collect();
                let values: Vec<u64> = keys
                    .iter()
                    .flat_map(|&k| (0..width as u64).map(move |j| k ^ j))
                    .collect();
                let t0 = Instant::now();
                t.put(&keys, &values)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            drop(t);
            let _ = std::fs::remove_dir_all(&ldir);
            let mut steady = times[1.min(times.len() - 1)..].to_vec();
            steady.sort_by(f64::total_cmp);
            let mops = items as f64 / steady[steady.len() / 2] / 1e6;
            let b = *base.get_or_insert(mops);
            log.push(LogRow {
                items,
                policy: name,
                put_mops: (mops * 10.0).round() / 10.0,
                ratio: (mops / b * 1000.0).round() / 1000.0,
            });
        }
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&dir);

    let gb = saved.bytes as f64 / 1e9;
    let r = Report {
        backend,
        dir: dir.parent().unwrap_or(&dir).display().to_string(),
        entries,
        width,
        file_bytes: saved.bytes,
        disk_write_gbs: disk_w,
        disk_read_gbs: disk_r,
        export_s: saved.export_secs,
        save_s,
        load_s,
        save_gbs: gb / save_s,
        load_gbs: gb / load_s,
        log,
    };
    if json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        print(&r);
    }
    if !ok {
        eprintln!("the loaded table differs from the saved one");
    }
    Ok(ok)
}

fn print(r: &Report) {
    let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}"));
    println!("backend {}, files in {}", r.backend, r.dir);
    println!(
        "snapshot of {} entries (width {}): {:.2} GB",
        r.entries,
        r.width,
        r.file_bytes as f64 / 1e9
    );
    println!("| what | seconds | GB/s | disk (dd) GB/s | ratio |");
    println!("|---|---|---|---|---|");
    let ratio = |a: f64, d: Option<f64>| d.map_or("n/a".into(), |d| format!("{:.2}", a / d));
    println!(
        "| save (export {:.3} s, then write, fsync, rename) | {:.3} | {:.2} | {} | {} |",
        r.export_s,
        r.save_s,
        r.save_gbs,
        f(r.disk_write_gbs),
        ratio(r.save_gbs, r.disk_write_gbs)
    );
    println!(
        "| load (read, checksums, restore) | {:.3} | {:.2} | {} | {} |",
        r.load_s,
        r.load_gbs,
        f(r.disk_read_gbs),
        ratio(r.load_gbs, r.disk_read_gbs)
    );
    println!();
    println!("| items per batch | log | PUT M/s | vs no log |");
    println!("|---|---|---|---|");
    for l in &r.log {
        println!(
            "| {} | {} | {:.1} | {:.3} |",
            l.items, l.policy, l.put_mops, l.ratio
        );
    }
}
