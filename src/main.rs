//! Entry point: argv -> config, logging, run, exit status (fd 3 in docker mode).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use splice_relay::cli::{self, Args};
use splice_relay::config::{StartError, Transparent, system_resolver};
use splice_relay::docker;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let args = match utf8_args(argv.iter().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("splice-relay: {e}");
            return ExitCode::from(2);
        }
    };
    if docker::is_docker_args(&args) {
        return docker_main(&args);
    }
    let args = match cli::parse(&argv) {
        Ok(a) => a,
        // --help and --version: their text on stdout.
        Err(cli::ParseError::Clap(e)) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(cli::ParseError::Clap(e)) => {
            eprintln!("splice-relay: {}", cli::clap_error_line(&e));
            return ExitCode::from(2);
        }
        // Under --check every problem exits 2; else an unreadable file is 1.
        Err(cli::ParseError::Files { check, problems }) => {
            for p in &problems {
                eprintln!("splice-relay: {p}");
            }
            let code = if check { 2 } else { problems.iter().map(StartError::exit_code).max().unwrap_or(2) };
            return ExitCode::from(code as u8);
        }
    };
    if args.check {
        return check_main(args);
    }
    // SIGHUP reads the same command line (and so its -c files) again.
    let reread: splice_relay::reload::Reread = std::sync::Arc::new(move || {
        let args = cli::parse(&argv).map_err(cli::ParseError::problems)?;
        args.check_config(&system_resolver)
    });
    let result = args.into_config(&system_resolver).and_then(|config| {
        if config.forwards.is_empty() {
            return Err(StartError::Usage(splice_relay::NOTHING_TO_RELAY.into()));
        }
        splice_relay::logging::init(config.log_level, None);
        splice_relay::run(&config, None, Some(reread), || {})
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // One plain line, whatever the log level: the log is for the running relay.
        Err(e) => {
            eprintln!("splice-relay: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `--check`: every problem found, one line each on stderr, and exit 2;
/// or one line on stdout and exit 0. Nothing is bound.
fn check_main(args: Args) -> ExitCode {
    let problems = match args.check_config(&system_resolver) {
        Ok(config) => {
            let problems = splice_relay::check(&config);
            if problems.is_empty() {
                println!("splice-relay: configuration OK ({} forwards)", config.forwards.len());
                return ExitCode::SUCCESS;
            }
            problems
        }
        Err(problems) => problems,
    };
    for p in problems {
        eprintln!("splice-relay: {p}");
    }
    ExitCode::from(2)
}

/// The arguments as text, or an error naming the first that is not UTF-8.
fn utf8_args<'a>(args: impl Iterator<Item = &'a OsString>) -> Result<Vec<String>, String> {
    args.enumerate()
        .map(|(i, a)| {
            a.to_str().map(String::from).ok_or_else(|| {
                let bytes = a.as_bytes();
                let (head, more) = bytes.split_at(bytes.len().min(60));
                let more = if more.is_empty() { "" } else { "..." };
                format!("argument {} is not UTF-8 text: \"{}\"{more}", i + 1, head.escape_ascii())
            })
        })
        .collect()
}

/// Docker mode: docker-proxy's flags, errors reported through fd 3.
fn docker_main(args: &[String]) -> ExitCode {
    let flags = match docker::parse(args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}\n{}", docker::USAGE);
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("splice-relay version {} (docker-proxy compatible)", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    // dockerd sets Pdeathsig too; this covers being started by anything else.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    let mut status = docker::Status::inherit();
    let result = (|| {
        let opts = docker::native_options(std::env::var_os("SPLICE_RELAY_OPTS"))?;
        let send_proxy = opts.send_proxy;
        let transparent = opts.transparent.then_some(Transparent::Address);
        let ports = docker::proxy_ports(std::env::var_os("SPLICE_RELAY_PROXY_PORTS"))?;
        // Not a usage error here: dockerd expects exit 1 with the reason on fd 3.
        let mut config =
            opts.into_config(&system_resolver).map_err(|e| StartError::Runtime(format!("SPLICE_RELAY_OPTS: {e}")))?;
        splice_relay::logging::init(config.log_level, std::env::var_os("SPLICE_RELAY_LOG"));
        let mut forward = docker::forward(&flags, send_proxy, ports.as_deref())?;
        forward.transparent = transparent;
        forward.access = config.access.clone();
        let listen_fd = if flags.use_listen_fd { Some(docker::listen_fd(&forward)?) } else { None };
        config.forwards = vec![forward];
        // Docker binds IPv6 host addresses IPv6-only, [::] included.
        config.ipv6_only = true;
        splice_relay::run(&config, listen_fd, None, || status.ready())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // dockerd reads fd 3 (stderr is /dev/null); the log may be a file.
        Err(e) => {
            status.failed(&e.to_string());
            log::error!("{e}");
            if !log::log_enabled!(log::Level::Error) {
                eprintln!("splice-relay: {e}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
