//! The shipped Grafana dashboard and Prometheus rule files, read as data: every panel's
//! queries and every rule's expression, for `cargo xtask observe` (which draws the panels)
//! and for the observability test (which evaluates all of them against real traffic).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use yaml_rust2::YamlLoader;

/// One query of a panel.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub expr: String,
    /// Grafana's legend template (`{{label}}` placeholders).
    pub legend: String,
}

/// One panel (rows are not panels).
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub queries: Vec<Query>,
}

/// Every panel of a dashboard JSON, in order, rows' nested panels included.
pub fn panels(file: &Path) -> Result<Vec<Panel>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let dash: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let mut out = Vec::new();
    collect(&dash["panels"], &mut out)?;
    if out.is_empty() {
        bail!("{} has no panels", file.display());
    }
    Ok(out)
}

fn collect(list: &Value, out: &mut Vec<Panel>) -> Result<()> {
    for p in list.as_array().into_iter().flatten() {
        if p["type"] == "row" {
            collect(&p["panels"], out)?;
            continue;
        }
        let title = p["title"].as_str().unwrap_or("").to_string();
        let queries: Vec<Query> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| Query {
                expr: t["expr"].as_str().unwrap_or("").to_string(),
                legend: t["legendFormat"].as_str().unwrap_or("").to_string(),
            })
            .collect();
        if queries.is_empty() || queries.iter().any(|q| q.expr.trim().is_empty()) {
            bail!("panel `{title}` has a target without a query");
        }
        out.push(Panel {
            title,
            unit: p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            queries,
        });
    }
    Ok(())
}

/// Grafana's built-in range variables replaced by `window` (a Prometheus duration such as
/// `30s`), as Grafana would before sending the query. Any other `$variable` is refused: the
/// dashboard's queries use no template variables but the data source.
pub fn expand(expr: &str, window: &str) -> Result<String> {
    let out = ["$__rate_interval", "$__interval", "$__range"]
        .iter()
        .fold(expr.to_string(), |e, v| e.replace(v, window));
    if out.contains('$') {
        bail!("`{expr}` uses a template variable this tool does not know");
    }
    Ok(out)
}

/// A rule of a Prometheus rule file.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The recorded series or the alert's name.
    pub name: String,
    pub expr: String,
    pub alert: bool,
}

/// Every rule of a rule file, in order.
pub fn rules(file: &Path) -> Result<Vec<Rule>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let docs = YamlLoader::load_from_str(&text)
        .map_err(|e| anyhow!("{} is not YAML: {e}", file.display()))?;
    let mut out = Vec::new();
    for doc in &docs {
        for group in doc["groups"].as_vec().into_iter().flatten() {
            for r in group["rules"].as_vec().into_iter().flatten() {
                let (name, alert) = match (r["record"].as_str(), r["alert"].as_str()) {
                    (Some(n), None) => (n, false),
                    (None, Some(n)) => (n, true),
                    _ => bail!("{}: a rule without one `record` or `alert`", file.display()),
                };
                let expr = r["expr"]
                    .as_str()
                    .ok_or_else(|| anyhow!("{}: rule {name} has no expr", file.display()))?;
                out.push(Rule {
                    name: name.to_string(),
                    expr: expr.trim().to_string(),
                    alert,
                });
            }
        }
    }
    Ok(out)
}

/// The metric names an expression reads (not recording-rule names, which hold a colon),
/// found by their prefixes: `realtime_relay_`, `realtime_filter_`, `process_`, `envoy_`, and
/// `up`. Names inside a `__name__=~"a|b"` matcher count too.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_name_char(bytes[i - 1]);
        if starts_word && (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
            let end = (i..bytes.len())
                .find(|&j| !is_name_char(bytes[j]))
                .unwrap_or(bytes.len());
            let word = &expr[i..end];
            let named = ["realtime_relay_", "realtime_filter_", "process_", "envoy_"]
                .iter()
                .any(|p| word.starts_with(p))
                || (word == "up" && bytes.get(end) == Some(&b'{'));
            let is_rule = bytes.get(end) == Some(&b':');
            if named && !is_rule && !out.iter().any(|w| w == word) {
                out.push(word.to_string());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::Paths;

    #[test]
    fn names_are_found_in_selectors_regex_matchers_and_not_in_rule_names_or_labels() {
        let e = r#"sum by (job) (rate({__name__=~"realtime_relay_dropped_total|realtime_relay_dc_messages_total"}[5m]))
                   / realtime:relay_x:rate5m + process_cpu_seconds_total{job="realtime-relay"}
                   and up{job="x"} and on(up) realtime_filter_errors{code="relay_unavailable"}"#;
        assert_eq!(
            metric_names(e),
            [
                "realtime_relay_dropped_total",
                "realtime_relay_dc_messages_total",
                "process_cpu_seconds_total",
                "up",
                "realtime_filter_errors"
            ]
        );
    }

    #[test]
    fn grafana_range_variables_are_expanded_and_others_refused() {
        assert_eq!(
            expand("rate(x[$__rate_interval])", "30s").unwrap(),
            "rate(x[30s])"
        );
        assert!(expand("rate(x{pod=\"$pod\"}[1m])", "30s").is_err());
    }

    #[test]
    fn the_shipped_dashboard_and_rules_read_whole() {
        let paths = Paths::discover();
        let panels = panels(&crate::prometheus::dashboard_file(&paths)).unwrap();
        assert!(panels.len() >= 20, "{}", panels.len());
        for p in &panels {
            for q in &p.queries {
                expand(&q.expr, "1m").unwrap();
                assert!(!metric_names(&q.expr).is_empty() || q.expr.contains("realtime:"));
            }
        }
        let dir = crate::prometheus::prometheus_dir(&paths);
        let recording = rules(&dir.join("rules/recording.yml")).unwrap();
        let alerts = rules(&dir.join("rules/alerts.yml")).unwrap();
        assert!(recording
            .iter()
            .all(|r| !r.alert && r.name.starts_with("realtime:")));
        assert!(alerts.iter().all(|r| r.alert) && alerts.len() >= 10);
    }
}
