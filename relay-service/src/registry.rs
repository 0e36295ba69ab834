//! The call registry: live calls with their state, counters and cancel token, plus a
//! bounded list of recently ended calls for GetCall/ListCalls.
//!
//! A call is reserved at the start of CreateCall, so calls still in setup count
//! toward the concurrency limit (a flood of slow setups cannot exceed it).
//!
//! It also publishes each call's life (created, connected, usage updated, ended) to the
//! watchers of `WatchCalls`, through a bounded broadcast channel: a summary is built only
//! while someone watches, and a watcher that falls behind is told how much it missed.

use crate::call_state::{CallCounters, EndReason};
use crate::error::SetupError;
use crate::signaling::UpstreamCall;
use crate::usage::{Budget, CallUsage, UsageDelta, UsageEvent};
use realtime_relay_proto::call_id::Kind;
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::call_event::Kind as EventKind;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Events a `WatchCalls` watcher may fall behind by before it is told it lagged.
pub const WATCH_BUFFER: usize = 4096;

const STATE_PENDING: u8 = 1;
const STATE_CONNECTED: u8 = 2;

#[derive(Debug)]
pub struct CallEntry {
    pub call_id: String,
    pub model: String,
    pub upstream_model: String,
    pub worker_id: String,
    /// Who created the call and so owns it (`CreateCallRequest.principal`); empty: no one.
    pub principal: String,
    pub created_at_ms: i64,
    connected_at_ms: AtomicI64,
    state: AtomicU8,
    pub counters: Arc<CallCounters>,
    pub cancel: CancellationToken,
    end_request: Mutex<Option<EndReason>>,
    upstream_call_id: Mutex<String>,
    /// The provider's side, once it answered: where the relay hangs it up.
    upstream: OnceLock<Arc<UpstreamCall>>,
    done_tx: watch::Sender<bool>,
    /// The API the call speaks.
    pub api: Kind,
    /// What the provider reported the call used ([`CallEntry::record_usage`]).
    usage: Mutex<CallUsage>,
    /// Where the call's life is published for `WatchCalls`.
    events: broadcast::Sender<v1::CallEvent>,
}

impl CallEntry {
    pub fn mark_connected(&self) {
        self.connected_at_ms.store(unix_ms(), Ordering::Relaxed);
        self.state.store(STATE_CONNECTED, Ordering::Relaxed);
        self.publish(EventKind::Connected, || self.live_info());
    }

    /// Takes a usage event of the call's provider into account; the increments it added (for
    /// the metrics), and what of the call's `budget` its usage reached, if it did. Watchers
    /// hear of a change to the figures.
    pub fn record_usage(
        &self,
        event: &UsageEvent,
        budget: &Budget,
    ) -> (UsageDelta, Option<String>) {
        let (delta, reached) = {
            let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            let delta = usage.apply(event);
            (delta, budget.reached(&usage))
        };
        if !matches!(
            event,
            UsageEvent::ResponseCreated | UsageEvent::Error { .. }
        ) {
            self.publish(EventKind::UsageUpdated, || self.live_info());
        }
        (delta, reached)
    }

    pub fn usage(&self) -> CallUsage {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends `kind` with the call's summary to the watchers, if there are any (the summary
    /// is only built then).
    fn publish(&self, kind: EventKind, call: impl FnOnce() -> v1::CallInfo) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let _ = self.events.send(v1::CallEvent {
            kind: kind as i32,
            at_ms: unix_ms(),
            call: Some(call()),
            missed: 0,
        });
    }

    pub fn set_upstream_call_id(&self, id: &str) {
        *self
            .upstream_call_id
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = id.to_string();
    }

    pub fn is_connected(&self) -> bool {
        self.state.load(Ordering::Relaxed) == STATE_CONNECTED
    }

    /// Records the provider's side of the call (once; later calls are ignored).
    pub fn set_upstream_call(&self, call: Arc<UpstreamCall>) {
        self.set_upstream_call_id(&call.id);
        let _ = self.upstream.set(call);
    }

    pub fn upstream_call(&self) -> Option<&Arc<UpstreamCall>> {
        self.upstream.get()
    }

    /// Asks the call's driver to end it for `reason`. True for the first request: later ones
    /// (a retried hangup, a drain racing a hangup) keep the first reason.
    pub fn request_end(&self, reason: EndReason) -> bool {
        let first = self.announce_end(reason);
        self.cancel.cancel();
        first
    }

    /// Records why the call is ending without stopping it yet: the relay asked the provider
    /// to end it (a GPT-Live hangup), and the provider's close, when it comes, is this end,
    /// not the provider's failure. True for the first request, as [`Self::request_end`].
    pub fn announce_end(&self, reason: EndReason) -> bool {
        let mut r = self.end_request.lock().unwrap_or_else(|p| p.into_inner());
        let first = r.is_none();
        r.get_or_insert(reason);
        first
    }

    /// Waits at most `wait` for the call's task to finish; true if it has.
    pub async fn wait_ended(&self, wait: Duration) -> bool {
        let mut done = self.done_tx.subscribe();
        let ended = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
        matches!(ended, Ok(Ok(_)))
    }

    pub fn requested_end(&self) -> Option<EndReason> {
        *self.end_request.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self, ended: Option<(EndReason, i64)>) -> v1::CallInfo {
        let state = match (ended, self.state.load(Ordering::Relaxed)) {
            (Some(_), _) => v1::CallState::Ended,
            (None, STATE_CONNECTED) => v1::CallState::Connected,
            (None, _) => v1::CallState::Pending,
        };
        v1::CallInfo {
            call_id: self.call_id.clone(),
            state: state as i32,
            model: self.model.clone(),
            upstream_model: self.upstream_model.clone(),
            worker_id: self.worker_id.clone(),
            created_at_ms: self.created_at_ms,
            connected_at_ms: self.connected_at_ms.load(Ordering::Relaxed),
            ended_at_ms: ended.map(|(_, t)| t).unwrap_or(0),
            end_reason: ended.map(|(r, _)| r.code().to_string()).unwrap_or_default(),
            client_to_upstream: Some(self.counters.client_to_upstream.snapshot()),
            upstream_to_client: Some(self.counters.upstream_to_client.snapshot()),
            upstream_call_id: self
                .upstream_call_id
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            // The registry's own view carries the owner; callers are shown it through
            // `Caller::shown`.
            principal: self.principal.clone(),
            api: v1::Api::from(self.api) as i32,
            usage: Some(usage_proto(&self.usage(), self.api == Kind::Live)),
        }
    }

    pub fn live_info(&self) -> v1::CallInfo {
        self.info(None)
    }
}

/// The contract's form of a call's usage.
pub fn usage_proto(u: &CallUsage, live: bool) -> v1::CallUsage {
    let t = &u.tokens;
    v1::CallUsage {
        tokens: Some(v1::TokenUsage {
            total_tokens: t.total,
            input_tokens: t.input,
            output_tokens: t.output,
            input_text_tokens: t.input_text,
            input_audio_tokens: t.input_audio,
            input_image_tokens: t.input_image,
            input_cached_tokens: t.input_cached,
            cached_text_tokens: t.cached_text,
            cached_audio_tokens: t.cached_audio,
            cached_image_tokens: t.cached_image,
            output_text_tokens: t.output_text,
            output_audio_tokens: t.output_audio,
        }),
        responses: u.responses,
        rate_limits: u
            .rate_limits
            .iter()
            .map(|r| v1::RateLimit {
                name: r.name.clone(),
                limit: r.limit,
                remaining: r.remaining,
                reset_seconds: r.reset_seconds,
            })
            .collect(),
        audio_seconds: u.audio_seconds,
        partial: u.partial(live),
        error_events: u.error_events,
    }
}

pub struct NewCall<'a> {
    pub call_id: &'a str,
    pub api: Kind,
    pub model: &'a str,
    pub upstream_model: &'a str,
    pub worker_id: &'a str,
    pub principal: &'a str,
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Arc<CallEntry>>,
    ended: VecDeque<v1::CallInfo>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    max_calls: usize,
    ended_kept: usize,
    draining: AtomicBool,
    events: broadcast::Sender<v1::CallEvent>,
    /// Cancelled when the relay stops: watch streams end (a graceful gRPC shutdown would
    /// otherwise wait for them).
    watchers_done: CancellationToken,
}

impl Registry {
    pub fn new(max_calls: usize, ended_kept: usize) -> Self {
        Registry {
            inner: Mutex::new(Inner::default()),
            max_calls,
            ended_kept,
            draining: AtomicBool::new(false),
            events: broadcast::channel(WATCH_BUFFER).0,
            watchers_done: CancellationToken::new(),
        }
    }

    /// Cancelled when the relay has stopped (every call ended): watchers end their streams.
    pub fn watchers_done(&self) -> CancellationToken {
        self.watchers_done.clone()
    }

    /// A new watcher of every call's life (`WatchCalls`).
    pub fn watch(&self) -> broadcast::Receiver<v1::CallEvent> {
        self.events.subscribe()
    }

    /// A reserved call is set up (its answer is on the way to the client): watchers hear of
    /// it. Reservations that fail are never published.
    pub fn announce_created(&self, entry: &CallEntry) {
        entry.publish(EventKind::Created, || entry.live_info());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reserve(&self, new: NewCall<'_>) -> Result<Arc<CallEntry>, SetupError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(SetupError::Draining);
        }
        let mut inner = self.lock();
        if inner.live.contains_key(new.call_id)
            || inner.ended.iter().any(|c| c.call_id == new.call_id)
        {
            return Err(SetupError::CallExists);
        }
        if inner.live.len() >= self.max_calls {
            return Err(SetupError::TooManyCalls(self.max_calls));
        }
        let (done_tx, _) = watch::channel(false);
        let entry = Arc::new(CallEntry {
            call_id: new.call_id.to_string(),
            model: new.model.to_string(),
            upstream_model: new.upstream_model.to_string(),
            worker_id: new.worker_id.to_string(),
            principal: new.principal.to_string(),
            created_at_ms: unix_ms(),
            connected_at_ms: AtomicI64::new(0),
            state: AtomicU8::new(STATE_PENDING),
            counters: Arc::new(CallCounters::default()),
            cancel: CancellationToken::new(),
            end_request: Mutex::new(None),
            upstream_call_id: Mutex::new(String::new()),
            upstream: OnceLock::new(),
            done_tx,
            api: new.api,
            usage: Mutex::new(CallUsage::default()),
            events: self.events.clone(),
        });
        inner.live.insert(new.call_id.to_string(), entry.clone());
        Ok(entry)
    }

    /// Frees a reservation whose setup failed (not an ended call: it never started).
    pub fn release(&self, call_id: &str) {
        let entry = self.lock().live.remove(call_id);
        if let Some(e) = entry {
            e.done_tx.send_replace(true);
        }
    }

    /// Records the end of a live call and frees its entry.
    pub fn finish(&self, call_id: &str, reason: EndReason) -> Option<v1::CallInfo> {
        let mut inner = self.lock();
        let entry = inner.live.remove(call_id)?;
        let info = entry.info(Some((reason, unix_ms())));
        if self.ended_kept > 0 {
            if inner.ended.len() >= self.ended_kept {
                inner.ended.pop_back();
            }
            inner.ended.push_front(info.clone());
        }
        drop(inner);
        entry.publish(EventKind::Ended, || info.clone());
        // Not `send`: with no receiver yet it would leave the value unchanged, and whoever
        // waits afterwards (a hangup that looked the call up just before it ended) would wait
        // out its whole timeout.
        entry.done_tx.send_replace(true);
        Some(info)
    }

    pub fn live(&self, call_id: &str) -> Option<Arc<CallEntry>> {
        self.lock().live.get(call_id).cloned()
    }

    /// The call's info, its owner's principal included (for operators; see `Caller::shown`).
    pub fn get(&self, call_id: &str) -> Option<v1::CallInfo> {
        let inner = self.lock();
        if let Some(e) = inner.live.get(call_id) {
            return Some(e.live_info());
        }
        inner.ended.iter().find(|c| c.call_id == call_id).cloned()
    }

    /// Ends a live call (`entry`, as [`Registry::live`] gave it: the call that was checked, not
    /// whichever holds its id by now) and waits (bounded) until its task has freed everything.
    /// The flag says whether this request was the first to end it.
    pub async fn end_and_wait(
        &self,
        entry: &CallEntry,
        reason: EndReason,
        wait: Duration,
    ) -> Option<(v1::CallInfo, bool)> {
        let mut done = entry.done_tx.subscribe();
        let first = entry.request_end(reason);
        let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
        self.get(&entry.call_id).map(|info| (info, first))
    }

    pub fn list(&self, include_ended: bool) -> v1::ListCallsResponse {
        let inner = self.lock();
        let mut calls: Vec<v1::CallInfo> = inner.live.values().map(|e| e.live_info()).collect();
        let mut by_worker: HashMap<String, u32> = HashMap::new();
        let mut by_principal: HashMap<String, v1::PrincipalUsage> = HashMap::new();
        for e in inner.live.values() {
            *by_worker.entry(e.worker_id.clone()).or_default() += 1;
            if !e.principal.is_empty() {
                let u = e.usage();
                let p = by_principal.entry(e.principal.clone()).or_default();
                p.live_calls += 1;
                p.total_tokens = p.total_tokens.saturating_add(u.tokens.total);
                p.audio_seconds += u.audio_seconds;
            }
        }
        if include_ended {
            calls.extend(inner.ended.iter().cloned());
        }
        v1::ListCallsResponse {
            calls,
            live_calls_by_worker: by_worker,
            live_usage_by_principal: by_principal,
            ..Default::default()
        }
    }

    pub fn live_count(&self) -> usize {
        self.lock().live.len()
    }

    /// (live calls, ended calls kept).
    /// Live calls per worker id, now (calls without a worker are left out).
    pub fn live_by_worker(&self) -> HashMap<String, u32> {
        let inner = self.lock();
        let mut by_worker: HashMap<String, u32> = HashMap::new();
        for e in inner.live.values().filter(|e| !e.worker_id.is_empty()) {
            *by_worker.entry(e.worker_id.clone()).or_default() += 1;
        }
        by_worker
    }

    pub fn sizes(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.live.len(), inner.ended.len())
    }

    /// WatchCalls streams subscribed now.
    pub fn watcher_count(&self) -> usize {
        self.events.receiver_count()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn end_all(&self, reason: EndReason) {
        let entries: Vec<_> = self.lock().live.values().cloned().collect();
        for e in entries {
            let _ = e.request_end(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new<'a>(id: &'a str) -> NewCall<'a> {
        NewCall {
            call_id: id,
            api: Kind::Realtime,
            model: "m",
            upstream_model: "m",
            worker_id: "w1",
            principal: "",
        }
    }

    #[test]
    fn the_limit_counts_reservations_and_frees_on_release_and_finish() {
        let r = Registry::new(2, 10);
        r.reserve(new("rtc_a")).unwrap();
        r.reserve(new("rtc_b")).unwrap();
        assert_eq!(
            r.reserve(new("rtc_c")).unwrap_err().code(),
            "too_many_calls"
        );
        r.release("rtc_a");
        r.reserve(new("rtc_c")).unwrap();
        let info = r.finish("rtc_b", EndReason::Hangup).unwrap();
        assert_eq!(info.end_reason, "hangup");
        assert_eq!(info.state, v1::CallState::Ended as i32);
        assert_eq!(r.live_count(), 1);
        assert_eq!(r.get("rtc_b").unwrap().end_reason, "hangup");
        assert!(
            r.get("rtc_a").is_none(),
            "a released reservation leaves no trace"
        );
        assert_eq!(r.reserve(new("rtc_b")).unwrap_err().code(), "call_exists");
    }

    #[test]
    fn ended_calls_are_bounded_and_listing_counts_live_per_worker() {
        let r = Registry::new(100, 3);
        for i in 0..5 {
            let id = format!("rtc_{i}");
            r.reserve(new(&id)).unwrap();
            r.finish(&id, EndReason::ClientClosed);
        }
        r.reserve(new("rtc_live")).unwrap();
        let all = r.list(true);
        assert_eq!(all.calls.len(), 4);
        assert_eq!(all.live_calls_by_worker.get("w1"), Some(&1));
        assert_eq!(r.list(false).calls.len(), 1);
    }

    #[test]
    fn a_call_keeps_its_owner_live_and_ended() {
        let r = Registry::new(10, 10);
        r.reserve(NewCall {
            principal: "p_a",
            ..new("rtc_owned")
        })
        .unwrap();
        r.reserve(new("rtc_open")).unwrap();
        assert_eq!(r.live("rtc_owned").unwrap().principal, "p_a");
        assert_eq!(r.get("rtc_owned").unwrap().principal, "p_a");
        assert_eq!(r.get("rtc_open").unwrap().principal, "");
        r.finish("rtc_owned", EndReason::Hangup);
        assert_eq!(r.get("rtc_owned").unwrap().principal, "p_a");
        let listed = r.list(true);
        assert!(listed
            .calls
            .iter()
            .any(|c| c.call_id == "rtc_owned" && c.principal == "p_a"));
    }

    /// A call that ended before anyone waited for it is seen as ended at once: a hangup that
    /// found it live a moment earlier does not wait out its timeout (before, it waited the
    /// whole of it: the end was signalled to no receiver and lost).
    #[tokio::test]
    async fn a_wait_that_starts_after_the_end_returns_at_once() {
        let r = Registry::new(10, 10);
        let entry = r.reserve(new("rtc_early")).unwrap();
        r.finish("rtc_early", EndReason::UpstreamClosed);
        let started = std::time::Instant::now();
        assert!(entry.wait_ended(Duration::from_secs(2)).await);
        let (info, first) = r
            .end_and_wait(&entry, EndReason::Hangup, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(info.end_reason, "upstream_closed");
        assert!(first, "no end had been requested");
    }

    #[test]
    fn draining_refuses_new_calls() {
        let r = Registry::new(10, 10);
        r.start_draining();
        assert_eq!(r.reserve(new("rtc_x")).unwrap_err().code(), "draining");
    }

    /// A watcher hears a call's life in order, each event with the call's summary (usage
    /// included); nothing is built while no one watches; a watcher that falls behind learns
    /// it lagged.
    #[test]
    fn watchers_hear_created_connected_usage_and_ended() {
        use crate::usage::{Tokens, UsageEvent};
        let r = Registry::new(10, 10);
        let mut w = r.watch();
        let e = r
            .reserve(NewCall {
                api: Kind::Live,
                ..new("live_watched")
            })
            .unwrap();
        assert!(w.try_recv().is_err(), "a reservation is not a call yet");
        r.announce_created(&e);
        e.mark_connected();
        let none = Budget::default();
        e.record_usage(&UsageEvent::ResponseCreated, &none);
        e.record_usage(
            &UsageEvent::LiveSeconds {
                seconds: 2.5,
                closed: false,
            },
            &none,
        );
        e.record_usage(
            &UsageEvent::ResponseDone(Tokens {
                total: 7,
                ..Tokens::default()
            }),
            &none,
        );
        r.finish("live_watched", EndReason::Hangup);
        let mut seen = Vec::new();
        while let Ok(ev) = w.try_recv() {
            seen.push(ev);
        }
        let kinds: Vec<i32> = seen.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::Created,
                EventKind::Connected,
                EventKind::UsageUpdated,
                EventKind::UsageUpdated,
                EventKind::Ended
            ]
            .map(|k| k as i32)
        );
        let ended = seen.last().unwrap().call.as_ref().unwrap();
        assert_eq!(ended.api, v1::Api::Live as i32);
        assert_eq!(ended.end_reason, "hangup");
        let usage = ended.usage.as_ref().unwrap();
        assert_eq!(usage.audio_seconds, 2.5);
        assert_eq!(usage.tokens.as_ref().unwrap().total_tokens, 7);
        assert!(usage.partial, "a Live session without session.closed");

        // Falling behind: the receiver reports how much it missed.
        let mut slow = r.watch();
        for i in 0..WATCH_BUFFER + 10 {
            let e = r.reserve(new(&format!("rtc_{i:08}"))).unwrap();
            r.announce_created(&e);
            r.release(&e.call_id);
        }
        drop(w);
        match slow.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 10),
            other => panic!("{other:?}"),
        }
    }

    /// ListCalls sums each principal's live calls and their usage; calls without a principal
    /// and ended calls are not in it.
    #[test]
    fn list_gives_each_principals_live_usage() {
        use crate::usage::Tokens;
        let r = Registry::new(10, 10);
        let none = Budget::default();
        for (id, owner, tokens, seconds) in [
            ("rtc_a1", "p_a", 10, 0.0),
            ("rtc_a2", "p_a", 5, 0.0),
            ("live_a3", "p_a", 0, 2.5),
            ("rtc_b1", "p_b", 7, 0.0),
            ("rtc_n1", "", 99, 0.0),
        ] {
            let e = r
                .reserve(NewCall {
                    principal: owner,
                    ..new(id)
                })
                .unwrap();
            e.record_usage(
                &UsageEvent::ResponseDone(Tokens {
                    total: tokens,
                    ..Tokens::default()
                }),
                &none,
            );
            e.record_usage(
                &UsageEvent::LiveSeconds {
                    seconds,
                    closed: false,
                },
                &none,
            );
        }
        r.finish("rtc_b1", EndReason::Hangup);
        let view = r.list(true).live_usage_by_principal;
        assert_eq!(view.len(), 1, "{view:?}");
        let a = &view["p_a"];
        assert_eq!(
            (a.live_calls, a.total_tokens, a.audio_seconds),
            (3, 15, 2.5)
        );
    }
}
