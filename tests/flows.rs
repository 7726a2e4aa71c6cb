//! The TraderX flows through the bridge in server mode, with exact payloads,
//! using the client libraries TraderX uses on each side.

mod common;

use common::*;
use serde_json::json;

fn order(id: &str) -> serde_json::Value {
    json!({"id": id, "accountId": 22214, "security": "MSFT", "quantity": 100, "side": "Buy"})
}

/// A TradeOrder published by a legacy client on /trades arrives once on
/// trades.new, with the envelope and the origin header.
fn trade_order_reaches_nats(publisher: Lang, subscriber: Lang) {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let sub = Agent::nats(subscriber);
    sub.nats_connect(&nats.url());
    sub.sub("orders", "trades.new");
    let legacy = Agent::sio(publisher);
    let id = legacy.connect(&bridge.url(), json!({}));
    legacy.publish("/trades", "TradeOrder", order("T-1"));

    let msg = sub.next_msg("orders", WAIT);
    assert_eq!(msg["subject"], "trades.new");
    let env = body(&msg);
    assert_eq!(env["type"], "TradeOrder");
    assert_eq!(env["from"], id.as_str());
    assert_eq!(env["topic"], "trades.new");
    assert!(env["date"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(env["payload"], order("T-1"));
    assert!(header(&msg, "Tradefeed-Bridge-Origin").is_some_and(|o| o.starts_with("tfb-")));
    // The subject tells the legacy topic and the body the sender: no more
    // headers for every subscriber to parse.
    assert_eq!(header(&msg, "Tradefeed-Legacy-Topic"), None);
    assert_eq!(header(&msg, "Tradefeed-Legacy-From"), None);
    assert!(
        sub.msgs("orders", SHORT).is_empty(),
        "the order arrived twice"
    );
}

#[test]
fn trade_order_node_client_to_node_nats() {
    trade_order_reaches_nats(Lang::Node, Lang::Node);
}

#[test]
fn trade_order_java_client_to_python_nats() {
    trade_order_reaches_nats(Lang::Java, Lang::Python);
}

#[test]
fn trade_order_python_client_to_java_nats() {
    trade_order_reaches_nats(Lang::Python, Lang::Java);
}

/// Position and Trade published on NATS, as an envelope and as a bare
/// payload, reach legacy subscribers once with the right `type`.
fn account_updates_reach_legacy(subscriber: Lang, publisher: Lang) {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let legacy = Agent::sio(subscriber);
    legacy.connect(&bridge.url(), json!({}));
    legacy.subscribe("/accounts/22214/positions");
    legacy.subscribe("/accounts/22214/trades");
    let p = Agent::nats(publisher);
    p.nats_connect(&nats.url());

    let position = json!({"accountId": 22214, "security": "IBM", "quantity": 300, "updated": 1764781234560u64});
    let trade = json!({"id": "6f1c2b9e-0000-4000-8000-000000000001", "accountId": 22214, "security": "IBM",
                       "side": "Buy", "state": "Settled", "quantity": 300, "created": 1764781234000u64, "updated": 1764781234560u64});
    // envelope bodies keep type, from, date and payload
    p.pub_json(
        "positions.account.22214.updated",
        &json!({"type": "Position", "from": "trade-processor", "topic": "positions.account.22214.updated",
                "date": 1764781234567u64, "payload": position}),
    );
    let env = legacy.next_publish(WAIT, |e| e["topic"] == "/accounts/22214/positions");
    assert_eq!(
        env,
        json!({"type": "Position", "from": "trade-processor", "topic": "/accounts/22214/positions",
               "date": 1764781234567u64, "payload": position})
    );
    // bare payloads are wrapped with the route's type
    p.pub_json("trades.account.22214.updated", &trade);
    let env = legacy.next_publish(WAIT, |e| e["topic"] == "/accounts/22214/trades");
    assert_eq!(env["type"], "Trade");
    assert_eq!(env["from"], "nats:trades.account.22214.updated");
    assert_eq!(env["payload"], trade);
    assert!(env["date"].as_u64().unwrap() > 1_700_000_000_000);
    p.pub_json("positions.account.22214.updated", &position);
    let env = legacy.next_publish(WAIT, |e| e["topic"] == "/accounts/22214/positions");
    assert_eq!(env["type"], "Position");
    assert_eq!(env["payload"], position);
    // another account's update does not arrive
    p.pub_json("positions.account.52355.updated", &position);
    assert!(
        legacy.data_messages(SHORT).is_empty(),
        "unexpected or doubled delivery"
    );
}

#[test]
fn account_updates_node_nats_to_java_subscriber() {
    account_updates_reach_legacy(Lang::Java, Lang::Node);
}

#[test]
fn account_updates_python_nats_to_node_subscriber() {
    account_updates_reach_legacy(Lang::Node, Lang::Python);
}

#[test]
fn account_updates_java_nats_to_python_subscriber() {
    account_updates_reach_legacy(Lang::Python, Lang::Java);
}

/// The spec's UI subscribes with a wildcard: legacy publishes on both account
/// topics reach `positions.account.22214.*` and `trades.account.22214.*`.
#[test]
fn nats_wildcard_subscriber_receives_legacy_publishes() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let ui = Agent::nats(Lang::Node);
    ui.nats_connect(&nats.url());
    ui.sub("pos", "positions.account.22214.*");
    ui.sub("trd", "trades.account.22214.*");
    let processor = Agent::sio(Lang::Java);
    processor.connect(&bridge.url(), json!({}));
    let position = json!({"accountId": 22214, "security": "AAPL", "quantity": -5, "updated": 1});
    processor.publish("/accounts/22214/positions", "Position", position.clone());
    processor.publish(
        "/accounts/22214/trades",
        "Trade",
        json!({"id": "x", "accountId": 22214}),
    );
    processor.publish("/accounts/99/positions", "Position", position.clone());
    let m = ui.next_msg("pos", WAIT);
    assert_eq!(m["subject"], "positions.account.22214.updated");
    assert_eq!(body(&m)["payload"], position);
    let m = ui.next_msg("trd", WAIT);
    assert_eq!(m["subject"], "trades.account.22214.updated");
    assert!(ui.msgs("pos", SHORT).is_empty());
    assert!(ui.msgs("trd", SHORT).is_empty());
}

/// An acknowledged publish is confirmed at once also while a NATS client
/// watches everything (`>`): the confirmation's request then has a
/// responder that never answers, so the server's "no responders" status
/// cannot be what confirms it.
#[test]
fn acks_hold_while_a_nats_client_watches_every_subject() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let watcher = Agent::nats(Lang::Node);
    watcher.nats_connect(&nats.url());
    watcher.sub("all", ">");
    watcher.sub("pos", "positions.>");
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&bridge.url(), json!({}));
    for i in 0..3 {
        let position = json!({"accountId": 22214, "security": "IBM", "quantity": i, "updated": i});
        let started = std::time::Instant::now();
        let ack = legacy.emit_ack(
            "publish",
            json!([{"topic": "/accounts/22214/positions", "type": "Position", "payload": position}]),
        );
        assert_eq!(ack["args"][0], json!({"ok": true}), "publish {i}: {ack}");
        // Unanswered, the confirmation would time out after 5 s.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "publish {i} took {:?} to be confirmed",
            started.elapsed()
        );
        let m = watcher.next_msg("pos", WAIT);
        assert_eq!(m["subject"], "positions.account.22214.updated");
        assert_eq!(body(&m)["payload"], position);
    }
    assert!(
        watcher.msgs("pos", SHORT).is_empty(),
        "a position arrived twice"
    );
    assert!(
        !bridge.log().contains("did not confirm"),
        "{}",
        bridge.log()
    );
}

/// A legacy processor that subscribes to `/trades` gets an order published
/// right after its subscription, before the bridge could join the queue
/// group on its behalf: the bridge holds the order until it has joined,
/// instead of publishing it to a group with no member (NATS would answer
/// "no responders" and the order would be counted undeliverable). Each
/// round starts with an empty room (the previous client has left and the
/// bridge has left the group), so every round crosses that window.
#[test]
fn an_order_right_after_the_first_legacy_consumer_subscribes_is_delivered() {
    const ROUNDS: usize = 25;
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let watcher = Agent::nats(Lang::Node);
    watcher.nats_connect(&nats.url());
    watcher.sub("t", "trades.new");
    let client = Agent::sio(Lang::Node);
    // each round: connect, subscribe to /trades and publish an order at
    // once, wait for the join notice, the ack and the order back from the
    // room, disconnect
    client.cmd(
        json!({"cmd": "iterate", "url": bridge.url(), "topic": "/trades",
        "type": "TradeOrder", "payload": {"lang": "js"}, "count": ROUNDS,
        "concurrency": 1, "ack": true, "transports": ["websocket"], "timeoutMs": 5000}),
    );
    let end = client.expect("iterated", WAIT * 4, |e| e["ev"] == "iterated");
    let rounds = client.drain(std::time::Duration::ZERO, |e| e["ev"] == "iteration");
    let failed: Vec<_> = rounds.iter().filter(|e| e.get("error").is_some()).collect();
    assert!(
        failed.is_empty(),
        "{} of {ROUNDS} rounds failed: {failed:#?}\n{}",
        failed.len(),
        bridge.log()
    );
    assert_eq!(end["failed"], 0, "{end}");
    assert_eq!(rounds.len(), ROUNDS);
    for e in &rounds {
        assert_eq!(e["ack"], json!([{"ok": true}]), "{e}");
    }
    // each order crossed NATS once
    let mut seen: Vec<u64> = watcher
        .msgs("t", SHORT)
        .iter()
        .map(|m| body(m)["payload"]["i"].as_u64().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, (0..ROUNDS as u64).collect::<Vec<_>>());
    let undeliverable = bridge.metric(
        "tradefeed_bridge_messages_dropped_total",
        &[("route", "trade-orders"), ("reason", "undeliverable")],
    );
    assert_eq!(undeliverable, 0.0, "{}", bridge.log());
}

/// A point-to-point route that only goes to NATS (`direction = "to_nats"`)
/// has no queue member on the bridge: a legacy order on it goes to the NATS
/// processor at once, also while a legacy client is subscribed to its topic
/// (nothing would ever release an order held for a member that never joins).
#[test]
fn an_order_on_a_to_nats_point_to_point_route_is_never_held() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("to-nats.toml");
    let text = std::fs::read_to_string(root().join("config/traderx.toml")).unwrap();
    let text = text.replacen(
        "delivery = \"queue\"",
        "delivery = \"queue\"\ndirection = \"to_nats\"",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            config,
            ..Default::default()
        },
    );
    let processor = Agent::nats(Lang::Node);
    processor.nats_connect(&nats.url());
    processor.queue_sub("q", "trades.new", "trade-processor");
    let watcher = Agent::sio(Lang::Node);
    watcher.connect(&bridge.url(), json!({}));
    watcher.subscribe("/trades");
    let service = Agent::sio(Lang::Node);
    service.connect(&bridge.url(), json!({}));
    std::thread::sleep(SHORT);
    let started = std::time::Instant::now();
    let ack = service.emit_ack(
        "publish",
        json!([{"topic": "/trades", "type": "TradeOrder", "payload": order("T-1")}]),
    );
    assert_eq!(
        ack["args"][0],
        json!({"ok": true}),
        "{ack}\n{}",
        bridge.log()
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    let m = processor.next_msg("q", WAIT);
    assert_eq!(body(&m)["payload"]["id"], "T-1");
}

/// Where two routes map different legacy topics to one subject, the subject
/// cannot tell which topic a mirror came from: that mirror carries its topic
/// in `Tradefeed-Legacy-Topic`, and one whose topic the subject does tell
/// carries no such header.
#[test]
fn a_mirror_names_its_topic_only_where_the_subject_cannot() {
    let nats = Nats::start();
    let dir = scratch();
    let config = dir.path().join("shared-subject.toml");
    std::fs::write(
        &config,
        r#"
mode = "server"
[nats]
servers = ["nats://127.0.0.1:4222"]
[[routes]]
name = "desk-orders"
topic = "/desk/{id}/orders"
subject = "orders.{id}"
type = "Order"
[[routes]]
name = "legacy-orders"
topic = "/legacy/{id}/orders"
subject = "orders.{id}"
type = "Order"
"#,
    )
    .unwrap();
    let bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            config,
            ..Default::default()
        },
    );
    let sub = Agent::nats(Lang::Python);
    sub.nats_connect(&nats.url());
    sub.sub("orders", "orders.7");
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&bridge.url(), json!({}));

    legacy.publish("/legacy/7/orders", "Order", json!({"n": 1}));
    let msg = sub.next_msg("orders", WAIT);
    assert_eq!(body(&msg)["payload"], json!({"n": 1}));
    assert_eq!(
        header(&msg, "Tradefeed-Legacy-Topic").as_deref(),
        Some("/legacy/7/orders")
    );

    legacy.publish("/desk/7/orders", "Order", json!({"n": 2}));
    let msg = sub.next_msg("orders", WAIT);
    assert_eq!(body(&msg)["payload"], json!({"n": 2}));
    assert_eq!(header(&msg, "Tradefeed-Legacy-Topic"), None);
    assert!(header(&msg, "Tradefeed-Bridge-Origin").is_some());
}
