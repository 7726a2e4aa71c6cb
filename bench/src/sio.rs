//! A minimal Socket.IO v5 (Engine.IO 4) client over WebSocket, just enough
//! for trade-feed's protocol: open, CONNECT to `/`, answer pings, emit
//! `subscribe` and `publish`, read `publish` events. No polling, no acks,
//! no reconnects: a load generator has to be cheaper than what it measures.

use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the handshake and a subscription may take on a loaded machine.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected Socket.IO client.
pub struct Conn {
    pub ws: Ws,
    /// The Socket.IO socket id (what the hub writes as `from`).
    pub sid: String,
}

/// Opens `ws://127.0.0.1:<port>/socket.io/?EIO=4&transport=websocket` and
/// connects to the default namespace.
pub async fn connect(port: u16) -> anyhow::Result<Conn> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_inner(port))
        .await
        .context("Socket.IO handshake timed out")?
}

async fn connect_inner(port: u16) -> anyhow::Result<Conn> {
    let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
    // Small buffers: the scale test holds 10,000 of these in one process.
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(16 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&url, Some(config), true)
        .await
        .with_context(|| format!("cannot open {url}"))?;
    let open = next_text(&mut ws).await?;
    if !open.starts_with('0') {
        bail!("expected the Engine.IO open packet, got {open:?}");
    }
    ws.send(Message::text("40")).await?;
    loop {
        let t = next_text(&mut ws).await?;
        if let Some(rest) = t.strip_prefix("40") {
            let v: serde_json::Value =
                serde_json::from_str(rest).with_context(|| format!("bad CONNECT reply {t:?}"))?;
            let sid = v["sid"].as_str().context("no sid in CONNECT reply")?;
            return Ok(Conn {
                ws,
                sid: sid.to_string(),
            });
        }
        if t.starts_with("44") {
            bail!("CONNECT refused: {t}");
        }
    }
}

/// The next text frame, answering pings on the way.
async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if t.as_str() == "2" {
                    ws.send(Message::text("3")).await?;
                    continue;
                }
                return Ok(t.as_str().to_string());
            }
            Some(Ok(Message::Close(c))) => bail!("closed by the server: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection closed"),
        }
    }
}

impl Conn {
    /// Emits `subscribe` and waits for the System notice naming this socket,
    /// which the hub (and the bridge) send once the socket is in the room.
    pub async fn subscribe(&mut self, topic: &str) -> anyhow::Result<()> {
        let frame = format!(
            "42[\"subscribe\",{}]",
            serde_json::to_string(topic).expect("string")
        );
        self.ws.send(Message::text(frame)).await?;
        let want = format!("New Joiner {} to topic {}", self.sid, topic);
        let wait = async {
            loop {
                let t = next_text(&mut self.ws).await?;
                if t.contains(&want) {
                    return Ok::<(), anyhow::Error>(());
                }
            }
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, wait)
            .await
            .with_context(|| format!("no join notice for {topic}"))?
    }
}

/// The `publish` frame for a message on `topic` with `payload` (JSON text).
pub fn publish_frame(out: &mut String, topic: &str, kind: &str, payload: &str) {
    out.clear();
    out.push_str("42[\"publish\",{\"topic\":\"");
    out.push_str(topic);
    out.push_str("\",\"type\":\"");
    out.push_str(kind);
    out.push_str("\",\"payload\":");
    out.push_str(payload);
    out.push_str("}]");
}
