//! The relay under test: started on ports picked for it (again on fresh
//! ports if one was taken meanwhile), ready once every listener is bound;
//! its log, fds, pipe-pool statistics and signals.

use super::{BIN, PATIENCE, SIGSTOP, SIGUSR1, free_port, free_ports, kill, tail, wait_until};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How many times a start is tried on fresh ports when one was taken.
const START_ATTEMPTS: usize = 5;

/// The pipe pool keeps at most this many spare pipes.
pub const POOL_MAX_SPARE: usize = 32;

/// Arguments as owned strings: `argv(["-q", &format!(..)])`.
pub fn argv<const N: usize>(args: [&str; N]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// The ports of one start attempt, picked as the arguments ask for them.
#[derive(Default)]
pub struct Ports {
    picked: Vec<u16>,
}

impl Ports {
    /// A free port (TCP and UDP, every address), distinct from those
    /// already picked.
    pub fn pick(&mut self) -> u16 {
        loop {
            let p = free_port();
            if !self.picked.contains(&p) {
                self.picked.push(p);
                return p;
            }
        }
    }

    /// The first of `n` consecutive free ports.
    pub fn range(&mut self, n: u16) -> u16 {
        loop {
            let base = free_ports(n);
            if (0..n).all(|i| !self.picked.contains(&(base + i))) {
                self.picked.extend(base..base + n);
                return base;
            }
        }
    }
}

/// How to start a relay: its RUST_LOG and a command it runs under.
#[derive(Clone)]
pub struct RelayCmd {
    log_level: String,
    under: Vec<String>,
    env: Vec<(String, String)>,
}

impl Default for RelayCmd {
    fn default() -> Self {
        RelayCmd { log_level: "debug".into(), under: Vec::new(), env: Vec::new() }
    }
}

impl RelayCmd {
    /// RUST_LOG for the relay (default `debug`; at least `info`, as
    /// readiness is read from the log).
    pub fn log(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// Sets an environment variable for the relay.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the relay as `prefix... BIN ARGS` (e.g. prlimit, setpriv).
    pub fn under(mut self, prefix: &[&str]) -> Self {
        self.under = prefix.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Starts the relay with the arguments `args` makes, on ports it picks
    /// from its [`Ports`], and waits until every listener is bound (one
    /// "listening on" line per listening port, and the metrics line). If
    /// the relay could not bind because a port was taken since it was
    /// found free, starts again on fresh ports. Any other start-up failure
    /// fails the test with the relay's log.
    pub fn start(&self, args: impl Fn(&mut Ports) -> Vec<String>) -> Relay {
        raise_fd_limit();
        for attempt in 1..=START_ATTEMPTS {
            let mut ports = Ports::default();
            let argv = args(&mut ports);
            match self.try_start(&argv, ports.picked) {
                Ok(r) => return r,
                Err(log) if attempt < START_ATTEMPTS && log.contains("Address already in use") => continue,
                Err(log) => panic!("relay {argv:?} did not start (attempt {attempt}); log:\n{log}"),
            }
        }
        unreachable!()
    }

    fn try_start(&self, argv: &[String], ports: Vec<u16>) -> Result<Relay, String> {
        let mut cmd = match self.under.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(argv).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        cmd.env("RUST_LOG", &self.log_level);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let reader = {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let want = listeners_in(argv);
        let metrics = argv.iter().any(|a| a == "--metrics" || a.starts_with("--metrics="));
        let mut exited = false;
        let ready = wait_until(Duration::from_secs(20), || {
            let log = log.lock().unwrap();
            if log.contains(" ERROR ") || log.contains("splice-relay: ") {
                return true;
            }
            exited = child.try_wait().unwrap().is_some();
            exited || (log.matches("listening on").count() >= want && (!metrics || log.contains("metrics on")))
        });
        let failed = {
            let log = log.lock().unwrap();
            log.contains(" ERROR ") || log.contains("splice-relay: ")
        };
        if ready && !failed && !exited {
            return Ok(Relay { child, log, ports, reader: Some(reader) });
        }
        let _ = child.kill();
        let status = child.wait();
        let _ = reader.join();
        let log = log.lock().unwrap().clone();
        if !ready {
            return Err(format!("not ready in 20 s ({want} listeners expected)\n{log}"));
        }
        Err(format!("exit {status:?}\n{log}"))
    }
}

/// Raises this process's soft open-file limit to the hard limit, once:
/// some tests hold thousands of sockets (clients and backends), more than
/// the usual soft limit of 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise the open-file limit");
        }
    });
}

/// How many listening ports the relay arguments ask for: each FORWARD
/// argument or config-file line listens on one port, or one per port of a
/// range.
fn listeners_in(argv: &[String]) -> usize {
    let mut n = 0;
    let mut args = argv.iter();
    while let Some(a) = args.next() {
        let file =
            if a == "-c" || a == "--config" { args.next().map(String::as_str) } else { a.strip_prefix("--config=") };
        if let Some(file) = file {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            n += text
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(ports_of)
                .sum::<usize>();
        } else if !a.starts_with('-') && a.contains('=') {
            n += ports_of(a);
        }
    }
    n
}

/// Ports one FORWARD listens on: 1, or B-A+1 for a range A-B.
fn ports_of(forward: &str) -> usize {
    let listen = forward.split('=').next().unwrap_or("");
    let port = listen.rsplit(':').next().unwrap_or("");
    match port.split_once('-') {
        Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
            (Ok(a), Ok(b)) if b >= a => b - a + 1,
            _ => 1,
        },
        None => 1,
    }
}

/// A running relay; killed (SIGKILL) on drop if still alive.
pub struct Relay {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    /// The ports picked for it, in the order its arguments asked for them.
    pub ports: Vec<u16>,
    /// The thread copying its stderr into `log`, until EOF.
    reader: Option<thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay at log level debug: see [`RelayCmd::start`].
    pub fn start(args: impl Fn(&mut Ports) -> Vec<String>) -> Relay {
        RelayCmd::default().start(args)
    }

    /// A relay command to adjust before starting.
    pub fn cmd() -> RelayCmd {
        RelayCmd::default()
    }

    /// The first port picked for it.
    pub fn port(&self) -> u16 {
        self.ports[0]
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
        kill(self.pid(), sig);
    }

    /// Stops the relay (SIGSTOP) and waits until it is stopped, so what is
    /// sent now queues up until SIGCONT.
    pub fn stop(&self) {
        self.signal(SIGSTOP);
        let stopped = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
            stat.rsplit(')').next().unwrap_or("").split_whitespace().next() == Some("T")
        };
        assert!(wait_until(PATIENCE, stopped), "relay not stopped by SIGSTOP");
    }

    /// Waits for exit, at most `limit`; once it exited, the log is complete.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Fails the test if the relay has exited.
    pub fn assert_alive(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "relay exited; log:\n{}", tail(&self.log(), 40));
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

    /// How often `what` occurs in the log so far.
    pub fn count(&self, what: &str) -> usize {
        self.log().matches(what).count()
    }

    /// Waits until `what` occurs `n` times in the log (lines reach the log a
    /// moment after the relay writes them), and fails the test if it occurs
    /// fewer or more times.
    pub fn assert_count(&self, what: &str, n: usize) {
        wait_until(PATIENCE, || self.count(what) >= n);
        assert_eq!(self.count(what), n, "{what:?} in the log:\n{}", tail(&self.log(), 30));
    }

    /// Waits until the log holds `what`; fails the test with the log if it
    /// does not within [`PATIENCE`].
    pub fn expect_log(&self, what: &str) {
        assert!(
            wait_until(PATIENCE, || self.log().contains(what)),
            "no {what:?} in the log:\n{}",
            tail(&self.log(), 30)
        );
    }

    /// Asks for statistics (SIGUSR1) and returns the pipe pool's (lent,
    /// spare) from the fresh `stats pipes` line.
    pub fn pipe_stats(&self) -> (usize, usize) {
        const LINE: &str = "stats pipes in_use";
        let before = self.count(LINE);
        self.signal(SIGUSR1);
        assert!(
            wait_until(PATIENCE, || self.count(LINE) > before),
            "no stats line after SIGUSR1:\n{}",
            tail(&self.log(), 20)
        );
        let log = self.log();
        let line = log.lines().filter(|l| l.contains(LINE)).nth(before).unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |k: &str| -> usize {
            let i = words.iter().position(|w| *w == k).unwrap_or_else(|| panic!("no {k} in {line:?}"));
            words[i + 1].parse().unwrap_or_else(|_| panic!("bad {k} in {line:?}"))
        };
        (after("in_use"), after("spare"))
    }

    /// What the relay holds at rest (no pipe lent).
    pub fn baseline(&self) -> Baseline {
        let (lent, spare) = self.pipe_stats();
        assert_eq!(lent, 0, "pipes lent at rest");
        Baseline { fds: self.fds(), spare }
    }

    /// Waits until the relay holds exactly its baseline sockets and other
    /// fds, lends no pipe, and holds exactly two pipe fds per spare pipe
    /// of the pool beside its own: no socket, pipe or other fd leaked.
    /// Returns the pool's spare count.
    pub fn assert_back_to_baseline(&self, base: Baseline) -> usize {
        let mut last = None;
        let settled = wait_until(PATIENCE, || {
            let f = self.fds();
            let (lent, spare) = self.pipe_stats();
            last = Some((f, lent, spare));
            f == self.fds()
                && f.sockets == base.fds.sockets
                && f.total - f.pipes == base.fds.total - base.fds.pipes
                && lent == 0
                && f.pipes == base.own_pipes() + 2 * spare
                && spare <= POOL_MAX_SPARE
        });
        assert!(
            settled,
            "relay fds not back to baseline: now (fds, lent, spare) {last:?}, baseline {base:?}\nlog tail:\n{}",
            tail(&self.log(), 30)
        );
        last.unwrap().2
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the relay holds at rest: its fds, and how many of its pipe fds are
/// the pool's spare pipes (the rest, e.g. its stderr, are its own).
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    pub fds: Fds,
    pub spare: usize,
}

impl Baseline {
    /// Pipe fds that are not the pool's.
    pub fn own_pipes(&self) -> usize {
        self.fds.pipes - 2 * self.spare
    }
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

/// Runs the binary to completion with `args`; returns (exit code, stderr).
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("run relay");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}
