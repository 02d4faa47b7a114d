//! Address ranges (`10.0.0.0/8`, `::1/128`, or a bare address) for trusted
//! proxies and access lists.

use std::net::IpAddr;

/// An IPv4 or IPv6 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX` or a bare `ADDR` (a single host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: prefix length must be 0-{max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    /// True if `ip` is inside this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(u128::from(net), u128::from(ip), 128, self.prefix),
            _ => false,
        }
    }
}

/// Parses `CIDR<sep>CIDR...` (empty entries skipped; at least one needed).
pub fn parse_list(list: &str, sep: char) -> Result<Vec<Cidr>, String> {
    let nets = list
        .split(sep)
        .filter(|p| !p.trim().is_empty())
        .map(|p| match crate::config::clip(p.trim(), 60) {
            (_, false) => Cidr::parse(p),
            (_, true) => Err(format!("{} is not an address or CIDR range", crate::config::quote(p.trim()))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if nets.is_empty() {
        return Err("expected at least one address or CIDR range".into());
    }
    Ok(nets)
}

/// Which sources may use a forward, as HAProxy and nginx read such lists:
/// a source in `deny` is refused; with an `allow` list, a source must be
/// in it. `None` is no list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Only these sources (None: every source not denied).
    pub allow: Option<Vec<Cidr>>,
    /// Never these sources.
    pub deny: Option<Vec<Cidr>>,
}

impl Access {
    /// True if `ip` may use the forward.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let any = |nets: &Option<Vec<Cidr>>| nets.as_ref().map(|n| n.iter().any(|c| c.contains(ip)));
        any(&self.deny) != Some(true) && any(&self.allow) != Some(false)
    }

    /// True if no list is set (every source admitted, nothing checked).
    pub fn is_open(&self) -> bool {
        self.allow.is_none() && self.deny.is_none()
    }
}

fn prefix_eq(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
    let shift = bits - u32::from(prefix);
    shift >= bits || (a >> shift) == (b >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_their_members() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        assert!(!Cidr::parse("::1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("127.0.0.1/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }

    #[test]
    fn deny_wins_and_an_allow_list_must_match() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let list = |s: &str| Some(parse_list(s, '+').unwrap());
        let open = Access::default();
        assert!(open.is_open() && open.admits(ip("1.2.3.4")));
        let allow = Access { allow: list("10.0.0.0/8+::1"), deny: None };
        assert!(allow.admits(ip("10.9.9.9")) && allow.admits(ip("::1")) && allow.admits(ip("::ffff:10.0.0.1")));
        assert!(!allow.admits(ip("127.0.0.1")));
        let both = Access { allow: list("10.0.0.0/8"), deny: list("10.0.0.2") };
        assert!(both.admits(ip("10.0.0.1")) && !both.admits(ip("10.0.0.2")));
        let deny = Access { allow: None, deny: list("127.0.0.2/32") };
        assert!(deny.admits(ip("127.0.0.1")) && !deny.admits(ip("127.0.0.2")));
        assert!(parse_list("+", '+').is_err());
        assert!(parse_list("10.0.0.0/8+nope", '+').unwrap_err().contains("nope"));
    }
}
