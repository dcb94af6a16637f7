//! Staging for vramkv's GPU backends: a thread-safe pool of reusable, capacity-sized
//! staging resources, the parallel host copies into and out of staging buffers
//! ([`copy`]), the translation of the device counters into the books' counts ([`counts`]),
//! what table exports and restores share ([`image`]), and the trace of a batch's host
//! pipeline ([`trace`]).
//!
//! Both GPU backends (CUDA and wgpu) cut a host batch into chunks that travel through a
//! few *staging lanes*: a lane owns the device buffers (and, on CUDA, the stream and pinned
//! host buffers; on wgpu, the mapped upload and readback buffers) that one chunk needs.
//! Allocating them for every batch would cost more than a small batch itself, so each
//! table keeps its lanes between batches in a [`LanePool`]: a batch takes the lanes it
//! needs and gives them back when it is done. [`LanePool`] is written once for both
//! backends; it knows nothing of the table, only a lane's capacity ([`Staged::cap`])
//! and whether it may be reused ([`Staged::reusable`]).
//!
//! The rules:
//! - [`take`](LanePool::take) hands out pooled lanes of at least the asked capacity and
//!   makes the missing ones; pooled lanes that are too small are dropped (the batch sizes
//!   lanes in powers of two, so a bigger lane would replace them anyway). When making a
//!   lane fails, every lane taken so far goes back to the pool.
//! - [`give_back`](LanePool::give_back) drops the lanes that are not reusable and keeps at
//!   most [`max`](LanePool::max) lanes, the biggest.
//! - A poisoned lock is recovered: the pool holds only idle lanes, which a panicking
//!   batch cannot have left half-changed.
//!
//! ```
//! use kv_staging::{LanePool, Staged};
//!
//! /// A staging buffer of `cap` items.
//! struct Buf(Vec<u64>);
//!
//! impl Staged for Buf {
//!     fn cap(&self) -> usize {
//!         self.0.len()
//!     }
//! }
//!
//! let pool = LanePool::new(4);
//! let mut made = 0;
//! let mut make = |cap: usize| {
//!     made += 1;
//!     Ok::<_, std::convert::Infallible>(Buf(vec![0; cap]))
//! };
//!
//! // The first batch makes its two lanes, the second reuses them.
//! let lanes = pool.take(2, 1024, || make(1024))?;
//! pool.give_back(lanes);
//! let lanes = pool.take(2, 512, || make(512))?;
//! assert!(lanes.iter().all(|l| l.cap() == 1024));
//! pool.give_back(lanes);
//! assert_eq!(made, 2);
//!
//! // Idle lanes can be inspected, e.g. to count the memory they hold.
//! let idle: usize = pool.with_idle(|lanes| lanes.iter().map(|l| l.cap() * 8).sum());
//! assert_eq!(idle, 2 * 1024 * 8);
//! # Ok::<(), std::convert::Infallible>(())
//! ```

use std::sync::{Mutex, MutexGuard};

pub mod copy;
pub mod counts;
pub mod image;
pub mod trace;

/// A staging resource a [`LanePool`] can keep: sized in items, perhaps not always reusable.
pub trait Staged {
    /// How many items the resource holds.
    fn cap(&self) -> usize;

    /// Whether the resource may be pooled again when given back (default: always). A
    /// resource that still has work in flight, or that a failed batch left in an unknown
    /// state, answers `false` and is dropped instead.
    fn reusable(&self) -> bool {
        true
    }
}

/// A thread-safe pool of idle staging lanes, keeping at most `max` of them between batches.
pub struct LanePool<L> {
    lanes: Mutex<Vec<L>>,
    max: usize,
}

impl<L> std::fmt::Debug for LanePool<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanePool")
            .field("idle", &self.lock().len())
            .field("max", &self.max)
            .finish()
    }
}

impl<L> LanePool<L> {
    /// An empty pool that keeps at most `max` idle lanes.
    pub const fn new(max: usize) -> Self {
        LanePool {
            lanes: Mutex::new(Vec::new()),
            max,
        }
    }

    /// The most idle lanes the pool keeps.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Calls `f` with the idle lanes (e.g. to sum the memory they hold), under the pool's
    /// lock: `f` should be short and must not use the pool.
    pub fn with_idle<R>(&self, f: impl FnOnce(&[L]) -> R) -> R {
        f(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<L>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<L: Staged> LanePool<L> {
    /// Takes `count` lanes of at least `cap` items: pooled ones first, then new ones from
    /// `make` (called without the pool's lock held).
    ///
    /// Pooled lanes smaller than `cap` are dropped. When `make` fails, the lanes taken or
    /// made so far go back to the pool (as by [`give_back`](Self::give_back)) and its error
    /// is returned.
    pub fn take<E>(
        &self,
        count: usize,
        cap: usize,
        mut make: impl FnMut() -> Result<L, E>,
    ) -> Result<Vec<L>, E> {
        let mut out = Vec::with_capacity(count);
        {
            let mut pool = self.lock();
            pool.retain(|l| l.cap() >= cap);
            let keep = pool.len().saturating_sub(count);
            out.extend(pool.drain(keep..).rev());
        }
        while out.len() < count {
            match make() {
                Ok(l) => out.push(l),
                Err(e) => {
                    self.give_back(out);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Puts lanes back after a batch: those that are not [`reusable`](Staged::reusable) are
    /// dropped, and of the idle lanes only the `max` biggest are kept.
    pub fn give_back(&self, lanes: Vec<L>) {
        let mut pool = self.lock();
        pool.extend(lanes.into_iter().filter(L::reusable));
        if pool.len() > self.max {
            pool.sort_by_key(|l| std::cmp::Reverse(l.cap()));
            pool.truncate(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A lane with an id (to tell lanes apart) and a reusable switch.
    #[derive(Debug)]
    struct TestLane {
        id: usize,
        cap: usize,
        reusable: bool,
    }

    impl Staged for TestLane {
        fn cap(&self) -> usize {
            self.cap
        }

        fn reusable(&self) -> bool {
            self.reusable
        }
    }

    /// Makes lanes with ids from 100 on, counting the calls.
    struct Maker {
        next: Cell<usize>,
    }

    impl Maker {
        fn new() -> Self {
            Maker {
                next: Cell::new(100),
            }
        }

        fn lane(&self, cap: usize) -> Result<TestLane, &'static str> {
            let id = self.next.get();
            self.next.set(id + 1);
            Ok(TestLane {
                id,
                cap,
                reusable: true,
            })
        }

        fn made(&self) -> usize {
            self.next.get() - 100
        }
    }

    fn lane(id: usize, cap: usize) -> TestLane {
        TestLane {
            id,
            cap,
            reusable: true,
        }
    }

    fn ids(lanes: &[TestLane]) -> Vec<usize> {
        let mut v: Vec<usize> = lanes.iter().map(|l| l.id).collect();
        v.sort_unstable();
        v
    }

    fn idle_ids(pool: &LanePool<TestLane>) -> Vec<usize> {
        pool.with_idle(ids)
    }

    #[test]
    fn take_makes_what_is_missing() {
        let pool = LanePool::new(8);
        let m = Maker::new();
        let lanes = pool.take(3, 64, || m.lane(64)).expect("take");
        assert_eq!(ids(&lanes), [100, 101, 102]);
        assert!(lanes.iter().all(|l| l.cap == 64));
        assert_eq!(idle_ids(&pool), Vec::<usize>::new());
    }

    #[test]
    fn take_reuses_pooled_lanes() {
        let pool = LanePool::new(8);
        pool.give_back(vec![lane(1, 64), lane(2, 128)]);
        let m = Maker::new();
        let lanes = pool.take(3, 64, || m.lane(64)).expect("take");
        assert_eq!(ids(&lanes), [1, 2, 100]);
        assert_eq!(m.made(), 1);
        pool.give_back(lanes);
        let lanes = pool.take(2, 32, || m.lane(32)).expect("take");
        assert_eq!(lanes.len(), 2);
        assert_eq!(m.made(), 1);
        assert_eq!(idle_ids(&pool).len(), 1);
    }

    #[test]
    fn too_small_lanes_are_dropped_on_take() {
        let pool = LanePool::new(8);
        pool.give_back(vec![lane(1, 16), lane(2, 256), lane(3, 32), lane(4, 512)]);
        let m = Maker::new();
        // One lane wanted: one big one is taken, the small ones are gone, the other big one stays.
        let lanes = pool.take(1, 64, || m.lane(64)).expect("take");
        assert_eq!(lanes.len(), 1);
        assert!(lanes[0].cap >= 64);
        assert_eq!(m.made(), 0);
        let left = idle_ids(&pool);
        assert_eq!(left.len(), 1);
        assert!(left[0] == 2 || left[0] == 4);
        assert!(!left.contains(&lanes[0].id));
    }

    #[test]
    fn take_zero_still_drops_too_small_lanes() {
        let pool = LanePool::new(8);
        pool.give_back(vec![lane(1, 16), lane(2, 256)]);
        let lanes = pool
            .take(0, 64, || -> Result<TestLane, ()> {
                panic!("nothing to make")
            })
            .expect("take");
        assert!(lanes.is_empty());
        assert_eq!(idle_ids(&pool), [2]);
    }

    #[test]
    fn give_back_keeps_the_biggest_max() {
        let pool = LanePool::new(3);
        assert_eq!(pool.max(), 3);
        pool.give_back(vec![lane(1, 16), lane(2, 256), lane(3, 32)]);
        assert_eq!(idle_ids(&pool), [1, 2, 3]);
        pool.give_back(vec![lane(4, 512), lane(5, 8)]);
        assert_eq!(idle_ids(&pool), [2, 3, 4]);
        let mut caps = pool.with_idle(|l| l.iter().map(|l| l.cap).collect::<Vec<_>>());
        caps.sort_unstable();
        assert_eq!(caps, [32, 256, 512]);
    }

    #[test]
    fn max_zero_keeps_nothing() {
        let pool = LanePool::new(0);
        pool.give_back(vec![lane(1, 16)]);
        assert_eq!(idle_ids(&pool), Vec::<usize>::new());
    }

    #[test]
    fn non_reusable_lanes_are_dropped() {
        let pool = LanePool::new(8);
        let busy = TestLane {
            id: 2,
            cap: 64,
            reusable: false,
        };
        pool.give_back(vec![lane(1, 64), busy, lane(3, 64)]);
        assert_eq!(idle_ids(&pool), [1, 3]);
    }

    #[test]
    fn make_error_returns_the_taken_lanes() {
        let pool = LanePool::new(8);
        pool.give_back(vec![lane(1, 64), lane(2, 64)]);
        let m = Maker::new();
        let mut calls = 0;
        let r = pool.take(5, 64, || {
            calls += 1;
            if calls == 2 {
                Err("out of memory")
            } else {
                m.lane(64)
            }
        });
        assert_eq!(r.map(|l| l.len()), Err("out of memory"));
        // The two pooled lanes and the one made before the failure are idle again.
        assert_eq!(idle_ids(&pool), [1, 2, 100]);
        // And they serve the next batch.
        let lanes = pool.take(3, 64, || m.lane(64)).expect("take");
        assert_eq!(ids(&lanes), [1, 2, 100]);
    }

    #[test]
    fn make_error_respects_max() {
        let pool = LanePool::new(1);
        pool.give_back(vec![lane(1, 64)]);
        let m = Maker::new();
        let mut calls = 0;
        let r = pool.take(3, 128, || {
            calls += 1;
            if calls == 2 { Err("no") } else { m.lane(256) }
        });
        assert!(r.is_err());
        // The too-small lane was dropped on take; the one made lane is kept.
        assert_eq!(idle_ids(&pool), [100]);
    }

    #[test]
    fn a_poisoned_pool_still_works() {
        let pool = std::sync::Arc::new(LanePool::new(8));
        pool.give_back(vec![lane(1, 64)]);
        let p = pool.clone();
        let _ = std::thread::spawn(move || {
            p.with_idle(|_| panic!("poison the lock"));
        })
        .join();
        assert!(pool.lanes.is_poisoned());
        let m = Maker::new();
        let lanes = pool.take(1, 64, || m.lane(64)).expect("take");
        assert_eq!(ids(&lanes), [1]);
        pool.give_back(lanes);
        assert_eq!(idle_ids(&pool), [1]);
    }

    #[test]
    fn shared_between_threads() {
        let pool = LanePool::new(4);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        let lanes = pool.take(2, 64, || Ok::<_, ()>(lane(0, 64))).expect("take");
                        assert_eq!(lanes.len(), 2);
                        pool.give_back(lanes);
                    }
                });
            }
        });
        assert!(pool.with_idle(|l| l.len()) <= 4);
    }
}
