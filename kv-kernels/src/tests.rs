//! Host tests: the kernels' per-item algorithms run over host memory with `core::sync::atomic`
//! (sequentially and on several threads, one pass at a time as the kernels run), checked
//! against a `HashMap` model.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub(crate) use crate::host::Host;
use crate::layout::*;
use crate::ops;

/// `threads` value for [`par`]: sequential, from the last item down (so that in the dedup
/// pass the claimer of a repeated key's local slot is its last occurrence).
pub(crate) const REVERSED: u64 = 0;

/// Runs `f(i)` for `i in 0..n`, on `threads` threads (interleaved) or sequentially (1 in
/// order, [`REVERSED`] from the end).
pub(crate) fn par(n: u64, threads: u64, f: impl Fn(u64) + Sync) {
    if threads == REVERSED {
        (0..n).rev().for_each(f);
        return;
    }
    if threads == 1 {
        (0..n).for_each(f);
        return;
    }
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || {
                let mut i = t;
                while i < n {
                    f(i);
                    i += threads;
                }
            });
        }
    });
}

/// What one put chunk did (for the tests of the put protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkStats {
    /// The chunk's FOUND flag (some item found its key in the table).
    found_flag: bool,
    /// The chunk's DUP flag.
    dup: bool,
    /// Items that found their key earlier in the local table.
    repeats: u64,
    /// Keys newly placed in the key array.
    inserted: u64,
    /// Items that found their key in the key array (placed by an earlier chunk or batch, or
    /// by another item of the chunk).
    found: u64,
    /// Items that placed their key (every non-sentinel item).
    placed: u64,
    /// Items that wrote their row again (the last occurrence of each repeated key).
    rewrote: u64,
}

/// A table in host memory driven exactly as the backend drives the device.
struct Sim {
    width: u32,
    slots: u64,
    /// The slot array: buckets of keys, then their value rows.
    arr: Vec<u64>,
    /// log2 of the slots per bucket.
    shift: u32,
    special: Vec<u64>,
    counters: Vec<u64>,
    threads: u64,
    len: u64,
    tombs: u64,
    seed: u64,
}

/// The hash seed of every simulated table (the backends draw one per table).
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

impl Sim {
    fn new(slots: u64, width: u32, threads: u64) -> Self {
        Sim {
            width,
            slots,
            arr: vec![EMPTY; slot_array_words(slots, width) as usize],
            shift: bucket_shift(slots, width),
            special: vec![0; special_words(width) as usize],
            counters: vec![0; counter::LEN],
            threads,
            len: 0,
            tombs: 0,
            seed: SEED,
        }
    }
    /// The key of every slot, in slot order.
    fn keys(&self) -> Vec<u64> {
        (0..self.slots)
            .map(|s| self.arr[key_word(s, self.width, self.shift) as usize])
            .collect()
    }
    fn table(&mut self) -> TableArgs {
        TableArgs {
            slots: self.arr.as_mut_ptr() as u64,
            special: self.special.as_mut_ptr() as u64,
            counters: self.counters.as_mut_ptr() as u64,
            mask: self.slots - 1,
            width: self.width,
            bucket_shift: self.shift,
            seed: self.seed,
        }
    }
    fn rehash(&mut self, slots: u64) {
        let mut new = Sim::new(slots, self.width, self.threads);
        new.special = std::mem::take(&mut self.special);
        let a = RehashArgs {
            table: new.table(),
            old: self.arr.as_ptr() as u64,
            old_bucket_shift: self.shift as u64,
            old_slots: self.slots,
        };
        let moved = AtomicU64::new(0);
        par(self.slots, self.threads, |s| {
            // SAFETY: buffers are live and sized as the args say.
            let m = unsafe { ops::rehash_item::<Host>(&a, s) }.expect("room in the new table");
            moved.fetch_add(m as u64, Relaxed);
        });
        let live = self.keys().iter().filter(|k| !is_sentinel(**k)).count() as u64;
        assert_eq!(live, moved.load(Relaxed));
        new.len = self.len;
        *self = new;
    }
    /// Puts one chunk as the backend's four put passes do; returns what it saw.
    fn put_chunk(&mut self, keys: &[u64], vals: &[u64]) -> ChunkStats {
        let n = keys.len() as u64;
        let lslots = local_slots(n);
        let mut slot_of = vec![u32::MAX; keys.len()];
        // Dirty: the settle pass must zero the local table when the chunk needs it.
        let mut local = vec![0xdead_beef_u32; lslots as usize];
        let mut flags = [0u32; flag::LEN];
        self.counters.fill(0);
        let a = BatchArgs {
            table: self.table(),
            keys_in: keys.as_ptr() as u64,
            values: vals.as_ptr() as u64,
            found_out: 0,
            slot_of: slot_of.as_mut_ptr() as u64,
            local: local.as_mut_ptr() as u64,
            local_mask: lslots - 1,
            flags: flags.as_mut_ptr() as u64,
            n,
        };
        // Pass 1: place.
        let (ins, fe) = (AtomicU64::new(0), AtomicU64::new(0));
        let (found, placed) = (AtomicU64::new(0), AtomicU64::new(0));
        par(n, self.threads, |i| {
            // SAFETY: the buffers are live and sized as the args say; flags are zeroed.
            let p = unsafe { ops::put_place::<Host>(&a, i) };
            assert!(!p.overflow);
            assert_eq!(p.slot.is_some(), !p.skipped);
            if let Some(slot) = p.slot {
                let (dst, src) = ops::put_row(&a, i, slot);
                // SAFETY: both rows are in bounds (slot < slots, i < n).
                unsafe { ops::copy_row::<Host>(dst, src, self.width) };
            }
            ins.fetch_add(p.inserted as u64, Relaxed);
            fe.fetch_add(p.from_empty as u64, Relaxed);
            found.fetch_add(p.found as u64, Relaxed);
            placed.fetch_add(!p.skipped as u64, Relaxed);
        });
        if found.load(Relaxed) != 0 {
            // SAFETY: the buffers are live and sized as the args say.
            unsafe { ops::raise_flag::<Host>(&a, flag::FOUND) };
        }
        // Pass 2: settle.
        // SAFETY: the buffers are live and sized as the args say; pass 1 ran.
        unsafe { ops::put_specials::<Host>(&a) };
        // SAFETY: as above.
        let found_flag = unsafe { ops::flag_raised::<Host>(&a, flag::FOUND) };
        let repeats = AtomicU64::new(0);
        let rewrote = AtomicU64::new(0);
        if found_flag {
            par(lslots, self.threads, |s| {
                // SAFETY: s <= local_mask.
                unsafe { ops::clear_local::<Host>(&a, s) };
            });
            // Pass 3: dedup.
            par(n, self.threads, |i| {
                // SAFETY: the buffers are live and sized as the args say; local is zeroed.
                let d = unsafe { ops::put_dedup::<Host>(&a, i) };
                assert!(!d.overflow);
                repeats.fetch_add(d.repeat as u64, Relaxed);
            });
            if repeats.load(Relaxed) != 0 {
                // SAFETY: the buffers are live and sized as the args say.
                unsafe { ops::raise_flag::<Host>(&a, flag::DUP) };
            }
        }
        // SAFETY: as above.
        let dup = unsafe { ops::flag_raised::<Host>(&a, flag::DUP) };
        if dup {
            // Pass 4: rewrite.
            par(n, self.threads, |i| {
                // SAFETY: the buffers are live and sized as the args say; pass 3 ran.
                let r = unsafe { ops::put_rewrite::<Host>(&a, i) };
                assert!(!r.missing);
                if let Some(slot) = r.slot {
                    let (dst, src) = ops::put_row(&a, i, slot);
                    // SAFETY: both rows are in bounds (slot < slots, i < n).
                    unsafe { ops::copy_row::<Host>(dst, src, self.width) };
                    rewrote.fetch_add(1, Relaxed);
                }
            });
        }
        let (ins, fe) = (ins.load(Relaxed), fe.load(Relaxed));
        self.len += ins + self.counters[counter::SPEC_INSERTED];
        self.tombs -= ins - fe;
        ChunkStats {
            found_flag,
            dup,
            repeats: repeats.load(Relaxed),
            inserted: ins,
            found: found.load(Relaxed),
            placed: placed.load(Relaxed),
            rewrote: rewrote.load(Relaxed),
        }
    }
    fn put(&mut self, keys: &[u64], vals: &[u64], chunk: usize) {
        let w = self.width as usize;
        // Growth as the backend does it (max load 0.75 here).
        let cap = |slots: u64| slots * 3 / 4;
        let n = keys.len() as u64;
        if self.len + n > cap(self.slots) {
            let mut s = self.slots * 2;
            while self.len + n > cap(s) {
                s *= 2;
            }
            self.rehash(s);
        } else if self.len + self.tombs + n > cap(self.slots) {
            self.rehash(self.slots);
        }
        for (k, v) in keys.chunks(chunk).zip(vals.chunks(chunk * w)) {
            // What the chunk must report: every item places its key, one insertion per
            // distinct new key, every other item finds its key; FOUND when any did, DUP
            // exactly when a key repeats, one rewrite per repeated key.
            let mut distinct: Vec<u64> = k.iter().copied().filter(|k| !is_sentinel(*k)).collect();
            let plain = distinct.len() as u64;
            distinct.sort_unstable();
            let repeated = distinct
                .chunk_by(|a, b| a == b)
                .filter(|run| run.len() > 1)
                .count() as u64;
            distinct.dedup();
            let present = self.get(&distinct).1.iter().filter(|f| **f).count() as u64;
            let d = distinct.len() as u64;
            let st = self.put_chunk(k, v);
            let expect = ChunkStats {
                found_flag: plain > d - present,
                dup: plain > d,
                repeats: plain - d,
                inserted: d - present,
                found: plain - (d - present),
                placed: plain,
                rewrote: repeated,
            };
            assert_eq!(st, expect);
        }
    }
    fn get(&mut self, keys: &[u64]) -> (Vec<u64>, Vec<bool>) {
        let w = self.width as usize;
        let mut vals = vec![u64::MAX; keys.len() * w];
        let mut found = vec![7u8; keys.len()];
        let a = BatchArgs {
            table: self.table(),
            keys_in: keys.as_ptr() as u64,
            values: vals.as_mut_ptr() as u64,
            found_out: found.as_mut_ptr() as u64,
            n: keys.len() as u64,
            ..Default::default()
        };
        // SAFETY: buffers are live and sized as the args say.
        par(keys.len() as u64, self.threads, |i| {
            // SAFETY: the buffers are live and sized as the args say.
            unsafe {
                let f = ops::get_item::<Host>(&a, i);
                ops::write_found::<Host>(&a, i, f);
            }
        });
        assert!(found.iter().all(|f| *f <= 1));
        (vals, found.iter().map(|f| *f == 1).collect())
    }
    fn count_missing(&mut self, keys: &[u64]) -> u64 {
        let a = BatchArgs {
            table: self.table(),
            keys_in: keys.as_ptr() as u64,
            n: keys.len() as u64,
            ..Default::default()
        };
        let missing = AtomicU64::new(0);
        par(keys.len() as u64, self.threads, |i| {
            // SAFETY: the buffers are live and sized as the args say.
            let m = unsafe { ops::missing_item::<Host>(&a, i) };
            missing.fetch_add(m as u64, Relaxed);
        });
        missing.into_inner()
    }
    fn delete(&mut self, keys: &[u64]) -> u64 {
        let a = BatchArgs {
            table: self.table(),
            keys_in: keys.as_ptr() as u64,
            n: keys.len() as u64,
            ..Default::default()
        };
        let (t, s) = (AtomicU64::new(0), AtomicU64::new(0));
        // SAFETY: buffers are live and sized as the args say.
        par(keys.len() as u64, self.threads, |i| {
            // SAFETY: the buffers are live and sized as the args say.
            let r = unsafe { ops::delete_item::<Host>(&a, i) };
            t.fetch_add(r.table as u64, Relaxed);
            s.fetch_add(r.special as u64, Relaxed);
        });
        let (t, s) = (t.load(Relaxed), s.load(Relaxed));
        self.len -= t + s;
        self.tombs += t;
        t + s
    }
}

/// The tests' random numbers: splitmix64.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn key(&mut self, range: u64) -> u64 {
        match self.next() % 16 {
            0 => u64::MAX,
            1 => u64::MAX - 1,
            2 => 0,
            3 => 1,
            _ => self.next() % range,
        }
    }
}

fn check(sim: &mut Sim, model: &HashMap<u64, Vec<u64>>, probe: &[u64]) {
    let w = sim.width as usize;
    let (vals, found) = sim.get(probe);
    for (i, k) in probe.iter().enumerate() {
        match model.get(k) {
            Some(v) => {
                assert!(found[i], "key {k} missing");
                assert_eq!(&vals[i * w..(i + 1) * w], &v[..], "key {k}");
            }
            None => {
                assert!(!found[i], "key {k} present");
                assert!(vals[i * w..(i + 1) * w].iter().all(|x| *x == 0));
            }
        }
    }
    assert_eq!(sim.len, model.len() as u64);
    let live = sim.keys().iter().filter(|k| !is_sentinel(**k)).count() as u64
        + sim.special[0]
        + sim.special[1];
    assert_eq!(live, sim.len);
    assert_eq!(
        sim.keys().iter().filter(|k| **k == TOMBSTONE).count() as u64,
        sim.tombs
    );
}

fn differential(
    width: u32,
    threads: u64,
    rounds: usize,
    batch: usize,
    range: u64,
    chunk: usize,
    seed: u64,
) {
    let w = width as usize;
    let mut rng = Rng(seed);
    let mut sim = Sim::new(16, width, threads);
    let mut model: HashMap<u64, Vec<u64>> = HashMap::new();
    for _ in 0..rounds {
        let n = (rng.next() as usize % batch) + 1;
        let keys: Vec<u64> = (0..n).map(|_| rng.key(range)).collect();
        match rng.next() % 3 {
            0 | 1 => {
                let vals: Vec<u64> = (0..n * w).map(|_| rng.next() | 1).collect();
                sim.put(&keys, &vals, chunk);
                for (i, k) in keys.iter().enumerate() {
                    model.insert(*k, vals[i * w..(i + 1) * w].to_vec());
                }
            }
            _ => {
                let removed = sim.delete(&keys);
                let mut expect = 0;
                for k in &keys {
                    expect += model.remove(k).is_some() as u64;
                }
                assert_eq!(removed, expect);
            }
        }
        let probe: Vec<u64> = (0..64).map(|_| rng.key(range)).collect();
        check(&mut sim, &model, &probe);
    }
    let all: Vec<u64> = model.keys().copied().collect();
    check(&mut sim, &model, &all);
}

#[test]
fn hash_is_a_bijection_on_a_sample_and_spreads() {
    let mut seen = std::collections::HashSet::new();
    for k in 0..100_000u64 {
        assert!(seen.insert(hash(k, SEED)));
        assert_eq!(unhash(hash(k, SEED), SEED), k);
    }
    // Sequential keys spread over the low bits.
    let mask = 1023;
    let mut buckets = vec![0u32; 1024];
    for k in 0..102_400u64 {
        buckets[home_slot(k, SEED, mask) as usize] += 1;
    }
    assert!(
        buckets.iter().all(|b| (50..=160).contains(b)),
        "{:?}",
        buckets.iter().max()
    );
}

#[test]
fn buckets_hold_their_keys_then_their_rows() {
    for w in [1u32, 2, 16] {
        let slots = 64u64;
        for shift in [0, BUCKET_SHIFT, 6] {
            let per = 1u64 << shift;
            let bucket = (1 + w as u64) << shift;
            let mut seen = vec![false; slot_array_words(slots, w) as usize];
            for s in 0..slots {
                let k = key_word(s, w, shift) as usize;
                let r = row_word(s, w, shift) as usize;
                // One bucket: its keys, then their rows.
                assert_eq!(k as u64 / bucket, s / per);
                assert_eq!(r as u64 / bucket, s / per);
                assert!((k as u64 % bucket) < per && (r as u64 % bucket) >= per);
                for x in std::iter::once(k).chain(r..r + w as usize) {
                    assert!(!seen[x], "word {x} used twice");
                    seen[x] = true;
                }
            }
            assert!(seen.iter().all(|x| *x), "every word is a key or a row word");
        }
    }
    // Width 1: four keys, then four values, in 64 bytes.
    assert_eq!((key_word(5, 1, 2), row_word(5, 1, 2)), (9, 13));
    // One bucket of every slot: a key array, then a value array.
    assert_eq!((key_word(5, 2, 6), row_word(5, 2, 6)), (5, 64 + 10));
    assert_eq!(bucket_shift(1 << 20, 2), BUCKET_SHIFT);
    assert_eq!(bucket_shift(1 << 20, 1), NARROW_BUCKET_SHIFT);
    assert_eq!(bucket_shift(2, 16), 1);
    assert_eq!(
        (window_slots(1), window_slots(2), window_slots(20)),
        (2, 4, 4)
    );
    // Width 1 in buckets of two: two keys, then two values, in 32 bytes.
    assert_eq!((key_word(5, 1, 1), row_word(5, 1, 1)), (9, 11));
}

#[test]
fn differential_one_bucket_layout() {
    // One bucket of every slot: a key array, then a value array.
    let mut sim = Sim::new(1 << 12, 2, 4);
    sim.shift = 12;
    let keys: Vec<u64> = (0..3000u64).map(|k| k * 13 + 2).collect();
    let vals: Vec<u64> = (0..6000u64).collect();
    sim.put(&keys, &vals, 1024);
    let (v, f) = sim.get(&keys);
    assert!(f.iter().all(|f| *f));
    assert_eq!(v, vals);
    assert_eq!(sim.delete(&keys[..1000]), 1000);
    sim.rehash(1 << 13);
    let (v, f) = sim.get(&keys[1000..]);
    assert!(f.iter().all(|f| *f));
    assert_eq!(v, vals[2000..]);
}

#[test]
fn sentinels_and_layout() {
    assert!(is_sentinel(0) && is_sentinel(1) && !is_sentinel(2) && !is_sentinel(u64::MAX));
    assert_eq!((EMPTY, TOMBSTONE), (0, 1));
    assert_eq!(special_index(0), 0);
    assert_eq!(special_index(1), 1);
    assert_eq!(next_slot(15, 15), 0);
    assert_eq!(special_row(1, 4), 6);
    assert_eq!(special_words(16), 34);
    assert_eq!(crate::grid_size(0, 132), 1);
    assert_eq!(crate::grid_size(1000, 132), 4);
    assert_eq!(
        crate::grid_size(u64::MAX / 2, 132),
        132 * crate::BLOCKS_PER_SM
    );
}

#[test]
fn put_last_wins_within_a_chunk() {
    for threads in [1, REVERSED, 4] {
        let mut sim = Sim::new(64, 2, threads);
        let keys = [5, 7, 5, 0, 5, 0, 7, 1];
        let vals: Vec<u64> = (1..=16).collect();
        sim.put(&keys, &vals, 1024);
        let (v, f) = sim.get(&[5, 7, 0, 1, 9]);
        assert_eq!(f, [true, true, true, true, false]);
        assert_eq!(v, [9, 10, 13, 14, 11, 12, 15, 16, 0, 0]);
        assert_eq!(sim.len, 4);
    }
}

#[test]
fn count_missing_counts_every_absent_occurrence() {
    for threads in [1, 4] {
        let mut sim = Sim::new(64, 1, threads);
        sim.put(&[2, 3, 4, 0], &[10, 20, 30, 40], 16);
        assert_eq!(sim.delete(&[3]), 1);
        // 3 (deleted) twice, 5 twice, 1 (a special key, absent) once; 2, 4 and 0 present.
        assert_eq!(sim.count_missing(&[2, 3, 5, 3, 4, 0, 1, 5]), 5);
        assert_eq!(sim.count_missing(&[]), 0);
    }
}

#[test]
fn delete_counts_repeats_once_and_reuses_tombstones() {
    let mut sim = Sim::new(16, 1, 1);
    sim.put(&[2, 3, 4, 0], &[10, 20, 30, 40], 16);
    assert_eq!(sim.delete(&[2, 2, 3, 9, 0, 0]), 3);
    assert_eq!(sim.tombs, 2);
    sim.put(&[2, 5], &[11, 44], 16);
    assert_eq!(sim.len, 3);
    let (v, f) = sim.get(&[2, 3, 4, 5, 0]);
    assert_eq!(f, [true, false, true, true, false]);
    assert_eq!(v, [11, 0, 30, 44, 0]);
}

#[test]
fn differential_sequential_widths() {
    for (w, seed) in [(1, 1), (2, 2), (16, 3)] {
        differential(w, 1, 300, 200, 500, 64, seed);
        differential(w, REVERSED, 300, 200, 500, 64, seed + 100);
    }
}

#[test]
fn differential_threaded_races() {
    // Small key range and chunks: many duplicates racing inside each pass.
    for (w, seed) in [(1, 11), (2, 12), (16, 13)] {
        differential(w, 8, 60, 400, 100, 128, seed);
    }
}

#[test]
fn differential_threaded_growth() {
    differential(1, 4, 40, 5000, 1 << 20, 1000, 21);
}

#[test]
fn overwrite_only_chunks_raise_no_dup() {
    for threads in [1, 4] {
        let mut sim = Sim::new(4096, 2, threads);
        let keys: Vec<u64> = (0..1000).map(|k| k * 7 + 2).collect();
        let vals: Vec<u64> = (0..2000).collect();
        let st = sim.put_chunk(&keys, &vals);
        assert_eq!(
            (st.found_flag, st.dup, st.inserted, st.found, st.placed),
            (false, false, 1000, 0, 1000)
        );
        // The same keys again, in another order, with new values: overwrites only.
        let mut again = keys.clone();
        again.reverse();
        let vals2: Vec<u64> = (0..2000).map(|v| v + 10_000).collect();
        let st = sim.put_chunk(&again, &vals2);
        assert_eq!(
            (
                st.found_flag,
                st.dup,
                st.inserted,
                st.found,
                st.placed,
                st.rewrote
            ),
            (true, false, 0, 1000, 1000, 0)
        );
        assert_eq!(sim.len, 1000);
        let (v, f) = sim.get(&again);
        assert!(f.iter().all(|f| *f));
        assert_eq!(v, vals2);
    }
}

#[test]
fn heavy_repeats_last_wins_and_count_once() {
    for threads in [1, REVERSED, 8] {
        let mut sim = Sim::new(64, 1, threads);
        // One key 5000 times, another every 7th item, a sentinel every 11th.
        let keys: Vec<u64> = (0..5000u64)
            .map(|i| match i {
                _ if i % 11 == 3 => 1,
                _ if i % 7 == 0 => 42,
                _ => 9,
            })
            .collect();
        let vals: Vec<u64> = (1..=5000).collect();
        let plain = keys.iter().filter(|k| !is_sentinel(**k)).count() as u64;
        let st = sim.put_chunk(&keys, &vals);
        assert!(st.found_flag && st.dup);
        assert_eq!(
            (st.inserted, st.found, st.placed, st.rewrote),
            (2, plain - 2, plain, 2)
        );
        assert_eq!(sim.len, 3);
        let last = |k: u64| keys.iter().rposition(|x| *x == k).expect("in the chunk") as u64 + 1;
        let (v, f) = sim.get(&[9, 42, 1]);
        assert_eq!(f, [true, true, true]);
        assert_eq!(v, [last(9), last(42), last(1)]);
        // Again: every key is an overwrite and repeats.
        let st = sim.put_chunk(&keys, &vals.iter().map(|v| v + 1).collect::<Vec<_>>());
        assert_eq!(
            (st.dup, st.inserted, st.found, st.placed, st.rewrote),
            (true, 0, plain, plain, 2)
        );
        assert_eq!(sim.len, 3);
        assert_eq!(sim.get(&[9]).0, [last(9) + 1]);
    }
}

#[test]
fn local_table_collisions_wrap_around() {
    // Keys whose local home is the last slot of the local table of a 16-item chunk, so that
    // their probes collide and wrap to slot 0.
    let n = 16u64;
    let lmask = local_slots(n) - 1;
    let hot: Vec<u64> = (0..)
        .filter(|k| home_slot(*k, SEED, lmask) == lmask)
        .take(5)
        .collect();
    for threads in [1, 4] {
        let mut sim = Sim::new(256, 1, threads);
        let keys: Vec<u64> = (0..n).map(|i| hot[(i * 3 % 5) as usize]).collect();
        let vals: Vec<u64> = (100..100 + n).collect();
        let st = sim.put_chunk(&keys, &vals);
        assert_eq!(
            (st.dup, st.repeats, st.placed, st.rewrote),
            (true, n - 5, n, 5)
        );
        let (v, f) = sim.get(&hot);
        assert!(f.iter().all(|f| *f));
        for (j, k) in hot.iter().enumerate() {
            let last = keys.iter().rposition(|x| x == k).expect("in the chunk");
            assert_eq!(v[j], vals[last]);
        }
    }
}

#[test]
fn repeats_reuse_tombstones_once() {
    for threads in [1, REVERSED, 4] {
        let mut sim = Sim::new(64, 1, threads);
        sim.put(&[11, 12, 13, 14], &[10, 20, 30, 40], 16);
        assert_eq!(sim.delete(&[11, 12, 13]), 3);
        assert_eq!(sim.tombs, 3);
        // 12 and 13 come back (twice each), 15 is new and repeated, 14 is overwritten.
        let st = sim.put_chunk(&[12, 15, 13, 12, 14, 15, 13], &[21, 51, 31, 22, 41, 52, 32]);
        assert_eq!(
            (st.dup, st.inserted, st.found, st.placed, st.rewrote),
            (true, 3, 4, 7, 3)
        );
        assert_eq!(sim.len, 4);
        let tombs = sim.keys().iter().filter(|k| **k == TOMBSTONE).count() as u64;
        assert_eq!(tombs, sim.tombs);
        let (v, f) = sim.get(&[11, 12, 13, 14, 15]);
        assert_eq!(f, [false, true, true, true, true]);
        assert_eq!(v, [0, 22, 32, 41, 52]);
    }
}

#[test]
fn local_slots_is_a_power_of_two_of_at_least_twice_the_chunk() {
    assert_eq!(local_slots(1), 64);
    assert_eq!(local_slots(32), 64);
    assert_eq!(local_slots(33), 128);
    assert_eq!(local_slots(1 << 20), 1 << 21);
    for n in [1u64, 5, 4096, 100_000, (1 << 21) + 1] {
        let s = local_slots(n);
        assert!(s.is_power_of_two() && s >= 2 * n);
    }
}

/// Keys that all share home slot `home` in every table of up to 2^32 slots (their hashes
/// agree in the low 32 bits), none of them a sentinel.
fn one_home(home: u64, count: usize) -> Vec<u64> {
    (1u64..)
        .map(|hi| unhash(hi << 32 | home, SEED))
        .filter(|k| !is_sentinel(*k))
        .take(count)
        .collect()
}

#[test]
fn crafted_keys_share_one_chain_under_contention() {
    // 400 keys homed at the table's last slot (so the chain wraps to slot 0), put, every
    // other one deleted, then put back by 8 threads racing for the tombstones: no key lost
    // or doubled, every tombstone accounted for, the last occurrence wins. The table is large
    // enough that the put-back purges nothing: it meets the tombstones.
    let slots = 4096u64;
    let hot = one_home(slots - 1, 400);
    for threads in [1, REVERSED, 8] {
        let mut sim = Sim::new(slots, 2, threads);
        let vals: Vec<u64> = (0..2 * hot.len() as u64).collect();
        sim.put(&hot, &vals, 128);
        let mut model = HashMap::new();
        for (i, k) in hot.iter().enumerate() {
            model.insert(*k, vals[2 * i..2 * i + 2].to_vec());
        }
        for cycle in 0..20u64 {
            let gone: Vec<u64> = hot
                .iter()
                .copied()
                .skip(cycle as usize % 2)
                .step_by(2)
                .collect();
            assert_eq!(sim.delete(&gone), gone.len() as u64);
            // Back in one chunk, each twice, the second occurrence winning. The second half is
            // rotated by one so that the two items of a key run on different threads (`par`
            // hands item i to thread i % threads) and race each other while claiming.
            let mut twice = gone.clone();
            twice.rotate_left(1);
            let again: Vec<u64> = gone.iter().chain(&twice).copied().collect();
            let vals2: Vec<u64> = (0..2 * again.len() as u64)
                .map(|v| v + (cycle + 1) * 1_000_000)
                .collect();
            sim.put(&again, &vals2, 1024);
            for (i, k) in again.iter().enumerate() {
                model.insert(*k, vals2[2 * i..2 * i + 2].to_vec());
            }
            check(&mut sim, &model, &hot);
        }
    }
}
