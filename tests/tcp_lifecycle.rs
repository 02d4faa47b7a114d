//! A TCP connection's life end to end, at its edges: urgent data, the
//! relay exiting with transfers open, a half-closed download, a PROXY
//! header before any backend connect, and a backend that accepts and resets.
mod common;
use common::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{MsgFlags, send, setsockopt, sockopt};

const SIGTERM: i32 = 15;
const SIGUSR2: i32 = 12;
const SIGALRM: i32 = 14;
/// SIGRTMIN + 5 with glibc's SIGRTMIN of 34.
const SIGRT: i32 = 39;

/// Sends `before`, one urgent byte, then (after the relay has met the
/// urgent mark) `after`, then FIN.
fn send_with_urgent(s: &mut TcpStream, before: &[u8], urgent: u8, after: &[u8]) {
    s.write_all(before).unwrap();
    send(s.as_raw_fd(), &[urgent], MsgFlags::MSG_OOB).unwrap();
    // Creates the condition under test: the mark reaches the relay with no
    // bytes behind it yet, so splice stops there.
    thread::sleep(Duration::from_millis(100));
    s.write_all(after).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
}

/// Reads to EOF; the error if the stream ended in one.
fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (got, Some(e.kind())),
        }
    }
}

/// One urgent byte mid-stream, one way: every byte arrives, in band and in
/// order, then a clean FIN; the sender sees no reset.
fn urgent_passes(upstream: bool, receiver_inline: bool, relay_args: &[&str]) {
    let before = pattern(1, 150_000);
    let after = pattern(2, 150_000);
    let mut expected = before.clone();
    expected.push(b'!');
    expected.extend_from_slice(&after);
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let baddr = backend.local_addr().unwrap();
    let r = Relay::start(|ports| {
        let mut args: Vec<String> = relay_args.iter().map(|a| a.to_string()).collect();
        args.push(format!("127.0.0.1:{}={baddr}", ports.pick()));
        args
    });
    let p = r.port();
    let (b4, af) = (before.clone(), after.clone());
    let server = thread::spawn(move || {
        let (mut s, _) = backend.accept().unwrap();
        if upstream {
            if receiver_inline {
                setsockopt(&s, sockopt::OobInline, &true).unwrap();
            }
            let got = read_all(&mut s);
            s.write_all(b"done").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            got
        } else {
            send_with_urgent(&mut s, &b4, b'!', &af);
            read_all(&mut s)
        }
    });
    let mut c = connect(&format!("127.0.0.1:{p}"));
    let client_got = if upstream {
        send_with_urgent(&mut c, &before, b'!', &after);
        read_all(&mut c)
    } else {
        if receiver_inline {
            setsockopt(&c, sockopt::OobInline, &true).unwrap();
        }
        let got = read_all(&mut c);
        c.shutdown(Shutdown::Write).unwrap();
        got
    };
    let server_got = server.join().unwrap();
    let (received, sender_end) = if upstream { (server_got, client_got) } else { (client_got, server_got) };
    let what = format!("upstream {upstream}, receiver inline {receiver_inline}, {relay_args:?}");
    assert_eq!(received.1, None, "{what}: the receiver's stream ended in an error\n{}", r.log());
    assert_eq!(received.0.len(), expected.len(), "{what}: bytes received\n{}", r.log());
    assert!(received.0 == expected, "{what}: the bytes differ");
    assert_eq!(sender_end.1, None, "{what}: the sender saw an error\n{}", r.log());
    if upstream {
        assert_eq!(sender_end.0, b"done", "{what}");
    }
}

#[test]
fn urgent_data_passes_in_band_both_ways_with_splice() {
    for upstream in [true, false] {
        for inline in [true, false] {
            urgent_passes(upstream, inline, &[]);
        }
    }
}

#[test]
fn urgent_data_passes_in_band_both_ways_when_copying() {
    for upstream in [true, false] {
        for inline in [true, false] {
            urgent_passes(upstream, inline, &["--no-splice"]);
        }
    }
}

/// A backend that streams bytes to each client until the client goes away
/// (at most 60 s), and reports how its write ended.
fn streaming_backend() -> (SocketAddr, mpsc::Receiver<std::io::Result<()>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let chunk = vec![7u8; 16384];
                let t = Instant::now();
                let end = loop {
                    if t.elapsed() > Duration::from_secs(60) {
                        break Ok(());
                    }
                    if let Err(e) = s.write_all(&chunk) {
                        break Err(e);
                    }
                };
                let _ = tx.send(end);
            });
        }
    });
    (addr, rx)
}

/// Reads until the stream ends; true if it ended in a reset, not a FIN.
fn ends_in_reset(c: &mut TcpStream) -> Result<bool, String> {
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut total = 0usize;
    loop {
        match c.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(true),
            Err(e) => return Err(format!("after {total} bytes: {e}")),
        }
    }
}

/// Reading slowly keeps the transfer in flight; returns once `n` bytes came.
fn read_some(c: &mut TcpStream, n: usize) {
    let mut buf = vec![0u8; n];
    c.read_exact(&mut buf).unwrap();
}

#[test]
fn sigterm_resets_open_transfers_instead_of_closing_them_cleanly() {
    let (backend, ends) = streaming_backend();
    let mut r = Relay::start(|ports| vec![format!("127.0.0.1:{}={backend}", ports.pick())]);
    let p = r.port();
    let mut clients: Vec<TcpStream> = (0..3).map(|_| connect(&format!("127.0.0.1:{p}"))).collect();
    for c in &mut clients {
        read_some(c, 100_000);
    }
    r.signal(SIGTERM);
    let st = r.wait_exit(Duration::from_secs(10)).expect("the relay exits on SIGTERM");
    assert_eq!(st.code(), Some(0));
    for c in &mut clients {
        assert_eq!(ends_in_reset(c), Ok(true), "a client must see a reset, not a FIN\n{}", r.log());
    }
    for _ in 0..3 {
        let end = ends.recv_timeout(Duration::from_secs(20)).expect("each backend writer ends");
        assert!(end.is_err(), "a backend writer must see its connection fail, not go on");
    }
    assert!(r.log().contains("resetting 3 open connections"), "{}", r.log());
}

#[test]
fn a_drain_that_runs_out_resets_what_is_left_and_other_signals_do_not_end_the_relay() {
    let (backend, _ends) = streaming_backend();
    let echo = echo_server("127.0.0.1:0");
    let mut r = Relay::start(|ports| {
        argv([
            "--drain-timeout",
            "2s",
            &format!("127.0.0.1:{}={backend}", ports.pick()),
            &format!("127.0.0.1:{}={echo}", ports.pick()),
        ])
    });
    let (p, q) = (r.ports[0], r.ports[1]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    read_some(&mut c, 100_000);
    for sig in [SIGUSR2, SIGALRM, SIGRT] {
        r.signal(sig);
    }
    assert!(
        wait_until(Duration::from_secs(10), || r.log().contains("SIGUSR2 ignored")
            && r.log().contains("SIGALRM ignored")),
        "{}",
        r.log()
    );
    // Still alive and relaying after all three.
    let mut e = connect(&format!("127.0.0.1:{q}"));
    e.write_all(b"still here").unwrap();
    let mut got = [0u8; 10];
    e.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    drop(e);
    assert!(r.child.try_wait().unwrap().is_none(), "a signal ended the relay\n{}", r.log());
    let t = Instant::now();
    r.signal(SIGTERM);
    let st = r.wait_exit(Duration::from_secs(20)).expect("the relay exits when the drain runs out");
    assert_eq!(st.code(), Some(0));
    assert!(t.elapsed() >= Duration::from_millis(1500), "exited after {:?}, before the drain ran out", t.elapsed());
    assert_eq!(ends_in_reset(&mut c), Ok(true), "the transfer left at the drain's end must be reset\n{}", r.log());
}

#[test]
fn a_client_that_half_closes_still_gets_a_long_slow_response() {
    // The backend answers a request for 3 s, a chunk every 100 ms, well past
    // the 1 s half-close timeout, which bounds inactivity, not age.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).unwrap();
        for i in 0..30u8 {
            s.write_all(&[i; 1000]).unwrap();
            thread::sleep(Duration::from_millis(100));
        }
        s.shutdown(Shutdown::Write).unwrap();
    });
    let r =
        Relay::start(|ports| argv(["--half-close-timeout", "1s", &format!("127.0.0.1:{}={backend}", ports.pick())]));
    let p = r.port();
    let mut c = connect(&format!("127.0.0.1:{p}"));
    c.write_all(b"GET /slow\r\n").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_all(&mut c);
    assert_eq!(err, None, "the response ended in an error\n{}", r.log());
    assert_eq!(got.len(), 30_000, "{}", r.log());
    assert!(got.chunks(1000).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));
}

/// A backend that counts the connections it accepted.
fn counting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            n2.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 || s.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, n)
}

/// Reads until EOF or an error, within `limit`; true if the connection ended.
fn ended_within(c: &mut TcpStream, limit: Duration) -> bool {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }
}

fn v1_header(src: &str, sport: u16) -> String {
    format!("PROXY TCP4 {src} 127.0.0.1 {sport} 80\r\n")
}

#[test]
fn accept_proxy_connects_only_after_a_valid_header() {
    let (backend, accepted) = counting_backend();
    let r = Relay::start(|ports| {
        argv([
            "--trusted-proxies",
            "127.0.0.1/32",
            "--proxy-header-timeout",
            "30s",
            "--max-connections-per-source",
            "1",
            &format!("127.0.0.1:{}={backend},accept-proxy", ports.pick()),
        ])
    });
    let p = r.port();
    let addr = format!("127.0.0.1:{p}");
    // 20 silent clients and 20 plain-HTTP clients make no backend connection.
    let silent: Vec<TcpStream> = (0..20).map(|_| connect(&addr)).collect();
    for _ in 0..20 {
        let mut c = connect(&addr);
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(ended_within(&mut c, Duration::from_secs(10)), "plain HTTP must be refused at once");
    }
    // A v2 header announcing 65,535 bytes is refused at once, not after 30 s.
    let mut c = connect(&addr);
    let mut v2 = vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0xff, 0xff];
    v2.extend_from_slice(&[0u8; 12]);
    c.write_all(&v2).unwrap();
    let t = Instant::now();
    assert!(ended_within(&mut c, Duration::from_secs(10)), "an over-long v2 header must be refused");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(10), || r.log().contains("over the 1024-byte bound")), "{}", r.log());
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "no backend connection before a valid header");
    // The per-source limit counts the address in the header: two clients
    // behind one proxy address are two sources; a second from one source is refused.
    let mut a = connect(&addr);
    a.write_all(v1_header("192.0.2.1", 1000).as_bytes()).unwrap();
    let mut b = connect(&addr);
    b.write_all(v1_header("192.0.2.2", 1000).as_bytes()).unwrap();
    for (c, msg) in [(&mut a, b"from a"), (&mut b, b"from b")] {
        c.write_all(msg).unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, msg);
    }
    let mut again = connect(&addr);
    again.write_all(v1_header("192.0.2.1", 1001).as_bytes()).unwrap();
    assert!(ended_within(&mut again, Duration::from_secs(10)), "a second connection from 192.0.2.1 must be refused");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "{}", r.log());
    drop(silent);
}

#[test]
fn a_backend_that_accepts_then_resets_is_not_called_unreachable() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            setsockopt(&s, sockopt::Linger, &nix::libc::linger { l_onoff: 1, l_linger: 0 }).unwrap();
            drop(s);
        }
    });
    let r = Relay::start(|ports| vec![format!("127.0.0.1:{}={backend}", ports.pick())]);
    let p = r.port();
    for _ in 0..5 {
        // The reset may come back before the connect returns: that ends it too.
        if let Ok(mut c) = try_connect(&format!("127.0.0.1:{p}")) {
            assert!(ended_within(&mut c, Duration::from_secs(10)));
        }
    }
    assert!(wait_until(Duration::from_secs(10), || r.log().matches("aborted").count() >= 5), "{}", r.log());
    assert!(!r.log().contains("unreachable"), "{}", r.log());
}
