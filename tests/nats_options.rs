//! The NATS connection options (`[nats]`) against a real nats-server: several
//! server URLs and fail-over, token, user and password, NKey, credentials file
//! (operator mode, JWTs made by tests/go/jwtgen), TLS with a CA file and with
//! a client certificate (certificates made with rcgen), the connection name
//! in the server's /connz, and `max_reconnects`. Wrong credentials must give a
//! clear error that names the server and the method, never the secret.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const READYZ_WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------ helpers

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A nats-server with `conf` (nats-server syntax) and monitoring on a free port.
fn nats_with(conf: &str) -> (Nats, u16, tempfile::TempDir) {
    let dir = scratch();
    let monitor = free_port();
    let file = write(
        dir.path(),
        "nats.conf",
        &format!("http: \"127.0.0.1:{monitor}\"\n{conf}\n"),
    );
    let nats = Nats::start_with(&["-c", file.to_str().unwrap()]);
    assert!(wait_for_port(monitor, Duration::from_secs(10)));
    (nats, monitor, dir)
}

/// The server's connections (`/connz?auth=true`).
fn connz(monitor: u16) -> Vec<Value> {
    let (status, body) = http_get(&format!("http://127.0.0.1:{monitor}/connz?auth=true"));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["connections"].as_array().cloned().unwrap_or_default()
}

/// Waits until the server lists a client connection named `name`.
fn wait_connection(monitor: u16, name: &str) -> Value {
    let deadline = Instant::now() + READYZ_WAIT;
    loop {
        if let Some(c) = connz(monitor).into_iter().find(|c| c["name"] == name) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no connection named {name}: {:#?}",
            connz(monitor)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn start_bridge(nats: &Nats, env: Vec<(&str, String)>, wait_ready: bool) -> Bridge {
    Bridge::start_opts(
        nats,
        BridgeOpts {
            env,
            wait_ready,
            ..Default::default()
        },
    )
}

fn wait_log(b: &Bridge, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = b.log();
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?} within {timeout:?}:\n{log}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn wait_status(b: &Bridge, want: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = b.admin("/readyz");
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status} ({body}), wanted {want}; log:\n{}",
            b.log()
        );
        thread::sleep(Duration::from_millis(25));
    }
}

/// Both directions work through the server at `url`, where a Node NATS agent
/// connects with `auth` (the extra fields of its connect command).
fn assert_mirrors(bridge: &Bridge, url: &str, auth: Value) {
    let legacy = Agent::sio(Lang::Node);
    legacy.connect(&bridge.url(), json!({}));
    legacy.subscribe("/accounts/22214/positions");
    let agent = Agent::nats(Lang::Node);
    let mut cmd = json!({"cmd": "connect", "servers": [url]});
    for (k, v) in auth.as_object().cloned().unwrap_or_default() {
        cmd[k] = v;
    }
    agent.cmd(cmd);
    agent.sub("p", "positions.account.22214.updated");

    let position = json!({"accountId": 22214, "security": "IBM", "quantity": 7, "updated": 1u64});
    legacy.publish("/accounts/22214/positions", "Position", position.clone());
    let m = agent.next_msg("p", WAIT);
    assert_eq!(body(&m)["payload"], position, "legacy -> NATS via {url}");
    let env = legacy.next_publish(WAIT, |e| e["payload"] == position);
    assert_eq!(env["topic"], "/accounts/22214/positions");

    let back = json!({"accountId": 22214, "security": "IBM", "quantity": 8, "updated": 2u64});
    agent.pub_json("positions.account.22214.updated", &back);
    let env = legacy.next_publish(WAIT, |e| e["payload"] == back);
    assert_eq!(env["type"], "Position", "NATS -> legacy via {url}");
    // the agent hears its own publish; the bridge must not add any
    let echoes: Vec<Value> = agent.msgs("p", SHORT).iter().map(body).collect();
    assert_eq!(echoes, vec![back.clone()], "on NATS after the first");
    assert!(legacy.data_messages(Duration::ZERO).is_empty(), "doubled");
}

/// A bridge with `env` against `nats` must stay unready and log one line
/// naming the server URL and `method`; neither its log nor /readyz may
/// contain `secret`.
fn assert_refused(nats: &Nats, env: Vec<(&str, String)>, method: &str, secret: &str) -> String {
    let b = start_bridge(nats, env, false);
    let line = wait_log(&b, "NATS: the server at", READYZ_WAIT);
    assert!(line.contains("refused the bridge's credentials"), "{line}");
    assert!(line.contains(&nats.url()), "names the server: {line}");
    assert!(line.contains(method), "names the method {method:?}: {line}");
    let (status, body) = b.admin("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("NATS is not connected"), "{body}");
    // it keeps trying (with back-off) and keeps reporting
    let deadline = Instant::now() + READYZ_WAIT;
    while b.log().matches("NATS: the server at").count() < 2 {
        assert!(Instant::now() < deadline, "retried once only:\n{}", b.log());
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.admin("/readyz").0, 503);
    let log = b.log();
    assert!(!log.contains(secret), "the secret reached the log:\n{log}");
    assert!(!body.contains(secret));
    assert!(!b.admin("/metrics").1.contains(secret));
    line
}

// ------------------------------------------------------------------ servers

/// A TCP listener that accepts connections and never says anything: a
/// "dead" server (a hung process, a black-holing proxy).
struct Silent {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Silent {
    fn start() -> Silent {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Silent { port, stop }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Several servers: the first refuses connections, the second accepts and
/// never answers, the third is a real server: the bridge connects to it
/// after one `connect_timeout`. When that server dies the bridge fails over
/// to the fourth, re-subscribes there, and /readyz follows: 200 while
/// connected, 503 while every server is down, 200 again when one is back.
#[test]
fn several_servers_fail_over_in_order() {
    let down = free_port();
    let dead = Silent::start();
    let (mut a, ma, _da) = nats_with("");
    let (b, mb, _db) = nats_with("");
    let servers = json!([
        format!("nats://127.0.0.1:{down}"),
        format!("nats://127.0.0.1:{}", dead.port),
        a.url(),
        b.url()
    ]);
    let t0 = Instant::now();
    let bridge = start_bridge(
        &a,
        vec![
            ("TRADEFEED_BRIDGE_NATS__SERVERS", servers.to_string()),
            ("TRADEFEED_BRIDGE_NATS__CONNECT_TIMEOUT", "1s".into()),
            ("TRADEFEED_BRIDGE_NATS__RECONNECT_DELAY_MAX", "500ms".into()),
        ],
        false,
    );
    bridge.wait_ready(READYZ_WAIT);
    eprintln!("ready on the third server after {:?}", t0.elapsed());
    let log = bridge.log();
    assert!(
        log.contains(&format!("cannot connect to nats://127.0.0.1:{down}")),
        "{log}"
    );
    let timed_out = wait_log(
        &bridge,
        &format!("cannot connect to nats://127.0.0.1:{}", dead.port),
        WAIT,
    );
    assert!(timed_out.contains("timed out"), "{timed_out}");
    wait_log(&bridge, &format!("NATS connected to {}", a.url()), WAIT);
    wait_connection(ma, "tradefeed-bridge");
    assert!(
        !connz(mb).iter().any(|c| c["name"] == "tradefeed-bridge"),
        "the bridge is on the fourth server too"
    );
    assert_mirrors(&bridge, &a.url(), json!({}));

    // the server dies: fail-over to the next one, subscriptions follow
    a.stop();
    wait_log(
        &bridge,
        &format!("NATS connected to {}", b.url()),
        READYZ_WAIT,
    );
    wait_status(&bridge, 200, READYZ_WAIT);
    wait_connection(mb, "tradefeed-bridge");
    assert_mirrors(&bridge, &b.url(), json!({}));
    assert!(bridge.metric("tradefeed_bridge_nats_reconnects_total", &[]) >= 1.0);

    // every server down: not ready, and it stays so
    let mut b = b;
    b.stop();
    wait_status(&bridge, 503, READYZ_WAIT);
    let (_, body) = bridge.admin("/readyz");
    assert!(body.contains("NATS is not connected"), "{body}");
    thread::sleep(Duration::from_secs(2));
    assert_eq!(bridge.admin("/readyz").0, 503);
    assert_eq!(bridge.metric("tradefeed_bridge_nats_connected", &[]), 0.0);

    // one back: ready again, on that one
    a.start_again();
    wait_status(&bridge, 200, READYZ_WAIT);
    assert_mirrors(&bridge, &a.url(), json!({}));
    assert_eq!(bridge.metric("tradefeed_bridge_nats_connected", &[]), 1.0);
}

/// `nats.name` names both of the bridge's connections in /connz.
#[test]
fn connection_name_is_visible_in_connz() {
    let (nats, monitor, _d) = nats_with("");
    let _bridge = start_bridge(
        &nats,
        vec![("TRADEFEED_BRIDGE_NATS__NAME", "tfb-eu-west-1a".into())],
        true,
    );
    let c = wait_connection(monitor, "tfb-eu-west-1a");
    assert_eq!(c["lang"], "rust", "{c}");
    // the point-to-point route's queue-group member
    wait_connection(monitor, "tfb-eu-west-1a-queue-member");
    let names: Vec<Value> = connz(monitor).iter().map(|c| c["name"].clone()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

// ------------------------------------------------------------------ authentication

#[test]
fn token_auth() {
    const TOKEN: &str = "tok-9d1c7e2b-6a55-4f0e";
    let (nats, monitor, _d) = nats_with(&format!("authorization {{ token: \"{TOKEN}\" }}"));
    let bridge = start_bridge(
        &nats,
        vec![("TRADEFEED_BRIDGE_NATS__TOKEN", TOKEN.into())],
        true,
    );
    wait_connection(monitor, "tradefeed-bridge");
    assert_mirrors(&bridge, &nats.url(), json!({"token": TOKEN}));
    assert!(!bridge.log().contains(TOKEN));

    let wrong = "tok-wrong-0000-1111";
    assert_refused(
        &nats,
        vec![("TRADEFEED_BRIDGE_NATS__TOKEN", wrong.into())],
        "(method: token)",
        wrong,
    );
    // and none at all: the same report, method "no authentication"
    let b = start_bridge(&nats, vec![], false);
    let line = wait_log(&b, "refused the bridge's credentials", READYZ_WAIT);
    assert!(line.contains("no authentication"), "{line}");
}

#[test]
fn user_and_password_auth() {
    const PASSWORD: &str = "pw-Zq81-unguessable";
    let (nats, monitor, _d) = nats_with(&format!(
        "authorization {{ users: [ {{ user: \"bridge\", password: \"{PASSWORD}\" }} ] }}"
    ));
    let bridge = start_bridge(
        &nats,
        vec![
            ("TRADEFEED_BRIDGE_NATS__USER", "bridge".into()),
            ("TRADEFEED_BRIDGE_NATS__PASSWORD", PASSWORD.into()),
        ],
        true,
    );
    let c = wait_connection(monitor, "tradefeed-bridge");
    assert_eq!(c["authorized_user"], "bridge", "{c}");
    assert_mirrors(
        &bridge,
        &nats.url(),
        json!({"user": "bridge", "pass": PASSWORD}),
    );
    assert!(!bridge.log().contains(PASSWORD));

    let wrong = "pw-wrong-7781";
    let line = assert_refused(
        &nats,
        vec![
            ("TRADEFEED_BRIDGE_NATS__USER", "bridge".into()),
            ("TRADEFEED_BRIDGE_NATS__PASSWORD", wrong.into()),
        ],
        "user/password (user bridge)",
        wrong,
    );
    assert!(!line.contains(PASSWORD));
}

#[test]
fn nkey_auth() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let public = user.public_key();
    let (nats, monitor, _d) = nats_with(&format!(
        "authorization {{ users: [ {{ nkey: \"{public}\" }} ] }}"
    ));
    let bridge = start_bridge(
        &nats,
        vec![("TRADEFEED_BRIDGE_NATS__NKEY_SEED", seed.clone())],
        true,
    );
    let c = wait_connection(monitor, "tradefeed-bridge");
    assert_eq!(c["authorized_user"], public.as_str(), "{c}");
    assert_mirrors(&bridge, &nats.url(), json!({"nkeySeed": seed}));
    let log = bridge.log();
    assert!(!log.contains(&seed));
    assert!(log.contains(&format!("auth=nkey {public}")), "{log}");

    // a valid seed the server does not know
    let stranger = nkeys::KeyPair::new_user();
    let stranger_seed = stranger.seed().unwrap();
    assert_refused(
        &nats,
        vec![("TRADEFEED_BRIDGE_NATS__NKEY_SEED", stranger_seed.clone())],
        &format!("nkey {}", stranger.public_key()),
        &stranger_seed,
    );

    // seeds that are not user seeds are refused before connecting
    let account_seed = nkeys::KeyPair::new_account().seed().unwrap();
    let mut broken = seed.clone();
    broken.replace_range(10..11, if &seed[10..11] == "A" { "B" } else { "A" });
    for (bad, why) in [
        (account_seed.as_str(), "not a user seed"),
        (broken.as_str(), "not a valid user NKey seed"),
        ("SUnot-a-seed", "not a valid user NKey seed"),
    ] {
        let (code, out, err) = bridge_cli(
            &["--config", "config/traderx.toml", "check-config"],
            &[("TRADEFEED_BRIDGE_NATS__NKEY_SEED", bad)],
        );
        assert_eq!(code, 2, "{out}{err}");
        assert!(
            err.contains("nats.nkey_seed:") && err.contains(why),
            "{err}"
        );
        assert!(!err.contains(bad) && !out.contains(bad), "{err}");
    }
}

/// jwtgen's output: an operator-mode server configuration and credentials.
struct Jwts {
    v: Value,
}

fn jwtgen() -> Jwts {
    let out = Command::new("go")
        .args(["run", "."])
        .current_dir(root().join("tests/go/jwtgen"))
        .output()
        .expect("go (scripts/install-system-deps.sh needs it for nats-server too)");
    assert!(
        out.status.success(),
        "go run tests/go/jwtgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Jwts {
        v: serde_json::from_slice(&out.stdout).unwrap(),
    }
}

impl Jwts {
    fn server_conf(&self) -> String {
        let preload: Vec<String> = self.v["resolver_preload"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("  {k}: \"{}\"", v.as_str().unwrap()))
            .collect();
        format!(
            "operator: \"{}\"\nsystem_account: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n{}\n}}\n",
            self.v["operator_jwt"].as_str().unwrap(),
            self.v["system_account"].as_str().unwrap(),
            preload.join("\n")
        )
    }

    fn s(&self, key: &str) -> String {
        self.v[key].as_str().unwrap().to_string()
    }
}

/// The seed line of a credentials file.
fn creds_seed(creds: &str) -> String {
    creds
        .lines()
        .find(|l| l.starts_with("SU"))
        .expect("seed in creds")
        .to_string()
}

/// Decentralised JWT authentication: the server runs in operator mode with a
/// memory resolver; the bridge authenticates with a credentials file.
#[test]
fn credentials_file_auth() {
    let jwts = jwtgen();
    let (nats, monitor, dir) = nats_with(&jwts.server_conf());
    let creds_text = jwts.s("creds");
    let creds = write(dir.path(), "bridge.creds", &creds_text);
    let seed = creds_seed(&creds_text);
    let bridge = start_bridge(
        &nats,
        vec![(
            "TRADEFEED_BRIDGE_NATS__CREDENTIALS_FILE",
            creds.display().to_string(),
        )],
        true,
    );
    let c = wait_connection(monitor, "tradefeed-bridge");
    assert_eq!(c["account"], jwts.s("account").as_str(), "{c}");
    assert_eq!(
        c["authorized_user"],
        jwts.s("user_public_key").as_str(),
        "{c}"
    );
    assert_mirrors(&bridge, &nats.url(), json!({"creds": creds_text}));
    let log = bridge.log();
    assert!(!log.contains(&seed), "{log}");
    assert!(
        log.contains(&format!("credentials file {}", creds.display())),
        "{log}"
    );

    // a user of an account the server does not know
    let foreign_text = jwts.s("foreign_creds");
    let foreign = write(dir.path(), "foreign.creds", &foreign_text);
    assert_refused(
        &nats,
        vec![(
            "TRADEFEED_BRIDGE_NATS__CREDENTIALS_FILE",
            foreign.display().to_string(),
        )],
        &format!("credentials file {}", foreign.display()),
        &creds_seed(&foreign_text),
    );

    // missing and malformed files: refused at start-up, with key and path
    let jwt_only: String = creds_text
        .split("************************* IMPORTANT")
        .next()
        .unwrap()
        .to_string();
    let cases = [
        (dir.path().join("nope.creds"), None, "does not exist"),
        (
            dir.path().join("garbage.creds"),
            Some("hello\n".to_string()),
            "no user JWT block",
        ),
        (
            dir.path().join("jwt-only.creds"),
            Some(jwt_only),
            "no user NKey seed block",
        ),
        (
            dir.path().join("bad-seed.creds"),
            Some(creds_text.replace(&seed, &format!("SU{}", &seed[3..]))),
            "seed is not valid",
        ),
    ];
    for (path, content, why) in cases {
        if let Some(c) = &content {
            std::fs::write(&path, c).unwrap();
        }
        let p = path.display().to_string();
        let env = [("TRADEFEED_BRIDGE_NATS__CREDENTIALS_FILE", p.as_str())];
        for cmd in ["check-config", "run"] {
            let (code, out, err) = bridge_cli(&["--config", "config/traderx.toml", cmd], &env);
            assert_eq!(code, 2, "{cmd} with {p}: {out}{err}");
            assert!(
                err.contains(&format!("nats.credentials_file: file {p}")) && err.contains(why),
                "{cmd}: {err}"
            );
            assert!(!err.contains(&seed[4..]), "{err}");
        }
    }
}

// ------------------------------------------------------------------ TLS

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 signed by it, a client
    /// certificate signed by it, and an unrelated self-signed CA.
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let dir = scratch();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tradefeed-bridge test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "tradefeed-bridge");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &issuer).unwrap();

        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        other
            .distinguished_name
            .push(DnType::CommonName, "someone else");
        let other_cert = other.self_signed(&other_key).unwrap();

        let d = dir.path();
        write(d, "ca.pem", &ca_cert.pem());
        write(d, "server.pem", &server_cert.pem());
        write(d, "server-key.pem", &server_key.serialize_pem());
        write(d, "client.pem", &client_cert.pem());
        write(d, "client-key.pem", &client_key.serialize_pem());
        write(d, "other-ca.pem", &other_cert.pem());
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn server_conf(&self, verify: bool) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify}\n  timeout: 2\n}}\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
            self.path("ca.pem")
        )
    }
}

/// A TLS server and `tls_ca_file`: the bridge connects over TLS (a nats://
/// URL is upgraded, as the server requires). A CA that did not sign the
/// server's certificate is a clear TLS error; `tls_required` against a
/// plain server is too, instead of a plain-text connection.
#[test]
fn tls_with_ca_file() {
    let pki = Pki::new();
    let (nats, monitor, _d) = nats_with(&pki.server_conf(false));
    let bridge = start_bridge(
        &nats,
        vec![("TRADEFEED_BRIDGE_NATS__TLS_CA_FILE", pki.path("ca.pem"))],
        true,
    );
    let c = wait_connection(monitor, "tradefeed-bridge");
    assert!(
        c["tls_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.")),
        "{c}"
    );
    assert_mirrors(
        &bridge,
        &nats.url(),
        json!({"tls": {"caFile": pki.path("ca.pem")}}),
    );
    // tls:// works the same
    let tls_url = nats.url().replace("nats://", "tls://");
    let b2 = start_bridge(
        &nats,
        vec![
            (
                "TRADEFEED_BRIDGE_NATS__SERVERS",
                json!([tls_url]).to_string(),
            ),
            ("TRADEFEED_BRIDGE_NATS__TLS_CA_FILE", pki.path("ca.pem")),
            ("TRADEFEED_BRIDGE_NATS__NAME", "tfb-tls-url".into()),
        ],
        true,
    );
    wait_connection(monitor, "tfb-tls-url");
    drop(b2);

    // the wrong CA
    let wrong = start_bridge(
        &nats,
        vec![(
            "TRADEFEED_BRIDGE_NATS__TLS_CA_FILE",
            pki.path("other-ca.pem"),
        )],
        false,
    );
    let line = wait_log(&wrong, "TLS with the server at", READYZ_WAIT);
    assert!(line.contains(&nats.url()), "{line}");
    assert!(
        line.contains("not signed by a CA in nats.tls_ca_file"),
        "says why: {line}"
    );
    assert_eq!(wrong.admin("/readyz").0, 503);

    // tls_required against a server without TLS: an error, not plain text
    let (plain, plain_monitor, _p) = nats_with("");
    let forced = start_bridge(
        &plain,
        vec![("TRADEFEED_BRIDGE_NATS__TLS_REQUIRED", "true".into())],
        false,
    );
    let line = wait_log(&forced, "TLS with the server at", READYZ_WAIT);
    assert!(line.contains(&plain.url()), "{line}");
    assert!(
        line.contains("does the server offer TLS on this port"),
        "{line}"
    );
    assert_eq!(forced.admin("/readyz").0, 503);
    assert!(
        !connz(plain_monitor)
            .iter()
            .any(|c| c["name"] == "tradefeed-bridge"),
        "connected in plain text"
    );

    // a CA file that is not PEM: refused at start-up
    let (code, _, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config"],
        &[(
            "TRADEFEED_BRIDGE_NATS__TLS_CA_FILE",
            &pki.path("client-key.pem"),
        )],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("nats.tls_ca_file: file") && err.contains("no PEM certificate"),
        "{err}"
    );
}

/// A server that verifies client certificates (`verify: true`): the bridge
/// connects with `tls_client_cert` + `tls_client_key`, and without them it is
/// refused with a clear error.
#[test]
fn tls_with_client_certificate() {
    let pki = Pki::new();
    let (nats, monitor, _d) = nats_with(&pki.server_conf(true));
    let bridge = start_bridge(
        &nats,
        vec![
            ("TRADEFEED_BRIDGE_NATS__TLS_CA_FILE", pki.path("ca.pem")),
            (
                "TRADEFEED_BRIDGE_NATS__TLS_CLIENT_CERT",
                pki.path("client.pem"),
            ),
            (
                "TRADEFEED_BRIDGE_NATS__TLS_CLIENT_KEY",
                pki.path("client-key.pem"),
            ),
        ],
        true,
    );
    let c = wait_connection(monitor, "tradefeed-bridge");
    assert!(c["tls_version"].is_string(), "{c}");
    assert_mirrors(
        &bridge,
        &nats.url(),
        json!({"tls": {"caFile": pki.path("ca.pem"), "certFile": pki.path("client.pem"),
                       "keyFile": pki.path("client-key.pem")}}),
    );
    let key = std::fs::read_to_string(pki.path("client-key.pem")).unwrap();
    let key_body = key.lines().nth(1).unwrap();
    assert!(!bridge.log().contains(key_body));

    let without = start_bridge(
        &nats,
        vec![("TRADEFEED_BRIDGE_NATS__TLS_CA_FILE", pki.path("ca.pem"))],
        false,
    );
    let line = wait_log(&without, "NATS: TLS with the server at", READYZ_WAIT);
    assert!(line.contains(&nats.url()), "{line}");
    assert!(
        line.contains("asks for a client certificate: set nats.tls_client_cert"),
        "{line}"
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(without.admin("/readyz").0, 503);

    // half a client identity, or a key file that holds no key
    for (env, want) in [
        (
            vec![(
                "TRADEFEED_BRIDGE_NATS__TLS_CLIENT_CERT",
                pki.path("client.pem"),
            )],
            "nats.tls_client_key: tls_client_cert and tls_client_key go together",
        ),
        (
            vec![
                (
                    "TRADEFEED_BRIDGE_NATS__TLS_CLIENT_CERT",
                    pki.path("client.pem"),
                ),
                (
                    "TRADEFEED_BRIDGE_NATS__TLS_CLIENT_KEY",
                    pki.path("client.pem"),
                ),
            ],
            "no PEM private key",
        ),
    ] {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, _, err) = bridge_cli(&["--config", "config/traderx.toml", "check-config"], &env);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(want), "{err}");
    }
}

// ------------------------------------------------------------------ reconnects

/// `max_reconnects = 3`: after three failed attempts in a row the bridge says
/// so at error level, stays unready, shuts down and exits with status 1, so
/// that an orchestrator restarts it. At start-up the same applies.
#[test]
fn max_reconnects_gives_up_and_exits() {
    let mut nats = Nats::start();
    let env = vec![
        ("TRADEFEED_BRIDGE_NATS__MAX_RECONNECTS", "3".to_string()),
        ("TRADEFEED_BRIDGE_NATS__RECONNECT_DELAY_MAX", "300ms".into()),
        ("TRADEFEED_BRIDGE_DRAIN_TIMEOUT", "1s".into()),
    ];
    let mut bridge = start_bridge(&nats, env.clone(), true);
    nats.stop();
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = bridge.proc.child.try_wait() {
            break st;
        }
        let (code, _) = bridge.admin("/readyz");
        assert!(
            code == 503 || code == 0 || t0.elapsed() < Duration::from_millis(500),
            "ready with NATS gone: {code}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "still running after giving up?\n{}",
            bridge.log()
        );
        thread::sleep(Duration::from_millis(25));
    };
    eprintln!("exited {status} after {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(1), "{}", bridge.log());
    let log = bridge.log();
    assert_eq!(
        log.matches(&format!("NATS: cannot connect to {}", nats.url()))
            .count(),
        3,
        "three attempts, each reported:\n{log}"
    );
    let gave_up = log
        .lines()
        .find(|l| l.contains("gave up after 3 failed connection attempts"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(gave_up.contains("ERROR"), "{gave_up}");
    assert!(gave_up.contains("nats.max_reconnects = 3"), "{gave_up}");
    assert!(log.contains("stopped because"), "{log}");

    // at start-up, with no server at all
    let mut early = start_bridge(&nats, env, false);
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = early.proc.child.try_wait() {
            break st;
        }
        assert!(matches!(early.admin("/readyz").0, 0 | 503));
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", early.log());
        thread::sleep(Duration::from_millis(25));
    };
    assert_eq!(status.code(), Some(1), "{}", early.log());
    assert!(early
        .log()
        .contains("gave up after 3 failed connection attempts"));
}
