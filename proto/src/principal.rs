//! The principal grammar, one for the filter and the relay.
//!
//! A principal names the caller that created a call (the call's owner): an opaque,
//! non-secret identifier the edge derives from the caller's identity, for example
//! `p_<hex of a keyed hash>`. It is never a credential: the relay stores it with the call,
//! shows it to operators, and logs it at debug level only. The relay compares it byte for
//! byte and gives it no other meaning.
//!
//! Empty means "no principal" (a caller that sends none, as every caller did before the
//! field existed). Otherwise it is 1 to [`MAX_LEN`] visible ASCII characters (`!` to `~`):
//! no spaces, no control characters, nothing outside ASCII, so it cannot break a log line or
//! hide a difference between two principals that print alike.

/// Most characters in a principal (a hex SHA-256 with a short prefix fits in half of it).
pub const MAX_LEN: usize = 128;

/// Whether `principal` is acceptable on the wire: empty (none), or 1 to [`MAX_LEN`] visible
/// ASCII characters.
pub fn is_valid(principal: &str) -> bool {
    principal.len() <= MAX_LEN && principal.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_are_short_visible_ascii_or_empty() {
        let longest = "p".repeat(MAX_LEN);
        let too_long = "p".repeat(MAX_LEN + 1);
        for (principal, valid) in [
            ("", true),
            ("p_0123456789abcdef", true),
            ("tenant-7/user:42@example.com", true),
            ("!~", true),
            (longest.as_str(), true),
            (too_long.as_str(), false),
            (" ", false),
            ("p_ab cd", false),
            ("p_abcd ", false),
            ("p_ab\tcd", false),
            ("p_ab\ncd", false),
            ("p_ab\r\ncd", false),
            ("p_ab\u{0}cd", false),
            ("p_ab\u{7f}cd", false),
            ("p_äb", false),
            ("p_ab\u{200b}cd", false),
        ] {
            assert_eq!(is_valid(principal), valid, "{principal:?}");
        }
    }
}
