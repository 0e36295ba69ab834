//! Call creation with and without `allow_on_headers_stop_iteration` in the real Envoy.
//!
//! Istio's WasmPlugin cannot set that flag, and without it a filter that pauses in the
//! headers callback never gets the body (the pause becomes stop-all). With
//! `continue_headers` the filter lets the headers go on (to `realtime_hold`, an internal
//! listener that answers nothing before the body) and holds the body instead.

mod common;

use common::*;
use e2e::http;
use serde_json::json;
use std::time::Duration;

const FLAG: &str = "allow_on_headers_stop_iteration: true";

fn config(base_url: &str, continue_headers: bool) -> String {
    plugin_config(
        json!([{ "name": "gpt-realtime", "pools": ["main"] }]),
        json!([{ "name": "main", "key_policy": "inject_if_missing", "workers": [
            { "id": "worker-1", "base_url": base_url, "key_env": "OPENAI_API_KEY" }
        ]}]),
        json!({ "continue_headers": continue_headers }),
    )
}

/// Requests the router sent to the `realtime_hold` cluster (Envoy's plain stats: the
/// Prometheus form sums the same counter over every cluster).
fn hold_requests(e: &e2e::Envoy) -> f64 {
    let name = "cluster.realtime_hold.upstream_rq_total";
    let text = http::get(e.admin(), &format!("/stats?filter=^{name}$"))
        .expect("Envoy admin")
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text:?}"))
}

/// Creates (both body forms), a refusal, media and hangup work in both modes; in the
/// continue mode the router's request really went to `realtime_hold` and nowhere else.
#[test]
fn creates_and_hangups_work_with_the_flag_and_without_it() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    for (flag, continue_headers) in [(true, false), (false, true)] {
        let name = format!("headers-flag-{flag}");
        let patches = vec![(
            FLAG.to_string(),
            format!("allow_on_headers_stop_iteration: {flag}"),
        )];
        let g = gateway_with(
            &name,
            &[p.base_url()],
            config(&p.base_url(), continue_headers),
            patches,
        );
        let e = &g.envoy;
        let before = p.requests().len();

        let (c1, offer) = new_client();
        let r = post_sdp(e, CALLS, &offer, &[]);
        let id1 = created(&r);
        let a1 = exercise(&rt, c1, &r.text());
        let (_c2, offer) = new_client();
        let body = multipart("hdrMode5", &offer, Some(r#"{"model":"gpt-realtime"}"#));
        let r = post(
            e,
            CALLS,
            &[("content-type", "multipart/form-data; boundary=hdrMode5")],
            &body,
        );
        let id2 = created(&r);
        let r = post(e, CALLS, &[("content-type", "application/sdp")], b"hello");
        assert_eq!(r.status, 400, "flag {flag}: {}", r.text());
        assert_eq!(r.json().unwrap()["error"]["code"], "invalid_sdp");
        for id in [&id1, &id2] {
            let r = hangup(e, id);
            assert_eq!(r.status, 200, "flag {flag}: {}", r.text());
        }
        drop(a1);
        // Only the relay's two SDP exchanges reached the provider.
        assert_eq!(p.requests().len() - before, 2, "flag {flag}");
        let held = hold_requests(e);
        if continue_headers {
            // The two creates waited for the relay long enough for the router's request to
            // reach realtime_hold; the refused one may be answered before it gets there.
            assert!(
                (2.0..=3.0).contains(&held),
                "the router sent the creates' headers to realtime_hold: {held}"
            );
        } else {
            assert_eq!(held, 0.0, "a paused create never reaches the router");
        }
        assert_eq!(envoy_stat(e, "realtime_filter_requests_created"), 2.0);
    }
}

/// What the flag is for: without it and without `continue_headers`, a create is never
/// answered (Envoy turns the pause into stop-all). This is the failure the continue mode
/// exists for; if Envoy changes, this test says so.
#[test]
fn without_the_flag_a_paused_create_gets_no_answer() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let patches = vec![(
        FLAG.to_string(),
        "allow_on_headers_stop_iteration: false".to_string(),
    )];
    let g = gateway_with(
        "headers-stall",
        &[p.base_url()],
        config(&p.base_url(), false),
        patches,
    );
    let (_c, offer) = new_client();
    let r = http::request_within(
        Duration::from_secs(3),
        g.envoy.listen(),
        "POST",
        CALLS,
        &[("content-type", "application/sdp")],
        offer.as_bytes(),
    );
    assert!(r.is_err(), "answered: {:?}", r.map(|r| r.status));
    assert!(p.requests().is_empty());
}

/// Where creates are routed is safe on its own: with the filter off for that route (a
/// misconfiguration), a create gets a 503 JSON and never reaches the provider.
#[test]
fn a_create_the_filter_does_not_handle_never_reaches_the_provider() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let anchor = "cluster: realtime_hold\n                            timeout: 60s\n                          typed_per_filter_config:\n";
    let patches = vec![(
        anchor.to_string(),
        format!(
            "{anchor}                            envoy.filters.http.wasm:\n                              \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig\n                              disabled: true\n"
        ),
    )];
    let g = gateway_with(
        "headers-unfiltered",
        &[p.base_url()],
        config(&p.base_url(), false),
        patches,
    );
    let (_c, offer) = new_client();
    let r = post_sdp(
        &g.envoy,
        CALLS,
        &offer,
        &[("authorization", "Bearer sk-client")],
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], "filter_not_applied", "{v}");
    assert_eq!(v["error"].as_object().unwrap().len(), 4, "{v}");
    assert!(p.requests().is_empty());
    assert_eq!(hold_requests(&g.envoy), 1.0);
}
