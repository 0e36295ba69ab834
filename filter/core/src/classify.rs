//! Which requests the filter handles: call creation, hangup and client secrets; everything
//! else passes.

use crate::error::FilterError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST {calls_path}`.
    Create,
    /// `POST {calls_path}/{call_id}/hangup`.
    Hangup { call_id: String },
    /// `POST {client_secrets_path}`: the gateway mints an ephemeral key.
    ClientSecret,
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
}

impl<'a> Paths<'a> {
    pub fn of(config: &'a crate::config::Config) -> Paths<'a> {
        Paths {
            calls: &config.calls_path,
            client_secrets: &config.client_secrets_path,
        }
    }
}

pub fn classify(method: &str, path: &str, paths: Paths<'_>) -> Route {
    let (path, _) = split_path(path);
    let post = method == "POST";
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
    if let Some(rest) = path
        .strip_prefix(calls_path)
        .and_then(|r| r.strip_prefix('/'))
    {
        if let Some(id) = rest.strip_suffix("/hangup") {
            if !id.is_empty() && !id.contains('/') {
                return if post {
                    Route::Hangup {
                        call_id: id.to_string(),
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

/// A call id the relay could have issued: the contract's grammar
/// (`realtime_relay_proto::call_id`).
pub fn is_valid_call_id(id: &str) -> bool {
    realtime_relay_proto::call_id::is_valid(id)
}

/// Refuses a hangup for a call id the relay cannot know, without asking it.
pub fn check_call_id(id: &str) -> Result<(), FilterError> {
    if is_valid_call_id(id) {
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
    };

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
                call_id: "rtc_1".into()
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
