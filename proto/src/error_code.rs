//! The stable error codes the relay puts in front of its gRPC status messages
//! (`"<code>: <human text>"`), and who is at fault for each.
//!
//! The class decides what the filter does with a failure: only an upstream fault counts
//! against the worker (and can eject it); a client fault is a 4xx; a relay fault may send
//! the call to another relay replica.

/// Who caused a failed call setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The client's request is wrong (`INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`).
    Client,
    /// The model provider failed (unreachable, timed out, answered nonsense).
    Upstream,
    /// The relay itself cannot take the call (full, draining, internal error).
    Relay,
}

macro_rules! error_codes {
    ($($variant:ident = $text:literal, $class:ident;)*) => {
        /// Every stable code the relay sends.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// Every code, for tables and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as it appears on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)*
                }
            }

            pub const fn class(self) -> ErrorClass {
                match self {
                    $(ErrorCode::$variant => ErrorClass::$class,)*
                }
            }

            /// The code named by `text`; `None` for a code this contract does not define.
            pub fn parse(text: &str) -> Option<ErrorCode> {
                match text {
                    $($text => Some(ErrorCode::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    MissingSdp = "missing_sdp", Client;
    InvalidSdp = "invalid_sdp", Client;
    MissingModel = "missing_model", Client;
    InvalidSessionJson = "invalid_session_json", Client;
    InvalidCallId = "invalid_call_id", Client;
    CallExists = "call_exists", Client;
    CallNotFound = "call_not_found", Client;
    MissingUpstream = "missing_upstream", Client;
    // The filter named an upstream the relay's allowlist refuses: a configuration fault at
    // the edge, never the worker's (it was never contacted).
    UpstreamNotAllowed = "upstream_not_allowed", Client;
    // The request's `principal` breaks its grammar (`principal`): a fault of the edge that
    // sent it, before any lookup, so it says nothing about whether a call exists.
    InvalidPrincipal = "invalid_principal", Client;
    // The call id's prefix names the other API than the request's `api` (a GPT-Live create
    // with an `rtc_` id, a Realtime one with a `live_` id): a fault of the edge that chose it.
    CallIdApiMismatch = "call_id_api_mismatch", Client;
    // The request's `api` is a value this relay does not know (a newer edge).
    UnsupportedApi = "unsupported_api", Client;
    // The request carries a budget, but this relay does not meter usage
    // (`--usage-metering false`), so it could not enforce it: refused rather than ignored.
    BudgetUnavailable = "budget_unavailable", Client;
    TooManyCalls = "too_many_calls", Relay;
    Draining = "draining", Relay;
    InternalError = "internal_error", Relay;
    UpstreamUnreachable = "upstream_unreachable", Upstream;
    UpstreamTimeout = "upstream_timeout", Upstream;
    UpstreamInvalidAnswer = "upstream_invalid_answer", Upstream;
    // The provider's answer names no ICE candidate the relay's private-address policy
    // allows: the worker's fault (or a man in the middle of its exchange).
    UpstreamCandidatesNotAllowed = "upstream_candidates_not_allowed", Upstream;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class of the code at the front of a relay status message; `None` when the message
/// carries no code this contract defines (Envoy's own texts, an older or newer relay).
pub fn class_of_message(message: &str) -> Option<ErrorClass> {
    let (code, _) = crate::split_status_message(message);
    code.and_then(ErrorCode::parse).map(ErrorCode::class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_is_snake_case() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(*c));
            assert!(c
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        assert_eq!(ErrorCode::parse("bogus"), None);
    }

    /// The wire form of every code, pinned: callers match on these strings, so a code may be
    /// added but never respelled.
    #[test]
    fn wire_forms_are_pinned() {
        let wire: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            wire,
            [
                "missing_sdp",
                "invalid_sdp",
                "missing_model",
                "invalid_session_json",
                "invalid_call_id",
                "call_exists",
                "call_not_found",
                "missing_upstream",
                "upstream_not_allowed",
                "invalid_principal",
                "call_id_api_mismatch",
                "unsupported_api",
                "budget_unavailable",
                "too_many_calls",
                "draining",
                "internal_error",
                "upstream_unreachable",
                "upstream_timeout",
                "upstream_invalid_answer",
                "upstream_candidates_not_allowed",
            ]
        );
        assert_eq!(ErrorCode::InvalidPrincipal.class(), ErrorClass::Client);
        assert_eq!(ErrorCode::CallIdApiMismatch.class(), ErrorClass::Client);
        assert_eq!(ErrorCode::UnsupportedApi.class(), ErrorClass::Client);
    }

    #[test]
    fn a_refused_upstream_is_not_the_workers_fault() {
        assert_eq!(ErrorCode::UpstreamNotAllowed.class(), ErrorClass::Client);
        assert_eq!(ErrorCode::UpstreamTimeout.class(), ErrorClass::Upstream);
        assert_eq!(
            class_of_message("upstream_unreachable: connect refused"),
            Some(ErrorClass::Upstream)
        );
        assert_eq!(class_of_message("draining: bye"), Some(ErrorClass::Relay));
        assert_eq!(class_of_message("upstream_other: x"), None);
        assert_eq!(class_of_message("no code here"), None);
    }
}
