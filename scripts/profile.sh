#!/usr/bin/env bash
# Flamegraphs of the bridge's hot paths, for docs/performance.md.
#
# The bridge runs under `perf record` with the cpu-clock software event
# (hardware counters are often missing on VMs; timer samples work anywhere)
# and DWARF call graphs (release builds keep .eh_frame, no frame pointers
# needed), while tfb-bench drives one case at full speed. inferno turns the
# samples into SVGs: docs/flamegraph-<case>.svg (or $OUT_DIR).
#
# Usage: scripts/profile.sh [CASE...]   CASE = path:shape, default:
#   sio-sio:1x50 nats-sio:1x50 sio-nats:1x1
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT_DIR:-docs}"
cases=("$@")
((${#cases[@]})) || cases=(sio-sio:1x50 nats-sio:1x50 sio-nats:1x1)

bash scripts/install-system-deps.sh
bash scripts/install-test-deps.sh
command -v perf >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
[[ -x .tools/bin/inferno-flamegraph ]] ||
  cargo install --quiet --root .tools inferno --no-default-features --features cli
cargo build --release --quiet -p tradefeed-bridge --bin tradefeed-bridge
cargo build --release --quiet -p tfb-bench
NATS_SERVER_BIN="$(scripts/nats-server-bin.sh)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/bridge" <<WRAP
#!/usr/bin/env bash
exec perf record -q -e cpu-clock -F 1999 --call-graph dwarf,32768 -o "\$PERF_OUT" -- "$ROOT/target/release/tradefeed-bridge" "\$@"
WRAP
chmod +x "$work/bridge"

pin=()
if [[ "$(nproc --all)" -ge 2 ]]; then pin=(taskset -c 1); fi
for c in "${cases[@]}"; do
  path="${c%%:*}" shape="${c##*:}"
  export PERF_OUT="$work/$path-$shape.data"
  "${pin[@]}" target/release/tfb-bench --bridge-bin "$work/bridge" --nats-server "$NATS_SERVER_BIN" \
    ${pin:+--server-cpus 0 --nats-cpus 1} --paths "$path" --shapes "$shape" --rates unlimited \
    --targets bridge --duration 4s --scale none --startup-runs 0 \
    --out-json "$work/$path-$shape.json" --log-dir "$work/logs"
  perf script -i "$PERF_OUT" 2>/dev/null | .tools/bin/inferno-collapse-perf \
    | .tools/bin/inferno-flamegraph --title "tradefeed-bridge: $path $shape, unlimited rate" \
        --width 1400 > "$OUT_DIR/flamegraph-$path-$shape.svg"
  echo "profile: $OUT_DIR/flamegraph-$path-$shape.svg" >&2
done
