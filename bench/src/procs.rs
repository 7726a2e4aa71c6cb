//! The servers under test, as child processes on free loopback ports: the
//! bridge, the legacy Node hub and nats-server. Each one can be pinned to a
//! CPU list with `taskset`, and is stopped when its handle drops.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the binaries are and how the servers are pinned.
#[derive(Debug, Clone)]
pub struct Setup {
    pub bridge_bin: PathBuf,
    pub bridge_config: PathBuf,
    pub nats_server: PathBuf,
    pub node: PathBuf,
    pub hub_script: PathBuf,
    /// `taskset -c` list for the server under test (bridge or hub); empty: none.
    pub server_cpus: String,
    /// `taskset -c` list for nats-server; empty: none.
    pub nats_cpus: String,
    /// Logs of the servers go here.
    pub log_dir: PathBuf,
}

/// A loopback port nobody listens on, for a server about to start. It comes
/// from below the kernel's ephemeral range, where the load generator's own
/// connections (10,000 of them in the scale case) take their local ports, so
/// none of them can take it before the server binds it. Each is handed out
/// once, walking from an offset of the process id, so that two runs at once
/// (the test suite's smoke runs) rarely meet.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    const LOW: u32 = 10_000;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .clamp(LOW + 1_000, 65_536);
    let span = high - LOW;
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7_919) % span));
    for _ in 0..span {
        let port = (LOW + next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{high}");
}

/// `taskset -c CPUS PROGRAM`: taskset execs the program, so the child's pid
/// is the server's own and /proc readings are the server's.
fn pinned(cpus: &str, program: &Path) -> Command {
    if cpus.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpus).arg(program);
        c
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = dir.join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// A running server, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    pub name: &'static str,
    pub child: Child,
    /// Socket.IO or NATS client port.
    pub port: u16,
    /// The bridge's admin port (0 for the others).
    pub admin_port: u16,
    pub spawned: Instant,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            send_signal(self.child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `kill -SIG PID` (procps), which keeps this crate free of unsafe code.
fn send_signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Starts nats-server on a free port.
pub fn start_nats(setup: &Setup) -> anyhow::Result<Server> {
    let port = free_port();
    let log = log_file(&setup.log_dir, "nats-server")?;
    let child = pinned(&setup.nats_cpus, &setup.nats_server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", setup.nats_server.display()))?;
    let server = Server {
        name: "nats-server",
        child,
        port,
        admin_port: 0,
        spawned: Instant::now(),
    };
    wait_port(port, Duration::from_secs(10)).context("nats-server did not listen")?;
    Ok(server)
}

/// Starts the legacy hub (`node hub.js --port 0`) and reads its port from
/// the one line it prints when listening.
pub fn start_hub(setup: &Setup) -> anyhow::Result<Server> {
    let log = log_file(&setup.log_dir, "hub")?;
    let mut child = pinned(&setup.server_cpus, &setup.node)
        .arg(&setup.hub_script)
        .args(["--port", "0", "--host", "127.0.0.1", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", setup.node.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let spawned = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep reading so the hub never blocks on a full pipe.
        for _ in lines {}
    });
    let mut server = Server {
        name: "hub",
        child,
        port: 0,
        admin_port: 0,
        spawned,
    };
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .context("the hub printed no `listening` line within 20 s")?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("unexpected first line from the hub: {line}"))?;
    server.port = v["port"].as_u64().context("no port in the hub's line")? as u16;
    Ok(server)
}

/// Spawns the bridge with the TraderX routes against `nats_port`, on free
/// ports; does not wait for readiness.
pub fn spawn_bridge(
    setup: &Setup,
    nats_port: u16,
    extra_env: &[(String, String)],
) -> anyhow::Result<Server> {
    let port = free_port();
    let admin_port = free_port();
    let log = log_file(&setup.log_dir, "bridge")?;
    let mut cmd = pinned(&setup.server_cpus, &setup.bridge_bin);
    cmd.arg("--config")
        .arg(&setup.bridge_config)
        .env(
            "TRADEFEED_BRIDGE_NATS__SERVERS",
            format!("[\"nats://127.0.0.1:{nats_port}\"]"),
        )
        .env(
            "TRADEFEED_BRIDGE_SOCKETIO__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env(
            "TRADEFEED_BRIDGE_ADMIN__LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .env_remove("RUST_LOG");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let spawned = Instant::now();
    let child = cmd
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", setup.bridge_bin.display()))?;
    Ok(Server {
        name: "bridge",
        child,
        port,
        admin_port,
        spawned,
    })
}

/// Starts the bridge and waits for `/readyz` 200; returns it with the time
/// from spawn to ready.
pub fn start_bridge(
    setup: &Setup,
    nats_port: u16,
    extra_env: &[(String, String)],
) -> anyhow::Result<(Server, Duration)> {
    let mut b = spawn_bridge(setup, nats_port, extra_env)?;
    let ready = wait_ready(&mut b, Duration::from_secs(20))?;
    Ok((b, ready))
}

/// Polls `/readyz` every millisecond; the time from spawn to the first 200.
pub fn wait_ready(b: &mut Server, timeout: Duration) -> anyhow::Result<Duration> {
    let url = format!("http://127.0.0.1:{}/readyz", b.admin_port);
    let agent = http_agent(Duration::from_millis(500));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(resp) = agent.get(&url).call() {
            if resp.status().as_u16() == 200 {
                return Ok(b.spawned.elapsed());
            }
        }
        if let Ok(Some(st)) = b.child.try_wait() {
            bail!("the bridge exited before it was ready: {st}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("the bridge was not ready within {timeout:?}")
}

pub fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// Sum of a Prometheus counter over its series whose labels contain
/// `labels` (e.g. `direction="to_socketio"`); 0 when absent.
pub fn metric_sum(admin_port: u16, name: &str, labels: &str) -> f64 {
    let agent = http_agent(Duration::from_secs(5));
    let url = format!("http://127.0.0.1:{admin_port}/metrics");
    let Ok(mut resp) = agent.get(&url).call() else {
        return f64::NAN;
    };
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) || !rest.contains(labels) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum::<f64>()
        + 0.0
}

fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("nothing listens on {port} after {timeout:?}")
}

// ------------------------------------------------------------------ /proc

/// CPU time (user + system) and resident memory of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_ticks: u64,
    pub rss_kb: u64,
}

/// Clock ticks per second of /proc/<pid>/stat (USER_HZ, 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let cpu_ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Usage {
        cpu_ticks,
        rss_kb: rss_kb(pid)?,
    })
}

pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub fn self_pid() -> u32 {
    std::process::id()
}
