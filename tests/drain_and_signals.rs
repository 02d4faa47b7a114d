//! Hardening, drain and signals: SIGTERM and SIGINT end the relay with
//! status 0; with `--drain-timeout` a transfer in flight finishes while new
//! clients are refused; a second signal exits at once.
mod common;
use common::*;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::Duration;

/// A backend sending `chunks` chunks of 1,000 bytes (chunk i is all i % 256),
/// `gap` apart, then closing.
fn slow_source(chunks: usize, gap: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming().take(4) {
            let Ok(mut s) = c else { continue };
            thread::spawn(move || {
                for i in 0..chunks {
                    if std::io::Write::write_all(&mut s, &[i as u8; 1000]).is_err() {
                        return;
                    }
                    thread::sleep(gap);
                }
            });
        }
    });
    addr
}

#[test]
fn sigterm_and_sigint_exit_zero() {
    for sig in [SIGTERM, SIGINT] {
        let backend = echo_server("127.0.0.1:0");
        let mut r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
        r.signal(sig);
        let st = r.wait_exit(PATIENCE).unwrap_or_else(|| panic!("still running after signal {sig}"));
        assert_eq!(st.code(), Some(0), "signal {sig}: {}", r.log());
        assert!(r.log().contains(": exiting"), "{}", r.log());
    }
}

/// With `--drain-timeout 20s`, SIGTERM during a 1 s transfer: new clients
/// are refused, the transfer completes, and the relay exits 0 as soon as
/// its last connection closed (not at the drain timeout).
#[test]
fn drain_refuses_new_clients_and_finishes_a_transfer_in_flight() {
    let backend = slow_source(10, Duration::from_millis(100));
    let mut r = Relay::start(|p| argv(["--drain-timeout", "20s", &format!("127.0.0.1:{}={backend}", p.pick())]));
    let addr = format!("127.0.0.1:{}", r.port());
    let mut c = connect(&addr);
    let mut first = [0u8; 1000];
    c.read_exact(&mut first).unwrap();
    assert_eq!(first, [0u8; 1000]);
    r.signal(SIGTERM);
    r.expect_log("no longer accepting; draining 1 connections");
    assert!(refuses_connections(&addr), "new clients are still accepted while draining");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 9000, "{}", tail(&r.log(), 20));
    for (i, chunk) in rest.chunks(1000).enumerate() {
        assert!(chunk.iter().all(|&b| b as usize == i + 1), "chunk {} differs", i + 1);
    }
    drop(c);
    let st = r.wait_exit(PATIENCE).expect("relay still running after its last connection closed");
    assert_eq!(st.code(), Some(0));
    let log = r.log();
    assert!(!log.contains("drain timeout reached"), "{log}");
}

/// A 60 s transfer; SIGTERM starts a drain (the transfer goes on); a
/// second SIGTERM exits 0 at once, long before the transfer or the drain
/// timeout would end, and the client learns the relay is gone.
#[test]
fn a_second_sigterm_during_a_drain_exits_at_once() {
    let backend = slow_source(600, Duration::from_millis(100));
    let mut r = Relay::start(|p| argv(["--drain-timeout", "60s", &format!("127.0.0.1:{}={backend}", p.pick())]));
    let mut c = connect(&format!("127.0.0.1:{}", r.port()));
    let mut chunk = [0u8; 1000];
    c.read_exact(&mut chunk).unwrap();
    r.signal(SIGTERM);
    r.expect_log("no longer accepting; draining 1 connections");
    // The transfer goes on during the drain.
    let start = read_until_chunk(&mut c);
    c.read_exact(&mut chunk).unwrap();
    assert_eq!(chunk, [start.wrapping_add(1); 1000]);
    r.assert_alive();
    r.signal(SIGTERM);
    let st = r.wait_exit(PATIENCE).unwrap_or_else(|| panic!("second SIGTERM: still running\n{}", r.log()));
    assert_eq!(st.code(), Some(0), "{}", r.log());
    let log = r.log();
    assert_eq!(log.matches("SIGTERM: exiting").count(), 1, "{log}");
    assert!(!log.contains("drain timeout reached"), "{log}");
    // The client learns the relay is gone.
    let end = read_until_closed(&mut c);
    assert!(end.closed(), "client after the relay exited: {end:?}");
}

/// Reads one whole 1,000-byte chunk; returns its value.
fn read_until_chunk(c: &mut std::net::TcpStream) -> u8 {
    let mut chunk = [0u8; 1000];
    c.read_exact(&mut chunk).unwrap();
    assert!(chunk.iter().all(|&b| b == chunk[0]), "a chunk is one value");
    chunk[0]
}
