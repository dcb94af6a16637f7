//! A staging lane: the buffers of one chunk in flight (mapped upload and readback buffers,
//! the chunk's device buffers, its kernel parameters), and what happens to a chunk after
//! its submission: waiting for it, finishing it in resume rounds when it left probes
//! unfinished, and handing its output and counts back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use kv_core::Result;
use kv_kernels::layout::counter;
use kv_staging::trace::{Phase, Recorder, Tracer};

use crate::gpu::{Gpu, device_error};
use crate::gpu_trace::{self, BatchTimes, LaneTimer};
use crate::mapping::{
    MAP_PENDING, MAPPED, copy_bools, copy_words, expect_mapped, map_range, write_mapped,
};
use crate::op::Op;
use crate::plan::{flags_bytes, local_bytes, local_slots, resume_rounds, round_limit};
use crate::shader::{PROBE_HDR, PROBE_WORDS, Params, REGIONS};
use crate::state::{PIECE, RB_CTL, State, params_buffer};

/// Bytes at the start of an upload buffer reserved for the chunk's parameters.
pub(crate) const UP_HDR: u64 = 256;
/// Bytes at the start of a readback buffer reserved for the control words, then the
/// lane's probe header (the count of unfinished items).
pub(crate) const RB_HDR: u64 = RB_CTL + PROBE_HDR as u64 * 4;

/// A submitted chunk whose lane has not been waited for.
pub(crate) struct Pending {
    pub sub: wgpu::SubmissionIndex,
    /// The chunk's index in the batch.
    pub chunk: usize,
    pub start: usize,
    pub m: usize,
    /// The chunk's kernel parameters.
    pub params: Params,
    /// The chunk has output (get, contains): the whole readback buffer was asked to map,
    /// else only its header.
    pub output: bool,
}

/// The kernels of the batch being run, and whether it is a put.
pub(crate) struct Passes {
    pub pipes: Vec<(&'static str, Arc<wgpu::ComputePipeline>)>,
    pub put: bool,
}

/// A host batch in progress, as its lanes see it when they settle a chunk: the device,
/// the table, the batch's kernels, its trace, and what its chunks have counted so far.
pub(crate) struct Batch<'a> {
    pub gpu: &'a Gpu,
    pub st: &'a State,
    pub passes: Passes,
    pub rec: &'a Recorder,
    /// The GPU timestamps of the chunks (traced tables on adapters that have them).
    pub times: BatchTimes,
    /// The control words after the chunks settled so far (a put or delete), or `None`
    /// before the first one; see [`merge`].
    pub counters: &'a mut Option<[u64; counter::LEN]>,
}

/// Folds a snapshot of the control words into `counters`: every count only grows during a
/// batch, so the word-wise maximum of the snapshots is the latest.
pub(crate) fn merge(counters: &mut Option<[u64; counter::LEN]>, snap: [u64; counter::LEN]) {
    let c = counters.get_or_insert([0; counter::LEN]);
    for (a, b) in c.iter_mut().zip(snap) {
        *a = (*a).max(b);
    }
}

/// One staging lane: buffers for one chunk in flight.
pub(crate) struct Lane {
    pub cap: usize,
    pub width: usize,
    pub upload: wgpu::Buffer,
    pub up_state: Arc<AtomicU8>,
    pub params: wgpu::Buffer,
    pub keys_in: wgpu::Buffer,
    pub vals_io: wgpu::Buffer,
    pub slot_of: wgpu::Buffer,
    pub flags8: wgpu::Buffer,
    /// The put chunk's local table and flags (`shader` module docs), cleared per chunk.
    pub local: wgpu::Buffer,
    /// Region order: the chunk's item indices grouped by table region (`u32[cap]`).
    pub perm: wgpu::Buffer,
    /// Region order: items per region, then each region's next position in `perm`
    /// (`u32[2 * REGIONS]`), cleared per chunk.
    pub regions: wgpu::Buffer,
    /// The count of unfinished items (word 0 of a `PROBE_HDR`-word header, cleared per
    /// dispatch), then `PROBE_WORDS` words of probe state per item (shader module docs, "Bounded
    /// probes").
    pub probe: wgpu::Buffer,
    pub readback: wgpu::Buffer,
    pub rb_state: Arc<AtomicU8>,
    pub bind: Option<(u64, wgpu::BindGroup)>,
    pub pending: Option<Pending>,
    /// Timestamp queries of the chunk in flight (tracing on an adapter that has them).
    pub timer: Option<LaneTimer>,
}

impl Lane {
    pub fn new(gpu: &Gpu, cap: usize, width: usize, tracer: Option<&Tracer>) -> Result<Lane> {
        use wgpu::BufferUsages as U;
        let (c, w) = (cap as u64, width as u64);
        Ok(Lane {
            cap,
            width,
            upload: gpu.buffer(
                "vramkv upload",
                UP_HDR + c * 8 + c * w * 8,
                U::MAP_WRITE | U::COPY_SRC,
                true,
            )?,
            up_state: Arc::new(AtomicU8::new(MAPPED)),
            params: params_buffer(gpu)?,
            keys_in: gpu.buffer("vramkv keys in", c * 8, U::STORAGE | U::COPY_DST, false)?,
            vals_io: gpu.buffer(
                "vramkv values",
                c * w * 8,
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            slot_of: gpu.buffer("vramkv slots", c * 4, U::STORAGE, false)?,
            flags8: gpu.buffer(
                "vramkv flags",
                flags_bytes(cap),
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            local: gpu.buffer(
                "vramkv local table",
                local_bytes(cap),
                U::STORAGE | U::COPY_DST,
                false,
            )?,
            perm: gpu.buffer("vramkv region order", c * 4, U::STORAGE, false)?,
            regions: gpu.buffer(
                "vramkv region counts",
                2 * u64::from(REGIONS) * 4,
                U::STORAGE | U::COPY_DST,
                false,
            )?,
            probe: gpu.buffer(
                "vramkv probe states",
                (u64::from(PROBE_HDR) + u64::from(PROBE_WORDS) * c) * 4,
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            readback: gpu.buffer(
                "vramkv readback",
                RB_HDR + flags_bytes(cap) + c * w * 8,
                U::MAP_READ | U::COPY_DST,
                false,
            )?,
            rb_state: Arc::new(AtomicU8::new(MAP_PENDING)),
            bind: None,
            pending: None,
            timer: LaneTimer::new(gpu, tracer),
        })
    }

    /// Device bytes of the lane (staging included).
    pub fn bytes(&self) -> u64 {
        self.upload.size()
            + self.params.size()
            + self.keys_in.size()
            + self.vals_io.size()
            + self.slot_of.size()
            + self.flags8.size()
            + self.local.size()
            + self.perm.size()
            + self.regions.size()
            + self.probe.size()
            + self.readback.size()
    }

    /// The lane's bind group for the table's current buffers.
    pub fn bind_group(&mut self, gpu: &Gpu, st: &State) -> Result<&wgpu::BindGroup> {
        if self.bind.as_ref().is_none_or(|(g, _)| *g != st.version) {
            let layout = gpu.batch_layout(st.segs.len())?;
            let whole = [
                &self.params,
                &st.ctl,
                &st.special,
                &self.keys_in,
                &self.vals_io,
                &self.slot_of,
                &self.flags8,
                &self.local,
                &self.perm,
                &self.regions,
                &self.probe,
            ]
            .map(|b| b.as_entire_binding());
            let bindings = whole
                .into_iter()
                .chain(st.segs.iter().map(|s| s.keys.binding()))
                .chain(st.segs.iter().map(|s| s.vals.binding()));
            let bg = gpu.bind_buffers("vramkv batch", &layout.bgl, bindings)?;
            self.bind = Some((st.version, bg));
        }
        match &self.bind {
            Some((_, bg)) => Ok(bg),
            None => Err(device_error("bind group missing")),
        }
    }

    /// Waits for the lane's submitted chunk, finishes it in resume rounds if it left items
    /// unfinished, hands its output to `op`, its control words to the batch's counters and
    /// its timestamps (if timed) to the batch's times, and leaves the upload buffer mapped
    /// for the next chunk. Returns the chunk's index when it was a put chunk that had to be
    /// finished so: the put chunks after it did nothing and must run again. With
    /// `discard`, only waits and drops what the chunk produced.
    pub fn settle(
        &mut self,
        b: &mut Batch<'_>,
        op: &mut Op<'_>,
        discard: bool,
    ) -> Result<Option<usize>> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        let (gpu, rec) = (b.gpu, b.rec);
        {
            let _t = rec.phase(Phase::Wait);
            gpu.wait(p.sub.clone())?;
            expect_mapped(gpu, &self.up_state, "upload")?;
        }
        let _t = rec.phase(Phase::CopyOut);
        if let Some(timer) = self.timer.as_mut() {
            match timer.read(gpu) {
                Ok(t) if !discard => b.times.add(p.chunk, t),
                Ok(_) => {}
                Err(e) => {
                    if let Some(t) = rec.tracer() {
                        gpu_trace::note_once(t, &e.to_string());
                    }
                    self.timer = None;
                }
            }
        }
        expect_mapped(gpu, &self.rb_state, "readback")?;
        if discard {
            self.unmap_readback();
            return Ok(None);
        }
        let (snap, unfinished) = self.read_header()?;
        if op.counts() {
            merge(b.counters, snap);
        }
        let mut rewind = None;
        if unfinished != 0 {
            self.unmap_readback();
            let first = if b.passes.put {
                (snap[counter::STALL] as u32).saturating_sub(p.params.code) as usize
            } else {
                0
            };
            self.finish(b, op.counts(), &p, first)?;
            if b.passes.put {
                rewind = Some(p.chunk);
            }
            if !p.output {
                return Ok(rewind);
            }
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            self.copy_output(&mut enc, op, p.m);
            self.submit_and_map(gpu, enc, None)?;
        }
        if p.output {
            let view = self
                .readback
                .get_mapped_range(..)
                .map_err(|e| device_error(format!("readback: {e}")))?;
            let bytes: &[u8] = &view;
            let w = self.width;
            let (start, m) = (p.start, p.m);
            let flags = &bytes[RB_HDR as usize..RB_HDR as usize + m];
            let vals_at = (RB_HDR + flags_bytes(self.cap)) as usize;
            match op {
                Op::Get { values, found } => {
                    copy_bools(&mut found[start..start + m], flags);
                    copy_words(
                        &mut values[start * w..(start + m) * w],
                        &bytes[vals_at..vals_at + m * w * 8],
                    );
                }
                Op::Contains { found } => copy_bools(&mut found[start..start + m], flags),
                Op::Put { .. } | Op::Delete | Op::CountMissing => {}
            }
        }
        self.unmap_readback();
        Ok(rewind)
    }

    /// Runs the chunk of `p` (still in this lane) to the end in resume rounds, from pass
    /// `first` of `passes` on: every round runs one pass for the items it left unfinished
    /// (a pass not run yet: for all items), then waits and reads how many are left.
    fn finish(&mut self, b: &mut Batch<'_>, counts: bool, p: &Pending, first: usize) -> Result<()> {
        let (gpu, st) = (b.gpu, b.st);
        let (x, y) = gpu.groups(p.m as u64);
        let mut params = p.params;
        let limit = round_limit(st.books.slots().max(local_slots(p.m)), params.budget);
        for (k, (name, pipe)) in b.passes.pipes.iter().enumerate().skip(first) {
            params.resume = u32::from(k == first);
            let budget = params.budget;
            let what = || format!("{name}, {budget} slots a round");
            resume_rounds(limit, &st.resumed, what, || {
                gpu.queue
                    .write_buffer(&self.params, 0, bytemuck::bytes_of(&params));
                let bg = self.bind_group(gpu, st)?.clone();
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                enc.clear_buffer(&self.probe, 0, Some(u64::from(PROBE_HDR) * 4));
                if b.passes.put {
                    enc.clear_buffer(&st.ctl, counter::STALL as u64 * 8, Some(8));
                }
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_bind_group(0, &bg, &[]);
                    pass.set_pipeline(pipe);
                    pass.dispatch_workgroups(x, y, 1);
                }
                self.copy_header(&mut enc, st);
                self.submit_and_map(gpu, enc, Some(RB_HDR))?;
                let (snap, left) = self.read_header()?;
                self.unmap_readback();
                if counts {
                    merge(b.counters, snap);
                }
                params.resume = 1;
                Ok(left == 0)
            })?;
        }
        Ok(())
    }

    /// Encodes the copies of the table's control words and the lane's probe header into
    /// the readback buffer's header.
    pub fn copy_header(&self, enc: &mut wgpu::CommandEncoder, st: &State) {
        enc.copy_buffer_to_buffer(&st.ctl, 0, &self.readback, 0, RB_CTL);
        enc.copy_buffer_to_buffer(&self.probe, 0, &self.readback, RB_CTL, RB_HDR - RB_CTL);
    }

    /// Encodes the copies of a get's or contains' output for `m` items into the readback
    /// buffer, after its header.
    pub fn copy_output(&self, enc: &mut wgpu::CommandEncoder, op: &Op<'_>, m: usize) {
        enc.copy_buffer_to_buffer(&self.flags8, 0, &self.readback, RB_HDR, flags_bytes(m));
        if let Op::Get { .. } = op {
            enc.copy_buffer_to_buffer(
                &self.vals_io,
                0,
                &self.readback,
                RB_HDR + flags_bytes(self.cap),
                (m * self.width * 8) as u64,
            );
        }
    }

    /// Submits `enc`, maps the readback buffer (up to byte `end`, or all of it) and waits
    /// until it is mapped.
    fn submit_and_map(&self, gpu: &Gpu, enc: wgpu::CommandEncoder, end: Option<u64>) -> Result<()> {
        let idx = gpu.queue.submit([enc.finish()]);
        map_range(&self.readback, wgpu::MapMode::Read, &self.rb_state, end);
        gpu.wait(idx)?;
        expect_mapped(gpu, &self.rb_state, "readback")
    }

    /// The control words and the count of unfinished items from the mapped readback header.
    fn read_header(&self) -> Result<([u64; counter::LEN], u32)> {
        let view = self
            .readback
            .get_mapped_range(..RB_HDR)
            .map_err(|e| device_error(format!("readback: {e}")))?;
        let mut c = [0u64; counter::LEN];
        copy_words(&mut c, &view[..RB_CTL as usize]);
        let left: u32 = bytemuck::pod_read_unaligned(&view[RB_CTL as usize..RB_CTL as usize + 4]);
        Ok((c, left))
    }

    fn unmap_readback(&self) {
        self.readback.unmap();
        self.rb_state.store(MAP_PENDING, Ordering::Release);
    }

    /// Writes a chunk's parameters, keys and (for a put) values into the upload buffer.
    pub fn fill(
        &mut self,
        gpu: &Gpu,
        params: &Params,
        keys: &[u64],
        values: Option<&[u64]>,
    ) -> Result<()> {
        expect_mapped(gpu, &self.up_state, "upload")?;
        let p = bytemuck::bytes_of(params);
        self.upload
            .get_mapped_range_mut(..p.len() as u64)
            .map_err(|e| device_error(format!("upload: {e}")))?
            .copy_from_slice(p);
        let k0 = UP_HDR as usize;
        write_mapped(&self.upload, k0, bytemuck::cast_slice(keys))?;
        if let Some(v) = values {
            write_mapped(&self.upload, k0 + self.cap * 8, bytemuck::cast_slice(v))?;
        }
        self.upload.unmap();
        self.up_state.store(MAP_PENDING, Ordering::Release);
        Ok(())
    }

    /// Writes the timestamp that ends `step` of the chunk being encoded, if the lane is timed.
    pub fn mark(&mut self, enc: &mut wgpu::CommandEncoder, step: &'static str) {
        if let Some(t) = self.timer.as_mut() {
            t.end(enc, step);
        }
    }

    /// Live keys and tombstones in `st`'s key array as the device counts them, with this
    /// lane's bind group.
    pub fn count(&mut self, gpu: &Gpu, st: &State) -> Result<(u64, u64)> {
        let pipeline = gpu.batch_pipeline(st.segs.len(), "kv_count")?;
        let (mut live, mut tombs) = (0, 0);
        let mut base = 0;
        while base < st.books.slots() {
            let n = PIECE.min(st.books.slots() - base);
            let params = Params {
                base: base as u32,
                ..st.params(n)
            };
            gpu.queue
                .write_buffer(&self.params, 0, bytemuck::bytes_of(&params));
            let bg = self.bind_group(gpu, st)?.clone();
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            enc.clear_buffer(&st.ctl, 0, None);
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bg, &[]);
                let (x, y) = gpu.groups(n as u64);
                pass.dispatch_workgroups(x, y, 1);
            }
            let c = st.submit_for_counters(gpu, enc)?;
            live += c[counter::LIVE];
            tombs += c[counter::TOMBS];
            base += n;
        }
        Ok((live, tombs))
    }

    /// Waits for whatever the lane has in flight, discarding its output (error paths).
    pub fn drain(&mut self, gpu: &Gpu) {
        if let Some(p) = self.pending.take() {
            let _ = gpu.wait(p.sub);
        }
    }
}

impl kv_staging::Staged for Lane {
    fn cap(&self) -> usize {
        self.cap
    }

    /// Ready for reuse: nothing in flight and its upload buffer mapped.
    fn reusable(&self) -> bool {
        self.pending.is_none() && self.up_state.load(Ordering::Acquire) == MAPPED
    }
}
