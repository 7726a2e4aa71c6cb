//! The NATS side of attach mode: the subscriptions (including the
//! watch-only ones that let a standby see what the active bridge
//! publishes), recognising a bridge's mirror of a trade-feed message, and
//! the queue-group member of point-to-point routes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use super::{ledger, Attach, Role};
use crate::bridge::{H_ORIGIN, H_TOPIC};
use crate::route::Delivery;
use crate::telemetry::{self, TO_NATS, TO_SOCKETIO};

impl Attach {
    /// A message on one of the bridge's NATS subscriptions. `serves` are the
    /// routes it delivers to trade-feed (empty for a watch-only subscription).
    pub(super) fn on_nats(&self, msg: &async_nats::Message, serves: &[usize]) {
        let headers = msg.headers.as_ref();
        let origin = headers.and_then(|h| h.get(H_ORIGIN)).map(|v| v.as_str());
        if origin == Some(self.bridge.instance_id.as_str()) {
            return;
        }
        if origin.is_some() {
            // Another bridge's mirror of a legacy message: its topic is in a
            // header where the subject does not tell it.
            let topic = match headers.and_then(|h| h.get(H_TOPIC)) {
                Some(t) => Some(t.as_str().to_string()),
                None => self
                    .bridge
                    .routes
                    .mirrored_topic(msg.subject.as_str())
                    .map(|m| m.target),
            };
            if topic.is_some_and(|t| self.is_mirror_of_ours(msg, &t)) {
                return;
            }
        }
        if serves.is_empty() {
            return;
        }
        let mut pending = None;
        self.bridge
            .nats_to_legacy(msg, serves, |route, topic, env| {
                pending = self.pending(route, topic, env);
            });
        if let Some(p) = pending {
            self.to_legacy(p);
        }
    }

    /// A bridge's NATS mirror of a legacy message that this bridge saw on
    /// trade-feed: it came from trade-feed and must not go back there. For a
    /// standby it also shows that the active bridge carried it.
    fn is_mirror_of_ours(&self, msg: &async_nats::Message, legacy_topic: &str) -> bool {
        let Ok(env) = serde_json::from_slice::<Value>(&msg.payload) else {
            return false;
        };
        let key = ledger::legacy_key(
            legacy_topic,
            &env["from"],
            &env["date"],
            env.get("type").unwrap_or(&Value::Null),
            env.get("payload"),
        );
        let mut st = self.state();
        let keep = st.role == Role::Standby;
        let Some(held) = st.legacy.sight(&key, Instant::now(), keep) else {
            return false;
        };
        drop(st);
        let route = self
            .bridge
            .routes
            .route_for_topic(legacy_topic)
            .map_or("", |r| r.name.as_str());
        match held {
            Some(_) => telemetry::suppressed(route, TO_NATS, "peer_mirrored"),
            None => telemetry::suppressed(route, TO_SOCKETIO, "from_trade_feed"),
        }
        true
    }
}

/// Subscribes on NATS: the routes' subjects for NATS -> legacy, and the
/// subjects of broadcast routes that carry legacy traffic to NATS, so that a
/// standby sees what the active bridge publishes.
///
/// Point-to-point subjects are not watched: any subscription on them counts
/// as a consumer for the NATS server, which would then never answer "no
/// responders", and an order published while no processor exists anywhere
/// would go uncounted (the bridge's `undeliverable`) and unnoticed by a NATS
/// producer. The cost: at a takeover, legacy orders published on trade-feed
/// between the old holder's end and the new holder's start are not carried.
pub(super) async fn subscribe_nats(
    attach: &Arc<Attach>,
    client: &async_nats::Client,
) -> anyhow::Result<()> {
    let routes = &attach.bridge.routes;
    let mut subs: Vec<(String, Vec<usize>)> = routes.subscriptions();
    for r in routes
        .routes()
        .iter()
        .filter(|r| r.direction.to_nats() && r.delivery != Delivery::Queue)
    {
        let pattern = r.subject.subscription();
        if !subs.iter().any(|(p, _)| *p == pattern) {
            subs.push((pattern, Vec::new()));
        }
    }
    for (pattern, serves) in subs {
        let mut sub = client.subscribe(pattern.clone()).await?;
        tracing::info!(subject = %pattern, delivers = !serves.is_empty(), "subscribed on NATS");
        let attach = attach.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                attach.on_nats(&msg, &serves);
            }
        });
    }
    Ok(())
}

/// Competes in a point-to-point route's queue group while this bridge is
/// active and attached and the route's consumers are declared to be on
/// trade-feed; what it is given goes to trade-feed. On leaving the group it
/// gives back what it was handed and had not sent.
///
/// `tradefeed_bridge_queue_member{route}` is 1 from the moment the NATS
/// server has confirmed the membership (`client` is the queue-member
/// connection, which receives its own messages: see `nats::Confirmation`). After leaving it turns 0 only once the
/// subscription is drained (what the server had already sent is given back,
/// not dropped) and every order already handed to trade-feed has come back
/// from it (its echo), i.e. trade-feed has given it to its room: a legacy
/// processor that unsubscribes after that misses nothing.
pub(super) async fn run_queue_member(
    attach: Arc<Attach>,
    client: async_nats::Client,
    route: usize,
) {
    let r = attach.bridge.routes.get(route).clone();
    let subject = r.subject.as_str().to_string();
    let group = r.queue_group.clone().unwrap_or_default();
    let member = metrics::gauge!(telemetry::QUEUE_MEMBER, "route" => r.name.clone());
    member.set(0.0);
    metrics::counter!(telemetry::REQUEUED, "route" => r.name.clone()).increment(0);
    let mut epoch = attach.bridge.membership.subscribe();
    let mut sub: Option<async_nats::Subscriber> = None;
    let mut joined = crate::nats::Confirmation::open(
        &client,
        format!("_INBOX.{}.queue-joined.{route}", attach.bridge.instance_id),
    )
    .await;
    // The queue-member connection's loss count when the server last
    // confirmed the subscription (`None`: to confirm on the connection now).
    let mut confirmed: Option<u64> = None;
    loop {
        let link = attach.bridge.queue_link_epoch();
        let up = client.connection_state() == async_nats::connection::State::Connected;
        let want = attach.is_active()
            && attach.attached.load(Ordering::Relaxed)
            && attach.legacy_consumers(route)
            && !attach.bridge.shutting_down.load(Ordering::Relaxed);
        if want && sub.is_none() {
            // Counted from before the subscribe: a shutdown meanwhile waits.
            let open = &attach.bridge.queue_subscriptions;
            open.fetch_add(1, Ordering::AcqRel);
            match client.queue_subscribe(subject.clone(), group.clone()).await {
                Ok(s) => {
                    sub = Some(s);
                    confirmed = None;
                    tracing::info!(%subject, %group, "joining the queue group for trade-feed's consumers");
                }
                Err(e) => {
                    open.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(%subject, "cannot join the queue group: {e}");
                }
            }
        }
        if want && sub.is_some() && confirmed != Some(link) {
            // Joined, or subscribed again by the client after a reconnect:
            // 1 once the server has confirmed it on the connection of now.
            member.set(0.0);
            if up {
                if !joined.confirm(&client).await {
                    tracing::warn!(%subject, "NATS did not confirm the queue subscription within 5 s; counting it as joined");
                }
                if client.connection_state() == async_nats::connection::State::Connected
                    && attach.bridge.queue_link_epoch() == link
                {
                    confirmed = Some(link);
                    member.set(1.0);
                    tracing::info!(%subject, %group, "in the queue group for trade-feed's consumers");
                }
            }
        } else if !want {
            if let Some(s) = sub.take() {
                let why = crate::server::left_because(
                    &attach.bridge,
                    if !attach.is_active() {
                        "this bridge stands by"
                    } else if !attach.attached.load(Ordering::Relaxed) {
                        "trade-feed is unreachable"
                    } else {
                        "declared without legacy consumers"
                    },
                );
                leave_queue_group(&attach, &client, s, route).await;
                if !attach.is_active() || !attach.attached.load(Ordering::Relaxed) {
                    attach.give_back_taken(&client, route).await;
                }
                settled_on_trade_feed(&attach, route).await;
                attach
                    .bridge
                    .queue_subscriptions
                    .fetch_sub(1, Ordering::AcqRel);
                member.set(0.0);
                tracing::info!(%subject, %group, "left the queue group: {why}");
            }
        }
        let unconfirmed = sub.is_some() && confirmed != Some(attach.bridge.queue_link_epoch());
        tokio::select! {
            changed = epoch.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            // A reconnect wakes the loop; this retries a confirmation the
            // connection lost again meanwhile.
            _ = tokio::time::sleep(Duration::from_millis(500)), if unconfirmed => {}
            msg = next_queued(&mut sub) => match msg {
                Some(msg) => attach.take_queued(&client, msg, route).await,
                None => {
                    sub = None;
                    attach.bridge.queue_subscriptions.fetch_sub(1, Ordering::AcqRel);
                    member.set(0.0);
                }
            },
        }
    }
}

async fn next_queued(sub: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match sub.as_mut() {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Drains rather than unsubscribes: an unsubscribe drops on arrival the
/// messages the server already sent this member, a drain delivers every one
/// of them (as in server mode: `server::leave_queue_group`). They are given
/// back on the same connection, after its unsubscribe, so the server does
/// not choose this bridge again.
async fn leave_queue_group(
    attach: &Attach,
    client: &async_nats::Client,
    mut s: async_nats::Subscriber,
    route: usize,
) {
    if let Err(e) = s.drain().await {
        tracing::warn!("draining the queue subscription failed: {e}");
    }
    // The drain ends with a round trip to the server; bounded in case the
    // connection is down meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, s.next()).await {
        crate::server::requeue(&attach.bridge, client, route, msg).await;
    }
    let _ = client.flush().await;
}

/// Waits, bounded, until every message of `route` handed to trade-feed has
/// come back from it (trade-feed echoes a publish to every subscriber, this
/// bridge included): trade-feed has then given it to its room.
async fn settled_on_trade_feed(attach: &Attach, route: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let waiting = {
            let st = attach.state();
            st.outbox.iter().any(|p| p.route == route) || st.in_flight.any(|p| p.route == route)
        };
        if !waiting || !attach.attached.load(Ordering::Relaxed) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("orders handed to trade-feed were not echoed within 5 s");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Attach {
    /// An order the queue group gave this bridge for trade-feed's consumers.
    async fn take_queued(
        &self,
        client: &async_nats::Client,
        msg: async_nats::Message,
        route: usize,
    ) {
        if !self.is_active() {
            crate::server::requeue(&self.bridge, client, route, msg).await;
            return;
        }
        let mut pending = None;
        self.bridge
            .queued_to_legacy(&msg, route, |route, topic, env| {
                pending = self.pending(route, topic, env);
            });
        if let Some(mut p) = pending {
            p.given = Some(Arc::new(msg));
            self.to_legacy(p);
        }
    }

    /// Whether a route is point-to-point with its consumers on trade-feed.
    pub(super) fn consumed_on_trade_feed(&self, route: usize) -> bool {
        self.bridge.routes.get(route).delivery == Delivery::Queue && self.legacy_consumers(route)
    }
}
