//! The relay's cost per relayed packet with no I/O at all, for `cargo xtask bench`: the
//! bridge and its two str0m legs in virtual time (`relay-service`'s ignored test
//! `bridge::tests::relay_cost_per_relayed_packet_without_io`, release build), next to
//! str0m's own cost for the same work in the test peers. Measured twice:
//!
//! - wall time per packet, the median of five runs (noisy, like every timing here);
//! - instructions per packet under `valgrind --tool=callgrind` (repeatable on a shared
//!   machine): the relay's functions and the peers' are counted apart
//!   (`--toggle-collect`), at two lengths of the same call, and the difference divided by
//!   the difference in packets, so the handshakes and warm-up cancel out.
//!
//! And the relay's cost of one whole call setup without I/O (`bridge::tests::
//! relay_cost_per_call_setup_without_io`): both legs built, both SDPs parsed and written, ICE,
//! both DTLS handshakes and both SCTP associations, the median over 50 calls and, under
//! callgrind, instructions per setup (11 setups less 1). Section 3's CPU per setup over gRPC
//! depends on how much of the upstream handshake happens before the hangup; this one does not.
//!
//! And the working set in cache lines: [`TURNS_TEST`] at [`CACHE_CALLS`] calls under
//! callgrind's cache simulation (this machine class's 48 KiB level-1 data cache and a 4 MiB
//! last level, as its per-core L2; a miss there goes to the shared L3 or memory), the relay's
//! functions only, 100 frames a call less 20: last-level misses per relayed packet, the
//! repeatable form of what section 2d's timings show.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::compile::cargo;
use crate::paths::{Paths, RELAY_PACKAGE};
use crate::process::output;
use crate::ui::{line, Step};

const TEST: &str = "bridge::tests::relay_cost_per_relayed_packet_without_io";
const MARKER: &str = "RTGW_VIRTUAL_COST ";
/// The same cost with many calls taking turns (the working set of a loaded shard).
const TURNS_TEST: &str = "bridge::tests::relay_cost_per_relayed_packet_with_calls_taking_turns";
const TURNS_MARKER: &str = "RTGW_VIRTUAL_CALLS ";
/// Call counts for [`TURNS_TEST`]; 250 frames per call each.
const TURNS_CALLS: &str = "1,10,100,300";
/// Calls taking turns in the cache simulation.
const CACHE_CALLS: u32 = 300;
/// The simulated caches: size, associativity, line size (bytes).
const CACHE_GEOMETRY: [&str; 3] = ["--D1=49152,12,64", "--I1=32768,8,64", "--LL=4194304,16,64"];
/// The relay's cost of one call setup.
const SETUP_TEST: &str = "bridge::tests::relay_cost_per_call_setup_without_io";
const SETUP_MARKER: &str = "RTGW_VIRTUAL_SETUP ";
/// What callgrind counts as the relay's work in a setup: the negotiation, then every
/// datagram and timeout until the call is connected.
const SETUP_FNS: [&str; 5] = [
    "*relay_accepts_client*",
    "*relay_accepts_provider*",
    "*bridge*Bridge*new*",
    "*VirtualCall*relay_datagram*",
    "*VirtualCall*relay_timeout*",
];
/// What callgrind counts as the relay's work, and as the peers'.
const RELAY_FNS: [&str; 2] = [
    "*VirtualCall*relay_datagram*",
    "*VirtualCall*relay_timeout*",
];
const PEER_FNS: [&str; 2] = ["*VirtualCall*peer_receive*", "*VirtualCall*peer_wake*"];

/// Builds relay-service's unit tests in release and returns the test binary.
fn test_binary() -> Result<PathBuf> {
    let out = output(
        cargo().args([
            "test",
            "--release",
            "-p",
            RELAY_PACKAGE,
            "--lib",
            "--no-run",
            "--message-format=json",
        ]),
        "Read the compiler output above.",
    )?;
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo did not name relay-service's test binary"))
}

/// The measurement line of one run of the per-packet test.
fn run_once(bin: &Path, frames: u32, wrap: Option<Vec<String>>) -> Result<Value> {
    run_marked(bin, TEST, MARKER, ("RTGW_VIRTUAL_FRAMES", frames), wrap)
}

/// The test binary running the one ignored `test`, under `wrap` (valgrind and its
/// options) if given.
fn test_command(bin: &Path, test: &str, wrap: Option<Vec<String>>) -> Command {
    let mut cmd = match &wrap {
        Some(w) => {
            let mut c = Command::new(&w[0]);
            c.args(&w[1..]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args([
        "--ignored",
        "--exact",
        test,
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}

/// The `marker` line of one run of `test` with `env` set, under `wrap` if given.
fn run_marked(
    bin: &Path,
    test: &str,
    marker: &str,
    env: (&str, u32),
    wrap: Option<Vec<String>>,
) -> Result<Value> {
    let mut cmd = test_command(bin, test, wrap);
    cmd.env(env.0, env.1.to_string());
    let text = output(&mut cmd, "The virtual-time measurement failed.")?;
    // libtest prints the test's name on the same line, before the test's own output.
    let json = text
        .lines()
        .find_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            Some(&rest[..=rest.rfind('}')?])
        })
        .ok_or_else(|| anyhow!("no {marker}line in:\n{text}"))?;
    Ok(serde_json::from_str(json)?)
}

/// One run of [`TURNS_TEST`] with `calls` and `frames`, under `wrap` if given: a JSON object
/// per call count.
fn run_turns_with(
    bin: &Path,
    calls: &str,
    frames: u32,
    wrap: Option<Vec<String>>,
) -> Result<Vec<Value>> {
    let mut cmd = test_command(bin, TURNS_TEST, wrap);
    cmd.env("RTGW_VIRTUAL_CALLS", calls)
        .env("RTGW_VIRTUAL_FRAMES", frames.to_string());
    let text = output(&mut cmd, "The calls-taking-turns measurement failed.")?;
    let rows: Vec<Value> = text
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(TURNS_MARKER)? + TURNS_MARKER.len()..];
            serde_json::from_str(&rest[..=rest.rfind('}')?]).ok()
        })
        .collect();
    if rows.is_empty() {
        bail!("no {TURNS_MARKER}line in:\n{text}");
    }
    Ok(rows)
}

/// One run of [`TURNS_TEST`] at [`TURNS_CALLS`], 250 frames a call.
fn run_turns(bin: &Path) -> Result<Vec<Value>> {
    run_turns_with(bin, TURNS_CALLS, 250, None)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Instructions callgrind counted inside `functions` for a call of `frames` frames a side.
fn instructions(bin: &Path, frames: u32, functions: &[&str], out: &Path) -> Result<(f64, u64)> {
    let v = run_once(bin, frames, Some(callgrind_wrap(functions, out)))?;
    Ok((v["relayed_packets"].as_f64().unwrap_or(0.0), total(out)?))
}

/// The wrapper that runs a test binary under callgrind, counting only inside `functions`.
fn callgrind_wrap(functions: &[&str], out: &Path) -> Vec<String> {
    let mut wrap = vec![
        "valgrind".to_string(),
        "--tool=callgrind".into(),
        "--collect-atstart=no".into(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    wrap.extend(functions.iter().map(|f| format!("--toggle-collect={f}")));
    wrap
}

/// The instruction total of a callgrind output file.
fn total(out: &Path) -> Result<u64> {
    event_totals(out)?
        .get("Ir")
        .copied()
        .ok_or_else(|| anyhow!("no instruction total in {}", out.display()))
}

/// Callgrind's event totals of an output file, by event name (`Ir`, `DLmr`, ...).
fn event_totals(out: &Path) -> Result<HashMap<String, u64>> {
    let text =
        std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    let names = text
        .lines()
        .find_map(|l| l.strip_prefix("events: "))
        .ok_or_else(|| anyhow!("no event names in {}", out.display()))?;
    let values = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .ok_or_else(|| anyhow!("no totals in {}", out.display()))?;
    Ok(names
        .split_whitespace()
        .map(String::from)
        .zip(values.split_whitespace().map(|v| v.parse().unwrap_or(0)))
        .collect())
}

/// Cache misses per relayed packet with [`CACHE_CALLS`] calls taking turns, under callgrind's
/// cache simulation: 100 frames a call less 20, so the setups cancel out.
fn cache_misses(bin: &Path, dir: &Path) -> Result<Value> {
    let mut runs = Vec::new();
    for frames in [20u32, 100] {
        let out = dir.join(format!("cache.{frames}.out"));
        let mut wrap = callgrind_wrap(&RELAY_FNS, &out);
        wrap.push("--cache-sim=yes".into());
        wrap.extend(CACHE_GEOMETRY.iter().map(|g| g.to_string()));
        let rows = run_turns_with(bin, &CACHE_CALLS.to_string(), frames, Some(wrap))?;
        let packets = rows[0]["relayed_packets"]
            .as_f64()
            .ok_or_else(|| anyhow!("no relayed_packets in {}", rows[0]))?;
        runs.push((packets, event_totals(&out)?));
    }
    let ((p1, e1), (p2, e2)) = (&runs[0], &runs[1]);
    if p2 <= p1 {
        bail!("the longer run relayed no more packets ({p1} then {p2})");
    }
    let per_packet = |names: &[&str]| -> f64 {
        let sum = |e: &HashMap<String, u64>| -> u64 {
            names.iter().map(|n| e.get(*n).copied().unwrap_or(0)).sum()
        };
        let d = sum(e2).saturating_sub(sum(e1)) as f64 / (p2 - p1);
        (d * 10.0).round() / 10.0
    };
    Ok(json!({
        "calls": CACHE_CALLS,
        "cache": "simulated: L1d 48 KiB 12-way, last level 4 MiB 16-way, 64-byte lines",
        "instructions_per_packet": per_packet(&["Ir"]).round(),
        "l1d_misses_per_packet": per_packet(&["D1mr", "D1mw"]),
        "ll_read_misses_per_packet": per_packet(&["DLmr"]),
        "ll_write_misses_per_packet": per_packet(&["DLmw"]),
        "ll_misses_per_packet": per_packet(&["DLmr", "DLmw"]),
    }))
}

/// The relay's instructions per call setup: 11 setups less 1, over 10, so whatever the first
/// setup of a process pays once cancels out.
fn setup_instructions(bin: &Path, dir: &Path) -> Result<f64> {
    let mut counts = Vec::new();
    for n in [1u32, 11] {
        let out = dir.join(format!("setup.{n}.out"));
        run_marked(
            bin,
            SETUP_TEST,
            SETUP_MARKER,
            ("RTGW_VIRTUAL_SETUPS", n),
            Some(callgrind_wrap(&SETUP_FNS, &out)),
        )?;
        counts.push(total(&out)?);
    }
    Ok(counts[1].saturating_sub(counts[0]) as f64 / 10.0)
}

/// Instructions per relayed packet inside `functions`: the difference between a long and a
/// short call, over the difference in packets.
fn marginal(bin: &Path, functions: &[&str], dir: &Path, name: &str) -> Result<f64> {
    let (p1, i1) = instructions(bin, 1_000, functions, &dir.join(format!("{name}.1000.out")))?;
    let (p2, i2) = instructions(bin, 3_000, functions, &dir.join(format!("{name}.3000.out")))?;
    if p2 <= p1 {
        bail!("the longer call relayed no more packets ({p1} then {p2})");
    }
    Ok((i2.saturating_sub(i1)) as f64 / (p2 - p1))
}

/// Both measurements; callgrind's only when valgrind runs here.
pub fn measure(paths: &Paths) -> Result<Value> {
    let step = Step::new("Relay cost per packet and per setup without I/O (virtual time, release)");
    let bin = test_binary()?;
    let mut relay = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..5 {
        let v = run_once(&bin, 10_000, None)?;
        relay.push(v["relay_us_per_packet"].as_f64().unwrap_or(f64::NAN));
        peers.push(v["str0m_peers_us_per_packet"].as_f64().unwrap_or(f64::NAN));
    }
    let (relay_us, str0m_us) = (median(relay.clone()), median(peers.clone()));
    let mut v = json!({
        "wall": {
            "relay_us_per_packet_median": relay_us,
            "str0m_us_per_packet_median": str0m_us,
            "relay_us_per_packet_runs": relay,
            "str0m_us_per_packet_runs": peers,
            "frames_per_side": 10_000,
        }
    });
    v["calls_taking_turns"] = Value::Array(run_turns(&bin)?);
    v["setup"] = run_marked(
        &bin,
        SETUP_TEST,
        SETUP_MARKER,
        ("RTGW_VIRTUAL_SETUPS", 50),
        None,
    )?;
    let valgrind = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if valgrind {
        let dir = paths.scratch().join("bench").join("callgrind");
        std::fs::create_dir_all(&dir)?;
        let relay_ir = marginal(&bin, &RELAY_FNS, &dir, "relay")?;
        let str0m_ir = marginal(&bin, &PEER_FNS, &dir, "peers")?;
        v["setup"]["relay_instructions_per_setup"] = json!(setup_instructions(&bin, &dir)?.round());
        v["calls_taking_turns_cache"] = cache_misses(&bin, &dir)?;
        v["callgrind"] = json!({
            "relay_instructions_per_packet": relay_ir.round(),
            "str0m_instructions_per_packet": str0m_ir.round(),
            "relay_to_str0m": (relay_ir / str0m_ir * 100.0).round() / 100.0,
            "profiles": dir.display().to_string(),
        });
    } else {
        line(
            "    valgrind is not installed: instruction counts skipped (Debian package `valgrind`)",
        );
    }
    step.done();
    Ok(v)
}
