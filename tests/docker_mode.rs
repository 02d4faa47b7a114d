//! docker-proxy compatibility: the real binary
//! started by a fake dockerd, a small Python script that passes the fd 3
//! status pipe (and the fd 4 socket of `-use-listen-fd`), reads the
//! handshake and reports the exit status.
mod common;
use common::*;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::{Duration, Instant};

/// The fake dockerd. argv: KIND HOST PORT STDERR RELAY ARGS...
/// KIND is none, tcp or udp (the fd 4 socket to create); STDERR a file for
/// the relay's stderr or "-" for /dev/null. Prints `BINDERR errno` and
/// exits if it cannot bind the fd 4 socket; else `PID n`, `PIPE inode`,
/// `HANDSHAKE hex eof`, then obeys commands on stdin: `int`, `term`
/// (signal, then wait) and `wait`, each answered `EXIT code` (or `EXIT
/// timeout` after 15 s). On stdin EOF it kills the relay.
const FAKE_DOCKERD: &str = r#"
import fcntl, os, select, signal, socket, subprocess, sys, time
kind, host, port, errpath = sys.argv[1:5]
argv = sys.argv[5:]
def high(fd):
    n = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 50)
    os.close(fd)
    return n
lfd = None
if kind != 'none':
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if kind == 'tcp' else socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if kind == 'tcp':
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    elif fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO
    try:
        s.bind((host, int(port)))
    except OSError as e:
        print('BINDERR', e.errno, flush=True)
        sys.exit(0)
    if kind == 'tcp':
        s.listen(128)
    lfd = high(s.detach())
r, w = os.pipe()
r, w = high(r), high(w)
os.dup2(w, 3)
os.close(w)
fds = [3]
if lfd is not None:
    os.dup2(lfd, 4)
    os.close(lfd)
    fds.append(4)
err = subprocess.DEVNULL if errpath == '-' else open(errpath, 'wb')
p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, pass_fds=fds)
for fd in fds:
    os.close(fd)
print('PID', p.pid, flush=True)
print('PIPE', os.fstat(r).st_ino, flush=True)
data, eof, deadline = b'', 0, time.time() + 20
while time.time() < deadline:
    ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.time()))
    if not ready:
        break
    chunk = os.read(r, 4096)
    if not chunk:
        eof = 1
        break
    data += chunk
print('HANDSHAKE', data.hex() or '-', eof, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd in ('int', 'term'):
        p.send_signal(signal.SIGINT if cmd == 'int' else signal.SIGTERM)
    try:
        code = p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        code = 'timeout'
    print('EXIT', code, flush=True)
p.kill()
p.wait()
"#;

/// What to pass as fd 4.
#[derive(Clone, Copy)]
enum ListenFd<'a> {
    None,
    Tcp(&'a str, u16),
    Udp(&'a str, u16),
}

struct Dockerd {
    py: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    relay_pid: u32,
    pipe_inode: String,
    handshake: Vec<u8>,
    eof: bool,
}

/// EADDRINUSE, as Python reports it.
const EADDRINUSE: &str = "98";

impl Dockerd {
    /// Starts the relay through the fake dockerd on a free host port, and
    /// waits for the handshake: `setup` makes the fd 4 socket and the
    /// relay's arguments for a port. If the port was taken meanwhile (the
    /// fake dockerd or the relay reports it in use), tries again on another.
    fn start_on_free_port(
        stderr: Option<&PathBuf>,
        env: &[(&str, &str)],
        setup: impl Fn(u16) -> (ListenFd<'static>, Vec<String>),
    ) -> (Dockerd, u16) {
        for _ in 0..5 {
            let port = free_port();
            let (listen, args) = setup(port);
            let Some(d) = Dockerd::try_start(listen, stderr, &strs(&args), env) else { continue };
            if d.handshake.starts_with(b"1\n") && d.handshake_text().contains("in use") {
                continue;
            }
            return (d, port);
        }
        panic!("no free host port in 5 tries");
    }

    /// Starts the relay through the fake dockerd and waits for the handshake.
    fn start(listen: ListenFd<'_>, stderr: Option<&PathBuf>, args: &[&str], env: &[(&str, &str)]) -> Dockerd {
        Dockerd::try_start(listen, stderr, args, env).expect("the fake dockerd cannot bind the fd 4 socket: in use")
    }

    /// [`Dockerd::start`], or None if the fd 4 socket's port is in use.
    fn try_start(
        listen: ListenFd<'_>,
        stderr: Option<&PathBuf>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Option<Dockerd> {
        let (kind, host, port) = match listen {
            ListenFd::None => ("none", "-".to_string(), 0),
            ListenFd::Tcp(h, p) => ("tcp", h.to_string(), p),
            ListenFd::Udp(h, p) => ("udp", h.to_string(), p),
        };
        let err = stderr.map_or("-".to_string(), |p| p.to_string_lossy().into_owned());
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(FAKE_DOCKERD).args([kind, &host, &port.to_string(), &err, BIN]).args(args);
        cmd.env_remove("RUST_LOG").env_remove("SPLICE_RELAY_OPTS").env_remove("SPLICE_RELAY_LOG");
        cmd.env_remove("SPLICE_RELAY_PROXY_PORTS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        require_command("python3", "apt-get install python3");
        let mut py =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("python3");
        let stdout = py.stdout.take().unwrap();
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Dockerd {
            stdin: py.stdin.take(),
            py,
            lines,
            relay_pid: 0,
            pipe_inode: String::new(),
            handshake: Vec::new(),
            eof: false,
        };
        let first = d.lines.recv_timeout(Duration::from_secs(30)).expect("fake dockerd: no PID line");
        if let Some(errno) = first.strip_prefix("BINDERR ") {
            assert_eq!(errno, EADDRINUSE, "fake dockerd cannot bind {host}:{port}");
            return None;
        }
        d.relay_pid =
            first.strip_prefix("PID ").unwrap_or_else(|| panic!("fake dockerd said {first:?}")).parse().unwrap();
        d.pipe_inode = d.line("PIPE", Duration::from_secs(30));
        let hs = d.line("HANDSHAKE", Duration::from_secs(30));
        let (hex, eof) = hs.split_once(' ').unwrap();
        d.handshake = if hex == "-" { Vec::new() } else { unhex(hex) };
        d.eof = eof == "1";
        Some(d)
    }

    /// The next line, which must start with `word`; returns the rest.
    fn line(&self, word: &str, limit: Duration) -> String {
        let line = self.lines.recv_timeout(limit).unwrap_or_else(|_| panic!("fake dockerd: no {word} line"));
        line.strip_prefix(word)
            .and_then(|r| r.strip_prefix(' '))
            .unwrap_or_else(|| panic!("fake dockerd said {line:?}, expected {word}"))
            .to_string()
    }

    /// Sends `int`, `term` or `wait`; returns the relay's exit status as
    /// Python reports it ("0", "1", "-9", "timeout").
    fn command(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        self.line("EXIT", Duration::from_secs(30))
    }

    fn handshake_text(&self) -> String {
        String::from_utf8_lossy(&self.handshake).into_owned()
    }

    /// True while the relay process exists and is not a zombie.
    fn relay_alive(&self) -> bool {
        process_alive(self.relay_pid)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // EOF on its stdin makes the fake dockerd kill the relay and exit.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.py.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.py.kill();
        let _ = self.py.wait();
        if self.relay_alive() {
            kill(self.relay_pid, SIGKILL);
        }
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").split_whitespace().next().unwrap_or("");
            !matches!(state, "Z" | "X" | "x")
        }
        Err(_) => false,
    }
}

/// A unique path in the temp directory.
fn temp_path(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    std::env::temp_dir().join(format!("splice-relay-test-{}-{tag}-{nanos}", std::process::id()))
}

/// dockerd's argv for one port mapping.
fn docker_args(proto: &str, host_ip: &str, host_port: u16, container_ip: &str, container_port: u16) -> Vec<String> {
    [
        "-proto",
        proto,
        "-host-ip",
        host_ip,
        "-host-port",
        &host_port.to_string(),
        "-container-ip",
        container_ip,
        "-container-port",
        &container_port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// 100 KB through the relay to a TCP echo backend and back, with half-close.
fn tcp_echo_through(addr: &str, seed: u64) {
    echo_once(addr, seed, 100_000);
}

/// One datagram through the relay to a UDP echo backend; returns the reply's source.
fn udp_echo_through(bind: &str, to: &str, seed: u64) -> SocketAddr {
    let s = udp_client(bind, PATIENCE);
    let to: SocketAddr = to.parse().unwrap();
    let data = pattern(seed, 1000);
    let unexpected = |d: &[u8]| Err(format!("unexpected {}-byte reply", d.len()));
    match round_trip_checked(&s, to, &data, unexpected) {
        Ok(Some(from)) => from,
        Ok(None) => panic!("no UDP echo through {to}"),
        Err(e) => panic!("{e}"),
    }
}

/// The relay's fds that point at `target` (e.g. "pipe:[123]").
fn fds_pointing_at(pid: u32, target: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == target) {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The fd's open flags (octal in /proc/PID/fdinfo).
fn fd_flags(pid: u32, fd: u32) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).expect("flags in fdinfo");
    u32::from_str_radix(flags.trim(), 8).unwrap()
}

const O_NONBLOCK: u32 = 0o4000;
const O_CLOEXEC: u32 = 0o2000000;

#[test]
fn tcp_without_listen_fd_like_dockerd_up_to_27() {
    let backend = echo_server("127.0.0.1:0");
    let (mut d, port) = Dockerd::start_on_free_port(None, &[], |port| {
        let args = docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port());
        (ListenFd::None, args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    assert!(d.eof, "fd 3 must be closed after the handshake");
    // Not even an inherited copy of the status pipe is left open.
    let pipe = format!("pipe:[{}]", d.pipe_inode);
    assert_eq!(fds_pointing_at(d.relay_pid, &pipe), Vec::<String>::new(), "fds still on the status pipe");
    // The argument list stays as given (moby's tests read it back with ps).
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", d.relay_pid)).unwrap();
    let mut expected = vec![BIN.to_string()];
    expected.extend(docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port()));
    let got: Vec<String> =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
    assert_eq!(got, expected);
    // Soft RLIMIT_NOFILE raised to the hard limit.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.relay_pid)).unwrap();
    let nofile: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().skip(3).take(2).collect();
    assert_eq!(nofile[0], nofile[1], "soft open-file limit not raised: {limits}");

    tcp_echo_through(&format!("127.0.0.1:{port}"), 1);
    // SIGHUP: docker mode has nothing to reload; it is logged, never fatal.
    kill(d.relay_pid, 1);
    tcp_echo_through(&format!("127.0.0.1:{port}"), 2);
    assert_eq!(d.command("int"), "0", "SIGINT must end the relay with status 0");
}

#[test]
fn ipv6_host_ip_to_ipv4_container_tcp_and_udp() {
    let backend = echo_server("127.0.0.1:0");
    let (mut d, port) = Dockerd::start_on_free_port(None, &[], |port| {
        let args = docker_args("tcp", "::1", port, "127.0.0.1", backend.port());
        (ListenFd::None, args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    tcp_echo_through(&format!("[::1]:{port}"), 3);
    // The IPv6 host address is bound IPv6-only: nothing on 127.0.0.1.
    let refused = TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_secs(2));
    assert!(refused.is_err(), "an IPv6 host binding must not take IPv4 clients");
    assert_eq!(d.command("term"), "0", "SIGTERM must end the relay with status 0");

    let ubackend = udp_echo("127.0.0.1:0");
    let (mut d, uport) = Dockerd::start_on_free_port(None, &[], |port| {
        let args = docker_args("udp", "::1", port, "127.0.0.1", ubackend.port());
        (ListenFd::None, args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    let to = format!("[::1]:{uport}");
    let from = udp_echo_through("[::1]:0", &to, 4);
    assert_eq!(from.to_string(), to, "reply source");
    assert_eq!(d.command("int"), "0");
}

#[test]
fn tcp_with_listen_fd_like_dockerd_28() {
    let backend = echo_server("127.0.0.1:0");
    let (mut d, port) = Dockerd::start_on_free_port(None, &[], |port| {
        let mut args = docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port());
        args.push("-use-listen-fd".into());
        (ListenFd::Tcp("127.0.0.1", port), args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    assert!(d.eof);
    // The relay uses fd 4 as given, made non-blocking and close-on-exec, and binds nothing itself.
    let flags = fd_flags(d.relay_pid, 4);
    assert_eq!(flags & (O_NONBLOCK | O_CLOEXEC), O_NONBLOCK | O_CLOEXEC, "fd 4 flags {flags:o}");
    assert_eq!(fds_of(d.relay_pid).sockets, 1, "only the inherited socket: {:?}", fds_of(d.relay_pid));
    tcp_echo_through(&format!("127.0.0.1:{port}"), 5);
    assert_eq!(d.command("int"), "0");
}

#[test]
fn udp_with_listen_fd_like_dockerd_28() {
    let backend = udp_echo("127.0.0.1:0");
    let (mut d, port) = Dockerd::start_on_free_port(None, &[], |port| {
        let mut args = docker_args("udp", "127.0.0.1", port, "127.0.0.1", backend.port());
        args.push("-use-listen-fd".into());
        (ListenFd::Udp("127.0.0.1", port), args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    let flags = fd_flags(d.relay_pid, 4);
    assert_eq!(flags & (O_NONBLOCK | O_CLOEXEC), O_NONBLOCK | O_CLOEXEC, "fd 4 flags {flags:o}");
    assert_eq!(fds_of(d.relay_pid).sockets, 1, "only the inherited socket: {:?}", fds_of(d.relay_pid));
    let to = format!("127.0.0.1:{port}");
    assert_eq!(udp_echo_through("127.0.0.1:0", &to, 6).to_string(), to);
    assert_eq!(udp_echo_through("127.0.0.1:0", &to, 7).to_string(), to);
    assert_eq!(d.command("int"), "0");

    // The same over IPv6 (an IPv6-only socket with IPV6_RECVPKTINFO).
    let (mut d, port) = Dockerd::start_on_free_port(None, &[], |port| {
        let mut args = docker_args("udp", "::1", port, "127.0.0.1", backend.port());
        args.push("-use-listen-fd".into());
        (ListenFd::Udp("::1", port), args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    let to = format!("[::1]:{port}");
    assert_eq!(udp_echo_through("[::1]:0", &to, 8).to_string(), to);
    assert_eq!(d.command("int"), "0");
}

#[test]
fn host_port_in_use_fails_the_handshake() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let args = docker_args("tcp", "127.0.0.1", port, "127.0.0.1", 9);
    let mut d = Dockerd::start(ListenFd::None, None, &strs(&args), &[]);
    let text = d.handshake_text();
    assert!(d.handshake.starts_with(b"1\n"), "handshake: {text:?}");
    assert!(text.contains("in use"), "handshake: {text:?}");
    assert!(d.eof);
    assert_eq!(d.command("wait"), "1");

    let ubusy = UdpSocket::bind("127.0.0.1:0").unwrap();
    let uport = ubusy.local_addr().unwrap().port();
    let args = docker_args("udp", "127.0.0.1", uport, "127.0.0.1", 9);
    let mut d = Dockerd::start(ListenFd::None, None, &strs(&args), &[]);
    let text = d.handshake_text();
    assert!(d.handshake.starts_with(b"1\n") && text.contains("in use"), "handshake: {text:?}");
    assert_eq!(d.command("wait"), "1");
}

#[test]
fn sctp_fails_the_handshake() {
    // Refused before anything is bound: any port will do.
    let args = docker_args("sctp", "127.0.0.1", free_port(), "127.0.0.1", 9);
    let mut d = Dockerd::start(ListenFd::None, None, &strs(&args), &[]);
    let text = d.handshake_text();
    assert!(d.handshake.starts_with(b"1\n") && text.contains("sctp"), "handshake: {text:?}");
    assert!(d.eof);
    assert_eq!(d.command("wait"), "1");
}

#[test]
fn listen_fd_flag_without_fd_4_fails_the_handshake() {
    let mut args = docker_args("tcp", "127.0.0.1", free_port(), "127.0.0.1", 9);
    args.push("-use-listen-fd".into());
    let mut d = Dockerd::start(ListenFd::None, None, &strs(&args), &[]);
    let text = d.handshake_text();
    assert!(d.handshake.starts_with(b"1\n") && text.contains("fd 4"), "handshake: {text:?}");
    assert_eq!(d.command("wait"), "1");
}

#[test]
fn bad_flag_is_a_usage_error_with_nothing_on_fd_3() {
    let err_path = temp_path("bogus.err");
    let port = free_port();
    let mut args = docker_args("tcp", "127.0.0.1", port, "127.0.0.1", 9);
    args.push("-bogus".into());
    let mut d = Dockerd::start(ListenFd::None, Some(&err_path), &strs(&args), &[]);
    assert_eq!(d.handshake, b"", "nothing may be written to fd 3 on a usage error");
    assert!(d.eof);
    assert_eq!(d.command("wait"), "2");
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    assert!(stderr.contains("-bogus"), "stderr: {stderr}");
    assert!(stderr.contains("Usage"), "stderr: {stderr}");
    assert!(stderr.contains("-container-port"), "stderr: {stderr}");

    // A bad value, too.
    let args = ["-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", "x80"];
    let (code, stderr) = run_to_exit(&args);
    assert_eq!(code, 2, "stderr: {stderr}");
    assert!(stderr.contains("x80") && stderr.contains("Usage"), "stderr: {stderr}");
}

#[test]
fn version_flags() {
    for flag in ["-v", "-version", "--version"] {
        let out = Command::new(BIN).arg(flag).stdin(Stdio::null()).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{flag}: stderr {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{flag}: {stdout}");
        assert_eq!(stdout.lines().count(), 1, "{flag}: one version line: {stdout:?}");
    }
}

#[test]
fn go_flag_spellings_end_to_end() {
    let backend = echo_server("127.0.0.1:0");
    let (mut d, port) = Dockerd::start_on_free_port(None, &[], |port| {
        let args = vec![
            "--proto=tcp".to_string(),
            "-host-ip=127.0.0.1".into(),
            format!("--host-port={port}"),
            "--container-ip".into(),
            "127.0.0.1".into(),
            format!("-container-port={}", backend.port()),
            "-use-listen-fd=true".into(),
        ];
        (ListenFd::Tcp("127.0.0.1", port), args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    tcp_echo_through(&format!("127.0.0.1:{port}"), 9);
    assert_eq!(d.command("int"), "0");

    // -use-listen-fd=false: the relay binds its own socket.
    let (mut d, port) = Dockerd::start_on_free_port(None, &[], |port| {
        let mut args = docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port());
        args.push("-use-listen-fd=false".into());
        (ListenFd::None, args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    tcp_echo_through(&format!("127.0.0.1:{port}"), 10);
    assert_eq!(d.command("int"), "0");
}

#[test]
fn relay_exits_when_dockerd_dies() {
    let backend = echo_server("127.0.0.1:0");
    let (mut d, port) = Dockerd::start_on_free_port(None, &[], |port| {
        let args = docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port());
        (ListenFd::None, args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    tcp_echo_through(&format!("127.0.0.1:{port}"), 11);
    assert!(d.relay_alive());
    d.py.kill().unwrap(); // SIGKILL: no chance to clean up
    d.py.wait().unwrap();
    let pid = d.relay_pid;
    assert!(wait_until(PATIENCE, || !process_alive(pid)), "relay {pid} outlived its parent");
}

#[test]
fn logs_go_to_the_file_named_by_splice_relay_log() {
    let log = temp_path("docker.log");
    let backend = echo_server("127.0.0.1:0");
    let port = free_port();
    let args = docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port());
    let env = [("SPLICE_RELAY_LOG", log.to_str().unwrap()), ("RUST_LOG", "debug")];
    let mut d = Dockerd::start(ListenFd::None, None, &strs(&args), &env);
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    tcp_echo_through(&format!("127.0.0.1:{port}"), 12);
    assert_eq!(d.command("int"), "0");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(text.lines().any(|l| l.contains("listening on") && l.contains(&port.to_string())), "log file: {text:?}");
}

#[test]
fn splice_relay_opts_are_honoured() {
    let backend = echo_server("127.0.0.1:0");
    let (mut d, port) = Dockerd::start_on_free_port(None, &[("SPLICE_RELAY_OPTS", "--max-connections 1")], |port| {
        let args = docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port());
        (ListenFd::None, args)
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    let addr = format!("127.0.0.1:{port}");
    let mut first = connect(&addr);
    first.write_all(b"first").unwrap();
    let mut buf = [0u8; 16];
    first.read_exact(&mut buf[..5]).unwrap();
    assert_eq!(&buf[..5], b"first");
    // The second client waits in the backlog while the first is open.
    let mut second = connect(&addr);
    second.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    second.write_all(b"second").unwrap();
    match second.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("second client served while the first is open (--max-connections 1): {other:?}"),
    }
    drop(first);
    second.set_read_timeout(Some(PATIENCE)).unwrap();
    second.read_exact(&mut buf[..6]).unwrap();
    assert_eq!(&buf[..6], b"second");
    assert_eq!(d.command("int"), "0");

    let args = docker_args("tcp", "127.0.0.1", free_port(), "127.0.0.1", backend.port());
    let mut d = Dockerd::start(ListenFd::None, None, &strs(&args), &[("SPLICE_RELAY_OPTS", "--bogus")]);
    let text = d.handshake_text();
    assert!(d.handshake.starts_with(b"1\n") && text.contains("SPLICE_RELAY_OPTS"), "handshake: {text:?}");
    assert!(text.contains("--bogus"), "handshake: {text:?}");
    assert_eq!(d.command("wait"), "1");
}

/// `--allow` / `--deny` in SPLICE_RELAY_OPTS apply to docker mode's forward.
#[test]
fn splice_relay_opts_access_lists_apply() {
    let backend = echo_server("127.0.0.1:0");
    let (mut d, port) = Dockerd::start_on_free_port(None, &[("SPLICE_RELAY_OPTS", "--allow 10.0.0.0/8")], |port| {
        (ListenFd::None, docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port()))
    });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    assert!(refused(&format!("127.0.0.1:{port}"), b"hello"), "127.0.0.1 not refused by --allow 10.0.0.0/8");
    assert_eq!(d.command("int"), "0");
    let (mut d, port) =
        Dockerd::start_on_free_port(None, &[("SPLICE_RELAY_OPTS", "--allow 127.0.0.0/8 --deny 10.0.0.1")], |port| {
            (ListenFd::None, docker_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port()))
        });
    assert_eq!(d.handshake, b"0\n", "handshake: {:?}", d.handshake_text());
    tcp_echo_through(&format!("127.0.0.1:{port}"), 7);
    assert_eq!(d.command("int"), "0");
}
