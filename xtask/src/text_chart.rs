//! Dashboard panels drawn as text: one sparkline per series (eight block heights, one
//! column per step, one scale per panel so series compare), with the latest value and the
//! largest. Enough to watch a call's life in a terminal without Grafana.

use crate::prometheus::Series;

const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Grafana's legend template with `{{label}}` filled from `labels` (missing ones empty).
pub fn legend(template: &str, labels: &[(String, String)]) -> String {
    let mut out = template.to_string();
    while let Some(start) = out.find("{{") {
        let Some(len) = out[start..].find("}}") else {
            break;
        };
        let name = out[start + 2..start + len].trim().to_string();
        let value = labels
            .iter()
            .find(|(k, _)| *k == name)
            .map_or("", |(_, v)| v.as_str());
        out.replace_range(start..start + len + 2, value);
    }
    let out = out.trim().to_string();
    if out.is_empty() {
        labels
            .iter()
            .filter(|(k, _)| k != "__name__")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        out
    }
}

/// A value with a unit, short (`1.2k`, `350µs` for seconds, `45%` for ratios).
pub fn format_value(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match unit {
        "percentunit" => format!("{:.1}%", v * 100.0),
        "s" if v < 1e-3 => format!("{:.0}µs", v * 1e6),
        "s" if v < 1.0 => format!("{:.1}ms", v * 1e3),
        "s" => format!("{v:.2}s"),
        "ms" => format!("{v:.1}ms"),
        "bytes" | "Bps" => {
            let suffix = if unit == "Bps" { "/s" } else { "" };
            let (n, u) = scale(v, 1024.0, &["B", "KiB", "MiB", "GiB"]);
            format!("{n:.1}{u}{suffix}")
        }
        _ => {
            let (n, u) = scale(v, 1000.0, &["", "k", "M", "G"]);
            let suffix = match unit {
                "reqps" => "/s",
                "pps" => " pkt/s",
                "µs" => "µs",
                _ => "",
            };
            if u.is_empty() && n.fract().abs() < 1e-9 {
                format!("{n:.0}{suffix}")
            } else {
                format!("{n:.2}{u}{suffix}")
            }
        }
    }
}

fn scale(v: f64, base: f64, units: &[&'static str]) -> (f64, &'static str) {
    let mut n = v;
    let mut i = 0;
    while n.abs() >= base && i + 1 < units.len() {
        n /= base;
        i += 1;
    }
    (n, units[i])
}

/// One line per series: `sparkline  latest (max)  legend`. `columns` bounds the width;
/// series longer than that show their last `columns` points.
pub fn render(series: &[(String, Series)], unit: &str, columns: usize) -> Vec<String> {
    let finite = |s: &Series| {
        s.points
            .iter()
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .collect::<Vec<_>>()
    };
    let all: Vec<f64> = series.iter().flat_map(|(_, s)| finite(s)).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    series
        .iter()
        .map(|(name, s)| {
            let tail = &s.points[s.points.len().saturating_sub(columns)..];
            let line: String = tail
                .iter()
                .map(|&(_, v)| {
                    if !v.is_finite() {
                        ' '
                    } else if hi <= lo {
                        BLOCKS[0]
                    } else {
                        let level = ((v - lo) / (hi - lo) * 7.0).round() as usize;
                        BLOCKS[level.min(7)]
                    }
                })
                .collect();
            let last = tail.last().map_or(f64::NAN, |p| p.1);
            let max = finite(s).into_iter().fold(f64::NAN, f64::max);
            format!(
                "  {line:<columns$}  {:>10} (max {:>9})  {name}",
                format_value(last, unit),
                format_value(max, unit)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(values: &[f64]) -> Series {
        Series {
            labels: Vec::new(),
            points: values
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, *v))
                .collect(),
        }
    }

    #[test]
    fn a_panel_shares_one_scale_and_marks_gaps() {
        let lines = render(
            &[
                ("a".into(), series(&[0.0, 1.0, 2.0, 4.0])),
                ("b".into(), series(&[4.0, f64::NAN, 2.0])),
            ],
            "",
            10,
        );
        assert!(lines[0].starts_with("  ▁▃▅█"), "{lines:?}");
        assert!(lines[1].starts_with("  █ ▅"), "{lines:?}");
        assert!(lines[0].contains(" 4 (max         4)  a"), "{lines:?}");
    }

    #[test]
    fn legends_fill_labels_and_fall_back_to_the_label_set() {
        let labels = vec![
            ("direction".to_string(), "upstream_to_client".to_string()),
            ("job".to_string(), "r".to_string()),
        ];
        assert_eq!(
            legend("RTP {{direction}}", &labels),
            "RTP upstream_to_client"
        );
        assert_eq!(legend("", &labels), "direction=upstream_to_client,job=r");
    }

    #[test]
    fn values_read_in_their_units() {
        assert_eq!(format_value(0.000_35, "s"), "350µs");
        assert_eq!(format_value(0.25, "percentunit"), "25.0%");
        assert_eq!(format_value(2048.0, "bytes"), "2.0KiB");
        assert_eq!(format_value(1500.0, "pps"), "1.50k pkt/s");
        assert_eq!(format_value(3.0, ""), "3");
        assert_eq!(format_value(f64::NAN, "s"), "-");
    }
}
