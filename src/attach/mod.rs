//! Attach mode: the bridge joins a running trade-feed as an ordinary
//! Socket.IO client and mirrors the route table both ways, without any
//! change to trade-feed. The mirroring rules (route table, envelopes, bad
//! input, NATS publishing) are the shared core's (`bridge.rs`); this module
//! owns what only an attached bridge needs:
//!
//! - the connection to trade-feed (`upstream.rs`): subscriptions,
//!   reconnects, heartbeats, and sending the bounded buffer of NATS ->
//!   legacy messages in order;
//! - what trade-feed sends (`inbound.rs`): echoes, other bridges'
//!   deliveries, presence notices, legacy messages;
//! - the NATS side (`nats_side.rs`): subscriptions, other bridges' mirrors,
//!   the queue-group member of point-to-point routes;
//! - the lease that makes one of several attached bridges the active one
//!   (`lease.rs`), and (here) what a standby keeps so that nothing is lost
//!   by both when the active one dies;
//! - the content keys and windows that recognise a message met twice
//!   (`ledger.rs`).
//!
//! The active bridge mirrors. A standby receives the same traffic on both
//! sides and *shadows* it: it holds each message until it sees the active
//! bridge carry it across (a NATS message delivered on trade-feed, a legacy
//! message published on NATS), and on taking over sends what it still
//! holds, in order.

mod inbound;
mod lease;
mod ledger;
mod nats_side;
mod upstream;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{watch, Notify};

use crate::bridge::{Bridge, Outbound};
use crate::envelope::EnvelopeOut;
use crate::telemetry::{self, TO_SOCKETIO};
use ledger::{Hold, Rendezvous};

/// Point-to-point messages in flight to trade-feed whose echo has not come
/// back yet. The echo takes a round trip on loopback or a LAN; 256 keeps a
/// fast stream flowing while bounding what a reconnect sends again.
const MAX_IN_FLIGHT: usize = 256;

/// A NATS -> legacy message on its way to trade-feed.
#[derive(Clone)]
struct Pending {
    route: usize,
    topic: String,
    /// The `publish` argument, `{topic, type, payload}`, as JSON text.
    body: Arc<str>,
    /// Content key (see `ledger.rs`) of what trade-feed will echo.
    key: String,
    received: Instant,
    /// A point-to-point order the queue group handed this bridge: what to
    /// give back to the group if trade-feed cannot have it.
    given: Option<Arc<async_nats::Message>>,
    /// Sent to trade-feed once without its echo (queued again at a detach).
    sent: bool,
}

/// Whether this bridge mirrors or stands by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Holds the lease (or runs without one): mirrors both ways.
    Active,
    /// Another bridge mirrors; this one shadows and waits to take over.
    Standby,
}

struct State {
    role: Role,
    attached: bool,
    /// Active: NATS -> legacy messages waiting for trade-feed.
    outbox: VecDeque<Pending>,
    /// Active: sent to trade-feed, echo not yet seen.
    in_flight: Rendezvous<Pending>,
    /// Standby: NATS -> legacy messages the active bridge should deliver.
    shadow: Rendezvous<Pending>,
    /// Legacy messages seen on trade-feed, by legacy key. A standby keeps
    /// their NATS form until the active bridge's mirror shows up; the
    /// active bridge keeps the key only, to recognise a peer's mirror.
    legacy: Rendezvous<Option<Outbound>>,
    /// Socket id trade-feed gave this connection.
    own_id: Option<String>,
    /// Socket ids of other bridges attached to this trade-feed.
    peers: VecDeque<String>,
    /// After a reconnect, buffered messages wait until then.
    replay_at: Option<Instant>,
    /// Another bridge holds the lease: what a standby shadows ages only then.
    peer_active: bool,
}

/// The attach-mode side of a bridge.
pub struct Attach {
    bridge: Arc<Bridge>,
    state: Mutex<State>,
    /// The writer has something to do (a message, a role change, a replay).
    work: Notify,
    /// Announce this bridge again on trade-feed (a new peer appeared).
    announce: Notify,
    active: AtomicBool,
    attached: AtomicBool,
    /// Connection generation; callbacks of an older connection are ignored.
    generation: AtomicU64,
    /// Per route: point-to-point consumers are still on trade-feed.
    legacy_consumers: Vec<AtomicBool>,
    /// Why the lease cannot be taken, for readiness.
    lease_problem: Mutex<Option<String>>,
    stop: watch::Sender<bool>,
    /// The trade-feed connection and the lease have wound up.
    upstream_done: Notify,
    lease_done: Notify,
}

impl Attach {
    fn new(bridge: Arc<Bridge>) -> Arc<Attach> {
        let cfg = &bridge.config.attach;
        let role = if cfg.lease {
            Role::Standby
        } else {
            Role::Active
        };
        let cap = cfg.buffer_messages;
        let legacy_consumers = bridge
            .routes
            .routes()
            .iter()
            .map(|r| AtomicBool::new(cfg.legacy_consumers.get(&r.name).copied().unwrap_or(true)))
            .collect();
        metrics::gauge!(telemetry::ATTACH_ACTIVE).set(if role == Role::Active { 1.0 } else { 0.0 });
        Arc::new(Attach {
            state: Mutex::new(State {
                role,
                attached: false,
                outbox: VecDeque::new(),
                in_flight: Rendezvous::new(MAX_IN_FLIGHT + 1),
                shadow: Rendezvous::new(cap),
                legacy: Rendezvous::new(cap),
                own_id: None,
                peers: VecDeque::new(),
                replay_at: None,
                peer_active: false,
            }),
            work: Notify::new(),
            announce: Notify::new(),
            active: AtomicBool::new(role == Role::Active),
            attached: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            legacy_consumers,
            lease_problem: Mutex::new(None),
            stop: watch::channel(false).0,
            upstream_done: Notify::new(),
            lease_done: Notify::new(),
            bridge,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this bridge mirrors (holds the lease, or runs without one).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// `active` or `standby`, for readiness.
    pub fn role_name(&self) -> &'static str {
        if self.is_active() {
            "active"
        } else {
            "standby"
        }
    }

    /// Why the lease cannot be taken (JetStream missing, for instance).
    pub fn lease_problem(&self) -> Option<String> {
        self.lease_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_lease_problem(&self, problem: Option<String>) {
        *self.lease_problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    /// Whether a point-to-point route's consumers are still on trade-feed.
    pub fn legacy_consumers(&self, route: usize) -> bool {
        self.legacy_consumers[route].load(Ordering::Relaxed)
    }

    /// Declares where a point-to-point route's consumers are; `false` when
    /// no such route exists.
    /// What was declared for a point-to-point route; `None` if no such route.
    pub fn declared_legacy_consumers(&self, route_name: &str) -> Option<bool> {
        let r = self
            .bridge
            .routes
            .queue_routes()
            .find(|r| r.name == route_name)?;
        Some(self.legacy_consumers[r.index].load(Ordering::Relaxed))
    }

    pub fn set_legacy_consumers(&self, route_name: &str, present: bool) -> bool {
        let Some(r) = self
            .bridge
            .routes
            .queue_routes()
            .find(|r| r.name == route_name)
        else {
            return false;
        };
        let before = self.legacy_consumers[r.index].swap(present, Ordering::Relaxed);
        if before != present {
            tracing::info!(route = %route_name, present, "legacy consumers on trade-feed");
            self.bridge.membership_changed();
        }
        true
    }

    /// Takes or gives up the active role. Taking it sends what this bridge
    /// shadowed and the active one did not carry; giving it up keeps what
    /// was waiting for trade-feed as shadowed, for the new active bridge.
    fn set_role(&self, role: Role, why: &str) {
        let now = Instant::now();
        let mut st = self.state();
        if st.role == role {
            return;
        }
        st.role = role;
        match role {
            Role::Active => {
                let to_legacy = st.shadow.drain();
                let n_legacy = to_legacy.len();
                for (_, p) in to_legacy {
                    self.push_outbox(&mut st, p);
                }
                let mut n_nats = 0;
                for (_, out) in st.legacy.drain() {
                    if let Some(out) = out {
                        n_nats += 1;
                        self.bridge.enqueue(out);
                    }
                }
                self.active.store(true, Ordering::Relaxed);
                tracing::info!(
                    why,
                    replayed_to_trade_feed = n_legacy,
                    replayed_to_nats = n_nats,
                    "attach role: active, mirroring"
                );
            }
            Role::Standby => {
                // Point-to-point orders not sent yet stay queued: the queue
                // member, leaving the group now, gives them back to it (the
                // new active bridge never got them). Those sent and not
                // echoed most likely reached trade-feed, which is still there.
                let orders = take_orders(&mut st.outbox, |_| true);
                let mut waiting: Vec<Pending> =
                    st.in_flight.drain().into_iter().map(|(_, p)| p).collect();
                waiting.extend(st.outbox.drain(..));
                for p in waiting {
                    self.shadow(&mut st, p, now);
                }
                st.outbox.extend(orders);
                self.active.store(false, Ordering::Relaxed);
                tracing::warn!(why, "attach role: standby");
            }
        }
        metrics::gauge!(telemetry::BUFFERED).set(st.outbox.len() as f64);
        drop(st);
        metrics::gauge!(telemetry::ATTACH_ACTIVE).set(if role == Role::Active { 1.0 } else { 0.0 });
        self.work.notify_one();
        self.bridge.membership_changed();
    }

    /// Whether another bridge is known to hold the lease. Shadowed messages
    /// age only then: with nobody else active they wait for this bridge.
    fn set_peer_active(&self, yes: bool) {
        let mut st = self.state();
        if yes && !st.peer_active {
            let now = Instant::now();
            st.shadow.touch(now);
            st.legacy.touch(now);
        }
        st.peer_active = yes;
    }

    /// Queues a NATS -> legacy message (active) or shadows it (standby).
    fn to_legacy(&self, p: Pending) {
        let mut st = self.state();
        match st.role {
            Role::Active => {
                self.push_outbox(&mut st, p);
                metrics::gauge!(telemetry::BUFFERED).set(st.outbox.len() as f64);
                drop(st);
                self.work.notify_one();
            }
            Role::Standby => self.shadow(&mut st, p, Instant::now()),
        }
    }

    /// Gives the orders of `route` the queue group handed this bridge and
    /// trade-feed has not had back to the group, on the queue-member
    /// connection `client` after its member left (once each: see
    /// `server::requeue`), so that a NATS processor books them while
    /// trade-feed cannot. Those sent to trade-feed once without its echo
    /// may have been handed to its consumers before it went away: the log
    /// says how many.
    pub(super) async fn give_back_taken(&self, client: &async_nats::Client, route: usize) {
        let orders: Vec<Pending> = {
            let mut st = self.state();
            let orders = take_orders(&mut st.outbox, |p| p.route == route);
            metrics::gauge!(telemetry::BUFFERED).set(st.outbox.len() as f64);
            orders
        };
        if orders.is_empty() {
            return;
        }
        let unsure = orders.iter().filter(|p| p.sent).count();
        tracing::warn!(
            orders = orders.len(),
            unsure,
            "gave back {} orders taken for trade-feed to their queue group ({unsure} had been sent to trade-feed without its echo: those may be booked twice)",
            orders.len()
        );
        for p in orders {
            if let Some(msg) = p.given {
                crate::server::requeue(&self.bridge, client, p.route, (*msg).clone()).await;
            }
        }
    }

    /// Appends to the outbox; past `attach.buffer_messages` the oldest is
    /// dropped, counted and logged.
    fn push_outbox(&self, st: &mut State, p: Pending) {
        st.outbox.push_back(p);
        self.trim_outbox(st);
    }

    fn trim_outbox(&self, st: &mut State) {
        let cap = self.bridge.config.attach.buffer_messages;
        while st.outbox.len() > cap {
            let Some(old) = st.outbox.pop_front() else {
                break;
            };
            let route = &self.bridge.routes.get(old.route).name;
            telemetry::dropped(route, TO_SOCKETIO, "upstream_buffer_full", 1);
            self.bridge.warn_limited(
                "upstream_buffer_full",
                format_args!(
                    "trade-feed unreachable and attach.buffer_messages ({cap}) full: dropped the \
                     oldest message for {}",
                    old.topic
                ),
            );
        }
    }

    fn shadow(&self, st: &mut State, p: Pending, now: Instant) {
        let route = p.route;
        match st.shadow.hold(p.key.clone(), p, now) {
            Hold::Held => {}
            Hold::Seen(_) => {
                // The active bridge delivered it before NATS brought it here.
                let name = &self.bridge.routes.get(route).name;
                telemetry::suppressed(name, TO_SOCKETIO, "peer_delivered");
            }
            Hold::Evicted(old) => self.standby_overflow(old.route, TO_SOCKETIO),
        }
    }

    fn standby_overflow(&self, route: usize, direction: &'static str) {
        let name = &self.bridge.routes.get(route).name;
        telemetry::dropped(name, direction, "standby_buffer_full", 1);
        self.bridge.warn_limited(
            "standby_buffer_full",
            format_args!(
                "standby: attach.buffer_messages ({}) full, forgot the oldest message on route \
                 {name}; it is lost if the active bridge did not carry it",
                self.bridge.config.attach.buffer_messages
            ),
        );
    }

    /// A message the shared core turned into a legacy envelope.
    fn pending(&self, route: usize, topic: &str, env: &EnvelopeOut<'_>) -> Option<Pending> {
        let body = publish_arg(topic, env.kind, env.payload);
        let name = &self.bridge.routes.get(route).name;
        let limit = self.bridge.config.attach.max_payload_bytes;
        if body.len() > limit {
            telemetry::rejected(name, TO_SOCKETIO, "too_large");
            self.bridge.warn_limited(
                "to_socketio_too_large",
                format_args!(
                    "refused a {}-byte message for {topic} on route {name}: trade-feed accepts at \
                     most attach.max_payload_bytes ({limit}) and would drop the connection",
                    body.len()
                ),
            );
            return None;
        }
        let kind: Value = serde_json::from_str(env.kind.get()).unwrap_or(Value::Null);
        let payload: Option<Value> = env.payload.and_then(|p| serde_json::from_str(p.get()).ok());
        let key = match (&payload, env.payload) {
            (None, Some(_)) => {
                // Not representable as a value (a number beyond f64): no
                // content match possible; the sender id still tells echoes.
                format!("\u{1}{}", uuid::Uuid::new_v4())
            }
            _ => ledger::emitted_key(topic, &kind, payload.as_ref()),
        };
        Some(Pending {
            route,
            topic: topic.to_string(),
            body: body.into(),
            key,
            received: Instant::now(),
            given: None,
            sent: false,
        })
    }
}

/// Takes the point-to-point orders the queue group handed this bridge
/// that `pick` chooses out of `queue`, in order, leaving the rest in theirs.
fn take_orders(queue: &mut VecDeque<Pending>, pick: impl Fn(&Pending) -> bool) -> Vec<Pending> {
    let (orders, rest): (Vec<Pending>, Vec<Pending>) =
        queue.drain(..).partition(|p| p.given.is_some() && pick(p));
    queue.extend(rest);
    orders
}

/// The `publish` argument for trade-feed, assembled around the raw JSON of
/// type and payload so that they reach trade-feed byte for byte.
fn publish_arg(topic: &str, kind: &RawValue, payload: Option<&RawValue>) -> String {
    let topic = serde_json::to_string(topic).expect("a string serializes");
    let mut s = String::with_capacity(topic.len() + kind.get().len() + 48);
    s.push_str("{\"topic\":");
    s.push_str(&topic);
    s.push_str(",\"type\":");
    s.push_str(kind.get());
    if let Some(p) = payload {
        s.push_str(",\"payload\":");
        s.push_str(p.get());
    }
    s.push('}');
    s
}

/// Starts attach mode: the lease, the NATS subscriptions, the queue-group
/// members of point-to-point routes, and the connection to trade-feed.
///
/// `qclient`, the queue-member connection (it receives its own messages),
/// is given when the routes have a point-to-point route.
pub async fn start(
    bridge: Arc<Bridge>,
    client: async_nats::Client,
    qclient: Option<async_nats::Client>,
) -> anyhow::Result<Arc<Attach>> {
    let attach = Attach::new(bridge.clone());
    bridge.set_attach(attach.clone());
    if bridge.config.attach.lease {
        tokio::spawn(lease::keep(attach.clone(), client.clone()));
    } else {
        attach.lease_done.notify_one();
        tracing::info!("attach.lease = false: mirroring without a lease");
    }
    nats_side::subscribe_nats(&attach, &client).await?;
    if let Some(qclient) = qclient {
        crate::server::watch_no_responders(bridge.clone(), client.clone(), "primary").await?;
        // Orders given back to the group are published on the member's
        // connection, and the server answers "no responders" only to the
        // connection that published.
        crate::server::watch_no_responders(bridge.clone(), qclient.clone(), "queue").await?;
        let routes: Vec<usize> = bridge
            .routes
            .queue_routes()
            .filter(|r| r.direction.to_socketio())
            .map(|r| r.index)
            .collect();
        for route in routes {
            tokio::spawn(nats_side::run_queue_member(
                attach.clone(),
                qclient.clone(),
                route,
            ));
        }
    }
    tokio::spawn(upstream::run(attach.clone()));
    Ok(attach)
}

impl Attach {
    /// On shutdown: sends what waits for trade-feed (until `deadline`),
    /// gives the lease up so a standby takes over at once, and disconnects.
    pub async fn shutdown(&self, deadline: Instant) {
        // no more waiting for legacy clients to come back: send now
        self.state().replay_at = None;
        self.work.notify_one();
        let done = |st: &State| st.outbox.is_empty() && st.in_flight.is_empty();
        while !done(&self.state()) && self.attached.load(Ordering::Relaxed) && self.is_active() {
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let left = {
            let st = self.state();
            st.outbox.len() + st.in_flight.len()
        };
        if left > 0 && self.is_active() {
            tracing::error!(
                lost = left,
                "shutting down: messages for trade-feed were not delivered"
            );
        }
        let _ = self.stop.send(true);
        let wait = std::time::Duration::from_secs(3);
        let _ = tokio::time::timeout(wait, self.lease_done.notified()).await;
        let _ = tokio::time::timeout(wait, self.upstream_done.notified()).await;
    }
}
