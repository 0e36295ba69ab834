//! Shared set-up for relay tests: an echo-model provider, an in-process relay on
//! ephemeral loopback ports, and a gRPC client to it.
#![allow(dead_code)]

use clap::Parser;
use echo_model::{ClientConfig, ConnectedClient, MockProvider, ProviderConfig, TestClient};
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use relay_service::config::Args;
use relay_service::server::RunningRelay;
use std::time::Duration;
use tonic::transport::Channel;

pub const UPSTREAM_KEY: &str = "sk-test-upstream-7f3a9c1e5b";

pub struct Harness {
    pub provider: MockProvider,
    pub relay: RunningRelay,
    pub grpc: RelayServiceClient<Channel>,
}

pub fn relay_args(provider_url: &str, extra: &[&str]) -> Args {
    let mut argv = vec![
        "realtime-relay".to_string(),
        "--grpc-addr=127.0.0.1:0".into(),
        "--metrics-addr=127.0.0.1:0".into(),
        "--media-addr=127.0.0.1:0".into(),
        "--media-shards=2".into(),
        format!("--allow-upstream={provider_url}"),
        "--allow-private-upstreams".into(),
        "--drain-secs=1".into(),
    ];
    // A flag the test gives replaces the default above (clap refuses a flag given twice).
    argv.retain(|default| {
        let flag = default.split('=').next().unwrap_or_default();
        !extra.iter().any(|e| e.split('=').next() == Some(flag))
    });
    argv.extend(extra.iter().map(|s| s.to_string()));
    Args::parse_from(argv)
}

impl Harness {
    pub async fn start(extra: &[&str]) -> Harness {
        Self::start_with(ProviderConfig::local(Some(UPSTREAM_KEY)), extra).await
    }

    pub async fn start_with(config: ProviderConfig, extra: &[&str]) -> Harness {
        let provider = MockProvider::start(config).await.expect("provider starts");
        let relay = relay_service::server::start(&relay_args(&provider.base_url(), extra))
            .await
            .expect("relay starts");
        let grpc = RelayServiceClient::connect(format!("http://{}", relay.grpc_addr))
            .await
            .expect("gRPC connects");
        Harness {
            provider,
            relay,
            grpc,
        }
    }

    pub fn request(&self, offer: &str, model: &str, session: &str) -> v1::CreateCallRequest {
        v1::CreateCallRequest {
            call_id: String::new(),
            model: model.into(),
            upstream_model: String::new(),
            sdp_offer: offer.into(),
            session_json: session.into(),
            upstream: Some(v1::Upstream {
                base_url: self.provider.base_url(),
                authorization: format!("Bearer {UPSTREAM_KEY}"),
                worker_id: "w1".into(),
            }),
            request_id: "req_test".into(),
            principal: String::new(),
            api: v1::Api::Realtime as i32,
            budget: None,
        }
    }

    /// A full call: offer from a str0m client, CreateCall over gRPC, connect.
    pub async fn call(
        &mut self,
        config: ClientConfig,
        model: &str,
        session: &str,
    ) -> (String, ConnectedClient) {
        self.call_owned_by("", config, model, session).await
    }

    /// A full call created by `principal` (empty: none), which then owns it.
    pub async fn call_owned_by(
        &mut self,
        principal: &str,
        config: ClientConfig,
        model: &str,
        session: &str,
    ) -> (String, ConnectedClient) {
        let (client, offer) = TestClient::new(config).expect("client");
        let request = v1::CreateCallRequest {
            principal: principal.into(),
            ..self.request(&offer, model, session)
        };
        let resp = self
            .grpc
            .create_call(request)
            .await
            .expect("CreateCall succeeds")
            .into_inner();
        let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
            panic!("expected an SDP answer, got {:?}", resp.outcome);
        };
        let connected = client
            .connect(&answer)
            .await
            .expect("client connects through the relay");
        (resp.call_id, connected)
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.relay.metrics_addr))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    pub async fn wait_for_state(
        &mut self,
        call_id: &str,
        state: v1::CallState,
        within: Duration,
    ) -> v1::CallInfo {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let info = self
                .grpc
                // The test watches as an operator: it sees calls whoever owns them.
                .get_call(v1::GetCallRequest {
                    call_id: call_id.into(),
                    operator: true,
                    ..Default::default()
                })
                .await
                .expect("GetCall")
                .into_inner();
            if info.state == state as i32 || tokio::time::Instant::now() >= deadline {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn client_with_pt(pt: u8) -> ClientConfig {
    ClientConfig {
        opus_pt: pt,
        ..ClientConfig::default()
    }
}

/// How long [`media_flows`] waits for each step.
pub const MEDIA_WAIT: Duration = Duration::from_secs(10);

/// An event and audio make the round trip client → relay → echo provider → relay → client.
pub async fn media_flows(client: &mut ConnectedClient) {
    client
        .wait_for_event_type("session.created", MEDIA_WAIT)
        .await
        .expect("session.created");
    events_flow(client, "e1").await;
    client
        .send_audio(25, Duration::from_millis(20))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + MEDIA_WAIT;
    while client.audio_stats().packets_received < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "audio did not come back: {:?}",
            client.audio_stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `response.create` (with `event_id`) makes the round trip client → relay → echo provider
/// → relay → client.
pub async fn events_flow(client: &mut ConnectedClient, event_id: &str) {
    client
        .send_text(&format!(
            r#"{{"type":"response.create","event_id":"{event_id}"}}"#
        ))
        .await
        .unwrap();
    client
        .wait_for_event_type("response.create", MEDIA_WAIT)
        .await
        .expect("the event comes back");
}

/// The value of one metric line (`name{labels}` exactly); fails on a metric that does not exist.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Runs the ignored test `inner` of this test binary again in a new user and network
/// namespace (`unshare -rn`), with `inside_env=1` set, after `setup` (shell, as the
/// namespace's root; it should at least bring `lo` up), and fails with its output if it
/// fails or did not run.
///
/// First `probe` (shell, in a namespace of its own) must succeed: where it does not (no
/// unprivileged namespaces, a kernel without what the test needs), the test is skipped with
/// a visible SKIP line naming `needs`, or fails if `RTGW_REQUIRE_NETNS=1` (CI). Returns
/// whether it ran.
pub fn run_in_network_namespace(
    inner: &str,
    inside_env: &str,
    needs: &str,
    probe: &str,
    setup: &str,
) -> bool {
    use std::io::Write;
    use std::process::Command;
    let probed = Command::new("unshare")
        .args(["-rn", "sh", "-c", probe])
        .output();
    if !probed.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match &probed {
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        if std::env::var("RTGW_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
            panic!("{needs} is required (RTGW_REQUIRE_NETNS=1) but does not work here: {why}");
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {inner}: {needs} does not work here ({why}). This test did not run; set \
             RTGW_REQUIRE_NETNS=1 to make that a failure."
        );
        return false;
    }
    let script = format!("{setup} && exec \"$0\" \"$@\"");
    let output = Command::new("unshare")
        .args(["-rn", "sh", "-c", &script])
        .arg(std::env::current_exe().unwrap())
        .args([
            inner,
            "--exact",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(inside_env, "1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the test inside the namespace failed: {}\n{out}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // A filter that matched nothing would also exit 0: the inner test must have run.
    assert!(
        out.contains("test result: ok. 1 passed"),
        "the test inside the namespace did not run:\n{out}"
    );
    true
}
