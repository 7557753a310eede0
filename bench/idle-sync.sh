#!/usr/bin/env bash
# Benchmark: what an idle node's coordinator sync costs, before and after the
# status digest (issue 17), and what one coordinator then needs for a fleet.
#
#  1. Node side. fleet-agentd in coordinator mode with 5 running departments
#     polls a stand-in coordinator (bench/sync_standin.py) every 100 ms:
#     "before" = a coordinator that never echoes Fleet-Status-Digest (every
#     sync carries the whole status, as every sync did before), "after" = one
#     that echoes it (an idle node sends the header only). Measured: request
#     bytes per sync (head + body, at the coordinator) and the daemon's CPU
#     time per sync (/proc/<pid>/stat), over BENCH_SECONDS.
#  2. Coordinator side. The stand-in (Python asyncio, one process) driven on
#     loopback at 10,000 nodes / 15 s = 667 syncs/s for BENCH_SECONDS on 64
#     keep-alive connections, with the real status body captured in step 1
#     ("full", every node sending its status each poll) and with the digest
#     only ("digest"): the stand-in's CPU (cores), bytes/s received, and p50/p99.
#     The baseline is the "full" run of the same stand-in in the same run.
#
#   bash bench/idle-sync.sh     # rewrites its section of docs/benchmarks.md
#
# Environment: FLEET_BIN_DIR (default target/release, built if missing),
# BENCH_SECONDS (default 20), BENCH_PORT (default 43480; the department pool is
# 43460-43464), BENCH_OUT (default docs/benchmarks.md). Not a test: it asserts
# nothing, it measures. Run it on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
SECONDS_PER_RUN="${BENCH_SECONDS:-20}"
PORT="${BENCH_PORT:-43480}"
OUT="${BENCH_OUT:-docs/benchmarks.md}"
RATE=667
NODES=10000
CONNS=64
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_binaries
bench_workdir isync
STANDIN_PID=""
cleanup_all() {
  [[ -n "$STANDIN_PID" ]] && kill -TERM "$STANDIN_PID" 2>/dev/null && wait "$STANDIN_PID" 2>/dev/null || true
  bench_cleanup
}
trap cleanup_all EXIT

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
stat_of() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# The document: 5 departments of the test image.
python3 - "$WORK/document.json" <<'PY'
import json, sys
deps = [{"id": f"isync-{i}", "image": "fleet-test-agent:1",
         "env": {"MODE": "bench", "REGION": "eu-west-1", "TIER": "standard"},
         "health": {"path": "/health", "interval": "2s", "timeout": "1s", "retries": 3, "start_period": "0s"},
         "restart": {"stop_timeout": "5s"}} for i in range(5)]
json.dump({"revision": 1, "departments": deps}, open(sys.argv[1], "w"))
PY

start_standin() { # ECHO STATS
  python3 bench/sync_standin.py serve "$PORT" "$1" "$WORK/document.json" "$2" &
  STANDIN_PID=$!
  sleep 0.5
}
stop_standin() {
  kill -TERM "$STANDIN_PID"; wait "$STANDIN_PID" 2>/dev/null || true; STANDIN_PID=""
}

declare -A BYTES CPU_US SYNCS
BENCH_TOP_LEVEL_TOML="[coordinator]
url = \"http://127.0.0.1:$PORT\"
poll_interval = \"100ms\""
export BENCH_TOP_LEVEL_TOML
for mode in before after; do
  echo=0; [[ $mode == after ]] && echo=1
  stats="$WORK/stats-$mode.json"
  start_standin "$echo" "$stats"
  bench_start_daemon 43460-43464
  say "$mode: waiting for 5 running departments"
  for _ in $(seq 1 600); do
    [[ "$(ctl status --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(1 for x in d.get("departments", []) if x["state"] == "running" and x["health"] == "healthy"))' 2>/dev/null)" == 5 ]] && break
    sleep 0.2
  done
  sleep 2
  kill -USR1 "$STANDIN_PID"; sleep 0.2
  r0=$(stat_of "$stats" requests); b0=$(stat_of "$stats" bytes_received); c0=$(cpu_ticks "$DAEMON_PID")
  say "$mode: measuring ${SECONDS_PER_RUN}s of idle syncs"
  sleep "$SECONDS_PER_RUN"
  kill -USR1 "$STANDIN_PID"; sleep 0.2
  r1=$(stat_of "$stats" requests); b1=$(stat_of "$stats" bytes_received); c1=$(cpu_ticks "$DAEMON_PID")
  SYNCS[$mode]=$((r1 - r0))
  BYTES[$mode]=$(( (b1 - b0) / (r1 - r0) ))
  CPU_US[$mode]=$(( (c1 - c0) * 1000000 / hz / (r1 - r0) ))
  [[ $mode == before ]] && python3 -c 'import json,sys; open(sys.argv[2], "w").write(json.load(open(sys.argv[1]))["last_body"])' "$stats" "$WORK/body.json"
  kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""
  stop_standin
  bench_remove_containers "label=fleet-agent.node=$NODE"
  rm -rf "$WORK/state"
  say "$mode: ${SYNCS[$mode]} syncs, ${BYTES[$mode]} B/sync, ${CPU_US[$mode]} us CPU/sync"
done
BODY_BYTES=$(wc -c <"$WORK/body.json")

declare -A C_CORES C_BPS C_RATE C_P50 C_P99
for mode in full digest; do
  stats="$WORK/coord-$mode.json"
  start_standin 1 "$stats"
  c0=$(cpu_ticks "$STANDIN_PID")
  say "coordinator, $mode: $RATE syncs/s from $NODES nodes for ${SECONDS_PER_RUN}s"
  result=$(python3 bench/sync_standin.py drive "$PORT" "$RATE" "$SECONDS_PER_RUN" "$NODES" "$CONNS" "$WORK/body.json" "$mode")
  c1=$(cpu_ticks "$STANDIN_PID")
  elapsed=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["elapsed_s"])' "$result")
  stop_standin
  C_CORES[$mode]=$(python3 -c "print(round(($c1 - $c0) / $hz / $elapsed, 3))")
  C_BPS[$mode]=$(python3 -c "import json; print(round(json.load(open('$stats'))['bytes_received'] / $elapsed / 1024, 1))")
  read -r C_RATE[$mode] C_P50[$mode] C_P99[$mode] < <(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["rate"], d["p50_ms"], d["p99_ms"])' "$result")
  say "coordinator, $mode: ${C_CORES[$mode]} cores, ${C_BPS[$mode]} KiB/s, ${C_RATE[$mode]} req/s, p99 ${C_P99[$mode]} ms"
done

ratio() { python3 -c "print(f'{$1 / $2:.2f}' if $2 else 'n/a')"; }
write_bench_section idle-sync "$OUT" <<EOF
## Idle coordinator sync: status digest (issue 17)

Produced by \`bash bench/idle-sync.sh\` (it rewrites this section only).
$(machine_line)
Binaries: \`${BIN#"$ROOT"/}\`.

**Node, one idle sync** (5 running departments, polling every 100 ms, ${SECONDS_PER_RUN}s
per run; "before": a coordinator that never echoes \`Fleet-Status-Digest\`, so
every sync carries the whole status, as all did before; "after": one that echoes
it). Bytes are the request (head + body) as the coordinator received it; CPU is
fleet-agentd's user + system time over the window divided by the syncs in it
(it includes the daemon's other idle work: resync, probes, stats).

| | syncs | request bytes / sync | daemon CPU / sync |
|---|---:|---:|---:|
| before (whole status) | ${SYNCS[before]} | ${BYTES[before]} | ${CPU_US[before]} µs |
| after (digest only) | ${SYNCS[after]} | ${BYTES[after]} | ${CPU_US[after]} µs |
| after / before | | $(ratio "${BYTES[after]}" "${BYTES[before]}") | $(ratio "${CPU_US[after]}" "${CPU_US[before]}") |

The whole status body of this node was ${BODY_BYTES} bytes. The node still builds and
hashes its report at every sync, so its CPU per sync barely moves; what the
digest saves is bytes on the wire and the coordinator's parsing and storing.
With debug binaries (\`FLEET_BIN_DIR=target/debug\`) the CPU figures are those
of an unoptimised build; the bytes do not depend on the build.

**Coordinator for 10,000 nodes every 15 s** ($RATE syncs/s, ${SECONDS_PER_RUN}s, $CONNS
keep-alive connections, node ids round-robin over $NODES): the stand-in
coordinator (\`bench/sync_standin.py\`, one Python asyncio process that parses
and stores each status body it gets, on loopback; the driver runs on the same
machine). Baseline: the "full" run (every node sends its status every poll).

| | syncs/s answered | coordinator CPU (cores) | received KiB/s | p50 ms | p99 ms |
|---|---:|---:|---:|---:|---:|
| full status every poll | ${C_RATE[full]} | ${C_CORES[full]} | ${C_BPS[full]} | ${C_P50[full]} | ${C_P99[full]} |
| digest only (idle fleet) | ${C_RATE[digest]} | ${C_CORES[digest]} | ${C_BPS[digest]} | ${C_P50[digest]} | ${C_P99[digest]} |
| digest / full | $(ratio "${C_RATE[digest]}" "${C_RATE[full]}") | $(ratio "${C_CORES[digest]}" "${C_CORES[full]}") | $(ratio "${C_BPS[digest]}" "${C_BPS[full]}") | | |

A real coordinator in a compiled language needs less CPU than this Python
stand-in for either; the ratio is what the digest saves. The desired-state
\`304\` is unchanged: both runs answer \`304\` with no body.
EOF
say "wrote the idle-sync section of $OUT"
