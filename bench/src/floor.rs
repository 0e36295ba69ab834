//! The floor under the relay's per-packet cost, measured in the same run: a bare UDP
//! forwarder that receives datagrams in batches (`recvmmsg`) and sends each batch on
//! (`sendmmsg`), doing nothing else. One thread on the relay's CPU, its own CPU time read
//! from `CLOCK_THREAD_CPUTIME_ID`, fed Opus-sized datagrams (172 bytes: 12 of RTP header,
//! 160 of payload) at a given rate by a generator on the other CPU. The relay does far more
//! per packet (SRTP both ways, ICE, routing, metrics); this is what no relay can go below on
//! this machine and kernel.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::sys::{round1, round3};

/// Datagram size: an RTP header and 20 ms of Opus at the size the capacity bench sends.
pub const DATAGRAM: usize = 172;
/// Datagrams per `recvmmsg`/`sendmmsg` call at most.
const BATCH: usize = 32;

/// CPU time of the calling thread, in seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Pins the calling thread to `cpu`.
fn pin_this_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity(0, ...) act
    // on this thread only and read the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// What the forwarder thread did while `measuring` was set.
#[derive(Default)]
struct Counts {
    forwarded: AtomicU64,
    batches: AtomicU64,
    /// CPU nanoseconds spent inside the measured window.
    cpu_ns: AtomicU64,
}

/// Receives on `input` and sends every datagram on through `output` (connected), in batches,
/// until `stop`. Counts only while `measuring`.
fn forward(
    input: &UdpSocket,
    output: &UdpSocket,
    stop: &AtomicBool,
    measuring: &AtomicBool,
    counts: &Counts,
) -> Result<()> {
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut iovecs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: zeroed mmsghdr is a valid "no name, no control" header; each points at its own
    // iovec, which points at its own buffer, all living as long as this function.
    let mut msgs: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let (rx, tx) = (input.as_raw_fd(), output.as_raw_fd());
    let mut window_start: Option<f64> = None;
    while !stop.load(Relaxed) {
        for m in msgs.iter_mut() {
            m.msg_len = 0;
        }
        // SAFETY: msgs holds BATCH valid headers (above); the socket has a receive timeout,
        // so this returns at least every 100 ms to look at `stop`.
        let n = unsafe {
            libc::recvmmsg(
                rx,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        // Send exactly what arrived: each iovec's length is the datagram's. The header's
        // pointer is taken again from the fresh `&mut` so it is not a stale alias.
        for (m, iov) in msgs.iter_mut().zip(iovecs.iter_mut()).take(n) {
            iov.iov_len = m.msg_len as usize;
            m.msg_hdr.msg_iov = iov;
        }
        // SAFETY: the first n headers are valid and point at n filled buffers.
        let sent = unsafe { libc::sendmmsg(tx, msgs.as_mut_ptr(), n as u32, 0) };
        for iov in iovecs.iter_mut() {
            iov.iov_len = 2048;
        }
        match (measuring.load(Relaxed), window_start) {
            (true, None) => window_start = Some(thread_cpu_secs()),
            (true, Some(_)) => {
                counts.forwarded.fetch_add(sent.max(0) as u64, Relaxed);
                counts.batches.fetch_add(1, Relaxed);
            }
            (false, Some(start)) => {
                let cpu = thread_cpu_secs() - start;
                counts.cpu_ns.store((cpu * 1e9) as u64, Relaxed);
                window_start = None;
            }
            (false, None) => {}
        }
    }
    Ok(())
}

/// Forwards `rate` datagrams per second for `window` (after a 1 s warm-up) through a bare
/// batched forwarder on `cpu`, fed from `gen_cpu`; returns its CPU per datagram.
pub fn udp_forwarder(
    rate: f64,
    window: Duration,
    cpu: Option<usize>,
    gen_cpu: Option<usize>,
) -> Result<Value> {
    let input = UdpSocket::bind("127.0.0.1:0").context("forwarder input socket")?;
    input.set_read_timeout(Some(Duration::from_millis(100)))?;
    let sink = UdpSocket::bind("127.0.0.1:0").context("sink socket")?;
    sink.set_read_timeout(Some(Duration::from_millis(100)))?;
    let output = UdpSocket::bind("127.0.0.1:0").context("forwarder output socket")?;
    output.connect(sink.local_addr()?)?;
    let target = input.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let received = Arc::new(AtomicU64::new(0));

    let forwarder = {
        let (stop, measuring, counts) = (stop.clone(), measuring.clone(), counts.clone());
        std::thread::spawn(move || -> Result<()> {
            if let Some(c) = cpu {
                pin_this_thread(c)?;
            }
            forward(&input, &output, &stop, &measuring, &counts)
        })
    };
    let drain = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Relaxed) {
                if sink.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Relaxed);
                }
            }
        })
    };
    // The generator: every millisecond, the datagrams due by then (so bursts are as small as
    // the rate allows, as many independent calls would send them).
    let generator = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64> {
            if let Some(c) = gen_cpu {
                pin_this_thread(c)?;
            }
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect(target)?;
            let payload = [0x80u8; DATAGRAM];
            let start = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Relaxed) {
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                while sent < due {
                    let _ = socket.send(&payload);
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(sent)
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    measuring.store(true, Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(window);
    measuring.store(false, Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    // Let the forwarder see the end of the window on its next batch.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Relaxed);
    let sent = generator
        .join()
        .map_err(|_| anyhow::anyhow!("generator panicked"))??;
    forwarder
        .join()
        .map_err(|_| anyhow::anyhow!("forwarder panicked"))??;
    let _ = drain.join();
    let forwarded = counts.forwarded.load(Relaxed);
    let batches = counts.batches.load(Relaxed).max(1);
    let cpu_secs = counts.cpu_ns.load(Relaxed) as f64 * 1e-9;
    Ok(json!({
        "offered_pps": round1(rate),
        "forwarded_pps": round1(forwarded as f64 / secs),
        "cpu_pct": round1(cpu_secs / secs * 100.0),
        "cpu_us_per_packet": if forwarded > 0 { round3(cpu_secs * 1e6 / forwarded as f64) } else { f64::NAN },
        "datagrams_per_batch": round1(forwarded as f64 / batches as f64),
        "generator_sent": sent,
        "sink_received": received.load(Relaxed),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short real run on loopback: the forwarder forwards what it gets and reports a
    /// positive, finite cost per datagram.
    #[test]
    fn the_bare_forwarder_forwards_and_measures_itself() {
        let v = udp_forwarder(2_000.0, Duration::from_millis(500), None, None).unwrap();
        let pps = v["forwarded_pps"].as_f64().unwrap();
        assert!(pps > 1_000.0, "{v}");
        let us = v["cpu_us_per_packet"].as_f64().unwrap();
        assert!(us.is_finite() && us > 0.0, "{v}");
        assert!(v["sink_received"].as_u64().unwrap() > 0, "{v}");
    }
}
