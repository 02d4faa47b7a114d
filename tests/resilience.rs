//! Hardening, resilience: thousands of resets at once, a backend refused,
//! killed mid-transfer and restarted, and clients vanishing mid-transfer,
//! each beside steady traffic and each leaving no fd or pipe behind.
mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const GREETING: &[u8] = b"hello\n";

/// A client exchanging 512-byte echoes every 5 ms until `stop` (at most
/// 90 s); returns the rounds done or the first failure. `greeted`: read the
/// greeting first. `rounds` counts as it goes.
fn steady_client(
    addr: String,
    greeted: bool,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
) -> thread::JoinHandle<Result<usize, String>> {
    thread::spawn(move || {
        let mut c = connect(&addr);
        if greeted {
            let mut g = vec![0u8; GREETING.len()];
            c.read_exact(&mut g).map_err(|e| format!("greeting: {e}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            echo_round(&mut c, &pattern(n as u64, 512)).map_err(|e| format!("round {n}: {e}"))?;
            n += 1;
            rounds.store(n, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(5));
        }
        Ok(n)
    })
}

/// Waits until the steady client has done `more` rounds beyond now.
fn assert_progress(rounds: &AtomicUsize, more: usize, what: &str) {
    let from = rounds.load(Ordering::SeqCst);
    assert!(wait_until(PATIENCE, || rounds.load(Ordering::SeqCst) >= from + more), "steady client stalled {what}");
}

/// 2,000 clients connect and all reset at once while a steady client
/// exchanges echoes: it never fails, every reset reaches the backend, and
/// the relay's fds return to the baseline.
#[test]
fn two_thousand_resets_at_once_do_not_disturb_a_steady_client() {
    const N: usize = 2000;
    let backend = Echo::default().greeting(GREETING).bind("127.0.0.1:0");
    let b = backend.addr;
    let mut r = Relay::cmd().log("info").start(|p| argv([&format!("127.0.0.1:{}={b}", p.pick())]));
    let addr = format!("127.0.0.1:{}", r.port());
    let base = r.baseline();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let steady = steady_client(addr.clone(), true, stop.clone(), rounds.clone());
    assert_progress(&rounds, 5, "at the start");
    let with_steady = r.fds();

    // Opened in waves of 100 (the test backend's accept backlog is small),
    // each wave's greetings seen, all 2,000 open together.
    let to: SocketAddr = addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut clients: Vec<TcpStream> = Vec::with_capacity(N);
    while clients.len() < N {
        let wave = clients.len();
        for i in wave..wave + 100 {
            assert!(Instant::now() < deadline, "only {i} clients connected in 60 s");
            let c =
                TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap_or_else(|e| panic!("client {i}: {e}"));
            clients.push(c);
        }
        // Each greeting has arrived and stays unread: closing will send a reset.
        for (i, c) in clients.iter().enumerate().skip(wave) {
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            let got = c.peek(&mut [0u8; 1]);
            assert!(matches!(got, Ok(1)), "client {i}: no greeting: {got:?}");
        }
    }
    assert_eq!(r.fds().sockets, with_steady.sockets + 2 * N, "every client relayed at once");
    let before_reset = rounds.load(Ordering::SeqCst);
    drop(clients);
    assert!(
        wait_until(Duration::from_secs(30), || backend.resets.load(Ordering::SeqCst) >= N),
        "{} of {N} resets reached the backend",
        backend.resets.load(Ordering::SeqCst)
    );
    assert_progress(&rounds, 20, "after the resets");
    stop.store(true, Ordering::SeqCst);
    let done = steady.join().unwrap().unwrap_or_else(|e| panic!("steady client failed: {e}\n{}", tail(&r.log(), 30)));
    assert!(done > before_reset, "steady client: {done} rounds, {before_reset} before the resets");
    assert_eq!(backend.resets.load(Ordering::SeqCst), N, "resets beyond the clients'");
    r.assert_back_to_baseline(base);
    let log = r.log();
    assert!(warnings(&log).is_empty(), "unexpected warnings:\n{}", warnings(&log).join("\n"));
    r.assert_alive();
}

/// A flapping backend: refused (clients reset at once), listening (served),
/// SIGKILLed mid-transfer (the client sees EOF or a reset; another
/// forward's traffic is untouched), back again (served); no fd or pipe leaks.
#[test]
fn flapping_and_killed_backend_resets_then_serves_and_leaks_nothing() {
    require_command("python3", "apt-get install python3");
    let held = HeldPort::new(); // nothing listens here yet
    let bport = held.port;
    let other = echo_server("127.0.0.1:0");
    let mut r = Relay::start(|p| {
        argv([&format!("127.0.0.1:{}=127.0.0.1:{bport}", p.pick()), &format!("127.0.0.1:{}={other}", p.pick())])
    });
    let (a, b) = (format!("127.0.0.1:{}", r.ports[0]), format!("127.0.0.1:{}", r.ports[1]));
    let base = r.baseline();

    for i in 0..5 {
        let end = first_read_end(&a);
        assert_eq!(end, ReadEnd::Error(ErrorKind::ConnectionReset), "client {i} of a refused backend");
    }
    // One warning per client.
    r.assert_count("backend unreachable", 5);

    let mut py = PyEcho::start(bport);
    for i in 0..3 {
        echo_transfer(&a, 50 + i, 200_000).unwrap_or_else(|e| panic!("transfer {i} once the backend is up: {e}"));
    }

    // Traffic on the other forward all along.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let steady = steady_client(b.clone(), false, stop.clone(), rounds.clone());
    // A bulk transfer in flight when the backend dies.
    let c = connect(&a);
    let mut w = c.try_clone().unwrap();
    w.set_write_timeout(Some(PATIENCE)).unwrap();
    let writer = thread::spawn(move || {
        let chunk = pattern(5, 64 << 10);
        let t = Instant::now();
        let mut sent = 0usize;
        while sent < (1 << 30) && t.elapsed() < Duration::from_secs(60) {
            if w.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let received = Arc::new(AtomicUsize::new(0));
    let reader = {
        let received = received.clone();
        let mut c = c.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => return ReadEnd::Eof,
                    Ok(n) => {
                        received.fetch_add(n, Ordering::SeqCst);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        return ReadEnd::TimedOut;
                    }
                    Err(e) => return ReadEnd::Error(e.kind()),
                }
            }
        })
    };
    assert!(wait_until(PATIENCE, || received.load(Ordering::SeqCst) >= 4 << 20), "no bulk echo");
    let rounds_at_kill = rounds.load(Ordering::SeqCst);
    py.child.kill().unwrap();
    py.child.wait().unwrap();
    // The reader's reads time out after PATIENCE: a close must come first.
    let end = reader.join().unwrap();
    assert!(end.closed(), "client of the killed backend: {end:?}\n{}", tail(&r.log(), 20));
    let sent = writer.join().unwrap();
    assert!(sent < 1 << 30, "the writer was never stopped");
    drop(c);
    assert_progress(&rounds, 20, "after the kill");
    stop.store(true, Ordering::SeqCst);
    let done = steady.join().unwrap().unwrap_or_else(|e| panic!("other forward's client failed: {e}"));
    assert!(done > rounds_at_kill);

    let py2 = PyEcho::start(bport);
    echo_transfer(&a, 60, 300_000).unwrap_or_else(|e| panic!("transfer after the restart: {e}"));
    drop(py2);
    r.assert_back_to_baseline(base);
    r.assert_alive();
}

/// Clients vanish (close with unread bytes) while the backend is sending
/// a lot: each backend stream is cut with a reset or broken pipe (not a
/// stalled write), the relay keeps serving, and its fds return to the
/// baseline.
#[test]
fn clients_vanishing_mid_transfer_leave_nothing_behind() {
    const LIMIT: usize = 1 << 30;
    let (backend, ends) = source_backend(LIMIT);
    let mut r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let addr = format!("127.0.0.1:{}", r.port());
    let base = r.baseline();
    let hs: Vec<_> = (0..20)
        .map(|i| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut c = connect(&addr);
                if i % 2 == 0 {
                    let mut buf = vec![0u8; 1 << 20];
                    c.read_exact(&mut buf).unwrap();
                } else {
                    // Never reads: waits for bytes to be there.
                    assert_eq!(c.peek(&mut [0u8; 1]).unwrap(), 1);
                }
                drop(c); // gone, with unread bytes: a reset
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    // A source's write blocks for a minute before it fails on its own.
    let cut = |e: Option<ErrorKind>| matches!(e, Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe));
    for i in 0..20 {
        let (sent, err) = ends.recv_timeout(PATIENCE).unwrap_or_else(|_| panic!("backend stream {i} still running"));
        assert!(cut(err) && sent < LIMIT, "backend stream {i}: {sent} bytes, {err:?}");
    }
    r.assert_alive();
    let mut c = connect(&addr);
    let want = pattern(7, SOURCE_CHUNK);
    let mut got = vec![0u8; SOURCE_CHUNK];
    for k in 0..8 {
        c.read_exact(&mut got).unwrap_or_else(|e| panic!("chunk {k} after the vanishing clients: {e}"));
        assert!(got == want, "chunk {k} differs");
    }
    drop(c);
    let (_, err) = ends.recv_timeout(PATIENCE).expect("last backend stream still running");
    assert!(cut(err), "last backend stream: {err:?}");
    r.assert_back_to_baseline(base);
    r.assert_alive();
}
