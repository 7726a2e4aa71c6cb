#!/usr/bin/env bash
# Runs the whole benchmark in one go: builds release binaries, then
# tfb-bench starts nats-server, and for every case a fresh bridge or legacy
# hub on free loopback ports, runs the matrix (paths x shapes x rates), the
# connection-scale test and the start-up test, and writes
#   docs/bench/results.json, docs/bench/results.md
# and the results section of docs/performance.md.
#
# Pinning: the server under test (bridge or hub) gets CPU 0 to itself; the
# load generator and nats-server share CPU 1. Extra arguments go to tfb-bench,
# e.g. scripts/bench.sh --duration 3s --scale 1000 (see tfb-bench --help).
# Publish figures only from a quiet machine: other load skews every ratio.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install-system-deps.sh
bash scripts/install-test-deps.sh
NATS_SERVER_BIN="$(scripts/nats-server-bin.sh)"

cargo build --release --quiet -p tradefeed-bridge --bin tradefeed-bridge
cargo build --release --quiet -p tfb-bench

# 10,000 idle clients need 10,000 descriptors in the server and as many in
# the load generator (separate processes, each under its own limit).
hard="$(ulimit -Hn)"
if [[ "$hard" == unlimited || "$hard" -ge 65536 ]]; then ulimit -n 65536; else ulimit -n "$hard"; fi
if [[ "$(ulimit -n)" -lt 10500 ]]; then
  echo "bench: open-file limit $(ulimit -n) is too low for 10,000 clients; raise the hard limit" >&2
fi

cpus="$(nproc --all)"
server_cpus="" client_cpus="" nats_cpus=""
pin=()
if [[ "$cpus" -ge 2 ]] && command -v taskset >/dev/null 2>&1; then
  server_cpus=0
  client_cpus=1
  nats_cpus=1
  pin=(taskset -c "$client_cpus")
fi

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p docs/bench "target/bench/$stamp"
"${pin[@]}" target/release/tfb-bench \
  --bridge-bin target/release/tradefeed-bridge \
  --bridge-config config/traderx.toml \
  --nats-server "$NATS_SERVER_BIN" \
  --hub-script tests/node/hub.js \
  --server-cpus "$server_cpus" --client-cpus "$client_cpus" --nats-cpus "$nats_cpus" \
  --out-json docs/bench/results.json \
  --out-md docs/bench/results.md \
  --doc docs/performance.md \
  --log-dir "target/bench/$stamp/logs" \
  --command "scripts/bench.sh${*:+ $*}" \
  "$@"

# Second pass: the cases whose subscribers read from NATS with 50
# subscribers. Under the pinning above, nats-server's fan-out and the load
# generator reading 50 connections share CPU 1 and saturate it while the
# bridge idles on CPU 0, so the first pass measures the instrument there.
# Here nats-server runs on CPU 0 beside the bridge (which only publishes
# each message once) and the load generator has CPU 1 to itself; the NATS ->
# NATS floor is measured again under the same pinning.
if [[ -n "$server_cpus" && " $* " != *" --paths "* && " $* " != *" --shapes "* ]]; then
  "${pin[@]}" target/release/tfb-bench \
    --bridge-bin target/release/tradefeed-bridge \
    --bridge-config config/traderx.toml \
    --nats-server "$NATS_SERVER_BIN" \
    --hub-script tests/node/hub.js \
    --server-cpus "$server_cpus" --client-cpus "$client_cpus" --nats-cpus "$server_cpus" \
    --paths sio-nats,nats-nats --shapes 1x50 --targets bridge --scale none --startup-runs 0 \
    --out-json docs/bench/results-nats-fanout.json \
    --out-md docs/bench/results-nats-fanout.md \
    --log-dir "target/bench/$stamp/logs-nats-fanout" \
    --command "scripts/bench.sh${*:+ $*} (second pass: nats-server on CPU $server_cpus)" \
    "$@"
fi
