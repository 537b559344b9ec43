//! How bulk streams share the worker threads with each other and with interactive sessions.
//!
//! Every session is a task on Pingora's few tokio workers, which never preempt: a stream whose
//! sockets are always ready keeps its worker until it gives it back. Two costs pull apart:
//! - giving the worker back (`yield_now`) after every chunk keeps a round over 100 bulk streams
//!   short, so an interactive session's keystroke waits little; but each yield can wake the
//!   other worker, which steals the task, and with a handful of streams that wake-up and
//!   migration cost a stream a sixth of its throughput (BENCHMARKS.md);
//! - large chunks make the zero-copy path cheap per byte, but a round over many streams then
//!   takes as long as all their chunks.
//!
//! So both follow the number of streams now moving bulk data, process-wide: while there are no
//! more of them than workers, a stream keeps its worker for up to [`SLICE`] and splices up to
//! [`MAX_CHUNK`] at a time; beyond that, its turn is its share of a round that moves about
//! [`ROUND_BYTES`] over all streams: chunks shrink to that share, and a stream yields once it
//! moved it. On the copying path reads stay at most 64 KiB, so with a few streams a turn spans
//! several chunks (8 wss:// streams: 256 KiB, a yield per four reads rather than per read: bulk
//! 1,653 → 1,703 MB/s, 3 interleaved runs, every run above every run before).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Sessions whose last backend chunk was bulk-sized.
static BULK_STREAMS: AtomicUsize = AtomicUsize::new(0);

/// Chunks at least this large count as bulk traffic.
pub const BULK_BYTES: usize = 16 * 1024;

/// The largest spliced chunk: with few streams, one splice pair per MiB. Larger chunks gained
/// nothing measurable; this also bounds what one session holds in its pipe.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// With many streams, what one round over all of them moves (so its duration stays around a
/// millisecond per worker on the zero-copy path), split evenly.
const ROUND_BYTES: usize = 2 * 1024 * 1024;

/// How long a stream may keep its worker when streams do not outnumber workers.
const SLICE: Duration = Duration::from_millis(1);

/// A session's place in the bulk count, and its yield bookkeeping.
pub struct Share {
    counted: bool,
    workers: usize,
    last_yield: Instant,
    /// Bytes moved since the worker was last given back.
    since_yield: usize,
}

impl Share {
    pub fn new() -> Self {
        let workers = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .unwrap_or(1)
            .max(1);
        Share {
            counted: false,
            workers,
            last_yield: Instant::now(),
            since_yield: 0,
        }
    }

    /// Record a forwarded chunk of `n` bytes, then give the worker back if others may wait.
    pub async fn after_chunk(&mut self, n: usize) {
        if n < BULK_BYTES {
            self.pause();
            return;
        }
        if !self.counted {
            self.counted = true;
            BULK_STREAMS.fetch_add(1, Ordering::Relaxed);
        }
        if self.turn_is_over(n, streams(), self.last_yield.elapsed()) {
            tokio::task::yield_now().await;
            self.last_yield = Instant::now();
            self.since_yield = 0;
        }
    }

    /// Whether a stream that just moved `n` more bytes has had its turn, with `streams` moving
    /// bulk data and `held` since it last gave its worker back.
    fn turn_is_over(&mut self, n: usize, streams: usize, held: Duration) -> bool {
        self.since_yield += n;
        if streams > self.workers {
            // Over when another chunk like this one would not fit in the share.
            self.since_yield + n > cap_for(streams)
        } else {
            held >= SLICE
        }
    }

    /// Leave the bulk count: the stream turned interactive, or it is about to wait for its
    /// backend (while it waits it competes for no worker, and a desktop that went quiet after
    /// a large update must not count as bulk for hours).
    pub fn pause(&mut self) {
        if self.counted {
            self.counted = false;
            BULK_STREAMS.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Default for Share {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.pause();
    }
}

fn streams() -> usize {
    BULK_STREAMS.load(Ordering::Relaxed)
}

/// The largest chunk a stream should move now, spliced or copied.
pub fn chunk_cap() -> usize {
    cap_for(streams())
}

fn cap_for(streams: usize) -> usize {
    (ROUND_BYTES / streams.max(1)).clamp(BULK_BYTES, MAX_CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_shrink_as_streams_grow() {
        let cap = cap_for;
        assert_eq!(cap(0), MAX_CHUNK);
        assert_eq!(cap(2), MAX_CHUNK);
        assert_eq!(cap(8), 256 * 1024);
        assert_eq!(cap(100), ROUND_BYTES / 100);
        assert_eq!(cap(10_000), BULK_BYTES);
    }

    #[test]
    fn a_crowded_stream_yields_once_it_moved_its_share_of_a_round() {
        let mut share = Share {
            counted: true,
            workers: 2,
            last_yield: Instant::now(),
            since_yield: 0,
        };
        let copied = 64 * 1024 - 4;
        let now = Duration::ZERO;
        // 8 streams: a share of 256 KiB, four copied reads.
        let turns: Vec<bool> = (0..4).map(|_| share.turn_is_over(copied, 8, now)).collect();
        assert_eq!(turns, [false, false, false, true]);
        // 100 streams: a share of 20 KiB, under one read.
        share.since_yield = 0;
        assert!(share.turn_is_over(copied, 100, now));
        // As many streams as workers: the time slice decides.
        share.since_yield = 0;
        assert!(!share.turn_is_over(copied, 2, Duration::ZERO));
        assert!(share.turn_is_over(copied, 2, SLICE));
    }
}
