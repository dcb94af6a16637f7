//! The stress suite: long random sequences and large batches against a
//! `std::collections::HashMap`, run on any backend with one macro call
//! ([`stress_main!`](crate::stress_main)).
//!
//! The shared trials are [`random_ops`] at each width of [`StressSizes::widths`],
//! [`last_wins_across_chunks`], [`tombstone_churn`], [`concurrent_readers_and_writers`] and
//! the adversarial-key trials ([`crafted_one_home`], [`crafted_churn`],
//! [`crafted_growth_and_full_load`], keys built with [`crafted_keys`] so that thousands share
//! one home slot); a backend adds its own trials (device-resident
//! batches, segments, out-of-memory, a throughput report, ...) as `extra`, written with the
//! helpers here ([`check`], [`Rng`], [`put_both`], ...). Sizes are a [`StressSizes`], so a
//! GPU backend can use batches of millions where a software adapter on two cores cannot.
//!
//! After every step [`check`] compares values, found flags, `contains` and `len` with the
//! model on a probe set, then asks the backend for its [`audit`](KvBackend::audit); a
//! backend that answers [`Error::Unsupported`] there is checked without it.
//!
//! Trials run one at a time unless `--test-threads` says otherwise: a GPU backend already
//! uses the whole device (or, on a software adapter, every core) for each batch.

use std::collections::HashMap;
use std::sync::Arc;

use kv_core::{Error, KvBackend, TableConfig};
use libtest_mimic::{Failed, Trial};

use crate::cases::Open;
use crate::{Availability, SplitMix64};

/// What a stress trial returns.
pub type R = Result<(), Failed>;

/// The reference the trials compare a table with: key → value row.
pub type Map = HashMap<u64, Vec<u64>>;

/// A backend's own stress trial: a name and a body.
pub type Extra = (&'static str, fn() -> R);

/// A [`SplitMix64`] with a key generator that mixes in the keys at both ends of the u64
/// range.
pub struct Rng(SplitMix64);

impl Rng {
    /// A generator from its seed (a failure reproduces from it).
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A key from `0..range`, with `0..3` and `u64::MAX - 2..=u64::MAX` (where backends
    /// keep their sentinels) mixed in, one key in sixteen.
    pub fn key(&mut self, range: u64) -> u64 {
        match self.next_u64() % 32 {
            0 => u64::MAX - self.next_u64() % 3,
            1 => self.next_u64() % 3,
            _ => self.next_u64() % range,
        }
    }
}

/// A failure from a backend error, with what was being done.
pub fn e(what: &str, err: Error) -> Failed {
    format!("{what}: {err}").into()
}

/// Opens a table, as a trial failure when it cannot.
pub fn open_table(open: &Open, cfg: TableConfig) -> Result<Box<dyn KvBackend>, Failed> {
    open(cfg).map_err(|x| e("open", x))
}

/// The table agrees with the model on `probe` (values, found flags, contains) and on
/// `len`, and its [`audit`](KvBackend::audit) agrees with itself where it has one.
pub fn check(t: &dyn KvBackend, m: &Map, probe: &[u64], ctx: &str) -> R {
    let w = t.width();
    let mut vals = vec![u64::MAX; probe.len() * w];
    let mut found = vec![false; probe.len()];
    t.get(probe, &mut vals, &mut found)
        .map_err(|x| e("get", x))?;
    let mut cont = vec![false; probe.len()];
    t.contains(probe, &mut cont).map_err(|x| e("contains", x))?;
    for (i, k) in probe.iter().enumerate() {
        let row = &vals[i * w..(i + 1) * w];
        match m.get(k) {
            Some(v) if !found[i] || row != &v[..] || !cont[i] => {
                return Err(format!(
                    "{ctx}: key {k:#x}: found {} {row:?} contains {}, expected {v:?}",
                    found[i], cont[i]
                )
                .into());
            }
            None if found[i] || cont[i] || row.iter().any(|x| *x != 0) => {
                return Err(format!(
                    "{ctx}: missing key {k:#x} reads found {} {row:?} contains {}",
                    found[i], cont[i]
                )
                .into());
            }
            _ => {}
        }
    }
    if t.len() != m.len() {
        return Err(format!("{ctx}: len {} expected {}", t.len(), m.len()).into());
    }
    check_audit(t, ctx)
}

/// The device's count of live keys and tombstones agrees with the host's books; passes
/// without checking on a backend whose `audit` is [`Error::Unsupported`].
pub fn check_audit(t: &dyn KvBackend, ctx: &str) -> R {
    match t.audit() {
        Ok(a) if a.agrees() => Ok(()),
        Ok(a) => Err(format!(
            "{ctx}: device counts {} keys {} tombstones, host {} / {}",
            a.device_live, a.device_tombstones, a.host_live, a.host_tombstones
        )
        .into()),
        Err(Error::Unsupported { .. }) => Ok(()),
        Err(x) => Err(e("audit", x)),
    }
}

/// Puts `keys` into the table and the model, word `j` of row `i` being `val(i, j)`.
pub fn put_both(
    t: &dyn KvBackend,
    m: &mut Map,
    keys: &[u64],
    val: impl Fn(usize, usize) -> u64,
) -> R {
    let w = t.width();
    let vals: Vec<u64> = (0..keys.len() * w).map(|x| val(x / w, x % w)).collect();
    t.put(keys, &vals).map_err(|x| e("put", x))?;
    for (i, k) in keys.iter().enumerate() {
        m.insert(*k, vals[i * w..(i + 1) * w].to_vec());
    }
    Ok(())
}

/// Deletes `keys` from the table and the model; fails unless the table removed as many as
/// the model did.
pub fn delete_both(t: &dyn KvBackend, m: &mut Map, keys: &[u64], ctx: &str) -> R {
    let got = t.delete(keys).map_err(|x| e("delete", x))?;
    let want = keys.iter().filter(|k| m.remove(*k).is_some()).count();
    if got != want {
        return Err(format!("{ctx}: deleted {got}, expected {want}").into());
    }
    Ok(())
}

/// One phase of [`random_ops`]: `rounds` batches of `1..=max_batch` keys from `0..range`.
#[derive(Debug, Clone, Copy)]
pub struct RandomOps {
    /// Batches in the phase.
    pub rounds: usize,
    /// The largest batch.
    pub max_batch: usize,
    /// Keys are drawn from `0..range` (plus the edge keys): small means many repeats.
    pub range: u64,
}

/// Last-wins batch of [`last_wins_across_chunks`]: `n` keys cycling over `distinct` ones.
#[derive(Debug, Clone, Copy)]
pub struct LastWins {
    /// Keys in the one put (make it several of the backend's staging chunks).
    pub n: usize,
    /// Distinct keys among them.
    pub distinct: u64,
    /// The table's initial capacity (small, so that the put grows it).
    pub initial_capacity: usize,
}

/// Insert/delete cycles of [`tombstone_churn`].
#[derive(Debug, Clone, Copy)]
pub struct Churn {
    /// The table's fixed capacity (growth off).
    pub capacity: usize,
    /// Fresh keys put, then deleted, per round.
    pub batch: usize,
    /// Rounds.
    pub rounds: usize,
}

/// Sizes of the adversarial-key trials ([`crafted_one_home`], [`crafted_churn`],
/// [`crafted_growth_and_full_load`]).
#[derive(Debug, Clone, Copy)]
pub struct Adversarial {
    /// Keys sharing one home slot (near the table's end, so the chain wraps) put in one batch.
    pub one_home: usize,
    /// The capacity of the table they go into.
    pub capacity: usize,
    /// Keys sharing slot 0 that are put, half deleted and put back at width 2, in a table
    /// of twice as many entries.
    pub churn: usize,
    /// Crafted keys per batch in the growth and full-load trial.
    pub batch: usize,
}

/// The hash seed of every table in the adversarial trials: the keys are computed for it.
pub const CRAFT_SEED: u64 = 0x5eed_0fad_5e75_a1c3;

/// `count` keys whose hashes under `seed` all have the low 32 bits `low`: in any table of
/// up to 2^32 slots they share one home slot (`low & mask`), whatever its size, so they
/// form one chain that growth does not split. None of them is `0..3` or
/// `u64::MAX - 2..=u64::MAX` (where backends keep sentinels), so every one is in the chain.
///
/// ```
/// use kv_conformance::stress::crafted_keys;
/// use kv_kernels::layout::home_slot;
/// let keys = crafted_keys(u32::MAX, 100, 7);
/// assert!(keys.iter().all(|&k| home_slot(k, 7, 1023) == 1023));
/// assert!(keys.iter().all(|&k| home_slot(k, 7, (1 << 20) - 1) == (1 << 20) - 1));
/// ```
pub fn crafted_keys(low: u32, count: usize, seed: u64) -> Vec<u64> {
    (1u64..)
        .map(|hi| kv_kernels::layout::unhash(hi << 32 | u64::from(low), seed))
        .filter(|k| (3..u64::MAX - 2).contains(k))
        .take(count)
        .collect()
}

/// Threads of [`concurrent_readers_and_writers`].
#[derive(Debug, Clone, Copy)]
pub struct Concurrent {
    /// Writer threads, each on its own keys.
    pub threads: u64,
    /// Put/get (and every third round, delete) rounds per thread.
    pub rounds: u64,
    /// Keys per thread.
    pub keys: u64,
    /// The table's initial capacity.
    pub initial_capacity: usize,
}

/// The sizes of the shared trials for one backend.
#[derive(Debug, Clone, Copy)]
pub struct StressSizes {
    /// One `random_ops_width_<w>` trial per width.
    pub widths: &'static [usize],
    /// The phases each of those trials runs, each on a fresh table of 64 entries.
    pub random_ops: &'static [RandomOps],
    /// [`last_wins_across_chunks`].
    pub last_wins: LastWins,
    /// [`tombstone_churn`].
    pub churn: Churn,
    /// [`concurrent_readers_and_writers`].
    pub concurrent: Concurrent,
    /// The adversarial-key trials.
    pub adversarial: Adversarial,
}

impl StressSizes {
    /// Sizes that take seconds on a software Vulkan adapter (lavapipe) on two cores; what
    /// the wgpu backend and the CPU backend use.
    pub const SMALL: StressSizes = StressSizes {
        widths: &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
        random_ops: &[RandomOps {
            rounds: 12,
            max_batch: 3000,
            range: 4000,
        }],
        last_wins: LastWins {
            n: 1_500_000,
            distinct: 300_007,
            initial_capacity: 1 << 12,
        },
        churn: Churn {
            capacity: 20_000,
            batch: 12_000,
            rounds: 30,
        },
        concurrent: Concurrent {
            threads: 4,
            rounds: 10,
            keys: 5_000,
            initial_capacity: 1 << 12,
        },
        // The sizes of the first report of lost keys on lavapipe: 21,846 keys on one home
        // slot are past 65,535 / 3 loop iterations, and 800 keys on slot 0 with half of
        // them deleted and put back lost 22 and tore rows.
        adversarial: Adversarial {
            one_home: 21_846,
            capacity: 60_000,
            churn: 800,
            batch: 1_500,
        },
    };
}

/// Random puts (two thirds of the batches) and deletes on `t` against the model, checked
/// after every batch on 256 random keys, and on every key at the end.
pub fn random_ops(t: &dyn KvBackend, phase: RandomOps, seed: u64) -> R {
    let width = t.width();
    let mut m = Map::new();
    let mut rng = Rng::new(seed);
    for round in 0..phase.rounds {
        let n = (rng.next_u64() as usize % phase.max_batch) + 1;
        let keys: Vec<u64> = (0..n).map(|_| rng.key(phase.range)).collect();
        if rng.next_u64() % 3 < 2 {
            let vals: Vec<u64> = (0..n * width).map(|_| rng.next_u64()).collect();
            t.put(&keys, &vals).map_err(|x| e("put", x))?;
            for (i, k) in keys.iter().enumerate() {
                m.insert(*k, vals[i * width..(i + 1) * width].to_vec());
            }
        } else {
            let got = t.delete(&keys).map_err(|x| e("delete", x))?;
            let want = keys.iter().filter(|k| m.remove(k).is_some()).count();
            if got != want {
                return Err(format!("round {round}: delete removed {got}, expected {want}").into());
            }
        }
        let probe: Vec<u64> = (0..256).map(|_| rng.key(phase.range)).collect();
        check(t, &m, &probe, &format!("w{width} round {round}"))?;
    }
    let all: Vec<u64> = m.keys().copied().collect();
    check(t, &m, &all, &format!("w{width} final"))?;
    println!(
        "  w{width}: {} entries in {} slots",
        t.len(),
        t.describe().slots
    );
    Ok(())
}

/// Every phase of `sizes.random_ops` at width `w`, each on a fresh table that grows from 64.
pub fn random_ops_width(open: &Open, sizes: &StressSizes, w: usize) -> R {
    for (p, phase) in sizes.random_ops.iter().enumerate() {
        let t = open_table(open, TableConfig::new(64).width(w))?;
        random_ops(&*t, *phase, w as u64 + 100 * p as u64)?;
    }
    Ok(())
}

/// One put of several chunks (and lanes), every key repeated across chunk boundaries: the
/// batch's last occurrence must win.
pub fn last_wins_across_chunks(open: &Open, s: LastWins) -> R {
    let t = open_table(open, TableConfig::new(s.initial_capacity))?; // grows on the way
    let keys: Vec<u64> = (0..s.n as u64).map(|i| i % s.distinct).collect();
    let vals: Vec<u64> = (0..s.n as u64).collect();
    t.put(&keys, &vals).map_err(|x| e("put", x))?;
    let mut m = Map::new();
    for (k, v) in keys.iter().zip(&vals) {
        m.insert(*k, vec![*v]);
    }
    let probe: Vec<u64> = (0..s.distinct + 7).collect();
    check(
        &*t,
        &m,
        &probe,
        &format!("{} puts over {} keys", s.n, s.distinct),
    )
}

/// Insert/delete cycles at a fixed capacity without growth: only purges keep it going.
pub fn tombstone_churn(open: &Open, s: Churn) -> R {
    let t = open_table(open, TableConfig::new(s.capacity).growth(false))?;
    let mut m = Map::new();
    let mut next = 2u64;
    for round in 0..s.rounds {
        let keys: Vec<u64> = (next..next + s.batch as u64).collect();
        next += s.batch as u64;
        t.put(&keys, &keys).map_err(|x| e("put", x))?;
        let got = t.delete(&keys).map_err(|x| e("delete", x))?;
        if got != keys.len() {
            return Err(format!("round {round}: removed {got} of {}", keys.len()).into());
        }
        if round % 8 == 0 {
            check(
                &*t,
                &m,
                &keys[..keys.len().min(1000)],
                &format!("churn round {round}"),
            )?;
        }
    }
    t.put(&[5, u64::MAX, 0, 1], &[6, 7, 8, 9])
        .map_err(|x| e("put", x))?;
    for (k, v) in [(5, 6), (u64::MAX, 7), (0, 8), (1, 9)] {
        m.insert(k, vec![v]);
    }
    check(
        &*t,
        &m,
        &[5, u64::MAX, u64::MAX - 1, 0, 1, 2],
        "after churn",
    )
}

/// Writer threads on their own keys put, read back and delete at once: every read sees
/// whole batches, never a mix, and the end state is exact.
pub fn concurrent_readers_and_writers(open: &Open, s: Concurrent) -> R {
    let t: Arc<dyn KvBackend> = Arc::from(open_table(open, TableConfig::new(s.initial_capacity))?);
    let writers: Vec<_> = (0..s.threads)
        .map(|th| {
            let t = t.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let keys: Vec<u64> = (0..s.keys).map(|i| (i << 8) | th).collect();
                for round in 0..s.rounds {
                    let vals = vec![round * 10 + th; keys.len()];
                    t.put(&keys, &vals).map_err(|x| x.to_string())?;
                    let mut v = vec![0; keys.len()];
                    let mut f = vec![false; keys.len()];
                    t.get(&keys, &mut v, &mut f).map_err(|x| x.to_string())?;
                    // Batches are atomic: a reader sees a whole put, never a mix.
                    if !f.iter().all(|x| *x)
                        || v.iter().any(|x| *x % 10 != th || *x > round * 10 + th)
                    {
                        return Err(format!("thread {th} round {round}: torn read"));
                    }
                    // Deletes too, put back by the next round (never after the last one).
                    if round % 3 == 2 && round + 1 < s.rounds {
                        let part = &keys[..keys.len().min(100)];
                        let gone = t.delete(part).map_err(|x| x.to_string())?;
                        if gone != part.len() {
                            return Err(format!("thread {th}: deleted {gone} of {}", part.len()));
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join()
            .map_err(|_| "thread panicked")?
            .map_err(Failed::from)?;
    }
    let m: Map = (0..s.threads)
        .flat_map(|th| (0..s.keys).map(move |i| ((i << 8) | th, vec![(s.rounds - 1) * 10 + th])))
        .collect();
    let all: Vec<u64> = m.keys().copied().collect();
    check(&*t, &m, &all, "after the threads")
}

/// Keys of one home slot near the table's end (so the chain wraps around to slot 0) put
/// in one batch, then overwritten in another order, then read back: every key stored once,
/// `len` and the device's counts exact.
pub fn crafted_one_home(open: &Open, s: Adversarial) -> R {
    let t = open_table(open, TableConfig::new(s.capacity).seed(CRAFT_SEED))?;
    let keys = crafted_keys(u32::MAX - 2, s.one_home, CRAFT_SEED);
    let mut m = Map::new();
    put_both(&*t, &mut m, &keys, |i, _| i as u64)?;
    check(
        &*t,
        &m,
        &keys,
        &format!("{} keys on one home slot", keys.len()),
    )?;
    let mut again = keys.clone();
    again.reverse();
    put_both(&*t, &mut m, &again[..keys.len() / 2], |i, _| {
        1 << 40 | i as u64
    })?;
    // Absent keys of the same chain walk all of it before they miss.
    let probe = crafted_keys(u32::MAX - 2, keys.len() + 64, CRAFT_SEED);
    check(&*t, &m, &probe, "overwrites on one home slot")
}

/// Keys of slot 0 at width 2 in a table of twice as many entries: put, every other one
/// deleted, those put back twice in one batch (the second wins): no key lost, no row read
/// from another key or torn.
pub fn crafted_churn(open: &Open, s: Adversarial) -> R {
    let t = open_table(
        open,
        TableConfig::new(2 * s.churn).width(2).seed(CRAFT_SEED),
    )?;
    let keys = crafted_keys(0, s.churn, CRAFT_SEED);
    let mut m = Map::new();
    put_both(&*t, &mut m, &keys, |i, j| (i * 2 + j) as u64)?;
    let gone: Vec<u64> = keys.iter().copied().step_by(2).collect();
    delete_both(&*t, &mut m, &gone, "half of one chain")?;
    check(&*t, &m, &keys, "half of one chain deleted")?;
    let back: Vec<u64> = gone.iter().chain(&gone).copied().collect();
    put_both(&*t, &mut m, &back, |i, j| 1 << 40 | (i * 2 + j) as u64)?;
    check(&*t, &m, &keys, "put back over the tombstones")?;
    // Once more, with overwrites of the keys that stayed in the same batch.
    delete_both(&*t, &mut m, &gone, "half of one chain again")?;
    let mixed: Vec<u64> = keys.iter().rev().copied().collect();
    put_both(&*t, &mut m, &mixed, |i, j| 2 << 40 | (i * 2 + j) as u64)?;
    check(&*t, &m, &keys, "put back with overwrites")
}

/// Three crafted chains (on the first slot of every table size, about a third of the way,
/// and on the last) mixed with random keys, through puts, deletes, put-backs and overwrites
/// from 64 entries across several growths; then a table without growth at max load 0.95
/// filled with crafted keys only: churned at 80% of its capacity (deleted keys come back
/// into their tombstones), then at its full capacity (every batch purges the tombstones).
pub fn crafted_growth_and_full_load(open: &Open, s: Adversarial) -> R {
    let lows = [0u32, 0x5555_5555, u32::MAX];
    let families: Vec<Vec<u64>> = lows
        .iter()
        .map(|&l| crafted_keys(l, 4 * s.batch, CRAFT_SEED))
        .collect();
    let t = open_table(open, TableConfig::new(64).width(3).seed(CRAFT_SEED))?;
    let mut m = Map::new();
    let mut rng = Rng::new(77);
    let mut ctx = String::new();
    for round in 0..8usize {
        let mut keys: Vec<u64> = Vec::new();
        for f in &families {
            let from = (round * s.batch / 2) % f.len();
            keys.extend(f.iter().cycle().skip(from).take(s.batch / 3));
        }
        keys.extend((0..s.batch / 4).map(|_| rng.key(1 << 40)));
        put_both(&*t, &mut m, &keys, |i, j| {
            ((round << 32) | (i * 3 + j)) as u64
        })?;
        if round % 2 == 1 {
            let del: Vec<u64> = keys.iter().copied().step_by(3).collect();
            delete_both(&*t, &mut m, &del, &format!("round {round}"))?;
        }
        ctx = format!(
            "round {round}, {} entries in {} slots",
            m.len(),
            t.describe().slots
        );
        let probe: Vec<u64> = keys.iter().copied().step_by(7).collect();
        check(&*t, &m, &probe, &ctx)?;
    }
    let all: Vec<u64> = families
        .iter()
        .flatten()
        .copied()
        .chain(m.keys().copied())
        .collect();
    check(&*t, &m, &all, &ctx)?;

    // Full load: capacity entries at 0.95, all of them crafted, then churned.
    let t = open_table(
        open,
        TableConfig::new(s.batch)
            .max_load_factor(0.95)
            .growth(false)
            .seed(CRAFT_SEED),
    )?;
    let cap = t.capacity();
    let keys: Vec<u64> = families
        .iter()
        .flat_map(|f| f.iter().take(cap / 3 + 1))
        .copied()
        .take(cap)
        .collect();
    let mut m = Map::new();
    // 80% of the capacity: a tenth deleted and put back with half as many overwrites keeps
    // live keys, tombstones and the batch within the capacity, so nothing is purged and the
    // keys go back into tombstones of their own chains.
    let most = &keys[..cap * 4 / 5];
    put_both(&*t, &mut m, most, |i, _| i as u64)?;
    for round in 0..3usize {
        let del: Vec<u64> = most.iter().copied().skip(round).step_by(10).collect();
        delete_both(&*t, &mut m, &del, &format!("80% round {round}"))?;
        let stayed = most
            .iter()
            .filter(|k| m.contains_key(k))
            .take(del.len() / 2);
        let back: Vec<u64> = del.iter().chain(stayed).copied().collect();
        put_both(&*t, &mut m, &back, |i, _| ((round << 20) | i) as u64)?;
        check(&*t, &m, most, &format!("80% round {round}"))?;
    }
    put_both(&*t, &mut m, &keys[cap * 4 / 5..], |i, _| i as u64)?;
    check(&*t, &m, &keys, "crafted keys at full load")?;
    for round in 0..3u64 {
        let del: Vec<u64> = keys
            .iter()
            .copied()
            .skip(round as usize)
            .step_by(2)
            .collect();
        delete_both(&*t, &mut m, &del, &format!("full load round {round}"))?;
        // Admission counts every key of a batch as new (contract item f), so at full load a
        // batch holds as many keys as were deleted: half of them back with as many
        // overwrites of keys that stayed, then the other half.
        let half = del.len() / 2;
        let stayed = keys.iter().filter(|k| m.contains_key(k)).take(half);
        let mixed: Vec<u64> = del[..half].iter().chain(stayed).copied().collect();
        put_both(&*t, &mut m, &mixed, |i, _| round << 40 | i as u64)?;
        put_both(&*t, &mut m, &del[half..], |i, _| round << 48 | i as u64)?;
        check(&*t, &m, &keys, &format!("full load round {round}"))?;
    }
    Ok(())
}

/// Opening 2^32 slots of 16-word values (600 GB) is [`Error::OutOfDeviceMemory`], not a
/// panic nor an abort.
pub fn huge_table_is_out_of_memory(open: &Open) -> R {
    match open(TableConfig::new(3 << 30).width(16).max_load_factor(0.95)) {
        Err(Error::OutOfDeviceMemory { .. }) => Ok(()),
        Err(other) => Err(format!("expected OutOfDeviceMemory, got {other}").into()),
        Ok(_) => Err("a 600 GB table opened".into()),
    }
}

/// Times one host put of `keys` (each key its own value) and one get of them, after a
/// warm-up put and get of the first tenth; checks what the get read. Returns the seconds
/// of the put and of the get, for a backend's throughput report.
pub fn timed_put_get(t: &dyn KvBackend, keys: &[u64]) -> Result<(f64, f64), Failed> {
    let n = keys.len();
    let mut vals = vec![0u64; n];
    let mut found = vec![false; n];
    // Warm-up (lanes, pipelines, page faults of the output buffers).
    t.put(&keys[..n / 10], &keys[..n / 10])
        .map_err(|x| e("put", x))?;
    t.get(&keys[..n / 10], &mut vals[..n / 10], &mut found[..n / 10])
        .map_err(|x| e("get", x))?;
    let s = std::time::Instant::now();
    t.put(keys, keys).map_err(|x| e("put", x))?;
    let put = s.elapsed().as_secs_f64();
    let s = std::time::Instant::now();
    t.get(keys, &mut vals, &mut found)
        .map_err(|x| e("get", x))?;
    let get = s.elapsed().as_secs_f64();
    if vals != keys || !found.iter().all(|f| *f) {
        return Err(format!("{n}: wrong values in the throughput run").into());
    }
    Ok((put, get))
}

/// Builds the stress trials of a backend: the shared ones at `sizes`, then `extra`, each
/// named `<backend>::<trial>`; what [`stress_main!`](crate::stress_main) calls.
///
/// With [`Availability::Skip`] it prints `skipped: <reason>` and every trial is ignored;
/// with [`Availability::Fail`] every trial fails with the reason.
pub fn trials(
    backend: &'static str,
    open: Arc<Open>,
    sizes: StressSizes,
    availability: Availability,
    extra: Vec<Extra>,
) -> Vec<Trial> {
    availability.announce(&format!("{backend} stress suite"));
    type Body = Box<dyn FnOnce() -> R + Send>;
    let mut bodies: Vec<(String, Body)> = Vec::new();
    for &w in sizes.widths {
        let open = open.clone();
        bodies.push((
            format!("random_ops_width_{w}"),
            Box::new(move || random_ops_width(&*open, &sizes, w)),
        ));
    }
    type Shared = fn(&Open, &StressSizes) -> R;
    let shared: [(&str, Shared); 6] = [
        ("last_wins_across_chunks", |o, s| {
            last_wins_across_chunks(o, s.last_wins)
        }),
        ("tombstone_churn", |o, s| tombstone_churn(o, s.churn)),
        ("concurrent_readers_and_writers", |o, s| {
            concurrent_readers_and_writers(o, s.concurrent)
        }),
        ("crafted_one_home", |o, s| {
            crafted_one_home(o, s.adversarial)
        }),
        ("crafted_churn", |o, s| crafted_churn(o, s.adversarial)),
        ("crafted_growth_and_full_load", |o, s| {
            crafted_growth_and_full_load(o, s.adversarial)
        }),
    ];
    for (name, f) in shared {
        let o = open.clone();
        bodies.push((name.into(), Box::new(move || f(&*o, &sizes))));
    }
    for (name, f) in extra {
        bodies.push((name.into(), Box::new(f)));
    }
    bodies
        .into_iter()
        .map(|(name, body)| availability.trial(format!("{backend}::{name}"), body))
        .collect()
}

/// Generates `fn main()` for a backend's stress test binary (`harness = false`): the
/// shared trials at the given [`StressSizes`] plus the backend's own `extra` trials.
///
/// ```no_run
/// // tests/mine_stress.rs of a backend crate
/// fn huge_table() -> kv_conformance::stress::R {
///     kv_conformance::stress::huge_table_is_out_of_memory(&|cfg| {
///         Ok(Box::new(kv_conformance::doc_backend(cfg)?) as Box<dyn kv_core::KvBackend>)
///     })
/// }
/// kv_conformance::stress_main! {
///     backend: "mine",
///     open: |cfg| Ok(Box::new(kv_conformance::doc_backend(cfg)?) as Box<dyn kv_core::KvBackend>),
///     availability: || kv_conformance::Availability::Available,
///     sizes: kv_conformance::stress::StressSizes::SMALL,
///     extra: [("huge_table_is_out_of_memory", huge_table)],
/// }
/// ```
///
/// Trials run one at a time unless `--test-threads` is given.
#[macro_export]
macro_rules! stress_main {
    (
        backend: $backend:expr,
        open: $open:expr,
        availability: $avail:expr,
        sizes: $sizes:expr,
        extra: [$(($name:expr, $f:expr)),* $(,)?] $(,)?
    ) => {
        fn main() {
            let mut args = $crate::libtest_mimic::Arguments::from_args();
            // One trial at a time: each batch already uses the whole device (or every core).
            args.test_threads.get_or_insert(1);
            let open: ::std::sync::Arc<$crate::cases::Open> = ::std::sync::Arc::new($open);
            let extra: ::std::vec::Vec<$crate::stress::Extra> = vec![$(($name, $f)),*];
            let trials = $crate::stress::trials($backend, open, $sizes, ($avail)(), extra);
            $crate::libtest_mimic::run(&args, trials).exit();
        }
    };
}
