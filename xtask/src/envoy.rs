//! Envoy configs under `envoy/`: placeholder rendering, discovery and `envoy --mode validate`.
//!
//! Configs in `envoy/` may contain `${NAME}` placeholders (upper-case letters, digits and `_`)
//! that are filled in before Envoy reads them, so the same file runs on the fixed ports of
//! `cargo xtask up`, on the ephemeral ports of the end-to-end tests, and from whatever target
//! directory holds the built filter. An unknown `${NAME}` is an error (typos fail loudly).
//! The known names and their `up` defaults are in [`Vars::local`] and in
//! `docs/configuration.md`.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

use crate::launch::{Envoy, EnvoySpec};
use crate::paths::Paths;

/// Default model of the local demo (`?model=` default on the demo page too).
pub const DEFAULT_MODEL: &str = "gpt-realtime";

/// `${CATCH_ALL_MODEL}` with a real provider (`up --upstream`): a catch-all entry on the
/// pool of the configs' one worker, so every model goes to the provider and the provider
/// answers for names it does not know (its own `model_not_found`, passed on verbatim). It
/// follows the last entry of `models` in the shipped configs, hence the leading comma; the
/// local echo model gets none (other models get the filter's 404 `model_not_found`).
pub const PROVIDER_CATCH_ALL: &str = r#", { "name": "*", "pools": ["main"] }"#;

/// Placeholder values, by name.
#[derive(Clone, Debug, Default)]
pub struct Vars(pub BTreeMap<String, String>);

impl Vars {
    pub fn set(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.0.insert(name.to_string(), value.into());
        self
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Values for the default local stack (`cargo xtask up` without options).
    pub fn local(paths: &Paths) -> Self {
        let mut v = Vars::default();
        let abs = |p: PathBuf| p.to_string_lossy().into_owned();
        v.set("LISTEN_ADDR", "127.0.0.1")
            .set("LISTEN_PORT", "8080")
            .set("ADMIN_ADDR", "127.0.0.1")
            .set("ADMIN_PORT", "9901")
            .set("RELAY_GRPC_HOST", "127.0.0.1")
            .set("RELAY_GRPC_PORT", "50051")
            // Second relay replica, for the two-replica example config.
            .set("RELAY2_GRPC_HOST", "127.0.0.1")
            .set("RELAY2_GRPC_PORT", "50052")
            .set("RELAY_METRICS_PORT", "9464")
            .set("RELAY_MEDIA_PORT", "40000")
            .set("PROVIDER_SCHEME", "http")
            .set("PROVIDER_HOST", "127.0.0.1")
            .set("PROVIDER_PORT", "8089")
            .set("PROVIDER_URL", "http://127.0.0.1:8089")
            .set("WORKER_URL", "http://127.0.0.1:8089")
            .set("DEFAULT_MODEL", DEFAULT_MODEL)
            .set("CATCH_ALL_MODEL", "")
            .set("FILTER_WASM", abs(paths.filter_wasm()))
            .set("WEB_DIR", abs(paths.web_dir()))
            .set("DEMO_PAGE", abs(paths.demo_page()));
        v
    }

    /// Routes every model to the configs' worker ([`PROVIDER_CATCH_ALL`]), as
    /// `up --upstream` does.
    pub fn route_every_model(&mut self) -> &mut Self {
        self.set("CATCH_ALL_MODEL", PROVIDER_CATCH_ALL)
    }

    /// Sets PROVIDER_* and WORKER_URL from one base URL such as `https://api.openai.com`.
    pub fn set_provider(&mut self, base_url: &str) -> Result<&mut Self> {
        let (scheme, rest) = base_url.split_once("://").ok_or_else(|| {
            anyhow!("upstream URL `{base_url}` has no scheme (http:// or https://)")
        })?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() => {
                (h.to_string(), p.to_string())
            }
            _ => (
                authority.to_string(),
                if scheme == "https" { "443" } else { "80" }.to_string(),
            ),
        };
        if host.is_empty() || !matches!(scheme, "http" | "https") {
            bail!("upstream URL `{base_url}` must look like https://host[:port]");
        }
        let base = base_url.trim_end_matches('/');
        self.set("PROVIDER_SCHEME", scheme)
            .set("PROVIDER_HOST", host)
            .set("PROVIDER_PORT", port)
            .set("PROVIDER_URL", base)
            .set("WORKER_URL", base);
        Ok(self)
    }
}

fn is_placeholder_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Replaces every `${NAME}` with its value. Text like `${lower.case}` is left alone; an unknown
/// upper-case name is an error that lists the known ones.
pub fn render(template: &str, vars: &Vars) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut unknown = Vec::new();
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) if is_placeholder_name(&after[..end]) => {
                let name = &after[..end];
                match vars.get(name) {
                    Some(value) => out.push_str(value),
                    None => unknown.push(name.to_string()),
                }
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    if !unknown.is_empty() {
        unknown.sort();
        unknown.dedup();
        bail!(
            "unknown placeholder(s) {}; known: {}",
            unknown
                .iter()
                .map(|n| format!("${{{n}}}"))
                .collect::<Vec<_>>()
                .join(", "),
            vars.0.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(out)
}

/// Renders `src` into `dest` (creating its directory).
pub fn render_file(src: &Path, dest: &Path, vars: &Vars) -> Result<()> {
    let text =
        std::fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    let rendered = render(&text, vars).with_context(|| format!("rendering {}", src.display()))?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(dest, rendered).with_context(|| format!("writing {}", dest.display()))?;
    Ok(())
}

/// Replaces the filter's JSON configuration: the block under the line holding
/// `value: | # plugin config` (the marker in `envoy/envoy.yaml`), re-indented under it.
pub fn replace_plugin_config(yaml: &str, json: &str) -> Result<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("value: | # plugin config"))
        .ok_or_else(|| anyhow!("no `value: | # plugin config` line in the Envoy config"))?;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let base = indent(lines[start]);
    let end = (start + 1..lines.len())
        .find(|&i| !lines[i].trim().is_empty() && indent(lines[i]) <= base)
        .unwrap_or(lines.len());
    let pad = " ".repeat(base + 2);
    let mut out: Vec<String> = lines[..=start].iter().map(|s| s.to_string()).collect();
    out.extend(json.lines().map(|l| format!("{pad}{l}")));
    out.extend(lines[end..].iter().map(|s| s.to_string()));
    Ok(out.join("\n") + "\n")
}

/// Applies literal text replacements; each `from` must occur (a stale patch fails loudly
/// instead of silently testing the unpatched config).
pub fn patch(text: &str, patches: &[(String, String)]) -> Result<String> {
    let mut text = text.to_string();
    for (from, to) in patches {
        if !text.contains(from.as_str()) {
            bail!("patch target {from:?} is not in the Envoy config");
        }
        text = text.replace(from.as_str(), to);
    }
    Ok(text)
}

/// Keys that mark a YAML document as an Envoy bootstrap config.
const BOOTSTRAP_KEYS: &[&str] = &[
    "static_resources",
    "dynamic_resources",
    "admin",
    "node",
    "layered_runtime",
];

/// A file under `envoy/` and whether it is an Envoy bootstrap config.
#[derive(Debug)]
pub struct Found {
    pub path: PathBuf,
    pub bootstrap: bool,
}

/// Every `.yaml`/`.yml`/`.json` file under `dir` (recursively, sorted), classified as a
/// bootstrap config when its top level has one of [`BOOTSTRAP_KEYS`]. Other files (plugin
/// config fragments, notes) are reported but not validated by Envoy.
pub fn discover(dir: &Path, vars: &Vars) -> Result<Vec<Found>> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let mut found = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let rendered =
            render(&text, vars).with_context(|| format!("rendering {}", path.display()))?;
        let docs = YamlLoader::load_from_str(&rendered)
            .map_err(|e| anyhow!("{} is not valid YAML/JSON: {e}", path.display()))?;
        let bootstrap = docs.iter().any(|doc| match doc {
            Yaml::Hash(map) => BOOTSTRAP_KEYS
                .iter()
                .any(|k| map.contains_key(&Yaml::String((*k).to_string()))),
            _ => false,
        });
        found.push(Found { path, bootstrap });
    }
    Ok(found)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// Where the rendered copy of `config` goes (under the scratch directory, named after its path
/// relative to the workspace root so two configs never collide).
pub fn rendered_path(paths: &Paths, config: &Path, run_dir: &Path) -> PathBuf {
    let rel = config.strip_prefix(&paths.root).unwrap_or(config);
    let flat = rel.to_string_lossy().replace(['/', '\\'], "__");
    run_dir.join(flat)
}

/// Renders `config` and runs `envoy --mode validate` on it. Returns Envoy's verdict line.
pub fn validate(paths: &Paths, config: &Path, vars: &Vars) -> Result<String> {
    let dest = rendered_path(paths, config, &paths.scratch().join("envoy-validate"));
    render_file(config, &dest, vars)?;
    validate_rendered(
        paths,
        &dest,
        &format!(
            "Envoy rejected {} (rendered copy: {}).",
            config.display(),
            dest.display()
        ),
    )
}

/// Runs `envoy --mode validate` on a config file; returns Envoy's verdict line, or an error
/// with Envoy's output and `hint`.
///
/// Validation loads the Wasm filter and runs its `on_configure`, which refuses a config whose
/// `key_env` variables are unset; the VM environment gets the local echo model's (non-secret)
/// key as `OPENAI_API_KEY`, a local relay-pods key as `RELAY_REPLICA_KEY` and fresh local
/// gateway secrets ([`crate::launch::local_gateway_secrets`]), never the caller's real ones.
pub fn validate_rendered(paths: &Paths, file: &Path, hint: &str) -> Result<String> {
    let mut log = file.as_os_str().to_owned();
    log.push(".log");
    let mut spec = EnvoySpec::new(paths, file.to_path_buf(), PathBuf::from(log));
    spec.log_level = "warn".into();
    spec.env.extend([
        (
            "OPENAI_API_KEY".into(),
            crate::stack::LOCAL_ECHO_API_KEY.into(),
        ),
        (
            "RELAY_REPLICA_KEY".into(),
            crate::stack::LOCAL_REPLICA_KEY.into(),
        ),
    ]);
    let verdict = Envoy::validate(&spec)?;
    if !verdict.valid {
        bail!("{hint} Envoy said:\n{}", verdict.log.trim());
    }
    Ok(verdict
        .log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("OK")
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::default();
        v.set("PORT", "8080").set("FILTER_WASM", "/x/f.wasm");
        v
    }

    #[test]
    fn placeholders_are_replaced() {
        let out = render("port: ${PORT}\npath: \"${FILTER_WASM}\"", &vars()).unwrap();
        assert_eq!(out, "port: 8080\npath: \"/x/f.wasm\"");
    }

    #[test]
    fn unknown_placeholder_is_an_error_naming_it() {
        let err = render("a: ${NOPE}", &vars()).unwrap_err().to_string();
        assert!(err.contains("${NOPE}"), "{err}");
        assert!(err.contains("PORT"), "{err}");
    }

    #[test]
    fn non_placeholder_dollar_braces_are_left_alone() {
        let text = "fmt: '%REQ(x)% ${lower} ${' end";
        assert_eq!(render(text, &vars()).unwrap(), text);
    }

    #[test]
    fn provider_url_is_split_into_scheme_host_port() {
        let mut v = Vars::default();
        v.set_provider("https://api.openai.com/").unwrap();
        assert_eq!(v.get("PROVIDER_SCHEME"), Some("https"));
        assert_eq!(v.get("PROVIDER_HOST"), Some("api.openai.com"));
        assert_eq!(v.get("PROVIDER_PORT"), Some("443"));
        assert_eq!(v.get("WORKER_URL"), Some("https://api.openai.com"));
        v.set_provider("http://127.0.0.1:8089").unwrap();
        assert_eq!(v.get("PROVIDER_PORT"), Some("8089"));
        assert!(v.set_provider("api.openai.com").is_err());
    }

    #[test]
    fn plugin_config_block_is_replaced() {
        let y = "a:\n  value: | # plugin config\n    {\n      \"x\": 1\n    }\n  next: 2\n";
        let out = replace_plugin_config(y, "{\"y\": 2}").unwrap();
        assert_eq!(
            out,
            "a:\n  value: | # plugin config\n    {\"y\": 2}\n  next: 2\n"
        );
    }

    #[test]
    fn a_patch_that_matches_nothing_is_an_error() {
        let p = |a: &str, b: &str| vec![(a.to_string(), b.to_string())];
        assert_eq!(patch("lb: A", &p("A", "B")).unwrap(), "lb: B");
        assert!(patch("lb: A", &p("C", "B")).is_err());
    }

    #[test]
    fn every_config_in_envoy_dir_renders_with_local_defaults() {
        let paths = Paths::discover();
        for found in discover(&paths.envoy_dir(), &Vars::local(&paths)).unwrap() {
            let _ = found.bootstrap;
        }
    }
}
