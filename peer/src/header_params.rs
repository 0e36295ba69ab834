//! `; key=value; key="quoted value"` parameter lists of MIME headers (`Content-Type`,
//! `Content-Disposition`), RFC 2045 §5.1 with RFC 7230 quoted strings.

use std::fmt;

/// Why a parameter list was refused. `reason()` is the text clients may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamsError {
    MissingEquals,
    InvalidName,
    UnterminatedQuote,
    GarbageAfterQuote,
    Duplicate,
}

impl ParamsError {
    pub fn reason(self) -> &'static str {
        match self {
            ParamsError::MissingEquals => "parameter without '='",
            ParamsError::InvalidName => "invalid parameter name",
            ParamsError::UnterminatedQuote => "unterminated quoted parameter",
            ParamsError::GarbageAfterQuote => "garbage after quoted parameter",
            ParamsError::Duplicate => "duplicate parameter",
        }
    }
}

impl fmt::Display for ParamsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ParamsError {}

/// An RFC 7230 token: what a parameter name must be.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reads a quoted string after its opening quote: the unescaped value and the rest after the
/// closing quote.
fn quoted(s: &str) -> Result<(String, &str), ParamsError> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, escaped)) => value.push(escaped),
                None => return Err(ParamsError::UnterminatedQuote),
            },
            '"' => return Ok((value, s.get(i + 1..).unwrap_or(""))),
            c => value.push(c),
        }
    }
    Err(ParamsError::UnterminatedQuote)
}

/// Splits the parameters after a MIME type (the text from its first `;`). Names come back
/// lowercase; a name given twice is refused (which of two boundaries would count?).
pub fn params(s: &str) -> Result<Vec<(String, String)>, ParamsError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = s.trim_start();
    loop {
        rest = rest.trim_start_matches([';', ' ', '\t']);
        if rest.is_empty() {
            return Ok(out);
        }
        let (name, after) = rest.split_once('=').ok_or(ParamsError::MissingEquals)?;
        let name = name.trim().to_ascii_lowercase();
        if !is_token(&name) {
            return Err(ParamsError::InvalidName);
        }
        let value = match after.strip_prefix('"') {
            Some(q) => {
                let (value, tail) = quoted(q)?;
                rest = tail.trim_start();
                if !(rest.is_empty() || rest.starts_with(';')) {
                    return Err(ParamsError::GarbageAfterQuote);
                }
                value
            }
            None => {
                let (value, tail) = after.split_once(';').unwrap_or((after, ""));
                rest = tail;
                value.trim().to_string()
            }
        };
        if out.iter().any(|(n, _)| *n == name) {
            return Err(ParamsError::Duplicate);
        }
        out.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_lists_table() {
        type Parsed = Result<Vec<(String, String)>, ParamsError>;
        let ok = |pairs: &[(&str, &str)]| -> Parsed {
            Ok(pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect())
        };
        let rows: Vec<(&str, Parsed)> = vec![
            ("", ok(&[])),
            ("; boundary=abc", ok(&[("boundary", "abc")])),
            (
                r#"; Charset=utf-8; boundary="a b;c\"d""#,
                ok(&[("charset", "utf-8"), ("boundary", "a b;c\"d")]),
            ),
            (r#"; name="sdp"  "#, ok(&[("name", "sdp")])),
            ("; boundary", Err(ParamsError::MissingEquals)),
            ("; b@d=x", Err(ParamsError::InvalidName)),
            (r#"; name="sdp"#, Err(ParamsError::UnterminatedQuote)),
            (r#"; name="sdp\"#, Err(ParamsError::UnterminatedQuote)),
            (r#"; name="sdp"x"#, Err(ParamsError::GarbageAfterQuote)),
            ("; a=1; A=2", Err(ParamsError::Duplicate)),
        ];
        for (input, want) in rows {
            assert_eq!(params(input), want, "{input:?}");
        }
    }
}
