//! Configuration: a TOML file overridden by `TRADEFEED_BRIDGE_*` environment
//! variables, merged with figment, then checked as a whole so that an operator
//! sees every problem at once, each with its key path.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::route::{Direction, Placeholder, RouteSpec};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "TRADEFEED_BRIDGE_";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// `server`: the bridge is the Socket.IO hub. `attach`: it joins an
    /// existing trade-feed as a client.
    pub mode: Mode,
    /// Identifies this process in NATS headers and logs; random when empty.
    pub instance_id: String,
    pub socketio: SocketIoConfig,
    pub attach: AttachConfig,
    pub admin: AdminConfig,
    pub nats: NatsConfig,
    pub log: LogConfig,
    /// The operator console served at `/console/` on the admin port.
    pub console: ConsoleConfig,
    /// On SIGTERM or Ctrl-C, how long in-flight messages may take to reach
    /// NATS and point-to-point members to leave their queue groups.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Server,
    Attach,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct SocketIoConfig {
    pub listen: String,
    /// Paths the Socket.IO endpoint answers on. All share one set of rooms.
    /// Legacy trade-feed uses `/socket.io`; TraderX's ingress also uses `/trade-feed`.
    pub paths: Vec<String>,
    /// `["*"]` answers any origin, as the legacy hub does.
    pub cors_origins: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true`; needs an explicit origin list.
    pub cors_credentials: bool,
    /// Largest Engine.IO packet accepted from a client (legacy: 1e6 bytes).
    pub max_payload_bytes: u64,
    /// Packets queued per client before it is counted as falling behind.
    pub max_buffer_packets: usize,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// A client still subscribed to nothing this long after connecting is reported.
    #[serde(with = "humantime_serde")]
    pub idle_subscription_warning: Duration,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:18086".into(),
            paths: vec!["/socket.io".into()],
            cors_origins: vec!["*".into()],
            cors_credentials: false,
            max_payload_bytes: 1_000_000,
            max_buffer_packets: 16_384,
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            idle_subscription_warning: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AttachConfig {
    /// URL of the running trade-feed, e.g. `http://trade-feed:18086`.
    pub url: String,
    pub path: String,
    pub headers: std::collections::BTreeMap<String, Secret>,
    pub auth_token: Option<Secret>,
    /// NATS -> legacy messages kept while trade-feed is unreachable.
    pub buffer_messages: usize,
    #[serde(with = "humantime_serde")]
    pub reconnect_delay_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_delay_max: Duration,
    /// Window in which the bridge recognises its own publishes coming back.
    #[serde(with = "humantime_serde")]
    pub echo_window: Duration,
    /// Only one attached bridge per trade-feed mirrors at a time; the others
    /// wait. Needs JetStream on the NATS server (`nats-server -js`).
    pub lease: bool,
    /// NATS key-value bucket holding the active-attacher lease.
    pub lease_bucket: String,
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Point-to-point routes (by name) whose consumers are still on
    /// trade-feed. trade-feed does not tell a client who is in a room, so the
    /// operator says it; routes not listed count as having legacy consumers.
    /// Changed at run time with `PUT /api/legacy-consumers/<route>`.
    pub legacy_consumers: std::collections::BTreeMap<String, bool>,
    /// How the bridge talks to trade-feed.
    pub transport: AttachTransport,
    /// After a reconnect, how long buffered NATS -> legacy messages wait
    /// before they are sent, so that legacy clients (which reconnect on
    /// their own schedule) are back in their rooms.
    #[serde(with = "humantime_serde")]
    pub replay_wait: Duration,
    /// Largest `publish` the bridge sends to trade-feed (its
    /// `maxHttpBufferSize`, 1e6 bytes by default): a larger one would make
    /// trade-feed close the connection, so it is refused and counted.
    pub max_payload_bytes: usize,
}

/// The Engine.IO transport attach mode uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttachTransport {
    /// WebSocket when trade-feed offers it (after an HTTP handshake), else
    /// HTTP long-polling.
    #[default]
    Any,
    /// WebSocket only.
    Websocket,
    /// HTTP long-polling only (for proxies that do not pass WebSocket).
    Polling,
}

impl Default for AttachConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            path: "/socket.io".into(),
            headers: Default::default(),
            auth_token: None,
            buffer_messages: 10_000,
            reconnect_delay_min: Duration::from_millis(100),
            reconnect_delay_max: Duration::from_secs(5),
            echo_window: Duration::from_secs(30),
            lease: true,
            lease_bucket: "tradefeed_bridge".into(),
            lease_ttl: Duration::from_secs(6),
            legacy_consumers: Default::default(),
            transport: AttachTransport::Any,
            replay_wait: Duration::from_secs(5),
            max_payload_bytes: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AdminConfig {
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:18097".into(),
        }
    }
}

/// The console page: where its built files are and how it reaches NATS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ConsoleConfig {
    /// Directory holding the built page (`index.html`, `app.js`), the output
    /// of `npm run build` in `console/`. Relative paths are taken from the
    /// working directory.
    pub dir: PathBuf,
    /// NATS WebSocket endpoint the page connects to: a path on the page's
    /// own origin (ws or wss following the page, as the ingress serves
    /// `/nats-ws`), or a full `ws://` / `wss://` URL.
    pub nats_url: String,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("console/dist"),
            nats_url: "/nats-ws".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct NatsConfig {
    pub servers: Vec<String>,
    /// Connection name shown in the NATS server's monitoring.
    pub name: String,
    pub token: Option<Secret>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub nkey_seed: Option<Secret>,
    pub credentials_file: Option<PathBuf>,
    pub tls_required: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_delay_max: Duration,
    /// 0 retries for ever.
    pub max_reconnects: usize,
    /// Largest message (body and headers) sent to NATS; 0 means the server's `max_payload`.
    pub max_message_bytes: usize,
    /// Socket.IO -> NATS messages queued inside the bridge before new ones are refused.
    pub publish_queue: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            name: "tradefeed-bridge".into(),
            token: None,
            user: None,
            password: None,
            nkey_seed: None,
            credentials_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_client_cert: None,
            tls_client_key: None,
            connect_timeout: Duration::from_secs(5),
            reconnect_delay_max: Duration::from_secs(4),
            max_reconnects: 0,
            max_message_bytes: 0,
            publish_queue: 65_536,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `tradefeed_bridge=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Server,
            instance_id: String::new(),
            socketio: SocketIoConfig::default(),
            attach: AttachConfig::default(),
            admin: AdminConfig::default(),
            nats: NatsConfig::default(),
            log: LogConfig::default(),
            console: ConsoleConfig::default(),
            drain_timeout: Duration::from_secs(5),
            routes: Vec::new(),
        }
    }
}

/// A value that must never be printed: `Debug`, `Display` and `Serialize`
/// all give `***`, and a value of the wrong type is refused without being
/// shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Why a secret of the wrong type was refused; never the value itself.
const SECRET_NOT_A_STRING: &str =
    "must be a string: quote it (the value is not shown because it is a secret)";

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_string(SecretVisitor)
    }
}

/// Takes a string; refuses anything else with [`SECRET_NOT_A_STRING`] rather
/// than serde's "invalid type: found ...", which quotes the value.
struct SecretVisitor;

impl<'de> serde::de::Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret(v.to_string()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret(v))
    }

    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Secret, E> {
        Ok(Secret(v.to_string()))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
        Err(E::custom(SECRET_NOT_A_STRING))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
        Err(E::custom(SECRET_NOT_A_STRING))
    }

    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<Secret, E> {
        Err(E::custom(SECRET_NOT_A_STRING))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
        Err(E::custom(SECRET_NOT_A_STRING))
    }

    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<Secret, E> {
        Err(E::custom(SECRET_NOT_A_STRING))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
        Err(E::custom(SECRET_NOT_A_STRING))
    }

    fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Secret, E> {
        Err(E::custom(SECRET_NOT_A_STRING))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Secret, E> {
        Err(E::custom(SECRET_NOT_A_STRING))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(serde::de::Error::custom(SECRET_NOT_A_STRING))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(serde::de::Error::custom(SECRET_NOT_A_STRING))
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One thing wrong with the configuration, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found while loading; `Display` prints one per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        message: message.into(),
    }
}

/// The figment the bridge reads: the file (when it exists or was asked for)
/// then the environment. `TRADEFEED_BRIDGE_NATS__SERVERS='[nats://a:4222]'`
/// sets `nats.servers`; `__` separates key levels.
pub fn figment(path: &Path, file_required: bool) -> Result<Figment, ConfigErrors> {
    let mut fig = Figment::new();
    if path.is_dir() || (file_required && !path.exists()) {
        return Err(ConfigErrors(vec![problem("--config", not_a_file(path))]));
    }
    if path.exists() {
        fig = fig.merge(Toml::file_exact(path));
    }
    // CONFIG and LOG_* style variables used by the command line itself are not keys.
    let env = Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]);
    // Credentials are taken exactly as written: figment would read `0123`
    // as the number 123 and `true` as a boolean.
    let literal = env.clone().filter(|k| literal_env_key(k.as_str()));
    fig = fig.merge(env.filter(|k| !literal_env_key(k.as_str())));
    for (key, value) in literal.iter() {
        fig = fig.merge(figment::providers::Serialized::default(key.as_str(), value));
    }
    Ok(fig)
}

/// Why `path` cannot be read as a file: it is missing, or a folder.
fn not_a_file(path: &Path) -> String {
    if path.is_dir() {
        format!("{} is a folder, not a file", path.display())
    } else {
        format!("file {} does not exist", path.display())
    }
}

/// The keys holding secrets ([`Secret`] values); every key of the
/// `attach.headers` table is one too.
const SECRET_KEYS: [&str; 4] = [
    "nats.token",
    "nats.password",
    "nats.nkey_seed",
    "attach.auth_token",
];
const SECRET_TABLE: &str = "attach.headers";

/// Keys whose environment variable is a plain string, never parsed: the
/// credentials (and the user name that goes with a password).
fn literal_env_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key == "nats.user"
        || SECRET_KEYS.contains(&key.as_str())
        || key.starts_with(&format!("{SECRET_TABLE}."))
}

/// A parse error without the excerpt of the file that the TOML parser
/// quotes (the quoted line may hold a secret); the line and column stay.
fn without_excerpt(message: &str) -> String {
    let excerpt = |line: &str| {
        line.trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start()
            .starts_with('|')
    };
    message
        .lines()
        .filter(|l| !excerpt(l))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Loads and checks the whole configuration.
pub fn load(path: &Path, file_required: bool) -> Result<Config, ConfigErrors> {
    let fig = figment(path, file_required)?;
    from_figment(&fig)
}

/// Extracts and checks the configuration, reporting every problem at once.
///
/// Serde stops at the first type error, so extraction runs in rounds: each
/// round's type error is reported and its key taken out (its default then
/// applies; a broken route is set aside), until the rest extracts. Then the
/// semantic checks run on what is left. Every problem names its key path and
/// where the value came from (the file, or the exact environment variable).
pub fn from_figment(fig: &Figment) -> Result<Config, ConfigErrors> {
    use figment::value::Value;
    let mut problems = Vec::new();
    let mut tree: Value = match fig.extract() {
        Ok(v) => v,
        Err(e) => {
            let ps = e
                .into_iter()
                .map(|err| {
                    problem(
                        key_of(&err.path),
                        format!(
                            "{}{}",
                            without_excerpt(&kind_text(&err.path, &err.kind)),
                            origin(fig, &err.path)
                        ),
                    )
                })
                .collect();
            return Err(ConfigErrors(ps));
        }
    };
    let mut reported_unknown = std::collections::BTreeSet::new();
    // Route indexes set aside: problems under them are already reported.
    let mut broken_routes: Vec<usize> = Vec::new();
    let mut removed: Vec<Vec<String>> = Vec::new();
    let mut config = None;
    for _ in 0..MAX_ROUNDS {
        let mut unknown = Vec::new();
        let walked: Result<Config, figment::Error> =
            serde_ignored::deserialize(&tree, |path| unknown.push(path.to_string()));
        for raw in unknown {
            let path: Vec<String> = raw.split('.').map(str::to_string).collect();
            if reported_unknown.insert(raw) {
                problems.push(problem(
                    key_of(&path),
                    format!("unknown key (check the spelling){}", origin(fig, &path)),
                ));
            }
        }
        let err = match walked {
            Ok(c) => {
                config = Some(c);
                break;
            }
            Err(e) => e,
        };
        let mut progressed = false;
        for err in err {
            // A required key taken out in an earlier round is now missing:
            // already reported.
            let derived = removed
                .iter()
                .any(|r: &Vec<String>| r.len() > err.path.len() && r.starts_with(&err.path));
            if !derived {
                problems.push(problem(
                    key_of(&err.path),
                    format!(
                        "{}{}",
                        kind_text(&err.path, &err.kind),
                        origin(fig, &err.path)
                    ),
                ));
            }
            if let [first, index, ..] = err.path.as_slice() {
                if let (true, Ok(i)) = (first == "routes", index.parse::<usize>()) {
                    if !broken_routes.contains(&i) {
                        broken_routes.push(i);
                    }
                }
            }
            if set_aside(&mut tree, &err.path) {
                removed.push(err.path.clone());
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    let Some(config) = config else {
        return Err(ConfigErrors(problems));
    };
    // A key taken out has its default now: what the checks say of it
    // follows from the problem already reported.
    let set_aside_key = |key: &str| {
        broken_routes
            .iter()
            .any(|i| key.starts_with(&format!("routes[{i}]")))
            || removed.iter().any(|r| key_of(r) == key)
    };
    problems.extend(
        validate(&config)
            .into_iter()
            .filter(|p| !set_aside_key(&p.key))
            .map(|mut p| {
                let path: Vec<String> = p
                    .key
                    .replace('[', ".")
                    .replace(']', "")
                    .split('.')
                    .map(str::to_string)
                    .collect();
                let from = origin(fig, &path);
                if from.contains("environment variable") {
                    p.message.push_str(&from);
                }
                p
            }),
    );
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(problems))
    }
}

/// A type error's text. Where a table holding secrets was expected (`nats`,
/// `attach`, `attach.headers`), a string found instead is not quoted: it is
/// typically the table written with a brace missing
/// (`TRADEFEED_BRIDGE_ATTACH__HEADERS='{X-Api-Key="..."'`), secret included.
fn kind_text(path: &[String], kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    // A secret itself, a table holding one, or inside the secret table.
    let key = path.join(".");
    let holds_secret = SECRET_KEYS
        .iter()
        .chain([&SECRET_TABLE])
        .any(|s| *s == key || s.starts_with(&format!("{key}.")))
        || key.starts_with(&format!("{SECRET_TABLE}."));
    match kind {
        Kind::InvalidType(Actual::Str(_), expected)
        | Kind::InvalidValue(Actual::Str(_), expected)
            if holds_secret =>
        {
            format!(
                "invalid type: found a string (not shown: it may hold a secret), expected {expected}"
            )
        }
        Kind::UnknownVariant(found, expected) => {
            format!("unknown value `{found}`, expected {}", one_of(expected))
        }
        _ => kind.to_string(),
    }
}

/// `` `a` `` , `` `a` or `b` ``, `` `a`, `b` or `c` ``.
fn one_of(choices: &[&str]) -> String {
    let quoted: Vec<String> = choices.iter().map(|c| format!("`{c}`")).collect();
    match quoted.split_last() {
        None => "nothing".into(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Extraction rounds: one per type error, bounded.
const MAX_ROUNDS: usize = 64;

/// `routes[1].direction` from `["routes", "1", "direction"]`.
fn key_of(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    if key.is_empty() {
        "(top level)".into()
    } else {
        key
    }
}

/// Where a key's value came from: ` (from environment variable X)` or
/// ` (from TOML file F)`; empty when unknown (a default).
fn origin(fig: &Figment, path: &[String]) -> String {
    // the variable of the key itself, or of the list or table holding it
    // (X__SERVERS for nats.servers[0], X__HEADERS for attach.headers.Name)
    for n in (1..=path.len()).rev() {
        let var = format!("{ENV_PREFIX}{}", path[..n].join("__").to_uppercase());
        if std::env::var_os(&var).is_some() {
            return format!(" (from environment variable {var})");
        }
    }
    let var = format!("{ENV_PREFIX}{}", path.join("__").to_uppercase());
    // a key made of nested variables, e.g. X__PATHS__EXTRA for X__PATHS
    let mut nested: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| !path.is_empty() && k.starts_with(&format!("{var}__")))
        .collect();
    if !nested.is_empty() {
        nested.sort();
        return format!(" (from environment variable {})", nested.join(", "));
    }
    // the closest enclosing key that has metadata (array elements have none)
    for n in (1..=path.len()).rev() {
        if let Some(m) = fig.find_metadata(&path[..n].join(".")) {
            return match &m.source {
                Some(figment::Source::File(f)) => format!(" (from {} {})", m.name, f.display()),
                _ => format!(" (from {})", m.name),
            };
        }
    }
    String::new()
}

/// Takes the value at `path` out of `tree` so that extraction can go on:
/// a key is removed (its default applies); a route element that cannot be
/// read at all (a required key is missing) is replaced by a placeholder, so
/// later routes keep their indexes. False when nothing could be taken out.
fn set_aside(tree: &mut figment::value::Value, path: &[String]) -> bool {
    use figment::value::Value;
    if let [first, index] = path {
        if let (true, Ok(i)) = (first == "routes", index.parse::<usize>()) {
            let Value::Dict(_, top) = tree else {
                return false;
            };
            let Some(Value::Array(_, items)) = top.get_mut("routes") else {
                return false;
            };
            let Some(item) = items.get_mut(i) else {
                return false;
            };
            let placeholder = serde_json::json!({
                "name": format!("(route {i} set aside)"),
                "topic": format!("/route-{i}-set-aside"),
                "subject": format!("route-{i}-set-aside"),
            });
            let placeholder = Value::serialize(placeholder).expect("static value");
            if *item == placeholder {
                return false;
            }
            *item = placeholder;
            return true;
        }
    }
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = tree;
    for p in parents {
        node = match node {
            Value::Dict(_, d) => match d.get_mut(p) {
                Some(n) => n,
                None => return false,
            },
            Value::Array(_, items) => {
                match p.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(n) => n,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match node {
        Value::Dict(_, d) => d.remove(last).is_some(),
        _ => false,
    }
}

/// Why `seed` is not a user NKey seed; the message never contains the seed.
fn nkey_seed_problem(seed: &str) -> Option<String> {
    match nkeys::KeyPair::from_seed(seed.trim()) {
        Ok(kp) if matches!(kp.key_pair_type(), nkeys::KeyPairType::User) => None,
        Ok(_) => Some("is an NKey seed, but not a user seed (a user seed starts with SU)".into()),
        Err(e) => Some(format!(
            "is not a valid user NKey seed ({}; a user seed is 58 characters and starts with SU)",
            e.kind()
        )),
    }
}

/// Reads a credentials file the way the NATS client will (user JWT and seed);
/// the message never contains the file's content.
fn credentials_problem(path: &Path) -> Option<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return Some(format!("cannot be read: {e}")),
    };
    match async_nats::ConnectOptions::with_credentials(&text) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData && e.to_string().contains("JWT") => {
            Some("is not a NATS credentials file: no user JWT block found".into())
        }
        Err(e) if e.to_string().contains("nkey") => {
            Some("is not a NATS credentials file: no user NKey seed block found".into())
        }
        Err(_) => Some("is not a NATS credentials file: its NKey seed is not valid".into()),
    }
}

/// PEM certificates (a CA bundle or a client certificate chain).
fn certificates_problem(path: &Path) -> Option<String> {
    use async_nats::rustls::pki_types::{pem::PemObject, CertificateDer};
    match CertificateDer::pem_file_iter(path) {
        Err(e) => Some(format!("cannot be read as PEM: {e}")),
        Ok(iter) => match iter.collect::<Result<Vec<_>, _>>() {
            Err(e) => Some(format!("is not valid PEM: {e}")),
            Ok(certs) if certs.is_empty() => {
                Some("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into())
            }
            Ok(_) => None,
        },
    }
}

/// A PEM private key (PKCS#8, PKCS#1 or SEC1).
fn key_problem(path: &Path) -> Option<String> {
    use async_nats::rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    match PrivateKeyDer::from_pem_file(path) {
        Ok(_) => None,
        Err(_) => Some("holds no PEM private key (-----BEGIN PRIVATE KEY-----)".into()),
    }
}

/// Checks that need more than types: addresses, routes, TLS files, combinations.
pub fn validate(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();

    // It is a token of the bridge's own subjects (_INBOX.<id>.roundtrip) and
    // a header value: a space or a wildcard would make every publish fail.
    if !c
        .instance_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        p.push(problem(
            "instance_id",
            format!(
                "`{}` may hold only letters, digits, - and _ (it is a token of NATS subjects)",
                c.instance_id
            ),
        ));
    }
    if c.socketio.listen.parse::<SocketAddr>().is_err() {
        p.push(problem(
            "socketio.listen",
            format!(
                "`{}` is not an address like 0.0.0.0:18086",
                c.socketio.listen
            ),
        ));
    }
    if c.admin.listen.parse::<SocketAddr>().is_err() {
        p.push(problem(
            "admin.listen",
            format!("`{}` is not an address like 0.0.0.0:18097", c.admin.listen),
        ));
    }
    // The same port on the same address, or on a wildcard address that
    // covers the other (0.0.0.0:18086 and 127.0.0.1:18086), cannot both bind.
    let clash = match (
        c.socketio.listen.parse::<SocketAddr>(),
        c.admin.listen.parse::<SocketAddr>(),
    ) {
        (Ok(a), Ok(b)) => {
            a.port() == b.port()
                && a.port() != 0
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        }
        _ => c.socketio.listen == c.admin.listen,
    };
    if c.mode == Mode::Server && clash {
        p.push(problem(
            "admin.listen",
            format!(
                "`{}` and socketio.listen `{}` would share a port: use another port",
                c.admin.listen, c.socketio.listen
            ),
        ));
    }
    if c.socketio.paths.is_empty() {
        p.push(problem("socketio.paths", "at least one path is needed"));
    }
    for (i, path) in c.socketio.paths.iter().enumerate() {
        if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#', ' ']) {
            p.push(problem(
                format!("socketio.paths[{i}]"),
                format!("`{path}` must be an absolute path such as /socket.io"),
            ));
        }
    }
    if c.socketio.cors_origins.is_empty() {
        p.push(problem(
            "socketio.cors_origins",
            "empty: use [\"*\"] for any origin, or list the allowed origins",
        ));
    }
    let wildcard = c.socketio.cors_origins.iter().any(|o| o == "*");
    if wildcard && c.socketio.cors_origins.len() > 1 {
        p.push(problem(
            "socketio.cors_origins",
            "\"*\" cannot be combined with explicit origins",
        ));
    }
    if wildcard && c.socketio.cors_credentials {
        p.push(problem(
            "socketio.cors_credentials",
            "credentials need an explicit list of origins, not \"*\"",
        ));
    }
    for (i, o) in c.socketio.cors_origins.iter().enumerate() {
        if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
            p.push(problem(
                format!("socketio.cors_origins[{i}]"),
                format!("`{o}` is not an origin such as http://localhost:18093"),
            ));
        }
    }
    if c.socketio.max_payload_bytes < 1024 {
        p.push(problem(
            "socketio.max_payload_bytes",
            "must be at least 1024",
        ));
    }
    if c.socketio.max_buffer_packets == 0 {
        p.push(problem("socketio.max_buffer_packets", "must be at least 1"));
    }
    if c.socketio.ping_interval.is_zero() || c.socketio.ping_timeout.is_zero() {
        p.push(problem(
            "socketio.ping_interval",
            "ping_interval and ping_timeout must be positive",
        ));
    }

    // NATS
    if c.nats.servers.is_empty() {
        p.push(problem("nats.servers", "at least one server URL is needed"));
    }
    for (i, s) in c.nats.servers.iter().enumerate() {
        // A URL is quoted without its credentials: they are secrets.
        let shown = without_credentials(s);
        let key = format!("nats.servers[{i}]");
        match s.parse::<async_nats::ServerAddr>() {
            Err(e) => p.push(problem(key, format!("`{shown}`: {e}"))),
            Ok(addr) if addr.host().is_empty() => p.push(problem(
                key,
                format!("`{shown}` names no host: write it as nats://nats-broker:4222"),
            )),
            Ok(addr) if addr.username().is_some() || addr.password().is_some() => p.push(problem(
                key,
                format!(
                    "`{shown}` carries credentials, which would be written to the log \
                         with the URL: give them as nats.user and nats.password, or \
                         nats.token, which are never logged"
                ),
            )),
            Ok(_)
                if (s.starts_with("ws://") || s.starts_with("wss://"))
                    && s.splitn(4, '/').nth(3).is_some_and(|rest| !rest.is_empty()) =>
            {
                p.push(problem(
                    key,
                    format!(
                        "`{shown}`: a websocket URL with a path is not supported by the NATS \
                         client; use the broker's internal nats:// address"
                    ),
                ))
            }
            Ok(_) => {}
        }
    }
    let auth_methods = [
        c.nats.token.is_some(),
        c.nats.user.is_some() || c.nats.password.is_some(),
        c.nats.nkey_seed.is_some(),
        c.nats.credentials_file.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if auth_methods > 1 {
        p.push(problem(
            "nats",
            "choose one of token, user/password, nkey_seed or credentials_file",
        ));
    }
    if c.nats.user.is_some() != c.nats.password.is_some() {
        p.push(problem("nats.password", "user and password go together"));
    }
    for (key, secret) in [
        ("nats.token", &c.nats.token),
        ("nats.password", &c.nats.password),
        ("nats.nkey_seed", &c.nats.nkey_seed),
        ("attach.auth_token", &c.attach.auth_token),
    ] {
        if secret
            .as_ref()
            .is_some_and(|s| s.expose().trim().is_empty())
        {
            p.push(problem(key, "is empty: remove the key instead"));
        }
    }
    if c.nats.user.as_ref().is_some_and(|u| u.trim().is_empty()) {
        p.push(problem("nats.user", "is empty: remove the key instead"));
    }
    if let Some(seed) = &c.nats.nkey_seed {
        if !seed.expose().trim().is_empty() {
            if let Some(why) = nkey_seed_problem(seed.expose()) {
                p.push(problem("nats.nkey_seed", why));
            }
        }
    }
    for (key, file) in [
        ("nats.credentials_file", &c.nats.credentials_file),
        ("nats.tls_ca_file", &c.nats.tls_ca_file),
        ("nats.tls_client_cert", &c.nats.tls_client_cert),
        ("nats.tls_client_key", &c.nats.tls_client_key),
    ] {
        let Some(f) = file else { continue };
        if !f.is_file() {
            p.push(problem(key, not_a_file(f)));
            continue;
        }
        let checked = match key {
            "nats.credentials_file" => credentials_problem(f),
            "nats.tls_client_key" => key_problem(f),
            _ => certificates_problem(f),
        };
        if let Some(why) = checked {
            p.push(problem(key, format!("file {}: {why}", f.display())));
        }
    }
    if c.nats.tls_client_cert.is_some() != c.nats.tls_client_key.is_some() {
        p.push(problem(
            "nats.tls_client_key",
            "tls_client_cert and tls_client_key go together",
        ));
    }
    if c.nats.name.trim().is_empty() {
        p.push(problem("nats.name", "must not be empty"));
    }
    if c.nats.publish_queue == 0 {
        p.push(problem("nats.publish_queue", "must be at least 1"));
    }

    if c.mode == Mode::Attach {
        if c.attach.url.is_empty() {
            p.push(problem(
                "attach.url",
                "attach mode needs the trade-feed URL",
            ));
        } else if !(c.attach.url.starts_with("http://") || c.attach.url.starts_with("https://")) {
            p.push(problem(
                "attach.url",
                format!(
                    "`{}` must start with http:// or https://",
                    without_credentials(&c.attach.url)
                ),
            ));
        } else if without_credentials(&c.attach.url) != c.attach.url {
            p.push(problem(
                "attach.url",
                format!(
                    "`{}` carries credentials, which would be written to the log with the \
                     URL: send them as a header (attach.headers, e.g. Authorization) or as \
                     attach.auth_token, which are never logged",
                    without_credentials(&c.attach.url)
                ),
            ));
        }
        if !c.attach.path.starts_with('/') {
            p.push(problem("attach.path", "must start with /"));
        }
        if c.attach.reconnect_delay_min > c.attach.reconnect_delay_max {
            p.push(problem(
                "attach.reconnect_delay_min",
                "must not exceed attach.reconnect_delay_max",
            ));
        }
        // JetStream's rule for key-value bucket names.
        if c.attach.lease
            && (c.attach.lease_bucket.is_empty()
                || !c
                    .attach
                    .lease_bucket
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            p.push(problem(
                "attach.lease_bucket",
                format!(
                    "`{}` is not a JetStream bucket name: letters, digits, - and _ only",
                    c.attach.lease_bucket
                ),
            ));
        }
        if c.attach.lease_ttl < Duration::from_secs(1) {
            p.push(problem("attach.lease_ttl", "must be at least 1s"));
        }
        if c.attach.buffer_messages == 0 {
            p.push(problem("attach.buffer_messages", "must be at least 1"));
        }
        if c.attach.max_payload_bytes < 1024 {
            p.push(problem("attach.max_payload_bytes", "must be at least 1024"));
        }
        // A standby forgets what it shadows after echo_window; it must
        // outlive a takeover (lease_ttl + lease_ttl/3) with room to spare.
        if c.attach.lease && c.attach.echo_window < c.attach.lease_ttl * 2 {
            p.push(problem(
                "attach.echo_window",
                "must be at least twice attach.lease_ttl",
            ));
        }
        for name in c.attach.legacy_consumers.keys() {
            let queue_route = c
                .routes
                .iter()
                .any(|r| &r.name == name && r.delivery == crate::route::Delivery::Queue);
            if !queue_route {
                p.push(problem(
                    format!("attach.legacy_consumers.{name}"),
                    "names no point-to-point route (delivery = \"queue\")",
                ));
            }
        }
    }

    let url = &c.console.nats_url;
    let absolute = url.starts_with("ws://") || url.starts_with("wss://");
    if !(absolute || url.starts_with('/')) || url.contains(char::is_whitespace) {
        p.push(problem(
            "console.nats_url",
            format!("`{url}` must be a path such as /nats-ws or a ws:// or wss:// URL"),
        ));
    }

    if tracing_subscriber::EnvFilter::try_new(&c.log.level).is_err() {
        p.push(problem(
            "log.level",
            format!("`{}` is not a tracing filter such as info", c.log.level),
        ));
    }

    if c.routes.is_empty() {
        p.push(problem(
            "routes",
            "no routes: nothing would be mirrored (see config/traderx.toml)",
        ));
    }
    p.extend(crate::route::validate_specs(&c.routes));
    p
}

/// `url` with any `user:password@` before its host replaced by `***@`, for
/// messages that quote a URL (also one that does not parse).
pub fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_string(),
    }
}

impl Config {
    /// Every secret the configuration holds, for the log redactor: the NATS
    /// token, password and NKey seed, the seed in the credentials file, the
    /// attach headers' values and the attach auth token.
    pub fn secrets(&self) -> Vec<String> {
        let mut out: Vec<String> = [
            &self.nats.token,
            &self.nats.password,
            &self.nats.nkey_seed,
            &self.attach.auth_token,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.expose().to_string())
        .collect();
        out.extend(self.attach.headers.values().map(|v| v.expose().to_string()));
        if let Some(path) = &self.nats.credentials_file {
            if let Ok(text) = std::fs::read_to_string(path) {
                // the user NKey seed block (the JWT is signed, not secret)
                out.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| l.starts_with("SU") && l.len() > 50)
                        .map(str::to_string),
                );
            }
        }
        // a value read from a file often ends in a newline: its trimmed form too
        let trimmed: Vec<String> = out
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|t| !out.contains(t))
            .collect();
        out.extend(trimmed);
        out.retain(|s| !s.is_empty());
        out
    }

    /// The configuration as TOML, secrets shown as `***`.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// A one-line summary safe to log (no secrets).
    pub fn summary(&self) -> String {
        let side = match self.mode {
            Mode::Server => format!(
                "socketio={} paths={:?}",
                self.socketio.listen, self.socketio.paths
            ),
            Mode::Attach => format!(
                "trade-feed={}{} lease={}",
                self.attach.url, self.attach.path, self.attach.lease
            ),
        };
        format!(
            "mode={:?} {side} admin={} nats={:?} auth={} tls={} routes={}",
            self.mode,
            self.admin.listen,
            self.nats.servers,
            crate::nats::auth_method(&self.nats),
            crate::nats::tls_wanted(&self.nats),
            self.routes.len()
        )
    }

    pub fn placeholder_default() -> Placeholder {
        Placeholder::Token
    }

    pub fn direction_default() -> Direction {
        Direction::Both
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<Config, ConfigErrors> {
        let fig = Figment::new().merge(Toml::string(toml));
        from_figment(&fig)
    }

    const ROUTE: &str = r#"
[[routes]]
name = "orders"
topic = "/trades"
subject = "trades.new"
type = "TradeOrder"
"#;

    #[test]
    fn minimal_config_loads() {
        let c = load_str(ROUTE).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.socketio.listen, "0.0.0.0:18086");
        assert_eq!(c.socketio.max_payload_bytes, 1_000_000);
    }

    #[test]
    fn unknown_keys_are_all_reported_with_paths() {
        let err = load_str(&format!(
            "colour = 1\n[socketio]\nlisten = \"0.0.0.0:1\"\nlisen = 2\n[nats]\nserver = \"x\"\n{ROUTE}\nprio = 3\n"
        ))
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"colour"), "{keys:?}");
        assert!(keys.contains(&"socketio.lisen"), "{keys:?}");
        assert!(keys.contains(&"nats.server"), "{keys:?}");
        assert!(keys.contains(&"routes[0].prio"), "{keys:?}");
    }

    #[test]
    fn several_semantic_problems_are_reported_together() {
        let err = load_str(&format!(
            "[socketio]\nlisten = \"nope\"\ncors_origins = [\"*\"]\ncors_credentials = true\n[nats]\nservers = []\n{ROUTE}"
        ))
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"socketio.listen"), "{keys:?}");
        assert!(keys.contains(&"socketio.cors_credentials"), "{keys:?}");
        assert!(keys.contains(&"nats.servers"), "{keys:?}");
    }

    #[test]
    fn type_errors_name_their_key() {
        let err =
            load_str(&format!("[socketio]\nmax_payload_bytes = \"big\"\n{ROUTE}")).unwrap_err();
        assert!(
            err.0.iter().any(|p| p.key == "socketio.max_payload_bytes"),
            "{err}"
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let c = load_str(&format!("[nats]\ntoken = \"hunter2\"\n{ROUTE}")).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"));
        assert!(!c.summary().contains("hunter2"));
        assert_eq!(c.nats.token.unwrap().expose(), "hunter2");
    }

    #[test]
    fn console_nats_url_must_be_a_path_or_websocket_url() {
        for good in [
            "/nats-ws",
            "ws://127.0.0.1:8081",
            "wss://traderx.example/nats-ws",
        ] {
            let c = load_str(&format!("[console]\nnats_url = \"{good}\"\n{ROUTE}")).unwrap();
            assert_eq!(c.console.nats_url, good);
        }
        for bad in ["nats-ws", "http://host/nats-ws", "nats://host:4222"] {
            let err = load_str(&format!("[console]\nnats_url = \"{bad}\"\n{ROUTE}")).unwrap_err();
            assert!(
                err.0.iter().any(|p| p.key == "console.nats_url"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn attach_settings_are_checked() {
        let err = load_str(&format!(
            "mode = \"attach\"\n[attach]\nurl = \"trade-feed:18086\"\nbuffer_messages = 0\n\
             lease_ttl = \"10s\"\necho_window = \"15s\"\ntransport = \"carrier-pigeon\"\n{ROUTE}"
        ))
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"attach.transport"), "{err}");
        let err = load_str(&format!(
            "mode = \"attach\"\n[attach]\nurl = \"trade-feed:18086\"\nbuffer_messages = 0\n\
             lease_ttl = \"10s\"\necho_window = \"15s\"\n\
             legacy_consumers = {{ orders = false, nope = true }}\n{ROUTE}"
        ))
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "attach.url",
            "attach.buffer_messages",
            "attach.echo_window",
            "attach.legacy_consumers.orders",
            "attach.legacy_consumers.nope",
        ] {
            assert!(keys.contains(&key), "{key}: {err}");
        }
        let ok = load_str(&format!(
            "mode = \"attach\"\n[attach]\nurl = \"http://trade-feed:18086\"\n\
             transport = \"polling\"\n{ROUTE}"
        ))
        .unwrap();
        assert_eq!(ok.attach.transport, AttachTransport::Polling);
    }

    #[test]
    fn websocket_url_with_path_is_refused() {
        let err = load_str(&format!(
            "[nats]\nservers = [\"ws://ingress:8080/nats-ws\"]\n{ROUTE}"
        ))
        .unwrap_err();
        assert!(err.0.iter().any(|p| p.key == "nats.servers[0]"), "{err}");
    }
}
