//! UDP bench for splice-relay (`cargo bench --bench udp`; harness = false).
//!
//! One-way load: the generator of examples/udpgen.rs (sendmmsg, batches of 64,
//! 1 or 100 source sockets) -> relay `udp:127.0.0.1:P=127.0.0.1:Q` -> a
//! recvmmsg sink on Q, at full speed for a bounded time. Reports offered and
//! delivered packets/s, loss, kernel receive-buffer drops, and relay CPU
//! seconds per million delivered packets. "direct" (generator -> sink, no
//! relay) is the ceiling.
//!
//! Knobs (environment): BENCH_UDP_SECS (3 per run), BENCH_REPEAT (3, median
//! shown), BENCH_PIN (1: relay on the last CPU, generator and sink on CPU 0),
//! SPLICE_RELAY_BIN, BENCH_VERBOSE.

mod common;
#[path = "../examples/udpgen.rs"]
#[allow(dead_code)]
mod udpgen;

use common::*;

struct Run {
    rep: udpgen::Report,
    relay_cpu: f64,
    rcvbuf_drops: u64,
}

fn main() {
    let secs: f64 = env_or("BENCH_UDP_SECS", 3.0);
    let repeat: usize = env_or("BENCH_REPEAT", 3usize).max(1);
    let pin = pinning();
    let (bench_cpu, relay_cpu) = (pin.map(|p| p.0), pin.map(|p| p.1));
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    preamble("UDP");

    let mut rows = Vec::new();
    for size in [64usize, 1400] {
        for flows in [1usize, 100] {
            let mut direct_pps = f64::NAN;
            for relayed in [false, true] {
                let name = format!(
                    "{} {size} B, {flows} flow{}",
                    if relayed { "relay" } else { "direct" },
                    if flows > 1 { "s" } else { "" }
                );
                if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
                    continue;
                }
                let mut runs = Vec::new();
                for _ in 0..repeat {
                    let sport = free_udp_port();
                    let sink = loopback(sport);
                    let relay = relayed.then(|| {
                        let rport = free_udp_port();
                        (Relay::start(&[format!("udp:127.0.0.1:{rport}={sink}")], relay_cpu, 1), rport)
                    });
                    let target = relay.as_ref().map(|(_, p)| loopback(*p)).unwrap_or(sink);
                    let cfg = udpgen::Config {
                        target: Some(target),
                        sink: Some(sink),
                        size,
                        flows,
                        secs,
                        sender_cpu: bench_cpu,
                        sink_cpu: bench_cpu,
                        ..Default::default()
                    };
                    let pid = relay.as_ref().map(|(r, _)| r.pid());
                    let cpu0 = pid.map(cpu_seconds).unwrap_or(0.0);
                    let k0 = udp_kernel_counters();
                    let rep = udpgen::run(&cfg).expect("udpgen");
                    let k1 = udp_kernel_counters();
                    let cpu1 = pid.map(cpu_seconds).unwrap_or(0.0);
                    runs.push(Run { rep, relay_cpu: cpu1 - cpu0, rcvbuf_drops: k1.1.saturating_sub(k0.1) });
                    drop(relay);
                }
                // The run with the median delivered rate.
                runs.sort_by(|a, b| a.rep.delivered_pps().total_cmp(&b.rep.delivered_pps()));
                let r = &runs[runs.len() / 2];
                if !relayed {
                    direct_pps = r.rep.delivered_pps();
                }
                let cpu_per_m = if relayed && r.rep.received > 0 {
                    format!("{:.2}", r.relay_cpu / (r.rep.received as f64 / 1e6))
                } else {
                    "-".into()
                };
                rows.push(vec![
                    name.clone(),
                    format!("{:.0}", r.rep.offered_pps()),
                    format!("{:.0}", r.rep.delivered_pps()),
                    format!("{:.0}%", 100.0 * r.rep.delivered_pps() / direct_pps),
                    format!("{:.1}", r.rep.loss_pct()),
                    format!("{}", r.rcvbuf_drops),
                    format!("{:.2}", r.rep.received_bytes as f64 * 8.0 / 1e9 / r.rep.send_secs),
                    cpu_per_m,
                    if relayed { format!("{:.0}%", 100.0 * r.relay_cpu / r.rep.send_secs) } else { "-".into() },
                ]);
                eprintln!("done: {name}");
            }
        }
    }
    println!("### UDP one-way, generator -> relay -> sink on 127.0.0.1, {secs} s per run (median of {repeat})\n");
    print_table(
        &[
            "case",
            "offered pps",
            "delivered pps",
            "vs direct",
            "loss %",
            "rcvbuf drops",
            "delivered Gbit/s",
            "relay CPU s / M pkts",
            "relay CPU busy",
        ],
        &rows,
    );
}
