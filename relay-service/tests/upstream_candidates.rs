//! The ICE candidates in the upstream's SDP answer get the relay's private-address policy.
//!
//! These tests run on loopback, where the provider's URL itself is private: without
//! `--allow-private-upstreams` the relay refuses that URL (`upstream_not_allowed`) before
//! any exchange, so an answer is never reached. What this file proves end to end is the
//! other half: with the flag, an answer whose only candidate is a private address the
//! provider chose is used as is (nothing counted as refused). The refusal of such an answer
//! without the flag is proven on the relay's setup stages in `relay.rs`
//! (`a_private_only_upstream_answer_is_refused_unless_private_upstreams_are_allowed`) and on
//! the candidate filter in `allowlist.rs`.

mod common;

use common::{relay_args, UPSTREAM_KEY};
use echo_model::provider::{CallLimits, MockProvider, ProviderConfig};
use echo_model::{ClientConfig, TestClient};
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const REFUSED: &str = "realtime_relay_upstream_addresses_refused_total";

fn request(provider: &MockProvider, offer: &str) -> v1::CreateCallRequest {
    v1::CreateCallRequest {
        call_id: String::new(),
        model: "m".into(),
        upstream_model: String::new(),
        sdp_offer: offer.into(),
        session_json: String::new(),
        upstream: Some(v1::Upstream {
            base_url: provider.base_url(),
            authorization: format!("Bearer {UPSTREAM_KEY}"),
            worker_id: "w1".into(),
        }),
        request_id: "req_test".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_only_upstream_answer_is_used_with_allow_private_upstreams() {
    let limits = CallLimits {
        advertised_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ..CallLimits::default()
    };
    let provider =
        MockProvider::start_with_limits(ProviderConfig::local(Some(UPSTREAM_KEY)), limits)
            .await
            .unwrap();
    let args = relay_args(&provider.base_url(), &[]);
    assert!(args.allow_private_upstreams);
    let relay = relay_service::server::start(&args).await.unwrap();
    let mut grpc = RelayServiceClient::connect(format!("http://{}", relay.grpc_addr))
        .await
        .unwrap();

    let (client, offer) = TestClient::new(ClientConfig::default()).unwrap();
    let resp = grpc
        .create_call(request(&provider, &offer))
        .await
        .expect("CreateCall succeeds")
        .into_inner();
    let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
        panic!("expected an SDP answer, got {:?}", resp.outcome);
    };
    // The provider's answer named only its loopback candidate.
    let seen = provider.requests();
    assert_eq!(seen.len(), 1);
    let mut client = client.connect(&answer).await.expect("client connects");
    client
        .wait_for_event_type("session.created", T)
        .await
        .expect("session.created comes from the provider through the private candidate");

    let metrics = reqwest::get(format!("http://{}/metrics", relay.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in relay_service::metrics::UPSTREAM_REFUSAL_REASONS {
        let series = format!("{REFUSED}{{reason=\"{reason}\"}} ");
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no metric {series} in:\n{metrics}"));
        assert_eq!(
            value.trim(),
            "0",
            "nothing refused with private upstreams allowed: {series}"
        );
    }
}
