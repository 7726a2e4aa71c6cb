//! `tradefeed-bridge probe`: asks a running bridge's `/readyz` whether it is
//! ready, for container health checks, so the image needs neither a shell
//! nor curl.

use std::time::Duration;

/// How long a probe may take; compose and Kubernetes give it a few seconds.
pub const PROBE_TIMEOUT_SECS: u64 = 2;

/// The `/readyz` URL of a bridge listening on `admin_listen`, reached over
/// loopback when it listens on every interface.
pub fn readyz_url(admin_listen: &str) -> String {
    let host_port = if let Some(port) = admin_listen.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = admin_listen.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        admin_listen.to_string()
    };
    format!("http://{host_port}/readyz")
}

/// `Ok(body)` when `url` answers 200, else what it answered or why it did not.
pub fn probe(url: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(PROBE_TIMEOUT_SECS)))
        .build()
        .into();
    let mut resp = agent
        .get(url)
        .call()
        .map_err(|e| format!("{url}: no answer: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("{url}: HTTP {status} {}", body.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_probed_over_loopback() {
        assert_eq!(readyz_url("0.0.0.0:18097"), "http://127.0.0.1:18097/readyz");
        assert_eq!(readyz_url("[::]:18097"), "http://[::1]:18097/readyz");
        assert_eq!(readyz_url("10.1.2.3:9"), "http://10.1.2.3:9/readyz");
    }

    #[test]
    fn nothing_listening_is_an_error_naming_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/readyz");
        let err = probe(&url).unwrap_err();
        assert!(err.contains(&url), "{err}");
    }
}
