//! The realtime WebRTC gateway's load tools, shared by two binaries: `rtgw-bench`
//! (benchmarks: call setup, relay capacity, metering cost, filter cost) and `rtgw-soak` (a
//! churn soak that checks nothing leaks after thousands of calls). Both are run through
//! `cargo xtask bench` and `cargo xtask soak`.

pub mod callgrind;
pub mod capacity;
pub mod filter;
pub mod floor;
pub mod janus;
pub mod peer;
pub mod relay_grpc;
pub mod report;
pub mod setup;
pub mod soak;
pub mod sys;
pub mod versus;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// When the tool started; progress lines count from here.
pub static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
/// The tool's name in progress lines (`bench` unless a binary says otherwise).
pub static TOOL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// A progress line on stderr: `[bench   12.3s] ...`.
pub fn say(msg: impl AsRef<str>) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    let tool = TOOL.get().copied().unwrap_or("bench");
    eprintln!("[{tool} {t:6.1}s] {}", msg.as_ref());
}

/// `YYYYmmddTHHMMSSZ` (UTC), for result file names.
pub fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y%m%dT%H%M%SZ"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => secs.to_string(),
    }
}
