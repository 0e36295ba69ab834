//! A trusted peer side by side: Janus (the Debian package, its echo test plugin) echoing the
//! same Opus-sized audio our load peers send, at packet rates matched to the relay's capacity
//! levels; reported as Janus's CPU per echoed packet (received and sent once, as the relay
//! relays a packet from one leg to the other).
//!
//! Janus's ICE (libnice) skips loopback, so Janus runs in a network namespace of an
//! `xtask::netns::Lab` and the load peers' sockets are made in another, both on the lab's
//! switch (benchmarking addresses, 198.18.0.0/15): nothing touches the machine's own network.
//! Signalling is Janus's HTTP JSON API (create, attach `janus.plugin.echotest`, a message with
//! the offer, the answer from the session's long poll), each request made from inside the
//! peers' namespace. Janus is pinned to the relay's CPU; it is stopped by PID, the lab removed,
//! also on failure.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use xtask::netns::{Cidr, Lab, Netns};
use xtask::process::{command_in, ChildGuard};

use crate::peer::{Load, Offer, FRAME_INTERVAL};
use crate::sys;

const JANUS_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 60, 2);
const PEERS_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 60, 1);
const HTTP_PORT: u16 = 8088;
/// How long one HTTP request to Janus may take (a long poll returns within this too).
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the Debian package keeps Janus's plugins, or `None` when Janus is not installed.
pub fn lib_dir() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/janus",
        "/usr/lib/aarch64-linux-gnu/janus",
        "/usr/lib/janus",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|d| d.join("plugins").join("libjanus_echotest.so").exists())
}

/// Why the Janus section cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if lib_dir().is_none() || sys::which("janus").is_none() {
        return Some(
            "Janus is not installed (Debian package `janus`; `cargo xtask setup` as root)".into(),
        );
    }
    xtask::netns::support().err()
}

/// Janus's configuration: the echo test and the HTTP transport only, nothing else loaded.
fn write_config(dir: &Path, lib: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let disable_plugins = [
        "audiobridge",
        "duktape",
        "lua",
        "nosip",
        "recordplay",
        "sip",
        "streaming",
        "textroom",
        "videocall",
        "videoroom",
        "voicemail",
    ]
    .map(|p| format!("libjanus_{p}.so"))
    .join(",");
    let disable_transports = ["mqtt", "nanomsg", "pfunix", "rabbitmq", "websockets"]
        .map(|p| format!("libjanus_{p}.so"))
        .join(",");
    let main = format!(
        r#"general: {{
  configs_folder = "{dir}"
  plugins_folder = "{lib}/plugins"
  transports_folder = "{lib}/transports"
  events_folder = "{lib}/events"
  loggers_folder = "{lib}/loggers"
  debug_level = 3
  session_timeout = 120
}}
media: {{ rtp_port_range = "20000-40000" }}
nat: {{ nice_debug = false, ignore_mdns = true }}
plugins: {{ disable = "{disable_plugins}" }}
transports: {{ disable = "{disable_transports}" }}
events: {{ broadcast = false }}
loggers: {{ disable = "libjanus_jsonlog.so" }}
"#,
        dir = dir.display(),
        lib = lib.display(),
    );
    std::fs::write(dir.join("janus.jcfg"), main)?;
    std::fs::write(
        dir.join("janus.transport.http.jcfg"),
        format!(
            "general: {{ json = \"compact\", base_path = \"/janus\", http = true, port = {HTTP_PORT}, https = false }}\nadmin: {{ admin_http = false }}\n"
        ),
    )?;
    std::fs::write(dir.join("janus.plugin.echotest.jcfg"), "general: { }\n")?;
    Ok(())
}

/// One HTTP/1.0 request to Janus from inside `ns`; the JSON body of the answer. HTTP/1.0, so
/// libmicrohttpd answers with a plain body until close, never chunked.
fn http(ns: &Netns, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let request = match body {
        Some(b) => {
            let b = b.to_string();
            format!(
                "{method} {path} HTTP/1.0\r\nHost: {JANUS_IP}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            )
        }
        None => {
            format!("{method} {path} HTTP/1.0\r\nHost: {JANUS_IP}\r\nConnection: close\r\n\r\n")
        }
    };
    let text = ns.within(move || -> Result<String> {
        let addr = SocketAddr::V4(SocketAddrV4::new(JANUS_IP, HTTP_PORT));
        let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
        s.set_read_timeout(Some(HTTP_TIMEOUT))?;
        s.write_all(request.as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    })??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("Janus answered no HTTP message: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("Janus answered {}", head.lines().next().unwrap_or(""));
    }
    serde_json::from_str(body).with_context(|| format!("Janus's answer is not JSON: {body:?}"))
}

fn transaction() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

/// A Janus API call that must succeed; the `data.id` it returns.
fn create_id(ns: &Netns, path: &str, body: Value) -> Result<u64> {
    let v = http(ns, "POST", path, Some(&body))?;
    if v["janus"] != "success" {
        bail!("Janus refused {}: {v}", body["janus"]);
    }
    v["data"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("no id in Janus's answer: {v}"))
}

/// An echo test session for `offer`: Janus's answer, and the session to destroy afterwards.
fn echotest_session(ns: &Netns, offer: &str) -> Result<(String, u64)> {
    let session = create_id(
        ns,
        "/janus",
        json!({"janus": "create", "transaction": transaction()}),
    )?;
    let handle = create_id(
        ns,
        &format!("/janus/{session}"),
        json!({"janus": "attach", "plugin": "janus.plugin.echotest", "transaction": transaction()}),
    )?;
    let ack = http(
        ns,
        "POST",
        &format!("/janus/{session}/{handle}"),
        Some(&json!({
            "janus": "message",
            "transaction": transaction(),
            "body": {"audio": true, "video": false},
            "jsep": {"type": "offer", "sdp": offer},
        })),
    )?;
    if ack["janus"] != "ack" && ack["janus"] != "event" {
        bail!("Janus did not take the offer: {ack}");
    }
    if let Some(sdp) = ack["jsep"]["sdp"].as_str() {
        return Ok((sdp.to_string(), session));
    }
    let deadline = Instant::now() + HTTP_TIMEOUT;
    while Instant::now() < deadline {
        let events = http(ns, "GET", &format!("/janus/{session}?maxev=10"), None)?;
        let events = match events {
            Value::Array(a) => a,
            one => vec![one],
        };
        for e in events {
            if let Some(sdp) = e["jsep"]["sdp"].as_str() {
                return Ok((sdp.to_string(), session));
            }
            if e["janus"] == "event" && e["plugindata"]["data"]["error"].is_string() {
                bail!("Janus's echo test refused the offer: {e}");
            }
        }
    }
    bail!("no answer from Janus within {HTTP_TIMEOUT:?}")
}

/// Janus running in its namespace, with the lab that holds it.
struct Janus {
    child: ChildGuard,
    peers: Netns,
    // Dropped last: the namespaces go once Janus is stopped.
    _lab: Lab,
}

impl Janus {
    fn start(run_dir: &Path, cpu: Option<usize>) -> Result<Janus> {
        let lib = lib_dir().ok_or_else(|| anyhow!("Janus is not installed"))?;
        let janus_bin = sys::which("janus").ok_or_else(|| anyhow!("no `janus` on PATH"))?;
        let mut lab = Lab::new()?;
        let server = lab.host("janus")?;
        let peers = lab.host("peers")?;
        lab.attach(&server, "eth0", Cidr::new(JANUS_IP, 24)?)?;
        lab.attach(&peers, "eth0", Cidr::new(PEERS_IP, 24)?)?;
        let dir = run_dir.join("janus-config");
        write_config(&dir, &lib)?;
        let mut cmd = command_in(Some(&server), &janus_bin, cpu);
        cmd.arg("-F")
            .arg(&dir)
            .arg("-C")
            .arg(dir.join("janus.jcfg"));
        let mut child = ChildGuard::spawn(
            "janus",
            cmd,
            &run_dir.join("janus.log"),
            "Install Janus with `cargo xtask setup` (as root).",
        )?;
        child.wait_ready("Janus's HTTP API", Duration::from_secs(15), || {
            http(&peers, "GET", "/janus/info", None).is_ok_and(|v| v["janus"] == "server_info")
        })?;
        Ok(Janus {
            child,
            peers,
            _lab: lab,
        })
    }
}

/// One level: `sessions` echo tests, each fed 50 frames/s (one data-channel message a second
/// too); Janus's CPU per echoed packet over `window` after `warmup`.
async fn level(
    janus: &Janus,
    sessions: usize,
    warmup: Duration,
    window: Duration,
) -> Result<Value> {
    let load = Arc::new(Load::default());
    load.ready_on_connected.store(true, Relaxed);
    let mut peers = Vec::with_capacity(sessions);
    let mut janus_sessions = Vec::with_capacity(sessions);
    let mut setup_error = None;
    for i in 0..sessions {
        let ns = janus.peers.clone();
        let made = tokio::task::spawn_blocking(move || -> Result<(Offer, String, u64)> {
            let socket = ns.within(|| rtc_peer::udp::bind(PEERS_IP.into()))??;
            let offer = Offer::on_socket(socket)?;
            let (answer, session) = echotest_session(&ns, &offer.sdp)?;
            Ok((offer, answer, session))
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        let phase = FRAME_INTERVAL.mul_f64(i as f64 / sessions as f64);
        let started = made.and_then(|(offer, answer, session)| {
            janus_sessions.push(session);
            offer.start(&answer, load.clone(), phase)
        });
        match started {
            Ok(peer) => peers.push(peer),
            Err(e) => {
                setup_error = Some(e.context(format!("setting up echo test session {}", i + 1)));
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while setup_error.is_none()
        && load.ready.load(Relaxed) + load.dead.load(Relaxed) < sessions
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = load.ready.load(Relaxed);
    let pid = janus
        .child
        .pid()
        .ok_or_else(|| anyhow!("Janus has exited"))?;
    let result = if let Some(e) = setup_error {
        Err(e)
    } else if ready < sessions {
        Err(anyhow!(
            "{ready} of {sessions} echo tests connected (ICE state {})",
            crate::peer::ice_state_name(load.ice_state.load(Relaxed))
        ))
    } else {
        load.sending.store(true, Relaxed);
        tokio::time::sleep(warmup).await;
        let (cpu0, sent0, got0) = (
            sys::cpu_secs(pid)?,
            load.frames_sent.load(Relaxed),
            load.frames_received.load(Relaxed),
        );
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let secs = t0.elapsed().as_secs_f64();
        let (cpu1, sent1, got1) = (
            sys::cpu_secs(pid)?,
            load.frames_sent.load(Relaxed),
            load.frames_received.load(Relaxed),
        );
        let echoed = got1.saturating_sub(got0) as f64;
        let sent = sent1.saturating_sub(sent0) as f64;
        Ok(json!({
            "sessions": sessions,
            "sent_per_sec": sys::round1(sent / secs),
            "echoed_per_sec": sys::round1(echoed / secs),
            "loss_pct": sys::round3(if sent > 0.0 { (1.0 - echoed / sent).max(0.0) * 100.0 } else { 0.0 }),
            "janus_cpu_pct": sys::round1((cpu1 - cpu0) / secs * 100.0),
            "janus_cpu_us_per_packet": if echoed > 0.0 { sys::round1((cpu1 - cpu0) * 1e6 / echoed) } else { 0.0 },
        }))
    };
    load.sending.store(false, Relaxed);
    load.stop.store(true, Relaxed);
    for p in peers {
        let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
    }
    let ns = janus.peers.clone();
    tokio::task::spawn_blocking(move || {
        for s in janus_sessions {
            let _ = http(
                &ns,
                "POST",
                &format!("/janus/{s}"),
                Some(&json!({"janus": "destroy", "transaction": transaction()})),
            );
        }
    })
    .await?;
    result
}

/// Echo test sessions for the Janus section: one per 50 echoed packets/s, at 500 and 1,000
/// packets/s (issue 14's own comparison; the capacity levels of 5 and 10 calls relay as much)
/// and at each capacity level's relayed packet rate up to 20,000 (Janus saturates its core
/// well before that, and the section stops there).
pub fn sessions_for(results: &Value, quick: bool) -> Vec<usize> {
    if quick {
        return vec![10];
    }
    let mut sessions = vec![10, 20];
    for l in results["capacity"]["levels"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(rate) = l["relay"]["relayed_packets_per_sec"].as_f64() {
            if rate <= 20_000.0 {
                sessions.push((rate / 50.0).round() as usize);
            }
        }
    }
    sessions.sort_unstable();
    sessions.dedup();
    sessions
}

/// Janus at each number of echo test sessions, stopping at the first level that fails or
/// saturates Janus's core.
pub fn run(
    rt: &tokio::runtime::Runtime,
    run_dir: &Path,
    sessions: &[usize],
    cpu: Option<usize>,
    quick: bool,
) -> Result<Value> {
    let janus = Janus::start(run_dir, cpu)?;
    let (warmup, window) = if quick {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_secs(3), Duration::from_secs(10))
    };
    let mut levels = Vec::new();
    for &n in sessions {
        crate::say(format!("janus: {n} echo test sessions"));
        match rt.block_on(level(&janus, n, warmup, window)) {
            Ok(v) => {
                crate::say(format!(
                    "  {n} sessions: {} echoed/s, Janus {}% CPU, {} µs/packet, loss {}%",
                    v["echoed_per_sec"],
                    v["janus_cpu_pct"],
                    v["janus_cpu_us_per_packet"],
                    v["loss_pct"]
                ));
                let saturated = v["janus_cpu_pct"].as_f64().unwrap_or(0.0) >= 95.0;
                levels.push(v);
                if saturated {
                    break;
                }
            }
            Err(e) => {
                levels.push(json!({"sessions": n, "error": format!("{e:#}")}));
                break;
            }
        }
    }
    drop(janus);
    Ok(json!({ "levels": levels, "plugin": "janus.plugin.echotest", "version": janus_version() }))
}

fn janus_version() -> String {
    std::process::Command::new("janus")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_match_the_capacity_levels_packet_rates_up_to_twenty_thousand() {
        let results = json!({"capacity": {"levels": [
            {"relay": {"relayed_packets_per_sec": 499.8}},
            {"relay": {"relayed_packets_per_sec": 10003.0}},
            {"relay": {"relayed_packets_per_sec": 29537.0}},
            {"relay": {"error": "x"}},
        ]}});
        assert_eq!(sessions_for(&results, false), vec![10, 20, 200]);
        assert_eq!(sessions_for(&json!({}), false), vec![10, 20]);
        assert_eq!(sessions_for(&results, true), vec![10]);
    }
}
