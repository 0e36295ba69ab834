//! Starting one component of the gateway as a child process and waiting until it answers:
//! the echo model, the relay binary and Envoy, each optionally inside a network namespace
//! ([`crate::netns`]; readiness probes and metric reads then run inside it too).
//! [`crate::stack::Stack`] composes them into the local stack; the end-to-end tests and the
//! benchmarks compose them their own way (several relays, a patched Envoy config, a pinned
//! CPU, hosts in namespaces) with the same code. Every process is owned by a
//! [`ChildGuard`], so it is stopped by PID when the component is dropped.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::http;
use crate::metrics;
use crate::netns::{maybe_within, Netns};
use crate::paths::Paths;
use crate::ports::{accepts_tcp, free_tcp_addr, free_udp_addr};
use crate::process::{command_in, ChildGuard};

/// Whether `addr` accepts TCP connections, seen from `netns` (or from here).
fn accepts_tcp_in(netns: Option<&Netns>, addr: SocketAddr) -> bool {
    maybe_within(netns, || accepts_tcp(addr)).unwrap_or(false)
}

/// GET `path` on `addr`, from inside `netns` when given.
fn get_in(netns: Option<&Netns>, addr: SocketAddr, path: &str) -> Result<http::Response> {
    maybe_within(netns, || http::get(addr, path))?
}

/// How to run the echo model (the local provider speaking the Realtime WebRTC protocol).
#[derive(Clone, Debug)]
pub struct EchoSpec {
    pub name: String,
    pub program: PathBuf,
    /// `POST /v1/realtime/calls` listens here.
    pub http: SocketAddr,
    /// Per-call UDP sockets bind this IP and advertise it in host candidates.
    pub media_ip: IpAddr,
    /// The key clients must present (`Authorization: Bearer`); `None` accepts any.
    pub api_key: Option<String>,
    /// Run inside this network namespace.
    pub netns: Option<Netns>,
    pub log: PathBuf,
    pub ready_timeout: Duration,
}

impl EchoSpec {
    fn command(&self) -> Command {
        let mut cmd = command_in(self.netns.as_ref(), &self.program, None);
        cmd.arg("--http-addr")
            .arg(self.http.to_string())
            .arg("--media-ip")
            .arg(self.media_ip.to_string())
            .env_remove("OPENAI_API_KEY");
        if let Some(key) = &self.api_key {
            cmd.args(["--api-key-env", "ECHO_MODEL_API_KEY"])
                .env("ECHO_MODEL_API_KEY", key);
        }
        cmd
    }
}

/// A running echo model, ready once its HTTP port accepts connections.
pub struct Echo {
    pub process: ChildGuard,
    pub http: SocketAddr,
}

impl Echo {
    pub fn start(spec: &EchoSpec) -> Result<Echo> {
        let mut process = ChildGuard::spawn(
            &spec.name,
            spec.command(),
            &spec.log,
            "Run `cargo xtask build`.",
        )?;
        let addr = spec.http;
        process.wait_ready(
            &format!("{} on {addr}", spec.name),
            spec.ready_timeout,
            || accepts_tcp_in(spec.netns.as_ref(), addr),
        )?;
        Ok(Echo {
            process,
            http: spec.http,
        })
    }

    /// The base URL workers use (`http://<http addr>`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }
}

/// How to run the relay binary.
#[derive(Clone, Debug)]
pub struct RelaySpec {
    /// Name in logs and error messages (`relay`, `relay-a`, ...).
    pub name: String,
    pub program: PathBuf,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub media: SocketAddr,
    pub allow_upstreams: Vec<String>,
    /// Lets the relay call loopback and private upstreams (the local echo model, in-process
    /// test providers), which it refuses by default.
    pub allow_private_upstreams: bool,
    /// Appended to the command line.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Pin to this CPU (`taskset`).
    pub cpu: Option<usize>,
    /// Run inside this network namespace.
    pub netns: Option<Netns>,
    pub log: PathBuf,
    pub ready_timeout: Duration,
}

impl RelaySpec {
    /// The relay at `program` on free loopback ports.
    pub fn ephemeral(name: &str, program: PathBuf, log: PathBuf) -> Result<Self> {
        Ok(RelaySpec {
            name: name.to_string(),
            program,
            grpc: free_tcp_addr()?,
            metrics: free_tcp_addr()?,
            media: free_udp_addr()?,
            allow_upstreams: Vec::new(),
            allow_private_upstreams: false,
            args: Vec::new(),
            env: Vec::new(),
            cpu: None,
            netns: None,
            log,
            ready_timeout: Duration::from_secs(20),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = command_in(self.netns.as_ref(), &self.program, self.cpu);
        cmd.arg("--grpc-addr")
            .arg(self.grpc.to_string())
            .arg("--metrics-addr")
            .arg(self.metrics.to_string());
        // An explicit `--media-addr` in `args` (e.g. `xtask up --relay-arg=--media-addr=0.0.0.0:P`,
        // as docs/operations.md shows) replaces ours: the relay takes the flag only once.
        if !self.args.iter().any(|a| a.starts_with("--media-addr")) {
            cmd.arg("--media-addr").arg(self.media.to_string());
        }
        for upstream in &self.allow_upstreams {
            cmd.arg("--allow-upstream").arg(upstream);
        }
        if self.allow_private_upstreams {
            cmd.arg("--allow-private-upstreams");
        }
        // The relay never needs a provider key of its own: keys travel per call.
        cmd.args(&self.args)
            .env_remove("OPENAI_API_KEY")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// A running relay, ready once its gRPC and metrics ports accept connections.
pub struct Relay {
    pub process: ChildGuard,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub media: SocketAddr,
    /// The namespace it runs in (metrics are read from there).
    pub netns: Option<Netns>,
}

impl Relay {
    pub fn start(spec: &RelaySpec) -> Result<Relay> {
        let mut process = ChildGuard::spawn(
            &spec.name,
            spec.command(),
            &spec.log,
            "Run `cargo xtask build`.",
        )?;
        for addr in [spec.grpc, spec.metrics] {
            process.wait_ready(
                &format!("{} on {addr}", spec.name),
                spec.ready_timeout,
                || accepts_tcp_in(spec.netns.as_ref(), addr),
            )?;
        }
        Ok(Relay {
            process,
            grpc: spec.grpc,
            metrics: spec.metrics,
            media: spec.media,
            netns: spec.netns.clone(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The relay's `/metrics` text.
    pub fn metrics_text(&self) -> Result<String> {
        let r = get_in(self.netns.as_ref(), self.metrics, "/metrics")?;
        if r.status != 200 {
            bail!(
                "{} /metrics answered {}: {}",
                self.process.name(),
                r.status,
                r.text()
            );
        }
        Ok(r.text())
    }

    /// One metric, summed over its label sets; an error if the relay has no such metric.
    pub fn metric(&self, name: &str) -> Result<f64> {
        metrics::value(&self.metrics_text()?, name)
    }

    /// Polls `name` until it equals `want` or `timeout` passes; returns the last value.
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

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// The VM environment variable of the shipped envoy/*.yaml holding the key that signs the
/// gateway's client secrets (`callers.ephemeral_keys.key_envs`).
pub const EPHEMERAL_SIGNING_KEY_ENV: &str = "EPHEMERAL_SIGNING_KEY";
/// The variable holding the API key of the demo page's backend (`callers.api_keys`,
/// `key_env`), which envoy/*.yaml's `/demo/client_secret` route presents to mint a key.
pub const DEMO_BACKEND_KEY_ENV: &str = "DEMO_BACKEND_KEY";

/// The local gateway's secrets: a signing key for client secrets and the demo backend's API
/// key, random for each Envoy the project starts (never a fixed value in the repository: a
/// key minted by one run is refused by the next).
pub fn local_gateway_secrets() -> Vec<(String, String)> {
    vec![
        (EPHEMERAL_SIGNING_KEY_ENV.into(), random_hex(32)),
        (
            DEMO_BACKEND_KEY_ENV.into(),
            format!("sk-local-demo-backend-{}", random_hex(24)),
        ),
    ]
}

/// `n` random bytes as hex, from the kernel's CSPRNG (`/dev/urandom`); should that be
/// unreadable, from std's randomly keyed SipHash (per-process OS randomness).
fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    let from_kernel = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !from_kernel {
        use std::hash::{BuildHasher, Hasher};
        let state = std::collections::hash_map::RandomState::new();
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = state.build_hasher();
            h.write_usize(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            for (b, x) in chunk.iter_mut().zip(h.finish().to_le_bytes()) {
                *b = x;
            }
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How to run Envoy on an already rendered config (see [`crate::envoy::render_file`]).
#[derive(Clone, Debug)]
pub struct EnvoySpec {
    pub program: PathBuf,
    pub config: PathBuf,
    /// Worker threads; `None` lets Envoy pick (one per core).
    pub concurrency: Option<u32>,
    pub log_level: String,
    /// Environment of the Envoy process. The filter reads worker keys from the VM
    /// environment (`host_env_keys`), which comes from here and from nowhere else: the
    /// caller's own `OPENAI_API_KEY` and local gateway secrets are removed. [`EnvoySpec::new`]
    /// starts it with fresh [`local_gateway_secrets`]; add to it (a later entry wins).
    pub env: Vec<(String, String)>,
    /// Pin to this CPU (`taskset`).
    pub cpu: Option<usize>,
    /// Run inside this network namespace.
    pub netns: Option<Netns>,
    pub log: PathBuf,
    pub ready_timeout: Duration,
}

impl EnvoySpec {
    /// The project's Envoy (`.venv`, from `cargo xtask setup`) with Envoy's own defaults.
    pub fn new(paths: &Paths, config: PathBuf, log: PathBuf) -> Self {
        EnvoySpec {
            program: paths.envoy_bin(),
            config,
            concurrency: None,
            log_level: "info".into(),
            env: local_gateway_secrets(),
            cpu: None,
            netns: None,
            log,
            ready_timeout: Duration::from_secs(30),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = command_in(self.netns.as_ref(), &self.program, self.cpu);
        cmd.arg("-c")
            .arg(&self.config)
            .args(["--disable-hot-restart", "--log-level"])
            .arg(&self.log_level)
            .env_remove("OPENAI_API_KEY")
            .env_remove(EPHEMERAL_SIGNING_KEY_ENV)
            .env_remove(DEMO_BACKEND_KEY_ENV)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(n) = self.concurrency {
            cmd.arg("--concurrency").arg(n.to_string());
        }
        cmd
    }
}

/// What `envoy --mode validate` said about a config.
#[derive(Debug)]
pub struct Validation {
    pub valid: bool,
    /// Everything Envoy printed (stdout and stderr).
    pub log: String,
}

/// A running Envoy, ready once its admin `/ready` answers 200 and its listener accepts.
pub struct Envoy {
    pub process: ChildGuard,
    admin: SocketAddr,
    listen: SocketAddr,
    netns: Option<Netns>,
}

impl Envoy {
    /// Starts Envoy and waits until the config's `admin` address says `/ready` and its
    /// `listen` address accepts connections.
    pub fn start(spec: &EnvoySpec, admin: SocketAddr, listen: SocketAddr) -> Result<Envoy> {
        let mut process = ChildGuard::spawn(
            "envoy",
            spec.command(),
            &spec.log,
            "Run `cargo xtask setup`.",
        )?;
        let ns = spec.netns.as_ref();
        process.wait_ready(
            "Envoy (admin /ready)",
            spec.ready_timeout,
            || matches!(get_in(ns, admin, "/ready"), Ok(r) if r.status == 200),
        )?;
        process.wait_ready(
            &format!("Envoy listener on {listen}"),
            spec.ready_timeout,
            || accepts_tcp_in(ns, listen),
        )?;
        Ok(Envoy {
            process,
            admin,
            listen,
            netns: spec.netns.clone(),
        })
    }

    /// Runs `envoy --mode validate` on the config: it loads the Wasm filter and runs its
    /// `on_configure`, so a plugin config the filter refuses is invalid here too.
    pub fn validate(spec: &EnvoySpec) -> Result<Validation> {
        let mut cmd = spec.command();
        cmd.args(["--mode", "validate"]);
        let mut process = ChildGuard::spawn(
            "envoy --mode validate",
            cmd,
            &spec.log,
            "Run `cargo xtask setup`.",
        )?;
        let Some(status) = process.wait_exit(spec.ready_timeout) else {
            bail!(
                "envoy --mode validate did not finish within {:?}",
                spec.ready_timeout
            );
        };
        Ok(Validation {
            valid: status.success(),
            log: process.log_text(),
        })
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The namespace it runs in, if any.
    pub fn netns(&self) -> Option<&Netns> {
        self.netns.as_ref()
    }

    /// One statistic of `/stats/prometheus`, summed over its label sets; an error if Envoy
    /// has no such statistic.
    pub fn stat(&self, name: &str) -> Result<f64> {
        let r = get_in(self.netns.as_ref(), self.admin, "/stats/prometheus")?;
        metrics::value(&r.text(), name)
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}
