//! A real Prometheus (Debian's package, `cargo xtask setup`) scraping a local stack with the
//! shipped scrape configuration and rules (deploy/observability/prometheus/), and a small
//! client of its HTTP API. Used by `cargo xtask observe` and the observability test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::http;
use crate::paths::Paths;
use crate::process::ChildGuard;

/// The targets the shipped local configuration names (the fixed ports of `cargo xtask up`).
pub const LOCAL_RELAY_TARGET: &str = "127.0.0.1:9464";
pub const LOCAL_ENVOY_TARGET: &str = "127.0.0.1:9901";
/// The scrape and rule-evaluation interval the shipped local configuration sets.
const LOCAL_INTERVAL: &str = "scrape_interval: 5s\n  evaluation_interval: 5s";

pub fn observability_dir(paths: &Paths) -> PathBuf {
    paths.deploy_dir().join("observability")
}

pub fn prometheus_dir(paths: &Paths) -> PathBuf {
    observability_dir(paths).join("prometheus")
}

pub fn dashboard_file(paths: &Paths) -> PathBuf {
    observability_dir(paths)
        .join("grafana")
        .join("dashboards")
        .join("realtime-gateway.json")
}

/// The rule files the shipped configurations load, relative to their directory.
pub const RULE_FILES: [&str; 2] = ["rules/recording.yml", "rules/alerts.yml"];

/// What to scrape, and how often.
#[derive(Clone, Debug)]
pub struct ScrapeTargets {
    pub relay_metrics: SocketAddr,
    pub envoy_admin: SocketAddr,
    /// Scrape and rule-evaluation interval, in whole seconds (Prometheus durations).
    pub interval_secs: u32,
}

/// The shipped `prometheus-local.yml` with its targets, interval and rule paths replaced:
/// everything else (jobs, relabelling) is as shipped. Fails if the shipped file no longer
/// holds what is replaced, so the two cannot drift apart silently.
pub fn local_config(paths: &Paths, t: &ScrapeTargets) -> Result<String> {
    let dir = prometheus_dir(paths);
    let file = dir.join("prometheus-local.yml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let mut out = text.clone();
    let interval = format!(
        "scrape_interval: {0}s\n  evaluation_interval: {0}s",
        t.interval_secs
    );
    let rules: Vec<(String, String)> = RULE_FILES
        .iter()
        .map(|r| (format!("- {r}\n"), format!("- {}\n", dir.join(r).display())))
        .collect();
    let mut replacements = vec![
        (
            format!("\"{LOCAL_RELAY_TARGET}\""),
            format!("\"{}\"", t.relay_metrics),
        ),
        (
            format!("\"{LOCAL_ENVOY_TARGET}\""),
            format!("\"{}\"", t.envoy_admin),
        ),
        (LOCAL_INTERVAL.to_string(), interval),
    ];
    replacements.extend(rules);
    for (from, to) in replacements {
        if text.matches(&from).count() != 1 {
            bail!(
                "{} no longer holds `{}` exactly once: update xtask/src/prometheus.rs with it",
                file.display(),
                from.trim()
            );
        }
        out = out.replace(&from, &to);
    }
    Ok(out)
}

/// `promtool` on the shipped files: both scrape configurations (with the rule files they
/// load), the rules, and the alerts' unit tests (tests/alerts_test.yml).
pub fn promtool_checks(paths: &Paths) -> Result<String> {
    let dir = prometheus_dir(paths);
    let promtool = |args: &[&str]| -> Result<String> {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .map_err(|e| anyhow!("running promtool: {e}. Run `cargo xtask setup`."))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!(
                "`promtool {}` in {} failed:\n{text}",
                args.join(" "),
                dir.display()
            );
        }
        Ok(text)
    };
    promtool(&["check", "config", "prometheus-local.yml"])?;
    // Debian's Prometheus is built without Kubernetes service discovery, so promtool refuses
    // `kubernetes_sd_configs`: those blocks are checked here, then stood in for by static
    // targets, and promtool checks everything else of the file.
    let k8s = dir.join("prometheus.yml");
    let text =
        std::fs::read_to_string(&k8s).with_context(|| format!("reading {}", k8s.display()))?;
    let stand_in = kubernetes_sd_stood_in(&text, &dir)
        .with_context(|| format!("checking {}", k8s.display()))?;
    let scratch = paths.scratch().join("promtool");
    std::fs::create_dir_all(&scratch)?;
    let stand_in_file = scratch.join("prometheus-k8s-static.yml");
    std::fs::write(&stand_in_file, stand_in)?;
    promtool(&["check", "config", &stand_in_file.display().to_string()])?;
    let mut rule_args = vec!["check", "rules"];
    rule_args.extend(RULE_FILES);
    promtool(&rule_args)?;
    promtool(&["test", "rules", "tests/alerts_test.yml"])?;
    let rules: usize = RULE_FILES
        .iter()
        .map(|f| crate::dashboard::rules(&dir.join(f)).map(|r| r.len()))
        .sum::<Result<usize>>()?;
    let tests = std::fs::read_to_string(dir.join("tests/alerts_test.yml"))?
        .matches("alertname:")
        .count();
    Ok(format!(
        "2 scrape configs (Kubernetes discovery checked apart: Debian's promtool lacks it), \
         {rules} rules, {tests} alert evaluations in the unit tests"
    ))
}

/// Labels Prometheus's Kubernetes discovery gives pod targets: the fixed ones, and the
/// prefixes followed by a sanitized label or annotation name.
const POD_META_LABELS: [&str; 12] = [
    "__meta_kubernetes_namespace",
    "__meta_kubernetes_pod_name",
    "__meta_kubernetes_pod_ip",
    "__meta_kubernetes_pod_node_name",
    "__meta_kubernetes_pod_host_ip",
    "__meta_kubernetes_pod_uid",
    "__meta_kubernetes_pod_phase",
    "__meta_kubernetes_pod_ready",
    "__meta_kubernetes_pod_container_name",
    "__meta_kubernetes_pod_container_port_name",
    "__meta_kubernetes_pod_container_port_number",
    "__meta_kubernetes_pod_container_port_protocol",
];
const POD_META_PREFIXES: [&str; 2] = [
    "__meta_kubernetes_pod_label_",
    "__meta_kubernetes_pod_annotation_",
];

/// `text` (a scrape configuration) with each `kubernetes_sd_configs` checked (role `pod`,
/// namespaces as a list of names, every `__meta_kubernetes_*` label its relabelling reads one
/// that pod discovery sets) and replaced by a static target, and the rule files made
/// absolute (under `dir`), so Debian's promtool can check the rest.
pub fn kubernetes_sd_stood_in(text: &str, dir: &Path) -> Result<String> {
    use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};
    let mut docs = YamlLoader::load_from_str(text).map_err(|e| anyhow!("not YAML: {e}"))?;
    let Some(Yaml::Hash(root)) = docs.pop() else {
        bail!("not a YAML mapping");
    };
    let key = |k: &str| Yaml::String(k.to_string());
    let mut root = root;
    if let Some(Yaml::Array(files)) = root.get_mut(&key("rule_files")) {
        for f in files.iter_mut() {
            if let Some(name) = f.as_str() {
                *f = Yaml::String(dir.join(name).display().to_string());
            }
        }
    }
    let Some(Yaml::Array(jobs)) = root.get_mut(&key("scrape_configs")) else {
        bail!("no scrape_configs");
    };
    let mut discovered = 0;
    for job in jobs.iter_mut() {
        let Yaml::Hash(job) = job else {
            bail!("a scrape config that is not a mapping");
        };
        let name = job
            .get(&key("job_name"))
            .and_then(Yaml::as_str)
            .unwrap_or("?")
            .to_string();
        let Some(sd) = job.remove(&key("kubernetes_sd_configs")) else {
            continue;
        };
        discovered += 1;
        for c in sd.as_vec().into_iter().flatten() {
            if c["role"].as_str() != Some("pod") {
                bail!(
                    "job {name}: kubernetes_sd_configs role must be `pod` (what this check knows)"
                );
            }
            let names = c["namespaces"]["names"].as_vec();
            if names.is_none_or(|n| n.is_empty() || n.iter().any(|x| x.as_str().is_none())) {
                bail!("job {name}: kubernetes_sd_configs needs namespaces.names, a list of names");
            }
        }
        for r in job
            .get(&key("relabel_configs"))
            .and_then(Yaml::as_vec)
            .into_iter()
            .flatten()
        {
            for label in r["source_labels"].as_vec().into_iter().flatten() {
                let l = label.as_str().unwrap_or("");
                let known = !l.starts_with("__meta_kubernetes_")
                    || POD_META_LABELS.contains(&l)
                    || POD_META_PREFIXES
                        .iter()
                        .any(|p| l.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
                if !known {
                    bail!("job {name}: `{l}` is not a label Kubernetes pod discovery sets");
                }
            }
        }
        let mut target = yaml_rust2::yaml::Hash::new();
        target.insert(
            key("targets"),
            Yaml::Array(vec![key("kubernetes-sd.invalid:9090")]),
        );
        job.insert(key("static_configs"), Yaml::Array(vec![Yaml::Hash(target)]));
    }
    if discovered == 0 {
        bail!("no job uses kubernetes_sd_configs");
    }
    let mut out = String::new();
    YamlEmitter::new(&mut out)
        .dump(&Yaml::Hash(root))
        .map_err(|e| anyhow!("emitting YAML: {e}"))?;
    Ok(out)
}

/// A running Prometheus, stopped by PID when dropped.
pub struct Prometheus {
    pub process: ChildGuard,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts `prometheus` on `addr` with `config` (written into `dir`, which also holds its
    /// data and log) and waits until it is ready.
    pub fn start(config: &str, addr: SocketAddr, dir: &Path) -> Result<Prometheus> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)
            .with_context(|| format!("writing {}", config_file.display()))?;
        let data = dir.join("data");
        let _ = std::fs::remove_dir_all(&data);
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut process = ChildGuard::spawn(
            "prometheus",
            cmd,
            &dir.join("prometheus.log"),
            "Run `cargo xtask setup` (Debian's prometheus package).",
        )?;
        process.wait_ready(
            "Prometheus (/-/ready)",
            Duration::from_secs(30),
            || matches!(http::get(addr, "/-/ready"), Ok(r) if r.status == 200),
        )?;
        Ok(Prometheus { process, addr })
    }

    /// `GET path` on the API; the `data` of a `status: success` answer.
    fn api(&self, path: &str) -> Result<Value> {
        let r = http::get(self.addr, path)?;
        let v = r
            .json()
            .with_context(|| format!("Prometheus {path}: {}", r.text()))?;
        if v["status"] != "success" {
            bail!("Prometheus {path}: {v}");
        }
        Ok(v["data"].clone())
    }

    /// An instant query at `time` (Unix seconds; now if `None`): its result vector (or
    /// scalar, as one sample without labels).
    pub fn query(&self, expr: &str, time: Option<f64>) -> Result<Vec<Sample>> {
        let mut path = format!("/api/v1/query?query={}", encode(expr));
        if let Some(t) = time {
            path.push_str(&format!("&time={t:.3}"));
        }
        let data = self
            .api(&path)
            .with_context(|| format!("evaluating `{expr}`"))?;
        samples(&data)
    }

    /// A range query: one series per label set, `(time, value)` points every `step_secs`.
    pub fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step_secs: f64,
    ) -> Result<Vec<Series>> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step_secs}",
            encode(expr)
        );
        let data = self
            .api(&path)
            .with_context(|| format!("evaluating `{expr}` over a range"))?;
        let series = data["result"]
            .as_array()
            .ok_or_else(|| anyhow!("no result in {data}"))?;
        Ok(series
            .iter()
            .map(|s| Series {
                labels: labels_of(&s["metric"]),
                points: s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(point)
                    .collect(),
            })
            .collect())
    }

    /// Every metric name Prometheus holds.
    pub fn metric_names(&self) -> Result<Vec<String>> {
        let data = self.api("/api/v1/label/__name__/values")?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect())
    }

    /// The scrape targets and their health (`up`, `down`, `unknown`) by job.
    pub fn target_health(&self) -> Result<Vec<(String, String, String)>> {
        let data = self.api("/api/v1/targets?state=active")?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
                (
                    t["labels"]["job"].as_str().unwrap_or("").into(),
                    s("health"),
                    s("lastError"),
                )
            })
            .collect())
    }

    /// Rule groups as loaded: (rule name, health, last error) of every rule.
    pub fn rule_health(&self) -> Result<Vec<(String, String, String)>> {
        let data = self.api("/api/v1/rules")?;
        let mut out = Vec::new();
        for g in data["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
                out.push((s("name"), s("health"), s("lastError")));
            }
        }
        Ok(out)
    }

    /// Waits until every target has been scraped successfully at least once.
    pub fn wait_targets_up(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let targets = self.target_health()?;
            if !targets.is_empty() && targets.iter().all(|(_, h, _)| h == "up") {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!("Prometheus's targets are not all up after {timeout:?}: {targets:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One sample of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// One series of a range query.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub points: Vec<(f64, f64)>,
}

fn samples(data: &Value) -> Result<Vec<Sample>> {
    match data["resultType"].as_str() {
        Some("vector") => Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                Some(Sample {
                    labels: labels_of(&s["metric"]),
                    value: point(&s["value"])?.1,
                })
            })
            .collect()),
        Some("scalar") => Ok(point(&data["result"])
            .map(|(_, value)| Sample {
                labels: Vec::new(),
                value,
            })
            .into_iter()
            .collect()),
        other => bail!("unexpected result type {other:?} in {data}"),
    }
}

fn labels_of(metric: &Value) -> Vec<(String, String)> {
    metric
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
        .collect()
}

/// `[time, "value"]` (Prometheus sends values as strings: "NaN", "+Inf" included).
fn point(v: &Value) -> Option<(f64, f64)> {
    let t = v.get(0)?.as_f64()?;
    let x = v.get(1)?.as_str()?.parse::<f64>().ok()?;
    Some((t, x))
}

/// Percent-encoding of a query-string value (RFC 3986 unreserved characters stay).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode(r#"sum by (le) (rate(x{a=~"b|c"}[5m])) + 1"#),
            "sum%20by%20%28le%29%20%28rate%28x%7Ba%3D~%22b%7Cc%22%7D%5B5m%5D%29%29%20%2B%201"
        );
    }

    #[test]
    fn api_results_parse_with_their_special_values() {
        let data: Value = serde_json::from_str(
            r#"{"resultType":"vector","result":[
                {"metric":{"job":"r"},"value":[1.5,"NaN"]},
                {"metric":{},"value":[1.5,"+Inf"]},
                {"metric":{"a":"b"},"value":[1.5,"2.25"]}]}"#,
        )
        .unwrap();
        let s = samples(&data).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s[0].value.is_nan());
        assert_eq!(s[1].value, f64::INFINITY);
        assert_eq!(s[2].labels, vec![("a".to_string(), "b".to_string())]);
        let scalar: Value =
            serde_json::from_str(r#"{"resultType":"scalar","result":[1.5,"3"]}"#).unwrap();
        assert_eq!(samples(&scalar).unwrap()[0].value, 3.0);
    }

    #[test]
    fn the_local_config_is_the_shipped_one_with_only_targets_interval_and_rule_paths_changed() {
        let paths = Paths::discover();
        let t = ScrapeTargets {
            relay_metrics: "127.0.0.1:1111".parse().unwrap(),
            envoy_admin: "127.0.0.1:2222".parse().unwrap(),
            interval_secs: 1,
        };
        let text = local_config(&paths, &t).unwrap();
        assert!(text.contains("\"127.0.0.1:1111\"") && text.contains("\"127.0.0.1:2222\""));
        assert!(text.contains("scrape_interval: 1s"));
        for shipped in [LOCAL_RELAY_TARGET, LOCAL_ENVOY_TARGET] {
            assert!(!text.contains(&format!("\"{shipped}\"")), "{text}");
        }
        for r in RULE_FILES {
            assert!(text.contains(&prometheus_dir(&paths).join(r).display().to_string()));
        }
    }

    #[test]
    fn kubernetes_discovery_is_checked_then_stood_in_for() {
        let dir = Path::new("/d");
        let job = |sd: &str, label: &str| {
            format!(
                "rule_files: [rules/a.yml]\nscrape_configs:\n  - job_name: j\n    \
                 kubernetes_sd_configs:\n{sd}    relabel_configs:\n      - source_labels: \
                 [{label}]\n        action: keep\n"
            )
        };
        let pod = "      - role: pod\n        namespaces:\n          names: [realtime]\n";
        let out =
            kubernetes_sd_stood_in(&job(pod, "__meta_kubernetes_pod_label_app"), dir).unwrap();
        assert!(!out.contains("kubernetes_sd_configs") && out.contains("static_configs"));
        assert!(out.contains("/d/rules/a.yml"), "{out}");
        for (sd, label, why) in [
            (pod, "__meta_kubernetes_pod_lable_app", "not a label"),
            (pod, "__meta_kubernetes_pod_label_", "not a label"),
            (
                "      - role: node\n        namespaces:\n          names: [x]\n",
                "a",
                "`pod`",
            ),
            ("      - role: pod\n", "a", "namespaces.names"),
        ] {
            let err = kubernetes_sd_stood_in(&job(sd, label), dir).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    /// The filter-stat relabelling is the same in the Kubernetes and the local configuration
    /// (the local one is what the observability test proves).
    #[test]
    fn both_scrape_configs_relabel_the_filters_stats_alike() {
        let paths = Paths::discover();
        let relabel = |name: &str| {
            let text = std::fs::read_to_string(prometheus_dir(&paths).join(name)).unwrap();
            let at = text
                .find("    metric_relabel_configs:")
                .unwrap_or_else(|| panic!("{name}: no metric_relabel_configs"));
            text[at..].to_string()
        };
        assert_eq!(relabel("prometheus.yml"), relabel("prometheus-local.yml"));
    }
}
