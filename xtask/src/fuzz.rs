//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (cargo fuzz, nightly toolchain), each
//! for a bounded time, starting from the committed seeds (`fuzz/corpus/<target>`, replayed
//! first) and a working corpus under the target directory (new inputs go there, never into
//! the repository). A crash fails the run and names libFuzzer's reproducer file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::paths::{Paths, CARGO_FUZZ_VERSION};
use crate::ui::{line, Step};

/// The targets, as `fuzz/Cargo.toml` lists them (`[[bin]] name = …`).
pub fn targets(paths: &Paths) -> Result<Vec<String>> {
    let manifest = paths.root.join("fuzz").join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .filter(|name| *name != "realtime-gateway-fuzz")
        .map(str::to_string)
        .collect())
}

/// `cargo` of the rustup proxy, for `+nightly`: the environment `cargo xtask` runs in names
/// the stable toolchain's own binaries, which take no `+toolchain`.
fn rustup_cargo(paths: &Paths) -> Command {
    proxy_cargo(
        Command::new("cargo"),
        &paths.root.join("fuzz"),
        &paths.target.join("fuzz"),
    )
}

/// [`rustup_cargo`] at the lowest CPU priority (`nice -n 19`): long runs side by side yield
/// the machine to everything else.
fn niced_rustup_cargo(paths: &Paths) -> Command {
    let mut nice = Command::new("nice");
    nice.args(["-n", "19", "cargo"]);
    proxy_cargo(nice, &paths.root.join("fuzz"), &paths.target.join("fuzz"))
}

/// `cmd` (which runs the rustup proxy `cargo`) without the toolchain-pinning environment of
/// `cargo xtask`, in `dir`, building into `target_dir`.
pub fn proxy_cargo(mut cmd: Command, dir: &Path, target_dir: &Path) -> Command {
    cmd.current_dir(dir)
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_BUILD_TARGET")
        .env("CARGO_TARGET_DIR", target_dir);
    cmd
}

/// The nightly toolchain (minimal profile), installed if missing: libFuzzer and the
/// sanitizers need its `-Z` flags. Idempotent.
pub fn ensure_nightly() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        line("    rustup toolchain install nightly --profile minimal");
        crate::process::run(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "rustup could not install the nightly toolchain (cargo fuzz needs it).",
        )?;
    }
    Ok(())
}

/// The nightly toolchain and the pinned cargo-fuzz (libFuzzer needs nightly's sanitizer
/// flags), installed if missing. Idempotent.
pub fn setup(paths: &Paths) -> Result<()> {
    let step = Step::new(format!(
        "nightly Rust toolchain and cargo-fuzz {CARGO_FUZZ_VERSION}"
    ));
    ensure_nightly()?;
    let have = rustup_cargo(paths)
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if have.contains(CARGO_FUZZ_VERSION) {
        step.skip("already installed");
        return Ok(());
    }
    line(format!(
        "    cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked (a few minutes)"
    ));
    crate::process::run(
        Command::new("cargo")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ]),
        "cargo could not install cargo-fuzz from crates.io.",
    )?;
    step.done();
    Ok(())
}

/// One target's run.
#[derive(Debug)]
pub struct FuzzRun {
    pub target: String,
    pub runs: u64,
    pub seconds: u64,
    /// CPU time the run got (user + system, the fuzzer included).
    pub cpu_seconds: f64,
    /// libFuzzer's last `cov:` (edges covered) figure.
    pub coverage: Option<u64>,
}

impl std::fmt::Display for FuzzRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} runs in {} s ({:.0} CPU s), coverage {}",
            self.target,
            self.runs,
            self.seconds,
            self.cpu_seconds,
            self.coverage
                .map_or_else(|| "?".to_string(), |c| c.to_string())
        )
    }
}

/// The last `#N … cov: C` line's coverage, and `Done N runs in S second(s)`.
fn figures(output: &str) -> (u64, u64, Option<u64>) {
    let coverage = output
        .lines()
        .rev()
        .find_map(|l| l.split("cov: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|c| c.parse().ok());
    let done = output.lines().rev().find_map(|l| {
        let rest = l.strip_prefix("Done ")?;
        let (runs, rest) = rest.split_once(" runs in ")?;
        let secs = rest.split_whitespace().next()?;
        Some((runs.parse().ok()?, secs.parse().ok()?))
    });
    let (runs, seconds) = done.unwrap_or((0, 0));
    (runs, seconds, coverage)
}

fn work_corpus(paths: &Paths, target: &str) -> Result<PathBuf> {
    let dir = paths.scratch().join("fuzz").join("corpus").join(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// How the chosen targets share the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// One after the other, each with the machine to itself.
    OneByOne,
    /// All at once at `nice 19` (the long runs of docs/reliability.md).
    AllAtOnce,
}

/// A target's fuzzer, started; its output goes to `log`.
struct Started {
    target: String,
    child: std::process::Child,
    log: PathBuf,
    artifacts: PathBuf,
    began: Instant,
}

fn start(paths: &Paths, target: &str, seconds: u64, schedule: Schedule) -> Result<Started> {
    let seeds = paths.root.join("fuzz").join("corpus").join(target);
    let work = work_corpus(paths, target)?;
    let artifacts = paths.scratch().join("fuzz").join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    let logs = paths.scratch().join("fuzz").join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join(format!("{target}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = match schedule {
        Schedule::OneByOne => rustup_cargo(paths),
        Schedule::AllAtOnce => niced_rustup_cargo(paths),
    };
    cmd.args(["+nightly", "fuzz", "run", "-O", target])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd.spawn().context("running cargo fuzz")?;
    Ok(Started {
        target: target.to_string(),
        child,
        log,
        artifacts,
        began: Instant::now(),
    })
}

/// Waits for the child and reads its exit status and CPU time (its own and its reaped
/// descendants': the fuzzer runs under `cargo fuzz`).
fn wait_with_cpu(child: &std::process::Child) -> Result<(bool, f64)> {
    let pid = libc::pid_t::try_from(child.id()).context("pid")?;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for a child this process spawned and has not waited for.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 on cargo fuzz: {}", std::io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, secs(usage.ru_utime) + secs(usage.ru_stime)))
}

fn finish(s: Started) -> Result<FuzzRun> {
    let (ok, cpu_seconds) = wait_with_cpu(&s.child)?;
    let text = std::fs::read_to_string(&s.log).unwrap_or_default();
    if !ok {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {} failed after {:.0?} (reproducers in {}, log {}):\n{}",
            s.target,
            s.began.elapsed(),
            s.artifacts.display(),
            s.log.display(),
            tail.join("\n")
        );
    }
    let (runs, seconds, coverage) = figures(&text);
    let run = FuzzRun {
        target: s.target,
        runs,
        seconds,
        cpu_seconds,
        coverage,
    };
    line(format!("    {run}"));
    Ok(run)
}

/// Builds the targets once (release, with debug info), then runs `only` (or every target)
/// for `seconds` each, one by one or all at once.
pub fn run(
    paths: &Paths,
    seconds: u64,
    only: Option<&str>,
    schedule: Schedule,
) -> Result<Vec<FuzzRun>> {
    setup(paths)?;
    let all = targets(paths)?;
    let chosen: Vec<String> = match only {
        Some(t) if all.iter().any(|x| x == t) => vec![t.to_string()],
        Some(t) => bail!("no fuzz target `{t}`; there are: {}", all.join(", ")),
        None => all,
    };
    let step = Step::new("cargo fuzz build (nightly, release)");
    crate::process::run(
        rustup_cargo(paths).args(["+nightly", "fuzz", "build", "-O"]),
        "The fuzz targets did not build (fuzz/).",
    )?;
    step.done();
    match schedule {
        Schedule::OneByOne => chosen
            .iter()
            .map(|t| finish(start(paths, t, seconds, schedule)?))
            .collect(),
        Schedule::AllAtOnce => {
            line(format!(
                "    {} targets at once for {seconds} s, at nice 19 (logs in {})",
                chosen.len(),
                paths.scratch().join("fuzz").join("logs").display()
            ));
            let started: Vec<Started> = chosen
                .iter()
                .map(|t| start(paths, t, seconds, schedule))
                .collect::<Result<_>>()?;
            // Every child is waited for, even after one failed.
            let results: Vec<Result<FuzzRun>> = started.into_iter().map(finish).collect();
            results.into_iter().collect()
        }
    }
}

/// Whether `fuzz/` exists (a checkout without it has nothing to fuzz).
pub fn present(root: &Path) -> bool {
    root.join("fuzz").join("Cargo.toml").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzers_summary_gives_runs_seconds_and_coverage() {
        let out = "#2\tINITED cov: 120 ft: 130 corp: 10/1kb\n#4096\tpulse  cov: 250 ft: 300\nDone 217146 runs in 21 second(s)\n";
        assert_eq!(figures(out), (217146, 21, Some(250)));
        assert_eq!(figures("garbage"), (0, 0, None));
    }

    #[test]
    fn the_targets_are_read_from_the_fuzz_manifest() {
        let t = targets(&Paths::discover()).unwrap();
        assert!(t.contains(&"filter_request".to_string()), "{t:?}");
        assert!(!t.iter().any(|x| x == "realtime-gateway-fuzz"));
    }
}
