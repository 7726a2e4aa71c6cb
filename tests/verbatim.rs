//! The verbatim profile, `config/traderx-verbatim.toml`: NATS subjects are the
//! legacy topic strings themselves (`/trades`, `/accounts/22214/positions`),
//! as the generated state 006 services use them. Same flows as `flows.rs`,
//! through that profile, with exact payloads and exact counts.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn verbatim(nats: &Nats) -> Bridge {
    Bridge::start_opts(
        nats,
        BridgeOpts {
            config: root().join("config/traderx-verbatim.toml"),
            ..Default::default()
        },
    )
}

fn order(id: &str) -> Value {
    json!({"id": id, "accountId": 22214, "security": "MSFT", "quantity": 100, "side": "Buy"})
}

fn is_data(e: &Value) -> bool {
    e["ev"] == "event" && e["event"] == "publish" && e["args"][0]["from"] != "System"
}

/// A legacy publish on `/accounts/22214/positions` arrives once on the NATS
/// subject `/accounts/22214/positions`, with the envelope and the origin
/// header; another account's publish reaches only its own subject.
#[test]
fn legacy_position_arrives_on_the_verbatim_subject() {
    let nats = Nats::start();
    let bridge = verbatim(&nats);
    let sub = Agent::nats(Lang::Python);
    sub.nats_connect(&nats.url());
    sub.sub("p22214", "/accounts/22214/positions");
    sub.sub("p52355", "/accounts/52355/positions");
    sub.sub("dotted", "positions.account.22214.updated");
    let local = Agent::sio(Lang::Node);
    local.connect(&bridge.url(), json!({}));
    local.subscribe("/accounts/22214/positions");
    let publisher = Agent::sio(Lang::Java);
    let id = publisher.connect(&bridge.url(), json!({}));

    let position = json!({"accountId": 22214, "security": "IBM", "quantity": 300, "updated": 1764781234560u64});
    publisher.publish("/accounts/22214/positions", "Position", position.clone());
    let m = sub.next_msg("p22214", WAIT);
    assert_eq!(m["subject"], "/accounts/22214/positions");
    let env = body(&m);
    assert_eq!(env["type"], "Position");
    assert_eq!(env["from"], id.as_str());
    assert_eq!(env["topic"], "/accounts/22214/positions");
    assert!(env["date"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(env["payload"], position);
    assert_eq!(header(&m, "Tradefeed-Legacy-Topic"), None);
    assert!(header(&m, "Tradefeed-Bridge-Origin").is_some_and(|o| o.starts_with("tfb-")));
    // local delivery as trade-feed does it, once
    let got = local.next_publish(WAIT, |e| e["topic"] == "/accounts/22214/positions");
    assert_eq!(got["payload"], position);

    let other = json!({"accountId": 52355, "security": "AAPL", "quantity": 1, "updated": 2u64});
    publisher.publish("/accounts/52355/positions", "Position", other.clone());
    let m = sub.next_msg("p52355", WAIT);
    assert_eq!(body(&m)["payload"], other);

    assert!(
        sub.msgs("p22214", SHORT).is_empty(),
        "22214: doubled or leaked"
    );
    assert!(
        sub.msgs("p52355", Duration::ZERO).is_empty(),
        "52355: doubled"
    );
    assert!(
        sub.msgs("dotted", Duration::ZERO).is_empty(),
        "the verbatim profile must not use the dotted subject map"
    );
    assert!(
        local.data_messages(Duration::ZERO).is_empty(),
        "the 22214 subscriber got more than its own account's position"
    );
}

/// A NATS publish on `/accounts/22214/trades`, as an envelope and as a bare
/// payload, reaches the legacy subscriber of that topic once, with the right
/// `type`; the subscriber of another account gets nothing.
#[test]
fn nats_trade_reaches_the_legacy_subscriber_once() {
    let nats = Nats::start();
    let bridge = verbatim(&nats);
    let sub = Agent::sio(Lang::Java);
    sub.connect(&bridge.url(), json!({}));
    sub.subscribe("/accounts/22214/trades");
    let neighbour = Agent::sio(Lang::Node);
    neighbour.connect(&bridge.url(), json!({}));
    neighbour.subscribe("/accounts/52355/trades");
    let observer = Agent::sio(Lang::Python);
    observer.connect(&bridge.url(), json!({}));
    observer.subscribe("/*");
    let p = Agent::nats(Lang::Node);
    p.nats_connect(&nats.url());

    let trade = json!({"id": "6f1c2b9e-0000-4000-8000-000000000001", "accountId": 22214, "security": "IBM",
                       "side": "Buy", "state": "Settled", "quantity": 300, "created": 1764781234000u64, "updated": 1764781234560u64});
    let envelope = json!({"type": "Trade", "from": "trade-processor", "topic": "/accounts/22214/trades",
                          "date": 1764781234567u64, "payload": trade});
    p.pub_json("/accounts/22214/trades", &envelope);
    let env = sub.next_publish(WAIT, |e| e["topic"] == "/accounts/22214/trades");
    assert_eq!(env, envelope);
    let env = observer.next_publish(WAIT, |e| e["topic"] == "/accounts/22214/trades");
    assert_eq!(env, envelope, "/* observer");

    p.pub_json("/accounts/22214/trades", &trade);
    let env = sub.next_publish(WAIT, |e| e["topic"] == "/accounts/22214/trades");
    assert_eq!(env["type"], "Trade");
    assert_eq!(env["from"], "nats:/accounts/22214/trades");
    assert_eq!(env["payload"], trade);
    assert!(env["date"].as_u64().unwrap() > 1_700_000_000_000);

    // subjects that match no template are not mirrored
    p.pub_json("/accounts/abc/trades", &trade);
    p.pub_json("trades.account.22214.updated", &trade);
    let only_mine = json!({"id": "t-52355", "accountId": 52355});
    p.pub_json("/accounts/52355/trades", &only_mine);
    let env = neighbour.next_publish(WAIT, |e| e["topic"] == "/accounts/52355/trades");
    assert_eq!(env["payload"], only_mine);

    assert!(
        sub.data_messages(SHORT).is_empty(),
        "22214: doubled or leaked"
    );
    assert!(
        neighbour.data_messages(Duration::ZERO).is_empty(),
        "52355 got another account's trade"
    );
    let seen: Vec<Value> = observer.data_messages(Duration::ZERO);
    let topics: Vec<&str> = seen.iter().filter_map(|e| e["topic"].as_str()).collect();
    assert_eq!(
        topics,
        vec!["/accounts/22214/trades", "/accounts/52355/trades"],
        "/* observer: exactly the mapped messages after the first"
    );
}

/// The queue route on `/trades`: orders from a legacy producer and from a NATS
/// producer each reach exactly one processor (the NATS queue member or the
/// legacy room), once; a plain NATS tap sees every order once, on `/trades`.
#[test]
fn orders_on_the_verbatim_queue_route_reach_one_processor() {
    const N: usize = 40;
    let nats = Nats::start();
    let bridge = verbatim(&nats);
    let tap = Agent::nats(Lang::Python);
    tap.nats_connect(&nats.url());
    tap.sub("tap", "/trades");
    let nproc = Agent::nats(Lang::Node);
    nproc.nats_connect(&nats.url());
    nproc.queue_sub("q", "/trades", "trade-processor");
    let lproc = Agent::sio(Lang::Java);
    lproc.connect(&bridge.url(), json!({}));
    lproc.subscribe("/trades");
    let deadline = Instant::now() + WAIT;
    while !bridge.log().contains("joined the queue group") {
        assert!(Instant::now() < deadline, "{}", bridge.log());
        thread::sleep(Duration::from_millis(50));
    }
    let service = Agent::sio(Lang::Node);
    let service_id = service.connect(&bridge.url(), json!({}));
    let producer = Agent::nats(Lang::Java);
    producer.nats_connect(&nats.url());

    for i in 0..N {
        service.publish("/trades", "TradeOrder", order(&format!("L-{i}")));
        let env = json!({"type": "TradeOrder", "from": "trade-service", "topic": "/trades",
                         "date": 1764781234567u64, "payload": order(&format!("N-{i}"))});
        producer.pub_json("/trades", &env);
    }

    let id_of = |v: &Value| v["payload"]["id"].as_str().unwrap_or("?").to_string();
    let mut tapped = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tapped.len() < 2 * N && Instant::now() < deadline {
        if let Some(m) = tap.try_expect(Duration::from_millis(200), |e| {
            e["ev"] == "msg" && e["sid"] == "tap"
        }) {
            assert_eq!(m["subject"], "/trades");
            tapped.push(body(&m));
        }
    }
    tapped.extend(tap.msgs("tap", SHORT).iter().map(body));
    let mut want: Vec<String> = (0..N)
        .flat_map(|i| [format!("L-{i}"), format!("N-{i}")])
        .collect();
    want.sort();
    let mut on_nats: Vec<String> = tapped.iter().map(id_of).collect();
    on_nats.sort();
    assert_eq!(on_nats, want, "the tap on /trades: every order once");
    for env in tapped.iter().filter(|e| id_of(e).starts_with("L-")) {
        assert_eq!(env["from"], service_id.as_str());
        assert_eq!(env["type"], "TradeOrder");
        assert_eq!(env["topic"], "/trades");
    }

    // every order at exactly one processor
    let mut at_nats: Vec<String> = Vec::new();
    let mut at_legacy: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while at_nats.len() + at_legacy.len() < 2 * N && Instant::now() < deadline {
        if let Some(m) = nproc.try_expect(Duration::from_millis(50), |e| {
            e["ev"] == "msg" && e["sid"] == "q"
        }) {
            at_nats.push(id_of(&body(&m)));
        }
        if let Some(e) = lproc.try_expect(Duration::from_millis(50), |e| {
            is_data(e) && e["args"][0]["topic"] == "/trades"
        }) {
            assert_eq!(e["args"][0]["type"], "TradeOrder");
            at_legacy.push(id_of(&e["args"][0]));
        }
    }
    at_nats.extend(nproc.msgs("q", SHORT).iter().map(|m| id_of(&body(m))));
    at_legacy.extend(
        lproc
            .drain(Duration::ZERO, |e| {
                is_data(e) && e["args"][0]["topic"] == "/trades"
            })
            .iter()
            .map(|e| id_of(&e["args"][0])),
    );
    let mut all = [at_nats.clone(), at_legacy.clone()].concat();
    all.sort();
    assert_eq!(all, want, "each order at exactly one processor");
    eprintln!(
        "verbatim queue route: {} orders to the NATS processor, {} to the legacy one",
        at_nats.len(),
        at_legacy.len()
    );
    // The legacy publisher is not in the room: it never gets an order back.
    assert!(service.data_messages(Duration::ZERO).is_empty());
}
