//! The units in packaging/systemd/ (the example socket too) pass `systemd-analyze verify` (with no
//! complaint at all), carry the hardening they promise, and the example
//! config passes `--check`.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: &[&str] = &["splice-relay.service", "splice-relay@.service"];

/// Every unit file, the example socket included.
const ALL_UNITS: &[&str] = &["splice-relay.service", "splice-relay@.service", "splice-relay.socket"];

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging")
}

/// A root directory for `systemd-analyze --root`, removed on drop.
struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A root holding the system's own units, the binary at /usr/bin, and ours
/// in /etc/systemd/system: verify then checks the units as installed,
/// without installing anything on this machine.
fn root() -> Root {
    let root = Root(std::env::temp_dir().join(format!("splice-relay-units-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&root.0);
    let (bin, etc, lib) = (root.0.join("usr/bin"), root.0.join("etc/systemd/system"), root.0.join("usr/lib/systemd"));
    for dir in [&bin, &etc, &lib] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::copy(BIN, bin.join("splice-relay")).unwrap();
    // ExecReload=/bin/kill -HUP $MAINPID.
    std::fs::create_dir_all(root.0.join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.0.join("bin/kill")).expect("/bin/kill (procps)");
    let system = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("sysinit.target").exists())
        .expect("systemd's own units (sysinit.target): apt-get install systemd");
    let copied = Command::new("cp").arg("-r").arg(system).arg(&lib).status().unwrap();
    assert!(copied.success(), "cp -r {system} {}", lib.display());
    for unit in ALL_UNITS {
        std::fs::copy(packaging().join("systemd").join(unit), etc.join(unit)).unwrap();
    }
    root
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require_command("systemd-analyze", "apt-get install systemd");
    let root = root();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.0.display()))
        .args(["splice-relay.service", "splice-relay@example.service", "splice-relay.socket"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // verify exits 0 on unknown keys and bad values too: any output is a complaint.
    assert!(out.status.success() && text.is_empty(), "systemd-analyze verify: {:?}\n{text}", out.status);
}

#[test]
fn units_carry_the_hardening() {
    for unit in UNITS {
        let text = std::fs::read_to_string(packaging().join("systemd").join(unit)).unwrap();
        let conf = if unit.contains('@') { "%i" } else { "splice-relay" };
        for line in [
            "Type=notify",
            &format!("ExecStart=/usr/bin/splice-relay -c /etc/splice-relay/{conf}.conf"),
            "DynamicUser=yes",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "NoNewPrivileges=yes",
            "LimitNOFILE=1048576",
            "KillSignal=SIGTERM",
            "Restart=on-failure",
        ] {
            assert!(text.lines().any(|l| l == line), "{unit} has no line {line:?}");
        }
        let caps: Vec<&str> = text.lines().filter(|l| l.contains("Capabilit")).collect();
        assert_eq!(caps.len(), 2, "{unit}: {caps:?}");
    }
}

#[test]
fn example_config_passes_check() {
    let conf = packaging().join("splice-relay.conf");
    let (code, err) = run_to_exit(&["--check", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}
