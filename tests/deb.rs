//! The Debian package end to end: scripts/build-deb.sh builds it, dpkg
//! installs it on this machine, everything it promises is in place and
//! works, and `dpkg -r` then `dpkg --purge` leave nothing of it behind.
//!
//! Needs root, cargo-deb, dpkg and man-db (scripts/test.sh installs them).
//! It refuses to touch a splice-relay package it did not install.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const PACKAGE: &str = "splice-relay";
const CONFFILE: &str = "/etc/splice-relay/splice-relay.conf";
const MAN_PAGE: &str = "/usr/share/man/man1/splice-relay.1.gz";

/// What the package must install, besides the binary and the conffile.
const INSTALLED: &[&str] = &[
    "/usr/bin/splice-relay",
    CONFFILE,
    MAN_PAGE,
    "/usr/lib/systemd/system/splice-relay.service",
    "/usr/lib/systemd/system/splice-relay@.service",
    "/usr/lib/systemd/system/splice-relay.socket",
    "/usr/share/bash-completion/completions/splice-relay",
    "/usr/share/zsh/vendor-completions/_splice-relay",
    "/usr/share/fish/vendor_completions.d/splice-relay.fish",
    "/usr/share/doc/splice-relay/README.md",
];

/// What deb-systemd-helper may leave while the package is removed but not
/// purged (masks), and must not leave after the purge.
const SYSTEMD_STATE: &[&str] = &[
    "/etc/systemd/system/splice-relay.service",
    "/etc/systemd/system/splice-relay.socket",
    "/etc/systemd/system/multi-user.target.wants/splice-relay.service",
    "/etc/systemd/system/sockets.target.wants/splice-relay.socket",
    "/var/lib/systemd/deb-systemd-helper-enabled/splice-relay.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/splice-relay.socket.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-masked/splice-relay.service",
    "/var/lib/systemd/deb-systemd-helper-masked/splice-relay.socket",
];

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

/// Runs the command and returns its stdout; panics with its output if it fails.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn require_command(cmd: &str, install: &str) {
    let found = Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().unwrap().status.success();
    assert!(found, "{cmd} is missing: {install} (scripts/test.sh does it when run as root)");
}

/// The package's dpkg status ("install ok installed", "deinstall ok
/// config-files", ...), or None if dpkg does not know it.
fn package_status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !status.is_empty() && !status.ends_with("not-installed")).then_some(status)
}

/// dpkg's glob: `*` and `?` match any character, `/` included (fnmatch
/// without FNM_PATHNAME); `[` is taken literally, which no filter of ours needs.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_match(&pattern[1..], text) || (!text.is_empty() && glob_match(pattern, &text[1..])),
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob_match(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// The dpkg configuration line that keeps `path` out of the file system
/// (path-exclude, not overridden by a later path-include), as "FILE: LINE".
/// Docker-derived minimal images exclude /usr/share/man this way.
fn dpkg_excludes(path: &str) -> Option<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/dpkg/dpkg.cfg.d")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.push(PathBuf::from("/etc/dpkg/dpkg.cfg"));
    let mut verdict = None;
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for line in text.lines().map(str::trim) {
            let (exclude, pattern) = if let Some(p) = line.strip_prefix("path-exclude") {
                (true, p)
            } else if let Some(p) = line.strip_prefix("path-include") {
                (false, p)
            } else {
                continue;
            };
            let pattern = pattern.trim_start_matches([' ', '\t', '=']).trim();
            if glob_match(pattern.as_bytes(), path.as_bytes()) {
                verdict = exclude.then(|| format!("{}: {line}", file.display()));
            }
        }
    }
    verdict
}

/// Purges the package on drop if this test installed it, so that a failed
/// assert leaves the machine as it found it.
struct Installed(bool);

impl Drop for Installed {
    fn drop(&mut self) {
        if self.0 {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).status();
        }
    }
}

#[test]
#[ignore = "needs root, cargo-deb and dpkg: run by scripts/test.sh"]
fn deb_installs_works_and_purges_clean() {
    let started = Instant::now();
    // SAFETY: geteuid cannot fail and touches no memory.
    assert_eq!(unsafe { libc::geteuid() }, 0, "installing a package needs root: run as root, e.g. scripts/test.sh");
    require_command("dpkg", "apt-get install dpkg");
    require_command("man", "apt-get install man-db");
    require_command("systemd-analyze", "apt-get install systemd");
    let cargo_deb = run("cargo", &["deb", "--version"]);
    assert!(cargo_deb.status.success(), "cargo-deb is missing: cargo install cargo-deb --locked");
    if let Some(line) = dpkg_excludes(MAN_PAGE) {
        panic!(
            "dpkg on this machine does not install man pages ({line}), so `man splice-relay` cannot \
             work: remove that path-exclude (and reinstall man-db) to run this test"
        );
    }
    if let Some(status) = package_status() {
        panic!(
            "the {PACKAGE} package is already on this machine ({status}): this test installs and \
             purges its own and will not remove someone else's; dpkg --purge {PACKAGE} first"
        );
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = run_ok(root.join("scripts/build-deb.sh").to_str().unwrap(), &[]);
    let deb = built.lines().last().unwrap_or_default().trim().to_string();
    assert!(deb.ends_with(".deb") && Path::new(&deb).is_file(), "build-deb.sh printed no .deb path:\n{built}");
    println!("built {deb} in {:.0?}", started.elapsed());

    // What already exists of what the package holds (shared directories).
    let listed = run_ok("dpkg-deb", &["-c", &deb]);
    let existed_before: BTreeSet<String> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_string())
        .filter(|p| !p.is_empty() && Path::new(p).exists())
        .collect();
    for path in &existed_before {
        assert!(Path::new(path).is_dir(), "{path} exists before the package is installed");
    }

    let mut installed = Installed(true);
    run_ok("dpkg", &["-i", &deb]);

    // Every path the package holds, "/." (the root) left out.
    let files: Vec<String> =
        run_ok("dpkg", &["-L", PACKAGE]).lines().filter(|l| *l != "/.").map(str::to_string).collect();
    for path in INSTALLED {
        assert!(files.iter().any(|f| f == path), "dpkg -L {PACKAGE} does not list {path}:\n{}", files.join("\n"));
        assert!(Path::new(path).is_file(), "{path} is not installed");
    }
    let conffiles = run_ok("dpkg-query", &["-W", "-f=${Conffiles}", PACKAGE]);
    assert!(conffiles.lines().any(|l| l.trim().starts_with(&format!("{CONFFILE} "))), "conffiles: {conffiles}");

    let version = run_ok("/usr/bin/splice-relay", &["--version"]);
    assert_eq!(version.trim(), format!("splice-relay {}", env!("CARGO_PKG_VERSION")));

    let man = run("man", &["-w", PACKAGE]);
    assert!(
        man.status.success() && String::from_utf8_lossy(&man.stdout).trim() == MAN_PAGE,
        "man -w {PACKAGE}: {}: {}{}",
        man.status,
        String::from_utf8_lossy(&man.stdout),
        String::from_utf8_lossy(&man.stderr)
    );
    let page = Command::new("man").args(["-P", "cat", PACKAGE]).env("MANWIDTH", "100").output().unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    for option in ["--config <FILE>", "--udp-timeout <DURATION>", "--check", "FORWARD"] {
        assert!(page.contains(option), "man {PACKAGE} does not show {option}:\n{page}");
    }

    // Installing enables and starts nothing: the config is an example.
    for wants in SYSTEMD_STATE.iter().filter(|p| p.contains(".wants/")) {
        assert!(!Path::new(wants).exists(), "installing enabled a unit: {wants}");
    }

    // systemd-analyze verify works offline, without a running systemd.
    let verify = run(
        "systemd-analyze",
        &[
            "verify",
            "--man=no",
            "/usr/lib/systemd/system/splice-relay.service",
            "/usr/lib/systemd/system/splice-relay.socket",
        ],
    );
    let said = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    assert!(verify.status.success() && said.is_empty(), "systemd-analyze verify: {}\n{said}", verify.status);

    // Remove: everything but the conffile goes.
    run_ok("dpkg", &["-r", PACKAGE]);
    assert!(Path::new(CONFFILE).is_file(), "dpkg -r removed the conffile {CONFFILE}");
    for path in files.iter().filter(|f| !existed_before.contains(*f) && *f != CONFFILE && *f != "/etc/splice-relay") {
        assert!(!Path::new(path).exists(), "{path} is still there after dpkg -r");
    }

    // Purge: the conffile and deb-systemd-helper's masks and state go too.
    run_ok("dpkg", &["--purge", PACKAGE]);
    installed.0 = false;
    assert_eq!(package_status(), None, "dpkg still knows {PACKAGE} after the purge");
    for path in files.iter().filter(|f| !existed_before.contains(*f)) {
        assert!(!Path::new(path).exists(), "{path} is still there after dpkg --purge");
    }
    for path in [CONFFILE, "/etc/splice-relay"].iter().chain(SYSTEMD_STATE) {
        assert!(std::fs::symlink_metadata(path).is_err(), "{path} is still there after dpkg --purge");
    }
    println!("deb test done in {:.0?}", started.elapsed());
}
