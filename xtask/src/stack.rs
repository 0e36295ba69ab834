//! The one start-up path of the local gateway: echo model (or a real provider), relay, Envoy
//! with the filter. `cargo xtask up` uses it on fixed ports; the end-to-end tests and the
//! benchmarks can use it on ephemeral ports (`StackConfig::ephemeral`) by depending on this
//! crate as a library.
//!
//! It assumes the artifacts exist (`cargo xtask build`, `cargo xtask setup`) and says so when
//! they do not. Every process it starts is owned by a [`ChildGuard`]: stopped by PID when the
//! [`Stack`] is stopped or dropped, in the order Envoy → relay → echo model.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::envoy::{self, Vars};
use crate::launch::{Echo, EchoSpec, Envoy, EnvoySpec, Relay, RelaySpec};
use crate::paths::{Paths, Profile};
use crate::ports::{check_tcp_free, check_udp_free, free_tcp_port, free_udp_port, sockaddr};
use crate::process::ChildGuard;

/// Key that Envoy injects toward the local echo model. Not a secret: the echo model runs on
/// loopback and exists for demos and tests. The echo model requires it (`--api-key-env
/// ECHO_MODEL_API_KEY`), and Envoy gets it as `OPENAI_API_KEY` for its VM environment, so the
/// local stack exercises the same key injection as production.
pub const LOCAL_ECHO_API_KEY: &str = "sk-local-echo-model";
/// The relay-pods key of local runs and `envoy --mode validate` (envoy/envoy-relay-pods.yaml):
/// not a secret, never used by a deployment.
pub const LOCAL_REPLICA_KEY: &str = "local-relay-pods-key-not-a-secret-0000";

/// Where calls go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// Start the local echo model and route every call to it.
    Echo,
    /// A real provider (for example `https://api.openai.com`); its key comes from
    /// `OPENAI_API_KEY` in the environment of `xtask`.
    Provider { base_url: String },
}

#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Loopback address every component binds to.
    pub host: String,
    pub listen_port: u16,
    pub admin_port: u16,
    pub relay_grpc_port: u16,
    pub relay_metrics_port: u16,
    /// The relay's single UDP media port for client legs.
    pub relay_media_port: u16,
    pub echo_port: u16,
    pub upstream: Upstream,
    pub profile: Profile,
    /// Envoy config template (see `envoy` module for placeholders).
    pub envoy_config: PathBuf,
    /// Extra arguments appended to the relay's command line.
    pub relay_args: Vec<String>,
    /// Envoy worker threads (`--concurrency`); `None` lets Envoy pick (one per core).
    pub envoy_concurrency: Option<u32>,
    pub envoy_log_level: String,
    /// Logs and the rendered Envoy config go here.
    pub run_dir: PathBuf,
    /// How long each component may take to become ready.
    pub ready_timeout: Duration,
}

impl StackConfig {
    /// The fixed ports of `cargo xtask up`.
    pub fn local(paths: &Paths) -> Self {
        StackConfig {
            host: "127.0.0.1".into(),
            listen_port: 8080,
            admin_port: 9901,
            relay_grpc_port: 50051,
            relay_metrics_port: 9464,
            relay_media_port: 40000,
            echo_port: 8089,
            upstream: Upstream::Echo,
            profile: Profile::Dev,
            envoy_config: paths.envoy_dir().join("envoy.yaml"),
            relay_args: Vec::new(),
            envoy_concurrency: None,
            envoy_log_level: "info".into(),
            run_dir: paths.scratch().join("up"),
            ready_timeout: Duration::from_secs(30),
        }
    }

    /// Free loopback ports picked by the kernel, a private run directory, one Envoy worker:
    /// for tests and benchmarks that run beside each other and beside `xtask up`.
    pub fn ephemeral(paths: &Paths, name: &str) -> Result<Self> {
        let mut cfg = StackConfig::local(paths);
        cfg.listen_port = free_tcp_port()?;
        cfg.admin_port = free_tcp_port()?;
        cfg.relay_grpc_port = free_tcp_port()?;
        cfg.relay_metrics_port = free_tcp_port()?;
        cfg.relay_media_port = free_udp_port()?;
        cfg.echo_port = free_tcp_port()?;
        cfg.envoy_concurrency = Some(1);
        cfg.envoy_log_level = "warn".into();
        cfg.run_dir = paths
            .scratch()
            .join("runs")
            .join(format!("{name}-{}", std::process::id()));
        Ok(cfg)
    }

    pub fn upstream_url(&self) -> String {
        match &self.upstream {
            Upstream::Echo => format!("http://{}:{}", self.host, self.echo_port),
            Upstream::Provider { base_url } => base_url.trim_end_matches('/').to_string(),
        }
    }

    /// Placeholder values for the Envoy config of this stack.
    pub fn envoy_vars(&self, paths: &Paths) -> Result<Vars> {
        let mut v = Vars::local(paths);
        let h = self.host.clone();
        v.set("LISTEN_ADDR", h.clone())
            .set("LISTEN_PORT", self.listen_port.to_string())
            .set("ADMIN_ADDR", h.clone())
            .set("ADMIN_PORT", self.admin_port.to_string())
            .set("RELAY_GRPC_HOST", h.clone())
            .set("RELAY_GRPC_PORT", self.relay_grpc_port.to_string())
            .set("RELAY_METRICS_PORT", self.relay_metrics_port.to_string())
            .set("RELAY_MEDIA_PORT", self.relay_media_port.to_string());
        v.set_provider(&self.upstream_url())?;
        if let Upstream::Provider { .. } = self.upstream {
            // The provider knows its models better than a list here would.
            v.route_every_model();
        }
        Ok(v)
    }

    pub fn urls(&self) -> Urls {
        let h = &self.host;
        Urls {
            demo_page: format!("http://{h}:{}/", self.listen_port),
            calls: format!("http://{h}:{}/v1/realtime/calls", self.listen_port),
            live_sessions: format!("http://{h}:{}/v1/live/sessions", self.listen_port),
            envoy_admin: format!("http://{h}:{}/", self.admin_port),
            envoy_stats: format!("http://{h}:{}/stats/prometheus", self.admin_port),
            relay_metrics: format!("http://{h}:{}/metrics", self.relay_metrics_port),
            relay_grpc: format!("{h}:{}", self.relay_grpc_port),
            upstream: self.upstream_url(),
        }
    }
}

/// Addresses a person (or a test) uses once the stack is up.
#[derive(Clone, Debug)]
pub struct Urls {
    pub demo_page: String,
    pub calls: String,
    /// GPT-Live session creation (`POST`, JSON).
    pub live_sessions: String,
    pub envoy_admin: String,
    pub envoy_stats: String,
    pub relay_metrics: String,
    pub relay_grpc: String,
    pub upstream: String,
}

/// Running processes of one stack.
pub struct Stack {
    pub config: StackConfig,
    pub urls: Urls,
    /// Dropped after the relay: fields drop in order, but [`Stack::stop`] orders the stop.
    echo: Option<Echo>,
    relay: Relay,
    envoy: Envoy,
}

/// Checks that every artifact the stack needs is there, with the command that makes it.
pub fn check_artifacts(paths: &Paths, cfg: &StackConfig) -> Result<()> {
    let mut missing = Vec::new();
    let envoy = paths.envoy_bin();
    if !envoy.is_file() {
        missing.push(format!("{} (run `cargo xtask setup`)", envoy.display()));
    }
    for bin in [paths.relay_bin(cfg.profile), paths.echo_bin(cfg.profile)] {
        if !bin.is_file() {
            missing.push(format!("{} (run `cargo xtask build`)", bin.display()));
        }
    }
    let wasm = paths.filter_wasm();
    if !wasm.is_file() {
        missing.push(format!("{} (run `cargo xtask build`)", wasm.display()));
    }
    if !cfg.envoy_config.is_file() {
        missing.push(format!(
            "{} (the Envoy config of the local stack; pass another with --envoy-config)",
            cfg.envoy_config.display()
        ));
    }
    if !missing.is_empty() {
        bail!("missing: {}", missing.join("; "));
    }
    Ok(())
}

impl Stack {
    /// Starts the stack and waits until every component answers. On any failure everything
    /// already started is stopped and the error says which component failed and why (with the
    /// tail of its log).
    pub fn start(paths: &Paths, cfg: StackConfig) -> Result<Stack> {
        check_artifacts(paths, &cfg)?;
        let h = cfg.host.as_str();
        let echo = cfg.upstream == Upstream::Echo;
        check_tcp_free(h, cfg.listen_port, "Envoy listener", "--listen-port")?;
        check_tcp_free(h, cfg.admin_port, "Envoy admin", "--admin-port")?;
        check_tcp_free(h, cfg.relay_grpc_port, "relay gRPC", "--relay-grpc-port")?;
        check_tcp_free(
            h,
            cfg.relay_metrics_port,
            "relay metrics",
            "--relay-metrics-port",
        )?;
        check_udp_free(h, cfg.relay_media_port, "relay media", "--media-port")?;
        if echo {
            check_tcp_free(h, cfg.echo_port, "local echo model", "--echo-port")?;
        }
        let provider_key = match &cfg.upstream {
            Upstream::Echo => LOCAL_ECHO_API_KEY.to_string(),
            Upstream::Provider { base_url } => std::env::var("OPENAI_API_KEY")
                .ok()
                .filter(|k| !k.trim().is_empty())
                .ok_or_else(|| {
                    anyhow!(
                        "routing to {base_url} needs the provider's key: export \
                         OPENAI_API_KEY=... and rerun (or drop --upstream to use the local \
                         echo model)"
                    )
                })?,
        };
        std::fs::create_dir_all(&cfg.run_dir)
            .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
        let vars = cfg.envoy_vars(paths)?;
        let rendered = cfg.run_dir.join("envoy.rendered.yaml");
        envoy::render_file(&cfg.envoy_config, &rendered, &vars)?;
        let log = |name: &str| cfg.run_dir.join(format!("{name}.log"));

        // Each started child is dropped, so stopped by PID, if a later one fails.
        let echo_model = if echo {
            Some(Echo::start(&EchoSpec {
                name: "local echo model".into(),
                program: paths.echo_bin(cfg.profile),
                http: sockaddr(h, cfg.echo_port)?,
                media_ip: h
                    .parse()
                    .with_context(|| format!("the stack's host {h} is not an IP address"))?,
                api_key: Some(LOCAL_ECHO_API_KEY.into()),
                netns: None,
                log: log("echo-model"),
                ready_timeout: cfg.ready_timeout,
            })?)
        } else {
            None
        };

        let relay = Relay::start(&RelaySpec {
            name: "relay".into(),
            program: paths.relay_bin(cfg.profile),
            grpc: sockaddr(h, cfg.relay_grpc_port)?,
            metrics: sockaddr(h, cfg.relay_metrics_port)?,
            media: sockaddr(h, cfg.relay_media_port)?,
            allow_upstreams: vec![cfg.upstream_url()],
            // The echo model listens on loopback, which the relay refuses unless told.
            allow_private_upstreams: echo,
            args: cfg.relay_args.clone(),
            env: Vec::new(),
            cpu: None,
            netns: None,
            log: log("relay"),
            ready_timeout: cfg.ready_timeout,
        })?;

        let mut spec = EnvoySpec::new(paths, rendered, log("envoy"));
        spec.concurrency = cfg.envoy_concurrency;
        spec.log_level = cfg.envoy_log_level.clone();
        // The filter reads worker keys from the VM environment (host_env_keys).
        spec.env.push(("OPENAI_API_KEY".into(), provider_key));
        spec.ready_timeout = cfg.ready_timeout;
        let envoy = Envoy::start(
            &spec,
            sockaddr(h, cfg.admin_port)?,
            sockaddr(h, cfg.listen_port)?,
        )?;

        Ok(Stack {
            urls: cfg.urls(),
            config: cfg,
            echo: echo_model,
            relay,
            envoy,
        })
    }

    /// The running children in start order: echo model (if any), relay, Envoy.
    fn children(&mut self) -> Vec<&mut ChildGuard> {
        let mut out: Vec<&mut ChildGuard> = self.echo.iter_mut().map(|e| &mut e.process).collect();
        out.push(&mut self.relay.process);
        out.push(&mut self.envoy.process);
        out
    }

    /// PIDs and log files of the running children, for printing.
    pub fn processes(&self) -> Vec<(String, Option<u32>, PathBuf)> {
        self.echo
            .iter()
            .map(|e| &e.process)
            .chain([&self.relay.process, &self.envoy.process])
            .map(|c| (c.name().to_string(), c.pid(), c.log().to_path_buf()))
            .collect()
    }

    /// `Some(report)` if a child has exited on its own (a crash, a bad flag).
    pub fn check_alive(&mut self) -> Option<String> {
        self.children()
            .into_iter()
            .find_map(|c| c.try_exited().is_some().then(|| c.exit_report()))
    }

    /// Stops every child by PID, Envoy first (no new calls), then the relay (drains), then the
    /// echo model. Also happens on drop.
    pub fn stop(&mut self) {
        for child in self.children().into_iter().rev() {
            child.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::process::Command;

    #[test]
    fn ephemeral_configs_do_not_share_ports_or_run_dirs_with_up() {
        let paths = Paths::discover();
        let local = StackConfig::local(&paths);
        let eph = StackConfig::ephemeral(&paths, "t").unwrap();
        assert_ne!(local.run_dir, eph.run_dir);
        assert_ne!(eph.listen_port, 0);
        let vars = eph.envoy_vars(&paths).unwrap();
        assert_eq!(
            vars.get("LISTEN_PORT"),
            Some(eph.listen_port.to_string().as_str())
        );
        assert_eq!(
            vars.get("WORKER_URL"),
            Some(format!("http://127.0.0.1:{}", eph.echo_port).as_str())
        );
    }

    /// The filter configuration a shipped Envoy config gets from `envoy_vars` (the JSON in
    /// the `google.protobuf.StringValue` of the Wasm filter), parsed by the filter's code.
    fn plugin_config_of(template: &std::path::Path, vars: &Vars) -> realtime_filter_core::Config {
        fn find(y: &yaml_rust2::Yaml) -> Option<String> {
            use yaml_rust2::Yaml;
            match y {
                Yaml::Hash(h) => {
                    let key = |k: &str| h.get(&Yaml::String(k.into()));
                    if key("@type").and_then(Yaml::as_str)
                        == Some("type.googleapis.com/google.protobuf.StringValue")
                    {
                        if let Some(v) = key("value").and_then(Yaml::as_str) {
                            return Some(v.to_string());
                        }
                    }
                    h.values().find_map(find)
                }
                Yaml::Array(a) => a.iter().find_map(find),
                _ => None,
            }
        }
        let text = envoy::render(&std::fs::read_to_string(template).unwrap(), vars).unwrap();
        let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
        let json = docs.iter().find_map(find).expect("a plugin config");
        let env = |_: &str| Some(LOCAL_REPLICA_KEY.to_string());
        realtime_filter_core::Config::from_json(json.as_bytes(), &env)
            .unwrap_or_else(|e| panic!("{}: {e}", template.display()))
    }

    /// `up --upstream URL` sends every model to the provider (a catch-all on the worker's
    /// pool), so the provider answers for names it does not know; the local echo stack
    /// keeps its one model and refuses others itself. Every shipped config that `up` can run
    /// (`--envoy-config`) behaves the same.
    #[test]
    fn up_with_an_upstream_routes_every_model_to_it_and_the_echo_stack_does_not() {
        use realtime_filter_core::model::{self, Match};
        let paths = Paths::discover();
        let mut provider = StackConfig::local(&paths);
        provider.upstream = Upstream::Provider {
            base_url: "https://api.openai.com".into(),
        };
        let echo = StackConfig::local(&paths);
        for name in [
            "envoy.yaml",
            "envoy-two-relays.yaml",
            "envoy-relay-pods.yaml",
        ] {
            let template = paths.envoy_dir().join(name);
            let c = plugin_config_of(&template, &provider.envoy_vars(&paths).unwrap());
            for asked in ["gpt-realtime-2099-01-01", "whisper-1", "gpt-5-ultra"] {
                let r = model::resolve(&c, Some(asked), None)
                    .unwrap_or_else(|e| panic!("{name} with --upstream: {asked}: {e:?}"));
                assert_eq!(r.matched, Match::CatchAll, "{name}: {asked}");
                let entry = &c.models[r.index];
                assert_eq!(r.upstream_default(entry), asked, "{name}");
                let pool = &c.pools[entry.pools[0]];
                assert_eq!(pool.workers[0].base_url, "https://api.openai.com", "{name}");
            }
            let r = model::resolve(&c, Some("gpt-4o-realtime-preview"), None).unwrap();
            assert_eq!(r.matched, Match::Exact, "{name}: the alias stays");

            let c = plugin_config_of(&template, &echo.envoy_vars(&paths).unwrap());
            assert!(
                model::resolve(&c, Some("gpt-realtime"), None).is_ok(),
                "{name}"
            );
            assert_eq!(
                model::resolve(&c, Some("gpt-5-ultra"), None),
                Err(realtime_filter_core::FilterError::ModelNotFound(
                    "gpt-5-ultra".into()
                )),
                "{name}: the echo stack serves its one model only"
            );
        }
    }

    /// Python stand-in for the relay and the echo model: listens on the addresses given by
    /// the flags named in argv[1] (comma-separated), until SIGTERM.
    const STUB: &str = r#"#!/usr/bin/env python3
import signal, socket, sys, time
args = sys.argv[1:]
for flag in ("--grpc-addr", "--metrics-addr", "--http-addr"):
    if flag in args:
        h, p = args[args.index(flag) + 1].rsplit(":", 1)
        s = socket.socket(); s.bind((h, int(p))); s.listen(); globals()[flag] = s
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True: time.sleep(1)
"#;

    const ENVOY: &str = r#"
admin:
  address: {socket_address: {address: "${ADMIN_ADDR}", port_value: ${ADMIN_PORT}}}
static_resources:
  listeners:
  - name: main
    address: {socket_address: {address: "${LISTEN_ADDR}", port_value: ${LISTEN_PORT}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            max_direct_response_body_size_bytes: 65536
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {path: "/"}
                direct_response: {status: 200, body: {filename: "${DEMO_PAGE}"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;

    fn alive(pid: u32) -> bool {
        // Reaped children are gone from /proc; a zombie would still show, so check its state.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    /// The shared start-up path with stand-ins for the relay and the echo model and the real
    /// Envoy: every component becomes ready, the demo page is served on the rendered port, and
    /// dropping the stack stops every child by PID.
    #[test]
    fn stack_starts_and_stops_every_child_by_pid() {
        let mut paths = Paths::discover();
        if !paths.envoy_bin().is_file() || which_python().is_none() {
            // CI installs both (`cargo xtask test` runs setup first): there, a skip would be
            // a silent pass of a test that did not run.
            assert!(
                std::env::var_os("CI").is_none(),
                "needs Envoy (`cargo xtask setup`) and python3, which CI must have"
            );
            // Straight to stderr: the test harness hides eprintln! output of a passing test.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP stack_starts_and_stops_every_child_by_pid: needs Envoy (`cargo xtask setup`) and python3"
            );
            return;
        }
        let tmp = std::env::temp_dir().join(format!("xtask-stack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        paths.target = tmp.join("target");
        for bin in [paths.relay_bin(Profile::Dev), paths.echo_bin(Profile::Dev)] {
            std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
            std::fs::write(&bin, STUB).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::create_dir_all(paths.filter_wasm().parent().unwrap()).unwrap();
        std::fs::write(paths.filter_wasm(), b"").unwrap();
        let mut cfg = StackConfig::ephemeral(&paths, "stack-test").unwrap();
        cfg.envoy_config = tmp.join("envoy.yaml");
        std::fs::write(&cfg.envoy_config, ENVOY).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", cfg.listen_port).parse().unwrap();

        let stack = Stack::start(&paths, cfg).unwrap();
        let pids: Vec<u32> = stack.processes().iter().filter_map(|p| p.1).collect();
        assert_eq!(pids.len(), 3, "echo model, relay, envoy");
        assert!(pids.iter().all(|p| alive(*p)));
        let r = crate::http::get(listen, "/").unwrap();
        let (status, body) = (r.status, r.text());
        assert_eq!(status, 200);
        assert!(body.contains("window.demo"));

        drop(stack);
        for pid in pids {
            assert!(
                !alive(pid),
                "pid {pid} still running after the stack was dropped"
            );
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }

    fn which_python() -> Option<()> {
        Command::new("python3")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| ())
    }

    #[test]
    fn missing_artifacts_name_the_command_that_builds_them() {
        let mut paths = Paths::discover();
        paths.target = std::env::temp_dir().join("xtask-no-such-target");
        let mut cfg = StackConfig::local(&paths);
        cfg.envoy_config = paths.root.join("no-such-envoy.yaml");
        let err = check_artifacts(&paths, &cfg).unwrap_err().to_string();
        assert!(err.contains("cargo xtask build"), "{err}");
        assert!(err.contains("--envoy-config"), "{err}");
    }
}
