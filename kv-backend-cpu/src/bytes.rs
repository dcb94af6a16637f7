//! Byte tables on the CPU ([`CpuBytes`]): byte-string keys and values in an arena of host
//! memory planned by `kv_arena`, the plan every backend shares (docs/arena.md).
//!
//! The index is a `hashbrown` [`HashTable`] of entries (the key's hash, the record's
//! address, the key's and value's lengths) whose equality compares the key's bytes in the
//! arena, so keys whose hashes collide stay distinct. The arena's segments are boxed
//! slices, allocated when the plan opens a segment and freed when it gives one back.
//!
//! A batch takes the table's lock (a read lock for lookups, the write lock for changes),
//! so each batch is atomic for other callers. A put is checked, deduplicated (the last
//! occurrence of a key wins), its distinct keys looked up (which of them the table holds),
//! admitted by the shared sizing rule and placed in the arena before anything changes;
//! then its records are written and the index updated: a key the table did not hold is
//! inserted with no second lookup. After a
//! put or delete, compaction moves a bounded number of live bytes (eight times what the
//! batch wrote, saved up over batches too small to compact alone, at least a segment's
//! worth: `kv_arena::ArenaPlan::compaction_allowance`) out of the emptiest sealed segments.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;
use kv_arena::{ArenaPlan, default_segment_bytes, record_lens};
use kv_core::{
    Binary, BinaryBuf, ByteConfig, ByteDescription, ByteImage, ByteLimits, ByteTable, Error,
    Result, capacity_of, check_byte_lookup, check_byte_put, check_per_key, last_occurrences,
    remaining_ttl,
};
use kv_kernels::layout::{byte_hash, expired, expiry_time};
use rayon::prelude::*;

/// Batches at least this long hash their keys on every core.
const PARALLEL_HASH: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: u64,
    addr: u64,
    key_len: u32,
    value_len: u32,
    /// When the entry expires on the table's clock (0: never).
    expires: u64,
}

impl Entry {
    fn record_len(&self) -> u64 {
        u64::from(self.key_len) + u64::from(self.value_len)
    }
}

/// A byte table in host memory (see the module docs).
///
/// ```
/// use kv_backend_cpu::CpuBytes;
/// use kv_core::{ByteConfig, ByteTable};
/// let t = CpuBytes::open(ByteConfig::new(1000)).unwrap();
/// t.put_slices(&[b"user:1", b"user:2"], &[b"alice", b""]).unwrap();
/// assert_eq!(
///     t.get_slices(&[b"user:2", b"user:3"]).unwrap(),
///     [Some(vec![]), None]
/// );
/// ```
pub struct CpuBytes {
    cfg: ByteConfig,
    seed: u64,
    mask: u64,
    state: RwLock<State>,
}

struct State {
    index: HashTable<Entry>,
    /// The slot count the shared sizing rule sees (capacity = slots * max load).
    slots: usize,
    arena: ArenaPlan,
    /// Segment memory by segment number (empty: free).
    memory: Vec<Box<[u8]>>,
    /// By segment number, the (hash, address) of every record placed in the segment since
    /// it was opened, live or dead: what compaction finds a victim's live records by (an
    /// entry of that hash still at that address), instead of a scan of the whole index.
    placed: Vec<Vec<(u64, u64)>>,
    /// The hashes of entries given an expiry time, by that time. An entry whose expiry
    /// changed since leaves a stale timer behind, which finds nothing when it is due.
    timers: BTreeMap<u64, Vec<u64>>,
}

impl State {
    fn value(&self, e: &Entry) -> &[u8] {
        read(
            &self.memory,
            &self.arena,
            e.addr + u64::from(e.key_len),
            u64::from(e.value_len),
        )
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<&Entry> {
        self.index
            .find(hash, holds_key(&self.memory, &self.arena, hash, key))
    }

    /// The live (not expired at `now`) entry of `key`.
    fn find_live(&self, hash: u64, key: &[u8], now: u64) -> Option<&Entry> {
        self.find(hash, key).filter(|e| !expired(e.expires, now))
    }

    /// Removes every entry expired at `now` and gives its bytes back.
    fn purge(&mut self, now: u64) {
        let due = match now.checked_add(1) {
            Some(after) => {
                let later = self.timers.split_off(&after);
                std::mem::replace(&mut self.timers, later)
            }
            None => std::mem::take(&mut self.timers),
        };
        for hash in due.into_values().flatten() {
            while let Ok(found) = self.index.find_entry(hash, |e| expired(e.expires, now)) {
                let (e, _) = found.remove();
                self.arena.free(e.addr, e.record_len());
            }
        }
        self.drop_released();
    }

    /// Gives `e` the expiry of a time to live of `ttl_ms` from `now`.
    fn set_expiry(timers: &mut BTreeMap<u64, Vec<u64>>, e: &mut Entry, now: u64, ttl_ms: u64) {
        e.expires = expiry_time(now, ttl_ms);
        if e.expires != 0 {
            timers.entry(e.expires).or_default().push(e.hash);
        }
    }

    /// Gives memory to the segments a placement opened. A failed allocation frees what
    /// this call gave and answers [`Error::OutOfDeviceMemory`].
    fn provide(&mut self, opened: &[u32]) -> Result<()> {
        let size = self.arena.segment_bytes();
        for (done, &id) in opened.iter().enumerate() {
            let mut v: Vec<u8> = Vec::new();
            if v.try_reserve_exact(size as usize).is_err() {
                for &undo in &opened[..done] {
                    self.memory[undo as usize] = Box::default();
                }
                return Err(Error::OutOfDeviceMemory {
                    backend: "cpu",
                    requested_bytes: size,
                });
            }
            v.resize(size as usize, 0);
            let id = id as usize;
            if self.memory.len() <= id {
                self.memory.resize_with(id + 1, Box::default);
            }
            self.memory[id] = v.into_boxed_slice();
        }
        Ok(())
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        // An empty value of a record that ends a segment starts at the next segment's
        // first byte, which may have no memory: there is nothing to write.
        if bytes.is_empty() {
            return;
        }
        let seg = self.arena.segment_of(addr) as usize;
        let off = self.arena.offset_of(addr) as usize;
        self.memory[seg][off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// Puts back the plan saved before a placement whose memory could not be had, and
    /// frees what the placement's new segments were given. Freeing the placed records
    /// instead would leave an emptied head that the plan still writes to.
    fn undo_placement(&mut self, saved: ArenaPlan, opened: &[u32]) {
        self.arena = saved;
        for &id in opened {
            // A head emptied and reopened by the placement is in use again in the plan.
            if !self.arena.in_use(id)
                && let Some(m) = self.memory.get_mut(id as usize)
            {
                *m = Box::default();
            }
        }
    }

    /// Starts the record lists of segments a placement opened (a segment number may be
    /// reused; a head emptied and reopened held only dead records).
    fn opened(&mut self, opened: &[u32]) {
        for &id in opened {
            if let Some(list) = self.placed.get_mut(id as usize) {
                list.clear();
            }
        }
    }

    /// Notes the record of `hash` placed at `addr` in its segment's list.
    fn note_placed(&mut self, hash: u64, addr: u64) {
        let seg = self.arena.segment_of(addr) as usize;
        if self.placed.len() <= seg {
            self.placed.resize_with(seg + 1, Vec::new);
        }
        self.placed[seg].push((hash, addr));
    }

    /// Frees the memory of the segments the arena gave back.
    fn drop_released(&mut self) {
        for id in self.arena.take_released() {
            if let Some(m) = self.memory.get_mut(id as usize) {
                *m = Box::default();
            }
            if let Some(list) = self.placed.get_mut(id as usize) {
                *list = Vec::new();
            }
        }
    }

    /// Moves the live records of the emptiest sealed segments, at most about
    /// `max_live_bytes` of them (`force`: even when the arena is not fragmented, to make
    /// room under a budget). Best effort: when the moved records find no room (the budget),
    /// nothing moves.
    fn compact(&mut self, max_live_bytes: u64, force: bool) {
        let victims = self.arena.victims(max_live_bytes, force);
        if victims.is_empty() {
            return;
        }
        // (hash, index bucket, addr) of each record to move. The buckets stay valid: the
        // index does not change until the records have moved.
        let mut moving: Vec<(u64, usize, u64)> = Vec::new();
        let mut lens = Vec::new();
        for &v in &victims {
            for &(hash, addr) in self.placed.get(v as usize).map_or(&[][..], Vec::as_slice) {
                if let Some(b) = self.index.find_bucket_index(hash, |e| e.addr == addr) {
                    moving.push((hash, b, addr));
                    lens.push(self.index.get_bucket(b).map_or(0, Entry::record_len));
                }
            }
        }
        let saved = self.arena.clone();
        let placed = match self.arena.place(&lens) {
            Ok(p) => p,
            Err(_) => return,
        };
        if self.provide(&placed.opened).is_err() {
            // Undo the placement: the new places were never written.
            self.undo_placement(saved, &placed.opened);
            return;
        }
        self.opened(&placed.opened);
        let mut record = Vec::new();
        for ((&(hash, bucket, old), &len), &new) in moving.iter().zip(&lens).zip(&placed.addrs) {
            self.note_placed(hash, new);
            record.clear();
            record.extend_from_slice(read(&self.memory, &self.arena, old, len));
            self.write(new, &record);
            if let Some(e) = self.index.get_bucket_mut(bucket) {
                e.addr = new;
            }
            self.arena.free(old, len);
        }
        self.arena.count_compacted(lens.iter().sum());
        self.drop_released();
    }
}

/// The index's equality: whether an entry holds `key`, byte for byte (its hash may be
/// shared by other keys). Takes the arena's parts, not the state, so that callers can hold
/// the index mutably beside it.
fn holds_key<'a>(
    memory: &'a [Box<[u8]>],
    arena: &'a ArenaPlan,
    hash: u64,
    key: &'a [u8],
) -> impl Fn(&Entry) -> bool + 'a {
    // The full hash first: the index compares only seven bits of it before calling this,
    // and a record's bytes are a trip to memory.
    move |e| {
        e.hash == hash
            && e.key_len as usize == key.len()
            && read(memory, arena, e.addr, u64::from(e.key_len)) == key
    }
}

fn read<'m>(memory: &'m [Box<[u8]>], arena: &ArenaPlan, addr: u64, len: u64) -> &'m [u8] {
    // As in `State::write`: an empty value may start past its segment's end.
    if len == 0 {
        return &[];
    }
    let seg = arena.segment_of(addr) as usize;
    let off = arena.offset_of(addr) as usize;
    &memory[seg][off..off + len as usize]
}

impl CpuBytes {
    /// Opens a byte table; [`Error::InvalidConfig`] for a config that
    /// [`ByteConfig::validate`] refuses or a device other than 0.
    pub fn open(cfg: ByteConfig) -> Result<Self> {
        cfg.validate()?;
        cfg.table.device_among(1, "cpu")?;
        let segment = cfg
            .segment_bytes
            .unwrap_or_else(|| default_segment_bytes(cfg.max_record_bytes()));
        let state = State {
            index: HashTable::new(),
            slots: cfg.table.initial_slots(),
            arena: ArenaPlan::new(segment, cfg.arena_budget),
            memory: Vec::new(),
            placed: Vec::new(),
            timers: BTreeMap::new(),
        };
        Ok(CpuBytes {
            seed: cfg.table.table_seed(),
            mask: cfg.hash_mask(),
            cfg,
            state: RwLock::new(state),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn hashes(&self, keys: Binary<'_>) -> Vec<u64> {
        let h = |i: usize| byte_hash(keys.get(i), self.seed) & self.mask;
        if keys.len() >= PARALLEL_HASH {
            (0..keys.len()).into_par_iter().map(h).collect()
        } else {
            (0..keys.len()).map(h).collect()
        }
    }

    fn now(&self) -> u64 {
        self.cfg.clock.now_ms()
    }

    /// The write lock, with every entry expired at `now` removed.
    fn write_at(&self, now: u64) -> RwLockWriteGuard<'_, State> {
        let mut st = self.write();
        st.purge(now);
        st
    }

    /// The live entry of each key at `now`, or `None`.
    fn lookup(&self, st: &State, keys: Binary<'_>, now: u64) -> Vec<Option<Entry>> {
        let hashes = self.hashes(keys);
        let one = |i: usize| st.find_live(hashes[i], keys.get(i), now).copied();
        if keys.len() >= PARALLEL_HASH {
            (0..keys.len()).into_par_iter().map(one).collect()
        } else {
            (0..keys.len()).map(one).collect()
        }
    }
}

impl CpuBytes {
    fn put_inner(
        &self,
        keys: Binary<'_>,
        values: Binary<'_>,
        ttl_ms: Option<&[u64]>,
    ) -> Result<()> {
        check_byte_put(&self.limits(), keys, values)?;
        if let Some(t) = ttl_ms {
            check_per_key(keys, "ttl_ms", t)?;
        }
        if keys.is_empty() {
            return Ok(());
        }
        let hashes = self.hashes(keys);
        let winners = last_occurrences(keys, &hashes);
        let now = self.now();
        let mut guard = self.write_at(now);
        let st = &mut *guard;
        // Where the table holds each winner already (its bucket), or `None`. The winners
        // are distinct keys, so this stays true while they are applied: a fresh key is
        // inserted without a second lookup, and a held one is overwritten in its bucket
        // (valid while the index does not grow; see below). (Looking them up on every core
        // measured slower on two cores, the fork-join costing more than the lookups it
        // spread.)
        let find = |st: &State, i: usize| {
            st.index.find_bucket_index(
                hashes[i],
                holds_key(&st.memory, &st.arena, hashes[i], keys.get(i)),
            )
        };
        let mut held: Vec<Option<usize>> = winners.iter().map(|&i| find(st, i)).collect();
        let fresh = held.iter().filter(|b| b.is_none()).count();
        let slots = self.cfg.admit(st.index.len(), fresh, st.slots)?;
        let lens = record_lens(keys, values, &winners);
        let written: u64 = lens.iter().sum();
        // Over the budget: compact (that moves records, never changes contents) and place
        // again, on the plan as compaction left it, which is what a failure restores.
        let mut saved = st.arena.clone();
        let placed = match st.arena.place(&lens) {
            Ok(p) => p,
            Err(Error::BudgetExceeded { .. }) => {
                st.compact(u64::MAX, true);
                saved = st.arena.clone();
                st.arena.place(&lens)?
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = st.provide(&placed.opened) {
            st.undo_placement(saved, &placed.opened);
            return Err(e);
        }
        // `capacity()` (entries plus room) changes whenever a reserve moves entries: when
        // it grows the index, and when it rehashes in place to reclaim removed entries'
        // places.
        let room = st.index.capacity();
        if st.index.try_reserve(fresh, |e| e.hash).is_err() {
            st.undo_placement(saved, &placed.opened);
            return Err(Error::OutOfDeviceMemory {
                backend: "cpu",
                requested_bytes: (fresh * std::mem::size_of::<Entry>()) as u64,
            });
        }
        if st.index.capacity() != room {
            // The entries moved to other buckets: find the held ones again. (Inserting
            // the fresh keys below cannot move them: room for them is reserved.)
            for (b, &i) in held.iter_mut().zip(&winners) {
                if b.is_some() {
                    *b = find(st, i);
                }
            }
        }
        st.slots = slots;
        st.opened(&placed.opened);
        for ((&i, &addr), &bucket) in winners.iter().zip(&placed.addrs).zip(&held) {
            let (key, value) = (keys.get(i), values.get(i));
            st.note_placed(hashes[i], addr);
            st.write(addr, key);
            st.write(addr + key.len() as u64, value);
            let mut entry = Entry {
                hash: hashes[i],
                addr,
                key_len: key.len() as u32,
                value_len: value.len() as u32,
                expires: 0,
            };
            let State {
                index,
                arena,
                timers,
                ..
            } = &mut *st;
            State::set_expiry(timers, &mut entry, now, ttl_ms.map_or(0, |t| t[i]));
            match bucket.and_then(|b| index.get_bucket_mut(b)) {
                Some(old) => {
                    let (old_addr, old_len) = (old.addr, old.record_len());
                    *old = entry;
                    arena.free(old_addr, old_len);
                }
                None => {
                    index.insert_unique(hashes[i], entry, |e| e.hash);
                }
            }
        }
        st.drop_released();
        let bound = st.arena.compaction_allowance(written);
        st.compact(bound, false);
        Ok(())
    }
}

impl ByteTable for CpuBytes {
    fn put(&self, keys: Binary<'_>, values: Binary<'_>) -> Result<()> {
        self.put_inner(keys, values, None)
    }

    fn put_ttl(&self, keys: Binary<'_>, values: Binary<'_>, ttl_ms: &[u64]) -> Result<()> {
        self.put_inner(keys, values, Some(ttl_ms))
    }

    fn expire(&self, keys: Binary<'_>, ttl_ms: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_byte_lookup(&self.limits(), keys, found_out)?;
        check_per_key(keys, "ttl_ms", ttl_ms)?;
        let hashes = self.hashes(keys);
        let now = self.now();
        let mut guard = self.write_at(now);
        let st = &mut *guard;
        for (i, &h) in hashes.iter().enumerate() {
            let key = keys.get(i);
            let State {
                index,
                memory,
                arena,
                timers,
                ..
            } = &mut *st;
            let eq = holds_key(memory, arena, h, key);
            found_out[i] = match index.find_mut(h, eq) {
                Some(e) => {
                    State::set_expiry(timers, e, now, ttl_ms[i]);
                    true
                }
                None => false,
            };
        }
        Ok(())
    }

    fn ttl(&self, keys: Binary<'_>, ttl_out: &mut [i64]) -> Result<()> {
        self.limits().check_keys(keys)?;
        check_per_key(keys, "ttl_out", ttl_out)?;
        let now = self.now();
        let st = self.read();
        for (hit, out) in self.lookup(&st, keys, now).iter().zip(ttl_out.iter_mut()) {
            *out = remaining_ttl(hit.map(|e| e.expires), now);
        }
        Ok(())
    }

    fn get(
        &self,
        keys: Binary<'_>,
        values_out: &mut BinaryBuf,
        found_out: &mut [bool],
    ) -> Result<()> {
        check_byte_lookup(&self.limits(), keys, found_out)?;
        let now = self.now();
        let st = self.read();
        let hits = self.lookup(&st, keys, now);
        let data =
            values_out.reset_with_lens(keys.len(), |i| hits[i].map_or(0, |e| e.value_len as usize));
        let mut at = 0;
        for (hit, found) in hits.iter().zip(found_out.iter_mut()) {
            *found = hit.is_some();
            if let Some(e) = hit {
                let v = st.value(e);
                data[at..at + v.len()].copy_from_slice(v);
                at += v.len();
            }
        }
        Ok(())
    }

    fn delete(&self, keys: Binary<'_>) -> Result<usize> {
        self.limits().check_keys(keys)?;
        let hashes = self.hashes(keys);
        let mut guard = self.write_at(self.now());
        let st = &mut *guard;
        let mut removed = 0;
        let mut freed = 0;
        for (i, &h) in hashes.iter().enumerate() {
            let key = keys.get(i);
            let State {
                index,
                memory,
                arena,
                ..
            } = &mut *st;
            let eq = holds_key(memory, arena, h, key);
            if let Ok(found) = index.find_entry(h, eq) {
                let (e, _) = found.remove();
                arena.free(e.addr, e.record_len());
                freed += e.record_len();
                removed += 1;
            }
        }
        st.drop_released();
        if removed > 0 {
            let bound = st.arena.compaction_allowance(freed);
            st.compact(bound, false);
        }
        Ok(removed)
    }

    fn contains(&self, keys: Binary<'_>, found_out: &mut [bool]) -> Result<()> {
        check_byte_lookup(&self.limits(), keys, found_out)?;
        let now = self.now();
        let st = self.read();
        for (hit, found) in self.lookup(&st, keys, now).iter().zip(found_out.iter_mut()) {
            *found = hit.is_some();
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.write_at(self.now()).index.len()
    }

    fn capacity(&self) -> usize {
        capacity_of(self.read().slots, self.cfg.table.max_load_factor)
    }

    fn clear(&self) -> Result<()> {
        let mut st = self.write();
        st.index.clear();
        st.timers.clear();
        st.arena.clear();
        st.drop_released();
        Ok(())
    }

    fn limits(&self) -> ByteLimits {
        self.cfg.limits()
    }

    fn export(&self) -> Result<ByteImage> {
        let now = self.now();
        let st = self.read();
        let mut img = ByteImage::default();
        for e in st.index.iter().filter(|e| !expired(e.expires, now)) {
            let key = read(&st.memory, &st.arena, e.addr, u64::from(e.key_len));
            img.push(key, st.value(e), e.expires);
        }
        Ok(img)
    }

    fn describe(&self) -> ByteDescription {
        let st = self.write_at(self.now());
        ByteDescription {
            backend: "cpu",
            device: "host memory".into(),
            entries: st.index.len(),
            capacity: capacity_of(st.slots, self.cfg.table.max_load_factor),
            index_bytes: (st.index.capacity() * (std::mem::size_of::<Entry>() + 1)) as u64,
            arena: st.arena.stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every live record is in its segment's list of placed records, through overwrites
    /// with new sizes, deletes and the compactions they bring, so compaction finds every
    /// record it must move; and compaction keeps the arena compact under small batches.
    #[test]
    fn placed_lists_hold_every_live_record() {
        let cfg = ByteConfig::new(4000)
            .max_key_bytes(16)
            .max_value_bytes(2000)
            .segment_bytes(1 << 14)
            .table(kv_core::TableConfig::new(4000).seed(3));
        let t = CpuBytes::open(cfg).expect("open");
        let mut x = 99u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        for round in 0..400 {
            let n = 1 + (next() % 40) as usize;
            let keys: Vec<Vec<u8>> = (0..n)
                .map(|_| format!("k{}", next() % 3000).into_bytes())
                .collect();
            let values: Vec<Vec<u8>> = (0..n)
                .map(|_| vec![round as u8; (next() % 2000) as usize])
                .collect();
            t.put(
                BinaryBuf::from_slices(&keys).as_binary(),
                BinaryBuf::from_slices(&values).as_binary(),
            )
            .expect("put");
            if round % 3 == 0 {
                let dels: Vec<Vec<u8>> = (0..n / 2)
                    .map(|_| format!("k{}", next() % 3000).into_bytes())
                    .collect();
                t.delete(BinaryBuf::from_slices(&dels).as_binary())
                    .expect("delete");
            }
            let st = t.read();
            for e in st.index.iter() {
                let seg = st.arena.segment_of(e.addr) as usize;
                assert!(
                    st.placed[seg].contains(&(e.hash, e.addr)),
                    "round {round}: a live record is missing from segment {seg}'s list"
                );
            }
        }
        let d = t.describe();
        assert!(d.arena.compacted_bytes > 0, "compaction ran");
        assert!(d.arena.fragmentation() < 1.3, "{:?}", d.arena);
    }
}
