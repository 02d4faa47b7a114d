//! The one thread: a mio `Poll`, its tokens, deadlines, signals and shutdown.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::reactor::{Ctx, Kind, fixed_token, untoken};
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

/// Process-wide behaviour of the loop.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopSettings {
    /// On SIGTERM/SIGINT, let open connections finish for this long.
    pub drain_timeout: Duration,
    /// Log totals this often (None: only on SIGUSR1).
    pub stats_interval: Option<Duration>,
}

/// The relay process: every socket, one poll.
pub struct EventLoop {
    poll: Poll,
    timers: Timers,
    signals: SignalFd,
    /// The TCP side.
    pub tcp: TcpRelay,
    /// The UDP side.
    pub udp: UdpRelay,
    /// The metrics endpoint, if any.
    pub metrics: Option<crate::metrics::Metrics>,
    settings: LoopSettings,
    draining: bool,
}

impl EventLoop {
    /// A loop with no sockets yet. Every signal whose default action would
    /// end the process silently arrives through a signalfd instead (the
    /// real-time ones are ignored): only SIGINT and SIGTERM end the relay.
    pub fn new(tcp: TcpRelay, udp: UdpRelay, settings: LoopSettings) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut mask = SigSet::empty();
        for s in HANDLED.iter().chain(IGNORED) {
            mask.add(*s);
        }
        mask.thread_block()?;
        crate::sys::ignore_realtime_signals();
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        let raw = signals.as_raw_fd();
        poll.registry().register(&mut SourceFd(&raw), fixed_token(Kind::Signal, 0), Interest::READABLE)?;
        Ok(EventLoop { poll, timers: Timers::default(), signals, tcp, udp, metrics: None, settings, draining: false })
    }

    /// The registry, to add sockets before `run`.
    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// Runs until a signal ends the process (then `Ok`) or the poll fails.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let now = Instant::now();
        if let Some(every) = self.settings.stats_interval {
            self.timers.add(now + every, Timer::Stats);
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
                    Kind::Signal => {
                        stop |= on_signals(
                            &self.signals,
                            &mut self.tcp,
                            &mut self.udp,
                            &self.settings,
                            &mut self.draining,
                            &mut ctx,
                        )
                    }
                    Kind::Metrics | Kind::MetricsConn => {
                        if let Some(m) = self.metrics.as_mut() {
                            let (tcp, udp) = (&self.tcp, &self.udp);
                            m.event(kind, key, || crate::metrics::prometheus(tcp, udp), &mut ctx);
                        }
                    }
                }
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
                        log::info!("drain timeout reached; exiting");
                        stop = true;
                    }
                    Timer::Stats => {
                        log_stats(&self.tcp, &self.udp);
                        if let Some(every) = self.settings.stats_interval {
                            ctx.timers.add(now + every, Timer::Stats);
                        }
                    }
                }
            }
            self.tcp.resume_if_blocked(&mut ctx);
            if stop || (self.draining && self.tcp.open_connections() == 0 && self.udp.flows() == 0) {
                // What is still open was cut short: reset it (ARCHITECTURE.md, "Exit").
                self.tcp.reset_all(&mut ctx);
                return Ok(());
            }
        }
    }
}

/// Logs one line of totals per forward.
fn log_stats(tcp: &TcpRelay, udp: &UdpRelay) {
    for line in crate::metrics::stats_lines(tcp, udp) {
        log::info!("{line}");
    }
}

/// Handles pending signals; true when the process should exit now.
fn on_signals(
    signals: &SignalFd,
    tcp: &mut TcpRelay,
    udp: &mut UdpRelay,
    settings: &LoopSettings,
    draining: &mut bool,
    ctx: &mut Ctx<'_>,
) -> bool {
    let mut stop = false;
    while let Ok(Some(info)) = signals.read_signal() {
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGUSR1) => log_stats(tcp, udp),
            Ok(sig) if IGNORED.contains(&sig) => log::info!("{sig} ignored"),
            Ok(sig) => {
                if *draining || settings.drain_timeout.is_zero() {
                    log::info!("{sig}: exiting");
                    stop = true;
                } else {
                    log::info!(
                        "{sig}: no longer accepting; draining {} connections for up to {:?}",
                        tcp.open_connections(),
                        settings.drain_timeout
                    );
                    *draining = true;
                    tcp.stop_accepting();
                    udp.stop(ctx.registry);
                    ctx.timers.add(ctx.now + settings.drain_timeout, Timer::Drain);
                }
            }
            Err(_) => {}
        }
    }
    stop
}
