//! str0m's aws-lc-rs DTLS provider with one change: dimpl's configuration is built (and its
//! crypto provider validated) once per MTU, not once per `Rtc`.
//!
//! `dimpl::ConfigBuilder::build` always runs `CryptoProvider::validate`, a self-test of the
//! key exchanges and signature checks: about 11.4 million instructions, some 1.5 ms of CPU,
//! for every `Rtc` str0m builds (two per relayed call). The configuration is immutable and
//! `Arc`-shared by design, so every DTLS instance can use the same one: each handshake still
//! draws its own randomness and keys (the configuration sets no RNG seed).
//! docs/benchmarks.md has the before/after.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::CryptoError;

/// The provider; `inner` is str0m's own, which still makes the certificate.
#[derive(Debug)]
pub struct ReusedConfigDtls {
    inner: &'static dyn DtlsProvider,
    /// Built configurations by MTU (`None`: dimpl's default). A handful at most.
    configs: Mutex<Vec<(Option<usize>, Arc<dimpl::Config>)>>,
}

impl ReusedConfigDtls {
    pub fn new(inner: &'static dyn DtlsProvider) -> Self {
        ReusedConfigDtls {
            inner,
            configs: Mutex::new(Vec::new()),
        }
    }

    /// The configuration str0m's provider would build for `mtu`, built once.
    fn config(&self, mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = configs.iter().find(|(m, _)| *m == mtu) {
            return Ok(c.clone());
        }
        // As str0m-aws-lc-rs 0.7 builds it: ICE proves return routability before DTLS,
        // so server cookies are redundant.
        let mut builder = dimpl::Config::builder().use_server_cookie(false);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        let config = Arc::new(
            builder
                .build()
                .map_err(|e| CryptoError::Other(format!("dimpl config creation failed: {e}")))?,
        );
        configs.push((mtu, config.clone()));
        Ok(config)
    }
}

impl DtlsProvider for ReusedConfigDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.inner.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let config = self.config(mtu)?;
        let cert = cert.clone();
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            other => {
                return Err(CryptoError::Other(format!(
                    "Unsupported DTLS version: {other}"
                )))
            }
        };
        Ok(Box::new(Instance { dtls }))
    }

    fn is_test(&self) -> bool {
        self.inner.is_test()
    }
}

/// One DTLS session: dimpl's, passed through as str0m's own wrapper does.
struct Instance {
    dtls: dimpl::Dtls,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").finish()
    }
}

impl DtlsInstance for Instance {
    fn set_active(&mut self, active: bool) {
        self.dtls.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.dtls.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.dtls.poll_output(buf)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.dtls.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.dtls.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.dtls.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.dtls.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.dtls.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.dtls.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.dtls.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_configuration_per_mtu_is_built_and_reused() {
        let p = ReusedConfigDtls::new(str0m::crypto::from_feature_flags().dtls_provider);
        let a = p.config(None).unwrap();
        assert!(Arc::ptr_eq(&a, &p.config(None).unwrap()));
        let small = p.config(Some(1200)).unwrap();
        assert!(!Arc::ptr_eq(&a, &small));
        assert_eq!(small.mtu(), 1200);
        assert!(Arc::ptr_eq(&small, &p.config(Some(1200)).unwrap()));
        assert!(!a.use_server_cookie(), "as str0m's own provider builds it");
        // Instances are made from it, with the process's certificate.
        let cert = p.generate_certificate().expect("a certificate");
        for version in [DtlsVersion::Dtls12, DtlsVersion::Auto] {
            let dtls = p.new_dtls(&cert, Instant::now(), version, None).unwrap();
            assert!(!dtls.is_closed());
        }
    }
}
