//! The media bridge between the two peer connections of one call, sans I/O.
//!
//! `Bridge` owns the client leg (`Rtc`, ICE-lite answerer) and the upstream leg
//! (`Rtc`, offerer). The driver feeds it datagrams and timeouts and sends the
//! transmits it yields; the bridge decides what goes where: RTP rewritten onto the
//! other leg's audio stream with its payload type mapped, data-channel messages
//! forwarded or buffered under a byte cap, and when the call ends and why.
//!
//! str0m's contract: every mutation of an `Rtc` is followed by a full drain of
//! `poll_output` before the next mutation. Events found while draining are queued
//! and handled after the drain, so a write onto the other leg is itself a mutation
//! followed by its own drain.

use crate::call_state::{CallCounters, DirectionCounters, EndReason};
use crate::gateway_event::{self, Sender};
use crate::metrics::DirectionMetrics;
use crate::peer::DataChannelTerms;
use crate::pt_map::PtMap;
use crate::session_ids::SessionIds;
use crate::usage_tap::UsageTap;
use realtime_relay_proto::call_id::Kind;
use rtc_peer::dc_queue::{DcQueue, Message};
use rtc_peer::shell::{self, Drained};
use rtc_peer::EVENTS_CHANNEL;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::channel::ChannelId;
use str0m::media::{MediaKind, Mid};
use str0m::net::{Protocol, Transmit};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite};
use str0m::{Event, IceConnectionState, Input, Rtc};

/// Below this many buffered bytes, str0m tells us a channel can take more.
const CHANNEL_LOW_WATER: usize = 64 * 1024;

/// How long a call that ends normally keeps going to deliver what is queued for a peer that is
/// still there (the provider's last `response.done` before it hung up, say): until every such
/// peer acknowledged it, or this long, whichever comes first.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long a call that reached its budget goes on: the provider's answer to the stop (the
/// cancelled `response.done`, `session.closed`) and the client's `budget_exceeded` event get
/// through meanwhile; then the call ends as `budget_exceeded`.
pub const BUDGET_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    Client,
    Upstream,
}

impl Leg {
    pub fn other(self) -> Leg {
        match self {
            Leg::Client => Leg::Upstream,
            Leg::Upstream => Leg::Client,
        }
    }

    fn closed(self) -> EndReason {
        match self {
            Leg::Client => EndReason::ClientClosed,
            Leg::Upstream => EndReason::UpstreamClosed,
        }
    }

    fn timed_out(self) -> EndReason {
        match self {
            Leg::Client => EndReason::ClientTimeout,
            Leg::Upstream => EndReason::UpstreamGone,
        }
    }

    fn sender(self) -> Sender {
        match self {
            Leg::Client => Sender::Client,
            Leg::Upstream => Sender::Model,
        }
    }
}

/// Whether a call that ended for `reason` first delivers what is queued. Not when the queue
/// itself is the problem, nor when the relay failed.
fn flushes_on_end(reason: EndReason) -> bool {
    !matches!(reason, EndReason::BufferOverflow | EndReason::InternalError)
}

#[derive(Debug, Clone, Copy)]
pub struct BridgeLimits {
    pub dc_buffer_bytes: usize,
    pub ice_timeout: Duration,
    pub peer_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_duration: Duration,
}

/// Where the bridge reports what it relays: the call's own counters (GetCall) and the
/// process-wide metrics, one pair per direction.
#[derive(Clone, Default)]
pub struct BridgeTelemetry {
    pub call: Arc<CallCounters>,
    pub client_to_upstream: DirectionMetrics,
    pub upstream_to_client: DirectionMetrics,
    pub dc_write_errors: prometheus_client::metrics::counter::Counter,
    pub buffer_overflows: prometheus_client::metrics::counter::Counter,
    pub dc_too_large: prometheus_client::metrics::counter::Counter,
    /// Where the provider's events are metered (none: not metered, as in most bridge tests).
    pub usage: Option<std::sync::Arc<UsageTap>>,
}

impl BridgeTelemetry {
    /// The process-wide metrics, and `call`'s own counters.
    pub fn from_metrics(metrics: &crate::metrics::Metrics, call: Arc<CallCounters>) -> Self {
        BridgeTelemetry {
            call,
            client_to_upstream: metrics.client_to_upstream.clone(),
            upstream_to_client: metrics.upstream_to_client.clone(),
            dc_write_errors: metrics.dc_write_errors.clone(),
            buffer_overflows: metrics.buffer_overflows.clone(),
            dc_too_large: metrics.dc_too_large.clone(),
            usage: None,
        }
    }

    /// Meters the provider's events through `tap`.
    pub fn with_usage(mut self, tap: UsageTap) -> Self {
        self.usage = Some(std::sync::Arc::new(tap));
        self
    }

    /// Counters for traffic that arrived on `from`.
    fn direction(&self, from: Leg) -> (&DirectionCounters, &DirectionMetrics) {
        match from {
            Leg::Client => (&self.call.client_to_upstream, &self.client_to_upstream),
            Leg::Upstream => (&self.call.upstream_to_client, &self.upstream_to_client),
        }
    }

    fn dropped(&self, from: Leg) {
        let (c, m) = self.direction(from);
        c.dropped.fetch_add(1, Relaxed);
        m.dropped.inc();
    }
}

struct LegState {
    rtc: Rtc,
    local_addr: SocketAddr,
    tcp_local_addr: Option<SocketAddr>,
    connected: bool,
    /// Datagrams str0m took on this leg, and its last ICE state: what an ICE timeout logs,
    /// so an operator can tell a client that never sent a check from one that stalled.
    datagrams: u64,
    ice_state: Option<IceConnectionState>,
    /// The `oai-events` channel on this leg, once open.
    channel: Option<ChannelId>,
    audio_mid: Option<Mid>,
    data_channel: DataChannelTerms,
    /// The peer closed, or went silent past the peer timeout: nothing more reaches it.
    gone: bool,
    last_receive: Instant,
    next_timeout: Instant,
    /// Messages waiting to be written on this leg.
    outbox: DcQueue,
    /// RTP was written since the last timeout pass: it waits in str0m's queue.
    written: bool,
}

pub struct Bridge {
    client: LegState,
    upstream: LegState,
    /// The channel we created on the upstream leg (opens after DTLS + SCTP).
    upstream_channel: ChannelId,
    /// Payload-type maps, built once both legs negotiated: from client, from upstream.
    pt_from_client: Option<PtMap>,
    pt_from_upstream: Option<PtMap>,
    limits: BridgeLimits,
    created: Instant,
    connected_at: Option<Instant>,
    last_activity: Instant,
    end: Option<EndReason>,
    /// Once ended: when the legs close even if queued events are still undelivered.
    close_by: Option<Instant>,
    /// Both legs closed: the driver sends the goodbyes and stops.
    finished: bool,
    /// Events the relay wrote itself, for their ids.
    notices: u64,
    /// The API the call speaks (the bridge relays both alike; only how it ends differs).
    api: Kind,
    /// GPT-Live: the provider sent `session.closed`, so its close that follows is the
    /// session's announced end ([`EndReason::SessionClosed`]), not a dying worker.
    session_closed_by_upstream: bool,
    /// GPT-Live: the provider's session id, renamed to the gateway's in its events.
    session_ids: Option<SessionIds>,
    /// The call reached its budget: it ends as `budget_exceeded` at this time (or when a leg
    /// closes first); the client's further events are no longer forwarded.
    budget_end_at: Option<Instant>,
    /// The latest time the driver gave us.
    now: Instant,
    events: VecDeque<(Leg, Event)>,
    transmits: Vec<(Leg, Transmit)>,
    telemetry: BridgeTelemetry,
}

/// The parts of a leg that setup produced.
pub struct LegSetup {
    pub rtc: Rtc,
    /// The address the leg's datagrams arrive on (what str0m sees as destination).
    pub local_addr: SocketAddr,
    /// The passive ICE-TCP candidate's address, if the leg has one: what str0m sees as the
    /// destination of every ICE-TCP frame.
    pub tcp_local_addr: Option<SocketAddr>,
    pub audio_mid: Option<Mid>,
    /// The data channel as the leg's offer/answer settled it. A leg without one (an
    /// audio-only client, or an `m=application` section rejected with port 0) never opens
    /// `oai-events`: events for it are dropped and counted instead of queued until the cap
    /// ends the call. Messages larger than its peer's `max-message-size` are not written:
    /// the client gets an `error` event instead.
    pub data_channel: DataChannelTerms,
}

impl Bridge {
    pub fn new(
        client: LegSetup,
        upstream: LegSetup,
        upstream_channel: ChannelId,
        limits: BridgeLimits,
        telemetry: BridgeTelemetry,
        now: Instant,
    ) -> Self {
        let leg = |s: LegSetup| LegState {
            rtc: s.rtc,
            local_addr: s.local_addr,
            tcp_local_addr: s.tcp_local_addr,
            connected: false,
            datagrams: 0,
            ice_state: None,
            channel: None,
            audio_mid: s.audio_mid,
            data_channel: s.data_channel,
            gone: false,
            last_receive: now,
            next_timeout: now,
            outbox: DcQueue::new(limits.dc_buffer_bytes),
            written: false,
        };
        let mut bridge = Bridge {
            client: leg(client),
            upstream: leg(upstream),
            upstream_channel,
            pt_from_client: None,
            pt_from_upstream: None,
            limits,
            created: now,
            connected_at: None,
            last_activity: now,
            end: None,
            close_by: None,
            finished: false,
            notices: 0,
            api: Kind::Realtime,
            session_closed_by_upstream: false,
            session_ids: None,
            budget_end_at: None,
            now,
            events: VecDeque::new(),
            transmits: Vec::new(),
            telemetry,
        };
        // Both Rtcs were mutated by setup (offer/answer); drain them before anything else.
        bridge.drain(Leg::Client);
        bridge.drain(Leg::Upstream);
        bridge.process_events(now);
        bridge
    }

    /// The bridge of a call that speaks `api` (default: Realtime).
    pub fn with_api(mut self, api: Kind) -> Self {
        self.api = api;
        self
    }

    /// Events from the provider name its session by the gateway's id (see [`SessionIds`]).
    pub fn with_session_ids(mut self, ids: Option<SessionIds>) -> Self {
        self.session_ids = ids;
        self
    }

    /// Why the call ends when `leg`'s peer closes: it closed, or, for the provider of a
    /// GPT-Live session that sent `session.closed` first, the session ended as announced.
    fn closed(&self, leg: Leg) -> EndReason {
        match leg {
            // Whoever closes once the budget is reached (a Live provider answering the
            // relay's session.close, most likely), the budget ended the call.
            _ if self.budget_end_at.is_some() => EndReason::BudgetExceeded,
            Leg::Upstream if self.session_closed_by_upstream => EndReason::SessionClosed,
            _ => leg.closed(),
        }
    }

    /// The call's usage reached its budget (`what` says how, for the client): the provider is
    /// asked to stop (Realtime `response.cancel`, GPT-Live `session.close`), the client gets
    /// an `error` event (`invalid_request_error`, `budget_exceeded`), and the call ends after
    /// [`BUDGET_GRACE`].
    fn budget_reached(&mut self, what: &str, now: Instant) {
        if self.budget_end_at.is_some() || self.end.is_some() {
            return;
        }
        self.budget_end_at = Some(now + BUDGET_GRACE);
        tracing::info!(what, "call budget reached; ending the call");
        self.notices += 1;
        let stop = gateway_event::stop_for_budget(self.api, self.notices);
        self.send_message(
            Leg::Upstream,
            Message {
                binary: false,
                data: stop,
            },
        );
        self.notices += 1;
        let notice = gateway_event::budget_exceeded(self.api, what, self.notices);
        self.send_message(
            Leg::Client,
            Message {
                binary: false,
                data: notice,
            },
        );
    }

    fn leg(&self, leg: Leg) -> &LegState {
        match leg {
            Leg::Client => &self.client,
            Leg::Upstream => &self.upstream,
        }
    }

    fn leg_mut(&mut self, leg: Leg) -> &mut LegState {
        match leg {
            Leg::Client => &mut self.client,
            Leg::Upstream => &mut self.upstream,
        }
    }

    pub fn local_addr(&self, leg: Leg) -> SocketAddr {
        self.leg(leg).local_addr
    }

    pub fn end_reason(&self) -> Option<EndReason> {
        self.end
    }

    /// The call ended and both legs are closed: the driver sends the last transmits (the
    /// goodbyes) and stops.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn is_connected(&self) -> bool {
        self.connected_at.is_some()
    }

    /// Datagrams to send, with the leg whose socket sends them.
    pub fn take_transmits(&mut self) -> std::vec::Drain<'_, (Leg, Transmit)> {
        self.transmits.drain(..)
    }

    /// Ends the call from outside (hangup, drain, limits enforced by the driver). What is
    /// queued for a peer still there is delivered first, within [`CLOSE_GRACE`]; the next
    /// input (`handle_timeout`, a datagram, `send_written`) starts that.
    pub fn end(&mut self, reason: EndReason) {
        if self.end.is_none() {
            self.end = Some(reason);
            if reason == EndReason::UpstreamGone {
                self.tell_client_upstream_gone();
            }
        }
    }

    /// The provider went silent: the client learns why its call ends from its own event
    /// stream (delivered before the close, like anything else queued), not only from the
    /// close that follows.
    fn tell_client_upstream_gone(&mut self) {
        self.notices += 1;
        let notice = gateway_event::upstream_gone(
            self.api,
            self.limits.peer_timeout.as_secs(),
            self.notices,
        );
        self.send_message(
            Leg::Client,
            Message {
                binary: false,
                data: notice,
            },
        );
    }

    /// Once ended: closes both legs when every peer still there has what was queued for it,
    /// or at the grace deadline.
    fn progress_close(&mut self, now: Instant) {
        let Some(reason) = self.end else {
            return;
        };
        if self.finished {
            return;
        }
        let grace = if flushes_on_end(reason) {
            CLOSE_GRACE
        } else {
            Duration::ZERO
        };
        let close_by = *self.close_by.get_or_insert(now + grace);
        let delivered = self.delivered(Leg::Client) && self.delivered(Leg::Upstream);
        if now >= close_by || delivered {
            if !delivered {
                tracing::info!(
                    queued_to_client = self.client.outbox.len(),
                    queued_to_upstream = self.upstream.outbox.len(),
                    "closing with data-channel messages undelivered after the grace period"
                );
            }
            self.close();
        }
    }

    /// Whether nothing is left to deliver to `leg`'s peer: its outbox is empty and its peer
    /// acknowledged every byte written, or it cannot receive anything any more.
    fn delivered(&mut self, leg: Leg) -> bool {
        let state = self.leg_mut(leg);
        let Some(id) = state.channel.filter(|_| state.connected && !state.gone) else {
            return true;
        };
        state.outbox.is_empty()
            && state
                .rtc
                .channel(id)
                .is_none_or(|mut ch| ch.buffered_amount() == 0)
    }

    /// An orderly close of both legs (DTLS close_notify, SCTP shutdown), whose datagrams
    /// come out of `take_transmits`.
    fn close(&mut self) {
        for leg in [Leg::Client, Leg::Upstream] {
            let _ = self.leg_mut(leg).rtc.close();
            self.drain(leg);
        }
        self.events.clear();
        self.finished = true;
    }

    /// Feeds one datagram that arrived for `leg`.
    pub fn handle_datagram(&mut self, leg: Leg, now: Instant, source: SocketAddr, data: &[u8]) {
        self.handle_packet(leg, now, Protocol::Udp, source, data)
    }

    /// Feeds one packet that arrived for `leg` over `proto`: a UDP datagram, or an ICE-TCP
    /// frame, which str0m sees as addressed to the leg's TCP candidate.
    pub fn handle_packet(
        &mut self,
        leg: Leg,
        now: Instant,
        proto: Protocol,
        source: SocketAddr,
        data: &[u8],
    ) {
        let local_addr = match proto {
            Protocol::Udp => self.leg(leg).local_addr,
            _ => match self.leg(leg).tcp_local_addr {
                Some(a) => a,
                // No TCP candidate on this leg: nothing str0m would accept.
                None => return,
            },
        };
        let Some(input) = shell::receive_on(proto, now, source, local_addr, data) else {
            // Not STUN, DTLS, RTP or RTCP: nothing str0m could use.
            return;
        };
        self.now = self.now.max(now);
        let state = self.leg_mut(leg);
        state.last_receive = now;
        state.datagrams += 1;
        if let Err(e) = state.rtc.handle_input(input) {
            // A bad packet is the sender's problem, not a reason to end the call.
            tracing::debug!(?leg, error = %e, "datagram rejected");
        }
        self.drain(leg);
        self.process_events(now);
        self.progress_close(now);
    }

    /// Lets RTP written during the last batch of input leave: one str0m send pass
    /// per leg that was written to, instead of one per packet.
    pub fn send_written(&mut self, now: Instant) {
        for leg in [Leg::Client, Leg::Upstream] {
            if std::mem::take(&mut self.leg_mut(leg).written) {
                // Not a whole timeout pass unless a timer of the leg is due: the vendored
                // str0m's `handle_written` (vendor/str0m/README.vendor.md).
                if let Err(e) = self.leg_mut(leg).rtc.handle_written(now) {
                    tracing::debug!(?leg, error = %e, "send timeout failed");
                }
                self.drain(leg);
            }
        }
        self.process_events(now);
        self.progress_close(now);
    }

    /// Advances time: str0m's timers, buffered writes, and the call's deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        for leg in [Leg::Client, Leg::Upstream] {
            if self.leg(leg).next_timeout <= now {
                if let Err(e) = self.leg_mut(leg).rtc.handle_input(Input::Timeout(now)) {
                    tracing::warn!(?leg, error = %e, "timeout handling failed");
                    self.end(self.closed(leg));
                }
                self.drain(leg);
            }
        }
        self.process_events(now);
        // Retry buffered writes in case str0m's low-water event will not come (the
        // buffer was already below the mark when a write was refused).
        for leg in [Leg::Client, Leg::Upstream] {
            if !self.leg(leg).outbox.is_empty() {
                self.flush(leg);
            }
        }
        self.process_events(now);
        if self.end.is_none() {
            self.check_deadlines(now);
        }
        self.progress_close(now);
    }

    /// When the driver must call `handle_timeout` next.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.client.next_timeout.min(self.upstream.next_timeout);
        if self.end.is_some() {
            // Ending: only the legs' own timers (acknowledgements, retransmits) and the
            // grace deadline matter; an input sets the deadline if none has yet.
            return t.min(self.close_by.unwrap_or(self.now));
        }
        t = t.min(self.created + self.limits.max_duration);
        if let Some(at) = self.budget_end_at {
            t = t.min(at);
        }
        match self.connected_at {
            None => t = t.min(self.created + self.limits.ice_timeout),
            Some(_) => {
                t = t.min(self.last_activity + self.limits.idle_timeout);
                for leg in [&self.client, &self.upstream] {
                    t = t.min(leg.last_receive + self.limits.peer_timeout);
                }
            }
        }
        if !self.client.outbox.is_empty() || !self.upstream.outbox.is_empty() {
            // Retry buffered writes at least every 20 ms.
            t = t.min(self.now + Duration::from_millis(20));
        }
        t
    }

    fn check_deadlines(&mut self, now: Instant) {
        if now >= self.created + self.limits.max_duration {
            self.end(EndReason::MaxDuration);
        }
        if self.budget_end_at.is_some_and(|at| now >= at) {
            self.end(EndReason::BudgetExceeded);
        }
        match self.connected_at {
            None if now >= self.created + self.limits.ice_timeout => {
                if self.end.is_none() {
                    let (c, u) = (&self.client, &self.upstream);
                    tracing::info!(
                        client_connected = c.connected,
                        client_ice = ?c.ice_state,
                        client_datagrams = c.datagrams,
                        upstream_connected = u.connected,
                        upstream_ice = ?u.ice_state,
                        upstream_datagrams = u.datagrams,
                        "the legs did not both connect in time"
                    );
                }
                self.end(EndReason::IceTimeout)
            }
            None => {}
            Some(_) => {
                for leg in [Leg::Client, Leg::Upstream] {
                    if now >= self.leg(leg).last_receive + self.limits.peer_timeout {
                        self.leg_mut(leg).gone = true;
                        self.end(leg.timed_out());
                    }
                }
                if now >= self.last_activity + self.limits.idle_timeout {
                    self.end(EndReason::IdleTimeout);
                }
            }
        }
    }

    /// Drains one leg's output until its next timeout: transmits are collected,
    /// events queued for `process_events`.
    fn drain(&mut self, leg: Leg) {
        let state = match leg {
            Leg::Client => &mut self.client,
            Leg::Upstream => &mut self.upstream,
        };
        let (transmits, events) = (&mut self.transmits, &mut self.events);
        let drained = shell::drain(&mut state.rtc, |_, out| match out {
            Drained::Transmit(t) => transmits.push((leg, t)),
            Drained::Event(e) => events.push_back((leg, e)),
        });
        match drained {
            Ok(next) => state.next_timeout = next,
            Err(e) => {
                tracing::warn!(?leg, error = %e, "peer connection failed");
                // Keep time moving so the driver doesn't spin on this leg. The time comes
                // from the driver's inputs, never the wall clock.
                state.next_timeout = self.now + Duration::from_secs(3600);
                self.end(self.closed(leg));
            }
        }
    }

    fn process_events(&mut self, now: Instant) {
        while let Some((leg, event)) = self.events.pop_front() {
            self.handle_event(leg, event, now);
        }
    }

    fn handle_event(&mut self, leg: Leg, event: Event, now: Instant) {
        match event {
            Event::Connected => {
                self.leg_mut(leg).connected = true;
                self.leg_mut(leg).last_receive = now;
                if self.client.connected && self.upstream.connected && self.connected_at.is_none() {
                    self.connected_at = Some(now);
                    self.last_activity = now;
                }
            }
            // str0m documents Disconnected as transient: its agent stopped hearing from the
            // peer, and recovers when checks get through again. A short outage must not end
            // the call: the peer timeout (no datagram at all for `--peer-timeout-secs`)
            // judges real loss, and the ICE timeout a leg that never connected.
            Event::IceConnectionStateChange(state) => {
                tracing::debug!(?leg, ?state, "ICE connection state");
                self.leg_mut(leg).ice_state = Some(state);
            }
            Event::MediaAdded(m) if m.kind == MediaKind::Audio => {
                let state = self.leg_mut(leg);
                if state.audio_mid.is_none() {
                    state.audio_mid = Some(m.mid);
                }
            }
            Event::ChannelOpen(id, label) => self.channel_opened(leg, id, &label),
            // The call is over: nothing new is forwarded while what was queued drains. Once
            // the budget is reached, the client's events stop too (a new response.create
            // would spend more), while the provider's answer to the stop still goes through.
            Event::ChannelData(d)
                if (self.end.is_some() || (leg == Leg::Client && self.budget_end_at.is_some()))
                    && self.leg(leg).channel == Some(d.id) =>
            {
                self.telemetry.dropped(leg);
            }
            Event::RtpPacket(_) if self.end.is_some() => self.telemetry.dropped(leg),
            Event::ChannelData(d) if self.leg(leg).channel == Some(d.id) => {
                let (c, m) = self.telemetry.direction(leg);
                c.dc_messages.fetch_add(1, Relaxed);
                c.dc_bytes.fetch_add(d.data.len() as u64, Relaxed);
                m.dc_messages.inc();
                m.dc_bytes.inc_by(d.data.len() as u64);
                self.last_activity = now;
                if leg == Leg::Upstream
                    && self.api == Kind::Live
                    && !d.binary
                    && gateway_event::is_session_closed(&d.data)
                {
                    self.session_closed_by_upstream = true;
                }
                let data = match &self.session_ids {
                    Some(ids) if leg == Leg::Upstream && !d.binary => {
                        ids.rename(&d.data).unwrap_or(d.data)
                    }
                    _ => d.data,
                };
                // Usage: only the provider's text events that pass the prefilter are kept
                // (copied) to be read, after the event is on its way.
                let metered = match &self.telemetry.usage {
                    Some(_) if leg == Leg::Upstream && !d.binary && UsageTap::wants(&data) => {
                        Some(data.clone())
                    }
                    _ => None,
                };
                self.send_message(
                    leg.other(),
                    Message {
                        binary: d.binary,
                        data,
                    },
                );
                let reached = match (&self.telemetry.usage, metered) {
                    (Some(tap), Some(event)) => tap.observe(&event),
                    _ => None,
                };
                if let Some(what) = reached {
                    self.budget_reached(&what, now);
                }
            }
            Event::ChannelBufferedAmountLow(id) if self.leg(leg).channel == Some(id) => {
                self.flush(leg);
            }
            Event::ChannelClose(id) if self.leg(leg).channel == Some(id) => {
                self.leg_mut(leg).gone = true;
                self.end(self.closed(leg));
            }
            Event::RtpPacket(p) => self.forward_rtp(leg, p, now),
            Event::Closed => {
                self.leg_mut(leg).gone = true;
                self.end(self.closed(leg));
            }
            _ => {}
        }
    }

    fn channel_opened(&mut self, leg: Leg, id: ChannelId, label: &str) {
        let ours = match leg {
            Leg::Client => label == EVENTS_CHANNEL && self.client.channel.is_none(),
            Leg::Upstream => id == self.upstream_channel,
        };
        if !ours {
            tracing::debug!(
                ?leg,
                label,
                "ignoring a data channel that is not oai-events"
            );
            return;
        }
        let state = self.leg_mut(leg);
        state.channel = Some(id);
        if let Some(mut ch) = state.rtc.channel(id) {
            ch.set_buffered_amount_low_threshold(CHANNEL_LOW_WATER);
        }
        self.drain(leg);
        self.flush(leg);
    }

    /// Writes a message on `to`'s events channel, or queues it (channel not open,
    /// earlier messages still queued, or the send buffer full).
    fn send_message(&mut self, to: Leg, message: Message) {
        let state = self.leg(to);
        if !state.data_channel.negotiated {
            self.telemetry.dropped(to.other());
            return;
        }
        if !state.data_channel.takes(message.data.len()) {
            self.refuse_too_large(to, &message);
            return;
        }
        if state.channel.is_some() && state.outbox.is_empty() {
            match self.write_message(to, message) {
                WriteResult::Written | WriteResult::Failed => return,
                WriteResult::Full(m) => {
                    self.leg_mut(to).outbox.push_front(m);
                    return;
                }
            }
        }
        if let Err(overflow) = self.leg_mut(to).outbox.push(message) {
            tracing::warn!(
                to = ?to,
                queued_bytes = overflow.queued_bytes,
                message_bytes = overflow.message_bytes,
                cap_bytes = overflow.cap_bytes,
                "data-channel buffer cap exceeded; ending the call"
            );
            self.telemetry.buffer_overflows.inc();
            self.end(EndReason::BufferOverflow);
        }
    }

    /// A message larger than `to`'s peer takes (its `max-message-size`) is never written:
    /// str0m would refuse it, and the sender would never learn. It is dropped, counted, and the
    /// client is told with an `error` event: it sent the message, or it is the one missing the
    /// model's event (an `error` event sent to the provider would only earn another error).
    fn refuse_too_large(&mut self, to: Leg, message: &Message) {
        let max = self
            .leg(to)
            .data_channel
            .peer_max_message
            .unwrap_or(usize::MAX);
        tracing::info!(
            from = ?to.other(),
            bytes = message.data.len(),
            max_message_bytes = max,
            "data-channel message larger than the receiver's max-message-size; not delivered"
        );
        self.telemetry.dropped(to.other());
        self.telemetry.dc_too_large.inc();
        self.notices += 1;
        let notice = gateway_event::event_too_large(
            self.api,
            to.other().sender(),
            &message.data,
            max,
            self.notices,
        );
        if self.client.data_channel.takes(notice.len()) {
            self.send_message(
                Leg::Client,
                Message {
                    binary: false,
                    data: notice,
                },
            );
        }
    }

    /// Writes queued messages on `leg` until its send buffer is full.
    fn flush(&mut self, leg: Leg) {
        if self.leg(leg).channel.is_none() {
            return;
        }
        while let Some(m) = self.leg_mut(leg).outbox.pop() {
            if let WriteResult::Full(m) = self.write_message(leg, m) {
                self.leg_mut(leg).outbox.push_front(m);
                break;
            }
        }
    }

    fn write_message(&mut self, to: Leg, m: Message) -> WriteResult {
        let state = self.leg_mut(to);
        let Some(id) = state.channel else {
            return WriteResult::Full(m);
        };
        let result = match state.rtc.channel(id) {
            Some(mut ch) => ch.write(m.binary, &m.data),
            None => Ok(false),
        };
        self.drain(to);
        match result {
            Ok(true) => WriteResult::Written,
            Ok(false) => WriteResult::Full(m),
            Err(e) => {
                // Count and log, never the payload.
                tracing::warn!(?to, bytes = m.data.len(), error = %e, "data-channel write failed");
                self.telemetry.dc_write_errors.inc();
                self.telemetry.dropped(to.other());
                WriteResult::Failed
            }
        }
    }

    fn forward_rtp(&mut self, from: Leg, packet: Box<RtpPacket>, now: Instant) {
        let to = from.other();
        let Some(mid) = self.leg(to).audio_mid.filter(|_| self.leg(to).connected) else {
            self.telemetry.dropped(from);
            return;
        };
        let Some(pt) = self
            .pt_map(from)
            .and_then(|m| m.map(*packet.header.payload_type))
        else {
            self.telemetry.dropped(from);
            return;
        };
        let payload_len = packet.payload.len() as u64;
        let ext_vals = ExtensionValues {
            audio_level: packet.header.ext_vals.audio_level,
            voice_activity: packet.header.ext_vals.voice_activity,
            ..Default::default()
        };
        let state = self.leg_mut(to);
        let mut api = state.rtc.direct_api();
        let Some(stream) = api.stream_tx_by_mid(mid, None) else {
            self.telemetry.dropped(from);
            return;
        };
        stream.write_rtp(
            RtpWrite::new(
                pt.into(),
                packet.seq_no,
                packet.header.timestamp,
                packet.timestamp,
                packet.payload,
            )
            .marker(packet.header.marker)
            .ext_vals(ext_vals),
        );
        // A written packet leaves on the leg's next timeout handling. Rather than run
        // str0m's whole timeout pass (and a drain) per packet, mark the leg; the driver
        // calls `send_written` once per batch of input, before it sends, and that polls
        // the leg. (A drain right after the write found nothing to send and cost 9 % of
        // the bridge's instructions per packet: docs/benchmarks.md.)
        self.leg_mut(to).written = true;
        let (c, m) = self.telemetry.direction(from);
        c.rtp_packets.fetch_add(1, Relaxed);
        c.rtp_bytes.fetch_add(payload_len, Relaxed);
        m.rtp_packets.inc();
        m.rtp_bytes.inc_by(payload_len);
        self.last_activity = now;
    }

    /// The payload-type map for packets arriving on `from`, built on first use once
    /// the other leg's media is known.
    fn pt_map(&mut self, from: Leg) -> Option<&PtMap> {
        let to = from.other();
        let to_mid = self.leg(to).audio_mid?;
        let built = match from {
            Leg::Client => self.pt_from_client.is_some(),
            Leg::Upstream => self.pt_from_upstream.is_some(),
        };
        if !built {
            let from_params = self.leg(from).rtc.codec_config().params().to_vec();
            let to_rtc = &self.leg(to).rtc;
            let accepted = to_rtc
                .media(to_mid)
                .map(|m| m.remote_pts().to_vec())
                .unwrap_or_default();
            let map = PtMap::from_params(&from_params, to_rtc.codec_config().params(), &accepted);
            match from {
                Leg::Client => self.pt_from_client = Some(map),
                Leg::Upstream => self.pt_from_upstream = Some(map),
            }
        }
        match from {
            Leg::Client => self.pt_from_client.as_ref(),
            Leg::Upstream => self.pt_from_upstream.as_ref(),
        }
    }
}

enum WriteResult {
    Written,
    /// The send buffer is full: keep the message and retry when it drains.
    Full(Message),
    Failed,
}

#[cfg(test)]
mod virtual_call;

#[cfg(test)]
mod tests;
