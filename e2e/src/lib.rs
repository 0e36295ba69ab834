//! End-to-end test harness: the gateway's real processes on ephemeral loopback ports, started
//! with xtask's launchers (the code `cargo xtask up` runs) and stopped by PID when dropped,
//! also when a test panics.
//!
//! - [`RunDir`]: one test's rendered configs and logs, kept when the test fails.
//! - [`EnvoyOptions`]: Envoy with the filter on `envoy/envoy.yaml` (or another template), on
//!   this run's ports, in front of a relay and a provider (closed ports unless given);
//!   [`EnvoyOptions::start`] waits for admin `/ready`, [`EnvoyOptions::validate`] runs
//!   `envoy --mode validate`, [`EnvoyOptions::on_ports_of`] starts it again on the ports
//!   of an earlier run.
//! - [`start_relay`]: the relay binary allowing the given upstreams.
//! - [`start_echo`]: the echo model binary (the local provider) as its own process.
//! - [`FakeUpstream`]: a tiny HTTP/1.1 provider stand-in that records requests.
//!
//! Requests go through xtask's one HTTP/1.1 client ([`http`]), which sends paths, headers and
//! bodies byte for byte; metrics are read with [`metrics::value`], which fails on a metric
//! that does not exist. Errors are `anyhow` (this is test tooling).

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
pub use xtask::envoy::Vars;
use xtask::envoy::{patch, render, replace_plugin_config, DEFAULT_MODEL};
pub use xtask::http;
use xtask::launch::EnvoySpec;
pub use xtask::launch::RelaySpec;
pub use xtask::launch::{Echo, EchoSpec, Envoy, Relay, Validation};
pub use xtask::metrics;
pub use xtask::paths::Paths;
use xtask::paths::Profile;
pub use xtask::ports::free_tcp_addr;
use xtask::ports::free_tcp_port;
use xtask::stack::{check_artifacts, StackConfig};

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
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
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

/// What to run Envoy with.
#[derive(Debug, Clone, Default)]
pub struct EnvoyOptions {
    /// Relay gRPC port (default: a closed port: relay down).
    pub relay_port: Option<u16>,
    /// Provider port for pass-through routes (default: a closed port).
    pub provider_port: Option<u16>,
    /// Replacement plugin configuration JSON.
    pub plugin_config: Option<String>,
    /// Environment of the Envoy process (keys reach the VM via host_env_keys).
    pub env: Vec<(String, String)>,
    /// Extra placeholder values (override the defaults).
    pub vars: Vars,
    /// Another bootstrap (default `envoy/envoy.yaml`).
    pub template: Option<PathBuf>,
    /// Literal text replacements applied to the rendered config (each must match).
    pub patches: Vec<(String, String)>,
}

impl EnvoyOptions {
    /// Starts Envoy and waits for admin `/ready` and the listener. Dropping it kills it at
    /// once.
    pub fn start(&self, paths: &Paths, dir: &RunDir) -> Result<Envoy> {
        self.start_as(paths, dir, "envoy")
    }

    /// [`EnvoyOptions::start`] with its config and log named `name` (`<name>.yaml`,
    /// `<name>.log`), so a second Envoy of the same test keeps the first one's log.
    pub fn start_as(&self, paths: &Paths, dir: &RunDir, name: &str) -> Result<Envoy> {
        let (spec, admin, listen) = self.prepare(paths, dir, name)?;
        let mut envoy = Envoy::start(&spec, admin, listen)?;
        envoy.process.set_drop_grace(Duration::ZERO);
        Ok(envoy)
    }

    /// These options on the listener and admin ports of `envoy`: to start Envoy again where
    /// clients already reach it, once `envoy` is stopped.
    pub fn on_ports_of(&self, envoy: &Envoy) -> EnvoyOptions {
        let mut opts = self.clone();
        opts.vars
            .set("LISTEN_PORT", envoy.listen().port().to_string())
            .set("ADMIN_PORT", envoy.admin().port().to_string());
        opts
    }

    /// `envoy --mode validate` on the rendered config.
    pub fn validate(&self, paths: &Paths, dir: &RunDir) -> Result<Validation> {
        let (spec, _, _) = self.prepare(paths, dir, "envoy-validate")?;
        Envoy::validate(&spec)
    }

    /// Renders the template for this run; returns how to run Envoy and its admin and
    /// listener addresses.
    fn prepare(
        &self,
        paths: &Paths,
        dir: &RunDir,
        name: &str,
    ) -> Result<(EnvoySpec, SocketAddr, SocketAddr)> {
        check_artifacts(paths, &StackConfig::local(paths))?;
        // Fixed in `vars` (a restart on an earlier run's ports), else free ones.
        let port = |name: &str| match self.vars.get(name) {
            Some(p) => p
                .parse::<u16>()
                .with_context(|| format!("{name} {p:?} is not a port")),
            None => free_tcp_port(),
        };
        let (listen, admin) = (port("LISTEN_PORT")?, port("ADMIN_PORT")?);
        let relay = self.relay_port.map_or_else(free_tcp_port, Ok)?;
        let provider = self.provider_port.map_or_else(free_tcp_port, Ok)?;
        let mut vars = Vars::local(paths);
        vars.set("LISTEN_PORT", listen.to_string())
            .set("ADMIN_PORT", admin.to_string())
            .set("RELAY_GRPC_PORT", relay.to_string())
            // second relay replica (envoy/envoy-two-relays.yaml); down unless set in `vars`
            .set("RELAY2_GRPC_PORT", free_tcp_port()?.to_string())
            .set("DEFAULT_MODEL", DEFAULT_MODEL);
        vars.set_provider(&format!("http://127.0.0.1:{provider}"))?;
        vars.0.extend(self.vars.0.clone());
        let template = self
            .template
            .clone()
            .unwrap_or_else(|| paths.envoy_dir().join("envoy.yaml"));
        let text = std::fs::read_to_string(&template)
            .with_context(|| format!("reading {}", template.display()))?;
        let mut text = render(&text, &vars)?;
        if let Some(json) = &self.plugin_config {
            text = replace_plugin_config(&text, json)?;
        }
        let text = patch(&text, &self.patches)
            .with_context(|| format!("patching {}", template.display()))?;
        let config = dir.path.join(format!("{name}.yaml"));
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let mut spec = EnvoySpec::new(paths, config, dir.path.join(format!("{name}.log")));
        spec.concurrency = Some(2);
        spec.env.extend(self.env.iter().cloned());
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Ok((spec, loopback(admin), loopback(listen)))
    }
}

/// The relay binary (`realtime-relay`) on ephemeral loopback ports allowing `upstreams`
/// (loopback allowed), one media shard, a one-second drain; killed at once when dropped.
pub fn start_relay(paths: &Paths, dir: &RunDir, name: &str, upstreams: &[String]) -> Result<Relay> {
    start_relay_with(paths, dir, name, upstreams, |_| {})
}

/// [`start_relay`] with changes to its launch (addresses, flags, environment).
pub fn start_relay_with(
    paths: &Paths,
    dir: &RunDir,
    name: &str,
    upstreams: &[String],
    edit: impl FnOnce(&mut RelaySpec),
) -> Result<Relay> {
    let mut spec = RelaySpec::ephemeral(
        name,
        paths.relay_bin(Profile::Dev),
        dir.path.join(format!("{name}.log")),
    )?;
    spec.allow_upstreams = upstreams.to_vec();
    spec.allow_private_upstreams = true;
    spec.args = vec!["--media-shards=1".into(), "--drain-secs=1".into()];
    edit(&mut spec);
    let mut relay = Relay::start(&spec)?;
    relay.process.set_drop_grace(Duration::ZERO);
    Ok(relay)
}

/// The echo model binary (`echo-model`, the local provider) on an ephemeral loopback port,
/// requiring `api_key` when given; killed at once when dropped (or by PID before, to stand
/// for a provider that dies).
pub fn start_echo(paths: &Paths, dir: &RunDir, name: &str, api_key: Option<&str>) -> Result<Echo> {
    let spec = EchoSpec {
        name: name.to_string(),
        program: paths.echo_bin(Profile::Dev),
        http: free_tcp_addr()?,
        media_ip: [127, 0, 0, 1].into(),
        api_key: api_key.map(str::to_string),
        netns: None,
        log: dir.path.join(format!("{name}.log")),
        ready_timeout: Duration::from_secs(20),
    };
    let mut echo = Echo::start(&spec)?;
    echo.process.set_drop_grace(Duration::ZERO);
    Ok(echo)
}

/// A tiny HTTP/1.1 server answering every request with a fixed response and recording it.
pub struct FakeUpstream {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<http::Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn start(status: u16, content_type: &str, body: &str) -> Result<FakeUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fake upstream")?;
        let port = listener.local_addr()?.port();
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

    pub fn recorded(&self) -> Vec<http::Request> {
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
