//! TLS for the wss:// and direct-TLS paths: the bench's certificate, the client configuration
//! every TLS path shares (so the client side costs the same on each), and the synthetic
//! server's acceptor for the direct-TLS ceiling.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CipherSuite, ClientConfig, HandshakeKind, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, Args)]
pub struct CertArgs {
    /// Directory to write cert.pem and key.pem into (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
}

/// A self-signed certificate for 127.0.0.1 and localhost (ECDSA P-256, rcgen's default, the
/// cheapest handshake signature; the same file serves vncgate, websockify and the direct-TLS
/// server, and the client trusts exactly it). A leaf, not a CA: webpki refuses a CA
/// certificate presented as the server's own.
pub fn write_cert(args: CertArgs) -> Result<(), String> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .map_err(|e| format!("tls-cert: {e}"))?;
    fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let cert = args.dir.join("cert.pem");
    let key = args.dir.join("key.pem");
    fs::write(&cert, certified.cert.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
    fs::write(&key, certified.signing_key.serialize_pem())
        .map_err(|e| format!("{}: {e}", key.display()))?;
    println!(
        "{}",
        serde_json::json!({"cert": cert.display().to_string(), "key": key.display().to_string()})
    );
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring, as vncgate's Pingora listener uses; explicit so no process-wide default is needed.
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client's provider: ring with TLS13_AES_128_GCM_SHA256 first, as Chrome and Firefox
/// offer it. rustls lists AES-256-GCM first and its server follows the client's order, so
/// without this the bench would encrypt every byte with the costlier cipher browsers do not get.
fn browser_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(io::Error::other(format!(
            "{}: no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// A client TLS connection. rustls reads the socket itself, at most 4 KiB per `read_tls`: a
/// 64 KiB BufReader under it was measured slower here (bulk over direct TLS 1.7–2.1 GB/s with
/// it, 2.5–3.0 without, three alternating pairs), so there is none.
pub type TlsTcp = TlsStream<TcpStream>;

/// The client side of every TLS connection of one client run.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    connector: TlsConnector,
    resume: bool,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("resume", &self.resume)
            .finish()
    }
}

/// Session cache entries per client (per server name rustls keeps at most 8 TLS 1.3 tickets,
/// each good for one resumption; every handshake brings new ones).
const SESSION_CACHE: usize = 64;

impl ClientTls {
    /// Trust `ca_file` only. `resume`: connections made through this value (and its clones)
    /// share one session cache, so a connection after the first can resume, as a browser
    /// reconnecting does; otherwise resumption is off and every connection is a full
    /// handshake, like a browser's first visit.
    pub fn new(ca_file: &Path, resume: bool) -> io::Result<ClientTls> {
        let mut roots = RootCertStore::empty();
        for c in load_certs(ca_file)? {
            roots.add(c).map_err(io::Error::other)?;
        }
        let mut config = ClientConfig::builder_with_provider(browser_provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // What a browser offers on a wss:// URL.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = if resume {
            Resumption::in_memory_sessions(SESSION_CACHE)
        } else {
            Resumption::disabled()
        };
        Ok(ClientTls::from_config(Arc::new(config), resume))
    }

    fn from_config(config: Arc<ClientConfig>, resume: bool) -> ClientTls {
        ClientTls {
            connector: TlsConnector::from(Arc::clone(&config)),
            config,
            resume,
        }
    }

    /// The same client with a session cache of its own (when resuming): one per simulated
    /// browser. A cache shared by 32 concurrent connections runs out of tickets (8 per server
    /// name, single use) and would count the client's shortage as the server's refusal.
    pub fn own_cache(&self) -> ClientTls {
        if !self.resume {
            return self.clone();
        }
        let mut config = (*self.config).clone();
        config.resumption = Resumption::in_memory_sessions(SESSION_CACHE);
        ClientTls::from_config(Arc::new(config), true)
    }

    /// The TLS handshake over `tcp` to `addr` (host:port; an IP host is checked against the
    /// certificate's IP addresses, a name against its DNS names).
    pub async fn connect(&self, addr: &str, tcp: TcpStream) -> io::Result<TlsTcp> {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        self.connector.connect(name, tcp).await
    }
}

/// What a finished client handshake negotiated.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub resumed: bool,
    pub version: String,
    pub suite: String,
}

impl Negotiated {
    pub fn of(s: &TlsTcp) -> Negotiated {
        let (_, c) = s.get_ref();
        Negotiated {
            resumed: c.handshake_kind() == Some(HandshakeKind::Resumed),
            version: c
                .protocol_version()
                .map_or_else(|| "?".into(), |v| format!("{v:?}")),
            suite: c
                .negotiated_cipher_suite()
                .map_or_else(|| "?".into(), |s| format!("{:?}", s.suite())),
        }
    }
}

/// The synthetic server's side (direct-TLS ceiling): rustls with ring, TLS 1.3 and 1.2, http/1.1
/// as the only ALPN protocol and stateless session tickets (one per handshake), as vncgate's
/// listener is configured (src/gateway/tls.rs). rustls' defaults (Pingora's `TlsSettings`)
/// resume only from a 256-entry server cache: with 400 reconnecting clients the ceiling resumed
/// 0.5 % of handshakes and vncgate 100 %, which is no ceiling.
pub fn acceptor(cert: &Path, key: &Path) -> io::Result<TlsAcceptor> {
    let certs = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| io::Error::other(format!("{}: {e}", key.display())))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(io::Error::other)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(io::Error::other)?;
    config.send_tls13_tickets = 1;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
