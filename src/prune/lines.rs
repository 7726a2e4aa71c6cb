//! Line scanning, for files whose structure does not matter to the rule:
//! nginx and other configuration, Gradle and Python manifests, scripts,
//! Dockerfiles, sources. Comment lines are not artifacts and are skipped.

use super::{legacy_pattern, quote, socketio_pattern, Hit, LEGACY_PORT};

/// Lines that start like a comment in the languages a deployment holds.
const COMMENT_STARTS: &[&str] = &["#", "//", "/*", "*", "<!--", "--", ";", "rem "];

fn is_comment(line: &str) -> bool {
    let t = line.trim_start();
    COMMENT_STARTS.iter().any(|c| t.starts_with(c))
}

fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty() && !is_comment(l))
}

/// Any text file: each line naming trade-feed.
pub fn text(text: &str) -> Vec<Hit> {
    code_lines(text)
        .filter(|(_, l)| legacy_pattern().is_match(l))
        .map(|(n, l)| Hit::error(n, format!("refers to trade-feed: {}", quote(l.trim()))))
        .collect()
}

/// nginx: Socket.IO locations, upstreams and proxies to trade-feed.
pub fn nginx(text: &str) -> Vec<Hit> {
    let mut hits = Vec::new();
    for (n, raw) in code_lines(text) {
        // A trailing comment is not configuration.
        let line = raw.split('#').next().unwrap_or_default().trim();
        let first = line.split_whitespace().next().unwrap_or_default();
        if first == "location" && (line.contains("/socket.io") || legacy_pattern().is_match(line)) {
            hits.push(Hit::error(
                n,
                format!(
                    "nginx {} routes Socket.IO traffic, which only trade-feed or the bridge serves",
                    quote(line.trim_end_matches('{').trim())
                ),
            ));
        } else if legacy_pattern().is_match(line) {
            hits.push(Hit::error(
                n,
                format!("nginx {} refers to trade-feed", quote(line)),
            ));
        } else if line.contains(&format!(":{LEGACY_PORT}")) {
            hits.push(Hit::error(
                n,
                format!(
                    "nginx {} points at trade-feed's port {LEGACY_PORT}",
                    quote(line)
                ),
            ));
        }
    }
    hits
}

/// Gradle and Python manifests: trade-feed is an error, a Socket.IO library
/// a warning.
pub fn manifest(text: &str, comment: &str) -> Vec<Hit> {
    let mut hits = Vec::new();
    for (n, raw) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
        let line = raw.split(comment).next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if legacy_pattern().is_match(line) {
            hits.push(Hit::error(
                n,
                format!("refers to trade-feed: {}", quote(line)),
            ));
        } else if socketio_pattern().is_match(line) {
            hits.push(Hit::warning(
                n,
                format!("Socket.IO client library still declared: {}", quote(line)),
            ));
        }
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(hits: &[Hit]) -> Vec<usize> {
        hits.iter().filter_map(|h| h.line).collect()
    }

    #[test]
    fn nginx_locations_and_proxies() {
        let conf = "\
# trade-feed was here
server {
    location /socket.io/ {
        proxy_pass http://nats-broker:8081;
    }
    location /nats-ws { proxy_pass http://nats-broker:8081; } # not trade-feed
    location /old { proxy_pass http://10.0.0.9:18086; }
    upstream feed { server trade-feed:18086; }
}
";
        let hits = nginx(conf);
        assert_eq!(
            lines_of(&hits),
            vec![3, 7, 8],
            "{:?}",
            hits.iter().map(|h| &h.message).collect::<Vec<_>>()
        );
    }

    #[test]
    fn manifests_warn_about_socketio() {
        let gradle = "implementation 'io.socket:socket.io-client:2.1.0' // chat\n\
                      // implementation 'trade-feed'\nimplementation project(':trade-feed')\n";
        let hits = manifest(gradle, "//");
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].severity, super::super::Severity::Warning);
        assert_eq!(hits[1].severity, super::super::Severity::Error);
        let req = "python-socketio==5.11\nnats-py==2.9 # not socketio\n";
        assert_eq!(lines_of(&manifest(req, "#")), vec![1]);
    }
}
