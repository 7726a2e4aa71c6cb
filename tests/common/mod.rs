//! Test harness: real processes on free loopback ports.
//!
//! Every server a test starts (nats-server, the bridge, the legacy Node hub)
//! and every client agent is a child process that is stopped when its handle
//! drops, so a failing test leaves nothing running.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod broker;
pub mod browser;
pub mod http;
pub mod nginx;
pub mod throttle;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port nobody listens on, for a server a test is about to start.
///
/// Between this call and the server binding the port, nothing else may take
/// it. So ports come from below the kernel's ephemeral range (from which
/// every outgoing connection, and `bind(0)`, takes its local port), and each
/// is handed out once per test process, so tests running side by side never
/// get the same one. The walk starts at an offset from the process id, so
/// that two test processes running at once rarely meet.
pub fn free_port() -> u16 {
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    const LOW: u64 = 10_000;
    let high = ephemeral_low().clamp(LOW + 1_000, 65_536);
    let span = high - LOW;
    let next = NEXT.get_or_init(|| AtomicU64::new(u64::from(std::process::id()) * 7_919 % span));
    for _ in 0..span {
        let port = (LOW + next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{high}");
}

/// The first port of the kernel's ephemeral range (32768 if unknown).
fn ephemeral_low() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A directory removed at the end of the test, for logs and configs.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tfb-test-")
        .tempdir()
        .expect("tempdir")
}

/// A child process killed on drop (SIGTERM first, then SIGKILL).
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGTERM and wait up to `timeout`; returns the exit status if it exited.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            for _ in 0..50 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> (PathBuf, std::fs::File) {
    let path = dir.join(format!("{name}.log"));
    let f = std::fs::File::create(&path).expect("log file");
    (path, f)
}

// ------------------------------------------------------------------ nats-server

/// `$NATS_SERVER_BIN`, else the server scripts/install-system-deps.sh built
/// into .tools/bin, else `nats-server` from PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let local = root().join(".tools/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

pub struct Nats {
    pub port: u16,
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Nats {
    pub fn start() -> Nats {
        Nats::start_with(&[])
    }

    /// Extra nats-server arguments, e.g. `["--max_payload", "1MB"]` is not a
    /// flag; use a config file through `-c` for such settings.
    pub fn start_with(extra: &[&str]) -> Nats {
        let port = free_port();
        let dir = scratch();
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let proc = Self::spawn(port, dir.path(), &args);
        Nats {
            port,
            proc,
            dir,
            args,
        }
    }

    fn spawn(port: u16, dir: &Path, extra: &[String]) -> Proc {
        let (path, log) = log_file(dir, &format!("nats-{port}"));
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nats-server must be installed (see scripts/install-test-deps.sh)");
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "nats-server did not listen on {port}"
        );
        Proc {
            child,
            name: "nats-server".into(),
            log: Some(path),
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL) and starts it again on the same port.
    pub fn restart_after(&mut self, down: Duration) {
        self.proc.kill();
        thread::sleep(down);
        self.proc = Self::spawn(self.port, self.dir.path(), &self.args);
    }

    pub fn stop(&mut self) {
        self.proc.kill();
    }

    pub fn start_again(&mut self) {
        self.proc = Self::spawn(self.port, self.dir.path(), &self.args);
    }
}

// ------------------------------------------------------------------ the bridge

pub fn bridge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tradefeed-bridge"))
}

/// Runs the bridge binary to completion (e.g. `check-config`), with `env`
/// added and `RUST_LOG` removed: (exit code, stdout, stderr).
pub fn bridge_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bridge_bin());
    cmd.args(args).env_remove("RUST_LOG").stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("bridge binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub struct Bridge {
    pub port: u16,
    pub admin_port: u16,
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    config: PathBuf,
    env: Vec<(String, String)>,
}

pub struct BridgeOpts<'a> {
    pub config: PathBuf,
    pub env: Vec<(&'a str, String)>,
    pub wait_ready: bool,
    pub port: Option<u16>,
}

impl Default for BridgeOpts<'_> {
    fn default() -> Self {
        BridgeOpts {
            config: root().join("config/traderx.toml"),
            env: vec![],
            wait_ready: true,
            port: None,
        }
    }
}

impl Bridge {
    /// The TraderX configuration against `nats`, on free ports.
    pub fn start(nats: &Nats) -> Bridge {
        Bridge::start_opts(nats, BridgeOpts::default())
    }

    pub fn start_opts(nats: &Nats, opts: BridgeOpts<'_>) -> Bridge {
        Bridge::start_url(&nats.url(), opts)
    }

    /// As [`Bridge::start_opts`], against any NATS URL (or URLs, as a JSON
    /// list in `TRADEFEED_BRIDGE_NATS__SERVERS` among `opts.env`).
    pub fn start_url(nats_url: &str, opts: BridgeOpts<'_>) -> Bridge {
        let port = opts.port.unwrap_or_else(free_port);
        let admin_port = free_port();
        let dir = scratch();
        let mut env: Vec<(String, String)> = vec![
            (
                "TRADEFEED_BRIDGE_NATS__SERVERS".into(),
                format!("[\"{nats_url}\"]"),
            ),
            (
                "TRADEFEED_BRIDGE_SOCKETIO__LISTEN".into(),
                format!("127.0.0.1:{port}"),
            ),
            (
                "TRADEFEED_BRIDGE_ADMIN__LISTEN".into(),
                format!("127.0.0.1:{admin_port}"),
            ),
            ("TRADEFEED_BRIDGE_LOG__LEVEL".into(), "info".into()),
        ];
        for (k, v) in opts.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v));
        }
        let proc = Self::spawn(&opts.config, &env, dir.path(), port);
        let b = Bridge {
            port,
            admin_port,
            proc,
            dir,
            config: opts.config,
            env,
        };
        if opts.wait_ready {
            b.wait_ready(Duration::from_secs(15));
        }
        b
    }

    fn spawn(config: &Path, env: &[(String, String)], dir: &Path, port: u16) -> Proc {
        let (path, log) = {
            // append so restarts keep earlier output
            let path = dir.join(format!("bridge-{port}.log"));
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            (path, f)
        };
        let mut cmd = Command::new(bridge_bin());
        cmd.arg("--config").arg(config);
        cmd.env_remove("RUST_LOG"); // unless the test sets it
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("bridge binary");
        Proc {
            child,
            name: "tradefeed-bridge".into(),
            log: Some(path),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn admin(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://127.0.0.1:{}{}", self.admin_port, path))
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.admin("/readyz").0 == 200 {
                return;
            }
            thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "bridge not ready after {timeout:?}; log:\n{}",
            self.proc.log_text()
        );
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// Starts the same bridge again on the same ports (after a stop or a kill).
    pub fn start_again(&mut self) {
        self.proc = Self::spawn(&self.config, &self.env, self.dir.path(), self.port);
    }

    /// A metric's value, summed over the series whose labels include `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, text) = self.admin("/metrics");
        metric_value(&text, name, labels)
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some(end) = r.find('}') else { continue };
            (&r[..end], r[end + 1..].trim())
        } else if rest.starts_with(' ') {
            ("", rest.trim())
        } else {
            continue;
        };
        let ok = labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")));
        if ok {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// Plain HTTP GET: (status, body); status 0 when nothing answers.
pub fn http_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    match agent.get(url).call() {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            (status, body)
        }
        Err(_) => (0, String::new()),
    }
}

// ------------------------------------------------------------------ legacy hub

/// The legacy Node trade-feed written from PROTOCOL.md section 2.
pub struct Hub {
    pub port: u16,
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Hub {
    pub fn start() -> Hub {
        Hub::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Hub {
        let port = free_port();
        let dir = scratch();
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let proc = Self::spawn(port, dir.path(), &args);
        Hub {
            port,
            proc,
            dir,
            args,
        }
    }

    fn spawn(port: u16, dir: &Path, args: &[String]) -> Proc {
        let (path, log) = log_file(dir, &format!("hub-{port}-{}", unique()));
        let child = Command::new("node")
            .arg(root().join("tests/node/hub.js"))
            .args(["--port", &port.to_string()])
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("node");
        assert!(
            wait_for_port(port, Duration::from_secs(15)),
            "hub did not listen on {port}"
        );
        Proc {
            child,
            name: "hub".into(),
            log: Some(path),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        self.proc.kill();
    }

    pub fn start_again(&mut self) {
        self.proc = Self::spawn(self.port, self.dir.path(), &self.args);
    }
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

// ------------------------------------------------------------------ agents

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Node,
    Python,
    Java,
    /// io.socket 1.0.x, Engine.IO 3.
    Java1,
}

fn agent_command(kind: &str, lang: Lang) -> Command {
    let root = root();
    match (kind, lang) {
        ("sio", Lang::Node) => {
            let mut c = Command::new("node");
            c.arg(root.join("tests/node/sio-agent.js"));
            c
        }
        ("nats", Lang::Node) => {
            let mut c = Command::new("node");
            c.arg(root.join("tests/node/nats-agent.js"));
            c
        }
        ("sio", Lang::Python) => {
            let mut c = Command::new(root.join("tests/.venv/bin/python"));
            c.arg(root.join("tests/python/sio_agent.py"));
            c
        }
        ("nats", Lang::Python) => {
            let mut c = Command::new(root.join("tests/.venv/bin/python"));
            c.arg(root.join("tests/python/nats_agent.py"));
            c
        }
        ("sio", Lang::Java) => java(&root.join("tests/java/sio-agent-v2/target/sio-agent-v2.jar")),
        ("sio", Lang::Java1) => java(&root.join("tests/java/sio-agent-v1/target/sio-agent-v1.jar")),
        ("nats", Lang::Java) => java(&root.join("tests/java/nats-agent/target/nats-agent.jar")),
        _ => panic!("no {kind} agent for {lang:?}"),
    }
}

fn java(jar: &Path) -> Command {
    let mut c = Command::new("java");
    c.args([
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Xss512k",
        "-jar",
    ])
    .arg(jar);
    c
}

/// A client process speaking the JSON-lines protocol of tests/agents/README.md.
pub struct Agent {
    pub name: String,
    proc: Proc,
    stdin: Mutex<ChildStdin>,
    events: Receiver<Value>,
    /// Events read but not yet consumed by `expect`.
    backlog: Mutex<Vec<Value>>,
    /// Every event ever received, for after-the-fact assertions.
    pub seen: Arc<Mutex<Vec<Value>>>,
    seq: AtomicU64,
}

impl Agent {
    pub fn sio(lang: Lang) -> Agent {
        Agent::spawn(&format!("sio-{lang:?}"), agent_command("sio", lang))
    }

    pub fn nats(lang: Lang) -> Agent {
        Agent::spawn(&format!("nats-{lang:?}"), agent_command("nats", lang))
    }

    /// Any program that speaks the agent protocol (e.g. the simulators of sim/).
    pub fn program(name: &str, cmd: Command) -> Agent {
        Agent::spawn(name, cmd)
    }

    fn spawn(name: &str, mut cmd: Command) -> Agent {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start agent {name}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let tname = name.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        seen2.lock().unwrap().push(v.clone());
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("[{tname}] {line}"),
                }
            }
        });
        Agent {
            name: name.to_string(),
            proc: Proc {
                child,
                name: name.to_string(),
                log: None,
            },
            stdin: Mutex::new(stdin),
            events: rx,
            backlog: Mutex::new(Vec::new()),
            seen,
            seq: AtomicU64::new(1),
        }
    }

    /// Sends a command without waiting; returns its seq.
    pub fn send(&self, mut cmd: Value) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        cmd["seq"] = json!(seq);
        let mut stdin = self.stdin.lock().unwrap();
        writeln!(stdin, "{cmd}").expect("agent stdin");
        stdin.flush().unwrap();
        seq
    }

    /// Sends a command and waits for its `ok` (panics on `error`).
    pub fn cmd(&self, cmd: Value) -> u64 {
        let seq = self.send(cmd.clone());
        let ev = self.expect(&format!("ok for {cmd}"), Duration::from_secs(30), |e| {
            e["seq"] == json!(seq) && (e["ev"] == "ok" || e["ev"] == "error")
        });
        assert_eq!(ev["ev"], "ok", "{} failed {cmd}: {ev}", self.name);
        seq
    }

    /// Waits for the first event (not yet consumed) that satisfies `pred`.
    pub fn expect(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        match self.try_expect(timeout, pred) {
            Some(v) => v,
            None => panic!(
                "{}: no {what} within {timeout:?}; seen: {:#?}",
                self.name,
                self.seen
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
            ),
        }
    }

    pub fn try_expect(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        {
            let mut backlog = self.backlog.lock().unwrap();
            if let Some(i) = backlog.iter().position(&pred) {
                return Some(backlog.remove(i));
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    if pred(&v) {
                        return Some(v);
                    }
                    self.backlog.lock().unwrap().push(v);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Moves everything received so far into the backlog (non-blocking).
    fn pump(&self) {
        while let Ok(v) = self.events.try_recv() {
            self.backlog.lock().unwrap().push(v);
        }
    }

    /// Waits `quiet` and returns (and consumes) every unconsumed event matching `pred`.
    pub fn drain(&self, quiet: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        thread::sleep(quiet);
        self.pump();
        let mut backlog = self.backlog.lock().unwrap();
        let (hit, keep): (Vec<Value>, Vec<Value>) = backlog.drain(..).partition(|v| pred(v));
        *backlog = keep;
        hit
    }

    // ---- Socket.IO helpers

    pub fn connect(&self, url: &str, opts: Value) -> String {
        let mut cmd = json!({"cmd": "connect", "url": url});
        if let Value::Object(m) = opts {
            for (k, v) in m {
                cmd[k] = v;
            }
        }
        self.cmd(cmd);
        let ev = self.expect("connected", Duration::from_secs(30), |e| {
            e["ev"] == "connected" || e["ev"] == "connect_error"
        });
        assert_eq!(ev["ev"], "connected", "{}: {ev}", self.name);
        ev["id"].as_str().unwrap_or_default().to_string()
    }

    pub fn emit(&self, event: &str, args: Value) {
        self.cmd(json!({"cmd": "emit", "event": event, "args": args}));
    }

    pub fn emit_ack(&self, event: &str, args: Value) -> Value {
        let seq = self.cmd(json!({"cmd": "emit", "event": event, "args": args, "ack": true}));
        self.expect("ack", Duration::from_secs(15), |e| {
            e["ev"] == "ack" && e["seq"] == json!(seq)
        })
    }

    /// Subscribes and waits for the hub's System notice that confirms it.
    pub fn subscribe(&self, topic: &str) {
        self.emit("subscribe", json!([topic]));
        let t = topic.to_string();
        self.expect("System join notice", WAIT, |e| {
            e["ev"] == "event"
                && e["event"] == "publish"
                && e["args"][0]["from"] == "System"
                && e["args"][0]["topic"] == t.as_str()
                && e["args"][0]["payload"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("New Joiner"))
        });
    }

    pub fn publish(&self, topic: &str, kind: &str, payload: Value) {
        self.emit(
            "publish",
            json!([{"topic": topic, "type": kind, "payload": payload}]),
        );
    }

    /// The next data (non-System) `publish` event whose envelope satisfies `pred`.
    pub fn next_publish(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let ev = self.expect("publish event", timeout, |e| {
            e["ev"] == "event"
                && e["event"] == "publish"
                && e["args"][0]["from"] != "System"
                && pred(&e["args"][0])
        });
        ev["args"][0].clone()
    }

    /// Data (non-System) envelopes received within `quiet`, consumed.
    pub fn data_messages(&self, quiet: Duration) -> Vec<Value> {
        self.drain(quiet, |e| {
            e["ev"] == "event" && e["event"] == "publish" && e["args"][0]["from"] != "System"
        })
        .into_iter()
        .map(|e| e["args"][0].clone())
        .collect()
    }

    // ---- NATS helpers

    pub fn nats_connect(&self, url: &str) {
        self.cmd(json!({"cmd": "connect", "servers": [url]}));
    }

    pub fn sub(&self, sid: &str, subject: &str) {
        self.cmd(json!({"cmd": "sub", "sid": sid, "subject": subject}));
    }

    pub fn queue_sub(&self, sid: &str, subject: &str, queue: &str) {
        self.cmd(json!({"cmd": "sub", "sid": sid, "subject": subject, "queue": queue}));
    }

    pub fn pub_text(&self, subject: &str, data: &str) {
        self.cmd(json!({"cmd": "pub", "subject": subject, "data": data}));
    }

    pub fn pub_json(&self, subject: &str, data: &Value) {
        self.pub_text(subject, &data.to_string());
    }

    /// NATS messages received within `quiet` on `sid`, consumed.
    pub fn msgs(&self, sid: &str, quiet: Duration) -> Vec<Value> {
        self.drain(quiet, |e| e["ev"] == "msg" && e["sid"] == sid)
    }

    pub fn next_msg(&self, sid: &str, timeout: Duration) -> Value {
        self.expect("NATS message", timeout, |e| {
            e["ev"] == "msg" && e["sid"] == sid
        })
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(mut stdin) = self.stdin.lock() {
            let _ = writeln!(stdin, "{{\"seq\":0,\"cmd\":\"exit\"}}");
            let _ = stdin.flush();
        }
    }
}

/// The JSON of a message an agent got from NATS.
pub fn body(msg: &Value) -> Value {
    serde_json::from_str(msg["data"].as_str().unwrap_or("null")).unwrap_or(Value::Null)
}

pub fn header(msg: &Value, name: &str) -> Option<String> {
    let h = msg.get("headers")?.as_object()?;
    let (_, v) = h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name))?;
    match v {
        Value::Array(a) => a.first().and_then(|x| x.as_str()).map(str::to_string),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

pub const SHORT: Duration = Duration::from_millis(600);
pub const WAIT: Duration = Duration::from_secs(10);

/// Counts identical items.
pub fn counts<T: std::hash::Hash + Eq + Clone>(items: &[T]) -> HashMap<T, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i.clone()).or_insert(0) += 1;
    }
    m
}

// ------------------------------------------------------------------ latency

/// A loopback TCP relay that delays every byte by `delay` in each
/// direction (so a round trip through it takes at least twice that), keeping
/// order and throughput: what a slow network link between two processes
/// looks like. Connections whose upstream refuses are closed at once.
pub struct DelayProxy {
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl DelayProxy {
    pub fn start(upstream: u16, delay: Duration) -> DelayProxy {
        use std::sync::atomic::AtomicBool;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (s, o) = (stop.clone(), open.clone());
        thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect_timeout(
                    &([127, 0, 0, 1], upstream).into(),
                    Duration::from_secs(1),
                ) else {
                    continue; // dropped: the client sees the connection closed
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let mut keep = o.lock().unwrap();
                keep.retain(|c| c.peer_addr().is_ok());
                for x in [&client, &server] {
                    if let Ok(c) = x.try_clone() {
                        keep.push(c);
                    }
                }
                drop(keep);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                delayed_pump(client, server, delay);
                delayed_pump(s2, c2, delay);
            }
        });
        DelayProxy { port, stop, open }
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Reads `from` and writes each chunk to `to` once it is `delay` old.
fn delayed_pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    use std::io::Read;
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Read);
    });
    thread::spawn(move || {
        // the channel ends when the reader does: then close the other side
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now); // the simulated latency itself
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}
