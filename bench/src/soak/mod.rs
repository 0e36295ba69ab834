//! The churn soak (`cargo xtask soak`): thousands of calls through one Envoy + filter + relay
//! stack, then a check that every figure the relay and Envoy keep came back to its baseline.
//!
//! The run: a sample at the start; a warm-up (the same mix of calls, so allocators, pools and
//! stats reach their working size) and its drain, then the baseline sample; the measured
//! calls, sampled along the way; the drain; the last sample, judged figure by figure against
//! the baseline ([`verdict`]). Calls end three ways, and the relay's own end reasons must
//! account for each one: hangup through the gateway (`hangup`), a client that vanished
//! (`client_timeout`), a client that never connected (`ice_timeout`).

pub mod call;
pub mod probe;
pub mod schedule;
pub mod verdict;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::say;
use call::{Failure, Gateway, Timing};
use probe::Probe;
use schedule::{interleave, Kind};
use verdict::{Figures, Row, Sample};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub complete: usize,
    pub vanish: usize,
    pub never_connect: usize,
    /// Calls in flight at once (client side; calls the relay is still timing out add to it).
    pub concurrency: usize,
    /// Calls of the warm-up (same mix), before the baseline.
    pub warmup: usize,
    /// A sample every this many complete calls.
    pub sample_every: usize,
    pub timing: Timing,
}

/// How the stack is set up, for waiting on it.
#[derive(Debug, Clone)]
pub struct StackTimeouts {
    /// The relay's `--ice-timeout-secs` + `--peer-timeout-secs`: the longest a call the
    /// client abandoned can stay.
    pub longest_abandoned_call: Duration,
    /// The relay's `--upstream-pool-idle-secs`: kept-alive upstream connections close then.
    pub upstream_pool_idle: Duration,
    /// Bounded tables: figure → cap (`relay.calls_ended_kept` → `--ended-calls-kept`).
    pub caps: BTreeMap<String, f64>,
}

/// End reasons the soak's calls produce, and the kind each belongs to.
const REASONS: [(&str, Kind); 3] = [
    ("hangup", Kind::Complete),
    ("client_timeout", Kind::Vanish),
    ("ice_timeout", Kind::NeverConnect),
];

/// Every end reason the relay has (`EndReason::code`): any but the three above is a call
/// that ended the wrong way.
const ALL_REASONS: [&str; 14] = [
    "hangup",
    "client_closed",
    "upstream_closed",
    "client_timeout",
    "upstream_gone",
    "session_closed",
    "ice_timeout",
    "idle_timeout",
    "max_duration",
    "buffer_overflow",
    "drain",
    "abandoned",
    "budget_exceeded",
    "internal_error",
];

/// Relay counters whose growth over the measured calls the report shows: datagrams and
/// messages that went nowhere, refused setups. Not judged (a busy loopback drops a few), but
/// where a failed call's cause shows.
const RELAY_COUNTERS: [&str; 7] = [
    "realtime_relay_unmatched_datagrams_total",
    "realtime_relay_call_queue_full_drops_total",
    "realtime_relay_stun_unauthenticated_total",
    "realtime_relay_dc_write_errors_total",
    "realtime_relay_dropped_total",
    "realtime_relay_setup_failures_total",
    "realtime_relay_call_panics_total",
];

fn relay_counters(metrics: &str) -> BTreeMap<&'static str, f64> {
    RELAY_COUNTERS
        .iter()
        .map(|n| (*n, xtask::metrics::value(metrics, n).unwrap_or(f64::NAN)))
        .collect()
}

#[derive(Default)]
struct Tally {
    ok: BTreeMap<&'static str, usize>,
    failed: BTreeMap<&'static str, usize>,
    /// By stage: count and the first few details.
    failures: BTreeMap<&'static str, (usize, Vec<String>)>,
    complete_done: usize,
}

impl Tally {
    fn record(&mut self, kind: Kind, result: Result<(), Failure>) {
        match result {
            Ok(()) => *self.ok.entry(kind.label()).or_default() += 1,
            Err(f) => {
                *self.failed.entry(kind.label()).or_default() += 1;
                let e = self.failures.entry(f.stage).or_default();
                e.0 += 1;
                if e.1.len() < 5 {
                    e.1.push(format!("{}: {}", kind.label(), f.detail));
                }
            }
        }
        if kind == Kind::Complete {
            self.complete_done += 1;
        }
    }
}

/// What a soak found.
pub struct Report {
    pub samples: Vec<Sample>,
    pub rows: Vec<Row>,
    pub json: Value,
    pub problems: Vec<String>,
}

/// The schedule of a warm-up of `n` calls with the plan's mix.
fn warmup_schedule(plan: &Plan) -> Vec<Kind> {
    let total = (plan.complete + plan.vanish + plan.never_connect).max(1);
    let share = |k: usize| (plan.warmup * k).div_ceil(total);
    interleave(
        share(plan.complete),
        share(plan.vanish),
        share(plan.never_connect),
    )
}

/// Runs `schedule` with at most `concurrency` calls at once. Every `sample_every` complete
/// calls, `on_progress` is called with the number done.
async fn run_calls(
    gateway: &Arc<Gateway>,
    plan: &Plan,
    schedule: Vec<Kind>,
    tally: &Arc<Mutex<Tally>>,
    mut on_progress: impl AsyncFnMut(usize),
) {
    let permits = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_sample = plan.sample_every.max(1);
    let done = |t: &Arc<Mutex<Tally>>| t.lock().map(|t| t.complete_done).unwrap_or(0);
    for (i, kind) in schedule.into_iter().enumerate() {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        while let Some(r) = tasks.try_join_next() {
            let _ = r;
        }
        let now_done = done(tally);
        if now_done >= next_sample {
            // Labelled by the mark passed (1000, 2000, …), taken when the call that passed it
            // has finished; marks passed together give one sample.
            let every = plan.sample_every.max(1);
            let mark = now_done / every * every;
            on_progress(mark).await;
            next_sample = mark + every;
        }
        let gateway = gateway.clone();
        let tally = tally.clone();
        let timing = plan.timing;
        // Spread the 20 ms audio cadences of concurrent calls.
        let phase = Duration::from_millis((i % 20) as u64);
        tasks.spawn(async move {
            let result = gateway.call(kind, timing, phase).await;
            if let Ok(mut t) = tally.lock() {
                t.record(kind, result);
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let every = plan.sample_every.max(1);
    if done(tally) >= next_sample {
        on_progress(done(tally) / every * every).await;
    }
}

fn reasons(metrics: &str) -> BTreeMap<&'static str, f64> {
    ALL_REASONS
        .iter()
        .map(|r| {
            let v = probe_reason(metrics, r);
            (*r, v)
        })
        .collect()
}

fn probe_reason(metrics: &str, reason: &str) -> f64 {
    let prefix = format!("realtime_relay_calls_ended_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits for the relay to hold no call and run no call task (bounded), then for kept-alive
/// upstream connections to idle out. With a baseline, then polls until every figure is
/// within its limit or `grace` has passed; returns the last sample and how long the drain took.
async fn settle(
    probe: &Probe,
    stack: &StackTimeouts,
    baseline: Option<&Figures>,
) -> Result<(Figures, Duration)> {
    let started = Instant::now();
    let calls_deadline = started + stack.longest_abandoned_call + Duration::from_secs(30);
    loop {
        let f = probe.sample().await?;
        let live = f.get("relay.calls_live").copied().unwrap_or(f64::MAX);
        let tasks = f.get("relay.call_tasks").copied().unwrap_or(f64::MAX);
        if live == 0.0 && tasks == 0.0 {
            break;
        }
        if Instant::now() >= calls_deadline {
            bail!(
                "{live} calls and {tasks} call tasks still on the relay {:?} after the last call",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(stack.upstream_pool_idle + Duration::from_secs(1)).await;
    let grace = Instant::now() + Duration::from_secs(20);
    loop {
        let f = probe.sample().await?;
        let settled = match baseline {
            None => true,
            Some(b) => verdict::all_ok(&verdict::judge(b, &f, &stack.caps)),
        };
        if settled || Instant::now() >= grace {
            return Ok((f, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The whole soak.
pub async fn run(
    gateway: Gateway,
    probe: Probe,
    plan: &Plan,
    stack: &StackTimeouts,
) -> Result<Report> {
    let begun = Instant::now();
    let at = || begun.elapsed().as_secs_f64();
    let gateway = Arc::new(gateway);
    let mut samples = vec![Sample {
        label: "start".into(),
        at_secs: at(),
        figures: probe.sample().await?,
    }];

    let warmup = warmup_schedule(plan);
    say(format!(
        "warm-up: {} calls, {} at once",
        warmup.len(),
        plan.concurrency
    ));
    let warm_tally = Arc::new(Mutex::new(Tally::default()));
    run_calls(&gateway, plan, warmup, &warm_tally, async |_| {}).await;
    let (baseline, _) = settle(&probe, stack, None).await?;
    samples.push(Sample {
        label: "baseline".into(),
        at_secs: at(),
        figures: baseline.clone(),
    });
    let metrics_before = probe.relay_metrics().await?;
    let reasons_before = reasons(&metrics_before);
    let mut problems_early: Vec<String> = Vec::new();
    let counters_before = relay_counters(&metrics_before);
    let udp_errors_before = probe::udp_buffer_errors();

    let schedule = interleave(plan.complete, plan.vanish, plan.never_connect);
    say(format!(
        "soak: {} complete calls, {} vanishing, {} never connecting; {} at once",
        plan.complete, plan.vanish, plan.never_connect, plan.concurrency
    ));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let measured = Instant::now();
    let mut progress: Vec<Sample> = Vec::new();
    run_calls(&gateway, plan, schedule, &tally, async |done| {
        match probe.sample().await {
            Ok(figures) => {
                say(format!(
                    "{done} complete calls done; relay: {} calls live, {} fds, {} MiB",
                    figures.get("relay.calls_live").copied().unwrap_or(0.0),
                    figures.get("relay.fds").copied().unwrap_or(0.0),
                    figures.get("relay.rss_mib").copied().unwrap_or(0.0)
                ));
                progress.push(Sample {
                    label: done.to_string(),
                    at_secs: at(),
                    figures,
                });
            }
            Err(e) => say(format!("sample after {done} calls failed: {e:#}")),
        }
    })
    .await;
    let calls_secs = measured.elapsed().as_secs_f64();
    samples.extend(progress);
    say("drain: waiting for the relay to end the abandoned calls");
    let (drained, drain_time) = settle(&probe, stack, Some(&baseline)).await?;
    samples.push(Sample {
        label: "drained".into(),
        at_secs: at(),
        figures: drained.clone(),
    });
    let udp_errors_after = probe::udp_buffer_errors();
    let metrics_after = probe.relay_metrics().await?;
    let reasons_after = reasons(&metrics_after);
    let counters: BTreeMap<&str, f64> = relay_counters(&metrics_after)
        .into_iter()
        .map(|(n, after)| (n, after - counters_before.get(n).copied().unwrap_or(0.0)))
        .collect();
    if counters
        .get("realtime_relay_call_panics_total")
        .copied()
        .unwrap_or(0.0)
        != 0.0
    {
        problems_early.push("a call task panicked".to_string());
    }

    let rows = verdict::judge(&baseline, &drained, &stack.caps);
    let tally = tally
        .lock()
        .map(|mut t| std::mem::take(&mut *t))
        .unwrap_or_default();
    let mut problems: Vec<String> = problems_early;
    problems.extend(rows.iter().filter(|r| !r.ok).map(|r| {
        format!(
            "{} did not come back: baseline {}, after the drain {:?}, limit {}",
            r.name, r.baseline, r.drained, r.allowed
        )
    }));
    for (stage, (n, examples)) in &tally.failures {
        problems.push(format!("{n} call(s) failed at {stage}: {examples:?}"));
    }
    let ended: BTreeMap<&str, f64> = reasons_after
        .iter()
        .map(|(r, after)| (*r, after - reasons_before.get(r).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect();
    for (reason, kind) in REASONS {
        let want = tally.ok.get(kind.label()).copied().unwrap_or(0) as f64;
        let got = ended.get(reason).copied().unwrap_or(0.0);
        // A failed call ends some other way (a client that never connected: ice_timeout);
        // the failure is the problem then, not the count.
        if kind != Kind::Complete && tally.failures.is_empty() && got != want {
            problems.push(format!(
                "{want} {} calls but the relay ended {got} as {reason}",
                kind.label()
            ));
        }
    }
    // Complete calls end as hangup even when their media check failed: every one must.
    let complete_total = (tally.ok.get("complete").copied().unwrap_or(0)
        + tally.failed.get("complete").copied().unwrap_or(0)) as f64;
    let hangups = ended.get("hangup").copied().unwrap_or(0.0);
    if tally.failures.is_empty() && hangups != complete_total {
        problems.push(format!(
            "{complete_total} complete calls but the relay ended {hangups} as hangup"
        ));
    }
    for (reason, n) in &ended {
        if !REASONS.iter().any(|(r, _)| r == reason) {
            problems.push(format!("{n} call(s) ended as {reason}"));
        }
    }
    let json = json!({
        "plan": {
            "complete": plan.complete,
            "vanish": plan.vanish,
            "never_connect": plan.never_connect,
            "concurrency": plan.concurrency,
            "warmup": plan.warmup,
            "audio_secs": plan.timing.audio.as_secs_f64(),
        },
        "calls_ok": tally.ok,
        "calls_failed": tally.failed,
        "failures": tally.failures.iter().map(|(s, (n, ex))| (s.to_string(), json!({"count": n, "examples": ex}))).collect::<BTreeMap<_, _>>(),
        "ended_by_reason": ended,
        "relay_counters_during_calls": counters,
        "machine_udp_rcvbuf_errors_during_calls": udp_errors_after.0 - udp_errors_before.0,
        "machine_udp_sndbuf_errors_during_calls": udp_errors_after.1 - udp_errors_before.1,
        "calls_secs": (calls_secs * 10.0).round() / 10.0,
        "calls_per_sec": ((plan.complete + plan.vanish + plan.never_connect) as f64 / calls_secs * 10.0).round() / 10.0,
        "drain_secs": (drain_time.as_secs_f64() * 10.0).round() / 10.0,
        "samples": samples.iter().map(|s| json!({"label": s.label, "at_secs": (s.at_secs * 10.0).round() / 10.0, "figures": s.figures})).collect::<Vec<_>>(),
        "verdict": rows.iter().map(|r| json!({"figure": r.name, "baseline": r.baseline, "drained": r.drained, "allowed": r.allowed, "ok": r.ok})).collect::<Vec<_>>(),
        "problems": problems,
    });
    Ok(Report {
        samples,
        rows,
        json,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warmup_has_the_runs_mix() {
        let plan = Plan {
            complete: 10_000,
            vanish: 1_000,
            never_connect: 1_000,
            concurrency: 75,
            warmup: 240,
            sample_every: 1_000,
            timing: Timing {
                audio: Duration::from_secs(3),
                vanish_after: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(10),
                settle_timeout: Duration::from_secs(5),
            },
        };
        let w = warmup_schedule(&plan);
        assert_eq!(w.iter().filter(|k| **k == Kind::Complete).count(), 200);
        assert_eq!(w.iter().filter(|k| **k == Kind::Vanish).count(), 20);
        assert_eq!(w.iter().filter(|k| **k == Kind::NeverConnect).count(), 20);
    }

    #[test]
    fn end_reasons_are_read_by_label() {
        let m = "realtime_relay_calls_ended_total{reason=\"hangup\"} 12\n\
                 realtime_relay_calls_ended_total{reason=\"ice_timeout\"} 3\n";
        let r = reasons(m);
        assert_eq!(r["hangup"], 12.0);
        assert_eq!(r["ice_timeout"], 3.0);
        assert_eq!(r["client_timeout"], 0.0);
        assert_eq!(r.len(), ALL_REASONS.len());
    }
}
