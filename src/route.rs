//! The route table: legacy topic templates <-> NATS subject templates.
//!
//! A template is literal text with named placeholders, `{accountId}`. A
//! placeholder captures a non-empty run of characters from its class, and every
//! class is a subset of `[A-Za-z0-9_-]`, so a captured value can never carry a
//! `.`, `*`, `>`, `/` or whitespace into the other side. Matching is greedy and
//! unambiguous because validation requires the literal after a placeholder to
//! start with a character outside its class.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::Problem;

/// Most placeholders one template may hold.
pub const MAX_PLACEHOLDERS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Both,
    ToNats,
    ToSocketio,
}

impl Direction {
    pub fn to_nats(self) -> bool {
        matches!(self, Direction::Both | Direction::ToNats)
    }
    pub fn to_socketio(self) -> bool {
        matches!(self, Direction::Both | Direction::ToSocketio)
    }
}

/// How a route's messages reach NATS subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Every subscriber on both sides gets every message.
    #[default]
    Broadcast,
    /// Point-to-point: each message goes to exactly one consumer, legacy or
    /// NATS (`queue_group` names the NATS queue group), whatever mix of
    /// producers and consumers is connected, while at least one consumer
    /// exists and consumers leave by draining. Nothing is stored: a message
    /// published when no consumer exists anywhere is not delivered (the
    /// bridge counts a legacy one as undeliverable; the NATS server answers a
    /// NATS producer's reply subject with "no responders"). See
    /// `server::run_queue_member` and `attach::run_queue_member`.
    Queue,
}

/// The characters a placeholder may capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placeholder {
    /// Letters, digits, `_` and `-`.
    #[default]
    Token,
    /// Letters and digits.
    Alphanumeric,
    /// Digits only.
    Digits,
}

impl Placeholder {
    #[inline]
    pub fn accepts(self, b: u8) -> bool {
        match self {
            Placeholder::Token => b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
            Placeholder::Alphanumeric => b.is_ascii_alphanumeric(),
            Placeholder::Digits => b.is_ascii_digit(),
        }
    }
}

/// One route as written in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RouteSpec {
    pub name: String,
    /// Legacy Socket.IO topic template, e.g. `/accounts/{accountId}/positions`.
    pub topic: String,
    /// NATS subject template, e.g. `positions.account.{accountId}.updated`.
    pub subject: String,
    #[serde(default)]
    pub direction: Direction,
    /// Envelope `type` given to bare NATS payloads on their way to Socket.IO.
    #[serde(rename = "type", default)]
    pub envelope_type: Option<String>,
    /// Narrower classes for named placeholders (default `token`).
    #[serde(default)]
    pub placeholders: BTreeMap<String, Placeholder>,
    #[serde(default)]
    pub delivery: Delivery,
    /// NATS queue group for `delivery = "queue"`.
    #[serde(default)]
    pub queue_group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Var { slot: usize, class: Placeholder },
}

/// A parsed template. Slots are numbered by the order of placeholder names
/// in the route's topic template, so both sides of a route agree on them.
#[derive(Debug, Clone)]
pub struct Template {
    segs: Vec<Seg>,
    source: String,
}

/// Byte ranges of the captured values in the matched string, by slot.
pub type Captures = [(u32, u32); MAX_PLACEHOLDERS];

impl Template {
    /// Parses `text`, assigning slots from `names` (appending unseen names).
    fn parse(
        text: &str,
        names: &mut Vec<String>,
        classes: &BTreeMap<String, Placeholder>,
    ) -> Result<Template, String> {
        let mut segs = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("`}}` without `{{` in `{text}`"));
            }
            lit.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{text}`"))?;
            let name = &after[..close];
            if name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                || name.as_bytes()[0].is_ascii_digit()
            {
                return Err(format!(
                    "`{{{name}}}` in `{text}`: placeholder names are letters, digits and _"
                ));
            }
            if !lit.is_empty() {
                segs.push(Seg::Lit(std::mem::take(&mut lit)));
            } else if matches!(segs.last(), Some(Seg::Var { .. })) {
                return Err(format!(
                    "`{text}`: two placeholders must be separated by literal text"
                ));
            }
            let slot = match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    names.push(name.to_string());
                    names.len() - 1
                }
            };
            if segs
                .iter()
                .any(|s| matches!(s, Seg::Var { slot: s2, .. } if *s2 == slot))
            {
                return Err(format!("`{text}`: placeholder `{name}` appears twice"));
            }
            let class = classes.get(name).copied().unwrap_or_default();
            segs.push(Seg::Var { slot, class });
            rest = &after[close + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            segs.push(Seg::Lit(lit));
        }
        if names.len() > MAX_PLACEHOLDERS {
            return Err(format!("`{text}`: at most {MAX_PLACEHOLDERS} placeholders"));
        }
        // Greedy capture must stop exactly where the next literal begins.
        for pair in segs.windows(2) {
            if let [Seg::Var { class, .. }, Seg::Lit(next)] = pair {
                if class.accepts(next.as_bytes()[0]) {
                    return Err(format!(
                        "`{text}`: the text after a placeholder must start with a character \
                         the placeholder cannot contain (found `{}`)",
                        next.chars().next().unwrap_or(' ')
                    ));
                }
            }
        }
        Ok(Template {
            segs,
            source: text.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_literal(&self) -> bool {
        self.segs.iter().all(|s| matches!(s, Seg::Lit(_)))
    }

    fn var_names<'a>(&self, names: &'a [String]) -> BTreeSet<&'a str> {
        self.segs
            .iter()
            .filter_map(|s| match s {
                Seg::Var { slot, .. } => Some(names[*slot].as_str()),
                Seg::Lit(_) => None,
            })
            .collect()
    }

    /// Matches the whole of `input`, filling `caps`.
    #[inline]
    pub fn matches(&self, input: &str, caps: &mut Captures) -> bool {
        let bytes = input.as_bytes();
        let mut pos = 0usize;
        for seg in &self.segs {
            match seg {
                Seg::Lit(lit) => {
                    if !bytes[pos..].starts_with(lit.as_bytes()) {
                        return false;
                    }
                    pos += lit.len();
                }
                Seg::Var { slot, class } => {
                    let start = pos;
                    while pos < bytes.len() && class.accepts(bytes[pos]) {
                        pos += 1;
                    }
                    if pos == start {
                        return false;
                    }
                    caps[*slot] = (start as u32, pos as u32);
                }
            }
        }
        pos == bytes.len()
    }

    /// Writes the template with captured values taken from `src`.
    #[inline]
    pub fn render(&self, src: &str, caps: &Captures) -> String {
        let mut out = String::with_capacity(self.source.len() + 16);
        for seg in &self.segs {
            match seg {
                Seg::Lit(lit) => out.push_str(lit),
                Seg::Var { slot, .. } => {
                    let (a, b) = caps[*slot];
                    out.push_str(&src[a as usize..b as usize]);
                }
            }
        }
        out
    }

    /// Whether the template, with values taken from `src`, reads `expected`
    /// (`render` without building the string).
    #[inline]
    fn renders_as(&self, src: &str, caps: &Captures, expected: &str) -> bool {
        let mut rest = expected;
        for seg in &self.segs {
            let piece = match seg {
                Seg::Lit(lit) => lit.as_str(),
                Seg::Var { slot, .. } => {
                    let (a, b) = caps[*slot];
                    &src[a as usize..b as usize]
                }
            };
            match rest.strip_prefix(piece) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        rest.is_empty()
    }

    /// The NATS subscription that covers every subject this template makes:
    /// each token holding a placeholder becomes `*`.
    pub fn subscription(&self) -> String {
        let mut rendered = String::new();
        for seg in &self.segs {
            match seg {
                Seg::Lit(l) => rendered.push_str(l),
                Seg::Var { .. } => rendered.push('\u{0}'),
            }
        }
        let mut out = String::new();
        for (i, token) in rendered.split('.').enumerate() {
            if i > 0 {
                out.push('.');
            }
            if token.contains('\u{0}') {
                out.push('*');
            } else {
                out.push_str(token);
            }
        }
        out
    }
}

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub index: usize,
    pub name: String,
    pub topic: Template,
    pub subject: Template,
    pub direction: Direction,
    /// `type` for bare payloads, already JSON-encoded (`"Position"`).
    pub envelope_type_json: String,
    pub delivery: Delivery,
    pub queue_group: Option<String>,
    pub names: Vec<String>,
}

impl Route {
    /// The legacy topic for a subject this route's subject template matched.
    fn topic_of(&self, subject: &str, caps: &Captures) -> Mapped {
        Mapped {
            route: self.index,
            target: self.topic.render(subject, caps),
        }
    }

    pub fn compile(index: usize, spec: &RouteSpec) -> Result<Route, Vec<Problem>> {
        let key = |field: &str| format!("routes[{index}].{field}");
        let mut problems = Vec::new();
        let mut names = Vec::new();
        let topic = Template::parse(&spec.topic, &mut names, &spec.placeholders)
            .map_err(|m| {
                problems.push(Problem {
                    key: key("topic"),
                    message: m,
                })
            })
            .ok();
        let mut subject_names = names.clone();
        let subject = Template::parse(&spec.subject, &mut subject_names, &spec.placeholders)
            .map_err(|m| {
                problems.push(Problem {
                    key: key("subject"),
                    message: m,
                })
            })
            .ok();
        if let (Some(t), Some(s)) = (&topic, &subject) {
            let tn = t.var_names(&subject_names);
            let sn = s.var_names(&subject_names);
            if tn != sn {
                problems.push(Problem {
                    key: key("subject"),
                    message: format!(
                        "placeholders differ between topic {:?} and subject {:?}",
                        tn, sn
                    ),
                });
            }
            if let Err(m) = check_subject_template(s) {
                problems.push(Problem {
                    key: key("subject"),
                    message: m,
                });
            }
        }
        for name in spec.placeholders.keys() {
            if !subject_names.contains(name) {
                problems.push(Problem {
                    key: key(&format!("placeholders.{name}")),
                    message: "no such placeholder in the templates".into(),
                });
            }
        }
        if spec.name.trim().is_empty() {
            problems.push(Problem {
                key: key("name"),
                message: "must not be empty".into(),
            });
        }
        let envelope_type = spec.envelope_type.clone().unwrap_or_default();
        if spec.direction.to_socketio() && envelope_type.is_empty() {
            problems.push(Problem {
                key: key("type"),
                message: "routes that deliver to Socket.IO need the envelope type for bare \
                          NATS payloads (e.g. \"Position\")"
                    .into(),
            });
        }
        match (spec.delivery, &spec.queue_group) {
            (Delivery::Queue, None) => problems.push(Problem {
                key: key("queue_group"),
                message: "delivery = \"queue\" needs a queue_group".into(),
            }),
            (Delivery::Queue, Some(g)) if !is_subject_token(g) => problems.push(Problem {
                key: key("queue_group"),
                message: format!("`{g}` is not a valid queue group name"),
            }),
            (Delivery::Broadcast, Some(_)) => problems.push(Problem {
                key: key("queue_group"),
                message: "queue_group only applies to delivery = \"queue\"".into(),
            }),
            _ => {}
        }
        if spec.delivery == Delivery::Queue && topic.as_ref().is_some_and(|t| !t.is_literal()) {
            problems.push(Problem {
                key: key("delivery"),
                message: "queue delivery needs a literal topic (no placeholders)".into(),
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Route {
            index,
            name: spec.name.clone(),
            topic: topic.expect("checked"),
            subject: subject.expect("checked"),
            direction: spec.direction,
            envelope_type_json: serde_json::to_string(&envelope_type).expect("string"),
            delivery: spec.delivery,
            queue_group: spec.queue_group.clone(),
            names: subject_names,
        })
    }
}

fn is_subject_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'.' && b != b'*' && b != b'>')
}

/// A subject template must render to a valid publish subject for any capture.
fn check_subject_template(t: &Template) -> Result<(), String> {
    let sample = {
        let mut caps: Captures = [(0, 0); MAX_PLACEHOLDERS];
        caps.iter_mut().for_each(|c| *c = (0, 1));
        t.render("x", &caps)
    };
    if sample.is_empty() {
        return Err("empty subject".into());
    }
    for token in sample.split('.') {
        if token.is_empty() {
            return Err(format!("`{}` has an empty token", t.as_str()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "`{}` contains whitespace or non-ASCII characters",
                t.as_str()
            ));
        }
        if token.contains(['*', '>']) {
            return Err(format!(
                "`{}`: wildcards are for subscribing; a route's subject must be publishable",
                t.as_str()
            ));
        }
    }
    Ok(())
}

/// Checks every route spec, returning every problem found.
pub fn validate_specs(specs: &[RouteSpec]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for (i, spec) in specs.iter().enumerate() {
        if !names.insert(spec.name.as_str()) {
            problems.push(Problem {
                key: format!("routes[{i}].name"),
                message: format!("`{}` is used by an earlier route", spec.name),
            });
        }
        if let Err(p) = Route::compile(i, spec) {
            problems.extend(p);
        }
    }
    problems
}

/// A legacy topic mapped to a subject, or the reverse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub route: usize,
    pub target: String,
}

/// The ordered route table. In each direction the first route that matches wins.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn compile(specs: &[RouteSpec]) -> Result<RouteTable, Vec<Problem>> {
        let problems = validate_specs(specs);
        if !problems.is_empty() {
            return Err(problems);
        }
        let routes = specs
            .iter()
            .enumerate()
            .map(|(i, s)| Route::compile(i, s).expect("validated"))
            .collect();
        Ok(RouteTable { routes })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn get(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// The subject for a legacy topic, for routes that carry legacy traffic to NATS.
    #[inline]
    pub fn to_subject(&self, topic: &str) -> Option<Mapped> {
        let mut caps: Captures = [(0, 0); MAX_PLACEHOLDERS];
        self.routes
            .iter()
            .filter(|r| r.direction.to_nats())
            .find(|r| r.topic.matches(topic, &mut caps))
            .map(|r| Mapped {
                route: r.index,
                target: r.subject.render(topic, &caps),
            })
    }

    /// The legacy topic for a subject, for routes that carry NATS traffic to Socket.IO.
    #[inline]
    pub fn to_topic(&self, subject: &str) -> Option<Mapped> {
        self.by_subject(subject, Direction::to_socketio)
            .map(|(r, caps)| r.topic_of(subject, &caps))
    }

    /// The legacy topic of a bridge's mirror on `subject`, read back from the
    /// subject alone: through the first route that carries legacy traffic to
    /// NATS and whose subject template matches. Where two such routes map
    /// different topics to one subject this cannot tell them apart; a mirror
    /// whose topic does not read back (`mirrors_back`) carries it in a header.
    pub fn mirrored_topic(&self, subject: &str) -> Option<Mapped> {
        self.by_subject(subject, Direction::to_nats)
            .map(|(r, caps)| r.topic_of(subject, &caps))
    }

    /// Whether `mirrored_topic(subject)` is `topic`, without building it.
    #[inline]
    pub fn mirrors_back(&self, subject: &str, topic: &str) -> bool {
        self.by_subject(subject, Direction::to_nats)
            .is_some_and(|(r, caps)| r.topic.renders_as(subject, &caps, topic))
    }

    /// The first route carrying traffic in the direction `carries` tells
    /// whose subject template matches `subject`, with what it captured.
    #[inline]
    fn by_subject(
        &self,
        subject: &str,
        carries: fn(Direction) -> bool,
    ) -> Option<(&Route, Captures)> {
        let mut caps: Captures = [(0, 0); MAX_PLACEHOLDERS];
        self.routes
            .iter()
            .filter(|r| carries(r.direction))
            .find(|r| r.subject.matches(subject, &mut caps))
            .map(|r| (r, caps))
    }

    /// The route whose topic template matches, in any direction.
    pub fn route_for_topic(&self, topic: &str) -> Option<&Route> {
        let mut caps: Captures = [(0, 0); MAX_PLACEHOLDERS];
        self.routes
            .iter()
            .find(|r| r.topic.matches(topic, &mut caps))
    }

    /// The distinct NATS subscriptions needed for the NATS -> Socket.IO
    /// direction, each with the routes it serves (a message is delivered by
    /// the subscription of the first route that matches it, never twice).
    pub fn subscriptions(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        for r in self
            .routes
            .iter()
            .filter(|r| r.direction.to_socketio() && r.delivery == Delivery::Broadcast)
        {
            let pattern = r.subject.subscription();
            match out.iter_mut().find(|(p, _)| *p == pattern) {
                Some((_, list)) => list.push(r.index),
                None => out.push((pattern, vec![r.index])),
            }
        }
        out
    }

    /// Point-to-point routes: the bridge competes in their queue group on
    /// behalf of its legacy consumers.
    pub fn queue_routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().filter(|r| r.delivery == Delivery::Queue)
    }

    /// Describes the table for logs, one route per line.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for r in &self.routes {
            let _ = writeln!(
                s,
                "{} {} <-> {} ({:?}, {:?})",
                r.name,
                r.topic.as_str(),
                r.subject.as_str(),
                r.direction,
                r.delivery
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(topic: &str, subject: &str) -> RouteSpec {
        RouteSpec {
            name: format!("{topic}->{subject}"),
            topic: topic.into(),
            subject: subject.into(),
            direction: Direction::Both,
            envelope_type: Some("Position".into()),
            placeholders: BTreeMap::new(),
            delivery: Delivery::Broadcast,
            queue_group: None,
        }
    }

    fn traderx() -> RouteTable {
        let mut positions = spec(
            "/accounts/{accountId}/positions",
            "positions.account.{accountId}.updated",
        );
        positions
            .placeholders
            .insert("accountId".into(), Placeholder::Digits);
        RouteTable::compile(&[
            spec("/trades", "trades.new"),
            spec(
                "/accounts/{accountId}/trades",
                "trades.account.{accountId}.updated",
            ),
            positions,
        ])
        .unwrap()
    }

    #[test]
    fn topic_to_subject_table() {
        let t = traderx();
        let cases: &[(&str, Option<&str>)] = &[
            ("/trades", Some("trades.new")),
            (
                "/accounts/22214/trades",
                Some("trades.account.22214.updated"),
            ),
            (
                "/accounts/22214/positions",
                Some("positions.account.22214.updated"),
            ),
            (
                "/accounts/ACME-1_x/trades",
                Some("trades.account.ACME-1_x.updated"),
            ),
            // digits only for positions
            ("/accounts/abc/positions", None),
            // unsafe captures: never produce a subject
            ("/accounts/*/trades", None),
            ("/accounts/>/trades", None),
            ("/accounts/22.23/trades", None),
            ("/accounts/22 23/trades", None),
            ("/accounts/22\t/trades", None),
            ("/accounts//trades", None),
            ("/accounts/22/23/trades", None),
            ("/accounts/é/trades", None),
            ("/accounts/22/trades/", None),
            ("/trades/", None),
            ("/*", None),
            ("", None),
            ("/TRADES", None),
        ];
        for (topic, want) in cases {
            let got = t.to_subject(topic).map(|m| m.target);
            assert_eq!(got.as_deref(), *want, "topic {topic:?}");
        }
    }

    #[test]
    fn subject_to_topic_table() {
        let t = traderx();
        let cases: &[(&str, Option<&str>)] = &[
            ("trades.new", Some("/trades")),
            (
                "trades.account.22214.updated",
                Some("/accounts/22214/trades"),
            ),
            (
                "positions.account.22214.updated",
                Some("/accounts/22214/positions"),
            ),
            ("positions.account.x1.updated", None),
            ("trades.account.a/b.updated", None),
            ("trades.account.22214.created", None),
            ("trades.processed", None),
            ("trades.account..updated", None),
        ];
        for (subject, want) in cases {
            let got = t.to_topic(subject).map(|m| m.target);
            assert_eq!(got.as_deref(), *want, "subject {subject:?}");
        }
    }

    #[test]
    fn round_trip_is_identity() {
        let t = traderx();
        for topic in ["/trades", "/accounts/1/trades", "/accounts/52355/positions"] {
            let s = t.to_subject(topic).unwrap();
            let back = t.to_topic(&s.target).unwrap();
            assert_eq!(back.target, topic);
            assert_eq!(back.route, s.route);
        }
    }

    #[test]
    fn a_mirror_reads_back_its_topic_unless_two_routes_share_the_subject() {
        let t = traderx();
        for topic in ["/trades", "/accounts/1/trades", "/accounts/52355/positions"] {
            let s = t.to_subject(topic).unwrap().target;
            assert!(t.mirrors_back(&s, topic), "{topic}");
            assert_eq!(t.mirrored_topic(&s).unwrap().target, topic);
        }
        assert!(!t.mirrors_back("positions.account.1.updated", "/accounts/2/positions"));
        assert!(!t.mirrors_back("positions.account.1.updated", "/accounts/1/position"));
        assert!(!t.mirrors_back("positions.account.1.updated", "/accounts/1/positionss"));
        assert!(!t.mirrors_back("nothing.here", "/trades"));

        // Two legacy topics on one subject: only the first reads back.
        let shared = RouteTable::compile(&[
            spec("/desk/{id}/orders", "orders.{id}"),
            spec("/legacy/{id}/orders", "orders.{id}"),
        ])
        .unwrap();
        assert!(shared.mirrors_back("orders.7", "/desk/7/orders"));
        assert!(!shared.mirrors_back("orders.7", "/legacy/7/orders"));
        assert_eq!(
            shared.mirrored_topic("orders.7").unwrap().target,
            "/desk/7/orders"
        );
    }

    #[test]
    fn verbatim_profile_subscribes_single_token_wildcard() {
        let t = RouteTable::compile(&[
            spec("/trades", "/trades"),
            spec(
                "/accounts/{accountId}/positions",
                "/accounts/{accountId}/positions",
            ),
        ])
        .unwrap();
        assert_eq!(
            t.to_subject("/accounts/7/positions").unwrap().target,
            "/accounts/7/positions"
        );
        let subs = t.subscriptions();
        assert_eq!(
            subs,
            vec![("/trades".into(), vec![0]), ("*".into(), vec![1])]
        );
        assert_eq!(t.to_topic("/accounts/x.y/positions"), None);
    }

    #[test]
    fn subscriptions_use_token_wildcards() {
        let t = traderx();
        let subs: Vec<String> = t.subscriptions().into_iter().map(|s| s.0).collect();
        assert_eq!(
            subs,
            vec![
                "trades.new",
                "trades.account.*.updated",
                "positions.account.*.updated"
            ]
        );
    }

    #[test]
    fn first_route_wins_and_direction_filters() {
        let mut a = spec("/x/{id}", "a.{id}");
        a.direction = Direction::ToSocketio;
        let b = spec("/x/{id}", "b.{id}");
        let t = RouteTable::compile(&[a, b]).unwrap();
        assert_eq!(t.to_subject("/x/1").unwrap().target, "b.1");
        assert_eq!(t.to_topic("a.1").unwrap().route, 0);
        assert_eq!(t.to_topic("b.1").unwrap().route, 1);
    }

    #[test]
    fn invalid_templates_are_refused() {
        let bad: &[(&str, &str, &str)] = &[
            ("/a/{id", "a.{id}", "topic"),
            ("/a/id}", "a.{id}", "topic"),
            ("/a/{}", "a.x", "topic"),
            ("/a/{id}{x}", "a.{id}.{x}", "topic"),
            ("/a/{id}", "a.{other}", "subject"),
            ("/a/{id}", "a.*", "subject"),
            ("/a/{id}", "a.>.{id}", "subject"),
            ("/a/{id}", "a..{id}", "subject"),
            ("/a/{id}", "a b.{id}", "subject"),
            ("/a/{id}-x", "a.{id}", "topic"),
            ("/a/{id}/{id}", "a.{id}", "topic"),
        ];
        for (topic, subject, field) in bad {
            let errs = RouteTable::compile(&[spec(topic, subject)]).unwrap_err();
            assert!(
                errs.iter().any(|p| p.key.ends_with(field)),
                "{topic} / {subject}: {errs:?}"
            );
        }
    }

    #[test]
    fn queue_routes_need_a_group_and_literal_topic() {
        let mut s = spec("/trades", "trades.new");
        s.delivery = Delivery::Queue;
        assert!(RouteTable::compile(std::slice::from_ref(&s)).is_err());
        s.queue_group = Some("trade-processor".into());
        assert!(RouteTable::compile(std::slice::from_ref(&s)).is_ok());
        let mut p = spec("/a/{id}", "a.{id}");
        p.delivery = Delivery::Queue;
        p.queue_group = Some("g".into());
        assert!(RouteTable::compile(&[p]).is_err());
    }

    #[test]
    fn duplicate_names_and_unknown_placeholders_are_refused() {
        let mut a = spec("/a", "a");
        a.name = "same".into();
        let mut b = spec("/b/{id}", "b.{id}");
        b.name = "same".into();
        b.placeholders.insert("nope".into(), Placeholder::Digits);
        let errs = RouteTable::compile(&[a, b]).unwrap_err();
        assert!(errs.iter().any(|p| p.key == "routes[1].name"), "{errs:?}");
        assert!(
            errs.iter().any(|p| p.key == "routes[1].placeholders.nope"),
            "{errs:?}"
        );
    }
}
