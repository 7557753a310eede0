#!/usr/bin/env bash
# Runs fleet-agentd on its embedded default (no config file: state and socket
# under ~/.local/state/fleet-agent, standalone mode, API on 127.0.0.1:7070) and
# applies one demo department. Needs Docker: as root it installs docker.io when missing, starts dockerd if it is
# not running. Stop the demo with Ctrl-C; the container keeps running until
# `agentctl delete demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      echo "==> installing Docker (Debian's docker.io)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null </dev/null
    else
      echo "Docker is not installed: run \`apt-get install docker.io\` as root, then this again" >&2
      exit 1
    fi
  fi
  echo "==> starting dockerd in the background"
  setsid nohup dockerd >/tmp/fleet-demo-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi

echo "==> building fleet-agentd, agentctl and the demo image"
cargo build --quiet -p fleet-agentd -p agentctl
bash tests/images/build.sh >/dev/null

echo "==> starting fleet-agentd on its embedded default"
target/debug/fleet-agentd &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT
for _ in $(seq 50); do target/debug/agentctl status >/dev/null 2>&1 && break; sleep 0.2; done

target/debug/agentctl apply -f examples/departments/demo.toml
for _ in $(seq 60); do
  target/debug/agentctl status --json | grep -q '"health": "healthy"' && break
  sleep 1
done
target/debug/agentctl status
echo
echo "The demo answers on http://127.0.0.1:8001/health. Try: target/debug/agentctl show demo"
echo "Ctrl-C stops the daemon (the container keeps running; it is adopted on the next start)."
wait $daemon
