//! The command line and the configuration files: `check-config` on the
//! shipped samples and on broken input, environment overrides, `--help`, the
//! JSON log format, and `config/reference.toml` as the one source of truth for
//! keys and defaults.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use figment::providers::{Format, Toml};
use figment::Figment;
use serde_json::{json, Value};
use tradefeed_bridge::config::{self, Config};

fn check(file: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    bridge_cli(&["--config", file, "check-config"], env)
}

/// Every shipped sample (config/**/*.toml) passes validation: CI runs this.
#[test]
fn shipped_samples_pass_check_config() {
    fn tomls(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                tomls(&p, out);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    let mut files: Vec<PathBuf> = Vec::new();
    tomls(&root().join("config"), &mut files);
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["reference.toml", "traderx.toml", "traderx-verbatim.toml"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    for f in &files {
        let (code, out, err) = check(f.to_str().unwrap(), &[]);
        assert_eq!(code, 0, "{}: {out}{err}", f.display());
        assert!(out.contains("configuration is valid"), "{out}");
        assert!(err.is_empty(), "{err}");
    }
}

/// A file with many problems: every one is printed, with its key path (and
/// where the value came from), and the exit status is 2. Serde stops at the
/// first type error; the bridge does not.
#[test]
fn every_problem_is_printed_with_its_key() {
    let dir = scratch();
    let file = dir.path().join("broken.toml");
    std::fs::write(
        &file,
        r#"
mode = "server"
colour = "blue"
[socketio]
lisen = "0.0.0.0:1"
listen = "nope"
max_buffer_packets = "lots"
[nats]
servers = []
connect_timeout = "soon"
token = "t"
user = "u"
[[routes]]
name = "orders"
topic = "/trades"
subject = "trades.new"
direction = "sideways"
prio = 1
[[routes]]
topic = "/x"
subject = "x"
[[routes]]
name = "bad-subject"
topic = "/accounts/{id}/trades"
subject = "trades.{id}.>"
type = "Trade"
"#,
    )
    .unwrap();
    let f = file.display().to_string();
    let (code, out, err) = check(&f, &[("TRADEFEED_BRIDGE_ADMIN__LISTEN", "also-bad")]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    let from_file = format!("(from TOML file {f})");
    let want = [
        ("colour", "unknown key", true),
        ("socketio.lisen", "unknown key", true),
        ("socketio.listen", "`nope` is not an address", false),
        ("socketio.max_buffer_packets", "expected usize", true),
        ("nats.servers", "at least one server URL", false),
        ("nats.connect_timeout", "expected a duration", true),
        ("nats", "choose one of token, user/password", false),
        ("nats.password", "user and password go together", false),
        (
            "routes[0].direction",
            "unknown value `sideways`, expected `both`, `to_nats` or `to_socketio`",
            true,
        ),
        ("routes[0].prio", "unknown key", true),
        ("routes[1]", "missing field `name`", true),
        ("routes[2].subject", "wildcards", false),
        (
            "admin.listen",
            "`also-bad` is not an address like 0.0.0.0:18097 (from environment variable TRADEFEED_BRIDGE_ADMIN__LISTEN)",
            false,
        ),
    ];
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines[0].contains(&format!("{} configuration problem(s)", want.len())),
        "{err}"
    );
    for (key, msg, in_file) in want {
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{key}: ")) && l.contains(msg))
            .unwrap_or_else(|| panic!("no `{key}: ...{msg}...` in:\n{err}"));
        if in_file {
            assert!(line.ends_with(&from_file), "{line}");
        }
    }
    assert_eq!(lines.len(), want.len() + 1, "{err}");
    // the secret given next to the problems is not printed
    assert!(!err.contains("token = \"t\""));
}

/// Environment variables override the file, `__` separating levels; values
/// are typed (lists, tables, numbers, durations); an unknown key given
/// through the environment is refused with its key and variable.
#[test]
fn environment_overrides() {
    let (code, out, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config", "--show"],
        &[
            ("TRADEFEED_BRIDGE_MODE", "attach"),
            ("TRADEFEED_BRIDGE_ATTACH__URL", "http://trade-feed:18086"),
            ("TRADEFEED_BRIDGE_ATTACH__LEASE", "false"),
            (
                "TRADEFEED_BRIDGE_ATTACH__LEGACY_CONSUMERS",
                "{trade-orders=false}",
            ),
            (
                "TRADEFEED_BRIDGE_NATS__SERVERS",
                r#"["nats://a:4222","nats://b:4222"]"#,
            ),
            ("TRADEFEED_BRIDGE_NATS__MAX_RECONNECTS", "7"),
            ("TRADEFEED_BRIDGE_NATS__CONNECT_TIMEOUT", "750ms"),
            ("TRADEFEED_BRIDGE_NATS__TOKEN", "env-token-123"),
            ("TRADEFEED_BRIDGE_SOCKETIO__LISTEN", "127.0.0.1:28086"),
            ("TRADEFEED_BRIDGE_LOG__FORMAT", "json"),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let shown = out.split("# effective configuration\n").nth(1).unwrap();
    let eff: toml::Value = toml::from_str(shown).unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert_eq!(eff["mode"].as_str(), Some("attach"));
    assert_eq!(
        eff["attach"]["url"].as_str(),
        Some("http://trade-feed:18086")
    );
    assert_eq!(eff["attach"]["lease"].as_bool(), Some(false));
    assert_eq!(
        eff["attach"]["legacy_consumers"]["trade-orders"].as_bool(),
        Some(false)
    );
    assert_eq!(
        eff["nats"]["servers"],
        toml::Value::try_from(vec!["nats://a:4222", "nats://b:4222"]).unwrap()
    );
    assert_eq!(eff["nats"]["max_reconnects"].as_integer(), Some(7));
    assert_eq!(eff["nats"]["connect_timeout"].as_str(), Some("750ms"));
    assert_eq!(
        eff["nats"]["token"].as_str(),
        Some("***"),
        "secrets are masked"
    );
    assert!(!out.contains("env-token-123"));
    assert_eq!(eff["socketio"]["listen"].as_str(), Some("127.0.0.1:28086"));
    assert_eq!(eff["log"]["format"].as_str(), Some("json"));
    // the file's own values stay where not overridden
    assert_eq!(eff["nats"]["name"].as_str(), Some("tradefeed-bridge"));
    assert_eq!(eff["routes"].as_array().map(|r| r.len()), Some(3));
    assert!(out.contains("auth=token"), "{out}");

    // unknown keys through the environment, at the top and nested
    for (var, key) in [
        ("TRADEFEED_BRIDGE_NATS__SERVRS", "nats.servrs"),
        ("TRADEFEED_BRIDGE_COLOUR", "colour"),
        ("TRADEFEED_BRIDGE_SOCKETIO__PATHS__EXTRA", "socketio.paths"),
    ] {
        for cmd in ["check-config", "run"] {
            let (code, out, err) =
                bridge_cli(&["--config", "config/traderx.toml", cmd], &[(var, "1")]);
            assert_eq!(code, 2, "{var} with {cmd}: {out}{err}");
            let line = err
                .lines()
                .find(|l| l.trim_start().starts_with(key))
                .unwrap_or_else(|| panic!("{var}: {err}"));
            assert!(line.contains(var), "names the variable: {line}");
        }
    }

    // TRADEFEED_BRIDGE_CONFIG chooses the file, as --config does
    let (code, out, err) = bridge_cli(
        &["check-config"],
        &[(
            "TRADEFEED_BRIDGE_CONFIG",
            root()
                .join("config/traderx-verbatim.toml")
                .to_str()
                .unwrap(),
        )],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("traderx-verbatim.toml: configuration is valid"),
        "{out}"
    );
    assert!(out.contains("/trades <-> /trades"), "{out}");
}

/// A NATS server URL without a host, or with credentials in it, is refused
/// with its key and the variable that set it, and the credentials are not
/// shown: they would otherwise reach the log with every line naming the
/// server, and a URL without a host only fails later, as endless reconnects.
#[test]
fn server_urls_without_a_host_or_with_credentials_are_refused() {
    const SECRET: &str = "pa55w0rdXYZ";
    let cases = [
        (r#"["nats://"]"#, "names no host"),
        (r#"[""]"#, "names no host"),
        (
            r#"["nats://qauser:pa55w0rdXYZ@nats-broker:4222"]"#,
            "carries credentials",
        ),
        (
            r#"["nats://pa55w0rdXYZ@nats-broker:4222"]"#,
            "carries credentials",
        ),
        (
            r#"["nats://:pa55w0rdXYZ@nats-broker:4222"]"#,
            "carries credentials",
        ),
        // a URL that does not parse is quoted without its credentials too
        (
            r#"["nats://qauser:pa55w0rdXYZ@nats-broker:99999"]"#,
            "invalid port",
        ),
    ];
    for (servers, why) in cases {
        let (code, out, err) = bridge_cli(
            &["--config", "config/traderx.toml", "check-config"],
            &[("TRADEFEED_BRIDGE_NATS__SERVERS", servers)],
        );
        assert_eq!(code, 2, "{servers}: {out}{err}");
        let line = err
            .lines()
            .find(|l| l.trim_start().starts_with("nats.servers[0]: "))
            .unwrap_or_else(|| panic!("{servers}: {err}"));
        assert!(line.contains(why), "{servers}: {line}");
        assert!(
            line.ends_with("(from environment variable TRADEFEED_BRIDGE_NATS__SERVERS)"),
            "{servers}: {line}"
        );
        assert!(!out.contains(SECRET) && !err.contains(SECRET), "{out}{err}");
    }
    let (code, out, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config", "--show"],
        &[
            ("TRADEFEED_BRIDGE_MODE", "attach"),
            (
                "TRADEFEED_BRIDGE_ATTACH__URL",
                "http://qauser:pa55w0rdXYZ@trade-feed:18086",
            ),
        ],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("attach.url: `http://***@trade-feed:18086` carries credentials"),
        "{err}"
    );
    assert!(!out.contains(SECRET) && !err.contains(SECRET), "{out}{err}");

    // a secret of the wrong type inside a table names the table's variable
    let (code, _, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config"],
        &[
            ("TRADEFEED_BRIDGE_MODE", "attach"),
            ("TRADEFEED_BRIDGE_ATTACH__URL", "http://trade-feed:18086"),
            ("TRADEFEED_BRIDGE_ATTACH__HEADERS", "{X-Api-Key=12345}"),
        ],
    );
    assert_eq!(code, 2, "{err}");
    let line = err
        .lines()
        .find(|l| l.trim_start().starts_with("attach.headers.X-Api-Key: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.ends_with("(from environment variable TRADEFEED_BRIDGE_ATTACH__HEADERS)"),
        "{line}"
    );
    assert!(!err.contains("12345"), "{err}");
}

/// A table holding secrets, given through the environment with a brace
/// missing, is read as one string: the problem names the key and the
/// variable but does not quote the string, which holds the secret.
#[test]
fn a_malformed_table_of_secrets_is_not_quoted() {
    const SECRET: &str = "SeCrEt99";
    let attach = [
        ("TRADEFEED_BRIDGE_MODE", "attach"),
        ("TRADEFEED_BRIDGE_ATTACH__URL", "http://trade-feed:18086"),
    ];
    for (var, value, key) in [
        (
            "TRADEFEED_BRIDGE_ATTACH__HEADERS",
            r#"{X-Api-Key="SeCrEt99""#,
            "attach.headers",
        ),
        ("TRADEFEED_BRIDGE_NATS", r#"{token="SeCrEt99""#, "nats"),
        (
            "TRADEFEED_BRIDGE_ATTACH",
            r#"{auth_token="SeCrEt99", url="#,
            "attach",
        ),
    ] {
        for cmd in ["check-config", "run"] {
            let mut env: Vec<_> = attach
                .iter()
                .filter(|(k, _)| !k.starts_with(&format!("{var}__")))
                .copied()
                .collect();
            env.push((var, value));
            let (code, out, err) = bridge_cli(&["--config", "config/traderx.toml", cmd], &env);
            assert_eq!(code, 2, "{var} {cmd}: {out}{err}");
            let line = err
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("{var}: {err}"));
            assert!(line.contains("not shown"), "{line}");
            assert!(line.contains(var), "{line}");
            assert!(
                !out.contains(SECRET) && !err.contains(SECRET),
                "{var}: {out}{err}"
            );
        }
    }
    // elsewhere the string found is still quoted: it helps and holds no secret
    let (code, _, err) = check(
        "config/traderx.toml",
        &[("TRADEFEED_BRIDGE_LOG", "{level=")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(r#"found string "{level=""#), "{err}");
}

/// The admin endpoint and the Socket.IO endpoint cannot share a port, also
/// when one listens on every address and the other on one of them: found
/// by check-config, not at start-up as "Address already in use".
#[test]
fn admin_and_socketio_endpoints_on_one_port_are_refused() {
    for (socketio, admin) in [
        ("0.0.0.0:18086", "0.0.0.0:18086"),
        ("0.0.0.0:18086", "127.0.0.1:18086"),
        ("127.0.0.1:18086", "0.0.0.0:18086"),
        ("[::]:18086", "127.0.0.1:18086"),
    ] {
        let (code, out, err) = check(
            "config/traderx.toml",
            &[
                ("TRADEFEED_BRIDGE_SOCKETIO__LISTEN", socketio),
                ("TRADEFEED_BRIDGE_ADMIN__LISTEN", admin),
            ],
        );
        assert_eq!(code, 2, "{socketio} {admin}: {out}{err}");
        assert!(
            err.lines()
                .any(|l| l.trim_start().starts_with("admin.listen: ") && l.contains("share a port")),
            "{socketio} {admin}: {err}"
        );
    }
    for (socketio, admin) in [
        ("127.0.0.1:18086", "127.0.0.2:18086"),
        ("0.0.0.0:18086", "0.0.0.0:18097"),
    ] {
        let (code, out, err) = check(
            "config/traderx.toml",
            &[
                ("TRADEFEED_BRIDGE_SOCKETIO__LISTEN", socketio),
                ("TRADEFEED_BRIDGE_ADMIN__LISTEN", admin),
            ],
        );
        assert_eq!(code, 0, "{socketio} {admin}: {out}{err}");
    }
}

/// The instance id becomes a token of the bridge's NATS subjects: one with
/// a space, a dot or a wildcard is refused by check-config instead of
/// stopping the bridge at start-up with "invalid subject". The same for
/// the lease bucket, which JetStream refuses (the bridge stood by for ever).
#[test]
fn instance_ids_that_cannot_be_a_subject_token_are_refused() {
    for bad in ["has space", "a.b", "bridge*", "bridge>", "tfb\u{e9}"] {
        let (code, out, err) = check(
            "config/traderx.toml",
            &[("TRADEFEED_BRIDGE_INSTANCE_ID", bad)],
        );
        assert_eq!(code, 2, "{bad}: {out}{err}");
        assert!(
            err.lines()
                .any(|l| l.trim_start().starts_with("instance_id: ")
                    && l.contains("(from environment variable TRADEFEED_BRIDGE_INSTANCE_ID)")),
            "{bad}: {err}"
        );
    }
    // so is the lease bucket's name, which JetStream would refuse at run time
    for bad in ["my bucket", "lease.bucket", ""] {
        let (code, out, err) = check(
            "config/traderx.toml",
            &[
                ("TRADEFEED_BRIDGE_MODE", "attach"),
                ("TRADEFEED_BRIDGE_ATTACH__URL", "http://trade-feed:18086"),
                ("TRADEFEED_BRIDGE_ATTACH__LEASE_BUCKET", bad),
            ],
        );
        assert_eq!(code, 2, "{bad}: {out}{err}");
        assert!(
            err.lines()
                .any(|l| l.trim_start().starts_with("attach.lease_bucket: ")),
            "{bad}: {err}"
        );
    }
    for good in ["trade-feed-bridge", "tradefeed_bridge_2", "B1"] {
        let (code, out, err) = check(
            "config/traderx.toml",
            &[("TRADEFEED_BRIDGE_INSTANCE_ID", good)],
        );
        assert_eq!(code, 0, "{good}: {out}{err}");
    }
}

/// A --config file that does not exist is an error naming the path, for
/// `check-config` and `run` alike; so is a file that is not TOML.
#[test]
fn missing_or_unreadable_config_file() {
    let dir = scratch();
    let missing = dir.path().join("nowhere/bridge.toml");
    let m = missing.display().to_string();
    for args in [
        vec!["--config", m.as_str(), "check-config"],
        vec!["--config", m.as_str(), "run"],
        vec!["--config", m.as_str()],
    ] {
        let (code, out, err) = bridge_cli(&args, &[]);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(&format!("file {m} does not exist")), "{err}");
    }
    let (code, _, err) = bridge_cli(&["check-config"], &[("TRADEFEED_BRIDGE_CONFIG", &m)]);
    assert_eq!(code, 2);
    assert!(err.contains(&m), "{err}");

    // a folder given for a file says so, for --config and for the key files
    let folder = dir.path().display().to_string();
    let (code, _, err) = bridge_cli(&["--config", &folder, "check-config"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("--config: {folder} is a folder, not a file")),
        "{err}"
    );
    for key in ["CREDENTIALS_FILE", "TLS_CA_FILE"] {
        let (code, _, err) = check(
            "config/traderx.toml",
            &[(&format!("TRADEFEED_BRIDGE_NATS__{key}"), &folder)],
        );
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!("{folder} is a folder, not a file")),
            "{key}: {err}"
        );
    }

    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, "this is = = not toml\n").unwrap();
    let g = garbage.display().to_string();
    let (code, _, err) = check(&g, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&g), "{err}");
}

#[test]
fn help_texts_are_clear() {
    let (code, out, _) = bridge_cli(&["--help"], &[]);
    assert_eq!(code, 0);
    for want in [
        "Usage: tradefeed-bridge [OPTIONS] [COMMAND]",
        "run",
        "check-config",
        "--config <CONFIG>",
        "[env: TRADEFEED_BRIDGE_CONFIG=]",
        "[default: config/traderx.toml]",
        "config/reference.toml",
        "TRADEFEED_BRIDGE_",
        "__ between levels",
        "RUST_LOG",
        "Exit status: 0",
        "2 when the configuration is invalid",
    ] {
        assert!(out.contains(want), "--help lacks {want:?}:\n{out}");
    }
    let (code, out, _) = bridge_cli(&["check-config", "--help"], &[]);
    assert_eq!(code, 0);
    for want in ["exit 2", "--show", "secrets shown as ***", "--config"] {
        assert!(
            out.contains(want),
            "check-config --help lacks {want:?}:\n{out}"
        );
    }
    let (code, out, _) = bridge_cli(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("tradefeed-bridge "), "{out}");
    // a mistyped command is refused with usage, status 2 (clap's)
    let (code, _, err) = bridge_cli(&["check-confg"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("check-config"),
        "suggests the right one: {err}"
    );
}

/// `log.format = "json"`: every line is one JSON object, with the level, the
/// message and the event's fields as structured fields.
#[test]
fn json_logs_are_one_object_per_line() {
    let nats = Nats::start();
    let mut bridge = Bridge::start_opts(
        &nats,
        BridgeOpts {
            env: vec![
                ("TRADEFEED_BRIDGE_LOG__FORMAT", "json".into()),
                ("TRADEFEED_BRIDGE_LOG__LEVEL", "debug".into()),
            ],
            ..Default::default()
        },
    );
    let c = Agent::sio(Lang::Node);
    c.connect(&bridge.url(), json!({}));
    c.publish("/accounts/22214/positions", "Position", json!({"id": 1}));
    c.drain(SHORT, |_| true);
    let st = bridge.proc.terminate(Duration::from_secs(15));
    assert!(st.is_some_and(|s| s.success()));
    let log = bridge.log();
    let mut events: Vec<Value> = Vec::new();
    for line in log.lines().filter(|l| !l.is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.is_object(), "{line}");
        for f in ["timestamp", "level", "target"] {
            assert!(v.get(f).is_some(), "no {f}: {line}");
        }
        events.push(v);
    }
    let find = |msg: &str| -> &Value {
        events
            .iter()
            .find(|e| e["message"].as_str().is_some_and(|m| m.starts_with(msg)))
            .unwrap_or_else(|| panic!("no {msg:?} event in:\n{log}"))
    };
    let sio = find("Socket.IO endpoint");
    assert_eq!(sio["level"], "INFO");
    assert_eq!(sio["addr"], format!("127.0.0.1:{}", bridge.port));
    let admin = find("admin endpoint");
    assert_eq!(admin["addr"], format!("127.0.0.1:{}", bridge.admin_port));
    let connected = find("NATS connected to");
    assert_eq!(connected["server"], nats.url());
    assert!(connected["max_payload"].is_u64(), "{connected}");
    let forwarded = events
        .iter()
        .find(|e| e["message"] == "forwarded" && e["route"] == "account-positions")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(forwarded["to_nats"], 1, "{forwarded}");
    assert!(
        events.iter().any(|e| e["level"] == "DEBUG"),
        "per-message flow at debug"
    );
    // text, the default, is not JSON
    let mut text = Bridge::start(&nats);
    text.proc.terminate(Duration::from_secs(15));
    let first = text.log().lines().next().unwrap_or_default().to_string();
    assert!(serde_json::from_str::<Value>(&first).is_err(), "{first}");
    assert!(first.contains(" INFO "), "{first}");
}

// ------------------------------------------------------------------ reference

/// Leaf key paths of a serialised value: objects are walked, anything else
/// (lists, empty tables) is a leaf.
fn leaves(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(x, &p, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// The reference's key lines, by section: (section, key, commented out, line
/// number). A section is "" (top), "nats" ..., or "routes" for the first
/// `[[routes]]` block (later route blocks are examples, not documentation).
fn reference_keys(text: &str) -> Vec<(String, String, bool, usize)> {
    let key_line = |l: &str| -> Option<(String, bool)> {
        let (body, commented) = match l.strip_prefix('#') {
            Some(rest) => (rest.trim_start(), true),
            None => (l, false),
        };
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        let rest = body[name.len()..].trim_start();
        (!name.is_empty() && rest.starts_with('=') && !rest.starts_with("=="))
            .then_some((name, commented))
    };
    let mut out = Vec::new();
    let mut section = String::new();
    let mut route_blocks = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line == "[[routes]]" {
            route_blocks += 1;
            section = "routes".into();
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        if section == "routes" && route_blocks > 1 {
            continue;
        }
        if let Some((key, commented)) = key_line(line) {
            out.push((section.clone(), key, commented, n));
        }
    }
    out
}

/// config/reference.toml documents every key once, each with a comment, and
/// only real keys; every value written there is the real default.
#[test]
fn reference_config_documents_every_key_with_its_default() {
    let path = root().join("config/reference.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();

    // every key of the configuration, and of a route
    let mut all = BTreeMap::new();
    let mut defaults = serde_json::to_value(Config::default()).unwrap();
    defaults.as_object_mut().unwrap().remove("routes");
    leaves(&defaults, "", &mut all);
    let route: tradefeed_bridge::route::RouteSpec =
        serde_json::from_value(json!({"name": "n", "topic": "/t", "subject": "s"})).unwrap();
    let mut route_keys = BTreeMap::new();
    leaves(&serde_json::to_value(route).unwrap(), "", &mut route_keys);
    for k in route_keys.keys() {
        all.insert(format!("routes.{k}"), Value::Null);
    }

    let documented = reference_keys(&text);
    let path_of = |(section, key, _, _): &(String, String, bool, usize)| {
        if section.is_empty() {
            key.clone()
        } else {
            format!("{section}.{key}")
        }
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for d in &documented {
        let p = path_of(d);
        assert!(
            all.contains_key(&p),
            "config/reference.toml line {}: `{p}` is not a configuration key",
            d.3 + 1
        );
        *seen.entry(p).or_default() += 1;
        // documented: a comment right above (or above the key it pairs with)
        let mut above = d.3;
        while above > 0 && reference_keys(lines[above - 1]).len() == 1 {
            above -= 1;
        }
        assert!(
            above > 0 && lines[above - 1].starts_with('#'),
            "config/reference.toml line {}: `{}` has no comment",
            d.3 + 1,
            lines[d.3]
        );
    }
    for key in all.keys() {
        assert_eq!(
            seen.get(key).copied().unwrap_or(0),
            1,
            "`{key}` must be documented exactly once in config/reference.toml"
        );
    }
    // a key left commented out is one without a default
    for d in documented.iter().filter(|d| d.2) {
        let p = path_of(d);
        if let Some(v) = all.get(&p) {
            if !p.starts_with("routes.") {
                assert!(
                    v.is_null(),
                    "`{p}` has a default ({v}): write it, uncommented"
                );
            }
        }
    }

    // the values written are the defaults (routes aside)
    let fig = Figment::new().merge(Toml::file_exact(&path));
    let loaded = config::from_figment(&fig).unwrap_or_else(|e| panic!("{e}"));
    let mut as_written = serde_json::to_value(&loaded).unwrap();
    as_written.as_object_mut().unwrap().remove("routes");
    let mut written = BTreeMap::new();
    leaves(&as_written, "", &mut written);
    let mut real = BTreeMap::new();
    leaves(&defaults, "", &mut real);
    for (k, v) in &real {
        assert_eq!(
            written.get(k),
            Some(v),
            "config/reference.toml gives `{k}` a value other than its default"
        );
    }
    // and the routes are the TraderX profile's
    let traderx = config::from_figment(
        &Figment::new().merge(Toml::file_exact(root().join("config/traderx.toml"))),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&loaded.routes).unwrap(),
        serde_json::to_value(&traderx.routes).unwrap()
    );
}

/// A reader that goes away early (`check-config --show | head -1`) ends the
/// report without a panic, and the exit code still gives the verdict.
#[test]
fn a_closed_standard_output_keeps_the_verdict() {
    let state_005 = root().join("tests/fixtures/prune/state-005");
    let state_005 = state_005.display().to_string();
    let config = root().join("config/traderx.toml").display().to_string();
    for (args, verdict) in [
        (
            vec!["--config", config.as_str(), "check-config", "--show"],
            0,
        ),
        (vec!["prune-check", state_005.as_str()], 1),
    ] {
        let mut child = spawn_piped(&args);
        // Closed before the child can have written anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("bridge binary");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(verdict), "{args:?}: {err}");
    }
}

/// A reader of standard error that goes away early (`2>&1 | head -1`, a log
/// shipper that died) does not turn a refusal into a panic: the exit code
/// still gives the verdict.
#[test]
fn a_closed_standard_error_keeps_the_verdict() {
    let missing = root().join("tests/fixtures/no-such-config.toml");
    let mut child = spawn_piped(&["--config", missing.to_str().unwrap(), "check-config"]);
    // Closed before the child can have written anything.
    drop(child.stderr.take());
    let out = child.wait_with_output().expect("bridge binary");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The bridge binary with `args`, standard input empty, standard output and
/// error piped, `RUST_LOG` removed.
fn spawn_piped(args: &[&str]) -> std::process::Child {
    std::process::Command::new(bridge_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bridge binary")
}
