//! `xtask bench`: build the benchmark and what it measures in release, then run it
//! (bench/, docs/benchmarks.md). The `test` pipeline runs a quick smoke pass on the dev
//! binaries it has already built: benchmarks report, they never fail CI on a number, but a
//! benchmark that crashes or gets no call through does.

use anyhow::Result;

use crate::compile::{build_filter, cargo};
use crate::paths::{Paths, Profile, ECHO_PACKAGE, RELAY_PACKAGE};
use crate::process::run;
use crate::setup::{self, SetupOptions};
use crate::ui::Step;

pub const BENCH_PACKAGE: &str = "rtgw-bench";
pub const BENCH_BIN: &str = "rtgw-bench";

/// Setup (Envoy), the filter, and release builds of the load tools (rtgw-bench, rtgw-soak),
/// the relay and the echo model.
pub fn build(paths: &Paths) -> Result<()> {
    setup::setup(paths, SetupOptions::default())?;
    setup::janus()?;
    setup::valgrind()?;
    build_filter(paths)?;
    let step = Step::new("Build rtgw-bench, rtgw-soak, realtime-relay and echo-model (release)");
    run(
        cargo().args([
            "build",
            "--release",
            "-p",
            BENCH_PACKAGE,
            "-p",
            RELAY_PACKAGE,
            "-p",
            ECHO_PACKAGE,
        ]),
        "Read the compiler output above.",
    )?;
    step.done();
    Ok(())
}

/// `cargo xtask bench [--quick] [rtgw-bench args]`.
pub fn bench(paths: &Paths, quick: bool, extra: &[String]) -> Result<()> {
    build(paths)?;
    let mut cmd = std::process::Command::new(paths.bin(BENCH_BIN, Profile::Release));
    if quick {
        cmd.arg("--quick");
    } else {
        // The cost per packet without I/O, handed to the report (section 2c).
        let v = crate::bench_virtual::measure(paths)?;
        let file = paths.scratch().join("bench").join("virtual-cost.json");
        std::fs::create_dir_all(file.parent().expect("a parent"))?;
        std::fs::write(&file, serde_json::to_string_pretty(&v)?)?;
        cmd.arg("--virtual-cost").arg(&file);
    }
    cmd.args(extra).current_dir(&paths.root);
    run(&mut cmd, "The benchmark failed; its output is above.")
}

/// The smoke pass of `xtask test`: quick mode on the dev binaries, docs untouched.
pub fn smoke(paths: &Paths) -> Result<String> {
    let mut cmd = std::process::Command::new(paths.bin(BENCH_BIN, Profile::Dev));
    cmd.args(["--quick", "--dev-binaries", "--no-doc"])
        .current_dir(&paths.root);
    run(
        &mut cmd,
        "The benchmark smoke run failed; its output is above.",
    )?;
    Ok("quick run on dev binaries: every section got calls through".into())
}
