//! Attach mode: the bridge joins a running trade-feed as an ordinary
//! Socket.IO client and mirrors the route table both ways.
//!
//! - Legacy -> NATS: the bridge subscribes on trade-feed to what the routes
//!   need (literal topics as such, `/*` when a template has placeholders) and
//!   publishes each legacy message once on its subject.
//! - NATS -> legacy: it emits `publish` on the legacy topic. trade-feed sends
//!   that publish back to the bridge (it is subscribed); such echoes are
//!   recognised by sender id and, because the id changes with every
//!   reconnect, by content within `attach.echo_window`, and never mirrored.
//! - While trade-feed is unreachable, NATS -> legacy messages wait in a
//!   bounded buffer and are sent in order after reconnecting; past the bound
//!   the oldest are dropped, counted and logged.
//! - One active attacher per trade-feed: a lease in a NATS key-value bucket.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rust_socketio::asynchronous::{Client as SioClient, ClientBuilder};
use rust_socketio::{Payload, TransportType};
use serde_json::value::{to_raw_value, RawValue};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::bridge::Bridge;
use crate::envelope::{self, Field};
use crate::nats::backoff;
use crate::route::Delivery;
use crate::telemetry::{self, TO_NATS, TO_SOCKETIO};

/// Topics under this prefix are the bridge's own probes on trade-feed.
const PROBE_PREFIX: &str = "/tradefeed-bridge/";

/// A NATS -> legacy message waiting for trade-feed.
struct Pending {
    route: usize,
    received: Instant,
    topic: String,
    kind: Value,
    payload: Value,
}

pub struct Attach {
    bridge: Arc<Bridge>,
    /// The connected client, when trade-feed is reachable.
    client: tokio::sync::Mutex<Option<SioClient>>,
    connected: AtomicBool,
    /// This bridge mirrors (holds the lease, or runs without one).
    active: AtomicBool,
    buffer: Mutex<VecDeque<Pending>>,
    /// Socket id trade-feed gave this connection (learned from the probe).
    own_id: Mutex<Option<String>>,
    /// Recent publishes of ours: content key -> (count, first sent).
    echoes: Mutex<HashMap<String, (u32, Instant)>>,
    /// Connection generation, for the probe topic.
    generation: AtomicU64,
    dead: Notify,
    /// Per route: point-to-point consumers are still on trade-feed.
    legacy_consumers: Vec<AtomicBool>,
}

impl Attach {
    pub fn new(bridge: Arc<Bridge>) -> Arc<Attach> {
        let lease = bridge.config.attach.lease;
        let bridge_for_flags = bridge.clone();
        Arc::new(Attach {
            bridge,
            client: tokio::sync::Mutex::new(None),
            connected: AtomicBool::new(false),
            active: AtomicBool::new(!lease),
            buffer: Mutex::new(VecDeque::new()),
            own_id: Mutex::new(None),
            echoes: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            dead: Notify::new(),
            legacy_consumers: bridge_routes_flags(&bridge_for_flags),
        })
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Topics the bridge subscribes on trade-feed.
    fn upstream_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = Vec::new();
        for r in self
            .bridge
            .routes
            .routes()
            .iter()
            .filter(|r| r.direction.to_nats())
        {
            let t = if r.topic.is_literal() {
                r.topic.as_str().to_string()
            } else {
                "/*".to_string()
            };
            if !topics.contains(&t) {
                topics.push(t);
            }
        }
        if topics.iter().any(|t| t == "/*") {
            topics.retain(|t| t == "/*");
        }
        topics
    }

    /// Runs until the process stops: keeps a connection to trade-feed with
    /// capped, jittered back-off (the first connect is retried too).
    pub async fn run(self: Arc<Self>) {
        let cfg = &self.bridge.config.attach;
        let mut attempt = 0usize;
        let mut down_since = Instant::now();
        let reconnects = metrics::counter!(telemetry::UPSTREAM_RECONNECTS);
        let connected_gauge = metrics::gauge!(telemetry::UPSTREAM_CONNECTED);
        loop {
            if self.bridge.shutting_down.load(Ordering::Relaxed) {
                return;
            }
            match self.clone().connect_once().await {
                Ok(client) => {
                    if attempt > 0 {
                        reconnects.increment(1);
                    }
                    attempt = 0;
                    let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    *self.own_id.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    if let Err(e) = self.subscribe_all(&client, generation).await {
                        tracing::warn!("subscribing on trade-feed failed: {e}; reconnecting");
                        let _ = client.disconnect().await;
                        continue;
                    }
                    *self.client.lock().await = Some(client);
                    self.connected.store(true, Ordering::Relaxed);
                    self.bridge
                        .upstream_connected
                        .store(true, Ordering::Relaxed);
                    connected_gauge.set(1.0);
                    tracing::info!(
                        url = %cfg.url,
                        outage_ms = down_since.elapsed().as_millis() as u64,
                        topics = ?self.upstream_topics(),
                        "attached to trade-feed"
                    );
                    self.flush_buffer().await;
                    self.dead.notified().await;
                    self.connected.store(false, Ordering::Relaxed);
                    self.bridge
                        .upstream_connected
                        .store(false, Ordering::Relaxed);
                    connected_gauge.set(0.0);
                    down_since = Instant::now();
                    if let Some(c) = self.client.lock().await.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(1), c.disconnect()).await;
                    }
                    if self.bridge.shutting_down.load(Ordering::Relaxed) {
                        return;
                    }
                    tracing::warn!(url = %cfg.url, "lost trade-feed; reconnecting");
                }
                Err(e) => {
                    attempt += 1;
                    let delay =
                        backoff(attempt, cfg.reconnect_delay_max).max(cfg.reconnect_delay_min);
                    self.bridge.warn_limited(
                        "upstream_connect",
                        format_args!(
                            "cannot reach trade-feed at {} (attempt {attempt}): {e}; retrying in {delay:?}",
                            cfg.url
                        ),
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn connect_once(self: Arc<Self>) -> Result<SioClient, String> {
        let cfg = &self.bridge.config.attach;
        let url = format!(
            "{}{}/",
            cfg.url.trim_end_matches('/'),
            cfg.path.trim_end_matches('/')
        );
        let on_publish = self.clone();
        let on_error = self.clone();
        let on_close = self.clone();
        // `connect()` returns before trade-feed has acknowledged the namespace;
        // an emit before that acknowledgement makes the Node server drop the
        // connection ("invalid state"), so wait for the `connect` event.
        let (acked_tx, acked_rx) = tokio::sync::watch::channel(false);
        let acked_tx = Arc::new(acked_tx);
        let mut builder = ClientBuilder::new(url)
            .namespace("/")
            .transport_type(TransportType::Any)
            .reconnect(false)
            .on("publish", move |payload: Payload, _c: SioClient| {
                let me = on_publish.clone();
                async move { me.on_upstream(payload) }.boxed()
            })
            .on("error", move |payload: Payload, _c: SioClient| {
                let me = on_error.clone();
                async move {
                    tracing::warn!("trade-feed connection error: {payload:?}");
                    me.dead.notify_one();
                }
                .boxed()
            })
            .on("open", move |_p: Payload, _c: SioClient| {
                let tx = acked_tx.clone();
                async move {
                    let _ = tx.send(true);
                }
                .boxed()
            })
            .on("close", move |_p: Payload, _c: SioClient| {
                let me = on_close.clone();
                async move { me.dead.notify_one() }.boxed()
            });
        for (k, v) in &cfg.headers {
            builder = builder.opening_header(k.as_str(), v.expose());
        }
        if let Some(token) = &cfg.auth_token {
            builder = builder.auth(json!({ "token": token.expose() }));
        }
        let client = match tokio::time::timeout(Duration::from_secs(10), builder.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        let mut acked = acked_rx;
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(10), acked.wait_for(|a| *a)).await,
            Ok(Ok(_))
        );
        match ok {
            true => Ok(client),
            false => {
                let _ = client.disconnect().await;
                Err("trade-feed did not acknowledge the connection".into())
            }
        }
    }

    async fn subscribe_all(&self, client: &SioClient, generation: u64) -> Result<(), String> {
        let probe = format!("{PROBE_PREFIX}{}/{generation}", self.bridge.instance_id);
        client
            .emit("subscribe", json!(probe))
            .await
            .map_err(|e| e.to_string())?;
        for topic in self.upstream_topics() {
            client
                .emit("subscribe", json!(topic))
                .await
                .map_err(|e| e.to_string())?;
        }
        // Wait briefly for the probe's join notice, which names our socket id.
        for _ in 0..100 {
            if self
                .own_id
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// A `publish` event from trade-feed.
    fn on_upstream(&self, payload: Payload) {
        let Payload::Text(values) = payload else {
            telemetry::rejected("", TO_NATS, "binary_payload");
            return;
        };
        let Some(env) = values.into_iter().next() else {
            return;
        };
        let topic = env.get("topic").and_then(Value::as_str).unwrap_or_default();
        let from = env.get("from").and_then(Value::as_str).unwrap_or_default();
        if from == "System" {
            if topic.starts_with(PROBE_PREFIX) {
                self.learn_own_id(&env, topic);
            }
            return;
        }
        if topic.starts_with(PROBE_PREFIX) || !self.is_active() {
            return;
        }
        let Some(mapped) = self.bridge.routes.to_subject(topic) else {
            tracing::debug!(%topic, "trade-feed message on a topic with no route");
            return;
        };
        let route_name = self.bridge.routes.get(mapped.route).name.clone();
        let kind = env.get("type").cloned().unwrap_or_else(|| json!("message"));
        let payload = env.get("payload").cloned();
        let own = self
            .own_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let by_content = self.take_echo(topic, &kind, payload.as_ref());
        if own.as_deref() == Some(from) || by_content {
            telemetry::suppressed(
                &route_name,
                TO_NATS,
                if by_content {
                    "own_echo"
                } else {
                    "own_echo_id"
                },
            );
            return;
        }
        let raw = |v: &Value| to_raw_value(v).expect("json value");
        let kind_raw = raw(&kind);
        let from_raw = raw(env.get("from").unwrap_or(&Value::Null));
        let date_raw = env.get("date").map(raw);
        let payload_raw = payload.as_ref().map(raw);
        let date = match &date_raw {
            Some(d) => Field::Raw(d),
            None => Field::Num(envelope::now_ms()),
        };
        let queue = self.bridge.routes.get(mapped.route).delivery == Delivery::Queue;
        if queue && self.legacy_consumers(mapped.route) {
            // trade-feed already handed it to its own consumers.
            telemetry::suppressed(&route_name, TO_NATS, "consumed_on_trade_feed");
            return;
        }
        if let Ok(mut out) = self.bridge.prepare(
            &mapped,
            topic,
            &kind_raw,
            Field::Raw(&from_raw),
            date,
            payload_raw.as_deref(),
            Instant::now(),
        ) {
            if queue {
                out.reply = Some(format!(
                    "{}.{}",
                    self.bridge.no_responders_prefix(),
                    mapped.route
                ));
            }
            self.bridge.enqueue(out);
        }
    }

    /// Whether a point-to-point route's consumers are still on trade-feed.
    pub fn legacy_consumers(&self, route: usize) -> bool {
        self.legacy_consumers[route].load(Ordering::Relaxed)
    }

    /// Declares where a point-to-point route's consumers are; `false` when
    /// no such route exists.
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

    fn learn_own_id(&self, env: &Value, topic: &str) {
        let want = format!("{PROBE_PREFIX}{}/", self.bridge.instance_id);
        if !topic.starts_with(&want) {
            return;
        }
        let msg = env["payload"]["message"].as_str().unwrap_or_default();
        if let Some(rest) = msg.strip_prefix("New Joiner ") {
            if let Some(id) = rest.split(' ').next() {
                *self.own_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
                tracing::debug!(%id, "trade-feed socket id");
            }
        }
    }

    fn echo_key(topic: &str, kind: &Value, payload: Option<&Value>) -> String {
        // serde_json's map keeps keys sorted, so this text is canonical.
        format!(
            "{topic}\u{0}{kind}\u{0}{}",
            payload.map(Value::to_string).unwrap_or_default()
        )
    }

    fn remember_echo(&self, topic: &str, kind: &Value, payload: &Value) {
        let window = self.bridge.config.attach.echo_window;
        let mut echoes = self.echoes.lock().unwrap_or_else(|e| e.into_inner());
        if echoes.len() > 10_000 {
            echoes.retain(|_, (_, at)| at.elapsed() < window);
        }
        let e = echoes
            .entry(Self::echo_key(topic, kind, Some(payload)))
            .or_insert((0, Instant::now()));
        e.0 += 1;
        e.1 = Instant::now();
    }

    fn take_echo(&self, topic: &str, kind: &Value, payload: Option<&Value>) -> bool {
        let window = self.bridge.config.attach.echo_window;
        let key = Self::echo_key(topic, kind, payload);
        let mut echoes = self.echoes.lock().unwrap_or_else(|e| e.into_inner());
        match echoes.get_mut(&key) {
            Some((n, at)) if at.elapsed() < window => {
                *n -= 1;
                if *n == 0 {
                    echoes.remove(&key);
                }
                true
            }
            Some(_) => {
                echoes.remove(&key);
                false
            }
            None => false,
        }
    }

    /// A NATS message for trade-feed: sent now, or buffered while detached.
    async fn to_upstream(&self, p: Pending) {
        if !self.is_active() {
            return;
        }
        if self.connected.load(Ordering::Relaxed) {
            let guard = self.client.lock().await;
            if let Some(c) = guard.as_ref() {
                // Anything buffered goes first, to keep the order.
                if self
                    .buffer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
                {
                    match self.emit(c, &p).await {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::warn!(
                                "emit to trade-feed failed: {e}; buffering and reconnecting"
                            );
                            self.dead.notify_one();
                        }
                    }
                }
            }
        }
        self.push_buffer(p);
    }

    async fn emit(&self, c: &SioClient, p: &Pending) -> Result<(), String> {
        self.remember_echo(&p.topic, &p.kind, &p.payload);
        let msg = json!({"topic": p.topic, "type": p.kind, "payload": p.payload});
        match c.emit("publish", msg).await {
            Ok(()) => {
                self.bridge.forwarded_to_socketio(p.route, p.received, 0);
                Ok(())
            }
            Err(e) => {
                // not sent: forget the echo we expected
                self.take_echo(&p.topic, &p.kind, Some(&p.payload));
                Err(e.to_string())
            }
        }
    }

    fn push_buffer(&self, p: Pending) {
        let cap = self.bridge.config.attach.buffer_messages;
        let mut buf = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        buf.push_back(p);
        while buf.len() > cap {
            if let Some(old) = buf.pop_front() {
                let route = &self.bridge.routes.get(old.route).name;
                telemetry::dropped(route, TO_SOCKETIO, "upstream_buffer_full", 1);
                self.bridge.warn_limited(
                    "upstream_buffer_full",
                    format_args!(
                        "trade-feed unreachable and attach.buffer_messages ({cap}) full: dropped the oldest \
                         message for {}",
                        old.topic
                    ),
                );
            }
        }
        metrics::gauge!(telemetry::BUFFERED).set(buf.len() as f64);
    }

    async fn flush_buffer(&self) {
        let guard = self.client.lock().await;
        let Some(c) = guard.as_ref() else { return };
        let mut sent = 0usize;
        loop {
            let next = self
                .buffer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some(p) = next else { break };
            if let Err(e) = self.emit(c, &p).await {
                tracing::warn!("emit to trade-feed failed while replaying: {e}");
                self.buffer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_front(p);
                self.dead.notify_one();
                break;
            }
            sent += 1;
        }
        let left = self.buffer.lock().unwrap_or_else(|e| e.into_inner()).len();
        metrics::gauge!(telemetry::BUFFERED).set(left as f64);
        if sent > 0 {
            tracing::info!(
                replayed = sent,
                "sent messages buffered while trade-feed was unreachable"
            );
        }
    }
}

fn bridge_routes_flags(bridge: &Bridge) -> Vec<AtomicBool> {
    bridge
        .routes
        .routes()
        .iter()
        .map(|r| {
            let declared = bridge.config.attach.legacy_consumers.get(&r.name).copied();
            AtomicBool::new(declared.unwrap_or(true))
        })
        .collect()
}

/// Competes in a point-to-point route's queue group while its consumers are
/// declared to be on trade-feed and this bridge is the active attacher;
/// what it is given goes to trade-feed (buffered while detached).
/// `tradefeed_bridge_queue_member{route}` is 1 from the moment the NATS
/// server knows the membership; after a declaration of absence it turns 0
/// only once the subscription is drained and everything the group had
/// already given this member was emitted to trade-feed, so a legacy
/// processor may then drain itself without missing an order.
pub async fn run_queue_member(attach: Arc<Attach>, client: async_nats::Client, route: usize) {
    let r = attach.bridge.routes.get(route).clone();
    let subject = r.subject.as_str().to_string();
    let group = r.queue_group.clone().unwrap_or_default();
    let member = metrics::gauge!(telemetry::QUEUE_MEMBER, "route" => r.name.clone());
    member.set(0.0);
    let mut epoch = attach.bridge.membership.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut sub: Option<async_nats::Subscriber> = None;
    loop {
        let want = attach.is_active() && attach.legacy_consumers(route);
        if want && sub.is_none() {
            match client.queue_subscribe(subject.clone(), group.clone()).await {
                Ok(s) => {
                    // The server knows the interest once the flush returns.
                    let _ = client.flush().await;
                    sub = Some(s);
                    member.set(1.0);
                    tracing::info!(%subject, %group, "joined the queue group for trade-feed's consumers");
                }
                Err(e) => tracing::warn!(%subject, "cannot join the queue group: {e}"),
            }
        } else if !want {
            if let Some(mut s) = sub.take() {
                // Drain rather than unsubscribe: the messages the server
                // already sent this member still arrive, and still go to
                // trade-feed (an unsubscribe would drop them on arrival).
                if let Err(e) = s.drain().await {
                    tracing::warn!("draining the queue subscription failed: {e}");
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, s.next()).await {
                    attach.take_queued(&msg, route).await;
                }
                member.set(0.0);
                tracing::info!(%subject, %group, "left the queue group");
            }
        }
        tokio::select! {
            _ = epoch.changed() => {}
            _ = tick.tick() => {}
            msg = async {
                match sub.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => match msg {
                Some(msg) => attach.take_queued(&msg, route).await,
                None => {
                    sub = None;
                    member.set(0.0);
                }
            },
        }
    }
}

impl Attach {
    async fn take_queued(&self, msg: &async_nats::Message, route: usize) {
        let mut pending = None;
        self.bridge
            .queued_to_legacy(msg, route, |route, topic, env| {
                pending = Some(pending_from(route, topic, env));
            });
        if let Some(p) = pending {
            self.to_upstream(p).await;
        }
    }
}

fn pending_from(route: usize, topic: &str, env: &crate::envelope::EnvelopeOut<'_>) -> Pending {
    let to_value = |r: &RawValue| serde_json::from_str::<Value>(r.get()).unwrap_or(Value::Null);
    Pending {
        route,
        received: Instant::now(),
        topic: topic.to_string(),
        kind: to_value(env.kind),
        payload: env.payload.map(to_value).unwrap_or(Value::Null),
    }
}

/// Subscribes on NATS for the NATS -> legacy direction.
pub async fn subscribe_nats(attach: Arc<Attach>, client: async_nats::Client) -> anyhow::Result<()> {
    for (pattern, serves) in attach.bridge.routes.subscriptions() {
        let mut sub = client.subscribe(pattern.clone()).await?;
        tracing::info!(subject = %pattern, "subscribed on NATS");
        let attach = attach.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if !attach.is_active() {
                    continue;
                }
                let mut pending = None;
                attach
                    .bridge
                    .nats_to_legacy(&msg, &serves, |route, topic, env| {
                        pending = Some(pending_from(route, topic, env));
                    });
                if let Some(p) = pending {
                    attach.to_upstream(p).await;
                }
            }
        });
    }
    Ok(())
}

/// Keeps the lease that makes this bridge the one active attacher of its
/// trade-feed. The lease is a key in a JetStream key-value bucket whose
/// entries expire after `attach.lease_ttl`: the holder renews it every third
/// of that time with a compare-and-set; a standby tries to create it at the
/// same pace and wins only once it has expired. A standby therefore takes
/// over at most `lease_ttl` plus a third of it after the holder stops.
pub async fn keep_lease(attach: Arc<Attach>, client: async_nats::Client) -> anyhow::Result<()> {
    let cfg = &attach.bridge.config.attach;
    let mut waited = 0u32;
    while client.connection_state() != async_nats::connection::State::Connected {
        if waited.is_multiple_of(100) {
            tracing::info!("waiting for NATS before taking the attach lease");
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let js = async_nats::jetstream::new(client);
    let kv = match js.get_key_value(cfg.lease_bucket.clone()).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: cfg.lease_bucket.clone(),
                history: 1,
                max_age: cfg.lease_ttl,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "attach mode needs JetStream for its lease (start nats-server with -js), or set \
                     attach.lease = false when only one bridge attaches to this trade-feed: {e}"
                )
            })?,
    };
    let key: String = cfg
        .url
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let me = bytes::Bytes::from(attach.bridge.instance_id.clone());
    let period = cfg.lease_ttl / 3;
    let active_gauge = metrics::gauge!(telemetry::ATTACH_ACTIVE);
    tokio::spawn(async move {
        let mut revision: Option<u64> = None;
        let mut told_standby = false;
        loop {
            match revision {
                Some(rev) => match kv.update(&key, me.clone(), rev).await {
                    Ok(r) => revision = Some(r),
                    Err(e) => {
                        revision = None;
                        attach.active.store(false, Ordering::Relaxed);
                        active_gauge.set(0.0);
                        tracing::warn!("lost the attach lease ({e}): standing by");
                    }
                },
                None => match kv.create(&key, me.clone()).await {
                    Ok(r) => {
                        revision = Some(r);
                        attach.active.store(true, Ordering::Relaxed);
                        active_gauge.set(1.0);
                        told_standby = false;
                        tracing::info!(key = %key, "holding the attach lease: mirroring");
                    }
                    Err(_) => {
                        if !told_standby {
                            let holder = kv
                                .get(&key)
                                .await
                                .ok()
                                .flatten()
                                .map(|b| String::from_utf8_lossy(&b).into_owned())
                                .unwrap_or_default();
                            tracing::info!(%holder, "another bridge holds the attach lease: standing by");
                            told_standby = true;
                        }
                    }
                },
            }
            tokio::time::sleep(period).await;
        }
    });
    Ok(())
}
