//! Mapped buffers: asking for a mapping and waiting until it is there, the parallel copies
//! between the caller's slices and mapped ranges, and chunked readbacks of device buffers
//! ([`read_back`], what table exports copy the table out with).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use kv_core::Result;
use rayon::prelude::*;

use crate::gpu::{Gpu, device_error};

pub(crate) const MAPPED: u8 = 1;
pub(crate) const MAP_PENDING: u8 = 0;
const MAP_FAILED: u8 = 2;

/// Asks for `buffer` to be mapped; `state` becomes `MAPPED` or `MAP_FAILED` when it is done.
pub(crate) fn map(buffer: &wgpu::Buffer, mode: wgpu::MapMode, state: &Arc<AtomicU8>) {
    map_range(buffer, mode, state, None);
}

/// [`map`] for the bytes before `end` (all of them for `None`).
pub(crate) fn map_range(
    buffer: &wgpu::Buffer,
    mode: wgpu::MapMode,
    state: &Arc<AtomicU8>,
    end: Option<u64>,
) {
    state.store(MAP_PENDING, Ordering::Release);
    let s = state.clone();
    let done = move |r: std::result::Result<(), wgpu::BufferAsyncError>| {
        s.store(
            if r.is_ok() { MAPPED } else { MAP_FAILED },
            Ordering::Release,
        )
    };
    match end {
        Some(end) => buffer.map_async(mode, ..end, done),
        None => buffer.map_async(mode, .., done),
    }
}

/// Returns once a buffer whose mapping was requested before submission `idx`, which has
/// completed, is mapped. The callback normally ran inside our wait; when another thread's
/// poll collected it, that thread runs it in a moment, so we only yield until it has.
pub(crate) fn expect_mapped(gpu: &Gpu, state: &AtomicU8, what: &str) -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        match state.load(Ordering::Acquire) {
            MAPPED => return Ok(()),
            MAP_FAILED => return Err(device_error(format!("mapping the {what} buffer failed"))),
            _ if t0.elapsed() > std::time::Duration::from_secs(30) => {
                return Err(device_error(format!(
                    "the {what} buffer was not mapped 30 s after its submission completed"
                )));
            }
            _ => {
                let _ = gpu.device.poll(wgpu::PollType::Poll);
                std::thread::yield_now();
            }
        }
    }
}

/// Copies of at least this many bytes are split over the rayon pool.
const PAR_MIN: usize = 1 << 20;
/// Bytes per piece of a parallel copy.
const PAR_PIECE: usize = 1 << 18;

pub(crate) fn copy_bools(dst: &mut [bool], src: &[u8]) {
    let f = |(d, s): (&mut [bool], &[u8])| d.iter_mut().zip(s).for_each(|(d, s)| *d = *s != 0);
    if dst.len() < PAR_MIN {
        f((dst, src));
    } else {
        dst.par_chunks_mut(PAR_PIECE)
            .zip(src.par_chunks(PAR_PIECE))
            .for_each(f);
    }
}

pub(crate) fn copy_words(dst: &mut [u64], src: &[u8]) {
    copy_bytes(bytemuck::cast_slice_mut::<u64, u8>(dst), src);
}

/// Copies `src` into `dst` (of the same length), on all cores when it is large.
fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    if dst.len() < PAR_MIN {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(PAR_PIECE)
            .zip(src.par_chunks(PAR_PIECE))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// Copies `src` into the mapped `buffer` at byte `offset`, on all cores when it is large
/// (one mapped view per piece: views of disjoint ranges may be written concurrently).
pub(crate) fn write_mapped(buffer: &wgpu::Buffer, offset: usize, src: &[u8]) -> Result<()> {
    let view = |at: usize, len: usize| {
        buffer
            .get_mapped_range_mut(at as u64..(at + len) as u64)
            .map_err(|e| device_error(format!("upload: {e}")))
    };
    if src.len() < PAR_MIN {
        view(offset, src.len())?.copy_from_slice(src);
        return Ok(());
    }
    let views = src
        .chunks(PAR_PIECE)
        .enumerate()
        .map(|(i, s)| view(offset + i * PAR_PIECE, s.len()))
        .collect::<Result<Vec<_>>>()?;
    views
        .into_par_iter()
        .zip(src.par_chunks(PAR_PIECE))
        .for_each(|(mut d, s)| d.copy_from_slice(s));
    Ok(())
}

/// Bytes of the staging buffer of a [`read_back`] at most: larger copies go through it in
/// chunks, one submission and one mapping each.
pub(crate) const READBACK_CHUNK: u64 = kv_staging::image::EXPORT_CHUNK_BYTES as u64;

/// A range of a device buffer (which has `COPY_SRC`): the buffer, its first byte and its
/// length in bytes, both multiples of 4.
pub(crate) type Range<'a> = (&'a wgpu::Buffer, u64, u64);

/// Copies `ranges` of device buffers to the host, through one `MAP_READ` staging buffer of
/// at most [`READBACK_CHUNK`] bytes (and the device's largest buffer): as many ranges, or
/// pieces of a range, as fit go in one submission, which is waited for and its mapping
/// copied out before the next. Each range comes back as u64 words (aligned for any plain
/// type), its last word zero-padded; [`bytes`] gives the range's bytes back.
///
/// The copies see the buffers as every submission before this one left them: a caller
/// that holds its table's lock gets one point in time.
pub(crate) fn read_back(gpu: &Gpu, ranges: &[Range<'_>]) -> Result<Vec<Vec<u64>>> {
    read_back_in(gpu, ranges, READBACK_CHUNK)
}

/// [`read_back`] through a staging buffer of at most `chunk` bytes.
fn read_back_in(gpu: &Gpu, ranges: &[Range<'_>], chunk: u64) -> Result<Vec<Vec<u64>>> {
    use wgpu::BufferUsages as U;
    if let Some(r) = ranges.iter().find(|r| r.1 % 4 != 0 || r.2 % 4 != 0) {
        return Err(device_error(format!(
            "readback of {} bytes at byte {}: not whole words",
            r.2, r.1
        )));
    }
    let mut out: Vec<Vec<u64>> = ranges
        .iter()
        .map(|r| vec![0u64; (r.2 as usize).div_ceil(8)])
        .collect();
    let total: u64 = ranges.iter().map(|r| r.2).sum();
    if total == 0 {
        return Ok(out);
    }
    let chunk = chunk
        .min(gpu.max_buffer / 8 * 8)
        .min(total.next_multiple_of(8))
        .max(8);
    let staging = gpu.buffer(
        "vramkv readback staging",
        chunk,
        U::MAP_READ | U::COPY_DST,
        false,
    )?;
    let state = Arc::new(AtomicU8::new(MAP_PENDING));
    // Pieces in the staging buffer: (range, byte in the range, bytes, byte in staging).
    let mut pieces: Vec<(usize, u64, u64, u64)> = Vec::new();
    let mut used = 0u64;
    let mut flush = |pieces: &mut Vec<(usize, u64, u64, u64)>, used: &mut u64| -> Result<()> {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for &(r, at, len, to) in pieces.iter() {
            enc.copy_buffer_to_buffer(ranges[r].0, ranges[r].1 + at, &staging, to, len);
        }
        let idx = gpu.queue.submit([enc.finish()]);
        map_range(&staging, wgpu::MapMode::Read, &state, Some(*used));
        gpu.wait(idx)?;
        expect_mapped(gpu, &state, "readback staging")?;
        {
            let view = staging
                .get_mapped_range(..*used)
                .map_err(|e| device_error(format!("readback staging: {e}")))?;
            for &(r, at, len, to) in pieces.iter() {
                let (at, len, to) = (at as usize, len as usize, to as usize);
                let dst = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut out[r])[at..at + len];
                copy_bytes(dst, &view[to..to + len]);
            }
        }
        staging.unmap();
        pieces.clear();
        *used = 0;
        Ok(())
    };
    for (r, range) in ranges.iter().enumerate() {
        let mut at = 0;
        while at < range.2 {
            if used == chunk {
                flush(&mut pieces, &mut used)?;
            }
            let len = (range.2 - at).min(chunk - used);
            pieces.push((r, at, len, used));
            used += len;
            at += len;
        }
    }
    if used > 0 {
        flush(&mut pieces, &mut used)?;
    }
    Ok(out)
}

/// The first `len` bytes of words that [`read_back`] returned.
pub(crate) fn bytes(words: &[u64], len: u64) -> &[u8] {
    let b = bytemuck::cast_slice::<u64, u8>(words);
    &b[..(len as usize).min(b.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges cut into pieces across several staging chunks (of 8 and 24 bytes, and one
    /// that holds everything) come back whole, a range of 0 bytes too; a range that is not
    /// whole words is refused.
    #[test]
    fn read_back_cuts_ranges_into_chunks() {
        let gpu = match crate::gpu::gpu(&kv_core::TableConfig::default()) {
            Ok(g) => g,
            Err(e) if std::env::var_os(crate::REQUIRE_ENV).is_none() => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("no wgpu adapter: {e}"),
        };
        use wgpu::BufferUsages as U;
        let data: Vec<u32> = (0..64).map(|i| i * 7 + 1).collect();
        let src = gpu
            .buffer("test src", 256, U::COPY_SRC | U::COPY_DST, false)
            .expect("buffer");
        gpu.queue.write_buffer(&src, 0, bytemuck::cast_slice(&data));
        let ranges: [Range<'_>; 4] = [(&src, 4, 20), (&src, 0, 0), (&src, 64, 128), (&src, 252, 4)];
        for chunk in [8, 24, 1 << 20] {
            let got = read_back_in(&gpu, &ranges, chunk).expect("read back");
            for (r, words) in ranges.iter().zip(&got) {
                let want: &[u8] = &bytemuck::cast_slice(&data)[r.1 as usize..(r.1 + r.2) as usize];
                assert_eq!(bytes(words, r.2), want, "range {r:?} in chunks of {chunk}");
            }
        }
        assert!(read_back(&gpu, &[(&src, 2, 8)]).is_err());
    }
}
