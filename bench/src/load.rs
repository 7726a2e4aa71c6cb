//! One benchmark case: connect subscribers and publishers, publish at a
//! fixed aggregate rate (or as fast as the server takes it) for a while,
//! wait for stragglers, then count what arrived, once or twice, and how late.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::msg::{self, Mark};
use crate::procs::{self, TICKS_PER_SEC};
use crate::sio;

/// Which bus a publisher or subscriber uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Sio,
    Nats,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub publish: Side,
    pub subscribe: Side,
    pub publishers: usize,
    pub subscribers: usize,
    /// Publisher `i` publishes on account `i % accounts`; subscriber `j`
    /// listens to account `j % accounts`.
    pub accounts: usize,
    /// Aggregate messages per second over all publishers; `None`: unlimited.
    pub rate: Option<u64>,
    pub duration: Duration,
    /// Longest wait for messages still on their way after the last send.
    pub drain: Duration,
    /// Idle time between connecting and publishing.
    pub settle: Duration,
    /// The Socket.IO server under test.
    pub sio_port: u16,
    pub nats_port: u16,
    /// Processes whose CPU and memory are reported: (name, pid).
    pub watch: Vec<(String, u32)>,
    /// How many connections are opened at once.
    pub connect_parallelism: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcUsage {
    pub name: String,
    /// CPU time over the publishing window, as % of one core.
    pub cpu_pct: f64,
    /// Resident memory when publishing started (everyone connected).
    pub rss_idle_mb: f64,
    pub rss_peak_mb: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub sent: u64,
    /// Deliveries owed: each message times the subscribers of its account.
    pub expected: u64,
    /// Distinct deliveries received.
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub sent_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub latency: Latency,
    /// First send to last delivery.
    pub elapsed_s: f64,
    pub connect_s: f64,
    /// The load generator's own CPU over the window (% of one core).
    pub client_cpu_pct: f64,
    pub procs: Vec<ProcUsage>,
}

/// Counters every subscriber adds to.
struct Shared {
    delivered: AtomicU64,
    duplicated: AtomicU64,
    last_ns: AtomicU64,
    hist: Mutex<Histogram<u64>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
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
        self.shared.delivered.fetch_add(1, Ordering::Relaxed);
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
struct Plan {
    index: u32,
    account: u64,
    /// Messages per second for this publisher; `None`: unlimited.
    rate: Option<f64>,
    duration: Duration,
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

/// Messages written between flushes when publishing without a rate.
const UNLIMITED_BATCH: u64 = 64;

/// Runs one case end to end.
pub async fn run(spec: &Spec) -> anyhow::Result<Outcome> {
    let shared = Arc::new(Shared::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(spec.connect_parallelism.max(1)));

    // Subscribers first, each confirmed in its room or on its subject.
    let mut subs = Vec::with_capacity(spec.subscribers);
    let mut ready = Vec::with_capacity(spec.subscribers);
    for j in 0..spec.subscribers {
        let account = msg::FIRST_ACCOUNT + (j % spec.accounts) as u64;
        let (ready_tx, ready_rx) = oneshot::channel();
        ready.push(ready_rx);
        let task = subscriber(
            spec,
            account,
            shared.clone(),
            stop_rx.clone(),
            gate.clone(),
            ready_tx,
        );
        subs.push(tokio::spawn(task));
    }
    for r in ready {
        r.await.context("a subscriber task ended")??;
    }

    // Then publishers, connected but holding their fire until `go`.
    let (go_tx, go_rx) = watch::channel(false);
    let mut pubs = Vec::with_capacity(spec.publishers);
    let mut counts = Vec::with_capacity(spec.publishers);
    let mut ready = Vec::with_capacity(spec.publishers);
    for i in 0..spec.publishers {
        let plan = Plan {
            index: i as u32,
            account: msg::FIRST_ACCOUNT + (i % spec.accounts) as u64,
            rate: spec.rate.map(|r| r as f64 / spec.publishers as f64),
            duration: spec.duration,
        };
        let (ready_tx, ready_rx) = oneshot::channel();
        let (count_tx, count_rx) = oneshot::channel();
        ready.push(ready_rx);
        counts.push((plan.account, count_rx));
        let task = publisher(
            spec,
            plan,
            go_rx.clone(),
            stop_rx.clone(),
            gate.clone(),
            ready_tx,
            count_tx,
        );
        pubs.push(tokio::spawn(task));
    }
    for r in ready {
        r.await.context("a publisher task ended")??;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    tokio::time::sleep(spec.settle).await;

    // Publish, watching the servers.
    let before: Vec<_> = spec
        .watch
        .iter()
        .map(|(_, pid)| procs::usage(*pid))
        .collect();
    let me_before = procs::usage(procs::self_pid());
    let peaks = Arc::new(Mutex::new(vec![0u64; spec.watch.len()]));
    let sampler = tokio::spawn(sample_rss(
        spec.watch.clone(),
        peaks.clone(),
        stop_rx.clone(),
    ));
    let t0 = Instant::now();
    let t0_ns = msg::now_ns();
    let _ = go_tx.send(true);
    let mut sent_by_account = vec![0u64; spec.accounts];
    for (account, rx) in counts {
        let n = rx.await.context("a publisher failed")??;
        sent_by_account[(account - msg::FIRST_ACCOUNT) as usize] += n;
    }
    let sent: u64 = sent_by_account.iter().sum();
    let expected: u64 = (0..spec.subscribers)
        .map(|j| sent_by_account[j % spec.accounts])
        .sum();
    let sending_s = t0.elapsed().as_secs_f64();
    wait_delivered(&shared, expected, spec.drain).await;
    let wall = t0.elapsed().as_secs_f64();

    let after: Vec<_> = spec
        .watch
        .iter()
        .map(|(_, pid)| procs::usage(*pid))
        .collect();
    let me_after = procs::usage(procs::self_pid());
    let _ = stop_tx.send(true);
    for t in subs.into_iter().chain(pubs) {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let _ = sampler.await;

    let delivered = shared.delivered.load(Ordering::Relaxed);
    let last = shared.last_ns.load(Ordering::Relaxed).max(t0_ns);
    let span = ((last - t0_ns) as f64 / 1e9).max(1e-6);
    let peaks = peaks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let lat = latency(&shared.hist.lock().unwrap_or_else(|e| e.into_inner()));
    let procs = spec
        .watch
        .iter()
        .enumerate()
        .map(|(i, (name, _))| usage_between(name, before[i], after[i], peaks[i], wall))
        .collect();
    Ok(Outcome {
        sent,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicated: shared.duplicated.load(Ordering::Relaxed),
        sent_per_sec: sent as f64 / sending_s.max(1e-6),
        deliveries_per_sec: delivered as f64 / span,
        latency: lat,
        elapsed_s: span,
        connect_s,
        client_cpu_pct: usage_between("", me_before, me_after, 0, wall).cpu_pct,
        procs,
    })
}

/// Until every owed delivery arrived, nothing arrived for a second, or `drain` ran out.
async fn wait_delivered(shared: &Shared, expected: u64, drain: Duration) {
    const QUIET: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + drain;
    let mut last = shared.delivered.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while Instant::now() < deadline {
        let now = shared.delivered.load(Ordering::Relaxed);
        if now >= expected {
            return;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= QUIET {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn usage_between(
    name: &str,
    before: Option<procs::Usage>,
    after: Option<procs::Usage>,
    peak_kb: u64,
    wall_s: f64,
) -> ProcUsage {
    let (b, a) = (before.unwrap_or_default(), after.unwrap_or_default());
    let ticks = a.cpu_ticks.saturating_sub(b.cpu_ticks) as f64;
    ProcUsage {
        name: name.to_string(),
        cpu_pct: ticks / TICKS_PER_SEC / wall_s.max(1e-6) * 100.0,
        rss_idle_mb: b.rss_kb as f64 / 1024.0,
        rss_peak_mb: peak_kb.max(a.rss_kb).max(b.rss_kb) as f64 / 1024.0,
    }
}

async fn sample_rss(
    watch: Vec<(String, u32)>,
    peaks: Arc<Mutex<Vec<u64>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                let mut p = peaks.lock().unwrap_or_else(|e| e.into_inner());
                for (i, (_, pid)) in watch.iter().enumerate() {
                    if let Some(kb) = procs::rss_kb(*pid) {
                        p[i] = p[i].max(kb);
                    }
                }
            }
        }
    }
}

fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        mean_us: h.mean(),
    }
}

// ------------------------------------------------------------------ subscribers

fn subscriber(
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
fn publisher(
    spec: &Spec,
    plan: Plan,
    go: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    gate: Arc<Semaphore>,
    ready: oneshot::Sender<anyhow::Result<()>>,
    count: oneshot::Sender<anyhow::Result<u64>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let side = spec.publish;
    let (sio_port, nats_port) = (spec.sio_port, spec.nats_port);
    async move {
        let permit = gate.acquire_owned().await.expect("semaphore open");
        match side {
            Side::Sio => match sio::connect(sio_port).await {
                Ok(c) => {
                    drop(permit);
                    let _ = ready.send(Ok(()));
                    sio_publisher(c, plan, go, stop, count).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
            Side::Nats => match nats_connect(nats_port).await {
                Ok(c) => {
                    drop(permit);
                    let _ = ready.send(Ok(()));
                    nats_publisher(c, plan, go, stop, count).await;
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
        let due = plan.due(elapsed, sent);
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

async fn nats_publisher(
    client: async_nats::Client,
    plan: Plan,
    mut go: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    count: oneshot::Sender<anyhow::Result<u64>>,
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
        let due = plan.due(elapsed, sent);
        while sent < due {
            msg::position(&mut payload, plan.account, plan.index, sent, msg::now_ns());
            msg::nats_envelope(&mut body, &subject, &payload);
            let bytes = bytes::Bytes::copy_from_slice(body.as_bytes());
            if let Err(e) = client.publish(subject.clone(), bytes).await {
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
