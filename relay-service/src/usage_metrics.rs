//! Prometheus metrics of what calls used (`usage.rs` reads it from the provider's events).
//! Labels stay bounded: the model (the first [`MAX_MODELS`] names seen, then `other`: with a
//! catch-all route clients name models), the worker (from the gateway's configuration), the
//! token direction and kind (fixed sets), the provider's error type and code (the first
//! [`MAX_ERROR_LABELS`] pairs, then `other`) and the rate-limit name (`requests`, `tokens`,
//! else `other`). Counters a call adds to are resolved once, when its bridge starts.

use crate::usage::{RateLimit, UsageDelta};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

/// Distinct model label values; later models are counted as `other`.
pub const MAX_MODELS: usize = 64;
/// Distinct (type, code) pairs of provider error events; later ones are `other`.
pub const MAX_ERROR_LABELS: usize = 64;
/// The label value for whatever is beyond a cap.
pub const OTHER: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub worker: String,
    /// `input` or `output`.
    pub direction: &'static str,
    /// `text`, `audio`, `image` or `cached` (input only).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelWorkerLabels {
    pub model: String,
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The event's `error.type`.
    pub error_type: String,
    /// The event's `error.code`.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub worker: String,
    pub name: &'static str,
}

type SecondsCounter = Counter<f64, AtomicU64>;

#[derive(Default)]
pub struct UsageMetrics {
    tokens: Family<TokenLabels, Counter>,
    responses: Family<ModelWorkerLabels, Counter>,
    live_seconds: Family<ModelWorkerLabels, SecondsCounter>,
    error_events: Family<ErrorLabels, Counter>,
    rate_limit_remaining: Family<RateLimitLabels, Gauge>,
    rate_limit_limit: Family<RateLimitLabels, Gauge>,
    models: Mutex<HashSet<String>>,
    errors: Mutex<HashSet<(String, String)>>,
}

/// The counters one call adds to (its model's and worker's).
#[derive(Clone, Default)]
pub struct CallUsageMetrics {
    input_text: Counter,
    input_audio: Counter,
    input_image: Counter,
    input_cached: Counter,
    output_text: Counter,
    output_audio: Counter,
    responses: Counter,
    live_seconds: SecondsCounter,
}

impl CallUsageMetrics {
    pub fn add(&self, d: &UsageDelta) {
        let t = &d.tokens;
        for (c, n) in [
            (&self.input_text, t.input_text),
            (&self.input_audio, t.input_audio),
            (&self.input_image, t.input_image),
            (&self.input_cached, t.input_cached),
            (&self.output_text, t.output_text),
            (&self.output_audio, t.output_audio),
            (&self.responses, d.responses),
        ] {
            if n > 0 {
                c.inc_by(n);
            }
        }
        if d.audio_seconds > 0.0 {
            self.live_seconds.inc_by(d.audio_seconds);
        }
    }
}

impl UsageMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "usage_tokens",
            "Tokens the provider reported in response.done events (response.usage), by model, worker, direction (input, output) and kind (text, audio, image; cached: input tokens served from the cache)",
            self.tokens.clone(),
        );
        registry.register(
            "usage_responses",
            "Responses done (response.done events), by model and worker",
            self.responses.clone(),
        );
        registry.register(
            "usage_live_audio_seconds",
            "GPT-Live audio seconds the provider reported (the growth of each session's cumulative usage.seconds), by model and worker",
            self.live_seconds.clone(),
        );
        registry.register(
            "upstream_error_events",
            "error events the provider sent on calls' data channels, by error type and code",
            self.error_events.clone(),
        );
        registry.register(
            "rate_limit_remaining",
            "The latest rate_limits.updated remaining value per worker and limit (requests, tokens)",
            self.rate_limit_remaining.clone(),
        );
        registry.register(
            "rate_limit_limit",
            "The latest rate_limits.updated limit per worker and limit (requests, tokens)",
            self.rate_limit_limit.clone(),
        );
    }

    /// `model` as a label: itself while fewer than [`MAX_MODELS`] are known, else `other`.
    fn model_label(&self, model: &str) -> String {
        let mut known = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(model) {
            return model.to_string();
        }
        if known.len() < MAX_MODELS {
            known.insert(model.to_string());
            return model.to_string();
        }
        OTHER.to_string()
    }

    /// The counters a call of `model` on `worker` adds to.
    pub fn for_call(&self, model: &str, worker: &str) -> CallUsageMetrics {
        let model = self.model_label(model);
        let tokens = |direction, kind| {
            self.tokens
                .get_or_create(&TokenLabels {
                    model: model.clone(),
                    worker: worker.to_string(),
                    direction,
                    kind,
                })
                .clone()
        };
        let mw = ModelWorkerLabels {
            model: model.clone(),
            worker: worker.to_string(),
        };
        CallUsageMetrics {
            input_text: tokens("input", "text"),
            input_audio: tokens("input", "audio"),
            input_image: tokens("input", "image"),
            input_cached: tokens("input", "cached"),
            output_text: tokens("output", "text"),
            output_audio: tokens("output", "audio"),
            responses: self.responses.get_or_create(&mw).clone(),
            live_seconds: self.live_seconds.get_or_create(&mw).clone(),
        }
    }

    /// Counts a provider `error` event.
    pub fn error_event(&self, kind: &str, code: &str) {
        let pair = (kind.to_string(), code.to_string());
        let labels = {
            let mut known = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            if known.contains(&pair) || known.len() < MAX_ERROR_LABELS {
                known.insert(pair.clone());
                pair
            } else {
                (OTHER.to_string(), OTHER.to_string())
            }
        };
        self.error_events
            .get_or_create(&ErrorLabels {
                error_type: labels.0,
                code: labels.1,
            })
            .inc();
    }

    /// Keeps a worker's latest rate limits.
    pub fn rate_limits(&self, worker: &str, limits: &[RateLimit]) {
        for l in limits {
            let name = match l.name.as_str() {
                "requests" => "requests",
                "tokens" => "tokens",
                _ => OTHER,
            };
            let labels = RateLimitLabels {
                worker: worker.to_string(),
                name,
            };
            if let Some(v) = l.remaining {
                self.rate_limit_remaining.get_or_create(&labels).set(v);
            }
            if let Some(v) = l.limit {
                self.rate_limit_limit.get_or_create(&labels).set(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Tokens;

    fn scrape(m: &UsageMetrics) -> String {
        let mut r = Registry::with_prefix("realtime_relay");
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn a_calls_usage_lands_on_its_model_and_worker() {
        let m = UsageMetrics::default();
        let c = m.for_call("gpt-realtime", "w1");
        c.add(&UsageDelta {
            tokens: Tokens {
                input_text: 5,
                input_audio: 7,
                input_cached: 2,
                output_audio: 11,
                ..Tokens::default()
            },
            responses: 1,
            audio_seconds: 1.5,
        });
        m.error_event("invalid_request_error", "unknown_parameter");
        m.rate_limits(
            "w1",
            &[RateLimit {
                name: "tokens".into(),
                limit: Some(1000),
                remaining: Some(900),
                reset_seconds: None,
            }],
        );
        let text = scrape(&m);
        for line in [
            r#"realtime_relay_usage_tokens_total{model="gpt-realtime",worker="w1",direction="input",kind="audio"} 7"#,
            r#"realtime_relay_usage_tokens_total{model="gpt-realtime",worker="w1",direction="input",kind="cached"} 2"#,
            r#"realtime_relay_usage_tokens_total{model="gpt-realtime",worker="w1",direction="output",kind="audio"} 11"#,
            r#"realtime_relay_usage_responses_total{model="gpt-realtime",worker="w1"} 1"#,
            r#"realtime_relay_usage_live_audio_seconds_total{model="gpt-realtime",worker="w1"} 1.5"#,
            r#"realtime_relay_upstream_error_events_total{error_type="invalid_request_error",code="unknown_parameter"} 1"#,
            r#"realtime_relay_rate_limit_remaining{worker="w1",name="tokens"} 900"#,
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }

    #[test]
    fn labels_a_client_or_provider_names_are_capped() {
        let m = UsageMetrics::default();
        for i in 0..MAX_MODELS + 5 {
            m.for_call(&format!("model-{i}"), "w").add(&UsageDelta {
                responses: 1,
                ..UsageDelta::default()
            });
        }
        for i in 0..MAX_ERROR_LABELS + 5 {
            m.error_event("server_error", &format!("code_{i}"));
        }
        let text = scrape(&m);
        assert!(
            text.contains(r#"realtime_relay_usage_responses_total{model="other",worker="w"} 5"#),
            "{text}"
        );
        assert!(text.contains(
            r#"realtime_relay_upstream_error_events_total{error_type="other",code="other"} 5"#
        ));
        assert_eq!(
            text.matches("realtime_relay_usage_responses_total{")
                .count(),
            MAX_MODELS + 1
        );
    }
}
