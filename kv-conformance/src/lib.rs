//! The vramkv conformance suite.
//!
//! Every rule of the [`KvBackend`](kv_core::KvBackend) contract is a case in
//! [`cases::all`]. A backend runs the whole suite from one integration test file
//! (with `harness = false` in its `Cargo.toml`) and one macro call:
//!
//! ```no_run
//! // tests/conformance.rs of a backend crate
//! kv_conformance::conformance_main! {
//!     backend: "mine",
//!     open: |cfg| Ok(Box::new(kv_conformance::doc_backend(cfg)?) as Box<dyn kv_core::KvBackend>),
//!     availability: || kv_conformance::Availability::Available,
//! }
//! ```
//!
//! A backend with cache tables adds `cache: true` and runs the cache contract
//! ([`cache::all`]) too; without it, the suite checks that a cache config is refused.
//!
//! `availability` decides, at run time, whether the backend can run here. When it answers
//! [`Availability::Skip`], the binary prints `skipped: <reason>` and reports every case
//! as *ignored* (never as passed); [`Availability::Fail`] makes every case fail, for
//! machines where the backend is required.
//!
//! Byte tables ([`kv_core::ByteTable`]) have a suite of their own, [`bytes`], run with
//! [`bytes_main!`].
//!
//! The [`stress`] module is the second suite, long random sequences and big batches
//! against a `HashMap`, with its own macro, [`stress_main!`].
//!
//! [`Model`] is the sequential reference the cases (and the differential property tests)
//! compare a backend with.

pub mod bytes;
pub mod cache;
pub mod cases;
mod model;
pub mod stress;

pub use libtest_mimic;
pub use model::{Model, SplitMix64};

/// Whether the backend under test can run on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Run every case.
    Available,
    /// Report every case as ignored, after printing `skipped: <reason>`.
    Skip(String),
    /// Fail every case with this reason (the backend is required here but absent).
    Fail(String),
}

impl Availability {
    /// The usual answer for optional hardware: [`Available`](Self::Available) when
    /// `unavailable` is `None`; otherwise [`Fail`](Self::Fail) if the environment variable
    /// `require_env` is set to anything but `0`, else [`Skip`](Self::Skip). The reason
    /// reads `<missing>: <unavailable>`, e.g. `no CUDA device: no driver`.
    pub fn unless_missing(unavailable: Option<String>, require_env: &str, missing: &str) -> Self {
        match unavailable {
            None => Self::Available,
            Some(r) if std::env::var_os(require_env).is_some_and(|v| v != "0") => {
                Self::Fail(format!("{missing}: {r}"))
            }
            Some(r) => Self::Skip(format!("{missing}: {r}")),
        }
    }

    /// Prints `skipped: <reason> (<what> not run)` when skipping; nothing otherwise.
    pub fn announce(&self, what: &str) {
        if let Self::Skip(reason) = self {
            println!("skipped: {reason} ({what} not run)");
        }
    }

    /// The trial `name`: runs `body` when available, is reported as ignored when skipped,
    /// and fails with the reason when the backend is required but missing.
    pub fn trial(
        &self,
        name: impl Into<String>,
        body: impl FnOnce() -> Result<(), libtest_mimic::Failed> + Send + 'static,
    ) -> libtest_mimic::Trial {
        use libtest_mimic::Trial;
        match self {
            Self::Available => Trial::test(name, body),
            Self::Skip(_) => Trial::test(name, || Ok(())).with_ignored_flag(true),
            Self::Fail(reason) => {
                let reason = reason.clone();
                Trial::test(name, move || Err(reason.into()))
            }
        }
    }
}

/// Builds the suite's trials for a backend; what [`conformance_main!`] calls. With `cache`
/// the backend has cache tables and runs the cache contract ([`cache::all`]); without, it
/// runs [`cache::refused`]: a cache config must be refused, never opened as something
/// else.
pub fn trials(
    backend: &'static str,
    open: std::sync::Arc<cases::Open>,
    availability: Availability,
    cache: bool,
) -> Vec<libtest_mimic::Trial> {
    availability.announce(&format!("{backend} conformance suite"));
    let cache_cases = if cache {
        cache::all()
    } else {
        cache::refused()
    };
    cases::all()
        .into_iter()
        .chain(cache_cases)
        .map(|case| {
            let open = open.clone();
            availability.trial(format!("{backend}::{}", case.name), move || {
                (case.run)(&*open);
                Ok(())
            })
        })
        .collect()
}

/// Generates `fn main()` for a backend's conformance test binary; see the crate docs.
#[macro_export]
macro_rules! conformance_main {
    (backend: $backend:expr, open: $open:expr, availability: $avail:expr $(,)?) => {
        $crate::conformance_main! {
            backend: $backend, open: $open, availability: $avail, cache: false,
        }
    };
    (backend: $backend:expr, open: $open:expr, availability: $avail:expr, cache: $cache:expr $(,)?) => {
        fn main() {
            let args = $crate::libtest_mimic::Arguments::from_args();
            let open: ::std::sync::Arc<$crate::cases::Open> = ::std::sync::Arc::new($open);
            let trials = $crate::trials($backend, open, ($avail)(), $cache);
            $crate::libtest_mimic::run(&args, trials).exit();
        }
    };
}

/// A minimal backend for the crate's doc example: a mutex around [`Model`], with the
/// shared books and sizing rules (`kv_core::Books`, `kv_core::prepare_put`). It is what the
/// contract looks like with nothing GPU about it.
pub fn doc_backend(cfg: kv_core::TableConfig) -> kv_core::Result<impl kv_core::KvBackend> {
    cfg.validate()?;
    if cfg.cache.is_some() {
        return Err(kv_core::Error::Unsupported {
            backend: "model",
            what: "cache tables",
        });
    }
    cfg.device_among(1, "model")?;
    Ok(ModelBackend {
        cfg: cfg.clone(),
        books: std::sync::Mutex::new(kv_core::Books::purging_itself(&cfg)),
        m: Default::default(),
    })
}

struct ModelBackend {
    cfg: kv_core::TableConfig,
    books: std::sync::Mutex<kv_core::Books>,
    m: std::sync::Mutex<Option<Model>>,
}

/// What `prepare_put` needs from the model backend: its books and the batch's keys.
struct ModelPrep<'a> {
    backend: &'a ModelBackend,
    books: &'a mut kv_core::Books,
    keys: &'a [u64],
    /// The lookup of `keys`, once made (the model does not change between the two counts).
    found: Option<Vec<bool>>,
}

impl ModelPrep<'_> {
    fn found(&mut self) -> &[bool] {
        let (backend, keys) = (self.backend, self.keys);
        self.found
            .get_or_insert_with(|| backend.with(|m| m.contains(keys)))
    }
}

impl kv_core::Housekeeping for ModelPrep<'_> {
    fn books(&mut self) -> &mut kv_core::Books {
        self.books
    }
    fn rehash(&mut self, _slots: usize) -> kv_core::Result<()> {
        Ok(())
    }
    fn count_missing(&mut self) -> kv_core::Result<usize> {
        Ok(self.found().iter().filter(|f| !**f).count())
    }
    fn count_new(&mut self) -> kv_core::Result<usize> {
        let keys = self.keys;
        Ok(kv_core::count_distinct(keys, self.found()))
    }
}

impl ModelBackend {
    fn with<R>(&self, f: impl FnOnce(&mut Model) -> R) -> R {
        let mut g = self.m.lock().unwrap_or_else(|p| p.into_inner());
        f(g.get_or_insert_with(|| Model::new(self.cfg.width)))
    }
}

impl kv_core::KvBackend for ModelBackend {
    fn width(&self) -> usize {
        self.cfg.width
    }
    fn put(&self, keys: &[u64], values: &[u64]) -> kv_core::Result<()> {
        kv_core::check_put(self.cfg.width, keys, values)?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut books = self.books.lock().unwrap_or_else(|p| p.into_inner());
        let mut prep = ModelPrep {
            backend: self,
            books: &mut books,
            keys,
            found: None,
        };
        kv_core::prepare_put(&mut prep, keys.len())?;
        let added = self.with(|m| {
            let before = m.len();
            m.put(keys, values);
            (m.len() - before) as u64
        });
        let applied = kv_core::Applied {
            inserted: added,
            from_empty: added,
            ..Default::default()
        };
        books.apply_put(applied, "model")
    }
    fn get(
        &self,
        keys: &[u64],
        values_out: &mut [u64],
        found_out: &mut [bool],
    ) -> kv_core::Result<()> {
        kv_core::check_get(self.cfg.width, keys, values_out, found_out)?;
        let (v, f) = self.with(|m| m.get(keys));
        values_out.copy_from_slice(&v);
        found_out.copy_from_slice(&f);
        Ok(())
    }
    fn delete(&self, keys: &[u64]) -> kv_core::Result<usize> {
        let mut books = self.books.lock().unwrap_or_else(|p| p.into_inner());
        let removed = self.with(|m| m.delete(keys));
        Ok(books.apply_delete(removed as u64, 0))
    }
    fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> kv_core::Result<()> {
        kv_core::check_contains(keys, found_out)?;
        found_out.copy_from_slice(&self.with(|m| m.contains(keys)));
        Ok(())
    }
    fn len(&self) -> usize {
        self.with(|m| m.len())
    }
    fn capacity(&self) -> usize {
        self.books
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .capacity()
    }
    fn clear(&self) -> kv_core::Result<()> {
        let mut books = self.books.lock().unwrap_or_else(|p| p.into_inner());
        self.with(|m| m.clear());
        books.cleared();
        Ok(())
    }
    fn export(&self) -> kv_core::Result<kv_core::TableImage> {
        let w = self.cfg.width;
        Ok(self.with(|m| {
            let keys = m.keys();
            let (values, _) = m.get(&keys);
            kv_core::TableImage {
                width: w,
                keys,
                values,
                ..Default::default()
            }
        }))
    }
    fn describe(&self) -> kv_core::Description {
        let slots = self.books.lock().unwrap_or_else(|p| p.into_inner()).slots();
        kv_core::Description {
            backend: "model",
            device: "host".into(),
            bytes_in_use: (slots * (1 + self.cfg.width) * 8) as u64,
            slots,
        }
    }
}
