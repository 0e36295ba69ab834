//! Model routes through the real Envoy + the Wasm filter + the real relay: an exact name, a
//! prefix entry (`gpt-realtime*`) and a catch-all (`*`), each on its own pool. A dated model
//! nobody listed reaches the prefix pool's worker under its own name; a model only the
//! catch-all takes reaches a provider that does not know it, and the provider's own 400
//! `model_not_found` reaches the client byte for byte.

mod common;

use common::*;
use e2e::{http, FakeUpstream};
use serde_json::json;

/// What OpenAI answers for a model it does not have (a 400 with its JSON error).
const PROVIDER_MODEL_NOT_FOUND: &str = r#"{"error":{"message":"The model `gpt-5-ultra-preview` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;

#[test]
fn a_prefix_pool_serves_its_family_and_a_catch_all_passes_the_providers_refusal_verbatim() {
    let rt = runtime();
    let family = provider(&rt, KEY);
    let unknown = FakeUpstream::start(400, "application/json", PROVIDER_MODEL_NOT_FOUND)
        .expect("fake provider starts");
    let unknown_url = format!("http://127.0.0.1:{}", unknown.port);
    let worker =
        |id: &str, url: &str| json!({ "id": id, "base_url": url, "key_env": "OPENAI_API_KEY" });
    let config = plugin_config(
        json!([
            { "name": "gpt-realtime", "pools": ["exact"] },
            { "name": "gpt-realtime*", "pools": ["family"] },
            { "name": "*", "pools": ["any"] }
        ]),
        json!([
            { "name": "exact", "workers": [worker("exact-1", &family.base_url())] },
            { "name": "family", "workers": [worker("family-1", &family.base_url())] },
            { "name": "any", "workers": [worker("any-1", &unknown_url)] }
        ]),
        json!({}),
    );
    let g = gateway(
        "model-routes",
        &[family.base_url(), unknown_url.clone()],
        config,
    );
    let e = &g.envoy;

    // A dated model of the family: the prefix pool's worker, the name as asked for.
    let (c, offer) = new_client();
    let r = post_sdp(
        e,
        &format!("{CALLS}?model=gpt-realtime-2099-01-01"),
        &offer,
        &[],
    );
    let id = created(&r);
    drop(c);
    let sent = family.requests();
    assert_eq!(sent.len(), 1);
    let session = sent[0].session.as_ref().expect("a session upstream");
    assert_eq!(session["model"], "gpt-realtime-2099-01-01", "{session}");
    assert_eq!(
        envoy_stat(e, "realtime_filter_worker_family_1_setups_ok"),
        1.0
    );
    assert_eq!(
        envoy_stat(e, "realtime_filter_worker_exact_1_setups_ok"),
        0.0
    );
    assert_eq!(hangup(e, &id).status, 200);

    // The exact name still wins over the prefix that also matches it.
    let (c, offer) = new_client();
    let r = post_sdp(e, &format!("{CALLS}?model=gpt-realtime"), &offer, &[]);
    let id = created(&r);
    drop(c);
    assert_eq!(
        envoy_stat(e, "realtime_filter_worker_exact_1_setups_ok"),
        1.0
    );
    assert_eq!(
        family.requests()[1].session.as_ref().unwrap()["model"],
        "gpt-realtime"
    );
    assert_eq!(hangup(e, &id).status, 200);

    // A model nobody listed: the catch-all's provider refuses it, and the client gets that
    // refusal as the provider sent it.
    let (_c, offer) = new_client();
    let body = multipart(
        "e2eRoutes1",
        &offer,
        Some(r#"{"model":"gpt-5-ultra-preview","instructions":"hi"}"#),
    );
    let r = post(
        e,
        CALLS,
        &[("content-type", "multipart/form-data; boundary=e2eRoutes1")],
        &body,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.text(), PROVIDER_MODEL_NOT_FOUND);
    let heard = unknown.recorded();
    assert_eq!(heard.len(), 1, "the provider was asked once");
    assert!(
        heard[0]
            .request_line()
            .starts_with("POST /v1/realtime/calls"),
        "{}",
        heard[0].request_line()
    );
    let upstream_body = String::from_utf8_lossy(&heard[0].body);
    assert!(
        upstream_body.contains(r#""model":"gpt-5-ultra-preview""#),
        "the name as asked for goes upstream: {upstream_body}"
    );
    assert_eq!(
        family.requests().len(),
        2,
        "the family pool heard nothing more"
    );
    assert_eq!(
        envoy_stat(e, "realtime_filter_requests_upstream_rejected"),
        1.0
    );
    // A model the provider does not know is the client's fault, not the worker's.
    assert_eq!(
        envoy_stat(e, "realtime_filter_worker_any_1_setups_failed"),
        0.0
    );

    // No statistic is named after a model a client asked for: names and labels only, since
    // a value (a byte count, a timestamp) may contain "2099" by chance.
    let stats = http::get(e.admin(), "/stats/prometheus").unwrap().text();
    let series: Vec<&str> = stats
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _value)| series))
        .collect();
    assert!(!series.is_empty(), "Envoy exported no statistics:\n{stats}");
    for asked in ["2099", "ultra"] {
        let named: Vec<&&str> = series.iter().filter(|s| s.contains(asked)).collect();
        assert!(
            named.is_empty(),
            "statistics name the model {asked}: {named:?}"
        );
    }
}
