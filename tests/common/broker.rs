//! nats-server started from the shipped `compose/nats-server.conf`, so the
//! ingress tests run the broker operators deploy. Only what cannot be the
//! same on a test machine changes: the listen addresses become free
//! loopback ports and the JetStream directory a scratch one. Settings a test
//! scales (ping interval, write deadline) or adds (a cluster block) are
//! appended: in a nats-server config the later value of a key wins.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, http_get, nats_server_bin, root, scratch, wait_for_port, Proc};

pub fn shipped_conf() -> PathBuf {
    root().join("compose/nats-server.conf")
}

pub struct Broker {
    pub port: u16,
    pub http_port: u16,
    pub ws_port: u16,
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
}

/// Replaces `from` (which must be in `text`) by `to`.
fn swap(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "compose/nats-server.conf no longer contains `{from}`: update tests/common/broker.rs"
    );
    text.replace(from, to)
}

impl Broker {
    pub fn shipped() -> Broker {
        Broker::shipped_with("")
    }

    /// The shipped configuration with `extra` appended.
    pub fn shipped_with(extra: &str) -> Broker {
        Broker::on_ports(free_port(), free_port(), free_port(), extra)
    }

    /// As [`Broker::shipped_with`], on given ports (a cluster's routes name
    /// each other's ports before they start).
    pub fn on_ports(port: u16, http_port: u16, ws_port: u16, extra: &str) -> Broker {
        let b = Broker::starting(port, http_port, ws_port, extra);
        b.wait_healthy(Duration::from_secs(15));
        b
    }

    /// Starts without waiting for health: a JetStream cluster node is
    /// healthy only once enough of its peers run.
    pub fn starting(port: u16, http_port: u16, ws_port: u16, extra: &str) -> Broker {
        let dir = scratch();
        let text = std::fs::read_to_string(shipped_conf()).expect("compose/nats-server.conf");
        let text = swap(&text, "\"0.0.0.0:4222\"", &format!("\"127.0.0.1:{port}\""));
        let text = swap(
            &text,
            "\"0.0.0.0:8222\"",
            &format!("\"127.0.0.1:{http_port}\""),
        );
        let text = swap(
            &text,
            "\"0.0.0.0:8081\"",
            &format!("\"127.0.0.1:{ws_port}\""),
        );
        let js = dir.path().join("jetstream");
        let text = swap(
            &text,
            "\"/data/jetstream\"",
            &format!("\"{}\"", js.display()),
        );
        let conf = dir.path().join("nats-server.conf");
        std::fs::write(&conf, format!("{text}\n# added by the test\n{extra}\n")).unwrap();
        let proc = Broker::spawn(&conf, dir.path(), port);
        Broker {
            port,
            http_port,
            ws_port,
            proc,
            dir,
            conf,
        }
    }

    fn spawn(conf: &Path, dir: &Path, port: u16) -> Proc {
        let log = dir.join(format!("nats-{port}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(conf)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .expect("nats-server (see scripts/install-system-deps.sh)");
        Proc {
            child,
            name: "nats-server".into(),
            log: Some(log),
        }
    }

    /// Waits for `/healthz` (what the compose health check asks).
    pub fn wait_healthy(&self, timeout: Duration) {
        assert!(
            wait_for_port(self.port, timeout),
            "nats-server did not listen on {}:\n{}",
            self.port,
            self.proc.log_text()
        );
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.monitor("/healthz").0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server not healthy:\n{}", self.proc.log_text());
    }

    pub fn monitor(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://127.0.0.1:{}{path}", self.http_port))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.ws_port)
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn start_again(&mut self) {
        self.proc = Broker::spawn(&self.conf, self.dir.path(), self.port);
        self.wait_healthy(Duration::from_secs(15));
    }
}
