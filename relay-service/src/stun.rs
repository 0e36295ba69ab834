//! Just enough STUN: reading the ufrag to demultiplex client legs on one shared UDP
//! port, checking a binding request's MESSAGE-INTEGRITY before that port learns an address
//! from it, and a binding request for the optional server-reflexive candidate of the
//! upstream leg (off unless `--upstream-stun-server` is given).
//!
//! The first datagram from a new client address is an ICE binding request whose
//! USERNAME is "<our ufrag>:<their ufrag>" (RFC 8445 §7.2.2). We read our ufrag from
//! it to find the call, and hand the request to the call whatever it carries: str0m
//! verifies the message integrity itself, so a forged request can at worst make us hand a
//! datagram to a call that rejects it. Routing *later* datagrams by the request's source
//! address is another matter: the port does that only for a request [`signed_with`] the
//! call's password, since the ufrag alone travels in the clear.

use std::sync::OnceLock;
use str0m::crypto::Sha1HmacProvider;
use str0m::ice::StunMessage;

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const HEADER_LEN: usize = 20;

/// A STUN binding request (RFC 5389) with no attributes, for server-reflexive
/// address discovery on the upstream leg.
pub fn binding_request(transaction_id: [u8; 12]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN);
    m.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(&transaction_id);
    m
}

/// Finds attribute `kind` in a STUN message body (attributes padded to 4 bytes).
fn find_attribute(body: &[u8], kind: u16) -> Option<&[u8]> {
    let mut at = 0;
    while at + 4 <= body.len() {
        let this = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let value = body.get(at + 4..at + 4 + len)?;
        if this == kind {
            return Some(value);
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// The XOR key of XOR-MAPPED-ADDRESS (RFC 5389 §15.2): the magic cookie, then (for
/// IPv6) the transaction id. XOR is its own inverse, so it encodes and decodes.
fn xor_address(bytes: &mut [u8], transaction_id: &[u8; 12]) {
    let key = MAGIC_COOKIE.iter().chain(transaction_id.iter());
    for (b, k) in bytes.iter_mut().zip(key) {
        *b ^= k;
    }
}

/// The XOR-MAPPED-ADDRESS of a binding success response to `transaction_id`.
pub fn mapped_address(datagram: &[u8], transaction_id: &[u8; 12]) -> Option<std::net::SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    if datagram.len() < HEADER_LEN
        || u16::from_be_bytes([datagram[0], datagram[1]]) != BINDING_SUCCESS
        || datagram[4..8] != MAGIC_COOKIE
        || &datagram[8..20] != transaction_id
    {
        return None;
    }
    let body_len = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    let body = datagram.get(HEADER_LEN..HEADER_LEN + body_len)?;
    let value = find_attribute(body, ATTR_XOR_MAPPED_ADDRESS)?;
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ 0x2112;
    let ip = match value.get(1)? {
        0x01 => {
            let mut o: [u8; 4] = value.get(4..8)?.try_into().ok()?;
            xor_address(&mut o, transaction_id);
            IpAddr::V4(Ipv4Addr::from(o))
        }
        0x02 => {
            let mut o: [u8; 16] = value.get(4..20)?.try_into().ok()?;
            xor_address(&mut o, transaction_id);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A binding success response carrying `mapped` (what a STUN server sends back);
/// used by tests and by anyone running a loopback STUN responder.
pub fn binding_success(transaction_id: &[u8; 12], mapped: std::net::SocketAddr) -> Vec<u8> {
    let (family, mut ip) = match mapped.ip() {
        std::net::IpAddr::V4(ip) => (0x01, ip.octets().to_vec()),
        std::net::IpAddr::V6(ip) => (0x02, ip.octets().to_vec()),
    };
    xor_address(&mut ip, transaction_id);
    let mut value = vec![0u8, family];
    value.extend_from_slice(&(mapped.port() ^ 0x2112).to_be_bytes());
    value.extend_from_slice(&ip);
    let mut m = Vec::new();
    m.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    m.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(transaction_id);
    m.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    m.extend_from_slice(&(value.len() as u16).to_be_bytes());
    m.extend_from_slice(&value);
    m
}

/// Asks `server` for this socket's server-reflexive address, retransmitting every
/// 500 ms until `timeout`. None on timeout: the call then goes on with its host
/// candidate only.
pub async fn discover_reflexive(
    socket: &tokio::net::UdpSocket,
    server: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> Option<std::net::SocketAddr> {
    use rand::RngCore;
    let mut txid = [0u8; 12];
    rand::rng().fill_bytes(&mut txid);
    let request = binding_request(txid);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 512];
    while tokio::time::Instant::now() < deadline {
        let _ = socket.send_to(&request, server).await;
        let resend =
            (tokio::time::Instant::now() + std::time::Duration::from_millis(500)).min(deadline);
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(resend, socket.recv_from(&mut buf)).await
        {
            if from == server {
                if let Some(mapped) = mapped_address(&buf[..n], &txid) {
                    return Some(mapped);
                }
            }
        }
    }
    None
}

/// Our (local) ufrag from a STUN binding request, if `datagram` is one.
pub fn local_ufrag(datagram: &[u8]) -> Option<&str> {
    if datagram.len() < HEADER_LEN || datagram[0] & 0xC0 != 0 || datagram[4..8] != MAGIC_COOKIE {
        return None;
    }
    let body_len = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    let body = datagram.get(HEADER_LEN..HEADER_LEN + body_len)?;
    let username = std::str::from_utf8(find_attribute(body, ATTR_USERNAME)?).ok()?;
    username.split(':').next().filter(|u| !u.is_empty())
}

/// Whether `datagram` is an ICE binding request whose MESSAGE-INTEGRITY verifies with `pass`:
/// short-term credentials, HMAC-SHA1 keyed by the password (RFC 8489 §9.1, §14.5). Parsed and
/// checked by str0m's own STUN code with its crypto provider's HMAC, as str0m checks the
/// request when the call gets it.
pub fn signed_with(datagram: &[u8], pass: &str) -> bool {
    static HMAC: OnceLock<&'static dyn Sha1HmacProvider> = OnceLock::new();
    let hmac = *HMAC.get_or_init(|| str0m::crypto::from_feature_flags().sha1_hmac_provider);
    StunMessage::parse(datagram).is_ok_and(|m| {
        m.is_binding_request() && m.verify(pass.as_bytes(), |key, data| hmac.sha1_hmac(key, data))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with_username(username: &[u8], extra_before: bool) -> Vec<u8> {
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
            local_ufrag(&request_with_username(b"abcd:efgh", false)),
            Some("abcd")
        );
        assert_eq!(
            local_ufrag(&request_with_username(b"abc:efgh", true)),
            Some("abc")
        );
    }

    /// A binding request as a browser sent it (the vector of str0m's own STUN tests): its
    /// HMAC was computed by the browser, not by the code under test.
    #[test]
    fn a_browsers_binding_request_is_signed_with_its_password_only() {
        const REQUEST: &[u8] = &[
            0x00, 0x01, 0x00, 0x50, 0x21, 0x12, 0xa4, 0x42, 0x6a, 0x75, 0x63, 0x31, 0x35, 0x75,
            0x78, 0x55, 0x6e, 0x67, 0x47, 0x63, 0x00, 0x06, 0x00, 0x09, 0x70, 0x39, 0x4b, 0x41,
            0x3a, 0x53, 0x51, 0x41, 0x74, 0x00, 0x00, 0x00, 0xc0, 0x57, 0x00, 0x04, 0x00, 0x01,
            0x00, 0x0a, 0x80, 0x2a, 0x00, 0x08, 0x6e, 0xee, 0xc6, 0xe9, 0x7d, 0x18, 0x39, 0x5c,
            0x00, 0x25, 0x00, 0x00, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x7f, 0x1e, 0xff, 0x00, 0x08,
            0x00, 0x14, 0x5d, 0x04, 0x25, 0xa0, 0x20, 0x7a, 0xb1, 0xe0, 0x54, 0x10, 0x22, 0x99,
            0xaa, 0xf9, 0x83, 0x9c, 0xa0, 0x76, 0xc6, 0xd5, 0x80, 0x28, 0x00, 0x04, 0x36, 0x0e,
            0x21, 0x9f,
        ];
        const PASS: &str = "xJcE9AQAR7kczUDVOXRUCl";
        assert_eq!(local_ufrag(REQUEST), Some("p9KA"));
        assert!(signed_with(REQUEST, PASS));
        assert!(!signed_with(REQUEST, "xJcE9AQAR7kczUDVOXRUCm"));
        assert!(!signed_with(REQUEST, ""));
        // One bit changed anywhere before the HMAC (here: the priority) breaks it.
        let mut tampered = REQUEST.to_vec();
        tampered[67] ^= 1;
        assert!(!signed_with(&tampered, PASS));
        // No MESSAGE-INTEGRITY, or not STUN at all: never signed.
        assert!(!signed_with(
            &request_with_username(b"p9KA:SQAt", true),
            PASS
        ));
        assert!(!signed_with(&[0x80; 40], PASS));
        assert!(!signed_with(&[], PASS));
    }

    #[test]
    fn xor_mapped_address_round_trips_for_v4_and_v6() {
        let txid = [7u8; 12];
        for mapped in ["203.0.113.9:40123", "[2001:db8::17]:3478"] {
            let mapped = mapped.parse().unwrap();
            assert_eq!(
                mapped_address(&binding_success(&txid, mapped), &txid),
                Some(mapped)
            );
            assert_eq!(
                mapped_address(&binding_success(&txid, mapped), &[8u8; 12]),
                None,
                "other transaction"
            );
        }
        assert_eq!(
            mapped_address(&super::binding_request(txid), &txid),
            None,
            "a request is not a response"
        );
    }

    #[tokio::test]
    async fn discovers_the_reflexive_address_from_a_loopback_responder() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let reflexive: std::net::SocketAddr = "198.51.100.4:50000".parse().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            // Ignore the first request to prove retransmission works.
            let _ = server.recv_from(&mut buf).await;
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let txid: [u8; 12] = buf[8..20].try_into().unwrap();
            assert_eq!(n, HEADER_LEN);
            server
                .send_to(&binding_success(&txid, reflexive), from)
                .await
                .unwrap();
        });
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let got = discover_reflexive(&sock, server_addr, std::time::Duration::from_secs(3)).await;
        assert_eq!(got, Some(reflexive));
        // Nobody answers: None after the timeout, not a hang.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let started = std::time::Instant::now();
        let none = discover_reflexive(
            &sock,
            silent.local_addr().unwrap(),
            std::time::Duration::from_millis(300),
        )
        .await;
        assert_eq!(none, None);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn rejects_what_is_not_a_well_formed_binding_request() {
        assert_eq!(local_ufrag(&[]), None);
        assert_eq!(local_ufrag(&[0x80; 40]), None); // RTP-looking
        let mut m = request_with_username(b"abcd:efgh", false);
        m[4] = 0; // bad cookie
        assert_eq!(local_ufrag(&m), None);
        let mut m = request_with_username(b"abcd:efgh", false);
        m[3] = 200; // length past the end
        assert_eq!(local_ufrag(&m), None);
        assert_eq!(local_ufrag(&request_with_username(b":efgh", false)), None);
        assert_eq!(
            local_ufrag(&request_with_username(&[0xff, 0xfe], false)),
            None
        );
    }
}
