//! The host pipeline: a batch from host memory, cut into chunks that stream through the
//! staging lanes.
//!
//! Each chunk goes through one of a few staging *lanes* (a stream, pinned host buffers,
//! device buffers, two events), round robin, so that while the GPU runs chunk `c`'s
//! kernels, chunk `c + 1` is being copied in and chunk `c - 1`'s results copied out, and
//! the host copies (user slice ↔ pinned, in parallel with rayon) overlap both; a get or
//! contains copies a chunk's keys in and the previous chunk's results out of the same lane
//! in one fork-join. The host only waits for a lane when it needs to reuse it, and once at
//! the end of the batch. [`crate::plan`] decides the chunks.
//!
//! A put's kernels must apply in batch order (a later chunk overwrites an earlier one):
//! each chunk's first kernel waits (`cuStreamWaitEvent`, on the device) for the previous
//! chunk's last kernel, while its copies do not wait. Get, contains and delete chunks are
//! independent and run concurrently.
//!
//! A batch in lent page-locked memory ([`crate::PinnedBatch`]) takes the same path without
//! the host copies: each chunk is copied between the batch's own buffers and the lane's
//! device buffers.

use cudarc::driver::CudaEvent;
use kv_core::Result;
use kv_kernels::layout::{BatchArgs, TableArgs};
use kv_staging::copy::{PAR_MIN, par_bools, par_copy};
use kv_staging::trace::{Phase, Recorder};

use crate::gpu::{Device, Drv, device_error};
use crate::lane::{HostNeeds, Lane, staged, staged_ref};
use crate::memory::{Pinned, dtoh_slice, htod_slice};
use crate::plan::chunk_plan;

/// What a host batch does, with its output slices.
pub(crate) enum Op<'a> {
    Put {
        values: &'a [u64],
    },
    Get {
        values: &'a mut [u64],
        found: &'a mut [bool],
    },
    /// A get whose keys and outputs are page-locked ([`crate::PinnedBatch`]): copied
    /// straight between them and the device.
    GetPinned {
        values: &'a mut [u64],
        found: &'a mut [u8],
    },
    Contains {
        found: &'a mut [bool],
    },
    Delete,
    /// Counts the keys not in the table (every occurrence) into `counter::MISSING`.
    CountMissing,
}

impl Op<'_> {
    /// The same operation without the caller's slices (all empty), for the enqueueing of a
    /// staged chunk, which never touches them.
    pub fn shape(&self) -> Op<'static> {
        match self {
            Op::Put { .. } => Op::Put { values: &[] },
            Op::Get { .. } => Op::Get {
                values: Default::default(),
                found: Default::default(),
            },
            Op::GetPinned { .. } => Op::GetPinned {
                values: Default::default(),
                found: Default::default(),
            },
            Op::Contains { .. } => Op::Contains {
                found: Default::default(),
            },
            Op::Delete => Op::Delete,
            Op::CountMissing => Op::CountMissing,
        }
    }

    /// The operation's name, for the trace.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Put { .. } => "put",
            Op::Get { .. } => "get",
            Op::GetPinned { .. } => "get (lent)",
            Op::Contains { .. } => "contains",
            Op::Delete => "delete",
            Op::CountMissing => "count missing",
        }
    }
}

/// A host batch: its keys, what to do with them, and whether the keys (and a put's
/// values) are page-locked memory that the device copies from directly.
pub(crate) struct HostBatch<'a> {
    pub keys: &'a [u64],
    pub op: Op<'a>,
    pub pinned: bool,
}

impl HostBatch<'_> {
    /// The lane buffers this batch stages through.
    pub fn needs(&self) -> HostNeeds {
        let staged_in = !self.pinned;
        HostNeeds {
            keys: staged_in,
            vals_in: staged_in && matches!(self.op, Op::Put { .. }),
            vals_out: matches!(self.op, Op::Get { .. }),
            found: matches!(self.op, Op::Get { .. } | Op::Contains { .. }),
        }
    }
}

/// Runs a host batch through `lanes` (all of capacity `cap`, with the host buffers of
/// `batch.needs()`): see the module docs. On return (Ok or Err after a successful drain) no
/// work of the batch is in flight.
///
/// A batch copied through two or more lanes runs as a two-stage pipeline on the host: while
/// the pool copies chunk `c` into its lane, one thread enqueues chunk `c - 1`'s kernels and
/// result transfers (about ten driver calls, some 40 µs a chunk, that would otherwise sit
/// between the copies). Chunk `c - 1`'s transfers in are enqueued before, right after its
/// copy, and its stream's wait for the previous put chunk's kernels just before the join.
pub(crate) fn run_host_batch(
    dev: &Device,
    table: TableArgs,
    lanes: &mut [Lane],
    cap: usize,
    batch: &mut HostBatch<'_>,
    after: Option<&CudaEvent>,
) -> Result<()> {
    let keys = batch.keys;
    let pinned = batch.pinned;
    let op = &mut batch.op;
    let n = keys.len();
    let plan = chunk_plan(n, cap, pinned);
    let chunks = plan.len();
    let nl = lanes.len();
    debug_assert!(nl >= 1 && lanes.iter().all(|l| l.cap >= cap));
    if let Some(ev) = after {
        for l in lanes.iter() {
            l.stream.wait(ev).drv("cuStreamWaitEvent")?;
        }
    }
    let is_put = matches!(op, Op::Put { .. });
    // Only chunks big enough for parallel copies: a fork-join from outside the pool costs
    // a wake-up (tens of µs), more than a small chunk's enqueueing.
    let pipelined = !pinned && nl >= 2 && cap >= join_min(op);
    // The lane of the last put chunk whose kernels are enqueued, and the chunk (lane, start,
    // len) copied in but whose kernels are not.
    let mut prev: Option<usize> = None;
    let mut queued: Option<(usize, usize, usize)> = None;
    let tr = Recorder::new(dev.trace.as_ref());
    for (c, &(start, m)) in plan.iter().enumerate() {
        let li = c % nl;
        // Reuse the lane: wait for its previous chunk (whose kernels are enqueued: it is at
        // least two chunks back when there are two lanes or more).
        {
            let _t = tr.phase(Phase::Wait);
            lanes[li].done.synchronize().drv("cuEventSynchronize")?;
        }
        if pinned {
            {
                let _t = tr.phase(Phase::CopyOut);
                drain_output(dev, &mut lanes[li], op)?;
            }
            let lane = &lanes[li];
            // SAFETY: a lent batch's keys and values are page-locked, borrowed for the whole
            // batch, which waits for every lane before it returns; the lane's device
            // buffers hold `cap >= m` items.
            unsafe { htod_slice(lane.d_keys.ptr(), &keys[start..start + m], &lane.stream)? };
            if let Op::Put { values } = op {
                let w = lane.width;
                // SAFETY: as above.
                unsafe {
                    htod_slice(
                        lane.d_vals.ptr(),
                        &values[start * w..(start + m) * w],
                        &lane.stream,
                    )?
                };
            }
        } else {
            match queued.take() {
                // Pipelined: the queued chunk's kernels alongside this chunk's copies.
                Some((q, qs, qm)) => {
                    order_after(lanes, q, is_put, prev)?;
                    prev = Some(q);
                    let mut shape = op.shape();
                    let [ql, cl] = lanes.get_disjoint_mut([q, li]).map_err(|_| {
                        device_error("internal: a pipelined chunk reuses the lane being enqueued")
                    })?;
                    let (launched, copied) = rayon::join(
                        || {
                            dev.bind()
                                .and_then(|()| launch_chunk(dev, table, ql, &mut shape, qs, qm))
                        },
                        || copy_chunk(dev, cl, op, keys, start, m, &tr),
                    );
                    launched?;
                    copied?;
                }
                None => copy_chunk(dev, &mut lanes[li], op, keys, start, m, &tr)?,
            }
            transfer_in(&mut lanes[li], op, m)?;
        }
        if pipelined {
            queued = Some((li, start, m));
        } else {
            order_after(lanes, li, is_put, prev)?;
            launch_chunk(dev, table, &mut lanes[li], op, start, m)?;
            prev = Some(li);
        }
    }
    if let Some((q, qs, qm)) = queued {
        order_after(lanes, q, is_put, prev)?;
        launch_chunk(dev, table, &mut lanes[q], op, qs, qm)?;
    }
    for lane in lanes.iter_mut() {
        {
            let _t = tr.phase(Phase::Wait);
            lane.done.synchronize().drv("cuEventSynchronize")?;
        }
        let _t = tr.phase(Phase::CopyOut);
        drain_output(dev, lane, op)?;
    }
    if let Some(t) = tr.tracer() {
        t.once(
            "host copies",
            format_args!("vramkv cuda trace: host copies: {}", dev.copy),
        );
    }
    tr.report(|r| {
        let ms = |p| r.secs(p) * 1e3;
        let total = r.elapsed() * 1e3;
        let (wait, cin, cout, both) = (
            ms(Phase::Wait),
            ms(Phase::CopyIn),
            ms(Phase::CopyOut),
            ms(Phase::CopyBoth),
        );
        format!(
            "vramkv cuda trace: {} of {n} keys in {chunks} chunks of {cap} on {nl} lanes: \
             total {total:.3} ms = wait {wait:.3} + copy in {cin:.3} + copy out {cout:.3} \
             + copy in+out {both:.3} + enqueue {:.3}",
            op.name(),
            total - wait - cin - cout - both
        )
    });
    Ok(())
}

/// A put chunk's kernels on lane `li` wait (on the device) for the previous put chunk's,
/// on lane `prev`: kernels apply in batch order, while the copies enqueued before do not
/// wait. Nothing for other operations.
fn order_after(lanes: &[Lane], li: usize, is_put: bool, prev: Option<usize>) -> Result<()> {
    match prev {
        Some(p) if is_put && p != li => lanes[li]
            .stream
            .wait(&lanes[p].kdone)
            .drv("cuStreamWaitEvent"),
        // The same lane's stream runs its chunks in order anyway.
        _ => Ok(()),
    }
}

/// The host copies of a chunk going through the lane's pinned staging buffers: the lane's
/// previous output out (get, contains) and this chunk's keys (and a put's values) in.
fn copy_chunk(
    dev: &Device,
    lane: &mut Lane,
    op: &mut Op<'_>,
    keys: &[u64],
    start: usize,
    m: usize,
    tr: &Recorder,
) -> Result<()> {
    let mode = dev.copy;
    let w = lane.width;
    let keys = &keys[start..start + m];
    let large = m >= join_min(op);
    // SAFETY (every staging buffer below): the lane's previous chunk is done (the caller
    // waited for its `done` event), so no copy from or into its pinned buffers is in flight.
    match op {
        Op::Get { .. } | Op::Contains { .. } => {
            // The previous chunk's output out and this chunk's keys in, in one fork-join:
            // one wake-up of the pool instead of two, and the two copies share the cores.
            let hk = staged(&mut lane.h_keys)?;
            let out = (&lane.h_vals_out, &lane.h_found);
            let pending = lane.pending.take();
            let _t = tr.phase(Phase::CopyBoth);
            let (drained, ()) = join_if(
                large,
                || drain_from(mode, pending, w, out.0, out.1, op),
                // SAFETY: see above.
                || par_copy(mode, unsafe { &mut hk.as_mut_slice()[..m] }, keys),
            );
            drained
        }
        Op::Put { values } => {
            // Keys and values in one fork-join: twice the work per wake-up of the pool,
            // which at a few MiB per chunk costs as much as the copy.
            let hk = staged(&mut lane.h_keys)?;
            let hv = staged(&mut lane.h_vals_in)?;
            let values = &values[start * w..(start + m) * w];
            let _t = tr.phase(Phase::CopyIn);
            join_if(
                large,
                // SAFETY: see above.
                || par_copy(mode, unsafe { &mut hk.as_mut_slice()[..m] }, keys),
                // SAFETY: see above.
                || par_copy(mode, unsafe { &mut hv.as_mut_slice()[..m * w] }, values),
            );
            Ok(())
        }
        Op::Delete | Op::CountMissing => {
            let hk = staged(&mut lane.h_keys)?;
            let _t = tr.phase(Phase::CopyIn);
            // SAFETY: see above.
            par_copy(mode, unsafe { &mut hk.as_mut_slice()[..m] }, keys);
            Ok(())
        }
        // Lent batches have no staging copies.
        Op::GetPinned { .. } => Ok(()),
    }
}

/// Items of a chunk from which its two host copies (a put's keys and values in; a get's
/// results out and keys in) run as a fork-join, and from which the batch overlaps
/// enqueueing with copies: below it, a wake-up of the pool from outside (tens of µs) costs
/// more than it saves. Measured on the H100 host (PERF.md): a put gains from 32K items
/// (0.5 MiB of keys and values per chunk), a get only from [`PAR_MIN`].
fn join_min(op: &Op<'_>) -> usize {
    match op {
        Op::Put { .. } => 1 << 15,
        _ => PAR_MIN,
    }
}

/// `rayon::join(a, b)` when `parallel`, else `a` then `b` on this thread (see [`join_min`]).
fn join_if<A, B, RA, RB>(parallel: bool, a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    if parallel {
        rayon::join(a, b)
    } else {
        (a(), b())
    }
}

/// Enqueues a chunk's transfers from the lane's staging buffers to its device buffers.
fn transfer_in(lane: &mut Lane, op: &Op<'_>, m: usize) -> Result<()> {
    // SAFETY: the device buffers hold `cap >= m` items; the staging buffers are not written
    // again before the lane's `done` event (recorded after these copies) has been waited for.
    unsafe { staged(&mut lane.h_keys)?.htod(lane.d_keys.ptr(), m, &lane.stream)? };
    if let Op::Put { .. } = op {
        let w = lane.width;
        // SAFETY: as above.
        unsafe { staged(&mut lane.h_vals_in)?.htod(lane.d_vals.ptr(), m * w, &lane.stream)? };
    }
    Ok(())
}

/// Enqueues a chunk's kernels and result transfers on its lane, whose device buffers hold
/// the chunk's inputs (or will, in stream order), and records the lane's events. Only a
/// lent get touches `op`'s slices (its results go straight to them); staged operations
/// may pass [`Op::shape`].
fn launch_chunk(
    dev: &Device,
    table: TableArgs,
    lane: &mut Lane,
    op: &mut Op<'_>,
    start: usize,
    m: usize,
) -> Result<()> {
    let w = lane.width;
    let a = lane.args(
        table,
        lane.d_keys.ptr(),
        lane.d_vals.ptr(),
        lane.d_found.ptr(),
        m,
    );
    // SAFETY (every copy out below): the lane's device buffers hold `cap >= m` items; the
    // staging buffers are read only after the lane's `done` event, recorded after these
    // copies, has been waited for (`drain_output`); a lent batch's outputs are page-locked
    // and borrowed until the batch has waited for every lane.
    match op {
        Op::Put { .. } => {
            lane.enqueue_put(dev, &a, None)?;
            lane.kdone.record(&lane.stream).drv("cuEventRecord")?;
        }
        Op::Get { .. } => {
            dev.launch(&dev.k.get, &a, m as u64, &lane.stream)?;
            // SAFETY: see above.
            unsafe {
                staged(&mut lane.h_vals_out)?.dtoh(lane.d_vals.ptr(), m * w, &lane.stream)?;
                staged(&mut lane.h_found)?.dtoh(lane.d_found.ptr(), m, &lane.stream)?;
            }
            lane.pending = Some((start, m));
        }
        Op::GetPinned { values, found } => {
            dev.launch(&dev.k.get, &a, m as u64, &lane.stream)?;
            let rows = start * w..(start + m) * w;
            // SAFETY: see above.
            unsafe {
                dtoh_slice(&mut values[rows], lane.d_vals.ptr(), &lane.stream)?;
                dtoh_slice(
                    &mut found[start..start + m],
                    lane.d_found.ptr(),
                    &lane.stream,
                )?;
            }
        }
        Op::Contains { .. } => {
            let a = BatchArgs { values: 0, ..a };
            dev.launch(&dev.k.contains, &a, m as u64, &lane.stream)?;
            // SAFETY: see above.
            unsafe { staged(&mut lane.h_found)?.dtoh(lane.d_found.ptr(), m, &lane.stream)? };
            lane.pending = Some((start, m));
        }
        Op::Delete => dev.launch(&dev.k.delete, &a, m as u64, &lane.stream)?,
        Op::CountMissing => {
            let a = BatchArgs { values: 0, ..a };
            dev.launch(&dev.k.count_missing, &a, m as u64, &lane.stream)?
        }
    }
    lane.done.record(&lane.stream).drv("cuEventRecord")
}

/// Copies a finished chunk's output from the lane's pinned buffers to the caller's slices.
/// The caller has waited for the lane's `done` event.
fn drain_output(dev: &Device, lane: &mut Lane, op: &mut Op<'_>) -> Result<()> {
    let pending = lane.pending.take();
    drain_from(
        dev.copy,
        pending,
        lane.width,
        &lane.h_vals_out,
        &lane.h_found,
        op,
    )
}

/// [`drain_output`] from a lane's parts: the chunk `pending` (start, len) whose output waits
/// in `h_vals` / `h_found`, copied out in `mode`. The copies into them are done.
fn drain_from(
    mode: kv_staging::copy::CopyMode,
    pending: Option<(usize, usize)>,
    w: usize,
    h_vals: &Option<Pinned<u64>>,
    h_found: &Option<Pinned<u8>>,
    op: &mut Op<'_>,
) -> Result<()> {
    let Some((start, m)) = pending else {
        return Ok(());
    };
    match op {
        Op::Get { values, found } => {
            // One fork-join for both outputs, as for a put's inputs.
            // SAFETY: the copies into the staging buffers are done (the callers waited for
            // the lane's `done` event, recorded after them).
            let (hv, hf) = unsafe {
                (
                    &staged_ref(h_vals)?.as_slice()[..m * w],
                    &staged_ref(h_found)?.as_slice()[..m],
                )
            };
            join_if(
                m >= PAR_MIN,
                || par_copy(mode, &mut values[start * w..(start + m) * w], hv),
                || par_bools(&mut found[start..start + m], hf),
            );
        }
        Op::Contains { found } => {
            // SAFETY: as above.
            let hf = unsafe { &staged_ref(h_found)?.as_slice()[..m] };
            par_bools(&mut found[start..start + m], hf)
        }
        Op::Put { .. } | Op::GetPinned { .. } | Op::Delete | Op::CountMissing => {}
    }
    Ok(())
}
