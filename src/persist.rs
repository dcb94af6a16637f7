//! Snapshots through the facade: [`open_snapshot`] and [`open_bytes_snapshot`] load a
//! snapshot written by any backend into the backend [`Options`] choose, and
//! [`save`] / [`save_bytes`] write one. The formats, the log and durable tables are in
//! [`crate::durable`] (the `kv-durable` crate); docs/durability.md describes them.

use std::path::Path;

use crate::{BytesTable, Options, Result, Table};
use kv_core::{ByteConfig, ByteTable, Clock, Error, KvBackend, SystemClock, TableConfig};
use kv_durable::snapshot::{self, Contents, SaveReport};

/// Opens a table from the snapshot at `path`, on the backend `options` choose (the best
/// available by default): a table of the snapshot's config (width, capacity, seed, cache
/// policy) holding every entry it holds, with the scores and expiry times it had. A
/// damaged or foreign file is [`Error::Corrupt`], a newer format [`Error::NewerFormat`],
/// and nothing is opened.
///
/// ```
/// use vramkv::{KvBackend, Options, TableConfig};
/// let path = std::env::temp_dir().join(format!("vramkv-open-snapshot-{}.vkv", std::process::id()));
/// let cfg = TableConfig::new(100).width(2);
/// let table = vramkv::open(cfg.clone())?;
/// table.put(&[7], &[1, 2])?;
/// vramkv::save(&path, &table, &cfg)?;
///
/// let again = vramkv::open_snapshot(&path, &Options::default())?;
/// let (mut v, mut f) = ([0; 2], [false]);
/// again.get(&[7], &mut v, &mut f)?;
/// assert_eq!((v, f), ([1, 2], [true]));
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), vramkv::Error>(())
/// ```
pub fn open_snapshot(path: &Path, options: &Options) -> Result<Table> {
    open_snapshot_as(path, None, options)
}

/// [`open_snapshot`] into a table of config `cfg` (a larger capacity, a device, a cache
/// table's clock), which must agree with the snapshot's width and cache policy.
pub fn open_snapshot_as(path: &Path, cfg: Option<TableConfig>, options: &Options) -> Result<Table> {
    let snap = snapshot::read(path)?;
    let Contents::Table(image) = &snap.contents else {
        return Err(Error::InvalidConfig(format!(
            "{} holds a byte table: open it with open_bytes_snapshot",
            path.display()
        )));
    };
    let stored = snap.header.table_config()?;
    let cfg = match cfg {
        None => stored,
        Some(c) => {
            let policy = |t: &TableConfig| t.cache.as_ref().map(|c| c.policy);
            if c.width != stored.width || policy(&c) != policy(&stored) {
                return Err(Error::InvalidConfig(format!(
                    "{} holds a table of width {} and cache policy {:?}; the config asks for \
                     width {} and {:?}",
                    path.display(),
                    stored.width,
                    policy(&stored),
                    c.width,
                    policy(&c)
                )));
            }
            c
        }
    };
    let table = crate::open_with(cfg, options)?;
    snapshot::restore_table(&table, image, 1 << 22)?;
    Ok(table)
}

/// Opens a byte table from the snapshot at `path`, as [`open_snapshot`] does; entries
/// whose expiry time has passed on the system clock are left out.
pub fn open_bytes_snapshot(path: &Path, options: &Options) -> Result<BytesTable> {
    let snap = snapshot::read(path)?;
    let Contents::Bytes(image) = &snap.contents else {
        return Err(Error::InvalidConfig(format!(
            "{} holds a fixed-width table: open it with open_snapshot",
            path.display()
        )));
    };
    let cfg: ByteConfig = snap.header.byte_config();
    let table = crate::open_bytes_with(cfg, options)?;
    snapshot::restore_bytes(&table, image, SystemClock::new().now_ms())?;
    Ok(table)
}

/// Writes a snapshot of `table` (opened with `cfg`) to `path`: the table is held for its
/// export only; see [`kv_durable::snapshot::save_table`].
pub fn save(path: &Path, table: &dyn KvBackend, cfg: &TableConfig) -> Result<SaveReport> {
    snapshot::save_table(path, table, cfg)
}

/// Writes a snapshot of the byte table `table` (opened with `cfg`) to `path`.
pub fn save_bytes(path: &Path, table: &dyn ByteTable, cfg: &ByteConfig) -> Result<SaveReport> {
    snapshot::save_bytes(path, table, cfg)
}
