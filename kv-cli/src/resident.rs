//! `vramkv bench --resident`: device-resident insert and find on the CUDA backend, keys
//! and values already in VRAM, at several occupancies (the comparison with cuCollections'
//! `static_map` bulk insert and find).

use crate::workload::mix;
use std::time::Instant;
use vramkv::cuda::{CudaBackend, CudaOptions};
use vramkv::{Error, KvBackend, Result, TableConfig};

/// One occupancy's result.
pub struct Row {
    pub occupancy: f64,
    pub keys: usize,
    pub insert_gops: f64,
    pub find_gops: f64,
    pub bytes_per_entry: f64,
    pub found: usize,
}

fn drv(e: vramkv::cuda::cudarc::driver::DriverError) -> Error {
    Error::driver("cuda", e.to_string(), e)
}

/// Bytes that one insert and one find of a `width`-word row must move between the SMs and
/// HBM in the table's layout (`kv_kernels::layout::bucket_shift`), counted in 32-byte
/// sectors, the unit DRAM is read and written in: the key (and row) streamed in and out,
/// the key's sector read (and, by an insert, written back), and the row's sectors (read
/// by a find; written by an insert, and read first where the row covers a sector only in
/// part). A probe that needs more than one window, and every cache miss of the streams,
/// moves more: this is a floor of the traffic, so the rate it allows is a ceiling.
pub fn bytes_per_op(width: usize) -> (f64, f64) {
    const SECTOR: usize = 32;
    let w = width;
    if w == 1 {
        // Buckets of two: both keys and both values in one sector.
        return ((16 + 2 * SECTOR) as f64, (8 + SECTOR + 8 + 1) as f64);
    }
    // Buckets of four: the four keys' sector, then the rows; averaged over the bucket's
    // four rows, which start at byte 32 + 8 * w * s of a sector-aligned bucket.
    let (mut touched, mut partial) = (0usize, 0usize);
    for s in 0..4 {
        let (start, end) = (SECTOR + 8 * w * s, SECTOR + 8 * w * (s + 1));
        for sector in start / SECTOR..end.div_ceil(SECTOR) {
            touched += 1;
            let (a, b) = (sector * SECTOR, (sector + 1) * SECTOR);
            if start > a || end < b {
                partial += 1;
            }
        }
    }
    let (touched, partial) = (touched as f64 / 4.0, partial as f64 / 4.0);
    let sector = SECTOR as f64;
    let row = 8.0 * w as f64;
    let insert = 8.0 + row + 2.0 * sector + (touched + partial) * sector;
    let find = 8.0 + sector + touched * sector + row + 1.0;
    (insert, find)
}

/// The device's copy rate in GB/s, read plus write: the median of 5 device-to-device
/// copies of 1 GiB after a warm-up.
pub fn hbm_copy_gbs(
    stream: &std::sync::Arc<vramkv::cuda::cudarc::driver::CudaStream>,
) -> Result<f64> {
    let words = 1usize << 27;
    let src = stream.alloc_zeros::<u64>(words).map_err(drv)?;
    let mut dst = stream.alloc_zeros::<u64>(words).map_err(drv)?;
    let mut rates = Vec::new();
    for r in 0..6 {
        stream.synchronize().map_err(drv)?;
        let t0 = Instant::now();
        stream.memcpy_dtod(&src, &mut dst).map_err(drv)?;
        stream.synchronize().map_err(drv)?;
        if r > 0 {
            rates.push(2.0 * (words * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9);
        }
    }
    Ok(median(rates))
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The largest power-of-two slot count that holds at most `items` keys at 0.74.
pub fn slots_for_items(items: usize) -> usize {
    let mut s = 16usize;
    while let Some(d) = s.checked_mul(2)
        && (d as f64 * 0.74) <= items as f64
    {
        s = d;
    }
    s
}

/// The order of the keys handed to one insert and one find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrder {
    /// As generated: every probe lands on a random line of the table.
    Random,
    /// Stably grouped by the region (of `slots / regions` slots) of the key's home slot:
    /// what a batch partitioned by table region looks like to the kernels, so that each part
    /// of the table is probed while it sits in L2. The partitioning itself is not timed.
    Regions(usize),
}

impl std::str::FromStr for KeyOrder {
    type Err = String;

    /// `random`, `regions=N` (N a power of two) or `slot` (sorted by home slot).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "random" => Ok(KeyOrder::Random),
            "slot" => Ok(KeyOrder::Regions(usize::MAX)),
            _ => s
                .strip_prefix("regions=")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| n.is_power_of_two())
                .map(KeyOrder::Regions)
                .ok_or_else(|| {
                    format!("expected random, slot or regions=N (N a power of two), got {s:?}")
                }),
        }
    }
}

/// The hash seed of the benchmark's tables unless `--seed` says otherwise: fixed, so that
/// `--key-order` can sort keys by their home slot and runs place keys alike.
pub const SEED: u64 = 0x243f_6a88_85a3_08d3;

/// Stably sorts `keys` by the region of their home slot in a table of `slots` slots.
fn order_keys(keys: &mut [u64], slots: usize, order: KeyOrder, seed: u64) {
    use rayon::slice::ParallelSliceMut;
    let KeyOrder::Regions(regions) = order else {
        return;
    };
    let mask = slots as u64 - 1;
    let shift = (slots / regions.min(slots)).trailing_zeros();
    keys.par_sort_by_key(|&k| kv_kernels::layout::home_slot(k, seed, mask) >> shift);
}

/// Runs the resident benchmark at each occupancy of a table of `slots` slots whose hash
/// seed is `seed`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    slots: usize,
    occupancies: &[f64],
    width: usize,
    reps: usize,
    device: Option<usize>,
    order: KeyOrder,
    seed: u64,
    options: &CudaOptions,
) -> Result<(Vec<Row>, f64)> {
    let mut rows = Vec::new();
    let mut hbm = 0.0;
    for &occ in occupancies {
        let n = (occ * slots as f64).floor() as usize;
        let mut cfg = TableConfig::new(n)
            .max_load_factor(occ)
            .width(width)
            .growth(false)
            .seed(seed);
        cfg.device = device;
        let t = CudaBackend::open_with(cfg, options)?;
        let stream = t.new_stream()?;
        if rows.is_empty() {
            hbm = hbm_copy_gbs(&stream)?;
        }
        // Two key sets, used in turn, so that no repetition finds the last one's lines in L2.
        let sets: Vec<_> = (0..2u64)
            .map(|s| {
                let mut keys: Vec<u64> = (0..n as u64).map(|i| mix(i ^ (s << 62))).collect();
                order_keys(&mut keys, slots, order, seed);
                stream.clone_htod(&keys).map_err(drv)
            })
            .collect::<Result<_>>()?;
        let vals: Vec<u64> = (0..(n * width) as u64).collect();
        let vals = stream.clone_htod(&vals).map_err(drv)?;
        let mut out = stream.alloc_zeros::<u64>(n * width).map_err(drv)?;
        let mut found = stream.alloc_zeros::<u8>(n).map_err(drv)?;
        stream.synchronize().map_err(drv)?;
        let (mut ins, mut fin) = (Vec::new(), Vec::new());
        let mut found_count = 0;
        // One warm-up round (module load, first touch), then `reps` timed rounds.
        for r in 0..=reps {
            let keys = &sets[r % 2];
            t.clear()?;
            let t0 = Instant::now();
            t.put_device(keys, &vals)?;
            let put = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            t.get_device(keys, &mut out, &mut found)?;
            let get = t0.elapsed().as_secs_f64();
            if r > 0 {
                ins.push(n as f64 / put / 1e9);
                fin.push(n as f64 / get / 1e9);
            }
            let f: Vec<u8> = stream.clone_dtoh(&found).map_err(drv)?;
            found_count = f.iter().filter(|&&x| x == 1).count();
            if found_count != n || t.len() != n {
                return Err(Error::device(
                    "bench",
                    format!(
                        "resident validation failed at occupancy {occ}: {found_count} of {n} keys found, len {}",
                        t.len()
                    ),
                ));
            }
        }
        let d = t.describe();
        rows.push(Row {
            occupancy: occ,
            keys: n,
            insert_gops: median(ins),
            find_gops: median(fin),
            bytes_per_entry: d.bytes_in_use as f64 / n as f64,
            found: found_count,
        });
    }
    Ok((rows, hbm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_op_counts_sectors() {
        // Width 1: one sector holds the bucket's keys and values.
        assert_eq!(bytes_per_op(1), (80.0, 49.0));
        // Width 2: each 16-byte row covers half a sector, read before it is written.
        assert_eq!(
            bytes_per_op(2),
            (8.0 + 16.0 + 64.0 + 64.0, 8.0 + 32.0 + 32.0 + 16.0 + 1.0)
        );
        // Widths 4 and 16: rows of whole sectors.
        assert_eq!(bytes_per_op(4), (136.0, 105.0));
        assert_eq!(bytes_per_op(16), (328.0, 297.0));
    }
}
