//! Statistics: the periodic/SIGUSR1 log line and a Prometheus text endpoint
//! served from the same event loop.

mod http;
mod server;

use std::fmt::Write as _;

use crate::tcp::TcpRelay;
use crate::udp::UdpRelay;
pub use server::Metrics;

/// One log line per forward: connections, bytes, flows, drops, pipes.
pub fn stats_lines(tcp: &TcpRelay, udp: &UdpRelay) -> Vec<String> {
    let mut out = Vec::new();
    for (i, l) in tcp.listeners.iter().enumerate() {
        let (up, down) = tcp.live_bytes(i);
        let s = &l.stats;
        out.push(format!(
            "stats tcp {} -> {}: open {} total {} refused {} failed {} bytes_up {} bytes_down {}",
            l.addr,
            l.target,
            s.open,
            s.total,
            s.refused,
            s.failed,
            s.bytes_up + up,
            s.bytes_down + down
        ));
    }
    for (i, l) in udp.listeners.iter().enumerate() {
        let s = &l.stats;
        out.push(format!(
            "stats udp {} -> {}: flows {} flows_total {} datagrams_up {} datagrams_down {} bytes_up {} bytes_down {} dropped {}",
            l.addr,
            l.target,
            udp.flows_of(i),
            s.flows_total,
            s.datagrams_up,
            s.datagrams_down,
            s.bytes_up,
            s.bytes_down,
            s.dropped
        ));
    }
    out.push(format!("stats pipes in_use {} spare {}", tcp.pool.lent(), tcp.pool.spare()));
    out
}

/// The same counters in the Prometheus text exposition format.
pub fn prometheus(tcp: &TcpRelay, udp: &UdpRelay) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(o, "# HELP splice_relay_{name} {help}\n# TYPE splice_relay_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "splice_relay_{name}{{{labels}}} {v}");
        }
    };
    let tl = |i: usize| {
        let l = &tcp.listeners[i];
        format!("listen=\"{}\",target=\"{}\"", l.addr, l.target)
    };
    let ul = |i: usize| {
        let l = &udp.listeners[i];
        format!("listen=\"{}\",target=\"{}\"", l.addr, l.target)
    };
    let n = tcp.listeners.len();
    let m = udp.listeners.len();
    let t = |f: &dyn Fn(usize) -> u64| (0..n).map(|i| (tl(i), f(i))).collect::<Vec<_>>();
    let u = |f: &dyn Fn(usize) -> u64| (0..m).map(|i| (ul(i), f(i))).collect::<Vec<_>>();
    let ls = |i: usize| tcp.listeners[i].stats;
    family("tcp_connections_open", "gauge", "TCP connections open now.", t(&|i| ls(i).open));
    family("tcp_connections_total", "counter", "TCP connections accepted.", t(&|i| ls(i).total));
    family("tcp_connections_refused_total", "counter", "TCP clients refused.", t(&|i| ls(i).refused));
    family("tcp_connect_failures_total", "counter", "Backend connects that failed.", t(&|i| ls(i).failed));
    family("tcp_bytes_up_total", "counter", "Bytes client to backend.", t(&|i| ls(i).bytes_up + tcp.live_bytes(i).0));
    family(
        "tcp_bytes_down_total",
        "counter",
        "Bytes backend to client.",
        t(&|i| ls(i).bytes_down + tcp.live_bytes(i).1),
    );
    let us = |i: usize| udp.listeners[i].stats;
    family("udp_flows_open", "gauge", "UDP flows open now.", u(&|i| udp.flows_of(i) as u64));
    family("udp_flows_total", "counter", "UDP flows created.", u(&|i| us(i).flows_total));
    family("udp_datagrams_up_total", "counter", "Datagrams client to backend.", u(&|i| us(i).datagrams_up));
    family("udp_datagrams_down_total", "counter", "Datagrams backend to client.", u(&|i| us(i).datagrams_down));
    family("udp_datagrams_dropped_total", "counter", "Datagrams dropped.", u(&|i| us(i).dropped));
    family("pipes_in_use", "gauge", "Pipes lent to connections.", vec![(String::new(), tcp.pool.lent() as u64)]);
    o
}
