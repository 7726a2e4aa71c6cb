//! What trade-feed sends the bridge, told apart: its own publishes coming
//! back (echoes), another attached bridge's deliveries, presence notices,
//! and legacy clients' messages, which are mirrored (active) or shadowed
//! until the active bridge's mirror shows up (standby).

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::Instant;

use rust_socketio::Payload;
use serde_json::{json, Value};

use super::ledger::{self, Hold};
use super::upstream::{Conn, PROBE_PREFIX};
use super::{Attach, Role, State};
use crate::envelope::{self, Field};
use crate::telemetry::{self, TO_NATS};

/// Socket ids of peer bridges remembered (they change on each reconnect).
const MAX_PEERS: usize = 64;

impl Attach {
    /// A `publish` event from trade-feed.
    pub(super) fn on_upstream(&self, conn: &Conn, payload: Payload) {
        if conn.generation != self.generation.load(Ordering::Relaxed) {
            return;
        }
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
            if let Some(rest) = topic.strip_prefix(PROBE_PREFIX) {
                self.on_presence(conn, rest, &env);
            }
            return;
        }
        if topic.starts_with(PROBE_PREFIX) {
            return;
        }
        let kind = env.get("type").cloned().unwrap_or_else(|| json!("message"));
        let payload = env.get("payload");
        let key = ledger::emitted_key(topic, &kind, payload);
        let legacy_key = ledger::legacy_key(topic, &env["from"], &env["date"], &kind, payload);
        let now = Instant::now();
        let mut st = self.state();
        if st.own_id.as_deref() == Some(from) {
            return self.own_echo(st, &key, legacy_key, topic, now);
        }
        if st.peers.iter().any(|p| p == from) {
            return self.peer_delivery(st, &key, legacy_key, topic, now);
        }
        if !st.in_flight.is_empty() {
            if let Some(p) = st.in_flight.sight(&key, now, false) {
                // Ours, under a sender id not learned (yet).
                drop(st);
                self.bridge.forwarded_to_socketio(p.route, p.received, 0);
                let name = self.bridge.routes.get(p.route).name.clone();
                return telemetry::suppressed(&name, TO_NATS, "own_echo");
            }
        }
        if st.shadow.sight(&key, now, false).is_some() {
            // A peer bridge (not yet known by id) delivered what we shadow.
            return self.peer_delivery(st, &key, legacy_key, topic, now);
        }
        drop(st);
        self.on_legacy(topic, &env, kind, legacy_key, now);
    }

    /// trade-feed sent back one of this bridge's own publishes.
    fn own_echo(
        &self,
        mut st: MutexGuard<'_, State>,
        key: &str,
        legacy_key: String,
        topic: &str,
        now: Instant,
    ) {
        let echoed = st.in_flight.sight(key, now, false);
        // Shadowed after a role change, then echoed: nothing left to do.
        st.shadow.sight(key, now, false);
        if st.role == Role::Active {
            st.legacy.hold(legacy_key, None, now);
        }
        drop(st);
        self.work.notify_one();
        let route = self.route_name(topic);
        match echoed {
            Some(p) => {
                self.bridge.forwarded_to_socketio(p.route, p.received, 0);
                telemetry::suppressed(&route, TO_NATS, "own_echo");
            }
            None => telemetry::suppressed(&route, TO_NATS, "own_echo_id"),
        }
    }

    /// Another bridge delivered a NATS message on trade-feed.
    fn peer_delivery(
        &self,
        mut st: MutexGuard<'_, State>,
        key: &str,
        legacy_key: String,
        topic: &str,
        now: Instant,
    ) {
        let standby = st.role == Role::Standby;
        st.shadow.sight(key, now, standby);
        if !standby {
            st.legacy.hold(legacy_key, None, now);
        }
        drop(st);
        telemetry::suppressed(&self.route_name(topic), TO_NATS, "from_bridge");
    }

    fn route_name(&self, topic: &str) -> String {
        self.bridge
            .routes
            .route_for_topic(topic)
            .map_or_else(String::new, |r| r.name.clone())
    }

    /// A legacy client's message: mirrored (active), or shadowed until the
    /// active bridge's mirror shows up (standby).
    fn on_legacy(&self, topic: &str, env: &Value, kind: Value, legacy_key: String, now: Instant) {
        self.bridge.metrics.legacy_publishes.increment(1);
        let Some(mapped) = self.bridge.mirror_for(topic) else {
            self.bridge.metrics.unrouted.increment(1);
            tracing::debug!(%topic, "trade-feed message on a topic with no route");
            return;
        };
        let route = self.bridge.routes.get(mapped.route).name.clone();
        if self.consumed_on_trade_feed(mapped.route) {
            return telemetry::suppressed(&route, TO_NATS, "consumed_on_trade_feed");
        }
        let raw = |v: &Value| serde_json::value::to_raw_value(v).expect("a value serializes");
        let kind_raw = raw(&kind);
        let from_raw = raw(&env["from"]);
        let from = match env["from"].as_str() {
            Some(s) => Field::Str(s),
            None => Field::Raw(&from_raw),
        };
        let date_raw = env.get("date").map(raw);
        let date = date_raw
            .as_deref()
            .map_or(Field::Num(envelope::now_ms()), Field::Raw);
        let payload_raw = env.get("payload").map(raw);
        let Ok(mut out) = self.bridge.prepare(
            &mapped,
            topic,
            &kind_raw,
            from,
            date,
            payload_raw.as_deref(),
            now,
        ) else {
            return;
        };
        let queue = self.bridge.routes.get(mapped.route).delivery == crate::route::Delivery::Queue;
        if queue {
            out.reply = Some(format!(
                "{}.{}",
                self.bridge.no_responders_prefix(),
                mapped.route
            ));
        }
        let mut st = self.state();
        match st.role {
            Role::Active => {
                st.legacy.hold(legacy_key, None, now);
                drop(st);
                self.bridge.enqueue(out);
            }
            // A standby does not watch a point-to-point subject (see
            // `nats_side::subscribe_nats`), so it could never see the active
            // bridge's copy and would send every order again at a takeover:
            // it leaves them to the active bridge.
            Role::Standby if queue => {
                drop(st);
                telemetry::suppressed(&route, TO_NATS, "left_to_active");
            }
            Role::Standby => match st.legacy.hold(legacy_key, Some(out), now) {
                Hold::Held => {}
                Hold::Seen(_) => telemetry::suppressed(&route, TO_NATS, "peer_mirrored"),
                Hold::Evicted(Some(old)) => self.standby_overflow(old.route, TO_NATS),
                Hold::Evicted(None) => {}
            },
        }
    }

    /// A "New Joiner" notice on a presence topic: this connection's socket
    /// id, or a peer bridge's, which is then greeted so it learns ours.
    fn on_presence(&self, conn: &Conn, rest: &str, env: &Value) {
        let Some((instance, generation)) = rest.rsplit_once('/') else {
            return;
        };
        let msg = env["payload"]["message"].as_str().unwrap_or_default();
        let Some(sid) = msg
            .strip_prefix("New Joiner ")
            .and_then(|r| r.split(' ').next())
        else {
            return;
        };
        if instance == self.bridge.instance_id {
            if generation == conn.generation.to_string() {
                let mut st = self.state();
                st.own_id = Some(sid.to_string());
                drop(st);
                let _ = conn.own_id.send(Some(sid.to_string()));
                tracing::debug!(%sid, "trade-feed socket id");
            }
            return;
        }
        let mut st = self.state();
        if st.peers.iter().any(|p| p == sid) {
            return;
        }
        st.peers.push_back(sid.to_string());
        if st.peers.len() > MAX_PEERS {
            st.peers.pop_front();
        }
        drop(st);
        tracing::info!(peer = %instance, %sid, "another bridge is attached to this trade-feed");
        self.announce.notify_one();
    }
}
