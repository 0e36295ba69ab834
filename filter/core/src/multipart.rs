//! `multipart/form-data` bodies (RFC 7578 over RFC 2046): part `sdp` required, part `session`
//! optional; duplicates, oversized parts and structural errors refused.

use crate::error::FilterError;

/// Most parts a body may have (known or not).
pub const MAX_PARTS: usize = 8;
/// Most header lines in one part.
pub const MAX_PART_HEADERS: usize = 8;
/// Size cap of parts other than `sdp` and `session` (which have their own caps).
pub const MAX_OTHER_PART_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormParts<'a> {
    pub sdp: &'a [u8],
    pub session: Option<&'a [u8]>,
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn malformed(why: &'static str) -> FilterError {
    FilterError::MalformedMultipart(why)
}

/// After a delimiter at `at`: returns (is_close, index of the first byte after the line).
fn delimiter_tail(body: &[u8], at: usize) -> Result<(bool, usize), FilterError> {
    let rest = body.get(at..).unwrap_or(&[]);
    if rest.starts_with(b"--") {
        return Ok((true, at + 2));
    }
    let lwsp = rest
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count();
    if rest.get(lwsp..lwsp + 2) == Some(b"\r\n") {
        Ok((false, at + lwsp + 2))
    } else {
        Err(malformed("boundary line not followed by CRLF or '--'"))
    }
}

/// Splits a multipart body into its parts.
pub fn parse<'a>(
    body: &'a [u8],
    boundary: &str,
    max_sdp: usize,
    max_session: usize,
) -> Result<FormParts<'a>, FilterError> {
    let delim = [b"--".as_slice(), boundary.as_bytes()].concat();
    let crlf_delim = [b"\r\n".as_slice(), &delim].concat();
    // Opening delimiter: at the very start, or after a preamble ending in CRLF.
    let mut pos = if body.starts_with(&delim) {
        delim.len()
    } else {
        find(body, &crlf_delim, 0).ok_or(malformed("no opening boundary"))? + crlf_delim.len()
    };
    let mut sdp: Option<&[u8]> = None;
    let mut session: Option<&[u8]> = None;
    let mut parts = 0usize;
    loop {
        let (close, start) = delimiter_tail(body, pos)?;
        if close {
            if parts == 0 {
                return Err(malformed("no parts"));
            }
            break;
        }
        parts += 1;
        if parts > MAX_PARTS {
            return Err(malformed("too many parts"));
        }
        let end = find(body, &crlf_delim, start).ok_or(malformed("missing closing boundary"))?;
        let part = body.get(start..end).ok_or(malformed("bad part bounds"))?;
        pos = end + crlf_delim.len();

        let mut headers = [httparse::EMPTY_HEADER; MAX_PART_HEADERS];
        let (hlen, headers) = match httparse::parse_headers(part, &mut headers) {
            Ok(httparse::Status::Complete((n, h))) => (n, h),
            Ok(httparse::Status::Partial) => return Err(malformed("part headers not terminated")),
            Err(httparse::Error::TooManyHeaders) => return Err(malformed("too many part headers")),
            Err(_) => return Err(malformed("invalid part headers")),
        };
        let content = part.get(hlen..).unwrap_or(&[]);
        let mut name: Option<String> = None;
        let mut seen_disposition = false;
        for h in headers.iter() {
            if h.name.eq_ignore_ascii_case("content-disposition") {
                if seen_disposition {
                    return Err(malformed("duplicate Content-Disposition"));
                }
                seen_disposition = true;
                let v = std::str::from_utf8(h.value)
                    .map_err(|_| malformed("Content-Disposition is not UTF-8"))?;
                let (kind, rest) = match v.find(';') {
                    Some(i) => (v.get(..i).unwrap_or(""), v.get(i..).unwrap_or("")),
                    None => (v, ""),
                };
                if !kind.trim().eq_ignore_ascii_case("form-data") {
                    return Err(malformed("Content-Disposition is not form-data"));
                }
                let params = crate::content_type::params(rest)
                    .map_err(|_| malformed("invalid Content-Disposition parameters"))?;
                name = params
                    .into_iter()
                    .find(|(k, _)| k == "name")
                    .map(|(_, v)| v);
            }
        }
        let name = name.ok_or(malformed("part without Content-Disposition name"))?;
        match name.as_str() {
            "sdp" => {
                if sdp.is_some() {
                    return Err(FilterError::DuplicatePart("sdp"));
                }
                if content.len() > max_sdp {
                    return Err(FilterError::PartTooLarge {
                        name: "sdp",
                        limit: max_sdp,
                    });
                }
                sdp = Some(content);
            }
            "session" => {
                if session.is_some() {
                    return Err(FilterError::DuplicatePart("session"));
                }
                if content.len() > max_session {
                    return Err(FilterError::PartTooLarge {
                        name: "session",
                        limit: max_session,
                    });
                }
                session = Some(content);
            }
            _ => {
                if content.len() > MAX_OTHER_PART_BYTES {
                    return Err(malformed("unknown part too large"));
                }
            }
        }
    }
    Ok(FormParts {
        sdp: sdp.ok_or(FilterError::MissingSdp)?,
        session,
    })
}

/// Builds a multipart body (tests and tools).
pub fn build(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, ctype, content) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        out.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
        );
        if let Some(ct) = ctype {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_parts_with_preamble_and_epilogue() {
        let mut body = b"preamble\r\n".to_vec();
        body.extend(build(
            "xyz",
            &[
                ("sdp", Some("application/sdp"), b"v=0\r\n"),
                ("session", Some("application/json"), b"{\"model\":\"m\"}"),
            ],
        ));
        body.extend_from_slice(b"epilogue");
        let p = parse(&body, "xyz", 1000, 1000).unwrap();
        assert_eq!(p.sdp, b"v=0\r\n");
        assert_eq!(p.session, Some(b"{\"model\":\"m\"}".as_slice()));
    }
}
