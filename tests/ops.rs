//! Operating the cutover: `/metrics` and `/api/census` after known traffic,
//! `decommission-check` against a live bridge, `prune-check` on fixture
//! trees (tests/fixtures/prune: a state-005-like TraderX tree and its clean
//! state-006 successor).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const FORWARDED: &str = "tradefeed_bridge_messages_forwarded_total";
const DELIVERED: &str = "tradefeed_bridge_messages_delivered_total";
const DROPPED: &str = "tradefeed_bridge_messages_dropped_total";
const REJECTED: &str = "tradefeed_bridge_messages_rejected_total";
const SUPPRESSED: &str = "tradefeed_bridge_messages_suppressed_total";
const LATENCY_COUNT: &str = "tradefeed_bridge_forward_latency_seconds_count";
const CLIENTS: &str = "tradefeed_bridge_socketio_clients";

const ROUTES: [&str; 3] = ["trade-orders", "account-trades", "account-positions"];
const DIRECTIONS: [&str; 2] = ["to_nats", "to_socketio"];

fn census(bridge: &Bridge) -> Value {
    let (status, body) = bridge.admin("/api/census");
    assert_eq!(status, 200, "/api/census: {body}");
    serde_json::from_str(&body).expect("census is JSON")
}

fn metrics(bridge: &Bridge) -> String {
    let (status, text) = bridge.admin("/metrics");
    assert_eq!(status, 200, "/metrics");
    text
}

/// Whether a series with exactly these labels is exposed (at any value).
fn has_series(text: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix('{'))
            .and_then(|r| r.split_once('}'))
            .is_some_and(|(ls, _)| {
                let have: BTreeSet<String> = ls.split(',').map(str::to_string).collect();
                let want: BTreeSet<String> =
                    labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                have == want
            })
    })
}

/// Polls the census until `pred` holds (at most `timeout`).
fn wait_census(bridge: &Bridge, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = census(bridge);
        if pred(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "census never showed {what}: {c:#}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn client<'a>(census: &'a Value, id: &str) -> &'a Value {
    census["clients"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("no client {id} in the census: {census:#}"))
}

fn route<'a>(census: &'a Value, name: &str) -> &'a Value {
    census["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no route {name} in the census"))
}

fn data_on(agent: &Agent, topic: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let t = topic.to_string();
            agent.next_publish(WAIT, move |e| e["topic"] == t.as_str())
        })
        .collect()
}

// ------------------------------------------------------------------ metrics

#[test]
fn every_series_exists_at_zero_from_start_up() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let text = metrics(&bridge);

    for r in ROUTES {
        for d in DIRECTIONS {
            let l = [("route", r), ("direction", d)];
            assert!(
                has_series(&text, FORWARDED, &l),
                "{FORWARDED} {l:?}:\n{text}"
            );
            assert_eq!(metric_value(&text, FORWARDED, &l), 0.0);
            assert!(
                has_series(&text, LATENCY_COUNT, &l),
                "{LATENCY_COUNT} {l:?}"
            );
            assert_eq!(metric_value(&text, LATENCY_COUNT, &l), 0.0);
        }
        let l = [("route", r), ("direction", "to_socketio")];
        assert!(has_series(&text, DELIVERED, &l), "{DELIVERED} {l:?}");
        for (metric, d, reason) in [
            (DROPPED, "to_nats", "publish_queue_full"),
            (DROPPED, "to_nats", "nats_unavailable"),
            (DROPPED, "to_nats", "nats_error"),
            (REJECTED, "to_nats", "too_large"),
            (REJECTED, "to_nats", "subject_too_long"),
            (DROPPED, "to_socketio", "client_buffer_full"),
            (REJECTED, "to_socketio", "invalid_json"),
            (SUPPRESSED, "to_socketio", "own_message"),
        ] {
            let l = [("route", r), ("direction", d), ("reason", reason)];
            assert!(has_series(&text, metric, &l), "{metric} {l:?}:\n{text}");
        }
    }
    // Only the point-to-point route can have undeliverable orders.
    let undeliverable = |r| {
        [
            ("route", r),
            ("direction", "to_nats"),
            ("reason", "undeliverable"),
        ]
    };
    assert!(has_series(&text, DROPPED, &undeliverable("trade-orders")));
    assert!(!has_series(
        &text,
        DROPPED,
        &undeliverable("account-trades")
    ));
    // What is refused before a route is known.
    for reason in [
        "no_argument",
        "not_object",
        "no_topic",
        "topic_not_string",
        "binary_payload",
    ] {
        let l = [
            ("route", "(none)"),
            ("direction", "to_nats"),
            ("reason", reason),
        ];
        assert!(has_series(&text, REJECTED, &l), "{REJECTED} {l:?}");
    }
    // Attach-mode series stay out of a server-mode bridge.
    assert!(!text.contains("tradefeed_bridge_upstream_connected"));
    assert!(!text.contains("reason=\"own_echo\""));

    for (metric, labels, want) in [
        (DROPPED, vec![], 0.0),
        (REJECTED, vec![], 0.0),
        (SUPPRESSED, vec![], 0.0),
        (CLIENTS, vec![("transport", "polling")], 0.0),
        (CLIENTS, vec![("transport", "websocket")], 0.0),
        ("tradefeed_bridge_nats_connected", vec![], 1.0),
        ("tradefeed_bridge_nats_reconnects_total", vec![], 0.0),
        ("tradefeed_bridge_nats_publish_pending", vec![], 0.0),
        ("tradefeed_bridge_info", vec![("mode", "server")], 1.0),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(metric)),
            "{metric} missing:\n{text}"
        );
        assert_eq!(
            metric_value(&text, metric, &labels),
            want,
            "{metric} {labels:?}"
        );
    }
    assert!(text.contains("# HELP tradefeed_bridge_messages_forwarded_total"));
}

#[test]
fn metrics_and_census_after_known_traffic() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let url = bridge.url();

    // The NATS trade-processor, so orders from the legacy producer are consumed.
    let processor = Agent::nats(Lang::Node);
    processor.nats_connect(&nats.url());
    processor.queue_sub("orders", "trades.new", "trade-processor");
    let feed = Agent::nats(Lang::Python);
    feed.nats_connect(&nats.url());

    // A browser that upgrades, one held on polling, a Python service and a
    // Java producer on websocket only, on TraderX's /trade-feed path.
    let browser = Agent::sio(Lang::Node);
    let browser_id = browser.connect(&url, json!({}));
    browser.expect("upgrade", WAIT, |e| e["ev"] == "upgraded");
    browser.subscribe("/accounts/22/positions");
    let poller = Agent::sio(Lang::Node);
    let poller_id = poller.connect(&url, json!({"transports": ["polling"]}));
    poller.subscribe("/*");
    let py = Agent::sio(Lang::Python);
    let py_id = py.connect(
        &url,
        json!({"transports": ["websocket"], "headers": {"User-Agent": "traderx-pricing/1.0"}}),
    );
    let java = Agent::sio(Lang::Java);
    let java_id = java.connect(
        &url,
        json!({"transports": ["websocket"], "path": "/trade-feed"}),
    );

    for i in 0..3 {
        py.publish(
            "/accounts/22/trades",
            "Trade",
            json!({"id": format!("t{i}"), "accountId": 22}),
        );
    }
    for i in 0..2 {
        py.publish("/desk/chat", "message", json!({"text": format!("hi {i}")}));
    }
    for i in 0..2 {
        java.publish(
            "/trades",
            "TradeOrder",
            json!({"id": format!("o{i}"), "accountId": 22, "security": "ACME", "quantity": 5, "side": "Buy"}),
        );
    }
    for i in 0..4 {
        feed.pub_json(
            "positions.account.22.updated",
            &json!({"accountId": 22, "security": "ACME", "quantity": i, "updated": 1}),
        );
    }

    // Everyone got what they should, so every count below is final.
    assert_eq!(data_on(&browser, "/accounts/22/positions", 4).len(), 4);
    // The /* observer sees 3 + 2 legacy publishes, 2 orders and 4 positions.
    let mut seen = 0;
    while seen < 11 {
        poller.next_publish(WAIT, |_| true);
        seen += 1;
    }
    for _ in 0..2 {
        processor.next_msg("orders", WAIT);
    }
    let text = metrics(&bridge);
    let c = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    let rd = |r, d| [("route", r), ("direction", d)];
    assert_eq!(c(FORWARDED, &rd("account-trades", "to_nats")), 3.0);
    assert_eq!(c(FORWARDED, &rd("trade-orders", "to_nats")), 2.0);
    assert_eq!(c(FORWARDED, &rd("account-positions", "to_socketio")), 4.0);
    assert_eq!(c(FORWARDED, &rd("account-positions", "to_nats")), 0.0);
    assert_eq!(c(FORWARDED, &rd("account-trades", "to_socketio")), 0.0);
    // the browser and the /* observer received each position
    assert_eq!(c(DELIVERED, &rd("account-positions", "to_socketio")), 8.0);
    assert_eq!(c(LATENCY_COUNT, &rd("account-trades", "to_nats")), 3.0);
    assert_eq!(
        c(LATENCY_COUNT, &rd("account-positions", "to_socketio")),
        4.0
    );
    assert_eq!(c("tradefeed_bridge_unrouted_publishes_total", &[]), 2.0);
    assert_eq!(c("tradefeed_bridge_legacy_publishes_total", &[]), 7.0);
    assert_eq!(c(DROPPED, &[]), 0.0);
    assert_eq!(c(REJECTED, &[]), 0.0);
    assert_eq!(c(CLIENTS, &[("transport", "polling")]), 1.0);
    assert_eq!(c(CLIENTS, &[("transport", "websocket")]), 3.0);

    let census = census(&bridge);
    assert_eq!(census["mode"], "server");
    assert_eq!(census["legacy_clients_visible"], true);
    assert_eq!(census["note"], Value::Null);
    assert_eq!(census["legacy"]["connected"], 4);
    assert_eq!(census["clients"].as_array().unwrap().len(), 4);
    let b = client(&census, &browser_id);
    assert_eq!(b["transport"], "websocket", "the browser upgraded: {b}");
    assert_eq!(b["topics"], json!(["/accounts/22/positions"]));
    assert_eq!(b["published"], json!({}));
    assert_eq!(b["path"], "/socket.io");
    assert!(
        b["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{b}"
    );
    let p = client(&census, &poller_id);
    assert_eq!(p["transport"], "polling");
    assert_eq!(p["topics"], json!(["/*"]));
    let y = client(&census, &py_id);
    assert_eq!(
        y["published"],
        json!({"/accounts/22/trades": 3, "/desk/chat": 2})
    );
    assert_eq!(y["user_agent"], "traderx-pricing/1.0");
    let j = client(&census, &java_id);
    assert_eq!(j["path"], "/trade-feed");
    assert_eq!(j["published"], json!({"/trades": 2}));
    assert!(j["last_active_ms"].as_u64() >= j["connected_at_ms"].as_u64());
    for id in [&browser_id, &poller_id, &py_id, &java_id] {
        assert_eq!(client(&census, id)["dropped"], 0);
    }

    let topics = &census["topics"];
    assert_eq!(
        topics["/accounts/22/positions"],
        json!({"route": "account-positions", "subject": "positions.account.22.updated",
               "subscribers": [browser_id], "publishers": {}})
    );
    assert_eq!(
        topics["/accounts/22/trades"],
        json!({"route": "account-trades", "subject": "trades.account.22.updated",
               "subscribers": [], "publishers": {py_id.clone(): 3}})
    );
    assert_eq!(
        topics["/desk/chat"],
        json!({"route": null, "subject": null, "subscribers": [], "publishers": {py_id.clone(): 2}})
    );
    assert_eq!(topics["/trades"]["publishers"], json!({java_id.clone(): 2}));
    assert_eq!(topics["/*"]["subscribers"], json!([poller_id]));

    let now = census["now_ms"].as_u64().unwrap();
    let positions = route(&census, "account-positions");
    assert_eq!(positions["to_socketio"]["count"], 4);
    assert_eq!(positions["received_by_legacy"]["count"], 8);
    assert_eq!(positions["to_nats"], json!({"count": 0, "last_ms": null}));
    let trades = route(&census, "account-trades");
    assert_eq!(trades["to_nats"]["count"], 3);
    let last = trades["to_nats"]["last_ms"].as_u64().unwrap();
    assert!(last <= now && now - last < 60_000, "{trades}");
    assert_eq!(route(&census, "trade-orders")["delivery"], "queue");
    assert!(census["legacy"]["last_published_ms"].as_u64().unwrap() <= now);

    // A departure is remembered, with its reason.
    browser.cmd(json!({"cmd": "disconnect"}));
    let after = wait_census(&bridge, "the browser gone", |c| {
        c["legacy"]["connected"] == 3
    });
    let gone = &after["recently_disconnected"][0];
    assert_eq!(gone["id"], browser_id.as_str());
    assert_eq!(gone["topics"], json!(["/accounts/22/positions"]));
    assert!(
        gone["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{gone}"
    );
    assert!(after["topics"].get("/accounts/22/positions").is_none());
}

#[test]
fn attach_mode_census_says_clients_are_not_visible() {
    let nats = Nats::start();
    let hub = Hub::start();
    let bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: vec![
                ("TRADEFEED_BRIDGE_MODE", "attach".into()),
                ("TRADEFEED_BRIDGE_ATTACH__URL", hub.url()),
                ("TRADEFEED_BRIDGE_ATTACH__LEASE", "false".into()),
            ],
            ..Default::default()
        },
    );
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&hub.url(), json!({}));
    legacy.publish("/accounts/22/trades", "Trade", json!({"id": "a1"}));
    let c = wait_census(&bridge, "the mirrored trade", |c| {
        route(c, "account-trades")["to_nats"]["count"] == 1
    });
    assert_eq!(c["mode"], "attach");
    assert_eq!(c["legacy_clients_visible"], false);
    assert!(c["note"].as_str().unwrap().contains("cannot see"), "{c}");
    for field in ["clients", "topics", "recently_disconnected"] {
        assert_eq!(c[field], Value::Null, "{field} must be unknown, not empty");
    }
    assert_eq!(c["legacy"]["connected"], Value::Null);

    let text = metrics(&bridge);
    assert_eq!(
        metric_value(&text, "tradefeed_bridge_upstream_connected", &[]),
        1.0
    );
    assert_eq!(
        metric_value(&text, "tradefeed_bridge_attach_active", &[]),
        1.0
    );
    assert_eq!(
        metric_value(&text, "tradefeed_bridge_upstream_buffered_messages", &[]),
        0.0
    );
    assert!(has_series(
        &text,
        SUPPRESSED,
        &[
            ("route", "account-trades"),
            ("direction", "to_nats"),
            ("reason", "own_echo")
        ]
    ));
    assert!(!text.contains("tradefeed_bridge_socketio_clients{"));

    let (code, out) = run_bin(&[
        "decommission-check",
        "--admin-url",
        &admin_url(&bridge),
        "--quiet-for",
        "1ms",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot see trade-feed's clients"), "{out}");
}

// ------------------------------------------------------------------ decommission-check

fn run_bin(args: &[&str]) -> (i32, String) {
    let out = Command::new(bridge_bin())
        .args(args)
        .output()
        .expect("run the bridge binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn admin_url(bridge: &Bridge) -> String {
    format!("http://127.0.0.1:{}", bridge.admin_port)
}

#[test]
fn decommission_check_waits_for_the_legacy_side_to_be_quiet_for_the_window() {
    const WINDOW: Duration = Duration::from_secs(3);
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let admin = admin_url(&bridge);
    let check = || {
        run_bin(&[
            "decommission-check",
            "--admin-url",
            &admin,
            "--quiet-for",
            "3s",
        ])
    };

    let legacy = Agent::sio(Lang::Node);
    let id = legacy.connect(&bridge.url(), json!({}));
    legacy.subscribe("/accounts/22/positions");
    legacy.publish("/accounts/22/trades", "Trade", json!({"id": "d1"}));
    wait_census(&bridge, "the publish", |c| {
        route(c, "account-trades")["to_nats"]["count"] == 1
    });
    let (code, out) = check();
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("decommission-check: NOT READY"), "{out}");
    assert!(out.contains("1 legacy client is connected"), "{out}");
    assert!(out.contains(&format!("id={id}")), "{out}");
    assert!(
        out.contains("subscribed to: /accounts/22/positions"),
        "{out}"
    );
    assert!(out.contains("published: /accounts/22/trades (1)"), "{out}");
    assert!(out.contains("route account-trades"), "{out}");
    assert!(out.contains("carried legacy traffic to NATS"), "{out}");

    legacy.cmd(json!({"cmd": "disconnect"}));
    wait_census(&bridge, "nobody", |c| c["legacy"]["connected"] == 0);
    let left = Instant::now();
    let (code, out) = check();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("a legacy client was connected"), "{out}");
    assert!(out.contains("recently departed"), "{out}");
    assert!(out.contains(&format!("id={id}")), "{out}");

    // NATS producers keep publishing into the now empty rooms: that is not
    // legacy traffic and must not hold the check back.
    let feed = Agent::nats(Lang::Node);
    feed.nats_connect(&nats.url());
    let deadline = left + WINDOW + Duration::from_secs(15);
    let mut i = 0;
    let ready_after = loop {
        feed.pub_json(
            "positions.account.22.updated",
            &json!({"accountId": 22, "security": "ACME", "quantity": i}),
        );
        i += 1;
        let (code, out) = check();
        if code == 0 {
            assert!(out.starts_with("decommission-check: READY"), "{out}");
            assert!(out.contains("legacy clients connected: 0"), "{out}");
            break left.elapsed();
        }
        assert_eq!(code, 1, "{out}");
        assert!(Instant::now() < deadline, "never ready:\n{out}");
        thread::sleep(Duration::from_millis(200));
    };
    // The client left just before `left`; the check may pass only once the
    // whole window has gone by since then.
    assert!(
        ready_after + Duration::from_millis(300) >= WINDOW,
        "ready after {ready_after:?}, before the {WINDOW:?} window"
    );
    let positions = route(&census(&bridge), "account-positions").clone();
    assert!(positions["to_socketio"]["count"].as_u64().unwrap() >= 1);
    assert_eq!(positions["received_by_legacy"]["count"], 0);

    // Unreachable bridge: cannot check, which is not "ready".
    let (code, out) = run_bin(&[
        "decommission-check",
        "--admin-url",
        &format!("http://127.0.0.1:{}", free_port()),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot check"), "{out}");
}

/// A zero window is refused before the bridge is asked: it would call any
/// bridge ready, even one whose last legacy client left a moment ago.
#[test]
fn decommission_check_refuses_an_empty_window() {
    for window in ["0s", "0ms", "0m"] {
        let (code, out) = run_bin(&[
            "decommission-check",
            "--admin-url",
            &format!("http://127.0.0.1:{}", free_port()),
            "--quiet-for",
            window,
        ]);
        assert_eq!(code, 2, "{window}: {out}");
        assert!(
            out.contains("--quiet-for") && out.contains("longer than 0"),
            "{window}: {out}"
        );
        assert!(!out.contains("cannot check"), "{window}: {out}");
    }
}

/// A Node program driving legacy clients (`process.argv[1]` is the bridge's
/// URL), stopped when dropped. `first_line` is the first line it printed,
/// once its clients had done their part.
struct NodeScript {
    child: std::process::Child,
    first_line: String,
}

impl NodeScript {
    fn run(script: &str, url: &str) -> NodeScript {
        let mut child = Command::new("node")
            .arg("-e")
            .arg(script)
            .arg(url)
            .env("NODE_PATH", root().join("tests/node/node_modules"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("node");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        NodeScript {
            child,
            first_line: line.trim().to_string(),
        }
    }
}

impl Drop for NodeScript {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A census larger than 10 MiB (here: 50 legacy clients that published on
/// 1,000 topics of about 250 bytes each, the longest the census lists) is
/// still read, and credentials in --admin-url are
/// not repeated in the report or in an error.
#[test]
fn decommission_check_reads_a_large_census_and_hides_url_credentials() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let script = r#"
const { io } = require('socket.io-client');
const pad = 'x'.repeat(236);
const one = (c) => new Promise((resolve, reject) => {
  const s = io(process.argv[1], { transports: ['websocket'], reconnection: false, forceNew: true });
  s.on('connect', async () => {
    for (let i = 0; i < 1000; i++) {
      s.emit('publish', { topic: `/junk/${c}/${i}/${pad}`, payload: {} });
      if (i % 250 === 0) await new Promise((r) => setTimeout(r, 5));
    }
    s.emit('publish', { topic: `/junk/${c}/0/${pad}`, payload: {} }, () => resolve(s));
  });
  s.on('connect_error', (e) => reject(e));
});
(async () => {
  for (let c = 0; c < 50; c++) await one(c);
  console.log('done');
})().catch((e) => { console.error(e.message); process.exit(1); });
"#;
    // The clients stay connected (the census lists them) until the end.
    let clients = NodeScript::run(script, &bridge.url());
    assert_eq!(clients.first_line, "done");
    let census_len = ureq::get(&format!(
        "http://127.0.0.1:{}/api/census",
        bridge.admin_port
    ))
    .call()
    .expect("census")
    .body_mut()
    .with_config()
    .limit(1 << 30)
    .read_to_string()
    .expect("census body")
    .len();
    assert!(census_len > 11 << 20, "{census_len} bytes");

    let url = format!("http://qa:pw5ecret@127.0.0.1:{}", bridge.admin_port);
    let (code, out) = run_bin(&[
        "decommission-check",
        "--admin-url",
        &url,
        "--quiet-for",
        "10m",
    ]);
    assert_eq!(code, 1, "{}", &out[..out.len().min(2000)]);
    assert!(
        out.contains("a legacy client published"),
        "{}",
        &out[..2000]
    );
    assert!(out.contains("http://***@127.0.0.1:"), "{}", &out[..2000]);
    assert!(!out.contains("pw5ecret"));

    let url = format!("http://qa:pw5ecret@127.0.0.1:{}", free_port());
    let (code, out) = run_bin(&["decommission-check", "--admin-url", &url]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("http://***@127.0.0.1:") && !out.contains("pw5ecret"),
        "{out}"
    );
}

/// A client publishing on ever new topics, or on very long ones, costs
/// bounded memory: its census entry lists its first 1,000 topics of up to
/// 256 bytes and counts the rest together, and decommission-check still
/// reports them.
#[test]
fn census_lists_a_clients_first_thousand_topics_and_counts_the_rest() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let script = r#"
const { io } = require('socket.io-client');
const s = io(process.argv[1], { transports: ['websocket'], reconnection: false });
s.on('connect', async () => {
  // Long topics are counted, never listed, even among the first 1,000.
  s.emit('publish', { topic: '/long/' + 'x'.repeat(1000), payload: {} });
  s.emit('publish', { topic: '/long/' + 'y'.repeat(300), payload: {} });
  for (let i = 0; i < 1200; i++) {
    s.emit('publish', { topic: `/junk/${i}`, payload: {} });
    if (i % 300 === 0) await new Promise((r) => setTimeout(r, 5));
  }
  s.emit('publish', { topic: '/junk/0', payload: {} }, () => console.log(s.id));
});
s.on('connect_error', (e) => { console.error(e.message); process.exit(1); });
"#;
    let client = NodeScript::run(script, &bridge.url());
    let id = client.first_line.as_str();
    let (status, body) = bridge.admin("/api/census");
    assert_eq!(status, 200);
    let census: Value = serde_json::from_str(&body).unwrap();
    let c = census["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no client {id} in {body}"));
    let listed = c["published"].as_object().unwrap();
    assert_eq!(listed.len(), 1000);
    assert_eq!(listed["/junk/0"], 2);
    assert_eq!(
        listed.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        1001
    );
    assert_eq!(c["published_other_topics"], 202);
    assert!(listed.keys().all(|t| t.starts_with("/junk/")), "{listed:?}");

    let (code, out) = run_bin(&[
        "decommission-check",
        "--admin-url",
        &format!("http://127.0.0.1:{}", bridge.admin_port),
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("and 202 more message(s) on further topics"),
        "{}",
        &out[..out.len().min(3000)]
    );
}

// ------------------------------------------------------------------ prune-check

fn fixture(name: &str) -> String {
    root()
        .join("tests/fixtures/prune")
        .join(name)
        .display()
        .to_string()
}

/// `path:line` (or `path`) of each finding of a severity.
fn locations(out: &str, severity: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let (loc, rest) = l.split_once(": ")?;
            rest.starts_with(&format!("{severity}: "))
                .then(|| loc.to_string())
        })
        .collect()
}

#[test]
fn prune_check_names_every_trade_feed_artifact_of_a_state_005_tree() {
    let (code, out) = run_bin(&["prune-check", &fixture("state-005")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("prune-check: FAIL: 19 trade-feed artifacts"),
        "{out}"
    );
    let expected = [
        // the service itself, and the two that depend on or point at it
        "docker-compose.yml:9",
        "docker-compose.yml:25",
        "docker-compose.yml:27",
        "docker-compose.yml:30",
        "docker-compose.yml:32",
        // component links, one of them dangling
        "generated/code/components/trade-feed",
        "generated/code/components/trade-feed-spec",
        // the ingress routes for /trade-feed/ and /socket.io/
        "ingress/nginx.conf:18",
        "ingress/nginx.conf:19",
        "ingress/nginx.conf:25",
        "ingress/nginx.conf:26",
        // Deployment and Service, an env var, the Ingress path and port
        "kubernetes/traderx.yaml:4",
        "kubernetes/traderx.yaml:22",
        "kubernetes/traderx.yaml:39",
        "kubernetes/traderx.yaml:40",
        "kubernetes/traderx.yaml:50",
        "kubernetes/traderx.yaml:53",
        // the component folder, and a service still configured for it
        "trade-feed",
        "trade-service/src/main/resources/application.properties:3",
    ];
    assert_eq!(locations(&out, "error"), expected, "{out}");
    assert_eq!(
        locations(&out, "warning"),
        [
            "trade-processor/pom.xml:12",
            "trade-service/build.gradle:9",
            "web-front-end/angular/package.json:7",
        ],
        "{out}"
    );
    assert!(
        out.contains("compose service `trade-feed` deploys"),
        "{out}"
    );
    assert!(out.contains("dangling"), "{out}");
    assert!(
        out.contains("Maven `io.socket:socket.io-client:2.1.0`"),
        "{out}"
    );
    assert!(out.contains("`socket.io-client` `^4.8.1`"), "{out}");
    // prose is not an artifact
    assert!(!out.contains("docs/architecture.md"), "{out}");
}

#[test]
fn prune_check_passes_a_clean_state_006_tree() {
    let (code, out) = run_bin(&["prune-check", &fixture("state-006")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim_end().lines().collect::<Vec<_>>(),
        [format!(
            "prune-check: PASS: no trade-feed artifact in {} (0 warnings, 8 files scanned)",
            fixture("state-006")
        )],
        "{out}"
    );
}

#[test]
fn prune_check_on_changes_to_a_clean_tree() {
    let dir = scratch();
    copy_tree(Path::new(&fixture("state-006")), dir.path());
    let tree = dir.path().display().to_string();

    // A dangling link to something else is a warning, not a failure.
    std::os::unix::fs::symlink(
        "../../../reference-data",
        dir.path().join("generated/code/components/reference-data"),
    )
    .unwrap();
    let (code, out) = run_bin(&["prune-check", &tree]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        locations(&out, "warning"),
        ["generated/code/components/reference-data"]
    );

    // The bridge's compose overlay left behind fails, and so does its image
    // in a Kubernetes manifest; --exclude leaves a path out.
    std::fs::write(
        dir.path().join("docker-compose.bridge.yml"),
        "services:\n  tradefeed-bridge:\n    image: tradefeed-bridge:0.1\n",
    )
    .unwrap();
    let (code, out) = run_bin(&["prune-check", &tree]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        locations(&out, "error"),
        ["docker-compose.bridge.yml:2"],
        "{out}"
    );
    let (code, out) = run_bin(&[
        "prune-check",
        &tree,
        "--exclude",
        "docker-compose.bridge.yml",
    ]);
    assert_eq!(code, 0, "{out}");

    let (code, out) = run_bin(&["prune-check", &format!("{tree}/no-such-dir")]);
    assert_eq!(code, 2, "{out}");
}

/// `--exclude` takes a path relative to the tree or an absolute one inside
/// it; one that names nothing in the tree is an error, not a silent no-op
/// that scans what the operator meant to leave out.
#[test]
fn prune_check_exclude_paths_must_name_something_in_the_tree() {
    let tree = fixture("state-005");
    let all = run_bin(&["prune-check", &tree]).1;
    let kube = |out: &str| {
        locations(out, "error")
            .iter()
            .filter(|l| l.starts_with("kubernetes/"))
            .count()
    };
    assert_eq!(kube(&all), 6, "{all}");
    for exclude in [
        "kubernetes".to_string(),
        "./kubernetes/".to_string(),
        format!("{tree}/kubernetes"),
    ] {
        let (code, out) = run_bin(&["prune-check", &tree, "--exclude", &exclude]);
        assert_eq!(code, 1, "{exclude}: {out}");
        assert_eq!(kube(&out), 0, "{exclude}: {out}");
        assert!(locations(&out, "error").len() > 10, "{exclude}: {out}");
    }
    for exclude in [
        "kubernets".to_string(),
        // relative to the working directory, not to the tree
        "tests/fixtures/prune/state-005/kubernetes".to_string(),
        // absolute, but outside the tree
        fixture("state-006"),
    ] {
        let (code, out) = run_bin(&["prune-check", &tree, "--exclude", &exclude]);
        assert_eq!(code, 2, "{exclude}: {out}");
        assert!(
            out.contains(&format!("--exclude {exclude}: no such path in {tree}")),
            "{exclude}: {out}"
        );
    }
}

/// Text in another encoding than UTF-8 is still scanned: a Latin-1
/// `.properties` file (Java's traditional encoding) or an nginx file with a
/// cp1252 comment that still names trade-feed fails the tree, on its line.
#[test]
fn prune_check_reads_text_that_is_not_utf8() {
    let dir = scratch();
    copy_tree(Path::new(&fixture("state-006")), dir.path());
    let tree = dir.path().display().to_string();
    std::fs::write(
        dir.path().join("application.properties"),
        b"# Param\xe8tres du d\xe9p\xf4t\ntrade.feed.address=http://trade-feed:18086\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("legacy.conf"),
        b"# \x93old\x94 hub\nupstream feed { server trade-feed:18086; }\n",
    )
    .unwrap();
    let (code, out) = run_bin(&["prune-check", &tree]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        locations(&out, "error"),
        ["application.properties:2", "legacy.conf:2"],
        "{out}"
    );
    assert!(!out.contains("skipped"), "{out}");
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let ft = entry.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if ft.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A text file the check could not read is a hole in it: with nothing
/// found, the verdict is INCOMPLETE (exit 2), naming the file. A large
/// binary file is expected (an image, an archive) and passes.
#[test]
fn prune_check_does_not_pass_a_tree_it_could_not_read_whole() {
    let dir = scratch();
    copy_tree(Path::new(&fixture("state-006")), dir.path());
    let tree = dir.path().display().to_string();
    let big = 9 * 1024 * 1024;

    let mut image = vec![0u8; big];
    image[..8].copy_from_slice(b"\x89PNG\r\n\x1a\n");
    std::fs::write(dir.path().join("diagram.png"), &image).unwrap();
    let (code, out) = run_bin(&["prune-check", &tree]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("prune-check: PASS"), "{out}");

    let line = "upstream feed { server trade-feed:18086; }\n";
    std::fs::write(
        dir.path().join("huge.conf"),
        line.repeat(big / line.len() + 1),
    )
    .unwrap();
    let (code, out) = run_bin(&["prune-check", &tree]);
    assert_eq!(code, 2, "{out}");
    assert!(out.starts_with("prune-check: INCOMPLETE"), "{out}");
    assert!(out.contains("huge.conf: skipped: larger than"), "{out}");
    assert!(!out.contains("diagram.png"), "{out}");
}

/// `GET /api/legacy-consumers/<route>` shows what is declared for a
/// point-to-point route, before and after an operator's `PUT`.
#[test]
fn legacy_consumer_declarations_can_be_read_back() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let declared = || {
        let (status, body) = bridge.admin("/api/legacy-consumers/trade-orders");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    assert_eq!(
        declared(),
        json!({"route": "trade-orders", "legacy_consumers": true})
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let status = agent
        .put(&format!(
            "http://127.0.0.1:{}/api/legacy-consumers/trade-orders",
            bridge.admin_port
        ))
        .header("content-type", "application/json")
        .send("false")
        .unwrap()
        .status();
    assert_eq!(status, 200);
    assert_eq!(
        declared(),
        json!({"route": "trade-orders", "legacy_consumers": false})
    );
    // Not a point-to-point route, or no route at all.
    assert_eq!(
        bridge.admin("/api/legacy-consumers/account-positions").0,
        404
    );
    assert_eq!(bridge.admin("/api/legacy-consumers/nope").0, 404);
}
