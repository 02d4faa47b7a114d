//! splice-relay: a Linux TCP/UDP port relay.
//!
//! The data path, in one paragraph: one thread runs one mio `Poll`
//! ([`event_loop`]). A TCP connection is two [`tcp::direction::Direction`]s;
//! each moves bytes source socket -> pipe -> destination socket with
//! splice(2), so payload never enters user memory. Pipes are lent from a
//! capped pool only while bytes are in flight ([`tcp::pipe_pool`]). UDP is
//! read and written in batches with recvmmsg/sendmmsg ([`sys::mmsg`]); each
//! client is a flow with its own connected socket to the backend, kept in a
//! bounded table with idle expiry ([`udp::flow_table`]). Every `unsafe` block
//! lives in [`sys`].
//!
//! Modules: [`cli`] and [`config`] parse the native command line,
//! [`docker`] speaks docker-proxy's flags and fd 3 handshake,
//! [`proxy_protocol`] encodes and parses PROXY headers, [`metrics`] reports.

pub(crate) mod cidr;
pub mod cli;
pub mod config;
pub mod docker;
pub(crate) mod event_loop;
pub mod logging;
pub(crate) mod metrics;
pub mod proxy_protocol;
pub(crate) mod reactor;
pub mod reload;
pub(crate) mod shared;
pub(crate) mod slab;
pub(crate) mod stats;
pub(crate) mod sys;
pub(crate) mod systemd;
pub(crate) mod tcp;
pub(crate) mod timer;
pub(crate) mod transparent;
pub(crate) mod udp;

use std::os::fd::OwnedFd;

use cli::Config;
use config::StartError;
use event_loop::EventLoop;
use shared::Shared;
use std::sync::Arc;
use tcp::TcpRelay;
use udp::UdpRelay;

/// Shows an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`, what a
/// dual-stack socket reports for an IPv4 peer) as plain IPv4 (`a.b.c.d:p`),
/// for logs, limits and PROXY headers. Other addresses pass through.
pub(crate) fn unmap(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// One loop's listening sockets, bound before any loop starts (or by a reload).
#[derive(Default)]
pub(crate) struct Bound {
    /// (forward index, socket, registered with EPOLLEXCLUSIVE).
    tcp: Vec<(usize, OwnedFd, bool)>,
    /// (forward index, socket).
    udp: Vec<(usize, OwnedFd)>,
}

/// Raises the open-file limit, binds every listener of `config` for each of
/// its `threads` loops (or adopts `listen_fd`, docker's fd 4, for its single
/// forward, or the sockets systemd passed, for the forwards they match),
/// calls `ready` once all are bound and every loop is set up (and tells
/// systemd `READY=1` if NOTIFY_SOCKET is set), and relays until SIGINT or
/// SIGTERM (or the drain's end). On SIGHUP, `reread` gives the configuration
/// to reload (None: SIGHUP is logged and ignored).
pub fn run(
    config: &Config,
    listen_fd: Option<OwnedFd>,
    reread: Option<reload::Reread>,
    ready: impl FnOnce(),
) -> Result<(), StartError> {
    let runtime = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| StartError::Runtime(format!("{what}: {e}"))
    };
    if let Err(e) = sys::raise_nofile_limit() {
        log::warn!("cannot raise the open-file limit: {e}");
    }
    let n = config.threads.max(1);
    if n > 1 {
        check_overlaps(config)?;
    }
    if config.forwards.iter().any(|f| f.transparent.is_some()) {
        check_transparent()?;
    }
    // Before any thread exists, so every thread inherits the mask.
    let mask = event_loop::block_signals().map_err(runtime("cannot set up signals"))?;
    let polls = (0..n)
        .map(|_| mio::Poll::new())
        .collect::<Result<Vec<_>, _>>()
        .map_err(runtime("cannot set up the event loop"))?;
    let wakers = polls
        .iter()
        .map(|p| mio::Waker::new(p.registry(), event_loop::waker_token()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(runtime("cannot set up the event loop"))?;
    let shared = Arc::new(Shared::new(wakers, config.tcp.max_connections, config.tcp.max_per_source));
    let mut bound = bind(config, listen_fd, n)?;
    let mut polls = polls.into_iter();
    let first = polls.next().ok_or_else(|| StartError::Runtime("no event loop".into()))?;
    let b0 = std::mem::take(&mut bound[0]);
    let mut ev0 = setup(config, 0, first, b0, shared.clone(), Some(&mask))?;
    ev0.reloader = reread.map(|r| reload::Reloader::new(r, config));
    if let Some(addr) = config.metrics {
        let m = metrics::Metrics::bind(addr, ev0.registry())
            .map_err(|e| StartError::Runtime(format!("cannot serve metrics on {addr}: {e}")))?;
        ev0.metrics = Some(m);
        log::info!("metrics on http://{addr}/metrics");
    }
    // The other loops are set up on their own threads (their loops hold
    // what cannot cross threads), and say whether that worked before `ready`.
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), StartError>>();
    let mut workers = Vec::new();
    for (i, (poll, b)) in polls.zip(bound.into_iter().skip(1)).enumerate() {
        let me = i + 1;
        let (shared_t, tx) = (shared.clone(), tx.clone());
        let cfg = (config.tcp.clone(), config.udp, config.event_loop, config.forwards.clone());
        let spawned = std::thread::Builder::new().name(format!("relay-{me}")).spawn(move || {
            let (tcp, udp, settings, forwards) = cfg;
            let shared = shared_t;
            let built = setup_parts(me, poll, b, shared.clone(), tcp, udp, settings, &forwards, None);
            match built {
                Ok(mut ev) => {
                    let _ = tx.send(Ok(()));
                    drop(tx);
                    ev.run().map_err(|e| StartError::Runtime(format!("event loop {me} failed: {e}")))
                }
                Err(e) => {
                    shared.running.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    let _ = tx.send(Err(e.clone()));
                    Err(e)
                }
            }
        });
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) => {
                shared.stop.store(true, std::sync::atomic::Ordering::Release);
                shared.wake_others(0);
                return Err(StartError::Runtime(format!("cannot start a thread: {e}")));
            }
        }
    }
    drop(tx);
    let mut setup_error = None;
    for r in rx.iter().take(n - 1) {
        if let Err(e) = r {
            setup_error.get_or_insert(e);
        }
    }
    if let Some(e) = setup_error {
        shared.stop.store(true, std::sync::atomic::Ordering::Release);
        shared.wake_others(0);
        for w in workers {
            let _ = w.join();
        }
        return Err(e);
    }
    // Only now is every loop set up (its signalfd, its registrations): what
    // the log and `ready` announce is a relay that is fully there.
    for f in &config.forwards {
        log::info!("listening on {} {} -> {}", f.proto, f.listen, f.target);
    }
    log::info!("{n} event loop{}", if n == 1 { "" } else { "s, one thread each" });
    ready();
    systemd::notify("READY=1");
    let mut result = ev0.run().map_err(|e| StartError::Runtime(format!("event loop failed: {e}")));
    for w in workers {
        let r = w.join().unwrap_or_else(|_| Err(StartError::Runtime("an event loop thread panicked".into())));
        if result.is_ok() {
            result = r;
        }
    }
    result
}

/// Refuses to start a transparent relay that may not set IP_TRANSPARENT:
/// every connection would fail otherwise.
pub(crate) fn check_transparent() -> Result<(), StartError> {
    match sys::transparent_allowed() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(StartError::Runtime(
            "--transparent needs CAP_NET_ADMIN (setting IP_TRANSPARENT was refused: run as root or grant the capability)"
                .into(),
        )),
        Err(e) => Err(StartError::Runtime(format!("--transparent: cannot set IP_TRANSPARENT: {e}"))),
    }
}

/// With several loops every listening socket has SO_REUSEPORT, so two
/// forwards of one protocol on overlapping addresses would both bind and
/// share their clients: refuse them as the kernel refuses a second bind
/// with one loop.
fn check_overlaps(config: &Config) -> Result<(), StartError> {
    match overlaps(&config.forwards, config.ipv6_only, config.metrics).into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Every pair of forwards of one protocol whose listen addresses overlap,
/// and a `--metrics` address that overlaps a TCP forward's.
pub(crate) fn overlaps(
    fw: &[config::Forward],
    ipv6_only: bool,
    metrics: Option<std::net::SocketAddr>,
) -> Vec<StartError> {
    // Only forwards on one port can overlap: compare within each port.
    let mut by_port: std::collections::BTreeMap<u16, Vec<&config::Forward>> = Default::default();
    for f in fw {
        by_port.entry(f.listen.port()).or_default().push(f);
    }
    let mut problems = Vec::new();
    for same_port in by_port.values() {
        for (i, a) in same_port.iter().enumerate() {
            for b in &same_port[i + 1..] {
                let proto = match (a.proto.tcp() && b.proto.tcp(), a.proto.udp() && b.proto.udp()) {
                    (true, _) => "tcp",
                    (_, true) => "udp",
                    _ => continue,
                };
                if overlap(a.listen.ip(), b.listen.ip(), ipv6_only) {
                    problems.push(StartError::Runtime(format!(
                        "cannot listen on {proto} {}: Address already in use (by the forward {})",
                        b.listen,
                        config::quote(&a.spec)
                    )));
                }
            }
        }
    }
    if let Some(m) = metrics {
        let clash = by_port
            .get(&m.port())
            .into_iter()
            .flatten()
            .find(|f| f.proto.tcp() && overlap(f.listen.ip(), m.ip(), ipv6_only));
        if let Some(f) = clash {
            problems.push(StartError::Runtime(format!(
                "cannot serve metrics on {m}: Address already in use (by the forward {})",
                config::quote(&f.spec)
            )));
        }
    }
    problems
}

/// `--check`: what [`run`] would refuse before binding, found without
/// binding anything: no forward, and overlapping listen addresses (for
/// any `--threads`, and `--metrics` against TCP forwards).
pub fn check(config: &Config) -> Vec<StartError> {
    let mut problems = Vec::new();
    if config.forwards.is_empty() {
        problems.push(StartError::Usage(NOTHING_TO_RELAY.into()));
    }
    problems.extend(overlaps(&config.forwards, config.ipv6_only, config.metrics));
    problems
}

/// The error for a command line with no forward.
pub const NOTHING_TO_RELAY: &str = "nothing to relay: give at least one FORWARD or --config FILE (see --help)";

/// True if sockets bound to `a` and `b` (same port) would take the same clients.
pub(crate) fn overlap(a: std::net::IpAddr, b: std::net::IpAddr, ipv6_only: bool) -> bool {
    use std::net::IpAddr::{V4, V6};
    let dual = |ip: std::net::IpAddr| matches!(ip, V6(v6) if v6.is_unspecified() && !ipv6_only);
    match (a, b) {
        _ if a == b => true,
        (V4(x), V4(y)) => x.is_unspecified() || y.is_unspecified(),
        (V6(x), V6(y)) => x.is_unspecified() || y.is_unspecified(),
        _ => dual(a) || dual(b),
    }
}

/// Binds every forward's listening sockets for each of `n` loops: one socket
/// per loop with SO_REUSEPORT when `n > 1`. Docker's inherited socket
/// (`listen_fd`) and systemd's activated sockets, matched to forwards by
/// address and protocol, are shared: a TCP one by every loop, with
/// EPOLLEXCLUSIVE; a UDP one by loop 0 only. An activated socket no
/// forward matches is closed with a warning.
fn bind(config: &Config, listen_fd: Option<OwnedFd>, n: usize) -> Result<Vec<Bound>, StartError> {
    let runtime = |what: String| move |e: std::io::Error| StartError::Runtime(format!("{what}: {e}"));
    let mut bound: Vec<Bound> = (0..n).map(|_| Bound::default()).collect();
    let mut listen_fd = listen_fd;
    // Socket activation: matched to forwards by address and protocol (docker's fd 4 wins).
    let mut activated = if listen_fd.is_none() { systemd::activated_sockets()? } else { Vec::new() };
    let mut take_activated = |f: &config::Forward, tcp: bool| {
        let i = activated.iter().position(|s| s.tcp == tcp && s.addr == f.listen)?;
        let s = activated.swap_remove(i);
        log::info!("{} {}: the socket from systemd, {}", if tcp { "tcp" } else { "udp" }, f.listen, s.what);
        Some(s.fd)
    };
    let reuseport = n > 1;
    for (fi, f) in config.forwards.iter().enumerate() {
        let v6only = v6only(f.listen, config.ipv6_only);
        if f.proto.tcp() {
            if let Some(fd) = listen_fd.take().or_else(|| take_activated(f, true)) {
                for b in bound.iter_mut().skip(1) {
                    let dup = fd.try_clone().map_err(runtime(format!("cannot share tcp listener {}", f.listen)))?;
                    b.tcp.push((fi, dup, true));
                }
                bound[0].tcp.push((fi, fd, reuseport));
            } else {
                for b in &mut bound {
                    let fd = sys::tcp_listener(f.listen, v6only, 1024, reuseport)
                        .map_err(runtime(format!("cannot listen on tcp {}", f.listen)))?;
                    b.tcp.push((fi, fd, false));
                }
            }
        }
        if f.proto.udp() {
            if let Some(fd) = listen_fd.take().or_else(|| take_activated(f, false)) {
                bound[0].udp.push((fi, fd));
            } else {
                for b in &mut bound {
                    let fd = sys::udp_listener(f.listen, v6only, reuseport)
                        .map_err(runtime(format!("cannot listen on udp {}", f.listen)))?;
                    b.udp.push((fi, fd));
                }
            }
        }
    }
    for s in activated {
        log::warn!(
            "the socket from systemd {} ({} {}) matches no forward; closed",
            s.what,
            if s.tcp { "tcp" } else { "udp" },
            s.addr
        );
    }
    Ok(bound)
}

/// IPV6_V6ONLY for a socket bound to `listen`: `[::]` is dual-stack unless
/// --ipv6-only; any other IPv6 address is IPv6-only.
pub(crate) fn v6only(listen: std::net::SocketAddr, ipv6_only: bool) -> bool {
    match listen.ip() {
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => ipv6_only,
        _ => true,
    }
}

/// Loop `me` with its bound sockets, on the calling thread.
fn setup(
    config: &Config,
    me: usize,
    poll: mio::Poll,
    bound: Bound,
    shared: Arc<Shared>,
    mask: Option<&nix::sys::signal::SigSet>,
) -> Result<EventLoop, StartError> {
    setup_parts(me, poll, bound, shared, config.tcp.clone(), config.udp, config.event_loop, &config.forwards, mask)
}

#[allow(clippy::too_many_arguments)]
fn setup_parts(
    me: usize,
    poll: mio::Poll,
    bound: Bound,
    shared: Arc<Shared>,
    tcp: tcp::TcpSettings,
    udp: udp::UdpSettings,
    settings: event_loop::LoopSettings,
    forwards: &[config::Forward],
    mask: Option<&nix::sys::signal::SigSet>,
) -> Result<EventLoop, StartError> {
    let runtime = |what: String| move |e: std::io::Error| StartError::Runtime(format!("{what}: {e}"));
    let tcp = TcpRelay::new(tcp, shared.clone(), me);
    let mut udp = udp;
    udp.max_flows = shared::flow_share(udp.max_flows, shared.threads(), me);
    let udp = UdpRelay::new(udp, shared.clone(), me);
    let mut ev = EventLoop::new(me, poll, tcp, udp, settings, shared, mask)
        .map_err(runtime("cannot set up the event loop".into()))?;
    let registry = ev.registry().try_clone().map_err(runtime("cannot set up the event loop".into()))?;
    for (fi, fd, exclusive) in bound.tcp {
        let f = &forwards[fi];
        ev.tcp
            .add_listener(std::net::TcpListener::from(fd), f.listen, f.route(), &registry, exclusive)
            .map_err(runtime(format!("cannot use tcp listener {}", f.listen)))?;
    }
    for (fi, fd) in bound.udp {
        let f = &forwards[fi];
        ev.udp
            .add_listener(std::net::UdpSocket::from(fd), f, &registry)
            .map_err(runtime(format!("cannot use udp socket {}", f.listen)))?;
    }
    Ok(ev)
}
