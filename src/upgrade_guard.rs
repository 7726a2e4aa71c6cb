//! Keeps a polling client's upgrade to WebSocket from closing its session.
//!
//! socket.io clients that start on HTTP long-polling (the default for the
//! browser, Node and Java clients) open the WebSocket probe and send their
//! next polling GET at the same instant. engineioxide 0.17 answers a GET
//! during an upgrade with a NOOP packet, but it decides that in two steps: it
//! reads the "upgrading" flag, then tries the session's receive lock. When
//! the upgrade task sets the flag and takes the lock between those two
//! steps, the GET finds the lock taken, the session is closed as "multiple
//! HTTP polling" and the client gets HTTP 400 before it ever connected
//! (seen about once in 3,000 connections on a loaded 2-core machine; the
//! Node hub has no such window).
//!
//! The guard closes the window from outside the library. A WebSocket request
//! that upgrades an existing session is noted under a lock before it reaches
//! engineioxide; a polling GET for a noted session is answered with a NOOP
//! by the guard, which is what engineioxide itself answers once the upgrade
//! has begun; every other polling GET is polled for the first time, up to
//! and including its lock attempt, under the same lock. So either the GET
//! holds the session's receive lock before the upgrade task asks for it (and
//! the upgrade waits for it, as designed), or it never reaches the lock.
//!
//! A note lasts [`NOTE_LIFETIME`]: long enough for the upgrade task to
//! start, so that engineioxide answers the GETs from then on; short enough
//! that a refused or failed probe costs the client at most that long of
//! empty polls before it sees the real outcome.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

/// How long a noted upgrade makes the guard answer polling GETs itself.
pub const NOTE_LIFETIME: Duration = Duration::from_secs(2);

/// Shards of the note table, so unrelated sessions rarely share a lock.
const SHARDS: usize = 16;

/// Upgrades in progress, by session id, each with the time it was noted.
#[derive(Default)]
pub struct UpgradeGuard {
    shards: [Mutex<HashMap<Box<str>, Instant>>; SHARDS],
}

/// What an Engine.IO request is, as far as the guard cares.
#[derive(Debug, PartialEq, Eq)]
enum Kind<'a> {
    /// A long-polling GET on an open session.
    Poll {
        sid: &'a str,
        v3: bool,
    },
    /// A WebSocket request that upgrades an open session.
    Upgrade {
        sid: &'a str,
    },
    Other,
}

fn classify<'a>(method: &Method, query: Option<&'a str>) -> Kind<'a> {
    let Some(query) = query else {
        return Kind::Other;
    };
    if method != Method::GET {
        return Kind::Other;
    }
    let (mut sid, mut transport, mut v3) = (None, None, false);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sid", v)) => sid = Some(v),
            Some(("transport", v)) => transport = Some(v),
            Some(("EIO", v)) => v3 = v == "3",
            _ => {}
        }
    }
    match (sid, transport) {
        (Some(sid), Some("polling")) if !sid.is_empty() => Kind::Poll { sid, v3 },
        (Some(sid), Some("websocket")) if !sid.is_empty() => Kind::Upgrade { sid },
        _ => Kind::Other,
    }
}

impl UpgradeGuard {
    fn shard(&self, sid: &str) -> &Mutex<HashMap<Box<str>, Instant>> {
        let h = sid
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31) ^ usize::from(b));
        &self.shards[h % SHARDS]
    }

    fn lock(&self, sid: &str) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Instant>> {
        self.shard(sid).lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes an upgrade of `sid`, and forgets the shard's expired notes.
    fn note(&self, sid: &str, now: Instant) {
        let mut notes = self.lock(sid);
        notes.retain(|_, at| now.duration_since(*at) < NOTE_LIFETIME);
        notes.insert(sid.into(), now);
    }

    fn forget(&self, sid: &str) {
        self.lock(sid).remove(sid);
    }

    /// The middleware: placed directly in front of the Socket.IO service.
    pub async fn run(self: Arc<Self>, req: Request<Body>, next: Next) -> Response {
        let (poll_sid, v3) = match classify(req.method(), req.uri().query()) {
            Kind::Other => return next.run(req).await,
            Kind::Upgrade { sid } => {
                let sid = sid.to_owned();
                self.note(&sid, Instant::now());
                let res = next.run(req).await;
                if res.status() != StatusCode::SWITCHING_PROTOCOLS {
                    // refused: no upgrade will start, the polls go on
                    self.forget(&sid);
                }
                return res;
            }
            Kind::Poll { sid, v3 } => (sid.to_owned(), v3),
        };
        let mut run = pin!(next.run(req));
        let mut first = true;
        poll_fn(|cx| {
            if !first {
                return run.as_mut().poll(cx);
            }
            first = false;
            let notes = self.lock(&poll_sid);
            if notes
                .get(poll_sid.as_str())
                .is_some_and(|at| at.elapsed() < NOTE_LIFETIME)
            {
                return Poll::Ready(noop(v3));
            }
            // engineioxide takes or fails the session lock in this first
            // poll, before its first await, while the note table is locked
            let polled = run.as_mut().poll(cx);
            drop(notes);
            polled
        })
        .await
    }
}

/// A polling response holding one NOOP packet, encoded as engineioxide
/// encodes it for the session's protocol.
fn noop(v3: bool) -> Response {
    let body: &'static str = if v3 { "1:6" } else { "6" };
    let mut res = Response::new(Body::from(body));
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_apart() {
        let get = Method::GET;
        assert_eq!(
            classify(&get, Some("EIO=4&transport=polling&t=x&sid=abc")),
            Kind::Poll {
                sid: "abc",
                v3: false
            }
        );
        assert_eq!(
            classify(&get, Some("EIO=3&transport=polling&sid=abc")),
            Kind::Poll {
                sid: "abc",
                v3: true
            }
        );
        assert_eq!(
            classify(&get, Some("EIO=4&transport=websocket&sid=abc")),
            Kind::Upgrade { sid: "abc" }
        );
        // a handshake, a direct WebSocket, a POST and a non-Engine.IO request
        assert_eq!(classify(&get, Some("EIO=4&transport=polling")), Kind::Other);
        assert_eq!(
            classify(&get, Some("EIO=4&transport=websocket")),
            Kind::Other
        );
        assert_eq!(
            classify(&Method::POST, Some("EIO=4&transport=polling&sid=abc")),
            Kind::Other
        );
        assert_eq!(classify(&get, None), Kind::Other);
        assert_eq!(classify(&get, Some("transport=polling&sid=")), Kind::Other);
    }

    #[test]
    fn notes_expire_and_are_pruned() {
        let g = UpgradeGuard::default();
        let long_ago = Instant::now() - NOTE_LIFETIME * 2;
        g.note("old", long_ago);
        // a note in the same shard prunes the expired one
        let shard = g.shard("old") as *const _;
        let other = (0..1000)
            .map(|i| format!("s{i}"))
            .find(|s| std::ptr::eq(g.shard(s), shard))
            .unwrap();
        g.note(&other, Instant::now());
        let notes = g.lock("old");
        assert!(!notes.contains_key("old"));
        assert!(notes.contains_key(other.as_str()));
    }
}
