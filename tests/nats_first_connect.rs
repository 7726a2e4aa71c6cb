//! The primary NATS connection comes up in the background (`connect`
//! retries until the broker answers), so it can be up, and its event
//! handled, before the bridge has been handed the client that knows the
//! server's limits. The bridge must still learn the server's max_payload
//! and report the connection once. CI saw this order once under load: the
//! "NATS connected" line came without the server's details, and the bridge
//! kept assuming a 1 MiB limit.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tradefeed_bridge::bridge::Bridge;
use tradefeed_bridge::nats;
use tradefeed_bridge::route::RouteTable;

const SERVER_LIMIT: usize = 256 * 1024;

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_connection_up_before_its_client_is_attached_still_learns_the_servers_limit() {
    let dir = scratch();
    let nats_conf = dir.path().join("nats.conf");
    std::fs::write(&nats_conf, format!("max_payload: {SERVER_LIMIT}\n")).unwrap();
    let broker = Nats::start_with(&["-c", nats_conf.to_str().unwrap()]);
    let shipped = std::fs::read_to_string(root().join("config/traderx.toml")).unwrap();
    let default_servers = r#"servers = ["nats://127.0.0.1:4222"]"#;
    assert!(shipped.contains(default_servers));
    let conf = dir.path().join("bridge.toml");
    std::fs::write(
        &conf,
        shipped.replace(
            default_servers,
            &format!(r#"servers = ["{}"]"#, broker.url()),
        ),
    )
    .unwrap();
    let config = tradefeed_bridge::config::load(&conf, true).expect("configuration");
    let routes = RouteTable::compile(&config.routes).expect("routes");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bridge = Bridge::new(config, routes);
        let (give_up, _gave_up) = tokio::sync::mpsc::unbounded_channel();
        let client = nats::connect(&bridge.config.nats, &bridge, &give_up)
            .await
            .expect("connect");
        // As on a loaded machine: the connection is up and its event handled
        // before the client is attached.
        wait_until("the connection is up", || {
            client.connection_state() == async_nats::connection::State::Connected
        })
        .await;
        wait_until("the connected event is handled", || {
            bridge.nats_connect_unreported.lock().unwrap().is_some()
        })
        .await;
        assert_eq!(bridge.max_nats_bytes(), 1024 * 1024, "the default before");

        bridge.start_nats(client);
        assert_eq!(bridge.max_nats_bytes(), SERVER_LIMIT);
        assert!(bridge.nats_connect_unreported.lock().unwrap().is_none());
    });
}
