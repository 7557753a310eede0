#!/usr/bin/env bash
# Benchmark: how long fleet-agentd takes to bring up 10 departments, against the
# floor of 10 sequential `docker run -d` of the same image with the same options,
# and what the daemon costs (RSS, CPU) while it supervises the 10.
#
#   bash bench/apply10.sh            # writes its section of docs/benchmarks.md
#
# Environment: FLEET_BIN_DIR (default target/release, built if missing),
# BENCH_PORTS (default 48901-48910), BENCH_IDLE_SECONDS (default 60),
# BENCH_OUT (default docs/benchmarks.md).
# Not a test: it asserts nothing, it measures. Run it on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
PORTS="${BENCH_PORTS:-48901-48910}"
LOW="${PORTS%-*}"
IDLE="${BENCH_IDLE_SECONDS:-60}"
OUT="${BENCH_OUT:-docs/benchmarks.md}"
IMAGE=fleet-test-agent:1
N=10

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

bench_tools jq curl

bench_binaries

bench_workdir apply
BASE_LABEL="fleet-bench.baseline=$NODE"
trap bench_cleanup EXIT

wait_healthy_ports() { # PORT...: until every port answers /health 200, for at most 120s
  local port deadline=$((SECONDS + 120))
  for port in "$@"; do
    until [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" == 200 ]]; do
      ((SECONDS < deadline)) || { say "port $port never answered /health"; exit 1; }
      sleep 0.05
    done
  done
}

# --- baseline: 10 sequential docker run -d -----------------------------------
say "baseline: $N sequential docker run -d"
t0="$(now)"
for i in $(seq 1 $N); do
  port=$((LOW + i - 1))
  docker run -d --name "bench-base-$NODE-$i" \
    --label "$BASE_LABEL" --label fleet-agent.managed=true \
    --label "fleet-agent.department=base$i" --label fleet-agent.spec-hash=0 \
    --restart no --stop-timeout 30 \
    -e "DEPARTMENT_ID=base$i" \
    -p "127.0.0.1:$port:8080" "$IMAGE" >/dev/null
done
t1="$(now)"
wait_healthy_ports $(seq "$LOW" $((LOW + N - 1)))
t2="$(now)"
base_running="$(elapsed "$t0" "$t1")"
base_healthy="$(elapsed "$t0" "$t2")"
say "baseline: all started in ${base_running}s, all answering /health in ${base_healthy}s"
docker rm -f $(docker ps -aq --filter "label=$BASE_LABEL") >/dev/null

# --- fleet-agentd: apply 10 ----------------------------------------------------
mkdir -p "$WORK/specs"
for i in $(seq 1 $N); do
  cat >"$WORK/specs/b$i.toml" <<EOF
id = "$NODE-d$i"
image = "$IMAGE"
[env]
DEPARTMENT_ID = "$NODE-d$i"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
EOF
done

bench_start_daemon "$PORTS"

count() { # jq filter on status rows -> count
  ctl status --json 2>/dev/null | jq "[.departments[] | select($1)] | length" 2>/dev/null || echo 0
}
wait_count() { # FILTER: until N rows match, for at most 300s
  local deadline=$((SECONDS + 300))
  until [[ "$(count "$1")" == "$N" ]]; do
    kill -0 "$DAEMON_PID" 2>/dev/null || { tail -n 40 "$WORK/daemon.log" >&2; say "fleet-agentd exited"; exit 1; }
    ((SECONDS < deadline)) || { say "timed out waiting for $N departments with $1"; exit 1; }
    sleep 0.05
  done
}
say "fleet-agentd: agentctl apply -f (10 departments)"
t0="$(now)"
ctl apply -f "$WORK/specs" >/dev/null
wait_count '.state == "running"'
t1="$(now)"
wait_count '.state == "running" and .health == "healthy"'
t2="$(now)"
agent_running="$(elapsed "$t0" "$t1")"
agent_healthy="$(elapsed "$t0" "$t2")"
say "fleet-agentd: all running in ${agent_running}s, all healthy in ${agent_healthy}s"

# --- cost of supervising 10 -------------------------------------------------------
say "measuring fleet-agentd for ${IDLE}s while it supervises $N departments"
ticks="$(getconf CLK_TCK)"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$DAEMON_PID/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$DAEMON_PID/status"; }
c0="$(cpu_ticks)"; s0="$(now)"
rss_max=0; rss_sum=0; samples=0
end=$((SECONDS + IDLE))
while ((SECONDS < end)); do
  r="$(rss_kib)"; rss_sum=$((rss_sum + r)); samples=$((samples + 1))
  ((r > rss_max)) && rss_max=$r
  sleep 1
done
c1="$(cpu_ticks)"; s1="$(now)"
cpu_pct="$(awk -v c="$((c1 - c0))" -v t="$ticks" -v a="$s0" -v b="$s1" 'BEGIN { printf "%.2f", 100 * c / t / (b - a) }')"
rss_avg_mib="$(awk -v s="$rss_sum" -v n="$samples" 'BEGIN { printf "%.1f", s / n / 1024 }')"
rss_max_mib="$(awk -v m="$rss_max" 'BEGIN { printf "%.1f", m / 1024 }')"
say "fleet-agentd: CPU ${cpu_pct}% of one core, RSS avg ${rss_avg_mib} MiB, max ${rss_max_mib} MiB"

ratio_running="$(awk -v a="$agent_running" -v b="$base_running" 'BEGIN { printf "%.2f", a / b }')"
ratio_healthy="$(awk -v a="$agent_healthy" -v b="$base_healthy" 'BEGIN { printf "%.2f", a / b }')"

write_bench_section apply10 "$OUT" <<EOF
## Bringing up 10 departments (\`bash bench/apply10.sh\`)

Release build, the \`fleet-test-agent:1\` image (a static HTTP server, so the
figures are the supervisor's and Docker's, not the application's).
$(machine_line)

| | all started | all answering /health |
|---|---|---|
| 10 sequential \`docker run -d\` (same image, labels, port publishing, env) | ${base_running}s | ${base_healthy}s |
| \`agentctl apply -f\` 10 specs, until \`status\` shows all running / healthy | ${agent_running}s | ${agent_healthy}s |
| ratio (fleet-agentd / docker run) | ${ratio_running} | ${ratio_healthy} |

"Healthy" for the daemon means its own probe (every 1s, no start period) has
passed; for the baseline, \`curl\` polling every 50 ms, which favours the baseline.

### Cost of supervising 10 departments

Measured over ${IDLE}s after all 10 were healthy (probes every 1s each, resync
at its default), from \`/proc/<pid>\`:

| CPU (% of one core) | RSS average | RSS max |
|---|---|---|
| ${cpu_pct}% | ${rss_avg_mib} MiB | ${rss_max_mib} MiB |
EOF
say "wrote $OUT"
