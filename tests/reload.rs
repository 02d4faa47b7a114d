//! Reload on SIGHUP: the `-c` files (forwards and option lines) are read
//! again; kept listen addresses keep their sockets, removed forwards stop
//! accepting while their connections and flows run on, added ones listen,
//! and a configuration with any problem changes nothing.
mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SIGHUP: i32 = 1;

/// A config file at a temporary path, removed on drop.
struct Conf(std::path::PathBuf);

impl Conf {
    fn new(name: &str) -> Conf {
        Conf(std::env::temp_dir().join(format!("splice-relay-reload-{}-{name}.conf", std::process::id())))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// Replaces the file's text at once (a rename), as an editor or a
    /// config manager would.
    fn write(&self, text: &str) {
        let tmp = self.0.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for Conf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `text` into `conf`, sends SIGHUP and waits for the `n`th reload
/// to be done, good or not.
fn reload(r: &Relay, conf: &Conf, text: &str, n: usize) {
    conf.write(text);
    r.signal(SIGHUP);
    wait_until(PATIENCE, || r.count("reloaded: ") + r.count("reload failed;") + r.count("reload applied in part") >= n);
    assert_eq!(
        r.count("reloaded: ") + r.count("reload failed;") + r.count("reload applied in part"),
        n,
        "reload {n}:\n{}",
        tail(&r.log(), 30)
    );
}

/// Connects to the forward on 127.0.0.1:`port` and reads the backend's
/// one-byte greeting: which backend the connection reached.
fn greeting(port: u16) -> Result<u8, String> {
    let mut c = try_connect(&format!("127.0.0.1:{port}")).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut g = [0u8; 1];
    c.read_exact(&mut g).map_err(|e| format!("greeting: {e}"))?;
    echo_round(&mut c, b"ping").map_err(|e| format!("echo: {e}"))?;
    Ok(g[0])
}

/// One client streaming through the forward until `stop`: each round
/// writes 16 KiB of a pattern and reads it back whole, so a byte lost,
/// added or changed fails it. Returns the bytes checked.
fn stream(port: u16, seed: u64, stop: Arc<AtomicBool>) -> Result<u64, String> {
    let mut c = try_connect(&format!("127.0.0.1:{port}")).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut g = [0u8; 1];
    c.read_exact(&mut g).map_err(|e| format!("greeting: {e}"))?;
    let mut back = vec![0u8; 16 << 10];
    let mut checked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    for round in 0u64.. {
        if stop.load(Ordering::Acquire) || Instant::now() > deadline {
            break;
        }
        let chunk = pattern(seed << 20 | round, back.len());
        c.write_all(&chunk).map_err(|e| format!("round {round}: write: {e}"))?;
        c.read_exact(&mut back).map_err(|e| format!("round {round}: read: {e}"))?;
        if back != chunk {
            return Err(format!("round {round}: the bytes came back changed"));
        }
        checked += chunk.len() as u64;
        // Paced, so 200 streams leave the 2 cores to the relay and the reloads.
        thread::sleep(Duration::from_millis(5));
    }
    c.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).map_err(|e| format!("end: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last round", rest.len()));
    }
    Ok(checked)
}

/// The test: 200 connections stream checksummed data through a
/// kept forward while the config is rewritten and SIGHUP sent 20 times,
/// each time retargeting the kept forward, adding a forward and removing
/// the one added before. No byte is lost or changed, no client of the
/// kept forward is refused, new connections reach the new target, the
/// added forward accepts and the removed one refuses. Two loops, so each
/// reload is handed to another thread too.
#[test]
fn two_hundred_streams_survive_twenty_reloads() {
    let a = Echo::default().greeting(b"A").bind("127.0.0.1:0").addr;
    let b = Echo::default().greeting(b"B").bind("127.0.0.1:0").addr;
    let conf = Conf::new("load");
    let r = Relay::cmd().log("info").start(|p| {
        conf.write(&format!("127.0.0.1:{}={a}\n", p.pick()));
        argv(["--threads", "2", "-c", conf.path()])
    });
    let kept = r.port();
    // The kept forward's listener in each loop.
    let sockets_at_start = r.fds().sockets;

    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..200)
        .map(|i| {
            let stop = stop.clone();
            thread::Builder::new().stack_size(256 << 10).spawn(move || stream(kept, i, stop)).unwrap()
        })
        .collect();
    // A client connecting over and over to the kept forward: never refused.
    let (tries, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let prober = {
        let (stop, tries, refused) = (stop.clone(), tries.clone(), refused.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                if let Err(e) = greeting(kept) {
                    refused.lock().unwrap().push(e);
                }
                tries.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let mut before: Option<u16> = None;
    for i in 0..20 {
        let (target, letter) = if i % 2 == 0 { (b, b'B') } else { (a, b'A') };
        let added = free_port();
        reload(&r, &conf, &format!("127.0.0.1:{kept}={target}\n127.0.0.1:{added}={a}\n"), i + 1);
        assert!(r.count("reloaded: ") == i + 1, "reload {i} refused:\n{}", tail(&r.log(), 20));
        assert_eq!(greeting(kept), Ok(letter), "reload {i}: a new connection must reach the new target");
        assert_eq!(greeting(added), Ok(b'A'), "reload {i}: the added forward must accept");
        if let Some(gone) = before {
            assert!(
                refuses_connections(&format!("127.0.0.1:{gone}")),
                "reload {i}: the removed forward {gone} still accepts"
            );
        }
        before = Some(added);
    }

    stop.store(true, Ordering::Release);
    prober.join().unwrap();
    let mut checked = 0;
    for (i, s) in streams.into_iter().enumerate() {
        match s.join().unwrap() {
            Ok(n) => checked += n,
            Err(e) => panic!("stream {i}: {e}\n{}", tail(&r.log(), 30)),
        }
    }
    let refused = refused.lock().unwrap();
    assert!(refused.is_empty(), "clients of the kept forward refused: {:?}", &refused[..refused.len().min(5)]);
    assert!(tries.load(Ordering::Relaxed) >= 20, "the prober hardly ran");
    assert!(checked >= 200 * (16 << 10), "{checked} bytes checked");
    assert_eq!(r.count("reload failed"), 0, "{}", r.log());
    // Nothing leaks: once every connection is over, the relay holds the
    // kept forward's and the last added forward's listeners (one per loop)
    // and no other socket; the retired listeners are gone.
    let want = sockets_at_start + 2;
    assert!(
        wait_until(PATIENCE, || r.fds().sockets == want),
        "{} sockets, not {want}, once the streams ended:\n{}",
        r.fds().sockets,
        tail(&r.log(), 20)
    );
}

/// Waits until the metrics page (built at most once a second) shows every
/// line of `wants`.
fn metrics_show(port: u16, wants: &[&str]) {
    let shows = || {
        let page = http_get(port, "/metrics");
        wants.iter().all(|w| page.contains(w))
    };
    assert!(wait_until(PATIENCE, shows), "not all of {wants:?} in\n{}", http_get(port, "/metrics"));
}

/// A bad line, a port in use, an overlap: the reload is refused whole, the
/// log names the file and line, the running forwards (and the forward the
/// bad config would remove) keep working, and the metrics count it.
#[test]
fn a_broken_config_changes_nothing() {
    let a = Echo::default().greeting(b"A").bind("127.0.0.1:0").addr;
    let conf = Conf::new("broken");
    let mut r = Relay::cmd().log("info").start(|p| {
        conf.write(&format!("127.0.0.1:{}={a}\n", p.pick()));
        argv(["--metrics", &format!("127.0.0.1:{}", p.pick()), "-c", conf.path()])
    });
    let (kept, mport) = (r.ports[0], r.ports[1]);
    let good = format!("127.0.0.1:{kept}={a}\n");

    reload(&r, &conf, &format!("{good}this is not a forward\n"), 1);
    r.expect_log(&format!("reload: {}:2: invalid forward \"this is not a forward\"", conf.path()));
    r.expect_log("reload failed; the running configuration stays");

    // A port in use: the forward on `kept` (which this config drops) stays.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    reload(&r, &conf, &format!("127.0.0.1:{busy}={a}\n"), 2);
    r.expect_log(&format!("reload: cannot listen on tcp 127.0.0.1:{busy}: Address already in use"));
    assert_eq!(greeting(kept), Ok(b'A'), "the forward a refused reload would remove must stay");

    // Two forwards on one address; then a bad option line.
    let twice = free_port();
    reload(&r, &conf, &format!("{good}127.0.0.1:{twice}={a}\n0.0.0.0:{twice}={a}\n"), 3);
    r.expect_log(&format!("cannot listen on tcp 0.0.0.0:{twice}: Address already in use (by the forward"));
    assert!(refuses_connections(&format!("127.0.0.1:{twice}")), "a refused reload must bind nothing");
    reload(&r, &conf, &format!("{good}--idle-timeout soon\n"), 4);
    r.expect_log(&format!("reload: {}:2: invalid value 'soon' for '--idle-timeout", conf.path()));

    metrics_show(
        mport,
        &[
            "splice_relay_reloads_total 4\n",
            "splice_relay_reloads_failed_total 4\n",
            "splice_relay_config_last_reload_successful 0\n",
        ],
    );
    assert_eq!(greeting(kept), Ok(b'A'));

    // Mended: applied, and the metrics say so.
    let added = free_port();
    reload(&r, &conf, &format!("{good}127.0.0.1:{added}={a}\n"), 5);
    assert_eq!(greeting(added), Ok(b'A'));
    metrics_show(
        mport,
        &[
            "splice_relay_reloads_total 5\n",
            "splice_relay_reloads_failed_total 4\n",
            "splice_relay_config_last_reload_successful 1\n",
        ],
    );
    r.assert_alive();
}

/// A removed forward's open connection runs on (and its listener goes with
/// its last connection); with --drain-timeout in the config, the
/// connections of a forward removed later are reset once it passes; a
/// forward back while its connection runs takes its listener again.
#[test]
fn a_removed_forward_lets_its_connections_finish() {
    let a = echo_server("127.0.0.1:0");
    let conf = Conf::new("removed");
    let r = Relay::cmd().log("info").start(|p| {
        conf.write(&format!("127.0.0.1:{}={a}\n127.0.0.1:{}={a}\n", p.pick(), p.pick()));
        argv(["-c", conf.path()])
    });
    let (stay, go) = (r.ports[0], r.ports[1]);
    let mut open = connect(&format!("127.0.0.1:{go}"));
    echo_round(&mut open, b"before").unwrap();

    reload(&r, &conf, &format!("127.0.0.1:{stay}={a}\n"), 1);
    r.expect_log(&format!("tcp 127.0.0.1:{go} -> {a}: removed; no longer accepting, 1 connections left to finish"));
    assert!(refuses_connections(&format!("127.0.0.1:{go}")), "a removed forward must stop accepting");
    echo_round(&mut open, b"after the reload").unwrap();
    open.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&mut open).closed(), "the connection must end cleanly");
    r.expect_log(&format!("tcp 127.0.0.1:{go} -> {a}: removed; its last connection ended"));

    // Back, with a drain bound from the file's option line; then removed again.
    reload(&r, &conf, &format!("--drain-timeout 1s\n127.0.0.1:{stay}={a}\n127.0.0.1:{go}={a}\n"), 2);
    let mut open = connect(&format!("127.0.0.1:{go}"));
    echo_round(&mut open, b"again").unwrap();
    reload(&r, &conf, &format!("--drain-timeout 1s\n127.0.0.1:{stay}={a}\n"), 3);
    r.expect_log(&format!("tcp 127.0.0.1:{go}: drain timeout reached; resetting 1 connections"));
    open.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 16];
    match open.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("a connection cut by the drain bound must be reset, got {other:?}"),
    }
    echo_once(&format!("127.0.0.1:{stay}"), 3, 1000);

    // Removed with a connection open, then back before it ends: its
    // listener is taken again, and both old and new connections work.
    let both = format!("127.0.0.1:{stay}={a}\n127.0.0.1:{go}={a}\n");
    reload(&r, &conf, &both, 4);
    let mut held = connect(&format!("127.0.0.1:{go}"));
    echo_round(&mut held, b"held").unwrap();
    reload(&r, &conf, &format!("127.0.0.1:{stay}={a}\n"), 5);
    assert!(refuses_connections(&format!("127.0.0.1:{go}")));
    reload(&r, &conf, &both, 6);
    // At start, and at reloads 2, 4 and 6.
    assert_eq!(r.count(&format!("listening on tcp 127.0.0.1:{go} -> {a}")), 4, "{}", r.log());
    echo_once(&format!("127.0.0.1:{go}"), 4, 1000);
    echo_round(&mut held, b"still held").unwrap();
    held.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&mut held).closed());
    // A round trip later, a retired listener would have said it is gone.
    echo_once(&format!("127.0.0.1:{stay}"), 5, 1000);
    assert_eq!(r.count("its last connection ended"), 2, "a listener taken back is not retired:\n{}", r.log());
}

/// One loop, no SO_REUSEPORT: moving a forward from 0.0.0.0:P to
/// 127.0.0.1:P (TCP and UDP) works, the new sockets bound once the old
/// ones are closed (the old UDP one with its flow, said in the log).
#[test]
fn one_loop_moves_a_forward_to_an_overlapping_address() {
    let q = tcp_and_udp_echo();
    let conf = Conf::new("move");
    let r = Relay::cmd().log("info").start(|p| {
        conf.write(&format!("both:0.0.0.0:{}=127.0.0.1:{q}\n", p.pick()));
        argv(["-c", conf.path()])
    });
    let port = r.port();
    // A flow on the old UDP socket: it keeps that socket open, so with one
    // loop the reload closes it (flow and all) to bind the new address.
    let u = udp_client("127.0.0.1:0", PATIENCE);
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(round_trip(&u, to, b"before").is_some());
    reload(&r, &conf, &format!("both:127.0.0.1:{port}=127.0.0.1:{q}\n"), 1);
    assert_eq!(r.count("reloaded: "), 1, "{}", r.log());
    r.expect_log(&format!("udp 0.0.0.0:{port}: closed with its 1 flows: a new forward needs its port"));
    r.expect_log(&format!("listening on tcp 127.0.0.1:{port}"));
    r.expect_log(&format!("listening on udp 127.0.0.1:{port}"));
    echo_once(&format!("127.0.0.1:{port}"), 4, 1000);
    assert!(round_trip(&u, to, b"moved").is_some(), "the client's datagrams reach the new forward");
}

/// A UDP backend that answers each datagram with `tag` and the datagram.
fn tagged_udp(tag: u8) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut out = vec![tag];
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from);
        }
    });
    addr
}

/// UDP: a retarget sends new clients to the new backend while a flow
/// keeps its own; a removed forward's flow runs on and new clients are
/// dropped and counted (`reason="removed"`); back again, it serves new
/// clients while the old flow still runs.
#[test]
fn udp_flows_run_on_and_new_clients_follow_the_config() {
    udp_reload("1");
}

/// The same with two loops: each applies the plan to its own socket, and
/// the page adds their counters by address.
#[test]
fn udp_flows_run_on_and_new_clients_follow_the_config_with_two_loops() {
    udp_reload("2");
}

fn udp_reload(threads: &str) {
    let (a, b) = (tagged_udp(b'A'), tagged_udp(b'B'));
    let conf = Conf::new(&format!("udp-{threads}"));
    let r = Relay::cmd().log("info").start(|p| {
        conf.write(&format!("udp:127.0.0.1:{}={a}\n", p.pick()));
        argv(["--threads", threads, "--metrics", &format!("127.0.0.1:{}", p.pick()), "-c", conf.path()])
    });
    let (port, mport) = (r.ports[0], r.ports[1]);
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ask = |s: &UdpSocket| {
        s.send_to(b"q", to).unwrap();
        recv_any(s, PATIENCE).map(|(d, _)| d[0])
    };
    let old = udp_client("127.0.0.1:0", PATIENCE);
    assert_eq!(ask(&old), Some(b'A'));

    reload(&r, &conf, &format!("udp:127.0.0.1:{port}={b}\n"), 1);
    let new = udp_client("127.0.0.1:0", PATIENCE);
    assert_eq!(ask(&new), Some(b'B'), "a new client must reach the new target");
    assert_eq!(ask(&old), Some(b'A'), "an open flow keeps its backend");

    let other = free_port();
    reload(&r, &conf, &format!("udp:127.0.0.1:{other}={b}\n"), 2);
    r.expect_log(&format!("udp 127.0.0.1:{port} -> {b}: removed; no new flows"));
    assert_eq!(ask(&old), Some(b'A'), "a removed forward's flow runs on");
    let late = udp_client("127.0.0.1:0", Duration::from_millis(300));
    late.send_to(b"q", to).unwrap();
    assert!(
        wait_until(PATIENCE, || {
            http_get(mport, "/metrics").contains(&format!(
            "splice_relay_udp_datagrams_dropped_total{{listen=\"127.0.0.1:{port}\",target=\"{b}\",direction=\"up\",reason=\"removed\"}} 1\n"
        ))
        }),
        "the new client's datagram must be dropped and counted:\n{}",
        http_get(mport, "/metrics")
    );
    assert!(recv_any(&late, Duration::from_millis(300)).is_none(), "a removed forward must open no flow");
    let fresh = udp_client("127.0.0.1:0", PATIENCE);
    fresh.send_to(b"q", ("127.0.0.1", other)).unwrap();
    assert_eq!(recv_any(&fresh, PATIENCE).map(|(d, _)| d[0]), Some(b'B'), "the added forward relays");

    // Back while its flow runs on: the retired socket is taken again (a
    // loop without one uses a fresh socket), new clients are served again.
    reload(&r, &conf, &format!("udp:127.0.0.1:{port}={a}\nudp:127.0.0.1:{other}={b}\n"), 3);
    r.expect_log(&format!("listening on udp 127.0.0.1:{port} -> {a}"));
    assert_eq!(ask(&old), Some(b'A'), "the flow that ran on still runs");
    let again = udp_client("127.0.0.1:0", PATIENCE);
    assert_eq!(ask(&again), Some(b'A'), "a forward back serves new clients");
}

/// Options in the file change on reload (the connection limit, the idle
/// timeout, for connections made after it); what only a restart changes is
/// logged as ignored.
#[test]
fn option_lines_reload_and_fixed_ones_are_named() {
    let a = echo_server("127.0.0.1:0");
    let conf = Conf::new("options");
    let r = Relay::cmd().log("info").start(|p| {
        conf.write(&format!("127.0.0.1:{}={a}\n", p.pick()));
        argv(["-c", conf.path()])
    });
    let port = r.port();
    reload(&r, &conf, &format!("--max-connections 1\n--pipe-size 64K\n--idle-timeout 1s\n127.0.0.1:{port}={a}\n"), 1);
    r.expect_log("reload: --pipe-size changed: ignored until restart");
    let mut one = connect(&format!("127.0.0.1:{port}"));
    echo_round(&mut one, b"1").unwrap();
    // The limit holds: a second client waits in the backlog, unanswered.
    let mut two = connect(&format!("127.0.0.1:{port}"));
    two.write_all(b"2").unwrap();
    assert_eq!(read_end(&mut two, Duration::from_millis(300)), ReadEnd::TimedOut, "served past --max-connections 1");
    // The idle timeout closes the first; then the second is served.
    assert!(read_until_closed(&mut one).closed(), "--idle-timeout 1s from the reload did not apply");
    two.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut b = [0u8; 1];
    two.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"2");
}
