//! What the TCP, UDP and metrics handlers share with the event loop: poll
//! tokens that name a socket and cannot go stale, and the context each
//! handler is given ([`Ctx`]: the registry, the deadlines, the time).

use std::time::Instant;

use mio::{Registry, Token};

use crate::slab::{GENERATION_BITS, Key};
use crate::timer::Timers;

/// What a token points at; the low three bits of every token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A TCP listener (index into the listeners).
    Listener = 0,
    /// A connection's client socket (slab key).
    Client = 1,
    /// A connection's backend socket (slab key).
    Backend = 2,
    /// A UDP listening socket (index).
    UdpListener = 3,
    /// A UDP flow's socket to the backend (slab key).
    UdpFlow = 4,
    /// The signalfd.
    Signal = 5,
    /// The metrics HTTP listener.
    Metrics = 6,
    /// A metrics HTTP client (slab key).
    MetricsConn = 7,
}

const KIND_BITS: u32 = 3;
const INDEX_BITS: u32 = 32;
const _: () = assert!(usize::BITS >= KIND_BITS + INDEX_BITS + GENERATION_BITS, "tokens need a 64-bit usize");

/// The token for `key` of `kind`: kind, slot index and generation, so an
/// event for a closed socket whose slot was taken again in the same poll
/// batch names the old generation and is dropped (ARCHITECTURE.md, "Tokens").
pub(crate) fn token(kind: Kind, key: Key) -> Token {
    let t =
        (key.generation() as usize) << (KIND_BITS + INDEX_BITS) | (key.index() as usize) << KIND_BITS | kind as usize;
    Token(t)
}

/// The token of a socket that is never reused (a listener, the signalfd).
pub(crate) fn fixed_token(kind: Kind, index: usize) -> Token {
    token(kind, Key::from_parts(index as u32, 0))
}

/// Splits a token into its kind and key.
pub(crate) fn untoken(t: Token) -> (Kind, Key) {
    let kind = match t.0 & ((1 << KIND_BITS) - 1) {
        0 => Kind::Listener,
        1 => Kind::Client,
        2 => Kind::Backend,
        3 => Kind::UdpListener,
        4 => Kind::UdpFlow,
        5 => Kind::Signal,
        6 => Kind::Metrics,
        _ => Kind::MetricsConn,
    };
    let index = (t.0 >> KIND_BITS) as u32;
    let generation = (t.0 >> (KIND_BITS + INDEX_BITS)) as u32;
    (kind, Key::from_parts(index, generation))
}

/// What every handler needs from the loop: where to register, when it is,
/// and where to put deadlines.
pub(crate) struct Ctx<'a> {
    /// The poll's registry.
    pub(crate) registry: &'a Registry,
    /// Pending deadlines.
    pub(crate) timers: &'a mut Timers,
    /// The time the current wake-up started.
    pub(crate) now: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::Slab;

    #[test]
    fn tokens_round_trip_kind_index_and_generation() {
        let kinds = [
            Kind::Listener,
            Kind::Client,
            Kind::Backend,
            Kind::UdpListener,
            Kind::UdpFlow,
            Kind::Signal,
            Kind::Metrics,
            Kind::MetricsConn,
        ];
        for kind in kinds {
            for (index, generation) in [(0, 0), (1, 1), (u32::MAX, (1 << GENERATION_BITS) - 1), (77, 12345)] {
                let key = Key::from_parts(index, generation);
                assert_eq!(untoken(token(kind, key)), (kind, key));
            }
        }
    }

    #[test]
    fn an_event_for_a_closed_socket_misses_the_slot_reused_in_the_same_batch() {
        // A connection is registered, its event is queued in a poll batch,
        // then it closes and an accept in the same batch takes its slot.
        let mut conns = Slab::default();
        let old = conns.insert("first connection");
        let queued_event = token(Kind::Backend, old);
        conns.remove(old);
        let new = conns.insert("second connection");
        assert_eq!(new.index(), old.index(), "the slot is reused");
        let (kind, key) = untoken(queued_event);
        assert_eq!(kind, Kind::Backend);
        assert_eq!(conns.get(key), None, "the stale event must not reach the new connection");
        assert_eq!(conns.get(untoken(token(Kind::Backend, new)).1), Some(&"second connection"));
    }
}
