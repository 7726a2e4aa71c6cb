#!/usr/bin/env bash
# Builds the console page (console/) into console/dist, which the bridge
# serves at /console/ (console.dir): `npm ci` from console/package-lock.json
# (its JavaScript dependencies come from the npm registry at build time),
# then `npm run build` (esbuild). Skips what is up to date. Idempotent and
# quiet on success; runs from any working directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/console"

log() { printf 'build-console: %s\n' "$*" >&2; }

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

if ! command -v npm >/dev/null 2>&1; then
  log "npm is not installed: the console cannot be built (the bridge runs without it)"
  exit 1
fi

deps_stamp="$DIR/node_modules/.install-stamp"
deps_hash="$(hash_of "$DIR/package.json" "$DIR/package-lock.json")-$(node --version)"
if [[ ! -f "$deps_stamp" || "$(cat "$deps_stamp")" != "$deps_hash" ]]; then
  (cd "$DIR" && quiet npm ci --no-audit --no-fund --ignore-scripts)
  printf '%s\n' "$deps_hash" > "$deps_stamp"
fi

build_stamp="$DIR/dist/.build-stamp"
build_hash="$deps_hash-$(hash_of "$DIR/build.mjs" $(find "$DIR/src" -type f | sort))"
if [[ ! -f "$DIR/dist/index.html" || ! -f "$build_stamp" || "$(cat "$build_stamp")" != "$build_hash" ]]; then
  (cd "$DIR" && quiet npm run build)
  printf '%s\n' "$build_hash" > "$build_stamp"
fi
