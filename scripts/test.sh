#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (idempotent), then
# unit tests and the integration tests, which start their own nats-server,
# bridges, legacy hub and Node/Python/Java clients on free loopback ports.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test flows).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install-system-deps.sh
bash scripts/install-test-deps.sh

NATS_SERVER_BIN="$(scripts/nats-server-bin.sh)"
export NATS_SERVER_BIN
echo "test: nats-server $("$NATS_SERVER_BIN" --version)" >&2

# Two test threads: each test runs several processes (servers, JVMs) and
# the machine this was written for has two cores.
cargo test --all-targets "$@" -- --test-threads="${TEST_THREADS:-2}"
