//! Wiring the relay into a process: the media port, gRPC (with health and reflection),
//! the metrics endpoint, and graceful drain. Tests start it in-process on ephemeral
//! loopback ports through [`start`].

use crate::allowlist::{Allowlist, AllowlistEntryError};
use crate::config::{Args, ConfigError};
use crate::grpc::RelayGrpc;
use crate::media_socket::ClientPort;
use crate::media_tcp::TcpPort;
use crate::metrics::Metrics;
use crate::relay::{Relay, RelaySettings};
use crate::replica::{Peers, ReplicaIdentity};
use crate::shard::Shards;
use crate::signaling::UpstreamClientError;
use realtime_relay_proto::v1::relay_service_server::RelayServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Why the relay could not start; each names the flag or address to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind the media port {addr}: {source} (is it in use?)")]
    MediaPort {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for ICE-TCP on --media-tcp-addr {addr}: {source} (is it in use?)")]
    MediaTcpPort {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for {what} on {addr}: {source} (is it in use?)")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--upstream-stun-server {server}: {source}")]
    StunLookup {
        server: String,
        source: std::io::Error,
    },
    #[error("--upstream-stun-server {0}: no address")]
    StunNoAddress(String),
    /// An `--allow-upstream` entry that is not an absolute http(s) URL.
    #[error(transparent)]
    Allowlist(#[from] AllowlistEntryError),
    /// The relay's own set-up (its upstream HTTP client).
    #[error(transparent)]
    Relay(#[from] UpstreamClientError),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("reading the bound address: {0}")]
    LocalAddr(std::io::Error),
}

pub struct RunningRelay {
    pub relay: Arc<Relay>,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub media_addr: SocketAddr,
    /// The ICE-TCP listener's bound address, when `--media-tcp-addr` is set.
    pub media_tcp_addr: Option<SocketAddr>,
    health: tonic_health::server::HealthReporter,
    grpc_stop: Option<oneshot::Sender<()>>,
    grpc_task: JoinHandle<()>,
    metrics_task: JoinHandle<()>,
    /// Resolves the --peers names; None without them.
    peers_task: Option<JoinHandle<()>>,
    drain_timeout: Duration,
}

pub async fn start(args: &Args) -> Result<RunningRelay, StartError> {
    args.validate()?;
    let limits = args.limits();
    let metrics = Arc::new(Metrics::new());
    let shards = if args.media_shards == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        args.media_shards
    };
    let port =
        ClientPort::bind_with_buffers(args.media_addr, shards, args.media_socket_buffer_bytes)
            .map_err(|source| StartError::MediaPort {
                addr: args.media_addr,
                source,
            })?;
    let media_addr = port.local_addr();
    let mut advertised = args.advertised_media_addr()?;
    if args.public_port.is_none() {
        // --media-addr with port 0 (tests): advertise the port we actually got.
        advertised.set_port(media_addr.port());
    }
    let port = Arc::new(port);
    let media_shards = Arc::new(Shards::start(port.clone(), metrics.clone()).map_err(
        |source| StartError::MediaPort {
            addr: args.media_addr,
            source,
        },
    )?);
    let (tcp_port, advertised_tcp) = match (args.media_tcp_addr, args.advertised_media_tcp_addr()?)
    {
        (Some(addr), Some(mut advertised_tcp)) => {
            let tcp = TcpPort::bind(addr, args.tcp_limits(), metrics.media_tcp.clone())
                .map_err(|source| StartError::MediaTcpPort { addr, source })?;
            if args.public_tcp_port.is_none() {
                // --media-tcp-addr with port 0 (tests): advertise the port we actually got.
                advertised_tcp.set_port(tcp.local_addr().port());
            }
            tcp.spawn_accept()
                .map_err(|source| StartError::MediaTcpPort { addr, source })?;
            tracing::info!(bound = %tcp.local_addr(), advertised = %advertised_tcp, "ICE-TCP listening");
            (Some(Arc::new(tcp)), Some(advertised_tcp))
        }
        _ => (None, None),
    };
    let media_tcp_addr = tcp_port.as_ref().map(|p| p.local_addr());
    let allowlist = Allowlist::new(&args.allow_upstreams, args.allow_private_upstreams)?;
    let mut peers_task = None;
    let upstream_stun = match &args.upstream_stun_server {
        Some(server) => {
            let addr = tokio::net::lookup_host(server.as_str())
                .await
                .map_err(|source| StartError::StunLookup {
                    server: server.clone(),
                    source,
                })?
                .next()
                .ok_or_else(|| StartError::StunNoAddress(server.clone()))?;
            Some((addr, Duration::from_millis(args.upstream_stun_timeout_ms)))
        }
        None => None,
    };
    let replica = args.replica()?.map(|(addr, key)| {
        let peers = Arc::new(Peers::new(addr));
        if !args.peers.is_empty() {
            peers_task = Some(peers.clone().spawn_refresh(
                args.peers.clone(),
                Duration::from_secs(args.peers_refresh_secs),
            ));
        }
        tracing::info!(replica_addr = %addr, peers = ?args.peers, "running as one of several replicas");
        (ReplicaIdentity::new(addr, &key), peers)
    });
    let relay = Arc::new(Relay::new(
        RelaySettings {
            limits,
            advertised_media_addr: advertised,
            advertised_media_tcp_addr: advertised_tcp,
            upstream_media_ip: args.upstream_media_ip,
            upstream_stun,
            replica,
        },
        allowlist,
        port,
        media_shards,
        tcp_port,
        metrics.clone(),
    )?);

    // gRPC with health and reflection.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RelayServiceServer<RelayGrpc>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(realtime_relay_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .map_err(|source| StartError::Listen {
            what: "gRPC",
            addr: args.grpc_addr,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(StartError::LocalAddr)?;
    let (grpc_stop, stop_rx) = oneshot::channel::<()>();
    let service = RelayServiceServer::new(RelayGrpc {
        relay: relay.clone(),
    })
    // Offers are a few KiB; 1 MiB is far above any legitimate request.
    .max_decoding_message_size(1024 * 1024);
    let grpc_task = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .timeout(Duration::from_secs(60))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service)
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY, Nagle holds back the small frames that end each
                // gRPC response until the peer's delayed ACK: ~40 ms on every CreateCall.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    // Metrics over plain HTTP.
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| StartError::Listen {
            what: "metrics",
            addr: args.metrics_addr,
            source,
        })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(StartError::LocalAddr)?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get({
                let metrics = metrics.clone();
                let relay = relay.clone();
                move || {
                    let metrics = metrics.clone();
                    let relay = relay.clone();
                    async move {
                        relay.refresh_state_gauges();
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            metrics.encode(),
                        )
                    }
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let metrics_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, app).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });

    tracing::info!(%grpc_addr, %metrics_addr, %media_addr, %advertised, shards, "relay listening");
    Ok(RunningRelay {
        relay,
        grpc_addr,
        metrics_addr,
        media_addr,
        media_tcp_addr,
        health,
        grpc_stop: Some(grpc_stop),
        grpc_task,
        metrics_task,
        peers_task,
        drain_timeout: Duration::from_secs(args.drain_secs),
    })
}

impl RunningRelay {
    /// Graceful stop: health goes NOT_SERVING (so Envoy's health checks steer new calls
    /// away), new calls are refused, live calls get the drain time, then everything ends.
    pub async fn shutdown(mut self) {
        self.health
            .set_not_serving::<RelayServiceServer<RelayGrpc>>()
            .await;
        self.relay.drain(self.drain_timeout).await;
        if let Some(stop) = self.grpc_stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.grpc_task).await;
        self.metrics_task.abort();
        if let Some(task) = &self.peers_task {
            task.abort();
        }
        tracing::info!("relay stopped");
    }
}
