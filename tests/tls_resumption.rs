//! TLS session resumption on the `wss://` listeners (issue 17): a client that connected once
//! resumes its session on the next connection (no certificate, no signature: the handshake a
//! reconnecting browser pays), for TLS 1.3 and 1.2, even after hundreds of other clients have
//! connected since. Stateless tickets make that hold at any number of clients; a per-process
//! session cache (Pingora's default, 256 entries) loses the first client after 256 others.

mod common;

use std::sync::Arc;

use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig};
use rstest::rstest;
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Clients that connect between the first client's two connections.
const OTHERS: usize = 300;

struct TlsGateway {
    gw: Gateway,
    ca: Vec<u8>,
    _files: tempfile::TempDir,
}

async fn tls_gateway() -> (TlsGateway, RfbServer) {
    let desk = RfbServer::start(Mode::Echo).await.expect("fixture");
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &desk)]);
    cfg.tls = Some((cert, key));
    let gw = Gateway::start(cfg).await;
    (
        TlsGateway {
            gw,
            ca: certified.cert.der().to_vec(),
            _files: dir,
        },
        desk,
    )
}

/// A client with its own session cache (as a browser profile has), one TLS version.
fn client(ca: &[u8], version: &'static SupportedProtocolVersion) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.to_vec()))
        .expect("test CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::in_memory_sessions(8);
    Arc::new(config)
}

/// One connection: handshake, one request and its answer (so TLS 1.3's tickets, sent after
/// the handshake, are read), and how the handshake went.
async fn visit(port: u16, config: &Arc<ClientConfig>) -> HandshakeKind {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.expect("answer");
    assert!(
        answer.starts_with(b"HTTP/1.1 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    kind
}

#[rstest]
#[case::tls13(&rustls::version::TLS13)]
#[case::tls12(&rustls::version::TLS12)]
#[tokio::test]
async fn a_returning_client_resumes_even_after_hundreds_of_others(
    #[case] version: &'static SupportedProtocolVersion,
) {
    let (g, _desk) = tls_gateway().await;
    let port = g.gw.port;
    let first = client(&g.ca, version);
    assert_eq!(visit(port, &first).await, HandshakeKind::Full);
    assert_eq!(visit(port, &first).await, HandshakeKind::Resumed);
    for _ in 0..OTHERS {
        let other = client(&g.ca, version);
        assert_eq!(visit(port, &other).await, HandshakeKind::Full);
    }
    assert_eq!(
        visit(port, &first).await,
        HandshakeKind::Resumed,
        "the first client, after {OTHERS} others"
    );
}
