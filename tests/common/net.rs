//! Ports and clients: free ports, ports held for a backend that starts
//! later, TCP and UDP clients with generous waits, an HTTP GET.

use super::{PATIENCE, wait_until};
use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// A port free for TCP and UDP on every address (a dual-stack `[::]` bind
/// of both), drawn at random below the kernel's ephemeral range: no
/// connection's own port can land on it meanwhile, and a machine busy with
/// many connections (TIME_WAIT by the tens of thousands) still has plenty.
/// It can still be taken before the caller binds it: the relay's ports
/// come from [`super::Ports`], which retries.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive ports free as for [`free_port`].
pub fn free_ports(n: u16) -> u16 {
    let (low, high) = port_window(n);
    for _ in 0..1000 {
        let base = low + (random_u64() % u64::from(high - low)) as u16;
        if (0..n).all(|i| port_is_free(base + i)) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports in {low}..{high} in 1000 tries");
}

/// Where to look for `n` consecutive ports: from 20000 up to the start of
/// the ephemeral range (ip_local_port_range), at least 1000 ports wide.
fn port_window(n: u16) -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral: u16 = range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32768);
    let high = ephemeral.saturating_sub(n);
    assert!(
        high >= 21000,
        "the ephemeral port range starts at {ephemeral}: no room below it for test ports (20000 and up)"
    );
    (20000, high)
}

/// A fresh pseudo-random number (from the clock, the pid and a counter).
fn random_u64() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let seed = nanos ^ u64::from(std::process::id()) << 32 ^ COUNT.fetch_add(1, Ordering::Relaxed) << 48;
    super::pattern(seed, 8).iter().fold(0, |acc, b| acc << 8 | u64::from(*b))
}

/// True if `port` can be bound now for TCP and UDP on every address.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("::", port)).is_ok() && UdpSocket::bind(("::", port)).is_ok()
}

/// A port on 127.0.0.1 held for a backend that starts later: a TCP and a
/// UDP socket bound to it with SO_REUSEADDR, the TCP one not listening and
/// the UDP one connected elsewhere. Until the backend comes, TCP clients are
/// refused and datagrams draw ICMP port unreachable, as if nothing were
/// there; no connection's ephemeral port can land on it; and a backend that
/// binds it with SO_REUSEADDR takes over.
pub struct HeldPort {
    pub port: u16,
    _tcp: OwnedFd,
    _udp: OwnedFd,
}

fn reuse_socket(ty: SockType) -> OwnedFd {
    let fd = sock::socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    fd
}

impl HeldPort {
    pub fn new() -> HeldPort {
        for _ in 0..100 {
            let tcp = reuse_socket(SockType::Stream);
            sock::bind(tcp.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind 127.0.0.1:0");
            let port = sock::getsockname::<SockaddrIn>(tcp.as_raw_fd()).expect("getsockname").port();
            let udp = reuse_socket(SockType::Datagram);
            if sock::bind(udp.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).is_err() {
                continue;
            }
            // Connected to a port nothing sends from: it receives nothing.
            sock::connect(udp.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 1)).expect("connect");
            return HeldPort { port, _tcp: tcp, _udp: udp };
        }
        panic!("no port to hold in 100 tries");
    }

    /// 127.0.0.1 and the held port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A UDP socket bound to the held port (SO_REUSEADDR), for the backend.
    pub fn udp_socket(&self) -> UdpSocket {
        let fd = reuse_socket(SockType::Datagram);
        sock::bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, self.port)).expect("bind the held port");
        UdpSocket::from(fd)
    }
}

/// True if a TCP socket listens on `port` (any address), from /proc/net.
pub fn listening_on(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|path| {
        std::fs::read_to_string(path).unwrap_or_default().lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
    })
}

/// Connects (retrying only while SYNs go unanswered, e.g. a full backlog,
/// for up to 10 s); reads time out after [`PATIENCE`]. Fails the test if
/// the connection is refused or reset: see [`try_connect`].
pub fn connect(addr: &str) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// One connection attempt as [`connect`] makes it, returning the error: a
/// relay that refuses a client (a reset at once) can make `connect` itself
/// fail with ECONNRESET, or succeed and the first read see the reset.
pub fn try_connect(addr: &str) -> io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                s.set_read_timeout(Some(PATIENCE))?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::TimedOut && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
}

/// How a fresh client of `addr` that sends nothing ends: a reset shows as
/// `Error(ConnectionReset)` whether it came during connect or on the first
/// read.
pub fn first_read_end(addr: &str) -> ReadEnd {
    match try_connect(addr) {
        Err(e) => ReadEnd::Error(e.kind()),
        Ok(mut c) => read_end(&mut c, PATIENCE),
    }
}

/// True if a client connecting to `addr` and sending `send` is closed (EOF
/// or reset, at connect or on its first read) without a byte back.
pub fn refused(addr: &str, send: &[u8]) -> bool {
    match try_connect(addr) {
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(mut c) => {
            let _ = c.write_all(send);
            read_end(&mut c, PATIENCE).closed()
        }
    }
}

/// How one read on a relayed connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    Eof,
    Error(ErrorKind),
    Data(usize),
    TimedOut,
}

impl ReadEnd {
    /// The connection was closed (EOF) or reset.
    pub fn closed(&self) -> bool {
        matches!(self, ReadEnd::Eof | ReadEnd::Error(_))
    }
}

/// One read, waiting at most `wait`.
pub fn read_end(c: &mut TcpStream, wait: Duration) -> ReadEnd {
    c.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).unwrap();
    let mut buf = [0u8; 4096];
    match c.read(&mut buf) {
        Ok(0) => ReadEnd::Eof,
        Ok(n) => ReadEnd::Data(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => ReadEnd::TimedOut,
        Err(e) => ReadEnd::Error(e.kind()),
    }
}

/// Reads until the connection is closed or [`PATIENCE`] passes, discarding
/// data; returns how it ended.
pub fn read_until_closed(c: &mut TcpStream) -> ReadEnd {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let end = read_end(c, deadline.saturating_duration_since(Instant::now()));
        match end {
            ReadEnd::Data(_) if Instant::now() < deadline => continue,
            ReadEnd::Data(_) => return ReadEnd::TimedOut,
            other => return other,
        }
    }
}

/// Sends `msg` and expects it echoed.
pub fn echo_round(c: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    c.set_read_timeout(Some(PATIENCE))?;
    c.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got)?;
    if got != msg {
        return Err(io::Error::other("echoed bytes differ"));
    }
    Ok(())
}

/// A whole echo transfer: `len` bytes of `pattern(seed)` up (written by a
/// second thread), FIN, the same bytes back, EOF.
pub fn echo_transfer(addr: &str, seed: u64, len: usize) -> Result<(), String> {
    let mut c = connect(addr);
    let data = super::pattern(seed, len);
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(&sent)?;
        w.shutdown(Shutdown::Write)
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).map_err(|e| format!("read after {} bytes: {e}", got.len()))?;
    writer.join().unwrap().map_err(|e| format!("write: {e}"))?;
    if got != data {
        return Err(format!("{} bytes back of {len}, or bytes differ", got.len()));
    }
    Ok(())
}

/// [`echo_transfer`] that must succeed.
pub fn echo_once(addr: &str, seed: u64, len: usize) {
    echo_transfer(addr, seed, len).unwrap_or_else(|e| panic!("echo through {addr} (seed {seed}): {e}"));
}

/// A UDP socket bound to `addr`, reads timing out after `timeout`.
pub fn udp_client(addr: &str, timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.set_read_timeout(Some(timeout)).unwrap();
    s
}

/// Sends `payload` to `to` until an identical reply comes (resending every
/// second, for up to [`PATIENCE`]); other replies are skipped. Returns the
/// reply's source address.
pub fn round_trip(s: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<SocketAddr> {
    round_trip_checked(s, to, payload, |_| Ok(())).expect("no other datagram is refused")
}

/// [`round_trip`], passing every other datagram from `to` to `other`, which
/// may refuse it (e.g. another client's datagram): then that error. Other
/// datagrams from elsewhere are not the relay's (on a shared machine a
/// stray one can reach a reused port) and are skipped.
pub fn round_trip_checked(
    s: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    mut other: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<Option<SocketAddr>, String> {
    let prev = s.read_timeout().unwrap();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + PATIENCE;
    let mut found = None;
    'send: while Instant::now() < deadline {
        s.send_to(payload, to).map_err(|e| format!("send_to {to}: {e}"))?;
        let resend = Instant::now() + Duration::from_secs(1);
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        while Instant::now() < resend {
            match s.recv_from(&mut buf) {
                Ok((n, from)) if &buf[..n] == payload => {
                    found = Some(from);
                    break 'send;
                }
                Ok((n, from)) if from == to => other(&buf[..n])?,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(format!("recv_from: {e}")),
            }
        }
    }
    s.set_read_timeout(prev).unwrap();
    Ok(found)
}

/// Waits up to `wait` for any datagram; None if nothing came.
pub fn recv_any(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65536];
    s.set_read_timeout(Some(wait)).unwrap();
    match s.recv_from(&mut buf) {
        Ok((n, from)) => Some((buf[..n].to_vec(), from)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv_from: {e}"),
    }
}

/// An HTTP/1.0 GET on 127.0.0.1:`port`; returns the whole response.
pub fn http_get(port: u16, path: &str) -> String {
    let mut s = connect(&format!("127.0.0.1:{port}"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page
}

/// Waits until `addr` refuses TCP connections (within [`PATIENCE`]).
pub fn refuses_connections(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    wait_until(
        PATIENCE,
        || matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)), Err(e) if e.kind() == ErrorKind::ConnectionRefused),
    )
}
