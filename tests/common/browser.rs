//! Headless Chromium (Debian's `chromium`) driven by playwright-core
//! through the browser agent (`tests/node/browser-agent.js`), one fresh
//! profile per browser.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::{root, Agent};

pub struct Browser {
    agent: Agent,
}

impl Browser {
    /// Starts Chromium; `ignore_https_errors` accepts the tests' self-signed
    /// certificates (on pages and WebSockets).
    pub fn launch(ignore_https_errors: bool) -> Browser {
        let mut cmd = Command::new("node");
        cmd.arg(root().join("tests/node/browser-agent.js"));
        let b = Browser {
            agent: Agent::spawn("browser", cmd),
        };
        b.call(
            json!({"cmd": "launch", "ignoreHTTPSErrors": ignore_https_errors}),
            Duration::from_secs(60),
        )
        .expect("Chromium starts (see scripts/install-system-deps.sh)");
        b
    }

    /// Runs one command; `Ok(value)` or `Err(message)`.
    pub fn call(&self, cmd: Value, timeout: Duration) -> Result<Value, String> {
        let seq = self.agent.send(cmd.clone());
        let ev = self
            .agent
            .try_expect(timeout, |e| {
                e["seq"] == json!(seq) && (e["ev"] == "ok" || e["ev"] == "error")
            })
            .unwrap_or_else(|| panic!("browser: no answer to {cmd} within {timeout:?}"));
        if ev["ev"] == "ok" {
            Ok(ev.get("value").cloned().unwrap_or(Value::Null))
        } else {
            Err(ev["message"].as_str().unwrap_or("?").to_string())
        }
    }

    /// Opens `url` in the page named `page` ("main" is the first one).
    pub fn open(&self, page: &str, url: &str) {
        let status = self
            .call(
                json!({"cmd": "open", "page": page, "url": url}),
                Duration::from_secs(40),
            )
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
        assert_eq!(status, json!(200), "open {url}");
    }

    /// The value of a JavaScript expression in `page`.
    pub fn eval(&self, page: &str, js: &str) -> Value {
        self.call(
            json!({"cmd": "eval", "page": page, "js": js}),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("eval {js}: {e}"))
    }

    /// Waits (in the page, bounded) until `js` is truthy; returns its value.
    pub fn try_wait(&self, page: &str, js: &str, timeout: Duration) -> Result<Value, String> {
        self.call(
            json!({"cmd": "wait", "page": page, "js": js, "timeout_ms": timeout.as_millis() as u64}),
            timeout + Duration::from_secs(10),
        )
    }

    /// As [`Browser::try_wait`], failing the test with `what` and the
    /// page's state.
    pub fn wait(&self, page: &str, what: &str, js: &str, timeout: Duration) -> Value {
        match self.try_wait(page, js, timeout) {
            Ok(v) => v,
            Err(e) => {
                let state = self
                    .call(
                        json!({"cmd": "eval", "page": page, "js": "document.body.innerText"}),
                        Duration::from_secs(10),
                    )
                    .unwrap_or_default();
                panic!("{what}: {e}\npage:\n{}", state.as_str().unwrap_or(""));
            }
        }
    }

    pub fn add_script(&self, page: &str, path: &Path) {
        self.call(
            json!({"cmd": "script", "page": page, "path": path}),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("add script {}: {e}", path.display()));
    }

    pub fn screenshot(&self, page: &str, path: &Path) {
        self.call(
            json!({"cmd": "screenshot", "page": page, "path": path}),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("screenshot {}: {e}", path.display()));
    }

    /// Console messages and page errors seen so far, for failure reports.
    pub fn console(&self) -> Vec<String> {
        self.agent
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["ev"] == "console" || e["ev"] == "pageerror")
            .map(|e| e.to_string())
            .collect()
    }
}

/// Where tests keep what a person should be able to look at afterwards.
pub fn artifact(name: &str) -> std::path::PathBuf {
    let dir = root().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("target/test-artifacts");
    dir.join(name)
}

// ---- the console page (console/src/main.js)

/// The blotter's positions as `security=quantity`, in row order.
pub const POSITIONS_JS: &str = "[...document.querySelectorAll('#positions tbody tr')]\
    .map(r => r.dataset.security + '=' + r.children[2].textContent).join(',')";

/// Records, from now on, the most rows ever shown at once for one security.
pub const WATCH_ROWS_JS: &str = "(() => {
    const tbody = document.querySelector('#positions tbody');
    window.maxRowsPerSecurity = 0;
    const check = () => {
        const n = {};
        for (const r of tbody.children) n[r.dataset.security] = (n[r.dataset.security] || 0) + 1;
        for (const v of Object.values(n)) window.maxRowsPerSecurity = Math.max(window.maxRowsPerSecurity, v);
    };
    new MutationObserver(check).observe(tbody, { childList: true, subtree: true });
    check();
    return true;
})()";
