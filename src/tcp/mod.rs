//! The TCP relay: listeners, the accept loop, and the table of connections.
//!
//! A connection's life (PROXY header, connect, relay, close) is in
//! [`connection`]; this file accepts clients, gives each connection its
//! turn when its sockets have events, keeps the ready list of connections
//! whose turn's budget ran out (mio will not report their sockets again),
//! and accounts for each close. See ARCHITECTURE.md, "TCP".

pub(crate) mod connection;
pub(crate) mod direction;
pub(crate) mod pipe_pool;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use crate::reactor::{Ctx, Kind, token};
use crate::shared::Shared;
use crate::slab::{Key, Slab};
use crate::stats::TcpStats;
use crate::timer::Timer;
use connection::{Connection, End, Env, Progress, Route, Timeouts, Why};
use pipe_pool::PipePool;

/// Connections one listener accepts per wake-up before the open connections
/// get a turn (HAProxy's maxaccept): a burst of new clients is taken in
/// slices, so established transfers keep moving meanwhile.
const MAX_ACCEPT: usize = 32;
/// How long a listener rests after EMFILE/ENFILE/ENOBUFS/ENOMEM before it accepts again.
const FD_PAUSE: Duration = Duration::from_millis(100);

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

impl Listener {
    /// True while it accepts (not drained, not retired).
    pub(crate) fn is_listening(&self) -> bool {
        self.sock.is_some()
    }
}

/// What one listener relays to.
pub struct Listener {
    /// None once closed (a drain, or its forward removed by a reload).
    sock: Option<TcpListener>,
    /// The listening address.
    pub addr: SocketAddr,
    /// The forward's listen address as configured (port 0 stays 0): what
    /// a reload matches forwards by.
    pub(crate) configured: SocketAddr,
    /// When a reload removed its forward: its connections run on, and the
    /// listener goes once the last one ends (ARCHITECTURE.md, "Reload").
    pub(crate) retired_at: Option<Instant>,
    /// Where connections go, and how.
    pub(crate) route: Route,
    readable: bool,
    paused: bool,
    /// Accepted sockets come with TCP_NODELAY already set.
    nodelay_inherited: bool,
    /// A transparent connect across address families was logged already.
    fallback_logged: bool,
    /// Counters for this listener.
    pub stats: TcpStats,
}

/// All TCP listeners and connections of the process.
pub struct TcpRelay {
    /// The listeners, by the key in their token.
    pub(crate) listeners: Slab<Listener>,
    conns: Slab<Connection>,
    /// The pipe pool.
    pub pool: PipePool,
    settings: TcpSettings,
    ready: Vec<Key>,
    /// Bytes per direction each turn may read this iteration.
    budget: usize,
    /// Listeners left readable after MAX_ACCEPT accepts.
    accept_later: Vec<Key>,
    /// Limits over every loop, and this loop's place among them.
    shared: Arc<Shared>,
    /// This loop's index.
    me: usize,
    /// Connections accepted since start (for the per-loop statistics).
    pub(crate) accepted: u64,
    /// Listener wake-ups that found no connection to accept: with several
    /// loops on one socket, a thundering herd would show here.
    pub(crate) idle_wakeups: u64,
    blocked: bool,
}

impl TcpRelay {
    /// An empty relay with these settings.
    pub(crate) fn new(settings: TcpSettings, shared: Arc<Shared>, me: usize) -> Self {
        TcpRelay {
            listeners: Slab::default(),
            conns: Default::default(),
            pool: PipePool::new(settings.pipe_size, settings.pipe_spare),
            ready: Vec::new(),
            budget: connection::TURN_MAX,
            accept_later: Vec::new(),
            shared,
            me,
            accepted: 0,
            idle_wakeups: 0,
            settings,
            blocked: false,
        }
    }

    /// Adds a listening socket for the forward configured to listen on
    /// `configured`, whose connections go by `route`; `exclusive`: the
    /// socket is shared by every loop (registered with EPOLLEXCLUSIVE).
    pub(crate) fn add_listener(
        &mut self,
        sock: std::net::TcpListener,
        configured: SocketAddr,
        route: Route,
        registry: &Registry,
        exclusive: bool,
    ) -> io::Result<()> {
        let key = self.listeners.vacant_key();
        let (sock, addr, nodelay_inherited) = listen_on(sock, key, registry, exclusive)?;
        self.listeners.insert(Listener {
            sock: Some(sock),
            addr,
            configured,
            retired_at: None,
            route,
            readable: true,
            paused: false,
            nodelay_inherited,
            fallback_logged: false,
            stats: TcpStats::default(),
        });
        Ok(())
    }

    /// Applies a reload (ARCHITECTURE.md, "Reload"): a listener whose
    /// listen address is still configured keeps its socket and takes the
    /// forward's new route for new connections; one whose forward is gone
    /// closes its socket and is retired, its connections running on (for
    /// at most `drain` if set); `fresh` are sockets bound for the forwards
    /// new to this loop (or back while their old listener is retired).
    pub(crate) fn reload(
        &mut self,
        forwards: &[crate::config::Forward],
        fresh: Vec<(usize, std::os::fd::OwnedFd, bool)>,
        settings: TcpSettings,
        drain: Duration,
        ctx: &mut Ctx<'_>,
    ) {
        let level = self.level();
        // Pipes are sized and splice chosen at start: those stay.
        self.settings = TcpSettings { splice: self.settings.splice, pipe_size: self.settings.pipe_size, ..settings };
        let keys: Vec<Key> = self.listeners.iter().map(|(k, _)| k).collect();
        let by_listen: std::collections::HashMap<SocketAddr, &crate::config::Forward> =
            forwards.iter().filter(|f| f.proto.tcp()).map(|f| (f.listen, f)).collect();
        for key in keys {
            let Some(l) = self.listeners.get_mut(key) else { continue };
            if l.sock.is_none() {
                continue;
            }
            match by_listen.get(&l.configured) {
                Some(f) => {
                    if l.route.target != f.target {
                        log::log!(level, "tcp {}: new connections go to {} (was {})", l.addr, f.target, l.route.target);
                    }
                    l.route = f.route();
                }
                None => {
                    l.sock = None;
                    l.retired_at = Some(ctx.now);
                    match l.stats.open {
                        0 => log::log!(level, "tcp {} -> {}: removed", l.addr, l.route.target),
                        open => log::log!(
                            level,
                            "tcp {} -> {}: removed; no longer accepting, {open} connections left to finish",
                            l.addr,
                            l.route.target
                        ),
                    }
                    if l.stats.open == 0 {
                        self.listeners.remove(key);
                    } else if !drain.is_zero() {
                        ctx.timers.add(ctx.now + drain, Timer::Retired(key));
                    }
                }
            }
        }
        let mut retired: std::collections::HashMap<SocketAddr, Key> =
            self.listeners.iter().filter(|(_, l)| l.sock.is_none()).map(|(k, l)| (l.configured, k)).collect();
        for (fi, fd, exclusive) in fresh {
            let Some(f) = forwards.get(fi) else { continue };
            let std = std::net::TcpListener::from(fd);
            let added = match retired.remove(&f.listen) {
                // Back before its connections ended: the same listener (and counters) again.
                Some(key) => listen_on(std, key, ctx.registry, exclusive).map(|(sock, addr, nodelay)| {
                    if let Some(l) = self.listeners.get_mut(key) {
                        (l.sock, l.addr, l.nodelay_inherited, l.retired_at) = (Some(sock), addr, nodelay, None);
                        (l.route, l.readable, l.paused) = (f.route(), true, false);
                    }
                }),
                None => self.add_listener(std, f.listen, f.route(), ctx.registry, exclusive),
            };
            match added {
                // Clients already waiting make the registration report it readable.
                Ok(()) => log::log!(level, "listening on tcp {} -> {}", f.listen, f.target),
                Err(e) => log::error!("reload: cannot use tcp listener {}: {e}", f.listen),
            }
        }
    }

    /// A retired listener's drain is over: resets what is left of its
    /// connections, unless it came back or was retired again since.
    pub(crate) fn retired_timer(&mut self, key: Key, drain: Duration, ctx: &mut Ctx<'_>) {
        let level = self.level();
        let Some(l) = self.listeners.get(key) else { return };
        if l.retired_at.is_none_or(|at| at + drain > ctx.now) {
            return;
        }
        let conns: Vec<Key> = self.conns.iter().filter(|(_, c)| c.listener == key).map(|(k, _)| k).collect();
        log::log!(level, "tcp {}: drain timeout reached; resetting {} connections", l.addr, conns.len());
        for k in conns {
            self.finish(k, End::Reset(Why::Shutdown), ctx);
        }
    }

    /// The level of a line every loop would log about its own listeners
    /// (a reload's): info for loop 0, debug for the others, so each change
    /// shows once.
    fn level(&self) -> log::Level {
        if self.me == 0 { log::Level::Info } else { log::Level::Debug }
    }

    /// Counters of listener `key` (zero if it is gone).
    pub(crate) fn listener_stats(&self, key: Key) -> TcpStats {
        self.listeners.get(key).map(|l| l.stats).unwrap_or_default()
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
        let keys: Vec<Key> = self.listeners.iter().map(|(k, _)| k).collect();
        for key in keys {
            if let Some(l) = self.listeners.get_mut(key) {
                l.sock = None;
            }
        }
    }

    /// A listener became readable.
    pub(crate) fn listener_event(&mut self, idx: Key, ctx: &mut Ctx<'_>) {
        if let Some(l) = self.listeners.get_mut(idx) {
            l.readable = true;
            let before = self.accepted;
            self.accept(idx, ctx);
            if self.accepted == before {
                self.idle_wakeups += 1;
            }
        }
    }

    /// A paused listener's rest is over.
    pub(crate) fn listener_timer(&mut self, idx: Key, ctx: &mut Ctx<'_>) {
        if let Some(l) = self.listeners.get_mut(idx) {
            l.paused = false;
            self.accept(idx, ctx);
        }
    }

    /// Accepts until the backlog is empty, the limit is reached, or fds run
    /// out; after MAX_ACCEPT, the rest waits for the next turn.
    fn accept(&mut self, idx: Key, ctx: &mut Ctx<'_>) {
        for _ in 0..MAX_ACCEPT {
            let Some(l) = self.listeners.get_mut(idx) else { return };
            let Some(sock) = l.sock.as_ref() else { return };
            if !l.readable || l.paused {
                return;
            }
            // A place under --max-connections (over every loop) is taken
            // before the accept, so the bound is exact.
            if !self.shared.connections.reserve() {
                // Leave clients in the backlog, as HAProxy does at maxconn.
                self.blocked = true;
                self.shared.blocked[self.me].store(true, Ordering::Release);
                return;
            }
            let accepted = sock.accept();
            if accepted.is_err() {
                self.shared.connections.release();
            }
            match accepted {
                Ok((client, peer)) => self.open(idx, client, peer, ctx),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.readable = false;
                    return;
                }
                Err(e) if crate::sys::out_of_resources(&e) => {
                    // Never spin, never exit (ARCHITECTURE.md, Resources): rest, then retry.
                    log::warn!("accept on {}: {e}; pausing this listener for {FD_PAUSE:?}", l.addr);
                    l.paused = true;
                    ctx.timers.add(ctx.now + FD_PAUSE, Timer::Listener(idx));
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => log::debug!("accept on {}: {e}", l.addr),
            }
        }
        // Still readable: mio will not say so again (ARCHITECTURE.md, Readiness).
        if !self.accept_later.contains(&idx) {
            self.accept_later.push(idx);
        }
    }

    /// Sets up a relayed connection for a freshly accepted client.
    fn open(&mut self, idx: Key, client: TcpStream, peer: SocketAddr, ctx: &mut Ctx<'_>) {
        let peer = crate::unmap(peer);
        let Some(l) = self.listeners.get_mut(idx) else {
            self.shared.release_connection();
            return;
        };
        l.stats.total += 1;
        self.accepted += 1;
        if l.route.accept_proxy && !self.settings.trusted.iter().any(|c| c.contains(peer.ip())) {
            log::debug!("{peer}: not a trusted proxy; refused");
            l.stats.refused += 1;
            crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&client));
            self.shared.release_connection();
            return;
        }
        // On accept-proxy forwards the list applies to the header's address, known later.
        if !l.route.accept_proxy && !l.route.access.admits(peer.ip()) {
            log::debug!("{peer}: denied by the access list; refused");
            l.stats.refused += 1;
            l.stats.denied += 1;
            crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&client));
            self.shared.release_connection();
            return;
        }
        // The address the client used matters only to a PROXY header.
        let local = match l.route.send_proxy {
            Some(_) => client.local_addr().map(crate::unmap).unwrap_or(l.addr),
            None => l.addr,
        };
        if !l.nodelay_inherited {
            let _ = client.set_nodelay(true);
        }
        let key = self.conns.vacant_key();
        let mut conn = Connection::new(idx, client, peer, local, ctx.now);
        if let Err(e) = conn.register(ctx.registry, key) {
            log::warn!("{peer}: cannot register the socket: {e}");
            conn.close(&mut self.pool, true);
            self.shared.release_connection();
            return;
        }
        l.stats.open += 1;
        log::debug!("{peer} -> {}: accepted", l.addr);
        self.conns.insert(conn);
        self.advance(key, ctx);
    }

    /// Readiness on one of a connection's sockets.
    pub(crate) fn conn_event(&mut self, kind: Kind, key: Key, ev: &mio::event::Event, ctx: &mut Ctx<'_>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        conn.note(kind == Kind::Backend, ev);
        // A connection on the ready list has its turn there: one turn per
        // connection per loop iteration (ARCHITECTURE.md, "Fairness").
        if !conn.queued {
            self.advance(key, ctx);
        }
    }

    /// Runs connections whose budget ran out last time, and listeners with
    /// clients left in their backlog.
    pub(crate) fn run_ready(&mut self, ctx: &mut Ctx<'_>) {
        for idx in std::mem::take(&mut self.accept_later) {
            self.accept(idx, ctx);
        }
        let ready = std::mem::take(&mut self.ready);
        // The connections that used up their last turn share this iteration.
        self.budget = connection::turn_budget(ready.len());
        for key in ready {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.queued = false;
            }
            self.advance(key, ctx);
        }
    }

    /// A connection's deadline fired.
    pub(crate) fn conn_timer(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        conn.timer_at = None;
        match conn.expired(&self.settings.timeouts, ctx.now) {
            Some(why) => self.finish(key, End::Reset(why), ctx),
            // Activity moved the deadline later: set a timer for it.
            None => schedule(conn, key, &self.settings.timeouts, ctx),
        }
    }

    /// Gives a connection its turn: moves it as far as its readiness and
    /// the turn's budget allow.
    fn advance(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        // A listener outlives its connections (`finish` frees a retired one).
        let Some(l) = self.listeners.get_mut(conn.listener) else { return };
        let mut env = Env {
            pool: &mut self.pool,
            registry: ctx.registry,
            key,
            route: &l.route,
            sources: &self.shared.sources,
            stats: &mut l.stats,
            fallback_logged: &mut l.fallback_logged,
            splice: self.settings.splice,
            budget: self.budget,
            now: ctx.now,
        };
        match conn.drive(&mut env) {
            Progress::Waiting => schedule(conn, key, &self.settings.timeouts, ctx),
            Progress::Yielded => {
                if !conn.queued {
                    conn.queued = true;
                    self.ready.push(key);
                }
                schedule(conn, key, &self.settings.timeouts, ctx);
            }
            Progress::Closed(end) => self.finish(key, end, ctx),
        }
    }

    /// Removes a connection that ended: logs why, counts it, and closes its
    /// sockets (with a reset unless it ended cleanly).
    fn finish(&mut self, key: Key, end: End, ctx: &mut Ctx<'_>) {
        let level = self.level();
        let Some(conn) = self.conns.remove(key) else { return };
        let (up, down) = conn.bytes();
        let Some(l) = self.listeners.get_mut(conn.listener) else {
            conn.close(&mut self.pool, true);
            return;
        };
        l.stats.open = l.stats.open.saturating_sub(1);
        l.stats.bytes_up += up;
        l.stats.bytes_down += down;
        if let Some(ip) = conn.source {
            self.shared.sources.release(ip);
        }
        self.shared.release_connection();
        let (peer, target) = (conn.peer, l.route.target);
        let reset = match end {
            End::Done => {
                log::debug!("{peer} closed: {up} bytes up, {down} bytes down");
                false
            }
            End::Reset(why) => {
                match why {
                    Why::BadHeader(e) => log::info!("{peer}: bad PROXY header: {e}; closed"),
                    Why::HeaderTimeout => log::info!("{peer}: no PROXY header in time; closed"),
                    Why::SourceLimit => {
                        log::debug!(
                            "{peer}: {} connections from this address already; refused",
                            self.shared.sources.max()
                        );
                        l.stats.refused += 1;
                    }
                    Why::CannotConnect(e) => {
                        log::warn!("{peer} -> {target}: cannot connect: {e}");
                        l.stats.failed += 1;
                        if crate::sys::out_of_resources(&e) && !l.paused {
                            // Out of fds: rest like an accept EMFILE rather than reset every client.
                            l.paused = true;
                            ctx.timers.add(ctx.now + FD_PAUSE, Timer::Listener(conn.listener));
                        }
                    }
                    Why::Unreachable(e) => {
                        log::warn!("{peer} -> {target}: backend unreachable: {e}");
                        l.stats.failed += 1;
                    }
                    Why::Denied => {
                        log::debug!("{peer}: denied by the access list; refused");
                        l.stats.refused += 1;
                        l.stats.denied += 1;
                    }
                    Why::ConnectTimeout if conn.spoofed => {
                        log::warn!(
                            "{peer} -> {target}: transparent connect timed out (are the backend's replies routed \
                             to the relay? see scripts/transparent-routing.sh)"
                        );
                        l.stats.failed += 1;
                    }
                    Why::ConnectTimeout => {
                        log::warn!("{peer} -> {target}: connect timed out");
                        l.stats.failed += 1;
                    }
                    Why::Aborted(e) => log::debug!("{peer}: aborted: {e}"),
                    Why::Idle => log::debug!("{peer}: idle too long; closed"),
                    Why::HalfClosedIdle => log::debug!("{peer}: half-closed and idle too long; closed"),
                    Why::Shutdown => {}
                }
                log::debug!("{peer} closed (reset): {up} bytes up, {down} bytes down");
                true
            }
        };
        let listener = conn.listener;
        conn.close(&mut self.pool, reset);
        if l.retired_at.is_some() && l.stats.open == 0 {
            log::log!(level, "tcp {} -> {}: removed; its last connection ended", l.addr, target);
            self.listeners.remove(listener);
        }
    }

    /// Resets every open connection: the relay is exiting, and a FIN would
    /// tell a client or backend that a cut-short transfer was complete.
    pub(crate) fn reset_all(&mut self, ctx: &mut Ctx<'_>) {
        let keys: Vec<Key> = self.conns.iter().map(|(k, _)| k).collect();
        if !keys.is_empty() {
            log::info!("resetting {} open connections", keys.len());
        }
        for key in keys {
            self.finish(key, End::Reset(Why::Shutdown), ctx);
        }
    }

    /// Resumes accepting if the connection limit had stopped it.
    pub(crate) fn resume_if_blocked(&mut self, ctx: &mut Ctx<'_>) {
        if self.blocked && !self.shared.connections.full() {
            self.blocked = false;
            self.shared.blocked[self.me].store(false, Ordering::Release);
            let keys: Vec<Key> = self.listeners.iter().map(|(k, _)| k).collect();
            for idx in keys {
                self.accept(idx, ctx);
            }
        }
    }

    /// Bytes moved so far by open connections, (up, down), for statistics.
    pub(crate) fn live_bytes(&self, listener: Key) -> (u64, u64) {
        self.conns
            .iter()
            .filter(|(_, c)| c.listener == listener)
            .map(|(_, c)| c.bytes())
            .fold((0, 0), |(u, d), (cu, cd)| (u + cu, d + cd))
    }
}

/// Makes `sock` a listener registered under `key`: non-blocking, its
/// accepted sockets with TCP_NODELAY (if it could be set: the last value)
/// and urgent data in band. Gives the socket and its address.
fn listen_on(
    sock: std::net::TcpListener,
    key: Key,
    registry: &Registry,
    exclusive: bool,
) -> io::Result<(TcpListener, SocketAddr, bool)> {
    sock.set_nonblocking(true)?;
    let addr = sock.local_addr()?;
    // Accepted sockets inherit TCP_NODELAY: one setsockopt per listener, not per client.
    let nodelay_inherited = crate::sys::set_nodelay(std::os::fd::AsFd::as_fd(&sock)).is_ok();
    // Urgent bytes stay in band on accepted sockets (ARCHITECTURE.md, "Urgent data").
    crate::sys::set_oob_inline(std::os::fd::AsFd::as_fd(&sock))?;
    let mut sock = TcpListener::from_std(sock);
    let token = token(Kind::Listener, key);
    if exclusive {
        // One socket waited on by every loop (ARCHITECTURE.md, Threads).
        use std::os::fd::AsRawFd;
        crate::sys::register_exclusive(registry.as_raw_fd(), std::os::fd::AsFd::as_fd(&sock), token.0)?;
    } else {
        registry.register(&mut sock, token, Interest::READABLE)?;
    }
    Ok((sock, addr, nodelay_inherited))
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
