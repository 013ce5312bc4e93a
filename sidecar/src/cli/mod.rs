//! The `mend` command line: one binary, one subcommand per role.

pub mod rules;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::RunError;
use crate::common::telemetry::{self, LogFormat};
use crate::runtime::config::SidecarConfig;

/// Exit status for a bad command line or config (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit status when a needed service is unavailable at start-up (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// mend: reactive error handling for NATS JetStream consumers.
#[derive(Debug, Parser)]
#[command(name = "mend", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "MEND_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the web dashboard and its API; take in what was parked.
    Dashboard {
        /// The dashboard's TOML config.
        #[arg(long, short, env = "MEND_CONFIG")]
        config: PathBuf,
    },
    /// Everything on this machine for trying mend: NATS, a demo orders app that fails now and then,
    /// the sidecar in front of it, the processor with the example rules, the dashboard (no login)
    /// and a producer. Ctrl-C stops it all.
    Dev {
        /// Use this NATS server (JetStream, 2.11 or later) instead of starting a nats-server.
        #[arg(long, value_name = "URL")]
        nats_url: Option<String>,
        /// The nats-server binary to start (default: `.tools/venv/bin/nats-server` of a mend
        /// checkout, then `nats-server` on PATH).
        #[arg(long, env = "MEND_NATS_SERVER", value_name = "PATH")]
        nats_server: Option<PathBuf>,
        /// Where the dashboard listens. It has no login under `mend dev`: keep it on loopback.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Events per second from the demo producer (0: none; publish your own to `orders.>`).
        #[arg(long, default_value_t = 10)]
        rate: u32,
        /// Keep NATS' store, the dashboard's database, the configs and the rules in this folder
        /// (default: a temporary folder, removed on exit).
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Time between status lines.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        status_every: std::time::Duration,
        /// Deliver to the demo app in batches of up to N events (bulk delivery, 1 to 1000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
        batch: Option<u16>,
    },
    /// Read a password from standard input and print its hash for `[[user]] password_hash`.
    HashPassword,
    /// Repair failures from MEND_FAILED by rules; send repairs back, park the rest.
    Processor {
        /// The processor's TOML config.
        #[arg(long, short, env = "MEND_CONFIG")]
        config: PathBuf,
    },
    /// Check and try repair rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Consume a service's stream, deliver to the app over HTTP, delegate what it fails on.
    Sidecar {
        /// The sidecar's TOML config.
        #[arg(long, short, env = "MEND_CONFIG")]
        config: PathBuf,
        /// This instance's partition index (a StatefulSet ordinal, say); wins over `partition` in
        /// the config and MEND_PARTITION.
        #[arg(long, value_name = "N")]
        partition: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Parse the rule files, compile every expression and run every inline test.
    Check {
        /// Rule files, or directories of `*.toml` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show what the rules would do to one failure envelope, or to a dashboard's parked backlog.
    Try {
        /// Rule files, or directories of `*.toml` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// A failure envelope (JSON), e.g. one copied from the dashboard.
        #[arg(
            long,
            required_unless_present = "dashboard",
            conflicts_with = "dashboard"
        )]
        message: Option<PathBuf>,
        /// A running dashboard (e.g. `https://mend.example.com`): try the rules on its parked
        /// backlog through its API.
        #[arg(long, requires = "token_file")]
        dashboard: Option<String>,
        /// A file holding the dashboard's API token (an operator's: the files are a draft).
        #[arg(long, requires = "dashboard")]
        token_file: Option<PathBuf>,
        /// Only this service's parked messages.
        #[arg(long, requires = "dashboard")]
        service: Option<String>,
        /// Repairs of one lineage before it is parked.
        #[arg(long, default_value_t = 3)]
        max_repairs: u32,
    },
}

/// Runs the command line; returns the process exit status.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Under `mend dev` the status lines are the output: logs show warnings and errors, without
    // the demo app's expected 503s (each a retry warning of the sidecar).
    let quiet = matches!(cli.command, Command::Dev { .. });
    let service = match &cli.command {
        Command::Sidecar { .. } => "mend-sidecar",
        Command::Processor { .. } => "mend-processor",
        Command::Dashboard { .. } => "mend-dashboard",
        Command::Dev { .. } => "mend-dev",
        _ => "mend",
    };
    // Kept to the end of `main`: dropped, it exports the spans still queued.
    let _traces = telemetry::init_logging(
        cli.log_format,
        if quiet {
            "warn,mend::consume=error"
        } else {
            "info"
        },
        service,
    );
    match cli.command {
        Command::HashPassword => crate::dashboard::hash_password(),
        Command::Dev {
            nats_url,
            nats_server,
            listen,
            rate,
            data,
            status_every,
            batch,
        } => {
            let options = crate::dev::Options {
                nats_url,
                nats_server,
                listen,
                rate,
                data,
                status_every,
                batch: batch.map(usize::from),
            };
            role(
                "dev",
                Ok::<_, std::convert::Infallible>(options),
                crate::dev::run,
            )
            .await
        }
        Command::Dashboard { config } => {
            role(
                "dashboard",
                crate::dashboard::config::DashboardConfig::load(&config, std::env::vars()),
                |c, shutdown| crate::dashboard::run(c, crate::dashboard::Access::Login, shutdown),
            )
            .await
        }
        Command::Rules { command } => match command {
            RulesCommand::Check { paths } => {
                crate::cli::rules::check(&paths, &repair_rules::rules::Limits::default())
            }
            RulesCommand::Try {
                paths,
                message,
                dashboard,
                token_file,
                service,
                max_repairs,
            } => match (message, dashboard, token_file) {
                (Some(message), _, _) => {
                    let limits = repair_rules::rules::Limits {
                        max_repairs,
                        ..Default::default()
                    };
                    crate::cli::rules::try_one(&paths, &message, &limits)
                }
                (None, Some(dashboard), Some(token_file)) => {
                    crate::cli::rules::try_backlog(
                        &paths,
                        &dashboard,
                        &token_file,
                        service.as_deref(),
                    )
                    .await
                }
                // clap requires a message, or a dashboard with its token file.
                _ => ExitCode::from(64),
            },
        },
        Command::Processor { config } => {
            role(
                "processor",
                crate::processor::config::ProcessorConfig::load(&config, std::env::vars()),
                crate::processor::run,
            )
            .await
        }
        Command::Sidecar { config, partition } => {
            role(
                "sidecar",
                SidecarConfig::load_for(&config, std::env::vars(), partition),
                crate::runtime::run,
            )
            .await
        }
    }
}

/// Runs a long-lived role with its loaded config until SIGTERM or SIGINT: a config that did not
/// load exits with EX_USAGE, and how the role ended gives the exit status.
async fn role<C, E, F>(
    name: &str,
    config: Result<C, E>,
    run: impl FnOnce(C, CancellationToken) -> F,
) -> ExitCode
where
    E: std::fmt::Display,
    F: Future<Output = Result<(), RunError>>,
{
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mend {name}: bad config: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    exit(name, run(config, shutdown).await)
}

/// The exit status of a role that ran.
fn exit(role: &str, result: Result<(), RunError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(e)) => {
            eprintln!("mend {role}: bad config: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(RunError::Startup(e)) => {
            tracing::error!(error = format!("{e:#}"), "Cannot start.");
            eprintln!("mend {role}: cannot start: {e:#}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(RunError::Runtime(e)) => {
            eprintln!("mend {role}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT; a second signal exits at once.
async fn on_signal(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("Signal received: shutting down gracefully (again to exit at once).");
    shutdown.cancel();
    wait_for_signal().await;
    tracing::warn!("Second signal: exiting now.");
    std::process::exit(130);
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
