//! Client secrets through the real Envoy, driven by the official OpenAI Python SDK (PyPI
//! `openai`, pinned in xtask/src/paths.rs and installed into .venv by `cargo xtask setup`): a
//! backend mints a key with `client.realtime.client_secrets.create`, a page opens a call with
//! it through `client.realtime.calls.create(sdp=...)`, and the str0m test client proves
//! events and audio flow on the call. Also: the key opens its model only, mints nothing, and
//! stops working when it expires; the local demo's backend route mints for a page that
//! holds no key; and without Envoy's pause flag (Istio's shape) a mint is held and answered.

mod common;

use std::process::Command;

use common::*;
use e2e::{http, EnvoyOptions, Paths, RunDir};
use serde_json::{json, Value};

/// The backend's API key (`callers.api_keys`, from the VM environment by `key_env`).
const BACKEND_KEY: &str = "sk-gw-e2e-backend-3f9a0c4d2b";

/// Runs e2e/tests/openai_sdk/client_secrets.py in `mode` against the gateway at `base_url`;
/// its JSON answer.
fn sdk(dir: &RunDir, mode: &str, base_url: &str, offer: &str) -> Value {
    let paths = Paths::discover();
    let python = paths.venv_python();
    assert!(
        xtask::setup::openai_sdk_installed(&paths),
        "the openai Python SDK is not in {}: run `cargo xtask setup`",
        paths.venv().display()
    );
    let offer_file = dir.path.join(format!("offer-{mode}.sdp"));
    std::fs::write(&offer_file, offer).expect("offer file");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("openai_sdk")
        .join("client_secrets.py");
    let out = Command::new(python)
        .arg(script)
        .arg(mode)
        .arg(&offer_file)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("GATEWAY_BASE_URL", base_url)
        .env("BACKEND_KEY", BACKEND_KEY)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK script ({mode}) failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn refusal(v: &Value) -> (u64, &str, Option<&str>) {
    (
        v["status"].as_u64().unwrap_or_default(),
        v["code"].as_str().unwrap_or_default(),
        v["param"].as_str(),
    )
}

#[test]
fn the_official_sdk_mints_a_key_and_a_page_calls_with_it() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    // Two models on a pool that lends its key to API keys and ephemeral keys only (no
    // anonymous caller: the page's key is what admits the call).
    let cfg = plugin_config(
        json!([
            { "name": "gpt-realtime", "aliases": ["gpt-4o-realtime-preview"], "pools": ["main"] },
            { "name": "gpt-realtime-mini", "pools": ["main"] }
        ]),
        json!([{ "name": "main", "key_policy": "inject_if_missing", "callers": ["api_key", "ephemeral"],
                 "workers": [{ "id": "worker-1", "base_url": p.base_url(), "key_env": "OPENAI_API_KEY" }] }]),
        json!({ "callers": {
            "api_keys": [{ "name": "backend", "key_env": "DEMO_BACKEND_KEY" }],
            "ephemeral_keys": { "gateway": "e2e", "key_envs": ["EPHEMERAL_SIGNING_KEY"] }
        }}),
    );
    let g = gateway_with_env(
        "client-secrets",
        &[p.base_url()],
        cfg,
        vec![("DEMO_BACKEND_KEY".into(), BACKEND_KEY.into())],
    );
    let base_url = format!("http://{}/v1", g.envoy.listen());
    let (client, offer) = new_client();
    let out = sdk(&g.dir, "call", &base_url, &offer);

    // The minted key, as the SDK parsed it.
    let secret = &out["secret"];
    let key = secret["value"].as_str().unwrap().to_string();
    assert!(key.starts_with("ek_"));
    let expires_at = secret["expires_at"].as_i64().unwrap();
    let now = secret["now"].as_i64().unwrap();
    assert!(
        (now + 595..=now + 601).contains(&expires_at),
        "{expires_at} vs {now}"
    );
    assert_eq!(
        secret["session_class"], "RealtimeSessionCreateResponse",
        "{out}"
    );
    let session = &secret["session"];
    assert_eq!(session["type"], "realtime");
    assert_eq!(session["model"], "gpt-realtime");
    assert_eq!(session["object"], "realtime.session");
    assert_eq!(session["instructions"], "from the backend");

    // The page's call: 201, the SDP answer, the call id in Location; then media and events.
    let call = &out["call"];
    assert_eq!(call["status"], 201, "{out}");
    assert_eq!(call["content_type"], "application/sdp");
    let location = call["location"].as_str().unwrap();
    let call_id = location.strip_prefix("/v1/realtime/calls/").unwrap();
    assert!(call_id.starts_with("rtc_"), "{location}");
    let answer = call["answer"].as_str().unwrap();
    let connected = exercise(&rt, client, answer);

    // Upstream: the worker's key (the page sent only its ek_), the key's model and settings.
    let reqs = p.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(
        reqs[0].authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    let upstream_session = reqs[0].session.as_ref().expect("a session upstream");
    assert_eq!(upstream_session["model"], "gpt-realtime");
    assert_eq!(upstream_session["instructions"], "from the backend");

    // Refusals, as the SDK raised them.
    assert_eq!(
        refusal(&out["other_model"]),
        (403, "model_not_allowed", Some("model"))
    );
    assert_eq!(
        refusal(&out["key_mints"]),
        (403, "caller_not_allowed", None)
    );
    assert_eq!(
        refusal(&out["anonymous_mints"]),
        (401, "missing_api_key", None)
    );
    assert_eq!(
        refusal(&out["too_short"]),
        (
            400,
            "integer_below_min_value",
            Some("expires_after.seconds")
        )
    );
    assert_eq!(p.requests().len(), 1, "no refused call went upstream");

    // The call is the backend's: the page hangs up with its key.
    let r = hangup_as(&g.envoy, call_id, &format!("Bearer {key}"));
    assert_eq!(r.status, 200, "{}", r.text());
    g.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();
    drop(connected);

    // A key minted for 10 s opens nothing once they are over.
    let (_c, offer) = new_client();
    let out = sdk(&g.dir, "expiry", &base_url, &offer);
    assert_eq!(refusal(&out["expired"]), (401, "invalid_api_key", None));
    assert_eq!(p.requests().len(), 1);

    assert_eq!(
        envoy_stat(&g.envoy, "realtime_filter_requests_client_secrets"),
        2.0
    );
    assert_no_key_in_logs(&g, &[KEY, BACKEND_KEY, &key]);
}

#[test]
fn the_local_demo_backend_route_mints_for_a_page_that_holds_no_key() {
    let paths = Paths::discover();
    let dir = RunDir::new("demo-backend").unwrap();
    // The shipped envoy/envoy.yaml, its plugin configuration as shipped.
    let demo_key = "sk-local-demo-backend-e2e-77b1c0";
    let envoy = EnvoyOptions {
        env: vec![
            ("OPENAI_API_KEY".into(), KEY.into()),
            ("DEMO_BACKEND_KEY".into(), demo_key.into()),
        ],
        ..Default::default()
    }
    .start(&paths, &dir)
    .unwrap();
    let origin = format!("http://{}", envoy.listen());
    let body = br#"{"session": {"type": "realtime", "model": "gpt-realtime"}}"#;
    let post = |path: &str, auth: Option<&str>| {
        let mut h = vec![("content-type", "application/json"), ("origin", &origin)];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        http::request(envoy.listen(), "POST", path, &h, body).unwrap()
    };
    // The page's backend route: whatever the page sends as Authorization, Envoy presents the
    // demo backend's key, and the filter mints.
    let r = post("/demo/client_secret", Some("Bearer sk-the-page-has-none"));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let key = v["value"].as_str().unwrap().to_string();
    assert!(key.starts_with("ek_"), "{v}");
    assert_eq!(v["session"]["model"], "gpt-realtime");
    // It is a key of this gateway (a foreign ek_ would be 401): it may not mint in turn.
    let r = post(
        "/v1/realtime/client_secrets",
        Some(&format!("Bearer {key}")),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "caller_not_allowed");
    // The path itself needs the backend's key: the page alone gets nothing.
    let r = post("/v1/realtime/client_secrets", None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "missing_api_key");
    // Another web page's browser gets nothing from the demo backend either.
    let r = http::request(
        envoy.listen(),
        "POST",
        "/demo/client_secret",
        &[
            ("content-type", "application/json"),
            ("origin", "https://elsewhere.example.test"),
        ],
        body,
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "origin_not_allowed");
    let log = envoy.log_text();
    assert!(!log.is_empty());
    assert!(
        !log.contains(demo_key) && !log.contains(&key),
        "a key in Envoy's log"
    );
}

/// Istio's shape: no `allow_on_headers_stop_iteration`, so the filter lets a client-secret
/// request's headers go on (to `realtime_hold`, which answers nothing before the body), holds
/// the body, and answers from the body callback.
#[test]
fn without_the_pause_flag_a_mint_is_held_and_answered_from_its_body() {
    let paths = Paths::discover();
    let dir = RunDir::new("client-secrets-held").unwrap();
    let cfg = plugin_config(
        json!([{ "name": "gpt-realtime", "pools": ["main"] }]),
        json!([{ "name": "main", "workers": [
            { "id": "worker-1", "base_url": "http://127.0.0.1:9", "key_env": "OPENAI_API_KEY" }
        ]}]),
        json!({ "continue_headers": true, "callers": {
            "api_keys": [{ "name": "backend", "key_env": "DEMO_BACKEND_KEY" }],
            "ephemeral_keys": { "gateway": "e2e", "key_envs": ["EPHEMERAL_SIGNING_KEY"] }
        }}),
    );
    let envoy = EnvoyOptions {
        env: vec![
            ("OPENAI_API_KEY".into(), KEY.into()),
            ("DEMO_BACKEND_KEY".into(), BACKEND_KEY.into()),
        ],
        plugin_config: Some(cfg),
        patches: vec![(
            "allow_on_headers_stop_iteration: true".into(),
            "allow_on_headers_stop_iteration: false".into(),
        )],
        ..Default::default()
    }
    .start(&paths, &dir)
    .unwrap();
    let auth = format!("Bearer {BACKEND_KEY}");
    let r = http::request(
        envoy.listen(),
        "POST",
        "/v1/realtime/client_secrets",
        &[("content-type", "application/json"), ("authorization", &auth)],
        br#"{"expires_after": {"seconds": 60}, "session": {"type": "realtime", "model": "gpt-realtime"}}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert!(v["value"].as_str().unwrap().starts_with("ek_"), "{v}");
    // The router headed for the hold with the headers (its request there was still pending
    // when the filter's answer cancelled it: a mint is answered at once).
    let name = "cluster.realtime_hold.upstream_rq_pending_total";
    let stats = http::get(envoy.admin(), &format!("/stats?filter=^{name}$"))
        .unwrap()
        .text();
    let held: f64 = stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {stats:?}"));
    assert_eq!(held, 1.0, "{stats}");
    assert!(!envoy.log_text().contains(BACKEND_KEY));
}
