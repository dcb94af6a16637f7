//! The table's device state: its key and value arrays in segments and buffers, the special
//! area and the control words, with the host's [`Books`] of them; and the table-wide work
//! on them (clear, rehash, count, the copy an export takes).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use kv_core::{Books, Result, TableConfig, TableImage};
use kv_kernels::layout::{counter, is_sentinel, special_row, special_words};
use kv_staging::counts;

use crate::gpu::{BACKEND, Gpu, device_error, oom};
use crate::mapping::{MAP_PENDING, copy_words, expect_mapped, map, read_back};
use crate::plan::{resume_rounds, round_limit};
use crate::shader::{PARAMS_BYTES, Params};

/// Slots counted per dispatch at most (keeps thread indices in u32).
pub(crate) const PIECE: usize = 1 << 30;
/// Bytes of the table's control words (`kv_kernels::layout::counter`), as the start of a
/// readback buffer takes them.
pub(crate) const RB_CTL: u64 = (counter::LEN * 8) as u64;
/// Old slots per rehash dispatch at most: each has a probe state word (16 MiB for these).
const REHASH_PIECE: usize = 1 << 22;

/// A uniform buffer for one [`Params`] block.
pub(crate) fn params_buffer(gpu: &Gpu) -> Result<wgpu::Buffer> {
    use wgpu::BufferUsages as U;
    gpu.buffer(
        "vramkv params",
        PARAMS_BYTES,
        U::UNIFORM | U::COPY_DST,
        false,
    )
}

/// A process-unique number for each version of a table's buffers (lanes cache their bind
/// group against it).
fn next_gen() -> u64 {
    static GEN: AtomicU64 = AtomicU64::new(1);
    GEN.fetch_add(1, Ordering::Relaxed)
}

/// A range of one of the table's buffers: one segment of the key or the value array.
pub(crate) struct Part {
    /// The buffer (shared with the other segments it holds).
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl Part {
    /// The segment as a storage binding.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.size),
        })
    }

    /// Zeroes the segment.
    fn clear(&self, enc: &mut wgpu::CommandEncoder) {
        enc.clear_buffer(&self.buffer, self.offset, Some(self.size));
    }
}

/// One segment of the table: `slots` keys and their value rows.
pub(crate) struct Seg {
    pub keys: Part,
    pub vals: Part,
    pub slots: usize,
}

/// How the segments of one array (keys or values) lie in buffers: `count` segments of
/// `seg_bytes` each, `per_buffer` of them one after another in each buffer (the last buffer
/// may hold fewer). Segment `s` is at byte `(s % per_buffer) * seg_bytes` of buffer
/// `s / per_buffer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Packing {
    pub seg_bytes: u64,
    pub count: usize,
    pub per_buffer: usize,
}

impl Packing {
    /// `count` segments of `seg_bytes` in as few buffers of at most `max_buffer` bytes as
    /// possible, a whole number of segments per buffer, each segment's offset a multiple of
    /// `align` (when `seg_bytes` is not one, every segment gets its own buffer; a segment
    /// larger than `max_buffer` too).
    pub fn new(seg_bytes: u64, count: usize, max_buffer: u64, align: u64) -> Packing {
        let aligned = align <= 1 || seg_bytes.is_multiple_of(align);
        let fit = if aligned && seg_bytes > 0 {
            (max_buffer / seg_bytes).clamp(1, count.max(1) as u64) as usize
        } else {
            1
        };
        Packing {
            seg_bytes,
            count,
            per_buffer: fit,
        }
    }

    /// How many buffers the array takes.
    pub fn buffers(&self) -> usize {
        self.count.div_ceil(self.per_buffer)
    }

    /// The bytes of buffer `b`.
    pub fn buffer_bytes(&self, b: usize) -> u64 {
        let first = b * self.per_buffer;
        self.per_buffer.min(self.count.saturating_sub(first)) as u64 * self.seg_bytes
    }

    /// The buffer of segment `s` and the segment's offset in it.
    pub fn place(&self, s: usize) -> (usize, u64) {
        (
            s / self.per_buffer,
            (s % self.per_buffer) as u64 * self.seg_bytes,
        )
    }

    /// The segments of the array in order, as ranges of `buffers` (one per
    /// [`buffers`](Self::buffers)).
    fn parts(&self, buffers: &[wgpu::Buffer]) -> Vec<Part> {
        (0..self.count)
            .map(|s| {
                let (b, offset) = self.place(s);
                Part {
                    buffer: buffers[b].clone(),
                    offset,
                    size: self.seg_bytes,
                }
            })
            .collect()
    }
}

/// The table's key and value arrays: their segments and the buffers that hold them.
pub(crate) struct Arrays {
    pub segs: Vec<Seg>,
    /// The key array's buffers, then the value array's (each buffer once).
    pub buffers: Vec<wgpu::Buffer>,
}

/// The table's device state (behind the backend's RwLock).
pub(crate) struct State {
    pub width: usize,
    /// Slots per segment is `1 << seg_shift` (a lone segment may hold fewer).
    pub seg_shift: u32,
    pub segs: Vec<Seg>,
    /// The buffers holding the segments: the key array's, then the value array's.
    pub buffers: Vec<wgpu::Buffer>,
    /// The most bytes per table buffer (besides the device's limit).
    max_buffer: u64,
    /// `present[2]` then the value rows of the user keys 0 and 1.
    pub special: wgpu::Buffer,
    /// Control words (`kv_kernels::layout::counter`).
    pub ctl: wgpu::Buffer,
    /// Parameters of table-wide kernels (rehash).
    params: wgpu::Buffer,
    /// Readback of the control words for table-wide work.
    readback: wgpu::Buffer,
    rb_state: Arc<AtomicU8>,
    /// Changes whenever the buffers do.
    pub version: u64,
    /// The host's books: slots, entries, tombstones, special keys.
    pub books: Books,
    /// The table's hash seed.
    pub seed: u64,
    /// The most slots one invocation probes per dispatch (shader module docs, "Bounded
    /// probes").
    pub budget: u32,
    /// Resume rounds run so far (batches and rehashes), a diagnostic.
    pub resumed: AtomicU64,
}

/// Segment shift for a table of `width`-word rows whose bindings hold `max_bytes`.
pub(crate) fn seg_shift_for(width: usize, max_bytes: u64) -> u32 {
    let slots = (max_bytes / (8 * width as u64)).max(1);
    (63 - slots.leading_zeros()).min(31)
}

/// The key and value arrays of a table of `slots` slots (a power of two) of `width`-word
/// rows in segments of `1 << seg_shift` slots, each array in as few zeroed buffers of at
/// most `max_buffer` bytes (and the device's limit) as possible. Fails with
/// `OutOfDeviceMemory` (dropping whatever it allocated) when a buffer cannot be allocated
/// or the device cannot bind that many segments.
fn alloc_arrays(
    gpu: &Gpu,
    slots: usize,
    width: usize,
    seg_shift: u32,
    max_buffer: u64,
) -> Result<Arrays> {
    let per = (1usize << seg_shift).min(slots);
    let n = slots.div_ceil(per);
    let total = (slots as u64).saturating_mul(8 * (width as u64 + 1));
    if n > gpu.max_segments() {
        // More storage bindings than one shader may have on this device.
        return Err(oom(total));
    }
    let max_buffer = max_buffer.min(gpu.max_buffer);
    let pack = |row: u64| Packing::new(per as u64 * row, n, max_buffer, gpu.storage_align);
    let (keys, vals) = (pack(8), pack(8 * width as u64));
    let mut buffers = Vec::with_capacity(keys.buffers() + vals.buffers());
    for (p, label) in [(keys, "vramkv keys"), (vals, "vramkv values")] {
        for b in 0..p.buffers() {
            buffers.push(gpu.table_buffer(label, p.buffer_bytes(b))?);
        }
    }
    let key_buffers = keys.buffers();
    let segs = keys
        .parts(&buffers[..key_buffers])
        .into_iter()
        .zip(vals.parts(&buffers[key_buffers..]))
        .map(|(keys, vals)| Seg {
            keys,
            vals,
            slots: per,
        })
        .collect();
    Ok(Arrays { segs, buffers })
}

impl State {
    pub fn new(
        gpu: &Gpu,
        cfg: &TableConfig,
        max_seg_bytes: u64,
        max_buffer: u64,
        seed: u64,
    ) -> Result<State> {
        use wgpu::BufferUsages as U;
        let books = Books::new(cfg);
        let (slots, width) = (books.slots(), cfg.width);
        let seg_shift = seg_shift_for(width, max_seg_bytes);
        // Fresh wgpu buffers read as zeros: every key slot starts EMPTY.
        let a = alloc_arrays(gpu, slots, width, seg_shift, max_buffer)?;
        Ok(State {
            width,
            seg_shift,
            segs: a.segs,
            buffers: a.buffers,
            max_buffer,
            special: gpu.buffer(
                "vramkv special",
                special_words(width as u32) * 8,
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            ctl: gpu.buffer(
                "vramkv control",
                RB_CTL,
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                false,
            )?,
            params: params_buffer(gpu)?,
            readback: gpu.buffer("vramkv readback", RB_CTL, U::MAP_READ | U::COPY_DST, false)?,
            rb_state: Arc::new(AtomicU8::new(MAP_PENDING)),
            version: next_gen(),
            books,
            seed,
            budget: gpu.probe_budget,
            resumed: AtomicU64::new(0),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(wgpu::Buffer::size).sum::<u64>()
            + self.special.size()
            + self.ctl.size()
            + self.params.size()
            + self.readback.size()
    }

    pub fn params(&self, n: usize) -> Params {
        Params {
            n: n as u32,
            width: self.width as u32,
            mask: (self.books.slots() - 1) as u32,
            seg_shift: self.seg_shift,
            seed_lo: self.seed as u32,
            seed_hi: (self.seed >> 32) as u32,
            budget: self.budget,
            ..Params::default()
        }
    }

    /// Submits `enc` (which ends by copying the control words into the readback buffer)
    /// and returns the control words.
    pub fn submit_for_counters(
        &self,
        gpu: &Gpu,
        mut enc: wgpu::CommandEncoder,
    ) -> Result<[u64; counter::LEN]> {
        enc.copy_buffer_to_buffer(&self.ctl, 0, &self.readback, 0, RB_CTL);
        let idx = gpu.queue.submit([enc.finish()]);
        map(&self.readback, wgpu::MapMode::Read, &self.rb_state);
        gpu.wait(idx)?;
        expect_mapped(gpu, &self.rb_state, "readback")?;
        let mut c = [0u64; counter::LEN];
        {
            let view = self
                .readback
                .get_mapped_range(..)
                .map_err(|e| device_error(format!("readback: {e}")))?;
            copy_words(&mut c, &view);
        }
        self.readback.unmap();
        Ok(c)
    }

    /// Empties the table: keys EMPTY, special keys absent. Waits for the device.
    pub fn clear(&mut self, gpu: &Gpu) -> Result<()> {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for s in &self.segs {
            s.keys.clear(&mut enc);
        }
        enc.clear_buffer(&self.special, 0, None);
        enc.clear_buffer(&self.ctl, 0, None);
        self.submit_for_counters(gpu, enc)?;
        self.books.cleared();
        Ok(())
    }

    /// Moves every entry into fresh segments of `slots` slots (growth, or a tombstone purge
    /// when `slots` is unchanged). The new buffers are allocated first and swapped in only
    /// once every key has moved: on any error the table is left as it was. The books are
    /// updated by `kv_core::prepare_put`.
    ///
    /// The old segments are moved in pieces of at most [`REHASH_PIECE`] slots, one
    /// submission each, with the probes bounded as a batch's are (`rehash_module`): a piece
    /// that leaves keys unfinished raises STALL, the pieces after it do nothing, and the
    /// piece is finished in resume rounds before the rest is sent again.
    pub fn rehash(&mut self, gpu: &Gpu, slots: usize) -> Result<()> {
        use wgpu::BufferUsages as U;
        let new = alloc_arrays(gpu, slots, self.width, self.seg_shift, self.max_buffer)?;
        let segs = &new.segs;
        let layout = gpu.rehash_layout(segs.len())?;
        let pipeline = gpu.rehash_pipeline(segs.len())?;
        let per_old = (1usize << self.seg_shift).min(self.books.slots());
        let piece = REHASH_PIECE.min(per_old);
        let rprobe = gpu.buffer("vramkv rehash probe", piece as u64 * 4, U::STORAGE, false)?;
        let groups: Vec<wgpu::BindGroup> = self
            .segs
            .iter()
            .map(|old| {
                let bindings = [
                    self.params.as_entire_binding(),
                    self.ctl.as_entire_binding(),
                    old.keys.binding(),
                    old.vals.binding(),
                    rprobe.as_entire_binding(),
                ]
                .into_iter()
                .chain(segs.iter().map(|s| s.keys.binding()))
                .chain(segs.iter().map(|s| s.vals.binding()));
                gpu.bind_buffers("vramkv rehash", &layout.bgl, bindings)
            })
            .collect::<Result<_>>()?;
        // (old segment, first slot, slots) of each piece, in order.
        let pieces: Vec<(usize, usize, usize)> = self
            .segs
            .iter()
            .enumerate()
            .flat_map(|(s, old)| {
                (0..old.slots)
                    .step_by(piece)
                    .map(move |b| (s, b, piece.min(old.slots - b)))
            })
            .collect();
        let params = Params {
            mask: (slots - 1) as u32,
            ..self.params(0)
        };
        let run = |k: usize, resume: bool| {
            let (s, base, n) = pieces[k];
            let p = Params {
                n: n as u32,
                base: base as u32,
                code: k as u32 + 1,
                resume: u32::from(resume),
                ..params
            };
            gpu.queue
                .write_buffer(&self.params, 0, bytemuck::bytes_of(&p));
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            if resume {
                enc.clear_buffer(&self.ctl, counter::STALL as u64 * 8, Some(8));
            }
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &groups[s], &[]);
                let (x, y) = gpu.groups(n as u64);
                pass.dispatch_workgroups(x, y, 1);
            }
            enc
        };
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&self.ctl, 0, None);
        gpu.queue.submit([enc.finish()]);
        let limit = round_limit(slots, params.budget);
        let mut from = 0;
        let c = loop {
            for k in from..pieces.len() {
                gpu.queue.submit([run(k, false).finish()]);
            }
            let empty = gpu.device.create_command_encoder(&Default::default());
            let c = self.submit_for_counters(gpu, empty)?;
            let Some(k) = (c[counter::STALL] as usize).checked_sub(1) else {
                break c;
            };
            let mut c = [0; counter::LEN];
            let what = || format!("rehash into {slots} slots (table left as it was)");
            resume_rounds(limit, &self.resumed, what, || {
                c = self.submit_for_counters(gpu, run(k, true))?;
                Ok(c[counter::STALL] == 0)
            })?;
            from = k + 1;
            if from == pieces.len() {
                break c;
            }
        };
        let want = self.books.table_len() as u64;
        if c[counter::ERRORS] != 0 || c[counter::MOVED] != want {
            return Err(device_error(format!(
                "rehash into {slots} slots moved {} of {want} keys ({} probe overflows); table left as it was",
                c[counter::MOVED],
                c[counter::ERRORS]
            )));
        }
        self.segs = new.segs;
        self.buffers = new.buffers;
        self.version = next_gen();
        Ok(())
    }

    /// Copies the key and value arrays and the special area to the host as they are now
    /// (the caller holds the table's lock, so that the copy is one point in time).
    pub fn copy_out(&self, gpu: &Gpu) -> Result<RawTable> {
        let w = self.width as u64;
        let mut ranges = Vec::with_capacity(2 * self.segs.len() + 1);
        for s in &self.segs {
            let n = s.slots as u64;
            ranges.push((&s.keys.buffer, s.keys.offset, n * 8));
            ranges.push((&s.vals.buffer, s.vals.offset, n * 8 * w));
        }
        ranges.push((&self.special, 0, special_words(self.width as u32) * 8));
        let mut words = read_back(gpu, &ranges)?;
        let special = words.pop().unwrap_or_default();
        let mut segs = Vec::with_capacity(self.segs.len());
        let mut it = words.into_iter();
        while let (Some(keys), Some(vals)) = (it.next(), it.next()) {
            segs.push((keys, vals));
        }
        Ok(RawTable {
            width: self.width,
            segs,
            special,
        })
    }

    /// Zeroes the control words: a queue write, which runs before the next submission
    /// (no submission of its own, which would cost a small batch a few percent).
    pub fn zero_counters(&self, gpu: &Gpu) {
        gpu.queue
            .write_buffer(&self.ctl, 0, &[0u8; RB_CTL as usize]);
    }

    /// The control words as they are now (after a batch that failed part-way, if the device
    /// can still report them).
    pub fn read_counters(&self, gpu: &Gpu) -> Result<[u64; counter::LEN]> {
        let enc = gpu.device.create_command_encoder(&Default::default());
        self.submit_for_counters(gpu, enc)
    }

    /// Hands the counts of a put (whole or, after a fault, in part: `c` as read back) to the
    /// books.
    pub fn count_put(&mut self, c: &[u64; counter::LEN]) -> Result<()> {
        counts::apply_put(&mut self.books, c, BACKEND)
    }

    /// Hands the counts of a delete to the books; returns the entries removed.
    pub fn count_delete(&mut self, c: &[u64; counter::LEN]) -> usize {
        counts::apply_delete(&mut self.books, c)
    }
}

/// A host copy of a table's arrays ([`State::copy_out`]), decoded into an image once the
/// table's lock is let go.
pub(crate) struct RawTable {
    width: usize,
    /// Each segment's keys and value rows.
    segs: Vec<(Vec<u64>, Vec<u64>)>,
    /// The special area: `present[2]`, then the rows of the user keys 0 and 1.
    special: Vec<u64>,
}

impl RawTable {
    /// The live entries: every key slot that holds a key (neither EMPTY nor TOMBSTONE) with
    /// its row, then the present special keys.
    pub fn decode(&self) -> TableImage {
        let w = self.width;
        let mut img = TableImage::new(w);
        for (keys, vals) in &self.segs {
            for (j, &k) in keys.iter().enumerate() {
                if !is_sentinel(k)
                    && let Some(row) = vals.get(j * w..(j + 1) * w)
                {
                    img.push(k, row, None);
                }
            }
        }
        for k in 0..2u64 {
            let at = special_row(k, w as u32) as usize;
            if self.special.get(k as usize).is_some_and(|&p| p != 0)
                && let Some(row) = self.special.get(at..at + w)
            {
                img.push(k, row, None);
            }
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::Packing;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Every segment's buffer and offset, and every buffer's size, checked against each
    /// other: the segments tile their buffers in order, each offset aligned.
    fn layout(p: &Packing, align: u64) -> (Vec<(usize, u64)>, Vec<u64>) {
        let places: Vec<(usize, u64)> = (0..p.count).map(|s| p.place(s)).collect();
        let sizes: Vec<u64> = (0..p.buffers()).map(|b| p.buffer_bytes(b)).collect();
        for (b, &size) in sizes.iter().enumerate() {
            let offsets: Vec<u64> = places
                .iter()
                .filter(|(pb, _)| *pb == b)
                .map(|(_, o)| *o)
                .collect();
            let want: Vec<u64> = (0..offsets.len() as u64).map(|i| i * p.seg_bytes).collect();
            assert_eq!(offsets, want, "buffer {b} of {p:?}");
            assert_eq!(size, offsets.len() as u64 * p.seg_bytes, "{p:?}");
        }
        assert!(places.iter().all(|&(b, _)| b < sizes.len()), "{p:?}");
        assert!(places.iter().all(|(_, o)| o % align == 0), "{p:?}");
        (places, sizes)
    }

    #[test]
    fn one_buffer_per_array_when_it_fits() {
        // NVIDIA: 4 GiB of keys in 1 GiB segments, buffers of up to 2^52 bytes.
        let p = Packing::new(GIB, 4, 1 << 52, 64);
        assert_eq!((p.per_buffer, p.buffers()), (4, 1));
        let (places, sizes) = layout(&p, 64);
        assert_eq!(places, [(0, 0), (0, GIB), (0, 2 * GIB), (0, 3 * GIB)]);
        assert_eq!(sizes, [4 * GIB]);
        // A lone segment smaller than a full one.
        let p = Packing::new(512, 1, 1 << 52, 256);
        assert_eq!(
            (p.buffers(), p.buffer_bytes(0), p.place(0)),
            (1, 512, (0, 0))
        );
    }

    #[test]
    fn several_buffers_of_whole_segments() {
        // lavapipe: 128 MiB segments, buffers below 2 GiB (i32::MAX) hold 15 of them.
        let p = Packing::new(128 * MIB, 32, i32::MAX as u64, 16);
        assert_eq!((p.per_buffer, p.buffers()), (15, 3));
        let (places, sizes) = layout(&p, 16);
        assert_eq!(sizes, [15 * 128 * MIB, 15 * 128 * MIB, 2 * 128 * MIB]);
        assert_eq!(places[14], (0, 14 * 128 * MIB));
        assert_eq!(places[15], (1, 0));
        assert_eq!(places[31], (2, 128 * MIB));
        // The test knob: 4 MiB segments in 16 MiB buffers.
        let p = Packing::new(4 * MIB, 10, 16 * MIB, 256);
        let (places, sizes) = layout(&p, 256);
        assert_eq!(sizes, [16 * MIB, 16 * MIB, 8 * MIB]);
        assert_eq!(places[5], (1, 4 * MIB));
        // A cap below one segment still gives each segment a buffer of its own.
        let p = Packing::new(GIB, 3, 16 * MIB, 256);
        assert_eq!((p.per_buffer, p.buffers()), (1, 3));
        assert_eq!(layout(&p, 256).1, [GIB; 3]);
    }

    #[test]
    fn unaligned_segments_get_a_buffer_each() {
        // 3 slots of 8 bytes: 24 B segments cannot start at multiples of 256.
        let p = Packing::new(24, 4, 1 << 20, 256);
        assert_eq!((p.per_buffer, p.buffers()), (1, 4));
        assert_eq!(layout(&p, 256).0, [(0, 0), (1, 0), (2, 0), (3, 0)]);
        // Width 3 at 64 slots: 1536 B segments are multiples of 256.
        let p = Packing::new(64 * 24, 4, 1 << 20, 256);
        assert_eq!((p.per_buffer, p.buffers()), (4, 1));
        layout(&p, 256);
    }
}
