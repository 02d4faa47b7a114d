//! One relayed TCP connection, its whole life in one place.
//!
//! ```text
//!  accept ──> Identifying ──header read (accept-proxy), source admitted──> Connecting
//!                                                                            │ first writable edge,
//!                                                                            v no socket error
//!  clean close <── both directions forwarded their FIN <────────────────── Relaying
//! ```
//!
//! Any state ends in a reset of both sockets on an error, a refusal or a
//! deadline. Each [`State`] holds only what it needs: there is no backend
//! socket before the client is identified, and no directions (nor pipes)
//! before the backend is connected. [`Connection::drive`] moves the
//! connection as far as its readiness allows and says what is next
//! ([`Progress`]); the relay (`tcp/mod.rs`) owns the slab, the listeners'
//! counters and the timers, and logs why a connection ended ([`Why`]).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry};

use super::direction::{DirState, Direction, Side};
use super::pipe_pool::PipePool;
use crate::config::Transparent;
use crate::proxy_protocol::{self as pp, Transport, Version};
use crate::reactor::{Kind, token};
use crate::shared::Sources;
use crate::slab::Key;
use crate::stats::TcpStats;
use crate::sys;
use crate::transparent::{self, Source};

/// Bytes all TCP turns of one loop iteration may read together, shared
/// among the connections that used up their turn last time (ARCHITECTURE.md,
/// "Fairness"): one busy connection reads up to [`TURN_MAX`] per direction
/// per turn, many share this, so an iteration, and with it the wait of a
/// small flow beside bulk ones, stays short whatever the number of flows.
pub(crate) const ITERATION_BUDGET: usize = 16 << 20;
/// The most one direction reads in one turn. Measured (bench-peers `fair`,
/// two-way bulk): 256 KiB per turn cost 0.39-0.41 relay CPU s/GB, 4 MiB
/// 0.26-0.28, at the same probe latencies with one or two bulk flows.
pub(crate) const TURN_MAX: usize = 4 << 20;
/// The least one direction reads in a turn, however many share the iteration.
pub(crate) const TURN_MIN: usize = 256 << 10;

/// The per-direction budget of a turn when `busy` connections used up
/// their turn in the last iteration.
pub(crate) fn turn_budget(busy: usize) -> usize {
    (ITERATION_BUDGET / (2 * busy.max(1))).clamp(TURN_MIN, TURN_MAX)
}

/// The longest PROXY header accepted from a client.
pub(crate) const MAX_HEADER_IN: usize = 1024;
/// Every socket of a connection is registered once, for all of these.
pub(crate) const INTEREST: Interest = Interest::READABLE.add(Interest::WRITABLE).add(Interest::PRIORITY);

/// Timeouts applied to every connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Bound on the backend connect.
    pub connect: Duration,
    /// Close a connection with no traffic for this long (None: never).
    pub idle: Option<Duration>,
    /// Close a half-closed connection with no traffic for this long (None: never).
    pub half_close: Option<Duration>,
    /// Bound on reading a client's PROXY header.
    pub header: Duration,
}

/// Where a listener's connections go, and how.
pub(crate) struct Route {
    /// The backend.
    pub(crate) target: SocketAddr,
    /// Write a PROXY header of this version to the backend first.
    pub(crate) send_proxy: Option<Version>,
    /// Read a PROXY header from the client before anything else.
    pub(crate) accept_proxy: bool,
    /// Connect from the client's address (ARCHITECTURE.md, "Transparent").
    pub(crate) transparent: Option<Transparent>,
    /// Which sources may connect (on accept-proxy forwards, the header's).
    pub(crate) access: crate::cidr::Access,
}

/// What [`Connection::drive`] needs from the relay.
pub(crate) struct Env<'a> {
    /// Pipes and copy buffers.
    pub(crate) pool: &'a mut PipePool,
    /// To register the backend socket.
    pub(crate) registry: &'a Registry,
    /// The connection's slab key, for the backend socket's token.
    pub(crate) key: Key,
    /// The listener's forward.
    pub(crate) route: &'a Route,
    /// The per-source limit.
    pub(crate) sources: &'a Sources,
    /// The listener's counters (transparent connects and fallbacks).
    pub(crate) stats: &'a mut TcpStats,
    /// The listener's cross-family fallback was logged already.
    pub(crate) fallback_logged: &'a mut bool,
    /// Copy through user memory instead of splicing.
    pub(crate) splice: bool,
    /// Bytes each direction may read this turn (see [`turn_budget`]).
    pub(crate) budget: usize,
    /// The time of this wake-up.
    pub(crate) now: Instant,
}

/// What a call to [`Connection::drive`] leaves behind.
#[derive(Debug)]
pub(crate) enum Progress {
    /// Nothing more until an event or a deadline.
    Waiting,
    /// The turn's budget ran out with work left: run again after the others.
    Yielded,
    /// The connection is over; the relay removes it.
    Closed(End),
}

/// How a connection ends.
#[derive(Debug)]
pub(crate) enum End {
    /// Both directions forwarded their EOF: a clean close.
    Done,
    /// Both sockets are reset, for this reason.
    Reset(Why),
}

/// Why a connection was reset.
#[derive(Debug)]
pub(crate) enum Why {
    /// The client's PROXY header was malformed, too long, or never complete.
    BadHeader(io::Error),
    /// The client's address already has `--max-connections-per-source` connections.
    SourceLimit,
    /// The address in the client's PROXY header is not allowed (access lists).
    Denied,
    /// The backend socket could not be made or registered.
    CannotConnect(io::Error),
    /// The backend refused or could not be reached.
    Unreachable(io::Error),
    /// A socket failed or was reset (by the client, or by the backend,
    /// which may have accepted first).
    Aborted(io::Error),
    /// `--proxy-header-timeout` passed without a complete header.
    HeaderTimeout,
    /// `--connect-timeout` passed during the backend connect.
    ConnectTimeout,
    /// `--idle-timeout` passed without traffic.
    Idle,
    /// `--half-close-timeout` passed without traffic after one side finished.
    HalfClosedIdle,
    /// The relay is exiting with the connection still open.
    Shutdown,
}

/// Where a connection is in its life; each state holds what it needs.
enum State {
    /// Accepted. On accept-proxy forwards the client's PROXY header is read
    /// first; then the source limit is checked and the connect starts.
    Identifying,
    /// The backend connect is in progress.
    Connecting { backend: Side },
    /// Bytes flow both ways.
    Relaying(Box<Relaying>),
}

/// A connected connection's sockets and directions.
struct Relaying {
    backend: Side,
    /// A PROXY header still to be written before any payload.
    header: Option<HeaderOut>,
    /// Client -> backend.
    up: Direction,
    /// Backend -> client.
    down: Direction,
}

/// A header waiting to be written to the backend.
struct HeaderOut {
    bytes: [u8; pp::MAX_ENCODED_LEN],
    /// Bytes already written.
    sent: usize,
    len: usize,
}

/// A relayed connection.
pub(crate) struct Connection {
    /// The listener (and so the forward) it came through.
    pub(crate) listener: Key,
    /// The client's address (from its PROXY header on accept-proxy forwards).
    pub(crate) peer: SocketAddr,
    /// The address the client connected to.
    local: SocketAddr,
    /// The address counted against the per-source limit, once admitted.
    pub(crate) source: Option<IpAddr>,
    client: Side,
    state: State,
    /// When the current wait (header, connect) began.
    since: Instant,
    /// The last time bytes moved.
    last_active: Instant,
    /// The backend socket was bound to the client's address.
    pub(crate) spoofed: bool,
    /// The soonest deadline a timer is already set for.
    pub(crate) timer_at: Option<Instant>,
    /// On the relay's ready list: its next turn is already due.
    pub(crate) queued: bool,
}

impl Connection {
    /// A freshly accepted client; `drive` takes it from here.
    pub(crate) fn new(listener: Key, client: TcpStream, peer: SocketAddr, local: SocketAddr, now: Instant) -> Self {
        Connection {
            listener,
            peer,
            local,
            source: None,
            client: Side::new(client),
            state: State::Identifying,
            since: now,
            last_active: now,
            spoofed: false,
            timer_at: None,
            queued: false,
        }
    }

    /// Registers the client socket under `key`.
    pub(crate) fn register(&mut self, registry: &Registry, key: Key) -> io::Result<()> {
        registry.register(&mut self.client.sock, token(Kind::Client, key), INTEREST)
    }

    /// Records an event on the client (`backend` false) or backend socket.
    pub(crate) fn note(&mut self, backend: bool, ev: &mio::event::Event) {
        let side = match (&mut self.state, backend) {
            (_, false) => &mut self.client,
            (State::Connecting { backend }, true) => backend,
            (State::Relaying(r), true) => &mut r.backend,
            (State::Identifying, true) => return,
        };
        side.note(ev);
    }

    /// Moves the connection as far as its readiness allows.
    pub(crate) fn drive(&mut self, env: &mut Env<'_>) -> Progress {
        if let State::Identifying = self.state {
            if env.route.accept_proxy {
                match self.read_proxy_header() {
                    Ok(true) => {}
                    Ok(false) => return Progress::Waiting,
                    Err(e) => return Progress::Closed(End::Reset(Why::BadHeader(e))),
                }
                if !env.route.access.admits(self.peer.ip()) {
                    return Progress::Closed(End::Reset(Why::Denied));
                }
            }
            match env.sources.admit(self.peer.ip()) {
                None => return Progress::Closed(End::Reset(Why::SourceLimit)),
                Some(counted) => self.source = counted.then_some(self.peer.ip()),
            }
            let from = match transparent::source(env.route.transparent, self.peer, env.route.target, false) {
                Source::Client(from) => Some(from),
                Source::Own => None,
                Source::Loopback => {
                    log::debug!("{}: a loopback client; connecting from the relay's own address", self.peer);
                    None
                }
                Source::OtherFamily => {
                    env.stats.transparent_fallbacks += 1;
                    if !std::mem::replace(env.fallback_logged, true) {
                        log::warn!(
                            "{} -> {}: no transparent connect across address families; this forward's such \
                             clients connect from the relay's own address (counted as transparent fallbacks; \
                             logged once)",
                            self.peer,
                            env.route.target
                        );
                    }
                    None
                }
            };
            self.spoofed = from.is_some();
            match start_connect(env, from) {
                Ok(backend) => {
                    env.stats.transparent += u64::from(self.spoofed);
                    self.since = env.now;
                    self.state = State::Connecting { backend };
                }
                Err(e) => return Progress::Closed(End::Reset(Why::CannotConnect(e))),
            }
        }
        if let State::Connecting { backend } = &mut self.state {
            if !backend.writable {
                return Progress::Waiting;
            }
            if let Err(e) = check_connected(backend) {
                return Progress::Closed(End::Reset(connect_error(e)));
            }
            let header = env.route.send_proxy.map(|v| {
                let mut h = HeaderOut { bytes: [0; pp::MAX_ENCODED_LEN], sent: 0, len: 0 };
                h.len = pp::encode(v, Transport::Stream, self.peer, self.local, &mut h.bytes);
                h
            });
            self.state = match std::mem::replace(&mut self.state, State::Identifying) {
                State::Connecting { backend } => {
                    let (up, down) = (Direction::new(env.splice), Direction::new(env.splice));
                    State::Relaying(Box::new(Relaying { backend, header, up, down }))
                }
                other => other,
            };
            self.last_active = env.now;
        }
        let State::Relaying(r) = &mut self.state else { return Progress::Waiting };
        match r.pump(&mut self.client, env.pool, env.budget) {
            Ok((moved, more)) => {
                if moved > 0 {
                    self.last_active = env.now;
                }
                if r.up.state() == DirState::WriteShut && r.down.state() == DirState::WriteShut {
                    Progress::Closed(End::Done)
                } else if more {
                    Progress::Yielded
                } else {
                    Progress::Waiting
                }
            }
            Err(e) => Progress::Closed(End::Reset(Why::Aborted(e))),
        }
    }

    /// The next instant a deadline must be checked, given the timeouts.
    pub(crate) fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        let state_bound = match &self.state {
            State::Identifying => Some(self.since + t.header),
            State::Connecting { .. } => Some(self.since + t.connect),
            State::Relaying(_) => None,
        };
        let idle = t.idle.map(|i| self.last_active + i);
        let half = t.half_close.filter(|_| self.half_closed()).map(|h| self.last_active + h);
        [state_bound, idle, half].into_iter().flatten().min()
    }

    /// Which deadline has passed at `now`, if any.
    pub(crate) fn expired(&self, t: &Timeouts, now: Instant) -> Option<Why> {
        let passed = |d: Instant| d <= now;
        match &self.state {
            State::Identifying if passed(self.since + t.header) => return Some(Why::HeaderTimeout),
            State::Connecting { .. } if passed(self.since + t.connect) => return Some(Why::ConnectTimeout),
            _ => {}
        }
        if t.idle.is_some_and(|i| passed(self.last_active + i)) {
            return Some(Why::Idle);
        }
        if self.half_closed() && t.half_close.is_some_and(|h| passed(self.last_active + h)) {
            return Some(Why::HalfClosedIdle);
        }
        None
    }

    /// True once exactly one direction has forwarded its FIN.
    fn half_closed(&self) -> bool {
        match &self.state {
            State::Relaying(r) => (r.up.state() == DirState::WriteShut) != (r.down.state() == DirState::WriteShut),
            _ => false,
        }
    }

    /// Bytes delivered so far, (client -> backend, backend -> client).
    pub(crate) fn bytes(&self) -> (u64, u64) {
        match &self.state {
            State::Relaying(r) => (r.up.bytes, r.down.bytes),
            _ => (0, 0),
        }
    }

    /// Releases the pipes and, for a reset, makes every socket send a reset
    /// when it is dropped (SO_LINGER {1, 0}) instead of a FIN.
    pub(crate) fn close(self, pool: &mut PipePool, reset: bool) {
        let backend = match self.state {
            State::Identifying => None,
            State::Connecting { backend } => Some(backend),
            State::Relaying(mut r) => {
                r.up.release(pool);
                r.down.release(pool);
                Some(r.backend)
            }
        };
        if reset {
            sys::set_linger_zero(self.client.sock.as_fd());
            if let Some(b) = &backend {
                sys::set_linger_zero(b.sock.as_fd());
            }
        }
    }

    /// Reads the client's PROXY header: `Ok(true)` once consumed, `Ok(false)`
    /// while more bytes are needed. The addresses it carries replace the socket's.
    fn read_proxy_header(&mut self) -> io::Result<bool> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        if !self.client.readable {
            return Ok(false);
        }
        let mut buf = [0u8; MAX_HEADER_IN];
        let n = match self.client.sock.peek(&mut buf) {
            Ok(0) => return Err(invalid("connection closed before the header".into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.client.readable = false;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if let Some(len) = pp::announced_len(&buf[..n]).filter(|&len| len > MAX_HEADER_IN) {
            return Err(invalid(format!("v2 header of {len} bytes is over the {MAX_HEADER_IN}-byte bound")));
        }
        let header = match pp::parse(&buf[..n]) {
            Ok(Some(h)) => h,
            Ok(None) if n < MAX_HEADER_IN => {
                // The rest has not arrived: wait for the next edge.
                self.client.readable = false;
                return Ok(false);
            }
            Ok(None) => return Err(invalid(format!("longer than {MAX_HEADER_IN} bytes"))),
            Err(e) => return Err(invalid(e.to_string())),
        };
        (&self.client.sock).read_exact(&mut buf[..header.len])?;
        if let pp::Addresses::Proxied { src, dst, .. } = header.addresses {
            log::debug!("{}: PROXY header says the client is {src}", self.peer);
            self.peer = crate::unmap(src);
            self.local = crate::unmap(dst);
        }
        Ok(true)
    }
}

impl Relaying {
    /// Moves bytes both ways within the turn's budget: (bytes delivered,
    /// budget ran out with work left).
    fn pump(&mut self, client: &mut Side, pool: &mut PipePool, budget: usize) -> io::Result<(usize, bool)> {
        if !self.flush_header()? {
            // Payload waits behind the header; backend -> client may still flow.
            let down = self.down.pump(&mut self.backend, client, pool, budget, false)?;
            return Ok((down.moved, down.more));
        }
        // The direction that finishes second leaves its FIN to the close.
        let shut = |d: &Direction| d.state() == DirState::WriteShut;
        let last = shut(&self.down);
        let up = self.up.pump(client, &mut self.backend, pool, budget, last)?;
        let last = shut(&self.up);
        let down = self.down.pump(&mut self.backend, client, pool, budget, last)?;
        Ok((up.moved + down.moved, up.more || down.more))
    }

    /// Writes what is left of the PROXY header; true once none is left.
    fn flush_header(&mut self) -> io::Result<bool> {
        let Some(h) = self.header.as_mut() else { return Ok(true) };
        while h.sent < h.len && self.backend.writable {
            match (&self.backend.sock).write(&h.bytes[h.sent..h.len]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => h.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.backend.writable = false,
                Err(e) => return Err(e),
            }
        }
        if h.sent < h.len {
            return Ok(false);
        }
        self.header = None;
        Ok(true)
    }
}

/// Starts the backend connect and registers its socket.
/// With `from`, the socket binds that address (the client's) first.
fn start_connect(env: &mut Env<'_>, from: Option<SocketAddr>) -> io::Result<Side> {
    let fd = sys::tcp_connect(env.route.target, from)?;
    let mut sock = TcpStream::from_std(std::net::TcpStream::from(fd));
    env.registry.register(&mut sock, token(Kind::Backend, env.key), INTEREST)?;
    Ok(Side::new(sock))
}

/// Checks a pending connect after a writable (or error) edge. A writable
/// edge with no error or hang-up means the connect completed (a socket in
/// SYN_SENT never polls writable), so SO_ERROR is read only after an error
/// or hang-up edge: one syscall fewer per connection.
fn check_connected(backend: &mut Side) -> io::Result<()> {
    if !backend.faulted {
        return Ok(());
    }
    match backend.sock.take_error()? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A refused or unroutable connect is "unreachable"; anything else (a reset
/// from a backend that accepted and then closed at once) is an abort.
fn connect_error(e: io::Error) -> Why {
    if sys::is_unreachable(&e) { Why::Unreachable(e) } else { Why::Aborted(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_turn_budget_shrinks_as_more_connections_share_an_iteration() {
        assert_eq!(turn_budget(0), TURN_MAX);
        assert_eq!(turn_budget(1), TURN_MAX);
        assert_eq!(turn_budget(2), TURN_MAX);
        assert_eq!(turn_budget(8), 1 << 20);
        assert_eq!(turn_budget(32), TURN_MIN);
        assert_eq!(turn_budget(100_000), TURN_MIN);
        for busy in 1..200 {
            assert!(turn_budget(busy) * 2 * busy <= ITERATION_BUDGET.max(2 * busy * TURN_MIN));
        }
    }
}
