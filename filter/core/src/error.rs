//! Client-visible errors: one enum, stable codes, OpenAI-shaped JSON.

use rtc_peer::multipart::MultipartError;
use serde::Serialize;

use crate::reply::HttpReply;

/// Every error the filter answers with itself. The `code()` strings are part of the API:
/// clients and dashboards match on them, so never rename one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("method not allowed on this path")]
    MethodNotAllowed { allow: &'static str },
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("missing Content-Type; expected application/sdp or multipart/form-data")]
    MissingContentType,
    #[error("unsupported Content-Type; expected application/sdp or multipart/form-data")]
    UnsupportedContentType,
    #[error("malformed Content-Type: {0}")]
    MalformedContentType(&'static str),
    /// The multipart body (or an offer over its size limit): the shared parser's error, with
    /// its own stable code (`malformed_multipart`, `duplicate_part`, `part_too_large`).
    #[error(transparent)]
    Multipart(MultipartError),
    #[error("missing SDP offer")]
    MissingSdp,
    #[error("invalid SDP offer: {0}")]
    InvalidSdp(&'static str),
    #[error("invalid session JSON: {0}")]
    InvalidSessionJson(&'static str),
    #[error("missing model: give session.model, the model query parameter, or configure a default model")]
    MissingModel,
    #[error("invalid model name: {0}")]
    InvalidModel(&'static str),
    #[error("the model '{0}' does not exist or is not served by this gateway")]
    ModelNotFound(String),
    #[error("the routing header names no pool or worker serving this model")]
    InvalidRoutingHeader,
    #[error("no Authorization header and no API key configured for the worker")]
    MissingApiKey,
    /// A credential was given but is not accepted; the text says why, never the credential.
    #[error("invalid API key: {0}")]
    InvalidApiKey(&'static str),
    /// A per-caller limit ([`crate::limits`]): `what` names it.
    #[error("rate limit exceeded: at most {limit} {what} for this caller")]
    RateLimited {
        what: &'static str,
        limit: u32,
        retry_after_s: u32,
    },
    /// A GPT-Live create body without what the gateway needs ([`crate::live`]).
    #[error("{message}")]
    LiveBody {
        code: &'static str,
        message: &'static str,
        param: &'static str,
    },
    /// A SIP control (accept, reject, refer) for a session this gateway made: its sessions
    /// are WebRTC.
    #[error("accept, reject and refer control SIP sessions; this gateway's sessions are WebRTC")]
    NotSipSession,
    /// A sideband for a call whose worker has no Envoy cluster configured (`workers[].cluster`),
    /// or whose provider gave no call id.
    #[error("this call has no sideband through the gateway ({0})")]
    SidebandUnavailable(&'static str),
    /// A Live session control the official SDK has (`fork`, `content`) that needs the
    /// provider's stored session: not served for sessions this gateway relays.
    #[error("{0} is not served for Live sessions relayed by this gateway (the provider's session lives behind the relay)")]
    LiveControlUnsupported(&'static str),
    /// An authenticated caller that no pool of the model serves.
    #[error("this caller may not use this model on this gateway")]
    CallerNotAllowed,
    /// A client-secret request with no credential.
    #[error("minting a client secret needs this gateway's API key (Authorization: Bearer ...) or a verified JWT")]
    MintNeedsCredential,
    /// A caller that may not mint client secrets (an ephemeral key); the text says why.
    #[error("{0}")]
    MintNotAllowed(&'static str),
    /// A create with an ephemeral key pinned to another model than the one asked for.
    #[error("this client secret was minted for the model '{pinned}', not '{asked}'")]
    ModelNotAllowed { pinned: String, asked: String },
    /// `POST /v1/realtime/client_secrets` where `callers.ephemeral_keys` is not configured.
    #[error("this gateway mints no client secrets (callers.ephemeral_keys is not configured)")]
    ClientSecretsNotEnabled,
    /// A client-secret request the gateway refuses, with the OpenAI code and the parameter.
    #[error(transparent)]
    ClientSecret(crate::client_secrets::RequestError),
    #[error("unknown call id")]
    CallNotFound,
    /// A path under the calls path that names no endpoint of the gateway (empty or extra
    /// segments, unknown verbs): answered here, never passed to the provider.
    #[error("no such endpoint under the realtime calls path")]
    UnknownCallsPath,
    /// A browser request from a page whose origin is neither the gateway's nor listed in
    /// `browser_origins` ([`crate::origin`]).
    #[error("requests from this web page's origin are not allowed; add it to browser_origins (and the CORS policy) to let its pages call")]
    OriginNotAllowed,
    #[error("no healthy worker available for this model")]
    NoHealthyWorker { retry_after_s: u32 },
    /// The relay could not be reached (connection refused, no healthy host).
    #[error("the relay service is unavailable")]
    RelayUnavailable {
        retry_after_s: u32,
        code: Option<String>,
    },
    #[error("the relay service did not answer in time")]
    RelayTimeout { code: Option<String> },
    /// The relay refused the request as a client fault (INVALID_ARGUMENT); its code and text.
    #[error("{message}")]
    RelayRejected { code: String, message: String },
    /// Call limit reached (RESOURCE_EXHAUSTED).
    #[error("too many concurrent calls; retry later")]
    Capacity {
        status: u16,
        retry_after_s: u32,
        code: Option<String>,
    },
    /// The relay reached the upstream but the upstream failed (UNAVAILABLE with an upstream_ code).
    #[error("the upstream model provider failed")]
    UpstreamFailed { code: String },
    #[error("the relay service failed")]
    RelayError { code: Option<String> },
    #[error("internal filter error")]
    Internal,
}

impl FilterError {
    /// HTTP status of the reply.
    pub fn status(&self) -> u16 {
        use FilterError::*;
        match self {
            MethodNotAllowed { .. } => 405,
            BodyTooLarge { .. } => 413,
            UnsupportedContentType => 415,
            MissingContentType
            | MalformedContentType(_)
            | Multipart(_)
            | MissingSdp
            | InvalidSdp(_)
            | InvalidSessionJson(_)
            | MissingModel
            | InvalidModel(_)
            | InvalidRoutingHeader
            | RelayRejected { .. } => 400,
            MissingApiKey | MintNeedsCredential | InvalidApiKey(_) => 401,
            CallerNotAllowed | MintNotAllowed(_) | ModelNotAllowed { .. } => 403,
            RateLimited { .. } => 429,
            OriginNotAllowed => 403,
            LiveBody { .. } | NotSipSession | LiveControlUnsupported(_) => 400,
            ModelNotFound(_) | CallNotFound | UnknownCallsPath | ClientSecretsNotEnabled => 404,
            ClientSecret(e) => e.status(),
            Capacity { status, .. } => *status,
            NoHealthyWorker { .. } | RelayUnavailable { .. } | SidebandUnavailable(_) => 503,
            RelayTimeout { .. } => 504,
            UpstreamFailed { .. } | RelayError { .. } => 502,
            Internal => 500,
        }
    }

    /// Stable machine-readable code (the `code` field of the JSON).
    pub fn code(&self) -> &str {
        use FilterError::*;
        match self {
            MethodNotAllowed { .. } => "method_not_allowed",
            BodyTooLarge { .. } => "request_too_large",
            MissingContentType | UnsupportedContentType | MalformedContentType(_) => {
                "invalid_content_type"
            }
            Multipart(e) => e.code(),
            MissingSdp => "missing_sdp",
            InvalidSdp(_) => "invalid_sdp",
            InvalidSessionJson(_) => "invalid_session_json",
            MissingModel => "missing_model",
            InvalidModel(_) => "invalid_model",
            ModelNotFound(_) => "model_not_found",
            InvalidRoutingHeader => "invalid_routing_header",
            MissingApiKey | MintNeedsCredential => "missing_api_key",
            InvalidApiKey(_) => "invalid_api_key",
            CallerNotAllowed | MintNotAllowed(_) => "caller_not_allowed",
            ModelNotAllowed { .. } => "model_not_allowed",
            ClientSecretsNotEnabled => "client_secrets_not_enabled",
            ClientSecret(e) => e.code(),
            RateLimited { .. } => "rate_limit_exceeded",
            CallNotFound => "call_not_found",
            UnknownCallsPath => "not_found",
            OriginNotAllowed => "origin_not_allowed",
            LiveBody { code, .. } => code,
            NotSipSession => "not_a_sip_session",
            SidebandUnavailable(_) => "sideband_unavailable",
            LiveControlUnsupported(_) => "unsupported_session_control",
            NoHealthyWorker { .. } => "no_healthy_worker",
            RelayUnavailable { code, .. } => code.as_deref().unwrap_or("relay_unavailable"),
            RelayTimeout { code } => code.as_deref().unwrap_or("relay_timeout"),
            RelayRejected { code, .. } => code,
            Capacity { code, .. } => code.as_deref().unwrap_or("capacity_exceeded"),
            UpstreamFailed { code } => code,
            RelayError { code } => code.as_deref().unwrap_or("relay_error"),
            Internal => "internal_error",
        }
    }

    /// OpenAI error `type`.
    pub fn error_type(&self) -> &'static str {
        match self.status() {
            401 => "invalid_request_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI error `param`: the request field at fault, when there is one.
    pub fn param(&self) -> Option<&str> {
        use FilterError::*;
        match self {
            MissingSdp | InvalidSdp(_) => Some("sdp"),
            InvalidSessionJson(_) => Some("session"),
            MissingModel | InvalidModel(_) | ModelNotFound(_) | ModelNotAllowed { .. } => {
                Some("model")
            }
            ClientSecret(e) => e.param(),
            LiveBody { param, .. } => Some(param),
            Multipart(MultipartError::DuplicatePart(name))
            | Multipart(MultipartError::PartTooLarge { name, .. }) => Some(name),
            _ => None,
        }
    }

    /// Seconds for a `Retry-After` header, when the client should retry.
    pub fn retry_after_s(&self) -> Option<u32> {
        use FilterError::*;
        match self {
            NoHealthyWorker { retry_after_s }
            | RateLimited { retry_after_s, .. }
            | RelayUnavailable { retry_after_s, .. }
            | Capacity { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }

    /// The OpenAI-shaped JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn to_json(&self) -> Vec<u8> {
        error_json(
            &self.to_string(),
            self.error_type(),
            self.param(),
            self.code(),
        )
    }

    /// The complete reply: status, headers and body.
    pub fn to_reply(&self, request_id: &str) -> HttpReply {
        let mut headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("x-request-id".to_string(), request_id.to_string()),
            ("cache-control".to_string(), "no-store".to_string()),
        ];
        if let FilterError::MethodNotAllowed { allow } = self {
            headers.push(("allow".to_string(), (*allow).to_string()));
        }
        if let Some(s) = self.retry_after_s() {
            headers.push(("retry-after".to_string(), s.to_string()));
        }
        HttpReply {
            status: self.status(),
            headers,
            body: self.to_json(),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

/// Serializes an OpenAI error object; all four keys are always present (`param` may be null).
pub fn error_json(message: &str, kind: &str, param: Option<&str>, code: &str) -> Vec<u8> {
    let body = ErrorBody {
        error: ErrorInner {
            message,
            kind,
            param,
            code,
        },
    };
    // Serializing plain strings cannot fail; fall back to a fixed body rather than panic.
    serde_json::to_vec(&body).unwrap_or_else(|_| {
        br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":"internal_error"}}"#
            .to_vec()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_all_four_keys() {
        let v: serde_json::Value =
            serde_json::from_slice(&FilterError::MissingModel.to_json()).unwrap();
        let e = v.get("error").unwrap().as_object().unwrap();
        for key in ["message", "type", "param", "code"] {
            assert!(e.contains_key(key), "missing {key}");
        }
        assert_eq!(e["code"], "missing_model");
        assert_eq!(e["param"], "model");
        let v: serde_json::Value =
            serde_json::from_slice(&FilterError::Internal.to_json()).unwrap();
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn method_not_allowed_reply_carries_allow() {
        let r = FilterError::MethodNotAllowed { allow: "POST" }.to_reply("req-1");
        assert_eq!(r.status, 405);
        assert!(r.headers.iter().any(|(k, v)| k == "allow" && v == "POST"));
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| k == "x-request-id" && v == "req-1"));
    }
}
