//! The echo model's str0m settings, shared by the mock provider and the test client. The
//! plumbing itself (shared certificate, UDP shell, data-channel queue) is `rtc_peer`.

use rtc_peer::crypto::{self, CryptoError};
use rtc_peer::dc_queue::DcQueue;
use str0m::RtcConfig;

pub(crate) use rtc_peer::crypto::SCTP_MAX_BUFFERED;

/// Default byte cap for data-channel messages waiting per peer.
pub(crate) const DEFAULT_QUEUE_CAP: usize = 4 * 1024 * 1024;

/// An `RtcConfig` with the process's shared crypto provider and certificate (cheap `build`,
/// no panic on certificate generation) and the shared SCTP send buffer.
pub(crate) fn rtc_builder() -> Result<RtcConfig, CryptoError> {
    crypto::rtc_config()
}

/// A data-channel queue capped at `cap` bytes that refuses messages the send buffer can
/// never take.
pub(crate) fn dc_queue(cap: usize) -> DcQueue {
    DcQueue::new(cap).with_max_message(SCTP_MAX_BUFFERED)
}
