//! The `ferry` binary: `ferry serve` (the default), `ferry status`, and the
//! connector author's commands `ferry connector new|check|dev`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry::app::App;
use ferry::cli::check::CheckOptions;
use ferry::cli::dev::DevOptions;
use ferry::cli::new::NewConnector;
use ferry::config::{Config, LogFormat, UploadRules};
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
    /// Print a running instance's sync health (GET /api/v1/health).
    Status {
        /// The instance (default: http:// + FERRY_LISTEN).
        #[arg(long)]
        url: Option<String>,
        /// Print the JSON the API returns.
        #[arg(long)]
        json: bool,
    },
    /// Write, check and try connectors.
    Connector {
        #[command(subcommand)]
        command: ConnectorCommand,
    },
}

#[derive(Subcommand)]
enum ConnectorCommand {
    /// Scaffold a connector crate (an Example CRM connector with its tests)
    /// to make your own.
    New {
        /// The connector's name: a-z, 0-9 and `-`.
        name: String,
        /// Where to create it (default ./ferry-connector-NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Build against this checkout's `sdk/` until ferry-sdk is published
        /// (writes a [patch.crates-io] table); default: the `sdk/` of the
        /// checkout this ferry was built from, if it is still there.
        #[arg(long)]
        sdk_path: Option<PathBuf>,
        /// Where ferry-runtime is (default SDK_PATH/../host/runtime).
        #[arg(long)]
        runtime_path: Option<PathBuf>,
    },
    /// Report what ferry sees in a component and whether an upload would be
    /// accepted; exits non-zero if not.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The largest component accepted, in bytes (default: the
        /// server's `connector_max_bytes`, from `--config` and FERRY_*).
        #[arg(long)]
        max_bytes: Option<usize>,
        /// Hosts connectors may declare (comma-separated, `*.suffix`
        /// allowed; default: the server's, from `--config` and FERRY_*).
        #[arg(long, value_delimiter = ',')]
        allowed_hosts: Vec<String>,
        /// Hosts connectors may not declare (default: the server's).
        #[arg(long, value_delimiter = ',')]
        denied_hosts: Vec<String>,
        /// Accept private and loopback hosts (also when the server's
        /// `allow_private_hosts` is on).
        #[arg(long)]
        allow_private_hosts: bool,
    },
    /// Build the connector crate in DIR, check it, and serve a local ferry
    /// with it loaded.
    Dev {
        /// The connector crate (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Rebuild and reload when its sources change.
        #[arg(long)]
        watch: bool,
    },
}

/// mimalloc rather than glibc's malloc: the request, push and webhook
/// paths allocate many small short-lived buffers, where glibc spent a
/// sixth of the process's time; webhooks and API creates went 6–31 %
/// faster with it (docs/performance.md, round 11).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
            Command::Status { url, json } => status(url, json, cli.config).await,
            Command::Connector { command } => connector(command, cli.config).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_file.as_deref()).context("loading configuration")?;
    // Checked before the exporter is built from it: a bad `otlp_endpoint`
    // is reported as ferry's setting, not as the exporter's error.
    config.validate().context("checking configuration")?;
    let _telemetry = ferry::telemetry::init_with_export(
        config.log_format,
        "info",
        std::io::stderr,
        config.otlp_endpoint.as_deref(),
    )?;
    let _sole = ferry::store::lock_sqlite_file(config.database_url_exposed())?;
    let app = App::build(config).await?;
    stop_on_signal(app.cancellation_token());
    app.run_until_stopped().await?;
    Ok(ExitCode::SUCCESS)
}

/// `ferry status`: the instance at `--url`, else the one the `--config`
/// file (and `FERRY_*` variables) describe, else `FERRY_LISTEN`'s.
async fn status(
    url: Option<String>,
    json: bool,
    config_file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let (listen, token) = match config_file {
        Some(file) => {
            let config = Config::load(Some(&file)).context("loading configuration")?;
            (
                Some(config.listen.to_string()),
                config
                    .admin_token
                    .map(|t| secrecy::ExposeSecret::expose_secret(&t).to_owned()),
            )
        }
        None => (
            std::env::var("FERRY_LISTEN").ok(),
            std::env::var("FERRY_ADMIN_TOKEN").ok(),
        ),
    };
    let options = ferry::cli::status::StatusOptions {
        url: url.unwrap_or_else(|| ferry::cli::status::default_url(listen.as_deref())),
        token: token.filter(|t| !t.is_empty()),
        json,
    };
    print!("{}", ferry::cli::status::status(&options).await?);
    Ok(ExitCode::SUCCESS)
}

async fn connector(
    command: ConnectorCommand,
    config_file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    match command {
        ConnectorCommand::New {
            name,
            dir,
            sdk_path,
            runtime_path,
        } => {
            let sdk_path = sdk_path.or_else(ferry::cli::new::checkout_sdk);
            if sdk_path.is_none() && runtime_path.is_some() {
                anyhow::bail!(
                    "--runtime-path patches ferry-runtime beside an SDK checkout: name the SDK with --sdk-path too"
                );
            }
            let dir = ferry::cli::new::scaffold(&NewConnector {
                name,
                dir,
                sdk_path: sdk_path.clone(),
                runtime_path,
            })?;
            match &sdk_path {
                Some(sdk) => println!("building against the SDK at {}", sdk.display()),
                None => eprintln!(
                    "warning: ferry-sdk is not on crates.io yet, and this ferry was not built from a checkout it can find:\n  \
                     the crate builds once the [patch.crates-io] table at the end of its Cargo.toml points at a checkout of ferry\n  \
                     (or run `ferry connector new NAME --sdk-path PATH/TO/ferry/sdk`)"
                ),
            }
            println!(
                "created {dir}\n\nnext:\n  cd {dir}\n  cargo test                       # builds the component and runs its tests\n  ferry connector dev              # serves a local ferry with it loaded\n\nREADME.md has the rest: check, upload, and the API it is written against.",
                dir = dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ConnectorCommand::Check {
            file,
            json,
            max_bytes,
            allowed_hosts,
            denied_hosts,
            allow_private_hosts,
        } => {
            ferry::telemetry::init(LogFormat::Text, "warn", std::io::stderr)?;
            // The server's rules, as `ferry serve` reads them (its
            // configuration file, if given, and FERRY_* variables); a flag
            // given wins over them.
            let server =
                Config::upload_rules(config_file.as_deref()).context("loading configuration")?;
            let from_server = |hosts: Vec<String>, rule: fn(&UploadRules) -> &Vec<String>| {
                if hosts.is_empty() {
                    rule(&server).clone()
                } else {
                    hosts
                }
            };
            let options = CheckOptions {
                max_bytes: max_bytes.unwrap_or(server.connector_max_bytes),
                allowed_hosts: from_server(allowed_hosts, |c| &c.connector_allowed_hosts),
                denied_hosts: from_server(denied_hosts, |c| &c.connector_denied_hosts),
                allow_private_hosts: allow_private_hosts || server.allow_private_hosts,
            };
            let report = ferry::cli::check::check(&file, &options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.human());
            }
            Ok(if report.accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ConnectorCommand::Dev { dir, watch } => {
            ferry::telemetry::init(LogFormat::Text, "info", std::io::stderr)?;
            let cancel = CancellationToken::new();
            stop_on_signal(cancel.clone());
            ferry::cli::dev::run(
                DevOptions {
                    dir,
                    config_file,
                    watch,
                },
                cancel,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Cancels `cancel` on SIGINT or SIGTERM: the server stops accepting
/// connections, lets in-flight requests finish, and exits. A second signal
/// exits at once (130): a shutdown waiting on something slow (a broker
/// gone, a long statement) ignored every later Ctrl-C, and `connector dev`
/// went on building and started serving after one.
fn stop_on_signal(cancel: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => Some(signal),
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    None
                }
            };
        let mut next = async || {
            #[cfg(unix)]
            let terminate = async {
                match terminate.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let terminate = std::future::pending::<()>();
            let interrupt = async {
                if let Err(error) = tokio::signal::ctrl_c().await {
                    tracing::error!(%error, "cannot listen for SIGINT");
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = interrupt => "SIGINT",
                () = terminate => "SIGTERM",
            }
        };
        let signal = next().await;
        tracing::info!(signal, "shutting down; a second signal exits at once");
        cancel.cancel();
        let signal = next().await;
        tracing::warn!(
            signal,
            "exiting without waiting for the shutdown (what was acknowledged is stored)"
        );
        std::process::exit(130);
    });
}
