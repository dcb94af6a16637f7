//! Parallel host copies between callers' slices and staging buffers.
//!
//! A host batch goes through pinned staging buffers: a put copies the caller's keys and
//! values into them, a get copies the results out of them into the caller's slices. For
//! large batches these copies bound the whole batch, so [`par_copy`] splits them over the
//! rayon pool in pieces of [`COPY_PIECE_BYTES`].
//!
//! # Streaming stores
//!
//! A regular store to a line that is not in the cache first reads that line from memory
//! (a *read for ownership*), so a copy of `n` bytes moves about `3n` bytes over the memory
//! bus: the source read, the destination read, the destination written back. The
//! destinations here are not read by the CPU soon: a staging buffer is read by the GPU's
//! DMA engine, and a large batch's output is much bigger than the caches. x86-64's
//! non-temporal (streaming) stores skip the read for ownership and the cache: they fill
//! write-combining buffers that go to memory as whole lines, so the copy moves about `2n`
//! bytes. [`CopyMode::Streaming`] copies that way (16-byte `movntdq` stores, SSE2 being
//! part of x86-64); [`CopyMode::Cached`] uses ordinary stores (`copy_from_slice`). Each
//! streamed piece ends with an `sfence`, so its stores are globally visible before its
//! rayon task completes, and hence before [`par_copy`] returns and the buffer is handed to
//! DMA or to the caller. (A staging buffer mapped write-combining, as CUDA's input
//! buffers are, takes ordinary stores without a read for ownership already; there the two
//! modes should differ little.)
//!
//! Copies of fewer than [`PAR_MIN`] elements run on the calling thread with ordinary stores
//! whatever the mode, as do pieces of less than a few KiB.
//!
//! # Choosing the mode
//!
//! Every copy names its mode; a backend takes it from its options (whose `from_env` reads
//! [`HOST_COPY_ENV`], `VRAMKV_HOST_COPY=stream|cached`), so that one binary can compare both
//! modes on the same machine. The default, [`CopyMode::DEFAULT`], is streaming on x86-64 and
//! cached elsewhere. Streaming needs x86-64: elsewhere [`par_copy`] copies with ordinary
//! stores in either mode.
//!
//! ```
//! use kv_staging::copy::{CopyMode, par_bools, par_copy};
//!
//! let src: Vec<u64> = (0..1_000_000).collect();
//! let mut dst = vec![0u64; src.len()];
//! par_copy(CopyMode::DEFAULT, &mut dst, &src);
//! assert_eq!(dst, src);
//! let mut again = vec![0u64; src.len()];
//! par_copy(CopyMode::parse("cached").expect("a mode"), &mut again, &src);
//! assert_eq!(again, src);
//!
//! // Found flags come back from the device as bytes.
//! let mut found = [false; 3];
//! par_bools(&mut found, &[1, 0, 7]);
//! assert_eq!(found, [true, false, true]);
//! ```

use std::fmt;

use bytemuck::Pod;
use rayon::prelude::*;

/// The environment variable that the backends' `Options::from_env` read the [`CopyMode`]
/// from: `stream` or `cached`.
pub const HOST_COPY_ENV: &str = "VRAMKV_HOST_COPY";

/// Copies of fewer elements than this run on the calling thread with ordinary stores.
pub const PAR_MIN: usize = 1 << 17;

/// Bytes one rayon task copies at a time (64 KiB measured the same as 256 KiB within the
/// H100 host's run-to-run spread; docs/PERF.md).
pub const COPY_PIECE_BYTES: usize = 256 << 10;

/// Pieces smaller than this many bytes are copied with ordinary stores in either mode.
const STREAM_MIN_BYTES: usize = 4 << 10;

/// Flags per rayon task in [`par_bools`].
const BOOLS_PIECE: usize = 1 << 15;

/// How [`par_copy`] writes the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyMode {
    /// Non-temporal (streaming) stores on x86-64, which skip the read for ownership of each
    /// destination line and leave the caches alone; ordinary stores elsewhere.
    Streaming,
    /// Ordinary stores (`copy_from_slice`).
    Cached,
}

impl CopyMode {
    /// The mode when [`HOST_COPY_ENV`] is unset: streaming on x86-64, cached elsewhere.
    pub const DEFAULT: CopyMode = if cfg!(target_arch = "x86_64") {
        CopyMode::Streaming
    } else {
        CopyMode::Cached
    };

    /// The mode a value of [`HOST_COPY_ENV`] names (`stream` or `cached`, surrounding
    /// whitespace ignored), if any.
    pub fn parse(value: &str) -> Option<CopyMode> {
        match value.trim() {
            "stream" => Some(CopyMode::Streaming),
            "cached" => Some(CopyMode::Cached),
            _ => None,
        }
    }

    /// The mode's name, as [`HOST_COPY_ENV`] spells it: `stream` or `cached`.
    pub fn name(self) -> &'static str {
        match self {
            CopyMode::Streaming => "stream",
            CopyMode::Cached => "cached",
        }
    }
}

impl fmt::Display for CopyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Copies `src` into `dst` in `mode`, on all cores when it is large.
///
/// The lengths should be equal (checked in debug builds); otherwise the first
/// `min(dst.len(), src.len())` elements are copied and the rest of `dst` is left as it was.
pub fn par_copy<T: Pod + Send + Sync>(mode: CopyMode, dst: &mut [T], src: &[T]) {
    debug_assert_eq!(dst.len(), src.len(), "par_copy: lengths differ");
    let n = dst.len().min(src.len());
    let (dst, src) = (&mut dst[..n], &src[..n]);
    if n < PAR_MIN || std::mem::size_of::<T>() == 0 {
        dst.copy_from_slice(src);
        return;
    }
    let piece = (COPY_PIECE_BYTES / std::mem::size_of::<T>()).max(1);
    dst.par_chunks_mut(piece)
        .zip(src.par_chunks(piece))
        .for_each(|(d, s)| copy_piece(mode, d, s));
}

/// Copies one piece (same lengths) on the current thread.
fn copy_piece<T: Pod>(mode: CopyMode, dst: &mut [T], src: &[T]) {
    match mode {
        CopyMode::Streaming if std::mem::size_of_val(dst) >= STREAM_MIN_BYTES => {
            // `T: Pod` has no padding and no invalid bit patterns, and `u8` has no
            // alignment, so these casts cannot fail (zero-sized `T` never gets here).
            stream::copy_bytes(bytemuck::cast_slice_mut(dst), bytemuck::cast_slice(src));
        }
        _ => dst.copy_from_slice(src),
    }
}

/// Where streaming stores are not implemented, an ordinary copy.
#[cfg(not(target_arch = "x86_64"))]
mod stream {
    pub(super) fn copy_bytes(dst: &mut [u8], src: &[u8]) {
        dst.copy_from_slice(src);
    }
}

#[cfg(target_arch = "x86_64")]
mod stream {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};

    /// Bytes per non-temporal store.
    const V: usize = std::mem::size_of::<__m128i>();

    /// Copies `src` into `dst` (same length): ordinary stores up to the first 16-byte
    /// aligned address of `dst`, non-temporal stores for the 16-byte blocks from there,
    /// ordinary stores for the rest; then an `sfence`, so that all of it is globally
    /// visible when this returns.
    pub(super) fn copy_bytes(dst: &mut [u8], src: &[u8]) {
        debug_assert_eq!(dst.len(), src.len());
        let head = (dst.as_ptr().addr().wrapping_neg() % V).min(dst.len());
        let (dst_head, dst) = dst.split_at_mut(head);
        let (src_head, src) = src.split_at(head);
        dst_head.copy_from_slice(src_head);

        let body = dst.len() - dst.len() % V;
        let (dst_body, dst_tail) = dst.split_at_mut(body);
        let (src_body, src_tail) = src.split_at(body);
        let blocks = body / V;
        let d = dst_body.as_mut_ptr().cast::<__m128i>();
        let s = src_body.as_ptr().cast::<__m128i>();
        debug_assert!(blocks == 0 || d.is_aligned());
        let mut i = 0;
        while i + 4 <= blocks {
            // SAFETY: blocks `i..i + 4` lie within `src_body` and `dst_body` (each is
            // `blocks * 16` bytes long); `dst_body` starts at a 16-byte aligned address (the
            // head above ends there), as `_mm_stream_si128` needs; `_mm_loadu_si128` takes
            // any alignment. The slices are distinct (`&mut` and `&`), so they do not
            // overlap. SSE2 is part of the x86-64 baseline.
            unsafe {
                let a = _mm_loadu_si128(s.add(i));
                let b = _mm_loadu_si128(s.add(i + 1));
                let c = _mm_loadu_si128(s.add(i + 2));
                let e = _mm_loadu_si128(s.add(i + 3));
                _mm_stream_si128(d.add(i), a);
                _mm_stream_si128(d.add(i + 1), b);
                _mm_stream_si128(d.add(i + 2), c);
                _mm_stream_si128(d.add(i + 3), e);
            }
            i += 4;
        }
        while i < blocks {
            // SAFETY: as above, for block `i < blocks`.
            unsafe { _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i))) };
            i += 1;
        }

        dst_tail.copy_from_slice(src_tail);
        // SAFETY: `sfence` only orders stores; SSE is part of the x86-64 baseline. It makes
        // the non-temporal stores above globally visible before any later store (such as
        // the one that tells rayon this task is done).
        unsafe { _mm_sfence() };
    }
}

/// Writes `src[i] != 0` to `dst[i]`, on all cores when it is large.
///
/// The lengths should be equal; otherwise the first `min(dst.len(), src.len())` flags are
/// written and the rest of `dst` is left as it was.
pub fn par_bools(dst: &mut [bool], src: &[u8]) {
    if dst.len() < PAR_MIN {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s != 0);
    } else {
        dst.par_chunks_mut(BOOLS_PIECE)
            .zip(src.par_chunks(BOOLS_PIECE))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d = *s != 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [CopyMode; 2] = [CopyMode::Streaming, CopyMode::Cached];

    /// Lengths around every threshold, and a few MiB of `T`.
    fn lengths<T>() -> Vec<usize> {
        let size = std::mem::size_of::<T>();
        let piece = COPY_PIECE_BYTES / size;
        let stream_min = STREAM_MIN_BYTES / size;
        let mut v = vec![0, 1, 2, 3, 15, 16, 17, 31, 33, 63, 64, 65, 100, 1000];
        v.extend([
            stream_min - 1,
            stream_min,
            stream_min + 1,
            5 * stream_min + 7,
        ]);
        v.extend([PAR_MIN - 1, PAR_MIN, PAR_MIN + 1]);
        v.extend([piece - 1, piece, piece + 1]);
        v.extend([PAR_MIN + piece + stream_min / 2, 3 * PAR_MIN + 5]);
        v.push((5 << 20) / size + 3);
        v
    }

    /// `par_copy` agrees with `copy_from_slice` for every mode, length and start
    /// offset (0..4 elements) of source and destination alike.
    fn check<T: Pod + Send + Sync + PartialEq + fmt::Debug>(make: impl Fn(usize) -> T) {
        let max = lengths::<T>().into_iter().max().unwrap_or(0) + 8;
        let src: Vec<T> = (0..max).map(&make).collect();
        let zero = T::zeroed();
        let mut dst = vec![zero; max];
        for mode in MODES {
            for len in lengths::<T>() {
                for (d_off, s_off) in [(0, 0), (1, 1), (2, 3), (3, 0), (0, 2)] {
                    let (end, guard) = (d_off + len, (d_off + len + 16).min(max));
                    dst[..guard].fill(zero);
                    let s = &src[s_off..s_off + len];
                    par_copy(mode, &mut dst[d_off..end], s);
                    let at = format!("{mode} len {len} offsets {d_off}/{s_off}");
                    assert!(dst[d_off..end] == *s, "{at}");
                    // Nothing next to the destination was touched.
                    assert!(dst[..d_off].iter().all(|x| *x == zero), "{at}");
                    assert!(dst[end..guard].iter().all(|x| *x == zero), "{at}");
                }
            }
        }
    }

    #[test]
    fn stream_copy_bytes_every_alignment() {
        // The streaming piece copy alone, below the piece size it is used for: every head
        // and tail length, and a few 4-block bodies.
        let src: Vec<u8> = (0..600).map(|i| (i % 251) as u8 + 1).collect();
        let mut dst = vec![0u8; 600];
        for len in (0..150).chain([255, 256, 257, 511]) {
            for d_off in 0..17 {
                for s_off in [0, 1, 5, 8, 15, 16] {
                    dst.fill(0);
                    stream::copy_bytes(&mut dst[d_off..d_off + len], &src[s_off..s_off + len]);
                    assert!(dst[..d_off].iter().all(|x| *x == 0));
                    assert_eq!(dst[d_off..d_off + len], src[s_off..s_off + len]);
                    assert!(dst[d_off + len..].iter().all(|x| *x == 0));
                }
            }
        }
    }

    #[test]
    fn copies_u8() {
        check(|i| (i % 251) as u8 + 1);
    }

    #[test]
    fn copies_u32() {
        check(|i| (i as u32).wrapping_mul(2_654_435_761) | 1);
    }

    #[test]
    fn copies_u64() {
        check(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    }

    #[test]
    fn copies_wide_elements() {
        // Elements wider than a 16-byte store, and a piece of few elements.
        let src: Vec<[u64; 5]> = (0..PAR_MIN as u64 + 3)
            .map(|i| [i, !i, i * 3, 7, i])
            .collect();
        for mode in MODES {
            let mut dst = vec![[0u64; 5]; src.len()];
            par_copy(mode, &mut dst, &src);
            assert!(dst == src, "{mode}");
        }
    }

    #[test]
    fn copies_zero_sized_elements() {
        let src = vec![(); PAR_MIN * 2];
        let mut dst = vec![(); PAR_MIN * 2];
        for mode in MODES {
            par_copy(mode, &mut dst, &src);
        }
    }

    #[cfg(not(debug_assertions))]
    #[test]
    fn different_lengths_copy_the_common_prefix() {
        for mode in MODES {
            let src: Vec<u64> = (1..=PAR_MIN as u64 * 2).collect();
            let mut dst = vec![0u64; PAR_MIN + 5];
            par_copy(mode, &mut dst, &src);
            assert_eq!(dst, src[..dst.len()]);
            let mut dst = vec![0u64; src.len() + 9];
            par_copy(mode, &mut dst, &src);
            assert_eq!(dst[..src.len()], src);
            assert!(dst[src.len()..].iter().all(|x| *x == 0));
        }
    }

    #[test]
    fn modes_parse_by_name() {
        assert_eq!(CopyMode::parse("stream"), Some(CopyMode::Streaming));
        assert_eq!(CopyMode::parse(" cached\n"), Some(CopyMode::Cached));
        assert_eq!(CopyMode::parse("Stream"), None);
        assert_eq!(CopyMode::parse(""), None);
        let stream = if cfg!(target_arch = "x86_64") {
            CopyMode::Streaming
        } else {
            CopyMode::Cached
        };
        assert_eq!(CopyMode::DEFAULT, stream);
        for m in MODES {
            assert_eq!(CopyMode::parse(m.name()), Some(m));
            assert_eq!(m.to_string(), m.name());
        }
    }

    #[test]
    fn bools() {
        for len in [0, 1, 1000, PAR_MIN - 1, PAR_MIN, 300_000] {
            let bytes: Vec<u8> = (0..len)
                .map(|i| (i % 3 == 0) as u8 * (i % 7) as u8)
                .collect();
            let mut b = vec![true; len];
            par_bools(&mut b, &bytes);
            assert!(
                b.iter().zip(&bytes).all(|(x, y)| *x == (*y != 0)),
                "len {len}"
            );
        }
    }
}
