//! The process's own resource gauges under the names every Prometheus client library uses
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`,
//! `process_max_fds`), plus `realtime_relay_cpu_cores`: the cores the relay may use. CPU
//! saturation is `rate(process_cpu_seconds_total[1m]) / realtime_relay_cpu_cores`, which the
//! shipped alert rules watch (deploy/observability/). Read from `/proc/self` at scrape time:
//! nothing runs between scrapes. Parsing is pure and tested on captured texts.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Linux reports `/proc/<pid>/stat` times in USER_HZ ticks, 100 per second on every
/// architecture Linux supports in userspace (the kernel's own HZ is hidden behind it).
const USER_HZ: f64 = 100.0;

/// One reading of the process's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// User plus system CPU seconds from the text of `/proc/self/stat`. The command name (field
/// 2) is in parentheses and may hold spaces or parentheses itself, so fields are counted
/// after the last `)`: utime and stime are fields 14 and 15.
pub fn cpu_seconds_from_stat(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace();
    // Field 3 (state) is the first after the name; utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Resident set size in bytes from the `VmRSS:` line of `/proc/self/status` (in kB).
pub fn resident_bytes_from_status(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The soft limit on open files from `/proc/self/limits` (`unlimited` reads as `u64::MAX`).
pub fn max_fds_from_limits(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..]
        .split_ascii_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// Reads the process's resources now; a part that cannot be read stays 0.
pub fn sample() -> ProcessSample {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    ProcessSample {
        cpu_seconds: cpu_seconds_from_stat(&read("/proc/self/stat")).unwrap_or(0.0),
        resident_bytes: resident_bytes_from_status(&read("/proc/self/status")).unwrap_or(0),
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
        max_fds: max_fds_from_limits(&read("/proc/self/limits")).unwrap_or(0),
    }
}

/// The cores this process may run on: the CPU affinity and cgroup quota, as the standard
/// library reads them.
pub fn usable_cores() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

#[derive(Default)]
pub struct ProcessGauges {
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    cpu_cores: Gauge,
}

impl ProcessGauges {
    /// `process` is the root registry, without the relay's prefix (the `process_*` names are
    /// the same in every exporter, so dashboards find them).
    pub fn register(&self, process: &mut Registry) {
        process.register(
            "process_cpu_seconds",
            "User and system CPU time of the relay process, in seconds",
            self.cpu_seconds.clone(),
        );
        process.register(
            "process_resident_memory_bytes",
            "Resident memory of the relay process, in bytes",
            self.resident_bytes.clone(),
        );
        process.register(
            "process_open_fds",
            "File descriptors the relay process has open",
            self.open_fds.clone(),
        );
        process.register(
            "process_max_fds",
            "The relay process's limit on open file descriptors",
            self.max_fds.clone(),
        );
        process.register(
            "realtime_relay_cpu_cores",
            "Cores the relay may use (CPU affinity and cgroup quota): CPU saturation is rate(process_cpu_seconds_total) / this",
            self.cpu_cores.clone(),
        );
        self.cpu_cores
            .set(i64::try_from(usable_cores()).unwrap_or(i64::MAX));
    }

    pub fn set(&self, s: &ProcessSample) {
        // CPU time only grows; the counter follows it by its increase.
        let grown = s.cpu_seconds - self.cpu_seconds.get();
        if grown > 0.0 {
            self.cpu_seconds.inc_by(grown);
        }
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.resident_bytes.set(int(s.resident_bytes));
        self.open_fds.set(int(s.open_fds));
        self.max_fds.set(int(s.max_fds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name_even_when_it_holds_spaces_and_parens() {
        // A real line (pid 4242), utime 250 and stime 50 ticks; the name is hostile.
        let stat = "4242 (relay (x) y) S 1 4242 4242 0 -1 4194560 3090 0 0 0 250 50 0 0 20 0 \
                    12 0 1234567 1051127808 5120 18446744073709551615 1 1 0 0 0 0 0 4096 \
                    17479 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(cpu_seconds_from_stat(stat), Some(3.0));
        assert_eq!(cpu_seconds_from_stat("4242 (truncated) S 1 2"), None);
        assert_eq!(cpu_seconds_from_stat(""), None);
    }

    #[test]
    fn resident_memory_and_fd_limit_are_read_from_their_lines() {
        let status = "Name:\trealtime-relay\nVmPeak:\t  900000 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(resident_bytes_from_status(status), Some(20 * 1024 * 1024));
        assert_eq!(resident_bytes_from_status("Name:\tx\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1048576              1048576              files     \n";
        assert_eq!(max_fds_from_limits(limits), Some(1_048_576));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_fds_from_limits(unlimited), Some(u64::MAX));
    }

    #[test]
    fn this_process_reads_as_alive_and_exports_the_standard_names() {
        let s = sample();
        assert!(
            s.resident_bytes > 0 && s.open_fds > 0 && s.max_fds >= s.open_fds,
            "{s:?}"
        );
        let gauges = ProcessGauges::default();
        let mut root = Registry::default();
        gauges.register(&mut root);
        gauges.set(&ProcessSample {
            cpu_seconds: 1.5,
            ..s
        });
        // A reading that went backwards (never, but rounding) does not lower the counter.
        gauges.set(&ProcessSample {
            cpu_seconds: 1.25,
            ..s
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &root).unwrap();
        assert!(text.contains("process_cpu_seconds_total 1.5"), "{text}");
        assert!(
            text.contains("# TYPE process_resident_memory_bytes gauge"),
            "{text}"
        );
        assert!(text.contains("process_open_fds "), "{text}");
        assert!(text.contains("process_max_fds "), "{text}");
        assert!(
            text.contains(&format!("realtime_relay_cpu_cores {}", usable_cores())),
            "{text}"
        );
    }
}
