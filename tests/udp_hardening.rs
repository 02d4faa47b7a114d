//! Hardening, UDP: a flood of sources against the flow bound, flows
//! evicted within one batch, replies late for evicted flows; a datagram
//! never reaches another client.
mod common;
use common::*;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// Samples the relay's socket count until `stop` (at most 60 s); returns
/// (the most seen, samples taken).
fn socket_sampler(pid: u32, stop: Arc<AtomicBool>) -> thread::JoinHandle<(usize, usize)> {
    thread::spawn(move || {
        let (mut max, mut samples) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            max = max.max(fds_of(pid).sockets);
            samples += 1;
            thread::sleep(Duration::from_micros(200));
        }
        (max, samples)
    })
}

/// Reads every datagram waiting on `s` (non-blocking); each from `relay`
/// must be `own`, else it is reported in `wrong` (datagrams from elsewhere
/// are not the relay's and are skipped). Returns how many came from `relay`.
fn drain_own(s: &UdpSocket, relay: SocketAddr, own: &[u8], who: &str, wrong: &mut Vec<String>) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    let mut n = 0;
    loop {
        match s.recv_from(&mut buf) {
            Ok((_, from)) if from != relay => {}
            Ok((len, _)) => {
                n += 1;
                if buf[..len] != own[..] {
                    wrong.push(format!("{who} got {:?}", String::from_utf8_lossy(&buf[..len])));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{who}: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    n
}

/// A UDP flood from 1,000 client sockets (40 of them on 127.0.0.2-9) with
/// `--udp-max-flows 50`: the relay holds exactly 50 flow sockets at most
/// (sampled all along), nobody gets another client's datagram, and then
/// every client, one by one, is served its own datagram again. Under load
/// the backend's replies lag behind evictions, so this also depends on the
/// ports of closed flows being held back (see
/// `late_replies_to_evicted_flows_never_reach_other_clients`).
#[test]
fn udp_flood_from_a_thousand_sources_stays_within_the_flow_bound() {
    const MAX: usize = 50;
    const CLIENTS: usize = 1000;
    let backend = udp_echo("127.0.0.1:0");
    let mut r = Relay::cmd()
        .log("info")
        .start(|p| argv(["--udp-max-flows", "50", &format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let to: SocketAddr = format!("127.0.0.1:{}", r.port()).parse().unwrap();
    let base = r.fds().sockets;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = socket_sampler(r.pid(), stop.clone());
    let clients: Vec<(UdpSocket, Vec<u8>)> = (0..CLIENTS)
        .map(|i| {
            let ip = if i < 40 { format!("127.0.0.{}", 2 + i % 8) } else { "127.0.0.1".to_string() };
            let s = UdpSocket::bind((ip.as_str(), 0))
                .unwrap_or_else(|e| panic!("bind {ip}: {e} (127.0.0.0/8 must be routed to lo)"));
            (s, format!("client {i:04} from {ip}").into_bytes())
        })
        .collect();
    // Three rounds, in bursts of 20 a millisecond apart (so the backend's
    // receive buffer keeps up).
    for _round in 0..3 {
        for burst in clients.chunks(20) {
            for (s, msg) in burst {
                s.send_to(msg, to).unwrap();
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
    // Then each client in turn: its own datagram again, which must come
    // back; anything else it receives must be its own, too.
    let mut wrong = Vec::new();
    let mut flood_replies = 0;
    for (i, (s, msg)) in clients.iter().enumerate() {
        flood_replies += drain_own(s, to, msg, &format!("client {i}"), &mut wrong);
        let again = [msg.as_slice(), b" again"].concat();
        let got = round_trip_checked(s, to, &again, |d| {
            if d == msg.as_slice() {
                flood_replies += 1;
                Ok(())
            } else {
                Err(format!("client {i} got {:?}", String::from_utf8_lossy(d)))
            }
        });
        match got {
            Ok(Some(from)) => assert_eq!(from, to, "client {i}: reply source"),
            Ok(None) => panic!("client {i} not served after the flood\n{}", tail(&r.log(), 20)),
            Err(e) => wrong.push(e),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (max, samples) = sampler.join().unwrap();
    assert!(
        wrong.is_empty(),
        "{} datagrams went to the wrong client, e.g.:\n{}",
        wrong.len(),
        wrong.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    // The flows open at the end got their replies at least.
    assert!(flood_replies > 0, "no reply at all during the flood");
    assert!(samples >= 50, "only {samples} samples");
    assert_eq!(max, base + MAX, "sampled at most {max} sockets: baseline {base} + {MAX} flows expected");
    assert_eq!(r.fds().sockets, base + MAX, "a full flow table at the end");
    r.assert_alive();
}

/// Datagrams read in one batch from more new clients than the flow table
/// holds (24 clients, `--udp-max-flows 4`): a flow evicted within the batch
/// must not carry its datagram out through the flow that took its slot.
/// The last 4 clients' flows outlive the batch: each gets its own reply.
/// Then every client, one by one, gets its own reply.
#[test]
fn udp_flows_evicted_within_one_batch_never_cross_clients() {
    const CLIENTS: usize = 24;
    const MAX: usize = 4;
    let backend = udp_echo("127.0.0.1:0");
    let mut r = Relay::start(|p| argv(["--udp-max-flows", "4", &format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let to: SocketAddr = format!("127.0.0.1:{}", r.port()).parse().unwrap();
    // Stopped, the relay lets 24 clients' datagrams queue up, then reads them together.
    r.stop();
    let clients: Vec<(UdpSocket, Vec<u8>)> = (0..CLIENTS)
        .map(|i| (udp_client("127.0.0.1:0", PATIENCE), format!("datagram of client {i:02}").into_bytes()))
        .collect();
    for (s, msg) in &clients {
        s.send_to(msg, to).unwrap();
    }
    r.signal(SIGCONT);
    let mut wrong = Vec::new();
    let mut buf = [0u8; 2048];
    for (i, (s, msg)) in clients.iter().enumerate().skip(CLIENTS - MAX) {
        let n = loop {
            match s.recv_from(&mut buf) {
                Ok((n, from)) if from == to => break n,
                Ok(_) => {} // not the relay's
                Err(e) => panic!("client {i} (its flow outlives the batch) got no reply: {e}\n{}", tail(&r.log(), 40)),
            }
        };
        if buf[..n] != msg[..] {
            wrong.push(format!("client {i:02} got {:?}", String::from_utf8_lossy(&buf[..n])));
        }
    }
    for (i, (s, msg)) in clients.iter().enumerate() {
        drain_own(s, to, msg, &format!("client {i:02}"), &mut wrong);
    }
    assert!(
        wrong.is_empty(),
        "datagrams delivered to the wrong client:\n{}\nrelay log:\n{}",
        wrong.join("\n"),
        tail(&r.log(), 40)
    );
    for (i, (s, msg)) in clients.iter().enumerate() {
        let again = [msg.as_slice(), b" again"].concat();
        let own = |d: &[u8]| if d == msg.as_slice() { Ok(()) } else { Err(format!("client {i:02} got {d:?}")) };
        let from = round_trip_checked(s, to, &again, own).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from, Some(to), "client {i:02} not served again\n{}", tail(&r.log(), 20));
    }
    r.assert_alive();
}

/// A UDP backend echoing each datagram `delay` after it came; counts the
/// replies it sent.
fn delayed_udp_echo(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    let out = s.try_clone().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let count = sent.clone();
    let (tx, rx) = mpsc::channel::<(Vec<u8>, SocketAddr, Instant)>();
    thread::spawn(move || {
        for (d, to, at) in rx {
            thread::sleep((at + delay).saturating_duration_since(Instant::now()));
            let _ = out.send_to(&d, to);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = tx.send((buf[..n].to_vec(), from, Instant::now()));
        }
    });
    (addr, sent)
}

/// 3,000 clients send one datagram each to a backend that answers a second
/// later; with `--udp-max-flows 500` each flow is evicted before its reply
/// comes. The late reply reaches the flow's old ephemeral port; no client
/// may get it. Before the relay held closed flows' ports back from new
/// flows, a newer flow socket given the same port received it and the relay
/// sent it to that flow's client: 38-60 of ~550 replies crossed per run.
#[test]
fn late_replies_to_evicted_flows_never_reach_other_clients() {
    const CLIENTS: usize = 3000;
    let (backend, replied) = delayed_udp_echo(Duration::from_secs(1));
    let r = Relay::cmd()
        .log("info")
        .start(|p| argv(["--udp-max-flows", "500", &format!("udp:127.0.0.1:{}={backend}", p.pick())]));
    let to: SocketAddr = format!("127.0.0.1:{}", r.port()).parse().unwrap();
    let clients: Vec<(UdpSocket, Vec<u8>)> =
        (0..CLIENTS).map(|i| (udp_client("127.0.0.1:0", PATIENCE), format!("client {i:04}").into_bytes())).collect();
    for burst in clients.chunks(20) {
        for (s, msg) in burst {
            s.send_to(msg, to).unwrap();
        }
        thread::sleep(Duration::from_millis(1));
    }
    // Every reply sent (or, if the loaded machine dropped some datagrams on
    // the way, the count steady for a second).
    let mut last = (usize::MAX, Instant::now());
    let settled = wait_until(Duration::from_secs(60), || {
        let n = replied.load(Ordering::SeqCst);
        if n != last.0 {
            last = (n, Instant::now());
        }
        n == CLIENTS || (n > 0 && last.1.elapsed() > Duration::from_secs(2))
    });
    assert!(settled, "the backend sent {} replies and was still going after 60 s", replied.load(Ordering::SeqCst));
    // Read until nothing more arrives for half a second.
    let (mut received, mut wrong) = (0, Vec::new());
    let mut quiet_since = Instant::now();
    wait_until(PATIENCE, || {
        for (i, (s, msg)) in clients.iter().enumerate() {
            let n = drain_own(s, to, msg, &format!("client {i:04}"), &mut wrong);
            if n > 0 {
                received += n;
                quiet_since = Instant::now();
            }
        }
        quiet_since.elapsed() > Duration::from_millis(500)
    });
    assert!(
        wrong.is_empty(),
        "{} of {} replies went to the wrong client, e.g.:\n{}",
        wrong.len(),
        received,
        wrong.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(received > 0, "no reply at all");
}
