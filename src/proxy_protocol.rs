//! HAProxy PROXY protocol headers, version 1 (text) and version 2 (binary).
//!
//! [`encode`] writes the header a relay puts in front of a proxied stream or
//! datagram; [`parse`] reads one from the start of a buffer. Both are pure: no
//! I/O, no allocation, and no panics on any input. Layout follows HAProxy's
//! `doc/proxy-protocol.txt`.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which header version to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The human-readable text line (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary form with the 12-byte signature.
    V2,
}

/// The transport the header describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Stream,
    /// UDP.
    Datagram,
}

/// Largest header `encode` ever writes (v1 max is 107 bytes; v2 with IPv6 is 16+36=52).
pub const MAX_ENCODED_LEN: usize = 108;

/// Longest v1 line a receiver must accept, CRLF included.
const V1_MAX_LEN: usize = 107;
/// What every v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// What every v2 header starts with.
const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Signature, version/command, family/protocol and the 2-byte length.
const V2_FIXED_LEN: usize = 16;
/// Version 2 in the high nibble, command PROXY in the low one.
const V2_PROXY_COMMAND: u8 = 0x21;

/// Writes a header for a connection from `src` (the client) to `dst` into `out`, returning its length.
///
/// `dst` is the address the client connected to. IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`) are unmapped first. If the families still differ, the
/// IPv4 one is mapped into IPv6 and the header is TCP6 / `AF_INET6`. Version 1
/// defines no UDP form, so `(V1, Datagram)` writes `PROXY UNKNOWN\r\n`, which
/// tells the receiver to keep its own view of the addresses.
pub fn encode(
    version: Version,
    transport: Transport,
    src: SocketAddr,
    dst: SocketAddr,
    out: &mut [u8; MAX_ENCODED_LEN],
) -> usize {
    let (src, dst) = same_family(src, dst);
    let mut w = Cursor { buf: out, pos: 0 };
    // Nothing can run out of room: v1 is at most 104 bytes here, v2 at most 52.
    let _ = match (version, transport) {
        (Version::V1, Transport::Datagram) => w.write_str("PROXY UNKNOWN\r\n"),
        (Version::V1, Transport::Stream) => {
            let protocol = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            write!(w, "PROXY {protocol} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port())
        }
        (Version::V2, _) => w.put_v2(transport, src, dst),
    };
    w.pos
}

/// Unmaps IPv4-mapped addresses, then maps IPv4 into IPv6 if the families still differ.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (src, dst) = (crate::unmap(src), crate::unmap(dst));
    if src.is_ipv4() == dst.is_ipv4() { (src, dst) } else { (map(src), map(dst)) }
}

/// Turns `a.b.c.d:p` into `[::ffff:a.b.c.d]:p`; IPv6 addresses pass through.
fn map(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// Appends to a fixed buffer, failing rather than writing past its end.
struct Cursor<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Cursor<'_> {
    /// Appends `bytes` if they all fit.
    fn put(&mut self, bytes: &[u8]) -> fmt::Result {
        let end = self.pos + bytes.len();
        self.buf.get_mut(self.pos..end).ok_or(fmt::Error)?.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    /// Appends an address as 4 or 16 bytes in network order.
    fn put_ip(&mut self, ip: IpAddr) -> fmt::Result {
        match ip {
            IpAddr::V4(ip) => self.put(&ip.octets()),
            IpAddr::V6(ip) => self.put(&ip.octets()),
        }
    }

    /// Appends a v2 PROXY header; `src` and `dst` must share a family.
    fn put_v2(&mut self, transport: Transport, src: SocketAddr, dst: SocketAddr) -> fmt::Result {
        let (family, block_len) = if src.is_ipv4() { (0x10, 12u16) } else { (0x20, 36) };
        let protocol = if transport == Transport::Stream { 0x1 } else { 0x2 };
        self.put(&V2_SIGNATURE)?;
        self.put(&[V2_PROXY_COMMAND, family | protocol])?;
        self.put(&block_len.to_be_bytes())?;
        self.put_ip(src.ip())?;
        self.put_ip(dst.ip())?;
        self.put(&src.port().to_be_bytes())?;
        self.put(&dst.port().to_be_bytes())
    }
}

impl fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.put(s.as_bytes())
    }
}

/// What a parsed header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addresses {
    /// v2 LOCAL command or v1 UNKNOWN / v2 `AF_UNSPEC` or `AF_UNIX`: keep the real connection's addresses.
    Local,
    /// A proxied connection: the original source and destination.
    Proxied {
        /// The client's address.
        src: SocketAddr,
        /// The address the client connected to.
        dst: SocketAddr,
        /// TCP or UDP.
        transport: Transport,
    },
}

/// A complete header found at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the header in bytes; the payload starts at `buf[len]`.
    pub len: usize,
    /// Whether it was a text (v1) or binary (v2) header.
    pub version: Version,
    /// The addresses it carries.
    pub addresses: Addresses,
}

/// Why a buffer is not a valid header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The bytes start with neither `PROXY ` nor the v2 signature.
    NotProxy,
    /// A v1 line has no CRLF within its first 107 bytes.
    TooLong,
    /// The header is recognisably PROXY but breaks the spec; says how.
    Malformed(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotProxy => f.write_str("data does not start with a PROXY protocol header"),
            ParseError::TooLong => write!(f, "v1 header longer than {V1_MAX_LEN} bytes"),
            ParseError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses the header at the start of `buf`; `Ok(None)` means a valid prefix that needs more bytes.
///
/// `Ok(Some(h))`: the header is `buf[..h.len]`; bytes after it are payload and
/// untouched. Fails with [`ParseError::NotProxy`] as soon as `buf` can no
/// longer begin a header. A v1 header is at most 107 bytes, a v2 one at most
/// 16 + 65535; every v2 byte must arrive before `Some` is returned.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, ParseError> {
    if starts_like(buf, V1_PREFIX) {
        parse_v1(buf)
    } else if starts_like(buf, &V2_SIGNATURE) {
        parse_v2(buf)
    } else {
        Err(ParseError::NotProxy)
    }
}

/// The whole length a v2 header announces, once its 16 fixed bytes are in
/// `buf`: a reader can refuse an over-long header before waiting for it.
pub fn announced_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < V2_FIXED_LEN || buf[..V2_SIGNATURE.len()] != V2_SIGNATURE {
        return None;
    }
    Some(V2_FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]])))
}

/// Whether `buf` and `prefix` agree on their common length.
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

/// Parses `PROXY <proto> <src> <dst> <sport> <dport>\r\n` or `PROXY UNKNOWN...\r\n`.
fn parse_v1(buf: &[u8]) -> Result<Option<Header>, ParseError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX_LEN { Err(ParseError::TooLong) } else { Ok(None) };
    };
    // `buf` starts with "PROXY ", so the LF is at index 6 or later.
    let Some(line) = buf[V1_PREFIX.len()..lf].strip_suffix(b"\r") else {
        return Err(ParseError::Malformed("v1 line does not end with CRLF"));
    };
    let header = |addresses| Ok(Some(Header { len: lf + 1, version: Version::V1, addresses }));
    let mut fields = line.split(|&b| b == b' ');
    let is_v6 = match fields.next().unwrap_or_default() {
        b"UNKNOWN" => return header(Addresses::Local),
        b"TCP4" => false,
        b"TCP6" => true,
        _ => return Err(ParseError::Malformed("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(dst), Some(src_port), Some(dst_port), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(ParseError::Malformed("v1 line needs exactly four fields after the protocol"));
    };
    let (Some(src), Some(dst)) = (parse_v1_ip(src, is_v6), parse_v1_ip(dst, is_v6)) else {
        return Err(ParseError::Malformed("v1 address is not valid for its protocol"));
    };
    let (Some(src_port), Some(dst_port)) = (parse_v1_port(src_port), parse_v1_port(dst_port)) else {
        return Err(ParseError::Malformed("v1 port is not a decimal number from 0 to 65535"));
    };
    let (src, dst) = (SocketAddr::new(src, src_port), SocketAddr::new(dst, dst_port));
    header(Addresses::Proxied { src, dst, transport: Transport::Stream })
}

/// Parses an IPv6 address if `is_v6`, else a dotted-quad IPv4 one.
fn parse_v1_ip(field: &[u8], is_v6: bool) -> Option<IpAddr> {
    let text = std::str::from_utf8(field).ok()?;
    if is_v6 { text.parse::<Ipv6Addr>().ok().map(IpAddr::V6) } else { text.parse::<Ipv4Addr>().ok().map(IpAddr::V4) }
}

/// Parses a port: 1 to 5 decimal digits, no sign, no leading zero.
fn parse_v1_port(field: &[u8]) -> Option<u16> {
    match field {
        [b'0'] => Some(0),
        [b'1'..=b'9', ..] if field.len() <= 5 && field.iter().all(u8::is_ascii_digit) => {
            let n = field.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
            u16::try_from(n).ok()
        }
        _ => None,
    }
}

/// Parses a binary header, checking each fixed field as soon as it arrives.
fn parse_v2(buf: &[u8]) -> Result<Option<Header>, ParseError> {
    let Some(&version_command) = buf.get(12) else { return Ok(None) };
    if version_command >> 4 != 2 {
        return Err(ParseError::Malformed("v2 version is not 2"));
    }
    let is_local = match version_command & 0x0F {
        0x0 => true,
        0x1 => false,
        _ => return Err(ParseError::Malformed("v2 command is neither LOCAL nor PROXY")),
    };
    let Some(&family) = buf.get(13) else { return Ok(None) };
    // The LOCAL command ignores the family, whatever it is.
    let min_block_len = match family {
        _ if is_local => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x00 | 0x31 | 0x32 => 0,
        _ => return Err(ParseError::Malformed("v2 address family or protocol is unknown")),
    };
    let Some(&[len_hi, len_lo]) = buf.get(14..V2_FIXED_LEN) else { return Ok(None) };
    let block_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if block_len < min_block_len {
        return Err(ParseError::Malformed("v2 address block is too short for its family"));
    }
    let len = V2_FIXED_LEN + block_len;
    let Some(block) = buf.get(V2_FIXED_LEN..len) else { return Ok(None) };
    // Only LOCAL, AF_UNSPEC and AF_UNIX need no addresses; they keep the real ones.
    let addresses = match min_block_len {
        0 => Addresses::Local,
        _ => v2_addresses(family, block).ok_or(ParseError::Malformed("v2 address block is too short"))?,
    };
    Ok(Some(Header { len, version: Version::V2, addresses }))
}

/// Reads the addresses of an INET/INET6 block; any TLVs after them are skipped.
fn v2_addresses(family: u8, block: &[u8]) -> Option<Addresses> {
    let (src, dst, ports_at): (IpAddr, IpAddr, usize) = if family >> 4 == 1 {
        (Ipv4Addr::from(take::<4>(block, 0)?).into(), Ipv4Addr::from(take::<4>(block, 4)?).into(), 8)
    } else {
        (Ipv6Addr::from(take::<16>(block, 0)?).into(), Ipv6Addr::from(take::<16>(block, 16)?).into(), 32)
    };
    let src_port = u16::from_be_bytes(take(block, ports_at)?);
    let dst_port = u16::from_be_bytes(take(block, ports_at + 2)?);
    let transport = if family & 0x0F == 1 { Transport::Stream } else { Transport::Datagram };
    Some(Addresses::Proxied { src: SocketAddr::new(src, src_port), dst: SocketAddr::new(dst, dst_port), transport })
}

/// Copies `N` bytes of `block` starting at `at`, if there are that many.
fn take<const N: usize>(block: &[u8], at: usize) -> Option<[u8; N]> {
    block.get(at..at.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Transport::{Datagram, Stream};
    use Version::{V1, V2};

    fn enc(version: Version, transport: Transport, src: &str, dst: &str) -> Vec<u8> {
        let mut out = [0; MAX_ENCODED_LEN];
        let len = encode(version, transport, src.parse().unwrap(), dst.parse().unwrap(), &mut out);
        out[..len].to_vec()
    }

    fn proxied(src: &str, dst: &str, transport: Transport) -> Addresses {
        Addresses::Proxied { src: src.parse().unwrap(), dst: dst.parse().unwrap(), transport }
    }

    fn parsed(buf: &[u8]) -> Header {
        parse(buf).unwrap().unwrap()
    }

    /// The v2 signature followed by `rest`.
    fn v2(rest: &[&[u8]]) -> Vec<u8> {
        [&[&V2_SIGNATURE[..]], rest].concat().concat()
    }

    const LOCAL_V1: Header = Header { len: 15, version: V1, addresses: Addresses::Local };
    const LOCAL_V2: Header = Header { len: 16, version: V2, addresses: Addresses::Local };

    #[test]
    fn encodes_v1() {
        let tcp4 = enc(V1, Stream, "192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(tcp4, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let tcp6 = enc(V1, Stream, "[2001:db8::1]:1234", "[2001:db8::2]:80");
        assert_eq!(tcp6, b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n");
        assert_eq!(enc(V1, Datagram, "1.2.3.4:5", "6.7.8.9:10"), b"PROXY UNKNOWN\r\n");
        let mapped = enc(V1, Stream, "[::ffff:10.0.0.1]:5000", "10.0.0.2:80");
        assert_eq!(mapped, b"PROXY TCP4 10.0.0.1 10.0.0.2 5000 80\r\n");
        let mixed = enc(V1, Stream, "[2001:db8::1]:5000", "10.0.0.2:80");
        assert_eq!(mixed, b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.2 5000 80\r\n");
        let max = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        assert_eq!(enc(V1, Stream, max, max).len(), 104);
    }

    #[test]
    fn encodes_v2() {
        let ips4: &[u8] = &[192, 168, 0, 1, 10, 0, 0, 2];
        let ports = &[0xDC, 0x04, 0x01, 0xBB];
        let tcp4 = v2(&[&[0x21, 0x11, 0x00, 0x0C], ips4, ports]);
        assert_eq!(enc(V2, Stream, "192.168.0.1:56324", "10.0.0.2:443"), tcp4);
        assert_eq!(enc(V2, Stream, "[::ffff:192.168.0.1]:56324", "[::ffff:10.0.0.2]:443"), tcp4);
        assert_eq!(enc(V2, Datagram, "192.168.0.1:56324", "10.0.0.2:443"), v2(&[&[0x21, 0x12, 0, 12], ips4, ports]));
        let src6: &[u8] = &[0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst6 = &[0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        for (transport, family) in [(Stream, 0x21), (Datagram, 0x22)] {
            let out = enc(V2, transport, "[2001:db8::1]:56324", "[2001:db8::2]:443");
            assert_eq!(out, v2(&[&[0x21, family, 0x00, 0x24], src6, dst6, ports]));
            assert_eq!(out.len(), 52);
        }
        let mixed = enc(V2, Stream, "10.0.0.1:5000", "[2001:db8::2]:80");
        assert_eq!(parsed(&mixed).addresses, proxied("[::ffff:10.0.0.1]:5000", "[2001:db8::2]:80", Stream));
    }

    #[test]
    fn round_trips_and_leaves_payload_untouched() {
        let max6 = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let pairs = [("1.2.3.4:1", "5.6.7.8:65535"), ("0.0.0.0:0", "255.255.255.255:80"), ("[::1]:443", max6)];
        for (src, dst) in pairs {
            for (version, transport) in [(V1, Stream), (V2, Stream), (V2, Datagram)] {
                let out = enc(version, transport, src, dst);
                let expected = Header { len: out.len(), version, addresses: proxied(src, dst, transport) };
                assert_eq!(parsed(&out), expected, "{version:?} {transport:?} {src} {dst}");
                let buf = [&out[..], b"\r\nGET / HTTP/1.1\r\n"].concat();
                assert_eq!((parsed(&buf), &buf[out.len()..]), (expected, &b"\r\nGET / HTTP/1.1\r\n"[..]));
            }
            assert_eq!(parsed(&enc(V1, Datagram, src, dst)), LOCAL_V1);
        }
    }

    #[test]
    fn parses_spec_examples() {
        let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        let max4 = "255.255.255.255:65535";
        assert_eq!(parsed(tcp4), Header { len: 56, version: V1, addresses: proxied(max4, max4, Stream) });
        let ip6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let (tcp6, max6) = (format!("PROXY TCP6 {ip6} {ip6} 65535 65535\r\n"), format!("[{ip6}]:65535"));
        assert_eq!(parsed(tcp6.as_bytes()), Header { len: 104, version: V1, addresses: proxied(&max6, &max6, Stream) });
        assert_eq!(parsed(b"PROXY UNKNOWN\r\n"), LOCAL_V1);
        let unknown = format!("PROXY UNKNOWN {ip6} {ip6} 65535 65535\r\n");
        assert_eq!(parsed(unknown.as_bytes()), Header { len: 107, ..LOCAL_V1 });
        // TCP4 v2 as HAProxy sends it, followed by the request.
        let haproxy =
            v2(&[&[0x21, 0x11, 0, 12, 172, 19, 0, 1, 172, 19, 0, 3, 0xA6, 0x52, 0, 80], b"GET / HTTP/1.1\r\n"]);
        let addresses = proxied("172.19.0.1:42578", "172.19.0.3:80", Stream);
        assert_eq!(parsed(&haproxy), Header { len: 28, version: V2, addresses });
    }

    #[test]
    fn parses_v2_local_unspec_unix_and_tlvs() {
        assert_eq!(parsed(&v2(&[&[0x20, 0x00, 0, 0]])), LOCAL_V2);
        // LOCAL ignores the family, even one whose block would be too short.
        assert_eq!(parsed(&v2(&[&[0x20, 0x11, 0, 2, 9, 9]])), Header { len: 18, ..LOCAL_V2 });
        assert_eq!(parsed(&v2(&[&[0x20, 0x77, 0, 0]])), LOCAL_V2);
        assert_eq!(parsed(&v2(&[&[0x21, 0x00, 0, 0]])), LOCAL_V2);
        assert_eq!(parsed(&v2(&[&[0x21, 0x31, 0, 216], &[0; 216]])), Header { len: 232, ..LOCAL_V2 });
        assert_eq!(parsed(&v2(&[&[0x21, 0x32, 0, 0]])), LOCAL_V2);
        // A NOOP TLV after the addresses is skipped but counted.
        let tlv = v2(&[&[0x21, 0x12, 0, 18, 1, 2, 3, 4, 6, 7, 8, 9, 0, 5, 0, 10, 0x04, 0, 3, 1, 2, 3, 0xEE]]);
        let addresses = proxied("1.2.3.4:5", "6.7.8.9:10", Datagram);
        assert_eq!(parsed(&tlv), Header { len: 34, version: V2, addresses });
    }

    #[test]
    fn every_prefix_needs_more() {
        let headers = [
            enc(V1, Stream, "192.168.0.1:56324", "192.168.0.11:443"),
            enc(V1, Stream, "[2001:db8::1]:1234", "[2001:db8::2]:80"),
            enc(V1, Datagram, "1.2.3.4:5", "6.7.8.9:10"),
            enc(V2, Datagram, "[2001:db8::1]:1234", "[2001:db8::2]:80"),
            v2(&[&[0x21, 0x11, 0, 16, 1, 2, 3, 4, 6, 7, 8, 9, 0, 5, 0, 10, 0x04, 0, 1, 0]]),
        ];
        for header in &headers {
            for n in 0..header.len() {
                assert_eq!(parse(&header[..n]), Ok(None), "{:?}", &header[..n]);
            }
            assert_eq!(parsed(header).len, header.len());
        }
    }

    #[test]
    fn rejects_garbage_early() {
        for junk in [&b"G"[..], b"GET / HTTP/1.1\r\n", b"PROXY\t", b"PROXX", b"proxy ", b"\r\n\r\n\x01", b"\x16\x03"] {
            assert_eq!(parse(junk), Err(ParseError::NotProxy), "{junk:?}");
        }
        for start in [&b""[..], b"P", b"PROXY", b"\r", b"\r\n\r\n\0\r\nQUIT"] {
            assert_eq!(parse(start), Ok(None), "{start:?}");
        }
        assert_eq!(ParseError::NotProxy.to_string(), "data does not start with a PROXY protocol header");
    }

    #[test]
    fn v1_without_crlf_is_too_long() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(108, b'x');
        assert_eq!(parse(&line), Err(ParseError::TooLong));
        assert_eq!(parse(&line[..107]), Err(ParseError::TooLong));
        assert_eq!(parse(&line[..106]), Ok(None));
        // The CRLF itself must end within the first 107 bytes.
        line.splice(106.., *b"\r\n");
        assert_eq!(parse(&line), Err(ParseError::TooLong));
        line.remove(20);
        assert_eq!(parsed(&line).len, 107);
        assert_eq!(ParseError::TooLong.to_string(), "v1 header longer than 107 bytes");
    }

    #[test]
    fn rejects_malformed_v1() {
        // Each gets "PROXY " in front and CRLF after.
        let bad = [
            ["TCP4 1.2.3.4  5.6.7.8 1 2", "TCP4 1.2.3.4 5.6.7.8 1 2 ", "TCP4 1.2.3.4 5.6.7.8 1"],
            ["TCP4 1.2.3.4 5.6.7.8 01 2", "TCP4 1.2.3.4 5.6.7.8 +1 2", "TCP4 1.2.3.4 5.6.7.8 1 65536"],
            ["TCP4 1.2.3.4 ::1 1 2", "TCP4 1.2.3.04 5.6.7.8 1 2", "TCP6 1.2.3.4 ::1 1 2"],
            ["TCP6 ::1%eth0 ::1 1 2", "tcp4 1.2.3.4 5.6.7.8 1 2", "UNKNOWNX"],
            ["", "UNKNOWN\n", "TCP4 1.2.3.4 5.6.7.8 1 2\r"],
        ];
        for rest in bad.iter().flatten() {
            let line = format!("PROXY {rest}\r\n");
            assert!(matches!(parse(line.as_bytes()), Err(ParseError::Malformed(_))), "{line:?}");
        }
        let ok = parsed(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n").addresses;
        assert_eq!(ok, proxied("1.2.3.4:0", "5.6.7.8:65535", Stream));
        assert_eq!(parsed(b"PROXY UNKNOWN \xFF\r anything\r\n").addresses, Addresses::Local);
    }

    #[test]
    fn rejects_malformed_v2_early() {
        let short = "v2 address block is too short for its family";
        let cases: [(&[u8], &str); 7] = [
            (&[0x11], "v2 version is not 2"),
            (&[0x22], "v2 command is neither LOCAL nor PROXY"),
            (&[0x21, 0x13], "v2 address family or protocol is unknown"),
            (&[0x21, 0x10], "v2 address family or protocol is unknown"),
            (&[0x21, 0x40], "v2 address family or protocol is unknown"),
            (&[0x21, 0x21, 0, 35], short),
            (&[0x21, 0x11, 0, 11], short),
        ];
        for (rest, why) in cases {
            assert_eq!(parse(&v2(&[rest])), Err(ParseError::Malformed(why)));
        }
        assert_eq!(ParseError::Malformed("x").to_string(), "malformed PROXY header: x");
        // The largest length waits for all of its bytes.
        let huge = v2(&[&[0x21, 0x11, 0xFF, 0xFF, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]]);
        assert_eq!(parse(&huge), Ok(None));
        assert_eq!(parsed(&[&huge[..], &vec![0; 65535 - 12]].concat()).len, 16 + 65535);
    }

    #[test]
    fn random_input_never_panics() {
        const V1_ALPHABET: &[u8] = b"0123456789abcdef.: \r\nTCPUNKOW46+";
        let seeds = [
            enc(V1, Stream, "[2001:db8::1]:1234", "[::ffff:1.2.3.4]:80"),
            enc(V2, Stream, "1.2.3.4:5", "6.7.8.9:10"),
            enc(V2, Datagram, "[2001:db8::1]:1234", "[2001:db8::2]:53"),
            v2(&[&[0x21, 0x11, 0, 16, 1, 2, 3, 4, 6, 7, 8, 9, 0, 5, 0, 10, 0x04, 0, 1, 0]]),
            b"PROXY UNKNOWN 1 2\r\n".to_vec(),
            v2(&[&[0x20, 0x00, 0, 0]]),
        ];
        // Marsaglia's xorshift64: enough randomness without a dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut rng = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut buf = Vec::with_capacity(300);
        for _ in 0..200_000 {
            buf.clear();
            match rng(5) {
                0 => {}
                1 => buf.extend_from_slice(V1_PREFIX),
                2 => buf.extend_from_slice(&V2_SIGNATURE),
                _ => buf.extend_from_slice(&seeds[rng(seeds.len())]),
            }
            // Flip a few bytes, then cut or pad (with v1-ish text or raw bytes) to a random length.
            for _ in 0..rng(3) {
                let at = rng(buf.len() + 1);
                if let Some(byte) = buf.get_mut(at) {
                    *byte = rng(256) as u8;
                }
            }
            let (len, text) = (rng(300), rng(2) == 0);
            buf.truncate(len);
            while buf.len() < len {
                buf.push(if text { V1_ALPHABET[rng(V1_ALPHABET.len())] } else { rng(256) as u8 });
            }
            match parse(&buf) {
                Ok(Some(h)) => {
                    assert!(h.len <= buf.len(), "{buf:?}");
                    assert_eq!(parse(&buf[..h.len]), Ok(Some(h)), "{buf:?}");
                }
                Ok(None) if buf.first() == Some(&b'P') => assert!(buf.len() < V1_MAX_LEN, "{buf:?}"),
                Ok(None) | Err(_) => {}
            }
        }
    }
}
