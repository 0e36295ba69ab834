//! The gRPC status messages the filter decodes (percent-encoded by the host, written by a
//! relay, or by whatever answers on the relay's port): any UTF-8. Properties: no panic; the
//! stable code split off the front is a plain token, and the rest is a suffix of the message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = realtime_filter_core::relay::decode_grpc_message(raw);
    let (code, rest) = realtime_relay_proto::split_status_message(&decoded);
    if let Some(code) = code {
        assert!(!code.is_empty());
        assert!(
            code.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{code:?}"
        );
    }
    assert!(decoded.ends_with(rest));
});
