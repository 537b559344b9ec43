//! TLS certificates for the `wss://` listeners, served through a resolver we own so that a
//! reload (SIGHUP) can swap in a renewed certificate without restarting the listener, and so a
//! bad certificate file is a clear error naming the key instead of a panic inside Pingora.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
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
    #[error("listeners[{index}].tls: {source}")]
    Config { index: usize, source: rustls::Error },
}

/// The rustls configuration of one `wss://` listener, serving `slot`'s certificate.
///
/// Built here rather than by Pingora's `TlsSettings`, whose config resumes sessions only from a
/// 256-entry in-memory cache: past 256 clients since a browser's last visit, its resumption
/// fails and it pays a full handshake (a signature) again. Stateless tickets (rustls' ring
/// `Ticketer`: AEAD-sealed session state, keys rotated every 6 hours) let any number of
/// clients resume, for both TLS 1.3 and 1.2, at no memory per client. One ticket per
/// handshake: a browser spends one per new connection and gets the next one with it.
pub fn server_config(index: usize, slot: Arc<CertSlot>) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |source| TlsError::Config { index, source };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(err)?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    // HTTP/1.1 only: WebSocket over HTTP/2 (RFC 8441) is not what noVNC speaks.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(err)?;
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
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
