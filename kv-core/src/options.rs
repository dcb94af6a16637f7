//! What every backend's typed options share: reading a `VRAMKV_*` variable into a typed
//! value and checking a value's range, both failing with [`Error::InvalidConfig`] that names
//! what was wrong. Backends read the environment only in their `Options::from_env`, which
//! a tool calls when it wants to; the library never reads it on its own.

use crate::{Error, Result};

/// The value of the environment variable `name` parsed as a `T`, `None` when it is unset;
/// [`Error::InvalidConfig`] naming the variable when it does not parse.
///
/// ```
/// assert_eq!(kv_core::env_value::<u32>("VRAMKV_DOC_SURELY_UNSET"), Ok(None));
/// ```
pub fn env_value<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::InvalidConfig(format!("{name}={v:?} is not a valid value"))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(Error::InvalidConfig(format!("{name}: {e}"))),
    }
}

/// Whether the environment variable `name` is set to anything but `0` (a switch such as
/// `VRAMKV_CUDA_TRACE=1`).
pub fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v != "0")
}

/// Checks that an option `name`, when set, lies in `lo..=hi`.
///
/// ```
/// use kv_core::{Error, check_option};
/// assert!(check_option("lanes", Some(4), 1, 16).is_ok());
/// assert!(check_option("lanes", None::<usize>, 1, 16).is_ok());
/// assert!(matches!(check_option("lanes", Some(0), 1, 16), Err(Error::InvalidConfig(_))));
/// ```
pub fn check_option<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    value: Option<T>,
    lo: T,
    hi: T,
) -> Result<()> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) => Err(Error::InvalidConfig(format!(
            "{name} {v} is outside {lo}..={hi}"
        ))),
        _ => Ok(()),
    }
}
