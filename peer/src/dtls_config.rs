//! str0m's aws-lc-rs DTLS provider with two changes: dimpl's configuration is built (and its
//! crypto provider validated) once per MTU, not once per `Rtc`, and the certificate's private
//! key is parsed once, not once per DTLS instance.
//!
//! `dimpl::ConfigBuilder::build` always runs `CryptoProvider::validate`, a self-test of the
//! key exchanges and signature checks: about 11.4 million instructions, some 1.5 ms of CPU,
//! for every `Rtc` str0m builds (two per relayed call). The configuration is immutable and
//! `Arc`-shared by design, so every DTLS instance can use the same one: each handshake still
//! draws its own randomness and keys (the configuration sets no RNG seed).
//!
//! Every dimpl instance also loads its certificate's private key from PKCS#8 when it is made,
//! and aws-lc checks the key on load (a P-256 scalar multiplication): about 140,000
//! instructions per `Rtc`, for the one key the process uses for every leg. [`SharedKeys`] parses
//! each key once and hands every instance the same parsed key; each signature still draws
//! fresh randomness. docs/benchmarks.md has the before/after of both.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::CryptoError;

use dimpl::crypto::{Buf, CryptoProvider, KeyProvider, SigningKey};
use dimpl::{HashAlgorithm, SignatureAlgorithm};

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
        let mut builder = dimpl::Config::builder()
            .use_server_cookie(false)
            .with_crypto_provider(CryptoProvider {
                key_provider: &SHARED_KEYS,
                ..dimpl::crypto::aws_lc_rs::default_provider()
            });
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

/// The keys every configuration loads its certificates' private keys through.
static SHARED_KEYS: SharedKeys = SharedKeys::new();

/// A [`KeyProvider`] that parses each private key once (with dimpl's own aws-lc-rs provider)
/// and hands every DTLS instance the same parsed key. A process has one certificate for all
/// its legs, so a few entries suffice; past [`SharedKeys::MAX`] keys are parsed per instance
/// as dimpl would, and the cache never grows.
#[derive(Debug)]
struct SharedKeys {
    /// (the key's DER, the parsed key).
    loaded: Mutex<Vec<(Vec<u8>, SharedKey)>>,
}

impl SharedKeys {
    const MAX: usize = 4;

    const fn new() -> Self {
        SharedKeys {
            loaded: Mutex::new(Vec::new()),
        }
    }

    fn parse(key_der: &[u8]) -> Result<Box<dyn SigningKey>, dimpl::CryptoError> {
        dimpl::crypto::aws_lc_rs::default_provider()
            .key_provider
            .load_private_key(key_der)
    }
}

impl KeyProvider for SharedKeys {
    fn load_private_key(&self, key_der: &[u8]) -> Result<Box<dyn SigningKey>, dimpl::CryptoError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, key)) = loaded.iter().find(|(der, _)| der == key_der) {
            return Ok(Box::new(key.clone()));
        }
        let parsed = Self::parse(key_der)?;
        if loaded.len() >= Self::MAX {
            return Ok(parsed);
        }
        let key = SharedKey::new(parsed);
        loaded.push((key_der.to_vec(), key.clone()));
        Ok(Box::new(key))
    }
}

/// One parsed key shared by many DTLS instances. dimpl's `sign` takes `&mut self`, so the
/// instances take turns (a handshake signs once); what the key is never changes, so it is
/// read once.
#[derive(Debug, Clone)]
struct SharedKey {
    key: Arc<Mutex<Box<dyn SigningKey>>>,
    algorithm: SignatureAlgorithm,
    hash_algorithm: HashAlgorithm,
    supported_hash_algorithms: Arc<[HashAlgorithm]>,
}

impl SharedKey {
    fn new(key: Box<dyn SigningKey>) -> Self {
        SharedKey {
            algorithm: key.algorithm(),
            hash_algorithm: key.hash_algorithm(),
            supported_hash_algorithms: key.supported_hash_algorithms().into(),
            key: Arc::new(Mutex::new(key)),
        }
    }
}

impl SigningKey for SharedKey {
    fn sign(
        &mut self,
        data: &[u8],
        hash_alg: HashAlgorithm,
        out: &mut Buf,
    ) -> Result<(), dimpl::CryptoError> {
        self.key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sign(data, hash_alg, out)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }

    fn hash_algorithm(&self) -> HashAlgorithm {
        self.hash_algorithm
    }

    fn supported_hash_algorithms(&self) -> &[HashAlgorithm] {
        &self.supported_hash_algorithms
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
    use str0m::crypto::dtls::DtlsCert;

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

    /// A signature from a shared key, checked the way a peer's DTLS checks it.
    fn signs_verifiably(key: &mut dyn SigningKey, cert: &DtlsCert) -> bool {
        let data = b"a handshake transcript";
        let mut sig = Buf::new();
        key.sign(data, HashAlgorithm::SHA256, &mut sig).unwrap();
        dimpl::crypto::aws_lc_rs::default_provider()
            .signature_verification
            .verify_signature(
                &cert.certificate,
                data,
                &sig,
                HashAlgorithm::SHA256,
                SignatureAlgorithm::ECDSA,
            )
            .is_ok()
    }

    #[test]
    fn a_private_key_is_parsed_once_and_every_instance_signs_with_it() {
        let keys = SharedKeys::new();
        let provider = str0m::crypto::from_feature_flags().dtls_provider;
        let cert = provider.generate_certificate().expect("a certificate");
        let mut a = keys.load_private_key(&cert.private_key).unwrap();
        let mut b = keys.load_private_key(&cert.private_key).unwrap();
        {
            let loaded = keys.loaded.lock().unwrap();
            assert_eq!(loaded.len(), 1, "one parse for one key");
            assert_eq!(
                Arc::strong_count(&loaded[0].1.key),
                3,
                "cache + two instances"
            );
        }
        assert_eq!(a.algorithm(), SignatureAlgorithm::ECDSA);
        assert_eq!(a.supported_hash_algorithms(), &[HashAlgorithm::SHA256]);
        assert!(signs_verifiably(a.as_mut(), &cert));
        assert!(signs_verifiably(b.as_mut(), &cert));
        // A key it does not hold is refused as dimpl refuses it.
        assert!(keys.load_private_key(b"not a key").is_err());
        // The cache stays bounded; keys past it still load and sign.
        for _ in 0..SharedKeys::MAX + 2 {
            let other = provider.generate_certificate().expect("a certificate");
            let mut key = keys.load_private_key(&other.private_key).unwrap();
            assert!(signs_verifiably(key.as_mut(), &other));
        }
        assert_eq!(keys.loaded.lock().unwrap().len(), SharedKeys::MAX);
    }
}
