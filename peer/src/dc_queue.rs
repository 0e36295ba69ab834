//! Data-channel messages waiting to be written: the channel is not open yet, or str0m's SCTP
//! send buffer is full (`Channel::write` returned `Ok(false)`).
//!
//! Dropping such a message would corrupt the Realtime event stream, so it waits, in order.
//! The queue is capped in bytes, not messages: a handful of large messages must not pin
//! megabytes per call. Exceeding the cap is reported, and the caller ends the call.
//!
//! Two ways to empty it: `pop`/`push_front` for a caller that writes itself (the relay's
//! bridge, which counts per direction), or [`DcQueue::flush_one`], one write per call so the
//! caller can drain `poll_output` after each mutation as str0m requires.

use std::collections::VecDeque;
use std::fmt;
use str0m::channel::ChannelId;
use str0m::Rtc;

/// One data-channel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub binary: bool,
    pub data: Vec<u8>,
}

/// Which limit a refused message hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Queued bytes would exceed the queue's cap.
    QueueBytes,
    /// The message alone is larger than the send buffer can ever take (see
    /// [`DcQueue::with_max_message`]): it would block the queue forever.
    MessageBytes,
}

/// A message the queue refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    pub queued_bytes: usize,
    pub message_bytes: usize,
    /// The limit that was hit, in bytes.
    pub cap_bytes: usize,
    pub limit: Limit,
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            Limit::QueueBytes => write!(
                f,
                "data-channel send queue full ({} bytes queued, cap {} bytes)",
                self.queued_bytes, self.cap_bytes
            ),
            Limit::MessageBytes => write!(
                f,
                "data-channel message of {} bytes exceeds the send buffer ({} bytes)",
                self.message_bytes, self.cap_bytes
            ),
        }
    }
}

impl std::error::Error for Overflow {}

/// Result of one attempt to hand the oldest queued message to str0m.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushStep {
    /// Nothing queued.
    Empty,
    /// The send buffer has no room for the oldest message; retry after the peer
    /// acknowledges data.
    Blocked,
    /// One message of this many bytes was accepted. The `Rtc` was mutated: drain it.
    Written(usize),
    /// The oldest message was dropped (write error or channel gone). Drain, then continue.
    Failed,
}

#[derive(Debug)]
pub struct DcQueue {
    queue: VecDeque<Message>,
    bytes: usize,
    cap_bytes: usize,
    max_message_bytes: Option<usize>,
}

impl DcQueue {
    pub fn new(cap_bytes: usize) -> Self {
        DcQueue {
            queue: VecDeque::new(),
            bytes: 0,
            cap_bytes,
            max_message_bytes: None,
        }
    }

    /// Also refuses single messages above `max` bytes: str0m never accepts a message larger
    /// than the SCTP send buffer (`RtcConfig::set_sctp_max_buffered_amount`).
    pub fn with_max_message(mut self, max: usize) -> Self {
        self.max_message_bytes = Some(max);
        self
    }

    pub fn push(&mut self, message: Message) -> Result<(), Overflow> {
        let len = message.data.len();
        let refuse = |cap_bytes, limit| Overflow {
            queued_bytes: self.bytes,
            message_bytes: len,
            cap_bytes,
            limit,
        };
        if let Some(max) = self.max_message_bytes.filter(|max| len > *max) {
            return Err(refuse(max, Limit::MessageBytes));
        }
        if self.bytes.saturating_add(len) > self.cap_bytes {
            return Err(refuse(self.cap_bytes, Limit::QueueBytes));
        }
        self.bytes += len;
        self.queue.push_back(message);
        Ok(())
    }

    /// Puts back a message that could not be written, keeping order. It was counted
    /// before, so it cannot overflow.
    pub fn push_front(&mut self, message: Message) {
        self.bytes += message.data.len();
        self.queue.push_front(message);
    }

    pub fn pop(&mut self) -> Option<Message> {
        let m = self.queue.pop_front()?;
        self.bytes = self.bytes.saturating_sub(m.data.len());
        Some(m)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Writes the oldest message on `channel`. One write per call: drain the `Rtc` after
    /// every step that wrote or dropped.
    pub fn flush_one(&mut self, rtc: &mut Rtc, channel: ChannelId) -> FlushStep {
        let Some(front) = self.queue.front() else {
            return FlushStep::Empty;
        };
        let Some(mut ch) = rtc.channel(channel) else {
            // The channel closed: its messages can never be delivered.
            tracing::debug!("dropping a queued data-channel message for a closed channel");
            self.pop();
            return FlushStep::Failed;
        };
        match ch.write(front.binary, &front.data) {
            Ok(true) => {
                let n = front.data.len();
                self.pop();
                FlushStep::Written(n)
            }
            Ok(false) => FlushStep::Blocked,
            Err(e) => {
                // Log the size, never the payload.
                tracing::warn!(error = %e, bytes = front.data.len(), "data-channel write failed");
                self.pop();
                FlushStep::Failed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Message {
        Message {
            binary: true,
            data: vec![7; n],
        }
    }

    #[test]
    fn cap_is_in_bytes_not_messages() {
        let mut q = DcQueue::new(100);
        q.push(msg(60)).unwrap();
        let err = q.push(msg(41)).unwrap_err();
        assert_eq!(err.queued_bytes, 60);
        assert_eq!(err.message_bytes, 41);
        assert_eq!((err.cap_bytes, err.limit), (100, Limit::QueueBytes));
        q.push(msg(40)).unwrap();
        assert_eq!(q.bytes(), 100);
        // Many tiny messages fit as long as bytes do.
        let mut q = DcQueue::new(1000);
        for _ in 0..1000 {
            q.push(msg(1)).unwrap();
        }
        assert!(q.push(msg(1)).is_err());
        assert_eq!(q.len(), 1000);
    }

    #[test]
    fn order_is_kept_through_push_front() {
        let mut q = DcQueue::new(100);
        q.push(msg(1)).unwrap();
        q.push(msg(2)).unwrap();
        let first = q.pop().unwrap();
        assert_eq!(first.data.len(), 1);
        q.push_front(first);
        assert_eq!(q.pop().unwrap().data.len(), 1);
        assert_eq!(q.pop().unwrap().data.len(), 2);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn push_rejects_messages_the_send_buffer_can_never_take() {
        let mut q = DcQueue::new(4096).with_max_message(512);
        let err = q.push(msg(513)).unwrap_err();
        assert_eq!(err.limit, Limit::MessageBytes);
        assert_eq!((err.message_bytes, err.cap_bytes), (513, 512));
        assert_eq!(q.bytes(), 0);
        assert!(q.push(msg(512)).is_ok());
    }

    #[test]
    fn flush_one_drops_a_message_for_a_channel_that_is_not_open() {
        // ChannelId has no public constructor; take one from an offer under construction.
        let mut rtc = Rtc::new(std::time::Instant::now());
        let id = rtc.sdp_api().add_channel("t".into());
        let mut q = DcQueue::new(100);
        assert_eq!(q.flush_one(&mut rtc, id), FlushStep::Empty);
        q.push(msg(3)).unwrap();
        // Not negotiated, so str0m has no such channel: the message can never go.
        assert_eq!(q.flush_one(&mut rtc, id), FlushStep::Failed);
        assert!(q.is_empty());
    }
}
