//! Config reload (SIGHUP) without dropping sessions. Everything new is built first (keys, JWKS
//! cache, certificates) and swapped only when all of it succeeded, so a bad new config changes
//! nothing. Live sessions keep the settings they started with; new connections get the new ones.
//!
//! Reloadable: `auth` (keys, algorithms, issuer/audience, origins, expiry), `pools` (backends
//! added, removed, changed), `limits`, `paths`, `web_root`, `admin.token_env`, and the
//! certificate files of TLS listeners. Not reloadable (they need a restart or an upgrade, and
//! are reported and ignored): `server`, listener addresses, `admin.addr`, `store`, `logging`.

use std::sync::Arc;

use super::Gateway;
use super::tls;
use crate::auth::Verifier;
use crate::auth::verify::KeyError;
use crate::config::{AdminConfig, Config};
use crate::routing::Health;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Keys(#[from] KeyError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// What a successful reload did not apply (keys whose changes need a restart).
pub type Ignored = Vec<&'static str>;

impl Gateway {
    pub fn reload(&self, new: Config) -> Result<Ignored, ReloadError> {
        let old = self.config();
        let ignored = restart_only_changes(&old, &new);

        // Build first: any error here leaves the running config untouched.
        let verifier = Verifier::rebuild(&new.auth, Some(&self.verifier()))?;
        let mut certs = Vec::new();
        for (index, (slot, listener)) in self.tls.iter().zip(&old.listeners).enumerate() {
            let new_listener = new.listeners.get(index).filter(|l| l.addr == listener.addr);
            if let (Some(slot), Some(files)) = (slot, new_listener.and_then(|l| l.tls.as_ref())) {
                certs.push((Arc::clone(slot), tls::load(index, &files.cert, &files.key)?));
            }
        }

        // Swap.
        self.verifier.store(Arc::new(verifier));
        for (slot, cert) in certs {
            slot.replace(cert);
        }
        let health = Health::rebuild(&new, &self.metrics, Some(&self.router.health()));
        self.router.set_health(Arc::new(health));
        let limits = &new.limits;
        self.admission.set_limits(
            limits.max_sessions,
            limits.max_sessions_per_user,
            limits.auth_failures_per_minute,
        );
        let merged = Config {
            server: old.server.clone(),
            listeners: old.listeners.clone(),
            admin: match (&old.admin, &new.admin) {
                (Some(o), Some(n)) => Some(AdminConfig {
                    addr: o.addr,
                    token: n.token.clone(),
                }),
                (o, _) => o.clone(),
            },
            store: old.store.clone(),
            logging: old.logging.clone(),
            ..new
        };
        self.metrics.config_loaded(&merged, Some(&old.hash));
        self.config.store(Arc::new(merged));
        self.reloaded.notify_waiters();
        Ok(ignored)
    }
}

fn restart_only_changes(old: &Config, new: &Config) -> Ignored {
    let mut ignored = Vec::new();
    let s = (&old.server, &new.server);
    if s.0.threads != s.1.threads
        || s.0.pid_file != s.1.pid_file
        || s.0.upgrade_sock != s.1.upgrade_sock
        || s.0.drain != s.1.drain
    {
        ignored.push("server");
    }
    let addrs = |c: &Config| {
        c.listeners
            .iter()
            .map(|l| (l.addr, l.tls.is_some()))
            .collect::<Vec<_>>()
    };
    if addrs(old) != addrs(new) {
        ignored.push("listeners");
    }
    if old.admin.as_ref().map(|a| a.addr) != new.admin.as_ref().map(|a| a.addr) {
        ignored.push("admin.addr");
    }
    let st = (&old.store, &new.store);
    let same_kind = st.0.kind == st.1.kind;
    if !same_kind
        || st.0.key_prefix != st.1.key_prefix
        || st.0.session_idle_ttl != st.1.session_idle_ttl
    {
        ignored.push("store");
    }
    if old.logging.format != new.logging.format || old.logging.level != new.logging.level {
        ignored.push("logging");
    }
    ignored
}
