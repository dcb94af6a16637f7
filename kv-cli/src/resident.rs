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
    pub slots: usize,
    pub insert_gops: f64,
    pub find_gops: f64,
    pub bytes_per_entry: f64,
    pub found: usize,
}

fn drv(e: vramkv::cuda::cudarc::driver::DriverError) -> Error {
    Error::driver("cuda", e.to_string(), e)
}

fn median(mut xs: Vec<f64>) -> f64 {
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
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
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
            slots: d.slots,
            insert_gops: median(ins),
            find_gops: median(fin),
            bytes_per_entry: d.bytes_in_use as f64 / n as f64,
            found: found_count,
        });
    }
    Ok(rows)
}
