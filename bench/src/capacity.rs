//! Relay capacity: N concurrent calls, each with 20 ms audio frames both ways (the echo
//! model returns every frame) and one data-channel event per second. The same N peers are
//! also run straight against the provider, so the relay's added latency is the difference of
//! the two round trips, halved.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use xtask::launch::{Relay, RelaySpec};
use xtask::metrics;

use crate::peer::{Load, Offer, FRAME_INTERVAL};
use crate::relay_grpc;
use crate::sys::{self, round1, round3};

pub const PROVIDER_AUTH: &str = "Bearer sk-bench";

pub enum Via<'a> {
    Direct {
        provider_url: String,
    },
    Relay {
        relay: &'a Relay,
        provider_url: String,
    },
}

pub struct LevelOpts {
    pub calls: usize,
    pub warmup: Duration,
    pub window: Duration,
    pub setup_concurrency: usize,
    /// Peers send `response.create` (priced answers) instead of `bench.ping`.
    pub priced_events: bool,
    /// The relay runs under callgrind: zero its counts as the window opens and dump them as
    /// it closes (`callgrind_control`), and report its instructions per relayed packet.
    pub callgrind: bool,
}

/// Sets up `calls` peers (through the relay or direct), waits until each has its
/// `session.created`, runs audio, measures a window, stops everything.
pub async fn run_level(via: &Via<'_>, opts: &LevelOpts) -> Result<Value> {
    let n = opts.calls;
    let load = Arc::new(Load::default());
    load.priced_events.store(opts.priced_events, Relaxed);
    let http = reqwest::Client::new();
    let grpc = match via {
        Via::Relay { relay, .. } => Some(relay_grpc::grpc_client(relay.grpc).await?),
        Via::Direct { .. } => None,
    };
    let relay_pid = match via {
        Via::Relay { relay, .. } => Some(relay.pid().context("the relay has no pid")?),
        Via::Direct { .. } => None,
    };
    let rss_base = relay_pid.map(sys::rss_kib).transpose()?;

    // Setup, a bounded number in flight.
    let setup_started = Instant::now();
    let mut set: JoinSet<Result<tokio::task::JoinHandle<Vec<u32>>>> = JoinSet::new();
    let mut peers = Vec::with_capacity(n);
    let mut setup_errors: Vec<String> = Vec::new();
    let mut collect = |r: Result<Result<_>, tokio::task::JoinError>| match r {
        Ok(Ok(h)) => peers.push(h),
        Ok(Err(e)) => setup_errors.push(format!("{e:#}")),
        Err(e) => setup_errors.push(e.to_string()),
    };
    for i in 0..n {
        while set.len() >= opts.setup_concurrency {
            if let Some(r) = set.join_next().await {
                collect(r);
            }
        }
        let load = load.clone();
        // Spread the peers' frame phases over the 20 ms period.
        let phase = FRAME_INTERVAL.mul_f64(i as f64 / n as f64);
        let http = http.clone();
        let mut grpc = grpc.clone();
        let provider_url = match via {
            Via::Direct { provider_url } | Via::Relay { provider_url, .. } => provider_url.clone(),
        };
        set.spawn(async move {
            let offer = Offer::new()?;
            let answer = match grpc.as_mut() {
                Some(g) => {
                    let req = relay_grpc::create_request(&offer.sdp, &provider_url, PROVIDER_AUTH);
                    relay_grpc::create_call(g, req).await?.1
                }
                None => {
                    let resp = http
                        .post(format!(
                            "{provider_url}/v1/realtime/calls?model=gpt-realtime"
                        ))
                        .header("authorization", PROVIDER_AUTH)
                        .header("content-type", "application/sdp")
                        .body(offer.sdp.clone())
                        .send()
                        .await?;
                    if resp.status().as_u16() != 201 {
                        bail!("provider answered {}", resp.status());
                    }
                    resp.text().await?
                }
            };
            offer.start(&answer, load, phase)
        });
    }
    while let Some(r) = set.join_next().await {
        collect(r);
    }
    let started = peers.len();
    let deadline = Instant::now() + Duration::from_secs(20) + Duration::from_millis(40 * n as u64);
    while load.ready.load(Relaxed) + load.dead.load(Relaxed) < started && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = load.ready.load(Relaxed);
    let setup_secs = setup_started.elapsed().as_secs_f64();

    let result = if ready == 0 {
        Err(anyhow::anyhow!(
            "no call connected ({started} set up, errors: {:?})",
            setup_errors.iter().take(3).collect::<Vec<_>>()
        ))
    } else {
        measure(via, opts, &load, &http, relay_pid, rss_base, ready).await
    };

    // Stop every peer (they close their connections) and collect round trips.
    load.sending.store(false, Relaxed);
    load.stop.store(true, Relaxed);
    let mut rtts: Vec<f64> = Vec::new();
    for h in peers {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), h).await {
            rtts.extend(s.into_iter().map(|us| us as f64 / 1000.0));
        }
    }
    let mut v = result?;
    v["calls"] = json!(n);
    v["connected"] = json!(ready);
    v["setup_errors"] = json!(setup_errors.len());
    if let Some(e) = setup_errors.first() {
        v["first_setup_error"] = json!(e);
    }
    v["setup_and_connect_secs"] = json!(round3(setup_secs));
    v["rtt_ms"] = sys::summary(&mut rtts);
    Ok(v)
}

async fn measure(
    via: &Via<'_>,
    opts: &LevelOpts,
    load: &Load,
    http: &reqwest::Client,
    relay_pid: Option<u32>,
    rss_base: Option<u64>,
    ready: usize,
) -> Result<Value> {
    let me = std::process::id();
    load.sending.store(true, Relaxed);
    tokio::time::sleep(opts.warmup).await;

    let packets = |text: &str| metrics::value(text, "realtime_relay_rtp_packets_total");
    let metrics_addr = match via {
        Via::Relay { relay, .. } => Some(relay.metrics),
        Via::Direct { .. } => None,
    };
    let callgrind = relay_pid.filter(|_| opts.callgrind);
    if let Some(pid) = callgrind {
        crate::callgrind::control(pid, "--zero").await?;
    }
    let m0 = match metrics_addr {
        Some(a) => Some(metrics_text(http, a).await?),
        None => None,
    };
    let relay_cpu0 = relay_pid.map(sys::cpu_secs).transpose()?;
    let gen_cpu0 = sys::cpu_secs(me)?;
    let (busy0, total0) = sys::machine_jiffies();
    let sent0 = load.frames_sent.load(Relaxed);
    let t0 = Instant::now();
    load.measuring.store(true, Relaxed);
    tokio::time::sleep(opts.window / 2).await;
    let rss = relay_pid.map(sys::rss_kib).transpose()?;
    tokio::time::sleep(opts.window / 2).await;
    load.measuring.store(false, Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let sent1 = load.frames_sent.load(Relaxed);
    let relay_cpu1 = relay_pid.map(sys::cpu_secs).transpose()?;
    let gen_cpu1 = sys::cpu_secs(me)?;
    let (busy1, total1) = sys::machine_jiffies();
    let m1 = match metrics_addr {
        Some(a) => Some(metrics_text(http, a).await?),
        None => None,
    };
    let instructions = match callgrind {
        Some(pid) => Some(crate::callgrind::dump(pid).await?),
        None => None,
    };

    // Let frames in flight arrive, then count loss over the whole audio period.
    load.sending.store(false, Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let sent = load.frames_sent.load(Relaxed);
    let received = load.frames_received.load(Relaxed);
    let loss = if sent == 0 {
        f64::NAN
    } else {
        sent.saturating_sub(received) as f64 / sent as f64 * 100.0
    };
    let gen_util = (gen_cpu1 - gen_cpu0) / secs * 100.0;
    let machine_util = if total1 > total0 {
        (busy1 - busy0) as f64 / (total1 - total0) as f64 * 100.0 * sys::online_cpus() as f64
    } else {
        f64::NAN
    };
    let mut v = json!({
        "window_secs": round3(secs),
        "frames_sent": sent,
        "frames_echoed_back": received,
        "loss_pct": round3(loss),
        "offered_frames_per_sec": round1((sent1 - sent0) as f64 / secs),
        "events_sent": load.events_sent.load(Relaxed),
        "events_echoed_back": load.events_received.load(Relaxed),
        "generator_and_provider_cpu_pct": round1(gen_util),
        "machine_cpu_pct_of_one_core": round1(machine_util),
        "generator_send_errors": load.send_errors.load(Relaxed),
    });
    if let (Some(m0), Some(m1), Some(c0), Some(c1)) = (m0, m1, relay_cpu0, relay_cpu1) {
        let pk = packets(&m1)? - packets(&m0)?;
        let cpu = c1 - c0;
        v["relayed_packets"] = json!(pk);
        v["relayed_packets_per_sec"] = json!(round1(pk / secs));
        v["relay_cpu_pct"] = json!(round1(cpu / secs * 100.0));
        v["relay_cpu_us_per_packet"] = json!(if pk > 0.0 {
            round3(cpu * 1e6 / pk)
        } else {
            f64::NAN
        });
        v["relay_dropped"] = json!(
            metrics::value(&m1, "realtime_relay_dropped_total")?
                + metrics::value(&m1, "realtime_relay_call_queue_full_drops_total")?
        );
        v["relay_calls_connected"] = json!(metrics::value(&m1, "realtime_relay_calls_connected")?);
        if let Some(ir) = instructions {
            v["relay_instructions"] = json!(ir);
            v["relay_instructions_per_packet"] = json!(if pk > 0.0 {
                (ir as f64 / pk).round()
            } else {
                f64::NAN
            });
        }
    }
    if let (Some(base), Some(rss)) = (rss_base, rss) {
        v["relay_rss_kib"] = json!(rss);
        v["relay_rss_base_kib"] = json!(base);
        v["relay_rss_kib_per_call"] = json!(round1(rss.saturating_sub(base) as f64 / ready as f64));
    }
    Ok(v)
}

/// The in-process echo provider the load peers and the relay under test talk to.
pub(crate) async fn start_provider() -> Result<echo_model::MockProvider> {
    echo_model::MockProvider::start_with_limits(
        echo_model::ProviderConfig::local(None),
        echo_model::provider::CallLimits::default(),
    )
    .await
    .context("starting the in-process echo provider")
}

/// The relay under test on ephemeral loopback ports, pinned to `cpu` (None: not pinned). With
/// `media_unspecified`, its media port is bound on 0.0.0.0 and advertises 127.0.0.1.
pub(crate) fn relay_spec(
    bin: &Path,
    upstream: &str,
    cpu: Option<usize>,
    media_unspecified: bool,
    extra_args: &[&str],
    log: PathBuf,
) -> Result<RelaySpec> {
    let mut spec = RelaySpec::ephemeral("relay", bin.to_path_buf(), log)?;
    spec.allow_upstreams = vec![upstream.to_string()];
    spec.allow_private_upstreams = true;
    spec.args = vec!["--drain-secs=1".into(), "--max-calls=5000".into()];
    spec.args.extend(extra_args.iter().map(|a| a.to_string()));
    if media_unspecified {
        spec.media.set_ip(std::net::Ipv4Addr::UNSPECIFIED.into());
        spec.args.push("--public-ip=127.0.0.1".into());
    }
    spec.env = vec![("RUST_LOG".into(), "warn".into())];
    spec.cpu = cpu;
    Ok(spec)
}

/// The relay's `/metrics` text (with the load generator's async client: a blocking fetch
/// would stall a runtime thread that carries media).
async fn metrics_text(http: &reqwest::Client, addr: SocketAddr) -> Result<String> {
    Ok(http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// How a capacity level ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelVerdict {
    /// Every call connected, loss at most 1 %, and the generator offered the level's load.
    Clean,
    /// The generator could not offer the level's load (below 95 % of its nominal frame
    /// rate): whatever the relay did, this level did not measure it at its nominal size.
    GeneratorBound,
    /// Calls failed to connect, or more than 1 % of frames were lost.
    NotClean,
}

impl LevelVerdict {
    pub fn code(self) -> &'static str {
        match self {
            LevelVerdict::Clean => "clean",
            LevelVerdict::GeneratorBound => "generator_bound",
            LevelVerdict::NotClean => "not_clean",
        }
    }
}

/// Frames per second the clients of `calls` calls send at 20 ms a frame.
pub fn nominal_frames_per_sec(calls: usize) -> f64 {
    calls as f64 / FRAME_INTERVAL.as_secs_f64()
}

/// A level's verdict from what it measured. A relay fault (calls not connected, loss) wins
/// over a short generator: both are reported, the fault first.
/// Calls one relay core would carry at the cost per packet measured at a level of `calls`
/// calls relaying `packets_per_sec` in total: one core's microseconds per second divided by
/// what one call costs per second. Derived, not measured: it assumes the cost per packet stays
/// what it was at that level (it grows with the working set, docs/benchmarks.md).
pub fn derived_calls_per_core(
    calls: usize,
    packets_per_sec: f64,
    us_per_packet: f64,
) -> Option<f64> {
    let per_call = packets_per_sec / calls as f64;
    (calls > 0 && per_call > 0.0 && us_per_packet > 0.0).then(|| 1e6 / (us_per_packet * per_call))
}

pub fn level_verdict(calls: usize, connected: usize, loss_pct: f64, offered: f64) -> LevelVerdict {
    if connected != calls || loss_pct.is_nan() || loss_pct > 1.0 {
        LevelVerdict::NotClean
    } else if offered < 0.95 * nominal_frames_per_sec(calls) {
        LevelVerdict::GeneratorBound
    } else {
        LevelVerdict::Clean
    }
}

/// Runs each level direct and through a fresh relay pinned to `relay_cpu`; stops the ramp
/// when a level is not clean (calls failed to connect, loss over 1 %) or generator-bound
/// (a larger level would be more so).
pub async fn ramp(
    levels: &[usize],
    quick: bool,
    relay_bin: &Path,
    relay_cpu: Option<usize>,
    relay_media_unspecified: bool,
    log_dir: &Path,
) -> Result<Value> {
    let provider = start_provider().await?;
    let provider_url = provider.base_url();
    let (warmup, window) = if quick {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_secs(3), Duration::from_secs(10))
    };
    let mut out = Vec::new();
    let mut largest_clean = 0;
    for &calls in levels {
        let opts = LevelOpts {
            calls,
            warmup,
            window,
            setup_concurrency: 16,
            priced_events: false,
            callgrind: false,
        };
        crate::say(format!("capacity: {calls} calls direct to the provider"));
        let direct = run_level(
            &Via::Direct {
                provider_url: provider_url.clone(),
            },
            &LevelOpts {
                window: window / 2,
                ..opts
            },
        )
        .await;
        provider
            .wait_for_active_calls(0, Duration::from_secs(10))
            .await;
        crate::say(format!("capacity: {calls} calls through the relay"));
        let log = log_dir.join(format!("relay-capacity-{calls}.log"));
        let spec = relay_spec(
            relay_bin,
            &provider_url,
            relay_cpu,
            relay_media_unspecified,
            &[],
            log,
        )?;
        let relayed = level_through_relay(&provider, &spec, &opts).await;
        let direct = direct.unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        let mut relayed = relayed.unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        // Added one-way latency: (RTT via relay - RTT direct) / 2, per percentile.
        for p in ["p50", "p99"] {
            let r = relayed["rtt_ms"][p].as_f64();
            let d = direct["rtt_ms"][p].as_f64();
            if let (Some(r), Some(d)) = (r, d) {
                relayed["added_one_way_ms"][p] = json!(round3((r - d) / 2.0));
            }
        }
        let connected = relayed["connected"].as_u64().unwrap_or(0) as usize;
        let loss = relayed["loss_pct"].as_f64().unwrap_or(100.0);
        let offered = relayed["offered_frames_per_sec"].as_f64().unwrap_or(0.0);
        let verdict = level_verdict(calls, connected, loss, offered);
        let clean = verdict == LevelVerdict::Clean;
        relayed["verdict"] = json!(verdict.code());
        relayed["nominal_frames_per_sec"] = json!(nominal_frames_per_sec(calls));
        relayed["clean"] = json!(clean);
        if clean {
            largest_clean = calls;
        } else if verdict == LevelVerdict::GeneratorBound {
            crate::say(format!(
                "  {calls} calls: generator-bound: offered {offered:.0} frames/s of the {:.0} \
                 this level carries; not a measurement of the relay at this level",
                nominal_frames_per_sec(calls)
            ));
        }
        crate::say(format!(
            "  {calls} calls: connected {connected}, loss {loss}%, relay {} µs/packet, {} packets/s, added one-way p50 {} ms p99 {} ms, generator {}% CPU",
            relayed["relay_cpu_us_per_packet"],
            relayed["relayed_packets_per_sec"],
            relayed["added_one_way_ms"]["p50"],
            relayed["added_one_way_ms"]["p99"],
            relayed["generator_and_provider_cpu_pct"],
        ));
        out.push(json!({ "calls": calls, "direct": direct, "relay": relayed }));
        if !clean {
            break;
        }
    }
    provider.shutdown().await;
    let derived = out
        .iter()
        .filter(|l| l["calls"].as_u64() == Some(largest_clean as u64))
        .find_map(|l| {
            let r = &l["relay"];
            derived_calls_per_core(
                largest_clean,
                r["relayed_packets_per_sec"].as_f64()?,
                r["relay_cpu_us_per_packet"].as_f64()?,
            )
        });
    Ok(json!({
        "levels": out,
        "largest_clean_level": largest_clean,
        "derived_calls_per_core": derived,
        "warmup_secs": warmup.as_secs_f64(),
        "window_secs": window.as_secs_f64(),
    }))
}

/// One level through a relay started from `spec` (stopped after it), once the provider has
/// seen every call of the level end.
pub(crate) async fn level_through_relay(
    provider: &echo_model::MockProvider,
    spec: &RelaySpec,
    opts: &LevelOpts,
) -> Result<Value> {
    let relay = Relay::start(spec)?;
    let via = Via::Relay {
        relay: &relay,
        provider_url: provider.base_url(),
    };
    let r = run_level(&via, opts).await;
    drop(relay);
    provider
        .wait_for_active_calls(0, Duration::from_secs(10))
        .await;
    r
}

/// The cost of usage metering: `calls` peers through a relay with `--usage-metering=true`,
/// then `false`, alternating `rounds` times, every peer sending a `response.create` a second
/// (the echo provider answers each with `rate_limits.updated`, `response.created` and a
/// priced `response.done`, which a metering relay reads). Relay CPU per relayed packet on vs
/// off, each the median of its rounds, and their ratio.
pub async fn metering(
    calls: usize,
    rounds: usize,
    quick: bool,
    relay_bin: &Path,
    relay_cpu: Option<usize>,
    log_dir: &Path,
) -> Result<Value> {
    let provider = start_provider().await?;
    let provider_url = provider.base_url();
    let (warmup, window) = if quick {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_secs(3), Duration::from_secs(10))
    };
    let opts = LevelOpts {
        calls,
        warmup,
        window,
        setup_concurrency: 16,
        priced_events: true,
        callgrind: false,
    };
    let mut on = Vec::new();
    let mut off = Vec::new();
    let mut runs = Vec::new();
    for round in 0..rounds {
        for metered in [true, false] {
            crate::say(format!(
                "metering: {calls} calls, metering {}, round {}",
                if metered { "on" } else { "off" },
                round + 1
            ));
            let flag = format!("--usage-metering={metered}");
            let log = log_dir.join(format!("relay-metering-{metered}-{round}.log"));
            let spec = relay_spec(relay_bin, &provider_url, relay_cpu, false, &[&flag], log)?;
            let r = level_through_relay(&provider, &spec, &opts).await?;
            if let Some(us) = r["relay_cpu_us_per_packet"].as_f64() {
                if metered {
                    on.push(us);
                } else {
                    off.push(us);
                }
            }
            runs.push(json!({ "metering": metered, "round": round, "relay": r }));
        }
    }
    provider.shutdown().await;
    let (on_us, off_us) = (sys::median(&mut on), sys::median(&mut off));
    let ratio = match (on_us, off_us) {
        (Some(a), Some(b)) if b > 0.0 => Some(round3(a / b)),
        _ => None,
    };
    crate::say(format!(
        "  metering on {on_us:?} µs/packet, off {off_us:?} µs/packet, ratio {ratio:?}"
    ));
    Ok(json!({
        "calls": calls,
        "rounds": rounds,
        "events_per_call_per_sec": 1,
        "relay_cpu_us_per_packet_on": on_us,
        "relay_cpu_us_per_packet_off": off_us,
        "ratio_on_off": ratio,
        "runs": runs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_capacity_is_one_core_over_what_a_call_costs() {
        // 300 calls relaying 30,000 packets/s at 25 µs each: a call costs 2,500 µs per second.
        assert_eq!(derived_calls_per_core(300, 30_000.0, 25.0), Some(400.0));
        assert_eq!(derived_calls_per_core(0, 30_000.0, 25.0), None);
        assert_eq!(derived_calls_per_core(300, 0.0, 25.0), None);
    }

    #[test]
    fn a_level_whose_generator_fell_short_is_never_clean() {
        // 500 calls carry 25,000 frames/s; the report of issue 14 offered 20,800/2 per leg.
        assert_eq!(
            level_verdict(500, 500, 0.2, 10_400.0),
            LevelVerdict::GeneratorBound
        );
        assert_eq!(level_verdict(500, 500, 0.2, 24_000.0), LevelVerdict::Clean);
        assert_eq!(
            level_verdict(500, 499, 0.2, 25_000.0),
            LevelVerdict::NotClean
        );
        assert_eq!(
            level_verdict(500, 500, 3.0, 10_000.0),
            LevelVerdict::NotClean
        );
        assert_eq!(
            level_verdict(50, 50, f64::NAN, 2_500.0),
            LevelVerdict::NotClean
        );
    }
}
