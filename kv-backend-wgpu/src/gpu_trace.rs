//! GPU timestamps of the steps of each chunk, for a table traced with
//! [`WgpuOptions::trace`](crate::WgpuOptions::trace).
//!
//! Devices are created with [`TIMESTAMPS`](crate::gpu::TIMESTAMPS) where the adapter
//! offers them, and every staging lane of a traced table gets a [`LaneTimer`]: a query set of [`MARKS`] timestamps, a
//! buffer they are resolved into and a small buffer they are copied to for reading. A
//! chunk's encoder writes a timestamp before its first command and one after each step:
//! the copy of the upload buffer into the chunk's device buffers, the clears (the put's
//! chunk-local table, the lookups' flags, the batch's control words), the three kernels
//! that sort the chunk's items by table region as one step, `order` (only where the table
//! probes in region order), each other kernel, and the copies into the readback buffer. The timestamps are resolved and copied out at the end of
//! the same submission, and read when the host waits on that submission anyway (to reuse
//! the lane or to finish the batch); the host's only extra work is mapping one 64-byte
//! buffer per chunk. Without tracing no timer exists and nothing of this is encoded.
//!
//! A timestamp is taken once the commands before it are done (Vulkan: bottom of pipe), so
//! a step's time runs from the end of the step before it to its own end. wgpu does not
//! promise that a driver keeps commands from moving across a timestamp; where the commands
//! depend on each other (the kernels read what the copies and clears wrote) wgpu's
//! barriers keep them in order anyway. With timestamps
//! each kernel has a compute pass of its own, so that a timestamp can be written between
//! two kernels on the encoder; without them (every run that does not trace) a chunk's
//! kernels share one pass, as they always did.
//!
//! A timer that cannot be created or read never fails a batch: it is dropped with a note
//! in the trace and the host-side trace goes on without it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use kv_core::Result;
use kv_staging::trace::Tracer;

use crate::gpu::{Gpu, device_error};
use crate::mapping::{MAP_PENDING, expect_mapped, map};

/// Timestamps per chunk at most: the start, then the ends of the upload copy, the clears,
/// the region order (when on), at most two kernels and the readback copy (one spare).
pub(crate) const MARKS: u32 = 8;

/// Bytes of the resolved timestamps of one chunk.
const BYTES: u64 = MARKS as u64 * wgpu::QUERY_SIZE as u64;

/// Writes `message` into the trace, once per tracer (a failing timer would otherwise
/// repeat it for every lane).
pub(crate) fn note_once(tracer: &Tracer, message: &str) {
    tracer.once(
        "gpu timestamps",
        format_args!("vramkv wgpu trace: {message}; GPU step times left out"),
    );
}

/// A lane's timestamp queries: what one chunk in flight needs.
pub(crate) struct LaneTimer {
    set: wgpu::QuerySet,
    /// Where the query set is resolved (query results can only go to a resolve buffer).
    resolve: wgpu::Buffer,
    /// A copy of `resolve` mapped for reading.
    read: wgpu::Buffer,
    state: Arc<AtomicU8>,
    /// The step each timestamp after the first one ends, for the chunk being encoded or in
    /// flight.
    steps: Vec<&'static str>,
    /// The timestamps were resolved and the read buffer asked to map.
    in_flight: bool,
}

impl LaneTimer {
    /// A timer for one lane of a table traced to `tracer`, or `None`: untraced, or (with a
    /// note) the device has no timestamp queries or creating the query set or buffers failed.
    pub fn new(gpu: &Gpu, tracer: Option<&Tracer>) -> Option<LaneTimer> {
        let tracer = tracer?;
        if !gpu.timestamps {
            note_once(
                tracer,
                &format!(
                    "adapter {} offers no timestamp queries on encoders (TIMESTAMP_QUERY and TIMESTAMP_QUERY_INSIDE_ENCODERS)",
                    gpu.name
                ),
            );
            return None;
        }
        match Self::create(gpu) {
            Ok(t) => Some(t),
            Err(e) => {
                note_once(
                    tracer,
                    &format!("timestamp queries could not be set up: {e}"),
                );
                None
            }
        }
    }

    fn create(gpu: &Gpu) -> Result<LaneTimer> {
        use wgpu::BufferUsages as U;
        let set = gpu.scoped("timestamp query set", 0, || {
            gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("vramkv timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: MARKS,
            })
        })?;
        let resolve = gpu.buffer(
            "vramkv timestamps resolve",
            BYTES,
            U::QUERY_RESOLVE | U::COPY_SRC,
            false,
        )?;
        let read = gpu.buffer(
            "vramkv timestamps read",
            BYTES,
            U::MAP_READ | U::COPY_DST,
            false,
        )?;
        Ok(LaneTimer {
            set,
            resolve,
            read,
            state: Arc::new(AtomicU8::new(MAP_PENDING)),
            steps: Vec::with_capacity(MARKS as usize),
            in_flight: false,
        })
    }

    /// Starts a chunk: writes its first timestamp.
    pub fn start(&mut self, enc: &mut wgpu::CommandEncoder) {
        self.steps.clear();
        enc.write_timestamp(&self.set, 0);
    }

    /// Writes the timestamp that ends `step` (ignored past [`MARKS`] timestamps).
    pub fn end(&mut self, enc: &mut wgpu::CommandEncoder, step: &'static str) {
        let index = self.steps.len() as u32 + 1;
        if index < MARKS {
            enc.write_timestamp(&self.set, index);
            self.steps.push(step);
        }
    }

    /// Ends the chunk's encoding: resolves its timestamps and copies them to the read buffer.
    pub fn finish(&mut self, enc: &mut wgpu::CommandEncoder) {
        let count = self.steps.len() as u32 + 1;
        enc.resolve_query_set(&self.set, 0..count, &self.resolve, 0);
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, BYTES);
    }

    /// After the chunk's submission: asks for the read buffer to be mapped.
    pub fn submitted(&mut self) {
        map(&self.read, wgpu::MapMode::Read, &self.state);
        self.in_flight = true;
    }

    /// Once the chunk's submission has completed: its timestamps. `Err` says why they could
    /// not be read; the caller then drops the timer.
    pub fn read(&mut self, gpu: &Gpu) -> Result<ChunkTimes> {
        if !std::mem::take(&mut self.in_flight) {
            return Err(device_error("no timestamps in flight"));
        }
        expect_mapped(gpu, &self.state, "timestamp")?;
        let ticks = {
            let view = self
                .read
                .get_mapped_range(..)
                .map_err(|e| device_error(format!("reading the timestamps: {e}")))?;
            let count = self.steps.len() + 1;
            view.chunks_exact(8)
                .take(count)
                .map(|b| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(b);
                    u64::from_le_bytes(w)
                })
                .collect::<Vec<u64>>()
        };
        self.read.unmap();
        self.state.store(MAP_PENDING, Ordering::Release);
        Ok(ChunkTimes {
            start: ticks.first().copied().unwrap_or(0),
            ends: self
                .steps
                .iter()
                .copied()
                .zip(ticks.into_iter().skip(1))
                .collect(),
        })
    }
}

/// The raw timestamps of one chunk: its start and the end of each step, in ticks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ChunkTimes {
    pub start: u64,
    pub ends: Vec<(&'static str, u64)>,
}

impl ChunkTimes {
    /// The last timestamp (the end of the chunk's device work).
    fn end(&self) -> u64 {
        self.ends.last().map_or(self.start, |e| e.1)
    }
}

/// The GPU timestamps of a host batch, summed per step when printed.
#[derive(Default)]
pub(crate) struct BatchTimes {
    /// (chunk index, its timestamps), in the order the chunks were read back.
    chunks: Vec<(usize, ChunkTimes)>,
}

impl BatchTimes {
    /// Adds chunk `chunk`'s timestamps.
    pub fn add(&mut self, chunk: usize, times: ChunkTimes) {
        self.chunks.push((chunk, times));
    }

    /// The trace line of the batch (`chunks` in all; `period`: nanoseconds per tick), or
    /// `None` when no chunk was timed:
    ///
    /// `vramkv wgpu gpu: upload copy X ms, clear Y ms, dedup Z ms, place W ms, readback copy
    /// V ms, chunk span S ms (min/median/max per chunk a/b/c ms), idle between chunks I ms
    /// (max g ms)`
    ///
    /// Steps are summed over the chunks, in the order the first chunk has them. The span of
    /// a chunk runs from its first timestamp to its last; idle time is the gap from the end
    /// of a chunk to the start of the next one (chunks in batch order; overlaps count as
    /// zero). `, k of n chunks timed` follows when some chunk has no timestamps.
    pub fn line(&mut self, chunks: usize, period: f32) -> Option<String> {
        if self.chunks.is_empty() {
            return None;
        }
        self.chunks.sort_by_key(|c| c.0);
        let ms = |ticks: u64| ticks as f64 * f64::from(period) * 1e-6;
        let mut steps: Vec<(&'static str, f64)> = Vec::new();
        let mut spans = Vec::with_capacity(self.chunks.len());
        for (_, t) in &self.chunks {
            let mut prev = t.start;
            for &(name, end) in &t.ends {
                let d = ms(end.saturating_sub(prev));
                prev = end;
                match steps.iter_mut().find(|s| s.0 == name) {
                    Some(s) => s.1 += d,
                    None => steps.push((name, d)),
                }
            }
            spans.push(ms(t.end().saturating_sub(t.start)));
        }
        let (mut idle, mut idle_max) = (0.0f64, 0.0f64);
        for pair in self.chunks.windows(2) {
            if let [(a, ta), (b, tb)] = pair
                && a + 1 == *b
            {
                let gap = ms(tb.start.saturating_sub(ta.end()));
                idle += gap;
                idle_max = idle_max.max(gap);
            }
        }
        let span: f64 = spans.iter().sum();
        spans.sort_by(f64::total_cmp);
        let median = spans[spans.len() / 2];
        let mut s = String::from("vramkv wgpu gpu: ");
        for (name, t) in &steps {
            s.push_str(&format!("{name} {t:.2} ms, "));
        }
        s.push_str(&format!(
            "chunk span {span:.2} ms (min/median/max per chunk {:.3}/{median:.3}/{:.3} ms), idle between chunks {idle:.2} ms (max {idle_max:.3} ms)",
            spans[0],
            spans[spans.len() - 1],
        ));
        if self.chunks.len() < chunks {
            s.push_str(&format!(", {} of {chunks} chunks timed", self.chunks.len()));
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(start: u64, steps: &[(&'static str, u64)]) -> ChunkTimes {
        ChunkTimes {
            start,
            ends: steps.to_vec(),
        }
    }

    #[test]
    fn steps_are_summed_and_chunks_ordered() {
        let mut b = BatchTimes::default();
        // Read back out of order (the last lanes settle after the loop), 1 tick = 1 µs.
        b.add(
            1,
            chunk(
                12_000,
                &[
                    ("upload copy", 13_000),
                    ("clear", 13_500),
                    ("dedup", 15_000),
                    ("place", 17_000),
                    ("readback copy", 17_000),
                ],
            ),
        );
        b.add(
            0,
            chunk(
                0,
                &[
                    ("upload copy", 2_000),
                    ("clear", 2_500),
                    ("dedup", 4_500),
                    ("place", 10_000),
                    ("readback copy", 10_000),
                ],
            ),
        );
        let line = b.line(2, 1000.0);
        assert_eq!(
            line.as_deref(),
            Some(
                "vramkv wgpu gpu: upload copy 3.00 ms, clear 1.00 ms, dedup 3.50 ms, place 7.50 ms, \
                 readback copy 0.00 ms, chunk span 15.00 ms (min/median/max per chunk \
                 5.000/10.000/10.000 ms), idle between chunks 2.00 ms (max 2.000 ms)"
            )
        );
    }

    #[test]
    fn untimed_chunks_are_counted_and_overlaps_are_not_idle() {
        let mut b = BatchTimes::default();
        assert_eq!(b.line(3, 1.0), None);
        b.add(0, chunk(100, &[("get", 300)]));
        b.add(1, chunk(250, &[("get", 400)]));
        let line = b.line(3, 1.0).unwrap_or_default();
        assert!(line.contains("idle between chunks 0.00 ms"), "{line}");
        assert!(line.ends_with(", 2 of 3 chunks timed"), "{line}");
    }
}
