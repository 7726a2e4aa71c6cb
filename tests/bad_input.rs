//! Bad input never takes the bridge down, never leaks anything partial, and
//! is always visible: one counter step with the right `reason` and one log
//! line per refusal. After every bad input a good publish still goes through,
//! once, to NATS and to a legacy subscriber.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const REJECTED: &str = "tradefeed_bridge_messages_rejected_total";
const DROPPED: &str = "tradefeed_bridge_messages_dropped_total";
const UNROUTED: &str = "tradefeed_bridge_unrouted_publishes_total";
const FORWARDED: &str = "tradefeed_bridge_messages_forwarded_total";
const RECONNECTS: &str = "tradefeed_bridge_nats_reconnects_total";

/// The good traffic: a broadcast route in both directions.
const GOOD_TOPIC: &str = "/accounts/22/trades";
const GOOD_SUBJECT: &str = "trades.account.22.updated";

const REASONS: &[&str] = &[
    "no_argument",
    "not_object",
    "no_topic",
    "topic_not_string",
    "binary_payload",
    "invalid_json",
    "too_large",
];

/// The counters a step may move, read from one /metrics scrape.
#[derive(Debug, Clone, PartialEq)]
struct Counters {
    rejected: HashMap<(&'static str, &'static str), f64>,
    rejected_total: f64,
    dropped: f64,
    unrouted: f64,
    to_nats: f64,
    to_socketio: f64,
    reconnects: f64,
}

fn counters(bridge: &Bridge) -> Counters {
    let (status, text) = bridge.admin("/metrics");
    assert_eq!(status, 200, "/metrics");
    let mut rejected = HashMap::new();
    for dir in ["to_nats", "to_socketio"] {
        for r in REASONS {
            rejected.insert(
                (dir, *r),
                metric_value(&text, REJECTED, &[("direction", dir), ("reason", r)]),
            );
        }
    }
    Counters {
        rejected,
        rejected_total: metric_value(&text, REJECTED, &[]),
        dropped: metric_value(&text, DROPPED, &[]),
        unrouted: metric_value(&text, UNROUTED, &[]),
        to_nats: metric_value(&text, FORWARDED, &[("direction", "to_nats")]),
        to_socketio: metric_value(&text, FORWARDED, &[("direction", "to_socketio")]),
        reconnects: metric_value(&text, RECONNECTS, &[]),
    }
}

/// What one step must change in the counters, and nothing else.
#[derive(Default, Clone, Copy)]
struct Delta {
    rejected: Option<(&'static str, &'static str)>,
    unrouted: f64,
    to_nats: f64,
    to_socketio: f64,
}

fn assert_delta(what: &str, before: &Counters, after: &Counters, d: Delta) {
    let mut want = before.clone();
    if let Some(key) = d.rejected {
        *want.rejected.get_mut(&key).unwrap() += 1.0;
        want.rejected_total += 1.0;
    }
    want.unrouted += d.unrouted;
    want.to_nats += d.to_nats;
    want.to_socketio += d.to_socketio;
    assert_eq!(
        after, &want,
        "{what}: counters moved unexpectedly (left: after, right: expected)"
    );
}

/// A running bridge with a NATS tap on `>`, a legacy subscriber on the
/// mapped topics, a `/*` watcher and a Node client that sends the input.
struct Rig {
    nats: Nats,
    bridge: Bridge,
    tap: Agent,
    injector: Agent,
    sub: Agent,
    watcher: Agent,
    sender: Agent,
    sender_id: String,
    good: u64,
    /// Last log line written per rate-limit cause, so a second refusal of the
    /// same kind is not swallowed by the bridge's once-a-second log limiter.
    last_logged: HashMap<&'static str, Instant>,
}

impl Rig {
    fn start() -> Rig {
        let nats = Nats::start();
        let bridge = Bridge::start(&nats);
        let tap = Agent::nats(Lang::Node);
        tap.nats_connect(&nats.url());
        tap.sub("all", ">");
        let injector = Agent::nats(Lang::Node);
        injector.nats_connect(&nats.url());
        let sub = Agent::sio(Lang::Node);
        sub.connect(&bridge.url(), json!({}));
        sub.subscribe(GOOD_TOPIC);
        let watcher = Agent::sio(Lang::Node);
        watcher.connect(&bridge.url(), json!({}));
        watcher.subscribe("/*");
        let sender = Agent::sio(Lang::Node);
        let sender_id = sender.connect(&bridge.url(), json!({}));
        let mut rig = Rig {
            nats,
            bridge,
            tap,
            injector,
            sub,
            watcher,
            sender,
            sender_id,
            good: 0,
            last_logged: HashMap::new(),
        };
        // drop the System notices of the set-up
        rig.watcher.drain(SHORT, |_| true);
        rig.sub.drain(Duration::ZERO, |_| true);
        rig.good_publish("set-up");
        rig
    }

    /// Waits until a refusal of `cause` would be logged again: the bridge
    /// logs a cause at most once a second, counted from when it wrote the
    /// line, so the gap runs from when the test saw that line (`logged`).
    fn space(&mut self, cause: &'static str) {
        if let Some(t) = self.last_logged.get(cause) {
            let gap = Duration::from_millis(1100);
            let since = t.elapsed();
            if since < gap {
                thread::sleep(gap - since);
            }
        }
    }

    /// Notes that the line for `cause` has just been seen in the log.
    fn logged(&mut self, cause: &'static str) {
        self.last_logged.insert(cause, Instant::now());
    }

    /// A good trade on /accounts/22/trades (a broadcast route): arrives once
    /// on NATS, once at the legacy subscriber and once at the `/*` watcher,
    /// and nothing came before it.
    fn good_publish(&mut self, after: &str) {
        self.good += 1;
        let id = format!("good-{}", self.good);
        let trade = json!({"id": id, "accountId": 22, "security": "ACME", "quantity": 1, "side": "Buy", "state": "New"});
        self.sender.publish(GOOD_TOPIC, "Trade", trade.clone());
        let m = self.tap.next_msg("all", WAIT);
        assert_eq!(m["subject"], GOOD_SUBJECT, "after {after}: {m}");
        assert_eq!(body(&m)["payload"], trade, "after {after}");
        assert_eq!(body(&m)["from"], self.sender_id.as_str(), "after {after}");
        let e = self.sub.next_publish(WAIT, |e| {
            e["topic"] == GOOD_TOPIC && e["payload"]["id"] == id.as_str()
        });
        assert_eq!(e["payload"], trade);
        assert_eq!(e["type"], "Trade");
        self.watcher
            .next_publish(WAIT, |e| e["payload"]["id"] == id.as_str());
        // Whatever the bad input produced was sent before the good message on
        // the same ordered paths, so it would be in the backlogs by now.
        let extra = self.tap.msgs("all", Duration::ZERO);
        assert!(extra.is_empty(), "after {after}: NATS saw more: {extra:#?}");
        let extra = self.sub.drain(Duration::ZERO, |e| e["ev"] == "event");
        assert!(
            extra.is_empty(),
            "after {after}: subscriber got more: {extra:#?}"
        );
        let extra = self.watcher.drain(Duration::ZERO, |e| e["ev"] == "event");
        assert!(
            extra.is_empty(),
            "after {after}: `/*` watcher got more: {extra:#?}"
        );
    }

    fn still_up(&mut self, after: &str) {
        assert!(self.bridge.proc.alive(), "bridge died after {after}");
        assert_eq!(
            self.bridge.admin("/healthz").0,
            200,
            "/healthz after {after}"
        );
        assert_eq!(self.bridge.admin("/readyz").0, 200, "/readyz after {after}");
    }

    /// Waits (bounded) until the bridge log holds `needle` `n` times.
    fn log_count_reaches(&self, needle: &str, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let c = self.bridge.log().matches(needle).count();
            if c >= n || Instant::now() > deadline {
                return c;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one bad Socket.IO event from the sender and checks everything.
    fn bad_event(&mut self, what: &str, event: &str, args: Value, ack: bool, reason: &'static str) {
        self.space(reason);
        let line = format!(
            "refused `{event}` from client {}: {}",
            self.sender_id,
            explain(reason)
        );
        let logged = self.bridge.log().matches(&line).count();
        let before = counters(&self.bridge);
        if ack {
            let a = self.sender.emit_ack(event, args.clone());
            assert_eq!(a["args"][0]["ok"], false, "{what}: ack {a}");
            assert_eq!(a["args"][0]["error"], explain(reason), "{what}: ack {a}");
            assert_eq!(
                a["args"].as_array().map(Vec::len),
                Some(1),
                "{what}: ack {a}"
            );
        } else {
            self.sender.emit(event, args.clone());
        }
        self.good_publish(what);
        let after = counters(&self.bridge);
        assert_delta(
            what,
            &before,
            &after,
            Delta {
                rejected: Some(("to_nats", reason)),
                to_nats: 1.0,
                ..Default::default()
            },
        );
        assert_eq!(
            self.log_count_reaches(&line, logged + 1),
            logged + 1,
            "{what}: expected one new log line `{line}`"
        );
        self.logged(reason);
        self.still_up(what);
    }
}

fn explain(reason: &str) -> &'static str {
    match reason {
        "no_argument" => "the event carries no argument",
        "not_object" => "the argument is not a JSON object",
        "no_topic" => "the object has no topic",
        "topic_not_string" => "the topic is not a string",
        "binary_payload" => "binary attachments are not JSON",
        "invalid_json" => "the body is not valid JSON",
        _ => panic!("no text for {reason}"),
    }
}

/// `publish` with an argument that is not an object, no argument, no topic,
/// a topic that is not a string; `subscribe` with a non-string.
#[test]
fn bad_legacy_events_are_refused_counted_and_logged() {
    let mut rig = Rig::start();
    let cases: Vec<(&str, &str, Value, bool, &'static str)> = vec![
        (
            "publish string",
            "publish",
            json!(["/trades"]),
            false,
            "not_object",
        ),
        ("publish number", "publish", json!([42]), true, "not_object"),
        (
            "publish array",
            "publish",
            json!([[{"topic": "/trades", "type": "TradeOrder", "payload": {}}]]),
            false,
            "not_object",
        ),
        ("publish null", "publish", json!([null]), true, "not_object"),
        (
            "publish no argument",
            "publish",
            json!([]),
            false,
            "no_argument",
        ),
        (
            "publish no argument, ack",
            "publish",
            json!([]),
            true,
            "no_argument",
        ),
        (
            "publish no topic",
            "publish",
            json!([{"type": "TradeOrder", "payload": {"id": "x"}}]),
            true,
            "no_topic",
        ),
        (
            "publish null topic",
            "publish",
            json!([{"topic": null, "type": "TradeOrder", "payload": {}}]),
            false,
            "no_topic",
        ),
        (
            "publish numeric topic",
            "publish",
            json!([{"topic": 22, "type": "TradeOrder", "payload": {}}]),
            false,
            "topic_not_string",
        ),
        (
            "publish object topic",
            "publish",
            json!([{"topic": {"path": "/trades"}, "payload": {}}]),
            true,
            "topic_not_string",
        ),
        (
            "subscribe number",
            "subscribe",
            json!([42]),
            true,
            "topic_not_string",
        ),
        (
            "subscribe object",
            "subscribe",
            json!([{"topic": "/trades"}]),
            false,
            "topic_not_string",
        ),
        (
            "subscribe null",
            "subscribe",
            json!([null]),
            false,
            "topic_not_string",
        ),
        (
            "subscribe no argument",
            "subscribe",
            json!([]),
            true,
            "no_argument",
        ),
        (
            "unsubscribe number",
            "unsubscribe",
            json!([7]),
            false,
            "topic_not_string",
        ),
    ];
    for (what, event, args, ack, reason) in cases {
        rig.bad_event(what, event, args, ack, reason);
    }
    // A refused subscribe joined no room: nothing published on "42" comes back.
    rig.sender.publish("42", "TradeOrder", json!({"id": "n"}));
    let w = rig.watcher.next_publish(WAIT, |_| true);
    assert_eq!(w["topic"], "42");
    rig.good_publish("publish on 42");
    assert!(rig.sender.data_messages(Duration::ZERO).is_empty());
    // The sender's connection was never closed for any of it.
    assert!(rig
        .sender
        .drain(Duration::ZERO, |e| e["ev"] == "disconnected")
        .is_empty());
    assert_eq!(counters(&rig.bridge).reconnects, 0.0);
}

/// A Node client that emits a Buffer: as the payload, and as the whole argument.
const BUFFER_CLIENT: &str = r#"
const { io } = require('socket.io-client');
const [url, mode] = process.argv.slice(1);
const s = io(url, { transports: ['websocket'], reconnection: false, forceNew: true });
const done = (o) => { process.stdout.write(JSON.stringify(o) + '\n'); s.disconnect(); process.exit(0); };
s.on('connect_error', (e) => done({ error: String(e.message) }));
s.on('connect', () => {
  const buf = Buffer.from([0x7b, 0xff, 0x00, 0x22]);
  const arg = mode === 'whole' ? buf : { topic: '/trades', type: 'TradeOrder', payload: buf };
  s.emit('publish', arg, (...ack) => done({ id: s.id, ack }));
});
setTimeout(() => done({ error: 'no ack within 10 s' }), 10000);
"#;

fn buffer_publish(url: &str, mode: &str) -> Value {
    let out = Command::new("node")
        .current_dir(root().join("tests/node"))
        .args(["-e", BUFFER_CLIENT, url, mode])
        .output()
        .expect("node");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("buffer client said {text:?}"))
}

/// Binary attachments (a Node client emitting a Buffer) are refused, with an
/// ack error, and nothing of them reaches anyone.
#[test]
fn binary_payloads_are_refused() {
    let mut rig = Rig::start();
    for mode in ["payload", "whole"] {
        rig.space("binary_payload");
        let before = counters(&rig.bridge);
        let out = buffer_publish(&rig.bridge.url(), mode);
        let id = out["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{out}"))
            .to_string();
        assert_eq!(
            out["ack"],
            json!([{"ok": false, "error": explain("binary_payload")}]),
            "{mode}"
        );
        rig.good_publish(mode);
        let after = counters(&rig.bridge);
        assert_delta(
            mode,
            &before,
            &after,
            Delta {
                rejected: Some(("to_nats", "binary_payload")),
                to_nats: 1.0,
                ..Default::default()
            },
        );
        let line = format!(
            "refused `publish` from client {id}: {}",
            explain("binary_payload")
        );
        assert_eq!(
            rig.log_count_reaches(&line, 1),
            1,
            "{mode}: log line `{line}`"
        );
        rig.logged("binary_payload");
        rig.still_up(mode);
    }
}

/// A topic whose subject would be longer than nats-server takes in one
/// protocol line (4 KiB by default; the server closes the connection of a
/// client that sends more) is refused with a reason, counted and logged,
/// and the NATS connection stays up for everything else.
#[test]
fn a_topic_whose_subject_would_be_too_long_is_refused_and_nats_stays_connected() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let sub = Agent::nats(Lang::Python);
    sub.nats_connect(&nats.url());
    sub.sub("good", GOOD_SUBJECT);
    let client = Agent::sio(Lang::Node);
    client.connect(&bridge.url(), json!({}));

    let account = "7".repeat(4000);
    let topic = format!("/accounts/{account}/trades");
    let subject_len = format!("trades.account.{account}.updated").len();
    let a = client.emit_ack(
        "publish",
        json!([{"topic": topic, "type": "Trade", "payload": {"n": 0}}]),
    );
    assert_eq!(a["args"][0]["ok"], false, "{a}");
    assert_eq!(
        a["args"][0]["error"],
        format!(
            "the topic maps to a NATS subject of {subject_len} bytes; at most 3072 are published"
        ),
        "{a}"
    );
    let labels = [
        ("route", "account-trades"),
        ("direction", "to_nats"),
        ("reason", "subject_too_long"),
    ];
    assert_eq!(bridge.metric(REJECTED, &labels), 1.0);
    assert!(bridge.log().contains(&format!(
        "refused a message on route account-trades: its subject would be {subject_len} bytes"
    )));

    let a = client.emit_ack(
        "publish",
        json!([{"topic": GOOD_TOPIC, "type": "Trade", "payload": {"n": 1}}]),
    );
    assert_eq!(a["args"][0]["ok"], true, "{a}");
    let msg = sub.next_msg("good", WAIT);
    assert_eq!(body(&msg)["payload"], json!({"n": 1}));
    assert_eq!(bridge.metric(RECONNECTS, &[]), 0.0, "{}", bridge.log());
    assert!(
        !bridge.log().contains("disconnected from"),
        "{}",
        bridge.log()
    );
}

/// Event arguments that are not JSON: trade-feed closes such a client; the
/// bridge refuses the event (an ack says why), counts and logs it, and the
/// client stays connected. No Socket.IO library sends these: the packets
/// are posted on a raw Engine.IO polling session.
#[test]
fn events_whose_arguments_are_not_json_are_refused_and_the_client_stays() {
    use common::http::PollingSession;
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let sub = Agent::nats(Lang::Python);
    sub.nats_connect(&nats.url());
    sub.sub("good", GOOD_SUBJECT);
    let client = PollingSession::connect(bridge.port);
    let invalid = |b: &Bridge| {
        b.metric(
            REJECTED,
            &[("direction", "to_nats"), ("reason", "invalid_json")],
        )
    };
    let before = invalid(&bridge);

    client.send(r#"421["publish",{"topic":"/accounts/22/trades","payload":{"id":"#);
    let ack = client.poll_for("431", WAIT);
    assert_eq!(
        ack,
        r#"431[{"error":"the body is not valid JSON","ok":false}]"#
    );
    client.send(r#"422["subscribe","/accounts/22/trades""#);
    let ack = client.poll_for("432", WAIT);
    assert_eq!(
        ack,
        r#"432[{"error":"the body is not valid JSON","ok":false}]"#
    );
    assert_eq!(invalid(&bridge), before + 2.0);
    let log = bridge.log();
    assert!(
        log.contains("refused `publish` from client") && log.contains("the body is not valid JSON"),
        "{log}"
    );

    // Still connected: a good publish goes through, to NATS once.
    client.send(&format!(
        r#"423["publish",{{"topic":"{GOOD_TOPIC}","type":"Trade","payload":{{"n":1}}}}]"#
    ));
    assert_eq!(client.poll_for("433", WAIT), r#"433[{"ok":true}]"#);
    let msg = sub.next_msg("good", WAIT);
    assert_eq!(body(&msg)["payload"], json!({"n": 1}));
    assert!(sub.msgs("good", SHORT).is_empty());
}

/// A NATS body that is not JSON, or not UTF-8, on a mapped subject reaches no
/// legacy subscriber and is counted as invalid_json on its route.
#[test]
fn bad_nats_bodies_are_refused() {
    let mut rig = Rig::start();
    let subject = "trades.account.22.updated";
    let truncated = "{\"type\":\"Trade\",\"payload\":";
    let cases: Vec<(&str, Value, usize)> = vec![
        ("not JSON", json!({"data": truncated}), truncated.len()),
        (
            "not UTF-8",
            json!({"b64": base64_of(&[0x22, 0xff, 0xfe, 0x22])}),
            4,
        ),
        ("plain text", json!({"data": "hello"}), 5),
    ];
    for (i, (what, data, len)) in cases.into_iter().enumerate() {
        rig.space("nats_invalid_json");
        let line = format!(
            "ignored a {len}-byte message on {subject}: the body is not valid JSON (route account-trades)"
        );
        let logged = rig.bridge.log().matches(&line).count();
        let before = counters(&rig.bridge);
        let mut cmd = json!({"cmd": "pub", "subject": subject});
        for (k, v) in data.as_object().unwrap() {
            cmd[k] = v.clone();
        }
        rig.injector.cmd(cmd);
        // the tap sees the injected message itself, and nothing else
        let m = rig.tap.next_msg("all", WAIT);
        assert_eq!(m["subject"], subject);
        // a good NATS message after it is still delivered, once
        let trade = json!({"id": format!("nats-{i}"), "accountId": 22, "security": "ACME"});
        rig.injector.pub_json(subject, &trade);
        let m = rig.tap.next_msg("all", WAIT);
        assert_eq!(body(&m), trade);
        let e = rig
            .sub
            .next_publish(WAIT, |e| e["topic"] == "/accounts/22/trades");
        assert_eq!(e["payload"], trade, "{what}: the bad body came first?");
        assert_eq!(e["type"], "Trade");
        let e = rig.watcher.next_publish(WAIT, |_| true);
        assert_eq!(e["payload"], trade, "{what}: the bad body came first?");
        rig.good_publish(what);
        let after = counters(&rig.bridge);
        assert_delta(
            what,
            &before,
            &after,
            Delta {
                rejected: Some(("to_socketio", "invalid_json")),
                to_nats: 1.0,
                to_socketio: 1.0,
                ..Default::default()
            },
        );
        assert_eq!(
            metric_value(
                &rig.bridge.admin("/metrics").1,
                REJECTED,
                &[
                    ("route", "account-trades"),
                    ("direction", "to_socketio"),
                    ("reason", "invalid_json")
                ]
            ),
            (i + 1) as f64
        );
        assert_eq!(
            rig.log_count_reaches(&line, logged + 1),
            logged + 1,
            "{what}: log line `{line}`"
        );
        rig.logged("nats_invalid_json");
        rig.still_up(what);
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The legacy hub, for what it does with a publish on any topic.
struct HubSide {
    _hub: Hub,
    sub: Agent,
    sender: Agent,
    sender_id: String,
}

impl HubSide {
    fn start() -> HubSide {
        let hub = Hub::start();
        let sub = Agent::sio(Lang::Node);
        sub.connect(&hub.url(), json!({}));
        let sender = Agent::sio(Lang::Node);
        let sender_id = sender.connect(&hub.url(), json!({}));
        HubSide {
            _hub: hub,
            sub,
            sender,
            sender_id,
        }
    }
}

/// The envelope with the per-server parts (sender id, clock) normalised.
fn normalise(env: &Value, sender_id: &str) -> Value {
    let mut e = env.clone();
    assert_eq!(e["from"], sender_id, "from must be the sender's id: {env}");
    assert!(
        e["date"].as_u64().is_some_and(|d| d > 1_700_000_000_000),
        "{env}"
    );
    e["from"] = json!("<sender>");
    e["date"] = json!(0);
    e
}

/// Topics with no route and topics that must never become NATS subjects are
/// served to legacy subscribers exactly as the legacy hub serves them, are
/// counted as unrouted, and never reach NATS or upset the NATS connection.
#[test]
fn unrouted_and_unsafe_topics_stay_local() {
    let mut rig = Rig::start();
    let hub = HubSide::start();
    let unrouted = [
        "/news",
        "/accounts/abc/positions",
        "/trades/",
        "/TRADES",
        "/accounts/22/trades/extra",
    ];
    let unsafe_topics = [
        "/accounts/*/trades",
        "/accounts/>/x",
        "/accounts/a.b/trades",
        "/accounts/22 /trades",
        "/*",
        "/accounts/>/trades",
        "/accounts/22\t/trades",
    ];
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&rig.bridge.url(), json!({}));
    for (n, topic) in unrouted.iter().chain(unsafe_topics.iter()).enumerate() {
        let what = format!("publish on {topic:?}");
        if *topic != "/*" {
            legacy.subscribe(topic);
            hub.sub.subscribe(topic);
        } else {
            legacy.subscribe("/*");
            hub.sub.subscribe("/*");
        }
        rig.watcher.drain(SHORT, |_| true);
        let before = counters(&rig.bridge);
        // with a type, then without (the hub calls it "message")
        let payload = json!({"n": n, "text": "é ™ \u{1F600}"});
        let with_type = json!([{"topic": topic, "type": "Note", "payload": payload}]);
        let untyped = json!([{"topic": topic, "payload": payload}]);
        for args in [&with_type, &untyped] {
            let ack = rig.sender.emit_ack("publish", args.clone());
            assert_eq!(ack["args"][0], json!({"ok": true}), "{what}: {ack}");
            hub.sender.emit("publish", args.clone());
            let got = legacy.next_publish(WAIT, |e| e["topic"] == *topic);
            let want = hub.sub.next_publish(WAIT, |_| true);
            assert_eq!(
                normalise(&got, &rig.sender_id),
                normalise(&want, &hub.sender_id),
                "{what}: bridge and hub envelopes differ"
            );
            // the `/*` watcher gets it once, like every publish
            let w = rig.watcher.next_publish(WAIT, |e| e["topic"] == *topic);
            assert_eq!(w, got);
        }
        rig.good_publish(&what);
        // (once in `/*`, the client also gets the good traffic)
        let extra: Vec<Value> = legacy
            .data_messages(Duration::ZERO)
            .into_iter()
            .filter(|e| !(e["topic"] == GOOD_TOPIC && e["from"] == rig.sender_id.as_str()))
            .collect();
        assert!(extra.is_empty(), "{what}: doubled: {extra:#?}");
        let after = counters(&rig.bridge);
        assert_delta(
            &what,
            &before,
            &after,
            Delta {
                unrouted: 2.0,
                to_nats: 1.0,
                ..Default::default()
            },
        );
        rig.still_up(&what);
        if *topic != "/*" {
            legacy.emit("unsubscribe", json!([topic]));
            hub.sub.emit("unsubscribe", json!([topic]));
        }
    }
    let extra: Vec<Value> = legacy
        .data_messages(SHORT)
        .into_iter()
        .filter(|e| !(e["topic"] == GOOD_TOPIC && e["from"] == rig.sender_id.as_str()))
        .collect();
    assert!(extra.is_empty(), "{extra:#?}");
    assert!(hub.sub.data_messages(Duration::ZERO).is_empty());
    // nothing ever reached NATS but the good orders, and the bridge's NATS
    // connection never saw an error for it
    assert!(rig.tap.msgs("all", SHORT).is_empty());
    let c = counters(&rig.bridge);
    assert_eq!(c.reconnects, 0.0);
    assert_eq!(c.dropped, 0.0);
    let log = rig.bridge.log().to_lowercase();
    for bad in [
        "invalid subject",
        "permissions",
        "reconnect",
        "nats server error",
        "nats client error",
    ] {
        assert!(!log.contains(bad), "bridge log mentions {bad:?}:\n{log}");
    }
    let nats_log = rig.nats.proc.log_text().to_lowercase();
    for bad in ["invalid", "permissions", "parser error"] {
        assert!(
            !nats_log.contains(bad),
            "nats-server log mentions {bad:?}:\n{nats_log}"
        );
    }
}
