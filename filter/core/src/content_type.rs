//! `Content-Type` of a call-creation request.

use crate::error::FilterError;

/// The two accepted body forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/sdp`: the whole body is the offer.
    Sdp,
    /// `multipart/form-data` with this boundary.
    Multipart { boundary: String },
    /// A GPT-Live create: JSON `{session, transport: {type: "webrtc", sdp}}` ([`crate::live`]).
    LiveJson,
}

const MAX_CONTENT_TYPE_LEN: usize = 512;

/// Characters allowed in a boundary (RFC 2046 `bchars`).
fn is_bchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b)
}

/// `; key=value; key="quoted value"` parameters, by the parser the multipart part headers use
/// too (`rtc_peer::header_params`), with the same client-visible reasons.
pub(crate) fn params(s: &str) -> Result<Vec<(String, String)>, FilterError> {
    rtc_peer::header_params::params(s).map_err(|e| FilterError::MalformedContentType(e.reason()))
}

/// Classifies the request body by its `Content-Type` header value.
pub fn parse(value: Option<&str>) -> Result<BodyKind, FilterError> {
    let value = value.ok_or(FilterError::MissingContentType)?;
    if value.len() > MAX_CONTENT_TYPE_LEN {
        return Err(FilterError::MalformedContentType("too long"));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(FilterError::MalformedContentType("control characters"));
    }
    let (mime, rest) = match value.find(';') {
        Some(i) => (value.get(..i).unwrap_or(""), value.get(i..).unwrap_or("")),
        None => (value, ""),
    };
    let mime = mime.trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/sdp" => {
            for (k, v) in params(rest)? {
                if k == "charset" && !v.eq_ignore_ascii_case("utf-8") {
                    return Err(FilterError::UnsupportedContentType);
                }
            }
            Ok(BodyKind::Sdp)
        }
        "multipart/form-data" => {
            let boundary = params(rest)?
                .into_iter()
                .find(|(k, _)| k == "boundary")
                .map(|(_, v)| v)
                .ok_or(FilterError::MalformedContentType(
                    "multipart/form-data without boundary",
                ))?;
            if boundary.is_empty() || boundary.len() > 70 {
                return Err(FilterError::MalformedContentType(
                    "boundary must be 1 to 70 characters",
                ));
            }
            if !boundary.bytes().all(is_bchar) || boundary.ends_with(' ') {
                return Err(FilterError::MalformedContentType(
                    "boundary has characters RFC 2046 does not allow",
                ));
            }
            Ok(BodyKind::Multipart { boundary })
        }
        "" => Err(FilterError::MissingContentType),
        _ => Err(FilterError::UnsupportedContentType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        assert_eq!(parse(Some("application/sdp")), Ok(BodyKind::Sdp));
        assert_eq!(
            parse(Some("Application/SDP; charset=UTF-8")),
            Ok(BodyKind::Sdp)
        );
        assert_eq!(
            parse(Some(
                "multipart/form-data; boundary=----WebKitFormBoundaryabc"
            )),
            Ok(BodyKind::Multipart {
                boundary: "----WebKitFormBoundaryabc".into()
            })
        );
        assert_eq!(
            parse(Some(
                r#"multipart/form-data; charset=utf-8; boundary="a b:c""#
            )),
            Ok(BodyKind::Multipart {
                boundary: "a b:c".into()
            })
        );
    }
}
