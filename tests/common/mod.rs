//! Helpers for end-to-end tests: run the real binary on loopback, with ports
//! picked by the OS, and small backends (echo, sink, source).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_splice-relay");

/// A port free on both IPv4 and IPv6 loopback/any (asked of the kernel).
pub fn free_port() -> u16 {
    // A dual-stack [::]:0 listener reserves the port for both families.
    let l = TcpListener::bind("[::]:0").expect("bind [::]:0");
    let port = l.local_addr().unwrap().port();
    // Make sure UDP is free on the same port too.
    if UdpSocket::bind(("::", port)).is_err() {
        return free_port();
    }
    port
}

/// A running relay; killed (SIGKILL) on drop if still alive.
pub struct Relay {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

impl Relay {
    /// Starts the relay with `args` and waits until it logged `ready_lines`
    /// "listening on" lines (every forward bound) or failed.
    pub fn start(args: &[&str]) -> Relay {
        Self::start_with(args, |_| {})
    }

    /// Like `start`, letting the caller adjust the command (env, rlimits).
    pub fn start_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Relay {
        let mut cmd = Command::new(BIN);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        cmd.env("RUST_LOG", "debug");
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("spawn relay");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let is_ready = line.contains("listening on") || line.contains("ERROR");
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
                if is_ready {
                    if let Some(t) = &tx {
                        if t.send(()).is_err() {
                            tx = None;
                        }
                    }
                }
            }
        });
        let expected = args.iter().filter(|a| a.contains('=') && !a.starts_with('-')).count().max(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = 0;
        while seen < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(()) => seen += 1,
                Err(_) => break,
            }
            if log.lock().unwrap().contains("ERROR") {
                break;
            }
        }
        // Ranges log one line per port: wait until the log stops growing.
        thread::sleep(Duration::from_millis(50));
        Relay { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The relay's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        unsafe_free_kill(self.pid(), sig);
    }

    /// Waits for exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Open fds of the relay, by what they point at.
    pub fn fds(&self) -> Fds {
        fds_of(self.pid())
    }

    /// (utime + stime) of the relay in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to `pid` through the kill(1) command (tests stay free of unsafe).
pub fn unsafe_free_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Counts of a process's open fds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fds {
    pub total: usize,
    pub sockets: usize,
    pub pipes: usize,
}

pub fn fds_of(pid: u32) -> Fds {
    let mut f = Fds::default();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            f.total += 1;
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy();
                if t.starts_with("socket:") {
                    f.sockets += 1;
                } else if t.starts_with("pipe:") {
                    f.pipes += 1;
                }
            }
        }
    }
    f
}

/// Polls `cond` every 20 ms until true or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP echo server on `addr` (port 0 for any); each connection echoes
/// until EOF, then shuts its write side. Runs until the process ends.
pub fn echo_server(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).expect("bind echo");
    let local = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    local
}

/// A UDP echo server on `addr`; returns its address.
pub fn udp_echo(addr: &str) -> SocketAddr {
    let s = UdpSocket::bind(addr).expect("bind udp echo");
    let local = s.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    local
}

/// Connects with a timeout, retrying briefly while the relay starts.
pub fn connect(addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs the binary to completion with `args`; returns (exit code, stderr).
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("run relay");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A deterministic byte pattern, different per `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
