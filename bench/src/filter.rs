//! Filter cost on pass-through traffic: the same Envoy config (envoy/envoy.yaml) with and
//! without the Wasm filter, `GET /v1/models` proxied to a tiny local upstream, driven by a
//! small keep-alive HTTP/1.1 load generator. Both Envoys run at once, pinned to the same
//! core; measurement rounds alternate between them.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys::{self, round1, round3};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xtask::envoy::{render, Vars};
use xtask::launch::{Envoy, EnvoySpec};
use xtask::paths::Paths;
use xtask::ports::free_tcp_port as free_port;
use xtask::stack::LOCAL_ECHO_API_KEY;

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";

/// A tiny HTTP/1.1 upstream: answers every request with 200 "ok".
async fn upstream() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    // Requests carry no body: answer each complete header block.
                    while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                        if s.write_all(RESPONSE).await.is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                    if have == buf.len() {
                        return;
                    }
                }
            });
        }
    });
    Ok(format!("http://{addr}"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One keep-alive connection sending `GET /v1/models` back to back until `stop`.
async fn conn_loop(addr: String, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, bad: Arc<AtomicU64>) {
    let Ok(mut s) = TcpStream::connect(&addr).await else {
        bad.fetch_add(1, Relaxed);
        return;
    };
    let _ = s.set_nodelay(true);
    let req = format!("GET /v1/models HTTP/1.1\r\nhost: {addr}\r\nuser-agent: rtgw-bench\r\n\r\n");
    let mut buf = vec![0u8; 16384];
    while !stop.load(Relaxed) {
        if s.write_all(req.as_bytes()).await.is_err() {
            bad.fetch_add(1, Relaxed);
            return;
        }
        // Read one response: headers, then content-length bytes.
        let mut have = 0;
        let (head_end, len, status) = loop {
            let Ok(n) = s.read(&mut buf[have..]).await else {
                bad.fetch_add(1, Relaxed);
                return;
            };
            if n == 0 {
                bad.fetch_add(1, Relaxed);
                return;
            }
            have += n;
            if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let status = head.get(9..12).unwrap_or("").to_string();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, len, status);
            }
            if have == buf.len() {
                bad.fetch_add(1, Relaxed);
                return;
            }
        };
        while have < head_end + len {
            match s.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => {
                    bad.fetch_add(1, Relaxed);
                    return;
                }
                Ok(n) => have += n,
            }
        }
        if status == "200" {
            ok.fetch_add(1, Relaxed);
        } else {
            bad.fetch_add(1, Relaxed);
        }
    }
}

/// Requests per second through `listen` for `secs`, and Envoy's CPU per request.
async fn measure(listen: &str, envoy_pid: u32, conns: usize, secs: Duration) -> Result<Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(conn_loop(
            listen.to_string(),
            stop.clone(),
            ok.clone(),
            bad.clone(),
        )));
    }
    // Warm-up, then the window.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c0 = sys::cpu_secs(envoy_pid)?;
    let n0 = ok.load(Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(secs).await;
    let n1 = ok.load(Relaxed);
    let c1 = sys::cpu_secs(envoy_pid)?;
    let el = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let reqs = (n1 - n0) as f64;
    Ok(json!({
        "rps": round1(reqs / el),
        "envoy_cpu_pct": round1((c1 - c0) / el * 100.0),
        "envoy_cpu_us_per_request": round3((c1 - c0) * 1e6 / reqs.max(1.0)),
        "errors": bad.load(Relaxed),
    }))
}

/// The local Envoy config for this benchmark: ports, the tiny upstream as provider, the
/// native request-rate cap raised (it would otherwise be what we measure), and optionally
/// the Wasm filter removed.
pub fn config(
    paths: &Paths,
    with_filter: bool,
    listen: u16,
    admin: u16,
    upstream_url: &str,
) -> Result<String> {
    let template = std::fs::read_to_string(paths.envoy_dir().join("envoy.yaml"))
        .context("reading envoy/envoy.yaml")?;
    let mut vars = Vars::local(paths);
    vars.set("LISTEN_ADDR", "127.0.0.1")
        .set("LISTEN_PORT", listen.to_string())
        .set("ADMIN_ADDR", "127.0.0.1")
        .set("ADMIN_PORT", admin.to_string())
        .set("RELAY_GRPC_HOST", "127.0.0.1")
        .set("RELAY_GRPC_PORT", free_port()?.to_string())
        .set("RELAY_METRICS_PORT", free_port()?.to_string())
        .set("RELAY_MEDIA_PORT", "9");
    vars.set_provider(upstream_url)?;
    let text = raise_rate_limit(&render(&template, &vars)?)?;
    if with_filter {
        return Ok(text);
    }
    remove_wasm_filter(&text)
}

/// The filter in `continue_headers` mode, as Istio's WasmPlugin runs it: Envoy's
/// `allow_on_headers_stop_iteration` off, the plugin config's `continue_headers` on (creates
/// go to `realtime_hold`, as in envoy/envoy.yaml for both modes).
pub fn continue_headers_mode(text: &str) -> Result<String> {
    const FLAG: &str = "allow_on_headers_stop_iteration: true";
    const CONFIG: &str = "\"relay_cluster\": \"relay\",";
    if text.matches(FLAG).count() != 1 || text.matches(CONFIG).count() != 1 {
        bail!("envoy/envoy.yaml: expected one `{FLAG}` and one `{CONFIG}` to switch modes");
    }
    Ok(text
        .replace(FLAG, "allow_on_headers_stop_iteration: false")
        .replace(CONFIG, &format!("{CONFIG} \"continue_headers\": true,")))
}

/// Raises the native local rate limit of the listener to a value no benchmark reaches.
pub fn raise_rate_limit(text: &str) -> Result<String> {
    if !text.contains("max_tokens:") || !text.contains("tokens_per_fill:") {
        bail!("envoy/envoy.yaml has no local_ratelimit token bucket to raise");
    }
    Ok(text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            let indent = &l[..l.len() - t.len()];
            if t.starts_with("max_tokens:") {
                format!("{indent}max_tokens: 100000000")
            } else if t.starts_with("tokens_per_fill:") {
                format!("{indent}tokens_per_fill: 100000000")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Cuts the `envoy.filters.http.wasm` entry out of the HTTP filter chain, and the
/// per-route `typed_per_filter_config` blocks, which in envoy/envoy.yaml only switch that
/// filter off on the non-realtime routes (they name it, and mean nothing without it).
fn remove_wasm_filter(text: &str) -> Result<String> {
    let start = text
        .find("- name: envoy.filters.http.wasm")
        .context("envoy/envoy.yaml has no envoy.filters.http.wasm entry")?;
    let end = start
        + text[start..]
            .find("- name: envoy.filters.http.router")
            .context("envoy/envoy.yaml has no router after the Wasm filter")?;
    let cut = format!("{}{}", &text[..start], &text[end..]);
    // A per-route block is the `typed_per_filter_config:` line and its more-indented lines.
    let mut out = Vec::new();
    let mut skip_deeper_than: Option<usize> = None;
    for line in cut.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(level) = skip_deeper_than {
            if indent > level || line.trim().is_empty() {
                continue;
            }
            skip_deeper_than = None;
        }
        if line.trim_start().starts_with("typed_per_filter_config:") {
            skip_deeper_than = Some(indent);
            continue;
        }
        out.push(line);
    }
    let mut joined = out.join("\n");
    joined.push('\n');
    Ok(joined)
}

pub async fn run(paths: &Paths, run_dir: &Path, cpu: Option<usize>, quick: bool) -> Result<Value> {
    let upstream_url = upstream().await?;
    let mut envoys = Vec::new();
    for (name, with) in [("with_filter", true), ("without_filter", false)] {
        let (listen, admin) = (free_port()?, free_port()?);
        let file = run_dir.join(format!("envoy-passthrough-{name}.yaml"));
        std::fs::write(&file, config(paths, with, listen, admin, &upstream_url)?)?;
        let mut spec = EnvoySpec::new(
            paths,
            file,
            run_dir.join(format!("envoy-passthrough-{name}.log")),
        );
        spec.concurrency = Some(1);
        spec.log_level = "warn".into();
        spec.env
            .push(("OPENAI_API_KEY".into(), LOCAL_ECHO_API_KEY.into()));
        spec.cpu = cpu;
        let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let envoy = Envoy::start(&spec, loopback(admin), loopback(listen))?;
        let pid = envoy.pid().context("envoy pid")?;
        envoys.push((name, format!("127.0.0.1:{listen}"), pid, envoy));
    }
    let (rounds, secs, conns) = if quick {
        (1, Duration::from_secs(1), 16)
    } else {
        (3, Duration::from_secs(5), 32)
    };
    let mut results: Vec<(&str, Vec<Value>)> = envoys.iter().map(|e| (e.0, Vec::new())).collect();
    for _ in 0..rounds {
        for (i, (_, listen, pid, _)) in envoys.iter().enumerate() {
            let m = measure(listen, *pid, conns, secs).await?;
            if m["rps"].as_f64().unwrap_or(0.0) <= 0.0 {
                bail!("no pass-through request succeeded: {m}");
            }
            results[i].1.push(m);
        }
    }
    let median = |v: &[Value], key: &str| {
        let mut x: Vec<f64> = v.iter().filter_map(|m| m[key].as_f64()).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        sys::pct(&x, 50.0)
    };
    let with = median(&results[0].1, "rps");
    let without = median(&results[1].1, "rps");
    let cpu_with = median(&results[0].1, "envoy_cpu_us_per_request");
    let cpu_without = median(&results[1].1, "envoy_cpu_us_per_request");
    drop(envoys);
    Ok(json!({
        "connections": conns,
        "round_secs": secs.as_secs_f64(),
        "rounds": rounds,
        "with_filter": { "rps_median": with, "envoy_cpu_us_per_request_median": cpu_with, "rounds": results[0].1 },
        "without_filter": { "rps_median": without, "envoy_cpu_us_per_request_median": cpu_without, "rounds": results[1].1 },
        "rps_change_pct": round3((with - without) / without * 100.0),
        "cpu_per_request_change_pct": round3((cpu_with - cpu_without) / cpu_without * 100.0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_can_be_cut_and_the_rate_limit_raised() {
        let paths = Paths::discover();
        let with = config(&paths, true, 1, 2, "http://127.0.0.1:3").unwrap();
        let without = config(&paths, false, 1, 2, "http://127.0.0.1:3").unwrap();
        assert!(with.contains("envoy.filters.http.wasm"));
        assert!(!without.contains("envoy.filters.http.wasm"));
        assert!(without.contains("envoy.filters.http.router"));
        assert!(without.contains("envoy.filters.http.local_ratelimit"));
        assert!(with.contains("max_tokens: 100000000"));
    }
}
