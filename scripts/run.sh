#!/usr/bin/env bash
# Runs the bridge in server mode with the TraderX routes (config/traderx.toml):
# Socket.IO on :18086, admin on :18097, NATS at nats://127.0.0.1:4222. If no
# NATS server answers there, it starts one (and stops it on exit), with
# WebSocket on :8081 for the console at http://127.0.0.1:18097/console/.
# Extra arguments go to the bridge, e.g. scripts/run.sh --config config/traderx-verbatim.toml
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Build first (the first release build takes several minutes), so nothing
# is started until there is a bridge to run.
[[ -f /usr/include/openssl/ssl.h ]] || bash scripts/install-system-deps.sh
bash scripts/build-console.sh || echo "run: the console was not built; /console/ will say so" >&2
echo "run: cargo build --release" >&2
cargo build --release -p tradefeed-bridge

nats_pid=""
cleanup() { [[ -n "$nats_pid" ]] && kill "$nats_pid" 2>/dev/null || true; }
trap cleanup EXIT

if port_open 4222; then
  echo "run: using the NATS server already listening on 127.0.0.1:4222" >&2
else
  bin="$(scripts/nats-server-bin.sh 2>/dev/null)" || {
    bash scripts/install-system-deps.sh
    bin="$(scripts/nats-server-bin.sh)"
  }
  echo "run: starting $bin on 127.0.0.1:4222 (websocket on 8081 for browsers)" >&2
  conf="$(mktemp)"
  printf 'listen: "127.0.0.1:4222"\nhttp: "127.0.0.1:8222"\nwebsocket { listen: "127.0.0.1:8081", no_tls: true }\n' > "$conf"
  # JetStream holds attach mode's lease (one active bridge per trade-feed).
  printf 'jetstream { store_dir: "%s" }\n' "$(mktemp -d)" >> "$conf"
  nats_log="$(mktemp -t nats-server.XXXXXX.log)"
  echo "run: nats-server logs to $nats_log" >&2
  "$bin" -c "$conf" >"$nats_log" 2>&1 &
  nats_pid=$!
  # No ingress here: the console reaches that WebSocket listener directly.
  export TRADEFEED_BRIDGE_CONSOLE__NATS_URL="${TRADEFEED_BRIDGE_CONSOLE__NATS_URL:-ws://127.0.0.1:8081}"
  for _ in $(seq 1 100); do port_open 4222 && break; sleep 0.05; done
  port_open 4222 || { echo "run: nats-server did not start; see $nats_log" >&2; exit 1; }
fi

echo "run: console at http://127.0.0.1:18097/console/" >&2
./target/release/tradefeed-bridge "$@" &
bridge_pid=$!
trap 'kill -TERM $bridge_pid 2>/dev/null; wait $bridge_pid; cleanup' INT TERM
wait $bridge_pid
