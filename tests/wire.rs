//! The bridge's promises on the wire, attacked with odd input and races:
//! what the legacy Node hub does with the same input is the reference, and
//! every message is either delivered once or counted.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::throttle::Throttle;
use common::*;
use serde_json::json;

const DROPPED: &str = "tradefeed_bridge_messages_dropped_total";
const REQUEUED: &str = "tradefeed_bridge_messages_requeued_total";
const QUEUE_MEMBER: &str = "tradefeed_bridge_queue_member";

/// Waits (bounded) until `f` holds; false at the deadline.
fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// An order the bridge's queue member takes for a legacy consumer that
/// cannot take it (its outgoing queue is full) is given back to the group.
/// When no other consumer exists, the NATS server answers the give-back's
/// reply subject with "no responders", and the bridge must count the order
/// as undeliverable: the server sends that answer only to the connection
/// that published, the queue member's own, so that connection must listen
/// for it too.
#[test]
fn an_order_given_back_to_an_empty_group_is_counted_undeliverable() {
    const ORDERS: usize = 3;
    let nats = Nats::start();
    let bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: vec![("TRADEFEED_BRIDGE_SOCKETIO__MAX_BUFFER_PACKETS", "4".into())],
            ..Default::default()
        },
    );
    // A legacy processor behind a link that stalls once it is set up.
    let link = Throttle::start(bridge.port);
    let processor = Agent::sio(Lang::Node);
    processor.connect(
        &format!("http://127.0.0.1:{}", link.port),
        json!({"transports": ["websocket"], "reconnection": false}),
    );
    processor.subscribe("/trades");
    processor.subscribe("/accounts/9/trades");
    assert!(
        until(WAIT, || bridge
            .metric(QUEUE_MEMBER, &[("route", "trade-orders")])
            == 1.0),
        "the bridge did not join the queue group: {}",
        bridge.log()
    );
    link.set_rate(100);

    // Fill everything between the bridge and the stalled processor (kernel
    // buffers, the WebSocket writer, its 4-packet queue) until a broadcast
    // misses it.
    let producer = Agent::nats(Lang::Node);
    producer.nats_connect(&nats.url());
    let big = "x".repeat(800_000);
    let full = |b: &Bridge| {
        b.metric(
            DROPPED,
            &[
                ("route", "account-trades"),
                ("reason", "client_buffer_full"),
            ],
        ) > 0.0
    };
    for i in 0..40 {
        producer.pub_json("trades.account.9.updated", &json!({"i": i, "pad": big}));
        if full(&bridge) {
            break;
        }
    }
    assert!(
        until(WAIT, || full(&bridge)),
        "the stalled processor's queue never filled"
    );

    // Each order reaches the bridge's member, cannot be handed over, is given
    // back, and finds nobody: each must end up counted.
    let undeliverable = |b: &Bridge| {
        b.metric(
            DROPPED,
            &[("route", "trade-orders"), ("reason", "undeliverable")],
        )
    };
    for i in 0..ORDERS {
        let requeued = bridge.metric(REQUEUED, &[("route", "trade-orders")]);
        let before = undeliverable(&bridge);
        assert!(
            until(WAIT, || bridge
                .metric(QUEUE_MEMBER, &[("route", "trade-orders")])
                == 1.0),
            "order {i}: the bridge is not back in the queue group"
        );
        let order = json!({"type": "TradeOrder", "from": "trade-service", "date": 1,
                           "payload": {"id": format!("T-{i}"), "accountId": 9,
                                       "security": "ACME", "quantity": 1, "side": "Buy"}});
        producer.pub_json("trades.new", &order);
        assert!(
            until(WAIT, || bridge
                .metric(REQUEUED, &[("route", "trade-orders")])
                > requeued),
            "order {i} was not given back: {}",
            bridge.log()
        );
        assert!(
            until(Duration::from_secs(5), || undeliverable(&bridge) > before),
            "order {i} was given back to an empty queue group and then lost without a count \
             (undeliverable stays {before})"
        );
        assert_eq!(
            undeliverable(&bridge),
            before + 1.0,
            "order {i}: counted once"
        );
    }
    assert!(
        bridge.log().contains("reached no consumer"),
        "the loss is logged"
    );
}

/// Two bridges on one NATS: a legacy publish on bridge A reaches bridge B's
/// legacy subscribers exactly as A's own subscribers get it, also when it has
/// no `payload` or a `type` that is not a string (the legacy hub passes both
/// on). B must not take A's envelope for a bare payload and wrap it again.
#[test]
fn a_legacy_publish_reaches_another_bridge_as_the_same_envelope() {
    let nats = Nats::start();
    let a = Bridge::start(&nats);
    let b = Bridge::start(&nats);
    let topic = "/accounts/22/trades";
    let sub_a = Agent::sio(Lang::Node);
    sub_a.connect(&a.url(), json!({}));
    sub_a.subscribe(topic);
    let sub_b = Agent::sio(Lang::Node);
    sub_b.connect(&b.url(), json!({}));
    sub_b.subscribe(topic);
    let sender = Agent::sio(Lang::Node);
    sender.connect(&a.url(), json!({}));
    let inputs = [
        json!({"topic": topic, "type": "Trade", "payload": {"id": "t-1"}}),
        json!({"topic": topic, "type": "Trade"}),
        json!({"topic": topic, "type": 5, "payload": {"id": "t-3"}}),
        json!({"topic": topic, "type": {"k": [1]}, "payload": "t-4"}),
        json!({"topic": topic, "type": false}),
        json!({"topic": topic, "payload": null}),
        json!({"topic": topic, "type": "Trade", "payload": {"type": "Buy", "payload": 1}}),
    ];
    for input in &inputs {
        sender.emit("publish", json!([input]));
        let at_a = sub_a.next_publish(WAIT, |_| true);
        let at_b = sub_b.next_publish(WAIT, |_| true);
        assert_eq!(at_b, at_a, "input {input}");
    }
    assert!(sub_b.data_messages(SHORT).is_empty(), "nothing more at B");
}
