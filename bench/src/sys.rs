//! What the machine is and what our processes cost: CPU time and RSS from /proc, CPU
//! pinning with `taskset` (util-linux), and the noise other processes add.

use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(cpu_ticks(&text)? / clk_tck())
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`.
fn cpu_ticks(stat: &str) -> Result<f64> {
    // The command name is in parentheses and may contain spaces: fields follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(3) ppid(4) ... utime is field 14, stime 15 (1-based) => index 11, 12.
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Resident set size in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Online CPUs of the machine (not our affinity mask).
pub fn online_cpus() -> usize {
    Command::new("nproc")
        .arg("--all")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or_else(cores)
}

/// Pins every thread of `pid` to `cpu` with `taskset -a -p -c`. Threads created later
/// inherit the mask.
pub fn pin(pid: u32, cpu: usize) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .context("running taskset (util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {cpu} {pid} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Where `program` is on `PATH`, if it is.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.exists())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Busy jiffies and total jiffies of the whole machine (first line of /proc/stat).
pub fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Processes (not ours) that used CPU recently, as `comm(pid) %cpu` strings, busiest first.
pub fn other_busy_processes(ours: &[u32]) -> Vec<String> {
    let Ok(out) = Command::new("ps")
        .args(["-eo", "pid=,ppid=,pcpu=,comm=", "--sort=-pcpu"])
        .output()
    else {
        return Vec::new();
    };
    let me = std::process::id();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let pid: u32 = f.first()?.parse().ok()?;
            let ppid: u32 = f.get(1)?.parse().ok()?;
            let pcpu: f64 = f.get(2)?.parse().ok()?;
            let comm = f.get(3..)?.join(" ");
            let mine = pid == me || ppid == me || ours.contains(&pid);
            (!mine && pcpu >= 5.0 && comm != "ps").then(|| format!("{comm}({pid}) {pcpu:.0}%"))
        })
        .take(8)
        .collect()
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            let s = if s.trim().is_empty() {
                String::from_utf8_lossy(&o.stderr).into_owned()
            } else {
                s
            };
            s.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// CPU model, cores, memory, kernel, Envoy version, git commit.
pub fn machine(envoy_bin: &std::path::Path, root: &std::path::Path) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = first_line(Command::new("uname").arg("-r"));
    let envoy = first_line(Command::new(envoy_bin).arg("--version"));
    let envoy = envoy
        .split("version:")
        .nth(1)
        .map(|s| s.trim().to_string())
        .unwrap_or(envoy);
    let commit = first_line(Command::new("git").arg("-C").arg(root).args([
        "rev-parse",
        "--short=12",
        "HEAD",
    ]));
    let dirty = !first_line(Command::new("git").arg("-C").arg(root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_empty();
    json!({
        "cpu_model": model,
        "cores": online_cpus(),
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "envoy": envoy,
        "git_commit": commit,
        "git_dirty": dirty,
    })
}

/// Percentile (nearest rank) of sorted values.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50/p99/min/max/n of a sample set, in the sample's unit.
pub fn summary(samples: &mut [f64]) -> Value {
    samples.sort_by(|a, b| a.total_cmp(b));
    json!({
        "n": samples.len(),
        "p50": round3(pct(samples, 50.0)),
        "p99": round3(pct(samples, 99.0)),
        "min": round3(samples.first().copied().unwrap_or(f64::NAN)),
        "max": round3(samples.last().copied().unwrap_or(f64::NAN)),
    })
}

/// The median of `values`: the middle one, or the mean of the middle two for an even count
/// (with two rounds, taking the upper one reported the worse round, not a median).
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [27.0, 21.0]), Some(24.0));
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 50.0), 50.0);
        assert_eq!(pct(&v, 99.0), 99.0);
        assert_eq!(pct(&[7.0], 99.0), 7.0);
        assert!(pct(&[], 50.0).is_nan());
    }

    #[test]
    fn cpu_ticks_are_utime_plus_stime_after_the_command_name() {
        // A command name with spaces and a ')' of its own; utime 17, stime 4.
        let stat = "4242 (rtgw (x) y) S 1 4242 4242 0 -1 4194560 120 0 0 0 17 4 0 0 20 0 1 0 5 0 0";
        assert_eq!(cpu_ticks(stat).unwrap(), 21.0);
        assert!(cpu_ticks("4242 rtgw S 1").is_err());
        assert!(cpu_ticks("4242 (rtgw) S 1 2").is_err());
    }

    #[test]
    fn own_process_cpu_grows_while_it_works() {
        let pid = std::process::id();
        let before = cpu_secs(pid).unwrap();
        // Work until the kernel has charged 100 ms of CPU (bounded by the wall clock: a
        // loaded machine gives this thread less than a core).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        let mut after = before;
        while after - before < 0.1 && std::time::Instant::now() < deadline {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            after = cpu_secs(pid).unwrap();
        }
        assert!(
            after - before >= 0.1,
            "cpu {before} -> {after}: not charged"
        );
        assert!(rss_kib(pid).unwrap() > 0);
    }
}
