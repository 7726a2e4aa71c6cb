//! The operator console on the admin port: the page at `/console/` and the
//! one JSON document it polls, `/console/api/state` (routes with their live
//! counts, connected legacy clients, readiness).
//!
//! The page itself is built from `console/` with npm into `console.dir`; the
//! bridge only serves those files. Its account blotter does not come through
//! the bridge at all: the browser subscribes to NATS over WebSocket
//! (`console.nats_url`, by default the ingress path `/nats-ws`), as the
//! migrated TraderX front end does.
//!
//! Everything lives under `/console/`, so an ingress can expose the console
//! with one location without exposing `/metrics` or the admin API.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use socketioxide::TransportType;
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::bridge::Bridge;
use crate::config::Mode;
use crate::envelope;

/// The console's routes, to be merged into the admin router.
pub fn router(bridge: Arc<Bridge>) -> Router {
    let dir = bridge.config.console.dir.clone();
    if !is_built(&dir) {
        tracing::warn!(
            dir = %dir.display(),
            "the console is not built: /console/ explains how to build it"
        );
    }
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route("/console/api/state", get(state))
        .route("/console/", get(files))
        .route("/console/{*path}", get(files))
        .with_state(bridge)
}

fn is_built(dir: &Path) -> bool {
    dir.join("index.html").is_file()
}

/// The built page and its assets, or a page saying how to build them.
async fn files(State(bridge): State<Arc<Bridge>>, mut req: Request) -> Response {
    let dir = &bridge.config.console.dir;
    if !is_built(dir) {
        return not_built(dir);
    }
    let inner = req
        .uri()
        .path()
        .strip_prefix("/console")
        .unwrap_or("/")
        .to_string();
    *req.uri_mut() = inner.parse().unwrap_or_else(|_| Uri::from_static("/"));
    let mut resp = match ServeDir::new(dir).oneshot(req).await {
        Ok(r) => r.map(Body::new),
        Err(never) => match never {},
    };
    // The files change with every build and have no hashed names.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn not_built(dir: &Path) -> Response {
    let dir = html_escape(&dir.display().to_string());
    let page = format!(
        "<!doctype html><meta charset=utf-8><title>console not built</title>\
         <h1>The console is not built</h1>\
         <p>No <code>index.html</code> in <code>{dir}</code> (<code>console.dir</code>).</p>\
         <p>Build it from the repository with <code>scripts/build-console.sh</code> \
         (npm ci and npm run build in <code>console/</code>), or point \
         <code>TRADEFEED_BRIDGE_CONSOLE__DIR</code> at a built copy.</p>"
    );
    (StatusCode::SERVICE_UNAVAILABLE, Html(page)).into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// What the console shows, in one consistent read.
#[derive(Serialize)]
struct ConsoleState {
    instance: String,
    version: &'static str,
    mode: Mode,
    ready: bool,
    not_ready: Vec<&'static str>,
    nats_connected: bool,
    /// Where the page connects to NATS over WebSocket.
    nats_url: String,
    time_ms: u64,
    routes: Vec<RouteState>,
    clients: Vec<ClientState>,
}

#[derive(Serialize)]
struct RouteState {
    name: String,
    topic: String,
    subject: String,
    direction: crate::route::Direction,
    delivery: crate::route::Delivery,
    queue_group: Option<String>,
    #[serde(rename = "type")]
    envelope_type: Option<String>,
    to_nats: Traffic,
    to_socketio: Traffic,
}

#[derive(Serialize)]
struct Traffic {
    count: u64,
    /// Epoch ms of the last message, `null` when there was none.
    last_ms: Option<u64>,
}

#[derive(Serialize)]
struct ClientState {
    id: String,
    transport: &'static str,
    path: String,
    remote_addr: String,
    user_agent: String,
    topics: Vec<String>,
    published: u64,
    connected_at_ms: u64,
    last_active_ms: u64,
}

async fn state(State(bridge): State<Arc<Bridge>>) -> Json<ConsoleState> {
    let not_ready = crate::admin::not_ready(&bridge);
    Json(ConsoleState {
        instance: bridge.instance_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        mode: bridge.config.mode,
        ready: not_ready.is_empty(),
        not_ready,
        nats_connected: bridge.nats_connected(),
        nats_url: bridge.config.console.nats_url.clone(),
        time_ms: envelope::now_ms(),
        routes: routes(&bridge),
        clients: clients(&bridge),
    })
}

fn routes(bridge: &Bridge) -> Vec<RouteState> {
    let traffic = |count: u64, last: u64| Traffic {
        count,
        last_ms: (last > 0).then_some(last),
    };
    bridge
        .config
        .routes
        .iter()
        .zip(&bridge.activity)
        .map(|(spec, a)| RouteState {
            name: spec.name.clone(),
            topic: spec.topic.clone(),
            subject: spec.subject.clone(),
            direction: spec.direction,
            delivery: spec.delivery,
            queue_group: spec.queue_group.clone(),
            envelope_type: spec.envelope_type.clone(),
            to_nats: traffic(
                a.to_nats_count.load(Ordering::Relaxed),
                a.to_nats_ms.load(Ordering::Relaxed),
            ),
            to_socketio: traffic(
                a.to_socketio_count.load(Ordering::Relaxed),
                a.to_socketio_ms.load(Ordering::Relaxed),
            ),
        })
        .collect()
}

/// Connected legacy clients, oldest first (server mode; none in attach mode,
/// where the clients are trade-feed's).
fn clients(bridge: &Bridge) -> Vec<ClientState> {
    let Some(io) = bridge.io() else {
        return Vec::new();
    };
    let clients = bridge.clients.lock().unwrap_or_else(|e| e.into_inner());
    let mut list: Vec<ClientState> = clients
        .iter()
        .map(|(sid, c)| ClientState {
            id: c.id.clone(),
            transport: match io.get_socket(*sid).map(|s| s.transport_type()) {
                Some(TransportType::Websocket) => "websocket",
                Some(TransportType::Polling) => "polling",
                None => "closing",
            },
            path: c.path.clone(),
            remote_addr: c.remote_addr.clone(),
            user_agent: c.user_agent.clone(),
            topics: c.topics.iter().cloned().collect(),
            published: c.published.values().sum(),
            connected_at_ms: c.connected_at_ms,
            last_active_ms: c.last_active_ms,
        })
        .collect();
    list.sort_by(|a, b| (a.connected_at_ms, &a.id).cmp(&(b.connected_at_ms, &b.id)));
    list
}
