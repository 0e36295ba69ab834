//! OpenAI-shaped error responses: `{"error":{"message","type","param","code"}}`, all four keys
//! always present.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ApiError {
    /// Missing, malformed or wrong `Authorization: Bearer` header.
    InvalidApiKey,
    InvalidContentType,
    MalformedMultipart(String),
    MissingSdp,
    InvalidSdp(String),
    InvalidSessionJson(String),
    /// GPT-Live: a body with another content type than `application/json`.
    InvalidJsonContentType,
    /// GPT-Live: a body that is not a JSON object.
    InvalidJson(String),
    /// GPT-Live: a required parameter is absent (`session.model`, `transport.sdp`, …).
    MissingParameter(&'static str),
    /// GPT-Live: a parameter has a value the API does not take.
    InvalidValue {
        param: &'static str,
        why: String,
    },
    CallNotFound,
    /// Our own fault (e.g. no UDP port available).
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ApiError::CallNotFound => StatusCode::NOT_FOUND,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidApiKey => "invalid_api_key",
            ApiError::InvalidContentType => "invalid_content_type",
            ApiError::MalformedMultipart(_) => "malformed_multipart",
            ApiError::MissingSdp => "missing_sdp",
            ApiError::InvalidSdp(_) => "invalid_sdp",
            ApiError::InvalidSessionJson(_) => "invalid_session_json",
            ApiError::InvalidJsonContentType => "invalid_content_type",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::MissingParameter(_) => "missing_required_parameter",
            ApiError::InvalidValue { .. } => "invalid_value",
            ApiError::CallNotFound => "call_not_found",
            ApiError::Internal(_) => "server_error",
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            ApiError::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn message(&self) -> String {
        match self {
            // Never echo the presented key back.
            ApiError::InvalidApiKey => {
                "Incorrect or missing API key provided. Send `Authorization: Bearer <key>`.".into()
            }
            ApiError::InvalidContentType => {
                "Unsupported Content-Type: expected application/sdp or multipart/form-data.".into()
            }
            ApiError::MalformedMultipart(why) => format!("Malformed multipart body: {why}."),
            ApiError::MissingSdp => "The request has no SDP offer.".into(),
            ApiError::InvalidSdp(why) => format!("Invalid SDP offer: {why}."),
            ApiError::InvalidSessionJson(why) => format!("Invalid session JSON: {why}."),
            ApiError::InvalidJsonContentType => {
                "Unsupported Content-Type: expected application/json.".into()
            }
            ApiError::InvalidJson(why) => {
                format!("We could not parse the JSON body of your request: {why}.")
            }
            ApiError::MissingParameter(param) => format!("Missing required parameter: '{param}'."),
            ApiError::InvalidValue { param, why } => {
                format!("Invalid value for '{param}': {why}.")
            }
            ApiError::CallNotFound => "No such call.".into(),
            ApiError::Internal(why) => format!("Internal error: {why}."),
        }
    }

    /// The parameter at fault, where one is.
    fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::MissingParameter(param) | ApiError::InvalidValue { param, .. } => Some(param),
            _ => None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            self.body().to_string(),
        )
            .into_response()
    }
}
