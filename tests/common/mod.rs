//! What the differential test binaries share: one trial per backend of this build, run
//! where the backend opens this kind of table, reported as ignored (after `skipped: ...`)
//! where it cannot, and failed where it is required (`VRAMKV_REQUIRE_CUDA`,
//! `VRAMKV_REQUIRE_WGPU`) or where opening fails for any other reason.

use kv_conformance::Availability;
use libtest_mimic::{Failed, Trial};
use vramkv::{BackendKind, Error};

/// Sequences per backend: `PROPTEST_CASES`, else `default`.
#[allow(dead_code)] // Each test binary compiles this module; not every one runs sequences.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The trials `test::<backend>` of every backend compiled in: `probe(kind)` opens a table
/// of the kind under test (`what`, for the messages), and `body(kind)` is the test.
pub fn per_backend(
    test: &str,
    what: &str,
    probe: impl Fn(BackendKind) -> vramkv::Result<()>,
    body: impl Fn(BackendKind) -> Result<(), Failed> + Clone + Send + 'static,
) -> Vec<Trial> {
    let mut trials = Vec::new();
    for kind in BackendKind::ALL.into_iter().filter(|k| k.compiled_in()) {
        let require_env = format!("VRAMKV_REQUIRE_{}", kind.name().to_uppercase());
        let availability = match probe(kind) {
            Ok(()) => Availability::Available,
            Err(e @ (Error::Unsupported { .. } | Error::BackendUnavailable { .. })) => {
                Availability::unless_missing(
                    Some(e.to_string()),
                    &require_env,
                    &format!("{kind} {what}"),
                )
            }
            Err(e) => Availability::Fail(format!("opening a {kind} {what}: {e}")),
        };
        availability.announce(&format!("{test}::{kind}"));
        let body = body.clone();
        trials.push(availability.trial(format!("{test}::{kind}"), move || body(kind)));
    }
    trials
}
