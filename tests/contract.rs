//! The legacy trade-feed wire contract (PROTOCOL.md section 2), checked
//! against the legacy Node hub (tests/node/hub.js) AND the bridge: every check
//! is written once, as a function of the target URL, and run for both
//! targets (`hub::NAME` and `bridge::NAME`), so the bridge is shown to behave
//! like the hub.
//!
//! Counts are exact: every check waits (bounded) for what must arrive, then
//! listens for a short quiet period and fails on anything extra.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

// ------------------------------------------------------------------ helpers

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A connected Socket.IO agent and its socket id.
fn client(lang: Lang, url: &str) -> (Agent, String) {
    let a = Agent::sio(lang);
    let id = a.connect(url, json!({}));
    assert!(!id.is_empty(), "{}: empty socket id", a.name);
    (a, id)
}

fn is_publish(e: &Value) -> bool {
    e["ev"] == "event" && e["event"] == "publish"
}

/// Exactly `n` `publish` envelopes (System notices included), in arrival
/// order: waits for each (bounded), then fails on any extra one within a
/// quiet period. Also fails on any other server event name.
fn take(a: &Agent, n: usize) -> Vec<Value> {
    let mut got = Vec::with_capacity(n);
    for i in 0..n {
        let e = a.expect(&format!("publish #{} of {n}", i + 1), WAIT, is_publish);
        got.push(e["args"][0].clone());
    }
    let extra: Vec<Value> = a
        .drain(SHORT, |e| e["ev"] == "event")
        .into_iter()
        .map(|e| json!([e["event"], e["args"]]))
        .collect();
    assert!(
        extra.is_empty(),
        "{}: expected exactly {n} publish events, got {} more: {extra:#?}\nthe {n}: {got:#?}",
        a.name,
        extra.len()
    );
    got
}

/// Nothing at all arrives within the quiet period.
fn none(a: &Agent) {
    take(a, 0);
}

/// Subscribes and consumes the subscriber's own join notice (checked exactly).
fn join(a: &Agent, id: &str, topic: &str) {
    let t0 = now_ms();
    a.emit("subscribe", json!([topic]));
    let e = a.expect("own join notice", WAIT, is_publish);
    assert_notice(
        &e["args"][0],
        &format!("New Joiner {id} to topic {topic}"),
        topic,
        t0,
    );
}

/// Waits for everything in flight, then forgets every received event.
fn settle(agents: &[&Agent]) {
    std::thread::sleep(SHORT);
    for a in agents {
        a.drain(Duration::ZERO, |_| true);
    }
}

fn keys(env: &Value) -> Vec<String> {
    let mut k: Vec<String> = env
        .as_object()
        .unwrap_or_else(|| panic!("envelope is not an object: {env}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// `date` is the server's clock in integer epoch ms, taken after `t0`.
fn assert_date(env: &Value, t0: u64) {
    let d = env["date"]
        .as_u64()
        .unwrap_or_else(|| panic!("date is not an integer: {env}"));
    let now = now_ms();
    // same machine, same clock; 1 s of slack for scheduling noise
    assert!(
        d + 1000 >= t0 && d <= now + 1000,
        "date {d} is not the server's clock (sent after {t0}, checked at {now}): {env}"
    );
}

/// A data envelope: exactly {type, from, topic, date, payload}.
fn assert_data(env: &Value, kind: &Value, from: &str, topic: &str, payload: &Value, t0: u64) {
    assert_eq!(
        keys(env),
        ["date", "from", "payload", "topic", "type"],
        "{env}"
    );
    assert_eq!(&env["type"], kind, "type: {env}");
    assert_eq!(env["from"], from, "from: {env}");
    assert_eq!(env["topic"], topic, "topic: {env}");
    assert_eq!(&env["payload"], payload, "payload: {env}");
    assert_date(env, t0);
}

/// A System notice: type "message", from "System", payload {message}.
fn assert_notice(env: &Value, message: &str, topic: &str, t0: u64) {
    assert_data(
        env,
        &json!("message"),
        "System",
        topic,
        &json!({ "message": message }),
        t0,
    );
}

fn publish_raw(a: &Agent, msg: Value) {
    a.emit("publish", json!([msg]));
}

// ------------------------------------------------------------------ checks

/// subscribe joins the room and broadcasts "New Joiner <id> to topic <t>"
/// from System to the room (subscriber included) and to `/*`; a socket in
/// neither room hears nothing. Subscribing twice gives a second notice but
/// data still arrives once.
fn subscribe_broadcasts_join_notice(url: &str) {
    let (a, a_id) = client(Lang::Node, url);
    let (b, b_id) = client(Lang::Python, url);
    let (c, c_id) = client(Lang::Node, url);
    let t = "/accounts/22/positions";

    join(&c, &c_id, "/*");
    let t0 = now_ms();
    b.emit("subscribe", json!([t]));
    let got = take(&b, 1);
    assert_notice(&got[0], &format!("New Joiner {b_id} to topic {t}"), t, t0);
    let got = take(&c, 1);
    assert_notice(&got[0], &format!("New Joiner {b_id} to topic {t}"), t, t0);
    none(&a);

    // a second member: the room and `/*` hear it, a's own copy included
    let t0 = now_ms();
    a.emit("subscribe", json!([t]));
    for x in [&a, &b, &c] {
        let got = take(x, 1);
        assert_notice(&got[0], &format!("New Joiner {a_id} to topic {t}"), t, t0);
    }

    // subscribing again: one more notice, still one copy of data
    let t0 = now_ms();
    a.emit("subscribe", json!([t]));
    for x in [&a, &b, &c] {
        let got = take(x, 1);
        assert_notice(&got[0], &format!("New Joiner {a_id} to topic {t}"), t, t0);
    }
    let t0 = now_ms();
    c.publish(t, "Position", json!({"n": 1}));
    for x in [&a, &b, &c] {
        let got = take(x, 1);
        assert_data(&got[0], &json!("Position"), &c_id, t, &json!({"n": 1}), t0);
    }
}

/// The envelope is freshly built: exactly {type, from, topic, date, payload};
/// the client's own `from`, `date` and any extra field are not kept.
fn publish_envelope_is_exact(url: &str) {
    let (sub, sub_id) = client(Lang::Python, url);
    let (p, p_id) = client(Lang::Node, url);
    let t = "/accounts/22/positions";
    join(&sub, &sub_id, t);

    let payload =
        json!({"accountId": 22, "security": "ACME", "quantity": 300, "updated": 1764781234560u64});
    let t0 = now_ms();
    publish_raw(
        &p,
        json!({"topic": t, "type": "Position", "payload": payload, "from": "spoofed-sender",
               "date": 1, "extra": "dropped", "id": "also-dropped"}),
    );
    let got = take(&sub, 1);
    assert_data(&got[0], &json!("Position"), &p_id, t, &payload, t0);
    assert_ne!(p_id, sub_id);
    // the publisher is in no room: nothing comes back to it
    none(&p);

    // a publish without payload gives an envelope without payload
    let t0 = now_ms();
    publish_raw(&p, json!({"topic": t, "type": "Position"}));
    let got = take(&sub, 1);
    let env = &got[0];
    assert_eq!(keys(env), ["date", "from", "topic", "type"], "{env}");
    assert_eq!(env["type"], "Position");
    assert_eq!(env["from"], p_id.as_str());
    assert_eq!(env["topic"], t);
    assert_date(env, t0);
}

/// `type` defaults to "message" when absent or null; any other value,
/// the empty string included, is kept as it is. From a Java (io.socket 2.1)
/// publisher, whose own `from` is overwritten too.
fn type_defaults_to_message(url: &str) {
    let (sub, sub_id) = client(Lang::Node, url);
    let (p, p_id) = client(Lang::Java, url);
    let t = "/trades";
    join(&sub, &sub_id, t);

    let t0 = now_ms();
    publish_raw(&p, json!({"topic": t, "payload": {"k": 1}}));
    publish_raw(&p, json!({"topic": t, "type": null, "payload": {"k": 2}}));
    publish_raw(&p, json!({"topic": t, "type": "", "payload": {"k": 3}}));
    publish_raw(
        &p,
        json!({"topic": t, "type": "TradeOrder", "from": "trade-service", "payload": {"k": 4}}),
    );
    let got = take(&sub, 4);
    assert_data(&got[0], &json!("message"), &p_id, t, &json!({"k": 1}), t0);
    assert_data(&got[1], &json!("message"), &p_id, t, &json!({"k": 2}), t0);
    assert_data(&got[2], &json!(""), &p_id, t, &json!({"k": 3}), t0);
    assert_data(
        &got[3],
        &json!("TradeOrder"),
        &p_id,
        t,
        &json!({"k": 4}),
        t0,
    );
    none(&p);
}

/// A sender gets its own publish (once) when it is in the room, and not when
/// it is not; other members get it either way.
fn sender_gets_own_publish_only_when_subscribed(url: &str) {
    let (a, a_id) = client(Lang::Java, url);
    let (b, b_id) = client(Lang::Python, url);
    let t = "/trades";
    join(&a, &a_id, t);
    settle(&[&a, &b]);

    let t0 = now_ms();
    a.publish(t, "TradeOrder", json!({"id": "T-1"}));
    let got = take(&a, 1);
    assert_data(
        &got[0],
        &json!("TradeOrder"),
        &a_id,
        t,
        &json!({"id": "T-1"}),
        t0,
    );
    none(&b);

    let t0 = now_ms();
    b.publish(t, "TradeOrder", json!({"id": "T-2"}));
    let got = take(&a, 1);
    assert_data(
        &got[0],
        &json!("TradeOrder"),
        &b_id,
        t,
        &json!({"id": "T-2"}),
        t0,
    );
    none(&b);
}

/// A publish reaches the topic's room AND `/*`; a socket in both gets one
/// copy; a socket only in another topic's room gets nothing. A publish on
/// the topic `/*` itself reaches `/*` once.
fn delivers_to_topic_room_and_catch_all_once(url: &str) {
    let (all, all_id) = client(Lang::Node, url); // `/*` only
    let (both, both_id) = client(Lang::Python, url); // `/*` and t
    let (p, p_id) = client(Lang::Node, url); // u, publishes
    let t = "/accounts/22/trades";
    let u = "/accounts/23/trades";
    join(&all, &all_id, "/*");
    join(&both, &both_id, "/*");
    join(&both, &both_id, t);
    join(&p, &p_id, u);
    settle(&[&all, &both, &p]);

    let t0 = now_ms();
    p.publish(t, "Trade", json!({"id": "on-t"}));
    for x in [&all, &both] {
        let got = take(x, 1);
        assert_data(
            &got[0],
            &json!("Trade"),
            &p_id,
            t,
            &json!({"id": "on-t"}),
            t0,
        );
    }
    none(&p);

    let t0 = now_ms();
    p.publish(u, "Trade", json!({"id": "on-u"}));
    for x in [&all, &both, &p] {
        let got = take(x, 1);
        assert_data(
            &got[0],
            &json!("Trade"),
            &p_id,
            u,
            &json!({"id": "on-u"}),
            t0,
        );
    }

    let t0 = now_ms();
    p.publish("/*", "Trade", json!({"id": "on-catch-all"}));
    for x in [&all, &both] {
        let got = take(x, 1);
        assert_data(
            &got[0],
            &json!("Trade"),
            &p_id,
            "/*",
            &json!({"id": "on-catch-all"}),
            t0,
        );
    }
    none(&p);
}

/// Rooms are literal strings: `/accounts/*/trades` is a room of its own,
/// not a pattern; it gets nothing from `/accounts/22/trades`, and a publish
/// on the literal `/accounts/*/trades` reaches only that room.
fn rooms_are_literal(url: &str) {
    let (star, star_id) = client(Lang::Python, url);
    let (acct, acct_id) = client(Lang::Node, url);
    let (p, p_id) = client(Lang::Node, url);
    join(&star, &star_id, "/accounts/*/trades");
    join(&acct, &acct_id, "/accounts/22/trades");
    settle(&[&star, &acct, &p]);

    let t0 = now_ms();
    p.publish("/accounts/22/trades", "Trade", json!({"id": "22"}));
    p.publish("/accounts/23/trades", "Trade", json!({"id": "23"}));
    let got = take(&acct, 1);
    assert_data(
        &got[0],
        &json!("Trade"),
        &p_id,
        "/accounts/22/trades",
        &json!({"id": "22"}),
        t0,
    );
    none(&star);

    let t0 = now_ms();
    p.publish("/accounts/*/trades", "Trade", json!({"id": "star"}));
    let got = take(&star, 1);
    assert_data(
        &got[0],
        &json!("Trade"),
        &p_id,
        "/accounts/*/trades",
        &json!({"id": "star"}),
        t0,
    );
    none(&acct);
    none(&p);
}

/// `unsubscribe` (or its legacy misspelling `unusbscribe`) broadcasts
/// "<id> has left <t>" to the room, the leaver included, then leaves: no
/// more data for the leaver, the others still get it.
fn leave_with(url: &str, event: &str) {
    let (a, a_id) = client(Lang::Node, url);
    let (b, b_id) = client(Lang::Python, url);
    let t = "/accounts/22/positions";
    join(&a, &a_id, t);
    join(&b, &b_id, t);
    settle(&[&a, &b]);

    let t0 = now_ms();
    a.emit(event, json!([t]));
    for x in [&a, &b] {
        let got = take(x, 1);
        assert_notice(&got[0], &format!("{a_id} has left {t}"), t, t0);
    }

    let t0 = now_ms();
    b.publish(t, "Position", json!({"after": "leave"}));
    let got = take(&b, 1);
    assert_data(
        &got[0],
        &json!("Position"),
        &b_id,
        t,
        &json!({"after": "leave"}),
        t0,
    );
    none(&a);
    // the leaver can still publish to the room it left
    let t0 = now_ms();
    a.publish(t, "Position", json!({"from": "leaver"}));
    let got = take(&b, 1);
    assert_data(
        &got[0],
        &json!("Position"),
        &a_id,
        t,
        &json!({"from": "leaver"}),
        t0,
    );
    none(&a);
}

fn unsubscribe_broadcasts_leave_then_leaves(url: &str) {
    leave_with(url, "unsubscribe");
}

fn unusbscribe_alias_broadcasts_leave_then_leaves(url: &str) {
    leave_with(url, "unusbscribe");
}

/// Leaving a topic never joined is harmless: the leave notice goes to that
/// (empty) room and `/*`, the leaver stays connected and in its rooms.
fn unsubscribe_unknown_topic_is_harmless(url: &str) {
    let (a, a_id) = client(Lang::Node, url);
    let (all, all_id) = client(Lang::Python, url);
    let t = "/trades";
    join(&all, &all_id, "/*");
    join(&a, &a_id, t);
    settle(&[&a, &all]);

    let never = "/accounts/99/positions";
    let t0 = now_ms();
    a.emit("unsubscribe", json!([never]));
    a.emit("unusbscribe", json!([never]));
    let got = take(&all, 2);
    for env in &got {
        assert_notice(env, &format!("{a_id} has left {never}"), never, t0);
    }
    none(&a);

    let t0 = now_ms();
    all.publish(t, "TradeOrder", json!({"id": "still-there"}));
    for x in [&a, &all] {
        let got = take(x, 1);
        assert_data(
            &got[0],
            &json!("TradeOrder"),
            &all_id,
            t,
            &json!({"id": "still-there"}),
            t0,
        );
    }
    for x in [&a, &all] {
        let seen = x.seen.lock().unwrap();
        let connects = seen.iter().filter(|e| e["ev"] == "connected").count();
        let drops = seen.iter().filter(|e| e["ev"] == "disconnected").count();
        assert_eq!(
            (connects, drops),
            (1, 0),
            "{}: reconnected or dropped: {seen:#?}",
            x.name
        );
    }
}

/// Payloads pass through with their JSON meaning intact: nested objects,
/// unicode and escapes, numbers, arrays, booleans, null (as the payload and
/// inside it), and non-object payloads.
/// Sent by Python, received by Node (in order: see the ordering check).
fn payload_json_passes_through(url: &str) {
    let (sub, sub_id) = client(Lang::Node, url);
    let (p, p_id) = client(Lang::Python, url);
    let t = "/accounts/22/positions";
    join(&sub, &sub_id, t);

    let payloads = vec![
        json!({"a": {"b": {"c": {"d": [1, {"e": [[], {}]}]}}}, "empty": {}, "list": []}),
        json!({"text": "ACME™ ★ Grüße 中文 日本語 😀 𝄞", "esc": "quote\" back\\ slash/ nl\n tab\t ctl\u{1} del\u{7f}",
               "keyWith ünicode ★": "v", "": "empty key"}),
        json!({"int": 22214, "neg": -300, "zero": 0, "big": 9007199254740991u64, "negbig": -9007199254740991i64,
               "frac": 12.5, "small": 0.1, "tiny": 1.5e-7, "negfrac": -0.25, "exp": 6.02e23}),
        json!({"t": true, "f": false, "n": null, "arr": [null, 1, "two", 3.5, false, {"x": null}]}),
        json!(null),
        json!([1, "two", {"three": 3}, [4], null]),
        json!("just a string ★"),
        json!(42),
        json!(false),
        json!(""),
    ];
    let t0 = now_ms();
    for pl in &payloads {
        publish_raw(&p, json!({"topic": t, "type": "Position", "payload": pl}));
    }
    let got = take(&sub, payloads.len());
    for (env, pl) in got.iter().zip(&payloads) {
        assert_data(env, &json!("Position"), &p_id, t, pl, t0);
    }
}

/// Order from one publisher is kept: 200 quick publishes arrive in order,
/// none lost, none doubled (on a topic the bridge also mirrors to NATS).
///
/// The receivers are Node clients: python-socketio 5.x (python-engineio 4.x)
/// runs every received message's handler on a thread of its own, so a
/// Python receiver reorders back-to-back messages by itself, against the
/// legacy hub as against the bridge. Python is the publisher here.
fn order_from_one_publisher_is_preserved(url: &str) {
    let (sub, sub_id) = client(Lang::Node, url);
    let (all, all_id) = client(Lang::Node, url);
    let (p, p_id) = client(Lang::Python, url);
    let t = "/accounts/22/trades";
    join(&sub, &sub_id, t);
    join(&all, &all_id, "/*");
    settle(&[&sub, &all, &p]);

    const N: usize = 200;
    let t0 = now_ms();
    for i in 0..N {
        // not waiting for each ok: back to back, as fast as the client sends
        p.send(json!({"cmd": "emit", "event": "publish",
                      "args": [{"topic": t, "type": "Trade", "payload": {"seq": i}}]}));
    }
    for r in [&sub, &all] {
        let got = take(r, N);
        let seqs: Vec<u64> = got
            .iter()
            .map(|e| e["payload"]["seq"].as_u64().unwrap_or(u64::MAX))
            .collect();
        assert_eq!(
            seqs,
            (0..N as u64).collect::<Vec<_>>(),
            "{}: out of order, lost or doubled",
            r.name
        );
        for (i, env) in got.iter().enumerate() {
            assert_data(env, &json!("Trade"), &p_id, t, &json!({"seq": i}), t0);
        }
    }
    none(&p);
    let errors: Vec<Value> = p
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["ev"] == "error")
        .cloned()
        .collect();
    assert!(errors.is_empty(), "publisher errors: {errors:?}");
}

/// CORS is open: a cross-origin polling handshake is answered with
/// `Access-Control-Allow-Origin: *`, and the preflight of the polling POST
/// gets a 2xx allowing POST.
fn cors_is_open_to_any_origin(url: &str) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let origin = "http://localhost:18093";
    let handshake = format!("{url}/socket.io/?EIO=4&transport=polling");
    let resp = agent
        .get(&handshake)
        .header("Origin", origin)
        .call()
        .expect("handshake");
    assert_eq!(resp.status().as_u16(), 200);
    let acao = |r: &ureq::http::Response<ureq::Body>, h: &str| {
        r.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(
        acao(&resp, "access-control-allow-origin").as_deref(),
        Some("*")
    );

    let resp = agent
        .options(&handshake)
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .call()
        .expect("preflight");
    assert!(resp.status().is_success(), "preflight: {}", resp.status());
    assert_eq!(
        acao(&resp, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    let methods = acao(&resp, "access-control-allow-methods").unwrap_or_default();
    assert!(
        methods.split(',').any(|m| m.trim() == "POST"),
        "allowed methods: {methods:?}"
    );
}

// ------------------------------------------------------------------ both targets

macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        /// Against the legacy Node hub.
        mod hub {
            use super::common::*;
            $(
                #[test]
                fn $check() {
                    let hub = Hub::start();
                    super::$check(&hub.url());
                }
            )*
        }
        /// Against the bridge (TraderX configuration, with NATS).
        mod bridge {
            use super::common::*;
            $(
                #[test]
                fn $check() {
                    let nats = Nats::start();
                    let bridge = Bridge::start(&nats);
                    super::$check(&bridge.url());
                }
            )*
        }
    };
}

contract!(
    subscribe_broadcasts_join_notice,
    publish_envelope_is_exact,
    type_defaults_to_message,
    sender_gets_own_publish_only_when_subscribed,
    delivers_to_topic_room_and_catch_all_once,
    rooms_are_literal,
    unsubscribe_broadcasts_leave_then_leaves,
    unusbscribe_alias_broadcasts_leave_then_leaves,
    unsubscribe_unknown_topic_is_harmless,
    payload_json_passes_through,
    order_from_one_publisher_is_preserved,
    cors_is_open_to_any_origin,
);
