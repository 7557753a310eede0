#!/usr/bin/env bash
# Benchmark: WAL archiving throughput and archive_command latency of
#   (a) fleet-agent (`agentctl wal push %p`, daemon with look-ahead uploads),
#   (b) pgBackRest `archive-push` (Debian's 2.45), synchronous and asynchronous,
#   (c) the seed's one-CLI-per-segment approach (`cp` per call, no checks),
# into a directory target on the same disk AND into an S3-compatible server on
# loopback (BENCH_S3_SERVER: s3s-fs or moto, behind HAProxy's TLS, both tools
# against the same server and bucket, both over HTTPS), zstd where the
# tool compresses.
#
# Method: one PostgreSQL 15 cluster runs `pgbench -i -s $BENCH_SCALE` with
# archive_command failing, so a backlog of .ready segments (~1.2 GiB at scale 100)
# builds up; it is stopped and copied once per method. Each copy starts with
# that method's archive_command, and we time until PostgreSQL has archived the
# whole backlog (segments/s), sampling the backlog every 20 ms, and log each
# archive_command call's duration through the same stopwatch (bench/timed.c,
# compiled here; its own CPU per call is measured and reported with the run).
# CPU: every process a method starts (its fleet-agentd, the PostgreSQL copy
# with its archiver and every archive_command child, pgBackRest's async and
# local processes) runs in one cpuacct cgroup of its own, so processes that
# have exited still count; user+system of that cgroup over the drain, per
# archived segment. The S3 server's CPU (it stands in for a remote service:
# the server and HAProxy) is read from /proc/<pid>/stat and reported apart.
# The daemon's peak RSS during the drain is its VmHWM (it starts inside the
# timed span); its /proc/<pid>/status is also sampled every 20 ms through the
# drain for the split into file-backed (RssFile: the binary's pages) and
# anonymous memory (the binary is read whole into the page cache first, as
# after an install). Through FLEET_BIN_DIR the unit's program is taken by
# name, so an older build (no fleet-agent-wal) needs BENCH_WAL_UNIT=<its unit>
# (git show <rev>:systemd/...). Where each drain ends is reported beside it:
# when PostgreSQL was up, pgBackRest processes still running when the last
# .ready went, the CPU of the method and of the S3 server in the 2 s after
# (not counted), and with s3s-fs, whose objects are files, the count of each
# tool's objects (all segments, or the run fails) and when its first and last
# one was stored.
# Then a steady load (`pgbench -T $BENCH_LOAD_SECONDS`, 0: skipped) runs on
# each copy and we record the largest .ready backlog seen.
# Finally the time to restore 64 segments (1 GiB) of WAL: fetching every archived
# segment in order with `agentctl wal fetch` (prefetch) vs `pgbackrest archive-get`,
# from the directory and from S3, one process per segment as PostgreSQL starts
# them, each tool as the owner of its cache or spool (fleet-agentd's is root's here);
# the last segment each tool restored is compared with the original afterwards.
#
#   bash bench/wal.sh     # rewrites its section of docs/benchmarks.md
#
# Environment: FLEET_BIN_DIR (default target/release, built if missing),
# BENCH_SCALE (100), BENCH_LOAD_SECONDS (30), BENCH_OUT (docs/benchmarks.md),
# BENCH_PORT (46590), BENCH_S3_PORT (BENCH_PORT+1),
# BENCH_METHODS (all: fleet fleet-module fleet-zst3 pgbr-sync pgbr-async
# pgbr-async-zst1 seed fleet-s3 fleet-module-s3 pgbr-async-s3-zst1; fleet-module
# is the fleet method with PostgreSQL's archive_library set to the package's
# archive module wal/archive-module (built here with PGXS, needs
# postgresql-server-dev-15) instead of archive_command, so no shell, stopwatch or
# agentctl per segment, and fleet-module-s3 the same to S3 (its baseline
# pgbr-async-s3-zst1),
# BENCH_DRAIN_TIMEOUT (600 s), BENCH_NOTES (a file
# appended to the written section), BENCH_DAEMON_ENV (unit: the daemon gets the
# Environment= of systemd/fleet-agent-wal.service, as installed; none: without),
# BENCH_PARALLEL (the daemon's wal.parallel_uploads, 4 as its default),
# BENCH_OBJECT_CHECKSUM (xxh3, the daemon's default from 0.3.0; blake3 for FWAL2,
# the default of 0.2.x; sha256 for FWAL1 objects), BENCH_WAL_SHAPE (installed: the WAL service as the packaged
# fleet-agent-wal.service runs it, its ExecStart= (`fleet-agent-wal --config
# <copy>`; before rss13 `fleet-agentd --config <copy> wal-serve`) as
# postgres with the unit's StateDirectory= and UMask=, on its own socket, which
# archive_command's and restore_command's `agentctl` (as postgres) use; inline:
# the whole daemon, `fleet-agentd --config agent.toml` as root with the WAL
# service in-process, the shape before 2026-12-07's rss13), BENCH_WAL_UNIT (the
# unit file whose ExecStart= and Environment= are used; default
# systemd/fleet-agent-wal.service), BENCH_TIMER (c: bench/timed.c; sh: the
# #!/bin/sh wrapper with two `date` forks used before 2026-12-07, to compare),
# BENCH_S3_SERVER (s3s-fs, the default: the s3s-fs crate's server, Rust,
# objects as files, at BENCH_S3S_FS, default /opt/s3s-fs/bin/s3s-fs from
# `cargo install s3s-fs@0.14.1 --features binary --locked --root /opt/s3s-fs`;
# moto: moto[server] 5 at /opt/moto, Python, in memory, the server before
# 2026-12-07; docs/benchmarks.md "S3 server on loopback" compares them),
# BENCH_S3_LOG (a file to keep the S3 server's log in).
# Needs root (runuser, cgroup v1 cpuacct at /sys/fs/cgroup/cpuacct), a C
# compiler (cc), haproxy and the S3 server.
# Not a test: it measures. Run it on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
SCALE="${BENCH_SCALE:-100}"
LOAD_SECONDS="${BENCH_LOAD_SECONDS:-30}"
OUT="${BENCH_OUT:-docs/benchmarks.md}"
PORT="${BENCH_PORT:-46590}"
S3_PORT="${BENCH_S3_PORT:-$((PORT + 1))}"
METHODS="${BENCH_METHODS:-fleet fleet-module fleet-zst3 pgbr-sync pgbr-async pgbr-async-zst1 seed fleet-s3 fleet-module-s3 pgbr-async-s3-zst1}"
has_method() { [[ " $METHODS " == *" $1 "* ]]; }
S3_SERVER="${BENCH_S3_SERVER:-s3s-fs}"
declare -A S3_DESCS=([s3s-fs]="s3s-fs 0.14 (Rust, objects as files)" [moto]="moto (Python, in memory)")
S3_DESC="${S3_DESCS[$S3_SERVER]:-$S3_SERVER}"
MOTO=/opt/moto/bin/moto_server
S3S_FS="${BENCH_S3S_FS:-/opt/s3s-fs/bin/s3s-fs}"
CG=/sys/fs/cgroup/cpuacct
PG=/usr/lib/postgresql/15/bin

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

export DEBIAN_FRONTEND=noninteractive
missing=()
[[ -x $PG/initdb ]] || missing+=(postgresql-15)
command -v pgbackrest >/dev/null || missing+=(pgbackrest)
command -v jq >/dev/null || missing+=(jq)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
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
S3_PID=""
cleanup() {
  for d in "$WORK"/pg-*/data; do
    [[ -f "$d/postmaster.pid" ]] && runuser -u postgres -- "$PG/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
  done
  [[ -n "$DAEMON_PID" ]] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
  [[ -n "${HAPROXY_PID:-}" ]] && kill -TERM "$HAPROXY_PID" 2>/dev/null && wait "$HAPROXY_PID" 2>/dev/null || true
  [[ -n "$S3_PID" ]] && kill -TERM "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null || true
  # pgBackRest's async archive-get keeps prefetching after the last call and
  # would hold its lock past this run: end this run's processes (their
  # command lines name this run's config files), by pid.
  local p
  for p in $(pgrep -f -- "--config=$WORK/" || true); do kill -TERM "$p" 2>/dev/null || true; done
  [[ -n "${BENCH_S3_LOG:-}" && -f "$WORK/s3-server.log" ]] && cp "$WORK/s3-server.log" "$BENCH_S3_LOG"
  # pgBackRest's async process may still be finishing in its spool dir.
  rm -rf "$WORK" 2>/dev/null || { sleep 2; rm -rf "$WORK" 2>/dev/null || true; }
  for g in "$CG"/walbench-"$$"-*; do [[ -d "$g" ]] && rmdir "$g" 2>/dev/null || true; done
}
trap cleanup EXIT
as_pg() { runuser -u postgres -- "$@"; }

# --- pgBackRest ----------------------------------------------------------------------
pgbr_repo() { # NAME: the repo lines, S3 for names with -s3
  if [[ "$1" == *-s3* ]]; then
    cat <<CONF
repo1-type=s3
repo1-path=/$1
repo1-s3-bucket=walbench
repo1-s3-endpoint=localhost
repo1-storage-port=$S3_PORT
repo1-s3-region=us-east-1
repo1-s3-key=test
repo1-s3-key-secret=test
repo1-s3-uri-style=path
repo1-storage-ca-file=$WORK/s3-cert.pem
CONF
  else
    echo "repo1-path=$WORK/$1-repo"
  fi
}
pgbr_conf() { # NAME DATA SOCK ASYNC [ZSTD_LEVEL]
  # lock-path: pgBackRest's default (/tmp/pgbackrest) is one per host, so two
  # runs at once (the stanza is "bench" in both) would take each other's lock.
  mkdir -p "$WORK/$1-repo" "$WORK/$1-spool" "$WORK/$1-log" "$WORK/$1-lock"
  chown postgres: "$WORK/$1-repo" "$WORK/$1-spool" "$WORK/$1-log" "$WORK/$1-lock"
  cat >"$WORK/$1.conf" <<CONF
[global]
$(pgbr_repo "$1")
compress-type=zst
compress-level=${5:-3}
log-path=$WORK/$1-log
log-level-console=warn
log-level-file=off
spool-path=$WORK/$1-spool
lock-path=$WORK/$1-lock
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

# --- S3 on loopback: s3s-fs or moto behind HAProxy's TLS ----------------------------
# pgBackRest speaks only HTTPS to S3, and its 2.45 checks the DNS names of the
# certificate (not IP addresses: hence localhost). moto's own TLS (werkzeug)
# ends connections without close_notify, which OpenSSL 3 refuses, and s3s-fs
# has no TLS, so HAProxy terminates TLS and both tools reach the same server
# through it, for either server alike.
# s3s-fs: Rust (s3s, hyper, tokio), checks every request's SigV4 signature
# against the one key pair given here, stores each object as a file under
# $WORK/s3s-fs/<bucket>/<key> (written to a temp file, renamed, no fsync) and
# an MD5 of it for the ETag. moto: Python (werkzeug), keeps objects in memory,
# accepts any signature. Both stand in for a remote service whose CPU is not
# the host's; what each costs here is reported beside the figures.
# The certificate says CA:FALSE: rustls refuses a CA certificate as the server's
# own (the openssl default for -x509), where OpenSSL accepts it. fleet-agentd's
# S3 client (object_store, native roots) trusts it through SSL_CERT_FILE.
S3_BACKEND_PORT=$((S3_PORT + 1))
HAPROXY_PID=""
S3_ROOT="$WORK/s3s-fs"
if has_method fleet-s3 || has_method fleet-module-s3 || has_method pgbr-async-s3-zst1; then
  case "$S3_SERVER" in
    s3s-fs) [[ -x $S3S_FS ]] || { say "$S3S_FS is missing (cargo install s3s-fs@0.14.1 --features binary --locked --root /opt/s3s-fs)"; exit 1; } ;;
    moto) [[ -x $MOTO ]] || { say "$MOTO is missing"; exit 1; } ;;
    *) say "BENCH_S3_SERVER must be s3s-fs or moto"; exit 1 ;;
  esac
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE -keyout "$WORK/s3-key.pem" -out "$WORK/s3-cert.pem" 2>/dev/null
  cat "$WORK/s3-cert.pem" "$WORK/s3-key.pem" >"$WORK/s3-haproxy.pem"
  chmod 644 "$WORK/s3-cert.pem"
  if [[ "$S3_SERVER" == s3s-fs ]]; then
    mkdir -p "$S3_ROOT"
    "$S3S_FS" --host 127.0.0.1 --port "$S3_BACKEND_PORT" --access-key test --secret-key test "$S3_ROOT" >"$WORK/s3-server.log" 2>&1 &
  else
    "$MOTO" -H 127.0.0.1 -p "$S3_BACKEND_PORT" >"$WORK/s3-server.log" 2>&1 &
  fi
  S3_PID=$!
  cat >"$WORK/haproxy.cfg" <<CFG
global
  maxconn 256
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend s3
  bind 127.0.0.1:$S3_PORT ssl crt $WORK/s3-haproxy.pem
  default_backend s3
backend s3
  server s3 127.0.0.1:$S3_BACKEND_PORT
CFG
  haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
  HAPROXY_PID=$!
  # Signed (s3s-fs refuses anonymous requests; moto takes any signature).
  s3_curl() { curl -fsS --cacert "$WORK/s3-cert.pem" --aws-sigv4 aws:amz:us-east-1:s3 --user test:test \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -o /dev/null "$@"; }
  for _ in $(seq 300); do
    s3_curl "https://localhost:$S3_PORT/" 2>/dev/null && break
    sleep 0.2
  done
  s3_curl -X PUT "https://localhost:$S3_PORT/walbench" || { say "$S3_SERVER did not start"; cat "$WORK/s3-server.log" >&2; exit 1; }
  printf 'access_key_id = test\nsecret_access_key = test\n' >"$WORK/s3-credentials"
fi

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
for repo in pgbr-sync pgbr-async pgbr-async-zst1 pgbr-async-s3-zst1; do
  has_method "$repo" || continue
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
SHAPE="${BENCH_WAL_SHAPE:-installed}"
case "$SHAPE" in
  installed)
    # As fleet-agent-wal.service: the runtime directory (/run/fleet-agent-wal:
    # the config copy, the S3 credentials copy, the socket; 0755, owner
    # postgres), the state directory (/var/lib/fleet-agent-wal, 0700) passed in
    # STATE_DIRECTORY, and the process as postgres.
    WAL_RUN="$FLEET_DIR/run"; WAL_STATE="$FLEET_DIR/wal-state"
    install -d -o postgres -g postgres -m 0755 "$WAL_RUN"
    install -d -o postgres -g postgres -m 0700 "$WAL_STATE"
    WAL_SOCKET="$WAL_RUN/wal.sock"
    SHAPE_DESC="as installed: the unit's ExecStart= (with a copy of agent.toml) as postgres, its User=, UMask=, StateDirectory= and Environment=, \`agentctl --socket <its socket> wal push %p\` / \`wal fetch\` as postgres"
    ;;
  inline)
    WAL_SOCKET="$FLEET_DIR/agentctl.sock"
    SHAPE_DESC="inline (BENCH_WAL_SHAPE=inline): the whole daemon, \`fleet-agentd --config agent.toml\` as root with the WAL service in-process, \`agentctl wal push %p\` against its control socket"
    ;;
  *) say "BENCH_WAL_SHAPE must be installed or inline"; exit 1 ;;
esac
# The daemon runs with the environment the installed unit gives it (its
# Environment= lines: MALLOC_ARENA_MAX=2), read from the unit file rather than
# repeated here; BENCH_DAEMON_ENV=none runs it without, for the comparison.
UNIT="${BENCH_WAL_UNIT:-$ROOT/systemd/fleet-agent-wal.service}"
UNIT_ENV=()
if [[ "${BENCH_DAEMON_ENV:-unit}" == unit ]]; then
  read -ra UNIT_ENV <<<"$(unit_environment "$UNIT")"
fi
# Installed, the service runs the unit's ExecStart=: its program from
# FLEET_BIN_DIR by name, its arguments with the runtime directory's config
# copy in place of /run/fleet-agent-wal/agent.toml.
WAL_EXEC=()
if [[ "$SHAPE" == installed ]]; then
  unit_exec WAL_EXEC "$UNIT" "$BIN" "$WAL_RUN/agent.toml" || exit 1
  SHAPE_DESC="$SHAPE_DESC; ExecStart= here: ${WAL_EXEC[*]#"$ROOT"/}"
fi
start_daemon() { # PG_WAL_DIR CONNINFO ARCHIVE(file://... or s3://...) COMPRESSION_LEVEL [CGROUP]
  [[ -n "$DAEMON_PID" ]] && { kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; }
  local s3=""
  [[ "$3" == s3://* ]] && s3="[wal.s3]
endpoint = \"https://localhost:$S3_PORT\"
region = \"us-east-1\"
credentials_file = \"$WORK/s3-credentials\"
path_style = true"
  local wal_socket=""
  if [[ "$SHAPE" == installed ]]; then
    wal_socket="socket = \"$WAL_SOCKET\""
    # The default file:// target is made by the unit's ExecStartPre, owned by
    # the writer; here the bench's target directory likewise.
    [[ "$3" == file://* ]] && install -d -o postgres -g postgres -m 0750 "${3#file://}"
  fi
  cat >"$FLEET_DIR/agent.toml" <<TOML
node_id = "walbench"
state_dir = "$FLEET_DIR/state"
socket = "$FLEET_DIR/agentctl.sock"
departments_dir = "$FLEET_DIR/departments.d"
[wal]
target = "$3"
$wal_socket
pg_wal_dir = "$1"
postgres = "$2"
parallel_uploads = ${BENCH_PARALLEL:-4}
compression_level = $4
object_checksum = "${BENCH_OBJECT_CHECKSUM:-xxh3}"
$s3
[api]
listen = ""
[log]
level = "warn"
TOML
  # SSL_CERT_FILE: the native root store (rustls-native-certs) then trusts moto's certificate.
  # Not through in_cgroup: a function started with `&` runs in a subshell, and
  # $! would be that subshell's pid, not the daemon's.
  local daemon=(env "${UNIT_ENV[@]}" SSL_CERT_FILE="$WORK/s3-cert.pem" "$BIN/fleet-agentd" --config "$FLEET_DIR/agent.toml")
  if [[ "$SHAPE" == installed ]]; then
    # The unit's ExecStartPre=+: copies for postgres alone, mode 0400.
    install -o postgres -g postgres -m 0400 "$FLEET_DIR/agent.toml" "$WAL_RUN/agent.toml"
    rm -f "$WAL_RUN/s3-credentials"
    [[ -n "$s3" ]] && install -o postgres -g postgres -m 0400 "$WORK/s3-credentials" "$WAL_RUN/s3-credentials"
    daemon=(env "${UNIT_ENV[@]}" SSL_CERT_FILE="$WORK/s3-cert.pem" STATE_DIRECTORY="$WAL_STATE"
      "${AS_POSTGRES[@]}" sh -c 'umask 0077 && exec "$@"' sh "${WAL_EXEC[@]}")
  fi
  if [[ -n "${5:-}" ]]; then
    sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$5" "${daemon[@]}" >>"$FLEET_DIR/daemon.log" 2>&1 &
  else
    "${daemon[@]}" >>"$FLEET_DIR/daemon.log" 2>&1 &
  fi
  DAEMON_PID=$!
  for _ in $(seq 500); do
    # The WAL service's socket carries the WAL routes only.
    if [[ "$SHAPE" == installed ]]; then
      "$BIN/agentctl" --socket "$WAL_SOCKET" wal status >/dev/null 2>&1 && return
    else
      "$BIN/agentctl" --socket "$WAL_SOCKET" status >/dev/null 2>&1 && return
    fi
    nap 0.02
  done
  say "fleet-agentd did not start"; cat "$FLEET_DIR/daemon.log" >&2; exit 1
}

# The stopwatch: logs each call's microseconds, keeps the exit code. It runs
# in the method's cgroup (PostgreSQL starts it), for both methods alike; what
# it costs per call is measured below and reported with the figures.
WRAP="$WORK/timed"
TIMER="${BENCH_TIMER:-c}"
case "$TIMER" in
  c)
    # Static: no dynamic loader at each of the ~100 calls per drain.
    cc -O2 -static -o "$WRAP" "$ROOT/bench/timed.c" 2>/dev/null || cc -O2 -o "$WRAP" "$ROOT/bench/timed.c"
    TIMER_DESC="bench/timed.c (one posix_spawn, two clock_gettime)"
    ;;
  sh)
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
    TIMER_DESC="a #!/bin/sh wrapper forking \`date\` twice (the stopwatch before 2026-12-07)"
    ;;
  *) say "BENCH_TIMER must be c or sh"; exit 1 ;;
esac
chmod 755 "$WRAP"

# The stopwatch's own CPU per call: 200 `sh -c` calls of it around /bin/true
# minus 200 of /bin/true alone, each batch in a cpuacct cgroup of its own, as
# PostgreSQL's archiver runs archive_command (best of 3 pairs).
stopwatch_cpu() {
  local g="$CG/walbench-$$-stopwatch" best="" round a b per
  mkdir -p "$g"
  for round in 1 2 3; do
    a=$(cg_cpu_ns "$g")
    in_cgroup "$g" bash -c 'for ((i = 0; i < 200; i++)); do sh -c /bin/true; done'
    b=$(cg_cpu_ns "$g")
    local bare=$((b - a))
    a=$(cg_cpu_ns "$g")
    in_cgroup "$g" bash -c 'for ((i = 0; i < 200; i++)); do sh -c "$0 $1 /bin/true"; done' "$WRAP" "$WORK/stopwatch.log"
    b=$(cg_cpu_ns "$g")
    per=$(( (b - a - bare) / 200 ))
    [[ -z "$best" || $per -lt $best ]] && best=$per
  done
  rm -f "$WORK/stopwatch.log"
  awk -v ns="$best" 'BEGIN { printf "%.2f", ns / 1e6 }'
}
STOPWATCH_MS=$(stopwatch_cpu)
MODULE_DIR="$WORK/archive-module"
if has_method fleet-module || has_method fleet-module-s3; then
  # Built out of tree into the run's directory, readable by postgres.
  mkdir -p "$MODULE_DIR"
  cp "$ROOT/wal/archive-module/fleet_archive.c" "$ROOT/wal/archive-module/Makefile" "$MODULE_DIR/"
  make -s -C "$MODULE_DIR" PG_CONFIG="$PG/pg_config" fleet_archive.so >/dev/null \
    || { say "fleet-module: building wal/archive-module failed (needs postgresql-server-dev-15)"; exit 1; }
  chmod -R a+rX "$MODULE_DIR"
fi
say "stopwatch ($TIMER): $STOPWATCH_MS ms CPU per call"
# utime+stime (+ reaped children) of one process, in clock ticks.
proc_ticks() { awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
TICK=$(getconf CLK_TCK)

# Counted with a glob and waited with `read -t` on a pipe nobody writes: no
# process per sample, so sampling every 20 ms takes nothing from the methods.
# (nullglob: testing the first name instead raced with PostgreSQL renaming it.)
ready_count() {
  local f restore
  restore=$(shopt -p nullglob)
  shopt -s nullglob
  f=("$1"/pg_wal/archive_status/*.ready)
  $restore
  echo "${#f[@]}"
}
exec {NAP_FD}<> <(:)
nap() { read -r -t "$1" -u "$NAP_FD" _ || true; }

# The daemon's memory through the drain, from /proc/<pid>/status with `read`
# (no process per sample): the largest RssFile and RssAnon seen, and both at
# the largest VmRSS seen. kB.
SAMPLE_RSS=0 SAMPLE_FILE_AT=0 SAMPLE_ANON_AT=0 SAMPLE_FILE_MAX=0 SAMPLE_ANON_MAX=0 SAMPLES=0
sample_reset() { SAMPLE_RSS=0 SAMPLE_FILE_AT=0 SAMPLE_ANON_AT=0 SAMPLE_FILE_MAX=0 SAMPLE_ANON_MAX=0 SAMPLES=0; }
sample_rss() {
  local k v _u rss=0 file=0 anon=0
  while read -r k v _u; do
    case "$k" in
      VmRSS:) rss=$v ;;
      RssAnon:) anon=$v ;;
      RssFile:) file=$v ;;
    esac
  done <"/proc/$1/status" 2>/dev/null || return 0
  SAMPLES=$((SAMPLES + 1))
  ((file > SAMPLE_FILE_MAX)) && SAMPLE_FILE_MAX=$file
  ((anon > SAMPLE_ANON_MAX)) && SAMPLE_ANON_MAX=$anon
  if ((rss > SAMPLE_RSS)); then SAMPLE_RSS=$rss SAMPLE_FILE_AT=$file SAMPLE_ANON_AT=$anon; fi
  return 0
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

declare -A RATE P50 P99 DRAIN MAXLOAD CPUSEG DCPUSEG S3CPUSEG HACPUSEG RSS RSSSPLIT PGSTART FIRSTOBJ LASTOBJ TAILCPU TAILS3 ASYNCLEFT
# s3_ticks: the S3 server's and HAProxy's CPU so far, in clock ticks.
s3_ticks() { echo $(( $(proc_ticks "$S3_PID") + $(proc_ticks "$HAPROXY_PID") )); }
RAN=()
run_method() { # NAME ARCHIVE_COMMAND_BUILDER
  local name="$1" dir="$WORK/pg-$1"
  has_method "$name" || return 0
  RAN+=("$name")
  local cg="$CG/walbench-$$-$name"
  mkdir -p "$cg"
  rm -rf "$dir"; cp -a "$SRC" "$dir"
  # The copy's dirty pages would otherwise be written back during the timed
  # drain, slowing every fsync of whichever method runs next.
  sync
  local data="$dir/data" sock="$dir/sock" lat="$dir/latency.log"
  : >"$lat"; chown postgres: "$lat"
  local cmd; cmd="$("$2" "$data" "$sock")"
  if [[ "$name" == fleet-module* ]]; then
    # PostgreSQL 15 uses archive_library when it is set; no call to time.
    cat >>"$data/postgresql.conf" <<CONF
unix_socket_directories = '$sock'
archive_library = '$MODULE_DIR/fleet_archive'
fleet_archive.socket = '$WAL_SOCKET'
CONF
  else
    cat >>"$data/postgresql.conf" <<CONF
unix_socket_directories = '$sock'
archive_command = '$WRAP $lat $cmd'
CONF
  fi
  say "$name: draining $BACKLOG segments"
  # The service's binary whole in the page cache, as right after installing
  # it: RssFile counts the pages the kernel maps around each fault from the
  # cache (fault-around), so a binary partly evicted would show less.
  if [[ "$name" == fleet* ]]; then
    cat "${WAL_EXEC[0]:-$BIN/fleet-agentd}" "$BIN/agentctl" >/dev/null
  fi
  local t0 t1 tpg cpu0 s3t0=0 hat0=0 dcpu=0
  [[ -n "$S3_PID" ]] && { s3t0=$(s3_ticks); hat0=$(proc_ticks "$HAPROXY_PID"); }
  cpu0=$(cg_cpu_ns "$cg")
  t0=$(now)
  # The daemon starts inside the timed span: its look-ahead begins at once.
  case "$name" in
    fleet) start_daemon "$data/pg_wal" "host=$sock port=$PORT user=postgres" "file://$WORK/archive-fleet" 1 "$cg" ;;
    fleet-module) start_daemon "$data/pg_wal" "host=$sock port=$PORT user=postgres" "file://$WORK/archive-fleet-module" 1 "$cg" ;;
    fleet-zst3) start_daemon "$data/pg_wal" "host=$sock port=$PORT user=postgres" "file://$WORK/archive-fleet-zst3" 3 "$cg" ;;
    fleet-s3) start_daemon "$data/pg_wal" "host=$sock port=$PORT user=postgres" "s3://walbench/fleet" 1 "$cg" ;;
    fleet-module-s3) start_daemon "$data/pg_wal" "host=$sock port=$PORT user=postgres" "s3://walbench/fleet-module" 1 "$cg" ;;
  esac
  in_cgroup "$cg" runuser -u postgres -- "$PG/pg_ctl" -D "$data" -l "$dir/pg.log" -w start >/dev/null
  tpg=$(now)
  local deadline=$((SECONDS + ${BENCH_DRAIN_TIMEOUT:-600}))
  sample_reset
  while (($(ready_count "$data") > 0)); do
    if ((SECONDS > deadline)); then
      say "$name: the backlog did not drain"; tail -n 20 "$FLEET_DIR/daemon.log" "$dir/pg.log" >&2; exit 1
    fi
    [[ "$name" == fleet* ]] && sample_rss "$DAEMON_PID"
    nap 0.02
  done
  t1=$(now)
  local cpu1 s3t1=0; cpu1=$(cg_cpu_ns "$cg")
  CPUSEG[$name]=$(awk -v c="$(( cpu1 - cpu0 ))" -v n="$BACKLOG" 'BEGIN { printf "%.1f", c / n / 1e6 }')
  if [[ -n "$S3_PID" && "$name" == *-s3* ]]; then
    s3t1=$(s3_ticks)
    S3CPUSEG[$name]=$(awk -v c="$(( s3t1 - s3t0 ))" -v n="$BACKLOG" -v hz="$TICK" 'BEGIN { printf "%.1f", c * 1000 / hz / n }')
    HACPUSEG[$name]=$(awk -v c="$(( $(proc_ticks "$HAPROXY_PID") - hat0 ))" -v n="$BACKLOG" -v hz="$TICK" 'BEGIN { printf "%.1f", c * 1000 / hz / n }')
  else
    S3CPUSEG[$name]="-"; HACPUSEG[$name]="-"
  fi
  # Is the drain's end where each tool's work ends? pgBackRest processes
  # still in the method's cgroup when the last .ready went, and the CPU that
  # the method and the S3 server spent in the next 2 s (not in the figures).
  local p left=0
  for p in $(cat "$cg/cgroup.procs"); do
    [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == pgbackrest ]] && left=$((left + 1))
  done
  ASYNCLEFT[$name]=$left
  if [[ "$name" == fleet* ]]; then
    dcpu=$(proc_ticks "$DAEMON_PID")
    DCPUSEG[$name]=$(awk -v c="$dcpu" -v n="$BACKLOG" -v hz="$TICK" 'BEGIN { printf "%.1f", c * 1000 / hz / n }')
    RSS[$name]=$(awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$DAEMON_PID/status")
    RSSSPLIT[$name]="$(mib "$SAMPLE_FILE_AT") / $(mib "$SAMPLE_ANON_AT") ($(mib "$SAMPLE_FILE_MAX") / $(mib "$SAMPLE_ANON_MAX"))"
    say "$name: daemon VmHWM ${RSS[$name]} MiB; $SAMPLES samples: at the largest VmRSS ($(mib "$SAMPLE_RSS") MiB) RssFile / RssAnon ${RSSSPLIT[$name]} MiB (largest of each in parentheses)"
  else
    DCPUSEG[$name]="-"; RSS[$name]="-"; RSSSPLIT[$name]="-"
  fi
  # A drain that ended without storing every segment would flatter the method.
  case "$name" in
    fleet|fleet-zst3|fleet-module) local objects; objects=$(find "$WORK/archive-$name" -name '0*' -type f | wc -l)
      ((objects >= BACKLOG)) || { say "$name: only $objects objects for $BACKLOG segments"; exit 1; } ;;
  esac
  # With s3s-fs the objects are files: count them for both tools, and note
  # when the first and the last one was stored (seconds after the drain began).
  FIRSTOBJ[$name]="-"; LASTOBJ[$name]="-"
  if [[ "$S3_SERVER" == s3s-fs && -n "$S3_PID" && "$name" == *-s3* ]]; then
    local prefix=pgbr-async-s3-zst1 stamps
    [[ "$name" == fleet* ]] && prefix=fleet
    [[ "$name" == fleet-module* ]] && prefix=fleet-module
    stamps=$(find "$S3_ROOT/walbench/$prefix" -regextype posix-extended -regex '.*/[0-9A-F]{24}[^/]*' -type f -printf '%T@\n' | sort -n)
    local objects; objects=$(grep -c . <<<"$stamps" || true)
    ((objects >= BACKLOG)) || { say "$name: only $objects objects for $BACKLOG segments"; exit 1; }
    FIRSTOBJ[$name]=$(elapsed "$t0" "$(head -n 1 <<<"$stamps")")
    LASTOBJ[$name]=$(elapsed "$t0" "$(tail -n 1 <<<"$stamps")")
  fi
  nap 2
  TAILCPU[$name]=$(awk -v c="$(( $(cg_cpu_ns "$cg") - cpu1 ))" 'BEGIN { printf "%.0f", c / 1e6 }')
  TAILS3[$name]="-"
  [[ -n "$S3_PID" && "$name" == *-s3* ]] && TAILS3[$name]=$(awk -v c="$(( $(s3_ticks) - s3t1 ))" -v hz="$TICK" 'BEGIN { printf "%.0f", c * 1000 / hz }')
  PGSTART[$name]=$(elapsed "$t0" "$tpg")
  DRAIN[$name]=$(elapsed "$t0" "$t1")
  RATE[$name]=$(awk -v n="$BACKLOG" -v t="${DRAIN[$name]}" 'BEGIN { printf "%.1f", n / t }')
  read -r P50[$name] P99[$name] < <(awk '$2 == 0 { print $1 }' "$lat" | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) { print "- -"; exit } m = int((NR + 1) / 2); h = int(NR * 0.99); if (h < 1) h = 1; printf "%.1f %.1f\n", v[m] / 1000, v[h] / 1000 }')
  say "$name: ${DRAIN[$name]}s, ${RATE[$name]} segments/s, p50 ${P50[$name]} ms, CPU ${CPUSEG[$name]} ms/segment (daemon ${DCPUSEG[$name]}, S3 server ${S3CPUSEG[$name]} of it HAProxy ${HACPUSEG[$name]}), daemon peak RSS ${RSS[$name]} MiB"
  say "$name: PostgreSQL up at ${PGSTART[$name]} s, first / last object stored at ${FIRSTOBJ[$name]} / ${LASTOBJ[$name]} s, drain end ${DRAIN[$name]} s; pgBackRest processes left ${ASYNCLEFT[$name]}; CPU in the 2 s after: method ${TAILCPU[$name]} ms, S3 server ${TAILS3[$name]} ms"

  say "$name: steady load for ${LOAD_SECONDS}s"
  local max=0 c
  ((LOAD_SECONDS > 0)) &&
  "$PG/pgbench" -h "$sock" -p "$PORT" -U postgres -c 4 -j 2 -T "$LOAD_SECONDS" postgres >/dev/null 2>&1 &
  local bench=$!
  while kill -0 "$bench" 2>/dev/null; do
    c=$(ready_count "$data"); ((c > max)) && max=$c
    sleep 0.5
  done
  wait "$bench" || true
  MAXLOAD[$name]=$max
  as_pg "$PG/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  # Keep the disk use bounded; the pgBackRest clusters serve archive-get later.
  [[ "$name" == pgbr-async* ]] || rm -rf "$dir"
}

cmd_fleet() { echo "$BIN/agentctl --socket $WAL_SOCKET wal push %p"; }
cmd_pgbr_sync() { pgbr_conf pgbr-sync "$1" "$2" n; echo "pgbackrest --config=$WORK/pgbr-sync.conf --stanza=bench archive-push %p"; }
cmd_pgbr_async_zst1() { pgbr_conf pgbr-async-zst1 "$1" "$2" y 1; echo "pgbackrest --config=$WORK/pgbr-async-zst1.conf --stanza=bench archive-push %p"; }
cmd_pgbr_async() { pgbr_conf pgbr-async "$1" "$2" y; echo "pgbackrest --config=$WORK/pgbr-async.conf --stanza=bench archive-push %p"; }
cmd_pgbr_async_s3_zst1() { pgbr_conf pgbr-async-s3-zst1 "$1" "$2" y 1; echo "pgbackrest --config=$WORK/pgbr-async-s3-zst1.conf --stanza=bench archive-push %p"; }
cmd_seed() { mkdir -p "$WORK/archive-seed"; chown postgres: "$WORK/archive-seed"; echo "cp %p $WORK/archive-seed/%f"; }

declare -A DESC=(
  [fleet]="fleet-agent (\`agentctl wal push\`, ${BENCH_PARALLEL:-4} parallel look-ahead uploads), zstd 1 (its default)"
  [fleet-zst3]='fleet-agent, zstd 3'
  [pgbr-async]='pgBackRest archive-push async (process-max=4), zstd 3 (its zst default)'
  [pgbr-async-zst1]='pgBackRest archive-push async (process-max=4), zstd 1'
  [pgbr-sync]='pgBackRest archive-push sync, zstd 3'
  [seed]='seed: one `cp` per call, uncompressed, no checks'
  [fleet-s3]='fleet-agent, zstd 1'
  [fleet-module]='fleet-agent through archive_library (wal/archive-module, the packaged module: no shell, stopwatch or agentctl per segment), zstd 1'
  [fleet-module-s3]='fleet-agent through archive_library, zstd 1'
  [pgbr-async-s3-zst1]='pgBackRest archive-push async (process-max=4), zstd 1'
)
# Each method's baseline: pgBackRest async at the same zstd level into the same target.
declare -A BASE=(
  [fleet]=pgbr-async-zst1 [fleet-zst3]=pgbr-async [pgbr-async]=pgbr-async
  [pgbr-async-zst1]=pgbr-async-zst1 [pgbr-sync]=pgbr-async [seed]=pgbr-async-zst1
  [fleet-s3]=pgbr-async-s3-zst1 [pgbr-async-s3-zst1]=pgbr-async-s3-zst1
  [fleet-module]=pgbr-async-zst1 [fleet-module-s3]=pgbr-async-s3-zst1
)

# --- restore 64 segments (1 GiB) of WAL ------------------------------------------------
mapfile -t SEGMENTS < <(ls "$SRC/data/pg_wal/archive_status" | sed -n 's/\.ready$//p' | grep -E '^[0-9A-F]{24}$' | sort | head -n 64)
mkdir -p "$WORK/fetch"; chown postgres: "$WORK/fetch"
declare -A FETCH_FLEET FETCH_PGBR
restore() { # TARGET(dir|s3) PGBR_CONF: the daemon must be on that target now
  say "restore ($1): fetching ${#SEGMENTS[@]} segments in order"
  local t0 t1 s
  t0=$(now)
  # Like PostgreSQL, which unlinks RECOVERYXLOG before each restore_command.
  # Installed, restore_command runs as postgres (one runuser for the loop, as
  # for pgBackRest below); inline, as root beside the root daemon.
  local fetch_as=(bash -c); [[ "$SHAPE" == installed ]] && fetch_as=(runuser -u postgres -- bash -c)
  "${fetch_as[@]}" 'bin=$1 sock=$2 sysid=$3 dest=$4; shift 4
    for s in "$@"; do
      rm -f "$dest"
      "$bin/agentctl" --socket "$sock" wal fetch --system-id "$sysid" "$s" "$dest"
    done' _ "$BIN" "$WAL_SOCKET" "$SYSID" "$WORK/fetch/RECOVERYXLOG" "${SEGMENTS[@]}"
  t1=$(now)
  FETCH_FLEET[$1]=$(elapsed "$t0" "$t1")
  # Outside the timed span: the last segment restored is the one archived.
  cmp -s "$WORK/fetch/RECOVERYXLOG" "$SRC/data/pg_wal/${SEGMENTS[-1]}" || { say "restore ($1): fleet-agent's ${SEGMENTS[-1]} differs from the original"; exit 1; }
  t0=$(now)
  # Each tool runs as the owner of its spool or cache, one process per segment
  # as PostgreSQL starts them; one `runuser` for the whole loop, since one per
  # call (a PAM session, ~35 ms on the 2-core host) was charged to pgBackRest only.
  as_pg bash -c 'set -e; conf=$1 dest=$2; shift 2
    for s in "$@"; do
      rm -f "$dest"
      pgbackrest --config="$conf" --stanza=bench archive-get "$s" "$dest" >/dev/null
    done' _ "$WORK/$2.conf" "$WORK/fetch/RECOVERYXLOG.pgbr" "${SEGMENTS[@]}"
  t1=$(now)
  FETCH_PGBR[$1]=$(elapsed "$t0" "$t1")
  cmp -s "$WORK/fetch/RECOVERYXLOG.pgbr" "$SRC/data/pg_wal/${SEGMENTS[-1]}" || { say "restore ($1): pgBackRest's ${SEGMENTS[-1]} differs from the original"; exit 1; }
  say "restore ($1): fleet-agent ${FETCH_FLEET[$1]} s, pgBackRest ${FETCH_PGBR[$1]} s"
}

run_method fleet-zst3 cmd_fleet
run_method fleet cmd_fleet
run_method fleet-module cmd_fleet
run_method pgbr-sync cmd_pgbr_sync
run_method pgbr-async cmd_pgbr_async
run_method pgbr-async-zst1 cmd_pgbr_async_zst1
run_method seed cmd_seed
# The daemon still serves the directory archive of the last fleet run.
if has_method fleet && has_method pgbr-async-zst1; then restore dir pgbr-async-zst1; fi
run_method fleet-s3 cmd_fleet
run_method fleet-module-s3 cmd_fleet
run_method pgbr-async-s3-zst1 cmd_pgbr_async_s3_zst1
if has_method fleet-s3 && has_method pgbr-async-s3-zst1; then restore s3 pgbr-async-s3-zst1; fi
kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0 || a == "-" || b == "" || a == "") print "-"; else printf "%.2fx", a / b }'; }
verdict() { awk -v v="${1%x}" -v op="$2" -v g="$3" 'BEGIN { if (v == "-") print "not measured"; else if ((op == ">=" && v >= g) || (op == "<=" && v <= g) || (op == "<" && v < g)) print "met"; else print "NOT met" }'; }
BUILD="release"; [[ "$BIN" == */debug ]] && BUILD="debug"
{
  echo "## WAL archiving (issue 6, issue 13)"
  echo
  echo "Command: \`$([[ -n "${FLEET_BIN_DIR:-}" ]] && echo "FLEET_BIN_DIR=${BIN#"$ROOT"/} ")$(has_method fleet-s3 || has_method fleet-module-s3 || has_method pgbr-async-s3-zst1 && echo "BENCH_S3_SERVER=$S3_SERVER ")BENCH_SCALE=$SCALE BENCH_LOAD_SECONDS=$LOAD_SECONDS BENCH_METHODS=\"$METHODS\" BENCH_OBJECT_CHECKSUM=${BENCH_OBJECT_CHECKSUM:-xxh3} BENCH_WAL_SHAPE=$SHAPE bash bench/wal.sh\`, $(date -u +%Y-%m-%dT%H:%MZ),"
  echo "$(nproc) cores, $BUILD build of fleet-agent, PostgreSQL $("$PG/postgres" --version | awk '{print $3}'), $PGBR_VERSION."
  echo "Backlog: $BACKLOG segments of 16 MiB from \`pgbench -i -s $SCALE\`, archived from a standing start."
  echo "Directory targets are on the same disk; S3 is one $S3_DESC on loopback (one bucket) behind HAProxy's TLS,"
  echo "both tools over HTTPS (pgBackRest speaks only HTTPS to S3)."
  echo "Latency: each \`archive_command\` call timed by the same stopwatch, $TIMER_DESC, which costs"
  echo "$STOPWATCH_MS ms CPU per call on this host (measured in this run) and is charged to both methods (successful calls)."
  echo "Drain: until no \`.ready\` file is left, sampled every 20 ms."
  echo "CPU/segment: user+system of everything the method started (its fleet-agentd, the PostgreSQL copy with"
  echo "its archiver and every \`archive_command\` child, pgBackRest's async and local processes), from one"
  echo "cpuacct cgroup per method so exited processes count, over the drain, divided by the backlog; the"
  echo "S3 server's own CPU ($S3_SERVER + HAProxy's TLS, from /proc/<pid>/stat; of it HAProxy) apart. RSS: the daemon's VmHWM at the end of the drain;"
  echo "file / anon: RssFile / RssAnon from /proc/<pid>/status sampled every 20 ms through the drain, at the largest VmRSS sampled (the largest of each in parentheses)."
  echo "WAL service: $SHAPE_DESC."
  echo "Daemon environment: ${UNIT_ENV[*]:-none} ($([[ ${#UNIT_ENV[@]} -gt 0 ]] && echo "the Environment= of systemd/fleet-agent-wal.service" || echo "BENCH_DAEMON_ENV=none"))."
  echo "Ratios are against pgBackRest async at the same zstd level into the same target, measured in the same run."
  echo
  echo "| method | target | drain time | segments/s | vs pgBackRest | call p50 | call p99 | CPU ms/segment | vs pgBackRest | of it daemon | S3 server CPU ms/segment (of it HAProxy) | daemon peak RSS | of it file / anon MiB | max .ready under load |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  for m in "${RAN[@]}"; do
    b=${BASE[$m]}; t=dir; [[ $m == *-s3* ]] && t=S3
    echo "| ${DESC[$m]} | $t | ${DRAIN[$m]} s | ${RATE[$m]} | $(ratio "${RATE[$m]}" "${RATE[$b]:-}") | ${P50[$m]} ms | ${P99[$m]} ms | ${CPUSEG[$m]} | $(ratio "${CPUSEG[$m]}" "${CPUSEG[$b]:-}") | ${DCPUSEG[$m]} | $([[ ${HACPUSEG[$m]} == - ]] && echo - || echo "${S3CPUSEG[$m]} (${HACPUSEG[$m]})") | ${RSS[$m]} MiB | ${RSSSPLIT[$m]} | ${MAXLOAD[$m]} |"
  done
  echo
  echo "Where each drain ends (seconds after it began; objects stored: s3s-fs only, from the files' mtimes):"
  for m in "${RAN[@]}"; do
    echo "- $m: PostgreSQL up at ${PGSTART[$m]}, first / last object stored at ${FIRSTOBJ[$m]} / ${LASTOBJ[$m]}, last \`.ready\` gone at ${DRAIN[$m]}; pgBackRest processes left then: ${ASYNCLEFT[$m]}; CPU in the 2 s after (not counted): the method ${TAILCPU[$m]} ms, the S3 server ${TAILS3[$m]} ms."
  done
  echo
  for t in dir s3; do
    [[ -n "${FETCH_FLEET[$t]:-}" ]] || { echo "Restore ($t): not measured in this run."; continue; }
    echo "Restore ($t) of ${#SEGMENTS[@]} segments ($(( ${#SEGMENTS[@]} * 16 )) MiB) in recovery order, one call per segment:"
    echo "fleet-agent \`agentctl wal fetch\` (prefetch, checksum verified) ${FETCH_FLEET[$t]} s; pgBackRest \`archive-get\` ${FETCH_PGBR[$t]} s"
    echo "(fleet-agent $(ratio "${FETCH_PGBR[$t]}" "${FETCH_FLEET[$t]}") faster)."
  done
  echo
  echo "Goals of issue 13, this run:"
  for m in fleet fleet-s3 fleet-module fleet-module-s3; do
    has_method "$m" || continue
    b=${BASE[$m]}
    r=$(ratio "${RATE[$m]}" "${RATE[$b]:-}"); c=$(ratio "${CPUSEG[$m]}" "${CPUSEG[$b]:-}")
    echo "- $m: drain $r of pgBackRest async at zstd 1 (goal >= 2x: $(verdict "$r" '>=' 2)); CPU/segment $c (goal <= 0.5x: $(verdict "$c" '<=' 0.5)); daemon peak RSS ${RSS[$m]} MiB (goal < 32 MiB: $(verdict "${RSS[$m]}" '<' 32))."
  done
  for t in dir s3; do
    [[ -n "${FETCH_FLEET[$t]:-}" ]] || continue
    r=$(ratio "${FETCH_PGBR[$t]}" "${FETCH_FLEET[$t]}")
    echo "- restore ($t): $r faster than archive-get (goal >= 3x: $(verdict "$r" '>=' 3))."
  done
} >"$WORK/section.md"
SECTION="$(cat "$WORK/section.md")"
if [[ -n "${BENCH_NOTES:-}" && -f "$BENCH_NOTES" ]]; then SECTION="$SECTION
$(cat "$BENCH_NOTES")"; fi
write_bench_section wal "$OUT" <<<"$SECTION"
say "wrote the wal section of $OUT"
echo "$SECTION"
