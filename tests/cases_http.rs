//! Bug cases about the HTTP side of the Socket.IO endpoint (B25 paths and the
//! nginx ingress, B26 CORS) in /work/shared/cases/bug-cases.md.
//!
//! Headers are checked on raw HTTP, so what the test sees is exactly what a
//! browser or a proxy would get.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::http::{handshake, raw, Resp};
use common::nginx::{replace_all, Nginx, NginxOpts, Upstreams};
use common::*;
use serde_json::{json, Value};

const BROWSER_ORIGIN: &str = "http://localhost:18093";
const QUICK: Duration = Duration::from_secs(1);

fn order(id: &str) -> Value {
    json!({"id": id, "accountId": 22, "security": "ACME", "quantity": 1, "side": "Buy"})
}

fn is_data(e: &Value) -> bool {
    e["ev"] == "event" && e["event"] == "publish" && e["args"][0]["from"] != "System"
}

/// Data envelopes on `topic`: waits until `n` have arrived (at most `WAIT`),
/// then takes whatever else arrives within a quiet period.
fn collect(agent: &Agent, n: usize, topic: &str) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.try_expect(left, |e| is_data(e) && e["args"][0]["topic"] == topic) {
            Some(e) => got.push(e["args"][0].clone()),
            None => break,
        }
    }
    let extra = agent.drain(SHORT, |e| is_data(e) && e["args"][0]["topic"] == topic);
    got.extend(extra.into_iter().map(|e| e["args"][0].clone()));
    got
}

// ------------------------------------------------------------------ clients

/// A Socket.IO client, the path option it was given, and its socket id.
struct Peer {
    label: String,
    agent: Agent,
    id: String,
}

fn peer(url: &str, lang: Lang, path: Option<&str>) -> Peer {
    let agent = Agent::sio(lang);
    let opts = match path {
        Some(p) => json!({"path": p}),
        None => json!({}),
    };
    let id = agent.connect(url, opts);
    Peer {
        label: format!("{lang:?} path={}", path.unwrap_or("(default)")),
        agent,
        id,
    }
}

/// Everyone subscribes to one topic and publishes one order; everyone gets
/// every order once, with the publisher's socket id.
fn round_trip(peers: &[Peer]) {
    let topic = "/trades";
    for p in peers {
        p.agent.subscribe(topic);
    }
    for (i, p) in peers.iter().enumerate() {
        p.agent
            .publish(topic, "TradeOrder", order(&format!("P-{i}")));
    }
    for p in peers {
        let got = collect(&p.agent, peers.len(), topic);
        let mut ids: Vec<String> = got
            .iter()
            .map(|e| e["payload"]["id"].as_str().unwrap_or("?").to_string())
            .collect();
        ids.sort();
        let mut want: Vec<String> = (0..peers.len()).map(|i| format!("P-{i}")).collect();
        want.sort();
        assert_eq!(ids, want, "{} received", p.label);
        for e in &got {
            let i: usize = e["payload"]["id"].as_str().unwrap()[2..].parse().unwrap();
            assert_eq!(
                e["from"],
                peers[i].id.as_str(),
                "{}: sender of P-{i}",
                p.label
            );
            assert_eq!(e["type"], "TradeOrder");
        }
    }
}

/// A client with reconnection off gets a connect_error soon; returns how soon.
fn refused_quickly(url: &str, lang: Lang, path: &str) -> Duration {
    let agent = Agent::sio(lang);
    agent.cmd(json!({"cmd": "connect", "url": url, "path": path, "reconnection": false}));
    let t0 = Instant::now();
    let ev = agent.expect("connect_error", WAIT, |e| {
        e["ev"] == "connect_error" || e["ev"] == "connected"
    });
    assert_eq!(ev["ev"], "connect_error", "{lang:?} on {path}: {ev}");
    t0.elapsed()
}

fn post_connect(port: u16, sid: &str, origin: &str) -> Resp {
    raw(
        port,
        "POST",
        &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
        &[
            ("Origin", origin),
            ("Content-Type", "text/plain;charset=UTF-8"),
        ],
        "40",
    )
}

fn preflight(port: u16, origin: &str) -> Resp {
    raw(
        port,
        "OPTIONS",
        "/socket.io/?EIO=4&transport=polling&sid=x",
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        "",
    )
}

fn ws_upgrade(port: u16, path: &str, origin: &str) -> Resp {
    raw(
        port,
        "GET",
        &format!("{path}?EIO=4&transport=websocket"),
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Origin", origin),
        ],
        "",
    )
}

// ------------------------------------------------------------------ nginx

/// The shipped ingress snippets (compose/ingress) in front of `bridge`; with
/// `upgrade_headers` false, a variant of them without HTTP/1.1 and the
/// Upgrade/Connection headers.
fn shipped_ingress(bridge: &Bridge, upgrade_headers: bool) -> Nginx {
    let up = Upstreams {
        bridge: Some(bridge.port),
        ..Default::default()
    };
    if upgrade_headers {
        return Nginx::shipped(&up);
    }
    let strip = |name: &str, text: &str| {
        if name != "trade-feed.conf" {
            return text.to_string();
        }
        let mut t = text.to_string();
        for line in [
            "    proxy_http_version 1.1;\n",
            "    proxy_set_header Upgrade $http_upgrade;\n",
            "    proxy_set_header Connection $tradefeed_connection_upgrade;\n",
        ] {
            t = replace_all(name, &t, line, "");
        }
        t
    };
    Nginx::shipped_with(
        &up,
        NginxOpts {
            edit_locations: Some(Box::new(strip)),
            ..Default::default()
        },
    )
}

// ------------------------------------------------------------------ B25

/// B25 without a proxy: `/trade-feed` (with and without a trailing slash in
/// the client option) and the default `/socket.io` share one set of rooms.
#[test]
fn b25_clients_on_trade_feed_and_socket_io_paths_share_rooms() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let url = bridge.url();
    let peers = vec![
        peer(&url, Lang::Node, Some("/trade-feed")),
        peer(&url, Lang::Node, Some("/trade-feed/")),
        peer(&url, Lang::Java, Some("/trade-feed")),
        peer(&url, Lang::Java, Some("/trade-feed/")),
        peer(&url, Lang::Python, Some("trade-feed")),
        peer(&url, Lang::Python, Some("/trade-feed/")),
        peer(&url, Lang::Node, None),
    ];
    round_trip(&peers);

    // The bridge records the path each client came in on.
    let log = bridge.log();
    for p in &peers {
        let line = log
            .lines()
            .find(|l| l.contains("legacy client connected") && l.contains(&format!("id={}", p.id)))
            .unwrap_or_else(|| panic!("{}: no connect line", p.label));
        let want = if p.label.contains("trade-feed") {
            "path=/trade-feed/"
        } else {
            "path=/socket.io/"
        };
        assert!(line.contains(want), "{}: {line}", p.label);
    }
}

/// B25: the handshake answers on both paths with and without the trailing
/// slash; any other path gets a 404 at once, and clients fail fast on it.
#[test]
fn b25_wrong_path_gets_a_quick_404() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    for path in ["/socket.io/", "/socket.io", "/trade-feed/", "/trade-feed"] {
        let r = handshake(bridge.port, path, None);
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert!(!r.sid().is_empty());
    }
    for path in [
        "/tradefeed/",
        "/trade-feedx/",
        "/socket.iox/",
        "/trade/feed/",
        "/",
        "/engine.io/",
    ] {
        let r = handshake(bridge.port, path, None);
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert!(r.took < QUICK, "{path}: 404 after {:?}", r.took);
    }
    for (lang, path) in [
        (Lang::Node, "/tradefeed"),
        (Lang::Java, "/trade_feed"),
        (Lang::Python, "feed"),
    ] {
        let took = refused_quickly(&bridge.url(), lang, path);
        assert!(
            took < Duration::from_secs(5),
            "{lang:?} on {path}: refused after {took:?}"
        );
    }
}

/// The clients of TraderX through nginx, after a round trip.
struct Ingress {
    bridge: Bridge,
    nginx: Nginx,
    peers: Vec<Peer>,
    _nats: Nats,
}

fn through_nginx(upgrade_headers: bool) -> Ingress {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let nginx = shipped_ingress(&bridge, upgrade_headers);
    let url = nginx.url();
    let peers = vec![
        peer(&url, Lang::Node, Some("/trade-feed")),
        peer(&url, Lang::Java, Some("/trade-feed")),
        peer(&url, Lang::Python, Some("trade-feed")),
        peer(&url, Lang::Node, None),
    ];
    round_trip(&peers);
    Ingress {
        bridge,
        nginx,
        peers,
        _nats: nats,
    }
}

/// Clients on each transport, as the bridge counts them; waits (bounded)
/// for `want`.
fn transports(bridge: &Bridge, want: (f64, f64)) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, text) = bridge.admin("/metrics");
        let got = (
            metric_value(
                &text,
                "tradefeed_bridge_socketio_clients",
                &[("transport", "websocket")],
            ),
            metric_value(
                &text,
                "tradefeed_bridge_socketio_clients",
                &[("transport", "polling")],
            ),
        );
        if got == want || Instant::now() > deadline {
            return got;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// B25 through nginx with HTTP/1.1 and the Upgrade/Connection headers: every
/// client ends on WebSocket, and a path nginx does not route is a quick 404.
#[test]
fn b25_nginx_with_upgrade_headers_clients_end_on_websocket() {
    let Ingress {
        bridge,
        nginx,
        peers,
        _nats,
    } = through_nginx(true);
    for p in &peers {
        p.agent.expect(&format!("{} upgraded", p.label), WAIT, |e| {
            e["ev"] == "upgraded" && e["transport"] == "websocket"
        });
    }
    let n = peers.len() as f64;
    assert_eq!(
        transports(&bridge, (n, 0.0)),
        (n, 0.0),
        "(websocket, polling)"
    );
    // still round-trips once upgraded
    for p in &peers {
        p.agent
            .publish("/trades", "TradeOrder", order("after-upgrade"));
    }
    for p in &peers {
        assert_eq!(
            collect(&p.agent, peers.len(), "/trades").len(),
            peers.len(),
            "{}",
            p.label
        );
    }

    let r = handshake(nginx.port, "/feed/", None);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.took < QUICK, "404 after {:?}", r.took);
    let took = refused_quickly(&nginx.url(), Lang::Node, "/feed");
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    assert!(nginx.dir.path().join("nginx.pid").exists());
    assert!(
        !nginx.error_log().contains("[emerg]"),
        "{}",
        nginx.error_log()
    );
}

/// B25 through nginx without the Upgrade headers: the WebSocket upgrade
/// cannot pass, clients stay on polling and still round-trip.
#[test]
fn b25_nginx_without_upgrade_headers_clients_stay_on_polling() {
    let Ingress {
        bridge,
        nginx,
        peers,
        _nats,
    } = through_nginx(false);
    let n = peers.len() as f64;
    assert_eq!(
        transports(&bridge, (0.0, n)),
        (0.0, n),
        "(websocket, polling)"
    );
    for p in &peers {
        let up = p
            .agent
            .drain(Duration::from_millis(200), |e| e["ev"] == "upgraded");
        assert!(
            up.is_empty(),
            "{} upgraded through nginx without Upgrade headers",
            p.label
        );
    }
    let r = handshake(nginx.port, "/feed/", None);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.took < QUICK);
}

// ------------------------------------------------------------------ B26

/// B26, legacy policy: any origin may poll and upgrade, and the preflight for
/// the POST allows GET and POST.
#[test]
fn b26_cors_open_to_any_origin_by_default() {
    let nats = Nats::start();
    let bridge = Bridge::start(&nats);
    let port = bridge.port;
    for path in ["/socket.io/", "/trade-feed/"] {
        let r = handshake(port, path, Some(BROWSER_ORIGIN));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.header("Access-Control-Allow-Origin"),
            Some("*"),
            "{path} GET: {r:?}"
        );
        assert_eq!(r.header("Access-Control-Allow-Credentials"), None);
    }
    let sid = handshake(port, "/socket.io/", Some(BROWSER_ORIGIN)).sid();
    let r = post_connect(port, &sid, BROWSER_ORIGIN);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        Some("*"),
        "POST: {r:?}"
    );

    let r = preflight(port, BROWSER_ORIGIN);
    assert!((200..300).contains(&r.status), "preflight: {r:?}");
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        Some("*"),
        "preflight: {r:?}"
    );
    let methods = r
        .header("Access-Control-Allow-Methods")
        .unwrap_or_default()
        .to_uppercase();
    assert!(
        methods.contains("GET") && methods.contains("POST"),
        "preflight: {r:?}"
    );

    let r = ws_upgrade(port, "/socket.io/", BROWSER_ORIGIN);
    assert_eq!(r.status, 101, "websocket with Origin: {r:?}");
}

/// B26, allowlist with credentials: the allowed origin is echoed (never `*`)
/// with credentials; another origin is refused on polling and WebSocket.
#[test]
fn b26_cors_allowlist_with_credentials() {
    let nats = Nats::start();
    let bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: vec![
                (
                    "TRADEFEED_BRIDGE_SOCKETIO__CORS_ORIGINS",
                    format!("[\"{BROWSER_ORIGIN}\"]"),
                ),
                ("TRADEFEED_BRIDGE_SOCKETIO__CORS_CREDENTIALS", "true".into()),
            ],
            ..Default::default()
        },
    );
    let port = bridge.port;
    let allowed = |r: &Resp, what: &str| {
        assert_eq!(
            r.header("Access-Control-Allow-Origin"),
            Some(BROWSER_ORIGIN),
            "{what}: {r:?}"
        );
        assert_eq!(r.header_count("Access-Control-Allow-Origin"), 1, "{what}");
        assert_eq!(
            r.header("Access-Control-Allow-Credentials"),
            Some("true"),
            "{what}: {r:?}"
        );
    };

    for path in ["/socket.io/", "/trade-feed/"] {
        let r = handshake(port, path, Some(BROWSER_ORIGIN));
        assert_eq!(r.status, 200, "{r:?}");
        allowed(&r, &format!("GET {path}"));
    }
    let sid = handshake(port, "/socket.io/", Some(BROWSER_ORIGIN)).sid();
    let r = post_connect(port, &sid, BROWSER_ORIGIN);
    assert_eq!(r.status, 200, "{r:?}");
    allowed(&r, "POST");
    let r = preflight(port, BROWSER_ORIGIN);
    assert!((200..300).contains(&r.status), "preflight: {r:?}");
    allowed(&r, "preflight");
    let methods = r
        .header("Access-Control-Allow-Methods")
        .unwrap_or_default()
        .to_uppercase();
    assert!(
        methods.contains("GET") && methods.contains("POST"),
        "preflight: {r:?}"
    );
    assert_eq!(ws_upgrade(port, "/socket.io/", BROWSER_ORIGIN).status, 101);

    // Another origin: refused everywhere, and never told it may read.
    let evil = "http://evil.example:8080";
    for path in ["/socket.io/", "/trade-feed/"] {
        let r = handshake(port, path, Some(evil));
        assert_eq!(r.status, 403, "GET {path}: {r:?}");
        assert_eq!(r.header("Access-Control-Allow-Origin"), None);
        let r = ws_upgrade(port, path, evil);
        assert_eq!(r.status, 403, "websocket {path}: {r:?}");
    }
    let r = post_connect(
        port,
        &handshake(port, "/socket.io/", Some(BROWSER_ORIGIN)).sid(),
        evil,
    );
    assert_eq!(r.status, 403, "POST: {r:?}");
    let r = preflight(port, evil);
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        None,
        "preflight: {r:?}"
    );

    // Clients that send no Origin (the Java services) are not browsers: served.
    let r = handshake(port, "/socket.io/", None);
    assert_eq!(r.status, 200, "{r:?}");
    let java = Agent::sio(Lang::Java);
    java.connect(&bridge.url(), json!({"path": "/trade-feed"}));
}
