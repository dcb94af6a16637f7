//! The device side of a CUDA table's trace ([`CudaOptions::trace`](crate::CudaOptions)):
//! the device time of each step of a device-resident batch, measured with CUDA events
//! recorded between the steps (the place, settle, dedup and rewrite passes of each put
//! chunk, the lookup). The host side of a host batch (waits and copies, per phase) is
//! `kv_staging::trace::Recorder`'s. Without a tracer nothing is recorded on the device.

use cudarc::driver::{CudaEvent, CudaStream, sys};
use kv_core::Result;
use kv_staging::trace::Tracer;

use crate::gpu::{Drv, Gpu};

/// Timing events recorded between the steps of a device-resident batch on one stream.
pub(crate) struct Marks {
    tracer: Tracer,
    events: Vec<(&'static str, CudaEvent)>,
}

impl Marks {
    /// Marks the start of the batch on `stream` (`None` without a tracer).
    pub fn start(gpu: &Gpu, tracer: Option<&Tracer>, stream: &CudaStream) -> Result<Option<Marks>> {
        let Some(tracer) = tracer else {
            return Ok(None);
        };
        let mut m = Marks {
            tracer: tracer.clone(),
            events: Vec::new(),
        };
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

    /// Writes the device time per step label, summed over the batch (after the stream
    /// synced).
    pub fn report(&self, what: &str, n: usize) {
        let mut sums: Vec<(&'static str, f64, usize)> = Vec::new();
        let mut total = 0.0;
        for pair in self.events.windows(2) {
            let (label, ref end) = pair[1];
            let Ok(t) = pair[0].1.elapsed_ms(end) else {
                self.tracer.line(format_args!(
                    "vramkv cuda trace: {what}: event timing failed"
                ));
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
        self.tracer.line(format_args!(
            "vramkv cuda trace: {what} of {n} keys on the device: {total:.3} ms = {}",
            steps.join(" + ")
        ));
    }
}
