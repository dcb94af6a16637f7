//! The sequential model every backend is compared with.

use std::collections::HashMap;

/// A plain, obviously-correct `HashMap` implementation of the vramkv semantics,
/// applied one pair at a time in batch order.
///
/// ```
/// use kv_conformance::Model;
/// let mut m = Model::new(1);
/// m.put(&[5, 5], &[1, 2]);
/// let (values, found) = m.get(&[5, 6]);
/// assert_eq!((values, found), (vec![2, 0], vec![true, false]));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Model {
    width: usize,
    map: HashMap<u64, Vec<u64>>,
}

impl Model {
    /// An empty model of `width` u64 words per value.
    pub fn new(width: usize) -> Self {
        Self {
            width,
            map: HashMap::new(),
        }
    }
    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Inserts or overwrites, in order.
    pub fn put(&mut self, keys: &[u64], values: &[u64]) {
        for (i, k) in keys.iter().enumerate() {
            self.map
                .insert(*k, values[i * self.width..(i + 1) * self.width].to_vec());
        }
    }
    /// Looks up; missing keys give zeros and `false`.
    pub fn get(&self, keys: &[u64]) -> (Vec<u64>, Vec<bool>) {
        let mut values = vec![0; keys.len() * self.width];
        let mut found = vec![false; keys.len()];
        for (i, k) in keys.iter().enumerate() {
            if let Some(v) = self.map.get(k) {
                values[i * self.width..(i + 1) * self.width].copy_from_slice(v);
                found[i] = true;
            }
        }
        (values, found)
    }
    /// Presence of each key.
    pub fn contains(&self, keys: &[u64]) -> Vec<bool> {
        keys.iter().map(|k| self.map.contains_key(k)).collect()
    }
    /// Removes; returns how many entries went.
    pub fn delete(&mut self, keys: &[u64]) -> usize {
        keys.iter().filter(|k| self.map.remove(k).is_some()).count()
    }
    /// Removes everything.
    pub fn clear(&mut self) {
        self.map.clear();
    }
    /// Every key held, sorted.
    pub fn keys(&self) -> Vec<u64> {
        let mut k: Vec<u64> = self.map.keys().copied().collect();
        k.sort_unstable();
        k
    }
}

/// A small deterministic generator (SplitMix64) so that suites need no RNG crate and a
/// failure reproduces from its seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}
