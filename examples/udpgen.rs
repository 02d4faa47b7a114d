//! udpgen: one-way UDP load generator and sink for benchmarking relays.
//!
//! The sender pushes fixed-size datagrams with `sendmmsg` (batches of 64 by
//! default) from N flows (N connected source sockets, round robin) to
//! `--target`, at full speed or paced to `--pps`, for `--secs` seconds. The
//! sink binds `--sink`, counts datagrams with `recvmmsg`, and keeps reading
//! until the link has been quiet for 300 ms after the sender stopped (at most
//! 2 s). Loopback only: every address must be 127.0.0.0/8 or ::1.
//!
//! ```text
//! cargo build --release --example udpgen
//! target/release/examples/udpgen --target '[::1]:5300' --sink 127.0.0.1:5301 \
//!     --size 64 --flows 100 --secs 3 [--pps 0] [--batch 64] [--sender-cpu 0] [--sink-cpu 0]
//! ```
//!
//! Prints one line of `key=value` pairs: offered_pps, delivered_pps, loss_pct, ...
//! `--no-sink` only sends (count elsewhere); `--sink-only` only counts for `--secs`.
//! benches/udp.rs uses this file as a module.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Config {
    pub target: Option<SocketAddr>,
    pub sink: Option<SocketAddr>,
    pub size: usize,
    pub flows: usize,
    pub secs: f64,
    /// 0: as fast as the sender can go.
    pub pps: u64,
    pub batch: usize,
    pub sender_cpu: Option<usize>,
    pub sink_cpu: Option<usize>,
    /// Sink receive buffer (SO_RCVBUFFORCE, falling back to SO_RCVBUF).
    pub sink_rcvbuf: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            target: None,
            sink: None,
            size: 64,
            flows: 1,
            secs: 3.0,
            pps: 0,
            batch: 64,
            sender_cpu: None,
            sink_cpu: None,
            sink_rcvbuf: 4 << 20,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub sent: u64,
    pub send_secs: f64,
    pub send_errors: u64,
    pub received: u64,
    pub received_bytes: u64,
    pub truncated: u64,
}

impl Report {
    pub fn offered_pps(&self) -> f64 {
        self.sent as f64 / self.send_secs.max(1e-9)
    }
    pub fn delivered_pps(&self) -> f64 {
        self.received as f64 / self.send_secs.max(1e-9)
    }
    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 { 0.0 } else { 100.0 * (1.0 - self.received as f64 / self.sent as f64).max(0.0) }
    }
    pub fn line(&self, cfg: &Config) -> String {
        format!(
            "udpgen size={} flows={} secs={:.3} offered_pkts={} offered_pps={:.0} delivered_pkts={} delivered_pps={:.0} \
             loss_pct={:.2} delivered_gbps={:.3} truncated={} send_errors={}",
            cfg.size,
            cfg.flows,
            self.send_secs,
            self.sent,
            self.offered_pps(),
            self.received,
            self.delivered_pps(),
            self.loss_pct(),
            self.received_bytes as f64 * 8.0 / 1e9 / self.send_secs.max(1e-9),
            self.truncated,
            self.send_errors
        )
    }
}

fn is_loopback(a: &SocketAddr) -> bool {
    a.ip().is_loopback()
}

fn pin(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        // SAFETY: cpu_set_t is plain data; pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

fn set_int_opt(fd: i32, level: i32, name: i32, val: i32) -> bool {
    // SAFETY: valid fd, pointer to a live c_int of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &val as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        ) == 0
    }
}

/// Bind the sink socket (before the sender starts, so nothing is refused).
pub fn bind_sink(addr: SocketAddr, rcvbuf: usize) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr)?;
    let fd = s.as_raw_fd();
    let want = rcvbuf.min(i32::MAX as usize) as i32;
    if !set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want) {
        set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, want);
    }
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(s)
}

/// Count datagrams on `sock` until `stop` is set and the socket has been quiet
/// for 300 ms (or 2 s passed since `stop`), or `hard_deadline`.
/// Returns (datagrams, bytes, truncated).
pub fn sink_loop(sock: &UdpSocket, batch: usize, stop: &AtomicBool, hard_deadline: Instant) -> (u64, u64, u64) {
    const BUF: usize = 65536;
    let fd = sock.as_raw_fd();
    let mut bufs = vec![0u8; BUF * batch];
    let mut iovs: Vec<libc::iovec> = (0..batch)
        .map(|i| libc::iovec { iov_base: bufs[i * BUF..].as_mut_ptr() as *mut libc::c_void, iov_len: BUF })
        .collect();
    // SAFETY: mmsghdr is plain data; zero is a valid "no name, no control" value.
    let mut msgs: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect();
    let (mut count, mut bytes, mut trunc) = (0u64, 0u64, 0u64);
    let mut last_rx = Instant::now();
    let mut stop_seen: Option<Instant> = None;
    loop {
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
        // SAFETY: msgs/iovs/bufs outlive the call; each iovec points into bufs.
        let n =
            unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), batch as u32, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
        let now = Instant::now();
        if n > 0 {
            for m in &msgs[..n as usize] {
                count += 1;
                bytes += m.msg_len as u64;
                if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    trunc += 1;
                }
            }
            last_rx = now;
        }
        if now >= hard_deadline {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            let since = *stop_seen.get_or_insert(now);
            if now.duration_since(last_rx) >= Duration::from_millis(300)
                || now.duration_since(since) >= Duration::from_secs(2)
            {
                break;
            }
        }
    }
    (count, bytes, trunc)
}

/// Send for `cfg.secs`. Returns (datagrams sent, seconds, errors).
pub fn send_loop(cfg: &Config) -> std::io::Result<(u64, f64, u64)> {
    let target = cfg.target.expect("target");
    let batch = cfg.batch.clamp(1, 1024);
    let any: SocketAddr = if target.is_ipv6() { "[::1]:0".parse().unwrap() } else { "127.0.0.1:0".parse().unwrap() };
    let mut socks = Vec::with_capacity(cfg.flows);
    for _ in 0..cfg.flows.max(1) {
        let s = UdpSocket::bind(any)?;
        s.connect(target)?;
        socks.push(s);
    }
    let mut payload = vec![0u8; cfg.size.max(1)];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr() as *mut libc::c_void, iov_len: payload.len() };
    // SAFETY: mmsghdr is plain data; zero is "no name, no control".
    let mut msgs: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in msgs.iter_mut() {
        m.msg_hdr.msg_iov = &mut iov as *mut libc::iovec;
        m.msg_hdr.msg_iovlen = 1;
    }
    let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
    let dur = Duration::from_secs_f64(cfg.secs);
    let start = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut i = 0usize;
    'outer: loop {
        let now = Instant::now();
        let elapsed = now.duration_since(start);
        if elapsed >= dur {
            break;
        }
        if cfg.pps > 0 {
            let due = Duration::from_secs_f64(sent as f64 / cfg.pps as f64);
            if due > elapsed {
                let wait = due - elapsed;
                if wait > Duration::from_micros(200) {
                    thread::sleep(wait.min(dur - elapsed));
                }
                continue 'outer;
            }
        }
        let fd = fds[i];
        i = (i + 1) % fds.len();
        // SAFETY: msgs point at iov, which points at payload; all outlive the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), batch as u32, 0) };
        if n > 0 {
            sent += n as u64;
        } else {
            errors += 1;
            // ECONNREFUSED (nothing listening yet / ICMP), ENOBUFS: back off a little.
            thread::sleep(Duration::from_micros(50));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((sent, secs, errors))
}

/// Sink (optional) + sender in one process, each on its own thread.
pub fn run(cfg: &Config) -> std::io::Result<Report> {
    for a in cfg.target.iter().chain(cfg.sink.iter()) {
        if !is_loopback(a) {
            return Err(std::io::Error::other(format!("{a}: only loopback addresses are allowed")));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let hard_deadline = Instant::now() + Duration::from_secs_f64(cfg.secs + 5.0);
    let sink = match cfg.sink {
        Some(addr) => {
            let sock = bind_sink(addr, cfg.sink_rcvbuf)?;
            let stop = stop.clone();
            let (batch, cpu) = (cfg.batch.clamp(1, 1024), cfg.sink_cpu);
            Some(thread::spawn(move || {
                pin(cpu);
                sink_loop(&sock, batch, &stop, hard_deadline)
            }))
        }
        None => None,
    };
    let mut rep = Report::default();
    if cfg.target.is_some() {
        let c = cfg.clone();
        let sender = thread::spawn(move || {
            pin(c.sender_cpu);
            send_loop(&c)
        });
        let res = sender.join().map_err(|_| std::io::Error::other("sender panicked"));
        stop.store(true, Ordering::Relaxed);
        let (sent, secs, errs) = res??;
        rep.sent = sent;
        rep.send_secs = secs;
        rep.send_errors = errs;
    } else {
        thread::sleep(Duration::from_secs_f64(cfg.secs));
        rep.send_secs = cfg.secs;
        stop.store(true, Ordering::Relaxed);
    }
    if let Some(h) = sink {
        let (n, b, t) = h.join().map_err(|_| std::io::Error::other("sink panicked"))?;
        rep.received = n;
        rep.received_bytes = b;
        rep.truncated = t;
    }
    Ok(rep)
}

fn usage() -> ! {
    eprintln!(
        "usage: udpgen --target ADDR [--sink ADDR] [--size BYTES] [--flows N] [--secs S] [--pps N] \
         [--batch N] [--sender-cpu N] [--sink-cpu N] [--sink-rcvbuf BYTES]\n       udpgen --sink ADDR --secs S (sink only)"
    );
    std::process::exit(2)
}

#[allow(dead_code)]
fn main() {
    let mut cfg = Config::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage());
        match a.as_str() {
            "--target" => cfg.target = Some(val().parse().unwrap_or_else(|_| usage())),
            "--sink" => cfg.sink = Some(val().parse().unwrap_or_else(|_| usage())),
            "--size" => cfg.size = val().parse().unwrap_or_else(|_| usage()),
            "--flows" => cfg.flows = val().parse().unwrap_or_else(|_| usage()),
            "--secs" => cfg.secs = val().parse().unwrap_or_else(|_| usage()),
            "--pps" => cfg.pps = val().parse().unwrap_or_else(|_| usage()),
            "--batch" => cfg.batch = val().parse().unwrap_or_else(|_| usage()),
            "--sender-cpu" => cfg.sender_cpu = Some(val().parse().unwrap_or_else(|_| usage())),
            "--sink-cpu" => cfg.sink_cpu = Some(val().parse().unwrap_or_else(|_| usage())),
            "--sink-rcvbuf" => cfg.sink_rcvbuf = val().parse().unwrap_or_else(|_| usage()),
            "--bench" => {} // passed by `cargo bench` when built as a bench; ignore
            _ => usage(),
        }
    }
    if cfg.target.is_none() && cfg.sink.is_none() {
        usage();
    }
    if !(cfg.secs > 0.0 && cfg.secs <= 600.0)
        || cfg.size == 0
        || cfg.size > 65507
        || cfg.flows == 0
        || cfg.flows > 10000
    {
        eprintln!("udpgen: need 0 < secs <= 600, 1 <= size <= 65507, 1 <= flows <= 10000");
        std::process::exit(2);
    }
    match run(&cfg) {
        Ok(rep) => println!("{}", rep.line(&cfg)),
        Err(e) => {
            eprintln!("udpgen: {e}");
            std::process::exit(1);
        }
    }
}
