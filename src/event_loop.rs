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

use crate::reactor::{Ctx, Kind, fixed_token, untoken};
use crate::shared::{Published, Shared};
use crate::tcp::TcpRelay;
use crate::timer::{Timer, Timers};
use crate::udp::UdpRelay;

/// Signals that act: SIGINT and SIGTERM stop (or drain), SIGUSR1 logs totals.
const HANDLED: &[Signal] = &[Signal::SIGINT, Signal::SIGTERM, Signal::SIGUSR1];
/// Signals whose default action would end the process, taken and logged.
const IGNORED: &[Signal] = &[
    Signal::SIGHUP,
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
            for ev in events.iter() {
                let (kind, key) = untoken(ev.token());
                match kind {
                    Kind::Listener => self.tcp.listener_event(key.index() as usize, &mut ctx),
                    Kind::Client | Kind::Backend => self.tcp.conn_event(kind, key, ev, &mut ctx),
                    Kind::UdpListener => self.udp.listener_event(key.index() as usize, &mut ctx),
                    Kind::UdpFlow => self.udp.flow_event(key, ev, &mut ctx),
                    Kind::Signal if key.index() == 0 => {
                        if let Some(signals) = &self.signals {
                            stop |= on_signals(
                                signals,
                                &mut self.tcp,
                                &mut self.udp,
                                &self.settings,
                                &mut self.draining,
                                &self.shared,
                                &mut ctx,
                            );
                        }
                    }
                    // The waker: another loop asks this one to look at the shared flags.
                    Kind::Signal => {}
                    Kind::Metrics | Kind::MetricsConn => {
                        if let Some(m) = self.metrics.as_mut() {
                            let (tcp, udp, shared) = (&self.tcp, &self.udp, &self.shared);
                            let page = || {
                                let (v, threads) = totals(tcp, udp, shared, 0);
                                crate::metrics::prometheus(tcp, udp, &v, &threads)
                            };
                            m.event(kind, key, page, &mut ctx);
                        }
                    }
                }
            }
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
                    Timer::Listener(idx) => self.tcp.listener_timer(idx, &mut ctx),
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
                        log_stats(&self.tcp, &self.udp, &self.shared);
                        if let Some(every) = self.settings.stats_interval {
                            ctx.timers.add(now + every, Timer::Stats);
                        }
                    }
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
        values: crate::metrics::values(tcp, udp),
        open: tcp.open_connections() as u64,
        accepted: tcp.accepted,
        idle_wakeups: tcp.idle_wakeups,
    }
}

/// The statistics of every loop summed (loop `me`'s read live), and each
/// loop's own.
fn totals(tcp: &TcpRelay, udp: &UdpRelay, shared: &Shared, me: usize) -> (Vec<u64>, Vec<Published>) {
    let mut v = crate::metrics::values(tcp, udp);
    let mut threads = Vec::with_capacity(shared.threads());
    for i in 0..shared.threads() {
        if i == me {
            threads.push(Published {
                values: Vec::new(),
                open: tcp.open_connections() as u64,
                accepted: tcp.accepted,
                idle_wakeups: tcp.idle_wakeups,
            });
        } else {
            let p = lock(shared, i).clone();
            crate::metrics::add_values(&mut v, &p.values);
            threads.push(Published { values: Vec::new(), ..p });
        }
    }
    (v, threads)
}

/// Logs one line of totals per forward (over every loop).
fn log_stats(tcp: &TcpRelay, udp: &UdpRelay, shared: &Shared) {
    let (v, threads) = totals(tcp, udp, shared, 0);
    for line in crate::metrics::stats_lines(tcp, udp, &v, &threads) {
        log::info!("{line}");
    }
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

/// Handles pending signals (loop 0); true when the process should exit now.
fn on_signals(
    signals: &SignalFd,
    tcp: &mut TcpRelay,
    udp: &mut UdpRelay,
    settings: &LoopSettings,
    draining: &mut bool,
    shared: &Shared,
    ctx: &mut Ctx<'_>,
) -> bool {
    let mut stop = false;
    while let Ok(Some(info)) = signals.read_signal() {
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGUSR1) => log_stats(tcp, udp, shared),
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
    stop
}
