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

/// Every memory limit from too little to enough, through a script that empties the arena's
/// head and then needs new segments: each put either goes through or fails with
/// `OutOfDeviceMemory` and changes nothing, and every key put since reads back. (A failed
/// put that had reopened an emptied head must leave that head its memory: the next small
/// put writes there.)
#[test]
fn every_memory_limit_leaves_the_table_whole() {
    let (mut failures, mut checked) = (0, 0);
    for kib in 24..=200u64 {
        let cfg = ByteConfig::new(64)
            .max_key_bytes(32)
            .max_value_bytes(6000)
            .segment_bytes(1 << 13)
            .table(TableConfig::new(64).seed(4));
        let Ok(t) = HostMirrorBytes::open(cfg, (kib << 10) as usize) else {
            continue;
        };
        let mut model: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let steps: [&[(&str, usize)]; 5] = [
            &[("a", 6000)],
            &[],
            &[("b", 3000), ("c", 6000)],
            &[("d", 100)],
            &[("e", 5000), ("f", 5000), ("g", 5000)],
        ];
        for (s, step) in steps.iter().enumerate() {
            if s == 1 {
                // Empty the head: its only record is deleted.
                if t.delete(BinaryBuf::from_slices([b"a"]).as_binary()).is_ok() {
                    model.retain(|(k, _)| k != b"a");
                }
                continue;
            }
            let keys = BinaryBuf::from_slices(step.iter().map(|(k, _)| k.as_bytes()));
            let values =
                BinaryBuf::from_slices(step.iter().map(|&(k, n)| vec![k.as_bytes()[0]; n]));
            match t.put(keys.as_binary(), values.as_binary()) {
                Ok(()) => {
                    for &(k, n) in step.iter() {
                        model.retain(|(m, _)| m != k.as_bytes());
                        model.push((k.as_bytes().to_vec(), vec![k.as_bytes()[0]; n]));
                    }
                }
                Err(Error::OutOfDeviceMemory { .. }) => failures += 1,
                Err(e) => panic!("limit {kib} KiB, step {s}: {e:?}"),
            }
            let keys = BinaryBuf::from_slices(model.iter().map(|(k, _)| k));
            let mut out = BinaryBuf::new();
            let mut found = vec![false; model.len()];
            match t.get(keys.as_binary(), &mut out, &mut found) {
                // The get's own scratch may not fit either: this step is not checked.
                Err(Error::OutOfDeviceMemory { .. }) => continue,
                r => r.expect("get"),
            }
            checked += 1;
            for (i, (k, v)) in model.iter().enumerate() {
                assert!(found[i], "limit {kib} KiB, step {s}: {k:?} lost");
                assert_eq!(
                    out.get(i),
                    Some(v.as_slice()),
                    "limit {kib} KiB, step {s}: {k:?}"
                );
            }
            assert_eq!(t.len(), model.len(), "limit {kib} KiB, step {s}");
        }
    }
    assert!(failures > 0, "some limit is too small for some step");
    assert!(checked > 400, "most steps were checked: {checked}");
}
