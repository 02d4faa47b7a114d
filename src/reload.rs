//! Reload on SIGHUP (ARCHITECTURE.md, "Reload"): the configuration is read
//! again off the loop, then loop 0 checks it, binds what is new and hands
//! each loop its part ([`Plan`]); a loop applies its plan between two polls.
//! A configuration with any problem changes nothing.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};

use crate::Bound;
use crate::cli::Config;
use crate::config::{Forward, StartError};
use crate::event_loop::LoopSettings;
use crate::metrics::Reloads;
use crate::shared::Shared;
use crate::tcp::{TcpRelay, TcpSettings};
use crate::udp::{UdpRelay, UdpSettings};

/// Reads the configuration again: the `-c` files and the command line's
/// forwards, each problem found (not only the first). Runs on a thread of
/// its own: host names are resolved, which may take a while.
pub type Reread = Arc<dyn Fn() -> Result<Config, Vec<StartError>> + Send + Sync>;

/// What one loop is to change: the new forwards, the sockets bound for
/// those new to it, and the settings new connections and flows get.
pub(crate) struct Plan {
    pub(crate) forwards: Arc<Vec<Forward>>,
    pub(crate) fresh: Bound,
    pub(crate) tcp: TcpSettings,
    pub(crate) udp: UdpSettings,
    pub(crate) settings: LoopSettings,
}

/// What only a restart changes, as the running relay has it.
#[derive(Debug, PartialEq)]
struct Fixed {
    threads: usize,
    metrics: Option<SocketAddr>,
    ipv6_only: bool,
    splice: bool,
    pipe_size: usize,
    udp_gso: bool,
    log_level: log::LevelFilter,
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        Fixed {
            threads: c.threads,
            metrics: c.metrics,
            ipv6_only: c.ipv6_only,
            splice: c.tcp.splice,
            pipe_size: c.tcp.pipe_size,
            udp_gso: c.udp.gso,
            log_level: c.log_level,
        }
    }

    /// The options that differ in `new`, by name.
    fn changed(&self, new: &Fixed) -> Vec<&'static str> {
        let mut names = Vec::new();
        let mut check = |differs: bool, name| {
            if differs {
                names.push(name);
            }
        };
        check(self.threads != new.threads, "--threads");
        check(self.metrics != new.metrics, "--metrics");
        check(self.ipv6_only != new.ipv6_only, "--ipv6-only");
        check(self.splice != new.splice, "--no-splice");
        check(self.pipe_size != new.pipe_size, "--pipe-size");
        check(self.udp_gso != new.udp_gso, "--no-udp-gso");
        check(self.log_level != new.log_level, "-v/-q");
        names
    }
}

/// Loop 0's side of reloads: how to read the configuration, what is
/// fixed until restart, and the counters.
pub(crate) struct Reloader {
    reread: Reread,
    fixed: Fixed,
    /// A read under way, and whether another SIGHUP came meanwhile.
    pending: Option<Receiver<Result<Config, Vec<StartError>>>>,
    again: bool,
    /// A reload handed out, waiting for every loop to apply it: whether all
    /// of it worked, and the number of forwards.
    pub(crate) finishing: Option<(bool, String)>,
    pub(crate) stats: Reloads,
}

impl Reloader {
    pub(crate) fn new(reread: Reread, running: &Config) -> Self {
        Reloader {
            reread,
            fixed: Fixed::of(running),
            pending: None,
            again: false,
            finishing: None,
            stats: Reloads::new(),
        }
    }

    /// --ipv6-only as the relay started with it.
    pub(crate) fn ipv6_only(&self) -> bool {
        self.fixed.ipv6_only
    }

    /// SIGHUP: starts reading the configuration on a thread that wakes
    /// loop 0 when done (one read at a time; a SIGHUP meanwhile reads again
    /// after it).
    pub(crate) fn request(&mut self, shared: &Arc<Shared>) {
        if self.pending.is_some() || self.finishing.is_some() {
            self.again = true;
            return;
        }
        crate::systemd::notify_reloading();
        let (tx, rx) = std::sync::mpsc::channel();
        let (reread, shared) = (self.reread.clone(), shared.clone());
        let spawned = std::thread::Builder::new().name("reload".into()).spawn(move || {
            let _ = tx.send(reread());
            let _ = shared.wakers[0].wake();
        });
        match spawned {
            Ok(_) => self.pending = Some(rx),
            Err(e) => {
                self.stats.total += 1;
                self.fail(&[format!("cannot start reading the configuration: {e}")]);
            }
        }
    }

    /// The configuration read, once it is there.
    pub(crate) fn take_read(&mut self) -> Option<Result<Config, Vec<StartError>>> {
        let rx = self.pending.as_ref()?;
        let read = match rx.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => {
                Err(vec![StartError::Runtime("reading the configuration failed".into())])
            }
        };
        self.pending = None;
        self.stats.total += 1;
        Some(read)
    }

    /// True (once) if a SIGHUP came while the last reload was under way
    /// and that reload is over: time for the next.
    pub(crate) fn take_again(&mut self) -> bool {
        self.again && self.pending.is_none() && self.finishing.is_none() && std::mem::take(&mut self.again)
    }

    /// Checks `config` against the running relay (loop 0's listeners stand
    /// for every loop's) and binds the listen addresses it adds, for each of
    /// `n` loops. Returns each loop's plan and, with one loop, the forwards
    /// to bind only after the plan closed the listeners they overlap; or
    /// every problem, having changed nothing.
    pub(crate) fn prepare(
        &mut self,
        config: Config,
        tcp: &TcpRelay,
        udp: &UdpRelay,
        n: usize,
    ) -> Result<(Vec<Plan>, Vec<Later>, String), Vec<String>> {
        let mut problems: Vec<String> = Vec::new();
        if config.forwards.is_empty() {
            problems.push(crate::NOTHING_TO_RELAY.into());
        }
        // The metrics address stays until restart: check against the running one.
        let overlaps = crate::overlaps(&config.forwards, self.fixed.ipv6_only, self.fixed.metrics);
        problems.extend(overlaps.iter().map(ToString::to_string));
        if config.forwards.iter().any(|f| f.transparent.is_some()) {
            if let Err(e) = crate::check_transparent() {
                problems.push(e.to_string());
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let ignored = self.fixed.changed(&Fixed::of(&config));
        if !ignored.is_empty() {
            log::warn!("reload: {} changed: ignored until restart", ignored.join(", "));
        }
        let active_tcp: HashSet<SocketAddr> =
            tcp.listeners.iter().filter(|(_, l)| l.is_listening()).map(|(_, l)| l.configured).collect();
        let udp_open: HashSet<SocketAddr> = udp.configured().collect();
        let udp_active: HashSet<SocketAddr> = udp.active().collect();
        let wanted_tcp: HashSet<SocketAddr> =
            config.forwards.iter().filter(|f| f.proto.tcp()).map(|f| f.listen).collect();
        let wanted_udp: HashSet<SocketAddr> =
            config.forwards.iter().filter(|f| f.proto.udp()).map(|f| f.listen).collect();
        // With one loop and no SO_REUSEPORT, a new address can be bound only
        // once the listeners it overlaps (removed by this reload, or retired
        // before) are closed: such binds wait for the plan ([`Later`]).
        let ipv6_only = self.fixed.ipv6_only;
        let going_tcp: Vec<SocketAddr> = active_tcp.difference(&wanted_tcp).copied().collect();
        let going_udp: Vec<SocketAddr> = udp_open.difference(&wanted_udp).copied().collect();
        let waits = |going: &[SocketAddr], a: SocketAddr| {
            going.iter().any(|g| g.port() == a.port() && crate::overlap(g.ip(), a.ip(), ipv6_only))
        };
        let reuseport = n > 1;
        let mut fresh: Vec<Bound> = (0..n).map(|_| Bound::default()).collect();
        let mut later = Vec::new();
        for (fi, f) in config.forwards.iter().enumerate() {
            let v6only = crate::v6only(f.listen, self.fixed.ipv6_only);
            if f.proto.tcp() && !active_tcp.contains(&f.listen) {
                for (i, b) in fresh.iter_mut().enumerate() {
                    match crate::sys::tcp_listener(f.listen, v6only, 1024, reuseport) {
                        Ok(fd) => b.tcp.push((fi, fd, false)),
                        // With one loop and no SO_REUSEPORT, a listener this
                        // reload removes may hold an overlapping address.
                        Err(e) if i == 0 && n == 1 && in_use(&e) && waits(&going_tcp, f.listen) => {
                            later.push(Later { forward: fi, tcp: true })
                        }
                        Err(e) => return Err(vec![format!("cannot listen on tcp {}: {e}", f.listen)]),
                    }
                }
            }
            // A UDP listener still open (retired, its flows running on) is
            // taken back by its loop; with one loop nothing is bound for it.
            if f.proto.udp() && !(n == 1 && udp_open.contains(&f.listen)) && !udp_active.contains(&f.listen) {
                for (i, b) in fresh.iter_mut().enumerate() {
                    match crate::sys::udp_listener(f.listen, v6only, reuseport) {
                        Ok(fd) => b.udp.push((fi, fd)),
                        Err(e) if i == 0 && n == 1 && in_use(&e) && waits(&going_udp, f.listen) => {
                            later.push(Later { forward: fi, tcp: false })
                        }
                        Err(e) => return Err(vec![format!("cannot listen on udp {}: {e}", f.listen)]),
                    }
                }
            }
        }
        let listening = active_tcp.len() + udp_active.len();
        let kept = active_tcp.intersection(&wanted_tcp).count() + udp_active.intersection(&wanted_udp).count();
        let sockets = wanted_tcp.len() + wanted_udp.len();
        let summary = format!(
            "{} forwards; listeners: {kept} kept, {} added, {} removed",
            config.forwards.len(),
            sockets - kept,
            listening - kept
        );
        let forwards = Arc::new(config.forwards);
        let plans = fresh
            .into_iter()
            .enumerate()
            .map(|(me, fresh)| Plan {
                forwards: forwards.clone(),
                fresh,
                tcp: config.tcp.clone(),
                udp: UdpSettings { max_flows: crate::shared::flow_share(config.udp.max_flows, n, me), ..config.udp },
                settings: config.event_loop,
            })
            .collect();
        Ok((plans, later, summary))
    }

    /// A reload refused: logs why, counts it.
    pub(crate) fn fail(&mut self, problems: &[String]) {
        for p in problems {
            log::error!("reload: {p}");
        }
        log::error!("reload failed; the running configuration stays");
        self.stats.failed += 1;
        self.stats.last_ok = false;
        crate::systemd::notify("READY=1");
    }

    /// A reload applied by every loop; `whole` is false when a bind after
    /// it failed.
    pub(crate) fn done(&mut self, whole: bool, summary: &str) {
        if whole {
            self.stats.last_ok = true;
            self.stats.last_good = crate::metrics::unix_now();
            log::info!("reloaded: {summary}");
        } else {
            self.stats.failed += 1;
            self.stats.last_ok = false;
            log::error!("reload applied in part: see the errors above");
        }
        crate::systemd::notify("READY=1");
    }
}

/// A forward bound only once the plan has closed what overlaps it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Later {
    pub(crate) forward: usize,
    pub(crate) tcp: bool,
}

fn in_use(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrInUse
}
