//! Two relay builds taking turns at one capacity level (`rtgw-bench --only versus
//! --relay-bin A --versus B`): the before/after of a change to the media path.
//!
//! On a shared 2-vCPU machine the CPU time of one and the same relay binary moves 15–25 %
//! between runs minutes apart, far more than most changes, and it moves the load generator's
//! CPU with it: the whole machine runs faster or slower for a while. So each run also yields
//! the relay's CPU per relayed packet divided by the generator's (the load peers and the
//! in-process echo provider, on the other core, doing the same work for both builds since
//! they are this bench's own code): that ratio stays within a few per cent between runs of
//! one binary. Both figures are reported per build as the median of its rounds, and B ÷ A of
//! each.

use std::path::Path;
use std::time::Duration;

use crate::capacity::{level_through_relay, relay_spec, start_provider, LevelOpts};
use crate::sys::{self, round3};
use anyhow::Result;
use serde_json::{json, Value};

/// One build's figures, a value per round.
#[derive(Debug, Default)]
struct Figures {
    relay_us: Vec<f64>,
    relative: Vec<f64>,
}

/// The relay's CPU per relayed packet over the generator's, from one capacity level's
/// result: `None` when the level carried no packets or the generator's CPU is unknown.
pub fn relative_to_generator(level: &Value) -> Option<f64> {
    let relay_us = level["relay_cpu_us_per_packet"].as_f64()?;
    let packets = level["relayed_packets_per_sec"].as_f64()?;
    let generator_pct = level["generator_and_provider_cpu_pct"].as_f64()?;
    if packets <= 0.0 || generator_pct <= 0.0 {
        return None;
    }
    // A percentage of one core over packets per second: µs of generator CPU per packet.
    let generator_us = generator_pct * 1e4 / packets;
    Some(round3(relay_us / generator_us))
}

/// Median of `b` over median of `a`, if both exist.
fn ratio_of_medians(a: &mut [f64], b: &mut [f64]) -> Option<f64> {
    match (sys::median(a), sys::median(b)) {
        (Some(a), Some(b)) if a > 0.0 => Some(round3(b / a)),
        _ => None,
    }
}

/// `calls` calls through build `a`, then through build `b`, `rounds` times (A, B, A, B…),
/// each with the relay alone on `relay_cpu`.
pub async fn run(
    calls: usize,
    rounds: usize,
    a: &Path,
    b: &Path,
    relay_cpu: Option<usize>,
    log_dir: &Path,
) -> Result<Value> {
    let provider = start_provider().await?;
    let provider_url = provider.base_url();
    let opts = LevelOpts {
        calls,
        warmup: Duration::from_secs(3),
        window: Duration::from_secs(10),
        setup_concurrency: 16,
        priced_events: false,
        callgrind: false,
    };
    let mut figures = [Figures::default(), Figures::default()];
    let mut runs = Vec::new();
    for round in 0..rounds {
        for (which, bin) in [a, b].into_iter().enumerate() {
            let name = ["A", "B"][which];
            crate::say(format!(
                "versus: {calls} calls through {name} ({}), round {}",
                bin.display(),
                round + 1
            ));
            let log = log_dir.join(format!("relay-versus-{name}-{round}.log"));
            let spec = relay_spec(bin, &provider_url, relay_cpu, false, &[], log)?;
            let r = level_through_relay(&provider, &spec, &opts).await?;
            let relative = relative_to_generator(&r);
            crate::say(format!(
                "  {name}: relay {} µs/packet, generator {}% CPU, relay ÷ generator per packet {}, loss {}%",
                r["relay_cpu_us_per_packet"],
                r["generator_and_provider_cpu_pct"],
                relative.map_or("–".to_string(), |v| v.to_string()),
                r["loss_pct"],
            ));
            if let Some(us) = r["relay_cpu_us_per_packet"].as_f64() {
                figures[which].relay_us.push(us);
            }
            if let Some(v) = relative {
                figures[which].relative.push(v);
            }
            runs.push(json!({ "build": name, "round": round, "relay_bin": bin.display().to_string(), "relay": r }));
        }
    }
    provider.shutdown().await;
    let [mut fa, mut fb] = figures;
    let median = |v: &mut [f64]| sys::median(v).map(round3);
    let summary = json!({
        "relay_us_per_packet_a": median(&mut fa.relay_us),
        "relay_us_per_packet_b": median(&mut fb.relay_us),
        "b_over_a": ratio_of_medians(&mut fa.relay_us, &mut fb.relay_us),
        "relative_to_generator_a": median(&mut fa.relative),
        "relative_to_generator_b": median(&mut fb.relative),
        "relative_b_over_a": ratio_of_medians(&mut fa.relative, &mut fb.relative),
    });
    crate::say(format!(
        "  versus, medians of {rounds} rounds: relay µs/packet A {} B {} (B ÷ A {}); relay ÷ generator A {} B {} (B ÷ A {})",
        summary["relay_us_per_packet_a"],
        summary["relay_us_per_packet_b"],
        summary["b_over_a"],
        summary["relative_to_generator_a"],
        summary["relative_to_generator_b"],
        summary["relative_b_over_a"],
    ));
    Ok(json!({
        "calls": calls,
        "rounds": rounds,
        "a": a.display().to_string(),
        "b": b.display().to_string(),
        "summary": summary,
        "runs": runs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_is_weighed_against_the_generator_per_packet() {
        // 40,000 packets/s; the generator at 50 % of a core spends 12.5 µs per packet, the
        // relay 10: 0.8.
        let level = json!({
            "relay_cpu_us_per_packet": 10.0,
            "relayed_packets_per_sec": 40_000.0,
            "generator_and_provider_cpu_pct": 50.0,
        });
        assert_eq!(relative_to_generator(&level), Some(0.8));
        let idle = json!({
            "relay_cpu_us_per_packet": 10.0,
            "relayed_packets_per_sec": 0.0,
            "generator_and_provider_cpu_pct": 50.0,
        });
        assert_eq!(relative_to_generator(&idle), None);
        assert_eq!(relative_to_generator(&json!({})), None);
    }

    #[test]
    fn b_over_a_compares_medians() {
        let (mut a, mut b) = (vec![10.0, 30.0, 12.0], vec![9.0, 11.0, 40.0]);
        // Medians 12 and 11.
        assert_eq!(ratio_of_medians(&mut a, &mut b), Some(0.917));
        assert_eq!(ratio_of_medians(&mut [], &mut b), None);
    }
}
