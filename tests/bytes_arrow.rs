//! Byte tables fed from and read into Arrow arrays (feature `arrow`): a sliced
//! `BinaryArray` (its first offset not 0) and a `LargeBinaryArray` go in without a copy,
//! a get's results come out as a `LargeBinaryArray` with nulls for misses, and arrays
//! with nulls are refused and change nothing.
#![cfg(feature = "arrow")]

use arrow_array::{Array, BinaryArray, LargeBinaryArray};
use vramkv::{Binary, BinaryBuf, ByteConfig, ByteTable, Error};

#[test]
fn arrow_batches_round_trip() -> Result<(), Error> {
    let t = vramkv::open_bytes_with(
        ByteConfig::new(64),
        &vramkv::Options::default().backend(vramkv::BackendKind::Cpu),
    )?;
    let all_keys = BinaryArray::from_iter_values([&b"skip"[..], b"a", b"bb", b"\0"]);
    let keys = all_keys.slice(1, 3);
    assert_ne!(keys.value_offsets()[0], 0);
    let values = LargeBinaryArray::from_iter_values([&b"1"[..], b"", b"333"]);
    t.put(Binary::try_from(&keys)?, Binary::try_from(&values)?)?;

    let probe = BinaryArray::from_iter_values([&b"bb"[..], b"skip", b"\0"]);
    let mut out = BinaryBuf::new();
    let mut found = vec![false; probe.len()];
    t.get(Binary::try_from(&probe)?, &mut out, &mut found)?;
    let got = out.into_arrow(Some(&found))?;
    assert_eq!(got.len(), 3);
    assert_eq!(got.value(0), b"");
    assert!(got.is_valid(0));
    assert!(got.is_null(1));
    assert_eq!(got.value(2), b"333");

    let with_null = BinaryArray::from(vec![Some(&b"x"[..]), None]);
    let before = t.describe();
    assert!(matches!(
        Binary::try_from(&with_null),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(t.describe(), before);
    assert_eq!(t.len(), 3);
    Ok(())
}
