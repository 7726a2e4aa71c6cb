//! The migration documents cannot drift from what ships: the subject map
//! agrees with the route table in config/traderx.toml, and the programs of
//! the backend client guide run against a real nats-server next to the
//! bridge, their positions reaching a legacy Socket.IO subscriber.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::*;
use serde_json::json;
use tradefeed_bridge::route::{Delivery, Direction};

fn doc(name: &str) -> String {
    std::fs::read_to_string(root().join("docs/migration").join(name))
        .unwrap_or_else(|e| panic!("docs/migration/{name}: {e}"))
}

/// The rows of the first table after `heading`, as column name -> cell
/// (backticks removed).
fn table(text: &str, heading: &str) -> Vec<Vec<(String, String)>> {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no `{heading}`"));
    let lines: Vec<&str> = text[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    let cells = |l: &str| -> Vec<String> {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().replace('`', ""))
            .collect()
    };
    let header = cells(lines[0]);
    lines[2..]
        .iter()
        .map(|l| header.iter().cloned().zip(cells(l)).collect())
        .collect()
}

fn cell<'a>(row: &'a [(String, String)], col: &str) -> &'a str {
    row.iter()
        .find(|(k, _)| k == col)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no column {col}"))
}

#[test]
fn subject_map_agrees_with_the_route_table() {
    let config = tradefeed_bridge::config::load(&root().join("config/traderx.toml"), true).unwrap();
    let rows = table(&doc("messaging-subject-map.md"), "## Subjects");
    assert!(!rows.is_empty());

    let bridged: Vec<_> = rows.iter().filter(|r| cell(r, "route") != "none").collect();
    let names: Vec<&str> = bridged.iter().map(|r| cell(r, "route")).collect();
    let routes: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, routes, "the map's routes, in order");

    for (row, route) in bridged.iter().zip(&config.routes) {
        let what = &route.name;
        assert_eq!(cell(row, "subject"), route.subject, "{what}: subject");
        assert_eq!(cell(row, "legacy topic"), route.topic, "{what}: topic");
        assert_eq!(
            Some(cell(row, "type")),
            route.envelope_type.as_deref(),
            "{what}: type"
        );
        let delivery = match (route.delivery, &route.queue_group) {
            (Delivery::Queue, Some(group)) => format!("queue group {group}"),
            (Delivery::Queue, None) => "queue group".to_string(),
            (Delivery::Broadcast, _) => "broadcast".to_string(),
        };
        assert_eq!(cell(row, "delivery"), delivery, "{what}: delivery");
        let direction = match route.direction {
            Direction::Both => "both",
            Direction::ToNats => "to_nats",
            Direction::ToSocketio => "to_socketio",
        };
        assert_eq!(cell(row, "direction"), direction, "{what}: direction");
    }

    // Subjects new in state 006 are documented as not bridged, and the
    // route table has nothing for them.
    for row in rows.iter().filter(|r| cell(r, "route") == "none") {
        let subject = cell(row, "subject");
        assert_eq!(cell(row, "legacy topic"), "none", "{subject}");
        assert_eq!(cell(row, "direction"), "none", "{subject}");
        assert!(
            config.routes.iter().all(|r| r.subject != subject),
            "{subject} is routed but documented as new"
        );
    }
    let subjects: Vec<&str> = rows.iter().map(|r| cell(r, "subject")).collect();
    for s in [
        "trades.new",
        "trades.processed",
        "trades.account.{accountId}.updated",
        "positions.account.{accountId}.updated",
    ] {
        assert!(subjects.contains(&s), "state 006 subject {s} missing");
    }
}

/// The verbatim profile bridges the same routes, with the legacy topics as
/// subjects, as the subject map says.
#[test]
fn verbatim_profile_has_the_same_routes_with_topics_as_subjects() {
    let map = tradefeed_bridge::config::load(&root().join("config/traderx.toml"), true).unwrap();
    let verbatim =
        tradefeed_bridge::config::load(&root().join("config/traderx-verbatim.toml"), true).unwrap();
    assert_eq!(map.routes.len(), verbatim.routes.len());
    for (a, b) in map.routes.iter().zip(&verbatim.routes) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.topic, b.topic);
        assert_eq!(b.subject, b.topic, "{}", b.name);
        assert_eq!(a.delivery, b.delivery);
        assert_eq!(a.envelope_type, b.envelope_type);
    }
}

#[test]
fn migration_index_lists_every_document() {
    let index = doc("README.md");
    for f in std::fs::read_dir(root().join("docs/migration")).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().into_owned();
        if name != "README.md" && name.ends_with(".md") {
            assert!(
                index.contains(&format!("]({name})")),
                "README.md lacks {name}"
            );
        }
    }
}

// ------------------------------------------------------------------ backend guide

/// The fenced code blocks of `text` in `lang`.
fn code_blocks(text: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("\n```").expect("closed fence");
        out.push(body[..end + 1].to_string());
        rest = &body[end..];
    }
    out
}

/// Runs a guide program with a deadline; returns its stdout.
fn run_program(mut cmd: Command, what: &str, limit: Duration) -> String {
    let dir = scratch();
    let out_path = dir.path().join("out");
    let err_path = dir.path().join("err");
    let mut child = cmd
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "{what} failed: {status}\n{stdout}\n{stderr}"
    );
    stdout
}

/// One guide program next to the bridge: it books its own order, and the
/// position it publishes on NATS reaches a legacy subscriber.
fn guide_program_books_an_order(lang: &str, file: &str, command: impl Fn(&Path) -> Command) {
    let blocks = code_blocks(&doc("backend-clients.md"), lang);
    let program = blocks
        .iter()
        .find(|b| b.contains(file))
        .unwrap_or_else(|| panic!("no {lang} block naming {file}"));
    let broker = Broker::shipped();
    let bridge = Bridge::start_url(&broker.url(), BridgeOpts::default());
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&bridge.url(), json!({}));
    legacy.subscribe("/accounts/22/positions");

    let dir = scratch();
    let path = dir.path().join(file);
    std::fs::write(&path, program).unwrap();
    let mut cmd = command(&path);
    cmd.env("NATS_URL", broker.url()).current_dir(dir.path());
    let stdout = run_program(cmd, file, Duration::from_secs(90));
    assert_eq!(stdout.trim(), "booked", "{file}");

    let env = legacy.next_publish(WAIT, |e| e["topic"] == "/accounts/22/positions");
    assert_eq!(env["type"], "Position", "{file}");
    assert_eq!(env["from"], "trade-processor", "{file}");
    assert_eq!(env["payload"]["accountId"], 22, "{file}");
    assert_eq!(env["payload"]["security"], "IBM", "{file}");
    assert_eq!(env["payload"]["quantity"], 100, "{file}");
    assert!(legacy.data_messages(SHORT).is_empty(), "{file}: once");
}

#[test]
fn java_guide_program_runs_with_jnats() {
    // The Java test agent's jar holds jnats 2.20 and Jackson.
    let jar = root().join("tests/java/nats-agent/target/nats-agent.jar");
    assert!(jar.is_file(), "run scripts/install-test-deps.sh");
    guide_program_books_an_order("java", "TradeFlow.java", |path| {
        let mut c = Command::new("java");
        c.arg("-cp").arg(&jar).arg(path);
        c
    });
}

#[test]
fn node_guide_program_runs_with_nats() {
    guide_program_books_an_order("js", "trade-flow.js", |path| {
        let mut c = Command::new("node");
        c.arg(path)
            .env("NODE_PATH", root().join("tests/node/node_modules"));
        c
    });
}

/// The production additions: an order published while no processor runs is
/// reported by the server (503 on its reply subject) and published again
/// until the processor, started late, books it.
#[test]
fn node_guide_program_publishes_again_an_order_nobody_consumed() {
    let blocks = code_blocks(&doc("backend-clients.md"), "js");
    let file = "trade-service-retry.js";
    let program = blocks
        .iter()
        .find(|b| b.contains(file))
        .unwrap_or_else(|| panic!("no js block naming {file}"));
    let broker = Broker::shipped();
    let dir = scratch();
    let path = dir.path().join(file);
    std::fs::write(&path, program).unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(&path)
        .env("NODE_PATH", root().join("tests/node/node_modules"))
        .env("NATS_URL", broker.url())
        .current_dir(dir.path());
    let stdout = run_program(cmd, file, Duration::from_secs(60));
    assert_eq!(stdout.trim(), "booked", "{file}");
}

#[test]
fn python_guide_program_runs_with_nats_py() {
    guide_program_books_an_order("python", "trade_flow.py", |path| {
        let mut c = Command::new(root().join("tests/.venv/bin/python"));
        c.arg(path);
        c
    });
}

/// The browser guide's module is valid JavaScript that bundles with
/// nats.ws, as the console's build does.
#[test]
fn browser_guide_module_bundles_with_nats_ws() {
    let blocks = code_blocks(&doc("browser-nats-ws.md"), "js");
    let module = blocks
        .iter()
        .find(|b| b.contains("positions-feed.js"))
        .expect("the positions-feed.js block");
    let console = root().join("console");
    let esbuild = console.join("node_modules/.bin/esbuild");
    assert!(esbuild.exists(), "run scripts/build-console.sh");
    let dir = scratch();
    let src = console.join(format!("guide-check-{}.js", std::process::id()));
    std::fs::write(&src, module).unwrap();
    let out = Command::new(&esbuild)
        .arg(&src)
        .args([
            "--bundle",
            "--format=esm",
            "--external:crypto",
            "--log-level=error",
        ])
        .arg(format!("--outfile={}", dir.path().join("out.js").display()))
        .current_dir(&console)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&src);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = std::fs::read_to_string(dir.path().join("out.js")).unwrap();
    assert!(bundle.contains("watchAccount"));
}
