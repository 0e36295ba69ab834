//! Who is calling, resolved from the request before any routing, and what that caller may do:
//! which pools lend it their worker key, whether its routing header counts, and the principal
//! its calls are owned by.
//!
//! Order, first match wins:
//! 1. `Authorization: Bearer ek_…` in this gateway's format: an ephemeral key it minted
//!    ([`crate::ephemeral`]); tampered, expired or another gateway's: 401 `invalid_api_key`.
//! 2. A bearer token whose SHA-256 is an operator API key (`callers.api_keys`).
//! 3. A principal Envoy's `jwt_authn` verified (its dynamic metadata; a client cannot write
//!    it, unlike a header).
//! 4. Any other `Authorization`: the caller's own provider key. It is forwarded as is where the
//!    pool passes client keys through, and never earns a worker key.
//! 5. Nothing: anonymous.

use sha2::{Digest, Sha256};

use crate::callers::Admit;
use crate::config::{Config, Pool};
use crate::ephemeral::{self, Claims, Refused};
use crate::error::FilterError;
use crate::keys::{KeyPolicy, KeySource, Secret};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    /// `callers.api_keys[index]`.
    ApiKey {
        index: usize,
    },
    /// The principal claim `jwt_authn` verified.
    Jwt {
        subject: String,
    },
    /// A key this gateway minted.
    Ephemeral(Box<Claims>),
    /// The caller's own provider key; `principal` is a hash of it.
    ProviderKey {
        principal: String,
    },
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let v = authorization?.trim();
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `p_` and 32 hex digits of SHA-256 over `kind`, a zero byte and `id`: stable, not
/// reversible to a key or a subject, and safe to log and send to the relay.
pub fn principal_of(kind: &str, id: &str) -> String {
    let digest = Sha256::digest([kind.as_bytes(), b"\0", id.as_bytes()].concat());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("p_{hex}")
}

/// Resolves the caller. `jwt_subject` is what the host read at the configured metadata path;
/// `now_s` is Unix seconds (ephemeral keys expire).
pub fn resolve(
    config: &Config,
    authorization: Option<&str>,
    jwt_subject: Option<&str>,
    now_s: u64,
) -> Result<Caller, FilterError> {
    let token = bearer(authorization);
    if let (Some(t), Some(ring)) = (token, config.callers.ephemeral.as_ref()) {
        if looks_like_ours(t) {
            return match ring.verify(t, now_s) {
                Ok(claims) => Ok(Caller::Ephemeral(Box::new(claims))),
                Err(Refused::Expired) => Err(FilterError::InvalidApiKey("the key has expired")),
                Err(Refused::Invalid) => Err(FilterError::InvalidApiKey(
                    "the key is not one this gateway issued",
                )),
            };
        }
    }
    if let Some(index) = token.and_then(|t| config.callers.api_key(t)) {
        return Ok(Caller::ApiKey { index });
    }
    if config.callers.jwt.is_some() {
        if let Some(subject) = jwt_subject.map(str::trim).filter(|s| !s.is_empty()) {
            return Ok(Caller::Jwt {
                subject: subject.to_string(),
            });
        }
    }
    match authorization.map(str::trim).filter(|a| !a.is_empty()) {
        Some(a) => Ok(Caller::ProviderKey {
            principal: principal_of("provider_key", a),
        }),
        None => Ok(Caller::Anonymous),
    }
}

/// A token in this gateway's ephemeral format (another issuer's `ek_` keys, such as OpenAI's,
/// have no `.`): only those are judged here.
fn looks_like_ours(token: &str) -> bool {
    token.starts_with(ephemeral::PREFIX) && token.contains('.')
}

impl Caller {
    /// Who owns the calls this caller creates.
    pub fn principal(&self, config: &Config) -> String {
        match self {
            // Nobody's: its calls have no owner, and only an anonymous hangup (where the
            // configuration admits anonymous callers) or an operator ends them.
            Caller::Anonymous => String::new(),
            Caller::ApiKey { index } => config
                .callers
                .api_keys
                .get(*index)
                .map(|k| principal_of("api_key", &k.name))
                .unwrap_or_default(),
            Caller::Jwt { subject } => principal_of("jwt", subject),
            Caller::Ephemeral(claims) => claims.sub.clone(),
            Caller::ProviderKey { principal } => principal.clone(),
        }
    }

    /// May act on any call (hang up, look up).
    pub fn is_operator(&self, config: &Config) -> bool {
        matches!(self, Caller::ApiKey { index } if config.callers.api_keys.get(*index).is_some_and(|k| k.operator))
    }

    /// Its routing header is honoured.
    pub fn is_trusted(&self, config: &Config) -> bool {
        match self {
            Caller::ApiKey { index } => config
                .callers
                .api_keys
                .get(*index)
                .is_some_and(|k| k.trusted),
            Caller::Jwt { .. } => config.callers.jwt.as_ref().is_some_and(|j| j.trusted),
            _ => false,
        }
    }

    /// An operator key's own limits, which override its pool's.
    /// The caller's own per-call budget: an operator API key's, or the one an ephemeral key
    /// carries from the key that minted it.
    pub fn own_budget(&self, config: &Config) -> Option<crate::budget::Budget> {
        match self {
            Caller::ApiKey { index } => config.callers.api_keys.get(*index).and_then(|k| k.budget),
            Caller::Ephemeral(claims) => claims.bud,
            _ => None,
        }
    }

    pub fn own_limits(&self, config: &Config) -> Option<crate::limits::Limits> {
        match self {
            Caller::ApiKey { index } => config.callers.api_keys.get(*index).and_then(|k| k.limits),
            _ => None,
        }
    }

    /// The caller kind, for metrics (bounded).
    pub fn kind(&self) -> &'static str {
        match self {
            Caller::Anonymous => "anonymous",
            Caller::ApiKey { .. } => "api_key",
            Caller::Jwt { .. } => "jwt",
            Caller::Ephemeral(_) => "ephemeral",
            Caller::ProviderKey { .. } => "provider_key",
        }
    }

    fn admitted_by(&self, config: &Config, admit: &Admit) -> bool {
        match (self, admit) {
            (Caller::Anonymous, Admit::Anonymous) => true,
            (Caller::ApiKey { .. }, Admit::AnyApiKey) => true,
            (Caller::ApiKey { index }, Admit::ApiKey(name)) => config
                .callers
                .api_keys
                .get(*index)
                .is_some_and(|k| &k.name == name),
            (Caller::Jwt { .. }, Admit::Jwt) => true,
            (Caller::Ephemeral(_), Admit::Ephemeral) => true,
            _ => false,
        }
    }

    /// Whether `pool` serves this caller: a provider key goes upstream where the pool passes
    /// client keys through (a `replace` pool takes it only if it admits anonymous callers,
    /// whose worker key then replaces it); every other caller gets the worker key, from pools
    /// whose `callers` admit it.
    pub fn admitted(&self, config: &Config, pool: &Pool) -> bool {
        match (self, pool.key_policy) {
            (Caller::ProviderKey { .. }, KeyPolicy::Passthrough | KeyPolicy::InjectIfMissing) => {
                true
            }
            (Caller::ProviderKey { .. }, KeyPolicy::Replace) => {
                pool.callers.contains(&Admit::Anonymous)
            }
            (_, KeyPolicy::Passthrough) => false,
            (caller, _) => pool.callers.iter().any(|a| caller.admitted_by(config, a)),
        }
    }

    /// Why no pool of the model serves this caller.
    pub fn refusal(&self) -> FilterError {
        match self {
            Caller::Anonymous => FilterError::MissingApiKey,
            Caller::ProviderKey { .. } => {
                FilterError::InvalidApiKey("the key is not one this gateway accepts")
            }
            _ => FilterError::CallerNotAllowed,
        }
    }

    /// The `Authorization` that goes upstream from `pool`'s `worker_key`: the caller's own
    /// header for a provider key where the pool passes it, the worker's key otherwise.
    pub fn upstream_authorization(
        &self,
        pool: &Pool,
        client_authorization: Option<&str>,
        worker_key: Option<&Secret>,
    ) -> Result<(String, KeySource), FilterError> {
        let own_key =
            matches!(self, Caller::ProviderKey { .. }) && pool.key_policy != KeyPolicy::Replace;
        if own_key {
            let a = client_authorization
                .map(str::trim)
                .filter(|a| {
                    !a.is_empty()
                        && a.bytes()
                            .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
                })
                .ok_or(FilterError::MissingApiKey)?;
            return Ok((a.to_string(), KeySource::Client));
        }
        worker_key
            .map(|k| (k.bearer(), KeySource::Worker))
            .ok_or(FilterError::MissingApiKey)
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub use super::tests::config;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::callers::key_hash_hex;
    use crate::ephemeral::Claims;

    pub const EK_SECRET: &str = "ephemeral-signing-key-for-tests-0123456789";

    /// The sample configuration with callers: an operator key (trusted), a plain key, a JWT
    /// principal, ephemeral keys; pool main admits api keys, jwt and ephemeral (the default),
    /// canary only the key named backend, local is passthrough.
    pub fn config() -> Config {
        let mut v: serde_json::Value = serde_json::from_str(crate::config::tests::SAMPLE).unwrap();
        v["callers"] = serde_json::json!({
            "api_keys": [
                {"name": "backend", "sha256": key_hash_hex("sk-gw-backend"), "operator": true, "trusted": true},
                {"name": "app", "sha256": key_hash_hex("sk-gw-app")}
            ],
            "jwt": {"payload_key": "jwt_payload"},
            "ephemeral_keys": {"gateway": "gw-test", "key_envs": ["EK_SECRET"]}
        });
        v["pools"][0].as_object_mut().unwrap().remove("callers");
        v["pools"][1]["callers"] = serde_json::json!(["api_key:backend"]);
        let env = |name: &str| match name {
            "EK_SECRET" => Some(EK_SECRET.to_string()),
            other => crate::config::tests::env(other),
        };
        Config::from_json(v.to_string().as_bytes(), &env).unwrap()
    }

    fn ek(config: &Config, model: Option<&str>, exp: u64) -> String {
        config
            .callers
            .ephemeral
            .as_ref()
            .unwrap()
            .mint(Claims {
                v: 1,
                kid: String::new(),
                gw: String::new(),
                sub: principal_of("api_key", "backend"),
                mdl: model.map(str::to_string),
                iat: 0,
                exp,
                ses: None,
                bud: None,
            })
            .unwrap()
    }

    #[test]
    fn callers_resolve_in_order_and_own_their_calls_by_a_hash() {
        let c = config();
        let key = |k: &str| format!("Bearer {k}");
        let valid_ek = ek(&c, None, 2_000);
        let rows: Vec<(Option<String>, Option<&str>, &str)> = vec![
            (None, None, "anonymous"),
            (Some(key("sk-gw-backend")), None, "api_key"),
            (Some(key("sk-gw-app")), Some("alice"), "api_key"),
            (None, Some("alice"), "jwt"),
            (Some(key("sk-provider-own")), None, "provider_key"),
            (Some(key(&valid_ek)), Some("alice"), "ephemeral"),
            // OpenAI's own client secrets have no '.': a provider key here.
            (Some(key("ek_68af0123abcdef")), None, "provider_key"),
        ];
        for (auth, jwt, kind) in rows {
            let caller = resolve(&c, auth.as_deref(), jwt, 1_000).unwrap();
            assert_eq!(caller.kind(), kind, "{auth:?} {jwt:?}");
            let p = caller.principal(&c);
            if let Some(a) = &auth {
                assert!(!p.contains(a.trim_start_matches("Bearer ")), "{p}");
            }
        }
        let backend = resolve(&c, Some(&key("sk-gw-backend")), None, 0).unwrap();
        assert!(backend.is_operator(&c) && backend.is_trusted(&c));
        let app = resolve(&c, Some(&key("sk-gw-app")), None, 0).unwrap();
        assert!(!app.is_operator(&c) && !app.is_trusted(&c));
        // A minted key's calls belong to whoever minted it.
        let minted = resolve(&c, Some(&key(&valid_ek)), None, 1_000).unwrap();
        assert_eq!(minted.principal(&c), backend.principal(&c));
        assert_ne!(app.principal(&c), backend.principal(&c));
    }

    #[test]
    fn bad_gateway_keys_are_401_invalid_api_key_without_the_key() {
        let c = config();
        let good = ek(&c, None, 2_000);
        let expired = ek(&c, None, 500);
        let tampered = good.replacen('.', ".A", 1);
        for token in [expired.as_str(), tampered.as_str(), "ek_abc.def"] {
            let e = resolve(&c, Some(&format!("Bearer {token}")), None, 1_000).unwrap_err();
            assert_eq!(
                (e.status(), e.code()),
                (401, "invalid_api_key"),
                "{token:.20}"
            );
            let body = String::from_utf8(e.to_json()).unwrap();
            assert!(!body.contains(token), "{body}");
        }
    }

    #[test]
    fn pools_lend_their_worker_key_only_to_callers_they_admit() {
        let c = config();
        let main = &c.pools[0];
        let canary = &c.pools[1];
        let local = &c.pools[2];
        let who = |auth: Option<&str>, jwt: Option<&str>| resolve(&c, auth, jwt, 0).unwrap();
        let anonymous = who(None, None);
        let backend = who(Some("Bearer sk-gw-backend"), None);
        let app = who(Some("Bearer sk-gw-app"), None);
        let jwt = who(None, Some("alice"));
        let own = who(Some("Bearer sk-provider-own"), None);
        // (caller, main: inject_if_missing default callers, canary: replace + backend only,
        // local: passthrough)
        let rows = [
            (&anonymous, false, false, false),
            (&backend, true, true, false),
            (&app, true, false, false),
            (&jwt, true, false, false),
            (&own, true, false, true),
        ];
        for (caller, m, ca, l) in rows {
            assert_eq!(
                (
                    caller.admitted(&c, main),
                    caller.admitted(&c, canary),
                    caller.admitted(&c, local)
                ),
                (m, ca, l),
                "{}",
                caller.kind()
            );
        }
        assert_eq!(anonymous.refusal().code(), "missing_api_key");
        assert_eq!(own.refusal().code(), "invalid_api_key");
        assert_eq!(app.refusal().code(), "caller_not_allowed");
        // A gateway credential is never forwarded: the worker key goes upstream.
        let worker = main.workers[0].key.as_ref();
        let (auth, source) = backend
            .upstream_authorization(main, Some("Bearer sk-gw-backend"), worker)
            .unwrap();
        assert_eq!(source, KeySource::Worker);
        assert!(!auth.contains("sk-gw-backend"));
        // A provider key is the caller's own, forwarded as is.
        let (auth, source) = own
            .upstream_authorization(main, Some("Bearer sk-provider-own"), worker)
            .unwrap();
        assert_eq!(
            (auth.as_str(), source),
            ("Bearer sk-provider-own", KeySource::Client)
        );
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_nothing_else_is_one() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
    }
}
