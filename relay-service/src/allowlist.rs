//! Upstream allowlist: the relay must never become an open relay or an SSRF tool.
//!
//! Two checks. (1) The base URL's scheme, host and port must equal a configured entry
//! (and its path start with the entry's path). (2) Resolve, then check: the addresses a
//! host resolves to are filtered at connect time by [`PolicyResolver`], so a name that
//! later resolves to loopback or a private range is refused unless private targets are
//! explicitly allowed. IP-literal hosts never reach a resolver, so they are checked here.

use crate::error::SetupError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use url::{Host, Url};

#[derive(Debug, Clone)]
pub struct Allowlist {
    entries: Vec<Url>,
    allow_private: bool,
}

/// An `--allow-upstream` entry that is not an absolute http(s) URL without credentials,
/// query or fragment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowlist entry {entry:?}: {reason}")]
pub struct AllowlistEntryError {
    pub entry: String,
    pub reason: String,
}

impl Allowlist {
    /// Parses the configured entries; each is an absolute http(s) URL with no
    /// credentials, query or fragment.
    pub fn new(entries: &[String], allow_private: bool) -> Result<Self, AllowlistEntryError> {
        let mut parsed = Vec::new();
        for e in entries {
            let refuse = |reason: String| AllowlistEntryError {
                entry: e.clone(),
                reason,
            };
            let url = Url::parse(e).map_err(|err| refuse(err.to_string()))?;
            check_shape(&url).map_err(|why| refuse(why.to_string()))?;
            parsed.push(url);
        }
        Ok(Allowlist {
            entries: parsed,
            allow_private,
        })
    }

    pub fn allow_private(&self) -> bool {
        self.allow_private
    }

    /// Checks a caller-supplied base URL and returns it parsed.
    pub fn check(&self, base_url: &str) -> Result<Url, SetupError> {
        let refuse = |why: &str| SetupError::UpstreamNotAllowed(why.to_string());
        let url =
            Url::parse(base_url).map_err(|_| refuse("the upstream base URL does not parse"))?;
        check_shape(&url).map_err(refuse)?;
        let allowed = self.entries.iter().any(|e| {
            e.scheme() == url.scheme()
                && e.host() == url.host()
                && e.port_or_known_default() == url.port_or_known_default()
                && url.path().starts_with(e.path().trim_end_matches('/'))
        });
        if !allowed {
            return Err(refuse("the upstream is not on the relay's allowlist"));
        }
        if let Some(Host::Ipv4(ip)) = url.host() {
            self.check_ip(IpAddr::V4(ip))?;
        }
        if let Some(Host::Ipv6(ip)) = url.host() {
            self.check_ip(IpAddr::V6(ip))?;
        }
        Ok(url)
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), SetupError> {
        if self.allow_private || is_public(ip) {
            Ok(())
        } else {
            Err(SetupError::UpstreamNotAllowed(
                "the upstream resolves to a loopback or private address, and private upstreams are not allowed".into(),
            ))
        }
    }
}

fn check_shape(url: &Url) -> Result<(), &'static str> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the scheme must be http or https");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are not allowed");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment is not allowed");
    }
    if url.host().is_none() {
        return Err("the URL has no host");
    }
    Ok(())
}

/// True for addresses that are globally routable: not loopback, private, link-local,
/// unspecified, multicast, broadcast, CGNAT (100.64.0.0/10), documentation, benchmarking
/// (198.18.0.0/15), IETF protocol assignments (192.0.0.0/24), reserved (240.0.0.0/4),
/// unique-local, or IPv6 documentation (2001:db8::/32); all special-purpose and not globally
/// reachable in IANA's registries. An IPv4-mapped address or a NAT64 address
/// (64:ff9b::/96, RFC 6052) is judged by the IPv4 address it carries, since a NAT64 gateway
/// forwards it there; the local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215) is not global.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || (o[0] == 100 && (o[1] & 0xC0) == 64)
                || (o[0] == 198 && (o[1] & 0xFE) == 18)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] & 0xF0) == 240
                || o[0] == 0)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return is_public(IpAddr::V4([o[12], o[13], o[14], o[15]].into()));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1))
        }
    }
}

/// A DNS resolver for the upstream HTTP client that drops addresses the policy
/// refuses, so the check holds at connect time (no rebinding window).
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    pub allowlist: Arc<Allowlist>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allowlist = self.allowlist.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| allowlist.check_ip(a.ip()).is_ok())
                .collect();
            if addrs.is_empty() {
                return Err("the upstream host resolves to no address the relay may use".into());
            }
            let iter: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(iter)
        })
    }
}

/// Resolves a URL's host to the first address the policy allows.
pub async fn resolve_allowed(allowlist: &Allowlist, url: &Url) -> Result<SocketAddr, SetupError> {
    let port = url.port_or_known_default().unwrap_or(443);
    let host = match url.host() {
        Some(Host::Ipv4(ip)) => return Ok(SocketAddr::new(IpAddr::V4(ip), port)),
        Some(Host::Ipv6(ip)) => return Ok(SocketAddr::new(IpAddr::V6(ip), port)),
        Some(Host::Domain(d)) => d.to_string(),
        None => return Err(SetupError::UpstreamNotAllowed("the URL has no host".into())),
    };
    let addrs = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| {
            SetupError::UpstreamUnreachable(format!("cannot resolve the upstream host: {e}"))
        })?;
    for a in addrs {
        if allowlist.check_ip(a.ip()).is_ok() {
            return Ok(a);
        }
    }
    Err(SetupError::UpstreamNotAllowed(
        "the upstream host resolves to no address the relay may use".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(private: bool) -> Allowlist {
        Allowlist::new(
            &[
                "https://api.openai.com".to_string(),
                "http://127.0.0.1:8089".to_string(),
                "https://gw.example.test/prefix".to_string(),
            ],
            private,
        )
        .unwrap()
    }

    #[test]
    fn table_of_upstreams() {
        let rows: &[(&str, bool, bool)] = &[
            // (url, allow_private, allowed)
            ("https://api.openai.com", false, true),
            ("https://api.openai.com:443", false, true),
            ("https://API.OpenAI.com/", false, true),
            ("http://api.openai.com", false, false),
            ("https://api.openai.com:8443", false, false),
            ("https://api.openai.com.evil.test", false, false),
            ("https://user:pw@api.openai.com", false, false),
            ("https://api.openai.com?x=1", false, false),
            ("http://127.0.0.1:8089", false, false),
            ("http://127.0.0.1:8089", true, true),
            ("http://127.0.0.1:8090", true, false),
            ("http://localhost:8089", true, false),
            ("https://gw.example.test/prefix/v2", false, true),
            ("https://gw.example.test/other", false, false),
            ("file:///etc/passwd", true, false),
            ("gopher://127.0.0.1:8089", true, false),
            ("not a url", true, false),
        ];
        for (url, private, ok) in rows {
            let got = list(*private).check(url);
            assert_eq!(got.is_ok(), *ok, "{url} private={private}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.code(), "upstream_not_allowed");
            }
        }
    }

    #[test]
    fn private_and_special_ranges_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            // benchmarking (RFC 2544), both halves of the /15
            "198.18.0.1",
            "198.19.255.254",
            // IETF protocol assignments, reserved (240/4), documentation
            "192.0.0.8",
            "240.0.0.1",
            "255.255.255.254",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.7",
            "2001:db8::1",
            "2001:db8:ffff::1",
            // NAT64 carrying a non-public IPv4, and the local-use NAT64 prefix
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::198.18.0.1",
            "64:ff9b:1::8.8.8.8",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "162.159.140.245",
            "2606:4700::6810:1",
            // the neighbours of the special ranges stay public
            "198.17.255.255",
            "198.20.0.1",
            "192.0.1.1",
            "223.1.1.1",
            "2001:db9::1",
            // NAT64 reaching a public IPv4
            "64:ff9b::162.159.140.245",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn bad_entries_are_refused_at_load() {
        assert!(Allowlist::new(&["ftp://x".into()], false).is_err());
        assert!(Allowlist::new(&["https://u:p@x".into()], false).is_err());
    }
}
