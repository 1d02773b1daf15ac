//! The `ferry` binary: `ferry serve` (the default) and `ferry connector check`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry::app::App;
use ferry::config::{Config, LogFormat};
use ferry::runtime::{Runtime, RuntimeConfig};
use tokio_util::sync::CancellationToken;

/// Keeps a customer catalog in two-way sync with external systems.
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    /// TOML configuration file (settings from FERRY_* variables override it).
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Work with connector components.
    Connector {
        #[command(subcommand)]
        command: ConnectorCommand,
    },
}

#[derive(Subcommand)]
enum ConnectorCommand {
    /// Validate a component and print its manifest.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cli.config).await,
            Command::Connector {
                command: ConnectorCommand::Check { file },
            } => check_connector(file).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config_file.as_deref()).context("loading configuration")?;
    ferry::telemetry::init(config.log_format, "info", std::io::stderr)?;
    let app = App::build(config).await?;
    stop_on_signal(app.cancellation_token());
    app.run_until_stopped().await
}

/// Cancels `cancel` on SIGINT or SIGTERM: the server stops accepting
/// connections, lets in-flight requests finish, and exits.
fn stop_on_signal(cancel: CancellationToken) {
    tokio::spawn(async move {
        let interrupt = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT received, shutting down"),
            () = terminate => tracing::info!("SIGTERM received, shutting down"),
        }
        cancel.cancel();
    });
}

async fn check_connector(file: PathBuf) -> anyhow::Result<()> {
    ferry::telemetry::init(LogFormat::Text, "warn", std::io::stderr)?;
    let bytes = tokio::fs::read(&file)
        .await
        .with_context(|| format!("reading {}", file.display()))?;
    let runtime =
        Runtime::new(RuntimeConfig::default()).context("starting the connector runtime")?;
    let connector = runtime
        .load(&bytes)
        .await
        .with_context(|| format!("loading {}", file.display()))?;
    println!("{}", serde_json::to_string_pretty(connector.manifest())?);
    eprintln!(
        "ok: {} {} targets ferry:connector@{}, sha256 {}",
        connector.name(),
        connector.manifest().version,
        connector.world(),
        connector.sha256()
    );
    Ok(())
}
