//! The filter's request handling end to end, on the in-memory host the unit tests use: any
//! method, path, headers and body, through the whole lifecycle (headers, body, the relay's
//! answer). Both APIs, multipart, content types, SDP checks, model and call-id grammars,
//! hangup and sideband paths, client secrets. Properties:
//! - no panic;
//! - every reply the filter sends itself is OpenAI-shaped: an error status carries JSON
//!   `{"error": {message, type, param, code}}` with a non-empty code;
//! - a reply never echoes the request's credential;
//! - a `CreateCall` it dispatches is well formed: a call id of the contract's grammar, an SDP
//!   offer that starts `v=0`, a model.
//!
//! Input layout: line 1 `METHOD PATH`, then `name: value` header lines, an empty line, the
//! body (so seeds are readable requests).
#![no_main]

use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use realtime_filter_core::fake_host::FakeHost;
use realtime_filter_core::host::Action;
use realtime_filter_core::{Config, Flow};
use realtime_relay_proto::v1::CreateCallRequest;

const CONFIG: &str = r#"{
    "relay_cluster": "relay",
    "browser_origins": ["https://app.example.test"],
    "callers": {
        "api_keys": [{"name": "backend", "key_env": "BACKEND_KEY", "operator": true}],
        "ephemeral_keys": {"gateway": "fuzz", "key_envs": ["EPHEMERAL_SIGNING_KEY"]}
    },
    "default_model": "gpt-realtime",
    "routing_header": "x-realtime-route",
    "models": [
        {"name": "gpt-realtime", "aliases": ["gpt-4o-realtime-preview"], "pools": ["main"]},
        {"name": "gpt-live-1", "api": "live", "pools": ["main"]},
        {"name": "gpt-realtime-mini*", "pools": ["main"]}
    ],
    "pools": [{"name": "main", "callers": ["anonymous", "api_key", "ephemeral"],
               "budget": {"tokens_per_call": 1000},
               "limits": {"calls_per_caller": 5, "creates_per_minute": 50},
               "workers": [{"id": "w1", "base_url": "https://api.example", "key_env": "OPENAI_API_KEY",
                            "cluster": "worker_w1"}]}]
}"#;

const WORKER_KEY: &str = "sk-fuzz-worker-key-0123456789";

fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_API_KEY" => Some(WORKER_KEY.into()),
        "BACKEND_KEY" => Some("sk-fuzz-backend-key-0123456789".into()),
        "EPHEMERAL_SIGNING_KEY" => Some("fuzz-signing-key-0123456789abcdef0123456789".into()),
        _ => None,
    }
}

thread_local! {
    static CONFIG_RC: Rc<Config> = Rc::new(Config::from_json(CONFIG.as_bytes(), &env).expect("the fuzz config"));
}

/// Whether any string or object key in `v` contains `needle`.
fn contains_in_strings(v: &serde_json::Value, needle: &str) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains(needle),
        Value::Array(a) => a.iter().any(|x| contains_in_strings(x, needle)),
        Value::Object(m) => m
            .iter()
            .any(|(k, x)| k.contains(needle) || contains_in_strings(x, needle)),
        _ => false,
    }
}

/// `input`: the whole request. The worker key counts as echoed only when the request did
/// not carry it (a client that sends it already has it); the caller's own credential is
/// always scrubbed from replies, wherever the request put it.
fn check_reply(host: &FakeHost, credential: Option<&str>, json_errors: bool, input: &[u8]) {
    let worker_key = Some(WORKER_KEY)
        .filter(|k| !input.windows(k.len()).any(|w| w == k.as_bytes()));
    for r in &host.replies {
        assert!((100..600).contains(&r.status), "status {}", r.status);
        let text = String::from_utf8_lossy(&r.body);
        for secret in [worker_key, credential].into_iter().flatten() {
            if secret.len() >= 12 {
                // In a JSON reply, an echo is a string (or key) that contains the secret; a
                // "secret" spelled with the reply's own punctuation and fixed words, spanning
                // several strings, is a coincidence, not an echo.
                let echoed = match serde_json::from_slice::<serde_json::Value>(&r.body) {
                    Ok(v) => contains_in_strings(&v, secret),
                    Err(_) => text.contains(secret),
                };
                assert!(!echoed, "a reply echoes a credential: {text}");
            }
        }
        if json_errors && r.status >= 400 {
            let v: serde_json::Value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("error reply is not JSON ({e}): {text}"));
            let e = v["error"].as_object().expect("an error object");
            for k in ["message", "type", "param", "code"] {
                assert!(e.contains_key(k), "{k} missing: {text}");
            }
            assert!(e["code"].as_str().is_some_and(|c| !c.is_empty()), "{text}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let mut lines = head.lines();
    let Some((method, path)) = lines.next().and_then(|l| l.split_once(' ')) else {
        return;
    };
    let mut headers = vec![
        (":method".to_string(), method.to_string()),
        (":path".to_string(), path.to_string()),
    ];
    for l in lines {
        if let Some((k, v)) = l.split_once(": ") {
            headers.push((k.to_ascii_lowercase(), v.to_string()));
        }
    }
    // The value the host hands the filter: with repeated headers, the in-memory host keeps
    // the last one, and that is the credential the filter scrubs from its replies.
    let credential = headers
        .iter()
        .rev()
        .find(|(k, _)| k == "authorization")
        .and_then(|(_, v)| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut host = FakeHost::request(&refs, body);
    let config = CONFIG_RC.with(Rc::clone);
    let mut flow = Flow::new(config);
    let action = flow.on_headers(&mut host, body.is_empty());
    if action == Action::Pause && host.replies.is_empty() && host.dispatched.is_empty() {
        flow.on_body(&mut host, body.len(), true);
    }
    check_reply(&host, credential.as_deref(), true, data);
    // What reached the relay, if anything: a well-formed create; then any answer to it.
    if let Some(d) = host.dispatched.last().cloned() {
        if d.method == "CreateCall" {
            let req = CreateCallRequest::decode(d.message.as_slice()).expect("a CreateCallRequest");
            assert!(
                realtime_relay_proto::call_id::is_valid(&req.call_id),
                "{}",
                req.call_id
            );
            assert!(
                req.sdp_offer.starts_with("v=0"),
                "offer {:?}",
                req.sdp_offer
            );
            assert!(!req.model.is_empty());
        }
        // The relay answers with whatever the input's last bytes say.
        let status = u32::from(body.last().copied().unwrap_or(0) % 17);
        flow.on_grpc_response(
            &mut host,
            d.token,
            status,
            Some("fuzz: relay said no"),
            Some(body),
        );
        // An OK answer may carry a provider's rejection, passed on verbatim (not the filter's
        // JSON), and whatever bytes the input gave it (so a credential the input also holds).
        let echoed_by_input = credential
            .as_deref()
            .is_some_and(|c| body.windows(c.len().max(1)).any(|w| w == c.as_bytes()));
        let cred = credential.as_deref().filter(|_| !echoed_by_input);
        check_reply(&host, cred, status != 0, data);
    }
    flow.on_done(&mut host);
});
