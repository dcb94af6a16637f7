//! `CudaCache`'s device-resident batches (`put_and_evict_device`, `put_cached_device`,
//! `get_device`, `peek_device`) on a GPU: the cache contract (`kv_conformance::cache::all`)
//! run through them, and a differential check that they give exactly what the batches from
//! host slices give. Without a CUDA device it prints `skipped: ...` and reports every trial
//! as ignored, unless `VRAMKV_REQUIRE_CUDA=1`.

use std::collections::HashSet;
use std::sync::Arc;

use kv_backend_cuda::cudarc::driver::{CudaSlice, CudaStream, DriverError};
use kv_backend_cuda::{CudaCache, DeviceCachePut, DeviceEvicted, REQUIRE_ENV};
use kv_conformance::Availability;
use kv_conformance::libtest_mimic::{Arguments, Failed};
use kv_conformance::stress::Rng;
use kv_core::{
    CacheConfig, CachePolicy, CachePut, CacheStats, Description, Error, Evicted, KvBackend,
    ManualClock, Result, TableConfig,
};

fn drv(e: DriverError) -> Error {
    Error::device("cuda", e.to_string())
}

/// `data` in device memory (a buffer of at least one word, so that an empty slice is an
/// empty view of it rather than a zero-byte allocation).
fn up<T: cudarc_like::Word>(s: &Arc<CudaStream>, data: &[T]) -> Result<CudaSlice<T>> {
    if data.is_empty() {
        s.alloc_zeros::<T>(1).map_err(drv)
    } else {
        s.clone_htod(data).map_err(drv)
    }
}

/// The word types the tests move.
mod cudarc_like {
    use kv_backend_cuda::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    /// A word the tests upload and download.
    pub trait Word: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin {}
    impl Word for u64 {}
    impl Word for u8 {}
}

/// A `CudaCache` whose puts, gets and peeks go through its device-resident API: each batch
/// is uploaded as it is (bad lengths included, so that the resident checks see them), run,
/// and its outputs downloaded. Everything else goes to the table itself.
struct Resident {
    t: CudaCache,
    s: Arc<CudaStream>,
}

impl Resident {
    fn open(cfg: TableConfig) -> Result<Self> {
        let t = CudaCache::open(cfg)?;
        let s = t.new_stream()?;
        Ok(Resident { t, s })
    }

    fn put(&self, batch: CachePut<'_>, evicted: Option<&mut Evicted<'_>>) -> Result<usize> {
        let s = &self.s;
        let (k, v) = (up(s, batch.keys)?, up(s, batch.values)?);
        let (kv, vv) = (k.slice(0..batch.keys.len()), v.slice(0..batch.values.len()));
        let sc = batch.scores.map(|x| up(s, x)).transpose()?;
        let tt = batch.ttl_ms.map(|x| up(s, x)).transpose()?;
        let scv = sc
            .as_ref()
            .zip(batch.scores)
            .map(|(d, x)| d.slice(0..x.len()));
        let ttv = tt
            .as_ref()
            .zip(batch.ttl_ms)
            .map(|(d, x)| d.slice(0..x.len()));
        let mut put = DeviceCachePut::new(&kv, &vv);
        if let Some(x) = &scv {
            put = put.scores(x);
        }
        if let Some(x) = &ttv {
            put = put.ttl_ms(x);
        }
        let Some(ev) = evicted else {
            return self.t.put_cached_device(&put);
        };
        let alloc = |n: usize| s.alloc_zeros::<u64>(n.max(1)).map_err(drv);
        let (mut ek, mut er, mut es) = (
            alloc(ev.keys.len())?,
            alloc(ev.values.len())?,
            alloc(ev.scores.len())?,
        );
        let mut ee = ev.expires_ms.as_ref().map(|e| alloc(e.len())).transpose()?;
        let m = {
            let mut ekv = ek.slice_mut(0..ev.keys.len());
            let mut erv = er.slice_mut(0..ev.values.len());
            let mut esv = es.slice_mut(0..ev.scores.len());
            let mut eev = ee
                .as_mut()
                .zip(ev.expires_ms.as_ref())
                .map(|(d, e)| d.slice_mut(0..e.len()));
            let mut out = DeviceEvicted::new(&mut ekv, &mut erv, &mut esv);
            if let Some(x) = eev.as_mut() {
                out = out.expires(x);
            }
            self.t.put_and_evict_device(&put, &mut out)?
        };
        let w = self.t.width();
        let down = |d: &CudaSlice<u64>, n: usize| -> Result<Vec<u64>> {
            let all: Vec<u64> = s.clone_dtoh(d).map_err(drv)?;
            Ok(all[..n].to_vec())
        };
        ev.keys[..m].copy_from_slice(&down(&ek, m)?);
        ev.values[..m * w].copy_from_slice(&down(&er, m * w)?);
        ev.scores[..m].copy_from_slice(&down(&es, m)?);
        if let (Some(x), Some(d)) = (ev.expires_ms.as_deref_mut(), ee.as_ref()) {
            x[..m].copy_from_slice(&down(d, m)?);
        }
        Ok(m)
    }

    fn lookup(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
        access: bool,
    ) -> Result<()> {
        let s = &self.s;
        let k = up(s, keys)?;
        let mut v = s.alloc_zeros::<u64>(values_out.len().max(1)).map_err(drv)?;
        let mut f = s.alloc_zeros::<u8>(found_out.len().max(1)).map_err(drv)?;
        {
            let kv = k.slice(0..keys.len());
            let mut vv = v.slice_mut(0..values_out.len());
            let mut fv = f.slice_mut(0..found_out.len());
            if access {
                self.t.get_device(&kv, &mut vv, &mut fv)?;
            } else {
                self.t.peek_device(&kv, &mut vv, &mut fv)?;
            }
        }
        let vh: Vec<u64> = s.clone_dtoh(&v).map_err(drv)?;
        let fh: Vec<u8> = s.clone_dtoh(&f).map_err(drv)?;
        values_out.copy_from_slice(&vh[..values_out.len()]);
        for (o, b) in found_out.iter_mut().zip(fh) {
            *o = b != 0;
        }
        Ok(())
    }
}

impl KvBackend for Resident {
    fn width(&self) -> usize {
        self.t.width()
    }
    fn put(&self, keys: &[u64], values: &[u64]) -> Result<()> {
        if self.t.policy() == CachePolicy::Custom {
            // A plain put gives every key score 0 (what the host path does without scores).
            let zeros = vec![0u64; keys.len()];
            return self
                .put(CachePut::new(keys, values).scores(&zeros), None)
                .map(|_| ());
        }
        self.put(CachePut::new(keys, values), None).map(|_| ())
    }
    fn get(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        self.lookup(keys, values_out, found_out, true)
    }
    fn delete(&self, keys: &[u64]) -> Result<usize> {
        self.t.delete(keys)
    }
    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> Result<()> {
        self.t.contains(keys, found_out)
    }
    fn len(&self) -> usize {
        self.t.len()
    }
    fn capacity(&self) -> usize {
        self.t.capacity()
    }
    fn clear(&self) -> Result<()> {
        self.t.clear()
    }
    fn describe(&self) -> Description {
        self.t.describe()
    }
    fn put_and_evict(&self, batch: CachePut<'_>, evicted: &mut Evicted<'_>) -> Result<usize> {
        self.put(batch, Some(evicted))
    }
    fn put_cached(&self, batch: CachePut<'_>) -> Result<usize> {
        self.put(batch, None)
    }
    fn peek(&self, keys: &[u64], values_out: &mut [u64], found_out: &mut [bool]) -> Result<()> {
        self.lookup(keys, values_out, found_out, false)
    }
    fn take(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
        expires_out: &mut [u64],
    ) -> Result<usize> {
        self.t.take(keys, values_out, found_out, expires_out)
    }
    fn eviction_scope(&self, key: u64) -> Result<u64> {
        self.t.eviction_scope(key)
    }
    fn cache_policy(&self) -> Result<CachePolicy> {
        self.t.cache_policy()
    }
    fn cache_stats(&self) -> Result<CacheStats> {
        self.t.cache_stats()
    }
    fn export(&self) -> Result<kv_core::TableImage> {
        self.t.export()
    }
    fn restore(&self, part: kv_core::ImagePart<'_>) -> Result<()> {
        self.t.restore(part)
    }
}

fn the_cache_contract_holds_through_the_resident_api() -> std::result::Result<(), Failed> {
    let open: Arc<kv_conformance::cases::Open> =
        Arc::new(|cfg: TableConfig| Ok(Box::new(Resident::open(cfg)?) as Box<dyn KvBackend>));
    for case in kv_conformance::cache::all() {
        eprintln!("cache case {}", case.name);
        (case.run)(&*open);
    }
    Ok(())
}

/// What a put evicted, sorted (the order of the evicted outputs is the order in which the
/// warps took their indices).
type Gone = Vec<(u64, Vec<u64>, u64, u64)>;

fn put_evict(t: &dyn KvBackend, batch: CachePut<'_>, w: usize) -> (usize, Gone) {
    let n = batch.keys.len();
    let (mut k, mut v, mut s, mut e) = (vec![0; n], vec![0; n * w], vec![0; n], vec![0; n]);
    let m = t
        .put_and_evict(
            batch,
            &mut Evicted::new(&mut k, &mut v, &mut s).expires(&mut e),
        )
        .expect("put_and_evict");
    let mut gone: Gone = (0..m)
        .map(|i| (k[i], v[i * w..(i + 1) * w].to_vec(), s[i], e[i]))
        .collect();
    gone.sort();
    (m, gone)
}

/// The same random sequence of puts (with scores, times to live and repeated keys, the
/// keys `0` and `u64::MAX` among them), gets, peeks and clock moves on two tables of one
/// seed, one driven from host slices and one through the resident API: every result must
/// be identical. Each batch puts at most one distinct key per bucket, so that which entry a
/// put evicts does not depend on the order in which warps take a bucket (which the contract
/// leaves open, item 8); tables small enough that every bucket overflows.
fn resident_batches_match_host_batches() -> std::result::Result<(), Failed> {
    for (policy, width, seed) in [
        (CachePolicy::Lru, 4, 1u64),
        (CachePolicy::Lfu, 1, 2),
        (CachePolicy::Custom, 3, 3),
        (CachePolicy::Lru, kv_core::MAX_WIDTH, 4),
    ] {
        let clock = Arc::new(ManualClock::new(1000));
        let cfg = || {
            TableConfig::new(8 * 32)
                .width(width)
                .seed(seed)
                .cache(CacheConfig::new(policy).clock(clock.clone()))
        };
        let host = CudaCache::open(cfg()).expect("open");
        let res = Resident::open(cfg()).expect("open");
        let (h, r): (&dyn KvBackend, &dyn KvBackend) = (&host, &res);
        let mut rng = Rng::new(seed);
        for step in 0..300 {
            match rng.next_u64() % 5 {
                0..=2 => {
                    let mut keys = Vec::new();
                    let mut buckets = HashSet::new();
                    for _ in 0..1 + rng.next_u64() % 12 {
                        let k = match rng.next_u64() % 10 {
                            0 => 0,
                            1 => u64::MAX,
                            _ => rng.next_u64() % 2000,
                        };
                        if keys.contains(&k)
                            || buckets.insert(host.eviction_scope(k).expect("scope"))
                        {
                            keys.push(k);
                        }
                    }
                    // Repeats: the last occurrence wins.
                    if rng.next_u64().is_multiple_of(3) {
                        keys.extend(keys.clone());
                    }
                    let n = keys.len();
                    let vals: Vec<u64> = (0..n * width).map(|_| rng.next_u64()).collect();
                    let scores: Vec<u64> = (0..n).map(|_| rng.next_u64() % 50).collect();
                    let ttl: Vec<u64> = (0..n)
                        .map(|_| {
                            if rng.next_u64().is_multiple_of(4) {
                                1 + rng.next_u64() % 30
                            } else {
                                0
                            }
                        })
                        .collect();
                    let mut batch = CachePut::new(&keys, &vals).ttl_ms(&ttl);
                    if policy == CachePolicy::Custom {
                        batch = batch.scores(&scores);
                    }
                    if rng.next_u64().is_multiple_of(2) {
                        assert_eq!(
                            put_evict(h, batch, width),
                            put_evict(r, batch, width),
                            "step {step}: put_and_evict"
                        );
                    } else {
                        assert_eq!(
                            h.put_cached(batch).expect("put_cached"),
                            r.put_cached(batch).expect("put_cached"),
                            "step {step}: put_cached"
                        );
                    }
                }
                3 => {
                    let keys: Vec<u64> = (0..rng.next_u64() % 40)
                        .map(|_| rng.next_u64() % 2000)
                        .collect();
                    let n = keys.len();
                    let access = rng.next_u64().is_multiple_of(2);
                    let mut out = [
                        (vec![0; n * width], vec![false; n]),
                        (vec![0; n * width], vec![false; n]),
                    ];
                    for (t, (v, f)) in [h, r].into_iter().zip(out.iter_mut()) {
                        if access {
                            t.get(&keys, v, f).expect("get");
                        } else {
                            t.peek(&keys, v, f).expect("peek");
                        }
                    }
                    assert_eq!(out[0], out[1], "step {step}: lookup");
                }
                _ => clock.advance(rng.next_u64() % 10),
            }
            assert_eq!(h.len(), r.len(), "step {step}: len");
            assert_eq!(
                h.cache_stats().expect("stats"),
                r.cache_stats().expect("stats")
            );
        }
        // Everything either table holds, the other holds alike.
        let keys: Vec<u64> = (0..2000).chain([u64::MAX]).collect();
        let n = keys.len();
        let mut out = [
            (vec![0; n * width], vec![false; n]),
            (vec![0; n * width], vec![false; n]),
        ];
        for (t, (v, f)) in [h, r].into_iter().zip(out.iter_mut()) {
            t.peek(&keys, v, f).expect("peek");
        }
        assert_eq!(out[0], out[1], "{policy:?}: final contents");
        assert!(
            out[0].1.iter().any(|f| *f),
            "{policy:?}: the tables hold something"
        );
    }
    Ok(())
}

/// Bad resident batches are refused with a matchable error and change nothing.
fn resident_bad_input_changes_nothing() -> std::result::Result<(), Failed> {
    let t = CudaCache::open(
        TableConfig::new(64)
            .width(2)
            .cache(CacheConfig::new(CachePolicy::Lru)),
    )
    .expect("open");
    let s = t.new_stream().expect("stream");
    let keys = up(&s, &[1u64, 2]).expect("up");
    let vals = up(&s, &[10u64, 11, 20, 21]).expect("up");
    t.put_cached_device(&DeviceCachePut::new(&keys, &vals))
        .expect("put");
    let short = up(&s, &[5u64, 6, 7]).expect("up");
    let scores = up(&s, &[1u64, 2]).expect("up");
    let (mut ek, mut er, mut es) = (
        s.alloc_zeros::<u64>(1).expect("alloc"),
        s.alloc_zeros::<u64>(4).expect("alloc"),
        s.alloc_zeros::<u64>(2).expect("alloc"),
    );
    let bad = [
        t.put_cached_device(&DeviceCachePut::new(&keys, &short)),
        t.put_cached_device(&DeviceCachePut::new(&keys, &vals).scores(&scores)),
        t.put_and_evict_device(
            &DeviceCachePut::new(&keys, &vals),
            &mut DeviceEvicted::new(&mut ek, &mut er, &mut es),
        ),
    ];
    assert!(matches!(
        bad[0],
        Err(Error::WidthMismatch { .. }) | Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(bad[1], Err(Error::InvalidArgument(_))));
    assert!(matches!(
        bad[2],
        Err(Error::LengthMismatch {
            what: "evicted keys",
            ..
        })
    ));
    let (mut v, mut f) = (
        s.alloc_zeros::<u64>(3).expect("alloc"),
        s.alloc_zeros::<u8>(2).expect("alloc"),
    );
    assert!(matches!(
        t.get_device(&keys, &mut v, &mut f),
        Err(Error::WidthMismatch { .. }) | Err(Error::LengthMismatch { .. })
    ));
    assert_eq!(t.len(), 2);
    let (mut hv, mut hf) = ([0u64; 4], [false; 2]);
    t.peek(&[1, 2], &mut hv, &mut hf).expect("peek");
    assert_eq!((hv, hf), ([10, 11, 20, 21], [true, true]));
    assert_eq!(
        t.cache_stats().expect("stats").clock,
        1,
        "only the good put counted"
    );
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let avail = Availability::unless_missing(
        kv_backend_cuda::unavailable_reason(),
        REQUIRE_ENV,
        "no CUDA device",
    );
    avail.announce("cuda resident cache tests");
    let trials = vec![
        avail.trial(
            "the_cache_contract_holds_through_the_resident_api",
            the_cache_contract_holds_through_the_resident_api,
        ),
        avail.trial(
            "resident_batches_match_host_batches",
            resident_batches_match_host_batches,
        ),
        avail.trial(
            "resident_bad_input_changes_nothing",
            resident_bad_input_changes_nothing,
        ),
    ];
    kv_conformance::libtest_mimic::run(&args, trials).exit();
}
