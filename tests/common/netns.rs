//! A real network path that can go half-open: a network namespace joined to the host by a veth
//! pair, and a TCP forwarder whose listening socket lives inside the namespace. The gateway
//! connects to [`Forwarder::addr`] (the namespace side of the veth), so its backend connection
//! crosses the veth in both directions; [`NetNs::cut`] then makes the path drop every packet
//! silently, both ways (no FIN, no RST, no ICMP), while every socket stays open: what a backend
//! VM that vanished, or an expired NAT entry, looks like to the gateway's kernel. Unlike
//! [`super::fault_proxy`]'s `Blackhole` (user space holding its own connection open), this
//! leaves the gateway's TCP stack with unacknowledged segments and unanswered keep-alive probes.
//!
//! ```ignore
//! let ns = NetNs::create();                              // panics without CAP_NET_ADMIN
//! let fwd = Forwarder::start(&ns, xvnc.rfb_addr()).await; // listens on the namespace side
//! // ... the gateway's backend is `fwd.addr()` ...
//! ns.cut();                                              // silent from now on
//! ```
//!
//! The cut replaces each side's neighbour entry for the other with a permanent one naming a MAC
//! address nobody has: frames still leave, the peer veth receives them addressed to another
//! host and IP drops them (`PACKET_OTHERHOST`). It needs nothing but `ip` (iproute2), not the
//! `sch_netem` qdisc, which some kernels lack.
//!
//! Dropping the `NetNs` deletes the veth pair and the namespace (also when a test panics);
//! dropping the `Forwarder` stops it and closes its connections.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
/// MAC addresses (locally administered) that neither end of the veth has.
const NOBODY_MAC: [&str; 2] = ["02:00:5e:00:de:ad", "02:00:5e:00:be:ef"];

/// The namespace, the veth pair and the /30 between them.
pub struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    /// Whether the veth pair was created (and must be deleted).
    veth: bool,
}

impl NetNs {
    /// A fresh namespace with names and a /30 in 10.213.0.0/16 unique to this process (and to
    /// the call within it), both veth ends up. Panics with a clear message when the process is
    /// not privileged enough: the test needs root, it does not skip.
    pub fn create() -> NetNs {
        require_privileges();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let mut ns = NetNs {
            name: format!("vncgate-test-{pid}-{n}"),
            // Interface names are at most 15 bytes.
            host_if: format!("vg{pid}n{n}h"),
            ns_if: format!("vg{pid}n{n}g"),
            host_ip: Ipv4Addr::UNSPECIFIED,
            ns_ip: Ipv4Addr::UNSPECIFIED,
            veth: false,
        };
        let in_use = ip(&["-4", "-o", "addr", "show"]);
        let mut slot = (pid.wrapping_mul(7).wrapping_add(n)) % (1 << 14);
        let base = loop {
            let base = Ipv4Addr::new(10, 213, (slot >> 6) as u8, ((slot & 63) << 2) as u8);
            let host = Ipv4Addr::from(u32::from(base) + 1);
            if !in_use.contains(&format!("{host}/")) {
                break base;
            }
            slot = (slot + 1) % (1 << 14);
        };
        ns.host_ip = Ipv4Addr::from(u32::from(base) + 1);
        ns.ns_ip = Ipv4Addr::from(u32::from(base) + 2);

        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ]);
        ns.veth = true;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ns.ip_in(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns.ns_if]);
        ns.ip_in(&["link", "set", &ns.ns_if, "up"]);
        ns.ip_in(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace side's address: what the gateway connects to.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A listening socket bound inside the namespace on `ns_ip` (a free port). A socket keeps
    /// the namespace it was created in, so it can be served from any thread.
    pub fn listen(&self) -> io::Result<std::net::TcpListener> {
        let path = Path::new("/run/netns").join(&self.name);
        let addr = SocketAddr::from((self.ns_ip, 0));
        // setns(2) changes the calling thread only: a thread of its own, which then ends.
        std::thread::spawn(move || {
            let file = File::open(&path)?;
            // SAFETY: a valid descriptor of a network namespace; affects this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            std::net::TcpListener::bind(addr)
        })
        .join()
        .expect("the setns thread panicked")
    }

    /// From now on every packet between the host and the namespace is dropped silently, both
    /// ways; sockets on either side are left as they are.
    pub fn cut(&self) {
        ip(&[
            "neigh",
            "replace",
            &self.ns_ip.to_string(),
            "lladdr",
            NOBODY_MAC[0],
            "dev",
            &self.host_if,
            "nud",
            "permanent",
        ]);
        self.ip_in(&[
            "neigh",
            "replace",
            &self.host_ip.to_string(),
            "lladdr",
            NOBODY_MAC[1],
            "dev",
            &self.ns_if,
            "nud",
            "permanent",
        ]);
    }

    fn ip_in(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes the other; the namespace goes once its last
        // socket is closed.
        if self.veth {
            let _ = ip_status(&["link", "del", &self.host_if]);
        }
        let _ = ip_status(&["netns", "del", &self.name]);
    }
}

/// Forwards every connection accepted inside a [`NetNs`] to `target` (connected from the
/// host's namespace), bytes both ways, until either side closes or fails.
pub struct Forwarder {
    addr: SocketAddr,
    acceptor: JoinHandle<()>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Forwarder {
    /// Must be called within a Tokio runtime.
    pub async fn start(ns: &NetNs, target: SocketAddr) -> Forwarder {
        let std_listener = ns.listen().unwrap_or_else(|e| {
            panic!(
                "listening on {} inside network namespace {}: {e}",
                ns.ns_ip, ns.name
            )
        });
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let listener = TcpListener::from_std(std_listener).expect("tokio listener");
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let connections = Arc::clone(&connections);
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let task = tokio::spawn(async move {
                        let _ = inbound.set_nodelay(true);
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                    connections
                        .lock()
                        .expect("connections")
                        .push(task.abort_handle());
                }
            })
        };
        Forwarder {
            addr,
            acceptor,
            connections,
        }
    }

    /// Where the gateway connects: the namespace side of the veth.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.acceptor.abort();
        for task in self.connections.lock().expect("connections").drain(..) {
            task.abort();
        }
    }
}

/// Panics unless the effective capabilities allow creating and entering a network namespace.
fn require_privileges() {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff in /proc/self/status");
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    assert!(
        has(CAP_NET_ADMIN) && has(CAP_SYS_ADMIN),
        "this test needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create a network namespace \
         and a veth pair; run it as root, as CI does (effective capabilities: {eff:#x})"
    );
}

/// iproute2's `ip`: `/usr/sbin` is not on every user's `PATH`.
fn ip_program() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| panic!("ip not found: install the Debian package iproute2"))
}

fn ip_status(args: &[&str]) -> io::Result<std::process::Output> {
    Command::new(ip_program()).args(args).output()
}

/// Runs `ip args`, panicking with its error output (and the privilege hint) if it fails.
fn ip(args: &[&str]) -> String {
    let out = ip_status(args).unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed ({}): {}\n(this test needs root for a network namespace)",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
