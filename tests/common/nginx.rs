//! Debian's nginx in the foreground, on a free loopback port, with
//! everything it writes inside its own scratch directory.
//!
//! [`Nginx::shipped`] runs the ingress snippets of `compose/ingress/` as
//! operators deploy them: the generated nginx.conf `include`s the shipped
//! files, and only the upstream blocks (the one environment-specific part,
//! `compose/ingress/tradefeed-upstreams.conf` in compose) are written by the
//! test, with the same upstream names, pointing at loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, root, scratch, wait_for_port, Proc};

/// The upstream names the shipped location snippets proxy to.
pub const UPSTREAM_BRIDGE: &str = "tradefeed_bridge";
pub const UPSTREAM_ADMIN: &str = "tradefeed_bridge_admin";
pub const UPSTREAM_NATS_WS: &str = "nats_broker_ws";

/// The folder of the shipped ingress snippets.
pub fn ingress_dir() -> PathBuf {
    root().join("compose/ingress")
}

/// Where the shipped upstreams send requests in a test: loopback ports.
/// A missing one points at a port nobody listens on.
#[derive(Default, Clone)]
pub struct Upstreams {
    /// The bridge's Socket.IO port.
    pub bridge: Option<u16>,
    /// The bridge's admin port (console).
    pub admin: Option<u16>,
    /// nats-server WebSocket ports; several for a cluster.
    pub nats_ws: Vec<u16>,
}

impl Upstreams {
    fn blocks(&self) -> String {
        let block = |name: &str, ports: Vec<u16>| {
            let ports = if ports.is_empty() {
                vec![free_port()]
            } else {
                ports
            };
            let servers: String = ports
                .iter()
                .map(|p| format!("        server 127.0.0.1:{p};\n"))
                .collect();
            format!("    upstream {name} {{\n{servers}    }}\n")
        };
        [
            block(UPSTREAM_BRIDGE, self.bridge.into_iter().collect()),
            block(UPSTREAM_ADMIN, self.admin.into_iter().collect()),
            block(UPSTREAM_NATS_WS, self.nats_ws.clone()),
        ]
        .concat()
    }
}

/// Rewrites one shipped snippet: `(file name, text) -> text`.
pub type EditSnippet = Box<dyn Fn(&str, &str) -> String>;

/// Options of an nginx start.
#[derive(Default)]
pub struct NginxOpts {
    /// Serve HTTPS (a self-signed certificate made for the test).
    pub tls: bool,
    /// Extra parameters of the `listen` directive (e.g. `sndbuf=32k`).
    pub listen_params: String,
    /// Rewrites the shipped location snippets before use. For variants only (a setting removed or changed);
    /// `None` runs the files as shipped.
    pub edit_locations: Option<EditSnippet>,
}

pub struct Nginx {
    pub port: u16,
    pub tls: bool,
    /// Stopped (SIGTERM) when the handle drops.
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    /// The generated nginx.conf.
    pub conf: String,
}

impl Nginx {
    /// The shipped ingress snippets in front of `up`.
    pub fn shipped(up: &Upstreams) -> Nginx {
        Nginx::shipped_with(up, NginxOpts::default())
    }

    pub fn shipped_with(up: &Upstreams, opts: NginxOpts) -> Nginx {
        let dir = scratch();
        let shipped = ingress_dir();
        let locations = match &opts.edit_locations {
            None => shipped.join("locations"),
            Some(edit) => {
                let copy = dir.path().join("locations");
                std::fs::create_dir_all(&copy).unwrap();
                for f in std::fs::read_dir(shipped.join("locations")).unwrap() {
                    let f = f.unwrap().path();
                    let name = f.file_name().unwrap().to_string_lossy().into_owned();
                    let text = std::fs::read_to_string(&f).unwrap();
                    std::fs::write(copy.join(&name), edit(&name, &text)).unwrap();
                }
                copy
            }
        };
        let http = format!(
            "{}    include {};\n",
            up.blocks(),
            shipped.join("tradefeed-websocket.conf").display()
        );
        let server = format!("        include {}/*.conf;\n", locations.display());
        Nginx::start_in(dir, &http, &server, opts.tls, &opts.listen_params)
    }

    /// Serves `server` (a server-block snippet) with `http` (http-block
    /// directives) added; paths no location routes get nginx's 404.
    pub fn start(http: &str, server: &str) -> Nginx {
        Nginx::start_in(scratch(), http, server, false, "")
    }

    fn start_in(
        dir: tempfile::TempDir,
        http: &str,
        server: &str,
        tls: bool,
        listen_params: &str,
    ) -> Nginx {
        let port = free_port();
        let d = dir.path().display().to_string();
        // as root, nginx's workers would switch to `nobody` and lose the scratch dir
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        let listen = if tls {
            self_signed(dir.path());
            format!(
                "listen 127.0.0.1:{port} ssl {listen_params};\n        ssl_certificate {d}/cert.pem;\n        \
                 ssl_certificate_key {d}/key.pem;"
            )
        } else {
            format!("listen 127.0.0.1:{port} {listen_params};")
        };
        let conf = format!(
            "{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{http}
    server {{
        {listen}
        root {d}/www;
{server}
    }}
}}
"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, &conf).unwrap();
        let log_path = dir.path().join("nginx.out");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx (/usr/sbin/nginx, see scripts/install-system-deps.sh)");
        let mut proc = Proc {
            child,
            name: "nginx".into(),
            log: Some(log_path),
        };
        if !wait_for_port(port, Duration::from_secs(10)) {
            let err = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            proc.kill();
            panic!("nginx did not listen:\n{}\n{err}\n{conf}", proc.log_text());
        }
        Nginx {
            port,
            tls,
            proc,
            dir,
            conf,
        }
    }

    /// `http://` or `https://` with the port.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The NATS WebSocket URL through the shipped `/nats-ws` location.
    pub fn nats_ws_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}/nats-ws", self.port)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

pub fn nginx_bin() -> &'static Path {
    Path::new("/usr/sbin/nginx")
}

/// Checks a configuration with `nginx -t`; `Err(output)` when refused.
pub fn nginx_test(dir: &Path, conf: &Path) -> Result<String, String> {
    let out = Command::new(nginx_bin())
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(conf)
        .arg("-t")
        .output()
        .expect("nginx");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// A key and a self-signed certificate for 127.0.0.1 in `dir`.
fn self_signed(dir: &Path) {
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl (see scripts/install-system-deps.sh)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces `from` by `to` in a snippet, insisting that it was there, so a
/// variant cannot silently test the shipped text.
pub fn replace_all(name: &str, text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "{name} no longer contains `{from}`: update the variant"
    );
    text.replace(from, to)
}
