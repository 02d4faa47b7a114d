//! Helpers shared by the benches: find and start the relay, read its CPU time,
//! memory and fd count from /proc, pin threads, free ports, markdown tables.
//! Loopback only; every wait is bounded.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The relay binary: `$SPLICE_RELAY_BIN`, else the one cargo built for this
/// bench (`CARGO_BIN_EXE_splice-relay`), else `target/release/splice-relay`
/// next to the bench executable (`target/release/deps/tcp-HASH`).
pub fn relay_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SPLICE_RELAY_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_splice-relay") {
        let p = PathBuf::from(p);
        if p.exists() {
            return p;
        }
    }
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe.parent().and_then(|d| d.parent()).map(|d| d.join("splice-relay"));
    match p {
        Some(p) if p.exists() => p,
        _ => panic!("splice-relay binary not found: build it (cargo build --release) or set SPLICE_RELAY_BIN"),
    }
}

/// Environment knob with a default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn ncpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// CPU layout: the relay on the last CPU, the bench's own threads on CPU 0,
/// as in scripts/bench-peers.sh. Off with BENCH_PIN=0 or on one CPU.
pub fn pinning() -> Option<(usize, usize)> {
    let n = ncpus();
    if n < 2 || !env_or("BENCH_PIN", true) { None } else { Some((0, n - 1)) }
}

fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// Pin the calling thread to one CPU (best effort).
pub fn pin_current_thread(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let set = cpu_set(cpu);
        // SAFETY: pid 0 is the calling thread; set is a valid cpu_set_t.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    }
}

/// Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur
    }
}

/// A loopback TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// A loopback UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// A running relay; killed (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Relay {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Relay {
    /// Start the relay with `args`, pinned to `cpu`, and wait (bounded) until
    /// it has logged `listeners` "listening on" lines.
    pub fn start(args: &[String], cpu: Option<usize>, listeners: usize) -> Relay {
        let bin = relay_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(args).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        if let Some(cpu) = cpu {
            let set = cpu_set(cpu);
            // SAFETY: sched_setaffinity is async-signal-safe; no allocation after fork.
            unsafe {
                cmd.pre_exec(move || {
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining stderr so the relay never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("BENCH_VERBOSE").is_some() {
                    eprintln!("[relay] {line}");
                }
                let _ = tx.send(line);
            }
        });
        let mut relay = Relay { child, lines: rx };
        relay.wait_listening(listeners, Duration::from_secs(10));
        relay
    }

    fn wait_listening(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let mut log = Vec::new();
        while seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => {
                    if line.contains("listening on") {
                        seen += 1;
                    }
                    log.push(line);
                }
                Err(_) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        panic!("relay exited ({st}) before listening:\n{}", log.join("\n"));
                    }
                    if Instant::now() >= deadline {
                        panic!("relay did not log {n} 'listening on' lines in {timeout:?}:\n{}", log.join("\n"));
                    }
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child by pid; it is not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.len() < 13 {
        return 0.0;
    }
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// (RSS, PSS) of a process in KiB, from /proc/PID/smaps_rollup.
pub fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Kernel UDP counters (IPv4 + IPv6 summed): (InDatagrams, RcvbufErrors).
pub fn udp_kernel_counters() -> (u64, u64) {
    let mut in_dg = 0;
    let mut rcvbuf = 0;
    if let Ok(t) = std::fs::read_to_string("/proc/net/snmp") {
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("Udp:")).collect();
        if lines.len() >= 2 {
            let names: Vec<&str> = lines[0].split_whitespace().collect();
            let vals: Vec<&str> = lines[1].split_whitespace().collect();
            for (n, v) in names.iter().zip(vals.iter()) {
                match *n {
                    "InDatagrams" => in_dg += v.parse::<u64>().unwrap_or(0),
                    "RcvbufErrors" => rcvbuf += v.parse::<u64>().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    if let Ok(t) = std::fs::read_to_string("/proc/net/snmp6") {
        for l in t.lines() {
            let mut it = l.split_whitespace();
            match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
                (Some("Udp6InDatagrams"), Some(v)) => in_dg += v,
                (Some("Udp6RcvbufErrors"), Some(v)) => rcvbuf += v,
                _ => {}
            }
        }
    }
    (in_dg, rcvbuf)
}

/// Median of a non-empty slice (NaN-free).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 { s[m] } else { (s[m - 1] + s[m]) / 2.0 }
}

/// Print a markdown table.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    println!("| {} |", header.join(" | "));
    println!("|{}", header.iter().map(|_| "---|").collect::<String>());
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
    println!();
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Short description of the relay build and machine, printed above the tables.
pub fn preamble(what: &str) {
    let pin = match pinning() {
        Some((b, r)) => format!("relay pinned to CPU {r}, bench threads to CPU {b}"),
        None => "no pinning".to_string(),
    };
    println!("## splice-relay {what} bench\n");
    println!("relay: `{}`; {} CPUs; {pin}\n", relay_bin().display(), ncpus());
}
