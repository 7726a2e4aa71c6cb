use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tradefeed_bridge::config;

/// Runs in place of TraderX's trade-feed (or beside it) and mirrors its
/// Socket.IO topics to NATS subjects and back.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Environment variables prefixed
    /// TRADEFEED_BRIDGE_ override it, with __ between key levels.
    #[arg(long, short, global = true, default_value = "config/traderx.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Check the configuration, print every problem with its key, and exit.
    CheckConfig,
    /// Exit 0 when a running bridge's /readyz answers 200 (for container
    /// health checks); the address comes from admin.listen unless given.
    Probe {
        /// The URL to ask, e.g. http://127.0.0.1:18097/readyz.
        #[arg(long)]
        url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => check_config(&cli.config),
        Command::Run => run(&cli.config),
        Command::Probe { url } => probe(&cli.config, url),
    }
}

fn probe(path: &std::path::Path, url: Option<String>) -> ExitCode {
    let url = match url {
        Some(u) => u,
        None => match config::load(path, false) {
            Ok(c) => tradefeed_bridge::probe::readyz_url(&c.admin.listen),
            Err(e) => {
                eprint!("{}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    match tradefeed_bridge::probe::probe(&url) {
        Ok(_) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("not ready: {why}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match config::load(path, true) {
        Ok(c) => {
            println!("{}: configuration is valid", path.display());
            println!("{}", c.summary());
            let table = tradefeed_bridge::route::RouteTable::compile(&c.routes).expect("validated");
            print!("{}", table.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let cfg = match config::load(path, true) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    tradefeed_bridge::telemetry::init_logging(&cfg.log);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(tradefeed_bridge::app::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
