#!/usr/bin/env bash
# Installs what the integration tests' agents need: the Node packages of
# tests/node (from its lock file), the Python venv tests/.venv, the built
# console and the Java agents.
# Idempotent and quiet on success; runs from any working directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf 'install-test-deps: %s\n' "$*" >&2; }
say() { if [[ -n "${VERBOSE:-}" ]]; then log "$@"; fi; }  # progress, only with VERBOSE=1

# Runs a command with its output captured; shows the output only on failure.
quiet() {
  local out
  if ! out="$("$@" 2>&1)"; then
    printf '%s\n' "$out" >&2
    log "failed: $*"
    return 1
  fi
}

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# --- Node: tests/node ------------------------------------------------------
NODE_DIR="$ROOT/tests/node"
node_stamp="$NODE_DIR/node_modules/.install-stamp"
node_hash="$(hash_of "$NODE_DIR/package.json" "$NODE_DIR/package-lock.json")-$(node --version)"
if [[ ! -f "$node_stamp" || "$(cat "$node_stamp")" != "$node_hash" ]]; then
  say "npm ci in tests/node"
  (cd "$NODE_DIR" && quiet npm ci --no-audit --no-fund --ignore-scripts)
  printf '%s\n' "$node_hash" > "$node_stamp"
fi

# --- Node: sim/ (the role simulators of tests/cutover.rs and scripts/smoke.sh)
SIM_DIR="$ROOT/sim"
sim_stamp="$SIM_DIR/node_modules/.install-stamp"
sim_hash="$(hash_of "$SIM_DIR/package.json" "$SIM_DIR/package-lock.json")"
if [[ ! -f "$sim_stamp" || "$(cat "$sim_stamp")" != "$sim_hash" ]]; then
  say "npm ci in sim"
  (cd "$SIM_DIR" && quiet npm ci --no-audit --no-fund --ignore-scripts)
  printf '%s\n' "$sim_hash" > "$sim_stamp"
fi

# --- Python: tests/.venv ---------------------------------------------------
VENV="$ROOT/tests/.venv"
REQS="$ROOT/tests/python/requirements.txt"
py_stamp="$VENV/.install-stamp"
PYTHON="${PYTHON:-python3}"
py_hash="$(hash_of "$REQS")-$("$PYTHON" --version 2>&1)"
if [[ ! -x "$VENV/bin/python" || ! -f "$py_stamp" || "$(cat "$py_stamp")" != "$py_hash" ]]; then
  if [[ ! -x "$VENV/bin/python" ]] ||
     [[ "$("$VENV/bin/python" --version 2>&1)" != "$("$PYTHON" --version 2>&1)" ]]; then
    say "creating tests/.venv"
    quiet "$PYTHON" -m venv --clear "$VENV"
  fi
  say "pip install -r tests/python/requirements.txt"
  quiet "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQS"
  printf '%s\n' "$py_hash" > "$py_stamp"
fi

# --- Go: tests/go/jwtgen (NATS JWTs for the credentials-file test) ---------
if ! command -v go >/dev/null 2>&1; then
  log "apt-get install golang-go (Go fetches the toolchain go.mod asks for)"
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go >/dev/null
fi
say "go mod download in tests/go/jwtgen"
(cd "$ROOT/tests/go/jwtgen" && quiet go mod download)

# --- the console (console/ -> console/dist), which the browser tests open --
bash "$ROOT/scripts/build-console.sh"

# --- Java agents (tests/java) ------------------------------------------------
# >>> Java step: owned by whoever maintains tests/java. Do not inline here. <<<
if [[ -f "$ROOT/scripts/install-java-agents.sh" ]]; then
  bash "$ROOT/scripts/install-java-agents.sh"
fi
