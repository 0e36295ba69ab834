//! The project's one HTTP/1.1 client for loopback tooling: readiness probes, metrics scrapes
//! and the end-to-end tests' requests through Envoy. It writes the request line and headers
//! byte for byte as given (odd paths, odd headers and bodies reach Envoy unchanged, which a
//! client library would normalise or refuse), one request per connection
//! (`Connection: close`). [`read_request`] is the server half, for test stand-ins of a
//! provider.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// A response: status, headers (names lower-cased, in order) and the de-chunked body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("the body is not JSON: {}", self.text()))
    }
}

/// A request as a server read it: the head (request line and headers) and the body.
#[derive(Debug, Clone)]
pub struct Request {
    pub head: String,
    pub body: Vec<u8>,
}

impl Request {
    /// `METHOD target HTTP/1.1`.
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// The first header called `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        header_in(&self.head, name).map(str::to_string)
    }
}

fn header_in<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends `method path` with `headers` and `body` (plus `host`, `connection: close` and a
/// `content-length` when there is a body or the method is POST) and reads the response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    request_within(READ_TIMEOUT, addr, method, path, headers, body)
}

/// [`request`] with another limit on each read (slow servers such as a browser driver).
pub fn request_within(
    read_timeout: Duration,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(read_timeout))?;
    s.set_write_timeout(Some(read_timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .with_context(|| format!("sending {method} {path} to {addr}"))?;
    // Envoy may answer before it has read the whole body and then close: a failed body write
    // is not the outcome, the response is.
    let _ = s.write_all(body);
    read_response(&mut s).with_context(|| format!("{method} {path} to {addr}"))
}

pub fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    request(addr, "GET", path, &[], &[])
}

/// Reads a response: the head, then the body by `content-length` (some servers, chromedriver
/// among them, keep the connection open despite `connection: close`), else to the end of the
/// stream. A read error after the head ends the body (a server that answered early may reset
/// the connection).
fn read_response(s: &mut impl Read) -> Result<Response> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = find(&raw, b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk) {
            Ok(0) => bail!(
                "no HTTP response head in {:?}",
                String::from_utf8_lossy(&raw)
            ),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) => bail!(
                "no HTTP response head ({e}) in {:?}",
                String::from_utf8_lossy(&raw)
            ),
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let length: Option<usize> = header("content-length").and_then(|v| v.parse().ok());
    let mut body = raw.split_off(head_end + 4);
    let length = length.filter(|_| !chunked);
    while length.is_none_or(|len| body.len() < len) {
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => body.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    if chunked {
        body = dechunk(&body);
    }
    if let Some(len) = length {
        body.truncate(len);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(b, b"\r\n") {
        let size = std::str::from_utf8(&b[..i])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(b.get(i + 2..i + 2 + size).unwrap_or(&[]));
        b = b.get(i + 4 + size..).unwrap_or(&[]);
    }
    out
}

/// Reads one request (head, then a `content-length` body); `None` if the peer closed first.
pub fn read_request(s: &mut impl Read) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            let want = header_in(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0usize);
            while buf.len() < i + 4 + want {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[i + 4..].to_vec();
            return Ok(Some(Request { head, body }));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_request_goes_out_byte_exact_and_a_chunked_answer_is_joined() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req = read_request(&mut s).unwrap().unwrap();
            s.write_all(
                b"HTTP/1.1 201 Created\r\nX-Thing: a\r\ntransfer-encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            )
            .unwrap();
            req
        });
        let body = b"v=0\r\n\xff\xfe";
        let r = request(
            addr,
            "POST",
            "/a%2Fb?model=a%00b",
            &[("X-Odd", " spaced ")],
            body,
        )
        .unwrap();
        let seen = server.join().unwrap();
        assert_eq!(seen.request_line(), "POST /a%2Fb?model=a%00b HTTP/1.1");
        assert!(
            seen.head.contains("\r\nX-Odd:  spaced \r\n"),
            "{}",
            seen.head
        );
        assert_eq!(seen.header("content-length").as_deref(), Some("7"));
        assert_eq!(seen.body, body);
        assert_eq!(r.status, 201);
        assert_eq!(r.header("x-thing"), Some("a"));
        assert_eq!(r.text(), "abcde");
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            b"hello world"
        );
    }

    #[test]
    fn no_answer_is_an_error_naming_the_request() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || drop(listener.accept().unwrap()));
        let err = get(addr, "/ready").unwrap_err();
        server.join().unwrap();
        assert!(format!("{err:#}").contains("GET /ready"), "{err:#}");
    }
}
