//! Through real nginx running the shipped ingress snippets
//! (compose/ingress): Socket.IO clients reach the bridge on `/socket.io/`
//! and `/trade-feed/` (long polling, then the WebSocket upgrade), NATS
//! WebSocket clients (nats.ws) reach nats-server on `/nats-ws`, and the two
//! meet through the bridge. The broker runs compose/nats-server.conf.

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::nginx::{Nginx, Upstreams};
use common::*;
use serde_json::{json, Value};

struct Stack {
    broker: Broker,
    bridge: Bridge,
    nginx: Nginx,
}

fn stack() -> Stack {
    let broker = Broker::shipped();
    let bridge = Bridge::start_url(&broker.url(), BridgeOpts::default());
    let nginx = Nginx::shipped(&Upstreams {
        bridge: Some(bridge.port),
        admin: Some(bridge.admin_port),
        nats_ws: vec![broker.ws_port],
    });
    Stack {
        broker,
        bridge,
        nginx,
    }
}

fn sio_through(nginx: &Nginx, path: Option<&str>) -> (Agent, String) {
    let a = Agent::sio(Lang::Node);
    let mut connect = json!({"cmd": "connect", "url": nginx.url()});
    if let Some(p) = path {
        connect["path"] = json!(p);
    }
    a.cmd(connect);
    let ev = a.expect("connected", WAIT, |e| {
        e["ev"] == "connected" || e["ev"] == "connect_error"
    });
    assert_eq!(ev["ev"], "connected", "{ev}");
    a.expect("upgrade to websocket", WAIT, |e| {
        e["ev"] == "upgraded" && e["transport"] == "websocket"
    });
    (a, ev["id"].as_str().unwrap().to_string())
}

fn ws_client(nginx: &Nginx) -> Agent {
    let a = Agent::nats(Lang::Node);
    a.cmd(
        json!({"cmd": "connect", "servers": [nginx.nats_ws_url()], "ignoreClusterUpdates": true}),
    );
    a
}

#[test]
fn socket_io_clients_poll_then_upgrade_through_the_ingress_on_both_paths() {
    let s = stack();
    let (a, a_id) = sio_through(&s.nginx, None);
    let (b, b_id) = sio_through(&s.nginx, Some("/trade-feed"));
    a.subscribe("/trades");
    b.subscribe("/trades");
    a.publish(
        "/trades",
        "TradeOrder",
        json!({"id": "O-1", "accountId": 22}),
    );
    for (who, agent) in [("a", &a), ("b", &b)] {
        let env = agent.next_publish(WAIT, |e| e["topic"] == "/trades");
        assert_eq!(env["payload"]["id"], "O-1", "{who}");
        assert_eq!(env["from"], a_id.as_str(), "{who}");
        assert_eq!(env["type"], "TradeOrder");
    }

    // The bridge sees both on WebSocket, on the path each used, with the
    // client's address forwarded by the ingress.
    let (status, body) = s.bridge.admin("/console/api/state");
    assert_eq!(status, 200);
    let state: Value = serde_json::from_str(&body).unwrap();
    let clients = state["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2, "{clients:?}");
    for (id, path) in [(&a_id, "/socket.io/"), (&b_id, "/trade-feed/")] {
        let c = clients.iter().find(|c| c["id"] == id.as_str()).unwrap();
        assert_eq!(c["transport"], "websocket", "{c}");
        assert_eq!(c["path"], path, "{c}");
        let remote = c["remote_addr"].as_str().unwrap();
        assert!(remote.starts_with("127.0.0.1 (via 127.0.0.1:"), "{remote}");
    }

    // Long polling first, then the upgrade, as nginx saw them.
    let log = s.nginx.access_log();
    for path in ["/socket.io/", "/trade-feed/"] {
        let polling = log
            .lines()
            .position(|l| l.contains(&format!("GET {path}?EIO=4&transport=polling")));
        assert!(polling.is_some(), "{path}: no polling request in\n{log}");
    }
    // An upgraded request is logged when it ends: close the clients.
    drop((a, b));
    let logged = wait_until(WAIT, || {
        let log = s.nginx.access_log();
        ["/socket.io/", "/trade-feed/"].iter().all(|path| {
            log.lines().any(|l| {
                l.contains(&format!("GET {path}?EIO=4&transport=websocket"))
                    && l.contains("\" 101 ")
            })
        })
    });
    assert!(
        logged,
        "no WebSocket upgrade logged:\n{}",
        s.nginx.access_log()
    );
    assert!(!s.nginx.error_log().contains("[emerg]"));
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

#[test]
fn nats_websocket_clients_reach_the_broker_through_nats_ws() {
    let s = stack();
    let ws = ws_client(&s.nginx);
    let tcp = Agent::nats(Lang::Node);
    tcp.nats_connect(&s.broker.url());

    // TCP -> browser side, with a wildcard the UI uses.
    ws.sub("w", "positions.account.22.*");
    tcp.cmd(
        json!({"cmd": "pub", "subject": "positions.account.22.updated",
        "data": "{\"security\":\"ACME\",\"quantity\":5}", "headers": {"X-Test": "1"}}),
    );
    let m = ws.next_msg("w", WAIT);
    assert_eq!(m["subject"], "positions.account.22.updated");
    assert_eq!(m["data"], "{\"security\":\"ACME\",\"quantity\":5}");
    assert_eq!(header(&m, "X-Test").as_deref(), Some("1"));

    // Browser side -> TCP.
    tcp.sub("t", "trades.new");
    ws.pub_text("trades.new", "{\"id\":\"W-1\"}");
    assert_eq!(tcp.next_msg("t", WAIT)["data"], "{\"id\":\"W-1\"}");

    // Exactly one of each.
    assert!(ws.msgs("w", SHORT).is_empty());
    assert!(tcp.msgs("t", SHORT).is_empty());

    // One WebSocket upgrade on /nats-ws, logged by nginx when it closes.
    drop(ws);
    let one_upgrade = || {
        s.nginx
            .access_log()
            .lines()
            .filter(|l| l.contains("GET /nats-ws HTTP/1.1\" 101 "))
            .count()
            == 1
    };
    assert!(wait_until(WAIT, one_upgrade), "{}", s.nginx.access_log());
}

/// The migration's middle: a legacy Socket.IO client and a nats.ws client,
/// both through the ingress, exchange account updates through the bridge.
#[test]
fn legacy_and_nats_ws_clients_meet_through_the_bridge() {
    let s = stack();
    let (legacy, legacy_id) = sio_through(&s.nginx, Some("/trade-feed"));
    legacy.subscribe("/accounts/22/trades");
    let ws = ws_client(&s.nginx);
    ws.sub("p", "positions.account.22.*");

    legacy.publish(
        "/accounts/22/positions",
        "Position",
        json!({"accountId": 22, "security": "ACME", "quantity": 300}),
    );
    let m = ws.next_msg("p", WAIT);
    assert_eq!(m["subject"], "positions.account.22.updated");
    let env = body(&m);
    assert_eq!(env["type"], "Position");
    assert_eq!(env["from"], legacy_id.as_str());
    assert_eq!(env["payload"]["quantity"], 300);

    ws.pub_json(
        "trades.account.22.updated",
        &json!({"type": "Trade", "from": "trade-processor", "topic": "trades.account.22.updated",
                "date": 1, "payload": {"id": "T-1", "accountId": 22, "state": "Settled"}}),
    );
    let env = legacy.next_publish(WAIT, |e| e["topic"] == "/accounts/22/trades");
    assert_eq!(env["type"], "Trade");
    assert_eq!(env["payload"]["id"], "T-1");
    assert!(legacy.data_messages(SHORT).is_empty(), "exactly once");
    assert!(ws.msgs("p", Duration::from_millis(100)).is_empty());
}

/// The console location exposes the console and nothing else of the admin
/// port, read-only.
#[test]
fn console_location_exposes_only_the_console() {
    let s = stack();
    let base = s.nginx.url();
    let (status, body) = http_get(&format!("{base}/console/api/state"));
    assert_eq!(status, 200, "{body}");
    let state: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["ready"], true);
    assert_eq!(state["nats_url"], "/nats-ws");
    for path in [
        "/metrics",
        "/readyz",
        "/api/attach/legacy-consumers/trade-orders",
        "/api/legacy-consumers/trade-orders",
    ] {
        assert_eq!(http_get(&format!("{base}{path}")).0, 404, "{path}");
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let resp = agent
        .put(format!("{base}/console/api/state"))
        .send("x")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let resp = agent.get(format!("{base}/console")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 301);
    assert!(resp
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .ends_with("/console/"));
}
