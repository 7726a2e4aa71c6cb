//! The NATS connection, built from the configuration.
//!
//! Servers are tried in the configured order (servers the cluster announces
//! come after them); a server that failed more often than another goes after
//! it, so a dead first server costs one `connect_timeout`, not one per
//! reconnect. Every failed attempt is logged with the server's URL and the
//! authentication method (never a secret). With `max_reconnects` > 0 the
//! connection gives up after that many failed attempts in a row; the bridge
//! then shuts down and exits with status 1, so that an orchestrator restarts
//! it, instead of running on without NATS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::{ClientError, ConnectOptions, Event, ReconnectToServer, Server, ServerAddr};
use futures::StreamExt;
use rand::Rng;
use tokio::sync::mpsc;

use crate::bridge::Bridge;
use crate::config::NatsConfig;
use crate::telemetry;

/// Where a connection that gave up reports it: the bridge then stops.
pub type GiveUp = mpsc::UnboundedSender<String>;

/// Connects (retrying in the background if the broker is not up yet) and
/// reports every state change in the log and in metrics.
pub async fn connect(
    cfg: &NatsConfig,
    bridge: &Arc<Bridge>,
    give_up: &GiveUp,
) -> anyhow::Result<async_nats::Client> {
    connect_as(cfg, bridge, give_up, Kind::Primary).await
}

/// A second connection that receives the bridge's own publishes: the bridge
/// competes in point-to-point queue groups on it, where a message it
/// published itself may be handed back to it for a legacy consumer.
pub async fn connect_queue_member(
    cfg: &NatsConfig,
    bridge: &Arc<Bridge>,
    give_up: &GiveUp,
) -> anyhow::Result<async_nats::Client> {
    connect_as(cfg, bridge, give_up, Kind::QueueMember).await
}

/// A connection that answers the bridge's publish confirmations (see
/// [`RoundTrip`]): the primary connection cannot, since it does not receive
/// its own messages (`no_echo`).
pub async fn connect_confirmer(
    cfg: &NatsConfig,
    bridge: &Arc<Bridge>,
    give_up: &GiveUp,
) -> anyhow::Result<async_nats::Client> {
    connect_as(cfg, bridge, give_up, Kind::Confirmer).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Primary,
    QueueMember,
    Confirmer,
}

/// Reports the primary connection up: the server's size limit learned, and
/// one line with what the server says of itself.
pub fn primary_connected(bridge: &Bridge, client: &async_nats::Client, server: &str, auth: &str) {
    bridge.learn_server_limit();
    let info = client.server_info();
    tracing::info!(
        %server,
        server_name = %info.server_name,
        version = %info.version,
        max_payload = info.max_payload,
        %auth,
        "NATS connected to {server}"
    );
}

/// How the bridge authenticates, for log lines: names the method and what
/// identifies the client, never the secret.
pub fn auth_method(cfg: &NatsConfig) -> String {
    if let Some(path) = &cfg.credentials_file {
        format!("credentials file {}", path.display())
    } else if let Some(seed) = &cfg.nkey_seed {
        match nkeys::KeyPair::from_seed(seed.expose().trim()) {
            Ok(kp) => format!("nkey {}", kp.public_key()),
            Err(_) => "nkey (invalid seed)".to_string(),
        }
    } else if cfg.token.is_some() {
        "token".to_string()
    } else if let Some(user) = &cfg.user {
        format!("user/password (user {user})")
    } else {
        "no authentication".to_string()
    }
}

/// TLS is used when asked for, when a `tls://` URL is given, and whenever a
/// CA file or a client certificate is configured (as the Go client does), so
/// a TLS configuration never silently falls back to plain text.
pub fn tls_wanted(cfg: &NatsConfig) -> bool {
    cfg.tls_required || cfg.tls_ca_file.is_some() || cfg.tls_client_cert.is_some()
}

async fn connect_as(
    cfg: &NatsConfig,
    bridge: &Arc<Bridge>,
    give_up: &GiveUp,
    kind: Kind,
) -> anyhow::Result<async_nats::Client> {
    let mut opts = match (&cfg.credentials_file, &cfg.nkey_seed, &cfg.token, &cfg.user) {
        (Some(path), _, _, _) => ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| {
                format!(
                    "nats.credentials_file {}: not a usable credentials file",
                    path.display()
                )
            })?,
        (None, Some(seed), _, _) => ConnectOptions::with_nkey(seed.expose().trim().to_string()),
        (None, None, Some(token), _) => ConnectOptions::with_token(token.expose().to_string()),
        (None, None, None, Some(user)) => ConnectOptions::with_user_and_password(
            user.clone(),
            cfg.password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default(),
        ),
        _ => ConnectOptions::new(),
    };
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_client_cert, &cfg.tls_client_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if tls_wanted(cfg) {
        opts = opts.require_tls(true);
    }
    let label = match kind {
        Kind::Primary => "NATS",
        Kind::QueueMember => "NATS queue-member connection",
        Kind::Confirmer => "NATS confirmation connection",
    };
    let dialer = Arc::new(Dialer {
        label,
        auth: auth_method(cfg),
        tls: tls_wanted(cfg),
        max_delay: cfg.reconnect_delay_max,
        state: Mutex::new(DialState::default()),
    });
    opts = match kind {
        Kind::Primary => opts.name(&cfg.name).no_echo(),
        Kind::QueueMember => opts.name(format!("{}-queue-member", cfg.name)),
        Kind::Confirmer => opts.name(format!("{}-confirm", cfg.name)),
    };
    let pick = dialer.clone();
    let events = dialer.clone();
    let events_bridge = bridge.clone();
    let give_up = give_up.clone();
    let max_reconnects = cfg.max_reconnects;
    opts = opts
        .retry_on_initial_connect()
        .connection_timeout(cfg.connect_timeout)
        .max_reconnects(if cfg.max_reconnects == 0 {
            None
        } else {
            Some(cfg.max_reconnects)
        })
        .reconnect_to_server_callback(move |pool, _info| {
            let choice = pick.next(&pool);
            async move { choice }
        })
        .event_callback(move |event| {
            let bridge = events_bridge.clone();
            let dialer = events.clone();
            let give_up = give_up.clone();
            async move {
                dialer.on_event(&bridge, kind, event, max_reconnects, &give_up);
            }
        });
    let servers: Vec<ServerAddr> = cfg
        .servers
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let client = opts.connect(servers).await?;
    Ok(client)
}

/// Picks the server for each connection attempt and reports how the last
/// attempt went: the client library tells its callback the state of every
/// server in the pool, including the last error of each.
struct Dialer {
    label: &'static str,
    auth: String,
    tls: bool,
    max_delay: Duration,
    state: Mutex<DialState>,
}

#[derive(Default)]
struct DialState {
    /// The server of the last attempt and its failure count when chosen.
    last: Option<(ServerAddr, usize)>,
    /// Failed attempts in a row, for the back-off.
    failures: usize,
    /// The server of the current (or last) connection, for log lines.
    current: Option<String>,
}

impl Dialer {
    fn next(&self, pool: &[Server]) -> Option<ReconnectToServer> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((addr, failed_before)) = st.last.take() {
            match pool.iter().find(|s| s.addr == addr) {
                Some(s) if s.failed_attempts > failed_before => {
                    st.failures += 1;
                    self.report_failure(s);
                }
                _ => st.failures = 0,
            }
        }
        // Configured order, fewest recent failures first (the sort is stable).
        let mut order: Vec<&Server> = pool.iter().collect();
        order.sort_by_key(|s| s.failed_attempts);
        let target = order.first()?;
        st.last = Some((target.addr.clone(), target.failed_attempts));
        st.current = Some(target.addr.as_url_str().to_string());
        let delay = backoff(st.failures + 1, self.max_delay);
        tracing::debug!(server = %target.addr.as_url_str(), delay_ms = delay.as_millis() as u64, "{}: connecting", self.label);
        Some(ReconnectToServer {
            addr: target.addr.clone(),
            delay: Some(delay),
        })
    }

    fn report_failure(&self, s: &Server) {
        let url = s.addr.as_url_str();
        let error = s.last_error.as_deref().unwrap_or("unknown error");
        let lower = error.to_ascii_lowercase();
        if lower.contains("authorization violation") || lower.contains("authentication") {
            tracing::error!(
                server = %url,
                auth = %self.auth,
                "{}: the server at {url} refused the bridge's credentials (method: {}): {error}",
                self.label,
                self.auth
            );
        } else if self.tls
            && (lower.contains("tls")
                || lower.contains("certificate")
                || lower.contains("handshake")
                || lower.contains("corrupt"))
        {
            let hint = if lower.contains("certificaterequired") {
                "the server asks for a client certificate: set nats.tls_client_cert and \
                 nats.tls_client_key"
            } else if lower.contains("unknownissuer") || lower.contains("badsignature") {
                "the server's certificate is not signed by a CA in nats.tls_ca_file (or, \
                 without it, by one of the system's CAs)"
            } else if lower.contains("notvalidforname") {
                "the server's certificate is not valid for the host name in the server URL"
            } else if lower.contains("expired") || lower.contains("notvalidyet") {
                "the server's certificate is outside its validity period"
            } else {
                "TLS is required (nats.tls_required, a tls:// URL or the configured TLS \
                 files): does the server offer TLS on this port?"
            };
            tracing::error!(
                server = %url,
                "{}: TLS with the server at {url} failed: {error} ({hint})",
                self.label
            );
        } else {
            tracing::warn!(
                server = %url,
                auth = %self.auth,
                "{}: cannot connect to {url}: {error}",
                self.label
            );
        }
    }

    fn current(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.current.clone().unwrap_or_default()
    }

    fn on_event(
        &self,
        bridge: &Bridge,
        kind: Kind,
        event: Event,
        max_reconnects: usize,
        give_up: &GiveUp,
    ) {
        let label = self.label;
        let primary = kind == Kind::Primary;
        match event {
            Event::Connected => {
                let server = self.current();
                if primary {
                    bridge.nats_up.notify_waiters();
                    bridge.metrics.nats_connected.set(1.0);
                    // The first connection can come up before `connect`
                    // has returned the client that knows the server's
                    // limits: then the bridge reports it once the client is
                    // attached (`Bridge::start_nats`).
                    let mut pending = bridge
                        .nats_connect_unreported
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    match bridge.nats() {
                        Some(c) => primary_connected(bridge, c, &server, &self.auth),
                        None => *pending = Some((server, self.auth.clone())),
                    }
                    return;
                }
                tracing::info!(%server, auth = %self.auth, "{label} connected to {server}");
                if kind == Kind::QueueMember {
                    // The members confirm their subscriptions again.
                    bridge.membership_changed();
                }
            }
            Event::Disconnected => {
                if primary {
                    *bridge
                        .nats_connect_unreported
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = None;
                    bridge.metrics.nats_connected.set(0.0);
                }
                if kind == Kind::QueueMember {
                    bridge.queue_link_lost();
                }
                let server = self.current();
                tracing::warn!(%server, "{label} disconnected from {server}; reconnecting");
            }
            Event::SlowConsumer(sid) => {
                telemetry::dropped("", telemetry::TO_SOCKETIO, "nats_slow_consumer", 1);
                bridge.warn_limited(
                    "nats_slow_consumer",
                    format_args!(
                        "NATS subscription {sid} is a slow consumer: messages were dropped"
                    ),
                );
            }
            Event::LameDuckMode => {
                tracing::warn!(server = %self.current(), "{label}: the server entered lame duck mode")
            }
            Event::Draining => tracing::info!("{label} draining"),
            Event::Closed => {
                if primary {
                    bridge.metrics.nats_connected.set(0.0);
                }
                tracing::info!("{label} closed");
            }
            Event::ServerError(e) => {
                tracing::error!(server = %self.current(), "{label}: server error: {e}")
            }
            Event::ClientError(ClientError::MaxReconnects) => {
                if primary {
                    bridge.metrics.nats_connected.set(0.0);
                }
                let why = format!(
                    "{label}: gave up after {max_reconnects} failed connection attempts in a row \
                     (nats.max_reconnects = {max_reconnects}); the bridge stops so that it can be \
                     restarted"
                );
                tracing::error!("{why}");
                let _ = give_up.send(why);
            }
            // A failed attempt: reported with its server by `Dialer::next`.
            Event::ClientError(ClientError::Other(e)) => tracing::debug!("{label}: {e}"),
            Event::ClientError(e) => tracing::error!("{label}: client error: {e}"),
        }
    }
}

/// Confirms publishes with a round trip through the server: NATS core has no
/// publish acknowledgement, and the client's `flush()` only empties its own
/// socket buffer. The server handles a connection's messages in order, so
/// its answer to a request sent after a publish proves it has the publish.
/// One request confirms every publish made before it, so a burst of acks
/// costs one round trip.
///
/// The request goes to the bridge's own subject (`_INBOX.<instance>.roundtrip`).
/// A second connection, opened at the first ack asked for, answers it (the
/// primary connection does not receive its own messages); the server's "no
/// responders" status answers too. So a client subscribed to a matching
/// wildcard (a `nats sub '>'` left running to watch traffic), which takes
/// the request without answering, cannot hold the confirmation back. (The
/// bridge's NATS user must be allowed to publish and subscribe there, as
/// with the usual `_INBOX.>` permissions of request/reply clients; without
/// the answering connection, a silent wildcard subscriber delays every ack
/// by 5 s and turns it into a refusal, and the log says so.)
#[derive(Clone)]
pub struct RoundTrip {
    tx: mpsc::UnboundedSender<(socketioxide::extract::AckSender, u64)>,
    stats: Arc<async_nats::Statistics>,
}

impl RoundTrip {
    pub fn start(client: async_nats::Client, bridge: Arc<Bridge>) -> RoundTrip {
        use std::sync::atomic::Ordering;
        let (tx, mut rx) = mpsc::unbounded_channel::<(socketioxide::extract::AckSender, u64)>();
        let stats = client.statistics();
        let connects = stats.clone();
        let subject = format!("_INBOX.{}.roundtrip", bridge.instance_id);
        tokio::spawn(async move {
            // Opened once, at the first ack, and kept (it reconnects by itself).
            let mut answerer: Option<Option<async_nats::Client>> = None;
            while let Some(first) = rx.recv().await {
                if answerer.is_none() {
                    answerer = Some(answer_confirmations(&bridge, &subject).await);
                }
                let mut waiting = vec![first];
                while let Ok(more) = rx.try_recv() {
                    waiting.push(more);
                }
                let answer = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.request(subject.clone(), bytes::Bytes::new()),
                )
                .await;
                let result = match answer {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e))
                        if e.kind() == async_nats::client::RequestErrorKind::NoResponders =>
                    {
                        Ok(())
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("NATS did not confirm {} publish(es): {e}", waiting.len());
                        Err("NATS did not confirm the publish")
                    }
                    Err(_) => {
                        tracing::warn!(
                            "NATS did not confirm {} publish(es) within 5s",
                            waiting.len()
                        );
                        Err("NATS did not confirm the publish")
                    }
                };
                // An answer on a newer connection says nothing of a publish
                // written to the one before it.
                let now = connects.connects.load(Ordering::Relaxed);
                for (ack, at) in waiting {
                    let result = match result {
                        Ok(()) if at != now => Err(
                            "the NATS connection was re-established meanwhile: the publish may be lost",
                        ),
                        r => r,
                    };
                    crate::bridge::reply(Some(ack), result);
                }
            }
        });
        RoundTrip { tx, stats }
    }

    /// Acknowledges `ack` once the server has everything published so far.
    pub fn ack_after(&self, ack: socketioxide::extract::AckSender) {
        let at = self
            .stats
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        // the task lives as long as the client; if it is gone, so is NATS
        if let Err(e) = self.tx.send((ack, at)) {
            crate::bridge::reply(Some(e.0 .0), Err("NATS did not confirm the publish"));
        }
    }
}

/// Opens the connection that answers publish confirmations on `subject`
/// (it subscribes again by itself after a reconnect), and returns once the
/// server has its subscription, or with a warning after at most 5 s.
/// `None`, with a warning, if it cannot be opened: the confirmations then
/// rely on the server's "no responders" status alone.
async fn answer_confirmations(bridge: &Arc<Bridge>, subject: &str) -> Option<async_nats::Client> {
    // Losing this connection must not stop the bridge: acks then wait for
    // "no responders" again.
    let (give_up, _ignored) = mpsc::unbounded_channel();
    let opened = async {
        let answerer = connect_confirmer(&bridge.config.nats, bridge, &give_up).await?;
        let mut requests = answerer.subscribe(subject.to_string()).await?;
        let replier = answerer.clone();
        tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                if let Some(reply) = m.reply {
                    // A lost answer shows as an unconfirmed publish.
                    let _ = replier.publish(reply, bytes::Bytes::new()).await;
                }
            }
        });
        // Asking itself proves the server has the subscription: the server
        // handles the SUB before the request sent after it on this
        // connection. Refused (no permission), the request finds no
        // responder at once. Until this returns, the first ack waits.
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            answerer.request(subject.to_string(), bytes::Bytes::new()),
        )
        .await;
        match answered {
            Ok(Ok(_)) => tracing::debug!("publish confirmations are answered on {subject}"),
            Ok(Err(e)) => tracing::warn!(
                "the connection answering publish confirmations cannot subscribe to {subject} \
                 ({e}: is the bridge's NATS user allowed to?); a NATS client subscribed to a \
                 matching wildcard will hold acks back"
            ),
            Err(_) => tracing::warn!(
                "the connection answering publish confirmations on {subject} did not answer \
                 itself within 5s (NATS unreachable?); it keeps trying"
            ),
        }
        anyhow::Ok(answerer)
    };
    match opened.await {
        Ok(answerer) => Some(answerer),
        Err(e) => {
            tracing::warn!(
                "cannot answer the bridge's publish confirmations on {subject}: {e:#}; a NATS \
                 client subscribed to a matching wildcard will hold every ack back"
            );
            None
        }
    }
}

/// Capped exponential back-off with jitter, so a fleet of bridges does not
/// reconnect in step. The first attempt (1) goes at once; then 100 ms,
/// 200 ms, 400 ms ... up to `max`, each scaled by a random 50-100 %.
pub fn backoff(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 2).min(16) as u32;
    let capped = Duration::from_millis(100)
        .saturating_mul(1u32 << exp)
        .min(max);
    capped.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Proof that the server has processed what a connection sent before:
/// `Client::flush` only writes it to the socket, and a message the bridge
/// then publishes on another connection can reach the server first (seen
/// with a queue subscription: an order published right after the member's
/// "flushed" join found the group empty). The connection publishes a token
/// to a subject only it subscribes to and waits for its own copy: the
/// server handles one connection's operations in order, so once the copy
/// is back, everything sent before it is in place. Needs a connection that
/// receives its own messages (not `no_echo`).
pub struct Confirmation {
    subject: String,
    sub: Option<async_nats::Subscriber>,
    sent: u64,
}

impl Confirmation {
    pub async fn open(client: &async_nats::Client, subject: String) -> Confirmation {
        let sub = match client.subscribe(subject.clone()).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(%subject, "cannot subscribe for confirmations: {e}");
                None
            }
        };
        Confirmation {
            subject,
            sub,
            sent: 0,
        }
    }

    /// `true` once the server has confirmed, `false` after 5 s or when the
    /// confirmation cannot be sent.
    pub async fn confirm(&mut self, client: &async_nats::Client) -> bool {
        let Some(sub) = self.sub.as_mut() else {
            return false;
        };
        self.sent += 1;
        let token = bytes::Bytes::from(self.sent.to_string());
        if client
            .publish(self.subject.clone(), token.clone())
            .await
            .is_err()
        {
            return false;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(m)) if m.payload == token => return true,
                // an earlier token that came back after its wait gave up
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let max = Duration::from_secs(2);
        assert_eq!(backoff(0, max), Duration::ZERO);
        assert_eq!(backoff(1, max), Duration::ZERO);
        for a in 2..40 {
            let d = backoff(a, max);
            assert!(d <= max, "{a}: {d:?}");
            assert!(d >= Duration::from_millis(50), "{a}: {d:?}");
        }
        assert!(backoff(30, max) >= max / 2);
    }

    fn server(url: &str, failed: usize) -> Server {
        // Server has no public constructor: build one through its fields.
        Server {
            addr: url.parse().unwrap(),
            failed_attempts: failed,
            did_connect: false,
            is_discovered: false,
            last_error: (failed > 0).then(|| "IO error: connection refused".to_string()),
        }
    }

    fn dialer() -> Dialer {
        Dialer {
            label: "NATS",
            auth: "token".into(),
            tls: false,
            max_delay: Duration::from_secs(1),
            state: Mutex::new(DialState::default()),
        }
    }

    #[test]
    fn servers_are_tried_in_order_failed_ones_last() {
        let d = dialer();
        let a = "nats://a:4222";
        let b = "nats://b:4222";
        let pick = |pool: &[Server]| d.next(pool).unwrap().addr.as_url_str().to_string();
        // first attempt: the first server, at once
        let first = d.next(&[server(a, 0), server(b, 0)]).unwrap();
        assert_eq!(first.addr.as_url_str(), a);
        assert_eq!(first.delay, Some(Duration::ZERO));
        // a failed: b next, after a back-off
        let second = d.next(&[server(a, 1), server(b, 0)]).unwrap();
        assert_eq!(second.addr.as_url_str(), b);
        assert!(second.delay.unwrap() >= Duration::from_millis(50));
        assert_eq!(d.state.lock().unwrap().failures, 1);
        // b connected (its count did not grow) and later dropped: b has 0, a 1
        assert_eq!(pick(&[server(a, 1), server(b, 0)]), b);
        assert_eq!(d.state.lock().unwrap().failures, 0);
        // both failed once: configured order again
        assert_eq!(pick(&[server(a, 1), server(b, 1)]), a);
    }
}
