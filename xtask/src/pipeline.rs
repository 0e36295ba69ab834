//! `xtask test`: every check CI runs, in one place, with a closing summary.
//!
//! Steps that do not depend on each other all run even when one fails (a formatting slip
//! should not hide a failing test); a step whose input failed is skipped and says why.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::compile::{build_filter, cargo};
use crate::envoy::{self, Vars};
use crate::manifests;
use crate::paths::{Paths, FILTER_PACKAGE, WASM_TARGET};
use crate::process::{run, spawn_error};
use crate::setup::{self, SetupOptions};
use crate::ui::{line, Step};

/// Largest demo page we accept: Envoy serves it with `direct_response`, whose route config
/// limit `max_direct_response_body_size_bytes` must be raised to at least this.
pub const DEMO_PAGE_MAX_BYTES: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, Default)]
pub struct TestOptions {
    pub browser: bool,
}

#[derive(Debug)]
enum Outcome {
    Pass(String),
    Fail(String),
    Skip(String),
}

struct Record {
    name: &'static str,
    outcome: Outcome,
    secs: f64,
}

#[derive(Default)]
struct Pipeline {
    records: Vec<Record>,
}

impl Pipeline {
    /// Runs one step; returns whether it passed.
    fn step(&mut self, name: &'static str, f: impl FnOnce() -> Result<String>) -> bool {
        let step = Step::new(name);
        let start = Instant::now();
        let outcome = match f() {
            Ok(note) => Outcome::Pass(note),
            Err(e) => {
                line(format!("    FAIL {name}: {e:#}"));
                Outcome::Fail(format!("{e:#}"))
            }
        };
        let passed = matches!(outcome, Outcome::Pass(_));
        if passed {
            step.done();
        }
        self.records.push(Record {
            name,
            outcome,
            secs: start.elapsed().as_secs_f64(),
        });
        passed
    }

    fn skip(&mut self, name: &'static str, why: &str) {
        line(format!("    skip {name}: {why}"));
        self.records.push(Record {
            name,
            outcome: Outcome::Skip(why.to_string()),
            secs: 0.0,
        });
    }

    fn failed(&self) -> usize {
        self.records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Fail(_)))
            .count()
    }

    fn summary(&self, tests: Option<TestCounts>) {
        eprintln!();
        eprintln!("──── cargo xtask test: summary ────");
        for r in &self.records {
            let (tag, note) = match &r.outcome {
                Outcome::Pass(n) => ("ok  ", n.as_str()),
                Outcome::Fail(n) => ("FAIL", n.lines().next().unwrap_or_default()),
                Outcome::Skip(n) => ("skip", n.as_str()),
            };
            let note = if note.is_empty() {
                String::new()
            } else if note.chars().count() > 160 {
                // The full text is above, where the step failed.
                format!(" — {}…", note.chars().take(160).collect::<String>())
            } else {
                format!(" — {note}")
            };
            eprintln!("  {tag} {:<44} {:>7.1}s{note}", r.name, r.secs);
        }
        eprintln!(
            "  total {:.1}s; {} step(s) failed",
            crate::ui::elapsed_secs(),
            self.failed()
        );
        if let Some(t) = tests {
            // The closing line: the workspace's test totals (all test binaries together).
            println!(
                "tests: {} passed, {} failed, {} skipped",
                t.passed, t.failed, t.ignored
            );
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// Adds up one libtest line such as
/// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
pub fn add_result_line(counts: &mut TestCounts, line: &str) {
    let Some(rest) = line.trim().strip_prefix("test result: ") else {
        return;
    };
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        let (num, what) = match words.as_slice() {
            [_, n, w, ..] if n.parse::<u64>().is_ok() => (*n, *w),
            [n, w, ..] => (*n, *w),
            _ => continue,
        };
        let Ok(n) = num.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed += n,
            "failed" => counts.failed += n,
            "ignored" => counts.ignored += n,
            _ => {}
        }
    }
}

/// `cargo test --workspace`. The end-to-end tests find the artifacts through xtask's own
/// [`Paths`], as `cargo xtask up` does.
fn cargo_test(counts: &mut TestCounts) -> Result<String> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| spawn_error(&cmd, &e, "cargo must be on PATH"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from cargo test"))?;
    for l in BufReader::new(stdout).lines() {
        let l = l.context("reading cargo test output")?;
        println!("{l}");
        add_result_line(counts, &l);
    }
    let status = child.wait().context("waiting for cargo test")?;
    let note = format!(
        "{} passed, {} failed, {} ignored",
        counts.passed, counts.failed, counts.ignored
    );
    if !status.success() {
        bail!("cargo test failed ({note}); the failing tests are listed above");
    }
    if counts.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(note)
}

fn validate_envoy_configs(paths: &Paths) -> Result<String> {
    let vars = Vars::local(paths);
    // What `cargo xtask up --upstream URL` renders: every model routed to the provider.
    let mut upstream_vars = Vars::local(paths);
    upstream_vars
        .set_provider("https://api.openai.com")?
        .route_every_model();
    let found = envoy::discover(&paths.envoy_dir(), &vars)?;
    let mut ok = 0;
    let mut problems = Vec::new();
    for f in &found {
        let rel = f.path.strip_prefix(&paths.root).unwrap_or(&f.path);
        if !f.bootstrap {
            line(format!(
                "    {} is not a bootstrap config; not validated",
                rel.display()
            ));
            continue;
        }
        match envoy::validate(paths, &f.path, &vars) {
            Ok(verdict) => {
                line(format!("    {}: {verdict}", rel.display()));
                ok += 1;
            }
            Err(e) => problems.push(format!("{}: {e:#}", rel.display())),
        }
        let text = std::fs::read_to_string(&f.path).unwrap_or_default();
        if text.contains("${CATCH_ALL_MODEL}") {
            match envoy::validate(paths, &f.path, &upstream_vars) {
                Ok(verdict) => line(format!(
                    "    {} as `up --upstream`: {verdict}",
                    rel.display()
                )),
                Err(e) => problems.push(format!("{} as `up --upstream`: {e:#}", rel.display())),
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    if ok == 0 {
        return Ok("no Envoy bootstrap config under envoy/ yet".into());
    }
    Ok(format!("{ok} config(s) valid"))
}

/// Runs the Envoy fragments of the Istio EnvoyFilters through `envoy --mode validate`.
pub fn validate_envoy_filter_fragments(paths: &Paths) -> Result<String> {
    let Some(text) = manifests::envoy_filter_bootstrap(&paths.deploy_dir())? else {
        return Ok("no EnvoyFilter patches".into());
    };
    let file = paths.scratch().join("deploy-envoyfilters.bootstrap.yaml");
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&file, text)?;
    envoy::validate_rendered(
        paths,
        &file,
        &format!(
            "An EnvoyFilter under deploy/ patches in config Envoy rejects (checked bootstrap: {}).",
            file.display()
        ),
    )
}

/// Checks the demo page is self-contained and small enough for Envoy's direct_response.
pub fn check_demo_page(paths: &Paths) -> Result<String> {
    let page = paths.demo_page();
    let text = std::fs::read_to_string(&page)
        .with_context(|| format!("reading the demo page {}", page.display()))?;
    let size = text.len() as u64;
    if size > DEMO_PAGE_MAX_BYTES {
        bail!(
            "{} is {size} bytes; keep it under {DEMO_PAGE_MAX_BYTES} (Envoy serves it with \
             direct_response)",
            page.display()
        );
    }
    let lower = text.to_ascii_lowercase();
    for needle in [
        "src=\"http",
        "src='http",
        "href=\"http",
        "href='http",
        "url(http",
        "@import",
        "src=\"//",
        "href=\"//",
    ] {
        if lower.contains(needle) {
            bail!(
                "{} loads something from elsewhere (`{needle}`): the page must be self-contained",
                page.display()
            );
        }
    }
    if !text.contains("window.demo") {
        bail!(
            "{} does not expose window.demo for automation",
            page.display()
        );
    }
    Ok(format!("{size} bytes, self-contained"))
}

/// Whether the local Envoy config has the demo page route (it names `${DEMO_PAGE}`).
fn serves_demo_page(paths: &Paths) -> bool {
    std::fs::read_to_string(paths.envoy_dir().join("envoy.yaml"))
        .is_ok_and(|text| text.contains("${DEMO_PAGE}"))
}

/// Runs everything; `Ok(())` only if every step passed.
pub fn test(paths: &Paths, opts: TestOptions) -> Result<()> {
    let mut p = Pipeline::default();
    // Chromium before `cargo test` too: the topology test drives it on its client host.
    let browser = opts.browser || std::env::var("CI").is_ok_and(|v| v == "true");
    let setup_ok = p.step("setup", || {
        setup::setup(paths, SetupOptions { browser }).map(|_| String::new())
    });
    if !setup_ok {
        p.summary(None);
        bail!("setup failed; nothing else can run");
    }
    p.step("rustfmt", || {
        run(
            cargo().args(["fmt", "--all", "--", "--check"]),
            "Run `cargo fmt --all` and commit the result.",
        )
        .map(|_| String::new())
    });
    // The patched proxy-wasm SDK is its own workspace (vendor/proxy-wasm/README.vendor.md):
    // its tests, the patch's included, run as upstream runs them.
    p.step("vendored proxy-wasm SDK tests", || {
        run(
            cargo().args(["test", "--manifest-path", "vendor/proxy-wasm/Cargo.toml"]),
            "The patched proxy-wasm SDK's tests failed (vendor/proxy-wasm).",
        )
        .map(|_| String::new())
    });
    p.step("clippy (workspace, native)", || {
        run(
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            "Fix the clippy findings above.",
        )
        .map(|_| String::new())
    });
    let wasm_ok = p.step("build filter (wasm32-wasip1)", || {
        build_filter(paths).map(|_| {
            let size = std::fs::metadata(paths.filter_wasm())
                .map(|m| m.len())
                .unwrap_or(0);
            format!("{} KiB", size / 1024)
        })
    });
    p.step("clippy (filter, wasm32-wasip1)", || {
        run(
            cargo().args([
                "clippy",
                "--target",
                WASM_TARGET,
                "-p",
                FILTER_PACKAGE,
                "--",
                "-D",
                "warnings",
            ]),
            "Fix the clippy findings above.",
        )
        .map(|_| String::new())
    });
    if wasm_ok {
        p.step("envoy --mode validate (envoy/)", || {
            validate_envoy_configs(paths)
        });
    } else {
        p.skip("envoy --mode validate (envoy/)", "the filter did not build");
    }
    p.step("deploy/ manifests (YAML, kinds)", || {
        manifests::check_dir(&paths.deploy_dir()).map(|r| r.to_string())
    });
    p.step("deploy/ CORS policy and hold = envoy/envoy.yaml's", || {
        let all = manifests::load(&paths.deploy_dir())?;
        let envoy_yaml = paths.envoy_dir().join("envoy.yaml");
        let cors = crate::istio_checks::check_cors(&all, &envoy_yaml)?;
        let hold = crate::istio_checks::check_hold_matches_envoy(&all, &envoy_yaml)?;
        Ok(format!("{cors}; {hold}"))
    });
    p.step("deploy/ schemas (Kubernetes, Istio CRDs)", || {
        crate::schemas::validate_dir(paths, &paths.deploy_dir())
    });
    p.step("envoy --mode validate (deploy/ EnvoyFilters)", || {
        validate_envoy_filter_fragments(paths)
    });
    p.step(
        "deploy/observability (promtool: configs, rules, alert tests)",
        || crate::prometheus::promtool_checks(paths),
    );
    p.step("web/ demo page", || check_demo_page(paths));
    let built = p.step("build binaries and tests", || {
        // Same feature set as `cargo test --workspace` (dev-dependencies active), so the test
        // run below reuses these artifacts; the real binaries are what the e2e tests start.
        run(
            cargo().args(["build", "--workspace", "--bins", "--tests"]),
            "Read the compiler output above.",
        )
        .map(|_| String::new())
    });
    let mut counts = TestCounts::default();
    if built {
        p.step("cargo test --workspace", || cargo_test(&mut counts));
    } else {
        p.skip("cargo test --workspace", "the build failed");
    }
    // Every fuzz target briefly: the seeds replayed, then a few seconds of mutation (long runs:
    // `cargo xtask fuzz`, docs/reliability.md "Fuzzing").
    if crate::fuzz::present(&paths.root) {
        p.step("fuzz smoke (every target, 5 s each)", || {
            let runs = crate::fuzz::run(paths, 5, None, crate::fuzz::Schedule::OneByOne)?;
            Ok(runs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "))
        });
    }
    if built && wasm_ok {
        p.step("bench --quick (smoke, dev binaries)", || {
            crate::bench::smoke(paths)
        });
    } else {
        p.skip("bench --quick (smoke, dev binaries)", "the build failed");
    }
    if built && wasm_ok {
        p.step("soak (500 calls, dev binaries)", || {
            crate::soak::ci_pass(paths)
        });
    } else {
        p.skip("soak (500 calls, dev binaries)", "the build failed");
    }
    if !browser {
        p.skip(
            "browser demo (headless Chromium)",
            "run with --browser (CI=true runs it)",
        );
    } else if !built || !wasm_ok {
        p.skip("browser demo (headless Chromium)", "the build failed");
    } else if !serves_demo_page(paths) {
        p.skip(
            "browser demo (headless Chromium)",
            "envoy/envoy.yaml does not serve the demo page (${DEMO_PAGE}) yet",
        );
    } else {
        p.step("browser demo (headless Chromium)", || {
            setup::chromium()?;
            let reports = crate::browser::demo_call_on_stack(paths)?;
            Ok(reports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"))
        });
    }
    p.summary(Some(counts));
    let failed = p.failed();
    if failed > 0 {
        bail!("{failed} step(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_result_lines_are_added_up() {
        let mut c = TestCounts::default();
        add_result_line(
            &mut c,
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        add_result_line(
            &mut c,
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        add_result_line(&mut c, "running 3 tests");
        assert_eq!(
            c,
            TestCounts {
                passed: 5,
                failed: 1,
                ignored: 1
            }
        );
    }

    #[test]
    fn the_demo_page_is_self_contained_and_small() {
        check_demo_page(&Paths::discover()).unwrap();
    }
}
