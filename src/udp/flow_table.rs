//! The UDP flow table: client address -> flow, bounded, with idle expiry.
//!
//! No I/O inside: it is told `now` and returns what to close, so it is
//! tested without sockets. Eviction when full takes the least recently used
//! flow (a clock queue: touching a flow only updates its time; eviction
//! gives recently touched flows a second chance).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

struct Entry<V> {
    value: V,
    last_seen: Instant,
    generation: u64,
}

/// Flows keyed by `K` (the listener and client address), holding `V` (the flow's slot).
pub struct FlowTable<K, V> {
    map: HashMap<K, Entry<V>>,
    queue: VecDeque<(K, u64, Instant)>,
    max: usize,
    timeout: Duration,
    generation: u64,
}

impl<K: Hash + Eq + Copy, V: Copy> FlowTable<K, V> {
    /// A table of at most `max` flows that expire after `timeout` of silence.
    pub fn new(max: usize, timeout: Duration) -> Self {
        FlowTable { map: HashMap::new(), queue: VecDeque::new(), max: max.max(1), timeout, generation: 0 }
    }

    /// The flow for `key`, marking it used at `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        let e = self.map.get_mut(key)?;
        e.last_seen = now;
        Some(e.value)
    }

    /// Marks the flow used at `now` (traffic in the reply direction).
    pub fn touch(&mut self, key: &K, now: Instant) {
        if let Some(e) = self.map.get_mut(key) {
            e.last_seen = now;
        }
    }

    /// Adds a flow. If the table was full, the least recently used flow is
    /// removed and returned, for the caller to close.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> Option<(K, V)> {
        let evicted = if self.map.len() >= self.max && !self.map.contains_key(&key) { self.evict() } else { None };
        self.generation += 1;
        self.map.insert(key, Entry { value, last_seen: now, generation: self.generation });
        self.queue.push_back((key, self.generation, now));
        evicted
    }

    /// True when a new flow would evict one.
    pub fn is_full(&self) -> bool {
        self.map.len() >= self.max
    }

    /// If the table is full, removes and returns the least recently used flow.
    pub fn make_room(&mut self) -> Option<(K, V)> {
        if self.is_full() { self.evict() } else { None }
    }

    /// New bounds (a reload): flows over a lower `max` stay until they
    /// expire or a new flow evicts one.
    pub fn set_limits(&mut self, max: usize, timeout: Duration) {
        (self.max, self.timeout) = (max.max(1), timeout);
    }

    /// Removes every flow silent for the timeout, calling `f` on each.
    pub fn expire(&mut self, now: Instant, f: impl FnMut(K, V)) {
        let timeout = self.timeout;
        self.remove_where(|_, last_seen| now.saturating_duration_since(last_seen) >= timeout, f);
    }

    /// Removes every flow whose key (and last use) `gone` picks, calling
    /// `f` on each.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&K, Instant) -> bool, mut f: impl FnMut(K, V)) {
        self.map.retain(|k, e| {
            let keep = !gone(k, e.last_seen);
            if !keep {
                f(*k, e.value);
            }
            keep
        });
        // Forget queue entries of removed flows so the queue stays bounded.
        let map = &self.map;
        self.queue.retain(|(k, g, _)| map.get(k).is_some_and(|e| e.generation == *g));
    }

    /// How many flows there are.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when there is no flow.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn evict(&mut self) -> Option<(K, V)> {
        while let Some((key, generation, stamp)) = self.queue.pop_front() {
            let Some(e) = self.map.get(&key) else { continue };
            if e.generation != generation {
                continue;
            }
            if e.last_seen > stamp {
                // Used since it was queued: second chance.
                let seen = e.last_seen;
                self.queue.push_back((key, generation, seen));
                continue;
            }
            return self.map.remove(&key).map(|e| (key, e.value));
        }
        None
    }
}

/// Local ports of recently closed flow sockets, held back from new flows.
///
/// A backend reply that comes after its flow was closed is addressed to the
/// old socket's port. If a new flow socket (connected to the same backend)
/// were given that port, the kernel would hand it the reply, and the relay
/// would send it to the wrong client. So a new flow socket whose port is
/// held is set aside and another is made (ARCHITECTURE.md, UDP).
pub(crate) struct PortHold {
    held: HashMap<u16, Instant>,
    order: VecDeque<(u16, Instant)>,
    hold: Duration,
}

impl PortHold {
    /// Holds each released port for `hold`.
    pub(crate) fn new(hold: Duration) -> Self {
        PortHold { held: HashMap::new(), order: VecDeque::new(), hold }
    }

    /// `port`'s socket was closed at `now`.
    pub(crate) fn release(&mut self, port: u16, now: Instant) {
        self.held.insert(port, now);
        self.order.push_back((port, now));
        // A port released again leaves a stale entry behind; at most one per
        // port and release, so this bounds the queue without losing holds.
        if self.order.len() > 2 * (u16::MAX as usize + 1) {
            self.order.pop_front();
        }
    }

    /// True if `port` was released less than the hold ago.
    pub(crate) fn is_held(&mut self, port: u16, now: Instant) -> bool {
        while let Some(&(p, at)) = self.order.front() {
            if now.saturating_duration_since(at) < self.hold {
                break;
            }
            self.order.pop_front();
            if self.held.get(&p) == Some(&at) {
                self.held.remove(&p);
            }
        }
        self.held.contains_key(&port)
    }

    /// How many ports are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn full_table_evicts_the_least_recently_used() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(3, Duration::from_secs(90));
        assert_eq!(t.insert('a', 1, secs(t0, 1)), None);
        assert_eq!(t.insert('b', 2, secs(t0, 2)), None);
        assert_eq!(t.insert('c', 3, secs(t0, 3)), None);
        assert_eq!(t.get(&'a', secs(t0, 4)), Some(1));
        assert_eq!(t.insert('d', 4, secs(t0, 5)), Some(('b', 2)));
        t.touch(&'c', secs(t0, 6));
        assert_eq!(t.insert('e', 5, secs(t0, 7)), Some(('a', 1)));
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(&'b', secs(t0, 8)), None);
    }

    #[test]
    fn silent_flows_expire_and_traffic_either_way_refreshes() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(10, Duration::from_secs(90));
        t.insert(1, 'x', t0);
        t.insert(2, 'y', t0);
        t.touch(&2, secs(t0, 60));
        let mut gone = Vec::new();
        t.expire(secs(t0, 100), |k, v| gone.push((k, v)));
        assert_eq!(gone, vec![(1, 'x')]);
        assert_eq!(t.get(&2, secs(t0, 100)), Some('y'));
        t.expire(secs(t0, 189), |_, _| panic!("refreshed at 100"));
        t.expire(secs(t0, 190), |k, _| assert_eq!(k, 2));
        assert!(t.is_empty());
    }

    #[test]
    fn a_flood_of_new_sources_stays_within_the_bound() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(100, Duration::from_secs(90));
        let mut evicted = 0;
        for i in 0..100_000u32 {
            if t.insert(i, i, t0 + Duration::from_millis(i as u64)).is_some() {
                evicted += 1;
            }
            assert!(t.len() <= 100);
            assert!(t.queue.len() <= 200);
        }
        assert_eq!(evicted, 100_000 - 100);
        t.expire(secs(t0, 10_000), |_, _| {});
        assert!(t.is_empty() && t.queue.is_empty());
    }

    #[test]
    fn released_ports_are_held_for_the_hold_and_no_longer() {
        let t0 = Instant::now();
        let mut h = PortHold::new(Duration::from_secs(10));
        h.release(40000, t0);
        h.release(40001, secs(t0, 5));
        assert!(h.is_held(40000, secs(t0, 9)));
        assert!(!h.is_held(40002, secs(t0, 9)));
        assert!(!h.is_held(40000, secs(t0, 10)));
        assert!(h.is_held(40001, secs(t0, 14)));
        // Released again: held from the later release.
        h.release(40001, secs(t0, 14));
        assert!(h.is_held(40001, secs(t0, 20)));
        assert!(!h.is_held(40001, secs(t0, 24)));
        assert_eq!(h.len(), 0);
        for p in 0..=u16::MAX {
            h.release(p, secs(t0, 30));
            h.release(p, secs(t0, 31));
        }
        assert!(h.order.len() <= 2 * 65536 && h.len() == 65536);
    }

    #[test]
    fn reinserted_keys_do_not_confuse_the_queue() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(2, Duration::from_secs(90));
        // 'a' is inserted again under a new generation: its old queue entry
        // is stale and must be skipped, the new one counts.
        t.insert('a', 1, t0);
        t.insert('a', 2, secs(t0, 5));
        t.insert('b', 3, secs(t0, 6));
        assert_eq!(t.insert('c', 4, secs(t0, 7)), Some(('a', 2)));
        assert_eq!(t.len(), 2);
    }
}
