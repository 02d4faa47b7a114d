//! TCP end to end through the real binary: families, half-close, resets,
//! many connections, pipes held only in flight, fd limits, ranges and config
//! files, bad input, backlogs, Nagle.
mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn every_family_combination() {
    let v4 = echo_server("127.0.0.1:0");
    let v6 = echo_server("[::1]:0");
    let r = Relay::start(|p| argv([&format!("[::]:{}={v4}", p.pick()), &format!("127.0.0.1:{}={v6}", p.pick())]));
    let (p1, p2) = (r.ports[0], r.ports[1]);
    echo_once(&format!("[::1]:{p1}"), 1, 70_000);
    echo_once(&format!("127.0.0.1:{p1}"), 2, 70_000);
    echo_once(&format!("127.0.0.1:{p2}"), 3, 70_000);
}

#[test]
fn ipv6_only_listener_refuses_ipv4() {
    let v4 = echo_server("127.0.0.1:0");
    let r = Relay::start(|p| argv(["--ipv6-only", &format!("[::]:{}={v4}", p.pick())]));
    let p = r.port();
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
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
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
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
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
    let dead = HeldPort::new(); // bound, not listening: connections are refused
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={}", p.pick(), dead.addr())]));
    let end = first_read_end(&format!("127.0.0.1:{}", r.port()));
    assert_eq!(end, ReadEnd::Error(ErrorKind::ConnectionReset));
    r.expect_log("backend unreachable");
}

#[test]
fn a_reset_reaches_the_other_side_both_ways() {
    // Backend resets: it closes with unread data in its receive buffer.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let _ = s.peek(&mut [0u8; 1]);
        drop(s); // the client's bytes are there, unread: RST
    });
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
    let mut c = connect(&format!("127.0.0.1:{p}"));
    c.write_all(b"unread").unwrap();
    assert_eq!(read_end(&mut c, PATIENCE), ReadEnd::Error(ErrorKind::ConnectionReset));

    // Client resets: the backend sees ECONNRESET.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"greeting").unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.kind()),
            }
        }
    });
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
    let c = connect(&format!("127.0.0.1:{p}"));
    assert_eq!(c.peek(&mut [0u8; 1]).unwrap(), 1, "no greeting");
    drop(c); // the greeting is there, unread: RST
    assert_eq!(h.join().unwrap(), Err(ErrorKind::ConnectionReset));
}

#[test]
fn a_thousand_connections_echo_and_leave_no_fd_behind() {
    let backend = echo_server("127.0.0.1:0");
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
    let base = r.baseline();
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
    // Sockets and other fds back to the baseline, no pipe lent, and every
    // pipe fd beside the relay's own is one of the pool's spares (at most 32).
    r.assert_back_to_baseline(base);
}

#[test]
fn idle_connections_hold_no_pipes() {
    let backend = echo_server("127.0.0.1:0");
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
    let base = r.baseline();
    let mut conns: Vec<TcpStream> = (0..100).map(|_| connect(&format!("127.0.0.1:{p}"))).collect();
    for c in &mut conns {
        echo_round(c, b"ping").unwrap();
    }
    // 100 idle connections: none holds a pipe; every pipe fd beside the
    // relay's own is a spare of the pool.
    let (lent, spare) = r.pipe_stats();
    let f = r.fds();
    assert_eq!(lent, 0, "pipes lent to idle connections");
    assert!(spare <= POOL_MAX_SPARE, "{spare} spare pipes");
    assert_eq!(f.pipes, base.own_pipes() + 2 * spare, "{f:?}, {spare} spare");
    assert_eq!(f.sockets, base.fds.sockets + 200, "{f:?}"); // 100 clients + 100 backends
}

#[test]
fn a_client_that_never_reads_does_not_grow_the_relay() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = written.clone();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let chunk = vec![7u8; 64 << 10];
        let t = Instant::now();
        for _ in 0..16384 {
            if t.elapsed() > Duration::from_secs(60) || s.write_all(&chunk).is_err() {
                break;
            }
            count.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
        }
    });
    let r = Relay::start(|p| argv(["-q", &format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
    let _c = connect(&format!("127.0.0.1:{p}"));
    // Wait until the backend is blocked: no byte written for half a second.
    let mut last = (usize::MAX, Instant::now());
    let stalled = wait_until(Duration::from_secs(30), || {
        let now = written.load(std::sync::atomic::Ordering::SeqCst);
        if now != last.0 {
            last = (now, Instant::now());
        }
        now > 0 && last.1.elapsed() > Duration::from_millis(500)
    });
    let backlog = written.load(std::sync::atomic::Ordering::SeqCst);
    assert!(stalled, "the backend wrote {backlog} bytes and was still writing: the relay keeps reading");
    let rss = r.rss_kib();
    assert!(rss < 30 * 1024, "RSS {rss} KiB with {backlog} bytes held up: the backlog must stay in kernel buffers");
}

#[test]
fn low_fd_limit_neither_exits_nor_spins() {
    require_command("prlimit", "apt-get install util-linux");
    let backend = echo_server("127.0.0.1:0");
    let mut r = Relay::cmd()
        .log("info")
        .under(&["prlimit", "--nofile=40:40", "--"])
        .start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
    let clients: Vec<TcpStream> = (0..40).map(|_| connect(&format!("127.0.0.1:{p}"))).collect();
    r.expect_log("Too many open files");
    // Out of fds with clients waiting: 2 s of it cost little CPU.
    let before = r.cpu_ticks();
    thread::sleep(Duration::from_secs(2));
    let spent = r.cpu_ticks() - before;
    r.assert_alive();
    assert!(spent < 50, "relay spun: {spent} ticks in 2 s");
    drop(clients);
    // Served again once fds are free (this client may wait in the backlog).
    echo_once(&format!("127.0.0.1:{p}"), 5, 1000);
    r.assert_alive();
}

#[test]
fn port_range_config_file_and_connection_limit() {
    let backend = echo_server("127.0.0.1:0");
    // Unequal widths are refused; a 10-port range to one backend needs 10 backend ports.
    let (code, err) = run_to_exit(&[&format!("127.0.0.1:2000-2009=127.0.0.1:{0}-{0}", backend.port())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("differ in width"), "{err}");
    let backs: Vec<_> = (0..10).map(|_| echo_server("127.0.0.1:0")).collect();
    let dir = std::env::temp_dir().join(format!("relay-conf-{}-{}", std::process::id(), backend.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let (conf, conf2) = (dir.join("relay.conf"), dir.join("range.conf"));
    // One forward in the first file, ten on consecutive ports in the second.
    let r = Relay::start(|p| {
        let single = p.pick();
        std::fs::write(&conf, format!("# test\n\n127.0.0.1:{single}={backend} # inline\n")).unwrap();
        let base = p.range(10);
        let lines: String =
            backs.iter().enumerate().map(|(i, b)| format!("127.0.0.1:{}={b}\n", base + i as u16)).collect();
        std::fs::write(&conf2, lines).unwrap();
        argv(["--max-connections", "2", "-c", conf.to_str().unwrap(), "-c", conf2.to_str().unwrap()])
    });
    let (single, base) = (r.ports[0], r.ports[1]);
    assert_eq!(r.count("listening on"), 11);
    for i in 0..10 {
        echo_once(&format!("127.0.0.1:{}", base + i), i as u64, 100);
    }
    echo_once(&format!("127.0.0.1:{single}"), 11, 100);
    // --max-connections 2: a third client waits in the backlog.
    let mut a = connect(&format!("127.0.0.1:{single}"));
    let mut b = connect(&format!("127.0.0.1:{single}"));
    echo_round(&mut a, b"first").unwrap();
    echo_round(&mut b, b"second").unwrap();
    let mut c = connect(&format!("127.0.0.1:{single}"));
    c.write_all(b"third").unwrap();
    assert_eq!(read_end(&mut c, Duration::from_millis(500)), ReadEnd::TimedOut, "third client served beyond the limit");
    drop(a);
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = [0u8; 5];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"third");
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn range_with_a_shared_width_relays_each_port_to_its_pair() {
    // Ranges of width 1 written as A-A are allowed.
    let tp = echo_server("127.0.0.1:0").port();
    let r = Relay::start(|p| {
        let lp = p.pick();
        argv([&format!("127.0.0.1:{lp}-{lp}=127.0.0.1:{tp}-{tp}")])
    });
    echo_once(&format!("127.0.0.1:{}", r.port()), 12, 10);
}

#[test]
fn no_splice_copies_intact() {
    let backend = echo_server("127.0.0.1:0");
    let r = Relay::start(|p| argv(["--no-splice", &format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
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
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line wanted: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quarter_gib_each_way_at_once_arrives_intact() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: u64 = 256;
    let backend = echo_server("127.0.0.1:0");
    let r = Relay::start(|p| argv(["-q", &format!("[::1]:{}={backend}", p.pick())]));
    let p = r.port();
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
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
    let addr = format!("127.0.0.1:{p}");
    r.stop();
    let mut conns: Vec<TcpStream> = (0..N).map(|_| connect(&addr)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&pattern(i as u64, 1000)).unwrap();
    }
    r.signal(SIGCONT);
    for (i, c) in conns.iter_mut().enumerate() {
        let mut got = vec![0u8; 1000];
        c.read_exact(&mut got).unwrap_or_else(|e| panic!("client {i}: {e}\n{}", r.log()));
        assert!(got == pattern(i as u64, 1000), "client {i}: bytes differ");
    }
}

/// Small writes cross the relay at once both ways (TCP_NODELAY on both of
/// its sockets): a ping-pong of 1-byte messages where each side writes
/// twice before it reads. With Nagle on either relay socket the second
/// write waits for the peer's delayed ACK (40 ms at least) in every round
/// once the connection's first quick ACKs are spent; without it a round
/// takes a few milliseconds. The median round must stay under that 40 ms
/// floor (a loaded machine slows some rounds, not most of them). The
/// test's own sockets have TCP_NODELAY too.
#[test]
fn small_writes_are_not_held_back_by_nagle() {
    const ROUNDS: usize = 40;
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
    let r = Relay::start(|p| argv([&format!("127.0.0.1:{}={backend}", p.pick())]));
    let mut c = connect(&format!("127.0.0.1:{}", r.port()));
    c.set_nodelay(true).unwrap();
    let mut b = [0u8; 2];
    let mut rounds: Vec<Duration> = (0..ROUNDS)
        .map(|i| {
            let t = Instant::now();
            c.write_all(b"x").unwrap();
            thread::sleep(Duration::from_millis(2));
            c.write_all(b"y").unwrap();
            c.read_exact(&mut b).unwrap_or_else(|e| panic!("round {i}: {e}\n{}", r.log()));
            assert_eq!(&b, b"ab");
            t.elapsed()
        })
        .collect();
    rounds.sort();
    let median = rounds[ROUNDS / 2];
    assert!(
        median < Duration::from_millis(40),
        "median round {median:?}: small writes were held back; rounds {rounds:?}"
    );
}
