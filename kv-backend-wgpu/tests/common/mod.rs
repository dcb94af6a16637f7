//! What the wgpu tests that run their batches in a child process share: their knobs are
//! read once per process (some decide the device's features), so the test binary runs
//! itself again with the variables set and checks the child's stderr.

use std::process::Command;

use kv_backend_wgpu::{REQUIRE_ENV, unavailable_reason};
use kv_conformance::Availability;
use kv_conformance::libtest_mimic::{Arguments, Failed, run};

/// Set in the child process: run the batches instead of the test harness.
const CHILD_ENV: &str = "VRAMKV_WGPU_TEST_CHILD";

/// Runs this test binary as a child with `envs` set, and returns its stderr if it succeeded.
pub fn run_child(envs: &[(&str, &str)]) -> Result<String, Failed> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let out = Command::new(exe)
        .envs(envs.iter().copied())
        .env(CHILD_ENV, "1")
        .output()
        .map_err(|e| format!("running the child: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("the child failed ({}): {stderr}", out.status).into());
    }
    Ok(stderr)
}

/// The binary's `main`: in the child, runs `batches` (exit status 1 and the error on
/// stderr when it fails); otherwise runs `test` as the trial `name`, reported as ignored
/// (after `skipped: …`) without an adapter, unless `VRAMKV_REQUIRE_WGPU=1`.
pub fn main(
    name: &str,
    what: &str,
    batches: fn() -> Result<(), String>,
    test: fn() -> Result<(), Failed>,
) {
    if std::env::var_os(CHILD_ENV).is_some() {
        if let Err(e) = batches() {
            eprintln!("{e}");
            std::process::exit(1);
        }
        return;
    }
    let args = Arguments::from_args();
    let availability =
        Availability::unless_missing(unavailable_reason(), REQUIRE_ENV, "no wgpu adapter");
    availability.announce(what);
    run(&args, vec![availability.trial(name, test)]).exit();
}
