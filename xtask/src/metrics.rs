//! Reading one metric from Prometheus or OpenMetrics text (the relay's `/metrics`, Envoy's
//! `/stats/prometheus`).

use anyhow::{bail, Result};

/// Suffixes a sample name adds to its family's name (`# TYPE x counter` has samples
/// `x_total`, histograms `x_count`, `x_sum`, `x_bucket`).
const SAMPLE_SUFFIXES: &[&str] = &["", "_total", "_count", "_sum", "_bucket", "_created"];

/// The sum of every sample called `name` (all label sets). A metric that is declared
/// (`# TYPE`) but has no sample yet, such as a labelled family nothing has touched, is 0. A
/// name that is neither declared nor sampled is an error: a misspelt or renamed metric must
/// fail the reader, not read as 0.
pub fn value(text: &str, name: &str) -> Result<f64> {
    let mut sum = 0.0;
    let mut found = false;
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let family = decl.split_whitespace().next().unwrap_or_default();
            if SAMPLE_SUFFIXES
                .iter()
                .any(|s| name.strip_suffix(s) == Some(family))
            {
                found = true;
            }
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.split_once("} ").map(|(_, v)| v)
        } else {
            rest.strip_prefix(' ')
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()) {
            found = true;
            sum += v.parse::<f64>().unwrap_or(0.0);
        }
    }
    if !found {
        bail!("no metric `{name}` in this scrape (misspelt, renamed or not registered?)");
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP realtime_relay_rtp_packets RTP packets relayed.\n\
        # TYPE realtime_relay_rtp_packets counter\n\
        realtime_relay_rtp_packets_total{direction=\"a\"} 3\n\
        realtime_relay_rtp_packets_total{direction=\"b\"} 4\n\
        realtime_relay_rtp_packets_totalx 100\n\
        # TYPE realtime_relay_setup_failures counter\n\
        # TYPE realtime_relay_calls_active gauge\n\
        realtime_relay_calls_active 2\n\
        # TYPE lat histogram\n\
        lat_bucket{le=\"1\"} 1\n\
        lat_count 5\n\
        # EOF\n";

    #[test]
    fn label_sets_are_summed() {
        assert_eq!(
            value(TEXT, "realtime_relay_rtp_packets_total").unwrap(),
            7.0
        );
        assert_eq!(value(TEXT, "realtime_relay_calls_active").unwrap(), 2.0);
        assert_eq!(value(TEXT, "lat_count").unwrap(), 5.0);
    }

    #[test]
    fn a_declared_family_without_samples_is_zero() {
        assert_eq!(
            value(TEXT, "realtime_relay_setup_failures_total").unwrap(),
            0.0
        );
    }

    #[test]
    fn a_metric_that_does_not_exist_is_an_error() {
        let err = value(TEXT, "realtime_relay_rtp_packet_total").unwrap_err();
        assert!(
            err.to_string().contains("realtime_relay_rtp_packet_total"),
            "{err}"
        );
        assert!(value(TEXT, "realtime_relay_calls").is_err());
    }
}
