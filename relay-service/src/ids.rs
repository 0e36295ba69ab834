//! Call ids (`rtc_` or `live_` + 32 hex characters, 128 random bits; the grammar is the
//! contract's) and ICE credentials.

use crate::error::SetupError;
use rand::RngCore;
use realtime_relay_proto::call_id::{self, Kind};

/// A new Realtime call id, `rtc_<32 hex>`.
pub fn new_call_id() -> String {
    new_call_id_of(Kind::Realtime)
}

/// A new id for a call of `kind`: `rtc_<32 hex>` or `live_<32 hex>`.
pub fn new_call_id_of(kind: Kind) -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    call_id::new_of(kind, &bytes, None)
}

/// Checks a caller-chosen id (empty: none, the relay makes one) for a call of `kind`: it
/// must fit the grammar, and its prefix must name the call's API, since each API's clients
/// keep the id as given and look for their own prefix.
pub fn check_requested(kind: Kind, requested: &str) -> Result<(), SetupError> {
    if requested.is_empty() {
        return Ok(());
    }
    if !is_valid_call_id(requested) {
        return Err(SetupError::InvalidCallId);
    }
    match call_id::split(requested) {
        Some((k, _)) if k == kind => Ok(()),
        _ => Err(SetupError::CallIdApiMismatch(kind.prefix())),
    }
}

/// Caller-chosen ids must fit the contract's grammar (`realtime_relay_proto::call_id`):
/// they appear in URLs, logs and metrics, so nothing else is accepted.
pub fn is_valid_call_id(id: &str) -> bool {
    call_id::is_valid(id)
}

/// Random ICE credentials (RFC 8839: ufrag ≥ 4 chars, pwd ≥ 22 chars of ice-char).
pub fn new_ice_credentials() -> (String, String) {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let mut pick = |n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[(rng.next_u32() as usize) % ALPHABET.len()] as char)
            .collect()
    };
    (pick(16), pick(32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = new_call_id();
        let b = new_call_id();
        assert!(is_valid_call_id(&a), "{a}");
        assert_eq!(a.len(), 36);
        assert_ne!(a, b);
    }

    #[test]
    fn requested_ids_must_name_the_calls_api() {
        let rtc = "rtc_0123456789abcdef0123456789abcdef";
        let live = "live_0123456789abcdef0123456789abcdef";
        // (kind, requested id, expected code)
        for (kind, id, want) in [
            (Kind::Realtime, "", None),
            (Kind::Live, "", None),
            (Kind::Realtime, rtc, None),
            (Kind::Live, live, None),
            (Kind::Live, "live_custom-id-1", None),
            (Kind::Live, rtc, Some("call_id_api_mismatch")),
            (Kind::Realtime, live, Some("call_id_api_mismatch")),
            (Kind::Live, "live_short", Some("invalid_call_id")),
            (Kind::Live, "sess_0123456789abcdef", Some("invalid_call_id")),
            (Kind::Realtime, "rtc_../../x", Some("invalid_call_id")),
        ] {
            let got = check_requested(kind, id).err().map(|e| e.code());
            assert_eq!(got, want, "{kind:?} {id:?}");
        }
        let e = check_requested(Kind::Live, rtc).unwrap_err();
        assert!(e.to_string().contains("live_"), "{e}");
    }

    #[test]
    fn generated_ids_carry_their_apis_prefix() {
        let live = new_call_id_of(Kind::Live);
        assert!(
            live.starts_with("live_") && is_valid_call_id(&live),
            "{live}"
        );
        assert_eq!(live.len(), 37);
        assert!(new_call_id().starts_with("rtc_"));
    }

    #[test]
    fn hostile_call_ids_are_refused() {
        for bad in [
            "",
            "rtc_",
            "rtc_short",
            "call_12345678",
            "rtc_../../etc",
            "rtc_abc def ghi",
            "rtc_\u{0}aaaaaaaaa",
        ] {
            assert!(!is_valid_call_id(bad) || bad == "rtc_short", "{bad:?}");
        }
        assert!(!is_valid_call_id("rtc_short"));
        assert!(is_valid_call_id("rtc_abcdefgh"));
        assert!(!is_valid_call_id(&format!(
            "rtc_{}",
            "a".repeat(realtime_relay_proto::call_id::MAX_SUFFIX + 1)
        )));
    }
}
