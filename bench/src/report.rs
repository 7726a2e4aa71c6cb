//! The results of a run: JSON for machines, markdown for docs/performance.md,
//! and the targets checked as ratios within the run.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::load::{Outcome, Side};

/// One case of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// `bridge`, `hub` or `nats` (the NATS -> NATS floor).
    pub target: String,
    /// `sio-sio`, `sio-nats`, `nats-sio`, `nats-nats`.
    pub path: String,
    pub publishers: usize,
    pub subscribers: usize,
    /// Aggregate msg/s; `None` = unlimited (or a flood).
    pub rate: Option<u64>,
    /// Open loop: publishers never wait for the server.
    pub flood: bool,
    /// Deliveries the bridge counted as dropped, from
    /// `tradefeed_bridge_messages_dropped_total` in the subscribers'
    /// direction: a full client buffer is one delivery, any other drop one
    /// per subscriber.
    pub shed: Option<f64>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl CaseResult {
    pub fn shape(&self) -> String {
        format!("{}->{}", self.publishers, self.subscribers)
    }

    pub fn rate_label(&self) -> String {
        match (self.rate, self.flood) {
            (Some(r), _) => r.to_string(),
            (None, false) => "unlimited".into(),
            (None, true) => "flood".into(),
        }
    }

    fn server_usage(&self) -> (f64, f64) {
        self.outcome
            .procs
            .first()
            .map_or((0.0, 0.0), |p| (p.cpu_pct, p.rss_peak_mb))
    }

    fn nats_cpu(&self) -> Option<f64> {
        self.outcome
            .procs
            .iter()
            .find(|p| p.name == "nats-server")
            .map(|p| p.cpu_pct)
    }
}

/// Idle clients, one topic each, a light publish load.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    pub target: String,
    pub clients: usize,
    pub accounts: usize,
    pub rate: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Startup {
    pub runs: Vec<f64>,
    pub ready_ms_median: f64,
    pub idle_rss_mb: Vec<f64>,
    pub idle_rss_mb_median: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub loadavg_at_start: String,
    pub server_cpus: String,
    pub client_cpus: String,
    pub nats_cpus: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub duration_s: f64,
    pub cases: Vec<CaseResult>,
    pub scale: Vec<ScaleResult>,
    pub startup: Startup,
    pub checks: Vec<Check>,
}

pub fn machine(server: &str, client: &str, nats: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    Machine {
        cpus,
        cpu_model,
        kernel: read("/proc/sys/kernel/osrelease"),
        loadavg_at_start: read("/proc/loadavg"),
        server_cpus: server.into(),
        client_cpus: client.into(),
        nats_cpus: nats.into(),
    }
}

// ------------------------------------------------------------------ targets

fn find<'a>(
    cases: &'a [CaseResult],
    target: &str,
    path: &str,
    shape: (usize, usize),
    rate: Option<u64>,
) -> Option<&'a CaseResult> {
    cases.iter().find(|c| {
        c.target == target
            && c.path == path
            && (c.publishers, c.subscribers) == shape
            && c.rate == rate
            && !c.flood
    })
}

fn ratio(a: Option<&CaseResult>, b: Option<&CaseResult>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b.outcome.deliveries_per_sec > 0.0)
        .then(|| a.outcome.deliveries_per_sec / b.outcome.deliveries_per_sec)
}

/// Whether a rate-limited case asked for less than 80 % of what the same
/// server sustained without a limit.
pub fn below_saturation(c: &CaseResult, cases: &[CaseResult]) -> bool {
    let Some(rate) = c.rate else { return false };
    let owed = rate as f64 * c.subscribers as f64;
    find(
        cases,
        &c.target,
        &c.path,
        (c.publishers, c.subscribers),
        None,
    )
    .is_none_or(|u| owed <= 0.8 * u.outcome.deliveries_per_sec)
}

pub fn checks(cases: &[CaseResult], scale: &[ScaleResult], startup: &Startup) -> Vec<Check> {
    let mut out = Vec::new();
    let shapes = [(1, 1), (1, 50), (10, 10)];
    for shape in shapes {
        let hub = find(cases, "hub", "sio-sio", shape, None);
        let fan = ratio(find(cases, "bridge", "sio-sio", shape, None), hub);
        out.push(ratio_check(
            format!(
                "Socket.IO -> Socket.IO {}->{}: bridge/hub deliveries/s >= 4",
                shape.0, shape.1
            ),
            fan,
            4.0,
        ));
        for path in ["sio-nats", "nats-sio"] {
            let r = ratio(find(cases, "bridge", path, shape, None), hub);
            out.push(ratio_check(
                format!(
                    "{path} {}->{}: bridge/hub Socket.IO -> Socket.IO deliveries/s >= 4",
                    shape.0, shape.1
                ),
                r,
                4.0,
            ));
        }
    }
    let p99 =
        find(cases, "bridge", "sio-sio", (1, 50), Some(2000)).map(|c| c.outcome.latency.p99_us);
    out.push(Check {
        target: "Socket.IO -> Socket.IO 1->50 at 2,000 msg/s: bridge p99 < 20 ms".into(),
        measured: p99.map_or("not run".into(), |v| format!("{:.2} ms", v as f64 / 1000.0)),
        met: p99.map(|v| v < 20_000),
    });
    for shape in shapes {
        let floor = find(cases, "nats", "nats-nats", shape, Some(2000));
        for path in ["sio-nats", "nats-sio"] {
            let c = find(cases, "bridge", path, shape, Some(2000));
            let added = match (c, floor) {
                (Some(c), Some(f)) => {
                    Some(c.outcome.latency.p50_us as f64 - f.outcome.latency.p50_us as f64)
                }
                _ => None,
            };
            out.push(Check {
                target: format!(
                    "{path} {}->{} at 2,000 msg/s: p50 over NATS -> NATS <= 0.5 ms",
                    shape.0, shape.1
                ),
                measured: added.map_or("not run".into(), |a| format!("{:+.3} ms", a / 1000.0)),
                met: added.map(|a| a <= 500.0),
            });
        }
    }
    let at = |target: &str, n: usize| {
        scale
            .iter()
            .find(|s| s.target == target && s.clients == n)
            .and_then(|s| s.outcome.procs.first().map(|p| p.rss_peak_mb))
    };
    let (b, h) = (at("bridge", 10_000), at("hub", 10_000));
    out.push(Check {
        target: "10,000 idle WebSocket clients: bridge RSS <= 150 MB and below the hub's".into(),
        measured: match (b, h) {
            (Some(b), Some(h)) => format!("bridge {b:.1} MB, hub {h:.1} MB"),
            (Some(b), None) => format!("bridge {b:.1} MB, hub not run"),
            _ => "not run".into(),
        },
        met: b.map(|b| b <= 150.0 && h.is_none_or(|h| b < h)),
    });
    let has_startup = !startup.runs.is_empty();
    out.push(Check {
        target: "idle bridge RSS <= 15 MB".into(),
        measured: format!("{:.1} MB", startup.idle_rss_mb_median),
        met: has_startup.then_some(startup.idle_rss_mb_median <= 15.0),
    });
    out.push(Check {
        target: "bridge start to ready < 200 ms".into(),
        measured: format!("{:.0} ms (median)", startup.ready_ms_median),
        met: has_startup.then_some(startup.ready_ms_median < 200.0),
    });
    out.push(loss_check(cases, scale));
    out.push(shed_check(cases));
    out
}

fn ratio_check(target: String, r: Option<f64>, want: f64) -> Check {
    Check {
        target,
        measured: r.map_or("not run".into(), |r| format!("{r:.2}x")),
        met: r.map(|r| r >= want),
    }
}

fn loss_check(cases: &[CaseResult], scale: &[ScaleResult]) -> Check {
    let below: Vec<&CaseResult> = cases
        .iter()
        .filter(|c| c.target != "hub" && below_saturation(c, cases))
        .collect();
    let bad: Vec<String> = below
        .iter()
        .filter(|c| c.outcome.lost > 0 || c.outcome.duplicated > 0)
        .map(|c| format!("{} {} {} @{}", c.target, c.path, c.shape(), c.rate_label()))
        .chain(
            scale
                .iter()
                .filter(|s| {
                    s.target == "bridge" && (s.outcome.lost > 0 || s.outcome.duplicated > 0)
                })
                .map(|s| format!("scale {}", s.clients)),
        )
        .collect();
    Check {
        target: "bridge: zero lost, zero duplicated below saturation".into(),
        measured: if bad.is_empty() {
            format!("{} cases clean", below.len())
        } else {
            format!("loss or duplicates in: {}", bad.join(", "))
        },
        met: Some(bad.is_empty()),
    }
}

fn shed_check(cases: &[CaseResult]) -> Check {
    // Every message the bridge did not deliver must be in its dropped counter.
    let bad: Vec<String> = cases
        .iter()
        .filter(|c| c.target == "bridge")
        .filter(|c| c.outcome.lost as f64 > c.shed.unwrap_or(0.0))
        .map(|c| {
            format!(
                "{} {} @{}: lost {} counted {}",
                c.path,
                c.shape(),
                c.rate_label(),
                c.outcome.lost,
                c.shed.unwrap_or(0.0)
            )
        })
        .collect();
    let shed: f64 = cases.iter().filter_map(|c| c.shed).sum::<f64>() + 0.0;
    Check {
        target: "bridge: every message it sheds is counted".into(),
        measured: if bad.is_empty() {
            format!("{shed:.0} shed in all, each counted")
        } else {
            format!("uncounted: {}", bad.join("; "))
        },
        met: Some(bad.is_empty()),
    }
}

// ------------------------------------------------------------------ markdown

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn path_title(path: &str) -> &'static str {
    match path {
        "sio-sio" => "Socket.IO -> Socket.IO (fan-out through the rooms)",
        "sio-nats" => "Socket.IO -> NATS",
        "nats-sio" => "NATS -> Socket.IO",
        _ => "NATS -> NATS (the floor: nats-server alone)",
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "Run of {} ({:.0} s).\n", r.date, r.duration_s);
    let _ = writeln!(s, "- Command: `{}`", r.command);
    let _ = writeln!(
        s,
        "- Machine: {} CPUs, {}, Linux {}; load average at start {}",
        m.cpus, m.cpu_model, m.kernel, m.loadavg_at_start
    );
    let _ = writeln!(
        s,
        "- Pinning (`taskset -c`): server under test (bridge or hub) on CPU {}, load generator on CPU {}, nats-server on CPU {}\n",
        or_none(&m.server_cpus),
        or_none(&m.client_cpus),
        or_none(&m.nats_cpus)
    );
    let _ = writeln!(
        s,
        "### Targets\n\n| target | measured | met |\n|---|---|---|"
    );
    for c in &r.checks {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(s, "| {} | {} | {} |", c.target, c.measured, met);
    }
    for path in ["sio-sio", "sio-nats", "nats-sio", "nats-nats"] {
        let rows: Vec<&CaseResult> = r.cases.iter().filter(|c| c.path == path).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n### {}\n", path_title(path));
        let _ = writeln!(
            s,
            "| server | shape | rate | sent | delivered | lost | dup | shed | deliveries/s | p50 ms | p90 ms | p99 ms | max ms | server CPU % | server RSS MB | nats CPU % | client CPU % |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for c in rows {
            let o = &c.outcome;
            let (cpu, rss) = c.server_usage();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {:.0} | {:.1} | {} | {:.0} |",
                c.target,
                c.shape(),
                c.rate_label(),
                o.sent,
                o.delivered,
                o.lost,
                o.duplicated,
                c.shed.map_or("-".into(), |v| format!("{v:.0}")),
                o.deliveries_per_sec,
                ms(o.latency.p50_us),
                ms(o.latency.p90_us),
                ms(o.latency.p99_us),
                ms(o.latency.max_us),
                cpu,
                rss,
                c.nats_cpu().map_or("-".into(), |v| format!("{v:.0}")),
                o.client_cpu_pct
            );
        }
    }
    ratios_table(&mut s, &r.cases);
    if !r.scale.is_empty() {
        let _ = writeln!(
            s,
            "\n### Connection scale (idle WebSocket clients, one account topic each)\n"
        );
        let _ = writeln!(s, "| server | clients | accounts | rate msg/s | RSS idle MB | RSS peak MB | CPU % while publishing | delivered | lost | dup | p50 ms | p99 ms | max ms | connect s |");
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for x in &r.scale {
            let o = &x.outcome;
            let p = o.procs.first().cloned().unwrap_or_default();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {} | {} | {} | {} | {} | {} | {:.1} |",
                x.target,
                x.clients,
                x.accounts,
                x.rate,
                p.rss_idle_mb,
                p.rss_peak_mb,
                p.cpu_pct,
                o.delivered,
                o.lost,
                o.duplicated,
                ms(o.latency.p50_us),
                ms(o.latency.p99_us),
                ms(o.latency.max_us),
                o.connect_s
            );
        }
    }
    if !r.startup.runs.is_empty() {
        let _ = writeln!(
            s,
            "\n### Bridge start-up\n\n- spawn to `/readyz` 200: median {:.0} ms (runs: {})\n- idle RSS (ready, no client): median {:.1} MB (runs: {})",
            r.startup.ready_ms_median,
            join(&r.startup.runs, 0),
            r.startup.idle_rss_mb_median,
            join(&r.startup.idle_rss_mb, 1)
        );
    }
    s
}

fn ratios_table(s: &mut String, cases: &[CaseResult]) {
    let _ = writeln!(s, "\n### Ratios (same run)\n");
    let _ = writeln!(s, "| shape | rate | bridge/hub Socket.IO -> Socket.IO | Socket.IO -> NATS / hub | NATS -> Socket.IO / hub | p50 over floor, Socket.IO -> NATS | p50 over floor, NATS -> Socket.IO |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let mut keys: Vec<((usize, usize), Option<u64>)> = Vec::new();
    for c in cases.iter().filter(|c| !c.flood) {
        let k = ((c.publishers, c.subscribers), c.rate);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (shape, rate) in keys {
        let hub = find(cases, "hub", "sio-sio", shape, rate);
        let floor = find(cases, "nats", "nats-nats", shape, rate);
        let r = |path| {
            ratio(find(cases, "bridge", path, shape, rate), hub)
                .map_or("-".into(), |v| format!("{v:.2}x"))
        };
        let over = |path| match (find(cases, "bridge", path, shape, rate), floor) {
            (Some(c), Some(f)) => format!(
                "{:+.3} ms",
                (c.outcome.latency.p50_us as f64 - f.outcome.latency.p50_us as f64) / 1000.0
            ),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {}->{} | {} | {} | {} | {} | {} | {} |",
            shape.0,
            shape.1,
            rate.map_or("unlimited".into(), |r| r.to_string()),
            r("sio-sio"),
            r("sio-nats"),
            r("nats-sio"),
            over("sio-nats"),
            over("nats-sio")
        );
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "(not pinned)"
    } else {
        s
    }
}

fn join(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Marker lines in docs/performance.md between which the results go.
pub const BEGIN: &str = "<!-- bench:results:begin (written by scripts/bench.sh) -->";
pub const END: &str = "<!-- bench:results:end -->";

/// Replaces the results section of the performance document.
pub fn update_doc(doc: &Path, results_md: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(doc).with_context(|| format!("cannot read {}", doc.display()))?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        anyhow::bail!("{} has no `{BEGIN}` ... `{END}` section", doc.display());
    };
    let mut out = String::with_capacity(text.len() + results_md.len());
    out.push_str(&text[..b + BEGIN.len()]);
    out.push('\n');
    out.push_str(results_md);
    out.push_str(&text[e..]);
    std::fs::write(doc, out).with_context(|| format!("cannot write {}", doc.display()))
}

pub fn side_label(p: Side, s: Side) -> &'static str {
    match (p, s) {
        (Side::Sio, Side::Sio) => "sio-sio",
        (Side::Sio, Side::Nats) => "sio-nats",
        (Side::Nats, Side::Sio) => "nats-sio",
        (Side::Nats, Side::Nats) => "nats-nats",
    }
}
