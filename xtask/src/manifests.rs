//! Static check of the Kubernetes and Istio manifests under `deploy/`: every file parses as
//! YAML, every document has a known `apiVersion`/`kind` and a name, the kinds the operator
//! docs promise are all there, `kustomization.yaml` lists exactly the manifest files, and a few
//! settings that matter for safety are what the docs say (fail-closed filter, one UDP media
//! port, gRPC probes, non-root containers). The relay's media ports (UDP and ICE-TCP) agree
//! across hostPort, container port, the relay's settings and the NetworkPolicy
//! ([`crate::media_ports`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use yaml_rust2::{Yaml, YamlLoader};

/// Kinds we ship, with the API versions we write them in.
const KNOWN: &[(&str, &[&str])] = &[
    ("Deployment", &["apps/v1"]),
    ("HorizontalPodAutoscaler", &["autoscaling/v2"]),
    ("StatefulSet", &["apps/v1"]),
    ("Service", &["v1"]),
    ("ServiceAccount", &["v1"]),
    ("Secret", &["v1"]),
    ("ConfigMap", &["v1"]),
    ("PodDisruptionBudget", &["policy/v1"]),
    ("NetworkPolicy", &["networking.k8s.io/v1"]),
    ("WasmPlugin", &["extensions.istio.io/v1alpha1"]),
    ("EnvoyFilter", &["networking.istio.io/v1alpha3"]),
    (
        "VirtualService",
        &["networking.istio.io/v1", "networking.istio.io/v1beta1"],
    ),
    (
        "Gateway",
        &["networking.istio.io/v1", "networking.istio.io/v1beta1"],
    ),
    (
        "ServiceEntry",
        &["networking.istio.io/v1", "networking.istio.io/v1beta1"],
    ),
    (
        "DestinationRule",
        &["networking.istio.io/v1", "networking.istio.io/v1beta1"],
    ),
    (
        "PeerAuthentication",
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
    ),
    ("Kustomization", &["kustomize.config.k8s.io/v1beta1"]),
];

/// Kinds that must appear at least once under `deploy/`.
const REQUIRED: &[&str] = &["WasmPlugin", "EnvoyFilter", "Deployment", "Service"];

/// One parsed document.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub file: PathBuf,
    pub kind: String,
    pub name: String,
    pub doc: Yaml,
}

/// What the check found: documents per kind.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub kinds: BTreeMap<String, usize>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{k}×{n}")).collect();
        write!(f, "{} files: {}", self.files, kinds.join(", "))
    }
}

fn get<'a>(doc: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(doc, |node, key| &node[*key])
}

fn str_at<'a>(doc: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    get(doc, path).as_str()
}

/// Directories under `deploy/` whose YAML is not Kubernetes objects: Prometheus and Grafana
/// files (checked by `promtool` and the observability test instead).
pub const NOT_MANIFEST_DIRS: [&str; 1] = ["observability"];

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() && NOT_MANIFEST_DIRS.contains(&name) {
            continue;
        }
        if path.is_dir() {
            yaml_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// Every YAML file under `dir`, sorted.
pub fn yaml_files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    yaml_files(dir, &mut files)?;
    files.sort();
    Ok(files)
}

/// The non-empty YAML documents of one file.
pub fn docs_of(file: &Path) -> Result<Vec<Yaml>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let docs = YamlLoader::load_from_str(&text)
        .map_err(|e| anyhow!("{} does not parse as YAML: {e}", file.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Parses every manifest under `dir`.
pub fn load(dir: &Path) -> Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for file in yaml_files_under(dir)? {
        for (i, doc) in docs_of(&file)?.into_iter().enumerate() {
            let at = format!("{} (document {})", file.display(), i + 1);
            let kind = str_at(&doc, &["kind"])
                .ok_or_else(|| anyhow!("{at}: no `kind`"))?
                .to_string();
            let api =
                str_at(&doc, &["apiVersion"]).ok_or_else(|| anyhow!("{at}: no `apiVersion`"))?;
            let versions = KNOWN
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    anyhow!("{at}: kind `{kind}` is not one this project ships (add it to xtask/src/manifests.rs if intended)")
                })?;
            if !versions.contains(&api) {
                bail!("{at}: {kind} has apiVersion `{api}`, expected one of {versions:?}");
            }
            let name = if kind == "Kustomization" {
                String::from("kustomization")
            } else {
                str_at(&doc, &["metadata", "name"])
                    .ok_or_else(|| anyhow!("{at}: {kind} has no metadata.name"))?
                    .to_string()
            };
            out.push(Manifest {
                file: file.clone(),
                kind,
                name,
                doc,
            });
        }
    }
    Ok(out)
}

/// A YAML node as JSON (what Kubernetes and the schema validators see). Keys that are not
/// strings are written as their YAML text; aliases and bad values become null.
pub fn to_json(y: &Yaml) -> serde_json::Value {
    use serde_json::Value;
    match y {
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Real(r) => r.clone(),
                        Yaml::Boolean(b) => b.to_string(),
                        _ => String::from("?"),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(r.clone())),
        Yaml::Boolean(b) => Value::Bool(*b),
        _ => Value::Null,
    }
}

/// The variants under `deploy/`: kustomizations that no other kustomization lists
/// (`deploy/`, `deploy/inline/`, `deploy/replicas/`, ...), as their `kustomization.yaml`.
pub fn variants(all: &[Manifest]) -> Vec<&Manifest> {
    let kustomizations: Vec<&Manifest> = all.iter().filter(|m| m.kind == "Kustomization").collect();
    let mut listed_dirs = BTreeSet::new();
    for k in &kustomizations {
        let base = k.file.parent().unwrap_or(Path::new("."));
        for s in k.doc["resources"].as_vec().into_iter().flatten() {
            if let Some(Ok(p)) = s.as_str().map(|s| base.join(s).canonicalize()) {
                listed_dirs.insert(p);
            }
        }
    }
    kustomizations
        .into_iter()
        .filter(|k| {
            let dir = k.file.parent().and_then(|d| d.canonicalize().ok());
            !dir.as_ref().is_some_and(|d| listed_dirs.contains(d))
        })
        .collect()
}

/// The manifest files (canonical paths) a variant's kustomization pulls in.
pub fn variant_files(kustomization: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    kustomization_files(kustomization, &mut files);
    files
}

/// Loads and checks `dir`; the error lists every problem found.
pub fn check_dir(dir: &Path) -> Result<Report> {
    let manifests = load(dir)?;
    let mut problems = Vec::new();
    let mut report = Report {
        files: manifests
            .iter()
            .map(|m| &m.file)
            .collect::<BTreeSet<_>>()
            .len(),
        ..Report::default()
    };
    for m in &manifests {
        *report.kinds.entry(m.kind.clone()).or_default() += 1;
    }
    for kind in REQUIRED {
        if !report.kinds.contains_key(*kind) {
            problems.push(format!("no {kind} under {}", dir.display()));
        }
    }
    for m in &manifests {
        let at = format!("{} {} ({})", m.kind, m.name, m.file.display());
        match m.kind.as_str() {
            "WasmPlugin" => check_wasm_plugin(&m.doc, &at, &mut problems),
            "Deployment" => {
                check_deployment(&m.doc, &at, &mut problems);
                crate::scaling::check_relay_deployment(&m.doc, &at, &mut problems);
            }
            "StatefulSet" => {
                if str_at(&m.doc, &["spec", "serviceName"]).is_none() {
                    problems.push(format!(
                        "{at}: spec.serviceName (the headless Service of the pod DNS names) is missing"
                    ));
                }
                check_deployment(&m.doc, &at, &mut problems);
            }
            "Service" => check_service(&m.doc, &at, &mut problems),
            "EnvoyFilter" if get(&m.doc, &["spec", "configPatches"]).as_vec().is_none() => {
                problems.push(format!("{at}: spec.configPatches is not a list"));
            }
            "Kustomization" => check_kustomization(m, dir, &manifests, &mut problems),
            _ => {}
        }
    }
    check_route_filter_names(&manifests, &mut problems);
    crate::scaling::check_plugins_in_step(&manifests, &mut problems);
    for k in variants(&manifests) {
        let files = variant_files(&k.file);
        let in_variant: Vec<&Manifest> = manifests
            .iter()
            .filter(|m| m.file.canonicalize().is_ok_and(|f| files.contains(&f)))
            .collect();
        let vdir = k.file.parent().unwrap_or(dir);
        crate::istio_checks::check_hold(vdir, &in_variant, &mut problems);
        crate::istio_checks::check_patched_route_names(vdir, &in_variant, &mut problems);
        crate::scaling::check_variant(vdir, &in_variant, &mut problems);
        crate::media_ports::check_variant(vdir, &in_variant, &mut problems);
    }
    if problems.is_empty() {
        Ok(report)
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// Manifest files a kustomization pulls in, following listed directories' kustomizations.
fn kustomization_files(file: &Path, out: &mut BTreeSet<PathBuf>) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    let Ok(docs) = YamlLoader::load_from_str(&text) else {
        return;
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let listed = docs
        .first()
        .and_then(|d| d["resources"].as_vec().cloned())
        .unwrap_or_default();
    for path in listed.iter().filter_map(Yaml::as_str).map(|s| base.join(s)) {
        if path.is_dir() {
            kustomization_files(&path.join("kustomization.yaml"), out);
        } else if let Ok(p) = path.canonicalize() {
            out.insert(p);
        }
    }
}

/// The per-route filter switch (`typed_per_filter_config` with a `FilterConfig` in an
/// `HTTP_ROUTE` patch) must be keyed by the name the filter has in the chain of the same
/// variant: `<namespace>.<name>` for a WasmPlugin (Istio names it so), the patch's own
/// `name` for a filter inserted by an `HTTP_FILTER` patch. A wrong key is silently ignored
/// by Envoy, so only this check would notice it. Variants are the kustomizations no other
/// kustomization lists (`deploy/`, `deploy/inline/`, …).
fn check_route_filter_names(all: &[Manifest], problems: &mut Vec<String>) {
    for k in variants(all) {
        let files = variant_files(&k.file);
        let in_variant: Vec<&Manifest> = all
            .iter()
            .filter(|m| m.file.canonicalize().is_ok_and(|f| files.contains(&f)))
            .collect();
        let mut filters = BTreeSet::new();
        let mut keys = Vec::new();
        for m in &in_variant {
            match m.kind.as_str() {
                "WasmPlugin" => {
                    let ns = str_at(&m.doc, &["metadata", "namespace"]).unwrap_or("default");
                    filters.insert(format!("{ns}.{}", m.name));
                }
                "EnvoyFilter" => {
                    for p in get(&m.doc, &["spec", "configPatches"])
                        .as_vec()
                        .into_iter()
                        .flatten()
                    {
                        let value = &p["patch"]["value"];
                        match p["applyTo"].as_str() {
                            Some("HTTP_FILTER") => {
                                if let Some(n) = value["name"].as_str() {
                                    filters.insert(n.to_string());
                                }
                            }
                            Some("HTTP_ROUTE" | "VIRTUAL_HOST") => {
                                for (key, cfg) in value["typed_per_filter_config"]
                                    .as_hash()
                                    .into_iter()
                                    .flatten()
                                {
                                    if cfg["@type"].as_str()
                                        == Some("type.googleapis.com/envoy.config.route.v3.FilterConfig")
                                    {
                                        if let Some(key) = key.as_str() {
                                            keys.push((key.to_string(), m.file.clone()));
                                        }
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        for (key, file) in keys {
            if !filters.contains(&key) {
                problems.push(format!(
                    "{}: the route patch in {} switches filter `{key}`, which is not a filter of \
                     this variant (its filters: {filters:?})",
                    k.file.display(),
                    file.display()
                ));
            }
        }
    }
}

fn check_wasm_plugin(doc: &Yaml, at: &str, problems: &mut Vec<String>) {
    if str_at(doc, &["spec", "failStrategy"]) != Some("FAIL_CLOSE") {
        problems.push(format!(
            "{at}: spec.failStrategy must be FAIL_CLOSE (a broken filter must not let calls through unvalidated)"
        ));
    }
    for field in ["url", "phase"] {
        if str_at(doc, &["spec", field]).is_none() {
            problems.push(format!("{at}: spec.{field} is missing"));
        }
    }
    if get(doc, &["spec", "pluginConfig"]).as_hash().is_none() {
        problems.push(format!("{at}: spec.pluginConfig is missing"));
    } else if get(doc, &["spec", "pluginConfig", "continue_headers"]).as_bool() != Some(true) {
        // WasmPlugin cannot set allow_on_headers_stop_iteration: a filter pausing in its
        // headers callback would never get the body, and every create would hang.
        problems.push(format!(
            "{at}: spec.pluginConfig.continue_headers must be true (a WasmPlugin cannot set \
             allow_on_headers_stop_iteration; without it every create hangs)"
        ));
    }
    // Keys come from the proxy's environment, never from pluginConfig text.
    let env = get(doc, &["spec", "vmConfig", "env"]).as_vec();
    if !env.is_some_and(|e| e.iter().any(|v| str_at(v, &["valueFrom"]) == Some("HOST"))) {
        problems.push(format!(
            "{at}: spec.vmConfig.env must pass at least one key from the proxy environment (valueFrom: HOST)"
        ));
    }
}

fn containers(doc: &Yaml) -> &[Yaml] {
    get(doc, &["spec", "template", "spec", "containers"])
        .as_vec()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn check_deployment(doc: &Yaml, at: &str, problems: &mut Vec<String>) {
    let cs = containers(doc);
    if cs.is_empty() {
        // A strategic-merge patch fragment (for example env for a gateway) has containers but
        // may be partial; a Deployment with no containers at all is a mistake.
        problems.push(format!("{at}: no containers"));
        return;
    }
    let is_relay = cs.iter().any(|c| str_at(c, &["name"]) == Some("relay"));
    if !is_relay {
        return;
    }
    for c in cs {
        let name = str_at(c, &["name"]).unwrap_or("?");
        let udp = c["ports"]
            .as_vec()
            .map(|ps| {
                ps.iter()
                    .filter(|p| str_at(p, &["protocol"]) == Some("UDP"))
                    .count()
            })
            .unwrap_or(0);
        if name == "relay" {
            if udp != 1 {
                problems.push(format!(
                    "{at}: container relay must expose exactly one UDP media port, has {udp}"
                ));
            }
            for probe in ["readinessProbe", "livenessProbe"] {
                if c[probe]["grpc"].is_badvalue() {
                    problems.push(format!("{at}: container relay needs a gRPC {probe}"));
                }
            }
            if c["resources"]["limits"].is_badvalue() || c["resources"]["requests"].is_badvalue() {
                problems.push(format!(
                    "{at}: container relay needs resource requests and limits"
                ));
            }
            check_drain_order(doc, c, at, problems);
            if c["securityContext"]["runAsNonRoot"].as_bool() != Some(true)
                || c["securityContext"]["allowPrivilegeEscalation"].as_bool() != Some(false)
            {
                problems.push(format!(
                    "{at}: container relay must run as non-root without privilege escalation"
                ));
            }
        }
    }
}

/// Seconds between the relay's drain and the next stage of the pod's shutdown.
pub const DRAIN_MARGIN_SECS: f64 = 5.0;

/// Seconds of a protobuf duration as Istio's ProxyConfig takes it (`40s`, `1m`, `1m30s`).
fn proxy_duration_secs(d: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut num = String::new();
    for ch in d.trim().chars() {
        if ch.is_ascii_digit() || ch == '.' {
            num.push(ch);
            continue;
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        total += n * match ch {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            _ => return None,
        };
    }
    num.is_empty().then_some(total)
}

/// The relay's `--drain-secs`: from its arguments, else RELAY_DRAIN_SECS, else the relay's
/// default (30).
fn relay_drain_secs(relay: &Yaml) -> Option<f64> {
    let args: Vec<&str> = relay["args"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(Yaml::as_str)
        .collect();
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--drain-secs=") {
            return v.parse().ok();
        }
        if *a == "--drain-secs" {
            return args.get(i + 1).and_then(|v| v.parse().ok());
        }
    }
    match relay["env"].as_vec().and_then(|env| {
        env.iter()
            .find(|e| str_at(e, &["name"]) == Some("RELAY_DRAIN_SECS"))
    }) {
        Some(e) => str_at(e, &["value"]).and_then(|v| v.parse().ok()),
        None => Some(30.0),
    }
}

/// A draining relay must stay reachable for hangups of its live calls until its drain ends:
///
/// - Istio's agent, on SIGTERM, drains the sidecar's inbound listeners gracefully (Envoy keeps
///   accepting for `drainDuration`, answering with GOAWAY / `Connection: close`) and kills
///   Envoy after `terminationDrainDuration` (default 5 s) (pkg/envoy/agent.go, Istio 1.30).
///   So: drain + margin <= terminationDrainDuration <= drainDuration (both set explicitly in
///   the `proxy.istio.io/config` annotation: mesh defaults differ between installations).
/// - Kubernetes kills whatever still runs after `terminationGracePeriodSeconds`:
///   terminationDrainDuration + margin <= terminationGracePeriodSeconds.
/// - `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` is refused: the agent would stop the sidecar as soon as
///   no connection is open, which may be long before the relay's drain ends, and the next
///   hangup would then find no sidecar.
fn check_drain_order(doc: &Yaml, relay: &Yaml, at: &str, problems: &mut Vec<String>) {
    let drain = relay_drain_secs(relay);
    let template = &doc["spec"]["template"];
    let grace = template["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .map(|g| g as f64);
    let config = template["metadata"]["annotations"]["proxy.istio.io/config"]
        .as_str()
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok());
    let duration = |field: &str| {
        config
            .as_ref()
            .and_then(|c| c[field].as_str().and_then(proxy_duration_secs))
    };
    let sidecar = duration("terminationDrainDuration");
    let listeners = duration("drainDuration");
    let exit_on_zero = config.as_ref().is_some_and(|c| {
        c["proxyMetadata"]["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"].as_str() == Some("true")
    });
    if exit_on_zero {
        problems.push(format!(
            "{at}: proxyMetadata EXIT_ON_ZERO_ACTIVE_CONNECTIONS stops the sidecar when no \
             connection is open, possibly before the relay's drain ends; use \
             terminationDrainDuration"
        ));
    }
    let m = DRAIN_MARGIN_SECS;
    match (drain, sidecar, listeners, grace) {
        (Some(drain), Some(sidecar), Some(listeners), Some(grace))
            if drain + m <= sidecar && sidecar <= listeners && sidecar + m <= grace => {}
        (Some(drain), Some(sidecar), Some(listeners), Some(grace)) => problems.push(format!(
            "{at}: want the relay's drain ({drain} s) + {m} s <= the sidecar's \
             terminationDrainDuration ({sidecar} s) <= its drainDuration ({listeners} s), and \
             terminationDrainDuration + {m} s <= terminationGracePeriodSeconds ({grace} s): \
             hangups must reach a draining relay"
        )),
        _ => problems.push(format!(
            "{at}: needs a readable relay drain (--drain-secs / RELAY_DRAIN_SECS), \
             terminationDrainDuration and drainDuration in the proxy.istio.io/config annotation, \
             and terminationGracePeriodSeconds (a draining relay must stay reachable)"
        )),
    }
}

fn check_service(doc: &Yaml, at: &str, problems: &mut Vec<String>) {
    let ports = get(doc, &["spec", "ports"]).as_vec();
    let Some(ports) = ports else {
        problems.push(format!("{at}: spec.ports is missing"));
        return;
    };
    for p in ports {
        if p["port"].as_i64().is_none() {
            problems.push(format!("{at}: a port has no numeric `port`"));
        }
    }
}

fn check_kustomization(m: &Manifest, dir: &Path, all: &[Manifest], problems: &mut Vec<String>) {
    let base = m.file.parent().unwrap_or(dir);
    let listed: Vec<PathBuf> = m.doc["resources"]
        .as_vec()
        .map(|v| {
            v.iter()
                .filter_map(Yaml::as_str)
                .map(|s| base.join(s))
                .collect()
        })
        .unwrap_or_default();
    for path in &listed {
        let ok = if path.is_dir() {
            path.join("kustomization.yaml").is_file()
        } else {
            path.is_file()
        };
        if !ok {
            problems.push(format!(
                "{}: lists {}, which is neither a manifest file nor a directory with a \
                 kustomization.yaml",
                m.file.display(),
                path.display()
            ));
        }
    }
    // Every manifest file whose nearest kustomization is this one must be listed by it, so
    // `kubectl apply -k` never silently leaves a file out.
    let kustomization_dirs: Vec<&Path> = all
        .iter()
        .filter(|o| o.kind == "Kustomization")
        .filter_map(|o| o.file.parent())
        .collect();
    let files: BTreeSet<&PathBuf> = all
        .iter()
        .filter(|o| o.kind != "Kustomization")
        .map(|o| &o.file)
        .collect();
    for f in files {
        let nearest = kustomization_dirs
            .iter()
            .filter(|d| f.starts_with(d))
            .max_by_key(|d| d.components().count());
        if nearest == Some(&base) && !listed.iter().any(|l| f == l) {
            problems.push(format!(
                "{}: {} is not listed under resources",
                m.file.display(),
                f.display()
            ));
        }
    }
}

/// Builds one Envoy bootstrap that holds every Envoy fragment patched in by the EnvoyFilters
/// under `dir` (CLUSTER and HTTP_FILTER patch values, HTTP_ROUTE patch values each on a route
/// of its own, NETWORK_FILTER merges into the HTTP connection manager), plus stubs for the clusters Istio
/// provides (`sds-grpc`, clusters a remote Wasm fetch names), so that `envoy --mode validate`
/// checks those fragments against the real Envoy schema.
pub fn envoy_filter_bootstrap(dir: &Path) -> Result<Option<String>> {
    use yaml_rust2::yaml::Hash;
    let key = |s: &str| Yaml::String(s.to_string());
    let parse = |text: &str| -> Result<Yaml> {
        YamlLoader::load_from_str(text)
            .map_err(|e| anyhow!("internal bootstrap template: {e}"))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("empty bootstrap template"))
    };
    let mut clusters = Vec::new();
    let mut filters = Vec::new();
    let mut routes = Vec::new();
    let mut listeners = Vec::new();
    // NETWORK_FILTER MERGE values onto the gateway's HTTP connection managers: their
    // `typed_config` fields (e.g. `local_reply_config`) go onto the check listener's.
    let mut hcm_fields = Vec::new();
    let mut stub_names = vec!["sds-grpc".to_string()];
    for m in load(dir)?.iter().filter(|m| m.kind == "EnvoyFilter") {
        for patch in get(&m.doc, &["spec", "configPatches"])
            .as_vec()
            .into_iter()
            .flatten()
        {
            let value = patch["patch"]["value"].clone();
            if value.is_badvalue() {
                continue;
            }
            match patch["applyTo"].as_str() {
                Some("CLUSTER") => clusters.push(value),
                Some("LISTENER") => listeners.push(value),
                Some("NETWORK_FILTER") => {
                    let Yaml::Hash(tc) = &value["typed_config"] else {
                        bail!(
                            "EnvoyFilter {} ({}): a NETWORK_FILTER patch without typed_config",
                            m.name,
                            m.file.display()
                        );
                    };
                    for (k, v) in tc {
                        if k.as_str() != Some("@type") {
                            hcm_fields.push((k.clone(), v.clone()));
                        }
                    }
                }
                // A route patch (MERGE onto a route Istio generates) goes onto a route of its
                // own, next to the filters it names.
                Some("HTTP_ROUTE") => {
                    let mut route = value;
                    if let Yaml::Hash(h) = &mut route {
                        let n = routes.len();
                        h.insert(key("match"), parse(&format!("{{path: /route-patch-{n}}}"))?);
                        if !h.contains_key(&key("route"))
                            && !h.contains_key(&key("direct_response"))
                        {
                            h.insert(key("direct_response"), parse("{status: 404}")?);
                        }
                    }
                    routes.push(route);
                }
                Some("HTTP_FILTER") => {
                    if let Some(c) = get(
                        &value,
                        &[
                            "typed_config",
                            "config",
                            "vm_config",
                            "code",
                            "remote",
                            "http_uri",
                            "cluster",
                        ],
                    )
                    .as_str()
                    {
                        stub_names.push(c.to_string());
                    }
                    filters.push(value);
                }
                other => bail!(
                    "EnvoyFilter {} ({}): a patch with applyTo {other:?} is not run through \
                     `envoy --mode validate`; teach manifests::envoy_filter_bootstrap where it goes",
                    m.name,
                    m.file.display()
                ),
            }
        }
    }
    if clusters.is_empty()
        && filters.is_empty()
        && routes.is_empty()
        && listeners.is_empty()
        && hcm_fields.is_empty()
    {
        return Ok(None);
    }
    for name in stub_names {
        let mut stub = parse(
            "type: STATIC\nload_assignment: {endpoints: [{lb_endpoints: [{endpoint: {address: \
             {socket_address: {address: 127.0.0.1, port_value: 9}}}}]}]}\n\
             typed_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    \
             '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n    \
             explicit_http_config: {http2_protocol_options: {}}\n",
        )?;
        if let Yaml::Hash(h) = &mut stub {
            h.insert(key("name"), key(&name));
            if let Some(Yaml::Hash(la)) = h.get_mut(&key("load_assignment")) {
                la.insert(key("cluster_name"), key(&name));
            }
        }
        clusters.push(stub);
    }
    filters.push(parse(
        "name: envoy.filters.http.router\ntyped_config: {'@type': \
         type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}\n",
    )?);
    let mut hcm = parse(
        "name: envoy.filters.network.http_connection_manager\ntyped_config:\n  '@type': \
         type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n  \
         stat_prefix: check\n  route_config: {virtual_hosts: [{name: all, domains: ['*'], routes: \
         [{match: {prefix: /}, direct_response: {status: 404}}]}]}\n",
    )?;
    if let Yaml::Hash(h) = &mut hcm {
        if let Some(Yaml::Hash(tc)) = h.get_mut(&key("typed_config")) {
            tc.insert(key("http_filters"), Yaml::Array(filters));
            for (k, v) in hcm_fields {
                tc.insert(k, v);
            }
            if let Some(Yaml::Hash(rc)) = tc.get_mut(&key("route_config")) {
                if let Some(Yaml::Array(vhs)) = rc.get_mut(&key("virtual_hosts")) {
                    if let Some(Yaml::Hash(vh)) = vhs.first_mut() {
                        if let Some(Yaml::Array(rs)) = vh.get_mut(&key("routes")) {
                            routes.append(rs);
                            *rs = routes;
                        }
                    }
                }
            }
        }
    }
    let mut listener =
        parse("name: check\naddress: {socket_address: {address: 127.0.0.1, port_value: 1}}\n")?;
    if let Yaml::Hash(h) = &mut listener {
        let mut chain = Hash::new();
        chain.insert(key("filters"), Yaml::Array(vec![hcm]));
        h.insert(key("filter_chains"), Yaml::Array(vec![Yaml::Hash(chain)]));
    }
    // Internal listeners need Envoy's bootstrap extension, which Istio's proxy bootstrap
    // always has (tools/packaging/common/envoy_bootstrap.json, since Istio 1.17).
    let internal = listeners
        .iter()
        .any(|l| !l["internal_listener"].is_badvalue());
    listeners.insert(0, listener);
    let mut resources = Hash::new();
    resources.insert(key("listeners"), Yaml::Array(listeners));
    resources.insert(key("clusters"), Yaml::Array(clusters));
    let mut node = Hash::new();
    node.insert(key("id"), key("check"));
    node.insert(key("cluster"), key("check"));
    let mut root = Hash::new();
    root.insert(key("node"), Yaml::Hash(node));
    root.insert(key("static_resources"), Yaml::Hash(resources));
    if internal {
        root.insert(
            key("bootstrap_extensions"),
            parse(
                "- name: envoy.bootstrap.internal_listener\n  typed_config: {'@type': \
                 type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener}\n",
            )?,
        );
    }
    let mut out = String::new();
    yaml_rust2::YamlEmitter::new(&mut out)
        .dump(&Yaml::Hash(root))
        .map_err(|e| anyhow!("emitting the check bootstrap: {e}"))?;
    Ok(Some(out))
}

/// What the deploy/ checks' tests share: the manifests of one variant, and a copy of the
/// manifests with some of them edited (a drift the checks must refuse).
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// The manifests of the variant built from `kustomization` (a path under deploy/).
    pub fn in_variant<'a>(
        all: &'a [Manifest],
        paths: &crate::paths::Paths,
        kustomization: &str,
    ) -> Vec<&'a Manifest> {
        let files = variant_files(&paths.deploy_dir().join(kustomization));
        all.iter()
            .filter(|m| m.file.canonicalize().is_ok_and(|f| files.contains(&f)))
            .collect()
    }

    /// `all`, with `from` replaced by `to` in the text of the manifests `pick` selects.
    pub fn drifted(
        all: &[Manifest],
        pick: impl Fn(&Manifest) -> bool,
        from: &str,
        to: &str,
    ) -> Vec<Manifest> {
        let mut out = all.to_vec();
        for m in out.iter_mut().filter(|m| pick(m)) {
            let text = std::fs::read_to_string(&m.file).unwrap().replace(from, to);
            m.doc = YamlLoader::load_from_str(&text).unwrap().remove(0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plugin configurations shipped in deploy/ are accepted by the filter's own parser
    /// (so Envoy/Istio would not reject them at load), and admit no anonymous caller.
    #[test]
    fn shipped_plugin_configs_are_accepted_by_the_filter() {
        let paths = crate::paths::Paths::discover();
        // Keys are variables of the VM environment; the relay-pods key must be long enough.
        let env = |name: &str| {
            Some(match name {
                "RELAY_REPLICA_KEY" => crate::stack::LOCAL_REPLICA_KEY.to_string(),
                _ => "sk-test".to_string(),
            })
        };
        let mut checked = 0;
        for m in load(&paths.deploy_dir()).unwrap() {
            let json = match m.kind.as_str() {
                "WasmPlugin" => to_json(&m.doc["spec"]["pluginConfig"]).to_string(),
                "EnvoyFilter" => {
                    let Some(patches) = m.doc["spec"]["configPatches"].as_vec() else {
                        continue;
                    };
                    let Some(text) = patches.iter().find_map(|p| {
                        p["patch"]["value"]["typed_config"]["config"]["configuration"]["value"]
                            .as_str()
                    }) else {
                        continue;
                    };
                    text.to_string()
                }
                _ => continue,
            };
            let parsed = realtime_filter_core::config::Config::from_json(json.as_bytes(), &env);
            match parsed {
                // deploy/ admits authenticated callers only (docs/operations.md "Securing
                // the gateway"): no pool may lend its key to anonymous callers.
                Ok(cfg) => assert!(
                    !cfg.admits_anonymous(),
                    "{} {}: a pool admits anonymous callers",
                    m.kind,
                    m.name
                ),
                Err(e) => panic!("{} {}: plugin config refused: {e:?}", m.kind, m.name),
            }
            checked += 1;
        }
        assert_eq!(
            checked, 3,
            "expected the two WasmPlugin configs (deploy/, deploy/replicas/) and the inline \
             EnvoyFilter config"
        );
    }

    #[test]
    fn envoy_filter_fragments_form_a_bootstrap() {
        let paths = crate::paths::Paths::discover();
        let text = envoy_filter_bootstrap(&paths.deploy_dir())
            .unwrap()
            .unwrap();
        let doc = &YamlLoader::load_from_str(&text).unwrap()[0];
        let clusters = doc["static_resources"]["clusters"].as_vec().unwrap();
        assert!(clusters
            .iter()
            .any(|c| c["name"].as_str() == Some("realtime_relay")));
        assert!(clusters
            .iter()
            .any(|c| c["name"].as_str() == Some("sds-grpc")));
        for name in ["realtime_relay_pods", "realtime_hold"] {
            assert!(
                clusters.iter().any(|c| c["name"].as_str() == Some(name)),
                "{name}"
            );
        }
        let listeners = doc["static_resources"]["listeners"].as_vec().unwrap();
        assert!(
            listeners
                .iter()
                .any(|l| l["name"].as_str() == Some("realtime_hold")
                    && !l["internal_listener"].is_badvalue()),
            "the hold's internal listener is in the checked bootstrap"
        );
        assert!(
            !doc["bootstrap_extensions"].is_badvalue(),
            "internal listeners need the bootstrap extension Istio's bootstrap has"
        );
        let routes = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
            .as_vec()
            .unwrap();
        assert!(
            routes
                .iter()
                .filter(|r| !r["typed_per_filter_config"].is_badvalue())
                .count()
                >= 2,
            "the HTTP_ROUTE patches of both variants are on routes"
        );
        // the NETWORK_FILTER merge (deploy/istio/local-replies) is on the checked HCM
        let tc = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        assert!(
            tc["local_reply_config"]["mappers"]
                .as_vec()
                .is_some_and(|m| m.len() >= 10),
            "the local-reply mappers are validated by Envoy"
        );
    }

    /// Every route patch names the filter of its own variant (the WasmPlugin's
    /// `<namespace>.<name>` or the inline filter's name), and a wrong key is refused.
    #[test]
    fn route_patches_name_their_variants_filter() {
        let paths = crate::paths::Paths::discover();
        let manifests = load(&paths.deploy_dir()).unwrap();
        let mut problems = Vec::new();
        check_route_filter_names(&manifests, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let mut wrong = manifests.clone();
        for m in wrong.iter_mut().filter(|m| m.kind == "WasmPlugin") {
            m.name = format!("{}-renamed", m.name);
        }
        check_route_filter_names(&wrong, &mut problems);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("istio-system.realtime-gateway")),
            "{problems:?}"
        );
    }

    #[test]
    fn deploy_manifests_parse_and_have_the_expected_kinds() {
        let paths = crate::paths::Paths::discover();
        let report = check_dir(&paths.deploy_dir()).unwrap();
        for kind in REQUIRED {
            assert!(report.kinds.contains_key(*kind), "{kind} missing: {report}");
        }
    }

    fn check_text(text: &str) -> Result<Report> {
        let dir = std::env::temp_dir().join(format!(
            "xtask-manifests-{}-{}",
            std::process::id(),
            text.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.yaml"), text).unwrap();
        let r = check_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn fail_open_wasm_plugin_is_refused() {
        let err = check_text(concat!(
            "apiVersion: extensions.istio.io/v1alpha1\n",
            "kind: WasmPlugin\n",
            "metadata: {name: f}\n",
            "spec:\n",
            "  url: oci://x\n",
            "  phase: AUTHZ\n",
            "  failStrategy: FAIL_OPEN\n",
            "  pluginConfig: {a: 1}\n",
            "  vmConfig: {env: [{name: K, valueFrom: HOST}]}\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("FAIL_CLOSE"), "{err}");
    }

    #[test]
    fn a_sidecar_that_stops_before_the_relay_drains_is_refused() {
        let doc = |drain: &str, sidecar: &str, listeners: &str, grace: u32, extra: &str| {
            let text = format!(
                "spec:\n  template:\n    metadata:\n      annotations:\n        proxy.istio.io/config: '{{\"terminationDrainDuration\": \"{sidecar}\", \"drainDuration\": \"{listeners}\"{extra}}}'\n    spec:\n      terminationGracePeriodSeconds: {grace}\n      containers: [{{name: relay, env: [{{name: RELAY_DRAIN_SECS, value: \"{drain}\"}}]}}]\n"
            );
            YamlLoader::load_from_str(&text).unwrap().remove(0)
        };
        let check = |d: &Yaml| {
            let mut problems = Vec::new();
            check_drain_order(d, &containers(d)[0], "d", &mut problems);
            problems
        };
        assert!(check(&doc("30", "40s", "45s", 45, "")).is_empty());
        assert!(check(&doc("30", "35s", "1m", 40, "")).is_empty());
        for (d, why) in [
            (doc("30", "20s", "45s", 45, ""), "sidecar stops first"),
            (doc("30", "32s", "45s", 45, ""), "no margin after the drain"),
            (doc("30", "40s", "35s", 45, ""), "listeners close first"),
            (doc("30", "40s", "45s", 42, ""), "killed before the sidecar"),
            (doc("30", "soon", "45s", 45, ""), "unreadable duration"),
            (
                doc(
                    "30",
                    "40s",
                    "45s",
                    45,
                    ", \"proxyMetadata\": {\"EXIT_ON_ZERO_ACTIVE_CONNECTIONS\": \"true\"}",
                ),
                "exits on zero connections",
            ),
        ] {
            assert!(!check(&d).is_empty(), "{why}");
        }
    }

    #[test]
    fn drain_secs_come_from_args_env_or_the_default() {
        let relay = |c: &str| YamlLoader::load_from_str(c).unwrap().remove(0);
        assert_eq!(
            relay_drain_secs(&relay("{args: ['--drain-secs=12']}")),
            Some(12.0)
        );
        assert_eq!(
            relay_drain_secs(&relay("{args: ['--drain-secs', '7']}")),
            Some(7.0)
        );
        assert_eq!(
            relay_drain_secs(&relay("{env: [{name: RELAY_DRAIN_SECS, value: '20'}]}")),
            Some(20.0)
        );
        assert_eq!(relay_drain_secs(&relay("{name: relay}")), Some(30.0));
        assert_eq!(proxy_duration_secs("1m30s"), Some(90.0));
        assert_eq!(proxy_duration_secs("40"), None);
    }

    #[test]
    fn unknown_kind_and_bad_yaml_are_refused() {
        let err = check_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Pod"), "{err}");
        let err = check_text("kind: [unclosed\n").unwrap_err().to_string();
        assert!(err.contains("does not parse"), "{err}");
    }
}
