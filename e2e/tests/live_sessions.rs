//! GPT-Live sessions through the real Envoy, filter, relay and echo model, driven by the
//! official OpenAI Python SDK (PyPI `openai`, pinned in xtask/src/paths.rs, installed into
//! .venv by `cargo xtask setup`): `client.live.create(session=…, transport={"type": "webrtc",
//! "sdp": offer})` with the str0m test client doing the media (`session.started` first, an
//! event echoed, audio both ways, cumulative `session.usage.updated`), the SDK's refusals,
//! and `client.live.sessions.hangup(id)` after which the client still receives the provider's
//! `session.closed`. Also: Realtime calls and Live sessions at once on one relay, each model
//! reaching the workers of its own API.

mod common;

use std::process::Command;

use common::*;
use e2e::RunDir;
use echo_model::ConnectedClient;
use serde_json::{json, Value};
use tokio::runtime::Runtime;

/// The backend's API key (`callers.api_keys`, from the VM environment by `key_env`).
const BACKEND_KEY: &str = "sk-gw-e2e-live-backend-71c0d2e5";
const LIVE: &str = "/v1/live/sessions";

/// Runs e2e/tests/openai_sdk/live.py with `args` against the gateway at `base_url`; its JSON
/// answer.
fn sdk(base_url: &str, args: &[&str]) -> Value {
    let paths = e2e::Paths::discover();
    assert!(
        xtask::setup::openai_sdk_installed(&paths),
        "the openai Python SDK is not in {}: run `cargo xtask setup`",
        paths.venv().display()
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("openai_sdk")
        .join("live.py");
    let out = Command::new(paths.venv_python())
        .arg(script)
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("GATEWAY_BASE_URL", base_url)
        .env("BACKEND_KEY", BACKEND_KEY)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK script ({args:?}) failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn offer_file(dir: &RunDir, name: &str, offer: &str) -> String {
    let f = dir.path.join(format!("{name}.sdp"));
    std::fs::write(&f, offer).expect("offer file");
    f.display().to_string()
}

fn refusal(v: &Value) -> (u64, &str) {
    (
        v["status"].as_u64().unwrap_or_default(),
        v["code"].as_str().unwrap_or_default(),
    )
}

/// The models of the tests: `gpt-realtime` on pool `rt`, `gpt-live-1` (a Live model) on pool
/// `live`; the pools admit the backend's API key.
fn two_api_config(rt_url: &str, live_url: &str) -> String {
    plugin_config(
        json!([
            { "name": "gpt-realtime", "pools": ["rt"] },
            { "name": "gpt-live-1", "api": "live", "pools": ["live"] }
        ]),
        json!([
            { "name": "rt", "key_policy": "inject_if_missing", "callers": ["api_key"],
              "workers": [{ "id": "rt-1", "base_url": rt_url, "key_env": "OPENAI_API_KEY" }] },
            { "name": "live", "key_policy": "inject_if_missing", "callers": ["api_key"],
              "workers": [{ "id": "live-1", "base_url": live_url, "key_env": "OPENAI_API_KEY" }] }
        ]),
        json!({ "callers": { "api_keys": [{ "name": "backend", "key_env": "DEMO_BACKEND_KEY" }] } }),
    )
}

/// Connects a Live client: `session.started` must be the first event, naming the session by
/// the id the gateway gave (`id`), never the provider's; then an event echoed, audio both
/// ways and a cumulative usage report. Returns the client and the usage seen.
fn exercise_live(
    rt: &Runtime,
    client: echo_model::TestClient,
    answer: &str,
    id: &str,
) -> (ConnectedClient, f64) {
    rt.block_on(async {
        let mut c = client.connect(answer).await.expect("client connects");
        let first = c.next_event(T).await.expect("a first event");
        assert_eq!(first["type"], "session.started", "{first}");
        assert_eq!(first["session"]["model"], "gpt-live-1", "{first}");
        assert_eq!(first["session"]["id"], id, "{first}");
        c.send_text(r#"{"type":"response.create","event_id":"e2e-live-1"}"#)
            .await
            .expect("send event");
        let echo = c
            .wait_for_event_type("response.create", T)
            .await
            .expect("event echoed back");
        assert_eq!(echo["event_id"], "e2e-live-1");
        c.send_audio(30, std::time::Duration::from_millis(20))
            .await
            .expect("send audio");
        let deadline = tokio::time::Instant::now() + T;
        while c.audio_stats().packets_received < 25 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let stats = c.audio_stats();
        assert!(stats.packets_received >= 25, "audio back: {stats:?}");
        // Two reports: the seconds are a running total, so they never go down.
        let a = c
            .wait_for_event_type("session.usage.updated", T)
            .await
            .expect("session.usage.updated");
        let b = c
            .wait_for_event_type("session.usage.updated", T)
            .await
            .expect("a second session.usage.updated");
        let (a, b) = (
            a["usage"]["seconds"].as_f64().expect("usage.seconds"),
            b["usage"]["seconds"].as_f64().expect("usage.seconds"),
        );
        assert!(a > 0.0 && b > a, "cumulative seconds: {a} then {b}");
        (c, b)
    })
}

#[test]
fn the_official_sdk_creates_a_live_session_that_carries_media_and_is_hung_up() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let cfg = two_api_config(&p.base_url(), &p.base_url());
    let g = gateway_with_env(
        "live-sdk",
        &[p.base_url()],
        cfg,
        vec![("DEMO_BACKEND_KEY".into(), BACKEND_KEY.into())],
    );
    let base_url = format!("http://{}/v1", g.envoy.listen());
    let (client, offer) = new_client();
    let file = offer_file(&g.dir, "live", &offer);
    let created = sdk(&base_url, &["create", "gpt-live-1", &file]);

    // The answer as the SDK parsed it: 200 JSON, a live_ id, the SDP answer.
    assert_eq!(created["status"], 200, "{created}");
    assert_eq!(created["content_type"], "application/json");
    let id = created["session_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("live_"), "{id}");
    let answer = created["answer"].as_str().unwrap();
    assert!(answer.starts_with("v=0"), "{answer}");
    let (mut c, usage) = exercise_live(&rt, client, answer, &id);

    // Upstream: one JSON create on the Live path, with the worker's key, the client's
    // session, and the relay's own offer (not the client's).
    let reqs = p.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].path, LIVE);
    assert_eq!(reqs[0].content_type, "application/json");
    assert_eq!(
        reqs[0].authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    let body = reqs[0].json.as_ref().expect("a JSON body upstream");
    assert_eq!(body["session"]["model"], "gpt-live-1");
    assert_eq!(body["session"]["instructions"], "from the SDK");
    assert_eq!(body["transport"]["type"], "webrtc");
    let upstream_offer = body["transport"]["sdp"].as_str().unwrap();
    assert!(upstream_offer.starts_with("v=0") && upstream_offer != offer);

    // What the gateway refuses, as the SDK raises it; none of it reaches the provider.
    let file = offer_file(&g.dir, "refusals", &offer);
    let out = sdk(&base_url, &["refusals", &file]);
    assert_eq!(
        refusal(&out["realtime_model"]),
        (404, "model_not_found"),
        "{out}"
    );
    assert_eq!(refusal(&out["bad_sdp"]), (400, "invalid_sdp"), "{out}");
    assert_eq!(refusal(&out["accept"]), (400, "not_a_sip_session"), "{out}");
    assert_eq!(refusal(&out["reject"]), (400, "not_a_sip_session"), "{out}");
    assert_eq!(
        refusal(&out["fork"]),
        (400, "unsupported_session_control"),
        "{out}"
    );
    assert_eq!(
        refusal(&out["unknown_hangup"]),
        (404, "call_not_found"),
        "{out}"
    );
    assert_eq!(p.requests().len(), 1, "no refused request went upstream");

    // The session's id under the Realtime path is nobody's.
    let r = hangup_as(&g.envoy, &id, &format!("Bearer {BACKEND_KEY}"));
    assert_eq!(r.status, 404, "{}", r.text());

    // The SDK's hangup: 200, and the client still gets the provider's session.closed (its
    // reason, the final cumulative usage) before the call ends.
    let out = sdk(&base_url, &["hangup", &id]);
    assert_eq!(out["status"], 200, "{out}");
    let closed = rt
        .block_on(c.wait_for_event_type("session.closed", T))
        .expect("session.closed after the hangup");
    assert_eq!(closed["reason"], "close_requested", "{closed}");
    assert_eq!(closed["session"]["id"], id.as_str(), "{closed}");
    let final_seconds = closed["usage"]["seconds"].as_f64().expect("final usage");
    assert!(final_seconds >= usage, "{final_seconds} < {usage}");
    assert!(rt.block_on(c.wait_closed(T)), "the client leg closes");
    g.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();
    assert_eq!(p.hangups().len(), 1, "the provider's session hung up");
    assert!(p.hangups()[0].starts_with("live_"), "{:?}", p.hangups());
    assert_no_key_in_logs(&g, &[KEY, BACKEND_KEY]);
}

#[test]
fn realtime_and_live_calls_run_together_on_one_relay_each_on_its_apis_workers() {
    let rt = runtime();
    let p_rt = provider(&rt, KEY);
    let p_live = provider(&rt, KEY);
    let cfg = two_api_config(&p_rt.base_url(), &p_live.base_url());
    let g = gateway_with_env(
        "live-and-realtime",
        &[p_rt.base_url(), p_live.base_url()],
        cfg,
        vec![("DEMO_BACKEND_KEY".into(), BACKEND_KEY.into())],
    );
    let auth = format!("Bearer {BACKEND_KEY}");

    // A Realtime call, and a Live session while it runs.
    let (rt_client, rt_offer) = new_client();
    let r = post_sdp(
        &g.envoy,
        "/v1/realtime/calls?model=gpt-realtime",
        &rt_offer,
        &[("authorization", &auth)],
    );
    let rt_id = created(&r);
    let rt_call = exercise(&rt, rt_client, &r.text());

    let (live_client, live_offer) = new_client();
    let body = json!({ "session": { "model": "gpt-live-1" },
                       "transport": { "type": "webrtc", "sdp": live_offer } });
    let r = post(
        &g.envoy,
        LIVE,
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&r.text()).expect("JSON answer");
    let live_id = v["session"]["id"].as_str().unwrap().to_string();
    assert!(live_id.starts_with("live_"), "{v}");
    assert_eq!(v["transport"]["type"], "webrtc");
    let (live_call, _) = exercise_live(
        &rt,
        live_client,
        v["transport"]["sdp"].as_str().unwrap(),
        &live_id,
    );

    // Both at once on the one relay, each at the workers of its API.
    assert_eq!(
        g.relay.metric("realtime_relay_calls_connected").unwrap(),
        2.0
    );
    let (a, b) = (p_rt.requests(), p_live.requests());
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].path, "/v1/realtime/calls");
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].path, LIVE);
    // Both still carry traffic: the Realtime call echoes while the Live one runs.
    let rt_call = rt.block_on(async {
        let mut c = rt_call;
        c.send_text(r#"{"type":"response.create","event_id":"both"}"#)
            .await
            .unwrap();
        let echo = c.wait_for_event_type("response.create", T).await.unwrap();
        assert_eq!(echo["event_id"], "both");
        c
    });

    // Each id hangs up on its own path only.
    let r = post(
        &g.envoy,
        &format!("{LIVE}/{rt_id}/hangup"),
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let r = post(
        &g.envoy,
        &format!("{LIVE}/{live_id}/hangup"),
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = hangup_as(&g.envoy, &rt_id, &auth);
    assert_eq!(r.status, 200, "{}", r.text());
    g.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();
    // The Live session's provider was asked to hang up (before the call ended, so it is
    // recorded); the Realtime worker never hears of a Live id. (A Realtime call's provider
    // hangup follows the call's end, best effort, and the echo model records only hangups of
    // calls it still has.)
    let h = p_live.hangups();
    assert!(h.len() == 1 && h[0].starts_with("live_"), "{h:?}");
    let h = p_rt.hangups();
    assert!(h.iter().all(|id| id.starts_with("rtc_")), "{h:?}");
    drop((rt_call, live_call));
}
