//! The host mirror of the byte-table device ([`HostDev`]): allocations are host memory,
//! and a launch runs the kernels' per-item functions (`kv_kernels::ops::bytes`) over it on
//! a few host threads, interleaved as a kernel's threads would be (a warp kernel's items
//! each played by one host thread as a whole warp, `kv_kernels::host::Host`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use kv_core::{Error, Result};
use kv_kernels::host::Host;
use kv_kernels::layout::BytesArgs;
use kv_kernels::ops::bytes as ops;

use crate::bytes::{Dev, K};

/// Host threads per launch.
const THREADS: u64 = 4;

/// A host allocation of "device memory": words, so that it is 8-byte aligned.
pub(crate) struct HostBuf {
    words: Box<[AtomicU64]>,
    bytes: usize,
    used: Arc<AtomicUsize>,
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Relaxed);
    }
}

/// Host memory as a byte table's device, with a memory limit (past it: out of memory).
pub(crate) struct HostDev {
    limit: usize,
    used: Arc<AtomicUsize>,
}

impl HostDev {
    pub(crate) fn new(limit: usize) -> Self {
        HostDev {
            limit,
            used: Arc::new(AtomicUsize::new(0)),
        }
    }
}

fn run(n: u64, f: impl Fn(u64) + Sync) {
    if n < 64 {
        (0..n).for_each(&f);
        return;
    }
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let f = &f;
            s.spawn(move || {
                let mut i = t;
                while i < n {
                    f(i);
                    i += THREADS;
                }
            });
        }
    });
}

impl Dev for HostDev {
    type Buf = HostBuf;

    fn backend(&self) -> &'static str {
        "cuda host mirror"
    }

    fn device_name(&self) -> String {
        "host memory (mirror of the CUDA kernels)".into()
    }

    fn alloc(&self, bytes: usize) -> Result<HostBuf> {
        let bytes = bytes.max(8).next_multiple_of(8);
        let oom = Error::OutOfDeviceMemory {
            backend: "cuda host mirror",
            requested_bytes: bytes as u64,
        };
        if self.used.load(Relaxed) + bytes > self.limit {
            return Err(oom);
        }
        let mut v: Vec<AtomicU64> = Vec::new();
        if v.try_reserve_exact(bytes / 8).is_err() {
            return Err(oom);
        }
        v.resize_with(bytes / 8, || AtomicU64::new(0));
        self.used.fetch_add(bytes, Relaxed);
        Ok(HostBuf {
            words: v.into_boxed_slice(),
            bytes,
            used: self.used.clone(),
        })
    }

    fn addr(b: &HostBuf) -> u64 {
        b.words.as_ptr() as u64
    }

    fn size(b: &HostBuf) -> usize {
        b.bytes
    }

    fn upload(&self, dst: &HostBuf, at: usize, src: &[u8]) -> Result<()> {
        assert!(at + src.len() <= dst.bytes, "upload past the buffer");
        // SAFETY: the range lies inside the buffer (checked), whose words are atomics
        // (interior mutability); no launch runs during a copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                (dst.words.as_ptr() as *mut u8).add(at),
                src.len(),
            )
        };
        Ok(())
    }

    fn download(&self, dst: &mut [u8], src: &HostBuf, at: usize) -> Result<()> {
        assert!(at + dst.len() <= src.bytes, "download past the buffer");
        // SAFETY: as above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (src.words.as_ptr() as *const u8).add(at),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    fn zero(&self, b: &HostBuf, bytes: usize) -> Result<()> {
        for w in &b.words[..bytes.div_ceil(8).min(b.words.len())] {
            w.store(0, Relaxed);
        }
        Ok(())
    }

    fn launch(&self, k: K, a: &BytesArgs, n: u64) -> Result<()> {
        let a = *a;
        // The device's kernels loop over `a.n` items, whatever the grid.
        assert_eq!(a.n, n, "a launch's item count is its arguments' n");
        // SAFETY: the driver passes valid buffers for the kernel's n items, as it does to
        // the device's kernels.
        run(n, |i| unsafe { item(k, &a, i) });
        Ok(())
    }
}

/// Item `i` of kernel `k`.
///
/// # Safety
/// `a` describes valid buffers for the kernel's items, and `i` is one of them.
unsafe fn item(k: K, a: &BytesArgs, i: u64) {
    // SAFETY: the caller's promise, passed on.
    unsafe {
        match k {
            K::Hash => ops::hash_item::<Host>(a, i),
            K::Dedup => {
                ops::dedup_item::<Host>(a, i);
            }
            K::Lookup => {
                ops::lookup_item::<Host>(a, i);
            }
            K::Write => ops::write_item::<Host>(a, i),
            K::Get => ops::get_item::<Host>(a, i),
            K::Delete => {
                ops::delete_item::<Host>(a, i);
            }
            K::SetExpiry => ops::set_expiry_item::<Host>(a, i),
            K::Purge => ops::purge_item::<Host>(a, i),
            K::Gather => ops::gather_item::<Host>(a, i),
            K::Move => ops::move_item::<Host>(a, i),
            K::Rehash => ops::rehash_item::<Host>(a, i),
        }
    }
}
