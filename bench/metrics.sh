#!/usr/bin/env bash
# Benchmark: `/metrics` scrape latency (p50/p99) with 10 departments, against
# `/healthz` on the same listener in the same run (the floor of the HTTP stack),
# and the daemon's CPU share spent on metrics: container stats collection
# (stats_interval) plus rendering scrapes, against the same daemon with
# collection effectively off (stats_interval = 1h) and nobody scraping.
#
#   bash bench/metrics.sh      # rewrites its own section of docs/benchmarks.md
#
# Environment: FLEET_BIN_DIR (default target/release, built if missing),
# BENCH_PORTS (department pool, default 44080-44089), BENCH_API_PORT (44099),
# BENCH_SCRAPES (default 2000), BENCH_IDLE_SECONDS (per CPU phase, default 60),
# BENCH_SCRAPE_EVERY (seconds between scrapes in the CPU phase, default 1),
# BENCH_OUT (default docs/benchmarks.md).
# Not a test: it asserts nothing, it measures. Run it on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
PORTS="${BENCH_PORTS:-44080-44089}"
API_PORT="${BENCH_API_PORT:-44099}"
SCRAPES="${BENCH_SCRAPES:-2000}"
IDLE="${BENCH_IDLE_SECONDS:-60}"
EVERY="${BENCH_SCRAPE_EVERY:-1}"
OUT="${BENCH_OUT:-docs/benchmarks.md}"
IMAGE=fleet-test-agent:1
N=10

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
bench_tools jq curl
bench_binaries
bench_workdir benchm
DAEMON_PID=""

stop_daemon() {
  if [[ -n "$DAEMON_PID" ]]; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
  fi
}
trap bench_cleanup EXIT

mkdir -p "$WORK/state" "$WORK/departments.d" "$WORK/specs"
start_daemon() { # STATS_INTERVAL
  cat >"$WORK/agent.toml" <<EOF
node_id = "$NODE"
state_dir = "$WORK/state"
socket = "$WORK/agentctl.sock"
departments_dir = "$WORK/departments.d"
stats_interval = "$1"
[ports]
range = "$PORTS"
[api]
listen = "127.0.0.1:$API_PORT"
# Sequential scrapes as fast as they come back: no per-client rate limit.
requests_per_second = 0
[log]
format = "json"
EOF
  "$BIN/fleet-agentd" --config "$WORK/agent.toml" >>"$WORK/daemon.log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 1 300); do ctl status >/dev/null 2>&1 && return; sleep 0.1; done
  tail -n 40 "$WORK/daemon.log" >&2
  exit 1
}
ctl() { "$BIN/agentctl" --socket "$WORK/agentctl.sock" "$@"; }
wait_healthy() { # until all N are running and healthy, for at most 300s
  local deadline=$((SECONDS + 300))
  until [[ "$(ctl status --json 2>/dev/null | jq '[.departments[] | select(.state == "running" and .health == "healthy")] | length')" == "$N" ]]; do
    ((SECONDS < deadline)) || { say "timed out waiting for $N healthy departments"; exit 1; }
    sleep 0.2
  done
}

for i in $(seq 1 $N); do
  cat >"$WORK/specs/m$i.toml" <<EOF
id = "$NODE-d$i"
image = "$IMAGE"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
EOF
done

say "starting fleet-agentd with $N departments"
start_daemon 10s
ctl apply -f "$WORK/specs" >/dev/null
wait_healthy
# Two collection rounds, so every department has CPU and memory figures.
sleep 21
load_at_start="$(cut -d' ' -f1-3 /proc/loadavg)"
series="$(curl -s "http://127.0.0.1:$API_PORT/metrics" | grep -vc '^#')"
bytes="$(curl -s "http://127.0.0.1:$API_PORT/metrics" | wc -c)"
say "/metrics: $series samples, $bytes bytes"

# --- scrape latency --------------------------------------------------------------
latency() { # PATH -> "p50 p99" in ms, over SCRAPES sequential requests on one connection
  local urls=() i
  # `-o` binds to one URL, so each gets its own.
  for ((i = 0; i < SCRAPES; i++)); do urls+=(-o /dev/null "http://127.0.0.1:$API_PORT$1"); done
  curl -s -w '%{http_code} %{time_total}\n' "${urls[@]}" >"$WORK/times"
  if grep -qv '^200 ' "$WORK/times"; then
    say "$1: $(grep -vc '^200 ' "$WORK/times") answers were not 200"; exit 1
  fi
  cut -d' ' -f2 "$WORK/times" | sort -n |
    awk '{ v[NR] = $1 } END { i50 = int(NR * 0.50); i99 = int(NR * 0.99); if (i50 < 1) i50 = 1; if (i99 < 1) i99 = 1;
      printf "%.3f %.3f\n", v[i50] * 1000, v[i99] * 1000 }'
}
say "scrape latency: $SCRAPES x /healthz (baseline), $SCRAPES x /metrics"
read -r base_p50 base_p99 < <(latency /healthz)
read -r met_p50 met_p99 < <(latency /metrics)
say "/healthz p50 ${base_p50} ms p99 ${base_p99} ms; /metrics p50 ${met_p50} ms p99 ${met_p99} ms"

# --- CPU share of metrics --------------------------------------------------------
ticks="$(getconf CLK_TCK)"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$DAEMON_PID/stat"; }
measure_cpu() { # SCRAPE(0|1) -> % of one core over IDLE seconds
  local c0 c1 t0 t1 end
  c0="$(cpu_ticks)"; t0="$(date +%s.%N)"
  end=$((SECONDS + IDLE))
  while ((SECONDS < end)); do
    if [[ "$1" == 1 ]]; then curl -s -o /dev/null "http://127.0.0.1:$API_PORT/metrics"; fi
    sleep "$EVERY"
  done
  c1="$(cpu_ticks)"; t1="$(date +%s.%N)"
  awk -v c="$((c1 - c0))" -v t="$ticks" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", 100 * c / t / (b - a) }'
}
say "CPU, collection on (stats_interval 10s) and a scrape every ${EVERY}s: ${IDLE}s"
cpu_on="$(measure_cpu 1)"
stop_daemon
start_daemon 1h
wait_healthy
sleep 5
say "CPU, collection off (stats_interval 1h), no scrapes: ${IDLE}s"
cpu_off="$(measure_cpu 0)"
stop_daemon

cpu_share="$(awk -v a="$cpu_on" -v b="$cpu_off" 'BEGIN { d = a - b; printf "%.2f", d }')"
ratio_p50="$(awk -v a="$met_p50" -v b="$base_p50" 'BEGIN { printf "%.2f", a / b }')"
ratio_p99="$(awk -v a="$met_p99" -v b="$base_p99" 'BEGIN { printf "%.2f", a / b }')"
ratio_cpu="$(awk -v a="$cpu_on" -v b="$cpu_off" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
say "metrics cost ${cpu_share}% of one core (${cpu_on}% vs ${cpu_off}%)"

write_bench_section metrics "$OUT" <<EOF
## Metrics: scrape latency and collection cost (10 departments)

Produced by \`bash bench/metrics.sh\` (it rewrites this section only). Release
build, $N departments of \`$IMAGE\` probed every 1s, TCP API on loopback, no token.
$(machine_line)
\`/metrics\`: $series samples, $bytes bytes. Host load average at the start: $load_at_start
(p99 on a loaded host is mostly scheduling delay, the baseline's as much as ours).

$SCRAPES sequential GETs on one keep-alive connection (\`curl -w %{time_total}\`);
the baseline is \`/healthz\` on the same listener (the HTTP stack alone):

| | p50 | p99 |
|---|---|---|
| \`/healthz\` (baseline) | ${base_p50} ms | ${base_p99} ms |
| \`/metrics\` | ${met_p50} ms | ${met_p99} ms |
| ratio (/metrics / /healthz) | ${ratio_p50} | ${ratio_p99} |

Daemon CPU (\`/proc/<pid>/stat\` utime+stime) over ${IDLE}s each, the same 10
departments supervised; the baseline has stats collection effectively off
(\`stats_interval = "1h"\`) and no scrapes:

| | CPU (% of one core) |
|---|---|
| baseline: collection off, no scrapes | ${cpu_off}% |
| collection every 10s + a scrape every ${EVERY}s | ${cpu_on}% |
| ratio | ${ratio_cpu} |
| **metrics' share** (difference) | **${cpu_share}%** |

Goals (issue 5): p99 under 5 ms, under 0.5% of a core. A scrape every ${EVERY}s
is 15-60 times what Prometheus usually does, so the share at a real scrape
interval is lower still; the CPU figures are noisy at this size (one clock tick
is $(awk -v t="$ticks" -v s="$IDLE" 'BEGIN { printf "%.3f", 100 / t / s }')% over ${IDLE}s).
EOF

say "wrote the metrics section of $OUT"
