//! Bug cases B19, B20 and B21 of /work/shared/cases/bug-cases.md, through
//! real nginx running the shipped ingress snippets, with the shipped broker
//! configuration and the console in headless Chromium as the browser.
//!
//! Long waits are scaled down by shrinking both sides in proportion, so the
//! ratios that decide the outcome stay the same:
//! - B21 (idle connections cut by proxies): 1/30. The 5 minutes of silence
//!   become 10 s; nginx's default proxy_read_timeout (60 s) becomes 2 s; the
//!   broker's shipped ping_interval (20 s) becomes 667 ms and nats-server's
//!   default (2 min) 4 s; Engine.IO's server ping (25 s) becomes 800 ms. The
//!   shipped snippet's 86400 s is left as it is (scaling it would only make
//!   it larger than the idle time by even more). Headless Chromium does not
//!   throttle a background tab's timers, so the page plays the worst such a
//!   tab can do: it sends no client pings during the silence (`?ping=3600`),
//!   leaving only server-initiated heartbeats.
//! - B19 (slow WebSocket consumers): the broker's write_deadline, 10 s as
//!   shipped, becomes 2 s; the burst (5 MB) and the throttle (20 kB/s) are
//!   the case's own numbers.
//! - B20 needs no scaling.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::browser::{Browser, POSITIONS_JS, WATCH_ROWS_JS};
use common::nginx::{replace_all, EditSnippet, Nginx, NginxOpts, Upstreams};
use common::throttle::Throttle;
use common::*;
use serde_json::{json, Value};

fn console_dir_env() -> (&'static str, String) {
    let dir = root().join("console/dist");
    assert!(
        dir.join("index.html").is_file(),
        "the console is not built: run scripts/install-test-deps.sh"
    );
    ("TRADEFEED_BRIDGE_CONSOLE__DIR", dir.display().to_string())
}

fn envelope(kind: &str, subject: &str, payload: Value) -> Value {
    json!({"type": kind, "from": "trade-processor", "topic": subject, "date": 1_764_781_234_567u64, "payload": payload})
}

/// Waits in the page until the console's NATS connection is up.
fn console_connected(browser: &Browser) {
    browser.wait(
        "main",
        "console connected to NATS",
        "window.tfbConsole && tfbConsole.natsState === 'connected' && tfbConsole.subjects.length === 2",
        WAIT,
    );
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    cond()
}

// ------------------------------------------------------------------ B21

/// B21 at 1/30 scale (see the module doc).
const IDLE: Duration = Duration::from_secs(10);
const NGINX_DEFAULT_READ_TIMEOUT: &str = "2s";
const SHIPPED_BROKER_PING: &str = "ping_interval: \"667ms\"";
const DEFAULT_BROKER_PING: &str = "ping_interval: \"4s\"";
const ENGINE_IO_PING: &str = "800ms";

/// In the page: socket.io-client 4.8 on `/trade-feed` through the ingress,
/// subscribing in its connect handler as the TraderX browser client does,
/// counting what it sees.
const LEGACY_CLIENT_JS: &str = "(() => {
    window.legacy = { connects: 0, disconnects: 0, trades: [] };
    const s = io(location.origin, { path: '/trade-feed' });
    s.on('connect', () => { legacy.connects += 1; s.emit('subscribe', '/accounts/22/trades'); });
    s.on('disconnect', () => { legacy.disconnects += 1; });
    s.on('publish', (m) => { if (m.from !== 'System' && m.topic === '/accounts/22/trades') legacy.trades.push(m.payload.id); });
    return true;
})()";

struct Idle {
    /// NATS WebSocket disconnects seen by the console during the silence.
    nats_disconnects: u64,
    legacy_disconnects: u64,
    /// The console's gap banner is shown.
    gap_shown: bool,
    nginx_error_log: String,
}

/// Both browser clients idle for `IDLE`, then one trade update from NATS and
/// one from a legacy publisher through the bridge; both clients must get
/// both. `read_timeout` replaces the snippets' 86400 s when given.
fn b21_idle(read_timeout: Option<&str>, broker_ping: &str) -> Idle {
    let broker = Broker::shipped_with(broker_ping);
    let bridge = Bridge::start_url(
        &broker.url(),
        BridgeOpts {
            env: vec![
                console_dir_env(),
                (
                    "TRADEFEED_BRIDGE_SOCKETIO__PING_INTERVAL",
                    ENGINE_IO_PING.into(),
                ),
            ],
            ..Default::default()
        },
    );
    let up = Upstreams {
        bridge: Some(bridge.port),
        admin: Some(bridge.admin_port),
        nats_ws: vec![broker.ws_port],
    };
    let nginx = match read_timeout {
        None => Nginx::shipped(&up),
        Some(t) => {
            let to = format!("proxy_read_timeout {t};");
            Nginx::shipped_with(
                &up,
                NginxOpts {
                    edit_locations: Some(Box::new(move |name, text| {
                        if name == "console.conf" {
                            return text.to_string();
                        }
                        replace_all(name, text, "proxy_read_timeout 86400;", &to)
                    })),
                    ..Default::default()
                },
            )
        }
    };

    let browser = Browser::launch(false);
    browser.open(
        "main",
        &format!("{}/console/?account=22&ping=3600", nginx.url()),
    );
    console_connected(&browser);
    browser.add_script(
        "main",
        &root().join("tests/node/node_modules/socket.io-client/dist/socket.io.min.js"),
    );
    browser.eval("main", LEGACY_CLIENT_JS);
    browser.wait(
        "main",
        "legacy client connected and subscribed",
        "legacy.connects === 1",
        WAIT,
    );
    // The subscription has reached the bridge when its room has a member.
    let deadline = Instant::now() + WAIT;
    while !bridge
        .admin("/console/api/state")
        .1
        .contains("/accounts/22/trades")
    {
        assert!(Instant::now() < deadline, "legacy subscription not seen");
        thread::sleep(Duration::from_millis(50));
    }

    // The silence the case is about.
    thread::sleep(IDLE);
    let during: Value = browser.eval(
        "main",
        "({ nats: tfbConsole.disconnects, legacy: legacy.disconnects })",
    );

    // Updates after the silence: the clients may have to reconnect first,
    // within their reconnect wait.
    browser.wait(
        "main",
        "both clients connected after the silence",
        "tfbConsole.natsState === 'connected' && legacy.connects > legacy.disconnects",
        WAIT,
    );
    let processor = Agent::nats(Lang::Node);
    processor.nats_connect(&broker.url());
    let subject = "trades.account.22.updated";
    let trade = |id: &str| json!({"id": id, "accountId": 22, "security": "IBM", "side": "Buy", "quantity": 1, "state": "Settled"});
    processor.pub_json(subject, &envelope("Trade", subject, trade("T-NATS")));
    let publisher = Agent::sio(Lang::Node);
    publisher.connect(&bridge.url(), json!({}));
    publisher.publish("/accounts/22/trades", "Trade", trade("T-LEGACY"));
    browser.wait(
        "main",
        "both updates on both clients",
        "['T-LEGACY', 'T-NATS'].every(id => tfbConsole.trades.has(id)) \
         && legacy.trades.includes('T-NATS') && legacy.trades.includes('T-LEGACY')",
        WAIT,
    );
    assert_eq!(
        browser.eval("main", "legacy.trades.slice().sort()"),
        json!(["T-LEGACY", "T-NATS"]),
        "each update once"
    );
    let gap_shown = browser.eval(
        "main",
        "!document.querySelector('#gap-banner').hidden && tfbConsole.gaps.length > 0",
    ) == json!(true);
    Idle {
        gap_shown,
        nats_disconnects: during["nats"].as_u64().unwrap(),
        legacy_disconnects: during["legacy"].as_u64().unwrap(),
        nginx_error_log: nginx.error_log(),
    }
}

/// B21 with the shipped ingress snippets (proxy_read_timeout 86400 s) and
/// the shipped broker: neither connection is cut by the silence.
#[test]
fn b21_shipped_ingress_keeps_idle_browser_connections() {
    let r = b21_idle(None, SHIPPED_BROKER_PING);
    assert_eq!(r.nats_disconnects, 0, "{}", r.nginx_error_log);
    assert_eq!(r.legacy_disconnects, 0, "{}", r.nginx_error_log);
    assert!(!r.gap_shown);
}

/// B21 with nginx's default proxy_read_timeout (60 s, scaled): the
/// server-initiated heartbeats (the broker's 20 s pings, Engine.IO's 25 s
/// pings) keep both paths warm though the page pings nothing.
#[test]
fn b21_server_heartbeats_keep_paths_warm_under_nginx_default_timeout() {
    let r = b21_idle(Some(NGINX_DEFAULT_READ_TIMEOUT), SHIPPED_BROKER_PING);
    assert_eq!(r.nats_disconnects, 0, "{}", r.nginx_error_log);
    assert_eq!(r.legacy_disconnects, 0, "{}", r.nginx_error_log);
    assert!(!r.gap_shown);
}

/// B21 with nginx's default timeout and nats-server's default ping interval
/// (2 min, longer than the timeout): nginx cuts the quiet NATS WebSocket;
/// the console reconnects through /nats-ws, resubscribes, shows the gap, and
/// gets the update. Socket.IO, warmed by Engine.IO pings, stays up.
#[test]
fn b21_cut_nats_websocket_reconnects_and_resubscribes() {
    let r = b21_idle(Some(NGINX_DEFAULT_READ_TIMEOUT), DEFAULT_BROKER_PING);
    assert!(
        r.nats_disconnects >= 1,
        "nginx did not cut the idle NATS WebSocket"
    );
    assert!(
        r.nginx_error_log.contains("upstream timed out"),
        "{}",
        r.nginx_error_log
    );
    assert_eq!(r.legacy_disconnects, 0, "{}", r.nginx_error_log);
    assert!(r.gap_shown, "the console did not show the gap");
}

// ------------------------------------------------------------------ B19

const BURST_MESSAGES: usize = 500;
const BURST_PAD_BYTES: usize = 10_000; // 500 x 10 kB: the case's 5 MB
const SLOW_LINK_BPS: u64 = 20_000;
/// Loopback sockets autotune their buffers to megabytes, which a real
/// 20 kB/s link never lets them reach: nginx's client sockets keep a fixed
/// buffer here (as the throttle's do), so the burst meets backpressure as it
/// would on such a link.
const SLOW_LINK_SOCKET_BUFFER: &str = "sndbuf=32k";

/// B19: the console behind a 20 kB/s link gets a 5 MB burst on its account.
/// The broker cuts it as a slow consumer (and stays up); once the link is
/// back, nats.ws reconnects through /nats-ws and resubscribes, the console
/// shows the gap and its rows stay one per security. A fast nats.ws client
/// on the same ingress and a legacy client on the bridge get the whole
/// burst, in order. `buffering` replaces the snippet's `proxy_buffering off`.
fn b19_slow_browser(buffering: Option<&'static str>) {
    let broker = Broker::shipped_with("write_deadline: \"2s\"");
    let bridge = Bridge::start_url(
        &broker.url(),
        BridgeOpts {
            env: vec![console_dir_env()],
            ..Default::default()
        },
    );
    let up = Upstreams {
        bridge: Some(bridge.port),
        admin: Some(bridge.admin_port),
        nats_ws: vec![broker.ws_port],
    };
    let edit: Option<EditSnippet> = buffering.map(|setting| {
        Box::new(move |name: &str, text: &str| {
            if name != "nats-ws.conf" {
                return text.to_string();
            }
            replace_all(name, text, "proxy_buffering off;", setting)
        }) as EditSnippet
    });
    let nginx = Nginx::shipped_with(
        &up,
        NginxOpts {
            edit_locations: edit,
            listen_params: SLOW_LINK_SOCKET_BUFFER.into(),
            ..Default::default()
        },
    );
    let link = Throttle::start(nginx.port);

    let browser = Browser::launch(false);
    browser.open(
        "main",
        &format!("http://127.0.0.1:{}/console/?account=22", link.port),
    );
    console_connected(&browser);
    browser.eval("main", WATCH_ROWS_JS);

    let fast = Agent::nats(Lang::Node);
    fast.cmd(json!({"cmd": "connect", "servers": [nginx.nats_ws_url()]}));
    fast.sub("f", "positions.account.22.*");
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&bridge.url(), json!({}));
    legacy.subscribe("/accounts/22/positions");

    // The burst, on a slow link.
    link.set_rate(SLOW_LINK_BPS);
    let processor = Agent::nats(Lang::Node);
    processor.nats_connect(&broker.url());
    let subject = "positions.account.22.updated";
    let pad = "x".repeat(BURST_PAD_BYTES);
    for i in 0..BURST_MESSAGES {
        let p = json!({"accountId": 22, "security": format!("SEC{}", i % 5), "quantity": i, "note": pad});
        processor.pub_json(subject, &envelope("Position", subject, p));
    }
    assert!(
        wait_until(Duration::from_secs(30), || broker.log().lines().any(|l| {
            l.contains("Slow Consumer Detected") && l.contains("tradefeed-bridge-console")
        })),
        "the broker did not cut the slow browser:\n{}",
        broker.log()
    );
    assert_eq!(broker.monitor("/healthz").0, 200, "the broker stays up");

    // The others got everything, in order, and the bridge dropped nothing.
    let got: Vec<u64> = (0..BURST_MESSAGES)
        .map(|_| {
            body(&fast.next_msg("f", WAIT))["payload"]["quantity"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        got,
        (0..BURST_MESSAGES as u64).collect::<Vec<_>>(),
        "fast nats.ws client"
    );
    let got: Vec<u64> = (0..BURST_MESSAGES)
        .map(|_| {
            legacy.next_publish(WAIT, |e| e["topic"] == "/accounts/22/positions")["payload"]
                ["quantity"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        got,
        (0..BURST_MESSAGES as u64).collect::<Vec<_>>(),
        "legacy client"
    );
    assert_eq!(bridge.admin("/readyz").0, 200);
    assert_eq!(
        bridge.metric(
            "tradefeed_bridge_messages_dropped_total",
            &[("route", "account-positions")]
        ),
        0.0
    );

    // The link is back: the console reconnects, resubscribes, shows the gap.
    link.set_rate(0);
    browser.wait(
        "main",
        "console reconnected after being cut",
        "tfbConsole.reconnects >= 1 && tfbConsole.natsState === 'connected' \
         && !document.querySelector('#gap-banner').hidden",
        Duration::from_secs(30),
    );
    let p = json!({"accountId": 22, "security": "SEC0", "quantity": 4242});
    processor.pub_json(subject, &envelope("Position", subject, p));
    let rows = browser.wait(
        "main",
        "the update after the gap",
        &format!("{POSITIONS_JS}.includes('SEC0=4242') && {POSITIONS_JS}"),
        WAIT,
    );
    let rows = rows.as_str().unwrap();
    assert!(rows.split(',').count() <= 5, "{rows}");
    assert_eq!(browser.eval("main", "window.maxRowsPerSecurity"), json!(1));
}

/// B19 with the shipped `/nats-ws` location (proxy_buffering off).
#[test]
fn b19_slow_browser_is_cut_then_reconnects_and_others_get_everything() {
    b19_slow_browser(None);
}

/// B19 with buffering turned on: nginx does not buffer an upgraded
/// connection either way, so the broker still sees the slow consumer.
#[test]
fn b19_proxy_buffering_on_does_not_hide_the_slow_consumer() {
    b19_slow_browser(Some("proxy_buffering on;"));
}

// ------------------------------------------------------------------ B20

/// Three nodes of the shipped broker, clustered with `no_advertise`, each
/// with its WebSocket listener.
fn cluster() -> Vec<Broker> {
    let ports: Vec<(u16, u16, u16, u16)> = (0..3)
        .map(|_| (free_port(), free_port(), free_port(), free_port()))
        .collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|p| format!("\"nats://127.0.0.1:{}\"", p.3))
        .collect();
    let nodes: Vec<Broker> = ports
        .iter()
        .enumerate()
        .map(|(i, &(client, http, ws, route))| {
            let extra = format!(
                "server_name: n{i}\ncluster {{\n  name: traderx\n  listen: \"127.0.0.1:{route}\"\n  \
                 routes: [{}]\n  no_advertise: true\n}}\n",
                routes.join(", ")
            );
            Broker::starting(client, http, ws, &extra)
        })
        .collect();
    for n in &nodes {
        n.wait_healthy(Duration::from_secs(30));
        assert!(
            wait_until(Duration::from_secs(15), || {
                let (_, routez) = n.monitor("/routez");
                serde_json::from_str::<Value>(&routez)
                    .map(|v| v["num_routes"].as_u64().unwrap_or(0) >= 2)
                    .unwrap_or(false)
            }),
            "cluster did not form:\n{}",
            n.log()
        );
    }
    nodes
}

/// B20: the console on an https page, through `/nats-ws` (wss) in front of
/// a 3-node cluster; the node it is on dies. It reconnects through the
/// ingress, never to an advertised internal address, resubscribes, and
/// gets updates again. The bridge, given the internal nats:// URLs, follows
/// the cluster too.
#[test]
fn b20_browser_reconnects_through_the_ingress_when_its_node_dies() {
    let mut nodes = cluster();
    let servers: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.url())).collect();
    let bridge = Bridge::start_url(
        &nodes[0].url(),
        BridgeOpts {
            env: vec![
                console_dir_env(),
                (
                    "TRADEFEED_BRIDGE_NATS__SERVERS",
                    format!("[{}]", servers.join(",")),
                ),
            ],
            ..Default::default()
        },
    );
    let nginx = Nginx::shipped_with(
        &Upstreams {
            bridge: Some(bridge.port),
            admin: Some(bridge.admin_port),
            nats_ws: nodes.iter().map(|n| n.ws_port).collect(),
        },
        NginxOpts {
            tls: true,
            ..Default::default()
        },
    );

    let browser = Browser::launch(true);
    browser.open("main", &format!("{}/console/?account=22", nginx.url()));
    console_connected(&browser);
    assert_eq!(
        browser.eval("main", "tfbConsole.natsUrl"),
        json!(nginx.nats_ws_url()),
        "wss, following the https page"
    );
    assert_eq!(browser.eval("main", "tfbConsole.connectUrls"), json!([]));
    let first = browser.eval("main", "tfbConsole.natsServer");
    let first = first.as_str().unwrap().to_string();
    let victim: usize = first.trim_start_matches('n').parse().unwrap();

    // A legacy service talks to the bridge directly, as Java services do.
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&bridge.url(), json!({"path": "/trade-feed"}));
    let subject = "positions.account.22.updated";
    legacy.publish(
        "/accounts/22/positions",
        "Position",
        json!({"accountId": 22, "security": "IBM", "quantity": 1}),
    );
    browser.wait(
        "main",
        "IBM at 1",
        &format!("{POSITIONS_JS} === 'IBM=1'"),
        WAIT,
    );

    nodes[victim].kill();
    browser.wait(
        "main",
        "reconnected to another node",
        &format!(
            "tfbConsole.reconnects >= 1 && tfbConsole.natsState === 'connected' \
             && tfbConsole.natsServer !== '{first}'"
        ),
        Duration::from_secs(20),
    );
    assert_eq!(browser.eval("main", "tfbConsole.connectUrls"), json!([]));
    assert_eq!(
        browser.eval("main", "tfbConsole.natsUrl"),
        json!(nginx.nats_ws_url())
    );

    // Resubscribed: a NATS processor on a surviving node, and a legacy
    // publisher through the bridge, which may have had to move node too.
    let survivor = &nodes[(victim + 1) % 3];
    let processor = Agent::nats(Lang::Node);
    processor.nats_connect(&survivor.url());
    processor.pub_json(
        subject,
        &envelope(
            "Position",
            subject,
            json!({"accountId": 22, "security": "IBM", "quantity": 2}),
        ),
    );
    browser.wait(
        "main",
        "IBM at 2",
        &format!("{POSITIONS_JS} === 'IBM=2'"),
        WAIT,
    );
    bridge.wait_ready(Duration::from_secs(20));
    legacy.publish(
        "/accounts/22/positions",
        "Position",
        json!({"accountId": 22, "security": "MSFT", "quantity": 3}),
    );
    browser.wait(
        "main",
        "MSFT through the bridge after the node died",
        &format!("{POSITIONS_JS} === 'IBM=2,MSFT=3'"),
        WAIT,
    );

    // Every WebSocket the page opened went through the ingress: nginx logs
    // one upgrade on /nats-ws per connection (when it closes).
    drop(browser);
    assert!(
        wait_until(WAIT, || nginx
            .access_log()
            .lines()
            .filter(|l| l.contains("GET /nats-ws HTTP/1.1\" 101 "))
            .count()
            == 2),
        "{}",
        nginx.access_log()
    );
}

/// B20, the bridge's side: a websocket URL with a path (the ingress's
/// `/nats-ws`) is refused at start-up with a message saying what to use.
#[test]
fn b20_bridge_refuses_a_websocket_url_with_a_path() {
    let node = Broker::shipped();
    let nginx = Nginx::shipped(&Upstreams {
        nats_ws: vec![node.ws_port],
        ..Default::default()
    });
    let url = nginx.nats_ws_url();
    for cmd in ["check-config", "run"] {
        let started = Instant::now();
        let out = std::process::Command::new(bridge_bin())
            .current_dir(root())
            .args(["--config", "config/traderx.toml", cmd])
            .env("TRADEFEED_BRIDGE_NATS__SERVERS", format!("[\"{url}\"]"))
            .env(
                "TRADEFEED_BRIDGE_SOCKETIO__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env(
                "TRADEFEED_BRIDGE_ADMIN__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{cmd}: slow refusal"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("nats.servers[0]"), "{cmd}: {err}");
        assert!(err.contains("websocket URL with a path"), "{cmd}: {err}");
        assert!(err.contains("internal nats:// address"), "{cmd}: {err}");
    }
    assert!(
        !nginx.access_log().contains("/nats-ws"),
        "nothing was tried"
    );
}
