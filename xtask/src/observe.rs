//! `cargo xtask observe`: a real Prometheus scraping a running `cargo xtask up` with the
//! shipped local configuration and rules, and the shipped Grafana dashboard's panels drawn
//! as text charts in the terminal, so a person sees a call's life without Grafana.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::dashboard::{self, Panel};
use crate::paths::Paths;
use crate::ports::check_tcp_free;
use crate::prometheus::{self, Prometheus, ScrapeTargets};
use crate::text_chart;

#[derive(Clone, Debug)]
pub struct ObserveOptions {
    pub targets: ScrapeTargets,
    /// Where Prometheus listens (its UI and API stay available while observe runs).
    pub listen: SocketAddr,
    /// Seconds of history each chart shows.
    pub window_secs: u32,
    /// Redraw period.
    pub every_secs: u32,
    /// Draw once after this many seconds, then stop (for scripts); `None` redraws until
    /// Ctrl-C.
    pub once_after_secs: Option<u32>,
}

/// Grafana's `$__rate_interval` for a scrape interval: four scrapes, at least 20 s.
pub fn rate_window(interval_secs: u32) -> String {
    format!("{}s", (interval_secs * 4).max(20))
}

/// Draws every panel of the dashboard over the last `window_secs` (one column per scrape).
pub fn draw(
    prom: &Prometheus,
    panels: &[Panel],
    interval_secs: u32,
    window_secs: u32,
) -> Result<Vec<String>> {
    let end = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs_f64();
    let start = end - f64::from(window_secs);
    let step = f64::from(interval_secs.max(1));
    let columns = (window_secs / interval_secs.max(1)) as usize + 1;
    let window = rate_window(interval_secs);
    let mut out = Vec::new();
    for panel in panels {
        out.push(format!("{}:", panel.title));
        let mut series = Vec::new();
        for q in &panel.queries {
            let expr = dashboard::expand(&q.expr, &window)?;
            for s in prom.query_range(&expr, start, end, step)? {
                series.push((text_chart::legend(&q.legend, &s.labels), s));
            }
        }
        if series.is_empty() {
            out.push("  (no data yet)".into());
        }
        // Histogram buckets in bucket order, not text order ("10.0" after "2.5").
        let le = |s: &prometheus::Series| {
            s.labels
                .iter()
                .find(|(k, _)| k == "le")
                .and_then(|(_, v)| v.parse::<f64>().ok())
        };
        if series.iter().all(|(_, s)| le(s).is_some()) {
            series.sort_by(|a, b| {
                le(&a.1)
                    .partial_cmp(&le(&b.1))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        }
        out.extend(text_chart::render(&series, &panel.unit, columns));
    }
    Ok(out)
}

pub fn observe(paths: &Paths, opts: &ObserveOptions) -> Result<()> {
    crate::setup::prometheus()?;
    if !crate::setup::prometheus_installed() {
        anyhow::bail!(
            "Prometheus is not installed: `sudo apt-get install -y --no-install-recommends \
             prometheus`, or `cargo xtask setup` as root"
        );
    }
    check_tcp_free(
        &opts.listen.ip().to_string(),
        opts.listen.port(),
        "Prometheus",
        "--port",
    )?;
    let config = prometheus::local_config(paths, &opts.targets)?;
    let dir = paths.scratch().join("observe");
    let prom = Prometheus::start(&config, opts.listen, &dir)?;
    crate::ui::line(format!(
        "Prometheus {} scrapes the relay at {} and Envoy at {} every {} s (its UI: http://{}/; \
         data and log in {})",
        prom.addr,
        opts.targets.relay_metrics,
        opts.targets.envoy_admin,
        opts.targets.interval_secs,
        prom.addr,
        dir.display()
    ));
    prom.wait_targets_up(Duration::from_secs(30)).context(
        "is the gateway running? Start it with `cargo xtask up` (same ports) in another terminal",
    )?;
    let panels = dashboard::panels(&prometheus::dashboard_file(paths))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let sleep = |secs: u32, stop: &AtomicBool| {
        for _ in 0..secs * 10 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    if let Some(secs) = opts.once_after_secs {
        sleep(secs, &stop);
        for line in draw(&prom, &panels, opts.targets.interval_secs, opts.window_secs)? {
            println!("{line}");
        }
        return Ok(());
    }
    while !stop.load(Ordering::SeqCst) {
        let frame = draw(&prom, &panels, opts.targets.interval_secs, opts.window_secs)?;
        // Clear the screen and draw from the top, like `watch`.
        print!("\x1b[2J\x1b[H");
        println!(
            "realtime gateway: last {} s, every {} s (Ctrl-C stops)\n",
            opts.window_secs, opts.every_secs
        );
        for line in frame {
            println!("{line}");
        }
        sleep(opts.every_secs, &stop);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_window_covers_four_scrapes() {
        assert_eq!(rate_window(1), "20s");
        assert_eq!(rate_window(15), "60s");
    }
}
