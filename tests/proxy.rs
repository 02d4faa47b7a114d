//! PROXY protocol end to end: headers sent to the backend, headers accepted
//! from trusted clients, and a real HAProxy receiver when installed.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// A backend that reads everything a connection sends until EOF and hands it over.
fn capture_backend() -> (std::net::SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut all = Vec::new();
                let _ = c.read_to_end(&mut all);
                let _ = tx.send(all);
            });
        }
    });
    (addr, rx)
}

fn send_and_capture(relay_addr: &str, payload: &[u8], rx: &mpsc::Receiver<Vec<u8>>) -> (Vec<u8>, u16) {
    let mut c = connect(relay_addr);
    let port = c.local_addr().unwrap().port();
    c.write_all(payload).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    (rx.recv_timeout(PATIENCE).expect("backend got the connection"), port)
}

#[test]
fn send_proxy_v1_carries_the_ipv6_client_to_an_ipv4_backend() {
    let (backend, rx) = capture_backend();
    let relay = Relay::start(|p| argv([&format!("[::]:{}={backend},send-proxy=v1", p.pick())]));
    let port = relay.port();
    let (got, cport) = send_and_capture(&format!("[::1]:{port}"), b"hello", &rx);
    let want = format!("PROXY TCP6 ::1 ::1 {cport} {port}\r\nhello");
    assert_eq!(String::from_utf8_lossy(&got), want, "{}", relay.log());
    // An IPv4 client of the dual-stack listener is unmapped: TCP4.
    let (got, cport) = send_and_capture(&format!("127.0.0.1:{port}"), b"x", &rx);
    assert_eq!(String::from_utf8_lossy(&got), format!("PROXY TCP4 127.0.0.1 127.0.0.1 {cport} {port}\r\nx"));
}

#[test]
fn send_proxy_v2_exact_bytes() {
    let (backend, rx) = capture_backend();
    let relay = Relay::start(|p| argv(["--send-proxy", "v2", &format!("127.0.0.1:{}={backend}", p.pick())]));
    let port = relay.port();
    let (got, cport) = send_and_capture(&format!("127.0.0.1:{port}"), b"data", &rx);
    let mut want = vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 12];
    want.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
    want.extend_from_slice(&cport.to_be_bytes());
    want.extend_from_slice(&port.to_be_bytes());
    want.extend_from_slice(b"data");
    assert_eq!(got, want);
}

#[test]
fn udp_send_proxy_v2_prefixes_every_datagram() {
    let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    backend.set_read_timeout(Some(PATIENCE)).unwrap();
    let baddr = backend.local_addr().unwrap();
    let relay = Relay::start(|p| argv([&format!("udp:127.0.0.1:{}={baddr},send-proxy=v2", p.pick())]));
    let port = relay.port();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let cport = client.local_addr().unwrap().port();
    for msg in [&b"one"[..], b"two"] {
        client.send_to(msg, ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = backend.recv_from(&mut buf).expect("datagram through the relay");
        assert_eq!(&buf[12..16], &[0x21, 0x12, 0, 12], "UDP4 v2 header");
        assert_eq!(&buf[24..26], &cport.to_be_bytes());
        assert_eq!(&buf[28..n], msg);
    }
}

fn accept_proxy_relay(extra: &[&str]) -> (Relay, u16, mpsc::Receiver<Vec<u8>>) {
    let (backend, rx) = capture_backend();
    let relay = Relay::start(|p| {
        let mut args = argv(["--proxy-header-timeout", "1s"]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(format!("127.0.0.1:{}={backend},accept-proxy,send-proxy=v1", p.pick()));
        args
    });
    let port = relay.port();
    (relay, port, rx)
}

#[test]
fn accept_proxy_honours_a_trusted_header_and_passes_it_on() {
    let (relay, port, rx) = accept_proxy_relay(&["--trusted-proxies", "127.0.0.0/8"]);
    let (got, _) =
        send_and_capture(&format!("127.0.0.1:{port}"), b"PROXY TCP4 203.0.113.7 198.51.100.1 4000 443\r\nGET /", &rx);
    assert_eq!(
        String::from_utf8_lossy(&got),
        "PROXY TCP4 203.0.113.7 198.51.100.1 4000 443\r\nGET /",
        "{}",
        relay.log()
    );
    // v2 from the client, re-sent as v1.
    let mut v2 = vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 12];
    v2.extend_from_slice(&[192, 0, 2, 9, 192, 0, 2, 1, 0x1f, 0x90, 0x00, 0x50]);
    v2.extend_from_slice(b"body");
    let (got, _) = send_and_capture(&format!("127.0.0.1:{port}"), &v2, &rx);
    assert_eq!(String::from_utf8_lossy(&got), "PROXY TCP4 192.0.2.9 192.0.2.1 8080 80\r\nbody");
}

/// The relay closes the client (EOF or reset, not a read timeout) and
/// never reaches the backend.
fn assert_refused(port: u16, send: &[u8], rx: &mpsc::Receiver<Vec<u8>>, relay: &Relay) {
    assert!(refused(&format!("127.0.0.1:{port}"), send), "{send:?}: not closed; log:\n{}", relay.log());
    if let Ok(got) = rx.recv_timeout(Duration::from_millis(300)) {
        assert!(got.is_empty(), "backend received {:?}", String::from_utf8_lossy(&got));
    }
}

#[test]
fn accept_proxy_refuses_bad_clients_one_by_one() {
    let (relay, port, rx) = accept_proxy_relay(&["--trusted-proxies", "127.0.0.0/8"]);
    assert_refused(port, b"GET / HTTP/1.0\r\n\r\n", &rx, &relay);
    let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
    assert_refused(port, long.as_bytes(), &rx, &relay);
    // A client that stalls mid-header is closed by the header timeout.
    assert_refused(port, b"PROXY TCP4 1.2.", &rx, &relay);
    // Others are unaffected.
    let (got, _) = send_and_capture(&format!("127.0.0.1:{port}"), b"PROXY UNKNOWN\r\nok", &rx);
    assert!(String::from_utf8_lossy(&got).ends_with("\r\nok"), "{}", relay.log());
    relay.expect_log("bad PROXY header");
}

#[test]
fn accept_proxy_refuses_untrusted_sources() {
    let (relay, port, rx) = accept_proxy_relay(&["--trusted-proxies", "10.0.0.0/8"]);
    assert_refused(port, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nx", &rx, &relay);
    relay.expect_log("not a trusted proxy");
}

#[test]
fn accept_proxy_without_trusted_sources_is_a_usage_error() {
    let (code, err) = run_to_exit(&["127.0.0.1:1=127.0.0.1:2,accept-proxy"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--trusted-proxies"), "{err}");
}

/// HAProxy on a free port, `accept-proxy`, logging each client's address
/// to its stdout as `client=ADDR`; killed on drop.
struct Haproxy {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<String>,
    _dir: TempDir,
}

impl Haproxy {
    /// Starts it in front of `backend` and waits until it listens, on
    /// another port if the one picked was taken meanwhile.
    fn start(backend: std::net::SocketAddr) -> Haproxy {
        for _ in 0..5 {
            let port = free_port();
            let dir = TempDir::new(&format!("haproxy-{port}"));
            let cfg = dir.0.join("h.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  log stdout format raw local0\ndefaults\n  mode tcp\n  log global\n  timeout connect 5s\n  timeout client 15s\n  timeout server 15s\n  log-format \"client=%ci\"\nlisten l\n  bind 127.0.0.1:{port} accept-proxy\n  server s {backend}\n"
                ),
            )
            .unwrap();
            let mut child = Command::new("haproxy")
                .args(["-db", "-f"])
                .arg(&cfg)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn haproxy");
            let out = child.stdout.take().unwrap();
            let (tx, lines) = mpsc::channel();
            thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            let mut h = Haproxy { child, port, lines, _dir: dir };
            let mut exited = false;
            wait_until(PATIENCE, || {
                exited = h.child.try_wait().unwrap().is_some();
                exited || listening_on(port)
            });
            if !exited && listening_on(port) {
                return h;
            }
            assert!(exited, "haproxy did not listen on port {port}");
        }
        panic!("haproxy exited at start 5 times (its port taken each time?)");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("relay-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// HAProxy with `accept-proxy` behind the relay logs the client's real address.
#[test]
#[ignore = "needs haproxy (apt-get install haproxy)"]
fn haproxy_sees_the_real_client_address() {
    require_command("haproxy", "apt-get install haproxy");
    let backend = echo_server("127.0.0.1:0");
    let h = Haproxy::start(backend);
    let hport = h.port;
    let relay = Relay::start(|p| argv(["--send-proxy", "v2", &format!("[::]:{}=127.0.0.1:{hport}", p.pick())]));
    let port = relay.port();
    for (addr, want) in [(format!("[::1]:{port}"), "client=::1"), (format!("127.0.0.1:{port}"), "client=127.0.0.1")] {
        let mut c: TcpStream = connect(&addr);
        echo_round(&mut c, b"ping").unwrap_or_else(|e| panic!("{addr}: {e}\n{}", relay.log()));
        drop(c);
        let line = h.lines.recv_timeout(PATIENCE).expect("haproxy log line");
        assert_eq!(line.trim(), want);
    }
}
