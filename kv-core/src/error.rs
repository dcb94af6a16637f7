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
    /// An argument of a batch is not valid for this table (scores given to a table whose
    /// policy keeps its own, say).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The batch cannot fit: growth is off, or the table would pass the largest size vramkv supports.
    #[error("capacity exceeded: {requested} entries requested, capacity is {capacity}")]
    CapacityExceeded {
        /// `len()` plus the new keys of the refused batch (distinct keys not in the table).
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
        /// What failed, with the driver's own message.
        message: String,
        /// The driver's error itself, where there is one: [`std::error::Error::source`]
        /// returns it.
        #[source]
        source: Option<DriverError>,
    },
    /// A key or value of a byte batch is outside the table's limits (an empty key, or a
    /// key or value longer than the table takes).
    #[error("{what} {index} has {len} bytes; this table takes {min} to {max}")]
    ByteLimit {
        /// `"key"` or `"value"`.
        what: &'static str,
        /// The item's place in its batch.
        index: usize,
        /// Its length in bytes.
        len: u64,
        /// The shortest allowed.
        min: u64,
        /// The longest allowed.
        max: u64,
    },
    /// A batch needs more memory than a budget the table was given (a byte table's arena
    /// budget), even after compaction.
    #[error("{what} budget exceeded: {requested_bytes} bytes needed, budget is {budget_bytes}")]
    BudgetExceeded {
        /// Which budget (`"arena"`).
        what: &'static str,
        /// The bytes the budget would have had to hold.
        requested_bytes: u64,
        /// The budget.
        budget_bytes: u64,
    },
    /// A file could not be read or written (a snapshot, a log): the operating system's
    /// error, by kind and in words.
    #[error("{what}: {message}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The operating system's error kind.
        kind: std::io::ErrorKind,
        /// The operating system's message.
        message: String,
    },
    /// A snapshot or log file is damaged (truncated, bit-flipped) or is not a vramkv file
    /// at all. Nothing of it was loaded.
    #[error("{file}: {detail}")]
    Corrupt {
        /// The file.
        file: String,
        /// What is wrong, and where.
        detail: String,
    },
    /// A snapshot or log written in a newer format than this vramkv reads.
    #[error(
        "{file}: format version {found} is newer than this vramkv reads (up to {supported}); upgrade vramkv to load it"
    )]
    NewerFormat {
        /// The file.
        file: String,
        /// The file's format version.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
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

impl Error {
    /// An [`Error::Device`] without a driver error behind it (a broken invariant the backend
    /// found, say).
    ///
    /// ```
    /// let e = kv_core::Error::device("cuda", "2 keys found no slot");
    /// assert_eq!(e.to_string(), "cuda device error: 2 keys found no slot");
    /// ```
    pub fn device(backend: &'static str, message: impl Into<String>) -> Error {
        Error::Device {
            backend,
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::Io`] from an operating system error met while doing `what`.
    ///
    /// ```
    /// let e = kv_core::Error::io("writing /tmp/x", std::io::Error::from(std::io::ErrorKind::StorageFull));
    /// assert!(matches!(e, kv_core::Error::Io { kind: std::io::ErrorKind::StorageFull, .. }));
    /// ```
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            kind: err.kind(),
            message: err.to_string(),
        }
    }

    /// An [`Error::Device`] that keeps the driver's error `err` as its source.
    ///
    /// ```
    /// use std::error::Error as _;
    /// let io = std::io::Error::other("link down");
    /// let e = kv_core::Error::driver("wgpu", "waiting for the GPU: link down", io);
    /// assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("link down"));
    /// ```
    pub fn driver(
        backend: &'static str,
        message: impl Into<String>,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Device {
            backend,
            message: message.into(),
            source: Some(DriverError(std::sync::Arc::new(err))),
        }
    }
}

/// A driver's error kept inside an [`Error::Device`] (shared, so that [`Error`] stays
/// `Clone`; two are equal when they read the same).
#[derive(Clone)]
pub struct DriverError(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl std::fmt::Debug for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for DriverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for DriverError {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for DriverError {}
