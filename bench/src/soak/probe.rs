//! What a soak samples: the relay's open fds, sockets and RSS from /proc, its table sizes and
//! task counts from its `/metrics`, Envoy's RSS and heap and the filter's shared-data gauges
//! from Envoy's admin `/stats/prometheus`.

use std::collections::HashSet;

use anyhow::{Context, Result};
use xtask::metrics::value;

use super::verdict::Figures;
use crate::sys;

/// Where to read.
pub struct Probe {
    pub relay_pid: u32,
    pub relay_metrics: String,
    pub envoy_pid: u32,
    pub envoy_stats: String,
    pub http: reqwest::Client,
}

/// Socket inodes of the sockets listed in `/proc/<pid>/net/<table>` (the tables of the
/// process's network namespace; the 10th column is the inode).
fn table_inodes(pid: u32, tables: &[&str]) -> HashSet<u64> {
    let mut out = HashSet::new();
    for table in tables {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(9).and_then(|v| v.parse().ok()) {
                out.insert(inode);
            }
        }
    }
    out
}

/// (open fds, UDP sockets, TCP sockets) of a process.
pub fn fds_and_sockets(pid: u32) -> Result<(usize, usize, usize)> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds = 0;
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        fds += 1;
        // An fd closed between read_dir and readlink is simply not counted as a socket.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
            {
                sockets.push(inode);
            }
        }
    }
    let udp = table_inodes(pid, &["udp", "udp6"]);
    let tcp = table_inodes(pid, &["tcp", "tcp6"]);
    let count = |set: &HashSet<u64>| sockets.iter().filter(|i| set.contains(i)).count();
    Ok((fds, count(&udp), count(&tcp)))
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// The relay's tables (`realtime_relay_state_entries{table=…}`) in the order they are shown.
const RELAY_TABLES: [&str; 8] = [
    "calls_live",
    "calls_ended_kept",
    "udp_routes_by_ufrag",
    "udp_routes_by_addr",
    "tcp_routes_by_ufrag",
    "tcp_routes_by_addr",
    "tcp_connections_open",
    "watchers",
];

/// One labelled sample of an OpenMetrics family: `name{label="v"} 3`.
fn labelled(text: &str, name: &str, label: &str, v: &str) -> Option<f64> {
    let prefix = format!("{name}{{{label}=\"{v}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

impl Probe {
    async fn text(&self, url: &str) -> Result<String> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        resp.text().await.with_context(|| format!("GET {url}"))
    }

    pub async fn relay_metrics(&self) -> Result<String> {
        self.text(&self.relay_metrics).await
    }

    /// Every figure, now.
    pub async fn sample(&self) -> Result<Figures> {
        let mut f = Figures::new();
        let (fds, udp, tcp) = fds_and_sockets(self.relay_pid)?;
        f.insert("relay.fds".into(), fds as f64);
        f.insert("relay.udp_sockets".into(), udp as f64);
        f.insert("relay.tcp_sockets".into(), tcp as f64);
        f.insert("relay.rss_mib".into(), mib(sys::rss_kib(self.relay_pid)?));
        let metrics = self.relay_metrics().await?;
        for table in RELAY_TABLES {
            let v = labelled(&metrics, "realtime_relay_state_entries", "table", table)
                .with_context(|| format!("realtime_relay_state_entries{{table={table}}}"))?;
            f.insert(format!("relay.{table}"), v);
        }
        f.insert(
            "relay.call_tasks".into(),
            value(&metrics, "realtime_relay_call_tasks")?,
        );
        f.insert(
            "relay.runtime_tasks".into(),
            value(&metrics, "realtime_relay_runtime_tasks_alive")?,
        );

        let (envoy_fds, _, _) = fds_and_sockets(self.envoy_pid)?;
        f.insert("envoy.fds".into(), envoy_fds as f64);
        f.insert("envoy.rss_mib".into(), mib(sys::rss_kib(self.envoy_pid)?));
        let stats = self.text(&self.envoy_stats).await?;
        let bytes_mib = |name| -> Result<f64> {
            Ok((value(&stats, name)? / 1024.0 / 1024.0 * 10.0).round() / 10.0)
        };
        f.insert(
            "envoy.heap_allocated_mib".into(),
            bytes_mib("envoy_server_memory_allocated")?,
        );
        f.insert(
            "envoy.shared_data_bytes".into(),
            value(&stats, "realtime_filter_shared_data_bytes")?,
        );
        f.insert(
            "envoy.shared_data_keys".into(),
            value(&stats, "realtime_filter_shared_data_keys")?,
        );
        Ok(f)
    }
}

/// The machine's UDP counters (`/proc/net/snmp`): `RcvbufErrors` and `SndbufErrors` count
/// datagrams the kernel dropped because a socket's buffer was full, on every socket of the
/// network namespace.
pub fn udp_buffer_errors() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return (f64::NAN, f64::NAN);
    };
    let pick = |want: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == want)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (pick("RcvbufErrors"), pick("SndbufErrors"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_this_process_sockets_by_kind() {
        let (fds0, udp0, tcp0) = fds_and_sockets(std::process::id()).unwrap();
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (fds1, udp1, tcp1) = fds_and_sockets(std::process::id()).unwrap();
        // Other tests run in this process at the same time: compare with what they cannot
        // take away (our two sockets stay open until the second reading).
        assert!(
            fds1 >= 2 && udp1 >= 1 && tcp1 >= 1,
            "{fds0} {udp0} {tcp0} -> {fds1} {udp1} {tcp1}"
        );
        drop((u, t));
    }

    #[test]
    fn reads_one_labelled_sample() {
        let text = "# TYPE realtime_relay_state_entries gauge\n\
                    realtime_relay_state_entries{table=\"calls_live\"} 3\n\
                    realtime_relay_state_entries{table=\"watchers\"} 0\n";
        assert_eq!(
            labelled(text, "realtime_relay_state_entries", "table", "calls_live"),
            Some(3.0)
        );
        assert_eq!(
            labelled(text, "realtime_relay_state_entries", "table", "nope"),
            None
        );
    }
}
