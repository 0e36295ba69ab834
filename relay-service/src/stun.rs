//! Just enough STUN parsing to demultiplex client legs on one shared UDP port.
//!
//! The first datagram from a new client address is an ICE binding request whose
//! USERNAME is "<our ufrag>:<their ufrag>" (RFC 8445 §7.2.2). We read our ufrag from
//! it to find the call; str0m then verifies the message integrity itself, so a forged
//! request can at worst make us hand a datagram to a call that rejects it.

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const ATTR_USERNAME: u16 = 0x0006;
const HEADER_LEN: usize = 20;

/// Our (local) ufrag from a STUN binding request, if `datagram` is one.
pub fn local_ufrag(datagram: &[u8]) -> Option<&str> {
    if datagram.len() < HEADER_LEN || datagram[0] & 0xC0 != 0 || datagram[4..8] != MAGIC_COOKIE {
        return None;
    }
    let body_len = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    let body = datagram.get(HEADER_LEN..HEADER_LEN + body_len)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let value = body.get(at + 4..at + 4 + len)?;
        if kind == ATTR_USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next().filter(|u| !u.is_empty());
        }
        // Attributes are padded to 4 bytes.
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &[u8], extra_before: bool) -> Vec<u8> {
        let mut attrs = Vec::new();
        if extra_before {
            // PRIORITY attribute (4 bytes) first, like browsers often send.
            attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        }
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[9; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn reads_our_ufrag_from_a_binding_request() {
        assert_eq!(
            local_ufrag(&binding_request(b"abcd:efgh", false)),
            Some("abcd")
        );
        assert_eq!(
            local_ufrag(&binding_request(b"abc:efgh", true)),
            Some("abc")
        );
    }

    #[test]
    fn rejects_what_is_not_a_well_formed_binding_request() {
        assert_eq!(local_ufrag(&[]), None);
        assert_eq!(local_ufrag(&[0x80; 40]), None); // RTP-looking
        let mut m = binding_request(b"abcd:efgh", false);
        m[4] = 0; // bad cookie
        assert_eq!(local_ufrag(&m), None);
        let mut m = binding_request(b"abcd:efgh", false);
        m[3] = 200; // length past the end
        assert_eq!(local_ufrag(&m), None);
        assert_eq!(local_ufrag(&binding_request(b":efgh", false)), None);
        assert_eq!(local_ufrag(&binding_request(&[0xff, 0xfe], false)), None);
    }
}
