//! What the wgpu tests with a trace share: one trial, reported as ignored (after
//! `skipped: …`) without an adapter unless `VRAMKV_REQUIRE_WGPU=1`.

use kv_backend_wgpu::{REQUIRE_ENV, unavailable_reason};
use kv_conformance::Availability;
use kv_conformance::libtest_mimic::{Arguments, Failed, run};

/// The binary's `main`: runs `test` as the trial `name`.
pub fn main(name: &str, what: &str, test: fn() -> Result<(), Failed>) {
    let args = Arguments::from_args();
    let availability =
        Availability::unless_missing(unavailable_reason(), REQUIRE_ENV, "no wgpu adapter");
    availability.announce(what);
    run(&args, vec![availability.trial(name, test)]).exit();
}
