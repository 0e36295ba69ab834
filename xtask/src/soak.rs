//! `xtask soak`: the churn soak (bench/src/soak, docs/reliability.md "Churn soak"). Builds
//! the soak and what it drives in release, then runs it; the `test` pipeline runs a
//! 500-call pass on the dev binaries it has already built.

use anyhow::Result;

use crate::bench;
use crate::paths::{Paths, Profile};
use crate::process::run;

pub const SOAK_BIN: &str = "rtgw-soak";
/// Calls of the pipeline's pass.
pub const CI_CALLS: usize = 500;

/// `cargo xtask soak [--calls N] [rtgw-soak args]`.
pub fn soak(paths: &Paths, calls: usize, extra: &[String]) -> Result<()> {
    // The bench package holds both load tools: its release build is the soak's too.
    bench::build(paths)?;
    let mut cmd = std::process::Command::new(paths.bin(SOAK_BIN, Profile::Release));
    cmd.args(["--calls", &calls.to_string()])
        .args(extra)
        .current_dir(&paths.root);
    run(&mut cmd, "The soak failed; its output is above.")
}

/// The pipeline's pass: [`CI_CALLS`] calls on the dev binaries.
pub fn ci_pass(paths: &Paths) -> Result<String> {
    let mut cmd = std::process::Command::new(paths.bin(SOAK_BIN, Profile::Dev));
    cmd.args([
        "--calls",
        &CI_CALLS.to_string(),
        "--concurrency",
        "50",
        "--dev-binaries",
    ])
    .current_dir(&paths.root);
    run(&mut cmd, "The soak failed; its output is above.")?;
    Ok(format!(
        "{CI_CALLS} complete + {} vanishing + {} never-connecting calls; every figure back to its baseline (bench-results/soak-*.json)",
        CI_CALLS / 10,
        CI_CALLS / 10
    ))
}
