//! End-to-end tests of a UDP listening socket's life, with the real binary
//! on loopback: no other socket may bind its address while the relay holds
//! it, and on SIGTERM with `--drain-timeout` it stays open as the reply path
//! of the flows left while no new client datagram is read.
mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Runs python3 with `script`; returns its stdout, trimmed. Fails the test,
/// saying what to install, if python3 is not there.
fn python(script: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("this test needs python3 (install python3): {e}"));
    assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What binding `addr`:`port` with SO_REUSEADDR set gives: `bound`, or `errno N`.
fn bind_with_reuseaddr(family: &str, addr: &str, port: u16) -> String {
    python(&format!(
        "import socket\n\
         s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         try:\n    s.bind(('{addr}', {port})); print('bound')\n\
         except OSError as e:\n    print('errno', e.errno)\n"
    ))
}

/// Runs the relay with `args` at log level info until it exits, at most 10 s;
/// returns its exit code (None: still running, then killed) and stderr.
fn run_until_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");
    let stderr = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        BufReader::new(stderr).lines().map_while(Result::ok).map(|l| l + "\n").collect::<String>()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    (code, reader.join().unwrap())
}

/// While the relay listens on udp 127.0.0.1:P, a socket of another program
/// asking for SO_REUSEADDR cannot bind 127.0.0.1:P too (it would receive
/// the clients' datagrams).
#[test]
fn a_listening_udp_socket_cannot_be_shared() {
    let backend = udp_echo("127.0.0.1:0");
    let mut r = Relay::start(|ports| {
        let p = ports.pick();
        vec![format!("udp:127.0.0.1:{p}={backend}"), format!("udp:[::1]:{p}={backend}")]
    });
    let p = r.port();
    assert!(r.child.try_wait().unwrap().is_none(), "relay did not start:\n{}", r.log());
    assert_eq!(bind_with_reuseaddr("AF_INET", "127.0.0.1", p), "errno 98", "127.0.0.1:{p} was shared");
    assert_eq!(bind_with_reuseaddr("AF_INET6", "::1", p), "errno 98", "[::1]:{p} was shared");
    assert!(r.child.try_wait().unwrap().is_none(), "relay exited:\n{}", r.log());
}

/// Two UDP forwards on one address fail at start like two TCP forwards do:
/// exit status 1 and one error line naming the address.
#[test]
fn two_udp_forwards_on_one_port_fail_at_start() {
    let p = free_port();
    let t = "127.0.0.1:9";
    let cases = [
        ("tcp", [format!("127.0.0.1:{p}={t}"), format!("tcp:127.0.0.1:{p}={t}")]),
        ("udp", [format!("udp:127.0.0.1:{p}={t}"), format!("udp:127.0.0.1:{p}={t}")]),
        ("udp", [format!("both:127.0.0.1:{p}={t}"), format!("udp:127.0.0.1:{p}={t}")]),
    ];
    for (proto, args) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run_until_exit(&argv);
        assert_eq!(code, Some(1), "{args:?} should exit 1 at start:\n{err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("splice-relay: ")).collect();
        let want = format!("cannot listen on {proto} 127.0.0.1:{p}: Address already in use (os error 98)");
        assert_eq!(errors.len(), 1, "{args:?}: one error line wanted:\n{err}");
        assert!(errors[0].ends_with(&want), "{args:?}: wanted {want:?}, got:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// SIGTERM with `--drain-timeout 20s` while a backend is still to answer a
/// client: the reply still reaches the client from the listening socket, no
/// client datagram is read any more (neither the same client's nor a new
/// client's), and the relay exits 0 once the flow idles out
/// (`--udp-timeout 1s`), long before the drain timeout.
#[test]
fn a_reply_during_a_drain_reaches_the_client_then_the_relay_exits() {
    let backend = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    backend.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let baddr = backend.local_addr().unwrap();
    let mut r = Relay::start(|ports| {
        argv(["--drain-timeout", "20s", "--udp-timeout", "1s", &format!("udp:127.0.0.1:{}={baddr}", ports.pick())])
    });
    let p = r.port();
    let relay_addr = format!("127.0.0.1:{p}");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];

    client.send_to(b"question", &relay_addr).unwrap();
    let (n, flow) = backend.recv_from(&mut buf).unwrap_or_else(|e| panic!("backend got nothing: {e}\n{}", r.log()));
    assert_eq!(&buf[..n], b"question");

    let sigterm = Instant::now();
    r.signal(15);
    assert!(
        wait_until(Duration::from_secs(10), || r.log().contains("SIGTERM: no longer accepting")),
        "no drain line:\n{}",
        r.log()
    );
    // Neither an open flow's client nor a new client is read during the drain.
    client.send_to(b"late", &relay_addr).unwrap();
    let newcomer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    newcomer.send_to(b"new", &relay_addr).unwrap();

    backend.send_to(b"answer", flow).unwrap();
    let (n, from) =
        client.recv_from(&mut buf).unwrap_or_else(|e| panic!("no reply during the drain: {e}\n{}", r.log()));
    assert_eq!((&buf[..n], from.to_string()), (&b"answer"[..], relay_addr.clone()));

    let status = r.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| panic!("still running:\n{}", r.log()));
    let took = sigterm.elapsed();
    let log = r.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(took < Duration::from_secs(10), "exited {took:?} after SIGTERM, not when the flow idled out:\n{log}");
    assert_eq!(log.matches("idle; closed").count(), 1, "{log}");
    assert!(!log.contains("drain timeout reached"), "{log}");
    // Whatever the relay sent, it sent before it exited: nothing more came.
    backend.set_nonblocking(true).unwrap();
    match backend.recv_from(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the backend got a datagram read during the drain: {other:?}"),
    }
}
