//! What a call is and how it ended: states, end reasons, and live counters that
//! GetCall/ListCalls read while the bridge updates them.

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
    IceTimeout,
    IdleTimeout,
    MaxDuration,
    BufferOverflow,
    Drain,
    /// Set up, but whoever asked had gone by the time the answer was ready (its deadline
    /// passed or its client left): nobody holds the SDP answer, so the call is ended at once.
    Abandoned,
    InternalError,
}

impl EndReason {
    pub const ALL: [EndReason; 12] = [
        EndReason::Hangup,
        EndReason::ClientClosed,
        EndReason::UpstreamClosed,
        EndReason::ClientTimeout,
        EndReason::UpstreamGone,
        EndReason::IceTimeout,
        EndReason::IdleTimeout,
        EndReason::MaxDuration,
        EndReason::BufferOverflow,
        EndReason::Drain,
        EndReason::Abandoned,
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
            EndReason::IceTimeout => "ice_timeout",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::MaxDuration => "max_duration",
            EndReason::BufferOverflow => "buffer_overflow",
            EndReason::Drain => "drain",
            EndReason::Abandoned => "abandoned",
            EndReason::InternalError => "internal_error",
        }
    }

    /// The upstream died while the client was still there: a worker failure.
    pub fn is_worker_failure(self) -> bool {
        matches!(self, EndReason::UpstreamClosed | EndReason::UpstreamGone)
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
