//! Statistics: the periodic/SIGUSR1 log line and a Prometheus text endpoint
//! served from the same event loop.

mod http;
mod server;

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::shared::Published;
use crate::slab::Key;
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
    read: fn(&R, Key) -> u64,
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
        series: one!("open", |t, i| t.listener_stats(i).open),
    },
    Stat {
        name: "tcp_connections_total",
        kind: "counter",
        help: "TCP connections accepted.",
        series: one!("total", |t, i| t.listener_stats(i).total),
    },
    Stat {
        name: "tcp_connections_refused_total",
        kind: "counter",
        help: "TCP clients refused (untrusted PROXY sender, per-source limit, access lists).",
        series: one!("refused", |t, i| t.listener_stats(i).refused),
    },
    Stat {
        name: "tcp_connections_denied_total",
        kind: "counter",
        help: "TCP clients refused by the access lists (also counted as refused).",
        series: one!("denied", |t, i| t.listener_stats(i).denied),
    },
    Stat {
        name: "tcp_connect_failures_total",
        kind: "counter",
        help: "Backend connects that failed or timed out.",
        series: one!("failed", |t, i| t.listener_stats(i).failed),
    },
    Stat {
        name: "tcp_transparent_connections_total",
        kind: "counter",
        help: "Backend connects made from the client's own address (--transparent).",
        series: one!("transparent", |t, i| t.listener_stats(i).transparent),
    },
    Stat {
        name: "tcp_transparent_fallbacks_total",
        kind: "counter",
        help: "Connections of a transparent forward that used the relay's address: \
               client and backend differ in address family.",
        series: one!("transparent_fallbacks", |t, i| t.listener_stats(i).transparent_fallbacks),
    },
    Stat {
        name: "tcp_bytes_up_total",
        kind: "counter",
        help: "Bytes client to backend, open connections included.",
        series: one!("bytes_up", |t, i| t.listener_stats(i).bytes_up + t.live_bytes(i).0),
    },
    Stat {
        name: "tcp_bytes_down_total",
        kind: "counter",
        help: "Bytes backend to client, open connections included.",
        series: one!("bytes_down", |t, i| t.listener_stats(i).bytes_down + t.live_bytes(i).1),
    },
];

/// The series of a UDP per-direction statistic: up, then down.
macro_rules! up_down {
    ($key:literal, $field:ident) => {
        &[
            Series {
                labels: r#"direction="up""#,
                key: concat!($key, "_up"),
                read: |u, i| u.listener_stats(i).up.$field,
            },
            Series {
                labels: r#"direction="down""#,
                key: concat!($key, "_down"),
                read: |u, i| u.listener_stats(i).down.$field,
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
            read: |u, i| u.listener_stats(i).$dir.dropped(crate::stats::DropReason::$reason),
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
        series: one!("flows_total", |u, i| u.listener_stats(i).flows_total),
    },
    Stat {
        name: "udp_transparent_flows_total",
        kind: "counter",
        help: "UDP flows whose socket sends from the client's own address and port (--transparent).",
        series: one!("transparent_flows", |u, i| u.listener_stats(i).flows_transparent),
    },
    Stat {
        name: "udp_transparent_fallbacks_total",
        kind: "counter",
        help: "UDP flows of a transparent forward that send from the relay's address: \
               client and backend differ in address family.",
        series: one!("transparent_fallbacks", |u, i| u.listener_stats(i).transparent_fallbacks),
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
               is not allowed by the access lists), removed (a new client of a forward a reload removed).",
        series: &[
            dropped!(up, Truncated, "truncated"),
            dropped!(up, NoFlow, "no_flow"),
            dropped!(up, SendError, "send_error"),
            dropped!(up, SendBufferFull, "send_buffer_full"),
            dropped!(up, Denied, "denied"),
            dropped!(up, Removed, "removed"),
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

/// One forward's statistics (one listener's, or summed over the loops'
/// listeners on the same address): every series of its table, in order.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    /// The listening address.
    listen: SocketAddr,
    /// Where its connections or datagrams go.
    target: SocketAddr,
    values: Vec<u64>,
}

/// Every statistic of one loop, or summed over every loop: what a loop
/// publishes ([`snapshot`]) and loop 0 adds up ([`Snapshot::add`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshot {
    tcp: Vec<Row>,
    udp: Vec<Row>,
    process: Vec<u64>,
}

impl Snapshot {
    /// Adds another loop's statistics. Rows meet by listening address: a
    /// reload retires and adds listeners in each loop on its own, so the
    /// loops' listeners need not be in one order (ARCHITECTURE.md, "Reload").
    pub(crate) fn add(&mut self, other: &Snapshot) {
        add_rows(&mut self.tcp, &other.tcp);
        add_rows(&mut self.udp, &other.udp);
        add_all(&mut self.process, &other.process);
    }
}

fn add_rows(into: &mut Vec<Row>, other: &[Row]) {
    let at: std::collections::HashMap<SocketAddr, usize> =
        into.iter().enumerate().map(|(i, r)| (r.listen, i)).collect();
    for r in other {
        match at.get(&r.listen) {
            Some(&i) => add_all(&mut into[i].values, &r.values),
            None => into.push(r.clone()),
        }
    }
}

fn add_all(into: &mut [u64], other: &[u64]) {
    for (a, b) in into.iter_mut().zip(other) {
        *a += b;
    }
}

/// Every series of `stats` for listener `key`.
fn row_values<R>(stats: &[Stat<R>], r: &R, key: Key) -> Vec<u64> {
    stats.iter().flat_map(|s| s.series).map(|s| (s.read)(r, key)).collect()
}

/// This loop's statistics.
pub(crate) fn snapshot(tcp: &TcpRelay, udp: &UdpRelay) -> Snapshot {
    Snapshot {
        tcp: tcp
            .listeners
            .iter()
            .map(|(k, l)| Row { listen: l.addr, target: l.route.target, values: row_values(TCP_STATS, tcp, k) })
            .collect(),
        udp: udp
            .listeners
            .iter()
            .map(|(k, l)| Row { listen: l.addr, target: l.target, values: row_values(UDP_STATS, udp, k) })
            .collect(),
        process: row_values(PROCESS_STATS, tcp, Key::from_parts(0, 0)),
    }
}

/// Appends ` key value` for each series of `stats` in `values`.
fn line_fields<R>(out: &mut String, stats: &[Stat<R>], values: &[u64]) {
    for (s, v) in stats.iter().flat_map(|s| s.series).zip(values) {
        let _ = write!(out, " {} {v}", s.key);
    }
}

/// Appends each statistic of `stats` in the Prometheus text format, one
/// row per series and forward (`labels[i]` names `rows[i]`).
fn page_rows<R>(out: &mut String, stats: &[Stat<R>], rows: &[&[u64]], labels: &[String]) {
    let mut k = 0;
    for st in stats {
        let _ =
            writeln!(out, "# HELP splice_relay_{} {}\n# TYPE splice_relay_{} {}", st.name, st.help, st.name, st.kind);
        for (values, base) in rows.iter().zip(labels) {
            for (j, s) in st.series.iter().enumerate() {
                let v = values.get(k + j).copied().unwrap_or_default();
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

/// One log line per forward, one for the pipes, one for reloads if any,
/// and with several loops one for each loop's connections; `snap` is
/// summed over the loops.
pub(crate) fn stats_lines(snap: &Snapshot, threads: &[Published], reloads: &Reloads) -> Vec<String> {
    let mut out = Vec::new();
    for r in &snap.tcp {
        let mut line = format!("stats tcp {} -> {}:", r.listen, r.target);
        line_fields(&mut line, TCP_STATS, &r.values);
        out.push(line);
    }
    for r in &snap.udp {
        let mut line = format!("stats udp {} -> {}:", r.listen, r.target);
        line_fields(&mut line, UDP_STATS, &r.values);
        out.push(line);
    }
    let mut line = String::from("stats pipes");
    line_fields(&mut line, PROCESS_STATS, &snap.process);
    out.push(line);
    if reloads.total > 0 {
        out.push(format!("stats reloads {} failed {}", reloads.total, reloads.failed));
    }
    if threads.len() > 1 {
        let list = |f: fn(&Published) -> u64| threads.iter().map(|p| f(p).to_string()).collect::<Vec<_>>().join(",");
        out.push(format!("stats threads open {} accepted {}", list(|p| p.open), list(|p| p.accepted)));
    }
    out
}

/// Reloads (SIGHUP) so far, kept by loop 0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reloads {
    /// Reloads asked for.
    pub(crate) total: u64,
    /// Of those, the ones refused (the running configuration stayed) or
    /// applied only in part.
    pub(crate) failed: u64,
    /// Whether the last one was applied whole (true before any).
    pub(crate) last_ok: bool,
    /// When the configuration running now was read: the start, or the
    /// last good reload (seconds since the Unix epoch).
    pub(crate) last_good: u64,
}

impl Reloads {
    /// No reload yet; the configuration was read now.
    pub(crate) fn new() -> Self {
        Reloads { total: 0, failed: 0, last_ok: true, last_good: unix_now() }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The same statistics in the Prometheus text exposition format, and with
/// several loops each loop's connections.
pub(crate) fn prometheus(snap: &Snapshot, threads: &[Published], reloads: &Reloads) -> String {
    let mut o = String::new();
    let listen = |r: &Row| format!("listen=\"{}\",target=\"{}\"", r.listen, r.target);
    let (tv, tl): (Vec<&[u64]>, Vec<String>) = snap.tcp.iter().map(|r| (&r.values[..], listen(r))).unzip();
    page_rows(&mut o, TCP_STATS, &tv, &tl);
    let (uv, ul): (Vec<&[u64]>, Vec<String>) = snap.udp.iter().map(|r| (&r.values[..], listen(r))).unzip();
    page_rows(&mut o, UDP_STATS, &uv, &ul);
    page_rows(&mut o, PROCESS_STATS, &[&snap.process], &[String::new()]);
    let mut one = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            o,
            "# HELP splice_relay_{name} {help}\n# TYPE splice_relay_{name} {kind}\nsplice_relay_{name} {v}"
        );
    };
    one("reloads_total", "counter", "Reloads asked for (SIGHUP).", reloads.total);
    one(
        "reloads_failed_total",
        "counter",
        "Reloads refused (a configuration error: the running one stays) or applied only in part.",
        reloads.failed,
    );
    one(
        "config_last_reload_successful",
        "gauge",
        "1 if the last reload was applied whole (or there was none), else 0.",
        u64::from(reloads.last_ok),
    );
    one(
        "config_last_reload_success_timestamp_seconds",
        "gauge",
        "When the configuration running now was read: the start or the last good reload (Unix time).",
        reloads.last_good,
    );
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
