//! Raw HTTP/1.1 to the Socket.IO endpoint: what a browser or a proxy would
//! see, and Engine.IO polling packets no Socket.IO client library would send.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub took: Duration,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }

    /// The Engine.IO session id of a handshake response (`0{"sid":...}`).
    pub fn sid(&self) -> String {
        let open: Value =
            serde_json::from_str(self.body.trim_start_matches('0')).unwrap_or_else(|e| {
                panic!("not an Engine.IO open packet ({e}): {self:?}");
            });
        open["sid"].as_str().expect("sid").to_string()
    }
}

/// Sends one request (`Connection: close` is added) and reads the response:
/// up to the end of the headers for a 101, else to the end of the body.
pub fn raw(port: u16, method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let upgrade = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("upgrade"));
    if !upgrade {
        req.push_str("Connection: close\r\n");
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write request");

    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => panic!(
                "{method} {target}: connection ended before the response headers: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut rest = buf[head_end + 4..].to_vec();
    if status != 101 {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
    }
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(&rest)
    } else {
        String::from_utf8_lossy(&rest).into_owned()
    };
    Resp {
        status,
        headers,
        body,
        took: t0.elapsed(),
    }
}

fn dechunk(mut b: &[u8]) -> String {
    let mut out = Vec::new();
    while let Some(p) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..p]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < p + 2 + size {
            break;
        }
        out.extend_from_slice(&b[p + 2..p + 2 + size]);
        b = &b[(p + 4 + size).min(b.len())..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn handshake(port: u16, path: &str, origin: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = origin.map(|o| vec![("Origin", o)]).unwrap_or_default();
    raw(
        port,
        "GET",
        &format!("{path}?EIO=4&transport=polling"),
        &headers,
        "",
    )
}

/// An Engine.IO polling session on the default namespace, driven packet by
/// packet: for input that no Socket.IO client library would send.
pub struct PollingSession {
    port: u16,
    sid: String,
}

impl PollingSession {
    /// Opens the session and connects it to the namespace `/`.
    pub fn connect(port: u16) -> PollingSession {
        let open = handshake(port, "/socket.io/", None);
        assert_eq!(open.status, 200, "handshake: {open:?}");
        let s = PollingSession {
            port,
            sid: open.sid(),
        };
        s.send("40");
        s.poll_for("40", Duration::from_secs(5));
        s
    }

    /// Posts one packet (Engine.IO type and payload, e.g. `42["publish",{}]`).
    pub fn send(&self, packet: &str) {
        let r = raw(
            self.port,
            "POST",
            &format!("/socket.io/?EIO=4&transport=polling&sid={}", self.sid),
            &[("Content-Type", "text/plain;charset=UTF-8")],
            packet,
        );
        assert_eq!(r.status, 200, "POST {packet}: {r:?}");
    }

    /// One poll: the packets the server had queued (waits for at least one).
    pub fn poll(&self) -> String {
        let r = raw(
            self.port,
            "GET",
            &format!("/socket.io/?EIO=4&transport=polling&sid={}", self.sid),
            &[],
            "",
        );
        assert_eq!(r.status, 200, "GET: {r:?}");
        r.body
    }

    /// Polls until a packet starting with `prefix` arrives (pings are
    /// answered), for at most `within`.
    pub fn poll_for(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            for packet in self.poll().split('\u{1e}') {
                if packet.starts_with(prefix) {
                    return packet.to_string();
                }
                if packet == "2" {
                    self.send("3");
                }
            }
        }
        panic!("no packet starting with {prefix} within {within:?}");
    }
}
