//! Outgoing data-channel messages waiting for room in str0m's SCTP send buffer.
//!
//! `Channel::write` returns `Ok(false)` when the message does not fit in the send buffer
//! (`RtcConfig::set_sctp_max_buffered_amount`). Dropping it would corrupt the event stream, so
//! we keep it, in order, and retry after every drain of the `Rtc`. Room appears only when the
//! peer's SCTP acknowledgements arrive, and every arriving datagram is followed by a drain, so
//! this retries exactly when `ChannelBufferedAmountLow` could fire, without a threshold to tune. The queue is capped in bytes, not messages, so a few large messages cannot pin
//! unbounded memory.

use std::collections::VecDeque;

use str0m::channel::ChannelId;
use str0m::Rtc;

use crate::peer::SCTP_MAX_BUFFERED;

/// Default byte cap for messages waiting per peer.
pub(crate) const DEFAULT_QUEUE_CAP: usize = 4 * 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The message alone exceeds what str0m's send buffer can ever accept.
    TooLarge(usize),
    /// Queued bytes would exceed the cap.
    QueueFull { queued: usize, cap: usize },
}

impl std::fmt::Display for PushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushError::TooLarge(n) => write!(
                f,
                "data-channel message of {n} bytes exceeds the send buffer ({SCTP_MAX_BUFFERED} bytes)"
            ),
            PushError::QueueFull { queued, cap } => write!(
                f,
                "data-channel send queue full ({queued} bytes queued, cap {cap} bytes)"
            ),
        }
    }
}

struct Pending {
    channel: ChannelId,
    binary: bool,
    data: Vec<u8>,
}

/// Result of one attempt to hand the oldest queued message to str0m.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlushStep {
    /// Nothing queued.
    Empty,
    /// The send buffer has no room for the oldest message; retry later.
    Blocked,
    /// One message of this many bytes was accepted. The `Rtc` was mutated: drain it.
    Written(usize),
    /// The oldest message was dropped (write error or channel gone). Drain, then continue.
    Failed,
}

pub(crate) struct DcQueue {
    items: VecDeque<Pending>,
    bytes: usize,
    cap: usize,
}

impl DcQueue {
    pub fn new(cap: usize) -> Self {
        DcQueue {
            items: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    pub fn push(
        &mut self,
        channel: ChannelId,
        binary: bool,
        data: Vec<u8>,
    ) -> Result<(), PushError> {
        if data.len() > SCTP_MAX_BUFFERED {
            return Err(PushError::TooLarge(data.len()));
        }
        if self.bytes + data.len() > self.cap {
            return Err(PushError::QueueFull {
                queued: self.bytes,
                cap: self.cap,
            });
        }
        self.bytes += data.len();
        self.items.push_back(Pending {
            channel,
            binary,
            data,
        });
        Ok(())
    }

    /// Try to write the oldest queued message. One write per call, so the caller can drain
    /// `poll_output` after every mutation as str0m requires.
    pub fn flush_one(&mut self, rtc: &mut Rtc) -> FlushStep {
        let Some(front) = self.items.front() else {
            return FlushStep::Empty;
        };
        let result = match rtc.channel(front.channel) {
            Some(mut ch) => ch.write(front.binary, &front.data),
            None => {
                // The channel closed: its messages can never be delivered.
                tracing::debug!("dropping queued data-channel message for a closed channel");
                self.pop();
                return FlushStep::Failed;
            }
        };
        match result {
            Ok(true) => {
                let n = front.data.len();
                self.pop();
                FlushStep::Written(n)
            }
            // Send buffer full: keep order, retry after the peer acknowledges data.
            Ok(false) => FlushStep::Blocked,
            Err(e) => {
                tracing::warn!(error = %e, len = front.data.len(), "data-channel write failed");
                self.pop();
                FlushStep::Failed
            }
        }
    }

    fn pop(&mut self) {
        if let Some(p) = self.items.pop_front() {
            self.bytes -= p.data.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_rejects_messages_the_send_buffer_can_never_take() {
        let mut q = DcQueue::new(DEFAULT_QUEUE_CAP);
        let id = channel_id();
        assert_eq!(
            q.push(id, true, vec![0; SCTP_MAX_BUFFERED + 1]),
            Err(PushError::TooLarge(SCTP_MAX_BUFFERED + 1))
        );
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn push_caps_queued_bytes() {
        let mut q = DcQueue::new(100);
        let id = channel_id();
        assert!(q.push(id, false, vec![0; 60]).is_ok());
        assert_eq!(
            q.push(id, false, vec![0; 41]),
            Err(PushError::QueueFull {
                queued: 60,
                cap: 100
            })
        );
        assert!(q.push(id, false, vec![0; 40]).is_ok());
    }

    fn channel_id() -> ChannelId {
        // ChannelId has no public constructor; get a real one from an offer under construction.
        let mut rtc = Rtc::new(std::time::Instant::now());
        rtc.sdp_api().add_channel("t".into())
    }
}
