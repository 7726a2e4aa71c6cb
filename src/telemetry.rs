//! Logs and metrics.
//!
//! Counters on the hot path are registered once per route and direction and
//! kept as handles, so counting a message is one atomic add. Every series a
//! dashboard needs exists from start-up, at 0: forwarded and latency for
//! each route in both directions, and each drop, refusal and suppression
//! reason for the directions a route carries in the running mode.
//!
//! Labels, everywhere the same: `route` (a route's name, or [`NO_ROUTE`]
//! when no route applies), `direction` (`to_nats` or `to_socketio`),
//! `reason`, and `transport` for clients.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::{Config, LogConfig, LogFormat, Mode};
use crate::route::{Delivery, RouteTable};

pub const FORWARDED: &str = "tradefeed_bridge_messages_forwarded_total";
pub const DELIVERED: &str = "tradefeed_bridge_messages_delivered_total";
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
pub const NATS_PENDING: &str = "tradefeed_bridge_nats_publish_pending";
pub const UPSTREAM_CONNECTED: &str = "tradefeed_bridge_upstream_connected";
pub const UPSTREAM_RECONNECTS: &str = "tradefeed_bridge_upstream_reconnects_total";
pub const BUFFERED: &str = "tradefeed_bridge_upstream_buffered_messages";
pub const ATTACH_ACTIVE: &str = "tradefeed_bridge_attach_active";
/// 1 while the bridge is a member of a point-to-point route's queue group.
pub const QUEUE_MEMBER: &str = "tradefeed_bridge_queue_member";
/// Point-to-point messages the bridge gave back to the queue group.
pub const REQUEUED: &str = "tradefeed_bridge_messages_requeued_total";
pub const INFO: &str = "tradefeed_bridge_info";

/// The `route` label of a message no route applies to (unparsable input,
/// System notices, unrouted topics, a NATS subscription as a whole).
pub const NO_ROUTE: &str = "(none)";

/// Directions as metric labels.
pub const TO_NATS: &str = "to_nats";
pub const TO_SOCKETIO: &str = "to_socketio";

/// Installs the log subscriber. Every line goes through [`Redact`], which
/// replaces the configured secrets with `***`: whatever a library writes at
/// whatever level (a WebSocket client traces its whole handshake request,
/// headers included), no secret reaches the log.
pub fn init_logging(cfg: &LogConfig, secrets: &[String]) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(filter_directives(&f)).ok())
        .unwrap_or_else(|| EnvFilter::new(filter_directives(&cfg.level)));
    // Colours only on a terminal: a log file or container log keeps plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(Redact::new(secrets));
    match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// The filter for a configured level. A bare `info` means the bridge's own
/// lifecycle lines: the libraries' info chatter (the NATS client announces
/// every connect twice) stays out, at `warn`. Any other level or filter is
/// taken as written, so `debug` and `trace` show the libraries too.
pub fn filter_directives(level: &str) -> String {
    if level.trim().eq_ignore_ascii_case("info") {
        "warn,tradefeed_bridge=info".to_string()
    } else {
        level.to_string()
    }
}

/// A writer for the log subscriber: standard error, with every secret (and
/// its escaped forms, as a Debug or JSON formatter writes them) replaced.
/// The formatter writes each event in one call, so a secret is never split.
#[derive(Clone)]
pub struct Redact {
    patterns: std::sync::Arc<Vec<String>>,
}

impl Redact {
    pub fn new(secrets: &[String]) -> Redact {
        let mut patterns: Vec<String> = Vec::new();
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            let debug = format!("{s:?}");
            let debug = debug[1..debug.len() - 1].to_string();
            for form in [
                s.clone(),
                debug.clone(),
                json_escaped(s),
                json_escaped(&debug),
            ] {
                if !patterns.contains(&form) {
                    patterns.push(form);
                }
            }
        }
        // longest first, so a secret containing another is replaced whole
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Redact {
            patterns: std::sync::Arc::new(patterns),
        }
    }

    /// `line` with every secret replaced by `***`.
    pub fn apply<'a>(&self, line: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(line);
        for p in self.patterns.iter() {
            if out.contains(p.as_str()) {
                out = std::borrow::Cow::Owned(out.replace(p.as_str(), "***"));
            }
        }
        out
    }
}

fn json_escaped(s: &str) -> String {
    let j = serde_json::to_string(s).unwrap_or_default();
    j[1..j.len() - 1].to_string()
}

pub struct RedactWriter {
    redact: Redact,
}

impl std::io::Write for RedactWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if self.redact.patterns.is_empty() {
            err.write_all(buf)?;
        } else {
            let text = String::from_utf8_lossy(buf);
            err.write_all(self.redact.apply(&text).as_bytes())?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Redact {
    type Writer = RedactWriter;

    fn make_writer(&'a self) -> RedactWriter {
        RedactWriter {
            redact: self.clone(),
        }
    }
}

/// Installs the Prometheus recorder; the handle renders `/metrics`.
pub fn init_metrics() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 2.5,
        ])
        .expect("static buckets")
        .install_recorder()
        .expect("metrics recorder installed once");
    describe();
    handle
}

/// HELP lines, so `/metrics` explains itself.
fn describe() {
    describe_counter!(
        FORWARDED,
        "Messages mirrored, per route and direction (to_nats: legacy publishes put on NATS; \
         to_socketio: NATS messages handed to the legacy side)"
    );
    describe_counter!(
        DELIVERED,
        "NATS messages received by legacy Socket.IO clients, one per client reached"
    );
    describe_counter!(
        REJECTED,
        "Messages refused as invalid or too large, per reason"
    );
    describe_counter!(
        SUPPRESSED,
        "Messages deliberately not mirrored (the bridge's own echoes), per reason"
    );
    describe_counter!(
        DROPPED,
        "Messages lost (queue or client buffer full, broker down, no consumer), per reason"
    );
    describe_counter!(
        UNROUTED,
        "Legacy publishes on topics no route maps (served locally)"
    );
    describe_counter!(
        LEGACY_PUBLISHES,
        "publish events received from legacy clients"
    );
    describe_histogram!(
        LATENCY,
        Unit::Seconds,
        "Time from receiving a message to handing it on, per route and direction"
    );
    describe_gauge!(CLIENTS, "Legacy Socket.IO clients connected, per transport");
    describe_gauge!(
        CLIENTS_UNSUBSCRIBED,
        "Legacy clients subscribed to nothing since socketio.idle_subscription_warning"
    );
    describe_gauge!(NATS_CONNECTED, "1 while the NATS connection is up");
    describe_counter!(
        NATS_RECONNECTS,
        "NATS connections re-established after a loss"
    );
    describe_gauge!(
        NATS_PENDING,
        "Legacy messages waiting for the NATS publisher"
    );
    describe_gauge!(
        UPSTREAM_CONNECTED,
        "Attach mode: 1 while attached to trade-feed"
    );
    describe_counter!(
        UPSTREAM_RECONNECTS,
        "Attach mode: trade-feed connections re-established"
    );
    describe_gauge!(
        BUFFERED,
        "Attach mode: NATS messages waiting for trade-feed to come back"
    );
    describe_gauge!(
        ATTACH_ACTIVE,
        "Attach mode: 1 on the bridge that mirrors (holds the lease)"
    );
    describe_gauge!(INFO, "Always 1; labels name the mode, version and instance");
}

/// Reasons a route's messages can be dropped, refused or suppressed, by
/// direction, in each mode. `tests::every_counted_reason_is_registered`
/// keeps this list in step with the call sites.
struct Series {
    metric: &'static str,
    direction: &'static str,
    reason: &'static str,
    modes: &'static [Mode],
    queue_only: bool,
}

const BOTH: &[Mode] = &[Mode::Server, Mode::Attach];
const SERVER: &[Mode] = &[Mode::Server];
const ATTACH: &[Mode] = &[Mode::Attach];

const fn series(
    metric: &'static str,
    direction: &'static str,
    reason: &'static str,
    modes: &'static [Mode],
) -> Series {
    Series {
        metric,
        direction,
        reason,
        modes,
        queue_only: false,
    }
}

const ROUTE_SERIES: &[Series] = &[
    series(DROPPED, TO_NATS, "publish_queue_full", BOTH),
    series(DROPPED, TO_NATS, "nats_unavailable", BOTH),
    series(DROPPED, TO_NATS, "nats_error", BOTH),
    Series {
        queue_only: true,
        ..series(DROPPED, TO_NATS, "undeliverable", BOTH)
    },
    series(REJECTED, TO_NATS, "too_large", BOTH),
    series(REJECTED, TO_NATS, "subject_too_long", BOTH),
    series(SUPPRESSED, TO_NATS, "own_echo", ATTACH),
    series(SUPPRESSED, TO_NATS, "own_echo_id", ATTACH),
    Series {
        queue_only: true,
        ..series(SUPPRESSED, TO_NATS, "consumed_on_trade_feed", ATTACH)
    },
    series(SUPPRESSED, TO_NATS, "from_bridge", ATTACH),
    series(SUPPRESSED, TO_NATS, "peer_mirrored", ATTACH),
    series(SUPPRESSED, TO_NATS, "left_to_active", ATTACH),
    series(DROPPED, TO_NATS, "standby_buffer_full", ATTACH),
    series(DROPPED, TO_SOCKETIO, "client_buffer_full", SERVER),
    series(DROPPED, TO_SOCKETIO, "bridge_queue_full", SERVER),
    series(DROPPED, TO_SOCKETIO, "upstream_buffer_full", ATTACH),
    series(DROPPED, TO_SOCKETIO, "standby_buffer_full", ATTACH),
    series(REJECTED, TO_SOCKETIO, "invalid_json", BOTH),
    series(REJECTED, TO_SOCKETIO, "too_large", ATTACH),
    series(SUPPRESSED, TO_SOCKETIO, "own_message", BOTH),
    series(SUPPRESSED, TO_SOCKETIO, "from_trade_feed", ATTACH),
    series(SUPPRESSED, TO_SOCKETIO, "peer_delivered", ATTACH),
    series(SUPPRESSED, TO_SOCKETIO, "left_to_active", ATTACH),
];

/// Series with [`NO_ROUTE`]: what is refused before a route is known.
const UNROUTED_SERIES: &[Series] = &[
    series(REJECTED, TO_NATS, "no_argument", SERVER),
    series(REJECTED, TO_NATS, "not_object", SERVER),
    series(REJECTED, TO_NATS, "no_topic", SERVER),
    series(REJECTED, TO_NATS, "topic_not_string", SERVER),
    series(REJECTED, TO_NATS, "invalid_json", SERVER),
    series(REJECTED, TO_NATS, "binary_payload", BOTH),
    series(DROPPED, TO_SOCKETIO, "client_buffer_full", SERVER),
    series(DROPPED, TO_SOCKETIO, "nats_slow_consumer", BOTH),
];

fn register(s: &Series, route: &str) {
    let labels = [
        ("route", route.to_string()),
        ("direction", s.direction.to_string()),
        ("reason", s.reason.to_string()),
    ];
    counter!(s.metric, &labels).increment(0);
}

/// Creates, at 0, every series the running configuration can move.
fn register_all(table: &RouteTable, config: &Config) {
    let mode = config.mode;
    for r in table.routes() {
        let carries = |d: &str| {
            if d == TO_NATS {
                r.direction.to_nats()
            } else {
                r.direction.to_socketio()
            }
        };
        for s in ROUTE_SERIES {
            let queue_ok = !s.queue_only || r.delivery == Delivery::Queue;
            if s.modes.contains(&mode) && queue_ok && carries(s.direction) {
                register(s, &r.name);
            }
        }
    }
    for s in UNROUTED_SERIES.iter().filter(|s| s.modes.contains(&mode)) {
        register(s, NO_ROUTE);
    }
    match mode {
        Mode::Server => {
            for t in ["polling", "websocket"] {
                gauge!(CLIENTS, "transport" => t).set(0.0);
            }
            gauge!(CLIENTS_UNSUBSCRIBED).set(0.0);
        }
        Mode::Attach => {
            gauge!(UPSTREAM_CONNECTED).set(0.0);
            counter!(UPSTREAM_RECONNECTS).increment(0);
            gauge!(BUFFERED).set(0.0);
            let active = if config.attach.lease { 0.0 } else { 1.0 };
            gauge!(ATTACH_ACTIVE).set(active);
        }
    }
}

/// Drains histogram samples into their buckets every few seconds. The
/// recorder keeps every sample until upkeep runs, so without it memory grows
/// with each forwarded message whenever `/metrics` is not scraped.
pub async fn run_upkeep(handle: PrometheusHandle) {
    const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Per-route handles for the hot path.
pub struct RouteMetrics {
    pub forwarded_to_nats: Counter,
    pub forwarded_to_socketio: Counter,
    pub delivered_to_socketio: Counter,
    pub latency_to_nats: Histogram,
    pub latency_to_socketio: Histogram,
}

pub struct Metrics {
    pub routes: Vec<RouteMetrics>,
    pub legacy_publishes: Counter,
    pub unrouted: Counter,
    pub nats_connected: Gauge,
    pub nats_reconnects: Counter,
    pub nats_pending: Gauge,
}

impl Metrics {
    /// Handles for the hot path, and every other series at 0.
    pub fn new(table: &RouteTable, config: &Config, instance: &str) -> Metrics {
        let routes = table
            .routes()
            .iter()
            .map(|r| {
                let name = r.name.clone();
                RouteMetrics {
                    forwarded_to_nats: counter!(FORWARDED, "route" => name.clone(), "direction" => TO_NATS),
                    forwarded_to_socketio: counter!(FORWARDED, "route" => name.clone(), "direction" => TO_SOCKETIO),
                    delivered_to_socketio: counter!(DELIVERED, "route" => name.clone(), "direction" => TO_SOCKETIO),
                    latency_to_nats: histogram!(LATENCY, "route" => name.clone(), "direction" => TO_NATS),
                    latency_to_socketio: histogram!(LATENCY, "route" => name, "direction" => TO_SOCKETIO),
                }
            })
            .collect();
        register_all(table, config);
        let mode = match config.mode {
            Mode::Server => "server",
            Mode::Attach => "attach",
        };
        gauge!(INFO, "mode" => mode, "version" => env!("CARGO_PKG_VERSION"), "instance" => instance.to_string())
            .set(1.0);
        Metrics {
            routes,
            legacy_publishes: counter!(LEGACY_PUBLISHES),
            unrouted: counter!(UNROUTED),
            nats_connected: gauge!(NATS_CONNECTED),
            nats_reconnects: counter!(NATS_RECONNECTS),
            nats_pending: gauge!(NATS_PENDING),
        }
    }
}

fn route_label(route: &str) -> String {
    if route.is_empty() {
        NO_ROUTE.to_string()
    } else {
        route.to_string()
    }
}

/// Counts a refused message. `route` is empty when no route applies.
pub fn rejected(route: &str, direction: &'static str, reason: &'static str) {
    counter!(REJECTED, "route" => route_label(route), "direction" => direction, "reason" => reason)
        .increment(1);
}

/// Counts a message the bridge did not forward on purpose (its own echo).
pub fn suppressed(route: &str, direction: &'static str, reason: &'static str) {
    counter!(SUPPRESSED, "route" => route_label(route), "direction" => direction, "reason" => reason)
        .increment(1);
}

/// Counts a message that was lost (queue full, client too slow, broker down).
/// `route` is empty when no route applies.
pub fn dropped(route: &str, direction: &'static str, reason: &'static str, n: u64) {
    counter!(DROPPED, "route" => route_label(route), "direction" => direction, "reason" => reason)
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
    fn bare_info_keeps_libraries_at_warn() {
        assert_eq!(filter_directives("info"), "warn,tradefeed_bridge=info");
        assert_eq!(filter_directives(" INFO "), "warn,tradefeed_bridge=info");
        for as_written in ["debug", "trace", "warn", "info,async_nats=debug"] {
            assert_eq!(filter_directives(as_written), as_written);
        }
    }

    /// Every reason a call site counts is one that is registered at start-up,
    /// so no series appears only after its first event.
    #[test]
    fn every_counted_reason_is_registered() {
        let sources = [
            include_str!("bridge.rs"),
            include_str!("server.rs"),
            include_str!("attach/mod.rs"),
            include_str!("attach/inbound.rs"),
            include_str!("attach/nats_side.rs"),
            include_str!("attach/upstream.rs"),
            include_str!("nats.rs"),
        ];
        let call = regex::Regex::new(
            r#"telemetry::(dropped|rejected|suppressed)\(\s*([^,]+),\s*(?:telemetry::)?(TO_NATS|TO_SOCKETIO),\s*(?:if [^"]*)?"([a-z_]+)"(?:\s*\}\s*else\s*\{\s*"([a-z_]+)")?"#,
        )
        .unwrap();
        let mut found = 0;
        for src in sources {
            for c in call.captures_iter(src) {
                let metric = match &c[1] {
                    "dropped" => DROPPED,
                    "rejected" => REJECTED,
                    _ => SUPPRESSED,
                };
                let direction = if &c[3] == "TO_NATS" {
                    TO_NATS
                } else {
                    TO_SOCKETIO
                };
                let unrouted = c[2].trim() == "\"\"";
                let list = if unrouted {
                    UNROUTED_SERIES
                } else {
                    ROUTE_SERIES
                };
                for reason in [c.get(4), c.get(5)].into_iter().flatten() {
                    found += 1;
                    assert!(
                        list.iter().any(|s| s.metric == metric
                            && s.direction == direction
                            && s.reason == reason.as_str()),
                        "{metric}{{direction={direction},reason={}}} (route {}) is not registered",
                        reason.as_str(),
                        &c[2]
                    );
                }
            }
        }
        assert!(
            found >= 12,
            "only {found} call sites found: the pattern is stale"
        );
    }

    #[test]
    fn redact_replaces_secrets_and_their_escaped_forms() {
        let r = Redact::new(&["s3cr\"et".to_string(), "tok-123".to_string(), String::new()]);
        assert_eq!(r.apply("token=tok-123 end"), "token=*** end");
        assert_eq!(r.apply("pw s3cr\"et"), "pw ***");
        // as a Debug formatter writes it, and that again inside JSON
        assert_eq!(r.apply(r#"pw "s3cr\"et""#), r#"pw "***""#);
        assert_eq!(r.apply(r#"{"m":"pw s3cr\\\"et"}"#), r#"{"m":"pw ***"}"#);
        assert_eq!(r.apply("nothing here"), "nothing here");
        assert!(matches!(r.apply("clean"), std::borrow::Cow::Borrowed(_)));
    }

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
