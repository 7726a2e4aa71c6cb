#!/usr/bin/env bash
# Gate for one stage of the TraderX cutover: runs the role simulators of
# sim/ (trade-service, trade-processor, UI) through the bridge for a short
# flow and checks that every order was booked exactly once, that every
# screen shows the processor's positions and trades, that nothing arrived
# twice, and that the bridge's counters agree. Run with --help for usage.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: scripts/smoke.sh [--mode server|attach] [--stage introduce|producer|processor|browser]
                        [--service legacy|nats] [--processor legacy|nats] [--ui legacy|nats]
                        [--orders N] [--rate N] [--accounts ID,ID...] [--config FILE] [--subjects spec|verbatim]
                        [--bridge-url URL | --trade-feed-url URL] [--admin-url URL] [--nats-url URL]
                        [--ui-nats-url URL]
                        [--legacy-path PATH] [--skip-counters] [--timeout SECONDS]

Runs a short flow of trade orders through the bridge with three simulators
(trade-service, trade-processor, one UI screen per account) placed on the
legacy bus (Socket.IO) or on NATS as the stage says, then checks:
  - every order booked exactly once (none lost, none doubled),
  - every screen's blotter equal to the processor's positions and trades,
  - no message seen twice by any participant,
  - the bridge's counters (GET /metrics) equal to what the simulators saw.
Prints a one-screen summary. Exit status: 0 all checks hold, 1 a mismatch,
2 bad arguments or a stage that could not be set up.

Stages (where each participant is):
  introduce   trade-service legacy, trade-processor legacy, UI legacy (the bridge just added)
  producer    trade-service NATS,   trade-processor legacy, UI legacy
  processor   trade-service NATS,   trade-processor NATS,   UI legacy
  browser     trade-service NATS,   trade-processor NATS,   UI NATS
--service, --processor and --ui override the stage (default stage: introduce).

Options:
  --mode server|attach   the bridge's mode (default server). In attach mode the
                         legacy participants connect to trade-feed.
  --orders N             orders to publish (default 200)
  --rate N               orders per second (default 200)
  --accounts ID,...      the accounts the orders are for, one screen each (default the
                         simulator accounts 22214,52355,62654,10031, which are TraderX
                         sample accounts: against a deployment, give ids no real screen shows)
  --timeout SECONDS      how long the flow may take to complete (default 30)
  --subjects spec|verbatim  the NATS subject map the simulators use: the state 006
                         map (trades.new, positions.account.<id>.updated; default) or the
                         legacy topics used verbatim (config/traderx-verbatim.toml)

Self-contained (default): starts nats-server (scripts/nats-server-bin.sh), in
attach mode the legacy Node hub (tests/node/hub.js) as trade-feed, and the
bridge on free loopback ports, and stops them at the end.
  --config FILE          bridge configuration (default config/traderx.toml; a file
                         named *verbatim* selects --subjects verbatim)
  Environment: SMOKE_BRIDGE_BIN, the bridge binary (default: target/release/tradefeed-bridge,
  built if missing), NATS_SERVER_BIN.

Against a running deployment (e.g. to gate a staging stage): give the URLs;
nothing is started.
  --bridge-url URL       server mode: the bridge's Socket.IO URL (http://host:18086)
  --trade-feed-url URL   attach mode: trade-feed's Socket.IO URL
  --admin-url URL        the bridge's admin URL (http://host:18097)
  --nats-url URL         the NATS URL (nats://host:4222)
  --ui-nats-url URL      where the UI screens reach NATS, if not at --nats-url: the
                         browsers' path, e.g. ws://ingress:8080/nats-ws (nats.ws over
                         WebSocket through the ingress)
  --legacy-path PATH     Socket.IO path (default /socket.io; /trade-feed through TraderX's ingress)
  --skip-counters        do not compare counters (the bridge carries other traffic)
  Counters are compared as differences over the run. In attach mode the stage's
  processor bus must match the bridge's declaration (attach.legacy_consumers or
  PUT /api/legacy-consumers/trade-orders); the smoke checks it and does
  not change it.
  The smoke's orders are real orders: a real trade-processor in the queue group
  or on /trades competes for them (the smoke then reports them lost, and that
  processor books them), and real screens of their accounts show them. Gate a
  stage while no real trade-service or trade-processor runs, with --accounts
  that no real screen shows (docs/migration/runbook.md).

Examples:
  scripts/smoke.sh --stage processor
  scripts/smoke.sh --mode attach --stage producer --orders 1000
  scripts/smoke.sh --stage browser --bridge-url http://bridge:18086 \
      --admin-url http://bridge:18097 --nats-url nats://nats-broker:4222
EOF
}

die() { printf 'smoke: %s\n' "$*" >&2; exit 2; }

mode=server stage=introduce service="" processor="" ui="" orders=200 rate=200 timeout=30 accounts=""
config="$ROOT/config/traderx.toml" subjects="" legacy_path=/socket.io skip_counters=""
bridge_url="" trade_feed_url="" admin_url="" nats_url="" ui_nats_url=""
while (($#)); do
  opt="$1"
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --skip-counters) skip_counters=1; shift; continue ;;
  esac
  (($# >= 2)) || die "missing value for $opt (see --help)"
  val="$2"
  case "$opt" in
    --mode) mode="$val" ;;
    --stage) stage="$val" ;;
    --service) service="$val" ;;
    --processor) processor="$val" ;;
    --ui) ui="$val" ;;
    --orders) orders="$val" ;;
    --rate) rate="$val" ;;
    --timeout) timeout="$val" ;;
    --accounts) accounts="$val" ;;
    --config) config="$val" ;;
    --subjects) subjects="$val" ;;
    --legacy-path) legacy_path="$val" ;;
    --bridge-url) bridge_url="$val" ;;
    --trade-feed-url) trade_feed_url="$val" ;;
    --admin-url) admin_url="$val" ;;
    --nats-url) nats_url="$val" ;;
    --ui-nats-url) ui_nats_url="$val" ;;
    *) die "unknown option $opt (see --help)" ;;
  esac
  shift 2
done

case "$mode" in server|attach) ;; *) die "--mode must be server or attach" ;; esac
case "$stage" in
  introduce) s=legacy p=legacy u=legacy ;;
  producer) s=nats p=legacy u=legacy ;;
  processor) s=nats p=nats u=legacy ;;
  browser) s=nats p=nats u=nats ;;
  *) die "--stage must be introduce, producer, processor or browser" ;;
esac
service="${service:-$s}" processor="${processor:-$p}" ui="${ui:-$u}"
for v in "$service" "$processor" "$ui"; do
  case "$v" in legacy|nats) ;; *) die "--service, --processor and --ui take legacy or nats, not $v" ;; esac
done
[[ "$orders" =~ ^[1-9][0-9]*$ ]] || die "--orders must be a positive integer"
[[ "$rate" =~ ^[1-9][0-9]*$ ]] || die "--rate must be a positive integer"
[[ "$timeout" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds"
[[ -z "$ui_nats_url" || "$ui_nats_url" =~ ^(nats|tls|ws|wss)://[^[:space:]]+$ ]] ||
  die "--ui-nats-url must be a nats://, tls://, ws:// or wss:// URL"
[[ -z "$accounts" || "$accounts" =~ ^[0-9]{1,15}(,[0-9]{1,15})*$ ]] ||
  die "--accounts must be account ids (digits), comma separated"
if [[ -z "$subjects" ]]; then
  case "$(basename "$config")" in *verbatim*) subjects=verbatim ;; *) subjects=spec ;; esac
fi
case "$subjects" in spec|verbatim) ;; *) die "--subjects must be spec or verbatim" ;; esac

command -v node >/dev/null 2>&1 || die "node (20 or later) is needed for the simulators"

# The simulators' packages (sim/package-lock.json), installed once.
sim_stamp="$ROOT/sim/node_modules/.install-stamp"
sim_hash="$(cat "$ROOT/sim/package.json" "$ROOT/sim/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$sim_stamp" || "$(cat "$sim_stamp")" != "$sim_hash" ]]; then
  (cd "$ROOT/sim" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null) ||
    die "npm ci in sim/ failed"
  printf '%s\n' "$sim_hash" > "$sim_stamp"
fi

smoke() {
  node "$ROOT/sim/smoke.js" --stage "$stage" --mode "$mode" --service "$service" --processor "$processor" \
    --ui "$ui" --orders "$orders" --rate "$rate" --timeout "$timeout" --subjects "$subjects" \
    --legacy-path "$legacy_path" ${skip_counters:+--skip-counters} ${accounts:+--accounts "$accounts"} \
    ${ui_nats_url:+--ui-nats-url "$ui_nats_url"} "$@"
}

# ---------------------------------------------------------------- against a running deployment
if [[ -n "$bridge_url$trade_feed_url$admin_url$nats_url" ]]; then
  [[ -n "$admin_url" && -n "$nats_url" ]] || die "against a running deployment, give --admin-url and --nats-url"
  if [[ "$mode" == server ]]; then
    [[ -n "$bridge_url" ]] || die "server mode: give --bridge-url (the bridge's Socket.IO URL)"
    [[ -z "$trade_feed_url" ]] || die "server mode has no trade-feed: the legacy clients use --bridge-url"
    legacy_url="$bridge_url"
  else
    [[ -n "$trade_feed_url" ]] || die "attach mode: give --trade-feed-url (the legacy clients connect to trade-feed)"
    legacy_url="$trade_feed_url"
  fi
  set +e
  smoke --legacy-url "$legacy_url" --nats-url "$nats_url" --admin-url "$admin_url"
  exit $?
fi

# ---------------------------------------------------------------- self-contained
work="$(mktemp -d "${TMPDIR:-/tmp}/tfb-smoke.XXXXXX")"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# A free port from below the kernel's ephemeral range, where no outgoing
# connection can take it before the server we start binds it; chosen at
# random, so that smoke runs side by side rarely meet (each is checked free).
ephemeral_low="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
(( ephemeral_low > 11000 )) || ephemeral_low=32768
free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$((10000 + RANDOM % (ephemeral_low - 10000)))
    port_open "$p" || { echo "$p"; return 0; }
  done
  die "no free loopback port found below $ephemeral_low"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local i
  for i in $(seq 1 300); do port_open "$1" && return 0; sleep 0.05; done
  return 1
}
show_logs() {
  local f
  for f in "$work"/*.log; do
    printf -- '--- %s (last 20 lines)\n' "$(basename "$f")" >&2
    tail -n 20 "$f" >&2
  done
}

nats_bin="$("$ROOT/scripts/nats-server-bin.sh" 2>/dev/null)" || {
  bash "$ROOT/scripts/install-system-deps.sh"
  nats_bin="$("$ROOT/scripts/nats-server-bin.sh")" || die "no nats-server found"
}
bridge_bin="${SMOKE_BRIDGE_BIN:-$ROOT/target/release/tradefeed-bridge}"
if [[ ! -x "$bridge_bin" ]]; then
  echo "smoke: building the bridge (cargo build --release)" >&2
  (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
fi
[[ -f "$config" ]] || die "no configuration file $config"

nats_port="$(free_port)"
"$nats_bin" -a 127.0.0.1 -p "$nats_port" > "$work/nats-server.log" 2>&1 &
pids+=($!)
wait_port "$nats_port" || { show_logs; die "nats-server did not start"; }
nats_url="nats://127.0.0.1:$nats_port"

sio_port="$(free_port)"
admin_port="$(free_port)"
env_vars=(
  "TRADEFEED_BRIDGE_NATS__SERVERS=[\"$nats_url\"]"
  "TRADEFEED_BRIDGE_SOCKETIO__LISTEN=127.0.0.1:$sio_port"
  "TRADEFEED_BRIDGE_ADMIN__LISTEN=127.0.0.1:$admin_port"
  "TRADEFEED_BRIDGE_LOG__FORMAT=text"
)
legacy_url="http://127.0.0.1:$sio_port"
if [[ "$mode" == attach ]]; then
  [[ -d "$ROOT/tests/node/node_modules/socket.io" ]] ||
    (cd "$ROOT/tests/node" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null) ||
    die "npm ci in tests/node failed (the legacy hub needs socket.io)"
  hub_port="$(free_port)"
  node "$ROOT/tests/node/hub.js" --port "$hub_port" --path "$legacy_path" --quiet > "$work/hub.log" 2>&1 &
  pids+=($!)
  wait_port "$hub_port" || { show_logs; die "the legacy hub did not start"; }
  legacy_url="http://127.0.0.1:$hub_port"
  consumers=false
  [[ "$processor" == legacy ]] && consumers=true
  env_vars+=(
    "TRADEFEED_BRIDGE_MODE=attach"
    "TRADEFEED_BRIDGE_ATTACH__URL=$legacy_url"
    "TRADEFEED_BRIDGE_ATTACH__PATH=$legacy_path"
    "TRADEFEED_BRIDGE_ATTACH__LEASE=false"
    "TRADEFEED_BRIDGE_ATTACH__LEGACY_CONSUMERS={trade-orders=$consumers}"
  )
else
  env_vars+=("TRADEFEED_BRIDGE_MODE=server")
fi
env -u RUST_LOG "${env_vars[@]}" "$bridge_bin" --config "$config" > "$work/bridge.log" 2>&1 &
pids+=($!)
admin_url="http://127.0.0.1:$admin_port"
ready=""
for _ in $(seq 1 600); do
  if curl -fs "$admin_url/readyz" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "${pids[-1]}" 2>/dev/null || break
  sleep 0.05
done
[[ -n "$ready" ]] || { show_logs; die "the bridge did not become ready"; }

set +e
smoke --legacy-url "$legacy_url" --nats-url "$nats_url" --admin-url "$admin_url"
rc=$?
set -e
if ((rc != 0)); then
  show_logs
  echo "smoke: logs kept in $work" >&2
else
  rm -rf "$work"
fi
exit "$rc"
