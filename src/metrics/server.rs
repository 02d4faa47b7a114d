//! The metrics endpoint: a small HTTP/1.0 server on the event loop that
//! answers `GET /metrics` (and `GET /`) with the Prometheus page.
//!
//! Scrapers must never cost the data path fds or turns. So clients are
//! capped in number (the others wait in the listen backlog, holding no fd of
//! ours) and bounded in time and memory; the page is built at most once per
//! [`PAGE_TTL`] and shared by every client; and each response is written in
//! pieces as the client's socket takes them, at most [`WRITE_BUDGET`] bytes
//! per client per turn.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use super::http::{self, Answer, HeadRead, WriteEnd};
use crate::reactor::{Ctx, Kind, fixed_token, token};
use crate::slab::{Key, Slab};
use crate::timer::Timer;

/// Most metrics clients served at once. Past it, new clients wait in the
/// listen backlog until one leaves, as at HAProxy's maxconn: a waiting
/// client holds no fd of ours, and a burst of scrapers is served in turn
/// rather than refused. Prometheus needs one connection per scraper.
const MAX_CLIENTS: usize = 16;
/// Metrics clients never hold more than 1/`FD_SHARE` of the open-file
/// limit (at least one), so that under a small limit the fds stay with the
/// data path: 4 clients at 64 fds, the full 16 from 256 fds up.
const FD_SHARE: u64 = 16;
/// Clients that may wait in the listen backlog (the kernel caps it at
/// net.core.somaxconn); the forwards' listeners use the same.
const BACKLOG: i32 = 1024;
/// From accept to the blank line that ends the request head; a client that
/// trickles its request (slowloris) is answered 408 and closed.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// From the end of the request head until the whole response is handed to
/// the kernel; a client that does not read its response by then is reset.
/// Prometheus' own default scrape timeout is also 10 s.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a built page is served before the next scrape builds it again,
/// so scrapes cost one page per second however many there are; the
/// counters a scrape sees lag by at most this much.
const PAGE_TTL: Duration = Duration::from_secs(1);
/// Bytes written to one client per turn; the rest waits until the data path
/// and the other clients had theirs.
const WRITE_BUDGET: usize = 64 << 10;

/// One metrics client, in the phase of its single request.
struct Client {
    sock: TcpStream,
    /// When the current phase must be over.
    deadline: Instant,
    phase: Phase,
}

/// Where a client's single request/response exchange is.
enum Phase {
    /// Reading the request head, at most `http::MAX_HEAD` bytes.
    Head(Vec<u8>),
    /// Writing `resp`, of which `sent` bytes are out.
    Reply { resp: Rc<[u8]>, sent: usize },
}

/// The metrics HTTP server: its listener, clients, and the shared page.
pub struct Metrics {
    listener: TcpListener,
    /// The listener may have clients waiting (no WouldBlock since its last edge).
    pending: bool,
    clients: Slab<Client>,
    /// `MAX_CLIENTS`, or less under a small fd limit.
    max_clients: usize,
    /// The last response page built, and when.
    page: Option<(Instant, Rc<[u8]>)>,
    /// Clients whose turn's budget ran out with bytes left to write.
    ready: Vec<Key>,
    /// The last accept failed for lack of fds or memory (warned once).
    starved: bool,
}

impl Metrics {
    /// Listens on `addr`.
    pub fn bind(addr: SocketAddr, registry: &Registry) -> io::Result<Metrics> {
        // Like a forward: `[::]` is dual-stack, any other IPv6 address IPv6-only.
        let fd = crate::sys::tcp_listener(addr, !addr.ip().is_unspecified(), BACKLOG, false)?;
        let mut listener = TcpListener::from_std(std::net::TcpListener::from(fd));
        registry.register(&mut listener, fixed_token(Kind::Metrics, 0), Interest::READABLE)?;
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(soft, _)| soft);
        let max_clients = client_cap(nofile.unwrap_or(u64::MAX));
        log::debug!("metrics: at most {max_clients} clients at once");
        Ok(Metrics {
            listener,
            pending: true,
            clients: Slab::default(),
            max_clients,
            page: None,
            ready: Vec::new(),
            starved: false,
        })
    }

    /// Readiness on the listener or a client; `page` builds the metrics
    /// text, called only when the shared page is due to be built again.
    pub(crate) fn event(&mut self, kind: Kind, key: Key, page: impl FnOnce() -> String, ctx: &mut Ctx<'_>) {
        if kind == Kind::Metrics {
            self.pending = true;
            self.accept(ctx);
            return;
        }
        let Some(c) = self.clients.get_mut(key) else { return };
        if let Phase::Head(buf) = &mut c.phase {
            let answer = match http::read_head(&mut c.sock, buf) {
                HeadRead::More => return,
                HeadRead::Done(answer) => answer,
                HeadRead::Gone => return self.close(key, false, ctx),
            };
            let resp = match answer {
                Answer::Page => shared_page(&mut self.page, ctx.now, page),
                Answer::Refuse(why) => why.response().into(),
            };
            c.phase = Phase::Reply { resp, sent: 0 };
            c.deadline = ctx.now + WRITE_TIMEOUT;
        }
        self.write_out(key, ctx);
    }

    /// A client's deadline fired (it may have moved later since).
    pub(crate) fn timer(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(c) = self.clients.get_mut(key) else { return };
        if c.deadline > ctx.now {
            ctx.timers.add(c.deadline, Timer::Metrics(key));
            return;
        }
        match c.phase {
            Phase::Head(_) => {
                log::debug!("metrics client: no request head within {HEAD_TIMEOUT:?}; closed");
                // Best effort, in one write: the client is not waiting for it.
                let _ = c.sock.write(&http::error_response(408, "Request Timeout", ""));
                self.close(key, false, ctx);
            }
            Phase::Reply { .. } => {
                log::debug!("metrics client: response not taken within {WRITE_TIMEOUT:?}; reset");
                self.close(key, true, ctx);
            }
        }
    }

    /// True if some client has bytes left from a spent budget.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Continues the clients whose budget ran out last turn.
    pub(crate) fn run_ready(&mut self, ctx: &mut Ctx<'_>) {
        for key in std::mem::take(&mut self.ready) {
            self.write_out(key, ctx);
        }
    }

    /// Accepts waiting clients while there is room. Past the cap they stay
    /// in the backlog; a client leaving takes the next one. Out of fds, the
    /// next edge (a new client) or a client leaving tries again: no timer,
    /// and no spinning.
    fn accept(&mut self, ctx: &mut Ctx<'_>) {
        while self.pending && self.clients.len() < self.max_clients {
            match self.listener.accept() {
                Ok((mut sock, peer)) => {
                    let key = self.clients.vacant_key();
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) = ctx.registry.register(&mut sock, token(Kind::MetricsConn, key), interest) {
                        log::debug!("metrics client {peer}: cannot register: {e}");
                        continue;
                    }
                    let deadline = ctx.now + HEAD_TIMEOUT;
                    ctx.timers.add(deadline, Timer::Metrics(key));
                    self.clients.insert(Client { sock, deadline, phase: Phase::Head(Vec::new()) });
                    self.starved = false;
                    log::trace!("metrics client {peer}: accepted");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.pending = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if !crate::sys::out_of_resources(&e) {
                        log::debug!("metrics accept: {e}");
                    } else if !self.starved {
                        log::warn!("metrics accept: {e}; scrapes wait until fds are free");
                        self.starved = true;
                    }
                    return;
                }
            }
        }
    }

    /// Writes as much of a client's response as its socket takes, up to
    /// the budget; closes the client once all of it is out.
    fn write_out(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(c) = self.clients.get_mut(key) else { return };
        let Phase::Reply { resp, sent } = &mut c.phase else { return };
        match http::write_some(&mut c.sock, resp, sent, WRITE_BUDGET) {
            WriteEnd::Done => self.close(key, false, ctx),
            WriteEnd::Blocked => {}
            WriteEnd::Budget => {
                if !self.ready.contains(&key) {
                    self.ready.push(key);
                }
            }
            WriteEnd::Failed(e) => {
                log::debug!("metrics client: {e}");
                self.close(key, true, ctx);
            }
        }
    }

    /// Closes a client (`reset`: with RST, dropping what is unsent) and
    /// takes the next waiting one into its place.
    fn close(&mut self, key: Key, reset: bool, ctx: &mut Ctx<'_>) {
        let Some(mut c) = self.clients.remove(key) else { return };
        if reset {
            crate::sys::set_linger_zero(c.sock.as_fd());
        } else {
            http::drain(&mut c.sock);
        }
        drop(c);
        self.accept(ctx);
    }
}

/// How many clients may be served at once under an open-file limit of `nofile`.
fn client_cap(nofile: u64) -> usize {
    (nofile / FD_SHARE).clamp(1, MAX_CLIENTS as u64) as usize
}

/// The shared response page: the cached one while younger than `PAGE_TTL`,
/// else a new one from `build`.
fn shared_page(cache: &mut Option<(Instant, Rc<[u8]>)>, now: Instant, build: impl FnOnce() -> String) -> Rc<[u8]> {
    if let Some((built, page)) = cache {
        if now.saturating_duration_since(*built) < PAGE_TTL {
            return page.clone();
        }
    }
    let body = build();
    let mut resp = http::page_head(body.len()).into_bytes();
    resp.extend_from_slice(body.as_bytes());
    let page: Rc<[u8]> = resp.into();
    *cache = Some((now, page.clone()));
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::untoken;
    use crate::timer::Timers;
    use mio::{Events, Poll};
    use std::io::Read;

    #[test]
    fn the_page_is_built_at_most_once_per_ttl() {
        let t0 = Instant::now();
        let mut cache = None;
        let builds = std::cell::Cell::new(0);
        let build = |n: u32| {
            let builds = &builds;
            move || {
                builds.set(builds.get() + 1);
                format!("splice_relay_x {n}\n")
            }
        };
        let a = shared_page(&mut cache, t0, build(1));
        let b = shared_page(&mut cache, t0 + PAGE_TTL / 2, build(2));
        assert!(Rc::ptr_eq(&a, &b), "built again within the TTL");
        assert_eq!(builds.get(), 1);
        let c = shared_page(&mut cache, t0 + PAGE_TTL, build(3));
        assert_eq!(builds.get(), 2);
        assert!(!Rc::ptr_eq(&a, &c));
        assert_eq!(
            &c[..],
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 17\r\nConnection: close\r\n\r\nsplice_relay_x 3\n"
        );
    }

    #[test]
    fn the_client_cap_is_a_small_share_of_the_fd_limit() {
        for (nofile, cap) in [(0, 1), (20, 1), (64, 4), (100, 6), (256, 16), (1024, 16), (u64::MAX, 16)] {
            assert_eq!(client_cap(nofile), cap, "at {nofile} fds");
        }
    }

    /// A metrics server on 127.0.0.1 and a poll to drive it by hand.
    struct Harness {
        poll: Poll,
        events: Events,
        timers: Timers,
        m: Metrics,
        addr: SocketAddr,
    }

    impl Harness {
        fn new() -> Harness {
            let poll = Poll::new().unwrap();
            let m = Metrics::bind("127.0.0.1:0".parse().unwrap(), poll.registry()).unwrap();
            let addr = m.listener.local_addr().unwrap();
            Harness { poll, events: Events::with_capacity(64), timers: Timers::default(), m, addr }
        }

        /// One turn of the event loop at time `now`; how many events came.
        fn turn(&mut self, now: Instant, page: &str) -> usize {
            self.poll.poll(&mut self.events, Some(Duration::from_millis(10))).unwrap();
            let mut ctx = Ctx { registry: self.poll.registry(), timers: &mut self.timers, now };
            for ev in self.events.iter() {
                let (kind, key) = untoken(ev.token());
                self.m.event(kind, key, || page.to_string(), &mut ctx);
            }
            self.m.run_ready(&mut ctx);
            while let Some(t) = ctx.timers.pop_due(now) {
                if let Timer::Metrics(key) = t {
                    self.m.timer(key, &mut ctx);
                }
            }
            self.events.iter().count()
        }

        /// Bytes sent so far to the one client that is being answered.
        fn sent(&self) -> Option<usize> {
            self.m.clients.iter().find_map(|(_, c)| match c.phase {
                Phase::Reply { sent, .. } => Some(sent),
                Phase::Head(_) => None,
            })
        }
    }

    /// Reads until EOF or an error, at most `limit` bytes.
    fn read_until_closed(c: &mut std::net::TcpStream, limit: usize) -> (Vec<u8>, io::Result<()>) {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() <= limit {
            match c.read(&mut buf) {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
        (got, Err(io::ErrorKind::FileTooLarge.into()))
    }

    #[test]
    fn a_client_that_does_not_read_is_reset_after_the_write_timeout() {
        let mut h = Harness::new();
        // Far more than the socket buffers hold, so the response stalls.
        let page = "x".repeat(32 << 20);
        let mut client = std::net::TcpStream::connect(h.addr).unwrap();
        client.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let asked = Instant::now();
        let mut stalled = false;
        for _ in 0..2000 {
            let events = h.turn(Instant::now(), &page);
            if events == 0 && !h.m.has_ready() && h.sent().is_some_and(|s| s > 0) {
                stalled = true;
                break;
            }
        }
        assert!(stalled, "the response never stalled (sent {:?})", h.sent());
        let sent = h.sent().unwrap();
        assert!(sent < page.len());
        let deadline = h.m.clients.iter().map(|(_, c)| c.deadline).next().unwrap();
        assert!(deadline >= asked + WRITE_TIMEOUT && deadline <= Instant::now() + WRITE_TIMEOUT);
        h.turn(deadline - Duration::from_millis(1), &page);
        assert_eq!(h.m.clients.len(), 1, "closed before the write timeout");
        h.turn(deadline, &page);
        assert_eq!(h.m.clients.len(), 0, "still open after the write timeout");
        let (got, end) = read_until_closed(&mut client, 64 << 20);
        assert_eq!(end.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset), "after {} bytes", got.len());
        assert!(got.len() <= sent);
    }

    #[test]
    fn a_slow_head_is_answered_408_at_the_head_timeout() {
        let mut h = Harness::new();
        let mut client = std::net::TcpStream::connect(h.addr).unwrap();
        client.write_all(b"GET /metr").unwrap();
        let t0 = Instant::now();
        for _ in 0..100 {
            h.turn(t0, "");
            if h.m.clients.len() == 1 {
                break;
            }
        }
        assert_eq!(h.m.clients.len(), 1);
        h.turn(t0 + HEAD_TIMEOUT - Duration::from_millis(1), "");
        assert_eq!(h.m.clients.len(), 1, "closed before the head timeout");
        h.turn(t0 + HEAD_TIMEOUT, "");
        assert_eq!(h.m.clients.len(), 0, "still open at the head timeout");
        let (got, end) = read_until_closed(&mut client, 1 << 20);
        assert!(end.is_ok(), "{end:?}");
        assert!(got.starts_with(b"HTTP/1.0 408 Request Timeout\r\n"), "{:?}", String::from_utf8_lossy(&got));
    }

    #[test]
    fn clients_past_the_cap_wait_in_the_backlog_and_are_served_in_turn() {
        let mut h = Harness::new();
        h.m.max_clients = 2;
        let mut clients: Vec<_> = (0..5).map(|_| std::net::TcpStream::connect(h.addr).unwrap()).collect();
        for _ in 0..100 {
            h.turn(Instant::now(), "page\n");
            if h.m.clients.len() == 2 {
                break;
            }
        }
        for _ in 0..3 {
            h.turn(Instant::now(), "page\n");
        }
        assert_eq!(h.m.clients.len(), 2, "the cap was not kept");
        for c in &mut clients {
            c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        }
        for _ in 0..1000 {
            h.turn(Instant::now(), "page\n");
            if h.m.clients.len() == 0 && !h.m.pending {
                break;
            }
        }
        for (i, c) in clients.iter_mut().enumerate() {
            let (got, end) = read_until_closed(c, 1 << 20);
            assert!(end.is_ok(), "client {i}: {end:?}");
            assert!(got.starts_with(b"HTTP/1.0 200 OK\r\n") && got.ends_with(b"\r\n\r\npage\n"), "client {i}: {got:?}");
        }
    }
}
