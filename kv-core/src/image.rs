//! Table images: every live entry of a table at one point in time, what snapshots are
//! written from and loaded into.
//!
//! [`KvBackend::export`](crate::KvBackend::export) and
//! [`ByteTable::export`](crate::ByteTable::export) copy a table out under one hold of its
//! lock, so that the image is a point in time (a batch is in it whole or not at all) and
//! other batches wait no longer than the copy itself. What is done with the image (a
//! snapshot file, a comparison in a test) happens after the lock is let go.
//!
//! An image is portable: it holds what the contract defines, never a backend's layout.
//! Keys come in no particular order; scores are the scores the contract speaks of (LRU:
//! the logical clock of the last access; LFU: the access count; custom: the caller's);
//! expiry times are absolute, in milliseconds of the table's clock, 0 for never.

use crate::{Binary, BinaryBuf, Error, Result};

/// Every live entry of a fixed-width table, copied out at one point in time.
///
/// ```
/// use kv_core::TableImage;
/// let mut img = TableImage::new(2);
/// img.push(7, &[1, 2], None);
/// img.push(9, &[3, 4], None);
/// assert_eq!(img.len(), 2);
/// let parts: Vec<_> = img.parts(1).collect();
/// assert_eq!(parts.len(), 2);
/// assert_eq!(parts[1].keys, &[9]);
/// assert_eq!(parts[1].values, &[3, 4]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableImage {
    /// Value width in u64 words.
    pub width: usize,
    /// The keys.
    pub keys: Vec<u64>,
    /// `keys.len() * width` value words, row `i` for `keys[i]`.
    pub values: Vec<u64>,
    /// Cache tables only (`None` for others): each entry's score, as the contract defines
    /// it for the table's policy.
    pub scores: Option<Vec<u64>>,
    /// Cache tables only: each entry's expiry time in milliseconds of the table's clock, 0
    /// for never.
    pub expires: Option<Vec<u64>>,
    /// Cache tables under LRU: the table's logical clock when the image was taken (0
    /// otherwise). A restore moves the new table's clock to at least this.
    pub clock: u64,
}

/// A per-entry cache record: `(score, expiry time)`.
pub type CacheMeta = (u64, u64);

impl TableImage {
    /// An empty image of a table of `width` words.
    pub fn new(width: usize) -> Self {
        Self {
            width,
            ..Self::default()
        }
    }

    /// An empty image of a cache table of `width` words (scores and expiry times kept).
    pub fn new_cache(width: usize, clock: u64) -> Self {
        Self {
            width,
            scores: Some(Vec::new()),
            expires: Some(Vec::new()),
            clock,
            ..Self::default()
        }
    }

    /// Adds one entry; `meta` is its score and expiry time in a cache image, `None`
    /// otherwise (a cache image then records score 0 and no expiry).
    pub fn push(&mut self, key: u64, row: &[u64], meta: Option<CacheMeta>) {
        self.keys.push(key);
        self.values.extend_from_slice(row);
        let (score, expires) = meta.unwrap_or((0, 0));
        if let Some(s) = &mut self.scores {
            s.push(score);
        }
        if let Some(e) = &mut self.expires {
            e.push(expires);
        }
    }

    /// Entries in the image.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the image holds no entry.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether this is the image of a cache table.
    pub fn is_cache(&self) -> bool {
        self.scores.is_some()
    }

    /// The whole image as one part.
    pub fn as_part(&self) -> ImagePart<'_> {
        ImagePart {
            keys: &self.keys,
            values: &self.values,
            scores: self.scores.as_deref(),
            expires: self.expires.as_deref(),
            clock: self.clock,
        }
    }

    /// The image cut into parts of at most `max` entries (at least one), for restores in
    /// batches.
    pub fn parts(&self, max: usize) -> impl Iterator<Item = ImagePart<'_>> + '_ {
        let max = max.max(1);
        (0..self.len()).step_by(max).map(move |a| {
            let b = (a + max).min(self.len());
            ImagePart {
                keys: &self.keys[a..b],
                values: &self.values[a * self.width..b * self.width],
                scores: self.scores.as_deref().map(|s| &s[a..b]),
                expires: self.expires.as_deref().map(|e| &e[a..b]),
                clock: self.clock,
            }
        })
    }

    /// Sorts the entries by key, so that two images of the same contents compare equal.
    pub fn sort(&mut self) {
        let w = self.width;
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_unstable_by_key(|&i| self.keys[i]);
        self.keys = order.iter().map(|&i| self.keys[i]).collect();
        self.values = order
            .iter()
            .flat_map(|&i| self.values[i * w..(i + 1) * w].iter().copied())
            .collect();
        if let Some(s) = &mut self.scores {
            *s = order.iter().map(|&i| s[i]).collect();
        }
        if let Some(e) = &mut self.expires {
            *e = order.iter().map(|&i| e[i]).collect();
        }
    }

    /// Checks that the columns' lengths agree with each other and with the width.
    pub fn check(&self) -> Result<()> {
        self.as_part().check(self.width)
    }
}

/// A run of entries of a [`TableImage`]: what [`KvBackend::restore`](crate::KvBackend::restore)
/// puts back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePart<'a> {
    /// The keys.
    pub keys: &'a [u64],
    /// Their value rows.
    pub values: &'a [u64],
    /// Cache tables: their scores.
    pub scores: Option<&'a [u64]>,
    /// Cache tables: their expiry times (absolute milliseconds of the table's clock; 0:
    /// never).
    pub expires: Option<&'a [u64]>,
    /// Cache tables under LRU: the logical clock of the image.
    pub clock: u64,
}

impl ImagePart<'_> {
    /// Checks the part's lengths against a table of `width` words.
    ///
    /// ```
    /// use kv_core::{Error, ImagePart};
    /// let p = ImagePart { keys: &[1, 2], values: &[1, 2], scores: Some(&[0]), expires: None, clock: 0 };
    /// assert!(matches!(p.check(1), Err(Error::LengthMismatch { what: "scores", .. })));
    /// ```
    pub fn check(&self, width: usize) -> Result<()> {
        crate::check_put_len(width, self.keys.len(), self.values.len())?;
        for (what, col) in [("scores", self.scores), ("expires", self.expires)] {
            if let Some(c) = col
                && c.len() != self.keys.len()
            {
                return Err(Error::LengthMismatch {
                    what,
                    expected: self.keys.len(),
                    got: c.len(),
                });
            }
        }
        Ok(())
    }
}

/// Every live entry of a byte table, copied out at one point in time
/// ([`ByteTable::export`](crate::ByteTable::export)).
///
/// ```
/// use kv_core::ByteImage;
/// let mut img = ByteImage::default();
/// img.push(b"user:1", b"alice", 0);
/// img.push(b"user:2", b"", 1_700_000_000_000);
/// assert_eq!(img.len(), 2);
/// assert_eq!(img.values.get(1), Some(&b""[..]));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ByteImage {
    /// The keys.
    pub keys: BinaryBuf,
    /// The values, item `i` for key `i`.
    pub values: BinaryBuf,
    /// Each entry's expiry time in milliseconds of the table's clock, 0 for never.
    pub expires: Vec<u64>,
}

impl ByteImage {
    /// Adds one entry.
    pub fn push(&mut self, key: &[u8], value: &[u8], expires: u64) {
        self.keys.push(key);
        self.values.push(value);
        self.expires.push(expires);
    }

    /// Entries in the image.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the image holds no entry.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Bytes of keys and values.
    pub fn data_bytes(&self) -> u64 {
        (self.keys.data().len() + self.values.data().len()) as u64
    }

    /// Sorts the entries by key, so that two images of the same contents compare equal.
    pub fn sort(&mut self) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_unstable_by(|&a, &b| self.keys.get(a).cmp(&self.keys.get(b)));
        let mut out = ByteImage::default();
        for i in order {
            out.push(
                self.keys.get(i).unwrap_or_default(),
                self.values.get(i).unwrap_or_default(),
                self.expires[i],
            );
        }
        *self = out;
    }

    /// The entries whose expiry time is 0 or later than `now`, each with its time to live
    /// at `now` (0: never), in runs of at most `max_items` entries and `max_bytes` bytes of
    /// keys and values (at least one entry a run): how a snapshot is put back into a table
    /// with [`ByteTable::put_ttl`](crate::ByteTable::put_ttl).
    pub fn live_runs(&self, now: u64, max_items: usize, max_bytes: u64) -> Vec<ByteRun> {
        let mut runs = Vec::new();
        let mut run = ByteRun::default();
        let mut bytes = 0u64;
        for i in 0..self.len() {
            let e = self.expires[i];
            if e != 0 && e <= now {
                continue;
            }
            let (k, v) = (
                self.keys.get(i).unwrap_or_default(),
                self.values.get(i).unwrap_or_default(),
            );
            let b = (k.len() + v.len()) as u64;
            if !run.keys.is_empty() && (run.keys.len() >= max_items || bytes + b > max_bytes) {
                runs.push(std::mem::take(&mut run));
                bytes = 0;
            }
            run.keys.push(k);
            run.values.push(v);
            run.ttl_ms.push(if e == 0 { 0 } else { e - now });
            bytes += b;
        }
        if !run.keys.is_empty() {
            runs.push(run);
        }
        runs
    }
}

/// A run of a [`ByteImage`] ready for [`ByteTable::put_ttl`](crate::ByteTable::put_ttl).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ByteRun {
    /// The keys.
    pub keys: BinaryBuf,
    /// The values.
    pub values: BinaryBuf,
    /// Each key's time to live in milliseconds (0: never).
    pub ttl_ms: Vec<u64>,
}

impl ByteRun {
    /// Keys and values as batches.
    pub fn batches(&self) -> (Binary<'_>, Binary<'_>) {
        (self.keys.as_binary(), self.values.as_binary())
    }
    /// Whether any entry of the run expires.
    pub fn expires(&self) -> bool {
        self.ttl_ms.iter().any(|&t| t != 0)
    }
}
