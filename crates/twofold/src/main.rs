//! The `twofold` command. It only parses settings, prepares the data directory and
//! its key file, and hands over to the planes.

mod keyfile;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use twofold_control::config::Config as ControlConfig;
use twofold_control::server::ensure_operator_token;
use twofold_control::state::{AppState, Clock};
use twofold_control::store::Store;
use twofold_data::config::Config as DataConfig;

/// Twofold: multi-factor authentication that keeps verifying when everything
/// around it fails.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: tenants, keys, factors, audit log and the feed.
    Control(ControlArgs),
    /// Run a data plane: verification from a local replica of the feed.
    Data(DataArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct Common {
    /// Directory for the database and the master key file.
    #[arg(long, env = "TWOFOLD_DATA_DIR", default_value = "./twofold-data")]
    data_dir: PathBuf,

    /// File holding the base64 master key that seals secrets and keys hashes.
    /// Created with mode 0600 on first start if missing. Default: DATA_DIR/master.key.
    #[arg(long, env = "TWOFOLD_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "TWOFOLD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Args)]
struct ControlArgs {
    #[command(flatten)]
    common: Common,

    /// Address the control plane listens on.
    #[arg(long, env = "TWOFOLD_CONTROL_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,

    /// Operator token. If unset, one is generated on first start, printed once,
    /// and only its hash is stored.
    #[arg(long, env = "TWOFOLD_OPERATOR_TOKEN", hide_env_values = true)]
    operator_token: Option<String>,
}

#[derive(Debug, Args)]
struct DataArgs {
    #[command(flatten)]
    common: Common,

    /// Address the data plane listens on.
    #[arg(long, env = "TWOFOLD_DATA_LISTEN", default_value = "127.0.0.1:7071")]
    listen: SocketAddr,

    /// Control-plane base URL to replicate from; repeat, or separate with
    /// commas, for several (any one will do).
    #[arg(
        long = "control-url",
        env = "TWOFOLD_CONTROL_URLS",
        value_delimiter = ',',
        required = true
    )]
    control_urls: Vec<String>,

    /// Node key (scope replicate) for the feed, from `POST /v1/node-keys`.
    #[arg(long, env = "TWOFOLD_NODE_TOKEN", hide_env_values = true)]
    node_token: String,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TWOFOLD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Say on stdout where a plane listens, in one stable line (`twofold <plane>
/// listening on http://ADDR`), so scripts and tests can use port 0.
fn announce(plane: &str, listener: &TcpListener) -> anyhow::Result<()> {
    println!("twofold {plane} listening on http://{}", listener.local_addr()?);
    Ok(())
}

/// Cancel `token` on Ctrl-C or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        token.cancel();
    });
}

async fn run_control(args: ControlArgs) -> anyhow::Result<()> {
    let common = &args.common;
    std::fs::create_dir_all(&common.data_dir)
        .with_context(|| format!("cannot create data directory {}", common.data_dir.display()))?;
    let keyring = keyfile::load_keyring(&common.data_dir, common.master_key_file.as_deref())?;
    let store = Store::open(&common.data_dir.join("control.db"))
        .context("cannot open the control-plane database")?;
    let mut config = ControlConfig::new(keyring);
    config.operator_token = args.operator_token;
    let shutdown = CancellationToken::new();
    let state = AppState::new(store, config, Clock::system(), shutdown.clone());
    if let Some(token) = ensure_operator_token(&state)? {
        // Printed once, to the terminal, never to the log.
        println!(
            "Operator token (shown once; keep it safe): {}",
            token.as_str()
        );
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    announce("control", &listener)?;
    cancel_on_signal(shutdown);
    twofold_control::serve(listener, state).await?;
    Ok(())
}

async fn run_data(args: DataArgs) -> anyhow::Result<()> {
    let common = &args.common;
    std::fs::create_dir_all(&common.data_dir)
        .with_context(|| format!("cannot create data directory {}", common.data_dir.display()))?;
    let keyring = keyfile::load_keyring(&common.data_dir, common.master_key_file.as_deref())?;
    let config = DataConfig::new(
        common.data_dir.clone(),
        args.control_urls,
        args.node_token,
        keyring,
    );
    let shutdown = CancellationToken::new();
    let (node, replica) =
        twofold_data::server::load(config, shutdown.clone()).context("cannot load the replica")?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    announce("data", &listener)?;
    cancel_on_signal(shutdown);
    twofold_data::server::serve(listener, node, replica).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Control(args) => {
            init_logging(args.common.log_format);
            run_control(args).await
        }
        Command::Data(args) => {
            init_logging(args.common.log_format);
            run_data(args).await
        }
    }
}
