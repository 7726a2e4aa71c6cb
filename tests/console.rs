//! The console (`/console/` on the admin port), in headless Chromium through
//! nginx with the shipped ingress snippets: its blotter, fed by NATS over
//! WebSocket on `/nats-ws`, keeps one row per security with the latest
//! quantity (TraderX FR-707, SC-705). A screenshot is kept in
//! target/test-artifacts/console.png.

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::browser::{artifact, Browser, POSITIONS_JS, WATCH_ROWS_JS};
use common::nginx::{Nginx, Upstreams};
use common::*;
use serde_json::{json, Value};

fn console_dir() -> std::path::PathBuf {
    let dir = root().join("console/dist");
    assert!(
        dir.join("index.html").is_file(),
        "the console is not built: run scripts/install-test-deps.sh (or scripts/build-console.sh)"
    );
    dir
}

fn bridge_on(broker: &Broker, console: &std::path::Path) -> Bridge {
    Bridge::start_url(
        &broker.url(),
        BridgeOpts {
            env: vec![(
                "TRADEFEED_BRIDGE_CONSOLE__DIR",
                console.display().to_string(),
            )],
            ..Default::default()
        },
    )
}

fn position(account: u64, security: &str, quantity: i64) -> Value {
    json!({"accountId": account, "security": security, "quantity": quantity, "updated": 1_764_781_234_560u64})
}

/// A state-006 publisher's body: the five-field envelope.
fn envelope(kind: &str, subject: &str, payload: Value) -> Value {
    json!({"type": kind, "from": "trade-processor", "topic": subject, "date": 1_764_781_234_567u64, "payload": payload})
}

#[test]
fn blotter_updates_a_position_row_in_place_and_adds_one_per_new_security() {
    let broker = Broker::shipped();
    let bridge = bridge_on(&broker, &console_dir());
    let nginx = Nginx::shipped(&Upstreams {
        bridge: Some(bridge.port),
        admin: Some(bridge.admin_port),
        nats_ws: vec![broker.ws_port],
    });

    let browser = Browser::launch(false);
    browser.open("main", &format!("{}/console/?account=22", nginx.url()));
    browser.wait(
        "main",
        "console connected to NATS through /nats-ws",
        "window.tfbConsole && tfbConsole.natsState === 'connected' && tfbConsole.subjects.length === 2",
        WAIT,
    );
    assert_eq!(
        browser.eval("main", "tfbConsole.subjects"),
        json!(["trades.account.22.updated", "positions.account.22.updated"])
    );
    assert_eq!(
        browser.eval("main", "tfbConsole.natsUrl"),
        json!(nginx.nats_ws_url())
    );
    browser.eval("main", WATCH_ROWS_JS);

    // A state-006 processor on NATS: five updates of one security, in a
    // burst, and one for another account, which this blotter must not show.
    let processor = Agent::nats(Lang::Node);
    processor.nats_connect(&broker.url());
    let subject = "positions.account.22.updated";
    for q in [100, 200, 300, 400, 500] {
        processor.pub_json(
            subject,
            &envelope("Position", subject, position(22, "IBM", q)),
        );
    }
    processor.pub_json(
        "positions.account.23.updated",
        &envelope(
            "Position",
            "positions.account.23.updated",
            position(23, "IBM", 999),
        ),
    );
    browser.wait(
        "main",
        "IBM at 500",
        &format!("{POSITIONS_JS} === 'IBM=500'"),
        WAIT,
    );

    // A legacy processor still on Socket.IO, through the ingress and the
    // bridge: the same security again, then a new one straight from NATS.
    let legacy = Agent::sio(Lang::Node);
    let legacy_id = legacy.connect(&nginx.url(), json!({"path": "/trade-feed"}));
    legacy.subscribe("/accounts/22/positions");
    legacy.publish(
        "/accounts/22/positions",
        "Position",
        position(22, "IBM", 600),
    );
    browser.wait(
        "main",
        "IBM at 600",
        &format!("{POSITIONS_JS} === 'IBM=600'"),
        WAIT,
    );
    processor.pub_json(
        subject,
        &envelope("Position", subject, position(22, "MSFT", 50)),
    );
    browser.wait(
        "main",
        "IBM at 600 and MSFT at 50, one row each",
        &format!("{POSITIONS_JS} === 'IBM=600,MSFT=50'"),
        WAIT,
    );
    assert_eq!(browser.eval("main", "window.maxRowsPerSecurity"), json!(1));

    // Trades: a row per trade id, replaced when its state changes.
    legacy.publish(
        "/accounts/22/trades",
        "Trade",
        json!({"id": "T-1", "accountId": 22, "security": "IBM", "side": "Buy", "quantity": 100, "state": "New"}),
    );
    // The legacy publish goes through the bridge: wait for it before the
    // next state comes from NATS, or the two could cross.
    browser.wait(
        "main",
        "trade T-1 new",
        "[...document.querySelectorAll('#trades tbody tr')].map(r => r.dataset.trade + '=' + r.dataset.state).join() === 'T-1=New'",
        WAIT,
    );
    let trades = "trades.account.22.updated";
    processor.pub_json(
        trades,
        &envelope(
            "Trade",
            trades,
            json!({"id": "T-1", "accountId": 22, "security": "IBM", "side": "Buy", "quantity": 100, "state": "Settled"}),
        ),
    );
    browser.wait(
        "main",
        "trade T-1 settled in one row",
        "[...document.querySelectorAll('#trades tbody tr')].map(r => r.dataset.trade + '=' + r.dataset.state).join() === 'T-1=Settled'",
        WAIT,
    );

    // Routes with live counts and the legacy client, from /console/api/state.
    browser.wait(
        "main",
        "route counts and the legacy client",
        &format!(
            "document.querySelector('#routes tr[data-route=\"account-positions\"] td.to-nats').textContent === '1' \
             && document.querySelector('#routes tr[data-route=\"account-trades\"] td.to-nats').textContent === '1' \
             && !!document.querySelector('#clients tr[data-client=\"{legacy_id}\"]')"
        ),
        Duration::from_secs(15),
    );
    let client_row = browser.eval(
        "main",
        &format!("document.querySelector('#clients tr[data-client=\"{legacy_id}\"]').innerText"),
    );
    let client_row = client_row.as_str().unwrap();
    assert!(client_row.contains("websocket"), "{client_row}");
    assert!(client_row.contains("/trade-feed/"), "{client_row}");
    assert!(
        client_row.contains("/accounts/22/positions"),
        "{client_row}"
    );

    let shot = artifact("console.png");
    browser.screenshot("main", &shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    let errors: Vec<String> = browser
        .console()
        .into_iter()
        .filter(|l| l.contains("pageerror"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn state_reports_routes_and_clients_with_exact_counts() {
    let broker = Broker::shipped();
    let bridge = bridge_on(&broker, &console_dir());
    let a = Agent::sio(Lang::Node);
    let a_id = a.connect(&bridge.url(), json!({}));
    a.subscribe("/accounts/22/positions");
    for q in 1..=3 {
        a.publish(
            "/accounts/22/positions",
            "Position",
            position(22, "ACME", q),
        );
    }
    a.publish(
        "/trades",
        "TradeOrder",
        json!({"id": "O-1", "accountId": 22}),
    );
    // Its own positions come back (it is in the room); the order goes to
    // the trade-processor queue group only.
    for _ in 0..3 {
        a.next_publish(WAIT, |e| e["topic"] == "/accounts/22/positions");
    }

    let deadline = std::time::Instant::now() + WAIT;
    let state = loop {
        let (status, body) = bridge.admin("/console/api/state");
        assert_eq!(status, 200);
        let s: Value = serde_json::from_str(&body).unwrap();
        let count = |name: &str| {
            s["routes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == name)
                .unwrap()["to_nats"]["count"]
                .clone()
        };
        if count("account-positions") == 3 && count("trade-orders") == 1 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s:#}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let routes = state["routes"].as_array().unwrap();
    assert_eq!(
        routes.iter().map(|r| r["name"].clone()).collect::<Vec<_>>(),
        ["trade-orders", "account-trades", "account-positions"]
    );
    let positions = &routes[2];
    assert_eq!(
        positions["subject"],
        "positions.account.{accountId}.updated"
    );
    assert_eq!(positions["type"], "Position");
    assert!(positions["to_nats"]["last_ms"].as_u64().unwrap() > 0);
    assert_eq!(routes[1]["to_nats"]["count"], 0);
    assert_eq!(routes[1]["to_nats"]["last_ms"], Value::Null);
    assert_eq!(routes[0]["delivery"], "queue");
    assert_eq!(routes[0]["queue_group"], "trade-processor");

    let clients = state["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0]["id"], a_id.as_str());
    assert_eq!(clients[0]["published"], 4);
    assert_eq!(clients[0]["topics"], json!(["/accounts/22/positions"]));
    assert_eq!(state["ready"], true);
    assert_eq!(state["mode"], "server");

    drop(a);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s: Value = serde_json::from_str(&bridge.admin("/console/api/state").1).unwrap();
        if s["clients"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "client still listed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn console_that_was_not_built_says_how_to_build_it() {
    let broker = Broker::shipped();
    let missing = scratch();
    let bridge = bridge_on(&broker, &missing.path().join("dist"));
    let (status, body) = bridge.admin("/console/");
    assert_eq!(status, 503);
    assert!(body.contains("The console is not built"), "{body}");
    assert!(body.contains("scripts/build-console.sh"), "{body}");
    assert_eq!(bridge.admin("/console/app.js").0, 503);
    // The rest of the admin port is unaffected.
    assert_eq!(bridge.admin("/console/api/state").0, 200);
    assert_eq!(bridge.admin("/readyz").0, 200);
    assert_eq!(bridge.admin("/healthz").0, 200);
    assert!(bridge.log().contains("the console is not built"));
}
