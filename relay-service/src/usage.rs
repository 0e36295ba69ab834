//! What a call used, read from the provider's events on their way to the client. The relay
//! terminates both legs, so every `oai-events` message crosses it in plaintext; the few that
//! carry usage are read here, after they were forwarded (the bridge forwards first, then
//! calls [`read`]), and never delay one.
//!
//! Cost: a prefilter on the event's type before any JSON parse ([`may_carry_usage`]: a SIMD
//! search for each `"type"` key, then a comparison of its string value with the few types
//! read here); only an event that passes is parsed, with serde_json, into the few fields read
//! here. Binary messages and audio (RTP) are never looked at. Measured with callgrind
//! (docs/benchmarks.md "Usage metering").
//!
//! The shapes are the official `openai` package's:
//! - Realtime `response.done`: `response.usage` (`RealtimeResponseUsage`), per response, so
//!   summed per call; `response.created` opens a response, so a call that ends with one open
//!   reports its usage as partial.
//! - Realtime `rate_limits.updated`: `rate_limits: [{name, limit, remaining,
//!   reset_seconds}]`, the latest kept.
//! - GPT-Live `session.usage.updated` and `session.closed`: `usage.seconds`, cumulative (a
//!   total: never summed); a Live call that ends without `session.closed` is partial.
//! - `error`: counted by `error.type` and `error.code`.

use memchr::memmem::Finder;
use serde::Deserialize;
use std::sync::OnceLock;

/// Token counts, as `RealtimeResponseUsage` has them (absent fields count 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub total: u64,
    pub input: u64,
    pub output: u64,
    pub input_text: u64,
    pub input_audio: u64,
    pub input_image: u64,
    pub input_cached: u64,
    pub cached_text: u64,
    pub cached_audio: u64,
    pub cached_image: u64,
    pub output_text: u64,
    pub output_audio: u64,
}

impl Tokens {
    fn add(&mut self, o: &Tokens) {
        self.total = self.total.saturating_add(o.total);
        self.input = self.input.saturating_add(o.input);
        self.output = self.output.saturating_add(o.output);
        self.input_text = self.input_text.saturating_add(o.input_text);
        self.input_audio = self.input_audio.saturating_add(o.input_audio);
        self.input_image = self.input_image.saturating_add(o.input_image);
        self.input_cached = self.input_cached.saturating_add(o.input_cached);
        self.cached_text = self.cached_text.saturating_add(o.cached_text);
        self.cached_audio = self.cached_audio.saturating_add(o.cached_audio);
        self.cached_image = self.cached_image.saturating_add(o.cached_image);
        self.output_text = self.output_text.saturating_add(o.output_text);
        self.output_audio = self.output_audio.saturating_add(o.output_audio);
    }
}

/// One entry of `rate_limits.updated`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RateLimit {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub remaining: Option<i64>,
    #[serde(default)]
    pub reset_seconds: Option<f64>,
}

/// Longest `rate_limits` list kept (OpenAI sends two: requests and tokens).
pub const MAX_RATE_LIMITS: usize = 8;
/// Longest error type or code kept; longer ones are cut (they become metric labels).
pub const MAX_ERROR_LABEL: usize = 64;

/// What one provider event says about usage.
#[derive(Debug, Clone, PartialEq)]
pub enum UsageEvent {
    /// `response.created`: a response whose usage will come with its `response.done`.
    ResponseCreated,
    /// `response.done` and its usage (zero when it carried none).
    ResponseDone(Tokens),
    /// `rate_limits.updated`, at most [`MAX_RATE_LIMITS`] entries.
    RateLimits(Vec<RateLimit>),
    /// GPT-Live cumulative seconds; `closed`: from `session.closed`, the final figure.
    LiveSeconds { seconds: f64, closed: bool },
    /// An `error` event's `error.type` and `error.code` (empty when absent).
    Error { kind: String, code: String },
}

/// The event types read here.
const USAGE_TYPES: [&[u8]; 6] = [
    b"response.done",
    b"response.created",
    b"rate_limits.updated",
    b"session.usage.updated",
    b"session.closed",
    b"error",
];

fn type_key() -> &'static Finder<'static> {
    static F: OnceLock<Finder<'static>> = OnceLock::new();
    F.get_or_init(|| Finder::new(b"\"type\""))
}

/// Whether `event` may be a usage event: one of its `"type"` keys has a string value among
/// [`USAGE_TYPES`]. Nested objects have `"type"` keys too (and keys come in any order), so
/// every occurrence is looked at; the parse that follows checks the top level. An event
/// that does not pass is never parsed.
pub fn may_carry_usage(event: &[u8]) -> bool {
    type_key().find_iter(event).any(|at| {
        let mut rest = &event[at + b"\"type\"".len()..];
        let skip_ws = |r: &mut &[u8]| {
            while let [b' ' | b'\t' | b'\n' | b'\r', tail @ ..] = *r {
                *r = tail;
            }
        };
        skip_ws(&mut rest);
        let [b':', tail @ ..] = rest else {
            return false;
        };
        rest = tail;
        skip_ws(&mut rest);
        let [b'"', value @ ..] = rest else {
            return false;
        };
        USAGE_TYPES
            .iter()
            .any(|t| value.len() > t.len() && value.starts_with(t) && value[t.len()] == b'"')
    })
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: Option<String>,
    response: Option<ResponseBody>,
    rate_limits: Option<Vec<RateLimit>>,
    usage: Option<LiveUsage>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ResponseBody {
    usage: Option<UsageBody>,
}

#[derive(Deserialize, Default)]
struct UsageBody {
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_token_details: Option<InputDetails>,
    output_token_details: Option<OutputDetails>,
}

#[derive(Deserialize, Default)]
struct InputDetails {
    text_tokens: Option<u64>,
    audio_tokens: Option<u64>,
    image_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    cached_tokens_details: Option<CachedDetails>,
}

#[derive(Deserialize, Default)]
struct CachedDetails {
    text_tokens: Option<u64>,
    audio_tokens: Option<u64>,
    image_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct OutputDetails {
    text_tokens: Option<u64>,
    audio_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct LiveUsage {
    seconds: Option<f64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
}

impl From<UsageBody> for Tokens {
    fn from(u: UsageBody) -> Tokens {
        let i = u.input_token_details.unwrap_or_default();
        let c = i.cached_tokens_details.unwrap_or_default();
        let o = u.output_token_details.unwrap_or_default();
        let input = u.input_tokens.unwrap_or(0);
        let output = u.output_tokens.unwrap_or(0);
        Tokens {
            // A provider that leaves the total out still has one.
            total: u.total_tokens.unwrap_or(input.saturating_add(output)),
            input,
            output,
            input_text: i.text_tokens.unwrap_or(0),
            input_audio: i.audio_tokens.unwrap_or(0),
            input_image: i.image_tokens.unwrap_or(0),
            input_cached: i.cached_tokens.unwrap_or(0),
            cached_text: c.text_tokens.unwrap_or(0),
            cached_audio: c.audio_tokens.unwrap_or(0),
            cached_image: c.image_tokens.unwrap_or(0),
            output_text: o.text_tokens.unwrap_or(0),
            output_audio: o.audio_tokens.unwrap_or(0),
        }
    }
}

/// A label value from a provider's string: bounded, and without characters that would make
/// it awkward in logs and metrics.
fn label(s: Option<String>) -> String {
    let mut s: String = s
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .collect();
    s.truncate(MAX_ERROR_LABEL);
    s
}

/// The usage `event` (a text message from the provider) carries, if any. The prefilter
/// first; then one parse of the fields read here.
pub fn read(event: &[u8]) -> Option<UsageEvent> {
    if !may_carry_usage(event) {
        return None;
    }
    let head: Head = serde_json::from_slice(event).ok()?;
    match head.kind.as_deref()? {
        "response.created" => Some(UsageEvent::ResponseCreated),
        "response.done" => Some(UsageEvent::ResponseDone(
            head.response
                .and_then(|r| r.usage)
                .map(Tokens::from)
                .unwrap_or_default(),
        )),
        "rate_limits.updated" => {
            let mut limits = head.rate_limits?;
            limits.truncate(MAX_RATE_LIMITS);
            for l in &mut limits {
                l.name = label(Some(std::mem::take(&mut l.name)));
            }
            Some(UsageEvent::RateLimits(limits))
        }
        kind @ ("session.usage.updated" | "session.closed") => {
            let seconds = head.usage?.seconds?;
            (seconds.is_finite() && seconds >= 0.0).then_some(UsageEvent::LiveSeconds {
                seconds,
                closed: kind == "session.closed",
            })
        }
        "error" => {
            let e = head.error?;
            Some(UsageEvent::Error {
                kind: label(e.kind),
                code: label(e.code),
            })
        }
        _ => None,
    }
}

/// What a call may use (`CreateCallRequest.budget`); `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Budget {
    pub max_tokens: Option<u64>,
    pub max_audio_seconds: Option<f64>,
}

impl Budget {
    /// From the contract: zero (or a value that is not a positive number) is no limit.
    pub fn from_proto(b: Option<&realtime_relay_proto::v1::CallBudget>) -> Budget {
        let Some(b) = b else {
            return Budget::default();
        };
        Budget {
            max_tokens: (b.max_tokens > 0).then_some(b.max_tokens),
            max_audio_seconds: (b.max_audio_seconds.is_finite() && b.max_audio_seconds > 0.0)
                .then_some(b.max_audio_seconds),
        }
    }

    pub fn is_none(&self) -> bool {
        self.max_tokens.is_none() && self.max_audio_seconds.is_none()
    }

    /// What of `usage` reached this budget, for the client's error message; `None` while
    /// within it.
    pub fn reached(&self, usage: &CallUsage) -> Option<String> {
        if let Some(max) = self.max_tokens.filter(|m| usage.tokens.total >= *m) {
            return Some(format!(
                "This call used {} tokens; its budget is {max}.",
                usage.tokens.total
            ));
        }
        if let Some(max) = self.max_audio_seconds.filter(|m| usage.audio_seconds >= *m) {
            return Some(format!(
                "This session used {:.1} audio seconds; its budget is {max}.",
                usage.audio_seconds
            ));
        }
        None
    }
}

/// One call's usage so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallUsage {
    /// Summed over the call's `response.done` events.
    pub tokens: Tokens,
    /// `response.done` events seen.
    pub responses: u64,
    /// `response.created` events whose `response.done` has not come.
    pub open_responses: u64,
    /// The latest `rate_limits.updated`.
    pub rate_limits: Vec<RateLimit>,
    /// GPT-Live: the latest cumulative seconds.
    pub audio_seconds: f64,
    /// GPT-Live: `session.closed` came, so `audio_seconds` is final.
    pub live_closed: bool,
    /// `error` events from the provider.
    pub error_events: u64,
}

/// What applying an event changed, for the metrics: the increments of the counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageDelta {
    pub tokens: Tokens,
    pub responses: u64,
    pub audio_seconds: f64,
}

impl CallUsage {
    /// Takes `event` into account; the increments it adds to the call's totals.
    pub fn apply(&mut self, event: &UsageEvent) -> UsageDelta {
        let mut delta = UsageDelta::default();
        match event {
            UsageEvent::ResponseCreated => {
                self.open_responses = self.open_responses.saturating_add(1);
            }
            UsageEvent::ResponseDone(t) => {
                self.tokens.add(t);
                self.responses += 1;
                self.open_responses = self.open_responses.saturating_sub(1);
                delta.tokens = *t;
                delta.responses = 1;
            }
            UsageEvent::RateLimits(l) => self.rate_limits = l.clone(),
            UsageEvent::LiveSeconds { seconds, closed } => {
                // A total: only its growth is new usage (a report that goes back, or comes
                // after the final one, adds nothing).
                if !self.live_closed && *seconds > self.audio_seconds {
                    delta.audio_seconds = seconds - self.audio_seconds;
                    self.audio_seconds = *seconds;
                }
                self.live_closed |= *closed;
            }
            UsageEvent::Error { .. } => self.error_events += 1,
        }
        delta
    }

    /// Whether the figures may miss usage: a Realtime response still open (its
    /// `response.done` never came), or a GPT-Live session that ended without `session.closed`
    /// (its last report is a lower bound).
    pub fn partial(&self, live: bool) -> bool {
        if live {
            !self.live_closed
        } else {
            self.open_responses > 0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DONE: &str = r#"{"type":"response.done","event_id":"e9","response":{"id":"resp_1","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"the word \"error\" and response.done"}]}],"usage":{"total_tokens":253,"input_tokens":200,"output_tokens":53,"input_token_details":{"text_tokens":120,"audio_tokens":70,"image_tokens":10,"cached_tokens":64,"cached_tokens_details":{"text_tokens":60,"audio_tokens":4,"image_tokens":0}},"output_token_details":{"text_tokens":13,"audio_tokens":40}}}}"#;

    #[test]
    fn a_response_done_gives_every_token_count_of_the_package() {
        let Some(UsageEvent::ResponseDone(t)) = read(DONE.as_bytes()) else {
            panic!("not read");
        };
        assert_eq!(
            t,
            Tokens {
                total: 253,
                input: 200,
                output: 53,
                input_text: 120,
                input_audio: 70,
                input_image: 10,
                input_cached: 64,
                cached_text: 60,
                cached_audio: 4,
                cached_image: 0,
                output_text: 13,
                output_audio: 40,
            }
        );
        // No usage object: a response that used nothing the provider reported.
        let bare = r#"{"type":"response.done","response":{"status":"cancelled"}}"#;
        assert_eq!(
            read(bare.as_bytes()),
            Some(UsageEvent::ResponseDone(Tokens::default()))
        );
    }

    #[test]
    fn only_events_of_these_types_are_read_and_the_rest_never_parsed() {
        for (event, want) in [
            (
                r#"{"type":"response.created","response":{}}"#,
                Some(UsageEvent::ResponseCreated),
            ),
            (
                r#"{"type":"rate_limits.updated","rate_limits":[{"name":"requests","limit":1000,"remaining":999,"reset_seconds":0.06},{"name":"tokens","limit":50000,"remaining":49000,"reset_seconds":1.2}]}"#,
                Some(UsageEvent::RateLimits(vec![
                    RateLimit {
                        name: "requests".into(),
                        limit: Some(1000),
                        remaining: Some(999),
                        reset_seconds: Some(0.06),
                    },
                    RateLimit {
                        name: "tokens".into(),
                        limit: Some(50000),
                        remaining: Some(49000),
                        reset_seconds: Some(1.2),
                    },
                ])),
            ),
            (
                r#"{"event_id":"e","type":"session.usage.updated","usage":{"seconds":12.5},"context_window":{"usage_ratio":0.1}}"#,
                Some(UsageEvent::LiveSeconds {
                    seconds: 12.5,
                    closed: false,
                }),
            ),
            (
                r#"{"type":"session.closed","reason":"close_requested","session":{},"usage":{"seconds":13}}"#,
                Some(UsageEvent::LiveSeconds {
                    seconds: 13.0,
                    closed: true,
                }),
            ),
            (
                r#"{"type":"error","event_id":"e","error":{"type":"invalid_request_error","code":"unknown_parameter","message":"x"}}"#,
                Some(UsageEvent::Error {
                    kind: "invalid_request_error".into(),
                    code: "unknown_parameter".into(),
                }),
            ),
            // Types that only mention a needle somewhere are parsed and dropped.
            (
                r#"{"type":"conversation.item.created","item":{"status":"error"}}"#,
                None,
            ),
            (
                r#"{"type":"response.output_text.delta","delta":"response.done"}"#,
                None,
            ),
            (
                r#"{"type":"session.usage.updated","usage":{"seconds":-1}}"#,
                None,
            ),
            (r#"{"type":"response.done""#, None),
            ("", None),
        ] {
            assert_eq!(read(event.as_bytes()), want, "{event}");
        }
        // The prefilter: an ordinary event (a delta, a transcript) is only searched; the type
        // is found whatever the key order or spacing; a type that only starts like one of ours
        // or a mention elsewhere does not pass.
        for (event, want) in [
            (
                &br#"{"type":"response.output_audio_transcript.delta","delta":"response.done"}"#[..],
                false,
            ),
            (br#"{"type":"response.done_x"}"#, false),
            (br#"{"text":"\"type\":\"error\""}"#, false),
            (br#"{"type":"error"}"#, true),
            (br#"{"event_id":"e","type" : "session.closed"}"#, true),
            (
                br#"{"item":{"type":"message"},"type":"response.done"}"#,
                true,
            ),
            (br#"{"type""#, false),
            (b"", false),
        ] {
            assert_eq!(
                may_carry_usage(event),
                want,
                "{}",
                String::from_utf8_lossy(event)
            );
        }
        assert!(may_carry_usage(DONE.as_bytes()));
    }

    #[test]
    fn provider_strings_become_bounded_labels() {
        let long = format!(
            r#"{{"type":"error","error":{{"type":"x y\n{}","code":null}}}}"#,
            "z".repeat(500)
        );
        let Some(UsageEvent::Error { kind, code }) = read(long.as_bytes()) else {
            panic!()
        };
        assert_eq!(kind.len(), MAX_ERROR_LABEL);
        assert!(kind.starts_with("xyz"));
        assert_eq!(code, "");
        let many = format!(
            r#"{{"type":"rate_limits.updated","rate_limits":[{}]}}"#,
            vec![r#"{"name":"requests"}"#; 20].join(",")
        );
        let Some(UsageEvent::RateLimits(l)) = read(many.as_bytes()) else {
            panic!()
        };
        assert_eq!(l.len(), MAX_RATE_LIMITS);
    }

    #[test]
    fn a_budget_is_reached_by_the_calls_totals_and_zero_means_none() {
        let b = Budget::from_proto(Some(&realtime_relay_proto::v1::CallBudget {
            max_tokens: 500,
            max_audio_seconds: 0.0,
        }));
        assert_eq!((b.max_tokens, b.max_audio_seconds), (Some(500), None));
        let mut u = CallUsage::default();
        let done = read(DONE.as_bytes()).unwrap(); // 253 tokens
        u.apply(&done);
        assert!(b.reached(&u).is_none());
        u.apply(&done);
        assert!(b.reached(&u).unwrap().contains("506 tokens"));
        let live = Budget::from_proto(Some(&realtime_relay_proto::v1::CallBudget {
            max_tokens: 0,
            max_audio_seconds: 3.0,
        }));
        let mut s = CallUsage::default();
        s.apply(&UsageEvent::LiveSeconds {
            seconds: 2.9,
            closed: false,
        });
        assert!(live.reached(&s).is_none());
        s.apply(&UsageEvent::LiveSeconds {
            seconds: 3.0,
            closed: false,
        });
        assert!(live.reached(&s).is_some());
        assert!(Budget::from_proto(None).is_none());
    }

    #[test]
    fn responses_are_summed_and_live_seconds_are_a_total_never_summed() {
        let mut u = CallUsage::default();
        let done = read(DONE.as_bytes()).unwrap();
        u.apply(&UsageEvent::ResponseCreated);
        let d = u.apply(&done);
        assert_eq!((d.responses, d.tokens.total), (1, 253));
        u.apply(&UsageEvent::ResponseCreated);
        u.apply(&done);
        assert_eq!(
            (u.responses, u.tokens.total, u.tokens.output_audio),
            (2, 506, 80)
        );
        assert!(!u.partial(false));
        u.apply(&UsageEvent::ResponseCreated);
        assert!(u.partial(false), "a response still open at the end");

        let mut live = CallUsage::default();
        let mut added = 0.0;
        for (seconds, closed) in [
            (1.0, false),
            (2.0, false),
            (1.5, false),
            (3.25, true),
            (9.0, false),
        ] {
            added += live
                .apply(&UsageEvent::LiveSeconds { seconds, closed })
                .audio_seconds;
        }
        assert_eq!(live.audio_seconds, 3.25);
        assert_eq!(added, 3.25, "the increments add up to the final total");
        assert!(!live.partial(true));
        let mut cut = CallUsage::default();
        cut.apply(&UsageEvent::LiveSeconds {
            seconds: 4.0,
            closed: false,
        });
        assert!(cut.partial(true), "no session.closed: a lower bound");
    }

    /// Profiling aid, run under callgrind (docs/benchmarks.md "Usage metering"): reads a
    /// transcript delta (a prefilter miss, the common case) and a priced `response.done` (a
    /// hit and a parse) `COST_ROUNDS` times each, in separately named functions.
    #[test]
    #[ignore = "a profiling aid: run under valgrind --tool=callgrind"]
    fn usage_read_cost() {
        const COST_ROUNDS: usize = 1000;
        let delta = br#"{"type":"response.output_audio_transcript.delta","event_id":"event_8f2","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"Hello there, how can I help you today with your account?"}"#;
        #[inline(never)]
        fn cost_miss(e: &[u8]) -> bool {
            read(std::hint::black_box(e)).is_none()
        }
        #[inline(never)]
        fn cost_hit(e: &[u8]) -> bool {
            read(std::hint::black_box(e)).is_some()
        }
        for _ in 0..COST_ROUNDS {
            assert!(cost_miss(delta));
            assert!(cost_hit(DONE.as_bytes()));
        }
    }
}
