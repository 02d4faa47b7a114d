//! One event loop: a mio `Poll`, its tokens, deadlines, signals and
//! shutdown. A process runs one loop per `--threads`, each on its own
//! thread with its own sockets; they share only what `shared.rs` holds
//! (ARCHITECTURE.md, "Threads"). Loop 0 also owns the signalfd, the
//! metrics server and the statistics line.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::metrics::{Reloads, Snapshot};
use crate::reactor::{Ctx, Kind, fixed_token, untoken};
use crate::reload::{Later, Plan, Reloader};
use crate::shared::{Published, Shared};
use crate::tcp::TcpRelay;
use crate::timer::{Timer, Timers};
use crate::udp::UdpRelay;

/// Signals that act: SIGINT and SIGTERM stop (or drain), SIGUSR1 logs
/// totals, SIGHUP reloads.
const HANDLED: &[Signal] = &[Signal::SIGINT, Signal::SIGTERM, Signal::SIGUSR1, Signal::SIGHUP];
/// Signals whose default action would end the process, taken and logged.
const IGNORED: &[Signal] = &[
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGIO,
    Signal::SIGPWR,
    Signal::SIGSTKFLT,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
];
/// How often a loop other than loop 0 publishes its statistics.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// The token of the signalfd (index 0) and of the loop's waker (index 1).
pub(crate) fn waker_token() -> mio::Token {
    fixed_token(Kind::Signal, 1)
}

/// Blocks every signal the loops take through the signalfd, in the calling
/// thread and so in every thread it starts later, and ignores the
/// real-time ones: only SIGINT and SIGTERM can end the relay.
pub(crate) fn block_signals() -> io::Result<SigSet> {
    let mut mask = SigSet::empty();
    for s in HANDLED.iter().chain(IGNORED) {
        mask.add(*s);
    }
    mask.thread_block()?;
    crate::sys::ignore_realtime_signals();
    Ok(mask)
}

/// Process-wide behaviour of the loop.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopSettings {
    /// On SIGTERM/SIGINT, let open connections finish for this long.
    pub drain_timeout: Duration,
    /// Log totals this often (None: only on SIGUSR1).
    pub stats_interval: Option<Duration>,
}

/// One event loop: its sockets, one poll.
pub(crate) struct EventLoop {
    poll: Poll,
    timers: Timers,
    /// Loop 0 only.
    signals: Option<SignalFd>,
    /// The TCP side.
    pub(crate) tcp: TcpRelay,
    /// The UDP side.
    pub(crate) udp: UdpRelay,
    /// The metrics endpoint, if any (loop 0).
    pub(crate) metrics: Option<crate::metrics::Metrics>,
    /// Reloads on SIGHUP (loop 0; none in docker mode).
    pub(crate) reloader: Option<Reloader>,
    settings: LoopSettings,
    draining: bool,
    shared: Arc<Shared>,
    me: usize,
}

impl EventLoop {
    /// Loop `me` around `poll` (whose waker is in `shared`). Loop 0 reads
    /// the signals in `mask`, which `block_signals` has blocked.
    pub(crate) fn new(
        me: usize,
        poll: Poll,
        tcp: TcpRelay,
        udp: UdpRelay,
        settings: LoopSettings,
        shared: Arc<Shared>,
        mask: Option<&SigSet>,
    ) -> io::Result<Self> {
        let signals = match mask {
            Some(mask) => {
                let fd = SignalFd::with_flags(mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
                let raw = fd.as_raw_fd();
                poll.registry().register(&mut SourceFd(&raw), fixed_token(Kind::Signal, 0), Interest::READABLE)?;
                Some(fd)
            }
            None => None,
        };
        Ok(EventLoop {
            poll,
            timers: Timers::default(),
            signals,
            tcp,
            udp,
            metrics: None,
            reloader: None,
            settings,
            draining: false,
            shared,
            me,
        })
    }

    /// The registry, to add sockets before `run`.
    pub(crate) fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// Runs until the relay stops (then `Ok`) or the poll fails.
    pub(crate) fn run(&mut self) -> io::Result<()> {
        let result = self.turns();
        // Final totals for loop 0, and a wake-up so it sees this loop is gone.
        self.publish();
        self.shared.running.fetch_sub(1, Ordering::AcqRel);
        if result.is_err() {
            // A loop that fails takes the process down, never half of it.
            crate::systemd::notify("STOPPING=1");
            self.shared.stop.store(true, Ordering::Release);
        }
        self.shared.wake_others(self.me);
        result
    }

    fn turns(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let now = Instant::now();
        if self.me == 0 {
            if let Some(every) = self.settings.stats_interval {
                self.timers.add(now + every, Timer::Stats);
            }
        } else {
            self.timers.add(now + PUBLISH_EVERY, Timer::Publish);
        }
        self.udp.start(&mut Ctx { registry: self.poll.registry(), timers: &mut self.timers, now });
        loop {
            let metrics_ready = self.metrics.as_ref().is_some_and(|m| m.has_ready());
            let timeout = if self.tcp.has_ready() || self.udp.has_ready() || metrics_ready {
                Some(Duration::ZERO)
            } else {
                self.timers.next_timeout(Instant::now())
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            let mut ctx = Ctx { registry: self.poll.registry(), timers: &mut self.timers, now };
            let mut stop = false;
            let mut reload = false;
            for ev in events.iter() {
                let (kind, key) = untoken(ev.token());
                match kind {
                    Kind::Listener => self.tcp.listener_event(key, &mut ctx),
                    Kind::Client | Kind::Backend => self.tcp.conn_event(kind, key, ev, &mut ctx),
                    Kind::UdpListener => self.udp.listener_event(key, &mut ctx),
                    Kind::UdpFlow => self.udp.flow_event(key, ev, &mut ctx),
                    Kind::Signal if key.index() == 0 => {
                        if let Some(signals) = &self.signals {
                            let reloads = self.reloader.as_ref().map(|r| r.stats);
                            let (s, r) = on_signals(
                                signals,
                                &mut self.tcp,
                                &mut self.udp,
                                &self.settings,
                                &mut self.draining,
                                &self.shared,
                                reloads,
                                &mut ctx,
                            );
                            (stop, reload) = (stop | s, reload | r);
                        }
                    }
                    // The waker: another loop asks this one to look at the shared flags.
                    Kind::Signal => {}
                    Kind::Metrics | Kind::MetricsConn => {
                        if let Some(m) = self.metrics.as_mut() {
                            let (tcp, udp, shared) = (&self.tcp, &self.udp, &self.shared);
                            let reloads = self.reloader.as_ref().map_or_else(Reloads::new, |r| r.stats);
                            let page = || {
                                let (v, threads) = totals(tcp, udp, shared, 0);
                                crate::metrics::prometheus(&v, &threads, &reloads)
                            };
                            m.event(kind, key, page, &mut ctx);
                        }
                    }
                }
            }
            if reload {
                match self.reloader.as_mut() {
                    Some(_) if self.draining => log::info!("SIGHUP ignored: draining"),
                    Some(r) => {
                        log::info!("SIGHUP: reloading the configuration");
                        r.request(&self.shared)
                    }
                    None => log::info!("SIGHUP ignored: docker mode has no configuration to reload"),
                }
            }
            let mut parts = Parts {
                me: self.me,
                tcp: &mut self.tcp,
                udp: &mut self.udp,
                settings: &mut self.settings,
                shared: &self.shared,
            };
            reload_step(&mut parts, &mut self.reloader, self.draining, &mut ctx);
            if self.shared.stop.load(Ordering::Acquire) {
                stop = true;
            } else if self.shared.drain.load(Ordering::Acquire) && !self.draining {
                begin_drain(&mut self.tcp, &mut self.udp, &self.settings, &mut self.draining, &mut ctx);
            }
            self.tcp.run_ready(&mut ctx);
            self.udp.run_ready(&mut ctx);
            if let Some(m) = self.metrics.as_mut() {
                m.run_ready(&mut ctx);
            }
            while let Some(t) = ctx.timers.pop_due(now) {
                match t {
                    Timer::Conn(key) => self.tcp.conn_timer(key, &mut ctx),
                    Timer::Listener(key) => self.tcp.listener_timer(key, &mut ctx),
                    Timer::UdpSweep => self.udp.sweep(&mut ctx),
                    Timer::Metrics(key) => {
                        if let Some(m) = self.metrics.as_mut() {
                            m.timer(key, &mut ctx);
                        }
                    }
                    Timer::Drain => {
                        if self.me == 0 {
                            log::info!("drain timeout reached; exiting");
                        }
                        stop = true;
                    }
                    Timer::Stats => {
                        // A reload may have turned the line off, or changed its interval.
                        if let Some(every) = self.settings.stats_interval {
                            log_stats(&self.tcp, &self.udp, &self.shared, self.reloader.as_ref().map(|r| r.stats));
                            ctx.timers.add(now + every, Timer::Stats);
                        }
                    }
                    Timer::Retired(key) => self.tcp.retired_timer(key, self.settings.drain_timeout, &mut ctx),
                    Timer::UdpRetired(key) => self.udp.retired_timer(key, self.settings.drain_timeout, &mut ctx),
                    Timer::Publish => {
                        let published = published(&self.tcp, &self.udp);
                        *lock(&self.shared, self.me) = published;
                        ctx.timers.add(now + PUBLISH_EVERY, Timer::Publish);
                    }
                }
            }
            self.tcp.resume_if_blocked(&mut ctx);
            let drained = self.draining && self.tcp.open_connections() == 0 && self.udp.flows() == 0;
            // Loop 0 (signals, metrics) stays until every other loop is gone.
            let others = self.me == 0 && self.shared.running.load(Ordering::Acquire) > 1;
            if stop || (drained && !others) {
                if self.me == 0 && stop {
                    self.shared.stop.store(true, Ordering::Release);
                    self.shared.wake_others(0);
                }
                // What is still open was cut short: reset it (ARCHITECTURE.md, "Exit").
                self.tcp.reset_all(&mut ctx);
                return Ok(());
            }
        }
    }

    /// Publishes this loop's statistics for loop 0.
    fn publish(&self) {
        if self.me != 0 {
            *lock(&self.shared, self.me) = published(&self.tcp, &self.udp);
        }
    }
}

/// A loop's published statistics, locked.
fn lock(shared: &Shared, i: usize) -> std::sync::MutexGuard<'_, Published> {
    shared.published[i].lock().unwrap_or_else(|e| e.into_inner())
}

/// This loop's statistics, to publish.
fn published(tcp: &TcpRelay, udp: &UdpRelay) -> Published {
    Published {
        snapshot: crate::metrics::snapshot(tcp, udp),
        open: tcp.open_connections() as u64,
        accepted: tcp.accepted,
        idle_wakeups: tcp.idle_wakeups,
    }
}

/// The statistics of every loop summed (loop `me`'s read live), and each
/// loop's own.
fn totals(tcp: &TcpRelay, udp: &UdpRelay, shared: &Shared, me: usize) -> (Snapshot, Vec<Published>) {
    let mut v = crate::metrics::snapshot(tcp, udp);
    let mut threads = Vec::with_capacity(shared.threads());
    for i in 0..shared.threads() {
        if i == me {
            threads.push(Published {
                snapshot: Snapshot::default(),
                open: tcp.open_connections() as u64,
                accepted: tcp.accepted,
                idle_wakeups: tcp.idle_wakeups,
            });
        } else {
            let p = lock(shared, i).clone();
            v.add(&p.snapshot);
            threads.push(Published { snapshot: Snapshot::default(), ..p });
        }
    }
    (v, threads)
}

/// Logs one line of totals per forward (over every loop).
fn log_stats(tcp: &TcpRelay, udp: &UdpRelay, shared: &Shared, reloads: Option<Reloads>) {
    let (v, threads) = totals(tcp, udp, shared, 0);
    for line in crate::metrics::stats_lines(&v, &threads, &reloads.unwrap_or_else(Reloads::new)) {
        log::info!("{line}");
    }
}

/// What a reload changes in one loop.
struct Parts<'a> {
    me: usize,
    tcp: &'a mut TcpRelay,
    udp: &'a mut UdpRelay,
    settings: &'a mut LoopSettings,
    shared: &'a Arc<Shared>,
}

/// A reload's next step: loop 0 checks a configuration read, binds and
/// hands out the plans; every loop applies its plan.
fn reload_step(p: &mut Parts<'_>, reloader: &mut Option<Reloader>, draining: bool, ctx: &mut Ctx<'_>) {
    if let Some(plan) = p.shared.take_plan(p.me) {
        apply(p, plan, ctx);
        p.shared.plan_applied();
    }
    let Some(r) = reloader.as_mut() else { return };
    // One reload at a time: a read is checked only once the last is done.
    if r.finishing.is_none() {
        if let Some(read) = r.take_read() {
            let prepared = match read {
                Err(problems) => Err(problems.iter().map(ToString::to_string).collect()),
                Ok(_) if draining => Err(vec!["draining: nothing changed".to_string()]),
                Ok(config) => r.prepare(config, p.tcp, p.udp, p.shared.threads()),
            };
            match prepared {
                Err(problems) => r.fail(&problems),
                Ok((plans, later, summary)) => {
                    r.finishing = Some((hand_out(p, plans, later, r.ipv6_only(), ctx), summary))
                }
            }
        }
    }
    // Done once every loop applied its part: only then is READY=1 true.
    if let Some((whole, summary)) = r.finishing.take_if(|_| !p.shared.plans_out()) {
        r.done(whole, &summary);
    }
    if r.take_again() {
        r.request(p.shared);
    }
}

/// Loop 0: gives every other loop its plan, applies its own, then binds
/// what had to wait for it (one loop only). Returns whether all of it
/// worked.
fn hand_out(p: &mut Parts<'_>, plans: Vec<Plan>, later: Vec<Later>, ipv6_only: bool, ctx: &mut Ctx<'_>) -> bool {
    let mut plans = plans.into_iter();
    let Some(mine) = plans.next() else { return false };
    p.shared.connections.set_max(mine.tcp.max_connections);
    p.shared.sources.set_max(mine.tcp.max_per_source);
    for (i, plan) in plans.enumerate() {
        p.shared.give_plan(i + 1, plan);
    }
    let (forwards, tcp, udp, drain) = (mine.forwards.clone(), mine.tcp.clone(), mine.udp, mine.settings.drain_timeout);
    apply(p, mine, ctx);
    let mut whole = true;
    for l in later {
        let Some(f) = forwards.get(l.forward) else { continue };
        let v6only = crate::v6only(f.listen, ipv6_only);
        if l.tcp {
            match crate::sys::tcp_listener(f.listen, v6only, 1024, false) {
                Ok(fd) => p.tcp.reload(&forwards, vec![(l.forward, fd, false)], tcp.clone(), drain, ctx),
                Err(e) => {
                    log::error!("reload: cannot listen on tcp {}: {e}", f.listen);
                    whole = false;
                }
            }
        } else {
            p.udp.close_retired_on(f.listen.port(), ctx);
            match crate::sys::udp_listener(f.listen, v6only, false) {
                Ok(fd) => p.udp.reload(&forwards, vec![(l.forward, fd)], udp, drain, ctx),
                Err(e) => {
                    log::error!("reload: cannot listen on udp {}: {e}", f.listen);
                    whole = false;
                }
            }
        }
    }
    whole
}

/// Applies one loop's part of a reload.
fn apply(p: &mut Parts<'_>, plan: Plan, ctx: &mut Ctx<'_>) {
    let drain = plan.settings.drain_timeout;
    p.tcp.reload(&plan.forwards, plan.fresh.tcp, plan.tcp, drain, ctx);
    p.udp.reload(&plan.forwards, plan.fresh.udp, plan.udp, drain, ctx);
    if p.me == 0 && p.settings.stats_interval.is_none() {
        if let Some(every) = plan.settings.stats_interval {
            ctx.timers.add(ctx.now + every, Timer::Stats);
        }
    }
    *p.settings = plan.settings;
}

/// Stops accepting and reading clients' datagrams; sets the drain deadline.
fn begin_drain(
    tcp: &mut TcpRelay,
    udp: &mut UdpRelay,
    settings: &LoopSettings,
    draining: &mut bool,
    ctx: &mut Ctx<'_>,
) {
    *draining = true;
    tcp.stop_accepting();
    udp.stop(ctx.registry);
    ctx.timers.add(ctx.now + settings.drain_timeout, Timer::Drain);
}

/// Handles pending signals (loop 0): whether the process should exit now,
/// and whether a reload was asked for.
#[allow(clippy::too_many_arguments)]
fn on_signals(
    signals: &SignalFd,
    tcp: &mut TcpRelay,
    udp: &mut UdpRelay,
    settings: &LoopSettings,
    draining: &mut bool,
    shared: &Shared,
    reloads: Option<Reloads>,
    ctx: &mut Ctx<'_>,
) -> (bool, bool) {
    let (mut stop, mut reload) = (false, false);
    while let Ok(Some(info)) = signals.read_signal() {
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGUSR1) => log_stats(tcp, udp, shared, reloads),
            Ok(Signal::SIGHUP) => reload = true,
            Ok(sig) if IGNORED.contains(&sig) => log::info!("{sig} ignored"),
            Ok(sig) => {
                if *draining || settings.drain_timeout.is_zero() {
                    log::info!("{sig}: exiting");
                    if !*draining {
                        crate::systemd::notify("STOPPING=1");
                    }
                    stop = true;
                } else {
                    crate::systemd::notify("STOPPING=1");
                    let open: u64 = totals(tcp, udp, shared, 0).1.iter().map(|p| p.open).sum();
                    log::info!(
                        "{sig}: no longer accepting; draining {open} connections for up to {:?}",
                        settings.drain_timeout
                    );
                    shared.drain.store(true, Ordering::Release);
                    shared.wake_others(0);
                    begin_drain(tcp, udp, settings, draining, ctx);
                }
            }
            Err(_) => {}
        }
    }
    (stop, reload)
}
