//! End-to-end tests of the UDP counters, with the real binary on loopback:
//! datagrams received, sent and dropped (by reason) and bytes sent, in each
//! direction, exactly as the stats line (SIGUSR1) and the metrics page show
//! them.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::Duration;

/// The largest IPv6 UDP payload: fits IPv6, but no IPv4 socket can send it
/// (EMSGSIZE), which makes a send error that happens every time.
const TOO_BIG_FOR_IPV4: usize = 65_527;

/// A UDP socket bound to `addr`, waiting at most 10 s for a datagram.
fn socket(addr: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `payload` to `to` once and expects `reply` back.
fn exchange(s: &UdpSocket, to: SocketAddr, payload: &[u8], reply: &[u8], r: &Relay) {
    s.send_to(payload, to).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = s.recv_from(&mut buf).unwrap_or_else(|e| panic!("no reply to a datagram: {e}\n{}", r.log()));
    assert!(&buf[..n] == reply, "reply of {n} bytes differs\n{}", r.log());
}

/// An IPv6 backend that echoes each datagram, except `big`: that one it
/// answers with a 65,527-byte datagram and then `after`.
fn big_reply_backend() -> SocketAddr {
    let s = UdpSocket::bind("[::1]:0").expect("bind [::1]:0");
    let addr = s.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if &buf[..n] == b"big" {
                let _ = s.send_to(&pattern(9, TOO_BIG_FOR_IPV4), from);
                let _ = s.send_to(b"after", from);
            } else {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });
    addr
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = connect(&format!("127.0.0.1:{port}"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page
}

/// The values one forward's counters must have, in stats-line order.
struct Want {
    flows: u64,
    flows_total: u64,
    /// (up, down) each.
    received: (u64, u64),
    sent: (u64, u64),
    bytes_sent: (u64, u64),
    send_error: (u64, u64),
}

impl Want {
    fn stats_line(&self, listen: &str, target: SocketAddr) -> String {
        format!(
            "stats udp {listen} -> {target}: flows {} flows_total {} transparent_flows 0 transparent_fallbacks 0 \
             received_up {} received_down {} \
             sent_up {} sent_down {} bytes_sent_up {} bytes_sent_down {} dropped_truncated_up 0 \
             dropped_no_flow_up 0 dropped_send_error_up {} dropped_send_buffer_full_up 0 dropped_denied_up 0 dropped_removed_up 0 \
             dropped_truncated_down 0 dropped_send_error_down {} dropped_send_buffer_full_down 0",
            self.flows,
            self.flows_total,
            self.received.0,
            self.received.1,
            self.sent.0,
            self.sent.1,
            self.bytes_sent.0,
            self.bytes_sent.1,
            self.send_error.0,
            self.send_error.1,
        )
    }

    fn page_lines(&self, listen: &str, target: SocketAddr) -> Vec<String> {
        let l = format!("listen=\"{listen}\",target=\"{target}\"");
        let mut v = vec![
            format!("splice_relay_udp_flows_open{{{l}}} {}", self.flows),
            format!("splice_relay_udp_flows_total{{{l}}} {}", self.flows_total),
        ];
        for (dir, k) in [("up", 0), ("down", 1)] {
            let pick = |p: (u64, u64)| if k == 0 { p.0 } else { p.1 };
            v.push(format!(
                "splice_relay_udp_datagrams_received_total{{{l},direction=\"{dir}\"}} {}",
                pick(self.received)
            ));
            v.push(format!("splice_relay_udp_datagrams_sent_total{{{l},direction=\"{dir}\"}} {}", pick(self.sent)));
            v.push(format!("splice_relay_udp_bytes_sent_total{{{l},direction=\"{dir}\"}} {}", pick(self.bytes_sent)));
            let dropped = |reason: &str, n: u64| {
                format!("splice_relay_udp_datagrams_dropped_total{{{l},direction=\"{dir}\",reason=\"{reason}\"}} {n}")
            };
            v.push(dropped("truncated", 0));
            v.push(dropped("send_error", pick(self.send_error)));
            v.push(dropped("send_buffer_full", 0));
            if dir == "up" {
                v.push(dropped("no_flow", 0));
            }
        }
        v
    }
}

/// Two forwards, each with one datagram that cannot be sent on:
/// - `[::1]` clients to an IPv4 backend: 5 datagrams of 100 bytes echoed,
///   one of 65,527 bytes (the IPv4 send fails: dropped up, `send_error`),
///   then one more of 100 bytes echoed, whose echo shows the big one was
///   dealt with;
/// - IPv4 clients of a dual-stack `[::]` listener to an IPv6 backend: 3
///   datagrams of 50 bytes echoed, then `big`, which the backend answers
///   with 65,527 bytes (too big for the IPv4 client: dropped down,
///   `send_error`) and then `after`, which arrives.
#[test]
fn udp_counters_count_received_sent_and_dropped_exactly() {
    let backend_a = udp_echo("127.0.0.1:0");
    let backend_b = big_reply_backend();
    let mut r = Relay::start(|ports| {
        argv([
            "--metrics",
            &format!("127.0.0.1:{}", ports.pick()),
            &format!("udp:[::1]:{}={backend_a}", ports.pick()),
            &format!("udp:[::]:{}={backend_b}", ports.pick()),
        ])
    });
    let (m, pa, pb) = (r.ports[0], r.ports[1], r.ports[2]);
    assert!(r.child.try_wait().unwrap().is_none(), "relay did not start:\n{}", r.log());

    let a = socket("[::1]:0");
    let to_a: SocketAddr = format!("[::1]:{pa}").parse().unwrap();
    for i in 0..5 {
        let d = pattern(i, 100);
        exchange(&a, to_a, &d, &d, &r);
    }
    a.send_to(&pattern(5, TOO_BIG_FOR_IPV4), to_a).expect("send 65,527 bytes over IPv6");
    let d = pattern(6, 100);
    exchange(&a, to_a, &d, &d, &r);

    let b = socket("127.0.0.1:0");
    let to_b: SocketAddr = format!("127.0.0.1:{pb}").parse().unwrap();
    for i in 0..3 {
        let d = pattern(10 + i, 50);
        exchange(&b, to_b, &d, &d, &r);
    }
    exchange(&b, to_b, b"big", b"after", &r);

    let want_a =
        Want { flows: 1, flows_total: 1, received: (7, 6), sent: (6, 6), bytes_sent: (600, 600), send_error: (1, 0) };
    let want_b =
        Want { flows: 1, flows_total: 1, received: (4, 5), sent: (4, 4), bytes_sent: (153, 155), send_error: (0, 1) };
    let (listen_a, listen_b) = (format!("[::1]:{pa}"), format!("[::]:{pb}"));

    let page = http_get(m, "/metrics");
    assert!(page.starts_with("HTTP/1.0 200 OK\r\n"), "{page}");
    for want in want_a.page_lines(&listen_a, backend_a).into_iter().chain(want_b.page_lines(&listen_b, backend_b)) {
        assert!(page.lines().any(|l| l == want), "no line {want:?} in:\n{page}");
    }
    for name in ["udp_datagrams_received_total", "udp_datagrams_sent_total", "udp_datagrams_dropped_total"] {
        assert!(page.contains(&format!("\n# TYPE splice_relay_{name} counter\n")), "no TYPE for {name}:\n{page}");
    }

    r.signal(10); // SIGUSR1
    let stats_udp = |log: &str| log.lines().filter(|l| l.contains(" stats udp ")).count();
    assert!(wait_until(Duration::from_secs(10), || stats_udp(&r.log()) == 2), "no stats lines:\n{}", r.log());
    let log = r.log();
    for want in [want_a.stats_line(&listen_a, backend_a), want_b.stats_line(&listen_b, backend_b)] {
        assert!(log.lines().any(|l| l.ends_with(&want)), "no line ending {want:?} in:\n{log}");
    }
    assert!(r.child.try_wait().unwrap().is_none(), "relay exited:\n{log}");
}
