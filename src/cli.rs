//! The native command line (clap), turned into a [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::config::{self, Forward, Resolver, StartError, parse_duration, parse_size};
use crate::event_loop::LoopSettings;
use crate::proxy_protocol::Version;
use crate::tcp::TcpSettings;
use crate::tcp::connection::Timeouts;
use crate::udp::UdpSettings;

/// Default pipe capacity; see the benchmark figures in README.md.
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;

const EXAMPLES: &str = "\
Examples:
  splice-relay '[::]:8080=127.0.0.1:80'
      TCP on port 8080 of every IPv6 and IPv4 address, to 127.0.0.1:80
  splice-relay 'udp:[::]:5353=127.0.0.1:53' 'both:0.0.0.0:5201=[::1]:5201'
      UDP, and TCP+UDP on one port (iperf3)
  splice-relay '127.0.0.1:9000-9099=10.0.0.2:9000-9099'
      a 100-port range in one process
  splice-relay --send-proxy v2 '[::]:443=127.0.0.1:8443'
      tell the backend each client's real address (PROXY protocol)
  splice-relay --transparent '0.0.0.0:80=172.17.0.2:80'
      connect to the backend from each client's own address (needs
      CAP_NET_ADMIN and scripts/transparent-routing.sh up)

FORWARD is [tcp:|udp:|both:]LISTEN=TARGET[,send-proxy=v1|v2][,accept-proxy]
  [,transparent|,transparent=port][,allow=CIDR+CIDR][,deny=CIDR+CIDR]
LISTEN and TARGET are IPv4:PORT or [IPv6]:PORT (TARGET may be HOST:PORT);
PORT may be a range A-B, of equal width on both sides.
Durations: 500ms, 10s, 5m, 1h. Sizes: 65536, 256K, 1M.
Logging: RUST_LOG=debug, or -v / -q.
Signals: SIGTERM/SIGINT stop (or drain), SIGHUP reloads -c files, SIGUSR1 logs totals.";

/// A Linux TCP/UDP port relay: splice(2) for TCP, batched recvmmsg/sendmmsg for UDP.
#[derive(Parser, Debug, Default)]
#[command(name = "splice-relay", version, after_help = EXAMPLES)]
// Options taking a number allow a leading `-`, so that `-1` reaches their
// value parser, which says what is wrong with it.
pub struct Args {
    /// What to relay: [PROTO:]LISTEN=TARGET (see below).
    #[arg(value_name = "FORWARD")]
    pub forwards: Vec<String>,
    /// Read forwards from FILE, one per line (# comments), and options, one
    /// per line starting with - (the command line wins); repeatable. SIGHUP
    /// reads the files again and applies them without dropping connections.
    #[arg(short, long, value_name = "FILE")]
    pub config: Vec<String>,
    /// Make a [::] listener IPv6-only (default: it also takes IPv4).
    #[arg(long)]
    pub ipv6_only: bool,
    /// Open TCP connections at most, across all forwards (0: no limit).
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value_t = 0)]
    pub max_connections: usize,
    /// Open TCP connections at most per client address (0: no limit).
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value_t = 0)]
    pub max_connections_per_source: usize,
    /// Give up on a backend connect after this long.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_duration,
    )]
    pub connect_timeout: Duration,
    /// Close TCP connections idle this long (default: never).
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Close a TCP connection this long after one side finished (0: never).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "DURATION",
        default_value = "5m",
        value_parser = parse_duration,
    )]
    pub half_close_timeout: Duration,
    /// Pipe capacity per direction in flight.
    #[arg(long, allow_negative_numbers = true, value_name = "BYTES", value_parser = parse_size)]
    pub pipe_size: Option<usize>,
    /// Copy through a small user-space buffer instead of splice(2).
    #[arg(long)]
    pub no_splice: bool,
    /// On SIGTERM/SIGINT, stop accepting and let connections finish this long.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "DURATION",
        default_value = "0s",
        value_parser = parse_duration,
    )]
    pub drain_timeout: Duration,
    /// Close a UDP flow after this long without traffic either way.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "DURATION",
        default_value = "90s",
        value_parser = parse_duration,
    )]
    pub udp_timeout: Duration,
    /// UDP flows at most (the least recently used is evicted when full).
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value_t = 4096)]
    pub udp_max_flows: usize,
    /// No UDP offloads: receive datagrams one by one (no UDP_GRO) and send
    /// each on its own (no UDP GSO).
    #[arg(long)]
    pub no_udp_gso: bool,
    /// Receive buffer of UDP listening sockets (SO_RCVBUFFORCE when allowed,
    /// else SO_RCVBUF, which net.core.rmem_max caps).
    #[arg(long, allow_negative_numbers = true, value_name = "BYTES", default_value = "4M", value_parser = parse_size)]
    pub udp_rcvbuf: usize,
    /// Send a PROXY protocol header (v1 or v2) to every backend.
    #[arg(long, value_name = "VERSION", value_parser = parse_version)]
    pub send_proxy: Option<Version>,
    /// Expect a PROXY protocol header from clients on every TCP forward.
    #[arg(long)]
    pub accept_proxy: bool,
    /// Connect to every backend from the client's own address (IP_TRANSPARENT;
    /// UDP flows also keep the client's port). Needs CAP_NET_ADMIN, and the
    /// backend's replies routed back to the relay (scripts/transparent-routing.sh).
    /// IPv4 to IPv4 and IPv6 to IPv6 only: an IPv6 client of an IPv4 backend
    /// (or the reverse), and a loopback client, use the relay's own address.
    #[arg(long)]
    pub transparent: bool,
    /// Sources allowed to send a PROXY header: CIDR,CIDR,...
    #[arg(long, value_name = "CIDRS")]
    pub trusted_proxies: Option<String>,
    /// Only these sources may use a forward: CIDR,CIDR,... (a forward's own
    /// ,allow= replaces it). On accept-proxy forwards, the PROXY header's address.
    #[arg(long, value_name = "CIDRS")]
    pub allow: Option<String>,
    /// These sources may not use a forward, even if allowed: CIDR,CIDR,...
    /// (a forward's own ,deny= replaces it).
    #[arg(long, value_name = "CIDRS")]
    pub deny: Option<String>,
    /// Bound on reading a client's PROXY header.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_duration,
    )]
    pub proxy_header_timeout: Duration,
    /// Log totals this often (SIGUSR1 logs them at once).
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", value_parser = parse_duration)]
    pub stats_interval: Option<Duration>,
    /// Serve Prometheus metrics over HTTP on ADDR (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Event loops, one thread each: N (1-256) or auto (the CPUs this
    /// process may run on, which respects taskset and cgroup cpusets).
    #[arg(long, value_name = "N|auto", default_value = "1", value_parser = parse_threads)]
    pub threads: usize,
    /// Check the configuration and exit: parse and validate everything
    /// (syntax, host names, overlapping listen addresses, option ranges),
    /// bind nothing, print each problem; exit 0 if none, else 2.
    #[arg(long)]
    pub check: bool,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less logging (-q warnings only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub quiet: u8,
    /// The `-c` files as [`parse`] read them (for their option lines), so
    /// their forwards come from the same reading, even if a file is
    /// replaced meanwhile. Empty: read them when the config is made.
    #[arg(skip)]
    pub(crate) config_text: Vec<Vec<u8>>,
}

/// clap's error as one line: what its first line says, without the
/// `error: ` prefix, usage or tips, quoting at most 60 characters of what
/// the user typed.
pub fn clap_error_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    match (e.kind(), text(ContextKind::InvalidArg), text(ContextKind::InvalidValue)) {
        (ErrorKind::ValueValidation, Some(arg), Some(value)) => {
            let why = std::error::Error::source(e).map(|s| format!(": {s}")).unwrap_or_default();
            format!("invalid value {} for '{arg}'{why}", config::quote_single(value))
        }
        (ErrorKind::UnknownArgument, Some(arg), _) => {
            format!("unexpected argument {} found (see --help)", config::quote_single(arg))
        }
        (ErrorKind::TooManyValues, Some(arg), Some(value)) => {
            format!("unexpected value {} for '{arg}' found; no more were expected", config::quote_single(value))
        }
        _ => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first).trim();
            let (head, cut) = config::clip(first, 200);
            match (head.is_empty(), cut) {
                (true, _) => "invalid command line (see --help)".to_string(),
                (false, true) => format!("{head}..."),
                (false, false) => head.to_string(),
            }
        }
    }
}

/// Reads the command line `argv` (program name first) and the option lines
/// of its `-c` files: a line of a config file that starts with `-` is an
/// option, as on the command line (`--idle-timeout 30s`, `--allow=10.0.0.0/8`,
/// `--accept-proxy`), one per line. The command line wins over the files,
/// a later file over an earlier one. A reload reads both again, so these
/// options can change on SIGHUP (ARCHITECTURE.md, "Reload").
///
pub fn parse(argv: &[std::ffi::OsString]) -> Result<Args, ParseError> {
    use clap::{CommandFactory, FromArgMatches};
    let mut args = Args::try_parse_from(argv).map_err(|e| ParseError::Clap(Box::new(e)))?;
    let mut options: Vec<String> = Vec::new();
    let mut problems = Vec::new();
    let mut texts = Vec::with_capacity(args.config.len());
    for path in &args.config {
        let bytes = match read_config_file(path) {
            Ok(b) => b,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        for (i, line) in config::lines(&bytes) {
            let Some(line) = line.filter(|l| l.starts_with('-')) else { continue };
            match option_line(line) {
                Ok(words) => options.extend(words),
                Err(e) => problems.push(StartError::Usage(format!("{path}:{i}: {e}"))),
            }
        }
        texts.push(bytes);
    }
    if !problems.is_empty() {
        return Err(ParseError::Files { check: args.check, problems });
    }
    if !options.is_empty() {
        // The files' options first, so that the command line's come later and win.
        let mut merged: Vec<std::ffi::OsString> = argv.iter().take(1).cloned().collect();
        merged.extend(options.into_iter().map(Into::into));
        merged.extend(argv.iter().skip(1).cloned());
        let clap = |e| ParseError::Clap(Box::new(e));
        let matches = Args::command().args_override_self(true).try_get_matches_from(merged).map_err(clap)?;
        args = Args::from_arg_matches(&matches).map_err(clap)?;
    }
    args.config_text = texts;
    Ok(args)
}

/// Why [`parse`] failed.
#[derive(Debug)]
pub enum ParseError {
    /// The command line is wrong (clap's error, which also carries --help
    /// and --version).
    Clap(Box<clap::Error>),
    /// A config file is unreadable or one of its option lines is wrong,
    /// each problem named by file and line; `check`: under `--check`.
    Files { check: bool, problems: Vec<StartError> },
}

impl ParseError {
    /// Every problem, one line each (clap's as one line too).
    pub fn problems(self) -> Vec<StartError> {
        match self {
            ParseError::Clap(e) => vec![StartError::Usage(clap_error_line(&e))],
            ParseError::Files { problems, .. } => problems,
        }
    }
}

/// The words of one option line of a config file, checked on their own.
fn option_line(line: &str) -> Result<Vec<String>, String> {
    let words: Vec<String> = line.split_whitespace().map(String::from).collect();
    let name = words[0].split('=').next().unwrap_or_default();
    if ["-c", "--config", "--check", "-h", "--help", "-V", "--version"].contains(&name) {
        return Err(format!("{} cannot be used in a config file", config::quote(name)));
    }
    let alone = std::iter::once("splice-relay".to_string()).chain(words.iter().cloned());
    match Args::try_parse_from(alone) {
        Ok(a) if a.forwards.is_empty() => Ok(words),
        Ok(_) => Err(format!("{}: one option (and its value) per line", config::quote(line))),
        Err(e) => Err(clap_error_line(&e)),
    }
}

/// Most event loops `--threads` takes.
const MAX_THREADS: usize = 256;

fn parse_threads(s: &str) -> Result<usize, String> {
    if s == "auto" {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS));
    }
    match s.parse::<usize>() {
        Ok(n @ 1..=MAX_THREADS) => Ok(n),
        _ => Err(format!("{} is not a thread count (1-{MAX_THREADS} or auto)", crate::config::quote(s))),
    }
}

fn parse_version(s: &str) -> Result<Version, String> {
    match s {
        "v1" | "1" => Ok(Version::V1),
        "v2" | "2" => Ok(Version::V2),
        _ => Err(format!("{s:?} is not a PROXY protocol version (v1 or v2)")),
    }
}

/// Everything the relay needs to start.
#[derive(Debug)]
pub struct Config {
    /// The forwards, ranges expanded.
    pub forwards: Vec<Forward>,
    /// `[::]` listeners take IPv4 too unless this is set.
    pub ipv6_only: bool,
    /// TCP settings.
    pub(crate) tcp: TcpSettings,
    /// UDP settings.
    pub(crate) udp: UdpSettings,
    /// Loop settings.
    pub(crate) event_loop: LoopSettings,
    /// `--allow` and `--deny`, already applied to `forwards` (docker mode
    /// applies them to its one forward).
    pub access: crate::cidr::Access,
    /// Metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// Event loops (threads).
    pub threads: usize,
    /// Log level from -v/-q (RUST_LOG wins when set).
    pub log_level: log::LevelFilter,
}

impl Args {
    /// The options as clap gives them for an empty command line, built
    /// without clap (docker mode never runs the parser unless
    /// SPLICE_RELAY_OPTS is set, which keeps clap's code out of memory).
    /// A unit test keeps the two in step.
    pub fn defaults() -> Args {
        Args {
            connect_timeout: Duration::from_secs(10),
            half_close_timeout: Duration::from_secs(300),
            udp_timeout: Duration::from_secs(90),
            udp_max_flows: 4096,
            udp_rcvbuf: 4 << 20,
            proxy_header_timeout: Duration::from_secs(5),
            threads: 1,
            ..Args::default()
        }
    }

    /// Turns the arguments into a config: reads config files, expands
    /// ranges, resolves host names, applies global options.
    pub fn into_config(self, resolve: Resolver<'_>) -> Result<Config, StartError> {
        self.into_config_all(resolve, false).map_err(|mut problems| problems.swap_remove(0))
    }

    /// Like [`Args::into_config`], for `--check`: every problem it finds
    /// (each bad line of each config file, each bad FORWARD, each bad
    /// option), not only the first.
    pub fn check_config(self, resolve: Resolver<'_>) -> Result<Config, Vec<StartError>> {
        self.into_config_all(resolve, true)
    }

    /// The config, or the problems found: all of them if `all`, else the first.
    fn into_config_all(mut self, resolve: Resolver<'_>, all: bool) -> Result<Config, Vec<StartError>> {
        let mut problems = Vec::new();
        let mut forwards = Vec::new();
        let already_read = !self.config.is_empty() && self.config.len() == self.config_text.len();
        for (i, path) in self.config.iter().enumerate() {
            let text = if already_read { Ok(std::mem::take(&mut self.config_text[i])) } else { read_config_file(path) };
            match text {
                Ok(bytes) => {
                    let (found, bad) = config::parse_config_all(path, &bytes, resolve, all);
                    forwards.extend(found);
                    problems.extend(bad);
                }
                Err(e) => problems.push(e),
            }
            if !all && !problems.is_empty() {
                return Err(problems);
            }
        }
        for f in &self.forwards {
            match config::parse_forward(f, resolve) {
                Ok(found) => forwards.extend(found),
                Err(e) if all => problems.push(e),
                Err(e) => return Err(vec![e]),
            }
        }
        for f in &mut forwards {
            f.send_proxy = f.send_proxy.or(self.send_proxy);
            f.accept_proxy |= self.accept_proxy;
            if self.transparent {
                f.transparent = f.transparent.or(Some(config::Transparent::Address));
            }
        }
        let mut ok = |r: Result<_, StartError>| r.map_err(|e| problems.push(e)).ok();
        let allow = ok(cidr_list("--allow", self.allow.as_deref())).flatten();
        let deny = ok(cidr_list("--deny", self.deny.as_deref())).flatten();
        // None: --trusted-proxies is wrong, and said so already.
        let trusted = ok(trusted_proxies(self.trusted_proxies.as_deref().unwrap_or_default()).map(Some)).flatten();
        for f in &mut forwards {
            if f.access.allow.is_none() {
                f.access.allow = allow.clone();
            }
            if f.access.deny.is_none() {
                f.access.deny = deny.clone();
            }
        }
        if forwards.iter().any(|f| f.accept_proxy) && trusted.as_ref().is_some_and(Vec::is_empty) {
            problems.push(StartError::Usage(
                "accept-proxy needs --trusted-proxies (e.g. 10.0.0.0/8; 0.0.0.0/0,::/0 trusts everyone)".into(),
            ));
        }
        if self.udp_max_flows == 0 {
            problems.push(StartError::Usage("--udp-max-flows must be at least 1".into()));
        }
        // 0 turns --idle-timeout, --half-close-timeout and --drain-timeout off;
        // for these it would mean "at once", over and over.
        let zero = Duration::is_zero;
        let must_not_be_zero = [
            (zero(&self.connect_timeout), "--connect-timeout must be more than 0"),
            (zero(&self.udp_timeout), "--udp-timeout must be more than 0"),
            (zero(&self.proxy_header_timeout), "--proxy-header-timeout must be more than 0"),
            (
                self.stats_interval.as_ref().is_some_and(zero),
                "--stats-interval must be more than 0 (leave it out to log only on SIGUSR1)",
            ),
        ];
        problems.extend(
            must_not_be_zero.iter().filter(|(is_zero, _)| *is_zero).map(|(_, msg)| StartError::Usage(msg.to_string())),
        );
        if !problems.is_empty() {
            if all {
                // The forwards that parsed can still overlap: say so in the same run.
                problems.extend(crate::overlaps(&forwards, self.ipv6_only, self.metrics));
            }
            return Err(problems);
        }
        let level = match (self.verbose as i32) - (self.quiet as i32) {
            i32::MIN..=-2 => log::LevelFilter::Error,
            -1 => log::LevelFilter::Warn,
            0 => log::LevelFilter::Info,
            1 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        };
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Ok(Config {
            forwards,
            ipv6_only: self.ipv6_only,
            tcp: TcpSettings {
                max_connections: self.max_connections,
                max_per_source: self.max_connections_per_source,
                timeouts: Timeouts {
                    connect: self.connect_timeout,
                    idle: self.idle_timeout.and_then(nonzero),
                    half_close: nonzero(self.half_close_timeout),
                    header: self.proxy_header_timeout,
                },
                splice: !self.no_splice,
                pipe_size: self.pipe_size.unwrap_or(DEFAULT_PIPE_SIZE),
                pipe_spare: 32,
                trusted: trusted.unwrap_or_default(),
            },
            udp: UdpSettings {
                timeout: self.udp_timeout,
                max_flows: self.udp_max_flows,
                gso: !self.no_udp_gso,
                rcvbuf: self.udp_rcvbuf,
            },
            event_loop: LoopSettings { drain_timeout: self.drain_timeout, stats_interval: self.stats_interval },
            access: crate::cidr::Access { allow, deny },
            metrics: self.metrics,
            threads: self.threads,
            log_level: level,
        })
    }
}

/// The most a config file may hold; `-c /dev/zero` would otherwise read forever.
const MAX_CONFIG_BYTES: usize = 16 << 20;

/// Reads a config file: unreadable is a run-time error (exit 1), larger
/// than [`MAX_CONFIG_BYTES`] a usage error (exit 2).
fn read_config_file(path: &str) -> Result<Vec<u8>, StartError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| StartError::Runtime(format!("cannot read config file {path}: {e}")))?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(StartError::Usage(format!(
            "cannot read config file {path}: larger than {} MiB",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    Ok(bytes)
}

/// Parses --trusted-proxies. An entry longer than any address can be
/// is named cut short instead of whole.
fn trusted_proxies(list: &str) -> Result<Vec<crate::cidr::Cidr>, StartError> {
    if list.split(',').all(|p| p.trim().is_empty()) {
        return Ok(Vec::new());
    }
    cidr_list("--trusted-proxies", Some(list)).map(Option::unwrap_or_default)
}

/// Parses a comma-separated list of CIDR ranges given to `option`.
fn cidr_list(option: &str, list: Option<&str>) -> Result<Option<Vec<crate::cidr::Cidr>>, StartError> {
    list.map(|l| crate::cidr::parse_list(l, ',').map_err(|e| StartError::Usage(format!("{option}: {e}")))).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_an_empty_command_line() {
        let parsed = Args::try_parse_from(["splice-relay"]).unwrap();
        assert_eq!(format!("{:?}", Args::defaults()), format!("{parsed:?}"));
    }
}
