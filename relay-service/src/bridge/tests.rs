//! The bridge in virtual time: timeouts, payload-type mapping, data-channel buffering
//! and back-pressure, each proven through a [`VirtualCall`] at an exact instant.

use super::virtual_call::*;
use super::{BridgeLimits, Leg};
use crate::call_state::EndReason;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// The relay's defaults with some limits changed.
fn with_limits(change: impl FnOnce(&mut BridgeLimits)) -> Options {
    let mut options = Options::default();
    change(&mut options.limits);
    options
}

fn binary(len: usize, tag: u8) -> Outgoing {
    Outgoing {
        binary: true,
        data: vec![tag; len],
    }
}

const LATENCY: Duration = Duration::from_millis(10);

#[test]
fn both_legs_connect_and_events_flow_both_ways() {
    let mut call = VirtualCall::connected(Options::default());
    assert!(call.elapsed() < secs(1), "{:?}", call.elapsed());
    call.send_text(Side::Client, r#"{"type":"response.create"}"#);
    call.send_text(Side::Provider, r#"{"type":"session.created"}"#);
    call.run_for(ms(200));
    assert_eq!(
        call.provider.messages(),
        vec![br#"{"type":"response.create"}"#.to_vec()]
    );
    assert_eq!(
        call.client.messages(),
        vec![br#"{"type":"session.created"}"#.to_vec()]
    );
    assert_eq!(call.relay.stopped, None);
    assert_eq!(
        call.counters.client_to_upstream.dc_messages.load(Relaxed),
        1
    );
    assert_eq!(
        call.counters.upstream_to_client.dc_messages.load(Relaxed),
        1
    );
}

#[test]
fn payload_types_are_mapped_when_the_legs_negotiate_different_opus_numbers() {
    // The relay's upstream offer puts Opus at str0m's 111; the provider answers with it.
    // (client offers, provider receives, client receives)
    let rows = [(111, 111, 111), (109, 111, 109), (96, 111, 96)];
    for (client_pt, provider_sees, client_sees) in rows {
        let mut call = VirtualCall::connected(Options {
            client_opus_pt: client_pt,
            ..Options::default()
        });
        call.send_audio(Side::Client, 50);
        call.send_audio(Side::Provider, 50);
        call.run_for(secs(2));
        assert_eq!(
            call.provider.rtp_payload_types(),
            vec![provider_sees; 50],
            "client offered {client_pt}"
        );
        assert_eq!(
            call.client.rtp_payload_types(),
            vec![client_sees; 50],
            "client offered {client_pt}"
        );
        let (up, down) = (
            &call.counters.client_to_upstream,
            &call.counters.upstream_to_client,
        );
        assert_eq!(up.rtp_packets.load(Relaxed), 50);
        assert_eq!(down.rtp_packets.load(Relaxed), 50);
        assert_eq!(up.dropped.load(Relaxed) + down.dropped.load(Relaxed), 0);
    }
}

#[test]
fn audio_payloads_arrive_intact_and_in_order() {
    let mut call = VirtualCall::connected(Options {
        client_opus_pt: 109,
        ..Options::default()
    });
    call.send_audio(Side::Client, 20);
    call.run_for(secs(1));
    let sequence: Vec<u64> = call
        .provider
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            PeerEvent::Rtp { payload, .. } => {
                Some(u64::from_be_bytes(payload[..8].try_into().unwrap()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(sequence, (0..20).collect::<Vec<_>>());
}

/// Each leg writes a relayed packet into a buffer it reuses for every packet it sends, so
/// a short frame after a long one must not carry the long one's tail, and a long one after
/// a short one must be whole: both directions, byte for byte, in order.
#[test]
fn audio_payloads_of_changing_sizes_arrive_byte_for_byte() {
    let sizes = [1000, 1, 160, 17, 900, 40, 600];
    let mut call = VirtualCall::connected(Options::default());
    for side in [Side::Client, Side::Provider] {
        call.use_frame_sizes(side, &sizes);
        call.send_audio(side, 21);
    }
    call.run_for(secs(1));
    for (receiver, sender) in [
        (&call.provider, &call.client),
        (&call.client, &call.provider),
    ] {
        let payloads: Vec<&Vec<u8>> = receiver
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                PeerEvent::Rtp { payload, .. } => Some(payload),
                _ => None,
            })
            .collect();
        let expected: Vec<Vec<u8>> = (0..21u64)
            .map(|seq| sized_frame(seq, sizes[seq as usize % sizes.len()]))
            .collect();
        assert_eq!(
            payloads.len(),
            expected.len(),
            "frames to {:?}",
            receiver.addr
        );
        for (seq, (got, want)) in payloads.iter().zip(&expected).enumerate() {
            assert!(*got == want, "frame {seq} to {:?} differs", sender.addr);
        }
    }
}

#[test]
fn a_client_that_never_connects_ends_the_call_at_the_ice_timeout() {
    // 15 s is the relay's default; str0m's ICE-lite agent gives up on the client's pair
    // at about the same time, and must not turn this into a client_timeout.
    for ice in [1, 15, 30] {
        let mut call = VirtualCall::new(with_limits(|l| l.ice_timeout = secs(ice)));
        let (at, reason) = call.run_until_stopped(secs(60));
        assert_eq!(
            (at - call.start, reason),
            (secs(ice), EndReason::IceTimeout),
            "ice timeout {ice} s"
        );
        call.run_for(secs(1));
        assert!(
            call.provider.saw_end(),
            "the provider's side is closed at once (ice timeout {ice} s)"
        );
    }
}

#[test]
fn a_client_may_connect_late_within_a_long_ice_timeout() {
    let mut call = VirtualCall::new(with_limits(|l| l.ice_timeout = secs(40)));
    call.run_for(secs(25));
    assert_eq!(call.relay.stopped, None, "the configured ICE timeout holds");
    call.answer_client();
    let limit = call.now + secs(5);
    call.run_while(limit, |c| c.client.channel.is_none());
    call.send_text(Side::Client, "late but here");
    call.run_for(secs(1));
    assert!(call.relay.bridge.is_connected());
    assert_eq!(call.provider.messages(), vec![b"late but here".to_vec()]);
}

#[test]
fn an_unreachable_provider_ends_the_call_at_the_ice_timeout() {
    for ice in [5, 15, 20] {
        let mut call = VirtualCall::new(with_limits(|l| l.ice_timeout = secs(ice)));
        call.net.take_down(PROVIDER);
        call.answer_client();
        let (at, reason) = call.run_until_stopped(secs(60));
        assert_eq!(
            (at - call.start, reason),
            (secs(ice), EndReason::IceTimeout),
            "ice timeout {ice} s"
        );
        assert!(
            call.client.saw(&PeerEvent::Connected),
            "only the upstream failed"
        );
    }
}

#[test]
fn an_upstream_dtls_handshake_that_gives_up_ends_the_call_as_upstream_closed() {
    // As implemented: str0m abandons the upstream leg's DTLS handshake after its
    // randomised retransmissions (26-32 s in practice); the leg's Rtc fails, which ends
    // the call at once as upstream_closed, before a longer ICE timeout.
    let mut call = VirtualCall::new(with_limits(|l| l.ice_timeout = secs(60)));
    call.net.take_down(PROVIDER);
    call.answer_client();
    let (at, reason) = call.run_until_stopped(secs(60));
    let after = at - call.start;
    assert_eq!(reason, EndReason::UpstreamClosed, "after {after:?}");
    assert!(after > secs(20) && after < secs(40), "{after:?}");
}

#[test]
fn a_vanished_peer_is_reaped_at_the_peer_timeout() {
    // (who vanishes, the relay's leg to it, the reason, who must learn of the end)
    let rows = [
        (
            CLIENT,
            Leg::Client,
            EndReason::ClientTimeout,
            Side::Provider,
        ),
        (
            PROVIDER,
            Leg::Upstream,
            EndReason::UpstreamGone,
            Side::Client,
        ),
    ];
    for (gone, leg, expected, other) in rows {
        for peer in [2, 5, 15] {
            let mut call = VirtualCall::connected(with_limits(|l| l.peer_timeout = secs(peer)));
            call.run_for(secs(1));
            call.net.take_down(gone);
            let (at, reason) = call.run_until_stopped(secs(60));
            let last = call.relay.last_datagram[&leg];
            assert_eq!(
                (at, reason),
                (last + secs(peer), expected),
                "{gone} gone, peer timeout {peer} s"
            );
            call.run_for(secs(1));
            assert!(call.peer(other).saw_end(), "{other:?} learns at once");
            // A silent provider: the client is told why, on its event stream, before the close.
            let told = error_events(&call);
            if expected == EndReason::UpstreamGone {
                assert_eq!(told.len(), 1, "peer timeout {peer}: {told:?}");
                assert_eq!(told[0]["error"]["code"], "upstream_gone");
                assert_eq!(told[0]["error"]["type"], "server_error");
                let closed = call
                    .client
                    .first(&PeerEvent::ChannelClosed)
                    .or(call.client.first(&PeerEvent::Closed));
                let told_at = call
                    .client
                    .events
                    .iter()
                    .find(|(_, e)| matches!(e, PeerEvent::Message { data, .. } if data.starts_with(br#"{"error""#) || data.starts_with(br#"{"type":"error""#)))
                    .map(|(t, _)| *t);
                assert!(
                    told_at.is_some() && told_at <= closed,
                    "told {told_at:?}, closed {closed:?}"
                );
            } else {
                assert!(told.is_empty(), "{told:?}");
            }
        }
    }
}

#[test]
fn an_ice_disconnect_does_not_end_the_call_the_peer_timeout_does() {
    // str0m's agent reports Disconnected once its consent checks go unanswered (~18 s); the
    // call used to end right there. Now the peer timeout alone judges a silent leg.
    for (gone, leg, expected) in [
        (CLIENT, Leg::Client, EndReason::ClientTimeout),
        (PROVIDER, Leg::Upstream, EndReason::UpstreamGone),
    ] {
        let mut call = VirtualCall::connected(with_limits(|l| l.peer_timeout = secs(60)));
        call.net.take_down(gone);
        let (at, reason) = call.run_until_stopped(secs(90));
        let silent = at - call.relay.last_datagram[&leg];
        assert_eq!((silent, reason), (secs(60), expected), "{gone} gone");
    }
}

#[test]
fn an_outage_shorter_than_the_peer_timeout_does_not_end_the_call() {
    // 3 s (a Wi-Fi roam) and 25 s (past str0m's Disconnected, ~18 s), either peer's link.
    for (peer, side) in [(CLIENT, Side::Client), (PROVIDER, Side::Provider)] {
        for outage in [3, 25] {
            let mut call = VirtualCall::connected(with_limits(|l| l.peer_timeout = secs(30)));
            call.run_for(secs(1));
            call.net.take_down(peer);
            call.run_for(secs(outage));
            call.net.bring_up(peer);
            call.run_for(secs(5));
            assert_eq!(call.relay.stopped, None, "{peer} out for {outage} s");
            let before = call.peer(side).messages().len();
            call.send_text(Side::Client, "after");
            call.send_text(Side::Provider, "after");
            call.send_audio(Side::Client, 10);
            call.send_audio(Side::Provider, 10);
            call.run_for(secs(2));
            let other = match side {
                Side::Client => Side::Provider,
                Side::Provider => Side::Client,
            };
            assert_eq!(
                call.peer(side).messages().len(),
                before + 1,
                "{peer} {outage} s"
            );
            assert_eq!(call.peer(other).messages().last().unwrap(), b"after");
            assert_eq!(
                call.client.rtp_payload_types().len(),
                10,
                "{peer} {outage} s"
            );
            assert_eq!(
                call.provider.rtp_payload_types().len(),
                10,
                "{peer} {outage} s"
            );
            assert_eq!(call.relay.stopped, None);
        }
    }
}

#[test]
fn consent_checks_keep_a_silent_call_from_the_peer_timeout() {
    let mut call = VirtualCall::connected(with_limits(|l| l.peer_timeout = secs(5)));
    call.run_for(secs(100));
    assert_eq!(call.relay.stopped, None);
    for leg in [Leg::Client, Leg::Upstream] {
        let quiet = call.now - call.relay.last_datagram[&leg];
        assert!(quiet < secs(5), "{leg:?} quiet for {quiet:?}");
    }
}

/// The relay's upstream leg checks consent on its own timer. A relayed RTP packet moves
/// only the session's timers, and str0m (vendor/str0m/README.vendor.md) then reuses the
/// other components' last deadlines: ICE's checks must keep the pace they have in a
/// silent call while audio flows both ways.
#[test]
fn consent_checks_keep_their_pace_while_audio_flows() {
    let gaps = |audio: bool| {
        let mut call = VirtualCall::connected(Options::default());
        let upstream = call.relay.bridge.local_addr(Leg::Upstream);
        if audio {
            for side in [Side::Client, Side::Provider] {
                call.send_audio(side, 3_000);
            }
        }
        let from = call.now;
        call.run_for(secs(60));
        assert_eq!(call.relay.stopped, None);
        let sent: Vec<Instant> = call.net.binding_requests[&upstream]
            .iter()
            .copied()
            .filter(|t| *t >= from)
            .collect();
        let gaps: Vec<Duration> = sent.windows(2).map(|w| w[1] - w[0]).collect();
        (sent.len(), gaps.into_iter().max().unwrap_or(secs(60)))
    };
    let (silent_checks, silent_gap) = gaps(false);
    let (audio_checks, audio_gap) = gaps(true);
    assert!(silent_checks >= 5, "{silent_checks} checks in 60 s");
    assert!(
        audio_checks + 1 >= silent_checks,
        "{audio_checks} checks with audio, {silent_checks} without"
    );
    assert!(
        audio_gap <= silent_gap + Duration::from_millis(50),
        "longest gap {audio_gap:?} with audio, {silent_gap:?} without"
    );
}

#[test]
fn a_call_relaying_nothing_ends_at_the_idle_timeout() {
    let mut call = VirtualCall::connected(with_limits(|l| l.idle_timeout = secs(30)));
    let connected_at = call.relay.bridge.connected_at.unwrap();
    let (at, reason) = call.run_until_stopped(secs(60));
    assert_eq!(
        (at, reason),
        (connected_at + secs(30), EndReason::IdleTimeout)
    );
}

#[test]
fn an_event_restarts_the_idle_clock() {
    let mut call = VirtualCall::connected(with_limits(|l| l.idle_timeout = secs(30)));
    call.run_for(secs(20));
    let sent = call.now;
    call.send_text(Side::Client, "still here");
    let (at, reason) = call.run_until_stopped(secs(60));
    assert_eq!(
        (at, reason),
        (sent + LATENCY + secs(30), EndReason::IdleTimeout)
    );
}

#[test]
fn audio_keeps_a_call_from_idling() {
    let mut call = VirtualCall::connected(with_limits(|l| l.idle_timeout = secs(30)));
    let first_frame = call.now;
    // 50 s of audio from the client only.
    call.send_audio(Side::Client, 2_500);
    call.run_for(secs(50));
    assert_eq!(call.relay.stopped, None);
    let (at, reason) = call.run_until_stopped(secs(60));
    let last_frame = first_frame + FRAME * 2_499;
    assert_eq!(
        (at, reason),
        (last_frame + LATENCY + secs(30), EndReason::IdleTimeout)
    );
}

#[test]
fn max_duration_ends_even_a_busy_call() {
    let mut call = VirtualCall::connected(with_limits(|l| l.max_duration = secs(20)));
    call.send_audio(Side::Client, 2_000);
    call.send_audio(Side::Provider, 2_000);
    let (at, reason) = call.run_until_stopped(secs(60));
    assert_eq!(
        (at - call.start, reason),
        (secs(20), EndReason::MaxDuration)
    );
    call.run_for(secs(1));
    assert!(call.client.saw_end() && call.provider.saw_end());
}

#[test]
fn a_hangup_ends_the_call_as_closed_by_that_side() {
    let rows = [
        (Side::Client, EndReason::ClientClosed, Side::Provider),
        (Side::Provider, EndReason::UpstreamClosed, Side::Client),
    ];
    for (closing, expected, other) in rows {
        let mut call = VirtualCall::connected(Options::default());
        let closed = call.now;
        call.close(closing);
        let (at, reason) = call.run_until_stopped(secs(5));
        assert_eq!((at, reason), (closed + LATENCY, expected), "{closing:?}");
        call.run_for(secs(1));
        assert!(call.peer(other).saw_end(), "{other:?} learns at once");
    }
}

#[test]
fn events_sent_before_the_client_channel_opens_are_buffered_and_flushed_in_order() {
    // The provider's side is up while the client still waits for its answer.
    let mut call = VirtualCall::new(Options::default());
    let limit = call.now + secs(5);
    call.run_while(limit, |c| c.provider.channel.is_none());
    call.send_messages(
        Side::Provider,
        [binary(100, 1), binary(200, 2), binary(300, 3)],
    );
    call.run_for(secs(1));
    let outbox = &call.relay.bridge.client.outbox;
    assert_eq!(
        (outbox.len(), outbox.bytes()),
        (3, 600),
        "held for the client"
    );
    assert!(call.client.messages().is_empty());

    call.answer_client();
    call.run_for(secs(1));
    assert_eq!(
        call.client.messages(),
        vec![vec![1; 100], vec![2; 200], vec![3; 300]]
    );
    assert!(call.relay.bridge.client.outbox.is_empty());
    assert_eq!(call.relay.stopped, None);
}

#[test]
fn events_sent_before_the_provider_channel_opens_are_buffered_and_flushed_in_order() {
    // A slow provider link: the client's channel opens long before the upstream one.
    let mut call = VirtualCall::new(Options::default());
    call.net.set_latency(PROVIDER, ms(200));
    call.answer_client();
    let limit = call.now + secs(5);
    call.run_while(limit, |c| c.client.channel.is_none());
    assert!(call.relay.bridge.upstream.channel.is_none());
    call.send_messages(Side::Client, [binary(10, 1), binary(20, 2)]);
    call.run_for(ms(100));
    assert_eq!(call.relay.bridge.upstream.outbox.len(), 2, "held upstream");

    call.run_for(secs(5));
    assert_eq!(call.provider.messages(), vec![vec![1; 10], vec![2; 20]]);
    assert!(call.relay.bridge.upstream.outbox.is_empty());
}

#[test]
fn buffered_events_beyond_the_byte_cap_end_the_call_with_buffer_overflow() {
    let mut call = VirtualCall::new(with_limits(|l| l.dc_buffer_bytes = 64 * 1024));
    let limit = call.now + secs(5);
    call.run_while(limit, |c| c.provider.channel.is_none());
    // Two fit under 64 KiB; the third does not.
    call.send_messages(Side::Provider, (1..=3).map(|i| binary(30 * 1024, i)));
    let (_, reason) = call.run_until_stopped(secs(5));
    assert_eq!(reason, EndReason::BufferOverflow);
    assert_eq!(call.relay.max_outbox_bytes[&Leg::Client], 60 * 1024);
    assert!(call
        .metrics
        .encode()
        .contains("realtime_relay_dc_buffer_overflows_total 1"));
    call.run_for(secs(1));
    assert!(call.provider.saw_end());
}

#[test]
fn events_for_an_audio_only_client_are_dropped_and_counted_not_queued() {
    let mut options = with_limits(|l| l.dc_buffer_bytes = 64 * 1024);
    options.client_data_channel = false;
    let mut call = VirtualCall::start(options);
    let limit = call.now + secs(5);
    call.run_while(limit, |c| {
        c.provider.channel.is_none() || !c.relay.bridge.is_connected()
    });
    // Far beyond the cap, yet no reason to end the call.
    call.send_messages(Side::Provider, (1..=5).map(|i| binary(30 * 1024, i)));
    call.send_audio(Side::Provider, 10);
    call.run_for(secs(2));
    assert_eq!(call.relay.stopped, None);
    assert_eq!(call.relay.max_outbox_bytes[&Leg::Client], 0);
    assert_eq!(call.counters.upstream_to_client.dropped.load(Relaxed), 5);
    assert_eq!(
        call.client.rtp_payload_types().len(),
        10,
        "audio still flows"
    );
}

#[test]
fn a_burst_beyond_the_send_buffer_waits_in_the_outbox_and_arrives_intact() {
    // The relay's send buffer holds its largest message (--dc-buffer-bytes) but at least
    // 512 KiB: with 256 KiB, a 600 KiB burst cannot all be in flight.
    let mut call = VirtualCall::connected(with_limits(|l| l.dc_buffer_bytes = 256 * 1024));
    // The client's link is slower than the provider's: the client leg's SCTP send
    // buffer (str0m: 128 KiB) fills and the bridge holds the rest.
    call.net.set_latency(CLIENT, ms(100));
    let burst: Vec<Outgoing> = (0..10).map(|i| binary(60 * 1024, i)).collect();
    call.send_messages(Side::Provider, burst.clone());
    let limit = call.now + secs(30);
    call.run_while(limit, |c| c.client.messages().len() < burst.len());
    let held = call.relay.max_outbox_bytes[&Leg::Client];
    assert!(
        held >= 60 * 1024,
        "back-pressure engaged: {held} bytes held"
    );
    assert_eq!(
        call.client.messages(),
        burst.into_iter().map(|m| m.data).collect::<Vec<_>>()
    );
    assert!(call.relay.bridge.client.outbox.is_empty());
    assert_eq!(call.relay.stopped, None);
}

#[test]
fn a_burst_the_slow_side_cannot_take_within_the_cap_ends_the_call_with_buffer_overflow() {
    let mut call = VirtualCall::connected(with_limits(|l| l.dc_buffer_bytes = 64 * 1024));
    call.net.set_latency(PROVIDER, ms(200));
    call.send_messages(Side::Client, (0..40).map(|i| binary(60 * 1024, i)));
    let (_, reason) = call.run_until_stopped(secs(30));
    assert_eq!(reason, EndReason::BufferOverflow);
    assert!(call
        .metrics
        .encode()
        .contains("realtime_relay_dc_buffer_overflows_total 1"));
}

/// The legs kept str0m's 128 KiB SCTP send buffer while advertising 256 KiB messages, so an
/// event between the two blocked its channel for good; the shared `RtcConfig` now takes it.
#[test]
fn an_event_larger_than_str0ms_default_send_buffer_is_forwarded() {
    let mut call = VirtualCall::connected(Options::default());
    call.send_messages(Side::Client, [binary(150 * 1024, 7), binary(10, 8)]);
    call.run_for(secs(5));
    assert_eq!(
        call.provider.messages(),
        vec![vec![7; 150 * 1024], vec![8; 10]]
    );
}

const KIB: usize = 1024;

/// The `error` events the client received, parsed.
fn error_events(call: &VirtualCall) -> Vec<serde_json::Value> {
    call.client
        .messages()
        .iter()
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(m).ok())
        .filter(|e| e["type"] == "error")
        .collect()
}

/// Each peer is told the largest message the other end takes, so a peer that honours
/// `max-message-size` (browsers refuse to `send()` more) never sends what cannot arrive.
#[test]
fn each_peer_is_told_the_message_size_the_other_end_takes() {
    // (client takes, provider takes, relay buffer) -> (client told, provider told)
    let rows = [
        (256 * KIB, 256 * KIB, 1024 * KIB, 256 * KIB, 256 * KIB),
        (256 * KIB, 64 * KIB, 1024 * KIB, 64 * KIB, 256 * KIB),
        (1024 * KIB, 4096 * KIB, 1024 * KIB, 1024 * KIB, 1024 * KIB),
        (4096 * KIB, 4096 * KIB, 512 * KIB, 512 * KIB, 512 * KIB),
    ];
    for (client, provider, buffer, client_told, provider_told) in rows {
        let call = VirtualCall::new(Options {
            client_max_message: client,
            provider_max_message: provider,
            ..with_limits(|l| l.dc_buffer_bytes = buffer)
        });
        assert_eq!(
            (call.client_was_told, call.provider_was_told),
            (Some(client_told), Some(provider_told)),
            "client {client}, provider {provider}, buffer {buffer}"
        );
    }
}

/// 100, 200 and 300 KiB events both ways. What the receiving peer takes arrives whole (str0m's
/// 128 KiB default send buffer used to block anything larger for good); what it does not take
/// (sent by a peer that ignores the advertised size) is not written, and the client gets an
/// OpenAI `error` event instead of a silent drop; later events still flow.
#[test]
fn events_up_to_the_receivers_max_message_size_arrive_and_larger_ones_earn_an_error_event() {
    for from in [Side::Client, Side::Provider] {
        for size in [100 * KIB, 200 * KIB, 300 * KIB] {
            for receiver_takes in [64 * KIB, 256 * KIB, 1024 * KIB] {
                let (to, mut options) = (
                    match from {
                        Side::Client => Side::Provider,
                        Side::Provider => Side::Client,
                    },
                    Options {
                        ignores_max_message: Some(from),
                        ..Options::default()
                    },
                );
                match to {
                    Side::Client => options.client_max_message = receiver_takes,
                    Side::Provider => options.provider_max_message = receiver_takes,
                }
                let row = format!("{from:?} sends {size} B to a peer taking {receiver_takes} B");
                let mut call = VirtualCall::connected(options);
                let id = format!(
                    r#"{{"type":"conversation.item.create","event_id":"evt_{size}","pad":""#
                );
                let mut big = id.into_bytes();
                big.resize(size - 2, b'x');
                big.extend_from_slice(b"\"}");
                call.send_messages(
                    from,
                    [Outgoing {
                        binary: false,
                        data: big.clone(),
                    }],
                );
                call.send_text(from, "next");
                call.run_for(secs(5));
                assert_eq!(call.relay.stopped, None, "{row}");
                // What the receiver got, besides the relay's own error events.
                let received: Vec<Vec<u8>> = call
                    .peer(to)
                    .messages()
                    .into_iter()
                    .filter(|m| {
                        !m.starts_with(br#"{"error""#) && !m.starts_with(br#"{"type":"error""#)
                    })
                    .collect();
                let errors = error_events(&call);
                if size <= receiver_takes {
                    assert_eq!(received, vec![big, b"next".to_vec()], "{row}");
                    assert!(errors.is_empty(), "{row}: {errors:?}");
                } else {
                    assert_eq!(received, vec![b"next".to_vec()], "{row}");
                    assert_eq!(errors.len(), 1, "{row}");
                    let error = &errors[0]["error"];
                    assert_eq!(error["type"], "invalid_request_error", "{row}");
                    assert_eq!(error["code"], "event_too_large", "{row}");
                    let cause = if from == Side::Client {
                        serde_json::json!(format!("evt_{size}"))
                    } else {
                        serde_json::Value::Null
                    };
                    assert_eq!(error["event_id"], cause, "{row}");
                    assert!(
                        call.metrics
                            .encode()
                            .contains("realtime_relay_dc_messages_too_large_total 1"),
                        "{row}"
                    );
                }
            }
        }
    }
}

#[test]
fn events_for_a_client_whose_data_channel_was_rejected_are_dropped_not_queued() {
    // The offer has an m=application section, with port 0: no channel will ever open.
    let mut options = with_limits(|l| l.dc_buffer_bytes = 64 * 1024);
    options.client_rejects_data_channel = true;
    let mut call = VirtualCall::start(options);
    let limit = call.now + secs(5);
    call.run_while(limit, |c| {
        c.provider.channel.is_none() || !c.relay.bridge.is_connected()
    });
    assert!(!call.relay.bridge.client.data_channel.negotiated);
    call.send_messages(Side::Provider, (1..=5).map(|i| binary(30 * 1024, i)));
    call.run_for(secs(2));
    assert_eq!(call.relay.stopped, None);
    assert_eq!(call.relay.max_outbox_bytes[&Leg::Client], 0);
    assert_eq!(call.counters.upstream_to_client.dropped.load(Relaxed), 5);
}

/// The provider's last events (a final `response.done`) before it hangs up reach the client:
/// the relay delivers what is queued before it closes the client leg.
#[test]
fn events_queued_when_the_provider_hangs_up_are_delivered_before_the_client_leg_closes() {
    let mut call = VirtualCall::connected(with_limits(|l| l.dc_buffer_bytes = 256 * 1024));
    // A slow client link: most of the burst is still queued at the relay when the provider,
    // having sent it all, leaves.
    call.net.set_latency(CLIENT, ms(100));
    let burst: Vec<Outgoing> = (0..10).map(|i| binary(60 * 1024, i)).collect();
    call.send_messages(Side::Provider, burst.clone());
    let limit = call.now + secs(10);
    call.run_while(limit, |c| {
        c.counters.upstream_to_client.dc_messages.load(Relaxed) < 10
    });
    assert!(
        call.client.messages().len() < burst.len(),
        "still on its way"
    );
    call.close(Side::Provider);
    let (_, reason) = call.run_until_stopped(secs(5));
    assert_eq!(reason, EndReason::UpstreamClosed);
    call.run_for(secs(1));
    assert_eq!(
        call.client.messages(),
        burst.into_iter().map(|m| m.data).collect::<Vec<_>>()
    );
    assert!(call.client.saw_end());
}

/// Delivery on the way out is bounded: a client that no longer acknowledges anything holds
/// the close back by at most the grace period.
#[test]
fn delivery_on_the_way_out_waits_at_most_the_grace_period() {
    let mut call = VirtualCall::connected(Options::default());
    call.net.take_down(CLIENT);
    call.send_messages(Side::Provider, (0..4).map(|i| binary(60 * 1024, i)));
    call.run_for(ms(100));
    let ended = call.now;
    call.relay.bridge.end(EndReason::Hangup);
    let (_, reason) = call.run_until_stopped(secs(10));
    assert_eq!(reason, EndReason::Hangup);
    let at = call.relay.finished_at.unwrap();
    assert!(
        at - ended <= super::CLOSE_GRACE + ms(25),
        "{:?}",
        at - ended
    );
    assert!(
        at - ended >= super::CLOSE_GRACE - ms(25),
        "{:?}",
        at - ended
    );
}

/// A GPT-Live provider ends a session by sending `session.closed` (its reason and final
/// usage) and closing: the client gets the event before its leg closes, and the call ends as
/// `session_closed`, the session's announced end, not as a worker that died. The same close
/// without the event, or on a Realtime call, stays `upstream_closed`.
#[test]
fn a_live_provider_that_announces_its_close_ends_the_session_not_as_a_failure() {
    use realtime_relay_proto::call_id::Kind;
    let closed = r#"{"type":"session.closed","event_id":"event_1","reason":"close_requested","usage":{"seconds":2.5}}"#;
    let usage = r#"{"type":"session.usage.updated","event_id":"event_0","usage":{"seconds":2.0}}"#;
    let rows = [
        (Kind::Live, Some(closed), EndReason::SessionClosed),
        (Kind::Live, Some(usage), EndReason::UpstreamClosed),
        (Kind::Live, None, EndReason::UpstreamClosed),
        (Kind::Realtime, Some(closed), EndReason::UpstreamClosed),
    ];
    for (api, last, expected) in rows {
        let mut call = VirtualCall::connected(Options {
            api,
            ..Options::default()
        });
        if let Some(text) = last {
            call.send_text(Side::Provider, text);
            let limit = call.now + secs(1);
            call.run_while(limit, |c| {
                c.counters.upstream_to_client.dc_messages.load(Relaxed) < 1
            });
        }
        call.close(Side::Provider);
        let (_, reason) = call.run_until_stopped(secs(5));
        assert_eq!(reason, expected, "{api:?} {last:?}");
        assert!(!reason.is_worker_failure() || expected == EndReason::UpstreamClosed);
        call.run_for(secs(1));
        if let Some(text) = last {
            assert_eq!(
                call.client.messages(),
                vec![text.as_bytes().to_vec()],
                "{api:?}: delivered before the close"
            );
        }
        assert!(call.client.saw_end());
    }
}

/// A call that reaches its budget, in virtual time: the provider's response that crosses it
/// reaches the client, then the client gets the `budget_exceeded` error event and the provider
/// a `response.cancel`; the client's later events are not forwarded; the call ends as
/// `budget_exceeded` when the grace is over, not before, and not as a worker failure.
#[test]
fn a_call_over_its_budget_is_stopped_told_and_ended_after_the_grace() {
    let done = |total: u64| {
        format!(
            r#"{{"type":"response.done","response":{{"status":"completed","usage":{{"total_tokens":{total},"input_tokens":{total},"output_tokens":0}}}}}}"#
        )
    };
    let mut call = VirtualCall::connected(Options {
        budget: Some(crate::usage::Budget {
            max_tokens: Some(300),
            max_audio_seconds: None,
        }),
        ..Options::default()
    });
    // Within the budget: nothing happens.
    call.send_text(Side::Provider, &done(200));
    let limit = call.now + secs(1);
    call.run_while(limit, |c| c.client.messages().is_empty());
    call.run_for(secs(3));
    assert!(call.relay.stopped.is_none(), "within the budget");
    assert_eq!(call.provider.messages(), Vec::<Vec<u8>>::new());

    // The next response crosses it.
    let crossed = call.now;
    call.send_text(Side::Provider, &done(150));
    let limit = call.now + secs(1);
    call.run_while(limit, |c| c.client.messages().len() < 3);
    let texts: Vec<String> = call
        .client
        .messages()
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert_eq!(texts.len(), 3, "{texts:?}");
    assert!(
        texts[1].contains("response.done"),
        "the crossing response first: {texts:?}"
    );
    let error: serde_json::Value = serde_json::from_str(&texts[2]).unwrap();
    assert_eq!(error["error"]["code"], "budget_exceeded", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("350 tokens"),
        "{error}"
    );
    let limit = call.now + secs(1);
    call.run_while(limit, |c| c.provider.messages().is_empty());
    let stop: serde_json::Value = serde_json::from_slice(&call.provider.messages()[0]).unwrap();
    assert_eq!(stop["type"], "response.cancel");

    // The client's next event goes nowhere.
    call.send_text(Side::Client, r#"{"type":"response.create"}"#);
    let (at, reason) = call.run_until_stopped(secs(10));
    assert_eq!(reason, EndReason::BudgetExceeded);
    assert!(!reason.is_worker_failure());
    assert_eq!(
        call.provider.messages().len(),
        1,
        "only the relay's stop reached the provider"
    );
    let took = at - crossed;
    assert!(
        took >= super::BUDGET_GRACE && took < super::BUDGET_GRACE + secs(3),
        "ended {took:?} after the budget was crossed"
    );
}

/// RTP packets both test peers have received so far.
fn rtp_received(call: &mut VirtualCall) -> usize {
    call.peer(Side::Client).rtp_payload_types().len()
        + call.peer(Side::Provider).rtp_payload_types().len()
}

/// The relay's cost per relayed RTP packet with no I/O at all (the bridge and its two str0m
/// legs, driven as a media shard drives them), next to str0m's own cost for the same work in
/// the test peers (one packet written and one received per relayed packet). A measurement,
/// not a check: `cargo xtask bench` runs it in release (and under callgrind for the
/// instruction counts); it prints one `RTGW_VIRTUAL_COST {json}` line.
/// `RTGW_VIRTUAL_FRAMES` sets the frames each side sends (default 3,000: one minute).
#[test]
#[ignore = "a measurement: cargo xtask bench runs it in release"]
fn relay_cost_per_relayed_packet_without_io() {
    let frames: u32 = env_or("RTGW_VIRTUAL_FRAMES", 3_000);
    let mut call = VirtualCall::connected(Options::default());
    // Warm up both legs (SRTP contexts, stream tables) before counting.
    call.send_audio(Side::Client, 50);
    call.send_audio(Side::Provider, 50);
    call.run_for(secs(2));
    let (cost0, rtp0) = (call.cost, rtp_received(&mut call));
    call.send_audio(Side::Client, frames);
    call.send_audio(Side::Provider, frames);
    call.run_for(FRAME * frames + secs(1));
    let relayed = (rtp_received(&mut call) - rtp0) as f64;
    assert!(
        relayed >= f64::from(frames) * 2.0 * 0.99,
        "relayed {relayed}"
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6 / relayed;
    let relay = us(call.cost.relay - cost0.relay);
    let peers = us(call.cost.peers - cost0.peers);
    println!(
        "RTGW_VIRTUAL_COST {}",
        serde_json::json!({
            "relayed_packets": relayed,
            "relay_us_per_packet": relay,
            "str0m_peers_us_per_packet": peers,
            "relay_to_str0m": relay / peers,
        })
    );
}

/// The relay's CPU for one call set up end to end with no I/O: both legs built, both SDPs
/// parsed and written, the bridge made, then ICE, both DTLS handshakes and both SCTP
/// associations until the `oai-events` channel is open on every side. What a real setup
/// adds to it is the gRPC request, the HTTP exchange with the provider and the sockets.
/// A measurement, not a check: `cargo xtask bench` runs it in release (and under callgrind
/// for the instruction counts); it prints one `RTGW_VIRTUAL_SETUP {json}` line with medians.
/// `RTGW_VIRTUAL_SETUPS` sets the number of calls (default 50).
#[test]
#[ignore = "a measurement: cargo xtask bench runs it in release"]
fn relay_cost_per_call_setup_without_io() {
    let setups: usize = env_or("RTGW_VIRTUAL_SETUPS", 50);
    let (mut negotiation, mut handshakes, mut peers) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..setups {
        let call = VirtualCall::connected(Options::default());
        negotiation.push(call.cost.relay_setup.as_secs_f64() * 1e6);
        handshakes.push(call.cost.relay.as_secs_f64() * 1e6);
        peers.push(call.cost.peers.as_secs_f64() * 1e6);
    }
    let total: Vec<f64> = negotiation
        .iter()
        .zip(&handshakes)
        .map(|(n, h)| n + h)
        .collect();
    println!(
        "RTGW_VIRTUAL_SETUP {}",
        serde_json::json!({
            "setups": setups,
            "relay_us_per_setup": median(total),
            "negotiation_us": median(negotiation),
            "handshakes_us": median(handshakes),
            "str0m_peers_us_per_setup": median(peers),
        })
    );
}

/// The measurement setting `name` from the environment, or `default` when unset or unreadable.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The same cost with many calls taking turns, as on a media shard: each call relays one
/// frame each way, then the next call does, so every packet finds the state of the other
/// calls between it and its own last packet in the CPU's caches. `RTGW_VIRTUAL_CALLS` lists
/// the call counts (default `1,10,100,300`), `RTGW_VIRTUAL_FRAMES` the frames per call
/// (default 250: five seconds). Prints one `RTGW_VIRTUAL_CALLS {json}` line per count.
/// A measurement: it tells whether the running relay's cost per packet beyond the one-call
/// figure is the work or the working set.
#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn relay_cost_per_relayed_packet_with_calls_taking_turns() {
    let counts: Vec<usize> = std::env::var("RTGW_VIRTUAL_CALLS")
        .unwrap_or_else(|_| "1,10,100,300".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let frames: u32 = env_or("RTGW_VIRTUAL_FRAMES", 250);
    for n in counts {
        let mut calls: Vec<VirtualCall> = (0..n)
            .map(|_| {
                let mut call = VirtualCall::connected(Options::default());
                call.send_audio(Side::Client, 50);
                call.send_audio(Side::Provider, 50);
                call.run_for(secs(2));
                call
            })
            .collect();
        let start: Vec<(Cost, usize)> = calls
            .iter_mut()
            .map(|c| (c.cost, rtp_received(c)))
            .collect();
        for call in &mut calls {
            call.send_audio(Side::Client, frames);
            call.send_audio(Side::Provider, frames);
        }
        for _ in 0..frames + 50 {
            for call in &mut calls {
                call.run_for(FRAME);
            }
        }
        let (mut relayed, mut relay, mut peers) = (0usize, Duration::ZERO, Duration::ZERO);
        for (call, (cost0, rtp0)) in calls.iter_mut().zip(start) {
            relayed += rtp_received(call) - rtp0;
            relay += call.cost.relay - cost0.relay;
            peers += call.cost.peers - cost0.peers;
        }
        assert!(relayed as f64 >= n as f64 * f64::from(frames) * 2.0 * 0.99);
        let us = |d: Duration| d.as_secs_f64() * 1e6 / relayed as f64;
        println!(
            "RTGW_VIRTUAL_CALLS {}",
            serde_json::json!({
                "calls": n,
                "relayed_packets": relayed,
                "relay_us_per_packet": us(relay),
                "str0m_peers_us_per_packet": us(peers),
            })
        );
    }
}
