#!/usr/bin/env bash
# Installs what the bridge and its tests need from outside the repository:
# Debian packages (OpenSSL headers for rust_socketio's native-tls, nginx for
# the ingress tests, Chromium for the browser tests, the openssl tool for
# their self-signed certificates, curl and jq for the runbook's commands) and a
# current nats-server built from the Go module
# proxy into .tools/bin (Debian's nats-server is 2.9; TraderX targets 2.14).
# Idempotent; runs from any working directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-v2.14.10}"

log() { printf 'install-system-deps: %s\n' "$*" >&2; }

need_apt=()
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
[[ -f /usr/include/openssl/ssl.h ]] || need_apt+=(libssl-dev)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
[[ -x /usr/bin/chromium ]] || need_apt+=(chromium)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if ((${#need_apt[@]})); then
  log "apt-get install ${need_apt[*]}"
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

bin="$ROOT/.tools/bin/nats-server"
if [[ ! -x "$bin" ]] || [[ "$("$bin" --version 2>/dev/null)" != *"${NATS_SERVER_VERSION#v}"* ]]; then
  if command -v go >/dev/null 2>&1; then
    log "building nats-server $NATS_SERVER_VERSION into .tools/bin (first run only)"
    mkdir -p "$ROOT/.tools/bin"
    GOBIN="$ROOT/.tools/bin" go install "github.com/nats-io/nats-server/v2@${NATS_SERVER_VERSION}"
  elif ! command -v nats-server >/dev/null 2>&1; then
    log "no Go toolchain: installing Debian's nats-server instead"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  fi
fi
