//! Mapped buffers: asking for a mapping and waiting until it is there, and the parallel
//! copies between the caller's slices and mapped ranges.

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
    let dst = bytemuck::cast_slice_mut::<u64, u8>(dst);
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
