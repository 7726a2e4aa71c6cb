//! The staged cutover, proven end to end with the TraderX role simulators of
//! `sim/` (trade-service, trade-processor, UI): every mix of legacy and NATS
//! participants, in server mode and in attach mode, live switches (and
//! rollbacks) of each participant while orders flow, and a legacy and a NATS
//! processor at once. Every run ends with the same checks:
//!
//! - every order booked exactly once, none unknown, none arriving late;
//! - every screen's blotter equal to the processor's positions and trades for
//!   its account, no message seen twice;
//! - the bridge's own counters (`/metrics`) equal to what the simulators saw.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ORDERS: u64 = 1000;
/// Orders per second and trade-service: brisk, as a busy trading day.
const RATE: u64 = 500;
/// How long every participant must stay quiet at the end (a late double).
const QUIET: Duration = Duration::from_millis(400);
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

const R_ORDERS: &str = "trade-orders";
const R_TRADES: &str = "account-trades";
const R_POSITIONS: &str = "account-positions";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bus {
    Legacy,
    Nats,
}

impl Bus {
    fn name(self) -> &'static str {
        match self {
            Bus::Legacy => "legacy",
            Bus::Nats => "nats",
        }
    }
}

use Bus::{Legacy, Nats as NatsBus};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Server,
    Attach,
}

// ------------------------------------------------------------------ the stage

/// NATS, the bridge and (attach mode) the legacy Node hub as trade-feed.
struct Stage {
    nats: Nats,
    hub: Option<Hub>,
    bridge: Bridge,
}

impl Stage {
    fn start(mode: Mode, legacy_consumers: bool) -> Stage {
        let nats = Nats::start();
        match mode {
            Mode::Server => {
                let bridge = Bridge::start(&nats);
                Stage {
                    nats,
                    hub: None,
                    bridge,
                }
            }
            Mode::Attach => {
                let hub = Hub::start();
                let bridge = Bridge::start_opts(
                    &nats,
                    BridgeOpts {
                        env: vec![
                            ("TRADEFEED_BRIDGE_MODE", "attach".into()),
                            ("TRADEFEED_BRIDGE_ATTACH__URL", hub.url()),
                            ("TRADEFEED_BRIDGE_ATTACH__LEASE", "false".into()),
                            (
                                "TRADEFEED_BRIDGE_ATTACH__LEGACY_CONSUMERS",
                                format!("{{{R_ORDERS}={legacy_consumers}}}"),
                            ),
                        ],
                        ..Default::default()
                    },
                );
                Stage {
                    nats,
                    hub: Some(hub),
                    bridge,
                }
            }
        }
    }

    /// Where legacy clients connect: the bridge (server mode) or trade-feed.
    fn legacy_url(&self) -> String {
        match &self.hub {
            Some(h) => h.url(),
            None => self.bridge.url(),
        }
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.bridge.admin_port)
    }

    fn sim(&self, role: &str, name: &str, extra: &[&str]) -> Sim {
        let mut cmd = Command::new("node");
        cmd.arg(root().join(format!("sim/{role}.js")))
            .args(["--legacy-url", &self.legacy_url()])
            .args(["--nats-url", &self.nats.url()])
            .args(extra);
        Sim(Agent::program(name, cmd))
    }

    /// Waits until the bridge is, or is not, in the orders' queue group.
    fn wait_member(&self, member: bool) {
        let want = if member { 1.0 } else { 0.0 };
        let deadline = Instant::now() + WAIT;
        while self
            .bridge
            .metric("tradefeed_bridge_queue_member", &[("route", R_ORDERS)])
            != want
        {
            assert!(
                Instant::now() < deadline,
                "the bridge did not {} the queue group; log:\n{}",
                if member { "join" } else { "leave" },
                self.bridge.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A simulator process (JSON lines on stdin/stdout, sim/README.md).
struct Sim(Agent);

impl Sim {
    fn send(&self, cmd: Value) -> u64 {
        self.0.send(cmd)
    }

    fn result(&self, seq: u64, timeout: Duration) -> Value {
        let ev = self.0.expect(&format!("reply {seq}"), timeout, |e| {
            e["seq"] == json!(seq) && (e["ev"] == "ok" || e["ev"] == "error")
        });
        assert_eq!(ev["ev"], "ok", "{}: {ev}", self.0.name);
        ev
    }

    fn call(&self, cmd: Value) -> Value {
        let seq = self.send(cmd);
        self.result(seq, RUN_TIMEOUT)
    }

    /// Like `call`, but a refusal (a wait that timed out) is returned, so the
    /// run can still report everything that is wrong.
    fn try_call(&self, cmd: Value) -> Result<Value, String> {
        let seq = self.send(cmd);
        let ev = self.0.expect(&format!("reply {seq}"), RUN_TIMEOUT, |e| {
            e["seq"] == json!(seq) && (e["ev"] == "ok" || e["ev"] == "error")
        });
        if ev["ev"] == "ok" {
            Ok(ev)
        } else {
            Err(format!("{}: {}", self.0.name, ev["message"]))
        }
    }

    fn report(&self) -> Value {
        self.call(json!({"cmd": "report"}))["report"].clone()
    }
}

// ------------------------------------------------------------------ the plan

#[derive(Clone, Copy, Debug)]
enum Switch {
    /// The processor moves once this many orders are booked.
    Processor { after: u64, from: Bus, to: Bus },
    /// Every screen moves once this many orders are booked.
    Ui { after: u64, to: Bus },
    /// The processor's NATS consumer stops once this many orders are booked
    /// (drained) and starts again after `down`: no consumer exists meanwhile.
    ProcessorOutage { after: u64, down: Duration },
}

struct Plan {
    mode: Mode,
    /// One trade-service per entry: its bus and where it switches (after
    /// how many of its orders, to which bus).
    services: Vec<(Bus, Vec<(u64, Bus)>)>,
    /// The processor's consumers at the start (two: both at once).
    processor: Vec<Bus>,
    ui: Bus,
    switches: Vec<Switch>,
    /// NATS trade-services publish again what the server reports nobody
    /// consumed (`--retry-unconsumed`).
    retry_unconsumed: bool,
}

impl Plan {
    fn fixed(mode: Mode, service: Bus, processor: Bus, ui: Bus) -> Plan {
        Plan {
            mode,
            services: vec![(service, vec![])],
            processor: vec![processor],
            ui,
            switches: vec![],
            retry_unconsumed: false,
        }
    }
}

/// What a run measured, for the printed summary.
#[derive(Default, Debug)]
struct Outcome {
    took: Duration,
    orders: u64,
    booked_legacy: u64,
    booked_nats: u64,
    requeued: f64,
    latency_ms: Vec<f64>,
    /// (publish time, publish-to-book latency) per order, epoch ms.
    timeline: Vec<(f64, f64)>,
    switches: Vec<Value>,
    stale: u64,
    overlap_discarded: u64,
    /// Orders the NATS server reported nobody consumed, and publishes again.
    unconsumed: u64,
    retried: u64,
}

impl Outcome {
    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.latency_ms.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return 0.0;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

fn run(plan: Plan) -> Outcome {
    let started = Instant::now();
    let stage = Stage::start(plan.mode, plan.processor.contains(&Legacy));
    let mode = match plan.mode {
        Mode::Server => "server",
        Mode::Attach => "attach",
    };
    let admin = stage.admin_url();
    let ui = stage.sim("ui", "ui", &[]);
    ui.call(json!({"cmd": "start", "bus": plan.ui.name()}));
    let processor = stage.sim(
        "trade-processor",
        "trade-processor",
        &["--admin-url", &admin, "--mode", mode],
    );
    for b in &plan.processor {
        processor.call(json!({"cmd": "add", "bus": b.name()}));
    }
    // The bridge competes in the queue group for legacy consumers: in server
    // mode once it sees the room's first member, in attach mode as declared.
    stage.wait_member(plan.processor.contains(&Legacy));

    let services: Vec<(Sim, u64)> = plan
        .services
        .iter()
        .enumerate()
        .map(|(i, (bus, switch_at))| {
            let id = format!("{}", (b'A' + i as u8) as char);
            let seed = (i + 1).to_string();
            let mut args = vec!["--run-id", &id, "--seed", &seed];
            if plan.retry_unconsumed {
                args.push("--retry-unconsumed");
            }
            let s = stage.sim("trade-service", &format!("trade-service-{id}"), &args);
            s.call(json!({"cmd": "start", "bus": bus.name()}));
            let at: Vec<Value> = switch_at
                .iter()
                .map(|(n, to)| json!({"n": n, "to": to.name()}))
                .collect();
            let seq = s.send(json!({"cmd": "run", "count": ORDERS, "rate": RATE, "switch_at": at}));
            (s, seq)
        })
        .collect();
    let total = ORDERS * services.len() as u64;

    let mut switched: Vec<Value> = Vec::new();
    for sw in &plan.switches {
        match *sw {
            Switch::Processor { after, from, to } => {
                processor.call(json!({"cmd": "wait", "booked": after, "timeout_ms": 30000}));
                let r =
                    processor.call(json!({"cmd": "switch", "from": from.name(), "to": to.name()}));
                switched.push(json!({"participant": "trade-processor", "result": r}));
            }
            Switch::ProcessorOutage { after, down } => {
                processor.call(json!({"cmd": "wait", "booked": after, "timeout_ms": 30000}));
                let t0 = Instant::now();
                processor.call(json!({"cmd": "remove", "bus": "nats"}));
                // The outage itself, not a wait for something.
                std::thread::sleep(down);
                processor.call(json!({"cmd": "add", "bus": "nats"}));
                switched.push(json!({"participant": "trade-processor outage", "result": {
                    "took_ms": t0.elapsed().as_secs_f64() * 1000.0,
                    "started_at": (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap()
                        - t0.elapsed()).as_secs_f64() * 1000.0,
                }}));
            }
            Switch::Ui { after, to } => {
                processor.call(json!({"cmd": "wait", "booked": after, "timeout_ms": 30000}));
                let r = ui.call(json!({"cmd": "switch", "to": to.name()}));
                switched.push(json!({"participant": "ui", "result": r}));
            }
        }
    }
    for (s, seq) in &services {
        s.result(*seq, RUN_TIMEOUT);
    }
    let mut incomplete = Vec::new();
    if let Err(e) = processor.try_call(json!({"cmd": "wait", "booked": total, "timeout_ms": 20000}))
    {
        incomplete.push(e);
    }
    processor.call(json!({"cmd": "settle"}));
    let p = processor.report();
    let mut expect = serde_json::Map::new();
    for (account, ids) in p["trades"].as_object().unwrap() {
        let n = ids.as_array().unwrap().len();
        expect.insert(account.clone(), json!({"trades": n, "positions": n}));
    }
    if let Err(e) = ui.try_call(json!({"cmd": "wait", "expect": expect, "timeout_ms": 20000})) {
        incomplete.push(e);
    }
    // Every participant stays quiet for a moment: a late double shows here.
    std::thread::sleep(QUIET);

    let svc: Vec<Value> = services.iter().map(|(s, _)| s.report()).collect();
    for r in &svc {
        for sw in r["switches"].as_array().into_iter().flatten() {
            switched.push(json!({"participant": "trade-service", "result": sw}));
        }
    }
    let p = processor.report();
    let u = ui.report();
    // The simulators are done; the bridge may still be counting what it
    // carried where no simulator waits for it (e.g. legacy updates on their
    // way to NATS with no NATS screen). Its counters must reach what the
    // simulators saw within a bound, and stay there for a quiet period.
    let check = |out: &mut Outcome| {
        let metrics = stage.bridge.admin("/metrics").1;
        verify(&plan, &svc, &p, &u, &metrics, out)
    };
    let fresh = || Outcome {
        took: started.elapsed(),
        orders: total,
        switches: switched.clone(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut out = fresh();
    let mut problems = check(&mut out);
    while !problems.is_empty()
        && problems.iter().all(|p| p.starts_with("bridge counter"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        out = fresh();
        problems = check(&mut out);
    }
    if problems.is_empty() {
        std::thread::sleep(QUIET);
        out = fresh();
        problems = check(&mut out);
    }
    problems.extend(incomplete);
    let summary = summary(&plan, &out);
    println!("{summary}");
    if std::env::var_os("CUTOVER_BRIDGE_LOG").is_some() {
        println!("{}", stage.bridge.log());
    }
    assert!(
        problems.is_empty(),
        "{summary}\n{} mismatch(es):\n  {}\nbridge log (tail):\n{}",
        problems.len(),
        problems.join("\n  "),
        tail(&stage.bridge.log(), 40)
    );
    out
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn summary(plan: &Plan, o: &Outcome) -> String {
    let services: Vec<&str> = plan.services.iter().map(|(b, _)| b.name()).collect();
    let processors: Vec<&str> = plan.processor.iter().map(|b| b.name()).collect();
    let mut s = format!(
        "cutover {:?} service={} processor={} ui={}: {} orders in {:.2} s; booked legacy {} / nats {}; \
         requeued {}; publish-to-book latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         stale positions ignored {}; overlap copies discarded {}; no consumer for {} (published again {})",
        plan.mode,
        services.join("+"),
        processors.join("+"),
        plan.ui.name(),
        o.orders,
        o.took.as_secs_f64(),
        o.booked_legacy,
        o.booked_nats,
        o.requeued,
        o.percentile(0.5),
        o.percentile(0.99),
        o.percentile(1.0),
        o.stale,
        o.overlap_discarded,
        o.unconsumed,
        o.retried,
    );
    for sw in &o.switches {
        let mut r = sw["result"].clone();
        if let Some(m) = r.as_object_mut() {
            m.remove("ev");
            m.remove("seq");
            m.remove("t");
        }
        // The gap: orders published while the participant was switching,
        // and how long they took to be booked.
        let from = r["started_at"].as_f64().unwrap_or(0.0);
        let to = from + r["took_ms"].as_f64().unwrap_or(0.0);
        let during: Vec<f64> = o
            .timeline
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, l)| *l)
            .collect();
        let max = during.iter().cloned().fold(0.0, f64::max);
        s.push_str(&format!(
            "\n  switch {} took {} ms: {} orders published meanwhile, the slowest booked after {:.1} ms; {}",
            sw["participant"],
            r["took_ms"],
            during.len(),
            max,
            r
        ));
    }
    s
}

// ------------------------------------------------------------------ the checks

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Compares what every participant saw, and the bridge's counters, with
/// what must hold; returns the mismatches.
fn verify(
    plan: &Plan,
    services: &[Value],
    p: &Value,
    ui: &Value,
    metrics: &str,
    out: &mut Outcome,
) -> Vec<String> {
    let mut bad = Vec::new();
    // --- every order booked exactly once
    let booked = p["orders"].as_object().cloned().unwrap_or_default();
    let mut sent_by = BTreeMap::new();
    for s in services {
        if n(&s["sent"]) != ORDERS {
            bad.push(format!(
                "a trade-service sent {} orders, not {ORDERS}",
                s["sent"]
            ));
        }
        out.unconsumed += s["unconsumed"].as_object().map_or(0, |m| m.len() as u64);
        out.retried += n(&s["retried"]);
        if let Some(l) = s["lost"].as_array().filter(|l| !l.is_empty()) {
            bad.push(format!(
                "a trade-service gave up on {} orders: {l:?}",
                l.len()
            ));
        }
        if !plan.retry_unconsumed && !s["unconsumed"].as_object().is_none_or(|m| m.is_empty()) {
            bad.push(format!(
                "the NATS server found no consumer for {} orders: {}",
                s["unconsumed"].as_object().unwrap().len(),
                s["unconsumed"]
            ));
        }
        for (id, v) in s["orders"].as_object().unwrap() {
            sent_by.insert(
                id.clone(),
                (v[0].as_str().unwrap().to_string(), v[1].as_f64().unwrap()),
            );
        }
    }
    let mut lost = Vec::new();
    let mut doubled = Vec::new();
    for (id, (_, t)) in &sent_by {
        match booked.get(id).and_then(Value::as_array) {
            None => lost.push(id.clone()),
            Some(b) if b.len() != 1 => doubled.push(format!("{id} x{}", b.len())),
            Some(b) => {
                let l = b[0][1].as_f64().unwrap() - t;
                out.latency_ms.push(l);
                out.timeline.push((*t, l));
            }
        }
    }
    if !lost.is_empty() {
        bad.push(format!(
            "{} orders never booked: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    if !doubled.is_empty() {
        bad.push(format!(
            "{} orders booked more than once: {:?}",
            doubled.len(),
            &doubled[..doubled.len().min(10)]
        ));
    }
    let unknown: Vec<&String> = booked
        .keys()
        .filter(|id| !sent_by.contains_key(*id))
        .collect();
    if !unknown.is_empty() {
        bad.push(format!(
            "{} booked orders nobody sent: {unknown:?}",
            unknown.len()
        ));
    }
    for key in ["ignored", "late"] {
        if n(&p[key]) != 0 {
            bad.push(format!("trade-processor: {key} = {}", p[key]));
        }
    }
    out.booked_legacy = n(&p["booked_by_bus"]["legacy"]);
    out.booked_nats = n(&p["booked_by_bus"]["nats"]);

    // --- every screen equal to the processor's book
    // Updates travel one path only with one processor and no move of the
    // processor or the screens: they must then arrive in order.
    let single_path = plan.processor.len() == 1
        && !plan
            .switches
            .iter()
            .any(|s| matches!(s, Switch::Processor { .. } | Switch::Ui { .. }));
    for screen in ui["screens"].as_array().unwrap() {
        let a = screen["account"].to_string();
        let book = &p["positions"][&a];
        let shown = &screen["positions"];
        if book.as_object().map(|b| b.len()) != shown.as_object().map(|s| s.len()) {
            bad.push(format!("account {a}: blotter {shown} != book {book}"));
        } else {
            for (security, pos) in book.as_object().unwrap() {
                if shown[security]["quantity"] != pos["quantity"]
                    || shown[security]["updated"] != pos["updated"]
                {
                    bad.push(format!(
                        "account {a} {security}: blotter {} != book {pos}",
                        shown[security]
                    ));
                }
            }
        }
        let want: HashSet<&str> = p["trades"][&a]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let got: HashSet<&str> = screen["trades"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if want != got {
            bad.push(format!(
                "account {a}: {} trades on screen, {} booked, {} missing, {} unknown",
                got.len(),
                want.len(),
                want.difference(&got).count(),
                got.difference(&want).count()
            ));
        }
        if let Some(d) = screen["duplicates"].as_array().filter(|d| !d.is_empty()) {
            bad.push(format!(
                "account {a}: {} messages seen twice: {:?}",
                d.len(),
                &d[..d.len().min(5)]
            ));
        }
        if n(&screen["foreign"]) != 0 {
            bad.push(format!(
                "account {a}: {} foreign messages",
                screen["foreign"]
            ));
        }
        out.stale += n(&screen["stale"]);
        out.overlap_discarded += n(&screen["overlap_discarded"]);
    }
    if single_path && out.stale != 0 {
        bad.push(format!(
            "{} position updates arrived out of order on a single path",
            out.stale
        ));
    }

    // --- the bridge's counters equal what the simulators saw
    let m = |name: &str, labels: &[(&str, &str)]| metric_value(metrics, name, labels);
    let fwd = |route: &str, dir: &str| {
        m(
            "tradefeed_bridge_messages_forwarded_total",
            &[("route", route), ("direction", dir)],
        )
    };
    let mut legacy_to_nats = 0u64; // legacy orders a NATS consumer booked
    let mut nats_to_legacy = 0u64; // NATS orders the legacy consumer booked
    let mut legacy_to_legacy = 0u64;
    let mut from_legacy = 0u64;
    for (id, (sent, _)) in &sent_by {
        let Some(by) = booked.get(id).and_then(|b| b[0][0].as_str()) else {
            continue;
        };
        match (sent.as_str(), by) {
            ("legacy", "nats") => legacy_to_nats += 1,
            ("nats", "legacy") => nats_to_legacy += 1,
            ("legacy", "legacy") => legacy_to_legacy += 1,
            _ => {}
        }
        if sent == "legacy" {
            from_legacy += 1;
        }
    }
    let mut expect: Vec<(String, f64, f64)> = Vec::new();
    match plan.mode {
        Mode::Server => {
            // Every legacy order goes to NATS; every order the legacy
            // consumer books comes from the bridge's queue member.
            expect.push((
                format!("forwarded {R_ORDERS} to_nats"),
                fwd(R_ORDERS, "to_nats"),
                from_legacy as f64,
            ));
            expect.push((
                format!("forwarded {R_ORDERS} to_socketio"),
                fwd(R_ORDERS, "to_socketio"),
                (legacy_to_legacy + nats_to_legacy) as f64,
            ));
        }
        Mode::Attach => {
            // trade-feed hands legacy orders to its own consumers; the bridge
            // carries only what crosses.
            expect.push((
                format!("forwarded {R_ORDERS} to_nats"),
                fwd(R_ORDERS, "to_nats"),
                legacy_to_nats as f64,
            ));
            expect.push((
                format!("forwarded {R_ORDERS} to_socketio"),
                fwd(R_ORDERS, "to_socketio"),
                nats_to_legacy as f64,
            ));
            expect.push((
                "suppressed consumed_on_trade_feed".into(),
                m(
                    "tradefeed_bridge_messages_suppressed_total",
                    &[("route", R_ORDERS), ("reason", "consumed_on_trade_feed")],
                ),
                legacy_to_legacy as f64,
            ));
        }
    }
    for (route, key) in [(R_TRADES, "trades"), (R_POSITIONS, "positions")] {
        expect.push((
            format!("forwarded {route} to_nats"),
            fwd(route, "to_nats"),
            n(&p["published"]["legacy"][key]) as f64,
        ));
        expect.push((
            format!("forwarded {route} to_socketio"),
            fwd(route, "to_socketio"),
            n(&p["published"]["nats"][key]) as f64,
        ));
    }
    if plan.mode == Mode::Server {
        // Delivered: one per legacy client reached. The legacy processor is
        // the only member of /trades; the screens the only subscribers of
        // the account topics.
        let delivered = |route: &str| {
            m(
                "tradefeed_bridge_messages_delivered_total",
                &[("route", route), ("direction", "to_socketio")],
            )
        };
        expect.push((
            format!("delivered {R_ORDERS}"),
            delivered(R_ORDERS),
            out.booked_legacy as f64,
        ));
        if single_path {
            // Every screen a legacy one for the whole run, or none.
            let on_legacy: u64 = ui["screens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| n(&s["received"]["legacy"]))
                .sum();
            let from_nats = if plan.processor == [NatsBus] {
                on_legacy
            } else {
                0
            };
            expect.push((
                "delivered account updates".into(),
                delivered(R_TRADES) + delivered(R_POSITIONS),
                from_nats as f64,
            ));
        }
    }
    if plan.mode == Mode::Attach {
        // trade-feed sends the bridge each of its own publishes back once.
        let to_legacy: f64 = [R_ORDERS, R_TRADES, R_POSITIONS]
            .iter()
            .map(|r| fwd(r, "to_socketio"))
            .sum();
        expect.push((
            "own echoes suppressed".into(),
            m(
                "tradefeed_bridge_messages_suppressed_total",
                &[("direction", "to_nats"), ("reason", "own_echo")],
            ) + m(
                "tradefeed_bridge_messages_suppressed_total",
                &[("direction", "to_nats"), ("reason", "own_echo_id")],
            ),
            to_legacy,
        ));
    }
    expect.push((
        "dropped (any reason)".into(),
        m("tradefeed_bridge_messages_dropped_total", &[]),
        0.0,
    ));
    expect.push((
        "rejected (any reason)".into(),
        m("tradefeed_bridge_messages_rejected_total", &[]),
        0.0,
    ));
    for (what, got, want) in expect {
        if got != want {
            bad.push(format!(
                "bridge counter {what} = {got}, the simulators saw {want}"
            ));
        }
    }
    out.requeued = m("tradefeed_bridge_messages_requeued_total", &[]);
    bad
}

// ------------------------------------------------------------------ the matrix

macro_rules! matrix {
    ($($name:ident: $mode:expr, $service:expr, $processor:expr, $ui:expr;)*) => {$(
        #[test]
        fn $name() {
            run(Plan::fixed($mode, $service, $processor, $ui));
        }
    )*};
}

matrix! {
    server_legacy_legacy_legacy: Mode::Server, Legacy, Legacy, Legacy;
    server_nats_legacy_legacy: Mode::Server, NatsBus, Legacy, Legacy;
    server_legacy_nats_legacy: Mode::Server, Legacy, NatsBus, Legacy;
    server_nats_nats_legacy: Mode::Server, NatsBus, NatsBus, Legacy;
    server_legacy_legacy_nats: Mode::Server, Legacy, Legacy, NatsBus;
    server_nats_legacy_nats: Mode::Server, NatsBus, Legacy, NatsBus;
    server_legacy_nats_nats: Mode::Server, Legacy, NatsBus, NatsBus;
    server_nats_nats_nats: Mode::Server, NatsBus, NatsBus, NatsBus;
    attach_legacy_legacy_legacy: Mode::Attach, Legacy, Legacy, Legacy;
    attach_nats_legacy_legacy: Mode::Attach, NatsBus, Legacy, Legacy;
    attach_legacy_nats_legacy: Mode::Attach, Legacy, NatsBus, Legacy;
    attach_nats_nats_legacy: Mode::Attach, NatsBus, NatsBus, Legacy;
    attach_legacy_legacy_nats: Mode::Attach, Legacy, Legacy, NatsBus;
    attach_nats_legacy_nats: Mode::Attach, NatsBus, Legacy, NatsBus;
    attach_legacy_nats_nats: Mode::Attach, Legacy, NatsBus, NatsBus;
    attach_nats_nats_nats: Mode::Attach, NatsBus, NatsBus, NatsBus;
}

// ------------------------------------------------------------------ live switches

/// trade-service moves to NATS a third of the way through and back to
/// legacy at two thirds (a rollback), while orders flow.
fn service_switch(mode: Mode, processor: Bus, ui: Bus) {
    run(Plan {
        mode,
        services: vec![(
            Legacy,
            vec![(ORDERS / 3, NatsBus), (2 * ORDERS / 3, Legacy)],
        )],
        processor: vec![processor],
        ui,
        switches: vec![],
        retry_unconsumed: false,
    });
}

/// trade-processor moves to NATS once a third of the orders are booked,
/// and back at two thirds, while orders flow: the new consumer starts, the
/// bridge is told (attach mode) or checked (server mode), the old one drains.
fn processor_switch(mode: Mode, service: Bus, ui: Bus) {
    run(Plan {
        mode,
        services: vec![(service, vec![])],
        processor: vec![Legacy],
        ui,
        switches: vec![
            Switch::Processor {
                after: ORDERS / 3,
                from: Legacy,
                to: NatsBus,
            },
            Switch::Processor {
                after: 2 * ORDERS / 3,
                from: NatsBus,
                to: Legacy,
            },
        ],
        retry_unconsumed: false,
    });
}

/// Every screen moves to NATS once a third of the orders are booked, and
/// back at two thirds: subscribe on the new bus, then leave the old one.
fn ui_switch(mode: Mode, service: Bus, processor: Bus) {
    let out = run(Plan {
        mode,
        services: vec![(service, vec![])],
        processor: vec![processor],
        ui: Legacy,
        switches: vec![
            Switch::Ui {
                after: ORDERS / 3,
                to: NatsBus,
            },
            Switch::Ui {
                after: 2 * ORDERS / 3,
                to: Legacy,
            },
        ],
        retry_unconsumed: false,
    });
    assert_eq!(out.switches.len(), 2);
}

#[test]
fn server_service_switches_to_nats_and_back() {
    service_switch(Mode::Server, NatsBus, Legacy);
}

#[test]
fn attach_service_switches_to_nats_and_back() {
    service_switch(Mode::Attach, Legacy, NatsBus);
}

#[test]
fn server_processor_switches_to_nats_and_back() {
    // Legacy orders: every one crosses NATS, to either processor.
    processor_switch(Mode::Server, Legacy, NatsBus);
}

#[test]
fn server_processor_switches_with_nats_producer() {
    processor_switch(Mode::Server, NatsBus, Legacy);
}

#[test]
fn attach_processor_switches_to_nats_and_back() {
    // In attach mode the procedure holds with the producer already on NATS
    // (the staged order): see the README for the legacy producer's window.
    processor_switch(Mode::Attach, NatsBus, Legacy);
}

#[test]
fn server_ui_switches_to_nats_and_back() {
    ui_switch(Mode::Server, NatsBus, Legacy);
}

#[test]
fn attach_ui_switches_to_nats_and_back() {
    ui_switch(Mode::Attach, Legacy, NatsBus);
}

// ------------------------------------------------------------------ both processors

/// A legacy and a NATS processor at once, fed by a legacy and a NATS
/// trade-service: every order booked once by one of them.
fn both_processors(mode: Mode) {
    let out = run(Plan {
        mode,
        services: vec![(Legacy, vec![]), (NatsBus, vec![])],
        processor: vec![Legacy, NatsBus],
        ui: NatsBus,
        switches: vec![],
        retry_unconsumed: false,
    });
    println!(
        "split {:?}: legacy processor booked {} ({:.0} %), NATS processor {} ({:.0} %)",
        mode,
        out.booked_legacy,
        100.0 * out.booked_legacy as f64 / out.orders as f64,
        out.booked_nats,
        100.0 * out.booked_nats as f64 / out.orders as f64
    );
    // The queue group shares NATS-borne orders at random: each side gets a
    // fair part of them.
    assert!(
        out.booked_legacy >= ORDERS / 4,
        "legacy booked {}",
        out.booked_legacy
    );
    assert!(
        out.booked_nats >= ORDERS / 4,
        "NATS booked {}",
        out.booked_nats
    );
}

#[test]
fn server_two_processors_at_once() {
    both_processors(Mode::Server);
}

#[test]
fn attach_two_processors_at_once() {
    both_processors(Mode::Attach);
}

// ------------------------------------------------------------------ the smoke script

fn smoke(args: &[&str]) -> (i32, String) {
    let out = Command::new("bash")
        .arg(root().join("scripts/smoke.sh"))
        .args(args)
        .env("SMOKE_BRIDGE_BIN", bridge_bin())
        .env("NATS_SERVER_BIN", nats_server_bin())
        .env_remove("RUST_LOG")
        .output()
        .expect("bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn smoke_script_server_mode_processor_stage() {
    let (code, text) = smoke(&[
        "--mode",
        "server",
        "--stage",
        "processor",
        "--orders",
        "300",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("trade-service=nats trade-processor=nats ui=legacy"),
        "{text}"
    );
    assert!(text.contains("sent 300, booked 300"), "{text}");
    assert!(text.contains("RESULT: PASS"), "{text}");
}

#[test]
fn smoke_script_attach_mode_producer_stage() {
    let (code, text) = smoke(&["--mode", "attach", "--stage", "producer", "--orders", "300"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("attach mode: trade-service=nats trade-processor=legacy ui=legacy"),
        "{text}"
    );
    assert!(text.contains("RESULT: PASS"), "{text}");
}

/// Against a running bridge and NATS: a stage that holds passes (counters
/// compared as differences, so a second run on the same bridge passes too);
/// a bridge whose subjects differ from what the services use fails.
#[test]
fn smoke_script_gates_a_running_deployment() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let admin = format!("http://127.0.0.1:{}", bridge.admin_port);
    for stage in ["introduce", "producer"] {
        let (code, text) = smoke(&[
            "--stage",
            stage,
            "--orders",
            "200",
            "--bridge-url",
            &bridge.url(),
            "--admin-url",
            &admin,
            "--nats-url",
            &nats.url(),
        ]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("RESULT: PASS"), "{text}");
    }
    // A bridge on the verbatim subjects while the NATS processor publishes
    // on the state 006 subjects: the legacy screens stay empty.
    let verbatim = Bridge::start_opts(
        &nats,
        BridgeOpts {
            config: root().join("config/traderx-verbatim.toml"),
            ..Default::default()
        },
    );
    let admin = format!("http://127.0.0.1:{}", verbatim.admin_port);
    let (code, text) = smoke(&[
        "--stage",
        "processor",
        "--orders",
        "50",
        "--timeout",
        "3",
        "--subjects",
        "spec",
        "--bridge-url",
        &verbatim.url(),
        "--admin-url",
        &admin,
        "--nats-url",
        &nats.url(),
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("RESULT: FAIL"), "{text}");
    assert!(text.contains("trades on screen"), "{text}");
    // Attach mode checks the declaration instead of changing it: a legacy
    // processor while the bridge is told there is none.
    let attach = Stage::start(Mode::Attach, false);
    let (code, text) = smoke(&[
        "--mode",
        "attach",
        "--stage",
        "introduce",
        "--trade-feed-url",
        &attach.legacy_url(),
        "--admin-url",
        &attach.admin_url(),
        "--nats-url",
        &attach.nats.url(),
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("declare it first"), "{text}");
}

#[test]
fn smoke_script_documents_its_interface() {
    let (code, text) = smoke(&["--help"]);
    assert_eq!(code, 0);
    for opt in [
        "--mode server|attach",
        "--stage introduce|producer|processor|browser",
        "--service",
        "--processor",
        "--ui",
        "--orders",
        "--bridge-url",
        "--admin-url",
        "--nats-url",
        "--accounts",
        "--ui-nats-url",
    ] {
        assert!(text.contains(opt), "--help does not mention {opt}");
    }
    let (code, text) = smoke(&["--stage", "cutover"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--stage must be"), "{text}");
    let (code, text) = smoke(&["--accounts", "22214,IBM"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--accounts must be account ids"), "{text}");
    let (code, text) = smoke(&["--ui-nats-url", "http://ingress/nats-ws"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--ui-nats-url must be"), "{text}");
}

// ------------------------------------------------------------------ no consumer anywhere

/// Orders published while no processor exists anywhere: the bridge counts
/// and logs each legacy one as undeliverable; a NATS one never reaches the
/// bridge, and only its producer learns of it (the server's "no responders"
/// answer to its reply subject).
fn no_processor_anywhere(mode: Mode) {
    let stage = Stage::start(mode, false);
    let legacy = stage.sim("trade-service", "trade-service-L", &["--run-id", "L"]);
    legacy.call(json!({"cmd": "start", "bus": "legacy"}));
    legacy.call(json!({"cmd": "run", "count": 20, "rate": 200}));
    let nats = stage.sim("trade-service", "trade-service-N", &["--run-id", "N"]);
    nats.call(json!({"cmd": "start", "bus": "nats"}));
    nats.call(json!({"cmd": "run", "count": 20, "rate": 200}));
    let undeliverable = || {
        stage.bridge.metric(
            "tradefeed_bridge_messages_dropped_total",
            &[("route", R_ORDERS), ("reason", "undeliverable")],
        )
    };
    let deadline = Instant::now() + WAIT;
    while undeliverable() < 20.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(QUIET);
    assert_eq!(undeliverable(), 20.0, "{}", stage.bridge.log());
    assert!(stage.bridge.log().contains("reached no consumer"));
    let r = nats.report();
    assert_eq!(r["unconsumed"].as_object().unwrap().len(), 20, "{r}");
    assert!(r["unconsumed"]
        .as_object()
        .unwrap()
        .values()
        .all(|v| v == 1));
    assert_eq!(legacy.report()["unconsumed"], json!({}));
}

#[test]
fn server_order_without_any_processor_is_undeliverable() {
    no_processor_anywhere(Mode::Server);
}

#[test]
fn attach_order_without_any_processor_is_undeliverable() {
    no_processor_anywhere(Mode::Attach);
}

/// NATS core keeps no history: with every processor gone for a moment, a
/// NATS order is lost unless its producer publishes it again on the
/// server's "no responders" answer, which is safe (nobody got it). With
/// that, a processor outage in the middle of a run loses and doubles
/// nothing.
#[test]
fn nats_producer_retries_through_a_processor_outage() {
    let out = run(Plan {
        mode: Mode::Server,
        services: vec![(NatsBus, vec![])],
        processor: vec![NatsBus],
        ui: Legacy,
        switches: vec![Switch::ProcessorOutage {
            after: ORDERS / 3,
            down: Duration::from_millis(300),
        }],
        retry_unconsumed: true,
    });
    assert!(
        out.unconsumed > 0,
        "the outage left no order without a consumer"
    );
    assert!(out.retried >= out.unconsumed);
}

// ------------------------------------------------------------------ draining a legacy processor from the bridge

/// Server mode, a legacy processor that cannot drain itself (TraderX's Java
/// subscriber never unsubscribes; it just stops): with a NATS processor
/// beside it, the operator declares the route without legacy consumers
/// (`PUT /api/legacy-consumers/trade-orders false`), waits for
/// `tradefeed_bridge_queue_member` to read 0, lets the legacy processor
/// finish what it was handed, and kills it. Orders flow all along: each is
/// booked exactly once, and none reaches the legacy room after the gauge
/// reads 0. Declaring `true` again brings the bridge back into the group.
#[test]
fn server_drains_a_legacy_processor_that_cannot_drain_itself() {
    let stage = Stage::start(Mode::Server, true);
    let admin = stage.admin_url();
    let legacy = stage.sim("trade-processor", "trade-processor-legacy", &[]);
    legacy.call(json!({"cmd": "add", "bus": "legacy"}));
    stage.wait_member(true);
    let nats = stage.sim("trade-processor", "trade-processor-nats", &[]);
    nats.call(json!({"cmd": "add", "bus": "nats"}));
    let service = stage.sim("trade-service", "trade-service", &["--run-id", "D"]);
    service.call(json!({"cmd": "start", "bus": "nats"}));
    let run = service.send(json!({"cmd": "run", "count": 1500, "rate": 500}));
    nats.call(json!({"cmd": "wait", "booked": 150, "timeout_ms": 20000}));
    assert!(
        n(&legacy.report()["booked"]) > 0,
        "the legacy processor got no share of the orders"
    );

    assert_eq!(declare(&admin, R_ORDERS, false).0, 200);
    stage.wait_member(false);
    // The gauge reads 0 once the bridge handed the room all it had taken:
    // the legacy processor gets those, then nothing more.
    let handed = |s: &Stage| {
        s.bridge.metric(
            "tradefeed_bridge_messages_forwarded_total",
            &[("route", R_ORDERS), ("direction", "to_socketio")],
        ) as u64
    };
    let at_zero = handed(&stage);
    let deadline = Instant::now() + WAIT;
    while n(&legacy.report()["booked"]) < at_zero {
        assert!(
            Instant::now() < deadline,
            "the legacy processor did not book what it was handed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let legacy_report = legacy.report();
    let mut legacy = legacy;
    legacy.0.kill(); // stops as the Java subscriber does: no unsubscribe, no notice
    nats.call(json!({"cmd": "wait", "booked": 400, "timeout_ms": 20000}));
    assert_eq!(
        handed(&stage),
        at_zero,
        "orders reached the legacy room after the gauge read 0"
    );

    service.result(run, RUN_TIMEOUT);
    let s = service.report();
    let sent = s["orders"].as_object().unwrap().len();
    assert_eq!(sent, 1500);
    assert_eq!(s["unconsumed"], json!({}), "{}", s["unconsumed"]);
    let _ = nats.try_call(
        json!({"cmd": "wait", "booked": 1500 - n(&legacy_report["booked"]), "timeout_ms": 20000}),
    );
    let nats_report = nats.report();
    let bookings = bookings([legacy_report, nats_report]);
    let lost: Vec<&String> = s["orders"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|id| !bookings.contains_key(*id))
        .collect();
    let doubled: Vec<_> = bookings.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        lost.is_empty(),
        "{} orders lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        doubled.is_empty(),
        "orders booked more than once: {doubled:?}"
    );
    assert_eq!(bookings.len(), 1500);
    assert!(stage
        .bridge
        .log()
        .contains("left the queue group: declared without legacy consumers"));

    // Back: a legacy consumer takes part again once declared present.
    let again = stage.sim("trade-processor", "trade-processor-legacy-2", &[]);
    again.call(json!({"cmd": "add", "bus": "legacy"}));
    assert_eq!(declare(&admin, R_ORDERS, true).0, 200);
    stage.wait_member(true);
    // An unknown route is refused in server mode too.
    let (status, body) = declare(&admin, "no-such-route", false);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("no point-to-point route named no-such-route"),
        "{body}"
    );
}

/// How many times each order was booked, over processors' reports.
fn bookings(reports: impl IntoIterator<Item = Value>) -> BTreeMap<String, usize> {
    let mut booked: BTreeMap<String, usize> = BTreeMap::new();
    for r in reports {
        for (id, b) in r["orders"].as_object().unwrap() {
            *booked.entry(id.clone()).or_default() += b.as_array().unwrap().len();
        }
    }
    booked
}

/// `PUT /api/legacy-consumers/<route>` with `present`: (status, body).
fn declare(admin: &str, route: &str, present: bool) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .put(format!("{admin}/api/legacy-consumers/{route}"))
        .header("content-type", "application/json")
        .send(present.to_string())
        .expect("PUT");
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

// ------------------------------------------------------------------ an order given back while no consumer exists

/// Server mode, a legacy processor alone, a NATS trade-service. The
/// processor drains properly (unsubscribe, its leave notice, disconnect)
/// and comes back, again and again while orders flow. The orders the
/// bridge had taken for it and gives back to the group find no consumer:
/// the server's "no responders" answer goes to the bridge (it published
/// them), so the bridge publishes them again until the processor is back.
/// Every order is booked once and none is counted undeliverable.
#[test]
fn an_order_given_back_while_no_consumer_exists_is_published_again_until_one_takes_it() {
    let stage = Stage::start(Mode::Server, true);
    let processor = stage.sim("trade-processor", "trade-processor", &[]);
    let service = stage.sim(
        "trade-service",
        "trade-service",
        &["--run-id", "S", "--retry-unconsumed"],
    );
    service.call(json!({"cmd": "start", "bus": "nats"}));
    processor.call(json!({"cmd": "add", "bus": "legacy"}));
    stage.wait_member(true);
    // The producer retries what it is told nobody took (the moments with
    // no member at all); what the bridge gave back, the bridge retries.
    let run = service.send(json!({"cmd": "run", "count": 30000, "rate": 3000}));
    processor.call(json!({"cmd": "wait", "booked": 200, "timeout_ms": 30000}));
    let requeued = || {
        stage.bridge.metric(
            "tradefeed_bridge_messages_requeued_total",
            &[("route", R_ORDERS)],
        )
    };
    let t0 = Instant::now();
    let mut cycles = 0;
    while cycles < 25 && t0.elapsed() < Duration::from_secs(12) && requeued() == 0.0 {
        processor.call(json!({"cmd": "remove", "bus": "legacy"}));
        std::thread::sleep(Duration::from_millis(30));
        processor.call(json!({"cmd": "add", "bus": "legacy"}));
        stage.wait_member(true);
        std::thread::sleep(Duration::from_millis(60));
        cycles += 1;
    }
    service.send(json!({"cmd": "stop"}));
    service.result(run, RUN_TIMEOUT);
    let _ = processor.try_call(json!({"cmd": "wait", "booked": 1_000_000, "timeout_ms": 1500}));
    let s = service.report();
    let p = processor.report();
    let sent = s["orders"].as_object().cloned().unwrap_or_default();
    let booked = p["orders"].as_object().cloned().unwrap_or_default();
    let missing: Vec<&String> = sent.keys().filter(|id| !booked.contains_key(*id)).collect();
    let doubled: Vec<&String> = booked
        .iter()
        .filter(|(_, b)| b.as_array().is_some_and(|b| b.len() > 1))
        .map(|(id, _)| id)
        .collect();
    let undeliverable = stage.bridge.metric(
        "tradefeed_bridge_messages_dropped_total",
        &[("route", R_ORDERS), ("reason", "undeliverable")],
    );
    assert!(
        requeued() > 0.0,
        "in {cycles} drains the bridge gave no order back"
    );
    assert!(
        missing.is_empty() && doubled.is_empty() && undeliverable == 0.0,
        "after {cycles} drains: {} orders never booked {:?}, {} doubled; requeued {}, undeliverable {undeliverable}, retried {}",
        missing.len(),
        &missing[..missing.len().min(10)],
        doubled.len(),
        requeued(),
        s["retried"]
    );
}

// ------------------------------------------------------------------ attach mode: trade-feed goes away

/// Attach mode, a NATS trade-service, a NATS processor throughout and a
/// legacy processor on trade-feed, the bridge's path to trade-feed lagging
/// 150 ms each way (so many orders are on their way to trade-feed at any
/// moment). trade-feed dies mid-flow and stays down: the orders the group
/// had handed the bridge for it go back to the group, where the NATS
/// processor books them. None is lost; the only doubles allowed are orders
/// the bridge had sent to trade-feed and not seen echoed, which trade-feed
/// may have handed to its processor before it died (the bridge says how
/// many in its log).
#[test]
fn attach_orders_taken_for_a_trade_feed_that_died_go_back_to_nats_processors() {
    let nats = Nats::start();
    let mut hub = Hub::start();
    let proxy = DelayProxy::start(hub.port, Duration::from_millis(150));
    let bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: vec![
                ("TRADEFEED_BRIDGE_MODE", "attach".into()),
                ("TRADEFEED_BRIDGE_ATTACH__URL", proxy.url("http")),
                ("TRADEFEED_BRIDGE_ATTACH__LEASE", "false".into()),
            ],
            ..Default::default()
        },
    );
    let sim = |role: &str, extra: &[&str]| {
        let mut cmd = Command::new("node");
        cmd.arg(root().join(format!("sim/{role}.js")))
            .args(["--legacy-url", &hub.url()])
            .args(["--nats-url", &nats.url()])
            .args(extra);
        Sim(Agent::program(role, cmd))
    };
    let processor = sim("trade-processor", &[]);
    let service = sim("trade-service", &["--run-id", "S"]);
    processor.call(json!({"cmd": "add", "bus": "legacy"}));
    processor.call(json!({"cmd": "add", "bus": "nats"}));
    let deadline = Instant::now() + WAIT;
    while bridge.metric("tradefeed_bridge_queue_member", &[("route", R_ORDERS)]) != 1.0 {
        assert!(Instant::now() < deadline, "{}", bridge.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    service.call(json!({"cmd": "start", "bus": "nats"}));
    let count = 3000;
    let run = service.send(json!({"cmd": "run", "count": count, "rate": 500}));
    processor.call(json!({"cmd": "wait", "booked": 800, "timeout_ms": 30000}));
    hub.stop();
    service.result(run, RUN_TIMEOUT);
    let _ = processor.try_call(json!({"cmd": "wait", "booked": count, "timeout_ms": 10000}));
    std::thread::sleep(QUIET);
    let s = service.report();
    let p = processor.report();
    let sent = s["orders"].as_object().cloned().unwrap_or_default();
    let booked = p["orders"].as_object().cloned().unwrap_or_default();
    let missing: Vec<&String> = sent.keys().filter(|id| !booked.contains_key(*id)).collect();
    let doubled = booked
        .values()
        .filter(|b| b.as_array().is_some_and(|b| b.len() > 1))
        .count();
    let log = bridge.log();
    let unsure: usize = log
        .lines()
        .filter(|l| l.contains("gave back") && l.contains("orders taken for trade-feed"))
        .filter_map(|l| l.split("unsure=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    assert!(
        missing.is_empty() && doubled <= unsure,
        "{} of {} orders never booked {:?}; {doubled} booked twice, {unsure} unsure\n{}",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(10)],
        tail(&log, 30)
    );
}

// ------------------------------------------------------------------ the bridge stops mid-flow

/// A legacy and a NATS processor sharing the orders of a NATS trade-service
/// (3,000 orders/s; 1,000 in attach mode). The bridge is stopped (SIGTERM) mid-flow and started
/// again, four times: each time it leaves the queue group before it exits
/// and gives back what the server had already sent it (in attach mode,
/// what it already handed trade-feed is echoed first), so the NATS
/// processor books every order no legacy processor did. None is lost or
/// doubled, none counted undeliverable.
#[test]
fn server_stopped_mid_flow_gives_its_share_back_before_it_exits() {
    stopped_mid_flow(Mode::Server);
}

#[test]
fn attach_stopped_mid_flow_gives_its_share_back_before_it_exits() {
    stopped_mid_flow(Mode::Attach);
}

fn stopped_mid_flow(mode: Mode) {
    let mut stage = Stage::start(mode, true);
    let nats = stage.sim("trade-processor", "trade-processor-nats", &[]);
    nats.call(json!({"cmd": "add", "bus": "nats"}));
    let service = stage.sim(
        "trade-service",
        "trade-service",
        &["--run-id", "T", "--retry-unconsumed"],
    );
    service.call(json!({"cmd": "start", "bus": "nats"}));
    let mut legacies = Vec::new();
    let mut run = None;
    for cycle in 0..4 {
        // The sim's legacy connection does not reconnect: in server mode,
        // one per bridge; on trade-feed, one throughout.
        if mode == Mode::Server || legacies.is_empty() {
            let legacy = stage.sim(
                "trade-processor",
                &format!("trade-processor-legacy-{cycle}"),
                &[],
            );
            legacy.call(json!({"cmd": "add", "bus": "legacy"}));
            legacies.push(legacy);
        }
        let legacy = legacies.last().unwrap();
        stage.wait_member(true);
        if run.is_none() {
            // Attach mode carries the NATS processor's trades and positions
            // to trade-feed over one client connection: a lower rate keeps
            // that path from falling behind on a shared 2-core machine.
            let rate = if mode == Mode::Server { 3000 } else { 1000 };
            run = Some(service.send(json!({"cmd": "run", "count": 60000, "rate": rate})));
        }
        let booked = n(&legacy.report()["booked"]);
        legacy.call(json!({"cmd": "wait", "booked": booked + 300, "timeout_ms": 30000}));
        // The log file is appended to by each start: this stop's part.
        let before = stage.bridge.log().len();
        let status = stage.bridge.proc.terminate(Duration::from_secs(20));
        let log = stage.bridge.log().split_off(before);
        assert!(
            status.is_some_and(|s| s.success()),
            "stop {cycle}: the bridge did not stop cleanly ({status:?}); log:\n{}",
            tail(&log, 40)
        );
        assert!(
            log.contains("left the queue group: the bridge is stopping"),
            "stop {cycle}: {}",
            tail(&log, 30)
        );
        for bad in ["undeliverable", "drain timeout", "did not answer"] {
            assert!(
                !log.contains(bad),
                "stop {cycle}: {bad}\n{}",
                tail(&log, 30)
            );
        }
        stage.bridge.start_again();
        stage.bridge.wait_ready(Duration::from_secs(20));
    }
    service.send(json!({"cmd": "stop"}));
    service.result(run.unwrap(), RUN_TIMEOUT);
    let s = service.report();
    let sent = s["orders"].as_object().unwrap();
    let by_legacy: u64 = legacies.iter().map(|l| n(&l.report()["booked"])).sum();
    let _ = nats.try_call(json!({
        "cmd": "wait",
        "booked": (sent.len() as u64).saturating_sub(by_legacy),
        "timeout_ms": 20000
    }));
    let bookings = bookings(legacies.iter().map(Sim::report).chain([nats.report()]));
    let lost: Vec<&String> = sent
        .keys()
        .filter(|id| !bookings.contains_key(*id))
        .collect();
    let doubled: Vec<_> = bookings.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        lost.is_empty() && doubled.is_empty(),
        "{} of {} orders lost {:?}, doubled {doubled:?}",
        lost.len(),
        sent.len(),
        &lost[..lost.len().min(10)],
    );
}
