//! `--transparent`: the backend sees the client's own address.
//!
//! The routed tests build their own network namespaces (client, backend)
//! and remove them when done, even on failure; they need root and
//! iproute2, and fail saying so when either is missing.

mod common;
use common::*;

use std::process::Command;

/// Runs the relay without any capability (root's included): setpriv drops
/// the inheritable and bounding sets, so exec leaves it none.
const NO_CAPS: [&str; 4] = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"];

const CAP_LINE: &str =
    "--transparent needs CAP_NET_ADMIN (setting IP_TRANSPARENT was refused: run as root or grant the capability)";

#[test]
fn without_cap_net_admin_the_relay_refuses_to_start_with_one_line() {
    require_command("setpriv", "apt-get install util-linux");
    for args in [vec!["--transparent", "127.0.0.1:1=127.0.0.1:2"], vec!["udp:127.0.0.1:1=127.0.0.1:2,transparent=port"]]
    {
        let out = Command::new(NO_CAPS[0]).args(&NO_CAPS[1..]).arg(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr, format!("splice-relay: {CAP_LINE}\n"), "{args:?}");
    }
}

#[test]
fn docker_mode_reports_the_missing_capability_on_fd_3() {
    require_command("setpriv", "apt-get install util-linux");
    // fd 3 is the status pipe dockerd reads: here it is the shell's stdout.
    let out = Command::new(NO_CAPS[0])
        .args(&NO_CAPS[1..])
        .args(["sh", "-c", r#"exec "$0" "$@" 3>&1 >/dev/null 2>/dev/null"#, BIN])
        .args(["-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", "1"])
        .args(["-container-ip", "127.0.0.1", "-container-port", "2"])
        .env("SPLICE_RELAY_OPTS", "--transparent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("1\n{CAP_LINE}"));
}
