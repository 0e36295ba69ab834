//! A sans-IO driver of one str0m `Rtc`: datagrams and timeouts in, transmits, events and the
//! next deadline out. It owns no socket and no clock, so tests drive it in virtual time.
//!
//! str0m's contract (0.25 `lib.rs`, "Run loop"): after every mutation (input, write, SDP
//! change) drain `poll_output` until it returns `Output::Timeout`, before the next mutation.
//! [`drain`] is that loop. A mutation made from inside it (in the callback, e.g. echoing a
//! packet) is fine: the loop keeps polling afterwards.

use std::net::SocketAddr;
use std::time::Instant;
use str0m::net::{Protocol, Receive, Transmit};
use str0m::{Event, Input, Output, Rtc, RtcError};

/// What a drain hands the caller.
// As str0m's own `Output`: an event moves through by value, never boxed per packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Drained {
    /// A datagram to send from the peer's socket.
    Transmit(Transmit),
    Event(Event),
}

/// Why a datagram was not taken. Either way the sender's problem, not a reason to end a call.
#[derive(Debug, thiserror::Error)]
pub enum DatagramError {
    #[error("not a STUN, DTLS, RTP or RTCP datagram")]
    NotWebRtc,
    #[error("str0m rejected the datagram: {0}")]
    Rejected(#[from] RtcError),
}

/// The str0m input for one UDP datagram that arrived at `destination`, or `None` if it is not
/// STUN, DTLS, RTP or RTCP (nothing str0m could use).
pub fn receive(
    now: Instant,
    source: SocketAddr,
    destination: SocketAddr,
    data: &[u8],
) -> Option<Input<'_>> {
    receive_on(Protocol::Udp, now, source, destination, data)
}

/// As [`receive`], for a packet that arrived over `proto`: an ICE-TCP frame (RFC 4571) is
/// `Protocol::Tcp`, with the remote end of its connection as `source` and the TCP candidate's
/// address as `destination`.
pub fn receive_on(
    proto: Protocol,
    now: Instant,
    source: SocketAddr,
    destination: SocketAddr,
    data: &[u8],
) -> Option<Input<'_>> {
    let receive = Receive::new(proto, source, destination, data).ok()?;
    Some(Input::Receive(now, receive))
}

/// Polls `rtc` until its next timeout, handing every transmit and event to `out`. Returns
/// the instant str0m wants `Input::Timeout` next.
pub fn drain(rtc: &mut Rtc, mut out: impl FnMut(&mut Rtc, Drained)) -> Result<Instant, RtcError> {
    loop {
        match rtc.poll_output()? {
            Output::Timeout(t) => return Ok(t),
            Output::Transmit(t) => out(rtc, Drained::Transmit(t)),
            Output::Event(e) => out(rtc, Drained::Event(e)),
        }
    }
}

/// One `Rtc` and the address its datagrams arrive on.
pub struct Shell {
    rtc: Rtc,
    local_addr: SocketAddr,
}

impl Shell {
    /// `local_addr` is what str0m sees as every datagram's destination: the address of the
    /// host candidate the peer advertised.
    pub fn new(rtc: Rtc, local_addr: SocketAddr) -> Self {
        Shell { rtc, local_addr }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn rtc(&self) -> &Rtc {
        &self.rtc
    }

    /// For writes (RTP, data channels, SDP). Drain afterwards.
    pub fn rtc_mut(&mut self) -> &mut Rtc {
        &mut self.rtc
    }

    /// Feeds one received datagram. Drain afterwards.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        data: &[u8],
    ) -> Result<(), DatagramError> {
        self.handle_packet(Protocol::Udp, now, source, data)
    }

    /// Feeds one packet received over `proto` (an ICE-TCP frame is `Protocol::Tcp`). Drain
    /// afterwards.
    pub fn handle_packet(
        &mut self,
        proto: Protocol,
        now: Instant,
        source: SocketAddr,
        data: &[u8],
    ) -> Result<(), DatagramError> {
        let input = receive_on(proto, now, source, self.local_addr, data)
            .ok_or(DatagramError::NotWebRtc)?;
        Ok(self.rtc.handle_input(input)?)
    }

    /// Advances str0m's clock. Drain afterwards.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), RtcError> {
        self.rtc.handle_input(Input::Timeout(now))
    }

    /// See [`drain`].
    pub fn drain(&mut self, out: impl FnMut(&mut Rtc, Drained)) -> Result<Instant, RtcError> {
        drain(&mut self.rtc, out)
    }

    /// A timeout at `now`, then a drain. str0m's send queue releases RTP written with
    /// `StreamTx::write_rtp` only on time input: call this after writing RTP to put it on the
    /// wire without waiting for the next timer.
    pub fn kick(
        &mut self,
        now: Instant,
        out: impl FnMut(&mut Rtc, Drained),
    ) -> Result<Instant, RtcError> {
        self.handle_timeout(now)?;
        self.drain(out)
    }

    /// Starts a graceful close (RTCP BYE, SCTP shutdown, DTLS close_notify) and drains it out,
    /// so the remote notices at once instead of after its own timeouts. Events are dropped.
    pub fn close(&mut self, now: Instant, mut send: impl FnMut(Transmit)) {
        if let Err(e) = self.rtc.close() {
            tracing::debug!(error = %e, "starting the str0m close failed");
        }
        let mut out = |_: &mut Rtc, d: Drained| {
            if let Drained::Transmit(t) = d {
                send(t)
            }
        };
        // The close output is queued locally; a few drains with timeouts push it all out.
        for _ in 0..8 {
            if self.drain(&mut out).is_err() || !self.rtc.is_alive() {
                break;
            }
            if self.handle_timeout(now).is_err() {
                break;
            }
        }
        self.rtc.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::rtc_config;
    use crate::EVENTS_CHANNEL;
    use std::collections::VecDeque;
    use std::time::Duration;
    use str0m::change::SdpAnswer;
    use str0m::Candidate;

    /// Drains `shell`, putting its datagrams in flight to the other peer.
    fn drain_into(
        shell: &mut Shell,
        to_other: &mut VecDeque<Transmit>,
        opened: &mut Option<String>,
    ) -> Instant {
        shell
            .drain(|_, d| match d {
                Drained::Transmit(t) => to_other.push_back(t),
                Drained::Event(Event::ChannelOpen(_, label)) => *opened = Some(label),
                Drained::Event(_) => {}
            })
            .unwrap()
    }

    /// Two shells joined by an in-memory network and a virtual clock, as in str0m's
    /// `tests/common.rs`: datagrams in flight are delivered first, then the clock jumps to
    /// the earliest deadline.
    #[test]
    fn two_shells_connect_and_open_the_events_channel_in_virtual_time() {
        let start = Instant::now();
        let addr_a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let addr_b: SocketAddr = "10.0.0.2:2000".parse().unwrap();
        let mut rtc_a = rtc_config().unwrap().build(start);
        rtc_a.add_local_candidate(Candidate::host(addr_a, "udp").unwrap());
        let mut rtc_b = rtc_config().unwrap().set_ice_lite(true).build(start);
        rtc_b.add_local_candidate(Candidate::host(addr_b, "udp").unwrap());
        let mut api = rtc_a.sdp_api();
        api.add_channel(EVENTS_CHANNEL.to_string());
        let (offer, pending) = api.apply().unwrap();
        let answer = rtc_b.sdp_api().accept_offer(offer).unwrap();
        let answer = SdpAnswer::from_sdp_string(&answer.to_sdp_string()).unwrap();
        rtc_a.sdp_api().accept_answer(pending, answer).unwrap();

        let (mut a, mut b) = (Shell::new(rtc_a, addr_a), Shell::new(rtc_b, addr_b));
        let (mut to_a, mut to_b) = (VecDeque::new(), VecDeque::new());
        let (mut open_a, mut open_b) = (None, None);
        // The SDP changes were mutations: drain before anything else.
        let mut due_a = drain_into(&mut a, &mut to_b, &mut open_a);
        let mut due_b = drain_into(&mut b, &mut to_a, &mut open_b);
        let mut now = start;
        while open_a.is_none() || open_b.is_none() {
            while let Some(t) = to_a.pop_front() {
                assert_eq!(t.destination, addr_a);
                a.handle_datagram(now, t.source, &t.contents).unwrap();
                due_a = drain_into(&mut a, &mut to_b, &mut open_a);
            }
            while let Some(t) = to_b.pop_front() {
                assert_eq!(t.destination, addr_b);
                b.handle_datagram(now, t.source, &t.contents).unwrap();
                due_b = drain_into(&mut b, &mut to_a, &mut open_b);
            }
            if !to_a.is_empty() {
                continue;
            }
            now = now.max(due_a.min(due_b));
            assert!(
                now < start + Duration::from_secs(10),
                "not open within 10 s of virtual time"
            );
            if due_a <= now {
                a.handle_timeout(now).unwrap();
                due_a = drain_into(&mut a, &mut to_b, &mut open_a);
            }
            if due_b <= now {
                b.handle_timeout(now).unwrap();
                due_b = drain_into(&mut b, &mut to_a, &mut open_b);
            }
        }
        assert_eq!(open_a.as_deref(), Some(EVENTS_CHANNEL));
        assert_eq!(open_b.as_deref(), Some(EVENTS_CHANNEL));
    }

    #[test]
    fn datagrams_str0m_cannot_use_are_refused_without_touching_the_rtc() {
        let addr: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let mut shell = Shell::new(rtc_config().unwrap().build(Instant::now()), addr);
        let err = shell
            .handle_datagram(Instant::now(), addr, &[0xff, 0, 1])
            .unwrap_err();
        assert!(matches!(err, DatagramError::NotWebRtc), "{err}");
    }
}
