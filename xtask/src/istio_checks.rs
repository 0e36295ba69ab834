//! Checks across the objects of one `deploy/` variant that no schema can make: the create
//! route really leads to the hold when the filter continues the headers, every route an
//! EnvoyFilter patches by name exists in the variant's VirtualService, and the Istio CORS
//! policy is the one of `envoy/envoy.yaml`.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{anyhow, Result};
use yaml_rust2::{Yaml, YamlLoader};

use crate::manifests::Manifest;

fn patches<'a>(in_variant: &'a [&Manifest]) -> impl Iterator<Item = &'a Yaml> + 'a {
    in_variant
        .iter()
        .filter(|m| m.kind == "EnvoyFilter")
        .flat_map(|m| {
            m.doc["spec"]["configPatches"]
                .as_vec()
                .into_iter()
                .flatten()
        })
}

fn http_routes<'a>(in_variant: &'a [&Manifest]) -> impl Iterator<Item = &'a Yaml> + 'a {
    in_variant
        .iter()
        .filter(|m| m.kind == "VirtualService")
        .flat_map(|m| m.doc["spec"]["http"].as_vec().into_iter().flatten())
}

/// Whether a filter configuration of the variant continues the headers (a WasmPlugin's
/// pluginConfig, or the JSON of an inline filter).
fn continues_headers(in_variant: &[&Manifest]) -> bool {
    let wasm = in_variant.iter().any(|m| {
        m.kind == "WasmPlugin"
            && m.doc["spec"]["pluginConfig"]["continue_headers"].as_bool() == Some(true)
    });
    let inline = patches(in_variant).any(|p| {
        p["patch"]["value"]["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            .is_some_and(|c| c["continue_headers"] == serde_json::Value::Bool(true))
    });
    wasm || inline
}

/// How a VirtualService route must match a held path.
#[derive(Clone, Copy)]
enum Match {
    Exact,
    Prefix,
}

/// With `continue_headers`, the routes of `POST <calls path>`, of the client-secrets path and
/// of the GPT-Live sessions prefix must lead to a cluster whose endpoint is an internal listener (envoy/envoy.yaml's
/// `realtime_hold`): otherwise the router sends every create (or mint) to the
/// VirtualService's destination with the headers. Checked through
/// the chain VirtualService route (name, POST, exact path) → HTTP_ROUTE patch (cluster) →
/// CLUSTER patch (envoy_internal_address) → LISTENER patch (internal_listener).
pub fn check_hold(variant: &Path, in_variant: &[&Manifest], problems: &mut Vec<String>) {
    if !continues_headers(in_variant) {
        return;
    }
    let at = variant.display();
    let internal_listeners: BTreeSet<&str> = patches(in_variant)
        .filter(|p| p["applyTo"].as_str() == Some("LISTENER"))
        .map(|p| &p["patch"]["value"])
        .filter(|v| !v["internal_listener"].is_badvalue())
        .filter_map(|v| v["name"].as_str())
        .collect();
    let hold_clusters: BTreeSet<&str> = patches(in_variant)
        .filter(|p| p["applyTo"].as_str() == Some("CLUSTER"))
        .map(|p| &p["patch"]["value"])
        .filter(|c| {
            c["load_assignment"]["endpoints"]
                .as_vec()
                .into_iter()
                .flatten()
                .flat_map(|e| e["lb_endpoints"].as_vec().into_iter().flatten())
                .any(|e| {
                    e["endpoint"]["address"]["envoy_internal_address"]["server_listener_name"]
                        .as_str()
                        .is_some_and(|l| internal_listeners.contains(l))
                })
        })
        .filter_map(|c| c["name"].as_str())
        .collect();
    let hold_routes: BTreeSet<&str> = patches(in_variant)
        .filter(|p| p["applyTo"].as_str() == Some("HTTP_ROUTE"))
        .filter(|p| {
            p["patch"]["value"]["route"]["cluster"]
                .as_str()
                .is_some_and(|c| hold_clusters.contains(c))
        })
        .filter_map(|p| p["match"]["routeConfiguration"]["vhost"]["route"]["name"].as_str())
        .collect();
    // The paths whose body the filter holds: call creation (POST), client secrets and
    // everything under the GPT-Live sessions path (the filter answers all of it).
    let held: [(Match, &str, Option<&str>, &str); 4] = [
        (Match::Exact, "/v1/realtime/calls", Some("POST"), "creates"),
        (
            Match::Exact,
            "/v1/realtime/client_secrets",
            None,
            "client-secret requests",
        ),
        (
            Match::Prefix,
            "/v1/live/sessions",
            None,
            "GPT-Live requests",
        ),
        // The Realtime sideband before the filter rewrites it (`?call_id=` in queryParams).
        (Match::Exact, "/v1/realtime", None, "sideband upgrades"),
    ];
    for (kind, path, method, what) in held {
        let key = match kind {
            Match::Exact => "exact",
            Match::Prefix => "prefix",
        };
        let routes: Vec<&Yaml> = http_routes(in_variant)
            .filter(|r| {
                r["match"].as_vec().into_iter().flatten().any(|m| {
                    m["uri"][key].as_str() == Some(path)
                        && method.is_none_or(|x| m["method"]["exact"].as_str() == Some(x))
                })
            })
            .collect();
        let shown = method.map_or(path.to_string(), |m| format!("{m} {path}"));
        if routes.is_empty() {
            problems.push(format!(
                "{at}: the filter continues the headers (continue_headers: true) but no \
                 VirtualService route matches {shown} ({key}), so nothing leads {what} to the \
                 hold (they would fall to another route, where the filter may not run)"
            ));
        }
        for r in routes {
            let name = r["name"].as_str().unwrap_or("");
            if !hold_routes.contains(name) {
                problems.push(format!(
                    "{at}: the filter continues the headers, but the route `{name}` ({shown}) is \
                     not patched to a cluster of an internal listener (hold routes: \
                     {hold_routes:?}, hold clusters: {hold_clusters:?}, internal listeners: \
                     {internal_listeners:?}); {what} would reach the VirtualService's destination"
                ));
            }
        }
    }
}

/// Every VirtualService route name an HTTP_ROUTE patch matches exists in the variant (a patch
/// on a name that matches nothing silently changes nothing), when the variant ships one.
pub fn check_patched_route_names(
    variant: &Path,
    in_variant: &[&Manifest],
    problems: &mut Vec<String>,
) {
    let names: BTreeSet<&str> = http_routes(in_variant)
        .filter_map(|r| r["name"].as_str())
        .collect();
    if names.is_empty() {
        return;
    }
    for p in patches(in_variant).filter(|p| p["applyTo"].as_str() == Some("HTTP_ROUTE")) {
        if let Some(n) = p["match"]["routeConfiguration"]["vhost"]["route"]["name"].as_str() {
            if !names.contains(n) {
                problems.push(format!(
                    "{}: an HTTP_ROUTE patch matches route `{n}`, which no VirtualService \
                     route of this variant is named (names: {names:?})",
                    variant.display()
                ));
            }
        }
    }
}

/// A CORS policy in comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    pub origins: BTreeSet<(String, String)>,
    pub methods: BTreeSet<String>,
    pub allow_headers: BTreeSet<String>,
    pub expose_headers: BTreeSet<String>,
    pub max_age_secs: Option<u64>,
    pub credentials: bool,
}

fn set_of<'a>(items: impl Iterator<Item = &'a str>, lower: bool) -> BTreeSet<String> {
    items
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if lower {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        })
        .collect()
}

fn strs(y: &Yaml) -> impl Iterator<Item = &str> {
    y.as_vec().into_iter().flatten().filter_map(Yaml::as_str)
}

/// Envoy's `envoy.extensions.filters.http.cors.v3.CorsPolicy`.
pub fn envoy_cors(p: &Yaml) -> Cors {
    let origins = p["allow_origin_string_match"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            for kind in ["exact", "prefix"] {
                if let Some(v) = m[kind].as_str() {
                    return Some((kind.to_string(), v.to_string()));
                }
            }
            m["safe_regex"]["regex"]
                .as_str()
                .map(|v| ("regex".to_string(), v.to_string()))
        })
        .collect();
    let list = |k: &str| p[k].as_str().unwrap_or("").split(',');
    Cors {
        origins,
        methods: set_of(list("allow_methods"), false),
        allow_headers: set_of(list("allow_headers"), true),
        expose_headers: set_of(list("expose_headers"), true),
        max_age_secs: p["max_age"].as_str().and_then(|s| s.trim().parse().ok()),
        credentials: p["allow_credentials"].as_bool().unwrap_or(false),
    }
}

/// Seconds of a protobuf duration as Istio writes it (`600s`, `10m`, `1h`).
fn duration_secs(s: &str) -> Option<u64> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    match unit {
        "s" => Some(n),
        "m" => Some(n * 60),
        "h" => Some(n * 3600),
        _ => None,
    }
}

/// Istio's VirtualService `corsPolicy`.
pub fn istio_cors(p: &Yaml) -> Cors {
    let origins = p["allowOrigins"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            ["exact", "prefix", "regex"]
                .iter()
                .find_map(|kind| m[*kind].as_str().map(|v| (kind.to_string(), v.to_string())))
        })
        .collect();
    Cors {
        origins,
        methods: set_of(strs(&p["allowMethods"]), false),
        allow_headers: set_of(strs(&p["allowHeaders"]), true),
        expose_headers: set_of(strs(&p["exposeHeaders"]), true),
        max_age_secs: p["maxAge"].as_str().and_then(duration_secs),
        credentials: p["allowCredentials"].as_bool().unwrap_or(false),
    }
}

/// Replaces `${NAME}` placeholders so the template parses as YAML (and its plugin config as
/// JSON): `0`, or nothing for `${CATCH_ALL_MODEL}`, a JSON fragment that is empty locally.
fn without_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        match rest[i..].find('}') {
            Some(j) => {
                if &rest[i..=i + j] != "${CATCH_ALL_MODEL}" {
                    out.push('0');
                }
                rest = &rest[i + j + 1..];
            }
            None => {
                rest = &rest[i..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

fn load_envoy(envoy_yaml: &Path) -> Result<Yaml> {
    let text = std::fs::read_to_string(envoy_yaml)
        .map_err(|e| anyhow!("reading {}: {e}", envoy_yaml.display()))?;
    YamlLoader::load_from_str(&without_placeholders(&text))
        .map_err(|e| anyhow!("{} does not parse: {e}", envoy_yaml.display()))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("{} is empty", envoy_yaml.display()))
}

/// Every internal-listener LISTENER patch under `deploy/`, and every CLUSTER patch leading to
/// an internal listener, is the listener / cluster of the same name in `envoy/envoy.yaml` (the
/// hold proven by e2e/tests/headers_mode.rs), field for field.
pub fn check_hold_matches_envoy(all: &[Manifest], envoy_yaml: &Path) -> Result<String> {
    let doc = load_envoy(envoy_yaml)?;
    let of = |key: &str| {
        doc["static_resources"][key]
            .as_vec()
            .cloned()
            .unwrap_or_default()
    };
    let (listeners, clusters) = (of("listeners"), of("clusters"));
    let mut checked = 0;
    let mut problems = Vec::new();
    for m in all.iter().filter(|m| m.kind == "EnvoyFilter") {
        for p in m.doc["spec"]["configPatches"]
            .as_vec()
            .into_iter()
            .flatten()
        {
            let value = &p["patch"]["value"];
            let internal_cluster = value["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                ["endpoint"]["address"]["envoy_internal_address"]
                .as_hash()
                .is_some();
            let (what, pool) = match p["applyTo"].as_str() {
                Some("LISTENER") if !value["internal_listener"].is_badvalue() => {
                    ("internal listener", &listeners)
                }
                Some("CLUSTER") if internal_cluster => ("internal-listener cluster", &clusters),
                _ => continue,
            };
            let name = value["name"].as_str().unwrap_or("");
            match pool.iter().find(|l| l["name"].as_str() == Some(name)) {
                Some(l) if l == value => checked += 1,
                Some(_) => problems.push(format!(
                    "EnvoyFilter {} ({}): {what} {name} differs from the one in {} (keep the \
                     two holds identical)",
                    m.name,
                    m.file.display(),
                    envoy_yaml.display()
                )),
                None => problems.push(format!(
                    "EnvoyFilter {} ({}): {what} {name} has no counterpart in {}",
                    m.name,
                    m.file.display(),
                    envoy_yaml.display()
                )),
            }
        }
    }
    if problems.is_empty() {
        Ok(format!(
            "{checked} hold listener/cluster patches identical to envoy.yaml's"
        ))
    } else {
        Err(anyhow!("{}", problems.join("\n")))
    }
}

/// Every EnvoyFilter NETWORK_FILTER patch that sets `local_reply_config` (deploy/istio/
/// local-replies) carries the public listener's `local_reply_config` of `envoy/envoy.yaml`
/// (the one e2e/tests/local_replies.rs proves), field for field; and there is one.
pub fn check_local_replies_match_envoy(all: &[Manifest], envoy_yaml: &Path) -> Result<String> {
    let doc = load_envoy(envoy_yaml)?;
    let want = doc["static_resources"]["listeners"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter(|l| l["name"].as_str() == Some("public"))
        .flat_map(|l| {
            l["filter_chains"][0]["filters"]
                .as_vec()
                .cloned()
                .unwrap_or_default()
        })
        .map(|f| f["typed_config"]["local_reply_config"].clone())
        .find(|c| !c.is_badvalue())
        .ok_or_else(|| {
            anyhow!(
                "{}: the public listener has no local_reply_config",
                envoy_yaml.display()
            )
        })?;
    let mut checked = 0;
    let mut problems = Vec::new();
    for m in all.iter().filter(|m| m.kind == "EnvoyFilter") {
        for p in m.doc["spec"]["configPatches"]
            .as_vec()
            .into_iter()
            .flatten()
            .filter(|p| p["applyTo"].as_str() == Some("NETWORK_FILTER"))
        {
            let got = &p["patch"]["value"]["typed_config"]["local_reply_config"];
            if got.is_badvalue() {
                continue;
            }
            if *got == want {
                checked += 1;
            } else {
                problems.push(format!(
                    "EnvoyFilter {} ({}): local_reply_config differs from the public listener's \
                     in {} (keep the two identical)",
                    m.name,
                    m.file.display(),
                    envoy_yaml.display()
                ));
            }
        }
    }
    if checked == 0 && problems.is_empty() {
        problems.push(
            "no EnvoyFilter gives the ingress gateway envoy.yaml's local_reply_config".into(),
        );
    }
    if problems.is_empty() {
        Ok(format!(
            "{checked} local_reply_config patch(es) identical to envoy.yaml's"
        ))
    } else {
        Err(anyhow!("{}", problems.join("\n")))
    }
}

/// Paths browser pages call directly, which therefore carry the CORS policy: Realtime calls
/// and GPT-Live sessions (not client secrets: backends mint them).
fn is_browser_path(path: &str) -> bool {
    path.starts_with("/v1/realtime/calls") || path.starts_with("/v1/live/sessions")
}

/// The CORS policies on the routes of an Envoy bootstrap that browsers call.
pub fn envoy_calls_cors(envoy_yaml: &Path) -> Result<Vec<Cors>> {
    let doc = load_envoy(envoy_yaml)?;
    let mut out = Vec::new();
    for l in doc["static_resources"]["listeners"]
        .as_vec()
        .into_iter()
        .flatten()
    {
        for chain in l["filter_chains"].as_vec().into_iter().flatten() {
            for f in chain["filters"].as_vec().into_iter().flatten() {
                let vhosts = &f["typed_config"]["route_config"]["virtual_hosts"];
                for vh in vhosts.as_vec().into_iter().flatten() {
                    for r in vh["routes"].as_vec().into_iter().flatten() {
                        let m = &r["match"];
                        let path = m["path"].as_str().or(m["prefix"].as_str()).unwrap_or("");
                        let cors = &r["typed_per_filter_config"]["envoy.filters.http.cors"];
                        if is_browser_path(path) && !cors.is_badvalue() {
                            out.push(envoy_cors(cors));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The plugin configuration JSON of every Wasm filter in an Envoy bootstrap.
fn envoy_plugin_configs(envoy_yaml: &Path) -> Result<Vec<serde_json::Value>> {
    let doc = load_envoy(envoy_yaml)?;
    let mut out = Vec::new();
    for l in doc["static_resources"]["listeners"]
        .as_vec()
        .into_iter()
        .flatten()
    {
        for chain in l["filter_chains"].as_vec().into_iter().flatten() {
            for f in chain["filters"].as_vec().into_iter().flatten() {
                for hf in f["typed_config"]["http_filters"]
                    .as_vec()
                    .into_iter()
                    .flatten()
                {
                    if let Some(text) =
                        hf["typed_config"]["config"]["configuration"]["value"].as_str()
                    {
                        out.push(serde_json::from_str(text).map_err(|e| {
                            anyhow!("{}: plugin configuration: {e}", envoy_yaml.display())
                        })?);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The filter's `browser_origins` (which pages' browser requests it serves) must be exactly the
/// CORS policy's origins, in envoy.yaml and in every WasmPlugin: an origin CORS lets read but
/// the filter refuses is a broken app, one the filter serves but CORS omits is a page that can
/// open calls it cannot read (a simple POST needs no preflight). Returns how many
/// configurations were compared.
fn check_browser_origins(
    all: &[Manifest],
    envoy_yaml: &Path,
    reference: &Cors,
    problems: &mut Vec<String>,
) -> Result<usize> {
    let mut want = BTreeSet::new();
    for (kind, origin) in &reference.origins {
        if kind == "exact" {
            want.insert(origin.to_ascii_lowercase());
        } else {
            problems.push(format!(
                "{}: CORS origin {kind} '{origin}' cannot be a browser_origins entry (exact origins only)",
                envoy_yaml.display()
            ));
        }
    }
    let listed = |v: &serde_json::Value| -> BTreeSet<String> {
        v["browser_origins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.as_str())
            .map(str::to_ascii_lowercase)
            .collect()
    };
    let mut compared = 0;
    let mut compare = |at: String, got: BTreeSet<String>| {
        compared += 1;
        if got != want {
            problems.push(format!(
                "{at}: browser_origins {got:?} differ from the CORS policy's origins {want:?}"
            ));
        }
    };
    for config in envoy_plugin_configs(envoy_yaml)? {
        compare(envoy_yaml.display().to_string(), listed(&config));
    }
    for m in all.iter().filter(|m| m.kind == "WasmPlugin") {
        let config = crate::manifests::to_json(&m.doc["spec"]["pluginConfig"]);
        compare(
            format!("WasmPlugin {} ({})", m.name, m.file.display()),
            listed(&config),
        );
    }
    Ok(compared)
}

/// The VirtualServices' CORS policy is Envoy's: every route of `envoy.yaml` under
/// `/v1/realtime/calls` carries one policy, every VirtualService route matching that path
/// carries one, and they are all equal.
pub fn check_cors(all: &[Manifest], envoy_yaml: &Path) -> Result<String> {
    let envoy = envoy_calls_cors(envoy_yaml)?;
    let Some(reference) = envoy.first().cloned() else {
        return Err(anyhow!(
            "{}: no CORS policy on a /v1/realtime/calls route",
            envoy_yaml.display()
        ));
    };
    let mut problems = Vec::new();
    if envoy.iter().any(|c| *c != reference) {
        problems.push(format!(
            "{}: the /v1/realtime/calls routes carry different CORS policies",
            envoy_yaml.display()
        ));
    }
    let mut checked = 0;
    for m in all.iter().filter(|m| m.kind == "VirtualService") {
        for r in m.doc["spec"]["http"].as_vec().into_iter().flatten() {
            let name = r["name"].as_str().unwrap_or("(unnamed)");
            let calls = r["match"].as_vec().into_iter().flatten().any(|mt| {
                mt["uri"]["exact"]
                    .as_str()
                    .or(mt["uri"]["prefix"].as_str())
                    .is_some_and(is_browser_path)
            });
            let at = format!(
                "VirtualService {} ({}) route {name}",
                m.name,
                m.file.display()
            );
            if r["corsPolicy"].is_badvalue() {
                if calls {
                    problems.push(format!(
                        "{at}: matches a path browsers call (/v1/realtime/calls, \
                         /v1/live/sessions) but has no corsPolicy ({} has one)",
                        envoy_yaml.display()
                    ));
                }
                continue;
            }
            let cors = istio_cors(&r["corsPolicy"]);
            if cors != reference {
                problems.push(format!(
                    "{at}: corsPolicy differs from {}'s CORS policy:\n  istio: {cors:?}\n  envoy: \
                     {reference:?}",
                    envoy_yaml.display()
                ));
            }
            checked += 1;
        }
    }
    let filters = check_browser_origins(all, envoy_yaml, &reference, &mut problems)?;
    if problems.is_empty() {
        Ok(format!(
            "{checked} VirtualService corsPolicy equal to envoy.yaml's ({} origin(s), max age {:?} s); \
             browser_origins of {filters} filter configuration(s) equal to its origins",
            reference.origins.len(),
            reference.max_age_secs
        ))
    } else {
        Err(anyhow!("{}", problems.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::test_support::{drifted, in_variant};

    fn yaml(text: &str) -> Yaml {
        YamlLoader::load_from_str(text).unwrap().remove(0)
    }

    #[test]
    fn envoy_and_istio_cors_forms_compare_by_meaning() {
        let envoy = envoy_cors(&yaml(
            "allow_origin_string_match: [{exact: 'https://a.test'}]\nallow_methods: 'POST, OPTIONS'\n\
             allow_headers: 'Authorization, content-type'\nexpose_headers: location\nmax_age: '600'\n",
        ));
        let istio = istio_cors(&yaml(
            "allowOrigins: [{exact: 'https://a.test'}]\nallowMethods: [OPTIONS, POST]\n\
             allowHeaders: [content-type, authorization]\nexposeHeaders: [Location]\nmaxAge: 10m\n",
        ));
        assert_eq!(envoy, istio);
        let other = istio_cors(&yaml(
            "allowOrigins: [{prefix: 'https://a.test'}]\nallowMethods: [OPTIONS, POST]\n\
             allowHeaders: [content-type, authorization]\nexposeHeaders: [Location]\nmaxAge: 10m\n",
        ));
        assert_ne!(envoy, other, "prefix is not exact");
    }

    /// The shipped VirtualService carries envoy/envoy.yaml's policy, and a changed origin or
    /// max age is refused.
    #[test]
    fn shipped_cors_policy_matches_envoy_and_a_drift_is_refused() {
        let paths = crate::paths::Paths::discover();
        let envoy_yaml = paths.envoy_dir().join("envoy.yaml");
        let all = crate::manifests::load(&paths.deploy_dir()).unwrap();
        let ok = check_cors(&all, &envoy_yaml).unwrap();
        assert!(ok.starts_with('3'), "{ok}");
        // The GPT-Live route without its policy: browsers could not read its answers.
        let drifted_live = drifted(
            &all,
            |m| m.kind == "VirtualService",
            "      corsPolicy: *cors\n    - name: realtime-call-control",
            "    - name: realtime-call-control",
        );
        let err = check_cors(&drifted_live, &envoy_yaml)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("realtime-live-sessions") && err.contains("no corsPolicy"),
            "{err}"
        );
        for (from, to) in [
            ("https://app.example.test", "https://other.example.test"),
            ("600s", "60s"),
        ] {
            let drifted = drifted(&all, |m| m.kind == "VirtualService", from, to);
            let err = check_cors(&drifted, &envoy_yaml).unwrap_err().to_string();
            assert!(err.contains("corsPolicy differs"), "{from}: {err}");
        }
        // The filter's browser_origins are the policy's origins.
        assert!(ok.contains("browser_origins of 3 filter"), "{ok}");
        let drifted = drifted(
            &all,
            |m| m.kind == "WasmPlugin",
            "browser_origins: [\"https://app.example.test\"]",
            "browser_origins: [\"https://other.example.test\"]",
        );
        let err = check_cors(&drifted, &envoy_yaml).unwrap_err().to_string();
        assert!(
            err.contains("browser_origins") && err.contains("differ"),
            "{err}"
        );
    }

    #[test]
    fn the_istio_local_replies_are_envoy_yamls_and_a_drift_is_refused() {
        let paths = crate::paths::Paths::discover();
        let envoy_yaml = paths.envoy_dir().join("envoy.yaml");
        let all = crate::manifests::load(&paths.deploy_dir()).unwrap();
        let ok = check_local_replies_match_envoy(&all, &envoy_yaml).unwrap();
        assert!(ok.starts_with('1'), "{ok}");
        let drifted = drifted(
            &all,
            |m| m.name == "realtime-local-replies",
            "code: gateway_timeout",
            "code: timeout",
        );
        let err = check_local_replies_match_envoy(&drifted, &envoy_yaml).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
        let none: Vec<_> = all
            .iter()
            .filter(|m| m.name != "realtime-local-replies")
            .cloned()
            .collect();
        let err = check_local_replies_match_envoy(&none, &envoy_yaml).unwrap_err();
        assert!(err.to_string().contains("no EnvoyFilter"), "{err}");
    }

    #[test]
    fn the_istio_hold_is_envoy_yamls_and_a_drift_is_refused() {
        let paths = crate::paths::Paths::discover();
        let envoy_yaml = paths.envoy_dir().join("envoy.yaml");
        let all = crate::manifests::load(&paths.deploy_dir()).unwrap();
        let ok = check_hold_matches_envoy(&all, &envoy_yaml).unwrap();
        assert!(ok.starts_with('2'), "{ok}");
        let drifted = drifted(
            &all,
            |m| m.name == "realtime-hold",
            "max_request_bytes: 131072",
            "max_request_bytes: 65536",
        );
        let err = check_hold_matches_envoy(&drifted, &envoy_yaml).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
    }

    /// The shipped variants that continue the headers lead creates to the hold, and a
    /// variant without the hold's route patch is refused.
    #[test]
    fn continue_headers_without_the_hold_is_refused() {
        let paths = crate::paths::Paths::discover();
        let all = crate::manifests::load(&paths.deploy_dir()).unwrap();
        let in_dir = |dir: &str| in_variant(&all, &paths, dir);
        let variant = in_dir("kustomization.yaml");
        assert!(continues_headers(&variant));
        let mut problems = Vec::new();
        check_hold(Path::new("deploy"), &variant, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let without_hold: Vec<&Manifest> = variant
            .into_iter()
            .filter(|m| m.name != "realtime-hold")
            .collect();
        check_hold(Path::new("deploy"), &without_hold, &mut problems);
        assert!(
            problems.iter().any(|p| p.contains("realtime-calls")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("realtime-client-secrets")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("realtime-live-sessions")),
            "{problems:?}"
        );
        // A VirtualService without a client-secrets route: the path would be the
        // pass-through's, where the filter is off.
        let mut problems = Vec::new();
        let drifted = drifted(
            &all,
            |m| m.kind == "VirtualService",
            "exact: /v1/realtime/client_secrets",
            "exact: /v1/realtime/client_secretz",
        );
        let variant = in_variant(&drifted, &paths, "kustomization.yaml");
        check_hold(Path::new("deploy"), &variant, &mut problems);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("no VirtualService route matches /v1/realtime/client_secrets")),
            "{problems:?}"
        );
    }
}
