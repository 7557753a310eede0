# Shared helpers of the benchmark scripts (sourced, not run).

# write_bench_section NAME FILE: replaces the part of FILE between
# `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` with standard input, or appends
# it when the markers are missing. Every benchmark owns one section, so running one
# script never erases another's results.
write_bench_section() {
  local name="$1" file="$2" body tmp
  body="$(cat)"
  mkdir -p "$(dirname "$file")"
  [[ -f "$file" ]] || printf '# Benchmarks\n\nEach section is written by the script it names; rerun that script to refresh it.\n' >"$file"
  tmp="$(mktemp "$file.XXXXXX")"
  BODY="$body" awk -v start="<!-- bench:$name -->" -v end="<!-- /bench:$name -->" '
    $0 == start { print; print ENVIRON["BODY"]; skipping = 1; found = 1; next }
    $0 == end { skipping = 0 }
    !skipping { print }
    END { if (!found) { print ""; print start; print ENVIRON["BODY"]; print end } }
  ' "$file" >"$tmp"
  mv "$tmp" "$file"
}

# machine_line: one line naming the machine and build the figures came from.
machine_line() {
  printf 'Run: %s, %s CPUs, %s RAM, kernel %s, Docker %s, fleet-agent %s.\n' \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" \
    "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)" \
    "$(uname -r)" "$(docker version --format '{{.Server.Version}}' 2>/dev/null || echo none)" \
    "$(git describe --always --dirty 2>/dev/null || echo unknown)"
}

say() { printf '==> %s\n' "$*" >&2; }

# bench_tools TOOL...: installs the Debian packages of the same names when missing.
bench_tools() {
  local tool missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  ((${#missing[@]} == 0)) || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

# bench_binaries: sets BIN to FLEET_BIN_DIR, or builds the release binaries into
# target/release, and makes sure the test images exist.
bench_binaries() {
  BIN="${FLEET_BIN_DIR:-$ROOT/target/release}"
  if [[ -z "${FLEET_BIN_DIR:-}" ]]; then
    say "building release binaries"
    cargo build --release --quiet -p fleet-agentd -p agentctl
  fi
  bash "$ROOT/tests/images/build.sh" >&2
}

# bench_workdir PREFIX: sets WORK (a fresh temp dir) and NODE (a node id unique
# to this run, so cleanup only ever removes this run's containers).
bench_workdir() {
  WORK="$(mktemp -d "/tmp/fleet-bench-$1-XXXXXX")"
  NODE="$1-$(basename "$WORK" | rev | cut -d- -f1 | rev | tr 'A-Z' 'a-z')"
}

# bench_cleanup: the EXIT trap of a benchmark: stops the daemon it started
# (DAEMON_PID), removes this run's containers (node NODE, and BASE_LABEL when the
# script labels its baseline containers) and the work dir.
bench_cleanup() {
  if [[ -n "${DAEMON_PID:-}" ]]; then
    kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
  fi
  bench_remove_containers "label=fleet-agent.node=$NODE" ${BASE_LABEL:+"label=$BASE_LABEL"}
  rm -rf "$WORK"
}

# bench_remove_containers FILTER...: force-removes the containers matching any filter.
bench_remove_containers() {
  local filter ids=""
  for filter in "$@"; do ids+=" $(docker ps -aq --filter "$filter")"; done
  # shellcheck disable=SC2086
  [[ -n "${ids//[[:space:]]/}" ]] && docker rm -f $ids >/dev/null 2>&1 || true
}

# bench_start_daemon PORTS: writes a standalone agent.toml under WORK (port pool
# PORTS, no TCP API, JSON logs to WORK/daemon.log), starts fleet-agentd from BIN,
# sets DAEMON_PID and waits until `ctl` (agentctl on its socket) answers.
# BENCH_TOP_LEVEL_TOML adds top-level keys (e.g. `start_concurrency = 10`) for experiments.
bench_start_daemon() {
  mkdir -p "$WORK/state" "$WORK/departments.d" "$WORK/specs"
  cat >"$WORK/agent.toml" <<TOML
node_id = "$NODE"
state_dir = "$WORK/state"
socket = "$WORK/agentctl.sock"
departments_dir = "$WORK/departments.d"
${BENCH_TOP_LEVEL_TOML:-}
[ports]
range = "$1"
[api]
listen = ""
[log]
format = "json"
TOML
  say "starting fleet-agentd"
  "$BIN/fleet-agentd" --config "$WORK/agent.toml" >"$WORK/daemon.log" 2>&1 &
  DAEMON_PID=$!
  local _
  for _ in $(seq 1 300); do ctl status >/dev/null 2>&1 && return; sleep 0.1; done
  cat "$WORK/daemon.log" >&2
  exit 1
}

ctl() { "$BIN/agentctl" --socket "$WORK/agentctl.sock" "$@"; }

# unit_environment UNIT: the values of UNIT's Environment= lines, one line,
# space-separated (the WAL benchmarks give the service what its unit gives it).
unit_environment() { sed -n 's/^Environment=//p' "$1" | tr '\n' ' '; }

# The WAL unit's User=/Group= (postgres) as a command prefix. setpriv execs
# (runuser would stay as the parent), so $! of a command started with it is
# that command's pid.
AS_POSTGRES=(setpriv --reuid=postgres --regid=postgres --init-groups --)

# in_cgroup CGROUP CMD...: runs CMD inside the cpuacct cgroup (none: as is).
in_cgroup() {
  local g="$1"; shift
  if [[ -n "$g" ]]; then
    sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$g" "$@"
  else
    "$@"
  fi
}
# cg_cpu_ns CGROUP: user+system nanoseconds of everything that ran in it.
cg_cpu_ns() { echo $(( $(cat "$1/cpuacct.usage_user") + $(cat "$1/cpuacct.usage_sys") )); }

# unit_exec ARRAY UNIT BIN CONFIG: fills ARRAY with UNIT's ExecStart= as the
# WAL benchmarks run it: its program taken by name from BIN, and CONFIG in
# place of the unit's /run/fleet-agent-wal/agent.toml. Fails naming what is missing.
unit_exec() {
  local -n exec_into=$1
  read -ra exec_into <<<"$(sed -n 's/^ExecStart=//p' "$2" | head -n 1)"
  ((${#exec_into[@]})) || { say "$2 has no ExecStart="; return 1; }
  exec_into[0]="$3/$(basename "${exec_into[0]}")"
  [[ -x "${exec_into[0]}" ]] || { say "the unit's program ${exec_into[0]} is missing"; return 1; }
  local i
  for i in "${!exec_into[@]}"; do
    [[ "${exec_into[$i]}" == /run/fleet-agent-wal/agent.toml ]] && exec_into[$i]="$4"
  done
  return 0
}
