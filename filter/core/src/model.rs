//! Which model a call is for: `session.model` (trimmed), else `?model=`, else the default.

use crate::config::Config;
use crate::error::FilterError;

pub const MAX_MODEL_LEN: usize = 128;

/// The model as requested and its index in `Config::models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub requested: String,
    pub index: usize,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn form_decode(s: &str) -> Result<String, FilterError> {
    let bad = FilterError::InvalidModel("bad percent-encoding in query");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let h = b.get(i + 1).copied().and_then(hex).ok_or(bad.clone())?;
                let l = b.get(i + 2).copied().and_then(hex).ok_or(bad.clone())?;
                out.push(h * 16 + l);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| FilterError::InvalidModel("not UTF-8"))
}

/// The `model` query parameter; more than one is refused (parameter pollution).
pub fn query_model(query: Option<&str>) -> Result<Option<String>, FilterError> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if form_decode(k).ok().as_deref() == Some("model") {
            if found.is_some() {
                return Err(FilterError::InvalidModel(
                    "model query parameter given twice",
                ));
            }
            found = Some(form_decode(v)?);
        }
    }
    Ok(found)
}

/// `session.model`, when the session has one. `session` must already be a JSON object.
pub fn session_model(
    session: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<String>, FilterError> {
    match session.get("model") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FilterError::InvalidSessionJson("model must be a string")),
    }
}

/// Resolves the model: the first non-blank of session, query, default; validated and looked up.
pub fn resolve(
    config: &Config,
    from_session: Option<&str>,
    from_query: Option<&str>,
) -> Result<ResolvedModel, FilterError> {
    let pick = [from_session, from_query, config.default_model.as_deref()]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|m| !m.is_empty())
        .ok_or(FilterError::MissingModel)?;
    if pick.chars().any(char::is_control) {
        return Err(FilterError::InvalidModel("control characters"));
    }
    if pick.len() > MAX_MODEL_LEN {
        return Err(FilterError::InvalidModel("longer than 128 bytes"));
    }
    let index = *config
        .model_index
        .get(pick)
        .ok_or_else(|| FilterError::ModelNotFound(pick.to_string()))?;
    Ok(ResolvedModel {
        requested: pick.to_string(),
        index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::sample;

    #[test]
    fn precedence_and_aliases() {
        let c = sample();
        let r = resolve(&c, Some("  echo "), Some("gpt-realtime")).unwrap();
        assert_eq!((r.requested.as_str(), r.index), ("echo", 1));
        let r = resolve(&c, Some(" "), Some("gpt-4o-realtime-preview")).unwrap();
        assert_eq!(r.index, 0);
        let r = resolve(&c, None, None).unwrap();
        assert_eq!(r.requested, "gpt-realtime");
        assert_eq!(
            query_model(Some("a=1&model=gpt%2Drealtime")).unwrap(),
            Some("gpt-realtime".into())
        );
        assert!(query_model(Some("model=a&model=b")).is_err());
    }
}
