//! Whether a soak leaked: each figure after the drain against its baseline (the sample taken
//! after warm-up and its own drain), and the table that shows it. Pure: no processes here.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Figure name (`relay.fds`, `envoy.shared_data_bytes`, …) → value.
pub type Figures = BTreeMap<String, f64>;

/// The figures at one point of the run.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `start`, `baseline`, `1000`, … `drained`.
    pub label: String,
    pub at_secs: f64,
    pub figures: Figures,
}

/// Counts may grow by at most this fraction of their baseline.
pub const COUNT_TOLERANCE: f64 = 0.05;
/// Memory may grow by at most this fraction (allocators keep freed pages a while).
pub const MEMORY_TOLERANCE: f64 = 0.10;

/// How a figure is judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Open fds, sockets, table entries, tasks: within [`COUNT_TOLERANCE`] of the baseline.
    Count,
    /// RSS and heap: within [`MEMORY_TOLERANCE`].
    Memory,
    /// A table bounded by design (the ring of ended calls): at most its cap.
    Cap(f64),
}

/// Figures whose names end so are memory.
const MEMORY_SUFFIX: &str = "_mib";

pub fn rule_for(name: &str, caps: &BTreeMap<String, f64>) -> Rule {
    if let Some(cap) = caps.get(name) {
        Rule::Cap(*cap)
    } else if name.ends_with(MEMORY_SUFFIX) {
        Rule::Memory
    } else {
        Rule::Count
    }
}

/// The most a figure may be after the drain.
pub fn allowed(rule: Rule, baseline: f64) -> f64 {
    match rule {
        // Counts are whole: 5 % of 25 fds allows 26, not 27.
        Rule::Count => (baseline * (1.0 + COUNT_TOLERANCE) + 1e-9).floor(),
        Rule::Memory => baseline * (1.0 + MEMORY_TOLERANCE),
        Rule::Cap(cap) => cap,
    }
}

/// One figure's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub rule: Rule,
    pub baseline: f64,
    pub drained: Option<f64>,
    pub allowed: f64,
    pub ok: bool,
}

/// Every baseline figure judged against the drained sample. A figure missing after the
/// drain fails (a renamed metric must not pass as "no growth").
pub fn judge(baseline: &Figures, drained: &Figures, caps: &BTreeMap<String, f64>) -> Vec<Row> {
    baseline
        .iter()
        .map(|(name, &base)| {
            let rule = rule_for(name, caps);
            let allowed = allowed(rule, base);
            let drained = drained.get(name).copied();
            Row {
                name: name.clone(),
                rule,
                baseline: base,
                drained,
                allowed,
                ok: drained.is_some_and(|d| d <= allowed),
            }
        })
        .collect()
}

pub fn all_ok(rows: &[Row]) -> bool {
    rows.iter().all(|r| r.ok)
}

fn cell(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e12 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// A Markdown table: one row per figure, one column per sample, then the limit and the
/// verdict.
pub fn table(samples: &[Sample], rows: &[Row]) -> String {
    let mut out = String::from("| figure |");
    for s in samples {
        let _ = write!(out, " {} |", s.label);
    }
    out.push_str(" limit | |\n|---|");
    for _ in samples {
        out.push_str("---:|");
    }
    out.push_str("---:|---|\n");
    for row in rows {
        let _ = write!(out, "| `{}` |", row.name);
        for s in samples {
            let _ = write!(out, " {} |", cell(s.figures.get(&row.name).copied()));
        }
        let limit = match row.rule {
            Rule::Cap(_) => format!("≤ {} (cap)", cell(Some(row.allowed))),
            _ => format!("≤ {}", cell(Some(row.allowed))),
        };
        let _ = writeln!(
            out,
            " {limit} | {} |",
            if row.ok { "ok" } else { "**LEAK**" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(v: &[(&str, f64)]) -> Figures {
        v.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn counts_get_five_percent_memory_ten_and_capped_tables_their_cap() {
        let caps = figures(&[("relay.calls_ended_kept", 1000.0)]);
        let base = figures(&[
            ("relay.fds", 40.0),
            ("relay.calls_live", 0.0),
            ("relay.rss_mib", 30.0),
            ("relay.calls_ended_kept", 120.0),
        ]);
        let ok = figures(&[
            ("relay.fds", 42.0),
            ("relay.calls_live", 0.0),
            ("relay.rss_mib", 32.9),
            ("relay.calls_ended_kept", 1000.0),
        ]);
        let rows = judge(&base, &ok, &caps);
        assert!(all_ok(&rows), "{rows:?}");

        for (name, bad) in [
            ("relay.fds", 43.0),
            ("relay.calls_live", 1.0),
            ("relay.rss_mib", 33.1),
            ("relay.calls_ended_kept", 1001.0),
        ] {
            let mut leaked = ok.clone();
            leaked.insert(name.into(), bad);
            let rows = judge(&base, &leaked, &caps);
            let failed: Vec<_> = rows.iter().filter(|r| !r.ok).map(|r| &r.name).collect();
            assert_eq!(failed, vec![name], "{bad} for {name}");
        }
    }

    #[test]
    fn a_figure_missing_after_the_drain_fails() {
        let base = figures(&[("relay.call_tasks", 0.0)]);
        let rows = judge(&base, &Figures::new(), &BTreeMap::new());
        assert!(!all_ok(&rows));
    }

    #[test]
    fn the_table_has_a_column_per_sample_and_marks_leaks() {
        let base = figures(&[("relay.fds", 20.0)]);
        let samples = vec![
            Sample {
                label: "baseline".into(),
                at_secs: 0.0,
                figures: base.clone(),
            },
            Sample {
                label: "drained".into(),
                at_secs: 9.0,
                figures: figures(&[("relay.fds", 25.0)]),
            },
        ];
        let rows = judge(&base, &samples[1].figures, &BTreeMap::new());
        let t = table(&samples, &rows);
        assert!(
            t.starts_with("| figure | baseline | drained | limit | |"),
            "{t}"
        );
        assert!(
            t.contains("| `relay.fds` | 20 | 25 | ≤ 21 | **LEAK** |"),
            "{t}"
        );
    }
}
