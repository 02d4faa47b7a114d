//! Socket activation through `systemd-socket-activate` (no running systemd
//! needed): the relay takes the sockets passed as fds 3.. (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`) for the forwards with the same address and protocol,
//! and binds the others itself. The relay only starts on the first client,
//! so these tests start it by hand rather than with `Relay::start`.
mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

/// `systemd-socket-activate OPTIONS splice-relay ARGS`, its log collected.
struct Activated {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Activated {
    fn start(options: &[String], args: &[String]) -> Activated {
        require_command("systemd-socket-activate", "apt-get install systemd");
        let mut child = Command::new("systemd-socket-activate")
            .args(options)
            .arg(BIN)
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn systemd-socket-activate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Activated { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn expect_log(&self, what: &str) {
        assert!(wait_until(PATIENCE, || self.log().contains(what)), "no {what:?} in the log:\n{}", self.log());
    }

    /// SIGTERM (systemd-socket-activate execs the relay in its place), then exit 0.
    fn stop(mut self) {
        kill(self.child.id(), SIGTERM);
        let exited = wait_until(PATIENCE, || self.child.try_wait().unwrap().is_some());
        assert!(exited, "relay still running after SIGTERM:\n{}", self.log());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}\n{}", self.log());
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two TCP sockets passed with names, in the opposite order of the forwards
/// that use them, and a third forward the relay binds itself; two loops
/// share each passed socket.
#[test]
fn tcp_sockets_are_matched_by_address_and_named() {
    let backend = echo_server("127.0.0.1:0");
    let mut ports = Ports::default();
    let (a, b, own) = (ports.pick(), ports.pick(), ports.pick());
    let r = Activated::start(
        &[format!("--listen=127.0.0.1:{b}"), format!("--listen=127.0.0.1:{a}"), "--fdname=bee:ay".into()],
        &argv([
            "--threads",
            "2",
            &format!("127.0.0.1:{a}={backend}"),
            &format!("127.0.0.1:{b}={backend}"),
            &format!("127.0.0.1:{own}={backend}"),
        ]),
    );
    assert!(wait_until(PATIENCE, || listening_on(a) && listening_on(b)), "systemd-socket-activate not listening");
    // The first client starts the relay; it waits in the passed socket's backlog.
    echo_once(&format!("127.0.0.1:{a}"), 1, 100_000);
    r.expect_log(&format!("tcp 127.0.0.1:{a}: the socket from systemd, fd 4 (ay)"));
    r.expect_log(&format!("tcp 127.0.0.1:{b}: the socket from systemd, fd 3 (bee)"));
    for i in 0..8 {
        echo_once(&format!("127.0.0.1:{b}"), 10 + i, 10_000);
        echo_once(&format!("127.0.0.1:{a}"), 20 + i, 10_000);
    }
    echo_once(&format!("127.0.0.1:{own}"), 2, 10_000);
    assert!(!r.log().contains("matches no forward"), "{}", r.log());
    r.stop();
}

/// A UDP socket passed with --datagram: the first datagram starts the relay,
/// which reads it from the passed socket and relays it.
#[test]
fn udp_socket_is_taken() {
    let backend = udp_echo("127.0.0.1:0");
    let p = free_port();
    let r = Activated::start(
        &["--datagram".into(), format!("--listen=127.0.0.1:{p}"), "--fdname=dns".into()],
        &argv([&format!("udp:127.0.0.1:{p}={backend}")]),
    );
    let c = udp_client("127.0.0.1:0", PATIENCE);
    let to = format!("127.0.0.1:{p}").parse().unwrap();
    assert!(round_trip(&c, to, b"first").is_some(), "no reply:\n{}", r.log());
    r.expect_log(&format!("udp 127.0.0.1:{p}: the socket from systemd, fd 3 (dns)"));
    assert!(round_trip(&c, to, b"second").is_some(), "no reply:\n{}", r.log());
    r.stop();
}

/// A passed socket no forward listens on is closed with a warning; the
/// forward binds its own address.
#[test]
fn an_unmatched_socket_is_a_warning() {
    let backend = echo_server("127.0.0.1:0");
    let mut ports = Ports::default();
    let (passed, own) = (ports.pick(), ports.pick());
    let r = Activated::start(&[format!("--listen=127.0.0.1:{passed}")], &argv([&format!("127.0.0.1:{own}={backend}")]));
    assert!(wait_until(PATIENCE, || listening_on(passed)), "systemd-socket-activate not listening");
    // Starts the relay; this client is in a backlog nobody accepts from, and is dropped.
    let _starter = try_connect(&format!("127.0.0.1:{passed}"));
    r.expect_log(&format!(
        "the socket from systemd fd 3 (unknown) (tcp 127.0.0.1:{passed}) matches no forward; closed"
    ));
    r.expect_log("listening on");
    echo_once(&format!("127.0.0.1:{own}"), 3, 1000);
    r.stop();
}
