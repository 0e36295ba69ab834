//! `multipart/form-data` bodies (RFC 7578 over RFC 2046) as the Realtime API takes them:
//! part `sdp` (the offer) and optionally part `session` (JSON). Parts with other names are
//! tolerated up to a small size; duplicates, oversized parts and structural errors are refused.
//!
//! One parser for the filter (strict: CRLF line ends only, tight limits) and the echo model
//! (lenient like a web server: bare LF accepted), one builder for the relay and tests.

use crate::header_params::params;
use std::fmt;

/// Most parts a body may have by default (known or not).
pub const MAX_PARTS: usize = 8;
/// Most header lines in one part by default.
pub const MAX_PART_HEADERS: usize = 8;
/// Default size cap of parts other than `sdp` and `session`.
pub const MAX_OTHER_PART_BYTES: usize = 4096;

/// What a body may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_parts: usize,
    pub max_part_headers: usize,
    pub max_sdp_bytes: usize,
    pub max_session_bytes: usize,
    pub max_other_part_bytes: usize,
    /// Accept bare LF where RFC 2046 says CRLF (around delimiters). The filter refuses such
    /// bodies; the echo model, like many servers, takes them.
    pub bare_lf: bool,
}

impl Limits {
    /// The default limits with these part caps, CRLF only.
    pub const fn new(max_sdp_bytes: usize, max_session_bytes: usize) -> Self {
        Limits {
            max_parts: MAX_PARTS,
            max_part_headers: MAX_PART_HEADERS,
            max_sdp_bytes,
            max_session_bytes,
            max_other_part_bytes: MAX_OTHER_PART_BYTES,
            bare_lf: false,
        }
    }
}

/// One known part: its bytes and its `Content-Type`, if it had one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part<'a> {
    pub data: &'a [u8],
    pub content_type: Option<&'a str>,
}

/// The known parts of a body, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Form<'a> {
    pub sdp: Option<Part<'a>>,
    pub session: Option<Part<'a>>,
}

impl<'a> Form<'a> {
    /// The `sdp` part, which every call-creation body needs.
    pub fn require_sdp(&self) -> Result<Part<'a>, MultipartError> {
        self.sdp.ok_or(MultipartError::MissingSdp)
    }
}

/// A structural fault of the body. `reason()` is the text clients may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    MissingBoundary,
    NoOpeningDelimiter,
    BadDelimiterLine,
    NoClosingDelimiter,
    NoParts,
    TooManyParts,
    HeadersNotTerminated,
    TooManyHeaders,
    BadHeaders,
    DuplicateDisposition,
    DispositionNotUtf8,
    NotFormData,
    BadDispositionParams,
    MissingPartName,
    OtherPartTooLarge,
}

impl Malformed {
    pub fn reason(self) -> &'static str {
        match self {
            Malformed::MissingBoundary => "no boundary parameter in Content-Type",
            Malformed::NoOpeningDelimiter => "no opening boundary",
            Malformed::BadDelimiterLine => "boundary line not followed by CRLF or '--'",
            Malformed::NoClosingDelimiter => "missing closing boundary",
            Malformed::NoParts => "no parts",
            Malformed::TooManyParts => "too many parts",
            Malformed::HeadersNotTerminated => "part headers not terminated",
            Malformed::TooManyHeaders => "too many part headers",
            Malformed::BadHeaders => "invalid part headers",
            Malformed::DuplicateDisposition => "duplicate Content-Disposition",
            Malformed::DispositionNotUtf8 => "Content-Disposition is not UTF-8",
            Malformed::NotFormData => "Content-Disposition is not form-data",
            Malformed::BadDispositionParams => "invalid Content-Disposition parameters",
            Malformed::MissingPartName => "part without Content-Disposition name",
            Malformed::OtherPartTooLarge => "unknown part too large",
        }
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// Why a body was refused; `code()` is the stable code clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("malformed multipart body: {0}")]
    Malformed(Malformed),
    #[error("multipart part '{0}' appears more than once")]
    DuplicatePart(&'static str),
    #[error("multipart part '{name}' exceeds {limit} bytes")]
    PartTooLarge { name: &'static str, limit: usize },
    #[error("missing SDP offer")]
    MissingSdp,
}

impl MultipartError {
    pub fn code(&self) -> &'static str {
        match self {
            MultipartError::Malformed(_) => "malformed_multipart",
            MultipartError::DuplicatePart(_) => "duplicate_part",
            MultipartError::PartTooLarge { .. } => "part_too_large",
            MultipartError::MissingSdp => "missing_sdp",
        }
    }
}

impl From<Malformed> for MultipartError {
    fn from(m: Malformed) -> Self {
        MultipartError::Malformed(m)
    }
}

/// The `boundary` of a `multipart/form-data` content type (RFC 2046: 1 to 70 characters).
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let (mime, rest) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return Err(Malformed::MissingBoundary.into());
    }
    params(rest)
        .ok()
        .and_then(|ps| ps.into_iter().find(|(k, _)| k == "boundary"))
        .map(|(_, v)| v)
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or(Malformed::MissingBoundary.into())
}

/// The `Content-Type` of a body built with [`build`].
pub fn content_type(boundary: &str) -> String {
    format!("multipart/form-data; boundary={boundary}")
}

/// Builds a body from `(name, content type, data)` parts, as the official SDKs send it. The
/// boundary must not occur in any part.
pub fn build(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let size: usize = parts.iter().map(|(_, _, d)| d.len() + 128).sum();
    let mut out = Vec::with_capacity(size + 2 * boundary.len() + 8);
    for (name, content_type, data) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        out.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
        );
        if let Some(ct) = content_type {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
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

/// The next delimiter line at or after `from`: (where the part data before it ends, the index
/// just past `--boundary`). The line break before the delimiter belongs to it, not to the data.
fn next_delimiter(body: &[u8], delim: &[u8], from: usize, bare_lf: bool) -> Option<(usize, usize)> {
    if !bare_lf {
        let crlf_delim = [b"\r\n".as_slice(), delim].concat();
        let at = find(body, &crlf_delim, from)?;
        return Some((at, at + crlf_delim.len()));
    }
    let lf_delim = [b"\n".as_slice(), delim].concat();
    let at = find(body, &lf_delim, from)?;
    let has_cr = at > from && body.get(at - 1) == Some(&b'\r');
    Some((if has_cr { at - 1 } else { at }, at + lf_delim.len()))
}

/// After a delimiter ending at `at`: (is it the closing one, index of the line's next byte).
fn delimiter_tail(body: &[u8], at: usize, bare_lf: bool) -> Result<(bool, usize), Malformed> {
    let rest = body.get(at..).unwrap_or(&[]);
    if rest.starts_with(b"--") {
        return Ok((true, at + 2));
    }
    // Transport padding (RFC 2046 LWSP) before the line break.
    let pad = rest
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count();
    let rest = rest.get(pad..).unwrap_or(&[]);
    if rest.starts_with(b"\r\n") {
        Ok((false, at + pad + 2))
    } else if bare_lf && rest.starts_with(b"\n") {
        Ok((false, at + pad + 1))
    } else {
        Err(Malformed::BadDelimiterLine)
    }
}

/// A part's headers: its form-data name and its content type.
fn part_headers(
    part: &[u8],
    max_headers: usize,
) -> Result<(String, Option<&str>, usize), Malformed> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let (len, headers) = match httparse::parse_headers(part, &mut headers) {
        Ok(httparse::Status::Complete((n, h))) => (n, h),
        Ok(httparse::Status::Partial) => return Err(Malformed::HeadersNotTerminated),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed::TooManyHeaders),
        Err(_) => return Err(Malformed::BadHeaders),
    };
    let mut name = None;
    let mut seen_disposition = false;
    let mut content_type = None;
    for h in headers.iter() {
        if h.name.eq_ignore_ascii_case("content-type") {
            content_type = std::str::from_utf8(h.value).ok().map(str::trim);
        } else if h.name.eq_ignore_ascii_case("content-disposition") {
            if seen_disposition {
                return Err(Malformed::DuplicateDisposition);
            }
            seen_disposition = true;
            let value = std::str::from_utf8(h.value).map_err(|_| Malformed::DispositionNotUtf8)?;
            let (kind, rest) = value.split_once(';').unwrap_or((value, ""));
            if !kind.trim().eq_ignore_ascii_case("form-data") {
                return Err(Malformed::NotFormData);
            }
            name = params(rest)
                .map_err(|_| Malformed::BadDispositionParams)?
                .into_iter()
                .find(|(k, _)| k == "name")
                .map(|(_, v)| v);
        }
    }
    let name = name.ok_or(Malformed::MissingPartName)?;
    Ok((name, content_type, len))
}

/// Keeps a known part, refusing a second one or one over its cap.
fn keep<'a>(
    slot: &mut Option<Part<'a>>,
    part: Part<'a>,
    name: &'static str,
    limit: usize,
) -> Result<(), MultipartError> {
    if slot.is_some() {
        return Err(MultipartError::DuplicatePart(name));
    }
    if part.data.len() > limit {
        return Err(MultipartError::PartTooLarge { name, limit });
    }
    *slot = Some(part);
    Ok(())
}

/// Splits a fully buffered body into its known parts.
pub fn parse<'a>(
    body: &'a [u8],
    boundary: &str,
    limits: &Limits,
) -> Result<Form<'a>, MultipartError> {
    let delim = [b"--".as_slice(), boundary.as_bytes()].concat();
    // The opening delimiter: at the very start, or after a preamble ending in a line break.
    let mut pos = if body.starts_with(&delim) {
        delim.len()
    } else {
        next_delimiter(body, &delim, 0, limits.bare_lf)
            .ok_or(Malformed::NoOpeningDelimiter)?
            .1
    };
    let mut form = Form::default();
    let mut parts = 0usize;
    loop {
        let (close, start) = delimiter_tail(body, pos, limits.bare_lf)?;
        if close {
            if parts == 0 {
                return Err(Malformed::NoParts.into());
            }
            return Ok(form);
        }
        parts += 1;
        if parts > limits.max_parts {
            return Err(Malformed::TooManyParts.into());
        }
        let (end, next) = next_delimiter(body, &delim, start, limits.bare_lf)
            .ok_or(Malformed::NoClosingDelimiter)?;
        let part = body.get(start..end).unwrap_or(&[]);
        pos = next;

        let (name, content_type, header_len) = part_headers(part, limits.max_part_headers)?;
        let part = Part {
            data: part.get(header_len..).unwrap_or(&[]),
            content_type,
        };
        match name.as_str() {
            "sdp" => keep(&mut form.sdp, part, "sdp", limits.max_sdp_bytes)?,
            "session" => keep(&mut form.session, part, "session", limits.max_session_bytes)?,
            _ if part.data.len() > limits.max_other_part_bytes => {
                return Err(Malformed::OtherPartTooLarge.into())
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "multipart/form-data; boundary=XyZ";
    const STRICT: Limits = Limits::new(1000, 1000);
    const LENIENT: Limits = Limits {
        max_parts: 16,
        bare_lf: true,
        ..Limits::new(1000, 1000)
    };

    fn parse_ct<'a>(ct: &str, body: &'a [u8], limits: &Limits) -> Result<Form<'a>, MultipartError> {
        parse(body, &boundary(ct)?, limits)
    }

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
        let p = parse(&body, "xyz", &STRICT).unwrap();
        assert_eq!(p.require_sdp().unwrap().data, b"v=0\r\n");
        assert_eq!(p.session.unwrap().data, b"{\"model\":\"m\"}".as_slice());
    }

    #[test]
    fn round_trips_what_build_produces() {
        let body = build(
            "b0undary",
            &[
                (
                    "sdp",
                    Some("application/sdp"),
                    b"v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n",
                ),
                ("session", Some("application/json"), br#"{"model":"m"}"#),
            ],
        );
        let form = parse_ct(&content_type("b0undary"), &body, &STRICT).unwrap();
        let sdp = form.sdp.unwrap();
        assert_eq!(sdp.data, b"v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n");
        assert_eq!(sdp.content_type, Some("application/sdp"));
        assert_eq!(form.session.unwrap().data, br#"{"model":"m"}"#);
        let bare = build("B", &[("sdp", None, b"v=0")]);
        assert_eq!(
            bare,
            b"--B\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\nv=0\r\n--B--\r\n"
        );
        assert_eq!(
            parse(&bare, "B", &STRICT)
                .unwrap()
                .sdp
                .unwrap()
                .content_type,
            None
        );
    }

    /// One row per body: what the strict (filter) and lenient (echo model) parsers make of it.
    #[test]
    fn table_of_bodies() {
        type Want = Result<(&'static [u8], Option<&'static [u8]>), MultipartError>;
        let malformed = |m| Err(MultipartError::Malformed(m));
        let rows: Vec<(&str, &str, &[u8], Want, Want)> = vec![
            (
                "quoted boundary, preamble and epilogue",
                "multipart/form-data; boundary=\"XyZ\"",
                b"pre\r\n--XyZ\r\ncontent-disposition: form-data; name=\"sdp\"\r\n\r\nabc\r\n--XyZ--\r\nepi",
                Ok((b"abc", None)),
                Ok((b"abc", None)),
            ),
            (
                "bare LF line breaks",
                CT,
                b"--XyZ\nContent-Disposition: form-data; name=sdp\n\nabc\n--XyZ--\n",
                malformed(Malformed::BadDelimiterLine),
                Ok((b"abc", None)),
            ),
            (
                "empty part data",
                CT,
                b"--XyZ\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n\r\n--XyZ--",
                Ok((b"", None)),
                Ok((b"", None)),
            ),
            (
                "data containing a boundary-like line that is not the delimiter",
                CT,
                b"--XyZ\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n--Xy\r\n\r\n--XyZ--",
                Ok((b"--Xy\r\n", None)),
                Ok((b"--Xy\r\n", None)),
            ),
            (
                "an unknown part is skipped",
                CT,
                b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"session\"\r\n\r\n{}\r\n--XyZ--",
                Ok((b"", Some(b"{}"))),
                Ok((b"", Some(b"{}"))),
            ),
            (
                "no boundary parameter",
                "multipart/form-data",
                b"--XyZ--",
                malformed(Malformed::MissingBoundary),
                malformed(Malformed::MissingBoundary),
            ),
            (
                "not multipart at all",
                "application/sdp",
                b"v=0",
                malformed(Malformed::MissingBoundary),
                malformed(Malformed::MissingBoundary),
            ),
            (
                "delimiter absent",
                CT,
                b"hello",
                malformed(Malformed::NoOpeningDelimiter),
                malformed(Malformed::NoOpeningDelimiter),
            ),
            (
                "truncated: no closing delimiter",
                CT,
                b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nabc",
                malformed(Malformed::NoClosingDelimiter),
                malformed(Malformed::NoClosingDelimiter),
            ),
            (
                "no parts",
                CT,
                b"--XyZ--\r\n",
                malformed(Malformed::NoParts),
                malformed(Malformed::NoParts),
            ),
            (
                "boundary followed by garbage",
                CT,
                b"--XyZjunk\r\n\r\n",
                malformed(Malformed::BadDelimiterLine),
                malformed(Malformed::BadDelimiterLine),
            ),
            (
                "part without a name",
                CT,
                b"--XyZ\r\nContent-Type: text/plain\r\n\r\nabc\r\n--XyZ--",
                malformed(Malformed::MissingPartName),
                malformed(Malformed::MissingPartName),
            ),
            (
                "attachment disposition",
                CT,
                b"--XyZ\r\nContent-Disposition: attachment; name=\"sdp\"\r\n\r\nabc\r\n--XyZ--",
                malformed(Malformed::NotFormData),
                malformed(Malformed::NotFormData),
            ),
            (
                "two Content-Disposition headers",
                CT,
                b"--XyZ\r\nContent-Disposition: form-data; name=\"sdp\"\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nabc\r\n--XyZ--",
                malformed(Malformed::DuplicateDisposition),
                malformed(Malformed::DuplicateDisposition),
            ),
            (
                "header injection in the part name",
                CT,
                b"--XyZ\r\nContent-Disposition: form-data; name=\"sdp\r\n\r\nabc\r\n--XyZ--",
                malformed(Malformed::BadDispositionParams),
                malformed(Malformed::BadDispositionParams),
            ),
            (
                "header line without colon",
                CT,
                b"--XyZ\r\nnonsense\r\n\r\nabc\r\n--XyZ--",
                malformed(Malformed::BadHeaders),
                malformed(Malformed::BadHeaders),
            ),
            (
                "headers never terminated",
                CT,
                b"--XyZ\r\nContent-Disposition: form-data; name=\"sdp\"\r\n--XyZ--",
                malformed(Malformed::HeadersNotTerminated),
                malformed(Malformed::HeadersNotTerminated),
            ),
            (
                "two sdp parts",
                CT,
                b"--XyZ\r\nContent-Disposition: form-data; name=sdp\r\n\r\na\r\n--XyZ\r\nContent-Disposition: form-data; name=sdp\r\n\r\nb\r\n--XyZ--",
                Err(MultipartError::DuplicatePart("sdp")),
                Err(MultipartError::DuplicatePart("sdp")),
            ),
        ];
        for (what, ct, body, strict, lenient) in rows {
            for (limits, want) in [(&STRICT, strict), (&LENIENT, lenient)] {
                let got = parse_ct(ct, body, limits).map(|f| {
                    (
                        f.sdp.map_or(&b""[..], |p| p.data),
                        f.session.map(|p| p.data),
                    )
                });
                assert_eq!(got, want, "case: {what} (bare_lf {})", limits.bare_lf);
            }
        }
    }

    #[test]
    fn limits_are_enforced_with_their_codes() {
        let body = |parts: &[(&str, &[u8])]| {
            let parts: Vec<(&str, Option<&str>, &[u8])> =
                parts.iter().map(|(n, d)| (*n, None, *d)).collect();
            build("B", &parts)
        };
        let limits = Limits::new(4, 2);
        let code = |b: &[u8], l: &Limits| parse(b, "B", l).err().map(|e| e.code());
        assert_eq!(code(&body(&[("sdp", b"1234")]), &limits), None);
        assert_eq!(
            code(&body(&[("sdp", b"12345")]), &limits),
            Some("part_too_large")
        );
        let over = body(&[("sdp", b"1"), ("session", b"123")]);
        assert_eq!(
            parse(&over, "B", &limits),
            Err(MultipartError::PartTooLarge {
                name: "session",
                limit: 2
            })
        );
        let other = vec![b'x'; MAX_OTHER_PART_BYTES + 1];
        assert_eq!(
            code(&body(&[("sdp", b"1"), ("x", &other)]), &limits),
            Some("malformed_multipart")
        );
        let only_session = body(&[("session", b"{}")]);
        let form = parse(&only_session, "B", &limits).unwrap();
        assert_eq!(form.require_sdp().map_err(|e| e.code()), Err("missing_sdp"));

        let headers = format!(
            "--B\r\nContent-Disposition: form-data; name=sdp\r\n{}\r\nx\r\n--B--",
            "X-A: 1\r\n".repeat(MAX_PART_HEADERS)
        );
        assert_eq!(
            parse(headers.as_bytes(), "B", &limits),
            Err(Malformed::TooManyHeaders.into())
        );
    }

    #[test]
    fn refuses_unbounded_part_counts() {
        for limits in [STRICT, LENIENT] {
            let names: Vec<String> = (0..=limits.max_parts).map(|i| format!("p{i}")).collect();
            let parts: Vec<(&str, Option<&str>, &[u8])> = names
                .iter()
                .map(|n| (n.as_str(), Some("text/plain"), b"x".as_slice()))
                .collect();
            let body = build("B", &parts);
            assert_eq!(
                parse(&body, "B", &limits),
                Err(Malformed::TooManyParts.into())
            );
            assert!(parse(&build("B", &parts[1..]), "B", &limits).is_ok());
        }
    }
}
