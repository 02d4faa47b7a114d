//! One relayed TCP connection: a client socket, a backend socket, two directions.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::direction::{DirState, Direction, Side};
use super::pipe_pool::PipePool;
use crate::sys;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The backend connect is in progress.
    Connecting,
    /// The backend is connected; the client's PROXY header is still awaited.
    Connected,
    /// Bytes flow both ways (each direction has its own state).
    Relaying,
}

/// Why a connection ends.
#[derive(Debug)]
pub enum End {
    /// Both directions forwarded their EOF: a clean close.
    Done,
    /// A socket failed or was reset: reset the other side too.
    Abort(io::Error),
}

/// Timeouts applied to every connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Bound on the backend connect.
    pub connect: Duration,
    /// Close a connection with no traffic for this long (None: never).
    pub idle: Option<Duration>,
    /// Close a connection this long after its first direction finished (None: never).
    pub half_close: Option<Duration>,
    /// Bound on reading a client's PROXY header.
    pub header: Duration,
}

/// A relayed connection.
pub struct Connection {
    /// The listener (and so the forward) it came through.
    pub listener: usize,
    /// The client's address (IPv4-mapped addresses unmapped).
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The socket's peer address, as counted for the per-source limit.
    pub source: std::net::IpAddr,
    /// The accepted socket.
    pub client: Side,
    /// The socket to the target.
    pub backend: Side,
    /// Client -> backend.
    pub up: Direction,
    /// Backend -> client.
    pub down: Direction,
    /// Life stage.
    pub phase: Phase,
    /// The client's PROXY header has not been read yet (accept-proxy forwards).
    pub awaiting_header: bool,
    /// PROXY header still to be written to the backend before any payload.
    pub header_out: Option<Box<HeaderOut>>,
    /// When the connection was accepted (connect and header deadlines).
    pub since: Instant,
    /// Last time bytes moved.
    pub last_active: Instant,
    /// When the first direction finished, for the half-close bound.
    pub half_closed_at: Option<Instant>,
    /// The soonest deadline a timer is already set for.
    pub timer_at: Option<Instant>,
}

/// A header waiting to be written to the backend.
pub struct HeaderOut {
    /// The encoded header.
    pub bytes: [u8; crate::proxy_protocol::MAX_ENCODED_LEN],
    /// How many bytes of it are still to send (from `len - left`).
    pub left: usize,
    /// The header's full length.
    pub len: usize,
}

impl Connection {
    /// Moves bytes both ways. `Ok(true)`: the budget ran out with work left.
    /// `Err(End)`: the connection is over.
    pub fn drive(&mut self, pool: &mut PipePool, budget: usize, now: Instant) -> Result<bool, End> {
        if self.phase != Phase::Relaying {
            return Ok(false);
        }
        if !self.flush_header().map_err(End::Abort)? {
            // Payload waits behind the header; backend->client may still flow.
            let down = self.down.pump(&mut self.backend, &mut self.client, pool, budget, false).map_err(End::Abort)?;
            return Ok(down.more);
        }
        // The direction that finishes second leaves its FIN to the close.
        let shut = |d: &Direction| d.state() == DirState::WriteShut;
        let last = shut(&self.down);
        let up = self.up.pump(&mut self.client, &mut self.backend, pool, budget, last).map_err(End::Abort)?;
        let last = shut(&self.up);
        let down = self.down.pump(&mut self.backend, &mut self.client, pool, budget, last).map_err(End::Abort)?;
        if up.moved + down.moved > 0 {
            self.last_active = now;
        }
        match (shut(&self.up), shut(&self.down)) {
            (true, true) => return Err(End::Done),
            (true, false) | (false, true) if self.half_closed_at.is_none() => self.half_closed_at = Some(now),
            _ => {}
        }
        Ok(up.more || down.more)
    }

    /// Writes what is left of the PROXY header; true once none is left.
    fn flush_header(&mut self) -> io::Result<bool> {
        let Some(h) = self.header_out.as_mut() else { return Ok(true) };
        while h.left > 0 && self.backend.writable {
            match (&self.backend.sock).write(&h.bytes[h.len - h.left..h.len]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => h.left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.backend.writable = false,
                Err(e) => return Err(e),
            }
        }
        if h.left == 0 {
            self.header_out = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// Checks a pending connect after a writable (or error) edge. A
    /// writable edge with no error or hang-up means the connect completed
    /// (a socket in SYN_SENT never polls writable), so SO_ERROR is read only
    /// after an error or hang-up edge: one syscall fewer per connection.
    pub fn check_connected(&mut self) -> io::Result<()> {
        if !self.backend.faulted {
            return Ok(());
        }
        match self.backend.sock.take_error()? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The next instant something must be checked, given the timeouts.
    pub fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        };
        match self.phase {
            Phase::Connecting => consider(Some(self.since + t.connect)),
            Phase::Connected | Phase::Relaying => {}
        }
        if self.awaiting_header {
            consider(Some(self.since + t.header));
        }
        consider(t.idle.map(|i| self.last_active + i));
        consider(t.half_close.zip(self.half_closed_at).map(|(h, at)| at + h));
        next
    }

    /// Releases both directions' pipes and, for an abort, makes both sockets
    /// send a reset when they are dropped (rule 7).
    pub fn close(mut self, pool: &mut PipePool, reset: bool) {
        self.up.release(pool);
        self.down.release(pool);
        if reset {
            sys::set_linger_zero(self.client.sock.as_fd());
            sys::set_linger_zero(self.backend.sock.as_fd());
        }
    }

    /// A new connection whose backend connect has been started.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        listener: usize,
        client: TcpStream,
        backend: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        splice: bool,
        now: Instant,
    ) -> Self {
        Connection {
            listener,
            peer,
            local,
            source: peer.ip(),
            client: Side::new(client),
            backend: Side::new(backend),
            up: Direction::new(splice),
            down: Direction::new(splice),
            phase: Phase::Connecting,
            awaiting_header: false,
            header_out: None,
            since: now,
            last_active: now,
            half_closed_at: None,
            timer_at: None,
        }
    }
}
