//! Host tests: the kernels' per-item algorithms run over host memory with `core::sync::atomic`
//! (sequentially and on several threads, one pass at a time as the kernels run), checked
//! against a `HashMap` model.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::layout::*;
use crate::ops::{self, Mem};

struct Host;

fn a64(addr: u64) -> &'static AtomicU64 {
    // SAFETY: the tests pass addresses of live, aligned u64 buffers owned by the SimTable.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}
fn a32(addr: u64) -> &'static AtomicU32 {
    // SAFETY: as above, for u32 buffers.
    unsafe { AtomicU32::from_ptr(addr as *mut u32) }
}
fn a8(addr: u64) -> &'static AtomicU8 {
    // SAFETY: as above, for u8 buffers.
    unsafe { AtomicU8::from_ptr(addr as *mut u8) }
}

// SAFETY: every method performs the named operation (relaxed atomics stand in for plain
// accesses, so that racing passes are not undefined behaviour on the host).
unsafe impl Mem for Host {
    unsafe fn load_sync(addr: u64) -> u64 {
        a64(addr).load(Relaxed)
    }
    unsafe fn load(addr: u64) -> u64 {
        a64(addr).load(Relaxed)
    }
    unsafe fn store(addr: u64, v: u64) {
        a64(addr).store(v, Relaxed)
    }
    unsafe fn load_u32(addr: u64) -> u32 {
        a32(addr).load(Relaxed)
    }
    unsafe fn store_u32(addr: u64, v: u32) {
        a32(addr).store(v, Relaxed)
    }
    unsafe fn load_u8(addr: u64) -> u8 {
        a8(addr).load(Relaxed)
    }
    unsafe fn store_u8(addr: u64, v: u8) {
        a8(addr).store(v, Relaxed)
    }
    unsafe fn cas(addr: u64, current: u64, new: u64) -> u64 {
        match a64(addr).compare_exchange(current, new, Relaxed, Relaxed) {
            Ok(v) | Err(v) => v,
        }
    }
    unsafe fn exch(addr: u64, v: u64) -> u64 {
        a64(addr).swap(v, Relaxed)
    }
    unsafe fn max_u64(addr: u64, v: u64) {
        a64(addr).fetch_max(v, Relaxed);
    }
    unsafe fn max_u32(addr: u64, v: u32) {
        a32(addr).fetch_max(v, Relaxed);
    }
    unsafe fn add(addr: u64, v: u64) {
        a64(addr).fetch_add(v, Relaxed);
    }
}

/// Runs `f(i)` for `i in 0..n`, on `threads` threads (interleaved) or sequentially.
fn par(n: u64, threads: u64, f: impl Fn(u64) + Sync) {
    if threads <= 1 {
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

/// A table in host memory driven exactly as the backend drives the device.
struct Sim {
    width: u32,
    slots: u64,
    keys: Vec<u64>,
    values: Vec<u64>,
    special: Vec<u64>,
    counters: Vec<u64>,
    threads: u64,
    len: u64,
    tombs: u64,
}

impl Sim {
    fn new(slots: u64, width: u32, threads: u64) -> Self {
        Sim {
            width,
            slots,
            keys: vec![EMPTY; slots as usize],
            values: vec![0; (slots * width as u64) as usize],
            special: vec![0; special_words(width) as usize],
            counters: vec![0; counter::LEN],
            threads,
            len: 0,
            tombs: 0,
        }
    }
    fn table(&mut self) -> TableArgs {
        TableArgs {
            keys: self.keys.as_mut_ptr() as u64,
            values: self.values.as_mut_ptr() as u64,
            special: self.special.as_mut_ptr() as u64,
            counters: self.counters.as_mut_ptr() as u64,
            mask: self.slots - 1,
            width: self.width,
            pad: 0,
        }
    }
    fn rehash(&mut self, slots: u64) {
        let mut new = Sim::new(slots, self.width, self.threads);
        new.special = std::mem::take(&mut self.special);
        let a = RehashArgs {
            table: new.table(),
            old_keys: self.keys.as_ptr() as u64,
            old_values: self.values.as_ptr() as u64,
            old_slots: self.slots,
        };
        let moved = AtomicU64::new(0);
        par(self.slots, self.threads, |s| {
            // SAFETY: buffers are live and sized as the args say.
            let m = unsafe { ops::rehash_item::<Host>(&a, s) }.expect("room in the new table");
            moved.fetch_add(m as u64, Relaxed);
        });
        let live = self.keys.iter().filter(|k| !is_sentinel(**k)).count() as u64;
        assert_eq!(live, moved.load(Relaxed));
        new.len = self.len;
        *self = new;
    }
    fn put_chunk(&mut self, keys: &[u64], vals: &[u64]) {
        let n = keys.len() as u64;
        let mut slot_of = vec![0u32; keys.len()];
        let mut win = vec![0u8; keys.len()];
        let mut flags = [0u32; flag::LEN];
        self.counters.fill(0);
        let a = BatchArgs {
            table: self.table(),
            keys_in: keys.as_ptr() as u64,
            values: vals.as_ptr() as u64,
            found_out: 0,
            slot_of: slot_of.as_mut_ptr() as u64,
            win: win.as_mut_ptr() as u64,
            flags: flags.as_mut_ptr() as u64,
            n,
        };
        let found = AtomicU64::new(0);
        let (ins, fe) = (AtomicU64::new(0), AtomicU64::new(0));
        par(n, self.threads, |i| {
            // SAFETY: the buffers are live and sized as the args say.
            let p = unsafe { ops::put_place::<Host>(&a, i) };
            assert!(!p.overflow);
            found.fetch_add(p.found as u64, Relaxed);
            ins.fetch_add(p.inserted as u64, Relaxed);
            fe.fetch_add(p.from_empty as u64, Relaxed);
        });
        if found.load(Relaxed) != 0 {
            // SAFETY: the buffers are live and sized as the args say.
            unsafe { ops::raise_dup::<Host>(&a) };
        }
        // SAFETY: the buffers are live and sized as the args say.
        if unsafe { ops::dup_raised::<Host>(&a) } {
            // SAFETY: the buffers are live and sized as the args say.
            par(n, self.threads, |i| unsafe { ops::put_zero::<Host>(&a, i) });
            // SAFETY: the buffers are live and sized as the args say.
            par(n, self.threads, |i| unsafe { ops::put_max::<Host>(&a, i) });
            // SAFETY: the buffers are live and sized as the args say.
            par(n, self.threads, |i| unsafe { ops::put_win::<Host>(&a, i) });
            // SAFETY: the buffers are live and sized as the args say.
            par(n, self.threads, |i| unsafe {
                ops::put_write_winner::<Host>(&a, i)
            });
        }
        // SAFETY: the buffers are live and sized as the args say.
        unsafe { ops::put_specials::<Host>(&a) };
        let (ins, fe) = (ins.load(Relaxed), fe.load(Relaxed));
        self.len += ins + self.counters[counter::SPEC_INSERTED];
        self.tombs -= ins - fe;
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
            self.put_chunk(k, v);
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
            unsafe { ops::get_item::<Host>(&a, i) };
        });
        assert!(found.iter().all(|f| *f <= 1));
        (vals, found.iter().map(|f| *f == 1).collect())
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

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn key(&mut self, range: u64) -> u64 {
        match self.next() % 16 {
            0 => u64::MAX,
            1 => u64::MAX - 1,
            2 => 0,
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
    let live = sim.keys.iter().filter(|k| !is_sentinel(**k)).count() as u64
        + sim.special[0]
        + sim.special[1];
    assert_eq!(live, sim.len);
    assert_eq!(
        sim.keys.iter().filter(|k| **k == TOMBSTONE).count() as u64,
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
        assert!(seen.insert(hash(k)));
    }
    // Sequential keys spread over the low bits.
    let mask = 1023;
    let mut buckets = vec![0u32; 1024];
    for k in 0..102_400u64 {
        buckets[home_slot(k, mask) as usize] += 1;
    }
    assert!(
        buckets.iter().all(|b| (50..=160).contains(b)),
        "{:?}",
        buckets.iter().max()
    );
}

#[test]
fn sentinels_and_layout() {
    assert!(is_sentinel(u64::MAX) && is_sentinel(u64::MAX - 1) && !is_sentinel(u64::MAX - 2));
    assert_eq!(special_index(u64::MAX - 1), 0);
    assert_eq!(special_index(u64::MAX), 1);
    assert_eq!(next_slot(15, 15), 0);
    assert_eq!(special_row(1, 4), 6);
    assert_eq!(special_words(16), 34);
    assert_eq!(crate::grid_size(0, 132), 1);
    assert_eq!(crate::grid_size(1000, 132), 4);
    assert_eq!(crate::grid_size(u64::MAX / 2, 132), 132 * 32);
}

#[test]
fn put_last_wins_within_a_chunk() {
    for threads in [1, 4] {
        let mut sim = Sim::new(64, 2, threads);
        let keys = [5, 7, 5, u64::MAX, 5, u64::MAX, 7, u64::MAX - 1];
        let vals: Vec<u64> = (1..=16).collect();
        sim.put(&keys, &vals, 1024);
        let (v, f) = sim.get(&[5, 7, u64::MAX, u64::MAX - 1, 9]);
        assert_eq!(f, [true, true, true, true, false]);
        assert_eq!(v, [9, 10, 13, 14, 11, 12, 15, 16, 0, 0]);
        assert_eq!(sim.len, 4);
    }
}

#[test]
fn delete_counts_repeats_once_and_reuses_tombstones() {
    let mut sim = Sim::new(16, 1, 1);
    sim.put(&[1, 2, 3, u64::MAX], &[10, 20, 30, 40], 16);
    assert_eq!(sim.delete(&[1, 1, 2, 9, u64::MAX, u64::MAX]), 3);
    assert_eq!(sim.tombs, 2);
    sim.put(&[1, 4], &[11, 44], 16);
    assert_eq!(sim.len, 3);
    let (v, f) = sim.get(&[1, 2, 3, 4, u64::MAX]);
    assert_eq!(f, [true, false, true, true, false]);
    assert_eq!(v, [11, 0, 30, 44, 0]);
}

#[test]
fn differential_sequential_widths() {
    for (w, seed) in [(1, 1), (2, 2), (16, 3)] {
        differential(w, 1, 300, 200, 500, 64, seed);
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
