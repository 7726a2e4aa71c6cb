use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tradefeed_bridge::config;

/// `eprint!` that does not panic when standard error is closed (`2>&-`):
/// the exit code still gives the verdict.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprintln!` that does not panic when standard error is closed.
macro_rules! reportln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Runs in place of TraderX's trade-feed (server mode) or beside it (attach
/// mode) and mirrors its Socket.IO topics to NATS subjects and back.
#[derive(Parser)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "\
Configuration: a TOML file (every key, with its default, is documented in
config/reference.toml), overridden by environment variables: the key path in
upper case, prefixed TRADEFEED_BRIDGE_, with __ between levels, e.g.
  TRADEFEED_BRIDGE_NATS__SERVERS='[\"nats://nats-broker:4222\"]'
  TRADEFEED_BRIDGE_LOG__FORMAT=json
Unknown keys, in the file or the environment, are refused. RUST_LOG, when
set, overrides log.level. Secrets never reach a log.

Exit status: 0 after a clean shutdown (SIGTERM, Ctrl-C); 1 when the bridge
fails while running (e.g. it gave up on NATS after nats.max_reconnects);
2 when the configuration is invalid."
)]
struct Cli {
    /// Configuration file (TOML); must exist.
    #[arg(
        long,
        short,
        global = true,
        env = "TRADEFEED_BRIDGE_CONFIG",
        default_value = "config/traderx.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Check the configuration (file and environment) without running:
    /// print every problem with its key path and exit 2, or a summary and the
    /// route table and exit 0.
    CheckConfig {
        /// Also print the effective configuration, defaults and environment
        /// overrides included, as TOML (secrets shown as ***).
        #[arg(long)]
        show: bool,
    },
    /// Exit 0 when a running bridge's /readyz answers 200 (for container
    /// health checks); the address comes from admin.listen unless given.
    Probe {
        /// The URL to ask, e.g. http://127.0.0.1:18097/readyz.
        #[arg(long)]
        url: Option<String>,
    },
    /// Ask a running bridge whether the legacy side is empty: exit 0 when no
    /// legacy client was connected or published and no route carried legacy
    /// traffic for the whole window, 1 (with the reasons) when not, 2 when
    /// the bridge cannot be asked.
    DecommissionCheck {
        /// The bridge's admin endpoint, e.g. http://tradefeed-bridge:18097
        #[arg(long)]
        admin_url: String,
        /// How long the legacy side must have been quiet (e.g. 10m, 1h).
        #[arg(long, default_value = "10m", value_parser = quiet_window)]
        quiet_for: std::time::Duration,
    },
    /// Scan a deployment tree for anything that still deploys, routes to or
    /// links trade-feed or the bridge: exit 0 when clean (Socket.IO
    /// libraries are warnings), 1 listing each file and line when not, 2
    /// when the tree, or a text file in it, cannot be read.
    PruneCheck {
        /// The deployment tree (or one file).
        path: PathBuf,
        /// A path inside the tree to leave out, relative to the tree or
        /// absolute (repeatable); one that names nothing there is an error.
        #[arg(long)]
        exclude: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { show } => check_config(&cli.config, show),
        Command::Run => run(&cli.config),
        Command::Probe { url } => probe(&cli.config, url),
        Command::DecommissionCheck {
            admin_url,
            quiet_for,
        } => decommission_check(&admin_url, quiet_for),
        Command::PruneCheck { path, exclude } => prune_check(&path, &exclude),
    }
}

/// `--quiet-for`: a humantime span, not zero (an empty window would call any
/// bridge ready, even one whose last legacy client left a second ago).
fn quiet_window(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("the window must be longer than 0, e.g. 10m or 24h".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn decommission_check(admin_url: &str, quiet_for: std::time::Duration) -> ExitCode {
    use tradefeed_bridge::decommission;
    match decommission::fetch(admin_url) {
        Ok(report) => {
            let verdict = decommission::evaluate(&report, quiet_for);
            if !emit(&decommission::render(
                admin_url, quiet_for, &report, &verdict,
            )) {
                return ExitCode::FAILURE;
            }
            if verdict.ready() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            reportln!("decommission-check: cannot check: {e}");
            ExitCode::from(2)
        }
    }
}

fn prune_check(path: &std::path::Path, exclude: &[PathBuf]) -> ExitCode {
    use tradefeed_bridge::prune;
    match prune::scan(path, exclude) {
        Ok(scan) => {
            if !emit(&prune::render(path, &scan)) {
                return ExitCode::FAILURE;
            }
            if scan.errors() > 0 {
                ExitCode::from(1)
            } else if scan.holes() > 0 {
                // Nothing found, but not everything could be looked at.
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            reportln!("prune-check: {e}");
            ExitCode::from(2)
        }
    }
}

fn probe(path: &std::path::Path, url: Option<String>) -> ExitCode {
    let url = match url {
        Some(u) => u,
        None => match config::load(path, false) {
            Ok(c) => tradefeed_bridge::probe::readyz_url(&c.admin.listen),
            Err(e) => {
                report!("{}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    match tradefeed_bridge::probe::probe(&url) {
        Ok(_) => ExitCode::SUCCESS,
        Err(why) => {
            reportln!("not ready: {why}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path, show: bool) -> ExitCode {
    match config::load(path, true) {
        Ok(c) => {
            let table = tradefeed_bridge::route::RouteTable::compile(&c.routes).expect("validated");
            let mut text = format!(
                "{}: configuration is valid\n{}\n{}",
                path.display(),
                c.summary(),
                table.describe()
            );
            if show {
                match c.to_toml() {
                    Ok(effective) => {
                        text.push_str("\n# effective configuration\n");
                        text.push_str(&effective);
                    }
                    Err(e) => {
                        reportln!("cannot print the configuration: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            if emit(&text) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            report!("{}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

/// Writes a report to standard output. A reader that stopped early (`| head`)
/// is not an error: the exit code still gives the verdict. Any other failure
/// to write is reported, and the caller exits non-zero, since a report that
/// did not arrive must not look like a pass.
fn emit(text: &str) -> bool {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            reportln!("cannot write to standard output: {e}");
            false
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let cfg = match config::load(path, true) {
        Ok(c) => c,
        Err(e) => {
            report!("{}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    tradefeed_bridge::telemetry::init_logging(&cfg.log, &cfg.secrets());
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            reportln!("cannot start the runtime: {e}");
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
