//! The cache-table contract (docs/cache.md): policies, expiry, `put_and_evict`, and
//! nothing lost silently. Each case opens cache tables of the backend under test and panics
//! on the first violation.
//!
//! [`CacheModel`] is the checker. It cannot know which victim a backend picks (the contract
//! lets backends differ there), so it keeps what the contract does fix: every entry that
//! was put and not reported as evicted, deleted or expired, with its row and its score
//! under the table's policy. After every batch it checks that
//!
//! - every key the table returns is in the model with the model's row (nothing stale,
//!   nothing invented), and every key of the model is in the table (nothing lost);
//! - every reported eviction was an entry of the model (or of the batch) with that row, and
//!   its score was no higher than the score of any entry that stayed in its bucket
//!   ([`KvBackend::eviction_scope`]);
//! - `len()` is the model's count of live entries.

use std::collections::HashMap;
use std::sync::Arc;

use kv_core::{
    CacheConfig, CachePolicy, CachePut, Clock, Error, Evicted, KvBackend, ManualClock, TableConfig,
};

use crate::SplitMix64;

/// Slots of a cache table's bucket.
const BUCKET: usize = kv_core::CACHE_BUCKET_SLOTS;
use crate::cases::{Case, Open};

/// Every case of the cache contract, in a stable order.
pub fn all() -> Vec<Case> {
    macro_rules! cases { ($($f:ident),* $(,)?) => { vec![$(Case { name: stringify!($f), run: $f }),*] } }
    cases![
        cache_put_get_roundtrip,
        cache_lru_evicts_least_recent,
        cache_lfu_evicts_least_frequent,
        cache_custom_scores_and_turned_away_keys,
        cache_expiry_hides_and_frees,
        cache_peek_is_not_an_access,
        cache_bad_input_changes_nothing,
        cache_budget_sets_capacity,
        cache_take_returns_and_removes,
        cache_nothing_lost_lru,
        cache_nothing_lost_lfu,
        cache_nothing_lost_custom,
        cache_export_restore_keeps_scores_and_expiry,
    ]
}

/// The case a backend without cache tables runs instead: opening one is refused with
/// [`Error::Unsupported`], never silently turned into an ordinary table.
pub fn refused() -> Vec<Case> {
    vec![Case {
        name: "cache_tables_are_refused",
        run: cache_tables_are_refused,
    }]
}

fn cache_tables_are_refused(o: &Open) {
    let cfg = TableConfig::new(64).cache(CacheConfig::new(CachePolicy::Lru));
    match o(cfg) {
        Err(Error::Unsupported { .. }) => {}
        Err(e) => panic!("a cache config should be refused as unsupported, got: {e}"),
        Ok(_) => panic!("a cache config opened a table on a backend without cache tables"),
    }
}

/// A cache table of `capacity` entries, width `width`, with a manual clock at 1000 ms.
fn open_cache(
    o: &Open,
    capacity: usize,
    width: usize,
    policy: CachePolicy,
) -> (Box<dyn KvBackend>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1000));
    let cfg = TableConfig::new(capacity)
        .width(width)
        .seed(0x5eed)
        .cache(CacheConfig::new(policy).clock(clock.clone()));
    match o(cfg.clone()) {
        Ok(t) => (t, clock),
        Err(e) => panic!("opening a cache table with {cfg:?} failed: {e}"),
    }
}

fn row(key: u64, width: usize, tag: u64) -> Vec<u64> {
    (0..width as u64)
        .map(|j| key.wrapping_mul(0x9E37_79B9).wrapping_add(j ^ tag))
        .collect()
}

/// `count` distinct keys that share one bucket, none of them in `avoid`.
fn same_bucket(t: &dyn KvBackend, count: usize, from: u64) -> Vec<u64> {
    let mut by: HashMap<u64, Vec<u64>> = HashMap::new();
    for k in from.. {
        let s = t.eviction_scope(k).expect("eviction_scope");
        let v = by.entry(s).or_default();
        v.push(k);
        if v.len() == count {
            return v.clone();
        }
    }
    unreachable!()
}

fn peek_all(t: &dyn KvBackend, keys: &[u64]) -> (Vec<u64>, Vec<bool>) {
    let w = t.width();
    let mut v = vec![u64::MAX; keys.len() * w];
    let mut f = vec![false; keys.len()];
    t.peek(keys, &mut v, &mut f).expect("peek");
    (v, f)
}

fn put_evict(t: &dyn KvBackend, put: CachePut<'_>) -> Vec<(u64, Vec<u64>, u64)> {
    let (n, w) = (put.keys.len(), t.width());
    let (mut k, mut v, mut s) = (vec![7; n], vec![7; n * w], vec![7; n]);
    let mut ev = Evicted::new(&mut k, &mut v, &mut s);
    let m = t.put_and_evict(put, &mut ev).expect("put_and_evict");
    assert!(m <= n, "{m} evictions reported for a put of {n} keys");
    (0..m)
        .map(|e| (k[e], v[e * w..(e + 1) * w].to_vec(), s[e]))
        .collect()
}

/// Reported evictions: (key, row, score).
type Evictions = Vec<(u64, Vec<u64>, u64)>;

/// [`put_evict`] with each eviction's expiry time: (evictions, expiry times).
fn put_evict_full(t: &dyn KvBackend, put: CachePut<'_>) -> (Evictions, Vec<u64>) {
    let (n, w) = (put.keys.len(), t.width());
    let (mut k, mut v, mut s, mut x) = (vec![7; n], vec![7; n * w], vec![7; n], vec![7; n]);
    let mut ev = Evicted::new(&mut k, &mut v, &mut s).expires(&mut x);
    let m = t.put_and_evict(put, &mut ev).expect("put_and_evict");
    assert!(m <= n, "{m} evictions reported for a put of {n} keys");
    let out = (0..m)
        .map(|e| (k[e], v[e * w..(e + 1) * w].to_vec(), s[e]))
        .collect();
    x.truncate(m);
    (out, x)
}

fn cache_put_get_roundtrip(o: &Open) {
    for w in [1, 3] {
        let (t, _) = open_cache(o, 4096, w, CachePolicy::Lru);
        assert_eq!(t.capacity(), 4096);
        let keys: Vec<u64> = (0..1000u64)
            .map(|i| i * 7 + u64::MAX / 3)
            .chain([0, u64::MAX])
            .collect();
        let vals: Vec<u64> = keys.iter().flat_map(|&k| row(k, w, 1)).collect();
        t.put(&keys, &vals).expect("put");
        // A table at a quarter of its capacity can still evict from a full bucket, so
        // compare against what stayed: every found key has its row.
        let (v, f) = peek_all(&*t, &keys);
        let stayed = f.iter().filter(|f| **f).count();
        assert_eq!(t.len(), stayed);
        assert_eq!(
            t.cache_stats().expect("stats").evicted as usize,
            keys.len() - stayed
        );
        for (i, &k) in keys.iter().enumerate() {
            if f[i] {
                assert_eq!(v[i * w..(i + 1) * w], row(k, w, 1)[..], "key {k}");
            }
        }
        assert!(
            stayed >= keys.len() * 9 / 10,
            "only {stayed} of {} keys stayed",
            keys.len()
        );
        t.clear().expect("clear");
        assert_eq!(t.len(), 0);
        assert_eq!(t.capacity(), 4096);
    }
}

fn cache_lru_evicts_least_recent(o: &Open) {
    let (t, _) = open_cache(o, 64, 1, CachePolicy::Lru);
    let keys = same_bucket(&*t, 34, 100);
    // Fill the bucket, one key a batch: key i has score i + 1.
    for &k in &keys[..32] {
        assert!(put_evict(&*t, CachePut::new(&[k], &[k])).is_empty());
    }
    // A get refreshes keys[0]: the least recent is now keys[1].
    let (mut v, mut f) = ([0u64], [false]);
    t.get(&keys[..1], &mut v, &mut f).expect("get");
    assert!(f[0]);
    let ev = put_evict(&*t, CachePut::new(&keys[32..33], &[1]));
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].0, ev[0].1.clone()), (keys[1], vec![keys[1]]));
    // Its score was the clock of the batch that put it (batch 2).
    assert_eq!(ev[0].2, 2);
    let (_, f) = peek_all(&*t, &keys);
    assert!(f[0] && !f[1] && f[32] && !f[33]);
    assert_eq!(t.len(), 32);
}

fn cache_lfu_evicts_least_frequent(o: &Open) {
    let (t, _) = open_cache(o, 64, 1, CachePolicy::Lfu);
    let keys = same_bucket(&*t, 33, 500);
    let vals: Vec<u64> = keys.clone();
    t.put(&keys[..32], &vals[..32]).expect("put");
    // Every key but keys[5] is read twice more (a repeated key in a get counts each time).
    let mut reads: Vec<u64> = keys[..32]
        .iter()
        .copied()
        .filter(|&k| k != keys[5])
        .collect();
    reads.extend(reads.clone());
    let (mut v, mut f) = (vec![0; reads.len()], vec![false; reads.len()]);
    t.get(&reads, &mut v, &mut f).expect("get");
    assert!(f.iter().all(|f| *f));
    let ev = put_evict(&*t, CachePut::new(&keys[32..], &vals[32..]));
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].0, ev[0].2),
        (keys[5], 1),
        "the entry accessed once leaves"
    );
    // A new key's count is 1; the others now hold 3, so the newcomer is the next to go.
    let more = same_bucket(&*t, 34, 500)[33];
    let ev = put_evict(&*t, CachePut::new(&[more], &[1]));
    assert_eq!((ev[0].0, ev[0].2), (keys[32], 1));
}

fn cache_custom_scores_and_turned_away_keys(o: &Open) {
    let (t, _) = open_cache(o, 32, 2, CachePolicy::Custom);
    let keys = same_bucket(&*t, 34, 9);
    let vals: Vec<u64> = keys[..32].iter().flat_map(|&k| row(k, 2, 0)).collect();
    let scores: Vec<u64> = (0..32).map(|i| 100 + i).collect();
    assert!(put_evict(&*t, CachePut::new(&keys[..32], &vals).scores(&scores)).is_empty());
    // A newcomer scoring below every entry is turned away, and reported with its own row.
    let r = row(keys[32], 2, 5);
    let ev = put_evict(&*t, CachePut::new(&keys[32..33], &r).scores(&[50]));
    assert_eq!(ev, vec![(keys[32], r, 50)]);
    // One scoring above the lowest entry takes its place.
    let r = row(keys[33], 2, 6);
    let ev = put_evict(&*t, CachePut::new(&keys[33..34], &r).scores(&[150]));
    assert_eq!(ev, vec![(keys[0], row(keys[0], 2, 0), 100)]);
    let (_, f) = peek_all(&*t, &keys);
    assert!(!f[0] && !f[32] && f[33]);
    // Gets do not change custom scores; a put replaces the score.
    let (mut v, mut f) = (vec![0; 2], vec![false]);
    t.get(&keys[1..2], &mut v, &mut f).expect("get");
    let ev = put_evict(
        &*t,
        CachePut::new(&keys[..1], &row(keys[0], 2, 0)).scores(&[1000]),
    );
    assert_eq!(
        ev[0].0, keys[1],
        "keys[1] (score 101, read but not rescored) leaves"
    );
}

fn cache_expiry_hides_and_frees(o: &Open) {
    let (t, clock) = open_cache(o, 32, 1, CachePolicy::Lru);
    let keys = same_bucket(&*t, 33, 77);
    let ttl: Vec<u64> = (0..32).map(|i| if i < 4 { 50 } else { 0 }).collect();
    t.put_cached(CachePut::new(&keys[..32], &keys[..32]).ttl_ms(&ttl))
        .expect("put");
    assert_eq!(t.len(), 32);
    clock.advance(49);
    assert_eq!(t.len(), 32);
    clock.advance(1);
    // Expired: not returned, not counted, and their slots are free for new keys.
    assert_eq!(t.len(), 28);
    let (_, f) = peek_all(&*t, &keys[..5]);
    assert_eq!(f, [false, false, false, false, true]);
    let (mut v, mut f) = ([9u64; 1], [true]);
    t.get(&keys[..1], &mut v, &mut f).expect("get");
    assert_eq!((v, f), ([0], [false]));
    assert!(put_evict(&*t, CachePut::new(&keys[32..], &[5])).is_empty());
    assert_eq!(t.len(), 29);
    assert_eq!(
        t.delete(&keys[..2]).expect("delete"),
        0,
        "expired keys are not deleted again"
    );
    // A put without a time to live clears the key's expiry; one with a time sets it.
    t.put_cached(CachePut::new(&keys[4..5], &[4]).ttl_ms(&[10]))
        .expect("put");
    clock.advance(10);
    assert_eq!(peek_all(&*t, &keys[4..5]).1, [false]);
}

fn cache_peek_is_not_an_access(o: &Open) {
    let (t, _) = open_cache(o, 32, 1, CachePolicy::Lru);
    let keys = same_bucket(&*t, 33, 3);
    for &k in &keys[..32] {
        t.put(&[k], &[k]).expect("put");
    }
    // Peeking the oldest key does not save it; contains does not either.
    assert_eq!(peek_all(&*t, &keys[..1]).1, [true]);
    let mut f = [false];
    t.contains(&keys[..1], &mut f).expect("contains");
    assert!(f[0]);
    let ev = put_evict(&*t, CachePut::new(&keys[32..], &[1]));
    assert_eq!(ev[0].0, keys[0]);
}

fn cache_bad_input_changes_nothing(o: &Open) {
    let (t, _) = open_cache(o, 64, 2, CachePolicy::Lru);
    t.put(&[1, 2], &[1, 1, 2, 2]).expect("put");
    let before = peek_all(&*t, &[1, 2, 3]);
    let bad = [
        t.put_cached(CachePut::new(&[3], &[3])),
        t.put_cached(CachePut::new(&[3], &[3, 3]).scores(&[1])),
        t.put_cached(CachePut::new(&[3, 4], &[3, 3, 4, 4]).ttl_ms(&[1])),
    ];
    assert!(matches!(
        bad[0],
        Err(Error::WidthMismatch { .. }) | Err(Error::LengthMismatch { .. })
    ));
    assert!(
        matches!(bad[1], Err(Error::InvalidArgument(_))),
        "{:?}",
        bad[1]
    );
    assert!(matches!(
        bad[2],
        Err(Error::LengthMismatch { what: "ttl_ms", .. })
    ));
    let (mut k, mut v, mut s) = ([0u64; 1], [0u64; 2], [0u64; 1]);
    let mut small = Evicted::new(&mut k, &mut v, &mut s);
    let r = t.put_and_evict(CachePut::new(&[3, 4], &[3, 3, 4, 4]), &mut small);
    assert!(matches!(r, Err(Error::LengthMismatch { .. })), "{r:?}");
    assert_eq!(peek_all(&*t, &[1, 2, 3]), before);
    assert_eq!(t.len(), 2);
    // Custom tables need a score per key.
    let (c, _) = open_cache(o, 64, 1, CachePolicy::Custom);
    let r = c.put_cached(CachePut::new(&[1], &[1]));
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "scores", .. })),
        "{r:?}"
    );
    assert_eq!(c.len(), 0);
}

fn cache_budget_sets_capacity(o: &Open) {
    let cfg = TableConfig::new(1)
        .width(4)
        .cache_budget(1 << 20, CacheConfig::new(CachePolicy::Lru));
    let t = o(cfg.clone()).expect("open");
    assert_eq!(t.capacity(), cfg.initial_capacity());
    assert!(t.describe().bytes_in_use <= 1 << 20);
    let zero = TableConfig::new(0).cache(CacheConfig::new(CachePolicy::Lru));
    assert!(matches!(o(zero), Err(Error::InvalidConfig(_))));
    // A budget no machine has is refused when the table is opened.
    let huge = TableConfig::new(1)
        .width(16)
        .cache_budget(1 << 39, CacheConfig::new(CachePolicy::Lru));
    huge.validate().expect("512 GiB is a valid budget");
    match o(huge) {
        Err(Error::OutOfDeviceMemory { .. }) => {}
        Err(e) => panic!("a 512 GiB budget gave {e}"),
        Ok(_) => panic!("a 512 GiB budget opened a table"),
    }
}

fn cache_take_returns_and_removes(o: &Open) {
    let (t, clock) = open_cache(o, 64, 2, CachePolicy::Lru);
    let keys = same_bucket(&*t, 33, 40);
    let vals: Vec<u64> = keys[..32].iter().flat_map(|&k| row(k, 2, 3)).collect();
    let ttl: Vec<u64> = (0..32).map(|i| if i == 0 { 500 } else { 0 }).collect();
    t.put_cached(CachePut::new(&keys[..32], &vals).ttl_ms(&ttl))
        .expect("put");
    // An eviction reports when the entry would have expired: keys[0] is the oldest.
    let (mut k, mut v, mut s, mut x) = ([0u64; 1], [0u64; 2], [0u64; 1], [9u64; 1]);
    let mut ev = Evicted::new(&mut k, &mut v, &mut s).expires(&mut x);
    let n = t
        .put_and_evict(CachePut::new(&keys[32..], &row(keys[32], 2, 3)), &mut ev)
        .expect("put_and_evict");
    assert_eq!((n, k[0], x[0]), (1, keys[0], 1000 + 500));
    // Take: rows out, entries gone, a repeated key taken once, expiry times returned.
    assert_eq!(
        t.delete(&keys[5..6]).expect("delete"),
        1,
        "room for keys[0] again"
    );
    t.put_cached(CachePut::new(&keys[..1], &row(keys[0], 2, 4)).ttl_ms(&[70]))
        .expect("put");
    let want = [keys[0], keys[1], keys[1], 12345];
    let (mut v, mut f, mut x) = (vec![7u64; 8], vec![false; 4], vec![7u64; 4]);
    let len = t.len();
    let taken = t.take(&want, &mut v, &mut f, &mut x).expect("take");
    assert_eq!(taken, 2);
    assert_eq!(f, [true, true, false, false]);
    assert_eq!(x, [clock.now_ms() + 70, 0, 0, 0]);
    assert_eq!(
        v[..4],
        [row(keys[0], 2, 4), row(keys[1], 2, 3)].concat()[..]
    );
    assert!(v[4..].iter().all(|w| *w == 0));
    assert_eq!(t.len(), len - 2);
    assert_eq!(peek_all(&*t, &want).1, [false; 4]);
    let r = t.take(&want, &mut v, &mut f, &mut x[..3]);
    assert!(matches!(r, Err(Error::LengthMismatch { .. })), "{r:?}");
}

/// What the model knows of one entry.
#[derive(Clone, Debug)]
struct Entry {
    row: Vec<u64>,
    score: u64,
    /// Expiry in clock milliseconds, 0: never.
    expires: u64,
    /// Whether `score` is what the table holds: an LFU entry evicted and put again within
    /// one batch restarted its count at a point the model cannot see.
    known: bool,
}

/// The checker of the cache contract; see the module docs.
pub struct CacheModel {
    width: usize,
    policy: CachePolicy,
    clock: u64,
    entries: HashMap<u64, Entry>,
}

impl CacheModel {
    /// An empty model of a table of `width` words and `policy`.
    pub fn new(width: usize, policy: CachePolicy) -> Self {
        Self {
            width,
            policy,
            clock: 0,
            entries: HashMap::new(),
        }
    }

    fn expire(&mut self, now: u64) {
        self.entries
            .retain(|_, e| e.expires == 0 || e.expires > now);
    }

    /// Applies a put of the table and the evictions it reported; checks them.
    pub fn put(
        &mut self,
        t: &dyn KvBackend,
        put: CachePut<'_>,
        evicted: &[(u64, Vec<u64>, u64)],
        expires: Option<&[u64]>,
        now: u64,
    ) {
        let w = self.width;
        self.expire(now);
        if put.keys.is_empty() {
            assert!(evicted.is_empty());
            return;
        }
        self.clock += 1;
        // Every row each key held before or during the batch: an eviction reports one.
        let mut held: HashMap<u64, Vec<Vec<u64>>> = HashMap::new();
        for (k, e) in &self.entries {
            held.entry(*k).or_default().push(e.row.clone());
        }
        // The scores before the batch: an entry the batch does not touch leaves with it.
        let before: HashMap<u64, (u64, bool)> = self
            .entries
            .iter()
            .map(|(k, e)| (*k, (e.score, e.known)))
            .collect();
        let mut in_batch: HashMap<u64, ()> = HashMap::new();
        for (i, &k) in put.keys.iter().enumerate() {
            let row = put.values[i * w..(i + 1) * w].to_vec();
            held.entry(k).or_default().push(row.clone());
            in_batch.insert(k, ());
            let ttl = put.ttl_ms.map_or(0, |t| t[i]);
            let given = put.scores.map_or(0, |s| s[i]);
            let e = self.entries.entry(k).or_insert(Entry {
                row: row.clone(),
                score: 0,
                expires: 0,
                known: true,
            });
            e.row = row;
            e.expires = if ttl == 0 { 0 } else { now + ttl };
            e.score = match self.policy {
                CachePolicy::Lru => self.clock,
                CachePolicy::Lfu => e.score + 1,
                CachePolicy::Custom => given,
            };
        }
        for (k, row, _) in evicted {
            let rows = held
                .get(k)
                .unwrap_or_else(|| panic!("evicted key {k} was never put"));
            assert!(
                rows.contains(row),
                "evicted key {k} reported a row it never held"
            );
        }
        // Keys evicted and put again in the same batch may have scores the model cannot
        // follow; they are left out of the score check.
        let churned: HashMap<u64, ()> = evicted.iter().map(|(k, _, _)| (*k, ())).collect();
        let keys: Vec<u64> = self.entries.keys().copied().collect();
        let (_, found) = peek_all(t, &keys);
        for (k, f) in keys.iter().zip(&found) {
            if !f {
                assert!(
                    churned.contains_key(k),
                    "key {k} left the table without being reported as evicted"
                );
                // What left is the key's newest row (and expiry): one of its reports says so.
                let e = self.entries.remove(k).expect("a model key");
                let newest = evicted.iter().enumerate().any(|(j, (ek, row, _))| {
                    ek == k && *row == e.row && expires.is_none_or(|x| x[j] == e.expires)
                });
                assert!(
                    newest,
                    "key {k} left the table, but no report carries its newest row and expiry"
                );
            }
        }
        if self.policy == CachePolicy::Lfu {
            for k in churned.keys() {
                if let Some(e) = self.entries.get_mut(k) {
                    e.known = false;
                }
            }
        }
        let scopes: HashMap<u64, u64> = self
            .entries
            .keys()
            .map(|k| (*k, t.eviction_scope(*k).expect("eviction_scope")))
            .collect();
        // Nothing expires and nothing is freed during a put, so a bucket that evicted is
        // full after it.
        for (k, _, _) in evicted {
            let scope = t.eviction_scope(*k).expect("eviction_scope");
            let held = scopes.values().filter(|s| **s == scope).count();
            assert_eq!(
                held, BUCKET,
                "bucket {scope} evicted key {k} but holds {held} entries"
            );
        }
        for (k, _, reported) in evicted {
            // An entry the batch did not touch must leave with the score the policy gave it.
            let score = match before.get(k) {
                Some(&(s, true)) if !in_batch.contains_key(k) => {
                    assert_eq!(
                        *reported, s,
                        "evicted key {k} reported score {reported}, the policy gives {s}"
                    );
                    s
                }
                _ => *reported,
            };
            let score = &score;
            let scope = t.eviction_scope(*k).expect("eviction_scope");
            for (other, e) in &self.entries {
                // A custom score may go down when a later item of the batch rescores the
                // entry; LRU and LFU scores only go up.
                let rescored = self.policy == CachePolicy::Custom && in_batch.contains_key(other);
                if churned.contains_key(other) || rescored || !e.known {
                    continue;
                }
                if scopes[other] == scope {
                    assert!(
                        e.score >= *score,
                        "evicted key {k} (score {score}) while key {other} (score {}) stayed in its bucket",
                        e.score
                    );
                }
            }
        }
        self.check(t, now);
    }

    /// Applies a get of the table (an access), checking what it returned.
    pub fn get(&mut self, t: &dyn KvBackend, keys: &[u64], now: u64) {
        let w = self.width;
        self.expire(now);
        let mut v = vec![u64::MAX; keys.len() * w];
        let mut f = vec![true; keys.len()];
        t.get(keys, &mut v, &mut f).expect("get");
        if keys.is_empty() {
            return;
        }
        self.clock += 1;
        for (i, k) in keys.iter().enumerate() {
            match self.entries.get_mut(k) {
                Some(e) => {
                    assert!(f[i], "key {k} is in the model but get missed it");
                    assert_eq!(v[i * w..(i + 1) * w], e.row[..], "key {k}: wrong row");
                    match self.policy {
                        CachePolicy::Lru => e.score = self.clock,
                        CachePolicy::Lfu => e.score += 1,
                        CachePolicy::Custom => {}
                    }
                }
                None => {
                    assert!(!f[i], "get found key {k}, which the model does not hold");
                    assert!(v[i * w..(i + 1) * w].iter().all(|x| *x == 0));
                }
            }
        }
    }

    /// Applies a delete, checking its count.
    pub fn delete(&mut self, t: &dyn KvBackend, keys: &[u64], now: u64) {
        self.expire(now);
        let mut removed = 0;
        for k in keys {
            removed += self.entries.remove(k).is_some() as usize;
        }
        assert_eq!(t.delete(keys).expect("delete"), removed);
    }

    /// Applies a peek (no access), checking what it returned.
    pub fn peek(&mut self, t: &dyn KvBackend, keys: &[u64], now: u64) {
        let w = self.width;
        self.expire(now);
        let (v, f) = peek_all(t, keys);
        for (i, k) in keys.iter().enumerate() {
            match self.entries.get(k) {
                Some(e) => {
                    assert!(f[i], "key {k} is in the model but peek missed it");
                    assert_eq!(v[i * w..(i + 1) * w], e.row[..], "key {k}: wrong row");
                }
                None => {
                    assert!(!f[i], "peek found key {k}, which the model does not hold");
                    assert!(v[i * w..(i + 1) * w].iter().all(|x| *x == 0));
                }
            }
        }
    }

    /// Applies a take, checking its rows, flags, expiry times and count.
    pub fn take(&mut self, t: &dyn KvBackend, keys: &[u64], now: u64) {
        let w = self.width;
        self.expire(now);
        let n = keys.len();
        let (mut v, mut f, mut x) = (vec![7; n * w], vec![true; n], vec![7; n]);
        let taken = t.take(keys, &mut v, &mut f, &mut x).expect("take");
        let mut removed = 0;
        for (i, k) in keys.iter().enumerate() {
            match self.entries.remove(k) {
                Some(e) => {
                    removed += 1;
                    assert!(f[i], "take missed key {k}");
                    assert_eq!(v[i * w..(i + 1) * w], e.row[..], "take: key {k}: wrong row");
                    assert_eq!(x[i], e.expires, "take: key {k}: wrong expiry");
                }
                None => {
                    assert!(!f[i], "take found key {k} (or found it twice)");
                    assert!(v[i * w..(i + 1) * w].iter().all(|x| *x == 0));
                }
            }
        }
        assert_eq!(taken, removed, "take's count");
    }

    /// Applies a clear.
    pub fn clear(&mut self, t: &dyn KvBackend) {
        t.clear().expect("clear");
        self.entries.clear();
    }

    /// Checks the whole table against the model: the model's keys are there with their
    /// rows, `probe`'s other keys are not, and `len()` agrees.
    pub fn check(&mut self, t: &dyn KvBackend, now: u64) {
        self.expire(now);
        let w = self.width;
        let keys: Vec<u64> = self.entries.keys().copied().collect();
        let (v, f) = peek_all(t, &keys);
        for (i, k) in keys.iter().enumerate() {
            assert!(f[i], "key {k} is lost: not in the table and never reported");
            assert_eq!(
                v[i * w..(i + 1) * w],
                self.entries[k].row[..],
                "key {k}: stale row"
            );
        }
        assert_eq!(t.len(), self.entries.len(), "len() against the model");
    }
}

fn nothing_lost(o: &Open, policy: CachePolicy) {
    for (seed, w, cap) in [(1u64, 1usize, 64usize), (2, 2, 96), (3, 1, 1024)] {
        let (t, clock) = open_cache(o, cap, w, policy);
        let mut m = CacheModel::new(w, policy);
        let mut rng = SplitMix64(seed ^ policy as u64);
        let universe = (cap * 3) as u64;
        let key = |rng: &mut SplitMix64| match rng.below(16) {
            0 => 0,
            1 => u64::MAX,
            _ => rng.below(universe).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        for step in 0..300 {
            let now = clock.now_ms();
            match rng.below(10) {
                0..=4 => {
                    let n = 1 + rng.below(cap as u64 / 2) as usize;
                    let keys: Vec<u64> = (0..n).map(|_| key(&mut rng)).collect();
                    let vals: Vec<u64> = keys.iter().flat_map(|&k| row(k, w, step)).collect();
                    let scores: Vec<u64> = (0..n).map(|_| rng.below(1000)).collect();
                    let ttl: Vec<u64> = (0..n)
                        .map(|_| {
                            if rng.below(4) == 0 {
                                1 + rng.below(30)
                            } else {
                                0
                            }
                        })
                        .collect();
                    let mut put = CachePut::new(&keys, &vals).ttl_ms(&ttl);
                    if policy == CachePolicy::Custom {
                        put = put.scores(&scores);
                    }
                    let (ev, x) = put_evict_full(&*t, put);
                    m.put(&*t, put, &ev, Some(&x), now);
                }
                5 | 6 => {
                    let n = rng.below(cap as u64) as usize;
                    let keys: Vec<u64> = (0..n).map(|_| key(&mut rng)).collect();
                    m.get(&*t, &keys, now);
                }
                7 => {
                    let n = rng.below(8) as usize;
                    let keys: Vec<u64> = (0..n).map(|_| key(&mut rng)).collect();
                    m.delete(&*t, &keys, now);
                }
                8 => clock.advance(rng.below(12)),
                _ => m.check(&*t, now),
            }
        }
        m.check(&*t, clock.now_ms());
    }
}

fn cache_nothing_lost_lru(o: &Open) {
    nothing_lost(o, CachePolicy::Lru);
}

fn cache_nothing_lost_lfu(o: &Open) {
    nothing_lost(o, CachePolicy::Lfu);
}

fn cache_nothing_lost_custom(o: &Open) {
    nothing_lost(o, CachePolicy::Custom);
}

/// A cache table's image holds each live entry's score and absolute expiry time and no
/// expired entry; restored into a new table with the same config, it gives the same
/// image back, evicts nothing, and an LRU clock that goes on past the image's.
fn cache_export_restore_keeps_scores_and_expiry(o: &Open) {
    for policy in [CachePolicy::Lru, CachePolicy::Lfu, CachePolicy::Custom] {
        let w = 2;
        let (t, clock) = open_cache(o, 512, w, policy);
        let keys: Vec<u64> = (0..300u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let vals: Vec<u64> = keys.iter().flat_map(|&k| row(k, w, 4)).collect();
        let ttl: Vec<u64> = (0..300u64)
            .map(|i| [0, 100, 5000][(i % 3) as usize])
            .collect();
        let scores: Vec<u64> = (0..300u64).map(|i| i * 3 + 1).collect();
        let put = CachePut::new(&keys, &vals).ttl_ms(&ttl);
        let put = if policy == CachePolicy::Custom {
            put.scores(&scores)
        } else {
            put
        };
        t.put_cached(put).expect("put");
        // Accesses that change LRU and LFU scores.
        for _ in 0..2 {
            let mut v = vec![0; 100 * w];
            let mut f = vec![false; 100];
            t.get(&keys[..100], &mut v, &mut f).expect("get");
        }
        clock.advance(150);
        let mut img = t.export().expect("export");
        img.check().expect("the image's columns agree");
        assert!(
            img.is_cache(),
            "{policy:?}: a cache table's image has scores"
        );
        assert_eq!(img.len(), t.len(), "{policy:?}: image length");
        img.sort();
        let expires = img.expires.clone().expect("expiry times");
        let got_scores = img.scores.clone().expect("scores");
        for (i, &k) in img.keys.iter().enumerate() {
            let j = keys
                .iter()
                .position(|&x| x == k)
                .expect("an exported key was put");
            assert_eq!(&img.values[i * w..(i + 1) * w], &vals[j * w..(j + 1) * w]);
            let want = if ttl[j] == 0 { 0 } else { 1000 + ttl[j] };
            assert_ne!(ttl[j], 100, "{policy:?}: an expired entry was exported");
            assert_eq!(expires[i], want, "{policy:?}: expiry time of key {k}");
            match policy {
                CachePolicy::Custom => assert_eq!(got_scores[i], scores[j]),
                CachePolicy::Lfu => assert_eq!(got_scores[i], if j < 100 { 3 } else { 1 }),
                CachePolicy::Lru => assert!(got_scores[i] <= img.clock, "LRU score past the clock"),
            }
        }
        let (u, clock_u) = open_cache(o, 512, w, policy);
        clock_u.advance(150);
        for part in img.parts(64) {
            u.restore(part).expect("restore");
        }
        assert_eq!(u.len(), t.len(), "{policy:?}: restored length");
        assert_eq!(
            u.cache_stats().expect("stats").evicted,
            0,
            "{policy:?}: a restore evicted"
        );
        let mut back = u.export().expect("export of the restored table");
        back.sort();
        assert_eq!(back.keys, img.keys, "{policy:?}");
        assert_eq!(back.values, img.values, "{policy:?}");
        assert_eq!(back.expires, img.expires, "{policy:?}");
        assert_eq!(back.scores, img.scores, "{policy:?}");
        assert!(
            back.clock >= img.clock,
            "{policy:?}: the restored clock went back"
        );
        if policy == CachePolicy::Lru {
            let fresh = [u64::MAX - 3];
            u.put(&fresh, &[1, 2]).expect("put after restore");
            let after = u.export().expect("export");
            let s = after.scores.as_deref().expect("scores");
            let i = after
                .keys
                .iter()
                .position(|&k| k == fresh[0])
                .expect("fresh key");
            let top = img
                .scores
                .as_deref()
                .expect("scores")
                .iter()
                .copied()
                .max()
                .unwrap_or(0);
            assert!(
                s[i] > top,
                "a put after a restore is more recent than every restored entry"
            );
        }
    }
}
