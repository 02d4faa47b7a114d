//! `--check`: parse and validate everything, bind nothing, one line per
//! problem on stderr; exit 0 (one line on stdout) or 2.
mod common;
use common::*;
use std::net::TcpListener;
use std::process::{Command, Stdio};

/// Runs `splice-relay --check ARGS`; returns (exit code, stdout, stderr).
fn check(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("--check").args(args).stdin(Stdio::null()).output().expect("run relay");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A temporary config file, removed on drop.
struct TempConf(std::path::PathBuf);

impl TempConf {
    fn new(name: &str, text: &str) -> TempConf {
        let dir = std::env::temp_dir().join(format!("splice-relay-check-{}-{name}", std::process::id()));
        std::fs::write(&dir, text).unwrap();
        TempConf(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A good file: exit 0, one line on stdout counting the forwards (a range
/// expanded), nothing on stderr; nothing bound, even a port in use passes.
#[test]
fn good_config_is_ok_and_binds_nothing() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().port();
    let free = free_port();
    let conf = TempConf::new(
        "good",
        &format!(
            "# a comment\n\n127.0.0.1:{busy}=127.0.0.1:80\nudp:[::]:{free}=127.0.0.1:53,allow=10.0.0.0/8+::1\n\
             127.0.0.2:{free}=[::1]:53 # same port, TCP\n"
        ),
    );
    let (code, out, err) = check(&["-c", conf.path(), "--threads", "2", "--allow", "127.0.0.0/8"]);
    assert_eq!((code, err.as_str()), (0, ""), "stdout: {out}");
    assert_eq!(out, "splice-relay: configuration OK (3 forwards)\n");
    assert!(port_is_free(free), "--check left port {free} bound");
    let (code, out, _) = check(&[&format!("127.0.0.1:{free}-{}=127.0.0.1:7000-7009", free + 9)]);
    assert_eq!(code, 0);
    assert_eq!(out, "splice-relay: configuration OK (10 forwards)\n");
}

/// A bad file: every bad line is named with its file and line, the option
/// problems and overlaps too, each on one line; exit 2 and nothing on stdout.
#[test]
fn bad_config_names_every_problem() {
    let conf = TempConf::new(
        "bad",
        "127.0.0.1:1=\nbogus\n# fine\n127.0.0.1:3=127.0.0.1:4,deny=nope\n127.0.0.1:5=127.0.0.1:6\n0.0.0.0:5=127.0.0.1:6\n",
    );
    let (code, out, err) = check(&["-c", conf.path(), "--udp-timeout", "0", "--udp-max-flows", "0"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(out, "");
    let lines: Vec<&str> = err.lines().collect();
    for (want, line) in [
        (format!("{}:1: invalid forward", conf.path()), 0),
        (format!("{}:2: invalid forward \"bogus\"", conf.path()), 1),
        (format!("{}:4: invalid forward", conf.path()), 2),
        ("--udp-max-flows must be at least 1".to_string(), 3),
        ("--udp-timeout must be more than 0".to_string(), 4),
        // The lines that parsed are still checked for overlaps.
        (
            "cannot listen on tcp 0.0.0.0:5: Address already in use (by the forward \"127.0.0.1:5=127.0.0.1:6\")"
                .to_string(),
            5,
        ),
    ] {
        assert!(lines.get(line).is_some_and(|l| l.contains(&want)), "line {line} is not {want:?}:\n{err}");
    }
    assert_eq!(lines.len(), 6, "{err}");
    assert!(lines.iter().all(|l| l.starts_with("splice-relay: ")), "{err}");
}

/// Overlapping listen addresses of one protocol are refused with one
/// thread too (the kernel would refuse the second bind); other protocols
/// on the same port, and `--metrics` on a TCP forward's address, are checked.
#[test]
fn overlapping_listen_addresses_are_problems() {
    let p = free_port();
    let (code, out, err) = check(&[
        &format!("0.0.0.0:{p}=127.0.0.1:1"),
        &format!("127.0.0.1:{p}=127.0.0.1:2"),
        &format!("udp:127.0.0.1:{p}=127.0.0.1:3"),
        "--metrics",
        &format!("127.0.0.1:{p}"),
    ]);
    assert_eq!(code, 2, "{out}");
    assert_eq!(
        err,
        format!(
            "splice-relay: cannot listen on tcp 127.0.0.1:{p}: Address already in use (by the forward \"0.0.0.0:{p}=127.0.0.1:1\")\n\
             splice-relay: cannot serve metrics on 127.0.0.1:{p}: Address already in use (by the forward \"0.0.0.0:{p}=127.0.0.1:1\")\n"
        )
    );
    let (code, _, err) = check(&[&format!("both:[::]:{p}=127.0.0.1:1"), &format!("udp:127.0.0.1:{p}=127.0.0.1:2")]);
    assert_eq!(code, 2);
    assert!(err.contains(&format!("cannot listen on udp 127.0.0.1:{p}")), "{err}");
    // With --ipv6-only, [::] and 127.0.0.1 do not overlap.
    let (code, _, err) =
        check(&["--ipv6-only", &format!("both:[::]:{p}=127.0.0.1:1"), &format!("udp:127.0.0.1:{p}=127.0.0.1:2")]);
    assert_eq!(code, 0, "{err}");
}

/// A host that does not resolve, no forward at all, and a bad option value
/// are problems too: exit 2 (not 1) with one line.
#[test]
fn unresolvable_hosts_and_missing_forwards_exit_2() {
    let (code, _, err) = check(&["127.0.0.1:1=nohost.invalid:80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("splice-relay: cannot resolve target host \"nohost.invalid\""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = check(&[]);
    assert_eq!(code, 2);
    assert_eq!(err, "splice-relay: nothing to relay: give at least one FORWARD or --config FILE (see --help)\n");
    let (code, _, err) = check(&["--threads", "0", "127.0.0.1:1=127.0.0.1:2"]);
    assert_eq!(code, 2);
    assert!(err.contains("--threads"), "{err}");
    let (code, _, err) = check(&["-c", "/nonexistent/splice-relay.conf"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("splice-relay: cannot read config file /nonexistent/splice-relay.conf"), "{err}");
}

/// Option lines in a config file: checked like the command line's, each
/// problem named by file and line; `-c` and `--check` may not appear there.
#[test]
fn option_lines_are_checked_with_their_line() {
    let good = TempConf::new(
        "options-good",
        "--idle-timeout 30s\n--allow=127.0.0.0/8\n--accept-proxy # trusted below\n--trusted-proxies 10.0.0.0/8\n127.0.0.1:1=127.0.0.1:2\n",
    );
    let (code, out, err) = check(&["-c", good.path()]);
    assert_eq!((code, err.as_str()), (0, ""), "stdout: {out}");
    let bad = TempConf::new(
        "options-bad",
        "--idle-timeout soon\n--config other.conf\n--accept-proxy extra\n--no-such-option\n127.0.0.1:1=127.0.0.1:2\n",
    );
    let (code, out, err) = check(&["-c", bad.path()]);
    assert_eq!((code, out.as_str()), (2, ""), "stderr: {err}");
    let p = bad.path();
    let want = [
        format!("splice-relay: {p}:1: invalid value 'soon' for '--idle-timeout <DURATION>'"),
        format!("splice-relay: {p}:2: \"--config\" cannot be used in a config file"),
        format!("splice-relay: {p}:3: \"--accept-proxy extra\": one option (and its value) per line"),
        format!("splice-relay: {p}:4: unexpected argument '--no-such-option' found"),
    ];
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), want.len(), "{err}");
    for (line, want) in lines.iter().zip(&want) {
        assert!(line.starts_with(want.as_str()), "{line:?}\nwanted it to start with {want:?}");
    }
}
