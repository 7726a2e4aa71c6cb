#!/usr/bin/env bash
# Builds the Java test agents of tests/java (Maven, Java 17) into three
# self-contained jars (protocol: tests/agents/README.md):
#   tests/java/sio-agent-v2/target/sio-agent-v2.jar  io.socket:socket.io-client 2.1.x
#   tests/java/sio-agent-v1/target/sio-agent-v1.jar  io.socket:socket.io-client 1.0.x
#   tests/java/nats-agent/target/nats-agent.jar      io.nats:jnats 2.20.x
# Skips the build when all three jars are newer than every pom and every file
# under tests/java/**/src. Installs Maven and a JDK 17 with apt-get when they
# are missing. Idempotent and quiet on success; runs from any working directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAVA_DIR="$ROOT/tests/java"
JARS=(
  "$JAVA_DIR/sio-agent-v2/target/sio-agent-v2.jar"
  "$JAVA_DIR/sio-agent-v1/target/sio-agent-v1.jar"
  "$JAVA_DIR/nats-agent/target/nats-agent.jar"
)

log() { printf 'install-java-agents: %s\n' "$*" >&2; }
say() { if [[ -n "${VERBOSE:-}" ]]; then log "$@"; fi; }  # progress, only with VERBOSE=1

# True when every jar exists and no pom or source file is newer than it.
up_to_date() {
  local jar newer
  for jar in "${JARS[@]}"; do
    [[ -f "$jar" ]] || return 1
    newer="$(find "$JAVA_DIR" -name target -prune -o -type f \
      \( -name pom.xml -o -path '*/src/*' \) -newer "$jar" -print -quit)"
    [[ -z "$newer" ]] || return 1
  done
  return 0
}

if up_to_date; then
  say "jars up to date"
  exit 0
fi

if ! command -v mvn >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
  log "apt-get install maven openjdk-17-jdk-headless"
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq maven openjdk-17-jdk-headless >/dev/null
fi

say "mvn package (tests/java)"
start=$SECONDS
if ! out="$(mvn -q -B package -f "$JAVA_DIR/pom.xml" 2>&1)"; then
  printf '%s\n' "$out" >&2
  log "failed: mvn -q -B package -f $JAVA_DIR/pom.xml"
  exit 1
fi
for jar in "${JARS[@]}"; do
  if [[ ! -f "$jar" ]]; then
    log "the build did not produce $jar"
    exit 1
  fi
  touch "$jar"  # Maven may leave an unchanged jar's time alone: mark it built now
done
say "built in $((SECONDS - start)) s"
