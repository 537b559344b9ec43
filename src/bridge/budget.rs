//! The process-wide budget for client messages that are still arriving.
//!
//! RFB client messages are a few bytes (key and pointer events), except clipboard text, which
//! a user may paste by the megabyte. A message is only complete when its last byte arrived, and
//! until then tungstenite holds what came so far. Without a budget, `limits.max_message_bytes`
//! (4 MiB by default) was the only bound, per session: a client that sends 4 MiB minus one byte
//! and then waits holds 4 MiB for as long as its session lives, and `max_sessions` such clients
//! hold 40 GiB. [`super::inbound`] counts what each session holds of its unfinished message;
//! once that passes one read chunk ([`super::inbound::FREE_BYTES`]), the message is charged to
//! this budget in full and every further byte before tungstenite sees it; the charge is given
//! back when the message is complete and written on, or when the session ends. Bytes are
//! charged as they arrive, not as a header announces them: a header declaring 4 MiB and then
//! silence costs nothing once frames are cut to one piece (tungstenite no longer reserves the
//! declared length).
//!
//! A session whose message cannot get budget is closed with 1009 (message too big), not paused.
//! Pausing its reads would keep the bytes it already holds, and its budget, for as long as the
//! client cares to wait: the clients holding the budget would be exactly the ones that never
//! finish, and every later large message (a real paste) would queue behind them. A paused
//! session also reads no pongs and no close frame, so it would look dead, or live forever if
//! the client keeps the socket open. Closing frees the memory at once, and 1009 is the code a
//! client already gets for a message above `max_message_bytes`; the client library does not
//! retry it (contract §14). The price: while the budget is exhausted, a legitimate large paste
//! fails too. Small messages (input events, short clipboard text) never touch the budget, so the
//! desktops keep working.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::{IntCounter, IntGauge};

/// Bytes of unfinished client messages held by all sessions, against a limit.
#[derive(Debug)]
pub struct MessageBudget {
    limit: AtomicUsize,
    held: AtomicUsize,
    /// `vncgate_message_buffer_bytes`: follows `held`.
    held_gauge: IntGauge,
    /// `vncgate_message_buffer_budget_bytes`: follows `limit`.
    limit_gauge: IntGauge,
    /// `vncgate_message_budget_exhausted_total`: sessions closed because it ran out.
    exhausted: IntCounter,
}

impl MessageBudget {
    pub fn new(
        limit: usize,
        held_gauge: IntGauge,
        limit_gauge: IntGauge,
        exhausted: IntCounter,
    ) -> MessageBudget {
        limit_gauge.set(i64::try_from(limit).unwrap_or(i64::MAX));
        MessageBudget {
            limit: AtomicUsize::new(limit),
            held: AtomicUsize::new(0),
            held_gauge,
            limit_gauge,
            exhausted,
        }
    }

    /// A new limit (config reload). Bytes already held stay held; while they exceed a lowered
    /// limit, no session gets more.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
        self.limit_gauge
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sessions refused so far.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.get()
    }

    /// Bytes held now, summed over sessions.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Take `n` bytes, or nothing when that would exceed the limit. A refusal is counted: the
    /// caller closes its session, so each refused session is counted once.
    pub(super) fn try_take(&self, n: usize) -> bool {
        let limit = self.limit();
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= limit)
            });
        match taken {
            Ok(_) => {
                self.held_gauge.add(i64::try_from(n).unwrap_or(i64::MAX));
                true
            }
            Err(_) => {
                self.exhausted.inc();
                false
            }
        }
    }

    /// Give back `n` bytes taken earlier.
    pub(super) fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.held.fetch_sub(n, Ordering::AcqRel);
        self.held_gauge.sub(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
pub(super) fn for_tests(limit: usize) -> MessageBudget {
    MessageBudget::new(
        limit,
        IntGauge::new("held", "held").expect("gauge"),
        IntGauge::new("limit", "limit").expect("gauge"),
        IntCounter::new("exhausted", "exhausted").expect("counter"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_up_to_the_limit_and_counts_refusals() {
        let b = for_tests(100);
        assert!(b.try_take(60));
        assert!(b.try_take(40));
        assert!(!b.try_take(1), "the limit is inclusive, not exceeded");
        assert_eq!(b.exhausted.get(), 1);
        assert_eq!(b.held_gauge.get(), 100);
        b.give_back(50);
        assert!(b.try_take(50));
        b.give_back(100);
        assert_eq!((b.held(), b.held_gauge.get()), (0, 0));
    }

    fn config(limits: &str) -> Result<crate::config::Config, crate::config::ConfigErrors> {
        let yaml = format!(
            "listeners: [{{ addr: \"127.0.0.1:1\" }}]\npaths: [\"/w\"]\n\
             auth: {{ algorithms: [HS256], secret_env: S }}\n\
             pools: {{ default: {{ backends: [{{ name: a, addr: \"127.0.0.1:2\" }}] }} }}\n\
             limits: {{ {limits} }}\n"
        );
        crate::config::Config::from_yaml(&yaml, &|_| Some("x".repeat(40)))
    }

    #[test]
    fn the_config_sets_the_budget_and_the_metrics_show_it() {
        let c = config("").expect("valid");
        assert_eq!(c.limits.message_buffer_budget_bytes, 256 * 1024 * 1024);
        let c = config("message_buffer_budget_bytes: 8388608").expect("valid");
        let m = crate::metrics::Metrics::new(&c).expect("metrics");
        assert_eq!(m.message_budget.limit(), 8 * 1024 * 1024);
        assert_eq!(m.message_buffer_budget_bytes.get(), 8 * 1024 * 1024);
        let text = String::from_utf8(m.render()).expect("utf-8");
        for series in [
            "vncgate_message_buffer_bytes 0",
            "vncgate_message_budget_exhausted_total 0",
            "vncgate_message_buffer_budget_bytes 8388608",
        ] {
            assert!(text.lines().any(|l| l == series), "{series} not exported");
        }
    }

    /// Below `max_message_bytes`, a message of the allowed size could never be received.
    #[test]
    fn a_budget_below_the_message_limit_is_a_config_error() {
        let errors = config("max_message_bytes: 4194304, message_buffer_budget_bytes: 2097152")
            .expect_err("refused");
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "limits.message_buffer_budget_bytes: 2097152 is below limits.max_message_bytes (4194304)"
            ]
        );
        let errors = config("message_buffer_budget_bytes: 1000").expect_err("refused");
        assert!(
            errors
                .iter()
                .any(|e| e.key == "limits.message_buffer_budget_bytes"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_lowered_limit_keeps_what_is_held_and_refuses_more() {
        let b = for_tests(100);
        assert!(b.try_take(80));
        b.set_limit(50);
        assert_eq!(b.limit_gauge.get(), 50);
        assert!(!b.try_take(1));
        b.give_back(80);
        assert!(b.try_take(50));
    }
}
