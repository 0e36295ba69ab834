//! Replica tokens: the relay replica that holds a call, named in the call id so that a
//! hangup reaches that replica, and authenticated so that nobody can forge one.
//!
//! When relays run as pods that come and go (`kubectl scale`, an autoscaler), the gateway
//! cannot keep a list of them in its configuration. Instead each relay knows the address
//! the gateway reaches it at (`--replica-addr`, the pod IP and gRPC port) and writes it
//! into the ids of the calls it sets up:
//!
//! ```text
//! rtc_<token>_<32 hex>      token = base64url(ip ‖ port ‖ tag), no padding
//! ```
//!
//! where `tag` is the first [`TAG_LEN`] bytes of HMAC-SHA256 over a domain label, the IP
//! and the port, keyed with a secret the relays and the gateway share (from their
//! environment, never from configuration that is logged). The filter sends a hangup to the
//! address in a token only if the tag verifies: a call id is client input, and without
//! the tag a forged id would make Envoy open connections to any address the client
//! chooses. 64 bits of tag make a blind forgery cost 2^63 requests on average.
//!
//! The token's alphabet (base64url) contains `_`, so the random part, which never does,
//! is found after the LAST `_`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Bytes of the HMAC tag kept in a token.
pub const TAG_LEN: usize = 8;
/// Fewest bytes of the shared secret (256 bits of a random string).
pub const MIN_KEY_LEN: usize = 32;
/// Longest shared secret accepted (a whole PEM file is a mistake, not a key).
pub const MAX_KEY_LEN: usize = 1024;
/// Longest token: an IPv6 address, a port and the tag, in base64url.
pub const MAX_TOKEN_LEN: usize = ((16 + 2 + TAG_LEN) * 4).div_ceil(3);

/// Separates the tag's input from other uses of the same key.
const DOMAIN: &[u8] = b"realtime-relay-replica-v1";

/// The shared secret that authenticates replica tokens.
#[derive(Clone)]
pub struct ReplicaKey(Vec<u8>);

/// Why a secret cannot be a replica key. The secret itself never appears in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "is {0} bytes; a replica key needs at least {MIN_KEY_LEN} (e.g. `openssl rand -base64 48`)"
    )]
    TooShort(usize),
    #[error("is {0} bytes; a replica key is at most {MAX_KEY_LEN}")]
    TooLong(usize),
}

impl ReplicaKey {
    /// The secret's bytes as given (surrounding whitespace, as a trailing newline from a
    /// Secret file, is not part of it).
    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        let secret = secret.trim_ascii();
        if secret.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(secret.len()));
        }
        if secret.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong(secret.len()));
        }
        Ok(ReplicaKey(secret.to_vec()))
    }

    fn tag(&self, addr_bytes: &[u8]) -> [u8; TAG_LEN] {
        // Any key length is valid for HMAC, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(DOMAIN);
        mac.update(addr_bytes);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// The token naming `addr`.
    pub fn mint(&self, addr: SocketAddr) -> String {
        let mut bytes = address_bytes(addr);
        let tag = self.tag(&bytes);
        bytes.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The address a token names, if the token is well formed and its tag verifies.
    pub fn open(&self, token: &str) -> Option<SocketAddr> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let (addr_bytes, tag) = bytes.split_at_checked(bytes.len().checked_sub(TAG_LEN)?)?;
        let addr = parse_address(addr_bytes)?;
        // Constant time: the comparison must not tell a forger how many bytes matched.
        let expected = self.tag(addr_bytes);
        let diff = expected
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (diff == 0).then_some(addr)
    }
}

impl std::fmt::Debug for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaKey(<redacted>)")
    }
}

fn address_bytes(addr: SocketAddr) -> Vec<u8> {
    // An IPv4-mapped IPv6 address is the IPv4 address: one name per replica.
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    let mut out = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

fn parse_address(bytes: &[u8]) -> Option<SocketAddr> {
    let (ip, port) = bytes.split_at_checked(bytes.len().checked_sub(2)?)?;
    let port = u16::from_be_bytes([port[0], port[1]]);
    let ip = match ip.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(ip).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(ip).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: char) -> ReplicaKey {
        ReplicaKey::new(c.to_string().repeat(40).as_bytes()).unwrap()
    }

    #[test]
    fn tokens_round_trip_for_both_families() {
        let k = key('k');
        for addr in ["10.1.2.3:50051", "[fd00::1:2]:50051", "127.0.0.1:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let token = k.mint(addr);
            assert!(token.len() <= MAX_TOKEN_LEN, "{token}");
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{token}"
            );
            assert_eq!(k.open(&token), Some(addr));
        }
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:9".parse().unwrap();
        assert_eq!(k.open(&k.mint(mapped)), Some("10.0.0.7:9".parse().unwrap()));
    }

    #[test]
    fn forged_or_damaged_tokens_do_not_open() {
        let k = key('k');
        let addr: SocketAddr = "10.1.2.3:50051".parse().unwrap();
        let token = k.mint(addr);
        // Another key's token.
        assert_eq!(k.open(&key('o').mint(addr)), None);
        // Every single-character change.
        for i in 0..token.len() {
            let mut t = token.clone().into_bytes();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            assert_eq!(k.open(std::str::from_utf8(&t).unwrap()), None, "byte {i}");
        }
        // The address of a valid token with its tag moved onto another address.
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[3] ^= 1;
        assert_eq!(k.open(&URL_SAFE_NO_PAD.encode(&raw)), None);
        for bad in ["", "AAAA", "!!!!", &"A".repeat(MAX_TOKEN_LEN + 1), "a_b"] {
            assert_eq!(k.open(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn short_keys_are_refused_without_echoing_them() {
        let err = ReplicaKey::new(b"secret-but-short\n").unwrap_err();
        assert_eq!(err, KeyError::TooShort(16));
        assert!(!err.to_string().contains("secret"));
        assert!(ReplicaKey::new(&[b'x'; MAX_KEY_LEN + 1]).is_err());
        assert_eq!(format!("{:?}", key('s')), "ReplicaKey(<redacted>)");
    }
}
