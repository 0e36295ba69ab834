//! Upstream allowlist: the relay must never become an open relay or an SSRF tool.
//!
//! Two checks. (1) The base URL's scheme, host and port must equal a configured entry
//! (and its path start with the entry's path). (2) Resolve, then check: the addresses a
//! host resolves to are filtered at connect time by [`PolicyResolver`], so a name that
//! later resolves to loopback or a private range is refused unless private targets are
//! explicitly allowed. IP-literal hosts never reach a resolver, so they are checked here.

use crate::error::SetupError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
                && path_within(url.path(), e.path())
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

/// True when `path` is the entry's path or lies below it, matching whole segments:
/// `/prefix` covers `/prefix`, `/prefix/` and `/prefix/v1`, never `/prefixevil`.
fn path_within(path: &str, entry: &str) -> bool {
    let entry = entry.trim_end_matches('/');
    match path.strip_prefix(entry) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
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

/// True for addresses the relay may treat as globally reachable, following IANA's
/// special-purpose address registries (iana-ipv4-special-registry and
/// iana-ipv6-special-registry): an address in a block whose "Globally Reachable" is False,
/// or N/A (deprecated), is not public; loopback, multicast and broadcast are never public.
///
/// IPv4: not public are 0.0.0.0/8, 10/8, 100.64/10 (shared), 127/8, 169.254/16, 172.16/12,
/// 192.0.0.0/24 (IETF protocol assignments; except the PCP and TURN anycast addresses
/// 192.0.0.9 and 192.0.0.10, which the registry marks global), 192.0.2/24, 192.88.99/24
/// (deprecated 6to4 relay anycast), 192.168/16, 198.18/15 (benchmarking), 198.51.100/24,
/// 203.0.113/24, 224/4 (multicast) and 240/4 (reserved, with 255.255.255.255).
///
/// IPv6: only the global-unicast space 2000::/3 can be public (everything else IANA holds
/// is reserved, local, multicast or special: ::1, ::, 100::/64 discard-only,
/// 100:0:0:1::/64 dummy prefix, 5f00::/16 SRv6 SIDs, fc00::/7, fe80::/10, fec0::/10,
/// ff00::/8). Inside it, not public are 2001::/23 (IETF protocol assignments: Teredo
/// 2001::/32, benchmarking 2001:2::/48, ORCHID 2001:10::/28, ORCHIDv2 2001:20::/28 and
/// DRIP 2001:30::/28, which are identifiers rather than routable locators; except the
/// global anycast addresses 2001:1::1, 2001:1::2 and 2001:1::3, AMT 2001:3::/32 and AS112
/// 2001:4:112::/48), 2001:db8::/32 and 3fff::/20 (documentation).
///
/// Addresses that carry an IPv4 address a translator or tunnel delivers to are judged by
/// that IPv4 address: IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d (deprecated),
/// NAT64 64:ff9b::/96 (RFC 6052; the local-use prefix 64:ff9b:1::/48 of RFC 8215 is never
/// public) and 6to4 2002::/16 (RFC 3056, the IPv4 address in bits 16..48).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    // 192.0.0.9 (PCP anycast) and 192.0.0.10 (TURN anycast) are globally reachable.
    if o[..3] == [192, 0, 0] {
        return matches!(o[3], 9 | 10);
    }
    !(o[0] == 0
        || v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_multicast()
        || v4.is_documentation()
        || (o[0] == 100 && (o[1] & 0xC0) == 64)
        || (o[0] == 198 && (o[1] & 0xFE) == 18)
        || o[..3] == [192, 88, 99]
        || (o[0] & 0xF0) == 240)
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    let o = v6.octets();
    let embedded = |a: usize| Ipv4Addr::new(o[a], o[a + 1], o[a + 2], o[a + 3]);
    // IPv4-mapped ::ffff:0:0/96 and IPv4-compatible ::/96 (which also holds :: and ::1,
    // whose embedded 0.0.0.0 and 0.0.0.1 are not public).
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return is_public_v4(embedded(12));
    }
    // NAT64 well-known prefix.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded(12));
    }
    // 6to4.
    if s[0] == 0x2002 {
        return is_public_v4(embedded(2));
    }
    // Outside global unicast 2000::/3 nothing is public.
    if (s[0] & 0xe000) != 0x2000 {
        return false;
    }
    if s[0] == 0x2001 && s[1] < 0x200 {
        let anycast = s[1] == 1 && s[2..7] == [0; 5] && matches!(s[7], 1..=3);
        let amt = s[1] == 3;
        let as112 = s[1] == 4 && s[2] == 0x112;
        return anycast || amt || as112;
    }
    !((s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] < 0x1000))
}

/// What [`Allowlist::filter_answer_candidates`] removed from an upstream answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DroppedCandidates {
    /// Candidates whose address is an IP the policy refuses.
    pub not_public: usize,
    /// Candidates whose address is not an IP literal (mDNS `.local` names, garbage): the
    /// relay resolves nothing a provider names in its answer.
    pub not_ip: usize,
}

/// An upstream answer after [`Allowlist::filter_answer_candidates`].
#[derive(Debug)]
pub struct FilteredAnswer {
    /// The answer without the refused candidates.
    pub sdp: String,
    pub dropped: DroppedCandidates,
    /// The policy applied and no candidate was left.
    pub none_usable: bool,
}

impl FilteredAnswer {
    /// The answer to give str0m, or `upstream_candidates_not_allowed` when the provider
    /// (or whoever answered a plain-HTTP exchange) named nowhere the relay may send media.
    pub fn usable(self) -> Result<String, SetupError> {
        if self.none_usable {
            return Err(SetupError::UpstreamCandidatesNotAllowed(format!(
                "the upstream answer has no ICE candidate the relay may use ({} not public, {} not an IP address), and private upstreams are not allowed",
                self.dropped.not_public, self.dropped.not_ip
            )));
        }
        Ok(self.sdp)
    }
}

impl Allowlist {
    /// Applies the private-address policy to the ICE candidates of an upstream's SDP
    /// answer: unless private upstreams are allowed, every `a=candidate` line whose
    /// address is not a public IP literal is removed.
    pub fn filter_answer_candidates(&self, answer: &str) -> FilteredAnswer {
        let mut dropped = DroppedCandidates::default();
        if self.allow_private {
            return FilteredAnswer {
                sdp: answer.to_string(),
                dropped,
                none_usable: false,
            };
        }
        let mut kept = 0usize;
        let mut out = String::with_capacity(answer.len());
        for line in answer.split_inclusive('\n') {
            let Some(candidate) = line.trim_end().strip_prefix("a=candidate:") else {
                out.push_str(line);
                continue;
            };
            // foundation component transport priority address port typ type ...
            match candidate
                .split_ascii_whitespace()
                .nth(4)
                .map(str::parse::<IpAddr>)
            {
                Some(Ok(ip)) if is_public(ip) => {
                    kept += 1;
                    out.push_str(line);
                }
                Some(Ok(_)) => dropped.not_public += 1,
                _ => dropped.not_ip += 1,
            }
        }
        FilteredAnswer {
            sdp: out,
            dropped,
            none_usable: kept == 0,
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
    fn paths_match_whole_segments() {
        let rows: &[(&str, &str, bool)] = &[
            // (url path, entry path, within)
            ("/prefix", "/prefix", true),
            ("/prefix/", "/prefix", true),
            ("/prefix/v1", "/prefix", true),
            ("/prefix/v1", "/prefix/", true),
            ("/prefix", "/prefix/", true),
            ("/prefixevil", "/prefix", false),
            ("/prefix-evil/v1", "/prefix", false),
            ("/prefixevil", "/prefix/", false),
            ("/pre", "/prefix", false),
            ("/", "/prefix", false),
            ("/other/prefix", "/prefix", false),
            ("/anything", "/", true),
            ("/", "/", true),
            ("/v1/realtime", "/v1", true),
            ("/v10/realtime", "/v1", false),
        ];
        for (path, entry, within) in rows {
            assert_eq!(path_within(path, entry), *within, "{path} under {entry}");
        }
        for (url, ok) in [
            ("https://gw.example.test/prefix", true),
            ("https://gw.example.test/prefix/", true),
            ("https://gw.example.test/prefix/v1/realtime", true),
            ("https://gw.example.test/prefixevil", false),
            ("https://gw.example.test/prefixevil/v1", false),
            ("https://gw.example.test/prefix.evil", false),
        ] {
            assert_eq!(list(false).check(url).is_ok(), ok, "{url}");
        }
    }

    /// One row per special-purpose block of IANA's IPv4 and IPv6 registries (and the
    /// embedded-IPv4 forms), each with its public neighbours just outside it.
    #[test]
    fn public_follows_the_iana_special_purpose_registries() {
        let rows: &[(&str, bool)] = &[
            // 0.0.0.0/8 "this network"
            ("0.0.0.0", false),
            ("0.255.255.255", false),
            ("1.0.0.0", true),
            // 10.0.0.0/8
            ("9.255.255.255", true),
            ("10.0.0.0", false),
            ("10.255.255.255", false),
            ("11.0.0.0", true),
            // 100.64.0.0/10 shared address space
            ("100.63.255.255", true),
            ("100.64.0.0", false),
            ("100.127.255.255", false),
            ("100.128.0.0", true),
            // 127.0.0.0/8
            ("126.255.255.255", true),
            ("127.0.0.1", false),
            ("127.255.255.255", false),
            ("128.0.0.0", true),
            // 169.254.0.0/16
            ("169.253.255.255", true),
            ("169.254.169.254", false),
            ("169.255.0.0", true),
            // 172.16.0.0/12
            ("172.15.255.255", true),
            ("172.16.0.1", false),
            ("172.31.255.255", false),
            ("172.32.0.0", true),
            // 192.0.0.0/24 IETF protocol assignments, with its two global anycast addresses
            ("191.255.255.255", true),
            ("192.0.0.0", false),
            ("192.0.0.8", false),
            ("192.0.0.9", true),
            ("192.0.0.10", true),
            ("192.0.0.11", false),
            ("192.0.0.170", false),
            ("192.0.0.255", false),
            ("192.0.1.0", true),
            // 192.0.2.0/24 TEST-NET-1
            ("192.0.2.1", false),
            ("192.0.3.0", true),
            // 192.31.196.0/24 AS112, 192.52.193.0/24 AMT, 192.175.48.0/24: global
            ("192.31.196.1", true),
            ("192.52.193.1", true),
            ("192.175.48.1", true),
            // 192.88.99.0/24 deprecated 6to4 relay anycast
            ("192.88.98.255", true),
            ("192.88.99.1", false),
            ("192.88.100.0", true),
            // 192.168.0.0/16
            ("192.167.255.255", true),
            ("192.168.1.1", false),
            ("192.169.0.0", true),
            // 198.18.0.0/15 benchmarking
            ("198.17.255.255", true),
            ("198.18.0.1", false),
            ("198.19.255.254", false),
            ("198.20.0.0", true),
            // 198.51.100.0/24 and 203.0.113.0/24 documentation
            ("198.51.99.255", true),
            ("198.51.100.1", false),
            ("198.51.101.0", true),
            ("203.0.112.255", true),
            ("203.0.113.7", false),
            ("203.0.114.0", true),
            // 224.0.0.0/4 multicast, 240.0.0.0/4 reserved, broadcast
            ("223.255.255.255", true),
            ("224.0.0.1", false),
            ("239.255.255.255", false),
            ("240.0.0.1", false),
            ("255.255.255.254", false),
            ("255.255.255.255", false),
            ("162.159.140.245", true),
            // IPv6: ::/128, ::1/128, and IPv4-compatible ::/96 judged by the IPv4 it carries
            ("::", false),
            ("::1", false),
            ("::2", false),
            ("::127.0.0.1", false),
            ("::10.0.0.1", false),
            ("::11.0.0.1", true),
            ("::1:0:0:0", false),
            // IPv4-mapped ::ffff:0:0/96
            ("::ffff:127.0.0.1", false),
            ("::ffff:192.168.0.1", false),
            ("::ffff:198.18.0.1", false),
            ("::ffff:11.0.0.1", true),
            ("::fffe:11.0.0.1", false),
            // NAT64 64:ff9b::/96, and the local-use 64:ff9b:1::/48
            ("64:ff9b::127.0.0.1", false),
            ("64:ff9b::10.0.0.1", false),
            ("64:ff9b::198.18.0.1", false),
            ("64:ff9b::162.159.140.245", true),
            ("64:ff9b:0:0:0:1:b00:1", false),
            ("64:ff9b:1::11.0.0.1", false),
            // 100::/64 discard-only, 100:0:0:1::/64 dummy prefix
            ("100::1", false),
            ("100:0:0:1::1", false),
            ("100:0:0:2::1", false),
            // 2001::/23 IETF protocol assignments
            ("2000:ffff:ffff:ffff::1", true),
            ("2001::1", false),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", false),
            ("2001:1::1", true),
            ("2001:1::2", true),
            ("2001:1::3", true),
            ("2001:1::4", false),
            ("2001:2::1", false),
            ("2001:3::1", true),
            ("2001:4:112::1", true),
            ("2001:4:113::1", false),
            ("2001:10::1", false),
            ("2001:20::1", false),
            ("2001:2f:ffff::1", false),
            ("2001:30::1", false),
            ("2001:1ff:ffff::1", false),
            ("2001:200::1", true),
            // 2001:db8::/32 documentation
            ("2001:db7:ffff::1", true),
            ("2001:db8::1", false),
            ("2001:db8:ffff::1", false),
            ("2001:db9::1", true),
            // 2002::/16 6to4, judged by the IPv4 it carries
            ("2002:7f00:1::1", false),
            ("2002:a00:1::1", false),
            ("2002:c0a8:101::1", false),
            ("2002:c612:1::1", false),
            ("2002:b00:1::1", true),
            ("2003::1", true),
            // 2620:4f:8000::/48 AS112: global
            ("2620:4f:8000::1", true),
            // 3fff::/20 documentation
            ("3ffe:ffff::1", true),
            ("3fff::1", false),
            ("3fff:fff::1", false),
            ("3fff:1000::1", true),
            // outside 2000::/3: SRv6 SIDs, ULA, link-local, site-local, multicast
            ("4000::1", false),
            ("5f00::1", false),
            ("fc00::1", false),
            ("fd00::1", false),
            ("fe80::1", false),
            ("fec0::1", false),
            ("ff02::1", false),
            ("2606:4700::6810:1", true),
        ];
        for (ip, public) in rows {
            assert_eq!(is_public(ip.parse().unwrap()), *public, "{ip}");
        }
    }

    #[test]
    fn answer_candidates_follow_the_address_policy() {
        let head = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n";
        let cand = |addr: &str| format!("a=candidate:1 1 udp 2130706431 {addr} 3478 typ host\r\n");
        let rows: &[(&[&str], usize, usize, usize)] = &[
            // (candidate addresses, kept, not public, not ip)
            (&["162.159.140.245"], 1, 0, 0),
            (&["2606:4700::6810:1"], 1, 0, 0),
            (&["127.0.0.1"], 0, 1, 0),
            (&["10.0.0.7", "162.159.140.245"], 1, 1, 0),
            (
                &["192.168.1.2", "169.254.169.254", "64:ff9b::10.0.0.1"],
                0,
                3,
                0,
            ),
            (&["2002:a00:1::1", "198.18.0.1", "11.0.0.1"], 1, 2, 0),
            (&["abcd-1234.local"], 0, 0, 1),
            (&["abcd-1234.local", "11.0.0.2"], 1, 0, 1),
            (&[], 0, 0, 0),
        ];
        for (addrs, kept, not_public, not_ip) in rows {
            let answer: String = std::iter::once(head.to_string())
                .chain(addrs.iter().map(|a| cand(a)))
                .collect();
            let filtered = list(false).filter_answer_candidates(&answer);
            assert_eq!(
                filtered.dropped,
                DroppedCandidates {
                    not_public: *not_public,
                    not_ip: *not_ip
                },
                "{addrs:?}"
            );
            assert_eq!(
                filtered.sdp.matches("a=candidate:").count(),
                *kept,
                "{addrs:?}"
            );
            assert!(filtered.sdp.starts_with(head), "{addrs:?}");
            match filtered.usable() {
                Ok(sdp) => assert!(*kept > 0, "{addrs:?}: {sdp}"),
                Err(e) => {
                    assert_eq!(*kept, 0, "{addrs:?}");
                    assert_eq!(e.code(), "upstream_candidates_not_allowed");
                    assert!(e.is_upstream_fault());
                    assert!(!e.to_string().contains("10.0.0"), "{e}");
                }
            }
            // With private upstreams allowed the answer passes untouched.
            let open = list(true).filter_answer_candidates(&answer);
            assert_eq!(open.dropped, DroppedCandidates::default());
            assert_eq!(open.usable().unwrap(), answer);
        }
    }

    #[test]
    fn bad_entries_are_refused_at_load() {
        assert!(Allowlist::new(&["ftp://x".into()], false).is_err());
        assert!(Allowlist::new(&["https://u:p@x".into()], false).is_err());
    }
}
