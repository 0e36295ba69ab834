//! The relay's side of a request: building the gRPC messages, and turning its answers (or the
//! lack of one) into HTTP replies plus a verdict on the worker.

use std::collections::HashMap;

use prost::Message;
use realtime_relay_proto::split_status_message;
use realtime_relay_proto::v1::{
    create_call_response::Outcome, CreateCallRequest, CreateCallResponse, HangupCallRequest,
    HangupCallResponse, ListCallsRequest, ListCallsResponse, Upstream,
};

use crate::config::Config;
use crate::error::FilterError;
use crate::reply::HttpReply;
use realtime_relay_proto::ErrorClass;

pub use realtime_relay_proto::SERVICE_NAME;
pub const METHOD_CREATE: &str = "CreateCall";
pub const METHOD_HANGUP: &str = "HangupCall";
pub const METHOD_LIST: &str = "ListCalls";
pub const METHOD_GET: &str = "GetCall";

/// gRPC status codes the mapping cares about.
pub mod grpc {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const NOT_FOUND: u32 = 5;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNAVAILABLE: u32 = 14;
}

/// Longest relay message text passed on to a client.
const MAX_RELAY_MESSAGE: usize = 512;

/// What the outcome says about the worker (only upstream failures count against it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    UpstreamFailure,
    /// Client fault, relay fault, or unknown: says nothing about the worker.
    Neutral,
}

/// Everything `CreateCall` needs.
pub struct CreateCall<'a> {
    pub call_id: &'a str,
    pub request_id: &'a str,
    pub model: &'a str,
    pub upstream_model: &'a str,
    pub sdp_offer: &'a str,
    pub session_json: &'a str,
    pub base_url: &'a str,
    pub authorization: &'a str,
    pub worker_id: &'a str,
    /// Who creates, and so owns, the call (empty: nobody; see `crate::identity`).
    pub principal: &'a str,
    /// The API the client speaks (Realtime or GPT-Live).
    pub api: realtime_relay_proto::v1::Api,
    /// What the call may use (`crate::budget`); the default: no limit.
    pub budget: crate::budget::Budget,
}

pub fn encode_create(c: &CreateCall<'_>) -> Vec<u8> {
    CreateCallRequest {
        call_id: c.call_id.to_string(),
        model: c.model.to_string(),
        upstream_model: c.upstream_model.to_string(),
        sdp_offer: c.sdp_offer.to_string(),
        session_json: c.session_json.to_string(),
        upstream: Some(Upstream {
            base_url: c.base_url.to_string(),
            authorization: c.authorization.to_string(),
            worker_id: c.worker_id.to_string(),
        }),
        request_id: c.request_id.to_string(),
        principal: c.principal.to_string(),
        api: c.api as i32,
        budget: c.budget.proto(),
    }
    .encode_to_vec()
}

/// The same `CreateCallRequest` with another call id (a failover to another relay replica,
/// whose id the call id must name). `None` if `message` is not a `CreateCallRequest`.
pub fn with_call_id(message: &[u8], call_id: &str) -> Option<Vec<u8>> {
    let mut req = CreateCallRequest::decode(message).ok()?;
    req.call_id = call_id.to_string();
    Some(req.encode_to_vec())
}

/// A hangup by `principal` (an operator may end any call).
pub fn encode_hangup(call_id: &str, principal: &str, operator: bool) -> Vec<u8> {
    HangupCallRequest {
        call_id: call_id.to_string(),
        principal: principal.to_string(),
        operator,
    }
    .encode_to_vec()
}

/// A lookup of one call by `principal` (an operator may look at any call).
pub fn encode_get(call_id: &str, principal: &str, operator: bool) -> Vec<u8> {
    realtime_relay_proto::v1::GetCallRequest {
        call_id: call_id.to_string(),
        principal: principal.to_string(),
        operator,
    }
    .encode_to_vec()
}

pub fn encode_list() -> Vec<u8> {
    ListCallsRequest {
        include_ended: false,
    }
    .encode_to_vec()
}

/// The text of a gRPC status message as the host hands it over: `grpc-message` is
/// percent-encoded on the wire (gRPC over HTTP/2: bytes outside 0x20..=0x7E and `%`), and
/// Envoy passes it on undecoded. Undecoded, "invalid_sdp: …" arrives as
/// "invalid_sdp:%20…" and its stable code is lost. Per the spec a decoder never fails:
/// a malformed escape is kept as it is. Envoy's async gRPC client also appends its
/// response-code details in braces (`…{via_upstream}`); that suffix is dropped.
pub fn decode_grpc_message(raw: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    strip_envoy_details(&text).to_string()
}

/// `"text{via_upstream}"` → `"text"`: only a trailing `{lower_snake_case}` group.
fn strip_envoy_details(text: &str) -> &str {
    let Some(body) = text.strip_suffix('}') else {
        return text;
    };
    match body.rfind('{') {
        Some(open)
            if open + 1 < body.len()
                && body[open + 1..]
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_') =>
        {
            &text[..open]
        }
        _ => text,
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("").to_string()
}

/// Maps a failed gRPC call (status != OK) to an error and a verdict.
pub fn map_grpc_error(
    config: &Config,
    status: u32,
    message: Option<&str>,
) -> (FilterError, Verdict) {
    let (code, text) = split_status_message(message.unwrap_or(""));
    let owned = code.map(str::to_string);
    // The contract's class, not the code's spelling: `upstream_not_allowed` is a client fault.
    let upstream = code
        .and_then(realtime_relay_proto::ErrorCode::parse)
        .is_some_and(|c| c.class() == ErrorClass::Upstream);
    let verdict = if upstream {
        Verdict::UpstreamFailure
    } else {
        Verdict::Neutral
    };
    let e = match status {
        grpc::INVALID_ARGUMENT => FilterError::RelayRejected {
            code: owned.unwrap_or_else(|| "invalid_request".to_string()),
            message: truncate(
                if text.is_empty() {
                    "invalid request"
                } else {
                    text
                },
                MAX_RELAY_MESSAGE,
            ),
        },
        grpc::DEADLINE_EXCEEDED => FilterError::RelayTimeout { code: owned },
        grpc::RESOURCE_EXHAUSTED => FilterError::Capacity {
            status: config.capacity_status,
            retry_after_s: config.retry_after_s,
            code: owned,
        },
        grpc::UNAVAILABLE if upstream => FilterError::UpstreamFailed {
            code: owned.unwrap_or_default(),
        },
        grpc::UNAVAILABLE => FilterError::RelayUnavailable {
            retry_after_s: config.retry_after_s,
            code: owned,
        },
        _ => FilterError::RelayError { code: owned },
    };
    (e, verdict)
}

/// The result of a `CreateCall`, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateResult {
    pub reply: HttpReply,
    pub verdict: Verdict,
    /// The error code for metrics (`None` on success and pass-through rejections).
    pub error_code: Option<String>,
    /// Set when the upstream rejected the call (its status).
    pub upstream_status: Option<u16>,
}

fn failed(e: FilterError, verdict: Verdict, request_id: &str) -> CreateResult {
    CreateResult {
        error_code: Some(e.code().to_string()),
        reply: e.to_reply(request_id),
        verdict,
        upstream_status: None,
    }
}

/// Maps the answer to `CreateCall`: `status` from the host, `body` the response message when
/// the status is OK.
/// Error code of a create that a relay set up without naming itself under the shared key
/// (relay without `--replica-addr`, or another `RELAY_REPLICA_KEY`): its hangup could not
/// find it, so the call is refused.
pub const UNNAMED_POD_CALL: &str = "relay_unnamed_call";

pub fn map_create_response(
    config: &Config,
    status: u32,
    message: Option<&str>,
    body: Option<&[u8]>,
    fallback_call_id: &str,
    request_id: &str,
) -> CreateResult {
    if status != grpc::OK {
        let (e, v) = map_grpc_error(config, status, message);
        return failed(e, v, request_id);
    }
    let bad = || {
        failed(
            FilterError::RelayError {
                code: Some("bad_relay_response".to_string()),
            },
            Verdict::Neutral,
            request_id,
        )
    };
    let Ok(resp) = CreateCallResponse::decode(body.unwrap_or(&[])) else {
        return bad();
    };
    let call_id = if resp.call_id.is_empty() {
        fallback_call_id.to_string()
    } else {
        resp.call_id
    };
    match resp.outcome {
        Some(Outcome::SdpAnswer(sdp)) if !sdp.is_empty() => {
            if !crate::classify::is_valid_call_id(&call_id) {
                return bad();
            }
            // With relay pods, a call's hangup finds it only through the pod name in its id.
            if let Some(pods) = &config.pods {
                if !pods.accepts(&call_id, fallback_call_id) {
                    return failed(
                        FilterError::RelayError {
                            code: Some(UNNAMED_POD_CALL.to_string()),
                        },
                        Verdict::Neutral,
                        request_id,
                    );
                }
            }
            CreateResult {
                reply: HttpReply {
                    status: 201,
                    headers: vec![
                        ("content-type".to_string(), "application/sdp".to_string()),
                        (
                            "location".to_string(),
                            format!("{}/{call_id}", config.calls_path),
                        ),
                        ("x-request-id".to_string(), request_id.to_string()),
                        ("cache-control".to_string(), "no-store".to_string()),
                    ],
                    body: sdp.into_bytes(),
                },
                verdict: Verdict::Success,
                error_code: None,
                upstream_status: None,
            }
        }
        Some(Outcome::UpstreamRejection(r)) => {
            let status = u16::try_from(r.status)
                .ok()
                .filter(|s| (400..=599).contains(s));
            let Some(status) = status else {
                return bad();
            };
            let mut headers = Vec::new();
            if !r.content_type.is_empty()
                && r.content_type.len() <= 256
                && r.content_type
                    .bytes()
                    .all(|b| b == b' ' || b.is_ascii_graphic())
            {
                headers.push(("content-type".to_string(), r.content_type));
            }
            CreateResult {
                reply: HttpReply {
                    status,
                    headers,
                    body: r.body,
                }
                .with_request_id(request_id),
                verdict: if status >= 500 {
                    Verdict::UpstreamFailure
                } else {
                    Verdict::Neutral
                },
                error_code: None,
                upstream_status: Some(status),
            }
        }
        _ => bad(),
    }
}

/// The result of a `HangupCall`: the reply and the worker whose call ended (for load counts).
#[derive(Debug, Clone, PartialEq)]
pub struct HangupResult {
    pub reply: HttpReply,
    /// The worker to release: set only when this hangup ended the call.
    pub worker_id: Option<String>,
    /// The call's owner as the relay showed it (to operators only; empty otherwise).
    pub owner: String,
    pub error_code: Option<String>,
}

pub fn map_hangup_response(
    config: &Config,
    status: u32,
    message: Option<&str>,
    body: Option<&[u8]>,
    request_id: &str,
) -> HangupResult {
    let err = |e: FilterError| HangupResult {
        error_code: Some(e.code().to_string()),
        reply: e.to_reply(request_id),
        worker_id: None,
        owner: String::new(),
    };
    match status {
        grpc::OK => {
            // Released once per call: a repeated hangup (clients retry) of a call that had
            // already ended answers OK too, and must not release the worker again.
            let ended = HangupCallResponse::decode(body.unwrap_or(&[]))
                .ok()
                .filter(|r| r.ended_now)
                .and_then(|r| r.call);
            let owner = ended
                .as_ref()
                .map(|c| c.principal.clone())
                .unwrap_or_default();
            let worker_id = ended.map(|c| c.worker_id).filter(|w| !w.is_empty());
            HangupResult {
                reply: HttpReply {
                    status: 200,
                    headers: vec![
                        ("x-request-id".to_string(), request_id.to_string()),
                        ("cache-control".to_string(), "no-store".to_string()),
                    ],
                    body: Vec::new(),
                },
                worker_id,
                owner,
                error_code: None,
            }
        }
        grpc::NOT_FOUND => err(FilterError::CallNotFound),
        _ => err(map_grpc_error(config, status, message).0),
    }
}

/// What a `ListCalls` answer says about load: live calls per worker on the relay that
/// answered, its own address and the replicas it knows of (both empty unless the relays run
/// as named pods).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listed {
    pub live: HashMap<String, u32>,
    /// Live calls per owner (`CallInfo.principal`, which ListCalls shows); calls without one
    /// are not counted.
    pub live_principals: HashMap<String, u32>,
    pub replica_addr: String,
    pub replicas: Vec<String>,
}

pub fn decode_list(body: &[u8]) -> Option<Listed> {
    ListCallsResponse::decode(body).ok().map(|r| {
        let mut live_principals: HashMap<String, u32> = HashMap::new();
        for c in &r.calls {
            if !c.principal.is_empty()
                && c.state != realtime_relay_proto::v1::CallState::Ended as i32
            {
                *live_principals.entry(c.principal.clone()).or_default() += 1;
            }
        }
        Listed {
            live: r.live_calls_by_worker,
            live_principals,
            replica_addr: r.replica_addr,
            replicas: r.replicas,
        }
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn grpc_messages_are_percent_decoded_so_their_code_survives() {
        assert_eq!(
            decode_grpc_message("invalid_sdp:%20the%20offer%0Ahas%20no%20media"),
            "invalid_sdp: the offer\nhas no media"
        );
        assert_eq!(decode_grpc_message("100%"), "100%");
        assert_eq!(
            decode_grpc_message("invalid_sdp:%20missing%20a=fingerprint{via_upstream}"),
            "invalid_sdp: missing a=fingerprint"
        );
        assert_eq!(
            decode_grpc_message("keeps {A JSON-ish} tail}"),
            "keeps {A JSON-ish} tail}"
        );
        assert_eq!(decode_grpc_message("{}"), "{}");
        assert_eq!(decode_grpc_message("%zz%4"), "%zz%4");
        assert_eq!(decode_grpc_message("caf%C3%A9"), "caf\u{e9}");
        assert_eq!(decode_grpc_message("%FF"), "\u{fffd}");
        let decoded = decode_grpc_message("upstream_unreachable:%20cannot%20connect");
        assert_eq!(
            split_status_message(&decoded),
            (Some("upstream_unreachable"), "cannot connect")
        );
    }

    use super::*;
    use crate::config::tests::sample;
    use realtime_relay_proto::v1::UpstreamRejection;

    fn answer(outcome: Outcome) -> Vec<u8> {
        CreateCallResponse {
            call_id: "rtc_abcdefgh".into(),
            outcome: Some(outcome),
        }
        .encode_to_vec()
    }

    fn header<'a>(r: &'a HttpReply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn success_is_201_with_location() {
        let c = sample();
        let body = answer(Outcome::SdpAnswer("v=0\r\n".into()));
        let r = map_create_response(&c, 0, None, Some(&body), "rtc_x", "req");
        assert_eq!(r.reply.status, 201);
        assert_eq!(
            header(&r.reply, "location"),
            Some("/v1/realtime/calls/rtc_abcdefgh")
        );
        assert_eq!(header(&r.reply, "content-type"), Some("application/sdp"));
        assert_eq!(r.verdict, Verdict::Success);
    }

    #[test]
    fn upstream_rejection_passes_through_verbatim() {
        let c = sample();
        let body = answer(Outcome::UpstreamRejection(UpstreamRejection {
            status: 401,
            content_type: "application/json; charset=utf-8".into(),
            body: b"{\"error\":{}}".to_vec(),
        }));
        let r = map_create_response(&c, 0, None, Some(&body), "rtc_x", "req");
        assert_eq!(r.reply.status, 401);
        assert_eq!(r.reply.body, b"{\"error\":{}}");
        assert_eq!(
            header(&r.reply, "content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(r.verdict, Verdict::Neutral);
        let body = answer(Outcome::UpstreamRejection(UpstreamRejection {
            status: 503,
            content_type: String::new(),
            body: vec![],
        }));
        let r = map_create_response(&c, 0, None, Some(&body), "rtc_x", "req");
        assert_eq!(r.verdict, Verdict::UpstreamFailure);
    }

    #[test]
    fn grpc_statuses_map_to_http() {
        let c = sample();
        let cases: &[(u32, Option<&str>, u16, &str, Verdict)] = &[
            (14, None, 503, "relay_unavailable", Verdict::Neutral),
            (
                14,
                Some("upstream connect error or disconnect/reset before headers"),
                503,
                "relay_unavailable",
                Verdict::Neutral,
            ),
            (
                14,
                Some("draining: shutting down"),
                503,
                "draining",
                Verdict::Neutral,
            ),
            (
                14,
                Some("upstream_unreachable: connect refused"),
                502,
                "upstream_unreachable",
                Verdict::UpstreamFailure,
            ),
            (4, None, 504, "relay_timeout", Verdict::Neutral),
            (
                4,
                Some("upstream_timeout: no answer"),
                504,
                "upstream_timeout",
                Verdict::UpstreamFailure,
            ),
            (
                3,
                Some("invalid_sdp: no media"),
                400,
                "invalid_sdp",
                Verdict::Neutral,
            ),
            (3, Some("weird"), 400, "invalid_request", Verdict::Neutral),
            (
                8,
                Some("call_limit: 100 calls"),
                429,
                "call_limit",
                Verdict::Neutral,
            ),
            (8, None, 429, "capacity_exceeded", Verdict::Neutral),
            (
                13,
                Some("upstream_candidates_not_allowed: no usable candidate"),
                502,
                "upstream_candidates_not_allowed",
                Verdict::UpstreamFailure,
            ),
            (
                13,
                Some("internal_error: boom"),
                502,
                "internal_error",
                Verdict::Neutral,
            ),
            (12, None, 502, "relay_error", Verdict::Neutral),
        ];
        for (status, msg, http, code, verdict) in cases {
            let r = map_create_response(&c, *status, *msg, None, "rtc_x", "req");
            assert_eq!(r.reply.status, *http, "{status} {msg:?}");
            assert_eq!(r.error_code.as_deref(), Some(*code), "{status} {msg:?}");
            assert_eq!(r.verdict, *verdict, "{status} {msg:?}");
            let v: serde_json::Value = serde_json::from_slice(&r.reply.body).unwrap();
            assert_eq!(v["error"]["code"], *code);
        }
        let r = map_create_response(&c, 8, None, None, "rtc_x", "req");
        assert_eq!(header(&r.reply, "retry-after"), Some("1"));
        let r = map_create_response(&c, 0, None, Some(b"\xff\xff"), "rtc_x", "req");
        assert_eq!(r.reply.status, 502);
        let r = map_create_response(&c, 0, None, Some(&[]), "rtc_x", "req");
        assert_eq!(r.error_code.as_deref(), Some("bad_relay_response"));
    }

    #[test]
    fn a_failover_keeps_the_request_but_the_call_id() {
        let m = encode_create(&CreateCall {
            call_id: "rtc_r0_aa",
            request_id: "req",
            model: "m",
            upstream_model: "m",
            sdp_offer: "v=0",
            session_json: "",
            base_url: "http://x",
            authorization: "Bearer k",
            principal: "p_test",
            api: realtime_relay_proto::v1::Api::Realtime,
            worker_id: "w",
            budget: crate::budget::Budget {
                tokens_per_call: Some(100),
                audio_seconds_per_call: None,
            },
        });
        let out =
            CreateCallRequest::decode(with_call_id(&m, "rtc_r1_aa").unwrap().as_slice()).unwrap();
        assert_eq!(out.call_id, "rtc_r1_aa");
        assert_eq!(out.sdp_offer, "v=0");
        assert_eq!(out.upstream.unwrap().authorization, "Bearer k");
        assert!(with_call_id(b"\xff\xff", "x").is_none());
    }

    #[test]
    fn a_list_counts_live_calls_per_owner_for_the_limits() {
        use realtime_relay_proto::v1::{CallInfo, CallState, ListCallsResponse};
        let call = |p: &str, state: CallState| CallInfo {
            principal: p.into(),
            state: state as i32,
            ..Default::default()
        };
        let body = ListCallsResponse {
            calls: vec![
                call("p_a", CallState::Connected),
                call("p_a", CallState::Pending),
                call("p_a", CallState::Ended),
                call("p_b", CallState::Connected),
                call("", CallState::Connected),
            ],
            ..Default::default()
        }
        .encode_to_vec();
        let l = decode_list(&body).unwrap();
        assert_eq!(l.live_principals.get("p_a"), Some(&2));
        assert_eq!(l.live_principals.get("p_b"), Some(&1));
        assert_eq!(l.live_principals.len(), 2, "no owner, no count");
    }

    #[test]
    fn hangup_maps_ok_and_not_found() {
        use realtime_relay_proto::v1::CallInfo;
        let c = sample();
        let body = |ended_now| {
            HangupCallResponse {
                call: Some(CallInfo {
                    worker_id: "a".into(),
                    ..Default::default()
                }),
                ended_now,
            }
            .encode_to_vec()
        };
        let r = map_hangup_response(&c, 0, None, Some(&body(true)), "req");
        assert_eq!(r.reply.status, 200);
        assert_eq!(r.worker_id.as_deref(), Some("a"));
        // A hangup of a call that had already ended: OK, nothing to release.
        let r = map_hangup_response(&c, 0, None, Some(&body(false)), "req");
        assert_eq!((r.reply.status, r.worker_id), (200, None));
        let r = map_hangup_response(&c, 5, Some("call_not_found: x"), None, "req");
        assert_eq!(r.reply.status, 404);
        assert_eq!(r.error_code.as_deref(), Some("call_not_found"));
        let r = map_hangup_response(&c, 14, None, None, "req");
        assert_eq!(r.reply.status, 503);
    }
}
