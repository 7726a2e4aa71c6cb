//! The admin HTTP endpoint: health, readiness, metrics and the census.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::bridge::Bridge;
use crate::config::Mode;
use crate::telemetry;

#[derive(Clone)]
struct Admin {
    bridge: Arc<Bridge>,
    prometheus: PrometheusHandle,
}

pub fn router(bridge: Arc<Bridge>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/census", get(census))
        .route(
            "/api/legacy-consumers/{route}",
            get(legacy_consumers).put(set_legacy_consumers),
        )
        .route(
            "/api/attach/legacy-consumers/{route}",
            get(legacy_consumers).put(set_legacy_consumers),
        )
        .with_state(Admin {
            bridge: bridge.clone(),
            prometheus,
        })
        .merge(crate::console::router(bridge))
}

/// What is declared for a point-to-point route: `{"route", "legacy_consumers"}`.
async fn legacy_consumers(
    State(a): State<Admin>,
    axum::extract::Path(route): axum::extract::Path<String>,
) -> Response {
    match a.bridge.declared_legacy_consumers(&route) {
        Some(present) => Json(json!({"route": route, "legacy_consumers": present})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no point-to-point route named {route}")})),
        )
            .into_response(),
    }
}

/// Declares whether a point-to-point route's consumers are still on the
/// legacy side (body `true` or `false`): in attach mode, trade-feed's room;
/// in server mode, the bridge's own room (`false` drains it: the bridge
/// leaves the queue group although the room has members).
async fn set_legacy_consumers(
    State(a): State<Admin>,
    axum::extract::Path(route): axum::extract::Path<String>,
    Json(present): Json<bool>,
) -> Response {
    if a.bridge.set_legacy_consumers(&route, present) {
        Json(json!({"route": route, "legacy_consumers": present})).into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no point-to-point route named {route}")})),
        )
            .into_response()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// What stands between the bridge and readiness; empty when ready.
pub fn not_ready(bridge: &Bridge) -> Vec<&'static str> {
    let mut why = Vec::new();
    if bridge.shutting_down.load(Ordering::Relaxed) {
        why.push("shutting down");
    }
    if !bridge.nats_connected() {
        why.push("NATS is not connected");
    }
    match bridge.config.mode {
        Mode::Server => {
            if !bridge.socketio_listening.load(Ordering::Relaxed) {
                why.push("the Socket.IO listener is not serving");
            }
        }
        Mode::Attach => {
            if !bridge.upstream_connected.load(Ordering::Relaxed) {
                why.push("trade-feed is not connected");
            }
            if bridge.attach().is_some_and(|a| a.lease_problem().is_some()) {
                why.push("the attach lease is unavailable (see the log: JetStream?)");
            }
        }
    }
    why
}

async fn readyz(State(a): State<Admin>) -> Response {
    let why = not_ready(&a.bridge);
    let mut body = if why.is_empty() {
        json!({"ready": true})
    } else {
        json!({"ready": false, "reasons": why})
    };
    if let Some(attach) = a.bridge.attach() {
        body["role"] = json!(attach.role_name());
    }
    let status = if why.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(a): State<Admin>) -> String {
    if let Some(io) = a.bridge.io() {
        let (polling, websocket) = crate::server::clients_by_transport(io);
        metrics::gauge!(telemetry::CLIENTS, "transport" => "polling").set(polling as f64);
        metrics::gauge!(telemetry::CLIENTS, "transport" => "websocket").set(websocket as f64);
    }
    let m = &a.bridge.metrics;
    m.nats_connected
        .set(if a.bridge.nats_connected() { 1.0 } else { 0.0 });
    if let Some(c) = a.bridge.nats() {
        // async-nats counts the first connect too.
        let connects = c.statistics().connects.load(Ordering::Relaxed);
        m.nats_reconnects.absolute(connects.saturating_sub(1));
    }
    m.nats_pending.set(a.bridge.pending_to_nats() as f64);
    a.prometheus.render()
}

/// Who is still on the legacy side (see `census.rs`).
async fn census(State(a): State<Admin>) -> Json<crate::census::Report> {
    Json(crate::census::report(&a.bridge))
}
