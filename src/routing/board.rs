//! Cluster-wide backend state (contract §13): what every replica must agree on about backends,
//! kept next to the pins in the store.
//!
//! - Drain marks: set once on any replica, applied on every one, kept across restarts.
//! - Live-session counts: each replica publishes its own per-backend counts with a short expiry
//!   (a replica that dies stops counting within [`LOAD_TTL`]); least-loaded placement reads the
//!   sum, so sessions spread over the backends whichever replica places them.
//! - Registered backends (`discovery.kind: registry`), added and removed through the admin API.
//!
//! The embedded store's board ([`LocalBoard`]) keeps the same things per process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::store::StoreError;

/// How often a replica publishes its counts and reads everyone's (and the drain marks and the
/// registry): the bound on how stale another replica's view is when no event reaches it.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// A replica's counts expire this long after its last publication: five missed syncs is a dead
/// or partitioned replica, not a slow one.
pub const LOAD_TTL: Duration = Duration::from_secs(5);

/// A backend as the board names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub pool: String,
    pub name: String,
}

impl BackendKey {
    pub fn new(pool: &str, name: &str) -> BackendKey {
        BackendKey {
            pool: pool.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// What one sync returns: the cluster-wide view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BoardView {
    /// Live sessions per backend, summed over every replica whose counts have not expired.
    pub sessions: HashMap<BackendKey, usize>,
    /// Replicas whose counts are live (this one included).
    pub replicas: usize,
    pub drained: HashSet<BackendKey>,
    /// Registered backends: key -> `host:port`.
    pub registered: BTreeMap<BackendKey, String>,
}

#[async_trait]
pub trait BackendBoard: Send + Sync {
    /// Publish this replica's live counts (replacing its previous ones, expiring after
    /// [`LOAD_TTL`]) and read the cluster-wide view, in one round trip.
    async fn sync(
        &self,
        replica: &str,
        counts: &[(BackendKey, usize)],
    ) -> Result<BoardView, StoreError>;

    /// Of `candidates` (in order of preference among equals), the one with the fewest live
    /// sessions cluster-wide, counted at once as one more session of this replica's: two
    /// replicas placing at the same moment see each other's choice.
    async fn place(
        &self,
        replica: &str,
        pool: &str,
        candidates: &[String],
    ) -> Result<Option<String>, StoreError>;

    /// This replica's count of `key` moved by `delta` (a session ended, or reconnected to an
    /// existing pin), ahead of the next sync.
    async fn add_sessions(
        &self,
        replica: &str,
        key: &BackendKey,
        delta: i64,
    ) -> Result<(), StoreError>;

    /// Drop this replica's counts (it is shutting down).
    async fn leave(&self, replica: &str) -> Result<(), StoreError>;

    async fn set_drain(&self, key: &BackendKey, draining: bool) -> Result<(), StoreError>;

    /// Add or replace a registered backend.
    async fn register(&self, key: &BackendKey, addr: &str) -> Result<(), StoreError>;

    /// Remove a registered backend; whether it was registered.
    async fn deregister(&self, key: &BackendKey) -> Result<bool, StoreError>;

    /// One registered backend's address, straight from the store (a replica asked for a backend
    /// registered through another one a moment ago, before its next sync).
    async fn registered(&self, key: &BackendKey) -> Result<Option<String>, StoreError>;
}

/// The embedded store's board: the same state, for one process.
#[derive(Default)]
pub struct LocalBoard {
    state: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    counts: HashMap<BackendKey, usize>,
    drained: HashSet<BackendKey>,
    registered: BTreeMap<BackendKey, String>,
}

impl LocalBoard {
    fn state(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl BackendBoard for LocalBoard {
    async fn sync(
        &self,
        _replica: &str,
        counts: &[(BackendKey, usize)],
    ) -> Result<BoardView, StoreError> {
        let mut state = self.state();
        state.counts = counts.iter().cloned().collect();
        Ok(BoardView {
            sessions: state.counts.clone(),
            replicas: 1,
            drained: state.drained.clone(),
            registered: state.registered.clone(),
        })
    }

    async fn place(
        &self,
        _replica: &str,
        pool: &str,
        candidates: &[String],
    ) -> Result<Option<String>, StoreError> {
        let mut state = self.state();
        let load = |name: &String| {
            state
                .counts
                .get(&BackendKey::new(pool, name))
                .copied()
                .unwrap_or(0)
        };
        // `min_by_key` keeps the first of equals: the caller's order of preference.
        let chosen = candidates.iter().min_by_key(|c| load(c)).cloned();
        if let Some(name) = &chosen {
            *state.counts.entry(BackendKey::new(pool, name)).or_insert(0) += 1;
        }
        Ok(chosen)
    }

    async fn add_sessions(
        &self,
        _replica: &str,
        key: &BackendKey,
        delta: i64,
    ) -> Result<(), StoreError> {
        let mut state = self.state();
        let n = state.counts.entry(key.clone()).or_insert(0);
        *n = n.saturating_add_signed(delta as isize);
        Ok(())
    }

    async fn leave(&self, _replica: &str) -> Result<(), StoreError> {
        self.state().counts.clear();
        Ok(())
    }

    async fn set_drain(&self, key: &BackendKey, draining: bool) -> Result<(), StoreError> {
        let mut state = self.state();
        match draining {
            true => state.drained.insert(key.clone()),
            false => state.drained.remove(key),
        };
        Ok(())
    }

    async fn register(&self, key: &BackendKey, addr: &str) -> Result<(), StoreError> {
        self.state().registered.insert(key.clone(), addr.to_owned());
        Ok(())
    }

    async fn deregister(&self, key: &BackendKey) -> Result<bool, StoreError> {
        Ok(self.state().registered.remove(key).is_some())
    }

    async fn registered(&self, key: &BackendKey) -> Result<Option<String>, StoreError> {
        Ok(self.state().registered.get(key).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn place_takes_the_least_loaded_and_counts_it_at_once() {
        let board = LocalBoard::default();
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut chosen = Vec::new();
        for _ in 0..6 {
            chosen.push(board.place("r", "p", &names).await.ok().flatten());
        }
        let count = |n: &str| chosen.iter().filter(|c| c.as_deref() == Some(n)).count();
        assert_eq!((count("a"), count("b"), count("c")), (2, 2, 2));
        // Ties go to the caller's first choice.
        assert_eq!(chosen[0].as_deref(), Some("a"));
    }

    #[tokio::test]
    async fn drain_and_registry_show_in_the_view() {
        let board = LocalBoard::default();
        let key = BackendKey::new("p", "x");
        board.set_drain(&key, true).await.ok();
        board.register(&key, "127.0.0.1:5900").await.ok();
        let view = board.sync("r", &[]).await.unwrap_or_default();
        assert!(view.drained.contains(&key));
        assert_eq!(
            view.registered.get(&key).map(String::as_str),
            Some("127.0.0.1:5900")
        );
        assert!(board.deregister(&key).await.unwrap_or(false));
        assert!(!board.deregister(&key).await.unwrap_or(true));
    }
}
