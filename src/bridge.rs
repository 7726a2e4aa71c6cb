//! The mirroring core shared by both modes: what happens to a legacy publish,
//! and to a NATS message, once it is known where it came from.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
use crate::envelope::{self, EnvelopeOut, Field, NatsBody, Reject};
use crate::route::{Mapped, RouteTable};
use crate::telemetry::{self, LogLimiter, Metrics, TO_NATS, TO_SOCKETIO};

/// Header naming the bridge process that put a message on NATS.
pub const H_ORIGIN: &str = "Tradefeed-Bridge-Origin";
/// Header carrying the legacy topic of a mirrored message.
pub const H_TOPIC: &str = "Tradefeed-Legacy-Topic";
/// Header carrying the legacy sender (Socket.IO id) of a mirrored message.
pub const H_FROM: &str = "Tradefeed-Legacy-From";

/// The header names, built once (a name made from a `&str` allocates).
const H_ORIGIN_NAME: HeaderName = HeaderName::from_static(H_ORIGIN);
const H_TOPIC_NAME: HeaderName = HeaderName::from_static(H_TOPIC);
const H_FROM_NAME: HeaderName = HeaderName::from_static(H_FROM);

/// A legacy message waiting for the NATS publisher task.
pub struct Outbound {
    pub route: usize,
    pub subject: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub received: Instant,
    pub ack: Option<AckSender>,
    /// Reply subject: set for point-to-point messages so that the server's
    /// "no responders" status tells the bridge nobody consumed it.
    pub reply: Option<String>,
}

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
    /// Messages published, per topic.
    pub published: BTreeMap<String, u64>,
    /// Messages this client should have received but its buffer was full.
    pub dropped: u64,
    #[serde(skip)]
    pub warned_unsubscribed: bool,
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
    pub metrics: Metrics,
    pub limiter: LogLimiter,
    pub clients: Mutex<HashMap<Sid, ClientInfo>>,
    pub activity: Vec<RouteActivity>,
    /// Per route, the JSON `type` used for bare payloads.
    route_types: Vec<Box<RawValue>>,
    io: OnceLock<SocketIo>,
    nats: OnceLock<async_nats::Client>,
    to_nats: mpsc::Sender<Outbound>,
    to_nats_rx: Mutex<Option<mpsc::Receiver<Outbound>>>,
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
    /// a leaving client before its leave notice or not at all.
    pub rooms: Mutex<()>,
    attach: OnceLock<Arc<crate::attach::Attach>>,
    /// Server mode, per route: whether the legacy room of a point-to-point
    /// route still takes part in its queue group (true unless an operator
    /// declared otherwise to drain a legacy consumer that cannot drain itself).
    legacy_consumers: Vec<AtomicBool>,
    /// Woken when the NATS connection is (re-)established.
    pub nats_up: tokio::sync::Notify,
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
            rooms: Mutex::new(()),
            attach: OnceLock::new(),
            legacy_consumers,
            nats_up: tokio::sync::Notify::new(),
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

    /// Builds the NATS message for a legacy one and checks its size. A refusal
    /// is counted and logged here; the caller replies to the client.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        mapped: &Mapped,
        legacy_topic: &str,
        kind: &RawValue,
        from: Field<'_>,
        date: Field<'_>,
        payload: Option<&RawValue>,
        received: Instant,
    ) -> Result<Outbound, String> {
        let route = self.routes.get(mapped.route);
        let body = serde_json::to_vec(&EnvelopeOut {
            kind,
            from,
            topic: &mapped.target,
            date,
            payload,
        })
        .expect("envelope serializes");
        let origin = header_value(&self.instance_id);
        let topic = header_value(legacy_topic);
        let mut size =
            body.len() + headers_len(&[(H_ORIGIN, origin.as_str()), (H_TOPIC, topic.as_str())]);
        let mut headers = HeaderMap::new();
        headers.insert(H_ORIGIN_NAME, origin);
        headers.insert(H_TOPIC_NAME, topic);
        if let Field::Str(sender) = from {
            let sender = header_value(sender);
            size += headers_len(&[(H_FROM, sender.as_str())]) - HEADER_BLOCK_FRAMING;
            headers.insert(H_FROM_NAME, sender);
        }
        // `size` is what nats-server (and async-nats) hold against
        // max_payload: the header block plus the body; the subject does not count.
        let limit = self.max_nats_bytes();
        if size > limit {
            telemetry::rejected(&route.name, TO_NATS, Reject::TooLarge.label());
            self.warn_limited(
                "to_nats_too_large",
                format_args!(
                    "refused a {size}-byte message for {} on route {}: the NATS limit is {limit} bytes",
                    mapped.target, route.name
                ),
            );
            return Err(format!(
                "message of {size} bytes exceeds the NATS limit of {limit} bytes"
            ));
        }
        Ok(Outbound {
            route: mapped.route,
            subject: mapped.target.clone(),
            headers,
            body: Bytes::from(body),
            received,
            ack: None,
            reply: None,
        })
    }

    /// Hands a prepared message to the NATS publisher task, in order. A full
    /// queue drops the message: counted, logged and told to the client.
    pub fn enqueue(&self, out: Outbound) -> bool {
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.to_nats.try_send(out) {
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
        mut rx: mpsc::Receiver<Outbound>,
        client: async_nats::Client,
    ) {
        use async_nats::connection::State;
        let confirm = crate::nats::RoundTrip::start(client.clone(), &self.instance_id);
        while let Some(out) = rx.recv().await {
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
            let subject = async_nats::Subject::from(out.subject);
            let published = match out.reply {
                Some(reply) => {
                    client
                        .publish_with_reply_and_headers(
                            subject.clone(),
                            reply,
                            out.headers,
                            out.body,
                        )
                        .await
                }
                None => {
                    client
                        .publish_with_headers(subject.clone(), out.headers, out.body)
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
                    tracing::debug!(%subject, route = %route.name, "legacy -> NATS");
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
                        format_args!("NATS refused a publish on {subject}: {e}"),
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
        let body = match envelope::parse_nats_body(&msg.payload) {
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
