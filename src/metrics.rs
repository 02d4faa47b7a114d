//! Statistics: the periodic/SIGUSR1 log line and a Prometheus text endpoint
//! served from the same event loop.

mod http;
mod server;

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::shared::Published;
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
        help: "TCP clients refused (untrusted PROXY sender, per-source limit, access lists).",
        series: one!("refused", |t, i| t.listeners[i].stats.refused),
    },
    Stat {
        name: "tcp_connections_denied_total",
        kind: "counter",
        help: "TCP clients refused by the access lists (also counted as refused).",
        series: one!("denied", |t, i| t.listeners[i].stats.denied),
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
               too large for the other side's address family), send_buffer_full (EAGAIN), denied (the client \
               is not allowed by the access lists).",
        series: &[
            dropped!(up, Truncated, "truncated"),
            dropped!(up, NoFlow, "no_flow"),
            dropped!(up, SendError, "send_error"),
            dropped!(up, SendBufferFull, "send_buffer_full"),
            dropped!(up, Denied, "denied"),
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

/// How many series a table has.
fn series_count<R>(stats: &[Stat<R>]) -> usize {
    stats.iter().map(|s| s.series.len()).sum()
}

/// Appends every series of `stats` for listeners `0..n`, series-major.
fn push_values<R>(out: &mut Vec<u64>, stats: &[Stat<R>], r: &R, n: usize) {
    for s in stats.iter().flat_map(|s| s.series) {
        out.extend((0..n).map(|i| (s.read)(r, i)));
    }
}

/// Every statistic's value, in one order (TCP, UDP, process; within each,
/// series-major, then listener): what a loop publishes, and what
/// [`add_values`] sums over loops. Every statistic is a sum over loops.
pub(crate) fn values(tcp: &TcpRelay, udp: &UdpRelay) -> Vec<u64> {
    let mut v = Vec::new();
    push_values(&mut v, TCP_STATS, tcp, tcp.listeners.len());
    push_values(&mut v, UDP_STATS, udp, udp.listeners.len());
    push_values(&mut v, PROCESS_STATS, tcp, 1);
    v
}

/// Adds another loop's `values` into `into` (the loops relay the same forwards).
pub(crate) fn add_values(into: &mut [u64], other: &[u64]) {
    if into.len() == other.len() {
        for (a, b) in into.iter_mut().zip(other) {
            *a += b;
        }
    }
}

/// The three tables' parts of a values vector.
fn split<'a>(tcp: &TcpRelay, udp: &UdpRelay, v: &'a [u64]) -> Option<(&'a [u64], &'a [u64], &'a [u64])> {
    let t = series_count(TCP_STATS) * tcp.listeners.len();
    let u = series_count(UDP_STATS) * udp.listeners.len();
    let p = series_count(PROCESS_STATS);
    (v.len() == t + u + p).then(|| (&v[..t], &v[t..t + u], &v[t + u..]))
}

/// Appends ` key value` for each series of `stats` for listener `i` of `n`.
fn line_fields<R>(out: &mut String, stats: &[Stat<R>], v: &[u64], n: usize, i: usize) {
    for (k, s) in stats.iter().flat_map(|s| s.series).enumerate() {
        let _ = write!(out, " {} {}", s.key, v[k * n + i]);
    }
}

/// Appends each statistic of `stats` in the Prometheus text format, one
/// row per series and listener (`labels[i]` names listener `i`).
fn page_rows<R>(out: &mut String, stats: &[Stat<R>], v: &[u64], labels: &[String]) {
    let n = labels.len();
    let mut k = 0;
    for st in stats {
        let _ =
            writeln!(out, "# HELP splice_relay_{} {}\n# TYPE splice_relay_{} {}", st.name, st.help, st.name, st.kind);
        for (i, base) in labels.iter().enumerate() {
            for (j, s) in st.series.iter().enumerate() {
                let v = v[(k + j) * n + i];
                let _ = match (base.is_empty(), s.labels.is_empty()) {
                    (true, true) => writeln!(out, "splice_relay_{} {v}", st.name),
                    (false, false) => writeln!(out, "splice_relay_{}{{{base},{}}} {v}", st.name, s.labels),
                    _ => writeln!(out, "splice_relay_{}{{{base}{}}} {v}", st.name, s.labels),
                };
            }
        }
        k += st.series.len();
    }
}

/// One log line per forward, one for the pipes, and with several loops one
/// for each loop's connections; `v` is [`values`], summed over the loops.
pub(crate) fn stats_lines(tcp: &TcpRelay, udp: &UdpRelay, v: &[u64], threads: &[Published]) -> Vec<String> {
    let mut out = Vec::new();
    let Some((tv, uv, pv)) = split(tcp, udp, v) else { return out };
    let (nt, nu) = (tcp.listeners.len(), udp.listeners.len());
    for (i, l) in tcp.listeners.iter().enumerate() {
        let mut line = format!("stats tcp {} -> {}:", l.addr, l.route.target);
        line_fields(&mut line, TCP_STATS, tv, nt, i);
        out.push(line);
    }
    for (i, l) in udp.listeners.iter().enumerate() {
        let mut line = format!("stats udp {} -> {}:", l.addr, l.target);
        line_fields(&mut line, UDP_STATS, uv, nu, i);
        out.push(line);
    }
    let mut line = String::from("stats pipes");
    line_fields(&mut line, PROCESS_STATS, pv, 1, 0);
    out.push(line);
    if threads.len() > 1 {
        let list = |f: fn(&Published) -> u64| threads.iter().map(|p| f(p).to_string()).collect::<Vec<_>>().join(",");
        out.push(format!("stats threads open {} accepted {}", list(|p| p.open), list(|p| p.accepted)));
    }
    out
}

/// The same statistics in the Prometheus text exposition format, and with
/// several loops each loop's connections.
pub(crate) fn prometheus(tcp: &TcpRelay, udp: &UdpRelay, v: &[u64], threads: &[Published]) -> String {
    let mut o = String::new();
    let Some((tv, uv, pv)) = split(tcp, udp, v) else { return o };
    let listen = |addr: SocketAddr, target: SocketAddr| format!("listen=\"{addr}\",target=\"{target}\"");
    let tl: Vec<String> = tcp.listeners.iter().map(|l| listen(l.addr, l.route.target)).collect();
    page_rows(&mut o, TCP_STATS, tv, &tl);
    let ul: Vec<String> = udp.listeners.iter().map(|l| listen(l.addr, l.target)).collect();
    page_rows(&mut o, UDP_STATS, uv, &ul);
    page_rows(&mut o, PROCESS_STATS, pv, &[String::new()]);
    if threads.len() > 1 {
        let mut family = |name: &str, kind: &str, help: &str, f: fn(&Published) -> u64| {
            let _ = writeln!(o, "# HELP splice_relay_{name} {help}\n# TYPE splice_relay_{name} {kind}");
            for (i, p) in threads.iter().enumerate() {
                let _ = writeln!(o, "splice_relay_{name}{{thread=\"{i}\"}} {}", f(p));
            }
        };
        family("thread_tcp_connections_open", "gauge", "TCP connections open now, per loop.", |p| p.open);
        family("thread_tcp_connections_total", "counter", "TCP connections accepted, per loop.", |p| p.accepted);
        family(
            "thread_accept_wakeups_idle_total",
            "counter",
            "Listener wake-ups that found no connection to accept, per loop (a thundering herd shows here).",
            |p| p.idle_wakeups,
        );
    }
    o
}
