//! Parsed formats: YAML (compose, Kubernetes), JSON (package.json) and XML
//! (pom.xml, .csproj), where the structure says what a mention means. A file
//! that does not parse is reported (a warning) and scanned line by line.

use std::collections::BTreeSet;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::{legacy_pattern, lines, quote, socketio_pattern, Hit, Severity, LEGACY_PORT};

/// Keeps one finding per line and severity (a key and its value on one
/// line are one artifact).
fn dedup(mut hits: Vec<Hit>) -> Vec<Hit> {
    let mut seen = BTreeSet::new();
    hits.retain(|h| seen.insert((h.line, h.severity)));
    hits
}

fn unparsable(format: &str, line: usize, why: String, text: &str) -> Vec<Hit> {
    let mut hits = vec![Hit::warning(
        line.max(1),
        format!("cannot parse {format} ({why}); scanned line by line"),
    )];
    hits.extend(lines::text(text));
    hits
}

// ------------------------------------------------------------------ YAML

/// A YAML node with the line it starts on.
#[derive(Debug)]
struct Node {
    line: usize,
    value: Yaml,
}

#[derive(Debug)]
enum Yaml {
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    Alias,
}

impl Node {
    fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Yaml::Map(m) => m
                .iter()
                .find(|(k, _)| k.scalar() == Some(key))
                .map(|e| &e.1),
            _ => None,
        }
    }

    fn scalar(&self) -> Option<&str> {
        match &self.value {
            Yaml::Scalar(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    /// Open collections, with a mapping's key waiting for its value.
    stack: Vec<(Node, Option<Node>)>,
}

impl Builder {
    fn add(&mut self, n: Node) {
        let Some((parent, key)) = self.stack.last_mut() else {
            self.docs.push(n);
            return;
        };
        match &mut parent.value {
            Yaml::Seq(items) => items.push(n),
            Yaml::Map(entries) => match key.take() {
                None => *key = Some(n),
                Some(k) => entries.push((k, n)),
            },
            _ => {}
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(s, ..) => self.add(Node {
                line,
                value: Yaml::Scalar(s),
            }),
            Event::Alias(_) => self.add(Node {
                line,
                value: Yaml::Alias,
            }),
            Event::SequenceStart(..) => self.stack.push((
                Node {
                    line,
                    value: Yaml::Seq(Vec::new()),
                },
                None,
            )),
            Event::MappingStart(..) => self.stack.push((
                Node {
                    line,
                    value: Yaml::Map(Vec::new()),
                },
                None,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((n, _)) = self.stack.pop() {
                    self.add(n);
                }
            }
            _ => {}
        }
    }
}

/// Keys whose values are ports.
const PORT_KEYS: &[&str] = &[
    "ports",
    "port",
    "containerPort",
    "targetPort",
    "hostPort",
    "number",
];

/// Visits every scalar, keys included, with its path (`a.b[0].c`) and the
/// last key above it.
fn walk(n: &Node, path: &str, key: &str, f: &mut dyn FnMut(&str, &str, &str, usize)) {
    match &n.value {
        Yaml::Scalar(s) => f(path, key, s, n.line),
        Yaml::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, &format!("{path}[{i}]"), key, f);
            }
        }
        Yaml::Map(entries) => {
            for (k, v) in entries {
                let name = k.scalar().unwrap_or("?");
                let sub = if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                };
                walk(k, &sub, name, f);
                walk(v, &sub, name, f);
            }
        }
        Yaml::Alias => {}
    }
}

/// Findings common to every YAML document: names and trade-feed's port.
fn scalar_hits(context: &str, path: &str, key: &str, value: &str, line: usize) -> Option<Hit> {
    if legacy_pattern().is_match(value) {
        return Some(Hit::error(
            line,
            format!("{context}`{path}` refers to trade-feed: {}", quote(value)),
        ));
    }
    let port = value == LEGACY_PORT || value.contains(&format!(":{LEGACY_PORT}"));
    if port && PORT_KEYS.contains(&key) {
        return Some(Hit::error(
            line,
            format!("{context}`{path}` publishes trade-feed's port {LEGACY_PORT}"),
        ));
    }
    None
}

pub fn yaml(text: &str) -> Vec<Hit> {
    let mut b = Builder::default();
    if let Err(e) = Parser::new_from_str(text).load(&mut b, true) {
        return unparsable("YAML", e.marker().line(), e.to_string(), text);
    }
    let mut hits = Vec::new();
    for doc in &b.docs {
        if doc
            .get("services")
            .is_some_and(|s| matches!(s.value, Yaml::Map(_)))
        {
            compose(doc, &mut hits);
        } else if let (Some(kind), Some(_)) = (
            doc.get("kind").and_then(Node::scalar),
            doc.get("apiVersion"),
        ) {
            kubernetes(doc, kind, &mut hits);
        } else {
            walk(doc, "", "", &mut |p, k, v, l| {
                hits.extend(scalar_hits("", p, k, v, l));
            });
        }
    }
    dedup(hits)
}

fn compose(doc: &Node, hits: &mut Vec<Hit>) {
    let Yaml::Map(top) = &doc.value else { return };
    for (k, v) in top {
        let section = k.scalar().unwrap_or("?");
        if section != "services" {
            walk(v, section, section, &mut |p, k, v, l| {
                hits.extend(scalar_hits("compose ", p, k, v, l));
            });
            continue;
        }
        let Yaml::Map(services) = &v.value else {
            continue;
        };
        for (name_node, service) in services {
            let name = name_node.scalar().unwrap_or("?");
            if legacy_pattern().is_match(name) {
                // One finding for the service, not one per line of it.
                hits.push(Hit::error(
                    name_node.line,
                    format!("compose service `{name}` deploys trade-feed or the bridge"),
                ));
                continue;
            }
            let context = format!("compose service `{name}`: ");
            walk(service, "", "", &mut |p, k, v, l| {
                hits.extend(scalar_hits(&context, p, k, v, l));
            });
        }
    }
}

fn kubernetes(doc: &Node, kind: &str, hits: &mut Vec<Hit>) {
    let name_node = doc.get("metadata").and_then(|m| m.get("name"));
    let name = name_node.and_then(Node::scalar).unwrap_or("?");
    if legacy_pattern().is_match(name) {
        hits.push(Hit::error(
            name_node.map_or(doc.line, |n| n.line),
            format!("Kubernetes {kind} `{name}` deploys or routes to trade-feed or the bridge"),
        ));
        return;
    }
    let context = format!("Kubernetes {kind} `{name}`: ");
    walk(doc, "", "", &mut |p, k, v, l| {
        if k == "path" && (v.starts_with("/socket.io") || v.starts_with("/trade-feed")) {
            hits.push(Hit::error(
                l,
                format!(
                    "{context}`{p}` routes {}, which only trade-feed or the bridge serves",
                    quote(v)
                ),
            ));
        } else {
            hits.extend(scalar_hits(&context, p, k, v, l));
        }
    });
}

// ------------------------------------------------------------------ JSON

const NPM_DEPENDENCIES: &[&str] = &[
    "dependencies",
    "devDependencies",
    "peerDependencies",
    "optionalDependencies",
];

/// The first line holding `needle` as a JSON string (1 when not found).
fn json_line(text: &str, needle: &str) -> usize {
    let quoted = serde_json::to_string(needle).unwrap_or_default();
    text.lines()
        .position(|l| l.contains(&quoted))
        .map_or(1, |i| i + 1)
}

pub fn json(text: &str, package: bool) -> Vec<Hit> {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return unparsable("JSON", e.line(), e.to_string(), text),
    };
    let mut hits = Vec::new();
    if package {
        npm_package(text, &v, &mut hits);
    }
    json_walk(&v, "", &mut |path, s| {
        let npm_entry = package
            && (path == "name"
                || NPM_DEPENDENCIES
                    .iter()
                    .any(|d| path.starts_with(&format!("{d}."))));
        if !npm_entry && legacy_pattern().is_match(s) {
            hits.push(Hit::error(
                json_line(text, s),
                format!("`{path}` refers to trade-feed: {}", quote(s)),
            ));
        }
    });
    dedup(hits)
}

fn npm_package(text: &str, v: &serde_json::Value, hits: &mut Vec<Hit>) {
    if let Some(name) = v.get("name").and_then(|n| n.as_str()) {
        if legacy_pattern().is_match(name) {
            hits.push(Hit::error(
                json_line(text, name),
                format!("package `{name}` is trade-feed or the bridge"),
            ));
        }
    }
    for section in NPM_DEPENDENCIES {
        let Some(deps) = v.get(*section).and_then(|d| d.as_object()) else {
            continue;
        };
        for (dep, version) in deps {
            let version = version.as_str().unwrap_or_default();
            let line = json_line(text, dep);
            if legacy_pattern().is_match(dep) || legacy_pattern().is_match(version) {
                hits.push(Hit::error(
                    line,
                    format!(
                        "{section} still include trade-feed: `{dep}` {}",
                        quote(version)
                    ),
                ));
            } else if socketio_pattern().is_match(dep) {
                hits.push(Hit::warning(
                    line,
                    format!(
                        "Socket.IO client library still declared in {section}: `{dep}` {}",
                        quote(version)
                    ),
                ));
            }
        }
    }
}

/// Visits every string, keys included, with its path.
fn json_walk(v: &serde_json::Value, path: &str, f: &mut dyn FnMut(&str, &str)) {
    match v {
        serde_json::Value::String(s) => f(path, s),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                json_walk(item, &format!("{path}[{i}]"), f);
            }
        }
        serde_json::Value::Object(m) => {
            for (k, item) in m {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                f(&sub, k);
                json_walk(item, &sub, f);
            }
        }
        _ => {}
    }
}

// ------------------------------------------------------------------ XML

/// Elements naming a package in their `Include`/`Update`/`id` attribute
/// (MSBuild, NuGet).
const PACKAGE_ELEMENTS: &[&str] = &["PackageReference", "PackageVersion", "package"];

pub fn xml(text: &str) -> Vec<Hit> {
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = match roxmltree::Document::parse_with_options(text, opts) {
        Ok(d) => d,
        Err(e) => return unparsable("XML", e.pos().row as usize, e.to_string(), text),
    };
    let mut hits = Vec::new();
    xml_walk(&doc, doc.root_element(), &mut hits);
    dedup(hits)
}

fn line_of(doc: &roxmltree::Document<'_>, n: roxmltree::Node<'_, '_>) -> usize {
    doc.text_pos_at(n.range().start).row as usize
}

fn child_text<'a>(n: roxmltree::Node<'a, '_>, tag: &str) -> &'a str {
    n.children()
        .find(|c| c.has_tag_name(tag))
        .and_then(|c| c.text())
        .unwrap_or_default()
        .trim()
}

fn xml_walk(doc: &roxmltree::Document<'_>, n: roxmltree::Node<'_, '_>, hits: &mut Vec<Hit>) {
    let tag = n.tag_name().name();
    if (tag == "dependency" || tag == "plugin") && maven_coordinates(doc, n, hits) {
        return;
    }
    for a in n.attributes() {
        let line = line_of(doc, n);
        if legacy_pattern().is_match(a.value()) {
            hits.push(Hit::error(
                line,
                format!(
                    "`<{tag} {}>` refers to trade-feed: {}",
                    a.name(),
                    quote(a.value())
                ),
            ));
        } else if PACKAGE_ELEMENTS.contains(&tag)
            && ["Include", "Update", "id"].contains(&a.name())
            && socketio_pattern().is_match(a.value())
        {
            hits.push(Hit::warning(
                line,
                format!(
                    "Socket.IO client library still declared: NuGet package `{}`",
                    a.value()
                ),
            ));
        }
    }
    for c in n.children() {
        if c.is_element() {
            xml_walk(doc, c, hits);
        } else if c.is_text() {
            let t = c.text().unwrap_or_default().trim();
            if !t.is_empty() && legacy_pattern().is_match(t) {
                hits.push(Hit::error(
                    line_of(doc, c),
                    format!("`<{tag}>` refers to trade-feed: {}", quote(t)),
                ));
            }
        }
    }
}

/// A Maven dependency or plugin: returns true when it was reported whole.
fn maven_coordinates(
    doc: &roxmltree::Document<'_>,
    n: roxmltree::Node<'_, '_>,
    hits: &mut Vec<Hit>,
) -> bool {
    let (group, artifact) = (child_text(n, "groupId"), child_text(n, "artifactId"));
    let version = child_text(n, "version");
    let gav = if version.is_empty() {
        format!("{group}:{artifact}")
    } else {
        format!("{group}:{artifact}:{version}")
    };
    let line = line_of(doc, n);
    if legacy_pattern().is_match(group) || legacy_pattern().is_match(artifact) {
        hits.push(Hit::error(
            line,
            format!("Maven {} `{gav}` is trade-feed", n.tag_name().name()),
        ));
        true
    } else if group == "io.socket" || socketio_pattern().is_match(artifact) {
        hits.push(Hit {
            severity: Severity::Warning,
            line: Some(line),
            message: format!("Socket.IO client library still declared: Maven `{gav}`"),
        });
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(hits: &[Hit]) -> Vec<(usize, Severity)> {
        hits.iter()
            .map(|h| (h.line.unwrap_or(0), h.severity))
            .collect()
    }

    #[test]
    fn compose_services_and_their_references() {
        let y = "\
services:
  trade-feed:
    image: finos/trade-feed
    ports: ['18086:18086']
  trade-service:
    image: trade-service
    depends_on: [trade-feed, database]
    environment:
      TRADE_FEED_ADDRESS: http://trade-feed:18086
  nats-broker:
    image: nats:2.14
";
        let hits = yaml(y);
        assert_eq!(
            summary(&hits),
            vec![
                (2, Severity::Error),
                (7, Severity::Error),
                (9, Severity::Error)
            ],
            "{:?}",
            hits.iter().map(|h| &h.message).collect::<Vec<_>>()
        );
        assert!(hits[0].message.contains("compose service `trade-feed`"));
        assert!(
            hits[1].message.contains("depends_on[0]"),
            "{}",
            hits[1].message
        );
    }

    #[test]
    fn kubernetes_objects_and_ingress_paths() {
        let y = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: trade-feed
spec: {}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: traderx
spec:
  rules:
    - http:
        paths:
          - path: /socket.io
            backend: {service: {name: bridge, port: {number: 18086}}}
          - path: /nats-ws
            backend: {service: {name: nats-broker, port: {number: 8081}}}
";
        let hits = yaml(y);
        assert_eq!(
            summary(&hits),
            vec![
                (4, Severity::Error),
                (15, Severity::Error),
                (16, Severity::Error)
            ]
        );
    }

    #[test]
    fn package_json_dependencies() {
        let j = r#"{
  "name": "web-front-end",
  "dependencies": {
    "socket.io-client": "^4.8.1",
    "nats.ws": "^1.30.0"
  },
  "scripts": { "start": "ng serve --proxy-config trade-feed.proxy.json" }
}"#;
        let hits = json(j, true);
        assert_eq!(
            summary(&hits),
            vec![(4, Severity::Warning), (7, Severity::Error)]
        );
    }

    #[test]
    fn pom_and_csproj() {
        let pom = "<project><dependencies>\n<dependency>\n<groupId>io.socket</groupId>\
                   <artifactId>socket.io-client</artifactId><version>2.1.0</version></dependency>\n\
                   <dependency><groupId>io.nats</groupId><artifactId>jnats</artifactId></dependency>\n\
                   </dependencies><modules><module>trade-feed</module></modules></project>";
        let hits = xml(pom);
        assert_eq!(
            summary(&hits),
            vec![(2, Severity::Warning), (5, Severity::Error)]
        );
        let csproj = "<Project><ItemGroup>\n<PackageReference Include=\"SocketIOClient\" Version=\"3.1.1\" />\n\
                      <PackageReference Include=\"NATS.Net\" /></ItemGroup></Project>";
        assert_eq!(summary(&xml(csproj)), vec![(2, Severity::Warning)]);
    }

    #[test]
    fn unparsable_files_are_reported_and_still_scanned() {
        let hits = yaml("services: [\n  trade-feed\n");
        assert!(hits.iter().any(|h| h.severity == Severity::Warning));
        assert!(hits
            .iter()
            .any(|h| h.severity == Severity::Error && h.line == Some(2)));
    }
}
