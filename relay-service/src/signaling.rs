//! The upstream SDP exchange over HTTP, by API: POST the offer to
//! `{base}/v1/realtime/calls` (Realtime: the answer is the SDP, the provider's call id the
//! last segment of `Location`) or to `{base}/v1/live/sessions` (GPT-Live: JSON both ways,
//! the answer `{"session": {"id"}, "transport": {"type": "webrtc", "sdp"}}`), read the
//! answer or the rejection; and the provider's hangup for the call,
//! `{base}/v1/realtime/calls/{id}/hangup` or `{base}/v1/live/sessions/{id}/hangup`.
//!
//! Redirects are never followed (they would bypass the allowlist), no proxy from the
//! environment is used, addresses are filtered by the allowlist's resolver, and both
//! the connect and the whole exchange have timeouts. Bodies are read up to a cap.

use crate::allowlist::{Allowlist, PolicyResolver};
use crate::error::SetupError;
use crate::upstream_body::UpstreamBody;
use realtime_relay_proto::call_id::Kind;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

#[derive(Debug)]
pub enum ExchangeOutcome {
    Answer {
        sdp: String,
        /// The provider's call id: last segment of its `Location` (Realtime, if any), or
        /// the `session.id` of its answer (GPT-Live, always).
        upstream_call_id: Option<String>,
    },
    /// A non-2xx answer, to be passed back to the client verbatim.
    Rejected {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
}

/// The provider's side of one call, as the relay hangs it up: where, with which key, and
/// under which API's path.
pub struct UpstreamCall {
    pub kind: Kind,
    pub base: Url,
    authorization: Option<String>,
    /// The provider's id for the call (its `Location`'s last segment, or the Live
    /// `session.id`).
    pub id: String,
    /// Set by whoever sends the provider's hangup: it is sent once per call.
    hangup_claimed: AtomicBool,
}

impl UpstreamCall {
    pub fn new(kind: Kind, base: Url, authorization: Option<&str>, id: String) -> Self {
        UpstreamCall {
            kind,
            base,
            authorization: authorization.filter(|a| !a.is_empty()).map(str::to_string),
            id,
            hangup_claimed: AtomicBool::new(false),
        }
    }

    /// True for the first caller only: it sends the provider's hangup, nobody else does.
    pub fn claim_hangup(&self) -> bool {
        !self.hangup_claimed.swap(true, Ordering::AcqRel)
    }
}

/// Without the key: call entries (which hold this) are logged with `{:?}`.
impl std::fmt::Debug for UpstreamCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamCall")
            .field("kind", &self.kind)
            .field("base", &self.base.as_str())
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("id", &self.id)
            .finish()
    }
}

/// The HTTP client for the upstream exchange could not be built (TLS roots, resolver).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the upstream HTTP client: {0}")]
pub struct UpstreamClientError(#[source] reqwest::Error);

#[derive(Debug, Clone)]
pub struct UpstreamClient {
    http: reqwest::Client,
    max_body_bytes: usize,
}

/// How the relay's HTTP client talks to upstreams (from the relay's flags).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamHttp {
    pub connect_timeout: Duration,
    /// The whole SDP exchange (or hangup), connect included.
    pub exchange_timeout: Duration,
    pub max_body_bytes: usize,
    /// Kept-alive connections idle this long are closed (`--upstream-pool-idle-secs`).
    pub pool_idle_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(
        allowlist: Arc<Allowlist>,
        settings: UpstreamHttp,
    ) -> Result<Self, UpstreamClientError> {
        let UpstreamHttp {
            connect_timeout,
            exchange_timeout,
            max_body_bytes,
            pool_idle_timeout,
        } = settings;
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(exchange_timeout)
            .pool_idle_timeout(pool_idle_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver { allowlist }))
            .user_agent(concat!("realtime-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(UpstreamClientError)?;
        Ok(Self {
            http,
            max_body_bytes,
        })
    }

    /// The path under the base URL where calls of `kind` are created.
    pub fn create_path(kind: Kind) -> &'static str {
        match kind {
            Kind::Realtime => "/v1/realtime/calls",
            Kind::Live => "/v1/live/sessions",
        }
    }

    pub fn calls_url(base: &Url) -> Result<Url, SetupError> {
        Self::create_url(base, Kind::Realtime)
    }

    /// Where a call of `kind` is created: `{base}/v1/realtime/calls` or
    /// `{base}/v1/live/sessions`.
    pub fn create_url(base: &Url, kind: Kind) -> Result<Url, SetupError> {
        let mut s = base.as_str().trim_end_matches('/').to_string();
        s.push_str(Self::create_path(kind));
        Url::parse(&s).map_err(|_| SetupError::UpstreamNotAllowed("bad upstream URL".into()))
    }

    /// `{create url}/{id}/hangup`; `None` for an id that is not one path segment of
    /// `[A-Za-z0-9_-]` (ids come from the provider: they never steer the URL elsewhere).
    pub fn hangup_url(base: &Url, kind: Kind, upstream_call_id: &str) -> Option<Url> {
        if !is_safe_id(upstream_call_id) {
            return None;
        }
        let s = format!(
            "{}{}/{}/hangup",
            base.as_str().trim_end_matches('/'),
            Self::create_path(kind),
            upstream_call_id
        );
        Url::parse(&s).ok()
    }

    /// POSTs the offer for a call of `kind` and reads the answer, all within `timeout` (the
    /// client's own timeout when shorter). Any 2xx is an answer (the `openai` package takes
    /// any 2xx: Realtime answers 201, a JSON create 200); anything else comes back verbatim.
    pub async fn exchange(
        &self,
        base: &Url,
        kind: Kind,
        authorization: Option<&str>,
        body: UpstreamBody,
        timeout: Duration,
    ) -> Result<ExchangeOutcome, SetupError> {
        let url = Self::create_url(base, kind)?;
        if timeout.is_zero() {
            // The setup's budget is spent: asking now could only create a call we abandon.
            return Err(SetupError::UpstreamTimeout);
        }
        let mut req = self
            .http
            .post(url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, body.content_type)
            .body(body.bytes);
        if let Some(auth) = authorization.filter(|a| !a.is_empty()) {
            req = req.header(reqwest::header::AUTHORIZATION, auth);
        }
        let mut resp = req.send().await.map_err(classify)?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(classify)? {
            if bytes.len() + chunk.len() > self.max_body_bytes {
                return Err(SetupError::UpstreamInvalidAnswer(format!(
                    "the upstream answer is larger than {} bytes",
                    self.max_body_bytes
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        read_answer(
            kind,
            status.as_u16(),
            content_type,
            location.as_deref(),
            bytes,
        )
    }

    /// Best-effort hangup of the provider-side call (`call.claim_hangup()` first: it is sent
    /// once). Returns once the provider answered, or the exchange timeout passed.
    pub async fn hangup(&self, call: &UpstreamCall) {
        let Some(url) = Self::hangup_url(&call.base, call.kind, &call.id) else {
            return;
        };
        let mut req = self.http.post(url);
        if let Some(auth) = &call.authorization {
            req = req.header(reqwest::header::AUTHORIZATION, auth);
        }
        match req.send().await {
            Ok(resp) if !resp.status().is_success() => {
                tracing::debug!(status = resp.status().as_u16(), "upstream hangup refused")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %classify(e), "upstream hangup failed"),
        }
    }
}

/// What the provider's reply to a create means, once its body is read (pure; the fuzz
/// target `upstream_answer` drives it). Any 2xx is an answer: Realtime's body is the SDP and
/// its `Location` names the provider's call; GPT-Live's is JSON ([`live_answer`]). Anything
/// else is a rejection, passed back verbatim.
pub fn read_answer(
    kind: Kind,
    status: u16,
    content_type: String,
    location: Option<&str>,
    body: Vec<u8>,
) -> Result<ExchangeOutcome, SetupError> {
    if !(200..300).contains(&status) {
        return Ok(ExchangeOutcome::Rejected {
            status,
            content_type,
            body,
        });
    }
    match kind {
        Kind::Realtime => {
            let sdp = String::from_utf8(body).map_err(|_| {
                SetupError::UpstreamInvalidAnswer("the upstream answer is not UTF-8".into())
            })?;
            Ok(ExchangeOutcome::Answer {
                sdp,
                upstream_call_id: location.and_then(last_segment),
            })
        }
        Kind::Live => {
            let (sdp, id) = live_answer(&body)?;
            Ok(ExchangeOutcome::Answer {
                sdp,
                upstream_call_id: Some(id),
            })
        }
    }
}

/// An id the provider gave that may go into a URL path as one segment, logs and
/// `CallInfo`: 1 to 128 of `[A-Za-z0-9_-]`.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A GPT-Live create answer (`LiveCreateResponse` in the `openai` package): what the relay
/// reads of it. Other fields are ignored.
#[derive(Deserialize)]
struct LiveAnswer {
    session: LiveAnswerSession,
    transport: LiveAnswerTransport,
}

#[derive(Deserialize)]
struct LiveAnswerSession {
    id: String,
}

#[derive(Deserialize)]
struct LiveAnswerTransport {
    #[serde(rename = "type")]
    kind: String,
    sdp: String,
}

/// The SDP answer and the provider's session id of a 2xx GPT-Live answer. Anything else is
/// the worker's fault (`upstream_invalid_answer`); the message never quotes the body (it
/// holds SDP).
fn live_answer(body: &[u8]) -> Result<(String, String), SetupError> {
    let invalid = |why: String| SetupError::UpstreamInvalidAnswer(why);
    let answer: LiveAnswer = serde_json::from_slice(body).map_err(|e| {
        invalid(format!(
            "the upstream's answer is not a GPT-Live session ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    if answer.transport.kind != "webrtc" {
        return Err(invalid(
            "the upstream's answer has a transport other than webrtc".into(),
        ));
    }
    if answer.transport.sdp.trim().is_empty() {
        return Err(invalid("the upstream's answer has no SDP".into()));
    }
    if !is_safe_id(&answer.session.id) {
        return Err(invalid(
            "the upstream's session id is not 1 to 128 letters, digits, '_' or '-'".into(),
        ));
    }
    Ok((answer.transport.sdp, answer.session.id))
}

fn last_segment(location: &str) -> Option<String> {
    let seg = location
        .split(['?', '#'])
        .next()?
        .trim_end_matches('/')
        .rsplit('/')
        .next()?;
    is_safe_id(seg).then(|| seg.to_string())
}

/// Maps transport errors; the message never includes the URL's credentials (there are
/// none: the allowlist refuses them) nor the Authorization header.
fn classify(e: reqwest::Error) -> SetupError {
    if e.is_timeout() {
        SetupError::UpstreamTimeout
    } else if e.is_connect() {
        SetupError::UpstreamUnreachable("cannot connect to the upstream".into())
    } else {
        SetupError::UpstreamUnreachable(format!(
            "the upstream exchange failed: {}",
            e.without_url()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_call_id_is_the_last_location_segment() {
        assert_eq!(
            last_segment("/v1/realtime/calls/rtc_abc").as_deref(),
            Some("rtc_abc")
        );
        assert_eq!(
            last_segment("https://x/v1/realtime/calls/rtc_1/?q").as_deref(),
            Some("rtc_1")
        );
        assert_eq!(last_segment("/v1/realtime/calls/../x y"), None);
    }

    /// An HTTP/1.1 server on loopback that answers every request with `(status, content
    /// type, body)` and hands each request (head and body) to the test.
    async fn canned(
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> (Url, tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break Some(i + 4);
                    }
                };
                let Some(head_end) = head_end else { continue };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let _ = tx.send((head, buf[head_end..].to_vec()));
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            }
        });
        (base, rx)
    }

    fn client(base: &Url) -> UpstreamClient {
        let allowlist =
            Allowlist::new(&[base.as_str().trim_end_matches('/').into()], true).unwrap();
        UpstreamClient::new(
            Arc::new(allowlist),
            UpstreamHttp {
                connect_timeout: Duration::from_secs(2),
                exchange_timeout: Duration::from_secs(5),
                max_body_bytes: 64 * 1024,
                pool_idle_timeout: Duration::from_secs(90),
            },
        )
        .unwrap()
    }

    const SDP: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n";

    /// One row per GPT-Live answer: its status and body, and what the relay makes of it
    /// (the session id and SDP, a rejection passed back verbatim, or the error code).
    #[tokio::test]
    async fn live_answers_table() {
        let ok = |id: &str| {
            serde_json::json!({"session": {"id": id}, "transport": {"type": "webrtc", "sdp": SDP}})
                .to_string()
        };
        enum Want {
            Answer(&'static str),
            Rejected,
            Fails(&'static str),
        }
        let rows: Vec<(u16, String, Want)> = vec![
            (200, ok("live_abc123"), Want::Answer("live_abc123")),
            (201, ok("live_abc123"), Want::Answer("live_abc123")),
            // Other fields (a resolved session, say) are ignored; the id is opaque.
            (
                200,
                serde_json::json!({"session": {"id": "sess-9", "model": "gpt-live-1"},
                    "transport": {"type": "webrtc", "sdp": SDP}, "extra": 1})
                .to_string(),
                Want::Answer("sess-9"),
            ),
            (
                400,
                r#"{"error":{"code":"invalid_value"}}"#.into(),
                Want::Rejected,
            ),
            (503, "busy".into(), Want::Rejected),
            (200, SDP.into(), Want::Fails("upstream_invalid_answer")),
            (200, "{".into(), Want::Fails("upstream_invalid_answer")),
            (200, "[]".into(), Want::Fails("upstream_invalid_answer")),
            (
                200,
                r#"{"transport":{"type":"webrtc","sdp":"v=0"}}"#.into(),
                Want::Fails("upstream_invalid_answer"),
            ),
            (
                200,
                r#"{"session":{"id":"live_1"},"transport":{"type":"websocket","sdp":"v=0"}}"#
                    .into(),
                Want::Fails("upstream_invalid_answer"),
            ),
            (
                200,
                r#"{"session":{"id":"live_1"},"transport":{"type":"webrtc"}}"#.into(),
                Want::Fails("upstream_invalid_answer"),
            ),
            (
                200,
                r#"{"session":{"id":"live_1"},"transport":{"type":"webrtc","sdp":7}}"#.into(),
                Want::Fails("upstream_invalid_answer"),
            ),
            (
                200,
                r#"{"session":{"id":"live_1"},"transport":{"type":"webrtc","sdp":" "}}"#.into(),
                Want::Fails("upstream_invalid_answer"),
            ),
            (
                200,
                ok("../../admin"),
                Want::Fails("upstream_invalid_answer"),
            ),
            (200, ok(""), Want::Fails("upstream_invalid_answer")),
            (
                200,
                ok(&"a".repeat(129)),
                Want::Fails("upstream_invalid_answer"),
            ),
            (
                200,
                "x".repeat(70 * 1024),
                Want::Fails("upstream_invalid_answer"),
            ),
        ];
        for (status, body, want) in rows {
            let (base, mut requests) =
                canned(status, "application/json", body.clone().into_bytes()).await;
            let session = crate::upstream_body::UpstreamSession::new(
                Kind::Live,
                Some(r#"{"instructions":"hi"}"#),
                Some("gpt-live-1"),
            )
            .unwrap();
            let got = client(&base)
                .exchange(
                    &base,
                    Kind::Live,
                    Some("Bearer k"),
                    session.encode(SDP),
                    Duration::from_secs(5),
                )
                .await;
            let row = format!("{status} {body:.60}");
            match (got, want) {
                (
                    Ok(ExchangeOutcome::Answer {
                        sdp,
                        upstream_call_id,
                    }),
                    Want::Answer(id),
                ) => {
                    assert_eq!(sdp, SDP, "{row}");
                    assert_eq!(upstream_call_id.as_deref(), Some(id), "{row}");
                }
                (
                    Ok(ExchangeOutcome::Rejected {
                        status: s,
                        content_type,
                        body: b,
                    }),
                    Want::Rejected,
                ) => {
                    assert_eq!(
                        (s, content_type.as_str(), b),
                        (status, "application/json", body.into_bytes()),
                        "{row}"
                    );
                }
                (Err(e), Want::Fails(code)) => {
                    assert_eq!(e.code(), code, "{row}");
                    assert!(!e.to_string().contains("v=0"), "no SDP in the message: {e}");
                }
                (got, _) => panic!("{row}: unexpected {got:?}"),
            }
            // What the provider got: the Live path, JSON, the key.
            let (head, sent) = requests.recv().await.unwrap();
            assert!(
                head.starts_with("POST /v1/live/sessions HTTP/1.1\r\n"),
                "{head}"
            );
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: application/json\r\n"),
                "{head}"
            );
            assert!(head.contains("authorization: Bearer k\r\n"), "{head}");
            let sent: serde_json::Value = serde_json::from_slice(&sent).unwrap();
            assert_eq!(sent["session"]["model"], "gpt-live-1");
            assert_eq!(sent["transport"]["type"], "webrtc");
            assert_eq!(sent["transport"]["sdp"], SDP);
        }
    }

    #[tokio::test]
    async fn a_live_hangup_posts_to_the_sessions_path_once() {
        let (base, mut requests) = canned(200, "application/json", Vec::new()).await;
        let call = UpstreamCall::new(Kind::Live, base.clone(), Some("Bearer k"), "live_s1".into());
        assert!(call.claim_hangup());
        assert!(!call.claim_hangup(), "only the first claim sends it");
        client(&base).hangup(&call).await;
        let (head, _) = requests.recv().await.unwrap();
        assert!(
            head.starts_with("POST /v1/live/sessions/live_s1/hangup HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("authorization: Bearer k\r\n"), "{head}");
        assert!(
            !format!("{call:?}").contains("Bearer"),
            "the key is never in Debug output"
        );
    }

    #[test]
    fn hangup_urls_follow_the_api_and_refuse_ids_that_are_not_one_segment() {
        let base = Url::parse("https://api.openai.com/").unwrap();
        assert_eq!(
            UpstreamClient::hangup_url(&base, Kind::Realtime, "rtc_1")
                .unwrap()
                .as_str(),
            "https://api.openai.com/v1/realtime/calls/rtc_1/hangup"
        );
        assert_eq!(
            UpstreamClient::hangup_url(&base, Kind::Live, "live_1")
                .unwrap()
                .as_str(),
            "https://api.openai.com/v1/live/sessions/live_1/hangup"
        );
        for bad in ["", "../x", "a/b", "a?b", "a b"] {
            assert!(
                UpstreamClient::hangup_url(&base, Kind::Live, bad).is_none(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn calls_url_appends_the_path() {
        let base = Url::parse("https://api.openai.com/").unwrap();
        assert_eq!(
            UpstreamClient::calls_url(&base).unwrap().as_str(),
            "https://api.openai.com/v1/realtime/calls"
        );
        let base = Url::parse("http://127.0.0.1:8089/prefix").unwrap();
        assert_eq!(
            UpstreamClient::calls_url(&base).unwrap().as_str(),
            "http://127.0.0.1:8089/prefix/v1/realtime/calls"
        );
        assert_eq!(
            UpstreamClient::create_url(&base, Kind::Live)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8089/prefix/v1/live/sessions"
        );
    }
}
