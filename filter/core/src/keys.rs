//! Which `Authorization` goes upstream: the client's, the worker's key, or the worker's key
//! only when the client sent none. Keys never appear in `Debug` output or logs.

use std::fmt;

use serde::Deserialize;

use crate::error::FilterError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPolicy {
    /// The client's `Authorization` goes upstream; no worker key is used.
    Passthrough,
    /// The worker key always goes upstream; the client's header is dropped.
    Replace,
    /// The worker key goes upstream only when the client sent no `Authorization`.
    #[default]
    InjectIfMissing,
}

/// An API key. `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Builds a key from an environment value: trimmed, a leading `Bearer ` removed, and only
    /// visible ASCII allowed (a header value cannot carry anything else safely).
    pub fn from_env_value(value: &str) -> Result<Secret, &'static str> {
        let v = value.trim();
        let v = v.strip_prefix("Bearer ").unwrap_or(v).trim();
        if v.is_empty() {
            return Err("is empty");
        }
        if !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("contains characters other than visible ASCII");
        }
        Ok(Secret(v.to_string()))
    }

    /// The `Authorization` header value for this key.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the chosen authorization came from (for metrics; never the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Client,
    Worker,
}

/// Picks the upstream `Authorization` value. `client` is the client's header, if any.
pub fn upstream_authorization(
    policy: KeyPolicy,
    client: Option<&str>,
    worker_key: Option<&Secret>,
) -> Result<(String, KeySource), FilterError> {
    let client = client.map(str::trim).filter(|v| !v.is_empty()).filter(|v| {
        v.bytes()
            .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
    });
    match policy {
        KeyPolicy::Passthrough => client
            .map(|c| (c.to_string(), KeySource::Client))
            .ok_or(FilterError::MissingApiKey),
        KeyPolicy::Replace => worker_key
            .map(|k| (k.bearer(), KeySource::Worker))
            .ok_or(FilterError::MissingApiKey),
        KeyPolicy::InjectIfMissing => match (client, worker_key) {
            (Some(c), _) => Ok((c.to_string(), KeySource::Client)),
            (None, Some(k)) => Ok((k.bearer(), KeySource::Worker)),
            (None, None) => Err(FilterError::MissingApiKey),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_policies() {
        let k = Secret::from_env_value("  sk-worker \n").unwrap();
        let r = upstream_authorization(KeyPolicy::Replace, Some("Bearer sk-client"), Some(&k));
        assert_eq!(r.unwrap(), ("Bearer sk-worker".into(), KeySource::Worker));
        let r = upstream_authorization(KeyPolicy::InjectIfMissing, Some("Bearer c"), Some(&k));
        assert_eq!(r.unwrap(), ("Bearer c".into(), KeySource::Client));
        let r = upstream_authorization(KeyPolicy::InjectIfMissing, None, Some(&k));
        assert_eq!(r.unwrap(), ("Bearer sk-worker".into(), KeySource::Worker));
        let r = upstream_authorization(KeyPolicy::InjectIfMissing, Some("  "), None);
        assert_eq!(r.unwrap_err(), FilterError::MissingApiKey);
        let r = upstream_authorization(KeyPolicy::Passthrough, None, Some(&k));
        assert_eq!(r.unwrap_err(), FilterError::MissingApiKey);
        let r = upstream_authorization(KeyPolicy::Passthrough, Some("Bearer c"), Some(&k));
        assert_eq!(r.unwrap(), ("Bearer c".into(), KeySource::Client));
    }

    #[test]
    fn secrets_are_redacted_and_sanitized() {
        let k = Secret::from_env_value("Bearer sk-123").unwrap();
        assert_eq!(k.bearer(), "Bearer sk-123");
        assert!(!format!("{k:?} {k}").contains("sk-123"));
        assert!(Secret::from_env_value("").is_err());
        assert!(Secret::from_env_value("sk-1\r\nx: y").is_err());
    }
}
