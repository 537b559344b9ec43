//! Connections that have not presented a valid token yet: capped in total and per client
//! address, so a flood of idle or slow connections (thousands of sockets that never send a
//! head, or send it a byte at a time) cannot take the descriptors and memory that admitted
//! sessions and the admin listener need.
//!
//! A connection holds a [`PreAuthPermit`] from accept (after the PROXY header, so the address
//! is the client's) until its token verifies, or until it closes. Static files, `/healthz` and
//! refused upgrades never authenticate: their keep-alive connections stay counted, which is why
//! the per-address default (512) leaves room for a corporate NAT's browsers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// Why a connection was closed before any request was answered
/// (`vncgate_connections_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// `limits.max_pre_auth_connections` reached.
    PreAuthLimit,
    /// `limits.max_pre_auth_connections_per_address` reached for this client address.
    PreAuthLimitPerAddress,
    /// A PROXY protocol listener: the peer is not in `trusted_proxies`.
    UntrustedProxy,
    /// A PROXY protocol listener: no valid header within the head deadline.
    ProxyHeader,
    /// The TLS handshake failed or did not finish within `limits.tls_handshake_timeout_seconds`.
    TlsHandshake,
    /// The request head did not arrive within `limits.head_timeout_seconds`.
    HeadTimeout,
}

impl ConnRefusal {
    pub const ALL: [ConnRefusal; 6] = [
        ConnRefusal::PreAuthLimit,
        ConnRefusal::PreAuthLimitPerAddress,
        ConnRefusal::UntrustedProxy,
        ConnRefusal::ProxyHeader,
        ConnRefusal::TlsHandshake,
        ConnRefusal::HeadTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnRefusal::PreAuthLimit => "pre_auth_limit",
            ConnRefusal::PreAuthLimitPerAddress => "pre_auth_limit_per_address",
            ConnRefusal::UntrustedProxy => "untrusted_proxy",
            ConnRefusal::ProxyHeader => "proxy_header",
            ConnRefusal::TlsHandshake => "tls_handshake",
            ConnRefusal::HeadTimeout => "head_timeout",
        }
    }
}

/// The accept path's metrics, registered by this module (additions to the contract's table).
#[derive(Clone)]
pub struct EdgeMetrics {
    pub pre_auth_connections: IntGauge,
    pub connections_refused_total: IntCounterVec,
}

impl EdgeMetrics {
    pub fn register(registry: &Registry) -> Result<EdgeMetrics, prometheus::Error> {
        let m = EdgeMetrics {
            pre_auth_connections: IntGauge::new(
                "vncgate_pre_auth_connections",
                "Open public connections that have not presented a valid token.",
            )?,
            connections_refused_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_connections_refused_total",
                    "Public connections closed before any answer, by reason.",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.pre_auth_connections.clone()))?;
        registry.register(Box::new(m.connections_refused_total.clone()))?;
        for reason in ConnRefusal::ALL {
            m.connections_refused_total
                .with_label_values(&[reason.as_str()]);
        }
        Ok(m)
    }

    pub fn refused(&self, reason: ConnRefusal) {
        self.connections_refused_total
            .with_label_values(&[reason.as_str()])
            .inc();
    }
}

/// The counts behind the caps. The limits are passed at each acquisition, so a reload that
/// changes them applies to the next connection.
pub struct PreAuth {
    per_address: Mutex<HashMap<IpAddr, usize>>,
    gauge: IntGauge,
}

impl PreAuth {
    pub fn new(gauge: IntGauge) -> Arc<PreAuth> {
        Arc::new(PreAuth {
            per_address: Mutex::new(HashMap::new()),
            gauge,
        })
    }

    /// Count one more connection from `ip`, or say which cap it hits.
    pub fn acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_address: usize,
    ) -> Result<PreAuthPermit, ConnRefusal> {
        let mut map = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        // The gauge is only changed under the lock, so it is the exact total.
        if usize::try_from(self.gauge.get()).unwrap_or(usize::MAX) >= max_total {
            return Err(ConnRefusal::PreAuthLimit);
        }
        let count = map.entry(ip).or_insert(0);
        if *count >= max_per_address {
            return Err(ConnRefusal::PreAuthLimitPerAddress);
        }
        *count += 1;
        self.gauge.inc();
        Ok(PreAuthPermit {
            owner: Arc::clone(self),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut map = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&ip) {
            *count -= 1;
            // Entries leave with their last connection: the map holds only open addresses.
            if *count == 0 {
                map.remove(&ip);
            }
        }
        self.gauge.dec();
    }
}

/// One counted connection; dropping it (token verified, or connection closed) frees the slot.
pub struct PreAuthPermit {
    owner: Arc<PreAuth>,
    ip: IpAddr,
}

impl Drop for PreAuthPermit {
    fn drop(&mut self) {
        self.owner.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Arc<PreAuth> {
        PreAuth::new(IntGauge::new("g", "g").expect("gauge"))
    }

    #[test]
    fn caps_per_address_and_in_total_and_frees_on_drop() {
        let pre = limiter();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = pre.acquire(a, 3, 2).expect("first");
        let _second = pre.acquire(a, 3, 2).expect("second");
        assert_eq!(
            pre.acquire(a, 3, 2).err(),
            Some(ConnRefusal::PreAuthLimitPerAddress)
        );
        let _third = pre.acquire(b, 3, 2).expect("another address");
        assert_eq!(pre.acquire(b, 3, 2).err(), Some(ConnRefusal::PreAuthLimit));
        drop(first);
        assert!(pre.acquire(a, 3, 2).is_ok());
        assert_eq!(pre.gauge.get(), 3 - 1);
    }

    #[test]
    fn the_map_forgets_addresses_without_connections() {
        let pre = limiter();
        for i in 0..100u8 {
            drop(
                pre.acquire(IpAddr::from([10, 0, 0, i]), 10, 1)
                    .expect("acquire"),
            );
        }
        assert!(pre.per_address.lock().expect("lock").is_empty());
        assert_eq!(pre.gauge.get(), 0);
    }
}
