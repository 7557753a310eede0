#!/usr/bin/env bash
# Benchmark: request latency through Debian's haproxy while a department is
# restarted, updated, rolled back (a bad image) and deleted behind it, against
# the steady-state p99 of short requests measured in the same run before the
# first change. It runs the acceptance scenario of tests/tests/drain.rs
# (`restart_update_rollback_and_delete_refuse_no_request_behind_haproxy`) with
# DRAIN_BENCH=1, which prints its figures, and writes them into its section of
# docs/benchmarks.md.
#
#   bash bench/drain.sh
#
# Environment: FLEET_BIN_DIR (default target/debug: the daemon is not on the
# request path, HAProxy and the containers are), BENCH_OUT (default
# docs/benchmarks.md). Ports: those of tests/tests/drain.rs (43100-43131).
# Not a test: it measures (the test itself asserts zero failed requests).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
OUT="${BENCH_OUT:-docs/benchmarks.md}"
BIN="${FLEET_BIN_DIR:-$ROOT/target/debug}"

bench_tools haproxy
if [[ -z "${FLEET_BIN_DIR:-}" ]]; then
  say "building the binaries"
  cargo build --quiet --workspace --bins
fi
TAG_PREFIX=drain- bash "$ROOT/tests/images/build.sh" >&2

say "running the drain scenario behind haproxy"
log="$(mktemp /tmp/fleet-bench-drain-XXXXXX.log)"
trap 'rm -f "$log"' EXIT
FLEET_BIN_DIR="$BIN" DRAIN_BENCH=1 cargo nextest run --no-fail-fast -p fleet-tests --test drain \
  --no-capture restart_update_rollback_and_delete_refuse_no_request_behind_haproxy >"$log" 2>&1 \
  || { cat "$log" >&2; echo "bench/drain.sh: the scenario failed" >&2; exit 1; }
lines="$(grep '^DRAIN_BENCH ' "$log" | sed 's/^DRAIN_BENCH //')"
[[ -n "$lines" ]] || { cat "$log" >&2; echo "bench/drain.sh: no figures printed" >&2; exit 1; }
printf '%s\n' "$lines" >&2

{
  echo "## Restart, update, rollback and delete behind HAProxy (\`bash bench/drain.sh\`)"
  echo
  machine_line
  echo
  echo "Two departments of the test image behind Debian's haproxy (config from"
  echo "\`agentctl haproxy-config\`: check inter 500ms, rise 2, agent-inter 500ms), a"
  echo "short request (\`GET /version\`, new connection each) every 20 ms to each, and"
  echo "10 s requests to the changed one. Baseline: the p99 of the short requests in"
  echo "the steady state before the first change, same run. Every request returned 2xx"
  echo "(the scenario asserts it); \"worst\" is the slowest short request to the"
  echo "changed department while the change ran. The delete phase stops its short"
  echo "stream first (nothing serves a deleted department); its figure is the long"
  echo "requests'."
  echo
  echo '```'
  printf '%s\n' "$lines"
  echo '```'
} | write_bench_section drain "$OUT"
say "wrote the drain section of $OUT"
