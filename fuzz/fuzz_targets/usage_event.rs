//! The relay's reading of the provider's data-channel events (usage, rate limits, Live
//! seconds, errors): any bytes. Properties: no panic; an event the reader takes always passed
//! the prefilter (the prefilter never hides usage); labels it keeps are bounded; a call's
//! totals never go down and Live seconds never exceed the largest report.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_service::usage::{self, CallUsage, UsageEvent, MAX_ERROR_LABEL, MAX_RATE_LIMITS};

fuzz_target!(|data: &[u8]| {
    let passed = usage::may_carry_usage(data);
    let Some(event) = usage::read(data) else {
        return;
    };
    assert!(passed, "read an event the prefilter would have skipped");
    match &event {
        UsageEvent::Error { kind, code } => {
            assert!(kind.len() <= MAX_ERROR_LABEL && code.len() <= MAX_ERROR_LABEL);
        }
        UsageEvent::RateLimits(l) => assert!(l.len() <= MAX_RATE_LIMITS),
        UsageEvent::LiveSeconds { seconds, .. } => assert!(seconds.is_finite() && *seconds >= 0.0),
        _ => {}
    }
    let mut u = CallUsage::default();
    for _ in 0..3 {
        let before = u.clone();
        u.apply(&event);
        assert!(u.tokens.total >= before.tokens.total);
        assert!(u.audio_seconds >= before.audio_seconds);
    }
});
