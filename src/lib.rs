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
pub(crate) mod slab;
pub(crate) mod stats;
pub(crate) mod sys;
pub(crate) mod tcp;
pub(crate) mod timer;
pub(crate) mod transparent;
pub(crate) mod udp;

use std::os::fd::OwnedFd;

use cli::Config;
use config::StartError;
use event_loop::EventLoop;
use tcp::TcpRelay;
use udp::UdpRelay;

/// Shows an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`, what a
/// dual-stack socket reports for an IPv4 peer) as plain IPv4 (`a.b.c.d:p`),
/// for logs, limits and PROXY headers. Other addresses pass through.
pub(crate) fn unmap(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Raises the open-file limit, binds every listener of `config` (or adopts
/// `listen_fd`, docker's fd 4, for its single forward), calls `ready` once
/// all are bound, and relays until SIGINT or SIGTERM (or the drain's end).
pub fn run(config: &Config, listen_fd: Option<OwnedFd>, ready: impl FnOnce()) -> Result<(), StartError> {
    if let Err(e) = sys::raise_nofile_limit() {
        log::warn!("cannot raise the open-file limit: {e}");
    }
    let mut ev = build(config, listen_fd)?;
    ready();
    ev.run().map_err(|e| StartError::Runtime(format!("event loop failed: {e}")))
}

/// Refuses to start a transparent relay that may not set IP_TRANSPARENT:
/// every connection would fail otherwise.
fn check_transparent() -> Result<(), StartError> {
    match sys::transparent_allowed() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(StartError::Runtime(
            "--transparent needs CAP_NET_ADMIN (setting IP_TRANSPARENT was refused: run as root or grant the capability)"
                .into(),
        )),
        Err(e) => Err(StartError::Runtime(format!("--transparent: cannot set IP_TRANSPARENT: {e}"))),
    }
}

/// Binds every listener of `config` (or adopts `listen_fd`, docker's fd 4,
/// for its single forward) and returns a loop ready to run.
fn build(config: &Config, listen_fd: Option<OwnedFd>) -> Result<EventLoop, StartError> {
    let runtime = |what: String| move |e: std::io::Error| StartError::Runtime(format!("{what}: {e}"));
    let mut ev = EventLoop::new(TcpRelay::new(config.tcp.clone()), UdpRelay::new(config.udp), config.event_loop)
        .map_err(runtime("cannot set up the event loop".into()))?;
    let registry = ev.registry().try_clone().map_err(runtime("cannot set up the event loop".into()))?;
    if config.forwards.iter().any(|f| f.transparent.is_some()) {
        check_transparent()?;
    }
    let mut listen_fd = listen_fd;
    for f in &config.forwards {
        // `[::]` is dual-stack unless --ipv6-only; any other IPv6 address is IPv6-only.
        let v6only = match f.listen.ip() {
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => config.ipv6_only,
            _ => true,
        };
        if f.proto.tcp() {
            let fd = match listen_fd.take() {
                Some(fd) => fd,
                None => sys::tcp_listener(f.listen, v6only, 1024)
                    .map_err(runtime(format!("cannot listen on tcp {}", f.listen)))?,
            };
            let sock = std::net::TcpListener::from(fd);
            ev.tcp
                .add_listener(sock, f.target, f.send_proxy, f.accept_proxy, f.transparent, &registry)
                .map_err(runtime(format!("cannot use tcp listener {}", f.listen)))?;
        }
        if f.proto.udp() {
            let fd = match listen_fd.take() {
                Some(fd) => fd,
                None => sys::udp_listener(f.listen, v6only)
                    .map_err(runtime(format!("cannot listen on udp {}", f.listen)))?,
            };
            let sock = std::net::UdpSocket::from(fd);
            ev.udp
                .add_listener(sock, f.target, f.send_proxy, f.transparent, &registry)
                .map_err(runtime(format!("cannot use udp socket {}", f.listen)))?;
        }
        log::info!("listening on {} {} -> {}", f.proto, f.listen, f.target);
    }
    if let Some(addr) = config.metrics {
        let m =
            metrics::Metrics::bind(addr, ev.registry()).map_err(runtime(format!("cannot serve metrics on {addr}")))?;
        ev.metrics = Some(m);
        log::info!("metrics on http://{addr}/metrics");
    }
    Ok(ev)
}
