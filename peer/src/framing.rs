//! RFC 4571 framing: how ICE-TCP (RFC 6544) carries STUN, DTLS, RTP and RTCP over a TCP
//! stream. Every packet is preceded by its length as a 2-byte big-endian integer.
//!
//! Sans-IO: [`FrameDecoder`] takes whatever bytes a read returned and yields whole frames;
//! [`encode_frame`] prefixes one packet. Neither touches a socket or a clock, so both are
//! tested natively. The decoder refuses a frame longer than its limit as soon as the length
//! prefix is read, so a peer can make it hold at most `max_frame + 2` bytes plus one read.

/// The largest frame RFC 4571 can express (a 16-bit length).
pub const MAX_RFC4571_FRAME: usize = u16::MAX as usize;

/// Why a stream cannot be decoded further. The stream is then useless: a length prefix out
/// of bounds means the two ends no longer agree on where frames start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// Prefixes `packet` with its RFC 4571 length. `None` when it is longer than
/// [`MAX_RFC4571_FRAME`] (str0m's packets stay near the path MTU, far below it).
pub fn encode_frame(packet: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(packet.len()).ok()?;
    let mut out = Vec::with_capacity(2 + packet.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(packet);
    Some(out)
}

/// Splits a TCP byte stream into RFC 4571 frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames (compacted lazily).
    consumed: usize,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame` bytes (at most
    /// [`MAX_RFC4571_FRAME`]).
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            consumed: 0,
            max_frame: max_frame.min(MAX_RFC4571_FRAME),
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed. Empty frames carry
    /// nothing str0m could use and are skipped.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        loop {
            let rest = self.buf.get(self.consumed..).unwrap_or_default();
            let [hi, lo, body @ ..] = rest else {
                return Ok(None);
            };
            let len = u16::from_be_bytes([*hi, *lo]) as usize;
            if len > self.max_frame {
                return Err(FrameError::TooLarge {
                    len,
                    max: self.max_frame,
                });
            }
            let Some(frame) = body.get(..len) else {
                return Ok(None);
            };
            let frame = frame.to_vec();
            self.consumed += 2 + len;
            if self.consumed == self.buf.len() {
                self.buf.clear();
                self.consumed = 0;
            }
            if !frame.is_empty() {
                return Ok(Some(frame));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(decoder: &mut FrameDecoder) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(f) = decoder.next_frame().unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let packets: Vec<Vec<u8>> = vec![vec![1; 20], vec![2; 1], vec![3; 1200], vec![4; 300]];
        let stream: Vec<u8> = packets
            .iter()
            .flat_map(|p| encode_frame(p).unwrap())
            .collect();
        for chunk in [1, 2, 3, 7, 100, 1201, stream.len()] {
            let mut d = FrameDecoder::new(1500);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                d.extend(piece);
                got.extend(frames_of(&mut d));
            }
            assert_eq!(got, packets, "chunks of {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn the_length_prefix_is_big_endian() {
        assert_eq!(encode_frame(&[9; 258]).unwrap()[..3], [0x01, 0x02, 9]);
        assert_eq!(encode_frame(&[]).unwrap(), vec![0, 0]);
        assert!(encode_frame(&vec![0; MAX_RFC4571_FRAME]).is_some());
        assert!(encode_frame(&vec![0; MAX_RFC4571_FRAME + 1]).is_none());
    }

    #[test]
    fn an_oversized_frame_is_refused_at_its_prefix_without_buffering_its_body() {
        let mut d = FrameDecoder::new(1000);
        d.extend(&[0x03, 0xE9]); // 1001
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: 1001,
                max: 1000
            })
        );
        assert_eq!(d.buffered(), 2);
        // Exactly at the limit is fine.
        let mut d = FrameDecoder::new(1000);
        d.extend(&encode_frame(&[7; 1000]).unwrap());
        assert_eq!(d.next_frame().unwrap().unwrap().len(), 1000);
    }

    #[test]
    fn empty_frames_are_skipped_and_partial_ones_wait() {
        let mut d = FrameDecoder::new(100);
        d.extend(&[0, 0, 0, 0, 0, 3, 1, 2]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 4);
        d.extend(&[3]);
        assert_eq!(d.next_frame(), Ok(Some(vec![1, 2, 3])));
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn the_limit_never_exceeds_what_rfc_4571_can_express() {
        let mut d = FrameDecoder::new(usize::MAX);
        d.extend(&[0xFF, 0xFF]);
        assert_eq!(d.next_frame(), Ok(None), "65535 is legal, just incomplete");
    }
}
