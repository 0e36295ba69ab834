//! The upstream SDP exchange over HTTP: POST the offer to
//! `{base}/v1/realtime/calls`, read the answer or the rejection.
//!
//! Redirects are never followed (they would bypass the allowlist), no proxy from the
//! environment is used, addresses are filtered by the allowlist's resolver, and both
//! the connect and the whole exchange have timeouts. Bodies are read up to a cap.

use crate::allowlist::{Allowlist, PolicyResolver};
use crate::error::SetupError;
use crate::upstream_body::UpstreamBody;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

#[derive(Debug)]
pub enum ExchangeOutcome {
    Answer {
        sdp: String,
        /// The provider's call id: last segment of its `Location`, if any.
        upstream_call_id: Option<String>,
    },
    /// A non-2xx answer, to be passed back to the client verbatim.
    Rejected {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
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

impl UpstreamClient {
    pub fn new(
        allowlist: Arc<Allowlist>,
        connect_timeout: Duration,
        exchange_timeout: Duration,
        max_body_bytes: usize,
    ) -> Result<Self, UpstreamClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(exchange_timeout)
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

    pub fn calls_url(base: &Url) -> Result<Url, SetupError> {
        let mut s = base.as_str().trim_end_matches('/').to_string();
        s.push_str("/v1/realtime/calls");
        Url::parse(&s).map_err(|_| SetupError::UpstreamNotAllowed("bad upstream URL".into()))
    }

    pub fn hangup_url(base: &Url, upstream_call_id: &str) -> Option<Url> {
        let s = format!(
            "{}/v1/realtime/calls/{}/hangup",
            base.as_str().trim_end_matches('/'),
            upstream_call_id
        );
        Url::parse(&s).ok()
    }

    /// POSTs the offer and reads the answer, all within `timeout` (the client's own timeout
    /// when shorter).
    pub async fn exchange(
        &self,
        base: &Url,
        authorization: Option<&str>,
        body: UpstreamBody,
        timeout: Duration,
    ) -> Result<ExchangeOutcome, SetupError> {
        let url = Self::calls_url(base)?;
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
        if !status.is_success() {
            return Ok(ExchangeOutcome::Rejected {
                status: status.as_u16(),
                content_type,
                body: bytes,
            });
        }
        let sdp = String::from_utf8(bytes).map_err(|_| {
            SetupError::UpstreamInvalidAnswer("the upstream answer is not UTF-8".into())
        })?;
        Ok(ExchangeOutcome::Answer {
            sdp,
            upstream_call_id: location.as_deref().and_then(last_segment),
        })
    }

    /// Best-effort hangup of the provider-side call when ours ends first.
    pub async fn hangup(&self, base: &Url, authorization: Option<&str>, upstream_call_id: &str) {
        let Some(url) = Self::hangup_url(base, upstream_call_id) else {
            return;
        };
        let mut req = self.http.post(url);
        if let Some(auth) = authorization.filter(|a| !a.is_empty()) {
            req = req.header(reqwest::header::AUTHORIZATION, auth);
        }
        if let Err(e) = req.send().await {
            tracing::debug!(error = %classify(e), "upstream hangup failed");
        }
    }
}

fn last_segment(location: &str) -> Option<String> {
    let seg = location
        .split(['?', '#'])
        .next()?
        .trim_end_matches('/')
        .rsplit('/')
        .next()?;
    let ok = !seg.is_empty()
        && seg.len() <= 128
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| seg.to_string())
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
    }
}
