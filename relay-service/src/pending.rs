//! Data-channel messages waiting for the other leg: its channel not open yet, or its
//! SCTP send buffer full. Capped in bytes (not messages): a handful of large messages
//! must not pin megabytes per call. Exceeding the cap is reported, and the caller ends
//! the call, because silently dropping a Realtime event corrupts the conversation.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub binary: bool,
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub struct PendingQueue {
    queue: VecDeque<Message>,
    bytes: usize,
    cap_bytes: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Overflow {
    pub queued_bytes: usize,
    pub message_bytes: usize,
    pub cap_bytes: usize,
}

impl PendingQueue {
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            bytes: 0,
            cap_bytes,
        }
    }

    pub fn push(&mut self, message: Message) -> Result<(), Overflow> {
        let len = message.data.len();
        if self.bytes + len > self.cap_bytes {
            return Err(Overflow {
                queued_bytes: self.bytes,
                message_bytes: len,
                cap_bytes: self.cap_bytes,
            });
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
        self.bytes -= m.data.len();
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
        let mut q = PendingQueue::new(100);
        q.push(msg(60)).unwrap();
        let err = q.push(msg(41)).unwrap_err();
        assert_eq!(err.queued_bytes, 60);
        assert_eq!(err.message_bytes, 41);
        q.push(msg(40)).unwrap();
        assert_eq!(q.bytes(), 100);
        // Many tiny messages fit as long as bytes do.
        let mut q = PendingQueue::new(1000);
        for _ in 0..1000 {
            q.push(msg(1)).unwrap();
        }
        assert!(q.push(msg(1)).is_err());
    }

    #[test]
    fn order_is_kept_through_push_front() {
        let mut q = PendingQueue::new(100);
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
}
