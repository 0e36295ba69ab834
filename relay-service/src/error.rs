//! Setup errors with the stable codes that reach clients.
//!
//! Client faults become `INVALID_ARGUMENT`; relay and upstream faults become
//! `UNAVAILABLE`, `RESOURCE_EXHAUSTED`, `DEADLINE_EXCEEDED` or `INTERNAL`. The gRPC
//! status message is "<code>: <human text>" (see `proto/relay.proto`), and never
//! contains a key or raw SDP.

use realtime_relay_proto::{ErrorClass, ErrorCode};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetupError {
    // ---- client faults (4xx at the edge; never counted against a worker) ----
    #[error("missing_sdp: the request carries no SDP offer")]
    MissingSdp,
    #[error("invalid_sdp: {0}")]
    InvalidSdp(String),
    #[error("missing_model: the request names no model")]
    MissingModel,
    #[error("invalid_session_json: {0}")]
    InvalidSessionJson(String),
    #[error(
        "invalid_call_id: call ids are rtc_ or live_ followed by {} to {} letters, digits, '_' or '-'",
        realtime_relay_proto::call_id::MIN_SUFFIX,
        realtime_relay_proto::call_id::MAX_SUFFIX
    )]
    InvalidCallId,
    /// The id's prefix names the other API: `{0}` is the prefix the request's API needs.
    #[error("call_id_api_mismatch: this call's API takes call ids that start with {0}")]
    CallIdApiMismatch(&'static str),
    #[error("unsupported_api: the request's api ({0}) is not one this relay knows")]
    UnsupportedApi(i32),
    #[error("call_exists: a call with this id already exists")]
    CallExists,
    #[error("missing_upstream: the request names no upstream base URL")]
    MissingUpstream,
    #[error("upstream_not_allowed: {0}")]
    UpstreamNotAllowed(String),
    // The value is never echoed: it identifies a caller.
    #[error(
        "invalid_principal: a principal is 1 to {} visible ASCII characters, without spaces",
        realtime_relay_proto::principal::MAX_LEN
    )]
    InvalidPrincipal,
    #[error("budget_unavailable: this relay does not meter usage (--usage-metering false), so it cannot enforce the call's budget")]
    BudgetUnavailable,

    // ---- relay faults ----
    #[error("too_many_calls: the relay is at its limit of {0} concurrent calls")]
    TooManyCalls(usize),
    #[error("draining: the relay is shutting down and takes no new calls")]
    Draining,
    #[error("internal_error: {0}")]
    Internal(String),

    // ---- upstream faults (counted against the worker) ----
    #[error("upstream_unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream_timeout: the upstream did not answer the SDP exchange in time")]
    UpstreamTimeout,
    #[error("upstream_invalid_answer: {0}")]
    UpstreamInvalidAnswer(String),
    #[error("upstream_candidates_not_allowed: {0}")]
    UpstreamCandidatesNotAllowed(String),
}

impl SetupError {
    /// The stable code: the part of the message before ": ".
    pub fn code(&self) -> &'static str {
        self.error_code().as_str()
    }

    /// The contract's code for this error (`realtime_relay_proto::ErrorCode`).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            SetupError::MissingSdp => ErrorCode::MissingSdp,
            SetupError::InvalidSdp(_) => ErrorCode::InvalidSdp,
            SetupError::MissingModel => ErrorCode::MissingModel,
            SetupError::InvalidSessionJson(_) => ErrorCode::InvalidSessionJson,
            SetupError::InvalidCallId => ErrorCode::InvalidCallId,
            SetupError::CallIdApiMismatch(_) => ErrorCode::CallIdApiMismatch,
            SetupError::UnsupportedApi(_) => ErrorCode::UnsupportedApi,
            SetupError::CallExists => ErrorCode::CallExists,
            SetupError::MissingUpstream => ErrorCode::MissingUpstream,
            SetupError::UpstreamNotAllowed(_) => ErrorCode::UpstreamNotAllowed,
            SetupError::InvalidPrincipal => ErrorCode::InvalidPrincipal,
            SetupError::BudgetUnavailable => ErrorCode::BudgetUnavailable,
            SetupError::TooManyCalls(_) => ErrorCode::TooManyCalls,
            SetupError::Draining => ErrorCode::Draining,
            SetupError::Internal(_) => ErrorCode::InternalError,
            SetupError::UpstreamUnreachable(_) => ErrorCode::UpstreamUnreachable,
            SetupError::UpstreamTimeout => ErrorCode::UpstreamTimeout,
            SetupError::UpstreamInvalidAnswer(_) => ErrorCode::UpstreamInvalidAnswer,
            SetupError::UpstreamCandidatesNotAllowed(_) => ErrorCode::UpstreamCandidatesNotAllowed,
        }
    }

    /// Whether the failure is the upstream worker's (and so counts against it): the
    /// contract's class, the same one the filter reads from the status message.
    pub fn is_upstream_fault(&self) -> bool {
        self.error_code().class() == ErrorClass::Upstream
    }

    pub fn grpc_code(&self) -> Code {
        match self {
            SetupError::MissingSdp
            | SetupError::InvalidSdp(_)
            | SetupError::MissingModel
            | SetupError::InvalidSessionJson(_)
            | SetupError::InvalidCallId
            | SetupError::CallIdApiMismatch(_)
            | SetupError::UnsupportedApi(_)
            | SetupError::MissingUpstream
            | SetupError::UpstreamNotAllowed(_)
            | SetupError::InvalidPrincipal
            | SetupError::BudgetUnavailable => Code::InvalidArgument,
            SetupError::CallExists => Code::AlreadyExists,
            SetupError::TooManyCalls(_) => Code::ResourceExhausted,
            SetupError::Draining | SetupError::UpstreamUnreachable(_) => Code::Unavailable,
            SetupError::UpstreamTimeout => Code::DeadlineExceeded,
            SetupError::UpstreamInvalidAnswer(_)
            | SetupError::UpstreamCandidatesNotAllowed(_)
            | SetupError::Internal(_) => Code::Internal,
        }
    }
}

impl From<SetupError> for Status {
    fn from(e: SetupError) -> Status {
        Status::new(e.grpc_code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_message_starts_with_the_stable_code() {
        let cases = [
            SetupError::InvalidSdp("no media".into()),
            SetupError::TooManyCalls(3),
            SetupError::UpstreamTimeout,
            SetupError::UpstreamNotAllowed("http://x".into()),
            SetupError::InvalidPrincipal,
        ];
        for e in cases {
            let status: Status = e.clone_for_test().into();
            let (code, _) = realtime_relay_proto::split_status_message(status.message());
            assert_eq!(code, Some(e.code()), "{status:?}");
        }
    }

    #[test]
    fn only_upstream_faults_count_against_workers() {
        assert!(!SetupError::InvalidSdp(String::new()).is_upstream_fault());
        assert!(!SetupError::TooManyCalls(1).is_upstream_fault());
        assert!(SetupError::UpstreamTimeout.is_upstream_fault());
        assert!(SetupError::UpstreamUnreachable(String::new()).is_upstream_fault());
    }

    impl SetupError {
        fn clone_for_test(&self) -> SetupError {
            match self {
                SetupError::InvalidSdp(s) => SetupError::InvalidSdp(s.clone()),
                SetupError::TooManyCalls(n) => SetupError::TooManyCalls(*n),
                SetupError::UpstreamTimeout => SetupError::UpstreamTimeout,
                SetupError::UpstreamNotAllowed(s) => SetupError::UpstreamNotAllowed(s.clone()),
                SetupError::InvalidPrincipal => SetupError::InvalidPrincipal,
                _ => SetupError::Internal(String::new()),
            }
        }
    }
}
