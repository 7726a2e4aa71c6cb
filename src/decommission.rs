//! `decommission-check`: may the bridge (and trade-feed with it) go?
//!
//! It reads a running bridge's census (`GET /api/census`) and is ready only
//! when, for the whole quiet window, no legacy client has been connected or
//! has published and no route has carried legacy traffic: nothing from a
//! legacy client to NATS, and nothing from NATS to a legacy client. NATS
//! messages mirrored into empty rooms do not count: they are what the bridge
//! does while everybody is already on NATS.
//!
//! Ages are measured on the bridge's clock (the census carries it), so the
//! checking machine's clock does not matter. The bridge must itself have
//! been up for the window: it cannot vouch for time before it started.
//!
//! Limitations: a bridge in attach mode cannot see trade-feed's clients, so
//! the check refuses to call it ready; run it against the bridge in server
//! mode once trade-feed is gone. The admin endpoint is plain HTTP (no TLS).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::census::{ClientReport, Report};

/// How long to wait for the bridge to answer.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the check could not be made (as opposed to "not ready").
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read the census at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("the census at {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("the census at {url} is not a census this version understands: {source}")]
    Body {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The census URL for an admin URL (`http://bridge:18097`); a URL that
/// already names `/api/census` is kept.
pub fn census_url(admin_url: &str) -> String {
    let base = admin_url.trim_end_matches('/');
    if base.ends_with("/api/census") {
        base.to_string()
    } else {
        format!("{base}/api/census")
    }
}

/// The largest census read. ureq's default (10 MiB) was reached by a
/// bridge that had seen one client publish on 100,000 topics.
pub const MAX_CENSUS_BYTES: u64 = 1 << 30;

/// Reads the census of the bridge at `admin_url`.
pub fn fetch(admin_url: &str) -> Result<Report, CheckError> {
    let url = census_url(admin_url);
    // as quoted in messages: credentials in the URL are not repeated
    let shown = crate::config::without_credentials(&url);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into();
    let mut resp = agent
        .get(&url)
        .call()
        .map_err(|e| CheckError::Unreachable {
            url: shown.clone(),
            source: Box::new(e),
        })?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_CENSUS_BYTES)
        .read_to_string()
        .map_err(|e| CheckError::Unreachable {
            url: shown.clone(),
            source: Box::new(e),
        })?;
    if status != 200 {
        let body: String = body.chars().take(200).collect();
        return Err(CheckError::Status {
            url: shown,
            status,
            body,
        });
    }
    serde_json::from_str(&body).map_err(|source| CheckError::Body { url: shown, source })
}

/// The verdict and what it rests on.
#[derive(Debug)]
pub struct Verdict {
    /// Each reason not to decommission, as a paragraph of text.
    pub blockers: Vec<String>,
}

impl Verdict {
    pub fn ready(&self) -> bool {
        self.blockers.is_empty()
    }
}

/// Judges a census against a quiet window.
pub fn evaluate(r: &Report, quiet_for: Duration) -> Verdict {
    let window = quiet_for.as_millis() as u64;
    let within = |t: Option<u64>| t.is_some_and(|t| r.now_ms.saturating_sub(t) < window);
    let ago = |t: u64| age(r.now_ms, t);
    let mut blockers = Vec::new();

    if !r.legacy_clients_visible {
        blockers.push(format!(
            "the bridge runs in {} mode and cannot see trade-feed's clients; run this check \
             against the bridge in server mode once trade-feed is retired",
            name(&r.mode)
        ));
    }
    let up = r.now_ms.saturating_sub(r.started_at_ms);
    if up < window {
        blockers.push(format!(
            "the bridge has been up for {} only (since {}); it cannot vouch for the {} before",
            span(up),
            stamp(r.started_at_ms),
            humantime::format_duration(quiet_for)
        ));
    }
    if r.legacy_clients_visible && !r.socketio_listening {
        blockers.push(
            "the Socket.IO listener is not serving, so the absence of clients proves nothing"
                .to_string(),
        );
    }
    blockers.extend(client_blockers(r, &within));
    if within(r.legacy.last_published_ms) {
        let t = r.legacy.last_published_ms.unwrap_or_default();
        blockers.push(format!(
            "a legacy client published {} ago (at {})",
            ago(t),
            stamp(t)
        ));
    }
    for route in &r.routes {
        let name = format!(
            "route {} ({} <-> {})",
            route.name, route.topic, route.subject
        );
        if within(route.to_nats.last_ms) {
            let t = route.to_nats.last_ms.unwrap_or_default();
            blockers.push(format!(
                "{name} carried legacy traffic to NATS {} ago ({} messages since the bridge started)",
                ago(t),
                route.to_nats.count
            ));
        }
        if let Some(rx) = &route.received_by_legacy {
            if within(rx.last_ms) {
                let t = rx.last_ms.unwrap_or_default();
                blockers.push(format!(
                    "{name} delivered NATS traffic to legacy clients {} ago ({} deliveries since \
                     the bridge started)",
                    ago(t),
                    rx.count
                ));
            }
        }
    }
    Verdict { blockers }
}

fn client_blockers(r: &Report, within: &dyn Fn(Option<u64>) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    let connected = r.clients.as_deref().unwrap_or_default();
    if !connected.is_empty() {
        let mut text = format!(
            "{} legacy client{} connected:",
            connected.len(),
            if connected.len() == 1 { " is" } else { "s are" }
        );
        for c in connected {
            text.push_str(&describe_client(r.now_ms, c, None));
        }
        out.push(text);
    } else if within(r.legacy.last_connected_ms) {
        let t = r.legacy.last_connected_ms.unwrap_or_default();
        let mut text = format!(
            "a legacy client was connected {} ago (left at {})",
            age(r.now_ms, t),
            stamp(t)
        );
        let recent = r.recently_disconnected.as_deref().unwrap_or_default();
        let recent: Vec<_> = recent
            .iter()
            .filter(|d| within(Some(d.disconnected_at_ms)))
            .collect();
        if !recent.is_empty() {
            text.push_str(", recently departed:");
            for d in recent {
                text.push_str(&describe_client(
                    r.now_ms,
                    &d.client,
                    Some((d.disconnected_at_ms, &d.reason)),
                ));
            }
        }
        out.push(text);
    }
    out
}

fn describe_client(now: u64, c: &ClientReport, left: Option<(u64, &str)>) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "\n      id={} remote={} transport={} path={} user-agent={:?}",
        c.id, c.remote_addr, c.transport, c.path, c.user_agent
    );
    let topics = if c.topics.is_empty() {
        "nothing".to_string()
    } else {
        c.topics.join(", ")
    };
    let _ = write!(s, "\n        subscribed to: {topics}");
    if !c.published.is_empty() {
        let published: Vec<String> = c
            .published
            .iter()
            .map(|(t, n)| format!("{t} ({n})"))
            .collect();
        let _ = write!(s, "\n        published: {}", published.join(", "));
    }
    if c.published_other_topics > 0 {
        let _ = write!(
            s,
            "\n        and {} more message(s) on further topics",
            c.published_other_topics
        );
    }
    let _ = write!(
        s,
        "\n        connected at {}, last active {} ago",
        stamp(c.connected_at_ms),
        age(now, c.last_active_ms)
    );
    if c.dropped > 0 {
        let _ = write!(s, ", missed {} messages (too slow)", c.dropped);
    }
    if let Some((at, reason)) = left {
        let _ = write!(s, "\n        left at {} ({reason})", stamp(at));
    }
    s
}

/// The text an operator pastes into the change ticket.
pub fn render(admin_url: &str, quiet_for: Duration, r: &Report, v: &Verdict) -> String {
    let mut s = String::new();
    let window = humantime::format_duration(quiet_for);
    if v.ready() {
        let _ = writeln!(
            s,
            "decommission-check: READY: no legacy client connected or publishing and no legacy \
             traffic on any route for the last {window}"
        );
    } else {
        let _ = writeln!(
            s,
            "decommission-check: NOT READY: {} reason{} below",
            v.blockers.len(),
            if v.blockers.len() == 1 { "" } else { "s" }
        );
    }
    let _ = writeln!(
        s,
        "bridge:       {} (instance {}, {} mode, version {})",
        crate::config::without_credentials(&census_url(admin_url)),
        r.instance,
        name(&r.mode),
        r.version
    );
    let _ = writeln!(s, "checked at:   {} (bridge clock)", stamp(r.now_ms));
    let _ = writeln!(s, "quiet window: {window}");
    let _ = writeln!(
        s,
        "bridge up:    {} (since {})",
        span(r.now_ms.saturating_sub(r.started_at_ms)),
        stamp(r.started_at_ms)
    );
    let last = |t: Option<u64>| match t {
        Some(t) => format!("{} ago ({})", age(r.now_ms, t), stamp(t)),
        None => "never since the bridge started".to_string(),
    };
    match r.legacy.connected {
        Some(n) => {
            let _ = writeln!(s, "legacy clients connected: {n}");
            let _ = writeln!(
                s,
                "last legacy client seen: {}",
                last(r.legacy.last_connected_ms)
            );
        }
        None => {
            let _ = writeln!(s, "legacy clients: not visible ({} mode)", name(&r.mode));
        }
    }
    let _ = writeln!(
        s,
        "last legacy publish: {}",
        last(r.legacy.last_published_ms)
    );
    if !v.blockers.is_empty() {
        let _ = writeln!(s, "\nblocking:");
        for b in &v.blockers {
            let _ = writeln!(s, "  - {b}");
        }
    }
    let _ = writeln!(s, "\nroutes:");
    for route in &r.routes {
        let _ = writeln!(
            s,
            "  {} ({} <-> {}, {}, {})",
            route.name,
            route.topic,
            route.subject,
            name(&route.direction),
            name(&route.delivery)
        );
        let _ = writeln!(
            s,
            "    legacy -> NATS: {} messages, last: {}",
            route.to_nats.count,
            last(route.to_nats.last_ms)
        );
        let _ = writeln!(
            s,
            "    NATS -> legacy: {} messages, last: {}",
            route.to_socketio.count,
            last(route.to_socketio.last_ms)
        );
        if let Some(rx) = &route.received_by_legacy {
            let _ = writeln!(
                s,
                "    received by legacy clients: {} deliveries, last: {}",
                rx.count,
                last(rx.last_ms)
            );
        }
    }
    s
}

/// A config enum as it is written in the configuration (`server`, `to_nats`).
fn name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".to_string(),
    }
}

fn age(now: u64, t: u64) -> String {
    span(now.saturating_sub(t))
}

/// A duration in whole seconds (whole milliseconds under a second).
fn span(ms: u64) -> String {
    let d = if ms < 1000 {
        Duration::from_millis(ms)
    } else {
        Duration::from_secs(ms / 1000)
    };
    humantime::format_duration(d).to_string()
}

fn stamp(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{Departed, LegacySummary, RouteReport, Traffic};
    use crate::config::Mode;
    use crate::route::{Delivery, Direction};

    const NOW: u64 = 1_700_000_000_000;
    const MIN: u64 = 60_000;

    fn quiet() -> Report {
        Report {
            instance: "tfb-test".into(),
            mode: Mode::Server,
            version: "0".into(),
            now_ms: NOW,
            started_at_ms: NOW - 60 * MIN,
            socketio_listening: true,
            nats_connected: true,
            legacy_clients_visible: true,
            note: None,
            legacy: LegacySummary {
                connected: Some(0),
                last_connected_ms: Some(NOW - 30 * MIN),
                last_published_ms: None,
            },
            topics: Some(Default::default()),
            clients: Some(vec![]),
            recently_disconnected: Some(vec![]),
            routes: vec![RouteReport {
                name: "account-trades".into(),
                topic: "/accounts/{accountId}/trades".into(),
                subject: "trades.account.{accountId}.updated".into(),
                direction: Direction::Both,
                delivery: Delivery::Broadcast,
                to_nats: Traffic {
                    count: 3,
                    last_ms: Some(NOW - 20 * MIN),
                },
                // NATS producers keep publishing into empty rooms: not legacy traffic.
                to_socketio: Traffic {
                    count: 900,
                    last_ms: Some(NOW - 1000),
                },
                received_by_legacy: Some(Traffic {
                    count: 4,
                    last_ms: Some(NOW - 25 * MIN),
                }),
            }],
        }
    }

    fn client(id: &str) -> ClientReport {
        ClientReport {
            id: id.into(),
            remote_addr: "10.0.0.7:51000".into(),
            user_agent: "okhttp/3.12.12".into(),
            transport: "websocket".into(),
            path: "/trade-feed".into(),
            connected_at_ms: NOW - 50 * MIN,
            last_active_ms: NOW - 2 * MIN,
            topics: vec!["/trades".into()],
            published: [("/accounts/22/trades".to_string(), 2)].into(),
            published_other_topics: 0,
            dropped: 0,
        }
    }

    #[test]
    fn quiet_for_the_window_is_ready() {
        let v = evaluate(&quiet(), Duration::from_secs(600));
        assert!(v.ready(), "{:?}", v.blockers);
        let text = render("http://b:18097/", Duration::from_secs(600), &quiet(), &v);
        assert!(text.starts_with("decommission-check: READY"), "{text}");
        assert!(text.contains("http://b:18097/api/census"), "{text}");
    }

    #[test]
    fn each_kind_of_legacy_presence_blocks() {
        let w = Duration::from_secs(600);
        type Change = Box<dyn Fn(&mut Report)>;
        let cases: Vec<(&str, Change, &str)> = vec![
            (
                "connected client",
                Box::new(|r| {
                    r.clients = Some(vec![client("abc")]);
                    r.legacy.connected = Some(1);
                    r.legacy.last_connected_ms = Some(NOW);
                }),
                "1 legacy client is connected",
            ),
            (
                "recent departure",
                Box::new(|r| {
                    r.legacy.last_connected_ms = Some(NOW - 3 * MIN);
                    r.recently_disconnected = Some(vec![Departed {
                        client: client("gone"),
                        disconnected_at_ms: NOW - 3 * MIN,
                        reason: "client namespace disconnect".into(),
                    }]);
                }),
                "id=gone",
            ),
            (
                "recent publish",
                Box::new(|r| r.legacy.last_published_ms = Some(NOW - MIN)),
                "a legacy client published 1m ago",
            ),
            (
                "legacy to NATS",
                Box::new(|r| r.routes[0].to_nats.last_ms = Some(NOW - 9 * MIN)),
                "carried legacy traffic to NATS 9m ago",
            ),
            (
                "NATS to legacy clients",
                Box::new(|r| {
                    r.routes[0].received_by_legacy.as_mut().unwrap().last_ms = Some(NOW - 5000)
                }),
                "delivered NATS traffic to legacy clients 5s ago",
            ),
            (
                "young bridge",
                Box::new(|r| r.started_at_ms = NOW - 4 * MIN),
                "has been up for 4m only",
            ),
            (
                "listener down",
                Box::new(|r| r.socketio_listening = false),
                "listener is not serving",
            ),
            (
                "attach mode",
                Box::new(|r| {
                    r.mode = Mode::Attach;
                    r.legacy_clients_visible = false;
                    r.clients = None;
                    r.legacy.connected = None;
                }),
                "cannot see trade-feed's clients",
            ),
        ];
        for (what, change, expect) in cases {
            let mut r = quiet();
            change(&mut r);
            let v = evaluate(&r, w);
            assert_eq!(v.blockers.len(), 1, "{what}: {:?}", v.blockers);
            assert!(v.blockers[0].contains(expect), "{what}: {:?}", v.blockers);
            let text = render("http://b:18097", w, &r, &v);
            assert!(
                text.starts_with("decommission-check: NOT READY: 1 reason"),
                "{text}"
            );
        }
    }

    #[test]
    fn census_url_accepts_either_form() {
        assert_eq!(census_url("http://b:1"), "http://b:1/api/census");
        assert_eq!(census_url("http://b:1/"), "http://b:1/api/census");
        assert_eq!(census_url("http://b:1/api/census"), "http://b:1/api/census");
    }
}
