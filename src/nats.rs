//! The NATS connection, built from the configuration.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use rand::Rng;

use crate::bridge::Bridge;
use crate::config::NatsConfig;
use crate::telemetry;

/// Connects (retrying in the background if the broker is not up yet) and
/// reports every state change in the log and in metrics.
pub async fn connect(cfg: &NatsConfig, bridge: &Arc<Bridge>) -> anyhow::Result<async_nats::Client> {
    connect_as(cfg, bridge, true).await
}

/// A second connection that receives the bridge's own publishes: the bridge
/// competes in point-to-point queue groups on it, where a message it
/// published itself may be handed back to it for a legacy consumer.
pub async fn connect_queue_member(
    cfg: &NatsConfig,
    bridge: &Arc<Bridge>,
) -> anyhow::Result<async_nats::Client> {
    connect_as(cfg, bridge, false).await
}

async fn connect_as(
    cfg: &NatsConfig,
    bridge: &Arc<Bridge>,
    primary: bool,
) -> anyhow::Result<async_nats::Client> {
    let mut opts = match (&cfg.credentials_file, &cfg.nkey_seed, &cfg.token, &cfg.user) {
        (Some(path), _, _, _) => ConnectOptions::with_credentials_file(path).await?,
        (None, Some(seed), _, _) => ConnectOptions::with_nkey(seed.expose().to_string()),
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
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    let max_delay = cfg.reconnect_delay_max;
    let events_bridge = bridge.clone();
    if primary {
        opts = opts.name(&cfg.name).no_echo();
    } else {
        opts = opts.name(format!("{}-queue-member", cfg.name));
    }
    opts = opts
        .retry_on_initial_connect()
        .connection_timeout(cfg.connect_timeout)
        .max_reconnects(if cfg.max_reconnects == 0 {
            None
        } else {
            Some(cfg.max_reconnects)
        })
        .reconnect_delay_callback(move |attempts| backoff(attempts, max_delay))
        .event_callback(move |event| {
            let bridge = events_bridge.clone();
            async move {
                if primary {
                    on_event(&bridge, event)
                } else {
                    tracing::info!("NATS queue-member connection: {event}");
                }
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

fn on_event(bridge: &Bridge, event: Event) {
    match event {
        Event::Connected => {
            bridge.metrics.nats_connected.set(1.0);
            bridge.learn_server_limit();
            if let Some(c) = bridge.nats() {
                let info = c.server_info();
                tracing::info!(
                    server = %info.server_name,
                    version = %info.version,
                    max_payload = info.max_payload,
                    "NATS connected"
                );
            }
        }
        Event::Disconnected => {
            bridge.metrics.nats_connected.set(0.0);
            tracing::warn!("NATS disconnected; reconnecting");
        }
        Event::SlowConsumer(sid) => {
            telemetry::dropped("", telemetry::TO_SOCKETIO, "nats_slow_consumer", 1);
            bridge.warn_limited(
                "nats_slow_consumer",
                format_args!("NATS subscription {sid} is a slow consumer: messages were dropped"),
            );
        }
        Event::LameDuckMode => tracing::warn!("NATS server entered lame duck mode"),
        Event::Draining => tracing::info!("NATS connection draining"),
        Event::Closed => {
            bridge.metrics.nats_connected.set(0.0);
            tracing::error!("NATS connection closed");
        }
        Event::ServerError(e) => tracing::error!("NATS server error: {e}"),
        Event::ClientError(e) => tracing::error!("NATS client error: {e}"),
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
}
