//! UDP batching end to end: datagrams queued while the relay is stopped
//! are read in batches and sent as GSO runs, grouped per flow; GSO bursts
//! from either side are received whole (UDP_GRO). Every datagram keeps its
//! boundary, order and bytes.
mod common;
use common::*;
use std::net::{SocketAddr, UdpSocket};

/// The datagram number `i` of a burst: its size and a pattern naming it.
fn burst_datagram(i: usize) -> Vec<u8> {
    // Runs of equal sizes (joined into GSO sends), broken by a shorter one
    // (which ends a run) and a longer one (which cannot join one).
    let len = match i {
        17 => 300,
        29 => 1200,
        _ => 1000,
    };
    let mut d = pattern(i as u64 + 1, len);
    d[0] = i as u8;
    d
}

/// Receives `n` datagrams from `from` (skipping any from elsewhere); each
/// must equal `expected(i)` after `skip(d)` bytes.
fn recv_burst(s: &UdpSocket, from: SocketAddr, n: usize, skip: impl Fn(&[u8]) -> usize) -> Result<(), String> {
    let mut buf = vec![0u8; 65536];
    for i in 0..n {
        let len = loop {
            let (len, src) = s.recv_from(&mut buf).map_err(|e| format!("datagram {i} of {n}: {e}"))?;
            if src == from {
                break len;
            }
        };
        let got = &buf[..len];
        let body = &got[skip(got).min(len)..];
        let want = burst_datagram(i);
        if body != want.as_slice() {
            return Err(format!(
                "datagram {i}: {} bytes, starting {:?}; wanted {} bytes",
                body.len(),
                &body[..body.len().min(4)],
                want.len()
            ));
        }
    }
    Ok(())
}

/// 40 datagrams queued each way while the relay is stopped reach the other
/// side as 40 datagrams, in order, sizes and bytes intact, when it goes on:
/// the relay reads them in batches and sends runs as UDP GSO messages, and
/// the receiver still sees every boundary. With `proxy`, every datagram
/// carries its own PROXY v2 header.
fn burst_both_ways(listen: &str, client_at: &str, proxy: bool, extra: &[&str]) {
    const N: usize = 40;
    let backend = udp_client("127.0.0.1:0", PATIENCE);
    let baddr = backend.local_addr().unwrap();
    let mut r = Relay::start(|p| {
        let mut args = vec![format!("udp:{listen}:{}={baddr}", p.pick())];
        if proxy {
            args.extend(argv(["--send-proxy", "v2"]));
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    });
    let relay_addr: SocketAddr = format!("{listen}:{}", r.port()).parse().unwrap();
    let c = udp_client(client_at, PATIENCE);
    // v2 header: 16 bytes, then the address block whose length is in bytes 14-15.
    let header_len =
        |d: &[u8]| if proxy && d.len() >= 16 { 16 + u16::from_be_bytes([d[14], d[15]]) as usize } else { 0 };
    c.send_to(b"hello", relay_addr).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, flow) = backend.recv_from(&mut buf).expect("first datagram");
    assert_eq!(&buf[header_len(&buf[..n])..n], b"hello");
    r.stop();
    for i in 0..N {
        c.send_to(&burst_datagram(i), relay_addr).unwrap();
        backend.send_to(&burst_datagram(i), flow).unwrap();
    }
    r.signal(SIGCONT);
    let up = recv_burst(&backend, flow, N, header_len);
    let down = recv_burst(&c, relay_addr, N, |_| 0);
    r.assert_alive();
    assert_eq!((up, down), (Ok(()), Ok(())), "log:\n{}", r.log());
}

/// Three clients' datagrams queued interleaved while the relay is stopped:
/// the relay sends each flow's share of a batch together (one sendmmsg per
/// flow), and each client's datagrams still reach the backend in their own
/// order, intact, from that client's flow.
#[test]
fn interleaved_clients_keep_their_own_order() {
    // 3 x 24 datagrams of about 1 KB fit the backend's default receive buffer.
    const N: usize = 24;
    const CLIENTS: usize = 3;
    let backend = udp_client("127.0.0.1:0", PATIENCE);
    let baddr = backend.local_addr().unwrap();
    let mut r = Relay::start(|p| argv([&format!("udp:127.0.0.1:{}={baddr}", p.pick())]));
    let relay_addr: SocketAddr = format!("127.0.0.1:{}", r.port()).parse().unwrap();
    let clients: Vec<UdpSocket> = (0..CLIENTS).map(|_| udp_client("127.0.0.1:0", PATIENCE)).collect();
    let mut buf = vec![0u8; 65536];
    let mut flows = Vec::new();
    for (k, c) in clients.iter().enumerate() {
        c.send_to(format!("hello {k}").as_bytes(), relay_addr).unwrap();
        let (n, flow) = backend.recv_from(&mut buf).expect("first datagram");
        assert_eq!(&buf[..n], format!("hello {k}").as_bytes());
        flows.push(flow);
    }
    r.stop();
    for i in 0..N {
        for c in &clients {
            c.send_to(&burst_datagram(i), relay_addr).unwrap();
        }
    }
    r.signal(SIGCONT);
    let mut next = [0usize; CLIENTS];
    for _ in 0..N * CLIENTS {
        let (n, from) = backend.recv_from(&mut buf).unwrap_or_else(|e| panic!("{e}; got {next:?}\n{}", r.log()));
        let k = flows.iter().position(|f| *f == from).unwrap_or_else(|| panic!("datagram from unknown {from}"));
        assert!(buf[..n] == burst_datagram(next[k]), "client {k}: datagram {} out of order or damaged", next[k]);
        next[k] += 1;
    }
    assert_eq!(next, [N; CLIENTS]);
    r.assert_alive();
}

#[test]
fn bursts_keep_every_datagram_boundary_both_ways_ipv6() {
    burst_both_ways("[::1]", "[::1]:0", false, &[]);
}

#[test]
fn bursts_with_a_proxy_header_on_each_datagram_ipv4() {
    burst_both_ways("127.0.0.1", "127.0.0.1:0", true, &[]);
}

#[test]
fn bursts_without_gso_and_with_a_small_receive_buffer() {
    burst_both_ways("127.0.0.1", "127.0.0.1:0", false, &["--no-udp-gso", "--udp-rcvbuf", "256K"]);
}

/// Runs tests/helpers/gso_client.py: a client and a backend that each send
/// one UDP GSO burst (a run of equal datagrams and a short tail in one
/// sendmsg) through the relay, which receives it whole (UDP_GRO) unless told
/// otherwise. Every datagram must arrive alone, in order, intact.
fn gso_bursts(family: &str, extra: &[&str]) {
    require_command("python3", "apt-get install python3");
    // The script's backend binds this port with SO_REUSEADDR.
    let backend = HeldPort::new();
    let mut r = Relay::start(|p| {
        let listen = if family == "6" { format!("[::1]:{}", p.pick()) } else { format!("127.0.0.1:{}", p.pick()) };
        let mut args = vec![format!("udp:{listen}={}", backend.addr())];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    });
    let proxy = if extra.contains(&"--send-proxy") { "1" } else { "0" };
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/helpers/gso_client.py"))
        .args([family, &r.port().to_string(), &backend.port.to_string(), proxy])
        .output()
        .expect("run python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    r.assert_alive();
    assert!(out.status.success() && text.trim() == "ok", "{text}\nrelay log:\n{}", r.log());
}

#[test]
fn gso_bursts_from_client_and_backend_arrive_datagram_by_datagram() {
    gso_bursts("4", &[]);
    gso_bursts("6", &[]);
}

#[test]
fn gso_bursts_with_a_proxy_header_on_every_datagram() {
    gso_bursts("6", &["--send-proxy", "v2"]);
}

#[test]
fn gso_bursts_with_offloads_off() {
    gso_bursts("4", &["--no-udp-gso"]);
}
