//! Real legacy Socket.IO clients against the bridge: socket.io-client 4.8
//! (Node) on each transport choice, io.socket 2.1 (Java, Engine.IO 4),
//! python-socketio 5.x, and io.socket 1.0 (Java, Engine.IO 3); case B11
//! (all four protocol generations on one bridge, through an idle period
//! longer than the heartbeat); raw Engine.IO handshakes; and the `/trade-feed`
//! alias path sharing rooms with `/socket.io`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

// ------------------------------------------------------------------ helpers

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn bridge() -> (Nats, Bridge) {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    (nats, bridge)
}

fn is_publish(e: &Value) -> bool {
    e["ev"] == "event" && e["event"] == "publish"
}

/// Exactly `n` `publish` envelopes (System notices included): waits for
/// each (bounded), then fails on any extra server event in a quiet period.
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

/// A data or System envelope: exactly {type, from, topic, date, payload},
/// `date` the server's clock in integer ms.
fn assert_env(env: &Value, kind: &str, from: &str, topic: &str, payload: &Value, t0: u64) {
    let mut keys: Vec<&String> = env.as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(keys, ["date", "from", "payload", "topic", "type"], "{env}");
    assert_eq!(env["type"], kind, "{env}");
    assert_eq!(env["from"], from, "{env}");
    assert_eq!(env["topic"], topic, "{env}");
    assert_eq!(&env["payload"], payload, "{env}");
    let d = env["date"]
        .as_u64()
        .unwrap_or_else(|| panic!("date: {env}"));
    assert!(
        d + 1000 >= t0 && d <= now_ms() + 1000,
        "date {d} (t0 {t0}): {env}"
    );
}

/// Subscribes and consumes (and checks) the subscriber's own join notice.
fn join(a: &Agent, id: &str, topic: &str) {
    let t0 = now_ms();
    a.emit("subscribe", json!([topic]));
    let e = a.expect("own join notice", WAIT, is_publish);
    let msg = json!({ "message": format!("New Joiner {id} to topic {topic}") });
    assert_env(&e["args"][0], "message", "System", topic, &msg, t0);
}

fn settle(agents: &[&Agent]) {
    std::thread::sleep(SHORT);
    for a in agents {
        a.drain(Duration::ZERO, |_| true);
    }
}

fn events(a: &Agent, ev: &str) -> Vec<Value> {
    a.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["ev"] == ev)
        .cloned()
        .collect()
}

/// Exactly one `connected` and no `disconnected` so far.
fn assert_never_dropped(a: &Agent) {
    let connects = events(a, "connected");
    let drops = events(a, "disconnected");
    let errors = events(a, "connect_error");
    assert!(
        connects.len() == 1 && drops.is_empty() && errors.is_empty(),
        "{}: connected {connects:?}, disconnected {drops:?}, connect_error {errors:?}",
        a.name
    );
}

/// The transport reported with the (only) `connected` event.
fn connected_transport(a: &Agent) -> String {
    let c = events(a, "connected");
    assert_eq!(c.len(), 1, "{}: {c:?}", a.name);
    c[0]["transport"].as_str().unwrap_or_default().to_string()
}

/// Both join `/trades`; each publishes once; each gets both messages
/// exactly once (its own included), with the exact envelope.
fn round_trip(x: &Agent, x_id: &str, peer: &Agent, peer_id: &str) {
    let t = "/trades";
    join(x, x_id, t);
    let t0 = now_ms();
    join(peer, peer_id, t);
    // x hears the peer joining its room
    let got = take(x, 1);
    let msg = json!({ "message": format!("New Joiner {peer_id} to topic {t}") });
    assert_env(&got[0], "message", "System", t, &msg, t0);
    take(peer, 0);

    for (sender, sender_id, tag) in [(peer, peer_id, "from-peer"), (x, x_id, "from-client")] {
        let payload = json!({"id": tag, "accountId": 22, "security": "ACME ★", "quantity": 100, "side": "Buy"});
        let t0 = now_ms();
        sender.publish(t, "TradeOrder", payload.clone());
        for r in [x, peer] {
            let got = take(r, 1);
            assert_env(&got[0], "TradeOrder", sender_id, t, &payload, t0);
        }
    }
}

/// A client of `lang` with `opts`, round-tripping with a Node peer.
fn client_round_trip(lang: Lang, opts: Value) -> (Agent, Agent) {
    let (_nats, bridge) = bridge();
    let c = Agent::sio(lang);
    let peer = Agent::sio(Lang::Node);
    let id = c.connect(&bridge.url(), opts);
    let peer_id = peer.connect(&bridge.url(), json!({"transports": ["websocket"]}));
    assert_ne!(id, peer_id);
    round_trip(&c, &id, &peer, &peer_id);
    assert_never_dropped(&c);
    assert_never_dropped(&peer);
    (c, peer)
}

fn expect_upgrade(a: &Agent) {
    let up = a.expect("upgraded", WAIT, |e| e["ev"] == "upgraded");
    assert_eq!(up["transport"], "websocket", "{}: {up}", a.name);
}

// ------------------------------------------------------------------ clients

/// socket.io-client 4.8 on HTTP long-polling only: stays on polling.
#[test]
fn node_polling_only() {
    let (c, _peer) = client_round_trip(Lang::Node, json!({"transports": ["polling"]}));
    assert_eq!(connected_transport(&c), "polling");
    assert!(
        events(&c, "upgraded").is_empty(),
        "{:?}",
        events(&c, "upgraded")
    );
}

/// socket.io-client 4.8 on WebSocket only.
#[test]
fn node_websocket_only() {
    let (c, _peer) = client_round_trip(Lang::Node, json!({"transports": ["websocket"]}));
    assert_eq!(connected_transport(&c), "websocket");
    assert!(
        events(&c, "upgraded").is_empty(),
        "{:?}",
        events(&c, "upgraded")
    );
}

/// socket.io-client 4.8 with its default (polling, then upgrade to
/// WebSocket, as browsers do): the upgrade happens, then messages flow.
#[test]
fn node_default_upgrades_to_websocket() {
    let (_nats, bridge) = bridge();
    let c = Agent::sio(Lang::Node);
    let peer = Agent::sio(Lang::Python);
    let id = c.connect(&bridge.url(), json!({}));
    expect_upgrade(&c);
    assert_eq!(events(&c, "upgraded").len(), 1);
    let peer_id = peer.connect(&bridge.url(), json!({}));
    round_trip(&c, &id, &peer, &peer_id);
    assert_never_dropped(&c);
    assert_never_dropped(&peer);
}

/// io.socket socket.io-client 2.1 (TraderX's Java services), default
/// transports: it upgrades to WebSocket.
#[test]
fn java_v2_client() {
    let (c, _peer) = client_round_trip(Lang::Java, json!({}));
    expect_upgrade(&c);
}

/// python-socketio 5.x, default transports: it upgrades inside connect(),
/// so it reports WebSocket when connected.
#[test]
fn python_client() {
    let (c, _peer) = client_round_trip(Lang::Python, json!({}));
    assert_eq!(connected_transport(&c), "websocket");
}

/// io.socket socket.io-client 1.0 (Engine.IO 3, Socket.IO protocol 4):
/// refused by the legacy hub (socket.io 4 without allowEIO3, which proves the
/// agent really speaks EIO3), served by the bridge (socketioxide `v4`).
#[test]
fn java_v1_eio3_client() {
    let hub = Hub::start();
    let old = Agent::sio(Lang::Java1);
    old.cmd(json!({"cmd": "connect", "url": hub.url(), "reconnection": false}));
    let ev = old.expect("connect result", WAIT, |e| {
        e["ev"] == "connected" || e["ev"] == "connect_error"
    });
    assert_eq!(
        ev["ev"], "connect_error",
        "an EIO3 client must be refused by socket.io 4: {ev}"
    );
    drop(old);
    drop(hub);

    let (c, _peer) = client_round_trip(Lang::Java1, json!({}));
    expect_upgrade(&c);
}

// ------------------------------------------------------------------ B11

/// Case B11: JAVA1 (EIO3), JAVA2 (EIO4), JS4 and PY on one bridge and one
/// path, with a 1 s heartbeat. Each subscribes to `/trades` and publishes
/// once; everyone gets all four messages exactly once. After 4 s idle
/// (several ping intervals, in both heartbeat directions: EIO3 clients ping,
/// EIO4 servers ping) nobody was dropped and a second round is delivered the
/// same way.
#[test]
fn b11_all_protocol_generations_on_one_bridge_survive_idle() {
    let nats = Nats::start();
    let bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: vec![
                ("TRADEFEED_BRIDGE_SOCKETIO__PING_INTERVAL", "1s".into()),
                ("TRADEFEED_BRIDGE_SOCKETIO__PING_TIMEOUT", "1s".into()),
            ],
            ..Default::default()
        },
    );
    // the heartbeat settings really are in force, for both protocols
    for eio in [3, 4] {
        let (status, body) = http_get(&format!(
            "{}/socket.io/?EIO={eio}&transport=polling",
            bridge.url()
        ));
        assert_eq!(status, 200, "EIO={eio}: {body}");
        let open: Value =
            serde_json::from_str(&body[body.find('{').expect("open packet")..]).unwrap();
        assert_eq!(
            (open["pingInterval"].as_u64(), open["pingTimeout"].as_u64()),
            (Some(1000), Some(1000)),
            "{body}"
        );
    }

    // start every process first: the JVMs boot in parallel
    let clients: Vec<(&str, Agent)> = vec![
        ("JAVA1", Agent::sio(Lang::Java1)),
        ("JAVA2", Agent::sio(Lang::Java)),
        ("JS4", Agent::sio(Lang::Node)),
        ("PY", Agent::sio(Lang::Python)),
    ];
    let ids: Vec<String> = clients
        .iter()
        .map(|(_, a)| a.connect(&bridge.url(), json!({})))
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "socket ids not distinct: {ids:?}");
    for ((_, a), id) in clients.iter().zip(&ids) {
        join(a, id, "/trades");
    }
    let agents: Vec<&Agent> = clients.iter().map(|(_, a)| a).collect();
    settle(&agents);

    let round = |n: u32| {
        let t0 = now_ms();
        for (name, a) in &clients {
            a.publish(
                "/trades",
                "TradeOrder",
                json!({"id": format!("{name}-{n}"), "side": "Buy"}),
            );
        }
        let mut want: Vec<(String, String)> = clients
            .iter()
            .zip(&ids)
            .map(|((name, _), id)| (id.clone(), format!("{name}-{n}")))
            .collect();
        want.sort();
        for (name, a) in &clients {
            let got = take(a, 4);
            let mut have: Vec<(String, String)> = got
                .iter()
                .map(|e| {
                    let from = e["from"].as_str().unwrap_or_default().to_string();
                    let id = e["payload"]["id"].as_str().unwrap_or_default();
                    assert_env(
                        e,
                        "TradeOrder",
                        &from,
                        "/trades",
                        &json!({"id": id, "side": "Buy"}),
                        t0,
                    );
                    (from, id.to_string())
                })
                .collect();
            have.sort();
            assert_eq!(have, want, "{name} in round {n}: (from, id) of what it got");
        }
    };
    round(1);

    std::thread::sleep(Duration::from_secs(4));
    for (name, a) in &clients {
        assert!(
            a.drain(Duration::ZERO, |e| e["ev"] == "event").is_empty(),
            "{name} got events while idle"
        );
        assert_never_dropped(a);
    }
    round(2);
    // the same bridge answers unsupported Engine.IO versions at once
    for eio in [2, 5] {
        let (status, body, took) = timed_get(&format!(
            "{}/socket.io/?EIO={eio}&transport=polling",
            bridge.url()
        ));
        assert_eq!(status, 400, "EIO={eio}: {body}");
        assert!(took < PROMPT, "EIO={eio}: answered after {took:?}");
        assert!(
            body.contains("Unsupported protocol version"),
            "EIO={eio}: {body}"
        );
    }
    for (_, a) in &clients {
        assert_never_dropped(a);
    }
    assert!(
        !bridge.log().contains("panicked"),
        "bridge log:\n{}",
        bridge.log()
    );
}

// ------------------------------------------------------------------ raw HTTP

fn timed_get(url: &str) -> (u16, String, Duration) {
    let start = Instant::now();
    let (status, body) = http_get(url);
    (status, body, start.elapsed())
}

const PROMPT: Duration = Duration::from_secs(2);

/// Unsupported Engine.IO versions (2, 5, none) get HTTP 400 at once with an
/// Engine.IO error body; EIO=4 gets an open packet; EIO=3 (accepted for
/// io.socket 1.x) gets the EIO3 length-prefixed framing.
#[test]
fn raw_handshakes_by_engine_io_version() {
    let (_nats, bridge) = bridge();
    let base = format!("{}/socket.io/", bridge.url());
    for query in [
        "EIO=2&transport=polling",
        "EIO=5&transport=polling",
        "transport=polling",
    ] {
        let (status, body, took) = timed_get(&format!("{base}?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(took < PROMPT, "{query}: answered after {took:?}");
        let err: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{query}: {e}: {body:?}"));
        assert_eq!(
            err["message"], "Unsupported protocol version",
            "{query}: {body}"
        );
        // Node's engine.io sends the code as a number (5); engineioxide as a
        // string ("5"). Clients only look at the HTTP status.
        assert!(
            err["code"] == json!(5) || err["code"] == json!("5"),
            "{query}: {body}"
        );
        assert_eq!(err.as_object().unwrap().len(), 2, "{body}");
    }

    let (status, body, took) = timed_get(&format!("{base}?EIO=4&transport=polling"));
    assert_eq!(status, 200, "{body}");
    assert!(took < PROMPT, "{took:?}");
    let open = open_packet(&body);
    assert_eq!(open["upgrades"], json!(["websocket"]));
    assert_eq!(open["pingInterval"], 25000);
    assert_eq!(open["pingTimeout"], 20000);
    assert_eq!(open["maxPayload"], 1_000_000);

    let (status, body, took) = timed_get(&format!("{base}?EIO=3&transport=polling"));
    assert_eq!(status, 200, "{body}");
    assert!(took < PROMPT, "{took:?}");
    // EIO3 polling framing: "<length>:<packet>"
    let (len, packet) = body
        .split_once(':')
        .unwrap_or_else(|| panic!("EIO3 framing: {body:?}"));
    assert_eq!(
        len.parse::<usize>().ok(),
        Some(packet.chars().count()),
        "{body:?}"
    );
    let open = open_packet(packet);
    assert_eq!(open["upgrades"], json!(["websocket"]));
}

/// "0{...}": an open packet with exactly the Engine.IO handshake fields.
fn open_packet(body: &str) -> Value {
    let json = body
        .strip_prefix('0')
        .unwrap_or_else(|| panic!("not an open packet: {body:?}"));
    let open: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    let mut keys: Vec<&String> = open.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "maxPayload",
            "pingInterval",
            "pingTimeout",
            "sid",
            "upgrades"
        ],
        "{body}"
    );
    assert!(
        open["sid"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );
    open
}

/// A wrong path gets a quick 404 (not a hang); the `/trade-feed` alias
/// answers the handshake like `/socket.io`.
#[test]
fn raw_paths_wrong_is_404_alias_works() {
    let (_nats, bridge) = bridge();
    for path in ["/nope/", "/", "/socket.iox/", "/trade-feedx/", "/trade/"] {
        let (status, body, took) =
            timed_get(&format!("{}{path}?EIO=4&transport=polling", bridge.url()));
        assert_eq!(status, 404, "{path}: {body}");
        assert!(took < PROMPT, "{path}: answered after {took:?}");
    }
    let (status, body, took) = timed_get(&format!(
        "{}/trade-feed/?EIO=4&transport=polling",
        bridge.url()
    ));
    assert_eq!(status, 200, "{body}");
    assert!(took < PROMPT, "{took:?}");
    let open = open_packet(&body);
    assert_eq!(open["pingInterval"], 25000);
    let (status, body, _) = timed_get(&format!(
        "{}/trade-feed/?EIO=5&transport=polling",
        bridge.url()
    ));
    assert_eq!(status, 400, "{body}");
}

/// socket.io-client on path `/trade-feed` and python-socketio on
/// `/socket.io` share one set of rooms: messages go both ways, once each.
#[test]
fn trade_feed_alias_path_shares_rooms_with_socket_io() {
    let (_nats, bridge) = bridge();
    let alias = Agent::sio(Lang::Node);
    let default = Agent::sio(Lang::Python);
    let alias_id = alias.connect(&bridge.url(), json!({"path": "/trade-feed"}));
    let default_id = default.connect(&bridge.url(), json!({"path": "/socket.io"}));
    round_trip(&alias, &alias_id, &default, &default_id);
    assert_never_dropped(&alias);
    assert_never_dropped(&default);
}
