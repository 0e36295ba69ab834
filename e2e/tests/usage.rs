//! Usage metering through the real Envoy, filter, relay and echo model: the relay reads the
//! provider's `response.done` usage (and `rate_limits.updated`, and GPT-Live's cumulative
//! seconds) from the events it relays, and reports exact totals in GetCall, in Prometheus,
//! in the `call.usage` record at the call's end, and to `WatchCalls` watchers as calls live
//! (created → connected → usage updated → ended, two calls at once).

mod common;

use common::*;
use echo_model::responses::usage_for;
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::call_event::Kind as EventKind;
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::runtime::Runtime;
use xtask::launch::Relay;

async fn client(relay: &Relay) -> RelayServiceClient<tonic::transport::Channel> {
    RelayServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .expect("gRPC to the relay")
}

fn get_call(rt: &Runtime, relay: &Relay, call_id: &str) -> v1::CallInfo {
    rt.block_on(async {
        let mut c = client(relay).await;
        tokio::time::timeout(
            T,
            c.get_call(v1::GetCallRequest {
                call_id: call_id.to_string(),
                operator: true,
                ..Default::default()
            }),
        )
        .await
        .expect("GetCall answered in time")
        .expect("GetCall")
        .into_inner()
    })
}

/// The value of the one series of `name` whose labels include all of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[test]
fn token_usage_is_exact_in_getcall_prometheus_the_usage_record_and_watch_calls() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let g = gateway(
        "usage",
        &[p.base_url()],
        single_worker(&p.base_url(), "inject_if_missing"),
    );

    // A watcher first: it sees every call from its creation.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<v1::CallEvent>();
    let relay_grpc = g.relay.grpc;
    let watcher = rt.spawn(async move {
        let mut c = RelayServiceClient::connect(format!("http://{relay_grpc}"))
            .await
            .unwrap();
        let mut s = c
            .watch_calls(v1::WatchCallsRequest {})
            .await
            .unwrap()
            .into_inner();
        while let Ok(Some(e)) = s.message().await {
            if tx.send(e).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    // Two calls at once; three responses on the first, one on the second.
    let mut calls = Vec::new();
    for _ in 0..2 {
        let (c, offer) = new_client();
        let r = post_sdp(&g.envoy, CALLS, &offer, &[]);
        let id = created(&r);
        calls.push((id, exercise(&rt, c, &r.text())));
    }
    let event =
        r#"{"type":"response.create","event_id":"usage-1","response":{"instructions":"count me"}}"#;
    for (n, (_, c)) in [3u64, 1].iter().zip(calls.iter_mut()) {
        rt.block_on(async {
            for _ in 0..*n {
                c.send_text(event).await.unwrap();
                let done = c.wait_for_event_type("response.done", T).await.unwrap();
                assert_eq!(done["response"]["status"], "completed");
            }
        });
    }
    // (`exercise` sent one response.create of its own on each call: count it too.)
    let first = r#"{"type":"response.create","event_id":"e2e-1"}"#;
    // The echo model's usage depends on each response's index (the second onward is
    // cached), so sum in call order.
    let sum_call = |extra: u64| {
        let mut t = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut i = 0;
        for (len, n) in [(first.len(), 1u64), (event.len(), extra)] {
            for _ in 0..n {
                let u = usage_for(len, i);
                let get = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap();
                t.0 += get("/total_tokens");
                t.1 += get("/input_tokens");
                t.2 += get("/output_tokens");
                t.3 += get("/input_token_details/cached_tokens");
                t.4 += get("/output_token_details/audio_tokens");
                i += 1;
            }
        }
        t
    };
    let want = [sum_call(3), sum_call(1)];

    // GetCall: exact totals, the responses counted, the latest rate limits.
    for ((id, _), w) in calls.iter().zip(want) {
        let info = get_call(&rt, &g.relay, id);
        let u = info.usage.expect("usage");
        let t = u.tokens.expect("tokens");
        assert_eq!(
            (
                t.total_tokens,
                t.input_tokens,
                t.output_tokens,
                t.input_cached_tokens,
                t.output_audio_tokens
            ),
            w,
            "{id}"
        );
        assert_eq!(info.api, v1::Api::Realtime as i32);
        assert_eq!(u.rate_limits.len(), 2, "{:?}", u.rate_limits);
        assert_eq!(u.rate_limits[0].name, "requests");
        assert!(!u.partial, "every response is done");
    }
    assert_eq!(
        get_call(&rt, &g.relay, &calls[0].0)
            .usage
            .unwrap()
            .responses,
        4
    );

    // Prometheus: the same totals by model, worker, direction and kind.
    let text = g.relay.metrics_text().unwrap();
    let m = |labels: &[&str]| series(&text, "realtime_relay_usage_tokens_total", labels);
    let all_output: u64 = want.iter().map(|w| w.2).sum();
    let all_cached: u64 = want.iter().map(|w| w.3).sum();
    assert_eq!(
        m(&[
            r#"model="gpt-realtime""#,
            r#"worker="worker-1""#,
            r#"direction="output""#
        ]) as u64,
        all_output,
        "{text}"
    );
    assert_eq!(m(&[r#"kind="cached""#]) as u64, all_cached);
    assert_eq!(
        series(
            &text,
            "realtime_relay_usage_responses_total",
            &[r#"worker="worker-1""#]
        ) as u64,
        6
    );
    assert!(
        series(
            &text,
            "realtime_relay_rate_limit_remaining",
            &[r#"name="tokens""#]
        ) > 0.0
    );

    // Both calls end; the call.usage record of each carries its totals.
    for (id, _) in &calls {
        assert_eq!(hangup(&g.envoy, id).status, 200);
    }
    g.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();
    let log = g.relay.log_text();
    for ((id, _), w) in calls.iter().zip(want) {
        let line = log
            .lines()
            .find(|l| l.contains("call.usage") && l.contains(id.as_str()))
            .unwrap_or_else(|| panic!("no call.usage record for {id}:\n{log}"));
        assert!(line.contains(&format!("tokens_total={}", w.0)), "{line}");
        assert!(
            line.contains("end_reason=hangup") && line.contains("partial=false"),
            "{line}"
        );
        assert!(!line.contains(KEY));
    }

    // The watcher saw each call's life in order, usage updates with growing totals.
    let mut seen: Vec<v1::CallEvent> = Vec::new();
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + T;
        while seen
            .iter()
            .filter(|e| e.kind == EventKind::Ended as i32)
            .count()
            < 2
        {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => seen.push(e),
                _ => panic!("the watcher saw {} events", seen.len()),
            }
        }
    });
    for ((id, _), w) in calls.iter().zip(want) {
        let mine: Vec<&v1::CallEvent> = seen
            .iter()
            .filter(|e| e.call.as_ref().is_some_and(|c| &c.call_id == id))
            .collect();
        let kinds: Vec<i32> = mine.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds.first(),
            Some(&(EventKind::Created as i32)),
            "{kinds:?}"
        );
        assert_eq!(
            kinds.get(1),
            Some(&(EventKind::Connected as i32)),
            "{kinds:?}"
        );
        assert_eq!(kinds.last(), Some(&(EventKind::Ended as i32)), "{kinds:?}");
        let totals: Vec<u64> = mine
            .iter()
            .filter(|e| e.kind == EventKind::UsageUpdated as i32)
            .map(|e| {
                e.call
                    .as_ref()
                    .unwrap()
                    .usage
                    .as_ref()
                    .unwrap()
                    .tokens
                    .unwrap()
                    .total_tokens
            })
            .collect();
        assert!(totals.windows(2).all(|p| p[0] <= p[1]), "{totals:?}");
        assert_eq!(totals.last(), Some(&w.0), "{totals:?}");
        let ended = mine.last().unwrap().call.as_ref().unwrap();
        assert_eq!(ended.end_reason, "hangup");
    }
    watcher.abort();
    drop(calls);
}

/// A GPT-Live session's usage is its latest cumulative seconds: never a sum of reports, final
/// with `session.closed`, partial without it.
#[test]
fn live_seconds_are_a_running_total_final_at_session_closed() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let cfg = plugin_config(
        json!([
            { "name": "gpt-realtime", "pools": ["main"] },
            { "name": "gpt-live-1", "api": "live", "pools": ["main"] }
        ]),
        json!([{ "name": "main", "key_policy": "inject_if_missing", "workers": [
            { "id": "worker-1", "base_url": p.base_url(), "key_env": "OPENAI_API_KEY" }
        ]}]),
        json!({}),
    );
    let g = gateway("usage-live", &[p.base_url()], cfg);
    let (c, offer) = new_client();
    let body = json!({ "session": { "model": "gpt-live-1" },
                       "transport": { "type": "webrtc", "sdp": offer } });
    let r = post(
        &g.envoy,
        "/v1/live/sessions",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_str(&r.text()).unwrap();
    let id = v["session"]["id"].as_str().unwrap().to_string();
    let mut c = rt
        .block_on(c.connect(v["transport"]["sdp"].as_str().unwrap()))
        .unwrap();
    let reports: Vec<f64> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..3 {
            let e = c
                .wait_for_event_type("session.usage.updated", T)
                .await
                .unwrap();
            out.push(e["usage"]["seconds"].as_f64().unwrap());
        }
        out
    });
    let running = get_call(&rt, &g.relay, &id).usage.unwrap();
    assert!(
        running.audio_seconds >= reports[2] && running.audio_seconds < reports.iter().sum::<f64>(),
        "a total, not a sum: {} after {reports:?}",
        running.audio_seconds
    );
    assert!(running.partial, "no session.closed yet");

    // The client asks to close: the final figure comes with session.closed.
    let closed = rt.block_on(async {
        c.send_text(r#"{"type":"session.close","event_id":"bye"}"#)
            .await
            .unwrap();
        c.wait_for_event_type("session.closed", T).await.unwrap()
    });
    let final_seconds = closed["usage"]["seconds"].as_f64().unwrap();
    g.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();
    let info = get_call(&rt, &g.relay, &id);
    let u = info.usage.unwrap();
    assert_eq!(u.audio_seconds, final_seconds);
    assert!(!u.partial);
    assert_eq!(info.end_reason, "session_closed");
    let text = g.relay.metrics_text().unwrap();
    let metered = series(
        &text,
        "realtime_relay_usage_live_audio_seconds_total",
        &[r#"model="gpt-live-1""#],
    );
    assert!(
        (metered - final_seconds).abs() < 1e-6,
        "{metered} vs {final_seconds}"
    );
    let line = g
        .relay
        .log_text()
        .lines()
        .find(|l| l.contains("call.usage") && l.contains(&id))
        .map(str::to_string)
        .expect("a call.usage record");
    assert!(
        line.contains(&format!("audio_seconds={final_seconds}")),
        "{line}"
    );
}

/// A call's budget, through the real Envoy: the pool's token budget ends a Realtime call once
/// its responses reach it (the provider gets `response.cancel`, the client the
/// `budget_exceeded` error event first, its later events go nowhere, and the call ends as
/// `budget_exceeded`); an audio-seconds budget ends a GPT-Live session the same way, the
/// provider asked with `session.close`.
#[test]
fn a_budget_ends_the_call_after_telling_the_client() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let cfg = plugin_config(
        json!([
            { "name": "gpt-realtime", "pools": ["main"] },
            { "name": "gpt-live-1", "api": "live", "pools": ["main"] }
        ]),
        json!([{ "name": "main", "key_policy": "inject_if_missing",
                 "budget": { "tokens_per_call": 100, "audio_seconds_per_call": 1.5 },
                 "workers": [{ "id": "worker-1", "base_url": p.base_url(), "key_env": "OPENAI_API_KEY" }] }]),
        json!({}),
    );
    let g = gateway("budget", &[p.base_url()], cfg);

    // Realtime: `exercise` spends one response's tokens; the next response crosses 100.
    let first = r#"{"type":"response.create","event_id":"e2e-1"}"#;
    let second = r#"{"type":"response.create","event_id":"e2e-2"}"#;
    let total = |len: usize, i: u64| usage_for(len, i)["total_tokens"].as_u64().unwrap();
    let spent = total(first.len(), 0) + total(second.len(), 1);
    assert!(
        total(first.len(), 0) < 100 && spent >= 100,
        "the test's own premise"
    );
    let (c, offer) = new_client();
    let r = post_sdp(&g.envoy, CALLS, &offer, &[]);
    let id = created(&r);
    let mut c = exercise(&rt, c, &r.text());
    let (seen, late_echo) = rt.block_on(async {
        c.send_text(second).await.unwrap();
        let mut seen = Vec::new();
        loop {
            let e = c.next_event(T).await.expect("events until the error");
            let kind = e["type"].as_str().unwrap_or_default().to_string();
            seen.push(e.clone());
            if kind == "error" {
                break;
            }
        }
        // Over budget: the client's next event is not forwarded (no echo comes back).
        c.send_text(r#"{"type":"response.create","event_id":"too-late"}"#)
            .await
            .unwrap();
        let late = c
            .wait_for_event_type("response.create", Duration::from_millis(1500))
            .await
            .ok();
        (seen, late)
    });
    let error = seen.last().unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert_eq!(error["error"]["code"], "budget_exceeded", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{spent} tokens")),
        "{error}"
    );
    assert!(
        seen.iter().any(|e| e["type"] == "response.done"),
        "the response that crossed the budget came first: {seen:?}"
    );
    assert!(
        late_echo.is_none(),
        "an event after the budget went through"
    );
    assert!(rt.block_on(c.wait_closed(T)), "the call ends");
    g.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();
    let info = get_call(&rt, &g.relay, &id);
    assert_eq!(info.end_reason, "budget_exceeded");
    assert_eq!(info.usage.unwrap().tokens.unwrap().total_tokens, spent);
    // The provider was asked to stop: it echoes what it gets, so its echo of response.cancel
    // is in its own counters (one more event than the client sent).
    let upstream = p.stats();
    assert_eq!(upstream.dc_messages_received, 3, "{upstream:?}");

    // GPT-Live: 1.5 audio seconds.
    let (c, offer) = new_client();
    let body = json!({ "session": { "model": "gpt-live-1" },
                       "transport": { "type": "webrtc", "sdp": offer } });
    let r = post(
        &g.envoy,
        "/v1/live/sessions",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_str(&r.text()).unwrap();
    let id = v["session"]["id"].as_str().unwrap().to_string();
    let mut c = rt
        .block_on(c.connect(v["transport"]["sdp"].as_str().unwrap()))
        .unwrap();
    let (error, closed) = rt.block_on(async {
        let error = c
            .wait_for_event_type("error", T)
            .await
            .expect("budget error");
        let closed = c
            .wait_for_event_type("session.closed", T)
            .await
            .expect("the provider's session.closed after the relay's session.close");
        (error, closed)
    });
    assert_eq!(error["error"]["code"], "budget_exceeded", "{error}");
    assert!(
        error.get("client_event_id").is_some(),
        "Live's shape: {error}"
    );
    assert_eq!(closed["reason"], "close_requested");
    assert!(rt.block_on(c.wait_closed(T)));
    g.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();
    let info = get_call(&rt, &g.relay, &id);
    assert_eq!(info.end_reason, "budget_exceeded");
    assert!(info.usage.unwrap().audio_seconds >= 1.5);
    let text = g.relay.metrics_text().unwrap();
    assert_eq!(
        series(
            &text,
            "realtime_relay_calls_ended_total",
            &[r#"reason="budget_exceeded""#]
        ),
        2.0
    );
    assert_eq!(
        series(&text, "realtime_relay_worker_failures_total", &[]),
        0.0,
        "a budget end is no worker failure"
    );
}
