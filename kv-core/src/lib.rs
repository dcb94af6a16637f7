//! The vramkv backend contract.
//!
//! [`KvBackend`] is the trait every backend (CPU, CUDA, wgpu, or your own) implements;
//! [`TableConfig`] describes a table; [`Error`] is the one error type; the sizing
//! rules ([`plan_put`], [`slots_for`], [`capacity_of`]) and the host's bookkeeping of a
//! table ([`Books`], [`prepare_put`]) are shared so that every backend admits, grows,
//! purges and refuses batches at exactly the same points.
//!
//! Backends check their arguments with [`check_put`], [`check_get`] and
//! [`check_contains`] (or, for batches whose slices they only know by length,
//! [`check_put_len`] and [`check_get_len`]) before touching the table.
// A library reports through its results and its trace, never by printing.
#![deny(clippy::print_stdout, clippy::print_stderr)]

#[cfg(feature = "arrow")]
mod arrow;
mod backend;
mod books;
mod bytes;
mod cache;
mod config;
mod error;
mod forward;
mod image;
mod options;
pub mod par;

pub use backend::{
    Audit, Description, KvBackend, check_contains, check_get, check_get_len, check_put,
    check_put_len, check_take,
};
pub use books::{Applied, Books, Housekeeping, count_distinct, prepare_put};
pub use bytes::{
    ArenaStats, Binary, BinaryBuf, ByteConfig, ByteDescription, ByteLimits, ByteTable,
    DEFAULT_MAX_VALUE_BYTES, MAX_KEY_BYTES, MAX_VALUE_LIMIT, Offsets, TTL_MISSING, TTL_NEVER,
    check_byte_lookup, check_byte_put, check_per_key, last_occurrences, remaining_ttl,
};
pub use cache::{
    CACHE_BUCKET_SLOTS, CACHE_MAX_BATCH, CacheConfig, CachePolicy, CachePut, CacheStats, Clock,
    Evicted, ManualClock, SystemClock, cache_buckets, cache_capacity_for_budget,
    cache_scratch_items, cache_slot_bytes, check_cache_batch, check_cache_put_len,
    check_evicted_len,
};
pub use config::{
    MAX_LOAD_FACTOR, MAX_SLOTS, MAX_WIDTH, MIN_SLOTS, PutPlan, TableConfig, capacity_of, plan_put,
    slots_for,
};
pub use error::{DriverError, Error, Result};
pub use image::{ByteImage, ByteRun, CacheMeta, ImagePart, TableImage};
pub use options::{check_option, env_flag, env_value};
