//! The metric names the documentation promises (`realtime_relay_*`, `realtime_filter_*`,
//! `process_*` in backticks), expanded from the docs' shorthand, and matched against the
//! names really exported: the observability test fails when a metric is renamed in code but
//! not in the docs, or documented but never exported.
//!
//! Shorthand: `a_{x,y}_total` is two names; a brace group at the end after a letter or digit
//! (`x_total{reason}`, `x{worker,name}`, `x{reason="y"}`) is a label set, not part of the
//! name; `<id>` and `*` stand for any non-empty text.

const PREFIXES: [&str; 3] = ["realtime_relay_", "realtime_filter_", "process_"];

/// Every name pattern in backticks in `markdown`, expanded.
pub fn documented(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, span) in markdown.split('`').enumerate() {
        // Odd pieces are inside backticks.
        if i % 2 == 0 {
            continue;
        }
        for token in span.split_whitespace() {
            let token = token.trim_end_matches(['.', ',', ';', ':', ')']);
            // `realtime_filter_core::...` is a Rust path, not a metric.
            if PREFIXES.iter().any(|p| token.starts_with(p)) && !token.contains("::") {
                for name in expand(strip_labels(token)) {
                    if !out.contains(&name) {
                        out.push(name);
                    }
                }
            }
        }
    }
    out
}

/// `token` without a trailing label set.
fn strip_labels(token: &str) -> &str {
    if let Some(open) = token.rfind('{') {
        let close_at_end = token.ends_with('}');
        let after_name = token[..open]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        let inner = &token[open + 1..token.len().saturating_sub(1)];
        let labels = inner.contains('=')
            || (!inner.is_empty()
                && inner.split(',').all(|l| {
                    !l.is_empty()
                        && !l.starts_with('_')
                        && l.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }));
        if close_at_end && after_name && labels {
            return &token[..open];
        }
    }
    token
}

/// Brace alternatives expanded (left to right, nested groups not used by the docs).
fn expand(token: &str) -> Vec<String> {
    let Some(open) = token.find('{') else {
        return vec![token.to_string()];
    };
    let Some(len) = token[open..].find('}') else {
        return vec![token.to_string()];
    };
    let (head, alts, tail) = (
        &token[..open],
        &token[open + 1..open + len],
        &token[open + len + 1..],
    );
    alts.split(',')
        .flat_map(|alt| expand(&format!("{head}{alt}{tail}")))
        .collect()
}

/// Whether `pattern` (with `<...>` and `*` as wildcards for non-empty text) names `name`, or
/// `name` is one of its histogram's series (`_bucket`, `_sum`, `_count`).
pub fn matches(pattern: &str, name: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s));
    glob(pattern, name) || base.is_some_and(|b| glob(pattern, b))
}

fn glob(pattern: &str, name: &str) -> bool {
    // Literal pieces between wildcards, each wildcard at least one character.
    let mut pieces = Vec::new();
    let mut rest = pattern;
    while let Some(i) = rest.find(['<', '*']) {
        pieces.push(&rest[..i]);
        rest = if rest[i..].starts_with('<') {
            rest[i..].find('>').map_or("", |j| &rest[i + j + 1..])
        } else {
            &rest[i + 1..]
        };
    }
    pieces.push(rest);
    if pieces.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if !name.starts_with(first) || !name.ends_with(last) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut at = first.len();
    let end = name.len() - last.len();
    for piece in &pieces[1..pieces.len() - 1] {
        match name[at + 1..end].find(piece) {
            Some(i) => at = at + 1 + i + piece.len(),
            None => return false,
        }
    }
    at < end
}

/// Metric names in a Prometheus text exposition.
pub fn exported(exposition: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        if !name.is_empty() && !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_docs_shorthand_expands_to_names() {
        let md = "a `realtime_relay_{rtp_packets,dropped}_total{direction}` and \
                  `realtime_filter_load_refresh{,_failed}`, `realtime_relay_calls_ended_total{reason}`,\
                  `realtime_relay_rate_limit_remaining{worker,name}`, \
                  `realtime_filter_replica_<id>_{creates,failovers}` and \
                  `realtime_relay_x_total{reason=\"y\"}`; not `other_metric` nor `--flag`.";
        assert_eq!(
            documented(md),
            [
                "realtime_relay_rtp_packets_total",
                "realtime_relay_dropped_total",
                "realtime_filter_load_refresh",
                "realtime_filter_load_refresh_failed",
                "realtime_relay_calls_ended_total",
                "realtime_relay_rate_limit_remaining",
                "realtime_filter_replica_<id>_creates",
                "realtime_filter_replica_<id>_failovers",
                "realtime_relay_x_total",
            ]
        );
    }

    #[test]
    fn wildcards_and_histograms_match_and_near_misses_do_not() {
        assert!(matches(
            "realtime_filter_worker_<id>_setups_ok",
            "realtime_filter_worker_w_1_setups_ok"
        ));
        assert!(!matches(
            "realtime_filter_worker_<id>_setups_ok",
            "realtime_filter_worker__setups_ok"
        ));
        assert!(matches(
            "realtime_relay_media_tcp_*",
            "realtime_relay_media_tcp_connections_active"
        ));
        assert!(matches(
            "realtime_relay_setup_duration_seconds",
            "realtime_relay_setup_duration_seconds_bucket"
        ));
        assert!(!matches(
            "realtime_relay_calls_created_total",
            "realtime_relay_calls_created"
        ));
        assert_eq!(
            exported("# TYPE a counter\na_total{x=\"1\"} 2\na_total{x=\"2\"} 3\nb 1\n"),
            ["a_total", "b"]
        );
    }
}
