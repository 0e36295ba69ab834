//! Which model a call is for: `session.model` (trimmed), else `?model=`, else the default;
//! and which configured entry serves it: the exact name or alias, else the longest prefix
//! entry (`"gpt-realtime*"`), else the catch-all (`"*"`).

use crate::config::{Config, Model};
use crate::error::FilterError;

pub const MAX_MODEL_LEN: usize = 128;

/// How a requested name found its entry in `Config::models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// The entry's name or one of its aliases.
    Exact,
    /// A prefix entry (`"gpt-realtime*"`), the longest that matches.
    Prefix,
    /// The catch-all entry (`"*"`).
    CatchAll,
}

/// The model as requested, its index in `Config::models` and how it matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub requested: String,
    pub index: usize,
    pub matched: Match,
}

impl ResolvedModel {
    /// The model named upstream when the worker sets no `upstream_model`: the entry's name
    /// for an exact name or alias, the name the client asked for through a prefix or the
    /// catch-all (the entry's name is a pattern, not a model).
    pub fn upstream_default<'a>(&'a self, entry: &'a Model) -> &'a str {
        match self.matched {
            Match::Exact => &entry.name,
            Match::Prefix | Match::CatchAll => &self.requested,
        }
    }
}

/// What a `models[].name` in the configuration stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern<'a> {
    /// A model name (no `*`).
    Exact,
    /// `"gpt-realtime*"`: every name starting with the text before the `*`.
    Prefix(&'a str),
    /// `"*"`: every name.
    CatchAll,
}

/// Reads a `models[].name`: one `*` at most, as its last character.
pub fn pattern(name: &str) -> Result<Pattern<'_>, &'static str> {
    let refused = "may hold one '*', as its last character: a prefix such as 'gpt-realtime*', or '*' alone for every model";
    match name.strip_suffix('*') {
        None if name.contains('*') => Err(refused),
        None => Ok(Pattern::Exact),
        Some(prefix) if prefix.contains('*') => Err(refused),
        Some("") => Ok(Pattern::CatchAll),
        Some(prefix) => Ok(Pattern::Prefix(prefix)),
    }
}

/// The entry serving `name`: its exact name or alias, else the longest prefix it starts
/// with, else the catch-all.
pub fn lookup(config: &Config, name: &str) -> Option<(usize, Match)> {
    if let Some(i) = config.model_index.get(name) {
        return Some((*i, Match::Exact));
    }
    // Longest first: the first that matches is the longest.
    if let Some((_, i)) = config
        .model_prefixes
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix.as_str()))
    {
        return Some((*i, Match::Prefix));
    }
    config.model_catch_all.map(|i| (i, Match::CatchAll))
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

/// Resolves the model: the first non-blank of session, query, default; validated (before
/// any pattern sees it, so a prefix or the catch-all only ever passes on a valid name) and
/// looked up ([`lookup`]).
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
    let (index, matched) =
        lookup(config, pick).ok_or_else(|| FilterError::ModelNotFound(pick.to_string()))?;
    Ok(ResolvedModel {
        requested: pick.to_string(),
        index,
        matched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{env, sample};

    /// Exact names, an alias, two nested prefixes, an exact name inside the longer prefix and
    /// a catch-all, each entry on a pool of its own (named after how it should match).
    const ROUTES: &str = r#"{
        "relay_cluster": "relay",
        "models": [
            {"name": "gpt-realtime", "aliases": ["gpt-4o-realtime-preview"], "pools": ["exact"]},
            {"name": "gpt-realtime*", "pools": ["family"]},
            {"name": "gpt-realtime-mini*", "pools": ["mini"]},
            {"name": "gpt-realtime-mini-special", "pools": ["special"]},
            {"name": "*", "pools": ["any"]}
        ],
        "pools": [
            {"name": "exact", "workers": [{"id": "w-exact", "base_url": "https://exact.example.test"}]},
            {"name": "family", "workers": [{"id": "w-family", "base_url": "https://family.example.test"}]},
            {"name": "mini", "workers": [{"id": "w-mini", "base_url": "https://mini.example.test"}]},
            {"name": "special", "workers": [{"id": "w-special", "base_url": "https://special.example.test"}]},
            {"name": "any", "workers": [{"id": "w-any", "base_url": "https://any.example.test"}]}
        ]
    }"#;

    /// [`ROUTES`] with its models in reverse order, or without the catch-all.
    fn routes(reversed: bool, catch_all: bool) -> Config {
        let mut v: serde_json::Value = serde_json::from_str(ROUTES).unwrap();
        let models = v["models"].as_array_mut().unwrap();
        if !catch_all {
            models.retain(|m| m["name"] != "*");
        }
        if reversed {
            models.reverse();
        }
        Config::from_json(v.to_string().as_bytes(), &env).unwrap()
    }

    #[test]
    fn exact_names_and_aliases_win_then_the_longest_prefix_then_the_catch_all() {
        use Match::*;
        // requested (as sent) → pool, how it matched, the model named upstream by default.
        // Without a catch-all, the rows it takes get 404 model_not_found.
        #[rustfmt::skip]
        let rows: &[(&str, &str, Match, &str)] = &[
            ("gpt-realtime", "exact", Exact, "gpt-realtime"),
            ("gpt-4o-realtime-preview", "exact", Exact, "gpt-realtime"),
            ("gpt-realtime-mini-special", "special", Exact, "gpt-realtime-mini-special"),
            ("gpt-realtime-2099-01-01", "family", Prefix, "gpt-realtime-2099-01-01"),
            ("gpt-realtime-min", "family", Prefix, "gpt-realtime-min"),
            ("gpt-realtime-mini", "mini", Prefix, "gpt-realtime-mini"),
            ("gpt-realtime-mini-2025-10-06", "mini", Prefix, "gpt-realtime-mini-2025-10-06"),
            ("gpt-realtime-mini-special-2", "mini", Prefix, "gpt-realtime-mini-special-2"),
            ("gpt-4o-realtime-preview-2025", "any", CatchAll, "gpt-4o-realtime-preview-2025"),
            (" gpt-realtime-x ", "family", Prefix, "gpt-realtime-x"),
            ("GPT-REALTIME", "any", CatchAll, "GPT-REALTIME"),
            ("gpt-realtim", "any", CatchAll, "gpt-realtim"),
            ("whisper-1", "any", CatchAll, "whisper-1"),
            // A pattern's text is no name: asked for literally, it matches as any name does.
            ("*", "any", CatchAll, "*"),
            ("gpt-realtime*", "family", Prefix, "gpt-realtime*"),
        ];
        for reversed in [false, true] {
            for catch_all in [true, false] {
                let c = routes(reversed, catch_all);
                for (asked, pool, matched, upstream) in rows {
                    let at = format!("{asked:?} (reversed {reversed}, catch-all {catch_all})");
                    let got = resolve(&c, Some(asked), None);
                    if *matched == CatchAll && !catch_all {
                        assert_eq!(
                            got,
                            Err(FilterError::ModelNotFound(asked.trim().to_string())),
                            "{at}"
                        );
                        continue;
                    }
                    let r = got.unwrap_or_else(|e| panic!("{at}: {e:?}"));
                    let entry = &c.models[r.index];
                    assert_eq!(c.pools[entry.pools[0]].name, *pool, "{at}");
                    assert_eq!(r.matched, *matched, "{at}");
                    assert_eq!(r.requested, asked.trim(), "{at}");
                    assert_eq!(r.upstream_default(entry), *upstream, "{at}");
                }
            }
        }
    }

    #[test]
    fn a_name_the_grammar_refuses_is_refused_before_any_pattern_sees_it() {
        let c = routes(false, true);
        for bad in ["gpt-realtime-\u{7}x", "gpt-realtime\n2", "\u{0}"] {
            assert!(
                matches!(
                    resolve(&c, Some(bad), None),
                    Err(FilterError::InvalidModel(_))
                ),
                "{bad:?}"
            );
        }
        let long = format!("gpt-realtime-{}", "x".repeat(120));
        assert!(matches!(
            resolve(&c, Some(&long), None),
            Err(FilterError::InvalidModel(_))
        ));
        assert_eq!(
            resolve(&c, Some("  "), None),
            Err(FilterError::MissingModel)
        );
    }

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
