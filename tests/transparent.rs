//! `--transparent`: the backend sees the client's own address.
//!
//! The routed tests build their own network namespaces (client, backend)
//! and remove them when done, even on failure; they need root and
//! iproute2, and fail saying so when either is missing.

mod common;
use common::*;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Runs the relay without any capability (root's included): setpriv drops
/// the inheritable and bounding sets, so exec leaves it none.
const NO_CAPS: [&str; 4] = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"];

const CAP_LINE: &str =
    "--transparent needs CAP_NET_ADMIN (setting IP_TRANSPARENT was refused: run as root or grant the capability)";

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
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
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
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

// ---- Routed tests: client, relay and backend namespaces ----

/// Addresses of the three namespaces (each test has its own, so they repeat).
const CLIENT4: &str = "10.231.1.2";
const CLIENT6: &str = "fd00:231:1::2";
const RELAY4: &str = "10.231.1.1";
const RELAY6: &str = "fd00:231:1::1";
const RELAY_B4: &str = "10.231.2.1";
const BACKEND4: &str = "10.231.2.2";
const BACKEND6: &str = "fd00:231:2::2";
const BACKEND_PORT: u16 = 8080;
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/transparent-routing.sh");

/// Three network namespaces joined by two veth pairs:
/// client (CLIENT4/6) -- relay (RELAY4/6 | RELAY_B4/6) -- backend
/// (BACKEND4/6), whose default route is the relay. Names are unique to
/// this process and test; Drop deletes the namespaces (and with them the
/// links, rules, routes and nft tables inside), even after a failure.
struct Net {
    client: String,
    relay: String,
    backend: String,
    /// The relay's interface facing the backend.
    relay_b: String,
    /// Links made in this namespace before they moved (deleted if still here).
    links: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Net {
    fn new() -> Net {
        static N: AtomicUsize = AtomicUsize::new(0);
        require_root();
        require_command("ip", "apt-get install iproute2");
        let tag = format!("sr{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed));
        let mut net = Net {
            client: format!("{tag}c"),
            relay: format!("{tag}r"),
            backend: format!("{tag}b"),
            relay_b: format!("{tag}rb"),
            links: vec![format!("{tag}c"), format!("{tag}b")],
        };
        net.build();
        net
    }

    fn build(&mut self) {
        let (c, r, b, rb) = (&self.client, &self.relay, &self.backend, &self.relay_b);
        let rc = format!("{r}c");
        for ns in [c, r, b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // The client-side pair is named after the client namespace, the
        // backend-side pair after the backend namespace.
        ip(&["link", "add", c, "type", "veth", "peer", "name", &rc]);
        ip(&["link", "add", b, "type", "veth", "peer", "name", rb]);
        for (link, ns) in [(c, c), (&rc, r), (b, b), (rb, r)] {
            ip(&["link", "set", link, "netns", ns]);
        }
        let addrs = [
            (c, c, CLIENT4, CLIENT6),
            (r, &rc, RELAY4, RELAY6),
            (r, rb, RELAY_B4, "fd00:231:2::1"),
            (b, b, BACKEND4, BACKEND6),
        ];
        for (ns, link, v4, v6) in addrs {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", link]);
            ip(&["-n", ns, "addr", "add", &format!("{v6}/64"), "dev", link, "nodad"]);
            ip(&["-n", ns, "link", "set", link, "up"]);
        }
        ip(&["-n", c, "route", "add", "default", "via", RELAY4]);
        ip(&["-n", c, "-6", "route", "add", "default", "via", RELAY6]);
        ip(&["-n", b, "route", "add", "default", "via", RELAY_B4]);
        ip(&["-n", b, "-6", "route", "add", "default", "via", "fd00:231:2::1"]);
    }

    /// Runs scripts/transparent-routing.sh in the relay's namespace, with
    /// the tool it picks itself (nft, here).
    fn routing(&self, action: &str) {
        require_command("nft", "apt-get install nftables");
        self.routing_with(action, None);
    }

    /// Runs scripts/transparent-routing.sh in the relay's namespace with
    /// SPLICE_RELAY_FIREWALL set to `firewall` (None: unset).
    fn routing_with(&self, action: &str, firewall: Option<&str>) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.relay, SCRIPT, action, &self.relay_b]);
        match firewall {
            Some(f) => cmd.env("SPLICE_RELAY_FIREWALL", f),
            None => cmd.env_remove("SPLICE_RELAY_FIREWALL"),
        };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "transparent-routing.sh {action} ({firewall:?}): {out:?}");
    }

    /// Runs `cmd args` in the relay's namespace; fails the test unless it succeeds.
    fn relay_exec(&self, cmd: &str, args: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.relay, cmd]).args(args).output().unwrap();
        assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The relay namespace's iptables and ip6tables rules (iptables-save,
    /// without its dated comments and chain counters), as text.
    fn relay_iptables_state(&self) -> String {
        let mut text = String::new();
        for save in ["iptables-save", "ip6tables-save"] {
            text += &format!("{save}:\n");
            for line in self.relay_exec(save, &[]).lines().filter(|l| !l.starts_with('#')) {
                let line = if line.starts_with(':') { line.split(" [").next().unwrap() } else { line };
                text += line;
                text.push('\n');
            }
        }
        text
    }

    /// The relay namespace's policy rules, routes of the script's table and
    /// nft ruleset (without counters: `-s`), as text.
    fn relay_routing_state(&self) -> String {
        let mut text = String::new();
        for args in [
            vec!["-4", "rule", "show"],
            vec!["-6", "rule", "show"],
            vec!["-4", "route", "show", "table", "2711"],
            vec!["-6", "route", "show", "table", "2711"],
        ] {
            let out = Command::new("ip").args(["-n", &self.relay]).args(&args).output().unwrap();
            text += &String::from_utf8_lossy(&out.stdout);
        }
        let out =
            Command::new("ip").args(["netns", "exec", &self.relay, "nft", "-s", "list", "ruleset"]).output().unwrap();
        text + &String::from_utf8_lossy(&out.stdout)
    }

    /// Runs `f` on a thread that entered namespace `ns`: sockets it makes
    /// live there, and may be used from any thread afterwards.
    fn within<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap()
    }

    /// The relay, started in its namespace.
    fn relay(&self, args: impl Fn(&mut Ports) -> Vec<String>) -> Relay {
        Relay::cmd().under(&["ip", "netns", "exec", &self.relay]).start(args)
    }

    /// A TCP echo backend on [::]:BACKEND_PORT in the backend namespace:
    /// each connection's peer address goes to the channel, then its bytes
    /// come back until EOF, then FIN.
    fn tcp_backend(&self) -> mpsc::Receiver<SocketAddr> {
        let l = self.within(&self.backend, || TcpListener::bind(("::", BACKEND_PORT)).expect("backend bind"));
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { return };
                let Ok(peer) = s.peer_addr() else { continue };
                if tx.send(SocketAddr::new(peer.ip().to_canonical(), peer.port())).is_err() {
                    return;
                }
                thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        rx
    }

    /// A TCP client socket made in the client namespace.
    fn tcp_client(&self, to: SocketAddr) -> io::Result<TcpStream> {
        self.within(&self.client, move || TcpStream::connect_timeout(&to, PATIENCE))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.client, &self.relay, &self.backend] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
    }
}

/// `len` bytes of `pattern(seed)` up through `c`, FIN, and the same bytes
/// back, then EOF: checked both ways, with the half-close in between.
fn echo_checked(mut c: TcpStream, seed: u64, len: usize) {
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let data = pattern(seed, len);
    let mut w = c.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap_or_else(|e| panic!("read after {} bytes: {e}", got.len()));
    writer.join().unwrap();
    assert_eq!(got.len(), len);
    assert!(got == data, "echoed bytes differ");
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn tcp_backend_sees_the_client_address_ipv4_and_ipv6_and_port_with_eq_port() {
    let net = Net::new();
    net.routing("up");
    let peers = net.tcp_backend();
    let r = net.relay(|p| {
        vec![
            "--transparent".into(),
            format!("{RELAY4}:{}={BACKEND4}:{BACKEND_PORT}", p.pick()),
            format!("[{RELAY6}]:{}=[{BACKEND6}]:{BACKEND_PORT}", p.pick()),
            format!("[::]:{}={BACKEND4}:{BACKEND_PORT},transparent=port", p.pick()),
        ]
    });
    let (p4, p6, pport) = (r.ports[0], r.ports[1], r.ports[2]);
    for (i, (to, client_ip, keeps_port)) in
        [(addr(RELAY4, p4), CLIENT4, false), (addr(RELAY6, p6), CLIENT6, false), (addr(RELAY4, pport), CLIENT4, true)]
            .into_iter()
            .enumerate()
    {
        let c = net.tcp_client(to).unwrap_or_else(|e| panic!("connect {to}: {e}\n{}", r.log()));
        let local = c.local_addr().unwrap();
        echo_checked(c, i as u64, 1 << 20);
        let seen = peers.recv_timeout(PATIENCE).expect("the backend saw no connection");
        assert_eq!(seen.ip(), client_ip.parse::<IpAddr>().unwrap(), "through {to}");
        if keeps_port {
            assert_eq!(seen.port(), local.port(), "transparent=port keeps the client's port");
        }
    }
    r.signal(SIGUSR1);
    r.expect_log(&format!("stats tcp {RELAY4}:{p4} -> {BACKEND4}:{BACKEND_PORT}: open 0 total 1 refused 0 denied 0 failed 0 transparent 1 transparent_fallbacks 0"));
    r.expect_log(&format!("stats tcp [::]:{pport} -> {BACKEND4}:{BACKEND_PORT}: open 0 total 1 refused 0 denied 0 failed 0 transparent 1 transparent_fallbacks 0"));
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn udp_backend_sees_the_client_address_and_port_ipv4_and_ipv6() {
    let net = Net::new();
    net.routing("up");
    let backend = net.within(&net.backend, || UdpSocket::bind(("::", BACKEND_PORT)).expect("backend bind"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf) {
            // Told before the echo: once the client has its reply, the channel has the source.
            if tx.send(SocketAddr::new(from.ip().to_canonical(), from.port())).is_err() {
                return;
            }
            let _ = backend.send_to(&buf[..n], from);
        }
    });
    let r = net.relay(|p| {
        vec![
            "--transparent".into(),
            format!("udp:{RELAY4}:{}={BACKEND4}:{BACKEND_PORT}", p.pick()),
            format!("udp:[::]:{}=[{BACKEND6}]:{BACKEND_PORT}", p.pick()),
        ]
    });
    let (p4, p6) = (r.ports[0], r.ports[1]);
    for (bind, to) in [(CLIENT4, addr(RELAY4, p4)), (CLIENT6, addr(RELAY6, p6))] {
        let bind = addr(bind, 0);
        let s = net.within(&net.client, move || UdpSocket::bind(bind).unwrap());
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let local = s.local_addr().unwrap();
        for i in 0..5u64 {
            let msg = pattern(i, 1000 + i as usize);
            let reply = round_trip(&s, to, &msg).unwrap_or_else(|| panic!("no echo through {to}\n{}", r.log()));
            assert_eq!(reply, to, "the reply comes from the address the client sent to");
        }
        let seen: Vec<SocketAddr> = rx.try_iter().collect();
        assert!(seen.len() >= 5, "{seen:?}");
        for from in seen {
            assert_eq!(from, local, "the backend sees the client's address and port through {to}");
        }
    }
    r.signal(SIGUSR1);
    r.expect_log(&format!("stats udp {RELAY4}:{p4} -> {BACKEND4}:{BACKEND_PORT}: flows 1 flows_total 1 transparent_flows 1 transparent_fallbacks 0"));
    r.expect_log(&format!("stats udp [::]:{p6} -> [{BACKEND6}]:{BACKEND_PORT}: flows 1 flows_total 1 transparent_flows 1 transparent_fallbacks 0"));
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn an_ipv6_client_of_an_ipv4_backend_falls_back_counted_logged_once_and_send_proxy_still_tells() {
    let net = Net::new();
    net.routing("up");
    // A backend that reads the PROXY v2 header (IPv6 source), then echoes.
    let l = net.within(&net.backend, || TcpListener::bind((BACKEND4, BACKEND_PORT)).unwrap());
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { return };
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut head = [0u8; 16];
            s.read_exact(&mut head).unwrap();
            let mut body = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
            s.read_exact(&mut body).unwrap();
            let header_src = (head[13] == 0x21).then(|| {
                let octets: [u8; 16] = body[..16].try_into().unwrap();
                IpAddr::from(octets)
            });
            let _ = tx.send((s.peer_addr().unwrap().ip(), header_src));
            let mut r = s.try_clone().unwrap();
            let _ = std::io::copy(&mut r, &mut s);
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    let r = net.relay(|p| vec![format!("[{RELAY6}]:{}={BACKEND4}:{BACKEND_PORT},transparent,send-proxy=v2", p.pick())]);
    for i in 0..2 {
        let c = net.tcp_client(addr(RELAY6, r.port())).unwrap();
        echo_checked(c, i, 64 << 10);
        let (peer, header_src) = rx.recv_timeout(PATIENCE).unwrap();
        assert_eq!(peer, RELAY_B4.parse::<IpAddr>().unwrap(), "the relay's own address");
        assert_eq!(header_src, Some(CLIENT6.parse().unwrap()), "the PROXY header still names the client");
    }
    r.signal(SIGUSR1);
    r.expect_log("transparent 0 transparent_fallbacks 2 ");
    let log = r.log();
    assert_eq!(log.matches("no transparent connect across address families").count(), 1, "{log}");
    assert!(log.contains(&format!("[{CLIENT6}]:")), "the line names the client:\n{log}");
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn without_the_return_route_a_connect_fails_in_connect_timeout_and_up_then_down_restore_it() {
    let net = Net::new();
    let before = net.relay_routing_state();
    let peers = net.tcp_backend();
    let r = net.relay(|p| {
        argv(["--transparent", "--connect-timeout", "1s", &format!("{RELAY4}:{}={BACKEND4}:{BACKEND_PORT}", p.pick())])
    });
    let to = addr(RELAY4, r.port());

    // No route back: the backend's SYN-ACK never reaches the relay.
    let mut c = net.tcp_client(to).unwrap();
    let start = Instant::now();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 16];
    let end = c.read(&mut buf);
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "closed after {:?}, not at the 1 s connect timeout",
        start.elapsed()
    );
    r.expect_log(&format!(
        "{CLIENT4}:{} -> {BACKEND4}:{BACKEND_PORT}: transparent connect timed out (are the backend's replies routed to the relay? see scripts/transparent-routing.sh)",
        c.local_addr().unwrap().port()
    ));
    assert!(peers.try_recv().is_err(), "no connection reached the backend's accept");

    // With the routing (set up twice: idempotent), it works.
    net.routing("up");
    let once = net.relay_routing_state();
    net.routing("up");
    assert_eq!(net.relay_routing_state(), once, "a second `up` changes nothing");
    assert_eq!(once.matches("fwmark 0x1/0x1 lookup 2711").count(), 2, "one rule per family:\n{once}");
    echo_checked(net.tcp_client(to).unwrap(), 7, 256 << 10);
    assert_eq!(peers.recv_timeout(PATIENCE).unwrap().ip(), CLIENT4.parse::<IpAddr>().unwrap());

    // `down` removes every rule, route and table it added, and nothing else.
    net.routing("down");
    assert_eq!(net.relay_routing_state(), before, "down leaves the namespace as it was");
    net.routing("down");
    assert_eq!(net.relay_routing_state(), before, "a second `down` changes nothing");
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn a_loopback_client_is_not_spoofed_and_not_counted_as_a_fallback() {
    let net = Net::new();
    net.routing("up");
    let peers = net.tcp_backend();
    let r = net.relay(|p| argv(["--transparent", &format!("127.0.0.1:{}={BACKEND4}:{BACKEND_PORT}", p.pick())]));
    let to = addr("127.0.0.1", r.port());
    let c = net.within(&net.relay, move || TcpStream::connect_timeout(&to, PATIENCE)).unwrap();
    echo_checked(c, 3, 64 << 10);
    assert_eq!(peers.recv_timeout(PATIENCE).unwrap().ip(), RELAY_B4.parse::<IpAddr>().unwrap());
    r.signal(SIGUSR1);
    r.expect_log("failed 0 transparent 0 transparent_fallbacks 0 ");
    assert!(!r.log().contains("across address families"), "{}", r.log());
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn a_backend_reset_reaches_the_client_as_a_reset() {
    let net = Net::new();
    net.routing("up");
    let l = net.within(&net.backend, || TcpListener::bind((BACKEND4, BACKEND_PORT)).unwrap());
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let Ok((mut s, peer)) = l.accept() else { return };
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf);
        let _ = tx.send(peer.ip());
        // SO_LINGER {1, 0}: the close sends a reset.
        let linger = nix::libc::linger { l_onoff: 1, l_linger: 0 };
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger).unwrap();
    });
    let r = net.relay(|p| argv(["--transparent", &format!("{RELAY4}:{}={BACKEND4}:{BACKEND_PORT}", p.pick())]));
    let mut c = net.tcp_client(addr(RELAY4, r.port())).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    c.write_all(b"hello").unwrap();
    assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), CLIENT4.parse::<IpAddr>().unwrap());
    let mut buf = [0u8; 16];
    let end = c.read(&mut buf);
    assert_eq!(end.as_ref().map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset), "{end:?}\n{}", r.log());
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn a_udp_ipv6_client_of_an_ipv4_backend_falls_back_counted_on_the_line_and_the_page() {
    let net = Net::new();
    net.routing("up");
    let backend = net.within(&net.backend, || UdpSocket::bind((BACKEND4, BACKEND_PORT)).expect("backend bind"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf) {
            if tx.send(from).is_err() {
                return;
            }
            let _ = backend.send_to(&buf[..n], from);
        }
    });
    let r = net.relay(|p| {
        vec![
            "--metrics".into(),
            format!("127.0.0.1:{}", p.pick()),
            format!("udp:[{RELAY6}]:{}={BACKEND4}:{BACKEND_PORT},transparent", p.pick()),
        ]
    });
    let (mport, port) = (r.ports[0], r.ports[1]);
    let to = addr(RELAY6, port);
    for i in 0..2u64 {
        // Two clients (two flows), one fallback line.
        let s = net.within(&net.client, || UdpSocket::bind((CLIENT6, 0)).unwrap());
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        round_trip(&s, to, &pattern(i, 300)).unwrap_or_else(|| panic!("no echo through {to}\n{}", r.log()));
    }
    for from in rx.try_iter() {
        assert_eq!(from.ip(), RELAY_B4.parse::<IpAddr>().unwrap(), "the relay's own address");
    }
    r.signal(SIGUSR1);
    r.expect_log(&format!(
        "stats udp [{RELAY6}]:{port} -> {BACKEND4}:{BACKEND_PORT}: flows 2 flows_total 2 transparent_flows 0 transparent_fallbacks 2 "
    ));
    let log = r.log();
    assert_eq!(log.matches("no transparent flow across address families").count(), 1, "{log}");
    let page = net.within(&net.relay, move || http_get(mport, "/metrics"));
    let labels = format!("{{listen=\"[{RELAY6}]:{port}\",target=\"{BACKEND4}:{BACKEND_PORT}\"}}");
    assert!(page.contains(&format!("splice_relay_udp_transparent_fallbacks_total{labels} 2\n")), "{page}");
    assert!(page.contains(&format!("splice_relay_udp_transparent_flows_total{labels} 0\n")), "{page}");
}

/// The iptables rule scripts/transparent-routing.sh adds for IFACE.
fn iptables_rule(iface: &str) -> String {
    format!("-A PREROUTING -i {iface} -m socket --transparent -j MARK --set-xmark 0x1/0x1")
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn with_iptables_forced_the_backend_sees_the_client_ipv4_and_ipv6_and_down_restores_the_namespace() {
    require_command("iptables", "apt-get install iptables");
    require_command("ip6tables", "apt-get install iptables");
    let net = Net::new();
    // Someone else's mangle rule, which `down` must keep. It also makes the
    // mangle table exist before `up`: iptables has no command that removes
    // a table, so the empty built-in chains `up` would create stay after
    // `down` (checked at the end, and said in the script's header).
    let foreign = ["-t", "mangle", "-A", "PREROUTING", "-i", "lo", "-m", "comment", "--comment", "not-splice-relay"];
    for t in ["iptables", "ip6tables"] {
        net.relay_exec(t, &foreign);
    }
    let before = net.relay_routing_state() + &net.relay_iptables_state();
    let rules = net.relay_iptables_state();
    assert_eq!(rules.matches("not-splice-relay").count(), 2, "{rules}");

    net.routing_with("up", Some("iptables"));
    let once = net.relay_routing_state() + &net.relay_iptables_state();
    net.routing_with("up", Some("iptables"));
    assert_eq!(net.relay_routing_state() + &net.relay_iptables_state(), once, "a second `up` changes nothing");
    let rules = net.relay_iptables_state();
    assert_eq!(rules.matches(&iptables_rule(&net.relay_b)).count(), 2, "one rule per family:\n{rules}");
    assert_eq!(once.matches("fwmark 0x1/0x1 lookup 2711").count(), 2, "one ip rule per family:\n{once}");
    assert!(!once.contains("splice_relay_transparent"), "iptables, not the nft table:\n{once}");

    let peers = net.tcp_backend();
    let r = net.relay(|p| {
        vec![
            "--transparent".into(),
            format!("{RELAY4}:{}={BACKEND4}:{BACKEND_PORT}", p.pick()),
            format!("[{RELAY6}]:{}=[{BACKEND6}]:{BACKEND_PORT}", p.pick()),
        ]
    });
    let (p4, p6) = (r.ports[0], r.ports[1]);
    for (i, (to, client_ip)) in [(addr(RELAY4, p4), CLIENT4), (addr(RELAY6, p6), CLIENT6)].into_iter().enumerate() {
        let c = net.tcp_client(to).unwrap_or_else(|e| panic!("connect {to}: {e}\n{}", r.log()));
        echo_checked(c, i as u64, 1 << 20);
        let seen = peers.recv_timeout(PATIENCE).expect("the backend saw no connection");
        assert_eq!(seen.ip(), client_ip.parse::<IpAddr>().unwrap(), "through {to}");
    }
    r.signal(SIGUSR1);
    r.expect_log(&format!("stats tcp {RELAY4}:{p4} -> {BACKEND4}:{BACKEND_PORT}: open 0 total 1 refused 0 denied 0 failed 0 transparent 1 transparent_fallbacks 0"));
    r.expect_log(&format!("stats tcp [{RELAY6}]:{p6} -> [{BACKEND6}]:{BACKEND_PORT}: open 0 total 1 refused 0 denied 0 failed 0 transparent 1 transparent_fallbacks 0"));

    // `down` removes its rules, ip rules and routes, and nothing else.
    net.routing_with("down", Some("iptables"));
    assert_eq!(net.relay_routing_state() + &net.relay_iptables_state(), before, "down leaves the namespace as it was");
    net.routing_with("down", Some("iptables"));
    assert_eq!(net.relay_routing_state() + &net.relay_iptables_state(), before, "a second `down` changes nothing");

    // Without the other rule, no rule at all is left.
    let delete = foreign.map(|a| if a == "-A" { "-D" } else { a });
    for t in ["iptables", "ip6tables"] {
        net.relay_exec(t, &delete);
    }
    let after = net.relay_iptables_state();
    assert!(!after.lines().any(|l| l.starts_with("-A")), "{after}");
}

/// Addresses the client (a trusted proxy) names in its PROXY headers: on
/// the client's networks but on no interface. The backend's default route
/// is the relay, whose transparent socket takes the replies to them.
const HEADER4: &str = "10.231.1.7";
const HEADER6: &str = "fd00:231:1::7";

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn on_accept_proxy_the_backend_sees_the_header_source_and_port_with_eq_port_and_another_family_falls_back() {
    let net = Net::new();
    net.routing("up");
    let peers = net.tcp_backend();
    let r = net.relay(|p| {
        vec![
            "--trusted-proxies".into(),
            format!("{CLIENT4}/32,{CLIENT6}/128"),
            format!("{RELAY4}:{}={BACKEND4}:{BACKEND_PORT},accept-proxy,transparent", p.pick()),
            format!("{RELAY4}:{}={BACKEND4}:{BACKEND_PORT},accept-proxy,transparent=port", p.pick()),
            format!("[{RELAY6}]:{}=[{BACKEND6}]:{BACKEND_PORT},accept-proxy,transparent=port", p.pick()),
        ]
    });
    let (p4, p4port, p6port) = (r.ports[0], r.ports[1], r.ports[2]);
    // (to, header, the address the backend must see, whether its port too)
    let cases = [
        (addr(RELAY4, p4), format!("PROXY TCP4 {HEADER4} {RELAY4} 40001 {p4}\r\n"), addr(HEADER4, 40001), false),
        (addr(RELAY4, p4port), format!("PROXY TCP4 {HEADER4} {RELAY4} 40002 {p4port}\r\n"), addr(HEADER4, 40002), true),
        (addr(RELAY6, p6port), format!("PROXY TCP6 {HEADER6} {RELAY6} 40003 {p6port}\r\n"), addr(HEADER6, 40003), true),
        // An IPv6 source for an IPv4 backend: the relay's own address, a fallback.
        (addr(RELAY4, p4), format!("PROXY TCP6 {HEADER6} {RELAY6} 40004 {p4}\r\n"), addr(RELAY_B4, 0), false),
    ];
    for (i, (to, header, want, keeps_port)) in cases.into_iter().enumerate() {
        let mut c = net.tcp_client(to).unwrap_or_else(|e| panic!("connect {to}: {e}\n{}", r.log()));
        c.write_all(header.as_bytes()).unwrap();
        echo_checked(c, 10 + i as u64, 256 << 10);
        let seen =
            peers.recv_timeout(PATIENCE).unwrap_or_else(|_| panic!("the backend saw no connection\n{}", r.log()));
        assert_eq!(seen.ip(), want.ip(), "{header:?} through {to}");
        if keeps_port {
            assert_eq!(seen.port(), want.port(), "transparent=port keeps the header's port: {header:?}");
        }
    }
    r.signal(SIGUSR1);
    r.expect_log(&format!("stats tcp {RELAY4}:{p4} -> {BACKEND4}:{BACKEND_PORT}: open 0 total 2 refused 0 denied 0 failed 0 transparent 1 transparent_fallbacks 1 "));
    r.expect_log(&format!("stats tcp {RELAY4}:{p4port} -> {BACKEND4}:{BACKEND_PORT}: open 0 total 1 refused 0 denied 0 failed 0 transparent 1 transparent_fallbacks 0 "));
    r.expect_log(&format!("stats tcp [{RELAY6}]:{p6port} -> [{BACKEND6}]:{BACKEND_PORT}: open 0 total 1 refused 0 denied 0 failed 0 transparent 1 transparent_fallbacks 0 "));
    let log = r.log();
    assert_eq!(log.matches("no transparent connect across address families").count(), 1, "{log}");
    assert!(
        log.contains(&format!("[{HEADER6}]:40004 -> {BACKEND4}:{BACKEND_PORT}: no transparent connect")),
        "the line names the header's source:\n{log}"
    );
}

/// The full path of `cmd` on PATH.
fn which(cmd: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(cmd))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{cmd}` is not on PATH"))
}

/// A directory removed on drop, even after a failure.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
#[ignore = "needs root (network namespaces, capabilities); scripts/test.sh runs it"]
fn a_forced_firewall_tool_that_is_missing_is_named_and_nothing_changes() {
    let net = Net::new();
    // A PATH with bash and ip only: neither nft nor iptables.
    let dir = TempDir(std::env::temp_dir().join(format!("splice-relay-path-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    for cmd in ["bash", "ip"] {
        std::os::unix::fs::symlink(which(cmd), dir.0.join(cmd)).unwrap();
    }
    let before = net.relay_routing_state();
    let cases = [
        (
            "iptables",
            1,
            "SPLICE_RELAY_FIREWALL=iptables, but iptables or ip6tables is not on PATH (apt-get install iptables)",
        ),
        ("nft", 1, "SPLICE_RELAY_FIREWALL=nft, but nft is not on PATH (apt-get install nftables)"),
        ("pf", 2, "SPLICE_RELAY_FIREWALL must be nft or iptables, not 'pf'"),
    ];
    for (firewall, code, line) in cases {
        let out = Command::new("ip")
            .args(["netns", "exec", &net.relay, "env", &format!("PATH={}", dir.0.display())])
            .arg(format!("SPLICE_RELAY_FIREWALL={firewall}"))
            .args([SCRIPT, "up", &net.relay_b])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{firewall}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("{SCRIPT}: {line}\n"), "{firewall}");
        assert_eq!(net.relay_routing_state(), before, "{firewall}: the namespace is unchanged");
    }
}
