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
    let p = free_port();
    let mut r = Relay::start(&[&format!("udp:127.0.0.1:{p}={backend}"), &format!("udp:[::1]:{p}={backend}")]);
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
        let errors: Vec<&str> = err.lines().filter(|l| l.contains(" ERROR ")).collect();
        let want = format!("cannot listen on {proto} 127.0.0.1:{p}: Address already in use (os error 98)");
        assert_eq!(errors.len(), 1, "{args:?}: one error line wanted:\n{err}");
        assert!(errors[0].ends_with(&want), "{args:?}: wanted {want:?}, got:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
