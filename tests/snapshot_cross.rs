//! Snapshots move between backends: a table written by each backend of this build (a
//! fixed-width table, an LRU cache table with scores and expiry times, a byte table) is
//! loaded into every backend, and each loaded table exports exactly what was saved.
//!
//! One trial per writing backend; inside it, every reading backend that can run here. A
//! backend that cannot run prints `skipped: ...`; one that is required
//! (`VRAMKV_REQUIRE_CUDA`, `VRAMKV_REQUIRE_WGPU`) and missing fails.

mod common;

use std::path::PathBuf;

use libtest_mimic::{Arguments, Failed};
use vramkv::{
    BackendKind, BinaryBuf, ByteConfig, ByteTable, CacheConfig, CachePolicy, CachePut, Clock,
    Error, KvBackend, Options, SystemClock, TableConfig,
};

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vramkv-cross-{}-{name}", std::process::id()))
}

fn fixed_cfg() -> TableConfig {
    TableConfig::new(40_000).width(3).seed(17)
}

fn cache_cfg() -> TableConfig {
    TableConfig::new(8192)
        .width(2)
        .seed(5)
        .cache(CacheConfig::new(CachePolicy::Lru))
}

fn byte_cfg() -> ByteConfig {
    ByteConfig::new(5000).max_value_bytes(1 << 16)
}

fn required(kind: BackendKind) -> bool {
    let var = format!("VRAMKV_REQUIRE_{}", kind.name().to_uppercase());
    std::env::var_os(var).is_some_and(|v| v != "0")
}

/// Opens with `open` on `kind`, or says why the backend cannot run here (`Ok(None)`).
fn on<T>(
    kind: BackendKind,
    open: impl FnOnce(&Options) -> vramkv::Result<T>,
) -> Result<Option<T>, Failed> {
    match open(&Options::default().backend(kind)) {
        Ok(t) => Ok(Some(t)),
        Err(e @ (Error::Unsupported { .. } | Error::BackendUnavailable { .. }))
            if !required(kind) =>
        {
            println!("skipped: reading with {kind}: {e}");
            Ok(None)
        }
        Err(e) => Err(format!("opening on {kind}: {e}").into()),
    }
}

fn sorted(t: &dyn KvBackend) -> Result<vramkv::TableImage, Failed> {
    let mut i = t.export().map_err(|e| format!("export: {e}"))?;
    i.sort();
    Ok(i)
}

fn cross(writer: BackendKind) -> Result<(), Failed> {
    let dir = scratch(writer.name());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let wopt = Options::default().backend(writer);
    let readers: Vec<BackendKind> = BackendKind::ALL
        .into_iter()
        .filter(|k| k.compiled_in())
        .collect();

    // A fixed-width table: edge keys, overwrites and deletes.
    let cfg = fixed_cfg();
    let t = vramkv::open_with(cfg.clone(), &wopt).map_err(|e| e.to_string())?;
    let keys: Vec<u64> = (0..30_000u64)
        .map(|i| (i + 2).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .chain([0, 1, u64::MAX, u64::MAX - 1])
        .collect();
    let vals: Vec<u64> = keys
        .iter()
        .flat_map(|&k| [k, !k, k.rotate_left(9)])
        .collect();
    t.put(&keys, &vals).map_err(|e| e.to_string())?;
    t.delete(&keys[..5000]).map_err(|e| e.to_string())?;
    let path = dir.join("fixed.vkv");
    vramkv::save(&path, &t, &cfg).map_err(|e| format!("save: {e}"))?;
    let want = sorted(&t)?;
    for &r in &readers {
        let Some(u) = on(r, |o| vramkv::open_snapshot(&path, o))? else {
            continue;
        };
        if sorted(&u)? != want {
            return Err(format!("{writer} → {r}: the fixed-width table differs").into());
        }
        println!("fixed-width: {writer} → {r}: {} entries", u.len());
    }

    // An LRU cache table: scores from several batches and gets, expiry times.
    let cfg = cache_cfg();
    let c = vramkv::open_with(cfg.clone(), &wopt).map_err(|e| e.to_string())?;
    for b in 0..4u64 {
        let keys: Vec<u64> = (b * 1000..b * 1000 + 1500).collect();
        let vals: Vec<u64> = keys.iter().flat_map(|&k| [k, b]).collect();
        let ttl: Vec<u64> = keys
            .iter()
            .map(|k| if k % 5 == 0 { 3_600_000 } else { 0 })
            .collect();
        c.put_cached(CachePut::new(&keys, &vals).ttl_ms(&ttl))
            .map_err(|e| e.to_string())?;
        let (mut v, mut f) = (vec![0; 400], vec![false; 200]);
        c.get(&keys[..200], &mut v, &mut f)
            .map_err(|e| e.to_string())?;
    }
    let path = dir.join("cache.vkv");
    vramkv::save(&path, &c, &cfg).map_err(|e| format!("save: {e}"))?;
    let want = sorted(&c)?;
    for &r in &readers {
        let Some(u) = on(r, |o| vramkv::open_snapshot(&path, o))? else {
            continue;
        };
        let got = sorted(&u)?;
        if (&got.keys, &got.values, &got.scores, &got.expires)
            != (&want.keys, &want.values, &want.scores, &want.expires)
        {
            return Err(format!("{writer} → {r}: the cache table differs").into());
        }
        if u.cache_stats().map_err(|e| e.to_string())?.evicted != 0 {
            return Err(format!("{writer} → {r}: loading evicted entries").into());
        }
        println!("cache: {writer} → {r}: {} entries", u.len());
    }

    // A byte table, where the backend has one.
    let bcfg = byte_cfg();
    let b = match vramkv::open_bytes_with(bcfg.clone(), &wopt) {
        Ok(b) => b,
        Err(e @ Error::Unsupported { .. }) => {
            println!("skipped: {writer} byte tables: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.to_string().into()),
    };
    let keys: Vec<Vec<u8>> = (0..3000u32)
        .map(|i| format!("user:{i}:profile").into_bytes())
        .collect();
    let vals: Vec<Vec<u8>> = (0..3000usize)
        .map(|i| vec![(i % 251) as u8; (i * 37) % 5000])
        .collect();
    let ttl: Vec<u64> = (0..3000u64)
        .map(|i| if i % 3 == 0 { 3_600_000 } else { 0 })
        .collect();
    let (kb, vb) = (BinaryBuf::from_slices(&keys), BinaryBuf::from_slices(&vals));
    b.put_ttl(kb.as_binary(), vb.as_binary(), &ttl)
        .map_err(|e| e.to_string())?;
    let path = dir.join("bytes.vkv");
    vramkv::save_bytes(&path, &b, &bcfg).map_err(|e| format!("save: {e}"))?;
    let mut want = b.export().map_err(|e| e.to_string())?;
    want.sort();
    let now = SystemClock::new().now_ms();
    for &r in &readers {
        let Some(u) = on(r, |o| vramkv::open_bytes_snapshot(&path, o))? else {
            continue;
        };
        let mut got = u.export().map_err(|e| e.to_string())?;
        got.sort();
        if (&got.keys, &got.values) != (&want.keys, &want.values) {
            return Err(format!("{writer} → {r}: the byte table differs").into());
        }
        // Expiry times come back to the millisecond they were, give or take the time the
        // load took.
        for (a, b) in got.expires.iter().zip(&want.expires) {
            if (*a == 0) != (*b == 0) || a.abs_diff(*b) > 60_000 {
                return Err(format!("{writer} → {r}: expiry {a} for {b}").into());
            }
        }
        println!("bytes: {writer} → {r}: {} entries (now {now})", u.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let probe = |kind: BackendKind| {
        vramkv::open_with(TableConfig::new(16), &Options::default().backend(kind)).map(|_| ())
    };
    let trials = common::per_backend("snapshot_cross", "table", probe, cross);
    libtest_mimic::run(&args, trials).exit();
}
