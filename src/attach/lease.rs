//! The lease that makes one attached bridge per trade-feed the active one.
//!
//! It is a key (named after the trade-feed URL and path) in a JetStream
//! key-value bucket whose entries expire `lease_ttl` after they are written
//! (the bucket's `max_age`). The holder rewrites it every third of the TTL
//! with a compare-and-set on its revision; the others try to create it at
//! the same pace, which succeeds only once it has expired or been deleted.
//!
//! - A holder that cannot renew (NATS unreachable) stops mirroring when the
//!   TTL, counted from the start of its last successful renewal, is nearly
//!   over: before the key can expire on the server, so two bridges never
//!   mirror at once, as long as the clocks of bridge and server advance at
//!   the same rate.
//! - A standby takes over at most `lease_ttl` + `lease_ttl`/3 after the
//!   holder's last renewal (plus a NATS round trip), so within that time of
//!   the holder's death.
//! - On a graceful stop the holder deletes the key: a standby takes over
//!   within `lease_ttl`/3.
//! - A holder that finds the key still holding its own instance id (after a
//!   short NATS outage) takes it back at once. With a random instance id a
//!   restarted bridge is a new holder and waits like any standby.
//!
//! Limitations: the lease follows NATS, not trade-feed. A holder that can
//! reach NATS but not trade-feed keeps the lease and buffers; it does not
//! hand over to a standby that could reach trade-feed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use bytes::Bytes;

use super::{Attach, Role};
use crate::nats::backoff;

/// The holder stops mirroring this fraction of the TTL before its lease
/// could expire, to leave room for the renewal's round trip.
const MARGIN_DIVISOR: u32 = 6;

struct Lease {
    kv: Store,
    key: String,
    me: Bytes,
    ttl: Duration,
}

/// Keeps (or waits for) the lease until shutdown, then gives it up.
pub(super) async fn keep(attach: Arc<Attach>, client: async_nats::Client) {
    let mut stop = attach.stop.subscribe();
    loop {
        let lease = tokio::select! {
            l = open(&attach, &client) => l,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(lease) = lease else { break };
        if hold(&attach, &lease, &mut stop, &client).await == Ended::Stopped {
            break;
        }
        tracing::warn!("the attach lease bucket stopped answering; opening it again");
    }
    attach.lease_done.notify_one();
}

/// Opens (or creates) the bucket, retrying until it works.
async fn open(attach: &Attach, client: &async_nats::Client) -> Option<Lease> {
    let cfg = &attach.bridge.config.attach;
    let js = async_nats::jetstream::new(client.clone());
    let mut attempt = 0usize;
    let kv = loop {
        wait_for_nats(attach, client).await;
        match get_or_create(&js, &cfg.lease_bucket, cfg.lease_ttl).await {
            Ok(kv) => break kv,
            Err(e) => {
                attempt += 1;
                let problem = format!(
                    "cannot open the attach lease bucket {}: {e} (attach mode needs JetStream: \
                     nats-server -js; or set attach.lease = false when only one bridge attaches \
                     to this trade-feed)",
                    cfg.lease_bucket
                );
                attach
                    .bridge
                    .warn_limited("lease_bucket", format_args!("{problem}"));
                attach.set_lease_problem(Some(problem));
                tokio::time::sleep(backoff(attempt + 1, Duration::from_secs(5))).await;
            }
        }
    };
    attach.set_lease_problem(None);
    let ttl = match kv.status().await {
        Ok(s) if !s.info.config.max_age.is_zero() => s.info.config.max_age,
        _ => cfg.lease_ttl,
    };
    if ttl != cfg.lease_ttl {
        tracing::warn!(
            bucket = %cfg.lease_bucket,
            bucket_ttl = ?ttl,
            configured = ?cfg.lease_ttl,
            "the lease bucket exists with another TTL; using the bucket's"
        );
    }
    let key = lease_key(&cfg.url, &cfg.path);
    tracing::info!(bucket = %cfg.lease_bucket, %key, ?ttl, "attach lease");
    Some(Lease {
        kv,
        key,
        me: Bytes::from(attach.bridge.instance_id.clone()),
        ttl,
    })
}

fn nats_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

async fn wait_for_nats(attach: &Attach, client: &async_nats::Client) {
    while !nats_connected(client) {
        let _ = tokio::time::timeout(Duration::from_millis(250), attach.bridge.nats_up.notified())
            .await;
    }
}

async fn get_or_create(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    ttl: Duration,
) -> Result<Store, async_nats::Error> {
    if let Ok(kv) = js.get_key_value(bucket).await {
        return Ok(kv);
    }
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: bucket.to_string(),
            history: 1,
            max_age: ttl,
            ..Default::default()
        })
        .await?;
    Ok(kv)
}

/// The key for a trade-feed: the endpoint the bridge connects to (URL and
/// path joined as the connection joins them), normalised as a URL (scheme
/// and host in lower case, no default port, no credentials, no trailing
/// slash) so that every spelling of one trade-feed shares one lease, with
/// every character a key may not hold replaced.
fn lease_key(url: &str, path: &str) -> String {
    let joined = format!(
        "{}{}",
        url.trim_end_matches('/'),
        path.trim_end_matches('/')
    );
    let endpoint = match url::Url::parse(&joined) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => joined,
    };
    endpoint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What this bridge knows of the lease.
#[derive(Clone, Copy)]
struct Held {
    revision: u64,
    /// Before this instant nobody else can hold it.
    safe_until: Instant,
}

/// Why [`hold`] returned.
#[derive(PartialEq, Eq)]
enum Ended {
    Stopped,
    /// The bucket keeps failing while NATS is up (deleted, or JetStream
    /// restarted without it): open it again.
    Reopen,
}

/// Failed attempts in a row, with NATS up, before the bucket is reopened.
const REOPEN_AFTER_FAILURES: u32 = 3;

async fn hold(
    attach: &Attach,
    lease: &Lease,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    client: &async_nats::Client,
) -> Ended {
    let period = lease.ttl / 3;
    let margin = (lease.ttl / MARGIN_DIVISOR).max(Duration::from_millis(100));
    let mut held: Option<Held> = None;
    let mut holder_told = String::new();
    let mut failures = 0u32;
    let ended = loop {
        let started = Instant::now();
        let safe_until = started + lease.ttl.saturating_sub(margin);
        held = match held {
            Some(h) => renew(attach, lease, h, safe_until, period).await,
            None => match acquire(attach, lease, safe_until, period, &mut holder_told).await {
                Acquired::Held(h) => Some(h),
                Acquired::Waiting => None,
                Acquired::Failed => {
                    failures += u32::from(nats_connected(client));
                    None
                }
            },
        };
        if held.is_some() || !holder_told.is_empty() {
            failures = 0;
        }
        if failures >= REOPEN_AFTER_FAILURES {
            break Ended::Reopen;
        }
        let rest = period.saturating_sub(started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(rest) => {}
            _ = stop.wait_for(|s| *s) => break Ended::Stopped,
        }
    };
    if let Some(h) = held {
        release(lease, h).await;
    }
    ended
}

async fn renew(
    attach: &Attach,
    lease: &Lease,
    h: Held,
    safe_until: Instant,
    period: Duration,
) -> Option<Held> {
    let outcome = tokio::time::timeout(
        period,
        lease.kv.update(&lease.key, lease.me.clone(), h.revision),
    )
    .await;
    match outcome {
        Ok(Ok(revision)) => Some(Held {
            revision,
            safe_until,
        }),
        Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
            attach.set_role(Role::Standby, "another bridge holds the attach lease");
            None
        }
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {period:?}"),
            };
            if Instant::now() < h.safe_until {
                attach.bridge.warn_limited(
                    "lease_renewal",
                    format_args!("could not renew the attach lease ({why}); still holding it"),
                );
                return Some(h);
            }
            attach.set_role(Role::Standby, "could not renew the attach lease in time");
            None
        }
    }
}

/// What an attempt to take the lease gave.
enum Acquired {
    Held(Held),
    /// Another bridge holds it, or it could not be told.
    Waiting,
    /// The bucket refused the request.
    Failed,
}

async fn acquire(
    attach: &Attach,
    lease: &Lease,
    safe_until: Instant,
    period: Duration,
    holder_told: &mut String,
) -> Acquired {
    let created = tokio::time::timeout(period, lease.kv.create(&lease.key, lease.me.clone())).await;
    let revision = match created {
        Ok(Ok(revision)) => revision,
        Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {
            match reclaim_or_wait(attach, lease, period, holder_told).await {
                Some(revision) => revision,
                None => return Acquired::Waiting,
            }
        }
        Ok(Err(e)) => {
            attach.set_peer_active(false);
            holder_told.clear();
            attach.bridge.warn_limited(
                "lease_acquire",
                format_args!("cannot take the attach lease: {e}"),
            );
            return Acquired::Failed;
        }
        Err(_) => {
            attach.set_peer_active(false);
            holder_told.clear();
            return Acquired::Waiting;
        }
    };
    holder_told.clear();
    attach.set_peer_active(false);
    attach.set_role(Role::Active, "holding the attach lease");
    Acquired::Held(Held {
        revision,
        safe_until,
    })
}

/// The key exists: ours from before (take it back) or another bridge's.
async fn reclaim_or_wait(
    attach: &Attach,
    lease: &Lease,
    period: Duration,
    holder_told: &mut String,
) -> Option<u64> {
    let entry = match tokio::time::timeout(period, lease.kv.entry(&lease.key)).await {
        Ok(Ok(Some(e))) if e.operation == Operation::Put => e,
        _ => return None,
    };
    if entry.value == lease.me {
        let update = lease
            .kv
            .update(&lease.key, lease.me.clone(), entry.revision);
        if let Ok(Ok(revision)) = tokio::time::timeout(period, update).await {
            return Some(revision);
        }
        return None;
    }
    attach.set_peer_active(true);
    let holder = String::from_utf8_lossy(&entry.value).into_owned();
    if *holder_told != holder {
        tracing::info!(%holder, "another bridge holds the attach lease: standing by");
        *holder_told = holder;
    }
    None
}

async fn release(lease: &Lease, h: Held) {
    let delete = lease
        .kv
        .delete_expect_revision(&lease.key, Some(h.revision));
    match tokio::time::timeout(Duration::from_secs(2), delete).await {
        Ok(Ok(())) => tracing::info!("gave up the attach lease"),
        Ok(Err(e)) => tracing::warn!("could not give up the attach lease: {e}"),
        Err(_) => tracing::warn!("could not give up the attach lease: no answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_keys_are_valid_nats_keys() {
        let k = lease_key("http://trade-feed:18086", "/socket.io");
        assert_eq!(k, "http___trade-feed_18086_socket_io");
        assert!(k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }

    /// Spellings of one trade-feed endpoint share one lease, or two bridges
    /// would both mirror it and double every message.
    #[test]
    fn one_trade_feed_has_one_lease_key_however_it_is_spelt() {
        let key = lease_key("http://trade-feed:18086", "/socket.io");
        for (url, path) in [
            ("http://trade-feed:18086/", "/socket.io"),
            ("http://trade-feed:18086", "/socket.io/"),
            ("http://trade-feed:18086//", "/socket.io//"),
            ("HTTP://Trade-Feed:18086", "/socket.io"),
            ("http://bridge:s3cret@trade-feed:18086", "/socket.io"),
        ] {
            assert_eq!(lease_key(url, path), key, "{url} {path}");
        }
        assert_eq!(
            lease_key("http://trade-feed:80", "/socket.io"),
            lease_key("http://trade-feed", "/socket.io")
        );
        assert_eq!(
            lease_key("https://trade-feed:443/", "/socket.io"),
            lease_key("https://trade-feed", "/socket.io")
        );
        for (url, path) in [
            ("http://trade-feed:18087", "/socket.io"),
            ("http://other-feed:18086", "/socket.io"),
            ("http://trade-feed:18086", "/trade-feed"),
            ("https://trade-feed:18086", "/socket.io"),
        ] {
            assert_ne!(lease_key(url, path), key, "{url} {path}");
        }
        assert!(
            !lease_key("http://bridge:s3cret@trade-feed:18086", "/socket.io").contains("s3cret")
        );
    }
}
