//! TLS certificates for the `wss://` listeners, served through a resolver we own so that a
//! reload (SIGHUP) can swap in a renewed certificate without restarting the listener, and so a
//! bad certificate file is a clear error naming the key instead of a panic inside Pingora.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("listeners[{index}].tls.cert: {message}")]
    Cert { index: usize, message: String },
    #[error("listeners[{index}].tls.key: {message}")]
    Key { index: usize, message: String },
}

/// Read a PEM certificate chain and private key into a rustls `CertifiedKey`.
pub fn load(index: usize, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Cert { index, message };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(format!("cannot read {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("{} is not PEM: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(cert_err(format!("no certificate in {}", cert.display())));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        index,
        message: format!("no usable private key in {}: {e}", key.display()),
    })?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&private).map_err(|e| TlsError::Key {
            index,
            message: format!("unsupported private key in {}: {e}", key.display()),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Key {
        index,
        message: format!("{} does not match the certificate: {e}", key.display()),
    })?;
    Ok(certified)
}

/// One listener's current certificate; `replace` takes effect for the next handshake.
pub struct CertSlot(ArcSwap<CertifiedKey>);

impl CertSlot {
    pub fn new(key: CertifiedKey) -> Arc<CertSlot> {
        Arc::new(CertSlot(ArcSwap::from_pointee(key)))
    }

    pub fn replace(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertSlot")
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}
