//! The clients of a case: Socket.IO and NATS subscribers that count what
//! they receive, and publishers that send at a pace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::load::{Side, Spec};
use crate::msg::{self, Mark};
use crate::sio;

/// Counters every subscriber adds to.
pub struct Shared {
    /// Deliveries owed for what was sent so far.
    pub owed: AtomicU64,
    /// Woken as deliveries arrive, for publishers held by their window.
    pub progress: tokio::sync::Notify,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    pub last_ns: AtomicU64,
    pub hist: Mutex<Histogram<u64>>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            owed: AtomicU64::new(0),
            progress: tokio::sync::Notify::new(),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            // 1 µs .. 100 s at 3 significant digits.
            hist: Mutex::new(Histogram::new_with_bounds(1, 100_000_000, 3).expect("bounds")),
        }
    }
}

/// Highest sequence number a subscriber keeps track of (a bit each).
const MAX_SEQ: u64 = 1 << 28;
/// Latencies are recorded locally and added to the shared histogram in batches.
const LATENCY_BATCH: usize = 512;

/// One subscriber's view: which (publisher, seq) it has seen.
struct Seen {
    by_publisher: Vec<(u32, Vec<u64>)>,
    latencies: Vec<u64>,
    shared: Arc<Shared>,
}

impl Seen {
    fn new(shared: Arc<Shared>) -> Seen {
        Seen {
            by_publisher: Vec::new(),
            latencies: Vec::with_capacity(LATENCY_BATCH),
            shared,
        }
    }

    fn record(&mut self, m: Mark) {
        let now = msg::now_ns();
        if m.seq >= MAX_SEQ {
            return;
        }
        let i = match self
            .by_publisher
            .iter()
            .position(|(p, _)| *p == m.publisher)
        {
            Some(i) => i,
            None => {
                self.by_publisher.push((m.publisher, Vec::new()));
                self.by_publisher.len() - 1
            }
        };
        let bits = &mut self.by_publisher[i].1;
        let word = (m.seq / 64) as usize;
        if bits.len() <= word {
            bits.resize(word + 1 + word / 2, 0);
        }
        let bit = 1u64 << (m.seq % 64);
        if bits[word] & bit != 0 {
            self.shared.duplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        bits[word] |= bit;
        let n = self.shared.delivered.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(64) {
            self.shared.progress.notify_waiters();
        }
        self.shared.last_ns.fetch_max(now, Ordering::Relaxed);
        self.latencies.push(now.saturating_sub(m.sent_ns) / 1000);
        if self.latencies.len() >= LATENCY_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let mut h = self.shared.hist.lock().unwrap_or_else(|e| e.into_inner());
        for us in self.latencies.drain(..) {
            h.saturating_record(us.max(1));
        }
    }
}

impl Drop for Seen {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What a publisher does: its index, account and share of the rate.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub index: u32,
    pub account: u64,
    /// Messages per second for this publisher; `None`: unlimited.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Without a rate: the most deliveries (over all publishers) that may be
    /// owed and not yet received before this publisher waits; `None` floods.
    pub window: Option<u64>,
    /// Deliveries each message owes (its account's subscribers).
    pub owed_per_message: u64,
}

impl Plan {
    fn total(&self) -> u64 {
        match self.rate {
            Some(r) => (r * self.duration.as_secs_f64()).round().max(1.0) as u64,
            None => u64::MAX,
        }
    }

    /// How many messages should be out by now (`start` + `elapsed`).
    fn due(&self, elapsed: Duration, sent: u64) -> u64 {
        match self.rate {
            Some(r) => ((elapsed.as_secs_f64() * r) as u64 + 1).min(self.total()),
            None => sent + UNLIMITED_BATCH,
        }
    }

    fn next_at(&self, start: Instant, sent: u64) -> Option<Instant> {
        self.rate
            .map(|r| start + Duration::from_secs_f64(sent as f64 / r))
    }

    fn finished(&self, elapsed: Duration, sent: u64) -> bool {
        sent >= self.total() || (self.rate.is_none() && elapsed >= self.duration)
    }
}

/// Waits while more deliveries are owed than the window allows, so an
/// unlimited publisher runs as fast as the server sustains without building
/// an unbounded queue in it.
async fn hold_for_window(plan: &Plan, shared: &Shared) {
    let Some(window) = plan.window else { return };
    for _ in 0..10_000 {
        let owed = shared.owed.load(Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        if owed.saturating_sub(delivered) <= window {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(2), shared.progress.notified()).await;
    }
}

/// Messages written between flushes when publishing without a rate.
const UNLIMITED_BATCH: u64 = 64;

// ------------------------------------------------------------------ subscribers

pub fn subscriber(
    spec: &Spec,
    account: u64,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    gate: Arc<Semaphore>,
    ready: oneshot::Sender<anyhow::Result<()>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let side = spec.subscribe;
    let (sio_port, nats_port) = (spec.sio_port, spec.nats_port);
    async move {
        let permit = gate.acquire_owned().await.expect("semaphore open");
        match side {
            Side::Sio => match sio::connect(sio_port).await {
                Ok(mut c) => match c.subscribe(&msg::topic(account)).await {
                    Ok(()) => {
                        drop(permit);
                        let _ = ready.send(Ok(()));
                        sio_subscriber(c, Seen::new(shared), stop).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                },
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
            Side::Nats => match nats_subscribe(nats_port, account).await {
                Ok((client, sub)) => {
                    drop(permit);
                    let _ = ready.send(Ok(()));
                    nats_subscriber(client, sub, Seen::new(shared), stop).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
        }
    }
}

async fn sio_subscriber(mut c: sio::Conn, mut seen: Seen, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = c.ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if t.as_str() == "2" {
                        if c.ws.send(Message::text("3")).await.is_err() {
                            break;
                        }
                    } else if let Some(mark) = msg::find_mark(t.as_bytes()) {
                        seen.record(mark);
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = c.ws.close(None).await;
}

async fn nats_connect(port: u16) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 18)
        .client_capacity(1 << 14)
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .context("cannot connect to nats-server")
}

async fn nats_subscribe(
    port: u16,
    account: u64,
) -> anyhow::Result<(async_nats::Client, async_nats::Subscriber)> {
    let client = nats_connect(port).await?;
    let sub = client.subscribe(msg::subject(account)).await?;
    client.flush().await?;
    Ok((client, sub))
}

async fn nats_subscriber(
    _client: async_nats::Client,
    mut sub: async_nats::Subscriber,
    mut seen: Seen,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = sub.next() => match m {
                Some(m) => {
                    if let Some(mark) = msg::find_mark(&m.payload) {
                        seen.record(mark);
                    }
                }
                None => break,
            },
        }
    }
}

// ------------------------------------------------------------------ publishers

#[allow(clippy::too_many_arguments)]
pub fn publisher(
    spec: &Spec,
    plan: Plan,
    go: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    gate: Arc<Semaphore>,
    ready: oneshot::Sender<anyhow::Result<()>>,
    count: oneshot::Sender<anyhow::Result<u64>>,
    shared: Arc<Shared>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let side = spec.publish;
    let (sio_port, nats_port) = (spec.sio_port, spec.nats_port);
    let headers = bridge_headers(spec.nats_headers, plan.account);
    async move {
        let permit = gate.acquire_owned().await.expect("semaphore open");
        match side {
            Side::Sio => match sio::connect(sio_port).await {
                Ok(c) => {
                    drop(permit);
                    let _ = ready.send(Ok(()));
                    sio_publisher(c, plan, go, stop, count, shared).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
            Side::Nats => match nats_connect(nats_port).await {
                Ok(c) => {
                    drop(permit);
                    let _ = ready.send(Ok(()));
                    nats_publisher(c, plan, headers, go, stop, count, shared).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
        }
    }
}

async fn wait_go(go: &mut watch::Receiver<bool>) {
    let _ = go.wait_for(|g| *g).await;
}

async fn sio_publisher(
    c: sio::Conn,
    plan: Plan,
    mut go: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    count: oneshot::Sender<anyhow::Result<u64>>,
    shared: Arc<Shared>,
) {
    let (mut sink, mut stream) = c.ws.split();
    // The server pings every 25 s; the reader hands pings to the writer.
    let (ping_tx, mut ping_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(&m, Message::Text(t) if t.as_str() == "2") && ping_tx.send(()).is_err() {
                break;
            }
        }
    });
    wait_go(&mut go).await;
    let topic = msg::topic(plan.account);
    let (mut payload, mut frame) = (String::new(), String::new());
    let start = Instant::now();
    let mut sent = 0u64;
    let mut failed = None;
    'send: loop {
        let elapsed = start.elapsed();
        if plan.finished(elapsed, sent) {
            break;
        }
        hold_for_window(&plan, &shared).await;
        let due = plan.due(elapsed, sent);
        shared
            .owed
            .fetch_add((due - sent) * plan.owed_per_message, Ordering::Relaxed);
        while sent < due {
            msg::position(&mut payload, plan.account, plan.index, sent, msg::now_ns());
            sio::publish_frame(&mut frame, &topic, "Position", &payload);
            if let Err(e) = sink.feed(Message::text(frame.as_str())).await {
                failed = Some(e);
                break 'send;
            }
            sent += 1;
        }
        while ping_rx.try_recv().is_ok() {
            let _ = sink.feed(Message::text("3")).await;
        }
        if let Err(e) = sink.flush().await {
            failed = Some(e);
            break;
        }
        if let Some(at) = plan.next_at(start, sent) {
            tokio::time::sleep_until(at.into()).await;
        }
    }
    let _ = count.send(match failed {
        Some(e) => Err(anyhow::anyhow!("publisher {}: {e}", plan.index)),
        None => Ok(sent),
    });
    // Stay connected (answering pings) until the case ends.
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            p = ping_rx.recv() => match p {
                Some(()) => { let _ = sink.send(Message::text("3")).await; }
                None => break,
            },
        }
    }
    let _ = sink.close().await;
    reader.abort();
}

/// The first `n` of the headers a bridge put on its mirrors.
fn bridge_headers(n: u8, account: u64) -> Option<async_nats::HeaderMap> {
    let all = [
        (
            "Tradefeed-Bridge-Origin",
            "tfb-3f2a9c41d07b4e55".to_string(),
        ),
        ("Tradefeed-Legacy-Topic", msg::topic(account)),
        ("Tradefeed-Legacy-From", "x0Pn2dYtK3bWqAAAB".to_string()),
    ];
    (n > 0).then(|| {
        let mut h = async_nats::HeaderMap::new();
        for (name, value) in all.into_iter().take(n.into()) {
            h.insert(name, value.as_str());
        }
        h
    })
}

#[allow(clippy::too_many_arguments)]
async fn nats_publisher(
    client: async_nats::Client,
    plan: Plan,
    headers: Option<async_nats::HeaderMap>,
    mut go: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    count: oneshot::Sender<anyhow::Result<u64>>,
    shared: Arc<Shared>,
) {
    wait_go(&mut go).await;
    let subject = msg::subject(plan.account);
    let (mut payload, mut body) = (String::new(), String::new());
    let start = Instant::now();
    let mut sent = 0u64;
    let mut failed = None;
    'send: loop {
        let elapsed = start.elapsed();
        if plan.finished(elapsed, sent) {
            break;
        }
        hold_for_window(&plan, &shared).await;
        let due = plan.due(elapsed, sent);
        shared
            .owed
            .fetch_add((due - sent) * plan.owed_per_message, Ordering::Relaxed);
        while sent < due {
            msg::position(&mut payload, plan.account, plan.index, sent, msg::now_ns());
            msg::nats_envelope(&mut body, &subject, &payload);
            let bytes = bytes::Bytes::copy_from_slice(body.as_bytes());
            let published = match &headers {
                Some(h) => {
                    client
                        .publish_with_headers(subject.clone(), h.clone(), bytes)
                        .await
                }
                None => client.publish(subject.clone(), bytes).await,
            };
            if let Err(e) = published {
                failed = Some(anyhow::anyhow!("publisher {}: {e}", plan.index));
                break 'send;
            }
            sent += 1;
        }
        // async-nats writes as soon as its connection task is idle: no
        // flush per batch, which would add a wait to every tick.
        if let Some(at) = plan.next_at(start, sent) {
            tokio::time::sleep_until(at.into()).await;
        }
    }
    if failed.is_none() {
        if let Err(e) = client.flush().await {
            failed = Some(anyhow::anyhow!("publisher {}: flush: {e}", plan.index));
        }
    }
    let _ = count.send(match failed {
        Some(e) => Err(e),
        None => Ok(sent),
    });
    let _ = stop.changed().await;
}
