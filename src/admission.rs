//! Admission control, taken before any backend work: the process-wide session cap, the per-user
//! cap, the per-address auth-failure throttle, and the draining flag.
//!
//! Why our own: Pingora has no global connection cap, and these limits are about *sessions*
//! (post-auth, per user), which only the application can see.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AdmissionError {
    #[error("the gateway is at its session limit")]
    OverCapacity,
    #[error("this user has too many live sessions")]
    TooManySessions,
    #[error("too many failed authentications from this address; retry later")]
    TooManyAuthFailures,
    #[error("the gateway is draining; reconnect to another instance")]
    Draining,
}

const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Above this many tracked networks, expired windows are pruned (at most once a second).
const FAILURE_TABLE_PRUNE_AT: usize = 4096;
/// Hard cap on tracked networks (a few MiB at most).
const FAILURE_TABLE_CAP: usize = 65536;

/// One IPv6 host usually owns a whole /64; counting per address would let it rotate freely.
fn network_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
    }
}

pub struct Admission {
    /// Limits are atomics so a config reload can change them under live sessions.
    max_sessions: AtomicUsize,
    max_per_user: AtomicUsize,
    per_user: Mutex<HashMap<String, usize>>,
    failures_per_minute: AtomicU32,
    failures: Mutex<FailureTable>,
    draining: AtomicBool,
    /// Live tickets: every session from admission to its end, including upgrades still
    /// connecting to their backend (the drain waits for this, not just for registered sessions).
    live: watch::Sender<usize>,
}

/// Auth failures per client network, pruned at most once per second and capped, so an
/// attacker rotating addresses can neither grow it without bound nor make every lookup scan it.
#[derive(Default)]
struct FailureTable {
    windows: HashMap<IpAddr, (Instant, u32)>,
    last_prune: Option<Instant>,
}

/// Held by a live session; dropping it gives the global and per-user slots back.
pub struct Ticket {
    user: String,
    admission: Arc<Admission>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission
            .live
            .send_modify(|n| *n = n.saturating_sub(1));
        let mut map = self
            .admission
            .per_user
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

impl Admission {
    pub fn new(
        max_sessions: usize,
        max_per_user: usize,
        failures_per_minute: u32,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            max_sessions: AtomicUsize::new(max_sessions),
            max_per_user: AtomicUsize::new(max_per_user),
            per_user: Mutex::new(HashMap::new()),
            failures_per_minute: AtomicU32::new(failures_per_minute),
            failures: Mutex::new(FailureTable::default()),
            draining: AtomicBool::new(false),
            live: watch::Sender::new(0),
        })
    }

    /// New limits (config reload). Live sessions above a lowered limit keep running; new ones
    /// are refused until the count falls below it.
    pub fn set_limits(&self, max_sessions: usize, max_per_user: usize, failures_per_minute: u32) {
        self.max_sessions.store(max_sessions, Ordering::SeqCst);
        self.max_per_user.store(max_per_user, Ordering::SeqCst);
        self.failures_per_minute
            .store(failures_per_minute, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Take a global and a per-user slot for `user`.
    pub fn admit(self: &Arc<Self>, user: &str) -> Result<Ticket, AdmissionError> {
        if self.is_draining() {
            return Err(AdmissionError::Draining);
        }
        let max = self.max_sessions.load(Ordering::SeqCst);
        // Per-user first, under its lock, then the global count: both or neither are taken.
        let mut map = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(user.to_owned()).or_insert(0);
        if *n >= self.max_per_user.load(Ordering::SeqCst) {
            if *n == 0 {
                map.remove(user);
            }
            return Err(AdmissionError::TooManySessions);
        }
        let admitted = self.live.send_if_modified(|live| {
            if *live >= max {
                return false;
            }
            *live += 1;
            true
        });
        if !admitted {
            if *n == 0 {
                map.remove(user);
            }
            return Err(AdmissionError::OverCapacity);
        }
        *n += 1;
        drop(map);
        Ok(Ticket {
            user: user.to_owned(),
            admission: Arc::clone(self),
        })
    }

    /// Refuse an address that already failed authentication too often in the current window.
    pub fn check_auth_throttle(&self, addr: IpAddr) -> Result<(), AdmissionError> {
        let table = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match table.windows.get(&network_of(addr)) {
            Some((start, count))
                if start.elapsed() < FAILURE_WINDOW
                    && *count >= self.failures_per_minute.load(Ordering::SeqCst) =>
            {
                Err(AdmissionError::TooManyAuthFailures)
            }
            _ => Ok(()),
        }
    }

    pub fn record_auth_failure(&self, addr: IpAddr) {
        let mut table = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if table.windows.len() >= FAILURE_TABLE_PRUNE_AT
            && table
                .last_prune
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            table
                .windows
                .retain(|_, (start, _)| start.elapsed() < FAILURE_WINDOW);
            table.last_prune = Some(now);
        }
        let key = network_of(addr);
        if table.windows.len() >= FAILURE_TABLE_CAP && !table.windows.contains_key(&key) {
            // Full of live windows: an address flood is under way. Not tracking one more
            // address costs less than letting the table grow.
            return;
        }
        let entry = table.windows.entry(key).or_insert((now, 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Resolves once no session holds a ticket.
    pub async fn wait_idle(&self) {
        let mut rx = self.live.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_then_per_user_limits_and_release() {
        let a = Admission::new(2, 1, 60);
        let t1 = a.admit("alice").expect("first");
        assert_eq!(
            a.admit("alice").err(),
            Some(AdmissionError::TooManySessions)
        );
        let _t2 = a.admit("bob").expect("second user");
        assert_eq!(a.admit("carol").err(), Some(AdmissionError::OverCapacity));
        drop(t1);
        let _t3 = a.admit("alice").expect("slot returned");
    }

    #[test]
    fn auth_failures_throttle_after_limit() {
        let a = Admission::new(1, 1, 3);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..3 {
            assert!(a.check_auth_throttle(ip).is_ok());
            a.record_auth_failure(ip);
        }
        assert_eq!(
            a.check_auth_throttle(ip),
            Err(AdmissionError::TooManyAuthFailures)
        );
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        assert!(a.check_auth_throttle(other).is_ok());
    }

    #[test]
    fn ipv6_failures_count_per_64() {
        let a = Admission::new(1, 1, 2);
        a.record_auth_failure("2001:db8::1".parse().expect("ip"));
        a.record_auth_failure("2001:db8::2".parse().expect("ip"));
        assert!(
            a.check_auth_throttle("2001:db8::ffff".parse().expect("ip"))
                .is_err()
        );
        assert!(
            a.check_auth_throttle("2001:db8:0:1::1".parse().expect("ip"))
                .is_ok()
        );
    }

    #[tokio::test]
    async fn wait_idle_follows_tickets() {
        let a = Admission::new(2, 2, 1);
        let t = a.admit("x").expect("ticket");
        let waiter = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.wait_idle().await }
        });
        drop(t);
        waiter.await.expect("idle");
    }

    #[test]
    fn draining_refuses_new_sessions() {
        let a = Admission::new(1, 1, 1);
        a.set_draining();
        assert_eq!(a.admit("x").err(), Some(AdmissionError::Draining));
    }
}
