//! Static check of the Kubernetes and Istio manifests under `deploy/`: every file parses as
//! YAML, every document has a known `apiVersion`/`kind` and a name, the kinds the operator
//! docs promise are all there, `kustomization.yaml` lists exactly the manifest files, and a few
//! settings that matter for safety are what the docs say (fail-closed filter, one UDP media
//! port, gRPC probes, non-root containers).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use yaml_rust2::{Yaml, YamlLoader};

/// Kinds we ship, with the API versions we write them in.
const KNOWN: &[(&str, &[&str])] = &[
    ("Deployment", &["apps/v1"]),
    ("Service", &["v1"]),
    ("ServiceAccount", &["v1"]),
    ("Secret", &["v1"]),
    ("ConfigMap", &["v1"]),
    ("PodDisruptionBudget", &["policy/v1"]),
    ("NetworkPolicy", &["networking.k8s.io/v1"]),
    ("WasmPlugin", &["extensions.istio.io/v1alpha1"]),
    ("EnvoyFilter", &["networking.istio.io/v1alpha3"]),
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

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
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

/// Parses every manifest under `dir`.
pub fn load(dir: &Path) -> Result<Vec<Manifest>> {
    let mut files = Vec::new();
    yaml_files(dir, &mut files)?;
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let docs = YamlLoader::load_from_str(&text)
            .map_err(|e| anyhow!("{} does not parse as YAML: {e}", file.display()))?;
        for (i, doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
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
            "Deployment" => check_deployment(&m.doc, &at, &mut problems),
            "Service" => check_service(&m.doc, &at, &mut problems),
            "EnvoyFilter" if get(&m.doc, &["spec", "configPatches"]).as_vec().is_none() => {
                problems.push(format!("{at}: spec.configPatches is not a list"));
            }
            "Kustomization" => check_kustomization(m, dir, &manifests, &mut problems),
            _ => {}
        }
    }
    if problems.is_empty() {
        Ok(report)
    } else {
        bail!("{}", problems.join("\n"))
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
    let listed: BTreeSet<PathBuf> = m.doc["resources"]
        .as_vec()
        .map(|v| {
            v.iter()
                .filter_map(Yaml::as_str)
                .map(|s| base.join(s))
                .collect()
        })
        .unwrap_or_default();
    for path in &listed {
        if !path.exists() {
            problems.push(format!(
                "{}: lists {}, which does not exist",
                m.file.display(),
                path.display()
            ));
        }
    }
    // Every manifest file in the kustomization's directory tree is either listed or lives
    // in a directory that is listed (a nested kustomization).
    let files: BTreeSet<&PathBuf> = all
        .iter()
        .filter(|o| o.kind != "Kustomization" && o.file.starts_with(base))
        .map(|o| &o.file)
        .collect();
    for f in files {
        if !listed.iter().any(|l| f == l || f.starts_with(l)) {
            problems.push(format!(
                "{}: {} is not listed under resources",
                m.file.display(),
                f.display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = check_text(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: f}\n\
             spec: {url: 'oci://x', phase: AUTHZ, failStrategy: FAIL_OPEN, pluginConfig: {a: 1},\n\
             vmConfig: {env: [{name: K, valueFrom: HOST}]}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("FAIL_CLOSE"), "{err}");
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
