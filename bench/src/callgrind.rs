//! The running relay's instructions per relayed packet, counted by callgrind (section 2f).
//!
//! Wall time and CPU time on this shared machine drift 10–20 % between runs; instruction
//! counts do not. The relay runs under `valgrind --tool=callgrind` (a wrapper script in the
//! run directory stands for its binary), the usual capacity level drives it, and
//! `callgrind_control` zeroes its counts as the measured window opens and dumps them as it
//! closes, so call setup and teardown are left out. The count is user space only (callgrind
//! does not see the kernel), over every thread of the process: the shards or, in older
//! builds, tokio's tasks. Callgrind runs the relay some 50 times slower, so the level is
//! small; at that load each packet mostly finds the relay idle, as at the capacity ramp's
//! lowest levels.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use xtask::launch::Relay;

use crate::capacity::{self, LevelOpts, Via};

/// Why callgrind cannot be used here, if it cannot.
pub fn unavailable() -> Option<String> {
    ["valgrind", "callgrind_control"]
        .into_iter()
        .find(|tool| crate::sys::which(tool).is_none())
        .map(|tool| {
            format!(
                "`{tool}` is not installed (Debian package `valgrind`; `cargo xtask bench` \
                 installs it as root)"
            )
        })
}

/// Sends one `callgrind_control` command (`--zero`, `--dump`) to the callgrind run `pid`
/// and waits for it to be carried out (about 0.1 s). Off the runtime's thread: the load
/// generator shares it.
pub async fn control(pid: u32, command: &str) -> Result<()> {
    let command = command.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("callgrind_control")
            .arg(&command)
            .arg(pid.to_string())
            .output()
    })
    .await?
    .context("running callgrind_control")?;
    if !out.status.success() {
        bail!(
            "callgrind_control on {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Dumps the counts of the callgrind run `pid` since they were last zeroed and returns its
/// instructions. Callgrind writes each dump next to its output file (named on its command
/// line), numbered: the newest is this one.
pub async fn dump(pid: u32) -> Result<u64> {
    let out_file = out_file(pid)?;
    control(pid, "--dump").await?;
    let dir = out_file
        .parent()
        .context("callgrind's output file has no directory")?;
    let stem = out_file
        .file_name()
        .and_then(|n| n.to_str())
        .context("callgrind's output file name")?
        .to_string();
    let mut newest: Option<(u32, PathBuf)> = None;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let number = entry.file_name().to_str().and_then(|n| {
            n.strip_prefix(&stem)?
                .strip_prefix('.')?
                .parse::<u32>()
                .ok()
        });
        if let Some(n) = number {
            if newest.as_ref().is_none_or(|(m, _)| n > *m) {
                newest = Some((n, entry.path()));
            }
        }
    }
    let (_, path) = newest.context("callgrind wrote no dump")?;
    let text = std::fs::read_to_string(&path)?;
    instructions(&text).with_context(|| format!("no instruction count in {}", path.display()))
}

/// The `--callgrind-out-file` of the callgrind run `pid`, from its command line.
fn out_file(pid: u32) -> Result<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("reading the command line of {pid}"))?;
    cmdline
        .split(|b| *b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .find_map(|a| a.strip_prefix("--callgrind-out-file="))
        .map(PathBuf::from)
        .with_context(|| format!("{pid} is not a callgrind run with --callgrind-out-file"))
}

/// The instructions in a callgrind output file: its `summary:` line (older callgrind
/// versions write only `totals:`), whose first figure is `Ir`.
pub fn instructions(text: &str) -> Option<u64> {
    ["summary:", "totals:"].iter().find_map(|key| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    })
}

/// A wrapper script that runs `relay_bin` under callgrind, writing to `dir`.
fn wrapper(relay_bin: &Path, dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("relay-under-callgrind.sh");
    let out = dir.join("relay.callgrind");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={} {} \"$@\"\n",
            out.display(),
            relay_bin.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(script)
}

/// Runs `calls` calls through a relay under callgrind pinned to `relay_cpu`, against the
/// in-process echo provider, and reports its instructions per relayed packet in the window.
pub async fn run(
    relay_bin: &Path,
    calls: usize,
    window: Duration,
    relay_cpu: Option<usize>,
    log_dir: &Path,
) -> Result<Value> {
    let dir = log_dir.join(format!("callgrind-{calls}-calls"));
    std::fs::create_dir_all(&dir)?;
    let program = wrapper(relay_bin, &dir)?;
    let provider = capacity::start_provider().await?;
    let provider_url = provider.base_url();
    let mut spec = capacity::relay_spec(
        &program,
        &provider_url,
        relay_cpu,
        false,
        &[],
        dir.join("relay.log"),
    )?;
    // Valgrind starts the relay slowly.
    spec.ready_timeout = Duration::from_secs(120);
    let relay = Relay::start(&spec)?;
    let opts = LevelOpts {
        calls,
        warmup: Duration::from_secs(5),
        window,
        setup_concurrency: 2,
        priced_events: false,
        callgrind: true,
    };
    let via = Via::Relay {
        relay: &relay,
        provider_url: provider_url.clone(),
    };
    let level = capacity::run_level(&via, &opts).await;
    drop(relay);
    provider.shutdown().await;
    let level = level?;
    Ok(json!({
        "calls": calls,
        "relay_binary": relay_bin.display().to_string(),
        "window_secs": level["window_secs"],
        "relayed_packets": level["relayed_packets"],
        "relayed_packets_per_sec": level["relayed_packets_per_sec"],
        "loss_pct": level["loss_pct"],
        "connected": level["connected"],
        "instructions": level["relay_instructions"],
        "instructions_per_packet": level["relay_instructions_per_packet"],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instruction_count_is_the_first_figure_of_the_summary() {
        let dump = "events: Ir\nsummary: 11318901\n\ntotals: 11323259\n";
        assert_eq!(instructions(dump), Some(11_318_901));
        assert_eq!(instructions("events: Ir Dr\ntotals: 42 7\n"), Some(42));
        assert_eq!(instructions("events: Ir\n"), None);
    }
}
