//! The call-id grammar, one for the filter and the relay.
//!
//! A call id is a prefix, `rtc_` (a Realtime call) or `live_` (a GPT-Live session), followed by
//! 8 to 96 of `[A-Za-z0-9_-]`. Clients keep ids unchanged, prefix included: each API's own
//! clients look for its prefix. Ids appear in URLs
//! (`Location: /v1/realtime/calls/{id}`), logs and metrics, so nothing else is accepted;
//! one widely used client takes the last path segment of `Location` and requires the
//! `rtc_` prefix. Ids the gateway makes are `rtc_<32 hex>` (128 random bits), or
//! `rtc_<replica>_<32 hex>` when the filter addresses relay replicas: `<replica>` is a
//! configured replica id (at most [`MAX_REPLICA_ID`] characters) or a replica token
//! ([`crate::replica_token`], at most [`crate::replica_token::MAX_TOKEN_LEN`]), so every
//! such id fits the grammar. Tokens may contain `_`; the random part never does, so the
//! replica is everything between the prefix and the LAST `_`.

/// Prefix of Realtime call ids.
pub const PREFIX: &str = "rtc_";
/// Prefix of GPT-Live session ids.
pub const LIVE_PREFIX: &str = "live_";

/// Which API a call id names: its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Kind {
    #[default]
    Realtime,
    Live,
}

impl Kind {
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Realtime => PREFIX,
            Kind::Live => LIVE_PREFIX,
        }
    }
}

/// The id's kind and what follows its prefix.
pub fn split(id: &str) -> Option<(Kind, &str)> {
    if let Some(rest) = id.strip_prefix(PREFIX) {
        return Some((Kind::Realtime, rest));
    }
    id.strip_prefix(LIVE_PREFIX).map(|rest| (Kind::Live, rest))
}
/// Fewest characters after the prefix.
pub const MIN_SUFFIX: usize = 8;
/// Most characters after the prefix: room for an IPv6 replica token (35), `_` and the
/// random part (32).
pub const MAX_SUFFIX: usize = 96;
/// Hex characters of the random part of the ids the gateway makes.
pub const RANDOM_HEX_LEN: usize = 32;
/// Longest relay replica id (`[A-Za-z0-9-]`, no `_`: it is the id's first segment).
pub const MAX_REPLICA_ID: usize = 16;

fn is_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Whether `id` is a call id of the grammar above.
pub fn is_valid(id: &str) -> bool {
    let Some((_, rest)) = split(id) else {
        return false;
    };
    (MIN_SUFFIX..=MAX_SUFFIX).contains(&rest.len()) && rest.bytes().all(is_id_char)
}

/// Whether `id` may name a relay replica inside call ids.
pub fn is_valid_replica_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REPLICA_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A new call id from 128 random bits: `rtc_<32 hex>`, or `rtc_<replica>_<32 hex>`.
pub fn new(random: &[u8; 16], replica: Option<&str>) -> String {
    new_of(Kind::Realtime, random, replica)
}

/// [`new`] for an API: `rtc_…` or `live_…`.
pub fn new_of(kind: Kind, random: &[u8; 16], replica: Option<&str>) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(LIVE_PREFIX.len() + MAX_SUFFIX);
    s.push_str(kind.prefix());
    if let Some(r) = replica {
        s.push_str(r);
        s.push('_');
    }
    for b in random {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

/// The replica segment of `rtc_<replica>_<random>`, if the id has one.
pub fn replica_segment(id: &str) -> Option<&str> {
    let (replica, _) = split(id)?.1.rsplit_once('_')?;
    Some(replica)
}

/// The random part of an id the gateway made without a replica (`rtc_<32 hex>`).
pub fn plain_random_part(id: &str) -> Option<&str> {
    let (_, rest) = split(id)?;
    (rest.len() == RANDOM_HEX_LEN && rest.bytes().all(|b| b.is_ascii_hexdigit())).then_some(rest)
}

/// The random part of an id the gateway made, with or without a replica segment.
pub fn random_part(id: &str) -> Option<&str> {
    let (_, rest) = split(id)?;
    let random = rest.rsplit_once('_').map_or(rest, |(_, r)| r);
    (random.len() == RANDOM_HEX_LEN && random.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(random)
}

/// `rtc_<replica>_<random>` from a plain id `rtc_<random>` (see [`plain_random_part`]).
pub fn with_replica(plain_id: &str, replica: &str) -> Option<String> {
    let (kind, _) = split(plain_id)?;
    let random = plain_random_part(plain_id)?;
    Some(format!("{}{replica}_{random}", kind.prefix()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_the_gateway_makes_fit_the_grammar() {
        let plain = new(&[0xab; 16], None);
        assert_eq!(plain.len(), 36);
        assert!(plain.starts_with("rtc_abab"));
        assert!(is_valid(&plain));
        let longest = "r".repeat(MAX_REPLICA_ID);
        assert!(is_valid_replica_id(&longest));
        let named = new(&[0; 16], Some(&longest));
        assert!(is_valid(&named), "{named}");
        assert_eq!(replica_segment(&named), Some(longest.as_str()));
        assert_eq!(replica_segment(&plain), None);
        assert_eq!(plain_random_part(&plain), Some(&plain[4..]));
        assert_eq!(plain_random_part(&named), None);
        assert_eq!(random_part(&named), Some(&named[named.len() - 32..]));
        assert_eq!(random_part(&plain), Some(&plain[4..]));
        assert_eq!(random_part("rtc_x_abc"), None);
    }

    #[test]
    fn ids_with_the_longest_replica_token_fit_the_grammar() {
        use crate::replica_token::{ReplicaKey, MAX_TOKEN_LEN};
        let key = ReplicaKey::new(&[b'k'; 32]).unwrap();
        let token = key.mint("[fd00:1:2:3:4:5:6:7]:65535".parse().unwrap());
        assert_eq!(token.len(), MAX_TOKEN_LEN);
        let plain = new(&[0xcd; 16], None);
        let id = with_replica(&plain, &token).unwrap();
        assert!(is_valid(&id), "{id}");
        assert_eq!(replica_segment(&id), Some(token.as_str()));
        assert_eq!(
            with_replica(&id, &token),
            None,
            "only plain ids take a replica"
        );
        assert_eq!(with_replica("rtc_custom-id", &token), None);
    }

    #[test]
    fn live_ids_keep_their_prefix_through_every_step() {
        let plain = new_of(Kind::Live, &[0xab; 16], None);
        assert!(
            plain.starts_with("live_abab") && is_valid(&plain),
            "{plain}"
        );
        assert_eq!(split(&plain).map(|(k, _)| k), Some(Kind::Live));
        assert_eq!(plain_random_part(&plain), Some(&plain[5..]));
        let named = with_replica(&plain, "r1").unwrap();
        assert!(named.starts_with("live_r1_") && is_valid(&named), "{named}");
        assert_eq!(replica_segment(&named), Some("r1"));
        assert_eq!(random_part(&named), Some(&plain[5..]));
        assert_eq!(
            split(&new(&[1; 16], None)).map(|(k, _)| k),
            Some(Kind::Realtime)
        );
        for bad in ["live_", "live_short", "LIVE_12345678", "lives_12345678"] {
            assert!(!is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "",
            "rtc_",
            "rtc_short",
            "call_12345678",
            "RTC_12345678",
            "rtc_../../etc",
            "rtc_abc def ghi",
            "rtc_aaaaaaaa/hangup",
            "rtc_a%2faaaaaaa",
            "rtc_\u{0}aaaaaaaaa",
            "rtc_\u{e9}aaaaaaaa",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
        assert!(is_valid("rtc_abcdefgh"));
        assert!(is_valid(&format!("rtc_{}", "a".repeat(MAX_SUFFIX))));
        assert!(!is_valid(&format!("rtc_{}", "a".repeat(MAX_SUFFIX + 1))));
        for bad in ["", "a_b", "a.b", &"r".repeat(MAX_REPLICA_ID + 1)] {
            assert!(!is_valid_replica_id(bad), "{bad:?}");
        }
    }
}
