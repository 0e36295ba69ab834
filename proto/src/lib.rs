//! The `realtime.relay.v1` gRPC contract.
//!
//! Message types are plain prost structs (usable from the wasm filter without tonic);
//! the `grpc` feature adds tonic client and server stubs. The facts of the contract that
//! are not messages live here too, once, for both sides: the call-id grammar
//! ([`call_id`]), the principal grammar ([`principal`]), the metadata keys ([`metadata`])
//! and the stable error codes with their fault classes ([`error_code`]).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/realtime.relay.v1.rs"));
}

/// Envoy's global rate-limit service API, the part the filter uses
/// (`proto/envoy_rls.proto`).
pub mod rls {
    include!(concat!(env!("OUT_DIR"), "/envoy.service.ratelimit.v3.rs"));
}

pub mod call_id;
pub mod error_code;
pub mod metadata;
pub mod principal;
pub mod replica_token;

pub use error_code::{ErrorClass, ErrorCode};

/// The API a `CreateCallRequest` speaks is the kind of id its call gets: `rtc_` for the
/// Realtime API, `live_` for GPT-Live.
impl From<v1::Api> for call_id::Kind {
    fn from(api: v1::Api) -> Self {
        match api {
            v1::Api::Realtime => call_id::Kind::Realtime,
            v1::Api::Live => call_id::Kind::Live,
        }
    }
}

impl From<call_id::Kind> for v1::Api {
    fn from(kind: call_id::Kind) -> Self {
        match kind {
            call_id::Kind::Realtime => v1::Api::Realtime,
            call_id::Kind::Live => v1::Api::Live,
        }
    }
}

/// The kind of call a `CreateCallRequest.api` value asks for; `None` for a value this
/// contract does not define (prost keeps unknown enum values as their number).
pub fn api_kind(api: i32) -> Option<call_id::Kind> {
    v1::Api::try_from(api).ok().map(call_id::Kind::from)
}

/// Fully-qualified gRPC service name, as used in `:path` and by `dispatch_grpc_call`.
pub const SERVICE_NAME: &str = "realtime.relay.v1.RelayService";

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/relay_descriptor.bin"));

/// Separator between the stable error code and the human message in a gRPC status
/// message ("invalid_sdp: offer has no media").
pub const ERROR_CODE_SEPARATOR: &str = ": ";

/// Splits a relay status message into (code, message). A message without the
/// separator has no code.
pub fn split_status_message(message: &str) -> (Option<&str>, &str) {
    match message.split_once(ERROR_CODE_SEPARATOR) {
        Some((code, rest))
            if !code.is_empty()
                && code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') =>
        {
            (Some(code), rest)
        }
        _ => (None, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_message_code_is_split_off() {
        assert_eq!(
            split_status_message("invalid_sdp: no media"),
            (Some("invalid_sdp"), "no media")
        );
        assert_eq!(split_status_message("plain words"), (None, "plain words"));
        assert_eq!(
            split_status_message("Not A Code: x"),
            (None, "Not A Code: x")
        );
    }

    #[test]
    fn each_api_names_its_id_kind() {
        assert_eq!(
            api_kind(v1::Api::Realtime as i32),
            Some(call_id::Kind::Realtime)
        );
        assert_eq!(api_kind(v1::Api::Live as i32), Some(call_id::Kind::Live));
        assert_eq!(api_kind(7), None);
        for kind in [call_id::Kind::Realtime, call_id::Kind::Live] {
            assert_eq!(call_id::Kind::from(v1::Api::from(kind)), kind);
        }
    }

    #[test]
    fn messages_round_trip_with_prost_alone() {
        use prost::Message;
        let req = v1::CreateCallRequest {
            call_id: "rtc_abc".into(),
            model: "gpt-realtime".into(),
            sdp_offer: "v=0\r\n".into(),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        let back = v1::CreateCallRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, req);
    }
}
