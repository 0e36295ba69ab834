//! One crypto provider and one DTLS certificate for every `Rtc` in the process.
//!
//! Without them each `Rtc::build` sets up the provider and generates a fresh certificate,
//! about 0.7 ms of CPU (docs/benchmarks.md has the before/after); the relay builds two per
//! call and benchmarks build hundreds. Reusing a certificate across peer connections is what
//! browsers do with an `RTCCertificate`: each handshake still negotiates its own keys, and the
//! fingerprint in each SDP still authenticates it.

use std::sync::{Arc, OnceLock};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::RtcConfig;

/// The crypto provider could not make a certificate; str0m's own `build` would panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the crypto provider cannot generate a DTLS certificate")]
pub struct CryptoError;

struct Shared {
    provider: Arc<CryptoProvider>,
    cert: DtlsCert,
}

fn shared() -> Result<&'static Shared, CryptoError> {
    static SHARED: OnceLock<Option<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let mut provider = str0m::crypto::from_feature_flags();
            // dimpl's configuration (and its crypto self-test) once, not per Rtc.
            let dtls: &'static crate::dtls_config::ReusedConfigDtls = Box::leak(Box::new(
                crate::dtls_config::ReusedConfigDtls::new(provider.dtls_provider),
            ));
            provider.dtls_provider = dtls;
            let cert = provider.dtls_provider.generate_certificate()?;
            Some(Shared {
                provider: Arc::new(provider),
                cert,
            })
        })
        .as_ref()
        .ok_or(CryptoError)
}

/// Bytes of data-channel data str0m may hold unacknowledged per peer. str0m's default is
/// 128 KiB, and `Channel::write` *never* accepts a message larger than this limit, while
/// every peer advertises str0m's default maximum message size of 256 KiB: a 200 KiB event
/// would block its channel forever. 512 KiB takes any message a peer may send, with room for
/// a second one in flight. It is a cap, not an allocation.
pub const SCTP_MAX_BUFFERED: usize = 512 * 1024;

/// The `RtcConfig` every peer of ours starts from: the process's crypto provider and
/// certificate (`build` is cheap and cannot fail on certificate generation) and an SCTP send
/// buffer that takes the largest message a peer may send.
pub fn rtc_config() -> Result<RtcConfig, CryptoError> {
    let shared = shared()?;
    Ok(RtcConfig::new()
        .set_crypto_provider(shared.provider.clone())
        .set_dtls_cert(shared.cert.clone())
        .set_sctp_max_buffered_amount(SCTP_MAX_BUFFERED))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use str0m::media::{Direction, MediaKind};

    #[test]
    fn every_rtc_shares_one_certificate() {
        let fingerprint = || {
            let mut rtc = rtc_config().unwrap().build(Instant::now());
            let mut api = rtc.sdp_api();
            api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
            let (offer, _) = api.apply().unwrap();
            offer
                .to_sdp_string()
                .lines()
                .find(|l| l.starts_with("a=fingerprint:"))
                .map(str::to_string)
        };
        let a = fingerprint();
        assert!(a.is_some());
        assert_eq!(a, fingerprint());
    }
}
