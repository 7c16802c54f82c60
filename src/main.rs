//! The `sidecache` binary: CLI → configuration → logging → run; signals; exit codes.
//!
//! Exit codes: 0 after a clean shutdown or a valid `--check-config`, 64 (EX_USAGE) for any
//! configuration problem, 1 when a port cannot be bound.

use std::path::PathBuf;

use clap::Parser;
use sidecache::config::{Config, EXIT_CONFIG, LogFormat, Overrides};
use tokio_util::sync::CancellationToken;

/// A caching sidecar for Redis.
#[derive(Debug, Parser)]
#[command(name = "sidecache", version, about)]
struct Cli {
    /// TOML configuration file (see config/sidecache.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address clients connect to [default: 127.0.0.1:6380].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Redis to forward to: redis://[user:pass@]host:port[/db] [default: redis://127.0.0.1:6379].
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Admin HTTP address for /metrics, /livez, /readyz [default: 127.0.0.1:9180].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Validate the configuration and exit (0 valid, 64 invalid).
    #[arg(long)]
    check_config: bool,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log level or filter (error, warn, info, debug, trace, or an env-filter expression).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn env_pairs() -> Vec<(String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with("SIDECACHE_")).collect()
}

fn load(cli: &Cli) -> Result<Config, sidecache::config::ConfigError> {
    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        admin_listen: cli.admin_listen.clone(),
        log_format: cli.log_format,
        log_level: cli.log_level.clone(),
    };
    Config::load(cli.config.as_deref(), &env_pairs(), &overrides)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() {
    // A bad option is a configuration problem like any other: exit 64 (clap would exit 2).
    let cli = Cli::try_parse().unwrap_or_else(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => e.exit(),
        _ => {
            let _ = e.print();
            std::process::exit(EXIT_CONFIG)
        }
    });
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            for problem in &e.problems {
                eprintln!("sidecache: invalid configuration: {problem}");
            }
            std::process::exit(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        println!("configuration is valid");
        return;
    }
    if cli.print_config {
        print!("{}", config.to_redacted_toml());
        return;
    }
    init_logging(&config);
    // One worker: a current-thread runtime, which schedules without work-stealing queues.
    let mut builder = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.worker_threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidecache: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run(cli, config));
    std::process::exit(code);
}

async fn run(cli: Cli, config: Config) -> i32 {
    // The values read only at start, to name the ones a reload cannot apply.
    let running = config.clone();
    let server = match sidecache::Server::bind(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start.");
            return match e {
                sidecache::server::StartError::Config(_) => EXIT_CONFIG,
                _ => 1,
            };
        }
    };
    let shutdown = CancellationToken::new();
    // Signal handlers and the file watch exist before "started" is logged: a SIGHUP or a file
    // change that follows it is never lost (nor is a SIGHUP fatal).
    let Some(signals) = Signals::install(&cli) else {
        return 1;
    };
    tracing::info!(listen = %server.local_addr(), admin = %server.admin_addr(), "sidecache started.");
    tokio::spawn(signals.run(cli, running, shutdown.clone(), server.reload_handle()));
    server.run(shutdown).await;
    tracing::info!("Stopped.");
    0
}

/// The signals sidecache handles and the config file watch, installed before it serves.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    watch: Option<sidecache::reload::FileWatch>,
}

impl Signals {
    fn install(cli: &Cli) -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(term), Ok(int), Ok(hup)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
        else {
            tracing::error!("Cannot install signal handlers.");
            return None;
        };
        // A changed config file (an edit, a Kubernetes ConfigMap update) reloads like SIGHUP.
        let watch = cli.config.as_deref().and_then(|path| {
            match sidecache::reload::FileWatch::new(path, sidecache::reload::DEBOUNCE) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "Cannot watch the config file; reload with SIGHUP.");
                    None
                }
            }
        });
        Some(Signals { term, int, hup, watch })
    }

    async fn run(mut self, cli: Cli, running: Config, shutdown: CancellationToken, reload: sidecache::ReloadHandle) {
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    tracing::info!(signal = "SIGTERM", "Shutdown requested.");
                    shutdown.cancel();
                }
                _ = self.int.recv() => {
                    tracing::info!(signal = "SIGINT", "Shutdown requested.");
                    shutdown.cancel();
                }
                _ = self.hup.recv() => reload_config(&cli, &running, &reload, "SIGHUP"),
                _ = file_changed(&mut self.watch) => reload_config(&cli, &running, &reload, "file"),
            }
        }
    }
}

async fn file_changed(watch: &mut Option<sidecache::reload::FileWatch>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

fn reload_config(cli: &Cli, running: &Config, reload: &sidecache::ReloadHandle, trigger: &str) {
    match load(cli) {
        Ok(config) => {
            reload.apply(&config);
            // Before "reloaded": whoever waits for that line has seen this one too.
            let unapplied = running.restart_only_changes(&config);
            if !unapplied.is_empty() {
                tracing::warn!(
                    trigger,
                    keys = %unapplied.join(", "),
                    "Changed keys that apply only at start keep their running values; restart to apply them."
                );
            }
            tracing::info!(trigger, "Configuration reloaded.");
        }
        Err(e) => tracing::error!(trigger, problems = %e, "New configuration rejected; keeping the current one."),
    }
}
