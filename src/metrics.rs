//! Statistics: the periodic/SIGUSR1 log line and a Prometheus text endpoint
//! served from the same event loop.

mod http;
mod server;

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::tcp::TcpRelay;
use crate::udp::UdpRelay;
pub use server::Metrics;

/// One statistic, described once: the stats line and the Prometheus page
/// are both written from these tables, so they cannot disagree.
struct Stat<R: 'static> {
    /// Prometheus name, after `splice_relay_`.
    name: &'static str,
    /// Prometheus type: `counter` (only grows) or `gauge` (a level now).
    kind: &'static str,
    /// What it counts and how to read it (the page's HELP line).
    help: &'static str,
    /// Its series (one without labels, or one per direction and reason).
    series: &'static [Series<R>],
}

/// One series of a statistic.
struct Series<R> {
    /// Labels beside `listen` and `target`, e.g. `direction="up"`.
    labels: &'static str,
    /// Its word on the stats line.
    key: &'static str,
    /// Its value for listener `i` (process-wide statistics ignore `i`).
    read: fn(&R, usize) -> u64,
}

/// The one series of a statistic without labels.
macro_rules! one {
    ($key:literal, $read:expr) => {
        &[Series { labels: "", key: $key, read: $read }]
    };
}

/// Per TCP listener.
const TCP_STATS: &[Stat<TcpRelay>] = &[
    Stat {
        name: "tcp_connections_open",
        kind: "gauge",
        help: "TCP connections open now.",
        series: one!("open", |t, i| t.listeners[i].stats.open),
    },
    Stat {
        name: "tcp_connections_total",
        kind: "counter",
        help: "TCP connections accepted.",
        series: one!("total", |t, i| t.listeners[i].stats.total),
    },
    Stat {
        name: "tcp_connections_refused_total",
        kind: "counter",
        help: "TCP clients refused (untrusted PROXY sender, per-source limit).",
        series: one!("refused", |t, i| t.listeners[i].stats.refused),
    },
    Stat {
        name: "tcp_connect_failures_total",
        kind: "counter",
        help: "Backend connects that failed or timed out.",
        series: one!("failed", |t, i| t.listeners[i].stats.failed),
    },
    Stat {
        name: "tcp_transparent_connections_total",
        kind: "counter",
        help: "Backend connects made from the client's own address (--transparent).",
        series: one!("transparent", |t, i| t.listeners[i].stats.transparent),
    },
    Stat {
        name: "tcp_transparent_fallbacks_total",
        kind: "counter",
        help: "Connections of a transparent forward that used the relay's address: \
               client and backend differ in address family.",
        series: one!("transparent_fallbacks", |t, i| t.listeners[i].stats.transparent_fallbacks),
    },
    Stat {
        name: "tcp_bytes_up_total",
        kind: "counter",
        help: "Bytes client to backend, open connections included.",
        series: one!("bytes_up", |t, i| t.listeners[i].stats.bytes_up + t.live_bytes(i).0),
    },
    Stat {
        name: "tcp_bytes_down_total",
        kind: "counter",
        help: "Bytes backend to client, open connections included.",
        series: one!("bytes_down", |t, i| t.listeners[i].stats.bytes_down + t.live_bytes(i).1),
    },
];

/// The series of a UDP per-direction statistic: up, then down.
macro_rules! up_down {
    ($key:literal, $field:ident) => {
        &[
            Series {
                labels: r#"direction="up""#,
                key: concat!($key, "_up"),
                read: |u, i| u.listeners[i].stats.up.$field,
            },
            Series {
                labels: r#"direction="down""#,
                key: concat!($key, "_down"),
                read: |u, i| u.listeners[i].stats.down.$field,
            },
        ]
    };
}

/// A series of UDP datagrams dropped in one direction for one reason.
macro_rules! dropped {
    ($dir:ident, $reason:ident, $name:literal) => {
        Series {
            labels: concat!(r#"direction=""#, stringify!($dir), r#"",reason=""#, $name, '"'),
            key: concat!("dropped_", $name, "_", stringify!($dir)),
            read: |u, i| u.listeners[i].stats.$dir.dropped(crate::stats::DropReason::$reason),
        }
    };
}

/// Per UDP listener.
const UDP_STATS: &[Stat<UdpRelay>] = &[
    Stat {
        name: "udp_flows_open",
        kind: "gauge",
        help: "UDP flows (clients with a socket to the backend) open now.",
        series: one!("flows", |u, i| u.flows_of(i) as u64),
    },
    Stat {
        name: "udp_flows_total",
        kind: "counter",
        help: "UDP flows opened.",
        series: one!("flows_total", |u, i| u.listeners[i].stats.flows_total),
    },
    Stat {
        name: "udp_transparent_flows_total",
        kind: "counter",
        help: "UDP flows whose socket sends from the client's own address and port (--transparent).",
        series: one!("transparent_flows", |u, i| u.listeners[i].stats.flows_transparent),
    },
    Stat {
        name: "udp_transparent_fallbacks_total",
        kind: "counter",
        help: "UDP flows of a transparent forward that send from the relay's address: \
               client and backend differ in address family.",
        series: one!("transparent_fallbacks", |u, i| u.listeners[i].stats.transparent_fallbacks),
    },
    Stat {
        name: "udp_datagrams_received_total",
        kind: "counter",
        help: "UDP datagrams received, direction up from clients, down from the backend. \
               Each is then sent or dropped: received = sent + dropped.",
        series: up_down!("received", received),
    },
    Stat {
        name: "udp_datagrams_sent_total",
        kind: "counter",
        help: "UDP datagrams the kernel accepted to send, direction up to the backend, down to clients.",
        series: up_down!("sent", sent),
    },
    Stat {
        name: "udp_bytes_sent_total",
        kind: "counter",
        help: "Payload bytes of the UDP datagrams sent (PROXY headers not counted).",
        series: up_down!("bytes_sent", bytes_sent),
    },
    Stat {
        name: "udp_datagrams_dropped_total",
        kind: "counter",
        help: "UDP datagrams received but not sent, by reason: truncated (larger than the 64 KiB buffer), \
               no_flow (no flow socket could be opened), send_error (the send failed, e.g. EMSGSIZE: \
               too large for the other side's address family), send_buffer_full (EAGAIN).",
        series: &[
            dropped!(up, Truncated, "truncated"),
            dropped!(up, NoFlow, "no_flow"),
            dropped!(up, SendError, "send_error"),
            dropped!(up, SendBufferFull, "send_buffer_full"),
            dropped!(down, Truncated, "truncated"),
            dropped!(down, SendError, "send_error"),
            dropped!(down, SendBufferFull, "send_buffer_full"),
        ],
    },
];

/// For the whole process.
const PROCESS_STATS: &[Stat<TcpRelay>] = &[
    Stat {
        name: "pipes_in_use",
        kind: "gauge",
        help: "Pipes lent to TCP connections (bytes in flight).",
        series: one!("in_use", |t, _| t.pool.lent() as u64),
    },
    Stat {
        name: "pipes_spare",
        kind: "gauge",
        help: "Empty pipes kept for reuse.",
        series: one!("spare", |t, _| t.pool.spare() as u64),
    },
];

/// Appends ` key value` for each series of `stats` for listener `i`.
fn line_fields<R>(out: &mut String, stats: &[Stat<R>], r: &R, i: usize) {
    for s in stats.iter().flat_map(|s| s.series) {
        let _ = write!(out, " {} {}", s.key, (s.read)(r, i));
    }
}

/// Appends each statistic of `stats` in the Prometheus text format, one
/// row per series and listener (`labels[i]` names listener `i`).
fn page_rows<R>(out: &mut String, stats: &[Stat<R>], r: &R, labels: &[String]) {
    for st in stats {
        let _ =
            writeln!(out, "# HELP splice_relay_{} {}\n# TYPE splice_relay_{} {}", st.name, st.help, st.name, st.kind);
        for (i, base) in labels.iter().enumerate() {
            for s in st.series {
                let v = (s.read)(r, i);
                let _ = match (base.is_empty(), s.labels.is_empty()) {
                    (true, true) => writeln!(out, "splice_relay_{} {v}", st.name),
                    (false, false) => writeln!(out, "splice_relay_{}{{{base},{}}} {v}", st.name, s.labels),
                    _ => writeln!(out, "splice_relay_{}{{{base}{}}} {v}", st.name, s.labels),
                };
            }
        }
    }
}

/// One log line per forward, and one for the pipes.
pub fn stats_lines(tcp: &TcpRelay, udp: &UdpRelay) -> Vec<String> {
    let mut out = Vec::new();
    for (i, l) in tcp.listeners.iter().enumerate() {
        let mut line = format!("stats tcp {} -> {}:", l.addr, l.route.target);
        line_fields(&mut line, TCP_STATS, tcp, i);
        out.push(line);
    }
    for (i, l) in udp.listeners.iter().enumerate() {
        let mut line = format!("stats udp {} -> {}:", l.addr, l.target);
        line_fields(&mut line, UDP_STATS, udp, i);
        out.push(line);
    }
    let mut line = String::from("stats pipes");
    line_fields(&mut line, PROCESS_STATS, tcp, 0);
    out.push(line);
    out
}

/// The same statistics in the Prometheus text exposition format.
pub fn prometheus(tcp: &TcpRelay, udp: &UdpRelay) -> String {
    let listen = |addr: SocketAddr, target: SocketAddr| format!("listen=\"{addr}\",target=\"{target}\"");
    let mut o = String::new();
    let tl: Vec<String> = tcp.listeners.iter().map(|l| listen(l.addr, l.route.target)).collect();
    page_rows(&mut o, TCP_STATS, tcp, &tl);
    let ul: Vec<String> = udp.listeners.iter().map(|l| listen(l.addr, l.target)).collect();
    page_rows(&mut o, UDP_STATS, udp, &ul);
    page_rows(&mut o, PROCESS_STATS, tcp, &[String::new()]);
    o
}
