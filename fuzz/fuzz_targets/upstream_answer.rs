//! The provider's reply to a create, as the relay handles it: status, `Location` and body
//! (whoever answers the worker's URL controls all three), then the private-address policy on
//! the answer's candidates and str0m accepting it for a real upstream offer.
//!
//! Input: byte 0 picks the API (even: Realtime, odd: GPT-Live), bytes 1–2 the status; the
//! rest is `Location`, a NUL, the body. Properties: a non-2xx is a rejection carrying status
//! and body unchanged; a 2xx is an answer whose provider id is always one safe path segment;
//! an invalid GPT-Live answer's error never quotes the body; every candidate the policy keeps
//! is a public IP literal; accepting never panics.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use realtime_relay_proto::call_id::Kind;
use relay_service::allowlist::{is_public, Allowlist};
use relay_service::error::SetupError;
use relay_service::peer;
use relay_service::signaling::{is_safe_id, read_answer, ExchangeOutcome};

/// Every message a refused GPT-Live answer can carry: fixed texts, or serde's category and
/// position (never the body).
fn live_error_is_fixed(message: &str) -> bool {
    const FIXED: [&str; 3] = [
        "the upstream's answer has a transport other than webrtc",
        "the upstream's answer has no SDP",
        "the upstream's session id is not 1 to 128 letters, digits, '_' or '-'",
    ];
    if FIXED.contains(&message) {
        return true;
    }
    let Some(rest) = message.strip_prefix("the upstream's answer is not a GPT-Live session (")
    else {
        return false;
    };
    let Some((category, pos)) = rest.split_once(" error at line ") else {
        return false;
    };
    ["Io", "Syntax", "Data", "Eof"].contains(&category)
        && pos
            .strip_suffix(')')
            .and_then(|p| p.split_once(", column "))
            .is_some_and(|(l, c)| l.parse::<u64>().is_ok() && c.parse::<u64>().is_ok())
}

fn policy() -> &'static Allowlist {
    static P: OnceLock<Allowlist> = OnceLock::new();
    P.get_or_init(|| Allowlist::new(&["https://api.openai.com".into()], false).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let [api, s0, s1, rest @ ..] = data else {
        return;
    };
    let kind = if api % 2 == 0 { Kind::Realtime } else { Kind::Live };
    let status = u16::from_be_bytes([*s0, *s1]) % 600;
    let (location, body) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&[][..], rest),
    };
    let location = std::str::from_utf8(location).ok();
    let outcome = read_answer(kind, status, "text/plain".into(), location, body.to_vec());
    let sdp = match outcome {
        Ok(ExchangeOutcome::Rejected {
            status: s,
            body: b,
            ..
        }) => {
            assert!(!(200..300).contains(&status));
            assert_eq!(s, status);
            assert_eq!(b, body, "a rejection is passed back verbatim");
            return;
        }
        Ok(ExchangeOutcome::Answer {
            sdp,
            upstream_call_id,
        }) => {
            assert!((200..300).contains(&status));
            if let Some(id) = &upstream_call_id {
                assert!(is_safe_id(id), "{id:?}");
            }
            if kind == Kind::Live {
                assert!(upstream_call_id.is_some());
                assert!(!sdp.trim().is_empty());
            } else {
                assert_eq!(sdp.as_bytes(), body);
            }
            sdp
        }
        Err(SetupError::UpstreamInvalidAnswer(message)) => {
            assert!((200..300).contains(&status));
            if kind == Kind::Live {
                assert!(live_error_is_fixed(&message), "{message:?}");
            } else {
                assert_eq!(message, "the upstream answer is not UTF-8");
            }
            return;
        }
        Err(other) => panic!("unexpected error {other:?}"),
    };

    let filtered = policy().filter_answer_candidates(&sdp);
    for line in filtered.sdp.lines() {
        if let Some(c) = line.trim_end().strip_prefix("a=candidate:") {
            let ip: IpAddr = c
                .split_ascii_whitespace()
                .nth(4)
                .and_then(|a| a.parse().ok())
                .expect("a kept candidate has an IP address");
            assert!(is_public(ip), "{ip} kept");
        }
    }
    let Ok(usable) = filtered.usable() else {
        return;
    };
    let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);
    let Ok(mut leg) = peer::create_upstream_offer(local, None, 64 * 1024, Instant::now()) else {
        panic!("our own offer");
    };
    let _ = peer::accept_upstream_answer(&mut leg.rtc, leg.pending, &usable);
});
