//! Bug cases about restarts and reconnects (B06, B09, B10 in
//! /work/shared/cases/bug-cases.md) and two bridges sharing one NATS.
//!
//! Network cuts go through `FaultProxy`, a small loopback TCP relay that can
//! drop every connection, refuse new ones for a while, and record what the
//! client actually sent.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const IDLE_WARNING: &str = "TRADEFEED_BRIDGE_SOCKETIO__IDLE_SUBSCRIPTION_WARNING";
const RECONNECT: Duration = Duration::from_secs(30);

fn order(id: &str) -> Value {
    json!({"id": id, "accountId": 22, "security": "ACME", "quantity": 100, "side": "Buy"})
}

fn is_data(e: &Value) -> bool {
    e["ev"] == "event" && e["event"] == "publish" && e["args"][0]["from"] != "System"
}

fn payload_id(env: &Value) -> String {
    env["payload"]["id"].as_str().unwrap_or("?").to_string()
}

/// Data envelopes matching `pred`: waits until `n` have arrived (at most
/// `timeout`), then takes whatever else matches within a quiet period.
fn collect(
    agent: &Agent,
    n: usize,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.try_expect(left, |e| is_data(e) && pred(&e["args"][0])) {
            Some(e) => got.push(e["args"][0].clone()),
            None => break,
        }
    }
    let extra = agent.drain(SHORT, |e| is_data(e) && pred(&e["args"][0]));
    got.extend(extra.into_iter().map(|e| e["args"][0].clone()));
    got
}

/// NATS messages on `sid`: waits for `n`, then a quiet period for extras.
fn collect_msgs(agent: &Agent, sid: &str, n: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.try_expect(left, |e| e["ev"] == "msg" && e["sid"] == sid) {
            Some(m) => got.push(m),
            None => break,
        }
    }
    got.extend(agent.msgs(sid, SHORT));
    got
}

/// The System "New Joiner" notices for `id` on `topic` received within `quiet`, consumed.
fn join_notices(agent: &Agent, id: &str, topic: &str, quiet: Duration) -> usize {
    let want = format!("New Joiner {id} to topic {topic}");
    agent
        .drain(quiet, |e| {
            e["ev"] == "event"
                && e["args"][0]["from"] == "System"
                && e["args"][0]["payload"]["message"] == want.as_str()
        })
        .len()
}

fn wait_join_notice(agent: &Agent, id: &str, topic: &str) {
    let want = format!("New Joiner {id} to topic {topic}");
    agent.expect(&want, WAIT, |e| {
        e["ev"] == "event"
            && e["args"][0]["from"] == "System"
            && e["args"][0]["payload"]["message"] == want.as_str()
    });
}

fn reconnected(agent: &Agent) -> String {
    let ev = agent.expect("reconnect", RECONNECT, |e| e["ev"] == "connected");
    ev["id"].as_str().unwrap_or_default().to_string()
}

/// Polls a metric until it equals `want` (at most `timeout`); returns the last value.
fn wait_metric(
    b: &Bridge,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    timeout: Duration,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = b.metric(name, labels);
        if v == want || Instant::now() >= deadline {
            return v;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The last "forwarded" line the bridge logged for `route` on shutdown.
fn forwarded_line(log: &str, route: &str) -> Option<String> {
    let tag = format!("route={route} ");
    log.lines()
        .rfind(|l| l.contains("forwarded") && l.contains(&tag))
        .map(str::to_string)
}

/// SIGTERM: the bridge exits 0 within a few seconds and logs its counts.
fn stop_gracefully(bridge: &mut Bridge, trades_to_nats: u64) {
    let t0 = Instant::now();
    let status = bridge
        .proc
        .terminate(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("bridge still running 5 s after SIGTERM:\n{}", bridge.log()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    let log = bridge.log();
    let stopped = log
        .lines()
        .filter(|l| l.trim_end().ends_with("stopped"))
        .count();
    assert!(stopped >= 1, "no \"stopped\" line:\n{log}");
    let line = forwarded_line(&log, "trade-orders")
        .unwrap_or_else(|| panic!("no forwarded count for trade-orders:\n{log}"));
    assert!(
        line.contains(&format!("to_nats={trades_to_nats} ")),
        "trade-orders: {line}"
    );
    for route in ["account-trades", "account-positions"] {
        let line = forwarded_line(&log, route)
            .unwrap_or_else(|| panic!("no forwarded count for {route}:\n{log}"));
        assert!(
            line.contains("to_nats=0 ") && line.ends_with("to_socketio=0"),
            "{line}"
        );
    }
}

// ------------------------------------------------------------------ B06

/// B06: after a restart on the same port, a client that subscribes in its
/// connect handler gets everything once; a TraderX-style subscribe-once client
/// is connected but deaf, and the bridge reports it (gauge and warning).
fn restart_with_subscribe_once_client(graceful: bool) {
    let nats = Nats::start();
    let mut bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: vec![(IDLE_WARNING, "1s".into())],
            ..Default::default()
        },
    );
    let tap = Agent::nats(Lang::Node);
    tap.nats_connect(&nats.url());
    tap.sub("orders", "trades.new");

    let js = Agent::sio(Lang::Node);
    let js_id = js.connect(&bridge.url(), json!({"subscribeOnConnect": ["/trades"]}));
    wait_join_notice(&js, &js_id, "/trades");
    // like TraderX's trade-processor: one subscribe, emitted before the first connect
    let once = Agent::sio(Lang::Java);
    once.cmd(json!({"cmd": "connect", "url": bridge.url()}));
    once.emit("subscribe", json!(["/trades"]));
    let once_id = reconnected(&once);
    wait_join_notice(&once, &once_id, "/trades");
    let publisher = Agent::sio(Lang::Java);
    publisher.connect(&bridge.url(), json!({}));

    // before the restart both subscribers get the order
    publisher.publish("/trades", "TradeOrder", order("B-0"));
    for a in [&js, &once] {
        let got = collect(a, 1, WAIT, |e| e["topic"] == "/trades");
        assert_eq!(
            got.iter().map(payload_id).collect::<Vec<_>>(),
            ["B-0"],
            "{}",
            a.name
        );
    }
    assert_eq!(collect_msgs(&tap, "orders", 1, WAIT).len(), 1);

    if graceful {
        stop_gracefully(&mut bridge, 1);
    } else {
        bridge.proc.kill();
    }
    bridge.start_again();
    bridge.wait_ready(Duration::from_secs(15));

    let js_id = reconnected(&js);
    wait_join_notice(&js, &js_id, "/trades");
    let once_id = reconnected(&once);
    let publisher_id = reconnected(&publisher);
    for i in 1..=5 {
        publisher.publish("/trades", "TradeOrder", order(&format!("B-{i}")));
    }

    let got = collect(&js, 5, WAIT, |e| e["topic"] == "/trades");
    let ids: Vec<String> = got.iter().map(payload_id).collect();
    assert_eq!(
        ids,
        ["B-1", "B-2", "B-3", "B-4", "B-5"],
        "resubscribing client"
    );
    assert!(got.iter().all(|e| e["from"] == publisher_id.as_str()));
    let deaf = once.data_messages(Duration::from_secs(1));
    assert!(
        deaf.is_empty(),
        "the subscribe-once client was not in the room: {deaf:?}"
    );
    let on_nats = collect_msgs(&tap, "orders", 5, WAIT);
    let ids: Vec<String> = on_nats.iter().map(|m| payload_id(&body(m))).collect();
    assert_eq!(ids, ["B-1", "B-2", "B-3", "B-4", "B-5"], "trades.new");

    // The deaf client is visible: counted, and named in a warning. The
    // publisher (no subscription, but it publishes) and the resubscribed
    // client are not counted.
    let gauge = "tradefeed_bridge_socketio_clients_without_subscription";
    let n = wait_metric(&bridge, gauge, &[], 1.0, Duration::from_secs(5));
    assert_eq!(n, 1.0, "{gauge}");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(bridge.metric(gauge, &[]), 1.0, "{gauge} after another tick");
    let log = bridge.log();
    let warned = |id: &str| {
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains("subscribed to nothing")
                && l.contains(&format!("id={id}"))
        })
    };
    assert!(warned(&once_id), "no warning names {once_id}:\n{log}");
    assert!(!warned(&js_id), "the resubscribed client was reported");

    stop_gracefully(&mut bridge, 5);
}

#[test]
fn b06_sigterm_restart_resubscribing_client_gets_all_subscribe_once_client_is_reported() {
    restart_with_subscribe_once_client(true);
}

#[test]
fn b06_kill9_restart_resubscribing_client_gets_all_subscribe_once_client_is_reported() {
    restart_with_subscribe_once_client(false);
}

// ------------------------------------------------------------------ B09

/// The bridge's own NATS subscriptions, from the server's monitoring endpoint.
fn bridge_nats_subs(monitor: u16) -> Vec<String> {
    let (status, text) = http_get(&format!("http://127.0.0.1:{monitor}/connz?subs=1"));
    assert_eq!(status, 200, "nats monitoring: {text}");
    let v: Value = serde_json::from_str(&text).expect("connz json");
    let conns = v["connections"].as_array().cloned().unwrap_or_default();
    let bridge: Vec<&Value> = conns
        .iter()
        .filter(|c| c["name"] == "tradefeed-bridge")
        .collect();
    assert_eq!(bridge.len(), 1, "one bridge connection: {text}");
    let mut subs: Vec<String> = bridge[0]["subscriptions_list"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    subs.sort();
    subs
}

/// B09: subscribe is idempotent per (socket, topic). Three subscribe events
/// give three System notices (legacy parity) but one data delivery, and the
/// bridge's NATS interest does not change.
#[test]
fn b09_repeated_subscribe_delivers_once() {
    let monitor = free_port();
    let nats = Nats::start_with(&["-m", &monitor.to_string()]);
    let bridge = Bridge::start(&nats);
    let topic = "/accounts/22/positions";
    let subs_before = bridge_nats_subs(monitor);
    assert_eq!(
        subs_before
            .iter()
            .filter(|s| s.starts_with("positions.account."))
            .count(),
        1,
        "{subs_before:?}"
    );

    let ui = Agent::sio(Lang::Node);
    let id = ui.connect(&bridge.url(), json!({}));
    ui.subscribe(topic);
    // what a client that buffers an emit and also re-subscribes on connect sends
    ui.emit("subscribe", json!([topic]));
    ui.emit("subscribe", json!([topic]));
    wait_join_notice(&ui, &id, topic);
    wait_join_notice(&ui, &id, topic);
    assert_eq!(
        join_notices(&ui, &id, topic, SHORT),
        0,
        "more than 3 notices"
    );
    assert_eq!(bridge_nats_subs(monitor), subs_before);

    let p = Agent::nats(Lang::Node);
    p.nats_connect(&nats.url());
    let position =
        json!({"accountId": 22, "security": "IBM", "quantity": 300, "updated": 1764781234560u64});
    p.pub_json("positions.account.22.updated", &position);
    let got = collect(&ui, 1, WAIT, |e| e["topic"] == topic);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["payload"], position);
    assert_eq!(got[0]["type"], "Position");
}

/// B09 with a real cut: the client's connection is dropped and refused for
/// ~3 s; meanwhile the app emits subscribe (buffered by socket.io-client),
/// and on reconnect its connect handler subscribes again. One data message.
#[test]
fn b09_network_cut_buffered_subscribe_delivers_once() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let proxy = FaultProxy::start(bridge.port);
    let topic = "/accounts/22/positions";

    let ui = Agent::sio(Lang::Node);
    let id = ui.connect(&proxy.url(), json!({"subscribeOnConnect": [topic]}));
    wait_join_notice(&ui, &id, topic);
    // let the transport upgrade settle, so the cut hits an established session
    ui.try_expect(Duration::from_secs(3), |e| e["ev"] == "upgraded");

    let cut = Instant::now();
    proxy.cut();
    ui.expect("disconnected", WAIT, |e| e["ev"] == "disconnected");
    ui.emit("subscribe", json!([topic])); // buffered: the socket is offline
    thread::sleep(Duration::from_secs(3).saturating_sub(cut.elapsed()));
    proxy.restore();

    let new_id = reconnected(&ui);
    assert_ne!(new_id, id);
    wait_join_notice(&ui, &new_id, topic);
    wait_join_notice(&ui, &new_id, topic);
    assert_eq!(
        join_notices(&ui, &new_id, topic, SHORT),
        0,
        "expected 2 subscribes after reconnect (buffered + connect handler)"
    );

    let p = Agent::nats(Lang::Node);
    p.nats_connect(&nats.url());
    let position = json!({"accountId": 22, "security": "IBM", "quantity": 7, "updated": 1u64});
    p.pub_json("positions.account.22.updated", &position);
    let got = collect(&ui, 1, WAIT, |e| e["topic"] == topic);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["payload"], position);
}

// ------------------------------------------------------------------ B10

/// B10: a Java publisher emits T-1 while the bridge is down, re-emits it 2 s
/// later (its own retry), and emits T-2 after the restart. The bridge
/// publishes exactly what reached it, in order, and adds nothing.
#[test]
fn b10_buffered_java_emits_are_published_as_received() {
    let nats = Nats::start();
    let mut bridge = Bridge::start(&nats);
    let tap = Agent::nats(Lang::Node);
    tap.nats_connect(&nats.url());
    tap.sub("orders", "trades.new");
    let sub = Agent::sio(Lang::Java);
    let sub_id = sub.connect(&bridge.url(), json!({"subscribeOnConnect": ["/trades"]}));
    wait_join_notice(&sub, &sub_id, "/trades");
    // The publisher goes through the proxy: it records what the client sends,
    // and holds the publisher back until the subscriber is in its room again.
    let proxy = FaultProxy::start(bridge.port);
    let publisher = Agent::sio(Lang::Java);
    publisher.connect(&proxy.url(), json!({}));

    let down = Instant::now();
    bridge.proc.kill();
    proxy.block();
    publisher.expect("disconnected", WAIT, |e| e["ev"] == "disconnected");
    publisher.publish("/trades", "TradeOrder", order("T-1"));
    thread::sleep(Duration::from_secs(2));
    publisher.publish("/trades", "TradeOrder", order("T-1")); // the app's own retry
    thread::sleep(Duration::from_secs(3).saturating_sub(down.elapsed()));
    bridge.start_again();
    bridge.wait_ready(Duration::from_secs(15));
    let sub_id = reconnected(&sub);
    wait_join_notice(&sub, &sub_id, "/trades");
    proxy.restore();
    let pub_id = reconnected(&publisher);
    publisher.publish("/trades", "TradeOrder", order("T-2"));

    // What the client put on the wire after the restart: the emits go out
    // once the client is connected again, possibly after its upgrade.
    let deadline = Instant::now() + WAIT;
    let mut sent = proxy.sent_text();
    while !sent.contains("\"T-2\"") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        sent = proxy.sent_text();
    }
    let wire = (
        sent.matches("\"T-1\"").count(),
        sent.matches("\"T-2\"").count(),
    );
    assert!(wire.0 >= 1 && wire.1 == 1, "on the wire: {wire:?}\n{sent}");
    let mut expected = vec!["T-1"; wire.0];
    expected.push("T-2");
    eprintln!("B10: the io.socket client sent {expected:?}");

    let msgs = collect_msgs(&tap, "orders", expected.len(), WAIT);
    let envs: Vec<Value> = msgs.iter().map(body).collect();
    assert_eq!(
        envs.iter().map(payload_id).collect::<Vec<_>>(),
        expected,
        "trades.new"
    );
    for (env, id) in envs.iter().zip(&expected) {
        assert_eq!(env["type"], "TradeOrder");
        assert_eq!(env["from"], pub_id.as_str());
        assert_eq!(env["topic"], "trades.new");
        assert!(env["date"].as_u64().is_some_and(|d| d > 1_700_000_000_000));
        assert_eq!(env["payload"], order(id));
    }
    let got = collect(&sub, expected.len(), WAIT, |e| e["topic"] == "/trades");
    assert_eq!(
        got.iter().map(payload_id).collect::<Vec<_>>(),
        expected,
        "Java subscriber"
    );
    for (env, id) in got.iter().zip(&expected) {
        assert_eq!(env["type"], "TradeOrder");
        assert_eq!(env["from"], pub_id.as_str());
        assert_eq!(env["payload"], order(id));
    }
    let n = expected.len() as f64;
    assert_eq!(
        bridge.metric("tradefeed_bridge_legacy_publishes_total", &[]),
        n
    );
    let forwarded = [("route", "trade-orders"), ("direction", "to_nats")];
    assert_eq!(
        bridge.metric("tradefeed_bridge_messages_forwarded_total", &forwarded),
        n
    );
}

// ------------------------------------------------------------------ two bridges

fn trade(id: &str) -> Value {
    json!({"id": id, "accountId": 22, "security": "ACME", "side": "Buy", "state": "Settled",
           "quantity": 100, "created": 1764781234000u64, "updated": 1764781234560u64})
}

/// `n` ids `prefix-0` .. `prefix-(n-1)`.
fn series(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn only(ids: &[String], prefix: &str) -> Vec<String> {
    let tag = format!("{prefix}-");
    ids.iter()
        .filter(|i| i.starts_with(&tag))
        .cloned()
        .collect()
}

/// The numeric suffixes of `prefix-*` ids, in arrival order.
fn suffixes(ids: &[String], prefix: &str) -> Vec<usize> {
    only(ids, prefix)
        .iter()
        .filter_map(|i| i.rsplit('-').next()?.parse().ok())
        .collect()
}

/// Two bridges on one NATS, on a broadcast route: legacy publishers on each,
/// legacy subscribers on each, a NATS publisher and a NATS tap. Every message
/// reaches every subscriber once and nothing loops between the bridges.
#[test]
fn two_bridges_on_one_nats_deliver_once_without_loops() {
    const N: usize = 200;
    const TOPIC: &str = "/accounts/22/trades";
    const SUBJECT: &str = "trades.account.22.updated";
    let nats = Nats::start();
    let b1 = Bridge::start(&nats);
    let b2 = Bridge::start(&nats);
    let tap = Agent::nats(Lang::Node);
    tap.nats_connect(&nats.url());
    tap.sub("trades", SUBJECT);

    let s1 = Agent::sio(Lang::Java);
    s1.connect(&b1.url(), json!({}));
    s1.subscribe(TOPIC);
    let s2 = Agent::sio(Lang::Node);
    s2.connect(&b2.url(), json!({}));
    s2.subscribe(TOPIC);
    let p1 = Agent::sio(Lang::Java);
    let p1_id = p1.connect(&b1.url(), json!({}));
    let p2 = Agent::sio(Lang::Node);
    let p2_id = p2.connect(&b2.url(), json!({}));
    let np = Agent::nats(Lang::Python);
    np.nats_connect(&nats.url());

    for i in 0..N {
        p1.publish(TOPIC, "Trade", trade(&format!("A-{i}")));
        p2.publish(TOPIC, "Trade", trade(&format!("B-{i}")));
        let env = json!({"type": "Trade", "from": "trade-processor", "topic": SUBJECT,
                         "date": 1764781234567u64, "payload": trade(&format!("C-{i}"))});
        np.pub_json(SUBJECT, &env);
    }

    for s in [&s1, &s2] {
        let got = collect(s, 3 * N, Duration::from_secs(60), |e| e["topic"] == TOPIC);
        let ids: Vec<String> = got.iter().map(payload_id).collect();
        assert_eq!(ids.len(), 3 * N, "{}: {} messages", s.name, ids.len());
        for prefix in ["A", "B", "C"] {
            assert_eq!(
                only(&ids, prefix),
                series(prefix, N),
                "{}: {prefix}-* once, in order",
                s.name
            );
        }
        for env in &got {
            let from = match &payload_id(env)[..1] {
                "A" => p1_id.as_str(),
                "B" => p2_id.as_str(),
                _ => "trade-processor",
            };
            assert_eq!(env["from"], from);
            assert_eq!(env["type"], "Trade");
        }
    }

    let msgs = collect_msgs(&tap, "trades", 3 * N, Duration::from_secs(30));
    let ids: Vec<String> = msgs.iter().map(|m| payload_id(&body(m))).collect();
    assert_eq!(ids.len(), 3 * N, "{SUBJECT} carried {} messages", ids.len());
    for prefix in ["A", "B", "C"] {
        assert_eq!(
            only(&ids, prefix),
            series(prefix, N),
            "{SUBJECT}: {prefix}-*"
        );
    }

    // Each bridge sent its own publisher's messages and delivered the other
    // two series. Its own publishes never come back to it (no_echo), so
    // there is nothing to suppress.
    let to_nats = [("route", "account-trades"), ("direction", "to_nats")];
    let to_sio = [("route", "account-trades"), ("direction", "to_socketio")];
    for b in [&b1, &b2] {
        assert_eq!(
            b.metric("tradefeed_bridge_messages_forwarded_total", &to_nats),
            N as f64
        );
        assert_eq!(
            b.metric("tradefeed_bridge_messages_forwarded_total", &to_sio),
            2.0 * N as f64
        );
    }
}

/// Two bridges on one NATS, on the point-to-point route `/trades`: each
/// bridge's legacy room is one consumer of the queue group, so every order,
/// from either bridge's legacy publisher or from NATS, reaches exactly one of
/// the two rooms, once; a plain NATS tap still sees every order once.
#[test]
fn two_bridges_on_one_nats_hand_each_order_to_one_room() {
    const N: usize = 150;
    let nats = Nats::start();
    let b1 = Bridge::start(&nats);
    let b2 = Bridge::start(&nats);
    let tap = Agent::nats(Lang::Node);
    tap.nats_connect(&nats.url());
    tap.sub("orders", "trades.new");

    let s1 = Agent::sio(Lang::Java);
    s1.connect(&b1.url(), json!({}));
    s1.subscribe("/trades");
    let s2 = Agent::sio(Lang::Node);
    s2.connect(&b2.url(), json!({}));
    s2.subscribe("/trades");
    let p1 = Agent::sio(Lang::Java);
    p1.connect(&b1.url(), json!({}));
    let p2 = Agent::sio(Lang::Node);
    p2.connect(&b2.url(), json!({}));
    let np = Agent::nats(Lang::Python);
    np.nats_connect(&nats.url());
    // Both bridges must have joined the queue group before the first order.
    for b in [&b1, &b2] {
        let deadline = Instant::now() + WAIT;
        while !b.log().contains("joined the queue group") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        assert!(b.log().contains("joined the queue group"), "{}", b.log());
    }

    for i in 0..N {
        p1.publish("/trades", "TradeOrder", order(&format!("A-{i}")));
        p2.publish("/trades", "TradeOrder", order(&format!("B-{i}")));
        let env = json!({"type": "TradeOrder", "from": "trade-service", "topic": "trades.new",
                         "date": 1764781234567u64, "payload": order(&format!("C-{i}"))});
        np.pub_json("trades.new", &env);
    }

    let msgs = collect_msgs(&tap, "orders", 3 * N, Duration::from_secs(30));
    let on_nats: Vec<String> = msgs.iter().map(|m| payload_id(&body(m))).collect();
    assert_eq!(on_nats.len(), 3 * N, "trades.new carried {}", on_nats.len());

    // Wait until the rooms together hold every order, then for extras.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    while got[0].len() + got[1].len() < 3 * N && Instant::now() < deadline {
        for (k, s) in [&s1, &s2].into_iter().enumerate() {
            if let Some(e) = s.try_expect(Duration::from_millis(100), |e| {
                is_data(e) && e["args"][0]["topic"] == "/trades"
            }) {
                got[k].push(payload_id(&e["args"][0]));
            }
        }
    }
    for (k, s) in [&s1, &s2].into_iter().enumerate() {
        let extra = s.drain(SHORT, |e| is_data(e) && e["args"][0]["topic"] == "/trades");
        got[k].extend(extra.iter().map(|e| payload_id(&e["args"][0])));
    }
    let mut all: Vec<String> = got.concat();
    all.sort();
    let mut want: Vec<String> = ["A", "B", "C"].iter().flat_map(|p| series(p, N)).collect();
    want.sort();
    assert_eq!(all, want, "every order in exactly one room, once");
    for (k, ids) in got.iter().enumerate() {
        for prefix in ["A", "B", "C"] {
            let seq = suffixes(ids, prefix);
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "room {k}: {prefix}-* out of order: {seq:?}"
            );
        }
    }
    eprintln!(
        "two bridges, one queue group: {} orders to room 1, {} to room 2",
        got[0].len(),
        got[1].len()
    );

    let to_nats = [("route", "trade-orders"), ("direction", "to_nats")];
    let to_sio = [("route", "trade-orders"), ("direction", "to_socketio")];
    let delivered: f64 = [&b1, &b2]
        .iter()
        .map(|b| b.metric("tradefeed_bridge_messages_forwarded_total", &to_sio))
        .sum();
    assert_eq!(delivered, 3.0 * N as f64);
    for b in [&b1, &b2] {
        assert_eq!(
            b.metric("tradefeed_bridge_messages_forwarded_total", &to_nats),
            N as f64
        );
    }
}

// ------------------------------------------------------------------ fault proxy

/// A loopback TCP relay to the bridge that can cut every connection and
/// refuse new ones, and keeps what clients sent (for B10).
struct FaultProxy {
    port: u16,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct ProxyShared {
    blocked: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every open relay, to shut them down on a cut.
    open: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// Client-to-server bytes, one buffer per relayed connection.
    sent: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
}

/// Client bytes kept per connection (enough for these tests).
const CAPTURE_LIMIT: usize = 1 << 20;

impl FaultProxy {
    fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ProxyShared::default());
        let s = shared.clone();
        let acceptor = thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if !s.blocked.load(Ordering::SeqCst) {
                            relay(&s, client, upstream);
                        } // else dropped: the client sees the connection closed
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FaultProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Refuses new connections (open ones stay).
    fn block(&self) {
        self.shared.blocked.store(true, Ordering::SeqCst);
    }

    /// Drops every open connection and refuses new ones.
    fn cut(&self) {
        self.block();
        for (a, b) in self.shared.open.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.shared.blocked.store(false, Ordering::SeqCst);
    }

    /// Everything clients sent, as text: HTTP as it is, WebSocket frames unmasked.
    fn sent_text(&self) -> String {
        let mut out = String::new();
        for buf in self.shared.sent.lock().unwrap().iter() {
            let bytes = buf.lock().unwrap().clone();
            out.push_str(&client_stream_text(&bytes));
            out.push('\n');
        }
        out
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn relay(s: &Arc<ProxyShared>, client: TcpStream, upstream: u16) {
    let _ = client.set_nonblocking(false);
    let Ok(server) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], upstream).into(), Duration::from_secs(1))
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let capture = Arc::new(Mutex::new(Vec::new()));
    s.sent.lock().unwrap().push(capture.clone());
    let clones = (client.try_clone(), server.try_clone());
    let (Ok(c2), Ok(s2)) = clones else { return };
    if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
        s.open.lock().unwrap().push((c3, s3));
    }
    thread::spawn(move || pump(client, server, Some(capture)));
    thread::spawn(move || pump(s2, c2, None));
}

/// Copies until either side closes, then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, capture: Option<Arc<Mutex<Vec<u8>>>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = &capture {
            let mut c = c.lock().unwrap();
            if c.len() + n <= CAPTURE_LIMIT {
                c.extend_from_slice(&buf[..n]);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A client's byte stream as text. After a WebSocket upgrade request the
/// frames are unmasked, so the Socket.IO packets can be read.
fn client_stream_text(bytes: &[u8]) -> String {
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    let head = String::from_utf8_lossy(&bytes[..head_end.unwrap_or(bytes.len())]);
    let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
    match head_end {
        Some(end) if upgrade => format!("{head}{}", ws_client_frames(&bytes[end..])),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn ws_client_frames(mut b: &[u8]) -> String {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let mut len = (b[1] & 0x7f) as usize;
        let mut i = 2;
        if len == 126 {
            if b.len() < 4 {
                break;
            }
            len = u16::from_be_bytes([b[2], b[3]]) as usize;
            i = 4;
        } else if len == 127 {
            if b.len() < 10 {
                break;
            }
            len = u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize;
            i = 10;
        }
        let mask = if b[1] & 0x80 != 0 {
            if b.len() < i + 4 {
                break;
            }
            i += 4;
            Some([b[i - 4], b[i - 3], b[i - 2], b[i - 1]])
        } else {
            None
        };
        if b.len() < i + len {
            break;
        }
        let data = &b[i..i + len];
        out.extend(data.iter().enumerate().map(|(j, x)| match mask {
            Some(k) => x ^ k[j % 4],
            None => *x,
        }));
        out.push(b'\n');
        b = &b[i + len..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ------------------------------------------------- point-to-point, NATS restart

/// After a NATS restart, from the server's connection list: whether the
/// bridge's primary connection is back, and whether its queue-member
/// connection has subscribed to `subject` again.
fn reconnect_progress(monitor: u16, subject: &str) -> (bool, bool) {
    let (status, text) = http_get(&format!("http://127.0.0.1:{monitor}/connz?subs=1"));
    if status != 200 {
        return (false, false);
    }
    let v: Value = serde_json::from_str(&text).expect("connz json");
    let conns = v["connections"].as_array().cloned().unwrap_or_default();
    let primary = conns.iter().any(|c| c["name"] == "tradefeed-bridge");
    let member = conns.iter().any(|c| {
        c["name"] == "tradefeed-bridge-queue-member"
            && c["subscriptions_list"]
                .as_array()
                .is_some_and(|l| l.iter().any(|s| s == subject))
    });
    (primary, member)
}

/// The bridge's two NATS connections come back from a NATS restart each
/// with its own back-off. Orders a legacy producer publishes once the
/// primary connection is back but before the queue-member connection has
/// subscribed again would find the queue group empty: they still reach the
/// legacy processor, once each. Orders flow while the two come back, eight
/// restarts in a row; in about half of them the primary connection is back
/// first (the window), as nats-server's connection list shows.
#[test]
fn point_to_point_orders_sent_while_the_queue_member_reconnects_reach_the_legacy_processor() {
    const ROUNDS: usize = 8;
    let monitor = free_port();
    let mut nats = Nats::start_with(&["-m", &monitor.to_string()]);
    let bridge = Bridge::start(&nats);
    let processor = Agent::sio(Lang::Node);
    processor.connect(&bridge.url(), json!({}));
    processor.subscribe("/trades");
    let member = [("route", "trade-orders")];
    assert_eq!(
        wait_metric(&bridge, "tradefeed_bridge_queue_member", &member, 1.0, WAIT),
        1.0,
        "{}",
        bridge.log()
    );
    let service = Agent::sio(Lang::Node);
    service.connect(&bridge.url(), json!({}));

    let mut sent = Vec::new();
    let mut windows = 0;
    for round in 0..ROUNDS {
        nats.stop();
        assert_eq!(
            wait_metric(&bridge, "tradefeed_bridge_nats_connected", &[], 0.0, WAIT),
            0.0
        );
        // Down long enough for the back-off to spread the two connections.
        thread::sleep(Duration::from_millis(1500));
        nats.start_again();
        let deadline = Instant::now() + RECONNECT;
        let mut window = false;
        for i in 0.. {
            let id = format!("R{round}-{i}");
            service.publish("/trades", "TradeOrder", order(&id));
            sent.push(id);
            match reconnect_progress(monitor, "trades.new") {
                (true, true) => break,
                (true, false) => window = true,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "the bridge did not reconnect\n{}",
                bridge.log()
            );
            thread::sleep(Duration::from_millis(5));
        }
        windows += usize::from(window);
        assert_eq!(
            wait_metric(
                &bridge,
                "tradefeed_bridge_queue_member",
                &member,
                1.0,
                RECONNECT
            ),
            1.0,
            "{}",
            bridge.log()
        );
    }
    eprintln!("{windows} of {ROUNDS} restarts had the primary connection back first");

    let got = collect(&processor, sent.len(), Duration::from_secs(30), |env| {
        env["topic"] == "/trades"
    });
    let ids: Vec<String> = got.iter().map(payload_id).collect();
    let seen = counts(&ids);
    let missing: Vec<&String> = sent.iter().filter(|id| !seen.contains_key(*id)).collect();
    let twice: Vec<&String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    let undeliverable = bridge.metric(
        "tradefeed_bridge_messages_dropped_total",
        &[("route", "trade-orders"), ("reason", "undeliverable")],
    );
    assert!(
        missing.is_empty() && twice.is_empty() && ids.len() == sent.len(),
        "{} of {} orders missing {missing:?}, twice {twice:?}, undeliverable counted {undeliverable}\n{}",
        missing.len(),
        sent.len(),
        bridge.log()
    );
    assert_eq!(undeliverable, 0.0);
}
