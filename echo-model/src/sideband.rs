//! The sideband: an application server attaches to a call it set up, over a WebSocket, and
//! gets the call's server events while it runs (OpenAI's Realtime `GET /v1/realtime?call_id=…`
//! and GPT-Live `GET /v1/live/sessions/{id}/attach`). Here: every text event the echo model
//! sends on the call's data channel is also sent to each attached socket; a text event an
//! attached server sends is handled as the call's own client would have sent it, except
//! `session.update`, which is applied (the call's session takes the given fields) and answered
//! with `session.updated` on the data channel and the sockets.

use axum::extract::ws::{Message as WsMessage, WebSocket};
use tokio::sync::{broadcast, mpsc};

/// Events an attached server may have in flight to the call before more are dropped.
pub const INBOUND_QUEUE: usize = 64;
/// Server events buffered per attached socket before a slow one misses some.
pub const OUTBOUND_BUFFER: usize = 1024;

/// A call's ends of the sideband: where its events are mirrored and where attached servers'
/// events arrive.
#[derive(Clone)]
pub struct Taps {
    pub mirror: broadcast::Sender<String>,
    pub inbound: mpsc::Sender<String>,
}

/// Pumps one attached socket until either side goes: the call's events out, the server's
/// events in (bounded: beyond [`INBOUND_QUEUE`] waiting, an event is dropped and logged).
/// It holds no sender of the mirror, so the socket closes when the call (and its entry) end.
pub async fn pump(
    mut socket: WebSocket,
    mut events: broadcast::Receiver<String>,
    inbound: mpsc::Sender<String>,
    call_id: String,
) {
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(text) => {
                    if socket.send(WsMessage::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(call_id = %call_id, missed = n, "sideband fell behind");
                }
                // The call ended: say goodbye.
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = socket.send(WsMessage::Close(None)).await;
                    break;
                }
            },
            m = socket.recv() => match m {
                Some(Ok(WsMessage::Text(text))) => {
                    if inbound.try_send(text.to_string()).is_err() {
                        tracing::warn!(call_id = %call_id, "sideband event dropped: the call is busy or gone");
                    }
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Binary(_))) => {}
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
            },
        }
    }
    tracing::info!(call_id = %call_id, "sideband detached");
}
