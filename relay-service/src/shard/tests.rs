//! The shards over real loopback sockets: a call placed on a shard, a real str0m provider
//! answering its upstream leg, and clients that flood it.

use super::call::{CallResources, ShardCall};
use super::{Placement, Shards};
use crate::bridge::{Bridge, BridgeLimits, BridgeTelemetry, LegSetup};
use crate::call_state::EndReason;
use crate::media_socket::{ClientPort, Datagram};
use crate::metrics::{Metrics, ReasonLabel};
use crate::peer;
use crate::registry::{CallEntry, NewCall, Registry};
use rtc_peer::udp::{next_wake, UdpPeer, MAX_DATAGRAM};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::media::{Direction, MediaKind};
use str0m::net::Protocol;
use str0m::{Candidate, Event, IceCreds, Rtc};
use tokio::sync::{mpsc, oneshot};

const LOOPBACK: [u8; 4] = [127, 0, 0, 1];
const UFRAG: &str = "floodufrag";
const PASS: &str = "floodpass-0123456789abcdef";

/// A relay's media side in miniature: the shared port on loopback and its shards.
struct Media {
    port: Arc<ClientPort>,
    shards: Shards,
    metrics: Arc<Metrics>,
}

fn media(shards: usize) -> Media {
    let metrics = Arc::new(Metrics::new());
    let port = Arc::new(ClientPort::bind(SocketAddr::from((LOOPBACK, 0)), shards).unwrap());
    let shards = Shards::start(port.clone(), metrics.clone()).unwrap();
    Media {
        port,
        shards,
        metrics,
    }
}

/// A call placed on a shard, and what a test holds of it.
struct Placed {
    at: Placement,
    entry: Arc<CallEntry>,
    ended: oneshot::Receiver<EndReason>,
    /// Feeds the call's inbox as ICE-TCP frames and other shards' datagrams do.
    inbox: super::inbox::CallInbox,
    created: Instant,
    /// The client's ICE username fragment, from its offer.
    client_ufrag: String,
    upstream_refused: prometheus_client::metrics::family::Family<
        ReasonLabel,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// A call as the relay sets it up, over real loopback sockets: the client leg accepts an offer
/// from a str0m client that never sends a packet (the floods below stand in for it), and the
/// upstream leg is answered by `provider`, a real str0m peer on its own socket.
fn place_call(
    media: &Media,
    registry: &Registry,
    limits: BridgeLimits,
    provider: &mut Rtc,
    provider_addr: SocketAddr,
    queue: usize,
    allow_private: bool,
) -> Placed {
    let now = Instant::now();
    let mut client = rtc_peer::crypto::rtc_config().unwrap().build(now);
    let mut api = client.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    api.add_channel(rtc_peer::EVENTS_CHANNEL.to_string());
    let (offer, _pending) = api.apply().unwrap();
    let ice = IceCreds {
        ufrag: UFRAG.into(),
        pass: PASS.into(),
    };
    let offer = offer.to_sdp_string();
    let client_ufrag = offer
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .expect("an offer names its ICE username fragment")
        .trim()
        .to_string();
    let port_addr = media.port.local_addr();
    let client_leg = peer::accept_client_offer(
        &offer,
        port_addr,
        None,
        ice.clone(),
        limits.dc_buffer_bytes,
        now,
    )
    .unwrap();
    let client_terms = peer::data_channel_terms(&offer, &client_leg.answer_sdp);

    let upstream_socket = std::net::UdpSocket::bind(SocketAddr::from((LOOPBACK, 0))).unwrap();
    let upstream_local = upstream_socket.local_addr().unwrap();
    let mut upstream =
        peer::create_upstream_offer(upstream_local, None, limits.dc_buffer_bytes, now).unwrap();
    provider.add_local_candidate(Candidate::host(provider_addr, "udp").unwrap());
    let upstream_offer = upstream.offer.to_sdp_string();
    let answer = provider
        .sdp_api()
        .accept_offer(upstream.offer)
        .unwrap()
        .to_sdp_string();
    peer::accept_upstream_answer(&mut upstream.rtc, upstream.pending, &answer).unwrap();
    let upstream_terms = peer::data_channel_terms(&answer, &upstream_offer);

    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call_id = format!(
        "rtc_flood{}",
        CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let entry = registry
        .reserve(NewCall {
            call_id: &call_id,
            api: realtime_relay_proto::call_id::Kind::Realtime,
            model: "m",
            upstream_model: "m",
            worker_id: "w",
            principal: "",
        })
        .unwrap();
    let bridge = Bridge::new(
        LegSetup {
            rtc: client_leg.rtc,
            local_addr: port_addr,
            tcp_local_addr: None,
            audio_mid: client_leg.audio_mid,
            data_channel: client_terms,
        },
        LegSetup {
            rtc: upstream.rtc,
            local_addr: upstream_local,
            tcp_local_addr: None,
            audio_mid: Some(upstream.audio_mid),
            data_channel: upstream_terms,
        },
        upstream.channel,
        limits,
        BridgeTelemetry::from_metrics(&media.metrics, entry.counters.clone()),
        now,
    );
    let at = media.shards.place();
    let (tx, rx) = mpsc::channel(queue);
    let inbox = media.shards.inbox(at, tx);
    let route = media.port.register(&ice.ufrag, &ice.pass, inbox.clone());
    let (ended_tx, ended) = oneshot::channel();
    let upstream_refused = prometheus_client::metrics::family::Family::default();
    let call = ShardCall::new(
        at.key,
        CallResources {
            bridge,
            entry: entry.clone(),
            client_tcp: None,
            client_rx: rx,
            inbox: inbox.clone(),
            upstream_socket,
            upstream_allow_private: allow_private,
            upstream_refused: upstream_refused.clone(),
            connected_gauge: Default::default(),
            route,
            ended: ended_tx,
        },
    )
    .unwrap();
    media.shards.run(at, call);
    Placed {
        at,
        entry,
        ended,
        inbox,
        created: now,
        client_ufrag,
        upstream_refused,
    }
}

fn limits(max_duration: Duration) -> BridgeLimits {
    BridgeLimits {
        dc_buffer_bytes: 1024 * 1024,
        // The client never connects; only the maximum duration (or a hangup) ends the call.
        ice_timeout: Duration::from_secs(60),
        peer_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        max_duration,
    }
}

fn provider() -> (Rtc, std::net::UdpSocket, SocketAddr) {
    let socket = rtc_peer::udp::bind(LOOPBACK.into()).unwrap();
    let addr = socket.local_addr().unwrap();
    let rtc = rtc_peer::crypto::rtc_config()
        .unwrap()
        .build(Instant::now());
    (rtc, socket, addr)
}

/// A binding request to the call signed with its password, as its client's ICE agent sends.
fn signed_binding_request() -> Vec<u8> {
    signed_binding_request_from("remote")
}

/// As [`signed_binding_request`], from the client whose ICE username fragment is
/// `client_ufrag`: the call's ICE agent answers it.
fn signed_binding_request_from(client_ufrag: &str) -> Vec<u8> {
    use str0m::ice::{StunMessage, TransId};
    let hmac = str0m::crypto::from_feature_flags().sha1_hmac_provider;
    let username = format!("{UFRAG}:{client_ufrag}");
    let request = StunMessage::binding_request(&username, TransId::new(), true, 7, 1 << 24, false);
    let mut buf = vec![0u8; 512];
    let n = request
        .to_bytes(Some(PASS.as_bytes()), &mut buf, |k, p| hmac.sha1_hmac(k, p))
        .unwrap();
    buf.truncate(n);
    buf
}

fn rtp(seq: u64) -> Vec<u8> {
    let mut rtp = vec![0u8; 172];
    rtp[0] = 0x80;
    rtp[1] = 111;
    rtp[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
    rtp
}

/// Drives `peer` until `until`; returns when it saw the relay's `oai-events` channel
/// open, which needs ICE, DTLS and SCTP with the relay's upstream leg: datagrams the
/// relay received on its upstream socket and answered.
/// Serves the provider's side until `until` (it keeps acknowledging, so a call that ends
/// delivers what it queued without waiting out the grace period); returns when its
/// `oai-events` channel opened.
async fn provider_until(mut peer: UdpPeer, until: Instant) -> Option<Instant> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut open_at = None;
    while Instant::now() < until {
        let mut opened = false;
        let Ok(deadline) = peer.drain(|_, e| opened |= matches!(e, Event::ChannelOpen(..))) else {
            return open_at;
        };
        if opened && open_at.is_none() {
            open_at = Some(Instant::now());
        }
        let wake = next_wake(deadline.min(until), Instant::now());
        tokio::select! {
            r = peer.socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    peer.handle_datagram(&buf[..n], from, Instant::now());
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if peer.handle_timeout(Instant::now()).is_err() {
                    return open_at;
                }
            }
        }
    }
    open_at
}

/// A call on a one-shard relay that runs until its maximum duration `run`, with an inbox of
/// `queue` datagrams, its provider served until the call has ended and delivered (the maximum
/// plus the close grace, and a second to spare).
struct ServedCall {
    media: Media,
    /// Kept for the call's lifetime, as the relay keeps its registry.
    _registry: Registry,
    placed: Placed,
    /// Yields when the provider saw the `oai-events` channel open, if it did.
    provider: tokio::task::JoinHandle<Option<Instant>>,
}

fn served_call(run: Duration, queue: usize, allow_private: bool) -> ServedCall {
    let media = media(1);
    let registry = Registry::new(1, 1);
    let (mut provider, provider_socket, provider_addr) = provider();
    let placed = place_call(
        &media,
        &registry,
        limits(run),
        &mut provider,
        provider_addr,
        queue,
        allow_private,
    );
    let provider = UdpPeer::new(provider, provider_socket).unwrap();
    let serve_until = placed.created + run + crate::bridge::CLOSE_GRACE + Duration::from_secs(1);
    let provider = tokio::spawn(provider_until(provider, serve_until));
    ServedCall {
        media,
        _registry: registry,
        placed,
        provider,
    }
}

/// Waits for a [`served_call`] to end, which must be at its maximum duration; returns when
/// its provider saw the `oai-events` channel open, if it did.
async fn ends_at_its_maximum(
    ended: oneshot::Receiver<EndReason>,
    provider: tokio::task::JoinHandle<Option<Instant>>,
) -> Option<Instant> {
    let ended = tokio::time::timeout(Duration::from_secs(10), ended).await;
    assert_eq!(
        ended.ok().and_then(Result::ok),
        Some(EndReason::MaxDuration)
    );
    provider.await.unwrap()
}

/// How a test floods the call's client leg.
#[derive(Debug, Clone, Copy)]
enum Flood {
    /// Real UDP at the shared port from an address the call learned (a signed binding request
    /// first): the shard's own socket, read in bounded batches.
    Port,
    /// The call's inbox kept full (ICE-TCP frames, datagrams another shard received).
    Inbox,
}

/// A client flooding the call at line rate must starve neither the rest of the call nor the
/// shard: the provider still connects over the upstream socket, and the call still ends at its
/// maximum duration, on time. Before the shards, the per-call driver's `biased` select took the
/// client queue whenever it was ready: the upstream socket was never read, the timer never
/// fired, and the call outlived its maximum for as long as the flood went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_starves_neither_the_upstream_leg_nor_the_call_deadlines() {
    for flood in [Flood::Port, Flood::Inbox] {
        const MAX_DURATION: Duration = Duration::from_millis(2_000);
        const LATE: Duration = Duration::from_millis(500);
        // Larger than the default (512), so that the shard cannot empty it while the OS
        // pauses the flooding thread for a few milliseconds: the client is always ready.
        const QUEUE: usize = 16_384;
        let served = served_call(MAX_DURATION, QUEUE, true);
        let deadline = served.placed.created + MAX_DURATION;
        // Every task stops by itself: the flood a few seconds after the deadline (or when the
        // call is gone), the provider after the deadline.
        let flood_until = deadline + Duration::from_secs(3);
        let port_addr = served.media.port.local_addr();
        let inbox = served.placed.inbox.clone();
        let flooding = std::thread::spawn(move || {
            let (mut sent, mut full) = (0u64, 0u64);
            let flooder = std::net::UdpSocket::bind(SocketAddr::from((LOOPBACK, 0))).unwrap();
            if let Flood::Port = flood {
                flooder
                    .send_to(&signed_binding_request(), port_addr)
                    .unwrap();
            }
            while Instant::now() < flood_until {
                match flood {
                    Flood::Port => match flooder.send_to(&rtp(sent), port_addr) {
                        Ok(_) => sent += 1,
                        Err(_) => full += 1,
                    },
                    Flood::Inbox => {
                        let d = Datagram {
                            at: Instant::now(),
                            proto: Protocol::Udp,
                            source: flooder.local_addr().unwrap(),
                            local_ip: None,
                            data: rtp(sent),
                        };
                        match inbox.try_send(d) {
                            Ok(()) => sent += 1,
                            // Full: the shard drains a batch per turn, so a short pause keeps
                            // the queue full while leaving the shard a core on this 2-core
                            // machine (a spinning flooder, the shard, the provider and the
                            // test's runtime would be four busy threads).
                            Err(super::inbox::InboxError::Full) => {
                                full += 1;
                                std::thread::sleep(Duration::from_micros(200));
                            }
                            Err(super::inbox::InboxError::Closed) => break,
                        }
                    }
                }
            }
            (sent, full)
        });
        let ended = tokio::time::timeout(Duration::from_secs(10), served.placed.ended).await;
        let ended_after = served.placed.created.elapsed();
        let (sent, full) = tokio::task::spawn_blocking(move || flooding.join().unwrap())
            .await
            .unwrap();
        let channel_open = served.provider.await.unwrap();

        assert!(sent > 10_000, "{flood:?}: the flood sent only {sent}");
        if let Flood::Inbox = flood {
            assert!(full > 0, "the flood never filled the inbox ({sent} sent)");
        }
        assert_eq!(
            ended.ok().and_then(Result::ok),
            Some(EndReason::MaxDuration),
            "{flood:?}"
        );
        assert!(
            ended_after >= MAX_DURATION && ended_after < MAX_DURATION + LATE,
            "{flood:?}: the call ended {ended_after:?} after it started, its maximum is \
             {MAX_DURATION:?} ({sent} flood datagrams, full {full} times)"
        );
        let channel_open = channel_open
            .unwrap_or_else(|| panic!("{flood:?}: the provider never connected during the flood"));
        assert!(channel_open < deadline, "{flood:?}");
        assert_eq!(
            served.media.shards.loads(),
            vec![0],
            "{flood:?}: the shard let the call go"
        );
    }
}

/// The private-address policy holds for datagrams, not only for the candidates of an answer:
/// a provider whose media comes from (or must go to) a private address, here loopback, is
/// neither heard nor answered without `--allow-private-upstreams`, and every refusal is
/// counted by direction. With the flag the same provider connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_datagrams_from_and_to_private_addresses_are_dropped_and_counted() {
    const RUN: Duration = Duration::from_millis(1_500);
    for allow_private in [false, true] {
        // Bound whole: the relay's media side lives to the end of the round.
        let served = served_call(RUN, 64, allow_private);
        let channel_open = ends_at_its_maximum(served.placed.ended, served.provider).await;
        let count = |reason: &str| {
            served
                .placed
                .upstream_refused
                .get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                })
                .get()
        };
        let (from, to) = (
            count("datagram_from_not_public"),
            count("datagram_to_not_public"),
        );
        if allow_private {
            assert!(channel_open.is_some(), "allowed: the provider connects");
            assert_eq!((from, to), (0, 0));
        } else {
            assert!(
                channel_open.is_none(),
                "the relay talked to a private address"
            );
            assert!(to > 0, "the relay's own checks to the provider are refused");
            assert!(from > 0, "the provider's checks are refused: {from}");
        }
    }
}

/// A shard wakes for what arrives and for its timers, not for room in its sockets. Watched for
/// room all the time, a socket signals it after every datagram it sends, and the shard woke a
/// second time per packet to find nothing to do: two epoll waits per relayed packet instead of
/// one. Here every binding request is answered through the shared port, while the provider's
/// handshake and acknowledgements go through the upstream socket; neither may leave idle
/// wake-ups behind (`media_shard_wakeups_total{result="idle"}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_does_not_wake_the_shard_again() {
    const REQUESTS: usize = 50;
    const RUN: Duration = Duration::from_millis(2_000);
    let served = served_call(RUN, 64, true);
    let wakeups = served.media.metrics.media_wakeups.clone();
    let port_addr = served.media.port.local_addr();
    let client_ufrag = served.placed.client_ufrag.clone();
    // One request at a time, each answered before the next: every one is its own wake-up.
    let answered = tokio::task::spawn_blocking(move || {
        let client = std::net::UdpSocket::bind(SocketAddr::from((LOOPBACK, 0))).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut buf = [0u8; 1500];
        let mut answered = 0;
        for _ in 0..REQUESTS {
            let request = signed_binding_request_from(&client_ufrag);
            client.send_to(&request, port_addr).unwrap();
            if client.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        answered
    })
    .await
    .unwrap();
    let channel_open = ends_at_its_maximum(served.placed.ended, served.provider).await;

    assert_eq!(answered, REQUESTS, "every binding request is answered");
    assert!(channel_open.is_some(), "the provider connected");
    let (work, idle) = (wakeups.work.get(), wakeups.idle.get());
    assert!(
        work >= REQUESTS as u64,
        "{work} wake-ups with work for {REQUESTS} requests"
    );
    // Without the fix, about one idle wake-up per request answered and per provider turn.
    assert!(
        idle <= work / 8,
        "{idle} idle wake-ups against {work} with work: sending woke the shard"
    );
}

/// A hangup reaches the call on its shard: the entry's end request ends the call with that
/// reason at once, and the shard lets it go (routes forgotten, load back to zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_request_ends_the_call_on_its_shard_with_the_entrys_reason() {
    let media = media(2);
    let registry = Registry::new(1, 1);
    let (mut provider, _provider_socket, provider_addr) = provider();
    let placed = place_call(
        &media,
        &registry,
        limits(Duration::from_secs(60)),
        &mut provider,
        provider_addr,
        64,
        true,
    );
    assert_eq!(media.shards.loads().iter().sum::<usize>(), 1);
    assert_eq!(media.port.route_count().0, 1);
    placed.entry.request_end(EndReason::Hangup);
    media.shards.end(placed.at);
    let ended = tokio::time::timeout(Duration::from_secs(5), placed.ended).await;
    assert_eq!(ended.ok().and_then(Result::ok), Some(EndReason::Hangup));
    assert_eq!(media.shards.loads(), vec![0, 0]);
    assert_eq!(
        media.port.route_count(),
        (0, 0),
        "the call's routes are gone"
    );
}

/// New calls go to the least loaded shard, so two shards hold one call each.
#[test]
fn calls_are_placed_on_the_least_loaded_shard() {
    let media = media(2);
    let registry = Registry::new(2, 1);
    let mut placed = Vec::new();
    for _ in 0..2 {
        let (mut provider, _socket, provider_addr) = provider();
        placed.push(place_call(
            &media,
            &registry,
            limits(Duration::from_secs(60)),
            &mut provider,
            provider_addr,
            8,
            true,
        ));
    }
    assert_ne!(placed[0].at.shard, placed[1].at.shard);
    assert_ne!(placed[0].at.key, placed[1].at.key);
    assert_eq!(media.shards.loads(), vec![1, 1]);
}

/// A call handed to a shard whose thread has stopped ends at once as `internal_error`: it does
/// not wait in a queue nobody reads, holding its place and its sockets.
#[tokio::test]
async fn a_call_for_a_stopped_shard_ends_at_once() {
    let media = media(1);
    media.shards.stop_one(0);
    let registry = Registry::new(1, 1);
    let (mut provider, _socket, provider_addr) = provider();
    let placed = place_call(
        &media,
        &registry,
        limits(Duration::from_secs(60)),
        &mut provider,
        provider_addr,
        8,
        true,
    );
    let ended = tokio::time::timeout(Duration::from_secs(1), placed.ended).await;
    assert_eq!(
        ended.ok().and_then(Result::ok),
        Some(EndReason::InternalError)
    );
    assert_eq!(media.shards.loads(), vec![0]);
    assert_eq!(
        media.port.route_count(),
        (0, 0),
        "the call's routes are gone"
    );
}
