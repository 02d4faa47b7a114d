//! systemd: the readiness protocol (`Type=notify`: one datagram, such as
//! `READY=1`, to the unix socket named by `NOTIFY_SOCKET`), and socket
//! activation (listening sockets passed as fds 3.. with `LISTEN_FDS`).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Tells the service manager `state` (`READY=1`, `STOPPING=1`) if
/// `NOTIFY_SOCKET` is set. A failure is logged, never fatal: the relay
/// works the same without a manager listening.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    match send(&path, state) {
        Ok(()) => log::debug!("told the service manager {state}"),
        Err(e) => log::warn!("cannot tell the service manager {state} (NOTIFY_SOCKET {}): {e}", path.to_string_lossy()),
    }
}

/// Tells the service manager a reload began: `RELOADING=1` with the
/// monotonic time, as `Type=notify-reload` asks (`READY=1` follows once
/// the reload is done or refused).
pub(crate) fn notify_reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

fn send(path: &OsStr, state: &str) -> io::Result<()> {
    let addr = address(path.as_bytes())?;
    let sock = UnixDatagram::unbound()?;
    // Never wait on a manager that does not read: the loop has work to do.
    sock.set_nonblocking(true)?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// `/path` or `@abstract` (a leading NUL byte on the wire).
fn address(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match name {
        [b'@', abstract_name @ ..] => SocketAddr::from_abstract_name(abstract_name),
        [b'/', ..] => SocketAddr::from_pathname(OsStr::from_bytes(name)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "not an absolute path or @abstract name")),
    }
}

/// A socket passed by socket activation.
pub(crate) struct Activated {
    /// The socket, non-blocking and close-on-exec.
    pub(crate) fd: OwnedFd,
    /// Its fd number and name (`LISTEN_FDNAMES`), for logs.
    pub(crate) what: String,
    /// The address it is bound to.
    pub(crate) addr: std::net::SocketAddr,
    /// A listening TCP socket (else UDP).
    pub(crate) tcp: bool,
}

/// Most sockets taken from `LISTEN_FDS`.
const MAX_LISTEN_FDS: u32 = 65_536;

/// The sockets systemd passed to this process (`LISTEN_PID` is ours):
/// fds 3 to 3 + `LISTEN_FDS` - 1, each a listening TCP or a UDP socket.
/// None passed: empty. Anything else there is an error.
pub(crate) fn activated_sockets() -> Result<Vec<Activated>, crate::config::StartError> {
    use crate::config::StartError;
    use nix::sys::socket::SockType;
    let var = |name: &str| std::env::var(name).ok();
    if var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let fds = var("LISTEN_FDS");
    let n = match fds.as_deref().map(str::parse::<u32>) {
        Some(Ok(n)) if n <= MAX_LISTEN_FDS => n,
        _ => {
            let shown = fds.map_or("not set".into(), |v| crate::config::quote(&v));
            return Err(StartError::Runtime(format!("LISTEN_FDS is {shown}, not a number of sockets")));
        }
    };
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let mut out = Vec::new();
    for raw in 3..3 + n as i32 {
        let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown");
        let what = format!("fd {raw} ({})", crate::config::clip(name, 60).0);
        let bad = |why: String| StartError::Runtime(format!("socket activation: {what} {why}"));
        let fd = crate::sys::inherited_fd(raw).ok_or_else(|| bad("is not open".into()))?;
        let tcp = match crate::sys::socket_kind(fd.as_fd()) {
            Ok((SockType::Stream, true)) => true,
            Ok((SockType::Stream, false)) => return Err(bad("is a TCP socket that is not listening".into())),
            Ok((SockType::Datagram, _)) => false,
            Ok((other, _)) => return Err(bad(format!("is a {other:?} socket, not TCP or UDP"))),
            Err(e) => return Err(bad(format!("is not a usable socket: {e}"))),
        };
        let addr = crate::sys::local_addr(fd.as_fd()).map_err(|e| bad(format!("is not an IP socket: {e}")))?;
        crate::sys::set_nonblocking_cloexec(fd.as_fd()).map_err(|e| bad(e.to_string()))?;
        out.push(Activated { fd, what, addr, tcp });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_abstract_names() {
        use std::os::linux::net::SocketAddrExt;
        let a = address(b"@splice/notify").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"splice/notify"[..]));
        let p = address(b"/run/systemd/notify").unwrap();
        assert_eq!(p.as_pathname(), Some(std::path::Path::new("/run/systemd/notify")));
        assert!(address(b"relative").is_err());
        assert!(address(b"").is_err());
    }
}
