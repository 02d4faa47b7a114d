//! Hardening, timeouts and limits: silent and trickling clients
//! (`--idle-timeout`), a backend that never finishes (`--half-close-timeout`),
//! and the per-source connection limit.
mod common;
use common::*;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// `--idle-timeout 2s` closes a silent client and one whose next byte is
/// due only after 6 s, while a client echoing every 100 ms is untouched.
#[test]
fn idle_timeout_closes_silent_and_trickling_clients_but_not_busy_ones() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let backend = echo_server("127.0.0.1:0");
    let r = Relay::start(|p| argv(["--idle-timeout", "2s", &format!("127.0.0.1:{}={backend}", p.pick())]));
    let addr = format!("127.0.0.1:{}", r.port());
    let silent = {
        let addr = addr.clone();
        thread::spawn(move || {
            let mut c = connect(&addr);
            let t = Instant::now();
            (read_until_closed(&mut c), t.elapsed())
        })
    };
    // One byte, its echo, then a pause longer than the timeout (the next
    // byte would come 6 s later): closed during the pause.
    let trickle = {
        let addr = addr.clone();
        thread::spawn(move || -> Result<Duration, String> {
            let mut c = connect(&addr);
            echo_round(&mut c, b"x").map_err(|e| format!("first byte: {e}"))?;
            let t = Instant::now();
            let end = read_end(&mut c, Duration::from_secs(6));
            let took = t.elapsed();
            if !end.closed() {
                return Err(format!("{end:?} after {took:?}: still open when its next byte was due"));
            }
            Ok(took)
        })
    };
    // Busy: 30 echoes 100 ms apart (3 s, longer than the timeout).
    let mut busy = connect(&addr);
    for round in 0..30 {
        echo_round(&mut busy, format!("ping {round:04}").as_bytes())
            .unwrap_or_else(|e| panic!("busy client failed at round {round}: {e}\n{}", tail(&r.log(), 30)));
        thread::sleep(Duration::from_millis(100));
    }
    let (end, took) = silent.join().unwrap();
    assert!(end.closed(), "silent client: {end:?} after {took:?}\n{}", tail(&r.log(), 30));
    assert!(took >= TIMEOUT * 3 / 4, "silent client closed after {took:?}, before the timeout");
    let took = trickle.join().unwrap().unwrap_or_else(|e| panic!("trickling client: {e}\n{}", tail(&r.log(), 30)));
    assert!(took >= TIMEOUT * 3 / 4, "trickling client closed {took:?} after its echo");
    r.expect_log("idle too long; closed");
    echo_round(&mut busy, b"still here").unwrap_or_else(|e| panic!("busy client after the others closed: {e}"));
}

/// A backend that reads each request to EOF, reports it, then neither
/// replies nor closes (for a minute).
fn mute_backend() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for c in l.incoming().take(16) {
            let Ok(mut c) = c else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut req = Vec::new();
                let _ = std::io::Read::read_to_end(&mut c, &mut req);
                let _ = tx.send(req);
                thread::sleep(Duration::from_secs(60));
                drop(c);
            });
        }
    });
    (addr, rx)
}

/// `--half-close-timeout 1s`: a client that sent its request and FIN to a
/// backend that never replies nor closes is closed by the relay (long
/// before the backend would); the default (5 m) keeps such a connection open.
#[test]
fn half_close_timeout_ends_a_connection_the_backend_never_finishes() {
    let (backend, requests) = mute_backend();
    let r = Relay::start(|p| argv(["--half-close-timeout", "1s", &format!("127.0.0.1:{}={backend}", p.pick())]));
    let mut c = connect(&format!("127.0.0.1:{}", r.port()));
    c.write_all(b"request one").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = requests.recv_timeout(PATIENCE).expect("the backend got the request and its FIN");
    assert_eq!(got, b"request one");
    let t = Instant::now();
    let end = read_until_closed(&mut c);
    let took = t.elapsed();
    assert!(end.closed(), "{end:?} after {took:?}\n{}", tail(&r.log(), 20));
    assert!(took >= Duration::from_millis(800), "closed after {took:?}, before the timeout");
    r.expect_log("idle too long; closed");

    let r2 = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let mut c = connect(&format!("127.0.0.1:{}", r2.port()));
    c.write_all(b"request two").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = requests.recv_timeout(PATIENCE).expect("the backend got the second request");
    assert_eq!(got, b"request two");
    // Well past the 1 s above, the default timeout still holds it open.
    assert_eq!(read_end(&mut c, Duration::from_secs(3)), ReadEnd::TimedOut, "{}", tail(&r2.log(), 20));
}

/// `--max-connections-per-source 3`: the 4th connection from 127.0.0.1 is
/// refused, ::1 is still served, and 127.0.0.1 again once one of its
/// connections has closed.
#[test]
fn per_source_limit_refuses_the_fourth_and_spares_other_sources() {
    const REFUSED: &str = "3 connections from this address already; refused";
    let backend = echo_server("127.0.0.1:0");
    let mut r = Relay::start(|p| argv(["--max-connections-per-source", "3", &format!("[::]:{}={backend}", p.pick())]));
    let (v4, v6) = (format!("127.0.0.1:{}", r.port()), format!("[::1]:{}", r.port()));
    let mut first: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut c = connect(&v4);
            echo_round(&mut c, format!("v4 client {i}").as_bytes()).unwrap_or_else(|e| panic!("client {i}: {e}"));
            c
        })
        .collect();
    assert!(refused(&v4, b"fourth"), "4th client served\n{}", tail(&r.log(), 20));
    r.expect_log(REFUSED);
    for (i, c) in first.iter_mut().enumerate() {
        echo_round(c, b"still served").unwrap_or_else(|e| panic!("client {i} after the refusal: {e}"));
    }
    let mut six = connect(&v6);
    echo_round(&mut six, b"from ::1").unwrap_or_else(|e| panic!("::1 client not served: {e}\n{}", tail(&r.log(), 20)));

    // Once one closes (the relay sees it a moment later), 127.0.0.1 is served again.
    drop(first.remove(0));
    let mut again = None;
    let served = wait_until(PATIENCE, || {
        let Ok(mut c) = try_connect(&v4) else { return false };
        let ok = echo_round(&mut c, b"served again").is_ok();
        if ok {
            again = Some(c);
        }
        ok
    });
    assert!(served, "127.0.0.1 not served after one of its connections closed\n{}", tail(&r.log(), 20));
    // The limit holds again: 3 open from 127.0.0.1.
    let before = r.count(REFUSED);
    assert!(refused(&v4, b"extra"), "a 4th connection was served");
    assert!(wait_until(PATIENCE, || r.count(REFUSED) > before), "{}", tail(&r.log(), 20));
    r.assert_alive();
}
