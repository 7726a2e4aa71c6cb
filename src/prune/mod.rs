//! `prune-check`: does a deployment tree still deploy, route to or link
//! trade-feed or the bridge? This is the state 006 rule that its outputs
//! carry no trade-feed artifact (NFR-707, NFR-708, SC-706).
//!
//! What counts, file by file:
//! - **YAML** (compose files, Kubernetes manifests, any `*.yml`/`*.yaml`):
//!   parsed; a compose service or Kubernetes object named after trade-feed
//!   is one finding; any other key or value naming trade-feed or the bridge,
//!   an Ingress path `/socket.io` or `/trade-feed`, or trade-feed's port
//!   18086 is one finding each.
//! - **JSON** (`package.json` and the rest): parsed; a package named after
//!   trade-feed, a dependency on it, or any string naming it. Socket.IO
//!   libraries declared in `package.json` are warnings.
//! - **XML** (`pom.xml`, `*.csproj`, `packages.config`, ...): parsed; text
//!   and attributes naming trade-feed; Socket.IO libraries (Maven
//!   `io.socket`, NuGet `SocketIOClient`...) are warnings.
//! - **nginx and other configuration, scripts, Dockerfiles, sources**:
//!   scanned line by line, comment lines skipped; a `location` for
//!   `/socket.io` or `/trade-feed` is a finding, so is any line naming
//!   trade-feed. Gradle and Python requirement files warn about Socket.IO
//!   libraries.
//! - Text in another encoding than UTF-8 is read too (bytes that are not
//!   UTF-8 become U+FFFD; the names looked for are ASCII).
//! - **Folders, files and symlinks** named after trade-feed, and symlinks
//!   pointing at it, dangling or not. Other dangling symlinks are warnings.
//!
//! Not deployment artifacts, so not scanned: prose (`*.md`, `*.rst`,
//! `*.adoc`, `*.txt` other than requirement files, LICENSE, NOTICE,
//! CHANGELOG), ignore files (`.gitignore`, `.dockerignore`, ...), binary
//! files, files over [`MAX_FILE_BYTES`], and the folders in [`SKIPPED_DIRS`].
//! A document explaining that trade-feed was removed therefore does not fail
//! a clean tree.
//!
//! "Naming trade-feed" means matching [`legacy_pattern`]: `trade-feed`,
//! `tradefeed`, `trade_feed`, `trade.feed` in any case, which also covers
//! the bridge (`tradefeed-bridge`, `TRADEFEED_BRIDGE_...`).

mod lines;
mod structured;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex::Regex;

/// Larger files are not read (reported as skipped).
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// The walk stops (and fails) beyond this many entries.
pub const MAX_ENTRIES: usize = 500_000;
/// Folders that hold third-party or tool state, never deployment input.
pub const SKIPPED_DIRS: &[&str] = &[
    ".git",
    "node_modules",
    ".venv",
    "venv",
    "__pycache__",
    ".gradle",
    ".angular",
    ".idea",
];

/// trade-feed's Socket.IO port.
pub const LEGACY_PORT: &str = "18086";

/// Names trade-feed or the bridge.
pub fn legacy_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(?i)trade[-_.]?feed").expect("static regex"))
}

/// Names a Socket.IO library (npm, Maven, NuGet, PyPI spellings).
fn socketio_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?i)socket[-_.]?io|engine[-_.]?io|io\.socket").expect("static regex")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One thing found, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Relative to the scanned root.
    pub path: PathBuf,
    /// 1-based; `None` for folders and symlinks.
    pub line: Option<usize>,
    pub message: String,
}

/// The result of scanning a tree.
#[derive(Debug, Default)]
pub struct Scan {
    pub findings: Vec<Finding>,
    pub files_scanned: usize,
    /// Files not read, with the reason (too large, not text).
    pub skipped: Vec<(PathBuf, String)>,
}

impl Scan {
    pub fn errors(&self) -> usize {
        self.count(Severity::Error)
    }

    /// Files that may hold text but could not be read (too large, an error):
    /// holes in the check. Binary files are not holes.
    pub fn holes(&self) -> usize {
        self.skipped.iter().filter(|(_, why)| why != BINARY).count()
    }

    pub fn warnings(&self) -> usize {
        self.count(Severity::Warning)
    }

    fn count(&self, s: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == s).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("cannot scan {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds more than {MAX_ENTRIES} entries; scan a smaller tree")]
    TooLarge { path: PathBuf },
    #[error(
        "--exclude {exclude}: no such path in {root} (give it relative to the tree, \
         or as an absolute path inside it)"
    )]
    Exclude { exclude: PathBuf, root: PathBuf },
}

/// Each `--exclude` as a path relative to `root`: an absolute path inside
/// the tree is made relative; one that names nothing in the tree is an
/// error, since leaving it out silently would scan what the operator meant
/// to leave out (or hide a typo).
fn excludes_in(root: &Path, exclude: &[PathBuf]) -> Result<Vec<PathBuf>, PruneError> {
    let canonical_root = std::fs::canonicalize(root).ok();
    exclude
        .iter()
        .map(|x| {
            let rel = if x.is_absolute() {
                let inside = match (&canonical_root, std::fs::canonicalize(x)) {
                    (Some(r), Ok(c)) => c.strip_prefix(r).ok().map(Path::to_path_buf),
                    _ => None,
                };
                inside.or_else(|| x.strip_prefix(root).ok().map(Path::to_path_buf))
            } else {
                Some(x.components().filter(|c| c.as_os_str() != ".").collect())
            };
            match rel {
                Some(r) if std::fs::symlink_metadata(root.join(&r)).is_ok() => Ok(r),
                _ => Err(PruneError::Exclude {
                    exclude: x.clone(),
                    root: root.to_path_buf(),
                }),
            }
        })
        .collect()
}

/// What one file contributes, before paths are attached.
pub(crate) struct Hit {
    pub severity: Severity,
    pub line: Option<usize>,
    pub message: String,
}

impl Hit {
    pub fn error(line: usize, message: String) -> Hit {
        Hit {
            severity: Severity::Error,
            line: Some(line),
            message,
        }
    }

    pub fn warning(line: usize, message: String) -> Hit {
        Hit {
            severity: Severity::Warning,
            line: Some(line),
            message,
        }
    }
}

/// Scans the tree at `root`, leaving out paths (relative to it) in `exclude`.
pub fn scan(root: &Path, exclude: &[PathBuf]) -> Result<Scan, PruneError> {
    let meta = std::fs::metadata(root).map_err(|source| PruneError::Root {
        path: root.to_path_buf(),
        source,
    })?;
    let exclude = &excludes_in(root, exclude)?;
    let mut out = Scan::default();
    if meta.is_file() {
        let name = root.file_name().map(PathBuf::from).unwrap_or_default();
        scan_file(root, &name, &mut out);
        return Ok(out);
    }
    let mut walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter();
    let mut entries = 0usize;
    while let Some(entry) = walk.next() {
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(PruneError::TooLarge {
                path: root.to_path_buf(),
            });
        }
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e.path().map(|p| relative(root, p)).unwrap_or_default();
                out.skipped.push((path, format!("cannot read: {e}")));
                continue;
            }
        };
        if entry.depth() == 0 {
            continue;
        }
        let rel = relative(root, entry.path());
        let name = entry.file_name().to_string_lossy().into_owned();
        let ft = entry.file_type();
        if exclude.iter().any(|x| rel.starts_with(x)) {
            if ft.is_dir() {
                walk.skip_current_dir();
            }
            continue;
        }
        if ft.is_symlink() {
            symlink(entry.path(), &rel, &name, &mut out);
        } else if ft.is_dir() {
            if SKIPPED_DIRS.contains(&name.as_str()) {
                walk.skip_current_dir();
            } else if legacy_pattern().is_match(&name) {
                // One finding for the folder, not one per file in it.
                out.findings.push(Finding {
                    severity: Severity::Error,
                    path: rel,
                    line: None,
                    message: format!("folder `{name}` is a trade-feed component folder"),
                });
                walk.skip_current_dir();
            }
        } else if ft.is_file() {
            scan_file(entry.path(), &rel, &mut out);
        }
    }
    out.findings
        .sort_by(|a, b| (&a.path, a.line, a.severity).cmp(&(&b.path, b.line, b.severity)));
    Ok(out)
}

fn relative(root: &Path, p: &Path) -> PathBuf {
    p.strip_prefix(root).unwrap_or(p).to_path_buf()
}

fn symlink(path: &Path, rel: &Path, name: &str, out: &mut Scan) {
    let target = std::fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let dangling = std::fs::metadata(path).is_err();
    let state = if dangling { ", dangling" } else { "" };
    let legacy = legacy_pattern().is_match(name) || legacy_pattern().is_match(&target);
    let (severity, message) = if legacy {
        (
            Severity::Error,
            format!("symlink `{name}` -> `{target}` links trade-feed{state}"),
        )
    } else if dangling {
        (
            Severity::Warning,
            format!("dangling symlink `{name}` -> `{target}`"),
        )
    } else {
        return;
    };
    out.findings.push(Finding {
        severity,
        path: rel.to_path_buf(),
        line: None,
        message,
    });
}

/// How a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Prose,
    Ignored,
    Yaml,
    PackageJson,
    Json,
    Xml,
    Nginx,
    Gradle,
    Python,
    Text,
}

fn kind(name: &str) -> Kind {
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map_or("", |(_, e)| e);
    let stem_is = |p: &str| lower == p || lower.starts_with(&format!("{p}."));
    if lower.starts_with("requirements") && ext == "txt"
        || ["pipfile", "pyproject.toml", "setup.cfg", "setup.py"].contains(&lower.as_str())
    {
        return Kind::Python;
    }
    if ["license", "notice", "changelog", "authors", "readme"]
        .iter()
        .any(|p| stem_is(p))
        || ["md", "markdown", "rst", "adoc", "txt"].contains(&ext)
    {
        return Kind::Prose;
    }
    if lower.starts_with('.') && lower.ends_with("ignore") {
        return Kind::Ignored;
    }
    match ext {
        "yml" | "yaml" => Kind::Yaml,
        "json" if lower == "package.json" => Kind::PackageJson,
        "json" => Kind::Json,
        "xml" | "csproj" | "fsproj" | "vbproj" | "props" | "targets" | "nuspec" => Kind::Xml,
        "gradle" | "kts" if lower.contains("gradle") => Kind::Gradle,
        "conf" | "template" if lower.contains(".conf") => Kind::Nginx,
        _ if lower.starts_with("nginx") => Kind::Nginx,
        _ => Kind::Text,
    }
}

fn scan_file(path: &Path, rel: &Path, out: &mut Scan) {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let kind = kind(&name);
    if matches!(kind, Kind::Prose | Kind::Ignored) {
        return;
    }
    if legacy_pattern().is_match(&name) {
        out.findings.push(Finding {
            severity: Severity::Error,
            path: rel.to_path_buf(),
            line: None,
            message: format!("file `{name}` is named after trade-feed"),
        });
    }
    let text = match read_text(path) {
        Ok(t) => t,
        Err(why) => {
            out.skipped.push((rel.to_path_buf(), why));
            return;
        }
    };
    out.files_scanned += 1;
    let hits = match kind {
        Kind::Yaml => structured::yaml(&text),
        Kind::PackageJson => structured::json(&text, true),
        Kind::Json => structured::json(&text, false),
        Kind::Xml => structured::xml(&text),
        Kind::Nginx => lines::nginx(&text),
        Kind::Gradle => lines::manifest(&text, "//"),
        Kind::Python => lines::manifest(&text, "#"),
        Kind::Text | Kind::Prose | Kind::Ignored => lines::text(&text),
    };
    out.findings.extend(hits.into_iter().map(|h| Finding {
        severity: h.severity,
        path: rel.to_path_buf(),
        line: h.line,
        message: h.message,
    }));
}

/// Why a file with NUL bytes was not read.
const BINARY: &str = "binary";

fn read_text(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        // An image or an archive is expected; a large text file is a hole.
        use std::io::Read as _;
        let mut head = [0u8; 8192];
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .map_err(|e| format!("cannot read: {e}"))?;
        if head[..n].contains(&0) {
            return Err(BINARY.into());
        }
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.iter().take(8192).any(|b| *b == 0) {
        return Err(BINARY.into());
    }
    // Text in another encoding (Latin-1 .properties files, a comment typed
    // in cp1252) is still read: the names looked for are ASCII, and a file
    // skipped for one odd byte would pass a tree that still names trade-feed.
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// The report: one line per finding, `path:line: severity: message`.
pub fn render(root: &Path, scan: &Scan) -> String {
    let mut s = String::new();
    let (errors, warnings) = (scan.errors(), scan.warnings());
    if errors > 0 {
        let _ = writeln!(
            s,
            "prune-check: FAIL: {errors} trade-feed artifact{} in {} ({warnings} warning{}, {} files scanned)",
            plural(errors),
            root.display(),
            plural(warnings),
            scan.files_scanned
        );
    } else if scan.holes() > 0 {
        let holes = scan.holes();
        let _ = writeln!(
            s,
            "prune-check: INCOMPLETE: no trade-feed artifact found in {}, but {holes} file{} could not be scanned (listed below) ({warnings} warning{}, {} files scanned)",
            root.display(),
            plural(holes),
            plural(warnings),
            scan.files_scanned
        );
    } else {
        let _ = writeln!(
            s,
            "prune-check: PASS: no trade-feed artifact in {} ({warnings} warning{}, {} files scanned)",
            root.display(),
            plural(warnings),
            scan.files_scanned
        );
    }
    for f in &scan.findings {
        let sev = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match f.line {
            Some(l) => {
                let _ = writeln!(s, "{}:{l}: {sev}: {}", f.path.display(), f.message);
            }
            None => {
                let _ = writeln!(s, "{}: {sev}: {}", f.path.display(), f.message);
            }
        }
    }
    // Binary files are expected (images, jars) and only counted; a file
    // that could not be read or was too large is a hole in the check, so
    // each one is named.
    let binary = scan.skipped.iter().filter(|(_, why)| why == BINARY).count();
    for (p, why) in scan.skipped.iter().filter(|(_, why)| why != BINARY) {
        let _ = writeln!(s, "{}: skipped: {why}", p.display());
    }
    if binary > 0 {
        let _ = writeln!(s, "({binary} binary file{} not scanned)", plural(binary));
    }
    s
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Quotes a value for a message, shortened.
pub(crate) fn quote(v: &str) -> String {
    let one_line = v.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 100 {
        let short: String = one_line.chars().take(97).collect();
        format!("`{short}...`")
    } else {
        format!("`{one_line}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_names_trade_feed_and_the_bridge() {
        for yes in [
            "trade-feed",
            "TradeFeed",
            "TRADE_FEED_URL",
            "trade.feed.address",
            "tradefeed-bridge",
            "TRADEFEED_BRIDGE_NATS__SERVERS",
        ] {
            assert!(legacy_pattern().is_match(yes), "{yes}");
        }
        for no in [
            "trade-service",
            "trades.new",
            "nats-broker",
            "feedback",
            "trade feed",
        ] {
            assert!(!legacy_pattern().is_match(no), "{no}");
        }
    }

    #[test]
    fn files_are_read_by_kind() {
        let cases = [
            ("docker-compose.yml", Kind::Yaml),
            ("ingress.yaml", Kind::Yaml),
            ("package.json", Kind::PackageJson),
            ("package-lock.json", Kind::Json),
            ("pom.xml", Kind::Xml),
            ("people-service.csproj", Kind::Xml),
            ("build.gradle", Kind::Gradle),
            ("settings.gradle.kts", Kind::Gradle),
            ("requirements.txt", Kind::Python),
            ("requirements-dev.txt", Kind::Python),
            ("nginx.conf", Kind::Nginx),
            ("default.conf.template", Kind::Nginx),
            ("README.md", Kind::Prose),
            ("NOTES.txt", Kind::Prose),
            ("LICENSE", Kind::Prose),
            (".dockerignore", Kind::Ignored),
            ("Dockerfile", Kind::Text),
            ("run.sh", Kind::Text),
            ("application.properties", Kind::Text),
        ];
        for (name, want) in cases {
            assert_eq!(kind(name), want, "{name}");
        }
    }
}
