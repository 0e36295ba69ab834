//! Call ownership over real gRPC, with real calls through the echo model: a call belongs to
//! the principal that created it; GetCall and HangupCall act for that principal or for an
//! operator, and anyone else gets NOT_FOUND exactly as for an id that never existed.

mod common;

use common::Harness;
use echo_model::ClientConfig;
use realtime_relay_proto::v1;
use std::time::Duration;
use tonic::{Code, Status};

const T: Duration = Duration::from_secs(10);
const ALICE: &str = "p_a11ce0123456789abcdef";
const MALLORY: &str = "p_ma11ory0123456789abcd";

/// Who asks: (principal, operator).
type Asker<'a> = (&'a str, bool);
const OWNER: Asker = (ALICE, false);
const STRANGER: Asker = (MALLORY, false);
const NOBODY: Asker = ("", false);
const OPERATOR: Asker = ("", true);

async fn get(
    h: &mut Harness,
    call_id: &str,
    (principal, operator): Asker<'_>,
) -> Result<v1::CallInfo, Status> {
    h.grpc
        .get_call(v1::GetCallRequest {
            call_id: call_id.into(),
            principal: principal.into(),
            operator,
        })
        .await
        .map(|r| r.into_inner())
}

async fn hangup(
    h: &mut Harness,
    call_id: &str,
    (principal, operator): Asker<'_>,
) -> Result<v1::HangupCallResponse, Status> {
    h.grpc
        .hangup_call(v1::HangupCallRequest {
            call_id: call_id.into(),
            principal: principal.into(),
            operator,
        })
        .await
        .map(|r| r.into_inner())
}

/// An id of the same shape and length as `call_id` that no call has.
fn unknown_like(call_id: &str) -> String {
    let (prefix, random) = call_id.rsplit_once('_').expect("rtc_…");
    let other = if random.starts_with('f') { "e" } else { "f" };
    format!("{prefix}_{}", other.repeat(random.len()))
}

/// Asserts that `refused` (about `call_id`) is the answer an id that never existed gets
/// (`unknown`, about `unknown_id`): the same code, details and metadata, and the same
/// message byte for byte once each id is replaced by a placeholder.
fn assert_same_as_unknown(refused: &Status, call_id: &str, unknown: &Status, unknown_id: &str) {
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    assert_eq!(refused.code(), unknown.code());
    assert_eq!(
        refused.message().replace(call_id, "<id>").as_bytes(),
        unknown.message().replace(unknown_id, "<id>").as_bytes(),
    );
    assert!(refused.message().contains(call_id), "{refused:?}");
    assert_eq!(refused.details(), unknown.details());
    let headers = |s: &Status| {
        let mut h: Vec<(String, Vec<u8>)> = s
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .filter(|(k, _)| k.as_str() != "date")
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        h.sort();
        h
    };
    assert_eq!(headers(refused), headers(unknown));
}

/// Both GetCall and HangupCall by `asker` about `call_id` are refused exactly as for an id
/// that never existed.
async fn refused_as_unknown(h: &mut Harness, call_id: &str, asker: Asker<'_>) {
    let unknown_id = unknown_like(call_id);
    assert_eq!(unknown_id.len(), call_id.len());
    let refused = get(h, call_id, asker)
        .await
        .expect_err("GetCall is refused");
    let unknown = get(h, &unknown_id, asker).await.unwrap_err();
    assert_same_as_unknown(&refused, call_id, &unknown, &unknown_id);
    let refused = hangup(h, call_id, asker)
        .await
        .expect_err("HangupCall is refused");
    let unknown = hangup(h, &unknown_id, asker).await.unwrap_err();
    assert_same_as_unknown(&refused, call_id, &unknown, &unknown_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_gets_not_found_as_for_an_unknown_id_and_the_call_goes_on() {
    let mut h = Harness::start(&[]).await;
    let (call_id, mut client) = h
        .call_owned_by(ALICE, ClientConfig::default(), "m", "")
        .await;
    // Another principal, and a request with none, are strangers to Alice's call.
    for stranger in [STRANGER, NOBODY] {
        refused_as_unknown(&mut h, &call_id, stranger).await;
    }
    // The refused hangups changed nothing: the call is live and relays both ways.
    assert_eq!(h.relay.relay.registry().live_count(), 1);
    assert!(client.is_alive());
    common::media_flows(&mut client).await;
    let info = h
        .wait_for_state(&call_id, v1::CallState::Connected, T)
        .await;
    assert_eq!(info.state, v1::CallState::Connected as i32, "{info:?}");
    assert!(
        info.upstream_to_client.unwrap().rtp_packets >= 10,
        "{info:?}"
    );
    let text = h.metrics_text().await;
    assert_eq!(common::metric(&text, "realtime_relay_calls_active"), 1.0);
    assert_eq!(common::metric(&text, "realtime_relay_calls_connected"), 1.0);
    assert!(!text.contains(ALICE) && !text.contains(MALLORY), "{text}");

    // Ended, the call is still Alice's: strangers get NOT_FOUND for it too.
    let ended = hangup(&mut h, &call_id, OWNER).await.unwrap();
    assert!(ended.ended_now);
    assert!(client.wait_closed(T).await);
    for stranger in [STRANGER, NOBODY] {
        refused_as_unknown(&mut h, &call_id, stranger).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_gets_and_ends_its_call_and_only_operators_see_whose_it_is() {
    let mut h = Harness::start(&[]).await;
    let (call_id, client) = h
        .call_owned_by(ALICE, ClientConfig::default(), "m", "")
        .await;
    let mine = get(&mut h, &call_id, OWNER)
        .await
        .expect("the owner sees it");
    assert_eq!(mine.call_id, call_id);
    assert_eq!(mine.principal, "", "only operators are shown the principal");
    let seen = get(&mut h, &call_id, OPERATOR).await.unwrap();
    assert_eq!(seen.principal, ALICE);
    let list = h
        .grpc
        .list_calls(v1::ListCallsRequest {
            include_ended: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.calls.len(), 1);
    assert_eq!(list.calls[0].principal, ALICE, "ListCalls is for operators");

    let ended = hangup(&mut h, &call_id, OWNER)
        .await
        .expect("the owner ends it");
    assert!(ended.ended_now);
    let info = ended.call.unwrap();
    assert_eq!(info.state, v1::CallState::Ended as i32);
    assert_eq!(info.end_reason, "hangup");
    assert_eq!(info.principal, "");
    assert!(client.wait_closed(T).await);
    assert_eq!(h.relay.relay.registry().live_count(), 0);
    // Retried by its owner, the hangup is answered as before; the ended call keeps its owner.
    let again = hangup(&mut h, &call_id, OWNER).await.unwrap();
    assert!(!again.ended_now);
    assert_eq!(
        get(&mut h, &call_id, OWNER).await.unwrap().end_reason,
        "hangup"
    );
    assert_eq!(
        get(&mut h, &call_id, OPERATOR).await.unwrap().principal,
        ALICE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_and_ends_anyones_call() {
    let mut h = Harness::start(&[]).await;
    let (call_id, client) = h
        .call_owned_by(ALICE, ClientConfig::default(), "m", "")
        .await;
    // An operator identity may carry a principal of its own, or none.
    let seen = get(&mut h, &call_id, (MALLORY, true)).await.unwrap();
    assert_eq!(seen.principal, ALICE);
    let ended = hangup(&mut h, &call_id, OPERATOR).await.unwrap();
    assert!(ended.ended_now);
    let info = ended.call.unwrap();
    assert_eq!(info.end_reason, "hangup");
    assert_eq!(info.principal, ALICE);
    assert!(client.wait_closed(T).await);
    assert_eq!(h.relay.relay.registry().live_count(), 0);
}

/// Calls from callers that send no principal stay manageable by anyone, as before the field
/// existed, while a call with an owner beside them is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_created_without_a_principal_is_anyones_as_before() {
    let mut h = Harness::start(&[]).await;
    let (open_id, open_client) = h.call(ClientConfig::default(), "m", "").await;
    let (owned_id, owned_client) = h
        .call_owned_by(ALICE, ClientConfig::default(), "m", "")
        .await;
    for asker in [NOBODY, STRANGER, OWNER] {
        let info = get(&mut h, &open_id, asker).await.expect("anyone sees it");
        assert_eq!(info.principal, "");
    }
    refused_as_unknown(&mut h, &owned_id, STRANGER).await;
    let ended = hangup(&mut h, &open_id, STRANGER)
        .await
        .expect("anyone ends it");
    assert!(ended.ended_now);
    assert!(open_client.wait_closed(T).await);
    // Retried with no principal at all, as every caller did before.
    assert!(!hangup(&mut h, &open_id, NOBODY).await.unwrap().ended_now);
    assert!(owned_client.is_alive());
    assert_eq!(h.relay.relay.registry().live_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_principal_is_refused_before_any_upstream_request() {
    let mut h = Harness::start(&[]).await;
    let (_c, offer) = echo_model::TestClient::new(ClientConfig::default()).unwrap();
    let too_long = format!("p_{}", "a".repeat(127));
    for principal in [
        too_long.as_str(),
        "p_ab cd",
        " p_abcd",
        "p_ab\tcd",
        "p_ab\ncd",
        "p_ab\u{7f}",
        "p_\u{0}",
        "p_äbcd",
    ] {
        let request = v1::CreateCallRequest {
            principal: principal.into(),
            ..h.request(&offer, "m", "")
        };
        let err = h.grpc.create_call(request).await.expect_err(principal);
        assert_eq!(err.code(), Code::InvalidArgument, "{principal:?}: {err:?}");
        assert_eq!(
            realtime_relay_proto::split_status_message(err.message()).0,
            Some("invalid_principal"),
            "{principal:?}: {err:?}"
        );
        assert!(!err.message().contains(principal), "not echoed: {err:?}");
    }
    assert!(
        h.provider.requests().is_empty(),
        "the upstream heard nothing"
    );
    assert_eq!(h.relay.relay.registry().live_count(), 0);

    // On GetCall and HangupCall it is refused before any lookup: the answer is the same for
    // a call that exists and for one that does not.
    let (call_id, client) = h
        .call_owned_by(ALICE, ClientConfig::default(), "m", "")
        .await;
    for id in [call_id.clone(), unknown_like(&call_id)] {
        let err = get(&mut h, &id, ("p_ab cd", false)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("invalid_principal: "), "{err:?}");
        let err = hangup(&mut h, &id, ("p_ab cd", false)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("invalid_principal: "), "{err:?}");
    }
    assert!(client.is_alive());
    assert_eq!(h.relay.relay.registry().live_count(), 1);
}
