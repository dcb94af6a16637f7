//! Host tests of the cache kernels' per-item algorithms ([`crate::ops::cache`]): run over
//! host memory sequentially (against an exact model of the CPU backend's rule, applied to
//! each key's last occurrence in batch order) and on several threads (against the
//! contract: nothing lost, rows exact, evictions of the lowest score, `len` exact).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::layout::*;
use crate::ops::cache::CachePutItem;
use crate::ops::{Group, Warp, cache};
use crate::tests::{Host, REVERSED, Rng, par};

const B: usize = CACHE_BUCKET as usize;

/// An evicted entry: key, row, score, expiry time.
type Gone = (u64, Vec<u64>, u64, u64);

/// A cache table in host memory, driven as the CUDA backend drives the device.
struct CacheSim {
    width: u32,
    policy: u32,
    buckets: u64,
    seed: u64,
    keys: Vec<u64>,
    scores: Vec<u64>,
    expires: Vec<u64>,
    rows: Vec<u64>,
    used: Vec<u32>,
    digests: Vec<u32>,
    locks: Vec<u32>,
    counters: Vec<u64>,
    clock: u64,
    threads: u64,
}

impl CacheSim {
    fn new(buckets: u64, width: u32, policy: u32, threads: u64) -> Self {
        let slots = (buckets * CACHE_BUCKET) as usize;
        Self {
            width,
            policy,
            buckets,
            seed: 0x5eed,
            keys: vec![0; slots],
            scores: vec![0; slots],
            expires: vec![0; slots],
            rows: vec![0; slots * width as usize],
            used: vec![0; buckets as usize],
            // Four digests a word: the kernels read them four at a time.
            digests: vec![0; slots / 4],
            locks: vec![0; buckets as usize],
            counters: vec![0; cache_counter::LEN],
            clock: 0,
            threads,
        }
    }

    fn table(&mut self) -> CacheTableArgs {
        CacheTableArgs {
            keys: self.keys.as_mut_ptr() as u64,
            scores: self.scores.as_mut_ptr() as u64,
            expires: self.expires.as_mut_ptr() as u64,
            rows: self.rows.as_mut_ptr() as u64,
            used: self.used.as_mut_ptr() as u64,
            locks: self.locks.as_mut_ptr() as u64,
            counters: self.counters.as_mut_ptr() as u64,
            digests: self.digests.as_mut_ptr() as u64,
            buckets: self.buckets,
            seed: self.seed,
            width: self.width,
            policy: self.policy,
        }
    }

    fn bucket(&self, key: u64) -> usize {
        cache_bucket(key, self.seed, self.buckets) as usize
    }

    /// The put of a batch: dedup pass, then put pass. Returns what it evicted.
    fn put(
        &mut self,
        keys: &[u64],
        vals: &[u64],
        scores: Option<&[u64]>,
        ttl: Option<&[u64]>,
        now: u64,
    ) -> Vec<Gone> {
        let (n, w) = (keys.len(), self.width as usize);
        if n == 0 {
            return Vec::new();
        }
        self.clock += 1;
        self.counters.fill(0);
        let ls = local_slots(n as u64) as usize;
        let (mut local, mut pick, mut occurs) = (vec![0u32; ls], vec![0u32; ls], vec![0u32; ls]);
        let mut slot_of = vec![0u32; n];
        let (mut ek, mut er, mut es, mut ee) = (
            vec![0u64; n],
            vec![0u64; n * w],
            vec![0u64; n],
            vec![0u64; n],
        );
        let mut scratch = vec![0u64; EvScratch::bytes(n as u64, self.width).div_ceil(8) as usize];
        let a = CacheArgs {
            table: self.table(),
            clock: self.clock,
            now,
            n: n as u64,
            keys_in: keys.as_ptr() as u64,
            values: vals.as_ptr() as u64,
            scores_in: scores.map_or(0, |s| s.as_ptr() as u64),
            ttl_in: ttl.map_or(0, |t| t.as_ptr() as u64),
            ev_keys: ek.as_mut_ptr() as u64,
            ev_rows: er.as_mut_ptr() as u64,
            ev_scores: es.as_mut_ptr() as u64,
            ev_expires: ee.as_mut_ptr() as u64,
            ev_scratch: scratch.as_mut_ptr() as u64,
            local: local.as_mut_ptr() as u64,
            pick: pick.as_mut_ptr() as u64,
            occurs: occurs.as_mut_ptr() as u64,
            slot_of: slot_of.as_mut_ptr() as u64,
            local_mask: ls as u64 - 1,
            ..Default::default()
        };
        par(n as u64, self.threads, |i| {
            // SAFETY: every buffer is live and sized as the args say.
            assert!(unsafe { cache::dedup::<Host>(&a, i) });
        });
        let reported = AtomicU64::new(0);
        let done = |p: CachePutItem| {
            assert!(!p.lost && !p.busy);
            reported.fetch_add(p.evicted as u64, Relaxed);
        };
        // As the kernel does: each thread (a group) puts its share of the items with
        // `put_items`, putting aside an item whose bucket another thread holds.
        let items: Vec<Vec<u64>> = match self.threads {
            1 => vec![(0..n as u64).collect()],
            REVERSED => vec![(0..n as u64).rev().collect()],
            t => (0..t)
                .map(|first| (first..n as u64).step_by(t as usize).collect())
                .collect(),
        };
        let shares = items.len() as u64;
        par(shares, shares, |t| {
            let mine = items[t as usize].iter().copied();
            // SAFETY: as above; the dedup pass ran.
            unsafe { cache::put_items::<Host>(&a, mine, done) };
        });
        assert!(self.locks.iter().all(|l| *l == 0), "a lock left held");
        // The compaction pass, a warp per 32 items.
        par((n as u64).div_ceil(32), self.threads, |w| {
            // SAFETY: as above; the put pass ran.
            unsafe { cache::compact::<Host>(&a, 32 * w) };
        });
        assert_eq!(self.counters[cache_counter::ERRORS], 0);
        let m = reported.into_inner() as usize;
        assert_eq!(self.counters[cache_counter::COMPACTED], m as u64);
        assert!(m <= n);
        (0..m)
            .map(|e| (ek[e], er[e * w..(e + 1) * w].to_vec(), es[e], ee[e]))
            .collect()
    }

    /// Get (`access`) or peek.
    fn lookup(&mut self, keys: &[u64], access: bool, now: u64) -> (Vec<u64>, Vec<bool>) {
        let (n, w) = (keys.len(), self.width as usize);
        if access && n > 0 {
            self.clock += 1;
        }
        let mut v = vec![u64::MAX; n * w];
        let mut f = vec![7u8; n];
        let a = CacheArgs {
            table: self.table(),
            clock: self.clock,
            now,
            n: n as u64,
            keys_in: keys.as_ptr() as u64,
            values: v.as_mut_ptr() as u64,
            found_out: f.as_mut_ptr() as u64,
            access: access as u32,
            ..Default::default()
        };
        // As the kernel does: two items a group at a time, the last one alone.
        par(n.div_ceil(2) as u64, self.threads, |p| {
            // SAFETY: every buffer is live and sized as the args say; 2p < n.
            unsafe { cache::lookup_pair::<Host>(&a, p) };
        });
        assert!(f.iter().all(|f| *f <= 1));
        (v, f.iter().map(|f| *f == 1).collect())
    }

    /// Take (first occurrence wins) or, with `rows == false`, delete.
    fn take(&mut self, keys: &[u64], rows: bool, now: u64) -> (Vec<u64>, Vec<bool>, Vec<u64>, u64) {
        let (n, w) = (keys.len(), self.width as usize);
        let ls = local_slots(n as u64) as usize;
        let (mut local, mut pick) = (vec![0u32; ls], vec![0u32; ls]);
        let mut slot_of = vec![0u32; n];
        let mut v = vec![u64::MAX; n * w];
        let mut f = vec![7u8; n];
        let mut x = vec![7u64; n];
        let a = CacheArgs {
            table: self.table(),
            now,
            n: n as u64,
            keys_in: keys.as_ptr() as u64,
            values: if rows { v.as_mut_ptr() as u64 } else { 0 },
            found_out: if rows { f.as_mut_ptr() as u64 } else { 0 },
            expires_out: if rows { x.as_mut_ptr() as u64 } else { 0 },
            local: local.as_mut_ptr() as u64,
            pick: if rows { pick.as_mut_ptr() as u64 } else { 0 },
            slot_of: slot_of.as_mut_ptr() as u64,
            local_mask: ls as u64 - 1,
            first_wins: 1,
            ..Default::default()
        };
        if rows {
            par(n as u64, self.threads, |i| {
                // SAFETY: every buffer is live and sized as the args say.
                assert!(unsafe { cache::dedup::<Host>(&a, i) });
            });
        }
        let removed = AtomicU64::new(0);
        par(n as u64, self.threads, |i| {
            // SAFETY: as above.
            let r = unsafe { cache::take::<Host>(&a, i) };
            removed.fetch_add(r as u64, Relaxed);
        });
        (
            v,
            f.iter().map(|f| *f == 1).collect(),
            x,
            removed.into_inner(),
        )
    }

    fn len(&mut self, now: u64) -> u64 {
        let a = CacheArgs {
            table: self.table(),
            now,
            ..Default::default()
        };
        let live = AtomicU64::new(0);
        par(self.buckets, self.threads, |b| {
            // SAFETY: b < buckets.
            live.fetch_add(
                u64::from(unsafe { cache::count_live::<Host>(&a, b) }),
                Relaxed,
            );
        });
        live.into_inner()
    }

    /// Live entries of bucket `b`: (key, score as the contract states it) in slot order.
    fn live_in(&self, b: usize, now: u64) -> Vec<(u64, u64)> {
        (0..B)
            .filter(|&j| {
                let s = b * B + j;
                self.used[b] & (1 << j) != 0 && !(self.expires[s] != 0 && self.expires[s] <= now)
            })
            .map(|j| {
                let s = b * B + j;
                (
                    self.keys[s],
                    cache::visible_score(self.policy, self.scores[s]),
                )
            })
            .collect()
    }
}

/// The exact sequential reference: the CPU backend's rule, applied to the last occurrence
/// of each key in batch order (with the count of its occurrences).
#[derive(Clone)]
struct RefBucket {
    used: u32,
    keys: [u64; B],
    scores: [u64; B],
    expires: [u64; B],
    rows: Vec<Vec<u64>>,
}

struct Ref {
    policy: u32,
    buckets: Vec<RefBucket>,
    clock: u64,
}

impl Ref {
    fn new(sim: &CacheSim) -> Self {
        Self {
            policy: sim.policy,
            buckets: vec![
                RefBucket {
                    used: 0,
                    keys: [0; B],
                    scores: [0; B],
                    expires: [0; B],
                    rows: vec![vec![0; sim.width as usize]; B],
                };
                sim.buckets as usize
            ],
            clock: 0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        sim: &CacheSim,
        keys: &[u64],
        vals: &[u64],
        scores: Option<&[u64]>,
        ttl: Option<&[u64]>,
        now: u64,
    ) -> Vec<Gone> {
        let w = sim.width as usize;
        if keys.is_empty() {
            return Vec::new();
        }
        self.clock += 1;
        let mut last: HashMap<u64, usize> = HashMap::new();
        let mut occurs: HashMap<u64, u64> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            last.insert(*k, i);
            *occurs.entry(*k).or_default() += 1;
        }
        let mut out = Vec::new();
        for (i, &key) in keys.iter().enumerate() {
            if last[&key] != i {
                continue;
            }
            let occ = occurs[&key];
            let row = vals[i * w..(i + 1) * w].to_vec();
            let expires = cache::expiry(now, ttl.map_or(0, |t| t[i]));
            let given = scores.map_or(0, |s| s[i]);
            let b = &mut self.buckets[sim.bucket(key)];
            let live = |b: &RefBucket, j: usize| {
                b.used & (1 << j) != 0 && !(b.expires[j] != 0 && b.expires[j] <= now)
            };
            if let Some(j) = (0..B).find(|&j| b.keys[j] == key && live(b, j)) {
                b.scores[j] = match self.policy {
                    cache_policy::LRU => cache::lru_score(self.clock, i as u64),
                    cache_policy::LFU => b.scores[j] + occ,
                    _ => given,
                };
                b.expires[j] = expires;
                b.rows[j] = row;
                continue;
            }
            let score = match self.policy {
                cache_policy::LRU => cache::lru_score(self.clock, i as u64),
                cache_policy::LFU => occ,
                _ => given,
            };
            let j = match (0..B).find(|&j| !live(b, j)) {
                Some(j) => j,
                None => {
                    let v = (0..B).min_by_key(|&j| (b.scores[j], j)).expect("slots");
                    let seen = |s| cache::visible_score(self.policy, s);
                    if seen(score) < seen(b.scores[v]) {
                        out.push((key, row, seen(score), expires));
                        continue;
                    }
                    out.push((
                        b.keys[v],
                        b.rows[v].clone(),
                        seen(b.scores[v]),
                        b.expires[v],
                    ));
                    v
                }
            };
            b.used |= 1 << j;
            b.keys[j] = key;
            b.scores[j] = score;
            b.expires[j] = expires;
            b.rows[j] = row;
        }
        out
    }

    fn get(&mut self, sim: &CacheSim, keys: &[u64], now: u64) {
        if keys.is_empty() {
            return;
        }
        self.clock += 1;
        for (i, &k) in keys.iter().enumerate() {
            let b = &mut self.buckets[sim.bucket(k)];
            for j in 0..B {
                if b.used & (1 << j) != 0
                    && b.keys[j] == k
                    && !(b.expires[j] != 0 && b.expires[j] <= now)
                {
                    match self.policy {
                        cache_policy::LRU => {
                            b.scores[j] = b.scores[j].max(cache::lru_score(self.clock, i as u64))
                        }
                        cache_policy::LFU => b.scores[j] += 1,
                        _ => {}
                    }
                }
            }
        }
    }

    fn delete(&mut self, sim: &CacheSim, keys: &[u64], now: u64) -> u64 {
        let mut removed = 0;
        for &k in keys {
            let b = &mut self.buckets[sim.bucket(k)];
            for j in 0..B {
                if b.used & (1 << j) != 0
                    && b.keys[j] == k
                    && !(b.expires[j] != 0 && b.expires[j] <= now)
                {
                    b.used &= !(1 << j);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The simulated table holds exactly what the reference holds.
    fn agrees(&self, sim: &CacheSim) {
        let w = sim.width as usize;
        for (bi, b) in self.buckets.iter().enumerate() {
            assert_eq!(sim.used[bi], b.used, "bucket {bi}: used");
            for j in 0..B {
                if b.used & (1 << j) == 0 {
                    continue;
                }
                let s = bi * B + j;
                assert_eq!(sim.keys[s], b.keys[j], "bucket {bi} slot {j}: key");
                assert_eq!(sim.scores[s], b.scores[j], "bucket {bi} slot {j}: score");
                assert_eq!(sim.expires[s], b.expires[j], "bucket {bi} slot {j}: expiry");
                assert_eq!(sim.rows[s * w..(s + 1) * w], b.rows[j][..], "slot {s}: row");
            }
        }
    }
}

/// A key for the cache tests: 0 and `u64::MAX` often, else one of `range` scattered keys.
fn cache_key(rng: &mut Rng, range: u64) -> u64 {
    match rng.below(16) {
        0 => 0,
        1 => u64::MAX,
        _ => rng.below(range).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    }
}

/// Random puts (repeats, scores, times to live), gets, peeks, deletes and takes, run
/// sequentially, must leave the simulated table exactly as the reference.
fn exact_sequence(policy: u32, width: u32, buckets: u64, seed: u64) {
    let w = width as usize;
    let mut sim = CacheSim::new(buckets, width, policy, 1);
    let mut r = Ref::new(&sim);
    let mut rng = Rng(seed);
    let cap = buckets * CACHE_BUCKET;
    let mut now = 1000;
    for step in 0..200u64 {
        match rng.below(8) {
            0..=3 => {
                let n = 1 + rng.below(cap) as usize;
                let keys: Vec<u64> = (0..n).map(|_| cache_key(&mut rng, cap * 3)).collect();
                let vals: Vec<u64> = (0..n * w).map(|_| rng.next()).collect();
                let scores: Vec<u64> = (0..n).map(|_| rng.below(100)).collect();
                let ttl: Vec<u64> = (0..n)
                    .map(|_| {
                        if rng.below(4) == 0 {
                            1 + rng.below(20)
                        } else {
                            0
                        }
                    })
                    .collect();
                let s = (policy == cache_policy::CUSTOM).then_some(&scores[..]);
                let got = sim.put(&keys, &vals, s, Some(&ttl), now);
                let want = r.put(&sim, &keys, &vals, s, Some(&ttl), now);
                assert_eq!(got, want, "step {step}: evictions");
            }
            4 => {
                let keys: Vec<u64> = (0..rng.below(cap))
                    .map(|_| cache_key(&mut rng, cap * 3))
                    .collect();
                let (v, f) = sim.lookup(&keys, true, now);
                r.get(&sim, &keys, now);
                let (pv, pf) = sim.lookup(&keys, false, now);
                assert_eq!((v, f), (pv, pf), "a get and a peek return alike");
            }
            5 => {
                let keys: Vec<u64> = (0..rng.below(8))
                    .map(|_| cache_key(&mut rng, cap * 3))
                    .collect();
                let (_, _, _, removed) = sim.take(&keys, false, now);
                assert_eq!(removed, r.delete(&sim, &keys, now), "step {step}: delete");
            }
            6 => {
                let mut keys: Vec<u64> = (0..rng.below(8))
                    .map(|_| cache_key(&mut rng, cap * 3))
                    .collect();
                keys.extend(keys.clone());
                let (pv, pf) = sim.lookup(&keys, false, now);
                let (v, f, x, removed) = sim.take(&keys, true, now);
                // The first occurrence of each key takes what a peek saw; later ones find
                // nothing.
                for (i, k) in keys.iter().enumerate() {
                    let first = keys.iter().position(|x| x == k) == Some(i);
                    let row = &v[i * w..(i + 1) * w];
                    if first {
                        assert_eq!(f[i], pf[i], "step {step}: take of key {k}");
                        assert_eq!(
                            row,
                            &pv[i * w..(i + 1) * w],
                            "take returns the row a peek saw"
                        );
                    } else {
                        assert!(!f[i] && x[i] == 0, "a repeated key is taken once");
                        assert!(row.iter().all(|v| *v == 0));
                    }
                    if !f[i] {
                        assert_eq!(x[i], 0);
                    }
                }
                assert_eq!(removed, r.delete(&sim, &keys, now), "step {step}: take");
            }
            _ => now += rng.below(10),
        }
        r.agrees(&sim);
        let live: usize = (0..buckets as usize)
            .map(|b| sim.live_in(b, now).len())
            .sum();
        assert_eq!(sim.len(now), live as u64);
    }
}

#[test]
fn cache_exact_against_the_cpu_rule_lru() {
    exact_sequence(cache_policy::LRU, 1, 2, 1);
    exact_sequence(cache_policy::LRU, 3, 5, 2);
    // Rows wider than a warp: lane l copies words l, l + 32, ...
    exact_sequence(cache_policy::LRU, 37, 2, 7);
}

#[test]
fn cache_exact_against_the_cpu_rule_lfu() {
    exact_sequence(cache_policy::LFU, 1, 2, 3);
    exact_sequence(cache_policy::LFU, 2, 5, 4);
}

#[test]
fn cache_exact_against_the_cpu_rule_custom() {
    exact_sequence(cache_policy::CUSTOM, 2, 2, 5);
    exact_sequence(cache_policy::CUSTOM, 1, 7, 6);
    exact_sequence(cache_policy::CUSTOM, 32, 3, 8);
}

/// The host's warp ([`Host`] as [`Warp`]): lanes run in order, and each collective gives
/// what the device's instruction gives every lane.
#[test]
fn host_warp_collectives() {
    let mut order = Vec::new();
    let v = Host::lanes(|l| {
        order.push(l);
        u64::from(l) * 3 % 7 + 2
    });
    assert_eq!(order, (0..32).collect::<Vec<u32>>());
    // SAFETY: one host thread is a whole warp; no memory is touched.
    unsafe {
        assert_eq!(
            Host::ballot(Host::map(v, |_, x| x == 2)),
            (0..32).step_by(7).fold(0, |m, l| m | 1 << l)
        );
        assert_eq!(Host::shfl(v, 5), 5 * 3 % 7 + 2);
        assert_eq!(
            Host::min(Host::map(v, |l, x| x + u64::from(l == 9) * 100)),
            2
        );
        assert_eq!(
            Host::min(Host::lanes(|l| u64::MAX - u64::from(l))),
            u64::MAX - 31
        );
        let mut runs = 0;
        assert_eq!(
            Host::one(|| {
                runs += 1;
                42
            }),
            42
        );
        assert_eq!(runs, 1, "lane 0's work runs once per warp");
    }
}

#[test]
fn host_group_collectives() {
    let g = GROUP_LANES as usize;
    let mut order = Vec::new();
    let v = Host::group_lanes(|l| {
        order.push(l);
        u64::from(l) * 3 % 5 + 2
    });
    assert_eq!(order, (0..GROUP_LANES).collect::<Vec<u32>>());
    // SAFETY: one host thread is a whole group; no memory is touched.
    unsafe {
        assert_eq!(
            Host::group_or(Host::group_lanes(|l| 1 << (3 * l))),
            (0..g).fold(0, |m, l| m | 1 << (3 * l))
        );
        assert_eq!(Host::group_shfl(v, 4), 4 * 3 % 5 + 2);
        assert_eq!(
            Host::group_min(Host::group_map(v, |l, x| x + u64::from(l) * 10)),
            2
        );
        let mut runs = 0;
        assert_eq!(
            Host::group_one(|| {
                runs += 1;
                42
            }),
            42
        );
        assert_eq!(runs, 1, "the first lane's work runs once per group");
    }
}

/// Keys that share both their bucket and their digest stay distinct: a lookup compares the
/// key of every slot whose digest matches, and one that matches the digest alone is a miss.
#[test]
fn cache_keys_sharing_a_digest_stay_apart() {
    let mut sim = CacheSim::new(4, 2, cache_policy::LRU, 1);
    let (seed, buckets) = (sim.seed, sim.buckets);
    let twin = |k: u64| (cache_bucket(k, seed, buckets), cache_digest(k, seed));
    let first = 11u64;
    let mut same: Vec<u64> = (first + 1..)
        .filter(|&k| twin(k) == twin(first))
        .take(3)
        .collect();
    same.insert(0, first);
    let (put, absent) = same.split_at(3);
    let rows: Vec<u64> = put.iter().flat_map(|&k| [k * 10, k * 10 + 1]).collect();
    assert!(sim.put(put, &rows, None, None, 0).is_empty());
    let (got, found) = sim.lookup(same.as_slice(), true, 0);
    assert_eq!(found, [true, true, true, false]);
    assert_eq!(&got[..6], rows.as_slice());
    assert_eq!(
        &got[6..],
        [0, 0],
        "a digest match alone is a miss, its row zeros"
    );
    assert_eq!(twin(absent[0]), twin(first));
}

/// A full bucket whose entries all have one score gives up its lowest slot (the lowest
/// `(score, slot)`, found by the warp's reduction and ballot), and a new key with that
/// same score enters (ties go against the entry already there).
#[test]
fn cache_full_bucket_ties_evict_the_lowest_slot() {
    let mut sim = CacheSim::new(1, 1, cache_policy::CUSTOM, 1);
    let keys: Vec<u64> = (0..B as u64).map(|k| k * 5 + 1).collect();
    assert!(sim.put(&keys, &keys, Some(&[9; B]), None, 0).is_empty());
    for round in 0..3u64 {
        let victim = sim.keys[0];
        let new = 1000 + round;
        let ev = sim.put(&[new], &[new], Some(&[9]), None, 0);
        assert_eq!(ev, vec![(victim, vec![victim], 9, 0)], "round {round}");
        assert_eq!(sim.keys[0], new);
    }
    // A lower score is turned away; a higher one evicts slot 0 again.
    assert_eq!(
        sim.put(&[7], &[70], Some(&[8]), None, 0),
        vec![(7, vec![70], 8, 0)]
    );
    let kept = sim.keys[0];
    assert_eq!(
        sim.put(&[8], &[80], Some(&[10]), None, 0),
        vec![(kept, vec![kept], 9, 0)]
    );
}

/// Many threads putting distinct keys into one bucket: the lock serialises them, every key
/// ends up either in the table or reported once, and the survivors are the highest scores.
#[test]
fn cache_threads_contend_on_one_bucket() {
    for round in 0..20u64 {
        let mut sim = CacheSim::new(1, 2, cache_policy::CUSTOM, 8);
        let n = 300usize;
        let keys: Vec<u64> = (0..n as u64).map(|k| k * 7 + round).collect();
        let vals: Vec<u64> = keys.iter().flat_map(|&k| [k, !k]).collect();
        // Distinct scores, shuffled by the key.
        let scores: Vec<u64> = keys
            .iter()
            .map(|&k| (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) * 1024 + k % 1024)
            .collect();
        let ev = sim.put(&keys, &vals, Some(&scores), None, 0);
        assert_eq!(ev.len(), n - B);
        let live = sim.live_in(0, 0);
        assert_eq!(live.len(), B);
        let mut all: HashSet<u64> = live.iter().map(|(k, _)| *k).collect();
        for (k, row, score, _) in &ev {
            assert!(
                all.insert(*k),
                "key {k} both kept and evicted, or evicted twice"
            );
            assert_eq!(row, &vec![*k, !*k]);
            let i = keys.iter().position(|x| x == k).expect("a batch key");
            assert_eq!(*score, scores[i]);
        }
        assert_eq!(all.len(), n);
        let mut top = scores.clone();
        top.sort_unstable();
        let kept: HashSet<u64> = live.iter().map(|(_, s)| *s).collect();
        assert_eq!(kept, top[n - B..].iter().copied().collect());
        for (k, s) in &live {
            let i = keys.iter().position(|x| x == k).expect("a batch key");
            assert_eq!(*s, scores[i]);
            let slot = (0..B).find(|&j| sim.keys[j] == *k).expect("slot");
            assert_eq!(sim.rows[slot * 2..slot * 2 + 2], [*k, !*k]);
        }
    }
}

/// Random batches on several threads, checked against the contract: every key put is in the
/// table with its last row or was reported evicted; evictions had the lowest score among the
/// entries of their bucket the batch did not touch; `len` is exact; gets and deletes agree.
#[test]
fn cache_threads_keep_the_contract() {
    for (policy, width, buckets, seed) in [
        (cache_policy::LRU, 1, 3, 11u64),
        (cache_policy::LFU, 2, 4, 12),
        (cache_policy::CUSTOM, 1, 2, 13),
        (cache_policy::LRU, 4, 8, 14),
    ] {
        let w = width as usize;
        let mut sim = CacheSim::new(buckets, width, policy, 4);
        let mut model: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut rng = Rng(seed);
        let cap = buckets * CACHE_BUCKET;
        for step in 0..150u64 {
            match rng.below(6) {
                0..=3 => {
                    let n = 1 + rng.below(cap * 2) as usize;
                    let keys: Vec<u64> = (0..n).map(|_| cache_key(&mut rng, cap * 3)).collect();
                    let vals: Vec<u64> = (0..n * w).map(|_| rng.next()).collect();
                    let scores: Vec<u64> = (0..n).map(|_| rng.below(50)).collect();
                    let s = (policy == cache_policy::CUSTOM).then_some(&scores[..]);
                    let mut held: HashMap<u64, Vec<Vec<u64>>> = HashMap::new();
                    for (k, r) in &model {
                        held.entry(*k).or_default().push(r.clone());
                    }
                    for (i, k) in keys.iter().enumerate() {
                        let r = vals[i * w..(i + 1) * w].to_vec();
                        held.entry(*k).or_default().push(r.clone());
                        model.insert(*k, r);
                    }
                    let ev = sim.put(&keys, &vals, s, None, 0);
                    let batch: HashSet<u64> = keys.iter().copied().collect();
                    let gone: Vec<u64> = ev.iter().map(|e| e.0).collect();
                    let (_, still) = sim.lookup(&gone, false, 0);
                    for (e, (k, r, score, _)) in ev.iter().enumerate() {
                        assert!(
                            held[k].contains(r),
                            "step {step}: key {k} reported a row it never held"
                        );
                        // A key evicted and then put again by its own item stays.
                        if !still[e] {
                            model.remove(k);
                        }
                        for (other, sc) in sim.live_in(sim.bucket(*k), 0) {
                            if !batch.contains(&other) {
                                assert!(
                                    sc >= *score,
                                    "step {step}: key {k} (score {score}) left while {other} ({sc}) stayed"
                                );
                            }
                        }
                    }
                }
                4 => {
                    let keys: Vec<u64> = (0..rng.below(cap))
                        .map(|_| cache_key(&mut rng, cap * 3))
                        .collect();
                    sim.lookup(&keys, true, 0);
                }
                _ => {
                    let keys: Vec<u64> = (0..rng.below(8))
                        .map(|_| cache_key(&mut rng, cap * 3))
                        .collect();
                    let want = keys
                        .iter()
                        .collect::<HashSet<_>>()
                        .into_iter()
                        .filter(|k| model.remove(k).is_some())
                        .count();
                    assert_eq!(
                        sim.take(&keys, false, 0).3,
                        want as u64,
                        "step {step}: delete"
                    );
                }
            }
            let keys: Vec<u64> = model.keys().copied().collect();
            let (v, f) = sim.lookup(&keys, false, 0);
            for (i, k) in keys.iter().enumerate() {
                assert!(f[i], "step {step}: key {k} lost");
                assert_eq!(v[i * w..(i + 1) * w], model[k][..], "step {step}: key {k}");
            }
            assert_eq!(sim.len(0), model.len() as u64, "step {step}: len");
        }
    }
}

/// LRU entries written by one batch leave in the order of the batch, whatever order the
/// threads took the bucket in.
#[test]
fn cache_lru_ties_leave_in_batch_order() {
    for round in 0..10u64 {
        let mut sim = CacheSim::new(1, 1, cache_policy::LRU, 8);
        let keys: Vec<u64> = (0..B as u64).map(|k| k * 31 + round).collect();
        assert!(sim.put(&keys, &keys, None, None, 0).is_empty());
        for (i, &k) in keys.iter().enumerate() {
            let new = 1000 + i as u64;
            let ev = sim.put(&[new], &[new], None, None, 0);
            assert_eq!(ev, vec![(k, vec![k], 1, 0)], "round {round}: eviction {i}");
        }
    }
}

#[test]
fn cache_args_layout() {
    assert_eq!(core::mem::size_of::<CacheTableArgs>(), 88);
    assert_eq!(core::mem::size_of::<CacheArgs>(), 248);
    assert_eq!(dedup_rank(0, 5, false), 1);
    assert_eq!(dedup_rank(0, 5, true), 5);
    assert_eq!(dedup_rank(4, 5, true), 1);
    assert_eq!(cache::expiry(10, 0), 0);
    assert_eq!(cache::expiry(10, 5), 15);
    assert_eq!(cache::expiry(u64::MAX, 5), u64::MAX);
    assert_eq!(cache::lru_score(3, 0), (3 << 32) | 1);
    assert_eq!(
        cache::visible_score(cache_policy::LRU, cache::lru_score(3, 9)),
        3
    );
    assert_eq!(cache::visible_score(cache_policy::LFU, 7), 7);
}
