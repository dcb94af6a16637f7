//! The bench workload: random-looking keys with duplicates, whose expected value after a
//! put is known in O(1), so that 100M-item batches validate in parallel in well under a
//! second.
//!
//! Batch `b` puts `n` pairs. Position `i` carries key `mix(base_b + i % m)`, with
//! `m = n - n / 8`: one item in eight repeats an earlier key of the same batch, and
//! `base_b = b * m / 2` makes half of each batch overwrite keys of the batch before.
//! `mix` is a bijection, so keys collide exactly when `i % m` does, and the last
//! occurrence of position `i`'s key is the largest `j < n` with `j ≡ i (mod m)`.

use rayon::prelude::*;

/// One batch's keys and the values put with them.
pub struct Batch {
    pub keys: Vec<u64>,
    pub values: Vec<u64>,
    n: usize,
    m: usize,
    width: usize,
    seed: u64,
}

/// A bijection on u64 (the splitmix64 finaliser), salted.
#[inline]
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
fn value(seed: u64, pos: usize, word: usize) -> u64 {
    mix(seed ^ ((pos as u64) << 5) ^ word as u64)
}

/// Distinct keys over `batches` batches of `n` (to size the table).
pub fn unique_keys(n: usize, batches: usize) -> usize {
    let m = distinct_per_batch(n);
    m.saturating_add((m / 2).saturating_mul(batches.saturating_sub(1)))
}

fn distinct_per_batch(n: usize) -> usize {
    (n - n / 8).max(1)
}

impl Batch {
    /// Builds batch `b` (0-based) of `n` items of `width` words.
    pub fn new(b: usize, n: usize, width: usize, seed: u64) -> Self {
        let m = distinct_per_batch(n);
        let base = (b * (m / 2)) as u64;
        let salt = mix(seed);
        let keys: Vec<u64> = (0..n)
            .into_par_iter()
            .map(|i| mix(salt ^ (base + (i % m) as u64)))
            .collect();
        let seed = mix(seed ^ (b as u64) << 40);
        let mut values = vec![0u64; n * width];
        values
            .par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| {
                for (w, x) in row.iter_mut().enumerate() {
                    *x = value(seed, i, w);
                }
            });
        Self {
            keys,
            values,
            n,
            m,
            width,
            seed,
        }
    }

    /// Items whose looked-up row equals the last-put row of their key and was found.
    pub fn count_valid(&self, values_out: &[u64], found: &[bool]) -> usize {
        let (n, m, w) = (self.n, self.m, self.width);
        (0..n)
            .into_par_iter()
            .filter(|&i| {
                let r = i % m;
                let last = r + m * ((n - 1 - r) / m);
                found[i] && (0..w).all(|k| values_out[i * w + k] == value(self.seed, last, k))
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_values_follow_the_last_duplicate() {
        let b = Batch::new(1, 1000, 2, 7);
        let mut last = std::collections::HashMap::new();
        for (i, k) in b.keys.iter().enumerate() {
            last.insert(*k, i);
        }
        let mut out = vec![0; 2000];
        for (i, k) in b.keys.iter().enumerate() {
            let j = last[k];
            out[i * 2..i * 2 + 2].copy_from_slice(&b.values[j * 2..j * 2 + 2]);
        }
        assert_eq!(b.count_valid(&out, &[true; 1000]), 1000);
        out[3] ^= 1;
        assert_eq!(b.count_valid(&out, &[true; 1000]), 999);
        assert!(last.len() < 1000, "the batch has duplicates");
        assert_eq!(unique_keys(1000, 1), last.len());
    }
}
