//! `xtask leakcheck`: the relay's and the filter core's tests (unit and integration, the
//! relay binaries they start included) built with LeakSanitizer (nightly `-Zsanitizer=leak`)
//! and run once. LeakSanitizer reports every allocation unreachable at a process's exit and
//! makes it fail; docs/reliability.md records the result.

use std::process::Command;

use anyhow::Result;

use crate::fuzz::{ensure_nightly, proxy_cargo};
use crate::paths::Paths;
use crate::ui::Step;

/// The host target, named so the sanitizer flag reaches only target code (build scripts
/// and proc macros stay unsanitized).
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";
const PACKAGES: [&str; 2] = ["relay-service", "realtime-filter-core"];

/// A program that leaks one allocation: built and run like the tests, it must fail with
/// LeakSanitizer's exit code, or the check proves nothing.
const CANARY: &str = "fn main() { let b = Box::new([7u8; 4096]); std::mem::forget(b); }\n";
const LEAK_EXIT_CODE: i32 = 23;

/// Builds and runs [`CANARY`] under LeakSanitizer; fails unless the leak is reported.
fn canary(paths: &Paths) -> Result<()> {
    let dir = paths.scratch().join("leakcheck");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("canary.rs");
    let bin = dir.join("canary");
    std::fs::write(&src, CANARY)?;
    let mut rustc = proxy_cargo(Command::new("rustc"), &dir, &paths.target.join("leakcheck"));
    rustc
        .args([
            "+nightly",
            "-Zsanitizer=leak",
            "--target",
            HOST_TARGET,
            "-o",
        ])
        .arg(&bin)
        .arg(&src);
    crate::process::run(&mut rustc, "The leak canary did not build.")?;
    let out = Command::new(&bin)
        .env("LSAN_OPTIONS", format!("exitcode={LEAK_EXIT_CODE}"))
        .output()?;
    let report = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(LEAK_EXIT_CODE) || !report.contains("LeakSanitizer") {
        anyhow::bail!(
            "LeakSanitizer did not report the canary's leak ({}): the check would prove nothing",
            out.status
        );
    }
    Ok(())
}

pub fn run(paths: &Paths) -> Result<String> {
    ensure_nightly()?;
    let step = Step::new("LeakSanitizer reports a deliberate leak (canary)");
    canary(paths)?;
    step.done();
    let step = Step::new(format!(
        "tests of {} under LeakSanitizer (nightly)",
        PACKAGES.join(", ")
    ));
    let mut cmd = proxy_cargo(
        Command::new("cargo"),
        &paths.root,
        &paths.target.join("leakcheck"),
    );
    cmd.args(["+nightly", "test", "--target", HOST_TARGET]);
    for p in PACKAGES {
        cmd.args(["-p", p]);
    }
    cmd.env("RUSTFLAGS", "-Zsanitizer=leak")
        .env("RUSTDOCFLAGS", "-Zsanitizer=leak")
        // Report leaks at exit; fail the process that has any.
        .env(
            "LSAN_OPTIONS",
            format!("exitcode={LEAK_EXIT_CODE}:report_objects=1"),
        );
    crate::process::run(
        &mut cmd,
        "A test failed or LeakSanitizer found a leak (its report is above).",
    )?;
    step.done();
    Ok(format!(
        "no leak in the tests of {} (LeakSanitizer; it reported the canary's)",
        PACKAGES.join(", ")
    ))
}
