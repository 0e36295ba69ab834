//! `xtask build`: the Wasm filter (always release: it is what Envoy loads) and the native
//! binaries (relay, echo model).

use std::process::Command;

use anyhow::{bail, Result};

use crate::paths::{Paths, Profile, ECHO_PACKAGE, FILTER_PACKAGE, RELAY_PACKAGE, WASM_TARGET};
use crate::process::run;
use crate::ui::Step;

/// The cargo that runs us (so `cargo +toolchain xtask` stays on that toolchain).
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Run from the workspace root whatever the caller's directory.
    cmd.current_dir(crate::paths::Paths::discover().root);
    cmd
}

pub fn build_filter(paths: &Paths) -> Result<()> {
    let step = Step::new(format!("Build the Wasm filter ({WASM_TARGET}, release)"));
    run(
        cargo().args([
            "build",
            "-p",
            FILTER_PACKAGE,
            "--target",
            WASM_TARGET,
            "--release",
        ]),
        "The filter did not compile; read the compiler output above. If the target is \
         missing, run `cargo xtask setup`.",
    )?;
    let wasm = paths.filter_wasm();
    if !wasm.is_file() {
        bail!(
            "the build succeeded but {} is missing: the filter crate must be a `cdylib`",
            wasm.display()
        );
    }
    step.done();
    Ok(())
}

pub fn build_binaries(paths: &Paths, profile: Profile) -> Result<()> {
    let step = Step::new(format!(
        "Build realtime-relay and echo-model ({})",
        profile.dir()
    ));
    let mut cmd = cargo();
    cmd.args(["build", "-p", RELAY_PACKAGE, "-p", ECHO_PACKAGE, "--bins"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    run(
        &mut cmd,
        "The relay or the echo model did not compile; read the compiler output above.",
    )?;
    for bin in [paths.relay_bin(profile), paths.echo_bin(profile)] {
        if !bin.is_file() {
            bail!("the build succeeded but {} is missing", bin.display());
        }
    }
    step.done();
    Ok(())
}
