//! End-to-end tests of the UDP relay (`udp:LISTEN=TARGET`, `both:`), with the
//! real binary on loopback: one flow per client, datagram sizes, reply
//! source addresses, flow expiry and bound, a backend down then up, bad
//! options. Batching and GSO are in udp_batches.rs.
mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// 127.0.0.0/8 is all loopback on Linux; some tests use 127.0.0.2.
fn require_127_0_0_2() {
    if let Err(e) = UdpSocket::bind("127.0.0.2:0") {
        panic!("cannot bind 127.0.0.2 ({e}): this test needs 127.0.0.0/8 routed to lo, as Linux sets it up");
    }
}

/// Flows opened so far, by their debug log lines.
fn opened_flows(relay: &Relay) -> usize {
    relay.log().lines().filter(|l| l.contains("udp flow") && l.contains("opened")).count()
}

/// Waits until `n` flows were opened, and fails the test if more were.
fn assert_opened_flows(relay: &Relay, n: usize) {
    wait_until(PATIENCE, || opened_flows(relay) >= n);
    assert_eq!(opened_flows(relay), n, "flows opened; log:\n{}", relay.log());
}

#[test]
fn fifty_clients_each_get_exactly_their_own_datagrams() {
    const CLIENTS: usize = 50;
    const DATAGRAMS: usize = 200;
    let backend = udp_echo("127.0.0.1:0");
    let mut relay = Relay::start(|p| argv([&format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let to: SocketAddr = format!("127.0.0.1:{}", relay.port()).parse().unwrap();
    let resends = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let resends = resends.clone();
            thread::spawn(move || -> Result<(), String> {
                let s = udp_client("127.0.0.1:0", Duration::from_millis(100));
                let payload = |seq: usize| {
                    let mut p = format!("client={id:03} seq={seq:05} ").into_bytes();
                    p.extend(pattern((id * 100_000 + seq) as u64, 16 + (id * 7 + seq) % 300));
                    p
                };
                let mut buf = vec![0u8; 65536];
                let prefix = format!("client={id:03} ");
                for seq in 0..DATAGRAMS {
                    let want = payload(seq);
                    let mut done = false;
                    // One datagram in flight per client: nothing overflows, so
                    // a resend (after 5 s) means a datagram was lost.
                    for attempt in 0..3 {
                        if attempt > 0 {
                            resends.fetch_add(1, Ordering::Relaxed);
                        }
                        s.send_to(&want, to).map_err(|e| format!("client {id}: send: {e}"))?;
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while !done && Instant::now() < deadline {
                            let (n, from) = match s.recv_from(&mut buf) {
                                Ok(r) => r,
                                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                                Err(e) => return Err(format!("client {id}: recv: {e}")),
                            };
                            let got = &buf[..n];
                            if from != to {
                                continue; // not the relay's: a stray datagram on a shared machine
                            }
                            if !got.starts_with(prefix.as_bytes()) {
                                return Err(format!(
                                    "client {id} received another client's datagram: {:?}",
                                    String::from_utf8_lossy(&got[..got.len().min(24)])
                                ));
                            }
                            if got == want.as_slice() {
                                done = true;
                            } else if !(0..seq).any(|old| got == payload(old).as_slice()) {
                                // Not this one, not a late duplicate of an earlier one: corrupted.
                                return Err(format!("client {id} seq {seq}: unexpected {n}-byte datagram"));
                            }
                        }
                        if done {
                            break;
                        }
                    }
                    if !done {
                        return Err(format!("client {id}: no echo of seq {seq} after 3 tries"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    let errors: Vec<String> = handles.into_iter().filter_map(|h| h.join().unwrap().err()).collect();
    assert!(errors.is_empty(), "errors: {errors:#?}\nrelay log:\n{}", relay.log());
    relay.assert_alive();
    assert_opened_flows(&relay, CLIENTS); // one per client
    assert_eq!(resends.load(Ordering::Relaxed), 0, "datagrams lost on loopback");
}

#[test]
fn smallest_and_largest_ipv4_datagrams_pass_intact() {
    let (backend, sizes) = {
        let e = UdpEcho::bind("127.0.0.1:0");
        (e.addr, e.sizes)
    };
    let mut relay = Relay::start(|p| argv([&format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let port = relay.port();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = udp_client("127.0.0.1:0", Duration::from_millis(500));
    for (seed, len) in [(1u64, 1usize), (2, 65_507), (3, 1), (4, 65_507)] {
        let data = pattern(seed, len);
        assert!(round_trip(&s, to, &data).is_some(), "{len}-byte datagram not echoed; log:\n{}", relay.log());
    }
    let sizes = sizes.lock().unwrap().clone();
    assert!(sizes.iter().all(|&n| n == 1 || n == 65_507), "backend got sizes {sizes:?}");
    assert!(sizes.contains(&1) && sizes.contains(&65_507), "backend got sizes {sizes:?}");
    relay.assert_alive();
}

/// A 65,527-byte datagram (the IPv6 maximum, larger than IPv4's 65,507): the
/// relay must forward it intact or not at all, never truncated.
#[test]
fn oversized_ipv6_datagram_is_forwarded_intact_or_not_at_all() {
    const BIG: usize = 65_527;
    for backend_addr in ["[::1]:0", "127.0.0.1:0"] {
        let (backend, sizes) = {
            let e = UdpEcho::bind(backend_addr);
            (e.addr, e.sizes)
        };
        let mut relay = Relay::start(|p| argv([&format!("udp:[::1]:{}={backend}", p.pick())]));
        let port = relay.port();
        let to: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        let s = udp_client("[::1]:0", Duration::from_millis(300));
        let big = pattern(7, BIG);
        let small = pattern(8, 1000);
        let other = |d: &[u8]| Err(format!("a {}-byte reply (backend {backend})", d.len()));
        if backend.is_ipv6() {
            // Nothing in the way: IPv6 end to end, and the relay's buffer holds 65,535 bytes.
            let from = round_trip_checked(&s, to, &big, other).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(from, Some(to), "65,527 bytes not echoed intact; log:\n{}", relay.log());
        } else {
            for _ in 0..3 {
                s.send_to(&big, to).expect("send 65,527 bytes over IPv6");
            }
        }
        // The relay still works for ordinary datagrams afterwards (and no
        // other reply comes).
        let from = round_trip_checked(&s, to, &small, other).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from, Some(to), "relay stopped relaying; log:\n{}", relay.log());
        let sizes = sizes.lock().unwrap().clone();
        assert!(
            sizes.iter().all(|&n| n == BIG || n == 1000),
            "backend {backend} got a datagram of another size than was sent: {sizes:?}"
        );
        if backend.is_ipv6() {
            // Nothing in the way: IPv6 end to end, and the relay's buffer holds 65,535 bytes.
            assert!(sizes.contains(&BIG), "backend {backend} never got the 65,527-byte datagram: {sizes:?}");
        } else {
            assert!(!sizes.contains(&BIG), "an IPv4 backend cannot receive 65,527 bytes: {sizes:?}");
        }
        relay.assert_alive();
    }
}

/// A dual-stack `[::]` listener answers each client from the address it
/// sent to (IP_PKTINFO / IPV6_PKTINFO), 127.0.0.2 included.
#[test]
fn replies_come_from_the_address_the_client_sent_to() {
    let backend = udp_echo("127.0.0.1:0");
    let mut relay = Relay::start(|p| argv([&format!("udp:[::]:{}={backend}", p.pick())]));
    let port = relay.port();
    let cases = [("127.0.0.1:0", format!("127.0.0.1:{port}")), ("[::1]:0", format!("[::1]:{port}"))];
    for (i, (bind, to)) in cases.iter().enumerate() {
        let s = udp_client(bind, Duration::from_millis(500));
        let to: SocketAddr = to.parse().unwrap();
        let from = round_trip(&s, to, &pattern(i as u64, 100))
            .unwrap_or_else(|| panic!("no reply for a client sending to {to}; log:\n{}", relay.log()));
        assert_eq!(from, to, "reply source");
    }
    // 127.0.0.0/8 is all loopback on Linux: a second local address.
    require_127_0_0_2();
    let s = udp_client("127.0.0.1:0", Duration::from_millis(500));
    let to: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let from = round_trip(&s, to, b"to 127.0.0.2")
        .unwrap_or_else(|| panic!("no reply for a client sending to {to}; log:\n{}", relay.log()));
    assert_eq!(from, to, "reply to a datagram sent to 127.0.0.2 must come from 127.0.0.2");
    relay.assert_alive();
}

/// The same on an IPv4 wildcard listener (an AF_INET socket, IP_PKTINFO only).
#[test]
fn ipv4_wildcard_listener_answers_from_127_0_0_2() {
    require_127_0_0_2();
    let backend = udp_echo("127.0.0.1:0");
    let mut relay = Relay::start(|p| argv([&format!("udp:0.0.0.0:{}={backend}", p.pick())]));
    let port = relay.port();
    for (i, host) in ["127.0.0.2", "127.0.0.1", "127.0.0.2"].iter().enumerate() {
        // A new client socket (a new flow) per destination.
        let s = udp_client("0.0.0.0:0", Duration::from_millis(500));
        let to: SocketAddr = format!("{host}:{port}").parse().unwrap();
        let from = round_trip(&s, to, &pattern(i as u64, 64))
            .unwrap_or_else(|| panic!("no reply for {to}; log:\n{}", relay.log()));
        assert_eq!(from, to, "reply source");
    }
    relay.assert_alive();
}

/// One client socket (one source address and port) talking to two local
/// addresses of a wildcard listener: each reply comes from the address that
/// datagram was sent to, because a flow is keyed by the client and the local
/// address together (docker-proxy keys by client only and answers the second
/// address from the first).
#[test]
fn one_client_socket_to_two_local_addresses() {
    require_127_0_0_2();
    let backend = udp_echo("127.0.0.1:0");
    let mut relay = Relay::start(|p| argv([&format!("udp:0.0.0.0:{}={backend}", p.pick())]));
    let port = relay.port();
    let s = udp_client("0.0.0.0:0", Duration::from_millis(500));
    for (i, host) in ["127.0.0.2", "127.0.0.1"].iter().enumerate() {
        let to: SocketAddr = format!("{host}:{port}").parse().unwrap();
        let from = round_trip(&s, to, &pattern(i as u64, 64))
            .unwrap_or_else(|| panic!("no reply for {to}; log:\n{}", relay.log()));
        assert_eq!(from, to, "reply source");
    }
    relay.assert_alive();
}

/// `--udp-timeout 2s`: flows close once traffic stops; a client sending
/// every 200 ms keeps its one flow while an idle one's closes.
#[test]
fn idle_flows_expire_and_active_ones_stay() {
    let backend = udp_echo("127.0.0.1:0");
    let mut relay = Relay::start(|p| argv(["--udp-timeout", "2s", &format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let port = relay.port();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let baseline = relay.fds().sockets;
    assert!(baseline >= 1, "the relay has no socket? {:?}", relay.fds());
    let clients: Vec<UdpSocket> = (0..3).map(|_| udp_client("127.0.0.1:0", Duration::from_millis(500))).collect();
    for (i, c) in clients.iter().enumerate() {
        assert!(round_trip(c, to, &pattern(i as u64, 50)).is_some(), "no echo; log:\n{}", relay.log());
        assert_eq!(relay.fds().sockets, baseline + i + 1, "one socket per flow");
    }
    // Traffic stopped: the flows close.
    let t = Instant::now();
    assert!(
        wait_until(PATIENCE, || relay.fds().sockets == baseline),
        "flows not closed after traffic stopped: {:?} (baseline {baseline}); log:\n{}",
        relay.fds(),
        relay.log()
    );
    assert!(t.elapsed() >= Duration::from_millis(1500), "flows closed {:?} after traffic stopped", t.elapsed());
    assert_opened_flows(&relay, 3);

    // One active client (a datagram every 200 ms) and one idle one, until
    // the idle one's flow has closed.
    let active = &clients[0];
    assert!(round_trip(&clients[1], to, b"idle").is_some());
    let idle_since = Instant::now();
    let mut n = 0u64;
    let idle_closed = wait_until(Duration::from_secs(20), || {
        assert!(round_trip(active, to, &pattern(100 + n, 40)).is_some(), "active client lost service");
        n += 1;
        thread::sleep(Duration::from_millis(200));
        relay.fds().sockets == baseline + 1
    });
    assert!(idle_closed, "the idle flow stayed open: {:?}; log:\n{}", relay.fds(), relay.log());
    let idle = idle_since.elapsed();
    assert!(idle >= Duration::from_millis(1500), "the idle flow closed {idle:?} after its last datagram");
    // The active client kept its one flow: exactly two new flows were opened.
    assert_opened_flows(&relay, 3 + 2);
    relay.expect_log("idle; closed");
    relay.assert_alive();
}

#[test]
fn flow_table_is_bounded_and_new_clients_still_get_service() {
    const MAX: usize = 5;
    let backend = udp_echo("127.0.0.1:0");
    let mut relay = Relay::start(|p| argv(["--udp-max-flows", "5", &format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let port = relay.port();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let baseline = relay.fds().sockets;
    // A sampler reads the relay's socket count all along.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, samples) = (stop.clone(), samples.clone());
        let pid = relay.pid();
        thread::spawn(move || {
            let mut max = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let fds = fds_of(pid);
                if fds.total > 0 {
                    max = max.max(fds.sockets);
                    samples.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(1));
            }
            max
        })
    };
    // On a loaded machine the sampler may start late: wait for its first read.
    assert!(wait_until(PATIENCE, || samples.load(Ordering::Relaxed) > 0), "the sampler never read the relay's fds");
    let clients: Vec<UdpSocket> = (0..20).map(|_| udp_client("127.0.0.1:0", Duration::from_millis(500))).collect();
    for (i, c) in clients.iter().enumerate() {
        assert!(round_trip(c, to, &pattern(i as u64, 80)).is_some(), "client {i}: no echo; log:\n{}", relay.log());
        let now = relay.fds().sockets;
        assert!(now <= baseline + MAX, "client {i}: {now} sockets, baseline {baseline}, at most {MAX} flows");
        assert_eq!(now, baseline + (i + 1).min(MAX), "client {i}");
    }
    // A new client, and the first (evicted) one, still get service.
    let late = udp_client("127.0.0.1:0", Duration::from_millis(500));
    assert!(round_trip(&late, to, b"late client").is_some(), "new client not served; log:\n{}", relay.log());
    assert!(round_trip(&clients[0], to, b"evicted client").is_some(), "evicted client not served again");
    assert_eq!(relay.fds().sockets, baseline + MAX);
    // One more read after the last client, then stop.
    let so_far = samples.load(Ordering::Relaxed);
    assert!(wait_until(PATIENCE, || samples.load(Ordering::Relaxed) > so_far), "the sampler stopped reading");
    stop.store(true, Ordering::Relaxed);
    let max = sampler.join().unwrap();
    // The least recently used flow is closed before the new flow's socket
    // is opened: never one more, not even for an instant. (The exact counts
    // after each client are asserted above; a loaded machine may starve the
    // sampler of the moments at the bound, never of a moment over it.)
    assert!(max <= baseline + MAX, "sampled {max} sockets, baseline {baseline}, --udp-max-flows {MAX}");
    relay.expect_log("least recently used flow closed");
    relay.assert_alive();
}

#[test]
fn flow_survives_backend_down_then_up() {
    // A port nobody receives on (yet): datagrams to it draw ICMP port unreachable.
    let held = HeldPort::new();
    let backend = held.addr();
    let mut relay = Relay::start(|p| argv([&format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let port = relay.port();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = udp_client("127.0.0.1:0", Duration::from_millis(300));
    for i in 0..3 {
        s.send_to(format!("into the void {i}").as_bytes(), to).unwrap();
    }
    assert_eq!(recv_any(&s, Duration::from_millis(500)), None, "a reply with no backend?");
    relay.assert_alive();

    UdpEcho::serve(held.udp_socket());
    let mut reply = None;
    let mut i = 0;
    wait_until(PATIENCE, || {
        s.send_to(format!("second {i}").as_bytes(), to).unwrap();
        reply = recv_any(&s, Duration::from_millis(200));
        i += 1;
        reply.is_some()
    });
    let (got, from) = reply.unwrap_or_else(|| panic!("no reply after the backend came up; log:\n{}", relay.log()));
    assert!(got.starts_with(b"second "), "unexpected reply {:?}", String::from_utf8_lossy(&got));
    assert_eq!(from, to);
    relay.assert_alive();
    assert_opened_flows(&relay, 1); // the client's flow was kept
}

/// iperf3-like: a TCP control connection and UDP datagrams on the same port.
#[test]
fn both_relays_tcp_and_udp_on_one_port() {
    let q = tcp_and_udp_echo();
    let mut relay = Relay::start(|p| argv([&format!("both:127.0.0.1:{}=127.0.0.1:{q}", p.pick())]));
    let port = relay.port();
    let mut control = connect(&format!("127.0.0.1:{port}"));
    control.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 64];
    control.write_all(b"hello, control").unwrap();
    control.read_exact(&mut buf[..14]).unwrap();
    assert_eq!(&buf[..14], b"hello, control");

    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = udp_client("127.0.0.1:0", Duration::from_millis(500));
    for i in 0..100u64 {
        let from = round_trip(&s, to, &pattern(i, 1200))
            .unwrap_or_else(|| panic!("datagram {i} not echoed; log:\n{}", relay.log()));
        assert_eq!(from, to);
        if i % 25 == 0 {
            let msg = format!("status {i:03}");
            control.write_all(msg.as_bytes()).unwrap();
            control.read_exact(&mut buf[..msg.len()]).unwrap();
            assert_eq!(&buf[..msg.len()], msg.as_bytes());
        }
    }
    control.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    control.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "extra bytes on the control connection: {rest:?}");
    relay.assert_alive();
}

#[test]
fn bad_udp_options_exit_2_with_a_message() {
    let (code, err) = run_to_exit(&["udp:127.0.0.1:0=127.0.0.1:1"]);
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("out of range") && err.contains("listen port"), "stderr: {err}");

    let port = free_port().to_string();
    let fwd = format!("udp:127.0.0.1:{port}=127.0.0.1:1");
    let (code, err) = run_to_exit(&["--udp-max-flows", "0", &fwd]);
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("--udp-max-flows must be at least 1"), "stderr: {err}");

    let (code, err) = run_to_exit(&["--udp-timeout", "5x", &fwd]);
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("--udp-timeout") && err.contains("5x") && err.contains("unit"), "stderr: {err}");

    let (code, err) = run_to_exit(&["--udp-timeout", "0s", &fwd]);
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("--udp-timeout must be more than 0"), "stderr: {err}");

    let (code, err) = run_to_exit(&["udp:::1:53=127.0.0.1:53"]);
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("brackets"), "stderr: {err}");
}

/// IPv4 clients of a dual-stack `[::]` listener whose first datagrams arrive
/// together (one recvmmsg batch) must all get replies.
#[test]
fn ipv4_clients_of_a_dual_stack_listener_arriving_together() {
    const CLIENTS: usize = 32;
    let backend = udp_echo("127.0.0.1:0");
    let mut relay = Relay::start(|p| argv([&format!("udp:[::]:{}={backend}", p.pick())]));
    let port = relay.port();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let clients: Vec<UdpSocket> = (0..CLIENTS).map(|_| udp_client("127.0.0.1:0", Duration::from_millis(300))).collect();
    for (i, c) in clients.iter().enumerate() {
        c.send_to(&pattern(i as u64, 100), to).unwrap();
    }
    // Each client then makes sure of a round trip, in parallel.
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| thread::spawn(move || round_trip(&c, to, &pattern(1000 + i as u64, 100))))
        .collect();
    let mut unanswered = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().unwrap() {
            Some(from) => assert_eq!(from, to, "client {i}: reply source"),
            None => unanswered.push(i),
        }
    }
    assert!(unanswered.is_empty(), "clients without replies: {unanswered:?}; log:\n{}", relay.log());
    relay.assert_alive();
}
