//! The connection to trade-feed: connecting (and retrying without end),
//! subscribing, sending NATS -> legacy messages in order, and noticing when
//! the connection dies.
//!
//! rust_socketio's own reconnect is off: it does not retry a failed first
//! connect, and it cannot re-subscribe. A dead connection is not always
//! reported by the library (a clean WebSocket close ends its stream
//! silently), so the bridge also emits a heartbeat event that trade-feed
//! ignores (it has no handler for it) and treats a failed emit as a loss.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rust_socketio::asynchronous::{Client as SioClient, ClientBuilder};
use rust_socketio::{Payload, TransportType};
use serde_json::json;
use tokio::sync::{watch, Notify};

use super::{Attach, Role};
use crate::config::AttachTransport;
use crate::nats::backoff;
use crate::telemetry::{self, TO_NATS};

/// Topics under this prefix are the bridges' own presence topics: each
/// bridge subscribes to `<prefix><instance>/<generation>`, and trade-feed's
/// "New Joiner" notice on it names the bridge's socket id to every bridge.
pub(super) const PROBE_PREFIX: &str = "/tradefeed-bridge/";
/// Event trade-feed has no handler for: emitting it checks the connection.
const HEARTBEAT_EVENT: &str = "tradefeed-bridge-heartbeat";
/// Heartbeat period. Each is a few bytes; a dead connection shows within
/// about two periods, well inside Engine.IO's 45 s ping timeout.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// HTTP handshake, or WebSocket, plus trade-feed's CONNECT answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// From the subscriptions to trade-feed's notice on the presence topic.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// One emit; longer means the connection is stuck.
const EMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection ended, signalled once by whoever noticed first.
#[derive(Default)]
struct Dead {
    notify: Notify,
    reason: Mutex<Option<String>>,
}

impl Dead {
    fn signal(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.notify.notify_one();
    }

    fn reason(&self) -> String {
        let r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        r.clone().unwrap_or_else(|| "connection closed".into())
    }
}

/// What the callbacks of one connection share.
pub(super) struct Conn {
    pub(super) generation: u64,
    dead: Dead,
    /// Set when trade-feed's notice on our presence topic names our id.
    pub(super) own_id: watch::Sender<Option<String>>,
}

/// Keeps a connection to trade-feed until shutdown, retrying with capped,
/// jittered back-off without limit (the first connect too).
pub(super) async fn run(attach: Arc<Attach>) {
    let url = attach.bridge.config.attach.url.clone();
    let reconnects = metrics::counter!(telemetry::UPSTREAM_RECONNECTS);
    let connected = metrics::gauge!(telemetry::UPSTREAM_CONNECTED);
    let mut stop = attach.stop.subscribe();
    let mut attempt = 0usize;
    let mut down_since = Instant::now();
    let mut was_attached = false;
    while !*stop.borrow() {
        let generation = attach.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(Conn {
            generation,
            dead: Dead::default(),
            own_id: watch::channel(None).0,
        });
        match attach.connect(&conn).await {
            Ok(client) => {
                if was_attached {
                    reconnects.increment(1);
                }
                attempt = 0;
                attach.attached_now(&conn, was_attached, down_since);
                was_attached = true;
                connected.set(1.0);
                let why = attach.serve(&client, &conn).await;
                connected.set(0.0);
                down_since = Instant::now();
                attach.detached_now();
                let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
                if !*stop.borrow() {
                    tracing::warn!(%url, reason = %why, "lost trade-feed; reconnecting");
                }
            }
            Err(e) => {
                attempt += 1;
                let cfg = &attach.bridge.config.attach;
                let delay = backoff(attempt, cfg.reconnect_delay_max).max(cfg.reconnect_delay_min);
                attach.bridge.warn_limited(
                    "upstream_connect",
                    format_args!(
                        "cannot reach trade-feed at {url} (attempt {attempt}): {e}; retrying in \
                         {delay:?}"
                    ),
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    attach.upstream_done.notify_one();
}

impl Attach {
    /// Topics the bridge subscribes on trade-feed: what every route needs,
    /// in both directions (its own publishes must come back as echoes, which
    /// tell that trade-feed took them). `/*` alone when a template has
    /// placeholders.
    fn upstream_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = Vec::new();
        for r in self.bridge.routes.routes() {
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

    fn presence_topic(&self, generation: u64) -> String {
        format!("{PROBE_PREFIX}{}/{generation}", self.bridge.instance_id)
    }

    /// Connects, waits for trade-feed's CONNECT answer, subscribes, and
    /// waits for the notice that names this connection's socket id.
    async fn connect(self: &Arc<Self>, conn: &Arc<Conn>) -> Result<SioClient, String> {
        let (acked_tx, mut acked) = watch::channel(false);
        let client =
            match tokio::time::timeout(CONNECT_TIMEOUT, self.builder(conn, acked_tx).connect())
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
            };
        let result = self.handshake(&client, conn, &mut acked).await;
        if result.is_err() {
            let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
        }
        result.map(|()| client)
    }

    async fn handshake(
        &self,
        client: &SioClient,
        conn: &Conn,
        acked: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        // An emit before trade-feed answered CONNECT makes it drop the
        // connection, so wait for the answer (or an error).
        tokio::select! {
            ok = tokio::time::timeout(CONNECT_TIMEOUT, acked.wait_for(|a| *a)) => match ok {
                Ok(Ok(_)) => {}
                _ => return Err("trade-feed did not accept the Socket.IO connection".into()),
            },
            _ = conn.dead.notify.notified() => return Err(conn.dead.reason()),
        }
        for topic in self.upstream_topics() {
            emit(client, "subscribe", json!(topic).into()).await?;
        }
        // trade-feed handles a client's events in order: once the notice on
        // the presence topic (subscribed last) arrives, so have the others.
        let presence = self.presence_topic(conn.generation);
        emit(client, "subscribe", json!(presence).into()).await?;
        let mut own = conn.own_id.subscribe();
        let confirmed = tokio::time::timeout(PROBE_TIMEOUT, own.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok());
        match confirmed {
            true => Ok(()),
            false => Err(format!(
                "trade-feed did not confirm the subscriptions (no notice on {presence} within \
                 {PROBE_TIMEOUT:?})"
            )),
        }
    }

    fn builder(self: &Arc<Self>, conn: &Arc<Conn>, acked: watch::Sender<bool>) -> ClientBuilder {
        let cfg = &self.bridge.config.attach;
        let url = format!(
            "{}{}/",
            cfg.url.trim_end_matches('/'),
            cfg.path.trim_end_matches('/')
        );
        let transport = match cfg.transport {
            AttachTransport::Any => TransportType::Any,
            AttachTransport::Websocket => TransportType::Websocket,
            AttachTransport::Polling => TransportType::Polling,
        };
        let (me, c) = (self.clone(), conn.clone());
        let on_publish = move |payload: Payload, _: SioClient| {
            me.on_upstream(&c, payload);
            async {}.boxed()
        };
        let c = conn.clone();
        let on_error = move |payload: Payload, _: SioClient| {
            c.dead
                .signal(format!("trade-feed connection error: {}", text(&payload)));
            async {}.boxed()
        };
        let c = conn.clone();
        let on_close = move |_: Payload, _: SioClient| {
            c.dead.signal("trade-feed closed the connection".into());
            async {}.boxed()
        };
        let acked = Arc::new(acked);
        let on_open = move |_: Payload, _: SioClient| {
            let _ = acked.send(true);
            async {}.boxed()
        };
        let me = self.clone();
        let on_any = move |event: rust_socketio::Event, payload: Payload, _: SioClient| {
            if matches!(payload, Payload::Binary(_)) {
                telemetry::rejected("", TO_NATS, "binary_payload");
                me.bridge.warn_limited(
                    "binary_payload",
                    format_args!("ignored a binary event from trade-feed ({event}): not JSON"),
                );
            }
            async {}.boxed()
        };
        let mut builder = ClientBuilder::new(url)
            .namespace("/")
            .transport_type(transport)
            .reconnect(false)
            .on("publish", on_publish)
            .on("error", on_error)
            .on("close", on_close)
            .on("open", on_open)
            .on_any(on_any);
        for (k, v) in &cfg.headers {
            builder = builder.opening_header(k.as_str(), v.expose());
        }
        if let Some(token) = &cfg.auth_token {
            builder = builder.auth(json!({ "token": token.expose() }));
        }
        builder
    }

    /// Attached: readiness up, and a replay delay when the connection comes
    /// back with messages waiting.
    fn attached_now(&self, conn: &Conn, reconnect: bool, down_since: Instant) {
        let wait = self.bridge.config.attach.replay_wait;
        let mut st = self.state();
        st.attached = true;
        st.own_id = conn.own_id.borrow().clone();
        st.replay_at = (reconnect && !st.outbox.is_empty()).then(|| Instant::now() + wait);
        let buffered = st.outbox.len();
        drop(st);
        self.attached.store(true, Ordering::Relaxed);
        self.bridge
            .upstream_connected
            .store(true, Ordering::Relaxed);
        self.bridge.membership_changed();
        self.work.notify_one();
        tracing::info!(
            url = %self.bridge.config.attach.url,
            outage_ms = down_since.elapsed().as_millis() as u64,
            topics = ?self.upstream_topics(),
            buffered,
            replay_in_ms = if buffered > 0 && reconnect { wait.as_millis() as u64 } else { 0 },
            "attached to trade-feed"
        );
    }

    /// Detached: what was sent and not echoed is sent again after the
    /// reconnect, ahead of what waited; except point-to-point orders, which
    /// the queue member gives back to their group as it leaves it, where a
    /// NATS processor may book them while trade-feed is away.
    fn detached_now(&self) {
        self.attached.store(false, Ordering::Relaxed);
        self.bridge
            .upstream_connected
            .store(false, Ordering::Relaxed);
        let mut st = self.state();
        st.attached = false;
        st.own_id = None;
        let unconfirmed = st.in_flight.drain();
        for (_, mut p) in unconfirmed.into_iter().rev() {
            p.sent = true;
            st.outbox.push_front(p);
        }
        self.trim_outbox(&mut st);
        metrics::gauge!(telemetry::BUFFERED).set(st.outbox.len() as f64);
        drop(st);
        self.bridge.membership_changed();
    }

    /// Runs a live connection: the writer sends, this loop beats and tidies,
    /// until the connection dies. Returns why it ended.
    async fn serve(self: &Arc<Self>, client: &SioClient, conn: &Arc<Conn>) -> String {
        let writer = tokio::spawn(self.clone().write(client.clone(), conn.clone()));
        let mut stop = self.stop.subscribe();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let why = loop {
            tokio::select! {
                _ = conn.dead.notify.notified() => break conn.dead.reason(),
                _ = stopped(&mut stop) => break "shutting down".to_string(),
                _ = tick.tick() => {
                    if let Err(e) = self.beat(client).await {
                        break e;
                    }
                }
                _ = self.announce.notified() => {
                    let presence = self.presence_topic(conn.generation);
                    if let Err(e) = emit(client, "subscribe", json!(presence).into()).await {
                        break e;
                    }
                }
            }
        };
        writer.abort();
        why
    }

    async fn beat(&self, client: &SioClient) -> Result<(), String> {
        emit(client, HEARTBEAT_EVENT, Payload::Text(Vec::new())).await?;
        self.tidy();
        Ok(())
    }

    /// Sends the outbox in order while this bridge is active.
    async fn write(self: Arc<Self>, client: SioClient, conn: Arc<Conn>) {
        loop {
            let Some(p) = self.next_to_send() else {
                let wait = self
                    .state()
                    .replay_at
                    .map(|t| t.saturating_duration_since(Instant::now()));
                let wait = wait.unwrap_or(HEARTBEAT).max(Duration::from_millis(10));
                let _ = tokio::time::timeout(wait, self.work.notified()).await;
                continue;
            };
            let body = p.body.to_string();
            #[allow(deprecated)]
            // `Payload::String` sends the text as it is: the payload reaches
            // trade-feed byte for byte, as in server mode.
            let payload = Payload::String(body);
            if let Err(e) = emit(&client, "publish", payload).await {
                conn.dead.signal(e);
                return;
            }
        }
    }

    /// The next message to send, moved to the in-flight window.
    fn next_to_send(&self) -> Option<super::Pending> {
        let mut st = self.state();
        if st.role != Role::Active || !st.attached || st.in_flight.len() >= super::MAX_IN_FLIGHT {
            return None;
        }
        if let Some(at) = st.replay_at {
            if Instant::now() < at {
                return None;
            }
            st.replay_at = None;
        }
        let p = st.outbox.pop_front()?;
        metrics::gauge!(telemetry::BUFFERED).set(st.outbox.len() as f64);
        st.in_flight.hold(p.key.clone(), p.clone(), Instant::now());
        Some(p)
    }

    /// Once per heartbeat: forgets what outlived `attach.echo_window`.
    fn tidy(&self) {
        let window = self.bridge.config.attach.echo_window;
        let now = Instant::now();
        let mut st = self.state();
        let unechoed = st.in_flight.expire(now, window);
        let (left_legacy, left_nats) = if st.peer_active && st.role == Role::Standby {
            (st.shadow.expire(now, window), st.legacy.expire(now, window))
        } else {
            (Vec::new(), Vec::new())
        };
        drop(st);
        for p in &unechoed {
            // Sent, never echoed: taken as delivered (trade-feed echoes to
            // every subscriber, the bridge included, so this is unusual).
            self.bridge.forwarded_to_socketio(p.route, p.received, 0);
            self.bridge.warn_limited(
                "no_echo",
                format_args!(
                    "trade-feed did not echo a message on {} within attach.echo_window; taken as \
                     delivered",
                    p.topic
                ),
            );
        }
        for p in left_legacy {
            let name = &self.bridge.routes.get(p.route).name;
            telemetry::suppressed(name, telemetry::TO_SOCKETIO, "left_to_active");
        }
        for out in left_nats.into_iter().flatten() {
            let name = &self.bridge.routes.get(out.route).name;
            telemetry::suppressed(name, TO_NATS, "left_to_active");
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn emit(client: &SioClient, event: &str, payload: Payload) -> Result<(), String> {
    match tokio::time::timeout(EMIT_TIMEOUT, client.emit(event, payload)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("emitting `{event}` to trade-feed failed: {e}")),
        Err(_) => Err(format!(
            "emitting `{event}` to trade-feed took over {EMIT_TIMEOUT:?}"
        )),
    }
}

fn text(p: &Payload) -> String {
    match p {
        Payload::Text(v) => v
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(" "),
        Payload::Binary(b) => format!("{} bytes", b.len()),
        #[allow(deprecated)]
        Payload::String(s) => s.clone(),
    }
}
