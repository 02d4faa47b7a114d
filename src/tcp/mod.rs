//! The TCP relay: listeners, the accept loop, and the connections' lives.
//!
//! Every socket is registered once for READABLE | WRITABLE (rule 13); the
//! readiness seen is kept as flags in [`direction::Side`]. Work cut short by
//! the per-event byte budget goes on a ready list that the event loop runs
//! before it sleeps again (rule 4).

pub mod connection;
pub mod direction;
pub mod pipe_pool;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use crate::proxy_protocol::{self as pp, Transport, Version};
use crate::reactor::{Ctx, Kind, fixed_token, token};
use crate::slab::{Key, Slab};
use crate::stats::TcpStats;
use crate::timer::Timer;
use connection::{Connection, End, HeaderOut, Phase, Timeouts};
use pipe_pool::PipePool;

/// Bytes one connection may read per wake-up before others get a turn.
const BUDGET: usize = 4 << 20;
/// Connections one listener accepts per wake-up before the open connections
/// get a turn (HAProxy's maxaccept): a burst of new clients is taken in
/// slices, so established transfers keep moving meanwhile.
const MAX_ACCEPT: usize = 32;
/// How long a listener rests after EMFILE/ENFILE/ENOBUFS/ENOMEM before it accepts again.
const FD_PAUSE: Duration = Duration::from_millis(100);
/// The longest PROXY header accepted from a client.
const MAX_HEADER_IN: usize = 1024;

/// Settings shared by every TCP forward.
#[derive(Clone, Debug)]
pub struct TcpSettings {
    /// Global bound on open connections (0: none).
    pub max_connections: usize,
    /// Bound on open connections per client address (0: none).
    pub max_per_source: usize,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Use splice (false: copy through user memory).
    pub splice: bool,
    /// Pipe capacity to ask for.
    pub pipe_size: usize,
    /// Empty pipes kept for reuse.
    pub pipe_spare: usize,
    /// Sources allowed to send a PROXY header on accept-proxy forwards.
    pub trusted: Vec<crate::cidr::Cidr>,
}

/// What one listener relays to.
pub struct Listener {
    sock: Option<TcpListener>,
    /// The listening address.
    pub addr: SocketAddr,
    /// Where connections go.
    pub target: SocketAddr,
    send_proxy: Option<Version>,
    accept_proxy: bool,
    readable: bool,
    paused: bool,
    /// Accepted sockets come with TCP_NODELAY already set.
    nodelay_inherited: bool,
    /// Counters for this listener.
    pub stats: TcpStats,
}

/// All TCP listeners and connections of the process.
pub struct TcpRelay {
    /// The listeners, indexed by their token.
    pub listeners: Vec<Listener>,
    conns: Slab<Connection>,
    /// The pipe pool.
    pub pool: PipePool,
    settings: TcpSettings,
    ready: Vec<Key>,
    /// Listeners left readable after MAX_ACCEPT accepts.
    accept_later: Vec<usize>,
    per_source: HashMap<IpAddr, u32>,
    blocked: bool,
}

impl TcpRelay {
    /// An empty relay with these settings.
    pub fn new(settings: TcpSettings) -> Self {
        TcpRelay {
            listeners: Vec::new(),
            conns: Default::default(),
            pool: PipePool::new(settings.pipe_size, settings.pipe_spare),
            settings,
            ready: Vec::new(),
            accept_later: Vec::new(),
            per_source: HashMap::new(),
            blocked: false,
        }
    }

    /// Adds a listening socket relaying to `target`.
    pub fn add_listener(
        &mut self,
        sock: std::net::TcpListener,
        target: SocketAddr,
        send_proxy: Option<Version>,
        accept_proxy: bool,
        registry: &Registry,
    ) -> io::Result<()> {
        sock.set_nonblocking(true)?;
        let addr = sock.local_addr()?;
        // Accepted sockets inherit TCP_NODELAY: one setsockopt per listener, not per client.
        let nodelay_inherited = crate::sys::set_nodelay(std::os::fd::AsFd::as_fd(&sock)).is_ok();
        let mut sock = TcpListener::from_std(sock);
        registry.register(&mut sock, fixed_token(Kind::Listener, self.listeners.len()), Interest::READABLE)?;
        self.listeners.push(Listener {
            sock: Some(sock),
            addr,
            target,
            send_proxy,
            accept_proxy,
            readable: true,
            paused: false,
            nodelay_inherited,
            stats: TcpStats::default(),
        });
        Ok(())
    }

    /// Open connections.
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// True if some connection has work left from an exhausted budget, or
    /// some listener has clients left in its backlog.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty() || !self.accept_later.is_empty()
    }

    /// Closes every listener (drain on SIGTERM): new clients are refused.
    pub fn stop_accepting(&mut self) {
        for l in &mut self.listeners {
            l.sock = None;
        }
    }

    /// A listener became readable.
    pub(crate) fn listener_event(&mut self, idx: usize, ctx: &mut Ctx<'_>) {
        if let Some(l) = self.listeners.get_mut(idx) {
            l.readable = true;
            self.accept(idx, ctx);
        }
    }

    /// A paused listener's rest is over.
    pub(crate) fn listener_timer(&mut self, idx: usize, ctx: &mut Ctx<'_>) {
        if let Some(l) = self.listeners.get_mut(idx) {
            l.paused = false;
            self.accept(idx, ctx);
        }
    }

    fn at_limit(&self) -> bool {
        self.settings.max_connections != 0 && self.conns.len() >= self.settings.max_connections
    }

    /// Accepts until the backlog is empty, the limit is reached, or fds run
    /// out; after MAX_ACCEPT, the rest waits for the next turn.
    fn accept(&mut self, idx: usize, ctx: &mut Ctx<'_>) {
        for _ in 0..MAX_ACCEPT {
            if self.at_limit() {
                // Leave clients in the backlog, as HAProxy does at maxconn.
                self.blocked = true;
                return;
            }
            let l = &mut self.listeners[idx];
            let Some(sock) = l.sock.as_ref() else { return };
            if !l.readable || l.paused {
                return;
            }
            match sock.accept() {
                Ok((client, peer)) => self.open(idx, client, peer, ctx),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.readable = false;
                    return;
                }
                Err(e) if crate::sys::out_of_resources(&e) => {
                    // Never spin, never exit (rule 11): rest, then retry.
                    log::warn!("accept on {}: {e}; pausing this listener for {FD_PAUSE:?}", l.addr);
                    l.paused = true;
                    ctx.timers.add(ctx.now + FD_PAUSE, Timer::Listener(idx));
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => log::debug!("accept on {}: {e}", l.addr),
            }
        }
        // Still readable: mio will not say so again (rule 4).
        if !self.accept_later.contains(&idx) {
            self.accept_later.push(idx);
        }
    }

    /// Sets up a relayed connection for a freshly accepted client.
    fn open(&mut self, idx: usize, client: TcpStream, peer: SocketAddr, ctx: &mut Ctx<'_>) {
        let peer = unmap(peer);
        let l = &mut self.listeners[idx];
        l.stats.total += 1;
        if l.accept_proxy && !self.settings.trusted.iter().any(|c| c.contains(peer.ip())) {
            log::debug!("{peer}: not a trusted proxy; refused");
            l.stats.refused += 1;
            crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&client));
            return;
        }
        let max_src = self.settings.max_per_source;
        if max_src != 0 && self.per_source.get(&peer.ip()).copied().unwrap_or(0) as usize >= max_src {
            log::debug!("{peer}: {max_src} connections from this address already; refused");
            l.stats.refused += 1;
            crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&client));
            return;
        }
        // The address the client used matters only to a PROXY header.
        let local = match l.send_proxy {
            Some(_) => client.local_addr().map(unmap).unwrap_or(l.addr),
            None => l.addr,
        };
        // TCP_NODELAY on both sockets (rule 10); SPLICE_F_MORE is never used.
        if !l.nodelay_inherited {
            let _ = client.set_nodelay(true);
        }
        let backend = match TcpStream::connect(l.target) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("{peer} -> {}: cannot connect: {e}", l.target);
                l.stats.failed += 1;
                crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&client));
                if crate::sys::out_of_resources(&e) && !l.paused {
                    // Out of fds: rest like an accept EMFILE rather than reset every client.
                    l.paused = true;
                    ctx.timers.add(ctx.now + FD_PAUSE, Timer::Listener(idx));
                }
                return;
            }
        };
        let key = self.conns.vacant_key();
        let mut conn = Connection::new(idx, client, backend, peer, local, self.settings.splice, ctx.now);
        conn.awaiting_header = l.accept_proxy;
        let reg = ctx
            .registry
            .register(&mut conn.client.sock, token(Kind::Client, key), Interest::READABLE | Interest::WRITABLE)
            .and_then(|_| {
                ctx.registry.register(
                    &mut conn.backend.sock,
                    token(Kind::Backend, key),
                    Interest::READABLE | Interest::WRITABLE,
                )
            });
        if let Err(e) = reg {
            log::warn!("{peer}: cannot register sockets: {e}");
            conn.close(&mut self.pool, true);
            return;
        }
        l.stats.open += 1;
        *self.per_source.entry(peer.ip()).or_default() += 1;
        log::debug!("{peer} -> {}: connecting to {}", l.addr, l.target);
        schedule(&mut conn, key, &self.settings.timeouts, ctx);
        self.conns.insert(conn);
    }

    /// Readiness on one of a connection's sockets.
    pub(crate) fn conn_event(&mut self, kind: Kind, key: Key, ev: &mio::event::Event, ctx: &mut Ctx<'_>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let side = if kind == Kind::Client { &mut conn.client } else { &mut conn.backend };
        // Read to EOF before interpreting a hang-up (rule 7): every hang-up or
        // error just marks the socket ready; the next syscall reports it.
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            side.readable = true;
        }
        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
            side.writable = true;
        }
        if ev.is_error() || ev.is_write_closed() || ev.is_read_closed() {
            side.faulted = true;
        }
        self.advance(key, ctx);
    }

    /// Runs connections whose budget ran out last time, and listeners with
    /// clients left in their backlog.
    pub(crate) fn run_ready(&mut self, ctx: &mut Ctx<'_>) {
        for idx in std::mem::take(&mut self.accept_later) {
            self.accept(idx, ctx);
        }
        let ready = std::mem::take(&mut self.ready);
        for key in ready {
            self.advance(key, ctx);
        }
    }

    /// A connection's deadline fired.
    pub(crate) fn conn_timer(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        conn.timer_at = None;
        let Some(deadline) = conn.deadline(&self.settings.timeouts) else { return };
        if deadline > ctx.now {
            schedule(conn, key, &self.settings.timeouts, ctx);
            return;
        }
        let l = &mut self.listeners[conn.listener];
        match conn.phase {
            Phase::Connecting => {
                log::warn!("{} -> {}: connect timed out", conn.peer, l.target);
                l.stats.failed += 1;
            }
            _ if conn.awaiting_header => log::info!("{}: no PROXY header in time; closed", conn.peer),
            _ => log::debug!("{}: idle or half-closed too long; closed", conn.peer),
        }
        self.close(key, true);
    }

    /// Moves a connection as far as its readiness allows.
    fn advance(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if conn.awaiting_header && conn.client.readable {
            match read_proxy_header(conn) {
                Ok(true) => conn.awaiting_header = false,
                Ok(false) => {}
                Err(e) => {
                    log::info!("{}: bad PROXY header: {e}; closed", conn.peer);
                    return self.close(key, true);
                }
            }
        }
        if conn.phase == Phase::Connecting && conn.backend.writable {
            match conn.check_connected() {
                Ok(()) => {
                    conn.phase = Phase::Connected;
                    let _ = conn.backend.sock.set_nodelay(true);
                }
                Err(e) => {
                    let l = &mut self.listeners[conn.listener];
                    log::warn!("{} -> {}: backend unreachable: {e}", conn.peer, l.target);
                    l.stats.failed += 1;
                    // The client sees a reset at once, not an empty reply.
                    return self.close(key, true);
                }
            }
        }
        if conn.phase == Phase::Connected && !conn.awaiting_header {
            conn.phase = Phase::Relaying;
            if let Some(v) = self.listeners[conn.listener].send_proxy {
                let mut h = HeaderOut { bytes: [0; pp::MAX_ENCODED_LEN], left: 0, len: 0 };
                h.len = pp::encode(v, Transport::Stream, conn.peer, conn.local, &mut h.bytes);
                h.left = h.len;
                conn.header_out = Some(Box::new(h));
            }
        }
        match conn.drive(&mut self.pool, BUDGET, ctx.now) {
            Ok(more) => {
                if more {
                    self.ready.push(key);
                }
                schedule(conn, key, &self.settings.timeouts, ctx);
            }
            Err(End::Done) => self.close(key, false),
            Err(End::Abort(e)) => {
                log::debug!("{}: aborted: {e}", conn.peer);
                self.close(key, true)
            }
        }
    }

    /// Ends a connection; `reset` sends RST both ways instead of a clean close.
    fn close(&mut self, key: Key, reset: bool) {
        let Some(conn) = self.conns.remove(key) else { return };
        let l = &mut self.listeners[conn.listener];
        l.stats.open = l.stats.open.saturating_sub(1);
        l.stats.bytes_up += conn.up.bytes;
        l.stats.bytes_down += conn.down.bytes;
        if let Some(n) = self.per_source.get_mut(&conn.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&conn.source);
            }
        }
        log::debug!(
            "{} closed{}: {} bytes up, {} bytes down",
            conn.peer,
            if reset { " (reset)" } else { "" },
            conn.up.bytes,
            conn.down.bytes
        );
        conn.close(&mut self.pool, reset);
    }

    /// Resumes accepting if the connection limit had stopped it.
    pub(crate) fn resume_if_blocked(&mut self, ctx: &mut Ctx<'_>) {
        if self.blocked && !self.at_limit() {
            self.blocked = false;
            for idx in 0..self.listeners.len() {
                self.accept(idx, ctx);
            }
        }
    }

    /// Bytes moved so far by open connections, (up, down), for statistics.
    pub fn live_bytes(&self, listener: usize) -> (u64, u64) {
        self.conns
            .iter()
            .filter(|(_, c)| c.listener == listener)
            .fold((0, 0), |(u, d), (_, c)| (u + c.up.bytes, d + c.down.bytes))
    }
}

/// Sets a timer for the connection's next deadline unless one is set already
/// for that time or sooner (idle deadlines move later; the timer re-checks).
fn schedule(conn: &mut Connection, key: Key, t: &Timeouts, ctx: &mut Ctx<'_>) {
    if let Some(d) = conn.deadline(t) {
        if conn.timer_at.is_none_or(|at| d < at) {
            conn.timer_at = Some(d);
            ctx.timers.add(d, Timer::Conn(key));
        }
    }
}

/// Reads the client's PROXY header: `Ok(true)` once consumed, `Ok(false)` if
/// more bytes are needed. The addresses it carries replace the socket's.
fn read_proxy_header(conn: &mut Connection) -> io::Result<bool> {
    use std::io::Read;
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut buf = [0u8; MAX_HEADER_IN];
    let n = match conn.client.sock.peek(&mut buf) {
        Ok(0) => return Err(invalid("connection closed before the header".into())),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            conn.client.readable = false;
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let header = match pp::parse(&buf[..n]) {
        Ok(Some(h)) => h,
        Ok(None) if n < MAX_HEADER_IN => {
            // The rest has not arrived: wait for the next edge.
            conn.client.readable = false;
            return Ok(false);
        }
        Ok(None) => return Err(invalid(format!("longer than {MAX_HEADER_IN} bytes"))),
        Err(e) => return Err(invalid(e.to_string())),
    };
    (&conn.client.sock).read_exact(&mut buf[..header.len])?;
    if let pp::Addresses::Proxied { src, dst, .. } = header.addresses {
        log::debug!("{}: PROXY header says the client is {src}", conn.peer);
        conn.peer = unmap(src);
        conn.local = unmap(dst);
    }
    Ok(true)
}

/// Shows an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as plain IPv4 (rule 12).
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
