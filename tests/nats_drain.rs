//! The NATS client's subscription drain, which the point-to-point routes rely
//! on when the bridge leaves a queue group: a drained subscription must get
//! every message the server sent it before the server processed its
//! unsubscribe. The bridge builds with a patched async-nats for this
//! (vendor/async-nats, see its PATCHES.md); these tests fail on the client
//! as released, which forgets the subscription before the server's answer.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;

const SUBJECT: &str = "drain.orders";
const GROUP: &str = "processors";

async fn connect(nats: &Nats, name: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .name(name)
        .connect(nats.url())
        .await
        .expect("connect to nats-server")
}

/// Reads `sub` until it ends (`None`) or `limit` passes; the sequence numbers
/// seen, and whether it ended by itself.
async fn read_all(sub: &mut async_nats::Subscriber, limit: Duration) -> (Vec<u64>, bool) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => seen.push(seq(&m)),
            Ok(None) => return (seen, true),
            Err(_) => return (seen, false),
        }
    }
}

fn seq(m: &async_nats::Message) -> u64 {
    std::str::from_utf8(&m.payload)
        .expect("utf-8")
        .parse()
        .expect("a sequence number")
}

/// Two members of one queue group, a producer publishing as fast as it can.
/// One member drains its subscription while messages pour in (many are on
/// the wire to it at that moment); every message must reach exactly one
/// member. Failed in most runs on async-nats 0.51.0 as released.
#[test]
fn a_queue_member_that_drains_mid_stream_loses_nothing_the_server_sent_it() {
    drain_mid_stream(Drain::Subscription);
}

/// The same with the whole connection drained (`Client::drain`), as a
/// service does when it stops.
#[test]
fn a_connection_that_drains_mid_stream_loses_nothing_the_server_sent_it() {
    drain_mid_stream(Drain::Connection);
}

#[derive(Clone, Copy, PartialEq)]
enum Drain {
    Subscription,
    Connection,
}

fn drain_mid_stream(how: Drain) {
    let nats = Nats::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut lost_rounds = Vec::new();
        for round in 0..20u64 {
            let leaving = connect(&nats, "leaving").await;
            let staying = connect(&nats, "staying").await;
            let producer = connect(&nats, "producer").await;
            let subject = format!("{SUBJECT}.{round}");
            let mut a = leaving
                .queue_subscribe(subject.clone(), GROUP.into())
                .await
                .unwrap();
            let mut b = staying
                .queue_subscribe(subject.clone(), GROUP.into())
                .await
                .unwrap();
            leaving.flush().await.unwrap();
            staying.flush().await.unwrap();
            // Both subscriptions are known to the server once a message
            // through each connection comes back to it.
            for c in [&leaving, &staying] {
                let mut probe = c.subscribe(format!("probe.{round}")).await.unwrap();
                c.publish(format!("probe.{round}"), "x".into())
                    .await
                    .unwrap();
                tokio::time::timeout(Duration::from_secs(5), probe.next())
                    .await
                    .expect("probe comes back");
            }

            const N: u64 = 20_000;
            let publisher = tokio::spawn({
                let producer = producer.clone();
                let subject = subject.clone();
                async move {
                    for i in 0..N {
                        producer
                            .publish(subject.clone(), i.to_string().into())
                            .await
                            .unwrap();
                    }
                    producer.flush().await.unwrap();
                }
            });
            // Drain once the leaving member is well into the stream.
            let mut before = Vec::new();
            let start = Instant::now();
            while before.len() < 2_000 && start.elapsed() < Duration::from_secs(10) {
                match tokio::time::timeout(Duration::from_secs(5), a.next()).await {
                    Ok(Some(m)) => before.push(seq(&m)),
                    _ => break,
                }
            }
            match how {
                Drain::Subscription => a.drain().await.unwrap(),
                Drain::Connection => leaving.drain().await.unwrap(),
            }
            let (after, ended) = read_all(&mut a, Duration::from_secs(10)).await;
            assert!(ended, "round {round}: the drained subscription never ended");
            publisher.await.unwrap();

            let mut got: Vec<u64> = before.into_iter().chain(after).collect();
            let expect_b = |got: &Vec<u64>, b_seen: &Vec<u64>| got.len() + b_seen.len();
            let mut b_seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while (expect_b(&got, &b_seen) as u64) < N && Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(500), b.next()).await {
                    Ok(Some(m)) => b_seen.push(seq(&m)),
                    _ => break,
                }
            }
            got.extend(b_seen);
            let all: BTreeSet<u64> = got.iter().copied().collect();
            assert_eq!(all.len(), got.len(), "round {round}: a message reached both members");
            let missing = N - all.len() as u64;
            if missing > 0 {
                lost_rounds.push((round, missing));
            }
        }
        assert!(
            lost_rounds.is_empty(),
            "messages sent to the draining member and never delivered (round, count): {lost_rounds:?}"
        );
    });
}
