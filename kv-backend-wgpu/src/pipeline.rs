//! The host pipeline that feeds a batch through the staging lanes.
//!
//! A batch is cut into chunks; each chunk goes through one of a few staging *lanes*
//! (round robin). A lane owns an upload buffer (host-visible, mapped for writing), the
//! chunk's device buffers, a uniform with the chunk's parameters and a readback buffer
//! (mapped for reading). One chunk is one submission: copy in, the kernels, copy out. After
//! submitting, the lane asks for its upload buffer to be mapped again and, when the chunk
//! has output, for its readback buffer; the host only waits (on that submission index) when
//! it reuses the lane or at the end of the batch, so filling chunk `c + 1` overlaps the
//! device work of chunk `c`. Submissions on the one queue run in order, so the chunks of a
//! put apply in batch order.

use kv_core::Result;
use kv_kernels::layout::counter;
use kv_staging::trace::{Phase, Recorder};

use crate::gpu::{Gpu, device_error};
use crate::gpu_trace::BatchTimes;
use crate::lane::{Batch, Lane, Passes, Pending, RB_HDR, UP_HDR};
use crate::mapping::{map, map_range};
use crate::op::Op;
use crate::plan::{Plan, flags_bytes, local_bytes, local_slots};
use crate::shader::{ORDER_ITEMS, PARAMS_BYTES, PROBE_HDR, Params};
use crate::state::State;

/// The kernels of an op, in order.
fn entries(op: &Op<'_>) -> &'static [&'static str] {
    match op {
        Op::Put { .. } => &["kv_put_dedup", "kv_put_place"],
        Op::Get { .. } => &["kv_get"],
        Op::Contains { .. } => &["kv_contains"],
        Op::Delete => &["kv_delete"],
        Op::CountMissing => &["kv_count_missing"],
    }
}

/// The region-order kernels (see [`Plan::region_order`]), one step ("order") in the GPU trace.
const ORDER_ENTRIES: [&str; 3] = ["kv_region_hist", "kv_region_scan", "kv_region_scatter"];

/// A kernel's step name in the GPU trace: `kv_put_dedup` is `dedup`, `kv_get` is `get`.
fn step_name(entry: &'static str) -> &'static str {
    entry.rsplit('_').next().unwrap_or(entry)
}

/// Runs a host batch through `lanes` (all of capacity `cap`); see the module docs. Returns
/// the control words after the batch for a put or delete.
///
/// A chunk that leaves items unfinished (shader module docs, "Bounded probes") is finished
/// in resume rounds when its lane is settled; after a put chunk so finished, the chunks
/// already submitted behind it did nothing (their kernels saw the stall), and the batch
/// goes on from the chunk after it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_host_batch(
    gpu: &Gpu,
    st: &State,
    plan: &Plan,
    rec: &Recorder,
    lanes: &mut [Lane],
    cap: usize,
    keys: &[u64],
    op: &mut Op<'_>,
    counters: &mut Option<[u64; counter::LEN]>,
) -> Result<()> {
    let n = keys.len();
    let w = st.width;
    let chunks = n.div_ceil(cap);
    let nl = lanes.len();
    let put = matches!(op, Op::Put { .. });
    let output = matches!(op, Op::Get { .. } | Op::Contains { .. });
    let passes = Passes {
        pipes: entries(op)
            .iter()
            .map(|e| Ok((*e, gpu.batch_pipeline(st.segs.len(), e)?)))
            .collect::<Result<Vec<_>>>()?,
        put,
    };
    let order = plan.region_order(st.books.slots());
    let order_pipes = match order {
        Some(_) => ORDER_ENTRIES
            .iter()
            .map(|e| gpu.batch_pipeline(st.segs.len(), e))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let (rshift, nreg) = order.unwrap_or((0, 0));
    let mut b = Batch {
        gpu,
        st,
        passes,
        rec,
        times: BatchTimes::default(),
        counters,
    };
    let mut next = 0;
    loop {
        // Settle the oldest chunk in flight when its lane is wanted for the next chunk, and
        // every chunk at the end. Lanes are used round robin, so the lane of chunk `next`
        // holds the oldest one.
        let oldest = lanes
            .iter()
            .enumerate()
            .filter_map(|(l, lane)| lane.pending.as_ref().map(|p| (p.chunk, l)))
            .min();
        if let Some((_, l)) =
            oldest.filter(|_| next >= chunks || lanes[next % nl].pending.is_some())
        {
            if let Some(c) = lanes[l].settle(&mut b, op, false)? {
                for lane in lanes.iter_mut() {
                    lane.settle(&mut b, op, true)?;
                }
                next = c + 1;
            }
            continue;
        }
        if next >= chunks {
            break;
        }
        let c = next;
        next += 1;
        let start = c * cap;
        let m = cap.min(n - start);
        let lane = &mut lanes[c % nl];
        let values = match op {
            Op::Put { values } => Some(&values[start * w..(start + m) * w]),
            _ => None,
        };
        let (x, y) = gpu.groups(m as u64);
        let params = Params {
            lmask: if put { (local_slots(m) - 1) as u32 } else { 0 },
            rshift,
            nreg,
            code: 1 + 2 * c as u32,
            ..st.params(m)
        };
        {
            let _t = b.rec.phase(Phase::CopyIn);
            lane.fill(gpu, &params, &keys[start..start + m], values)?;
        }
        let submit = b.rec.phase(Phase::Submit);
        let bg = lane.bind_group(gpu, st)?.clone();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        if let Some(t) = lane.timer.as_mut() {
            t.start(&mut enc);
        }
        enc.copy_buffer_to_buffer(&lane.upload, 0, &lane.params, 0, PARAMS_BYTES);
        enc.copy_buffer_to_buffer(&lane.upload, UP_HDR, &lane.keys_in, 0, m as u64 * 8);
        if values.is_some() {
            enc.copy_buffer_to_buffer(
                &lane.upload,
                UP_HDR + lane.cap as u64 * 8,
                &lane.vals_io,
                0,
                (m * w * 8) as u64,
            );
        }
        lane.mark(&mut enc, "upload copy");
        if c == 0 && op.counts() {
            enc.clear_buffer(&st.ctl, 0, None);
        }
        enc.clear_buffer(&lane.probe, 0, Some(u64::from(PROBE_HDR) * 4));
        if put {
            enc.clear_buffer(&lane.local, 0, Some(local_bytes(m)));
        }
        if output {
            enc.clear_buffer(&lane.flags8, 0, Some(flags_bytes(m)));
        }
        if order.is_some() {
            enc.clear_buffer(&lane.regions, 0, None);
        }
        lane.mark(&mut enc, "clear");
        if !order_pipes.is_empty() {
            // The chunk's items grouped by region: histogram, scan (one workgroup), scatter.
            let (ox, oy) = gpu.groups((m as u64).div_ceil(u64::from(ORDER_ITEMS)));
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_bind_group(0, &bg, &[]);
                for (p, (x, y)) in order_pipes.iter().zip([(ox, oy), (1, 1), (ox, oy)]) {
                    pass.set_pipeline(p);
                    pass.dispatch_workgroups(x, y, 1);
                }
            }
            lane.mark(&mut enc, "order");
        }
        if let Some(t) = lane.timer.as_mut() {
            // Timed: one pass per kernel, a timestamp after each.
            for (e, p) in &b.passes.pipes {
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_bind_group(0, &bg, &[]);
                    pass.set_pipeline(p);
                    pass.dispatch_workgroups(x, y, 1);
                }
                t.end(&mut enc, step_name(e));
            }
        } else {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, &bg, &[]);
            for (_, p) in &b.passes.pipes {
                pass.set_pipeline(p);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        lane.copy_header(&mut enc, st);
        if output {
            lane.copy_output(&mut enc, op, m);
        }
        lane.mark(&mut enc, "readback copy");
        if let Some(t) = lane.timer.as_mut() {
            t.finish(&mut enc);
        }
        let sub = gpu.queue.submit([enc.finish()]);
        if c == 0 && op.counts() {
            // The control words were cleared in this submission: from now on they count
            // this batch, so that a batch that fails part-way can still read what it applied.
            crate::lane::merge(b.counters, [0; counter::LEN]);
        }
        map(&lane.upload, wgpu::MapMode::Write, &lane.up_state);
        map_range(
            &lane.readback,
            wgpu::MapMode::Read,
            &lane.rb_state,
            (!output).then_some(RB_HDR),
        );
        if let Some(t) = lane.timer.as_mut() {
            t.submitted();
        }
        drop(submit);
        lane.pending = Some(Pending {
            sub,
            chunk: c,
            start,
            m,
            params,
            output,
        });
    }
    b.rec.report(|r| {
        let ms = |p| r.secs(p) * 1e3;
        format!(
            "vramkv wgpu trace: {} of {n} keys in {chunks} chunks of {cap}: wait for GPU {:.1} ms, copy in {:.1} ms, copy out {:.1} ms, encode+submit {:.1} ms",
            entries(op).first().copied().unwrap_or("batch"),
            ms(Phase::Wait),
            ms(Phase::CopyIn),
            ms(Phase::CopyOut),
            ms(Phase::Submit)
        )
    });
    if let (Some(t), Some(line)) = (
        b.rec.tracer(),
        b.times.line(chunks, gpu.queue.get_timestamp_period()),
    ) {
        t.line(line);
    }
    if op.counts() && b.counters.is_none() {
        return Err(device_error("the batch's counters were not read back"));
    }
    Ok(())
}
