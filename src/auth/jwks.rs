//! Keys from a JWKS endpoint: fetched with a timeout, refetched `auth.jwks_cache_seconds` after
//! the newest fetch, and early when a token names a `kid` we do not have. A failed fetch keeps
//! the previous keys, so an identity provider outage does not log everyone out.
//!
//! Fetches are single-flight: one runs at a time, in a task of its own (a waiter that goes away
//! does not cancel it), and every request waiting for keys waits for that one. Tokens trigger a
//! fetch at most once per `auth.jwks_min_refresh_seconds` (counted from the start of the newest
//! fetch of any kind), so tokens with forged `kid`s cannot make the gateway hammer the provider.
//! A request whose `kid` is unknown waits, up to [`MAX_WAIT`], for a fetch that starts after it
//! arrived (the one in flight is enough when it brings the key), and is then verified against
//! the key set that fetch produced. The same holds before the first fetch landed: a token waits
//! for it instead of failing.
//!
//! jsonwebtoken parses JWKs but does not fetch or cache them; reqwest does the HTTP.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::watch;
use tokio::time::Instant;

use super::verify::Key;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document is a few KiB; anything far larger is not one.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// The longest an upgrade waits for keys it does not have yet (an unknown `kid`, or no fetch
/// landed yet). Ten seconds: twice [`FETCH_TIMEOUT`], so a fetch already in flight can time out
/// and the next allowed one still start, and under `jwks_min_refresh_seconds` <= 5 a request
/// always reaches the next allowed fetch; yet short enough that a person watching a connect
/// spinner does not give up, that load balancers' idle timeouts (60 s and up) are far away, and
/// that requests with forged `kid`s hold their connection only briefly. A request whose next
/// allowed fetch would start after this bound does not wait at all: it is refused at once.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Http(String),
    #[error("status {0}")]
    Status(u16),
    #[error("document larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS document: {0}")]
    Parse(String),
    #[error("the fetch was cancelled (the runtime is shutting down)")]
    Cancelled,
}

/// What `/readyz` reports about the key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No fetch has succeeded yet: no token signed by the provider can be verified.
    Loading,
    /// The newest fetch succeeded.
    Ok,
    /// The newest fetch failed; the keys of an earlier one are in use.
    Stale,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Loading => "loading",
            Status::Ok => "ok",
            Status::Stale => "stale",
        }
    }
}

/// Why a fetch ran (the `reason` field of `jwks_refreshed` / `jwks_fetch_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// The first fetch, when the refresh task starts.
    Start,
    /// `jwks_cache_seconds` after the newest fetch.
    Scheduled,
    /// After a failed fetch, sooner than the schedule (see [`Jwks::retry_delay`]).
    Retry,
    /// A token named a `kid` the key set does not have.
    UnknownKid,
    /// A token without a `kid` arrived before any fetch succeeded.
    NotLoaded,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Scheduled => "scheduled",
            Reason::Retry => "retry",
            Reason::UnknownKid => "unknown_kid",
            Reason::NotLoaded => "not_loaded",
        }
    }
}

/// The key set as requests see it, replaced whole by each finished fetch.
#[derive(Clone)]
struct Published {
    keys: Arc<Vec<Key>>,
    /// The id of the newest finished fetch (ids count up from 1 in start order; one fetch runs
    /// at a time, so they also finish in that order). 0: none yet.
    finished: u64,
    /// Some fetch has succeeded.
    loaded: bool,
    /// The newest fetch failed (its predecessors' keys are kept).
    last_failed: bool,
}

impl Published {
    fn has(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// Who may start a fetch and when; decisions are taken under its lock together with a look at
/// [`Published`], so "no fetch in flight and the key still missing" is never a stale reading.
struct Schedule {
    /// The id of the newest fetch started.
    started: u64,
    in_flight: bool,
    /// When the newest fetch started: the rate limit counts from here.
    last_start: Option<Instant>,
}

pub struct Jwks {
    url: String,
    client: reqwest::Client,
    allowed: Vec<Algorithm>,
    cache: Duration,
    min_refresh: Duration,
    published: watch::Sender<Published>,
    schedule: Mutex<Schedule>,
}

/// What a waiting request does next.
enum Next {
    Verify(Arc<Vec<Key>>),
    /// Wait for the fetch in flight to finish.
    Finish,
    /// Wait until the rate limit allows a fetch (or one finishes meanwhile).
    Until(Instant),
}

impl Jwks {
    pub fn new(
        url: &str,
        allowed: &[Algorithm],
        cache: Duration,
        min_refresh: Duration,
    ) -> Result<Jwks, FetchError> {
        pingora_core::tls::install_default_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| FetchError::Http(e.to_string()))?;
        let (published, _) = watch::channel(Published {
            keys: Arc::new(Vec::new()),
            finished: 0,
            loaded: false,
            last_failed: false,
        });
        Ok(Jwks {
            url: url.to_owned(),
            client,
            allowed: allowed.to_vec(),
            cache,
            min_refresh,
            published,
            schedule: Mutex::new(Schedule {
                started: 0,
                in_flight: false,
                last_start: None,
            }),
        })
    }

    /// Whether this cache was built for exactly these settings (a reload may keep it).
    pub fn same_settings(&self, cfg: &crate::config::AuthConfig) -> bool {
        cfg.jwks_url.as_deref() == Some(self.url.as_str())
            && cfg.algorithms == self.allowed
            && cfg.jwks_cache == self.cache
            && cfg.jwks_min_refresh == self.min_refresh
    }

    /// The current key set (cheap: an `Arc` clone).
    pub fn keys(&self) -> Arc<Vec<Key>> {
        Arc::clone(&self.published.borrow().keys)
    }

    pub fn status(&self) -> Status {
        let p = self.published.borrow();
        if !p.loaded {
            Status::Loading
        } else if p.last_failed {
            Status::Stale
        } else {
            Status::Ok
        }
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        // The lock guards plain counters that are never left half-updated.
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key set to verify a token against. With a `kid` the set does not have (or, for a
    /// token without one, before any fetch succeeded) this waits up to [`MAX_WAIT`] for the
    /// key: for the fetch in flight, and if that does not bring it, for a fetch that starts
    /// after this call (starting it when the rate limit allows; every waiter shares it). It
    /// returns the newest set once that fetch finished, at the deadline, or at once when the
    /// rate limit would hold the next fetch past the deadline.
    pub async fn keys_for(self: &Arc<Self>, kid: Option<&str>) -> Arc<Vec<Key>> {
        let satisfied = |p: &Published| match kid {
            Some(kid) => p.has(kid),
            None => p.loaded,
        };
        {
            let p = self.published.borrow();
            if satisfied(&p) {
                return Arc::clone(&p.keys);
            }
        }
        let reason = if kid.is_some() {
            Reason::UnknownKid
        } else {
            Reason::NotLoaded
        };
        let deadline = Instant::now() + MAX_WAIT;
        let mut rx = self.published.subscribe();
        // The fetch whose result settles this request: the first one started after it looked.
        let mut wanted: Option<u64> = None;
        let mut announced = false;
        loop {
            let mut fetch = None;
            let next = {
                let mut schedule = self.schedule();
                let p = rx.borrow_and_update().clone();
                let wanted = *wanted.get_or_insert(schedule.started + 1);
                if satisfied(&p) || p.finished >= wanted {
                    Next::Verify(p.keys)
                } else if schedule.in_flight {
                    Next::Finish
                } else {
                    let now = Instant::now();
                    match schedule
                        .last_start
                        .map(|t| t + self.min_refresh)
                        .filter(|allowed| *allowed > now)
                    {
                        None => {
                            fetch = Some(self.begin(&mut schedule, reason));
                            Next::Finish
                        }
                        Some(allowed) if allowed < deadline => Next::Until(allowed),
                        Some(allowed) => {
                            tracing::debug!(
                                event = "jwks_refetch_limited",
                                reason = reason.as_str(),
                                next_fetch_in_ms = (allowed - now).as_millis() as u64,
                                "key not in the JWKS; the next fetch is not allowed soon enough to wait for"
                            );
                            Next::Verify(p.keys)
                        }
                    }
                }
            };
            if let Some(fetch) = fetch {
                fetch.launch();
            }
            let until = match next {
                Next::Verify(keys) => return keys,
                Next::Finish => deadline,
                Next::Until(allowed) => allowed,
            };
            if !announced {
                announced = true;
                // Never the kid itself: it comes from the token and may be anything.
                tracing::debug!(
                    event = "jwks_wait",
                    reason = reason.as_str(),
                    "key not in the JWKS; waiting for a fetch"
                );
            }
            tokio::select! {
                // The sender lives as long as `self`; an error cannot happen while we hold it.
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
            if Instant::now() >= deadline {
                tracing::debug!(
                    event = "jwks_wait_timeout",
                    reason = reason.as_str(),
                    "no JWKS fetch finished in time; verifying against the keys at hand"
                );
                return self.keys();
            }
        }
    }

    /// Claim fetch number `started + 1` (under the schedule lock); [`Finish::launch`] runs it
    /// once the lock is released (its end takes the lock again).
    fn begin(self: &Arc<Self>, schedule: &mut Schedule, reason: Reason) -> Finish {
        schedule.started += 1;
        schedule.in_flight = true;
        schedule.last_start = Some(Instant::now());
        Finish {
            jwks: Some(Arc::clone(self)),
            id: schedule.started,
            reason,
        }
    }

    /// Fetch now (joining the fetch in flight, if any), regardless of the rate limit: the
    /// scheduled refresh. Whether the fetch it waited for succeeded.
    async fn fetch_now(self: &Arc<Self>, reason: Reason) -> bool {
        let mut rx = self.published.subscribe();
        let (id, fetch) = {
            let mut schedule = self.schedule();
            if schedule.in_flight {
                (schedule.started, None)
            } else {
                let fetch = self.begin(&mut schedule, reason);
                (fetch.id, Some(fetch))
            }
        };
        if let Some(fetch) = fetch {
            fetch.launch();
        }
        rx.wait_for(|p| p.finished >= id)
            .await
            .is_ok_and(|p| !p.last_failed)
    }

    /// Fetch now, then `jwks_cache_seconds` after the newest fetch (whatever started it), or
    /// sooner after a failure; forever (a background task).
    pub async fn run_refresh(self: Arc<Self>) {
        let mut rx = self.published.subscribe();
        let mut failures: u32 = 0;
        let mut due = Instant::now();
        let mut reason = Reason::Start;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {
                    self.fetch_now(reason).await;
                }
                // A fetch started by a token finished: the schedule counts from it.
                _ = rx.changed() => {}
            }
            let last_failed = rx.borrow_and_update().last_failed;
            if last_failed {
                failures = failures.saturating_add(1);
                due = Instant::now() + self.retry_delay(failures);
                reason = Reason::Retry;
            } else {
                failures = 0;
                due = Instant::now() + self.cache;
                reason = Reason::Scheduled;
            }
        }
    }

    /// After `failures` failed fetches in a row: the rate limit's interval (at least a second),
    /// doubling with each failure, at most the cache lifetime. Sooner than the schedule because
    /// until a fetch succeeds the gateway is not ready (nothing loaded) or serves keys it could
    /// not refresh; no sooner than the rate limit, which is what the provider was promised.
    fn retry_delay(&self, failures: u32) -> Duration {
        let base = self.min_refresh.max(Duration::from_secs(1));
        let doublings = failures.saturating_sub(1).min(16);
        base.saturating_mul(1 << doublings).min(self.cache)
    }

    fn finish(&self, id: u64, reason: Reason, result: Result<Vec<Key>, FetchError>) {
        let mut schedule = self.schedule();
        schedule.in_flight = false;
        let previous = self.published.borrow().clone();
        let outcome = match result {
            Ok(keys) => {
                let count = keys.len();
                self.published.send_replace(Published {
                    keys: Arc::new(keys),
                    finished: id,
                    loaded: true,
                    last_failed: false,
                });
                Ok(count)
            }
            Err(e) => {
                self.published.send_replace(Published {
                    finished: id,
                    last_failed: true,
                    ..previous
                });
                Err(e)
            }
        };
        drop(schedule);
        match outcome {
            Ok(count) => tracing::info!(
                event = "jwks_refreshed",
                reason = reason.as_str(),
                keys = count,
                "JWKS loaded {count} keys"
            ),
            Err(e) => tracing::warn!(
                event = "jwks_fetch_failed",
                reason = reason.as_str(),
                error = %e,
                state = self.status().as_str(),
                "JWKS fetch failed; keeping the cached keys"
            ),
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, FetchError> {
        let mut response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_set(&body, &self.allowed)
    }
}

/// One fetch's end, published exactly once: when the fetch returned, or when its task is
/// dropped unfinished (a runtime shutting down), so waiters and the next fetch are never left
/// behind an in-flight flag nobody clears.
struct Finish {
    /// Taken when the end is published.
    jwks: Option<Arc<Jwks>>,
    id: u64,
    reason: Reason,
}

impl Finish {
    /// Run the fetch in a task of its own: a waiter that goes away does not cancel it.
    fn launch(self) {
        tokio::spawn(async move {
            let Some(jwks) = self.jwks.clone() else {
                return;
            };
            let result = jwks.fetch().await;
            self.complete(result);
        });
    }

    fn complete(mut self, result: Result<Vec<Key>, FetchError>) {
        if let Some(jwks) = self.jwks.take() {
            jwks.finish(self.id, self.reason, result);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(jwks) = self.jwks.take() {
            jwks.finish(self.id, self.reason, Err(FetchError::Cancelled));
        }
    }
}

/// Parse a JWKS document into usable verification keys. Keys are parsed one by one so one
/// unusable entry (an unknown `kty`, an encryption key) does not discard the others.
pub fn parse_key_set(body: &[u8], allowed: &[Algorithm]) -> Result<Vec<Key>, FetchError> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| FetchError::Parse(e.to_string()))?;
    let entries = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| FetchError::Parse("no \"keys\" array".into()))?;
    Ok(entries
        .iter()
        .filter_map(|entry| usable_key(entry, allowed))
        .collect())
}

fn usable_key(entry: &serde_json::Value, allowed: &[Algorithm]) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
    // Signature keys only; never a symmetric (`oct`) key from the network: HMAC secrets come
    // from config alone, or anyone who can publish a JWKS could mint tokens.
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return None;
    }
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let alg = match &jwk.common.key_algorithm {
        Some(ka) => {
            let alg: Algorithm = ka.to_string().parse().ok()?;
            if !allowed.contains(&alg) {
                return None;
            }
            Some(alg)
        }
        None => None,
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    if !allowed.iter().any(|a| a.family() == key.family()) {
        return None;
    }
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A cache whose endpoint is never contacted by these tests.
    fn jwks(min_refresh: u64, cache: u64) -> Arc<Jwks> {
        let url = "http://127.0.0.1:9/jwks.json";
        let j = Jwks::new(url, &[Algorithm::RS256], secs(cache), secs(min_refresh));
        Arc::new(j.expect("client"))
    }

    #[test]
    fn retries_start_at_the_rate_limit_and_double_up_to_the_cache_lifetime() {
        let j = jwks(30, 300);
        let delays = [1, 2, 3, 4, 5, 40].map(|n| j.retry_delay(n));
        assert_eq!(delays, [30, 60, 120, 240, 300, 300].map(secs));
        assert_eq!(jwks(0, 300).retry_delay(1), secs(1));
        assert_eq!(jwks(30, 10).retry_delay(1), secs(10));
    }

    #[test]
    fn a_fetch_dropped_unfinished_is_published_as_failed_and_frees_the_next() {
        let j = jwks(0, 300);
        let fetch = j.begin(&mut j.schedule(), Reason::Start);
        assert!(j.schedule().in_flight);
        drop(fetch);
        assert!(!j.schedule().in_flight);
        assert_eq!(j.published.borrow().finished, 1);
        assert_eq!(j.status(), Status::Loading);
    }

    #[tokio::test]
    async fn an_unknown_kid_is_answered_at_once_when_the_next_allowed_fetch_is_too_far() {
        let j = jwks(3600, 300);
        // Its end takes the schedule lock: dropped after the statement that held it.
        let fetch = j.begin(&mut j.schedule(), Reason::Start);
        drop(fetch);
        let keys = j.keys_for(Some("forged")).await;
        assert!(keys.is_empty());
        assert_eq!(
            j.schedule().started,
            1,
            "a fetch was started inside the interval"
        );
    }
}
