//! One benchmark case: connect subscribers and publishers, publish at a
//! fixed aggregate rate (or as fast as the server takes it) for a while,
//! wait for stragglers, then count what arrived, once or twice, and how late.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{oneshot, watch, Semaphore};

use crate::clients::{publisher, subscriber, Plan, Shared};
use crate::msg;
use crate::procs::{self, TICKS_PER_SEC};

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
    /// Unlimited publishers keep at most this many messages in flight (sent,
    /// not yet received by every subscriber); `None`: open loop (a flood).
    pub window: Option<u64>,
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
    /// Headers on each NATS publisher's messages (`--nats-headers`).
    pub nats_headers: u8,
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
            window: spec.window.map(|w| w * per_account(spec)),
            owed_per_message: subscribers_of(spec, i % spec.accounts),
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
            shared.clone(),
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

/// Subscribers listening to account index `a`.
fn subscribers_of(spec: &Spec, a: usize) -> u64 {
    (0..spec.subscribers)
        .filter(|j| j % spec.accounts == a)
        .count() as u64
}

/// Subscribers per account, on average (at least one).
fn per_account(spec: &Spec) -> u64 {
    (spec.subscribers / spec.accounts).max(1) as u64
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
