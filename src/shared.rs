//! What the event loops of one process share (ARCHITECTURE.md, "Threads"):
//! stop and drain requests, the global limits, and each loop's published
//! statistics. Nothing here is touched per byte or per datagram: the limits
//! only at accept and close (and only when set), the statistics once a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::reload::Plan;
use crate::udp::flow_table::PortHold;

/// A counter with an optional bound: `reserve` takes one unless the bound is
/// reached, `release` gives one back. It always counts, so a bound set by a
/// reload is exact at once.
pub(crate) struct Bounded {
    /// The bound (0: none); a reload may change it.
    max: AtomicUsize,
    used: AtomicUsize,
}

impl Bounded {
    /// A counter bounded by `max` (0: no bound).
    pub(crate) fn new(max: usize) -> Self {
        Bounded { max: AtomicUsize::new(max), used: AtomicUsize::new(0) }
    }

    /// Sets the bound (0: none); what is taken stays taken.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    /// True when a bound is set.
    pub(crate) fn is_bounded(&self) -> bool {
        self.max.load(Ordering::Acquire) != 0
    }

    /// Takes one unit; false when the bound is reached (nothing taken).
    pub(crate) fn reserve(&self) -> bool {
        let max = self.max.load(Ordering::Acquire);
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1)).is_ok()
    }

    /// Gives back a unit taken by `reserve`.
    pub(crate) fn release(&self) {
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// True when the bound is reached.
    pub(crate) fn full(&self) -> bool {
        let max = self.max.load(Ordering::Acquire);
        max != 0 && self.used.load(Ordering::Acquire) >= max
    }
}

/// Open connections per client address, for `--max-connections-per-source`,
/// over every loop; untouched when no such limit is set.
pub(crate) struct Sources {
    /// The limit (0: none); a reload may change it.
    max: AtomicUsize,
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl Sources {
    /// Sources limited to `max` connections each (0: no limit).
    pub(crate) fn new(max: usize) -> Self {
        Sources { max: AtomicUsize::new(max), open: Mutex::new(HashMap::new()) }
    }

    /// The limit (0: none).
    pub(crate) fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Sets the limit for connections admitted from now on (0: none). A
    /// connection admitted while no limit was set is not counted.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    /// Counts one more connection from `ip`, unless it is at the limit.
    /// `Some(true)`: admitted and counted (release it later); `Some(false)`:
    /// admitted, no limit set, nothing counted; `None`: refused.
    pub(crate) fn admit(&self, ip: IpAddr) -> Option<bool> {
        let max = self.max();
        if max == 0 {
            return Some(false);
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n as usize >= max {
            if *n == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(true)
    }

    /// Counts one connection from `ip` fewer.
    pub(crate) fn release(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

/// One loop's statistics as it last published them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Published {
    /// Every statistic of the loop.
    pub(crate) snapshot: crate::metrics::Snapshot,
    /// TCP connections open in that loop.
    pub(crate) open: u64,
    /// TCP connections that loop accepted since start.
    pub(crate) accepted: u64,
    /// Its listener wake-ups that found nothing to accept.
    pub(crate) idle_wakeups: u64,
}

/// Loop `me`'s share of `--udp-max-flows` among `n` loops: the bound split
/// as evenly as it goes, at least one flow per loop. Each loop closes its
/// own least recently used flow when it is at its share, so the flows of
/// all loops stay within the bound whenever it is at least `n`.
pub(crate) fn flow_share(max_flows: usize, n: usize, me: usize) -> usize {
    let n = n.max(1);
    (max_flows / n + usize::from(me < max_flows % n)).max(1)
}

/// Everything the loops share.
pub(crate) struct Shared {
    /// Exit now: reset what is open.
    pub(crate) stop: AtomicBool,
    /// Stop accepting and let open connections finish.
    pub(crate) drain: AtomicBool,
    /// One waker per loop, to make it look at `stop`, `drain` and its limits.
    pub(crate) wakers: Vec<mio::Waker>,
    /// Loops still running.
    pub(crate) running: AtomicUsize,
    /// `--max-connections`, over every loop.
    pub(crate) connections: Bounded,
    /// Loops waiting for `connections` to fall below its bound.
    pub(crate) blocked: Vec<AtomicBool>,
    /// `--max-connections-per-source`, over every loop.
    pub(crate) sources: Sources,
    /// Each loop's statistics, published once a second and at its end.
    pub(crate) published: Vec<Mutex<Published>>,
    /// Local ports of recently closed UDP flow sockets, over every loop.
    ports: Mutex<PortHold>,
    /// Each loop's part of a reload, handed over by loop 0.
    plans: Vec<Mutex<Option<Plan>>>,
    /// Set when a loop's plan is waiting (checked every iteration).
    plan_ready: Vec<AtomicBool>,
    /// Plans handed out and not applied yet: loop 0 says a reload is done
    /// only once every loop has applied its part.
    plans_out: AtomicUsize,
}

impl Shared {
    /// Shared state for loops woken by `wakers`.
    pub(crate) fn new(wakers: Vec<mio::Waker>, max_connections: usize, max_per_source: usize) -> Self {
        let n = wakers.len();
        Shared {
            stop: AtomicBool::new(false),
            drain: AtomicBool::new(false),
            running: AtomicUsize::new(n),
            connections: Bounded::new(max_connections),
            blocked: (0..n).map(|_| AtomicBool::new(false)).collect(),
            sources: Sources::new(max_per_source),
            published: (0..n).map(|_| Mutex::new(Published::default())).collect(),
            ports: Mutex::new(PortHold::new(crate::udp::PORT_HOLD)),
            plans: (0..n).map(|_| Mutex::new(None)).collect(),
            plan_ready: (0..n).map(|_| AtomicBool::new(false)).collect(),
            plans_out: AtomicUsize::new(0),
            wakers,
        }
    }

    /// The held UDP flow ports (a lock, taken when a flow opens or closes).
    pub(crate) fn held_ports(&self) -> std::sync::MutexGuard<'_, PortHold> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands loop `me` its part of a reload, and wakes it.
    pub(crate) fn give_plan(&self, me: usize, plan: Plan) {
        *self.plans[me].lock().unwrap_or_else(|e| e.into_inner()) = Some(plan);
        self.plans_out.fetch_add(1, Ordering::AcqRel);
        self.plan_ready[me].store(true, Ordering::Release);
        let _ = self.wakers[me].wake();
    }

    /// Loop `me`'s part of a reload, if one is waiting.
    pub(crate) fn take_plan(&self, me: usize) -> Option<Plan> {
        // A plain load first: this runs every loop iteration.
        if !self.plan_ready[me].load(Ordering::Acquire) || !self.plan_ready[me].swap(false, Ordering::AcqRel) {
            return None;
        }
        self.plans[me].lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Loop `me` applied its plan: wakes loop 0, which waits for all of them.
    pub(crate) fn plan_applied(&self) {
        self.plans_out.fetch_sub(1, Ordering::AcqRel);
        let _ = self.wakers[0].wake();
    }

    /// True while some loop has a plan it has not applied.
    pub(crate) fn plans_out(&self) -> bool {
        self.plans_out.load(Ordering::Acquire) > 0
    }

    /// How many loops there are.
    pub(crate) fn threads(&self) -> usize {
        self.wakers.len()
    }

    /// Wakes every loop but `me`.
    pub(crate) fn wake_others(&self, me: usize) {
        for (i, w) in self.wakers.iter().enumerate() {
            if i != me {
                let _ = w.wake();
            }
        }
    }

    /// A connection closed: wakes a loop waiting on `--max-connections`.
    pub(crate) fn release_connection(&self) {
        self.connections.release();
        if !self.connections.is_bounded() {
            return;
        }
        for (i, b) in self.blocked.iter().enumerate() {
            if b.load(Ordering::Acquire) {
                let _ = self.wakers[i].wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_is_exact_and_no_bound_counts_nothing() {
        let b = Bounded::new(2);
        assert!(b.reserve() && b.reserve());
        assert!(!b.reserve() && b.full());
        b.release();
        assert!(!b.full() && b.reserve());
        let none = Bounded::new(0);
        for _ in 0..10 {
            assert!(none.reserve());
        }
        assert!(!none.full());
        // A bound set later (a reload) counts what was taken before it.
        none.set_max(10);
        assert!(none.full() && !none.reserve());
        none.release();
        assert!(none.reserve());
        let b = Bounded::new(1);
        b.release();
        assert!(b.reserve() && !b.reserve(), "a release below zero must not create room");
    }

    #[test]
    fn flow_shares_add_up_to_the_bound() {
        for (max, n) in [(4096, 1), (4096, 3), (8, 4), (10, 4), (5, 8), (usize::MAX, 7)] {
            let shares: Vec<usize> = (0..n).map(|me| flow_share(max, n, me)).collect();
            assert!(shares.iter().all(|&s| s >= 1));
            if max >= n {
                assert_eq!(shares.iter().fold(0usize, |a, &s| a.saturating_add(s)), max, "{max} over {n}");
            }
        }
        assert_eq!(flow_share(4096, 1, 0), 4096);
    }

    #[test]
    fn sources_count_per_address() {
        let s = Sources::new(1);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!((s.admit(a), s.admit(b)), (Some(true), Some(true)));
        assert_eq!(s.admit(a), None);
        s.release(a);
        assert_eq!(s.admit(a), Some(true));
        assert_eq!(Sources::new(0).admit(a), Some(false));
    }
}
