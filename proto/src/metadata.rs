//! gRPC metadata keys the filter sends with every relay call (lowercase, as HTTP/2 wants).

/// The call id the request concerns (set on `CreateCall` and `HangupCall`).
pub const CALL_ID: &str = "x-call-id";
/// The edge request id, so a relay log line can be found from an Envoy access log line.
pub const REQUEST_ID: &str = "x-request-id";
