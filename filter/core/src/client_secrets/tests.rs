//! Client secrets through the request lifecycle on a fake host: minting (shape, lifetimes,
//! validation, who may mint), and what a minted key does when it opens a call (its model
//! pin, its session settings, its expiry).

use std::rc::Rc;

use prost::Message;
use realtime_relay_proto::v1::CreateCallRequest;
use serde_json::{json, Value};

use super::*;
use crate::callers::key_hash_hex;
use crate::config::tests::{env, sample, SAMPLE};
use crate::fake_host::FakeHost;
use crate::flow::Flow;
use crate::host::Action;
use crate::identity::principal_of;
use crate::metrics;
use crate::sdp::tests::OFFER;

const EK_SECRET: &str = "ephemeral-signing-key-for-tests-0123456789";
const BACKEND: &str = "Bearer sk-gw-backend";
const APP: &str = "Bearer sk-gw-app";
/// The fake host's clock (`FakeHost::request`), in seconds.
const NOW_S: u64 = 1_000;

/// The sample with callers (an operator key, a plain key, JWT principals, ephemeral keys)
/// and a prefix entry `gpt-realtime-mini*` on pool main, which admits ephemeral keys.
fn config() -> Config {
    let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
    v["callers"] = json!({
        "api_keys": [
            {"name": "backend", "sha256": key_hash_hex("sk-gw-backend"), "operator": true},
            {"name": "app", "sha256": key_hash_hex("sk-gw-app")}
        ],
        "jwt": {"payload_key": "jwt_payload"},
        "ephemeral_keys": {"gateway": "gw-test", "key_envs": ["EK_SECRET"]}
    });
    v["models"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "gpt-realtime-mini*", "pools": ["main"]}));
    let env = |name: &str| match name {
        "EK_SECRET" => Some(EK_SECRET.to_string()),
        other => env(other),
    };
    Config::from_json(v.to_string().as_bytes(), &env).unwrap()
}

fn jwt_path(config: &Config) -> Vec<String> {
    let jwt = config.callers.jwt.as_ref().unwrap();
    jwt.property_path().iter().map(|s| s.to_string()).collect()
}

/// `POST /v1/realtime/client_secrets` with this credential (and JWT subject) and JSON body.
fn mint_request(config: &Config, auth: Option<&str>, jwt: Option<&str>, body: &str) -> FakeHost {
    let mut headers = vec![
        (":method", "POST"),
        (":path", "/v1/realtime/client_secrets"),
        ("content-type", "application/json"),
        ("x-request-id", "req-mint"),
    ];
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    let mut host = FakeHost::request(&headers, body.as_bytes());
    if let Some(sub) = jwt {
        host.properties
            .insert(jwt_path(config), sub.as_bytes().to_vec());
    }
    host
}

/// Headers, then the whole body unless the headers were answered.
fn run(config: &Rc<Config>, host: &mut FakeHost) {
    let mut flow = Flow::new(Rc::clone(config));
    let empty = host.body.is_empty();
    let action = flow.on_headers(host, empty);
    if action == Action::Pause && host.replies.is_empty() {
        let size = host.body.len();
        assert_eq!(flow.on_body(host, size, true), Action::Pause);
    }
    assert_eq!(host.replies.len(), 1, "one reply");
}

fn reply_json(host: &FakeHost) -> Value {
    serde_json::from_slice(&host.last_reply().body).unwrap()
}

/// (status, code, param) of an error reply.
fn refusal(host: &FakeHost) -> (u16, String, Option<String>) {
    let v = reply_json(host);
    let e = &v["error"];
    (
        host.last_reply().status,
        e["code"].as_str().unwrap_or_default().to_string(),
        e["param"].as_str().map(str::to_string),
    )
}

/// Mints through the lifecycle as the backend; the key.
fn mint(config: &Rc<Config>, body: Value) -> String {
    let mut host = mint_request(config, Some(BACKEND), None, &body.to_string());
    run(config, &mut host);
    assert_eq!(host.last_reply().status, 200, "{}", reply_json(&host));
    reply_json(&host)["value"].as_str().unwrap().to_string()
}

/// A create with this key: raw SDP with `path` (query and all), or multipart with `session`.
fn create_with(
    config: &Rc<Config>,
    key: &str,
    path: &str,
    session: Option<&str>,
    now_s: u64,
) -> FakeHost {
    let auth = format!("Bearer {key}");
    let (ct, body) = match session {
        None => ("application/sdp".to_string(), OFFER.as_bytes().to_vec()),
        Some(s) => (
            "multipart/form-data; boundary=XyZ".to_string(),
            rtc_peer::multipart::build(
                "XyZ",
                &[
                    ("sdp", Some("application/sdp"), OFFER.as_bytes()),
                    ("session", Some("application/json"), s.as_bytes()),
                ],
            ),
        ),
    };
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", path),
            ("content-type", &ct),
            ("authorization", &auth),
        ],
        &body,
    );
    host.now_ms = now_s * 1000;
    let mut flow = Flow::new(Rc::clone(config));
    if flow.on_headers(&mut host, false) == Action::Pause && host.replies.is_empty() {
        let size = host.body.len();
        flow.on_body(&mut host, size, true);
    }
    host
}

fn sent(host: &FakeHost) -> CreateCallRequest {
    assert_eq!(host.dispatched.len(), 1, "replies: {:?}", host.replies);
    CreateCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap()
}

#[test]
fn a_minted_key_has_openais_shape_and_carries_its_claims() {
    let config = Rc::new(config());
    let body = json!({
        "expires_after": {"anchor": "created_at", "seconds": 120},
        "session": {"type": "realtime", "model": " gpt-realtime ", "instructions": "be brief",
                    "audio": {"output": {"voice": "alloy"}}}
    });
    let mut host = mint_request(&config, Some(BACKEND), None, &body.to_string());
    run(&config, &mut host);
    let r = host.last_reply();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("x-request-id"), Some("req-mint"));
    let v = reply_json(&host);
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["expires_at", "session", "value"]);
    let key = v["value"].as_str().unwrap();
    assert!(key.starts_with("ek_"), "{key}");
    assert_eq!(v["expires_at"], NOW_S + 120);
    let s = &v["session"];
    assert_eq!(
        (&s["type"], &s["object"], &s["model"], &s["instructions"]),
        (
            &json!("realtime"),
            &json!("realtime.session"),
            &json!("gpt-realtime"),
            &json!("be brief")
        )
    );
    assert!(s["id"].as_str().unwrap().starts_with("sess_"), "{s}");
    assert_eq!(s["audio"]["output"]["voice"], "alloy");
    // The claims: the minting backend's principal, the model, the times, the settings.
    let claims = config
        .callers
        .ephemeral
        .as_ref()
        .unwrap()
        .verify(key, NOW_S)
        .unwrap();
    assert_eq!(claims.sub, principal_of("api_key", "backend"));
    assert_eq!(claims.mdl.as_deref(), Some("gpt-realtime"));
    assert_eq!((claims.iat, claims.exp), (NOW_S, NOW_S + 120));
    let ses = claims.ses.unwrap();
    assert_eq!(ses["instructions"], "be brief");
    assert!(!ses.contains_key("model"), "the model is the pin: {ses:?}");
    // Counted, answered here, and the key is in the answer only.
    assert_eq!(host.counter(metrics::REQ_CLIENT_SECRETS), 1);
    assert!(host.dispatched.is_empty());
    assert!(!host.log_text().contains(key), "{}", host.log_text());
    assert!(!host.log_text().contains("sk-gw-backend"));
}

#[test]
fn lifetimes_default_to_600_s_and_stay_within_10_to_7200() {
    let config = Rc::new(config());
    // expires_after → the key's lifetime, or (status, code, param)
    #[rustfmt::skip]
    type Refusal = (u16, &'static str, &'static str);
    let rows: Vec<(Option<Value>, Result<u64, Refusal>)> = vec![
        (None, Ok(600)),
        (Some(json!(null)), Ok(600)),
        (Some(json!({})), Ok(600)),
        (Some(json!({"anchor": "created_at"})), Ok(600)),
        (Some(json!({"seconds": 10})), Ok(10)),
        (
            Some(json!({"anchor": "created_at", "seconds": 7200})),
            Ok(7200),
        ),
        (
            Some(json!({"seconds": 9})),
            Err((400, "integer_below_min_value", "expires_after.seconds")),
        ),
        (
            Some(json!({"seconds": 0})),
            Err((400, "integer_below_min_value", "expires_after.seconds")),
        ),
        (
            Some(json!({"seconds": -600})),
            Err((400, "integer_below_min_value", "expires_after.seconds")),
        ),
        (
            Some(json!({"seconds": 7201})),
            Err((400, "integer_above_max_value", "expires_after.seconds")),
        ),
        (
            Some(json!({"seconds": u64::MAX})),
            Err((400, "integer_above_max_value", "expires_after.seconds")),
        ),
        (
            Some(json!({"seconds": 60.5})),
            Err((400, "invalid_type", "expires_after.seconds")),
        ),
        (
            Some(json!({"seconds": "600"})),
            Err((400, "invalid_type", "expires_after.seconds")),
        ),
        (
            Some(json!({"anchor": "now", "seconds": 60})),
            Err((400, "invalid_value", "expires_after.anchor")),
        ),
        (
            Some(json!({"anchor": 1})),
            Err((400, "invalid_type", "expires_after.anchor")),
        ),
        (
            Some(json!({"seconds": 60, "unit": "s"})),
            Err((400, "unknown_parameter", "expires_after.unit")),
        ),
        (
            Some(json!(600)),
            Err((400, "invalid_type", "expires_after")),
        ),
    ];
    for (expires_after, want) in rows {
        let mut body = json!({"session": {"type": "realtime"}});
        if let Some(e) = &expires_after {
            body["expires_after"] = e.clone();
        }
        let mut host = mint_request(&config, Some(BACKEND), None, &body.to_string());
        run(&config, &mut host);
        match want {
            Ok(ttl) => {
                assert_eq!(host.last_reply().status, 200, "{expires_after:?}");
                assert_eq!(
                    reply_json(&host)["expires_at"],
                    NOW_S + ttl,
                    "{expires_after:?}"
                );
            }
            Err((status, code, param)) => {
                assert_eq!(
                    refusal(&host),
                    (status, code.to_string(), Some(param.to_string())),
                    "{expires_after:?}"
                );
                assert_eq!(host.count(metrics::REQ_CLIENT_SECRETS), 0);
            }
        }
    }
}

#[test]
fn malformed_requests_get_openai_errors_naming_the_parameter() {
    let config = Rc::new(config());
    let big = "x".repeat(crate::ephemeral::MAX_SESSION_BYTES);
    let rows: Vec<(String, u16, &str, Option<&str>)> = vec![
        ("not json".into(), 400, "invalid_json", None),
        ("[1, 2]".into(), 400, "invalid_json", None),
        (r#""realtime""#.into(), 400, "invalid_json", None),
        (
            json!({"model": "gpt-realtime"}).to_string(),
            400,
            "unknown_parameter",
            Some("model"),
        ),
        (
            json!({"session": []}).to_string(),
            400,
            "invalid_type",
            Some("session"),
        ),
        (
            json!({"session": {"model": "gpt-realtime"}}).to_string(),
            400,
            "missing_required_parameter",
            Some("session.type"),
        ),
        (
            json!({"session": {"type": "transcription"}}).to_string(),
            400,
            "invalid_value",
            Some("session.type"),
        ),
        (
            json!({"session": {"type": 1}}).to_string(),
            400,
            "invalid_type",
            Some("session.type"),
        ),
        (
            json!({"session": {"type": "realtime", "model": 5}}).to_string(),
            400,
            "invalid_type",
            Some("session.model"),
        ),
        (
            json!({"session": {"type": "realtime", "model": "  "}}).to_string(),
            400,
            "invalid_model",
            Some("session.model"),
        ),
        (
            json!({"session": {"type": "realtime", "model": "gpt\u{7}x"}}).to_string(),
            400,
            "invalid_model",
            Some("session.model"),
        ),
        (
            json!({"session": {"type": "realtime", "model": "whisper-1"}}).to_string(),
            404,
            "model_not_found",
            Some("session.model"),
        ),
        (
            json!({"session": {"type": "realtime", "instructions": big}}).to_string(),
            400,
            "session_too_large",
            Some("session"),
        ),
    ];
    for (body, status, code, param) in rows {
        let mut host = mint_request(&config, Some(BACKEND), None, &body);
        run(&config, &mut host);
        let got = refusal(&host);
        assert_eq!(
            got,
            (status, code.to_string(), param.map(str::to_string)),
            "{body:.80}"
        );
        let v = reply_json(&host);
        for k in ["message", "type", "param", "code"] {
            assert!(v["error"].get(k).is_some(), "{k} missing: {v}");
        }
        assert!(host.dispatched.is_empty());
        assert_eq!(host.count(metrics::REQ_CLIENT_SECRETS), 0);
    }
    // An empty body is every default: 600 s, no model pinned, a realtime session.
    let mut host = mint_request(&config, Some(BACKEND), None, "");
    run(&config, &mut host);
    let v = reply_json(&host);
    assert_eq!(v["expires_at"], NOW_S + 600);
    assert_eq!(v["session"]["type"], "realtime");
    assert!(v["session"].get("model").is_none(), "{v}");
    // Only JSON; a declared body over the limit is refused before it arrives.
    let mut host = mint_request(&config, Some(BACKEND), None, "{}");
    host.headers
        .insert("content-type".into(), "text/plain".into());
    run(&config, &mut host);
    assert_eq!(refusal(&host).0, 415);
    assert_eq!(refusal(&host).1, "invalid_content_type");
    let mut host = mint_request(&config, Some(BACKEND), None, "{}");
    host.headers
        .insert("content-length".into(), "10000000".into());
    let mut flow = Flow::new(Rc::clone(&config));
    assert_eq!(flow.on_headers(&mut host, false), Action::Pause);
    assert_eq!(refusal(&host).1, "request_too_large");
}

#[test]
fn only_a_backend_credential_mints() {
    let config = Rc::new(config());
    let key = mint(&config, json!({"session": {"type": "realtime"}}));
    let expired = mint(&config, json!({"expires_after": {"seconds": 10}}));
    let expired_auth = format!("Bearer {expired}");
    let key_auth = format!("Bearer {key}");
    // (Authorization, JWT subject) → Ok(principal owning the key) or Err((status, code))
    type Outcome = Result<String, (u16, &'static str)>;
    let rows: Vec<(Option<&str>, Option<&str>, Outcome)> = vec![
        (Some(BACKEND), None, Ok(principal_of("api_key", "backend"))),
        (Some(APP), None, Ok(principal_of("api_key", "app"))),
        (
            None,
            Some("alice@example.test"),
            Ok(principal_of("jwt", "alice@example.test")),
        ),
        (None, None, Err((401, "missing_api_key"))),
        (
            Some("Bearer sk-provider-own-key"),
            None,
            Err((401, "invalid_api_key")),
        ),
        (Some(&key_auth), None, Err((403, "caller_not_allowed"))),
        (Some(&expired_auth), None, Err((401, "invalid_api_key"))),
    ];
    for (auth, jwt, want) in rows {
        let mut host = mint_request(&config, auth, jwt, r#"{"session": {"type": "realtime"}}"#);
        host.now_ms = (NOW_S + 11) * 1000;
        run(&config, &mut host);
        let at = format!("{:.24} {jwt:?}", auth.unwrap_or("-"));
        match want {
            Ok(principal) => {
                assert_eq!(host.last_reply().status, 200, "{at}");
                let minted = reply_json(&host)["value"].as_str().unwrap().to_string();
                let claims = config
                    .callers
                    .ephemeral
                    .as_ref()
                    .unwrap()
                    .verify(&minted, NOW_S + 11)
                    .unwrap();
                assert_eq!(claims.sub, principal, "{at}");
            }
            Err((status, code)) => {
                let (s, c, _) = refusal(&host);
                assert_eq!((s, c.as_str()), (status, code), "{at}");
                let body = String::from_utf8_lossy(&host.last_reply().body).into_owned();
                assert!(!body.contains("ek_") && !body.contains("sk-"), "{body}");
            }
        }
        assert!(host.dispatched.is_empty());
    }
}

#[test]
fn without_ephemeral_keys_the_path_is_404_and_other_methods_are_405() {
    let config = Rc::new(sample());
    let mut host = mint_request(&config, Some("Bearer sk-gw-ops"), None, "{}");
    run(&config, &mut host);
    assert_eq!(
        refusal(&host),
        (404, "client_secrets_not_enabled".into(), None)
    );
    let config = Rc::new(self::config());
    let mut host = mint_request(&config, Some(BACKEND), None, "");
    host.headers.insert(":method".into(), "GET".into());
    run(&config, &mut host);
    assert_eq!(host.last_reply().status, 405);
    assert_eq!(host.last_reply().header("allow"), Some("POST"));
}

#[test]
fn with_continue_headers_a_mint_lets_headers_go_and_answers_from_the_body() {
    let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
    v["continue_headers"] = true.into();
    v["callers"] = json!({
        "api_keys": [{"name": "backend", "sha256": key_hash_hex("sk-gw-backend")}],
        "ephemeral_keys": {"gateway": "gw-test", "key_envs": ["EK_SECRET"]}
    });
    let env = |name: &str| match name {
        "EK_SECRET" => Some(EK_SECRET.to_string()),
        other => env(other),
    };
    let config = Rc::new(Config::from_json(v.to_string().as_bytes(), &env).unwrap());
    let body = r#"{"session": {"type": "realtime"}}"#;
    let mut host = mint_request(&config, Some(BACKEND), None, body);
    let mut flow = Flow::new(Rc::clone(&config));
    assert_eq!(flow.on_headers(&mut host, false), Action::Continue);
    host.headers_gone = true;
    assert_eq!(flow.on_body(&mut host, 5, false), Action::Pause);
    assert!(host.replies.is_empty());
    assert_eq!(flow.on_body(&mut host, body.len(), true), Action::Pause);
    assert_eq!(host.last_reply().status, 200);
}

#[test]
fn a_key_opens_only_its_model_and_names_it_when_the_call_does_not() {
    let config = Rc::new(config());
    let calls = "/v1/realtime/calls";
    let pinned = |model: &str| {
        mint(
            &config,
            json!({"session": {"type": "realtime", "model": model}}),
        )
    };
    // No model in the call: the key's, ahead of default_model (gpt-realtime).
    let mini = pinned("gpt-realtime-mini-2025");
    let host = create_with(&config, &mini, calls, None, NOW_S);
    let m = sent(&host);
    assert_eq!(
        (m.model.as_str(), m.upstream_model.as_str()),
        ("gpt-realtime-mini-2025", "gpt-realtime-mini-2025")
    );
    // The same name in the query or the session: fine.
    let host = create_with(
        &config,
        &mini,
        &format!("{calls}?model=gpt-realtime-mini-2025"),
        None,
        NOW_S,
    );
    assert_eq!(sent(&host).model, "gpt-realtime-mini-2025");
    // Another model, even one the same prefix entry serves, or the default: 403, nothing sent.
    for (path, session) in [
        (format!("{calls}?model=gpt-realtime"), None),
        (format!("{calls}?model=gpt-realtime-mini-2026"), None),
        (
            calls.to_string(),
            Some(r#"{"type": "realtime", "model": "gpt-realtime"}"#),
        ),
    ] {
        let host = create_with(&config, &mini, &path, session, NOW_S);
        assert!(host.dispatched.is_empty(), "{path}");
        let (status, code, param) = refusal(&host);
        assert_eq!(
            (status, code.as_str(), param.as_deref()),
            (403, "model_not_allowed", Some("model")),
            "{path}"
        );
        assert!(!String::from_utf8_lossy(&host.last_reply().body).contains("ek_"));
    }
    // A key pinned by an alias opens the model's canonical name, and the other way round.
    let alias = pinned("gpt-4o-realtime-preview");
    let host = create_with(
        &config,
        &alias,
        &format!("{calls}?model=gpt-realtime"),
        None,
        NOW_S,
    );
    assert_eq!(sent(&host).upstream_model, "gpt-realtime");
    // A key without a model opens whatever its pools serve it.
    let open = mint(&config, json!({"session": {"type": "realtime"}}));
    let host = create_with(
        &config,
        &open,
        &format!("{calls}?model=gpt-realtime-mini-x"),
        None,
        NOW_S,
    );
    assert_eq!(sent(&host).model, "gpt-realtime-mini-x");
    // The call belongs to the backend that minted the key.
    assert_eq!(sent(&host).principal, principal_of("api_key", "backend"));
}

#[test]
fn a_keys_session_settings_win_over_the_pages() {
    let config = Rc::new(config());
    let key = mint(
        &config,
        json!({"session": {"type": "realtime", "model": "gpt-realtime",
                           "instructions": "from the backend", "tool_choice": "none"}}),
    );
    let calls = "/v1/realtime/calls";
    let host = create_with(
        &config,
        &key,
        calls,
        Some(r#"{"instructions": "from the page", "temperature": 0.5}"#),
        NOW_S,
    );
    let session: Value = serde_json::from_str(&sent(&host).session_json).unwrap();
    assert_eq!(
        session,
        json!({"type": "realtime", "instructions": "from the backend", "tool_choice": "none",
               "temperature": 0.5})
    );
    // Raw SDP: the key's settings are the session.
    let host = create_with(&config, &key, calls, None, NOW_S);
    let session: Value = serde_json::from_str(&sent(&host).session_json).unwrap();
    assert_eq!(
        session,
        json!({"type": "realtime", "instructions": "from the backend", "tool_choice": "none"})
    );
    // A key without settings leaves the page's session as sent.
    let bare = mint(&config, json!({}));
    let host = create_with(&config, &bare, calls, Some(r#"{"voice": "verse"}"#), NOW_S);
    assert_eq!(sent(&host).session_json, r#"{"voice": "verse"}"#);
}

#[test]
fn expired_and_tampered_keys_are_refused_at_create_with_nothing_sent() {
    let config = Rc::new(config());
    let key = mint(&config, json!({"expires_after": {"seconds": 10}}));
    let calls = "/v1/realtime/calls";
    // Valid until its expiry second.
    assert_eq!(
        sent(&create_with(&config, &key, calls, None, NOW_S + 9)).model,
        "gpt-realtime"
    );
    let tampered = key.replacen('.', ".A", 1);
    let other_gateway = {
        let mut ring = config.callers.ephemeral.clone().unwrap();
        ring.gateway = "gw-other".into();
        ring.mint(Claims {
            v: 1,
            kid: String::new(),
            gw: String::new(),
            sub: "p_x".into(),
            mdl: None,
            iat: NOW_S,
            exp: NOW_S + 600,
            ses: None,
            bud: None,
        })
        .unwrap()
    };
    for (k, now) in [
        (&key, NOW_S + 10),
        (&key, NOW_S + 7200),
        (&tampered, NOW_S),
        (&other_gateway, NOW_S),
    ] {
        let host = create_with(&config, k, calls, None, now);
        assert!(host.dispatched.is_empty());
        let (status, code, _) = refusal(&host);
        assert_eq!((status, code.as_str()), (401, "invalid_api_key"));
        let body = String::from_utf8_lossy(&host.last_reply().body).into_owned();
        assert!(!body.contains(k.as_str()), "{body}");
    }
}

/// A key minted by an API key with a budget carries it: the page's call gets the backend's
/// budget, not its pool's.
#[test]
fn a_minted_key_carries_its_minters_budget_to_the_call() {
    let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
    v["callers"] = json!({
        "api_keys": [
            {"name": "backend", "sha256": key_hash_hex("sk-gw-backend"),
             "budget": {"tokens_per_call": 250}}
        ],
        "ephemeral_keys": {"gateway": "gw-test", "key_envs": ["EK_SECRET"]}
    });
    v["pools"][0]["budget"] = json!({"tokens_per_call": 9000, "audio_seconds_per_call": 30});
    let env = |name: &str| match name {
        "EK_SECRET" => Some(EK_SECRET.to_string()),
        other => env(other),
    };
    let config = Rc::new(Config::from_json(v.to_string().as_bytes(), &env).unwrap());
    let key = mint(
        &config,
        json!({"session": {"type": "realtime", "model": "gpt-realtime"}}),
    );
    let host = create_with(&config, &key, "/v1/realtime/calls", None, NOW_S);
    let b = sent(&host).budget.expect("a budget");
    assert_eq!((b.max_tokens, b.max_audio_seconds), (250, 30.0));
}
