//! The `pgcorral` command: PgBouncer's command line, then the actor system until a signal
//! stops it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use actix::prelude::*;
use clap::{ArgAction, Parser};

use pgcorral::actors::registry::Shared;
use pgcorral::actors::supervisor::{Signals, Supervisor};
use pgcorral::actors::takeover;
use pgcorral::config::Config;
use pgcorral::{daemon, logging, version};

// `--features system-alloc` leaves the C allocator in place, so that valgrind's heap tools
// (dhat, massif) see every allocation; benches/README.md shows how.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "pgcorral", version = env!("CARGO_PKG_VERSION"), disable_version_flag = true,
          about = "PostgreSQL connection pooler; reads pgbouncer.ini")]
struct Args {
    /// Run in the background (detach from the terminal)
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Log nothing to stderr
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// More verbose logging; repeat for more
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    verbose: u8,
    /// Switch to this user at start-up
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Online restart: take over the listening sockets and the clients of the pgcorral running
    /// with this configuration (found through unix_socket_dir), which then exits
    #[arg(short = 'R', long = "reboot")]
    reboot: bool,
    /// Check the configuration file and exit (0 if valid, 1 if not)
    #[arg(long = "check")]
    check: bool,
    /// Print the version and exit
    #[arg(short = 'V', long = "version", action = ArgAction::Version)]
    version: Option<bool>,
    /// The configuration file (pgbouncer.ini format)
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (config, warnings) = match Config::load(&args.config) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("pgcorral: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        for warning in &warnings {
            eprintln!("pgcorral: warning: {warning}");
        }
        println!("{}: configuration OK", args.config.display());
        return ExitCode::SUCCESS;
    }
    match run(args, config, warnings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("pgcorral: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    args: Args,
    config: Config,
    warnings: Vec<pgcorral::config::ConfigWarning>,
) -> Result<(), Box<dyn std::error::Error>> {
    let general = config.general.clone();
    logging::init(general.verbose, args.verbose, args.quiet || args.daemon, general.logfile.as_deref())?;
    for warning in &warnings {
        log::warn!("{warning}");
    }
    for limitation in pgcorral::tls::TlsContexts::limitations(&general.server_tls) {
        log::warn!("{limitation}");
    }
    if let Some(user) = &args.user {
        daemon::switch_user(user)?;
    }
    daemon::raise_file_limit(daemon::files_needed(&config));
    let workers = general.workers.max(1);
    // Bind (or take over) before detaching so that an address in use is reported on the
    // terminal.
    let mut inherited = match args.reboot {
        true => Some(takeover::take_over(&general)?),
        false => None,
    };
    let (listeners, metrics) = match &mut inherited {
        Some(inherited) => {
            log::info!("took over the listening sockets of the running process; its clients follow");
            let metrics = match inherited.metrics.take() {
                Some(metrics) => Some(metrics),
                None => daemon::bind_metrics(&general)?,
            };
            (inherited.listeners(workers), metrics)
        }
        None => (daemon::bind_listeners(&general, workers)?, daemon::bind_metrics(&general)?),
    };
    // Where the next online restart will find this process.
    let takeover_socket = match takeover::bind(&general)? {
        Some(listener) => takeover::socket_path(&general).map(|path| (listener, path)),
        None => None,
    };
    if args.daemon {
        daemon::detach()?;
    }
    let system = System::new();
    // Signal handlers exist before the pidfile does, so no signal can find the process
    // without one.
    let signals = system.block_on(async { Signals::install() })?;
    let _pidfile = match &general.pidfile {
        Some(path) if args.reboot => Some(daemon::Pidfile::replace(path)?),
        Some(path) => Some(daemon::Pidfile::create(path)?),
        None => None,
    };
    log::info!("{} listening on port {}", version::VERSION, general.listen_port);
    let config_path = std::fs::canonicalize(&args.config).unwrap_or(args.config);
    system.block_on(async move {
        let shared = Arc::new(Shared::new(config, workers, Arbiter::current()));
        Supervisor::new(shared, signals, config_path, listeners, metrics)
            .with_takeover(takeover_socket, inherited)
            .start();
    });
    // The sockets are bound and the workers started: connections are accepted from now on.
    daemon::notify_systemd(&format!("READY=1\nSTATUS=listening on port {}", general.listen_port));
    system.run()?;
    log::info!("pgcorral stopped");
    Ok(())
}
