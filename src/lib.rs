//! tradefeed-bridge: a drop-in replacement for TraderX's Socket.IO
//! trade-feed that mirrors its topics to NATS subjects and back, so services
//! can move to NATS one at a time.

pub mod admin;
pub mod app;
pub mod attach;
pub mod bridge;
pub mod census;
pub mod config;
pub mod console;
pub mod decommission;
pub mod envelope;
pub mod nats;
pub mod probe;
pub mod prune;
pub mod route;
pub mod server;
pub mod telemetry;
pub mod upgrade_guard;
