//! systemd's readiness protocol (`Type=notify`): one datagram, such as
//! `READY=1`, to the unix socket named by `NOTIFY_SOCKET`.

use std::ffi::OsStr;
use std::io;
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
