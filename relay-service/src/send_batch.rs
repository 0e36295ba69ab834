//! `sendmmsg` for the client-leg port: a shard turn's datagrams for its clients leave in one
//! system call, not one `sendmsg` each. Each datagram keeps its own destination and, on a
//! port bound on the unspecified address, its own source address (`IP_PKTINFO` /
//! `IPV6_PKTINFO`), exactly as `quinn-udp` sends a single one.
//!
//! GSO does not apply here: it coalesces datagrams to one destination, and a turn's client
//! datagrams go to as many clients as there are calls.

use socket2::SockAddr;
use std::io::{self, ErrorKind};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

/// Datagrams per `sendmmsg` at most. A turn at 300 calls sends a few dozen.
pub const SEND_BATCH: usize = 64;

/// Room for one pktinfo control message: `CMSG_SPACE(sizeof(struct in6_pktinfo))` is 40 on
/// 64-bit Linux, the IPv4 one smaller.
const CONTROL_LEN: usize = 64;

/// One datagram's control buffer, aligned as `cmsghdr` must be.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; CONTROL_LEN]);

/// What one datagram to send is: its bytes, its destination and the source address to send
/// it from (`None`: the socket's own).
pub type Parts<'a> = (&'a [u8], SocketAddr, Option<IpAddr>);

/// The headers of one `sendmmsg`, kept between calls so that a batch allocates nothing.
pub struct BatchSender {
    names: Vec<SockAddr>,
    controls: Vec<Control>,
    iovs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovs` and `headers` are written afresh by every `send`, point
// only into its arguments and `self`, and are read only by the `sendmmsg` inside it; between
// calls they are dead values that nothing reads.
unsafe impl Send for BatchSender {}

impl Default for BatchSender {
    fn default() -> Self {
        Self {
            names: Vec::with_capacity(SEND_BATCH),
            controls: vec![Control([0; CONTROL_LEN]); SEND_BATCH],
            iovs: Vec::with_capacity(SEND_BATCH),
            headers: Vec::with_capacity(SEND_BATCH),
        }
    }
}

impl BatchSender {
    /// Sends the first of `items` (at most [`SEND_BATCH`]) in one `sendmmsg` on `fd`: `Ok(n)`
    /// when the first `n` left (the next, if any, did not: send it again to learn why), an
    /// error when the first did not (`WouldBlock`: the socket's buffer is full).
    pub fn send<T>(
        &mut self,
        fd: RawFd,
        items: &[T],
        parts: impl Fn(&T) -> Parts<'_>,
    ) -> io::Result<usize> {
        let n = items.len().min(SEND_BATCH);
        if n == 0 {
            return Ok(0);
        }
        self.names.clear();
        self.iovs.clear();
        self.headers.clear();
        for (item, control) in items[..n].iter().zip(&mut self.controls) {
            let (data, to, from) = parts(item);
            self.names.push(SockAddr::from(to));
            self.iovs.push(libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            });
            // SAFETY: an all-zero msghdr is a valid empty one.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            if let Some(from) = from {
                encode_source(control, &mut header, from);
            }
            self.headers.push(libc::mmsghdr {
                msg_hdr: header,
                msg_len: 0,
            });
        }
        // The names and buffers are all in place (the vectors no longer move): point at them.
        for ((header, name), iov) in self.headers.iter_mut().zip(&self.names).zip(&mut self.iovs) {
            header.msg_hdr.msg_name = name.as_ptr() as *mut libc::c_void;
            header.msg_hdr.msg_namelen = name.len();
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
        }
        loop {
            // SAFETY: `headers` holds `n` initialised headers whose names, buffers and control
            // messages live in `self` and `items` for the length of the call.
            let sent = unsafe { libc::sendmmsg(fd, self.headers.as_mut_ptr(), n as u32, 0) };
            if sent >= 0 {
                return Ok(sent as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends `items` from the front until all are gone or the socket's buffer is full, in
    /// batches. A datagram the kernel refuses for its own reason (an unreachable or invalid
    /// destination) is dropped, logged, and the rest still go. Returns how many left the
    /// front: the first that many were sent or dropped, the rest wait for room.
    pub fn send_until_full<T>(
        &mut self,
        fd: RawFd,
        items: &[T],
        parts: impl Fn(&T) -> Parts<'_>,
    ) -> usize {
        let mut done = 0;
        while done < items.len() {
            match self.send(fd, &items[done..], &parts) {
                Ok(0) => break,
                Ok(sent) => done += sent,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    let (_, to, _) = parts(&items[done]);
                    tracing::debug!(error = %e, %to, "client-leg send failed, datagram dropped");
                    done += 1;
                }
            }
        }
        done
    }
}

/// Names the source address of one datagram in its control message, as `quinn-udp` does
/// (`IP_PKTINFO` with `ipi_spec_dst` for IPv4, `IPV6_PKTINFO` for IPv6).
fn encode_source(control: &mut Control, header: &mut libc::msghdr, from: IpAddr) {
    header.msg_control = control.0.as_mut_ptr() as *mut libc::c_void;
    header.msg_controllen = CONTROL_LEN as _;
    // SAFETY: `header` points at `control`, which has room for one pktinfo message of either
    // family (CONTROL_LEN ≥ CMSG_SPACE of the larger), so the first header and its data are
    // inside it; the data is written unaligned.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(header);
        let space = match from {
            IpAddr::V4(v4) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                write_cmsg(cmsg, libc::IPPROTO_IP, libc::IP_PKTINFO, info)
            }
            IpAddr::V6(v6) => {
                let info = libc::in6_pktinfo {
                    ipi6_ifindex: 0,
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                };
                write_cmsg(cmsg, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info)
            }
        };
        header.msg_controllen = space as _;
    }
}

/// Writes one control message at `cmsg`; returns the room it takes (`CMSG_SPACE`).
///
/// # Safety
/// `cmsg` must point at a `cmsghdr` with `CMSG_SPACE(size_of::<T>())` bytes of room.
unsafe fn write_cmsg<T>(cmsg: *mut libc::cmsghdr, level: i32, kind: i32, data: T) -> usize {
    let len = std::mem::size_of::<T>() as u32;
    (*cmsg).cmsg_level = level;
    (*cmsg).cmsg_type = kind;
    (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut T, data);
    libc::CMSG_SPACE(len) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn receiver(ip: &str) -> UdpSocket {
        let socket = UdpSocket::bind((ip, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket
    }

    fn receive(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        (buf[..n].to_vec(), from)
    }

    #[test]
    fn one_call_sends_each_datagram_to_its_own_destination() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (a, b) = (receiver("127.0.0.1"), receiver("127.0.0.1"));
        let items = [
            (b"one".to_vec(), a.local_addr().unwrap()),
            (b"two".to_vec(), b.local_addr().unwrap()),
            (b"three".to_vec(), a.local_addr().unwrap()),
        ];
        let sent = BatchSender::default()
            .send(sender.as_raw_fd(), &items, |(d, to)| (d, *to, None))
            .unwrap();
        assert_eq!(sent, 3);
        let from = sender.local_addr().unwrap();
        assert_eq!(receive(&a), (b"one".to_vec(), from));
        assert_eq!(receive(&b), (b"two".to_vec(), from));
        assert_eq!(receive(&a), (b"three".to_vec(), from));
    }

    /// A port on 0.0.0.0 answers each client from the address the client wrote to: two
    /// loopback addresses stand for two interfaces.
    #[test]
    fn each_datagram_leaves_from_the_source_address_it_names() {
        let port = UdpSocket::bind("0.0.0.0:0").unwrap();
        let peer = receiver("127.0.0.1");
        let to = peer.local_addr().unwrap();
        let sources = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
        let items: Vec<_> = sources.iter().map(|ip| (b"x".to_vec(), *ip)).collect();
        let sent = BatchSender::default()
            .send(port.as_raw_fd(), &items, |(d, ip)| {
                (d, to, Some(IpAddr::V4(*ip)))
            })
            .unwrap();
        assert_eq!(sent, 2);
        let port_number = port.local_addr().unwrap().port();
        for ip in sources {
            let (_, from) = receive(&peer);
            assert_eq!(from, SocketAddr::from((ip, port_number)));
        }
    }

    /// The kernel refuses a datagram to port 0 (`EINVAL`); the ones around it still leave,
    /// and all three count as gone from the queue.
    #[test]
    fn a_refused_datagram_is_dropped_and_the_rest_still_go() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = receiver("127.0.0.1");
        let good = peer.local_addr().unwrap();
        let bad = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let items = [
            (b"a".to_vec(), good),
            (b"b".to_vec(), bad),
            (b"c".to_vec(), good),
        ];
        let done = BatchSender::default()
            .send_until_full(sender.as_raw_fd(), &items, |(d, to)| (d, *to, None));
        assert_eq!(done, 3);
        assert_eq!(receive(&peer).0, b"a");
        assert_eq!(receive(&peer).0, b"c");
    }

    /// More than one batch's worth leaves in several calls, in order.
    #[test]
    fn more_than_a_batch_goes_out_in_order() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = receiver("127.0.0.1");
        let to = peer.local_addr().unwrap();
        let items: Vec<Vec<u8>> = (0..SEND_BATCH as u32 + 10)
            .map(|i| i.to_be_bytes().to_vec())
            .collect();
        let done =
            BatchSender::default().send_until_full(sender.as_raw_fd(), &items, |d| (d, to, None));
        assert_eq!(done, items.len());
        for item in &items {
            assert_eq!(&receive(&peer).0, item);
        }
    }
}
