//! The mirroring core shared by both modes: what happens to a legacy publish,
//! and to a NATS message, once it is known where it came from.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use socketioxide::extract::AckSender;
use socketioxide::socket::Sid;
use socketioxide::SocketIo;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::envelope::{self, envelope_bytes, EnvelopeOut, Field, NatsBody, Reject};
use crate::route::RouteTable;
use crate::telemetry::{self, LogLimiter, Metrics, TO_NATS, TO_SOCKETIO};

/// The header the bridge puts on everything it publishes: the bridge
/// process that mirrored the message. It is what keeps messages from
/// looping and lets another bridge recognise a mirror. What else a consumer
/// could want is already in the message: the legacy sender is the body's
/// `from`, and the legacy topic follows from the subject through the route
/// table. Each header costs every NATS subscriber a parse per message (with
/// async-nats, one header took a subscriber's deliveries per second from
/// 1.21 M to 706 k, three to 505 k: `docs/performance.md`).
pub const H_ORIGIN: &str = "Tradefeed-Bridge-Origin";
/// The legacy topic of a mirrored message, sent only when the subject does
/// not tell it (two routes map different legacy topics to one subject: see
/// `RouteTable::mirrors_back`).
pub const H_TOPIC: &str = "Tradefeed-Legacy-Topic";

/// The header names, built once (a name made from a `&str` allocates).
const H_ORIGIN_NAME: HeaderName = HeaderName::from_static(H_ORIGIN);
const H_TOPIC_NAME: HeaderName = HeaderName::from_static(H_TOPIC);

/// A legacy message waiting for the NATS publisher task.
pub struct Outbound {
    pub route: usize,
    pub subject: async_nats::Subject,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub received: Instant,
    pub ack: Option<AckSender>,
    /// Reply subject: set for point-to-point messages so that the server's
    /// "no responders" status tells the bridge nobody consumed it.
    pub reply: Option<String>,
}

/// Where a legacy topic goes on NATS.
#[derive(Clone)]
pub struct Mirror {
    pub route: usize,
    pub subject: async_nats::Subject,
    /// Whether the subject tells the topic back (`RouteTable::mirrors_back`);
    /// where it does not, the mirror carries the topic in a header.
    pub reads_back: bool,
}

/// Topics whose `Mirror` is kept; past this the cache starts again. With
/// `MAX_CACHED_TOPIC` it bounds the cache at about 5 MB, however many topics
/// clients publish on.
const MAX_MIRRORS: usize = 8192;

/// Longer topics are not kept in the cache (nor locked for): TraderX's are
/// under 40 bytes, and a long one costs its mapping each time.
const MAX_CACHED_TOPIC: usize = 256;

/// Longest subject the bridge publishes on. nats-server closes a
/// connection whose protocol line (`HPUB <subject> <reply> <sizes>`) is over
/// its `max_control_line`, 4 KiB by default: one legacy publish on a long
/// enough topic would have cut every mirror off until the reconnect.
pub const MAX_SUBJECT_BYTES: usize = 3072;

/// What the census shows about one legacy client.
#[derive(Debug, Clone, Serialize)]
pub struct ClientInfo {
    pub id: String,
    pub remote_addr: String,
    pub user_agent: String,
    pub path: String,
    pub connected_at_ms: u64,
    pub last_active_ms: u64,
    pub topics: BTreeSet<String>,
    /// Messages published, per topic, for its first
    /// [`MAX_PUBLISHED_TOPICS`] topics of at most [`MAX_LISTED_TOPIC_BYTES`].
    pub published: BTreeMap<String, u64>,
    /// Messages published on further or longer topics, counted together, so
    /// that a client publishing on ever new topics costs bounded memory.
    pub published_other_topics: u64,
    /// Messages this client should have received but its buffer was full.
    pub dropped: u64,
    #[serde(skip)]
    pub warned_unsubscribed: bool,
}

/// Topics listed one by one in a client's census entry.
pub const MAX_PUBLISHED_TOPICS: usize = 1000;

/// Longer topics are counted in a client's census entry, not listed: 1,000
/// topics near the Socket.IO payload limit would have kept a gigabyte.
pub const MAX_LISTED_TOPIC_BYTES: usize = 256;

/// The catch-all room: its members get every message.
pub const CATCH_ALL: &str = "/*";

/// How many clients each room has, and how many of them are also in the
/// catch-all room, so that a message on a topic, which goes to the topic's
/// room and to `/*` and reaches a client in both once, has its number of
/// recipients without a listing of either room. A client that has just
/// disconnected is counted until its disconnect handler runs, a moment
/// after socketioxide dropped it from its rooms.
#[derive(Debug, Default)]
pub struct RoomCounts {
    members: HashMap<String, usize>,
    /// Per topic, its members that are also in `/*`.
    with_catch_all: HashMap<String, usize>,
}

impl RoomCounts {
    /// A client whose rooms were `before` joined `topic`.
    pub fn joined(&mut self, topic: &str, before: &BTreeSet<String>) {
        if before.contains(topic) {
            return;
        }
        *self.members.entry(topic.to_string()).or_default() += 1;
        if topic == CATCH_ALL {
            for t in before {
                *self.with_catch_all.entry(t.clone()).or_default() += 1;
            }
        } else if before.contains(CATCH_ALL) {
            *self.with_catch_all.entry(topic.to_string()).or_default() += 1;
        }
    }

    /// A client left `topic`, which it was in; `after` are its rooms now.
    pub fn left(&mut self, topic: &str, after: &BTreeSet<String>) {
        decrement(&mut self.members, topic);
        if topic == CATCH_ALL {
            for t in after {
                decrement(&mut self.with_catch_all, t);
            }
        } else if after.contains(CATCH_ALL) {
            decrement(&mut self.with_catch_all, topic);
        }
    }

    /// How many clients a message on `topic` goes to (its room and `/*`).
    pub fn recipients(&self, topic: &str) -> usize {
        let all = self.members.get(CATCH_ALL).copied().unwrap_or(0);
        if topic == CATCH_ALL {
            return all;
        }
        let room = self.members.get(topic).copied().unwrap_or(0);
        let both = self.with_catch_all.get(topic).copied().unwrap_or(0);
        (room + all).saturating_sub(both)
    }

    /// Members of one room.
    pub fn members(&self, room: &str) -> usize {
        self.members.get(room).copied().unwrap_or(0)
    }
}

fn decrement(map: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Last time a route carried a message, per direction (epoch ms, 0 = never).
#[derive(Debug, Default)]
pub struct RouteActivity {
    pub to_nats_ms: AtomicU64,
    pub to_socketio_ms: AtomicU64,
    pub to_nats_count: AtomicU64,
    pub to_socketio_count: AtomicU64,
    /// NATS -> legacy messages that reached at least one legacy client
    /// (last time), and the number of clients reached (count).
    pub received_ms: AtomicU64,
    pub received_count: AtomicU64,
}

pub struct Bridge {
    pub config: Config,
    pub routes: RouteTable,
    pub instance_id: String,
    /// `instance_id` as the origin header's value, made once.
    origin: HeaderValue,
    /// Legacy topics already mapped: a subject rendered once is shared by
    /// every later message on the topic (`mirror_for`).
    mirrors: Mutex<HashMap<Box<str>, Mirror>>,
    pub metrics: Metrics,
    pub limiter: LogLimiter,
    pub clients: Mutex<HashMap<Sid, ClientInfo>>,
    pub activity: Vec<RouteActivity>,
    /// Per route, the JSON `type` used for bare payloads.
    route_types: Vec<Box<RawValue>>,
    io: OnceLock<SocketIo>,
    nats: OnceLock<async_nats::Client>,
    /// Boxed: the queue allocates its slots 32 at a time, and a burst of
    /// publishes made it allocate (and free) a block of 32 whole messages
    /// every 32 messages, 5 % of a Socket.IO -> NATS message's CPU.
    to_nats: mpsc::Sender<Box<Outbound>>,
    to_nats_rx: Mutex<Option<mpsc::Receiver<Box<Outbound>>>>,
    /// Legacy messages accepted for NATS and not yet handed to the client.
    pending: AtomicUsize,
    pub socketio_listening: AtomicBool,
    pub upstream_connected: AtomicBool,
    pub shutting_down: AtomicBool,
    /// Largest NATS message (body plus headers) the bridge will send.
    max_nats_bytes: AtomicUsize,
    pub last_legacy_activity_ms: AtomicU64,
    /// Until when (epoch ms) legacy deliveries go socket by socket, after a
    /// client's outgoing buffer overflowed.
    overflow_until_ms: AtomicU64,
    /// Departures and last publish, for the census.
    pub census: crate::census::CensusState,
    /// Bumped whenever a legacy client joins or leaves a room, so the
    /// point-to-point members can follow their rooms.
    pub membership: tokio::sync::watch::Sender<u64>,
    /// Held while a message is handed to legacy rooms and while a client
    /// joins or leaves a room (with its System notice), so a message reaches
    /// a leaving client before its leave notice or not at all. It counts
    /// the members of each room beside socketioxide's rooms (which can only
    /// list them), so a delivery knows how many clients it reaches without
    /// listing them. Taken before `clients` wherever both are.
    pub rooms: Mutex<RoomCounts>,
    attach: OnceLock<Arc<crate::attach::Attach>>,
    /// Server mode, per route: whether the legacy room of a point-to-point
    /// route still takes part in its queue group (true unless an operator
    /// declared otherwise to drain a legacy consumer that cannot drain itself).
    legacy_consumers: Vec<AtomicBool>,
    /// Woken when the NATS connection is (re-)established.
    pub nats_up: tokio::sync::Notify,
    /// The primary connection came up before its client was attached: the
    /// server and authentication to report once it is (`start_nats`).
    pub nats_connect_unreported: Mutex<Option<(String, String)>>,
    /// Server mode, per route: whether this bridge is in the route's queue
    /// group, and the legacy publishes held while it joins.
    queue_join: Vec<Mutex<QueueJoin>>,
    /// How often the queue-member connection was lost: a member confirmed
    /// across a loss is not in the group on the new connection.
    queue_link_losses: AtomicU64,
    /// Point-to-point messages given back to their queue group, by the
    /// token of their reply subject, until the server has taken them.
    pub given_back: Mutex<GivenBack>,
    /// Queue subscriptions of point-to-point members that are open or still
    /// draining: at shutdown the bridge exits once they are 0.
    pub queue_subscriptions: AtomicUsize,
    /// Wakes given-back messages waiting to be published again, at shutdown.
    pub retry_now: tokio::sync::Notify,
    /// How many of the shutdown's markers (`watch_no_responders`) came back.
    pub stop_markers: tokio::sync::watch::Sender<usize>,
}

/// A message the bridge gave back to its queue group, kept until some
/// consumer has taken it: the server's "no responders" answer to a
/// give-back goes to the bridge (it published it), so the bridge, not the
/// message's producer, has to publish it again.
pub struct GivenBackMsg {
    pub route: usize,
    pub subject: async_nats::Subject,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// When it was first given back.
    pub since: Instant,
    /// When it was last published.
    pub sent: Instant,
}

/// The messages given back and not yet known to be taken.
#[derive(Default)]
pub struct GivenBack {
    next: u64,
    msgs: HashMap<u64, GivenBackMsg>,
    /// Tokens in the order they were published, to forget the settled.
    order: std::collections::VecDeque<(u64, Instant)>,
}

/// Most given-back messages kept at once; past it a message is given back
/// once, without a second try.
const MAX_GIVEN_BACK: usize = 10_000;

/// How long a given-back message with no "no responders" answer is kept
/// (it is forgotten at the next give-back after that): the server answers
/// as it handles the publish, so by then some consumer has it.
const GIVEN_BACK_SETTLED: Duration = Duration::from_secs(5);

impl GivenBack {
    /// Keeps `msg` under a new token, or returns `None` when full.
    pub fn keep(&mut self, msg: GivenBackMsg) -> Option<u64> {
        // Those some consumer took are only known by their silence.
        let now = Instant::now();
        while let Some(&(token, sent)) = self.order.front() {
            if now.duration_since(sent) < GIVEN_BACK_SETTLED {
                break;
            }
            self.order.pop_front();
            self.msgs.remove(&token);
        }
        if self.msgs.len() >= MAX_GIVEN_BACK {
            return None;
        }
        self.next += 1;
        self.order.push_back((self.next, msg.sent));
        self.msgs.insert(self.next, msg);
        Some(self.next)
    }

    /// The message kept under `token`, if it is still kept (its place in
    /// `order` goes when it would have settled).
    pub fn take(&mut self, token: u64) -> Option<GivenBackMsg> {
        self.msgs.remove(&token)
    }
}

/// Where a point-to-point route's queue member stands (server mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueMembership {
    /// In the group, as the server has confirmed: legacy consumers get
    /// their share.
    Joined,
    /// Out of the group: no legacy consumer, or leaving, or joining.
    Out,
    /// Subscribed, but the queue-member connection was lost since the server
    /// last confirmed it: the client subscribes again when it reconnects,
    /// and until the server confirms that, the group may have no member.
    Rejoining,
    /// Joining failed; nothing is held until a membership change retries.
    Failed,
}

/// Most legacy publishes held for one route while its queue member joins.
/// Past it they go to NATS at once, where the group may have no member.
const MAX_HELD_WHILE_JOINING: usize = 10_000;

struct QueueJoin {
    state: QueueMembership,
    held: Vec<Outbound>,
}

impl Bridge {
    pub fn new(config: Config, routes: RouteTable) -> Arc<Bridge> {
        let instance_id = if config.instance_id.is_empty() {
            let u = uuid::Uuid::new_v4().simple().to_string();
            format!("tfb-{}", &u[..12])
        } else {
            config.instance_id.clone()
        };
        let (tx, rx) = mpsc::channel(config.nats.publish_queue);
        let routes_len = routes.routes().len();
        let metrics = Metrics::new(&routes, &config, &instance_id);
        let route_types = routes
            .routes()
            .iter()
            .map(|r| RawValue::from_string(r.envelope_type_json.clone()).expect("json string"))
            .collect();
        let activity = routes
            .routes()
            .iter()
            .map(|_| RouteActivity::default())
            .collect();
        let legacy_consumers = routes
            .routes()
            .iter()
            .map(|_| AtomicBool::new(true))
            .collect();
        Arc::new(Bridge {
            max_nats_bytes: AtomicUsize::new(config.nats.max_message_bytes),
            config,
            routes,
            origin: header_value(&instance_id),
            mirrors: Mutex::new(HashMap::new()),
            instance_id,
            metrics,
            limiter: LogLimiter::new(Duration::from_secs(1)),
            clients: Mutex::new(HashMap::new()),
            activity,
            route_types,
            io: OnceLock::new(),
            nats: OnceLock::new(),
            to_nats: tx,
            to_nats_rx: Mutex::new(Some(rx)),
            pending: AtomicUsize::new(0),
            socketio_listening: AtomicBool::new(false),
            upstream_connected: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            last_legacy_activity_ms: AtomicU64::new(0),
            overflow_until_ms: AtomicU64::new(0),
            census: Default::default(),
            membership: tokio::sync::watch::channel(0).0,
            rooms: Mutex::new(RoomCounts::default()),
            attach: OnceLock::new(),
            legacy_consumers,
            queue_link_losses: AtomicU64::new(0),
            given_back: Mutex::new(GivenBack::default()),
            queue_subscriptions: AtomicUsize::new(0),
            retry_now: tokio::sync::Notify::new(),
            stop_markers: tokio::sync::watch::channel(0).0,
            nats_up: tokio::sync::Notify::new(),
            nats_connect_unreported: Mutex::new(None),
            queue_join: (0..routes_len)
                .map(|_| {
                    Mutex::new(QueueJoin {
                        state: QueueMembership::Out,
                        held: Vec::new(),
                    })
                })
                .collect(),
        })
    }

    pub fn set_io(&self, io: SocketIo) {
        let _ = self.io.set(io);
    }

    pub fn io(&self) -> Option<&SocketIo> {
        self.io.get()
    }

    pub fn set_attach(&self, attach: Arc<crate::attach::Attach>) {
        let _ = self.attach.set(attach);
    }

    /// The attach-mode side, when running in attach mode.
    pub fn attach(&self) -> Option<&Arc<crate::attach::Attach>> {
        self.attach.get()
    }

    /// Whether a legacy client's buffer overflowed recently.
    pub fn clients_overflowing(&self) -> bool {
        let until = self.overflow_until_ms.load(Ordering::Relaxed);
        until != 0 && envelope::now_ms() < until
    }

    /// Records an overflow; deliveries are counted per client for `for_ms`.
    pub fn note_overflow(&self, for_ms: u64) {
        self.overflow_until_ms
            .store(envelope::now_ms() + for_ms, Ordering::Relaxed);
    }

    /// Server mode: whether a point-to-point route's legacy room may take
    /// messages from its queue group (see [`Bridge::set_legacy_consumers`]).
    pub fn legacy_consumers(&self, route: usize) -> bool {
        self.legacy_consumers[route].load(Ordering::Relaxed)
    }

    /// Declares whether a point-to-point route's consumers are still on the
    /// legacy side; `false` when no such route exists. In attach mode this
    /// is trade-feed's room (see `attach`); in server mode `false` makes the
    /// bridge leave the queue group although its room has members, handing
    /// them what it had already taken: a legacy consumer that cannot
    /// unsubscribe and wait for its own leave notice (TraderX's Java
    /// subscriber) is drained this way, then stopped.
    /// What is declared for a point-to-point route (see
    /// [`Bridge::set_legacy_consumers`]); `None` if no such route exists.
    pub fn declared_legacy_consumers(&self, route_name: &str) -> Option<bool> {
        if let Some(attach) = self.attach() {
            return attach.declared_legacy_consumers(route_name);
        }
        let r = self.routes.queue_routes().find(|r| r.name == route_name)?;
        Some(self.legacy_consumers(r.index))
    }

    pub fn set_legacy_consumers(&self, route_name: &str, present: bool) -> bool {
        if let Some(attach) = self.attach() {
            return attach.set_legacy_consumers(route_name, present);
        }
        let Some(r) = self.routes.queue_routes().find(|r| r.name == route_name) else {
            return false;
        };
        let before = self.legacy_consumers[r.index].swap(present, Ordering::Relaxed);
        if before != present {
            tracing::info!(route = %route_name, present, "legacy consumers declared");
            self.membership_changed();
        }
        true
    }

    pub fn membership_changed(&self) {
        self.membership.send_modify(|n| *n += 1);
    }

    /// Reply subjects of point-to-point messages: `<prefix>.<route>`.
    pub fn no_responders_prefix(&self) -> String {
        format!("_INBOX.{}.unconsumed", self.instance_id)
    }

    /// Counts and logs a point-to-point message that reached no consumer.
    pub fn undeliverable(&self, route: usize, why: &str) {
        let name = &self.routes.get(route).name;
        telemetry::dropped(name, TO_NATS, "undeliverable", 1);
        self.warn_limited(
            "undeliverable",
            format_args!("a message on route {name} reached no consumer: {why}"),
        );
    }

    pub fn nats(&self) -> Option<&async_nats::Client> {
        self.nats.get()
    }

    /// Attaches the NATS client and starts the publisher task.
    pub fn start_nats(self: &Arc<Self>, client: async_nats::Client) {
        let _ = self.nats.set(client.clone());
        let unreported = self
            .nats_connect_unreported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((server, auth)) = unreported {
            crate::nats::primary_connected(self, &client, &server, &auth);
        }
        let rx = self
            .to_nats_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("publisher started once");
        // Unconstrained by tokio's cooperative budget: a flooding publisher's
        // reader task handles ~1,500 events per turn, and a budgeted loop
        // would forward only 128 per turn and shed the rest.
        tokio::spawn(tokio::task::unconstrained(
            self.clone().publish_loop(rx, client),
        ));
    }

    pub fn nats_connected(&self) -> bool {
        self.nats
            .get()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }

    /// Called on every (re)connect: the limit follows the server's `max_payload`
    /// unless one is configured.
    pub fn learn_server_limit(&self) {
        if self.config.nats.max_message_bytes == 0 {
            if let Some(c) = self.nats.get() {
                let max = c.server_info().max_payload;
                if max > 0 {
                    self.max_nats_bytes.store(max, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn max_nats_bytes(&self) -> usize {
        match self.max_nats_bytes.load(Ordering::Relaxed) {
            0 => 1024 * 1024,
            n => n,
        }
    }

    pub fn pending_to_nats(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Logs a warning at most once a second per cause.
    pub fn warn_limited(&self, cause: &'static str, msg: std::fmt::Arguments<'_>) {
        if let Some(held) = self.limiter.allow(cause) {
            if held > 0 {
                tracing::warn!(cause, held_back = held, "{msg}");
            } else {
                tracing::warn!(cause, "{msg}");
            }
        }
    }

    // ---------------------------------------------------------------- legacy -> NATS

    /// Where a legacy topic goes on NATS, if a route carries it there. A
    /// subject is rendered once per topic and then shared: each message on
    /// it would otherwise allocate it twice more (rendered, then copied into
    /// the client's subject type and cloned there to be checked). Topics
    /// longer than `MAX_CACHED_TOPIC` are mapped every time.
    pub fn mirror_for(&self, topic: &str) -> Option<Mirror> {
        let map = || {
            let mapped = self.routes.to_subject(topic)?;
            Some(Mirror {
                route: mapped.route,
                reads_back: self.routes.mirrors_back(&mapped.target, topic),
                subject: async_nats::Subject::from(mapped.target),
            })
        };
        if topic.len() > MAX_CACHED_TOPIC {
            return map();
        }
        let mut mirrors = self.mirrors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mirrors.get(topic) {
            return Some(m.clone());
        }
        let mirror = map()?;
        if mirrors.len() >= MAX_MIRRORS {
            mirrors.clear();
        }
        mirrors.insert(topic.into(), mirror.clone());
        Some(mirror)
    }

    /// Builds the NATS message for a legacy one and checks its size and its
    /// subject's. A refusal is counted and logged here; the caller replies
    /// to the client.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        mirror: &Mirror,
        legacy_topic: &str,
        kind: &RawValue,
        from: Field<'_>,
        date: Field<'_>,
        payload: Option<&RawValue>,
        received: Instant,
    ) -> Result<Outbound, String> {
        let route = self.routes.get(mirror.route);
        if mirror.subject.len() > MAX_SUBJECT_BYTES {
            let len = mirror.subject.len();
            telemetry::rejected(&route.name, TO_NATS, Reject::SubjectTooLong.label());
            self.warn_limited(
                "to_nats_subject_too_long",
                format_args!(
                    "refused a message on route {}: its subject would be {len} bytes, over the bridge's limit of {MAX_SUBJECT_BYTES}",
                    route.name
                ),
            );
            return Err(format!(
                "the topic maps to a NATS subject of {len} bytes; at most {MAX_SUBJECT_BYTES} are published"
            ));
        }
        let body = envelope_bytes(&EnvelopeOut {
            kind,
            from,
            topic: mirror.subject.as_str(),
            date,
            payload,
        });
        let mut headers = HeaderMap::new();
        headers.insert(H_ORIGIN_NAME, self.origin.clone());
        let topic = (!mirror.reads_back).then(|| header_value(legacy_topic));
        // What nats-server (and async-nats) hold against max_payload: the
        // header block plus the body; the subject does not count.
        let mut size = body.len() + headers_len(&[(H_ORIGIN, self.origin.as_str())]);
        if let Some(topic) = topic {
            size += headers_len(&[(H_TOPIC, topic.as_str())]) - HEADER_BLOCK_FRAMING;
            headers.insert(H_TOPIC_NAME, topic);
        }
        let limit = self.max_nats_bytes();
        if size > limit {
            telemetry::rejected(&route.name, TO_NATS, Reject::TooLarge.label());
            self.warn_limited(
                "to_nats_too_large",
                format_args!(
                    "refused a {size}-byte message for {} on route {}: the NATS limit is {limit} bytes",
                    mirror.subject, route.name
                ),
            );
            return Err(format!(
                "message of {size} bytes exceeds the NATS limit of {limit} bytes"
            ));
        }
        Ok(Outbound {
            route: mirror.route,
            subject: mirror.subject.clone(),
            headers,
            body,
            received,
            ack: None,
            reply: None,
        })
    }

    /// Hands a legacy publish on a point-to-point route to NATS, unless the
    /// legacy room `topic` has members and this bridge is not yet in the
    /// route's queue group for them: a consumer that just subscribed would
    /// otherwise miss an order published in the round trip its bridge needs
    /// to join (the group
    /// would have no member: NATS answers "no responders", or, when some
    /// plain subscriber watches the subject, nothing at all). Such a publish
    /// is held, in order, until the join is confirmed or fails.
    pub fn enqueue_point_to_point(&self, topic: &str, out: Outbound) -> bool {
        let route = out.route;
        let mut join = self.queue_join(route);
        // Counted under the join lock, as `leave_queue_membership` does: a
        // count taken before could be of a consumer whose member has left
        // since, and nothing would release what it held.
        let hold = matches!(
            join.state,
            QueueMembership::Out | QueueMembership::Rejoining
        ) && self.routes.get(route).direction.to_socketio()
            && self.room_needs_member(route, topic)
            && join.held.len() < MAX_HELD_WHILE_JOINING;
        if hold {
            join.held.push(out);
            return true;
        }
        drop(join);
        self.enqueue(out)
    }

    /// Records where the route's queue member stands, and sends what was
    /// held while it joined (also when the join failed: then NATS decides,
    /// and an order nobody takes is counted as undeliverable), unless it is
    /// `Rejoining`: what is held waits for the confirmation on the new
    /// connection. Sent under the lock, so the held messages go before any
    /// later publish.
    pub fn set_queue_membership(&self, route: usize, state: QueueMembership) {
        let mut join = self.queue_join(route);
        join.state = state;
        if state != QueueMembership::Rejoining {
            self.send_held(&mut join);
        }
    }

    /// The queue-member connection is down: every route whose member was in
    /// the group holds its legacy publishes again until its member has
    /// confirmed the subscription on the new connection. The members are
    /// woken to do so.
    pub fn queue_link_lost(&self) {
        self.queue_link_losses.fetch_add(1, Ordering::SeqCst);
        for route in 0..self.queue_join.len() {
            let mut join = self.queue_join(route);
            if join.state == QueueMembership::Joined {
                join.state = QueueMembership::Rejoining;
            }
        }
        self.membership_changed();
    }

    pub fn queue_membership(&self, route: usize) -> QueueMembership {
        self.queue_join(route).state
    }

    /// The count `queue_link_lost` bumps, read before a confirmation.
    pub fn queue_link_epoch(&self) -> u64 {
        self.queue_link_losses.load(Ordering::SeqCst)
    }

    /// Records a member the server confirmed while the link count read
    /// `epoch`: `Rejoining` instead of `Joined` if the connection was lost
    /// since (its loss may have been handled before the member counted as
    /// joined, and left nothing to downgrade). Returns the state recorded.
    pub fn confirm_queue_membership(&self, route: usize, epoch: u64) -> QueueMembership {
        let mut join = self.queue_join(route);
        if self.queue_link_epoch() == epoch {
            join.state = QueueMembership::Joined;
            self.send_held(&mut join);
        } else {
            // Still held: the member confirms again on the new connection.
            join.state = QueueMembership::Rejoining;
        }
        join.state
    }

    /// Marks the route's queue member as leaving, unless a legacy consumer
    /// joined the room since the member decided to leave: a publish that
    /// consumer made while the member still counted as joined went to NATS
    /// at once, and would find the group empty once the member is gone. The
    /// room is counted under the lock that publishes check, so every later
    /// publish of a new consumer is held instead.
    pub fn leave_queue_membership(&self, route: usize, topic: &str) -> bool {
        let mut join = self.queue_join(route);
        if self.room_needs_member(route, topic) {
            return false;
        }
        join.state = QueueMembership::Out;
        self.send_held(&mut join);
        true
    }

    /// Whether the legacy room `topic` of a point-to-point route has a
    /// consumer the bridge competes for: a member, taking part (not declared
    /// away), while the bridge is not stopping. Callers hold the join lock.
    fn room_needs_member(&self, route: usize, topic: &str) -> bool {
        let members = self
            .rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .members(topic);
        members > 0 && self.legacy_consumers(route) && !self.shutting_down.load(Ordering::Relaxed)
    }

    /// At shutdown: sends every held publish to NATS, so the drain that
    /// follows covers them (nothing is held once `shutting_down` is set).
    pub fn release_held(&self) {
        for route in 0..self.queue_join.len() {
            self.send_held(&mut self.queue_join(route));
        }
    }

    fn queue_join(&self, route: usize) -> MutexGuard<'_, QueueJoin> {
        self.queue_join[route]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the held publishes, in order, under the caller's lock.
    fn send_held(&self, join: &mut QueueJoin) {
        for out in std::mem::take(&mut join.held) {
            self.enqueue(out);
        }
    }

    /// Hands a prepared message to the NATS publisher task, in order. A full
    /// queue drops the message: counted, logged and told to the client.
    pub fn enqueue(&self, out: Outbound) -> bool {
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.to_nats.try_send(Box::new(out)) {
            Ok(()) => true,
            Err(e) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                let out = match e {
                    mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => o,
                };
                let route = self.routes.get(out.route);
                telemetry::dropped(&route.name, TO_NATS, "publish_queue_full", 1);
                self.warn_limited(
                    "publish_queue_full",
                    format_args!(
                        "dropped a message for {}: {} messages already wait for NATS (nats.publish_queue)",
                        out.subject, self.config.nats.publish_queue
                    ),
                );
                reply(out.ack, Err("the bridge's NATS queue is full"));
                false
            }
        }
    }

    async fn publish_loop(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Box<Outbound>>,
        client: async_nats::Client,
    ) {
        use async_nats::connection::State;
        let confirm = crate::nats::RoundTrip::start(client.clone(), self.clone());
        while let Some(out) = rx.recv().await {
            let out = *out;
            let route = self.routes.get(out.route);
            if self.hold_while_nats_down() {
                self.wait_for_nats(&client).await;
            }
            if client.connection_state() != State::Connected {
                telemetry::dropped(&route.name, TO_NATS, "nats_unavailable", 1);
                self.warn_limited(
                    "nats_unavailable",
                    format_args!(
                        "NATS is not connected: a message for {} was not mirrored (route {})",
                        out.subject, route.name
                    ),
                );
                reply(out.ack, Err("NATS is not connected"));
                self.pending.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            // The subject is moved, not cloned: the first clone of its bytes
            // would allocate. Log lines after the publish name the route.
            let published = match out.reply {
                Some(reply) => {
                    client
                        .publish_with_reply_and_headers(out.subject, reply, out.headers, out.body)
                        .await
                }
                None => {
                    client
                        .publish_with_headers(out.subject, out.headers, out.body)
                        .await
                }
            };
            match published {
                Ok(()) => {
                    let m = &self.metrics.routes[out.route];
                    m.forwarded_to_nats.increment(1);
                    m.latency_to_nats
                        .record(out.received.elapsed().as_secs_f64());
                    let a = &self.activity[out.route];
                    a.to_nats_ms.store(envelope::now_ms(), Ordering::Relaxed);
                    a.to_nats_count.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(route = %route.name, "legacy -> NATS");
                    if let Some(ack) = out.ack {
                        // The ack promises the broker has the message: wait for
                        // a server round trip, off the publishing path.
                        confirm.ack_after(ack);
                    }
                }
                Err(e) => {
                    telemetry::dropped(&route.name, TO_NATS, "nats_error", 1);
                    self.warn_limited(
                        "nats_publish_error",
                        format_args!("NATS refused a publish on route {}: {e}", route.name),
                    );
                    reply(out.ack, Err(&format!("NATS refused the publish: {e}")));
                }
            }
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Attach mode has no client waiting for an ack: a legacy message that
    /// arrives while NATS is down waits in the publish queue (in order,
    /// bounded by `nats.publish_queue`, newest dropped and counted when
    /// full) instead of being dropped. Server mode answers acks at once.
    fn hold_while_nats_down(&self) -> bool {
        self.config.mode == crate::config::Mode::Attach
    }

    /// Waits until the NATS connection is up (re-checked every 250 ms in
    /// case a wake-up was missed).
    async fn wait_for_nats(&self, client: &async_nats::Client) {
        use async_nats::connection::State;
        let mut told = false;
        while client.connection_state() != State::Connected {
            if !told {
                tracing::info!(
                    waiting = self.pending_to_nats(),
                    "NATS is not connected: legacy messages wait for it"
                );
                told = true;
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), self.nats_up.notified()).await;
        }
    }

    // ---------------------------------------------------------------- NATS -> legacy

    /// Turns a NATS message into a legacy envelope for `deliver`. Returns
    /// `None` when the message is not for the given subscription's routes, is
    /// this bridge's own, or is refused (counted).
    pub fn nats_to_legacy<F>(&self, msg: &async_nats::Message, serves: &[usize], deliver: F)
    where
        F: FnOnce(usize, &str, &EnvelopeOut<'_>),
    {
        self.convert_nats(msg, serves, false, deliver)
    }

    /// For point-to-point routes: the queue group chose this bridge, even for
    /// a message this bridge published itself.
    pub fn queued_to_legacy<F>(&self, msg: &async_nats::Message, route: usize, deliver: F)
    where
        F: FnOnce(usize, &str, &EnvelopeOut<'_>),
    {
        self.convert_nats(msg, &[route], true, deliver)
    }

    fn convert_nats<F>(&self, msg: &async_nats::Message, serves: &[usize], own_ok: bool, deliver: F)
    where
        F: FnOnce(usize, &str, &EnvelopeOut<'_>),
    {
        let Some(mapped) = self.routes.to_topic(msg.subject.as_str()) else {
            tracing::debug!(subject = %msg.subject, "NATS message matches no route template");
            return;
        };
        if !serves.contains(&mapped.route) {
            // Another subscription serves the first route that matches.
            return;
        }
        let route = self.routes.get(mapped.route);
        if let (Some(h), false) = (&msg.headers, own_ok) {
            if h.get(H_ORIGIN).map(|v| v.as_str()) == Some(self.instance_id.as_str()) {
                telemetry::suppressed(&route.name, TO_SOCKETIO, "own_message");
                return;
            }
        }
        let from_bridge = msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(H_ORIGIN).is_some());
        let body = match envelope::parse_nats_body(&msg.payload, from_bridge) {
            Ok(b) => b,
            Err(r) => {
                telemetry::rejected(&route.name, TO_SOCKETIO, r.label());
                self.warn_limited(
                    "nats_invalid_json",
                    format_args!(
                        "ignored a {}-byte message on {}: {} (route {})",
                        msg.payload.len(),
                        msg.subject,
                        r.explain(),
                        route.name
                    ),
                );
                return;
            }
        };
        // `from` for bodies that do not carry one; most envelopes do.
        let needs_origin = match &body {
            NatsBody::Envelope(e) => e.from.is_none(),
            NatsBody::Bare(_) => true,
        };
        let origin = if needs_origin {
            format!("nats:{}", msg.subject)
        } else {
            String::new()
        };
        let now = envelope::now_ms();
        let env = match &body {
            NatsBody::Envelope(e) => EnvelopeOut {
                kind: e.kind.expect("checked"),
                from: e.from.map(Field::Raw).unwrap_or(Field::Str(&origin)),
                topic: &mapped.target,
                date: e.date.map(Field::Raw).unwrap_or(Field::Num(now)),
                payload: e.payload,
            },
            NatsBody::Bare(payload) => EnvelopeOut {
                kind: &self.route_types[mapped.route],
                from: Field::Str(&origin),
                topic: &mapped.target,
                date: Field::Num(now),
                payload: Some(payload),
            },
        };
        deliver(mapped.route, &mapped.target, &env);
    }

    /// Counts a message handed to the legacy side on `route`, which
    /// `recipients` legacy clients received (server mode; attach mode hands
    /// it to trade-feed and passes 0: it cannot know).
    pub fn forwarded_to_socketio(&self, route: usize, received: Instant, recipients: usize) {
        let m = &self.metrics.routes[route];
        m.forwarded_to_socketio.increment(1);
        m.latency_to_socketio
            .record(received.elapsed().as_secs_f64());
        let a = &self.activity[route];
        let now = envelope::now_ms();
        a.to_socketio_ms.store(now, Ordering::Relaxed);
        a.to_socketio_count.fetch_add(1, Ordering::Relaxed);
        if recipients > 0 {
            m.delivered_to_socketio.increment(recipients as u64);
            a.received_ms.store(now, Ordering::Relaxed);
            a.received_count
                .fetch_add(recipients as u64, Ordering::Relaxed);
        }
    }
}

fn header_value(s: &str) -> HeaderValue {
    use std::str::FromStr;
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_str("?").expect("ascii"))
}

/// "NATS/1.0\r\n" before the headers and "\r\n" after them.
const HEADER_BLOCK_FRAMING: usize = 12;

/// Size of a header block holding these headers: "Name: value\r\n" each.
fn headers_len(headers: &[(&str, &str)]) -> usize {
    HEADER_BLOCK_FRAMING
        + headers
            .iter()
            .map(|(name, value)| name.len() + value.len() + 4)
            .sum::<usize>()
}

/// Sends an acknowledgement if the client asked for one: `{"ok":true}` or
/// `{"ok":false,"error":"..."}`.
pub fn reply(ack: Option<AckSender>, result: Result<(), &str>) {
    if let Some(ack) = ack {
        let sent = match result {
            Ok(()) => ack.send(&serde_json::json!({"ok": true})),
            Err(e) => ack.send(&serde_json::json!({"ok": false, "error": e})),
        };
        if let Err(e) = sent {
            tracing::debug!("could not send ack: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(route: usize) -> GivenBackMsg {
        let now = Instant::now();
        GivenBackMsg {
            route,
            subject: "trades.new".into(),
            headers: HeaderMap::new(),
            payload: Bytes::from_static(b"{}"),
            since: now,
            sent: now,
        }
    }

    #[test]
    fn given_back_messages_are_kept_once_each_and_bounded() {
        let mut g = GivenBack::default();
        let a = g.keep(given(1)).unwrap();
        let b = g.keep(given(2)).unwrap();
        assert_ne!(a, b);
        assert_eq!(g.take(b).map(|m| m.route), Some(2));
        assert!(g.take(b).is_none(), "taken twice");
        for _ in 1..MAX_GIVEN_BACK {
            assert!(g.keep(given(0)).is_some());
        }
        assert!(g.keep(given(0)).is_none(), "kept past the bound");
        assert_eq!(g.take(a).map(|m| m.route), Some(1));
    }

    /// One client's rooms and the counts, changed as the server changes them.
    fn join(rooms: &mut RoomCounts, client: &mut BTreeSet<String>, topic: &str) {
        rooms.joined(topic, client);
        client.insert(topic.to_string());
    }

    fn leave(rooms: &mut RoomCounts, client: &mut BTreeSet<String>, topic: &str) {
        if client.remove(topic) {
            rooms.left(topic, client);
        }
    }

    #[test]
    fn room_counts_reach_each_client_once() {
        let mut rooms = RoomCounts::default();
        let (mut a, mut b, mut c) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        join(&mut rooms, &mut a, "/t");
        join(&mut rooms, &mut a, "/t");
        join(&mut rooms, &mut b, "/t");
        join(&mut rooms, &mut b, "/u");
        assert_eq!(rooms.recipients("/t"), 2);
        assert_eq!(rooms.recipients("/u"), 1);
        assert_eq!(rooms.recipients("/none"), 0);
        // A catch-all member gets every topic, once even if also in the room.
        join(&mut rooms, &mut c, CATCH_ALL);
        assert_eq!(rooms.recipients("/t"), 3);
        assert_eq!(rooms.recipients("/none"), 1);
        join(&mut rooms, &mut c, "/t");
        assert_eq!(rooms.recipients("/t"), 3);
        // Joining `/*` after a topic counts the overlap too.
        join(&mut rooms, &mut b, CATCH_ALL);
        assert_eq!(rooms.recipients("/t"), 3);
        assert_eq!(rooms.recipients("/u"), 2);
        assert_eq!(rooms.recipients(CATCH_ALL), 2);
        assert_eq!(rooms.recipients("/none"), 2);
        leave(&mut rooms, &mut b, CATCH_ALL);
        assert_eq!(rooms.recipients("/u"), 2);
        assert_eq!(rooms.recipients("/none"), 1);
        // A disconnect leaves every room, in any order.
        for mut client in [a, b, c] {
            for t in client.clone() {
                leave(&mut rooms, &mut client, &t);
            }
        }
        assert_eq!(rooms.recipients("/t"), 0);
        assert_eq!(rooms.recipients("/u"), 0);
        assert!(rooms.members.is_empty() && rooms.with_catch_all.is_empty());
    }
}
