//! A cheap sanity check of the client's SDP offer before any gRPC call. The relay parses the
//! offer fully; this refuses what is obviously not an offer, cheaply and with a clear code.

use crate::error::FilterError;
use rtc_peer::multipart::MultipartError;

pub const MAX_LINE_LEN: usize = 4096;
pub const MAX_LINES: usize = 2000;

/// Validates `bytes` as an SDP offer of at most `max_bytes`; returns it as text.
pub fn validate_offer(bytes: &[u8], max_bytes: usize) -> Result<&str, FilterError> {
    if bytes.is_empty() || bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(FilterError::MissingSdp);
    }
    if bytes.len() > max_bytes {
        return Err(FilterError::Multipart(MultipartError::PartTooLarge {
            name: "sdp",
            limit: max_bytes,
        }));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| FilterError::InvalidSdp("not UTF-8"))?;
    if !text.starts_with("v=0\r\n") && !text.starts_with("v=0\n") {
        return Err(FilterError::InvalidSdp("must start with the line v=0"));
    }
    if !text.ends_with('\n') {
        return Err(FilterError::InvalidSdp(
            "truncated: last line has no line end",
        ));
    }
    let mut lines = 0usize;
    let (mut has_o, mut has_s, mut has_t) = (false, false, false);
    let mut usable_media = false;
    for raw in text.split_terminator('\n') {
        lines += 1;
        if lines > MAX_LINES {
            return Err(FilterError::InvalidSdp("too many lines"));
        }
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.len() > MAX_LINE_LEN {
            return Err(FilterError::InvalidSdp("line too long"));
        }
        if line.chars().any(|c| c.is_control() && c != '\t') {
            return Err(FilterError::InvalidSdp("control characters"));
        }
        let b = line.as_bytes();
        let (Some(kind), Some(b'=')) = (b.first(), b.get(1)) else {
            return Err(FilterError::InvalidSdp(
                "every line must be <letter>=<value>",
            ));
        };
        let value = line.get(2..).unwrap_or("");
        match kind {
            b'v' if lines != 1 => return Err(FilterError::InvalidSdp("v= appears twice")),
            b'o' => has_o = true,
            b's' => has_s = true,
            b't' => has_t = true,
            b'm' => {
                let mut f = value.split(' ');
                let media = f.next().unwrap_or("");
                let port = f.next().unwrap_or("");
                let proto = f.next().unwrap_or("");
                if media.is_empty() || port.is_empty() || proto.is_empty() {
                    return Err(FilterError::InvalidSdp("malformed m= line"));
                }
                let port_num = port.split('/').next().unwrap_or("");
                if port_num.parse::<u16>().is_err() {
                    return Err(FilterError::InvalidSdp("malformed m= port"));
                }
                if matches!(media, "audio" | "application") {
                    usable_media = true;
                }
            }
            b'a' => {
                if let Some(role) = value.strip_prefix("setup:") {
                    if role.trim() != "actpass"
                        && role.trim() != "active"
                        && role.trim() != "passive"
                    {
                        return Err(FilterError::InvalidSdp("unknown a=setup role"));
                    }
                    if role.trim() != "actpass" {
                        // RFC 8842: an offerer uses actpass; anything else is an answer.
                        return Err(FilterError::InvalidSdp(
                            "not an offer (a=setup is not actpass)",
                        ));
                    }
                }
            }
            b'b' | b'c' | b'e' | b'i' | b'k' | b'p' | b'r' | b'u' | b'z' | b'v' => {}
            _ => return Err(FilterError::InvalidSdp("unknown line type")),
        }
    }
    if !(has_o && has_s && has_t) {
        return Err(FilterError::InvalidSdp("missing o=, s= or t= line"));
    }
    if !usable_media {
        return Err(FilterError::InvalidSdp("no audio or application m= line"));
    }
    Ok(text)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const OFFER: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=setup:actpass\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\na=fingerprint:sha-256 00:11\r\na=rtpmap:111 opus/48000/2\r\na=sendrecv\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=setup:actpass\r\na=sctp-port:5000\r\n";

    /// Offers captured from Chromium and aiortc (testdata/offers).
    #[test]
    fn offers_from_chromium_and_aiortc_pass() {
        for offer in [
            include_str!("../../../testdata/offers/chromium-156.sdp"),
            include_str!("../../../testdata/offers/aiortc-1.16.0.sdp"),
        ] {
            assert_eq!(validate_offer(offer.as_bytes(), 32 * 1024), Ok(offer));
        }
    }

    #[test]
    fn a_browser_like_offer_passes() {
        assert!(validate_offer(OFFER.as_bytes(), 32 * 1024).is_ok());
        assert!(validate_offer(OFFER.replace("\r\n", "\n").as_bytes(), 32 * 1024).is_ok());
    }
}
