//! Ephemeral keys the gateway mints (`POST /v1/realtime/client_secrets`) and verifies.
//!
//! A browser must never hold a real key: its backend asks the gateway for a short-lived key
//! (`ek_…`, as OpenAI's client secrets), and the page opens its call with it. The key is
//! self-contained and signed, so any Envoy worker thread or gateway replica verifies it with
//! no network call and no shared state:
//!
//! ```text
//! ek_<base64url(claims JSON)>.<base64url(HMAC-SHA256(key, DOMAIN ‖ claims))>
//! ```
//!
//! The claims name the principal that minted it, the gateway it is for, the model it may open
//! (if pinned), its expiry and the session settings it carries. Signing keys come from the VM
//! environment, two at a time for rotation: the first signs, every one verifies (the claims
//! name the key by a fingerprint, never by value).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The prefix OpenAI's client secrets have, and ours.
pub const PREFIX: &str = "ek_";
/// Fewest bytes of a signing key.
pub const MIN_KEY_LEN: usize = 32;
/// Shortest and longest lifetime a key may be minted with (OpenAI's bounds), and the default.
pub const MIN_TTL_S: u64 = 10;
pub const MAX_TTL_S: u64 = 7200;
pub const DEFAULT_TTL_S: u64 = 600;
/// Largest session object a key carries (it travels in a header).
pub const MAX_SESSION_BYTES: usize = 4096;
/// Longest key accepted for verification (claims and tag in base64url, with room).
pub const MAX_KEY_LEN: usize = 8192;

const DOMAIN: &[u8] = b"realtime-gateway-ephemeral-key-v1\0";

/// What a key says. Short field names: the key travels in every create's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Format version.
    pub v: u32,
    /// Fingerprint of the signing key.
    pub kid: String,
    /// The gateway the key is for (`callers.ephemeral_keys.gateway`).
    pub gw: String,
    /// The principal that minted it (its calls are owned by that principal).
    pub sub: String,
    /// The model it may open, when pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdl: Option<String>,
    /// Issued and expires, Unix seconds.
    pub iat: u64,
    pub exp: u64,
    /// Session settings merged into the call's session (a JSON object), when any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ses: Option<serde_json::Map<String, serde_json::Value>>,
    /// The minting key's per-call budget (`crate::budget`), when it has one: the key's calls
    /// get it instead of their pool's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bud: Option<crate::budget::Budget>,
}

/// One signing key: its bytes and their fingerprint.
#[derive(Clone)]
pub struct SigningKey {
    bytes: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.kid)
    }
}

impl SigningKey {
    /// A key from an environment value (surrounding whitespace is not part of it).
    pub fn new(secret: &str) -> Result<SigningKey, String> {
        let bytes = secret.trim().as_bytes().to_vec();
        if bytes.len() < MIN_KEY_LEN {
            return Err(format!(
                "is {} bytes; a signing key needs at least {MIN_KEY_LEN} (e.g. `openssl rand -base64 48`)",
                bytes.len()
            ));
        }
        let digest = Sha256::digest([b"kid\0".as_slice(), &bytes].concat());
        let kid = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        Ok(SigningKey { bytes, kid })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    fn tag(&self, claims: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.bytes) else {
            return Vec::new();
        };
        mac.update(DOMAIN);
        mac.update(claims);
        mac.finalize().into_bytes().to_vec()
    }
}

/// The keys of one gateway: the first signs, all verify.
#[derive(Debug, Clone)]
pub struct Keyring {
    pub gateway: String,
    pub keys: Vec<SigningKey>,
}

/// Why a key was refused. Never carries the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a key of this format, or its tag does not verify (tampered, or another gateway's
    /// key), or signed with a key this gateway no longer has.
    Invalid,
    Expired,
}

impl Keyring {
    /// Mints a key for `claims` (its `kid` and `gw` are set here).
    pub fn mint(&self, mut claims: Claims) -> Option<String> {
        let key = self.keys.first()?;
        claims.v = 1;
        claims.kid = key.kid.clone();
        claims.gw = self.gateway.clone();
        let json = serde_json::to_vec(&claims).ok()?;
        let tag = key.tag(&json);
        Some(format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(tag)
        ))
    }

    /// The claims of a valid, unexpired key of this gateway at `now_s` (Unix seconds).
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, Refused> {
        if token.len() > MAX_KEY_LEN {
            return Err(Refused::Invalid);
        }
        let body = token.strip_prefix(PREFIX).ok_or(Refused::Invalid)?;
        let (claims_b64, tag_b64) = body.split_once('.').ok_or(Refused::Invalid)?;
        let json = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|_| Refused::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| Refused::Invalid)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| Refused::Invalid)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == claims.kid)
            .ok_or(Refused::Invalid)?;
        if !constant_time_eq(&key.tag(&json), &tag) {
            return Err(Refused::Invalid);
        }
        if claims.v != 1 || claims.gw != self.gateway {
            return Err(Refused::Invalid);
        }
        if now_s >= claims.exp {
            return Err(Refused::Expired);
        }
        Ok(claims)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "first-signing-key-0123456789abcdef-0123456789";
    const K2: &str = "second-signing-key-0123456789abcdef-012345678";

    fn ring(gateway: &str, keys: &[&str]) -> Keyring {
        Keyring {
            gateway: gateway.into(),
            keys: keys.iter().map(|k| SigningKey::new(k).unwrap()).collect(),
        }
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            v: 0,
            kid: String::new(),
            gw: String::new(),
            sub: "p_backend".into(),
            mdl: Some("gpt-realtime".into()),
            iat: 1_000,
            exp,
            ses: serde_json::json!({"voice": "alloy"}).as_object().cloned(),
            bud: None,
        }
    }

    #[test]
    fn a_minted_key_verifies_until_it_expires() {
        let r = ring("gw-a", &[K1]);
        let key = r.mint(claims(1_600)).unwrap();
        assert!(key.starts_with("ek_"), "{key}");
        let c = r.verify(&key, 1_599).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.mdl.as_deref(), c.gw.as_str()),
            ("p_backend", Some("gpt-realtime"), "gw-a")
        );
        assert_eq!(c.ses.unwrap()["voice"], "alloy");
        assert_eq!(r.verify(&key, 1_600), Err(Refused::Expired));
    }

    #[test]
    fn tampered_foreign_and_malformed_keys_are_refused() {
        let r = ring("gw-a", &[K1]);
        let key = r.mint(claims(9_999)).unwrap();
        // Another model in the claims, same tag.
        let (body, tag) = key.strip_prefix("ek_").unwrap().split_once('.').unwrap();
        let mut json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
        json["mdl"] = "gpt-other".into();
        let forged = format!("ek_{}.{tag}", URL_SAFE_NO_PAD.encode(json.to_string()));
        assert_eq!(r.verify(&forged, 0), Err(Refused::Invalid));
        // Another gateway's key (same kid space, other key), and another gateway name.
        assert_eq!(ring("gw-a", &[K2]).verify(&key, 0), Err(Refused::Invalid));
        assert_eq!(ring("gw-b", &[K1]).verify(&key, 0), Err(Refused::Invalid));
        for bad in [
            "",
            "ek_",
            "ek_.",
            "sk-abc",
            "ek_!!!.???",
            &format!("{key}x"),
            &"ek_a".repeat(3000),
        ] {
            assert_eq!(r.verify(bad, 0), Err(Refused::Invalid), "{bad:.40}");
        }
    }

    #[test]
    fn two_keys_rotate_the_first_signs_both_verify() {
        let old = ring("gw-a", &[K1]).mint(claims(9_999)).unwrap();
        let rotated = ring("gw-a", &[K2, K1]);
        assert!(
            rotated.verify(&old, 0).is_ok(),
            "keys signed before the rotation"
        );
        let new = rotated.mint(claims(9_999)).unwrap();
        assert!(ring("gw-a", &[K2]).verify(&new, 0).is_ok());
        assert_eq!(ring("gw-a", &[K1]).verify(&new, 0), Err(Refused::Invalid));
    }

    #[test]
    fn signing_keys_must_be_long_and_never_show() {
        assert!(SigningKey::new("short").is_err());
        let k = SigningKey::new(K1).unwrap();
        assert!(!format!("{k:?}").contains("first-signing"));
        assert_eq!(k.kid().len(), 12);
    }
}
