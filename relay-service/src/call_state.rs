//! What a call is and how it ended: states, end reasons, live counters that
//! GetCall/ListCalls read while the bridge updates them, and who may see and end it.

use realtime_relay_proto::v1;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    Hangup,
    ClientClosed,
    UpstreamClosed,
    ClientTimeout,
    /// Nothing arrived from the provider for the peer timeout: its media stopped.
    UpstreamGone,
    /// A GPT-Live session the provider closed after announcing it with `session.closed`
    /// (the client's `session.close`, the session's expiry, a safety stop): the Live API's
    /// own end of a session, not a failure of the worker.
    SessionClosed,
    IceTimeout,
    IdleTimeout,
    MaxDuration,
    BufferOverflow,
    Drain,
    /// Set up, but whoever asked had gone by the time the answer was ready (its deadline
    /// passed or its client left): nobody holds the SDP answer, so the call is ended at once.
    Abandoned,
    /// The call used its budget (`CreateCallRequest.budget`): the provider was asked to stop,
    /// the client told, and the call ended after a short grace.
    BudgetExceeded,
    InternalError,
}

impl EndReason {
    pub const ALL: [EndReason; 14] = [
        EndReason::Hangup,
        EndReason::ClientClosed,
        EndReason::UpstreamClosed,
        EndReason::ClientTimeout,
        EndReason::UpstreamGone,
        EndReason::SessionClosed,
        EndReason::IceTimeout,
        EndReason::IdleTimeout,
        EndReason::MaxDuration,
        EndReason::BufferOverflow,
        EndReason::Drain,
        EndReason::Abandoned,
        EndReason::BudgetExceeded,
        EndReason::InternalError,
    ];

    /// Stable code, as documented in `relay.proto` and used in metrics labels.
    pub fn code(self) -> &'static str {
        match self {
            EndReason::Hangup => "hangup",
            EndReason::ClientClosed => "client_closed",
            EndReason::UpstreamClosed => "upstream_closed",
            EndReason::ClientTimeout => "client_timeout",
            EndReason::UpstreamGone => "upstream_gone",
            EndReason::SessionClosed => "session_closed",
            EndReason::IceTimeout => "ice_timeout",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::MaxDuration => "max_duration",
            EndReason::BufferOverflow => "buffer_overflow",
            EndReason::Drain => "drain",
            EndReason::Abandoned => "abandoned",
            EndReason::BudgetExceeded => "budget_exceeded",
            EndReason::InternalError => "internal_error",
        }
    }

    /// The upstream died while the client was still there: a worker failure.
    pub fn is_worker_failure(self) -> bool {
        matches!(self, EndReason::UpstreamClosed | EndReason::UpstreamGone)
    }

    /// The provider ended the call itself: it needs no hangup from the relay.
    pub fn ended_by_provider(self) -> bool {
        matches!(
            self,
            EndReason::UpstreamClosed | EndReason::UpstreamGone | EndReason::SessionClosed
        )
    }
}

/// Counters for one direction of one call. Relaxed atomics: readers only need
/// eventually consistent numbers, and the bridge must not pay for ordering.
#[derive(Debug, Default)]
pub struct DirectionCounters {
    pub rtp_packets: AtomicU64,
    pub rtp_bytes: AtomicU64,
    pub dc_messages: AtomicU64,
    pub dc_bytes: AtomicU64,
    pub dropped: AtomicU64,
}

impl DirectionCounters {
    pub fn snapshot(&self) -> v1::DirectionStats {
        v1::DirectionStats {
            rtp_packets: self.rtp_packets.load(Relaxed),
            rtp_bytes: self.rtp_bytes.load(Relaxed),
            dc_messages: self.dc_messages.load(Relaxed),
            dc_bytes: self.dc_bytes.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
        }
    }
}

#[derive(Debug, Default)]
pub struct CallCounters {
    pub client_to_upstream: DirectionCounters,
    pub upstream_to_client: DirectionCounters,
}

/// Who asks about a call in GetCall or HangupCall: the principal the edge named (empty:
/// none) and whether it is an operator identity. See `HangupCallRequest` in `relay.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    pub principal: &'a str,
    pub operator: bool,
}

impl Caller<'_> {
    /// An operator with no principal of its own.
    pub const OPERATOR: Caller<'static> = Caller {
        principal: "",
        operator: true,
    };

    /// Whether this caller may see and end a call created by `owner` (empty: a call created
    /// without a principal, which anyone may manage, as before ownership existed).
    pub fn may_act_on(&self, owner: &str) -> bool {
        self.operator || owner.is_empty() || self.principal == owner
    }

    /// `info` as this caller is shown it: the owner's principal goes to operators only.
    pub fn shown(&self, mut info: v1::CallInfo) -> v1::CallInfo {
        if !self.operator {
            info.principal.clear();
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_live_close_is_the_providers_end_but_no_worker_failure() {
        let r = EndReason::SessionClosed;
        assert_eq!(r.code(), "session_closed");
        assert!(r.ended_by_provider() && !r.is_worker_failure());
        assert!(EndReason::UpstreamClosed.is_worker_failure());
        assert!(EndReason::ALL.contains(&r));
        let codes: std::collections::HashSet<_> = EndReason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), EndReason::ALL.len(), "codes are distinct");
    }

    #[test]
    fn only_the_owner_or_an_operator_may_act_on_an_owned_call() {
        let caller = |principal, operator| Caller {
            principal,
            operator,
        };
        // (caller, owner, may act)
        for (who, owner, allowed) in [
            (caller("p_a", false), "p_a", true),
            (caller("p_b", false), "p_a", false),
            (caller("", false), "p_a", false),
            (caller("p_A", false), "p_a", false),
            (caller("p_a ", false), "p_a", false),
            (caller("p_", false), "p_a", false),
            (caller("p_b", true), "p_a", true),
            (Caller::OPERATOR, "p_a", true),
            (caller("", false), "", true),
            (caller("p_b", false), "", true),
            (Caller::OPERATOR, "", true),
        ] {
            assert_eq!(who.may_act_on(owner), allowed, "{who:?} on {owner:?}");
        }
    }

    #[test]
    fn only_operators_are_shown_the_owner() {
        let info = v1::CallInfo {
            call_id: "rtc_0123456789".into(),
            principal: "p_a".into(),
            ..Default::default()
        };
        let owner = Caller {
            principal: "p_a",
            operator: false,
        };
        assert_eq!(owner.shown(info.clone()).principal, "");
        assert_eq!(owner.shown(info.clone()).call_id, info.call_id);
        assert_eq!(Caller::OPERATOR.shown(info.clone()), info);
    }
}
