//! Command-line configuration, validated once at start-up into [`RelayConfig`].

use clap::{Parser, ValueEnum};
use realtime_relay_proto::replica_token::{KeyError, ReplicaKey};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// A configuration clap accepts but the relay cannot run with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{flag} must be at least {min}{why}")]
    TooSmall {
        flag: &'static str,
        min: u64,
        /// Why the minimum, as a parenthesis (or empty).
        why: &'static str,
    },
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error("no --allow-upstream given: the relay would refuse every call")]
    NoUpstreamAllowed,
    #[error("--media-addr {0} is unspecified: set --public-ip to the address clients reach")]
    UnspecifiedMediaAddr(SocketAddr),
    #[error("the advertised media address {0} is {1}: set --public-ip to a unicast address clients reach")]
    NotUnicastMediaAddr(IpAddr, &'static str),
    #[error("--upstream-media-ip {0} is {1}: give an address of this host the provider can reach (it is the upstream leg's ICE candidate), or leave it unset to use the route's source address")]
    NotUnicastUpstreamIp(IpAddr, &'static str),
    #[error("--public-port 0 cannot be advertised: give the port clients reach")]
    ZeroPublicPort,
    #[error("--media-tcp-addr {0} is unspecified: set --public-ip to the address clients reach")]
    UnspecifiedMediaTcpAddr(SocketAddr),
    #[error("--public-tcp-port 0 cannot be advertised: give the TCP port clients reach")]
    ZeroPublicTcpPort,
    #[error("--public-tcp-port needs --media-tcp-addr: there is no ICE-TCP listener to advertise")]
    PublicTcpPortWithoutListener,
    #[error("--media-tcp-max-frame-bytes must be between 1500 and 65535 (RFC 4571 frames carry a 16-bit length)")]
    TcpFrameBytesOutOfRange,
    #[error("--replica-addr {0} must be a unicast address and a port gateways reach this relay's gRPC at (in Kubernetes: $(POD_IP):<grpc port>)")]
    ReplicaAddrNotReachable(SocketAddr),
    #[error("--replica-addr needs the replica key in the environment variable {REPLICA_KEY_ENV} (the secret the gateway's filter shares)")]
    ReplicaKeyMissing,
    #[error("{REPLICA_KEY_ENV} {0}")]
    ReplicaKeyInvalid(#[from] KeyError),
    #[error(
        "--peers needs --replica-addr: peers are the other replicas of a relay that runs as one"
    )]
    PeersWithoutReplicaAddr,
    #[error("--peers entry '{0}' must be host:port (a name that resolves to every replica, e.g. a headless Service)")]
    BadPeer(String),
}

/// Environment variable holding the replica key. Only the environment: a flag would show
/// the secret in `ps` and in the pod spec.
pub const REPLICA_KEY_ENV: &str = "RELAY_REPLICA_KEY";

/// gRPC relay for OpenAI Realtime WebRTC calls: validates a client's SDP offer,
/// exchanges SDP with the upstream model provider, and bridges audio and the
/// `oai-events` data channel between the two peer connections.
#[derive(Debug, Clone, Parser)]
#[command(name = "realtime-relay", version)]
pub struct Args {
    /// gRPC listen address (CreateCall, HangupCall, GetCall, ListCalls, health,
    /// reflection). Keep it on loopback or protect it with mTLS in the mesh: whoever
    /// reaches it can open calls with the keys it sends.
    #[arg(long, env = "RELAY_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Prometheus metrics listen address (GET /metrics).
    #[arg(long, env = "RELAY_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,

    /// UDP address shared by the client legs of all calls (one port for every call).
    #[arg(long, env = "RELAY_MEDIA_ADDR", default_value = "127.0.0.1:40000")]
    pub media_addr: SocketAddr,

    /// Address advertised in the client-leg ICE candidate (the address clients can
    /// reach, e.g. a node or load-balancer IP). Default: the IP of --media-addr, which
    /// must then not be unspecified.
    #[arg(long, env = "RELAY_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,

    /// Port advertised in the client-leg candidate when it differs from the bound
    /// port (a NAT or a Kubernetes NodePort in front). Default: the bound port.
    #[arg(long, env = "RELAY_PUBLIC_PORT")]
    pub public_port: Option<u16>,

    /// TCP address of the ICE-TCP listener (RFC 6544 passive candidate, RFC 4571 framing) for
    /// clients whose firewalls block UDP; one port for every call, like --media-addr. Off
    /// when absent. The advertised IP is --public-ip, else this address's IP.
    #[arg(long, env = "RELAY_MEDIA_TCP_ADDR")]
    pub media_tcp_addr: Option<SocketAddr>,

    /// Port advertised in the passive TCP candidate when it differs from the bound port
    /// (a NAT or a Kubernetes NodePort in front). Default: the bound port.
    #[arg(long, env = "RELAY_PUBLIC_TCP_PORT")]
    pub public_tcp_port: Option<u16>,

    /// Open ICE-TCP connections at most, routed or not; more are closed at accept.
    #[arg(long, env = "RELAY_MEDIA_TCP_MAX_CONNECTIONS", default_value_t = 2048)]
    pub media_tcp_max_connections: usize,

    /// Open ICE-TCP connections at most from one source IP (many clients may share an
    /// enterprise NAT: keep it well above one).
    #[arg(
        long,
        env = "RELAY_MEDIA_TCP_MAX_CONNECTIONS_PER_IP",
        default_value_t = 64
    )]
    pub media_tcp_max_connections_per_ip: usize,

    /// An ICE-TCP connection must send its first frame (a STUN binding request naming a
    /// call) within this many milliseconds, or it is closed.
    #[arg(
        long,
        env = "RELAY_MEDIA_TCP_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub media_tcp_handshake_timeout_ms: u64,

    /// An ICE-TCP connection that receives nothing for this many seconds is closed
    /// (ICE consent checks arrive every few seconds on a live call).
    #[arg(long, env = "RELAY_MEDIA_TCP_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub media_tcp_idle_timeout_secs: u64,

    /// Largest RFC 4571 frame accepted; a larger one closes its connection.
    #[arg(long, env = "RELAY_MEDIA_TCP_MAX_FRAME_BYTES", default_value_t = 4096)]
    pub media_tcp_max_frame_bytes: usize,

    /// Frames queued for writing per ICE-TCP connection; when a client does not read,
    /// further frames are dropped and counted.
    #[arg(
        long,
        env = "RELAY_MEDIA_TCP_WRITE_QUEUE_FRAMES",
        default_value_t = 256
    )]
    pub media_tcp_write_queue_frames: usize,

    /// Media shards: threads that each own one SO_REUSEPORT socket of the media port and run
    /// the calls placed on them; 0 = one per core the process may run on.
    #[arg(long, env = "RELAY_MEDIA_SHARDS", default_value_t = 0)]
    pub media_shards: usize,

    /// Receive and send buffer each socket of the media port asks the kernel for, in bytes:
    /// what absorbs bursts between two reads and while the host's network is slower than the
    /// relay. The kernel grants at most twice `net.core.rmem_max` / `net.core.wmem_max`; the
    /// relay logs what it got at start.
    #[arg(
        long,
        env = "RELAY_MEDIA_SOCKET_BUFFER_BYTES",
        default_value_t = crate::media_socket::PORT_BUFFER_BYTES
    )]
    pub media_socket_buffer_bytes: usize,

    /// Local IP for upstream-leg sockets. Default: the source address the kernel
    /// would route to the upstream host.
    #[arg(long, env = "RELAY_UPSTREAM_MEDIA_IP")]
    pub upstream_media_ip: Option<IpAddr>,

    /// STUN server (host:port) used to add a server-reflexive candidate to the
    /// upstream leg, for relays behind NAT. Off by default: on a routable host the
    /// host candidate is enough, and the relay never contacts a server nobody chose.
    #[arg(long, env = "RELAY_UPSTREAM_STUN_SERVER")]
    pub upstream_stun_server: Option<String>,

    /// How long to wait for the STUN server's answer before going on without the
    /// server-reflexive candidate, in milliseconds.
    #[arg(long, env = "RELAY_UPSTREAM_STUN_TIMEOUT_MS", default_value_t = 3_000)]
    pub upstream_stun_timeout_ms: u64,

    /// Allowed upstream base URL (scheme, host, port, optional path prefix);
    /// repeatable. Requests naming any other upstream are refused.
    #[arg(
        long = "allow-upstream",
        env = "RELAY_ALLOW_UPSTREAMS",
        value_delimiter = ','
    )]
    pub allow_upstreams: Vec<String>,

    /// Allow upstreams on loopback and private addresses (local echo model, in-cluster
    /// workers). Off by default: such targets are how an open relay becomes an SSRF tool.
    #[arg(long, env = "RELAY_ALLOW_PRIVATE_UPSTREAMS")]
    pub allow_private_upstreams: bool,

    /// Maximum concurrent calls; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "RELAY_MAX_CALLS", default_value_t = 1000)]
    pub max_calls: usize,

    /// Largest accepted SDP offer, in bytes.
    #[arg(long, env = "RELAY_MAX_OFFER_BYTES", default_value_t = 64 * 1024)]
    pub max_offer_bytes: usize,

    /// Largest accepted upstream answer or rejection body, in bytes.
    #[arg(long, env = "RELAY_MAX_UPSTREAM_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_upstream_body_bytes: usize,

    /// Bytes of data-channel messages buffered per direction while the other side
    /// is not open or its send buffer is full; exceeding it ends the call. Also the largest
    /// message the relay takes from a peer (its advertised max-message-size).
    #[arg(long, env = "RELAY_DC_BUFFER_BYTES", default_value_t = 1024 * 1024)]
    pub dc_buffer_bytes: usize,

    /// Read usage from the provider's events (token totals, Live seconds, rate limits,
    /// error events) for GetCall, metrics, the call.usage record, WatchCalls and budgets.
    /// `false`: no event is read (creates that carry a budget are then refused).
    #[arg(long, env = "RELAY_USAGE_METERING", default_value_t = true, action = clap::ArgAction::Set)]
    pub usage_metering: bool,

    /// Datagrams queued from the shared media port to one call before dropping.
    #[arg(long, env = "RELAY_CALL_QUEUE_DATAGRAMS", default_value_t = 512)]
    pub call_queue_datagrams: usize,

    /// Timeout for connecting to the upstream, in milliseconds.
    #[arg(
        long,
        env = "RELAY_UPSTREAM_CONNECT_TIMEOUT_MS",
        default_value_t = 3_000
    )]
    pub upstream_connect_timeout_ms: u64,

    /// Timeout for the whole upstream SDP exchange, in milliseconds.
    #[arg(long, env = "RELAY_UPSTREAM_TIMEOUT_MS", default_value_t = 10_000)]
    pub upstream_timeout_ms: u64,

    /// Kept-alive HTTP connections to upstreams idle this many seconds are closed. Below the
    /// provider's own idle timeout, so a reused connection is never one it is closing.
    #[arg(long, env = "RELAY_UPSTREAM_POOL_IDLE_SECS", default_value_t = 90)]
    pub upstream_pool_idle_secs: u64,

    /// Both legs must connect (ICE + DTLS) within this many seconds of setup.
    #[arg(long, env = "RELAY_ICE_TIMEOUT_SECS", default_value_t = 15)]
    pub ice_timeout_secs: u64,

    /// A connected leg that sends nothing at all (no media, no STUN consent checks)
    /// for this many seconds is gone.
    #[arg(long, env = "RELAY_PEER_TIMEOUT_SECS", default_value_t = 15)]
    pub peer_timeout_secs: u64,

    /// A call that relays no audio and no events in either direction for this many
    /// seconds is ended.
    #[arg(long, env = "RELAY_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    pub idle_timeout_secs: u64,

    /// Longest a call may last, in seconds.
    #[arg(long, env = "RELAY_MAX_CALL_SECS", default_value_t = 3_600)]
    pub max_call_secs: u64,

    /// On SIGTERM: refuse new calls and let live ones run this many seconds before
    /// ending them.
    #[arg(long, env = "RELAY_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,

    /// Ended calls kept for GetCall/ListCalls, newest first.
    #[arg(long, env = "RELAY_ENDED_CALLS_KEPT", default_value_t = 1000)]
    pub ended_calls_kept: usize,

    /// Log format.
    /// The address ("ip:port") gateways reach this relay's gRPC at, when it runs as one of
    /// several replicas (Kubernetes: `$(POD_IP):50051`). The ids of its calls then name it,
    /// authenticated with the key in RELAY_REPLICA_KEY, so that a call's hangup reaches
    /// this replica whichever gateway receives it. Unset: one relay (or replicas the
    /// gateway lists one cluster each).
    #[arg(long, env = "RELAY_REPLICA_ADDR")]
    pub replica_addr: Option<SocketAddr>,

    /// Names ("host:port", comma-separated) that resolve to every replica, e.g. a headless
    /// Service; resolved again every --peers-refresh-secs. ListCalls reports them so a
    /// gateway sums the load of all replicas. Needs --replica-addr.
    #[arg(long = "peers", env = "RELAY_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Seconds between resolutions of the --peers names.
    #[arg(long, env = "RELAY_PEERS_REFRESH_SECS", default_value_t = 5)]
    pub peers_refresh_secs: u64,

    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// An advertised IP (`public_ip`, else a bound address's) must be one clients can reach.
fn check_unicast(ip: IpAddr) -> Result<(), ConfigError> {
    let what = if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_multicast() {
        "multicast"
    } else if ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        "the broadcast address"
    } else {
        return Ok(());
    };
    Err(ConfigError::NotUnicastMediaAddr(ip, what))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Limits and timeouts a call runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_calls: usize,
    pub max_offer_bytes: usize,
    pub max_upstream_body_bytes: usize,
    pub dc_buffer_bytes: usize,
    pub call_queue_datagrams: usize,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub upstream_pool_idle: Duration,
    pub ice_timeout: Duration,
    pub peer_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_call_duration: Duration,
    pub ended_calls_kept: usize,
    /// Whether calls' events are metered (`--usage-metering`).
    pub usage_metering: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Args::parse_from(["realtime-relay"]).limits()
    }
}

impl Args {
    pub fn limits(&self) -> Limits {
        Limits {
            max_calls: self.max_calls,
            max_offer_bytes: self.max_offer_bytes,
            max_upstream_body_bytes: self.max_upstream_body_bytes,
            dc_buffer_bytes: self.dc_buffer_bytes,
            usage_metering: self.usage_metering,
            call_queue_datagrams: self.call_queue_datagrams,
            upstream_connect_timeout: Duration::from_millis(self.upstream_connect_timeout_ms),
            upstream_timeout: Duration::from_millis(self.upstream_timeout_ms),
            upstream_pool_idle: Duration::from_secs(self.upstream_pool_idle_secs),
            ice_timeout: Duration::from_secs(self.ice_timeout_secs),
            peer_timeout: Duration::from_secs(self.peer_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            max_call_duration: Duration::from_secs(self.max_call_secs),
            ended_calls_kept: self.ended_calls_kept,
        }
    }

    /// The address advertised in client-leg candidates.
    pub fn advertised_media_addr(&self) -> Result<SocketAddr, ConfigError> {
        let ip = self.public_ip.unwrap_or(self.media_addr.ip());
        if ip.is_unspecified() && self.public_ip.is_none() {
            return Err(ConfigError::UnspecifiedMediaAddr(self.media_addr));
        }
        check_unicast(ip)?;
        if self.public_port == Some(0) {
            return Err(ConfigError::ZeroPublicPort);
        }
        Ok(SocketAddr::new(
            ip,
            self.public_port.unwrap_or(self.media_addr.port()),
        ))
    }

    /// The upstream leg binds its socket on `--upstream-media-ip` and offers that address as
    /// its host candidate, so it must be one unicast address (an unspecified one would be
    /// offered as 0.0.0.0 and ICE would never connect).
    pub fn check_upstream_media_ip(&self) -> Result<(), ConfigError> {
        let Some(ip) = self.upstream_media_ip else {
            return Ok(());
        };
        let why = if ip.is_unspecified() {
            "unspecified"
        } else if ip.is_multicast() {
            "multicast"
        } else if ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
            "the broadcast address"
        } else {
            return Ok(());
        };
        Err(ConfigError::NotUnicastUpstreamIp(ip, why))
    }

    /// The address advertised in the client leg's passive ICE-TCP candidate, or `None`
    /// without `--media-tcp-addr`. Same rules as [`Args::advertised_media_addr`].
    pub fn advertised_media_tcp_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(bound) = self.media_tcp_addr else {
            return match self.public_tcp_port {
                Some(_) => Err(ConfigError::PublicTcpPortWithoutListener),
                None => Ok(None),
            };
        };
        let ip = self.public_ip.unwrap_or(bound.ip());
        if ip.is_unspecified() && self.public_ip.is_none() {
            return Err(ConfigError::UnspecifiedMediaTcpAddr(bound));
        }
        check_unicast(ip)?;
        if self.public_tcp_port == Some(0) {
            return Err(ConfigError::ZeroPublicTcpPort);
        }
        Ok(Some(SocketAddr::new(
            ip,
            self.public_tcp_port.unwrap_or(bound.port()),
        )))
    }

    /// The ICE-TCP listener's limits.
    pub fn tcp_limits(&self) -> crate::media_tcp::TcpLimits {
        crate::media_tcp::TcpLimits {
            max_connections: self.media_tcp_max_connections,
            max_connections_per_ip: self.media_tcp_max_connections_per_ip,
            handshake_timeout: Duration::from_millis(self.media_tcp_handshake_timeout_ms),
            idle_timeout: Duration::from_secs(self.media_tcp_idle_timeout_secs),
            max_frame_bytes: self.media_tcp_max_frame_bytes,
            write_queue_frames: self.media_tcp_write_queue_frames,
        }
    }

    /// This relay's replica address and key, from the flags and `key` (the value of
    /// [`REPLICA_KEY_ENV`], passed in so tests need no process environment).
    pub fn replica_with_key(
        &self,
        key: Option<&[u8]>,
    ) -> Result<Option<(SocketAddr, ReplicaKey)>, ConfigError> {
        for peer in &self.peers {
            let port_ok = peer.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok {
                return Err(ConfigError::BadPeer(peer.clone()));
            }
        }
        let Some(addr) = self.replica_addr else {
            return if self.peers.is_empty() {
                Ok(None)
            } else {
                Err(ConfigError::PeersWithoutReplicaAddr)
            };
        };
        let ip = addr.ip();
        if ip.is_unspecified() || ip.is_multicast() || addr.port() == 0 {
            return Err(ConfigError::ReplicaAddrNotReachable(addr));
        }
        let key = ReplicaKey::new(key.ok_or(ConfigError::ReplicaKeyMissing)?)?;
        Ok(Some((addr, key)))
    }

    /// [`Args::replica_with_key`] with the key from the process environment.
    pub fn replica(&self) -> Result<Option<(SocketAddr, ReplicaKey)>, ConfigError> {
        let key = std::env::var_os(REPLICA_KEY_ENV);
        self.replica_with_key(key.as_ref().map(|k| k.as_encoded_bytes()))
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let too_small = |flag, min, why| Err(ConfigError::TooSmall { flag, min, why });
        if self.max_calls == 0 {
            return too_small("--max-calls", 1, "");
        }
        if self.max_offer_bytes < 512 {
            return too_small("--max-offer-bytes", 512, "");
        }
        if self.dc_buffer_bytes < 64 * 1024 {
            return too_small("--dc-buffer-bytes", 65536, " (one large Realtime event)");
        }
        if self.call_queue_datagrams == 0 {
            return too_small("--call-queue-datagrams", 1, "");
        }
        if self.media_socket_buffer_bytes < 64 * 1024 {
            return too_small(
                "--media-socket-buffer-bytes",
                65536,
                " (a burst of a few dozen calls' packets)",
            );
        }
        if self.media_tcp_max_connections == 0 {
            return too_small("--media-tcp-max-connections", 1, "");
        }
        if self.media_tcp_max_connections_per_ip == 0 {
            return too_small("--media-tcp-max-connections-per-ip", 1, "");
        }
        if self.media_tcp_write_queue_frames < 16 {
            return too_small(
                "--media-tcp-write-queue-frames",
                16,
                " (a DTLS handshake flight)",
            );
        }
        if !(1500..=65535).contains(&self.media_tcp_max_frame_bytes) {
            return Err(ConfigError::TcpFrameBytesOutOfRange);
        }
        for (name, v) in [
            ("--upstream-timeout-ms", self.upstream_timeout_ms),
            (
                "--upstream-connect-timeout-ms",
                self.upstream_connect_timeout_ms,
            ),
            ("--ice-timeout-secs", self.ice_timeout_secs),
            ("--peer-timeout-secs", self.peer_timeout_secs),
            ("--idle-timeout-secs", self.idle_timeout_secs),
            ("--max-call-secs", self.max_call_secs),
            ("--peers-refresh-secs", self.peers_refresh_secs),
            (
                "--media-tcp-handshake-timeout-ms",
                self.media_tcp_handshake_timeout_ms,
            ),
            (
                "--media-tcp-idle-timeout-secs",
                self.media_tcp_idle_timeout_secs,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.allow_upstreams.is_empty() {
            return Err(ConfigError::NoUpstreamAllowed);
        }
        self.advertised_media_addr()?;
        self.check_upstream_media_ip()?;
        self.advertised_media_tcp_addr()?;
        self.replica()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_on_one_machine_once_an_upstream_is_allowed() {
        let args = Args::parse_from([
            "realtime-relay",
            "--allow-upstream",
            "http://127.0.0.1:8089",
        ]);
        args.validate().unwrap();
        assert!(
            args.grpc_addr.ip().is_loopback(),
            "gRPC defaults to loopback"
        );
        assert_eq!(
            args.advertised_media_addr().unwrap(),
            "127.0.0.1:40000".parse().unwrap()
        );
    }

    #[test]
    fn a_refused_flag_is_named_with_its_limit() {
        let args = |extra: &[&str]| {
            let mut argv = vec![
                "realtime-relay",
                "--allow-upstream",
                "http://127.0.0.1:8089",
            ];
            argv.extend_from_slice(extra);
            Args::parse_from(argv)
        };
        let err = |extra: &[&str]| args(extra).validate().unwrap_err().to_string();
        assert_eq!(
            err(&["--dc-buffer-bytes", "1024"]),
            "--dc-buffer-bytes must be at least 65536 (one large Realtime event)"
        );
        assert_eq!(err(&["--max-calls", "0"]), "--max-calls must be at least 1");
        assert_eq!(
            err(&["--media-socket-buffer-bytes", "4096"]),
            "--media-socket-buffer-bytes must be at least 65536 (a burst of a few dozen calls' packets)"
        );
        assert_eq!(
            err(&["--idle-timeout-secs", "0"]),
            "--idle-timeout-secs must be greater than 0"
        );
        assert_eq!(
            Args::parse_from(["realtime-relay"]).validate(),
            Err(ConfigError::NoUpstreamAllowed)
        );
    }

    #[test]
    fn an_upstream_media_ip_that_cannot_be_a_candidate_is_refused() {
        let with = |ip: &str| {
            Args::parse_from([
                "realtime-relay",
                "--allow-upstream",
                "https://api.openai.com",
                "--upstream-media-ip",
                ip,
            ])
            .validate()
        };
        assert!(with("10.0.0.9").is_ok());
        assert!(with("fd00::9").is_ok());
        for (ip, why) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("239.1.1.1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            let e = with(ip).unwrap_err().to_string();
            assert!(
                e.starts_with("--upstream-media-ip") && e.contains(why),
                "{ip}: {e}"
            );
        }
    }

    #[test]
    fn replica_settings_that_cannot_work_are_refused_naming_the_setting() {
        let with = |extra: &[&str]| {
            let mut argv = vec![
                "realtime-relay",
                "--allow-upstream",
                "https://api.openai.com",
            ];
            argv.extend_from_slice(extra);
            Args::parse_from(argv)
        };
        let key = [b'k'; 40];
        assert!(with(&[]).replica_with_key(None).unwrap().is_none());
        let (addr, _) = with(&[
            "--replica-addr",
            "10.0.0.5:50051",
            "--peers",
            "pods.ns:50051",
        ])
        .replica_with_key(Some(&key))
        .unwrap()
        .unwrap();
        assert_eq!(addr, "10.0.0.5:50051".parse().unwrap());
        for (extra, key, expect) in [
            (
                &["--replica-addr", "10.0.0.5:50051"][..],
                None,
                "RELAY_REPLICA_KEY",
            ),
            (
                &["--replica-addr", "10.0.0.5:50051"],
                Some(&b"short"[..]),
                "at least 32",
            ),
            (
                &["--replica-addr", "0.0.0.0:50051"],
                Some(&key[..]),
                "--replica-addr 0.0.0.0",
            ),
            (
                &["--replica-addr", "10.0.0.5:0"],
                Some(&key[..]),
                "--replica-addr",
            ),
            (
                &["--peers", "pods:50051"],
                Some(&key[..]),
                "--peers needs --replica-addr",
            ),
            (
                &["--replica-addr", "10.0.0.5:50051", "--peers", "pods"],
                Some(&key[..]),
                "--peers entry 'pods'",
            ),
        ] {
            let msg = with(extra).replica_with_key(key).unwrap_err().to_string();
            assert!(msg.contains(expect), "{extra:?}: {msg}");
            assert!(!msg.contains("kkkk") && !msg.contains("short"), "{msg}");
        }
    }

    #[test]
    fn unspecified_media_ip_needs_a_public_ip() {
        let args = Args::parse_from([
            "realtime-relay",
            "--allow-upstream",
            "https://api.openai.com",
            "--media-addr",
            "0.0.0.0:40000",
        ]);
        assert!(args
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--public-ip"));
        let args = Args::parse_from([
            "realtime-relay",
            "--allow-upstream",
            "https://api.openai.com",
            "--media-addr",
            "0.0.0.0:40000",
            "--public-ip",
            "203.0.113.7",
            "--public-port",
            "31000",
        ]);
        assert_eq!(
            args.advertised_media_addr().unwrap(),
            "203.0.113.7:31000".parse().unwrap()
        );
    }

    #[test]
    fn an_address_clients_cannot_reach_is_refused_naming_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--public-ip", "0.0.0.0"], "--public-ip to a unicast"),
            (&["--public-ip", "::"], "unspecified"),
            (&["--public-ip", "224.0.0.1"], "multicast"),
            (&["--public-ip", "ff02::1"], "multicast"),
            (&["--public-ip", "255.255.255.255"], "broadcast"),
            (&["--media-addr", "239.1.2.3:40000"], "multicast"),
            (
                &["--public-ip", "203.0.113.7", "--public-port", "0"],
                "--public-port 0",
            ),
        ];
        for (flags, want) in cases {
            let mut argv = vec![
                "realtime-relay",
                "--allow-upstream",
                "https://api.openai.com",
            ];
            argv.extend_from_slice(flags);
            let err = Args::parse_from(argv).advertised_media_addr().unwrap_err();
            assert!(err.to_string().contains(want), "{flags:?}: {err}");
        }
    }

    #[test]
    fn ice_tcp_is_off_by_default_and_follows_the_udp_rules_when_on() {
        let with = |extra: &[&str]| {
            let mut argv = vec![
                "realtime-relay",
                "--allow-upstream",
                "https://api.openai.com",
            ];
            argv.extend_from_slice(extra);
            Args::parse_from(argv)
        };
        assert_eq!(with(&[]).advertised_media_tcp_addr(), Ok(None));
        assert_eq!(
            with(&["--media-tcp-addr", "127.0.0.1:443"]).advertised_media_tcp_addr(),
            Ok(Some("127.0.0.1:443".parse().unwrap()))
        );
        // Kubernetes: bound on 0.0.0.0, advertised at the node's IP and NodePort.
        let args = with(&[
            "--media-addr",
            "0.0.0.0:40000",
            "--media-tcp-addr",
            "0.0.0.0:8443",
            "--public-ip",
            "203.0.113.7",
            "--public-tcp-port",
            "30443",
        ]);
        args.validate().unwrap();
        assert_eq!(
            args.advertised_media_tcp_addr(),
            Ok(Some("203.0.113.7:30443".parse().unwrap()))
        );
        let cases: &[(&[&str], &str)] = &[
            (
                &["--media-tcp-addr", "0.0.0.0:443"],
                "--media-tcp-addr 0.0.0.0:443 is unspecified: set --public-ip",
            ),
            (
                &["--media-tcp-addr", "[::]:443", "--public-ip", "ff02::1"],
                "multicast",
            ),
            (
                &[
                    "--media-tcp-addr",
                    "127.0.0.1:443",
                    "--public-tcp-port",
                    "0",
                ],
                "--public-tcp-port 0",
            ),
            (
                &["--public-tcp-port", "443"],
                "--public-tcp-port needs --media-tcp-addr",
            ),
            (
                &["--media-tcp-max-frame-bytes", "100"],
                "--media-tcp-max-frame-bytes must be between",
            ),
            (
                &["--media-tcp-max-connections-per-ip", "0"],
                "--media-tcp-max-connections-per-ip must be at least 1",
            ),
            (
                &["--media-tcp-idle-timeout-secs", "0"],
                "--media-tcp-idle-timeout-secs must be greater than 0",
            ),
            (
                &["--media-tcp-write-queue-frames", "1"],
                "--media-tcp-write-queue-frames must be at least 16",
            ),
        ];
        for (flags, want) in cases {
            let err = with(flags).validate().unwrap_err().to_string();
            assert!(err.contains(want), "{flags:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
