//! The ICE candidates in the upstream's SDP answer get the relay's private-address policy.
//!
//! On loopback the provider's URL is itself private, so without `--allow-private-upstreams`
//! the relay would refuse the URL (`upstream_not_allowed`) before any exchange. Hence two
//! shapes: on loopback with the flag, an answer whose only candidate is private is used; in a
//! user + network namespace (`unshare -rn`) where the provider has a public address, without
//! the flag, the same private-only answer is refused after the exchange
//! (`upstream_candidates_not_allowed`, counted against the worker) and an answer with the
//! provider's public candidate gives a working call.

mod common;

use common::{metric, relay_args, run_in_network_namespace, UPSTREAM_KEY};
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
        principal: String::new(),
        api: v1::Api::Realtime as i32,
        budget: None,
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

/// Where the provider of the namespace test lives: just above CGNAT's 100.64.0.0/10, so a
/// globally reachable address by IANA's registries, alone on the namespace's loopback.
const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(100, 128, 0, 1);
/// Set in the namespace the outer test starts; the inner test refuses to run without it.
const INSIDE: &str = "RTGW_UPSTREAM_CANDIDATES_INSIDE_NETNS";
const INNER: &str = "without_allow_private_upstreams_only_public_answer_candidates_are_used";

/// Runs [`without_allow_private_upstreams_only_public_answer_candidates_are_used`] in a new
/// user and network namespace where the provider has a public address, so the relay can run
/// without `--allow-private-upstreams` and still reach it. Skips (with a visible SKIP line)
/// where unprivileged namespaces are unavailable, unless `RTGW_REQUIRE_NETNS=1`.
#[test]
fn the_answer_candidate_policy_holds_end_to_end_in_a_network_namespace() {
    run_in_network_namespace(
        INNER,
        INSIDE,
        "`unshare -rn`",
        "true",
        &format!("ip link set lo up && ip addr add {PUBLIC_IP}/32 dev lo"),
    );
}

/// A relay without `--allow-private-upstreams` and a provider at a public address: an answer
/// whose only candidate is private is refused as the worker's fault after the exchange, and
/// the same provider advertising its public address gets a working call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside a network namespace, started by the_answer_candidate_policy_holds_end_to_end_in_a_network_namespace"]
async fn without_allow_private_upstreams_only_public_answer_candidates_are_used() {
    assert_eq!(
        std::env::var(INSIDE).as_deref(),
        Ok("1"),
        "run by the outer test"
    );
    for (advertised, refused) in [(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), true), (None, false)] {
        let config = ProviderConfig {
            http_addr: (PUBLIC_IP, 0).into(),
            media_ip: IpAddr::V4(PUBLIC_IP),
            ..ProviderConfig::local(Some(UPSTREAM_KEY))
        };
        let limits = CallLimits {
            advertised_ip: advertised,
            ..CallLimits::default()
        };
        let provider = MockProvider::start_with_limits(config, limits)
            .await
            .unwrap();
        let mut args = relay_args(&provider.base_url(), &[]);
        args.allow_private_upstreams = false;
        let relay = relay_service::server::start(&args).await.unwrap();
        let mut grpc = RelayServiceClient::connect(format!("http://{}", relay.grpc_addr))
            .await
            .unwrap();
        let (client, offer) = TestClient::new(ClientConfig::default()).unwrap();
        let got = grpc.create_call(request(&provider, &offer)).await;
        assert_eq!(provider.requests().len(), 1, "the exchange happened");
        let metrics_url = format!("http://{}/metrics", relay.metrics_addr);
        if refused {
            let status = got.expect_err("a private-only answer is refused");
            assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
            assert!(
                status
                    .message()
                    .starts_with("upstream_candidates_not_allowed: "),
                "{status:?}"
            );
            assert!(!status.message().contains("127.0.0.1"), "{status:?}");
            let text = reqwest::get(&metrics_url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let reason = |r: &str| metric(&text, &format!("{REFUSED}{{reason=\"{r}\"}}"));
            assert_eq!(reason("candidate_not_public"), 1.0);
            assert_eq!(
                metric(
                    &text,
                    "realtime_relay_setup_failures_total{reason=\"upstream_candidates_not_allowed\"}"
                ),
                1.0
            );
            assert_eq!(
                metric(&text, "realtime_relay_worker_failures_total{worker=\"w1\"}"),
                1.0
            );
        } else {
            let resp = got.expect("CreateCall succeeds").into_inner();
            let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
                panic!("expected an SDP answer, got {:?}", resp.outcome);
            };
            let mut client = client.connect(&answer).await.expect("client connects");
            client
                .wait_for_event_type("session.created", T)
                .await
                .expect("session.created through the public candidate");
            let text = reqwest::get(&metrics_url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            for reason in relay_service::metrics::UPSTREAM_REFUSAL_REASONS {
                assert_eq!(
                    metric(&text, &format!("{REFUSED}{{reason=\"{reason}\"}}")),
                    0.0
                );
            }
        }
    }
}
