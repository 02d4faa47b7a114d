//! Every `unsafe` block and raw system call of the crate lives here.
//!
//! The rest of the code sees safe functions over `OwnedFd` / `BorrowedFd`;
//! nothing outside this module names `libc` for a call.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{self as sock, sockopt};

/// Calls a libc function, turning `-1` into the thread's `errno`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: every caller documents why the arguments are valid for `$fn`.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 { Err(io::Error::last_os_error()) } else { Ok(res) }
    }};
}

/// Retries `f` while it fails with EINTR.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Moves up to `len` bytes from `from` to `to`, one of which must be a pipe.
/// Never blocks (`SPLICE_F_NONBLOCK`); `Ok(0)` on a socket means EOF.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let (from, to) = (from.as_raw_fd(), to.as_raw_fd());
    let flags = libc::SPLICE_F_NONBLOCK;
    // SAFETY: both fds are borrowed for the call; null offsets are what pipes
    // and sockets require; `len` is a plain count.
    retry(|| syscall!(splice(from, ptr::null_mut(), to, ptr::null_mut(), len, flags))).map(|n| n as usize)
}

/// Errors that mean "this kernel or socket cannot splice", not "the peer failed".
pub fn splice_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EBADF))
}

/// EMFILE or ENFILE (the process or the system is out of file descriptors),
/// or ENOBUFS/ENOMEM (out of socket memory): resting helps, retrying at once does not.
pub fn out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// A connect error that means the backend could not be reached (refused,
/// unroutable, timed out), as opposed to a reset after it accepted.
pub fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::ETIMEDOUT
                | libc::EHOSTDOWN
                | libc::ENETDOWN
                | libc::EADDRNOTAVAIL
        )
    )
}

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Asks for a pipe capacity of `size` bytes; returns the capacity it really has
/// (past `pipe-user-pages-soft` an unprivileged user's pipes stay small).
pub fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<usize> {
    let size = i32::try_from(size).unwrap_or(i32::MAX);
    match fcntl(fd, FcntlArg::F_SETPIPE_SZ(size)) {
        Ok(n) => Ok(n as usize),
        Err(e) => {
            // EPERM past pipe-user-pages-soft: keep what the kernel gave.
            let cur = fcntl(fd, FcntlArg::F_GETPIPE_SZ).map_err(io::Error::from)?;
            log::trace!("F_SETPIPE_SZ({size}) refused ({e}); pipe has {cur} bytes");
            Err(io::Error::from(e))
        }
    }
}

/// The pipe's capacity in bytes.
pub fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    fcntl(fd, FcntlArg::F_GETPIPE_SZ).map(|n| n as usize).map_err(io::Error::from)
}

/// Sets TCP_NODELAY. On a listening socket, every accepted socket inherits it.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    sock::setsockopt(&fd, sockopt::TcpNoDelay, &true).map_err(io::Error::from)
}

/// Sets SO_OOBINLINE: urgent (MSG_OOB) bytes stay in the byte stream, so
/// the relay forwards them as ordinary bytes (ARCHITECTURE.md, "Urgent data").
/// On a listening socket, every accepted socket inherits it.
pub fn set_oob_inline(fd: BorrowedFd<'_>) -> io::Result<()> {
    sock::setsockopt(&fd, sockopt::OobInline, &true).map_err(io::Error::from)
}

/// A TCP socket connecting to `addr` without blocking, with SO_OOBINLINE
/// and TCP_NODELAY set before the connect. `Ok` while the connect is in
/// progress; its outcome comes as the first writable (or error) edge.
/// With `from`, the socket gets IP_TRANSPARENT (or IPV6_TRANSPARENT) and
/// binds `from`, a client's address, first: one setsockopt and one bind.
pub fn tcp_connect(addr: SocketAddr, from: Option<SocketAddr>) -> io::Result<OwnedFd> {
    let fd = socket_for(addr, sock::SockType::Stream)?;
    set_oob_inline(fd.as_fd())?;
    set_nodelay(fd.as_fd())?;
    if let Some(from) = from {
        set_transparent(fd.as_fd(), from.is_ipv6())?;
        bind(&fd, from)?;
    }
    let storage = sock::SockaddrStorage::from(addr);
    match sock::connect(fd.as_raw_fd(), &storage) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(fd),
        Err(e) => Err(e.into()),
    }
}

/// Sets IP_TRANSPARENT (IPv4) or IPV6_TRANSPARENT (IPv6): the socket may
/// bind an address that is not the host's, such as a client's
/// (ARCHITECTURE.md, "Transparent"). Needs CAP_NET_ADMIN (EPERM without).
pub fn set_transparent(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if !ipv6 {
        return sock::setsockopt(&fd, sockopt::IpTransparent, &true).map_err(io::Error::from);
    }
    let on: libc::c_int = 1;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let ptr = (&on as *const libc::c_int).cast::<libc::c_void>();
    // SAFETY: `fd` is borrowed for the call; `ptr` points to a live c_int of `len` bytes.
    syscall!(setsockopt(fd.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_TRANSPARENT, ptr, len)).map(|_| ())
}

/// Checks at start that this process may set IP_TRANSPARENT, on a socket
/// made for the check and closed at once.
pub fn transparent_allowed() -> io::Result<()> {
    let fd = socket_for(SocketAddr::from(([0, 0, 0, 0], 0)), sock::SockType::Stream)?;
    set_transparent(fd.as_fd(), false)
}

/// Reads at most one byte from a socket without blocking: the step past an
/// urgent mark, where splice stops and answers 0 although the stream goes on.
/// `Ok(None)` is end of stream.
pub fn recv_one(fd: BorrowedFd<'_>) -> io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    let n = retry(|| sock::recv(fd.as_raw_fd(), &mut byte, sock::MsgFlags::MSG_DONTWAIT).map_err(io::Error::from))?;
    Ok((n == 1).then_some(byte[0]))
}

/// Writes `bytes` to a pipe (or any fd) without blocking; returns how many went.
pub fn write(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    retry(|| nix::unistd::write(fd, bytes).map_err(io::Error::from))
}

/// Makes the socket send a reset instead of a FIN when it is closed.
pub fn set_linger_zero(fd: BorrowedFd<'_>) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // Best effort: the socket may already be dead, and it is closed next anyway.
    let _ = sock::setsockopt(&fd, sockopt::Linger, &linger);
}

/// A TCP listening socket, non-blocking and close-on-exec.
/// `v6only` only matters for IPv6 addresses.
/// `reuseport`: SO_REUSEPORT, so each event loop binds its own listener on
/// the same address and the kernel spreads connections among them.
pub fn tcp_listener(addr: SocketAddr, v6only: bool, backlog: i32, reuseport: bool) -> io::Result<OwnedFd> {
    let fd = socket_for(addr, sock::SockType::Stream)?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reuseport {
        sock::setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if addr.is_ipv6() {
        sock::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only)?;
    }
    bind(&fd, addr)?;
    let backlog = sock::Backlog::new(backlog).unwrap_or(sock::Backlog::MAXCONN);
    sock::listen(&fd, backlog)?;
    Ok(fd)
}

/// A bound UDP socket, non-blocking and close-on-exec. Reporting each
/// datagram's destination address is turned on by `UdpRelay::add_listener`,
/// the one place for it, as it also takes docker's inherited socket.
///
/// No SO_REUSEADDR: on UDP it would let any other socket asking for it, of
/// any user, bind the same address and receive the clients' datagrams (and
/// a second forward on the same port would start without an error). UDP has
/// no TIME_WAIT, so a restart does not need it.
///
/// `reuseport`: SO_REUSEPORT, one socket per event loop; the kernel keeps a
/// client's datagrams on one of them (it hashes the addresses and ports).
/// Only sockets of the same user can join such a group.
pub fn udp_listener(addr: SocketAddr, v6only: bool, reuseport: bool) -> io::Result<OwnedFd> {
    let fd = socket_for(addr, sock::SockType::Datagram)?;
    if reuseport {
        sock::setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if addr.is_ipv6() {
        sock::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only)?;
    }
    bind(&fd, addr)?;
    Ok(fd)
}

/// Turns on destination-address reporting for received datagrams.
/// An IPv6 socket also gets IP_PKTINFO, for the IPv4 clients of a dual-stack socket.
pub fn enable_pktinfo(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        sock::setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true)?;
        // Dual-stack sockets deliver IPv4 datagrams with IP_PKTINFO; fails harmlessly when V6ONLY.
        let _ = sock::setsockopt(&fd, sockopt::Ipv4PacketInfo, &true);
    } else {
        sock::setsockopt(&fd, sockopt::Ipv4PacketInfo, &true)?;
    }
    Ok(())
}

/// Asks for a receive buffer of `size` bytes: SO_RCVBUFFORCE (CAP_NET_ADMIN)
/// first, else SO_RCVBUF (capped by net.core.rmem_max). Returns what the
/// kernel reports back (it doubles the request for its own bookkeeping).
pub fn set_rcvbuf(fd: BorrowedFd<'_>, size: usize) -> io::Result<usize> {
    if sock::setsockopt(&fd, sockopt::RcvBufForce, &size).is_err() {
        sock::setsockopt(&fd, sockopt::RcvBuf, &size)?;
    }
    Ok(sock::getsockopt(&fd, sockopt::RcvBuf)? / 2)
}

/// A UDP socket connected to `peer`, for one client flow.
pub fn udp_connected(peer: SocketAddr) -> io::Result<OwnedFd> {
    udp_connected_from(peer, 0)
}

/// A UDP socket bound to local `port` (0: the kernel picks) on the wildcard
/// address and connected to `peer`.
pub fn udp_connected_from(peer: SocketAddr, port: u16) -> io::Result<OwnedFd> {
    let fd = socket_for(peer, sock::SockType::Datagram)?;
    if port != 0 {
        let any: std::net::IpAddr = if peer.is_ipv6() {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        bind(&fd, SocketAddr::new(any, port))?;
    }
    let storage = sock::SockaddrStorage::from(peer);
    retry(|| sock::connect(fd.as_raw_fd(), &storage).map_err(io::Error::from))?;
    Ok(fd)
}

/// A UDP socket with IP_TRANSPARENT (or IPV6_TRANSPARENT), bound to `from`,
/// a client's address and port, and connected to `peer`: one client's
/// transparent flow (ARCHITECTURE.md, "Transparent").
pub fn udp_connected_transparent(peer: SocketAddr, from: SocketAddr) -> io::Result<OwnedFd> {
    let fd = socket_for(peer, sock::SockType::Datagram)?;
    set_transparent(fd.as_fd(), from.is_ipv6())?;
    bind(&fd, from)?;
    let storage = sock::SockaddrStorage::from(peer);
    retry(|| sock::connect(fd.as_raw_fd(), &storage).map_err(io::Error::from))?;
    Ok(fd)
}

fn socket_for(addr: SocketAddr, ty: sock::SockType) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv6() { sock::AddressFamily::Inet6 } else { sock::AddressFamily::Inet };
    let flags = sock::SockFlag::SOCK_NONBLOCK | sock::SockFlag::SOCK_CLOEXEC;
    sock::socket(family, ty, flags, None).map_err(io::Error::from)
}

fn bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let storage = sock::SockaddrStorage::from(addr);
    sock::bind(fd.as_raw_fd(), &storage).map_err(io::Error::from)
}

/// The address a socket is bound to.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let storage: sock::SockaddrStorage = sock::getsockname(fd.as_raw_fd())?;
    sockaddr_to_std(&storage).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))
}

/// The socket's type (SOCK_STREAM / SOCK_DGRAM) and whether it listens.
pub fn socket_kind(fd: BorrowedFd<'_>) -> io::Result<(sock::SockType, bool)> {
    let ty = sock::getsockopt(&fd, sockopt::SockType)?;
    let listening = sock::getsockopt(&fd, sockopt::AcceptConn)?;
    Ok((ty, listening))
}

/// Marks an fd non-blocking and close-on-exec.
pub fn set_nonblocking_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fl = fcntl(fd, FcntlArg::F_GETFL)?;
    let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(fl))?;
    set_cloexec(fd)
}

/// Marks an fd close-on-exec.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Takes ownership of an fd inherited from the parent (docker's fd 3 and fd 4,
/// systemd's activated sockets),
/// or `None` if no such fd is open.
pub fn inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    fcntl_getfd_ok(fd)?;
    // SAFETY: the fd is open (F_GETFD succeeded), was inherited at exec, and
    // nothing else in this process owns it: it is taken exactly once, at start-up.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fcntl_getfd_ok(fd: RawFd) -> Option<()> {
    syscall!(fcntl(fd, libc::F_GETFD)).ok().map(|_| ())
}

/// The kernel's range of ephemeral ports (`net.ipv4.ip_local_port_range`,
/// which IPv6 shares), or Linux's default when it cannot be read.
pub fn ephemeral_ports() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().map(|w| w.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if 0 < lo && lo <= hi => (lo, hi),
        _ => (32768, 60999),
    }
}

/// Adds `fd` to the epoll instance `epfd` for readable edges with
/// EPOLLEXCLUSIVE, under mio's `token`: when several loops wait on one
/// listening socket, a new connection wakes one of them, not all.
pub fn register_exclusive(epfd: RawFd, fd: BorrowedFd<'_>, token: usize) -> io::Result<()> {
    let mut ev =
        libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32, u64: token as u64 };
    // SAFETY: `epfd` is a live epoll fd (the loop's Poll, borrowed for the
    // call), `fd` is borrowed, and `ev` is a valid epoll_event on the stack.
    syscall!(epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev)).map(|_| ())
}

/// Ignores the real-time signals (SIGRTMIN..=SIGRTMAX), whose default
/// action would end the process without a word.
pub fn ignore_realtime_signals() {
    for signo in libc::SIGRTMIN()..=libc::SIGRTMAX() {
        // SAFETY: SIG_IGN installs no handler code; the signal numbers come
        // from libc's own range of real-time signals.
        unsafe { libc::signal(signo, libc::SIG_IGN) };
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Converts a nix socket address into a std one.
pub fn sockaddr_to_std(s: &sock::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::new(v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id())))
}

pub mod mmsg;

/// Counts the heap allocations of each thread, for unit tests that assert a
/// path allocates nothing (the unit-test binary's global allocator).
#[cfg(test)]
pub(crate) mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    fn count() {
        // A const-initialised Cell has no destructor: touching it never allocates.
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }

    struct Counting;

    // SAFETY: every call is passed on unchanged to the system allocator,
    // which upholds GlobalAlloc's contract; counting touches no heap memory.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count();
            // SAFETY: the caller's guarantees for `alloc` are passed on as they are.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count();
            // SAFETY: as for `alloc`.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count();
            // SAFETY: `ptr` came from this allocator, that is from System, with `layout`.
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from System with `layout`.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Heap allocations (and reallocations) this thread has made so far.
    pub(crate) fn allocations() -> u64 {
        COUNT.with(|c| c.get())
    }
}
