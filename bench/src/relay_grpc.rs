//! Processes the benchmark starts itself (a relay pinned to one core, Envoy with a given
//! config), each owned by xtask's `ChildGuard`: stopped by PID on drop, also on failure.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use tonic::transport::Channel;
use xtask::process::ChildGuard;

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts TCP connections on `addr`, or the child exits.
pub fn wait_tcp(child: &mut ChildGuard, addr: SocketAddr, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if child.try_exited().is_some() {
            bail!("{}", child.exit_report());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not listen on {addr} within {within:?}",
                child.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A relay binary on ephemeral loopback ports, pinned to `cpu` (None: not pinned).
pub struct RelayProc {
    pub _child: ChildGuard,
    pub pid: u32,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

impl RelayProc {
    pub fn start(
        bin: &Path,
        upstream: &str,
        cpu: Option<usize>,
        log: &Path,
        extra: &[&str],
    ) -> Result<RelayProc> {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let media = format!("127.0.0.1:{}", free_udp_port()?);
        let mut cmd = pinned_command(bin, cpu);
        cmd.arg(format!("--grpc-addr={grpc}"))
            .arg(format!("--metrics-addr={metrics}"))
            .arg(format!("--media-addr={media}"))
            .arg(format!("--allow-upstream={upstream}"))
            .args([
                "--allow-private-upstreams",
                "--drain-secs=1",
                "--max-calls=5000",
            ])
            .args(extra)
            .env("RUST_LOG", "warn");
        let mut child = ChildGuard::spawn("relay", cmd, log, "Build it: cargo xtask bench")?;
        let pid = child.pid().context("relay pid")?;
        wait_tcp(&mut child, grpc, Duration::from_secs(20))?;
        wait_tcp(&mut child, metrics, Duration::from_secs(5))?;
        Ok(RelayProc {
            _child: child,
            pid,
            grpc,
            metrics,
        })
    }
}

pub async fn grpc_client(addr: SocketAddr) -> Result<RelayServiceClient<Channel>> {
    RelayServiceClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| format!("connecting gRPC to the relay at {addr}"))
}

pub fn create_request(offer: &str, base_url: &str, authorization: &str) -> v1::CreateCallRequest {
    v1::CreateCallRequest {
        call_id: String::new(),
        model: "gpt-realtime".into(),
        upstream_model: String::new(),
        sdp_offer: offer.into(),
        session_json: String::new(),
        upstream: Some(v1::Upstream {
            base_url: base_url.into(),
            authorization: authorization.into(),
            worker_id: "bench".into(),
        }),
        request_id: "bench".into(),
    }
}

/// CreateCall; returns (call id, SDP answer).
pub async fn create_call(
    grpc: &mut RelayServiceClient<Channel>,
    req: v1::CreateCallRequest,
) -> Result<(String, String)> {
    let resp = grpc.create_call(req).await?.into_inner();
    match resp.outcome {
        Some(v1::create_call_response::Outcome::SdpAnswer(a)) => Ok((resp.call_id, a)),
        other => bail!("no SDP answer: {other:?}"),
    }
}

/// Sum of a counter family in the relay's /metrics (all label sets).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn metrics_text(http: &reqwest::Client, addr: SocketAddr) -> Result<String> {
    Ok(http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// Envoy with a rendered config, `--concurrency 1`, pinned to `cpu` if given.
pub struct EnvoyProc {
    pub _child: ChildGuard,
    pub pid: u32,
}

impl EnvoyProc {
    pub fn start(
        bin: &Path,
        config: &Path,
        admin: SocketAddr,
        cpu: Option<usize>,
        log: PathBuf,
    ) -> Result<EnvoyProc> {
        let mut cmd = pinned_command(bin, cpu);
        cmd.arg("-c")
            .arg(config)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .env("OPENAI_API_KEY", xtask::stack::LOCAL_ECHO_API_KEY);
        let mut child = ChildGuard::spawn("envoy", cmd, &log, "Run `cargo xtask setup`.")?;
        let pid = child.pid().context("envoy pid")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if matches!(xtask::stack::http_get(admin, "/ready"), Ok((200, _))) {
                break;
            }
            if child.try_exited().is_some() {
                bail!("{}", child.exit_report());
            }
            if Instant::now() >= deadline {
                bail!("Envoy not ready within 30 s; log {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(EnvoyProc { _child: child, pid })
    }
}

/// `bin`, pinned to one CPU with `taskset` when `cpu` is given, so the process under
/// measurement and the load generator do not share a core.
fn pinned_command(bin: &Path, cpu: Option<usize>) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string()]).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_families_are_summed() {
        let text = "# TYPE x counter\nrealtime_relay_rtp_packets_total{direction=\"a\"} 3\n\
                    realtime_relay_rtp_packets_total{direction=\"b\"} 4\n\
                    realtime_relay_rtp_packets_totalx 100\n";
        assert_eq!(metric_sum(text, "realtime_relay_rtp_packets_total"), 7.0);
    }
}
