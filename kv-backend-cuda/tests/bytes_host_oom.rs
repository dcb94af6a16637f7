//! `CudaBytes`'s driver out of device memory, on the host mirror (whose "device" has a
//! memory limit): a put that needs an arena segment, scratch or a larger index that the
//! device cannot give fails with `Error::OutOfDeviceMemory` and changes nothing.

use kv_backend_cuda::HostMirrorBytes;
use kv_core::{BinaryBuf, ByteConfig, ByteTable, Error, TableConfig};

fn batch(range: std::ops::Range<u32>, value_len: usize) -> (BinaryBuf, BinaryBuf) {
    let keys = BinaryBuf::from_slices(range.clone().map(|i| format!("key-{i}")));
    let values = BinaryBuf::from_slices(range.map(|i| vec![i as u8; value_len]));
    (keys, values)
}

#[test]
fn out_of_device_memory_changes_nothing() {
    let seg = 1u64 << 16;
    let cfg = ByteConfig::new(64)
        .max_key_bytes(32)
        .max_value_bytes(4096)
        .segment_bytes(seg)
        .table(TableConfig::new(64).seed(9));
    // Room for the index, the scratch of small batches and a few segments.
    let t = HostMirrorBytes::open(cfg, 512 << 10).expect("open");
    let (k, v) = batch(0..20, 1000);
    t.put(k.as_binary(), v.as_binary())
        .expect("a first put fits");
    let before = t.describe();
    let mut oom = None;
    for round in 1..40u32 {
        let (k, v) = batch(round * 20..round * 20 + 20, 4000);
        match t.put(k.as_binary(), v.as_binary()) {
            Ok(()) => continue,
            Err(e) => {
                oom = Some((e, round));
                break;
            }
        }
    }
    let (e, round) = oom.expect("the mirror's memory runs out");
    assert!(matches!(e, Error::OutOfDeviceMemory { .. }), "{e:?}");
    // The refused batch's keys are absent; every earlier key is there.
    let (k, _) = batch(round * 20..round * 20 + 20, 0);
    let mut found = vec![true; 20];
    t.contains(k.as_binary(), &mut found).expect("contains");
    assert!(found.iter().all(|f| !f), "a refused put left keys behind");
    let (k, v) = batch(0..20, 1000);
    let mut out = BinaryBuf::new();
    let mut found = vec![false; 20];
    t.get(k.as_binary(), &mut out, &mut found).expect("get");
    assert!(found.iter().all(|&f| f));
    for i in 0..20 {
        assert_eq!(out.get(i), v.get(i));
    }
    let after = t.describe();
    assert_eq!(after.entries, 20 + (round as usize - 1) * 20);
    assert!(after.arena.live_bytes >= before.arena.live_bytes);
    // Deleting makes room again.
    let (k, _) = batch(20..round * 20, 0);
    t.delete(k.as_binary()).expect("delete");
    let (k, v) = batch(round * 20..round * 20 + 20, 4000);
    t.put(k.as_binary(), v.as_binary())
        .expect("fits after deletes");
}
