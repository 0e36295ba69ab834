//! tonic adapter: gRPC requests onto [`Relay`]'s domain operations.

use crate::budget::parse_grpc_timeout;
use crate::call_state::Caller;
use crate::error::SetupError;
use crate::relay::{LookupError, Relay};
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::relay_service_server::RelayService;
use realtime_relay_proto::{metadata as md, ErrorCode, ERROR_CODE_SEPARATOR};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct RelayGrpc {
    pub relay: Arc<Relay>,
}

fn metadata(req: &Request<impl Sized>, key: &str) -> String {
    req.metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The one answer for a call the caller cannot have: unknown, or someone else's. Built from
/// the id alone, so the two cannot differ.
fn not_found(call_id: &str) -> Status {
    let shown: String = call_id.chars().take(80).collect();
    Status::not_found(format!(
        "{}{ERROR_CODE_SEPARATOR}no call {shown:?}",
        ErrorCode::CallNotFound
    ))
}

fn lookup_failed(e: LookupError, call_id: &str) -> Status {
    match e {
        LookupError::NotFound => not_found(call_id),
        LookupError::InvalidPrincipal => SetupError::InvalidPrincipal.into(),
    }
}

#[tonic::async_trait]
impl RelayService for RelayGrpc {
    async fn create_call(
        &self,
        request: Request<v1::CreateCallRequest>,
    ) -> Result<Response<v1::CreateCallResponse>, Status> {
        let call_id_md = metadata(&request, md::CALL_ID);
        let grpc_timeout_md = metadata(&request, "grpc-timeout");
        let request_id_md = metadata(&request, md::REQUEST_ID);
        let mut req = request.into_inner();
        if req.call_id.is_empty() {
            req.call_id = call_id_md;
        }
        if req.request_id.is_empty() {
            req.request_id = request_id_md;
        }
        let grpc_timeout = parse_grpc_timeout(&grpc_timeout_md);
        // The setup runs on its own task: when the caller gives up (its deadline, or the filter
        // cancels because its client left), tonic drops this future, and a setup dropped
        // mid-exchange could leave a provider-side call nobody hangs up. Finished on its own,
        // a call whose answer has no taker is ended (and hung up at the provider) at once.
        let relay = self.relay.clone();
        let (answer, taker) = tokio::sync::oneshot::channel();
        self.relay.spawn_setup(async move {
            let result = relay.create_call_within(req, grpc_timeout).await;
            if let Err(Ok(resp)) = answer.send(result) {
                relay.abandon(&resp.call_id).await;
            }
        });
        match taker.await {
            Ok(result) => result.map(Response::new).map_err(Status::from),
            Err(_) => Err(Status::internal(
                "the call setup task ended without an answer",
            )),
        }
    }

    async fn hangup_call(
        &self,
        request: Request<v1::HangupCallRequest>,
    ) -> Result<Response<v1::HangupCallResponse>, Status> {
        let req = request.into_inner();
        let caller = Caller {
            principal: &req.principal,
            operator: req.operator,
        };
        match self.relay.hangup(&req.call_id, caller).await {
            Ok((call, ended_now)) => Ok(Response::new(v1::HangupCallResponse {
                call: Some(call),
                ended_now,
            })),
            Err(e) => Err(lookup_failed(e, &req.call_id)),
        }
    }

    async fn get_call(
        &self,
        request: Request<v1::GetCallRequest>,
    ) -> Result<Response<v1::CallInfo>, Status> {
        let req = request.into_inner();
        let caller = Caller {
            principal: &req.principal,
            operator: req.operator,
        };
        self.relay
            .get_call(&req.call_id, caller)
            .map(Response::new)
            .map_err(|e| lookup_failed(e, &req.call_id))
    }

    type WatchCallsStream = WatchStream;

    async fn watch_calls(
        &self,
        _request: Request<v1::WatchCallsRequest>,
    ) -> Result<Response<Self::WatchCallsStream>, Status> {
        let registry = self.relay.registry();
        Ok(Response::new(watch_stream(
            registry.watch(),
            registry.watchers_done(),
        )))
    }

    async fn list_calls(
        &self,
        request: Request<v1::ListCallsRequest>,
    ) -> Result<Response<v1::ListCallsResponse>, Status> {
        Ok(Response::new(
            self.relay.list_calls(request.into_inner().include_ended),
        ))
    }
}

/// The stream of a `WatchCalls` request.
pub type WatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::CallEvent, Status>> + Send>>;

/// The registry's call events as a gRPC stream: a watcher that fell behind gets one `LAGGED`
/// event with the number it missed and goes on; the stream ends when the relay stops.
fn watch_stream(
    rx: tokio::sync::broadcast::Receiver<v1::CallEvent>,
    done: tokio_util::sync::CancellationToken,
) -> WatchStream {
    use tokio::sync::broadcast::error::RecvError;
    Box::pin(futures::stream::unfold(
        (rx, done),
        |(mut rx, done)| async move {
            let next = tokio::select! {
                biased;
                r = rx.recv() => r,
                _ = done.cancelled() => return None,
            };
            let event = match next {
                Ok(e) => e,
                Err(RecvError::Lagged(missed)) => v1::CallEvent {
                    kind: v1::call_event::Kind::Lagged as i32,
                    at_ms: crate::registry::unix_ms(),
                    call: None,
                    missed,
                },
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(event), (rx, done)))
        },
    ))
}
