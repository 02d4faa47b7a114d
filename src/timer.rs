//! Deadlines for the event loop: a min-heap of (when, what), checked lazily.
//!
//! Entries are never cancelled: the owner of an entry checks, when it fires,
//! whether it still applies (a connection compares its id, and reschedules
//! itself if its real deadline moved later).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::slab::Key;

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// A TCP connection's next deadline (header, connect, idle, half-close);
    /// the key's generation makes it miss a connection that took the slot later.
    Conn(Key),
    /// A listener paused after EMFILE/ENFILE/ENOBUFS/ENOMEM may accept again.
    Listener(Key),
    /// A listener retired by a reload has drained for `--drain-timeout`.
    Retired(Key),
    /// A UDP listener retired by a reload has drained for `--drain-timeout`.
    UdpRetired(Key),
    /// Idle UDP flows are expired.
    UdpSweep,
    /// The drain after SIGTERM is over.
    Drain,
    /// The periodic statistics line is due.
    Stats,
    /// A loop other than loop 0 publishes its statistics.
    Publish,
    /// A metrics client's deadline (request head or response); the key's
    /// generation makes it miss a client that took the slot later.
    Metrics(Key),
}

/// Pending deadlines, soonest first.
#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
}

impl Timers {
    /// Schedules `timer` at `when`.
    pub fn add(&mut self, when: Instant, timer: Timer) {
        self.heap.push(Reverse((when, timer)));
    }

    /// How long until the soonest deadline, from `now` (zero if one is due).
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.heap.peek().map(|Reverse((when, _))| when.saturating_duration_since(now))
    }

    /// Removes and returns one deadline that is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        match self.heap.peek() {
            Some(Reverse((when, _))) if *when <= now => self.heap.pop().map(|Reverse((_, t))| t),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_come_out_soonest_first() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.add(t0 + Duration::from_secs(2), Timer::Drain);
        timers.add(t0 + Duration::from_secs(1), Timer::Listener(Key::from_parts(3, 0)));
        timers.add(t0 + Duration::from_secs(5), Timer::UdpSweep);
        assert_eq!(timers.next_timeout(t0), Some(Duration::from_secs(1)));
        assert_eq!(timers.pop_due(t0), None);
        let t3 = t0 + Duration::from_secs(3);
        assert_eq!(timers.pop_due(t3), Some(Timer::Listener(Key::from_parts(3, 0))));
        assert_eq!(timers.pop_due(t3), Some(Timer::Drain));
        assert_eq!(timers.pop_due(t3), None);
        assert_eq!(timers.next_timeout(t3), Some(Duration::from_secs(2)));
        assert_eq!(timers.heap.len(), 1);
    }
}
