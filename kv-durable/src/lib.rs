//! Durability for vramkv tables: snapshots and an append-only log.
//!
//! - **Snapshots** ([`snapshot`]): [`snapshot::save_table`] / [`snapshot::save_bytes`]
//!   write every live entry of a table (keys, rows, scores and expiry times), its config
//!   and the format version to one file, checksummed per chunk, through a temporary file,
//!   an fsync, an atomic rename and an fsync of the directory. The table is held only for
//!   its export (a device-to-host copy on a GPU backend); the disk is written with the
//!   table free. [`snapshot::read`] checks the whole file before it hands anything over,
//!   and a snapshot written by any backend loads into any other.
//! - **The log** ([`log`]): one checksummed record per applied write batch, with the fsync
//!   policies `always`, `everysec` and `no` ([`Fsync`]). A torn final record is dropped
//!   and reported; anything else damaged stops the load.
//! - **Durable tables** ([`DurableTable`], [`DurableBytes`]): a table in front of a
//!   directory of snapshot and log generations ([`journal`]). Every write batch is logged
//!   before its caller is answered; the log is rewritten from a fresh snapshot when it
//!   grows past a size, with writers held back for one export only. Opening the
//!   directory loads the newest snapshot and the logs after it.
//!
//! docs/durability.md describes the formats and the guarantees, and how the crash tests
//! check them.
//!
//! ```
//! use kv_core::{KvBackend, TableConfig};
//! use kv_durable::snapshot;
//! let path = std::env::temp_dir().join(format!("vramkv-doc-{}.vkv", std::process::id()));
//! let cfg = TableConfig::new(1000).width(2);
//! let table = kv_backend_cpu::CpuBackend::open(cfg.clone())?;
//! table.put(&[1, 2], &[10, 11, 20, 21])?;
//! snapshot::save_table(&path, &table, &cfg)?;
//!
//! let snap = snapshot::read(&path)?;
//! let again = kv_backend_cpu::CpuBackend::open(snap.header.table_config()?)?;
//! let snapshot::Contents::Table(image) = &snap.contents else { unreachable!() };
//! snapshot::restore_table(&again, image, 1 << 20)?;
//! assert_eq!(again.len(), 2);
//! # std::fs::remove_file(&path).unwrap();
//! # Ok::<(), kv_core::Error>(())
//! ```

mod durable;
mod file;
pub mod journal;
pub mod log;
pub mod snapshot;

pub use durable::{DurableBytes, DurableTable};
pub use file::pause_point;
pub use journal::{Fsync, LogConfig, OpenReport};
