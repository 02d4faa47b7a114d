//! Backends: one TCP echo server (with a greeting, a gate, a count of
//! resets), one UDP echo server (recording sizes), a source streaming a
//! pattern, and a python3 echo process a test can SIGKILL.

use super::{PATIENCE, pattern, require_command};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// A TCP echo backend: each connection gets the greeting (if any), then,
/// once the gate (if any) is open, its bytes back until EOF, then a FIN.
#[derive(Default, Clone)]
pub struct Echo {
    greeting: &'static [u8],
    gate: Option<Arc<AtomicBool>>,
}

/// A running TCP echo backend.
pub struct EchoBackend {
    pub addr: SocketAddr,
    /// Connections that ended with a reset from the relay.
    pub resets: Arc<AtomicUsize>,
}

impl Echo {
    /// Sends `greeting` first on each connection.
    pub fn greeting(mut self, greeting: &'static [u8]) -> Self {
        self.greeting = greeting;
        self
    }

    /// Echoes nothing until `go` is set (waiting at most a minute).
    pub fn gate(mut self, go: Arc<AtomicBool>) -> Self {
        self.gate = Some(go);
        self
    }

    /// Serves on a new listener bound to `addr` (port 0: any).
    pub fn bind(self, addr: &str) -> EchoBackend {
        self.serve(TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind echo {addr}: {e}")))
    }

    /// Serves on `l` until the test process ends.
    pub fn serve(self, l: TcpListener) -> EchoBackend {
        let addr = l.local_addr().unwrap();
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let (me, counter) = (self.clone(), counter.clone());
                // Small stacks: some tests hold thousands of connections.
                let _ = thread::Builder::new().stack_size(128 << 10).spawn(move || {
                    if let Err(ErrorKind::ConnectionReset) = me.echo(c) {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        EchoBackend { addr, resets }
    }

    fn echo(&self, mut c: std::net::TcpStream) -> Result<(), ErrorKind> {
        c.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.kind())?;
        c.write_all(self.greeting).map_err(|e| e.kind())?;
        if let Some(go) = &self.gate {
            let t = Instant::now();
            while !go.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
                thread::sleep(Duration::from_millis(10));
            }
        }
        let mut buf = vec![0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => c.write_all(&buf[..n]).map_err(|e| e.kind())?,
                Err(e) => return Err(e.kind()),
            }
        }
        c.shutdown(Shutdown::Write).map_err(|e| e.kind())
    }
}

/// A plain TCP echo backend on `addr`; returns its address.
pub fn echo_server(addr: &str) -> SocketAddr {
    Echo::default().bind(addr).addr
}

/// A running UDP echo backend.
pub struct UdpEcho {
    pub addr: SocketAddr,
    /// The size of every datagram it got.
    pub sizes: Arc<Mutex<Vec<usize>>>,
}

impl UdpEcho {
    /// Echoes on a new socket bound to `addr`.
    pub fn bind(addr: &str) -> UdpEcho {
        UdpEcho::serve(UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp echo {addr}: {e}")))
    }

    /// Echoes on `s` until the test process ends.
    pub fn serve(s: UdpSocket) -> UdpEcho {
        let addr = s.local_addr().unwrap();
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let record = sizes.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 70000];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                record.lock().unwrap().push(n);
                let _ = s.send_to(&buf[..n], from);
            }
        });
        UdpEcho { addr, sizes }
    }
}

/// A plain UDP echo backend on `addr`; returns its address.
pub fn udp_echo(addr: &str) -> SocketAddr {
    UdpEcho::bind(addr).addr
}

/// TCP and UDP echo backends on one port of 127.0.0.1 (for `both:`);
/// returns the port.
pub fn tcp_and_udp_echo() -> u16 {
    for _ in 0..100 {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let Ok(u) = UdpSocket::bind(t.local_addr().unwrap()) else { continue };
        let port = u.local_addr().unwrap().port();
        Echo::default().serve(t);
        UdpEcho::serve(u);
        return port;
    }
    panic!("no port free for TCP and UDP in 100 tries");
}

/// Each chunk a source backend writes: `pattern(7, SOURCE_CHUNK)`.
pub const SOURCE_CHUNK: usize = 256 << 10;

/// A backend writing up to `limit` bytes (whole chunks of
/// `pattern(7, SOURCE_CHUNK)`) to each of its first 100 clients, then
/// closing; reports (bytes written, the error that stopped it). A write
/// blocks for up to a minute before it counts as an error.
pub fn source_backend(limit: usize) -> (SocketAddr, mpsc::Receiver<(usize, Option<ErrorKind>)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let chunk = Arc::new(pattern(7, SOURCE_CHUNK));
    thread::spawn(move || {
        for c in l.incoming().take(100) {
            let Ok(mut c) = c else { continue };
            let (tx, chunk) = (tx.clone(), chunk.clone());
            thread::spawn(move || {
                c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut sent = 0;
                let mut err = None;
                while sent < limit {
                    if let Err(e) = c.write_all(&chunk) {
                        err = Some(e.kind());
                        break;
                    }
                    sent += chunk.len();
                }
                drop(c);
                let _ = tx.send((sent, err));
            });
        }
    });
    (addr, rx)
}

/// A TCP echo server in a python3 child process, so a test can SIGKILL it.
const PY_ECHO: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// A python3 echo backend process; killed on drop.
pub struct PyEcho {
    pub child: Child,
}

impl PyEcho {
    /// Starts it on 127.0.0.1:`port` (SO_REUSEADDR, so it can take over a
    /// [`super::HeldPort`]) and waits until it listens.
    pub fn start(port: u16) -> PyEcho {
        require_command("python3", "apt-get install python3");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(PY_ECHO)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut b = PyEcho { child };
        match rx.recv_timeout(PATIENCE) {
            Ok(line) if line.trim() == "ready" => b,
            other => {
                let _ = b.child.kill();
                panic!("python3 echo backend on port {port} did not start: {other:?}")
            }
        }
    }
}

impl Drop for PyEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
