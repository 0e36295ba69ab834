//! Shared pieces of the full-call tests: a tokio runtime for the in-process mock providers and
//! the str0m test client, plugin configs, and one call's exercise (events and audio both ways).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use e2e::{http, Envoy, EnvoyOptions, Paths, Relay, RunDir};
use echo_model::{ClientConfig, ConnectedClient, MockProvider, ProviderConfig, TestClient};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

/// The key Envoy's VM environment holds (`OPENAI_API_KEY`) and the mock provider expects.
pub const KEY: &str = "sk-e2e-envoy-injected-4b1d9e7a";
/// A client's own key (must never reach the provider under the `replace` policy).
pub const CLIENT_KEY: &str = "sk-e2e-client-own-8c2f3a61";
pub const T: Duration = Duration::from_secs(15);
pub const CALLS: &str = "/v1/realtime/calls";

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub fn provider(rt: &Runtime, key: &str) -> MockProvider {
    rt.block_on(MockProvider::start(ProviderConfig::local(Some(key))))
        .expect("mock provider starts")
}

/// A provider that answers every offer with `status` (e.g. 500: a failing worker).
pub fn failing_provider(rt: &Runtime, status: u16) -> MockProvider {
    let cfg = ProviderConfig {
        reject_with: Some((
            status,
            "application/json".into(),
            r#"{"error":{"message":"boom","type":"server_error","param":null,"code":"boom"}}"#
                .into(),
        )),
        ..ProviderConfig::local(Some(KEY))
    };
    rt.block_on(MockProvider::start(cfg))
        .expect("mock provider starts")
}

/// A trusted operator key the tests' plugin configurations accept (its routing header counts).
pub const OPS_KEY: &str = "sk-gw-e2e-operator";
/// `sha256(OPS_KEY)` as `callers.api_keys[].sha256` wants it.
pub const OPS_KEY_SHA256: &str = "e03019fc3c1273c8df89d82b4c17ac3ab054fd74eabd0e87d4fdbddba117a878";

/// `Authorization` with [`OPS_KEY`].
pub fn ops_auth() -> (&'static str, &'static str) {
    ("authorization", "Bearer sk-gw-e2e-operator")
}

/// The `callers` section of the tests' plugin configurations: [`OPS_KEY`], an operator
/// trusted to steer.
pub fn callers_section() -> Value {
    json!({"api_keys": [{"name": "e2e-operator", "sha256": OPS_KEY_SHA256, "operator": true, "trusted": true}]})
}

/// A patch of a shipped envoy/*.yaml that adds [`OPS_KEY`] to the API keys of its plugin
/// configuration (beside the demo backend's).
pub fn ops_key_patch() -> (String, String) {
    let anchor = r#""api_keys": ["#;
    (
        anchor.to_string(),
        format!(r#"{anchor} {},"#, callers_section()["api_keys"][0]),
    )
}

/// The filter's plugin configuration with these models and pools (the rest as in
/// `envoy/envoy.yaml`). Pools that say nothing of their callers admit anonymous ones, as the
/// local envoy.yaml does; [`OPS_KEY`] is a trusted operator.
pub fn plugin_config(models: Value, mut pools: Value, extra: Value) -> String {
    for pool in pools.as_array_mut().into_iter().flatten() {
        if let Some(o) = pool.as_object_mut() {
            o.entry("callers")
                .or_insert_with(|| json!(["anonymous", "api_key", "jwt", "ephemeral"]));
        }
    }
    let mut v = json!({
        "callers": callers_section(),
        "relay_cluster": "relay",
        "create_timeout_ms": 10000,
        "hangup_timeout_ms": 3000,
        "default_model": "gpt-realtime",
        "routing_header": "x-realtime-route",
        "ejection": { "consecutive_failures": 2, "duration_ms": 60000 },
        "load_refresh_ms": 0,
        "models": models,
        "pools": pools,
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v.to_string()
}

/// One model `gpt-realtime` served by one worker at `base_url` with this key policy.
pub fn single_worker(base_url: &str, key_policy: &str) -> String {
    plugin_config(
        json!([{ "name": "gpt-realtime", "aliases": ["gpt-4o-realtime-preview"], "pools": ["main"] }]),
        json!([{ "name": "main", "key_policy": key_policy, "workers": [
            { "id": "worker-1", "base_url": base_url, "key_env": "OPENAI_API_KEY" }
        ]}]),
        json!({}),
    )
}

pub struct Gateway {
    pub dir: RunDir,
    pub relay: Relay,
    pub envoy: Envoy,
}

/// A relay allowing `upstreams` and Envoy (with `plugin_config`, the key in its VM
/// environment) in front of it.
pub fn gateway(name: &str, upstreams: &[String], plugin_config: String) -> Gateway {
    gateway_with(name, upstreams, plugin_config, Vec::new())
}

/// [`gateway`] with literal replacements in the rendered Envoy config.
pub fn gateway_with(
    name: &str,
    upstreams: &[String],
    plugin_config: String,
    patches: Vec<(String, String)>,
) -> Gateway {
    gateway_with_relay_args(name, upstreams, plugin_config, patches, &[])
}

/// [`gateway`] with more variables in Envoy's environment (a later one wins over the local
/// defaults, e.g. `DEMO_BACKEND_KEY`).
pub fn gateway_with_env(
    name: &str,
    upstreams: &[String],
    plugin_config: String,
    env: Vec<(String, String)>,
) -> Gateway {
    gateway_full(name, upstreams, plugin_config, Vec::new(), &[], env)
}

/// [`gateway_with`], the relay started with `relay_args` appended.
pub fn gateway_with_relay_args(
    name: &str,
    upstreams: &[String],
    plugin_config: String,
    patches: Vec<(String, String)>,
    relay_args: &[String],
) -> Gateway {
    gateway_full(
        name,
        upstreams,
        plugin_config,
        patches,
        relay_args,
        Vec::new(),
    )
}

fn gateway_full(
    name: &str,
    upstreams: &[String],
    plugin_config: String,
    patches: Vec<(String, String)>,
    relay_args: &[String],
    env: Vec<(String, String)>,
) -> Gateway {
    let paths = Paths::discover();
    let dir = RunDir::new(name).expect("run dir");
    let relay = e2e::start_relay_with(&paths, &dir, "relay", upstreams, |spec| {
        spec.args.extend_from_slice(relay_args)
    })
    .expect("relay starts");
    let opts = EnvoyOptions {
        relay_port: Some(relay.grpc.port()),
        plugin_config: Some(plugin_config),
        env: [("OPENAI_API_KEY".to_string(), KEY.to_string())]
            .into_iter()
            .chain(env)
            .collect(),
        patches,
        ..Default::default()
    };
    let envoy = opts.start(&paths, &dir).expect("envoy starts");
    wait_relay_healthy(&envoy, "relay");
    Gateway { dir, relay, envoy }
}

/// Waits until Envoy's health checker has marked `cluster`'s hosts healthy (the first check
/// runs at start-up; until it passes Envoy may still route, but do not race it).
pub fn wait_relay_healthy(envoy: &Envoy, cluster: &str) {
    wait_cluster_healthy(cluster, || {
        http::get(envoy.admin(), "/clusters")
            .map(|r| r.text())
            .unwrap_or_default()
    });
}

/// [`wait_relay_healthy`] over admin `/clusters` text from `clusters` (for an Envoy that
/// is reached another way, e.g. inside a network namespace).
pub fn wait_cluster_healthy(cluster: &str, clusters: impl Fn() -> String) {
    let deadline = Instant::now() + T;
    loop {
        let text = clusters();
        let prefix = format!("{cluster}::");
        let flags: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains("::health_flags::"))
            .collect();
        if !flags.is_empty() && flags.iter().all(|l| l.ends_with("::healthy")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cluster {cluster} never healthy: {flags:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn new_client() -> (TestClient, String) {
    TestClient::new(ClientConfig::default()).expect("test client")
}

pub fn multipart(boundary: &str, sdp: &str, session: Option<&str>) -> Vec<u8> {
    let mut b = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"sdp\"\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n"
    );
    if let Some(s) = session {
        b.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"session\"\r\nContent-Type: application/json\r\n\r\n{s}\r\n"
        ));
    }
    b.push_str(&format!("--{boundary}--\r\n"));
    b.into_bytes()
}

pub fn post(envoy: &Envoy, path: &str, headers: &[(&str, &str)], body: &[u8]) -> http::Response {
    http::request(envoy.listen(), "POST", path, headers, body).expect("HTTP to Envoy")
}

pub fn post_sdp(envoy: &Envoy, path: &str, offer: &str, extra: &[(&str, &str)]) -> http::Response {
    let mut h = vec![("content-type", "application/sdp")];
    h.extend_from_slice(extra);
    post(envoy, path, &h, offer.as_bytes())
}

/// Checks the 201 and returns the call id from `Location`.
pub fn created(r: &http::Response) -> String {
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/sdp"));
    let loc = r.header("location").expect("Location");
    let id = loc
        .strip_prefix("/v1/realtime/calls/")
        .unwrap_or_else(|| panic!("Location {loc}"));
    assert!(id.starts_with("rtc_") && !id.contains('/'), "{loc}");
    assert!(r.text().starts_with("v=0"), "answer SDP: {}", r.text());
    id.to_string()
}

pub fn hangup(envoy: &Envoy, call_id: &str) -> http::Response {
    post(envoy, &format!("{CALLS}/{call_id}/hangup"), &[], b"")
}

/// A hangup by the caller with this `Authorization` (a call created with a key is that key's:
/// only its owner, or an operator, ends it).
pub fn hangup_as(envoy: &Envoy, call_id: &str, authorization: &str) -> http::Response {
    post(
        envoy,
        &format!("{CALLS}/{call_id}/hangup"),
        &[("authorization", authorization)],
        b"",
    )
}

/// Connects the client with the answer and proves events and audio flow both ways (and
/// consumes the model's answer to its `response.create`).
pub fn exercise(rt: &Runtime, client: TestClient, answer: &str) -> ConnectedClient {
    rt.block_on(async {
        let mut c = client.connect(answer).await.expect("client connects");
        let created = c
            .wait_for_event_type("session.created", T)
            .await
            .expect("session.created from the model");
        assert!(created["session"].is_object(), "{created}");
        c.send_text(r#"{"type":"response.create","event_id":"e2e-1"}"#)
            .await
            .expect("send event");
        let echo = c
            .wait_for_event_type("response.create", T)
            .await
            .expect("event echoed back");
        assert_eq!(echo["event_id"], "e2e-1");
        // The model answers it as OpenAI does (rate limits, response.created, response.done
        // with usage): consumed here, so callers start from a quiet channel.
        let done = c
            .wait_for_event_type("response.done", T)
            .await
            .expect("the response's response.done");
        assert_eq!(done["response"]["status"], "completed");
        c.send_audio(30, Duration::from_millis(20))
            .await
            .expect("send audio");
        let deadline = tokio::time::Instant::now() + T;
        while c.audio_stats().packets_received < 25 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stats = c.audio_stats();
        assert!(stats.packets_received >= 25, "audio back: {stats:?}");
        c
    })
}

/// Envoy's `/stats/prometheus` value of `name`; panics if Envoy has no such statistic.
pub fn envoy_stat(envoy: &Envoy, name: &str) -> f64 {
    envoy
        .stat(name)
        .unwrap_or_else(|e| panic!("Envoy stat: {e:#}"))
}

/// Polls `name` until it reaches at least `want` (bounded by [`T`]); returns the last value.
pub fn wait_envoy_stat(envoy: &Envoy, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + T;
    loop {
        let v = envoy_stat(envoy, name);
        if v >= want || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Neither Envoy's nor the relay's log holds a key.
pub fn assert_no_key_in_logs(g: &Gateway, keys: &[&str]) {
    let logs = [("envoy", g.envoy.log_text()), ("relay", g.relay.log_text())];
    for (name, text) in logs {
        assert!(!text.is_empty(), "{name} log is empty: is it captured?");
        for k in keys {
            assert!(!text.contains(k), "a key is in the {name} log");
        }
    }
}
