//! Call ids (`rtc_` + 32 hex characters, 128 random bits; the grammar is the contract's)
//! and ICE credentials.

use rand::RngCore;
use realtime_relay_proto::call_id;

pub fn new_call_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    call_id::new(&bytes, None)
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
