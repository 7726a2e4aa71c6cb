#!/usr/bin/env bash
# Prints the nats-server to use: $NATS_SERVER_BIN, the one built into
# .tools/bin by install-system-deps.sh, or the one on PATH.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${NATS_SERVER_BIN:-}" ]]; then echo "$NATS_SERVER_BIN"
elif [[ -x "$ROOT/.tools/bin/nats-server" ]]; then echo "$ROOT/.tools/bin/nats-server"
elif command -v nats-server >/dev/null 2>&1; then command -v nats-server
else exit 1
fi
