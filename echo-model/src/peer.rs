//! Shared plumbing for driving one str0m `Rtc` over one tokio UDP socket.
//!
//! str0m is sans-IO: we feed datagrams and timeouts in and drain transmits and events out. The
//! contract (str0m 0.25 `lib.rs`, "Run loop") is: after every mutation, drain `poll_output` until
//! it returns `Output::Timeout` before the next mutation. Mutations made from inside the drain
//! (in the event callback) are fine because the drain keeps polling afterwards.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::net::{Protocol, Receive};
use str0m::{Event, Input, Output, Rtc, RtcConfig, RtcError};
use tokio::net::UdpSocket;

/// Largest UDP datagram we accept. WebRTC stays well under the path MTU; 2 KiB leaves margin
/// for peers that ignore MTU hints without wasting memory across hundreds of peers.
pub(crate) const MAX_DATAGRAM: usize = 2048;

/// Upper bound on how long we sleep without feeding str0m a timeout. str0m returns a
/// "distant future" instant when nothing is scheduled; clamping keeps our own deadlines
/// (connect, idle) checked and avoids handing huge durations to the tokio timer.
pub(crate) const MAX_SLEEP: Duration = Duration::from_millis(500);

/// Bytes of data-channel data str0m may hold unacknowledged per peer. str0m's default is
/// 128 KiB and a message larger than this limit is *never* accepted by `Channel::write`; we
/// raise it so that any message we can receive (str0m's default max message size, 256 KiB)
/// can also be echoed, with room for a second one in flight.
pub(crate) const SCTP_MAX_BUFFERED: usize = 512 * 1024;

/// Crypto provider and DTLS certificate shared by every `Rtc` in the process.
///
/// Generating a certificate is most of the ~0.7 ms it costs to build an `Rtc`; benchmarks build
/// hundreds, so we generate one per process. Sharing a certificate across peer connections is
/// normal (browsers reuse an `RTCCertificate` across connections); the fingerprint in each SDP
/// still authenticates the DTLS handshake.
struct SharedCrypto {
    provider: Arc<CryptoProvider>,
    cert: DtlsCert,
}

static SHARED_CRYPTO: OnceLock<Result<SharedCrypto, String>> = OnceLock::new();

fn shared_crypto() -> anyhow::Result<&'static SharedCrypto> {
    let shared = SHARED_CRYPTO.get_or_init(|| {
        let provider = str0m::crypto::from_feature_flags();
        let cert = provider
            .dtls_provider
            .generate_certificate()
            .ok_or_else(|| "crypto provider cannot generate a DTLS certificate".to_string())?;
        Ok(SharedCrypto {
            provider: Arc::new(provider),
            cert,
        })
    });
    shared.as_ref().map_err(|e| anyhow!("{e}"))
}

/// An `RtcConfig` with the shared crypto provider and certificate, so `build` does not panic
/// on certificate generation and stays cheap.
pub(crate) fn rtc_builder() -> anyhow::Result<RtcConfig> {
    let shared = shared_crypto()?;
    Ok(Rtc::builder()
        .set_crypto_provider(shared.provider.clone())
        .set_dtls_cert(shared.cert.clone())
        .set_sctp_max_buffered_amount(SCTP_MAX_BUFFERED))
}

/// Bind a non-blocking std UDP socket (usable before a tokio runtime exists).
pub(crate) fn bind_udp(ip: std::net::IpAddr) -> anyhow::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
        .with_context(|| format!("binding a UDP socket on {ip}"))?;
    socket
        .set_nonblocking(true)
        .context("setting the UDP socket non-blocking")?;
    Ok(socket)
}

/// Counters of I/O trouble that must not be silently ignored.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoCounters {
    /// Datagrams str0m wanted to send that the socket refused (buffer full, unreachable).
    pub send_errors: u64,
    /// Received datagrams that were not STUN/DTLS/RTP/RTCP, or that str0m rejected.
    pub bad_datagrams: u64,
}

/// One `Rtc` and the socket it talks through.
pub(crate) struct UdpRtc {
    pub rtc: Rtc,
    pub socket: UdpSocket,
    pub local_addr: SocketAddr,
    pub counters: IoCounters,
}

impl UdpRtc {
    pub fn new(rtc: Rtc, socket: std::net::UdpSocket) -> anyhow::Result<Self> {
        let local_addr = socket.local_addr().context("UDP socket local address")?;
        let socket = UdpSocket::from_std(socket).context("registering UDP socket with tokio")?;
        Ok(UdpRtc {
            rtc,
            socket,
            local_addr,
            counters: IoCounters::default(),
        })
    }

    /// Drain `poll_output` until `Timeout`, sending transmits and handing events to `on_event`
    /// (which may mutate the `Rtc`). Returns the next deadline.
    pub fn drain(
        &mut self,
        mut on_event: impl FnMut(&mut Rtc, Event),
    ) -> Result<Instant, RtcError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    // try_send_to never waits: a full socket buffer drops the datagram, as
                    // the network would. We count it instead of stalling every other peer.
                    if let Err(e) = self.socket.try_send_to(&t.contents, t.destination) {
                        self.counters.send_errors += 1;
                        tracing::debug!(error = %e, destination = %t.destination, "UDP send failed");
                    }
                }
                Output::Event(e) => on_event(&mut self.rtc, e),
            }
        }
    }

    /// Feed one received datagram to str0m. Unparseable datagrams are counted and dropped.
    pub fn handle_datagram(&mut self, data: &[u8], source: SocketAddr, now: Instant) {
        let Ok(contents) = data.try_into() else {
            self.counters.bad_datagrams += 1;
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local_addr,
                contents,
            },
        );
        if let Err(e) = self.rtc.handle_input(input) {
            self.counters.bad_datagrams += 1;
            tracing::debug!(error = %e, "str0m rejected a datagram");
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), RtcError> {
        self.rtc.handle_input(Input::Timeout(now))
    }

    /// Feed a timeout at "now" and drain. str0m's send queue releases RTP written with
    /// `StreamTx::write_rtp` only on time input, so call this right after writing RTP (and after
    /// draining that write) to put the packet on the wire without waiting for the next timer.
    pub fn kick(&mut self, on_event: impl FnMut(&mut Rtc, Event)) -> Result<Instant, RtcError> {
        self.handle_timeout(Instant::now())?;
        self.drain(on_event)
    }

    /// Start a graceful close (RTCP BYE, SCTP shutdown, DTLS close_notify) and drain it out, so
    /// the remote notices at once instead of waiting for its own timeouts.
    pub fn close_gracefully(&mut self) {
        if let Err(e) = self.rtc.close() {
            tracing::debug!(error = %e, "starting str0m close failed");
        }
        // The close output is queued locally; a few drains with timeouts push it all out.
        for _ in 0..8 {
            if self.drain(|_, _| {}).is_err() || !self.rtc.is_alive() {
                break;
            }
            if self.handle_timeout(Instant::now()).is_err() {
                break;
            }
        }
        self.rtc.disconnect();
    }
}

/// When to wake next: str0m's deadline, clamped to [`MAX_SLEEP`] from now.
pub(crate) fn next_wake(deadline: Instant, now: Instant) -> tokio::time::Instant {
    let capped = deadline.min(now + MAX_SLEEP);
    tokio::time::Instant::from_std(capped)
}
