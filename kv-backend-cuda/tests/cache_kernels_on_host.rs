//! The cache contract (`kv_conformance::cache::all`) run on the cache kernels'
//! algorithms (`kv_kernels::ops::cache`) over host memory, on several threads, driven as
//! `CudaCache` drives the device: a check of the kernels against the conformance cases
//! that needs no GPU. (`cuda_conformance` runs the same cases on `CudaCache` itself when
//! there is one.)

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use kv_core::{
    CACHE_BUCKET_SLOTS, CacheConfig, CachePolicy, CachePut, CacheStats, Description, Error,
    Evicted, ImagePart, KvBackend, Result, TableConfig, TableImage, cache_buckets, check_contains,
    check_get, check_put, check_take,
};
use kv_kernels::host::Host;
use kv_kernels::layout::{
    CacheArgs, CacheTableArgs, EvScratch, cache_bucket, cache_counter, cache_policy, local_slots,
};
use kv_kernels::ops::cache;
use kv_staging::image::{CacheArrays, CacheRestore};

const B: usize = CACHE_BUCKET_SLOTS;
const THREADS: u64 = 4;

/// Runs `f(i)` for `i in 0..n` on [`THREADS`] threads, interleaved (a kernel launch).
fn launch(n: u64, f: impl Fn(u64) + Sync) {
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

struct State {
    keys: Vec<u64>,
    scores: Vec<u64>,
    expires: Vec<u64>,
    rows: Vec<u64>,
    used: Vec<u32>,
    digests: Vec<u32>,
    locks: Vec<u32>,
    counters: Vec<u64>,
    clock: u64,
    stats: CacheStats,
}

/// `CudaCache`'s host logic over host memory.
struct HostCache {
    width: usize,
    seed: u64,
    buckets: usize,
    cache: CacheConfig,
    st: Mutex<State>,
}

impl HostCache {
    fn open(cfg: TableConfig) -> Result<Self> {
        cfg.validate()?;
        let Some(cache) = cfg.cache.clone() else {
            return Err(Error::InvalidConfig("needs a cache config".into()));
        };
        let buckets = cache_buckets(cfg.capacity);
        let slots = buckets * B;
        // Like a device, this host mirror has a memory size: a table past 16 GiB is out of
        // memory (the conformance suite checks that a 512 GiB budget is refused).
        let bytes = slots as u64 * kv_core::cache_slot_bytes(cfg.width) as u64;
        if bytes > 16 << 30 {
            return Err(Error::OutOfDeviceMemory {
                backend: "host mirror",
                requested_bytes: bytes,
            });
        }
        Ok(Self {
            width: cfg.width,
            seed: cfg.table_seed(),
            buckets,
            st: Mutex::new(State {
                keys: vec![0; slots],
                scores: vec![0; slots],
                expires: vec![0; slots],
                rows: vec![0; slots * cfg.width],
                used: vec![0; buckets],
                // Four digests a word: the kernels read them four at a time.
                digests: vec![0; slots / 4],
                locks: vec![0; buckets],
                counters: vec![0; cache_counter::LEN],
                clock: 0,
                stats: CacheStats::default(),
            }),
            cache,
        })
    }

    fn table(&self, st: &mut State) -> CacheTableArgs {
        CacheTableArgs {
            keys: st.keys.as_mut_ptr() as u64,
            scores: st.scores.as_mut_ptr() as u64,
            expires: st.expires.as_mut_ptr() as u64,
            rows: st.rows.as_mut_ptr() as u64,
            used: st.used.as_mut_ptr() as u64,
            locks: st.locks.as_mut_ptr() as u64,
            counters: st.counters.as_mut_ptr() as u64,
            digests: st.digests.as_mut_ptr() as u64,
            buckets: self.buckets as u64,
            seed: self.seed,
            width: self.width as u32,
            policy: match self.cache.policy {
                CachePolicy::Lru => cache_policy::LRU,
                CachePolicy::Lfu => cache_policy::LFU,
                CachePolicy::Custom => cache_policy::CUSTOM,
            },
        }
    }

    fn apply_put(
        &self,
        keys: &[u64],
        values: &[u64],
        scores: Option<&[u64]>,
        ttl: Option<&[u64]>,
        evicted: Option<&mut Evicted<'_>>,
    ) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut guard = self.st.lock().expect("lock");
        let now = self.cache.clock.now_ms();
        self.run_put(&mut guard, keys, values, scores, ttl, evicted, now, false)
    }

    /// `CudaCache::run_put` at `now`; a `restore` stores the scores as given (the custom
    /// policy) and leaves the logical clock as it is.
    #[allow(clippy::too_many_arguments)]
    fn run_put(
        &self,
        st: &mut State,
        keys: &[u64],
        values: &[u64],
        scores: Option<&[u64]>,
        ttl: Option<&[u64]>,
        evicted: Option<&mut Evicted<'_>>,
        now: u64,
        restore: bool,
    ) -> Result<usize> {
        let (n, w) = (keys.len(), self.width);
        st.counters.fill(0);
        let mut table = self.table(st);
        if restore {
            table.policy = cache_policy::CUSTOM;
        } else {
            st.clock += 1;
        }
        let ls = local_slots(n as u64) as usize;
        let (mut local, mut pick, mut occurs) = (vec![0u32; ls], vec![0u32; ls], vec![0u32; ls]);
        let mut slot_of = vec![0u32; n];
        let (mut ek, mut er, mut es, mut ee) = (
            vec![0u64; n],
            vec![0u64; n * w],
            vec![0u64; n],
            vec![0u64; n],
        );
        let wanted = evicted.is_some();
        let mut scratch = vec![0u64; EvScratch::bytes(n as u64, w as u32).div_ceil(8) as usize];
        let a = CacheArgs {
            table,
            clock: st.clock,
            now,
            n: n as u64,
            keys_in: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            scores_in: scores.map_or(0, |s| s.as_ptr() as u64),
            ttl_in: ttl.map_or(0, |t| t.as_ptr() as u64),
            ev_keys: if wanted { ek.as_mut_ptr() as u64 } else { 0 },
            ev_rows: er.as_mut_ptr() as u64,
            ev_scores: es.as_mut_ptr() as u64,
            ev_expires: ee.as_mut_ptr() as u64,
            ev_scratch: if wanted {
                scratch.as_mut_ptr() as u64
            } else {
                0
            },
            local: local.as_mut_ptr() as u64,
            pick: pick.as_mut_ptr() as u64,
            occurs: occurs.as_mut_ptr() as u64,
            slot_of: slot_of.as_mut_ptr() as u64,
            local_mask: ls as u64 - 1,
            ..CacheArgs::default()
        };
        launch(n as u64, |i| {
            // SAFETY: every buffer is live and sized as the args say.
            assert!(unsafe { cache::dedup::<Host>(&a, i) })
        });
        let reported = AtomicU64::new(0);
        // As the kernel does: each thread (a group) puts its share of the items with
        // `put_items`, putting aside an item whose bucket another thread holds.
        launch(THREADS, |t| {
            let items = (t..n as u64).step_by(THREADS as usize);
            // SAFETY: as above; the dedup pass ran.
            unsafe {
                cache::put_items::<Host>(&a, items, |p| {
                    assert!(!p.lost && !p.busy);
                    reported.fetch_add(p.evicted as u64, Relaxed);
                })
            };
        });
        let m = reported.into_inner() as usize;
        if wanted {
            // The compaction pass, a warp per 32 items.
            launch((n as u64).div_ceil(32), |w| {
                // SAFETY: as above; the put pass ran.
                unsafe { cache::compact::<Host>(&a, 32 * w) }
            });
            assert_eq!(st.counters[cache_counter::COMPACTED], m as u64);
        }
        st.stats.evicted += m as u64;
        st.stats.expired_reused += st.counters[cache_counter::EXPIRED_REUSED];
        st.stats.clock = st.clock;
        if let Some(ev) = evicted {
            ev.keys[..m].copy_from_slice(&ek[..m]);
            ev.values[..m * w].copy_from_slice(&er[..m * w]);
            ev.scores[..m].copy_from_slice(&es[..m]);
            if let Some(x) = ev.expires_ms.as_deref_mut() {
                x[..m].copy_from_slice(&ee[..m]);
            }
        }
        Ok(m)
    }

    /// `CudaCache::restore_part` over host memory.
    fn restore_part(&self, part: ImagePart<'_>) -> Result<()> {
        part.check(self.width)?;
        let mut guard = self.st.lock().expect("lock");
        let now = self.cache.clock.now_ms();
        let r = CacheRestore::new(&part, self.width, self.cache.policy, now)?;
        if !r.keys.is_empty() {
            let ttl = r.ttl(now);
            let scores = r.scores.as_deref();
            let restore = scores.is_some();
            self.run_put(
                &mut guard,
                &r.keys,
                &r.values,
                scores,
                Some(&ttl),
                None,
                now,
                restore,
            )?;
        }
        guard.clock = guard.clock.max(r.clock);
        guard.stats.clock = guard.clock;
        Ok(())
    }

    fn lookup(
        &self,
        keys: &[u64],
        values_out: Option<&mut [u64]>,
        found_out: &mut [bool],
        access: bool,
    ) -> Result<()> {
        let n = keys.len();
        if n == 0 {
            return Ok(());
        }
        let mut guard = self.st.lock().expect("lock");
        let st = &mut *guard;
        st.counters.fill(0);
        if access {
            st.clock += 1;
        }
        let mut found = vec![0u8; n];
        let a = CacheArgs {
            table: self.table(st),
            clock: st.clock,
            now: self.cache.clock.now_ms(),
            n: n as u64,
            keys_in: keys.as_ptr() as u64,
            values: values_out.map_or(0, |v| v.as_mut_ptr() as u64),
            found_out: found.as_mut_ptr() as u64,
            access: access as u32,
            ..CacheArgs::default()
        };
        // As the kernel does: two items a group at a time, the last one alone.
        launch((n as u64).div_ceil(2), |p| {
            // SAFETY: every buffer is live and sized as the args say; 2p < n.
            unsafe { cache::lookup_pair::<Host>(&a, p) };
        });
        if access {
            st.stats.hits += st.counters[cache_counter::HITS];
            st.stats.misses += st.counters[cache_counter::MISSES];
            st.stats.clock = st.clock;
        }
        for (f, b) in found_out.iter_mut().zip(found) {
            *f = b != 0;
        }
        Ok(())
    }

    fn remove(
        &self,
        keys: &[u64],
        mut outputs: Option<(&mut [u64], &mut [bool], &mut [u64])>,
    ) -> Result<usize> {
        let n = keys.len();
        if n == 0 {
            return Ok(0);
        }
        let mut guard = self.st.lock().expect("lock");
        let st = &mut *guard;
        st.counters.fill(0);
        let ls = local_slots(n as u64) as usize;
        let (mut local, mut pick) = (vec![0u32; ls], vec![0u32; ls]);
        let mut slot_of = vec![0u32; n];
        let mut found = vec![0u8; n];
        let take = outputs.is_some();
        let (values, expires) = match &mut outputs {
            Some((v, _, x)) => (v.as_mut_ptr() as u64, x.as_mut_ptr() as u64),
            None => (0, 0),
        };
        let a = CacheArgs {
            table: self.table(st),
            clock: st.clock,
            now: self.cache.clock.now_ms(),
            n: n as u64,
            keys_in: keys.as_ptr() as u64,
            values,
            found_out: if take { found.as_mut_ptr() as u64 } else { 0 },
            expires_out: expires,
            local: local.as_mut_ptr() as u64,
            pick: if take { pick.as_mut_ptr() as u64 } else { 0 },
            slot_of: slot_of.as_mut_ptr() as u64,
            local_mask: ls as u64 - 1,
            first_wins: 1,
            ..CacheArgs::default()
        };
        if take {
            launch(n as u64, |i| {
                // SAFETY: every buffer is live and sized as the args say.
                assert!(unsafe { cache::dedup::<Host>(&a, i) })
            });
        }
        let removed = AtomicU64::new(0);
        launch(n as u64, |i| {
            // SAFETY: as above.
            let r = unsafe { cache::take::<Host>(&a, i) };
            removed.fetch_add(r as u64, Relaxed);
        });
        if let Some((_, found_out, _)) = outputs {
            for (f, b) in found_out.iter_mut().zip(found) {
                *f = b != 0;
            }
        }
        Ok(removed.into_inner() as usize)
    }
}

impl KvBackend for HostCache {
    fn width(&self) -> usize {
        self.width
    }
    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        check_put(self.width, keys, values)?;
        self.apply_put(keys, values, None, None, None).map(|_| ())
    }
    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.width, keys, values_out, found_out)?;
        self.lookup(keys, Some(values_out), found_out, true)
    }
    fn delete(&self, keys: &[u64]) -> Result<usize> {
        self.remove(keys, None)
    }
    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        check_contains(keys, found_out)?;
        self.lookup(keys, None, found_out, false)
    }
    fn len(&self) -> usize {
        let mut guard = self.st.lock().expect("lock");
        let st = &mut *guard;
        let a = CacheArgs {
            table: self.table(st),
            now: self.cache.clock.now_ms(),
            ..CacheArgs::default()
        };
        let live = AtomicU64::new(0);
        launch(self.buckets as u64, |b| {
            // SAFETY: b < buckets.
            live.fetch_add(
                u64::from(unsafe { cache::count_live::<Host>(&a, b) }),
                Relaxed,
            );
        });
        live.into_inner() as usize
    }
    fn capacity(&self) -> usize {
        self.buckets * B
    }
    fn clear(&self) -> Result<()> {
        self.st.lock().expect("lock").used.fill(0);
        Ok(())
    }
    fn describe(&self) -> Description {
        let slots = self.buckets * B;
        Description {
            backend: "host-sim",
            device: "host".into(),
            bytes_in_use: (slots * 8 * (3 + self.width) + self.buckets * 8) as u64,
            slots,
        }
    }
    fn put_and_evict(&self, batch: CachePut<'_>, evicted: &mut Evicted<'_>) -> Result<usize> {
        batch.check(self.width, self.cache.policy)?;
        evicted.check(batch.keys.len(), self.width)?;
        self.apply_put(
            batch.keys,
            batch.values,
            batch.scores,
            batch.ttl_ms,
            Some(evicted),
        )
    }
    fn put_cached(&self, batch: CachePut<'_>) -> Result<usize> {
        batch.check(self.width, self.cache.policy)?;
        self.apply_put(batch.keys, batch.values, batch.scores, batch.ttl_ms, None)
    }
    fn peek(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        check_get(self.width, keys, values_out, found_out)?;
        self.lookup(keys, Some(values_out), found_out, false)
    }
    fn take(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
        expires_out: &mut [u64],
    ) -> Result<usize> {
        check_take(self.width, keys, values_out, found_out, expires_out)?;
        self.remove(keys, Some((values_out, found_out, expires_out)))
    }
    fn eviction_scope(&self, key: u64) -> Result<u64> {
        Ok(cache_bucket(key, self.seed, self.buckets as u64))
    }
    fn cache_stats(&self) -> Result<CacheStats> {
        Ok(self.st.lock().expect("lock").stats)
    }
    fn export(&self) -> Result<TableImage> {
        let st = self.st.lock().expect("lock");
        let arrays = CacheArrays {
            keys: &st.keys,
            scores: &st.scores,
            expires: &st.expires,
            rows: &st.rows,
            used: &st.used,
        };
        Ok(arrays.image(
            self.width,
            self.cache.policy,
            st.clock,
            self.cache.clock.now_ms(),
        ))
    }
    fn restore(&self, part: ImagePart<'_>) -> Result<()> {
        self.restore_part(part)
    }
}

#[test]
fn the_cache_contract_holds_for_the_cache_kernels_on_the_host() {
    let open: Arc<kv_conformance::cases::Open> =
        Arc::new(|cfg: TableConfig| Ok(Box::new(HostCache::open(cfg)?) as Box<dyn KvBackend>));
    for case in kv_conformance::cache::all() {
        eprintln!("cache case {}", case.name);
        (case.run)(&*open);
    }
}
