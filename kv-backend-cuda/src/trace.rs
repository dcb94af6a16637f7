//! `VRAMKV_CUDA_TRACE`: where a batch's time goes, printed on stderr, for measurements.
//!
//! With the variable set (to anything but `0`), every host batch prints the host's time
//! spent waiting for lanes, copying into and out of the pinned staging buffers and
//! enqueueing, and every device-resident batch prints the device time of each of its steps
//! (measured with CUDA events between them: the place, settle, dedup and rewrite passes of
//! each put chunk, the lookup). The first host batch also prints the host copies' mode
//! (`kv_staging::copy::copy_mode`, `VRAMKV_HOST_COPY`). Off, nothing is recorded on the
//! device and the host only reads the clock around its phases.

use std::sync::{Once, OnceLock};
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaStream, sys};
use kv_core::Result;
use kv_staging::copy;

use crate::gpu::{Drv, Gpu};

/// Environment variable that turns the trace on.
pub const TRACE_ENV: &str = "VRAMKV_CUDA_TRACE";

/// Whether the trace is on (read once per process).
pub(crate) fn on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(TRACE_ENV).is_some_and(|v| v != "0"))
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

/// Host-side seconds per phase of a host batch.
#[derive(Default)]
pub(crate) struct HostTrace {
    start: Option<Instant>,
    /// Waiting for a lane's previous chunk (and at the end, for the last ones).
    pub wait: f64,
    /// Copying user slices into pinned staging buffers.
    pub copy_in: f64,
    /// Copying results out of pinned staging buffers.
    pub copy_out: f64,
    /// Both at once: a get's or contains' keys in alongside the previous chunk's results out.
    pub copy_both: f64,
}

impl HostTrace {
    pub fn new() -> Self {
        HostTrace {
            start: Some(Instant::now()),
            ..Default::default()
        }
    }

    /// Runs `f`, adding its duration to the phase `slot` selects.
    pub fn time<T>(&mut self, slot: fn(&mut Self) -> &mut f64, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let r = f();
        *slot(self) += t0.elapsed().as_secs_f64();
        r
    }

    /// Prints the batch's line when the trace is on.
    pub fn report(&self, what: &str, n: usize, chunks: usize, cap: usize, lanes: usize) {
        if !on() {
            return;
        }
        static MODE: Once = Once::new();
        MODE.call_once(|| {
            eprintln!(
                "vramkv cuda trace: host copies: {} ({})",
                copy::copy_mode(),
                copy::HOST_COPY_ENV
            );
        });
        let total = self.start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let rest = total - self.wait - self.copy_in - self.copy_out - self.copy_both;
        eprintln!(
            "vramkv cuda trace: {what} of {n} keys in {chunks} chunks of {cap} on {lanes} lanes: \
             total {:.3} ms = wait {:.3} + copy in {:.3} + copy out {:.3} + copy in+out {:.3} \
             + enqueue {:.3}",
            ms(total),
            ms(self.wait),
            ms(self.copy_in),
            ms(self.copy_out),
            ms(self.copy_both),
            ms(rest)
        );
    }
}

/// Timing events recorded between the steps of a device-resident batch on one stream.
pub(crate) struct Marks {
    events: Vec<(&'static str, CudaEvent)>,
}

impl Marks {
    /// Marks the start of the batch on `stream` (`None` when the trace is off).
    pub fn start(gpu: &Gpu, stream: &CudaStream) -> Result<Option<Marks>> {
        if !on() {
            return Ok(None);
        }
        let mut m = Marks { events: Vec::new() };
        m.mark(gpu, "start", stream)?;
        Ok(Some(m))
    }

    /// Records the end of step `label` (begun at the previous mark) on `stream`.
    pub fn mark(&mut self, gpu: &Gpu, label: &'static str, stream: &CudaStream) -> Result<()> {
        let ev = gpu
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .drv("cuEventCreate")?;
        ev.record(stream).drv("cuEventRecord")?;
        self.events.push((label, ev));
        Ok(())
    }

    /// Prints the device time per step label, summed over the batch (after the stream synced).
    pub fn report(&self, what: &str, n: usize) {
        let mut sums: Vec<(&'static str, f64, usize)> = Vec::new();
        let mut total = 0.0;
        for pair in self.events.windows(2) {
            let (label, ref end) = pair[1];
            let Ok(t) = pair[0].1.elapsed_ms(end) else {
                eprintln!("vramkv cuda trace: {what}: event timing failed");
                return;
            };
            total += t as f64;
            match sums.iter_mut().find(|s| s.0 == label) {
                Some(s) => {
                    s.1 += t as f64;
                    s.2 += 1;
                }
                None => sums.push((label, t as f64, 1)),
            }
        }
        let steps: Vec<String> = sums
            .iter()
            .map(|(l, t, c)| format!("{l} {t:.3} ms ({c}x)"))
            .collect();
        eprintln!(
            "vramkv cuda trace: {what} of {n} keys on the device: {total:.3} ms = {}",
            steps.join(" + ")
        );
    }
}
