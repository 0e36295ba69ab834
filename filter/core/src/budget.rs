//! Per-call usage budgets: how much one call may use before the relay ends it (it reads the
//! usage from the call's events; `CallBudget` in `relay.proto`). Set per pool, overridden per
//! operator API key, and carried in the ephemeral keys such a key mints (`ephemeral::Claims`),
//! so a page's call gets its backend's budget.

use serde::{Deserialize, Serialize};

/// Largest token budget accepted (a typo guard, not a policy).
pub const MAX_TOKENS: u64 = 1_000_000_000;
/// Largest audio-seconds budget accepted: a day.
pub const MAX_AUDIO_SECONDS: f64 = 86_400.0;

/// A budget as configured. Each field `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Realtime calls: total tokens of the call's responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_call: Option<u64>,
    /// GPT-Live sessions: cumulative audio seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_seconds_per_call: Option<f64>,
}

/// Equality is total: a budget never holds NaN (JSON has no NaN, and `validate` refuses
/// anything but a positive finite number of seconds).
impl Eq for Budget {}

impl Budget {
    /// `self`, with each field `over` sets taking its place.
    pub fn overridden_by(self, over: Option<Budget>) -> Budget {
        match over {
            None => self,
            Some(o) => Budget {
                tokens_per_call: o.tokens_per_call.or(self.tokens_per_call),
                audio_seconds_per_call: o.audio_seconds_per_call.or(self.audio_seconds_per_call),
            },
        }
    }

    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self
            .tokens_per_call
            .is_some_and(|t| t == 0 || t > MAX_TOKENS)
        {
            return Err(format!(
                "{at}.budget.tokens_per_call must be 1-{MAX_TOKENS} (omit it for none)"
            ));
        }
        if self
            .audio_seconds_per_call
            .is_some_and(|s| !(s.is_finite() && s > 0.0 && s <= MAX_AUDIO_SECONDS))
        {
            return Err(format!(
                "{at}.budget.audio_seconds_per_call must be above 0 and at most {MAX_AUDIO_SECONDS} (omit it for none)"
            ));
        }
        Ok(())
    }

    pub fn is_none(&self) -> bool {
        *self == Budget::default()
    }

    /// The contract's form (zero: no limit).
    pub fn proto(&self) -> Option<realtime_relay_proto::v1::CallBudget> {
        (!self.is_none()).then(|| realtime_relay_proto::v1::CallBudget {
            max_tokens: self.tokens_per_call.unwrap_or(0),
            max_audio_seconds: self.audio_seconds_per_call.unwrap_or(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_budget_overrides_its_pools_field_by_field_and_bad_ones_are_refused() {
        let pool = Budget {
            tokens_per_call: Some(1000),
            audio_seconds_per_call: Some(60.0),
        };
        let key = Budget {
            tokens_per_call: Some(50),
            audio_seconds_per_call: None,
        };
        assert_eq!(
            pool.overridden_by(Some(key)),
            Budget {
                tokens_per_call: Some(50),
                audio_seconds_per_call: Some(60.0)
            }
        );
        assert_eq!(pool.overridden_by(None), pool);
        let p = pool.proto().unwrap();
        assert_eq!((p.max_tokens, p.max_audio_seconds), (1000, 60.0));
        assert!(Budget::default().proto().is_none());
        for bad in [
            r#"{"tokens_per_call": 0}"#,
            r#"{"audio_seconds_per_call": 0}"#,
            r#"{"audio_seconds_per_call": -1}"#,
            r#"{"audio_seconds_per_call": 1e9}"#,
            r#"{"tokens_per_call": 2000000000}"#,
        ] {
            let b: Budget = serde_json::from_str(bad).unwrap();
            assert!(b.validate("pool 'p'").is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Budget>(r#"{"tokens": 5}"#).is_err());
    }
}
