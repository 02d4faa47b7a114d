//! Hardening, statistics: the periodic and SIGUSR1 stats lines and the
//! metrics page, with exact values.
mod common;
use common::*;

/// Milliseconds since midnight of a log line's UTC timestamp
/// (`2026-11-25T06:10:02.418Z ...`).
fn stamp_ms(line: &str) -> u64 {
    let t = line.get(11..23).unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let n = |r: std::ops::Range<usize>| t[r].parse::<u64>().unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
    ((n(0..2) * 60 + n(3..5)) * 60 + n(6..8)) * 1000 + n(9..12)
}

fn stats_tcp(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("stats tcp") && l.contains(": open ")).collect()
}

/// `--stats-interval 1s` logs totals every second (by the relay's own
/// timestamps, at least 0.9 s and well under 5 s apart).
#[test]
fn stats_interval_logs_totals_every_second() {
    let backend = echo_server("127.0.0.1:0");
    let r = Relay::cmd()
        .log("info")
        .start(|p| argv(["--stats-interval", "1s", &format!("127.0.0.1:{}={backend}", p.pick())]));
    let p = r.port();
    assert!(wait_until(PATIENCE, || stats_tcp(&r.log()).len() >= 3), "fewer than 3 stats lines:\n{}", r.log());
    let log = r.log();
    let lines = stats_tcp(&log);
    for line in &lines {
        assert!(line.contains(&format!("stats tcp 127.0.0.1:{p} -> {backend}: open 0 total 0 ")), "{line}");
    }
    for pair in lines.windows(2) {
        let gap = (stamp_ms(pair[1]) + 86_400_000 - stamp_ms(pair[0])) % 86_400_000;
        assert!((900..5000).contains(&gap), "{gap} ms between stats lines:\n{}\n{}", pair[0], pair[1]);
    }
}

/// SIGUSR1 logs the totals with exact byte and datagram counts, and
/// `--metrics` serves the same counters, on a `both:` forward.
#[test]
fn sigusr1_stats_and_metrics_count_exactly() {
    const LEN: usize = 123_457;
    const DATAGRAMS: u64 = 7;
    let q = tcp_and_udp_echo();
    let mut r = Relay::start(|p| {
        argv(["--metrics", &format!("127.0.0.1:{}", p.pick()), &format!("both:127.0.0.1:{}=127.0.0.1:{q}", p.pick())])
    });
    let (mport, port) = (r.ports[0], r.ports[1]);
    echo_once(&format!("127.0.0.1:{port}"), 10, LEN);
    r.expect_log(&format!("closed: {LEN} bytes up, {LEN} bytes down"));

    let u = udp_client("127.0.0.1:0", PATIENCE);
    let mut buf = [0u8; 256];
    for i in 0..DATAGRAMS {
        let msg = pattern(i, 100);
        u.send_to(&msg, ("127.0.0.1", port)).unwrap();
        let (n, _) = u.recv_from(&mut buf).unwrap_or_else(|e| panic!("datagram {i} not echoed: {e}"));
        assert_eq!(&buf[..n], &msg[..]);
    }

    // SIGUSR1: one line per forward and protocol, then the pipes line.
    assert_eq!(r.pipe_stats().0, 0, "no pipe lent at rest");
    let log = r.log();
    let tcp = log.lines().rev().find(|l| l.contains("stats tcp")).unwrap();
    let want = format!(
        "stats tcp 127.0.0.1:{port} -> 127.0.0.1:{q}: open 0 total 1 refused 0 denied 0 failed 0 transparent 0 \
         transparent_fallbacks 0 bytes_up {LEN} bytes_down {LEN}"
    );
    assert!(tcp.ends_with(&want), "{tcp}\nwanted it to end with {want:?}");
    let udp = log.lines().rev().find(|l| l.contains("stats udp")).unwrap();
    let want = format!(
        "stats udp 127.0.0.1:{port} -> 127.0.0.1:{q}: flows 1 flows_total 1 transparent_flows 0 transparent_fallbacks 0 \
         received_up {DATAGRAMS} \
         received_down {DATAGRAMS} sent_up {DATAGRAMS} sent_down {DATAGRAMS} bytes_sent_up {} bytes_sent_down {} \
         dropped_truncated_up 0 dropped_no_flow_up 0 dropped_send_error_up 0 dropped_send_buffer_full_up 0 dropped_denied_up 0 dropped_removed_up 0 \
         dropped_truncated_down 0 dropped_send_error_down 0 dropped_send_buffer_full_down 0",
        DATAGRAMS * 100,
        DATAGRAMS * 100
    );
    assert!(udp.ends_with(&want), "{udp}\nwanted it to end with {want:?}");

    let page = http_get(mport, "/metrics");
    assert!(page.starts_with("HTTP/1.0 200 OK\r\n"), "{page}");
    let labels = format!("{{listen=\"127.0.0.1:{port}\",target=\"127.0.0.1:{q}\"}}");
    let dir = |d: &str| format!("{{listen=\"127.0.0.1:{port}\",target=\"127.0.0.1:{q}\",direction=\"{d}\"}}");
    for want in [
        "# TYPE splice_relay_tcp_connections_total counter".to_string(),
        format!("splice_relay_tcp_connections_total{labels} 1"),
        format!("splice_relay_tcp_connections_open{labels} 0"),
        format!("splice_relay_tcp_connections_refused_total{labels} 0"),
        format!("splice_relay_tcp_connect_failures_total{labels} 0"),
        format!("splice_relay_tcp_bytes_up_total{labels} {LEN}"),
        format!("splice_relay_tcp_bytes_down_total{labels} {LEN}"),
        "# TYPE splice_relay_udp_datagrams_sent_total counter".to_string(),
        format!("splice_relay_udp_datagrams_received_total{} {DATAGRAMS}", dir("up")),
        format!("splice_relay_udp_datagrams_sent_total{} {DATAGRAMS}", dir("up")),
        format!("splice_relay_udp_datagrams_sent_total{} {DATAGRAMS}", dir("down")),
        format!("splice_relay_udp_bytes_sent_total{} {}", dir("down"), DATAGRAMS * 100),
        format!("splice_relay_udp_flows_open{labels} 1"),
        format!("splice_relay_udp_flows_total{labels} 1"),
    ] {
        assert!(page.lines().any(|l| l == want), "no line {want:?} in:\n{page}");
    }
    let pipes = page.lines().find(|l| l.starts_with("splice_relay_pipes_in_use")).unwrap_or_else(|| panic!("{page}"));
    assert!(pipes.ends_with(" 0"), "{pipes}");
    r.assert_alive();
}
