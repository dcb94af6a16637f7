//! `vramkv bench --cache --resident`: a CUDA cache table's device-resident `put_and_evict`
//! and find (get), batches already in VRAM, as HierarchicalKV's benchmark measures its
//! `insert_and_evict` and `find`: an LRU table of width-`--width` rows filled to load 1.0,
//! then batches of `--items` new keys put on the full table, and batches of `--items` keys of
//! which 60 % are in the table. Each rate is the median over `--reps` batches (at least 5)
//! after two warm-up batches, each batch on keys of its own (rotating inputs), timed by
//! CUDA events on the table's stream (`CudaCache::last_batch_ms`).

use vramkv::cuda::cudarc::driver::{CudaSlice, CudaStream, DriverError};
use vramkv::cuda::{CudaCache, CudaOptions, DeviceCachePut, DeviceEvicted};
use vramkv::{CacheConfig, CachePolicy, Error, KvBackend, Result, TableConfig};

use crate::resident::{hbm_copy_gbs, median};
use crate::workload::mix;

/// The share of a find batch's keys that are in the table.
pub const FIND_HIT: f64 = 0.6;

/// Warm-up batches before the timed ones.
const WARMUP: usize = 2;

fn drv(e: DriverError) -> Error {
    Error::driver("cuda", e.to_string(), e)
}

/// The figures of one run.
pub struct Report {
    pub capacity: usize,
    pub load: f64,
    pub batch: usize,
    pub width: usize,
    pub reps: usize,
    pub put_gops: f64,
    pub find_gops: f64,
    pub found: f64,
    pub hbm_gbs: f64,
}

/// Bytes that one `put_and_evict` of a new key into a full bucket and one find must move
/// between the SMs and HBM, counted in 32-byte sectors: a floor of the traffic, so the
/// rate it allows is a ceiling. A put: the key and row in; the bucket's used and lock
/// words (read and written); its 32 keys, expiry times and scores (three 256-byte reads);
/// the slot's key, score and expiry sectors written; the victim's row read and the new
/// row written; the evicted key, score, expiry time and row out. A find: the key in; the
/// bucket's used word and 32 keys; the row out and the found byte; and for a hit (a share
/// `hit`), the entry's expiry sector, its row, and its score's sector read and written (an
/// LRU access). The dedup pass's batch-local tables live in L2 and are not counted.
pub fn bytes_per_op(width: usize, hit: f64) -> (f64, f64) {
    const SECTOR: f64 = 32.0;
    let row = (8 * width) as f64;
    let row_sectors = (row / SECTOR).ceil() * SECTOR;
    let put =
        8.0 + row + 4.0 * SECTOR + 3.0 * 256.0 + 3.0 * SECTOR + 2.0 * row_sectors + 3.0 * 8.0 + row;
    let find = 8.0 + SECTOR + 256.0 + row + 1.0 + hit * (SECTOR + row_sectors + 2.0 * SECTOR);
    (put, find)
}

/// `n` keys of stream `set` (distinct across sets and from each other).
/// `set` must stay below `1 << 24` (it is shifted left by 40 bits).
fn keys_of(set: u64, n: usize) -> Vec<u64> {
    debug_assert!(set < 1 << 24, "key set {set} would wrap");
    (0..n as u64).map(|i| mix(i ^ (set << 40))).collect()
}

/// Uploads `keys` to the device.
fn upload(s: &std::sync::Arc<CudaStream>, keys: &[u64]) -> Result<CudaSlice<u64>> {
    s.clone_htod(keys).map_err(drv)
}

/// Runs the benchmark on a table of `capacity` slots (rounded to whole buckets).
pub fn run(
    capacity: usize,
    batch: usize,
    width: usize,
    reps: usize,
    device: Option<usize>,
    options: &CudaOptions,
) -> Result<Report> {
    let reps = reps.max(5);
    let mut cfg = TableConfig::new(capacity)
        .width(width)
        .cache(CacheConfig::new(CachePolicy::Lru));
    cfg.device = device;
    let t = CudaCache::open_with(cfg, options)?;
    let s = t.new_stream()?;
    let hbm_gbs = hbm_copy_gbs(&s)?;
    let cap = t.capacity();
    let vals: Vec<u64> = (0..(batch * width) as u64).collect();
    let vals = upload(&s, &vals)?;
    // Fill: batches of new keys until the table is full (a bucket takes keys until its 32
    // slots are used, so a load of 1.0 needs more keys than slots), at most 8 times its
    // slots. Sets from 1 << 20 on: never used by the timed batches.
    let mut set = 1u64 << 20;
    let mut put_keys = 0usize;
    while t.len() < cap && put_keys < 8 * cap {
        for _ in 0..8 {
            let keys = upload(&s, &keys_of(set, batch))?;
            t.put_cached_device(&DeviceCachePut::new(&keys, &vals))?;
            set += 1;
            put_keys += batch;
        }
    }
    let load = t.len() as f64 / cap as f64;
    // put_and_evict of new keys on the full table: every key enters (evicting) or is turned
    // away, so evictions plus the change of len() are the batch's keys.
    let rounds = WARMUP + reps;
    let mut ek = s.alloc_zeros::<u64>(batch).map_err(drv)?;
    let mut er = s.alloc_zeros::<u64>(batch * width).map_err(drv)?;
    let mut es = s.alloc_zeros::<u64>(batch).map_err(drv)?;
    let mut put_rates = Vec::new();
    for r in 0..rounds {
        let keys = upload(&s, &keys_of(r as u64 + 1, batch))?;
        let before = t.len();
        let m = t.put_and_evict_device(
            &DeviceCachePut::new(&keys, &vals),
            &mut DeviceEvicted::new(&mut ek, &mut er, &mut es),
        )?;
        let ms = t.last_batch_ms()?;
        let after = t.len();
        if m + after.saturating_sub(before) != batch || after < before {
            return Err(Error::device(
                "bench",
                format!(
                    "put_and_evict validation failed: {batch} new keys, {m} evicted, len {before} -> {after}"
                ),
            ));
        }
        if r >= WARMUP {
            put_rates.push(batch as f64 / (ms as f64 / 1e3) / 1e9);
        }
    }
    // Finds: 60 % of each batch from the keys of one of the put batches above (in the
    // table, but for the few a later key of their own batch evicted), the rest never put.
    let mut out = s.alloc_zeros::<u64>(batch * width).map_err(drv)?;
    let mut found = s.alloc_zeros::<u8>(batch).map_err(drv)?;
    let mut find_rates = Vec::new();
    let mut hits = Vec::new();
    for r in 0..rounds {
        let present = keys_of(r as u64 + 1, batch);
        // Sets from 1 << 22 on: never put (a set is shifted left by 40 bits, so it stays
        // below 1 << 24).
        let absent = keys_of(r as u64 + (1 << 22), batch);
        let keys: Vec<u64> = (0..batch)
            .map(|j| {
                if (mix(j as u64 ^ r as u64) % 1000) < (FIND_HIT * 1000.0) as u64 {
                    present[j]
                } else {
                    absent[j]
                }
            })
            .collect();
        let want = keys.iter().zip(&present).filter(|(k, p)| k == p).count();
        let keys = upload(&s, &keys)?;
        t.get_device(&keys, &mut out, &mut found)?;
        let ms = t.last_batch_ms()?;
        let f: Vec<u8> = s.clone_dtoh(&found).map_err(drv)?;
        let got = f.iter().filter(|&&x| x == 1).count();
        // A key of the present share may have been evicted by a later key of its batch;
        // nothing else may be missing, and nothing absent may be found.
        if got > want || (got as f64) < 0.99 * want as f64 {
            return Err(Error::device(
                "bench",
                format!("find validation failed: {got} found of {want} present keys"),
            ));
        }
        if r >= WARMUP {
            find_rates.push(batch as f64 / (ms as f64 / 1e3) / 1e9);
            hits.push(got as f64 / batch as f64);
        }
    }
    Ok(Report {
        capacity: cap,
        load,
        batch,
        width,
        reps,
        put_gops: median(put_rates),
        find_gops: median(find_rates),
        found: median(hits),
        hbm_gbs,
    })
}

/// Prints a report with the HBM bound next to the rates.
pub fn print(r: &Report) {
    println!(
        "cache table, device-resident on cuda: LRU, {} slots at load {:.3}, width {}, batches of {} keys, median of {} after {WARMUP} warm-up (CUDA events)",
        r.capacity, r.load, r.width, r.batch, r.reps
    );
    let (put_b, find_b) = bytes_per_op(r.width, FIND_HIT);
    let (put_bound, find_bound) = (r.hbm_gbs / put_b, r.hbm_gbs / find_b);
    println!(
        "  put_and_evict  {:>7.3} G keys/s   (bound {put_bound:.2}: {put_b:.0} B a key; {:.2} of it)",
        r.put_gops,
        r.put_gops / put_bound
    );
    println!(
        "  find           {:>7.3} G keys/s   (bound {find_bound:.2}: {find_b:.0} B a key; {:.2} of it; {:.1} % found)",
        r.find_gops,
        r.find_gops / find_bound,
        100.0 * r.found
    );
    println!(
        "bound: HBM copy {:.0} GB/s (read + write) over the bytes a key must move",
        r.hbm_gbs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_op_counts_sectors() {
        // Width 4: a 32-byte row is one sector.
        let (put, find) = bytes_per_op(4, 0.6);
        assert_eq!(put, 8.0 + 32.0 + 128.0 + 768.0 + 96.0 + 64.0 + 24.0 + 32.0);
        assert!((find - (8.0 + 32.0 + 256.0 + 32.0 + 1.0 + 0.6 * 128.0)).abs() < 1e-9);
        // Width 1: an 8-byte row still costs its whole sector where it is read.
        assert_eq!(bytes_per_op(1, 0.0).1, 8.0 + 32.0 + 256.0 + 8.0 + 1.0);
    }
}
