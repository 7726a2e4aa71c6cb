//! The census: who is still on the legacy side, and what each route last
//! carried. Served as JSON at `GET /api/census` and read back by
//! `decommission-check`, so the report types are both serialised and parsed.
//!
//! The bookkeeping happens on connect, subscribe, publish and disconnect
//! (in `server.rs`); delivering a message only touches the per-route atomics
//! in [`crate::bridge::RouteActivity`]. Building a report takes the clients
//! lock once, to copy them.
//!
//! Limitations: in attach mode the bridge is one client of trade-feed and
//! cannot see trade-feed's other clients. The report says so
//! (`legacy_clients_visible: false`, a `note`) and leaves `clients`,
//! `topics` and `recently_disconnected` as `null`, never as empty lists.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use socketioxide::TransportType;

use crate::bridge::{Bridge, ClientInfo};
use crate::config::Mode;
use crate::envelope;
use crate::route::{Delivery, Direction};

/// How many departed clients the census remembers (oldest forgotten first).
pub const DEPARTED_KEPT: usize = 64;

/// Said in the report when the bridge cannot see legacy clients.
pub const ATTACH_NOTE: &str = "attach mode: the bridge is one client of trade-feed and cannot see \
     trade-feed's other clients, so clients, topics and recently_disconnected are unknown (null), \
     not empty; routes show only what this bridge mirrored";

/// Census state that is not per client: kept by the bridge from start-up.
#[derive(Debug)]
pub struct CensusState {
    pub started_at_ms: u64,
    last_disconnect_ms: AtomicU64,
    last_publish_ms: AtomicU64,
    departed: Mutex<VecDeque<Departed>>,
}

impl Default for CensusState {
    fn default() -> Self {
        CensusState {
            started_at_ms: envelope::now_ms(),
            last_disconnect_ms: AtomicU64::new(0),
            last_publish_ms: AtomicU64::new(0),
            departed: Mutex::new(VecDeque::new()),
        }
    }
}

impl CensusState {
    /// A legacy client published (any topic, routed or not).
    pub fn published(&self, at_ms: u64) {
        self.last_publish_ms.store(at_ms, Ordering::Relaxed);
    }

    /// A legacy client left; it is remembered among the last
    /// [`DEPARTED_KEPT`] departures.
    pub fn departed(&self, info: ClientInfo, transport: TransportType, reason: String) {
        let now = envelope::now_ms();
        self.last_disconnect_ms.store(now, Ordering::Relaxed);
        let mut d = self.departed.lock().unwrap_or_else(|e| e.into_inner());
        if d.len() >= DEPARTED_KEPT {
            d.pop_front();
        }
        d.push_back(Departed {
            client: ClientReport::new(info, transport),
            disconnected_at_ms: now,
            reason,
        });
    }
}

/// The whole census.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub instance: String,
    pub mode: Mode,
    pub version: String,
    /// The bridge's clock when the report was made (epoch ms): ages in the
    /// report are measured against it, not against the reader's clock.
    pub now_ms: u64,
    pub started_at_ms: u64,
    pub socketio_listening: bool,
    pub nats_connected: bool,
    /// False in attach mode: the legacy clients are trade-feed's.
    pub legacy_clients_visible: bool,
    pub note: Option<String>,
    pub legacy: LegacySummary,
    /// Per legacy topic: its route, who subscribes, who published.
    pub topics: Option<BTreeMap<String, TopicReport>>,
    pub clients: Option<Vec<ClientReport>>,
    /// The last departures, oldest first.
    pub recently_disconnected: Option<Vec<Departed>>,
    pub routes: Vec<RouteReport>,
}

/// When the legacy side was last seen at all (epoch ms, `null` = never).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LegacySummary {
    /// Legacy clients connected now (`null` when not visible).
    pub connected: Option<usize>,
    /// Last moment a legacy client was connected: now while one is, else
    /// the last disconnect.
    pub last_connected_ms: Option<u64>,
    /// Last `publish` from a legacy client, on any topic.
    pub last_published_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicReport {
    /// The route that maps this topic, if any.
    pub route: Option<String>,
    /// The NATS subject it maps to, if any.
    pub subject: Option<String>,
    /// Ids of the clients subscribed to it.
    pub subscribers: Vec<String>,
    /// Messages published on it, per client id.
    pub publishers: BTreeMap<String, u64>,
}

/// One legacy client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientReport {
    pub id: String,
    pub remote_addr: String,
    pub user_agent: String,
    /// `polling` or `websocket`, as of the report (follows upgrades).
    pub transport: String,
    /// The Socket.IO path the client asked for (`/socket.io`, `/trade-feed`).
    pub path: String,
    pub connected_at_ms: u64,
    pub last_active_ms: u64,
    pub topics: Vec<String>,
    /// Messages published, per topic (its first 1,000 topics of at most 256
    /// bytes).
    pub published: BTreeMap<String, u64>,
    /// Messages published on further or longer topics, counted together.
    #[serde(default)]
    pub published_other_topics: u64,
    /// Messages it missed because its outgoing buffer was full.
    pub dropped: u64,
}

impl ClientReport {
    fn new(c: ClientInfo, transport: TransportType) -> ClientReport {
        ClientReport {
            id: c.id,
            remote_addr: c.remote_addr,
            user_agent: c.user_agent,
            transport: transport_name(transport).to_string(),
            path: mount_path(&c.path),
            connected_at_ms: c.connected_at_ms,
            last_active_ms: c.last_active_ms,
            topics: c.topics.into_iter().collect(),
            published: c.published,
            published_other_topics: c.published_other_topics,
            dropped: c.dropped,
        }
    }
}

/// A client that has left.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Departed {
    #[serde(flatten)]
    pub client: ClientReport,
    pub disconnected_at_ms: u64,
    pub reason: String,
}

/// What a route carried, per direction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteReport {
    pub name: String,
    pub topic: String,
    pub subject: String,
    pub direction: Direction,
    pub delivery: Delivery,
    /// Legacy publishes put on NATS.
    pub to_nats: Traffic,
    /// NATS messages handed to the legacy side (also when nobody was in
    /// the room).
    pub to_socketio: Traffic,
    /// NATS messages that reached at least one legacy client; `count` is
    /// per client reached. `null` when clients are not visible.
    pub received_by_legacy: Option<Traffic>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Traffic {
    pub count: u64,
    pub last_ms: Option<u64>,
}

fn traffic(count: &AtomicU64, last: &AtomicU64) -> Traffic {
    Traffic {
        count: count.load(Ordering::Relaxed),
        last_ms: nonzero(last.load(Ordering::Relaxed)),
    }
}

fn nonzero(ms: u64) -> Option<u64> {
    (ms > 0).then_some(ms)
}

/// `/socket.io/` and `/socket.io` are one mount.
fn mount_path(p: &str) -> String {
    match p.trim_end_matches('/') {
        "" => "/".to_string(),
        trimmed => trimmed.to_string(),
    }
}

pub fn transport_name(t: TransportType) -> &'static str {
    match t {
        TransportType::Polling => "polling",
        TransportType::Websocket => "websocket",
    }
}

/// Builds the census of a running bridge.
pub fn report(bridge: &Bridge) -> Report {
    let now = envelope::now_ms();
    let visible = bridge.config.mode == Mode::Server;
    let state = &bridge.census;
    let clients = visible.then(|| clients(bridge));
    let last_disconnect = nonzero(state.last_disconnect_ms.load(Ordering::Relaxed));
    let legacy = LegacySummary {
        connected: clients.as_ref().map(Vec::len),
        last_connected_ms: match &clients {
            Some(c) if !c.is_empty() => Some(now),
            _ => last_disconnect,
        },
        last_published_ms: nonzero(state.last_publish_ms.load(Ordering::Relaxed)),
    };
    let recently_disconnected = visible.then(|| {
        let d = state.departed.lock().unwrap_or_else(|e| e.into_inner());
        d.iter().cloned().collect()
    });
    Report {
        instance: bridge.instance_id.clone(),
        mode: bridge.config.mode,
        version: env!("CARGO_PKG_VERSION").to_string(),
        now_ms: now,
        started_at_ms: state.started_at_ms,
        socketio_listening: visible && bridge.socketio_listening.load(Ordering::Relaxed),
        nats_connected: bridge.nats_connected(),
        legacy_clients_visible: visible,
        note: (!visible).then(|| ATTACH_NOTE.to_string()),
        legacy,
        topics: clients.as_ref().map(|c| topics(bridge, c)),
        clients,
        recently_disconnected,
        routes: routes(bridge, visible),
    }
}

fn clients(bridge: &Bridge) -> Vec<ClientReport> {
    let copied: Vec<(socketioxide::socket::Sid, ClientInfo)> = {
        let map = bridge.clients.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(sid, c)| (*sid, c.clone())).collect()
    };
    let mut out: Vec<ClientReport> = copied
        .into_iter()
        .map(|(sid, c)| {
            let transport = bridge
                .io()
                .and_then(|io| io.get_socket(sid))
                .map_or(TransportType::Polling, |s| s.transport_type());
            ClientReport::new(c, transport)
        })
        .collect();
    out.sort_by(|a, b| (a.connected_at_ms, &a.id).cmp(&(b.connected_at_ms, &b.id)));
    out
}

fn topics(bridge: &Bridge, clients: &[ClientReport]) -> BTreeMap<String, TopicReport> {
    let mut topics: BTreeMap<String, TopicReport> = BTreeMap::new();
    for c in clients {
        for t in &c.topics {
            topic_entry(bridge, &mut topics, t)
                .subscribers
                .push(c.id.clone());
        }
        for (t, n) in &c.published {
            topic_entry(bridge, &mut topics, t)
                .publishers
                .insert(c.id.clone(), *n);
        }
    }
    topics
}

fn topic_entry<'a>(
    bridge: &Bridge,
    topics: &'a mut BTreeMap<String, TopicReport>,
    topic: &str,
) -> &'a mut TopicReport {
    topics.entry(topic.to_string()).or_insert_with(|| {
        let mapped = bridge.routes.to_subject(topic);
        TopicReport {
            route: mapped
                .as_ref()
                .map(|m| bridge.routes.get(m.route).name.clone()),
            subject: mapped.map(|m| m.target),
            subscribers: Vec::new(),
            publishers: BTreeMap::new(),
        }
    })
}

fn routes(bridge: &Bridge, visible: bool) -> Vec<RouteReport> {
    bridge
        .routes
        .routes()
        .iter()
        .zip(&bridge.activity)
        .map(|(r, a)| RouteReport {
            name: r.name.clone(),
            topic: r.topic.as_str().to_string(),
            subject: r.subject.as_str().to_string(),
            direction: r.direction,
            delivery: r.delivery,
            to_nats: traffic(&a.to_nats_count, &a.to_nats_ms),
            to_socketio: traffic(&a.to_socketio_count, &a.to_socketio_ms),
            received_by_legacy: visible.then(|| traffic(&a.received_count, &a.received_ms)),
        })
        .collect()
}
