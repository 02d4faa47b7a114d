//! Which address a transparent forward connects to its backend from
//! (ARCHITECTURE.md, "Transparent"). Pure: the sockets are made in `sys`.

use std::net::{IpAddr, SocketAddr};

use crate::config::Transparent;

/// Where a backend socket's source address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// Not a transparent forward: the relay's own address.
    Own,
    /// Bind this address (the client's, with port 0 or the client's port)
    /// with IP_TRANSPARENT / IPV6_TRANSPARENT.
    Client(SocketAddr),
    /// A loopback client: spoofing it would make the backend answer itself,
    /// so the relay's own address is used. Expected, not a fallback.
    Loopback,
    /// The client and the backend are of different address families: no
    /// socket can have the one's address and reach the other. The relay's
    /// own address is used, and the fallback counted.
    OtherFamily,
}

/// The source for a connection from `client` (already unmapped to IPv4
/// when it was `::ffff:a.b.c.d`) to `target`. `keep_port` keeps the
/// client's port even when `mode` is [`Transparent::Address`] (UDP flows do).
pub(crate) fn source(mode: Option<Transparent>, client: SocketAddr, target: SocketAddr, keep_port: bool) -> Source {
    let Some(mode) = mode else { return Source::Own };
    if client.ip().is_loopback() {
        return Source::Loopback;
    }
    if client.is_ipv4() != target.is_ipv4() || is_mapped(target.ip()) {
        return Source::OtherFamily;
    }
    let port = if keep_port || mode == Transparent::AddressAndPort { client.port() } else { 0 };
    Source::Client(SocketAddr::new(client.ip(), port))
}

/// An IPv4-mapped IPv6 target (`[::ffff:a.b.c.d]`) is reached over IPv4:
/// an IPv6 client's address cannot be its source.
fn is_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn same_family_clients_are_spoofed_others_fall_back() {
        let t = Some(Transparent::Address);
        let port = Some(Transparent::AddressAndPort);
        assert_eq!(source(None, a("10.0.0.5:4000"), a("10.0.1.2:80"), false), Source::Own);
        assert_eq!(source(t, a("10.0.0.5:4000"), a("10.0.1.2:80"), false), Source::Client(a("10.0.0.5:0")));
        assert_eq!(source(port, a("10.0.0.5:4000"), a("10.0.1.2:80"), false), Source::Client(a("10.0.0.5:4000")));
        assert_eq!(source(t, a("10.0.0.5:4000"), a("10.0.1.2:53"), true), Source::Client(a("10.0.0.5:4000")));
        assert_eq!(source(t, a("[fd00::5]:4000"), a("[fd00:1::2]:80"), false), Source::Client(a("[fd00::5]:0")));
        assert_eq!(source(t, a("[fd00::5]:4000"), a("10.0.1.2:80"), false), Source::OtherFamily);
        assert_eq!(source(t, a("10.0.0.5:4000"), a("[fd00:1::2]:80"), false), Source::OtherFamily);
        assert_eq!(source(t, a("[fd00::5]:4000"), a("[::ffff:10.0.1.2]:80"), false), Source::OtherFamily);
        assert_eq!(source(t, a("127.0.0.1:4000"), a("10.0.1.2:80"), false), Source::Loopback);
        assert_eq!(source(port, a("127.3.0.1:4000"), a("10.0.1.2:80"), false), Source::Loopback);
        assert_eq!(source(t, a("[::1]:4000"), a("10.0.1.2:80"), false), Source::Loopback);
    }
}
