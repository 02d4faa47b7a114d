//! TCP end to end through the real binary: families, half-close, resets,
//! many connections, pipes held only in flight, limits, signals, bad input.
mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

fn echo_once(addr: &str, seed: u64, len: usize) {
    let mut c = connect(addr);
    let data = pattern(seed, len);
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ for seed {seed}");
}

#[test]
fn every_family_combination() {
    let v4 = echo_server("127.0.0.1:0");
    let v6 = echo_server("[::1]:0");
    let (p1, p2) = (free_port(), free_port());
    let _r = Relay::start(&[&format!("[::]:{p1}={v4}"), &format!("127.0.0.1:{p2}={v6}")]);
    echo_once(&format!("[::1]:{p1}"), 1, 70_000);
    echo_once(&format!("127.0.0.1:{p1}"), 2, 70_000);
    echo_once(&format!("127.0.0.1:{p2}"), 3, 70_000);
}

#[test]
fn ipv6_only_listener_refuses_ipv4() {
    let v4 = echo_server("127.0.0.1:0");
    let p = free_port();
    let _r = Relay::start(&["--ipv6-only", &format!("[::]:{p}={v4}")]);
    echo_once(&format!("[::1]:{p}"), 4, 1000);
    let e = TcpStream::connect(("127.0.0.1", p)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
}

#[test]
fn reply_arrives_after_the_clients_shut_wr() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).unwrap();
        thread::sleep(Duration::from_millis(100));
        s.write_all(&[b"reply to ".as_slice(), &req].concat()).unwrap();
    });
    let p = free_port();
    let _r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    c.write_all(b"question").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "reply to question");
}

#[test]
fn data_still_flows_after_the_backends_shut_wr() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"banner").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        rest
    });
    let p = free_port();
    let _r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"banner");
    let data = pattern(9, 3 << 20);
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert!(h.join().unwrap() == data, "upload after the backend's FIN arrived intact");
}

#[test]
fn refused_backend_resets_the_client() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // closed at once
    let p = free_port();
    let r = Relay::start(&[&format!("127.0.0.1:{p}={dead}")]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let t = Instant::now();
    let e = c.read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(wait_until(Duration::from_secs(2), || r.log().contains("backend unreachable")), "{}", r.log());
}

#[test]
fn a_reset_reaches_the_other_side_both_ways() {
    // Backend resets: it closes with unread data in its receive buffer.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        thread::sleep(Duration::from_millis(200));
        drop(s); // the client's bytes are unread: RST
    });
    let p = free_port();
    let _r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    c.write_all(b"unread").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(c.read(&mut [0u8; 8]).unwrap_err().kind(), ErrorKind::ConnectionReset);

    // Client resets: the backend sees ECONNRESET.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"greeting").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.kind()),
            }
        }
    });
    let p = free_port();
    let _r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let c = connect(&format!("127.0.0.1:{p}"));
    thread::sleep(Duration::from_millis(200)); // greeting arrives, unread
    drop(c);
    assert_eq!(h.join().unwrap(), Err(ErrorKind::ConnectionReset));
}

#[test]
fn a_thousand_connections_echo_and_leave_no_fd_behind() {
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let base = r.fds();
    let mut conns: Vec<(TcpStream, Vec<u8>)> = (0..1000)
        .map(|i| {
            let c = connect(&format!("127.0.0.1:{p}"));
            (c, pattern(i, 1000 + i as usize))
        })
        .collect();
    for (c, d) in &mut conns {
        c.write_all(d).unwrap();
    }
    for (c, d) in &mut conns {
        let mut got = vec![0u8; d.len()];
        c.read_exact(&mut got).unwrap();
        assert!(got == *d);
    }
    drop(conns);
    // Sockets back to the baseline; pipes at most the pool's 32 spares.
    let settled = || {
        let f = r.fds();
        f.sockets == base.sockets && f.pipes <= 64 && f.total - f.pipes == base.total - base.pipes
    };
    assert!(wait_until(Duration::from_secs(5), settled), "fds {:?} vs {base:?}", r.fds());
}

#[test]
fn idle_connections_hold_no_pipes() {
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let mut conns: Vec<TcpStream> = (0..100).map(|_| connect(&format!("127.0.0.1:{p}"))).collect();
    for c in &mut conns {
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
    }
    let f = r.fds();
    assert_eq!(f.sockets, 201, "{f:?}"); // 100 clients + 100 backends + the listener
    assert!(f.pipes <= 64, "at most the pool's 32 spare pipes: {f:?}");
}

#[test]
fn a_client_that_never_reads_does_not_grow_the_relay() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let chunk = vec![7u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..1024 {
            if t.elapsed() > Duration::from_secs(10) || s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let p = free_port();
    let r = Relay::start(&["-q", &format!("127.0.0.1:{p}={backend}")]);
    let _c = connect(&format!("127.0.0.1:{p}"));
    thread::sleep(Duration::from_secs(2));
    let rss = r.rss_kib();
    assert!(rss < 30 * 1024, "RSS {rss} KiB: the backlog must stay in kernel buffers");
}

#[test]
fn low_fd_limit_neither_exits_nor_spins() {
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let fwd = format!("127.0.0.1:{p}={backend}");
    let mut r = Relay::start_with(&[&fwd], |cmd| {
        let prog = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        *cmd = std::process::Command::new("prlimit");
        cmd.arg("--nofile=40:40").arg("--").arg(prog).args(args);
        cmd.stdin(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).env("RUST_LOG", "info");
    });
    let clients: Vec<TcpStream> = (0..40).map(|_| connect(&format!("127.0.0.1:{p}"))).collect();
    thread::sleep(Duration::from_millis(300));
    let before = r.cpu_ticks();
    thread::sleep(Duration::from_secs(2));
    let spent = r.cpu_ticks() - before;
    assert!(r.child.try_wait().unwrap().is_none(), "relay exited: {}", r.log());
    assert!(spent < 50, "relay spun: {spent} ticks in 2 s");
    let log = r.log();
    assert!(log.contains("Too many open files"), "{log}");
    drop(clients);
    thread::sleep(Duration::from_millis(300));
    echo_once(&format!("127.0.0.1:{p}"), 5, 1000);
    assert!(r.wait_exit(Duration::from_millis(10)).is_none());
}

#[test]
fn port_range_config_file_and_connection_limit() {
    // 10 consecutive free ports for the listeners.
    let base = loop {
        let b = free_port();
        if b < 65000 && (1..10).all(|i| TcpListener::bind(("::", b + i)).is_ok()) {
            break b;
        }
    };
    let backend = echo_server("127.0.0.1:0");
    let dir = std::env::temp_dir().join(format!("relay-conf-{base}"));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("relay.conf");
    let single = free_port();
    std::fs::write(&conf, format!("# test\n\n127.0.0.1:{single}={backend} # inline\n")).unwrap();
    let fwd = format!("127.0.0.1:{base}-{}=127.0.0.1:{}-{}", base + 9, backend.port(), backend.port());
    // Unequal widths are refused; a 10-port range to one backend needs 10 backend ports:
    let (code, err) = run_to_exit(&[&fwd]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("differ in width"), "{err}");
    let backs: Vec<_> = (0..10).map(|_| echo_server("127.0.0.1:0")).collect();
    let conf2 = dir.join("range.conf");
    let lines: String = backs.iter().enumerate().map(|(i, b)| format!("127.0.0.1:{}={b}\n", base + i as u16)).collect();
    std::fs::write(&conf2, lines).unwrap();
    let _r = Relay::start(&["--max-connections", "2", "-c", conf.to_str().unwrap(), "-c", conf2.to_str().unwrap()]);
    for i in 0..10 {
        echo_once(&format!("127.0.0.1:{}", base + i), i as u64, 100);
    }
    echo_once(&format!("127.0.0.1:{single}"), 11, 100);
    // --max-connections 2: a third client waits in the backlog.
    let a = connect(&format!("127.0.0.1:{single}"));
    let b = connect(&format!("127.0.0.1:{single}"));
    thread::sleep(Duration::from_millis(100));
    let mut c = connect(&format!("127.0.0.1:{single}"));
    c.write_all(b"third").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(c.read(&mut [0u8; 5]).is_err(), "third client served beyond the limit");
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = [0u8; 5];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"third");
    drop(b);
}

#[test]
fn range_with_a_shared_width_relays_each_port_to_its_pair() {
    let (lp, tp) = (free_port(), free_port());
    // Ranges of width 1 written as A-A are allowed.
    let l = TcpListener::bind(("127.0.0.1", tp)).unwrap();
    drop(l);
    let backend = echo_server(&format!("127.0.0.1:{tp}"));
    let _r = Relay::start(&[&format!("127.0.0.1:{lp}-{lp}=127.0.0.1:{tp}-{tp}")]);
    assert_eq!(backend.port(), tp);
    echo_once(&format!("127.0.0.1:{lp}"), 12, 10);
}

#[test]
fn sigterm_and_sigint_exit_zero() {
    for sig in [15, 2] {
        let backend = echo_server("127.0.0.1:0");
        let p = free_port();
        let mut r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
        r.signal(sig);
        let st = r.wait_exit(Duration::from_secs(2)).expect("exits promptly");
        assert_eq!(st.code(), Some(0));
    }
}

#[test]
fn drain_lets_an_open_transfer_finish() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        for i in 0..10u8 {
            thread::sleep(Duration::from_millis(100));
            if s.write_all(&[i; 1000]).is_err() {
                return;
            }
        }
    });
    let p = free_port();
    let mut r = Relay::start(&["--drain-timeout", "5s", &format!("127.0.0.1:{p}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    let mut first = [0u8; 1000];
    c.read_exact(&mut first).unwrap();
    r.signal(15);
    thread::sleep(Duration::from_millis(100));
    assert!(TcpStream::connect(("127.0.0.1", p)).is_err(), "new clients are refused while draining");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 9000);
    drop(c);
    let st = r.wait_exit(Duration::from_secs(3)).expect("exits after the drain");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn no_splice_copies_intact() {
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let _r = Relay::start(&["--no-splice", &format!("127.0.0.1:{p}={backend}")]);
    let hs: Vec<_> =
        (0..50).map(|i| thread::spawn(move || echo_once(&format!("127.0.0.1:{p}"), 100 + i, 200_000))).collect();
    for h in hs {
        h.join().unwrap();
    }
}

#[test]
fn bad_input_is_one_clear_line() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("relay-bad-{busy_port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_conf = dir.join("bad.conf");
    std::fs::write(&bad_conf, "# ok\n127.0.0.1:1=127.0.0.1:2\nnot a forward\n").unwrap();
    let cases: Vec<(Vec<String>, i32, String)> = vec![
        (vec!["nonsense".into()], 2, "LISTEN=TARGET".into()),
        (vec!["127.0.0.1:0=127.0.0.1:80".into()], 2, "out of range".into()),
        (vec!["127.0.0.1:65536=127.0.0.1:80".into()], 2, "out of range".into()),
        (vec!["127.0.0.1:1-3=127.0.0.1:1-2".into()], 2, "differ in width".into()),
        (vec![format!("127.0.0.1:{busy_port}=127.0.0.1:80")], 1, "in use".into()),
        (vec!["127.0.0.1:1=no-such-host.invalid:80".into()], 1, "no-such-host.invalid".into()),
        (vec!["-c".into(), "/nonexistent/relay.conf".into()], 1, "/nonexistent/relay.conf".into()),
        (vec!["-c".into(), bad_conf.to_string_lossy().into()], 2, format!("{}:3:", bad_conf.display())),
        (vec![], 2, "nothing to relay".into()),
        (vec!["--connect-timeout".into(), "5x".into(), "127.0.0.1:1=127.0.0.1:2".into()], 2, "5x".into()),
    ];
    for (args, code, text) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (got, err) = run_to_exit(&argv);
        assert_eq!(got, code, "{args:?}: {err}");
        assert!(err.contains(&text), "{args:?}: expected {text:?} in {err:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.trim().lines().count() <= 3, "{args:?}: {err}");
    }
}

#[test]
fn quarter_gib_each_way_at_once_arrives_intact() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: u64 = 256;
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let _r = Relay::start(&["-q", &format!("[::1]:{p}={backend}")]);
    let c = connect(&format!("[::1]:{p}"));
    let mut w = c.try_clone().unwrap();
    let base = pattern(77, CHUNK);
    let sent = base.clone();
    let chunk = move |i: u64| {
        let mut v = sent.clone();
        v[..8].copy_from_slice(&i.to_le_bytes());
        v
    };
    let writer = thread::spawn(move || {
        for i in 0..CHUNKS {
            w.write_all(&chunk(i)).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = c;
    let mut buf = vec![0u8; CHUNK];
    for i in 0..CHUNKS {
        r.read_exact(&mut buf).unwrap();
        assert!(buf[8..] == base[8..] && buf[..8] == i.to_le_bytes(), "chunk {i} differs");
    }
    assert_eq!(r.read(&mut buf).unwrap(), 0, "EOF after exactly 256 MiB");
    writer.join().unwrap();
}

/// 100 clients wait in the backlog while the relay is stopped; when it goes
/// on it accepts them 32 at a time (giving open connections a turn between
/// slices) and must not lose the rest: no new edge comes for clients that
/// were already queued. Each one then gets its echo.
#[test]
fn a_backlog_larger_than_one_accept_slice_is_served_whole() {
    const N: usize = 100;
    let backend = echo_server("127.0.0.1:0");
    let p = free_port();
    let r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let addr = format!("127.0.0.1:{p}");
    r.signal(19); // SIGSTOP
    let mut conns: Vec<TcpStream> = (0..N).map(|_| connect(&addr)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&pattern(i as u64, 1000)).unwrap();
    }
    r.signal(18); // SIGCONT
    for (i, c) in conns.iter_mut().enumerate() {
        let mut got = vec![0u8; 1000];
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.read_exact(&mut got).unwrap_or_else(|e| panic!("client {i}: {e}\n{}", r.log()));
        assert!(got == pattern(i as u64, 1000), "client {i}: bytes differ");
    }
}

/// Small writes cross the relay at once both ways (TCP_NODELAY on both of
/// its sockets): a ping-pong of 1-byte messages where each
/// side writes twice before it reads. With Nagle on either relay socket the
/// second write waits for the peer's delayed ACK (40 ms or more) each round.
/// The test's own sockets have TCP_NODELAY too.
#[test]
fn small_writes_are_not_held_back_by_nagle() {
    const ROUNDS: usize = 20;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 2];
        for _ in 0..ROUNDS {
            if s.read_exact(&mut b).is_err() {
                return;
            }
            let _ = s.write_all(b"a");
            thread::sleep(Duration::from_millis(2));
            let _ = s.write_all(b"b");
        }
    });
    let p = free_port();
    let r = Relay::start(&[&format!("127.0.0.1:{p}={backend}")]);
    let mut c = connect(&format!("127.0.0.1:{p}"));
    c.set_nodelay(true).unwrap();
    let t = Instant::now();
    let mut b = [0u8; 2];
    for i in 0..ROUNDS {
        c.write_all(b"x").unwrap();
        thread::sleep(Duration::from_millis(2));
        c.write_all(b"y").unwrap();
        c.read_exact(&mut b).unwrap_or_else(|e| panic!("round {i}: {e}\n{}", r.log()));
        assert_eq!(&b, b"ab");
    }
    let took = t.elapsed();
    // Without Nagle about 20 x 4 ms; with it, 20 x 40 ms or more.
    assert!(took < Duration::from_millis(500), "{ROUNDS} rounds took {took:?}: small writes were held back");
}
