//! Access lists: `,allow=` / `,deny=` per forward and `--allow` / `--deny`
//! for all, over loopback with 127.0.0.2 and ::1 as sources other than
//! 127.0.0.1, TCP and UDP, and through a PROXY v1 header.
mod common;
use common::*;
use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, SockaddrStorage};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

/// A TCP echo backend that counts the connections it accepted.
fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    if c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A TCP connection to `to` from address `from` (bound before connecting).
fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let from: IpAddr = from.parse().unwrap();
    let family = if from.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = sock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(from, 0)))?;
    sock::connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(PATIENCE))?;
    Ok(s)
}

/// True if a client from `from` gets its bytes echoed through `to`.
fn echoed(from: &str, to: SocketAddr) -> bool {
    connect_from(from, to).is_ok_and(|mut c| echo_round(&mut c, b"hello").is_ok())
}

/// True if a client from `from` is closed (reset or EOF) without a byte back.
fn closed(from: &str, to: SocketAddr) -> bool {
    match connect_from(from, to) {
        Err(_) => true,
        Ok(mut c) => {
            let _ = c.write_all(b"hello");
            read_end(&mut c, PATIENCE).closed()
        }
    }
}

/// Asks for the statistics and waits for a `stats tcp LISTEN` line holding `want`.
fn expect_stats(r: &Relay, proto: &str, listen: &str, want: &str) {
    r.signal(SIGUSR1);
    let found = wait_until(PATIENCE, || {
        r.log().lines().any(|l| l.contains(&format!("stats {proto} {listen} ")) && l.contains(want))
    });
    assert!(found, "no stats {proto} {listen} line with {want:?}:\n{}", tail(&r.log(), 30));
}

fn addr(s: String) -> SocketAddr {
    s.parse().unwrap()
}

/// `,deny=` refuses 127.0.0.2 with a reset and no backend connect; 127.0.0.1 relays.
#[test]
fn tcp_deny_per_forward_resets_without_a_backend_connect() {
    let (backend, accepted) = counting_echo();
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend},deny=127.0.0.2/32", p.pick())]));
    let to = addr(format!("127.0.0.1:{}", r.port()));
    assert!(closed("127.0.0.2", to), "127.0.0.2 was not refused:\n{}", r.log());
    assert!(closed("127.0.0.2", to));
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "a denied client cost a backend connect");
    assert!(echoed("127.0.0.1", to), "127.0.0.1 not relayed:\n{}", r.log());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    expect_stats(&r, "tcp", &to.to_string(), "total 3 refused 2 denied 2 ");
    r.expect_log("127.0.0.2");
}

/// `,allow=` admits only its sources: ::1 on a dual-stack listener, not 127.0.0.1.
#[test]
fn tcp_allow_per_forward_takes_ipv6_loopback_only() {
    let (backend, accepted) = counting_echo();
    let r = Relay::start(|p| argv([&format!("[::]:{}={backend},allow=::1+10.0.0.0/8", p.pick())]));
    let port = r.port();
    assert!(echoed("::1", addr(format!("[::1]:{port}"))), "::1 not relayed:\n{}", r.log());
    assert!(closed("127.0.0.1", addr(format!("127.0.0.1:{port}"))), "127.0.0.1 was not refused:\n{}", r.log());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    expect_stats(&r, "tcp", &format!("[::]:{port}"), "total 2 refused 1 denied 1 ");
}

/// `--allow` applies to every forward; a forward's own `,allow=` replaces
/// it, and `--deny` wins over an allow list that holds the source.
#[test]
fn tcp_global_lists_and_a_forward_that_replaces_them() {
    let (backend, _) = counting_echo();
    let r = Relay::start(|p| {
        argv([
            "--allow",
            "127.0.0.0/8,::1",
            "--deny",
            "127.0.0.3",
            &format!("127.0.0.1:{}={backend}", p.pick()),
            &format!("127.0.0.1:{}={backend},allow=127.0.0.2", p.pick()),
            &format!("[::1]:{}={backend}", p.pick()),
        ])
    });
    let (a, b, c) = (r.ports[0], r.ports[1], r.ports[2]);
    let to = |p: u16| addr(format!("127.0.0.1:{p}"));
    // The global lists: 127.0.0.0/8 allowed, 127.0.0.3 denied.
    assert!(echoed("127.0.0.2", to(a)), "{}", r.log());
    assert!(echoed("127.0.0.1", to(a)), "{}", r.log());
    assert!(closed("127.0.0.3", to(a)), "{}", r.log());
    assert!(echoed("::1", addr(format!("[::1]:{c}"))), "{}", r.log());
    // The forward's own allow list: 127.0.0.2 only (--deny still applies).
    assert!(echoed("127.0.0.2", to(b)), "{}", r.log());
    assert!(closed("127.0.0.1", to(b)), "{}", r.log());
    assert!(closed("127.0.0.3", to(b)), "{}", r.log());
    expect_stats(&r, "tcp", &format!("127.0.0.1:{a}"), "total 3 refused 1 denied 1 ");
    expect_stats(&r, "tcp", &format!("127.0.0.1:{b}"), "total 3 refused 2 denied 2 ");
}

/// On an accept-proxy forward the lists apply to the address in the PROXY
/// header, not to the proxy that sent it; a denied one costs no backend connect.
#[test]
fn tcp_accept_proxy_checks_the_address_in_the_header() {
    let (backend, accepted) = counting_echo();
    let r = Relay::start(|p| {
        argv([
            "--trusted-proxies",
            "127.0.0.1/32",
            &format!("127.0.0.1:{}={backend},accept-proxy,allow=192.0.2.0/24", p.pick()),
        ])
    });
    let port = r.port();
    let to = addr(format!("127.0.0.1:{port}"));
    let mut c = connect_from("127.0.0.1", to).unwrap();
    c.write_all(format!("PROXY TCP4 192.0.2.7 127.0.0.1 4000 {port}\r\n").as_bytes()).unwrap();
    echo_round(&mut c, b"allowed").unwrap_or_else(|e| panic!("allowed header not relayed: {e}\n{}", r.log()));
    drop(c);
    let mut c = connect_from("127.0.0.1", to).unwrap();
    c.write_all(format!("PROXY TCP4 198.51.100.1 127.0.0.1 4000 {port}\r\nhello").as_bytes()).unwrap();
    assert!(read_end(&mut c, PATIENCE).closed(), "denied header not refused:\n{}", r.log());
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "a denied header cost a backend connect");
    expect_stats(&r, "tcp", &to.to_string(), "total 2 refused 1 denied 1 ");
    r.expect_log("198.51.100.1:4000: denied by the access list");
}

/// A denied UDP datagram is dropped and counted as `denied`; another
/// source's datagrams still flow, and the backend never sees the denied ones.
#[test]
fn udp_deny_drops_and_counts() {
    let echo = UdpEcho::bind("127.0.0.1:0");
    let backend = echo.addr;
    let r = Relay::start(|p| argv(["--deny", "127.0.0.2", &format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let to = addr(format!("127.0.0.1:{}", r.port()));
    let denied = udp_client("127.0.0.2:0", Duration::from_millis(100));
    for _ in 0..3 {
        denied.send_to(&[7u8; 33], to).unwrap();
    }
    // Sent after the denied ones, on loopback: once it is echoed, they were read.
    let ok = udp_client("127.0.0.1:0", PATIENCE);
    assert!(round_trip(&ok, to, b"allowed").is_some(), "127.0.0.1 not relayed:\n{}", r.log());
    expect_stats(&r, "udp", &to.to_string(), "dropped_denied_up 3 ");
    assert!(!echo.sizes.lock().unwrap().contains(&33), "a denied datagram reached the backend");
    assert!(recv_any(&denied, Duration::from_millis(100)).is_none());
}

/// A UDP allow list of ::1 on a dual-stack listener: ::1 flows, 127.0.0.1 is dropped.
#[test]
fn udp_allow_takes_ipv6_loopback_only() {
    let echo = UdpEcho::bind("127.0.0.1:0");
    let backend = echo.addr;
    let r = Relay::start(|p| argv([&format!("udp:[::]:{}={backend},allow=::1", p.pick())]));
    let port = r.port();
    let v4 = udp_client("127.0.0.1:0", Duration::from_millis(100));
    v4.send_to(&[4u8; 44], ("127.0.0.1", port)).unwrap();
    v4.send_to(&[4u8; 44], ("127.0.0.1", port)).unwrap();
    let v6 = udp_client("[::1]:0", PATIENCE);
    assert!(round_trip(&v6, addr(format!("[::1]:{port}")), b"from ::1").is_some(), "::1 not relayed:\n{}", r.log());
    expect_stats(&r, "udp", &format!("[::]:{port}"), "dropped_denied_up 2 ");
    assert!(!echo.sizes.lock().unwrap().contains(&44), "a denied datagram reached the backend");
}

/// Bad lists are one clear line and exit 2.
#[test]
fn bad_lists_are_usage_errors() {
    let (code, err) = run_to_exit(&["--allow", "10.0.0.0/33", "127.0.0.1:1=127.0.0.1:2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--allow") && err.contains("prefix length"), "{err}");
    let (code, err) = run_to_exit(&["127.0.0.1:1=127.0.0.1:2,deny=nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("deny") && err.contains("\"nope\""), "{err}");
    let (code, err) = run_to_exit(&["127.0.0.1:1=127.0.0.1:2,allow="]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("allow: expected at least one"), "{err}");
}
