//! `multipart/form-data` bodies (RFC 7578 over RFC 2046): part `sdp` required, part `session`
//! optional; duplicates, oversized parts and structural errors refused.
//!
//! The parser is `rtc_peer::multipart`, shared with the echo model and the relay's builder;
//! this module gives it the filter's limits (strict CRLF, [`MAX_PARTS`] parts) and turns its
//! errors into `FilterError`s with the same client codes.

use crate::error::FilterError;
use rtc_peer::multipart::{self, Limits, MultipartError};

pub use rtc_peer::multipart::{MAX_OTHER_PART_BYTES, MAX_PARTS, MAX_PART_HEADERS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormParts<'a> {
    pub sdp: &'a [u8],
    pub session: Option<&'a [u8]>,
}

impl From<MultipartError> for FilterError {
    fn from(e: MultipartError) -> Self {
        match e {
            MultipartError::MissingSdp => FilterError::MissingSdp,
            e => FilterError::Multipart(e),
        }
    }
}

/// Splits a multipart body into its parts.
pub fn parse<'a>(
    body: &'a [u8],
    boundary: &str,
    max_sdp: usize,
    max_session: usize,
) -> Result<FormParts<'a>, FilterError> {
    let form = multipart::parse(body, boundary, &Limits::new(max_sdp, max_session))?;
    Ok(FormParts {
        sdp: form.require_sdp()?.data,
        session: form.session.map(|p| p.data),
    })
}

/// Builds a multipart body (tests and tools).
pub fn build(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    multipart::build(boundary, parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc_peer::multipart::Malformed;

    #[test]
    fn parser_errors_keep_their_client_codes() {
        let rows = [
            MultipartError::Malformed(Malformed::NoOpeningDelimiter),
            MultipartError::DuplicatePart("sdp"),
            MultipartError::PartTooLarge {
                name: "session",
                limit: 3,
            },
            MultipartError::MissingSdp,
        ];
        for e in rows {
            let f = FilterError::from(e);
            assert_eq!(f.code(), e.code(), "{e}");
            assert_eq!(f.to_string(), e.to_string());
        }
    }
}
