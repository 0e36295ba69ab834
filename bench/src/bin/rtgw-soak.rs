//! `rtgw-soak`: the churn soak of the realtime WebRTC gateway (run through `cargo xtask
//! soak`). Starts its own stack (echo model + relay + Envoy with the filter) on free loopback
//! ports, runs the calls (bench/src/soak), prints a table of every figure from the start to
//! the drain, writes `bench-results/soak-<timestamp>.json`, and fails when a figure did not
//! come back to its baseline or a call that should have worked did not.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rtgw_bench::soak::call::{Gateway, Timing};
use rtgw_bench::soak::probe::Probe;
use rtgw_bench::soak::{self, Plan, StackTimeouts};
use rtgw_bench::{filter, say, sys, timestamp, START, TOOL};
use xtask::envoy::DEFAULT_MODEL;
use xtask::paths::{Paths, Profile};
use xtask::stack::{Stack, StackConfig};

/// The relay's ICE and peer timeouts in the soak: its defaults.
const ICE_TIMEOUT_SECS: u64 = 15;
const PEER_TIMEOUT_SECS: u64 = 15;
/// Upstream keep-alive connections idle out quickly, so the drain need not wait 90 s.
const POOL_IDLE_SECS: u64 = 2;
/// The relay's ring of ended calls (its default).
const ENDED_CALLS_KEPT: usize = 1000;

#[derive(Parser, Debug)]
#[command(
    name = "rtgw-soak",
    about = "Churn soak: thousands of calls through one gateway, then a check that nothing leaked"
)]
struct Cli {
    /// Calls that connect, send audio and events, and hang up through the gateway.
    #[arg(long, default_value_t = 10_000)]
    calls: usize,
    /// Calls whose client vanishes without a hangup (default: a tenth of --calls).
    #[arg(long)]
    vanish: Option<usize>,
    /// Creates that never connect (default: a tenth of --calls).
    #[arg(long)]
    never_connect: Option<usize>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 75)]
    concurrency: usize,
    /// Seconds of audio (and one priced event a second) per complete call.
    #[arg(long, default_value_t = 3.0)]
    audio_secs: f64,
    /// Warm-up calls before the baseline. Default: enough for the run to reach its steady
    /// state (calls the relay is still timing out, up to --ice-timeout + --peer-timeout,
    /// pile up on top of those in flight): 1.5 times that span of calls at --concurrency.
    #[arg(long)]
    warmup: Option<usize>,
    /// A sample every this many complete calls (default: a tenth of --calls, at most 1,000).
    #[arg(long)]
    sample_every: Option<usize>,
    /// Run the dev-profile relay and echo model (the CI pass) instead of release.
    #[arg(long)]
    dev_binaries: bool,
}

/// Calls that keep `concurrency` in flight for 1.5 times the longest an abandoned call
/// stays on the relay (a complete call lasts about its audio plus half a second of setup
/// and hangup).
fn steady_state_warmup(concurrency: usize, audio_secs: f64) -> usize {
    let span = 1.5 * (ICE_TIMEOUT_SECS + PEER_TIMEOUT_SECS) as f64;
    let per_call = audio_secs.max(0.1) + 0.5;
    ((span / per_call * concurrency as f64).ceil() as usize).max(100)
}

fn main() -> ExitCode {
    let _ = START.get_or_init(Instant::now);
    let _ = TOOL.set("soak");
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtgw-soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let paths = Paths::discover();
    let profile = if cli.dev_binaries {
        Profile::Dev
    } else {
        Profile::Release
    };
    let plan = Plan {
        complete: cli.calls,
        vanish: cli.vanish.unwrap_or(cli.calls / 10),
        never_connect: cli.never_connect.unwrap_or(cli.calls / 10),
        concurrency: cli.concurrency.max(1),
        warmup: cli
            .warmup
            .unwrap_or_else(|| steady_state_warmup(cli.concurrency, cli.audio_secs)),
        sample_every: cli.sample_every.unwrap_or((cli.calls / 10).clamp(1, 1000)),
        timing: Timing {
            audio: Duration::from_secs_f64(cli.audio_secs.max(0.1)),
            vanish_after: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(10),
            settle_timeout: Duration::from_secs(5),
        },
    };
    let stamp = timestamp();
    let machine = sys::machine(&paths.envoy_bin(), &paths.root);
    say(format!("machine: {machine}; load {}", sys::loadavg()));

    let mut cfg = StackConfig::ephemeral(&paths, "soak")?;
    cfg.profile = profile;
    cfg.run_dir = paths.scratch().join("soak").join(&stamp);
    std::fs::create_dir_all(&cfg.run_dir)?;
    // Envoy's listener-wide token bucket (100 creates/s) is not what this measures.
    let template = std::fs::read_to_string(paths.envoy_dir().join("envoy.yaml"))?;
    let raised = cfg.run_dir.join("envoy.soak.yaml");
    std::fs::write(&raised, filter::raise_rate_limit(&template)?)?;
    cfg.envoy_config = raised;
    cfg.relay_args = [
        ("--ice-timeout-secs", ICE_TIMEOUT_SECS.to_string()),
        ("--peer-timeout-secs", PEER_TIMEOUT_SECS.to_string()),
        ("--upstream-pool-idle-secs", POOL_IDLE_SECS.to_string()),
        ("--ended-calls-kept", ENDED_CALLS_KEPT.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect();
    say(format!(
        "starting echo model + relay + Envoy ({})",
        profile.dir()
    ));
    say(format!("logs in {}", cfg.run_dir.display()));
    let mut stack = Stack::start(&paths, cfg)?;
    let pid_of = |name: &str| {
        stack
            .processes()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .and_then(|(_, p, _)| p)
            .with_context(|| format!("no {name} process in the stack"))
    };
    // The callers' connections to Envoy idle out as fast as the relay's upstream ones, so the
    // baseline and the drained sample both see none of them (Envoy's fds count them).
    let gateway_http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(POOL_IDLE_SECS))
        .build()?;
    let probe_http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(1)
        .build()?;
    let gateway = Gateway {
        http: gateway_http,
        calls_url: stack.urls.calls.clone(),
        model: DEFAULT_MODEL.to_string(),
    };
    let probe = Probe {
        relay_pid: pid_of("relay")?,
        relay_metrics: stack.urls.relay_metrics.clone(),
        envoy_pid: pid_of("envoy")?,
        envoy_stats: format!(
            "{}/stats/prometheus",
            stack.urls.envoy_admin.trim_end_matches('/')
        ),
        http: probe_http,
    };
    let timeouts = StackTimeouts {
        longest_abandoned_call: Duration::from_secs(ICE_TIMEOUT_SECS + PEER_TIMEOUT_SECS),
        upstream_pool_idle: Duration::from_secs(POOL_IDLE_SECS),
        caps: BTreeMap::from([(
            "relay.calls_ended_kept".to_string(),
            ENDED_CALLS_KEPT as f64,
        )]),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(soak::run(gateway, probe, &plan, &timeouts));
    if let Some(crashed) = stack.check_alive() {
        bail!("a stack process exited during the soak: {crashed}");
    }
    stack.stop();
    drop(rt);
    let report = report?;

    let table = soak::verdict::table(&report.samples, &report.rows);
    println!("\n{table}");
    let mut doc = report.json;
    doc["timestamp"] = stamp.clone().into();
    doc["binaries"] = profile.dir().into();
    doc["machine"] = machine;
    doc["table_markdown"] = table.into();
    let out_dir = paths.root.join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(format!("soak-{stamp}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    say(format!("wrote {}", out.display()));
    println!(
        "calls ok {}; failed {}; ended by reason {}; relay counters during the calls {}; UDP buffer drops on the machine {} in, {} out; {} calls/s; drain {} s",
        doc["calls_ok"],
        doc["calls_failed"],
        doc["ended_by_reason"],
        doc["relay_counters_during_calls"],
        doc["machine_udp_rcvbuf_errors_during_calls"],
        doc["machine_udp_sndbuf_errors_during_calls"],
        doc["calls_per_sec"],
        doc["drain_secs"]
    );
    if !report.problems.is_empty() {
        bail!(
            "{} problem(s):\n  {}",
            report.problems.len(),
            report.problems.join("\n  ")
        );
    }
    println!("soak passed: every figure came back to its baseline");
    Ok(())
}
