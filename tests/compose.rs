//! What `compose/` ships, checked without a Docker engine: the overlay is
//! parsed (PyYAML from tests/.venv) and checked for what makes it work next
//! to TraderX (services, images, ports, health checks, start order, the
//! environment the bridge really reads, files it mounts); the Dockerfile's
//! references are checked against the repository; nats-server runs the
//! shipped configuration; nginx checks the shipped snippets.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::broker::Broker;
use common::nginx::{self, UPSTREAM_ADMIN, UPSTREAM_BRIDGE, UPSTREAM_NATS_WS};
use common::*;
use serde_json::Value;

const OVERLAY: &str = "compose/docker-compose.bridge.yml";

fn yaml(path: &Path) -> Value {
    let out = Command::new(root().join("tests/.venv/bin/python"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .expect("tests/.venv (scripts/install-test-deps.sh)");
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Compose's interpolation of `${VAR}`, `${VAR:-default}` and
/// `${VAR:?message}` over every string of the document.
fn interpolate(v: &Value, env: &[(&str, &str)]) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => Value::String(interpolate_str(s, env)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| interpolate(x, env))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), interpolate(x, env)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn interpolate_str(s: &str, env: &[(&str, &str)]) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {s}"))?;
        let expr = &rest[start + 2..start + end];
        let lookup = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let value = if let Some((name, msg)) = expr.split_once(":?") {
            lookup(name)
                .map(str::to_string)
                .ok_or_else(|| format!("{name}: {msg}"))?
        } else if let Some((name, default)) = expr.split_once(":-") {
            lookup(name).unwrap_or(default).to_string()
        } else {
            lookup(expr).unwrap_or("").to_string()
        };
        out.push_str(&value);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The overlay as compose reads it, with TFB_DIR set to this
/// checkout.
fn overlay() -> Value {
    let root = root().display().to_string();
    let raw = yaml(&common::root().join(OVERLAY));
    interpolate(&raw, &[("TFB_DIR", root.as_str())]).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `host:container` mounts of a service, as (source, target).
fn mounts(service: &Value) -> Vec<(String, String)> {
    strings(&service["volumes"])
        .iter()
        .map(|m| {
            let mut parts = m.split(':');
            (
                parts.next().unwrap().to_string(),
                parts.next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn depends_healthy(service: &Value, on: &str) -> bool {
    service["depends_on"][on]["condition"] == "service_healthy"
}

#[test]
fn overlay_needs_the_checkout_path_and_says_so() {
    let raw = yaml(&root().join(OVERLAY));
    let err = interpolate(&raw, &[]).unwrap_err();
    assert!(
        err.contains("TFB_DIR") && err.contains("tradefeed-bridge checkout"),
        "{err}"
    );
}

#[test]
fn overlay_adds_a_healthy_nats_broker_with_websocket_and_monitoring() {
    let doc = overlay();
    let broker = &doc["services"]["nats-broker"];
    let image = broker["image"].as_str().unwrap();
    assert!(image.starts_with("nats:2.14"), "{image}");
    assert_eq!(
        strings(&broker["command"]),
        ["-c", "/etc/nats/nats-server.conf"]
    );
    let conf = mounts(broker)
        .into_iter()
        .find(|(_, target)| target == "/etc/nats/nats-server.conf")
        .expect("the config file is mounted");
    assert_eq!(
        Path::new(&conf.0),
        root().join("compose/nats-server.conf"),
        "mounted from compose/"
    );
    assert!(
        mounts(broker).iter().any(|(_, t)| t == "/data"),
        "JetStream store"
    );

    // The ports the shipped configuration listens on are published.
    let text = std::fs::read_to_string(&conf.0).unwrap();
    for (key, port) in [("listen", 4222), ("http", 8222)] {
        assert!(
            text.contains(&format!("{key}: \"0.0.0.0:{port}\"")),
            "{key} {port}"
        );
    }
    assert!(text.contains("listen: \"0.0.0.0:8081\""), "websocket 8081");
    let ports = strings(&broker["ports"]);
    for p in ["4222:4222", "8222:8222", "8081:8081"] {
        assert!(ports.contains(&p.to_string()), "{ports:?} lacks {p}");
    }

    // The health check asks the monitoring port's /healthz, with a tool the
    // alpine image has.
    let test = strings(&broker["healthcheck"]["test"]);
    assert_eq!(test[0], "CMD");
    assert_eq!(test[1], "wget");
    assert!(
        test.last().unwrap() == "http://127.0.0.1:8222/healthz",
        "{test:?}"
    );
    assert!(broker["healthcheck"]["interval"].is_string());
    assert!(broker["healthcheck"]["retries"].as_u64().unwrap() >= 3);
    assert!(doc["volumes"]
        .as_object()
        .unwrap()
        .contains_key("nats-broker-data"));
}

#[test]
fn overlay_puts_the_bridge_in_trade_feeds_place() {
    let doc = overlay();
    let bridge = &doc["services"]["trade-feed"];
    assert_eq!(
        Path::new(bridge["build"]["context"].as_str().unwrap()),
        root()
    );
    let dockerfile = bridge["build"]["dockerfile"].as_str().unwrap();
    assert!(root().join(dockerfile).is_file(), "{dockerfile}");
    assert!(bridge["image"]
        .as_str()
        .unwrap()
        .starts_with("tradefeed-bridge:"));
    assert_eq!(strings(&bridge["command"]), ["run"]);

    // trade-feed's port, and the admin port.
    let ports = strings(&bridge["ports"]);
    assert!(ports.contains(&"18086:18086".to_string()), "{ports:?}");
    assert!(ports.contains(&"18097:18097".to_string()), "{ports:?}");
    let env = bridge["environment"].as_object().unwrap();
    assert_eq!(env["TRADEFEED_BRIDGE_SOCKETIO__LISTEN"], "0.0.0.0:18086");
    assert_eq!(env["TRADEFEED_BRIDGE_ADMIN__LISTEN"], "0.0.0.0:18097");
    assert_eq!(
        env["TRADEFEED_BRIDGE_NATS__SERVERS"],
        "[\"nats://nats-broker:4222\"]"
    );

    // Health: the image's own probe of /readyz; started after the broker is
    // healthy; the legacy Java services start after the bridge is.
    assert_eq!(
        strings(&bridge["healthcheck"]["test"]),
        ["CMD", "/usr/local/bin/tradefeed-bridge", "probe"]
    );
    assert!(depends_healthy(bridge, "nats-broker"));
    for svc in ["trade-processor", "trade-service", "ingress"] {
        let s = &doc["services"][svc];
        assert!(depends_healthy(s, "trade-feed"), "{svc}");
        assert!(depends_healthy(s, "nats-broker"), "{svc}");
    }
}

/// Every variable the overlay gives the bridge is one it reads: the bridge's
/// own check-config, which refuses unknown keys, accepts exactly that
/// environment with the image's configuration.
#[test]
fn overlay_environment_is_what_the_bridge_reads() {
    let doc = overlay();
    let env = doc["services"]["trade-feed"]["environment"]
        .as_object()
        .unwrap();
    let mut cmd = Command::new(bridge_bin());
    cmd.current_dir(root())
        .args(["--config", "config/traderx.toml", "check-config"]);
    for (k, v) in env {
        assert!(k.starts_with("TRADEFEED_BRIDGE_"), "{k}");
        cmd.env(k, v.as_str().unwrap());
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("nats=[\"nats://nats-broker:4222\"]"),
        "{stdout}"
    );
    assert!(stdout.contains("socketio=0.0.0.0:18086"), "{stdout}");

    // The check can fail: a misspelt variable is refused by name.
    let out = Command::new(bridge_bin())
        .current_dir(root())
        .args(["--config", "config/traderx.toml", "check-config"])
        .env("TRADEFEED_BRIDGE_NATS__SERVRS", "[\"nats://x:4222\"]")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nats.servrs"));
}

#[test]
fn overlay_mounts_the_ingress_snippets_where_the_nginx_image_reads_them() {
    let doc = overlay();
    let m = mounts(&doc["services"]["ingress"]);
    let dir = nginx::ingress_dir();
    let want = [
        (
            dir.join("tradefeed-upstreams.conf"),
            "/etc/nginx/conf.d/tradefeed-upstreams.conf",
        ),
        (
            dir.join("tradefeed-websocket.conf"),
            "/etc/nginx/conf.d/tradefeed-websocket.conf",
        ),
        (dir.join("locations"), "/etc/nginx/tradefeed-bridge"),
    ];
    for (src, target) in want {
        assert!(src.exists(), "{}", src.display());
        assert!(
            m.iter().any(|(s, t)| Path::new(s) == src && t == target),
            "{} -> {target} not in {m:?}",
            src.display()
        );
    }
}

/// The upstreams name the overlay's services and ports, under the names the
/// location snippets (and so the nginx tests) use.
#[test]
fn ingress_upstreams_point_at_the_overlays_services() {
    let text =
        std::fs::read_to_string(nginx::ingress_dir().join("tradefeed-upstreams.conf")).unwrap();
    let mut blocks = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("upstream ") {
            name = Some(rest.trim_end_matches('{').trim().to_string());
        } else if let (Some(n), Some(server)) = (&name, line.strip_prefix("server ")) {
            blocks.push((n.clone(), server.trim_end_matches(';').to_string()));
        }
    }
    assert_eq!(
        blocks,
        [
            (UPSTREAM_BRIDGE.to_string(), "trade-feed:18086".to_string()),
            (UPSTREAM_ADMIN.to_string(), "trade-feed:18097".to_string()),
            (UPSTREAM_NATS_WS.to_string(), "nats-broker:8081".to_string()),
        ]
    );
    let mut used = BTreeSet::new();
    for f in std::fs::read_dir(nginx::ingress_dir().join("locations")).unwrap() {
        let t = std::fs::read_to_string(f.unwrap().path()).unwrap();
        for l in t.lines() {
            if let Some(u) = l.trim().strip_prefix("proxy_pass http://") {
                used.insert(u.trim_end_matches(';').to_string());
            }
        }
    }
    let declared: BTreeSet<String> = blocks.into_iter().map(|(n, _)| n).collect();
    assert_eq!(used, declared);
}

/// nginx accepts the shipped snippets as the ingress includes them.
#[test]
fn ingress_snippets_pass_nginx_t() {
    let dir = scratch();
    let d = dir.path().display();
    let up = nginx::ingress_dir();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n\
             upstream {UPSTREAM_BRIDGE} {{ server 127.0.0.1:1; }}\n\
             upstream {UPSTREAM_ADMIN} {{ server 127.0.0.1:2; }}\n\
             upstream {UPSTREAM_NATS_WS} {{ server 127.0.0.1:3; }}\n\
             include {}/tradefeed-websocket.conf;\n\
             server {{ listen 127.0.0.1:{}; include {}/locations/*.conf; }}\n}}\n",
            up.display(),
            free_port(),
            up.display()
        ),
    )
    .unwrap();
    nginx::nginx_test(dir.path(), &conf).unwrap_or_else(|e| panic!("nginx -t: {e}"));
}

// ------------------------------------------------------------------ Dockerfile

/// One instruction: keyword and the rest, continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (k, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((k.to_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_builds_the_console_and_the_binary_and_runs_unprivileged() {
    let text = std::fs::read_to_string(root().join("compose/Dockerfile")).unwrap();
    let steps = instructions(&text);
    let froms: Vec<&String> = steps
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, r)| r)
        .collect();
    assert!(froms.len() >= 3, "multi-stage: {froms:?}");
    assert!(froms[0].starts_with("node:") && froms[0].ends_with(" AS console"));
    assert!(froms[1].starts_with("rust:") && froms[1].ends_with(" AS build"));
    assert!(froms.last().unwrap().contains("-slim"), "small final image");

    // The final stage: everything after the last FROM.
    let last = steps.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let final_stage = &steps[last..];
    let user = final_stage
        .iter()
        .find(|(k, _)| k == "USER")
        .map(|(_, r)| r.clone())
        .expect("USER in the final stage");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "runs as {user}");
    assert!(
        final_stage
            .iter()
            .any(|(k, r)| k == "RUN" && r.contains(&format!("--uid {uid}"))),
        "user {uid} is created"
    );

    // The binary: Cargo's bin name, copied to where ENTRYPOINT and the
    // health checks run it.
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(cargo.contains("name = \"tradefeed-bridge\""));
    assert!(text.contains("cargo build --release --locked --bin tradefeed-bridge"));
    assert!(text.contains(
        "COPY --from=build /src/target/release/tradefeed-bridge /usr/local/bin/tradefeed-bridge"
    ));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/tradefeed-bridge\"]"));
    assert!(text.contains("CMD [\"/usr/local/bin/tradefeed-bridge\", \"probe\"]"));

    // The console is built from the npm registry in its own stage and lands
    // where the bridge looks by default (console/dist under WORKDIR), next
    // to config/ (the default --config is config/traderx.toml).
    assert!(text.contains("RUN npm ci "));
    assert!(text.contains("RUN npm run build"));
    let workdir = final_stage
        .iter()
        .find(|(k, _)| k == "WORKDIR")
        .map(|(_, r)| r.clone())
        .unwrap();
    assert_eq!(workdir, "/opt/tradefeed-bridge");
    assert!(text.contains("COPY --from=console /src/console/dist/ ./console/dist/"));
    assert!(text.contains("COPY config/ ./config/"));
    let defaults = tradefeed_bridge::config::Config::default();
    assert_eq!(defaults.console.dir, Path::new("console/dist"));

    // Every file copied from the context exists and is let through the
    // Dockerfile's own ignore file.
    let ignore = std::fs::read_to_string(root().join("compose/Dockerfile.dockerignore")).unwrap();
    for (k, r) in &steps {
        if k != "COPY" || r.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = r.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(root().join(src).exists(), "COPY {src}: missing");
            let allowed = ignore.lines().any(|l| {
                l.strip_prefix('!')
                    .is_some_and(|p| src.trim_end_matches('/') == p.trim_end_matches('/'))
            });
            assert!(allowed, "COPY {src} is excluded by Dockerfile.dockerignore");
        }
    }
}

/// The build stage's context, assembled as Docker would from its `COPY`
/// lines (into its WORKDIR), is a complete Cargo workspace: every member the
/// root manifest names is there, so `cargo build` in the image can load it.
#[test]
fn dockerfile_build_stage_copies_the_whole_cargo_workspace() {
    let text = std::fs::read_to_string(root().join("compose/Dockerfile")).unwrap();
    let steps = instructions(&text);
    let start = steps
        .iter()
        .position(|(k, r)| k == "FROM" && r.ends_with(" AS build"))
        .expect("a build stage");
    let end = steps[start + 1..]
        .iter()
        .position(|(k, _)| k == "FROM")
        .map_or(steps.len(), |i| start + 1 + i);
    let dir = scratch();
    let mut workdir = dir.path().to_path_buf();
    for (k, r) in &steps[start..end] {
        if k == "WORKDIR" {
            workdir = dir.path().join(r.trim_start_matches('/'));
            std::fs::create_dir_all(&workdir).unwrap();
        }
        if k != "COPY" || r.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = r.split_whitespace().collect();
        let (dest, sources) = parts.split_last().unwrap();
        for src in sources {
            let from = root().join(src);
            let into_dir = dest.ends_with('/') || sources.len() > 1 || from.is_dir();
            let to = match (into_dir, from.is_dir()) {
                (_, true) => workdir.join(dest),
                (true, false) => workdir.join(dest).join(from.file_name().unwrap()),
                (false, false) => workdir.join(dest),
            };
            copy_tree(&from, &to);
        }
    }
    let out = Command::new("cargo")
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(&workdir)
        .output()
        .expect("cargo");
    assert!(
        out.status.success(),
        "the image's build stage cannot load the Cargo workspace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cp -r from to`: a file, or a directory's contents into `to`.
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

// ------------------------------------------------------------------ nats-server.conf

#[test]
fn nats_server_accepts_the_shipped_config() {
    let out = Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(root().join("compose/nats-server.conf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped broker runs: healthy, JetStream on, WebSocket without TLS,
/// server pings under nginx's default proxy_read_timeout (60 s).
#[test]
fn shipped_broker_runs_with_jetstream_websocket_and_warm_pings() {
    let broker = Broker::shipped();
    let (status, _) = broker.monitor("/healthz?js-enabled-only=true");
    assert_eq!(status, 200);
    let (_, varz) = broker.monitor("/varz");
    let varz: Value = serde_json::from_str(&varz).unwrap();
    assert_eq!(varz["server_name"], "nats-broker");
    assert_eq!(varz["max_payload"], 1024 * 1024);
    assert!(varz["jetstream"]["config"]["store_dir"].is_string());
    assert_eq!(varz["websocket"]["port"], broker.ws_port);
    assert_eq!(varz["websocket"]["no_tls"], true);
    let ping_ns = varz["ping_interval"].as_u64().unwrap();
    assert!(ping_ns < 60_000_000_000, "ping_interval {ping_ns} ns");

    // A browser-side client (nats.ws) and a service (nats) talk through it.
    let ws = Agent::nats(Lang::Node);
    ws.nats_connect(&broker.ws_url());
    ws.sub("s", "positions.account.22.*");
    let tcp = Agent::nats(Lang::Node);
    tcp.nats_connect(&broker.url());
    tcp.pub_text("positions.account.22.updated", "{\"quantity\":1}");
    let m = ws.next_msg("s", WAIT);
    assert_eq!(m["data"], "{\"quantity\":1}");
}

// ------------------------------------------------------------------ every compose file, the attach overlay, the stage files

/// Every compose file shipped: the two overlays and the stage files.
fn compose_files() -> Vec<std::path::PathBuf> {
    let mut files = vec![root().join(OVERLAY), root().join(ATTACH_OVERLAY)];
    let mut stages: Vec<_> = std::fs::read_dir(root().join("compose/stages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    stages.sort();
    assert!(stages.len() >= 3, "{stages:?}");
    files.extend(stages);
    files
}

const ATTACH_OVERLAY: &str = "compose/docker-compose.bridge-attach.yml";

/// The `${...}` expressions of a compose file's text.
fn variables(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        let end = rest[at..].find('}').expect("unclosed ${");
        out.push(rest[at + 2..at + end].to_string());
        rest = &rest[at + end + 1..];
    }
    out
}

/// The variables compose interpolates in these files never use the bridge's
/// prefix: the bridge reads every `TRADEFEED_BRIDGE_*` variable of its
/// environment as configuration and refuses unknown ones, so a shell that
/// exported one for compose could not run `tradefeed-bridge` (or
/// scripts/run.sh) any more. A required one says what to set.
#[test]
fn compose_variables_stay_out_of_the_bridges_environment() {
    for f in compose_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        for expr in variables(&text) {
            let name = expr.split([':', '-', '?']).next().unwrap();
            assert!(
                !name.starts_with("TRADEFEED_BRIDGE_"),
                "{}: ${{{expr}}} would be read by the bridge as configuration",
                f.display()
            );
            if let Some((_, msg)) = expr.split_once(":?") {
                assert!(msg.starts_with("set "), "{}: {expr}", f.display());
            }
        }
    }
    // What the rule prevents, shown on the bridge itself.
    let (code, _, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config"],
        &[("TRADEFEED_BRIDGE_DIR", "/opt/tradefeed-bridge")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("TRADEFEED_BRIDGE_DIR"), "{err}");
    let (code, out, err) = bridge_cli(
        &["--config", "config/traderx.toml", "check-config"],
        &[("TFB_DIR", "/opt/tradefeed-bridge")],
    );
    assert_eq!(code, 0, "{out}{err}");
}

fn attach_overlay(legacy_processor: Option<&str>) -> Value {
    let root = root().display().to_string();
    let raw = yaml(&common::root().join(ATTACH_OVERLAY));
    let mut env = vec![("TFB_DIR", root.as_str())];
    if let Some(v) = legacy_processor {
        env.push(("TFB_LEGACY_PROCESSOR", v));
    }
    interpolate(&raw, &env).unwrap()
}

/// Attach mode beside an untouched trade-feed: the bridge is a service of
/// its own, trade-feed is not redefined, and the bridge accepts exactly the
/// environment the overlay gives it, with the processor's declaration taken
/// from TFB_LEGACY_PROCESSOR.
#[test]
fn attach_overlay_runs_the_bridge_beside_trade_feed() {
    let doc = attach_overlay(None);
    let services = doc["services"].as_object().unwrap();
    assert!(
        !services.contains_key("trade-feed"),
        "trade-feed stays as it is"
    );
    for svc in ["trade-service", "trade-processor"] {
        assert!(!services.contains_key(svc), "{svc} is not touched");
    }
    assert_eq!(
        doc["services"]["nats-broker"],
        overlay()["services"]["nats-broker"],
        "the same broker as the server-mode overlay"
    );
    let bridge = &doc["services"]["tradefeed-bridge"];
    assert_eq!(
        Path::new(bridge["build"]["context"].as_str().unwrap()),
        root()
    );
    assert_eq!(
        strings(&bridge["healthcheck"]["test"]),
        ["CMD", "/usr/local/bin/tradefeed-bridge", "probe"]
    );
    assert!(depends_healthy(bridge, "nats-broker"));
    assert_eq!(strings(&bridge["ports"]), ["18097:18097"]);
    assert!(depends_healthy(
        &doc["services"]["ingress"],
        "tradefeed-bridge"
    ));

    for (setting, want) in [(None, "true"), (Some("false"), "false")] {
        let doc = attach_overlay(setting);
        let env = doc["services"]["tradefeed-bridge"]["environment"]
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(env["TRADEFEED_BRIDGE_MODE"], "attach");
        assert_eq!(
            env["TRADEFEED_BRIDGE_ATTACH__URL"],
            "http://trade-feed:18086"
        );
        let mut cmd = Command::new(bridge_bin());
        cmd.current_dir(root())
            .args(["--config", "config/traderx.toml", "check-config", "--show"])
            .env_remove("RUST_LOG");
        for (k, v) in &env {
            assert!(k.starts_with("TRADEFEED_BRIDGE_"), "{k}");
            cmd.env(k, v.as_str().unwrap());
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("mode = \"attach\""), "{stdout}");
        assert!(
            stdout.contains(&format!("trade-orders = {want}")),
            "{want}: {stdout}"
        );
    }
}

/// In attach mode the ingress still sends Socket.IO to trade-feed and the
/// console to the bridge's own service, under the upstream names the
/// locations use.
#[test]
fn attach_overlay_mounts_upstreams_for_trade_feed_and_the_bridge() {
    let doc = attach_overlay(None);
    let m = mounts(&doc["services"]["ingress"]);
    let dir = nginx::ingress_dir();
    let upstreams = dir.join("tradefeed-upstreams-attach.conf");
    assert!(
        m.iter()
            .any(|(s, t)| Path::new(s) == upstreams
                && t == "/etc/nginx/conf.d/tradefeed-upstreams.conf"),
        "{m:?}"
    );
    for (s, _) in &m {
        assert!(Path::new(s).exists(), "{s}");
    }
    let text = std::fs::read_to_string(&upstreams).unwrap();
    for (name, server) in [
        (UPSTREAM_BRIDGE, "trade-feed:18086"),
        (UPSTREAM_ADMIN, "tradefeed-bridge:18097"),
        (UPSTREAM_NATS_WS, "nats-broker:8081"),
    ] {
        let at = text
            .find(&format!("upstream {name} {{"))
            .unwrap_or_else(|| panic!("no upstream {name}"));
        assert!(
            text[at..].lines().nth(1).unwrap().trim() == format!("server {server};"),
            "{name}: {text}"
        );
    }
}

/// The stage files change one TraderX service each, build it from the NATS
/// tree, and depend only on services the overlays or TraderX's own compose
/// file define (tests/fixtures/prune/state-005 stands for the latter).
#[test]
fn stage_files_build_the_nats_versions_of_traderx_services() {
    let base = yaml(&root().join("tests/fixtures/prune/state-005/docker-compose.yml"));
    let mut known: BTreeSet<String> = base["services"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    known.extend(overlay()["services"].as_object().unwrap().keys().cloned());
    let env = [("TFB_DIR", "/tfb"), ("TRADERX_NATS_DIR", "/traderx-006")];
    let mut moved = BTreeSet::new();
    for f in compose_files().into_iter().skip(2) {
        let raw = yaml(&f);
        let err = interpolate(&raw, &[]).unwrap_err();
        assert!(err.contains("TRADERX_NATS_DIR"), "{}: {err}", f.display());
        let doc = interpolate(&raw, &env).unwrap();
        let services = doc["services"].as_object().unwrap();
        assert_eq!(services.len(), 1, "{}: one service per stage", f.display());
        for (name, s) in services {
            let context = s["build"]["context"].as_str().unwrap();
            assert!(context.starts_with("/traderx-006/"), "{name}: {context}");
            for dep in s["depends_on"].as_object().into_iter().flatten() {
                assert!(known.contains(dep.0), "{name} depends on unknown {}", dep.0);
            }
            if let Some(e) = s["environment"].as_object() {
                assert_eq!(e["NATS_URL"], "nats://nats-broker:4222", "{name}");
            }
            moved.insert(name.clone());
        }
    }
    assert_eq!(
        moved,
        [
            "trade-processor-nats",
            "trade-service",
            "web-front-end-angular"
        ]
        .map(String::from)
        .into_iter()
        .collect()
    );
    assert!(known.contains("trade-service") && known.contains("web-front-end-angular"));
}
