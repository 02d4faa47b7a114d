//! Start-up errors through the real binary: the exit status, and stderr,
//! which holds exactly one line `splice-relay: <message>` for a mistake.
mod common;
use common::*;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

/// How a run ended: the exit code (None: still running after 10 s, then
/// killed), stdout and stderr.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` (no RUST_LOG) and waits for it to exit, at
/// most 10 s. Output is read as it comes, so a huge one cannot block it;
/// only its first 64 KiB is kept.
fn run<S: AsRef<OsStr>>(args: &[S]) -> Outcome {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");
    // Keeps the first 64 KiB (enough for any assertion message), drains the rest.
    let read_all = |r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut r = r;
            let mut buf = Vec::new();
            let _ = r.by_ref().take(64 << 10).read_to_end(&mut buf);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let mut code = None;
    let exited = wait_until(Duration::from_secs(10), || match child.try_wait() {
        Ok(Some(st)) => {
            code = st.code();
            true
        }
        _ => false,
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    Outcome { code, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Asserts that `args` exit with `code` and print exactly `splice-relay: {line}`.
fn expect_error<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], code: i32, line: &str) {
    let out = run(args);
    let expected = format!("splice-relay: {line}\n");
    let stderr = head(&out.stderr);
    assert_eq!(out.code, Some(code), "{args:?}: stderr {stderr:?}");
    assert!(out.stderr == expected, "{args:?}:\n stderr {stderr:?}\nexpected {expected:?}");
    assert_eq!(out.stdout, "", "{args:?}");
}

/// The start of `text`, for assertion messages.
fn head(text: &str) -> &str {
    text.char_indices().nth(2000).map_or(text, |(at, _)| &text[..at])
}

/// A forward that parses (nothing listens on the target; each case fails before it matters).
const FWD: &str = "127.0.0.1:1=127.0.0.1:2";

#[test]
fn clap_errors_are_one_line() {
    expect_error(
        &["--idle-timeout", "1.5s", FWD],
        2,
        r#"invalid value '1.5s' for '--idle-timeout <DURATION>': "1.5s" is not a duration (e.g. 500ms, 10s, 5m, 1h)"#,
    );
    expect_error(
        &["--pipe-size", "1T", FWD],
        2,
        r#"invalid value '1T' for '--pipe-size <BYTES>': "1T": unknown unit "T" (use K or M)"#,
    );
    expect_error(
        &["--max-connections", "-1", FWD],
        2,
        "invalid value '-1' for '--max-connections <N>': invalid digit found in string",
    );
    expect_error(&["--bogus", FWD], 2, "unexpected argument '--bogus' found (see --help)");
    expect_error(&["--ipv6-only=yes", FWD], 2, "unexpected value 'yes' for '--ipv6-only' found; no more were expected");
    expect_error(
        &[FWD, "--connect-timeout"],
        2,
        "a value is required for '--connect-timeout <DURATION>' but none was supplied",
    );
}

#[test]
fn a_non_utf8_argument_is_named() {
    let bad = OsStr::from_bytes(b"\xff");
    expect_error(&[bad], 2, r#"argument 1 is not UTF-8 text: "\xff""#);
    expect_error(
        &[OsStr::new(FWD), OsStr::new("-c"), OsStr::from_bytes(b"relay\xfe.conf")],
        2,
        r#"argument 3 is not UTF-8 text: "relay\xfe.conf""#,
    );
    // Docker mode too (its flags are picked out of the same text).
    expect_error(&[OsStr::new("-proto"), bad], 2, r#"argument 2 is not UTF-8 text: "\xff""#);
}

#[test]
fn help_and_version_go_to_stdout() {
    let out = run(&["--help"]);
    assert_eq!(out.code, Some(0), "stderr {:?}", out.stderr);
    assert_eq!(out.stderr, "");
    assert!(out.stdout.contains("Usage: splice-relay [OPTIONS] [FORWARD]..."), "{}", out.stdout);
    assert!(out.stdout.contains("--stats-interval <DURATION>"), "{}", out.stdout);
    let out = run(&["--version"]);
    assert_eq!(out.code, Some(0), "stderr {:?}", out.stderr);
    assert_eq!(out.stdout, format!("splice-relay {}\n", env!("CARGO_PKG_VERSION")));
    assert_eq!(out.stderr, "");
}

/// Every duration option.
const DURATION_OPTIONS: [&str; 7] = [
    "--connect-timeout",
    "--idle-timeout",
    "--half-close-timeout",
    "--drain-timeout",
    "--udp-timeout",
    "--proxy-header-timeout",
    "--stats-interval",
];

/// A forward on a free port that would start (a backend need not exist).
fn startable_forward() -> String {
    format!("both:127.0.0.1:{}=127.0.0.1:{}", free_port(), free_port())
}

#[test]
fn huge_durations_are_refused() {
    let fwd = startable_forward();
    for opt in DURATION_OPTIONS {
        for value in ["3000000000000000h", "87601h", "99999999999999999999h"] {
            expect_error(
                &[opt, value, &fwd],
                2,
                &format!("invalid value '{value}' for '{opt} <DURATION>': \"{value}\" is too long (at most 3650 days)"),
            );
        }
    }
    expect_error(
        &["--pipe-size", "2G", &fwd],
        2,
        r#"invalid value '2G' for '--pipe-size <BYTES>': "2G": unknown unit "G" (use K or M)"#,
    );
    expect_error(
        &["--udp-rcvbuf", "4096M", &fwd],
        2,
        r#"invalid value '4096M' for '--udp-rcvbuf <BYTES>': "4096M" is too large (at most 1024M)"#,
    );
}

#[test]
fn zero_is_refused_where_it_cannot_mean_off() {
    let fwd = startable_forward();
    expect_error(
        &["--stats-interval", "0s", &fwd],
        2,
        "--stats-interval must be more than 0 (leave it out to log only on SIGUSR1)",
    );
    expect_error(&["--connect-timeout", "0", &fwd], 2, "--connect-timeout must be more than 0");
    expect_error(&["--proxy-header-timeout", "0ms", &fwd], 2, "--proxy-header-timeout must be more than 0");
    expect_error(&["--udp-timeout", "0m", &fwd], 2, "--udp-timeout must be more than 0");
}

/// A file in the temp directory holding `bytes`, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str, bytes: &[u8]) -> TempFile {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let path = std::env::temp_dir().join(format!("splice-relay-cli-{}-{tag}-{nanos}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn config_files_are_read_as_bytes_line_by_line() {
    let junk = TempFile::new("junk", b"# forwards\n127.0.0.1:1=127.0.0.1:2\n\xff\xfe\x00\x01junk\n");
    expect_error(&["-c", junk.path()], 2, &format!("{}:3: not UTF-8 text", junk.path()));

    let mut long = vec![b'x'; 10 << 20];
    long.push(b'\n');
    let long = TempFile::new("long", &long);
    expect_error(
        &["-c", long.path()],
        2,
        &format!(
            "{}:1: invalid forward \"{}\"...: expected LISTEN=TARGET, e.g. [::]:8080=127.0.0.1:80",
            long.path(),
            "x".repeat(60)
        ),
    );

    expect_error(&["-c", "/dev/zero"], 2, "cannot read config file /dev/zero: larger than 16 MiB");
    expect_error(
        &["-c", "/nonexistent/relay.conf"],
        1,
        "cannot read config file /nonexistent/relay.conf: No such file or directory (os error 2)",
    );
}

#[test]
fn long_values_are_quoted_cut_short() {
    let fwd = startable_forward();
    let long = "7".repeat(100) + "x";
    let cut = "7".repeat(60);
    expect_error(
        &["--udp-timeout", &long, &fwd],
        2,
        &format!(
            "invalid value '{cut}'... for '--udp-timeout <DURATION>': \"{cut}\"...: unknown unit \"x\" (use ms, s, m or h)"
        ),
    );
    let long_fwd = format!("127.0.0.1:80={}", "a".repeat(200));
    expect_error(
        &[&long_fwd],
        2,
        &format!(
            "invalid forward \"127.0.0.1:80={}\"...: target: \"{}\"... has no :PORT",
            "a".repeat(47),
            "a".repeat(60)
        ),
    );
    let long_cidr = "1".repeat(100);
    expect_error(
        &["--trusted-proxies", &long_cidr, &fwd],
        2,
        &format!("--trusted-proxies: \"{}\"... is not an address or CIDR range", "1".repeat(60)),
    );
}

#[test]
fn start_up_errors_are_one_plain_line() {
    let nothing = "nothing to relay: give at least one FORWARD or --config FILE (see --help)";
    expect_error::<&str>(&[], 2, nothing);
    let comments = TempFile::new("comments", b"# nothing yet\n\n");
    expect_error(&["-c", comments.path()], 2, nothing);
    expect_error(&["-v", "-c", comments.path()], 2, nothing);

    // A run-time failure after logging started looks the same.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let fwd = format!("127.0.0.1:{port}=127.0.0.1:9");
    let in_use = format!("cannot listen on tcp 127.0.0.1:{port}: Address already in use (os error 98)");
    expect_error(&[&fwd], 1, &in_use);
    expect_error(&["-qq", &fwd], 1, &in_use);
}

#[test]
fn docker_mode_names_an_unknown_flag_even_without_a_value() {
    let usage = splice_relay::docker::USAGE;
    for args in [
        &["-proto", "tcp", "-host-ip", "127.0.0.1", "-bogus"][..],
        &["-bogus", "-proto", "tcp"],
        &["-host-ip=127.0.0.1", "--bogus=1"],
    ] {
        let out = run(args);
        assert_eq!(out.code, Some(2), "{args:?}: stderr {:?}", head(&out.stderr));
        assert_eq!(out.stderr, format!("flag provided but not defined: -bogus\n{usage}\n"), "{args:?}");
    }
}

/// Starts the relay as dockerd does, with the status pipe as fd 3 and a
/// socket as fd 4. argv: KIND HOST PORT RELAY ARGS...; KIND is tcp (listening),
/// tcp-bound (bound, not listening), udp, or devnull (fd 4 is /dev/null).
/// Prints `HANDSHAKE hex` (what fd 3 carried until EOF, at most 10 s), then,
/// after a SIGTERM if the relay said it was ready, `EXIT code` (or
/// `EXIT timeout` when it ran on for 10 s more, then is killed).
const FD4_DOCKERD: &str = r#"
import fcntl, os, select, signal, socket, subprocess, sys, time
kind, host, port = sys.argv[1:4]
argv = sys.argv[4:]
def high(fd):
    n = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 50)
    os.close(fd)
    return n
if kind == 'devnull':
    lfd = high(os.open('/dev/null', os.O_RDWR))
else:
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM if kind == 'udp' else socket.SOCK_STREAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, int(port)))
    if kind == 'tcp':
        s.listen(16)
    lfd = high(s.detach())
r, w = os.pipe()
r, w = high(r), high(w)
os.dup2(w, 3)
os.close(w)
os.dup2(lfd, 4)
os.close(lfd)
p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=[3, 4])
os.close(3)
os.close(4)
data, deadline = b'', time.time() + 10
while time.time() < deadline:
    ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.time()))
    if not ready:
        break
    chunk = os.read(r, 4096)
    if not chunk:
        break
    data += chunk
print('HANDSHAKE', data.hex() or '-', flush=True)
if data == b'0\n':
    p.send_signal(signal.SIGTERM)
try:
    print('EXIT', p.wait(timeout=10), flush=True)
except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
    print('EXIT timeout', flush=True)
"#;

/// Runs the relay in docker mode with `-use-listen-fd` and fd 4 of `kind`
/// bound on `host`; returns (what fd 3 said, the exit status as text).
fn docker_with_fd4(kind: &str, host: &str, proto: &str, host_ip: &str, env: &[(&str, &str)]) -> (String, String) {
    // A port found free may be taken before the fake dockerd binds it: then again on another.
    let mut attempts = 0;
    let out = loop {
        attempts += 1;
        let port = free_port().to_string();
        let out = Command::new("python3")
            .arg("-c")
            .arg(FD4_DOCKERD)
            .args([kind, host, &port, BIN])
            .args(["-proto", proto, "-host-ip", host_ip, "-host-port", &port])
            .args(["-container-ip", "127.0.0.1", "-container-port", "9", "-use-listen-fd"])
            .env_remove("RUST_LOG")
            .env_remove("SPLICE_RELAY_OPTS")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("python3 (needed for the docker-mode tests)");
        if attempts < 5 && String::from_utf8_lossy(&out.stderr).contains("Address already in use") {
            continue;
        }
        break out;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |word: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(word))
            .unwrap_or_else(|| panic!("no {word} from the fake dockerd: stdout {stdout:?}, stderr {stderr:?}"))
            .to_string()
    };
    let hex = field("HANDSHAKE ");
    let bytes: Vec<u8> = if hex == "-" {
        Vec::new()
    } else {
        (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect()
    };
    (String::from_utf8_lossy(&bytes).into_owned(), field("EXIT "))
}

#[test]
fn docker_mode_checks_the_kind_of_fd_4() {
    let cases = [
        ("tcp", "127.0.0.1", "udp", "127.0.0.1", "fd 4 is a TCP socket, but -proto is udp"),
        ("udp", "127.0.0.1", "tcp", "127.0.0.1", "fd 4 is a UDP socket, but -proto is tcp"),
        ("tcp-bound", "127.0.0.1", "tcp", "127.0.0.1", "fd 4 is a TCP socket that is not listening"),
        ("tcp", "::1", "tcp", "127.0.0.1", "fd 4 is an IPv6 socket, but -host-ip is 127.0.0.1"),
        ("udp", "127.0.0.1", "udp", "::1", "fd 4 is an IPv4 socket, but -host-ip is ::1"),
        (
            "devnull",
            "-",
            "tcp",
            "127.0.0.1",
            "fd 4 is not a usable socket: Socket operation on non-socket (os error 88)",
        ),
    ];
    for (kind, host, proto, host_ip, why) in cases {
        let (handshake, exit) = docker_with_fd4(kind, host, proto, host_ip, &[]);
        assert_eq!(handshake, format!("1\n-use-listen-fd: {why}"), "fd 4 {kind} on {host}, -proto {proto}");
        assert_eq!(exit, "1", "fd 4 {kind} on {host}, -proto {proto}");
    }
    // The right kinds still start (and end on SIGTERM).
    for (kind, host, proto) in [("tcp", "127.0.0.1", "tcp"), ("udp", "::1", "udp")] {
        let (handshake, exit) = docker_with_fd4(kind, host, proto, host, &[]);
        assert_eq!((handshake.as_str(), exit.as_str()), ("0\n", "0"), "fd 4 {kind} on {host}, -proto {proto}");
    }
}

#[test]
fn docker_mode_reports_bad_splice_relay_opts_on_fd_3() {
    let env = [("SPLICE_RELAY_OPTS", "--stats-interval 0s")];
    let (handshake, exit) = docker_with_fd4("tcp", "127.0.0.1", "tcp", "127.0.0.1", &env);
    let why = "--stats-interval must be more than 0 (leave it out to log only on SIGUSR1)";
    assert_eq!(handshake, format!("1\nSPLICE_RELAY_OPTS: {why}"));
    assert_eq!(exit, "1");
    let env = [("SPLICE_RELAY_OPTS", "--idle-timeout 99999999999999999999h")];
    let (handshake, exit) = docker_with_fd4("tcp", "127.0.0.1", "tcp", "127.0.0.1", &env);
    let why = r#"invalid value '99999999999999999999h' for '--idle-timeout <DURATION>': "99999999999999999999h" is too long (at most 3650 days)"#;
    assert_eq!(handshake, format!("1\nSPLICE_RELAY_OPTS: {why}"));
    assert_eq!(exit, "1");
}

/// Every option that takes a number, a duration or a size.
const NUMERIC_OPTIONS: [&str; 13] = [
    "--max-connections",
    "--max-connections-per-source",
    "--connect-timeout",
    "--idle-timeout",
    "--half-close-timeout",
    "--pipe-size",
    "--drain-timeout",
    "--udp-timeout",
    "--udp-max-flows",
    "--udp-rcvbuf",
    "--proxy-header-timeout",
    "--stats-interval",
    "--threads",
];

/// Values a user might pass by mistake, or at the edge of what is allowed.
const ODD_VALUES: [&str; 11] = [
    "0",
    "-1",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999h",
    "87600h",
    "1024M",
    "1.5s",
    "",
    "1T",
    " ",
];

/// What the relay did with one odd value: refused it, or ran with it.
enum Verdict {
    Refused { code: Option<i32>, stderr: String },
    Running { relay: std::process::Child, log: std::sync::Arc<std::sync::Mutex<String>> },
}

/// Starts the relay with `args` and waits (at most 10 s) until it exits or
/// logs "listening on".
fn start_or_refuse(args: &[&str]) -> Verdict {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let log2 = log.clone();
    thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let mut log = log2.lock().unwrap();
            if log.len() < 64 << 10 {
                log.push_str(&String::from_utf8_lossy(&line));
                log.push('\n');
            }
        }
    });
    let mut code = None;
    let mut exited = false;
    let settled = wait_until(Duration::from_secs(10), || {
        if let Ok(Some(st)) = child.try_wait() {
            code = st.code();
            exited = true;
        }
        exited || log.lock().unwrap().contains("listening on")
    });
    assert!(settled, "{args:?}: neither exited nor listening after 10 s: {:?}", head(&log.lock().unwrap()));
    if exited {
        // Let the reader thread take the last of stderr.
        wait_until(Duration::from_secs(10), || Arc::strong_count(&log) == 1);
        let stderr = log.lock().unwrap().clone();
        return Verdict::Refused { code, stderr };
    }
    Verdict::Running { relay: child, log }
}

/// Bytes through the relay at `addr` over TCP, and a datagram over UDP, both echoed.
fn echo_both_ways(addr: &str) {
    use std::io::Write;
    let mut c = connect(addr);
    c.write_all(b"odd values").unwrap();
    let mut got = [0u8; 10];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"odd values");
    drop(c);
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 64];
    let echoed = (0..20).any(|_| {
        u.send_to(b"datagram", addr).unwrap();
        matches!(u.recv_from(&mut buf), Ok((8, _))) && &buf[..8] == b"datagram"
    });
    assert!(echoed, "no UDP echo through {addr}");
}

#[test]
fn no_option_value_makes_the_relay_panic() {
    let backend = free_port();
    echo_server(&format!("127.0.0.1:{backend}"));
    udp_echo(&format!("127.0.0.1:{backend}"));
    let mut started = Vec::new();
    for opt in NUMERIC_OPTIONS {
        for value in ODD_VALUES {
            let port = free_port();
            let fwd = format!("both:127.0.0.1:{port}=127.0.0.1:{backend}");
            let args = [opt, value, &fwd];
            match start_or_refuse(&args) {
                Verdict::Refused { code, stderr } => {
                    assert_eq!(code, Some(2), "{args:?}: stderr {:?}", head(&stderr));
                    assert_eq!(stderr.lines().count(), 1, "{args:?}: stderr {:?}", head(&stderr));
                    assert!(stderr.starts_with("splice-relay: "), "{args:?}: stderr {:?}", head(&stderr));
                }
                Verdict::Running { mut relay, log } => {
                    started.push(format!("{opt} {value:?}"));
                    echo_both_ways(&format!("127.0.0.1:{port}"));
                    kill(relay.id(), 15);
                    if opt == "--drain-timeout" {
                        // The drain waits for the UDP flow to idle out: a second signal exits at
                        // once. It is sent once the first was taken (two pending SIGTERMs are one).
                        let taken = || {
                            let log = log.lock().unwrap();
                            log.contains("no longer accepting") || log.contains("exiting")
                        };
                        wait_until(Duration::from_secs(10), taken);
                        kill(relay.id(), 15);
                    }
                    let mut code = None;
                    let exited = wait_until(Duration::from_secs(10), || match relay.try_wait() {
                        Ok(Some(st)) => {
                            code = st.code();
                            true
                        }
                        _ => false,
                    });
                    if !exited {
                        let _ = relay.kill();
                        let _ = relay.wait();
                    }
                    let log = log.lock().unwrap().clone();
                    assert_eq!(code, Some(0), "{args:?}: SIGTERM must end the relay with 0; log {:?}", head(&log));
                    assert!(!log.contains("panicked"), "{args:?}: {}", head(&log));
                }
            }
        }
    }
    // The values that are legitimately accepted, so a change in them is seen.
    let expected = [
        "--max-connections \"0\"",
        "--max-connections \"18446744073709551615\"",
        "--max-connections-per-source \"0\"",
        "--max-connections-per-source \"18446744073709551615\"",
        "--connect-timeout \"87600h\"",
        "--idle-timeout \"0\"",
        "--idle-timeout \"87600h\"",
        "--half-close-timeout \"0\"",
        "--half-close-timeout \"87600h\"",
        "--pipe-size \"0\"",
        "--pipe-size \"1024M\"",
        "--drain-timeout \"0\"",
        "--drain-timeout \"87600h\"",
        "--udp-timeout \"87600h\"",
        "--udp-max-flows \"18446744073709551615\"",
        "--udp-rcvbuf \"0\"",
        "--udp-rcvbuf \"1024M\"",
        "--proxy-header-timeout \"87600h\"",
        "--stats-interval \"87600h\"",
    ];
    assert_eq!(started, expected);
}
