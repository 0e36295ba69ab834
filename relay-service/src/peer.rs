//! Building the two legs of a call with str0m.
//!
//! Client leg: ICE-lite answerer (the relay has a public, stable address; the client
//! does the connectivity checks), one host candidate on the shared media port, ICE
//! credentials we choose so the shared port can find the call by ufrag.
//! Upstream leg: full-ICE offerer with an Opus SendRecv audio transceiver and the
//! `oai-events` data channel, on its own UDP socket (a provider may use one address
//! for many calls, so upstream legs must not share a port).
//! Both legs run in RTP mode: packets are forwarded without depacketizing.

use crate::error::SetupError;
use rtc_peer::EVENTS_CHANNEL;
use std::net::SocketAddr;
use std::time::Instant;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::TcpType;
use str0m::rtp::{Extension, ExtensionMap};
use str0m::{Candidate, IceCreds, Rtc, RtcConfig};

/// A parser or negotiation error as one short line a client may see. str0m's parse
/// errors carry the parser's debug state, including memory addresses
/// (`PointerOffset(0x7f…)`): those lines are dropped, the readable ones kept.
pub fn describe(e: &impl std::fmt::Display) -> String {
    const MAX: usize = 200;
    let text = e.to_string();
    let kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("0x") && !l.contains("PointerOffset"))
        .collect();
    let mut line = if kept.is_empty() {
        "malformed SDP".to_string()
    } else {
        kept.join("; ")
    };
    line.retain(|c| !c.is_control());
    if line.len() > MAX {
        let mut end = MAX;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

/// Every leg shares the process's DTLS certificate (`rtc_peer::crypto`: two fewer
/// certificate generations per call). If generation fails, legs fall back to str0m's
/// per-`Rtc` default.
///
/// `max_message` is the largest data-channel message the leg takes from its peer (str0m
/// reassembles up to it). The send buffer holds at least that much, so any message the other
/// leg takes can be written once the buffer is empty: `Channel::write` never accepts a message
/// larger than the buffer, and one that never fits would block its channel for good.
fn base_config(max_message: usize) -> RtcConfig {
    let max_message = max_message.clamp(MIN_MAX_MESSAGE, u32::MAX as usize);
    rtc_peer::crypto::rtc_config()
        .unwrap_or_default()
        .set_sctp_max_message_size(max_message as u32)
        .set_sctp_max_buffered_amount(max_message.max(rtc_peer::crypto::SCTP_MAX_BUFFERED))
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .set_extension_map(extensions_without_transport_cc())
        // Stats events are not used; don't pay for them.
        .set_stats_interval(None)
}

/// str0m's standard header extensions (Chrome's ids) without transport-wide congestion control.
///
/// The relay estimates no bandwidth: each leg carries one Opus stream at the rate its sender
/// chose, adapted from RTCP receiver reports as any audio-only WebRTC peer does. Negotiating
/// transport-cc made str0m keep a record of each of the last 1,000 packets sent on each leg
/// for the feedback nobody reads: 176 KiB of a call's heap (massif, 10 calls through the
/// relay), plus a feedback report to build and parse every ~100 ms. Without the `extmap`
/// neither side stamps packets with a transport sequence number, so neither sends feedback.
fn extensions_without_transport_cc() -> ExtensionMap {
    let mut map = ExtensionMap::empty();
    for (id, ext) in ExtensionMap::standard().iter() {
        if *ext != Extension::TransportSequenceNumber {
            map.set(id, ext.clone());
        }
    }
    map
}

/// RFC 8841 §6.1: a peer whose SDP has no `a=max-message-size` takes messages up to 64 KiB.
pub const DEFAULT_PEER_MAX_MESSAGE: usize = 64 * 1024;

/// The smallest limit a leg is built with (one RFC 8841 default message).
const MIN_MAX_MESSAGE: usize = DEFAULT_PEER_MAX_MESSAGE;

/// The data channel of one leg as its offer/answer settled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataChannelTerms {
    /// Both sides kept an `m=application` section (port not 0): the `oai-events` channel
    /// can open on this leg.
    pub negotiated: bool,
    /// The largest message the leg's peer takes (its `a=max-message-size`); `None` when it
    /// sets no limit (`0`).
    pub peer_max_message: Option<usize>,
}

impl DataChannelTerms {
    /// Whether a message of `len` bytes may be written to this leg's peer.
    pub fn takes(&self, len: usize) -> bool {
        self.peer_max_message.is_none_or(|max| len <= max)
    }

    /// The largest message the relay tells the other leg's peer it takes: what the relay
    /// itself takes (`ours`), or less if this leg's peer takes less.
    pub fn relayable(&self, ours: usize) -> usize {
        self.peer_max_message.map_or(ours, |m| m.min(ours))
    }
}

/// The first `m=application` section of `sdp`: its port and its `a=max-message-size`.
fn application_section(sdp: &str) -> Option<(&str, Option<&str>)> {
    let mut port = None;
    let mut max = None;
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            if port.is_some() {
                break;
            }
            if let Some(rest) = m.strip_prefix("application ") {
                port = Some(rest.split(' ').next().unwrap_or(""));
            }
        } else if port.is_some() {
            if let Some(v) = line.strip_prefix("a=max-message-size:") {
                max = Some(v.trim());
            }
        }
    }
    port.map(|p| (p, max))
}

/// What the exchange of `peer_sdp` (the leg's peer) and `our_sdp` settled about the data
/// channel. A section offered and rejected (port 0) on either side is no data channel: events
/// for such a leg would only queue until the byte cap ends the call.
pub fn data_channel_terms(peer_sdp: &str, our_sdp: &str) -> DataChannelTerms {
    let open = |sdp| application_section(sdp).is_some_and(|(port, _)| port != "0");
    let peer_max_message = match application_section(peer_sdp).and_then(|(_, max)| max) {
        None => Some(DEFAULT_PEER_MAX_MESSAGE),
        Some(v) => match v.parse::<u64>() {
            Ok(0) => None,
            Ok(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            // Unreadable: the RFC's default, the smallest sensible assumption.
            Err(_) => Some(DEFAULT_PEER_MAX_MESSAGE),
        },
    };
    DataChannelTerms {
        negotiated: open(peer_sdp) && open(our_sdp),
        peer_max_message,
    }
}

/// `sdp` advertising `max` as its `a=max-message-size`: what the relay tells one peer is the
/// smaller of what it takes itself and what the other leg's peer takes, so a peer that honours
/// it (browsers refuse to `send()` more) never sends what cannot be delivered. The line is
/// replaced in the first `m=application` section, or added to it; an SDP without one is
/// returned as is.
pub fn with_max_message_size(sdp: &str, max: usize) -> String {
    let line = format!("a=max-message-size:{max}");
    let mut out = String::with_capacity(sdp.len() + line.len() + 2);
    let mut in_app = false;
    let mut written = false;
    let mut rest = sdp;
    while !rest.is_empty() {
        let end = rest.find('\n').map_or(rest.len(), |i| i + 1);
        let (raw, next) = rest.split_at(end);
        rest = next;
        let text = raw.trim_end_matches(['\r', '\n']);
        let eol = &raw[text.len()..];
        let eol = if eol.is_empty() { "\r\n" } else { eol };
        if text.starts_with("m=") {
            if in_app && !written {
                out.push_str(&line);
                out.push_str(eol);
                written = true;
            }
            in_app = !written && text.starts_with("m=application ");
        } else if in_app && text.starts_with("a=max-message-size:") {
            out.push_str(&line);
            out.push_str(eol);
            written = true;
            continue;
        }
        out.push_str(raw);
    }
    if in_app && !written {
        if !out.ends_with('\n') {
            out.push_str("\r\n");
        }
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out
}

/// Cheap structural checks before any str0m work: the offer is text starting with
/// `v=0` and has an audio or application m-line.
pub fn precheck_offer(sdp: &str, max_bytes: usize) -> Result<(), SetupError> {
    if sdp.trim().is_empty() {
        return Err(SetupError::MissingSdp);
    }
    if sdp.len() > max_bytes {
        return Err(SetupError::InvalidSdp(format!(
            "the offer is larger than {max_bytes} bytes"
        )));
    }
    if !sdp.starts_with("v=0") {
        return Err(SetupError::InvalidSdp(
            "the offer must start with v=0".into(),
        ));
    }
    if sdp
        .bytes()
        .any(|b| b == 0 || (b < 0x20 && b != b'\r' && b != b'\n' && b != b'\t'))
    {
        return Err(SetupError::InvalidSdp(
            "the offer contains control characters".into(),
        ));
    }
    let has_media = sdp
        .lines()
        .any(|l| l.starts_with("m=audio ") || l.starts_with("m=application "));
    if !has_media {
        return Err(SetupError::InvalidSdp(
            "the offer has no audio or application media".into(),
        ));
    }
    Ok(())
}

pub struct ClientLeg {
    pub rtc: Rtc,
    /// The answer to the client's offer, as sent (written once: str0m's SDP writer is not
    /// free).
    pub answer_sdp: String,
    pub audio_mid: Option<Mid>,
}

/// Parses and accepts the client's offer. Runs before any upstream request: a bad
/// offer must never open an upstream call.
///
/// The answer carries a UDP host candidate at `advertised` and, when the relay listens for
/// ICE-TCP, a passive TCP host candidate at `advertised_tcp` (`tcptype passive`, RFC 6544):
/// the client connects to it, so it works through firewalls that block UDP.
pub fn accept_client_offer(
    sdp: &str,
    advertised: SocketAddr,
    advertised_tcp: Option<SocketAddr>,
    creds: IceCreds,
    max_message: usize,
    now: Instant,
) -> Result<ClientLeg, SetupError> {
    let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| {
        SetupError::InvalidSdp(format!("the offer does not parse: {}", describe(&e)))
    })?;
    let audio_mid = first_audio_mid(sdp);
    let mut rtc = base_config(max_message)
        .set_ice_lite(true)
        .set_local_ice_credentials(creds)
        .build(now);
    let candidate = Candidate::host(advertised, "udp")
        .map_err(|e| SetupError::Internal(format!("bad advertised media address: {e}")))?;
    rtc.add_local_candidate(candidate);
    if let Some(addr) = advertised_tcp {
        let candidate = Candidate::builder()
            .tcp()
            .host(addr)
            .tcptype(TcpType::Passive)
            .build()
            .map_err(|e| SetupError::Internal(format!("bad advertised TCP media address: {e}")))?;
        rtc.add_local_candidate(candidate);
    }
    let answer = rtc.sdp_api().accept_offer(offer).map_err(|e| {
        SetupError::InvalidSdp(format!("the offer cannot be accepted: {}", describe(&e)))
    })?;
    let answer_sdp = answer.to_sdp_string();
    if !answer_sdp.contains("a=fingerprint") {
        return Err(SetupError::InvalidSdp(
            "the offer negotiated no DTLS".into(),
        ));
    }
    Ok(ClientLeg {
        rtc,
        answer_sdp,
        audio_mid,
    })
}

/// The mid of the offer's first audio m-line (from its `a=mid:` line).
fn first_audio_mid(sdp: &str) -> Option<Mid> {
    let mut in_audio = false;
    for line in sdp.lines() {
        if line.starts_with("m=") {
            in_audio = line.starts_with("m=audio ");
        } else if in_audio {
            if let Some(mid) = line.strip_prefix("a=mid:") {
                return Some(Mid::from(mid.trim()));
            }
        }
    }
    None
}

pub struct UpstreamLeg {
    pub rtc: Rtc,
    pub offer: SdpOffer,
    pub pending: SdpPendingOffer,
    pub audio_mid: Mid,
    pub channel: ChannelId,
}

pub fn create_upstream_offer(
    local: SocketAddr,
    reflexive: Option<SocketAddr>,
    max_message: usize,
    now: Instant,
) -> Result<UpstreamLeg, SetupError> {
    let mut rtc = base_config(max_message).build(now);
    let candidate = Candidate::host(local, "udp")
        .map_err(|e| SetupError::Internal(format!("bad upstream media address: {e}")))?;
    rtc.add_local_candidate(candidate);
    if let Some(mapped) = reflexive.filter(|m| *m != local) {
        match Candidate::server_reflexive(mapped, local, "udp") {
            Ok(c) => {
                rtc.add_local_candidate(c);
            }
            Err(e) => tracing::warn!(error = %e, "unusable server-reflexive address"),
        }
    }
    let mut api = rtc.sdp_api();
    let audio_mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let channel = api.add_channel(EVENTS_CHANNEL.to_string());
    let (offer, pending) = api
        .apply()
        .ok_or_else(|| SetupError::Internal("the upstream offer has no changes".into()))?;
    Ok(UpstreamLeg {
        rtc,
        offer,
        pending,
        audio_mid,
        channel,
    })
}

pub fn accept_upstream_answer(
    rtc: &mut Rtc,
    pending: SdpPendingOffer,
    answer_sdp: &str,
) -> Result<(), SetupError> {
    let answer = SdpAnswer::from_sdp_string(answer_sdp).map_err(|e| {
        SetupError::UpstreamInvalidAnswer(format!(
            "the upstream answer does not parse: {}",
            describe(&e)
        ))
    })?;
    rtc.sdp_api().accept_answer(pending, answer).map_err(|e| {
        SetupError::UpstreamInvalidAnswer(format!(
            "the upstream answer cannot be accepted: {}",
            describe(&e)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_MESSAGE: usize = 1024 * 1024;

    /// The client leg for `offer`, advertising `addr`, with fixed credentials.
    fn accept_test_offer(offer: &str, addr: &str) -> Result<ClientLeg, SetupError> {
        let creds = IceCreds {
            ufrag: "abcd".into(),
            pass: "p".repeat(24),
        };
        accept_client_offer(
            offer,
            addr.parse().unwrap(),
            None,
            creds,
            MAX_MESSAGE,
            Instant::now(),
        )
    }

    #[test]
    fn precheck_table() {
        let ok =
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n";
        let rows: &[(&str, Option<&str>)] = &[
            (ok, None),
            ("", Some("missing_sdp")),
            ("   \r\n", Some("missing_sdp")),
            ("v=1\r\nm=audio 9 x 1\r\n", Some("invalid_sdp")),
            ("hello", Some("invalid_sdp")),
            (
                "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
                Some("invalid_sdp"),
            ),
            ("v=0\r\nm=audio 9 x 1\r\n\u{1}", Some("invalid_sdp")),
            (
                "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n",
                None,
            ),
        ];
        for (sdp, code) in rows {
            let got = precheck_offer(sdp, 64 * 1024).err().map(|e| e.code());
            assert_eq!(got, *code, "{sdp:?}");
        }
        assert_eq!(
            precheck_offer(ok, 10).unwrap_err().code(),
            "invalid_sdp",
            "size limit"
        );
    }

    #[test]
    fn sdp_errors_reach_clients_as_one_line_without_addresses() {
        let raw = "SDP parse: Parse error at PointerOffset(0x7f9dcc002b1f)\nMedia is missing a=mid: audio UDP/TLS/RTP/SAVPF\n";
        assert_eq!(
            describe(&raw),
            "Media is missing a=mid: audio UDP/TLS/RTP/SAVPF"
        );
        assert_eq!(describe(&"\n0x1\n"), "malformed SDP");
        assert!(describe(&"x".repeat(500)).len() <= 200);
        // A real str0m parse error of a truncated offer.
        let offer =
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n";
        let err = accept_test_offer(offer, "127.0.0.1:4000").err().unwrap();
        let message = err.to_string();
        assert!(message.starts_with("invalid_sdp: "), "{message}");
        assert!(
            !message.contains("0x") && !message.contains('\n'),
            "{message}"
        );
    }

    #[test]
    fn the_answer_offers_a_passive_tcp_candidate_beside_the_udp_one() {
        let (client, offer) = echo_model::TestClient::new(Default::default()).unwrap();
        drop(client);
        let creds = || IceCreds {
            ufrag: "abcd".into(),
            pass: "p".repeat(24),
        };
        let udp = "203.0.113.7:40000".parse().unwrap();
        let leg = accept_client_offer(
            &offer,
            udp,
            Some("203.0.113.7:443".parse().unwrap()),
            creds(),
            MAX_MESSAGE,
            Instant::now(),
        )
        .unwrap();
        let sdp = leg.answer_sdp.clone();
        assert!(sdp.contains(" udp "), "{sdp}");
        assert!(sdp.contains("203.0.113.7 40000 typ host"), "{sdp}");
        assert!(
            sdp.contains(" tcp ") && sdp.contains("203.0.113.7 443 typ host tcptype passive"),
            "{sdp}"
        );
        let leg =
            accept_client_offer(&offer, udp, None, creds(), MAX_MESSAGE, Instant::now()).unwrap();
        let sdp = leg.answer_sdp.clone();
        assert!(
            !sdp.contains("tcptype"),
            "no TCP candidate unless configured: {sdp}"
        );
    }

    /// Chromium offers transport-wide congestion control on its audio; neither the relay's
    /// answer nor its own offer upstream takes it (see [`extensions_without_transport_cc`]),
    /// and the extensions the relay forwards (audio level) stay negotiated.
    #[test]
    fn neither_leg_negotiates_transport_cc_and_audio_level_stays() {
        let offer = include_str!("../../testdata/offers/chromium-156.sdp");
        assert!(offer.contains("transport-wide-cc"), "the fixture offers it");
        let client = accept_test_offer(offer, "203.0.113.7:40000").unwrap();
        let answer = client.answer_sdp.clone();
        assert!(!answer.contains("transport-wide-cc"), "{answer}");
        assert!(
            answer.contains("urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
            "{answer}"
        );
        let upstream = create_upstream_offer(
            "198.51.100.2:50000".parse().unwrap(),
            None,
            MAX_MESSAGE,
            Instant::now(),
        )
        .unwrap();
        let offer = upstream.offer.to_sdp_string();
        assert!(!offer.contains("transport-wide-cc"), "{offer}");
        assert!(
            offer.contains("urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
            "{offer}"
        );
    }

    /// Every RTP packet a leg sends walks its whole extension map, so the vendored str0m
    /// keeps `Extension` at 16 bytes (vendor/str0m/README.vendor.md): the map of a leg is
    /// 6 cache lines, not 12. A str0m update that loses the patch fails here.
    #[test]
    fn a_legs_extension_map_stays_within_six_cache_lines() {
        assert_eq!(std::mem::size_of::<Extension>(), 16);
        assert!(std::mem::size_of::<ExtensionMap>() <= 6 * 64);
        let map = extensions_without_transport_cc();
        assert_eq!(map.id_of(Extension::AudioLevel), Some(1));
        assert_eq!(map.id_of(Extension::TransportSequenceNumber), None);
    }

    /// The vendored str0m keeps an SDES chunk's items in a `Vec` (vendor/str0m/README.vendor.md):
    /// a parsed SDES packet was 31,000 bytes built on the stack and boxed, and every RTCP
    /// report str0m handles internally 1 KiB. A str0m update that loses the patch fails here.
    #[test]
    fn a_parsed_source_description_stays_small() {
        use str0m::rtp::rtcp::{ReportList, Sdes};
        assert!(std::mem::size_of::<Sdes>() <= 32);
        assert!(std::mem::size_of::<ReportList<Sdes>>() <= 1024);
    }

    /// The vendored str0m trims an ASCII `Mid` byte by byte instead of with `str::trim`
    /// (vendor/str0m/README.vendor.md): the result must be `str::trim`'s for every id, with
    /// white space of every ASCII kind on either side, none at all, or nothing else.
    #[test]
    fn a_mid_reads_as_str_trim_would_read_it() {
        let ids: [&[u8; 16]; 7] = [
            b"0               ",
            b"audio           ",
            b"  x y           ",
            b"\t\n\x0b\x0c\rmid\r\x0c\x0b\n\t   ",
            b"0123456789abcdef",
            b"                ",
            b"a\x0b             b",
        ];
        for id in ids {
            let mid = Mid::from_array(*id);
            let expected = std::str::from_utf8(id).unwrap().trim();
            assert_eq!(&*mid, expected, "{id:?}");
        }
        // Not ASCII: the old path, the same answer.
        let mut bytes = [b' '; 16];
        bytes[..3].copy_from_slice("\u{00e9}a".as_bytes());
        assert_eq!(&*Mid::from_array(bytes), "\u{00e9}a");
        // What a leg's own media ids deref to.
        assert_eq!(&*Mid::from("0"), "0");
    }

    /// Offers captured from other WebRTC stacks (testdata/offers): Chromium's (mDNS host
    /// candidate, RED and telephone-event beside Opus, trickle) and aiortc's (no BUNDLE-only
    /// transport: a port per m-line, three fingerprints). The relay must answer both with
    /// Opus and the data channel.
    #[test]
    fn offers_from_chromium_and_aiortc_are_answered_with_opus_and_the_data_channel() {
        for (stack, offer) in [
            (
                "chromium 156",
                include_str!("../../testdata/offers/chromium-156.sdp"),
            ),
            (
                "aiortc 1.16.0",
                include_str!("../../testdata/offers/aiortc-1.16.0.sdp"),
            ),
        ] {
            precheck_offer(offer, 64 * 1024).unwrap_or_else(|e| panic!("{stack}: {e:?}"));
            let leg = accept_test_offer(offer, "203.0.113.7:40000")
                .unwrap_or_else(|e| panic!("{stack}: {e:?}"));
            assert_eq!(leg.audio_mid, Some(Mid::from("0")), "{stack}");
            let answer = leg.answer_sdp.clone();
            assert!(answer.contains("opus/48000/2"), "{stack}: {answer}");
            assert!(answer.contains("webrtc-datachannel"), "{stack}: {answer}");
            assert!(
                answer.contains("203.0.113.7 40000 typ host"),
                "{stack}: {answer}"
            );
        }
    }

    #[test]
    fn audio_mid_comes_from_the_audio_section() {
        let sdp = "v=0\r\nm=application 9 x\r\na=mid:0\r\nm=audio 9 x 111\r\na=mid:1\r\n";
        assert_eq!(first_audio_mid(sdp), Some(Mid::from("1")));
        assert_eq!(first_audio_mid("v=0\r\nm=video 9 x\r\na=mid:0\r\n"), None);
    }

    #[test]
    fn legs_share_one_certificate() {
        let fingerprint = |sdp: &str| {
            sdp.lines()
                .find(|l| l.starts_with("a=fingerprint:"))
                .map(str::to_string)
        };
        let a = create_upstream_offer(
            "127.0.0.1:5000".parse().unwrap(),
            None,
            MAX_MESSAGE,
            Instant::now(),
        )
        .unwrap();
        let b = create_upstream_offer(
            "127.0.0.1:5001".parse().unwrap(),
            None,
            MAX_MESSAGE,
            Instant::now(),
        )
        .unwrap();
        let fa = fingerprint(&a.offer.to_sdp_string());
        assert!(fa.is_some());
        assert_eq!(fa, fingerprint(&b.offer.to_sdp_string()));
    }

    #[test]
    fn an_upstream_offer_has_audio_and_the_events_channel() {
        let leg = create_upstream_offer(
            "127.0.0.1:5000".parse().unwrap(),
            Some("198.51.100.4:6000".parse().unwrap()),
            MAX_MESSAGE,
            Instant::now(),
        )
        .unwrap();
        let sdp = leg.offer.to_sdp_string();
        assert!(sdp.contains("198.51.100.4 6000 typ srflx"), "{sdp}");
        assert!(sdp.contains("m=audio"), "{sdp}");
        assert!(sdp.contains("m=application"), "{sdp}");
        assert!(sdp.contains("opus/48000/2"), "{sdp}");
        assert!(sdp.contains("a=sendrecv"), "{sdp}");
    }

    const APP_OFFER: &str = "v=0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=max-message-size:1\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\na=sctp-port:5000\r\na=max-message-size:262144\r\n";

    #[test]
    fn data_channel_terms_come_from_both_sides_of_the_exchange() {
        let no_limit = APP_OFFER.replace("max-message-size:262144", "max-message-size:0");
        let no_attr = APP_OFFER.replace("a=max-message-size:262144\r\n", "");
        let rejected = APP_OFFER.replace("m=application 9", "m=application 0");
        let audio_only = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=max-message-size:7\r\n";
        // (peer's SDP, ours, negotiated, the peer's limit)
        let rows: [(&str, &str, bool, Option<usize>); 7] = [
            (APP_OFFER, APP_OFFER, true, Some(262_144)),
            (&no_limit, APP_OFFER, true, None),
            // RFC 8841: no attribute is 64 KiB, not "unlimited".
            (&no_attr, APP_OFFER, true, Some(65_536)),
            // Offered and rejected, by either side: no channel will open.
            (&rejected, APP_OFFER, false, Some(262_144)),
            (APP_OFFER, &rejected, false, Some(262_144)),
            // The audio section's attribute is not the channel's.
            (audio_only, APP_OFFER, false, Some(65_536)),
            (APP_OFFER, audio_only, false, Some(262_144)),
        ];
        for (peer, ours, negotiated, max) in rows {
            let terms = data_channel_terms(peer, ours);
            assert_eq!(
                (terms.negotiated, terms.peer_max_message),
                (negotiated, max),
                "{peer:?} / {ours:?}"
            );
        }
        assert!(data_channel_terms(&no_limit, APP_OFFER).takes(usize::MAX));
        let terms = data_channel_terms(APP_OFFER, APP_OFFER);
        assert!(terms.takes(262_144) && !terms.takes(262_145));
    }

    #[test]
    fn the_advertised_message_size_is_replaced_or_added_in_the_application_section_only() {
        let out = with_max_message_size(APP_OFFER, 65_536);
        assert_eq!(
            out,
            APP_OFFER.replace("max-message-size:262144", "max-message-size:65536")
        );
        assert!(out.contains("a=max-message-size:1\r\n"), "audio untouched");
        let no_attr = APP_OFFER.replace("a=max-message-size:262144\r\n", "");
        let added = with_max_message_size(&no_attr, 1000);
        assert!(
            added.ends_with("a=sctp-port:5000\r\na=max-message-size:1000\r\n"),
            "{added}"
        );
        // A section in the middle, LF line ends.
        let middle = "v=0\nm=application 9 x\na=mid:0\nm=audio 9 x 111\na=mid:1\n";
        assert_eq!(
            with_max_message_size(middle, 5),
            "v=0\nm=application 9 x\na=mid:0\na=max-message-size:5\nm=audio 9 x 111\na=mid:1\n"
        );
        let audio_only = "v=0\r\nm=audio 9 x 111\r\n";
        assert_eq!(with_max_message_size(audio_only, 5), audio_only);
        // What str0m writes round-trips through its own parser.
        let leg = create_upstream_offer(
            "127.0.0.1:5000".parse().unwrap(),
            None,
            MAX_MESSAGE,
            Instant::now(),
        )
        .unwrap();
        let sdp = with_max_message_size(&leg.offer.to_sdp_string(), 70_000);
        let parsed = SdpOffer::from_sdp_string(&sdp).unwrap().to_sdp_string();
        assert_eq!(
            data_channel_terms(&parsed, &parsed).peer_max_message,
            Some(70_000)
        );
        assert_eq!(
            data_channel_terms(&leg.offer.to_sdp_string(), &sdp).peer_max_message,
            Some(MAX_MESSAGE)
        );
    }
}
