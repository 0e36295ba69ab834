//! A GPT-Live session has two ids: the provider's (its answer's `session.id`, which the relay
//! uses to hang up at the provider) and the gateway's (`live_…`, the one the client got and
//! must use for every control, since only it routes to this relay). The provider's events
//! (`session.started`, `session.updated`, `session.closed`, …) name its own id; a client that
//! took the id from them would address a session the gateway does not know. So on the way to
//! the client, every occurrence of the provider's id in a text event becomes the gateway's.
//!
//! A byte substitution, not a JSON rewrite: the provider's id is an opaque token of 1–128
//! `[A-Za-z0-9_-]` (checked when its answer is read), so it needs no JSON escaping and cannot
//! straddle a string boundary, and an event that does not contain it (nearly all of them:
//! audio deltas, transcripts) is only searched, with SIMD, never parsed or copied.

use memchr::memmem::Finder;

/// Renames the provider's session id to the gateway's in events bound for the client.
pub struct SessionIds {
    provider: Finder<'static>,
    gateway: Vec<u8>,
}

impl SessionIds {
    /// `None` when there is nothing to rename (the ids are equal, or the provider's is empty).
    pub fn new(provider_id: &str, gateway_id: &str) -> Option<SessionIds> {
        if provider_id.is_empty() || provider_id == gateway_id {
            return None;
        }
        Some(SessionIds {
            provider: Finder::new(provider_id.as_bytes()).into_owned(),
            gateway: gateway_id.as_bytes().to_vec(),
        })
    }

    /// The event with the provider's id replaced, or `None` when it does not contain it (the
    /// event goes on unchanged, uncopied).
    pub fn rename(&self, event: &[u8]) -> Option<Vec<u8>> {
        let needle_len = self.provider.needle().len();
        let mut hits = self.provider.find_iter(event).peekable();
        hits.peek()?;
        let mut out = Vec::with_capacity(event.len() + self.gateway.len());
        let mut at = 0;
        for hit in hits {
            out.extend_from_slice(&event[at..hit]);
            out.extend_from_slice(&self.gateway);
            at = hit + needle_len;
        }
        out.extend_from_slice(&event[at..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROVIDER: &str = "live_0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    const GATEWAY: &str = "live_r1_ffeeddccbbaa99887766554433221100";

    #[test]
    fn the_providers_id_becomes_the_gateways_wherever_it_appears() {
        let ids = SessionIds::new(PROVIDER, GATEWAY).unwrap();
        let started = format!(
            r#"{{"type":"session.started","event_id":"e1","session":{{"id":"{PROVIDER}","model":"gpt-live-1"}}}}"#
        );
        let renamed = String::from_utf8(ids.rename(started.as_bytes()).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&renamed).unwrap();
        assert_eq!(v["session"]["id"], GATEWAY);
        assert_eq!(v["session"]["model"], "gpt-live-1");
        assert!(!renamed.contains(PROVIDER));
        // Twice in one event, and at both ends of the bytes.
        let twice = format!("{PROVIDER} and {PROVIDER}");
        assert_eq!(
            ids.rename(twice.as_bytes()).unwrap(),
            format!("{GATEWAY} and {GATEWAY}").into_bytes()
        );
    }

    #[test]
    fn events_without_it_pass_unchanged_and_uncopied() {
        let ids = SessionIds::new(PROVIDER, GATEWAY).unwrap();
        for event in [
            &br#"{"type":"output_audio.delta","delta":"AAAA"}"#[..],
            b"",
            // A prefix of the id is not the id.
            b"live_0a1b2c3d4e5f",
        ] {
            assert_eq!(ids.rename(event), None);
        }
        assert!(SessionIds::new("", GATEWAY).is_none());
        assert!(SessionIds::new(GATEWAY, GATEWAY).is_none());
    }
}
