//! Starting, running and stopping the daemon.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bridge::Bridge;
use crate::config::{Config, Mode};
use crate::route::RouteTable;
use crate::{admin, nats, server, telemetry};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let routes = RouteTable::compile(&config.routes).map_err(|p| {
        anyhow::anyhow!(
            "invalid routes: {}",
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let prometheus = telemetry::init_metrics();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "{}", config.summary());
    for line in routes.describe().lines() {
        tracing::info!("route {line}");
    }
    let bridge = Bridge::new(config, routes);
    tracing::info!(instance = %bridge.instance_id, "starting");

    let (stop_tx, stop_rx) = watch::channel(false);

    let admin_addr: SocketAddr = bridge.config.admin.listen.parse()?;
    let admin_listener = TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on admin.listen {admin_addr}"))?;
    tokio::spawn(telemetry::run_upkeep(prometheus.clone()));
    let admin_app = admin::router(bridge.clone(), prometheus);
    tracing::info!(addr = %admin_listener.local_addr()?, "admin endpoint (/healthz, /readyz, /metrics, /api/census, /console/)");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, admin_app).await {
            tracing::error!("admin endpoint stopped: {e}");
        }
    });

    // A NATS connection that gave up (nats.max_reconnects) stops the bridge.
    let (give_up, mut gave_up) = tokio::sync::mpsc::unbounded_channel::<String>();
    let client = nats::connect(&bridge.config.nats, &bridge, &give_up).await?;
    bridge.start_nats(client.clone());

    // The point-to-point members' connection, if any routes are.
    let mut queue_client: Option<async_nats::Client> = None;
    match bridge.config.mode {
        Mode::Server => {
            let (app, io) = server::build(&bridge);
            bridge.set_io(io);
            let addr: SocketAddr = bridge.config.socketio.listen.parse()?;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on socketio.listen {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, paths = ?bridge.config.socketio.paths, "Socket.IO endpoint");
            let mut stop = stop_rx.clone();
            let serving = bridge.clone();
            tokio::spawn(async move {
                // Without TCP_NODELAY a small WebSocket frame waits for the
                // peer's delayed ACK (up to 40 ms on Linux); the Node hub
                // sets it too.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!("cannot set TCP_NODELAY on a client connection: {e}");
                    }
                });
                let result = axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
                serving.socketio_listening.store(false, Ordering::Relaxed);
                if let Err(e) = result {
                    tracing::error!("Socket.IO endpoint stopped: {e}");
                }
            });
            bridge.socketio_listening.store(true, Ordering::Relaxed);
            server::subscribe_nats(bridge.clone(), client.clone()).await?;
            if bridge.routes.queue_routes().next().is_some() {
                server::watch_no_responders(bridge.clone(), client.clone(), "primary").await?;
                let qclient =
                    nats::connect_queue_member(&bridge.config.nats, &bridge, &give_up).await?;
                queue_client = Some(qclient.clone());
                // Orders given back to the group are published on this
                // connection, and the server answers "no responders" only to
                // the connection that published.
                server::watch_no_responders(bridge.clone(), qclient.clone(), "queue").await?;
                let queued: Vec<usize> = bridge
                    .routes
                    .queue_routes()
                    .filter(|r| r.direction.to_socketio())
                    .map(|r| r.index)
                    .collect();
                for route in queued {
                    tokio::spawn(server::run_queue_member(
                        bridge.clone(),
                        qclient.clone(),
                        route,
                    ));
                }
            }
            tokio::spawn(server::watch_idle_clients(bridge.clone()));
        }
        Mode::Attach => {
            let qclient = if bridge.routes.queue_routes().next().is_some() {
                Some(nats::connect_queue_member(&bridge.config.nats, &bridge, &give_up).await?)
            } else {
                None
            };
            queue_client.clone_from(&qclient);
            crate::attach::start(bridge.clone(), client.clone(), qclient).await?;
        }
    }

    let ready_bridge = bridge.clone();
    tokio::spawn(async move {
        for _ in 0..6000 {
            if admin::not_ready(&ready_bridge).is_empty() {
                tracing::info!(after_ms = started.elapsed().as_millis() as u64, "ready");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!("not ready after 60s: {:?}", admin::not_ready(&ready_bridge));
    });

    let failure = tokio::select! {
        _ = shutdown_signal() => None,
        why = gave_up.recv() => why,
    };
    tracing::info!("shutting down: refusing new clients, draining in-flight messages");
    bridge.shutting_down.store(true, Ordering::Relaxed);
    bridge.release_held();
    // Point-to-point members leave their groups (what the server already
    // sent them is given back), and given-back orders waiting for a retry
    // get their last try now.
    bridge.membership_changed();
    bridge.retry_now.notify_waiters();
    let _ = stop_tx.send(true);
    // Legacy clients are not sent a WebSocket close frame: io.socket (the
    // Java client TraderX uses) does not notice one until its ping timeout
    // (45 s), while it sees a closed TCP connection at once and reconnects.
    // The connections drop when the process exits, as with trade-feed.
    let deadline = Instant::now() + bridge.config.drain_timeout;
    if let Some(attach) = bridge.attach() {
        attach.shutdown(deadline).await;
    }
    while bridge.pending_to_nats() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = bridge.pending_to_nats();
    if left > 0 {
        tracing::error!(
            lost = left,
            "drain timeout: messages still waiting for NATS were not sent"
        );
    }
    if let Some(q) = &queue_client {
        leave_queue_groups(&bridge, &client, q, deadline).await;
    }
    match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
        Ok(Ok(())) => {}
        _ => tracing::warn!("NATS flush did not complete"),
    }
    for (route, a) in bridge.routes.routes().iter().zip(&bridge.activity) {
        tracing::info!(
            route = %route.name,
            to_nats = a.to_nats_count.load(Ordering::Relaxed),
            to_socketio = a.to_socketio_count.load(Ordering::Relaxed),
            "forwarded"
        );
    }
    match failure {
        None => {
            tracing::info!("stopped");
            Ok(())
        }
        Some(why) => Err(anyhow::anyhow!("stopped because {why}")),
    }
}

/// At shutdown, waits for every point-to-point member to have left its
/// queue group, drained and given back what the server had already sent it,
/// then for the server's answers to what both connections published: an
/// order that found no consumer is counted undeliverable before the bridge
/// exits, not lost without a trace. Bounded by `deadline`, or a little
/// after it when the wait for trade-feed used the time up: a member that
/// is nearly done is not abandoned for want of a moment.
async fn leave_queue_groups(
    bridge: &Bridge,
    client: &async_nats::Client,
    qclient: &async_nats::Client,
    deadline: Instant,
) {
    let leave_by = deadline.max(Instant::now() + Duration::from_secs(2));
    while bridge.queue_subscriptions.load(Ordering::Acquire) > 0 && Instant::now() < leave_by {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let open = bridge.queue_subscriptions.load(Ordering::Acquire);
    if open > 0 {
        if qclient.connection_state() == async_nats::connection::State::Connected {
            tracing::error!(
                open,
                "drain timeout: still in a queue group; orders the server sends the bridge now are lost"
            );
        } else {
            tracing::warn!(
                open,
                "stopping while NATS is unreachable: the queue groups could not be left in order; what a server still up sends the bridge until it drops the connection is lost"
            );
        }
        return;
    }
    // The marker is the server's own "no responders" answer to a publish
    // on a subject nobody subscribes to: it comes back on the connection
    // that published (the primary one does not receive its own messages).
    let mut seen = bridge.stop_markers.subscribe();
    let nobody = format!("_INBOX.{}.stopping", bridge.instance_id);
    for (c, label) in [(client, "primary"), (qclient, "queue")] {
        let _ = c
            .publish_with_reply(
                nobody.clone(),
                server::stop_marker(bridge, label),
                bytes::Bytes::new(),
            )
            .await;
    }
    let answers_by = leave_by.max(Instant::now() + Duration::from_secs(1));
    let back = tokio::time::timeout_at(answers_by.into(), seen.wait_for(|n| *n >= 2)).await;
    if !matches!(back, Ok(Ok(_))) {
        tracing::warn!("NATS did not answer before the bridge stopped: an order given back just now that found no consumer is not counted");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
