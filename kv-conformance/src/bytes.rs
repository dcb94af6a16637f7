//! The byte-table contract ([`kv_core::ByteTable`], docs/arena.md): the fixed-width
//! contract item for item, for byte-string keys and values, and the arena's promises. A
//! backend runs it with one macro call, [`bytes_main!`](crate::bytes_main).
//!
//! [`ByteModel`] is the sequential reference: a map from key bytes to value bytes. Every
//! case checks the table against it after its batches, through [`ByteModel::check`]:
//! every key of the model is found with its value, `len()` is the model's, and the arena's
//! live bytes are exactly the bytes of the live keys and values.

use std::collections::BTreeMap;
use std::sync::Arc;

use kv_core::{
    Binary, BinaryBuf, ByteConfig, ByteTable, Clock, Error, ManualClock, TTL_MISSING, TTL_NEVER,
    TableConfig,
};

use crate::SplitMix64;

/// How a byte suite opens a table of the backend under test.
pub type OpenBytes = dyn Fn(ByteConfig) -> kv_core::Result<Box<dyn ByteTable>> + Send + Sync;

/// One named case of the byte suite.
#[derive(Clone, Copy)]
pub struct ByteCase {
    /// The trial's name.
    pub name: &'static str,
    /// The body; it panics on a violation.
    pub run: fn(&OpenBytes),
}

/// Every case of the byte contract, in a stable order.
pub fn all() -> Vec<ByteCase> {
    macro_rules! cases { ($($f:ident),* $(,)?) => { vec![$(ByteCase { name: stringify!($f), run: $f }),*] } }
    cases![
        bytes_put_get_roundtrip,
        bytes_last_occurrence_wins,
        bytes_overwrite_and_delete,
        bytes_keys_are_compared_byte_for_byte,
        bytes_colliding_hashes_stay_distinct,
        bytes_largest_keys_and_values,
        bytes_empty_values_that_end_a_segment,
        bytes_bad_input_changes_nothing,
        bytes_growth_off_refuses_whole_batch,
        bytes_growth_keeps_every_entry,
        bytes_overwrites_among_removed_places,
        bytes_arena_budget_refuses_whole_batch,
        bytes_arrow_offsets_and_slices,
        bytes_get_replaces_its_output,
        bytes_large_batches,
        bytes_clear_gives_the_arena_back,
        bytes_churn_stays_compact,
        bytes_expiry,
        bytes_random_batches_match_the_model,
        bytes_export_restore_roundtrip,
    ]
}

/// Builds the byte suite's trials for a backend; what [`bytes_main!`](crate::bytes_main)
/// calls.
pub fn trials(
    backend: &'static str,
    open: Arc<OpenBytes>,
    availability: crate::Availability,
) -> Vec<libtest_mimic::Trial> {
    availability.announce(&format!("{backend} byte-table suite"));
    all()
        .into_iter()
        .map(|case| {
            let open = open.clone();
            availability.trial(format!("{backend}::{}", case.name), move || {
                (case.run)(&*open);
                Ok(())
            })
        })
        .collect()
}

/// Generates `fn main()` for a backend's byte-table test binary (with `harness = false`):
///
/// ```no_run
/// kv_conformance::bytes_main! {
///     backend: "mine",
///     // Open the backend's byte table here; this one has none yet.
///     open: |_cfg| Err(kv_core::Error::Unsupported { backend: "mine", what: "byte tables" }),
///     availability: || kv_conformance::Availability::Available,
/// }
/// ```
#[macro_export]
macro_rules! bytes_main {
    (backend: $backend:expr, open: $open:expr, availability: $avail:expr $(,)?) => {
        fn main() {
            let args = $crate::libtest_mimic::Arguments::from_args();
            let open: ::std::sync::Arc<$crate::bytes::OpenBytes> = ::std::sync::Arc::new($open);
            let trials = $crate::bytes::trials($backend, open, ($avail)());
            $crate::libtest_mimic::run(&args, trials).exit();
        }
    };
}

/// The sequential reference for byte tables: each live key's value and expiry time (0:
/// never). It holds only live entries: [`ByteModel::advance`] drops the expired ones.
#[derive(Debug, Clone, Default)]
pub struct ByteModel {
    map: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    now: u64,
}

impl ByteModel {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// A put: the last occurrence of each key wins, and the entry never expires.
    pub fn put(&mut self, keys: Binary<'_>, values: Binary<'_>) {
        for (k, v) in keys.iter().zip(values.iter()) {
            self.map.insert(k.to_vec(), (v.to_vec(), 0));
        }
    }

    /// A put with a time to live per key (ms; 0: never), at the model's time.
    pub fn put_ttl(&mut self, keys: Binary<'_>, values: Binary<'_>, ttl_ms: &[u64]) {
        for ((k, v), &ttl) in keys.iter().zip(values.iter()).zip(ttl_ms) {
            let expires = kv_kernels::layout::expiry_time(self.now, ttl);
            self.map.insert(k.to_vec(), (v.to_vec(), expires));
        }
    }

    /// Sets the time to live of present keys; whether each was present.
    pub fn expire(&mut self, keys: Binary<'_>, ttl_ms: &[u64]) -> Vec<bool> {
        let now = self.now;
        keys.iter()
            .zip(ttl_ms)
            .map(|(k, &ttl)| match self.map.get_mut(k) {
                Some(e) => {
                    e.1 = kv_kernels::layout::expiry_time(now, ttl);
                    true
                }
                None => false,
            })
            .collect()
    }

    /// Moves the model's time to `now` (never back) and drops what expired.
    pub fn advance(&mut self, now: u64) {
        self.now = self.now.max(now);
        let now = self.now;
        self.map
            .retain(|_, (_, e)| !kv_kernels::layout::expired(*e, now));
    }

    /// The remaining time to live of `key`, as [`ByteTable::ttl`] answers it.
    pub fn ttl(&self, key: &[u8]) -> i64 {
        match self.map.get(key) {
            None => TTL_MISSING,
            Some((_, 0)) => TTL_NEVER,
            Some((_, e)) => (e - self.now) as i64,
        }
    }

    /// A delete; returns how many entries it removed.
    pub fn delete(&mut self, keys: Binary<'_>) -> usize {
        keys.iter()
            .filter(|k| self.map.remove(*k).is_some())
            .count()
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(|(v, _)| v.as_slice())
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the model is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The bytes of every live key and value.
    pub fn live_bytes(&self) -> u64 {
        self.map
            .iter()
            .map(|(k, (v, _))| (k.len() + v.len()) as u64)
            .sum()
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Checks `t` against the model: every key is found with its value, `probes` (keys
    /// that may or may not be present) are answered as the model answers, `len()` is the
    /// model's, and the arena's live bytes are exactly the model's.
    pub fn check(&self, t: &dyn ByteTable, probes: &[Vec<u8>]) {
        let mut keys: Vec<&[u8]> = self.map.keys().map(Vec::as_slice).collect();
        keys.extend(probes.iter().map(Vec::as_slice));
        for chunk in keys.chunks(4096) {
            let kb = BinaryBuf::from_slices(chunk);
            let mut out = BinaryBuf::new();
            let mut found = vec![false; chunk.len()];
            t.get(kb.as_binary(), &mut out, &mut found).expect("get");
            assert_eq!(out.len(), chunk.len(), "get gives one value per key");
            let mut contains = vec![false; chunk.len()];
            t.contains(kb.as_binary(), &mut contains).expect("contains");
            let mut ttl = vec![0i64; chunk.len()];
            t.ttl(kb.as_binary(), &mut ttl).expect("ttl");
            for (i, key) in chunk.iter().enumerate() {
                assert_eq!(ttl[i], self.ttl(key), "ttl of key {key:?}");
                let want = self.get(key);
                assert_eq!(found[i], want.is_some(), "found flag of key {key:?}");
                assert_eq!(contains[i], want.is_some(), "contains of key {key:?}");
                let got = out.get(i).expect("an item per key");
                assert_eq!(got, want.unwrap_or_default(), "value of key {key:?}");
            }
        }
        assert_eq!(t.len(), self.len(), "len()");
        let d = t.describe();
        assert_eq!(d.entries, self.len(), "describe().entries");
        assert_eq!(d.arena.live_bytes, self.live_bytes(), "arena live bytes");
        assert!(
            d.arena.held_bytes >= d.arena.live_bytes,
            "held >= live: {d:?}"
        );
    }
}

fn bin(items: &[&[u8]]) -> BinaryBuf {
    BinaryBuf::from_slices(items)
}

fn small(capacity: usize) -> ByteConfig {
    ByteConfig::new(capacity)
        .max_key_bytes(64)
        .max_value_bytes(4096)
        .segment_bytes(1 << 16)
        .table(TableConfig::new(capacity).seed(0x5eed))
}

fn open(o: &OpenBytes, cfg: ByteConfig) -> Box<dyn ByteTable> {
    o(cfg).expect("open a byte table")
}

fn put(t: &dyn ByteTable, m: &mut ByteModel, keys: &BinaryBuf, values: &BinaryBuf) {
    t.put(keys.as_binary(), values.as_binary()).expect("put");
    m.put(keys.as_binary(), values.as_binary());
}

fn bytes_put_get_roundtrip(o: &OpenBytes) {
    let t = open(o, small(100));
    let mut m = ByteModel::new();
    let keys = bin(&[
        b"a",
        b"\0",
        b"\0\0",
        b"\xff\xfe",
        b"user:1234:profile",
        b"k",
    ]);
    let values = bin(&[b"1", b"", b"zero\0bytes", b"\xff", &[7u8; 1000], b""]);
    put(&*t, &mut m, &keys, &values);
    m.check(&*t, &[b"b".to_vec(), b"a\0".to_vec(), b"\0\0\0".to_vec()]);
    assert_eq!(
        t.get_slices(&[b"a", b"missing", b"k"]).expect("get_slices"),
        [Some(b"1".to_vec()), None, Some(vec![])]
    );
}

/// Batches long enough for the backends' parallel host passes (counts, prefix sums of
/// output offsets, scans for replaced records: 2^16 items and more): new keys, then a
/// batch that overwrites half of them with other lengths, repeats some keys and adds new
/// ones.
fn bytes_large_batches(o: &OpenBytes) {
    const N: usize = 100_000;
    let t = open(o, small(2 * N));
    let mut m = ByteModel::new();
    let key = |i: usize| format!("large:{i}").into_bytes();
    let value = |i: usize, round: usize| vec![(i + round) as u8; (i * 7 + round * 13) % 41];
    let keys = BinaryBuf::from_slices((0..N).map(key));
    let values = BinaryBuf::from_slices((0..N).map(|i| value(i, 0)));
    put(&*t, &mut m, &keys, &values);
    // Every other key again, the first thousand twice (the later one wins), and new keys.
    let items: Vec<usize> = (0..N)
        .step_by(2)
        .chain(0..1000)
        .chain(N..N + N / 4)
        .collect();
    let keys = BinaryBuf::from_slices(items.iter().map(|&i| key(i)));
    let values =
        BinaryBuf::from_slices(items.iter().enumerate().map(|(j, &i)| value(i, 1 + j % 3)));
    put(&*t, &mut m, &keys, &values);
    assert_eq!(t.len(), N + N / 4);
    m.check(&*t, &[key(2 * N), b"large:".to_vec()]);
    // One get of every key, then a short one into the same output buffer.
    let mut out = BinaryBuf::new();
    for count in [N + N / 4, 10] {
        let all: Vec<Vec<u8>> = (0..count).map(key).collect();
        let kb = BinaryBuf::from_slices(&all);
        let mut found = vec![false; count];
        t.get(kb.as_binary(), &mut out, &mut found).expect("get");
        assert_eq!(out.len(), count);
        for (i, k) in all.iter().enumerate() {
            assert!(found[i], "key {i} of {count} found");
            assert_eq!(out.get(i), m.get(k), "value of key {i} of {count}");
        }
    }
}

fn bytes_last_occurrence_wins(o: &OpenBytes) {
    let t = open(o, small(100));
    let mut m = ByteModel::new();
    let keys = bin(&[b"x", b"y", b"x", b"x", b"y", b"z"]);
    let values = bin(&[b"1", b"2", b"33", b"", b"5555", b"6"]);
    put(&*t, &mut m, &keys, &values);
    assert_eq!(t.len(), 3);
    m.check(&*t, &[]);
    assert_eq!(t.get_slices(&[b"x"]).expect("get"), [Some(vec![])]);
}

fn bytes_overwrite_and_delete(o: &OpenBytes) {
    let t = open(o, small(100));
    let mut m = ByteModel::new();
    put(
        &*t,
        &mut m,
        &bin(&[b"a", b"b", b"c"]),
        &bin(&[b"1", b"2", b"3"]),
    );
    put(&*t, &mut m, &bin(&[b"b"]), &bin(&[&[9u8; 300][..]]));
    m.check(&*t, &[]);
    let dels = bin(&[b"a", b"a", b"zz", b"c"]);
    assert_eq!(
        t.delete(dels.as_binary()).expect("delete"),
        2,
        "a repeated key counts once"
    );
    assert_eq!(m.delete(dels.as_binary()), 2);
    m.check(&*t, &[b"a".to_vec(), b"c".to_vec()]);
    assert_eq!(t.delete(dels.as_binary()).expect("delete"), 0);
    put(&*t, &mut m, &bin(&[b"a"]), &bin(&[b"back"]));
    m.check(&*t, &[b"c".to_vec()]);
}

fn bytes_keys_are_compared_byte_for_byte(o: &OpenBytes) {
    let t = open(o, small(100));
    let mut m = ByteModel::new();
    // Prefixes, zero padding, and keys that differ in one bit or one trailing byte.
    let keys: Vec<&[u8]> = vec![
        b"a",
        b"a\0",
        b"a\0\0\0\0\0\0\0",
        b"a\0\0\0\0\0\0\0\0",
        b"abcdefgh",
        b"abcdefgi",
        b"abcdefghX",
        b"\x01",
        b"\x81",
        b"\0\0\0\0\0\0\0\0",
    ];
    let values: Vec<Vec<u8>> = (0..keys.len()).map(|i| vec![i as u8; i]).collect();
    let vals: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    put(&*t, &mut m, &bin(&keys), &bin(&vals));
    assert_eq!(t.len(), keys.len());
    m.check(&*t, &[b"abcdefg".to_vec(), b"\0".to_vec()]);
}

/// Keys forced to collide: with one hash bit, every key shares its hash with half of the
/// others, and with itself only by its bytes.
fn bytes_colliding_hashes_stay_distinct(o: &OpenBytes) {
    for bits in [1, 3] {
        let t = open(o, small(600).hash_bits(bits));
        let mut m = ByteModel::new();
        let keys: Vec<Vec<u8>> = (0..500u32)
            .map(|i| format!("key-{i}").into_bytes())
            .collect();
        let values: Vec<Vec<u8>> = (0..500u32).map(|i| i.to_le_bytes().to_vec()).collect();
        put(
            &*t,
            &mut m,
            &BinaryBuf::from_slices(&keys),
            &BinaryBuf::from_slices(&values),
        );
        let dels: Vec<&Vec<u8>> = keys.iter().step_by(3).collect();
        let dels = BinaryBuf::from_slices(dels);
        assert_eq!(
            t.delete(dels.as_binary()).expect("delete"),
            m.delete(dels.as_binary())
        );
        let over: Vec<&Vec<u8>> = keys.iter().skip(1).step_by(5).collect();
        let over_values: Vec<Vec<u8>> =
            over.iter().map(|k| [k.as_slice(), b"!"].concat()).collect();
        put(
            &*t,
            &mut m,
            &BinaryBuf::from_slices(over),
            &BinaryBuf::from_slices(&over_values),
        );
        m.check(&*t, &[b"key-500".to_vec(), b"key-".to_vec()]);
        // One batch over every key again, deleted ones included: hundreds of keys at once
        // that share a few hashes, some held and some not.
        let again: Vec<Vec<u8>> = keys.iter().rev().map(|k| k.repeat(2)).collect();
        let again_keys: Vec<&Vec<u8>> = keys.iter().rev().collect();
        put(
            &*t,
            &mut m,
            &BinaryBuf::from_slices(again_keys),
            &BinaryBuf::from_slices(&again),
        );
        m.check(&*t, &[b"key-500".to_vec()]);
    }
}

/// Records of a 64-byte key and an empty value fill a 64 KiB segment exactly, so the last
/// one's empty value starts at the next segment's first byte, which may not exist yet.
fn bytes_empty_values_that_end_a_segment(o: &OpenBytes) {
    let t = open(o, small(3000));
    let mut m = ByteModel::new();
    let keys: Vec<Vec<u8>> = (0..2100u32)
        .map(|i| {
            let mut k = vec![b'.'; 64];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k
        })
        .collect();
    let empty: Vec<&[u8]> = vec![&[]; keys.len()];
    // Exactly one segment's worth first: no next segment exists yet.
    for range in [0..1024, 1024..keys.len()] {
        let (k, v) = (&keys[range.clone()], &empty[range]);
        put(
            &*t,
            &mut m,
            &BinaryBuf::from_slices(k),
            &BinaryBuf::from_slices(v),
        );
        m.check(&*t, &[]);
    }
    // Overwrite them (compaction moves what is left), then delete a third.
    put(
        &*t,
        &mut m,
        &BinaryBuf::from_slices(&keys[..1500]),
        &BinaryBuf::from_slices(&empty[..1500]),
    );
    let dels = BinaryBuf::from_slices(keys.iter().step_by(3));
    assert_eq!(
        t.delete(dels.as_binary()).expect("delete"),
        m.delete(dels.as_binary())
    );
    m.check(&*t, &keys[..10]);
}

fn bytes_largest_keys_and_values(o: &OpenBytes) {
    let cfg = ByteConfig::new(16)
        .max_key_bytes(kv_core::MAX_KEY_BYTES)
        .table(TableConfig::new(16).seed(1));
    let max_value = cfg.max_value_bytes as usize;
    let t = open(o, cfg);
    let mut m = ByteModel::new();
    let long_key = vec![0xabu8; kv_core::MAX_KEY_BYTES];
    let mut other_key = long_key.clone();
    other_key[kv_core::MAX_KEY_BYTES - 1] = 0;
    let big: Vec<u8> = (0..max_value).map(|i| (i * 7 + 3) as u8).collect();
    put(
        &*t,
        &mut m,
        &BinaryBuf::from_slices([&long_key, &other_key]),
        &BinaryBuf::from_slices([&big[..], &big[..1]]),
    );
    m.check(&*t, &[]);
    let too_long_key = vec![1u8; kv_core::MAX_KEY_BYTES + 1];
    let r = t.put(
        BinaryBuf::from_slices([&too_long_key]).as_binary(),
        BinaryBuf::from_slices([b"v"]).as_binary(),
    );
    assert!(
        matches!(r, Err(Error::ByteLimit { what: "key", .. })),
        "{r:?}"
    );
    let too_big = vec![0u8; max_value + 1];
    let r = t.put(
        BinaryBuf::from_slices([b"k"]).as_binary(),
        BinaryBuf::from_slices([&too_big]).as_binary(),
    );
    assert!(
        matches!(
            r,
            Err(Error::ByteLimit {
                what: "value",
                index: 0,
                ..
            })
        ),
        "{r:?}"
    );
    m.check(&*t, &[b"k".to_vec()]);
}

fn bytes_bad_input_changes_nothing(o: &OpenBytes) {
    let t = open(o, small(100));
    let mut m = ByteModel::new();
    put(&*t, &mut m, &bin(&[b"a", b"b"]), &bin(&[b"1", b"2"]));
    let before = t.describe();
    // More keys than values.
    let r = t.put(bin(&[b"a", b"c"]).as_binary(), bin(&[b"x"]).as_binary());
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "values", .. })),
        "{r:?}"
    );
    // An empty key, after good ones: the whole batch is refused.
    let r = t.put(
        bin(&[b"a", b"c", b""]).as_binary(),
        bin(&[b"x", b"y", b"z"]).as_binary(),
    );
    assert!(
        matches!(
            r,
            Err(Error::ByteLimit {
                what: "key",
                index: 2,
                len: 0,
                ..
            })
        ),
        "{r:?}"
    );
    // A key longer than this table's limit (64).
    let long = vec![b'k'; 65];
    let r = t.put(
        bin(&[b"a", &long]).as_binary(),
        bin(&[b"x", b"y"]).as_binary(),
    );
    assert!(
        matches!(
            r,
            Err(Error::ByteLimit {
                what: "key",
                index: 1,
                ..
            })
        ),
        "{r:?}"
    );
    // A value longer than the limit (4096).
    let big = vec![0u8; 4097];
    let r = t.put(
        bin(&[b"a", b"c"]).as_binary(),
        bin(&[b"x", &big]).as_binary(),
    );
    assert!(
        matches!(
            r,
            Err(Error::ByteLimit {
                what: "value",
                index: 1,
                ..
            })
        ),
        "{r:?}"
    );
    // Lookups with a wrong flag count, or an empty key.
    let mut out = BinaryBuf::new();
    let r = t.get(bin(&[b"a"]).as_binary(), &mut out, &mut [false; 2]);
    assert!(
        matches!(
            r,
            Err(Error::LengthMismatch {
                what: "found_out",
                ..
            })
        ),
        "{r:?}"
    );
    let r = t.contains(bin(&[b""]).as_binary(), &mut [false]);
    assert!(
        matches!(r, Err(Error::ByteLimit { what: "key", .. })),
        "{r:?}"
    );
    let r = t.delete(bin(&[b"a", &long]).as_binary());
    assert!(
        matches!(
            r,
            Err(Error::ByteLimit {
                what: "key",
                index: 1,
                ..
            })
        ),
        "{r:?}"
    );
    // Offsets that run backwards or past the data are refused when the batch is made.
    assert!(Binary::new(&[0, 2, 1], b"abc").is_err());
    assert!(Binary::new(&[0, 4], b"abc").is_err());
    assert!(Binary::new(&[-1, 1], b"abc").is_err());
    assert!(Binary::new(&[], b"abc").is_err());
    assert_eq!(t.describe(), before);
    m.check(&*t, &[b"c".to_vec()]);
}

fn bytes_growth_off_refuses_whole_batch(o: &OpenBytes) {
    let cfg = small(0);
    let cfg = cfg.table(TableConfig::new(20).growth(false).seed(3));
    let t = open(o, cfg);
    let cap = t.capacity();
    assert!(cap >= 20, "capacity {cap}");
    let mut m = ByteModel::new();
    let keys: Vec<Vec<u8>> = (0..cap).map(|i| format!("k{i}").into_bytes()).collect();
    put(
        &*t,
        &mut m,
        &BinaryBuf::from_slices(&keys[..cap - 1]),
        &BinaryBuf::from_slices(&keys[..cap - 1]),
    );
    // Overwrites of present keys take no room: this batch fits exactly.
    let fits: Vec<&Vec<u8>> = keys[cap - 3..].iter().collect();
    put(
        &*t,
        &mut m,
        &BinaryBuf::from_slices(&fits),
        &BinaryBuf::from_slices(&fits),
    );
    assert_eq!(t.len(), cap);
    let more = bin(&[b"k0", b"new-1", b"new-2"]);
    let r = t.put(more.as_binary(), more.as_binary());
    assert!(
        matches!(r, Err(Error::CapacityExceeded { requested, capacity }) if requested == cap + 2 && capacity == cap),
        "{r:?}"
    );
    m.check(&*t, &[b"new-1".to_vec()]);
    assert_eq!(
        t.delete(bin(&[b"k1", b"k2"]).as_binary()).expect("delete"),
        2
    );
    m.delete(bin(&[b"k1", b"k2"]).as_binary());
    put(&*t, &mut m, &more, &more);
    m.check(&*t, &[]);
}

fn bytes_growth_keeps_every_entry(o: &OpenBytes) {
    let t = open(o, small(8));
    let cap0 = t.capacity();
    let mut m = ByteModel::new();
    let mut rng = SplitMix64(11);
    for round in 0..6 {
        let n = 50 << round;
        let keys: Vec<Vec<u8>> = (0..n)
            .map(|_| format!("g{}", rng.next_u64() % 5000).into_bytes())
            .collect();
        let values: Vec<Vec<u8>> = (0..n).map(|i| vec![round as u8; i % 40]).collect();
        put(
            &*t,
            &mut m,
            &BinaryBuf::from_slices(&keys),
            &BinaryBuf::from_slices(&values),
        );
        assert!(t.capacity() >= t.len());
    }
    assert!(t.capacity() > cap0);
    m.check(&*t, &[]);
}

/// Rounds of puts that overwrite held keys and add new ones, each followed by deletes of
/// most of the key space: the index fills with removed places, which a hash index
/// reclaims (rehashing in place) while a batch overwrites keys it holds.
fn bytes_overwrites_among_removed_places(o: &OpenBytes) {
    let t = open(o, small(4000));
    let mut m = ByteModel::new();
    let mut rng = SplitMix64(29);
    let mut keys_of = |count: usize| -> BinaryBuf {
        BinaryBuf::from_slices((0..count).map(|_| format!("d{}", rng.next_u64() % 3000)))
    };
    for round in 0..40u8 {
        let keys = keys_of(1500);
        let values = BinaryBuf::from_slices((0..1500).map(|i| vec![round; i % 23]));
        put(&*t, &mut m, &keys, &values);
        let dels = keys_of(2100);
        assert_eq!(
            t.delete(dels.as_binary()).expect("delete"),
            m.delete(dels.as_binary()),
            "round {round}: deleted count"
        );
        if round % 8 == 7 {
            m.check(&*t, &[]);
        }
    }
    m.check(&*t, &[]);
}

fn bytes_arena_budget_refuses_whole_batch(o: &OpenBytes) {
    let seg = 1u64 << 12;
    let cfg = ByteConfig::new(1000)
        .max_key_bytes(16)
        .max_value_bytes(1000)
        .segment_bytes(seg)
        .arena_budget(4 * seg)
        .table(TableConfig::new(1000).seed(5));
    let t = open(o, cfg);
    let mut m = ByteModel::new();
    let v = vec![5u8; 1000];
    let keys: Vec<Vec<u8>> = (0..12).map(|i| format!("b{i}").into_bytes()).collect();
    let vals: Vec<&[u8]> = vec![&v[..]; 12];
    put(
        &*t,
        &mut m,
        &BinaryBuf::from_slices(&keys),
        &BinaryBuf::from_slices(&vals),
    );
    // 12 records of ~1 KB in 4 KiB segments: 3 segments. 8 more need 2 more: over budget.
    let more: Vec<Vec<u8>> = (12..20).map(|i| format!("b{i}").into_bytes()).collect();
    let r = t.put(
        BinaryBuf::from_slices(&more).as_binary(),
        BinaryBuf::from_slices(&vals[..8]).as_binary(),
    );
    assert!(
        matches!(r, Err(Error::BudgetExceeded { what: "arena", budget_bytes, .. }) if budget_bytes == 4 * seg),
        "{r:?}"
    );
    m.check(&*t, &more);
    // Overwriting in place of deleted entries: compaction makes the room.
    let dels = BinaryBuf::from_slices(&keys[..8]);
    t.delete(dels.as_binary()).expect("delete");
    m.delete(dels.as_binary());
    put(
        &*t,
        &mut m,
        &BinaryBuf::from_slices(&more),
        &BinaryBuf::from_slices(&vals[..8]),
    );
    m.check(&*t, &keys);
    assert!(t.describe().arena.held_bytes <= 4 * seg);
}

fn bytes_arrow_offsets_and_slices(o: &OpenBytes) {
    let t = open(o, small(100));
    let mut m = ByteModel::new();
    // A slice of a larger array: the first offset is not 0 (Arrow allows that).
    let data = b"XXkey1key22key333";
    let keys32 = Binary::new_i32(&[2, 6, 11, 17], data).expect("offsets");
    let vdata = b"__v1v2v3";
    let values64 = Binary::new(&[2, 4, 6, 8], vdata).expect("offsets");
    t.put(keys32, values64).expect("put");
    m.put(keys32, values64);
    m.check(&*t, &[b"XXkey1".to_vec()]);
    assert_eq!(
        t.get_slices(&[b"key22"]).expect("get"),
        [Some(b"v2".to_vec())]
    );
    // An empty batch of each kind is a no-op.
    t.put(Binary::empty(), Binary::empty()).expect("empty put");
    assert_eq!(t.delete(Binary::empty()).expect("empty delete"), 0);
    m.check(&*t, &[]);
}

fn bytes_get_replaces_its_output(o: &OpenBytes) {
    let t = open(o, small(100));
    t.put(bin(&[b"a"]).as_binary(), bin(&[b"alpha"]).as_binary())
        .expect("put");
    let mut out = BinaryBuf::from_slices(["stale", "old", "junk"]);
    let mut found = [true, true];
    t.get(bin(&[b"zz", b"a"]).as_binary(), &mut out, &mut found)
        .expect("get");
    assert_eq!(found, [false, true]);
    assert_eq!(out.len(), 2);
    assert_eq!(out.get(0), Some(&b""[..]));
    assert_eq!(out.get(1), Some(&b"alpha"[..]));
}

fn bytes_clear_gives_the_arena_back(o: &OpenBytes) {
    let t = open(o, small(100));
    let mut m = ByteModel::new();
    let keys: Vec<Vec<u8>> = (0..300).map(|i| format!("c{i}").into_bytes()).collect();
    put(
        &*t,
        &mut m,
        &BinaryBuf::from_slices(&keys),
        &BinaryBuf::from_slices(&keys),
    );
    assert!(t.describe().arena.held_bytes > 0);
    t.clear().expect("clear");
    m.clear();
    assert_eq!(t.describe().arena.held_bytes, 0);
    m.check(&*t, &keys[..10]);
    put(
        &*t,
        &mut m,
        &BinaryBuf::from_slices(&keys[..5]),
        &BinaryBuf::from_slices(&keys[5..10]),
    );
    m.check(&*t, &keys[..20]);
}

/// Issue 14's churn workload, scaled down: rounds of overwrites with new random sizes
/// (8 bytes to 4 KiB) and 30% deletes. The arena must stay within 1.15 times the live
/// bytes after every round, and hold exactly the model's entries.
fn bytes_churn_stays_compact(o: &OpenBytes) {
    let keys = 3000usize;
    let seg = 1u64 << 16;
    let t = open(
        o,
        ByteConfig::new(keys)
            .max_key_bytes(32)
            .max_value_bytes(4096)
            .segment_bytes(seg)
            .table(TableConfig::new(keys).seed(7)),
    );
    let mut m = ByteModel::new();
    let mut rng = SplitMix64(99);
    let names: Vec<Vec<u8>> = (0..keys)
        .map(|i| format!("churn:{i:08}").into_bytes())
        .collect();
    let mut worst: f64 = 0.0;
    for _round in 0..10 {
        for batch in names.chunks(500) {
            let vals: Vec<Vec<u8>> = batch
                .iter()
                .map(|_| {
                    let len = 8 + (rng.next_u64() % (4096 - 8 + 1)) as usize;
                    vec![(rng.next_u64() & 0xff) as u8; len]
                })
                .collect();
            put(
                &*t,
                &mut m,
                &BinaryBuf::from_slices(batch),
                &BinaryBuf::from_slices(&vals),
            );
            let dels: Vec<&Vec<u8>> = batch.iter().filter(|_| rng.next_u64() % 10 < 3).collect();
            let dels = BinaryBuf::from_slices(dels);
            assert_eq!(
                t.delete(dels.as_binary()).expect("delete"),
                m.delete(dels.as_binary())
            );
        }
        let a = t.describe().arena;
        worst = worst.max(a.fragmentation());
        assert!(
            a.fragmentation() <= 1.15,
            "fragmentation {:.3} after a round: {a:?}",
            a.fragmentation()
        );
    }
    m.check(&*t, &[]);
    assert!(worst >= 1.0);
}

fn bytes_expiry(o: &OpenBytes) {
    let clock = Arc::new(ManualClock::new(1000));
    let t = open(o, small(100).clock(clock.clone()));
    let mut m = ByteModel::new();
    m.advance(clock.now_ms());
    let ttl_put = |t: &dyn ByteTable, m: &mut ByteModel, k: &[&[u8]], v: &[&[u8]], ttl: &[u64]| {
        let (kb, vb) = (bin(k), bin(v));
        t.put_ttl(kb.as_binary(), vb.as_binary(), ttl)
            .expect("put_ttl");
        m.put_ttl(kb.as_binary(), vb.as_binary(), ttl);
    };
    ttl_put(
        &*t,
        &mut m,
        &[b"a", b"b", b"c"],
        &[b"1", b"2", b"3"],
        &[100, 0, 50],
    );
    let mut ttl = [0i64; 4];
    t.ttl(bin(&[b"a", b"b", b"c", b"d"]).as_binary(), &mut ttl)
        .expect("ttl");
    assert_eq!(ttl, [100, TTL_NEVER, 50, TTL_MISSING]);
    clock.advance(50);
    m.advance(clock.now_ms());
    assert_eq!(t.len(), 2, "c expired");
    m.check(&*t, &[b"c".to_vec()]);
    // A plain put clears the expiry; the last occurrence's time to live wins.
    put(&*t, &mut m, &bin(&[b"a"]), &bin(&[b"one"]));
    ttl_put(&*t, &mut m, &[b"r", b"r"], &[b"x", b"y"], &[5, 0]);
    m.check(&*t, &[]);
    // Expire, persist, and a key that is not there.
    let mut found = [false; 2];
    t.expire(bin(&[b"b", b"zz"]).as_binary(), &[10, 5], &mut found)
        .expect("expire");
    assert_eq!(found, [true, false]);
    assert_eq!(m.expire(bin(&[b"b", b"zz"]).as_binary(), &[10, 5]), found);
    t.expire(bin(&[b"a"]).as_binary(), &[0], &mut found[..1])
        .expect("persist");
    m.expire(bin(&[b"a"]).as_binary(), &[0]);
    m.check(&*t, &[b"zz".to_vec()]);
    // An expired key comes back as new; deleting one counts nothing.
    ttl_put(&*t, &mut m, &[b"c", b"e"], &[b"again", b"5"], &[0, 1]);
    clock.advance(10);
    m.advance(clock.now_ms());
    assert_eq!(
        t.delete(bin(&[b"e", b"b"]).as_binary()).expect("delete"),
        0,
        "both expired"
    );
    m.check(&*t, &[b"e".to_vec(), b"b".to_vec()]);
    // Bad input changes nothing.
    let before = t.describe();
    let r = t.put_ttl(bin(&[b"q"]).as_binary(), bin(&[b"v"]).as_binary(), &[1, 2]);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "ttl_ms", .. })),
        "{r:?}"
    );
    let r = t.expire(bin(&[b"a"]).as_binary(), &[], &mut [false]);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "ttl_ms", .. })),
        "{r:?}"
    );
    let r = t.ttl(bin(&[b"a"]).as_binary(), &mut []);
    assert!(
        matches!(
            r,
            Err(Error::LengthMismatch {
                what: "ttl_out",
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(t.describe(), before);
    m.check(&*t, &[]);
}

/// Random batches of puts (some with times to live), deletes, expiry changes, clock moves
/// and lookups over a small key space with few hash bits (so that keys collide), checked
/// against the model after every batch.
fn bytes_random_batches_match_the_model(o: &OpenBytes) {
    let clock = Arc::new(ManualClock::new(0));
    let t = open(o, small(64).hash_bits(4).clock(clock.clone()));
    let mut m = ByteModel::new();
    let mut rng = SplitMix64(2024);
    let key = |r: u64| -> Vec<u8> {
        let len = 1 + (r % 12) as usize;
        (0..len).map(|j| ((r >> (j % 8 * 8)) % 3) as u8).collect()
    };
    for _ in 0..200 {
        let n = (rng.next_u64() % 40) as usize;
        let keys: Vec<Vec<u8>> = (0..n).map(|_| key(rng.next_u64())).collect();
        match rng.next_u64() % 3 {
            0 | 1 => {
                let vals: Vec<Vec<u8>> = (0..n)
                    .map(|_| vec![(rng.next_u64() % 256) as u8; (rng.next_u64() % 70) as usize])
                    .collect();
                put(
                    &*t,
                    &mut m,
                    &BinaryBuf::from_slices(&keys),
                    &BinaryBuf::from_slices(&vals),
                );
            }
            _ => {
                let kb = BinaryBuf::from_slices(&keys);
                assert_eq!(
                    t.delete(kb.as_binary()).expect("delete"),
                    m.delete(kb.as_binary())
                );
            }
        }
        m.check(&*t, &keys);
    }
}

/// `export` copies out exactly the live entries (colliding hashes, empty values, the
/// longest keys, absolute expiry times, nothing expired), and the image put back into a
/// new table gives the same table.
fn bytes_export_restore_roundtrip(o: &OpenBytes) {
    let clock = Arc::new(ManualClock::new(1000));
    let t = open(o, small(400).hash_bits(2).clock(clock.clone()));
    let empty = t.export().expect("export of an empty table");
    assert!(empty.is_empty());
    let mut m = ByteModel::new();
    m.advance(clock.now_ms());
    let keys: Vec<Vec<u8>> = (0..300u32)
        .map(|i| match i {
            0 => vec![0u8],
            1 => vec![0xff; 64],
            _ => format!("k:{i}").into_bytes(),
        })
        .collect();
    let values: Vec<Vec<u8>> = (0..300usize)
        .map(|i| {
            if i % 10 == 0 {
                Vec::new()
            } else {
                vec![i as u8; (i * 13) % 4096]
            }
        })
        .collect();
    let ttl: Vec<u64> = (0..300u64)
        .map(|i| [0, 30, 700][(i % 3) as usize])
        .collect();
    let (kb, vb) = (
        BinaryBuf::from_slices(&keys),
        BinaryBuf::from_slices(&values),
    );
    t.put_ttl(kb.as_binary(), vb.as_binary(), &ttl)
        .expect("put_ttl");
    m.put_ttl(kb.as_binary(), vb.as_binary(), &ttl);
    let gone = BinaryBuf::from_slices(keys.iter().skip(1).step_by(4));
    assert_eq!(
        t.delete(gone.as_binary()).expect("delete"),
        m.delete(gone.as_binary())
    );
    clock.advance(40);
    m.advance(clock.now_ms());
    let mut img = t.export().expect("export");
    assert_eq!(img.len(), m.len(), "exported entries");
    img.sort();
    for i in 0..img.len() {
        let k = img.keys.get(i).expect("key");
        assert_eq!(img.values.get(i), m.get(k), "exported value of {k:?}");
        let want = match m.ttl(k) {
            TTL_NEVER => 0,
            left => clock.now_ms() + left as u64,
        };
        assert_eq!(img.expires[i], want, "exported expiry of {k:?}");
    }
    let u = open(o, small(16).hash_bits(2).clock(clock.clone()));
    for run in img.live_runs(clock.now_ms(), 50, 1 << 16) {
        let (k, v) = run.batches();
        u.put_ttl(k, v, &run.ttl_ms).expect("restore run");
    }
    m.check(&*u, &[b"k:1".to_vec()]);
    let mut back = u.export().expect("export of the restored table");
    back.sort();
    assert_eq!(back, img, "the restored table's image");
}
