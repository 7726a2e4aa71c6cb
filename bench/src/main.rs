//! tfb-bench: puts tradefeed-bridge beside the legacy Node trade-feed and
//! NATS itself, in one run, under the same conditions, and reports ratios.
//!
//! It starts nats-server once, and for every case a fresh server under test
//! (the bridge or the hub) on free loopback ports, pinned with `taskset`.
//! The load generator is this process; `scripts/bench.sh` pins it too.

mod clients;
mod load;
mod msg;
mod procs;
mod report;
mod sio;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use load::{Side, Spec};
use procs::Setup;
use report::{CaseResult, Report, ScaleResult, Startup};

/// Benchmark tradefeed-bridge against the legacy hub and NATS.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The bridge binary (build it with --release for real figures).
    #[arg(long)]
    bridge_bin: PathBuf,
    #[arg(long, default_value = "config/traderx.toml")]
    bridge_config: PathBuf,
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,
    #[arg(long, default_value = "node")]
    node: PathBuf,
    /// The legacy hub (Node socket.io 4.8).
    #[arg(long, default_value = "tests/node/hub.js")]
    hub_script: PathBuf,
    /// CPUs for the server under test (`taskset -c` list; empty: no pinning).
    #[arg(long, default_value = "")]
    server_cpus: String,
    /// CPUs for nats-server.
    #[arg(long, default_value = "")]
    nats_cpus: String,
    /// CPUs this load generator runs on, for the report (the caller pins it).
    #[arg(long, default_value = "")]
    client_cpus: String,
    /// How long each case publishes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Longest wait for deliveries after the last send.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Shapes, publishers x subscribers.
    #[arg(long, value_delimiter = ',', default_value = "1x1,1x50,10x10")]
    shapes: Vec<String>,
    /// Aggregate rates in msg/s; `unlimited` (as fast as the server sustains,
    /// at most --window messages in flight) or `flood` (open loop: shows
    /// what the server sheds).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "unlimited,200,2000,20000"
    )]
    rates: Vec<String>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sio-sio,sio-nats,nats-sio,nats-nats"
    )]
    paths: Vec<String>,
    /// Messages in flight for `unlimited` publishers.
    #[arg(long, default_value_t = 2000)]
    window: u64,
    /// Servers under test for the Socket.IO -> Socket.IO path.
    #[arg(long, value_delimiter = ',', default_value = "bridge,hub")]
    targets: Vec<String>,
    /// Idle-client counts for the connection-scale test (`none` to skip).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    scale: Vec<String>,
    #[arg(long, default_value_t = 100)]
    scale_accounts: usize,
    /// Aggregate publish rate while the idle clients are connected.
    #[arg(long, default_value_t = 200)]
    scale_rate: u64,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    scale_duration: Duration,
    /// Start-to-ready and idle-RSS runs of the bridge.
    #[arg(long, default_value_t = 5)]
    startup_runs: usize,
    /// Results as JSON.
    #[arg(long)]
    out_json: PathBuf,
    /// Results as markdown.
    #[arg(long)]
    out_md: Option<PathBuf>,
    /// A document whose results section is replaced (docs/performance.md).
    #[arg(long)]
    doc: Option<PathBuf>,
    /// The command line to print in the report.
    #[arg(long)]
    command: Option<String>,
    /// Headers on every message of the load generator's NATS publishers, as
    /// a bridge puts them on its mirrors: 1 `Tradefeed-Bridge-Origin`, 2 and
    /// `Tradefeed-Legacy-Topic`, 3 and `Tradefeed-Legacy-From` (what the
    /// bridge sent before it dropped the last two). Shows what headers cost
    /// NATS subscribers.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
    nats_headers: u8,
    /// Extra environment for the bridge, KEY=VALUE (for experiments).
    #[arg(long)]
    bridge_env: Vec<String>,
    /// Where the servers' logs go (default: next to the JSON).
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    let log_dir = cli.log_dir.clone().unwrap_or_else(|| {
        cli.out_json
            .parent()
            .map(|p| p.join("logs"))
            .unwrap_or_else(|| PathBuf::from("logs"))
    });
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot create {}", log_dir.display()))?;
    let setup = Setup {
        bridge_bin: cli.bridge_bin.clone(),
        bridge_config: cli.bridge_config.clone(),
        nats_server: cli.nats_server.clone(),
        node: cli.node.clone(),
        hub_script: cli.hub_script.clone(),
        server_cpus: cli.server_cpus.clone(),
        nats_cpus: cli.nats_cpus.clone(),
        log_dir,
    };
    let bridge_env = parse_env(&cli.bridge_env)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let machine = report::machine(&cli.server_cpus, &cli.client_cpus, &cli.nats_cpus);
    let date = date_utc();
    let nats = procs::start_nats(&setup)?;
    eprintln!("bench: nats-server on {} (pid {})", nats.port, nats.pid());

    let startup = startup(&setup, &nats, &bridge_env, cli.startup_runs)?;
    let mut cases = Vec::new();
    for shape in &cli.shapes {
        let (p, s) = parse_shape(shape)?;
        for rate in &cli.rates {
            let rate = parse_rate(rate)?;
            for path in &cli.paths {
                for c in run_path(&cli, &setup, &rt, &nats, &bridge_env, path, (p, s), rate)? {
                    eprintln!("{}", summary(&c));
                    cases.push(c);
                }
            }
        }
    }
    let mut scale = Vec::new();
    for n in cli.scale.iter().filter(|n| !n.is_empty() && *n != "none") {
        let n: usize = n
            .parse()
            .with_context(|| format!("bad --scale count {n}"))?;
        for target in &cli.targets {
            let r = run_scale(&cli, &setup, &rt, &nats, &bridge_env, target, n)?;
            eprintln!(
                "bench: scale {target} {n} clients: rss idle {:.1} MB peak {:.1} MB, lost {} dup {}",
                r.outcome.procs[0].rss_idle_mb,
                r.outcome.procs[0].rss_peak_mb,
                r.outcome.lost,
                r.outcome.duplicated
            );
            scale.push(r);
        }
    }
    drop(nats);

    let checks = report::checks(&cases, &scale, &startup);
    let report = Report {
        date,
        command: cli
            .command
            .clone()
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" ")),
        machine,
        duration_s: started.elapsed().as_secs_f64(),
        cases,
        scale,
        startup,
        checks,
    };
    write_outputs(&cli, &report)
}

fn write_outputs(cli: &Cli, report: &Report) -> anyhow::Result<()> {
    if let Some(dir) = cli.out_json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cli.out_json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", cli.out_json.display()))?;
    let md = report::markdown(report);
    if let Some(p) = &cli.out_md {
        std::fs::write(p, &md).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(doc) = &cli.doc {
        report::update_doc(doc, &md)?;
    }
    for c in &report.checks {
        let met = match c.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "n/a",
        };
        eprintln!("bench: [{met}] {}: {}", c.target, c.measured);
    }
    eprintln!("bench: results in {}", cli.out_json.display());
    Ok(())
}

/// Runs one (path, shape, rate) on every server that serves the path.
#[allow(clippy::too_many_arguments)]
fn run_path(
    cli: &Cli,
    setup: &Setup,
    rt: &tokio::runtime::Runtime,
    nats: &procs::Server,
    bridge_env: &[(String, String)],
    path: &str,
    shape: (usize, usize),
    (rate, flood): (Option<u64>, bool),
) -> anyhow::Result<Vec<CaseResult>> {
    let (publish, subscribe) = match path {
        "sio-sio" => (Side::Sio, Side::Sio),
        "sio-nats" => (Side::Sio, Side::Nats),
        "nats-sio" => (Side::Nats, Side::Sio),
        "nats-nats" => (Side::Nats, Side::Nats),
        other => bail!("unknown path {other} (sio-sio, sio-nats, nats-sio, nats-nats)"),
    };
    let mut spec = Spec {
        publish,
        subscribe,
        publishers: shape.0,
        subscribers: shape.1,
        accounts: 1,
        rate,
        window: (!flood).then_some(cli.window),
        duration: cli.duration,
        drain: cli.drain,
        settle: Duration::from_millis(200),
        sio_port: 0,
        nats_port: nats.port,
        watch: vec![],
        connect_parallelism: 64,
        nats_headers: cli.nats_headers,
    };
    let targets: Vec<&str> = match path {
        "nats-nats" => vec!["nats"],
        "sio-sio" => cli.targets.iter().map(String::as_str).collect(),
        _ => vec!["bridge"],
    };
    let mut out = Vec::new();
    for target in targets {
        let (server, shed_port) = match target {
            "nats" => (None, None),
            "hub" => (Some(procs::start_hub(setup)?), None),
            "bridge" => {
                let (b, _) = procs::start_bridge(setup, nats.port, bridge_env)?;
                let admin = b.admin_port;
                (Some(b), Some(admin))
            }
            other => bail!("unknown target {other} (bridge, hub)"),
        };
        spec.watch = server
            .iter()
            .map(|s| (s.name.to_string(), s.pid()))
            .collect();
        if target != "hub" {
            spec.watch.push(("nats-server".into(), nats.pid()));
        }
        spec.sio_port = server.as_ref().map_or(0, |s| s.port);
        let outcome = rt
            .block_on(load::run(&spec))
            .with_context(|| format!("case {target} {path} {}x{} {rate:?}", shape.0, shape.1))?;
        // What the bridge counted as dropped on the way to these subscribers.
        let direction = match subscribe {
            Side::Sio => "direction=\"to_socketio\"",
            Side::Nats => "direction=\"to_nats\"",
        };
        // A full client buffer costs one delivery; any other drop (a full
        // queue, NATS down) costs the message, i.e. one delivery per subscriber.
        let shed = shed_port.map(|p| {
            let name = "tradefeed_bridge_messages_dropped_total";
            let all = procs::metric_sum(p, name, direction);
            let per_client = procs::metric_sum(p, name, "reason=\"client_buffer_full\"");
            per_client + (all - per_client) * shape.1 as f64
        });
        drop(server);
        out.push(CaseResult {
            target: target.to_string(),
            path: report::side_label(publish, subscribe).to_string(),
            publishers: shape.0,
            subscribers: shape.1,
            rate,
            flood,
            shed,
            outcome,
        });
    }
    Ok(out)
}

fn run_scale(
    cli: &Cli,
    setup: &Setup,
    rt: &tokio::runtime::Runtime,
    nats: &procs::Server,
    bridge_env: &[(String, String)],
    target: &str,
    clients: usize,
) -> anyhow::Result<ScaleResult> {
    let server = match target {
        "hub" => procs::start_hub(setup)?,
        "bridge" => procs::start_bridge(setup, nats.port, bridge_env)?.0,
        other => bail!("unknown target {other} (bridge, hub)"),
    };
    let accounts = cli.scale_accounts.clamp(1, clients.max(1));
    let spec = Spec {
        publish: Side::Sio,
        subscribe: Side::Sio,
        publishers: accounts,
        subscribers: clients,
        accounts,
        rate: Some(cli.scale_rate),
        window: None,
        duration: cli.scale_duration,
        drain: cli.drain,
        // Idle time before publishing, so the idle RSS is read at rest.
        settle: cli.scale_duration.min(Duration::from_secs(2)),
        sio_port: server.port,
        nats_port: nats.port,
        watch: vec![(server.name.to_string(), server.pid())],
        connect_parallelism: 32,
        nats_headers: 0,
    };
    let outcome = rt
        .block_on(load::run(&spec))
        .with_context(|| format!("scale {target} {clients}"))?;
    Ok(ScaleResult {
        target: target.to_string(),
        clients,
        accounts,
        rate: cli.scale_rate,
        outcome,
    })
}

/// Spawn to `/readyz` 200, and resident memory once ready and idle.
fn startup(
    setup: &Setup,
    nats: &procs::Server,
    env: &[(String, String)],
    runs: usize,
) -> anyhow::Result<Startup> {
    let mut s = Startup::default();
    for _ in 0..runs {
        let (b, ready) = procs::start_bridge(setup, nats.port, env)?;
        std::thread::sleep(Duration::from_secs(1));
        s.runs.push(ready.as_secs_f64() * 1000.0);
        s.idle_rss_mb
            .push(procs::rss_kb(b.pid()).unwrap_or(0) as f64 / 1024.0);
    }
    s.ready_ms_median = median(&s.runs);
    s.idle_rss_mb_median = median(&s.idle_rss_mb);
    eprintln!(
        "bench: start to ready {:.0} ms, idle RSS {:.1} MB (medians of {runs})",
        s.ready_ms_median, s.idle_rss_mb_median
    );
    Ok(s)
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summary(c: &CaseResult) -> String {
    let o = &c.outcome;
    format!(
        "bench: {:6} {:9} {:6} @{:9}: sent {} delivered {}/{} lost {} dup {} shed {} | {:.0} deliveries/s | p50 {:.2} p99 {:.2} max {:.2} ms | server cpu {:.0}% | client cpu {:.0}%",
        c.target,
        c.path,
        c.shape(),
        c.rate_label(),
        o.sent,
        o.delivered,
        o.expected,
        o.lost,
        o.duplicated,
        c.shed.map_or("-".into(), |v| format!("{v:.0}")),
        o.deliveries_per_sec,
        o.latency.p50_us as f64 / 1000.0,
        o.latency.p99_us as f64 / 1000.0,
        o.latency.max_us as f64 / 1000.0,
        o.procs.first().map_or(0.0, |p| p.cpu_pct),
        o.client_cpu_pct
    )
}

fn parse_shape(s: &str) -> anyhow::Result<(usize, usize)> {
    let (p, q) = s
        .split_once(['x', ':'])
        .with_context(|| format!("shape {s}: want PUBLISHERSxSUBSCRIBERS, e.g. 1x50"))?;
    let (p, q): (usize, usize) = (p.parse()?, q.parse()?);
    if p == 0 || q == 0 {
        bail!("shape {s}: at least one publisher and one subscriber");
    }
    Ok((p, q))
}

/// A rate option: (rate, flood).
fn parse_rate(s: &str) -> anyhow::Result<(Option<u64>, bool)> {
    match s {
        "unlimited" | "max" => Ok((None, false)),
        "flood" => Ok((None, true)),
        n => {
            let r: u64 = n.parse().with_context(|| format!("bad rate {n}"))?;
            if r == 0 {
                bail!("rate 0: use `unlimited` for no limit");
            }
            Ok((Some(r), false))
        }
    }
}

fn parse_env(kv: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    kv.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--bridge-env {s}: want KEY=VALUE"))
        })
        .collect()
}

/// `YYYY-MM-DD HH:MM UTC` without a date crate.
fn date_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (hh, mm) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
}
