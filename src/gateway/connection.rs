//! One public connection from accept to close: the PROXY header (on listeners that want it), the
//! pre-auth slot, the TLS handshake, then request heads under a deadline, each handed to
//! [`App::serve`] as a Pingora HTTP session. Every public listener is a plain TCP listener
//! for Pingora (which keeps the binary upgrade's socket hand-over); TLS is done here because the
//! PROXY header comes before the ClientHello and because Pingora's handshake timeout is a fixed
//! 60 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{ReusedHttpStream, ServerApp};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::Stream;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::http::v1::server::HttpSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::server::ShutdownWatch;

use super::pre_auth::{ConnRefusal, PreAuthPermit};
use super::{App, Gateway, KEEPALIVE_SECONDS, head, proxy_header, tls};
use crate::config::{Config, Limits};

/// What the accept path needs to know about one configured listener. Fixed at start: listener
/// changes need a restart or a binary upgrade (as in the README).
pub struct ListenerSpec {
    addr: SocketAddr,
    /// PROXY protocol: the networks allowed to send the header.
    trusted_proxies: Option<Vec<ipnet::IpNet>>,
    tls: Option<Acceptor>,
}

#[derive(Debug, thiserror::Error)]
#[error("listeners[{index}].tls: {message}")]
pub struct ListenerError {
    index: usize,
    message: String,
}

impl ListenerSpec {
    /// One spec per configured listener, in config order; TLS ones serve from their
    /// certificate slot (swapped by a reload).
    pub fn from_config(
        config: &Config,
        slots: &[Option<Arc<tls::CertSlot>>],
    ) -> Result<Vec<ListenerSpec>, ListenerError> {
        let mut specs = Vec::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            let tls = match slots.get(index).cloned().flatten() {
                None => None,
                Some(slot) => {
                    // No files here: the certificate comes from the slot.
                    let config = tls::server_config(index, slot).map_err(|e| ListenerError {
                        index,
                        message: e.to_string(),
                    })?;
                    Some(Acceptor::from_server_config(config))
                }
            };
            specs.push(ListenerSpec {
                addr: listener.addr,
                trusted_proxies: listener.proxy_protocol.clone(),
                tls,
            });
        }
        Ok(specs)
    }
}

/// The state of one connection across its requests (mini-redis' `Handler`, for HTTP).
pub struct Connection {
    /// The client: from the PROXY header where the listener takes one, else the TCP peer.
    pub client_addr: Option<SocketAddr>,
    pre_auth: Option<PreAuthPermit>,
}

impl Connection {
    /// The token verified: the connection no longer counts against the pre-auth caps.
    pub fn authenticated(&mut self) {
        self.pre_auth = None;
    }
}

#[async_trait]
impl ServerApp for App {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let gw = &self.gw;
        let config = gw.config();
        let limits = &config.limits;
        let peer = socket_addr(&stream, Side::Peer);
        let local = socket_addr(&stream, Side::Local);
        let Some(spec) = local.and_then(|local| self.listener_for(local)) else {
            // Not one of ours (cannot happen with Pingora's listeners): nothing to apply.
            return None;
        };
        let mut l4 = match stream.into_any().downcast::<L4Stream>() {
            Ok(l4) => *l4,
            Err(_) => return None,
        };
        let mut client_addr = peer;
        if let Some(trusted) = &spec.trusted_proxies {
            // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; trusted_proxies are
            // written as IPv4 networks.
            let trusted_peer = peer.is_some_and(|p| {
                let ip = p.ip().to_canonical();
                trusted.iter().any(|n| n.contains(&ip))
            });
            if !trusted_peer {
                gw.metrics.edge.refused(ConnRefusal::UntrustedProxy);
                // Debug, as every refusal here: whoever can reach the port could fill the logs;
                // the counter shows the rate.
                tracing::debug!(event = "connection_refused", reason = "untrusted_proxy",
                    peer = %peer.map(|p| p.to_string()).unwrap_or_default(),
                    "PROXY protocol listener: the peer is not in trusted_proxies");
                return None;
            }
            match tokio::time::timeout(limits.head_timeout, Box::pin(proxy_header::read(&mut l4)))
                .await
            {
                Ok(Ok(Some(addr))) => client_addr = Some(addr),
                Ok(Ok(None)) => {}
                // A TCP check (the balancer's own, or the start-up probe) sends nothing.
                Ok(Err(proxy_header::ProxyHeaderError::Closed)) => return None,
                Ok(Err(e)) => {
                    gw.metrics.edge.refused(ConnRefusal::ProxyHeader);
                    tracing::debug!(event = "connection_refused", reason = "proxy_header", error = %e,
                        "PROXY protocol listener: no valid header");
                    return None;
                }
                Err(_) => {
                    gw.metrics.edge.refused(ConnRefusal::ProxyHeader);
                    return None;
                }
            }
        }
        let pre_auth = match client_addr {
            Some(addr) => match gw.pre_auth.acquire(
                addr.ip(),
                limits.max_pre_auth_connections,
                limits.max_pre_auth_connections_per_address,
            ) {
                Ok(permit) => Some(permit),
                Err(reason) => {
                    gw.metrics.edge.refused(reason);
                    return None;
                }
            },
            None => None,
        };
        let stream: Stream = match &spec.tls {
            None => Box::new(l4),
            Some(acceptor) => {
                // Boxed: the handshake's future holds rustls' connection inline (7,280 bytes);
                // inline here it would add that to this future, which every connection keeps
                // for its whole life (an idle wss:// session: 49.1 → 42.0 KiB of RSS at 9,950
                // sessions).
                let handshake =
                    tokio::time::timeout(limits.tls_handshake_timeout, acceptor.tls_handshake(l4));
                match Box::pin(handshake).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(_)) | Err(_) => {
                        // Not logged one by one: scanners and expired clients make these
                        // constant on a public port; the counter shows the rate.
                        gw.metrics.edge.refused(ConnRefusal::TlsHandshake);
                        return None;
                    }
                }
            }
        };
        let mut conn = Connection {
            client_addr,
            pre_auth,
        };
        self.serve_connection(stream, &mut conn, shutdown).await;
        None
    }
}

impl App {
    fn listener_for(&self, local: SocketAddr) -> Option<&ListenerSpec> {
        // A wildcard listener (0.0.0.0:8443) sees the concrete local address of each connection.
        self.listeners.iter().find(|l| l.addr == local).or_else(|| {
            self.listeners
                .iter()
                .find(|l| l.addr.ip().is_unspecified() && l.addr.port() == local.port())
        })
    }

    /// Requests, one after the other, until the connection closes or is taken by an upgrade.
    async fn serve_connection(
        self: &Arc<Self>,
        mut stream: Stream,
        conn: &mut Connection,
        shutdown: &ShutdownWatch,
    ) {
        let gw: &Arc<Gateway> = &self.gw;
        let mut idle = None;
        loop {
            let limits = gw.config().limits.clone();
            let session = match next_request(stream, idle, &limits).await {
                Ok(session) => session,
                Err(head::Head::TimedOut) => {
                    gw.metrics.edge.refused(ConnRefusal::HeadTimeout);
                    return;
                }
                Err(_) => return,
            };
            // Boxed: a request's future (an upgrade holds a whole session) is allocated when a
            // request arrives, not with every idle connection's task (RSS per idle connection,
            // tests/accept_path.rs: 27 KiB with it inline, 24 KiB boxed).
            let served = Box::pin(self.serve(session, conn, shutdown)).await;
            let Some(reused) = served else {
                return;
            };
            stream = reused.consume().0;
            if *shutdown.borrow() {
                return;
            }
            idle = Some(Duration::from_secs(KEEPALIVE_SECONDS));
        }
    }
}

/// The next request on `stream` as a Pingora session with its head already read, or why there
/// is none (`Closed`, `TimedOut`, or `TooLarge`, which has been answered 400).
async fn next_request(
    mut stream: Stream,
    idle: Option<Duration>,
    limits: &Limits,
) -> Result<ServerSession, head::Head> {
    match head::read(
        &mut stream,
        idle,
        limits.head_timeout,
        limits.max_head_bytes,
    )
    .await
    {
        head::Head::Ready(prefix) => {
            let mut h1 = HttpSession::new(stream);
            h1.set_pipelined_prefix(prefix);
            Ok(ServerSession::H1(h1))
        }
        head::Head::TooLarge => {
            head::refuse_too_large(&mut stream, limits.max_head_bytes, limits.head_timeout).await;
            Err(head::Head::TooLarge)
        }
        other => Err(other),
    }
}

enum Side {
    Peer,
    Local,
}

fn socket_addr(stream: &Stream, side: Side) -> Option<SocketAddr> {
    let digest = stream.get_socket_digest()?;
    let addr = match side {
        Side::Peer => digest.peer_addr(),
        Side::Local => digest.local_addr(),
    };
    addr.and_then(|a| a.as_inet()).copied()
}

/// The admin listener's connections: the same head deadline, no pre-auth caps (the admin
/// listener is not public) and no PROXY protocol.
pub async fn serve_admin_connection(
    app: Arc<super::admin::AdminApp>,
    tcp: tokio::net::TcpStream,
    limits: Limits,
    shutdown: ShutdownWatch,
) {
    use pingora_core::apps::HttpServerApp;
    let mut stream: Stream = Box::new(L4Stream::from(tcp));
    let mut idle = None;
    loop {
        let Ok(session) = next_request(stream, idle, &limits).await else {
            return;
        };
        let reused: Option<ReusedHttpStream> = app.process_new_http(session, &shutdown).await;
        let Some(reused) = reused else { return };
        stream = reused.consume().0;
        idle = Some(Duration::from_secs(KEEPALIVE_SECONDS));
    }
}
