//! The UDP relay: batched reads on each listening socket, one connected
//! socket per client flow, replies sent back in batches from the address
//! the client used.

pub mod flow_table;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use crate::config::Transparent;
use crate::proxy_protocol::{self as pp, Transport, Version};
use crate::reactor::{Ctx, Kind, token};
use crate::shared::Shared;
use crate::slab::{Key, Slab};
use crate::stats::{DropReason, UdpDirStats, UdpStats};
use crate::sys::mmsg::{BATCH, Batch, Gso, Out, PktInfo};
use crate::timer::Timer;
use crate::transparent::{self, Source};
use crate::unmap;
use flow_table::FlowTable;
use std::sync::Arc;

/// Settings shared by every UDP forward.
#[derive(Clone, Copy, Debug)]
pub struct UdpSettings {
    /// Close a flow after this long without traffic either way.
    pub timeout: Duration,
    /// At most this many flows at once (the least recently used is evicted).
    pub max_flows: usize,
    /// UDP offloads: receive runs as one buffer (UDP_GRO) and send runs of
    /// equal-size datagrams as one GSO message.
    pub gso: bool,
    /// Receive buffer asked for on listening sockets (0: the system default).
    pub rcvbuf: usize,
}

/// A listening UDP socket and where its datagrams go.
pub struct UdpListener {
    /// Receives from clients and sends their replies.
    sock: UdpSocket,
    /// The listening address.
    pub addr: SocketAddr,
    /// The forward's listen address as configured: what a reload matches
    /// forwards by.
    configured: SocketAddr,
    /// When a reload removed its forward: its flows run on, no new one
    /// opens, and the socket closes with the last (ARCHITECTURE.md, "Reload").
    retired_at: Option<std::time::Instant>,
    /// The backend.
    pub target: SocketAddr,
    send_proxy: Option<Version>,
    /// Flows bind the client's address and port (ARCHITECTURE.md, "Transparent").
    transparent: Option<Transparent>,
    /// Which clients may send (ARCHITECTURE.md, "Access lists").
    access: crate::cidr::Access,
    /// A transparent flow across address families was logged already.
    fallback_logged: bool,
    readable: bool,
    /// On the ready list: its next turn is already due.
    queued: bool,
    /// GSO for replies sent to clients.
    gso: Gso,
    /// GSO for a new flow towards the backend.
    flow_gso: Gso,
    /// Counters.
    pub stats: UdpStats,
}

/// What a flow is known by: the listener, the client, and the local address
/// the client sent to (a wildcard listener answers each address from itself).
type FlowKey = (Key, SocketAddr, Option<IpAddr>);

/// One client's flow: a socket connected to the backend.
struct Flow {
    sock: UdpSocket,
    listener: Key,
    client: SocketAddr,
    /// The address the client sent to: replies leave from it.
    reply_from: Option<PktInfo>,
    /// GSO towards the backend.
    gso: Gso,
    /// On the ready list: its next turn is already due.
    queued: bool,
    /// The socket's local port, held back from new flows once it closes
    /// (0: a transparent flow's, the client's own port, never held).
    port: u16,
}

impl Flow {
    fn key(&self) -> FlowKey {
        (self.listener, self.client, self.reply_from.map(|d| d.ip()))
    }
}

/// All UDP listeners and flows of the process.
pub struct UdpRelay {
    /// The listeners, by the key in their token.
    pub(crate) listeners: Slab<UdpListener>,
    flows: Slab<Flow>,
    table: FlowTable<FlowKey, Key>,
    /// Ports of closed flow sockets, not given to new flows for a while.
    /// The flow bound and the held ports, over every loop.
    shared: Arc<Shared>,
    batch: Option<Box<Batch>>,
    settings: UdpSettings,
    sweeping: bool,
    /// Draining: client datagrams are no longer read; replies still go out.
    draining: bool,
    ready: Vec<Ready>,
    queue: OutQueue,
    /// This loop's index.
    me: usize,
}

impl UdpRelay {
    /// An empty relay.
    pub(crate) fn new(settings: UdpSettings, shared: Arc<Shared>, me: usize) -> Self {
        UdpRelay {
            listeners: Slab::default(),
            flows: Slab::default(),
            table: FlowTable::new(settings.max_flows, settings.timeout),
            shared,
            batch: None,
            settings,
            sweeping: false,
            draining: false,
            ready: Vec::new(),
            queue: OutQueue::default(),
            me,
        }
    }

    /// Adds a bound socket for the forward `f`.
    pub(crate) fn add_listener(
        &mut self,
        sock: std::net::UdpSocket,
        f: &crate::config::Forward,
        registry: &Registry,
    ) -> io::Result<()> {
        sock.set_nonblocking(true)?;
        let addr = sock.local_addr()?;
        // The one place PKTINFO is turned on: `sock` may come from docker (fd 4).
        crate::sys::enable_pktinfo(sock.as_fd(), addr.is_ipv6())?;
        if self.settings.gso && !crate::sys::mmsg::enable_gro(sock.as_fd()) {
            log::debug!("udp {addr}: no UDP_GRO on this kernel");
        }
        if self.settings.rcvbuf > 0 {
            match crate::sys::set_rcvbuf(sock.as_fd(), self.settings.rcvbuf) {
                Ok(got) if got < self.settings.rcvbuf => log::info!(
                    "udp {addr}: receive buffer {got} bytes, not {} (raise net.core.rmem_max or run with CAP_NET_ADMIN)",
                    self.settings.rcvbuf
                ),
                Ok(_) => {}
                Err(e) => log::warn!("udp {addr}: cannot set the receive buffer: {e}"),
            }
        }
        let mut sock = UdpSocket::from_std(sock);
        let key = self.listeners.vacant_key();
        registry.register(&mut sock, token(Kind::UdpListener, key), Interest::READABLE)?;
        self.listeners.insert(UdpListener {
            sock,
            addr,
            configured: f.listen,
            retired_at: None,
            target: f.target,
            send_proxy: f.send_proxy,
            transparent: f.transparent,
            access: f.access.clone(),
            fallback_logged: false,
            readable: true,
            queued: false,
            gso: self.gso_default(),
            flow_gso: self.gso_default(),
            stats: UdpStats::default(),
        });
        Ok(())
    }

    fn gso_default(&self) -> Gso {
        if self.settings.gso { Gso::default() } else { Gso::OFF }
    }

    /// Flows open now.
    pub fn flows(&self) -> usize {
        self.table.len()
    }

    /// Reads what arrived before the loop started.
    pub(crate) fn start(&mut self, ctx: &mut Ctx<'_>) {
        let keys: Vec<Key> = self.listeners.iter().map(|(k, _)| k).collect();
        for idx in keys {
            self.listener_event(idx, ctx);
        }
    }

    /// The configured listen addresses of every listener, retired ones too.
    pub(crate) fn configured(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listeners.iter().map(|(_, l)| l.configured)
    }

    /// The configured listen addresses of the listeners not retired.
    pub(crate) fn active(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listeners.iter().filter(|(_, l)| l.retired_at.is_none()).map(|(_, l)| l.configured)
    }

    /// Closes at once the retired listeners on `port` and their flows: with
    /// one loop (no SO_REUSEPORT) a new forward cannot bind beside them.
    pub(crate) fn close_retired_on(&mut self, port: u16, ctx: &mut Ctx<'_>) {
        let gone: Vec<Key> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.retired_at.is_some() && l.configured.port() == port)
            .map(|(k, _)| k)
            .collect();
        for key in gone {
            let (flows, shared) = (&mut self.flows, &self.shared);
            let mut closed = 0;
            self.table.remove_where(
                |(listener, _, _), _| *listener == key,
                |_, flow| {
                    closed += 1;
                    close_flow(flows, shared, flow, ctx.now)
                },
            );
            if let Some(mut l) = self.listeners.remove(key) {
                let _ = ctx.registry.deregister(&mut l.sock);
                log::warn!("udp {}: closed with its {closed} flows: a new forward needs its port", l.addr);
            }
        }
    }

    /// The level of a line every loop would log about its own listeners:
    /// info for loop 0, debug for the others, so each change shows once.
    fn level(&self) -> log::Level {
        if self.me == 0 { log::Level::Info } else { log::Level::Debug }
    }

    /// Counters of listener `key` (zero if it is gone).
    pub(crate) fn listener_stats(&self, key: Key) -> UdpStats {
        self.listeners.get(key).map(|l| l.stats).unwrap_or_default()
    }

    /// Applies a reload (ARCHITECTURE.md, "Reload"): a listener whose
    /// listen address is still configured keeps its socket and takes the
    /// forward's target, PROXY, transparent and access settings for new
    /// flows; one whose forward is gone is retired: its flows run on (for
    /// at most `drain` if set), new clients are dropped, and it closes with
    /// its last flow. `fresh` are sockets bound for forwards new to this
    /// loop; one whose retired listener is still here takes that back
    /// (and the fresh socket is closed).
    pub(crate) fn reload(
        &mut self,
        forwards: &[crate::config::Forward],
        fresh: Vec<(usize, OwnedFd)>,
        settings: UdpSettings,
        drain: Duration,
        ctx: &mut Ctx<'_>,
    ) {
        let level = self.level();
        // Offloads are chosen at start and stay.
        self.settings = UdpSettings { gso: self.settings.gso, ..settings };
        self.table.set_limits(settings.max_flows, settings.timeout);
        let keys: Vec<Key> = self.listeners.iter().map(|(k, _)| k).collect();
        let by_listen: std::collections::HashMap<SocketAddr, &crate::config::Forward> =
            forwards.iter().filter(|f| f.proto.udp()).map(|f| (f.listen, f)).collect();
        let mut revived = std::collections::HashSet::new();
        for key in keys {
            let Some(l) = self.listeners.get_mut(key) else { continue };
            match by_listen.get(&l.configured) {
                Some(f) => {
                    if l.target != f.target {
                        log::log!(level, "udp {}: new flows go to {} (was {})", l.addr, f.target, l.target);
                    }
                    (l.target, l.send_proxy, l.transparent) = (f.target, f.send_proxy, f.transparent);
                    l.access = f.access.clone();
                    if l.retired_at.take().is_some() {
                        log::log!(level, "listening on udp {} -> {} (again)", f.listen, f.target);
                        revived.insert(f.listen);
                    }
                }
                None if l.retired_at.is_none() => {
                    l.retired_at = Some(ctx.now);
                    log::log!(
                        level,
                        "udp {} -> {}: removed; no new flows, its flows run on until idle",
                        l.addr,
                        l.target
                    );
                    if !drain.is_zero() {
                        ctx.timers.add(ctx.now + drain, Timer::UdpRetired(key));
                    }
                }
                None => {}
            }
        }
        for (fi, fd) in fresh {
            let Some(f) = forwards.get(fi) else { continue };
            if revived.contains(&f.listen) {
                continue;
            }
            match self.add_listener(std::net::UdpSocket::from(fd), f, ctx.registry) {
                Ok(()) => log::log!(level, "listening on udp {} -> {}", f.listen, f.target),
                Err(e) => log::error!("reload: cannot use udp socket {}: {e}", f.listen),
            }
        }
        // No read here: registering a socket that holds datagrams already
        // reports it readable, and a retired listener never stopped reading.
        self.close_retired(ctx.registry);
    }

    /// Closes the retired listeners that have no flow left.
    fn close_retired(&mut self, registry: &Registry) {
        let level = self.level();
        let idle: Vec<Key> = self
            .listeners
            .iter()
            .filter(|(k, l)| l.retired_at.is_some() && !self.flows.iter().any(|(_, f)| f.listener == *k))
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            if let Some(mut l) = self.listeners.remove(key) {
                let _ = registry.deregister(&mut l.sock);
                log::log!(level, "udp {} -> {}: removed; its last flow ended", l.addr, l.target);
            }
        }
    }

    /// A retired listener's drain is over: closes its flows and it, unless
    /// it came back or was retired again since.
    pub(crate) fn retired_timer(&mut self, key: Key, drain: Duration, ctx: &mut Ctx<'_>) {
        let level = self.level();
        let Some(l) = self.listeners.get(key) else { return };
        if l.retired_at.is_none_or(|at| at + drain > ctx.now) {
            return;
        }
        log::log!(level, "udp {}: drain timeout reached; closing its flows", l.addr);
        let (flows, shared) = (&mut self.flows, &self.shared);
        self.table
            .remove_where(|(listener, _, _), _| *listener == key, |_, flow| close_flow(flows, shared, flow, ctx.now));
        self.close_retired(ctx.registry);
    }

    /// Starts the drain: client datagrams are no longer read (so no flow
    /// opens), while the listening sockets stay open as the reply path of the
    /// flows left, which close when idle. The caller exits once `flows()` is 0.
    pub fn stop(&mut self, registry: &Registry) {
        self.draining = true;
        for l in self.listeners.values_mut() {
            // Unregistered, datagrams still arriving do not wake the loop.
            if let Err(e) = registry.deregister(&mut l.sock) {
                log::debug!("udp {}: deregister: {e}", l.addr);
            }
        }
        if self.listeners.len() > 0 {
            log::info!("udp: no longer reading client datagrams; {} flows left until idle", self.flows());
        }
    }

    /// Datagrams from clients: relay each to its flow, making flows as needed.
    pub(crate) fn listener_event(&mut self, idx: Key, ctx: &mut Ctx<'_>) {
        if self.draining {
            return;
        }
        let batch = self.batch.get_or_insert_with(|| Box::new(Batch::new()));
        let Some(l) = self.listeners.get_mut(idx) else { return };
        l.readable = true;
        if l.queued {
            // Its turn is on the ready list: one turn per loop iteration.
            return;
        }
        // Bounded work per wake-up: at most 16 batches, then other sockets get a turn.
        for _ in 0..16 {
            let Some(l) = self.listeners.get_mut(idx) else { return };
            let n = match batch.recv(l.sock.as_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.readable = false;
                    return;
                }
                Err(e) => {
                    log::debug!("udp {}: receive: {e}", l.addr);
                    continue;
                }
            };
            let queue = &mut self.queue;
            for i in 0..n {
                let meta = batch.meta[i];
                let count = meta.datagrams().count();
                let stats = &mut l.stats.up;
                stats.received += count as u64;
                let Some(client) = meta.source else {
                    // No address, no flow (an IP socket always reports one).
                    stats.add_dropped(DropReason::NoFlow, count);
                    continue;
                };
                if meta.truncated {
                    // Never forward a truncated datagram (ARCHITECTURE.md, UDP).
                    stats.add_dropped(DropReason::Truncated, count);
                    log::debug!("udp {client}: datagram larger than the buffer dropped");
                    continue;
                }
                if !l.access.admits(client.ip()) {
                    l.stats.up.add_dropped(DropReason::Denied, count);
                    log::trace!("udp {client}: denied by the access list; dropped");
                    continue;
                }
                let key = (idx, client, meta.dst.map(|d| d.ip()));
                let flow = match self.table.get(&key, ctx.now) {
                    Some(f) => f,
                    None if l.retired_at.is_some() => {
                        l.stats.up.add_dropped(DropReason::Removed, count);
                        continue;
                    }
                    None => {
                        if self.table.is_full() {
                            // The flow evicted next may have datagrams waiting in `outs`: send them first.
                            flush(batch, &mut self.flows, l, queue);
                        }
                        match open_flow(&mut self.flows, &mut self.table, &self.shared, idx, l, client, meta.dst, ctx) {
                            Some(f) => f,
                            None => {
                                l.stats.up.add_dropped(DropReason::NoFlow, count);
                                continue;
                            }
                        }
                    }
                };
                // A GRO buffer is several datagrams: each goes on alone.
                for (offset, len) in meta.datagrams() {
                    queue.pending.push((flow, Out { index: i, offset, len, to: None, from: None }));
                }
            }
            if !self.sweeping && !self.table.is_empty() {
                self.sweeping = true;
                ctx.timers.add(ctx.now + sweep_every(self.settings.timeout), Timer::UdpSweep);
            }
            flush(batch, &mut self.flows, l, queue);
            if n < BATCH {
                l.readable = false;
                return;
            }
        }
        // Still readable after the bounded work: mio will not tell us again.
        if let Some(l) = self.listeners.get_mut(idx) {
            l.queued = true;
            self.ready.push(Ready::Listener(idx));
        }
    }

    /// Replies (or errors) on a flow socket.
    pub(crate) fn flow_event(&mut self, key: Key, ev: &mio::event::Event, ctx: &mut Ctx<'_>) {
        let Some(flow) = self.flows.get(key) else { return };
        if ev.is_error() {
            // A stale ICMP error (ECONNREFUSED): read it so the edge does not
            // repeat, and keep the flow (ARCHITECTURE.md, UDP).
            if let Some(e) = crate::sys::mmsg::take_socket_error(flow.sock.as_fd()) {
                log::debug!("udp flow {} -> backend: {e}", flow.client);
            }
        }
        // A queued flow has its turn on the ready list: one per loop iteration.
        if !flow.queued {
            self.flow_readable(key, ctx);
        }
    }

    fn flow_readable(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let batch = self.batch.get_or_insert_with(|| Box::new(Batch::new()));
        let Some(flow) = self.flows.get(key) else { return };
        let idx = flow.listener;
        for _ in 0..16 {
            let Some(flow) = self.flows.get(key) else { return };
            let n = match batch.recv(flow.sock.as_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // ECONNREFUSED and friends: the backend is down for now.
                    log::debug!("udp flow {}: {e}", flow.client);
                    continue;
                }
            };
            self.table.touch(&flow.key(), ctx.now);
            let outs = &mut self.queue.outs;
            outs.clear();
            // A listener outlives its flows (`close_retired`).
            let Some(l) = self.listeners.get_mut(idx) else { return };
            for (i, meta) in batch.meta.iter().enumerate() {
                let count = meta.datagrams().count();
                l.stats.down.received += count as u64;
                if meta.truncated {
                    l.stats.down.add_dropped(DropReason::Truncated, count);
                    continue;
                }
                outs.extend(meta.datagrams().map(|(offset, len)| Out {
                    index: i,
                    offset,
                    len,
                    to: Some(flow.client),
                    from: flow.reply_from,
                }));
            }
            send_all(batch, l.sock.as_fd(), outs, &[], &mut l.gso, &mut l.stats.down);
            outs.clear();
            if n < BATCH {
                return;
            }
        }
        if let Some(flow) = self.flows.get_mut(key) {
            flow.queued = true;
            self.ready.push(Ready::Flow(key));
        }
    }

    /// True if a socket was left readable by bounded work.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Gives sockets left readable by bounded work their next turn.
    pub(crate) fn run_ready(&mut self, ctx: &mut Ctx<'_>) {
        for r in std::mem::take(&mut self.ready) {
            match r {
                Ready::Listener(idx) => {
                    if let Some(l) = self.listeners.get_mut(idx) {
                        l.queued = false;
                    }
                    self.listener_event(idx, ctx)
                }
                Ready::Flow(key) => {
                    if let Some(f) = self.flows.get_mut(key) {
                        f.queued = false;
                    }
                    self.flow_readable(key, ctx)
                }
            }
        }
    }

    /// Closes idle flows; also the turn for sockets left readable by bounded work.
    pub(crate) fn sweep(&mut self, ctx: &mut Ctx<'_>) {
        let (flows, shared) = (&mut self.flows, &self.shared);
        self.table.expire(ctx.now, |(_, client, _), key| {
            log::debug!("udp flow {client}: idle; closed");
            close_flow(flows, shared, key, ctx.now);
        });
        self.close_retired(ctx.registry);
        self.sweeping = !self.table.is_empty();
        if self.sweeping {
            ctx.timers.add(ctx.now + sweep_every(self.settings.timeout), Timer::UdpSweep);
        }
    }

    /// UDP counters per listener, with open flows, for statistics.
    pub(crate) fn flows_of(&self, listener: Key) -> usize {
        self.flows.iter().filter(|(_, f)| f.listener == listener).count()
    }
}

/// A socket left readable when its bounded work ran out.
enum Ready {
    Listener(Key),
    Flow(Key),
}

/// Datagrams received but not yet sent on, reused batch after batch so the
/// per-packet path allocates nothing.
#[derive(Default)]
struct OutQueue {
    /// Each datagram, with the flow (slab key) it goes to.
    pending: Vec<(Key, Out)>,
    /// One flow's share of `pending`, contiguous for `sendmmsg` (and the
    /// reply path's send list).
    outs: Vec<Out>,
}

/// Sends the queued datagrams, each flow's in one sendmmsg, and empties the queue.
fn flush(batch: &mut Batch, flows: &mut Slab<Flow>, l: &mut UdpListener, queue: &mut OutQueue) {
    let OutQueue { pending, outs } = queue;
    group_by_flow(pending);
    for run in pending.chunk_by(|a, b| a.0 == b.0) {
        let Some(flow) = flows.get_mut(run[0].0) else {
            l.stats.up.add_dropped(DropReason::NoFlow, run.len());
            continue;
        };
        outs.clear();
        outs.extend(run.iter().map(|&(_, out)| out));
        // One PROXY header per flow, in front of each of its datagrams.
        let (plen, prefix) = l.send_proxy.map_or((0, [0; 64]), |v| proxy_prefix(v, flow, l.addr));
        send_all(batch, flow.sock.as_fd(), outs, &prefix[..plen], &mut flow.gso, &mut l.stats.up);
    }
    pending.clear();
    outs.clear();
}

/// Puts each flow's datagrams together, so clients whose datagrams arrive
/// interleaved still cost one sendmmsg per flow, not one per datagram. A
/// flow's datagrams keep their order; order across flows is not kept, as
/// they leave through different sockets.
fn group_by_flow(pending: &mut [(Key, Out)]) {
    // The queue holds one received batch, so (buffer, offset in it) is the
    // arrival order, and an unstable sort on (flow, arrival) keeps it
    // without the scratch memory a stable sort allocates.
    pending.sort_unstable_by_key(|&(flow, out)| (flow, out.index, out.offset));
}

/// How long the port of a closed flow socket is kept from new flows: a
/// backend reply that comes later than this may reach a newer flow.
pub(crate) const PORT_HOLD: Duration = Duration::from_secs(10);
/// Random ports tried per flow when the kernel picks a held one.
const PORT_TRIES: usize = 8;

/// Closes a flow's socket, holds its port back from new flows (of every
/// loop) and frees its place under the flow bound.
fn close_flow(flows: &mut Slab<Flow>, shared: &Shared, key: Key, now: std::time::Instant) {
    if let Some(f) = flows.remove(key) {
        if f.port != 0 {
            shared.held_ports().release(f.port, now);
        }
    }
}

/// A socket connected to `target` whose local port is not held, and that
/// port. The kernel's pick is taken when it is free of holds; otherwise the
/// socket is closed first (so there are never more flow sockets than the
/// bound) and random unheld ports of the ephemeral range are tried. After
/// PORT_TRIES, the kernel's pick is taken whatever it is.
fn flow_socket(target: SocketAddr, shared: &Shared, now: std::time::Instant) -> io::Result<(OwnedFd, u16)> {
    let mut held = shared.held_ports();
    let fd = crate::sys::udp_connected(target)?;
    let port = crate::sys::local_addr(fd.as_fd())?.port();
    if !held.is_held(port, now) {
        return Ok((fd, port));
    }
    drop(fd);
    let (lo, hi) = *EPHEMERAL.get_or_init(crate::sys::ephemeral_ports);
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut x = (u64::from(clock.subsec_nanos()) ^ u64::from(port) << 32).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..PORT_TRIES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let candidate = lo + (x % (u64::from(hi - lo) + 1)) as u16;
        if held.is_held(candidate, now) {
            continue;
        }
        match crate::sys::udp_connected_from(target, candidate) {
            Ok(fd) => return Ok((fd, candidate)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    let fd = crate::sys::udp_connected(target)?;
    let port = crate::sys::local_addr(fd.as_fd())?.port();
    log::debug!("udp: no unheld local port in {PORT_TRIES} tries; using {port}");
    Ok((fd, port))
}

/// The ephemeral port range, read once.
static EPHEMERAL: std::sync::OnceLock<(u16, u16)> = std::sync::OnceLock::new();

/// Creates a flow: a socket connected to the backend, registered for replies.
#[allow(clippy::too_many_arguments)]
fn open_flow(
    flows: &mut Slab<Flow>,
    table: &mut FlowTable<FlowKey, Key>,
    shared: &Shared,
    idx: Key,
    l: &mut UdpListener,
    client: SocketAddr,
    reply_from: Option<PktInfo>,
    ctx: &mut Ctx<'_>,
) -> Option<Key> {
    // Close the least recently used flow first: never more than max_flows sockets.
    if let Some((_, old)) = table.make_room() {
        log::debug!("udp flow table full; least recently used flow closed");
        close_flow(flows, shared, old, ctx.now);
    }
    let opened = match transparent::source(l.transparent, unmap(client), l.target, true) {
        // The client's own address and port: no other flow can have it, so
        // the port hold does not apply.
        Source::Client(from) => crate::sys::udp_connected_transparent(l.target, from).map(|fd| (fd, 0)),
        other => {
            if other == Source::OtherFamily {
                l.stats.transparent_fallbacks += 1;
                if !std::mem::replace(&mut l.fallback_logged, true) {
                    log::warn!(
                        "udp {} -> {}: no transparent flow across address families; this forward's such clients \
                         send from the relay's own address (counted as transparent fallbacks; logged once)",
                        unmap(client),
                        l.target
                    );
                }
            }
            flow_socket(l.target, shared, ctx.now)
        }
    };
    let (fd, port) = match opened {
        Ok(s) => s,
        Err(e) => {
            log::warn!("udp {client} -> {}: cannot open a flow: {e}", l.target);
            return None;
        }
    };
    if l.flow_gso != Gso::OFF {
        crate::sys::mmsg::enable_gro(fd.as_fd());
    }
    let mut sock = UdpSocket::from_std(std::net::UdpSocket::from(fd));
    let key = flows.vacant_key();
    if let Err(e) = ctx.registry.register(&mut sock, token(Kind::UdpFlow, key), Interest::READABLE) {
        log::warn!("udp {client}: cannot register a flow: {e}");
        return None;
    }
    flows.insert(Flow { sock, listener: idx, client, reply_from, gso: l.flow_gso, queued: false, port });
    l.stats.flows_total += 1;
    l.stats.flows_transparent += u64::from(port == 0);
    log::debug!("udp flow {} -> {} -> {} opened", unmap(client), l.addr, l.target);
    if let Some((_, old)) = table.insert((idx, client, reply_from.map(|d| d.ip())), key, ctx.now) {
        close_flow(flows, shared, old, ctx.now);
    }
    Some(key)
}

/// The PROXY header put in front of each datagram of a flow.
fn proxy_prefix(v: Version, flow: &Flow, listen: SocketAddr) -> (usize, [u8; 64]) {
    let mut buf = [0u8; pp::MAX_ENCODED_LEN];
    let local = flow.reply_from.map_or(listen, |p| SocketAddr::new(p.ip(), listen.port()));
    let len = pp::encode(v, Transport::Datagram, unmap(flow.client), unmap(local), &mut buf).min(64);
    let mut p = [0u8; 64];
    p[..len].copy_from_slice(&buf[..len]);
    (len, p)
}

/// Sends every datagram of `outs` it can, counting each in `stats` as sent
/// or dropped (send buffer full, or its send failed).
fn send_all(
    batch: &mut Batch,
    fd: std::os::fd::BorrowedFd<'_>,
    outs: &[Out],
    prefix: &[u8],
    gso: &mut Gso,
    stats: &mut UdpDirStats,
) {
    let mut done = 0;
    while done < outs.len() {
        match batch.send(fd, &outs[done..], prefix, gso) {
            Ok(0) => {
                stats.add_dropped(DropReason::SendBufferFull, outs.len() - done);
                return;
            }
            Ok(n) => {
                stats.sent += n as u64;
                stats.bytes_sent += outs[done..done + n].iter().map(|o| o.len as u64).sum::<u64>();
                done += n;
            }
            Err(e) => {
                // One bad datagram (EMSGSIZE; ECONNREFUSED from a stale ICMP,
                // which the failed send consumed): skip it, send the rest.
                log::debug!("udp send: {e}");
                stats.add_dropped(DropReason::SendError, 1);
                done += 1;
            }
        }
    }
}

fn sweep_every(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::alloc_count::allocations;

    #[test]
    fn grouping_by_flow_keeps_each_flows_order_and_allocates_nothing() {
        // 4 flows interleaved over a batch of 32 GRO buffers of 4 segments:
        // 128 datagrams, more than a stable sort can sort on the stack.
        let flows = [Key::from_parts(3, 0), Key::from_parts(1, 2), Key::from_parts(0, 0), Key::from_parts(2, 1)];
        let mut pending = Vec::with_capacity(BATCH * 4);
        for index in 0..BATCH {
            for seg in 0..4 {
                let out = Out { index, offset: seg * 100, len: 100, to: None, from: None };
                pending.push((flows[(index + seg) % 4], out));
            }
        }
        let before = allocations();
        group_by_flow(&mut pending);
        assert_eq!(allocations(), before, "grouping a batch allocated");
        let runs: Vec<_> = pending.chunk_by(|a, b| a.0 == b.0).collect();
        assert_eq!(runs.len(), 4, "each flow's datagrams together");
        for run in runs {
            assert_eq!(run.len(), BATCH);
            let arrival: Vec<_> = run.iter().map(|(_, o)| (o.index, o.offset)).collect();
            assert!(arrival.is_sorted(), "a flow's datagrams out of arrival order: {arrival:?}");
        }
    }

    /// Whether a socket reports destination addresses (IP_PKTINFO, or
    /// IPV6_RECVPKTINFO on an IPv6 socket).
    fn pktinfo(fd: std::os::fd::BorrowedFd<'_>, ipv6: bool) -> bool {
        use nix::sys::socket::{getsockopt, sockopt};
        if ipv6 { getsockopt(&fd, sockopt::Ipv6RecvPacketInfo) } else { getsockopt(&fd, sockopt::Ipv4PacketInfo) }
            .unwrap()
    }

    #[test]
    fn add_listener_is_the_one_place_pktinfo_is_turned_on() {
        let poll = mio::Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), mio::Token(1)).unwrap();
        let shared = Arc::new(Shared::new(vec![waker], 0, 0));
        let settings = UdpSettings { timeout: Duration::from_secs(90), max_flows: 16, gso: false, rcvbuf: 0 };
        let mut relay = UdpRelay::new(settings, shared, 0);
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let forward = &crate::config::parse_forward(
                &format!("udp:{}1=127.0.0.1:9", &addr[..addr.len() - 1]),
                &|_| unreachable!(),
            )
            .unwrap()[0];
            let addr: SocketAddr = addr.parse().unwrap();
            let fd = crate::sys::udp_listener(addr, true, false).unwrap();
            assert!(!pktinfo(fd.as_fd(), addr.is_ipv6()), "{addr}: udp_listener turned PKTINFO on");
            // A socket made elsewhere, like docker's fd 4, gets it from add_listener.
            let sock = std::net::UdpSocket::from(fd);
            relay.add_listener(sock, forward, poll.registry()).unwrap();
            let (_, l) = relay.listeners.iter().last().unwrap();
            assert!(pktinfo(l.sock.as_fd(), addr.is_ipv6()), "{addr}: add_listener left PKTINFO off");
        }
    }
}
