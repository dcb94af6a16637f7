//! The one error type every backend returns.

/// Result alias used across vramkv.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a vramkv call.
///
/// Bad input and refused batches leave the table exactly as it was before the call: a batch
/// is checked (and, for GPU backends, its memory reserved) before anything changes. The one
/// exception is [`Error::Device`] from a put or delete whose device or driver failed while
/// the batch ran: that batch may have been applied in part (contract item g of
/// [`KvBackend`](crate::KvBackend)), and nothing outside it changed.
///
/// ```
/// use kv_core::Error;
/// let e = Error::LengthMismatch { what: "values", expected: 4, got: 3 };
/// assert!(matches!(e, Error::LengthMismatch { .. }));
/// assert_eq!(e.to_string(), "length mismatch: values has 3 elements, expected 4");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An input or output slice does not have the length the batch needs.
    #[error("length mismatch: {what} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// Which argument is wrong (`"values"`, `"found_out"`, ...).
        what: &'static str,
        /// The length the batch needs.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// A value slice whose length is not a whole number of rows of the table's width.
    #[error("width mismatch: {what} has {len} words, not a multiple of the table width {width}")]
    WidthMismatch {
        /// Which argument is wrong.
        what: &'static str,
        /// The table's width in u64 words per value.
        width: usize,
        /// The slice length that was passed.
        len: usize,
    },
    /// The table configuration is not valid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The batch cannot fit: growth is off, or the table would pass the largest size vramkv supports.
    #[error("capacity exceeded: {requested} entries requested, capacity is {capacity}")]
    CapacityExceeded {
        /// `len()` plus the number of keys in the refused batch.
        requested: usize,
        /// The table's capacity when the batch was refused.
        capacity: usize,
    },
    /// The device has not enough free memory for the table or the batch.
    #[error("out of device memory: {requested_bytes} bytes requested on {backend}")]
    OutOfDeviceMemory {
        /// The backend that ran out (`"cuda"`, `"wgpu"`, ...).
        backend: &'static str,
        /// The size of the allocation that failed.
        requested_bytes: u64,
    },
    /// The backend cannot be used on this machine (no driver, no device, missing feature).
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        /// The backend that is unavailable.
        backend: &'static str,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// The device or its driver reported an error.
    #[error("{backend} device error: {message}")]
    Device {
        /// The backend that failed.
        backend: &'static str,
        /// The driver's own message.
        message: String,
    },
    /// An optional capability that this backend does not offer.
    #[error("{backend} does not support {what}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// The capability.
        what: &'static str,
    },
}
