//! Helpers for the end-to-end tests: the relay under test ([`relay`]),
//! ports and clients ([`net`]), backends ([`backends`]), and what a test
//! needs from the machine (`require_*`). Every wait here polls for a
//! condition under a generous bound ([`PATIENCE`]): the suite runs on
//! loaded 2-core machines.
#![allow(dead_code, unused_imports)]

pub mod backends;
pub mod net;
pub mod relay;

pub use backends::*;
pub use net::*;
pub use relay::*;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_splice-relay");

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(15);

pub const SIGINT: i32 = 2;
pub const SIGKILL: i32 = 9;
pub const SIGUSR1: i32 = 10;
pub const SIGTERM: i32 = 15;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;

/// Polls `cond` every 10 ms until true or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `len` pseudo-random bytes, the same for the same `seed` (xorshift64):
/// the tests' only random source.
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

/// The last `n` lines of a log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Log lines at WARN or ERROR.
pub fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect()
}

/// Sends `sig` to `pid` with kill(1) (the tests stay free of unsafe).
pub fn kill(pid: u32, sig: i32) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// The real uid of a process, from /proc.
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Fails the test unless `cmd` is on PATH, naming the install command.
pub fn require_command(cmd: &str, install: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(cmd))
            .is_ok_and(|m| m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
    });
    assert!(found, "this test needs `{cmd}`, which is not on PATH: run `{install}` (scripts/test.sh does, as root)");
}

/// Fails the test unless it runs as root.
pub fn require_root() {
    assert_eq!(
        uid_of(std::process::id()),
        Some(0),
        "this test needs root (it runs the relay as another user or changes a sysctl): run it as root, e.g. scripts/test.sh"
    );
}
