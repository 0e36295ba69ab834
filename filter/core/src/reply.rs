//! A reply the filter sends itself (status, headers, body), independent of the host.

/// A reply the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The value of header `name` (lowercase), if the reply has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The reply with `secret` replaced by `[redacted]` in every string of its JSON body
    /// (keys included). A reply may quote what the client sent (an unknown parameter's name,
    /// a relay error quoting its input), and a client can put its own key there: the key must
    /// still never come back, nor reach a log that records replies. Only JSON strings are
    /// touched, so the body stays valid JSON whatever the secret is; bodies that are not JSON
    /// (SDP answers) quote nothing of the client's. Secrets shorter than 8 bytes are not
    /// searched for (they would match ordinary words).
    pub fn redacting(mut self, secret: &str) -> HttpReply {
        const MIN_SECRET: usize = 8;
        let needle = secret.as_bytes();
        if needle.len() < MIN_SECRET {
            return self;
        }
        // A quick look at the raw bytes first; a secret with characters JSON escapes (`"`,
        // `\`, controls) appears escaped there, so only the parsed strings can tell.
        let escapes = needle
            .iter()
            .any(|b| *b == b'"' || *b == b'\\' || *b < 0x20);
        if !escapes && !self.body.windows(needle.len()).any(|w| w == needle) {
            return self;
        }
        let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&self.body) else {
            return self;
        };
        if redact_strings(&mut value, secret) {
            self.body = value.to_string().into_bytes();
        }
        self
    }

    /// Adds `x-request-id` unless the reply already carries one.
    pub fn with_request_id(mut self, request_id: &str) -> HttpReply {
        if self.header("x-request-id").is_none() {
            self.headers
                .push(("x-request-id".to_string(), request_id.to_string()));
        }
        self
    }
}

/// Replaces `secret` in every string and key of `v`; whether anything changed.
fn redact_strings(v: &mut serde_json::Value, secret: &str) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains(secret) => {
            *s = s.replace(secret, "[redacted]");
            true
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, x| redact_strings(x, secret) | changed),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            let mut changed = false;
            for (k, mut x) in entries {
                changed |= redact_strings(&mut x, secret);
                let key = if k.contains(secret) {
                    changed = true;
                    k.replace(secret, "[redacted]")
                } else {
                    k
                };
                map.insert(key, x);
            }
            changed
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(body: &str) -> HttpReply {
        HttpReply {
            status: 400,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_secret_in_the_body_is_redacted_everywhere_it_appears() {
        let key = "sk-caller-key-0123456789";
        let r = reply(&format!(
            r#"{{"error":{{"message":"unknown parameter: 'x{key}y'","param":"{key}"}}}}"#
        ))
        .redacting(key);
        let body = String::from_utf8(r.body).unwrap();
        assert!(!body.contains(key), "{body}");
        assert_eq!(
            body,
            r#"{"error":{"message":"unknown parameter: 'x[redacted]y'","param":"[redacted]"}}"#
        );
    }

    /// A secret with a quote in it appears escaped in the raw body, and is still found.
    #[test]
    fn a_secret_that_json_escapes_is_redacted_too() {
        let secret = r#"l","code":"x"#;
        let body = serde_json::json!({"error": {"message": format!("model 'a{secret}b'")}});
        let r = reply(&body.to_string()).redacting(secret);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["message"], "model 'a[redacted]b'");
    }

    /// The fuzzer's case: a "credential" that is a piece of the reply's own JSON structure.
    /// Only strings are touched, so the reply stays JSON.
    #[test]
    fn a_secret_matching_the_structure_leaves_valid_json() {
        let body = r#"{"error":{"message":"missing SDP offer","type":"invalid_request_error","param":null,"code":"missing_sdp"}}"#;
        let r = reply(body).redacting(r#","param":null,"#);
        assert_eq!(r.body, body.as_bytes());
        let r = reply(body).redacting("invalid_request_error");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["type"], "[redacted]");
        assert_eq!(v["error"]["code"], "missing_sdp");
    }

    #[test]
    fn short_or_absent_secrets_leave_the_body_alone() {
        let body = r#"{"error":{"message":"bad"}}"#;
        assert_eq!(reply(body).redacting("bad").body, body.as_bytes());
        assert_eq!(
            reply(body).redacting("not-in-the-body-at-all").body,
            body.as_bytes()
        );
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n";
        assert_eq!(
            reply(sdp).redacting("IN IP4 127.0.0.1").body,
            sdp.as_bytes()
        );
    }
}
