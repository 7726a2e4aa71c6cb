//! Secrets never reach a log, the admin endpoints or `check-config`.
//!
//! The bridge runs with every secret set (the NATS credential of each
//! method, the attach headers and auth token) at the most verbose logging
//! there is (`log.level = "trace"`, `RUST_LOG=trace`, JSON format), connects,
//! has its credentials refused, reconnects, and is stopped; then its whole
//! output, every admin endpoint and `check-config` are searched for every
//! secret.

mod common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const HEADER_SECRET: &str = "hdr-secret-5c1e0a77";
const ATTACH_TOKEN: &str = "attach-token-f00dfeed";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The environment every run shares: the attach secrets (unused in server
/// mode, but configured) and trace logging in JSON.
fn noisy_env<'a>() -> Vec<(&'a str, String)> {
    vec![
        (
            "TRADEFEED_BRIDGE_ATTACH__HEADERS",
            format!("{{X-Api-Key=\"{HEADER_SECRET}\"}}"),
        ),
        ("TRADEFEED_BRIDGE_ATTACH__AUTH_TOKEN", ATTACH_TOKEN.into()),
        ("TRADEFEED_BRIDGE_LOG__LEVEL", "trace".into()),
        ("TRADEFEED_BRIDGE_LOG__FORMAT", "json".into()),
        ("RUST_LOG", "trace".into()),
    ]
}

fn wait_log(b: &Bridge, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !b.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Every admin endpoint's answer, concatenated.
fn admin_answers(b: &Bridge) -> String {
    let mut all = String::new();
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
        "/config",
        "/api/attach/legacy-consumers/trade-orders",
    ] {
        let (status, body) = b.admin(path);
        all.push_str(&format!("GET {path} {status}\n{body}\n"));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!(
        "http://127.0.0.1:{}/api/attach/legacy-consumers/trade-orders",
        b.admin_port
    );
    if let Ok(mut r) = agent
        .put(&url)
        .header("content-type", "application/json")
        .send("false")
    {
        all.push_str(&r.body_mut().read_to_string().unwrap_or_default());
    }
    all
}

/// Fails naming the secret and showing where it appeared.
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        if let Some(at) = text.find(s) {
            let from = at.saturating_sub(300);
            let to = (at + s.len() + 100).min(text.len());
            panic!(
                "{what} contains the secret {s:?}:\n...{}...",
                &text[from..to]
            );
        }
    }
}

/// Every line of the output is one JSON object, and the run really was at
/// trace level (the NATS client's own trace events are there).
fn assert_json_trace(log: &str) {
    let mut trace = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.is_object(), "{line}");
        if v["level"] == "TRACE" {
            trace += 1;
        }
    }
    assert!(trace > 10, "hardly any TRACE lines: was trace logging on?");
}

/// One NATS authentication method: the server accepts `good`, then is
/// restarted accepting `other` (the bridge's credentials are refused while it
/// reconnects), then restarted accepting `good` again.
fn nats_method_run(
    method_env: Vec<(&str, String)>,
    good: &str,
    other: &str,
    secrets: &[&str],
    refused: &str,
) {
    let dir = scratch();
    let conf = write(dir.path(), "nats.conf", good);
    let mut nats = Nats::start_with(&["-c", conf.to_str().unwrap()]);
    let mut env = noisy_env();
    env.extend(method_env.clone());
    let mut bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: env.clone(),
            ..Default::default()
        },
    );
    // some traffic, so per-message tracing runs too
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&bridge.url(), json!({}));
    legacy.subscribe("/accounts/22214/positions");
    legacy.publish(
        "/accounts/22214/positions",
        "Position",
        json!({"accountId": 22214, "security": "IBM", "quantity": 1}),
    );
    legacy.next_publish(WAIT, |e| e["topic"] == "/accounts/22214/positions");

    // credentials refused while reconnecting
    std::fs::write(&conf, other).unwrap();
    nats.stop();
    nats.start_again();
    wait_log(&bridge, refused, Duration::from_secs(20));
    assert_eq!(bridge.admin("/readyz").0, 503);
    let while_refused = admin_answers(&bridge);

    // accepted again
    std::fs::write(&conf, good).unwrap();
    nats.stop();
    nats.start_again();
    bridge.wait_ready(Duration::from_secs(20));
    let answers = admin_answers(&bridge);
    assert!(
        answers.contains("tradefeed_bridge_nats_connected 1"),
        "{answers}"
    );

    let st = bridge.proc.terminate(Duration::from_secs(15));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    let log = bridge.log();
    assert_json_trace(&log);
    assert!(log.contains(refused), "the refusal is logged");
    assert_clean("the bridge's output", &log, secrets);
    assert_clean("the admin endpoints (refused)", &while_refused, secrets);
    assert_clean("the admin endpoints", &answers, secrets);

    // check-config, valid and with a problem next to the secrets
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, out, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config"],
        &env_refs,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_clean("check-config", &format!("{out}{err}"), secrets);
    let mut broken = env_refs.clone();
    broken.push(("TRADEFEED_BRIDGE_NATS__CONNECT_TIMEOUT", "soon"));
    let (code, out, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config"],
        &broken,
    );
    assert_eq!(code, 2, "{out}{err}");
    assert_clean(
        "check-config with a problem",
        &format!("{out}{err}"),
        secrets,
    );
    // and the run is restarted successfully: secrets were really in use
    bridge.start_again();
    bridge.wait_ready(Duration::from_secs(20));
}

const REFUSED: &str = "refused the bridge's credentials";

#[test]
fn token_never_logged() {
    let token = "nats-token-3b9f2c4d";
    nats_method_run(
        vec![("TRADEFEED_BRIDGE_NATS__TOKEN", token.into())],
        &format!("authorization {{ token: \"{token}\" }}"),
        "authorization { token: \"someone-elses-token\" }",
        &[token, HEADER_SECRET, ATTACH_TOKEN],
        REFUSED,
    );
}

#[test]
fn password_never_logged() {
    let password = "nats-password-77aa1e";
    nats_method_run(
        vec![
            ("TRADEFEED_BRIDGE_NATS__USER", "bridge".into()),
            ("TRADEFEED_BRIDGE_NATS__PASSWORD", password.into()),
        ],
        &format!("authorization {{ users: [ {{ user: bridge, password: \"{password}\" }} ] }}"),
        "authorization { users: [ { user: bridge, password: \"changed-meanwhile\" } ] }",
        &[password, HEADER_SECRET, ATTACH_TOKEN],
        REFUSED,
    );
}

#[test]
fn nkey_seed_never_logged() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let other = nkeys::KeyPair::new_user().public_key();
    // the seed's distinctive part: no prefix of it may leak either
    let seed_body = seed[2..30].to_string();
    nats_method_run(
        vec![("TRADEFEED_BRIDGE_NATS__NKEY_SEED", seed.clone())],
        &format!(
            "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ),
        &format!("authorization {{ users: [ {{ nkey: \"{other}\" }} ] }}"),
        &[&seed, &seed_body, HEADER_SECRET, ATTACH_TOKEN],
        REFUSED,
    );
}

/// Attach mode: the headers and the auth token are sent to trade-feed (the
/// test hub checks them), refused after a hub restart, accepted again.
#[test]
fn attach_headers_and_token_never_logged() {
    let nats_token = "nats-token-for-attach-9911";
    let dir = scratch();
    let nconf = write(
        dir.path(),
        "nats.conf",
        &format!("authorization {{ token: \"{nats_token}\" }}"),
    );
    let nats = Nats::start_with(&["-c", nconf.to_str().unwrap()]);
    let good = json!({"headers": {"x-api-key": HEADER_SECRET}, "token": ATTACH_TOKEN}).to_string();
    let auth = write(dir.path(), "hub-auth.json", &good);
    let mut hub = Hub::start_with(&["--auth-file", auth.to_str().unwrap()]);
    let mut env = noisy_env();
    env.extend([
        ("TRADEFEED_BRIDGE_MODE", "attach".to_string()),
        ("TRADEFEED_BRIDGE_ATTACH__URL", hub.url()),
        ("TRADEFEED_BRIDGE_ATTACH__LEASE", "false".into()),
        (
            "TRADEFEED_BRIDGE_ATTACH__RECONNECT_DELAY_MAX",
            "500ms".into(),
        ),
        ("TRADEFEED_BRIDGE_NATS__TOKEN", nats_token.into()),
    ]);
    let bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: env.clone(),
            ..Default::default()
        },
    );
    // traffic: NATS -> trade-feed, so per-message tracing runs too
    let publisher = Agent::nats(Lang::Node);
    publisher.cmd(json!({"cmd": "connect", "servers": [nats.url()], "token": nats_token}));
    publisher.pub_json(
        "positions.account.22214.updated",
        &json!({"accountId": 22214, "security": "IBM", "quantity": 1}),
    );
    let forwarded = [("route", "account-positions"), ("direction", "to_socketio")];
    let deadline = Instant::now() + WAIT;
    while bridge.metric("tradefeed_bridge_messages_forwarded_total", &forwarded) < 1.0 {
        assert!(Instant::now() < deadline, "nothing forwarded to trade-feed");
        thread::sleep(Duration::from_millis(50));
    }

    // refused after a restart
    let other = json!({"headers": {"x-api-key": "another"}, "token": "another"}).to_string();
    std::fs::write(&auth, &other).unwrap();
    hub.stop();
    hub.start_again();
    wait_log(&bridge, "unauthorized", Duration::from_secs(20));
    assert_eq!(bridge.admin("/readyz").0, 503);
    let while_refused = admin_answers(&bridge);

    std::fs::write(&auth, &good).unwrap();
    bridge.wait_ready(Duration::from_secs(30));
    let answers = admin_answers(&bridge);

    let mut bridge = bridge;
    let st = bridge.proc.terminate(Duration::from_secs(15));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    let log = bridge.log();
    assert_json_trace(&log);
    let secrets = [nats_token, HEADER_SECRET, ATTACH_TOKEN];
    assert_clean("the bridge's output", &log, &secrets);
    // the WebSocket client traces its handshake request: redacted, not dropped
    assert!(
        log.contains("x-api-key: ***"),
        "no redacted handshake trace"
    );
    assert_clean("the admin endpoints (refused)", &while_refused, &secrets);
    assert_clean("the admin endpoints", &answers, &secrets);
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, out, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config"],
        &env_refs,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_clean("check-config", &format!("{out}{err}"), &secrets);
}

/// A secret in the environment is taken exactly as written, whatever it
/// looks like (a number with a leading zero, `true`), and is used: the
/// bridge logs in with it.
#[test]
fn secrets_that_look_like_numbers_are_taken_as_written() {
    let (user, password) = ("1001", "0739184025");
    let dir = scratch();
    let conf = write(
        dir.path(),
        "nats.conf",
        &format!("authorization {{ users: [ {{ user: \"{user}\", password: \"{password}\" }} ] }}"),
    );
    let nats = Nats::start_with(&["-c", conf.to_str().unwrap()]);
    let env = vec![
        ("TRADEFEED_BRIDGE_NATS__USER", user.to_string()),
        ("TRADEFEED_BRIDGE_NATS__PASSWORD", password.to_string()),
    ];
    let mut bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: env.clone(),
            ..Default::default()
        },
    );
    bridge.proc.terminate(Duration::from_secs(15));
    assert_clean(
        "the bridge's output",
        &bridge.log(),
        &[password, "739184025"],
    );

    // (`true` is also in the printed configuration, as other keys' value)
    for (key, value, shown) in [
        ("TRADEFEED_BRIDGE_NATS__TOKEN", "0739184025", "739184025"),
        ("TRADEFEED_BRIDGE_NATS__TOKEN", "true", "token = true"),
        ("TRADEFEED_BRIDGE_ATTACH__AUTH_TOKEN", "4.5031", "4.503"),
        (
            "TRADEFEED_BRIDGE_ATTACH__HEADERS__X_API_KEY",
            "0739184025",
            "739184025",
        ),
    ] {
        let (code, out, err) = bridge_cli(
            &["--config", "config/traderx.toml", "check-config", "--show"],
            &[(key, value)],
        );
        assert_eq!(code, 0, "{key}={value}: {out}{err}");
        assert_clean(key, &format!("{out}{err}"), &[shown]);
        assert!(out.contains(" = \"***\""), "{key}: {out}");
    }
}

/// A configuration problem on a secret names the key and never shows the
/// value: a secret of the wrong type, in the file or the environment, and a
/// file that does not parse on a secret's line.
#[test]
fn configuration_problems_never_show_a_secret() {
    let dir = scratch();
    let traderx = std::fs::read_to_string(root().join("config/traderx.toml")).unwrap();
    let with_nats = |lines: &str| traderx.replacen("[nats]\n", &format!("[nats]\n{lines}\n"), 1);
    // what, the file, the environment, the secret, the key the problem names
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a number in the file",
            with_nats("user = \"bridge\"\npassword = 99887766"),
            vec![],
            "99887766",
            "nats.password",
        ),
        (
            "an unterminated string in the file",
            with_nats("token = \"Hunter2Secret"),
            vec![],
            "Hunter2Secret",
            "line ",
        ),
        (
            "a bare word in the file",
            with_nats("token = Hunter2Secret"),
            vec![],
            "Hunter2Secret",
            "line ",
        ),
        (
            "a header of the wrong type in the file",
            format!("{traderx}\n[attach.headers]\nX-Api-Key = 55501234\n"),
            vec![],
            "55501234",
            "attach.headers.X-Api-Key",
        ),
        (
            "a header of the wrong type in the environment",
            traderx.clone(),
            vec![("TRADEFEED_BRIDGE_ATTACH__HEADERS", "{X-Api-Key=55501234}")],
            "55501234",
            "attach.headers.X-Api-Key",
        ),
    ];
    for (what, text, env, secret, key) in cases {
        let file = write(dir.path(), "case.toml", &text);
        let (code, out, err) =
            bridge_cli(&["--config", file.to_str().unwrap(), "check-config"], &env);
        assert_eq!(code, 2, "{what}: {out}{err}");
        assert!(err.contains(key), "{what}: the problem names {key}: {err}");
        assert_clean(what, &format!("{out}{err}"), &[secret]);
        // and the same at start-up
        let (code, out, err) = bridge_cli(&["--config", file.to_str().unwrap()], &env);
        assert_eq!(code, 2, "{what}: {out}{err}");
        assert_clean(what, &format!("{out}{err}"), &[secret]);
    }
}
