//! A short run of the benchmark against real servers, so the instrument
//! cannot rot: every path and the scale and start-up tests, tiny counts, a
//! rate far below saturation. It checks that the figures are sane (every
//! message delivered exactly once, latencies ordered, usage read), never
//! how fast anything was.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ sits in the repository")
        .to_path_buf()
}

/// The bridge binary cargo built next to tfb-bench (`cargo test` builds the
/// whole workspace).
fn bridge_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_tfb-bench")).with_file_name("tradefeed-bridge");
    assert!(
        p.exists(),
        "{} is missing: run the workspace's tests (`cargo test`), or `cargo build --bin tradefeed-bridge` first",
        p.display()
    );
    p
}

fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let local = root().join(".tools/bin/nats-server");
    if local.exists() {
        local
    } else {
        PathBuf::from("nats-server")
    }
}

const DOC: &str = "# Performance\n\nhand-written text\n\n<!-- bench:results:begin (written by scripts/bench.sh) -->\nold results\n<!-- bench:results:end -->\n\nmore text\n";

/// One second of one shape against the bridge alone, no scale or start-up
/// runs: what the single-purpose runs below add their options to.
const QUICK: &[&str] = &[
    "--duration",
    "1s",
    "--drain",
    "10s",
    "--shapes",
    "1x2",
    "--targets",
    "bridge",
    "--scale",
    "none",
    "--startup-runs",
    "0",
];

/// Runs tfb-bench with `args` (bounded in time) and returns its JSON report.
fn run_bench(dir: &Path, args: &[&str]) -> Value {
    let json = dir.join("results.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tfb-bench"))
        .current_dir(root())
        .arg("--bridge-bin")
        .arg(bridge_bin())
        .arg("--nats-server")
        .arg(nats_server_bin())
        .arg("--out-json")
        .arg(&json)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .expect("tfb-bench runs");
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tfb-bench did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "tfb-bench failed: {status}");
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn a_short_run_reports_every_message_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("performance.md");
    std::fs::write(&doc, DOC).unwrap();
    let r = run_bench(
        dir.path(),
        &[
            "--duration",
            "1s",
            "--drain",
            "10s",
            "--shapes",
            "1x2",
            "--rates",
            "200",
            "--paths",
            "sio-sio,sio-nats,nats-sio,nats-nats",
            "--targets",
            "bridge,hub",
            "--scale",
            "20",
            "--scale-accounts",
            "4",
            "--scale-rate",
            "40",
            "--scale-duration",
            "1s",
            "--startup-runs",
            "1",
            "--doc",
            doc.to_str().unwrap(),
        ],
    );
    let cases = r["cases"].as_array().unwrap();
    let seen: Vec<(String, String)> = cases
        .iter()
        .map(|c| {
            (
                c["target"].as_str().unwrap().into(),
                c["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    for want in [
        ("bridge", "sio-sio"),
        ("hub", "sio-sio"),
        ("bridge", "sio-nats"),
        ("bridge", "nats-sio"),
        ("nats", "nats-nats"),
    ] {
        assert!(
            seen.iter().any(|(t, p)| t == want.0 && p == want.1),
            "no {want:?} case in {seen:?}"
        );
    }
    for c in cases {
        check_outcome(c, 2);
        if c["target"] == "bridge" {
            assert_eq!(c["shed"].as_f64(), Some(0.0), "{c}");
        }
    }
    let scale = r["scale"].as_array().unwrap();
    assert_eq!(scale.len(), 2, "bridge and hub");
    for s in scale {
        assert_eq!(s["clients"], 20);
        check_outcome(s, 5);
    }
    let startup = &r["startup"];
    assert!(
        startup["ready_ms_median"].as_f64().unwrap() > 0.0,
        "{startup}"
    );
    assert!(
        startup["idle_rss_mb_median"].as_f64().unwrap() > 1.0,
        "{startup}"
    );

    let checks = r["checks"].as_array().unwrap();
    let loss = checks
        .iter()
        .find(|c| c["target"].as_str().unwrap().contains("zero lost"))
        .unwrap();
    assert_eq!(loss["met"], true, "{loss}");

    let doc = std::fs::read_to_string(&doc).unwrap();
    assert!(
        doc.starts_with("# Performance\n\nhand-written text\n"),
        "{doc}"
    );
    assert!(
        doc.ends_with("<!-- bench:results:end -->\n\nmore text\n"),
        "{doc}"
    );
    assert!(!doc.contains("old results"), "{doc}");
    assert!(
        doc.contains("### Targets") && doc.contains("| bridge | 1->2 | 200 |"),
        "{doc}"
    );
}

/// A flood into four-message client buffers (room for the join notices, not
/// for a flood): the bridge sheds, and what the subscribers miss is exactly
/// what the bridge counts as dropped.
#[test]
fn a_flood_sheds_only_what_the_bridge_counts() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_bench(
        dir.path(),
        &[
            QUICK,
            &[
                "--rates",
                "flood",
                "--paths",
                "sio-sio",
                "--bridge-env",
                "TRADEFEED_BRIDGE_SOCKETIO__MAX_BUFFER_PACKETS=4",
            ],
        ]
        .concat(),
    );
    let c = &r["cases"][0];
    assert_eq!(c["flood"], true, "{c}");
    let lost = c["lost"].as_u64().unwrap();
    assert!(
        lost > 0,
        "four-message buffers under a flood must overflow: {c}"
    );
    assert_eq!(c["shed"].as_f64(), Some(lost as f64), "{c}");
    assert_eq!(c["duplicated"], 0, "{c}");
    assert_eq!(
        c["delivered"].as_u64().unwrap() + lost,
        c["expected"].as_u64().unwrap()
    );
}

/// NATS publishers that put a bridge's headers on every message (the
/// instrument behind the header cost in docs/performance.md): still every
/// message delivered once, to NATS and through the bridge.
#[test]
fn nats_publishers_with_a_bridges_headers_deliver_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_bench(
        dir.path(),
        &[
            QUICK,
            &[
                "--rates",
                "200",
                "--paths",
                "nats-nats,nats-sio",
                "--nats-headers",
                "3",
            ],
        ]
        .concat(),
    );
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2, "{r}");
    for c in cases {
        check_outcome(c, 2);
    }
    assert!(r["command"].as_str().unwrap().contains("--nats-headers 3"));
}

/// Every owed delivery arrived once, and the figures hang together.
fn check_outcome(c: &Value, subscribers_per_message: u64) {
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("no {k} in {c}"));
    assert!(n("sent") > 0, "{c}");
    assert_eq!(n("expected"), n("sent") * subscribers_per_message, "{c}");
    assert_eq!(n("delivered"), n("expected"), "{c}");
    assert_eq!(n("lost"), 0, "{c}");
    assert_eq!(n("duplicated"), 0, "{c}");
    assert!(c["deliveries_per_sec"].as_f64().unwrap() > 0.0, "{c}");
    let l = &c["latency"];
    let (p50, p99, max) = (
        l["p50_us"].as_u64().unwrap(),
        l["p99_us"].as_u64().unwrap(),
        l["max_us"].as_u64().unwrap(),
    );
    assert!(p50 > 0 && p50 <= p99 && p99 <= max, "{l}");
    for p in c["procs"].as_array().unwrap() {
        assert!(p["cpu_pct"].as_f64().unwrap() >= 0.0, "{p}");
        assert!(p["rss_peak_mb"].as_f64().unwrap() > 1.0, "{p}");
    }
}
