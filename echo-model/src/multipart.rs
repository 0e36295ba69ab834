//! A small, strict `multipart/form-data` parser (RFC 7578) for the two-part bodies the
//! Realtime API accepts (`sdp` and `session`).
//!
//! Written here rather than pulling `multer`: the bodies are a few KiB, fully buffered, and we
//! only need names, optional content types and the bytes of each part.

/// One part of a multipart body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// `name` from `Content-Disposition: form-data; name="..."`.
    pub name: String,
    /// The part's `Content-Type`, if it had one.
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultipartError {
    MissingBoundary,
    NoOpeningDelimiter,
    NoClosingDelimiter,
    BadPartHeaders,
    MissingPartName,
    TooManyParts,
}

impl std::fmt::Display for MultipartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            MultipartError::MissingBoundary => "no boundary parameter in Content-Type",
            MultipartError::NoOpeningDelimiter => "body does not contain the boundary delimiter",
            MultipartError::NoClosingDelimiter => "body has no closing boundary delimiter",
            MultipartError::BadPartHeaders => "a part has malformed headers",
            MultipartError::MissingPartName => "a part has no Content-Disposition name",
            MultipartError::TooManyParts => "too many parts",
        };
        f.write_str(s)
    }
}

impl std::error::Error for MultipartError {}

/// More parts than this is not a Realtime request; refuse rather than parse without bound.
pub const MAX_PARTS: usize = 16;

/// The `boundary` parameter of a `multipart/form-data` content type, unquoted.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    for p in params {
        let (k, v) = p.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            // RFC 2046: 1 to 70 characters.
            if v.is_empty() || v.len() > 70 {
                return None;
            }
            return Some(v.to_string());
        }
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parse a complete body given its `Content-Type` header value.
pub fn parse(content_type: &str, body: &[u8]) -> Result<Vec<Part>, MultipartError> {
    let boundary = boundary(content_type).ok_or(MultipartError::MissingBoundary)?;
    let delim = format!("--{boundary}").into_bytes();

    // Skip any preamble up to the first delimiter.
    let start = find(body, &delim).ok_or(MultipartError::NoOpeningDelimiter)?;
    let mut rest = &body[start + delim.len()..];
    let mut parts = Vec::new();

    loop {
        if rest.starts_with(b"--") {
            // Closing delimiter; anything after is epilogue.
            return Ok(parts);
        }
        // Transport padding, then the line break that ends the delimiter line.
        while let Some((b' ' | b'\t', tail)) = rest.split_first() {
            rest = tail;
        }
        rest = rest
            .strip_prefix(b"\r\n")
            .or_else(|| rest.strip_prefix(b"\n"))
            .ok_or(MultipartError::NoClosingDelimiter)?;

        if parts.len() == MAX_PARTS {
            return Err(MultipartError::TooManyParts);
        }

        // Headers end at an empty line (CRLF CRLF, tolerating bare LF).
        let (header_block, after_headers) = if let Some(i) = find(rest, b"\r\n\r\n") {
            (&rest[..i], &rest[i + 4..])
        } else if let Some(i) = find(rest, b"\n\n") {
            (&rest[..i], &rest[i + 2..])
        } else if let Some(tail) = rest.strip_prefix(b"\r\n") {
            // A part with no headers at all.
            (&rest[..0], tail)
        } else {
            return Err(MultipartError::BadPartHeaders);
        };
        let headers =
            std::str::from_utf8(header_block).map_err(|_| MultipartError::BadPartHeaders)?;
        let (name, content_type) = parse_part_headers(headers)?;

        // The body runs to the next delimiter, which is preceded by a line break that belongs
        // to the delimiter, not to the data.
        let mut crlf_delim = b"\r\n".to_vec();
        crlf_delim.extend_from_slice(&delim);
        let (data, next) = if let Some(i) = find(after_headers, &crlf_delim) {
            (&after_headers[..i], &after_headers[i + crlf_delim.len()..])
        } else {
            let mut lf_delim = b"\n".to_vec();
            lf_delim.extend_from_slice(&delim);
            let i = find(after_headers, &lf_delim).ok_or(MultipartError::NoClosingDelimiter)?;
            (&after_headers[..i], &after_headers[i + lf_delim.len()..])
        };
        parts.push(Part {
            name,
            content_type,
            data: data.to_vec(),
        });
        rest = next;
    }
}

fn parse_part_headers(headers: &str) -> Result<(String, Option<String>), MultipartError> {
    let mut name = None;
    let mut content_type = None;
    for line in headers.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once(':').ok_or(MultipartError::BadPartHeaders)?;
        let k = k.trim();
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-disposition") {
            name = disposition_name(v);
        } else if k.eq_ignore_ascii_case("content-type") {
            content_type = Some(v.to_string());
        }
    }
    let name = name.ok_or(MultipartError::MissingPartName)?;
    Ok((name, content_type))
}

fn disposition_name(v: &str) -> Option<String> {
    let mut params = v.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("form-data") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("name")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Build a `multipart/form-data` body from `(name, content_type, data)` parts. Returns the
/// `Content-Type` header value and the body. Used by tests and benchmarks to send the same
/// form the official SDKs send.
pub fn build(boundary: &str, parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (name, ct, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        body.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
        );
        body.extend_from_slice(format!("Content-Type: {ct}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "multipart/form-data; boundary=XyZ";

    #[test]
    fn round_trips_what_build_produces() {
        let (ct, body) = build(
            "b0undary",
            &[
                (
                    "sdp",
                    "application/sdp",
                    b"v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n",
                ),
                ("session", "application/json", br#"{"model":"m"}"#),
            ],
        );
        let parts = parse(&ct, &body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "sdp");
        assert_eq!(parts[0].data, b"v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n");
        assert_eq!(parts[0].content_type.as_deref(), Some("application/sdp"));
        assert_eq!(parts[1].name, "session");
        assert_eq!(parts[1].data, br#"{"model":"m"}"#);
    }

    #[test]
    fn table_of_bodies() {
        struct Row {
            what: &'static str,
            ct: &'static str,
            body: &'static [u8],
            want: Result<Vec<(&'static str, &'static [u8])>, MultipartError>,
        }
        let rows = [
            Row {
                what: "quoted boundary, preamble and epilogue",
                ct: "multipart/form-data; boundary=\"XyZ\"",
                body: b"pre\r\n--XyZ\r\ncontent-disposition: form-data; name=\"sdp\"\r\n\r\nabc\r\n--XyZ--\r\nepi",
                want: Ok(vec![("sdp", b"abc")]),
            },
            Row {
                what: "bare LF line breaks",
                ct: CT,
                body: b"--XyZ\nContent-Disposition: form-data; name=sdp\n\nabc\n--XyZ--\n",
                want: Ok(vec![("sdp", b"abc")]),
            },
            Row {
                what: "empty part data",
                ct: CT,
                body: b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\r\n--XyZ--",
                want: Ok(vec![("a", b"")]),
            },
            Row {
                what: "data containing a boundary-like line that is not the delimiter",
                ct: CT,
                body: b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n--Xy\r\n\r\n--XyZ--",
                want: Ok(vec![("a", b"--Xy\r\n")]),
            },
            Row {
                what: "no boundary parameter",
                ct: "multipart/form-data",
                body: b"--XyZ--",
                want: Err(MultipartError::MissingBoundary),
            },
            Row {
                what: "not multipart at all",
                ct: "application/sdp",
                body: b"v=0",
                want: Err(MultipartError::MissingBoundary),
            },
            Row {
                what: "delimiter absent",
                ct: CT,
                body: b"hello",
                want: Err(MultipartError::NoOpeningDelimiter),
            },
            Row {
                what: "truncated: no closing delimiter",
                ct: CT,
                body: b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nabc",
                want: Err(MultipartError::NoClosingDelimiter),
            },
            Row {
                what: "part without a name",
                ct: CT,
                body: b"--XyZ\r\nContent-Type: text/plain\r\n\r\nabc\r\n--XyZ--",
                want: Err(MultipartError::MissingPartName),
            },
            Row {
                what: "header line without colon",
                ct: CT,
                body: b"--XyZ\r\nnonsense\r\n\r\nabc\r\n--XyZ--",
                want: Err(MultipartError::BadPartHeaders),
            },
        ];
        for row in rows {
            let got = parse(row.ct, row.body).map(|parts| {
                parts
                    .into_iter()
                    .map(|p| (p.name, p.data))
                    .collect::<Vec<_>>()
            });
            let want = row.want.map(|v| {
                v.into_iter()
                    .map(|(n, d)| (n.to_string(), d.to_vec()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, want, "case: {}", row.what);
        }
    }

    #[test]
    fn refuses_unbounded_part_counts() {
        let many: Vec<(String, Vec<u8>)> = (0..=MAX_PARTS)
            .map(|i| (format!("p{i}"), b"x".to_vec()))
            .collect();
        let refs: Vec<(&str, &str, &[u8])> = many
            .iter()
            .map(|(n, d)| (n.as_str(), "text/plain", d.as_slice()))
            .collect();
        let (ct, body) = build("B", &refs);
        assert_eq!(parse(&ct, &body), Err(MultipartError::TooManyParts));
    }
}
