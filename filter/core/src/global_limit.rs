//! Fleet-wide per-caller limits through Envoy's global rate-limit service API
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, as envoyproxy/ratelimit
//! serves it).
//!
//! The per-instance limits ([`crate::limits`]) let N gateway replicas allow N times as much.
//! For an exact fleet-wide budget the filter asks a rate-limit service before each create,
//! with descriptors keyed by the caller's principal, which only the filter knows (Envoy's own
//! rate-limit filter runs on headers, and a create is answered by this filter, never routed):
//!
//! ```text
//! domain: <domain>
//! descriptors: [{principal: <p_…>}], [{principal: <p_…>}, {model: <model>}]
//! ```
//!
//! `OVER_LIMIT` is `429 rate_limit_exceeded` with `Retry-After` from the service's
//! `duration_until_reset`; a failure or timeout lets the create through unless
//! `deny_on_failure` (as Envoy's rate-limit filter's `failure_mode_deny`).

use prost::Message;
use realtime_relay_proto::rls::{
    rate_limit_descriptor::Entry, rate_limit_response::Code, RateLimitDescriptor, RateLimitRequest,
    RateLimitResponse,
};
use serde::Deserialize;

pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalRateLimit {
    /// Envoy cluster of the rate-limit service (HTTP/2).
    pub cluster: String,
    /// The service's domain for these descriptors.
    pub domain: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Refuse creates while the service fails or is slow (default: let them through).
    #[serde(default)]
    pub deny_on_failure: bool,
}

fn default_timeout_ms() -> u64 {
    200
}

impl GlobalRateLimit {
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster.trim().is_empty() {
            return Err("global_rate_limit.cluster must not be empty".into());
        }
        if self.domain.trim().is_empty() || self.domain.len() > 128 {
            return Err("global_rate_limit.domain must be 1-128 characters".into());
        }
        if !(1..=10_000).contains(&self.timeout_ms) {
            return Err("global_rate_limit.timeout_ms must be between 1 and 10000".into());
        }
        Ok(())
    }
}

/// The request for one create by `subject` of `model`.
pub fn encode_request(domain: &str, subject: &str, model: &str) -> Vec<u8> {
    let entry = |k: &str, v: &str| Entry {
        key: k.into(),
        value: v.into(),
    };
    RateLimitRequest {
        domain: domain.into(),
        descriptors: vec![
            RateLimitDescriptor {
                entries: vec![entry("principal", subject)],
            },
            RateLimitDescriptor {
                entries: vec![entry("principal", subject), entry("model", model)],
            },
        ],
        hits_addend: 1,
    }
    .encode_to_vec()
}

/// What the service said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        retry_after_s: u32,
    },
    /// No usable answer (gRPC failure, undecodable, UNKNOWN).
    Failed,
}

pub fn decide(status: u32, body: Option<&[u8]>) -> Decision {
    if status != crate::relay::grpc::OK {
        return Decision::Failed;
    }
    let Ok(r) = RateLimitResponse::decode(body.unwrap_or(&[])) else {
        return Decision::Failed;
    };
    match r.overall_code() {
        Code::Ok => Decision::Allow,
        Code::OverLimit => {
            let reset = r
                .statuses
                .iter()
                .filter(|s| s.code() == Code::OverLimit)
                .filter_map(|s| s.duration_until_reset.as_ref())
                .map(|d| d.seconds.max(0) as u64 + u64::from(d.nanos > 0))
                .max()
                .unwrap_or(1);
            Decision::Deny {
                retry_after_s: u32::try_from(reset.clamp(1, 3600)).unwrap_or(3600),
            }
        }
        Code::Unknown => Decision::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use realtime_relay_proto::rls::{rate_limit_response::DescriptorStatus, Duration};

    #[test]
    fn the_request_names_the_principal_and_the_model() {
        let r = RateLimitRequest::decode(
            encode_request("realtime", "p_abc", "gpt-realtime").as_slice(),
        )
        .unwrap();
        assert_eq!((r.domain.as_str(), r.hits_addend), ("realtime", 1));
        let d: Vec<Vec<(String, String)>> = r
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .collect();
        assert_eq!(
            d,
            vec![
                vec![("principal".into(), "p_abc".into())],
                vec![
                    ("principal".into(), "p_abc".into()),
                    ("model".into(), "gpt-realtime".into())
                ],
            ]
        );
    }

    #[test]
    fn answers_map_to_allow_deny_with_retry_after_or_failure() {
        let answer = |code: Code, reset: Option<i64>| {
            let mut r = RateLimitResponse::default();
            r.set_overall_code(code);
            let mut s = DescriptorStatus::default();
            s.set_code(code);
            s.duration_until_reset = reset.map(|seconds| Duration { seconds, nanos: 0 });
            r.statuses.push(s);
            r.encode_to_vec()
        };
        assert_eq!(decide(0, Some(&answer(Code::Ok, None))), Decision::Allow);
        assert_eq!(
            decide(0, Some(&answer(Code::OverLimit, Some(42)))),
            Decision::Deny { retry_after_s: 42 }
        );
        assert_eq!(
            decide(0, Some(&answer(Code::OverLimit, None))),
            Decision::Deny { retry_after_s: 1 }
        );
        assert_eq!(
            decide(0, Some(&answer(Code::Unknown, None))),
            Decision::Failed
        );
        assert_eq!(decide(14, None), Decision::Failed);
        assert_eq!(decide(0, Some(b"\xff\xff\xff")), Decision::Failed);
    }
}
