//! The vramkv backend contract.
//!
//! [`KvBackend`] is the trait every backend (CPU, CUDA, wgpu, or your own) implements;
//! [`TableConfig`] describes a table; [`Error`] is the one error type; the sizing
//! rules ([`plan_put`], [`slots_for`], [`capacity_of`]) are shared so that every
//! backend grows and refuses batches at exactly the same points.
//!
//! Backends check their arguments with [`check_put`], [`check_get`] and
//! [`check_contains`] before touching the table.

mod backend;
mod config;
mod error;

pub use backend::{Audit, Description, KvBackend, check_contains, check_get, check_put};
pub use config::{
    MAX_LOAD_FACTOR, MAX_SLOTS, MAX_WIDTH, MIN_SLOTS, PutPlan, TableConfig, capacity_of, plan_put,
    prepare_put, slots_for,
};
pub use error::{Error, Result};
