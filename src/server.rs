//! Server mode: the bridge is the Socket.IO hub. It reproduces the legacy
//! trade-feed (rooms, `/*`, envelopes, System notices) and mirrors mapped
//! topics to NATS and back.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, OriginalUri};
use axum::http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::{FutureExt, StreamExt};
use serde_json::value::RawValue;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, SocketRef};
use socketioxide::handler::{ConnectHandler, FromMessageParts, MessageHandler, Value};
use socketioxide::socket::Socket;
use socketioxide::{BroadcastError, SendError, SocketError, SocketIo, TransportType};
use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};

use crate::bridge::{reply, Bridge, ClientInfo, QueueMembership, RoomCounts, CATCH_ALL};
use crate::envelope::{self, EnvelopeOut, Field, Reject};
use crate::route::Delivery;
use crate::telemetry::{self, TO_NATS, TO_SOCKETIO};
use crate::upgrade_guard::UpgradeGuard;

/// Builds the Socket.IO service and the HTTP app that serves it.
pub fn build(bridge: &Arc<Bridge>) -> (Router, SocketIo) {
    let cfg = &bridge.config.socketio;
    let primary = cfg.paths[0].clone();
    let (layer, io) = SocketIo::builder()
        .req_path(primary.clone())
        .max_payload(cfg.max_payload_bytes)
        // max_payload only bounds HTTP polling bodies; websocket messages have
        // their own limit (64 MiB by default). Node applies maxHttpBufferSize
        // to both transports, so the bridge does too.
        .ws_max_message_size(usize::try_from(cfg.max_payload_bytes).unwrap_or(usize::MAX))
        .ws_max_frame_size(usize::try_from(cfg.max_payload_bytes).unwrap_or(usize::MAX))
        .max_buffer_size(cfg.max_buffer_packets)
        .ws_read_buffer_size(WS_READ_BUFFER_BYTES)
        .ping_interval(cfg.ping_interval)
        .ping_timeout(cfg.ping_timeout)
        .build_layer();
    io.ns("/", Hub(bridge.clone()));

    let aliases: Arc<Vec<String>> = Arc::new(cfg.paths[1..].to_vec());
    let allowed: Option<Arc<Vec<String>>> = if cfg.cors_origins.iter().any(|o| o == "*") {
        None
    } else {
        Some(Arc::new(cfg.cors_origins.clone()))
    };
    let cors = cors_layer(&cfg.cors_origins, cfg.cors_credentials);
    let guard = Arc::new(UpgradeGuard::default());

    let sio = tower::ServiceBuilder::new()
        .layer(cors)
        .layer(axum::middleware::from_fn(
            move |req: Request<axum::body::Body>, next: axum::middleware::Next| {
                let allowed = allowed.clone();
                async move {
                    if let (Some(list), Some(origin)) =
                        (&allowed, req.headers().get(header::ORIGIN))
                    {
                        let ok = origin.to_str().is_ok_and(|o| list.iter().any(|a| a == o));
                        if !ok {
                            return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
                        }
                    }
                    next.run(req).await
                }
            },
        ))
        .layer(axum::middleware::map_request(
            move |mut req: Request<axum::body::Body>| {
                let aliases = aliases.clone();
                let primary = primary.clone();
                async move {
                    rewrite_alias(&mut req, &aliases, &primary);
                    detach_from_read_buffer(&mut req);
                    Ok::<_, Infallible>(req)
                }
            },
        ))
        .layer(axum::middleware::from_fn(
            move |req: Request<axum::body::Body>, next: axum::middleware::Next| {
                guard.clone().run(req, next)
            },
        ))
        .layer(layer)
        .service(Router::new().fallback(not_found));
    (Router::new().fallback_service(sio), io)
}

/// Each WebSocket's read buffer. Legacy messages are a few hundred bytes; a
/// larger one grows the buffer as needed. 1 KiB instead of socketioxide's 4
/// KiB saves 3 KiB per connected client (30 MB for 10,000 clients).
const WS_READ_BUFFER_BYTES: usize = 1024;

/// hyper hands over the URI and the header values as slices of the
/// connection's read buffer (16 KiB once a request head has been read), and
/// engineioxide keeps the request parts for the whole life of a socket, so
/// every connected client kept that buffer alive: half the memory of an
/// idle WebSocket client. The head is copied into one allocation of its own
/// size and the URI, the header values and axum's `OriginalUri` are pointed
/// at the copy; the buffer then goes when the upgraded connection first
/// reads. `OriginalUri` matters: axum's router stored it (a second handle on
/// the same URI) before any middleware runs, so copying the URI and headers
/// alone kept the buffer.
fn detach_from_read_buffer(req: &mut Request<axum::body::Body>) {
    let uri = req.uri().to_string();
    let size = uri.len() + req.headers().values().map(|v| v.len()).sum::<usize>();
    let mut own = bytes::BytesMut::with_capacity(size);
    own.extend_from_slice(uri.as_bytes());
    let mut values = Vec::with_capacity(req.headers().len());
    let mut name = None;
    for (n, v) in std::mem::take(req.headers_mut()) {
        if n.is_some() {
            name = n;
        }
        if let Some(name) = &name {
            own.extend_from_slice(v.as_bytes());
            values.push((name.clone(), v));
        }
    }
    let mut own = own.freeze();
    let copied_uri = Uri::from_maybe_shared(own.split_to(uri.len()));
    let headers = req.headers_mut();
    headers.reserve(values.len());
    for (name, v) in values {
        // A value the copy refuses (none that hyper accepts) keeps its slice.
        let value = match HeaderValue::from_maybe_shared(own.split_to(v.len())) {
            Ok(mut value) => {
                value.set_sensitive(v.is_sensitive());
                value
            }
            Err(_) => v,
        };
        headers.append(name, value);
    }
    if let Ok(uri) = copied_uri {
        if req.extensions().get::<OriginalUri>().is_some() {
            req.extensions_mut().insert(OriginalUri(uri.clone()));
        }
        *req.uri_mut() = uri;
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// The path a client asked for, kept when an alias was rewritten, so logs
/// show which clients still use which path.
#[derive(Clone)]
struct RequestedPath(String);

/// Requests on an alias path (e.g. `/trade-feed`) are served by the one
/// Socket.IO instance, so clients on every path share the same rooms.
fn rewrite_alias(req: &mut Request<axum::body::Body>, aliases: &[String], primary: &str) {
    let path = req.uri().path();
    let Some(alias) = aliases.iter().find(|a| {
        path.strip_prefix(a.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }) else {
        return;
    };
    let mut new = String::with_capacity(req.uri().path().len() + 16);
    new.push_str(primary);
    new.push_str(&path[alias.len()..]);
    if let Some(q) = req.uri().query() {
        new.push('?');
        new.push_str(q);
    }
    if let Ok(uri) = new.parse() {
        let requested = RequestedPath(path.to_string());
        *req.uri_mut() = uri;
        req.extensions_mut().insert(requested);
    }
}

fn cors_layer(origins: &[String], credentials: bool) -> CorsLayer {
    let methods = [Method::GET, Method::POST, Method::OPTIONS];
    if origins.iter().any(|o| o == "*") {
        CorsLayer::new()
            .allow_origin(Any)
            .allow_methods(methods)
            .allow_headers(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods(methods)
            .allow_headers(AllowHeaders::mirror_request())
            .allow_credentials(credentials)
    }
}

/// The default namespace. Event handlers are registered in the connect
/// middleware, which runs before the CONNECT reply is sent, so an event
/// emitted the moment a client is connected always finds its handler.
#[derive(Clone)]
struct Hub(Arc<Bridge>);

type MiddlewareFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(), Box<dyn std::fmt::Display + Send>>> + Send + 'a>>;

impl ConnectHandler<LocalAdapter, Hub> for Hub {
    fn call(&self, s: Arc<Socket<LocalAdapter>>, _auth: Option<Value>) {
        let info = client_info(&s);
        tracing::info!(
            id = %info.id,
            remote = %info.remote_addr,
            user_agent = %info.user_agent,
            transport = ?s.transport_type(),
            path = %info.path,
            "legacy client connected"
        );
        self.0
            .last_legacy_activity_ms
            .store(info.connected_at_ms, Ordering::Relaxed);
        self.0
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(s.id, info);
        let bridge = self.0.clone();
        SocketRef::from(s).on_disconnect(
            async move |s: SocketRef, reason: socketioxide::socket::DisconnectReason| {
                let removed = {
                    // `rooms` before `clients`, as everywhere.
                    let mut rooms = lock(&bridge.rooms);
                    let removed = lock(&bridge.clients).remove(&s.id);
                    if let Some(c) = &removed {
                        let mut after = c.topics.clone();
                        for t in &c.topics {
                            after.remove(t);
                            rooms.left(t, &after);
                        }
                    }
                    removed
                };
                bridge.membership_changed();
                bridge
                    .last_legacy_activity_ms
                    .store(envelope::now_ms(), Ordering::Relaxed);
                let dropped = removed.as_ref().map_or(0, |c| c.dropped);
                tracing::info!(id = %s.id, ?reason, dropped, "legacy client disconnected");
                if let Some(info) = removed {
                    bridge
                        .census
                        .departed(info, s.transport_type(), reason.to_string());
                }
            },
        );
    }

    fn call_middleware<'a>(
        &'a self,
        s: Arc<Socket<LocalAdapter>>,
        _auth: &'a Option<Value>,
    ) -> MiddlewareFuture<'a> {
        if self.0.shutting_down.load(Ordering::Relaxed) {
            return Box::pin(async {
                Err(Box::new("the bridge is shutting down") as Box<dyn std::fmt::Display + Send>)
            });
        }
        let socket = SocketRef::from(s);
        socket.on("subscribe", Event(self.0.clone(), Kind::Subscribe));
        socket.on("unsubscribe", Event(self.0.clone(), Kind::Unsubscribe));
        socket.on("unusbscribe", Event(self.0.clone(), Kind::Unsubscribe));
        socket.on("publish", Event(self.0.clone(), Kind::Publish));
        Box::pin(async { Ok(()) })
    }
}

fn client_info(s: &Socket<LocalAdapter>) -> ClientInfo {
    let parts = s.req_parts();
    let forwarded = parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_string());
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let remote_addr = match (forwarded, peer) {
        (Some(f), Some(p)) => format!("{f} (via {p})"),
        (Some(f), None) => f,
        (None, Some(p)) => p,
        (None, None) => "unknown".into(),
    };
    let now = envelope::now_ms();
    ClientInfo {
        id: s.id.as_str().to_string(),
        remote_addr,
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        path: parts
            .extensions
            .get::<RequestedPath>()
            .map_or_else(|| parts.uri.path().to_string(), |p| p.0.clone()),
        connected_at_ms: now,
        last_active_ms: now,
        topics: Default::default(),
        published: Default::default(),
        published_other_topics: 0,
        dropped: 0,
        warned_unsubscribed: false,
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Subscribe,
    Unsubscribe,
    Publish,
}

/// One legacy event. Handled synchronously, in the order the client sent
/// them: socketioxide would otherwise spawn a task per event and two
/// publishes from one client could overtake each other.
#[derive(Clone)]
struct Event(Arc<Bridge>, Kind);

impl MessageHandler<LocalAdapter, Event> for Event {
    fn call(&self, s: Arc<Socket<LocalAdapter>>, mut v: Value, ack_id: Option<i64>) {
        let ack = ack_id.map(|_| {
            let Ok(a) = AckSender::from_message_parts(&s, &mut v, &ack_id);
            a
        });
        let (text, binary) = match &v {
            Value::Str(text, bins) => (text.as_str(), bins.as_ref().is_some_and(|b| !b.is_empty())),
            Value::Bytes(_) => ("", true),
        };
        match self.1 {
            Kind::Publish => on_publish(&self.0, &s, text, binary, ack),
            Kind::Subscribe => on_subscription(&self.0, &s, text, true, ack),
            Kind::Unsubscribe => on_subscription(&self.0, &s, text, false, ack),
        }
    }
}

fn refuse(
    bridge: &Bridge,
    s: &Socket<LocalAdapter>,
    event: &str,
    why: Reject,
    route: &str,
    ack: Option<AckSender>,
) {
    telemetry::rejected(route, TO_NATS, why.label());
    bridge.warn_limited(
        why.label(),
        format_args!("refused `{event}` from client {}: {}", s.id, why.explain()),
    );
    reply(ack, Err(why.explain()));
}

fn on_subscription(
    bridge: &Bridge,
    s: &Socket<LocalAdapter>,
    text: &str,
    join: bool,
    ack: Option<AckSender>,
) {
    let event = if join { "subscribe" } else { "unsubscribe" };
    // An event that came as binary data (`Value::Bytes`, which the JSON
    // parser does not produce) has no text: no argument, not invalid JSON.
    let topic: String = match envelope::first_arg(text)
        .map_err(|r| {
            if r == Reject::InvalidJson && text.is_empty() {
                Reject::NoArgument
            } else {
                r
            }
        })
        .and_then(|a| serde_json::from_str::<String>(a.get()).map_err(|_| Reject::TopicNotString))
    {
        Ok(t) => t,
        Err(r) => return refuse(bridge, s, event, r, "", ack),
    };
    let Some(io) = bridge.io() else { return };
    // Joining or leaving and its notice are one step for every delivery
    // (see `deliver`).
    let mut rooms = lock(&bridge.rooms);
    let notice = if join {
        s.join(topic.clone());
        format!("New Joiner {} to topic {}", s.id, topic)
    } else {
        format!("{} has left {}", s.id, topic)
    };
    let mut left = false;
    {
        let mut clients = bridge.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get_mut(&s.id) {
            c.last_active_ms = envelope::now_ms();
            if join {
                rooms.joined(&topic, &c.topics);
                c.topics.insert(topic.clone());
            } else {
                left = c.topics.remove(&topic);
            }
        }
    }
    tracing::debug!(id = %s.id, %topic, event, "subscription");
    let payload = serde_json::to_string(&serde_json::json!({ "message": notice })).expect("json");
    let payload = RawValue::from_string(payload).expect("json");
    let env = EnvelopeOut {
        kind: envelope::message_type(),
        from: Field::Str("System"),
        topic: &topic,
        date: Field::Num(envelope::now_ms()),
        payload: Some(&payload),
    };
    deliver_held(bridge, &rooms, io, "", &topic, &env);
    if !join {
        // Counted out only now: the leaver gets its own notice.
        s.leave(topic.clone());
        if left {
            let clients = bridge.clients.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = clients.get(&s.id) {
                rooms.left(&topic, &c.topics);
            }
        }
    }
    drop(rooms);
    bridge.membership_changed();
    reply(ack, Ok(()));
}

fn on_publish(
    bridge: &Bridge,
    s: &Socket<LocalAdapter>,
    text: &str,
    binary: bool,
    ack: Option<AckSender>,
) {
    let received = Instant::now();
    bridge.metrics.legacy_publishes.increment(1);
    if binary {
        return refuse(bridge, s, "publish", Reject::BinaryPayload, "", ack);
    }
    let p = match envelope::parse_publish_event(text) {
        Ok(p) => p,
        Err(r) => return refuse(bridge, s, "publish", r, "", ack),
    };
    let Some(io) = bridge.io() else { return };
    let now = envelope::now_ms();
    bridge.last_legacy_activity_ms.store(now, Ordering::Relaxed);
    bridge.census.published(now);
    {
        let mut clients = bridge.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get_mut(&s.id) {
            c.last_active_ms = now;
            let listed = c.published.len();
            match c.published.get_mut(p.topic.as_ref()) {
                Some(n) => *n += 1,
                None if listed < crate::bridge::MAX_PUBLISHED_TOPICS
                    && p.topic.len() <= crate::bridge::MAX_LISTED_TOPIC_BYTES =>
                {
                    c.published.insert(p.topic.to_string(), 1);
                }
                None => c.published_other_topics += 1,
            }
        }
    }
    let from = Field::Str(s.id.as_str());
    let date = Field::Num(now);
    let mapped = bridge.mirror_for(&p.topic);
    // Everything that can refuse the message is checked before anyone gets it.
    let mut outbound = match &mapped {
        Some(m) => match bridge.prepare(m, &p.topic, p.kind, from, date, p.payload, received) {
            Ok(o) => Some(o),
            Err(why) => return reply(ack, Err(&why)),
        },
        None => None,
    };
    let env = EnvelopeOut {
        kind: p.kind,
        from,
        topic: &p.topic,
        date,
        payload: p.payload,
    };
    if let (Some(m), Some(mut out)) = (&mapped, outbound.take_if(|_| is_queue(bridge, &mapped))) {
        // Point-to-point: the queue group picks the one consumer, legacy
        // (through this bridge's member) or NATS.
        let name = &bridge.routes.get(m.route).name;
        deliver_to(bridge, io, Audience::Observers, name, &p.topic, &env);
        if bridge.nats_connected() {
            out.reply = Some(format!("{}.{}", bridge.no_responders_prefix(), m.route));
            out.ack = ack;
            bridge.enqueue_point_to_point(&p.topic, out);
        } else {
            let n = deliver_to(bridge, io, Audience::Room, name, &p.topic, &env);
            if n > 0 {
                bridge.forwarded_to_socketio(m.route, received, n);
                reply(ack, Ok(()));
            } else {
                bridge.undeliverable(m.route, "NATS is down and no legacy consumer is connected");
                reply(
                    ack,
                    Err("no consumer: NATS is down and no legacy consumer is connected"),
                );
            }
        }
        return;
    }
    let route_name = mapped
        .as_ref()
        .map_or("", |m| bridge.routes.get(m.route).name.as_str());
    deliver(bridge, io, route_name, &p.topic, &env);
    match outbound {
        Some(mut out) => {
            out.ack = ack;
            bridge.enqueue(out);
        }
        None => {
            bridge.metrics.unrouted.increment(1);
            tracing::debug!(topic = %p.topic, "publish on a topic with no route: served locally only");
            reply(ack, Ok(()));
        }
    }
}

fn is_queue(bridge: &Bridge, mapped: &Option<crate::bridge::Mirror>) -> bool {
    mapped
        .as_ref()
        .is_some_and(|m| bridge.routes.get(m.route).delivery == Delivery::Queue)
}

/// Competes in a point-to-point route's queue group while the legacy room
/// has at least one member, and hands each message it is given to the room,
/// as trade-feed did: the legacy side is one consumer of the group.
///
/// Exactly once, also while consumers come and go:
/// - The bridge joins the group when the room gets its first member
///   (`tradefeed_bridge_queue_member{route}` turns 1 once the server knows)
///   and leaves it when the room is empty, or when an operator declares the
///   route without legacy consumers (`PUT /api/legacy-consumers/<route>`
///   `false`, to drain a legacy consumer that cannot drain itself): what the
///   bridge already took still goes to the room, and nothing more.
/// - Leaving drains the subscription: the server stops choosing the bridge,
///   and the messages already on their way still arrive. Those, and any
///   message that finds the room empty, are given back to the group (once,
///   counted in `tradefeed_bridge_messages_requeued_total`), published on the
///   queue connection after its unsubscribe, so that the server cannot hand
///   them back to this bridge.
/// - When the queue-member connection drops, the member is `Rejoining`:
///   legacy publishes are held again until the member has confirmed its
///   subscription on the new connection (the client subscribes again by
///   itself, before anything the member sends after the reconnect).
/// - A message is handed to the room and a consumer joins or leaves under one
///   lock (`Bridge::rooms`, taken by `deliver_to`): a consumer that
///   unsubscribes gets every message handed to it before its own leave
///   notice, and none after. A consumer that waits for that notice before
///   disconnecting loses nothing.
pub async fn run_queue_member(bridge: Arc<Bridge>, qclient: async_nats::Client, route: usize) {
    let r = bridge.routes.get(route).clone();
    let subject = r.subject.as_str().to_string();
    let group = r.queue_group.clone().unwrap_or_default();
    let topic = r.topic.as_str().to_string();
    let member = metrics::gauge!(telemetry::QUEUE_MEMBER, "route" => r.name.clone());
    member.set(0.0);
    // The series exists from start-up, at 0.
    metrics::counter!(telemetry::REQUEUED, "route" => r.name.clone()).increment(0);
    let mut epoch = bridge.membership.subscribe();
    let mut sub: Option<async_nats::Subscriber> = None;
    let mut joined = crate::nats::Confirmation::open(
        &qclient,
        format!("_INBOX.{}.queue-joined.{route}", bridge.instance_id),
    )
    .await;
    loop {
        // socketioxide drops a disconnected socket from its rooms only after
        // the disconnect handler, which has counted it out here already.
        let members = lock(&bridge.rooms).members(&topic);
        let declared = bridge.legacy_consumers(route);
        let want = members > 0 && declared && !bridge.shutting_down.load(Ordering::Relaxed);
        if want && sub.is_none() {
            // Counted from before the subscribe: a shutdown meanwhile waits.
            bridge.queue_subscriptions.fetch_add(1, Ordering::AcqRel);
            match qclient
                .queue_subscribe(subject.clone(), group.clone())
                .await
            {
                Ok(s) => {
                    sub = Some(s);
                    let state =
                        confirm_member(&bridge, route, &qclient, &mut joined, &subject).await;
                    member.set(f64::from(state == QueueMembership::Joined));
                    tracing::info!(%subject, %group, members, "joined the queue group for legacy consumers");
                }
                Err(e) => {
                    bridge.queue_subscriptions.fetch_sub(1, Ordering::AcqRel);
                    bridge.set_queue_membership(route, QueueMembership::Failed);
                    tracing::warn!(%subject, "cannot join the queue group: {e}");
                }
            }
        } else if want && bridge.queue_membership(route) == QueueMembership::Rejoining {
            member.set(0.0);
            if qclient.connection_state() == async_nats::connection::State::Connected {
                let state = confirm_member(&bridge, route, &qclient, &mut joined, &subject).await;
                if state == QueueMembership::Joined {
                    member.set(1.0);
                    tracing::info!(%subject, %group, "the queue group has this bridge again after the NATS reconnect");
                }
            }
        } else if !want && bridge.leave_queue_membership(route, &topic) {
            // From here a publish of a consumer that joins the room is held
            // until the member has joined again.
            if let Some(s) = sub.take() {
                leave_queue_group(&bridge, &qclient, route, s, None).await;
                member.set(0.0);
                let why = left_because(
                    &bridge,
                    if members > 0 && !declared {
                        "declared without legacy consumers"
                    } else {
                        "no legacy consumer"
                    },
                );
                tracing::info!(%subject, %group, members, "left the queue group: {why}");
            }
        }
        let rejoining =
            sub.is_some() && bridge.queue_membership(route) == QueueMembership::Rejoining;
        tokio::select! {
            changed = epoch.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            // A reconnect is announced by an event; this retries a
            // confirmation that the connection lost again meanwhile.
            _ = tokio::time::sleep(REJOIN_RETRY), if rejoining => {}
            msg = async {
                match sub.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => match msg {
                Some(msg) => {
                    if !take_queued(&bridge, route, &msg) {
                        // The room emptied before its change was seen here:
                        // leave first, then give the message back; unless a
                        // consumer joined meanwhile, who may have published
                        // while the member still counted as joined.
                        if bridge.leave_queue_membership(route, &topic) {
                            if let Some(s) = sub.take() {
                                leave_queue_group(&bridge, &qclient, route, s, Some(msg)).await;
                                member.set(0.0);
                                let why = left_because(&bridge, "its last legacy consumer left");
                                tracing::info!(%subject, %group, "left the queue group: {why}");
                            }
                        } else if !take_queued(&bridge, route, &msg) {
                            requeue(&bridge, &qclient, route, msg).await;
                        }
                    }
                }
                None => {
                    bridge.set_queue_membership(route, QueueMembership::Out);
                    sub = None;
                    bridge.queue_subscriptions.fetch_sub(1, Ordering::AcqRel);
                    member.set(0.0);
                }
            },
        }
    }
}

/// Why a member left its queue group, for the log: `otherwise` unless the
/// bridge is stopping.
pub(crate) fn left_because(bridge: &Bridge, otherwise: &'static str) -> &'static str {
    if bridge.shutting_down.load(Ordering::Relaxed) {
        "the bridge is stopping"
    } else {
        otherwise
    }
}

/// How often a member whose connection came back retries confirming its
/// subscription, besides the retry at each reconnect.
const REJOIN_RETRY: Duration = Duration::from_millis(500);

/// Asks the server to confirm the queue subscription `subject` (made before
/// the call), then records where the member stands (which sends what was
/// held, once `Joined`) and returns it: `Rejoining` when the queue-member
/// connection is down or was lost meanwhile (the confirmation then says
/// nothing of the connection the subscription lives on now), else `Joined`,
/// also after the 5 s wait gave up on a connection that stayed up (logged:
/// a subject the bridge may not publish to, say).
async fn confirm_member(
    bridge: &Bridge,
    route: usize,
    qclient: &async_nats::Client,
    joined: &mut crate::nats::Confirmation,
    subject: &str,
) -> QueueMembership {
    let up = || qclient.connection_state() == async_nats::connection::State::Connected;
    let epoch = bridge.queue_link_epoch();
    let confirmed = up() && joined.confirm(qclient).await;
    if !up() {
        bridge.set_queue_membership(route, QueueMembership::Rejoining);
        tracing::info!(%subject, "the queue-member connection is down: orders for legacy consumers are held until it is back and the server has the subscription again");
        return QueueMembership::Rejoining;
    }
    if !confirmed {
        tracing::warn!(%subject, "NATS did not confirm the queue subscription within 5 s; counting it as joined");
    }
    bridge.confirm_queue_membership(route, epoch)
}

/// Leaves the queue group without losing what the server already sent this
/// member: drains the subscription, hands what still arrives to the room if
/// it has a member again, and gives the rest back to the group. The drain
/// ends when the server has answered it, so every message it sent this
/// member before it handled the unsubscribe is seen here (the bridge builds
/// with a patched async-nats for this: vendor/async-nats/PATCHES.md).
async fn leave_queue_group(
    bridge: &Arc<Bridge>,
    qclient: &async_nats::Client,
    route: usize,
    mut sub: async_nats::Subscriber,
    first: Option<async_nats::Message>,
) {
    let mut back: Vec<async_nats::Message> = first.into_iter().collect();
    if let Err(e) = sub.drain().await {
        tracing::warn!("draining the queue subscription failed: {e}");
    }
    // The drain ends with a round trip to the server; bounded in case the
    // connection is down meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(msg)) => {
                if !take_queued(bridge, route, &msg) {
                    back.push(msg);
                }
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!("the queue subscription did not finish draining within 5 s");
                break;
            }
        }
    }
    for msg in back {
        requeue(bridge, qclient, route, msg).await;
    }
    let _ = qclient.flush().await;
    bridge.queue_subscriptions.fetch_sub(1, Ordering::AcqRel);
}

/// Hands a message the queue group gave this bridge to the legacy room.
/// `false` when the room has nobody to take it, and once the bridge is
/// stopping (what a socket is handed as the process exits may never be
/// written): the caller gives it back.
fn take_queued(bridge: &Arc<Bridge>, route: usize, msg: &async_nats::Message) -> bool {
    if bridge.shutting_down.load(Ordering::Relaxed) {
        return false;
    }
    let Some(io) = bridge.io() else { return false };
    let received = Instant::now();
    let mut handed = true;
    bridge.queued_to_legacy(msg, route, |route, topic, env| {
        let name = &bridge.routes.get(route).name;
        let n = deliver_to(bridge, io, Audience::Room, name, topic, env);
        handed = n > 0;
        if handed {
            bridge.forwarded_to_socketio(route, received, n);
        }
    });
    handed
}

/// Gives a point-to-point message back to the queue group, once. Published
/// on `qclient`, the connection whose queue subscription let it go, after
/// its unsubscribe, so the server does not choose this bridge again. Its
/// reply subject carries a token: if the server answers "no responders"
/// (no consumer anywhere just then), `watch_no_responders` publishes it
/// again until some consumer takes it or `GIVE_BACK_RETRY_FOR` has passed,
/// as a producer that retries unconsumed orders would (the answer comes to
/// the bridge, which published it, not to the producer).
pub(crate) async fn requeue(
    bridge: &Arc<Bridge>,
    qclient: &async_nats::Client,
    route: usize,
    msg: async_nats::Message,
) {
    let mut headers = msg.headers.clone().unwrap_or_default();
    if headers.get(H_REQUEUED).is_some() {
        bridge.undeliverable(
            route,
            "its legacy consumer left and it was already given back once",
        );
        return;
    }
    headers.insert(H_REQUEUED, bridge.instance_id.as_str());
    let now = Instant::now();
    let kept = crate::bridge::GivenBackMsg {
        route,
        subject: msg.subject.clone(),
        headers,
        payload: msg.payload.clone(),
        since: now,
        sent: now,
    };
    let name = &bridge.routes.get(route).name;
    if give_back(bridge, qclient, kept).await {
        metrics::counter!(telemetry::REQUEUED, "route" => name.clone()).increment(1);
        tracing::info!(subject = %msg.subject, "gave a point-to-point message back: no legacy consumer is left");
    }
}

/// Marks a message the bridge gave back to its queue group.
const H_REQUEUED: &str = "Tradefeed-Bridge-Requeued";

/// How long the bridge keeps publishing again a given-back message that
/// found no consumer, and how long it waits before its second try.
const GIVE_BACK_RETRY_FOR: Duration = Duration::from_secs(10);
const GIVE_BACK_RETRY_EVERY: Duration = Duration::from_millis(25);

/// Publishes a given-back message, kept under a reply token for its "no
/// responders" answer. `false` (counted undeliverable) if it cannot be sent.
async fn give_back(
    bridge: &Arc<Bridge>,
    client: &async_nats::Client,
    mut m: crate::bridge::GivenBackMsg,
) -> bool {
    let prefix = bridge.no_responders_prefix();
    let route = m.route;
    m.sent = Instant::now();
    let (subject, headers, payload) = (m.subject.clone(), m.headers.clone(), m.payload.clone());
    let token = lock(&bridge.given_back).keep(m);
    let reply = match token {
        Some(t) => format!("{prefix}.{route}.{t}"),
        // Too many kept: one try, whose "no responders" is only counted.
        None => format!("{prefix}.{route}"),
    };
    match client
        .publish_with_reply_and_headers(subject, reply, headers, payload)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            if let Some(t) = token {
                lock(&bridge.given_back).take(t);
            }
            bridge.undeliverable(
                route,
                &format!("giving it back to the queue group failed: {e}"),
            );
            false
        }
    }
}

/// Counts point-to-point messages that reached no consumer anywhere: the
/// server answers their reply subject with "no responders". A message the
/// bridge gave back (its reply has a token) is published again on the same
/// connection a little later, for a while, before it counts.
///
/// `label` names the connection (`client`) for the shutdown's marker: the
/// server answers in order on a connection, so once its answer to a marker
/// `client` published with the reply subject `stop_marker(label)` is back
/// here, every answer to what it published before has been counted.
pub async fn watch_no_responders(
    bridge: Arc<Bridge>,
    client: async_nats::Client,
    label: &'static str,
) -> anyhow::Result<()> {
    let prefix = format!("{}.", bridge.no_responders_prefix());
    let marker = stop_marker(&bridge, label);
    let mut sub = client.subscribe(format!("{prefix}>")).await?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if msg.subject.as_str() == marker {
                bridge.stop_markers.send_modify(|n| *n += 1);
                continue;
            }
            if msg.status != Some(async_nats::StatusCode::NO_RESPONDERS) {
                continue;
            }
            let mut parts = msg
                .subject
                .strip_prefix(prefix.as_str())
                .unwrap_or_default()
                .split('.');
            let route = parts
                .next()
                .and_then(|r| r.parse::<usize>().ok())
                .filter(|r| *r < bridge.routes.routes().len());
            let Some(route) = route else { continue };
            let kept = parts
                .next()
                .and_then(|t| t.parse::<u64>().ok())
                .and_then(|t| lock(&bridge.given_back).take(t));
            match kept {
                Some(m)
                    if m.since.elapsed() < GIVE_BACK_RETRY_FOR
                        && !bridge.shutting_down.load(Ordering::Relaxed) =>
                {
                    let (bridge, client) = (bridge.clone(), client.clone());
                    // Slower as the wait gets longer: 25 ms at first, 1 s at most.
                    let delay = (m.since.elapsed() / 4)
                        .clamp(GIVE_BACK_RETRY_EVERY, Duration::from_secs(1));
                    tokio::spawn(async move {
                        // At shutdown: one last try at once.
                        let now = bridge.retry_now.notified();
                        if !bridge.shutting_down.load(Ordering::Relaxed) {
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = now => {}
                            }
                        }
                        give_back(&bridge, &client, m).await;
                    });
                }
                Some(_) if bridge.shutting_down.load(Ordering::Relaxed) => bridge.undeliverable(
                    route,
                    "given back to its queue group, it found no consumer before the bridge stopped",
                ),
                Some(_) => bridge.undeliverable(
                    route,
                    &format!(
                        "given back after its legacy consumer left, it found no consumer for {} s",
                        GIVE_BACK_RETRY_FOR.as_secs()
                    ),
                ),
                None => bridge.undeliverable(
                    route,
                    "no consumer anywhere (no NATS member in the queue group, no legacy consumer)",
                ),
            }
        }
    });
    Ok(())
}

/// The subject of a connection's shutdown marker (`watch_no_responders`).
pub fn stop_marker(bridge: &Bridge, label: &str) -> String {
    format!("{}.stopping.{label}", bridge.no_responders_prefix())
}

/// Emits an envelope to every socket in the topic's room and in `/*`, once
/// each, and returns how many sockets it was queued for. The envelope is
/// encoded once and the same bytes are queued for every socket (a
/// broadcast). A socket whose outgoing buffer is full misses the message:
/// counted for the route and for the client, and logged.
///
/// After an overflow the bridge emits socket by socket for a while
/// (`OVERFLOW_MODE_MS`), which names each client that misses a message as
/// it happens; a broadcast only says how many did.
///
/// Rooms do not change meanwhile (`Bridge::rooms`): a client that
/// unsubscribes gets each message before its leave notice, or not at all.
pub fn deliver(
    bridge: &Bridge,
    io: &SocketIo,
    route: &str,
    topic: &str,
    env: &EnvelopeOut<'_>,
) -> usize {
    let rooms = lock(&bridge.rooms);
    deliver_held(bridge, &rooms, io, route, topic, env)
}

/// `deliver`, for a caller that holds `Bridge::rooms`.
fn deliver_held(
    bridge: &Bridge,
    rooms: &RoomCounts,
    io: &SocketIo,
    route: &str,
    topic: &str,
    env: &EnvelopeOut<'_>,
) -> usize {
    let recipients = rooms.recipients(topic);
    let catch_all = rooms.members(CATCH_ALL) > 0;
    if recipients == 0 {
        return 0;
    }
    let to = || {
        let to = io.within(topic.to_string());
        if catch_all && topic != CATCH_ALL {
            to.within(CATCH_ALL)
        } else {
            to
        }
    };
    if bridge.clients_overflowing() {
        return emit_each(bridge, to().sockets(), route, topic, env);
    }
    let (full, closed) = match to().emit("publish", env).now_or_never() {
        Some(Ok(())) => (0, 0),
        Some(Err(BroadcastError::Socket(errors))) => {
            let full = errors
                .iter()
                .filter(|e| matches!(e, SocketError::InternalChannelFull))
                .count();
            (full, errors.len() - full)
        }
        Some(Err(e)) => {
            tracing::error!(%topic, "could not broadcast a message: {e}");
            (0, recipients)
        }
        // The local adapter completes at once; another adapter would not.
        None => {
            tracing::error!(%topic, "the Socket.IO adapter did not complete a broadcast at once");
            (0, recipients)
        }
    };
    if full > 0 {
        bridge.note_overflow(OVERFLOW_MODE_MS);
        telemetry::dropped(route, TO_SOCKETIO, "client_buffer_full", full as u64);
        name_full_clients(bridge, &to().sockets(), topic, full);
    }
    recipients.saturating_sub(full + closed)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Finds the `full` sockets a broadcast could not queue for and counts the
/// miss for each client. The probe is an emit whose data cannot be
/// serialised: socketioxide reserves a buffer slot first, failing at once
/// when the buffer is full, and otherwise gives the slot back without
/// sending anything. A client whose writer freed a slot in between is not
/// found (its miss stays counted for the route): only possible for a client
/// that is still reading, never for a stalled one.
fn name_full_clients(bridge: &Bridge, sockets: &[SocketRef], topic: &str, full: usize) {
    let mut found = 0;
    for s in sockets {
        if found == full {
            break;
        }
        if let Err(SendError::Socket(SocketError::InternalChannelFull)) =
            s.emit("publish", &Unsendable)
        {
            client_missed(bridge, s, topic);
            found += 1;
        }
    }
    if found < full {
        tracing::debug!(%topic, missed = full, named = found, "some clients caught up before they were named");
    }
}

/// Data that always fails to serialise, for `name_full_clients`.
struct Unsendable;

impl serde::Serialize for Unsendable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("a probe, never sent"))
    }
}

/// Counts a message a client missed because its buffer was full, and warns.
fn client_missed(bridge: &Bridge, s: &SocketRef, topic: &str) {
    let total = {
        let mut clients = bridge.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.get_mut(&s.id).map_or(0, |c| {
            c.dropped += 1;
            c.dropped
        })
    };
    bridge.warn_limited(
        "client_buffer_full",
        format_args!(
            "client {} is falling behind: a message on {topic} was dropped for it \
             ({total} dropped so far; socketio.max_buffer_packets = {})",
            s.id, bridge.config.socketio.max_buffer_packets
        ),
    );
}

/// How long the bridge emits socket by socket after a client's buffer
/// overflowed, so that each further miss is counted for its client.
const OVERFLOW_MODE_MS: u64 = 1000;

/// Who receives a point-to-point message on the legacy side.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// The topic's room: the legacy consumers.
    Room,
    /// `/*` members outside the room: observers, who see what legacy
    /// clients publish as they did on trade-feed.
    Observers,
}

pub fn deliver_to(
    bridge: &Bridge,
    io: &SocketIo,
    audience: Audience,
    route: &str,
    topic: &str,
    env: &EnvelopeOut<'_>,
) -> usize {
    let _rooms = bridge.rooms.lock().unwrap_or_else(|e| e.into_inner());
    let sockets = match audience {
        Audience::Room => io.within(topic.to_string()).sockets(),
        Audience::Observers => io.within("/*").except(topic.to_string()).sockets(),
    };
    emit_each(bridge, sockets, route, topic, env)
}

fn emit_each(
    bridge: &Bridge,
    sockets: Vec<SocketRef>,
    route: &str,
    topic: &str,
    env: &EnvelopeOut<'_>,
) -> usize {
    let mut delivered = 0;
    for s in sockets {
        match s.emit("publish", env) {
            Ok(()) => delivered += 1,
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                telemetry::dropped(route, TO_SOCKETIO, "client_buffer_full", 1);
                client_missed(bridge, &s, topic);
            }
            Err(SendError::Socket(SocketError::Closed)) => {}
            Err(e) => tracing::error!(id = %s.id, "could not encode a message: {e}"),
        }
    }
    delivered
}

/// Messages taken from a NATS subscription and waiting for delivery to the
/// legacy side. When they arrive faster than they can be delivered, the
/// bridge drops (and counts) them here rather than letting the NATS client
/// drop them in its own buffer, whose losses it reports only approximately.
const NATS_TO_LEGACY_QUEUE: usize = 65_536;

/// Delivers NATS messages on the routes' subjects to the local rooms.
pub async fn subscribe_nats(bridge: Arc<Bridge>, client: async_nats::Client) -> anyhow::Result<()> {
    for (pattern, serves) in bridge.routes.subscriptions() {
        let sub = client.subscribe(pattern.clone()).await?;
        tracing::info!(subject = %pattern, "subscribed on NATS");
        let (tx, rx) = tokio::sync::mpsc::channel(NATS_TO_LEGACY_QUEUE);
        tokio::spawn(take_from_nats(bridge.clone(), sub, tx));
        tokio::spawn(deliver_from_nats(bridge.clone(), rx, serves));
    }
    Ok(())
}

/// Moves messages from the subscription into the bridge's queue, as fast
/// as they come; a full queue drops the message, counted on its route.
async fn take_from_nats(
    bridge: Arc<Bridge>,
    mut sub: async_nats::Subscriber,
    tx: tokio::sync::mpsc::Sender<async_nats::Message>,
) {
    while let Some(msg) = sub.next().await {
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(msg)) = tx.try_send(msg) {
            let route = bridge
                .routes
                .to_topic(msg.subject.as_str())
                .map_or("", |m| bridge.routes.get(m.route).name.as_str());
            telemetry::dropped(route, TO_SOCKETIO, "bridge_queue_full", 1);
            bridge.warn_limited(
                "nats_to_legacy_queue_full",
                format_args!(
                    "dropped a message on {}: {NATS_TO_LEGACY_QUEUE} messages from NATS already \
                     wait for the legacy side",
                    msg.subject
                ),
            );
        }
    }
}

async fn deliver_from_nats(
    bridge: Arc<Bridge>,
    mut rx: tokio::sync::mpsc::Receiver<async_nats::Message>,
    serves: Vec<usize>,
) {
    while let Some(msg) = rx.recv().await {
        let Some(io) = bridge.io() else { continue };
        let received = Instant::now();
        bridge.nats_to_legacy(&msg, &serves, |route, topic, env| {
            let name = &bridge.routes.get(route).name;
            let n = deliver(&bridge, io, name, topic, env);
            bridge.forwarded_to_socketio(route, received, n);
        });
    }
}

/// Reports clients that stay subscribed to nothing: after a hub restart a
/// client that subscribes only once at start-up (TraderX's Java subscriber)
/// is connected but deaf.
pub async fn watch_idle_clients(bridge: Arc<Bridge>) {
    let after = bridge.config.socketio.idle_subscription_warning;
    let gauge = metrics::gauge!(telemetry::CLIENTS_UNSUBSCRIBED);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = envelope::now_ms();
        let mut idle = 0u32;
        let mut clients = bridge.clients.lock().unwrap_or_else(|e| e.into_inner());
        for c in clients.values_mut() {
            // A client that publishes without subscribing (trade-service) is
            // doing its job; one that does neither is the deaf subscriber.
            if c.topics.is_empty()
                && c.published.is_empty()
                && now.saturating_sub(c.connected_at_ms) >= after.as_millis() as u64
            {
                idle += 1;
                if !c.warned_unsubscribed {
                    c.warned_unsubscribed = true;
                    tracing::warn!(
                        id = %c.id,
                        remote = %c.remote_addr,
                        user_agent = %c.user_agent,
                        "legacy client has subscribed to nothing {}s after connecting; a subscriber that \
                         subscribes only at start-up must be restarted after a bridge restart",
                        after.as_secs()
                    );
                }
            }
        }
        gauge.set(idle as f64);
    }
}

/// Connected clients by transport, for metrics and the census.
pub fn clients_by_transport(io: &SocketIo) -> (usize, usize) {
    let mut polling = 0;
    let mut websocket = 0;
    for s in io.sockets() {
        match s.transport_type() {
            TransportType::Polling => polling += 1,
            TransportType::Websocket => websocket += 1,
        }
    }
    (polling, websocket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_request_head_lets_go_of_the_read_buffer() {
        let head =
            Bytes::from_static(b"/socket.io/?EIO=4&transport=websocketnode-XMLHttpRequestsecret");
        let buffer = Bytes::from(head.to_vec());
        let uri = Uri::from_maybe_shared(buffer.slice(0..37)).unwrap();
        let mut req = Request::builder()
            .uri(uri.clone())
            .body(axum::body::Body::empty())
            .unwrap();
        let agent = HeaderValue::from_maybe_shared(buffer.slice(37..56)).unwrap();
        let mut secret = HeaderValue::from_maybe_shared(buffer.slice(56..)).unwrap();
        secret.set_sensitive(true);
        req.headers_mut().append(header::USER_AGENT, agent.clone());
        req.headers_mut().append(header::COOKIE, secret.clone());
        req.headers_mut().append(header::COOKIE, agent.clone());
        req.extensions_mut().insert(OriginalUri(uri.clone()));
        drop((agent, secret));

        detach_from_read_buffer(&mut req);
        drop(uri);

        assert!(buffer.is_unique(), "something still holds the read buffer");
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(
            req.extensions()
                .get::<OriginalUri>()
                .map(|u| u.0.to_string()),
            Some("/socket.io/?EIO=4&transport=websocket".to_string())
        );
        assert_eq!(req.headers()[header::USER_AGENT], "node-XMLHttpRequest");
        let cookies: Vec<_> = req.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["secret", "node-XMLHttpRequest"]);
        assert!(cookies[0].is_sensitive());
        assert!(!cookies[1].is_sensitive());
    }
}
