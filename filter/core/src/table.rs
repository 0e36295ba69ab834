//! One row per malformed or hostile request: the status and code it must get, and that it
//! never gets as far as a relay call, run through the request lifecycle on a fake host.

use crate::config::tests::{env, sample, SAMPLE};
use crate::multipart::build;
use crate::routing::MemoryStore;
use crate::sdp::tests::OFFER;
use crate::*;
use std::rc::Rc;

use prost::Message;
use realtime_relay_proto::v1::CreateCallRequest;

use crate::fake_host::FakeHost;

struct Req {
    method: &'static str,
    path: String,
    content_type: Option<String>,
    content_length: Option<String>,
    authorization: Option<&'static str>,
    route: Option<&'static str>,
    /// The page a browser request comes from (`Origin`); the gateway is `gw.example.test`.
    origin: Option<&'static str>,
    body: Vec<u8>,
    no_default_model: bool,
    /// Model entries appended to the sample's (prefixes, a catch-all).
    models: Vec<serde_json::Value>,
}

fn post(ct: &str, body: impl Into<Vec<u8>>) -> Req {
    Req {
        method: "POST",
        path: "/v1/realtime/calls".into(),
        content_type: Some(ct.to_string()),
        content_length: None,
        authorization: None,
        route: None,
        origin: None,
        body: body.into(),
        no_default_model: false,
        models: Vec::new(),
    }
}

/// The prefix entry the model-route rows add: `gpt-realtime-mini*` on pool `main`.
fn prefix() -> serde_json::Value {
    serde_json::json!({"name": "gpt-realtime-mini*", "pools": ["main"]})
}

/// The catch-all entry: `*` on pool `local` (passthrough: the client brings its key).
fn catch_all() -> serde_json::Value {
    serde_json::json!({"name": "*", "pools": ["local"]})
}

/// `r` against the sample plus a prefix entry (and a catch-all when `every_model`).
fn routed(every_model: bool, r: Req) -> Req {
    let mut models = vec![prefix()];
    if every_model {
        models.push(catch_all());
    }
    Req { models, ..r }
}

/// A raw-SDP create asking for `model` in the query.
fn asking(model: &str) -> Req {
    Req {
        path: format!("/v1/realtime/calls?model={model}"),
        ..sdp(OFFER)
    }
}

fn sdp(body: impl Into<Vec<u8>>) -> Req {
    post("application/sdp", body)
}

const B: &str = "b0undary";
/// The sample's trusted operator key: its routing header counts.
const OPS: &str = "Bearer sk-gw-ops";
const MP: &str = "multipart/form-data; boundary=b0undary";

fn form(parts: &[(&str, &[u8])]) -> Req {
    let parts: Vec<(&str, Option<&str>, &[u8])> =
        parts.iter().map(|(n, c)| (*n, None, *c)).collect();
    post(MP, build(B, &parts))
}

fn session(json: &str) -> Req {
    form(&[("sdp", OFFER.as_bytes()), ("session", json.as_bytes())])
}

/// A GPT-Live create with this JSON body.
fn live(body: &str) -> Req {
    Req {
        path: "/v1/live/sessions".into(),
        ..post("application/json", body.as_bytes().to_vec())
    }
}

/// A well-formed Live body with `session` and the test offer.
fn live_with(session: &str) -> Req {
    let body = serde_json::json!({"session": serde_json::from_str::<serde_json::Value>(session).unwrap(), "transport": {"type": "webrtc", "sdp": OFFER}});
    live(&body.to_string())
}

/// An empty POST to `path`.
fn at(path: &str) -> Req {
    Req {
        path: path.to_string(),
        ..sdp("")
    }
}

fn raw_mp(body: &str) -> Req {
    post(MP, body.as_bytes().to_vec())
}

fn offer_with(from: &str, to: &str) -> Req {
    sdp(OFFER.replace(from, to))
}

/// A refusal as the client sees it: status, the error code, and the whole JSON body.
struct Refusal {
    status: u16,
    code: String,
    json: serde_json::Value,
}

/// Runs a request through the filter's lifecycle on a fake host: the `CreateCall` it
/// dispatches, or the reply it sends. A refusal must never dispatch anything nor leave a
/// worker counted.
fn run(r: &Req) -> Result<CreateCallRequest, Refusal> {
    run_on(r).0
}

/// The configuration a row runs against.
fn config_of(r: &Req) -> Config {
    let text = if r.no_default_model {
        SAMPLE.replace("\"default_model\": \"gpt-realtime\",", "")
    } else {
        SAMPLE.to_string()
    };
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["models"].as_array_mut().unwrap().extend(r.models.clone());
    Config::from_json(v.to_string().as_bytes(), &env).unwrap()
}

/// [`run`], and the host it ran on.
fn run_on(r: &Req) -> (Result<CreateCallRequest, Refusal>, FakeHost) {
    let cfg = config_of(r);
    let mut headers = vec![
        (":method", r.method),
        (":path", r.path.as_str()),
        (":authority", "gw.example.test"),
    ];
    for (name, value) in [
        ("origin", r.origin),
        ("content-type", r.content_type.as_deref()),
        ("content-length", r.content_length.as_deref()),
        ("authorization", r.authorization),
        ("x-realtime-route", r.route),
    ] {
        if let Some(v) = value {
            headers.push((name, v));
        }
    }
    let mut host = FakeHost::request(&headers, &r.body);
    let mut flow = Flow::new(Rc::new(cfg.clone()));
    if flow.on_headers(&mut host, r.body.is_empty()) == Action::Pause && host.replies.is_empty() {
        flow.on_body(&mut host, r.body.len(), true);
    }
    (verdict(&cfg, &host), host)
}

/// What the request got on `host`: the `CreateCall` dispatched or the reply sent.
fn verdict(cfg: &Config, host: &FakeHost) -> Result<CreateCallRequest, Refusal> {
    if let Some(d) = host.dispatched.first() {
        assert!(host.replies.is_empty());
        if d.method != "CreateCall" {
            // A hangup would go to the relay: no row of this table expects that.
            return Err(Refusal {
                status: 0,
                code: format!("dispatched {}", d.method),
                json: serde_json::Value::Null,
            });
        }
        return Ok(CreateCallRequest::decode(d.message.as_slice()).unwrap());
    }
    // nothing stays counted when a request is refused
    for (_, w) in cfg.workers() {
        assert_eq!(host.stored(&routing::outstanding_key(&w.id)), 0);
    }
    if host.replies.is_empty() {
        // Neither dispatched nor refused: the request would go on to Envoy's router.
        return Err(Refusal {
            status: 0,
            code: "passed through".to_string(),
            json: serde_json::Value::Null,
        });
    }
    let reply = host.last_reply();
    let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(reply.header("content-type"), Some("application/json"));
    Err(Refusal {
        status: reply.status,
        code: json["error"]["code"].as_str().unwrap_or("").to_string(),
        json,
    })
}

fn cases() -> Vec<(&'static str, Req, u16, &'static str)> {
    let big_line = format!("a=x:{}\r\n", "y".repeat(5000));
    let mut too_many_headers = format!("--{B}\r\nContent-Disposition: form-data; name=\"sdp\"\r\n");
    for i in 0..9 {
        too_many_headers.push_str(&format!("X-H{i}: v\r\n"));
    }
    too_many_headers.push_str(&format!("\r\n{OFFER}\r\n--{B}--\r\n"));
    let many_parts: Vec<(&str, &[u8])> = (0..9).map(|_| ("junk", b"x".as_slice())).collect();
    vec![
        // ---- method and path
        ("GET on calls", Req { method: "GET", ..sdp(OFFER) }, 405, "method_not_allowed"),
        ("PUT on calls", Req { method: "PUT", ..sdp(OFFER) }, 405, "method_not_allowed"),
        ("DELETE on hangup", Req { method: "DELETE", path: "/v1/realtime/calls/rtc_abc/hangup".into(), ..sdp("") }, 405, "method_not_allowed"),
        ("hangup of a call id without rtc_", Req { path: "/v1/realtime/calls/abc/hangup".into(), ..sdp("") }, 404, "call_not_found"),
        ("hangup of a call id with %-escapes", Req { path: "/v1/realtime/calls/rtc_%2e%2e/hangup".into(), ..sdp("") }, 404, "call_not_found"),
        ("PATCH on calls", Req { method: "PATCH", ..sdp(OFFER) }, 405, "method_not_allowed"),
        ("HEAD on calls", Req { method: "HEAD", ..sdp("") }, 405, "method_not_allowed"),
        ("OPTIONS on calls without CORS", Req { method: "OPTIONS", ..sdp("") }, 405, "method_not_allowed"),
        ("GET on hangup", Req { method: "GET", path: "/v1/realtime/calls/rtc_abc/hangup".into(), ..sdp("") }, 405, "method_not_allowed"),
        ("PUT on hangup", Req { method: "PUT", path: "/v1/realtime/calls/rtc_abc/hangup".into(), ..sdp("") }, 405, "method_not_allowed"),
        ("hangup with an empty id (//hangup)", at("/v1/realtime/calls//hangup"), 404, "not_found"),
        ("//hangup as merge_slashes leaves it", at("/v1/realtime/calls/hangup"), 404, "not_found"),
        ("calls path with a trailing slash", at("/v1/realtime/calls/"), 404, "not_found"),
        ("call id without a verb", at("/v1/realtime/calls/rtc_abc"), 404, "not_found"),
        ("GET of a call id", Req { method: "GET", ..at("/v1/realtime/calls/rtc_abc") }, 404, "not_found"),
        ("DELETE of a call id", Req { method: "DELETE", ..at("/v1/realtime/calls/rtc_abc") }, 404, "not_found"),
        ("unknown verb accept", at("/v1/realtime/calls/rtc_abc/accept"), 404, "not_found"),
        ("unknown verb refer", at("/v1/realtime/calls/rtc_abc/refer"), 404, "not_found"),
        ("unknown verb reject", at("/v1/realtime/calls/rtc_abc/reject"), 404, "not_found"),
        ("verb in upper case", at("/v1/realtime/calls/rtc_abc/HANGUP"), 404, "not_found"),
        ("extra segment after hangup", at("/v1/realtime/calls/rtc_abc/hangup/x"), 404, "not_found"),
        ("trailing slash after hangup", at("/v1/realtime/calls/rtc_abc/hangup/"), 404, "not_found"),
        ("two id segments", at("/v1/realtime/calls/a/b/hangup"), 404, "not_found"),
        ("literal ../ segments", at("/v1/realtime/calls/rtc_x/../../../../hangup"), 404, "not_found"),
        (".. towards models", at("/v1/realtime/calls/../models"), 404, "not_found"),
        ("..%2F in the id", at("/v1/realtime/calls/..%2F..%2Fmodels/hangup"), 404, "call_not_found"),
        ("%2e%2e%2f in the id", at("/v1/realtime/calls/%2e%2e%2f%2e%2e%2fmodels/hangup"), 404, "call_not_found"),
        ("%2F as the id", at("/v1/realtime/calls/%2F/hangup"), 404, "call_not_found"),
        (". as the id", at("/v1/realtime/calls/./hangup"), 404, "call_not_found"),
        ("hangup as the id", at("/v1/realtime/calls/hangup/hangup"), 404, "call_not_found"),
        ("id with %00", at("/v1/realtime/calls/rtc_%00/hangup"), 404, "call_not_found"),
        ("id of 500 chars", at(&format!("/v1/realtime/calls/rtc_{}/hangup", "a".repeat(500))), 404, "call_not_found"),
        // ---- content type
        ("no content type", Req { content_type: None, ..sdp(OFFER) }, 400, "invalid_content_type"),
        ("text/plain", post("text/plain", OFFER), 415, "invalid_content_type"),
        ("application/json", post("application/json", "{}"), 415, "invalid_content_type"),
        ("sdp with latin1 charset", post("application/sdp; charset=iso-8859-1", OFFER), 415, "invalid_content_type"),
        ("multipart without boundary", post("multipart/form-data", OFFER), 400, "invalid_content_type"),
        ("boundary of 71 chars", post(&format!("multipart/form-data; boundary={}", "a".repeat(71)), OFFER), 400, "invalid_content_type"),
        ("boundary with '<'", post("multipart/form-data; boundary=a<b", OFFER), 400, "invalid_content_type"),
        ("boundary ending in space", post("multipart/form-data; boundary=\"ab \"", OFFER), 400, "invalid_content_type"),
        ("unterminated quoted boundary", post("multipart/form-data; boundary=\"abc", OFFER), 400, "invalid_content_type"),
        ("empty boundary", post("multipart/form-data; boundary=", OFFER), 400, "invalid_content_type"),
        ("huge content type", post(&format!("application/sdp; x={}", "a".repeat(1000)), OFFER), 400, "invalid_content_type"),
        ("content type with CR LF", post("application/sdp\r\nx-injected: 1", OFFER), 400, "invalid_content_type"),
        // ---- size
        ("declared length over the limit", Req { content_length: Some("1000000000".into()), ..sdp(OFFER) }, 413, "request_too_large"),
        ("declared length not a number", Req { content_length: Some("-1".into()), ..sdp(OFFER) }, 413, "request_too_large"),
        ("body over the limit", sdp(format!("{OFFER}{}", "a=x\r\n".repeat(14000))), 413, "request_too_large"),
        // ---- raw SDP
        ("empty body", sdp(""), 400, "missing_sdp"),
        ("whitespace body", sdp("  \r\n "), 400, "missing_sdp"),
        ("SDP not UTF-8", sdp([b"v=0\r\ns=\xff\xfe\r\n".as_slice()].concat()), 400, "invalid_sdp"),
        ("SDP not starting with v=0", offer_with("v=0\r\n", "o=x\r\nv=0\r\n"), 400, "invalid_sdp"),
        ("SDP v=1", offer_with("v=0", "v=1"), 400, "invalid_sdp"),
        ("truncated SDP", sdp(OFFER.trim_end_matches("\r\n").trim_end_matches("5000")), 400, "invalid_sdp"),
        ("SDP answer (setup:active)", offer_with("a=setup:actpass", "a=setup:active"), 400, "invalid_sdp"),
        ("SDP with only video", sdp("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"), 400, "invalid_sdp"),
        ("SDP with NUL", offer_with("s=-", "s=\0"), 400, "invalid_sdp"),
        ("SDP with a 5000-byte line", offer_with("a=sendrecv\r\n", &big_line), 400, "invalid_sdp"),
        ("SDP without o=", offer_with("o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n", ""), 400, "invalid_sdp"),
        ("SDP with a line that is not x=", offer_with("s=-\r\n", "s=-\r\nhello\r\n"), 400, "invalid_sdp"),
        ("SDP m= with a bad port", offer_with("m=audio 9 ", "m=audio 99999 "), 400, "invalid_sdp"),
        ("SDP with a bare CR inside a line", offer_with("s=-", "s=a\rb"), 400, "invalid_sdp"),
        ("SDP with two v= lines", offer_with("s=-\r\n", "s=-\r\nv=0\r\n"), 400, "invalid_sdp"),
        ("SDP that is HTML", sdp("<html><body>v=0</body></html>\r\n"), 400, "invalid_sdp"),
        // ---- multipart structure
        ("multipart without opening boundary", raw_mp("hello world"), 400, "malformed_multipart"),
        ("multipart truncated before closing boundary", raw_mp(&format!("--{B}\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n{OFFER}")), 400, "malformed_multipart"),
        ("multipart with another boundary", post(MP, build("other", &[("sdp", None, OFFER.as_bytes())])), 400, "malformed_multipart"),
        ("multipart with only a session", form(&[("session", b"{\"model\":\"echo\"}")]), 400, "missing_sdp"),
        ("multipart with two sdp parts", form(&[("sdp", OFFER.as_bytes()), ("sdp", OFFER.as_bytes())]), 400, "duplicate_part"),
        ("multipart with two session parts", form(&[("sdp", OFFER.as_bytes()), ("session", b"{}"), ("session", b"{}")]), 400, "duplicate_part"),
        ("multipart sdp part over its cap", form(&[("sdp", format!("{OFFER}{}", "a=x\r\n".repeat(7000)).as_bytes())]), 400, "part_too_large"),
        ("multipart session part over its cap", session(&format!("{{\"x\":\"{}\"}}", "a".repeat(17000))), 400, "part_too_large"),
        ("part without Content-Disposition", raw_mp(&format!("--{B}\r\nContent-Type: application/sdp\r\n\r\n{OFFER}\r\n--{B}--\r\n")), 400, "malformed_multipart"),
        ("part with attachment disposition", raw_mp(&format!("--{B}\r\nContent-Disposition: attachment; name=\"sdp\"\r\n\r\n{OFFER}\r\n--{B}--\r\n")), 400, "malformed_multipart"),
        ("part with too many headers", raw_mp(&too_many_headers), 400, "malformed_multipart"),
        ("part header without a colon", raw_mp(&format!("--{B}\r\nContent-Disposition form-data\r\n\r\n{OFFER}\r\n--{B}--\r\n")), 400, "malformed_multipart"),
        ("part headers never terminated", raw_mp(&format!("--{B}\r\nContent-Disposition: form-data; name=\"sdp\"\r\n--{B}--\r\n")), 400, "malformed_multipart"),
        ("multipart with bare LF line ends", raw_mp(&format!("--{B}\nContent-Disposition: form-data; name=\"sdp\"\n\n{OFFER}\n--{B}--\n")), 400, "malformed_multipart"),
        ("multipart with too many parts", form(&many_parts), 400, "malformed_multipart"),
        ("multipart with no parts", raw_mp(&format!("--{B}--\r\n")), 400, "malformed_multipart"),
        ("boundary followed by garbage", raw_mp(&format!("--{B}junk\r\n\r\n")), 400, "malformed_multipart"),
        ("header injection in part name", raw_mp(&format!("--{B}\r\nContent-Disposition: form-data; name=\"sdp\r\n\r\n{OFFER}\r\n--{B}--\r\n")), 400, "malformed_multipart"),
        // ---- session JSON
        ("session not JSON", session("{model: gpt}"), 400, "invalid_session_json"),
        ("session a JSON array", session("[1,2]"), 400, "invalid_session_json"),
        ("session a JSON string", session("\"gpt-realtime\""), 400, "invalid_session_json"),
        ("session not UTF-8", form(&[("sdp", OFFER.as_bytes()), ("session", b"{\"model\":\"\xff\"}")]), 400, "invalid_session_json"),
        ("session.model a number", session("{\"model\":5}"), 400, "invalid_session_json"),
        ("session nested 500 deep", session(&format!("{}{}", "[".repeat(500), "]".repeat(500))), 400, "invalid_session_json"),
        ("session with trailing garbage", session("{} {}"), 400, "invalid_session_json"),
        // ---- model
        ("session.model with NUL", session("{\"model\":\"gpt\\u0000realtime\"}"), 400, "invalid_model"),
        ("session.model with newline", session("{\"model\":\"gpt\\nrealtime\"}"), 400, "invalid_model"),
        ("session.model unknown", session("{\"model\":\"gpt-5-ultra\"}"), 404, "model_not_found"),
        ("?model unknown", Req { path: "/v1/realtime/calls?model=nope".into(), ..sdp(OFFER) }, 404, "model_not_found"),
        ("?model with %0A", Req { path: "/v1/realtime/calls?model=a%0Ab".into(), ..sdp(OFFER) }, 400, "invalid_model"),
        ("?model with bad escape", Req { path: "/v1/realtime/calls?model=%zz".into(), ..sdp(OFFER) }, 400, "invalid_model"),
        ("?model twice", Req { path: "/v1/realtime/calls?model=echo&model=gpt-realtime".into(), ..sdp(OFFER) }, 400, "invalid_model"),
        ("?model not UTF-8", Req { path: "/v1/realtime/calls?model=%ff".into(), ..sdp(OFFER) }, 400, "invalid_model"),
        ("model of 200 chars", session(&format!("{{\"model\":\"{}\"}}", "m".repeat(200))), 400, "invalid_model"),
        ("no model and no default", Req { no_default_model: true, ..sdp(OFFER) }, 400, "missing_model"),
        ("blank session.model and no default", Req { no_default_model: true, ..session("{\"model\":\"   \"}") }, 400, "missing_model"),
        // ---- model routes: a prefix matches from the start, exactly, and no catch-all means 404
        ("a name sharing only part of a prefix", routed(false, asking("gpt-realtime-min")), 404, "model_not_found"),
        ("a prefix in another case", routed(false, asking("GPT-REALTIME-MINI-1")), 404, "model_not_found"),
        ("the prefix inside the name", routed(false, asking("x-gpt-realtime-mini-1")), 404, "model_not_found"),
        ("a literal * without a catch-all", routed(false, asking("*")), 404, "model_not_found"),
        ("a literal %2A without a catch-all", routed(false, asking("%2A")), 404, "model_not_found"),
        ("a session.model only a catch-all would take", routed(false, session("{\"model\":\"whisper-1\"}")), 404, "model_not_found"),
        ("under a prefix, a control character", routed(true, asking("gpt-realtime-mini%07")), 400, "invalid_model"),
        ("under a catch-all, a newline", routed(true, asking("whisper%0A1")), 400, "invalid_model"),
        ("under a catch-all, a name of 200 chars", routed(true, session(&format!("{{\"model\":\"{}\"}}", "m".repeat(200)))), 400, "invalid_model"),
        ("under a catch-all, ?model twice", routed(true, asking("a&model=b")), 400, "invalid_model"),
        ("under a catch-all, no model and no default", Req { no_default_model: true, ..routed(true, sdp(OFFER)) }, 400, "missing_model"),
        ("under a catch-all, a session.model number", routed(true, session("{\"model\":7}")), 400, "invalid_session_json"),
        ("under a catch-all, a route to a pool it does not use", Req { route: Some("canary"), authorization: Some(OPS), ..routed(true, asking("whisper-1")) }, 400, "invalid_routing_header"),
        // ---- routing and keys
        ("routing header naming nothing", Req { route: Some("nowhere"), authorization: Some(OPS), ..sdp(OFFER) }, 400, "invalid_routing_header"),
        ("routing header naming another model's worker", Req { route: Some("echo1"), authorization: Some(OPS), ..sdp(OFFER) }, 400, "invalid_routing_header"),
        ("passthrough pool without Authorization", Req { path: "/v1/realtime/calls?model=echo".into(), ..sdp(OFFER) }, 401, "missing_api_key"),
        ("operator key on a passthrough pool (never forwarded)", Req { authorization: Some(OPS), path: "/v1/realtime/calls?model=echo".into(), ..sdp(OFFER) }, 401, "missing_api_key"),
        ("passthrough pool with blank Authorization", Req { authorization: Some("  "), path: "/v1/realtime/calls?model=echo".into(), ..sdp(OFFER) }, 401, "missing_api_key"),
        // ---- GPT-Live sessions
        ("live: not JSON", live("{"), 400, "invalid_json"),
        ("live: JSON array", live("[]"), 400, "invalid_json"),
        ("live: JSON string", live("\"x\""), 400, "invalid_json"),
        ("live: no session", live(&serde_json::json!({"transport": {"type": "webrtc", "sdp": OFFER}}).to_string()), 400, "missing_session"),
        ("live: session not an object", live(&serde_json::json!({"session": "gpt-live-1", "transport": {"type": "webrtc", "sdp": OFFER}}).to_string()), 400, "invalid_session"),
        ("live: no transport", live(r#"{"session": {"model": "gpt-live-1"}}"#), 400, "missing_transport"),
        ("live: transport not an object", live(r#"{"session": {"model": "gpt-live-1"}, "transport": "webrtc"}"#), 400, "invalid_transport"),
        ("live: websocket transport", live(&serde_json::json!({"session": {"model": "gpt-live-1"}, "transport": {"type": "websocket", "sdp": OFFER}}).to_string()), 400, "unsupported_transport"),
        ("live: no sdp", live(r#"{"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc"}}"#), 400, "missing_sdp"),
        ("live: empty sdp", live(r#"{"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc", "sdp": ""}}"#), 400, "missing_sdp"),
        ("live: sdp not an offer", live(r#"{"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc", "sdp": "hello"}}"#), 400, "invalid_sdp"),
        ("live: no model", live_with("{}"), 400, "missing_model"),
        ("live: model with a control character", live_with(r#"{"model": "gpt\nlive"}"#), 400, "invalid_model"),
        ("live: model of 200 chars", live_with(&format!("{{\"model\": \"{}\"}}", "m".repeat(200))), 400, "invalid_model"),
        ("live: unknown model", live_with(r#"{"model": "gpt-live-9"}"#), 404, "model_not_found"),
        ("live: a Realtime model", live_with(r#"{"model": "gpt-realtime"}"#), 404, "model_not_found"),
        ("realtime: a Live model", Req { path: "/v1/realtime/calls?model=gpt-live-1".into(), ..sdp(OFFER) }, 404, "model_not_found"),
        ("live: SDP content type", Req { path: "/v1/live/sessions".into(), ..sdp(OFFER) }, 415, "invalid_content_type"),
        ("live: no content type", Req { content_type: None, ..live_with(r#"{"model": "gpt-live-1"}"#) }, 400, "invalid_content_type"),
        ("live: body too large", Req { content_length: Some("999999999".into()), ..live_with(r#"{"model": "gpt-live-1"}"#) }, 413, "request_too_large"),
        ("live: GET", Req { method: "GET", ..live_with(r#"{"model": "gpt-live-1"}"#) }, 405, "method_not_allowed"),
        ("live: accept (SIP only)", at("/v1/live/sessions/live_0123456789abcdef0123456789abcdef/accept"), 400, "not_a_sip_session"),
        ("live: refer (SIP only)", at("/v1/live/sessions/live_0123456789abcdef0123456789abcdef/refer"), 400, "not_a_sip_session"),
        ("live: unknown verb", at("/v1/live/sessions/live_0123456789abcdef0123456789abcdef/frob"), 404, "not_found"),
        ("live: attach is a WebSocket GET", at("/v1/live/sessions/live_0123456789abcdef0123456789abcdef/attach"), 405, "method_not_allowed"),
        ("sideband: POST", at("/v1/realtime?call_id=rtc_0123456789abcdef0123456789abcdef"), 405, "method_not_allowed"),
        ("live: fork", at("/v1/live/sessions/live_0123456789abcdef0123456789abcdef/fork"), 400, "unsupported_session_control"),
        ("live: a path that only starts like the sessions path", at("/v1/live/sessionsx"), 404, "not_found"),
        ("live: hangup of an rtc_ id", at("/v1/live/sessions/rtc_0123456789abcdef0123456789abcdef/hangup"), 404, "call_not_found"),
        ("realtime: hangup of a live_ id", at("/v1/realtime/calls/live_0123456789abcdef0123456789abcdef/hangup"), 404, "call_not_found"),
        // ---- browser pages the gateway does not trust (a simple POST needs no preflight)
        ("multipart create from an unlisted origin", Req { origin: Some("https://evil.example.test"), ..form(&[("sdp", OFFER.as_bytes())]) }, 403, "origin_not_allowed"),
        ("sdp create from an unlisted origin", Req { origin: Some("https://evil.example.test"), ..sdp(OFFER) }, 403, "origin_not_allowed"),
        ("create from a listed host on another port", Req { origin: Some("https://app.example.test:8443"), ..sdp(OFFER) }, 403, "origin_not_allowed"),
        ("create from a listed host over http", Req { origin: Some("http://app.example.test"), ..sdp(OFFER) }, 403, "origin_not_allowed"),
        ("create from a suffix of the gateway's host", Req { origin: Some("https://gw.example.test.evil.test"), ..sdp(OFFER) }, 403, "origin_not_allowed"),
        ("create from the null origin", Req { origin: Some("null"), ..sdp(OFFER) }, 403, "origin_not_allowed"),
        ("hangup from an unlisted origin", Req { origin: Some("https://evil.example.test"), ..at("/v1/realtime/calls/rtc_abc/hangup") }, 403, "origin_not_allowed"),
        ("unknown path from an unlisted origin", Req { origin: Some("https://evil.example.test"), ..at("/v1/realtime/calls/x") }, 403, "origin_not_allowed"),
    ]
}

#[test]
fn malformed_and_hostile_inputs_get_their_status_and_code_and_never_reach_the_relay() {
    let cases = cases();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for (name, req, status, code) in &cases {
        match run(req) {
            Ok(_) => failures.push(format!("{name}: accepted, want {status} {code}")),
            Err(e) => {
                if e.status != *status || e.code != *code {
                    failures.push(format!(
                        "{name}: got {} {} ({}), want {status} {code}",
                        e.status, e.code, e.json
                    ));
                }
                if let Some(obj) = e.json["error"].as_object() {
                    assert_eq!(obj.len(), 4, "{name}");
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing rows:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn well_formed_requests_are_planned() {
    let ok = [
        ("raw SDP, default model", sdp(OFFER)),
        (
            "raw SDP, ?model alias",
            Req {
                path: "/v1/realtime/calls?model=gpt-4o-realtime-preview".into(),
                ..sdp(OFFER)
            },
        ),
        (
            "multipart with session",
            session("{\"model\":\" gpt-realtime \",\"voice\":\"alloy\"}"),
        ),
        (
            "multipart without session",
            form(&[("sdp", OFFER.as_bytes())]),
        ),
        (
            "multipart with LF-only SDP",
            form(&[("sdp", OFFER.replace("\r\n", "\n").as_bytes())]),
        ),
        (
            "passthrough with client key",
            Req {
                authorization: Some("Bearer sk-client"),
                path: "/v1/realtime/calls?model=echo".into(),
                ..sdp(OFFER)
            },
        ),
        (
            "routing header to a canary pool",
            Req {
                route: Some("canary"),
                authorization: Some(OPS),
                ..sdp(OFFER)
            },
        ),
        (
            "routing header from an untrusted caller: ignored",
            Req {
                route: Some("nowhere"),
                ..sdp(OFFER)
            },
        ),
        (
            "a Live session",
            live_with(r#"{"model": "gpt-live-1", "instructions": "be brief"}"#),
        ),
        (
            "multipart from a listed origin",
            Req {
                origin: Some("https://app.example.test"),
                ..form(&[("sdp", OFFER.as_bytes())])
            },
        ),
        (
            "from the gateway's own page",
            Req {
                origin: Some("https://gw.example.test"),
                ..sdp(OFFER)
            },
        ),
        (
            "a model under a prefix",
            routed(false, asking("gpt-realtime-mini-2099-01-01")),
        ),
        (
            "an unlisted model under a catch-all",
            Req {
                authorization: Some("Bearer sk-client"),
                ..routed(true, asking("whisper-1"))
            },
        ),
    ];
    for (name, req) in ok {
        let sent = run(&req).unwrap_or_else(|e| panic!("{name}: {} {}", e.status, e.json));
        assert!(
            realtime_relay_proto::call_id::is_valid(&sent.call_id),
            "{name}"
        );
    }
}

#[test]
fn the_create_message_carries_model_key_and_session() {
    let cfg = sample();
    let store = MemoryStore::default();
    let req = session("{\"model\":\"gpt-4o-realtime-preview\"}");
    let kind = check_create_headers(&cfg, req.content_type.as_deref(), None).unwrap();
    let offer = validate_create_body(&cfg, &kind, None, &req.body, None).unwrap();
    // Route to worker b (upstream_model override) with the replace-free inject policy.
    let anonymous = crate::identity::Caller::Anonymous;
    let req9 = CreateRequest {
        offer: &offer,
        caller: &anonymous,
        authorization: None,
        routing_value: Some("b"),
        call_random: &[1; 16],
        request_id: "req-9",
    };
    let plan = plan_create(&cfg, &req9, &store, 0).unwrap();
    let m = CreateCallRequest::decode(plan.message.as_slice()).unwrap();
    assert_eq!(m.call_id, plan.call_id);
    assert_eq!(m.model, "gpt-4o-realtime-preview");
    assert_eq!(m.upstream_model, "gpt-realtime-2025");
    assert_eq!(m.session_json, "{\"model\":\"gpt-4o-realtime-preview\"}");
    assert_eq!(m.request_id, "req-9");
    let up = m.upstream.unwrap();
    assert_eq!(up.authorization, "Bearer sk-bbb");
    assert_eq!(up.worker_id, "b");
    assert_eq!(up.base_url, "https://api2.example.com");
    // The replace policy drops the client's key.
    let own_key = crate::identity::resolve(&cfg, Some("Bearer sk-client"), None, 0).unwrap();
    let client = CreateRequest {
        caller: &own_key,
        authorization: Some("Bearer sk-client"),
        routing_value: Some("canary"),
        call_random: &[2; 16],
        request_id: "r",
        ..req9
    };
    let plan = plan_create(&cfg, &client, &store, 0).unwrap();
    let m = CreateCallRequest::decode(plan.message.as_slice()).unwrap();
    assert_eq!(m.upstream.unwrap().authorization, "Bearer sk-aaa");
}

/// Which model goes upstream: the entry's name for an exact name or alias, the name asked
/// for through a prefix or the catch-all, and the worker's `upstream_model` over either.
#[test]
fn the_upstream_model_is_the_entrys_name_or_the_name_asked_for_unless_the_worker_sets_one() {
    // (request, routing header, worker, model sent as `model`, model sent as `upstream_model`)
    let with_session = |m: &str| session(&format!("{{\"model\":\"{m}\"}}"));
    #[rustfmt::skip]
    let rows: Vec<(Req, Option<&str>, &str, &str, &str)> = vec![
        (asking("gpt-realtime"), Some("a"), "a", "gpt-realtime", "gpt-realtime"),
        (asking("gpt-4o-realtime-preview"), Some("a"), "a", "gpt-4o-realtime-preview", "gpt-realtime"),
        (asking("gpt-4o-realtime-preview"), Some("b"), "b", "gpt-4o-realtime-preview", "gpt-realtime-2025"),
        (asking("gpt-realtime-mini-2099-01-01"), Some("a"), "a", "gpt-realtime-mini-2099-01-01", "gpt-realtime-mini-2099-01-01"),
        (asking("gpt-realtime-mini-2099-01-01"), Some("b"), "b", "gpt-realtime-mini-2099-01-01", "gpt-realtime-2025"),
        (with_session(" gpt-realtime-mini-x "), Some("a"), "a", "gpt-realtime-mini-x", "gpt-realtime-mini-x"),
        (asking("gpt-realtime-mini*"), Some("a"), "a", "gpt-realtime-mini*", "gpt-realtime-mini*"),
        (asking("whisper-1"), None, "echo1", "whisper-1", "whisper-1"),
        (with_session("some/model:v2"), None, "echo1", "some/model:v2", "some/model:v2"),
        (asking("%2A"), None, "echo1", "*", "*"),
    ];
    for (req, route, worker, model, upstream) in rows {
        // A routing header counts from a trusted caller; unrouted rows use the client's key.
        let req = Req {
            route,
            authorization: Some(if route.is_some() {
                OPS
            } else {
                "Bearer sk-client"
            }),
            ..routed(true, req)
        };
        let name = format!("{} {:?}", req.path, route);
        let sent = run(&req).unwrap_or_else(|e| panic!("{name}: {} {}", e.status, e.json));
        assert_eq!(sent.upstream.unwrap().worker_id, worker, "{name}");
        assert_eq!(sent.model, model, "{name}");
        assert_eq!(sent.upstream_model, upstream, "{name}");
    }
}

/// Metrics stay bounded: a model name a client made up (routed by the catch-all or a
/// prefix) never becomes part of a metric's name, whatever the relay answers.
#[test]
fn models_routed_by_a_pattern_name_no_metric() {
    use prost::Message as _;
    use realtime_relay_proto::v1::{
        create_call_response::Outcome, CreateCallResponse, UpstreamRejection,
    };
    let answers = [
        Outcome::SdpAnswer("v=0\r\n".into()),
        Outcome::UpstreamRejection(UpstreamRejection {
            status: 400,
            content_type: "application/json".into(),
            body: br#"{"error":{"code":"model_not_found"}}"#.to_vec(),
        }),
    ];
    let models = [
        "made-up-model-1",
        "made-up-model-2",
        "gpt-realtime-mini-zz9",
    ];
    let mut names_after = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for model in models {
        for answer in &answers {
            let req = Req {
                authorization: Some("Bearer sk-client"),
                ..routed(true, asking(model))
            };
            let mut host = FakeHost::request(
                &[
                    (":method", "POST"),
                    (":path", req.path.as_str()),
                    (":authority", "gw.example.test"),
                    ("content-type", "application/sdp"),
                    ("authorization", "Bearer sk-client"),
                ],
                &req.body,
            );
            let mut flow = Flow::new(Rc::new(config_of(&req)));
            assert_eq!(flow.on_headers(&mut host, false), Action::Pause);
            flow.on_body(&mut host, req.body.len(), true);
            let d = host.last_dispatch().clone();
            let call_id = CreateCallRequest::decode(d.message.as_slice())
                .unwrap()
                .call_id;
            let body = CreateCallResponse {
                call_id,
                outcome: Some(answer.clone()),
            }
            .encode_to_vec();
            flow.on_grpc_response(&mut host, d.token, 0, None, Some(&body));
            assert!(!host.replies.is_empty(), "{model}: answered");
            names.extend(host.metric_names());
        }
        names_after.push(names.clone());
    }
    for n in &names {
        for m in models {
            assert!(!n.contains(m), "metric {n} names the model {m}");
        }
    }
    assert!(!names.is_empty(), "the flow counted something");
    // The second made-up model on the same worker adds no metric to the first one's.
    assert_eq!(
        names_after.first(),
        names_after.get(1),
        "another model, no other metric"
    );
}
