//! Schema validation of `deploy/`: every variant (a kustomization no other one lists) is
//! rendered, with `kubectl kustomize` when kubectl is on the PATH and otherwise by following
//! `resources:` the way [`crate::manifests`] does (the trees use nothing but `resources`, so
//! both give the same objects; with kubectl both are computed and must agree). Every rendered
//! object is then validated by `validate_manifests.py` in the project venv: Kubernetes objects
//! against the Kubernetes schemas of [`KUBERNETES_SCHEMA_VERSION`] with the PyPI package
//! `kubernetes-validate` (strict: unknown fields are errors), Istio objects against the
//! openAPIV3Schema of Istio's CRDs vendored in `deploy/schemas/istio/` (Istio
//! [`ISTIO_VERSION`], see the README there). A problem is one line naming the file, the object
//! and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use yaml_rust2::{Yaml, YamlLoader};

use crate::manifests::{self, to_json};
use crate::paths::Paths;

/// Kubernetes version whose schemas the objects are checked against.
pub const KUBERNETES_SCHEMA_VERSION: &str = "1.33.0";
/// Istio release the vendored CRD schemas come from (deploy/schemas/istio/README.md).
pub const ISTIO_VERSION: &str = "1.30.3";

const SCRIPT: &str = include_str!("validate_manifests.py");

/// (kind, namespace, name) of an object.
type Key = (String, String, String);

fn key_of(doc: &Yaml) -> Key {
    let s = |v: &Yaml| v.as_str().unwrap_or("").to_string();
    (
        s(&doc["kind"]),
        s(&doc["metadata"]["namespace"]),
        s(&doc["metadata"]["name"]),
    )
}

/// `kubectl version --client` first line, if kubectl runs.
pub fn kubectl() -> Option<String> {
    let out = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or("kubectl").trim().to_string())
}

fn kubectl_kustomize(dir: &Path) -> Result<Vec<Yaml>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .with_context(|| format!("running kubectl kustomize {}", dir.display()))?;
    if !out.status.success() {
        bail!(
            "`kubectl kustomize {}` failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(YamlLoader::load_from_str(&text)
        .map_err(|e| anyhow!("kubectl kustomize {} printed bad YAML: {e}", dir.display()))?
        .into_iter()
        .filter(|d| !d.is_null())
        .collect())
}

/// One object to validate, with the file it comes from.
#[derive(Debug, Clone)]
pub struct Object {
    pub file: PathBuf,
    pub doc: Yaml,
}

/// The objects of every variant under `dir`, each once, with the file it comes from, and how
/// they were rendered. Problems (a variant kustomize refuses, kustomize and xtask disagreeing)
/// go to `problems`.
pub fn render(dir: &Path, problems: &mut Vec<String>) -> Result<(Vec<Object>, String)> {
    // Kinds and apiVersions are deliberately not checked here (manifests::load does): a wrong
    // apiVersion must reach the schema validator, which says what is wrong with it.
    let mut kustomizations = Vec::new();
    let mut by_file: BTreeMap<PathBuf, Vec<Yaml>> = BTreeMap::new();
    for file in manifests::yaml_files_under(dir)? {
        let docs = manifests::docs_of(&file)?;
        if docs
            .iter()
            .any(|d| d["kind"].as_str() == Some("Kustomization"))
        {
            for doc in docs {
                kustomizations.push(manifests::Manifest {
                    file: file.clone(),
                    kind: "Kustomization".into(),
                    name: "kustomization".into(),
                    doc,
                });
            }
        } else {
            by_file.insert(file.canonicalize()?, docs);
        }
    }
    let kubectl = kubectl();
    let how = match &kubectl {
        Some(v) => format!("rendered with kubectl kustomize ({v})"),
        None => "kubectl not found: resources resolved by xtask".to_string(),
    };
    let mut out: BTreeMap<(PathBuf, Key), Yaml> = BTreeMap::new();
    for variant in manifests::variants(&kustomizations) {
        let vdir = variant.file.parent().unwrap_or(dir);
        let mut own: BTreeMap<Key, (PathBuf, Yaml)> = BTreeMap::new();
        for file in manifests::variant_files(&variant.file) {
            for doc in by_file.get(&file).into_iter().flatten() {
                own.insert(key_of(doc), (file.clone(), doc.clone()));
            }
        }
        let rendered = match kubectl {
            Some(_) => match kubectl_kustomize(vdir) {
                Ok(docs) => docs,
                Err(e) => {
                    problems.push(format!("{e:#}"));
                    continue;
                }
            },
            None => own.values().map(|(_, d)| d.clone()).collect(),
        };
        let mut seen = BTreeSet::new();
        for doc in rendered {
            let key = key_of(&doc);
            match own.get(&key) {
                Some((file, _)) => {
                    out.insert((file.clone(), key.clone()), doc);
                }
                None => problems.push(format!(
                    "{}: kustomize renders {} {}/{}, which no file the kustomization lists holds",
                    variant.file.display(),
                    key.0,
                    key.1,
                    key.2
                )),
            }
            seen.insert(key);
        }
        for (key, (file, _)) in &own {
            if !seen.contains(key) {
                problems.push(format!(
                    "{}: {} {}/{} of {} is missing from the rendered variant",
                    variant.file.display(),
                    key.0,
                    key.1,
                    key.2,
                    file.display()
                ));
            }
        }
    }
    Ok((
        out.into_iter()
            .map(|((file, _), doc)| Object { file, doc })
            .collect(),
        how,
    ))
}

/// Runs the schema validator over `objects`; the error holds one line per problem.
pub fn validate_objects(paths: &Paths, objects: &[Object]) -> Result<String> {
    let python = paths.venv_python();
    if !python.exists() {
        bail!(
            "{} is missing: run `cargo xtask setup` (it installs kubernetes-validate)",
            python.display()
        );
    }
    let scratch = paths.scratch();
    std::fs::create_dir_all(&scratch)?;
    let script = scratch.join("validate_manifests.py");
    std::fs::write(&script, SCRIPT)?;
    let rel = |f: &Path| -> String {
        let f = f.canonicalize().unwrap_or_else(|_| f.to_path_buf());
        let root = paths
            .root
            .canonicalize()
            .unwrap_or_else(|_| paths.root.clone());
        f.strip_prefix(&root)
            .map(Path::to_path_buf)
            .unwrap_or(f)
            .display()
            .to_string()
    };
    let input = serde_json::json!({
        "kubernetes_version": KUBERNETES_SCHEMA_VERSION,
        "istio_schema_dir": paths.istio_schemas(),
        "objects": objects.iter().map(|o| serde_json::json!({
            "file": rel(&o.file),
            "object": to_json(&o.doc),
        })).collect::<Vec<_>>(),
    });
    // Unique per call: tests validate several trees at once in one process.
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let data = scratch.join(format!(
        "manifest-objects-{}-{seq}.json",
        std::process::id()
    ));
    std::fs::write(&data, serde_json::to_vec(&input)?)?;
    let out = Command::new(&python)
        .arg(&script)
        .arg(&data)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let _ = std::fs::remove_file(&data);
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => Ok(stdout),
        Some(1) if !stdout.is_empty() => bail!("{stdout}"),
        _ => bail!(
            "the schema validator did not run ({}): {stderr}\nRun `cargo xtask setup` (it \
             installs kubernetes-validate into .venv).",
            out.status
        ),
    }
}

/// Renders every variant under `dir` and validates every object; the error lists every
/// problem, one per line.
pub fn validate_dir(paths: &Paths, dir: &Path) -> Result<String> {
    let mut problems = Vec::new();
    let (objects, how) = render(dir, &mut problems)?;
    let verdict = validate_objects(paths, &objects);
    match verdict {
        Ok(summary) if problems.is_empty() => Ok(format!("{summary}; {how}")),
        Ok(_) => bail!("{}", problems.join("\n")),
        Err(e) => {
            problems.push(format!("{e:#}"));
            bail!("{}", problems.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths_with_validator() -> Paths {
        let paths = Paths::discover();
        assert!(
            crate::setup::manifest_validators_installed(&paths),
            "kubernetes-validate is not in .venv: run `cargo xtask setup` first"
        );
        paths
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-schemas-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The shipped trees are valid: every object of every variant, against the Kubernetes
    /// and Istio schemas.
    #[test]
    fn shipped_manifests_pass_the_kubernetes_and_istio_schemas() {
        let paths = paths_with_validator();
        let summary = validate_dir(&paths, &paths.deploy_dir()).unwrap();
        assert!(summary.contains("Istio objects valid"), "{summary}");
    }

    /// A field of the wrong type, an unknown field and an apiVersion that does not serve the
    /// kind each fail, with a line naming the file, the object and the field.
    #[test]
    fn wrong_manifests_are_refused_naming_file_object_and_field() {
        let paths = paths_with_validator();
        let dir = scratch_dir("bad");
        std::fs::write(
            dir.join("kustomization.yaml"),
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: \
             [deployment.yaml, wasmplugin.yaml, service.yaml, envoyfilter.yaml, \
             networkpolicy.yaml]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("deployment.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: relay, namespace: rt}\n\
             spec:\n  replicas: two\n  selector: {matchLabels: {a: b}}\n  template:\n    \
             metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: relay, image: x}]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("wasmplugin.yaml"),
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: gw, \
             namespace: istio-system}\nspec:\n  url: oci://x\n  failStrategy: FAIL_CLOSE\n  \
             vmConfig:\n    env: [{name: K, valueFrom: HOST, fromSecret: k}]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("service.yaml"),
            "apiVersion: v2\nkind: Service\nmetadata: {name: svc, namespace: rt}\nspec: \
             {ports: [{port: 1}]}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("envoyfilter.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: ef, \
             namespace: istio-system}\nspec: {configPatches: []}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("networkpolicy.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, \
             namespace: rt}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 1, \
             protocl: TCP}]}]\n",
        )
        .unwrap();
        let err = validate_dir(&paths, &dir).unwrap_err().to_string();
        eprintln!("{err}");
        let _ = std::fs::remove_dir_all(&dir);
        for (file, object, field) in [
            ("deployment.yaml", "Deployment rt/relay", "spec.replicas"),
            (
                "wasmplugin.yaml",
                "WasmPlugin istio-system/gw",
                "spec.vmConfig.env[0]",
            ),
            ("service.yaml", "Service rt/svc", "apiVersion"),
            (
                "envoyfilter.yaml",
                "EnvoyFilter istio-system/ef",
                "apiVersion",
            ),
        ] {
            assert!(
                err.lines().any(|l| l.contains(file)
                    && l.contains(object)
                    && l.contains(&format!(": {field}: "))),
                "no line names {file}, {object} and {field}:\n{err}"
            );
        }
        assert!(err.contains("fromSecret"), "{err}");
        assert!(err.contains("protocl"), "{err}");
    }
}
