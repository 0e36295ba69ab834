//! Which requests the filter handles: call creation, hangup and client secrets; everything
//! else passes.

use crate::error::FilterError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST {calls_path}`.
    Create,
    /// `POST {calls_path}/{call_id}/hangup` (`kind` Realtime) or `POST {live_path}/{id}/hangup`
    /// (`kind` Live): an id of the other API's kind is nobody's here.
    Hangup {
        call_id: String,
        kind: realtime_relay_proto::call_id::Kind,
    },
    /// `POST {client_secrets_path}`: the gateway mints an ephemeral key.
    ClientSecret,
    /// `POST {live_path}`: a GPT-Live session.
    LiveCreate,
    /// A sideband WebSocket of a call the gateway set up: `GET {sideband_path}?call_id=rtc_…`
    /// (Realtime) or `GET {live_path}/{id}/attach` (GPT-Live). See `crate::sideband`.
    Sideband {
        call_id: String,
        kind: realtime_relay_proto::call_id::Kind,
    },
    /// Not ours: continue to the router untouched.
    PassThrough,
    /// Ours, but not like this (405 with `Allow`).
    Reject(FilterError),
}

/// Splits `:path` into path and query (a fragment, which clients must not send, is dropped).
pub fn split_path(path: &str) -> (&str, Option<&str>) {
    let path = path.split('#').next().unwrap_or(path);
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

/// The paths the filter serves (from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Paths<'a> {
    pub calls: &'a str,
    pub client_secrets: &'a str,
    pub live: &'a str,
    pub sideband: &'a str,
}

impl<'a> Paths<'a> {
    pub fn of(config: &'a crate::config::Config) -> Paths<'a> {
        Paths {
            calls: &config.calls_path,
            client_secrets: &config.client_secrets_path,
            live: &config.live_path,
            sideband: &config.sideband_path,
        }
    }
}

/// The value of `name` in a query string (the first; not percent-decoded: call ids need none).
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub fn classify(method: &str, path: &str, paths: Paths<'_>) -> Route {
    let (path, query) = split_path(path);
    let post = method == "POST";
    // The Realtime sideband: only with a call id (without one, `GET {sideband_path}` is the
    // provider's own WebSocket API, which passes through untouched).
    if path == paths.sideband {
        if let Some(id) = query_value(query, "call_id") {
            return if method == "GET" {
                Route::Sideband {
                    call_id: id.to_string(),
                    kind: realtime_relay_proto::call_id::Kind::Realtime,
                }
            } else {
                Route::Reject(FilterError::MethodNotAllowed { allow: "GET" })
            };
        }
    }
    let calls_path = paths.calls;
    if path == paths.client_secrets {
        return if post {
            Route::ClientSecret
        } else {
            Route::Reject(FilterError::MethodNotAllowed { allow: "POST" })
        };
    }
    if path == calls_path {
        return if post {
            Route::Create
        } else {
            Route::Reject(FilterError::MethodNotAllowed { allow: "POST" })
        };
    }
    if path == paths.live {
        return if post {
            Route::LiveCreate
        } else {
            Route::Reject(FilterError::MethodNotAllowed { allow: "POST" })
        };
    }
    if let Some(rest) = path.strip_prefix(paths.live) {
        // The whole prefix is ours (`/v1/live/sessionsx` too): Envoy and Istio route it by
        // prefix to the hold, where a request passed through would only meet a 503.
        return match rest.strip_prefix('/') {
            Some(rest) => classify_live_control(rest, method),
            None => Route::Reject(FilterError::UnknownCallsPath),
        };
    }
    if let Some(rest) = path
        .strip_prefix(calls_path)
        .and_then(|r| r.strip_prefix('/'))
    {
        if let Some(id) = rest.strip_suffix("/hangup") {
            if !id.is_empty() && !id.contains('/') {
                return if post {
                    Route::Hangup {
                        call_id: id.to_string(),
                        kind: realtime_relay_proto::call_id::Kind::Realtime,
                    }
                } else {
                    Route::Reject(FilterError::MethodNotAllowed { allow: "POST" })
                };
            }
        }
        // Anything else under `{calls_path}/` is ours too (Envoy has already normalised the
        // path: `//hangup` arrives as `/hangup`, `a/../b` as `b`): a 404 here, because the
        // provider must never see a request the gateway does not serve under this path.
        return Route::Reject(FilterError::UnknownCallsPath);
    }
    Route::PassThrough
}

/// `{live_path}/{id}/{verb}`: hangup as for Realtime calls; the SIP controls are refused (this
/// gateway's sessions are WebRTC); anything else is an unknown path, never the provider's.
fn classify_live_control(rest: &str, method: &str) -> Route {
    let post = method == "POST";
    let Some((id, verb)) = rest.split_once('/') else {
        return Route::Reject(FilterError::UnknownCallsPath);
    };
    if id.is_empty() || verb.contains('/') {
        return Route::Reject(FilterError::UnknownCallsPath);
    }
    match (verb, post) {
        ("hangup", true) => Route::Hangup {
            call_id: id.to_string(),
            kind: realtime_relay_proto::call_id::Kind::Live,
        },
        ("accept" | "reject" | "refer", true) => Route::Reject(FilterError::NotSipSession),
        ("hangup" | "accept" | "reject" | "refer" | "fork", false) => {
            Route::Reject(FilterError::MethodNotAllowed { allow: "POST" })
        }
        // Forking a stored session and downloading its recording (the SDK's `fork` and
        // `download_recording`) address the provider's session, which only the relay knows.
        ("fork", true) => Route::Reject(FilterError::LiveControlUnsupported("fork")),
        ("content", false) => Route::Reject(FilterError::LiveControlUnsupported("content")),
        ("content", true) => Route::Reject(FilterError::MethodNotAllowed { allow: "GET" }),
        // The sideband WebSocket (`crate::sideband`).
        ("attach", false) if method == "GET" => Route::Sideband {
            call_id: id.to_string(),
            kind: realtime_relay_proto::call_id::Kind::Live,
        },
        ("attach", _) => Route::Reject(FilterError::MethodNotAllowed { allow: "GET" }),
        _ => Route::Reject(FilterError::UnknownCallsPath),
    }
}

/// A call id the relay could have issued: the contract's grammar
/// (`realtime_relay_proto::call_id`).
pub fn is_valid_call_id(id: &str) -> bool {
    realtime_relay_proto::call_id::is_valid(id)
}

/// Refuses a hangup for a call id the relay cannot know, or of the other API's kind, without
/// asking it.
pub fn check_call_id(
    id: &str,
    kind: realtime_relay_proto::call_id::Kind,
) -> Result<(), FilterError> {
    let same_kind = realtime_relay_proto::call_id::split(id).is_some_and(|(k, _)| k == kind);
    if is_valid_call_id(id) && same_kind {
        Ok(())
    } else {
        Err(FilterError::CallNotFound)
    }
}

/// The request id to log and echo: the client's/Envoy's `x-request-id` when it is sane,
/// else one derived from the call's random bytes.
pub fn request_id(header: Option<&str>, random: &[u8; 16]) -> String {
    match header {
        Some(v) if !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()) => {
            v.to_string()
        }
        _ => {
            let mut s = String::with_capacity(32);
            for b in random {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Paths<'static> = Paths {
        calls: "/v1/realtime/calls",
        client_secrets: "/v1/realtime/client_secrets",
        live: "/v1/live/sessions",
        sideband: "/v1/realtime",
    };

    #[test]
    fn live_sessions_are_created_hung_up_and_never_passed_through() {
        use realtime_relay_proto::call_id::Kind;
        let c = P;
        assert_eq!(classify("POST", "/v1/live/sessions", c), Route::LiveCreate);
        assert_eq!(
            classify("POST", "/v1/live/sessions/live_12345678/hangup", c),
            Route::Hangup {
                call_id: "live_12345678".into(),
                kind: Kind::Live
            }
        );
        for verb in ["accept", "reject", "refer"] {
            let r = classify(
                "POST",
                &format!("/v1/live/sessions/live_12345678/{verb}"),
                c,
            );
            assert_eq!(r, Route::Reject(FilterError::NotSipSession), "{verb}");
        }
        for path in [
            "/v1/live/sessions/live_12345678",
            "/v1/live/sessions/live_12345678/frob",
            "/v1/live/sessionsx",
            "/v1/live/sessions//hangup",
            "/v1/live/sessions/a/b/hangup",
            "/v1/live/sessions/",
        ] {
            assert_eq!(
                classify("POST", path, c),
                Route::Reject(FilterError::UnknownCallsPath),
                "{path}"
            );
        }
        assert_eq!(
            classify("GET", "/v1/live/sessions", c),
            Route::Reject(FilterError::MethodNotAllowed { allow: "POST" })
        );
        // The SDK's fork and download_recording: refused by name, not a bare 404.
        assert_eq!(
            classify("POST", "/v1/live/sessions/live_12345678/fork", c),
            Route::Reject(FilterError::LiveControlUnsupported("fork"))
        );
        assert_eq!(
            classify("GET", "/v1/live/sessions/live_12345678/content", c),
            Route::Reject(FilterError::LiveControlUnsupported("content"))
        );
        // An id of the other API's kind is nobody's under this path.
        assert!(check_call_id("live_12345678", Kind::Live).is_ok());
        assert!(check_call_id("rtc_12345678", Kind::Live).is_err());
        assert!(check_call_id("live_12345678", Kind::Realtime).is_err());
    }

    #[test]
    fn routes() {
        let c = P;
        assert_eq!(classify("POST", "/v1/realtime/calls", c), Route::Create);
        assert_eq!(
            classify("POST", "/v1/realtime/calls?model=x", c),
            Route::Create
        );
        assert!(matches!(
            classify("GET", "/v1/realtime/calls", c),
            Route::Reject(_)
        ));
        assert_eq!(
            classify("POST", "/v1/realtime/calls/rtc_1/hangup", c),
            Route::Hangup {
                call_id: "rtc_1".into(),
                kind: realtime_relay_proto::call_id::Kind::Realtime,
            }
        );
        assert!(matches!(
            classify("DELETE", "/v1/realtime/calls/rtc_1/hangup", c),
            Route::Reject(_)
        ));
        assert_eq!(classify("GET", "/v1/models", c), Route::PassThrough);
        assert_eq!(
            classify("POST", "/v1/realtime/callsx", c),
            Route::PassThrough
        );
        assert_eq!(
            classify("POST", "/v1/realtime/client_secrets", c),
            Route::ClientSecret
        );
        assert_eq!(
            classify("POST", "/v1/realtime/client_secrets?x=1", c),
            Route::ClientSecret
        );
        assert_eq!(
            classify("GET", "/v1/realtime/client_secrets", c),
            Route::Reject(FilterError::MethodNotAllowed { allow: "POST" })
        );
        for other in [
            "/v1/realtime/client_secretsx",
            "/v1/realtime/client_secrets/x",
            "/v1/realtime/sessions",
        ] {
            assert_eq!(classify("POST", other, c), Route::PassThrough, "{other}");
        }
    }

    #[test]
    fn every_other_path_under_the_calls_path_is_refused_not_passed_through() {
        let c = P;
        let nf = Route::Reject(FilterError::UnknownCallsPath);
        for (method, path) in [
            ("POST", "/v1/realtime/calls/hangup"),
            ("POST", "/v1/realtime/calls//hangup"),
            ("POST", "/v1/realtime/calls/"),
            ("POST", "/v1/realtime/calls/a/b/hangup"),
            ("POST", "/v1/realtime/calls/rtc_1"),
            ("POST", "/v1/realtime/calls/rtc_1/accept"),
            ("POST", "/v1/realtime/calls/rtc_1/hangup/x"),
            ("POST", "/v1/realtime/calls/rtc_1/hangup/"),
            ("POST", "/v1/realtime/calls/../models?x=1"),
            ("GET", "/v1/realtime/calls/rtc_1"),
            ("DELETE", "/v1/realtime/calls/rtc_1"),
        ] {
            assert_eq!(classify(method, path, c), nf, "{method} {path}");
        }
        // the prefix is matched by whole segments
        assert_eq!(
            classify("POST", "/v1/realtime/callsx", c),
            Route::PassThrough
        );
    }

    #[test]
    fn call_ids() {
        let id = realtime_relay_proto::call_id::new(&[0xab; 16], None);
        assert!(is_valid_call_id(&id));
        assert!(!is_valid_call_id("rtc_"));
        assert!(!is_valid_call_id("abc"));
        assert!(!is_valid_call_id("rtc_a%2f"));
        assert_eq!(request_id(Some("r-1"), &[0; 16]), "r-1");
        assert_eq!(request_id(Some("bad id"), &[1; 16]).len(), 32);
    }
}
