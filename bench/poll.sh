#!/usr/bin/env bash
# Benchmark: a coordinator polling a node's `GET /v1/node` over the TCP API
# (bearer token, as in production), both the `200` path and the `304` path
# (`If-None-Match` with the ETag it already has), under load from wrk on
# loopback: requests per second, p99 latency, and the daemon's CPU per poll.
# Baseline, measured in the same run with the same wrk settings: nginx serving
# the same bytes as a static file (the cheapest way to answer an HTTP GET).
#
#   bash bench/poll.sh     # rewrites its section of docs/benchmarks.md (then runs bench/idle-sync.sh)
#
# Environment: FLEET_BIN_DIR (default target/release, built if missing),
# BENCH_SECONDS (per run, default 10), BENCH_CONNECTIONS (default 32),
# BENCH_PORT (default 43090; uses it and the next one), BENCH_OUT
# (default docs/benchmarks.md). Only loopback addresses are used.
# Not a test: it asserts nothing, it measures. Run it on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
CONNS="${BENCH_CONNECTIONS:-32}"
PORT="${BENCH_PORT:-43090}"
NGINX_PORT=$((PORT + 1))
OUT="${BENCH_OUT:-docs/benchmarks.md}"
THREADS=2

say() { printf '==> %s\n' "$*" >&2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh

APT_UPDATED=0
need() { # PACKAGE COMMAND: apt-get install PACKAGE unless COMMAND exists
  command -v "$2" >/dev/null && return
  if [[ $APT_UPDATED == 0 ]]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}
need wrk wrk
need curl curl

WORK="$(mktemp -d /tmp/fleet-bench-poll-XXXXXX)"
DAEMON_PID=""
NGINX_PID=""
cleanup() {
  [[ -n "$DAEMON_PID" ]] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
  [[ -n "$NGINX_PID" ]] && kill -TERM "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# nginx from Debian's package, unpacked rather than installed: installing it
# would start a system nginx on port 80.
NGINX="$(command -v nginx || true)"
if [[ -z "$NGINX" ]]; then
  if [[ $APT_UPDATED == 0 ]]; then apt-get update -qq; APT_UPDATED=1; fi
  # (apt warns that it downloads as root, not as _apt, into this private dir.)
  (cd "$WORK" && apt-get download -qq nginx >/dev/null 2>&1 && dpkg-deb -x nginx_*.deb nginx-pkg)
  NGINX="$WORK/nginx-pkg/usr/sbin/nginx"
fi

BIN="${FLEET_BIN_DIR:-$ROOT/target/release}"
if [[ -z "${FLEET_BIN_DIR:-}" ]]; then
  say "building the release daemon"
  cargo build --release --quiet -p fleet-agentd
fi

# --- the daemon ---------------------------------------------------------------
TOKEN="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$TOKEN" >"$WORK/token"
chmod 600 "$WORK/token"
mkdir -p "$WORK/state" "$WORK/departments.d"
NODE="bench-poll-$(basename "$WORK" | tail -c 7 | tr 'A-Z' 'a-z')"
cat >"$WORK/agent.toml" <<EOF
node_id = "$NODE"
state_dir = "$WORK/state"
socket = "$WORK/agentctl.sock"
departments_dir = "$WORK/departments.d"
[ports]
range = "43080-43089"
bind = "127.0.0.1"
[api]
listen = "127.0.0.1:$PORT"
token_file = "$WORK/token"
# The load generator is one client address; the default 200/s would measure the limiter.
requests_per_second = 0
[log]
format = "json"
level = "warn"
EOF
say "starting fleet-agentd on 127.0.0.1:$PORT"
"$BIN/fleet-agentd" --config "$WORK/agent.toml" >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
URL="http://127.0.0.1:$PORT/v1/node"
AUTH="Authorization: Bearer $TOKEN"
for _ in $(seq 1 300); do
  curl -fsS -o /dev/null -H "$AUTH" "$URL" 2>/dev/null && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log" >&2; exit 1; }
  sleep 0.1
done
curl -fsS -D "$WORK/headers" -o "$WORK/node.json" -H "$AUTH" "$URL"
ETAG="$(awk 'tolower($1) == "etag:" { sub(/\r$/, "", $2); print $2 }' "$WORK/headers")"
BYTES="$(wc -c <"$WORK/node.json")"
[[ "$(curl -s -o /dev/null -w '%{http_code}' -H "$AUTH" -H "If-None-Match: $ETAG" "$URL")" == 304 ]] ||
  { say "the daemon did not answer 304 to its own ETag"; exit 1; }

# --- the baseline ---------------------------------------------------------------
mkdir -p "$WORK/www" "$WORK/nginx-tmp"
cp "$WORK/node.json" "$WORK/www/node.json"
# nginx's workers run as nobody when started as root.
chmod 755 "$WORK" "$WORK/www"
chmod 644 "$WORK/www/node.json"
cat >"$WORK/nginx.conf" <<EOF
worker_processes $THREADS;
error_log $WORK/nginx-error.log;
pid $WORK/nginx.pid;
daemon off;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx-tmp;
  proxy_temp_path $WORK/nginx-tmp;
  fastcgi_temp_path $WORK/nginx-tmp;
  uwsgi_temp_path $WORK/nginx-tmp;
  scgi_temp_path $WORK/nginx-tmp;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    root $WORK/www;
    location = /v1/node { default_type application/json; try_files /node.json =404; }
  }
}
EOF
"$NGINX" -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log" &
NGINX_PID=$!
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$NGINX_PORT/v1/node" 2>/dev/null && break
  sleep 0.1
done

# --- runs -----------------------------------------------------------------------
TICKS="$(getconf CLK_TCK)"
# cpu_ticks PID: user+system ticks of PID and its children (nginx's workers).
cpu_ticks() {
  local p total=0
  for p in "$1" $(ps -o pid= --ppid "$1"); do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
  done
  echo "$total"
}
to_ms() { # wrk latency (e.g. 812.00us, 7.95ms, 1.02s) -> milliseconds
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.2f", n }'
}
# run NAME PID URL [HEADER...]: one wrk run; sets R_RPS R_P99 R_CPU_US R_REQS
run() {
  local name="$1" pid="$2" url="$3"; shift 3
  local args=() h
  for h in "$@"; do args+=(-H "$h"); done
  say "$name: wrk -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s"
  local c0 c1
  c0="$(cpu_ticks "$pid")"
  wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_PER_RUN}s" --latency "${args[@]}" "$url" >"$WORK/$name.wrk"
  c1="$(cpu_ticks "$pid")"
  R_REQS="$(awk '/requests in/ { print $1 }' "$WORK/$name.wrk")"
  R_RPS="$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$WORK/$name.wrk")"
  R_P99="$(to_ms "$(awk '$1 == "99%" { print $2 }' "$WORK/$name.wrk")")"
  R_CPU_US="$(awk -v c="$((c1 - c0))" -v t="$TICKS" -v n="$R_REQS" 'BEGIN { printf "%.1f", c / t / n * 1e6 }')"
  local non2xx
  non2xx="$(awk '/Non-2xx or 3xx/ { print $NF }' "$WORK/$name.wrk")"
  [[ -z "$non2xx" ]] || { say "$name: $non2xx answers were not 2xx/3xx"; cat "$WORK/$name.wrk" >&2; exit 1; }
  say "$name: $R_RPS req/s, p99 $R_P99 ms, $R_CPU_US µs CPU per request"
}

LOAD_BEFORE="$(cut -d' ' -f1 /proc/loadavg)"
run nginx "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/v1/node"
B_RPS=$R_RPS B_P99=$R_P99 B_CPU=$R_CPU_US
run node200 "$DAEMON_PID" "$URL" "$AUTH"
N_RPS=$R_RPS N_P99=$R_P99 N_CPU=$R_CPU_US
run node304 "$DAEMON_PID" "$URL" "$AUTH" "If-None-Match: $ETAG"
M_RPS=$R_RPS M_P99=$R_P99 M_CPU=$R_CPU_US
kill -0 "$DAEMON_PID" || { say "fleet-agentd died"; exit 1; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# One poll a second costs cpu_per_poll µs of CPU per second: % of a core = µs / 10^4.
core_pct() { awk -v u="$1" 'BEGIN { printf "%.4f", u / 10000 }'; }

write_bench_section poll "$OUT" <<EOF
## Coordinator polling \`GET /v1/node\`

Produced by \`bash bench/poll.sh\` (it rewrites this section only). Release
build, loopback, \`wrk -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s --latency\` per row, the
bearer token on every request, the rate limit off (one client address).
Baseline, measured in the same run: nginx ($("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), $THREADS workers, CPU summed over them) serving the
same $BYTES bytes as a static file. CPU is the server process's user+system
time from \`/proc/<pid>/stat\` over the run, divided by the requests served.
wrk shares the machine's $(nproc) cores with the server, as a coordinator's
poller would not.

$(machine_line) Load average (1 min) before the
runs: $LOAD_BEFORE. When other work shares the machine, requests/s and above
all p99 move from run to run (a stall lands in one row, not in all three);
CPU per request moves much less, so it is the figure to compare.

| | requests/s | p99 latency | CPU per request | ratio rps / baseline | ratio CPU / baseline |
|---|---|---|---|---|---|
| baseline: nginx, static file | $B_RPS | $B_P99 ms | $B_CPU µs | 1.00 | 1.00 |
| \`GET /v1/node\` → \`200\` | $N_RPS | $N_P99 ms | $N_CPU µs | $(ratio "$N_RPS" "$B_RPS") | $(ratio "$N_CPU" "$B_CPU") |
| \`GET /v1/node\` + \`If-None-Match\` → \`304\` | $M_RPS | $M_P99 ms | $M_CPU µs | $(ratio "$M_RPS" "$B_RPS") | $(ratio "$M_CPU" "$B_CPU") |

A coordinator polling a node once a second costs the daemon
$(core_pct "$N_CPU")% of one core on the \`200\` path and $(core_pct "$M_CPU")% on the \`304\`
path (goal: under 0.1%). Per 1,000 polls: $(awk -v u="$N_CPU" 'BEGIN { printf "%.1f", u }') ms
and $(awk -v u="$M_CPU" 'BEGIN { printf "%.1f", u }') ms of CPU.
EOF
say "wrote the poll section of $OUT"

# The other half of polling at fleet scale, the node's own sync to the
# coordinator (bytes and CPU per idle sync before and after the status digest,
# and a stand-in coordinator at 10,000 nodes / 15 s): its own script and section.
# BENCH_SYNC=0 skips it.
if [[ "${BENCH_SYNC:-1}" != 0 ]]; then
  cleanup; trap - EXIT # this script's daemon and nginx would share the CPUs
  FLEET_BIN_DIR="$BIN" BENCH_OUT="$OUT" bash bench/idle-sync.sh
fi
