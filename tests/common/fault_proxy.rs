//! A TCP proxy that injects network faults between the gateway and something it talks to (Redis,
//! a VNC backend): tests put it in the path and switch it at run time.
//!
//! ```ignore
//! let proxy = FaultProxy::start(redis_addr).await?;   // listens on 127.0.0.1, a free port
//! let url = format!("redis://{}/0", proxy.addr());
//! proxy.wait_connections(1).await;                    // the gateway connected through it
//! proxy.set(Fault::Blackhole);                        // half-open from now on
//! proxy.set(Fault::Pass);                             // new connections work again
//! ```
//!
//! Each fault applies to the connections open when it is set and to those accepted while it
//! holds, until another is set:
//!
//! | fault | current connections | new connections |
//! |---|---|---|
//! | `Pass` | forwarded both ways | forwarded |
//! | `Blackhole` | nothing forwarded either way, no FIN, no RST, sockets kept open; such a connection never forwards again, even after `Pass` (the path it used is gone, as after a NAT or conntrack entry expired or a failover that sent no RST) | accepted, then the same |
//! | `Pause` | nothing forwarded until another fault is set; then what was held is delivered (a partition that heals, TCP retransmitting) | accepted, held |
//! | `Reset` | RST to both peers (SO_LINGER 0, then close) | accepted and RST at once |
//! | `Drop` | FIN to both peers (an orderly close) | accepted and closed with FIN |
//! | `Delay(d)` | each chunk forwarded `d` after it was read (a latency spike); order kept | the same |
//!
//! Dropping the proxy closes every connection it holds.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::EVENT_TIMEOUT;

/// How long an orderly close (`Fault::Drop`) waits for the peers to close their side: cleanup,
/// not a test's timing.
const CLOSE_DRAIN: Duration = Duration::from_secs(10);

/// See the module documentation for what each does to current and new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Blackhole,
    Pause,
    Reset,
    Drop,
    Delay(Duration),
}

pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    open: Arc<watch::Sender<usize>>,
    accepted: Arc<AtomicU64>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free 127.0.0.1 port and forward every connection to `target` (connected when
    /// a connection first has something to forward), starting with [`Fault::Pass`].
    pub async fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let fault = watch::Sender::new(Fault::Pass);
        let open = Arc::new(watch::Sender::new(0usize));
        let accepted = Arc::new(AtomicU64::new(0));
        let acceptor = {
            let fault = fault.clone();
            let open = Arc::clone(&open);
            let accepted = Arc::clone(&accepted);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let guard = OpenGuard::new(Arc::clone(&open));
                    tokio::spawn(serve(client, target, fault.subscribe(), guard));
                }
            })
        };
        Ok(FaultProxy {
            addr,
            fault,
            open,
            accepted,
            acceptor,
        })
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switch every current and future connection to `fault`.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Connections open now (accepted and not yet closed by either side or by a fault).
    pub fn connections(&self) -> usize {
        *self.open.borrow()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Returns once at least `n` connections are open; panics after [`EVENT_TIMEOUT`].
    pub async fn wait_connections(&self, n: usize) {
        let mut open = self.open.subscribe();
        let wait = open.wait_for(|open| *open >= n);
        match tokio::time::timeout(EVENT_TIMEOUT, wait).await {
            Ok(Ok(_)) => {}
            _ => panic!(
                "fault proxy {}: {} connections open, waited for {n}",
                self.addr,
                self.connections()
            ),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The connection tasks end when the fault channel closes (this struct holds its sender).
        self.acceptor.abort();
    }
}

/// Counts a connection as open for as long as its task holds it.
struct OpenGuard(Arc<watch::Sender<usize>>);

impl OpenGuard {
    fn new(open: Arc<watch::Sender<usize>>) -> OpenGuard {
        open.send_modify(|n| *n += 1);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// One proxied connection, following the fault channel until it ends.
async fn serve(
    client: TcpStream,
    target: SocketAddr,
    mut fault: watch::Receiver<Fault>,
    _open: OpenGuard,
) {
    let mut client = client;
    let _ = client.set_nodelay(true);
    let mut server: Option<TcpStream> = None;
    let (mut up, mut down) = (Pipe::default(), Pipe::default());
    let mut blackholed = false;
    loop {
        let now = *fault.borrow_and_update();
        match now {
            Fault::Reset => return reset(&client, server.as_ref()),
            Fault::Drop => return close(client, server).await,
            // Held until the fault changes (or, blackholed, until a reset or drop ends it).
            _ if blackholed => {}
            Fault::Blackhole => blackholed = true,
            Fault::Pause => {}
            Fault::Pass | Fault::Delay(_) => {
                let delay = match now {
                    Fault::Delay(d) => d,
                    _ => Duration::ZERO,
                };
                if server.is_none() {
                    match TcpStream::connect(target).await {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            server = Some(s);
                        }
                        // The target refused: so does the proxy, as a direct connection would.
                        Err(_) => return reset(&client, None),
                    }
                }
                let Some(srv) = server.as_mut() else { return };
                let ended = {
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = srv.split();
                    let pumps = async {
                        tokio::try_join!(
                            up.run(&mut cr, &mut sw, delay),
                            down.run(&mut sr, &mut cw, delay)
                        )
                    };
                    tokio::select! {
                        done = pumps => Some(done.is_ok()),
                        changed = fault.changed() => match changed {
                            Ok(()) => None,
                            Err(_) => return,
                        },
                    }
                };
                match ended {
                    // Both sides closed in order.
                    Some(true) => return,
                    // One side failed (reset): the other learns it the same way.
                    Some(false) => return reset(&client, server.as_ref()),
                    None => {}
                }
                continue;
            }
        }
        if fault.changed().await.is_err() {
            return;
        }
    }
}

/// Abortive close of both sides: SO_LINGER 0 makes the close send RST.
fn reset(client: &TcpStream, server: Option<&TcpStream>) {
    let _ = client.set_zero_linger();
    if let Some(s) = server {
        let _ = s.set_zero_linger();
    }
}

/// Orderly close of both sides: FIN, then read what the peers still send until they close too,
/// because closing a socket with unread data sends RST instead. Bounded by [`CLOSE_DRAIN`]: a
/// peer that never closes is not waited for.
async fn close(client: TcpStream, server: Option<TcpStream>) {
    async fn finish(mut s: TcpStream) {
        let _ = s.shutdown().await;
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    }
    let both = async {
        tokio::join!(finish(client), async {
            if let Some(s) = server {
                finish(s).await;
            }
        })
    };
    let _ = tokio::time::timeout(CLOSE_DRAIN, both).await;
}

/// One direction of a connection. Its state lives outside the pumping future, so a fault change
/// can interrupt the pump at any await and a later one resumes without losing or reordering a
/// byte (socket reads and single writes are cancel-safe).
struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// When the chunk in `buf` may be written (its read time plus the delay then in force).
    due: Instant,
    eof: bool,
    done: bool,
}

impl Default for Pipe {
    fn default() -> Self {
        Pipe {
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
            due: Instant::now(),
            eof: false,
            done: false,
        }
    }
}

impl Pipe {
    /// Forward until the reading side ends (then pass the FIN on) or fails.
    async fn run<R, W>(&mut self, from: &mut R, to: &mut W, delay: Duration) -> io::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        while !self.done {
            if self.start == self.end {
                if self.eof {
                    to.shutdown().await?;
                    self.done = true;
                    break;
                }
                let n = from.read(&mut self.buf).await?;
                if n == 0 {
                    self.eof = true;
                    continue;
                }
                (self.start, self.end) = (0, n);
                self.due = Instant::now() + delay;
            }
            tokio::time::sleep_until(self.due).await;
            let n = to.write(&self.buf[self.start..self.end]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.start += n;
        }
        Ok(())
    }
}
