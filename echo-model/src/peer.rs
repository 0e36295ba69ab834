//! The echo model's str0m settings, shared by the mock provider and the test client. The
//! plumbing itself (shared certificate, UDP shell, data-channel queue) is `rtc_peer`.

use rtc_peer::crypto::{self, CryptoError};
use rtc_peer::dc_queue::DcQueue;
use str0m::RtcConfig;

/// Bytes of data-channel data str0m may hold unacknowledged per peer. str0m's default is
/// 128 KiB and a message larger than this limit is *never* accepted by `Channel::write`; we
/// raise it so that any message we can receive (str0m's default max message size, 256 KiB)
/// can also be echoed, with room for a second one in flight.
pub(crate) const SCTP_MAX_BUFFERED: usize = 512 * 1024;

/// Default byte cap for data-channel messages waiting per peer.
pub(crate) const DEFAULT_QUEUE_CAP: usize = 4 * 1024 * 1024;

/// An `RtcConfig` with the process's shared crypto provider and certificate (cheap `build`,
/// no panic on certificate generation) and our SCTP send buffer.
pub(crate) fn rtc_builder() -> Result<RtcConfig, CryptoError> {
    Ok(crypto::rtc_config()?.set_sctp_max_buffered_amount(SCTP_MAX_BUFFERED))
}

/// A data-channel queue capped at `cap` bytes that refuses messages the send buffer can
/// never take.
pub(crate) fn dc_queue(cap: usize) -> DcQueue {
    DcQueue::new(cap).with_max_message(SCTP_MAX_BUFFERED)
}
