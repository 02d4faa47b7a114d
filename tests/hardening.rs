//! Hardening, end to end through the real binary on loopback: silent and
//! trickling clients, half-closed connections, the per-source limit,
//! thousands of resets at once, a flapping and a killed backend, clients
//! vanishing mid-transfer, pipe exhaustion as an unprivileged user, graceful
//! drain, UDP floods, and the statistics line and metrics page.
mod common;
use common::*;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

const SIGTERM: i32 = 15;
const SIGUSR1: i32 = 10;
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

/// How one read on a relayed connection ended.
#[derive(Debug, PartialEq, Eq)]
enum ReadEnd {
    Eof,
    Error(ErrorKind),
    Data(usize),
    TimedOut,
}

impl ReadEnd {
    /// The connection was closed (EOF) or reset.
    fn closed(&self) -> bool {
        matches!(self, ReadEnd::Eof | ReadEnd::Error(_))
    }
}

/// One read, waiting at most `wait`.
fn read_end(c: &mut TcpStream, wait: Duration) -> ReadEnd {
    c.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).unwrap();
    let mut buf = [0u8; 4096];
    match c.read(&mut buf) {
        Ok(0) => ReadEnd::Eof,
        Ok(n) => ReadEnd::Data(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => ReadEnd::TimedOut,
        Err(e) => ReadEnd::Error(e.kind()),
    }
}

/// Sends `msg` and expects it echoed within 3 s.
fn echo_round(c: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(3)))?;
    c.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got)?;
    if got != msg {
        return Err(io::Error::other("echoed bytes differ"));
    }
    Ok(())
}

/// A whole echo transfer: `len` bytes up, FIN, the same bytes back, EOF.
fn echo_transfer(addr: &str, seed: u64, len: usize) -> Result<(), String> {
    let mut c = connect(addr);
    let data = pattern(seed, len);
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(&sent)?;
        w.shutdown(Shutdown::Write)
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).map_err(|e| format!("read after {} bytes: {e}", got.len()))?;
    writer.join().unwrap().map_err(|e| format!("write: {e}"))?;
    if got != data {
        return Err(format!("{} bytes back of {len}, or bytes differ", got.len()));
    }
    Ok(())
}

/// Starts the relay with RUST_LOG set to `level`.
fn start_at(level: &str, args: &[&str]) -> Relay {
    Relay::start_with(args, |cmd| {
        cmd.env("RUST_LOG", level);
    })
}

/// The last `n` lines of a log.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Log lines at WARN or ERROR.
fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect()
}

fn assert_alive(r: &mut Relay) {
    assert!(r.child.try_wait().unwrap().is_none(), "relay exited; log:\n{}", tail(&r.log(), 40));
}

/// Asks the relay for its statistics (SIGUSR1) and returns the pipe pool's
/// (in use, spare) from the fresh `stats pipes` line.
fn pipe_stats(r: &Relay) -> Option<(usize, usize)> {
    let count = |log: &str| log.matches("stats pipes in_use").count();
    let before = count(&r.log());
    r.signal(SIGUSR1);
    if !wait_until(Duration::from_secs(2), || count(&r.log()) > before) {
        return None;
    }
    let log = r.log();
    let line = log.lines().rev().find(|l| l.contains("stats pipes in_use"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |k: &str| words.iter().position(|w| *w == k).and_then(|i| words.get(i + 1))?.parse().ok();
    Some((after("in_use")?, after("spare")?))
}

/// What the relay holds at rest: its fds, and how many of its pipe fds are
/// the pool's spare pipes (the rest, e.g. an inherited jobserver pipe, are
/// not the relay's own).
#[derive(Debug, Clone, Copy)]
struct Baseline {
    fds: Fds,
    spare: usize,
}

fn baseline(r: &Relay) -> Baseline {
    let (in_use, spare) = pipe_stats(r).expect("a stats line on SIGUSR1");
    assert_eq!(in_use, 0, "pipes lent at rest");
    Baseline { fds: r.fds(), spare }
}

/// Waits until the relay holds exactly its baseline sockets and other fds,
/// lends no pipe, and every pipe fd it holds beyond the baseline's own is a
/// spare of the pool (two fds per pipe, at most 32 pipes): no socket, pipe
/// or other fd leaked.
fn assert_back_to_baseline(r: &Relay, base: Baseline, limit: Duration) {
    let own_pipes = base.fds.pipes - 2 * base.spare;
    let mut last = (r.fds(), None);
    let settled = wait_until(limit, || {
        let f = r.fds();
        let pipes = pipe_stats(r);
        last = (f, pipes);
        let Some((in_use, spare)) = pipes else { return false };
        f == r.fds()
            && f.sockets == base.fds.sockets
            && f.total - f.pipes == base.fds.total - base.fds.pipes
            && in_use == 0
            && f.pipes == own_pipes + 2 * spare
            && spare <= 32
    });
    assert!(
        settled,
        "relay fds not back to baseline: now {:?}, pipes (in use, spare) {:?}, baseline {base:?}\nlog tail:\n{}",
        last.0,
        last.1,
        tail(&r.log(), 30)
    );
}

/// True if `prog --version` runs.
fn have(prog: &str) -> bool {
    Command::new(prog).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// The real uid of a process, from /proc.
fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// A TCP echo backend that greets each connection with `GREETING` first,
/// and counts the connections that ended with a reset.
const GREETING: &[u8] = b"hello\n";
fn greeting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let resets = Arc::new(AtomicUsize::new(0));
    let counter = resets.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let counter = counter.clone();
            let _ = thread::Builder::new().stack_size(128 << 10).spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                if c.write_all(GREETING).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            if e.kind() == ErrorKind::ConnectionReset {
                                counter.fetch_add(1, Ordering::SeqCst);
                            }
                            return;
                        }
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, resets)
}

/// A backend that reads each request to EOF, reports it, then neither
/// replies nor closes for `hold`.
fn mute_backend(hold: Duration) -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for c in l.incoming().take(16) {
            let Ok(mut c) = c else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                c.set_read_timeout(Some(hold)).unwrap();
                let mut req = Vec::new();
                let _ = c.read_to_end(&mut req);
                let _ = tx.send(req);
                thread::sleep(hold);
                drop(c);
            });
        }
    });
    (addr, rx)
}

/// A backend streaming up to `limit` bytes (`pattern(7, CHUNK)` repeated) to
/// each client; reports (bytes written, the error that stopped it).
const SOURCE_CHUNK: usize = 256 << 10;
fn source_backend(limit: usize) -> (SocketAddr, mpsc::Receiver<(usize, Option<ErrorKind>)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let chunk = Arc::new(pattern(7, SOURCE_CHUNK));
    thread::spawn(move || {
        for c in l.incoming().take(100) {
            let Ok(mut c) = c else { continue };
            let (tx, chunk) = (tx.clone(), chunk.clone());
            thread::spawn(move || {
                c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut sent = 0;
                let mut err = None;
                while sent < limit {
                    if let Err(e) = c.write_all(&chunk) {
                        err = Some(e.kind());
                        break;
                    }
                    sent += chunk.len();
                }
                let _ = tx.send((sent, err));
            });
        }
    });
    (addr, rx)
}

/// A backend sending `chunks` chunks of 1,000 bytes (chunk i is all i),
/// `gap` apart, then closing.
fn slow_source(chunks: u8, gap: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming().take(4) {
            let Ok(mut s) = c else { continue };
            thread::spawn(move || {
                for i in 0..chunks {
                    if s.write_all(&[i; 1000]).is_err() {
                        return;
                    }
                    thread::sleep(gap);
                }
            });
        }
    });
    addr
}

/// A TCP echo backend whose connections start echoing only once `go` is
/// set (at most 30 s later).
fn gated_echo(go: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming().take(1000) {
            let Ok(mut c) = c else { continue };
            let go = go.clone();
            thread::spawn(move || {
                let t = Instant::now();
                while !go.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(30) {
                    thread::sleep(Duration::from_millis(10));
                }
                let mut buf = vec![0u8; 65536];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    if c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// A TCP echo server in a python3 child process (so it can be SIGKILLed).
const PY_ECHO: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

struct PyBackend {
    child: Child,
}

impl PyBackend {
    /// Starts the echo server on 127.0.0.1:`port`; waits for it to listen.
    fn start(port: u16) -> PyBackend {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(PY_ECHO)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut b = PyBackend { child };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.trim() == "ready" => b,
            other => {
                let _ = b.child.kill();
                panic!("python3 echo backend on port {port} did not start: {other:?}")
            }
        }
    }
}

impl Drop for PyBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if greeted {
            let mut g = vec![0u8; GREETING.len()];
            c.read_exact(&mut g).map_err(|e| format!("greeting: {e}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let msg = pattern(n as u64, 512);
            c.write_all(&msg).map_err(|e| format!("round {n}: write: {e}"))?;
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).map_err(|e| format!("round {n}: read: {e}"))?;
            if got != msg {
                return Err(format!("round {n}: bytes differ"));
            }
            n += 1;
            rounds.store(n, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(5));
        }
        Ok(n)
    })
}

/// Case 1: Slowloris: `--idle-timeout 1s` closes a silent client and one sending
/// a byte every 3 s, while a client echoing every 200 ms is untouched.
#[test]
fn idle_timeout_closes_silent_and_trickling_clients_but_not_busy_ones() {
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let r = Relay::start(&["--idle-timeout", "1s", &format!("127.0.0.1:{p}={backend}")]);
    let addr = format!("127.0.0.1:{p}");
    let silent = {
        let addr = addr.clone();
        thread::spawn(move || {
            let mut c = connect(&addr);
            let t = Instant::now();
            (read_end(&mut c, Duration::from_secs(5)), t.elapsed())
        })
    };
    let trickle = {
        let addr = addr.clone();
        thread::spawn(move || {
            let mut c = connect(&addr);
            for i in 0..3 {
                let t = Instant::now();
                if let Err(e) = c.write_all(b"x") {
                    return (i, ReadEnd::Error(e.kind()), t.elapsed());
                }
                match read_end(&mut c, Duration::from_secs(3)) {
                    ReadEnd::Data(1) => {}
                    other => return (i, other, t.elapsed()),
                }
                let end = read_end(&mut c, Duration::from_secs(3).saturating_sub(t.elapsed()));
                if end != ReadEnd::TimedOut {
                    return (i, end, t.elapsed());
                }
            }
            (3, ReadEnd::TimedOut, Duration::ZERO)
        })
    };
    let mut busy = connect(&addr);
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(4) && rounds < 40 {
        let msg = format!("ping {rounds:04}");
        echo_round(&mut busy, msg.as_bytes()).unwrap_or_else(|e| {
            panic!("busy client failed at round {rounds} ({:?}): {e}\n{}", start.elapsed(), tail(&r.log(), 30))
        });
        rounds += 1;
        thread::sleep(Duration::from_millis(200));
    }
    assert!(rounds >= 15, "only {rounds} rounds in 4 s");
    let (end, took) = silent.join().unwrap();
    assert!(end.closed(), "silent client: {end:?} after {took:?}\n{}", tail(&r.log(), 30));
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "silent client closed after {took:?}"
    );
    let (i, end, took) = trickle.join().unwrap();
    assert!(end.closed() && i == 0, "trickling client: byte {i}: {end:?} after {took:?}\n{}", tail(&r.log(), 30));
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "trickling client closed after {took:?}"
    );
    assert!(wait_until(Duration::from_secs(2), || r.log().contains("idle too long; closed")), "{}", tail(&r.log(), 30));
}

/// Case 2: `--half-close-timeout 1s`: a client that sent its request and FIN to a
/// backend that never replies nor closes is closed within ~3 s; the default
/// (5 m) keeps such a connection open.
#[test]
fn half_close_timeout_ends_a_connection_the_backend_never_finishes() {
    let (backend, requests) = mute_backend(Duration::from_secs(8));
    let (p1, p2) = (free_port(), free_port());
    let r = Relay::start(&["--half-close-timeout", "1s", &format!("127.0.0.1:{p1}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p1}"));
    c.write_all(b"request one").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let t = Instant::now();
    let got = requests.recv_timeout(Duration::from_secs(3)).expect("the backend got the request and its FIN");
    assert_eq!(got, b"request one");
    let end = read_end(&mut c, Duration::from_secs(5));
    let took = t.elapsed();
    assert!(end.closed(), "{end:?} after {took:?}\n{}", tail(&r.log(), 20));
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(3), "closed after {took:?}");
    assert!(wait_until(Duration::from_secs(2), || r.log().contains("idle too long; closed")), "{}", tail(&r.log(), 20));

    let r2 = Relay::start(&[&format!("127.0.0.1:{p2}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p2}"));
    c.write_all(b"request two").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = requests.recv_timeout(Duration::from_secs(3)).expect("the backend got the second request");
    assert_eq!(got, b"request two");
    assert_eq!(read_end(&mut c, Duration::from_secs(2)), ReadEnd::TimedOut, "{}", tail(&r2.log(), 20));
}

/// Case 3: `--max-connections-per-source 3`: the 4th connection from 127.0.0.1
/// is refused at once, ::1 is still served, and 127.0.0.1 again once one of
/// its connections has closed.
#[test]
fn per_source_limit_refuses_the_fourth_and_spares_other_sources() {
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let mut r = Relay::start(&["--max-connections-per-source", "3", &format!("[::]:{p}={backend}")]);
    let (v4, v6) = (format!("127.0.0.1:{p}"), format!("[::1]:{p}"));
    let mut first: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut c = connect(&v4);
            echo_round(&mut c, format!("v4 client {i}").as_bytes()).unwrap_or_else(|e| panic!("client {i}: {e}"));
            c
        })
        .collect();
    let mut fourth = connect(&v4);
    let _ = fourth.write_all(b"fourth");
    let t = Instant::now();
    let end = read_end(&mut fourth, Duration::from_secs(3));
    assert!(end.closed() && t.elapsed() < Duration::from_secs(1), "4th client: {end:?} after {:?}", t.elapsed());
    for (i, c) in first.iter_mut().enumerate() {
        echo_round(c, b"still served").unwrap_or_else(|e| panic!("client {i} after the refusal: {e}"));
    }
    let mut six = connect(&v6);
    echo_round(&mut six, b"from ::1").unwrap_or_else(|e| panic!("::1 client not served: {e}\n{}", tail(&r.log(), 20)));
    assert!(
        wait_until(Duration::from_secs(2), || r.log().contains("3 connections from this address already; refused")),
        "{}",
        tail(&r.log(), 20)
    );

    drop(first.remove(0));
    let start = Instant::now();
    let mut again = None;
    for _ in 0..30 {
        let mut c = connect(&v4);
        if echo_round(&mut c, b"served again").is_ok() {
            again = Some(c);
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(again.is_some(), "127.0.0.1 not served after one of its connections closed\n{}", tail(&r.log(), 20));
    assert!(start.elapsed() < Duration::from_secs(2), "served again only after {:?}", start.elapsed());
    // The limit holds again: 3 open from 127.0.0.1.
    let mut extra = connect(&v4);
    let _ = extra.write_all(b"extra");
    assert!(read_end(&mut extra, Duration::from_secs(3)).closed(), "a 4th connection was served");
    assert_alive(&mut r);
}

/// Case 4: 2,000 clients connect and all reset at once while a steady client
/// exchanges echoes: it never fails, every reset reaches the backend, and
/// the relay's fds return to the baseline.
#[test]
fn two_thousand_resets_at_once_do_not_disturb_a_steady_client() {
    const N: usize = 2000;
    let (backend, resets) = greeting_echo();
    let p = free_port();
    let mut r = start_at("info", &[&format!("127.0.0.1:{p}={backend}")]);
    let addr = format!("127.0.0.1:{p}");
    let base = baseline(&r);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let steady = steady_client(addr.clone(), true, stop.clone(), rounds.clone());
    assert!(wait_until(Duration::from_secs(5), || rounds.load(Ordering::SeqCst) >= 5), "steady client not started");
    let with_steady = r.fds();

    // Opened in waves of 100 (the test backend's accept backlog is small),
    // each wave's greetings seen, all 2,000 open together.
    let to: SocketAddr = addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut clients: Vec<TcpStream> = Vec::with_capacity(N);
    while clients.len() < N {
        let wave = clients.len();
        for i in wave..wave + 100 {
            assert!(Instant::now() < deadline, "only {i} clients connected in 40 s");
            let c =
                TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap_or_else(|e| panic!("client {i}: {e}"));
            clients.push(c);
        }
        // Each greeting has arrived and stays unread: closing will send a reset.
        for (i, c) in clients.iter().enumerate().skip(wave) {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let got = c.peek(&mut [0u8; 1]);
            assert!(matches!(got, Ok(1)), "client {i}: no greeting: {got:?}");
        }
    }
    let open = r.fds();
    assert_eq!(open.sockets, with_steady.sockets + 2 * N, "every client relayed at once");
    let before_reset = rounds.load(Ordering::SeqCst);
    drop(clients);
    assert!(
        wait_until(Duration::from_secs(15), || resets.load(Ordering::SeqCst) >= N),
        "{} of {N} resets reached the backend",
        resets.load(Ordering::SeqCst)
    );
    let settle = rounds.load(Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(5), || rounds.load(Ordering::SeqCst) >= settle + 20),
        "steady client stalled"
    );
    stop.store(true, Ordering::SeqCst);
    let done = steady.join().unwrap().unwrap_or_else(|e| panic!("steady client failed: {e}\n{}", tail(&r.log(), 30)));
    assert!(done > before_reset, "steady client: {done} rounds, {before_reset} before the resets");
    assert_back_to_baseline(&r, base, Duration::from_secs(10));
    let log = r.log();
    assert!(warnings(&log).is_empty(), "unexpected warnings:\n{}", warnings(&log).join("\n"));
    assert_alive(&mut r);
}

/// Case 5: A flapping backend: refused (clients reset at once), listening (served),
/// SIGKILLed mid-transfer (the client sees EOF or a reset within 3 s, another
/// forward's traffic is untouched), back again (served); no fd or pipe leaks.
#[test]
fn flapping_and_killed_backend_resets_then_serves_and_leaks_nothing() {
    if !have("python3") {
        eprintln!("skipped: python3 not found (needed for a backend process to SIGKILL)");
        return;
    }
    let bport = free_port(); // nothing listens here yet
    let other = echo_server("127.0.0.1:0");
    let (pa, pb) = (free_port(), free_port());
    let mut r = Relay::start(&[&format!("127.0.0.1:{pa}=127.0.0.1:{bport}"), &format!("127.0.0.1:{pb}={other}")]);
    let (a, b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let base = baseline(&r);

    for i in 0..5 {
        let mut c = connect(&a);
        let t = Instant::now();
        let end = read_end(&mut c, Duration::from_secs(3));
        assert_eq!(end, ReadEnd::Error(ErrorKind::ConnectionReset), "client {i} of a refused backend");
        assert!(t.elapsed() < Duration::from_secs(1), "reset only after {:?}", t.elapsed());
    }
    assert!(wait_until(Duration::from_secs(2), || r.log().contains("backend unreachable")), "{}", tail(&r.log(), 20));

    let mut py = PyBackend::start(bport);
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
    w.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = thread::spawn(move || {
        let chunk = pattern(5, 64 << 10);
        let t = Instant::now();
        let mut sent = 0usize;
        while sent < (1 << 30) && t.elapsed() < Duration::from_secs(20) {
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
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => return (ReadEnd::Eof, Instant::now()),
                    Ok(n) => {
                        received.fetch_add(n, Ordering::SeqCst);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        return (ReadEnd::TimedOut, Instant::now());
                    }
                    Err(e) => return (ReadEnd::Error(e.kind()), Instant::now()),
                }
            }
        })
    };
    assert!(wait_until(Duration::from_secs(10), || received.load(Ordering::SeqCst) >= 4 << 20), "no bulk echo");
    let rounds_at_kill = rounds.load(Ordering::SeqCst);
    let killed = Instant::now();
    py.child.kill().unwrap();
    py.child.wait().unwrap();
    let (end, ended) = reader.join().unwrap();
    let took = ended.saturating_duration_since(killed);
    assert!(end.closed(), "client of the killed backend: {end:?} after {took:?}\n{}", tail(&r.log(), 20));
    assert!(took < Duration::from_secs(3), "client saw the backend's death only after {took:?}");
    let sent = writer.join().unwrap();
    assert!(sent < 1 << 30, "the writer was never stopped");
    drop(c);
    assert!(
        wait_until(Duration::from_secs(5), || rounds.load(Ordering::SeqCst) >= rounds_at_kill + 20),
        "the other forward stalled after the kill"
    );
    stop.store(true, Ordering::SeqCst);
    let done = steady.join().unwrap().unwrap_or_else(|e| panic!("other forward's client failed: {e}"));
    assert!(done > rounds_at_kill);

    let py2 = PyBackend::start(bport);
    echo_transfer(&a, 60, 300_000).unwrap_or_else(|e| panic!("transfer after the restart: {e}"));
    drop(py2);
    assert_back_to_baseline(&r, base, Duration::from_secs(10));
    assert_alive(&mut r);
}

/// Case 6: Clients vanish (close with unread bytes) while the backend is sending
/// a lot: each backend stream is cut with an error at once, the relay keeps
/// serving, and its fds return to the baseline.
#[test]
fn clients_vanishing_mid_transfer_leave_nothing_behind() {
    const LIMIT: usize = 1 << 30;
    let (backend, ends) = source_backend(LIMIT);
    let p = free_port();
    let mut r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let addr = format!("127.0.0.1:{p}");
    let base = baseline(&r);
    let hs: Vec<_> = (0..20)
        .map(|i| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut c = connect(&addr);
                if i % 2 == 0 {
                    let mut buf = vec![0u8; 1 << 20];
                    c.read_exact(&mut buf).unwrap();
                } else {
                    // Never reads: wait for bytes to be there.
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    assert_eq!(c.peek(&mut [0u8; 1]).unwrap(), 1);
                    thread::sleep(Duration::from_millis(100));
                }
                drop(c); // gone, with unread bytes: a reset
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    for i in 0..20 {
        let (sent, err) =
            ends.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("backend stream {i} still running"));
        assert!(err.is_some() && sent < LIMIT, "backend stream {i}: {sent} bytes, {err:?}");
    }
    assert_alive(&mut r);
    let mut c = connect(&addr);
    let want = pattern(7, SOURCE_CHUNK);
    let mut got = vec![0u8; SOURCE_CHUNK];
    for k in 0..8 {
        c.read_exact(&mut got).unwrap_or_else(|e| panic!("chunk {k} after the vanishing clients: {e}"));
        assert!(got == want, "chunk {k} differs");
    }
    drop(c);
    let (_, err) = ends.recv_timeout(Duration::from_secs(5)).expect("last backend stream still running");
    assert!(err.is_some());
    assert_back_to_baseline(&r, base, Duration::from_secs(10));
    assert_alive(&mut r);
}

/// Case 7: Pipe exhaustion: as uid 65534 with `--pipe-size 1M`, 80 concurrent
/// 8 MiB echo transfers whose backend holds off at first need 80 pipes of
/// 1 MiB, more than `pipe-user-pages-soft` allows (64). The relay warns
/// about the pipe size, carries on with smaller pipes, and every transfer
/// completes intact.
#[test]
fn pipe_limit_of_an_unprivileged_user_is_survived() {
    const CONNS: usize = 80;
    const MIB_EACH: usize = 8;
    const MIB: usize = 1 << 20;
    if uid_of(std::process::id()) != Some(0) {
        eprintln!("skipped: not root, cannot run the relay as another user");
        return;
    }
    if !have("setpriv") {
        eprintln!("skipped: setpriv (util-linux) not found");
        return;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    if !passwd.lines().any(|l| l.split(':').nth(2) == Some("65534")) {
        eprintln!("skipped: no user with uid 65534");
        return;
    }
    let soft: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if soft == 0 || soft * 4096 / MIB >= 2 * CONNS {
        eprintln!("skipped: pipe-user-pages-soft is {soft}: {CONNS} connections would not exceed it");
        return;
    }
    let as_nobody = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    let probe = Command::new("setpriv").args(as_nobody).arg(BIN).arg("--version").output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: uid 65534 cannot run {BIN}: {probe:?}");
        return;
    }
    // The backend echoes only once `go` is set: until then each connection's
    // upload waits in the relay's pipe, 80 pipes of 1 MiB wanted at once.
    let go = Arc::new(AtomicBool::new(false));
    let backend = gated_echo(go.clone());
    let p = free_port();
    let mut r = Relay::start_with(&["--pipe-size", "1M", &format!("127.0.0.1:{p}={backend}")], |cmd| {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        *cmd = Command::new("setpriv");
        cmd.args(as_nobody).arg(BIN).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).env("RUST_LOG", "info");
    });
    assert_eq!(uid_of(r.pid()), Some(65534), "relay not running as uid 65534");
    let base = Arc::new(pattern(71, MIB));
    let addr = format!("127.0.0.1:{p}");
    let written = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let hs: Vec<_> = (0..CONNS)
        .map(|i| {
            let (addr, base, written) = (addr.clone(), base.clone(), written.clone());
            thread::spawn(move || -> Result<(), String> {
                let mut c = connect(&addr);
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut w = c.try_clone().unwrap();
                w.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
                let sent = base.clone();
                let writer = thread::spawn(move || -> io::Result<()> {
                    for k in 0..MIB_EACH {
                        w.write_all(&[(i as u64).to_le_bytes(), (k as u64).to_le_bytes()].concat())?;
                        w.write_all(&sent[16..])?;
                        written.fetch_add(1, Ordering::SeqCst);
                    }
                    w.shutdown(Shutdown::Write)
                });
                let mut buf = vec![0u8; MIB];
                for k in 0..MIB_EACH {
                    c.read_exact(&mut buf).map_err(|e| format!("conn {i} chunk {k}: {e}"))?;
                    let head = [(i as u64).to_le_bytes(), (k as u64).to_le_bytes()].concat();
                    if buf[..16] != head[..] || buf[16..] != base[16..] {
                        return Err(format!("conn {i} chunk {k}: bytes differ"));
                    }
                }
                match c.read(&mut buf) {
                    Ok(0) => {}
                    other => return Err(format!("conn {i}: no EOF after {MIB_EACH} MiB: {other:?}")),
                }
                writer.join().unwrap().map_err(|e| format!("conn {i}: write: {e}"))
            })
        })
        .collect();
    let backed_up = wait_until(Duration::from_secs(15), || written.load(Ordering::SeqCst) >= CONNS * 4);
    let warned = wait_until(Duration::from_secs(5), || r.log().contains("cannot size pipes"));
    let held = r.fds();
    go.store(true, Ordering::SeqCst);
    eprintln!(
        "held back: {backed_up} ({} MiB written), relay fds then {held:?}; pipe-size warning: {warned}",
        written.load(Ordering::SeqCst)
    );
    let errors: Vec<String> = hs.into_iter().filter_map(|h| h.join().unwrap().err()).collect();
    eprintln!("{CONNS} x {MIB_EACH} MiB each way as uid 65534 in {:?}", t.elapsed());
    assert!(errors.is_empty(), "{} transfers failed: {:?}\n{}", errors.len(), errors, tail(&r.log(), 20));
    let log = r.log();
    assert!(
        log.contains("cannot size pipes to 1048576 bytes"),
        "no pipe-size warning, so the limit was not reached:\n{}",
        tail(&log, 20)
    );
    let others: Vec<&str> = warnings(&log).into_iter().filter(|l| !l.contains("cannot size pipes")).collect();
    assert!(others.is_empty(), "other warnings:\n{}", others.join("\n"));
    assert_alive(&mut r);
}

/// Case 8: Drain: with `--drain-timeout 5s` a slow transfer in flight at SIGTERM
/// completes and the relay exits 0; a second SIGTERM during a drain exits 0
/// at once.
#[test]
fn drain_finishes_a_slow_transfer_and_a_second_sigterm_exits_at_once() {
    let backend = slow_source(10, Duration::from_millis(100));
    let p = free_port();
    let mut r = Relay::start(&["--drain-timeout", "5s", &format!("127.0.0.1:{p}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    let mut first = [0u8; 1000];
    c.read_exact(&mut first).unwrap();
    assert_eq!(first, [0u8; 1000]);
    r.signal(SIGTERM);
    let t = Instant::now();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 9000, "{}", tail(&r.log(), 20));
    for (i, chunk) in rest.chunks(1000).enumerate() {
        assert!(chunk.iter().all(|&b| b as usize == i + 1), "chunk {} differs", i + 1);
    }
    drop(c);
    let st = r.wait_exit(Duration::from_secs(2)).expect("relay still running after its last connection closed");
    assert_eq!(st.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(4), "exit only after {:?}", t.elapsed());
    let log = r.log();
    assert!(log.contains("draining 1 connections"), "{log}");
    assert!(!log.contains("drain timeout reached"), "{log}");

    // A 10 s transfer; SIGTERM; SIGTERM again.
    let backend = slow_source(100, Duration::from_millis(100));
    let p = free_port();
    let mut r = Relay::start(&["--drain-timeout", "5s", &format!("127.0.0.1:{p}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    let mut chunk = [0u8; 1000];
    c.read_exact(&mut chunk).unwrap();
    r.signal(SIGTERM);
    c.read_exact(&mut chunk).unwrap();
    thread::sleep(Duration::from_millis(200));
    c.read_exact(&mut chunk).unwrap();
    assert!(r.child.try_wait().unwrap().is_none(), "exited on the first SIGTERM despite the drain");
    r.signal(SIGTERM);
    let t = Instant::now();
    let st =
        r.wait_exit(Duration::from_secs(1)).unwrap_or_else(|| panic!("second SIGTERM: still running\n{}", r.log()));
    assert_eq!(st.code(), Some(0), "{}", r.log());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(wait_until(Duration::from_secs(1), || r.log().contains("exiting")), "{}", r.log());
    let log = r.log();
    assert!(log.contains("draining 1 connections"), "{log}");
    assert!(!log.contains("drain timeout reached"), "{log}");
    // The client learns the relay is gone.
    let t = Instant::now();
    let mut end = ReadEnd::TimedOut;
    while t.elapsed() < Duration::from_secs(3) {
        end = read_end(&mut c, Duration::from_secs(1));
        if end.closed() {
            break;
        }
    }
    assert!(end.closed(), "client after the relay exited: {end:?}");
}

/// Case 9: A UDP flood from 1,000 client sockets (40 of them on 127.0.0.2-9)
/// with `--udp-max-flows 50`: the relay never holds more than 50 flow
/// sockets, nobody gets another client's datagram, and a fresh client is
/// served afterwards.
#[test]
fn udp_flood_from_a_thousand_sources_stays_within_the_flow_bound() {
    const MAX: usize = 50;
    let backend = udp_echo("127.0.0.1:0");
    let port = free_port();
    let mut r = start_at("info", &["--udp-max-flows", "50", &format!("udp:127.0.0.1:{port}={backend}")]);
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let base = r.fds().sockets;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pid) = (stop.clone(), r.pid());
        thread::spawn(move || {
            let (mut max, mut samples) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                max = max.max(fds_of(pid).sockets);
                samples += 1;
                thread::sleep(Duration::from_micros(200));
            }
            (max, samples)
        })
    };
    let clients: Vec<(UdpSocket, Vec<u8>)> = (0..1000)
        .map(|i| {
            let ip = if i < 40 { format!("127.0.0.{}", 2 + i % 8) } else { "127.0.0.1".to_string() };
            let s = UdpSocket::bind((ip.as_str(), 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
            s.set_nonblocking(true).unwrap();
            (s, format!("client {i:04} from {ip}").into_bytes())
        })
        .collect();
    let t = Instant::now();
    for _round in 0..3 {
        for burst in clients.chunks(20) {
            for (s, msg) in burst {
                let _ = s.send_to(msg, to);
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
    let flood = t.elapsed();
    thread::sleep(Duration::from_millis(500));
    let mut replies = 0;
    let mut wrong = Vec::new();
    let mut buf = [0u8; 2048];
    for (i, (s, msg)) in clients.iter().enumerate() {
        for _ in 0..10 {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, to);
                    replies += 1;
                    if buf[..n] != msg[..] {
                        wrong.push(format!("client {i} got {:?}", String::from_utf8_lossy(&buf[..n])));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("client {i}: {e}"),
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (max, samples) = sampler.join().unwrap();
    eprintln!(
        "flood of 3,000 datagrams in {flood:?}: {replies} replies, {} to the wrong client; \
         sockets baseline {base}, max {max} in {samples} samples",
        wrong.len()
    );
    assert!(samples >= 50, "only {samples} samples");
    assert!(r.fds().sockets <= base + MAX);
    let over = if max > base + MAX {
        format!("sampled {max} sockets: more than baseline {base} + {MAX} flows; ")
    } else {
        String::new()
    };
    assert!(
        wrong.is_empty() && over.is_empty(),
        "{over}{} of {replies} replies went to the wrong client, e.g.:\n{}",
        wrong.len(),
        wrong.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );

    let fresh = UdpSocket::bind("127.0.0.1:0").unwrap();
    fresh.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut echoed = false;
    for _ in 0..5 {
        fresh.send_to(b"fresh client", to).unwrap();
        if let Ok((n, from)) = fresh.recv_from(&mut buf) {
            assert_eq!((&buf[..n], from), (&b"fresh client"[..], to));
            echoed = true;
            break;
        }
    }
    assert!(echoed, "a fresh client got no echo after the flood\n{}", tail(&r.log(), 20));
    assert_alive(&mut r);
}

/// Case 9b: Datagrams read in one batch from more new clients than the flow
/// table holds: a flow evicted within the batch must not carry its
/// datagram out through the flow that took its slot.
#[test]
fn udp_flows_evicted_within_one_batch_never_cross_clients() {
    let backend = udp_echo("127.0.0.1:0");
    let port = free_port();
    let mut r = Relay::start(&["--udp-max-flows", "4", &format!("udp:127.0.0.1:{port}={backend}")]);
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Stopped, the relay lets 24 clients' datagrams queue up, then reads them together.
    r.signal(SIGSTOP);
    let stopped = || std::fs::read_to_string(format!("/proc/{}/stat", r.pid())).is_ok_and(|s| s.contains(") T "));
    assert!(wait_until(Duration::from_secs(2), stopped), "relay not stopped");
    let clients: Vec<(UdpSocket, Vec<u8>)> = (0..24)
        .map(|i| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            (s, format!("datagram of client {i:02}").into_bytes())
        })
        .collect();
    for (s, msg) in &clients {
        s.send_to(msg, to).unwrap();
    }
    r.signal(SIGCONT);
    thread::sleep(Duration::from_millis(500));
    let mut buf = [0u8; 2048];
    let mut wrong = Vec::new();
    let mut replies = 0;
    for (i, (s, msg)) in clients.iter().enumerate() {
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            replies += 1;
            if buf[..n] != msg[..] {
                wrong.push(format!("client {i:02} got {:?}", String::from_utf8_lossy(&buf[..n])));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "datagrams delivered to the wrong client ({replies} replies):\n{}\nrelay log:\n{}",
        wrong.join("\n"),
        tail(&r.log(), 40)
    );
    assert_alive(&mut r);
}

/// An HTTP/1.0 GET on 127.0.0.1:`port`; returns the whole response.
fn http_get(port: u16, path: &str) -> String {
    let mut s = connect(&format!("127.0.0.1:{port}"));
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page
}

/// Case 10: `--stats-interval 1s` logs totals every second; SIGUSR1 logs them at
/// once with exact byte counts; `--metrics` serves the same counters.
#[test]
fn stats_lines_sigusr1_and_metrics_count_exactly() {
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let stats_tcp = |log: &str| log.lines().filter(|l| l.contains("stats tcp") && l.contains(": open ")).count();
    let r = start_at("info", &["--stats-interval", "1s", &format!("127.0.0.1:{p}={backend}")]);
    assert!(wait_until(Duration::from_millis(2000), || stats_tcp(&r.log()) >= 1), "no stats line in 2 s:\n{}", r.log());
    assert!(wait_until(Duration::from_millis(1600), || stats_tcp(&r.log()) >= 2), "no second stats line:\n{}", r.log());
    let log = r.log();
    let line = log.lines().find(|l| l.contains("stats tcp")).unwrap();
    assert!(line.contains(&format!("stats tcp 127.0.0.1:{p} -> {backend}: open 0 total 0 ")), "{line}");
    drop(r);

    // TCP and UDP echo backends sharing one port, for a both: forward.
    let (tl, ul) = (0..50)
        .find_map(|_| {
            let t = TcpListener::bind("127.0.0.1:0").ok()?;
            let u = UdpSocket::bind(t.local_addr().ok()?).ok()?;
            Some((t, u))
        })
        .expect("a port free for TCP and UDP");
    let q = tl.local_addr().unwrap().port();
    drop((tl, ul));
    echo_server(&format!("127.0.0.1:{q}"));
    udp_echo(&format!("127.0.0.1:{q}"));
    let (port, mport) = (free_port(), free_port());
    let mut r =
        Relay::start(&["--metrics", &format!("127.0.0.1:{mport}"), &format!("both:127.0.0.1:{port}=127.0.0.1:{q}")]);
    const LEN: usize = 123_457;
    echo_transfer(&format!("127.0.0.1:{port}"), 10, LEN).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || r.log().contains(&format!("closed: {LEN} bytes up, {LEN} bytes down"))),
        "{}",
        tail(&r.log(), 10)
    );
    let before = stats_tcp(&r.log());
    let t = Instant::now();
    r.signal(SIGUSR1);
    assert!(wait_until(Duration::from_secs(1), || stats_tcp(&r.log()) > before), "SIGUSR1 logged no stats line");
    assert!(t.elapsed() < Duration::from_millis(500), "stats line only after {:?}", t.elapsed());
    let log = r.log();
    let line = log.lines().rev().find(|l| l.contains("stats tcp")).unwrap();
    let want = format!(": open 0 total 1 refused 0 failed 0 bytes_up {LEN} bytes_down {LEN}");
    assert!(line.ends_with(&want), "{line}\nwanted it to end with {want:?}");

    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 256];
    for i in 0..7u64 {
        let msg = pattern(i, 100);
        u.send_to(&msg, ("127.0.0.1", port)).unwrap();
        let (n, _) = u.recv_from(&mut buf).unwrap_or_else(|e| panic!("datagram {i} not echoed: {e}"));
        assert_eq!(&buf[..n], &msg[..]);
    }

    let page = http_get(mport, "/metrics");
    assert!(page.starts_with("HTTP/1.0 200 OK\r\n"), "{page}");
    let labels = format!("{{listen=\"127.0.0.1:{port}\",target=\"127.0.0.1:{q}\"}}");
    for want in [
        "# TYPE splice_relay_tcp_connections_total counter".to_string(),
        format!("splice_relay_tcp_connections_total{labels} 1"),
        format!("splice_relay_tcp_connections_open{labels} 0"),
        format!("splice_relay_tcp_bytes_up_total{labels} {LEN}"),
        format!("splice_relay_tcp_bytes_down_total{labels} {LEN}"),
        "# TYPE splice_relay_udp_datagrams_sent_total counter".to_string(),
        format!(
            "splice_relay_udp_datagrams_sent_total{{listen=\"127.0.0.1:{port}\",target=\"127.0.0.1:{q}\",direction=\"up\"}} 7"
        ),
        format!(
            "splice_relay_udp_datagrams_sent_total{{listen=\"127.0.0.1:{port}\",target=\"127.0.0.1:{q}\",direction=\"down\"}} 7"
        ),
        format!("splice_relay_udp_flows_total{labels} 1"),
    ] {
        assert!(page.lines().any(|l| l == want), "no line {want:?} in:\n{page}");
    }
    assert_alive(&mut r);
}

/// Case 4b: no pipe to be had. The relay runs with an fd limit that idle
/// connections use up exactly, so `pipe2` fails (EMFILE; ENFILE and ENOMEM
/// under memory pressure take the same path): a transfer then copies through
/// user memory, intact, with one warning. Once connections close, pipes are
/// made again and splicing resumes, and the relay says so.
#[test]
fn no_pipe_to_be_had_copies_through_user_memory_then_splices_again() {
    const LIMIT: usize = 48;
    const MIB: usize = 1 << 20;
    if !have("prlimit") {
        eprintln!("skipped: prlimit (util-linux) not found");
        return;
    }
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let start_limited = |limit: usize| {
        Relay::start_with(&[&format!("127.0.0.1:{p}={backend}")], |cmd| {
            let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
            let envs: Vec<_> = cmd.get_envs().map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned()))).collect();
            *cmd = Command::new("prlimit");
            cmd.arg(format!("--nofile={limit}:{limit}")).arg("--").arg(BIN).args(args);
            for (k, v) in envs {
                if let Some(v) = v {
                    cmd.env(k, v);
                }
            }
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        })
    };
    let mut limit = LIMIT;
    let mut r = start_limited(limit);
    assert_alive(&mut r);
    // The relay inherits whatever fds the test runner left open, so the
    // number of fds it starts with below the limit varies (the limit bounds
    // fd numbers; an inherited fd 251 does not count). Idle connections
    // take 2 fds each; exactly one fd must stay free: a pipe needs two, and
    // with none free `accept` itself fails (the kernel takes the fd before
    // it looks at the queue).
    let below = |r: &Relay, limit: usize| {
        std::fs::read_dir(format!("/proc/{}/fd", r.pid()))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<usize>().ok()) < Some(limit))
                    .count()
            })
            .unwrap_or(0)
    };
    if (limit - below(&r, limit)) % 2 == 0 {
        drop(r);
        limit += 1;
        r = start_limited(limit);
        assert_alive(&mut r);
    }
    // Every log line starts with a UTC timestamp, 2026-11-25T06:10:02.418Z.
    let log = r.log();
    let first = log.lines().next().unwrap_or("");
    let stamp: Vec<char> = first.chars().take(24).collect();
    let shape: String = stamp.iter().map(|c| if c.is_ascii_digit() { '9' } else { *c }).collect();
    assert_eq!(shape, "9999-99-99T99:99:99.999Z", "no timestamp on {first:?}");
    assert!(first[24..].starts_with(" INFO "), "{first:?}");
    let start = r.fds();
    // stderr is a pipe too; the pool itself starts empty.
    let used = below(&r, limit);
    let n = (limit - used) / 2;
    assert_eq!(limit - used - 2 * n, 1, "{start:?}");
    let addr = format!("127.0.0.1:{p}");
    let mut conns: Vec<TcpStream> = (0..n).map(|_| connect(&addr)).collect();
    assert!(
        wait_until(Duration::from_secs(5), || r.fds().total == start.total + 2 * n),
        "relay did not take {n} connections: {:?}",
        r.fds()
    );
    let transfer = |c: &mut TcpStream, seed: u64| {
        let data = pattern(seed, MIB);
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let writer = thread::spawn(move || w.write_all(&sent));
        let mut back = vec![0u8; MIB];
        c.read_exact(&mut back).expect("echo through the relay");
        writer.join().unwrap().expect("write through the relay");
        assert!(back == data, "bytes differ");
    };
    transfer(&mut conns[0], 81);
    // The log is read by another thread: wait for the line rather than race it.
    let warned = |log: &str| log.contains("cannot create a pipe") && log.contains("copying through user memory");
    assert!(
        wait_until(Duration::from_secs(10), || warned(&r.log())),
        "no copy-fallback warning:\n{}",
        tail(&r.log(), 20)
    );
    assert_eq!(r.fds().pipes, start.pipes, "a pipe was made at the fd limit");
    // Free fds: the next transfer splices again.
    for c in conns.drain(n / 2..) {
        drop(c);
    }
    assert!(wait_until(Duration::from_secs(5), || r.fds().total <= start.total + n + 2), "{:?}", r.fds());
    transfer(&mut conns[1], 82);
    assert!(
        wait_until(Duration::from_secs(2), || r.log().contains("pipes can be created again")),
        "splicing did not resume:\n{}",
        tail(&r.log(), 20)
    );
    assert!(r.fds().pipes >= start.pipes + 2, "no pipe in the pool after a spliced transfer: {:?}", r.fds());
    let others: Vec<String> =
        warnings(&r.log()).into_iter().filter(|l| !l.contains("cannot create a pipe")).map(String::from).collect();
    assert!(others.is_empty(), "other warnings:\n{}", others.join("\n"));
    assert_alive(&mut r);
}
