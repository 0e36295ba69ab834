//! `POST /v1/realtime/client_secrets`: the gateway mints an ephemeral key (`ek_…`, the signed
//! format of [`crate::ephemeral`]) in the shape of OpenAI's client secrets, for a backend to
//! hand to a browser page; and what such a key means when a call is opened with it.
//!
//! Request (OpenAI's `client.realtime.client_secrets.create`): `{"expires_after": {"anchor":
//! "created_at", "seconds": 10..=7200}, "session": {"type": "realtime", "model": …, …}}`, every
//! part optional (600 s by default). Answer `200`: `{"value": "ek_…", "expires_at": <unix s>,
//! "session": {"type": "realtime", "object": "realtime.session", "id": "sess_…", …}}`.
//!
//! Who may mint: an operator API key (`callers.api_keys`, any) or a JWT principal. An
//! anonymous caller, a provider key and an ephemeral key may not (a page must never turn the
//! key it holds into more keys).
//!
//! What a key does at `POST /v1/realtime/calls`:
//! - its model (`session.model` at mint) is the only one it opens: a call asking for another
//!   model is refused (`403 model_not_allowed`); a call naming none gets the key's model, ahead
//!   of `default_model`. Two names are the same model when they resolve to the same entry and
//!   the same upstream name (an alias of the key's model is that model).
//! - its session settings are merged into the call's session, field by top-level field, and
//!   the key's win: a page cannot replace the instructions, tools or voice its backend set
//!   (it can still send `session.update` on the data channel once the call is up; the gateway
//!   does not filter those).

use serde_json::{Map, Value};

use crate::config::Config;
use crate::ephemeral::{Claims, DEFAULT_TTL_S, MAX_SESSION_BYTES, MAX_TTL_S, MIN_TTL_S};
use crate::error::FilterError;
use crate::identity::Caller;
use crate::model::{self, ResolvedModel};

/// A client-secret request the gateway refuses: OpenAI's codes, naming the parameter at
/// fault. Never carries a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unsupported Content-Type; expected application/json")]
    ContentType,
    #[error("the request body is not a JSON object")]
    InvalidJson,
    #[error("unknown parameter: '{0}'")]
    UnknownParameter(String),
    #[error("invalid type for '{param}': expected {expected}")]
    InvalidType {
        param: &'static str,
        expected: &'static str,
    },
    #[error("invalid value for 'expires_after.anchor': only 'created_at' is supported")]
    InvalidAnchor,
    #[error("'expires_after.seconds' must be at least {MIN_TTL_S}")]
    SecondsBelowMin,
    #[error("'expires_after.seconds' must be at most {MAX_TTL_S}")]
    SecondsAboveMax,
    #[error("missing required parameter: 'session.type'")]
    MissingSessionType,
    #[error(
        "invalid value for 'session.type': this gateway serves realtime sessions ('realtime') only"
    )]
    SessionType,
    #[error("the session is larger than {MAX_SESSION_BYTES} bytes (a client secret carries it)")]
    SessionTooLarge,
    #[error("invalid model name: {0}")]
    InvalidModel(&'static str),
    #[error("the model '{0}' does not exist or is not served by this gateway")]
    ModelNotFound(String),
}

impl RequestError {
    pub fn status(&self) -> u16 {
        match self {
            RequestError::ContentType => 415,
            RequestError::ModelNotFound(_) => 404,
            _ => 400,
        }
    }

    pub fn code(&self) -> &'static str {
        use RequestError::*;
        match self {
            ContentType => "invalid_content_type",
            InvalidJson => "invalid_json",
            UnknownParameter(_) => "unknown_parameter",
            InvalidType { .. } => "invalid_type",
            InvalidAnchor | SessionType => "invalid_value",
            SecondsBelowMin => "integer_below_min_value",
            SecondsAboveMax => "integer_above_max_value",
            MissingSessionType => "missing_required_parameter",
            SessionTooLarge => "session_too_large",
            InvalidModel(_) => "invalid_model",
            ModelNotFound(_) => "model_not_found",
        }
    }

    pub fn param(&self) -> Option<&str> {
        use RequestError::*;
        match self {
            ContentType | InvalidJson => None,
            UnknownParameter(p) => Some(p),
            InvalidType { param, .. } => Some(param),
            InvalidAnchor => Some("expires_after.anchor"),
            SecondsBelowMin | SecondsAboveMax => Some("expires_after.seconds"),
            MissingSessionType | SessionType => Some("session.type"),
            SessionTooLarge => Some("session"),
            InvalidModel(_) | ModelNotFound(_) => Some("session.model"),
        }
    }
}

impl From<RequestError> for FilterError {
    fn from(e: RequestError) -> FilterError {
        FilterError::ClientSecret(e)
    }
}

/// Whether `caller` may mint: API keys and JWT principals only.
pub fn may_mint(caller: &Caller) -> Result<(), FilterError> {
    match caller {
        Caller::ApiKey { .. } | Caller::Jwt { .. } => Ok(()),
        Caller::Anonymous => Err(FilterError::MintNeedsCredential),
        Caller::ProviderKey { .. } => Err(FilterError::InvalidApiKey(
            "the key is not one this gateway accepts for minting client secrets",
        )),
        Caller::Ephemeral(_) => Err(FilterError::MintNotAllowed(
            "a client secret cannot mint client secrets: ask the backend that minted it",
        )),
    }
}

/// The request's `Content-Type`: none (an empty body) or `application/json`.
pub fn check_content_type(content_type: Option<&str>) -> Result<(), FilterError> {
    let Some(ct) = content_type else {
        return Ok(());
    };
    let media = ct.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(RequestError::ContentType.into())
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintRequest {
    /// Lifetime of the key, seconds.
    pub ttl_s: u64,
    /// `session.model` as asked (trimmed), when given; it resolved to a served model.
    pub model: Option<String>,
    /// The session object as given, without `model` (the key carries that apart).
    pub session: Option<Map<String, Value>>,
}

/// Validates the body of a client-secret request (empty: every default).
pub fn parse(config: &Config, body: &[u8]) -> Result<MintRequest, FilterError> {
    let top = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            _ => return Err(RequestError::InvalidJson.into()),
        }
    };
    if let Some(k) = top
        .keys()
        .find(|k| !matches!(k.as_str(), "expires_after" | "session"))
    {
        return Err(RequestError::UnknownParameter(k.clone()).into());
    }
    let ttl_s = match top.get("expires_after") {
        None | Some(Value::Null) => DEFAULT_TTL_S,
        Some(Value::Object(e)) => expires_after(e)?,
        Some(_) => {
            return Err(RequestError::InvalidType {
                param: "expires_after",
                expected: "an object",
            }
            .into())
        }
    };
    let (model, session) = match top.get("session") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Object(s)) => session(config, s)?,
        Some(_) => {
            return Err(RequestError::InvalidType {
                param: "session",
                expected: "an object",
            }
            .into())
        }
    };
    Ok(MintRequest {
        ttl_s,
        model,
        session,
    })
}

fn expires_after(e: &Map<String, Value>) -> Result<u64, RequestError> {
    if let Some(k) = e
        .keys()
        .find(|k| !matches!(k.as_str(), "anchor" | "seconds"))
    {
        return Err(RequestError::UnknownParameter(format!("expires_after.{k}")));
    }
    match e.get("anchor") {
        None | Some(Value::Null) => {}
        Some(Value::String(a)) if a == "created_at" => {}
        Some(Value::String(_)) => return Err(RequestError::InvalidAnchor),
        Some(_) => {
            return Err(RequestError::InvalidType {
                param: "expires_after.anchor",
                expected: "a string",
            })
        }
    }
    let not_integer = RequestError::InvalidType {
        param: "expires_after.seconds",
        expected: "an integer",
    };
    match e.get("seconds") {
        None | Some(Value::Null) => Ok(DEFAULT_TTL_S),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(s), _) if s < MIN_TTL_S => Err(RequestError::SecondsBelowMin),
            (Some(s), _) if s > MAX_TTL_S => Err(RequestError::SecondsAboveMax),
            (Some(s), _) => Ok(s),
            (None, Some(_)) => Err(RequestError::SecondsBelowMin),
            (None, None) => Err(not_integer),
        },
        Some(_) => Err(not_integer),
    }
}

type SessionParts = (Option<String>, Option<Map<String, Value>>);

fn session(config: &Config, s: &Map<String, Value>) -> Result<SessionParts, RequestError> {
    match s.get("type") {
        None | Some(Value::Null) => return Err(RequestError::MissingSessionType),
        Some(Value::String(t)) if t == "realtime" => {}
        Some(Value::String(_)) => return Err(RequestError::SessionType),
        Some(_) => {
            return Err(RequestError::InvalidType {
                param: "session.type",
                expected: "a string",
            })
        }
    }
    let model = match s.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => {
            let m = m.trim();
            if m.is_empty() {
                return Err(RequestError::InvalidModel("empty"));
            }
            match model::resolve(config, Some(m), None) {
                Ok(_) => Some(m.to_string()),
                Err(FilterError::InvalidModel(why)) => return Err(RequestError::InvalidModel(why)),
                Err(_) => return Err(RequestError::ModelNotFound(m.to_string())),
            }
        }
        Some(_) => {
            return Err(RequestError::InvalidType {
                param: "session.model",
                expected: "a string",
            })
        }
    };
    let mut carried = s.clone();
    carried.remove("model");
    let size = serde_json::to_vec(&carried).map_or(usize::MAX, |v| v.len());
    if size > MAX_SESSION_BYTES {
        return Err(RequestError::SessionTooLarge);
    }
    Ok((model, Some(carried)))
}

/// A minted key and the answer that carries it (the only place the key ever goes).
pub struct Minted {
    pub expires_at: u64,
    /// The JSON answer (holds the key: never log it).
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Minted {{ expires_at: {} }}", self.expires_at)
    }
}

/// Mints the key `req` asks for, owned by `caller`'s principal, at `now_s` (Unix seconds);
/// `session_id` names the session in the answer (`sess_…`).
pub fn mint(
    config: &Config,
    caller: &Caller,
    req: &MintRequest,
    now_s: u64,
    session_id: &str,
) -> Result<Minted, FilterError> {
    let ring = config
        .callers
        .ephemeral
        .as_ref()
        .ok_or(FilterError::ClientSecretsNotEnabled)?;
    let expires_at = now_s.saturating_add(req.ttl_s);
    let key = ring
        .mint(Claims {
            v: 1,
            kid: String::new(),
            gw: String::new(),
            sub: caller.principal(config),
            mdl: req.model.clone(),
            iat: now_s,
            exp: expires_at,
            ses: req.session.clone(),
            // The minter's budget goes with the key (the page's calls are the backend's).
            bud: caller.own_budget(config),
        })
        .ok_or(FilterError::Internal)?;
    let mut session = req.session.clone().unwrap_or_default();
    session.insert("type".into(), "realtime".into());
    session.insert("object".into(), "realtime.session".into());
    session.insert("id".into(), session_id.into());
    if let Some(m) = &req.model {
        session.insert("model".into(), m.as_str().into());
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "value": key,
        "expires_at": expires_at,
        "session": session,
    }))
    .map_err(|_| FilterError::Internal)?;
    Ok(Minted { expires_at, body })
}

/// The model a create opens: without a key's pin, as always ([`model::resolve`]); with one,
/// the model asked for (session, else query) when it is the key's model, else the key's.
pub fn resolve_model(
    config: &Config,
    key: Option<&Claims>,
    from_session: Option<&str>,
    from_query: Option<&str>,
) -> Result<ResolvedModel, FilterError> {
    let Some(pinned) = key.and_then(|k| k.mdl.as_deref()) else {
        return model::resolve(config, from_session, from_query);
    };
    let want = model::resolve(config, Some(pinned), None)?;
    let asked = [from_session, from_query]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|m| !m.is_empty());
    let Some(asked) = asked else {
        return Ok(want);
    };
    let got = model::resolve(config, Some(asked), None)?;
    let same = got.index == want.index
        && config
            .models
            .get(got.index)
            .is_some_and(|e| got.upstream_default(e) == want.upstream_default(e));
    if same {
        Ok(got)
    } else {
        Err(FilterError::ModelNotAllowed {
            pinned: pinned.to_string(),
            asked: asked.to_string(),
        })
    }
}

/// The call's session with the key's settings merged in (top-level fields; the key's win).
/// `None` when the key carries no session: the client's stands as sent.
pub fn merge_session(
    client: Option<&Map<String, Value>>,
    key: Option<&Claims>,
) -> Option<Map<String, Value>> {
    let ses = key?.ses.as_ref()?;
    let mut merged = client.cloned().unwrap_or_default();
    for (k, v) in ses {
        merged.insert(k.clone(), v.clone());
    }
    Some(merged)
}

#[cfg(test)]
mod tests;
