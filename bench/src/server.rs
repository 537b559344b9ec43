//! The synthetic VNC server: a real RFB 3.8 handshake (security None), then either a stream of
//! FramebufferUpdate-shaped messages or an echo of whatever the client sends. With --tls-cert
//! and --tls-key it speaks TLS first (the direct-TLS ceiling of the wss:// paths).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::rfb;
use crate::tls;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// After the client's first FramebufferUpdateRequest, push FramebufferUpdate messages of
    /// --update-bytes at --rate per second.
    Updates,
    /// Send back every byte the client sends.
    Echo,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    #[arg(long, value_enum, default_value = "updates")]
    pub mode: Mode,
    /// Size of one FramebufferUpdate message in bytes (updates mode).
    #[arg(long, default_value_t = 65536)]
    pub update_bytes: usize,
    /// Updates per second per session; 0 = as fast as the client takes them.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Runtime worker threads (1 = a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// PEM certificate: accept TLS (then --tls-key is required).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Stop by itself after this long, whatever happens.
    #[arg(long, default_value_t = 7200)]
    pub max_seconds: u64,
}

pub fn main(args: ServerArgs) -> io::Result<()> {
    let rt = crate::runtime(args.threads)?;
    let acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    rt.block_on(async move {
        let listener = TcpListener::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        println!(
            "{}",
            serde_json::json!({"listening": addr.to_string(), "mode": format!("{:?}", args.mode).to_lowercase(),
                               "tls": acceptor.is_some()})
        );
        let update: Arc<[u8]> = rfb::framebuffer_update(args.update_bytes.max(16)).into();
        let serve = async {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(x) => x,
                    // Out of descriptors or similar: keep serving the sessions we have.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let update = Arc::clone(&update);
                let mode = args.mode;
                let rate = args.rate;
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = match acceptor {
                        None => session(stream, mode, update, rate).await,
                        Some(a) => tls_session(a, stream, mode, update, rate).await,
                    };
                });
            }
        };
        tokio::select! {
            () = serve => {}
            _ = tokio::time::sleep(Duration::from_secs(args.max_seconds)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}

async fn session(
    mut stream: TcpStream,
    mode: Mode,
    update: Arc<[u8]>,
    rate: f64,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    rfb::server_handshake(&mut stream).await?;
    match mode {
        Mode::Echo => echo(stream).await,
        Mode::Updates => {
            wait_for_request(&mut stream).await?;
            // The owned halves: no lock between the reader and the writer (the direct TCP
            // baseline as it was always measured).
            let (r, w) = stream.into_split();
            push_updates(r, w, update, rate).await;
            Ok(())
        }
    }
}

async fn tls_session(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    mode: Mode,
    update: Arc<[u8]>,
    rate: f64,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut stream = acceptor.accept(stream).await?;
    rfb::server_handshake(&mut stream).await?;
    // The handshake's last write (ServerInit) may still sit in rustls.
    stream.flush().await?;
    match mode {
        Mode::Echo => echo(stream).await,
        Mode::Updates => {
            wait_for_request(&mut stream).await?;
            let (r, w) = tokio::io::split(stream);
            push_updates(r, w, update, rate).await;
            Ok(())
        }
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
        // A no-op on TCP; on TLS it sends what rustls still holds.
        stream.flush().await?;
    }
}

/// Like a real server, nothing is sent before the viewer's first FramebufferUpdateRequest (a
/// health check that only does the handshake gets no updates; time to the first update
/// includes the request's trip through the path).
async fn wait_for_request<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        pending.extend_from_slice(&buf[..n]);
        if rfb::first_update_request(&pending)? {
            return Ok(());
        }
    }
}

/// From the first request on, client messages (update requests, input) are read and ignored;
/// the updates are pushed regardless, like a server with ContinuousUpdates. Returns when the
/// client goes away (its reads end or writes fail).
async fn push_updates<R, W>(mut r: R, mut w: W, update: Arc<[u8]>, rate: f64)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let drain = async move {
        let mut buf = vec![0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let push = async move {
        if rate > 0.0 {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if w.write_all(&update).await.is_err() || w.flush().await.is_err() {
                    return;
                }
            }
        } else {
            while w.write_all(&update).await.is_ok() {}
        }
    };
    tokio::select! {
        () = drain => {}
        () = push => {}
    }
}
