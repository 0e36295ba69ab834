//! Who may call, as configured: operator API keys (by hash), the JWT principal Envoy's
//! `jwt_authn` verified, the gateway's ephemeral keys, and which of them each pool lends its
//! worker key to.
//!
//! ```json
//! "callers": {
//!   "api_keys": [{"name": "backend", "sha256": "<hex of sha256(key)>", "operator": true, "trusted": true}],
//!   "jwt": {"payload_key": "jwt_payload", "claim": "sub", "trusted": false},
//!   "ephemeral_keys": {"gateway": "gw-eu-1", "key_envs": ["EK_KEY", "EK_KEY_PREVIOUS"]}
//! }
//! ```
//!
//! and per pool `"callers": ["api_key", "jwt", "ephemeral"]` (the default), or names such as
//! `"api_key:backend"` and `"anonymous"`. No key is ever in the configuration: API keys by
//! their SHA-256 (or, for a key the deployment generates, `"key_env"`: the name of a VM
//! environment variable holding it, hashed at load), signing keys by the name of a VM
//! environment variable.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::budget::Budget;
use crate::ephemeral::{Keyring, SigningKey};
use crate::limits::Limits;

/// Most operator API keys.
pub const MAX_API_KEYS: usize = 256;
/// Fewest bytes of an API key read from the VM environment (`key_env`).
pub const MIN_ENV_KEY_LEN: usize = 16;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCallers {
    #[serde(default)]
    pub api_keys: Vec<RawApiKey>,
    #[serde(default)]
    pub jwt: Option<RawJwt>,
    #[serde(default)]
    pub ephemeral_keys: Option<RawEphemeral>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub name: String,
    /// Lowercase hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Instead of `sha256`: the VM environment variable holding the key itself (hashed at
    /// load; for a key the deployment generates, as the local stack does).
    #[serde(default)]
    pub key_env: Option<String>,
    /// May hang up and look at any call.
    #[serde(default)]
    pub operator: bool,
    /// Its routing header is honoured.
    #[serde(default)]
    pub trusted: bool,
    /// Its own per-caller limits, overriding the pool's field by field (a backend that
    /// proxies many users under one key needs more).
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Its own per-call usage budget, overriding the pool's field by field; the ephemeral
    /// keys it mints carry it (`crate::budget`).
    #[serde(default)]
    pub budget: Option<Budget>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// The dynamic-metadata namespace of Envoy's JWT filter.
    #[serde(default = "default_jwt_namespace")]
    pub metadata_namespace: String,
    /// The provider's `payload_in_metadata` key.
    pub payload_key: String,
    /// The claim naming the principal.
    #[serde(default = "default_jwt_claim")]
    pub claim: String,
    #[serde(default)]
    pub trusted: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEphemeral {
    /// This gateway's name in its keys: another gateway's keys are refused.
    pub gateway: String,
    /// VM environment variables holding the signing keys: the first signs, all verify.
    pub key_envs: Vec<String>,
}

fn default_jwt_namespace() -> String {
    "envoy.filters.http.jwt_authn".to_string()
}
fn default_jwt_claim() -> String {
    "sub".to_string()
}

/// An operator API key, by hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
    pub operator: bool,
    pub trusted: bool,
    pub limits: Option<Limits>,
    pub budget: Option<Budget>,
}

/// Where the JWT principal is read (dynamic metadata written by `jwt_authn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwt {
    pub metadata_namespace: String,
    pub payload_key: String,
    pub claim: String,
    pub trusted: bool,
}

impl Jwt {
    /// The property path of the principal claim.
    pub fn property_path(&self) -> [&str; 5] {
        [
            "metadata",
            "filter_metadata",
            &self.metadata_namespace,
            &self.payload_key,
            &self.claim,
        ]
    }
}

/// The validated `callers` section.
#[derive(Debug, Clone, Default)]
pub struct Callers {
    pub api_keys: Vec<ApiKey>,
    pub jwt: Option<Jwt>,
    pub ephemeral: Option<Keyring>,
}

impl Callers {
    /// The operator key whose hash is `sha256(token)`.
    pub fn api_key(&self, token: &str) -> Option<usize> {
        if self.api_keys.is_empty() {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.api_keys.iter().position(|k| k.sha256 == digest)
    }
}

/// One kind of caller a pool admits to its worker key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Anonymous,
    AnyApiKey,
    ApiKey(String),
    Jwt,
    Ephemeral,
}

/// The default admission: every authenticated caller, never an anonymous one.
pub fn default_admission() -> Vec<Admit> {
    vec![Admit::AnyApiKey, Admit::Jwt, Admit::Ephemeral]
}

pub fn parse_admission(at: &str, raw: &[String], callers: &Callers) -> Result<Vec<Admit>, String> {
    raw.iter()
        .map(|entry| match entry.as_str() {
            "anonymous" => Ok(Admit::Anonymous),
            "api_key" => Ok(Admit::AnyApiKey),
            "jwt" => Ok(Admit::Jwt),
            "ephemeral" => Ok(Admit::Ephemeral),
            other => match other.strip_prefix("api_key:") {
                Some(name) if callers.api_keys.iter().any(|k| k.name == name) => {
                    Ok(Admit::ApiKey(name.to_string()))
                }
                Some(name) => Err(format!(
                    "{at}: callers entry 'api_key:{name}' names no callers.api_keys entry"
                )),
                None => Err(format!(
                    "{at}: callers entry '{other}' must be anonymous, api_key, api_key:<name>, jwt or ephemeral"
                )),
            },
        })
        .collect()
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = s.get(2 * i..2 * i + 2)?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

impl RawCallers {
    pub fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Callers, String> {
        if self.api_keys.len() > MAX_API_KEYS {
            return Err(format!("callers.api_keys: at most {MAX_API_KEYS}"));
        }
        let mut api_keys = Vec::new();
        for (i, k) in self.api_keys.into_iter().enumerate() {
            let at = format!("callers.api_keys[{i}]");
            if !valid_name(&k.name) {
                return Err(format!("{at}.name must be 1-64 of [A-Za-z0-9_.-]"));
            }
            if api_keys.iter().any(|o: &ApiKey| o.name == k.name) {
                return Err(format!("{at}.name '{}' is used twice", k.name));
            }
            let sha256 = match (&k.sha256, &k.key_env) {
                (Some(hex), None) => hex32(&hex.to_ascii_lowercase()).ok_or_else(|| format!(
                    "{at}.sha256 must be the 64 hex digits of the key's SHA-256 (printf %s \"$KEY\" | sha256sum), never the key"
                ))?,
                (None, Some(name)) => {
                    let value = env(name).ok_or_else(|| {
                        format!("{at}.key_env: environment variable '{name}' is not set in the Wasm VM (vm_config.environment_variables)")
                    })?;
                    let key = value.trim();
                    if key.len() < MIN_ENV_KEY_LEN || key.chars().any(char::is_whitespace) {
                        return Err(format!(
                            "{at}.key_env: environment variable '{name}' must hold a key of at least {MIN_ENV_KEY_LEN} bytes without whitespace"
                        ));
                    }
                    Sha256::digest(key.as_bytes()).into()
                }
                _ => {
                    return Err(format!(
                        "{at}: give sha256 (the key's SHA-256) or key_env (a VM environment variable holding the key), one of them"
                    ))
                }
            };
            if api_keys.iter().any(|o: &ApiKey| o.sha256 == sha256) {
                return Err(format!("{at}: the same key is listed twice"));
            }
            if let Some(l) = &k.limits {
                l.validate(&at)?;
            }
            if let Some(b) = &k.budget {
                b.validate(&at)?;
            }
            api_keys.push(ApiKey {
                name: k.name,
                sha256,
                operator: k.operator,
                trusted: k.trusted,
                limits: k.limits,
                budget: k.budget,
            });
        }
        let jwt = match self.jwt {
            None => None,
            Some(j) => {
                for (field, v) in [
                    ("metadata_namespace", &j.metadata_namespace),
                    ("payload_key", &j.payload_key),
                    ("claim", &j.claim),
                ] {
                    if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
                        return Err(format!(
                            "callers.jwt.{field} must be 1-128 printable characters"
                        ));
                    }
                }
                Some(Jwt {
                    metadata_namespace: j.metadata_namespace,
                    payload_key: j.payload_key,
                    claim: j.claim,
                    trusted: j.trusted,
                })
            }
        };
        let ephemeral = match self.ephemeral_keys {
            None => None,
            Some(e) => {
                if !valid_name(&e.gateway) {
                    return Err(
                        "callers.ephemeral_keys.gateway must be 1-64 of [A-Za-z0-9_.-]".into(),
                    );
                }
                if e.key_envs.is_empty() || e.key_envs.len() > 2 {
                    return Err("callers.ephemeral_keys.key_envs: one or two variables (the first signs; a second verifies during a rotation)".into());
                }
                let mut keys = Vec::new();
                for name in &e.key_envs {
                    let value = env(name).ok_or_else(|| {
                        format!("callers.ephemeral_keys: environment variable '{name}' is not set in the Wasm VM (vm_config.environment_variables)")
                    })?;
                    keys.push(SigningKey::new(&value).map_err(|why| {
                        format!("callers.ephemeral_keys: environment variable '{name}' {why}")
                    })?);
                }
                Some(Keyring {
                    gateway: e.gateway,
                    keys,
                })
            }
        };
        Ok(Callers {
            api_keys,
            jwt,
            ephemeral,
        })
    }
}

/// `sha256` of a key as `callers.api_keys[].sha256` wants it.
pub fn key_hash_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<Callers, String> {
        let raw: RawCallers = serde_json::from_value(v).map_err(|e| e.to_string())?;
        raw.validate(&|name| match name {
            "EK" => Some("e".repeat(40)),
            "DEMO_KEY" => Some(" sk-gw-demo-backend-0123 \n".into()),
            "SHORT_KEY" => Some("sk-short".into()),
            _ => None,
        })
    }

    #[test]
    fn keys_are_configured_by_hash_and_found_by_value() {
        let c = parse(serde_json::json!({"api_keys": [
            {"name": "backend", "sha256": key_hash_hex("sk-gw-backend"), "operator": true},
            {"name": "other", "sha256": key_hash_hex("sk-gw-other").to_uppercase()}
        ]}))
        .unwrap();
        assert_eq!(c.api_key("sk-gw-backend"), Some(0));
        assert_eq!(c.api_key("sk-gw-other"), Some(1));
        assert_eq!(c.api_key("sk-gw-nobody"), None);
        assert!(c.api_keys[0].operator && !c.api_keys[1].operator);
        // A key from the VM environment (trimmed), found by value like a hashed one.
        let c = parse(serde_json::json!({"api_keys": [{"name": "demo", "key_env": "DEMO_KEY"}]}))
            .unwrap();
        assert_eq!(c.api_key("sk-gw-demo-backend-0123"), Some(0));
        assert_eq!(c.api_key(" sk-gw-demo-backend-0123 \n"), None);
    }

    #[test]
    fn bad_sections_are_refused_naming_the_field() {
        let rows = [
            (
                serde_json::json!({"api_keys": [{"name": "a", "sha256": "sk-live-key"}]}),
                "sha256",
            ),
            (
                serde_json::json!({"api_keys": [{"name": "", "sha256": key_hash_hex("k")}]}),
                "name",
            ),
            (
                serde_json::json!({"api_keys": [
                {"name": "a", "sha256": key_hash_hex("k")}, {"name": "b", "sha256": key_hash_hex("k")}]}),
                "twice",
            ),
            (
                serde_json::json!({"ephemeral_keys": {"gateway": "g", "key_envs": ["MISSING"]}}),
                "not set",
            ),
            (
                serde_json::json!({"ephemeral_keys": {"gateway": "g", "key_envs": []}}),
                "one or two",
            ),
            (
                serde_json::json!({"jwt": {"payload_key": ""}}),
                "payload_key",
            ),
            (
                serde_json::json!({"api_keys": [], "extra": 1}),
                "unknown field",
            ),
            (
                serde_json::json!({"api_keys": [{"name": "a"}]}),
                "one of them",
            ),
            (
                serde_json::json!({"api_keys": [{"name": "a", "sha256": key_hash_hex("k"), "key_env": "DEMO_KEY"}]}),
                "one of them",
            ),
            (
                serde_json::json!({"api_keys": [{"name": "a", "key_env": "MISSING"}]}),
                "not set",
            ),
            (
                serde_json::json!({"api_keys": [{"name": "a", "key_env": "SHORT_KEY"}]}),
                "at least 16",
            ),
        ];
        for (v, want) in rows {
            let e = parse(v.clone()).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
            assert!(!e.contains("sk-live-key"), "{e}");
        }
        let c = parse(serde_json::json!({"ephemeral_keys": {"gateway": "gw", "key_envs": ["EK"]}}))
            .unwrap();
        assert_eq!(c.ephemeral.unwrap().keys.len(), 1);
    }

    #[test]
    fn admission_entries_are_kinds_or_named_keys() {
        let c = parse(
            serde_json::json!({"api_keys": [{"name": "backend", "sha256": key_hash_hex("k")}]}),
        )
        .unwrap();
        let got = parse_admission(
            "pool 'p'",
            &["anonymous".into(), "api_key:backend".into(), "jwt".into()],
            &c,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                Admit::Anonymous,
                Admit::ApiKey("backend".into()),
                Admit::Jwt
            ]
        );
        assert!(parse_admission("p", &["api_key:nobody".into()], &c).is_err());
        assert!(parse_admission("p", &["everyone".into()], &c).is_err());
    }
}
