//! One soak call through the gateway, as a client application would make it: create over
//! HTTP through Envoy, connect a real str0m peer, send audio and priced events, check that
//! both come back, and hang up through Envoy; or vanish, or never connect.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::schedule::Kind;
use crate::peer::{Load, Offer};

/// The gateway's calls URL and the client that talks to it.
pub struct Gateway {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:<port>/v1/realtime/calls`.
    pub calls_url: String,
    pub model: String,
}

/// How long one call may take at each stage.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Audio (and one event a second) sent by a complete call.
    pub audio: Duration,
    /// Audio sent by a vanishing call before it disappears.
    pub vanish_after: Duration,
    /// From the answer to `session.created` over the data channel.
    pub connect_timeout: Duration,
    /// For the first echoed event after the audio, and for the peer to stop.
    pub settle_timeout: Duration,
}

/// Where a call that should have worked did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `create`, `connect`, `media`, `events`, `hangup`, `peer`.
    pub stage: &'static str,
    pub detail: String,
}

fn fail(stage: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        stage,
        detail: detail.into(),
    }
}

async fn until(deadline: Duration, done: impl Fn() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Gateway {
    /// POST the offer; (call id, answer) on 201.
    async fn create(&self, sdp: &str) -> Result<(String, String), Failure> {
        let resp = self
            .http
            .post(format!("{}?model={}", self.calls_url, self.model))
            .header("content-type", "application/sdp")
            .body(sdp.to_string())
            .send()
            .await
            .map_err(|e| fail("create", format!("{e}")))?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp
            .text()
            .await
            .map_err(|e| fail("create", format!("reading the answer: {e}")))?;
        if status != 201 || !body.starts_with("v=0") {
            let snippet: String = body.chars().take(200).collect();
            return Err(fail("create", format!("status {status}: {snippet}")));
        }
        let id = location.rsplit('/').next().unwrap_or_default().to_string();
        if id.is_empty() {
            return Err(fail("create", "201 without a Location call id"));
        }
        Ok((id, body))
    }

    async fn hangup(&self, id: &str) -> Result<(), Failure> {
        let resp = self
            .http
            .post(format!("{}/{id}/hangup", self.calls_url))
            .send()
            .await
            .map_err(|e| fail("hangup", format!("{e}")))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            let snippet: String = body.chars().take(200).collect();
            return Err(fail("hangup", format!("status {status}: {snippet}")));
        }
        Ok(())
    }

    /// One call of `kind`, start to finish. `phase` staggers the 20 ms audio cadence.
    pub async fn call(&self, kind: Kind, timing: Timing, phase: Duration) -> Result<(), Failure> {
        let offer = Offer::new().map_err(|e| fail("peer", format!("{e:#}")))?;
        let (id, answer) = self.create(&offer.sdp).await?;
        if kind == Kind::NeverConnect {
            // The socket closes here, before a single STUN check.
            drop(offer);
            return Ok(());
        }
        let load = Arc::new(Load::default());
        load.priced_events.store(true, Relaxed);
        let task = offer
            .start(&answer, load.clone(), phase)
            .map_err(|e| fail("peer", format!("{e:#}")))?;
        let stop = |vanish: bool| {
            load.vanish.store(vanish, Relaxed);
            load.stop.store(true, Relaxed);
        };
        if !until(timing.connect_timeout, || load.ready.load(Relaxed) == 1).await {
            stop(false);
            let _ = task.await;
            return Err(fail(
                "connect",
                format!(
                    "{id}: no session.created within {:?} (client ICE {}, DTLS connected: {}, oai-events open: {}, {} frames and {} events received)",
                    timing.connect_timeout,
                    crate::peer::ice_state_name(load.ice_state.load(Relaxed)),
                    load.connected.load(Relaxed),
                    load.channel_open.load(Relaxed),
                    load.frames_received.load(Relaxed),
                    load.events_received.load(Relaxed),
                ),
            ));
        }
        load.sending.store(true, Relaxed);
        if kind == Kind::Vanish {
            tokio::time::sleep(timing.vanish_after).await;
            stop(true);
            let _ = task.await;
            return Ok(());
        }
        tokio::time::sleep(timing.audio).await;
        let echoed = until(timing.settle_timeout, || {
            load.events_received.load(Relaxed) >= 1
        })
        .await;
        load.sending.store(false, Relaxed);
        let frames = load.frames_received.load(Relaxed);
        let outcome = if frames == 0 {
            Err(fail(
                "media",
                format!(
                    "no audio back ({} frames sent)",
                    load.frames_sent.load(Relaxed)
                ),
            ))
        } else if !echoed {
            Err(fail(
                "events",
                format!("no event back ({} sent)", load.events_sent.load(Relaxed)),
            ))
        } else {
            Ok(())
        };
        let hung_up = self.hangup(&id).await;
        // A browser's pc.close() after the hangup.
        stop(false);
        let stopped = tokio::time::timeout(timing.settle_timeout, task).await;
        outcome?;
        hung_up?;
        if stopped.is_err() {
            return Err(fail("peer", "the peer task did not stop"));
        }
        Ok(())
    }
}
