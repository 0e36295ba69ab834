//! How long one call's setup may take.
//!
//! The caller (the Envoy filter) waits `create_timeout_ms` and sends that as the gRPC
//! `grpc-timeout`. If the relay's own stages could take longer (DNS, STUN, the upstream
//! exchange), the caller's DEADLINE_EXCEEDED wins: it names no upstream, so a worker that
//! accepts TCP and hangs is never counted nor ejected, and tonic drops the setup mid-exchange.
//! So the setup runs under one budget, the caller's deadline less a margin for the answer to
//! travel back, and every stage takes at most what is left: the relay answers
//! `upstream_timeout` itself, in time, and the filter counts it against the worker.

use std::time::{Duration, Instant};

/// The deadline of one setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupBudget {
    deadline: Instant,
}

/// What is kept back from the caller's deadline for the answer to reach it: a tenth, between
/// 200 ms and 1 s.
pub fn margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(1))
}

impl SetupBudget {
    /// A budget starting `now`: at most `ceiling` (the relay's own worst case), and within the
    /// caller's `grpc_timeout` less [`margin`] when it sent one.
    pub fn new(now: Instant, grpc_timeout: Option<Duration>, ceiling: Duration) -> Self {
        let allowed = match grpc_timeout {
            Some(t) => ceiling.min(t.saturating_sub(margin(t))),
            None => ceiling,
        };
        SetupBudget {
            deadline: now + allowed,
        }
    }

    /// Time left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.deadline.saturating_duration_since(now)
    }

    /// `wanted`, or less if the budget has less left.
    pub fn limit(&self, wanted: Duration, now: Instant) -> Duration {
        wanted.min(self.remaining(now))
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// The value of a `grpc-timeout` header (gRPC over HTTP/2: 1-8 digits and a unit, `H`, `M`,
/// `S`, `m`, `u` or `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    let digits = value.get(..value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match value.as_bytes().last()? {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        let rows = [
            ("10000m", Some(ms(10_000))),
            ("10S", Some(ms(10_000))),
            ("1M", Some(Duration::from_secs(60))),
            ("2H", Some(Duration::from_secs(7200))),
            ("1500u", Some(Duration::from_micros(1500))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("123456789m", None),
            ("m", None),
            ("10", None),
            ("10s", None),
            ("-1S", None),
            ("1.5S", None),
            ("", None),
        ];
        for (value, want) in rows {
            assert_eq!(parse_grpc_timeout(value), want, "{value:?}");
        }
    }

    #[test]
    fn the_budget_ends_before_the_callers_deadline_and_never_after_the_ceiling() {
        let now = Instant::now();
        let ceiling = ms(16_000);
        // The filter's 10 s: the relay answers by 9 s.
        let b = SetupBudget::new(now, Some(ms(10_000)), ceiling);
        assert_eq!(b.remaining(now), ms(9_000));
        // Short and long deadlines: the margin stays between 200 ms and 1 s.
        assert_eq!(
            SetupBudget::new(now, Some(ms(1_000)), ceiling).remaining(now),
            ms(800)
        );
        assert_eq!(
            SetupBudget::new(now, Some(ms(100)), ceiling).remaining(now),
            ms(0)
        );
        assert_eq!(
            SetupBudget::new(now, Some(ms(60_000)), ceiling).remaining(now),
            ceiling
        );
        assert_eq!(SetupBudget::new(now, None, ceiling).remaining(now), ceiling);
        // Stages take what is left.
        assert_eq!(b.limit(ms(3_000), now + ms(8_000)), ms(1_000));
        assert_eq!(b.limit(ms(3_000), now), ms(3_000));
        assert_eq!(b.remaining(now + ms(20_000)), Duration::ZERO);
    }
}
