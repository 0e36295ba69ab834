//! Which web pages may use the gateway from a browser.
//!
//! Envoy's CORS filter only decides what a page may *read*: a `multipart/form-data` POST is a
//! CORS-simple request, sent without a preflight, and Envoy passes it on whatever its origin. So
//! any website could make its visitors' browsers open calls on a worker key the gateway
//! injects. Browsers send `Origin` on every POST; the filter refuses a request on one of its
//! paths whose `Origin` is neither the gateway's own (a page the gateway serves, such as the
//! demo page) nor listed in `browser_origins`. Requests without `Origin` (servers, SDKs, curl)
//! are not browsers' and are not affected. Same list as the CORS policy of the routes: the
//! deploy check keeps them in step.

use crate::error::FilterError;

/// Checks `origin` (the request's `Origin` header) against the gateway's own `authority`
/// (`:authority`) and the configured `allowed` origins (each `scheme://host[:port]`, lower
/// case, as [`normalize`] leaves them).
pub fn check(
    origin: Option<&str>,
    authority: Option<&str>,
    allowed: &[String],
) -> Result<(), FilterError> {
    let Some(origin) = origin else {
        return Ok(());
    };
    let Some(origin) = normalize(origin) else {
        // `null` (sandboxed frames, file: pages, redirects) or garbage: no page to trust.
        return Err(FilterError::OriginNotAllowed);
    };
    if allowed.contains(&origin) || authority.is_some_and(|a| same_origin(&origin, a)) {
        Ok(())
    } else {
        Err(FilterError::OriginNotAllowed)
    }
}

/// `scheme://host[:port]` in lower case, without the scheme's default port; `None` for
/// anything else (a path, user info, `null`, an opaque origin).
pub fn normalize(origin: &str) -> Option<String> {
    let origin = origin.trim().to_ascii_lowercase();
    let (scheme, host_port) = origin.split_once("://")?;
    if !matches!(scheme, "http" | "https") || host_port.is_empty() {
        return None;
    }
    if host_port
        .bytes()
        .any(|b| matches!(b, b'/' | b'?' | b'#' | b'@' | b'\\') || !b.is_ascii_graphic())
    {
        return None;
    }
    let (host, port) = split_port(host_port)?;
    if !is_host(host) {
        return None;
    }
    Some(match port {
        Some(p) if p != default_port(scheme) => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// A DNS name or IPv4 address (letters, digits, `-`, `.`), or a bracketed IPv6 literal. Not a
/// wildcard: an origin is one site.
fn is_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return !v6.is_empty()
            && v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" {
        443
    } else {
        80
    }
}

/// `host[:port]` → host and port; IPv6 literals keep their brackets.
fn split_port(host_port: &str) -> Option<(&str, Option<u16>)> {
    match host_port.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => Some((host, Some(port.parse().ok()?))),
        _ => Some((host_port, None)),
    }
}

/// Whether the normalized `origin` names the host and port the request was sent to. The
/// scheme is the origin's: behind a TLS-terminating proxy Envoy may see `http` for a page
/// served over `https`, and `authority` alone says which server the browser addressed.
fn same_origin(origin: &str, authority: &str) -> bool {
    let Some((scheme, host_port)) = origin.split_once("://") else {
        return false;
    };
    let authority = authority.trim().to_ascii_lowercase();
    let Some((host, port)) = split_port(&authority) else {
        return false;
    };
    let Some((origin_host, origin_port)) = split_port(host_port) else {
        return false;
    };
    let default = default_port(scheme);
    host == origin_host && port.unwrap_or(default) == origin_port.unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_normalize_to_scheme_host_and_non_default_port() {
        let rows = [
            ("https://App.Example.test", Some("https://app.example.test")),
            (
                "https://app.example.test:443",
                Some("https://app.example.test"),
            ),
            (
                "http://app.example.test:80",
                Some("http://app.example.test"),
            ),
            ("http://127.0.0.1:8080", Some("http://127.0.0.1:8080")),
            ("https://[::1]:8443", Some("https://[::1]:8443")),
            ("https://[::1]", Some("https://[::1]")),
            ("null", None),
            ("", None),
            ("app.example.test", None),
            ("ftp://app.example.test", None),
            ("https://app.example.test/", None),
            ("https://user@app.example.test", None),
            ("https://app.example.test:99999", None),
            ("https://", None),
            ("https://:443", None),
            ("https://a b", None),
            ("https://*.example.test", None),
            ("https://[]", None),
            ("https://[::1", None),
        ];
        for (raw, want) in rows {
            assert_eq!(normalize(raw).as_deref(), want, "{raw:?}");
        }
    }

    #[test]
    fn a_browser_request_needs_the_gateways_own_origin_or_a_listed_one() {
        let listed = vec!["https://app.example.test".to_string()];
        let ok = |origin, authority| check(origin, authority, &listed).is_ok();
        // No Origin: not a browser's request (SDKs, servers, curl).
        assert!(ok(None, Some("gw.example.test")));
        assert!(ok(
            Some("https://app.example.test"),
            Some("gw.example.test")
        ));
        assert!(ok(
            Some("https://APP.example.test:443"),
            Some("gw.example.test")
        ));
        // The gateway's own pages (the demo page), whatever the proxy's scheme.
        assert!(ok(Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080")));
        assert!(ok(
            Some("https://gw.example.test"),
            Some("gw.example.test:443")
        ));
        assert!(ok(Some("https://gw.example.test"), Some("GW.example.test")));
        assert!(ok(Some("http://[::1]:8080"), Some("[::1]:8080")));
        // Everyone else.
        for (origin, authority) in [
            ("https://evil.example.test", Some("gw.example.test")),
            ("https://app.example.test:8443", Some("gw.example.test")),
            ("http://app.example.test", Some("gw.example.test")),
            ("http://127.0.0.1:8081", Some("127.0.0.1:8080")),
            ("https://gw.example.test", Some("gw.example.test:8443")),
            ("https://gw.example.test.evil.test", Some("gw.example.test")),
            ("null", Some("gw.example.test")),
            ("https://gw.example.test", None),
        ] {
            let e = check(Some(origin), authority, &listed).unwrap_err();
            assert_eq!(
                (e.status(), e.code()),
                (403, "origin_not_allowed"),
                "{origin}"
            );
        }
    }
}
