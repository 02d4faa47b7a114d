//! Docker mode: docker-proxy's Go-style flags, the fd 3 start-up handshake,
//! and the fd 4 listener of `-use-listen-fd`.

use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::config::{Forward, Proto, StartError, quote};
use crate::proxy_protocol::Version;

/// docker-proxy's flags, as dockerd passes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerArgs {
    /// `tcp`, `udp` or `sctp`.
    pub proto: String,
    /// `-host-ip`.
    pub host_ip: Option<IpAddr>,
    /// `-host-port` (-1 when absent).
    pub host_port: i64,
    /// `-container-ip`.
    pub container_ip: Option<IpAddr>,
    /// `-container-port` (-1 when absent).
    pub container_port: i64,
    /// `-use-listen-fd`: the socket is fd 4.
    pub use_listen_fd: bool,
    /// `-v` / `-version`.
    pub version: bool,
}

impl Default for DockerArgs {
    fn default() -> Self {
        DockerArgs {
            proto: "tcp".into(),
            host_ip: None,
            host_port: -1,
            container_ip: None,
            container_port: -1,
            use_listen_fd: false,
            version: false,
        }
    }
}

const FLAGS: [&str; 6] = ["proto", "host-ip", "host-port", "container-ip", "container-port", "use-listen-fd"];

/// The usage text docker-proxy prints for a bad flag.
pub const USAGE: &str = "Usage of splice-relay (docker-proxy mode):
  -container-ip value
    \tcontainer ip
  -container-port int
    \tcontainer port (default -1)
  -host-ip value
    \thost ip
  -host-port int
    \thost port (default -1)
  -proto string
    \tproxy protocol (default \"tcp\")
  -use-listen-fd
    \tuse a listening socket inherited from the parent process (fd 4)
  -v\tshow version
  -version
    \tshow version";

/// True when the arguments are docker-proxy's rather than the native ones.
pub fn is_docker_args(args: &[String]) -> bool {
    args.iter().any(|a| {
        let name = a.trim_start_matches('-');
        let name = name.split_once('=').map_or(name, |(n, _)| n);
        a.starts_with('-') && FLAGS.contains(&name)
    }) || matches!(args, [a] if a == "-v" || a == "-version")
}

/// Parses Go `flag` syntax: `-name value`, `--name value`, `-name=value`;
/// booleans bare or `=true|false`. Stops at `--` or the first non-flag.
pub fn parse(args: &[String]) -> Result<DockerArgs, String> {
    let mut out = DockerArgs::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" || !arg.starts_with('-') || arg == "-" {
            break;
        }
        let body = arg.strip_prefix("--").unwrap_or(&arg[1..]);
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let is_bool = matches!(name, "use-listen-fd" | "v" | "version");
        // Like Go's flag package: an unknown name is the error, whatever follows it.
        if !is_bool && !FLAGS.contains(&name) {
            return Err(not_defined(name));
        }
        let value = if is_bool {
            match inline {
                None => true,
                Some(v) => parse_go_bool(v).ok_or_else(|| format!("invalid boolean value {} for -{name}", quote(v)))?,
            }
        } else {
            false
        };
        let text = match (is_bool, inline) {
            (true, _) => String::new(),
            (false, Some(v)) => v.to_string(),
            (false, None) => it.next().cloned().ok_or(format!("flag needs an argument: -{name}"))?,
        };
        let ip = |t: &str| {
            t.parse::<IpAddr>().map_err(|_| format!("invalid value {} for flag -{name}: invalid IP", quote(t)))
        };
        let int =
            |t: &str| t.parse::<i64>().map_err(|_| format!("invalid value {} for flag -{name}: parse error", quote(t)));
        match name {
            "proto" => out.proto = text,
            "host-ip" => out.host_ip = Some(ip(&text)?),
            "host-port" => out.host_port = int(&text)?,
            "container-ip" => out.container_ip = Some(ip(&text)?),
            "container-port" => out.container_port = int(&text)?,
            "use-listen-fd" => out.use_listen_fd = value,
            "v" | "version" => out.version = value,
            _ => return Err(not_defined(name)),
        }
    }
    Ok(out)
}

/// Go's error for an unknown flag (the name cut to 60 characters).
fn not_defined(name: &str) -> String {
    let (head, cut) = crate::config::clip(name, 60);
    format!("flag provided but not defined: -{head}{}", if cut { "..." } else { "" })
}

fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// The forward these flags describe. `send_proxy_ports`: container ports
/// that get a PROXY header (None: all of them, when one is configured).
pub fn forward(
    a: &DockerArgs,
    send_proxy: Option<Version>,
    send_proxy_ports: Option<&[u16]>,
) -> Result<Forward, StartError> {
    let proto = match a.proto.as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "sctp" => {
            return Err(StartError::Runtime("proto sctp is not supported (no SCTP in this relay or kernel)".into()));
        }
        p => return Err(StartError::Runtime(format!("unsupported protocol {}", quote(p)))),
    };
    let port = |p: i64, what: &str| {
        u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| StartError::Runtime(format!("invalid {what} port {p}")))
    };
    let host_ip = a.host_ip.ok_or_else(|| StartError::Runtime("-host-ip is required".into()))?;
    let container_ip = a.container_ip.ok_or_else(|| StartError::Runtime("-container-ip is required".into()))?;
    let host_port = port(a.host_port, "host")?;
    let container_port = port(a.container_port, "container")?;
    let send_proxy = send_proxy.filter(|_| send_proxy_ports.is_none_or(|ports| ports.contains(&container_port)));
    Ok(Forward {
        proto,
        listen: SocketAddr::new(host_ip, host_port),
        target: SocketAddr::new(container_ip, container_port),
        send_proxy,
        accept_proxy: false,
        transparent: None,
        access: Default::default(),
        spec: format!("{}:{host_ip}:{host_port}={container_ip}:{container_port}", a.proto),
    })
}

/// Checks that `fd` (fd 4 of `-use-listen-fd`) suits `forward`: a listening
/// TCP socket for tcp, a UDP socket for udp, of -host-ip's address family.
/// Adopting a wrong one would report ready and then fail on every client.
/// Takes docker's bound socket (fd 4, `-use-listen-fd`), checks that it fits
/// `forward`, and makes it non-blocking and close-on-exec.
pub fn listen_fd(forward: &Forward) -> Result<OwnedFd, StartError> {
    let fd = crate::sys::inherited_fd(4)
        .ok_or_else(|| StartError::Runtime("-use-listen-fd given but fd 4 is not open".into()))?;
    check_listen_fd(fd.as_fd(), forward)?;
    crate::sys::set_nonblocking_cloexec(fd.as_fd()).map_err(|e| StartError::Runtime(format!("fd 4: {e}")))?;
    Ok(fd)
}

fn check_listen_fd(fd: BorrowedFd<'_>, forward: &Forward) -> Result<(), StartError> {
    use nix::sys::socket::SockType;
    let wrong = |what: String| Err(StartError::Runtime(format!("-use-listen-fd: fd 4 {what}")));
    let (ty, listening) = match crate::sys::socket_kind(fd) {
        Ok(kind) => kind,
        Err(e) => return wrong(format!("is not a usable socket: {e}")),
    };
    match (ty, forward.proto) {
        (SockType::Stream, Proto::Tcp) if !listening => return wrong("is a TCP socket that is not listening".into()),
        (SockType::Stream, Proto::Tcp) | (SockType::Datagram, Proto::Udp) => {}
        (SockType::Stream, p) => return wrong(format!("is a TCP socket, but -proto is {p}")),
        (SockType::Datagram, p) => return wrong(format!("is a UDP socket, but -proto is {p}")),
        (other, _) => return wrong(format!("is a {other:?} socket, not TCP or UDP")),
    }
    let family = |a: SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
    match crate::sys::local_addr(fd) {
        Ok(local) if local.is_ipv4() == forward.listen.is_ipv4() => Ok(()),
        Ok(local) => wrong(format!("is an {} socket, but -host-ip is {}", family(local), forward.listen.ip())),
        Err(e) => wrong(format!("is not an IP socket: {e}")),
    }
}

/// The write end of dockerd's status pipe (fd 3).
pub struct Status(Option<OwnedFd>);

impl Status {
    /// Takes fd 3 if the parent passed it, making it close-on-exec.
    pub fn inherit() -> Status {
        let fd = crate::sys::inherited_fd(3);
        if let Some(fd) = &fd {
            let _ = crate::sys::set_cloexec(fd.as_fd());
        }
        Status(fd)
    }

    /// Reports readiness: `0\n` in one write, then closes the pipe.
    pub fn ready(&mut self) {
        self.send(b"0\n");
    }

    /// Reports a start-up failure: `1\n<error>`, then closes the pipe.
    pub fn failed(&mut self, err: &str) {
        let mut msg = b"1\n".to_vec();
        msg.extend_from_slice(err.as_bytes());
        self.send(&msg);
    }

    fn send(&mut self, msg: &[u8]) {
        if let Some(fd) = self.0.take() {
            let mut f = std::fs::File::from(fd);
            let _ = f.write_all(msg);
        }
    }
}

/// Native options that apply in docker mode, from `SPLICE_RELAY_OPTS`.
pub fn native_options(env: Option<OsString>) -> Result<crate::cli::Args, StartError> {
    use clap::Parser;
    let text = env.map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if text.trim().is_empty() {
        return Ok(crate::cli::Args::defaults());
    }
    let words = std::iter::once("splice-relay".to_string()).chain(text.split_whitespace().map(String::from));
    let args = crate::cli::Args::try_parse_from(words)
        .map_err(|e| StartError::Runtime(format!("SPLICE_RELAY_OPTS: {}", crate::cli::clap_error_line(&e))))?;
    if !args.forwards.is_empty() || !args.config.is_empty() {
        return Err(StartError::Runtime("SPLICE_RELAY_OPTS takes options only, not forwards".into()));
    }
    Ok(args)
}

/// Parses `SPLICE_RELAY_PROXY_PORTS` ("80,443"): container ports that get a PROXY header.
pub fn proxy_ports(env: Option<OsString>) -> Result<Option<Vec<u16>>, StartError> {
    let Some(text) = env else { return Ok(None) };
    let text = text.to_string_lossy();
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| StartError::Runtime(format!("SPLICE_RELAY_PROXY_PORTS: bad port {}", quote(p))))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn dockerd_argv_is_recognised_and_parsed() {
        let a = args("-proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip 198.18.0.2 -container-port 80");
        assert!(is_docker_args(&a));
        let d = parse(&a).unwrap();
        assert_eq!(d.proto, "tcp");
        assert_eq!(d.host_port, 8080);
        assert_eq!(d.container_ip, Some("198.18.0.2".parse().unwrap()));
        assert!(!d.use_listen_fd);
        let f = forward(&d, None, None).unwrap();
        assert_eq!(f.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(f.target, "198.18.0.2:80".parse().unwrap());
    }

    #[test]
    fn go_flag_spellings() {
        let d = parse(&args(
            "--proto=udp -host-ip=:: --host-port 53 -container-ip ::1 -container-port=5353 -use-listen-fd",
        ))
        .unwrap();
        assert_eq!(d.proto, "udp");
        assert_eq!(d.host_ip, Some("::".parse().unwrap()));
        assert!(d.use_listen_fd);
        assert!(!parse(&args("-use-listen-fd=false")).unwrap().use_listen_fd);
        assert!(parse(&args("-use-listen-fd=maybe")).is_err());
        assert!(parse(&args("-version")).unwrap().version);
        assert!(is_docker_args(&args("-v")));
        assert!(!is_docker_args(&args("-v [::]:80=127.0.0.1:80")));
    }

    #[test]
    fn bad_flags_are_errors() {
        assert_eq!(parse(&args("-bogus 1")).unwrap_err(), "flag provided but not defined: -bogus");
        assert_eq!(parse(&args("-host-ip 0.0.0.0 -bogus")).unwrap_err(), "flag provided but not defined: -bogus");
        assert_eq!(parse(&args("--bogus=1")).unwrap_err(), "flag provided but not defined: -bogus");
        let long = format!("-{}", "b".repeat(100));
        assert_eq!(parse(&[long]).unwrap_err(), format!("flag provided but not defined: -{}...", "b".repeat(60)));
        assert!(parse(&args("-host-port")).unwrap_err().contains("needs an argument"));
        assert!(parse(&args("-host-port x")).unwrap_err().contains("invalid value"));
        assert!(parse(&args("-host-ip 1.2.3")).unwrap_err().contains("invalid IP"));
        let d =
            parse(&args("-proto sctp -host-ip 0.0.0.0 -host-port 1 -container-ip 1.1.1.1 -container-port 1")).unwrap();
        assert!(forward(&d, None, None).unwrap_err().to_string().contains("sctp"));
        let d = parse(&args("-host-ip 0.0.0.0 -container-ip 1.1.1.1 -container-port 1")).unwrap();
        assert!(forward(&d, None, None).unwrap_err().to_string().contains("host port -1"));
    }

    #[test]
    fn proxy_header_only_for_chosen_ports() {
        let d = parse(&args("-host-ip 0.0.0.0 -host-port 8080 -container-ip 1.1.1.1 -container-port 80")).unwrap();
        assert_eq!(forward(&d, Some(Version::V2), None).unwrap().send_proxy, Some(Version::V2));
        assert_eq!(forward(&d, Some(Version::V2), Some(&[443])).unwrap().send_proxy, None);
        assert_eq!(forward(&d, Some(Version::V1), Some(&[80])).unwrap().send_proxy, Some(Version::V1));
        assert_eq!(proxy_ports(Some("80, 443".into())).unwrap(), Some(vec![80, 443]));
        assert!(proxy_ports(Some("http".into())).is_err());
    }

    #[test]
    fn flag_parser_never_panics_on_noise() {
        let words =
            ["-proto", "--host-ip", "-host-port=", "-container-ip", "-use-listen-fd=", "-v", "--", "::", "1", "x", "-"];
        let mut x: u64 = 0x2545f4914f6cdd1d;
        for _ in 0..50_000 {
            let mut argv = Vec::new();
            for _ in 0..(x % 7) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let w = words[(x % words.len() as u64) as usize];
                argv.push(if x & 8 == 0 { w.to_string() } else { format!("{w}{}", x % 70000) });
            }
            x = x.wrapping_add(0x9e3779b97f4a7c15);
            let _ = is_docker_args(&argv);
            if let Ok(d) = parse(&argv) {
                let _ = forward(&d, Some(Version::V2), Some(&[80]));
            }
        }
    }
}
