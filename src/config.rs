//! What to relay and how: the FORWARD syntax, config files, durations and sizes.
//!
//! Everything here is pure (no sockets) except host-name resolution, which
//! the caller passes in, so the parsers are unit-tested and fuzzed directly.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::proxy_protocol::Version;

/// Which transport a forward relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// TCP only (the default).
    Tcp,
    /// UDP only.
    Udp,
    /// TCP and UDP on the same port.
    Both,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Both => "tcp+udp",
        })
    }
}

impl Proto {
    /// True if TCP is relayed.
    pub fn tcp(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Both)
    }

    /// True if UDP is relayed.
    pub fn udp(self) -> bool {
        matches!(self, Proto::Udp | Proto::Both)
    }
}

/// One listening port relayed to one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// Transport(s).
    pub proto: Proto,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to connect.
    pub target: SocketAddr,
    /// Write a PROXY header of this version to the target first.
    pub send_proxy: Option<Version>,
    /// Read a PROXY header from (trusted) clients first.
    pub accept_proxy: bool,
    /// Connect to the target from the client's own address.
    pub transparent: Option<Transparent>,
    /// Which sources may use it (`,allow=`, `,deny=`; else `--allow`, `--deny`).
    pub access: crate::cidr::Access,
    /// The text this forward came from, for logs and statistics.
    pub spec: String,
}

/// How a transparent forward connects to its target: from the client's
/// own address (IP_TRANSPARENT), where the families allow it
/// (ARCHITECTURE.md, "Transparent").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transparent {
    /// `,transparent`: the client's address; TCP takes a port the kernel picks.
    Address,
    /// `,transparent=port`: the client's address and port on TCP too.
    AddressAndPort,
}

impl Forward {
    /// Where this forward's TCP connections go, and how.
    pub(crate) fn route(&self) -> crate::tcp::connection::Route {
        crate::tcp::connection::Route {
            target: self.target,
            send_proxy: self.send_proxy,
            accept_proxy: self.accept_proxy,
            transparent: self.transparent,
            access: self.access.clone(),
        }
    }
}

/// A start-up failure: `Usage` (exit 2) for bad syntax, `Runtime` (exit 1)
/// for what the machine refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The command line or a config file is malformed.
    Usage(String),
    /// The system refused (address in use, unresolvable host, unreadable file).
    Runtime(String),
}

impl StartError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Usage(_) => 2,
            StartError::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Usage(m) | StartError::Runtime(m) => f.write_str(m),
        }
    }
}

/// How many characters of a user's text an error message quotes.
const QUOTE_MAX: usize = 60;

/// `text` in double quotes for an error message, cut to 60 characters
/// (`"abc"...` when cut), so a 10 MB line never lands on stderr whole.
pub(crate) fn quote(text: &str) -> String {
    let (head, cut) = clip(text, QUOTE_MAX);
    format!("{head:?}{}", if cut { "..." } else { "" })
}

/// Like [`quote`], in clap's single quotes.
pub(crate) fn quote_single(text: &str) -> String {
    let (head, cut) = clip(text, QUOTE_MAX);
    format!("'{head}'{}", if cut { "..." } else { "" })
}

/// The first `max` characters of `text`, and whether anything was cut.
pub(crate) fn clip(text: &str, max: usize) -> (&str, bool) {
    match text.char_indices().nth(max) {
        Some((at, _)) => (&text[..at], true),
        None => (text, false),
    }
}

/// Resolves a host name to an address (the real one asks the system resolver).
pub type Resolver<'a> = &'a dyn Fn(&str) -> Result<IpAddr, String>;

/// The system resolver: the first address `getaddrinfo` returns.
pub fn system_resolver(host: &str) -> Result<IpAddr, String> {
    use std::net::ToSocketAddrs;
    let mut addrs =
        (host, 0u16).to_socket_addrs().map_err(|e| format!("cannot resolve target host {}: {e}", quote(host)))?;
    addrs.next().map(|a| a.ip()).ok_or_else(|| format!("target host {} has no address", quote(host)))
}

/// Parses one FORWARD, `[PROTO:]LISTEN=TARGET[,OPTION...]`, expanding port
/// ranges into one `Forward` per port.
pub fn parse_forward(text: &str, resolve: Resolver<'_>) -> Result<Vec<Forward>, StartError> {
    let usage = |msg: String| StartError::Usage(format!("invalid forward {}: {msg}", quote(text)));
    let spec = text.trim();
    let mut parts = spec.split(',');
    let main = parts.next().unwrap_or_default();
    let (proto, rest) = match main.split_once(':') {
        Some(("tcp", r)) => (Proto::Tcp, r),
        Some(("udp", r)) => (Proto::Udp, r),
        Some(("both", r)) => (Proto::Both, r),
        Some((p, r))
            if !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphabetic())
                && r.split('=').next().is_some_and(|l| l.contains(':')) =>
        {
            return Err(usage(format!("unknown protocol {} (expected tcp, udp or both)", quote(p))));
        }
        _ => (Proto::Tcp, main),
    };
    let Some((listen, target)) = rest.split_once('=') else {
        return Err(usage("expected LISTEN=TARGET, e.g. [::]:8080=127.0.0.1:80".into()));
    };
    let (listen_host, listen_ports) = split_host_port(listen).map_err(|m| usage(format!("listen address: {m}")))?;
    let listen_ip: IpAddr = listen_host
        .parse()
        .map_err(|_| usage(format!("listen address {} is not an IPv4 or [IPv6] address", quote(listen_host))))?;
    let (target_host, target_ports) = split_host_port(target).map_err(|m| usage(format!("target: {m}")))?;
    let (l_lo, l_hi) = parse_ports(listen_ports).map_err(|m| usage(format!("listen port: {m}")))?;
    let (t_lo, t_hi) = parse_ports(target_ports).map_err(|m| usage(format!("target port: {m}")))?;
    if l_hi - l_lo != t_hi - t_lo {
        return Err(usage(format!(
            "port ranges differ in width ({} listen ports, {} target ports)",
            l_hi - l_lo + 1,
            t_hi - t_lo + 1
        )));
    }
    let mut send_proxy = None;
    let mut accept_proxy = false;
    let mut transparent = None;
    let mut access = crate::cidr::Access::default();
    for opt in parts {
        let list = |name: &str, value: &str| {
            crate::cidr::parse_list(value, '+').map(Some).map_err(|e| usage(format!("{name}: {e}")))
        };
        match opt {
            _ if opt.starts_with("allow=") => access.allow = list("allow", &opt["allow=".len()..])?,
            _ if opt.starts_with("deny=") => access.deny = list("deny", &opt["deny=".len()..])?,
            "send-proxy=v1" => send_proxy = Some(Version::V1),
            "send-proxy=v2" => send_proxy = Some(Version::V2),
            "accept-proxy" => accept_proxy = true,
            "transparent" => transparent = Some(Transparent::Address),
            "transparent=port" => transparent = Some(Transparent::AddressAndPort),
            _ => {
                return Err(usage(format!(
                    "unknown option {} (expected send-proxy=v1, send-proxy=v2, accept-proxy, transparent, \
                     transparent=port, allow=CIDR+CIDR or deny=CIDR+CIDR)",
                    quote(opt)
                )));
            }
        }
    }
    let target_ip = match target_host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) if target_host.starts_with('[') || target_host.is_empty() => {
            return Err(usage(format!("target address {} is not valid", quote(target_host))));
        }
        Err(_) => resolve(target_host).map_err(StartError::Runtime)?,
    };
    Ok((0..=(l_hi - l_lo))
        .map(|i| Forward {
            proto,
            listen: SocketAddr::new(listen_ip, l_lo + i),
            target: SocketAddr::new(target_ip, t_lo + i),
            send_proxy,
            accept_proxy,
            transparent,
            access: access.clone(),
            spec: spec.to_string(),
        })
        .collect())
}

/// Splits `HOST:PORTS` or `[IPv6]:PORTS`, removing the brackets.
fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("missing ']' after an IPv6 address")?;
        let ports = after.strip_prefix(':').ok_or("expected :PORT after ']'")?;
        return Ok((host, ports));
    }
    let (host, ports) = s.rsplit_once(':').ok_or_else(|| format!("{} has no :PORT", quote(s)))?;
    if host.contains(':') {
        return Err(format!(
            "IPv6 address {} must be in brackets, e.g. {}",
            quote(host),
            quote(&format!("[{host}]:{ports}"))
        ));
    }
    if host.is_empty() {
        return Err(format!("{} has no address before the port", quote(s)));
    }
    Ok((host, ports))
}

/// Parses `PORT` or `A-B` (1-65535, A <= B).
fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let one = |p: &str| -> Result<u16, String> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{} is not a port number", quote(p)));
        }
        match p.parse::<u32>() {
            Ok(n @ 1..=65535) => Ok(n as u16),
            Ok(n) => Err(format!("{n} is out of range (1-65535)")),
            Err(_) => Err(format!("{} is out of range (1-65535)", quote(p))),
        }
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            if a > b {
                return Err(format!("range {a}-{b} runs backwards"));
            }
            Ok((a, b))
        }
        None => one(s).map(|p| (p, p)),
    }
}

/// Parses a config file: one FORWARD per line of UTF-8 text, blank lines
/// and `#` comments allowed. Errors name the file and line.
pub fn parse_config(name: &str, bytes: &[u8], resolve: Resolver<'_>) -> Result<Vec<Forward>, StartError> {
    let (forwards, mut problems) = parse_config_all(name, bytes, resolve, false);
    match problems.is_empty() {
        true => Ok(forwards),
        false => Err(problems.swap_remove(0)),
    }
}

/// Parses a config file's forwards, and the bad lines (each `FILE:LINE:
/// reason`): all of them if `all` (for `--check`), else up to the first.
pub fn parse_config_all(name: &str, bytes: &[u8], resolve: Resolver<'_>, all: bool) -> (Vec<Forward>, Vec<StartError>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in lines(bytes) {
        if !all && !problems.is_empty() {
            break;
        }
        let Some(line) = line else {
            problems.push(StartError::Usage(format!("{name}:{i}: not UTF-8 text")));
            continue;
        };
        // Option lines (`--idle-timeout 30s`) are read by `cli::parse`.
        if line.starts_with('-') {
            continue;
        }
        match parse_forward(line, resolve) {
            Ok(fwd) => out.extend(fwd),
            Err(StartError::Usage(m)) => problems.push(StartError::Usage(format!("{name}:{i}: {m}"))),
            Err(StartError::Runtime(m)) => problems.push(StartError::Runtime(format!("{name}:{i}: {m}"))),
        }
    }
    (out, problems)
}

/// The lines of a config file that hold something, numbered from 1,
/// without comments and surrounding blanks: the text, or None when the
/// line is not UTF-8.
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, Option<&str>)> {
    bytes.split(|&b| b == b'\n').enumerate().filter_map(|(i, line)| match std::str::from_utf8(line) {
        Ok(text) => {
            let text = text.split('#').next().unwrap_or_default().trim();
            (!text.is_empty()).then_some((i + 1, Some(text)))
        }
        Err(_) => Some((i + 1, None)),
    })
}

/// The longest duration an option takes: 3650 days (about 10 years), far
/// from where `Instant + Duration` overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// The largest size an option takes: 1 GiB (socket options take a C int).
pub const MAX_SIZE: usize = 1 << 30;

/// Parses a duration: `250ms`, `10s`, `5m`, `1h`, or plain seconds, at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() || !unit.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(format!("{} is not a duration (e.g. 500ms, 10s, 5m, 1h)", quote(s)));
    }
    let too_long = || format!("{} is too long (at most {} days)", quote(s), MAX_DURATION.as_secs() / 86_400);
    let seconds_per = match unit {
        "ms" => None,
        "" | "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        _ => return Err(format!("{}: unknown unit {} (use ms, s, m or h)", quote(s), quote(unit))),
    };
    // All digits: only overflow makes the parse fail.
    let n: u64 = num.parse().map_err(|_| too_long())?;
    let d = match seconds_per {
        None => Duration::from_millis(n),
        Some(per) => n.checked_mul(per).map(Duration::from_secs).ok_or_else(too_long)?,
    };
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// Parses a size in bytes: `65536`, `64K`, `1M` (binary units), at most [`MAX_SIZE`].
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() || !unit.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(format!("{} is not a size (e.g. 65536, 256K, 1M)", quote(s)));
    }
    let too_large = || format!("{} is too large (at most {}M)", quote(s), MAX_SIZE >> 20);
    let mult = match unit {
        "" => 1,
        "k" | "K" | "KiB" => 1 << 10,
        "m" | "M" | "MiB" => 1 << 20,
        _ => return Err(format!("{}: unknown unit {} (use K or M)", quote(s), quote(unit))),
    };
    let n: usize = num.parse().map_err(|_| too_large())?;
    n.checked_mul(mult).filter(|&b| b <= MAX_SIZE).ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_dns(host: &str) -> Result<IpAddr, String> {
        match host {
            "backend.test" => Ok("127.0.0.9".parse().unwrap()),
            _ => Err(format!("cannot resolve target host {host:?}")),
        }
    }

    fn one(s: &str) -> Forward {
        let mut v = parse_forward(s, &no_dns).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    fn err(s: &str) -> String {
        match parse_forward(s, &no_dns) {
            Err(StartError::Usage(m)) => m,
            other => panic!("{s}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn plain_forwards() {
        let f = one("[::]:8080=127.0.0.1:80");
        assert_eq!(f.proto, Proto::Tcp);
        assert_eq!(f.listen, "[::]:8080".parse().unwrap());
        assert_eq!(f.target, "127.0.0.1:80".parse().unwrap());
        assert_eq!(one("udp:0.0.0.0:53=[::1]:5353").proto, Proto::Udp);
        let f = one("both:127.0.0.1:5201=backend.test:5201,send-proxy=v2,accept-proxy");
        assert_eq!(f.proto, Proto::Both);
        assert_eq!(f.target, "127.0.0.9:5201".parse().unwrap());
        assert_eq!(f.send_proxy, Some(Version::V2));
        assert!(f.accept_proxy);
        assert_eq!(f.transparent, None);
        assert_eq!(one("127.0.0.1:1=10.0.0.2:1,transparent").transparent, Some(Transparent::Address));
        let f = one("udp:[::]:1=[fd00::2]:1,send-proxy=v2,transparent=port");
        assert_eq!(f.transparent, Some(Transparent::AddressAndPort));
        assert!(err("127.0.0.1:1=127.0.0.1:2,transparent=yes").contains("transparent=port"));
        let f = one("127.0.0.1:1=127.0.0.1:2,allow=10.0.0.0/8+::1,deny=10.0.0.1");
        assert_eq!(f.access.allow.as_ref().map(Vec::len), Some(2));
        assert_eq!(f.access.deny, Some(vec![crate::cidr::Cidr::parse("10.0.0.1").unwrap()]));
        assert!(one("127.0.0.1:1=127.0.0.1:2").access.is_open());
        assert!(err("127.0.0.1:1=127.0.0.1:2,deny=10.0.0.0/40").contains("deny: "));
        assert!(err("127.0.0.1:1=127.0.0.1:2,allow=").contains("allow: expected at least one"));
    }

    #[test]
    fn ranges_expand_port_by_port() {
        let v = parse_forward("127.0.0.1:9000-9009=127.0.0.1:7000-7009", &no_dns).unwrap();
        assert_eq!(v.len(), 10);
        assert_eq!(v[9].listen.port(), 9009);
        assert_eq!(v[9].target.port(), 7009);
    }

    #[test]
    fn bad_forwards_say_what_is_wrong() {
        assert!(err("127.0.0.1:0=127.0.0.1:80").contains("0 is out of range"));
        assert!(err("127.0.0.1:65536=127.0.0.1:80").contains("65536 is out of range"));
        assert!(err("127.0.0.1:1-3=127.0.0.1:1-2").contains("differ in width"));
        assert!(err("127.0.0.1:80").contains("LISTEN=TARGET"));
        assert!(err("sctp:127.0.0.1:80=127.0.0.1:80").contains("unknown protocol"));
        assert!(err("::1:80=127.0.0.1:80").contains("brackets"));
        assert!(err("localhost:80=127.0.0.1:80").contains("not an IPv4"));
        assert!(err("127.0.0.1:80=127.0.0.1:80,bogus").contains("unknown option"));
        assert!(err("127.0.0.1:9-1=127.0.0.1:9-1").contains("backwards"));
        assert!(err("[::1:80=127.0.0.1:80").contains("']'"));
        let e = parse_forward("127.0.0.1:80=nowhere.invalid:80", &no_dns).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("nowhere.invalid"));
    }

    #[test]
    fn config_files_skip_comments_and_name_lines() {
        let text = "# forwards\n\n127.0.0.1:1=127.0.0.1:2  # inline\nudp:[::1]:3=[::1]:4\n";
        let v = parse_config("relay.conf", text.as_bytes(), &no_dns).unwrap();
        assert_eq!(v.len(), 2);
        let e = parse_config("relay.conf", b"127.0.0.1:1=127.0.0.1:2\nbad line\n", &no_dns).unwrap_err();
        assert!(e.to_string().starts_with("relay.conf:2: "), "{e}");
        let crlf = parse_config("relay.conf", b"127.0.0.1:1=127.0.0.1:2\r\n\r\n", &no_dns).unwrap();
        assert_eq!(crlf.len(), 1);
        let e = parse_config("relay.conf", b"# ok\n127.0.0.1:1=127.0.0.1:2 # caf\xe9\n", &no_dns).unwrap_err();
        assert_eq!(e, StartError::Usage("relay.conf:2: not UTF-8 text".into()));
    }

    #[test]
    fn errors_quote_at_most_60_characters() {
        assert_eq!(quote("short"), r#""short""#);
        let long = "é".repeat(100);
        assert_eq!(quote(&long), format!("{:?}...", "é".repeat(60)));
        assert_eq!(quote_single(&long), format!("'{}'...", "é".repeat(60)));
        let line = "x".repeat(10 << 20);
        assert_eq!(
            err(&line),
            format!("invalid forward \"{}\"...: expected LISTEN=TARGET, e.g. [::]:8080=127.0.0.1:80", "x".repeat(60))
        );
        let long_port = format!("127.0.0.1:{}=127.0.0.1:80", "9".repeat(100));
        assert!(
            err(&long_port).ends_with(&format!("listen port: \"{}\"... is out of range (1-65535)", "9".repeat(60)))
        );
        assert!(err("127.0.0.1:99999=127.0.0.1:80").ends_with("listen port: 99999 is out of range (1-65535)"));
        let errors = [
            parse_duration(&long).unwrap_err(),
            parse_duration(&format!("1{long}")).unwrap_err(),
            parse_size(&long).unwrap_err(),
            parse_size(&"9".repeat(100)).unwrap_err(),
        ];
        for e in errors {
            assert!(e.chars().count() < 200, "{e}");
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_size("256K"), Ok(262144));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations_and_sizes_have_a_ceiling() {
        let ten_years = Duration::from_secs(3650 * 86_400);
        assert_eq!(parse_duration("87600h"), Ok(ten_years));
        assert_eq!(parse_duration("315360000000ms"), Ok(ten_years));
        let too_long = |s: &str| Err(format!("{s:?} is too long (at most 3650 days)"));
        for s in ["87601h", "315360001", "3000000000000000h", "99999999999999999999h", "18446744073709551615m"] {
            assert_eq!(parse_duration(s), too_long(s));
        }
        assert_eq!(parse_duration("1.5s"), Err(r#""1.5s" is not a duration (e.g. 500ms, 10s, 5m, 1h)"#.into()));
        assert_eq!(parse_size("1024M"), Ok(1 << 30));
        let too_large = |s: &str| Err(format!("{s:?} is too large (at most 1024M)"));
        for s in ["1025M", "1073741825", "18446744073709551616", "18014398509481984K"] {
            assert_eq!(parse_size(s), too_large(s));
        }
    }

    #[test]
    fn parsers_never_panic_on_noise() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let alphabet = b"0123456789:[]=-,.abtcpudv ";
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let s: String =
                (0..len).map(|i| alphabet[((x >> (i % 50)) as usize + i * 7) % alphabet.len()] as char).collect();
            let _ = parse_forward(&s, &no_dns);
            let _ = parse_duration(&s);
            let _ = parse_size(&s);
        }
    }
}
