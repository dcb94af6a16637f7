//! Byte batches from and to arrow-array's binary arrays (feature `arrow`), without copies:
//! a [`Binary`] borrows an array's offsets and data, and a [`BinaryBuf`] becomes a
//! `LargeBinaryArray` that owns its vectors.
//!
//! ```
//! use arrow_array::{Array, BinaryArray};
//! use kv_core::{Binary, BinaryBuf};
//! let keys = BinaryArray::from_iter_values([&b"k1"[..], b"k2"]);
//! let batch = Binary::try_from(&keys).unwrap();
//! assert_eq!(batch.get(1), b"k2");
//! let out = BinaryBuf::from_slices(["v1", ""]).into_arrow(Some(&[true, false])).unwrap();
//! assert_eq!(out.value(0), b"v1");
//! assert!(out.is_null(1));
//! ```

use arrow_array::{Array, BinaryArray, LargeBinaryArray};
use arrow_buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};

use crate::{Binary, BinaryBuf, Error, Result};

fn no_nulls(array: &dyn Array) -> Result<()> {
    match array.null_count() {
        0 => Ok(()),
        n => Err(Error::InvalidArgument(format!(
            "a binary array with {n} nulls: byte tables take no null keys or values"
        ))),
    }
}

impl<'a> TryFrom<&'a BinaryArray> for Binary<'a> {
    type Error = Error;

    /// Borrows the array's offsets and data; [`Error::InvalidArgument`] for an array with
    /// nulls.
    fn try_from(a: &'a BinaryArray) -> Result<Self> {
        no_nulls(a)?;
        Binary::new_i32(a.value_offsets(), a.value_data())
    }
}

impl<'a> TryFrom<&'a LargeBinaryArray> for Binary<'a> {
    type Error = Error;

    /// Borrows the array's offsets and data; [`Error::InvalidArgument`] for an array with
    /// nulls.
    fn try_from(a: &'a LargeBinaryArray) -> Result<Self> {
        no_nulls(a)?;
        Binary::new(a.value_offsets(), a.value_data())
    }
}

impl BinaryBuf {
    /// The items as a `LargeBinaryArray` that takes over this buffer's vectors (no copy),
    /// with a null at every `i` where `found[i]` is false (a get's misses); `None` for no
    /// nulls. [`Error::LengthMismatch`] when `found` has not one flag per item.
    pub fn into_arrow(self, found: Option<&[bool]>) -> Result<LargeBinaryArray> {
        let n = self.len();
        let nulls = match found {
            Some(f) if f.len() != n => {
                return Err(Error::LengthMismatch {
                    what: "found",
                    expected: n,
                    got: f.len(),
                });
            }
            Some(f) => Some(NullBuffer::from(f)),
            None => None,
        };
        let (offsets, data) = self.into_parts();
        LargeBinaryArray::try_new(
            OffsetBuffer::new(ScalarBuffer::from(offsets)),
            Buffer::from_vec(data),
            nulls,
        )
        .map_err(|e| Error::InvalidArgument(format!("building a LargeBinaryArray: {e}")))
    }
}
