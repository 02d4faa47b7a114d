//! `Type=notify`: READY=1 once every listener is bound, RELOADING=1 and
//! READY=1 around a reload (SIGHUP), STOPPING=1 when
//! SIGTERM starts the exit or the drain, as datagrams to NOTIFY_SOCKET
//! (a path, or an abstract name written `@name`).
mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The next datagram on `sock` as text, waiting at most [`PATIENCE`].
fn next_state(sock: &UnixDatagram) -> Option<String> {
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A notify socket at a temporary path, removed on drop.
struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(name: &str) -> NotifySocket {
        let path = std::env::temp_dir().join(format!("splice-relay-notify-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        NotifySocket { sock, path }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// READY=1 comes first, and once it has, the relay accepts and relays;
/// SIGTERM then sends STOPPING=1 and the relay exits 0.
#[test]
fn ready_after_binding_and_stopping_on_sigterm() {
    let n = NotifySocket::bind("path");
    let backend = echo_server("127.0.0.1:0");
    let mut r = Relay::cmd()
        .env("NOTIFY_SOCKET", n.path.to_str().unwrap())
        .start(|p| argv(["--threads", "2", &format!("127.0.0.1:{}={backend}", p.pick())]));
    assert_eq!(next_state(&n.sock).as_deref(), Some("READY=1"), "{}", r.log());
    echo_once(&format!("127.0.0.1:{}", r.port()), 1, 1000);
    r.signal(SIGTERM);
    assert_eq!(next_state(&n.sock).as_deref(), Some("STOPPING=1"), "{}", r.log());
    let status = r.wait_exit(PATIENCE).expect("relay exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", r.log());
    n.sock.set_nonblocking(true).unwrap();
    assert!(n.sock.recv(&mut [0u8; 64]).is_err(), "a datagram after STOPPING=1");
}

/// An abstract NOTIFY_SOCKET (`@name`); with a drain, STOPPING=1 comes when
/// the drain starts, once, whatever signal follows.
#[test]
fn abstract_socket_and_stopping_once_at_the_drain() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("splice-relay-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let backend = echo_server("127.0.0.1:0");
    let mut r = Relay::cmd()
        .env("NOTIFY_SOCKET", &format!("@{name}"))
        .start(|p| argv(["--drain-timeout", "60s", &format!("127.0.0.1:{}={backend}", p.pick())]));
    assert_eq!(next_state(&sock).as_deref(), Some("READY=1"), "{}", r.log());
    // An open connection holds the drain until the second signal.
    let mut c = connect(&format!("127.0.0.1:{}", r.port()));
    echo_round(&mut c, b"hello").unwrap();
    r.signal(SIGTERM);
    assert_eq!(next_state(&sock).as_deref(), Some("STOPPING=1"), "{}", r.log());
    r.expect_log("draining 1 connections");
    r.signal(SIGTERM);
    let status = r.wait_exit(PATIENCE).expect("relay exits after a second SIGTERM");
    assert!(status.success(), "{status:?}\n{}", r.log());
    sock.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    assert!(sock.recv(&mut [0u8; 64]).is_err(), "a second STOPPING=1 or another datagram");
}

/// A NOTIFY_SOCKET nobody listens on is a warning, not a failure.
#[test]
fn a_dead_notify_socket_is_only_a_warning() {
    let path = std::env::temp_dir().join(format!("splice-relay-notify-{}-nobody", std::process::id()));
    let backend = echo_server("127.0.0.1:0");
    let mut r = Relay::cmd()
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    r.expect_log("cannot tell the service manager READY=1");
    echo_once(&format!("127.0.0.1:{}", r.port()), 2, 1000);
    r.assert_alive();
}

/// SIGHUP: RELOADING=1 with MONOTONIC_USEC (as `Type=notify-reload` wants),
/// then READY=1 once the reload is applied, or refused: the same pair for
/// a config with an error. Then STOPPING=1 on SIGTERM.
#[test]
fn reloading_then_ready_around_each_reload() {
    let n = NotifySocket::bind("reload");
    let backend = echo_server("127.0.0.1:0");
    let conf = std::env::temp_dir().join(format!("splice-relay-notify-{}-reload.conf", std::process::id()));
    let mut r = Relay::cmd().env("NOTIFY_SOCKET", n.path.to_str().unwrap()).start(|p| {
        std::fs::write(&conf, format!("127.0.0.1:{}={backend}\n", p.pick())).unwrap();
        argv(["--threads", "2", "-c", conf.to_str().unwrap()])
    });
    assert_eq!(next_state(&n.sock).as_deref(), Some("READY=1"), "{}", r.log());
    let reloading = |n: &NotifySocket, r: &Relay| {
        let state = next_state(&n.sock).unwrap_or_default();
        let usec = state.strip_prefix("RELOADING=1\nMONOTONIC_USEC=").and_then(|u| u.parse::<u64>().ok());
        assert!(usec.is_some_and(|u| u > 0), "{state:?}\n{}", r.log());
    };
    let added = free_port();
    std::fs::write(&conf, format!("127.0.0.1:{}={backend}\n127.0.0.1:{added}={backend}\n", r.port())).unwrap();
    r.signal(1);
    reloading(&n, &r);
    assert_eq!(next_state(&n.sock).as_deref(), Some("READY=1"), "{}", r.log());
    echo_once(&format!("127.0.0.1:{added}"), 3, 1000);
    std::fs::write(&conf, "not a forward\n").unwrap();
    r.signal(1);
    reloading(&n, &r);
    assert_eq!(next_state(&n.sock).as_deref(), Some("READY=1"), "{}", r.log());
    r.expect_log("reload failed");
    r.signal(SIGTERM);
    assert_eq!(next_state(&n.sock).as_deref(), Some("STOPPING=1"), "{}", r.log());
    assert!(r.wait_exit(PATIENCE).expect("exits after SIGTERM").success());
    let _ = std::fs::remove_file(&conf);
}
