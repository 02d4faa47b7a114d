//! Batched datagram I/O: recvmmsg/sendmmsg over buffers owned by one `Batch`.
//!
//! Like quinn-udp: caller-owned buffers and headers, built on the heap once,
//! a batch constant, EINTR retried. The receive side reports each datagram's
//! source, the local address it was sent to (IP_PKTINFO / IPV6_PKTINFO) and
//! whether it was truncated; the send side can set the reply's source address.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use super::retry;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Receive buffer per datagram: the largest UDP payload plus one byte, so a
/// datagram that does not fit is seen as truncated.
pub const BUF: usize = 65536;
/// Room for IPV6_PKTINFO and IP_PKTINFO together (a dual-stack socket's IPv4
/// datagrams carry both: 40 + 32 bytes).
const CTRL: usize = 128;

/// The local address a datagram was sent to, to answer from the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PktInfo {
    /// IPv4 destination (IP_PKTINFO), with the interface index.
    V4(Ipv4Addr, u32),
    /// IPv6 destination (IPV6_PKTINFO), with the interface index.
    V6(Ipv6Addr, u32),
}

impl PktInfo {
    /// The address as an `IpAddr`.
    pub fn ip(&self) -> IpAddr {
        match *self {
            PktInfo::V4(a, _) => IpAddr::V4(a),
            PktInfo::V6(a, _) => IpAddr::V6(a),
        }
    }
}

/// What recvmmsg said about one datagram.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    /// Payload bytes in the buffer.
    pub len: usize,
    /// The datagram was longer than the buffer (MSG_TRUNC).
    pub truncated: bool,
    /// The sender, if the socket reported one.
    pub source: Option<SocketAddr>,
    /// The local address it was sent to.
    pub dst: Option<PktInfo>,
}

/// One outgoing datagram: which receive buffer, to whom, from which address.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    /// Index of the receive buffer holding the payload.
    pub index: usize,
    /// Destination (None on a connected socket).
    pub to: Option<SocketAddr>,
    /// Source address to use.
    pub from: Option<PktInfo>,
}

/// Buffers and headers for one batch of datagrams, reused for every call.
pub struct Batch {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u8; CTRL]>,
    iovs: Vec<[libc::iovec; 2]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per received datagram, what the kernel said.
    pub meta: Vec<Meta>,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    /// Allocates one batch (the payload memory is only touched as used).
    pub fn new() -> Self {
        let empty_iov = libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 };
        Batch {
            bufs: vec![0; BATCH * BUF],
            names: vec![zeroed(); BATCH],
            ctrl: vec![[0; CTRL]; BATCH],
            iovs: vec![[empty_iov; 2]; BATCH],
            hdrs: vec![zeroed(); BATCH],
            meta: Vec::with_capacity(BATCH),
        }
    }

    /// The payload of received datagram `i`.
    pub fn payload(&self, i: usize) -> &[u8] {
        &self.bufs[i * BUF..i * BUF + self.meta[i].len]
    }

    /// Receives up to BATCH datagrams; fills `meta`, returns how many.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.meta.clear();
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: i * BUF + BUF <= bufs.len(): the pointer stays in the allocation.
            let buf = unsafe { base.add(i * BUF) };
            self.iovs[i][0] = libc::iovec { iov_base: buf.cast(), iov_len: BUF };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as _;
            h.msg_iov = self.iovs[i].as_mut_ptr();
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = CTRL as _;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        let raw = fd.as_raw_fd();
        let hdrs = self.hdrs.as_mut_ptr();
        // SAFETY: every header points into this batch's own buffers, which
        // outlive the call and are not otherwise borrowed during it.
        let n = retry(|| syscall!(recvmmsg(raw, hdrs, BATCH as _, libc::MSG_DONTWAIT, ptr::null_mut())))? as usize;
        for i in 0..n {
            let h = &self.hdrs[i];
            let len = h.msg_len as usize;
            let source = from_storage(&self.names[i], h.msg_hdr.msg_namelen as usize);
            let dst = pktinfo(&h.msg_hdr);
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > BUF - 1;
            self.meta.push(Meta { len: len.min(BUF), truncated, source, dst });
        }
        Ok(n)
    }

    /// Sends the datagrams `outs` (payloads from the receive buffers), each
    /// optionally preceded by `prefix` (a PROXY header). Returns how many the
    /// kernel took; the rest would block.
    pub fn send(&mut self, fd: BorrowedFd<'_>, outs: &[Out], prefix: &[(usize, [u8; 64])]) -> io::Result<usize> {
        let n = outs.len().min(BATCH);
        let base = self.bufs.as_mut_ptr();
        for (k, out) in outs[..n].iter().enumerate() {
            let len = self.meta[out.index].len;
            // SAFETY: out.index < BATCH, so the buffer lies inside `bufs`.
            let buf = unsafe { base.add(out.index * BUF) };
            let payload = libc::iovec { iov_base: buf.cast(), iov_len: len };
            let mut iovlen = 1;
            self.iovs[k][0] = payload;
            if let Some((plen, p)) = prefix.get(k).filter(|(l, _)| *l > 0) {
                self.iovs[k][0] = libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: *plen };
                self.iovs[k][1] = payload;
                iovlen = 2;
            }
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_iov = self.iovs[k].as_mut_ptr();
            h.msg_iovlen = iovlen;
            h.msg_flags = 0;
            match out.to {
                Some(to) => {
                    h.msg_namelen = to_storage(to, &mut self.names[k]) as _;
                    h.msg_name = (&mut self.names[k] as *mut libc::sockaddr_storage).cast();
                }
                None => {
                    h.msg_name = ptr::null_mut();
                    h.msg_namelen = 0;
                }
            }
            let clen = out.from.map_or(0, |from| put_pktinfo(&mut self.ctrl[k], from));
            h.msg_control = if clen > 0 { self.ctrl[k].as_mut_ptr().cast() } else { ptr::null_mut() };
            h.msg_controllen = clen as _;
        }
        let raw = fd.as_raw_fd();
        let hdrs = self.hdrs.as_mut_ptr();
        // SAFETY: the first `n` headers point at buffers in this batch or in
        // `prefix`, both alive and unmodified for the call.
        match retry(|| syscall!(sendmmsg(raw, hdrs, n as _, libc::MSG_DONTWAIT))) {
            Ok(sent) => Ok(sent as usize),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// Receives and discards one pending error of a UDP socket (SO_ERROR), so
/// an error edge does not repeat; returns it.
pub fn take_socket_error(fd: BorrowedFd<'_>) -> Option<io::Error> {
    match nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SocketError) {
        Ok(0) => None,
        Ok(errno) => Some(io::Error::from_raw_os_error(errno)),
        Err(e) => Some(e.into()),
    }
}

fn zeroed<T: Copy>() -> T {
    // SAFETY: only used for plain C structs, for which all-zero is a valid value.
    unsafe { mem::zeroed() }
}

fn from_storage(s: &libc::sockaddr_storage, len: usize) -> Option<SocketAddr> {
    match s.ss_family as i32 {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is larger and aligned.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

fn to_storage(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> usize {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as _;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as _;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>()
        }
    }
}

/// The destination address of a received datagram, from its control messages.
fn pktinfo(h: &libc::msghdr) -> Option<PktInfo> {
    let mut found = None;
    // SAFETY: `h` was filled by recvmmsg; msg_control/msg_controllen describe
    // a buffer of this batch; the CMSG_* macros stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            let len = ((*c).cmsg_len as usize).saturating_sub(data as usize - c as usize);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) if len >= mem::size_of::<libc::in_pktinfo>() => {
                    let pi = ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    let ip = Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr));
                    found = Some(PktInfo::V4(ip, pi.ipi_ifindex as u32));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if len >= mem::size_of::<libc::in6_pktinfo>() => {
                    let pi = ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    found = Some(PktInfo::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr), pi.ipi6_ifindex));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    found
}

/// Writes an IP_PKTINFO / IPV6_PKTINFO control message choosing the source
/// address; returns its length.
fn put_pktinfo(ctrl: &mut [u8; CTRL], from: PktInfo) -> usize {
    let mut h: libc::msghdr = zeroed();
    h.msg_control = ctrl.as_mut_ptr().cast();
    h.msg_controllen = CTRL as _;
    // SAFETY: CTRL (128) exceeds CMSG_SPACE of both pktinfo structs (32 and 36
    // bytes), so the one message written stays inside `ctrl`.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&h);
        match from {
            PktInfo::V4(ip, _) => {
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr { s_addr: u32::from(ip).to_be() },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(mem::size_of_val(&pi) as u32) as _;
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), pi);
                libc::CMSG_SPACE(mem::size_of_val(&pi) as u32) as usize
            }
            PktInfo::V6(ip, ifindex) => {
                let pi =
                    libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: ip.octets() }, ipi6_ifindex: ifindex };
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(mem::size_of_val(&pi) as u32) as _;
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), pi);
                libc::CMSG_SPACE(mem::size_of_val(&pi) as u32) as usize
            }
        }
    }
}
