//! Logs and metrics.
//!
//! Counters on the hot path are registered once per route and direction and
//! kept as handles, so counting a message is one atomic add.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::{LogConfig, LogFormat};
use crate::route::RouteTable;

pub const FORWARDED: &str = "tradefeed_bridge_messages_forwarded_total";
pub const REJECTED: &str = "tradefeed_bridge_messages_rejected_total";
pub const SUPPRESSED: &str = "tradefeed_bridge_messages_suppressed_total";
pub const DROPPED: &str = "tradefeed_bridge_messages_dropped_total";
pub const UNROUTED: &str = "tradefeed_bridge_unrouted_publishes_total";
pub const LEGACY_PUBLISHES: &str = "tradefeed_bridge_legacy_publishes_total";
pub const LATENCY: &str = "tradefeed_bridge_forward_latency_seconds";
pub const CLIENTS: &str = "tradefeed_bridge_socketio_clients";
pub const CLIENTS_UNSUBSCRIBED: &str = "tradefeed_bridge_socketio_clients_without_subscription";
pub const NATS_CONNECTED: &str = "tradefeed_bridge_nats_connected";
pub const NATS_RECONNECTS: &str = "tradefeed_bridge_nats_reconnects_total";
pub const UPSTREAM_CONNECTED: &str = "tradefeed_bridge_upstream_connected";
pub const UPSTREAM_RECONNECTS: &str = "tradefeed_bridge_upstream_reconnects_total";
pub const BUFFERED: &str = "tradefeed_bridge_upstream_buffered_messages";
pub const ATTACH_ACTIVE: &str = "tradefeed_bridge_attach_active";
/// 1 while the bridge is a member of a point-to-point route's queue group.
pub const QUEUE_MEMBER: &str = "tradefeed_bridge_queue_member";
/// Point-to-point messages the bridge gave back to the queue group.
pub const REQUEUED: &str = "tradefeed_bridge_messages_requeued_total";

/// Directions as metric labels.
pub const TO_NATS: &str = "to_nats";
pub const TO_SOCKETIO: &str = "to_socketio";

pub fn init_logging(cfg: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(&cfg.level));
    // Colours only on a terminal: a log file or container log keeps plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// Installs the Prometheus recorder; the handle renders `/metrics`.
pub fn init_metrics() -> PrometheusHandle {
    PrometheusBuilder::new()
        .set_buckets(&[
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 2.5,
        ])
        .expect("static buckets")
        .install_recorder()
        .expect("metrics recorder installed once")
}

/// Per-route handles for the hot path.
pub struct RouteMetrics {
    pub forwarded_to_nats: Counter,
    pub forwarded_to_socketio: Counter,
    pub latency_to_nats: Histogram,
    pub latency_to_socketio: Histogram,
}

pub struct Metrics {
    pub routes: Vec<RouteMetrics>,
    pub legacy_publishes: Counter,
    pub unrouted: Counter,
    pub nats_connected: Gauge,
    pub nats_reconnects: Counter,
}

impl Metrics {
    pub fn new(table: &RouteTable) -> Metrics {
        let routes = table
            .routes()
            .iter()
            .map(|r| {
                let name = r.name.clone();
                RouteMetrics {
                    forwarded_to_nats: counter!(FORWARDED, "route" => name.clone(), "direction" => TO_NATS),
                    forwarded_to_socketio: counter!(FORWARDED, "route" => name.clone(), "direction" => TO_SOCKETIO),
                    latency_to_nats: histogram!(LATENCY, "route" => name.clone(), "direction" => TO_NATS),
                    latency_to_socketio: histogram!(LATENCY, "route" => name, "direction" => TO_SOCKETIO),
                }
            })
            .collect();
        Metrics {
            routes,
            legacy_publishes: counter!(LEGACY_PUBLISHES),
            unrouted: counter!(UNROUTED),
            nats_connected: gauge!(NATS_CONNECTED),
            nats_reconnects: counter!(NATS_RECONNECTS),
        }
    }
}

/// Counts a refused message. `route` is empty when no route applies.
pub fn rejected(route: &str, direction: &'static str, reason: &'static str) {
    counter!(REJECTED, "route" => route.to_string(), "direction" => direction, "reason" => reason)
        .increment(1);
}

/// Counts a message the bridge did not forward on purpose (its own echo).
pub fn suppressed(route: &str, direction: &'static str, reason: &'static str) {
    counter!(SUPPRESSED, "route" => route.to_string(), "direction" => direction, "reason" => reason)
        .increment(1);
}

/// Counts a message that was lost (queue full, client too slow, broker down).
pub fn dropped(route: &str, direction: &'static str, reason: &'static str, n: u64) {
    counter!(DROPPED, "route" => route.to_string(), "direction" => direction, "reason" => reason)
        .increment(n);
}

/// Lets through at most one log line per cause per interval and says how
/// many were held back in between.
pub struct LogLimiter {
    every: Duration,
    state: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogLimiter {
    pub fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(held_back)` when a line may be written now.
    pub fn allow(&self, cause: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.get_mut(cause) {
            None => {
                state.insert(cause, (now, 0));
                Some(0)
            }
            Some((last, held)) => {
                if now.duration_since(*last) >= self.every {
                    let n = *held;
                    *last = now;
                    *held = 0;
                    Some(n)
                } else {
                    *held += 1;
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_holds_back_and_reports() {
        let l = LogLimiter::new(Duration::from_millis(50));
        assert_eq!(l.allow("a"), Some(0));
        assert_eq!(l.allow("a"), None);
        assert_eq!(l.allow("a"), None);
        assert_eq!(l.allow("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow("a"), Some(2));
    }
}
