//! TCP bench for splice-relay (`cargo bench --bench tcp`; harness = false, std + libc only).
//!
//! 1. Bulk throughput through one relayed connection on loopback: Gbit/s and
//!    relay CPU seconds per GB (utime+stime from /proc/PID/stat), for splice
//!    (default), `--no-splice`, and a few `--pipe-size` values, with "direct"
//!    (no relay) as the ceiling.
//! 2. Memory per idle connection: RSS and PSS delta (smaps_rollup) and fds
//!    per connection with 2,000 idle connections open through the relay,
//!    fresh and again after each carried 1 KiB both ways.
//!
//! Knobs (environment): BENCH_BYTES (default 4 GiB per run), BENCH_SECS (10,
//! time bound per run), BENCH_REPEAT (3, the median is shown), BENCH_IDLE_CONNS
//! (2000), BENCH_PIN (1: relay on the last CPU, bench threads on CPU 0),
//! BENCH_ONLY (`throughput` or `idle`), SPLICE_RELAY_BIN (relay to test),
//! BENCH_VERBOSE (echo the relay's log).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

const CHUNK: usize = 256 * 1024;

/// Accept one connection within `timeout`.
fn accept_timeout(l: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    l.set_nonblocking(true).ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok()?;
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1))
            }
            Err(_) => return None,
        }
    }
}

struct Bulk {
    bytes: u64,
    secs: f64,
    relay_cpu: f64,
}

/// Push up to `limit` bytes (for at most `max_secs`) client -> `connect_to`,
/// read at the backend `backend` until EOF.
fn bulk_once(backend: &TcpListener, connect_to: SocketAddr, relay_pid: Option<u32>, limit: u64, max_secs: f64) -> Bulk {
    let bench_cpu = pinning().map(|(b, _)| b);
    let client = TcpStream::connect(connect_to).expect("connect to relay");
    client.set_nodelay(true).ok();
    let server = accept_timeout(backend, Duration::from_secs(5)).expect("backend accept (relay did not connect?)");
    server.set_read_timeout(Some(Duration::from_secs_f64(max_secs + 10.0))).ok();

    let cpu0 = relay_pid.map(cpu_seconds).unwrap_or(0.0);
    let start = Instant::now();
    let sender = thread::spawn(move || {
        pin_current_thread(bench_cpu);
        let mut client = client;
        let buf = vec![0x5au8; CHUNK];
        let mut sent = 0u64;
        let stop = Duration::from_secs_f64(max_secs);
        while sent < limit && start.elapsed() < stop {
            let n = ((limit - sent) as usize).min(CHUNK);
            if client.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
        }
        let _ = client.shutdown(Shutdown::Write);
        // Keep the socket open until the receiver saw EOF (returned on drop of the handle).
        (sent, client)
    });
    let receiver = thread::spawn(move || {
        pin_current_thread(bench_cpu);
        let mut server = server;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            match server.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        (got, start.elapsed())
    });
    let (got, elapsed) = receiver.join().expect("receiver");
    let cpu1 = relay_pid.map(cpu_seconds).unwrap_or(0.0);
    let (sent, _client) = sender.join().expect("sender");
    if got != sent {
        eprintln!("warning: sent {sent} bytes, received {got}");
    }
    Bulk { bytes: got, secs: elapsed.as_secs_f64(), relay_cpu: cpu1 - cpu0 }
}

fn throughput() {
    let limit: u64 = env_or("BENCH_BYTES", 4u64 << 30);
    let max_secs: f64 = env_or("BENCH_SECS", 10.0);
    let repeat: usize = env_or("BENCH_REPEAT", 3usize).max(1);
    let relay_cpu = pinning().map(|(_, r)| r);

    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("direct (no relay)", vec![]),
        ("splice (default)", vec![""]),
        ("--no-splice", vec!["--no-splice"]),
        ("splice --pipe-size 64K", vec!["--pipe-size", "65536"]),
        ("splice --pipe-size 256K", vec!["--pipe-size", "262144"]),
        ("splice --pipe-size 1M", vec!["--pipe-size", "1048576"]),
    ];
    let mut rows = Vec::new();
    let mut direct_gbps = f64::NAN;
    for (name, opts) in cases {
        let backend = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let bport = backend.local_addr().unwrap().port();
        let (relay, target) = if opts.is_empty() {
            (None, loopback(bport))
        } else {
            let rport = free_tcp_port();
            let mut args: Vec<String> = opts.iter().filter(|o| !o.is_empty()).map(|s| s.to_string()).collect();
            args.push(format!("tcp:127.0.0.1:{rport}={}", loopback(bport)));
            (Some(Relay::start(&args, relay_cpu, 1)), loopback(rport))
        };
        let pid = relay.as_ref().map(|r| r.pid());
        let mut gbps = Vec::new();
        let mut cpu_per_gb = Vec::new();
        let mut busy = Vec::new();
        let mut gb_moved = 0.0;
        for _ in 0..repeat {
            let b = bulk_once(&backend, target, pid, limit, max_secs);
            let gb = b.bytes as f64 / 1e9;
            gb_moved += gb;
            gbps.push(gb * 8.0 / b.secs);
            cpu_per_gb.push(if gb > 0.0 { b.relay_cpu / gb } else { f64::NAN });
            busy.push(100.0 * b.relay_cpu / b.secs);
        }
        let g = median(&gbps);
        if opts.is_empty() {
            direct_gbps = g;
        }
        let (cpu, busy) = if pid.is_some() {
            (format!("{:.3}", median(&cpu_per_gb)), format!("{:.0}%", median(&busy)))
        } else {
            ("-".into(), "-".into())
        };
        rows.push(vec![
            name.to_string(),
            format!("{g:.2}"),
            format!("{:.0}%", 100.0 * g / direct_gbps),
            cpu,
            busy,
            format!(
                "{:.2}..{:.2}",
                gbps.iter().cloned().fold(f64::MAX, f64::min),
                gbps.iter().cloned().fold(0.0, f64::max)
            ),
            format!("{:.1}", gb_moved / repeat as f64),
        ]);
        eprintln!("done: {name}");
        drop(relay);
    }
    println!("### Bulk TCP, one connection, client -> relay -> backend on 127.0.0.1 (median of {repeat})\n");
    print_table(
        &["case", "Gbit/s", "vs direct", "relay CPU s/GB", "relay CPU busy", "Gbit/s min..max", "GB per run"],
        &rows,
    );
    println!("(relay CPU busy near 100% means the relay is the bottleneck; otherwise the bench's own core is.)\n");
}

/// Open `n` idle connections through the relay; returns (client streams, backend streams).
fn open_idle(
    backend: &TcpListener,
    relay: SocketAddr,
    n: usize,
    deadline: Instant,
) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let mut clients = Vec::with_capacity(n);
    let mut servers = Vec::with_capacity(n);
    backend.set_nonblocking(true).expect("nonblocking");
    while clients.len() < n && Instant::now() < deadline {
        match TcpStream::connect_timeout(&relay, Duration::from_secs(5)) {
            Ok(s) => clients.push(s),
            Err(e) => {
                eprintln!("connect #{} failed: {e}", clients.len() + 1);
                break;
            }
        }
        while let Ok((s, _)) = backend.accept() {
            servers.push(s);
        }
    }
    while servers.len() < clients.len() && Instant::now() < deadline {
        match backend.accept() {
            Ok((s, _)) => servers.push(s),
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
    (clients, servers)
}

/// Wait until the relay's fd count stops changing (bounded).
fn settle(pid: u32) {
    let mut last = fd_count(pid);
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        let now = fd_count(pid);
        if now == last {
            break;
        }
        last = now;
    }
}

fn idle_memory() {
    let n: usize = env_or("BENCH_IDLE_CONNS", 2000usize);
    let limit = raise_nofile();
    if (limit as usize) < 2 * n + 100 {
        println!("### Idle connections: skipped (RLIMIT_NOFILE {limit} < {})\n", 2 * n + 100);
        return;
    }
    let relay_cpu = pinning().map(|(_, r)| r);
    let mut rows = Vec::new();
    for (name, opts) in [("splice (default)", vec![]), ("--no-splice", vec!["--no-splice"])] {
        let backend = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let bport = backend.local_addr().unwrap().port();
        let rport = free_tcp_port();
        let mut args: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
        args.push(format!("tcp:127.0.0.1:{rport}={}", loopback(bport)));
        let mut relay = Relay::start(&args, relay_cpu, 1);
        let pid = relay.pid();
        // Baseline after one connection has come and gone (lazy init done).
        {
            let (c, s) = open_idle(&backend, loopback(rport), 1, Instant::now() + Duration::from_secs(5));
            drop((c, s));
            settle(pid);
        }
        let (rss0, pss0) = rss_pss_kib(pid);
        let fd0 = fd_count(pid);
        let (mut clients, mut servers) =
            open_idle(&backend, loopback(rport), n, Instant::now() + Duration::from_secs(60));
        settle(pid);
        let opened = clients.len().min(servers.len());
        if opened == 0 || !relay.alive() {
            rows.push(vec![name.to_string(), format!("{opened}"), "fails".into(), "".into(), "".into(), "".into()]);
            continue;
        }
        let (rss1, pss1) = rss_pss_kib(pid);
        let fd1 = fd_count(pid);
        let per = |a: u64, b: u64| (b as f64 - a as f64) * 1024.0 / opened as f64;
        rows.push(vec![
            format!("{name}, fresh"),
            format!("{opened}"),
            format!("{:.0}", per(rss0, rss1)),
            format!("{:.0}", per(pss0, pss1)),
            format!("{:.2}", (fd1 as f64 - fd0 as f64) / opened as f64),
            format!("{:.1} / {:.1}", rss1 as f64 / 1024.0, pss1 as f64 / 1024.0),
        ]);
        // Each connection carries 1 KiB each way, then goes idle again.
        let msg = [7u8; 1024];
        let mut buf = [0u8; 1024];
        let mut ok = true;
        for s in clients.iter_mut().chain(servers.iter_mut()) {
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        }
        for c in clients.iter_mut() {
            ok &= c.write_all(&msg).is_ok();
        }
        for s in servers.iter_mut() {
            ok &= s.read_exact(&mut buf).is_ok() && s.write_all(&msg).is_ok();
        }
        for c in clients.iter_mut() {
            ok &= c.read_exact(&mut buf).is_ok();
        }
        settle(pid);
        let (rss2, pss2) = rss_pss_kib(pid);
        let fd2 = fd_count(pid);
        rows.push(vec![
            format!("{name}, after 1 KiB each way{}", if ok { "" } else { " (some failed)" }),
            format!("{opened}"),
            format!("{:.0}", per(rss0, rss2)),
            format!("{:.0}", per(pss0, pss2)),
            format!("{:.2}", (fd2 as f64 - fd0 as f64) / opened as f64),
            format!("{:.1} / {:.1}", rss2 as f64 / 1024.0, pss2 as f64 / 1024.0),
        ]);
        eprintln!("done: idle {name}");
        drop(clients);
        drop(servers);
        drop(relay);
    }
    println!("### Idle connections through the relay (user-space memory; kernel socket memory is not in RSS)\n");
    print_table(&["case", "connections", "RSS B/conn", "PSS B/conn", "fds/conn", "relay RSS / PSS MiB"], &rows);
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter may follow (like libtest).
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let only = std::env::var("BENCH_ONLY").ok();
    let want = |name: &str| {
        only.as_deref().is_none_or(|o| o == name)
            && (filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
    };
    preamble("TCP");
    if want("throughput") {
        throughput();
    }
    if want("idle") {
        idle_memory();
    }
}
