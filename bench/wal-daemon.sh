#!/usr/bin/env bash
# Benchmark: the WAL service alone. A stopped PostgreSQL 15 cluster's backlog
# (`pgbench -i -s $BENCH_SCALE` with archive_command failing) is archived by
# fleet-agentd's look-ahead into a directory, with no PostgreSQL running and no
# archive_command: what the daemon itself costs per segment, without
# pgBackRest, the archiver or agentctl (bench/wal.sh has those side by side).
# Per run: time to the first object and the drain rate, the daemon's user and
# system CPU per segment (/proc/<pid>/stat), its VmHWM, and the anonymous
# memory and glibc arenas in /proc/<pid>/smaps at the end of the drain.
# The service runs as installed (BENCH_WAL_SHAPE=installed, the default): the
# unit's ExecStart= (`fleet-agent-wal --config <copy>`; before rss13
# `fleet-agentd --config <copy> wal-serve`) as
# postgres with the unit's Environment=, StateDirectory= and UMask=; with
# BENCH_WAL_SHAPE=inline, the whole daemon (`fleet-agentd --config agent.toml`)
# as root, as before rss13.
#
#   BENCH_PORT=44390 bash bench/wal-daemon.sh
#
# Environment: FLEET_BIN_DIR (default target/release, built if missing),
# BENCH_SCALE (50), BENCH_RUNS (3), BENCH_PARALLEL (wal.parallel_uploads, 4),
# BENCH_LEVEL (zstd level, 1), BENCH_PORT (46590, the cluster's while the
# backlog is made), BENCH_WAL_SHAPE (installed or inline), BENCH_WAL_UNIT (the
# unit file, default systemd/fleet-agent-wal.service), BENCH_ARRIVAL (backlog: the
# whole backlog is .ready at the start and only the look-ahead archives it; steady:
# the .ready files appear one at a time, BENCH_STEADY_GAP seconds apart (0.2),
# each followed at once by `agentctl wal push` as postgres, as PostgreSQL's
# archiver calls when a segment is done; the CPU of the calls and the service,
# both in one cpuacct cgroup, is reported beside the service's own).
# Prints its figures; writes no docs. Needs root (runuser).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
SCALE="${BENCH_SCALE:-50}"
RUNS="${BENCH_RUNS:-3}"
PARALLEL="${BENCH_PARALLEL:-4}"
LEVEL="${BENCH_LEVEL:-1}"
PORT="${BENCH_PORT:-46590}"
PG=/usr/lib/postgresql/15/bin
BIN="${FLEET_BIN_DIR:-$ROOT/target/release}"
if [[ -z "${FLEET_BIN_DIR:-}" ]]; then
  cargo build --release --quiet -p fleet-agentd -p agentctl
fi
SHAPE="${BENCH_WAL_SHAPE:-installed}"
UNIT="${BENCH_WAL_UNIT:-$ROOT/systemd/fleet-agent-wal.service}"
case "$SHAPE" in installed | inline) ;; *) say "BENCH_WAL_SHAPE must be installed or inline"; exit 1 ;; esac
ARRIVAL="${BENCH_ARRIVAL:-backlog}"
GAP="${BENCH_STEADY_GAP:-0.2}"
case "$ARRIVAL" in backlog | steady) ;; *) say "BENCH_ARRIVAL must be backlog or steady"; exit 1 ;; esac
CG=/sys/fs/cgroup/cpuacct/waldaemon-$$

WORK="$(mktemp -d /tmp/fleet-waldaemon-XXXXXX)"
chmod 755 "$WORK"
PID=""
cleanup() {
  [[ -f "$WORK/data/postmaster.pid" ]] && runuser -u postgres -- "$PG/pg_ctl" -D "$WORK/data" -m immediate -w stop >/dev/null 2>&1 || true
  [[ -n "$PID" ]] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  rm -rf "$WORK"
  [[ -d "$CG" ]] && rmdir "$CG" 2>/dev/null || true
}
trap cleanup EXIT

mkdir -p "$WORK/sock"
chown -R postgres: "$WORK"
runuser -u postgres -- "$PG/initdb" -A trust -U postgres --no-sync -D "$WORK/data" >/dev/null
cat >>"$WORK/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
wal_level = replica
archive_mode = on
archive_command = '/bin/false'
max_wal_size = '8GB'
wal_keep_size = '8GB'
fsync = off
CONF
runuser -u postgres -- "$PG/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
say "building a backlog: pgbench -i -s $SCALE with archiving failing"
"$PG/pgbench" -h "$WORK/sock" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
"$PG/psql" -h "$WORK/sock" -p "$PORT" -U postgres -XAtqc "SELECT pg_switch_wal()" postgres >/dev/null
runuser -u postgres -- "$PG/pg_ctl" -D "$WORK/data" -m fast -w stop >/dev/null
N=$(ls "$WORK/data/pg_wal/archive_status" | grep -c '\.ready$')
mapfile -t READY < <(ls "$WORK/data/pg_wal/archive_status" | grep '\.ready$' | sort)
mkdir -p "$WORK/ready-later" "$CG"
say "backlog: $N segments; $RUNS runs, parallel_uploads = $PARALLEL, zstd $LEVEL, $BIN"

# As installed: the unit's program (from FLEET_BIN_DIR by name) and arguments,
# with the config copy in the runtime directory, and its Environment=.
DAEMON=("$BIN/fleet-agentd" --config "$WORK/agent.toml")
if [[ "$SHAPE" == installed ]]; then
  read -ra ENVS <<<"$(unit_environment "$UNIT")"
  unit_exec EXEC "$UNIT" "$BIN" "$WORK/run/agent.toml" || exit 1
  DAEMON=(env "${ENVS[@]}" STATE_DIRECTORY="$WORK/wal-state"
    "${AS_POSTGRES[@]}" sh -c 'umask 0077 && exec "$@"' sh "${EXEC[@]}")
fi
say "WAL service ($SHAPE): ${DAEMON[*]}"

for run in $(seq "$RUNS"); do
  rm -rf "$WORK/archive" "$WORK/state" "$WORK/departments.d" "$WORK/run" "$WORK/wal-state"
  mkdir -p "$WORK/archive" "$WORK/state" "$WORK/departments.d"
  if [[ "$SHAPE" == installed ]]; then
    install -d -o postgres -g postgres -m 0750 "$WORK/archive"
    install -d -o postgres -g postgres -m 0755 "$WORK/run"
    install -d -o postgres -g postgres -m 0700 "$WORK/wal-state"
  fi
  cat >"$WORK/agent.toml" <<TOML
node_id = "waldaemon"
state_dir = "$WORK/state"
socket = "$WORK/agentctl.sock"
departments_dir = "$WORK/departments.d"
[wal]
target = "file://$WORK/archive"
$([[ "$SHAPE" == installed ]] && echo "socket = \"$WORK/run/wal.sock\"")
pg_wal_dir = "$WORK/data/pg_wal"
parallel_uploads = $PARALLEL
compression_level = $LEVEL
[api]
listen = ""
[log]
level = "warn"
TOML
  [[ "$SHAPE" == installed ]] && install -o postgres -g postgres -m 0400 "$WORK/agent.toml" "$WORK/run/agent.toml"
  # The binary whole in the page cache, as after an install (RssFile counts
  # what the kernel maps around each fault from the cache).
  cat "${EXEC[0]:-$BIN/fleet-agentd}" >/dev/null
  sync
  if [[ "$ARRIVAL" == steady ]]; then
    for r in "${READY[@]}"; do mv "$WORK/data/pg_wal/archive_status/$r" "$WORK/ready-later/"; done
  fi
  t0=$(date +%s.%N)
  cg0=$(cg_cpu_ns "$CG")
  # Not through in_cgroup: $! of a function started with & is its subshell.
  sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CG" "${DAEMON[@]}" >>"$WORK/daemon.log" 2>&1 &
  PID=$!
  first=""
  if [[ "$ARRIVAL" == steady ]]; then
    SOCK="$WORK/agentctl.sock"
    [[ "$SHAPE" == installed ]] && SOCK="$WORK/run/wal.sock"
    for _ in $(seq 500); do
      "$BIN/agentctl" --socket "$SOCK" wal status >/dev/null 2>&1 && break
      sleep 0.02
    done
    for r in "${READY[@]}"; do
      sleep "$GAP"
      mv "$WORK/ready-later/$r" "$WORK/data/pg_wal/archive_status/"
      (cd "$WORK/data" && in_cgroup "$CG" \
        "${AS_POSTGRES[@]}" "$BIN/agentctl" --socket "$SOCK" wal push "pg_wal/${r%.ready}") >/dev/null \
        || { say "agentctl wal push ${r%.ready} failed"; tail "$WORK/daemon.log" >&2; exit 1; }
      mv "$WORK/data/pg_wal/archive_status/$r" "$WORK/data/pg_wal/archive_status/${r%.ready}.done"
    done
  fi
  while :; do
    c=$(find "$WORK/archive" -name '*.zst' | wc -l)
    [[ -z "$first" ]] && ((c > 0)) && first=$(date +%s.%N)
    ((c >= N)) && break
    kill -0 "$PID" 2>/dev/null || { say "fleet-agentd exited"; tail "$WORK/daemon.log" >&2; exit 1; }
    sleep 0.05
  done
  t1=$(date +%s.%N)
  cg1=$(cg_cpu_ns "$CG")
  read -r user sys < <(awk '{ print $14, $15 }' "/proc/$PID/stat")
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$PID/status")
  anon=$(awk '/^Anonymous:/ { print $2 }' "/proc/$PID/smaps_rollup")
  file=$(awk '/^RssFile:/ { print $2 }' "/proc/$PID/status")
  # glibc's per-thread arenas start 64 MiB-aligned; counted: anonymous mappings
  # starting 16 MiB-aligned with more than 256 KiB resident.
  arenas=$(awk '/^[0-9a-f]+-[0-9a-f]+ / { a = ($1 ~ /^[0-9a-f]+000000-/) && $6 == "" } /^Rss:/ && a && $2 > 256 { n++; s += $2 } END { printf "%d (%.1f MiB)", n, s / 1024 }' "/proc/$PID/smaps")
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  if [[ "$ARRIVAL" == steady ]]; then
    for r in "${READY[@]}"; do mv "$WORK/data/pg_wal/archive_status/${r%.ready}.done" "$WORK/data/pg_wal/archive_status/$r"; done
  fi
  awk -v n="$N" -v a="$t0" -v f="$first" -v b="$t1" -v u="$user" -v s="$sys" -v hz="$(getconf CLK_TCK)" \
    -v h="$hwm" -v fi="$file" -v an="$anon" -v ar="$arenas" -v r="$run" -v cg="$((cg1 - cg0))" -v arr="$ARRIVAL" 'BEGIN {
    printf "run %d (%s): first object %.2f s, %d segments in %.2f s (%.1f/s), daemon CPU %.1f ms/segment (user %.1f, system %.1f), with the pushes %.1f ms/segment, VmHWM %.1f MiB, RssFile %.1f MiB, anonymous %.1f MiB, arenas over 256 KiB: %s\n",
      r, arr, f - a, n, b - a, n / (b - a), (u + s) * 1000 / hz / n, u * 1000 / hz / n, s * 1000 / hz / n, cg / 1e6 / n, h / 1024, fi / 1024, an / 1024, ar }'
done
