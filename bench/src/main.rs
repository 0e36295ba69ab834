//! `rtgw-bench`: benchmarks of the realtime WebRTC gateway (run through `cargo xtask bench`).
//!
//! 1. call setup latency, direct to the echo provider vs through Envoy + filter + relay;
//! 2. relay capacity: concurrent calls with audio both ways and data-channel events;
//! 3. call-setup rate over gRPC;
//! 4. filter cost on pass-through requests.
//!
//! CPU layout on a machine with two or more cores: this process (load generator, in-process
//! echo provider), the echo-model binary and the call-setup Envoy run on CPU 0; the relay
//! under test (and the pass-through Envoys) run alone on CPU 1. Results go to
//! `bench-results/<timestamp>.json`; a full run also rewrites the generated section of
//! `docs/benchmarks.md`.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rtgw_bench::{
    callgrind, capacity, filter, floor, janus, report, say, setup, sys, timestamp, versus, START,
};
use serde_json::{json, Value};
use std::time::Instant;
use xtask::paths::{Paths, Profile};
use xtask::stack::{Stack, StackConfig, LOCAL_ECHO_API_KEY};

#[derive(Parser, Debug)]
#[command(
    name = "rtgw-bench",
    about = "Benchmarks of the realtime WebRTC gateway"
)]
struct Cli {
    /// Smoke run: small counts, about a minute; does not touch docs/benchmarks.md.
    #[arg(long)]
    quick: bool,
    /// Capacity levels (concurrent calls), comma separated.
    #[arg(long, value_delimiter = ',')]
    levels: Option<Vec<usize>>,
    /// Sections to run (setup, capacity, floor, janus, callgrind, metering, filter); default
    /// all. `versus` (two relay builds taking turns, with `--versus`) runs only when named.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// The relay build to compare with `--relay-bin` (or the workspace's build) in the
    /// `versus` section: both take turns at the first of `--levels` calls (default 300),
    /// `--versus-rounds` times each, and each is reported as the median of its rounds, also
    /// relative to the load generator's CPU per packet (which evens out the machine's drift).
    #[arg(long)]
    versus: Option<std::path::PathBuf>,
    /// Rounds per build of the `versus` section.
    #[arg(long, default_value_t = 3)]
    versus_rounds: usize,
    /// Rewrite the generated section of docs/benchmarks.md even in --quick mode.
    #[arg(long)]
    doc: bool,
    /// Do not rewrite docs/benchmarks.md.
    #[arg(long, conflicts_with = "doc")]
    no_doc: bool,
    /// Use the dev-profile relay and echo model (the smoke pass of `xtask test`; its
    /// figures mean nothing).
    #[arg(long)]
    dev_binaries: bool,
    /// Capacity: bind the relay's media port on 0.0.0.0 advertising 127.0.0.1, so every
    /// client-leg datagram takes the packet-info path (recvmsg/sendmsg with the arrival
    /// address as source) instead of recvfrom/sendto.
    #[arg(long)]
    relay_media_unspecified: bool,
    /// The relay binary to measure instead of the workspace's own build (capacity,
    /// callgrind, metering): an older build, for a before/after comparison.
    #[arg(long)]
    relay_bin: Option<std::path::PathBuf>,
    /// Levels (calls) of the callgrind section (the relay under callgrind, instructions per
    /// relayed packet), comma separated. Under callgrind the current relay keeps up with 50
    /// calls on one core here, the per-call-task build of `2e42c60` with 20, neither with 100.
    #[arg(long, value_delimiter = ',', default_values_t = [5, 20])]
    callgrind_calls: Vec<usize>,
    /// The relay's cost per packet without I/O, measured by `cargo xtask bench` (JSON):
    /// reported beside the capacity figures.
    #[arg(long)]
    virtual_cost: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let _ = START.get_or_init(Instant::now);
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtgw-bench: {e:#}");
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
    let relay_bin = cli
        .relay_bin
        .clone()
        .unwrap_or_else(|| paths.relay_bin(profile));
    let wants = |s: &str| cli.only.as_ref().is_none_or(|o| o.iter().any(|x| x == s));
    let two_cores = sys::online_cpus() >= 2;
    let (gen_cpu, relay_cpu) = if two_cores {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    if let Some(c) = gen_cpu {
        sys::pin(std::process::id(), c).context("pinning the load generator")?;
    }
    let stamp = timestamp();
    let run_dir = paths.scratch().join("bench").join(&stamp);
    std::fs::create_dir_all(&run_dir)?;
    let machine = sys::machine(&paths.envoy_bin(), &paths.root);
    let others_before = sys::other_busy_processes(&[]);
    let load_before = sys::loadavg();
    say(format!(
        "machine: {machine}; load {load_before}; other busy processes: {others_before:?}"
    ));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if two_cores { 1 } else { 2 })
        .enable_all()
        .build()?;
    let mut results = json!({});
    let mut failures: Vec<String> = Vec::new();

    if wants("setup") {
        let r = setup_section(&paths, &rt, &run_dir, relay_cpu, cli.quick, profile);
        match r {
            Ok(v) => {
                check_setup(&v, &mut failures);
                results["setup"] = v;
            }
            Err(e) => {
                failures.push(format!("setup: {e:#}"));
                results["setup"] = json!({ "error": format!("{e:#}") });
            }
        }
    }
    if wants("capacity") {
        let levels = cli.levels.clone().unwrap_or_else(|| {
            if cli.quick {
                vec![10]
            } else {
                vec![5, 10, 50, 100, 200, 300, 500]
            }
        });
        let r = rt.block_on(capacity::ramp(
            &levels,
            cli.quick,
            &relay_bin,
            relay_cpu,
            cli.relay_media_unspecified,
            &run_dir,
        ));
        match r {
            Ok(v) => {
                if v["largest_clean_level"].as_u64().unwrap_or(0) == 0 {
                    let first = &v["levels"][0]["relay"];
                    if first["connected"].as_u64().unwrap_or(0) == 0 {
                        failures.push(format!("capacity: no call got through: {first}"));
                    }
                }
                results["capacity"] = v;
            }
            Err(e) => {
                failures.push(format!("capacity: {e:#}"));
                results["capacity"] = json!({ "error": format!("{e:#}") });
            }
        }
    }
    // The floor in the same run: a bare batched UDP forwarder on the relay's CPU at each
    // capacity level's relayed packet rate, and the relay's cost as a ratio to it.
    if wants("capacity") || wants("floor") {
        let window = if cli.quick {
            std::time::Duration::from_secs(1)
        } else {
            std::time::Duration::from_secs(5)
        };
        let rates: Vec<f64> = results["capacity"]["levels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["relay"]["relayed_packets_per_sec"].as_f64())
            .filter(|r| *r > 0.0)
            .collect();
        let rates = if rates.is_empty() {
            vec![5_000.0, 10_000.0]
        } else {
            rates
        };
        let mut levels = Vec::new();
        for rate in rates {
            say(format!(
                "floor: a bare batched UDP forwarder at {rate:.0} packets/s"
            ));
            match floor::udp_forwarder(rate, window, relay_cpu, gen_cpu) {
                Ok(v) => levels.push(v),
                Err(e) => failures.push(format!("floor: {e:#}")),
            }
        }
        if let Some(cap) = results["capacity"]["levels"].as_array_mut() {
            for (level, f) in cap.iter_mut().zip(&levels) {
                let relay = level["relay"]["relay_cpu_us_per_packet"].as_f64();
                let bare = f["cpu_us_per_packet"].as_f64();
                if let (Some(r), Some(b)) = (relay, bare) {
                    if b > 0.0 {
                        level["relay"]["ratio_to_bare_forwarder"] = json!(sys::round1(r / b));
                    }
                }
            }
        }
        results["floor"] = json!({ "udp_forwarder": levels });
    }
    // A trusted peer side by side: Janus's echo test at the capacity levels' packet rates
    // (and the 500 and 1,000 packets/s of issue 14's own comparison). Not in the quick
    // smoke run unless asked for.
    if (!cli.quick && wants("janus"))
        || cli
            .only
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "janus"))
    {
        match janus::unavailable() {
            Some(why) => {
                say(format!("janus: skipped: {why}"));
                results["janus"] = json!({ "skipped": why });
            }
            None => {
                let sessions = janus::sessions_for(&results, cli.quick);
                match janus::run(&rt, &run_dir, &sessions, relay_cpu, cli.quick) {
                    Ok(v) => results["janus"] = v,
                    Err(e) => {
                        failures.push(format!("janus: {e:#}"));
                        results["janus"] = json!({ "error": format!("{e:#}") });
                    }
                }
            }
        }
    }
    // The running relay's instructions per relayed packet: repeatable where CPU time is
    // not. Not in the quick smoke run unless asked for.
    let named = |s: &str| cli.only.as_ref().is_some_and(|o| o.iter().any(|x| x == s));
    if (!cli.quick && wants("callgrind")) || named("callgrind") {
        match callgrind::unavailable() {
            Some(why) => {
                say(format!("callgrind: skipped: {why}"));
                results["callgrind"] = json!({ "skipped": why });
            }
            None => {
                let window = std::time::Duration::from_secs(if cli.quick { 5 } else { 20 });
                let mut levels = Vec::new();
                for &calls in &cli.callgrind_calls {
                    say(format!(
                        "callgrind: {calls} calls through the relay under callgrind, {} s window",
                        window.as_secs()
                    ));
                    let r = rt.block_on(callgrind::run(
                        &relay_bin, calls, window, relay_cpu, &run_dir,
                    ));
                    match r {
                        Ok(v) => {
                            say(format!(
                                "  {} instructions per relayed packet ({} packets/s, loss {}%)",
                                v["instructions_per_packet"],
                                v["relayed_packets_per_sec"],
                                v["loss_pct"]
                            ));
                            levels.push(v);
                        }
                        Err(e) => {
                            failures.push(format!("callgrind at {calls} calls: {e:#}"));
                            levels.push(json!({ "calls": calls, "error": format!("{e:#}") }));
                        }
                    }
                }
                results["callgrind"] = json!({ "levels": levels });
            }
        }
    }
    if named("versus") {
        let calls = cli
            .levels
            .as_ref()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or(300);
        match &cli.versus {
            None => failures.push("versus: give the other relay build with --versus".into()),
            Some(b) => {
                let r = rt.block_on(versus::run(
                    calls,
                    cli.versus_rounds,
                    &relay_bin,
                    b,
                    relay_cpu,
                    &run_dir,
                ));
                match r {
                    Ok(v) => results["versus"] = v,
                    Err(e) => {
                        failures.push(format!("versus: {e:#}"));
                        results["versus"] = json!({ "error": format!("{e:#}") });
                    }
                }
            }
        }
    }
    if let Some(file) = &cli.virtual_cost {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        results["virtual_cost"] = serde_json::from_str(&text)?;
    }
    if wants("metering") {
        let (calls, rounds) = if cli.quick { (10, 1) } else { (100, 2) };
        let r = rt.block_on(capacity::metering(
            calls, rounds, cli.quick, &relay_bin, relay_cpu, &run_dir,
        ));
        match r {
            Ok(v) => results["metering"] = v,
            Err(e) => {
                failures.push(format!("metering: {e:#}"));
                results["metering"] = json!({ "error": format!("{e:#}") });
            }
        }
    }
    if wants("filter") {
        say("filter cost: pass-through with and without the Wasm filter");
        match rt.block_on(filter::run(&paths, &run_dir, relay_cpu, cli.quick)) {
            Ok(v) => results["filter_passthrough"] = v,
            Err(e) => {
                failures.push(format!("filter: {e:#}"));
                results["filter_passthrough"] = json!({ "error": format!("{e:#}") });
            }
        }
    }
    drop(rt);

    let doc = json!({
        "timestamp": stamp,
        "mode": if cli.quick { "quick" } else { "full" },
        "binaries": profile.dir(),
        "machine": machine,
        "cpu_layout": if two_cores {
            "load generator + in-process echo provider + echo-model binary + call-setup Envoy on CPU 0; relay (and pass-through Envoys) alone on CPU 1 (taskset)"
        } else {
            "single CPU: nothing pinned"
        },
        "load": {
            "loadavg_before": load_before,
            "loadavg_after": sys::loadavg(),
            "other_busy_processes_before": others_before,
            "other_busy_processes_after": sys::other_busy_processes(&[]),
        },
        "results": results,
        "failures": failures,
    });
    let out_dir = paths.root.join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(format!("{stamp}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    say(format!("wrote {}", out.display()));
    let write_doc = if cli.quick { cli.doc } else { !cli.no_doc };
    if write_doc {
        let md = paths.root.join("docs").join("benchmarks.md");
        report::update_doc(&md, &doc)?;
        say(format!("updated {}", md.display()));
    }
    println!("{}", report::summary_lines(&doc));
    if !failures.is_empty() {
        bail!(
            "{} benchmark failure(s): {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

fn check_setup(v: &Value, failures: &mut Vec<String>) {
    for key in ["sequential", "concurrent"] {
        if v[key]["gateway_ms"]["n"].as_u64().unwrap_or(0) == 0
            || v[key]["direct_ms"]["n"].as_u64().unwrap_or(0) == 0
        {
            failures.push(format!("setup {key}: no call got through: {}", v[key]));
        }
    }
    if v["setup_rate"]["setups"].as_u64().unwrap_or(0) == 0 {
        failures.push(format!("setup rate: no call set up: {}", v["setup_rate"]));
    }
    for key in ["stop_iteration_ms", "continue_headers_ms"] {
        if v["headers_modes"][key]["n"].as_u64().unwrap_or(0) == 0 {
            failures.push(format!(
                "setup headers modes: no call got through: {}",
                v["headers_modes"]
            ));
        }
    }
}

fn setup_section(
    paths: &Paths,
    rt: &tokio::runtime::Runtime,
    run_dir: &std::path::Path,
    relay_cpu: Option<usize>,
    quick: bool,
    profile: Profile,
) -> Result<Value> {
    say(format!(
        "setup: starting echo model + relay + Envoy ({})",
        profile.dir()
    ));
    let mut cfg = StackConfig::ephemeral(paths, "bench")?;
    cfg.profile = profile;
    cfg.run_dir = run_dir.join("stack");
    std::fs::create_dir_all(&cfg.run_dir)?;
    // The listener's native rate cap (100 req/s) would be what we measure: raise it.
    let template = std::fs::read_to_string(paths.envoy_dir().join("envoy.yaml"))?;
    let raised = cfg.run_dir.join("envoy.bench.yaml");
    std::fs::write(&raised, filter::raise_rate_limit(&template)?)?;
    cfg.envoy_config = raised;
    // The same stack with the filter in `continue_headers` mode (Envoy without
    // allow_on_headers_stop_iteration, Istio's WasmPlugin): creates are held through the
    // internal listener `realtime_hold`, compared with the pause in the headers callback.
    let mut hold_cfg = StackConfig::ephemeral(paths, "bench-hold")?;
    hold_cfg.profile = profile;
    hold_cfg.run_dir = run_dir.join("stack-hold");
    std::fs::create_dir_all(&hold_cfg.run_dir)?;
    let hold_config = hold_cfg.run_dir.join("envoy.bench-hold.yaml");
    std::fs::write(
        &hold_config,
        filter::continue_headers_mode(&filter::raise_rate_limit(&template)?)?,
    )?;
    hold_cfg.envoy_config = hold_config;
    let stack = Stack::start(paths, cfg)?;
    let hold_stack = Stack::start(paths, hold_cfg)?;
    let targets = |stack: &Stack| -> Result<setup::Targets> {
        let pid_of = |name: &str| {
            stack
                .processes()
                .into_iter()
                .find(|(n, _, _)| n == name)
                .and_then(|(_, p, _)| p)
                .with_context(|| format!("no {name} process in the stack"))
        };
        let relay_pid = pid_of("relay")?;
        if let Some(c) = relay_cpu {
            sys::pin(relay_pid, c)?;
        }
        Ok(setup::Targets {
            gateway_calls: stack.urls.calls.clone(),
            provider_url: stack.urls.upstream.clone(),
            provider_auth: format!("Bearer {LOCAL_ECHO_API_KEY}"),
            relay_grpc: stack.urls.relay_grpc.parse()?,
            relay_pid,
            envoy_pid: pid_of("envoy")?,
            provider_pid: pid_of("local echo model")?,
        })
    };
    let t = targets(&stack)?;
    let hold = targets(&hold_stack)?;
    let counts = if quick {
        setup::Counts {
            sequential: 10,
            concurrent: 32,
            in_flight: 8,
            cpu_setups: 10,
            rate_setups: 40,
            rate_in_flight: 8,
        }
    } else {
        setup::Counts {
            sequential: 200,
            concurrent: 400,
            in_flight: 8,
            cpu_setups: 200,
            rate_setups: 1000,
            rate_in_flight: 16,
        }
    };
    let v = rt.block_on(setup::run(&t, &counts));
    let modes = rt.block_on(setup::headers_modes(
        &t,
        &hold,
        counts.sequential,
        counts.cpu_setups,
    ));
    drop(stack);
    drop(hold_stack);
    let mut v = v?;
    v["headers_modes"] = modes?;
    v["counts"] = json!({
        "sequential_per_path": counts.sequential,
        "concurrent_per_path": counts.concurrent,
        "in_flight": counts.in_flight,
    });
    Ok(v)
}
