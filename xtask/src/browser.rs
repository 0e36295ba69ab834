//! Headless Chromium drives the demo page through a running stack, over the W3C WebDriver
//! protocol spoken by Debian's `chromedriver` (no browser download, no driver crate: a few
//! JSON requests over loopback HTTP).
//!
//! The scenario, in either of the page's APIs: open the page, start a call with Chromium's
//! fake microphone, wait for the data channel and the server's first event, check how the
//! page authenticated (Realtime: a client secret its backend route got; GPT-Live: a session its
//! backend route created), send `response.create` and wait for its echo, wait for inbound
//! audio packets and a non-silent level (Live: and a running `usage.seconds`), save a
//! screenshot, hang up (Live: and see `session.closed`), and check the relay no longer has a
//! live call.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::netns::{maybe_within, Netns};
use crate::process::{command_in, ChildGuard};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Which of the page's APIs a scenario uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoApi {
    /// `POST /v1/realtime/calls` with a client secret; first event `session.created`.
    Realtime,
    /// `POST /v1/live/sessions` through the page's backend; first event `session.started`.
    Live,
}

impl DemoApi {
    fn name(self) -> &'static str {
        match self {
            DemoApi::Realtime => "realtime",
            DemoApi::Live => "live",
        }
    }
}

/// What the browser saw, for the summary.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub api: DemoApi,
    pub call_id: String,
    pub events_in: usize,
    pub inbound_packets: u64,
    pub max_level: f64,
    /// Live: the last `usage.seconds` the page showed (from `session.closed` when it came).
    pub usage_seconds: Option<f64>,
    /// Live: the `reason` of `session.closed`.
    pub closed_reason: Option<String>,
    pub screenshot: PathBuf,
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} call {}, {} events in, {} audio packets in, max level {:.2}",
            self.api.name(),
            self.call_id,
            self.events_in,
            self.inbound_packets,
            self.max_level
        )?;
        if let Some(u) = self.usage_seconds {
            write!(f, ", usage {u:.1} s")?;
        }
        if let Some(r) = &self.closed_reason {
            write!(f, ", closed ({r})")?;
        }
        write!(f, "; screenshot {}", self.screenshot.display())
    }
}

/// One WebDriver request (JSON body) to a chromedriver in `netns` (or here); returns status
/// and body. Page loads can take a while, hence the long read limit.
fn http(
    netns: Option<&Netns>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, String)> {
    let payload = body.map(Value::to_string).unwrap_or_default();
    let r = maybe_within(netns, || {
        crate::http::request_within(
            Duration::from_secs(60),
            addr,
            method,
            path,
            &[("content-type", "application/json")],
            payload.as_bytes(),
        )
    })??;
    Ok((r.status, r.text()))
}

/// A WebDriver session on a chromedriver we started.
struct Session {
    netns: Option<Netns>,
    addr: SocketAddr,
    id: String,
}

impl Session {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let path = format!("/session/{}{path}", self.id);
        let (status, text) = http(self.netns.as_ref(), self.addr, method, &path, body.as_ref())?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("WebDriver {method} {path}: not JSON: {text}"))?;
        if status != 200 {
            bail!("WebDriver {method} {path}: {status}: {}", v["value"]);
        }
        Ok(v["value"].clone())
    }

    fn js(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn demo(&self) -> Result<Value> {
        self.js(
            "const d = window.demo; return {state: d.state, dc: d.dcState, callId: d.callId, \
             error: d.error, inbound: d.inboundPackets, level: d.level, maxLevel: d.maxLevel, \
             auth: d.auth, api: d.api, usage: d.usageSeconds, closedReason: d.closedReason, \
             tokens: d.tokens, responses: d.responses, \
             events: d.events.map(e => e.dir + ':' + e.type)};",
        )
    }

    fn screenshot(&self, path: &Path) -> Result<()> {
        let b64 = self.call("GET", "/screenshot", None)?;
        let bytes = decode_base64(b64.as_str().unwrap_or_default())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// Polls `window.demo` until `done` holds; the error shows the last state seen.
    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let d = self.demo()?;
            if done(&d) {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                bail!("the demo page did not reach `{what}` within {timeout:?}; last state: {d}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn decode_base64(s: &str) -> Result<Vec<u8>> {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHA
            .iter()
            .position(|&a| a == c)
            .ok_or_else(|| anyhow!("invalid base64 in screenshot"))? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// Chromium flags: headless, fake media devices, no background networking (this machine has no
/// network beyond loopback), loopback allowed in WebRTC, real local IPs instead of mDNS names.
/// A page served from an address other than loopback (a host in a network namespace) is not
/// a secure context, where `getUserMedia` does not exist: its origin is declared secure.
fn chrome_args(profile_dir: &Path, page_url: &str) -> Vec<String> {
    [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1000,1250",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile_dir.display())])
    .chain(
        insecure_origin(page_url)
            .map(|o| format!("--unsafely-treat-insecure-origin-as-secure={o}")),
    )
    .collect()
}

/// The origin of an `http://` page that is not on loopback (`None` otherwise).
fn insecure_origin(page_url: &str) -> Option<String> {
    let rest = page_url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
    (!loopback).then(|| format!("http://{authority}"))
}

/// Runs the demo scenario against `page_url`. `relay_metrics` (an address) lets it check that
/// hang-up ended the call on the relay. Artifacts (screenshot, chromedriver log) go to `out`.
pub fn demo_call(
    api: DemoApi,
    page_url: &str,
    relay_metrics: Option<SocketAddr>,
    out: &Path,
) -> Result<DemoReport> {
    demo_call_in(None, api, page_url, relay_metrics, out)
}

/// [`demo_call`] with chromedriver (and so Chromium) started inside network namespace `netns`
/// (a client host), where the WebDriver requests are made too. `relay_metrics` is read from
/// here, not from `netns`.
pub fn demo_call_in(
    netns: Option<&Netns>,
    api: DemoApi,
    page_url: &str,
    relay_metrics: Option<SocketAddr>,
    out: &Path,
) -> Result<DemoReport> {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(tool).exists() {
            bail!("{tool} is missing: run `cargo xtask setup --browser`");
        }
    }
    std::fs::create_dir_all(out)?;
    let addr = maybe_within(netns, crate::ports::free_tcp_addr)??;
    let mut cmd = command_in(netns, Path::new(CHROMEDRIVER), None);
    cmd.arg(format!("--port={}", addr.port()));
    let mut driver = ChildGuard::spawn(
        "chromedriver",
        cmd,
        &out.join("chromedriver.log"),
        "Run `cargo xtask setup --browser`.",
    )?;
    driver.wait_ready(
        &format!("chromedriver on {addr}"),
        Duration::from_secs(15),
        || matches!(http(netns, addr, "GET", "/status", None), Ok((200, _))),
    )?;
    let profile = out.join("chromium-profile");
    let _ = std::fs::remove_dir_all(&profile);
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {"binary": CHROMIUM, "args": chrome_args(&profile, page_url)}
    }}});
    let (status, text) = http(netns, addr, "POST", "/session", Some(&caps))?;
    let v: Value = serde_json::from_str(&text)?;
    let id = v["value"]["sessionId"]
        .as_str()
        .ok_or_else(|| anyhow!("chromedriver refused the session ({status}): {text}"))?
        .to_string();
    let session = Session {
        netns: netns.cloned(),
        addr,
        id,
    };
    let result = scenario(&session, api, page_url, relay_metrics, out);
    if result.is_err() {
        let _ = session.screenshot(&out.join(format!("demo-{}-failure.png", api.name())));
    }
    let _ = session.call("DELETE", "", None);
    result
}

fn scenario(
    s: &Session,
    api: DemoApi,
    page_url: &str,
    relay_metrics: Option<SocketAddr>,
    out: &Path,
) -> Result<DemoReport> {
    s.call("POST", "/url", Some(json!({"url": page_url})))?;
    // The switch as a person uses it: the select changes, the page reacts.
    s.js(&format!(
        "const a = document.getElementById('api'); a.value = '{}'; \
         a.dispatchEvent(new Event('change'));",
        api.name()
    ))?;
    let (first_event, auth) = match api {
        DemoApi::Realtime => ("in:session.created", "client_secret"),
        DemoApi::Live => ("in:session.started", "backend"),
    };
    s.js("document.getElementById('start').click();")?;
    let has = |d: &Value, e: &str| {
        d["events"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(e)))
    };
    let failed = |d: &Value| !d["error"].is_null();
    let d = s.wait_for(
        &format!("data channel open + {first_event}"),
        Duration::from_secs(20),
        |d| failed(d) || (d["dc"] == "open" && has(d, first_event)),
    )?;
    if failed(&d) {
        bail!("the call failed: {}", d["error"]);
    }
    if d["api"] != api.name() {
        bail!(
            "the page did not switch to {} (api: {})",
            api.name(),
            d["api"]
        );
    }
    // The page holds no key: Realtime calls with a client secret its backend got; a Live
    // session is created by its backend.
    if d["auth"] != auth {
        bail!(
            "the call was not authenticated by `{auth}` (auth: {})",
            d["auth"]
        );
    }
    s.js("window.demo.send({type: 'response.create'});")?;
    s.wait_for("echo of response.create", Duration::from_secs(5), |d| {
        has(d, "in:response.create")
    })?;
    if api == DemoApi::Realtime {
        // The response's usage, summed by the page from response.done.
        s.wait_for(
            "response.done counted as usage",
            Duration::from_secs(5),
            |d| d["responses"].as_u64() == Some(1) && d["tokens"].as_u64().unwrap_or(0) > 0,
        )?;
    }
    let d = s.wait_for(
        "inbound audio packets and a non-silent level",
        Duration::from_secs(10),
        |d| {
            d["inbound"].as_u64().unwrap_or(0) >= 25 && d["maxLevel"].as_f64().unwrap_or(0.0) > 0.01
        },
    )?;
    // Chromium's fake microphone beeps once a second: take the picture while the returned
    // beep moves the level meter, so the screenshot shows audio coming back (best effort;
    // the level was checked above).
    let _ = s.wait_for(
        "a returned beep on the meter",
        Duration::from_secs(3),
        |d| d["level"].as_f64().unwrap_or(0.0) > 0.02,
    );
    let d = match api {
        DemoApi::Realtime => d,
        // Cumulative seconds, at least one report of them (the provider sends one a second).
        DemoApi::Live => s.wait_for(
            "session.usage.updated with usage.seconds shown",
            Duration::from_secs(5),
            |d| has(d, "in:session.usage.updated") && d["usage"].as_f64().unwrap_or(0.0) > 0.0,
        )?,
    };
    let screenshot = out.join(format!("demo-{}.png", api.name()));
    s.screenshot(&screenshot)?;
    s.js("document.getElementById('hangup').click();")?;
    let closed = s.wait_for("closed after hang-up", Duration::from_secs(5), |d| {
        d["state"] == "closed"
    })?;
    if !closed["error"].is_null() {
        bail!("the hang-up failed: {}", closed["error"]);
    }
    let closed_reason = closed["closedReason"].as_str().map(str::to_string);
    if api == DemoApi::Live && !has(&closed, "in:session.closed") {
        bail!("no session.closed reached the page after the hang-up: {closed}");
    }
    if let Some(addr) = relay_metrics {
        wait_no_live_calls(addr)?;
    }
    Ok(DemoReport {
        api,
        call_id: d["callId"].as_str().unwrap_or_default().to_string(),
        events_in: d["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e.as_str().is_some_and(|e| e.starts_with("in:")))
                    .count()
            })
            .unwrap_or(0),
        inbound_packets: d["inbound"].as_u64().unwrap_or(0),
        max_level: d["maxLevel"].as_f64().unwrap_or(0.0),
        usage_seconds: closed["usage"].as_f64(),
        closed_reason,
        screenshot,
    })
}

/// The relay's `realtime_relay_calls_active` gauge falls to 0 after the hang-up.
fn wait_no_live_calls(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = crate::http::get(addr, "/metrics")?.text();
        let active = crate::metrics::value(&body, "realtime_relay_calls_active")
            .context("cannot check hang-up")?;
        match active {
            0.0 => return Ok(()),
            n if Instant::now() >= deadline => {
                bail!("the relay still reports {n} live call(s) after hang-up")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Starts a stack on ephemeral ports (echo model, relay, Envoy with `envoy/envoy.yaml`) and
/// runs [`demo_call`] against it, a Realtime call then a GPT-Live session. Artifacts go to
/// `<target>/xtask/browser/`.
pub fn demo_call_on_stack(paths: &crate::paths::Paths) -> Result<Vec<DemoReport>> {
    let cfg = crate::stack::StackConfig::ephemeral(paths, "browser")?;
    let out = paths.scratch().join("browser");
    let stack = crate::stack::Stack::start(paths, cfg)?;
    let metrics: SocketAddr = format!("{}:{}", stack.config.host, stack.config.relay_metrics_port)
        .parse()
        .context("relay metrics address")?;
    [DemoApi::Realtime, DemoApi::Live]
        .into_iter()
        .map(|api| demo_call(api, &stack.urls.demo_page, Some(metrics), &out))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_origins_off_loopback_are_declared_secure() {
        assert_eq!(insecure_origin("http://127.0.0.1:8080/"), None);
        assert_eq!(insecure_origin("http://localhost:8080/"), None);
        assert_eq!(insecure_origin("https://198.18.0.20/"), None);
        assert_eq!(
            insecure_origin("http://198.18.0.20:8080/"),
            Some("http://198.18.0.20:8080".into())
        );
    }

    #[test]
    fn base64_and_chunked_bodies_decode() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        // Chunked bodies: the shared client's `http::tests::chunked_bodies_decode`.
    }
}
