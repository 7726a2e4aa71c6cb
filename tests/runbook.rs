//! docs/migration/runbook.md cannot drift: every command block in it is
//! taken apart here and each command is run or checked.
//!
//! - `tradefeed-bridge`, `curl` (with `jq`, `grep`, `awk`), `timeout` wait
//!   loops and `scripts/smoke.sh` run for real, with the runbook's
//!   placeholders (`$BRIDGE_ADMIN`, `$NATS_URL`...) set to a local
//!   deployment: nats-server on the shipped `compose/nats-server.conf`, the
//!   legacy hub as trade-feed, the bridge in server or attach mode with the
//!   environment the compose overlays give it, nginx with the shipped
//!   snippets as the ingress, and the role simulators of `sim/` standing in
//!   for TraderX's trade-service, trade-processor and front end.
//! - `docker compose` commands are checked (every file they name exists,
//!   every service they name is defined by the compose files in effect,
//!   whose required variables are set; the flags are compose's own) and then
//!   played on the local deployment: a stand-in stops, starts or moves to
//!   NATS as its compose service would, trade-feed's hub gives way to the
//!   bridge, orphans go. So the runbook is rehearsed stage by stage, in
//!   server mode and in attach mode, while the stand-in trade-service keeps
//!   placing orders, and at the end every order must have been booked
//!   exactly once. The roll-back blocks of the stages that move a service
//!   (1 to 3) are rehearsed too: roll back, then the stage's steps again.
//! - `cargo` and `kubectl` commands are checked (files, flags, resources).
//! - Any other command, and any roll-back or Kubernetes block holding a
//!   command that can only be run, fails the test: a new block cannot slip
//!   in untested.
//!
//! TraderX's own compose folder is played by the state-005 fixture of
//! `tests/fixtures/prune` and the state 006 tree by its state-006 fixture.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::nginx::{Nginx, Upstreams};
use common::*;
use serde_json::{json, Value};

const RUNBOOK: &str = "docs/migration/runbook.md";
/// The quiet window the rehearsal gives `decommission-check` (`QUIET_FOR`).
const QUIET_FOR: &str = "3s";
/// How long a watch check may take to come true (a dashboard converging).
const WATCH_CONVERGE: Duration = Duration::from_secs(10);
/// Orders per second of the stand-in trade-service.
const ORDER_RATE: u64 = 100;

// ------------------------------------------------------------------ the runbook's blocks

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Both,
    Server,
    Attach,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// Setting up the shell, the day before.
    Setup,
    /// The checks used at every stage.
    EveryStage,
    Steps,
    Gate,
    Watch,
    Rollback,
    Kubernetes,
}

#[derive(Clone, Debug)]
struct Cmd {
    line: usize,
    text: String,
}

#[derive(Clone, Debug)]
struct Block {
    line: usize,
    stage: Option<u32>,
    mode: Mode,
    role: Role,
    commands: Vec<Cmd>,
}

/// The mode a label paragraph names before its first colon ("**Gate**,
/// attach mode:"), if any.
fn mode_of(paragraph: &str) -> Option<Mode> {
    let head = paragraph.split(':').next().unwrap_or("").to_lowercase();
    if head.contains("server mode") {
        Some(Mode::Server)
    } else if head.contains("attach mode") {
        Some(Mode::Attach)
    } else if head.contains("both modes") {
        Some(Mode::Both)
    } else {
        None
    }
}

fn role_of_label(paragraph: &str) -> Option<Role> {
    let label = paragraph.strip_prefix("**")?.split("**").next()?;
    Some(match label {
        "Steps" => Role::Steps,
        "Gate" => Role::Gate,
        "Watch" => Role::Watch,
        "Roll back" => Role::Rollback,
        _ => return None,
    })
}

/// Every shell block of the runbook with where it stands.
fn parse(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let (mut h2, mut h3) = (String::new(), String::new());
    let mut paragraph = String::new();
    let mut label: Option<Role> = None;
    let mut in_para = false;
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if let Some(t) = line.strip_prefix("## ") {
            h2 = t.to_string();
            h3.clear();
            label = None;
            in_para = false;
            continue;
        }
        if let Some(t) = line.strip_prefix("### ") {
            h3 = t.to_string();
            label = None;
            in_para = false;
            continue;
        }
        if let Some(info) = line.strip_prefix("```") {
            let info = info.trim();
            let mut body = Vec::new();
            for (j, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push((j + 1, l.to_string()));
            }
            match info {
                "sh" => {}
                "json" | "text" | "yaml" | "toml" | "nginx" => continue,
                other => panic!(
                    "{RUNBOOK}:{}: a code block must say what it holds (sh for commands), not `{other}`",
                    i + 1
                ),
            }
            let stage = h2
                .strip_prefix("Stage ")
                .and_then(|r| r.split(':').next())
                .map(|n| n.trim().parse::<u32>().expect("stage number"));
            let role = if h2 == "On Kubernetes" {
                Role::Kubernetes
            } else if h3 == "What to watch" {
                Role::EveryStage
            } else if stage.is_none() {
                Role::Setup
            } else {
                label.unwrap_or_else(|| {
                    panic!("{RUNBOOK}:{}: a block in a stage needs a **Steps**, **Gate**, **Watch** or **Roll back** label before it", i + 1)
                })
            };
            let mode = if h3.starts_with("Server mode") {
                Mode::Server
            } else if h3.starts_with("Attach mode") {
                Mode::Attach
            } else {
                mode_of(&paragraph).unwrap_or(Mode::Both)
            };
            blocks.push(Block {
                line: i + 1,
                stage,
                mode,
                role,
                commands: commands(&body),
            });
            in_para = false;
            continue;
        }
        if line.trim().is_empty() {
            in_para = false;
            continue;
        }
        if !in_para {
            paragraph.clear();
            in_para = true;
            if let Some(r) = role_of_label(line.trim_start_matches("- ")) {
                label = Some(r);
            }
        }
        paragraph.push_str(line);
        paragraph.push(' ');
    }
    blocks
}

/// Commands of a block: continuation lines joined, comments and blank lines
/// left out.
fn commands(body: &[(usize, String)]) -> Vec<Cmd> {
    let mut out = Vec::new();
    let mut current: Option<Cmd> = None;
    for (n, l) in body {
        let t = l.trim();
        if current.is_none() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        let c = current.get_or_insert_with(|| Cmd {
            line: *n,
            text: String::new(),
        });
        if let Some(head) = t.strip_suffix('\\') {
            c.text.push_str(head.trim_end());
            c.text.push(' ');
        } else {
            c.text.push_str(t);
            out.push(current.take().unwrap());
        }
    }
    assert!(
        current.is_none(),
        "{RUNBOOK}: a block ends in a continuation"
    );
    out
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `export`, `unset`, `cd`: the shell's state.
    Declare,
    /// Runs for real against the local deployment.
    Run,
    /// `docker compose`: checked, then played on the local deployment.
    Compose,
    /// `cargo`, `kubectl`: checked only.
    Cargo,
    Kubectl,
}

/// What the test does with a command; `Err` for a command it can neither
/// run nor check.
fn classify(cmd: &str) -> Result<Kind, String> {
    let first = cmd.split_whitespace().next().unwrap_or("");
    Ok(match first {
        "export" | "unset" | "cd" => Kind::Declare,
        "tradefeed-bridge" | "curl" | "timeout" | "\"$TFB_DIR/scripts/smoke.sh\"" => Kind::Run,
        "docker" if cmd.split_whitespace().nth(1) == Some("compose") => Kind::Compose,
        "cargo" => Kind::Cargo,
        "kubectl" => Kind::Kubectl,
        _ => {
            return Err(format!(
                "`{cmd}`: the test can neither run nor check a `{first}` command (tests/runbook.rs)"
            ))
        }
    })
}

/// The metric names the runbook mentions anywhere (a name that stops
/// short, as in a pattern `tradefeed_bridge_messages_(dropped|rejected)`, is
/// not one), with the mode the bridge exports each in: the one its row of
/// the "What to watch" table is marked with ("attach mode", "... (server
/// mode)"), else both.
fn runbook_series() -> BTreeMap<String, Mode> {
    let text = std::fs::read_to_string(root().join(RUNBOOK)).expect(RUNBOOK);
    let name = regex::Regex::new(r"tradefeed_bridge_[a-z_]*[a-z]\b").unwrap();
    let mut out: BTreeMap<String, Mode> = name
        .find_iter(&text)
        .map(|m| (m.as_str().to_string(), Mode::Both))
        .collect();
    let table = text
        .split("\n### What to watch\n")
        .nth(1)
        .expect("a What to watch section")
        .split("\n#")
        .next()
        .unwrap();
    for row in table.lines().filter(|l| l.starts_with("| ")) {
        let first = row.split('|').nth(1).unwrap().trim();
        let Some(mode) = mode_of(first) else {
            continue;
        };
        for m in name.find_iter(row) {
            out.insert(m.as_str().to_string(), mode);
        }
    }
    out
}

fn runbook() -> Vec<Block> {
    let text = std::fs::read_to_string(root().join(RUNBOOK)).expect(RUNBOOK);
    parse(&text)
}

// ------------------------------------------------------------------ shell helpers

/// The process environment without anything the bridge would read as its
/// configuration.
fn base_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| !k.starts_with("TRADEFEED_BRIDGE_") && k != "RUST_LOG")
        .collect()
}

/// Runs `script` with bash (pipefail) in `cwd` with exactly `env`, within
/// `timeout`: (exit code, stdout and stderr).
fn bash(
    script: &str,
    env: &BTreeMap<String, String>,
    cwd: &Path,
    timeout: Duration,
) -> (i32, String) {
    let out_path = tempfile::NamedTempFile::new().unwrap();
    let f = out_path.reopen().unwrap();
    let mut child: Child = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .env_clear()
        .envs(env)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("bash");
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break -2;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::new();
    out_path
        .reopen()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    (code, text)
}

/// The words of a command after the shell's expansion (quotes removed,
/// variables substituted from `env`).
fn words(cmd: &str, env: &BTreeMap<String, String>, cwd: &Path) -> Vec<String> {
    let (code, out) = bash(
        &format!("set -- {cmd}; printf '%s\\0' \"$@\""),
        env,
        cwd,
        Duration::from_secs(5),
    );
    assert_eq!(code, 0, "cannot expand `{cmd}`: {out}");
    out.split('\0')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Copies a fixture tree into a scratch folder.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            copy_tree(&e.path(), &target);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &target).unwrap();
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

// ------------------------------------------------------------------ compose files

/// What compose makes of a list of files: the services (environment, build
/// context, image, bind mounts), the problems of interpolation (a required
/// variable unset), and the variables the files use. Parsed with PyYAML
/// from tests/.venv, interpolated as compose does; relative paths are taken
/// from the first file's folder (the project directory).
const COMPOSE_MODEL: &str = r#"
import json, os, re, sys, yaml
files = json.loads(sys.argv[1])
env = os.environ
errors, used = [], set()
pat = re.compile(r'\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)')
def repl(m):
    if m.group(0) == '$$':
        return '$'
    expr = m.group(1) if m.group(1) is not None else m.group(2)
    p = re.match(r'^([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])(.*))?$', expr, re.S)
    if not p:
        errors.append('bad expression ${%s}' % expr)
        return ''
    name, colon, op, arg = p.groups()
    used.add(name)
    val = env.get(name)
    unset = val is None or (colon == ':' and val == '')
    if op == '-':
        return arg if unset else val
    if op == '?':
        if unset:
            errors.append('%s: %s' % (name, arg))
            return ''
        return val
    return val or ''
def walk(v):
    if isinstance(v, str):
        return pat.sub(repl, v)
    if isinstance(v, list):
        return [walk(x) for x in v]
    if isinstance(v, dict):
        return {k: walk(x) for k, x in v.items()}
    return v
services = {}
project = os.path.dirname(os.path.abspath(files[0])) if files else '.'
for f in files:
    doc = walk(yaml.safe_load(open(f)) or {})
    for name, s in (doc.get('services') or {}).items():
        s = s or {}
        e = services.setdefault(name, {'files': [], 'environment': {}, 'build_context': None, 'image': None, 'mounts': []})
        e['files'].append(f)
        b = s.get('build')
        if isinstance(b, str):
            b = {'context': b}
        if b and b.get('context'):
            e['build_context'] = os.path.normpath(os.path.join(project, b['context']))
        if s.get('image'):
            e['image'] = s['image']
        ev = s.get('environment') or {}
        if isinstance(ev, list):
            ev = dict(x.split('=', 1) if '=' in x else (x, '') for x in ev)
        e['environment'].update({k: '' if v is None else str(v) for k, v in ev.items()})
        for vol in s.get('volumes') or []:
            src = vol.split(':')[0] if isinstance(vol, str) else ''
            if src.startswith(('/', '.')):
                e['mounts'].append([f, os.path.normpath(os.path.join(project, src))])
print(json.dumps({'services': services, 'errors': errors, 'used': sorted(used)}))
"#;

#[derive(Debug, Clone, Default)]
struct Model {
    services: BTreeMap<String, Value>,
    errors: Vec<String>,
}

impl Model {
    fn load(files: &[PathBuf], env: &BTreeMap<String, String>) -> Model {
        for f in files {
            assert!(f.is_file(), "compose file {} does not exist", f.display());
        }
        let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        // Parsed once per list of files and values of the variables compose
        // may read (the files never change during a test).
        static CACHE: std::sync::OnceLock<std::sync::Mutex<BTreeMap<String, Model>>> =
            std::sync::OnceLock::new();
        let vars: Vec<(&String, &String)> = env
            .iter()
            .filter(|(k, _)| {
                k.starts_with("TFB_") || k.starts_with("TRADERX_") || k.starts_with("COMPOSE_")
            })
            .collect();
        let key = format!("{list:?}{vars:?}");
        let cache = CACHE.get_or_init(Default::default);
        if let Some(m) = cache.lock().unwrap().get(&key) {
            return m.clone();
        }
        let out = Command::new(root().join("tests/.venv/bin/python"))
            .args(["-c", COMPOSE_MODEL, &serde_json::to_string(&list).unwrap()])
            .env_clear()
            .envs(env)
            .output()
            .expect("tests/.venv (scripts/install-test-deps.sh)");
        assert!(
            out.status.success(),
            "compose files {list:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let m = Model {
            services: v["services"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            errors: v["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_string())
                .collect(),
        };
        cache.lock().unwrap().insert(key, m.clone());
        m
    }

    fn has(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    fn environment(&self, service: &str) -> BTreeMap<String, String> {
        self.services[service]["environment"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect()
    }

    /// Whether the service is the bridge's image.
    fn is_bridge(&self, service: &str) -> bool {
        self.services[service]["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("tradefeed-bridge:"))
    }
}

/// Every variable the shipped compose files interpolate.
fn compose_variables() -> BTreeSet<String> {
    let mut files = vec![
        root().join("compose/docker-compose.bridge.yml"),
        root().join("compose/docker-compose.bridge-attach.yml"),
    ];
    for e in std::fs::read_dir(root().join("compose/stages")).unwrap() {
        files.push(e.unwrap().path());
    }
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("${") {
            let end = rest[at..].find('}').unwrap();
            let expr = &rest[at + 2..at + end];
            out.insert(expr.split([':', '-', '?']).next().unwrap().to_string());
            rest = &rest[at + end + 1..];
        }
    }
    out
}

// ------------------------------------------------------------------ the tools' flags

/// `docker compose` subcommands the runbook may use, with their flags (from
/// the docker compose v2 command reference): (flags without a value, flags
/// taking one, what the positional words are).
fn compose_subcommand(
    sub: &str,
) -> Option<(&'static [&'static str], &'static [&'static str], Positional)> {
    use Positional::*;
    Some(match sub {
        "up" => (
            &[
                "-d",
                "--detach",
                "--build",
                "--no-build",
                "--no-deps",
                "--force-recreate",
                "--no-recreate",
                "--remove-orphans",
                "--wait",
                "--no-start",
                "--quiet-pull",
                "-V",
                "--renew-anon-volumes",
                "--always-recreate-deps",
            ],
            &["--wait-timeout", "--pull", "--scale", "-t", "--timeout"],
            Services,
        ),
        "stop" => (&[], &["-t", "--timeout"], Services),
        "start" => (&["--wait"], &["--wait-timeout"], Services),
        "restart" => (&["--no-deps"], &["-t", "--timeout"], Services),
        "rm" => (
            &["-s", "--stop", "-f", "--force", "-v", "--volumes"],
            &[],
            Services,
        ),
        "build" => (
            &["--no-cache", "--pull", "-q", "--quiet"],
            &["--build-arg"],
            Services,
        ),
        "config" => (
            &[
                "-q",
                "--quiet",
                "--services",
                "--images",
                "--no-interpolate",
            ],
            &["--format", "-o", "--output"],
            Services,
        ),
        "ps" => (
            &["-a", "--all", "-q", "--quiet", "--services"],
            &["--format", "--status"],
            Services,
        ),
        "logs" => (
            &["-f", "--follow", "-t", "--timestamps", "--no-color"],
            &["--since", "--until", "-n", "--tail"],
            Services,
        ),
        "run" => (
            &["--rm", "--no-deps", "-T", "-d", "--detach"],
            &[
                "-e",
                "--env",
                "--entrypoint",
                "-u",
                "--user",
                "-w",
                "--workdir",
                "--name",
            ],
            ServiceThenCommand,
        ),
        "exec" => (
            &["-T", "-d", "--detach"],
            &["-e", "--env", "-u", "--user", "-w", "--workdir", "--index"],
            ServiceThenCommand,
        ),
        "ls" => (&["-a", "--all", "-q", "--quiet"], &["--format"], Nothing),
        _ => return None,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Positional {
    Services,
    ServiceThenCommand,
    Nothing,
}

const COMPOSE_GLOBAL_VALUE_FLAGS: &[&str] = &[
    "-f",
    "--file",
    "-p",
    "--project-name",
    "--profile",
    "--env-file",
    "--project-directory",
];

/// A checked `docker compose` command: the files in effect, the subcommand,
/// its flags and the services it names.
#[derive(Debug)]
struct ComposeCmd {
    model: Model,
    sub: String,
    flags: BTreeSet<String>,
    services: Vec<String>,
}

// ------------------------------------------------------------------ stand-ins for TraderX's services

/// A simulator of sim/ playing a TraderX service.
struct StandIn {
    agent: Agent,
    role: &'static str,
    bus: &'static str,
    /// trade-service: the seq of the run in progress.
    run: Option<u64>,
}

impl StandIn {
    fn result(&self, seq: u64, timeout: Duration) -> Value {
        let ev = self.agent.expect(&format!("reply {seq}"), timeout, |e| {
            e["seq"] == json!(seq) && (e["ev"] == "ok" || e["ev"] == "error")
        });
        assert_eq!(ev["ev"], "ok", "{}: {ev}", self.agent.name);
        ev
    }

    fn call(&self, cmd: Value) -> Value {
        let seq = self.agent.send(cmd);
        self.result(seq, Duration::from_secs(30))
    }

    fn report(&self) -> Value {
        self.call(json!({"cmd": "report"}))["report"].clone()
    }
}

/// Where a participant is: the compose service's definition says NATS when
/// it is built from the NATS tree or configured with a NATS address.
fn bus_of(model: &Model, service: &str, nats_tree: &Path) -> &'static str {
    let s = &model.services[service];
    let from_nats_tree = s["build_context"]
        .as_str()
        .is_some_and(|c| Path::new(c).starts_with(nats_tree));
    let nats_env = model
        .environment(service)
        .keys()
        .any(|k| k.starts_with("NATS_"));
    if from_nats_tree || nats_env {
        "nats"
    } else {
        "legacy"
    }
}

// ------------------------------------------------------------------ the deployment

/// The values the test gives the runbook's placeholders.
fn placeholders(
    port: u16,
    admin_port: u16,
    nats: (u16, u16, u16),
    ingress: &str,
    nats_ws: &str,
    nats_tree: &Path,
) -> BTreeMap<String, String> {
    let bin = bridge_bin().parent().unwrap().display().to_string();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    [
        ("COMPOSE_PROJECT_NAME", "traderx".to_string()),
        ("TFB_DIR", root().display().to_string()),
        ("TRADERX_NATS_DIR", nats_tree.display().to_string()),
        ("PATH", path),
        ("BRIDGE_URL", format!("http://127.0.0.1:{port}")),
        ("TRADE_FEED_URL", format!("http://127.0.0.1:{port}")),
        ("BRIDGE_ADMIN", format!("http://127.0.0.1:{admin_port}")),
        ("NATS_URL", format!("nats://127.0.0.1:{}", nats.0)),
        ("NATS_MONITOR", format!("http://127.0.0.1:{}", nats.1)),
        ("INGRESS_URL", ingress.to_string()),
        ("NATS_WS_URL", nats_ws.to_string()),
        ("SMOKE_ACCOUNTS", "990001,990002,990003".to_string()),
        ("QUIET_FOR", QUIET_FOR.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    Server,
    Attach,
}

/// The local deployment the runbook is played on.
struct Deploy {
    pass: Pass,
    /// trade-feed's port (the hub's, then the bridge's in server mode).
    port: u16,
    admin_port: u16,
    nats: (u16, u16, u16),
    nginx: Nginx,
    broker: Option<Broker>,
    hub: Option<Proc>,
    /// The bridge serving as trade-feed (server mode).
    server_bridge: Option<Proc>,
    /// The attached bridge (service tradefeed-bridge).
    attach_bridge: Option<Proc>,
    logs: tempfile::TempDir,
    standins: BTreeMap<String, StandIn>,
    /// Stopped stand-ins' definitions (bus), for `docker compose start`.
    stopped: BTreeMap<String, &'static str>,
    /// Reports of the stand-ins that have stopped.
    reports: Vec<Value>,
    nats_tree: PathBuf,
    started: u32,
}

impl Deploy {
    fn new(pass: Pass, nats_tree: &Path) -> Deploy {
        let port = free_port();
        let admin_port = free_port();
        let nats = (free_port(), free_port(), free_port());
        let nginx = Nginx::shipped(&Upstreams {
            bridge: Some(port),
            admin: Some(admin_port),
            nats_ws: vec![nats.2],
        });
        Deploy {
            pass,
            port,
            admin_port,
            nats,
            nginx,
            broker: None,
            hub: None,
            server_bridge: None,
            attach_bridge: None,
            logs: scratch(),
            standins: BTreeMap::new(),
            stopped: BTreeMap::new(),
            reports: Vec::new(),
            nats_tree: nats_tree.to_path_buf(),
            started: 0,
        }
    }

    /// The runbook's placeholders, pointed at this deployment.
    fn placeholders(&self) -> BTreeMap<String, String> {
        placeholders(
            self.port,
            self.admin_port,
            self.nats,
            &self.nginx.url(),
            &self.nginx.nats_ws_url(),
            &self.nats_tree,
        )
    }

    fn legacy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats.0)
    }

    fn admin(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://127.0.0.1:{}{path}", self.admin_port))
    }

    /// State 005 before stage 0: trade-feed (the hub) with trade-service,
    /// trade-processor and a screen on it.
    fn start_state_005(&mut self) {
        self.start_hub();
        for (svc, bus) in [
            ("trade-processor", "legacy"),
            ("web-front-end-angular", "legacy"),
            ("trade-service", "legacy"),
        ] {
            self.start_standin(svc, bus);
        }
    }

    fn start_hub(&mut self) {
        let log = std::fs::File::create(self.logs.path().join(format!("hub-{}.log", self.started)))
            .unwrap();
        self.started += 1;
        let child = Command::new("node")
            .arg(root().join("tests/node/hub.js"))
            .args(["--port", &self.port.to_string(), "--quiet"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("node");
        assert!(
            wait_for_port(self.port, Duration::from_secs(15)),
            "the hub did not listen"
        );
        self.hub = Some(Proc {
            child,
            name: "trade-feed (hub)".into(),
            log: None,
        });
    }

    fn start_broker(&mut self) {
        if self.broker.is_none() {
            let (p, h, w) = self.nats;
            self.broker = Some(Broker::on_ports(p, h, w, ""));
        }
    }

    /// Starts the bridge with the environment its compose service gives it,
    /// only the addresses moved to this deployment's ports.
    fn start_bridge(&mut self, env: BTreeMap<String, String>, attach: bool) -> Proc {
        self.start_broker();
        let log_path = self
            .logs
            .path()
            .join(format!("bridge-{}.log", self.started));
        self.started += 1;
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(bridge_bin());
        cmd.current_dir(root())
            .args(["--config", "config/traderx.toml"])
            .env_remove("RUST_LOG");
        for (k, v) in &env {
            assert!(k.starts_with("TRADEFEED_BRIDGE_"), "{k}");
            cmd.env(k, v);
        }
        cmd.env(
            "TRADEFEED_BRIDGE_NATS__SERVERS",
            format!("[\"{}\"]", self.nats_url()),
        )
        .env(
            "TRADEFEED_BRIDGE_ADMIN__LISTEN",
            format!("127.0.0.1:{}", self.admin_port),
        )
        .env("TRADEFEED_BRIDGE_LOG__FORMAT", "text");
        if attach {
            assert_eq!(
                env["TRADEFEED_BRIDGE_ATTACH__URL"],
                "http://trade-feed:18086"
            );
            cmd.env("TRADEFEED_BRIDGE_ATTACH__URL", self.legacy_url());
        } else {
            assert_eq!(env["TRADEFEED_BRIDGE_SOCKETIO__LISTEN"], "0.0.0.0:18086");
            cmd.env(
                "TRADEFEED_BRIDGE_SOCKETIO__LISTEN",
                format!("127.0.0.1:{}", self.port),
            );
        }
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("bridge");
        let proc = Proc {
            child,
            name: "tradefeed-bridge".into(),
            log: Some(log_path),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.admin("/readyz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the bridge did not become ready:\n{}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        proc
    }

    fn sim(&self, role: &str, name: &str, extra: &[&str]) -> Agent {
        let mut cmd = Command::new("node");
        cmd.arg(root().join(format!("sim/{role}.js")))
            .args(["--legacy-url", &self.legacy_url()])
            .args(["--nats-url", &self.nats_url()])
            .args(extra);
        Agent::program(name, cmd)
    }

    /// Starts the stand-in of a TraderX service on `bus`.
    fn start_standin(&mut self, service: &str, bus: &'static str) {
        assert!(
            !self.standins.contains_key(service),
            "{service} already runs"
        );
        if bus == "nats" {
            assert!(
                self.broker.is_some(),
                "{service} on NATS before nats-broker runs"
            );
        } else {
            assert!(
                self.hub.is_some() || self.server_bridge.is_some(),
                "{service} on Socket.IO while nothing serves trade-feed's port"
            );
        }
        self.started += 1;
        let n = self.started.to_string();
        let (role, agent, run) = match service {
            "trade-service" => {
                let id = format!("S{n}");
                let a = self.sim(
                    "trade-service",
                    service,
                    &["--run-id", &id, "--seed", &n, "--bus", bus],
                );
                a.expect("ready", WAIT, |e| e["ev"] == "ready");
                let seq =
                    a.send(json!({"cmd": "run", "count": 100_000_000u64, "rate": ORDER_RATE}));
                ("trade-service", a, Some(seq))
            }
            "trade-processor" | "trade-processor-nats" => {
                let a = self.sim("trade-processor", service, &["--bus", bus]);
                a.expect("ready", WAIT, |e| e["ev"] == "ready");
                ("trade-processor", a, None)
            }
            "web-front-end-angular" => {
                // A browser: through the ingress, on either bus.
                let a = match bus {
                    "legacy" => {
                        let mut cmd = Command::new("node");
                        cmd.arg(root().join("sim/ui.js")).args([
                            "--legacy-url",
                            &self.nginx.url(),
                            "--accounts",
                            "22214,52355",
                            "--bus",
                            "legacy",
                        ]);
                        Agent::program(service, cmd)
                    }
                    _ => {
                        let mut cmd = Command::new("node");
                        cmd.arg(root().join("sim/ui.js")).args([
                            "--nats-url",
                            &self.nginx.nats_ws_url(),
                            "--accounts",
                            "22214,52355",
                            "--bus",
                            "nats",
                        ]);
                        Agent::program(service, cmd)
                    }
                };
                a.expect("ready", WAIT, |e| e["ev"] == "ready");
                ("ui", a, None)
            }
            other => panic!("no stand-in for service {other}"),
        };
        self.stopped.remove(service);
        self.standins.insert(
            service.to_string(),
            StandIn {
                agent,
                role,
                bus,
                run,
            },
        );
    }

    /// Stops a stand-in as its compose service stops (SIGTERM): the
    /// trade-service finishes the order it is sending; a legacy processor
    /// finishes booking what it holds and stops without unsubscribing, as
    /// TraderX's Java subscriber does; a NATS processor drains (what the
    /// runbook asks of its NATS build).
    fn stop_standin(&mut self, service: &str) {
        let Some(mut s) = self.standins.remove(service) else {
            return;
        };
        match (s.role, s.bus) {
            ("trade-service", _) => {
                s.call(json!({"cmd": "stop"}));
                let seq = s.run.take().unwrap();
                s.result(seq, Duration::from_secs(60));
                self.reports.push(s.report());
            }
            ("trade-processor", "legacy") => {
                // Busy with what it holds: booked count steady for a moment.
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut last = u64::MAX;
                loop {
                    let booked = s.report()["booked"].as_u64().unwrap();
                    if booked == last || Instant::now() > deadline {
                        break;
                    }
                    last = booked;
                    std::thread::sleep(Duration::from_millis(300));
                }
                self.reports.push(s.report());
                s.agent.kill();
            }
            ("trade-processor", _) => {
                s.call(json!({"cmd": "remove", "bus": "nats"}));
                self.reports.push(s.report());
            }
            _ => {}
        }
        self.stopped.insert(service.to_string(), s.bus);
    }

    /// trade-feed's port changes hands (the hub and the bridge): what is
    /// connected to it is cut. A browser reconnects by itself; TraderX's
    /// Java services would reconnect deaf, so the runbook stops them first.
    fn trade_feed_replaced(&mut self) {
        for svc in ["trade-service", "trade-processor"] {
            if let Some(s) = self.standins.get(svc) {
                assert!(
                    s.bus != "legacy",
                    "{svc} was running on Socket.IO when trade-feed was replaced: TraderX's Java \
                     services reconnect into empty rooms; the runbook must stop them first"
                );
            }
        }
        if self
            .standins
            .get("web-front-end-angular")
            .is_some_and(|s| s.bus == "legacy")
        {
            self.standins.remove("web-front-end-angular");
            self.start_standin("web-front-end-angular", "legacy");
        }
    }

    fn stop_hub(&mut self) {
        if let Some(mut h) = self.hub.take() {
            h.kill();
        }
    }

    /// Plays a checked `docker compose` command.
    fn play(&mut self, c: &ComposeCmd) {
        let m = &c.model;
        match c.sub.as_str() {
            "up" => {
                let mut targets: Vec<String> = if c.services.is_empty() {
                    m.services.keys().cloned().collect()
                } else {
                    c.services.clone()
                };
                // Dependencies first, as compose orders them.
                let rank = |s: &str| match s {
                    "nats-broker" => 0,
                    "trade-feed" | "tradefeed-bridge" => 1,
                    "ingress" => 2,
                    "trade-processor" | "trade-processor-nats" => 3,
                    "web-front-end-angular" => 4,
                    "trade-service" => 5,
                    _ => 6,
                };
                targets.sort_by_key(|s| rank(s));
                if c.flags.contains("--remove-orphans") {
                    self.remove_orphans(m);
                }
                for t in targets {
                    self.up(m, &t);
                }
            }
            "start" => {
                for s in &c.services {
                    if self.standins.contains_key(s) {
                        continue;
                    }
                    let bus = *self.stopped.get(s).unwrap_or_else(|| {
                        panic!("docker compose start {s}: there is no stopped {s} container")
                    });
                    self.start_standin(s, bus);
                }
            }
            "stop" => {
                for s in &c.services {
                    self.stop_service(s);
                }
            }
            "rm" => {
                assert!(
                    c.flags.contains("--stop") || c.flags.contains("-s"),
                    "rm without --stop"
                );
                for s in &c.services {
                    self.stop_service(s);
                    self.stopped.remove(s);
                }
            }
            "restart" => {
                for s in &c.services {
                    if let Some(bus) = self.standins.get(s).map(|x| x.bus) {
                        self.stop_standin(s);
                        self.start_standin(s, bus);
                    }
                }
            }
            // Building, showing and checking change nothing that runs.
            "build" | "config" | "run" | "ps" | "logs" | "ls" | "exec" => {}
            other => panic!("no play for docker compose {other}"),
        }
    }

    fn stop_service(&mut self, s: &str) {
        match s {
            "tradefeed-bridge" => self.attach_bridge = None,
            "nats-broker" => self.broker = None,
            "trade-feed" => {
                self.stop_hub();
                self.server_bridge = None;
            }
            "ingress" => {}
            _ => self.stop_standin(s),
        }
    }

    /// What runs but is no longer defined by the compose files goes.
    fn remove_orphans(&mut self, m: &Model) {
        if self.attach_bridge.is_some() && !m.has("tradefeed-bridge") {
            self.attach_bridge = None;
        }
        if (self.server_bridge.is_some() || self.hub.is_some()) && !m.has("trade-feed") {
            self.server_bridge = None;
            self.stop_hub();
        }
        let gone: Vec<String> = self
            .standins
            .keys()
            .filter(|s| !m.has(s))
            .cloned()
            .collect();
        for s in gone {
            self.stop_standin(&s);
            self.stopped.remove(&s);
        }
    }

    /// `docker compose up` of one service: started if it does not run,
    /// recreated if its definition changed.
    fn up(&mut self, m: &Model, service: &str) {
        match service {
            "nats-broker" => self.start_broker(),
            "ingress" => {}
            "trade-feed" => {
                if m.is_bridge("trade-feed") {
                    if self.server_bridge.is_none() {
                        assert!(
                            self.attach_bridge.is_none(),
                            "the bridge as trade-feed and the attached bridge would both publish port 18097: \
                             the attached one must go (--remove-orphans)"
                        );
                        self.stop_hub();
                        let env = m.environment("trade-feed");
                        self.server_bridge = Some(self.start_bridge(env, false));
                        self.trade_feed_replaced();
                    }
                } else if self.hub.is_none() {
                    self.server_bridge = None;
                    self.start_hub();
                    self.trade_feed_replaced();
                }
            }
            "tradefeed-bridge" if self.attach_bridge.is_none() => {
                assert!(self.server_bridge.is_none(), "two bridges on port 18097");
                let env = m.environment("tradefeed-bridge");
                self.attach_bridge = Some(self.start_bridge(env, true));
            }
            "tradefeed-bridge" => {}
            "trade-service"
            | "trade-processor"
            | "trade-processor-nats"
            | "web-front-end-angular" => {
                let bus = bus_of(m, service, &self.nats_tree);
                match self.standins.get(service).map(|s| s.bus) {
                    Some(b) if b == bus => {}
                    Some(_) => {
                        self.stop_standin(service);
                        self.start_standin(service, bus);
                    }
                    None => self.start_standin(service, bus),
                }
            }
            // TraderX's other services do not take part.
            _ => {}
        }
    }

    /// Stops every stand-in and checks that every order the stand-in
    /// trade-services placed was booked exactly once by the stand-in
    /// processors, and that none of the gates' orders reached them.
    fn finish(&mut self) -> String {
        for s in [
            "trade-service",
            "web-front-end-angular",
            "trade-processor",
            "trade-processor-nats",
        ] {
            self.stop_standin(s);
        }
        let mut sent = BTreeSet::new();
        let mut booked: BTreeMap<String, usize> = BTreeMap::new();
        let mut problems = Vec::new();
        for r in &self.reports {
            match r["role"].as_str() {
                Some("trade-service") => {
                    sent.extend(r["orders"].as_object().unwrap().keys().cloned());
                    if let Some(u) = r["unconsumed"].as_object().filter(|u| !u.is_empty()) {
                        problems.push(format!(
                            "{} orders found no consumer anywhere: {:?}",
                            u.len(),
                            u.keys().take(5).collect::<Vec<_>>()
                        ));
                    }
                }
                Some("trade-processor") => {
                    for (id, b) in r["orders"].as_object().unwrap() {
                        *booked.entry(id.clone()).or_default() += b.as_array().unwrap().len();
                    }
                    if r["ignored"].as_u64() != Some(0) {
                        problems.push(format!(
                            "a processor got {} envelopes that are not orders",
                            r["ignored"]
                        ));
                    }
                }
                _ => {}
            }
        }
        let lost: Vec<&String> = sent.iter().filter(|id| !booked.contains_key(*id)).collect();
        let doubled: Vec<_> = booked.iter().filter(|(_, n)| **n > 1).collect();
        let unknown: Vec<&String> = booked.keys().filter(|id| !sent.contains(*id)).collect();
        if !lost.is_empty() {
            problems.push(format!(
                "{} orders never booked: {:?}",
                lost.len(),
                &lost[..lost.len().min(10)]
            ));
        }
        if !doubled.is_empty() {
            problems.push(format!("orders booked more than once: {doubled:?}"));
        }
        if !unknown.is_empty() {
            problems.push(format!(
                "the stand-in processors booked orders no stand-in placed (a gate's?): {:?}",
                &unknown[..unknown.len().min(10)]
            ));
        }
        assert!(
            problems.is_empty(),
            "{:?} pass: {}",
            self.pass,
            problems.join("; ")
        );
        assert!(sent.len() > 100, "too few orders placed: {}", sent.len());
        format!(
            "{:?} pass: {} orders placed, each booked once",
            self.pass,
            sent.len()
        )
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for p in [&self.server_bridge, &self.attach_bridge]
            .into_iter()
            .flatten()
        {
            let text = p.log_text();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&lines[lines.len().saturating_sub(30)..].join("\n"));
            out.push('\n');
        }
        out
    }
}

// ------------------------------------------------------------------ the walk

/// The shell the operator types into: variables and working folder.
#[derive(Clone)]
struct Shell {
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    /// Values the test gives the runbook's placeholders.
    placeholders: BTreeMap<String, String>,
    /// The runbook's own name for TraderX's compose folder (its first `cd`).
    traderx_path: Option<String>,
    traderx: PathBuf,
    compose_vars: BTreeSet<String>,
}

impl Shell {
    fn new(placeholders: BTreeMap<String, String>, traderx: &Path) -> Shell {
        let mut env = base_env();
        for (k, v) in &placeholders {
            env.insert(k.clone(), v.clone());
        }
        Shell {
            env,
            cwd: root(),
            placeholders,
            traderx_path: None,
            traderx: traderx.to_path_buf(),
            compose_vars: compose_variables(),
        }
    }

    /// Applies `export`, `unset` or `cd`.
    fn declare(&mut self, cmd: &str) {
        let mut it = cmd.split_whitespace();
        match it.next().unwrap() {
            "unset" => {
                for n in it {
                    assert!(
                        n == "COMPOSE_FILE" || self.compose_vars.contains(n),
                        "unset {n}: not a compose variable"
                    );
                    self.env.remove(n);
                }
            }
            "cd" => {
                let dir = cmd[2..].trim();
                let expanded = words(dir, &self.env, &self.cwd).join(" ");
                if Path::new(&expanded).is_dir() {
                    self.cwd = PathBuf::from(expanded);
                    return;
                }
                match &self.traderx_path {
                    None => self.traderx_path = Some(expanded.clone()),
                    Some(p) => assert_eq!(p, &expanded, "cd {dir}: an unknown folder"),
                }
                self.cwd = self.traderx.clone();
            }
            "export" => {
                let re_names: Vec<&str> = cmd[6..]
                    .split_whitespace()
                    .filter_map(|w| w.split_once('=').map(|(n, _)| n))
                    .collect();
                assert!(!re_names.is_empty(), "`{cmd}` exports nothing");
                for name in re_names {
                    if let Some(value) = self.placeholders.get(name) {
                        // The test's value stands; the runbook's must look alike.
                        let theirs = self.eval_export(cmd, name);
                        let scheme = |v: &str| {
                            v.split("://")
                                .next()
                                .map(str::to_string)
                                .filter(|_| v.contains("://"))
                        };
                        assert_eq!(
                            scheme(&theirs),
                            scheme(value),
                            "export {name}: {theirs} is not like {value}"
                        );
                        if name == "PATH" {
                            assert!(theirs.contains("/target/release:"), "{theirs}");
                        }
                    } else if name == "COMPOSE_FILE" || self.compose_vars.contains(name) {
                        let v = self.eval_export(cmd, name);
                        self.env.insert(name.to_string(), v);
                    } else {
                        panic!("export {name}: neither a placeholder the test sets nor a variable of compose/");
                    }
                }
            }
            _ => unreachable!(),
        }
    }

    fn eval_export(&self, cmd: &str, name: &str) -> String {
        let (code, out) = bash(
            &format!("{cmd}\nprintf '%s' \"${name}\""),
            &self.env,
            &self.cwd,
            Duration::from_secs(5),
        );
        assert_eq!(code, 0, "{cmd}: {out}");
        out
    }

    /// The compose files in effect: COMPOSE_FILE, or `-f`, or the folder's
    /// docker-compose.yml.
    fn compose_files(&self, dash_f: &[String]) -> Vec<PathBuf> {
        let list: Vec<String> = if !dash_f.is_empty() {
            dash_f.to_vec()
        } else if let Some(cf) = self.env.get("COMPOSE_FILE") {
            cf.split(':').map(str::to_string).collect()
        } else {
            vec!["docker-compose.yml".to_string()]
        };
        list.iter()
            .map(|f| {
                let p = Path::new(f);
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    self.cwd.join(p)
                }
            })
            .collect()
    }

    /// Checks a `docker compose` command against compose's flags and the
    /// files in effect.
    fn check_compose(&self, cmd: &str) -> ComposeCmd {
        self.check_variables(cmd);
        let w = words(cmd, &self.env, &self.cwd);
        assert_eq!(&w[..2], ["docker", "compose"]);
        let mut i = 2;
        let mut dash_f = Vec::new();
        while i < w.len() && w[i].starts_with('-') {
            assert!(
                COMPOSE_GLOBAL_VALUE_FLAGS.contains(&w[i].as_str()),
                "`{cmd}`: docker compose has no global flag {}",
                w[i]
            );
            if w[i] == "-f" || w[i] == "--file" {
                dash_f.push(w[i + 1].clone());
            }
            i += 2;
        }
        let sub = w
            .get(i)
            .unwrap_or_else(|| panic!("`{cmd}`: no subcommand"))
            .clone();
        let (plain, valued, positional) = compose_subcommand(&sub).unwrap_or_else(|| {
            panic!("`{cmd}`: docker compose {sub} is not a subcommand the test knows")
        });
        i += 1;
        let mut flags = BTreeSet::new();
        let mut rest = Vec::new();
        while i < w.len() {
            let a = &w[i];
            if a.starts_with('-')
                && (rest.is_empty() || positional != Positional::ServiceThenCommand)
            {
                let (flag, inline) = a
                    .split_once('=')
                    .map_or((a.as_str(), false), |(f, _)| (f, true));
                if plain.contains(&flag) {
                    flags.insert(flag.to_string());
                } else if valued.contains(&flag) {
                    flags.insert(flag.to_string());
                    if !inline {
                        i += 1;
                    }
                } else {
                    panic!("`{cmd}`: docker compose {sub} has no flag {a}");
                }
            } else {
                rest.push(a.clone());
            }
            i += 1;
        }
        let services = match positional {
            Positional::Services => rest,
            Positional::ServiceThenCommand => rest.into_iter().take(1).collect(),
            Positional::Nothing => {
                assert!(rest.is_empty(), "`{cmd}`: {rest:?}");
                vec![]
            }
        };
        let files = self.compose_files(&dash_f);
        let model = Model::load(&files, &self.env);
        assert!(
            model.errors.is_empty(),
            "`{cmd}` with {files:?}: {:?}",
            model.errors
        );
        for s in &services {
            assert!(model.has(s), "`{cmd}`: no service {s} in {files:?}");
        }
        // Our files' build contexts and mounts exist.
        for (name, s) in &model.services {
            let ours = s["files"].as_array().unwrap().iter().any(|f| {
                f.as_str()
                    .unwrap()
                    .starts_with(&root().display().to_string())
            });
            if !ours {
                continue;
            }
            if let Some(c) = s["build_context"].as_str() {
                assert!(
                    Path::new(c).is_dir(),
                    "{name}: build context {c} does not exist"
                );
            }
            for m in s["mounts"].as_array().unwrap() {
                let src = m[1].as_str().unwrap();
                assert!(
                    Path::new(src).exists(),
                    "{name}: mount {src} does not exist"
                );
            }
        }
        ComposeCmd {
            model,
            sub,
            flags,
            services,
        }
    }

    /// Every `$NAME` a command uses (outside single quotes, where the shell
    /// leaves `$` alone) is set.
    fn check_variables(&self, cmd: &str) {
        let unquoted: String = cmd.split('\'').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = unquoted.as_str();
        while let Some(at) = rest.find('$') {
            let tail = &rest[at + 1..];
            let tail = tail.strip_prefix('{').unwrap_or(tail);
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !name.chars().next().unwrap().is_ascii_digit() {
                assert!(
                    self.env.contains_key(&name),
                    "`{cmd}` uses ${name}, which is not set here"
                );
            }
            rest = &rest[at + 1..];
        }
    }

    fn check_cargo(&self, cmd: &str) {
        let w = words(cmd, &self.env, &self.cwd);
        assert_eq!(w[1], "build", "`{cmd}`");
        let mut i = 2;
        while i < w.len() {
            match w[i].as_str() {
                "--release" | "--locked" => {}
                "--manifest-path" => {
                    i += 1;
                    let m = Path::new(&w[i]);
                    assert!(m.is_file() && m.starts_with(root()), "`{cmd}`: {}", w[i]);
                }
                other => panic!("`{cmd}`: cargo build flag {other} is not one the test knows"),
            }
            i += 1;
        }
    }

    /// kubectl: namespace, a known subcommand with its flags, resources named
    /// after TraderX's compose services.
    fn check_kubectl(&self, cmd: &str, known: &BTreeSet<String>) {
        let w = words(cmd, &self.env, &self.cwd);
        let mut i = 1;
        if w[i] == "-n" || w[i] == "--namespace" {
            i += 2;
        }
        let sub = w[i].as_str();
        let (flags, words_after): (&[&str], usize) = match sub {
            "port-forward" => (&[], 1),
            "scale" => (&["--replicas"], 1),
            "rollout" => {
                assert_eq!(w[i + 1], "status", "`{cmd}`");
                i += 1;
                (&["--timeout"], 1)
            }
            other => panic!("`{cmd}`: kubectl {other} is not one the test knows"),
        };
        let mut resources = 0;
        for a in &w[i + 1..] {
            if a.starts_with("--") {
                let f = a.split('=').next().unwrap();
                assert!(
                    flags.contains(&f) && a.contains('='),
                    "`{cmd}`: kubectl {sub} flag {a}"
                );
            } else if let Some((kind, name)) = a.split_once('/') {
                assert!(["svc", "deploy"].contains(&kind), "`{cmd}`: {kind}");
                assert!(
                    known.contains(name),
                    "`{cmd}`: {name} is not a TraderX service"
                );
                resources += 1;
            } else {
                let ok = a.split(':').all(|p| p.parse::<u16>().is_ok());
                assert!(ok && sub == "port-forward", "`{cmd}`: {a}");
            }
        }
        assert_eq!(resources, words_after, "`{cmd}`");
    }
}

/// Every service a Kubernetes command may name: TraderX's (the state-005
/// fixture) and the compose files'.
fn known_services(shell: &Shell) -> BTreeSet<String> {
    let mut files = vec![root().join("tests/fixtures/prune/state-005/docker-compose.yml")];
    files.push(root().join("compose/docker-compose.bridge.yml"));
    files.push(root().join("compose/docker-compose.bridge-attach.yml"));
    for e in std::fs::read_dir(root().join("compose/stages")).unwrap() {
        files.push(e.unwrap().path());
    }
    let mut env = shell.env.clone();
    env.insert("TFB_DIR".into(), root().display().to_string());
    let mut out = BTreeSet::new();
    for f in files {
        out.extend(Model::load(&[f], &env).services.into_keys());
    }
    out
}

/// Plays the runbook in one mode. `deploy` is None for a dry walk: commands
/// are classified and checked, nothing runs.
struct Walk<'a> {
    pass: Pass,
    shell: Shell,
    deploy: Option<&'a mut Deploy>,
    ran: usize,
    checked: usize,
    transcript: Vec<String>,
}

impl Walk<'_> {
    fn in_scope(&self, b: &Block) -> bool {
        self.in_scope_mode(b.mode)
    }

    fn in_scope_mode(&self, mode: Mode) -> bool {
        matches!(
            (mode, self.pass),
            (Mode::Both, _) | (Mode::Server, Pass::Server) | (Mode::Attach, Pass::Attach)
        )
    }

    /// Runs or checks one block's commands. `sandbox`: only checked, the
    /// shell's state restored afterwards.
    fn block(&mut self, b: &Block, sandbox: bool) {
        let saved = sandbox.then(|| self.shell.clone());
        for c in &b.commands {
            let kind = classify(&c.text).unwrap_or_else(|e| panic!("{RUNBOOK}:{}: {e}", c.line));
            let at = format!("{RUNBOOK}:{} ({:?} pass)", c.line, self.pass);
            match kind {
                Kind::Declare => self.shell.declare(&c.text),
                Kind::Cargo => {
                    assert_eq!(b.role, Role::Setup, "{at}: cargo outside the preparation");
                    self.shell.check_cargo(&c.text);
                    self.checked += 1;
                }
                Kind::Kubectl => {
                    assert_eq!(
                        b.role,
                        Role::Kubernetes,
                        "{at}: kubectl outside the Kubernetes note"
                    );
                    let known = known_services(&self.shell);
                    self.shell.check_kubectl(&c.text, &known);
                    self.checked += 1;
                }
                Kind::Compose => {
                    assert_ne!(
                        b.role,
                        Role::Kubernetes,
                        "{at}: docker compose in the Kubernetes note"
                    );
                    let cc = self.shell.check_compose(&c.text);
                    self.checked += 1;
                    if !sandbox {
                        if let Some(d) = self.deploy.as_deref_mut() {
                            d.play(&cc);
                        }
                    }
                }
                Kind::Run => {
                    assert!(
                        !sandbox,
                        "{at}: `{}` can only be run, but this block is only checked (a roll-back of \
                         stage 0, 4 or 5, or the Kubernetes note): the test would leave it untried",
                        c.text
                    );
                    self.shell.check_variables(&c.text);
                    if self.deploy.is_some() {
                        self.run(b, c, &at);
                    }
                }
            }
        }
        if let Some(s) = saved {
            self.shell = s;
        }
    }

    fn run(&mut self, b: &Block, c: &Cmd, at: &str) {
        let retry_until = Instant::now()
            + if b.role == Role::Watch {
                WATCH_CONVERGE
            } else {
                Duration::ZERO
            };
        loop {
            let t0 = Instant::now();
            let (code, out) = bash(
                &c.text,
                &self.shell.env,
                &self.shell.cwd,
                Duration::from_secs(120),
            );
            if code == 0 {
                self.ran += 1;
                let first = out
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                self.transcript.push(format!(
                    "{:?} {:>5.1}s  {}  -> {}",
                    self.pass,
                    t0.elapsed().as_secs_f64(),
                    c.text.chars().take(90).collect::<String>(),
                    first.chars().take(80).collect::<String>()
                ));
                return;
            }
            if Instant::now() >= retry_until {
                let logs = self.deploy.as_deref().map(|d| d.logs()).unwrap_or_default();
                panic!(
                    "{at}: `{}` exited {code}:\n{out}\n--- bridge log (tail)\n{logs}",
                    c.text
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Before stage 5: the legacy side has been quiet for the window and the
    /// bridge up for as long (what the stage's preconditions say; the
    /// rehearsal's window is a few seconds).
    fn wait_quiet(&self) {
        let Some(d) = self.deploy.as_deref() else {
            return;
        };
        let admin = format!("http://127.0.0.1:{}", d.admin_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, out, _) = bridge_cli(
                &[
                    "decommission-check",
                    "--admin-url",
                    &admin,
                    "--quiet-for",
                    QUIET_FOR,
                ],
                &[],
            );
            if code == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the legacy side did not go quiet:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Every series the runbook names (its tables and prose included, not
    /// only its commands) is one the running bridge exports.
    fn check_series(&self) {
        let Some(d) = self.deploy.as_deref() else {
            return;
        };
        let (code, metrics) = d.admin("/metrics");
        assert_eq!(code, 200, "/metrics");
        let exported: BTreeSet<&str> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let named = runbook_series();
        assert!(named.len() >= 10, "{named:?}");
        let missing: Vec<&String> = named
            .iter()
            .filter(|(_, m)| self.in_scope_mode(**m))
            .map(|(n, _)| n)
            .filter(|n| !exported.contains(n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{RUNBOOK} names {missing:?}, which the bridge ({:?} pass) does not export",
            self.pass
        );
    }

    fn walk(&mut self, blocks: &[Block]) {
        let every: Vec<&Block> = blocks
            .iter()
            .filter(|b| b.role == Role::EveryStage)
            .collect();
        // Setup and the preparation, in order; then TraderX as it runs today.
        let setup: Vec<&Block> = blocks
            .iter()
            .filter(|b| b.role == Role::Setup && self.in_scope(b))
            .collect();
        for b in setup {
            self.block(b, false);
        }
        assert_eq!(
            self.shell.cwd, self.shell.traderx,
            "the runbook starts in TraderX's compose folder"
        );
        if let Some(d) = self.deploy.as_deref_mut() {
            d.start_state_005();
        }
        let stages: BTreeSet<u32> = blocks.iter().filter_map(|b| b.stage).collect();
        assert_eq!(stages, (0..=5).collect(), "stages 0 to 5");
        for stage in stages {
            let here: Vec<&Block> = blocks
                .iter()
                .filter(|b| b.stage == Some(stage) && self.in_scope(b))
                .collect();
            if stage == 5 {
                self.wait_quiet();
            }
            for b in here.iter().filter(|b| b.role != Role::Rollback) {
                self.block(b, false);
            }
            if stage == 0 {
                self.check_series();
            }
            if stage < 5 {
                for b in &every {
                    self.block(b, false);
                }
            }
            let rollbacks: Vec<&&Block> =
                here.iter().filter(|b| b.role == Role::Rollback).collect();
            if (1..=3).contains(&stage) {
                // Rehearsed: back, then forward again.
                for b in &rollbacks {
                    self.block(b, false);
                }
                for b in here.iter().filter(|b| b.role == Role::Steps) {
                    self.block(b, false);
                }
                for b in here.iter().filter(|b| b.role == Role::Watch) {
                    self.block(b, false);
                }
            } else {
                for b in &rollbacks {
                    self.block(b, true);
                }
            }
        }
        for b in blocks.iter().filter(|b| b.role == Role::Kubernetes) {
            self.block(b, true);
        }
    }
}

fn trees() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = scratch();
    let traderx = dir.path().join("traderX");
    let nats = dir.path().join("traderX-006");
    copy_tree(&root().join("tests/fixtures/prune/state-005"), &traderx);
    copy_tree(&root().join("tests/fixtures/prune/state-006"), &nats);
    (dir, traderx, nats)
}

fn rehearse(pass: Pass) {
    let blocks = runbook();
    let (_dir, traderx, nats) = trees();
    let mut deploy = Deploy::new(pass, &nats);
    let placeholders = deploy.placeholders();
    let t0 = Instant::now();
    let mut walk = Walk {
        pass,
        shell: Shell::new(placeholders, &traderx),
        deploy: Some(&mut deploy),
        ran: 0,
        checked: 0,
        transcript: Vec::new(),
    };
    walk.walk(&blocks);
    let (ran, checked, transcript) = (walk.ran, walk.checked, walk.transcript.join("\n"));
    let summary = deploy.finish();
    println!("{transcript}");
    println!(
        "{summary}; {ran} commands run, {checked} checked, in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(ran >= 20, "{ran} commands run");
}

// ------------------------------------------------------------------ the tests

/// Every block is parsed, every command classified and checked in both
/// modes without running anything: quick to fail on a command the test
/// cannot handle, a service or file that does not exist, a flag compose does
/// not have.
#[test]
fn every_runbook_command_is_run_or_checked() {
    let blocks = runbook();
    assert!(blocks.len() > 30, "{} blocks", blocks.len());
    for b in &blocks {
        assert!(
            !b.commands.is_empty(),
            "{RUNBOOK}:{}: an empty block",
            b.line
        );
        for c in &b.commands {
            if let Err(e) = classify(&c.text) {
                panic!("{RUNBOOK}:{}: {e}", c.line);
            }
        }
    }
    for pass in [Pass::Server, Pass::Attach] {
        let (_dir, traderx, nats) = trees();
        let placeholders = placeholders(
            1,
            2,
            (3, 4, 5),
            "http://127.0.0.1:6",
            "ws://127.0.0.1:6/nats-ws",
            &nats,
        );
        let mut walk = Walk {
            pass,
            shell: Shell::new(placeholders, &traderx),
            deploy: None,
            ran: 0,
            checked: 0,
            transcript: Vec::new(),
        };
        walk.walk(&blocks);
        assert!(walk.checked >= 30, "{pass:?}: {} checked", walk.checked);
    }
    // Both modes have their own stage 0, and each mode's blocks exist.
    for mode in [Mode::Server, Mode::Attach] {
        assert!(blocks
            .iter()
            .any(|b| b.stage == Some(0) && b.mode == mode && b.role == Role::Gate));
    }
}

/// The test refuses what it cannot run or check, and a roll-back that
/// could only be run.
#[test]
fn the_test_refuses_commands_it_cannot_try() {
    assert!(classify("rm -rf /srv/traderX/trade-feed").is_err());
    assert!(classify("docker run --rm tradefeed-bridge:0.1.0").is_err());
    assert_eq!(classify("docker compose up -d"), Ok(Kind::Compose));
    let text =
        "## Stage 0: x\n\n**Roll back**: y\n\n```sh\ncurl -fsS \"$BRIDGE_ADMIN/readyz\"\n```\n";
    let blocks = parse(text);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].role, Role::Rollback);
    let (_dir, traderx, _nats) = trees();
    let mut walk = Walk {
        pass: Pass::Server,
        shell: Shell::new(BTreeMap::new(), &traderx),
        deploy: None,
        ran: 0,
        checked: 0,
        transcript: Vec::new(),
    };
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        walk.block(&blocks[0], true)
    }));
    assert!(
        err.is_err(),
        "a run-only command in a checked-only block must fail"
    );
    let untagged = std::panic::catch_unwind(|| parse("## Stage 1: x\n\n```\nls\n```\n"));
    assert!(
        untagged.is_err(),
        "a code block without a language must fail"
    );
}

/// The runbook is linked where operators look.
#[test]
fn runbook_is_linked_from_the_readmes() {
    let index = std::fs::read_to_string(root().join("docs/migration/README.md")).unwrap();
    assert!(index.contains("(runbook.md)"), "docs/migration/README.md");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("docs/migration/runbook.md"), "README.md");
}

/// The whole cutover in server mode, played on a local deployment while the
/// stand-in trade-service places orders: each order booked once.
#[test]
fn runbook_rehearsal_server_mode() {
    rehearse(Pass::Server);
}

/// The same in attach mode, trade-feed (the hub) untouched until stage 4.
#[test]
fn runbook_rehearsal_attach_mode() {
    rehearse(Pass::Attach);
}
