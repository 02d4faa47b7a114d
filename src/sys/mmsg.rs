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

/// A control-message buffer, aligned for `cmsghdr` (its `cmsg_len` is a size_t).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Ctrl([u8; CTRL]);

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
    /// With UDP_GRO, the buffer holds datagrams of this size, the last one
    /// possibly shorter; without, the whole buffer is one datagram (= len).
    pub segment: usize,
}

impl Meta {
    /// The datagrams in the buffer, as (offset, length): one per GRO
    /// segment, or the whole buffer (an empty datagram included).
    pub fn datagrams(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let (len, seg) = (self.len, self.segment.max(1));
        let count = if len == 0 { 1 } else { len.div_ceil(seg) };
        (0..count).map(move |k| (k * seg, seg.min(len - (k * seg).min(len))))
    }
}

/// One outgoing datagram: where in which receive buffer, to whom, from which address.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    /// Index of the receive buffer holding the payload.
    pub index: usize,
    /// Where the payload starts in that buffer (a GRO segment's offset).
    pub offset: usize,
    /// Payload bytes.
    pub len: usize,
    /// Destination (None on a connected socket).
    pub to: Option<SocketAddr>,
    /// Source address to use.
    pub from: Option<PktInfo>,
}

/// Iovecs one send call may use (two per datagram: prefix, payload).
const MAX_IOVS: usize = 1024;
/// The most segments one GSO send may carry (UDP_MAX_SEGMENTS in older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// The most payload bytes one GSO send may carry (an IPv4 datagram's limit).
const GSO_MAX_BYTES: usize = 65_507;

/// Whether, and up to what datagram size, a socket's sends may be joined
/// into UDP GSO messages. Starts on; the kernel's answers narrow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    /// Largest datagram (prefix included) sent as a GSO segment; 0: off.
    pub max_segment: usize,
}

impl Default for Gso {
    fn default() -> Self {
        Gso { max_segment: GSO_MAX_BYTES }
    }
}

impl Gso {
    /// GSO never used, for `--no-udp-gso`.
    pub const OFF: Gso = Gso { max_segment: 0 };

    /// Learns from an error on a GSO send of `segment`-byte datagrams.
    /// EINVAL/EMSGSIZE: the path MTU is smaller than the segment, so larger
    /// segments stay single (below 1,200 bytes no MTU explains it: GSO is off).
    /// Anything else (EIO: no checksum offload; ENOPROTOOPT: an old kernel): off.
    fn refused(&mut self, segment: usize, e: &io::Error) {
        let shrink = matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EMSGSIZE));
        self.max_segment = if shrink && segment > 1200 { segment - 1 } else { 0 };
        log::debug!("GSO send of {segment}-byte segments refused ({e}); now up to {} bytes", self.max_segment);
    }
}

/// How consecutive datagrams are joined into messages: runs to the same
/// destination from the same source, of one size, the last possibly shorter
/// (the rule of UDP GSO), within the segment and byte limits. Returns the
/// number of datagrams in each message, in order, for `sizes[i]` bytes each
/// (with `same(i)` true if datagram i goes where datagram i-1 goes).
pub fn plan_messages(
    sizes: &[usize],
    same: impl Fn(usize) -> bool,
    gso: Gso,
    max_messages: usize,
    plan: &mut Vec<usize>,
) {
    plan.clear();
    let mut k = 0;
    while k < sizes.len() && plan.len() < max_messages {
        let seg = sizes[k];
        let mut j = k + 1;
        if seg > 0 && seg <= gso.max_segment {
            let mut total = seg;
            while j < sizes.len() && j - k < GSO_MAX_SEGMENTS && same(j) {
                let s = sizes[j];
                if s == 0 || s > seg || total + s > GSO_MAX_BYTES {
                    break;
                }
                total += s;
                j += 1;
                if s < seg {
                    break;
                }
            }
        }
        plan.push(j - k);
        k = j;
    }
}

/// Buffers and headers for one batch of datagrams, reused for every call.
pub struct Batch {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<Ctrl>,
    /// Up to two per datagram sent (an optional prefix, then the payload).
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per received datagram, what the kernel said.
    pub meta: Vec<Meta>,
    sizes: Vec<usize>,
    plan: Vec<usize>,
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
            ctrl: vec![Ctrl([0; CTRL]); BATCH],
            iovs: vec![empty_iov; MAX_IOVS],
            hdrs: vec![zeroed(); BATCH],
            meta: Vec::with_capacity(BATCH),
            sizes: Vec::with_capacity(BATCH),
            plan: Vec::with_capacity(BATCH),
        }
    }

    /// Receives up to BATCH datagrams; fills `meta`, returns how many.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.meta.clear();
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: i * BUF + BUF <= bufs.len(): the pointer stays in the allocation.
            let buf = unsafe { base.add(i * BUF) };
            self.iovs[i] = libc::iovec { iov_base: buf.cast(), iov_len: BUF };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as _;
            // SAFETY: i < BATCH <= iovs.len().
            h.msg_iov = unsafe { self.iovs.as_mut_ptr().add(i) };
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].0.as_mut_ptr().cast();
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
            let (dst, gro) = parse_cmsgs(&h.msg_hdr);
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > BUF - 1;
            let len = len.min(BUF);
            let segment = gro.filter(|&g| g > 0 && g < len).unwrap_or(len);
            self.meta.push(Meta { len, truncated, source, dst, segment });
        }
        Ok(n)
    }

    /// Sends the datagrams `outs` (payloads from the receive buffers), each
    /// each preceded by `prefix` when it is not empty (a flow's PROXY
    /// header), in one sendmmsg.
    /// Runs of equal-size datagrams to one destination go as one UDP GSO
    /// message each while `gso` allows (the receiver still gets separate
    /// datagrams); a refused GSO send narrows `gso` and is tried again
    /// without it. Returns how many datagrams the kernel took; the rest
    /// would block.
    pub fn send(&mut self, fd: BorrowedFd<'_>, outs: &[Out], prefix: &[u8], gso: &mut Gso) -> io::Result<usize> {
        if outs.is_empty() {
            return Ok(0);
        }
        // Each datagram takes at most two iovecs.
        let outs = &outs[..outs.len().min(MAX_IOVS / 2)];
        self.sizes.clear();
        self.sizes.extend(outs.iter().map(|o| prefix.len() + o.len));
        loop {
            let same = |j: usize| outs[j].to == outs[j - 1].to && outs[j].from == outs[j - 1].from;
            plan_messages(&self.sizes, same, *gso, BATCH, &mut self.plan);
            let base = self.bufs.as_mut_ptr();
            let iovs = self.iovs.as_mut_ptr();
            let (mut k, mut v) = (0, 0);
            for (m, &segments) in self.plan.iter().enumerate() {
                let first_iov = v;
                for out in outs.iter().skip(k).take(segments) {
                    if !prefix.is_empty() {
                        let p = prefix.as_ptr() as *mut libc::c_void;
                        self.iovs[v] = libc::iovec { iov_base: p, iov_len: prefix.len() };
                        v += 1;
                    }
                    debug_assert!(out.index < BATCH && out.offset + out.len <= BUF);
                    let start = (out.index * BUF + out.offset).min(BATCH * BUF);
                    let len = out.len.min(BATCH * BUF - start);
                    // SAFETY: start + len <= BATCH * BUF = bufs.len() (clamped above).
                    let buf = unsafe { base.add(start) };
                    self.iovs[v] = libc::iovec { iov_base: buf.cast(), iov_len: len };
                    v += 1;
                }
                let h = &mut self.hdrs[m].msg_hdr;
                // SAFETY: first_iov < v <= 2 * outs.len() <= MAX_IOVS = iovs.len().
                h.msg_iov = unsafe { iovs.add(first_iov) };
                h.msg_iovlen = (v - first_iov) as _;
                h.msg_flags = 0;
                match outs[k].to {
                    Some(to) => {
                        h.msg_namelen = to_storage(to, &mut self.names[m]) as _;
                        h.msg_name = (&mut self.names[m] as *mut libc::sockaddr_storage).cast();
                    }
                    None => {
                        h.msg_name = ptr::null_mut();
                        h.msg_namelen = 0;
                    }
                }
                let segment = (segments > 1).then_some(self.sizes[k]);
                let clen = put_cmsgs(&mut self.ctrl[m], outs[k].from, segment);
                h.msg_control = if clen > 0 { self.ctrl[m].0.as_mut_ptr().cast() } else { ptr::null_mut() };
                h.msg_controllen = clen as _;
                k += segments;
            }
            let raw = fd.as_raw_fd();
            let hdrs = self.hdrs.as_mut_ptr();
            let messages = self.plan.len();
            // SAFETY: the first `messages` headers point at iovecs, names and
            // control buffers of this batch, and at payloads in this batch or
            // in `prefix`, all alive and unmodified for the call.
            match retry(|| syscall!(sendmmsg(raw, hdrs, messages as _, libc::MSG_DONTWAIT))) {
                Ok(sent) => return Ok(self.plan[..sent as usize].iter().sum()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if self.plan[0] > 1 && !is_peer_error(&e) => gso.refused(self.sizes[0], &e),
                Err(e) => return Err(e),
            }
        }
    }
}

/// An error that says something about the peer (a stale ICMP), not about GSO.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EPERM | libc::ENOBUFS)
    )
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

/// The destination address of a received datagram and its GRO segment
/// size, from its control messages.
fn parse_cmsgs(h: &libc::msghdr) -> (Option<PktInfo>, Option<usize>) {
    let mut found = None;
    let mut gro = None;
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
                (libc::SOL_UDP, libc::UDP_GRO) if len >= mem::size_of::<libc::c_int>() => {
                    gro = usize::try_from(ptr::read_unaligned(data.cast::<libc::c_int>())).ok();
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    (found, gro)
}

/// Asks the kernel to hand over runs of one flow's datagrams as one buffer
/// (UDP_GRO, Linux 5.0+); false if it cannot.
pub fn enable_gro(fd: BorrowedFd<'_>) -> bool {
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::UdpGroSegment, &true).is_ok()
}

/// Writes the control messages of one send: IP_PKTINFO / IPV6_PKTINFO
/// choosing the source address, and UDP_SEGMENT for a GSO message; returns
/// their length.
fn put_cmsgs(ctrl: &mut Ctrl, from: Option<PktInfo>, segment: Option<usize>) -> usize {
    let mut len = 0;
    // SAFETY: CTRL (128) exceeds CMSG_SPACE of a pktinfo struct (at most 40
    // bytes) plus CMSG_SPACE of a u16 (24 bytes), so both messages stay
    // inside `ctrl`; each starts at a CMSG_SPACE boundary, which keeps the
    // 8-byte alignment of `Ctrl`.
    unsafe {
        let base = ctrl.0.as_mut_ptr();
        if let Some(from) = from {
            len += put_pktinfo(base.cast(), from);
        }
        if let Some(seg) = segment {
            let c = base.add(len).cast::<libc::cmsghdr>();
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
            ptr::write_unaligned(libc::CMSG_DATA(c).cast(), seg as u16);
            len += libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as usize;
        }
    }
    len
}

/// Writes one IP_PKTINFO / IPV6_PKTINFO message at `c`; returns its space.
///
/// # Safety
/// `c` must point at a cmsghdr with room for CMSG_SPACE(sizeof in6_pktinfo) bytes.
unsafe fn put_pktinfo(c: *mut libc::cmsghdr, from: PktInfo) -> usize {
    // SAFETY: the caller guarantees the room; every write is within it.
    unsafe {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(sizes: &[usize], gso: Gso) -> Vec<usize> {
        let mut p = Vec::new();
        plan_messages(sizes, |_| true, gso, BATCH, &mut p);
        p
    }

    #[test]
    fn equal_sizes_join_and_a_shorter_one_ends_the_run() {
        assert_eq!(plan(&[64; 5], Gso::default()), [5]);
        assert_eq!(plan(&[64, 64, 10, 64, 64], Gso::default()), [3, 2]);
        // A longer datagram cannot follow shorter segments.
        assert_eq!(plan(&[64, 100, 100, 20], Gso::default()), [1, 3]);
        // Empty datagrams always go alone.
        assert_eq!(plan(&[0, 0, 64, 0], Gso::default()), [1, 1, 1, 1]);
    }

    #[test]
    fn limits_segments_bytes_and_destinations() {
        assert_eq!(plan(&[10; 70], Gso::default()), [64, 6]);
        // 46 x 1400 = 64,400 bytes fit; a 47th would pass 65,507.
        assert_eq!(plan(&[1400; 50], Gso::default()), [46, 4]);
        assert_eq!(plan(&[40_000, 40_000], Gso::default()), [1, 1]);
        let mut p = Vec::new();
        plan_messages(&[64; 6], |j| j != 3, Gso::default(), BATCH, &mut p);
        assert_eq!(p, [3, 3]);
        plan_messages(&[64; 6], |_| false, Gso::default(), 4, &mut p);
        assert_eq!(p, [1, 1, 1, 1], "at most max_messages");
    }

    #[test]
    fn off_or_narrowed_gso_sends_singly() {
        assert_eq!(plan(&[64; 4], Gso::OFF), [1, 1, 1, 1]);
        let mut g = Gso::default();
        g.refused(1400, &io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(g.max_segment, 1399);
        assert_eq!(plan(&[1400, 1400, 64, 64], g), [1, 1, 2]);
        g.refused(64, &io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(g, Gso::OFF, "no MTU explains refusing 64-byte segments");
        let mut g = Gso::default();
        g.refused(64, &io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(g, Gso::OFF);
    }

    #[test]
    fn gro_buffers_split_into_their_datagrams() {
        let meta = |len, segment| Meta { len, truncated: false, source: None, dst: None, segment };
        let d: Vec<_> = meta(2500, 1000).datagrams().collect();
        assert_eq!(d, [(0, 1000), (1000, 1000), (2000, 500)]);
        let d: Vec<_> = meta(3000, 1000).datagrams().collect();
        assert_eq!(d, [(0, 1000), (1000, 1000), (2000, 1000)]);
        assert_eq!(meta(64, 64).datagrams().collect::<Vec<_>>(), [(0, 64)]);
        assert_eq!(meta(0, 0).datagrams().collect::<Vec<_>>(), [(0, 0)], "an empty datagram is one datagram");
    }

    #[test]
    fn cmsgs_fit_and_are_well_formed() {
        let mut c = Ctrl([0; CTRL]);
        let from = PktInfo::V6(Ipv6Addr::LOCALHOST, 1);
        let len = put_cmsgs(&mut c, Some(from), Some(1400));
        assert!(len <= CTRL);
        let mut h: libc::msghdr = zeroed();
        h.msg_control = c.0.as_mut_ptr().cast();
        h.msg_controllen = len as _;
        assert_eq!(parse_cmsgs(&h).0, Some(from));
        // The second message is UDP_SEGMENT = 1400.
        // CMSG_SPACE(20) on 64-bit Linux: a 16-byte header, 20 bytes, padding to 8.
        let second = &c.0[40..];
        let level = i32::from_ne_bytes(second[8..12].try_into().unwrap());
        let kind = i32::from_ne_bytes(second[12..16].try_into().unwrap());
        let seg = u16::from_ne_bytes(second[16..18].try_into().unwrap());
        assert_eq!((level, kind, seg), (libc::SOL_UDP, libc::UDP_SEGMENT, 1400));
        assert_eq!(put_cmsgs(&mut c, None, None), 0);
    }
}
