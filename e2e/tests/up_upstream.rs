//! `cargo xtask up --upstream URL`, as `up` starts it (`xtask::stack::Stack` with a provider
//! upstream, the shipped `envoy/envoy.yaml` rendered the way `up` renders it, the real relay
//! and Envoy with the filter), in front of a provider that knows no model: every model,
//! listed or not, reaches the provider, and its own 400 `model_not_found` reaches the client
//! verbatim; and `gpt-live-1` stays a GPT-Live model there, set up on the provider's
//! `/v1/live/sessions`.
//!
//! Alone in its file on purpose: `Stack` takes the provider key from `OPENAI_API_KEY` in the
//! environment, which this test sets, and no other test of this process may run meanwhile.

use e2e::{http, FakeUpstream, Paths};
use xtask::stack::{Stack, StackConfig, Upstream};

const REFUSAL: &str = r#"{"error":{"message":"The model `gpt-realtime-2099-01-01` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
const KEY: &str = "sk-e2e-up-upstream-5d2c0b7e";

#[test]
fn up_with_an_upstream_sends_every_model_to_it_and_passes_its_refusal_on() {
    let paths = Paths::discover();
    let provider = FakeUpstream::start(400, "application/json", REFUSAL).expect("fake provider");
    // The only test in this process: nothing reads the environment concurrently.
    std::env::set_var("OPENAI_API_KEY", KEY);
    let mut cfg = StackConfig::ephemeral(&paths, "up-upstream").expect("ports");
    cfg.upstream = Upstream::Provider {
        base_url: format!("http://127.0.0.1:{}", provider.port),
    };
    // A real provider is public; this one is on loopback, which the relay refuses unless told.
    cfg.relay_args.push("--allow-private-upstreams".into());
    let listen: std::net::SocketAddr = format!("{}:{}", cfg.host, cfg.listen_port).parse().unwrap();
    let stack = Stack::start(&paths, cfg).expect("the stack of `up --upstream` starts");

    let (_client, offer) = echo_model::TestClient::new(Default::default()).expect("client");
    for (i, model) in ["gpt-realtime-2099-01-01", "whisper-1", "gpt-realtime"]
        .iter()
        .enumerate()
    {
        let r = http::request(
            listen,
            "POST",
            &format!("/v1/realtime/calls?model={model}"),
            &[("content-type", "application/sdp")],
            offer.as_bytes(),
        )
        .expect("HTTP to Envoy");
        assert_eq!(r.status, 400, "{model}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{model}"
        );
        assert_eq!(
            r.text(),
            REFUSAL,
            "{model}: the provider's answer, verbatim"
        );
        let heard = provider.recorded();
        assert_eq!(heard.len(), i + 1, "{model}: the provider was asked");
        let last = heard.last().unwrap();
        let body = String::from_utf8_lossy(&last.body);
        assert!(
            body.contains(&format!(r#""model":"{model}""#)),
            "{model} goes upstream as asked for: {body}"
        );
        assert!(
            last.head.to_ascii_lowercase().contains(&format!(
                "authorization: bearer {}",
                KEY.to_ascii_lowercase()
            )),
            "{model}: the provider key is injected"
        );
    }

    // GPT-Live: the Live model goes to the same provider's Live endpoint as JSON, with the
    // provider key, and its refusal comes back verbatim too.
    let body = serde_json::json!({ "session": { "model": "gpt-live-1" },
                                   "transport": { "type": "webrtc", "sdp": offer } });
    let r = http::request(
        listen,
        "POST",
        "/v1/live/sessions",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
    .expect("HTTP to Envoy");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.text(), REFUSAL, "the provider's answer, verbatim");
    let heard = provider.recorded();
    assert_eq!(heard.len(), 4, "the provider was asked");
    let last = heard.last().unwrap();
    assert!(
        last.head.starts_with("POST /v1/live/sessions "),
        "{}",
        last.head.lines().next().unwrap_or_default()
    );
    let sent: serde_json::Value = serde_json::from_slice(&last.body).expect("JSON upstream");
    assert_eq!(sent["session"]["model"], "gpt-live-1");
    assert_eq!(sent["transport"]["type"], "webrtc");
    assert!(last.head.to_ascii_lowercase().contains(&format!(
        "authorization: bearer {}",
        KEY.to_ascii_lowercase()
    )));
    drop(stack);
}
