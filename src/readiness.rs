//! The `listening` log event, emitted once a listener really accepts. Pingora binds inside its
//! own service runtimes and has no "bound" callback, so readiness is observed from outside: a
//! loopback connection to each address, completing the TLS handshake on TLS listeners (a bare
//! TCP probe would make Pingora log a failed handshake at error level on every start).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Tls,
    Admin,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Plain => "ws",
            Kind::Tls => "wss",
            Kind::Admin => "admin",
        }
    }
}

/// Wait until every address accepts, logging `listening` for each as it does.
pub async fn announce(listeners: &[(Kind, SocketAddr)]) {
    let tls = tls_probe_config();
    for (kind, addr) in listeners {
        let mut delay = Duration::from_millis(5);
        while !accepts(*kind, *addr, &tls).await {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
        tracing::info!(event = "listening", addr = %addr, kind = kind.as_str(), "listening on {} {addr}", kind.as_str());
    }
}

async fn accepts(kind: Kind, addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> bool {
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    if kind != Kind::Tls {
        return true;
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
    let name = ServerName::IpAddress(addr.ip().into());
    match connector.connect(name, tcp).await {
        Ok(mut stream) => {
            // A clean close_notify: the gateway sees a client that sent no request.
            let _ = stream.shutdown().await;
            true
        }
        Err(_) => false,
    }
}

fn tls_probe_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(ProbeVerifier(Arc::clone(&provider)));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        });
    match config {
        Ok(mut c) => {
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        }
        // ring supports the default versions; this branch is unreachable in practice, and a
        // probe that never succeeds only delays the `listening` line.
        Err(_) => Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    }
}

/// Accepts any certificate: the probe talks to our own listener over loopback to see that it
/// accepts, and sends nothing. Signatures are still checked, so the handshake is a real one.
#[derive(Debug)]
struct ProbeVerifier(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for ProbeVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
