//! Call setup: time to the SDP answer straight from the echo provider vs through Envoy +
//! filter + relay (+ the same provider), Envoy's and the relay's CPU per setup, and the
//! setup rate one relay sustains over gRPC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::relay_grpc;
use crate::sys::{self, round1, round3};

/// Where the stack answers.
#[derive(Clone)]
pub struct Targets {
    /// Envoy's `POST /v1/realtime/calls`.
    pub gateway_calls: String,
    /// The echo provider's base URL.
    pub provider_url: String,
    pub provider_auth: String,
    pub relay_grpc: SocketAddr,
    pub relay_pid: u32,
    pub envoy_pid: u32,
    pub provider_pid: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    Gateway,
}

/// One create: returns (ms to the answer, call id).
async fn create(
    http: &reqwest::Client,
    t: &Targets,
    path: Path,
    offer: &str,
) -> Result<(f64, String)> {
    let req = match path {
        Path::Direct => http
            .post(format!(
                "{}/v1/realtime/calls?model=gpt-realtime",
                t.provider_url
            ))
            .header("authorization", &t.provider_auth),
        Path::Gateway => http.post(format!("{}?model=gpt-realtime", t.gateway_calls)),
    };
    let started = Instant::now();
    let resp = req
        .header("content-type", "application/sdp")
        .body(offer.to_string())
        .send()
        .await?;
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.text().await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status != 201 || !body.starts_with("v=0") {
        bail!(
            "{path:?}: status {status}: {}",
            body.chars().take(200).collect::<String>()
        );
    }
    let id = location.rsplit('/').next().unwrap_or_default().to_string();
    Ok((ms, id))
}

async fn hangup(http: &reqwest::Client, t: &Targets, path: Path, id: &str) {
    let req = match path {
        Path::Direct => http
            .post(format!("{}/v1/realtime/calls/{id}/hangup", t.provider_url))
            .header("authorization", &t.provider_auth),
        Path::Gateway => http.post(format!("{}/{id}/hangup", t.gateway_calls)),
    };
    let _ = req.send().await;
}

/// `n` sequential calls on each path, interleaved (direct, gateway, direct, ...).
async fn sequential(http: &reqwest::Client, t: &Targets, offer: &str, n: usize) -> Result<Value> {
    let mut d = Vec::new();
    let mut g = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..n {
        for (path, out) in [(Path::Direct, &mut d), (Path::Gateway, &mut g)] {
            match create(http, t, path, offer).await {
                Ok((ms, id)) => {
                    out.push(ms);
                    hangup(http, t, path, &id).await;
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    Ok(compare(d, g, errors))
}

/// `n` calls per path with `in_flight` at once; rounds alternate direct and gateway.
async fn concurrent(
    http: &reqwest::Client,
    t: &Targets,
    offer: &str,
    n: usize,
    in_flight: usize,
) -> Result<Value> {
    let mut d = Vec::new();
    let mut g = Vec::new();
    let mut errors = Vec::new();
    let rounds = 2;
    for _ in 0..rounds {
        for path in [Path::Direct, Path::Gateway] {
            let per_worker = (n / rounds).div_ceil(in_flight);
            let mut set = JoinSet::new();
            for _ in 0..in_flight {
                let (http, t, offer) = (http.clone(), t.clone(), offer.to_string());
                set.spawn(async move {
                    let mut ok = Vec::new();
                    let mut err = Vec::new();
                    for _ in 0..per_worker {
                        match create(&http, &t, path, &offer).await {
                            Ok((ms, id)) => {
                                ok.push(ms);
                                hangup(&http, &t, path, &id).await;
                            }
                            Err(e) => err.push(format!("{e:#}")),
                        }
                    }
                    (ok, err)
                });
            }
            while let Some(r) = set.join_next().await {
                let (ok, err) = r?;
                match path {
                    Path::Direct => d.extend(ok),
                    Path::Gateway => g.extend(ok),
                }
                errors.extend(err);
            }
        }
    }
    let mut v = compare(d, g, errors);
    v["in_flight"] = json!(in_flight);
    Ok(v)
}

fn compare(mut d: Vec<f64>, mut g: Vec<f64>, errors: Vec<String>) -> Value {
    let ds = sys::summary(&mut d);
    let gs = sys::summary(&mut g);
    let mut v = json!({ "direct_ms": ds, "gateway_ms": gs, "errors": errors.len() });
    for p in ["p50", "p99"] {
        if let (Some(a), Some(b)) = (ds[p].as_f64(), gs[p].as_f64()) {
            v["added_ms"][p] = json!(round3(b - a));
            v["ratio"][p] = json!(round3(b / a));
        }
    }
    if let Some(e) = errors.first() {
        v["first_error"] = json!(e);
    }
    v
}

/// Gateway setup latency and Envoy CPU with the filter pausing in the headers callback
/// (`stop`, Envoy's allow_on_headers_stop_iteration) vs holding the body (`hold`,
/// `continue_headers`): sequential creates alternating between the two stacks, then CPU.
pub async fn headers_modes(
    stop: &Targets,
    hold: &Targets,
    n: usize,
    cpu_setups: usize,
) -> Result<Value> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let offer = crate::peer::Offer::new()?.sdp;
    for t in [stop, hold] {
        for _ in 0..3 {
            let (_, id) = create(&http, t, Path::Gateway, &offer)
                .await
                .context("warm-up call (headers modes)")?;
            hangup(&http, t, Path::Gateway, &id).await;
        }
    }
    crate::say("setup latency: pause in headers vs continue_headers");
    let (mut a, mut b, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        for (t, out) in [(stop, &mut a), (hold, &mut b)] {
            match create(&http, t, Path::Gateway, &offer).await {
                Ok((ms, id)) => {
                    out.push(ms);
                    hangup(&http, t, Path::Gateway, &id).await;
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    let sa = sys::summary(&mut a);
    let sb = sys::summary(&mut b);
    let mut v = json!({
        "stop_iteration_ms": sa,
        "continue_headers_ms": sb,
        "errors": errors.len(),
    });
    for p in ["p50", "p99"] {
        if let (Some(x), Some(y)) = (sa[p].as_f64(), sb[p].as_f64()) {
            v["added_ms"][p] = json!(round3(y - x));
            v["ratio"][p] = json!(round3(y / x));
        }
    }
    if let Some(e) = errors.first() {
        v["first_error"] = json!(e);
    }
    v["cpu_stop_iteration"] = cpu_per_setup(&http, stop, &offer, cpu_setups).await?;
    v["cpu_continue_headers"] = cpu_per_setup(&http, hold, &offer, cpu_setups).await?;
    Ok(v)
}

/// Envoy's and the relay's CPU per gateway setup: `n` sequential creates with nothing else
/// going on (hangups afterwards, outside the window).
async fn cpu_per_setup(
    http: &reqwest::Client,
    t: &Targets,
    offer: &str,
    n: usize,
) -> Result<Value> {
    let e0 = sys::cpu_secs(t.envoy_pid)?;
    let r0 = sys::cpu_secs(t.relay_pid)?;
    let p0 = sys::cpu_secs(t.provider_pid)?;
    let mut ids = Vec::new();
    let mut errors = 0;
    for _ in 0..n {
        match create(http, t, Path::Gateway, offer).await {
            Ok((_, id)) => ids.push(id),
            Err(_) => errors += 1,
        }
    }
    let e1 = sys::cpu_secs(t.envoy_pid)?;
    let r1 = sys::cpu_secs(t.relay_pid)?;
    let p1 = sys::cpu_secs(t.provider_pid)?;
    for id in &ids {
        hangup(http, t, Path::Gateway, id).await;
    }
    let ok = ids.len().max(1) as f64;
    Ok(json!({
        "setups": ids.len(),
        "errors": errors,
        "envoy_cpu_us_per_setup": round1((e1 - e0) * 1e6 / ok),
        "relay_cpu_us_per_setup": round1((r1 - r0) * 1e6 / ok),
        "provider_cpu_us_per_setup": round1((p1 - p0) * 1e6 / ok),
        "note": "CPU from /proc/<pid>/stat (10 ms ticks), over sequential gateway creates only",
    }))
}

/// Sequential CreateCall latency straight to the relay over gRPC (the relay's share of a
/// gateway setup, without Envoy and the filter).
async fn relay_grpc_latency(t: &Targets, offer: &str, n: usize) -> Result<Value> {
    let mut grpc = relay_grpc::grpc_client(t.relay_grpc).await?;
    let mut ms = Vec::new();
    for _ in 0..n {
        let req = relay_grpc::create_request(offer, &t.provider_url, &t.provider_auth);
        let started = Instant::now();
        let (id, _) = relay_grpc::create_call(&mut grpc, req).await?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let _ = grpc
            .hangup_call(realtime_relay_proto::v1::HangupCallRequest {
                call_id: id,
                ..Default::default()
            })
            .await;
    }
    Ok(sys::summary(&mut ms))
}

/// Setups per second over gRPC, `in_flight` at once, each call hung up right after its
/// answer.
async fn rate(t: &Targets, offer: &str, n: usize, in_flight: usize) -> Result<Value> {
    let grpc = relay_grpc::grpc_client(t.relay_grpc).await?;
    let r0 = sys::cpu_secs(t.relay_pid)?;
    let p0 = sys::cpu_secs(t.provider_pid)?;
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..in_flight {
        let (mut grpc, t, offer, next) = (grpc.clone(), t.clone(), offer.to_string(), next.clone());
        set.spawn(async move {
            let (mut ok, mut err, mut first) = (0usize, 0usize, None);
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let req = relay_grpc::create_request(&offer, &t.provider_url, &t.provider_auth);
                match relay_grpc::create_call(&mut grpc, req).await {
                    Ok((id, _)) => {
                        ok += 1;
                        let _ = grpc
                            .hangup_call(realtime_relay_proto::v1::HangupCallRequest {
                                call_id: id,
                                ..Default::default()
                            })
                            .await;
                    }
                    Err(e) => {
                        err += 1;
                        first.get_or_insert(format!("{e:#}"));
                    }
                }
            }
            (ok, err, first)
        });
    }
    let (mut ok, mut err, mut first) = (0, 0, None);
    while let Some(r) = set.join_next().await {
        let (o, e, f) = r?;
        ok += o;
        err += e;
        if first.is_none() {
            first = f;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let r1 = sys::cpu_secs(t.relay_pid)?;
    let p1 = sys::cpu_secs(t.provider_pid)?;
    let okf = ok.max(1) as f64;
    let mut v = json!({
        "setups": ok,
        "errors": err,
        "in_flight": in_flight,
        "secs": round3(secs),
        "setups_per_sec": round1(ok as f64 / secs),
        "relay_cpu_us_per_setup": round1((r1 - r0) * 1e6 / okf),
        "relay_cpu_pct": round1((r1 - r0) / secs * 100.0),
        "provider_cpu_us_per_setup": round1((p1 - p0) * 1e6 / okf),
        "provider_cpu_pct": round1((p1 - p0) / secs * 100.0),
        "note": "each setup is CreateCall + HangupCall over gRPC; relay CPU includes both",
    });
    if let Some(f) = first {
        v["first_error"] = json!(f);
    }
    Ok(v)
}

pub struct Counts {
    pub sequential: usize,
    pub concurrent: usize,
    pub in_flight: usize,
    pub cpu_setups: usize,
    pub rate_setups: usize,
    pub rate_in_flight: usize,
}

pub async fn run(t: &Targets, c: &Counts) -> Result<Value> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let offer = crate::peer::Offer::new()?.sdp;
    // Warm both paths (connections, Envoy's gRPC connection to the relay).
    for path in [Path::Direct, Path::Gateway] {
        for _ in 0..3 {
            let (_, id) = create(&http, t, path, &offer)
                .await
                .with_context(|| format!("warm-up call on the {path:?} path"))?;
            hangup(&http, t, path, &id).await;
        }
    }
    crate::say("setup latency: sequential");
    let seq = sequential(&http, t, &offer, c.sequential).await?;
    crate::say("setup latency: concurrent");
    let conc = concurrent(&http, t, &offer, c.concurrent, c.in_flight).await?;
    let relay_only = relay_grpc_latency(t, &offer, c.sequential).await?;
    crate::say("setup: Envoy and relay CPU per gateway setup");
    let cpu = cpu_per_setup(&http, t, &offer, c.cpu_setups).await?;
    // Let the hangups above finish before the rate test.
    tokio::time::sleep(Duration::from_millis(500)).await;
    crate::say("setup rate over gRPC");
    let rate = rate(t, &offer, c.rate_setups, c.rate_in_flight).await?;
    Ok(json!({
        "sequential": seq,
        "concurrent": conc,
        "relay_grpc_sequential_ms": relay_only,
        "cpu_per_gateway_setup": cpu,
        "setup_rate": rate,
    }))
}
