//! Fairness load for `scripts/bench-peers.sh --cases fair`: how long a small
//! request waits through a relay that is also carrying bulk flows.
//!
//! ```text
//! fairness --relay [::1]:P --backend 127.0.0.1:Q --bulk N [--probes 400] [--interval-ms 10]
//! ```
//!
//! Runs the backend itself on `--backend` (the relay forwards there): a
//! connection that starts with `B` is a bulk flow (the backend sends and
//! receives as fast as it can), one that starts with `E` is echoed. Opens
//! N two-way bulk flows through the relay, waits 1 s, then every interval
//! sends a 100-byte echo on one kept connection (`rtt`) and makes one new
//! connection with a 100-byte echo (`new`), and the same echo straight to
//! the backend (`direct`: what the load costs a probe without a relay). Prints one line of
//! `key=value` pairs: percentiles in milliseconds and the bulk bytes moved
//! while probing. Bounded: at most `--probes` rounds, and every socket has
//! a 10 s timeout.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 * 1024;
const PROBE: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Opts {
    relay: SocketAddr,
    backend: SocketAddr,
    bulk: usize,
    probes: usize,
    interval: Duration,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        relay: "[::1]:0".parse().unwrap(),
        backend: "127.0.0.1:0".parse().unwrap(),
        bulk: 1,
        probes: 400,
        interval: Duration::from_millis(10),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().ok_or(format!("{a} needs a value"))?;
        let bad = |e: String| format!("{a} {v}: {e}");
        match a.as_str() {
            "--relay" => o.relay = v.parse().map_err(|e: std::net::AddrParseError| bad(e.to_string()))?,
            "--backend" => o.backend = v.parse().map_err(|e: std::net::AddrParseError| bad(e.to_string()))?,
            "--bulk" => o.bulk = v.parse().map_err(|e: std::num::ParseIntError| bad(e.to_string()))?,
            "--probes" => o.probes = v.parse().map_err(|e: std::num::ParseIntError| bad(e.to_string()))?,
            "--interval-ms" => {
                o.interval = Duration::from_millis(v.parse().map_err(|e: std::num::ParseIntError| bad(e.to_string()))?)
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

/// Writes chunks until `stop` (or an error); counts nothing.
fn pour(mut s: TcpStream, stop: Arc<AtomicBool>) {
    let chunk = vec![0x5a; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        if s.write_all(&chunk).is_err() {
            return;
        }
    }
}

/// Bulk bytes received by the backend (up) and by the clients (down).
static UP: AtomicU64 = AtomicU64::new(0);
static DOWN: AtomicU64 = AtomicU64::new(0);

/// Reads until EOF or an error, adding to `count`.
fn drink(mut s: TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; CHUNK];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn backend(l: TcpListener, stop: Arc<AtomicBool>) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let stop = stop.clone();
        thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut kind = [0u8; 1];
            if s.read_exact(&mut kind).is_err() {
                return;
            }
            if kind[0] == b'B' {
                let (Ok(r), Ok(w)) = (s.try_clone(), s.try_clone()) else { return };
                thread::spawn(move || drink(r, &UP));
                pour(w, stop);
                let _ = s.shutdown(Shutdown::Both);
            } else {
                let mut buf = [0u8; PROBE];
                while s.read_exact(&mut buf).is_ok() {
                    if s.write_all(&buf).is_err() {
                        return;
                    }
                }
            }
        });
    }
}

fn connect(to: SocketAddr, kind: u8) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(&[kind])?;
    Ok(s)
}

fn echo(s: &mut TcpStream) -> std::io::Result<()> {
    let msg = [0x42u8; PROBE];
    s.write_all(&msg)?;
    let mut got = [0u8; PROBE];
    s.read_exact(&mut got)
}

/// (p50, p99, max) in milliseconds.
fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.99), v[v.len() - 1])
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fairness: {e}");
            std::process::exit(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let l = TcpListener::bind(o.backend).unwrap_or_else(|e| {
        eprintln!("fairness: cannot listen on {}: {e}", o.backend);
        std::process::exit(1);
    });
    {
        let stop = stop.clone();
        thread::spawn(move || backend(l, stop));
    }
    let started = Instant::now();
    let mut bulk = Vec::new();
    for _ in 0..o.bulk {
        let s = connect(o.relay, b'B').unwrap_or_else(|e| {
            eprintln!("fairness: bulk connect to {}: {e}", o.relay);
            std::process::exit(1);
        });
        let (r, w) = (s.try_clone().unwrap(), s.try_clone().unwrap());
        let stop = stop.clone();
        thread::spawn(move || drink(r, &DOWN));
        thread::spawn(move || pour(w, stop));
        bulk.push(s);
    }
    thread::sleep(Duration::from_secs(1));
    let mut kept = connect(o.relay, b'E').unwrap_or_else(|e| {
        eprintln!("fairness: probe connect to {}: {e}", o.relay);
        std::process::exit(1);
    });
    // The same echo straight to the backend: what the load itself costs a probe.
    let mut direct = connect(o.backend, b'E').unwrap_or_else(|e| {
        eprintln!("fairness: probe connect to {}: {e}", o.backend);
        std::process::exit(1);
    });
    let (mut rtt, mut new, mut base, mut failed) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let moved = || UP.load(Ordering::Relaxed) + DOWN.load(Ordering::Relaxed);
    let before = moved();
    let t0 = Instant::now();
    for i in 0..o.probes {
        let tick = t0 + o.interval * i as u32;
        if let Some(wait) = tick.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let t = Instant::now();
        match echo(&mut kept) {
            Ok(()) => rtt.push(t.elapsed().as_secs_f64() * 1e3),
            Err(_) => failed += 1,
        }
        let t = Instant::now();
        match echo(&mut direct) {
            Ok(()) => base.push(t.elapsed().as_secs_f64() * 1e3),
            Err(_) => failed += 1,
        }
        let t = Instant::now();
        match connect(o.relay, b'E').and_then(|mut s| echo(&mut s)) {
            Ok(()) => new.push(t.elapsed().as_secs_f64() * 1e3),
            Err(_) => failed += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let bytes = moved() - before;
    let (total, total_secs) = (moved(), started.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for s in &bulk {
        let _ = s.shutdown(Shutdown::Both);
    }
    let (r50, r99, rmax) = percentiles(rtt);
    let (n50, n99, nmax) = percentiles(new);
    let (d50, d99, dmax) = percentiles(base);
    println!(
        "rtt_p50={r50:.3} rtt_p99={r99:.3} rtt_max={rmax:.3} new_p50={n50:.3} new_p99={n99:.3} new_max={nmax:.3} \
         direct_p50={d50:.3} direct_p99={d99:.3} direct_max={dmax:.3} failed={failed} bulk_bytes={bytes} secs={secs:.2} bulk_total={total} total_secs={total_secs:.2}"
    );
}
