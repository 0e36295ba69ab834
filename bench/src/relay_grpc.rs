//! The benchmark's gRPC client of the relay: connect, and CreateCall for one offer.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use tonic::transport::Channel;

pub async fn grpc_client(addr: SocketAddr) -> Result<RelayServiceClient<Channel>> {
    RelayServiceClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| format!("connecting gRPC to the relay at {addr}"))
}

pub fn create_request(offer: &str, base_url: &str, authorization: &str) -> v1::CreateCallRequest {
    v1::CreateCallRequest {
        call_id: String::new(),
        model: "gpt-realtime".into(),
        upstream_model: String::new(),
        sdp_offer: offer.into(),
        session_json: String::new(),
        upstream: Some(v1::Upstream {
            base_url: base_url.into(),
            authorization: authorization.into(),
            worker_id: "bench".into(),
        }),
        request_id: "bench".into(),
        principal: String::new(),
        api: v1::Api::Realtime as i32,
        budget: None,
    }
}

/// CreateCall; returns (call id, SDP answer).
pub async fn create_call(
    grpc: &mut RelayServiceClient<Channel>,
    req: v1::CreateCallRequest,
) -> Result<(String, String)> {
    let resp = grpc.create_call(req).await?.into_inner();
    match resp.outcome {
        Some(v1::create_call_response::Outcome::SdpAnswer(a)) => Ok((resp.call_id, a)),
        other => bail!("no SDP answer: {other:?}"),
    }
}
